//! Per-tenant admission of requests: requests per second (token bucket),
//! concurrent requests, model compute and generated tokens per minute.
//! Refusals are 429 with `Retry-After`.
//!
//! In a cluster the quotas hold for the tenant across its nodes. Each node
//! reports in its heartbeat, per tenant, its demand (requests arriving per
//! second, smoothed) and its compute and tokens of the last minute
//! ([`Admission::report`]), and learns the others' ([`ClusterLoad`]).
//! Rate and concurrency are split in proportion to demand: a node's share
//! is `(d + ε) / Σ(d + ε)`, so the shares add up to one and a node that
//! starts seeing traffic gets a foothold. Compute and tokens are checked
//! against this node's window plus the others' last reported use.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gigafactory_runtime::ComputeBudget;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::quota::{Quota, TokenBucket, Window};
use crate::usage::Meter;

/// The in-memory state behind every tenant's request-time quotas.
#[derive(Default)]
pub struct Admission {
    tenants: Mutex<HashMap<String, Arc<TenantState>>>,
    /// Where the tenants' model compute and generated tokens are metered.
    usage: Arc<Meter>,
    /// The other nodes' load, as of the last heartbeat.
    cluster: Mutex<Arc<ClusterLoad>>,
    /// When this node last reported.
    reported: Mutex<Option<Instant>>,
}

#[derive(Debug, Default)]
struct TenantState {
    bucket: Mutex<Option<TokenBucket>>,
    running: Mutex<Option<(u32, Arc<Semaphore>)>>,
    compute: Mutex<Window<Duration>>,
    tokens: Mutex<Window<u64>>,
    outbound: Mutex<Option<(u32, Arc<Semaphore>)>>,
    /// Requests that arrived since the last report.
    arrivals: AtomicU64,
    /// Requests per second arriving here, smoothed over reports.
    demand: Mutex<f64>,
}

/// What one node reports of one tenant.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TenantLoad {
    /// Requests per second arriving (smoothed).
    pub demand: f64,
    /// Model compute charged in the last minute, in seconds.
    pub compute_seconds: f64,
    /// Tokens generated in the last minute.
    pub tokens: u64,
}

/// The other live nodes' load.
#[derive(Debug, Default)]
pub struct ClusterLoad {
    /// Live nodes that take work, this one included.
    pub nodes: usize,
    /// Per tenant, the sum of the other nodes' reports.
    pub others: HashMap<String, TenantLoad>,
}

/// The demand every node adds to each tenant's, so that the shares add up
/// to one and a node without traffic yet still admits some.
const FOOTHOLD: f64 = 0.5;

/// Outbound connections a tenant's functions may hold open at once,
/// without a quota saying otherwise.
pub const DEFAULT_OUTBOUND_CONNECTIONS: u32 = 64;

/// What an admitted request holds: its concurrency slot and its compute budget.
pub struct Admitted {
    /// Released when the response body ends.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Charged by the function's model calls (and metered).
    pub budget: Option<Arc<dyn ComputeBudget>>,
}

impl Admission {
    /// Admission metering the tenants' model use into `usage`.
    pub fn new(usage: Arc<Meter>) -> Self {
        Self {
            usage,
            ..Self::default()
        }
    }

