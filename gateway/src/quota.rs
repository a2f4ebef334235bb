//! Tenant quotas: caps the admin sets per tenant, checked on every deploy
//! (functions, stored bytes, what a manifest may ask for) and every request
//! (concurrency, requests per second, model compute time and generated
//! tokens per minute).

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

/// What a tenant may use. Every cap is optional; `None` means the
/// platform's own limit. Unknown keys are an error.
///
/// ```json
/// {"max_functions": 10, "max_stored_bytes": 104857600, "max_memory_mib": 128,
///  "max_concurrency": 20, "requests_per_second": 50, "burst": 100,
///  "compute_seconds_per_minute": 30, "generated_tokens_per_minute": 20000,
///  "models": ["all-minilm-l6-v2"]}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Functions the tenant may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_functions: Option<u32>,
    /// Bytes of wasm and files all its versions may keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stored_bytes: Option<u64>,
    /// Linear memory one instance may use, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    /// Requests of all its functions running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Sustained requests per second (token bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Requests the bucket holds (default: one second's worth, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Seconds of model compute per minute, over all its functions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_seconds_per_minute: Option<f64>,
    /// Tokens its functions and OpenAI-compatible calls may generate per
    /// minute. A generation started under the cap runs to its end; the
    /// next is refused until the minute's tokens expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_tokens_per_minute: Option<u64>,
    /// Memory for the graphs its functions `load` from their own ONNX bytes,
    /// cached per content hash (default 256 MiB; least recently used evicted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_memory_mib: Option<u64>,
    /// Outbound `wasi:http` connections its functions may hold open at
    /// once (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_outbound_connections: Option<u32>,
    /// Bytes of private models (their files) the tenant may add through
    /// the API; default 0: none until the operator grants some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_bytes: Option<u64>,
    /// Repository models it may use (default: those marked `public`), its
    /// own private models aside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
}

/// The platform's own limits a quota's caps must stay within.
#[derive(Debug, Clone, Copy)]
pub struct PlatformLimits {
    /// Largest linear memory of one instance, in MiB.
    pub memory_mib: u64,
    /// Instances that may run at once.
    pub concurrency: u32,
}

/// Largest `max_model_memory_mib` (1 TiB).
pub const MAX_MODEL_MEMORY_MIB: u64 = 1 << 20;

/// Largest `max_outbound_connections`.
pub const MAX_OUTBOUND_CONNECTIONS: u32 = 10_000;

/// Largest `compute_seconds_per_minute`: a minute of 1024 cores.
pub const MAX_COMPUTE_SECONDS_PER_MINUTE: f64 = 60.0 * 1024.0;

/// What a tenant uses of its deploy-time caps, kept in its record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Usage {
    /// Functions it has.
    pub functions: u32,
    /// Bytes its versions keep (wasm and files).
    pub stored_bytes: u64,
    /// Bytes its private models' files take.
    #[serde(default)]
    pub model_bytes: u64,
}

impl Quota {
    /// Checks the quota itself: every number within its range (the
    /// memory and concurrency caps within the platform's `limits`), known
    /// models. The error names the key and the range.
    pub fn validate(&self, models: &[String], limits: &PlatformLimits) -> Result<(), String> {
        let ranges = [
            (
                "max_functions",
                self.max_functions.map(f64::from),
                1.0,
                100_000.0,
            ),
            (
                "max_stored_bytes",
                self.max_stored_bytes.map(|v| v as f64),
                1.0,
                (1u64 << 40) as f64,
            ),
            (
                "max_model_bytes",
                self.max_model_bytes.map(|v| v as f64),
                0.0,
                crate::store::MAX_MODEL_FILE_BYTES as f64,
            ),
            (
                "max_memory_mib",
                self.max_memory_mib.map(|v| v as f64),
                1.0,
                limits.memory_mib as f64,
            ),
            (
                "max_model_memory_mib",
                self.max_model_memory_mib.map(|v| v as f64),
                1.0,
                MAX_MODEL_MEMORY_MIB as f64,
            ),
            (
                "max_concurrency",
                self.max_concurrency.map(f64::from),
                1.0,
                f64::from(limits.concurrency),
            ),
            (
                "max_outbound_connections",
                self.max_outbound_connections.map(f64::from),
                1.0,
                f64::from(MAX_OUTBOUND_CONNECTIONS),
            ),
            ("requests_per_second", self.requests_per_second, 0.01, 1e6),
            ("burst", self.burst.map(f64::from), 1.0, 1e6),
            (
                "compute_seconds_per_minute",
                self.compute_seconds_per_minute,
                0.001,
                MAX_COMPUTE_SECONDS_PER_MINUTE,
            ),
            (
                "generated_tokens_per_minute",
                self.generated_tokens_per_minute.map(|v| v as f64),
                1.0,
                1e9,
            ),
        ];
        for (key, value, low, high) in ranges {
            if let Some(value) = value
                && !(low..=high).contains(&value)
            {
                return Err(format!(
                    "{key} = {value} is out of range: use {low} to {high}"
                ));
            }
        }
        for model in self.models.iter().flatten() {
            if !models.contains(model) {
                return Err(format!(
                    "models: no model {model:?} (available: {models:?})"
                ));
            }
        }
        Ok(())
    }

