//! `POST /v1/chat/completions`: messages in, one or `n` answers out,
//! whole or streamed, with tools, structured output and log-probabilities.

use gigafactory_runtime::llm::{self, Constraint, FinishReason, TokenLogprob};
use serde_json::{Value, json};

use super::fields::{Fields, Sampling, invalid, kind_of};
use super::tools::{self, Calls, Piece, Tools};
use super::{Answer, Head, Step, logprob_entry};
use crate::server::routes::Request;
use crate::server::{ApiError, Gateway, Response};

/// The largest chat request body.
const MAX_BODY: usize = 1 << 20;

/// The roles a chat message may have (`developer` is OpenAI's newer
/// name for `system`).
const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// A chat request, read and checked.
pub(super) struct Chat {
    model: String,
    messages: Vec<(String, String)>,
    sampling: Sampling,
    max_tokens: Option<u32>,
    /// Alternatives per token, when log-probabilities are asked for.
    logprobs: Option<u32>,
    tools: Option<Tools>,
    format: Option<Value>,
}

impl Chat {
    pub(super) fn read(body: &[u8]) -> Result<Self, ApiError> {
        let mut fields = Fields::of_body(body, "chat completion")?;
        let model = fields.required_string("model")?;
        let messages = match fields.take("messages") {
            None => return Err(invalid("messages", "this field is required")),
            Some(Value::Array(messages)) if messages.is_empty() => {
                return Err(invalid("messages", "send at least one message"));
            }
            Some(Value::Array(messages)) => messages,
            Some(other) => {
                return Err(invalid(
                    "messages",
                    format!("expected a list of messages, not {}", kind_of(&other)),
                ));
            }
        };
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(index, message)| message_of(index, message))
            .collect::<Result<Vec<_>, _>>()?;
        let max_tokens = match fields.integer("max_completion_tokens", 1..=i64::from(u32::MAX))? {
            Some(tokens) => Some(tokens),
            None => fields.integer("max_tokens", 1..=i64::from(u32::MAX))?,
        };
        let wants_logprobs = fields.boolean("logprobs")?.unwrap_or(false);
        let top = fields.integer("top_logprobs", 0..=i64::from(llm::MAX_TOP_LOGPROBS))?;
        if top.is_some() && !wants_logprobs {
            return Err(invalid(
                "top_logprobs",
                "only allowed when logprobs is true",
            ));
        }
        let tools = Tools::read(&mut fields)?;
        let format = tools::response_format(&mut fields)?;
        if tools.is_some() && format.is_some() {
            return Err(invalid(
                "response_format",
                "a JSON answer cannot be asked for together with tool calls; set tool_choice to \"none\" or drop response_format",
            ));
        }
        Ok(Self {
            model,
            messages,
            sampling: Sampling::read(&mut fields)?,
            max_tokens: max_tokens.map(|tokens| tokens as u32),
            logprobs: wants_logprobs.then_some(top.unwrap_or(0) as u32),
            tools,
            format,
        })
    }
}

