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
    /// What runs it: `"auto"` (default: for ONNX, ONNX Runtime when its
    /// library is present, else tract; for GGUF, llama.cpp) or an engine's
    /// name (`"onnxruntime"`, `"tract"`, `"llama.cpp"`).
    #[serde(default = "default_engine")]
    pub engine: String,
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
    /// Keep the model resident once loaded: never unloaded for idleness.
    #[serde(default)]
    pub pin: bool,
    /// Unload the model after this many seconds without a call, freeing its
    /// memory; the next call loads it again (and waits for that). Absent:
    /// it stays resident. Example: `idle_unload_after_secs = 900`.
    #[serde(default)]
    pub idle_unload_after_secs: Option<u64>,
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
    /// A LoRA adapter of a GGUF text model (see [`LoraConfig`]): `file` is
    /// the adapter's GGUF; it runs on its base's weights and scheduler.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
}

/// `[lora]`: this model is a LoRA adapter of a text model.
///
/// ```toml
/// format = "gguf"
/// file = "adapter.gguf"
/// [lora]
/// base = "smollm2-135m-instruct"
/// scale = 1.0
/// ```
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// The base model's name (its owner's private model of that name first).
    pub base: String,
    /// How much of the adapter applies (default 1).
    #[serde(default = "one")]
    pub scale: f32,
}

fn one() -> f32 {
    1.0
}

fn default_file() -> String {
    "model.onnx".into()
}

fn default_engine() -> String {
    "auto".into()
}

impl ModelConfig {
    /// Refuses sections that do not belong to the model's format, rather
    /// than ignoring them: a tensor model has no `[generation]`, a text
    /// model no `[batching]`, `[limits]` or `[embedding]`.
    pub fn check(&self) -> Result<(), String> {
        if self.lora.is_some() && self.format != ModelFormat::Gguf {
            return Err("[lora] adapters are of GGUF text models: format = \"gguf\"".into());
        }
        if self.lora.is_some() && self.generation.is_some() {
            return Err(
                "a LoRA adapter runs with its base model's [generation]: remove it here".into(),
            );
        }
        if self.lora.as_ref().is_some_and(|l| !l.scale.is_finite()) {
            return Err("[lora] scale must be a number".into());
        }
        if self.pin && self.idle_unload_after_secs.is_some() {
            return Err(
                "a model with pin = true is never unloaded: remove idle_unload_after_secs".into(),
            );
        }
        let foreign: &[(&str, bool)] = match self.format {
            ModelFormat::Onnx => &[("[generation]", self.generation.is_some())],
            ModelFormat::Gguf => &[
                ("[batching]", self.batching.is_some()),
                ("[limits]", self.limits.is_some()),
                ("[embedding]", self.embedding.is_some()),
            ],
        };
        let present: Vec<&str> = foreign
            .iter()
            .filter(|(_, has)| *has)
            .map(|(s, _)| *s)
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        let (format, belongs) = match self.format {
            ModelFormat::Onnx => ("an ONNX model", "[generation] is for GGUF text models"),
            ModelFormat::Gguf => (
                "a GGUF text model",
                "[batching], [limits] and [embedding] are for ONNX tensor models; text models batch per [generation]",
            ),
        };
        Err(format!(
            "{format} cannot have {}: {belongs}",
            present.join(", ")
        ))
    }
}

/// A model file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// An ONNX graph, run with ONNX Runtime or tract.
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
    fn refuses_sections_of_another_format() {
        let onnx: ModelConfig =
            toml::from_str("format = \"onnx\"\n[generation]\nmax_sequences = 2").unwrap();
        let error = onnx.check().unwrap_err();
        assert!(
            error.contains("an ONNX model cannot have [generation]"),
            "{error}"
        );
        let gguf: ModelConfig =
            toml::from_str("format = \"gguf\"\n[batching]\nmax_batch = 2").unwrap();
        let error = gguf.check().unwrap_err();
        assert!(
            error.contains("a GGUF text model cannot have [batching]"),
            "{error}"
        );
        let pinned: ModelConfig =
            toml::from_str("format = \"onnx\"\npin = true\nidle_unload_after_secs = 60").unwrap();
        let error = pinned.check().unwrap_err();
        assert!(error.contains("pin = true is never unloaded"), "{error}");
        let plain: ModelConfig = toml::from_str("format = \"onnx\"").unwrap();
        assert_eq!(plain.engine, "auto");
        plain.check().unwrap();
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
