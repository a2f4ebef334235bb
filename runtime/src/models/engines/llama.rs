//! The llama.cpp engine: GGUF text models with continuous batching (see
//! `crate::llm`), on the CPU or, in `llm-cuda` builds, on one GPU with
//! every layer and the KV cache.

use super::{Data, Engine, Loaded, Source};
use crate::llm::{GPU_BUILD, TextModel};
use crate::models::config::ModelFormat;

/// The llama.cpp engine.
pub struct LlamaCpp;

impl Engine for LlamaCpp {
    fn name(&self) -> &'static str {
        "llama.cpp"
    }

    fn format(&self) -> ModelFormat {
        ModelFormat::Gguf
    }

    fn gpu_support(&self) -> Result<(), String> {
        if GPU_BUILD {
            Ok(())
        } else {
            Err("this build runs text models on the CPU (build with the llm-cuda feature)".into())
        }
    }

    fn estimate(&self, source: &Source, _device: &str) -> Result<u64, String> {
        let Data::File(path) = source.data else {
            return Err("text models load from files".into());
        };
        let adapters: u64 = source
            .adapters
            .iter()
            .map(|a| std::fs::metadata(&a.path).map_or(0, |m| m.len()))
            .sum();
        Ok(
            crate::llm::estimate_memory(path, &source.generation.cloned().unwrap_or_default())?
                + adapters,
        )
    }

    fn load(&self, source: &Source, device: &str) -> Result<Loaded, String> {
        let Data::File(path) = source.data else {
            return Err("text models load from files".into());
        };
        let generation = source.generation.cloned().unwrap_or_default();
        let model = TextModel::load(source.name, path, generation, device, source.adapters)?;
        Ok(Loaded::Text(model))
    }
}
