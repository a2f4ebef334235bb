//! A hostile function, written against raw wasi:http so it can misbehave
//! at every stage of a request. By path:
//!
//! - `/loop`: spins forever
//! - `/grow-forever`: allocates until memory runs out
//! - `/recurse`: recurses without bound
//! - `/trap-before`: panics before responding
//! - `/trap-after`: sends headers and some body, then panics
//! - `/spam?mb=N`: writes N MiB to stdout and stderr, then answers
//! - `/endless`: streams a response body forever
//! - `/read-forever`: reads the request body until it ends, then answers its size
//! - anything else: `fine`

mod attacks;

use std::io::{Read, Write};

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hostile;

fn start(response_out: ResponseOutparam) -> OutgoingBody {
    let response = OutgoingResponse::new(Fields::new());
    let body = response.body().expect("body");
    ResponseOutparam::set(response_out, Ok(response));
    body
}

fn answer(response_out: ResponseOutparam, text: &str) {
    let body = start(response_out);
    {
        let mut stream = body.write().expect("stream");
        stream.write_all(text.as_bytes()).expect("write");
        Write::flush(&mut stream).expect("flush");
    }
    OutgoingBody::finish(body, None).expect("finish");
}

impl Guest for Hostile {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let full_path = request.path_with_query().unwrap_or_default();
        let (path, query) = full_path.split_once('?').unwrap_or((&full_path, ""));
        match path {
            "/loop" => attacks::spin(),
            "/grow-forever" => attacks::grow_forever(),
            "/recurse" => {
                std::hint::black_box(attacks::recurse(0));
            }
            "/trap-before" => panic!("trapping before the response"),
            "/trap-after" => {
                let body = start(response_out);
                let mut stream = body.write().expect("stream");
                stream.write_all(b"partial").expect("write");
                Write::flush(&mut stream).expect("flush");
                panic!("trapping after the response started");
            }
            "/spam" => {
                let mb: usize = query
                    .strip_prefix("mb=")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1);
                let line = [b'x'; 1023];
                let mut stdout = std::io::stdout();
                let mut stderr = std::io::stderr();
                for _ in 0..mb * 1024 {
                    let _ = stdout
                        .write_all(&line)
                        .and_then(|()| stdout.write_all(b"\n"));
                    let _ = stderr
                        .write_all(&line)
                        .and_then(|()| stderr.write_all(b"\n"));
                }
                answer(response_out, "spammed");
            }
            "/endless" => {
                let body = start(response_out);
                let mut stream = body.write().expect("stream");
                let chunk = [b'y'; 65536];
                while stream.write_all(&chunk).is_ok() {}
            }
            "/read-forever" => {
                let incoming = request.consume().expect("body");
                let mut stream = incoming.stream().expect("stream");
                let mut total = 0usize;
                let mut buffer = [0u8; 4096];
                while let Ok(n) = Read::read(&mut stream, &mut buffer) {
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                drop(stream);
                answer(response_out, &format!("read {total}"));
            }
            _ => answer(response_out, "fine"),
        }
    }
}

wasip2::http::proxy::export!(Hostile);
