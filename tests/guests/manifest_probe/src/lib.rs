//! Probes what its manifest granted, by path:
//! `/env`, `/file`, `/escape`, `/grow?mib=N`, `/fetch?url=U`,
//! `/model?name=M`, `/sleep?ms=N`, `/big?bytes=N`, `/size` (of the body),
//! `/lookup?name=M&rows=0,5` (model M's I64 input `rows`: the first value
//! of each row of its first output).

use std::io::{Read, Write};

use gigafactory_sdk::http::{Handler, Request, Response};
use gigafactory_sdk::nn::{Graph, Tensor};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, OutgoingRequest, Scheme};

struct Probe;

fn query<'a>(request: &'a Request, key: &str) -> &'a str {
    let query = request.path.split_once('?').map_or("", |(_, q)| q);
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map_or("", |(_, v)| v)
}

fn number(request: &Request, key: &str) -> u64 {
    query(request, key).parse().unwrap_or(0)
}

fn read(path: &str) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => format!("ok:{}", text.trim()),
        Err(e) => format!("err:{:?}", e.kind()),
    }
}

fn fetch(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "err:bad url".into();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let request = OutgoingRequest::new(Fields::new());
    let _ = request.set_scheme(Some(&if scheme == "https" {
        Scheme::Https
    } else {
        Scheme::Http
    }));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(if path.is_empty() { "/" } else { path }));
    let future = match outgoing_handler::handle(request, None) {
        Ok(future) => future,
        Err(code) => return format!("err:{code:?}"),
    };
    future.subscribe().block();
    match future.get() {
        Some(Ok(Ok(response))) => {
            let mut body = String::new();
            if let Ok(incoming) = response.consume()
                && let Ok(mut stream) = incoming.stream()
            {
                let _ = stream.read_to_string(&mut body);
            }
            format!("ok:{} {}", response.status(), body.trim())
        }
        Some(Ok(Err(code))) => format!("err:{code:?}"),
        other => format!("err:{other:?}"),
    }
}

impl Handler for Probe {
    fn handle(request: Request) -> Response {
        let path = request.path.split('?').next().unwrap_or("/").to_string();
        let answer = match path.as_str() {
            "/env" => format!(
                "GREETING={} PATH={}",
                std::env::var("GREETING").unwrap_or_else(|_| "-".into()),
                std::env::var("PATH").unwrap_or_else(|_| "-".into())
            ),
            "/file" => read("/data/greeting.txt"),
            "/escape" => [
                "/etc/passwd",
                "/../etc/passwd",
                "/data/../../etc/passwd",
                "/proc/self/environ",
            ]
            .map(read)
            .join(" "),
            "/grow" => {
                let mut grown: Vec<u8> = Vec::new();
                grown.resize((number(&request, "mib") as usize) << 20, 1);
                format!("grew {}", grown.len())
            }
            "/fetch" => fetch(query(&request, "url")),
            "/model" => match Graph::by_name(query(&request, "name")) {
                Ok(_) => "ok".into(),
                Err(e) => format!("{:?}", e.code)
                    .rsplit("::")
                    .next()
                    .unwrap_or_default()
                    .to_lowercase(),
            },
            "/lookup" => lookup(query(&request, "name"), query(&request, "rows")),
            "/sleep" => {
                wasip2::clocks::monotonic_clock::subscribe_duration(
                    number(&request, "ms") * 1_000_000,
                )
                .block();
                "slept".into()
            }
            "/big" => return big(number(&request, "bytes")),
            "/size" => format!("{}", request.body.len()),
            _ => "?".into(),
        };
        Response::text(200, answer)
    }
}

/// Runs model `name` on `rows` (comma-separated) as its I64 input `rows`
/// and answers the first value of each row of its first output.
fn lookup(name: &str, rows: &str) -> String {
    let rows: Vec<i64> = rows.split(',').filter_map(|r| r.parse().ok()).collect();
    let outcome = Graph::by_name(name)
        .and_then(|graph| graph.context())
        .and_then(|context| {
            context.compute(vec![("rows", Tensor::new(&[rows.len() as u32], &rows))])
        });
    let outputs = match outcome {
        Ok(outputs) => outputs,
        Err(e) => return format!("error: {e}"),
    };
    let Some((_, tensor)) = outputs.iter().next() else {
        return "error: no output".into();
    };
    let values: Vec<f32> = tensor.to_vec().unwrap_or_default();
    let width = tensor.dims().last().copied().unwrap_or(1).max(1) as usize;
    values
        .chunks(width)
        .map(|row| row[0].to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A response of `bytes` bytes, streamed in 64 KiB chunks.
fn big(bytes: u64) -> Response {
    let mut body = Vec::new();
    let chunk = [b'x'; 65536];
    while (body.len() as u64) < bytes {
        let n = chunk.len().min((bytes - body.len() as u64) as usize);
        body.write_all(&chunk[..n]).expect("in memory");
    }
    Response::text(200, String::from_utf8(body).expect("ascii"))
}

gigafactory_sdk::export_handler!(Probe);
