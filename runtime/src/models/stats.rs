//! What each repository model has done: calls, rejections, batches, queue
//! wait, compute time, and compute seconds per tenant.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::stats::{BATCH_BUCKETS, Distribution, Histogram, LATENCY_BUCKETS, header, label};

/// One model's counters, shared by its batcher and the pool.
#[derive(Debug)]
pub struct ModelStats {
    calls: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    abandoned: AtomicU64,
    retried: AtomicU64,
    batch_rows: Histogram,
    queue_wait: Histogram,
    compute: Histogram,
    tenant_seconds: Mutex<BTreeMap<String, TenantCalls>>,
}

/// What one tenant's calls took of a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TenantCalls {
    /// Calls answered.
    pub calls: u64,
    /// Compute seconds charged (its share of each batch).
    pub compute_seconds: f64,
}

impl Default for ModelStats {
    fn default() -> Self {
        Self {
            calls: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            batch_rows: Histogram::new(BATCH_BUCKETS),
            queue_wait: Histogram::new(LATENCY_BUCKETS),
            compute: Histogram::new(LATENCY_BUCKETS),
            tenant_seconds: Mutex::new(BTreeMap::new()),
        }
    }
}

/// A snapshot for `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    /// `compute` calls answered (successfully or not), not counting rejections.
    pub calls: u64,
    /// Calls refused at once because the queue was full.
    pub rejected: u64,
    /// Calls whose backend run failed.
    pub failed: u64,
    /// Calls dropped before they ran because their caller went away.
    pub abandoned: u64,
    /// Batches that failed and were run again call by call, so that only
    /// the calls causing the failure got it.
    pub batches_retried_alone: u64,
    /// Backend runs (one per batch).
    pub batches: u64,
    /// Mean rows per batch.
    pub mean_batch_rows: f64,
    /// Total backend run time, in seconds.
    pub compute_seconds: f64,
    /// Calls waiting right now.
    pub queued: usize,
    /// Rows per backend run.
    pub batch_rows: Distribution,
    /// Time calls waited before their batch ran, in seconds.
    pub queue_wait_seconds: Distribution,
}

impl ModelStats {
    /// A call refused because the queue was full.
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// A call dropped before it ran: its caller went away.
    pub fn abandoned(&self) {
        self.abandoned.fetch_add(1, Ordering::Relaxed);
    }

    /// A failed batch run again call by call.
    pub fn retried_alone(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }

    /// A call that waited `wait` before its batch started.
    pub fn waited(&self, wait: Duration) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.queue_wait.observe_duration(wait);
    }

    /// One backend run of `rows` rows that took `spent`; `failed` calls got its error.
    pub fn ran(&self, rows: usize, spent: Duration, failed: usize) {
        self.batch_rows.observe(rows as f64);
        self.compute.observe_duration(spent);
        self.failed.fetch_add(failed as u64, Ordering::Relaxed);
    }

    /// Charges `spent` of compute to `tenant`.
    pub fn charge(&self, tenant: &str, spent: Duration) {
        let mut seconds = self
            .tenant_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let used = seconds.entry(tenant.to_string()).or_default();
        used.calls += 1;
        used.compute_seconds += spent.as_secs_f64();
    }

    /// Forgets a deleted tenant's compute seconds.
    pub fn forget_tenant(&self, tenant: &str) {
        let mut seconds = self
            .tenant_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        seconds.remove(tenant);
    }

    /// The counters now, with `queued` calls waiting.
    pub fn snapshot(&self, queued: usize) -> StatsSnapshot {
        let batches = self.batch_rows.count();
        StatsSnapshot {
            calls: self.calls.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            batches_retried_alone: self.retried.load(Ordering::Relaxed),
            batches,
            mean_batch_rows: if batches == 0 {
                0.0
            } else {
                self.batch_rows.sum() / batches as f64
            },
            compute_seconds: self.compute.sum(),
            queued,
            batch_rows: self.batch_rows.distribution(),
            queue_wait_seconds: self.queue_wait.distribution(),
        }
    }

    /// Each tenant's calls and compute seconds (the operator's view only:
    /// one tenant's use is not another's to see).
    pub fn tenants(&self) -> BTreeMap<String, TenantCalls> {
        self.tenant_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Renders every model's series, grouped by metric as the format wants.
pub fn render(out: &mut String, models: &[(&str, &ModelStats, usize)]) {
    let counter = |out: &mut String, name: &str, help: &str, value: &dyn Fn(&ModelStats) -> u64| {
        header(out, name, "counter", help);
        for (model, stats, _) in models {
            out.push_str(&format!(
                "{name}{{model=\"{}\"}} {}\n",
                label(model),
                value(stats)
            ));
        }
    };
    counter(
        out,
        "gigafactory_model_calls_total",
        "wasi-nn compute calls run by the model.",
        &|s| s.calls.load(Ordering::Relaxed),
    );
    counter(
        out,
        "gigafactory_model_rejections_total",
        "compute calls refused because the model's queue was full.",
        &|s| s.rejected.load(Ordering::Relaxed),
    );
    counter(
        out,
        "gigafactory_model_failures_total",
        "compute calls whose backend run failed.",
        &|s| s.failed.load(Ordering::Relaxed),
    );
    counter(
        out,
        "gigafactory_model_abandoned_total",
        "compute calls dropped before they ran because their caller went away.",
        &|s| s.abandoned.load(Ordering::Relaxed),
    );
    counter(
        out,
        "gigafactory_model_batches_retried_alone_total",
        "Failed batches run again call by call, so only the offending calls failed.",
        &|s| s.retried.load(Ordering::Relaxed),
    );
    header(
        out,
        "gigafactory_model_queue_depth",
        "gauge",
        "compute calls waiting for a batch.",
    );
    for (model, _, queued) in models {
        out.push_str(&format!(
            "gigafactory_model_queue_depth{{model=\"{}\"}} {queued}\n",
            label(model)
        ));
    }
    let histogram =
        |out: &mut String, name: &str, help: &str, which: &dyn Fn(&ModelStats) -> &Histogram| {
            header(out, name, "histogram", help);
            for (model, stats, _) in models {
                which(stats).render(out, name, &format!("model=\"{}\"", label(model)));
            }
        };
    histogram(
        out,
        "gigafactory_model_batch_rows",
        "Rows per backend run (1 when unbatched).",
        &|s| &s.batch_rows,
    );
    histogram(
        out,
        "gigafactory_model_queue_wait_seconds",
        "Time a compute call waited before its batch ran.",
        &|s| &s.queue_wait,
    );
    histogram(
        out,
        "gigafactory_model_compute_seconds",
        "Backend run time per batch.",
        &|s| &s.compute,
    );
    header(
        out,
        "gigafactory_model_tenant_compute_seconds_total",
        "counter",
        "Compute seconds charged to each tenant (its share of each batch).",
    );
    for (model, stats, _) in models {
        let seconds = stats
            .tenant_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (tenant, used) in seconds.iter() {
            let spent = used.compute_seconds;
            out.push_str(&format!(
                "gigafactory_model_tenant_compute_seconds_total{{model=\"{}\",tenant=\"{}\"}} {spent}\n",
                label(model),
                label(tenant)
            ));
        }
    }
}
