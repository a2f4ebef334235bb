//! OpenAI-compatible endpoints for tenants who just want a model, no
//! function: `POST /openai/v1/chat/completions` (whole or streamed as
//! server-sent events) and `GET /openai/v1/models`. The tenant's API key is
//! the bearer token; the tenant's rate and concurrency quotas and model
//! permissions apply as they do to its functions.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use gigafactory_runtime::llm::{self, Event, FinishReason, GenerateError, Generation};
use gigafactory_runtime::models::ErrorCode;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;

use super::control::read_body;
use super::routes::{Request, json};
use super::{ApiError, BoxError, Gateway, Response};

/// The largest chat request body.
const MAX_BODY: usize = 1 << 20;
/// `max_tokens` when the request gives none.
const DEFAULT_MAX_TOKENS: u32 = 512;

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

/// Message content: a string, or parts of which only text is supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl Gateway {
    /// `/openai/…`: `segments` are the path after `openai`.
    pub(super) async fn openai(
        &self,
        request: Request,
        segments: &[&str],
        method: &Method,
    ) -> Result<Response, ApiError> {
        match (segments, method) {
            (["v1", "models"], &Method::GET) => self.openai_models(&request),
            (["v1", "chat", "completions"], &Method::POST) => self.chat_completions(request).await,
            (["v1", "models"] | ["v1", "chat", "completions"], _) => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed here"),
            )),
            _ => Err(ApiError::not_found(format!(
                "no OpenAI-compatible route /openai/{}",
                segments.join("/")
            ))),
        }
    }

    /// The models the tenant may use, in OpenAI's list shape.
    fn openai_models(&self, request: &Request) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(request)?;
        let visible = self.visible_models(&self.tenant_record(&tenant)?.quota);
        let data: Vec<Value> = self
            .runtime
            .models()
            .list()
            .into_iter()
            .filter(|m| visible.contains(&m.name))
            .map(|m| {
                json!({
                    "id": m.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "gigafactory",
                })
            })
            .collect();
        Ok(json(
            StatusCode::OK,
            json!({ "object": "list", "data": data }),
        ))
    }

    async fn chat_completions(&self, request: Request) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(&request)?;
        let quota = self.tenant_record(&tenant)?.quota;
        let admitted = self.admission.admit(&tenant, &quota)?;
        let body = read_body(request, MAX_BODY).await?;
        let chat: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_request",
                format!("not a chat completion request: {e}"),
            )
        })?;
        if chat.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request(
                "invalid_request",
                "n: only one choice per request is supported",
            ));
        }
        if !self.visible_models(&quota).contains(&chat.model) {
            return Err(model_not_found(&chat.model));
        }
        let model = self
            .runtime
            .models()
            .text(&chat.model)
            .await
            .map_err(|e| match e.code {
                ErrorCode::NotFound => model_not_found(&chat.model),
                ErrorCode::UnsupportedOperation => {
                    ApiError::bad_request("invalid_request", e.message)
                }
                _ => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "model_unavailable",
                    e.message,
                ),
            })?;
        let messages = chat
            .messages
            .into_iter()
            .map(|m| Ok((m.role, text_of(m.content)?)))
            .collect::<Result<Vec<_>, ApiError>>()?;
        let generate = llm::Request {
            prompt: llm::Prompt::Chat(messages),
            max_tokens: chat
                .max_completion_tokens
                .or(chat.max_tokens)
                .unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: chat.temperature.unwrap_or(1.0),
            top_p: chat.top_p.unwrap_or(1.0),
            top_k: 0,
            seed: chat.seed.unwrap_or(0),
            stop: match chat.stop {
                None => vec![],
                Some(Stop::One(stop)) => vec![stop],
                Some(Stop::Many(stops)) => stops,
            },
        };
        let generation = model
            .generate(tenant.as_str().into(), generate)
            .map_err(generate_error)?;
        let head = Head {
            id: format!("chatcmpl-{}", completion_id()),
            model: chat.model,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        if chat.stream {
            let body = ChunkStream {
                generation,
                head,
                include_usage: chat.stream_options.is_some_and(|o| o.include_usage),
                sent_role: false,
                finished: false,
                _permit: admitted.permit,
            };
            return Ok(hyper::Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(body.boxed_unsync())
                .expect("a valid response"));
        }
        let _permit = admitted.permit;
        whole(generation, head).await
    }
}

