//! Misbehaviour on request, by path: `/panic`, `/loop`, `/log`, `/ok`;
//! anything under `/echo` answers with what the function was given.

use gigafactory_sdk::http::{Handler, Request, Response};

struct Misbehave;

impl Handler for Misbehave {
    fn handle(request: Request) -> Response {
        match request.path.as_str() {
            "/panic" => panic!("asked to panic"),
            "/loop" =>
            {
                #[allow(clippy::empty_loop)]
                loop {}
            }
            "/log" => {
                println!("to stdout");
                eprintln!("to stderr");
                Response::text(200, "logged")
            }
            path if path.starts_with("/echo") => {
                let seen = format!(
                    "{} {} x-custom={} authorization={} body={}",
                    request.method,
                    request.path,
                    request.header("x-custom").unwrap_or("-"),
                    request.header("authorization").unwrap_or("-"),
                    String::from_utf8_lossy(&request.body)
                );
                Response::text(200, seen).with_header("x-echoed", "yes")
            }
            _ => Response::text(200, "ok"),
        }
    }
}

gigafactory_sdk::export_handler!(Misbehave);
