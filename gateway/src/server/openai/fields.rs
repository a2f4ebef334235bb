//! Reading an OpenAI request body field by field, so that every refusal
//! names the field at fault (`param`) and says what it expected, in the
//! client's terms rather than a deserialiser's. Unknown fields are
//! ignored, as OpenAI-compatible servers do; `null` reads as absent.

use std::ops::RangeInclusive;

use gigafactory_runtime::llm;
use serde_json::{Map, Value};

use crate::server::ApiError;

/// A 400 about `param`.
pub(super) fn invalid(param: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_request", format!("{param}: {why}")).param(param)
}

/// A JSON value's kind, for error messages.
pub(super) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields of one JSON object (the body, or an object inside it).
pub(super) struct Fields {
    map: Map<String, Value>,
    /// Where the object is (`""` for the body, `"messages[2]"` …).
    at: String,
}

impl Fields {
    /// The request body, which must be a JSON object.
    pub(super) fn of_body(body: &[u8], what: &str) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(
                "invalid_request",
                format!("the body is not valid JSON ({e}); send a {what} request object"),
            )
        })?;
        match value {
            Value::Object(map) => Ok(Self {
                map,
                at: String::new(),
            }),
            other => Err(ApiError::bad_request(
                "invalid_request",
                format!(
                    "the body is {}; send a {what} request object",
                    kind_of(&other)
                ),
            )),
        }
    }

    /// An object `value` found at `at`.
    pub(super) fn of(value: Value, at: &str) -> Result<Self, ApiError> {
        match value {
            Value::Object(map) => Ok(Self {
                map,
                at: at.to_string(),
            }),
            other => Err(invalid(
                at,
                format!("expected an object, not {}", kind_of(&other)),
            )),
        }
    }

    /// The full name of field `name`.
    pub(super) fn path(&self, name: &str) -> String {
        if self.at.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.at)
        }
    }

    /// Takes a field's raw value (`null` is absent).
    pub(super) fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    /// Whether the field is present and not null.
    pub(super) fn has(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|v| !v.is_null())
    }

    pub(super) fn string(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(invalid(
                &self.path(name),
                format!("expected a string, not {}", kind_of(&other)),
            )),
        }
    }

    pub(super) fn required_string(&mut self, name: &str) -> Result<String, ApiError> {
        self.string(name)?
            .ok_or_else(|| invalid(&self.path(name), "this field is required"))
    }

    pub(super) fn boolean(&mut self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(flag)) => Ok(Some(flag)),
            Some(other) => Err(invalid(
                &self.path(name),
                format!("expected true or false, not {}", kind_of(&other)),
            )),
        }
    }

    /// A number within `range`.
    pub(super) fn number(
        &mut self,
        name: &str,
        range: RangeInclusive<f64>,
    ) -> Result<Option<f64>, ApiError> {
        let path = self.path(name);
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(number)) => {
                let value = number.as_f64().unwrap_or(f64::NAN);
                if range.contains(&value) {
                    Ok(Some(value))
                } else {
                    Err(invalid(
                        &path,
                        format!(
                            "must be between {} and {}, got {number}",
                            range.start(),
                            range.end()
                        ),
                    ))
                }
            }
            Some(other) => Err(invalid(
                &path,
                format!("expected a number, not {}", kind_of(&other)),
            )),
        }
    }

    /// A whole number within `range`.
    pub(super) fn integer(
        &mut self,
        name: &str,
        range: RangeInclusive<i64>,
    ) -> Result<Option<i64>, ApiError> {
        let path = self.path(name);
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(number)) => match number.as_i64() {
                Some(value) if range.contains(&value) => Ok(Some(value)),
                Some(_) => Err(invalid(
                    &path,
                    format!(
                        "must be from {} to {}, got {number}",
                        range.start(),
                        range.end()
                    ),
                )),
                None => Err(invalid(
                    &path,
                    format!("expected a whole number, got {number}"),
                )),
            },
            Some(other) => Err(invalid(
                &path,
                format!("expected a whole number, not {}", kind_of(&other)),
            )),
        }
    }

    /// `stop`: a string or a list of at most `most` non-empty strings.
    pub(super) fn stops(&mut self, name: &str, most: usize) -> Result<Vec<String>, ApiError> {
        let path = self.path(name);
        let stops = match self.take(name) {
            None => return Ok(vec![]),
            Some(Value::String(stop)) => vec![stop],
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(stop) => Ok(stop),
                    other => Err(invalid(
                        &path,
                        format!("expected strings, found {}", kind_of(&other)),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(invalid(
                    &path,
                    format!(
                        "expected a string or a list of strings, not {}",
                        kind_of(&other)
                    ),
                ));
            }
        };
        if stops.len() > most || stops.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(invalid(
                &path,
                format!("at most {most} strings of 1 to 256 bytes"),
            ));
        }
        Ok(stops)
    }
}

