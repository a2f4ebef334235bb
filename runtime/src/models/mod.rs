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
mod inspect;
mod limits;
mod repository;
mod stats;
mod tenant;
mod tensor;
mod workers;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;

use crate::capabilities::ModelAccess;

use crate::devices::Devices;
use crate::llm::TextModel;
use engines::{Data, Engines, Loaded, Source};
pub(crate) use repository::Resident;
use repository::{Outcome, RepositoryModel};
use workers::Workers;

pub use batcher::{BatchConfig, Batcher, Pad, SliceBack};
pub use config::{DevicePreference, LoadPolicy, LoraConfig, ModelConfig, ModelFormat};
pub use embedding::{EmbedInput, Embedder, EmbeddingConfig, Embeddings, MAX_TEXTS, Pooling};
pub use engines::EngineOptions;
pub use error::{BUSY_PREFIX, ErrorCode, NnError};
pub use graph::{Graph, TensorSpec};
pub use inspect::{Hints, adapter_config, format_of, generate as generate_config};
pub use limits::{InputLimits, ShapeCaps};
pub use repository::{ModelInfo, PoolGraph};
pub use stats::{ModelStats, StatsSnapshot, TenantCalls};
pub use tenant::TenantGraphStats;
pub use tensor::{ElementType, HostTensor};

/// What one tenant used of one model ([`ModelPool::tenant_use`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TenantUse {
    /// A tensor model's calls and compute seconds.
    #[serde(flatten)]
    pub calls: Option<TenantCalls>,
    /// A text model's prompt tokens (ended generations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// A text model's generated tokens (ended generations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated_tokens: Option<u64>,
}

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
    /// The host memory repository models may take (`--cpu-model-memory-mib`);
    /// past it, loading one unloads the least recently used others. Default:
    /// what was free at start.
    pub cpu_memory_budget: Option<u64>,
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
            cpu_memory_budget: None,
        }
    }
}

/// All models of the operator's repository, the engines and the workers.
pub struct ModelPool {
    /// The catalog: each model by its key (its name; `tenant/name` for a
    /// tenant's private model). Models come and go at run time.
    models: RwLock<BTreeMap<String, Arc<RepositoryModel>>>,
    /// Models taken out of the catalog (replaced or removed) that are
    /// still loaded: unloaded once nobody holds them.
    retired: Mutex<Vec<Arc<RepositoryModel>>>,
    /// The repository directory, read again by [`Self::rescan`].
    directory: Option<PathBuf>,
    /// Held while the catalog changes (install, remove, rescan, a base
    /// loaded again for an adapter): one change at a time.
    changing: tokio::sync::Mutex<()>,
    engines: Engines,
    devices: Arc<Devices>,
    workers: Workers,
    /// What a loaded graph is wired up with.
    wiring: Wiring,
    tenant_graphs: Mutex<tenant::TenantGraphs>,
    /// How long calls waited for a model to load on demand.
    load_waits: crate::stats::Histogram,
}

