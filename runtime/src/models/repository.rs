//! The operator's model repository: `<dir>/<name>/model.toml` and the
//! model files, each model with its engine, its state and what
//! `GET /v1/models` shows of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::sync::OnceCell;

use super::batcher::{BatchConfig, Batcher};
use super::config::{LoadPolicy, ModelConfig, ModelFormat};
use super::embedding::{Embedder, EmbeddingConfig};
use super::engines::{Engine, Engines};
use super::graph::{Graph, TensorSpec};
use super::limits::{InputLimits, ShapeCaps};
use super::stats::{ModelStats, StatsSnapshot};
use crate::llm::{TextInfo, TextModel};

/// A graph as callers hold it: the loaded graph, the model's batching
/// queue if it has one, and its counters if it is a repository model.
#[derive(Clone)]
pub struct PoolGraph {
    pub(super) graph: Arc<dyn Graph>,
    pub(super) batcher: Option<Arc<Batcher>>,
    pub(super) stats: Option<Arc<ModelStats>>,
    /// Repository models with `[embedding]`: their tokenizer and pooling.
    pub(super) embedder: Option<Arc<Embedder>>,
    /// Repository models with `[limits]`: the largest shape of each input.
    pub(super) caps: Option<Arc<ShapeCaps>>,
}

impl PoolGraph {
    /// The loaded graph itself, to run without the pool (benchmarks).
    pub fn graph(&self) -> &Arc<dyn Graph> {
        &self.graph
    }

    /// A function's own graph: no batching, counters or limits.
    pub(super) fn own(graph: Arc<dyn Graph>) -> Self {
        Self {
            graph,
            batcher: None,
            stats: None,
            embedder: None,
            caps: None,
        }
    }
}

/// A loaded repository model: a tensor graph (wasi-nn) or a text model
/// (gigafactory:ai `generate`).
#[derive(Clone)]
pub(super) enum Resident {
    Graph(PoolGraph),
    Text(Arc<TextModel>),
}

impl Resident {
    pub(super) fn device(&self) -> &str {
        match self {
            Resident::Graph(graph) => graph.graph.device(),
            Resident::Text(text) => text.device(),
        }
    }
}

/// How loading a model ended.
pub(super) struct Outcome {
    pub(super) model: Result<Resident, String>,
    pub(super) load_ms: u64,
}

/// One model of the repository.
pub(super) struct RepositoryModel {
    pub(super) name: String,
    pub(super) config: ModelConfig,
    pub(super) file: PathBuf,
    pub(super) stats: Arc<ModelStats>,
    size_bytes: u64,
    /// The engine that loads it, or why there is none.
    pub(super) engine: Result<Arc<dyn Engine>, String>,
    /// Set once loaded (or failed); empty until first use for `first-use` models.
    pub(super) loaded: OnceCell<Outcome>,
    pub(super) loading: AtomicBool,
}

/// What `GET /v1/models` shows of one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The name functions pass to `load-by-name`.
    pub name: String,
    /// The operator's description.
    pub description: String,
    /// The file format.
    pub format: ModelFormat,
    /// The engine that runs it (`onnxruntime`, `tract`, `llama.cpp`), or
    /// the one `model.toml` asks for when there is none.
    pub engine: String,
    /// What the model does.
    pub task: Option<String>,
    /// Where it runs: `cpu` or `cuda:N` (empty when it failed).
    pub device: String,
    /// Whether every tenant may use it.
    pub public: bool,
    /// `unloaded` (a `first-use` model nobody used yet), `loading`, `ready` or `failed`.
    pub state: &'static str,
    /// When it loads: `boot` or `first-use`.
    pub load: LoadPolicy,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Memory it takes where it runs: weights (as the engine holds them),
    /// and a text model's KV cache (0 when it failed).
    pub memory_bytes: u64,
    /// Its dynamic batching settings, when it batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batching: Option<BatchConfig>,
    /// What it has done since start (tensor models).
    pub stats: StatsSnapshot,
    /// Text models: their `[generation]` settings and counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<TextInfo>,
    /// Sentence-embedding models: their `[embedding]` settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<EmbeddingConfig>,
    /// The largest input shapes a call may send (`[limits]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<InputLimits>,
    /// The graph's inputs.
    pub inputs: Vec<TensorSpec>,
    /// The graph's outputs.
    pub outputs: Vec<TensorSpec>,
    /// Size of the model file.
    pub size_bytes: u64,
    /// How long loading and optimising took.
    pub load_ms: u64,
}

