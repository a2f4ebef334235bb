//! `model.toml`: how the operator describes a repository model.

use serde::{Deserialize, Serialize};

use super::batcher::BatchConfig;
use super::embedding::EmbeddingConfig;
use super::limits::InputLimits;
use crate::llm::GenerationConfig;

/// The contents of `models/<name>/model.toml`. Unknown keys are an error.
///
/// ```toml
/// description = "all-MiniLM-L6-v2 sentence embeddings, 384 dimensions"
/// format = "onnx"
/// file = "model.onnx"
/// task = "feature-extraction"
/// device = "cpu"
/// public = true
/// ```
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// One line on what the model is, shown in `GET /v1/models`.
    #[serde(default)]
    pub description: String,
    /// The model's format: `"onnx"` (tensors, through wasi-nn) or `"gguf"`
    /// (text generation, through gigafactory:ai).
    pub format: ModelFormat,
    /// The model file, relative to the model's directory. Default: `model.onnx`.
    #[serde(default = "default_file")]
    pub file: String,
    /// What the model does, e.g. `"feature-extraction"` (informational).
    #[serde(default)]
    pub task: Option<String>,
    /// Where the model runs: `"auto"` (default), `"cpu"` or `"gpu"`.
    #[serde(default)]
    pub device: DevicePreference,
    /// Whether every tenant may use it (default `false`: only tenants whose
    /// quota names it).
    #[serde(default)]
    pub public: bool,
    /// When the model loads: `"boot"` (default: at start, so the first call
    /// is fast) or `"first-use"` (when a function first asks for it).
    #[serde(default)]
    pub load: LoadPolicy,
    /// Dynamic batching across callers (see [`BatchConfig`]); absent: none.
    #[serde(default)]
    pub batching: Option<BatchConfig>,
    /// Text models: continuous batching and KV cache (see [`GenerationConfig`]).
    #[serde(default)]
    pub generation: Option<GenerationConfig>,
    /// What one call may send (see [`InputLimits`]); absent: any shape the
    /// graph accepts.
    #[serde(default)]
    pub limits: Option<InputLimits>,
    /// Sentence-embedding models: tokenizer and pooling for
    /// `gigafactory:ai` `embed` (see [`EmbeddingConfig`]).
    #[serde(default)]
    pub embedding: Option<EmbeddingConfig>,
}

fn default_file() -> String {
    "model.onnx".into()
}

/// A model file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// An ONNX graph, run with tract.
    Onnx,
    /// A GGUF language model, run with llama.cpp.
    Gguf,
}

/// When a repository model loads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadPolicy {
    /// At start.
    #[default]
    Boot,
    /// When a function first calls `load-by-name` with it.
    FirstUse,
}

/// Where the operator wants a model placed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DevicePreference {
    /// A GPU when one is usable, else the CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// A GPU; the model fails to load without one.
    Gpu,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_minimal_config_with_defaults() {
        let config: ModelConfig = toml::from_str("format = \"onnx\"").unwrap();
        assert_eq!(config.file, "model.onnx");
        assert_eq!(config.device, DevicePreference::Auto);
    }

    #[test]
    fn refuses_unknown_keys() {
        let error = toml::from_str::<ModelConfig>("format = \"onnx\"\nbatch = 8").unwrap_err();
        assert!(
            error.to_string().contains("unknown field `batch`"),
            "{error}"
        );
    }
}
