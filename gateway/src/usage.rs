//! What each tenant used, per hour, for chargeback: requests, the time its
//! functions ran, model compute, prompt and generated tokens and bytes in
//! and out.
//!
//! A node adds up its tenants' use in memory ([`Meter`]) and adds it to
//! the store every [`FLUSH_EVERY`] (and when it stops); the store sums
//! what every node adds, so in a cluster the figures are the cluster's.
//! What a node had not yet added when it crashed is lost: at most
//! [`FLUSH_EVERY`] of its use.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How often a node adds its tenants' use to the store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// Seconds in an hour: the granularity of usage.
pub const HOUR: u64 = 3600;

/// What a tenant used in one hour. Times are in microseconds so that
/// adding up many short requests loses nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumed {
    /// Requests to its functions and to the OpenAI-compatible API.
    #[serde(default)]
    pub requests: u64,
    /// Time its functions ran, from the request to the response's end.
    #[serde(default)]
    pub compute_us: u64,
    /// Tensor-model compute its requests were charged (wasi-nn and
    /// embeddings; text generation is counted in tokens).
    #[serde(default)]
    pub model_us: u64,
    /// Prompt tokens its generations were given.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated for it.
    #[serde(default)]
    pub generated_tokens: u64,
    /// Request body bytes received.
    #[serde(default)]
    pub bytes_in: u64,
    /// Response body bytes sent.
    #[serde(default)]
    pub bytes_out: u64,
}

impl Consumed {
    /// Adds `other` to this.
    pub fn add(&mut self, other: &Consumed) {
        self.requests += other.requests;
        self.compute_us += other.compute_us;
        self.model_us += other.model_us;
        self.prompt_tokens += other.prompt_tokens;
        self.generated_tokens += other.generated_tokens;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
    }

    /// Whether nothing was used.
    pub fn is_empty(&self) -> bool {
        *self == Consumed::default()
    }
}

/// One tenant's use in one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The tenant.
    pub tenant: String,
    /// The hour's start, Unix seconds (a multiple of [`HOUR`]).
    pub hour: u64,
    /// What it used then.
    pub consumed: Consumed,
}

/// The hour `at` falls in (its start, Unix seconds).
pub fn hour_of(at: SystemTime) -> u64 {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    secs - secs % HOUR
}

/// A node's use not yet added to the store, by tenant and hour.
#[derive(Debug, Default)]
pub struct Meter {
    pending: Mutex<HashMap<String, BTreeMap<u64, Consumed>>>,
    /// Held while rows taken are being added to the store, so that a
    /// reader who flushes first sees all of them.
    pub flushing: tokio::sync::Mutex<()>,
}

impl Meter {
    /// Records use by `tenant` now.
    pub fn record(&self, tenant: &str, used: impl FnOnce(&mut Consumed)) {
        let hour = hour_of(SystemTime::now());
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up by `&str`: the tenant's key is allocated once.
        if let Some(hours) = pending.get_mut(tenant) {
            used(hours.entry(hour).or_default());
        } else {
            let mut consumed = Consumed::default();
            used(&mut consumed);
            pending.insert(tenant.to_string(), BTreeMap::from([(hour, consumed)]));
        }
    }

    /// Takes what was recorded, to be added to the store.
    pub fn take(&self) -> Vec<UsageRow> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        pending
            .into_iter()
            .flat_map(|(tenant, hours)| {
                hours
                    .into_iter()
                    .filter(|(_, consumed)| !consumed.is_empty())
                    .map(move |(hour, consumed)| UsageRow {
                        tenant: tenant.clone(),
                        hour,
                        consumed,
                    })
            })
            .collect()
    }

    /// Puts back rows the store did not take (it was unreachable): they
    /// are added with the next flush.
    pub fn put_back(&self, rows: Vec<UsageRow>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for row in rows {
            pending
                .entry(row.tenant)
                .or_default()
                .entry(row.hour)
                .or_default()
                .add(&row.consumed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_use_is_taken_once_and_put_back_whole() {
        let meter = Meter::default();
        meter.record("acme", |c| c.requests += 1);
        meter.record("acme", |c| c.bytes_in += 10);
        meter.record("globex", |c| c.generated_tokens += 7);
        let mut rows = meter.take();
        rows.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].consumed.requests, 1);
        assert_eq!(rows[0].consumed.bytes_in, 10);
        assert_eq!(rows[1].consumed.generated_tokens, 7);
        assert!(meter.take().is_empty(), "taken once");
        meter.put_back(rows.clone());
        meter.record("acme", |c| c.requests += 1);
        let mut again = meter.take();
        again.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        assert_eq!(again[0].consumed.requests, 2);
        assert_eq!(again[1], rows[1]);
    }

    #[test]
    fn hours_start_on_the_hour() {
        let at = UNIX_EPOCH + Duration::from_secs(10 * HOUR + 1234);
        assert_eq!(hour_of(at), 10 * HOUR);
    }
}
