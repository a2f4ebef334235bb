//! A Gigafactory function: sentence embeddings. POST lines of text, get a
//! JSON array of vectors. The model stays resident on the platform and
//! runs batched with every other caller's requests.

use gigafactory_sdk::ai;
use gigafactory_sdk::http::{Handler, Request, Response, json_string};

/// Listed in gigafactory.toml's `models`.
const MODEL: &str = "all-minilm-l6-v2";

struct Function;

impl Handler for Function {
    fn handle(request: Request) -> Response {
        let Ok(text) = request.text() else {
            return Response::error(400, "bad_request", "send UTF-8 text, one sentence a line");
        };
        let sentences: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if sentences.is_empty() {
            return Response::error(400, "bad_request", "send at least one line of text");
        }
        match ai::embed(MODEL, &sentences) {
            Ok(embeddings) => {
                let vectors: Vec<String> = embeddings
                    .vectors
                    .iter()
                    .map(|v| {
                        let numbers: Vec<String> = v.iter().map(f32::to_string).collect();
                        format!("[{}]", numbers.join(","))
                    })
                    .collect();
                Response::json(
                    200,
                    format!(
                        "{{\"model\":{},\"vectors\":[{}]}}",
                        json_string(MODEL),
                        vectors.join(",")
                    ),
                )
            }
            Err(error) => {
                let (status, code) = error.status();
                Response::error(status, code, error.message())
            }
        }
    }
}

gigafactory_sdk::export_handler!(Function);
