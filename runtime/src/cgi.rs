//! Command functions speak CGI as WAGI defines it: the request is the
//! program's environment (`REQUEST_METHOD`, `PATH_INFO`, `HTTP_*` …), its
//! arguments (the path, then the query's `name=value` pairs) and its
//! stdin (the body); its stdout is a CGI response (header lines, a blank
//! line, the body), or, with no header block, a `text/plain` body.

use bytes::Bytes;
use hyper::StatusCode;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderName, HeaderValue, LOCATION};

/// What a command is started with.
pub(crate) struct Start {
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

/// The environment and arguments for `request`, whose body is
/// `body_bytes` long. `route` is the public path that chose the function
/// (`/fn/acme/hello`); the request's own path is what follows it.
pub(crate) fn start(
    request: &hyper::http::request::Parts,
    route: &str,
    body_bytes: usize,
) -> Start {
    let path = request.uri.path();
    let query = request.uri.query().unwrap_or("");
    let host = request
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let (server, port) = match host.rsplit_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => (name, port),
        _ => (host, "80"),
    };
    let header = |name| {
        request
            .headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let full_url = match query {
        "" => format!("http://{host}{route}{path}"),
        query => format!("http://{host}{route}{path}?{query}"),
    };
    let mut env = vec![
        ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
        ("SERVER_SOFTWARE".into(), "Gigafactory".into()),
        ("SERVER_PROTOCOL".into(), format!("{:?}", request.version)),
        ("SERVER_NAME".into(), server.into()),
        ("SERVER_PORT".into(), port.into()),
        ("REQUEST_METHOD".into(), request.method.to_string()),
        ("SCRIPT_NAME".into(), route.into()),
        ("PATH_INFO".into(), path.into()),
        ("PATH_TRANSLATED".into(), path.into()),
        ("QUERY_STRING".into(), query.into()),
        ("CONTENT_TYPE".into(), header(CONTENT_TYPE)),
        ("CONTENT_LENGTH".into(), body_bytes.to_string()),
        ("AUTH_TYPE".into(), String::new()),
        ("REMOTE_USER".into(), String::new()),
        ("X_MATCHED_ROUTE".into(), format!("{route}/...")),
        ("X_RAW_PATH_INFO".into(), path.into()),
        ("X_FULL_URL".into(), full_url),
    ];
    for name in request.headers.keys() {
        if name == CONTENT_TYPE || name == CONTENT_LENGTH {
            continue;
        }
        let values: Vec<&str> = request
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let variable = format!("HTTP_{}", name.as_str().to_uppercase().replace('-', "_"));
        env.push((variable, values.join(", ")));
    }
    let mut args = vec![format!("{route}{path}")];
    args.extend(
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((name, value)) => format!("{}={}", decode(name), decode(value)),
                None => decode(pair),
            }),
    );
    Start { env, args }
}

/// `%XX` and `+` of a query component.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[index + 1]), hex(bytes[index + 2])) {
                    (Some(high), Some(low)) => {
                        out.push((high * 16 + low) as u8);
                        index += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The HTTP response a command's stdout describes.
pub(crate) fn response(stdout: Bytes) -> Result<hyper::Response<Bytes>, String> {
    let Some((head, body)) = split_head(&stdout) else {
        // No header block: the whole output is a plain-text body.
        let mut response = hyper::Response::new(stdout);
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(response);
    };
    let body = stdout.slice(body..);
    let mut response = hyper::Response::new(body);
    let mut status = None;
    for line in head.lines() {
        let (name, value) = line.split_once(':').expect("split_head checked every line");
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("");
            let code = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| {
                    format!("its CGI Status header {value:?} has no valid status code")
                })?;
            status = Some(code);
            continue;
        }
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("its CGI header name {name:?} is not valid"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| format!("its CGI header {name} has a value that is not valid"))?;
        if name == LOCATION && status.is_none() {
            status = Some(StatusCode::FOUND);
        }
        response.headers_mut().append(name, value);
    }
    *response.status_mut() = status.unwrap_or(StatusCode::OK);
    Ok(response)
}