impl RepositoryModel {
    /// Reads `model.toml` in `dir` and picks the model's engine; an
    /// unreadable file skips the model, a config its format refuses or an
    /// engine that cannot run leaves it listed as `failed` with the reason.
    pub(super) fn read(name: &str, dir: &Path, engines: &Engines) -> Result<Self> {
        let toml_path = dir.join("model.toml");
        let text = std::fs::read_to_string(&toml_path)
            .with_context(|| format!("reading {}", toml_path.display()))?;
        let config: ModelConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", toml_path.display()))?;
        let file = dir.join(&config.file);
        let size_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let engine = config
            .check()
            .and_then(|()| engines.choose(config.format, &config.engine));
        let model = Self {
            name: name.to_string(),
            config,
            file,
            stats: Arc::new(ModelStats::default()),
            size_bytes,
            loaded: OnceCell::new(),
            loading: AtomicBool::new(false),
            engine,
        };
        if let Err(why) = &model.engine {
            tracing::error!(model = %name, "model refused: {why}");
            let _ = model.loaded.set(Outcome {
                model: Err(why.clone()),
                load_ms: 0,
            });
        }
        Ok(model)
    }

    pub(super) fn queued(&self) -> usize {
        match self.resident() {
            Some(Resident::Graph(PoolGraph {
                batcher: Some(batcher),
                ..
            })) => batcher.queued(),
            _ => 0,
        }
    }

    /// The loaded model, once it loaded.
    pub(super) fn resident(&self) -> Option<&Resident> {
        self.loaded.get().and_then(|l| l.model.as_ref().ok())
    }

    pub(super) fn info(&self) -> ModelInfo {
        let (state, error) = match self.loaded.get().map(|l| &l.model) {
            None if self.loading.load(Ordering::Relaxed) => ("loading", None),
            None => ("unloaded", None),
            Some(Ok(_)) => ("ready", None),
            Some(Err(reason)) => ("failed", Some(reason.clone())),
        };
        let (mut inputs, mut outputs, mut memory_bytes, mut device) =
            (vec![], vec![], 0, String::new());
        let (mut batching, mut generation) = (None, None);
        match self.resident() {
            Some(Resident::Text(text)) => {
                memory_bytes = text.memory_bytes();
                device = text.device().to_string();
                generation = Some(text.info());
            }
            Some(Resident::Graph(graph)) => {
                inputs = graph.graph.inputs().to_vec();
                outputs = graph.graph.outputs().to_vec();
                memory_bytes = graph.graph.memory_bytes();
                device = graph.graph.device().to_string();
                batching = graph.batcher.as_ref().and(self.config.batching.clone());
            }
            None => {}
        }
        ModelInfo {
            name: self.name.clone(),
            description: self.config.description.clone(),
            format: self.config.format,
            engine: match &self.engine {
                Ok(engine) => engine.name().to_string(),
                Err(_) => self.config.engine.clone(),
            },
            task: self.config.task.clone(),
            device,
            public: self.config.public,
            state,
            load: self.config.load,
            error,
            memory_bytes,
            batching,
            stats: self.stats.snapshot(self.queued()),
            generation,
            embedding: self.config.embedding.clone(),
            limits: self.config.limits.clone(),
            inputs,
            outputs,
            size_bytes: self.size_bytes,
            load_ms: self.loaded.get().map_or(0, |l| l.load_ms),
        }
    }
}

/// The directories of `dir` that hold a `model.toml`, sorted.
pub(super) fn model_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading the model repository {}", dir.display()))?;
    let mut dirs = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.join("model.toml").is_file() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}
