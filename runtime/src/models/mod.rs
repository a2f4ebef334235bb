//! The model pool: every repository model loaded and optimised once at
//! boot, then shared by all tenants; inference runs on a worker pool sized
//! to the cores, so guests await it without holding an async worker.

mod batcher;
mod config;
mod embedding;
mod error;
mod limits;
mod onnx;
mod stats;
mod tenant;
mod tensor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;

use crate::devices::Devices;
use crate::llm::{TextInfo, TextModel};
use serde::Serialize;
use tokio::sync::{OnceCell, Semaphore};

pub use batcher::{BatchConfig, Batcher, Pad, SliceBack};

/// An outcome and the run time to charge for it, spent whether it
/// succeeded or not.
pub type Charged<T> = (Result<T, NnError>, Duration);
pub use config::{DevicePreference, LoadPolicy, ModelConfig, ModelFormat};
pub use embedding::{Embedder, EmbeddingConfig, Embeddings, MAX_TEXTS, Pooling};
pub use error::{BUSY_PREFIX, ErrorCode, NnError};
pub use limits::{InputLimits, ShapeCaps};
pub use onnx::{OnnxGraph, TensorSpec, TypedGraph};
pub use stats::{ModelStats, StatsSnapshot};
pub use tenant::TenantGraphStats;
pub use tensor::{ElementType, HostTensor};

/// The share of each GPU's free memory repository models may take.
pub const DEFAULT_GPU_BUDGET: f64 = 0.9;

/// Texts per model call for `embed` when the model does not batch.
const DEFAULT_EMBED_ROWS: usize = 32;

/// Model calls one `embed` keeps in flight.
const EMBED_CALLS_IN_FLIGHT: usize = 4;

/// The largest ONNX graph a function may pass to `load`.
pub const MAX_GUEST_GRAPH_BYTES: usize = 256 * 1024 * 1024;

/// All models of the operator's repository, plus the inference workers.
pub struct ModelPool {
    models: BTreeMap<String, RepositoryModel>,
    devices: Arc<Devices>,
    workers: Arc<Semaphore>,
    workers_count: usize,
    /// Each tenant's slots in front of the workers (see `on_worker`).
    tenant_workers: Mutex<std::collections::HashMap<Arc<str>, Arc<Semaphore>>>,
    /// Whether repository models batch (`serve --no-batching` turns it off).
    batching: bool,
    tenant_graphs: Mutex<tenant::TenantGraphs>,
}

/// A graph as callers hold it: the plan, the model's batching queue if it
/// has one, and its counters if it is a repository model.
#[derive(Clone)]
pub struct PoolGraph {
    graph: Arc<OnnxGraph>,
    batcher: Option<Arc<Batcher>>,
    stats: Option<Arc<ModelStats>>,
    /// Repository models with `[embedding]`: their tokenizer and pooling.
    embedder: Option<Arc<Embedder>>,
    /// Repository models with `[limits]`: the largest shape of each input.
    caps: Option<Arc<ShapeCaps>>,
}

struct RepositoryModel {
    name: String,
    config: ModelConfig,
    file: PathBuf,
    stats: Arc<ModelStats>,
    size_bytes: u64,
    /// Set once loaded (or failed); empty until first use for `first-use` models.
    loaded: OnceCell<Loaded>,
    loading: AtomicBool,
}

struct Loaded {
    model: Result<Resident, String>,
    load_ms: u64,
}

/// A loaded repository model: a tensor graph (wasi-nn) or a text model
/// (gigafactory:ai `generate`).
#[derive(Clone)]
enum Resident {
    Graph(PoolGraph),
    Text(Arc<TextModel>),
}

/// What loading produced, before the pool wires it up.
enum Prepared {
    Graph(Arc<OnnxGraph>, Option<Arc<Embedder>>),
    Text(Arc<TextModel>),
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
    /// Memory it takes where it runs: weights, and a text model's KV cache
    /// (0 when it failed).
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

impl ModelPool {
    /// A pool with no repository models (functions may still `load` their own).
    pub fn empty(workers: usize) -> Self {
        Self {
            models: BTreeMap::new(),
            devices: Arc::new(Devices::discover(DEFAULT_GPU_BUDGET)),
            workers: Arc::new(Semaphore::new(workers.max(1))),
            workers_count: workers.max(1),
            tenant_workers: Mutex::default(),
            batching: false,
            tenant_graphs: Mutex::default(),
        }
    }

