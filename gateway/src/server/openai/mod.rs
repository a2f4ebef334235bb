//! OpenAI-compatible endpoints for tenants who just want a model, no
//! function, at `/v1` (the base URL clients of other servers use) and
//! `/openai/v1`: chat completions (`chat.rs`: tools, structured output,
//! log-probabilities, `n` answers, whole or streamed as server-sent
//! events), legacy completions (`completions.rs`), embeddings
//! (`embeddings.rs`) and the model list. The tenant's API key is the
//! bearer token; the tenant's quotas (rate, concurrency, compute,
//! generated tokens) and model permissions apply as they do to its
//! functions. Requests are read field by field (`fields.rs`), so a
//! refusal names the field at fault in OpenAI's error shape.

mod chat;
mod completions;
mod embeddings;
mod fields;
mod tools;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::IntoResponse as _;
use axum::response::sse::{Event as SseEvent, Sse};
use bytes::Bytes;
use futures_util::StreamExt;
use gigafactory_runtime::llm::{self, Answer, Event, Generation, TextModel, TokenLogprob};
use gigafactory_runtime::{AiError, AiService};
use hyper::HeaderMap;
use hyper::StatusCode;
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;

use super::admission::Admitted;
use super::cluster::Outgoing;
use super::routes::{Request, json};
use super::{ApiError, Gateway, Response};
use crate::quota::Quota;

/// Tokens the frequency and presence penalties look back over.
const OPENAI_PENALTY_WINDOW: u32 = 4096;

impl Gateway {
    /// The models the tenant may use, in OpenAI's list shape.
    pub(super) async fn openai_models(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(headers).await?;
        let data = self.openai_entries(Some(&tenant)).await?;
        Ok(json(
            StatusCode::OK,
            json!({ "object": "list", "data": data }),
        ))
    }

    /// One model the tenant may use, in OpenAI's shape (`models.retrieve`).
    pub(super) async fn openai_model(
        &self,
        headers: &HeaderMap,
        id: &str,
    ) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(headers).await?;
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
}

/// Where a request is answered.
pub(super) enum Admit {
    /// Here: the tenant, the body, and what admission gave it.
    Here(String, Bytes, Admitted),
    /// On the node that holds the model: its response.
    Elsewhere(Response),
}

