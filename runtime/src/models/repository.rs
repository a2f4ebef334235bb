//! The operator's model repository: `<dir>/<name>/model.toml` and the
//! model files, each model with its engine, its state and what
//! `GET /v1/models` shows of it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{Context as _, Result};
use serde::Serialize;

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
    /// The repository model's name, for spans.
    pub(super) name: Arc<str>,
    pub(super) graph: Arc<dyn Graph>,
    pub(super) batcher: Option<Arc<Batcher>>,
    pub(super) stats: Option<Arc<ModelStats>>,
    /// Repository models with `[embedding]`: their tokenizer and pooling.
    pub(super) embedder: Option<Arc<Embedder>>,
    /// Repository models with `[limits]`: the largest shape of each input.
    pub(super) caps: Option<Arc<ShapeCaps>>,
    /// Held by every holder of this graph: while another holds it, the
    /// model is in use and is not unloaded.
    pub(super) lease: Arc<()>,
}

impl PoolGraph {
    /// The loaded graph itself, to run without the pool (benchmarks).
    pub fn graph(&self) -> &Arc<dyn Graph> {
        &self.graph
    }

    /// Its inputs' names, in order (witx wasi-nn sets inputs by index).
    pub fn input_names(&self) -> Vec<String> {
        self.graph
            .inputs()
            .iter()
            .map(|spec| spec.name.clone())
            .collect()
    }

    /// A function's own graph: no batching, counters or limits.
    pub(super) fn own(graph: Arc<dyn Graph>) -> Self {
        Self {
            name: "(the function's own)".into(),
            graph,
            batcher: None,
            stats: None,
            embedder: None,
            caps: None,
            lease: Arc::new(()),
        }
    }
}

/// A loaded repository model: a tensor graph (wasi-nn) or a text model
/// (gigafactory:ai `generate`).
#[derive(Clone)]
pub(crate) enum Resident {
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

    fn memory_bytes(&self) -> u64 {
        match self {
            Resident::Graph(graph) => graph.graph.memory_bytes(),
            Resident::Text(text) => text.memory_bytes(),
        }
    }

    /// Whether anyone but the repository holds it (a call, an instance's
    /// graph, a generation).
    fn in_use(&self) -> bool {
        match self {
            Resident::Graph(graph) => Arc::strong_count(&graph.lease) > 1,
            Resident::Text(text) => Arc::strong_count(text) > 1,
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
    /// Its catalog key: its name, or `tenant/name` for a private model.
    pub(super) name: String,
    /// The tenant a private model belongs to.
    pub(super) owner: Option<String>,
    /// Where it came from.
    pub(super) origin: super::Origin,
    /// Its `model.toml` and model file as read (see [`stamp`]), so a
    /// rescan can tell whether they changed.
    pub(super) stamp: String,
    /// The directory it was read from.
    pub(super) dir: PathBuf,
    pub(super) config: ModelConfig,
    pub(super) file: PathBuf,
    pub(super) stats: Arc<ModelStats>,
    size_bytes: u64,
    /// The engine that loads it, or why there is none.
    pub(super) engine: Result<Arc<dyn Engine>, String>,
    /// Whether it is loaded, and what it has been through.
    slot: Mutex<Slot>,
    /// Held while it loads, so one caller loads it and the others wait.
    pub(super) load_lock: Arc<tokio::sync::Mutex<()>>,
}

/// A repository model's state.
#[derive(Default)]
pub(super) struct Slot {
    /// How its last load ended; none before the first and after an unload.
    pub(super) outcome: Option<Outcome>,
    /// When a call last got it.
    pub(super) last_used: Option<Instant>,
    pub(super) loads: u64,
    pub(super) unloads: u64,
}

/// What `GET /v1/models` shows of one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The name functions pass to `load-by-name`.
    pub name: String,
    /// The tenant a private model belongs to (only it sees the model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// `directory` (the repository directory) or `api` (added through the
    /// API, with its version).
    pub origin: super::Origin,
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
    /// `unloaded` (a `first-use` model nobody used yet), `loading`,
    /// `ready`, `evicted` (unloaded after use; the next call loads it) or `failed`.
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
    /// How long its last load took (loading and optimising).
    pub load_ms: u64,
    /// For a LoRA adapter: its base model and scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<super::config::LoraConfig>,
    /// Whether it stays resident once loaded.
    pub pin: bool,
    /// Unloaded after this many seconds without a call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_unload_after_secs: Option<u64>,
    /// Times it loaded.
    pub loads: u64,
    /// Times it was unloaded (`evicted` until it loads again).
    pub unloads: u64,
    /// Seconds since a call last got it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_secs_ago: Option<f64>,
}

impl ModelInfo {
    /// Its key in the catalog: the name, `tenant/name` when private.
    pub fn key(&self) -> String {
        match &self.owner {
            Some(owner) => super::private_key(owner, &self.name),
            None => self.name.clone(),
        }
    }
}

impl RepositoryModel {
    /// Reads `model.toml` in `dir` and picks the model's engine; an
    /// unreadable file skips the model, a config its format refuses or an
    /// engine that cannot run leaves it listed as `failed` with the reason.
    pub(super) fn read(name: &str, dir: &Path, engines: &Engines) -> Result<Self> {
        Self::read_as(name, dir, engines, None)
    }

