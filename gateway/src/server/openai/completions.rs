//! `POST /v1/completions`, the legacy text completion: a prompt (or a
//! list of prompts) continued as is, no chat template; `n` answers per
//! prompt, whole or streamed, with OpenAI's legacy log-probabilities.

use gigafactory_runtime::llm::{self, TokenLogprob};
use serde_json::{Map, Value, json};

use super::chat::finish_reason;
use super::fields::{Fields, Sampling, invalid, kind_of};
use super::{Admit, Answer, Head, Reader, Step, logprob_value};
use crate::server::routes::{Request, json};
use crate::server::{ApiError, Gateway, Response};

/// The largest completion request body.
const MAX_BODY: usize = 1 << 20;
/// `max_tokens` when the request gives none (OpenAI's for this endpoint).
const DEFAULT_MAX_TOKENS: u32 = 16;
/// The most prompts one request may list.
const MAX_PROMPTS: usize = 16;
/// The most alternatives legacy `logprobs` may ask for.
const MAX_LOGPROBS: i64 = 5;

struct Completion {
    model: String,
    prompts: Vec<String>,
    sampling: Sampling,
    max_tokens: u32,
    echo: bool,
    logprobs: Option<u32>,
}

impl Completion {
    fn read(body: &[u8]) -> Result<Self, ApiError> {
        let mut fields = Fields::of_body(body, "completion")?;
        let model = fields.required_string("model")?;
        let tokens_refused = || {
            invalid(
                "prompt",
                "token ids are not supported; send text (the model's vocabulary is applied here)",
            )
        };
        let prompts = match fields.take("prompt") {
            None => return Err(invalid("prompt", "this field is required")),
            Some(Value::String(prompt)) => vec![prompt],
            Some(Value::Array(items)) if items.is_empty() => {
                return Err(invalid("prompt", "send at least one prompt"));
            }
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(prompt) => Ok(prompt),
                    Value::Number(_) | Value::Array(_) => Err(tokens_refused()),
                    other => Err(invalid(
                        "prompt",
                        format!("expected strings, found {}", kind_of(&other)),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(invalid(
                    "prompt",
                    format!(
                        "expected a string or a list of strings, not {}",
                        kind_of(&other)
                    ),
                ));
            }
        };
        if prompts.len() > MAX_PROMPTS {
            return Err(invalid("prompt", format!("at most {MAX_PROMPTS} prompts")));
        }
        if fields.string("suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(invalid("suffix", "not supported"));
        }
        let max_tokens = fields
            .integer("max_tokens", 1..=i64::from(u32::MAX))?
            .map_or(DEFAULT_MAX_TOKENS, |tokens| tokens as u32);
        let echo = fields.boolean("echo")?.unwrap_or(false);
        let logprobs = fields
            .integer("logprobs", 0..=MAX_LOGPROBS)?
            .map(|top| top as u32);
        if echo && logprobs.is_some() {
            return Err(invalid(
                "echo",
                "echo with logprobs is not supported (the prompt's tokens are not scored)",
            ));
        }
        let best_of = fields.integer("best_of", 1..=super::fields::MAX_CHOICES)?;
        let sampling = Sampling::read(&mut fields)?;
        if best_of.is_some_and(|best| best != i64::from(sampling.n)) {
            return Err(invalid(
                "best_of",
                "only best_of equal to n is supported (every answer is returned)",
            ));
        }
        Ok(Self {
            model,
            prompts,
            sampling,
            max_tokens,
            echo,
            logprobs,
        })
    }
}

impl Gateway {
    pub(in crate::server) async fn completions(
        &self,
        request: Request,
    ) -> Result<Response, ApiError> {
        let (tenant, body, admitted) = match self.openai_admit(request, MAX_BODY).await? {
            Admit::Here(tenant, body, admitted) => (tenant, body, admitted),
            Admit::Elsewhere(response) => return Ok(response),
        };
        let asked = Completion::read(&body)?;
        let quota = self.tenant_record(&tenant).await?.quota;
        self.admission.may_generate(&tenant, &quota)?;
        let model = self
            .text_model(&tenant, &quota, &admitted, &asked.model)
            .await?;
        let sampling = &asked.sampling;
        let mut answers = Vec::new();
        for prompt in &asked.prompts {
            let generate = llm::Request {
                prompt: llm::Prompt::Text(prompt.clone()),
                max_tokens: asked.max_tokens,
                logprobs: asked.logprobs,
                ..sampling.request()
            };
            answers.extend(
                self.start_answers(&model, &asked.model, generate, sampling)
                    .await?,
            );
        }
        let n = sampling.n as usize;
        let echoes: Vec<String> = if asked.echo {
            (0..answers.len())
                .map(|index| asked.prompts[index / n].clone())
                .collect()
        } else {
            vec![String::new(); answers.len()]
        };
        let head = Head::new("cmpl", asked.model);
        if sampling.stream {
            let reader = TextReader {
                head,
                n,
                logprobs: asked.logprobs.is_some(),
                echoes,
                offsets: Vec::new(),
            };
            return Ok(self.stream(answers, reader, sampling.include_usage, admitted.permit));
        }
        let _permit = admitted.permit;
        let answers = self.collect(answers, &head.model).await?;
        let mut usage = super::Usage::default();
        let choices: Vec<Value> = answers
            .into_iter()
            .zip(echoes)
            .enumerate()
            .map(|(index, (answer, echo))| {
                usage.add(&answer.usage, index.is_multiple_of(n));
                whole_choice(index, answer, echo, asked.logprobs.is_some())
            })
            .collect();
        Ok(json(
            hyper::StatusCode::OK,
            json!({
                "id": head.id,
                "object": "text_completion",
                "created": head.created,
                "model": head.model,
                "choices": choices,
                "usage": usage.to_json(),
            }),
        ))
    }
}

fn whole_choice(index: usize, answer: Answer, echo: String, logprobs: bool) -> Value {
    let logprobs = logprobs.then(|| legacy_logprobs(&answer.tokens, echo.chars().count()));
    json!({
        "text": echo + &answer.text,
        "index": index,
        "logprobs": logprobs,
        "finish_reason": finish_reason(answer.usage.finish_reason),
    })
}

/// Legacy `logprobs`: parallel lists of tokens, their log-probabilities,
/// the alternatives, and where each token starts in the text (from
/// `offset` characters on).
fn legacy_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let mut offsets = Vec::new();
    for token in tokens {
        offsets.push(offset);
        offset += token.chosen.text.chars().count();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.chosen.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| logprob_value(t.chosen.logprob)).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            let top: Map<String, Value> = t.top.iter()
                .map(|c| (c.text.clone(), json!(logprob_value(c.logprob))))
                .collect();
            Value::Object(top)
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// Words a streamed completion as `text_completion` chunks.
struct TextReader {
    head: Head,
    n: usize,
    logprobs: bool,
    /// Each answer's echoed prompt, sent first.
    echoes: Vec<String>,
    /// Per answer: characters sent so far.
    offsets: Vec<usize>,
}

impl TextReader {
    fn chunk(&self, index: usize, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.head.id,
            "object": "text_completion",
            "created": self.head.created,
            "model": self.head.model,
            "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}],
        })
    }
}