impl Gateway {
    /// Authenticates, reads the body (at most `limit` bytes), admits the
    /// tenant's request, and sends it on to the node holding its model
    /// when this one does not.
    async fn openai_admit(&self, request: Request, limit: usize) -> Result<Admit, ApiError> {
        let tenant = self.require_tenant(request.headers()).await?;
        let (forwarded, outgoing) = (self.peers.forwarded(&request)?, Outgoing::of(&request));
        if !forwarded {
            crate::server::access::bill(&tenant);
        }
        let body = self.read_body(request, limit).await?;
        let model = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["model"].as_str().map(String::from));
        let quota = self.tenant_record(&tenant).await?.quota;
        let admitted = self.admission.admit(&tenant, &quota)?;
        if let Some(model) = model
            && !forwarded
            && self.elsewhere(&tenant, &model)
        {
            let (models, held) = ([model], admitted.permit);
            let response = self.send_to_holder(outgoing, body, &models, held).await?;
            return Ok(Admit::Elsewhere(response));
        }
        Ok(Admit::Here(tenant, body, admitted))
    }

    /// The text model `name` as `tenant` may call it, loaded, and the
    /// tenant's way to it (paid from `admitted`'s budget).
    async fn text_model(
        &self,
        tenant: &str,
        quota: &Quota,
        admitted: &Admitted,
        name: &str,
    ) -> Result<(AiService, Arc<TextModel>), ApiError> {
        let ai = self.ai(tenant, quota, admitted.budget.clone());
        let model = ai.text_model(name).await.map_err(openai_error(name))?;
        Ok((ai, model))
    }

    /// Starts the `n` answers of one request, each with its own seed.
    async fn start_answers(
        &self,
        (ai, model): &(AiService, Arc<TextModel>),
        name: &str,
        request: llm::Request,
        sampling: &fields::Sampling,
    ) -> Result<Vec<Generation>, ApiError> {
        let mut answers = Vec::new();
        for index in 0..sampling.n {
            let request = llm::Request {
                seed: sampling.seed_of(index),
                ..request.clone()
            };
            let generation = ai.start(model, request).await.map_err(openai_error(name))?;
            answers.push(generation);
        }
        Ok(answers)
    }

    /// Waits for every answer to the request for `name`, within the
    /// generation deadline.
    async fn collect(&self, answers: Vec<Generation>, name: &str) -> Result<Vec<Answer>, ApiError> {
        let limit = self.config.generation_timeout;
        let all = futures_util::future::try_join_all(
            answers
                .into_iter()
                .map(|answer| async { answer.collect().await.map_err(openai_error(name)) }),
        );
        tokio::time::timeout(limit, all)
            .await
            .unwrap_or_else(|_| Err(generation_deadline(limit)))
    }

    /// Streams the answers as server-sent events, as `reader` words them:
    /// each answer's opening, its steps as they come (answers
    /// interleaved), the usage when asked, then `[DONE]`. The deadline
    /// and a failed answer end the stream with an error event; a client
    /// that leaves cancels every answer.
    fn stream(
        &self,
        answers: Vec<Generation>,
        mut reader: impl Reader,
        include_usage: bool,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Response {
        let (sender, receiver) = tokio::sync::mpsc::channel::<SseEvent>(32);
        let deadline = tokio::time::Instant::now() + self.config.generation_timeout;
        let limit = self.config.generation_timeout;
        let grace_over = self.drain.grace_over();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(grace_over);
            let send = |chunk: Value| sender.send(SseEvent::default().data(chunk.to_string()));
            let count = answers.len();
            let mut events = futures_util::stream::select_all(answers.into_iter().enumerate().map(
                |(index, generation)| {
                    futures_util::stream::unfold(generation, move |mut generation| async move {
                        let event = generation.next().await?;
                        Some(((index, event), generation))
                    })
                    .boxed()
                },
            ));
            for index in 0..count {
                for chunk in reader.start(index) {
                    if send(chunk).await.is_err() {
                        return;
                    }
                }
            }
            let mut usage = Usage::default();
            let mut open = count;
            while open > 0 {
                let next = tokio::select! {
                    next = tokio::time::timeout_at(deadline, events.next()) => next,
                    () = &mut grace_over => {
                        let why = "the server is shutting down: the answer was cut at the end of its drain grace period; retry";
                        let _ = send(stream_error("shutting_down", why)).await;
                        return;
                    }
                };
                let chunks = match next {
                    Err(_) => {
                        let error = generation_deadline(limit);
                        let _ = send(stream_error(error.code(), error.message())).await;
                        return;
                    }
                    Ok(None) => {
                        let _ = send(stream_error("model_unavailable", "the model stopped")).await;
                        return;
                    }
                    Ok(Some((_, Event::Failed(why)))) => {
                        let _ = send(stream_error("model_error", &why)).await;
                        return;
                    }
                    Ok(Some((index, Event::Token(token)))) => {
                        reader.step(index, Step::Token(token))
                    }
                    Ok(Some((index, Event::Text(text)))) => reader.step(index, Step::Text(text)),
                    Ok(Some((index, Event::Done(done)))) => {
                        open -= 1;
                        usage.add(&done, reader.counts_prompt(index));
                        reader.step(index, Step::Done(done))
                    }
                };
                for chunk in chunks {
                    if send(chunk).await.is_err() {
                        return;
                    }
                }
            }
            if include_usage && send(reader.usage(usage.to_json())).await.is_err() {
                return;
            }
            let _ = sender.send(SseEvent::default().data("[DONE]")).await;
        });
        let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
            let event = receiver.recv().await?;
            Some((Ok::<_, Infallible>(event), receiver))
        });
        Sse::new(events).into_response()
    }
}

/// An error event ending a stream (its status was sent with the first byte).
fn stream_error(code: &str, message: &str) -> Value {
    json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}})
}

/// What happened next in one answer of a stream.
pub(super) enum Step {
    Token(TokenLogprob),
    Text(String),
    Done(llm::Usage),
}

