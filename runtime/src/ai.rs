//! The host side of `gigafactory:ai` (wit/gigafactory-ai): text generation
//! with the repository's text models and sentence embeddings with its
//! embedding models. Model permissions are wasi-nn's:
//! models the tenant may not see do not exist, models outside the
//! manifest are denied.

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::llm::{self, Event, GenerateError, Generation};
use crate::models::{Embeddings, ErrorCode, NnError};
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
            // No penalties; the budget (the tenant's) is set by start_generation.
            ..llm::Request::default()
        };
        match start_generation(self.ctx, &model, request).await {
            Ok(generation) => Ok(Ok(self.table.push(GenerationStream {
                generation,
                done: false,
            })?)),
            Err(failure) => Ok(Err(error_of(failure))),
        }
    }
}

/// Why a text call failed, before each interface words it.
pub(crate) enum Failure {
    /// The tenant may not see the model, or there is none: it does not exist.
    NotFound(String),
    /// The function's manifest does not name the model.
    Denied(String),
    /// The tenant's budget (tokens or compute) is used up for now.
    Quota(String),
    /// The model pool refused or failed.
    Pool(NnError),
    /// The text engine refused the request.
    Generate(GenerateError),
}

/// Whether the instance of `ctx` may use the repository model `model`:
/// models the tenant may not see do not exist, models outside the
/// manifest are denied (as for wasi-nn `load-by-name`).
fn permit(ctx: &NnCtx, model: &str) -> Result<String, Failure> {
    let capabilities = ctx.capabilities();
    ctx.pool()
        .find(&capabilities.tenant, &capabilities.models, model)
        .map_err(|error| match error.code {
            ErrorCode::Security => Failure::Denied(error.message),
            _ => Failure::NotFound(error.message),
        })
}

/// Starts `request` for the instance of `ctx` on the text model `model`
/// (loaded on first use), once permissions and the tenant's token budget
/// allow; the budget then pays for each token as it is generated.
pub(crate) async fn start_generation(
    ctx: &NnCtx,
    model: &str,
    mut request: llm::Request,
) -> Result<Generation, Failure> {
    let model = permit(ctx, model)?;
    let capabilities = ctx.capabilities();
    if let Some(budget) = &capabilities.compute {
        budget.check_tokens().map_err(Failure::Quota)?;
    }
    let text_model = ctx.pool().text(&model).await.map_err(Failure::Pool)?;
    request.budget = capabilities.compute.clone();
    text_model
        .start(capabilities.tenant.clone(), request)
        .await
        .map_err(Failure::Generate)
}

/// Embeds `texts` for the instance of `ctx` with the embedding model
/// `model`, once permissions and the tenant's compute budget allow; the
/// compute is charged to the budget.
pub(crate) async fn embed(
    ctx: &NnCtx,
    model: &str,
    texts: &[String],
) -> Result<Embeddings, Failure> {
    let model = permit(ctx, model)?;
    let capabilities = ctx.capabilities();
    if let Some(budget) = &capabilities.compute {
        budget.check().map_err(Failure::Quota)?;
    }
    let (result, spent) = ctx
        .pool()
        .embed(&model, texts, capabilities.tenant.clone())
        .await;
    if let Some(budget) = &capabilities.compute {
        budget.charge(spent);
    }
    result.map_err(Failure::Pool)
}

impl embeddings::Host for AiView<'_> {
    async fn embed(
        &mut self,
        model: String,
        texts: Vec<String>,
    ) -> AiResult<embeddings::Embeddings> {
        Ok(embed(self.ctx, &model, &texts)
            .await
            .map(|embeddings| embeddings::Embeddings {
                vectors: embeddings.vectors,
                prompt_tokens: u32::try_from(embeddings.tokens).unwrap_or(u32::MAX),
            })
            .map_err(error_of))
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

fn error_of(failure: Failure) -> types::Error {
    match failure {
        Failure::NotFound(why) => types::Error::NotFound(why),
        Failure::Denied(why) => types::Error::Denied(why),
        Failure::Quota(why) => types::Error::Quota(why),
        Failure::Pool(error) => from_pool(error),
        Failure::Generate(error) => from_generate(error),
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