    /// Reads every `<dir>/<name>/model.toml` and loads the `boot` models;
    /// `first-use` models load when a function first asks for them. A model
    /// that fails to load is kept with its reason (and logged); only an
    /// unreadable directory fails. With `batching` off, models ignore their
    /// `[batching]` section. Call it inside a tokio runtime: batching models
    /// start a scheduler task.
    pub fn load_repository(dir: &Path, workers: usize, batching: bool) -> Result<Self> {
        let mut pool = Self::empty(workers);
        pool.batching = batching;
        for model_dir in model_dirs(dir)? {
            let name = model_dir
                .file_name()
                .and_then(|n| n.to_str())
                .context("model directory name is not UTF-8")?
                .to_string();
            let model = match RepositoryModel::read(&name, &model_dir) {
                Ok(model) => model,
                Err(e) => {
                    tracing::error!(model = %name, "skipping model: {e:#}");
                    continue;
                }
            };
            if model.config.load == LoadPolicy::Boot {
                tracing::info!(model = %name, "loading model");
                let started = Instant::now();
                let prepared = prepare(&name, &model.file, &model.config, &pool.devices);
                let loaded = pool.finish_load(&model, prepared, started);
                let _ = model.loaded.set(loaded);
            } else {
                tracing::info!(model = %name, "model loads on first use");
            }
            pool.models.insert(name, model);
        }
        Ok(pool)
    }

    /// Whether the repository has a model by that name (loaded or not).
    pub fn has(&self, name: &str) -> bool {
        self.models.contains_key(name)
    }

    /// A repository tensor model by name, loaded on first use if it must
    /// be: `not-found` when there is none, `unsupported-operation` for a
    /// text model, a `runtime-error` when it failed to load.
    pub async fn get(&self, name: &str) -> Result<PoolGraph, NnError> {
        match self.resident(name).await? {
            Resident::Graph(graph) => Ok(graph),
            Resident::Text(_) => Err(NnError::unsupported(format!(
                "{name:?} is a text-generation model: use gigafactory:ai generate"
            ))),
        }
    }

    /// A repository text model by name, loaded on first use if it must be;
    /// errors as for [`Self::get`].
    pub async fn text(&self, name: &str) -> Result<Arc<TextModel>, NnError> {
        match self.resident(name).await? {
            Resident::Text(model) => Ok(model),
            Resident::Graph(_) => Err(NnError::unsupported(format!(
                "{name:?} is not a text-generation model"
            ))),
        }
    }

    async fn resident(&self, name: &str) -> Result<Resident, NnError> {
        let model = self
            .models
            .get(name)
            .ok_or_else(|| NnError::new(ErrorCode::NotFound, format!("no model named {name:?}")))?;
        let loaded = model
            .loaded
            .get_or_init(|| async {
                tracing::info!(model = %name, "loading model on first use");
                model.loading.store(true, Ordering::Relaxed);
                let started = Instant::now();
                let (name, file) = (model.name.clone(), model.file.clone());
                let (config, devices) = (model.config.clone(), self.devices.clone());
                let prepared = self
                    .on_worker(None, move || Ok(prepare(&name, &file, &config, &devices)))
                    .await
                    .unwrap_or_else(|e| Err(e.message));
                self.finish_load(model, prepared, started)
            })
            .await;
        loaded.model.clone().map_err(|reason| {
            NnError::new(
                ErrorCode::RuntimeError,
                format!("model {name:?} failed to load: {reason}"),
            )
        })
    }

    /// Starts a loaded graph's batcher (when it batches) and logs the outcome.
    fn finish_load(
        &self,
        model: &RepositoryModel,
        prepared: Result<Prepared, String>,
        started: Instant,
    ) -> Loaded {
        let resident = prepared.and_then(|prepared| {
            let (graph, embedder) = match prepared {
                Prepared::Text(model) => return Ok(Resident::Text(model)),
                Prepared::Graph(graph, embedder) => (graph, embedder),
            };
            let caps = match &model.config.limits {
                Some(limits) => Some(Arc::new(ShapeCaps::new(limits, graph.inputs())?)),
                None => None,
            };
            let batcher = match (&model.config.batching, self.batching) {
                (Some(batching), true) => Some(Arc::new(Batcher::start(
                    graph.clone(),
                    batching.clone(),
                    self.workers.clone(),
                    model.stats.clone(),
                    caps.clone(),
                )?)),
                _ => None,
            };
            Ok(Resident::Graph(PoolGraph {
                graph,
                batcher,
                stats: Some(model.stats.clone()),
                embedder,
                caps,
            }))
        });
        let load_ms = started.elapsed().as_millis() as u64;
        match &resident {
            Ok(resident) => tracing::info!(
                model = %model.name,
                device = resident.device(),
                ms = load_ms,
                "model ready"
            ),
            Err(e) => tracing::error!(model = %model.name, "model failed: {e}"),
        }
        Loaded {
            model: resident,
            load_ms,
        }
    }

