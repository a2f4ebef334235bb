//! A Gigafactory function: a `wasi:http` handler. Every request to
//! `/fn/<tenant>/<name>/…` arrives here in a fresh sandbox.

use gigafactory_sdk::http::{Handler, Request, Response};

struct Function;

impl Handler for Function {
    fn handle(request: Request) -> Response {
        let name = request.text().unwrap_or("").trim();
        let name = if name.is_empty() { "world" } else { name };
        // Goes to the function's log (`gigafactory logs NAME`).
        eprintln!("{} {}", request.method, request.path);
        Response::text(
            200,
            format!("Hello, {name}! You asked for {}\n", request.path),
        )
    }
}

gigafactory_sdk::export_handler!(Function);
