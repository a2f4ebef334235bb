//! A WASI 0.3 HTTP handler (`wasi:http/handler@0.3.0`) written with the
//! `wasip3` crate, as wasmtime's 0.3 programs are. By path:
//!
//! - `/echo`: streams the request body back as it arrives
//! - `/count?n=N`: streams N lines, one chunk each
//! - `/nn`: `y = x + x` on tests/data/tiny.onnx through `wasi:nn`
//! - `/ai`: all-MiniLM-L6-v2's embedding of "hello world" through
//!   `gigafactory:ai`, as a JSON array
//! - `/trap`: panics before answering
//! - anything else: a greeting naming the path

use gigafactory_sdk::ai;
use gigafactory_sdk::nn::{Graph, Tensor, TensorType};
use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::wit_bindgen::StreamResult;
use wasip3::{wit_future, wit_stream};

const TINY: &[u8] = include_bytes!("../../../data/tiny.onnx");

struct Handler;

wasip3::http::service::export!(Handler);

fn internal(why: impl std::fmt::Debug) -> ErrorCode {
    ErrorCode::InternalError(Some(format!("{why:?}")))
}

/// A response whose body is written by `write` after `handle` returns.
fn streamed<F>(content_type: &str, write: F) -> Result<Response, ErrorCode>
where
    F: AsyncFnOnce(&mut wasip3::wit_bindgen::StreamWriter<u8>) + 'static,
{
    let headers = Fields::from_list(&[("content-type".into(), content_type.as_bytes().to_vec())])
        .map_err(internal)?;
    let (mut body, contents) = wit_stream::new();
    let (trailers, trailers_out) = wit_future::new(|| Ok(None));
    wasip3::spawn_local(async move {
        write(&mut body).await;
        drop(body);
        let _ = trailers.write(Ok(None)).await;
    });
    let (response, _sent) = Response::new(headers, Some(contents), trailers_out);
    Ok(response)
}

fn whole(content_type: &str, text: String) -> Result<Response, ErrorCode> {
    streamed(content_type, async move |body| {
        body.write_all(text.into_bytes()).await;
    })
}

fn tiny() -> Result<String, gigafactory_sdk::nn::Error> {
    let graph = Graph::from_onnx(TINY)?;
    let outputs = graph.context()?.compute(vec![
        (
            "x_fp16",
            Tensor::from_bytes(&[2], TensorType::Fp16, vec![0; 4]),
        ),
        ("x_fp32", Tensor::new(&[2], &[1.25f32, -3.0])),
        ("x_fp64", Tensor::new(&[2], &[0f64, 0.0])),
        ("x_u8", Tensor::new(&[2], &[0u8, 0])),
        ("x_i32", Tensor::new(&[2], &[0i32, 0])),
        ("x_i64", Tensor::new(&[2], &[0i64, 0])),
    ])?;
    let y = outputs.get("y_fp32").expect("y_fp32").to_vec::<f32>()?;
    Ok(format!("y {},{}", y[0], y[1]))
}

impl wasip3::exports::http::handler::Guest for Handler {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let target = request.get_path_with_query().unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        match path {
            "/echo" => {
                let (done, result) = wit_future::new(|| Ok(()));
                let (mut incoming, _trailers) = Request::consume_body(request, result);
                streamed("application/octet-stream", async move |body| {
                    let mut buffer = Vec::with_capacity(16 * 1024);
                    loop {
                        let (status, chunk) = incoming.read(buffer).await;
                        buffer = chunk;
                        match status {
                            StreamResult::Complete(_) => {
                                buffer = body.write_all(buffer).await;
                                if !buffer.is_empty() {
                                    break;
                                }
                                buffer.reserve(16 * 1024);
                            }
                            StreamResult::Dropped | StreamResult::Cancelled => break,
                        }
                    }
                    drop(done);
                })
            }
            "/count" => {
                let n: u32 = query
                    .strip_prefix("n=")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(3);
                streamed("text/plain", async move |body| {
                    for i in 0..n {
                        body.write_all(format!("{i}\n").into_bytes()).await;
                    }
                })
            }
            "/nn" => whole("text/plain", tiny().map_err(internal)?),
            "/ai" => {
                let embeddings = ai::embed("all-minilm-l6-v2", &["hello world"])
                    .map_err(|e| internal(e.message().to_string()))?;
                whole("application/json", format!("{:?}", embeddings.vectors[0]))
            }
            "/trap" => panic!("trapping before the response"),
            _ => whole(
                "text/plain; charset=utf-8",
                format!("Hello from Gigafactory over WASI 0.3! You asked for {target}\n"),
            ),
        }
    }
}