/// Sampling fields chat and legacy completions share.
pub(super) struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u32>,
    pub stop: Vec<String>,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub n: u32,
    pub stream: bool,
    pub include_usage: bool,
    /// Token id (the model's own vocabulary) and the bias added to its logit.
    pub logit_bias: Vec<(i32, f32)>,
}

/// `logit_bias`: `{"token id": bias}`, ids of the model's own vocabulary
/// (as vLLM and llama.cpp's server take them), biases from -100 to 100.
fn logit_bias(fields: &mut Fields) -> Result<Vec<(i32, f32)>, ApiError> {
    let biases = match fields.take("logit_bias") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(biases)) => biases,
        Some(other) => {
            return Err(invalid(
                "logit_bias",
                format!(
                    "expected an object of token ids to biases, not {}",
                    kind_of(&other)
                ),
            ));
        }
    };
    if biases.len() > llm::MAX_LOGIT_BIASES {
        return Err(invalid(
            "logit_bias",
            format!("at most {} tokens", llm::MAX_LOGIT_BIASES),
        ));
    }
    biases
        .into_iter()
        .map(|(token, bias)| {
            let id = token.parse::<i32>().ok().filter(|id| *id >= 0).ok_or_else(|| {
                invalid(
                    "logit_bias",
                    format!("{token:?} is not a token id: keys are the model's token ids, such as \"1234\""),
                )
            })?;
            match bias.as_f64() {
                Some(bias) if (-100.0..=100.0).contains(&bias) => Ok((id, bias as f32)),
                _ => Err(invalid(
                    "logit_bias",
                    format!("the bias of token {id} must be a number from -100 to 100"),
                )),
            }
        })
        .collect()
}

/// The most choices one request may ask for.
pub(super) const MAX_CHOICES: i64 = 8;

impl Sampling {
    pub(super) fn read(fields: &mut Fields) -> Result<Self, ApiError> {
        let stream = fields.boolean("stream")?.unwrap_or(false);
        let include_usage = match fields.take("stream_options") {
            None => false,
            Some(options) => {
                if !stream {
                    return Err(invalid(
                        "stream_options",
                        "only allowed when stream is true",
                    ));
                }
                Fields::of(options, "stream_options")?
                    .boolean("include_usage")?
                    .unwrap_or(false)
            }
        };
        Ok(Self {
            temperature: fields.number("temperature", 0.0..=2.0)?.unwrap_or(1.0) as f32,
            top_p: match fields.number("top_p", 0.0..=1.0)? {
                Some(0.0) => return Err(invalid("top_p", "must be above 0")),
                other => other.unwrap_or(1.0) as f32,
            },
            // OpenAI's seed is any 64-bit integer; the sampler takes 32 bits.
            seed: fields
                .integer("seed", i64::MIN..=i64::MAX)?
                .map(|seed| seed as u32),
            stop: fields.stops("stop", 16)?,
            frequency_penalty: fields
                .number("frequency_penalty", -2.0..=2.0)?
                .unwrap_or(0.0) as f32,
            presence_penalty: fields
                .number("presence_penalty", -2.0..=2.0)?
                .unwrap_or(0.0) as f32,
            n: fields.integer("n", 1..=MAX_CHOICES)?.unwrap_or(1) as u32,
            stream,
            include_usage,
            logit_bias: logit_bias(fields)?,
        })
    }

    /// The sampler's seed for choice `index`: the request's plus the
    /// index (so that `n` choices differ yet repeat with the seed), or
    /// a random one.
    pub(super) fn seed_of(&self, index: u32) -> u32 {
        match self.seed {
            Some(seed) => seed.wrapping_add(index),
            None => {
                let mut bytes = [0u8; 4];
                getrandom::fill(&mut bytes).expect("the OS has randomness");
                u32::from_le_bytes(bytes)
            }
        }
    }
}
