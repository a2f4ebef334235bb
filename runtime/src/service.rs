//! One door to the models for every front-end — WIT and witx wasi-nn,
//! WasmEdge's GGML ABI, `gigafactory:ai`, Spin's `llm` and the gateway's
//! OpenAI API: which model a name means (aliases, the tenant's
//! visibility, the manifest's `models`), the tenant's compute and token
//! budgets, and why a call was refused, as one typed [`AiError`]. Each
//! front-end only translates its arguments in and the error out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::capabilities::Capabilities;
use crate::llm::{self, GenerateError, Generation, TextModel};
use crate::models::{
    EmbedInput, Embeddings, ErrorCode, HostTensor, ModelPool, NnError, PoolGraph, Resident,
};

/// Longer model names are not looked up (nor quoted back).
pub const MAX_MODEL_NAME: usize = 256;

/// Why a model call was refused or failed, for every front-end to word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AiError {
    /// No such model, or one the tenant may not see (the same to it).
    #[error("{0}")]
    NotFound(String),
    /// The tenant may see the model, but the function's manifest does not
    /// name it.
    #[error("{0}")]
    Denied(String),
    /// A bad argument: an input, a prompt, an option.
    #[error("{0}")]
    Invalid(String),
    /// The model cannot do this (an embedding asked of a text model, a
    /// tensor type the host does not run).
    #[error("{0}")]
    Unsupported(String),
    /// Graph bytes in an encoding the host does not run.
    #[error("{0}")]
    Encoding(String),
    /// Too large: a graph, an input, a prompt for the context.
    #[error("{0}")]
    TooLarge(String),
    /// The model's queue is full: retry shortly.
    #[error("{0}")]
    Busy(String),
    /// The tenant's compute or token budget is used up for now.
    #[error("{0}")]
    Quota(String),
    /// The call ran out of time.
    #[error("{0}")]
    Timeout(String),
    /// The model could not be reached: it failed to load, or stopped.
    #[error("{0}")]
    Unavailable(String),
    /// The model failed while working.
    #[error("{0}")]
    Failed(String),
}

impl From<NnError> for AiError {
    fn from(error: NnError) -> Self {
        let message = error.message;
        match error.code {
            ErrorCode::NotFound => AiError::NotFound(message),
            ErrorCode::Security => AiError::Denied(message),
            ErrorCode::InvalidArgument => AiError::Invalid(message),
            ErrorCode::UnsupportedOperation => AiError::Unsupported(message),
            ErrorCode::InvalidEncoding => AiError::Encoding(message),
            ErrorCode::TooLarge => AiError::TooLarge(message),
            ErrorCode::Busy => AiError::Busy(message),
            ErrorCode::Timeout => AiError::Timeout(message),
            ErrorCode::RuntimeError | ErrorCode::Unknown => AiError::Failed(message),
        }
    }
}

impl From<GenerateError> for AiError {
    fn from(error: GenerateError) -> Self {
        let message = error.to_string();
        match error {
            GenerateError::Invalid(why) => AiError::Invalid(why),
            GenerateError::TooLarge(why) => AiError::TooLarge(why),
            GenerateError::Busy(_) => AiError::Busy(message),
            GenerateError::Stopped(_) => AiError::Unavailable(message),
        }
    }
}

impl AiError {
    /// Its message.
    pub fn message(&self) -> &str {
        match self {
            AiError::NotFound(why)
            | AiError::Denied(why)
            | AiError::Invalid(why)
            | AiError::Unsupported(why)
            | AiError::Encoding(why)
            | AiError::TooLarge(why)
            | AiError::Busy(why)
            | AiError::Quota(why)
            | AiError::Timeout(why)
            | AiError::Unavailable(why)
            | AiError::Failed(why) => why,
        }
    }
}

/// A caller's way to the shared model pool: an instance's, or one OpenAI
/// request's, with its grants and budget.
pub struct AiService {
    pool: Arc<ModelPool>,
    capabilities: Capabilities,
    /// Whether a call was refused because its model was busy.
    busy: AtomicBool,
}

impl AiService {
    /// The pool as `capabilities` may use it.
    pub fn new(pool: Arc<ModelPool>, capabilities: Capabilities) -> Self {
        Self {
            pool,
            capabilities,
            busy: AtomicBool::new(false),
        }
    }

    /// What the caller may use.
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// Whether a call was refused because a model's queue was full: the
    /// gateway answers 503 if the function then fails.
    pub fn was_refused_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// `result`, remembering a busy refusal.
    fn note<T>(&self, result: Result<T, impl Into<AiError>>) -> Result<T, AiError> {
        let result = result.map_err(Into::into);
        if let Err(AiError::Busy(_)) = &result {
            self.busy.store(true, Ordering::Relaxed);
        }
        result
    }

