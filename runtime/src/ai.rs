//! The host side of `gigafactory:ai` (wit/gigafactory-ai): text generation
//! with the repository's text models and sentence embeddings with its
//! embedding models, through the instance's [`AiService`] (wasi-nn's
//! permissions: models the tenant may not see do not exist, models
//! outside the manifest are denied).

use wasmtime::component::{HasData, Linker, Resource};

use crate::llm::{self, Event, Generation};
use crate::nn::ModelView;
use crate::service::AiError;

mod generated {
    wasmtime::component::bindgen!({
        world: "imports",
        path: "../sdk/wit/gigafactory-ai",
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

struct Ai;

impl HasData for Ai {
    type Data<'a> = ModelView<'a>;
}

/// Adds `gigafactory:ai` to `linker`; `view` finds the instance's context.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> ModelView<'_>,
) -> wasmtime::Result<()> {
    types::add_to_linker::<_, Ai>(linker, view)?;
    generation::add_to_linker::<_, Ai>(linker, view)?;
    embeddings::add_to_linker::<_, Ai>(linker, view)?;
    Ok(())
}

type AiResult<T> = wasmtime::Result<Result<T, types::Error>>;

impl types::Host for ModelView<'_> {}

impl generation::Host for ModelView<'_> {
    async fn generate(
        &mut self,
        model: String,
        prompt: generation::Prompt,
        options: generation::Options,
    ) -> AiResult<Resource<GenerationStream>> {
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
            // No penalties; the budget (the tenant's) is set by the service.
            ..llm::Request::default()
        };
        match self.service().generate(&model, request).await {
            Ok(generation) => Ok(Ok(self.table.push(GenerationStream {
                generation,
                done: false,
            })?)),
            Err(error) => Ok(Err(error.into())),
        }
    }
}

impl embeddings::Host for ModelView<'_> {
    async fn embed(
        &mut self,
        model: String,
        texts: Vec<String>,
    ) -> AiResult<embeddings::Embeddings> {
        Ok(self
            .service()
            .embed_texts(&model, &texts)
            .await
            .map(|embeddings| embeddings::Embeddings {
                vectors: embeddings.vectors,
                prompt_tokens: u32::try_from(embeddings.tokens).unwrap_or(u32::MAX),
            })
            .map_err(types::Error::from))
    }
}

impl generation::HostGenerationStream for ModelView<'_> {
    async fn next(
        &mut self,
        stream: Resource<GenerationStream>,
    ) -> AiResult<Option<generation::Chunk>> {
        let stream = self.table.get_mut(&stream)?;
        if stream.done {
            return Ok(Ok(None));
        }
        let mut event = stream.generation.next().await;
        // Log-probabilities are not asked for here; skipped all the same.
        while let Some(Event::Token(_)) = event {
            event = stream.generation.next().await;
        }
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
            Some(Event::Token(_)) => unreachable!("skipped above"),
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

/// How `gigafactory:ai` words a refusal.
impl From<AiError> for types::Error {
    fn from(error: AiError) -> Self {
        match error {
            AiError::NotFound(why) => types::Error::NotFound(why),
            AiError::Denied(why) => types::Error::Denied(why),
            AiError::Invalid(why) | AiError::Unsupported(why) | AiError::Encoding(why) => {
                types::Error::Invalid(why)
            }
            AiError::TooLarge(why) => types::Error::TooLarge(why),
            AiError::Busy(why) => types::Error::Busy(why),
            AiError::Quota(why) => types::Error::Quota(why),
            AiError::Timeout(why) | AiError::Unavailable(why) | AiError::Failed(why) => {
                types::Error::Failed(why)
            }
        }
    }
}
