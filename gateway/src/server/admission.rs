//! Per-tenant admission of requests: requests per second (token bucket),
//! concurrent requests, model compute and generated tokens per minute.
//! Refusals are 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gigafactory_runtime::ComputeBudget;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::quota::{Quota, TokenBucket, Window};

/// The in-memory state behind every tenant's request-time quotas.
#[derive(Default)]
pub struct Admission {
    tenants: Mutex<HashMap<String, Arc<TenantState>>>,
}

#[derive(Debug, Default)]
struct TenantState {
    bucket: Mutex<Option<TokenBucket>>,
    running: Mutex<Option<(u32, Arc<Semaphore>)>>,
    compute: Mutex<Window<Duration>>,
    tokens: Mutex<Window<u64>>,
    outbound: Mutex<Option<(u32, Arc<Semaphore>)>>,
}

/// Outbound connections a tenant's functions may hold open at once,
/// without a quota saying otherwise.
pub const DEFAULT_OUTBOUND_CONNECTIONS: u32 = 64;

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
        if let Some(seconds) = quota.compute_seconds_per_minute {
            let mut window = lock(&state.compute);
            if window.used(now) >= secs(seconds) {
                return Err(ApiError::too_many_requests(
                    format!("the tenant used its {seconds} s of model compute this minute"),
                    whole_seconds(window.relief_in(now)),
                ));
            }
        }
        let budget = (quota.compute_seconds_per_minute.is_some()
            || quota.generated_tokens_per_minute.is_some())
        .then(|| {
            Arc::new(TenantBudget {
                state: state.clone(),
                compute: quota.compute_seconds_per_minute.map(secs),
                tokens: quota.generated_tokens_per_minute,
            }) as Arc<dyn ComputeBudget>
        });
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

    /// Refuses `tenant` while the tokens it generated this minute reach
    /// its quota's cap.
    pub fn may_generate(&self, tenant: &str, quota: &Quota) -> Result<(), ApiError> {
        let Some(cap) = quota.generated_tokens_per_minute else {
            return Ok(());
        };
        let state = self.state(tenant);
        let now = Instant::now();
        let mut window = lock(&state.tokens);
        if window.used(now) >= cap {
            return Err(ApiError::too_many_requests(
                format!("the tenant generated its {cap} tokens this minute"),
                whole_seconds(window.relief_in(now)),
            ));
        }
        Ok(())
    }

    /// The semaphore of `tenant`'s outbound connections, sized by its quota.
    pub fn outbound(&self, tenant: &str, quota: &Quota) -> Arc<Semaphore> {
        let cap = quota
            .max_outbound_connections
            .unwrap_or(DEFAULT_OUTBOUND_CONNECTIONS);
        let state = self.state(tenant);
        let mut outbound = lock(&state.outbound);
        match outbound.as_mut() {
            None => *outbound = Some((cap, Arc::new(Semaphore::new(cap as usize)))),
            // A changed cap resizes the same semaphore, so connections open
            // under the old cap stay counted; a lower cap takes the
            // difference away as connections close.
            Some((old, semaphore)) if *old != cap => {
                if cap > *old {
                    semaphore.add_permits((cap - *old) as usize);
                } else {
                    let (semaphore, fewer) = (semaphore.clone(), *old - cap);
                    tokio::spawn(async move {
                        if let Ok(permits) = semaphore.acquire_many_owned(fewer).await {
                            permits.forget();
                        }
                    });
                }
                *old = cap;
            }
            Some(_) => {}
        }
        outbound.as_ref().expect("just set").1.clone()
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

/// A tenant's budget of model work, as the runtime sees it.
#[derive(Debug)]
struct TenantBudget {
    state: Arc<TenantState>,
    compute: Option<Duration>,
    tokens: Option<u64>,
}

impl ComputeBudget for TenantBudget {
    fn check(&self) -> Result<(), String> {
        match self.compute {
            Some(cap) if lock(&self.state.compute).used(Instant::now()) >= cap => Err(format!(
                "the tenant's model compute quota ({:.1} s per minute) is used up",
                cap.as_secs_f64()
            )),
            _ => Ok(()),
        }
    }

    fn charge(&self, spent: Duration) {
        lock(&self.state.compute).charge(Instant::now(), spent);
    }

    fn check_tokens(&self) -> Result<(), String> {
        let Some(cap) = self.tokens else {
            return Ok(());
        };
        let now = Instant::now();
        let window = &mut lock(&self.state.tokens);
        if window.used(now) >= cap {
            Err(format!(
                "the tenant's quota of {cap} generated tokens per minute is used up \
                 (retry in {} s)",
                whole_seconds(window.relief_in(now))
            ))
        } else {
            Ok(())
        }
    }

    fn charge_tokens(&self, tokens: u64) {
        lock(&self.state.tokens).charge(Instant::now(), tokens);
    }
}

/// Seconds as a duration, saturating (quotas are range-checked when set,
/// but a stored one is never trusted to be).
fn secs(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX)
}

fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().clamp(1.0, 86_400.0) as u64
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
