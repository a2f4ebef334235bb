//! Embeds the request body's lines with `gigafactory:ai` `embed` and
//! answers `{"vectors": [[…], …], "prompt_tokens": n}`; the model is the
//! `x-model` header (default all-MiniLM-L6-v2). Errors keep the status the
//! SDK gives them.

use gigafactory_sdk::ai;
use gigafactory_sdk::http::{Handler, Request, Response};

struct Embed;

impl Handler for Embed {
    fn handle(request: Request) -> Response {
        let model = request.header("x-model").unwrap_or("all-minilm-l6-v2");
        let Ok(body) = request.text() else {
            return Response::error(400, "bad_request", "the body is not UTF-8");
        };
        let texts: Vec<&str> = if body.is_empty() {
            vec![]
        } else {
            body.split('\n').collect()
        };
        match ai::embed(model, &texts) {
            Ok(embeddings) => {
                let vectors: Vec<String> = embeddings
                    .vectors
                    .iter()
                    .map(|vector| format!("{vector:?}"))
                    .collect();
                Response::json(
                    200,
                    format!(
                        "{{\"vectors\": [{}], \"prompt_tokens\": {}}}",
                        vectors.join(","),
                        embeddings.prompt_tokens
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

gigafactory_sdk::export_handler!(Embed);
