//! The model pool: every repository model loaded once (at boot or on
//! first use) by its engine, placed on a device, then shared by all
//! tenants; inference runs on a worker pool sized to the cores, so guests
//! await it without holding an async worker. Engines live in [`engines`]
//! behind one trait; this module is the catalog and the calls.

mod batcher;
mod config;
mod embedding;
pub mod engines;
mod error;
mod graph;
mod limits;
mod repository;
mod stats;
mod tenant;
mod tensor;
mod workers;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;

use crate::devices::Devices;
use crate::llm::TextModel;
use engines::{Data, Engines, Loaded, Source};
use repository::{Outcome, RepositoryModel, Resident};
use workers::Workers;

pub use batcher::{BatchConfig, Batcher, Pad, SliceBack};
pub use config::{DevicePreference, LoadPolicy, ModelConfig, ModelFormat};
pub use embedding::{Embedder, EmbeddingConfig, Embeddings, MAX_TEXTS, Pooling};
pub use engines::EngineOptions;
pub use error::{BUSY_PREFIX, ErrorCode, NnError};
pub use graph::{Graph, TensorSpec};
pub use limits::{InputLimits, ShapeCaps};
pub use repository::{ModelInfo, PoolGraph};
pub use stats::{ModelStats, StatsSnapshot};
pub use tenant::TenantGraphStats;
pub use tensor::{ElementType, HostTensor};

/// An outcome and the run time to charge for it, spent whether it
/// succeeded or not.
pub type Charged<T> = (Result<T, NnError>, Duration);

/// The share of each GPU's free memory repository models may take.
pub const DEFAULT_GPU_BUDGET: f64 = 0.9;

/// Texts per model call for `embed` when the model does not batch.
const DEFAULT_EMBED_ROWS: usize = 32;

/// Model calls one `embed` keeps in flight.
const EMBED_CALLS_IN_FLIGHT: usize = 4;

/// The largest ONNX graph a function may pass to `load`.
pub const MAX_GUEST_GRAPH_BYTES: usize = 256 * 1024 * 1024;

/// How the pool runs (`serve` flags).
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Inference workers: runs at once across all models (default: the cores).
    pub workers: usize,
    /// Whether repository models batch (`serve --no-batching` turns it off).
    pub batching: bool,
    /// Which engines run what.
    pub engines: EngineOptions,
}

impl Default for PoolOptions {
    fn default() -> Self {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            workers,
            batching: true,
            engines: EngineOptions {
                threads: workers,
                ..EngineOptions::default()
            },
        }
    }
}

/// All models of the operator's repository, the engines and the workers.
pub struct ModelPool {
    models: BTreeMap<String, RepositoryModel>,
    engines: Engines,
    devices: Arc<Devices>,
    workers: Workers,
    /// Whether repository models batch (`serve --no-batching` turns it off).
    batching: bool,
    tenant_graphs: Mutex<tenant::TenantGraphs>,
}

impl ModelPool {
    /// A pool with no repository models (functions may still `load` their own).
    pub fn new(options: &PoolOptions) -> Result<Self> {
        Ok(Self {
            models: BTreeMap::new(),
            engines: Engines::new(&options.engines).context("setting up the engines")?,
            devices: Arc::new(Devices::discover(DEFAULT_GPU_BUDGET)),
            workers: Workers::new(options.workers),
            batching: options.batching,
            tenant_graphs: Mutex::default(),
        })
    }

