//! Counters for `/metrics` (Prometheus text format, admin only): deploys,
//! compilations, and every invocation's outcome per tenant and function.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use gigafactory_runtime::Counters;

/// The gateway's counters.
#[derive(Default)]
pub struct Metrics {
    deploys: AtomicU64,
    outcomes: Mutex<BTreeMap<(String, String, &'static str), u64>>,
}

impl Metrics {
    /// Counts a successful deploy.
    pub fn deployed(&self) {
        self.deploys.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an invocation of an existing function by its owner:
    /// `ok` or the error code it ended with.
    pub fn invoked(&self, tenant: &str, function: &str, outcome: &'static str) {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        *outcomes
            .entry((tenant.to_string(), function.to_string(), outcome))
            .or_default() += 1;
    }

    /// Forgets a deleted function's counters.
    pub fn forget(&self, tenant: &str, function: Option<&str>) {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        outcomes.retain(|(t, f, _), _| t != tenant || function.is_some_and(|name| name != f));
    }

    /// The Prometheus text exposition.
    pub fn render(&self, runtime: &Counters) -> String {
        let mut text = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = write!(
                text,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            );
        };
        counter(
            "gigafactory_compilations_total",
            "Components compiled from wasm.",
            runtime.compilations(),
        );
        counter(
            "gigafactory_artifact_loads_total",
            "Precompiled artifacts loaded.",
            runtime.artifact_loads(),
        );
        counter(
            "gigafactory_deploys_total",
            "Successful deploys.",
            self.deploys.load(Ordering::Relaxed),
        );
        text.push_str(
            "# HELP gigafactory_function_requests_total Invocations by tenant, function and outcome (ok or the error code).\n\
             # TYPE gigafactory_function_requests_total counter\n",
        );
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        for ((tenant, function, outcome), count) in outcomes.iter() {
            // Names are validated to [a-z0-9-], so they need no escaping.
            let _ = writeln!(
                text,
                "gigafactory_function_requests_total{{tenant=\"{tenant}\",function=\"{function}\",outcome=\"{outcome}\"}} {count}"
            );
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_outcomes_per_function() {
        let metrics = Metrics::default();
        metrics.invoked("a", "f", "ok");
        metrics.invoked("a", "f", "ok");
        metrics.invoked("a", "f", "deadline_exceeded");
        metrics.invoked("b", "g", "ok");
        metrics.forget("b", None);
        let text = metrics.render(&Counters::default());
        assert!(text.contains("gigafactory_function_requests_total{tenant=\"a\",function=\"f\",outcome=\"ok\"} 2\n"), "{text}");
        assert!(
            text.contains("outcome=\"deadline_exceeded\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("tenant=\"b\""), "{text}");
    }
}
