//! The host side of `gigafactory:ai` (wit/gigafactory-ai): text generation
//! with the repository's text models and sentence embeddings with its
//! embedding models. Model permissions are wasi-nn's:
//! models the tenant may not see do not exist, models outside the
//! manifest are denied.

use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::llm::{self, Event, GenerateError, Generation};
use crate::models::{ErrorCode, NnError};
use crate::nn::NnCtx;

mod generated {
    wasmtime::component::bindgen!({
        world: "imports",
        path: "../wit/gigafactory-ai",
        with: {
            "gigafactory:ai/generation.generation-stream": super::GenerationStream,
        },
        imports: {
            "gigafactory:ai/generation.generate": async | trappable,
            "gigafactory:ai/generation.[method]generation-stream.next": async | trappable,
            "gigafactory:ai/embeddings.embed": async | trappable,
            default: trappable,
        },
    });
}

use generated::gigafactory::ai::{embeddings, generation, types};

/// A generation as a guest holds it; dropping it cancels the generation.
pub struct GenerationStream {
    generation: Generation,
    done: bool,
}

/// The view the bindings are implemented on: the instance's model grants
/// (shared with wasi-nn) and its resource table.
pub struct AiView<'a> {
    ctx: &'a NnCtx,
    table: &'a mut ResourceTable,
}

impl<'a> AiView<'a> {
    /// A view over an instance's model context and resource table.
    pub fn new(ctx: &'a NnCtx, table: &'a mut ResourceTable) -> Self {
        Self { ctx, table }
    }
}

struct Ai;

impl HasData for Ai {
    type Data<'a> = AiView<'a>;
}

/// Adds `gigafactory:ai` to `linker`; `view` finds the instance's context.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> AiView<'_>,
) -> wasmtime::Result<()> {
    types::add_to_linker::<_, Ai>(linker, view)?;
    generation::add_to_linker::<_, Ai>(linker, view)?;
    embeddings::add_to_linker::<_, Ai>(linker, view)?;
    Ok(())
}

type AiResult<T> = wasmtime::Result<Result<T, types::Error>>;

impl types::Host for AiView<'_> {}

impl generation::Host for AiView<'_> {
    async fn generate(
        &mut self,
        model: String,
        prompt: generation::Prompt,
        options: generation::Options,
    ) -> AiResult<Resource<GenerationStream>> {
        if let Err(error) = self.permit(&model) {
            return Ok(Err(error));
        }
        let capabilities = self.ctx.capabilities();
        if let Some(budget) = &capabilities.compute
            && let Err(why) = budget.check_tokens()
        {
            return Ok(Err(types::Error::Quota(why)));
        }
        let pool = self.ctx.pool();
        let text_model = match pool.text(&model).await {
            Ok(text_model) => text_model,
            Err(error) => return Ok(Err(from_pool(error))),
        };
        let request = llm::Request {
            prompt: match prompt {
                generation::Prompt::Text(text) => llm::Prompt::Text(text),
                generation::Prompt::Chat(messages) => {
                    llm::Prompt::Chat(messages.into_iter().map(|m| (m.role, m.content)).collect())
                }
            },
            max_tokens: options.max_tokens,
            temperature: options.temperature,
            top_p: options.top_p,
            top_k: options.top_k,
            seed: options.seed,
            stop: options.stop,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            budget: capabilities.compute.clone(),
        };
        let tenant: Arc<str> = capabilities.tenant.clone();
        match text_model.generate(tenant, request) {
            Ok(generation) => Ok(Ok(self.table.push(GenerationStream {
                generation,
                done: false,
            })?)),
            Err(error) => Ok(Err(from_generate(error))),
        }
    }
}

/// Why an instance may not use a repository model.
pub(crate) enum Refusal {
    /// The tenant may not see it, or there is none: it does not exist.
    NotFound(String),
    /// The function's manifest does not name it.
    Denied(String),
}