    /// Reads every `<dir>/<name>/model.toml` and loads the `boot` models;
    /// `first-use` models load when a function first asks for them. A model
    /// that fails to load is kept with its reason (and logged); only an
    /// unreadable directory (or an engine the operator named that cannot
    /// run) fails. Call it inside a tokio runtime: batching models start a
    /// scheduler task.
    pub fn load_repository(dir: &Path, options: &PoolOptions) -> Result<Self> {
        let mut pool = Self::new(options)?;
        for model_dir in repository::model_dirs(dir)? {
            let name = model_dir
                .file_name()
                .and_then(|n| n.to_str())
                .context("model directory name is not UTF-8")?
                .to_string();
            let model = match RepositoryModel::read(&name, &model_dir, &pool.engines) {
                Ok(model) => model,
                Err(e) => {
                    tracing::error!(model = %name, "skipping model: {e:#}");
                    continue;
                }
            };
            if model.loaded.get().is_some() {
                // Refused when read: listed as failed with the reason.
            } else if model.config.load == LoadPolicy::Boot {
                tracing::info!(model = %name, "loading model");
                let started = Instant::now();
                let loaded = load(&model, &pool.devices);
                let outcome = pool.finish_load(&model, loaded, started);
                let _ = model.loaded.set(outcome);
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
        let outcome = model
            .loaded
            .get_or_init(|| async {
                tracing::info!(model = %name, "loading model on first use");
                model
                    .loading
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let started = Instant::now();
                let loaded = self
                    .workers
                    .run(None, {
                        let job = LoadJob::of(model, &self.devices);
                        move || Ok(job.run())
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.message));
                self.finish_load(model, loaded, started)
            })
            .await;
        outcome.model.clone().map_err(|reason| {
            NnError::new(
                ErrorCode::RuntimeError,
                format!("model {name:?} failed to load: {reason}"),
            )
        })
    }

    /// Wires a loaded graph up (limits, batcher, tokenizer) and logs the outcome.
    fn finish_load(
        &self,
        model: &RepositoryModel,
        loaded: Result<Loaded, String>,
        started: Instant,
    ) -> Outcome {
        let resident = loaded.and_then(|loaded| match loaded {
            Loaded::Text(text) => Ok(Resident::Text(text)),
            Loaded::Graph(graph) => self.wire(model, graph).map(Resident::Graph),
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
        Outcome {
            model: resident,
            load_ms,
        }
    }

    /// A repository graph with its `[limits]`, `[batching]` and `[embedding]`.
    fn wire(&self, model: &RepositoryModel, graph: Arc<dyn Graph>) -> Result<PoolGraph, String> {
        let caps = match &model.config.limits {
            Some(limits) => Some(Arc::new(ShapeCaps::new(limits, graph.inputs())?)),
            None => None,
        };
        let embedder = match &model.config.embedding {
            Some(embedding) => {
                let dir = model.file.parent().unwrap_or(Path::new("."));
                Some(Arc::new(Embedder::new(embedding.clone(), dir, &*graph)?))
            }
            None => None,
        };
        let batcher = match (&model.config.batching, self.batching) {
            (Some(batching), true) => Some(Arc::new(Batcher::start(
                graph.clone(),
                batching.clone(),
                self.workers.permits.clone(),
                model.stats.clone(),
                caps.clone(),
            )?)),
            _ => None,
        };
        Ok(PoolGraph {
            graph,
            batcher,
            stats: Some(model.stats.clone()),
            embedder,
            caps,
        })
    }

    /// A function's own ONNX graph, loaded on a worker by the engine for
    /// functions' graphs (`--guest-onnx-engine`, default the one `auto`
    /// names), on the CPU, once per content hash, and cached for its
    /// `tenant`, whose cached graphs may hold at most `budget` bytes (least
    /// recently used ones are evicted).
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
            return Ok(PoolGraph::own(graph));
        }
        let size = bytes.len() as u64;
        let engine = self.engines.for_guests();
        let graph = self
            .workers
            .run(Some(tenant), move || {
                let source = Source {
                    name: "a function's graph",
                    data: Data::Bytes(&bytes),
                    generation: None,
                };
                match engine.load(&source, "cpu") {
                    Ok(Loaded::Graph(graph)) => Ok(graph),
                    Ok(Loaded::Text(_)) => Err(NnError::invalid("not a tensor graph")),
                    Err(e) => Err(NnError::new(ErrorCode::InvalidEncoding, e)),
                }
            })
            .await?;
        let cost = graph.memory_bytes().max(size);
        self.tenant_graphs()
            .insert(tenant, hash, graph.clone(), cost, budget)?;
        Ok(PoolGraph::own(graph))
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
        self.workers.forget(tenant);
        for model in self.models.values() {
            model.stats.forget_tenant(tenant);
            if let Some(Resident::Text(text)) = model.resident() {
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
        let checked = graph::order(&*graph.graph, inputs).and_then(|ordered| {
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
            .workers
            .run(Some(&tenant), move || {
                let started = Instant::now();
                let result = plan
                    .run(ordered)
                    .map_err(|e| NnError::new(ErrorCode::RuntimeError, format!("{e:#}")));
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

    /// The machine's devices and what models take of them.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// Every repository model with its state, by name.
    pub fn list(&self) -> Vec<ModelInfo> {
        self.models.values().map(RepositoryModel::info).collect()
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
            .filter_map(|(name, model)| match model.resident() {
                Some(Resident::Text(text)) => Some((name.as_str(), &**text)),
                _ => None,
            })
            .collect();
        crate::llm::render_metrics(out, &text);
        self.tenant_graphs().render(out);
    }
}

/// Loads a repository model with its engine where its `device` says; blocking.
fn load(model: &RepositoryModel, devices: &Arc<Devices>) -> Result<Loaded, String> {
    LoadJob::of(model, devices).run()
}

/// What loading a repository model needs, owned, so it can move to a worker.
struct LoadJob {
    name: String,
    file: std::path::PathBuf,
    config: ModelConfig,
    engine: Result<Arc<dyn engines::Engine>, String>,
    devices: Arc<Devices>,
}

impl LoadJob {
    fn of(model: &RepositoryModel, devices: &Arc<Devices>) -> Self {
        Self {
            name: model.name.clone(),
            file: model.file.clone(),
            config: model.config.clone(),
            engine: model.engine.clone(),
            devices: devices.clone(),
        }
    }

    fn run(&self) -> Result<Loaded, String> {
        let engine = self.engine.as_ref().map_err(Clone::clone)?;
        let source = Source {
            name: &self.name,
            data: Data::File(&self.file),
            generation: self.config.generation.as_ref(),
        };
        Engines::place(&**engine, &source, self.config.device, &self.devices)
    }
}