    /// The catalog key of the model the caller calls `name`: its manifest's
    /// alias resolved, then its tenant's private model of that name, else
    /// an operator's model the tenant may see and the manifest allows.
    pub fn resolve(&self, name: &str) -> Result<String, AiError> {
        Ok(self.named(name)?.1)
    }

    /// The name the caller's manifest maps `name` to, and its catalog key.
    fn named<'a>(&'a self, name: &'a str) -> Result<(&'a str, String), AiError> {
        if name.len() > MAX_MODEL_NAME {
            return Err(AiError::NotFound(format!(
                "no model has a {}-byte name",
                name.len()
            )));
        }
        let capabilities = &self.capabilities;
        let name = capabilities.model_name(name);
        let key = self
            .pool
            .find(&capabilities.tenant, &capabilities.models, name)?;
        Ok((name, key))
    }

    /// The tensor model the caller calls `name`, loaded.
    pub async fn graph(&self, name: &str) -> Result<PoolGraph, AiError> {
        let key = self.resolve(name)?;
        self.note(self.pool.get(&key).await)
    }

    /// The model the caller calls `name`, loaded: a tensor graph or a
    /// text model; with the name it resolved to.
    pub(crate) async fn resident(&self, name: &str) -> Result<(String, Resident), AiError> {
        let (name, key) = self.named(name)?;
        let resident = self.note(self.pool.resident(&key).await)?;
        Ok((name.to_string(), resident))
    }

    /// The caller's own ONNX bytes as a graph, cached for its tenant
    /// within the tenant's graph memory.
    pub async fn load_bytes(&self, bytes: Vec<u8>) -> Result<PoolGraph, AiError> {
        let capabilities = &self.capabilities;
        let loaded = self
            .pool
            .load_bytes(bytes, &capabilities.tenant, capabilities.graph_memory)
            .await;
        self.note(loaded)
    }

    /// Runs `graph` on `named` inputs, batched with other tenants' calls,
    /// within the compute budget, charging what the run took (a failed run
    /// costs the workers too).
    pub async fn compute(
        &self,
        graph: PoolGraph,
        named: Vec<(String, HostTensor)>,
    ) -> Result<Vec<(String, HostTensor)>, AiError> {
        self.check_compute()?;
        let (result, spent) = self
            .pool
            .compute(graph, named, self.capabilities.tenant.clone())
            .await;
        tracing::debug!(ms = spent.as_secs_f64() * 1e3, "compute");
        self.charge(spent);
        self.note(result)
    }

    /// Embeds `inputs` (texts or token ids) with the embedding model the
    /// caller calls `model`, within the compute budget, charging it.
    pub async fn embed(&self, model: &str, inputs: &[EmbedInput]) -> Result<Embeddings, AiError> {
        let key = self.resolve(model)?;
        self.check_compute()?;
        let (result, spent) = self
            .pool
            .embed_inputs(&key, inputs, self.capabilities.tenant.clone())
            .await;
        self.charge(spent);
        self.note(result)
    }

    /// [`Self::embed`] of texts.
    pub async fn embed_texts(&self, model: &str, texts: &[String]) -> Result<Embeddings, AiError> {
        let inputs: Vec<EmbedInput> = texts.iter().cloned().map(EmbedInput::Text).collect();
        self.embed(model, &inputs).await
    }

    /// The text model the caller calls `name`, loaded.
    pub async fn text_model(&self, name: &str) -> Result<Arc<TextModel>, AiError> {
        let key = self.resolve(name)?;
        self.note(self.pool.text(&key).await)
    }

    /// Starts `request` on `model` once the token budget allows; the budget
    /// then pays for each token as it is generated.
    pub async fn start(
        &self,
        model: &Arc<TextModel>,
        mut request: llm::Request,
    ) -> Result<Generation, AiError> {
        if let Some(budget) = &self.capabilities.compute {
            budget.check_tokens().map_err(AiError::Quota)?;
        }
        request.budget = self.capabilities.compute.clone();
        let started = model.start(self.capabilities.tenant.clone(), request).await;
        self.note(started)
    }

    /// Starts `request` on the text model the caller calls `name`.
    pub async fn generate(&self, name: &str, request: llm::Request) -> Result<Generation, AiError> {
        let model = self.text_model(name).await?;
        self.start(&model, request).await
    }

    fn check_compute(&self) -> Result<(), AiError> {
        match &self.capabilities.compute {
            Some(budget) => budget.check().map_err(AiError::Quota),
            None => Ok(()),
        }
    }

    fn charge(&self, spent: std::time::Duration) {
        if let Some(budget) = &self.capabilities.compute {
            budget.charge(spent);
        }
    }
}
