//! Lock-free counters and histograms, rendered in the Prometheus text
//! format by whoever exposes them (the gateway's `/metrics`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds for latencies, in seconds: 0.5 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Bucket bounds for batch sizes, in rows.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A Prometheus histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus `+Inf`; not cumulative.
    counts: Vec<AtomicU64>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one value.
    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, value: Duration) {
        self.observe(value.as_secs_f64());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The sum of the observations.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }

    /// The value below which the share `q` (0..=1) of the observations
    /// fall, interpolated within its bucket as Prometheus'
    /// `histogram_quantile` does (the last bound when it falls above it);
    /// `None` before the first observation.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantile_of(&self.counts_now(), q)
    }

    /// Each bucket's count (not cumulative), read once.
    fn counts_now(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// [`Histogram::quantile`] of `counts` read before.
    fn quantile_of(&self, counts: &[u64], q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0;
        for (index, &count) in counts.iter().enumerate() {
            if count > 0 && (below + count) as f64 >= rank {
                let Some(&upper) = self.bounds.get(index) else {
                    break;
                };
                let lower = index.checked_sub(1).map_or(0.0, |i| self.bounds[i]);
                let within = (rank - below as f64) / count as f64;
                return Some(lower + (upper - lower) * within);
            }
            below += count;
        }
        self.bounds.last().copied()
    }

    /// Its state as `GET /v1/models` shows it: count, sum, median, 99th
    /// percentile and the count in each bucket.
    pub fn distribution(&self) -> Distribution {
        // One reading, so that the counts and percentiles agree.
        let counts = self.counts_now();
        let bounds = self.bounds.iter().map(|&bound| Some(bound)).chain([None]);
        Distribution {
            count: counts.iter().sum(),
            sum: self.sum(),
            p50: self.quantile_of(&counts, 0.5),
            p99: self.quantile_of(&counts, 0.99),
            buckets: bounds
                .zip(&counts)
                .map(|(le, &count)| Bucket { le, count })
                .collect(),
        }
    }

    /// Appends this histogram's series to `out`; `labels` is `key="value",…`
    /// (already escaped) or empty. The HELP/TYPE header is the caller's.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braces = |labels: &str| {
            if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum());
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// A histogram as JSON readers (the console) want it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Distribution {
    /// Observations.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// The median, estimated from the buckets (`null` with no observation).
    pub p50: Option<f64>,
    /// The 99th percentile, estimated likewise.
    pub p99: Option<f64>,
    /// Observations per bucket (not cumulative).
    pub buckets: Vec<Bucket>,
}

/// One bucket of a [`Distribution`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Bucket {
    /// Its upper bound (inclusive); `null` for the one above the last bound.
    pub le: Option<f64>,
    /// Observations in it, above the previous bound.
    pub count: u64,
}

/// Appends a metric's HELP and TYPE lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value for the text format.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let histogram = Histogram::new(BATCH_BUCKETS);
        assert_eq!(histogram.quantile(0.5), None);
        // Two of four in (0, 1], two in (2, 4].
        for rows in [1.0, 1.0, 3.0, 4.0] {
            histogram.observe(rows);
        }
        assert_eq!(histogram.quantile(0.25), Some(0.5));
        assert_eq!(histogram.quantile(0.5), Some(1.0));
        assert_eq!(histogram.quantile(1.0), Some(4.0));
        histogram.observe(1000.0);
        assert_eq!(
            histogram.quantile(1.0),
            Some(128.0),
            "the last bound past it"
        );
        let distribution = histogram.distribution();
        assert_eq!(distribution.count, 5);
        assert_eq!(distribution.sum, 1009.0);
        let counts: Vec<u64> = distribution.buckets.iter().map(|b| b.count).collect();
        assert_eq!(counts, [2, 0, 2, 0, 0, 0, 0, 0, 1]);
        assert_eq!(distribution.buckets.last().unwrap().le, None);
    }

    #[test]
    fn buckets_are_cumulative_and_sum_adds_up() {
        let histogram = Histogram::new(BATCH_BUCKETS);
        for rows in [1.0, 1.0, 3.0, 16.0, 500.0] {
            histogram.observe(rows);
        }
        let mut text = String::new();
        histogram.render(&mut text, "rows", "model=\"m\"");
        assert!(
            text.contains("rows_bucket{model=\"m\",le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("rows_bucket{model=\"m\",le=\"4\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("rows_bucket{model=\"m\",le=\"16\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("rows_bucket{model=\"m\",le=\"128\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("rows_bucket{model=\"m\",le=\"+Inf\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("rows_sum{model=\"m\"} 521\n"), "{text}");
        assert!(text.contains("rows_count{model=\"m\"} 5\n"), "{text}");
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