/// Words a stream's answers as one front-end's chunks.
pub(super) trait Reader: Send + 'static {
    /// Chunks opening answer `index`.
    fn start(&mut self, index: usize) -> Vec<Value>;
    /// Chunks for a step of answer `index`.
    fn step(&mut self, index: usize, step: Step) -> Vec<Value>;
    /// The chunk that carries the usage of the whole request.
    fn usage(&self, usage: Value) -> Value;
    /// Whether answer `index`'s prompt counts in the usage (each prompt
    /// counts once, however many answers it has).
    fn counts_prompt(&self, index: usize) -> bool {
        index == 0
    }
}

/// Token counts of a request's answers.
#[derive(Debug, Default)]
pub(super) struct Usage {
    prompt: u32,
    /// Prompt tokens whose KV cache was reused.
    cached: u32,
    completion: u32,
}

impl Usage {
    /// Adds an answer's tokens (and its prompt's, when it counts).
    pub(super) fn add(&mut self, usage: &llm::Usage, prompt: bool) {
        if prompt {
            self.prompt += usage.prompt_tokens;
            self.cached += usage.cached_tokens;
        }
        self.completion += usage.completion_tokens;
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

/// A log-probability as OpenAI writes it (-9999 for a token the model
/// ruled out).
fn logprob_value(logprob: f32) -> f64 {
    f64::from(logprob.max(-9999.0))
}

/// A token's `logprobs.content` entry.
pub(super) fn logprob_entry(token: &TokenLogprob) -> Value {
    let entry = |c: &llm::Candidate| json!({"token": c.text, "logprob": logprob_value(c.logprob), "bytes": c.bytes});
    let mut chosen = entry(&token.chosen);
    chosen["top_logprobs"] = json!(token.top.iter().map(entry).collect::<Vec<_>>());
    chosen
}

impl fields::Sampling {
    /// The generation request these settings make (prompt and length
    /// aside; the seed is set per answer).
    pub(super) fn request(&self) -> llm::Request {
        llm::Request {
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop.clone(),
            // OpenAI's penalties count the whole answer so far.
            repeat_last_n: OPENAI_PENALTY_WINDOW,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: self.logit_bias.clone(),
            ..llm::Request::default()
        }
    }
}

/// What every response and chunk of one completion repeats.
#[derive(Debug, Clone)]
pub(super) struct Head {
    pub id: String,
    pub model: String,
    pub created: u64,
}

impl Head {
    /// A fresh id with `prefix` (`chatcmpl`, `cmpl`).
    pub(super) fn new(prefix: &str, model: String) -> Self {
        Self {
            id: format!("{prefix}-{}", completion_id()),
            model,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

pub(super) fn model_not_found(model: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!("the model {model:?} does not exist or you do not have access to it"),
    )
    .param("model")
}

/// How the OpenAI API words a refusal of a call on `model`.
pub(super) fn openai_error(model: &str) -> impl Fn(AiError) -> ApiError + '_ {
    move |error| match error {
        AiError::NotFound(_) => model_not_found(model),
        AiError::Denied(why) => ApiError::new(StatusCode::FORBIDDEN, "model_denied", why),
        AiError::Invalid(why) | AiError::Encoding(why) => {
            ApiError::bad_request("invalid_request", why)
        }
        AiError::Unsupported(why) => ApiError::bad_request("invalid_request", why).param("model"),
        AiError::TooLarge(why) => ApiError::bad_request("context_length_exceeded", why),
        AiError::Busy(why) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "model_busy", why).retry_after(1)
        }
        AiError::Quota(why) => ApiError::too_many_requests(why, 1),
        AiError::Timeout(why) => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded", why)
        }
        AiError::Unavailable(why) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "model_unavailable", why)
        }
        AiError::Failed(why) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "model_error", why)
        }
    }
}

pub(super) fn completion_id() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    hex::encode(bytes)
}

/// 504 for a completion past the generation deadline.
fn generation_deadline(limit: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "deadline_exceeded",
        format!("the completion did not finish within {} s", limit.as_secs()),
    )
}
