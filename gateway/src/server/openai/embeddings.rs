//! `POST /v1/embeddings`: texts in, vectors out (floats or base64).

use gigafactory_runtime::models::EmbedInput;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::openai_error;
use crate::server::cluster::Outgoing;
use crate::server::routes::{Request, json};
use crate::server::{ApiError, Gateway, Response};

/// The largest embeddings request body (2048 texts of a few hundred words).
const MAX_EMBEDDINGS_BODY: usize = 8 << 20;

impl Gateway {
    pub(in crate::server) async fn embeddings(
        &self,
        request: Request,
    ) -> Result<Response, ApiError> {
        let tenant = self.require_tenant(request.headers()).await?;
        let (forwarded, outgoing) = (self.peers.forwarded(&request)?, Outgoing::of(&request));
        if !forwarded {
            crate::server::access::bill(&tenant);
        }
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
        let inputs = inputs_of(asked.input)?;
        let ai = self.ai(&tenant, &quota, admitted.budget.clone());
        let key = ai
            .resolve(&asked.model)
            .map_err(openai_error(&asked.model))?;
        if let (Some(dimensions), Some(width)) = (asked.dimensions, self.embedding_width(&key))
            && dimensions as usize != width
        {
            return Err(wrong_dimensions(&asked.model, width));
        }
        let timeout = self.config.limits.timeout;
        let embedding = ai.embed(&asked.model, &inputs);
        let Ok(result) = tokio::time::timeout(timeout, embedding).await else {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                format!(
                    "the embeddings did not finish within {} s",
                    timeout.as_secs_f64()
                ),
            ));
        };
        let embeddings = result.map_err(openai_error(&asked.model))?;
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

/// `input`: a string, a list of strings, a list of token ids, or a list
/// of lists of token ids (ids of the model's own vocabulary, as vLLM
/// takes them; checked by the pool).
fn inputs_of(input: Value) -> Result<Vec<EmbedInput>, ApiError> {
    let refuse = |why: &str| {
        ApiError::bad_request("invalid_request", format!("input: {why}")).param("input")
    };
    let expected = "expected a string, a list of strings, or token ids (a list of integers, or a list of such lists)";
    let ids = |items: Vec<Value>| -> Result<Vec<i64>, ApiError> {
        items
            .into_iter()
            .map(|item| item.as_i64().ok_or_else(|| refuse(expected)))
            .collect()
    };
    match input {
        Value::String(text) => Ok(vec![EmbedInput::Text(text)]),
        Value::Array(items) if items.is_empty() => Err(refuse("send at least one input")),
        Value::Array(items) if items[0].is_number() => Ok(vec![EmbedInput::Tokens(ids(items)?)]),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => Ok(EmbedInput::Text(text)),
                Value::Array(tokens) => Ok(EmbedInput::Tokens(ids(tokens)?)),
                _ => Err(refuse(expected)),
            })
            .collect(),
        _ => Err(refuse(expected)),
    }
}

/// The vector as base64 of its little-endian f32 bytes, as OpenAI's
/// `encoding_format: "base64"` (which the official clients ask for).
fn base64_of_floats(vector: &[f32]) -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
