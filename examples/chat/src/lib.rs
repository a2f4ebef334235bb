//! Chat with the platform's resident SmolLM2: POST a JSON chat, get the
//! answer as server-sent events while the model writes it.
//!
//! ```text
//! POST {"messages": [{"role": "user", "content": "What is the capital of France?"}],
//!       "max_tokens": 128, "temperature": 0, "stop": ["\n\n"]}
//!
//! data: {"text":"The"}
//! data: {"text":" capital"}
//! …
//! event: done
//! data: {"prompt_tokens":17,"completion_tokens":7,"finish_reason":"stop"}
//! ```
//!
//! Errors before the first token are JSON with a fitting status (400 for a
//! bad request, 503 with `Retry-After` when the model is busy); an error
//! after it is an `event: error`.

use gigafactory_sdk::ai::{self, Chunk, FinishReason, Message, Options, Prompt};
use gigafactory_sdk::http::{BodyWriter, Handler, Request, Response};
use serde::Deserialize;
use serde_json::json;

const MODEL: &str = "smollm2-135m-instruct";
const MAX_TOKENS: u32 = 512;

struct Chat;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u32>,
    #[serde(default)]
    stop: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    content: String,
}

impl Handler for Chat {
    fn handle(request: Request) -> Response {
        match respond(&request) {
            Ok(response) | Err(response) => response,
        }
    }
}

fn respond(request: &Request) -> Result<Response, Response> {
    if request.method != "POST" {
        return Err(Response::error(
            405,
            "method_not_allowed",
            "POST a JSON chat",
        ));
    }
    let chat: ChatRequest = serde_json::from_slice(&request.body).map_err(|e| {
        Response::error(
            400,
            "bad_request",
            &format!("expected {{\"messages\": [{{\"role\", \"content\"}}, …]}}: {e}"),
        )
    })?;
    if chat.messages.is_empty() {
        return Err(Response::error(
            400,
            "bad_request",
            "send at least one message",
        ));
    }
    let max_tokens = chat.max_tokens.unwrap_or(256);
    if max_tokens > MAX_TOKENS {
        return Err(Response::error(
            400,
            "bad_request",
            &format!("max_tokens is at most {MAX_TOKENS}"),
        ));
    }
    let prompt = Prompt::Chat(
        chat.messages
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect(),
    );
    let options = Options {
        max_tokens,
        temperature: chat.temperature.unwrap_or(0.0),
        top_p: chat.top_p.unwrap_or(1.0),
        seed: chat.seed.unwrap_or(0),
        stop: chat.stop,
        ..Options::default()
    };
    let generation = ai::generate(MODEL, &prompt, &options).map_err(|e| {
        let (status, code) = e.status();
        let response = Response::error(status, code, e.message());
        if status == 503 {
            response.with_header("retry-after", "1")
        } else {
            response
        }
    })?;
    Ok(Response::stream(200, "text/event-stream", move |out| {
        for chunk in generation {
            let sent = match chunk {
                Ok(Chunk::Text(text)) => event(out, None, &json!({ "text": text })),
                Ok(Chunk::Done(usage)) => {
                    let reason = match usage.finish_reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                    };
                    let usage = json!({
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "finish_reason": reason,
                    });
                    event(out, Some("done"), &usage)
                }
                Err(e) => event(out, Some("error"), &json!({ "message": e.message() })),
            };
            // The client left: dropping the generation cancels it.
            if sent.is_err() {
                return;
            }
        }
    })
    .with_header("cache-control", "no-cache"))
}

/// Writes one server-sent event.
fn event(
    out: &mut BodyWriter,
    name: Option<&str>,
    data: &serde_json::Value,
) -> Result<(), gigafactory_sdk::http::ClientGone> {
    let mut text = String::new();
    if let Some(name) = name {
        text.push_str(&format!("event: {name}\n"));
    }
    text.push_str(&format!("data: {data}\n\n"));
    out.send(text.as_bytes())
}

gigafactory_sdk::export_handler!(Chat);