    /// Checks that a manifest asks for no more than this quota allows;
    /// `visible` are the models the tenant may use.
    pub fn admits(&self, manifest: &Manifest, visible: &BTreeSet<String>) -> Result<(), String> {
        if let (Some(asked), Some(cap)) = (manifest.memory_mib, self.max_memory_mib)
            && asked > cap
        {
            return Err(format!(
                "memory_mib = {asked} is over the tenant's max_memory_mib of {cap}"
            ));
        }
        if let (Some(asked), Some(cap)) = (manifest.max_concurrency, self.max_concurrency)
            && asked > cap
        {
            return Err(format!(
                "max_concurrency = {asked} is over the tenant's max_concurrency of {cap}"
            ));
        }
        if let Some(model) = manifest
            .models
            .iter()
            .flatten()
            .find(|m| !visible.contains(*m))
        {
            return Err(format!("models: the tenant may not use {model:?}"));
        }
        Ok(())
    }

    /// Checks a deploy's new usage against the caps.
    pub fn admits_usage(&self, usage: Usage) -> Result<(), String> {
        if let Some(cap) = self.max_functions
            && usage.functions > cap
        {
            return Err(format!("the tenant may have at most {cap} functions"));
        }
        if let Some(cap) = self.max_stored_bytes
            && usage.stored_bytes > cap
        {
            return Err(format!(
                "the tenant's functions would keep {} bytes, over its max_stored_bytes of {cap}",
                usage.stored_bytes
            ));
        }
        Ok(())
    }

    /// Whether the tenant's private models may take `bytes` in all.
    pub fn admits_model_bytes(&self, bytes: u64) -> Result<(), String> {
        let cap = self.max_model_bytes.unwrap_or(0);
        if bytes > cap {
            return Err(format!(
                "the tenant's private models would take {bytes} bytes, over its max_model_bytes of {cap}{}",
                if cap == 0 {
                    " (the operator grants it with `gigafactory tenant quota`)"
                } else {
                    ""
                }
            ));
        }
        Ok(())
    }
}

/// A token bucket: `rate` tokens a second, at most `capacity` saved.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, capacity: f64) -> Self {
        Self {
            rate,
            capacity,
            tokens: capacity,
            updated: Instant::now(),
        }
    }

    /// Whether this bucket was made for these settings.
    pub fn matches(&self, rate: f64, capacity: f64) -> bool {
        self.rate == rate && self.capacity == capacity
    }

    /// Changes the rate and capacity, keeping the tokens it has (at most
    /// the new capacity): a changed share never refills the bucket.
    pub fn set(&mut self, now: Instant, rate: f64, capacity: f64) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(capacity);
        self.updated = now;
        self.rate = rate;
        self.capacity = capacity;
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / self.rate;
            Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
        }
    }
}

/// What a tenant was charged over the last minute: model compute time, or
/// generated tokens.
#[derive(Debug, Default)]
pub struct Window<A> {
    charges: VecDeque<(Instant, A)>,
    total: A,
}

const WINDOW: Duration = Duration::from_secs(60);