    /// Admits one request of `tenant` under `quota`, or says when to retry.
    pub fn admit(&self, tenant: &str, quota: &Quota) -> Result<Admitted, ApiError> {
        let state = self.state(tenant);
        state.arrivals.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let (share, elsewhere) = self.share(tenant, &state);
        if let Some(seconds) = quota.compute_seconds_per_minute {
            let mut window = lock(&state.compute);
            if window.used(now) + secs(elsewhere.compute_seconds) >= secs(seconds) {
                return Err(ApiError::too_many_requests(
                    format!("the tenant used its {seconds} s of model compute this minute"),
                    whole_seconds(window.relief_in(now)),
                ));
            }
        }
        let budget: Arc<dyn ComputeBudget> = Arc::new(TenantBudget {
            tenant: tenant.to_string(),
            usage: self.usage.clone(),
            state: state.clone(),
            compute: quota.compute_seconds_per_minute.map(secs),
            tokens: quota.generated_tokens_per_minute,
            elsewhere,
        });
        if let Some(rate) = quota.requests_per_second {
            let capacity = quota.burst.map_or(rate.ceil().max(1.0), f64::from);
            let (rate_here, capacity_here) = (rate * share, (capacity * share).max(1.0));
            let mut bucket = lock(&state.bucket);
            match bucket.as_mut() {
                None => *bucket = Some(TokenBucket::new(rate_here, capacity_here)),
                Some(b) if !b.matches(rate_here, capacity_here) => {
                    b.set(now, rate_here, capacity_here);
                }
                Some(_) => {}
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
                let here = ((f64::from(cap) * share).round() as u32).clamp(1, cap);
                let semaphore = resized(&state.running, here);
                Some(semaphore.try_acquire_owned().map_err(|_| {
                    ApiError::too_many_requests(
                        format!("the tenant is already running {cap} requests"),
                        1,
                    )
                })?)
            }
            None => None,
        };
        Ok(Admitted {
            permit,
            budget: Some(budget),
        })
    }

