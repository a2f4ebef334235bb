//! The model pool: every repository model loaded and optimised once at
//! boot, then shared by all tenants; inference runs on a worker pool sized
//! to the cores, so guests await it without holding an async worker.

mod batcher;
mod config;
mod error;
mod onnx;
mod tensor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use tokio::sync::Semaphore;

pub use batcher::{BatchConfig, Batcher, Pad, SliceBack};
pub use config::{DevicePreference, ModelConfig, ModelFormat};
pub use error::{ErrorCode, NnError};
pub use onnx::{OnnxGraph, TensorSpec};
pub use tensor::{ElementType, HostTensor};

/// The largest ONNX graph a function may pass to `load`.
pub const MAX_GUEST_GRAPH_BYTES: usize = 256 * 1024 * 1024;

/// All models of the operator's repository, plus the inference workers.
pub struct ModelPool {
    models: BTreeMap<String, RepositoryModel>,
    workers: Arc<Semaphore>,
}

/// A graph as callers hold it: the plan, and the model's batching queue if it has one.
#[derive(Clone)]
pub struct PoolGraph {
    graph: Arc<OnnxGraph>,
    batcher: Option<Arc<Batcher>>,
}

struct RepositoryModel {
    config: ModelConfig,
    loaded: Result<PoolGraph, String>,
    size_bytes: u64,
    load_ms: u64,
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
    /// What the model does.
    pub task: Option<String>,
    /// Where it runs.
    pub device: &'static str,
    /// Whether every tenant may use it.
    pub public: bool,
    /// `ready` or `failed`.
    pub state: &'static str,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The graph's inputs.
    pub inputs: Vec<TensorSpec>,
    /// The graph's outputs.
    pub outputs: Vec<TensorSpec>,
    /// Size of the model file.
    pub size_bytes: u64,
    /// How long loading and optimising took.
    pub load_ms: u64,
}

impl ModelPool {
    /// A pool with no repository models (functions may still `load` their own).
    pub fn empty(workers: usize) -> Self {
        Self {
            models: BTreeMap::new(),
            workers: Arc::new(Semaphore::new(workers.max(1))),
        }
    }

    /// Loads every `<dir>/<name>/model.toml`. A model that fails to load is
    /// kept with its reason (and logged); only an unreadable directory fails.
    /// With `batching` off, models ignore their `[batching]` section.
    /// Call it inside a tokio runtime: batching models start a scheduler task.
    pub fn load_repository(dir: &Path, workers: usize, batching: bool) -> Result<Self> {
        let mut pool = Self::empty(workers);
        for model_dir in model_dirs(dir)? {
            let name = model_dir
                .file_name()
                .and_then(|n| n.to_str())
                .context("model directory name is not UTF-8")?
                .to_string();
            tracing::info!(model = %name, "loading model");
            match load_model(&model_dir, batching.then_some(&pool.workers)) {
                Ok(model) => {
                    match &model.loaded {
                        Ok(_) => tracing::info!(model = %name, ms = model.load_ms, "model ready"),
                        Err(e) => tracing::error!(model = %name, "model failed: {e}"),
                    }
                    pool.models.insert(name, model);
                }
                Err(e) => tracing::error!(model = %name, "skipping model: {e:#}"),
            }
        }
        Ok(pool)
    }

    /// A repository model by name: `not-found` when there is none, a
    /// `runtime-error` when it failed to load.
    pub fn get(&self, name: &str) -> Result<PoolGraph, NnError> {
        let model = self
            .models
            .get(name)
            .ok_or_else(|| NnError::new(ErrorCode::NotFound, format!("no model named {name:?}")))?;
        model.loaded.clone().map_err(|reason| {
            NnError::new(
                ErrorCode::RuntimeError,
                format!("model {name:?} failed to load: {reason}"),
            )
        })
    }

