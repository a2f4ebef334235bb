//! `fermyon:spin/llm@2.0.0` (wit/fermyon-spin), so components built with
//! the `spin-sdk` crate's `llm` module run unchanged: `infer` is a whole
//! generation from a raw prompt on the same scheduler as `gigafactory:ai`
//! `generate`, and `generate-embeddings` is `embed`. Permissions, budgets
//! and batching are the same; Spin's error variant is coarser, so a busy
//! model or a used-up quota is a `runtime-error` saying so.

use std::hash::{BuildHasher, RandomState};

use wasmtime::component::{HasData, Linker};

use crate::ai::{self, Failure};
use crate::llm::{self, GenerateError};
use crate::models::{ErrorCode, NnError};
use crate::nn::NnCtx;

mod generated {
    wasmtime::component::bindgen!({
        world: "spin-llm",
        path: "../wit/fermyon-spin",
        imports: { default: async | trappable },
    });
}

use generated::fermyon::spin::llm as spin;

/// The view the bindings are implemented on: the instance's model grants.
pub struct SpinView<'a> {
    ctx: &'a NnCtx,
}

impl<'a> SpinView<'a> {
    /// A view over an instance's model context.
    pub fn new(ctx: &'a NnCtx) -> Self {
        Self { ctx }
    }
}

struct Spin;

impl HasData for Spin {
    type Data<'a> = SpinView<'a>;
}

/// Adds `fermyon:spin/llm` to `linker`; `view` finds the instance's context.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> SpinView<'_>,
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

impl spin::Host for SpinView<'_> {
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
            // The budget (the tenant's) is set by start_generation.
            ..llm::Request::default()
        };
        let generation = match ai::start_generation(self.ctx, &model, request).await {
            Ok(generation) => generation,
            Err(failure) => return Ok(Err(error_of(failure))),
        };
        Ok(generation
            .collect()
            .await
            .map(|(text, usage)| spin::InferencingResult {
                text,
                usage: spin::InferencingUsage {
                    prompt_token_count: usage.prompt_tokens,
                    generated_token_count: usage.completion_tokens,
                },
            })
            .map_err(spin::Error::RuntimeError))
    }

    async fn generate_embeddings(
        &mut self,
        model: String,
        text: Vec<String>,
    ) -> SpinResult<spin::EmbeddingsResult> {
        Ok(ai::embed(self.ctx, &model, &text)
            .await
            .map(|embeddings| spin::EmbeddingsResult {
                embeddings: embeddings.vectors,
                usage: spin::EmbeddingsUsage {
                    prompt_token_count: u32::try_from(embeddings.tokens).unwrap_or(u32::MAX),
                },
            })
            .map_err(error_of))
    }
}

fn error_of(failure: Failure) -> spin::Error {
    match failure {
        Failure::NotFound(_) | Failure::Denied(_) => spin::Error::ModelNotSupported,
        Failure::Quota(why) => spin::Error::RuntimeError(why),
        Failure::Pool(error) => from_pool(error),
        Failure::Generate(error) => from_generate(error),
    }
}

fn from_generate(error: GenerateError) -> spin::Error {
    match error {
        GenerateError::Invalid(why) | GenerateError::TooLarge(why) => {
            spin::Error::InvalidInput(why)
        }
        GenerateError::Busy(_) | GenerateError::Stopped(_) => {
            spin::Error::RuntimeError(error.to_string())
        }
    }
}

fn from_pool(error: NnError) -> spin::Error {
    if error.is_busy() {
        return spin::Error::RuntimeError(error.message);
    }
    match error.code {
        // No such model, or not one that does this.
        ErrorCode::NotFound | ErrorCode::UnsupportedOperation => spin::Error::ModelNotSupported,
        ErrorCode::InvalidArgument => spin::Error::InvalidInput(error.message),
        _ => spin::Error::RuntimeError(error.message),
    }
}
