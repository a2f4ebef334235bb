//! The inference workers: as many blocking threads as the engines may use
//! at once, shared by every model and tenant, so guests await inference
//! without holding an async worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::error::{ErrorCode, NnError};

/// The workers, and each tenant's slots in front of them.
pub(super) struct Workers {
    /// One permit per worker; batchers take them too.
    pub(super) permits: Arc<Semaphore>,
    count: usize,
    tenants: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

impl Workers {
    pub(super) fn new(count: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(count.max(1))),
            count: count.max(1),
            tenants: Mutex::default(),
        }
    }

    /// `tenant`'s slots on the workers.
    fn tenant(&self, tenant: &Arc<str>) -> Arc<Semaphore> {
        let mut slots = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.count)))
            .clone()
    }

    /// Drops a deleted tenant's slots.
    pub(super) fn forget(&self, tenant: &str) {
        let mut slots = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        slots.remove(tenant);
    }

    /// Runs `job` on a worker. `tenant`'s jobs first take one of the
    /// tenant's own slots (as many as there are workers), so the workers'
    /// first-come queue holds at most that many jobs of any one tenant: a
    /// tenant flooding unbatched models waits behind itself.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        tenant: Option<&Arc<str>>,
        job: impl FnOnce() -> Result<T, NnError> + Send + 'static,
    ) -> Result<T, NnError> {
        let stopped = |_| NnError::new(ErrorCode::RuntimeError, "the model pool is shutting down");
        let mine = match tenant {
            Some(tenant) => Some(self.tenant(tenant).acquire_owned().await.map_err(stopped)?),
            None => None,
        };
        let permit = self
            .permits
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
}