    /// Compiles a function's own ONNX graph on a worker.
    pub async fn load_bytes(&self, bytes: Vec<u8>) -> Result<PoolGraph, NnError> {
        if bytes.len() > MAX_GUEST_GRAPH_BYTES {
            return Err(NnError::new(
                ErrorCode::TooLarge,
                format!(
                    "graph of {} bytes, the limit is {MAX_GUEST_GRAPH_BYTES}",
                    bytes.len()
                ),
            ));
        }
        let graph = self
            .on_worker(move || {
                OnnxGraph::from_bytes(&bytes)
                    .map_err(|e| NnError::new(ErrorCode::InvalidEncoding, format!("{e:#}")))
            })
            .await?;
        Ok(PoolGraph {
            graph,
            batcher: None,
        })
    }

    /// Runs `graph` on named inputs — in a batch with other callers' when
    /// the model batches — and returns its named outputs and the run time
    /// charged to this call (its share of the batch; not counting the wait).
    pub async fn compute(
        &self,
        graph: PoolGraph,
        inputs: Vec<(String, HostTensor)>,
        tenant: Arc<str>,
    ) -> Result<(Vec<(String, HostTensor)>, Duration), NnError> {
        let ordered = graph.graph.order(inputs)?;
        if let Some(batcher) = &graph.batcher {
            return batcher.compute(tenant, ordered).await;
        }
        let plan = graph.graph;
        self.on_worker(move || {
            let started = Instant::now();
            let outputs = plan
                .run(plan.inputs_of(ordered)?)
                .map_err(|e| NnError::new(ErrorCode::RuntimeError, format!("{e:#}")))?;
            Ok((outputs, started.elapsed()))
        })
        .await
    }

    async fn on_worker<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> Result<T, NnError> + Send + 'static,
    ) -> Result<T, NnError> {
        let _permit = self.workers.acquire().await.map_err(|_| {
            NnError::new(ErrorCode::RuntimeError, "the model pool is shutting down")
        })?;
        tokio::task::spawn_blocking(job).await.unwrap_or_else(|e| {
            Err(NnError::new(
                ErrorCode::RuntimeError,
                format!("inference worker failed: {e}"),
            ))
        })
    }

    /// Every repository model with its state, by name.
    pub fn list(&self) -> Vec<ModelInfo> {
        self.models
            .iter()
            .map(|(name, model)| model.info(name))
            .collect()
    }
}

impl RepositoryModel {
    fn info(&self, name: &str) -> ModelInfo {
        let (state, error, inputs, outputs) = match &self.loaded {
            Ok(graph) => (
                "ready",
                None,
                graph.graph.inputs().to_vec(),
                graph.graph.outputs().to_vec(),
            ),
            Err(reason) => ("failed", Some(reason.clone()), vec![], vec![]),
        };
        ModelInfo {
            name: name.to_string(),
            description: self.config.description.clone(),
            format: self.config.format,
            task: self.config.task.clone(),
            device: "cpu",
            public: self.config.public,
            state,
            error,
            inputs,
            outputs,
            size_bytes: self.size_bytes,
            load_ms: self.load_ms,
        }
    }
}

fn model_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
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

/// Reads `model.toml` (an error here skips the model) and loads the graph
/// (an error here is kept as the model's failed state).
fn load_model(dir: &Path, batch_workers: Option<&Arc<Semaphore>>) -> Result<RepositoryModel> {
    let toml_path = dir.join("model.toml");
    let text = std::fs::read_to_string(&toml_path)
        .with_context(|| format!("reading {}", toml_path.display()))?;
    let config: ModelConfig =
        toml::from_str(&text).with_context(|| format!("parsing {}", toml_path.display()))?;
    let file = dir.join(&config.file);
    let size_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let started = Instant::now();
    let loaded = match config.device {
        DevicePreference::Gpu => Err("device = \"gpu\" but this build has no GPU backend".into()),
        DevicePreference::Auto | DevicePreference::Cpu => {
            OnnxGraph::from_path(&file).map_err(|e| format!("{e:#}"))
        }
    };
    let loaded = loaded.and_then(|graph| {
        let batcher = match (&config.batching, batch_workers) {
            (Some(batching), Some(workers)) => Some(Arc::new(Batcher::start(
                graph.clone(),
                batching.clone(),
                workers.clone(),
            )?)),
            _ => None,
        };
        Ok(PoolGraph { graph, batcher })
    });
    Ok(RepositoryModel {
        config,
        loaded,
        size_bytes,
        load_ms: started.elapsed().as_millis() as u64,
    })
}