    /// Refuses `tenant` while the tokens it generated this minute reach
    /// its quota's cap.
    pub fn may_generate(&self, tenant: &str, quota: &Quota) -> Result<(), ApiError> {
        let Some(cap) = quota.generated_tokens_per_minute else {
            return Ok(());
        };
        let state = self.state(tenant);
        let elsewhere = self
            .cluster()
            .others
            .get(tenant)
            .copied()
            .unwrap_or_default();
        let now = Instant::now();
        let mut window = lock(&state.tokens);
        if window.used(now) + elsewhere.tokens >= cap {
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
        resized(&self.state(tenant).outbound, cap)
    }

    /// This node's share of `tenant`'s rate and concurrency, and the
    /// other nodes' load of it.
    fn share(&self, tenant: &str, state: &TenantState) -> (f64, TenantLoad) {
        let cluster = self.cluster();
        let elsewhere = cluster.others.get(tenant).copied().unwrap_or_default();
        if cluster.nodes <= 1 {
            return (1.0, elsewhere);
        }
        let mine = *lock(&state.demand) + FOOTHOLD;
        let all = mine + elsewhere.demand + (cluster.nodes - 1) as f64 * FOOTHOLD;
        ((mine / all).clamp(0.0, 1.0), elsewhere)
    }

    fn cluster(&self) -> Arc<ClusterLoad> {
        lock(&self.cluster).clone()
    }

    /// What this node reports of its tenants in a heartbeat: demand since
    /// the last report (smoothed), compute and tokens of the last minute.
    /// Tenants with none of these are left out.
    pub fn report(&self) -> BTreeMap<String, TenantLoad> {
        let now = Instant::now();
        let elapsed = lock(&self.reported).replace(now).map_or(1.0, |then| {
            now.duration_since(then).as_secs_f64().max(0.001)
        });
        let tenants: Vec<(String, Arc<TenantState>)> = lock(&self.tenants)
            .iter()
            .map(|(name, state)| (name.clone(), state.clone()))
            .collect();
        let mut report = BTreeMap::new();
        for (name, state) in tenants {
            let arrived = state.arrivals.swap(0, Ordering::Relaxed) as f64 / elapsed;
            let demand = {
                let mut demand = lock(&state.demand);
                *demand = (*demand + arrived) / 2.0;
                *demand
            };
            let load = TenantLoad {
                demand: if demand < 0.01 { 0.0 } else { demand },
                compute_seconds: lock(&state.compute).used(now).as_secs_f64(),
                tokens: lock(&state.tokens).used(now),
            };
            if load != TenantLoad::default() {
                report.insert(name, load);
            }
        }
        report
    }

    /// Takes in the other nodes' load, as of their last heartbeats.
    pub fn set_cluster(&self, load: ClusterLoad) {
        *lock(&self.cluster) = Arc::new(load);
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

/// A tenant's budget of model work, as the runtime sees it: its quota's
/// windows, and the meter of its usage.
#[derive(Debug)]
struct TenantBudget {
    tenant: String,
    usage: Arc<Meter>,
    state: Arc<TenantState>,
    compute: Option<Duration>,
    tokens: Option<u64>,
    /// The other nodes' use, as of the request's admission.
    elsewhere: TenantLoad,
}

impl ComputeBudget for TenantBudget {
    fn check(&self) -> Result<(), String> {
        match self.compute {
            Some(cap)
                if lock(&self.state.compute).used(Instant::now())
                    + secs(self.elsewhere.compute_seconds)
                    >= cap =>
            {
                Err(format!(
                    "the tenant's model compute quota ({:.1} s per minute) is used up",
                    cap.as_secs_f64()
                ))
            }
            _ => Ok(()),
        }
    }

    fn charge(&self, spent: Duration) {
        if self.compute.is_some() {
            lock(&self.state.compute).charge(Instant::now(), spent);
        }
        let spent = u64::try_from(spent.as_micros()).unwrap_or(u64::MAX);
        self.usage
            .record(&self.tenant, |used| used.model_us += spent);
    }

    fn check_tokens(&self) -> Result<(), String> {
        let Some(cap) = self.tokens else {
            return Ok(());
        };
        let now = Instant::now();
        let window = &mut lock(&self.state.tokens);
        if window.used(now) + self.elsewhere.tokens >= cap {
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
        if self.tokens.is_some() {
            lock(&self.state.tokens).charge(Instant::now(), tokens);
        }
        self.usage
            .record(&self.tenant, |used| used.generated_tokens += tokens);
    }

    fn charge_prompt_tokens(&self, tokens: u64) {
        self.usage
            .record(&self.tenant, |used| used.prompt_tokens += tokens);
    }
}

/// The semaphore in `slot`, sized `cap`. A changed cap resizes the same
/// semaphore, so what was taken under the old cap stays counted; a lower
/// cap takes the difference away as permits come back.
fn resized(slot: &Mutex<Option<(u32, Arc<Semaphore>)>>, cap: u32) -> Arc<Semaphore> {
    let mut slot = lock(slot);
    match slot.as_mut() {
        None => *slot = Some((cap, Arc::new(Semaphore::new(cap as usize)))),
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
    slot.as_ref().expect("just set").1.clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn burst(admission: &Admission, quota: &Quota) -> usize {
        (0..100)
            .take_while(|_| admission.admit("t", quota).is_ok())
            .count()
    }

    #[test]
    fn a_node_admits_its_share_of_a_tenants_rate() {
        let quota = Quota {
            requests_per_second: Some(30.0),
            ..Quota::default()
        };
        let alone = Admission::default();
        assert_eq!(burst(&alone, &quota), 30);

        // Two other nodes see twice this one's demand between them.
        let shared = Admission::default();
        *lock(&shared.state("t").demand) = 20.0;
        let others = TenantLoad {
            demand: 40.0,
            ..TenantLoad::default()
        };
        shared.set_cluster(ClusterLoad {
            nodes: 3,
            others: HashMap::from([("t".to_string(), others)]),
        });
        assert_eq!(burst(&shared, &quota), 10);
    }

    #[test]
    fn other_nodes_compute_counts_against_the_quota() {
        let quota = Quota {
            compute_seconds_per_minute: Some(10.0),
            ..Quota::default()
        };
        let admission = Admission::default();
        assert!(admission.admit("t", &quota).is_ok());
        let others = TenantLoad {
            compute_seconds: 10.0,
            ..TenantLoad::default()
        };
        admission.set_cluster(ClusterLoad {
            nodes: 2,
            others: HashMap::from([("t".to_string(), others)]),
        });
        let refused = admission.admit("t", &quota).err().expect("refused");
        assert_eq!(refused.status(), hyper::StatusCode::TOO_MANY_REQUESTS);
    }
}
