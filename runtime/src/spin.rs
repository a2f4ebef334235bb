//! `fermyon:spin/llm@2.0.0` (wit/fermyon-spin), so components built with
//! the `spin-sdk` crate's `llm` module run unchanged: `infer` is a whole
//! generation from a raw prompt on the same scheduler as `gigafactory:ai`
//! `generate`, and `generate-embeddings` is `embed`. Permissions, budgets
//! and batching are the same; Spin's error variant is coarser, so a busy
//! model or a used-up quota is a `runtime-error` saying so.

use std::hash::{BuildHasher, RandomState};

use wasmtime::component::{HasData, Linker};

use crate::llm;
use crate::nn::ModelView;
use crate::service::AiError;

mod generated {
    wasmtime::component::bindgen!({
        world: "spin-llm",
        path: "../sdk/wit/fermyon-spin",
        imports: { default: async | trappable },
    });
}

use generated::fermyon::spin::llm as spin;

struct Spin;

impl HasData for Spin {
    type Data<'a> = ModelView<'a>;
}

/// Adds `fermyon:spin/llm` to `linker`; `view` finds the instance's context.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> ModelView<'_>,
) -> wasmtime::Result<()> {
    spin::add_to_linker::<_, Spin>(linker, view)
}

type SpinResult<T> = wasmtime::Result<Result<T, spin::Error>>;

/// Spin's parameters when a component passes none.
const DEFAULTS: spin::InferencingParams = spin::InferencingParams {
    max_tokens: 100,
    repeat_penalty: 1.1,
    repeat_penalty_last_n_token_count: 64,
    temperature: 0.8,
    top_k: 40,
    top_p: 0.9,
};

impl spin::Host for ModelView<'_> {
    async fn infer(
        &mut self,
        model: String,
        prompt: String,
        params: Option<spin::InferencingParams>,
    ) -> SpinResult<spin::InferencingResult> {
        let params = params.unwrap_or(DEFAULTS);
        let request = llm::Request {
            prompt: llm::Prompt::Text(prompt),
            max_tokens: params.max_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            // Spin has no seed: each call samples differently.
            seed: RandomState::new().hash_one(0u8) as u32,
            stop: vec![],
            repeat_penalty: params.repeat_penalty,
            repeat_last_n: params.repeat_penalty_last_n_token_count,
            // The budget (the tenant's) is set by the service.
            ..llm::Request::default()
        };
        let generation = match self.service().generate(&model, request).await {
            Ok(generation) => generation,
            Err(error) => return Ok(Err(error.into())),
        };
        Ok(generation
            .collect()
            .await
            .map(|answer| spin::InferencingResult {
                text: answer.text,
                usage: spin::InferencingUsage {
                    prompt_token_count: answer.usage.prompt_tokens,
                    generated_token_count: answer.usage.completion_tokens,
                },
            })
            .map_err(spin::Error::from))
    }

    async fn generate_embeddings(
        &mut self,
        model: String,
        text: Vec<String>,
    ) -> SpinResult<spin::EmbeddingsResult> {
        Ok(self
            .service()
            .embed_texts(&model, &text)
            .await
            .map(|embeddings| spin::EmbeddingsResult {
                embeddings: embeddings.vectors,
                usage: spin::EmbeddingsUsage {
                    prompt_token_count: u32::try_from(embeddings.tokens).unwrap_or(u32::MAX),
                },
            })
            .map_err(spin::Error::from))
    }
}

/// How Spin's `llm` words a refusal: coarser than the others, so a busy
/// model or a used-up quota is a `runtime-error` saying so.
impl From<AiError> for spin::Error {
    fn from(error: AiError) -> Self {
        match error {
            // No such model, or not one that does this.
            AiError::NotFound(_) | AiError::Denied(_) | AiError::Unsupported(_) => {
                spin::Error::ModelNotSupported
            }
            AiError::Invalid(why) | AiError::TooLarge(why) | AiError::Encoding(why) => {
                spin::Error::InvalidInput(why)
            }
            AiError::Busy(why)
            | AiError::Quota(why)
            | AiError::Timeout(why)
            | AiError::Unavailable(why)
            | AiError::Failed(why) => spin::Error::RuntimeError(why),
        }
    }
}
