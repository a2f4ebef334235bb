//! The smallest Gigafactory function: a plain `wasi:http` handler written
//! against the standard bindings only, exactly as `wasmtime serve` runs it.

use std::io::Write;

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

impl Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_else(|| "/".into());
        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        )])
        .expect("static header is valid");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("a new response has a body");
        ResponseOutparam::set(response_out, Ok(response));
        {
            let mut stream = body.write().expect("a new body has a stream");
            let greeting = format!("Hello from Gigafactory! You asked for {path}\n");
            stream
                .write_all(greeting.as_bytes())
                .and_then(|()| Write::flush(&mut stream))
                .expect("writing the response");
        }
        OutgoingBody::finish(body, None).expect("finishing the response");
        // Goes to the function's log, not the gateway's terminal.
        eprintln!("hello served {path}");
    }
}

wasip2::http::proxy::export!(Hello);
