//! Turning stored functions into runnable ones: compile at deploy (one at
//! a time), load precompiled artifacts afterwards, cache by content hash.
//! A loaded function holds compiled code and descriptors (wasmtime maps
//! its memory images), so the cache is bounded: past its size the least
//! recently used version is unloaded (and loaded again if called).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use gigafactory_runtime::{CompileError, Function};
use tokio::sync::Semaphore;

use super::{ApiError, Gateway};
use crate::store::Version;

/// Loaded functions by wasm sha256 (identical wasm shares one entry).
pub struct FunctionCache {
    loaded: RwLock<HashMap<String, Loaded>>,
    /// Most entries kept.
    capacity: usize,
    /// A clock of uses, ordering entries by when they were last used.
    uses: AtomicU64,
    /// Compiling is CPU-heavy: one at a time, so deploys cannot starve requests.
    compiling: Arc<Semaphore>,
}

struct Loaded {
    function: Function,
    last_used: AtomicU64,
}

impl FunctionCache {
    /// A cache keeping at most `capacity` loaded functions.
    pub fn new(capacity: usize) -> Self {
        Self {
            loaded: RwLock::default(),
            capacity: capacity.max(1),
            uses: AtomicU64::new(0),
            compiling: Arc::new(Semaphore::new(1)),
        }
    }

    fn get(&self, sha256: &str) -> Option<Function> {
        let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
        let entry = loaded.get(sha256)?;
        entry.last_used.store(self.tick(), Ordering::Relaxed);
        Some(entry.function.clone())
    }

    /// Keeps `function`, unloading the least recently used past capacity.
    fn insert(&self, sha256: &str, function: Function) -> Function {
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = loaded.get(sha256) {
            return entry.function.clone();
        }
        while loaded.len() >= self.capacity {
            let Some(oldest) = loaded
                .iter()
                .min_by_key(|(_, entry)| entry.last_used.load(Ordering::Relaxed))
                .map(|(sha, _)| sha.clone())
            else {
                break;
            };
            loaded.remove(&oldest);
            tracing::debug!(sha256 = %oldest, "unloaded a function version");
        }
        let entry = Loaded {
            function: function.clone(),
            last_used: AtomicU64::new(self.tick()),
        };
        loaded.insert(sha256.to_string(), entry);
        function
    }

    fn remove(&self, sha256: &str) {
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        loaded.remove(sha256);
    }

    /// Functions loaded now.
    pub fn len(&self) -> usize {
        self.loaded.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn tick(&self) -> u64 {
        self.uses.fetch_add(1, Ordering::Relaxed)
    }
}

impl Gateway {
    /// Validates and compiles a component off the async workers.
    pub(super) async fn compile(&self, wasm: &[u8]) -> Result<Vec<u8>, ApiError> {
        let permit = self
            .functions
            .compiling
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ApiError::internal(e.into()))?;
        let runtime = self.runtime.clone();
        let wasm = wasm.to_vec();
        // The compile holds the permit to its end, even if the request
        // that started it is dropped at its deadline.
        let compile = move || {
            let _permit = permit;
            runtime.compile(&wasm)
        };
        let compiled = tokio::task::spawn_blocking(compile)
            .await
            .map_err(|e| ApiError::internal(e.into()))?;
        compiled.map_err(compile_error)
    }

    /// The runnable function for a version: cached, else loaded from its
    /// artifact, else (after an engine upgrade) recompiled from its wasm.
    pub(super) async fn runnable(&self, version: &Version) -> Result<Function, ApiError> {
        if let Some(function) = self.cached(&version.sha256) {
            return Ok(function);
        }
        let artifact = match self.store.artifact(&version.sha256).await? {
            Some(artifact) => artifact,
            None => {
                let wasm = self.store.blob(&version.sha256).await?.ok_or_else(|| {
                    ApiError::internal(anyhow::anyhow!(
                        "the wasm of version {} is missing",
                        version.number
                    ))
                })?;
                tracing::info!(sha256 = %version.sha256, "recompiling for this engine");
                let artifact = self.compile(&wasm).await?;
                self.store.put_artifact(&version.sha256, &artifact).await?;
                artifact
            }
        };
        let runtime = self.runtime.clone();
        let function = tokio::task::spawn_blocking(move || runtime.load(&artifact))
            .await
            .map_err(|e| ApiError::internal(e.into()))?
            .map_err(ApiError::internal)?;
        Ok(self.functions.insert(&version.sha256, function))
    }

    /// Lets go of what a replaced version held: its loaded code (unless the
    /// new version has the same wasm; it loads again if another function
    /// uses it) and its concurrency slots (requests in flight keep theirs).
    pub(super) fn retire_version(
        &self,
        tenant: &str,
        name: &str,
        replaced: &Version,
        active: &Version,
    ) {
        if replaced.sha256 != active.sha256 {
            self.functions.remove(&replaced.sha256);
        }
        let slot = format!("{tenant}/{name}@{}", replaced.number);
        let mut slots = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
        slots.remove(&slot);
    }

    /// Drops everything kept in memory for a deleted function: its log,
    /// counters, concurrency slots and loaded versions (one that another
    /// function shares loads again on its next request).
    pub(super) fn forget_function(&self, tenant: &str, name: &str, versions: &[Version]) {
        self.logs.remove(tenant, name);
        self.metrics.forget(tenant, Some(name));
        let prefix = format!("{tenant}/{name}@");
        let mut slots = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|key, _| !key.starts_with(&prefix));
        drop(slots);
        for version in versions {
            self.functions.remove(&version.sha256);
        }
    }

    fn cached(&self, sha256: &str) -> Option<Function> {
        self.functions.get(sha256)
    }
}

fn compile_error(error: CompileError) -> ApiError {
    let code = match &error {
        CompileError::NotWasm | CompileError::Invalid(_) => "invalid_wasm",
        CompileError::UnsupportedImport(_) => "unsupported_import",
        CompileError::MissingHandler(_) => "missing_handler",
    };
    ApiError::bad_request(code, error.to_string())
}
