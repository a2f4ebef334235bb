//! Turning stored functions into runnable ones: compile at deploy (one at
//! a time), load precompiled artifacts afterwards, cache by content hash.

use std::collections::HashMap;
use std::sync::RwLock;

use gigafactory_runtime::{CompileError, Function};
use tokio::sync::Semaphore;

use super::{ApiError, Gateway};
use crate::store::Version;

/// Loaded functions by wasm sha256 (identical wasm shares one entry).
pub struct FunctionCache {
    loaded: RwLock<HashMap<String, Function>>,
    /// Compiling is CPU-heavy: one at a time, so deploys cannot starve requests.
    compiling: Semaphore,
}

impl Default for FunctionCache {
    fn default() -> Self {
        Self {
            loaded: RwLock::default(),
            compiling: Semaphore::new(1),
        }
    }
}

impl Gateway {
    /// Validates and compiles a component off the async workers.
    pub(super) async fn compile(&self, wasm: &[u8]) -> Result<Vec<u8>, ApiError> {
        let _permit = self
            .functions
            .compiling
            .acquire()
            .await
            .map_err(|e| ApiError::internal(e.into()))?;
        let runtime = self.runtime.clone();
        let wasm = wasm.to_vec();
        let compiled = tokio::task::spawn_blocking(move || runtime.compile(&wasm))
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
        let artifact = match self.store.artifact(&version.sha256)? {
            Some(artifact) => artifact,
            None => {
                let wasm = self.store.blob(&version.sha256)?.ok_or_else(|| {
                    ApiError::internal(anyhow::anyhow!(
                        "the wasm of version {} is missing",
                        version.number
                    ))
                })?;
                tracing::info!(sha256 = %version.sha256, "recompiling for this engine");
                let artifact = self.compile(&wasm).await?;
                self.store.put_artifact(&version.sha256, &artifact)?;
                artifact
            }
        };
        let runtime = self.runtime.clone();
        let function = tokio::task::spawn_blocking(move || runtime.load(&artifact))
            .await
            .map_err(|e| ApiError::internal(e.into()))?
            .map_err(ApiError::internal)?;
        let mut loaded = self
            .functions
            .loaded
            .write()
            .unwrap_or_else(|e| e.into_inner());
        Ok(loaded
            .entry(version.sha256.clone())
            .or_insert(function)
            .clone())
    }

    /// Drops everything kept in memory for a deleted function: its log,
    /// counters, concurrency slots, and loaded versions whose wasm left the store.
    pub(super) fn forget_function(
        &self,
        tenant: &str,
        name: &str,
        versions: &[Version],
    ) -> Result<(), ApiError> {
        self.logs.remove(tenant, name);
        self.metrics.forget(tenant, Some(name));
        let prefix = format!("{tenant}/{name}@");
        let mut slots = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|key, _| !key.starts_with(&prefix));
        drop(slots);
        let mut loaded = self
            .functions
            .loaded
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for version in versions {
            if self.store.blob(&version.sha256)?.is_none() {
                loaded.remove(&version.sha256);
            }
        }
        Ok(())
    }

    fn cached(&self, sha256: &str) -> Option<Function> {
        let loaded = self
            .functions
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner());
        loaded.get(sha256).cloned()
    }
}

fn compile_error(error: CompileError) -> ApiError {
    let code = match &error {
        CompileError::NotWasm | CompileError::Invalid(_) => "invalid_wasm",
        CompileError::CoreModule => "not_a_component",
        CompileError::UnsupportedImport(_) => "unsupported_import",
        CompileError::MissingHandler(_) => "missing_handler",
    };
    ApiError::bad_request(code, error.to_string())
}