    /// [`Self::read`] of a model of `owner` (a tenant's private model: an
    /// ONNX one runs on the engine for functions' own graphs, as other
    /// graphs a tenant supplies do).
    pub(super) fn read_as(
        name: &str,
        dir: &Path,
        engines: &Engines,
        owner: Option<&str>,
    ) -> Result<Self> {
        let toml_path = dir.join("model.toml");
        let text = std::fs::read_to_string(&toml_path)
            .with_context(|| format!("reading {}", toml_path.display()))?;
        let mut config: ModelConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", toml_path.display()))?;
        if owner.is_some() {
            // A tenant's model takes shared memory only while it is used:
            // it loads when called, is never pinned, and is evicted like
            // any other.
            config.pin = false;
            config.load = LoadPolicy::FirstUse;
        }
        let file = dir.join(&config.file);
        let size_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let stamp = stamp(dir);
        let engine = config
            .check()
            .and_then(|()| engines.choose_for(config.format, &config.engine, owner.is_some()));
        let model = Self {
            name: name.to_string(),
            owner: owner.map(str::to_string),
            origin: super::Origin::Directory,
            stamp,
            dir: dir.to_path_buf(),
            config,
            file,
            stats: Arc::new(ModelStats::default()),
            size_bytes,
            slot: Mutex::default(),
            load_lock: Arc::default(),
            engine,
        };
        if let Err(why) = &model.engine {
            tracing::error!(model = %name, "model refused: {why}");
            model.slot().outcome = Some(Outcome {
                model: Err(why.clone()),
                load_ms: 0,
            });
        }
        Ok(model)
    }

    pub(super) fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loaded model for a call (marked as just used), its load's
    /// failure, or `None` when it is not loaded.
    pub(super) fn ready(&self) -> Option<Result<Resident, String>> {
        let mut slot = self.slot();
        let model = slot.outcome.as_ref()?.model.clone();
        slot.last_used = Some(Instant::now());
        Some(model)
    }

    /// Marks it as just used (a call of one of its adapters uses it).
    pub(super) fn touch(&self) {
        self.slot().last_used = Some(Instant::now());
    }

    /// For a LoRA adapter: lets go of its view of the base when nobody
    /// holds it (the next call makes a new one, at no cost), so that the
    /// base can be unloaded.
    /// (An adapter's view takes no device memory of its own.)
    pub(super) fn release_view(&self) {
        if self.config.lora.is_none() {
            return;
        }
        let mut slot = self.slot();
        if matches!(&slot.outcome, Some(Outcome { model: Ok(view), .. }) if !view.in_use()) {
            slot.outcome = None;
        }
    }

    /// Records how a load ended.
    pub(super) fn loaded(&self, outcome: Outcome) {
        let mut slot = self.slot();
        slot.loads += u64::from(outcome.model.is_ok());
        slot.last_used = Some(Instant::now());
        slot.outcome = Some(outcome);
    }

    /// Unloads the model if it is loaded, nobody holds it and it is not
    /// pinned, giving its memory back to its device; whether it did.
    pub(super) fn unload_if_unused(&self, devices: &super::Devices) -> bool {
        self.unload(devices, false)
    }

