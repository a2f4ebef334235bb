//! The platform's resident text models (`gigafactory:ai`).
//!
//! - [`generate`]: text generation. The host tokenises, applies the model's
//!   chat template, keeps the KV cache and decodes every caller's
//!   generations together; text comes back as it is produced.
//! - [`embed`]: sentence embeddings. The host tokenises and pools; the
//!   model runs batched with every other caller's calls.
//!
//! ```ignore
//! use gigafactory_sdk::ai::{self, Chunk, Message, Options, Prompt};
//!
//! let prompt = Prompt::Chat(vec![Message { role: "user".into(), content: "Hi!".into() }]);
//! for chunk in ai::generate("smollm2-135m-instruct", &prompt, &Options::default())? {
//!     match chunk? {
//!         Chunk::Text(text) => print!("{text}"),
//!         Chunk::Done(usage) => println!("\n{} tokens", usage.completion_tokens),
//!     }
//! }
//!
//! let vectors = ai::embed("all-minilm-l6-v2", &["a cat", "a dog"])?.vectors;
//! ```

#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit/gigafactory-ai",
        world: "imports",
    });
}

use bindings::gigafactory::ai::{embeddings, generation};

pub use bindings::gigafactory::ai::embeddings::Embeddings;
pub use bindings::gigafactory::ai::generation::{
    Chunk, FinishReason, Message, Options, Prompt, Usage,
};
pub use bindings::gigafactory::ai::types::Error;

impl Default for Options {
    /// 256 tokens, greedy, no stop strings.
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

impl Error {
    /// The host's message.
    pub fn message(&self) -> &str {
        match self {
            Error::NotFound(m)
            | Error::Denied(m)
            | Error::Invalid(m)
            | Error::TooLarge(m)
            | Error::Busy(m)
            | Error::Quota(m)
            | Error::Failed(m) => m,
        }
    }

    /// The HTTP status and platform error code that fit this error.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            Error::NotFound(_) => (404, "model_not_found"),
            Error::Denied(_) => (403, "model_denied"),
            Error::Invalid(_) => (400, "invalid_request"),
            Error::TooLarge(_) => (413, "context_too_large"),
            Error::Busy(_) => (503, "model_busy"),
            Error::Quota(_) => (429, "too_many_requests"),
            Error::Failed(_) => (502, "model_error"),
        }
    }
}

/// A generation in progress: iterate it for text chunks, then the usage.
/// Dropping it cancels the generation.
pub struct Generation(generation::GenerationStream);

impl Iterator for Generation {
    type Item = Result<Chunk, Error>;

    /// Blocks until the model produces the next chunk.
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().transpose()
    }
}

/// Starts generating with the repository text model `model`.
pub fn generate(model: &str, prompt: &Prompt, options: &Options) -> Result<Generation, Error> {
    generation::generate(model, prompt, options).map(Generation)
}

/// Embeds `texts` (1 to 2048) with the repository embedding model `model`:
/// one vector per text, in order.
pub fn embed<S: AsRef<str>>(model: &str, texts: &[S]) -> Result<Embeddings, Error> {
    let texts: Vec<String> = texts.iter().map(|t| t.as_ref().to_string()).collect();
    embeddings::embed(model, &texts)
}