impl Reader for TextReader {
    fn start(&mut self, index: usize) -> Vec<Value> {
        if self.offsets.len() <= index {
            self.offsets.resize(index + 1, 0);
        }
        let echo = std::mem::take(&mut self.echoes[index]);
        self.offsets[index] = echo.chars().count();
        if echo.is_empty() {
            return vec![];
        }
        vec![self.chunk(index, &echo, Value::Null, None)]
    }

    fn step(&mut self, index: usize, step: Step) -> Vec<Value> {
        match step {
            Step::Token(token) if self.logprobs => {
                // Each token is its own chunk: its text and its scores.
                let logprobs = legacy_logprobs(std::slice::from_ref(&token), self.offsets[index]);
                vec![self.chunk(index, "", logprobs, None)]
            }
            Step::Token(_) => vec![],
            Step::Text(text) => {
                self.offsets[index] += text.chars().count();
                vec![self.chunk(index, &text, Value::Null, None)]
            }
            Step::Done(usage) => vec![self.chunk(
                index,
                "",
                Value::Null,
                Some(finish_reason(usage.finish_reason)),
            )],
        }
    }

    fn usage(&self, usage: Value) -> Value {
        json!({
            "id": self.head.id,
            "object": "text_completion",
            "created": self.head.created,
            "model": self.head.model,
            "choices": [],
            "usage": usage,
        })
    }

    fn counts_prompt(&self, index: usize) -> bool {
        index.is_multiple_of(self.n)
    }
}
