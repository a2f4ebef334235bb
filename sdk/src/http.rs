//! An HTTP handler: read the whole request, return a response whose body
//! is either whole or streamed ([`Response::stream`]: each write reaches
//! the client while the function runs, e.g. server-sent events).

use std::io::{Read, Write};

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// The largest request body [`serve`] reads; past it the request gets 413.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// An incoming request, read whole.
#[derive(Debug, Clone)]
pub struct Request {
    /// The method in upper case, e.g. `POST`.
    pub method: String,
    /// Path and query as the function sees them, e.g. `/search?q=fox`
    /// (the gateway strips its `/fn/{tenant}/{function}` prefix).
    pub path: String,
    /// Header names (lower case) and raw values, in arrival order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The request body.
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of header `name` (case-insensitive), if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.body)
    }
}

/// A response: status, headers, and a body sent whole or streamed.
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// Header names and values.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The response body (sent before any streamed part).
    pub body: Vec<u8>,
    stream: Option<StreamBody>,
}

/// What produces a streamed body.
type StreamBody = Box<dyn FnOnce(&mut BodyWriter)>;

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .field("streamed", &self.stream.is_some())
            .finish()
    }
}

/// Writes a streamed body: each [`BodyWriter::send`] is flushed to the client.
pub struct BodyWriter {
    stream: wasip2::io::streams::OutputStream,
}

/// The client went away; stop producing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGone;

impl BodyWriter {
    /// Sends `bytes` now.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), ClientGone> {
        self.stream
            .write_all(bytes)
            .and_then(|()| Write::flush(&mut self.stream))
            .map_err(|_| ClientGone)
    }
}

impl Response {
    /// A response with `status`, a content type and a body.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), content_type.as_bytes().to_vec())],
            body: body.into(),
            stream: None,
        }
    }

    /// A response whose body `write` produces while the client receives it,
    /// e.g. `text/event-stream` for server-sent events.
    pub fn stream(
        status: u16,
        content_type: &str,
        write: impl FnOnce(&mut BodyWriter) + 'static,
    ) -> Self {
        Self {
            stream: Some(Box::new(write)),
            ..Self::new(status, content_type, Vec::new())
        }
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body.into())
    }

    /// An `application/json` response from already serialised JSON.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "application/json", body)
    }

    /// A JSON error in the platform's shape: `{"error": {"code", "message"}}`.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        let body = format!(
            "{{\"error\":{{\"code\":{},\"message\":{}}}}}",
            json_string(code),
            json_string(message)
        );
        Self::json(status, body)
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }
}

/// What a function implements; export it with [`export_handler!`](crate::export_handler).
pub trait Handler {
    /// Answers one request. Each request runs in a fresh instance.
    fn handle(request: Request) -> Response;
}

/// Exports `$handler` (a type implementing [`Handler`]) as the component's
/// `wasi:http/incoming-handler`.
#[macro_export]
macro_rules! export_handler {
    ($handler:ident) => {
        impl $crate::__private::wasip2::exports::http::incoming_handler::Guest for $handler {
            fn handle(
                request: $crate::__private::wasip2::http::types::IncomingRequest,
                response_out: $crate::__private::wasip2::http::types::ResponseOutparam,
            ) {
                $crate::http::serve::<$handler>(request, response_out)
            }
        }
        $crate::__private::wasip2::http::proxy::export!(
            $handler with_types_in $crate::__private::wasip2
        );
    };
}

/// Reads `request`, runs `H`, and writes its response; used by [`export_handler!`](crate::export_handler).
pub fn serve<H: Handler>(request: IncomingRequest, response_out: ResponseOutparam) {
    let response = match read_request(&request) {
        Ok(request) => H::handle(request),
        Err(response) => response,
    };
    write_response(response, response_out);
}

fn read_request(request: &IncomingRequest) -> Result<Request, Response> {
    let headers = request
        .headers()
        .entries()
        .into_iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), value))
        .collect();
    let body = read_body(request)?;
    Ok(Request {
        method: method_name(&request.method()),
        path: request.path_with_query().unwrap_or_else(|| "/".into()),
        headers,
        body,
    })
}

fn read_body(request: &IncomingRequest) -> Result<Vec<u8>, Response> {
    let unreadable = |what: &str| Response::error(400, "bad_request", what);
    let incoming = request
        .consume()
        .map_err(|()| unreadable("request body already consumed"))?;
    let mut stream = incoming
        .stream()
        .map_err(|()| unreadable("request body stream unavailable"))?;
    let mut body = Vec::new();
    let limit = MAX_BODY_BYTES as u64 + 1;
    (&mut stream)
        .take(limit)
        .read_to_end(&mut body)
        .map_err(|e| unreadable(&format!("reading request body: {e}")))?;
    if body.len() > MAX_BODY_BYTES {
        return Err(Response::error(
            413,
            "payload_too_large",
            &format!("request body over {MAX_BODY_BYTES} bytes"),
        ));
    }
    Ok(body)
}

fn write_response(response: Response, response_out: ResponseOutparam) {
    let entries: Vec<(String, Vec<u8>)> = response.headers;
    let headers = Fields::from_list(&entries).unwrap_or_else(|_| Fields::new());
    let outgoing = OutgoingResponse::new(headers);
    // An out-of-range status is a bug in the function; answer 500 rather than trap.
    if outgoing.set_status_code(response.status).is_err() {
        let _ = outgoing.set_status_code(500);
    }
    let body = outgoing.body().expect("a new response has a body");
    ResponseOutparam::set(response_out, Ok(outgoing));
    {
        let stream = body.write().expect("a new body has a stream");
        let mut writer = BodyWriter { stream };
        // The client may be gone; nothing useful to do then.
        if writer.send(&response.body).is_ok()
            && let Some(write) = response.stream
        {
            write(&mut writer);
        }
    }
    let _ = OutgoingBody::finish(body, None);
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(other) => other.clone(),
    }
}

/// `text` as a JSON string literal, quotes included.
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_string_escapes_quotes_and_controls() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    #[test]
    fn error_response_has_platform_shape() {
        let response = Response::error(404, "not_found", "no \"x\"");
        assert_eq!(response.status, 404);
        assert_eq!(
            String::from_utf8(response.body).unwrap(),
            r#"{"error":{"code":"not_found","message":"no \"x\""}}"#
        );
    }
}