impl ModelPool {
    /// A pool with no repository models (functions may still `load` their own).
    pub fn new(options: &PoolOptions) -> Result<Self> {
        let workers = Workers::new(options.workers);
        Ok(Self {
            models: RwLock::default(),
            retired: Mutex::default(),
            directory: None,
            changing: tokio::sync::Mutex::default(),
            engines: Engines::new(&options.engines).context("setting up the engines")?,
            devices: Arc::new(Devices::discover(
                DEFAULT_GPU_BUDGET,
                options.cpu_memory_budget,
            )),
            load_waits: crate::stats::Histogram::new(crate::stats::LATENCY_BUCKETS),
            wiring: Wiring {
                batching: options.batching,
                permits: workers.permits.clone(),
            },
            workers,
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
        pool.directory = Some(dir.to_path_buf());
        for model_dir in repository::model_dirs(dir)? {
            let name = model_dir
                .file_name()
                .and_then(|n| n.to_str())
                .context("model directory name is not UTF-8")?
                .to_string();
            match RepositoryModel::read(&name, &model_dir, &pool.engines) {
                Ok(model) => {
                    pool.catalog_mut().insert(name, Arc::new(model));
                }
                Err(e) => tracing::error!(model = %name, "skipping model: {e:#}"),
            }
        }
        // Every model is in the catalog before any loads: a base model
        // loads with the adapters the catalog has for it.
        for model in pool.snapshot() {
            let name = model.name.clone();
            if model.slot().outcome.is_some() {
                // Refused when read: listed as failed with the reason.
            } else if model.config.lora.is_some() {
                tracing::info!(model = %name, "LoRA adapter: loads with its base when first called");
            } else if model.config.load == LoadPolicy::Boot {
                tracing::info!(model = %name, "loading model");
                let started = Instant::now();
                let job = LoadJob::of(&model, &pool.devices, pool.adapters_of(&name));
                match job.destination(&HashMap::new()) {
                    Ok((device, bytes)) if pool.devices.room(&device) < bytes => tracing::warn!(
                        model = %name,
                        "not loaded at start: {} MiB do not fit in {device}'s budget; it loads when called",
                        bytes >> 20
                    ),
                    destination => {
                        let loaded = destination.and_then(|(device, _)| job.load_on(&device));
                        model.loaded(pool.wiring.finish(&model, loaded, started));
                    }
                }
            } else {
                tracing::info!(model = %name, "model loads on first use");
            }
        }
        Ok(pool)
    }

    /// The base model of the LoRA adapter `adapter`: its owner's private
    /// model of that name, else the operator's.
    /// A base is a text model, never an adapter (nor the adapter itself).
    fn base_of(&self, adapter: &RepositoryModel) -> Option<Arc<RepositoryModel>> {
        let base = &adapter.config.lora.as_ref()?.base;
        adapter
            .owner
            .as_deref()
            .and_then(|owner| self.model(&private_key(owner, base)))
            .or_else(|| self.model(base))
            .filter(|base| base.config.lora.is_none() && base.config.format == ModelFormat::Gguf)
    }

    /// The catalog's LoRA adapters of the base model `base` (a key).
    fn adapters_of(&self, base: &str) -> Vec<crate::llm::AdapterFile> {
        self.snapshot()
            .iter()
            .filter(|model| self.base_of(model).is_some_and(|b| b.name == base))
            .map(|model| crate::llm::AdapterFile {
                key: model.name.clone(),
                path: model.file.clone(),
                scale: model.config.lora.as_ref().map_or(1.0, |l| l.scale),
            })
            .collect()
    }

    fn catalog(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<RepositoryModel>>> {
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    fn catalog_mut(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<RepositoryModel>>> {
        self.models.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Every model of the catalog, as it is now.
    fn snapshot(&self) -> Vec<Arc<RepositoryModel>> {
        self.catalog().values().cloned().collect()
    }

    fn model(&self, key: &str) -> Option<Arc<RepositoryModel>> {
        self.catalog().get(key).cloned()
    }

    /// The names of `tenant`'s private models.
    pub fn private_names(&self, tenant: &str) -> Vec<String> {
        let prefix = private_key(tenant, "");
        self.catalog()
            .range(prefix.clone()..)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .map(|(key, _)| key[prefix.len()..].to_string())
            .collect()
    }

    /// Whether the catalog has a model with that key (loaded or not).
    pub fn has(&self, key: &str) -> bool {
        self.catalog().contains_key(key)
    }

    /// The catalog key of the model `tenant` calls `name`: its own private
    /// model of that name, else the operator's. `not-found` for a model the
    /// tenant may not see (another tenant's private ones included) or that
    /// does not exist, `security` for one outside the function's manifest.
    pub fn find(&self, tenant: &str, access: &ModelAccess, name: &str) -> Result<String, NnError> {
        let not_found = || NnError::new(ErrorCode::NotFound, format!("no model named {name:?}"));
        if name.contains('/') {
            return Err(not_found());
        }
        let private = private_key(tenant, name);
        let key = if self.has(&private) {
            private
        } else if access.is_visible(name) && self.has(name) {
            name.to_string()
        } else {
            return Err(not_found());
        };
        if !access.is_allowed(name) {
            return Err(NnError::new(
                ErrorCode::Security,
                format!("model {name:?} is not in this function's manifest (`models`)"),
            ));
        }
        // An adapter reaches its base's weights: the tenant must see the
        // very base it runs on (its own private model, or an operator's
        // model it may use).
        if let Some(adapter) = self.model(&key).filter(|m| m.config.lora.is_some()) {
            let base = self.base_of(&adapter).ok_or_else(not_found)?;
            let visible = match split_key(&base.name) {
                (Some(owner), _) => owner == tenant,
                (None, name) => access.is_visible(name),
            };
            if !visible {
                return Err(not_found());
            }
        }
        Ok(key)
    }

    /// Checks a `model.toml` the way installing it would (it parses, its
    /// sections fit its format, its engine can run); the config, or why not.
    /// `private`: for a tenant's private model.
    pub fn check_config(&self, text: &str, private: bool) -> Result<ModelConfig, String> {
        let config: ModelConfig =
            toml::from_str(text).map_err(|e| format!("model.toml: {}", e.message()))?;
        config.check()?;
        self.engines
            .choose_for(config.format, &config.engine, private)?;
        Ok(config)
    }

    /// Adds the model whose `model.toml` and files are in `dir` to the
    /// catalog as `key`, or replaces the one there: calls that hold the old
    /// one finish on it, later calls get the new one, and the old one's
    /// memory is given back once nobody holds it. When the old one was
    /// loaded (or the new one loads at boot) the new one loads first, so
    /// callers do not wait for the switch.
    ///
    /// A LoRA adapter loads with its base: adding one to a loaded base
    /// loads the base again (with it), and replacing a base replaces its
    /// adapters too, so that each runs on the new base.
    pub async fn install(&self, key: &str, dir: &Path, origin: Origin) -> Result<ModelInfo> {
        let _changing = self.changing.lock().await;
        self.install_locked(key, dir, origin).await
    }

    /// [`Self::install`], holding `changing`.
    async fn install_locked(&self, key: &str, dir: &Path, origin: Origin) -> Result<ModelInfo> {
        let info = self.install_one(key, dir, origin).await?;
        let model = self.model(key).context("just installed")?;
        if model.config.lora.is_some() {
            if let Some(base) = self.base_of(&model)
                && base.resident().is_some()
            {
                self.reload_family(&base).await?;
            }
        } else {
            self.reinstall_adapters_of(key).await?;
        }
        Ok(self.info(key).unwrap_or(info))
    }

    /// Loads the base model `base` again (with the adapters the catalog has
    /// for it now), then its adapters.
    async fn reload_family(&self, base: &RepositoryModel) -> Result<()> {
        tracing::info!(model = %base.name, "loading the base model again, with its adapters");
        Box::pin(self.install_one(&base.name, &base.dir, base.origin)).await?;
        Box::pin(self.reinstall_adapters_of(&base.name)).await
    }

    /// Fresh catalog entries for the loaded adapters of `base`, which load
    /// on the base as it is now (the old ones let go of the old base once
    /// nobody holds them).
    async fn reinstall_adapters_of(&self, base: &str) -> Result<()> {
        for adapter in self.snapshot() {
            let on_base = self.base_of(&adapter).is_some_and(|b| b.name == base);
            if on_base && adapter.resident().is_some() {
                Box::pin(self.install_one(&adapter.name, &adapter.dir, adapter.origin)).await?;
            }
        }
        Ok(())
    }

    async fn install_one(&self, key: &str, dir: &Path, origin: Origin) -> Result<ModelInfo> {
        let (owner, _) = split_key(key);
        let mut model = RepositoryModel::read_as(key, dir, &self.engines, owner)?;
        model.origin = origin;
        let model = Arc::new(model);
        let old = self.model(key);
        let warm = old.as_ref().is_some_and(|old| old.resident().is_some())
            || (model.config.load == LoadPolicy::Boot && model.config.lora.is_none());
        if warm
            && model.slot().outcome.is_none()
            && let Err(error) = Box::pin(self.ensure(&model)).await
        {
            tracing::warn!(model = %key, "not loaded before taking over: {error}");
        }
        let replaced = self.catalog_mut().insert(key.to_string(), model.clone());
        match replaced {
            Some(old) => {
                tracing::info!(model = %key, ?origin, "model replaced");
                self.retire(old);
            }
            None => tracing::info!(model = %key, ?origin, "model added"),
        }
        Ok(model.info())
    }

    /// Takes the model `key` out of the catalog (calls holding it finish on
    /// it); whether there was one.
    pub async fn remove(&self, key: &str) -> bool {
        let _changing = self.changing.lock().await;
        self.remove_locked(key)
    }

    fn remove_locked(&self, key: &str) -> bool {
        let Some(old) = self.catalog_mut().remove(key) else {
            return false;
        };
        tracing::info!(model = %key, "model removed");
        self.retire(old);
        true
    }

    /// Where the model `key` came from, if the catalog has it.
    pub fn origin(&self, key: &str) -> Option<Origin> {
        self.model(key).map(|m| m.origin)
    }

    fn retire(&self, model: Arc<RepositoryModel>) {
        self.retired().push(model);
        self.release_retired();
    }

    fn retired(&self) -> std::sync::MutexGuard<'_, Vec<Arc<RepositoryModel>>> {
        self.retired.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adapters hold their base: those nobody calls now let go of it, so
    /// that the base can be unloaded or evicted (a call makes a new view).
    fn release_idle_views(&self) {
        for model in self.snapshot() {
            model.release_view();
        }
    }

    /// Unloads the retired models nobody holds any more.
    fn release_retired(&self) {
        if !self.retired().is_empty() {
            self.release_idle_views();
        }
        self.retired()
            .retain(|model| !model.unload_retired(&self.devices));
    }

    /// Reads the repository directory again: models whose directory
    /// appeared are added, those whose `model.toml` or model file changed
    /// are replaced, those whose directory went are removed. Models added
    /// through the API are left alone (a directory of the same name is
    /// skipped with an error).
    pub async fn rescan(&self) -> Result<Rescan> {
        let Some(dir) = self.directory.clone() else {
            return Ok(Rescan::default());
        };
        let _changing = self.changing.lock().await;
        let mut rescan = Rescan::default();
        let mut seen = std::collections::HashSet::new();
        for model_dir in repository::model_dirs(&dir)? {
            let Some(name) = model_dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            seen.insert(name.to_string());
            let existing = self.model(name);
            match &existing {
                Some(model) if model.origin != Origin::Directory => {
                    tracing::error!(model = %name, "the directory {} has the name of a model added through the API: skipped", model_dir.display());
                    continue;
                }
                Some(model) if model.stamp == repository::stamp(&model_dir) => continue,
                _ => {}
            }
            match self
                .install_locked(name, &model_dir, Origin::Directory)
                .await
            {
                Ok(_) if existing.is_some() => rescan.replaced.push(name.to_string()),
                Ok(_) => rescan.added.push(name.to_string()),
                Err(e) => tracing::error!(model = %name, "skipping model: {e:#}"),
            }
        }
        let gone: Vec<String> = self
            .catalog()
            .iter()
            .filter(|(key, model)| model.origin == Origin::Directory && !seen.contains(*key))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            self.remove_locked(&key);
            rescan.removed.push(key);
        }
        Ok(rescan)
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

    /// The model for a call: resident, or loaded now (on first use, or
    /// again after an unload) while other callers of it wait.
    pub(crate) async fn resident(&self, name: &str) -> Result<Resident, NnError> {
        let model = self
            .model(name)
            .ok_or_else(|| NnError::new(ErrorCode::NotFound, format!("no model named {name:?}")))?;
        self.ensure(&model).await
    }

    /// `model` loaded, now if it must be, while other callers of it wait.
    async fn ensure(&self, model: &Arc<RepositoryModel>) -> Result<Resident, NnError> {
        if model.config.lora.is_some() {
            return Box::pin(self.ensure_adapter(model)).await;
        }
        let name = &model.name;
        let failed = |reason: String| {
            NnError::new(
                ErrorCode::RuntimeError,
                format!("model {name:?} failed to load: {reason}"),
            )
        };
        if let Some(ready) = model.ready() {
            return ready.map_err(failed);
        }
        let loading = model.load_lock.clone().lock_owned().await;
        if let Some(ready) = model.ready() {
            return ready.map_err(failed);
        }
        tracing::info!(model = %name, "loading model on demand");
        let started = Instant::now();
        let job = LoadJob::of(model, &self.devices, self.adapters_of(name));
        let freeable = self.freeable(model);
        let destination = self
            .workers
            .run(None, {
                let job = job.clone();
                move || Ok(job.destination(&freeable))
            })
            .await
            .unwrap_or_else(|e| Err(e.message));
        let room =
            destination.map(|(device, bytes)| (self.make_room(model, &device, bytes), device));
        let device = match room {
            Ok((Ok(()), device)) => device,
            Ok((Err(busy), _)) => {
                self.load_waits.observe_duration(started.elapsed());
                return Err(busy);
            }
            Err(reason) => {
                model.loaded(self.wiring.finish(model, Err(reason), started));
                return model.ready().expect("just failed").map_err(failed);
            }
        };
        // The load runs to its end and is recorded even if this caller
        // leaves: what it places on the device must be accounted for.
        let (permits, wiring, loading_model) = (
            self.workers.permits.clone(),
            self.wiring.clone(),
            model.clone(),
        );
        let load = tokio::spawn(async move {
            let _loading = loading;
            let loaded = match permits.acquire_owned().await {
                Ok(permit) => tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    job.load_on(&device)
                })
                .await
                .unwrap_or_else(|e| Err(format!("the load failed: {e}"))),
                Err(_) => Err("the model pool is shutting down".into()),
            };
            loading_model.loaded(wiring.finish(&loading_model, loaded, started));
        });
        let _ = load.await;
        self.load_waits.observe_duration(started.elapsed());
        model.ready().expect("just loaded").map_err(failed)
    }

    /// A LoRA adapter: its base loaded (with it), and the adapter's own
    /// view of the base — its own counters, the base's scheduler.
    async fn ensure_adapter(&self, adapter: &Arc<RepositoryModel>) -> Result<Resident, NnError> {
        let name = &adapter.name;
        let failed = |reason: String| {
            NnError::new(
                ErrorCode::RuntimeError,
                format!("model {name:?} failed to load: {reason}"),
            )
        };
        if let Some(ready) = adapter.ready() {
            if let Some(base) = self.base_of(adapter) {
                base.touch();
            }
            return ready.map_err(failed);
        }
        let loading = adapter.load_lock.clone().lock_owned().await;
        if let Some(ready) = adapter.ready() {
            return ready.map_err(failed);
        }
        let started = Instant::now();
        let base = self.base_of(adapter).ok_or_else(|| {
            let base = adapter.config.lora.as_ref().map_or("", |l| l.base.as_str());
            NnError::new(
                ErrorCode::NotFound,
                format!("{name:?} is a LoRA adapter of {base:?}, which is not in the catalog"),
            )
        })?;
        let text = match self.ensure(&base).await? {
            Resident::Text(text) => text,
            Resident::Graph(_) => {
                return Err(failed(format!(
                    "its base {:?} is not a text model",
                    base.name
                )));
            }
        };
        let view = match text.adapter(name) {
            Ok(view) => Ok(view),
            Err(crate::llm::AdapterError::Failed(why)) => Err(why),
            Err(crate::llm::AdapterError::NotLoaded) => {
                // The base loaded before this adapter was added: load it
                // again with it (unless another caller just did), then use
                // the adapter's new entry.
                drop(loading);
                // Bounded: a change in progress that itself waits for
                // this adapter would otherwise never end.
                let changing = tokio::time::timeout(Duration::from_secs(120), self.changing.lock())
                    .await
                    .map_err(|_| NnError::busy(format!("{name:?} is being loaded again")))?;
                if self
                    .model(&base.name)
                    .is_some_and(|now| Arc::ptr_eq(&now, &base))
                {
                    self.reload_family(&base)
                        .await
                        .map_err(|e| failed(format!("{e:#}")))?;
                }
                drop(changing);
                let again = self
                    .model(name)
                    .ok_or_else(|| failed("it was removed".into()))?;
                if Arc::ptr_eq(&again, adapter) {
                    return Err(failed("its base did not load it".into()));
                }
                return Box::pin(self.ensure(&again)).await;
            }
        };
        let outcome = Outcome {
            model: view.map(Resident::Text),
            load_ms: started.elapsed().as_millis() as u64,
        };
        adapter.loaded(outcome);
        drop(loading);
        adapter.ready().expect("just loaded").map_err(failed)
    }

    /// Per device, the memory that unloading the models nobody holds
    /// (other than `loading`, and not pinned) would give back.
    fn freeable(&self, loading: &RepositoryModel) -> HashMap<String, u64> {
        let mut freeable = HashMap::new();
        for model in self.snapshot() {
            if std::ptr::eq(&*model, loading) {
                continue;
            }
            if let Some((device, bytes)) = model.evictable() {
                *freeable.entry(device).or_default() += bytes;
            }
        }
        freeable
    }

    /// Unloads the least recently used models on `device` that nobody
    /// holds (never `loading`, never a pinned one) until `bytes` fit in
    /// its budget; a `busy` error when they cannot.
    fn make_room(
        &self,
        loading: &RepositoryModel,
        device: &str,
        bytes: u64,
    ) -> Result<(), NnError> {
        if self.devices.room(device) < bytes {
            self.release_idle_views();
        }
        let models = self.snapshot();
        let mut candidates: Vec<&RepositoryModel> = models
            .iter()
            .map(|m| &**m)
            .filter(|m| !std::ptr::eq(*m, loading))
            .filter(|m| m.evictable().is_some_and(|(on, _)| on == device))
            .collect();
        candidates.sort_by_cached_key(|m| m.slot().last_used);
        let mut candidates = candidates.into_iter();
        while self.devices.room(device) < bytes {
            let Some(victim) = candidates.next() else {
                return Err(NnError::busy(format!(
                    "{:?} needs {} MiB on {device}, which has {} MiB free and the rest held by models in use",
                    loading.name,
                    bytes.div_ceil(1 << 20),
                    self.devices.room(device) >> 20
                )));
            };
            if victim.unload_if_unused(&self.devices) {
                tracing::info!(model = %victim.name, to_load = %loading.name, device, "evicted for another model");
            }
        }
        Ok(())
    }

    /// Unloads the models that went unused for their
    /// `idle_unload_after_secs` (and that nobody holds); how many.
    pub fn unload_idle(&self) -> usize {
        let now = Instant::now();
        if self
            .snapshot()
            .iter()
            .any(|m| m.config.lora.is_none() && m.idle(now))
        {
            self.release_idle_views();
        }
        self.snapshot()
            .iter()
            .filter(|model| model.idle(now) && model.unload_if_unused(&self.devices))
            .count()
    }

    /// Every second, for as long as the pool lives: unloads idle models and
    /// the retired ones nobody holds any more (call it inside a tokio
    /// runtime).
    pub fn start_housekeeping(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.unload_idle();
                pool.release_retired();
            }
        });
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
                    adapters: &[],
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
        for model in self.snapshot() {
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
        use tracing::Instrument as _;
        // Under the request that made the call (its own event when answered).
        let span = tracing::debug_span!("model_call", model = %graph.name, tenant = %tenant);
        if let Some(batcher) = &graph.batcher {
            return batcher.compute(tenant, ordered).instrument(span).await;
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
        // Entered, so that the log line lists the request's span above it.
        span.in_scope(|| {
            tracing::debug!(
                batch_calls = 1,
                batch_rows = rows,
                queued_ms = waited.as_secs_f64() * 1e3,
                compute_ms = spent.as_secs_f64() * 1e3,
                ok = result.is_ok(),
                "model call answered"
            );
        });
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
        let inputs: Vec<EmbedInput> = texts.iter().cloned().map(EmbedInput::Text).collect();
        self.embed_inputs(name, &inputs, tenant).await
    }

    /// [`Self::embed`] of texts or token ids.
    pub async fn embed_inputs(
        &self,
        name: &str,
        inputs: &[EmbedInput],
        tenant: Arc<str>,
    ) -> (Result<Embeddings, NnError>, Duration) {
        let mut spent = Duration::ZERO;
        let result = self.embed_charging(name, inputs, tenant, &mut spent).await;
        (result, spent)
    }

    async fn embed_charging(
        &self,
        name: &str,
        texts: &[EmbedInput],
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
            .model(name)
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
        for (index, input) in texts.iter().enumerate() {
            if let EmbedInput::Tokens(ids) = input {
                embedder
                    .check_tokens(ids)
                    .map_err(|why| NnError::invalid(format!("input {index}: {why}")))?;
            }
        }
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
        self.snapshot().iter().map(|m| m.info()).collect()
    }

    /// One model by key, with its state.
    pub fn info(&self, key: &str) -> Option<ModelInfo> {
        self.model(key).map(|m| m.info())
    }

    /// Per model (by key), what each tenant used of it: tensor models'
    /// calls and compute seconds, text models' tokens of ended
    /// generations. For the operator only.
    pub fn tenant_use(&self) -> BTreeMap<String, BTreeMap<String, TenantUse>> {
        let catalog: Vec<(String, Arc<RepositoryModel>)> = self
            .catalog()
            .iter()
            .map(|(key, model)| (key.clone(), model.clone()))
            .collect();
        let mut all = BTreeMap::new();
        for (key, model) in catalog {
            let mut tenants: BTreeMap<String, TenantUse> = model
                .stats
                .tenants()
                .into_iter()
                .map(|(tenant, calls)| {
                    let used = TenantUse {
                        calls: Some(calls),
                        ..TenantUse::default()
                    };
                    (tenant, used)
                })
                .collect();
            if let Some(Resident::Text(text)) = model.resident() {
                for (tenant, prompt, generated) in text.stats().tenant_tokens() {
                    let used = tenants.entry(tenant.to_string()).or_default();
                    used.prompt_tokens = Some(prompt);
                    used.generated_tokens = Some(generated);
                }
            }
            all.insert(key, tenants);
        }
        all
    }

    /// Appends the pool's Prometheus series: per model calls, rejections,
    /// queue depth, batch sizes, queue wait, compute time and compute
    /// seconds per tenant; per tenant the graph cache.
    pub fn render_metrics(&self, out: &mut String) {
        let catalog = self.snapshot();
        let models: Vec<(&str, &ModelStats, usize)> = catalog
            .iter()
            .filter(|model| model.config.format == ModelFormat::Onnx)
            .map(|model| (model.name.as_str(), &*model.stats, model.queued()))
            .collect();
        stats::render(out, &models);
        let text: Vec<(&str, Arc<TextModel>)> = catalog
            .iter()
            .filter_map(|model| match model.resident() {
                Some(Resident::Text(text)) => Some((model.name.as_str(), text)),
                _ => None,
            })
            .collect();
        let text: Vec<(&str, &TextModel)> =
            text.iter().map(|(name, model)| (*name, &**model)).collect();
        crate::llm::render_metrics(out, &text);
        self.render_loads(out);
        self.tenant_graphs().render(out);
    }
}

impl ModelPool {
    fn render_loads(&self, out: &mut String) {
        use std::fmt::Write as _;
        crate::stats::header(
            out,
            "gigafactory_model_load_wait_seconds",
            "histogram",
            "How long calls waited for a repository model to load on demand.",
        );
        self.load_waits
            .render(out, "gigafactory_model_load_wait_seconds", "");
        for (metric, help) in [
            (
                "gigafactory_model_loads_total",
                "Times a repository model loaded.",
            ),
            (
                "gigafactory_model_unloads_total",
                "Times a repository model was unloaded: idle, or evicted for another.",
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for model in self.snapshot() {
                let name = &model.name;
                let slot = model.slot();
                let value = if metric.contains("unloads") {
                    slot.unloads
                } else {
                    slot.loads
                };
                let _ = writeln!(
                    out,
                    "{metric}{{model=\"{}\"}} {value}",
                    crate::stats::label(name)
                );
            }
        }
    }
}

/// Where a catalog model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A directory of the repository (`--models`), read at start and on a rescan.
    Directory,
    /// Added through the API (stored, shared by a cluster's nodes), at this version.
    Api {
        /// 1 when added, one more at each update.
        version: u32,
    },
}

/// What a [`ModelPool::rescan`] changed, by key.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Rescan {
    /// Directories that appeared.
    pub added: Vec<String>,
    /// Models whose `model.toml` or files changed.
    pub replaced: Vec<String>,
    /// Models whose directory went.
    pub removed: Vec<String>,
}

/// The catalog key of a tenant's private model.
pub fn private_key(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

/// A catalog key's owner (for a private model) and name.
pub fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once('/') {
        Some((owner, name)) => (Some(owner), name),
        None => (None, key),
    }
}

/// What a loaded repository graph is wired up with, owned so a load can
/// finish on its own task.
#[derive(Clone)]
struct Wiring {
    /// Whether repository models batch (`serve --no-batching` turns it off).
    batching: bool,
    /// The workers' permits, which batches take.
    permits: Arc<tokio::sync::Semaphore>,
}

impl Wiring {
    /// Wires a loaded graph up (limits, batcher, tokenizer) and logs the outcome.
    fn finish(
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
                self.permits.clone(),
                model.stats.clone(),
                caps.clone(),
            )?)),
            _ => None,
        };
        Ok(PoolGraph {
            name: model.name.as_str().into(),
            graph,
            batcher,
            stats: Some(model.stats.clone()),
            embedder,
            caps,
            lease: Arc::new(()),
        })
    }
}