    /// A function's own ONNX graph, compiled on a worker once per content
    /// hash and cached for its `tenant`, whose cached graphs may hold at most
    /// `budget` bytes of weights (least recently used ones are evicted).
    pub async fn load_bytes(
        &self,
        bytes: Vec<u8>,
        tenant: &Arc<str>,
        budget: u64,
    ) -> Result<PoolGraph, NnError> {
        if bytes.len() > MAX_GUEST_GRAPH_BYTES {
            return Err(NnError::new(
                ErrorCode::TooLarge,
                format!(
                    "graph of {} bytes, the limit is {MAX_GUEST_GRAPH_BYTES}",
                    bytes.len()
                ),
            ));
        }
        let hash = tenant::content_hash(&bytes);
        if let Some(graph) = self.tenant_graphs().get(tenant, &hash) {
            return Ok(PoolGraph {
                graph,
                batcher: None,
                stats: None,
                embedder: None,
                caps: None,
            });
        }
        let size = bytes.len() as u64;
        let graph = self
            .on_worker(Some(tenant), move || {
                OnnxGraph::from_bytes(&bytes)
                    .map_err(|e| NnError::new(ErrorCode::InvalidEncoding, format!("{e:#}")))
            })
            .await?;
        let cost = graph.weight_bytes().max(size);
        self.tenant_graphs()
            .insert(tenant, hash, graph.clone(), cost, budget)?;
        Ok(PoolGraph {
            graph,
            batcher: None,
            stats: None,
            embedder: None,
            caps: None,
        })
    }