/// What every response and chunk of one completion repeats.
struct Head {
    id: String,
    model: String,
    created: u64,
}

fn model_not_found(model: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!("the model {model:?} does not exist or you do not have access to it"),
    )
}

fn generate_error(error: GenerateError) -> ApiError {
    match error {
        GenerateError::Invalid(why) => ApiError::bad_request("invalid_request", why),
        GenerateError::TooLarge(why) => ApiError::bad_request("context_length_exceeded", why),
        GenerateError::Busy(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_busy",
            error.to_string(),
        )
        .retry_after(1),
        GenerateError::Stopped(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_unavailable",
            error.to_string(),
        ),
    }
}

fn text_of(content: Content) -> Result<String, ApiError> {
    match content {
        Content::Text(text) => Ok(text),
        Content::Parts(parts) => parts
            .into_iter()
            .map(|part| match (part.kind.as_str(), part.text) {
                ("text", Some(text)) => Ok(text),
                (kind, _) => Err(ApiError::bad_request(
                    "invalid_request",
                    format!("message parts of type {kind:?} are not supported; send text"),
                )),
            })
            .collect(),
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn completion_id() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    hex::encode(bytes)
}

/// Waits for the whole completion.
async fn whole(mut generation: Generation, head: Head) -> Result<Response, ApiError> {
    let mut content = String::new();
    loop {
        match generation.next().await {
            Some(Event::Text(text)) => content.push_str(&text),
            Some(Event::Done(usage)) => {
                return Ok(json(
                    StatusCode::OK,
                    json!({
                        "id": head.id,
                        "object": "chat.completion",
                        "created": head.created,
                        "model": head.model,
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": finish_reason(usage.finish_reason),
                        }],
                        "usage": usage_json(&usage),
                    }),
                ));
            }
            Some(Event::Failed(why)) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "model_error",
                    why,
                ));
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "model_unavailable",
                    "the model stopped",
                ));
            }
        }
    }
}

fn usage_json(usage: &llm::Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

/// A streamed completion: one `chat.completion.chunk` event per piece of
/// text, then the finish reason (and usage when asked), then `[DONE]`.
/// Dropped when the client leaves, which cancels the generation.
struct ChunkStream {
    generation: Generation,
    head: Head,
    include_usage: bool,
    sent_role: bool,
    finished: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl ChunkStream {
    /// One `chat.completion.chunk` event with `choices` (and `usage`).
    fn event(&self, choices: Value, usage: Option<Value>) -> String {
        let mut chunk = json!({
            "id": self.head.id,
            "object": "chat.completion.chunk",
            "created": self.head.created,
            "model": self.head.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        format!("data: {chunk}\n\n")
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        self.event(
            json!([{"index": 0, "delta": delta, "finish_reason": finish}]),
            None,
        )
    }
}

impl hyper::body::Body for ChunkStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let event = match self.generation.poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(event) => event,
        };
        let text = match event {
            Some(Event::Text(text)) => {
                let mut delta = json!({ "content": text });
                if !self.sent_role {
                    self.sent_role = true;
                    delta["role"] = json!("assistant");
                }
                self.chunk(delta, None)
            }
            Some(Event::Done(usage)) => {
                self.finished = true;
                let mut text = self.chunk(json!({}), Some(finish_reason(usage.finish_reason)));
                if self.include_usage {
                    text.push_str(&self.event(json!([]), Some(usage_json(&usage))));
                }
                text.push_str("data: [DONE]\n\n");
                text
            }
            Some(Event::Failed(why)) => {
                self.finished = true;
                format!(
                    "data: {}\n\n",
                    json!({"error": {"code": "model_error", "message": why}})
                )
            }
            None => {
                self.finished = true;
                return Poll::Ready(None);
            }
        };
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(text)))))
    }
}