/// What loading a repository model needs, owned, so it can move to a worker.
#[derive(Clone)]
struct LoadJob {
    name: String,
    file: std::path::PathBuf,
    config: ModelConfig,
    engine: Result<Arc<dyn engines::Engine>, String>,
    devices: Arc<Devices>,
    /// A text model's LoRA adapters, loaded with it.
    adapters: Vec<crate::llm::AdapterFile>,
}

impl LoadJob {
    fn of(
        model: &RepositoryModel,
        devices: &Arc<Devices>,
        adapters: Vec<crate::llm::AdapterFile>,
    ) -> Self {
        Self {
            name: model.name.clone(),
            file: model.file.clone(),
            config: model.config.clone(),
            engine: model.engine.clone(),
            devices: devices.clone(),
            adapters,
        }
    }

    fn source(&self) -> Source<'_> {
        Source {
            name: &self.name,
            data: Data::File(&self.file),
            generation: self.config.generation.as_ref(),
            adapters: &self.adapters,
        }
    }

    fn engine(&self) -> Result<&dyn engines::Engine, String> {
        self.engine.as_deref().map_err(Clone::clone)
    }

    /// Where the model goes and what it will take there; blocking (an
    /// engine may read the file's header).
    fn destination(&self, freeable: &HashMap<String, u64>) -> Result<(String, u64), String> {
        let freeable = |device: &str| freeable.get(device).copied().unwrap_or(0);
        Engines::destination(
            self.engine()?,
            &self.source(),
            self.config.device,
            &self.devices,
            &freeable,
        )
    }

    /// Loads the model onto `device`; blocking.
    fn load_on(&self, device: &str) -> Result<Loaded, String> {
        Engines::load_on(
            self.engine()?,
            &self.source(),
            self.config.device,
            device,
            &self.devices,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool over one copy of the shipped MiniLM on tract, with `extra`
    /// `model.toml` lines.
    fn minilm_pool(dir: &Path, extra: &str) -> ModelPool {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/all-minilm-l6-v2");
        assert!(
            shipped.join("model.onnx").is_file(),
            "{} has no model.onnx: run ./dev models",
            shipped.display()
        );
        let model = dir.join("m");
        std::fs::create_dir_all(&model).unwrap();
        std::os::unix::fs::symlink(shipped.join("model.onnx"), model.join("model.onnx")).unwrap();
        let toml = format!("format = \"onnx\"\nengine = \"tract\"\n{extra}\n");
        std::fs::write(model.join("model.toml"), toml).unwrap();
        ModelPool::load_repository(dir, &PoolOptions::default()).unwrap()
    }

    #[tokio::test]
    async fn a_model_someone_holds_is_never_unloaded() {
        let dir = tempfile::tempdir().unwrap();
        let pool = minilm_pool(dir.path(), "idle_unload_after_secs = 0");
        let held = pool.get("m").await.unwrap();
        assert_eq!(pool.unload_idle(), 0, "held by a caller");
        let clone = held.clone();
        drop(held);
        assert_eq!(pool.unload_idle(), 0, "still held by a clone");
        drop(clone);
        assert_eq!(pool.unload_idle(), 1);
        assert_eq!(pool.list()[0].state, "evicted");
        assert_eq!(pool.devices().list().devices[0].used_bytes, 0);
        pool.get("m").await.unwrap();
        assert_eq!(pool.list()[0].loads, 2);
    }

    #[tokio::test]
    async fn a_pinned_model_is_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let pool = minilm_pool(dir.path(), "pin = true");
        let model = pool.model("m").unwrap();
        assert!(model.evictable().is_none());
        assert!(!model.unload_if_unused(&pool.devices));
        assert_eq!(pool.list()[0].state, "ready");
    }
}