    /// `tenant`'s slots on the inference workers.
    fn tenant_workers(&self, tenant: &Arc<str>) -> Arc<Semaphore> {
        let mut slots = self
            .tenant_workers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slots
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.workers_count)))
            .clone()
    }

    fn tenant_graphs(&self) -> std::sync::MutexGuard<'_, tenant::TenantGraphs> {
        self.tenant_graphs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `tenant`'s graph cache holds.
    pub fn tenant_graph_stats(&self, tenant: &str) -> TenantGraphStats {
        self.tenant_graphs().stats(tenant)
    }

    /// Drops a deleted tenant's cached graphs and its per-tenant counters.
    pub fn forget_tenant(&self, tenant: &str) {
        self.tenant_graphs().forget(tenant);
        let mut slots = self
            .tenant_workers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slots.remove(tenant);
        drop(slots);
        for model in self.models.values() {
            model.stats.forget_tenant(tenant);
            if let Some(Ok(Resident::Text(text))) = model.loaded.get().map(|l| &l.model) {
                text.stats().forget_tenant(tenant);
            }
        }
    }

    /// Runs `graph` on named inputs — in a batch with other callers' when
    /// the model batches — and returns its named outputs, with the run time
    /// to charge to this call whether it succeeded or not (its share of the
    /// batch, or its own run; not counting the wait).
    pub async fn compute(
        &self,
        graph: PoolGraph,
        inputs: Vec<(String, HostTensor)>,
        tenant: Arc<str>,
    ) -> Charged<Vec<(String, HostTensor)>> {
        let checked = graph.graph.order(inputs).and_then(|ordered| {
            if let Some(caps) = &graph.caps {
                caps.check(graph.graph.inputs(), &ordered)?;
            }
            Ok(ordered)
        });
        let ordered = match checked {
            Ok(ordered) => ordered,
            Err(error) => return (Err(error), Duration::ZERO),
        };
        if let Some(batcher) = &graph.batcher {
            return batcher.compute(tenant, ordered).await;
        }
        let rows = ordered
            .first()
            .and_then(|t| t.dims.first())
            .map_or(1, |&rows| rows as usize);
        let plan = graph.graph;
        let arrived = Instant::now();
        let ran = self
            .on_worker(Some(&tenant), move || {
                let started = Instant::now();
                let result = plan.inputs_of(ordered).and_then(|inputs| {
                    plan.run(inputs)
                        .map_err(|e| NnError::new(ErrorCode::RuntimeError, format!("{e:#}")))
                });
                Ok((result, started.elapsed(), started - arrived))
            })
            .await;
        let (result, spent, waited) = match ran {
            Ok(ran) => ran,
            Err(error) => return (Err(error), Duration::ZERO),
        };
        if let Some(stats) = &graph.stats {
            stats.waited(waited);
            stats.ran(rows, spent, usize::from(result.is_err()));
            stats.charge(&tenant, spent);
        }
        (result, spent)
    }

    /// Embeds `texts` with the repository model `name`, which must have an
    /// `[embedding]` section: tokenised on a blocking thread, run in calls
    /// of at most one batch of texts each, a few at a time (batched with
    /// other callers' calls when the model batches), pooled into one vector
    /// per text. Also returns the run time to charge to the caller, spent
    /// even when a later call failed.
    pub async fn embed(
        &self,
        name: &str,
        texts: &[String],
        tenant: Arc<str>,
    ) -> (Result<Embeddings, NnError>, Duration) {
        let mut spent = Duration::ZERO;
        let result = self.embed_charging(name, texts, tenant, &mut spent).await;
        (result, spent)
    }

    async fn embed_charging(
        &self,
        name: &str,
        texts: &[String],
        tenant: Arc<str>,
        spent: &mut Duration,
    ) -> Result<Embeddings, NnError> {
        if texts.is_empty() || texts.len() > MAX_TEXTS {
            return Err(NnError::invalid(format!(
                "send between 1 and {MAX_TEXTS} texts, not {}",
                texts.len()
            )));
        }
        let model = self
            .models
            .get(name)
            .ok_or_else(|| NnError::new(ErrorCode::NotFound, format!("no model named {name:?}")))?;
        if model.config.embedding.is_none() {
            return Err(NnError::unsupported(format!(
                "{name:?} does not make sentence embeddings (its model.toml has no [embedding])"
            )));
        }
        let graph = self.get(name).await?;
        let embedder = graph.embedder.clone().ok_or_else(|| {
            NnError::new(
                ErrorCode::RuntimeError,
                format!("{name:?} has no tokenizer"),
            )
        })?;
        let rows = model
            .config
            .batching
            .as_ref()
            .map_or(DEFAULT_EMBED_ROWS, |batching| batching.max_batch);
        // A call holds at most what the model's `[limits]` let one call hold.
        let tokens = model
            .config
            .limits
            .as_ref()
            .and_then(|limits| limits.max_elements.get("input_ids"))
            .map_or(usize::MAX, |&most| most as usize);
        let mut chunks = {
            let (embedder, texts) = (embedder.clone(), texts.to_vec());
            tokio::task::spawn_blocking(move || embedder.chunks(&texts, rows, tokens))
                .await
                .map_err(|e| NnError::new(ErrorCode::RuntimeError, format!("tokenising: {e}")))?
        };
        let inputs: Vec<_> = chunks
            .iter_mut()
            .map(|chunk| std::mem::take(&mut chunk.inputs))
            .collect();
        // A few calls in flight: enough to fill batches, without one caller
        // taking every worker or its whole queue share at once.
        let mut results = futures_util::stream::iter(inputs)
            .map(|inputs| self.compute(graph.clone(), inputs, tenant.clone()))
            .buffered(EMBED_CALLS_IN_FLIGHT);
        let mut vectors = vec![Vec::new(); texts.len()];
        for chunk in &chunks {
            let (outputs, time) = results.next().await.expect("one result per chunk");
            *spent += time;
            let outputs = outputs?;
            for (&index, vector) in chunk.indices.iter().zip(embedder.pool(chunk, &outputs)?) {
                vectors[index] = vector;
            }
        }
        let tokens = chunks.iter().map(|c| c.tokens() as u64).sum();
        Ok(Embeddings { vectors, tokens })
    }

    /// Runs `job` on an inference worker. `tenant`'s jobs first take one
    /// of the tenant's own slots (as many as there are workers), so the
    /// workers' first-come queue holds at most that many jobs of any one
    /// tenant: a tenant flooding unbatched models waits behind itself.
    async fn on_worker<T: Send + 'static>(
        &self,
        tenant: Option<&Arc<str>>,
        job: impl FnOnce() -> Result<T, NnError> + Send + 'static,
    ) -> Result<T, NnError> {
        let stopped = |_| NnError::new(ErrorCode::RuntimeError, "the model pool is shutting down");
        let mine = match tenant {
            Some(tenant) => Some(
                self.tenant_workers(tenant)
                    .acquire_owned()
                    .await
                    .map_err(stopped)?,
            ),
            None => None,
        };
        let permit = self
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(stopped)?;
        // The job holds the permits until it ends, even when its caller
        // leaves (a started run cannot be stopped, and must stay counted).
        let job = move || {
            let _held = (mine, permit);
            job()
        };
        tokio::task::spawn_blocking(job).await.unwrap_or_else(|e| {
            Err(NnError::new(
                ErrorCode::RuntimeError,
                format!("inference worker failed: {e}"),
            ))
        })
    }

    /// The machine's devices and what models take of them.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// Every repository model with its state, by name.
    pub fn list(&self) -> Vec<ModelInfo> {
        self.models
            .iter()
            .map(|(name, model)| model.info(name))
            .collect()
    }

    /// Appends the pool's Prometheus series: per model calls, rejections,
    /// queue depth, batch sizes, queue wait, compute time and compute
    /// seconds per tenant; per tenant the graph cache.
    pub fn render_metrics(&self, out: &mut String) {
        let models: Vec<(&str, &ModelStats, usize)> = self
            .models
            .iter()
            .filter(|(_, model)| model.config.format == ModelFormat::Onnx)
            .map(|(name, model)| (name.as_str(), &*model.stats, model.queued()))
            .collect();
        stats::render(out, &models);
        let text: Vec<(&str, &TextModel)> = self
            .models
            .iter()
            .filter_map(|(name, model)| match model.loaded.get().map(|l| &l.model) {
                Some(Ok(Resident::Text(text))) => Some((name.as_str(), &**text)),
                _ => None,
            })
            .collect();
        crate::llm::render_metrics(out, &text);
        self.tenant_graphs().render(out);
    }
}