/// `messages[index]` as the template takes it: its role and its text.
/// Calls an assistant made and tools' results are written as the model
/// is told to write and read them ([`tools`]).
fn message_of(index: usize, message: Value) -> Result<(String, String), ApiError> {
    let at = format!("messages[{index}]");
    let mut message = Fields::of(message, &at)?;
    let role = message.required_string("role")?;
    let role = match role.as_str() {
        "developer" => "system".to_string(),
        role if ROLES.contains(&role) => role.to_string(),
        role => {
            return Err(invalid(
                &message.path("role"),
                format!("{role:?} is not one of {}", ROLES.join(", ")),
            ));
        }
    };
    let calls = match message.take("tool_calls") {
        None => None,
        Some(Value::Array(calls)) if role == "assistant" => Some(calls),
        Some(_) if role != "assistant" => {
            return Err(invalid(
                &message.path("tool_calls"),
                "only an assistant's message may have tool calls",
            ));
        }
        Some(other) => {
            return Err(invalid(
                &message.path("tool_calls"),
                format!("expected a list of calls, not {}", kind_of(&other)),
            ));
        }
    };
    let content = message.take("content");
    let text = match content {
        Some(Value::String(text)) => text,
        None if role == "assistant" => String::new(),
        None => {
            return Err(invalid(
                &message.path("content"),
                "this field is required (only an assistant's may be null)",
            ));
        }
        Some(Value::Array(parts)) => parts
            .into_iter()
            .enumerate()
            .map(|(at, part)| {
                let path = message.path(&format!("content[{at}]"));
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => Ok(text.to_string()),
                    (Some(kind), _) if kind != "text" => Err(invalid(
                        &path,
                        format!("a part of type {kind:?}: only text parts are supported"),
                    )),
                    _ => Err(invalid(
                        &path,
                        "not a text part ({\"type\": \"text\", \"text\": \"…\"})",
                    )),
                }
            })
            .collect::<Result<String, ApiError>>()?,
        Some(other) => {
            return Err(invalid(
                &message.path("content"),
                format!(
                    "expected a string, an array of text parts or null, not {}",
                    kind_of(&other)
                ),
            ));
        }
    };
    if role == "tool" {
        if !message.has("tool_call_id") {
            return Err(invalid(
                &message.path("tool_call_id"),
                "a tool's message must say which call it answers",
            ));
        }
        return Ok(("user".into(), tools::written_result(&text)));
    }
    let text = match calls {
        Some(calls) if !calls.is_empty() => {
            let written = tools::written_calls(&calls, &message.path("tool_calls"))?;
            if text.is_empty() {
                written
            } else {
                format!("{text}\n{written}")
            }
        }
        _ => text,
    };
    Ok((role, text))
}

impl Gateway {
    pub(in crate::server) async fn chat_completions(
        &self,
        request: Request,
    ) -> Result<Response, ApiError> {
        let (tenant, body, admitted) = match self.openai_admit(request, MAX_BODY).await? {
            super::Admit::Here(tenant, body, admitted) => (tenant, body, admitted),
            super::Admit::Elsewhere(response) => return Ok(response),
        };
        let chat = Chat::read(&body)?;
        let quota = self.tenant_record(&tenant).await?.quota;
        self.admission.may_generate(&tenant, &quota)?;
        let model = self
            .text_model(&tenant, &quota, &admitted, &chat.model)
            .await?;
        let mut messages = chat.messages;
        let mut constraint = chat.format.map(Constraint::JsonSchema);
        if let Some(tools) = &chat.tools {
            let instructions = tools.instructions();
            match messages.first_mut() {
                Some((role, text)) if role == "system" => {
                    *text = format!("{text}\n\n{instructions}");
                }
                _ => messages.insert(0, ("system".into(), instructions)),
            }
            constraint = Some(Constraint::Lark(tools.grammar()));
        }
        let sampling = chat.sampling;
        let generate = llm::Request {
            prompt: llm::Prompt::Chat(messages),
            max_tokens: chat
                .max_tokens
                .unwrap_or(model.1.config().default_max_tokens),
            fit_context: chat.max_tokens.is_none(),
            constraint,
            logprobs: chat.logprobs,
            ..sampling.request()
        };
        let answers = self
            .start_answers(&model, &chat.model, generate, &sampling)
            .await?;
        let head = Head::new("chatcmpl", chat.model);
        let reader = ChatReader {
            head: head.clone(),
            tools: chat.tools.is_some(),
            logprobs: chat.logprobs.is_some(),
            choices: Vec::new(),
        };
        if sampling.stream {
            return Ok(self.stream(answers, reader, sampling.include_usage, admitted.permit));
        }
        let _permit = admitted.permit;
        let answers = self.collect(answers, &head.model).await?;
        let mut usage = super::Usage::default();
        let choices: Vec<Value> = answers
            .into_iter()
            .enumerate()
            .map(|(index, answer)| {
                usage.add(&answer.usage, index == 0);
                whole_choice(index, answer, chat.tools.is_some(), chat.logprobs.is_some())
            })
            .collect();
        Ok(crate::server::routes::json(
            hyper::StatusCode::OK,
            json!({
                "id": head.id,
                "object": "chat.completion",
                "created": head.created,
                "model": head.model,
                "choices": choices,
                "usage": usage.to_json(),
            }),
        ))
    }
}