/// Whether the instance of `ctx` may use the repository model `model`:
/// models the tenant may not see do not exist, models outside the
/// manifest are denied (as for wasi-nn `load-by-name`).
pub(crate) fn permit(ctx: &NnCtx, model: &str) -> Result<(), Refusal> {
    let capabilities = ctx.capabilities();
    if !capabilities.models.is_visible(model) || !ctx.pool().has(model) {
        return Err(Refusal::NotFound(format!("no model named {model:?}")));
    }
    if !capabilities.models.is_allowed(model) {
        return Err(Refusal::Denied(format!(
            "model {model:?} is not in this function's manifest (`models`)"
        )));
    }
    Ok(())
}

impl AiView<'_> {
    fn permit(&self, model: &str) -> Result<(), types::Error> {
        permit(self.ctx, model).map_err(|refusal| match refusal {
            Refusal::NotFound(why) => types::Error::NotFound(why),
            Refusal::Denied(why) => types::Error::Denied(why),
        })
    }
}

impl embeddings::Host for AiView<'_> {
    async fn embed(
        &mut self,
        model: String,
        texts: Vec<String>,
    ) -> AiResult<embeddings::Embeddings> {
        if let Err(error) = self.permit(&model) {
            return Ok(Err(error));
        }
        let capabilities = self.ctx.capabilities();
        if let Some(budget) = &capabilities.compute
            && let Err(why) = budget.check()
        {
            return Ok(Err(types::Error::Quota(why)));
        }
        let result = self
            .ctx
            .pool()
            .embed(&model, &texts, capabilities.tenant.clone())
            .await;
        Ok(match result {
            Ok((embeddings, spent)) => {
                if let Some(budget) = &capabilities.compute {
                    budget.charge(spent);
                }
                Ok(embeddings::Embeddings {
                    vectors: embeddings.vectors,
                    prompt_tokens: u32::try_from(embeddings.tokens).unwrap_or(u32::MAX),
                })
            }
            Err(error) => Err(from_pool(error)),
        })
    }
}

impl generation::HostGenerationStream for AiView<'_> {
    async fn next(
        &mut self,
        stream: Resource<GenerationStream>,
    ) -> AiResult<Option<generation::Chunk>> {
        let stream = self.table.get_mut(&stream)?;
        if stream.done {
            return Ok(Ok(None));
        }
        let event = stream.generation.next().await;
        Ok(match event {
            Some(Event::Text(text)) => Ok(Some(generation::Chunk::Text(text))),
            Some(Event::Done(usage)) => {
                stream.done = true;
                Ok(Some(generation::Chunk::Done(generation::Usage {
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                    finish_reason: match usage.finish_reason {
                        llm::FinishReason::Stop => generation::FinishReason::Stop,
                        llm::FinishReason::Length => generation::FinishReason::Length,
                    },
                })))
            }
            Some(Event::Failed(why)) => {
                stream.done = true;
                Err(types::Error::Failed(why))
            }
            None => {
                stream.done = true;
                Err(types::Error::Failed("the model stopped".into()))
            }
        })
    }

    fn drop(&mut self, stream: Resource<GenerationStream>) -> wasmtime::Result<()> {
        // Dropping the generation closes its channel: the scheduler frees
        // the sequence at its next step.
        self.table.delete(stream)?;
        Ok(())
    }
}

fn from_generate(error: GenerateError) -> types::Error {
    match error {
        GenerateError::Invalid(why) => types::Error::Invalid(why),
        GenerateError::TooLarge(why) => types::Error::TooLarge(why),
        GenerateError::Busy(_) => types::Error::Busy(error.to_string()),
        GenerateError::Stopped(_) => types::Error::Failed(error.to_string()),
    }
}

fn from_pool(error: NnError) -> types::Error {
    if error.is_busy() {
        return types::Error::Busy(error.message);
    }
    match error.code {
        ErrorCode::NotFound => types::Error::NotFound(error.message),
        ErrorCode::UnsupportedOperation | ErrorCode::InvalidArgument => {
            types::Error::Invalid(error.message)
        }
        _ => types::Error::Failed(error.message),
    }
}