/// The header block (text) and where the body starts, if the output
/// starts with `Name: value` lines ended by a blank line (or by the end
/// of the output).
fn split_head(output: &[u8]) -> Option<(String, usize)> {
    let mut start = 0;
    let mut lines = Vec::new();
    loop {
        let end = output[start..].iter().position(|&b| b == b'\n');
        let (line, next) = match end {
            Some(at) => (&output[start..start + at], start + at + 1),
            None => (&output[start..], output.len()),
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            // A blank line ends the head; none before it is no head at all.
            return (!lines.is_empty()).then(|| (lines.join("\n"), next));
        }
        let text = std::str::from_utf8(line).ok()?;
        let (name, _) = text.split_once(':')?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        lines.push(text.to_string());
        if next >= output.len() {
            return Some((lines.join("\n"), output.len()));
        }
        start = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> hyper::http::request::Parts {
        let mut request = hyper::Request::post(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_request_becomes_environment_and_arguments() {
        let request = parts(
            "/classify?top=3&label=a%20b&flag",
            &[
                ("host", "example.com:8080"),
                ("content-type", "image/png"),
                ("x-trace", "1"),
            ],
        );
        let start = start(&request, "/fn/acme/vision", 42);
        let env: std::collections::HashMap<_, _> = start.env.into_iter().collect();
        assert_eq!(env["REQUEST_METHOD"], "POST");
        assert_eq!(env["PATH_INFO"], "/classify");
        assert_eq!(env["SCRIPT_NAME"], "/fn/acme/vision");
        assert_eq!(env["QUERY_STRING"], "top=3&label=a%20b&flag");
        assert_eq!(env["CONTENT_TYPE"], "image/png");
        assert_eq!(env["CONTENT_LENGTH"], "42");
        assert_eq!(env["SERVER_NAME"], "example.com");
        assert_eq!(env["SERVER_PORT"], "8080");
        assert_eq!(env["HTTP_X_TRACE"], "1");
        assert_eq!(env["HTTP_HOST"], "example.com:8080");
        assert!(!env.contains_key("HTTP_CONTENT_TYPE"));
        assert_eq!(env["X_MATCHED_ROUTE"], "/fn/acme/vision/...");
        assert_eq!(
            env["X_FULL_URL"],
            "http://example.com:8080/fn/acme/vision/classify?top=3&label=a%20b&flag"
        );
        assert_eq!(
            start.args,
            ["/fn/acme/vision/classify", "top=3", "label=a b", "flag"]
        );
    }

    #[test]
    fn stdout_becomes_the_response() {
        let created = response_of(
            b"Content-Type: application/json\r\nStatus: 201 Created\r\nX-Model: mobilenet\r\n\r\n{\"ok\":true}",
        );
        assert_eq!(created.status(), 201);
        assert_eq!(created.headers()["content-type"], "application/json");
        assert_eq!(created.headers()["x-model"], "mobilenet");
        assert_eq!(created.body(), "{\"ok\":true}");

        let moved = response_of(b"Location: https://example.com/x\n\n");
        assert_eq!(moved.status(), 302);
        assert_eq!(moved.headers()["location"], "https://example.com/x");

        let plain = response_of(b"hello: there is no blank line\nso this is text");
        assert_eq!(plain.status(), 200);
        assert_eq!(plain.headers()["content-type"], "text/plain");
        assert_eq!(
            plain.body(),
            "hello: there is no blank line\nso this is text"
        );

        let plain = response_of(b"just text\n\nmore");
        assert_eq!(plain.headers()["content-type"], "text/plain");
        assert_eq!(plain.body(), "just text\n\nmore");

        let head_only = response_of(b"Content-Type: text/html\n");
        assert_eq!(head_only.headers()["content-type"], "text/html");
        assert_eq!(head_only.body(), "");

        assert!(response(Bytes::from_static(b"Status: soon\n\n")).is_err());
    }

    fn response_of(output: &'static [u8]) -> hyper::Response<Bytes> {
        response(Bytes::from_static(output)).unwrap()
    }

    #[test]
    fn query_components_are_decoded() {
        assert_eq!(decode("a%20b+c"), "a b c");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("%C3%A9"), "é");
    }
}
