//! Per-tenant admission of requests: requests per second (token bucket),
//! concurrent requests, and model compute per minute. Refusals are 429
//! with `Retry-After`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gigafactory_runtime::ComputeBudget;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::quota::{ComputeWindow, Quota, TokenBucket};

/// The in-memory state behind every tenant's request-time quotas.
#[derive(Default)]
pub struct Admission {
    tenants: Mutex<HashMap<String, Arc<TenantState>>>,
}

#[derive(Debug, Default)]
struct TenantState {
    bucket: Mutex<Option<TokenBucket>>,
    running: Mutex<Option<(u32, Arc<Semaphore>)>>,
    compute: Mutex<ComputeWindow>,
}

/// What an admitted request holds: its concurrency slot and its compute budget.
pub struct Admitted {
    /// Released when the response body ends.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Charged by the function's model calls.
    pub budget: Option<Arc<dyn ComputeBudget>>,
}

impl Admission {
    /// Admits one request of `tenant` under `quota`, or says when to retry.
    pub fn admit(&self, tenant: &str, quota: &Quota) -> Result<Admitted, ApiError> {
        let state = self.state(tenant);
        let now = Instant::now();
        let budget = match quota.compute_seconds_per_minute {
            Some(seconds) => {
                let budget = TenantCompute {
                    state: state.clone(),
                    cap: Duration::from_secs_f64(seconds),
                };
                let mut window = lock(&state.compute);
                if window.used(now) >= budget.cap {
                    let wait = window.relief_in(now);
                    return Err(ApiError::too_many_requests(
                        format!("the tenant used its {seconds} s of model compute this minute"),
                        whole_seconds(wait),
                    ));
                }
                Some(Arc::new(budget) as Arc<dyn ComputeBudget>)
            }
            None => None,
        };
        if let Some(rate) = quota.requests_per_second {
            let capacity = quota.burst.map_or(rate.ceil().max(1.0), f64::from);
            let mut bucket = lock(&state.bucket);
            if bucket.as_ref().is_none_or(|b| !b.matches(rate, capacity)) {
                *bucket = Some(TokenBucket::new(rate, capacity));
            }
            if let Err(wait) = bucket.as_mut().expect("just set").take(now) {
                return Err(ApiError::too_many_requests(
                    format!("the tenant is limited to {rate} requests per second"),
                    whole_seconds(wait),
                ));
            }
        }
        let permit = match quota.max_concurrency {
            Some(cap) => {
                let semaphore = {
                    let mut running = lock(&state.running);
                    if running.as_ref().is_none_or(|(c, _)| *c != cap) {
                        *running = Some((cap, Arc::new(Semaphore::new(cap as usize))));
                    }
                    running.as_ref().expect("just set").1.clone()
                };
                Some(semaphore.try_acquire_owned().map_err(|_| {
                    ApiError::too_many_requests(
                        format!("the tenant is already running {cap} requests"),
                        1,
                    )
                })?)
            }
            None => None,
        };
        Ok(Admitted { permit, budget })
    }

    /// Drops a deleted tenant's state.
    pub fn forget(&self, tenant: &str) {
        lock(&self.tenants).remove(tenant);
    }

    fn state(&self, tenant: &str) -> Arc<TenantState> {
        lock(&self.tenants)
            .entry(tenant.to_string())
            .or_default()
            .clone()
    }
}

/// A tenant's compute budget, as the runtime sees it.
#[derive(Debug)]
struct TenantCompute {
    state: Arc<TenantState>,
    cap: Duration,
}

impl ComputeBudget for TenantCompute {
    fn check(&self) -> Result<(), String> {
        if lock(&self.state.compute).used(Instant::now()) >= self.cap {
            Err(format!(
                "the tenant's model compute quota ({:.1} s per minute) is used up",
                self.cap.as_secs_f64()
            ))
        } else {
            Ok(())
        }
    }

    fn charge(&self, spent: Duration) {
        lock(&self.state.compute).charge(Instant::now(), spent);
    }
}

fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
