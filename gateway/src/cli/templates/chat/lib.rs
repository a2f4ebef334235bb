//! A Gigafactory function: chat with a resident language model. POST a
//! question as text; the answer streams back as the model writes it.

use gigafactory_sdk::ai::{self, Chunk, Message, Options, Prompt};
use gigafactory_sdk::http::{Handler, Request, Response};

/// Listed in gigafactory.toml's `models`.
const MODEL: &str = "smollm2-135m-instruct";

struct Function;

impl Handler for Function {
    fn handle(request: Request) -> Response {
        let question = request.text().unwrap_or("").trim().to_string();
        if question.is_empty() {
            return Response::error(400, "bad_request", "POST a question as text");
        }
        let prompt = Prompt::Chat(vec![Message {
            role: "user".into(),
            content: question,
        }]);
        let options = Options {
            max_tokens: 128,
            ..Options::default()
        };
        let generation = match ai::generate(MODEL, &prompt, &options) {
            Ok(generation) => generation,
            Err(error) => {
                let (status, code) = error.status();
                return Response::error(status, code, error.message());
            }
        };
        Response::stream(200, "text/plain; charset=utf-8", move |out| {
            for chunk in generation {
                let sent = match chunk {
                    Ok(Chunk::Text(text)) => out.send(text.as_bytes()),
                    Ok(Chunk::Done(_)) => out.send(b"\n"),
                    Err(error) => out.send(format!("\n[error: {}]\n", error.message()).as_bytes()),
                };
                // The client left: dropping the generation cancels it.
                if sent.is_err() {
                    return;
                }
            }
        })
    }
}

gigafactory_sdk::export_handler!(Function);
