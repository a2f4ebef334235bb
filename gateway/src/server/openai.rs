//! OpenAI-compatible endpoints for tenants who just want a model, no
//! function: `POST /openai/v1/chat/completions` (whole or streamed as
//! server-sent events), `POST /openai/v1/embeddings` and
//! `GET /openai/v1/models`. The tenant's API key is the bearer token; the
//! tenant's quotas (rate, concurrency, compute, generated tokens) and model
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

use super::cluster::Outgoing;
use super::routes::{Request, json};
use super::{ApiError, BoxError, Gateway, Response};

/// The largest chat request body.
const MAX_BODY: usize = 1 << 20;
/// The largest embeddings request body (2048 texts of a few hundred words).
const MAX_EMBEDDINGS_BODY: usize = 8 << 20;
/// Tokens the frequency and presence penalties look back over.
const OPENAI_PENALTY_WINDOW: u32 = 4096;
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
    frequency_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
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
    /// A string, an array of parts (only text is supported), or null (an
    /// assistant turn that called tools); read by [`message_of`].
    #[serde(default)]
    content: Value,
}

/// The roles a chat message may have (`developer` is OpenAI's newer
/// name for `system`).
const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

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
            (["v1", "models"], &Method::GET) => self.openai_models(&request).await,
            (["v1", "models", id], &Method::GET) => self.openai_model(&request, id).await,
            (["v1", "chat", "completions"], &Method::POST) => self.chat_completions(request).await,
            (["v1", "embeddings"], &Method::POST) => self.embeddings(request).await,
            (
                ["v1", "models"]
                | ["v1", "models", _]
                | ["v1", "chat", "completions"]
                | ["v1", "embeddings"],
                _,
            ) => Err(ApiError::new(
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
    async fn openai_models(&self, request: &Request) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(request).await?;
        let data = self.openai_entries(Some(&tenant)).await?;
        Ok(json(
            StatusCode::OK,
            json!({ "object": "list", "data": data }),
        ))
    }

    /// One model the tenant may use, in OpenAI's shape (`models.retrieve`).
    async fn openai_model(&self, request: &Request, id: &str) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(request).await?;
        let data = self.openai_entries(Some(&tenant)).await?;
        data.into_iter()
            .find(|entry| entry["id"] == id)
            .map(|entry| json(StatusCode::OK, entry))
            .ok_or_else(|| model_not_found(id))
    }

    /// OpenAI's model entries: those `tenant` may use (its private models
    /// owned by `you`, shadowing the operator's of the same name), or
    /// every model for the operator (`None`).
    pub(super) async fn openai_entries(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<Value>, ApiError> {
        let visible = match tenant {
            Some(tenant) => Some(self.visible_models(&self.tenant_record(tenant).await?.quota)),
            None => None,
        };
        let may_see = |name: &str| visible.as_ref().is_none_or(|v| v.contains(name));
        let mut names: Vec<(String, String)> = Vec::new();
        for model in self.runtime.models().list() {
            match (&model.owner, tenant) {
                (Some(owner), Some(tenant)) if owner == tenant => {
                    names.push((model.name, "you".into()));
                }
                (Some(_), Some(_)) => {}
                (Some(owner), None) => names.push((model.key(), owner.clone())),
                (None, _) if may_see(&model.name) => names.push((model.name, "gigafactory".into())),
                (None, _) => {}
            }
        }
        let elsewhere = self.peers.models();
        names.extend(
            elsewhere
                .keys()
                .filter(|name| may_see(name))
                .map(|name| (name.clone(), "gigafactory".into())),
        );
        names.sort_by(|a, b| a.0.cmp(&b.0).then((a.1 != "you").cmp(&(b.1 != "you"))));
        names.dedup_by(|a, b| a.0 == b.0);
        Ok(names
            .into_iter()
            .map(|(name, owner)| {
                json!({
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": owner,
                })
            })
            .collect())
    }

    async fn chat_completions(&self, request: Request) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(&request).await?;
        let (forwarded, outgoing) = (self.peers.forwarded(&request)?, Outgoing::of(&request));
        let body = self.read_body(request, MAX_BODY).await?;
        let chat: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_request",
                format!("not a chat completion request: {e}"),
            )
        })?;
        let quota = self.tenant_record(&tenant).await?.quota;
        let admitted = self.admission.admit(&tenant, &quota)?;
        if !forwarded && self.elsewhere(&tenant, &chat.model) {
            let (models, held) = ([chat.model], admitted.permit);
            return self.send_to_holder(outgoing, body, &models, held).await;
        }
        self.admission.may_generate(&tenant, &quota)?;
        if chat.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request(
                "invalid_request",
                "n: only one choice per request is supported",
            ));
        }
        let key = self
            .model_key(&tenant, &quota, &chat.model)
            .ok_or_else(|| model_not_found(&chat.model))?;
        let model = self
            .runtime
            .models()
            .text(&key)
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
        if chat.messages.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_request",
                "messages: send at least one message",
            ));
        }
        let messages = chat
            .messages
            .into_iter()
            .enumerate()
            .map(|(index, m)| message_of(index, m))
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
            repeat_penalty: 1.0,
            // OpenAI's penalties count the whole answer so far.
            repeat_last_n: OPENAI_PENALTY_WINDOW,
            frequency_penalty: chat.frequency_penalty.unwrap_or(0.0),
            presence_penalty: chat.presence_penalty.unwrap_or(0.0),
            budget: admitted.budget.clone(),
        };
        let deadline = tokio::time::Instant::now() + self.config.generation_timeout;
        let generation = model
            .start(tenant.as_str().into(), generate)
            .await
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
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
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
        tokio::time::timeout_at(deadline, whole(generation, head))
            .await
            .unwrap_or_else(|_| Err(generation_deadline(self.config.generation_timeout)))
    }

    async fn embeddings(&self, request: Request) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(&request).await?;
        let (forwarded, outgoing) = (self.peers.forwarded(&request)?, Outgoing::of(&request));
        let body = self.read_body(request, MAX_EMBEDDINGS_BODY).await?;
        let asked: EmbeddingRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid_request", format!("not an embeddings request: {e}"))
        })?;
        let quota = self.tenant_record(&tenant).await?.quota;
        let admitted = self.admission.admit(&tenant, &quota)?;
        if !forwarded && self.elsewhere(&tenant, &asked.model) {
            let (models, held) = ([asked.model], admitted.permit);
            return self.send_to_holder(outgoing, body, &models, held).await;
        }
        let base64 = match asked.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!("encoding_format {other:?}: use \"float\" or \"base64\""),
                ));
            }
        };
        let texts = texts_of(asked.input)?;
        let key = self
            .model_key(&tenant, &quota, &asked.model)
            .ok_or_else(|| model_not_found(&asked.model))?;
        if let (Some(dimensions), Some(width)) = (asked.dimensions, self.embedding_width(&key))
            && dimensions as usize != width
        {
            return Err(wrong_dimensions(&asked.model, width));
        }
        let timeout = self.config.limits.timeout;
        let embedding = self
            .runtime
            .models()
            .embed(&key, &texts, tenant.as_str().into());
        let Ok((result, spent)) = tokio::time::timeout(timeout, embedding).await else {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                format!(
                    "the embeddings did not finish within {} s",
                    timeout.as_secs_f64()
                ),
            ));
        };
        if let Some(budget) = &admitted.budget {
            budget.charge(spent);
        }
        let embeddings = result.map_err(|e| {
            if e.is_busy() {
                return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "model_busy", e.message)
                    .retry_after(1);
            }
            match e.code {
                ErrorCode::NotFound => model_not_found(&asked.model),
                ErrorCode::UnsupportedOperation | ErrorCode::InvalidArgument => {
                    ApiError::bad_request("invalid_request", e.message)
                }
                _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "model_error", e.message),
            }
        })?;
        let width = embeddings.vectors.first().map_or(0, Vec::len);
        if let Some(dimensions) = asked.dimensions
            && dimensions as usize != width
        {
            return Err(wrong_dimensions(&asked.model, width));
        }
        let data: Vec<Value> = embeddings
            .vectors
            .iter()
            .enumerate()
            .map(|(index, vector)| {
                let embedding = if base64 {
                    json!(base64_of_floats(vector))
                } else {
                    json!(vector)
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        Ok(json(
            StatusCode::OK,
            json!({
                "object": "list",
                "data": data,
                "model": asked.model,
                "usage": {"prompt_tokens": embeddings.tokens, "total_tokens": embeddings.tokens},
            }),
        ))
    }
}

impl Gateway {
    /// The width of a loaded embedding model's vectors, where its graph
    /// says (checked before computing anything).
    fn embedding_width(&self, key: &str) -> Option<usize> {
        let info = self.runtime.models().info(key)?;
        let output = &info.embedding?.output;
        let spec = info.outputs.iter().find(|o| &o.name == output)?;
        *spec.shape.last()?
    }
}

fn wrong_dimensions(model: &str, width: usize) -> ApiError {
    ApiError::bad_request(
        "invalid_request",
        format!("dimensions: {model:?} makes {width}-dimensional vectors only"),
    )
}

#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
    /// Accepted and ignored, as an end-user id is only a hint.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// `input`: a string or a list of strings (token-id arrays are refused:
/// the host tokenises with the model's own vocabulary).
fn texts_of(input: Value) -> Result<Vec<String>, ApiError> {
    let refuse = |why: &str| ApiError::bad_request("invalid_request", format!("input: {why}"));
    match input {
        Value::String(text) => Ok(vec![text]),
        Value::Array(items) if items.is_empty() => Err(refuse("send at least one text")),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => Ok(text),
                Value::Number(_) | Value::Array(_) => Err(refuse(
                    "token ids are not supported; send text (the model's vocabulary is applied here)",
                )),
                _ => Err(refuse("expected a string or a list of strings")),
            })
            .collect(),
        _ => Err(refuse("expected a string or a list of strings")),
    }
}

