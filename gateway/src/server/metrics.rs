//! `/metrics` (Prometheus text format, admin only): deploys, compilations,
//! every invocation's outcome and latency per tenant and function, and the
//! model pool's series (batches, queue wait, compute, rejections, tenants'
//! compute seconds).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gigafactory_runtime::Counters;
use gigafactory_runtime::models::ModelPool;
use gigafactory_runtime::stats::{Histogram, LATENCY_BUCKETS, header};

/// The gateway's counters.
#[derive(Default)]
pub struct Metrics {
    /// The process's own series (`process_*`: CPU, memory, descriptors,
    /// start time), from the prometheus crate's collector.
    process: prometheus::Registry,
    deploys: AtomicU64,
    outcomes: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    latency: Mutex<BTreeMap<(String, String), Arc<Histogram>>>,
    forwarded: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Requests by route template.
    http: Mutex<BTreeMap<String, RouteSeries>>,
}

/// One route template's requests: counts by method and status, and the
/// time to their response head.
struct RouteSeries {
    counts: BTreeMap<(&'static str, u16), u64>,
    latency: Histogram,
}

impl Metrics {
    /// The counters, with the process collector registered.
    pub fn new() -> Self {
        let metrics = Self::default();
        let collector = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(error) = metrics.process.register(Box::new(collector)) {
            tracing::warn!("process metrics: {error}");
        }
        metrics
    }

    /// Counts a successful deploy.
    pub fn deployed(&self) {
        self.deploys.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an invocation of an existing function by its owner: `ok` or
    /// the error code it ended with, and the time to its response head.
    pub fn invoked(&self, tenant: &str, function: &str, outcome: &'static str, took: Duration) {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        *outcomes
            .entry((tenant.to_string(), function.to_string(), outcome))
            .or_default() += 1;
        drop(outcomes);
        let histogram = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((tenant.to_string(), function.to_string()))
            .or_insert_with(|| Arc::new(Histogram::new(LATENCY_BUCKETS)))
            .clone();
        histogram.observe_duration(took);
    }

    /// Counts a request sent to another node: `ok`, `unreachable` (tried
    /// the next) or `failed`.
    pub fn forwarded(&self, node: &str, outcome: &'static str) {
        let mut forwarded = self.forwarded.lock().unwrap_or_else(|e| e.into_inner());
        *forwarded.entry((node.to_string(), outcome)).or_default() += 1;
    }

    /// Counts a request to any route (its template, so the series stay
    /// few) with its status and the time to its response head.
    pub fn http_request(&self, route: &str, method: &hyper::Method, status: u16, took: Duration) {
        let method = match *method {
            hyper::Method::GET => "GET",
            hyper::Method::HEAD => "HEAD",
            hyper::Method::POST => "POST",
            hyper::Method::PUT => "PUT",
            hyper::Method::DELETE => "DELETE",
            hyper::Method::PATCH => "PATCH",
            hyper::Method::OPTIONS => "OPTIONS",
            _ => "other",
        };
        let mut http = self.http.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up by `&str`: a route's key is allocated once.
        if !http.contains_key(route) {
            let series = RouteSeries {
                counts: BTreeMap::new(),
                latency: Histogram::new(LATENCY_BUCKETS),
            };
            http.insert(route.to_string(), series);
        }
        if let Some(series) = http.get_mut(route) {
            *series.counts.entry((method, status)).or_default() += 1;
            series.latency.observe_duration(took);
        }
    }

    /// Forgets a deleted function's counters (all of a tenant's with `None`).
    pub fn forget(&self, tenant: &str, function: Option<&str>) {
        let keep = |t: &str, f: &str| t != tenant || function.is_some_and(|name| name != f);
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        outcomes.retain(|(t, f, _), _| keep(t, f));
        drop(outcomes);
        let mut latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        latency.retain(|(t, f), _| keep(t, f));
    }

    /// One function's requests on this node since it started: counts by
    /// outcome (`ok` or the error code) and the time to the response head.
    pub fn function_requests(&self, tenant: &str, function: &str) -> serde_json::Value {
        // Its outcomes sort together, from the empty one on.
        let from = (tenant.to_string(), function.to_string(), "");
        let outcomes: BTreeMap<&str, u64> = self
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .range(from..)
            .take_while(|((t, f, _), _)| t == tenant && f == function)
            .map(|((_, _, outcome), count)| (*outcome, *count))
            .collect();
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(tenant.to_string(), function.to_string()))
            .map(|histogram| histogram.distribution());
        serde_json::json!({ "outcomes": outcomes, "latency_seconds": latency })
    }

