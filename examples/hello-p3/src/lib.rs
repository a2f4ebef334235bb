//! The hello function as a WASI 0.3 HTTP handler (`wasi:http/handler@0.3`),
//! written against the standard `wasip3` bindings only: an async `handle`
//! whose response body is a stream the handler writes after returning.

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_future, wit_stream};

struct Hello;

wasip3::http::service::export!(Hello);

impl wasip3::exports::http::handler::Guest for Hello {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path = request.get_path_with_query().unwrap_or_else(|| "/".into());
        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        )])
        .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?;
        let (mut body, contents) = wit_stream::new();
        let (trailers, trailers_out) = wit_future::new(|| Ok(None));
        let greeting = format!("Hello from Gigafactory! You asked for {path}\n");
        wasip3::spawn_local(async move {
            body.write_all(greeting.into_bytes()).await;
            drop(body);
            let _ = trailers.write(Ok(None)).await;
            // Goes to the function's log, not the gateway's terminal.
            eprintln!("hello served {path}");
        });
        let (response, _sent) = Response::new(headers, Some(contents), trailers_out);
        Ok(response)
    }
}