/// The vector as base64 of its little-endian f32 bytes, as OpenAI's
/// `encoding_format: "base64"` (which the official clients ask for).
fn base64_of_floats(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(ALPHABET[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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

/// A chat message as the template takes it: its role and its text.
fn message_of(index: usize, message: ChatMessage) -> Result<(String, String), ApiError> {
    let invalid =
        |why: String| ApiError::bad_request("invalid_request", format!("messages[{index}]: {why}"));
    let role = match message.role.as_str() {
        "developer" => "system".to_string(),
        role if ROLES.contains(&role) => role.to_string(),
        role => {
            return Err(invalid(format!(
                "role {role:?} is not one of {}",
                ROLES.join(", ")
            )));
        }
    };
    let text = match message.content {
        Value::String(text) => text,
        Value::Null if role == "assistant" => String::new(),
        Value::Null => {
            return Err(invalid(
                "content is missing (only an assistant's may be null)".into(),
            ));
        }
        Value::Array(parts) => parts
            .into_iter()
            .enumerate()
            .map(
                |(at, part)| match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => Ok(text.to_string()),
                    (Some(kind), _) if kind != "text" => Err(invalid(format!(
                        "content[{at}] is of type {kind:?}: only text parts are supported"
                    ))),
                    _ => Err(invalid(format!(
                        "content[{at}] is not a text part ({{\"type\": \"text\", \"text\": \"…\"}})"
                    ))),
                },
            )
            .collect::<Result<String, ApiError>>()?,
        other => {
            return Err(invalid(format!(
                "content must be a string, an array of text parts or null, not {}",
                kind_of(&other)
            )));
        }
    };
    Ok((role, text))
}

/// A JSON value's kind, for error messages.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
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

/// 504 for a completion past the generation deadline.
fn generation_deadline(limit: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "deadline_exceeded",
        format!("the completion did not finish within {} s", limit.as_secs()),
    )
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
    /// Past it the stream ends with an error event (and the generation is
    /// cancelled as the body is dropped).
    deadline: Pin<Box<tokio::time::Sleep>>,
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
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.finished = true;
            let error = json!({"error": {
                "code": "deadline_exceeded",
                "message": "the completion did not finish within the platform's generation deadline",
            }});
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
                "data: {error}\n\n"
            ))))));
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