    /// The Prometheus text exposition.
    pub fn render(&self, runtime: &Counters, models: &ModelPool, loaded: usize) -> String {
        let mut text = prometheus::TextEncoder::new()
            .encode_to_string(&self.process.gather())
            .unwrap_or_default();
        header(
            &mut text,
            "gigafactory_build_info",
            "gauge",
            "The running build: always 1, its version as a label.",
        );
        let _ = writeln!(
            text,
            "gigafactory_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        header(
            &mut text,
            "gigafactory_loaded_functions",
            "gauge",
            "Function versions loaded (compiled code in memory).",
        );
        let _ = writeln!(text, "gigafactory_loaded_functions {loaded}");
        let mut counter = |name: &str, help: &str, value: u64| {
            header(&mut text, name, "counter", help);
            let _ = writeln!(text, "{name} {value}");
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
        header(
            &mut text,
            "gigafactory_function_requests_total",
            "counter",
            "Invocations by tenant, function and outcome (ok or the error code).",
        );
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        for ((tenant, function, outcome), count) in outcomes.iter() {
            // Names are validated to [a-z0-9-], so they need no escaping.
            let _ = writeln!(
                text,
                "gigafactory_function_requests_total{{tenant=\"{tenant}\",function=\"{function}\",outcome=\"{outcome}\"}} {count}"
            );
        }
        drop(outcomes);
        header(
            &mut text,
            "gigafactory_function_duration_seconds",
            "histogram",
            "Time from a request's arrival to its response head, by tenant and function.",
        );
        let latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for ((tenant, function), histogram) in latency.iter() {
            histogram.render(
                &mut text,
                "gigafactory_function_duration_seconds",
                &format!("tenant=\"{tenant}\",function=\"{function}\""),
            );
        }
        drop(latency);
        header(
            &mut text,
            "gigafactory_forwarded_requests_total",
            "counter",
            "Requests sent to the node holding their function's models, by node and outcome.",
        );
        let forwarded = self.forwarded.lock().unwrap_or_else(|e| e.into_inner());
        for ((node, outcome), count) in forwarded.iter() {
            // Node names are validated to [A-Za-z0-9._-].
            let _ = writeln!(
                text,
                "gigafactory_forwarded_requests_total{{node=\"{node}\",outcome=\"{outcome}\"}} {count}"
            );
        }
        drop(forwarded);
        header(
            &mut text,
            "gigafactory_http_requests_total",
            "counter",
            "HTTP requests by route template, method and status.",
        );
        let http = self.http.lock().unwrap_or_else(|e| e.into_inner());
        for (route, series) in http.iter() {
            // Route templates are the gateway's own (`/v1/tenants/{tenant}`).
            for ((method, status), count) in &series.counts {
                let _ = writeln!(
                    text,
                    "gigafactory_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {count}"
                );
            }
        }
        header(
            &mut text,
            "gigafactory_http_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its response head, by route template.",
        );
        for (route, series) in http.iter() {
            series.latency.render(
                &mut text,
                "gigafactory_http_request_duration_seconds",
                &format!("route=\"{route}\""),
            );
        }
        drop(http);
        models.render_metrics(&mut text);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_outcomes_and_latency_per_function() {
        let metrics = Metrics::default();
        let ms = Duration::from_millis;
        metrics.invoked("a", "f", "ok", ms(3));
        metrics.invoked("a", "f", "ok", ms(3));
        metrics.invoked("a", "f", "deadline_exceeded", ms(2000));
        metrics.invoked("b", "g", "ok", ms(1));
        metrics.forget("b", None);
        let text = metrics.render(
            &Counters::default(),
            &ModelPool::new(&Default::default()).unwrap(),
            0,
        );
        assert!(text.contains("gigafactory_function_requests_total{tenant=\"a\",function=\"f\",outcome=\"ok\"} 2\n"), "{text}");
        assert!(
            text.contains("outcome=\"deadline_exceeded\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("gigafactory_function_duration_seconds_bucket{tenant=\"a\",function=\"f\",le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "gigafactory_function_duration_seconds_count{tenant=\"a\",function=\"f\"} 3\n"
            ),
            "{text}"
        );
        assert!(!text.contains("tenant=\"b\""), "{text}");
    }
}
