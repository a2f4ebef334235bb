//! A WAGI program as people write them for any CGI host: plain `main`,
//! environment, arguments, stdin and stdout. Built for wasm32-wasip2 it is
//! a `wasi:cli` command component; for wasm32-wasip1, a core module.
//! What it does is chosen by the request's path (`PATH_INFO`).

use std::io::{Read, Write};

fn main() {
    let path = std::env::var("PATH_INFO").unwrap_or_default();
    let mut out = std::io::stdout().lock();
    match path.as_str() {
        "/created" => {
            write!(
                out,
                "Content-Type: application/json\r\nStatus: 201 Created\r\nX-Kind: cgi\r\n\r\n{{\"made\":true}}"
            )
            .unwrap();
        }
        "/moved" => write!(out, "Location: https://example.com/elsewhere\n\n").unwrap(),
        "/plain" => write!(out, "no header block here, just text").unwrap(),
        "/file" => {
            let text = std::fs::read_to_string("fixture/data.txt").unwrap();
            write!(out, "Content-Type: text/plain\n\n{text}").unwrap();
        }
        "/fail" => {
            eprintln!("cgi_echo: failing on purpose");
            std::process::exit(3);
        }
        "/trap" => {
            let values: Vec<u8> = Vec::new();
            let index = std::env::args().count() + 10;
            let _ = values[index];
        }
        "/flood" => {
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..24 {
                out.write_all(&chunk).unwrap();
            }
        }
        "/spin" => loop {
            std::hint::black_box(0u64);
        },
        _ => {
            let mut body = String::new();
            std::io::stdin().read_to_string(&mut body).unwrap();
            let args: Vec<String> = std::env::args().collect();
            let env = |name: &str| std::env::var(name).unwrap_or_else(|_| "<unset>".into());
            write!(out, "Content-Type: text/plain\n\n").unwrap();
            for name in [
                "REQUEST_METHOD",
                "PATH_INFO",
                "QUERY_STRING",
                "CONTENT_TYPE",
                "CONTENT_LENGTH",
                "SCRIPT_NAME",
                "X_MATCHED_ROUTE",
                "HTTP_X_GREETING",
                "GREETING",
            ] {
                writeln!(out, "{name}={}", env(name)).unwrap();
            }
            writeln!(out, "args={}", args.join("|")).unwrap();
            write!(out, "body={body}").unwrap();
        }
    }
}