/// Charges this close together are kept as one (a generation charges each
/// token as it comes).
const COALESCE: Duration = Duration::from_millis(100);

impl<A> Window<A>
where
    A: Copy + Default + std::ops::AddAssign + std::ops::SubAssign,
{
    /// Adds a charge.
    pub fn charge(&mut self, now: Instant, amount: A) {
        self.expire(now);
        self.total += amount;
        match self.charges.back_mut() {
            Some((at, last)) if now.saturating_duration_since(*at) < COALESCE => *last += amount,
            _ => self.charges.push_back((now, amount)),
        }
    }

    /// What was charged in the last minute.
    pub fn used(&mut self, now: Instant) -> A {
        self.expire(now);
        self.total
    }

    /// How long until the oldest charge leaves the window.
    pub fn relief_in(&self, now: Instant) -> Duration {
        self.charges.front().map_or(Duration::ZERO, |(at, _)| {
            (*at + WINDOW).saturating_duration_since(now)
        })
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, amount)) = self.charges.front() {
            if now.saturating_duration_since(at) < WINDOW {
                break;
            }
            self.charges.pop_front();
            self.total -= amount;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 2.0);
        assert!(bucket.take(start).is_ok());
        assert!(bucket.take(start).is_ok());
        let wait = bucket.take(start).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert!(bucket.take(start + Duration::from_millis(500)).is_ok());
        assert!(bucket.take(start + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn compute_charges_expire_after_a_minute() {
        let start = Instant::now();
        let mut window = Window::<Duration>::default();
        window.charge(start, Duration::from_secs(2));
        window.charge(start + Duration::from_secs(30), Duration::from_secs(3));
        assert_eq!(
            window.used(start + Duration::from_secs(59)),
            Duration::from_secs(5)
        );
        assert_eq!(
            window.relief_in(start + Duration::from_secs(59)),
            Duration::from_secs(1)
        );
        assert_eq!(
            window.used(start + Duration::from_secs(61)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn token_charges_coalesce_and_expire() {
        let start = Instant::now();
        let mut window = Window::<u64>::default();
        for ms in [0, 10, 20, 150] {
            window.charge(start + Duration::from_millis(ms), 1);
        }
        assert_eq!(window.charges.len(), 2, "{:?}", window.charges);
        assert_eq!(window.used(start + Duration::from_secs(1)), 4);
        assert_eq!(window.used(start + Duration::from_millis(60_100)), 1);
        assert_eq!(window.used(start + Duration::from_secs(61)), 0);
    }

    #[test]
    fn manifests_may_ask_only_for_less() {
        let quota = Quota {
            max_memory_mib: Some(64),
            ..Quota::default()
        };
        let visible = BTreeSet::from(["a".to_string()]);
        let asks = |text: &str| quota.admits(&Manifest::parse(text).unwrap(), &visible);
        assert!(asks("memory_mib = 64").is_ok());
        assert!(
            asks("memory_mib = 65")
                .unwrap_err()
                .contains("max_memory_mib of 64")
        );
        assert!(
            asks("models = [\"b\"]")
                .unwrap_err()
                .contains("may not use \"b\"")
        );
        let limits = PlatformLimits {
            memory_mib: 256,
            concurrency: 1000,
        };
        let refused = |quota: Quota| quota.validate(&[], &limits).unwrap_err();
        let out_of_range = [
            Quota {
                requests_per_second: Some(0.0),
                ..Quota::default()
            },
            Quota {
                requests_per_second: Some(1e-300),
                ..Quota::default()
            },
            Quota {
                compute_seconds_per_minute: Some(1e300),
                ..Quota::default()
            },
            Quota {
                max_memory_mib: Some(1 << 44),
                ..Quota::default()
            },
            Quota {
                max_concurrency: Some(1001),
                ..Quota::default()
            },
        ];
        for quota in out_of_range {
            assert!(refused(quota.clone()).contains("out of range"), "{quota:?}");
        }
        assert!(
            Quota {
                max_memory_mib: Some(256),
                requests_per_second: Some(0.5),
                ..Quota::default()
            }
            .validate(&[], &limits)
            .is_ok()
        );
    }
}