    /// For a model taken out of the catalog: unloads it (pinned or not)
    /// once nobody holds it; whether it holds nothing any more.
    pub(super) fn unload_retired(&self, devices: &super::Devices) -> bool {
        // A load in flight will leave it loaded: wait for it to finish.
        if self.load_lock.try_lock().is_err() {
            return false;
        }
        self.unload(devices, true);
        !matches!(self.slot().outcome, Some(Outcome { model: Ok(_), .. }))
    }

    fn unload(&self, devices: &super::Devices, even_pinned: bool) -> bool {
        let mut slot = self.slot();
        let Some(Outcome {
            model: Ok(resident),
            ..
        }) = &slot.outcome
        else {
            return false;
        };
        if (self.config.pin && !even_pinned) || resident.in_use() {
            return false;
        }
        let (device, bytes) = (resident.device().to_string(), resident.memory_bytes());
        slot.outcome = None;
        slot.unloads += 1;
        drop(slot);
        devices.release(&device, bytes);
        tracing::info!(model = %self.name, device, "model unloaded");
        true
    }

    /// Where it is resident and what it takes there, when it could be
    /// unloaded now (loaded, not pinned, held by nobody).
    pub(super) fn evictable(&self) -> Option<(String, u64)> {
        let slot = self.slot();
        let resident = slot.outcome.as_ref()?.model.as_ref().ok()?;
        (!self.config.pin && !resident.in_use())
            .then(|| (resident.device().to_string(), resident.memory_bytes()))
    }

    /// Whether it has gone unused for its `idle_unload_after_secs`.
    pub(super) fn idle(&self, now: Instant) -> bool {
        let Some(after) = self.config.idle_unload_after_secs else {
            return false;
        };
        let slot = self.slot();
        slot.outcome.is_some()
            && slot
                .last_used
                .is_some_and(|used| now.duration_since(used).as_secs() >= after)
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

    /// The loaded model, if it is loaded (not marked as used).
    pub(super) fn resident(&self) -> Option<Resident> {
        self.slot()
            .outcome
            .as_ref()
            .and_then(|o| o.model.clone().ok())
    }

    pub(super) fn info(&self) -> ModelInfo {
        let (state, error, loads, unloads, last_used, load_ms) = {
            let slot = self.slot();
            let (state, error) = match slot.outcome.as_ref().map(|o| &o.model) {
                // A caller holds the load lock only to load it.
                None if self.load_lock.try_lock().is_err() => ("loading", None),
                None if slot.unloads > 0 => ("evicted", None),
                None => ("unloaded", None),
                Some(Ok(_)) => ("ready", None),
                Some(Err(reason)) => ("failed", Some(reason.clone())),
            };
            let last_used = slot.last_used.map(|used| used.elapsed().as_secs_f64());
            let load_ms = slot.outcome.as_ref().map_or(0, |o| o.load_ms);
            (state, error, slot.loads, slot.unloads, last_used, load_ms)
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
            name: super::split_key(&self.name).1.to_string(),
            owner: self.owner.clone(),
            origin: self.origin,
            description: self.config.description.clone(),
            format: self.config.format,
            engine: match &self.engine {
                Ok(engine) => engine.name().to_string(),
                Err(_) => self.config.engine.clone(),
            },
            task: self.config.task.clone(),
            device,
            // A tenant's private model is never public, whatever its config says.
            public: self.config.public && self.owner.is_none(),
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
            load_ms,
            lora: self.config.lora.clone(),
            pin: self.config.pin,
            idle_unload_after_secs: self.config.idle_unload_after_secs,
            loads,
            unloads,
            last_used_secs_ago: last_used,
        }
    }
}

/// What tells one state of a model directory from another: its
/// `model.toml` and the size and modification time of each file.
pub(super) fn stamp(dir: &Path) -> String {
    use std::fmt::Write as _;
    let mut stamp = std::fs::read_to_string(dir.join("model.toml")).unwrap_or_default();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        if let Ok(meta) = std::fs::metadata(&file) {
            let _ = write!(
                stamp,
                "\n{} {} {:?}",
                file.display(),
                meta.len(),
                meta.modified().ok()
            );
        }
    }
    stamp
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