/// One whole answer as a choice.
fn whole_choice(index: usize, answer: Answer, tools: bool, logprobs: bool) -> Value {
    let mut content = String::new();
    let mut calls = Vec::new();
    if tools {
        let mut reader = Calls::default();
        let mut pieces = reader.push(&answer.text);
        pieces.extend(reader.finish());
        for piece in pieces {
            match piece {
                Piece::Text(text) => content.push_str(&text),
                Piece::Call(call) => calls.push(call.to_json()),
            }
        }
    } else {
        content = answer.text;
    }
    let mut message = json!({
        "role": "assistant",
        "content": if content.is_empty() && !calls.is_empty() { Value::Null } else { json!(content) },
    });
    let finish = if calls.is_empty() {
        finish_reason(answer.usage.finish_reason)
    } else {
        message["tool_calls"] = json!(calls);
        "tool_calls"
    };
    json!({
        "index": index,
        "message": message,
        "logprobs": if logprobs { chat_logprobs(&answer.tokens) } else { Value::Null },
        "finish_reason": finish,
    })
}

pub(super) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// `logprobs` of a choice or chunk: `{"content": [...], "refusal": null}`.
fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    json!({
        "content": tokens.iter().map(logprob_entry).collect::<Vec<_>>(),
        "refusal": Value::Null,
    })
}

/// Turns a streamed answer's steps into `chat.completion.chunk`s.
struct ChatReader {
    head: Head,
    tools: bool,
    logprobs: bool,
    choices: Vec<ChoiceState>,
}

#[derive(Default)]
struct ChoiceState {
    /// Log-probabilities of tokens whose text is not sent yet.
    tokens: Vec<TokenLogprob>,
    calls: Calls,
    /// Calls sent so far.
    sent_calls: usize,
}

impl ChatReader {
    fn chunk(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.head.id,
            "object": "chat.completion.chunk",
            "created": self.head.created,
            "model": self.head.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        })
    }

    fn state(&mut self, index: usize) -> &mut ChoiceState {
        if self.choices.len() <= index {
            self.choices.resize_with(index + 1, ChoiceState::default);
        }
        &mut self.choices[index]
    }

    /// Chunks for pieces of choice `index`'s answer.
    fn pieces(&mut self, index: usize, pieces: Vec<Piece>) -> Vec<Value> {
        let mut chunks = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Text(text) => {
                    let logprobs = if self.logprobs {
                        chat_logprobs(&std::mem::take(&mut self.state(index).tokens))
                    } else {
                        Value::Null
                    };
                    chunks.push(self.chunk(index, json!({"content": text}), logprobs, None));
                }
                Piece::Call(call) => {
                    let state = self.state(index);
                    let at = state.sent_calls;
                    state.sent_calls += 1;
                    let mut entry = call.to_json();
                    // As OpenAI streams a call: its id, type and name
                    // first, then its arguments.
                    let arguments = entry["function"]["arguments"].take();
                    entry["function"]["arguments"] = json!("");
                    entry["index"] = json!(at);
                    chunks.push(self.chunk(
                        index,
                        json!({"tool_calls": [entry]}),
                        Value::Null,
                        None,
                    ));
                    chunks.push(self.chunk(
                        index,
                        json!({"tool_calls": [{"index": at, "function": {"arguments": arguments}}]}),
                        Value::Null,
                        None,
                    ));
                }
            }
        }
        chunks
    }
}

impl super::Reader for ChatReader {
    fn start(&mut self, index: usize) -> Vec<Value> {
        self.state(index);
        vec![self.chunk(
            index,
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            None,
        )]
    }

    fn step(&mut self, index: usize, step: Step) -> Vec<Value> {
        match step {
            Step::Token(token) => {
                self.state(index).tokens.push(token);
                vec![]
            }
            Step::Text(text) => {
                let pieces = if self.tools {
                    self.state(index).calls.push(&text)
                } else {
                    vec![Piece::Text(text)]
                };
                self.pieces(index, pieces)
            }
            Step::Done(usage) => {
                let rest = self.state(index).calls.finish();
                let mut chunks = self.pieces(index, rest);
                let finish = if self.state(index).sent_calls > 0 {
                    "tool_calls"
                } else {
                    finish_reason(usage.finish_reason)
                };
                chunks.push(self.chunk(index, json!({}), Value::Null, Some(finish)));
                chunks
            }
        }
    }

    fn usage(&self, usage: Value) -> Value {
        json!({
            "id": self.head.id,
            "object": "chat.completion.chunk",
            "created": self.head.created,
            "model": self.head.model,
            "choices": [],
            "usage": usage,
        })
    }
}