impl RepositoryModel {
    /// Reads `model.toml` in `dir`; an error here skips the model.
    fn read(name: &str, dir: &Path) -> Result<Self> {
        let toml_path = dir.join("model.toml");
        let text = std::fs::read_to_string(&toml_path)
            .with_context(|| format!("reading {}", toml_path.display()))?;
        let config: ModelConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", toml_path.display()))?;
        let file = dir.join(&config.file);
        let size_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            name: name.to_string(),
            config,
            file,
            stats: Arc::new(ModelStats::default()),
            size_bytes,
            loaded: OnceCell::new(),
            loading: AtomicBool::new(false),
        })
    }

    fn queued(&self) -> usize {
        match self.loaded.get().map(|l| &l.model) {
            Some(Ok(Resident::Graph(PoolGraph {
                batcher: Some(batcher),
                ..
            }))) => batcher.queued(),
            _ => 0,
        }
    }

    fn info(&self, name: &str) -> ModelInfo {
        let not_loaded = || {
            let state = if self.loading.load(Ordering::Relaxed) {
                "loading"
            } else {
                "unloaded"
            };
            (state, None, vec![], vec![], 0, String::new())
        };
        let (state, error, inputs, outputs, memory_bytes, device) =
            match self.loaded.get().map(|l| &l.model) {
                None => not_loaded(),
                Some(Ok(Resident::Text(text))) => (
                    "ready",
                    None,
                    vec![],
                    vec![],
                    text.memory_bytes(),
                    text.device().to_string(),
                ),
                Some(Ok(Resident::Graph(graph))) => (
                    "ready",
                    None,
                    graph.graph.inputs().to_vec(),
                    graph.graph.outputs().to_vec(),
                    graph.graph.weight_bytes(),
                    graph.graph.device().to_string(),
                ),
                Some(Err(reason)) => (
                    "failed",
                    Some(reason.clone()),
                    vec![],
                    vec![],
                    0,
                    String::new(),
                ),
            };
        let batching = match self.loaded.get().map(|l| &l.model) {
            Some(Ok(Resident::Graph(PoolGraph {
                batcher: Some(_), ..
            }))) => self.config.batching.clone(),
            _ => None,
        };
        let generation = match self.loaded.get().map(|l| &l.model) {
            Some(Ok(Resident::Text(text))) => Some(text.info()),
            _ => None,
        };
        ModelInfo {
            name: name.to_string(),
            description: self.config.description.clone(),
            format: self.config.format,
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

/// Loads the graph at `file` and places it where `preference` and the
/// devices' budgets allow: `auto` falls back to the CPU (saying why), `gpu`
/// fails without a GPU.
fn place(
    name: &str,
    file: &Path,
    preference: DevicePreference,
    devices: &Devices,
) -> Result<Arc<OnnxGraph>, String> {
    let typed = TypedGraph::from_path(file).map_err(|e| format!("{e:#}"))?;
    let bytes = typed.weight_bytes();
    let device = match preference {
        DevicePreference::Cpu => "cpu".to_string(),
        DevicePreference::Gpu => devices
            .gpu_with_room(bytes)
            .map_err(|why| format!("device = \"gpu\": {why}"))?,
        DevicePreference::Auto => devices.gpu_with_room(bytes).unwrap_or_else(|why| {
            tracing::info!(model = %name, "device auto: on the CPU ({why})");
            "cpu".to_string()
        }),
    };
    let graph = match typed.place(&device) {
        Ok(graph) => graph,
        Err(e) if preference == DevicePreference::Auto && device != "cpu" => {
            tracing::warn!(model = %name, "device auto: {device} failed ({e:#}); on the CPU");
            TypedGraph::from_path(file)
                .and_then(|typed| typed.place("cpu"))
                .map_err(|e| format!("{e:#}"))?
        }
        Err(e) => return Err(format!("placing on {device}: {e:#}")),
    };
    devices.place(graph.device(), bytes);
    Ok(graph)
}

impl Resident {
    fn device(&self) -> &str {
        match self {
            Resident::Graph(graph) => graph.graph.device(),
            Resident::Text(text) => text.device(),
        }
    }
}

/// Where a text model needing `bytes` (weights and KV cache) goes: a GPU with room for them
/// when the build has llama.cpp's CUDA backend (`llm-cuda`) and the
/// preference allows, else the CPU (`gpu` fails instead).
fn text_device(
    name: &str,
    preference: DevicePreference,
    bytes: u64,
    devices: &Devices,
) -> Result<String, String> {
    match (preference, crate::llm::GPU_BUILD) {
        (DevicePreference::Cpu, _) | (DevicePreference::Auto, false) => Ok("cpu".into()),
        (DevicePreference::Gpu, false) => Err(
            "device = \"gpu\": this build runs text models on the CPU (build with the llm-cuda feature)"
                .into(),
        ),
        (DevicePreference::Gpu, true) => devices
            .gpu_with_room(bytes)
            .map_err(|why| format!("device = \"gpu\": {why}")),
        (DevicePreference::Auto, true) => Ok(devices.gpu_with_room(bytes).unwrap_or_else(|why| {
            tracing::info!(model = %name, "device auto: on the CPU ({why})");
            "cpu".into()
        })),
    }
}

/// Loads a repository model's file as its format says; blocking.
fn prepare(
    name: &str,
    file: &Path,
    config: &ModelConfig,
    devices: &Devices,
) -> Result<Prepared, String> {
    match config.format {
        ModelFormat::Onnx => {
            let graph = place(name, file, config.device, devices)?;
            let embedder = match &config.embedding {
                Some(embedding) => {
                    let dir = file.parent().unwrap_or(Path::new("."));
                    Some(Arc::new(Embedder::new(embedding.clone(), dir, &graph)?))
                }
                None => None,
            };
            Ok(Prepared::Graph(graph, embedder))
        }
        ModelFormat::Gguf => {
            let generation = config.generation.clone().unwrap_or_default();
            // Only a GPU build needs the size up front, to choose a device.
            let needs = if crate::llm::GPU_BUILD && config.device != DevicePreference::Cpu {
                crate::llm::estimate_memory(file, &generation)?
            } else {
                0
            };
            let device = text_device(name, config.device, needs, devices)?;
            let model = match TextModel::load(name, file, generation.clone(), &device) {
                Ok(model) => model,
                Err(e) if config.device == DevicePreference::Auto && device != "cpu" => {
                    tracing::warn!(model = %name, "device auto: {device} failed ({e}); on the CPU");
                    TextModel::load(name, file, generation, "cpu")?
                }
                Err(e) => return Err(e),
            };
            devices.place(model.device(), model.memory_bytes());
            Ok(Prepared::Text(model))
        }
    }
}
