//! Misbehaviour on request, by path: `/panic`, `/loop`, `/log`, `/ok`.

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
            _ => Response::text(200, "ok"),
        }
    }
}

gigafactory_sdk::export_handler!(Misbehave);
