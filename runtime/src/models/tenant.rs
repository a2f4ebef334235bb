//! Graphs tenants `load` from their own ONNX bytes: compiled once per
//! content hash and kept per tenant, within a byte budget per tenant,
//! evicting the least recently used.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::{ErrorCode, NnError};
use super::graph::Graph;
use crate::stats::{header, label};

/// A graph's identity: the sha256 of its ONNX bytes.
pub type ContentHash = [u8; 32];

/// The sha256 of `bytes`.
pub fn content_hash(bytes: &[u8]) -> ContentHash {
    Sha256::digest(bytes).into()
}

/// Every tenant's cached graphs.
#[derive(Default)]
pub struct TenantGraphs {
    tenants: HashMap<Arc<str>, Cache>,
    /// A logical clock for recency.
    clock: u64,
}

#[derive(Default)]
struct Cache {
    graphs: HashMap<ContentHash, Entry>,
    bytes: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
}

struct Entry {
    graph: Arc<dyn Graph>,
    bytes: u64,
    used: u64,
}

/// What one tenant's cache holds and has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TenantGraphStats {
    /// Graphs cached.
    pub graphs: usize,
    /// Their weights, in bytes.
    pub bytes: u64,
    /// `load` calls answered from the cache.
    pub hits: u64,
    /// `load` calls that compiled.
    pub misses: u64,
    /// Graphs evicted to stay within the budget.
    pub evictions: u64,
}

impl TenantGraphs {
    /// The cached graph for `hash`, marked as just used.
    pub fn get(&mut self, tenant: &Arc<str>, hash: &ContentHash) -> Option<Arc<dyn Graph>> {
        self.clock += 1;
        let cache = self.tenants.entry(tenant.clone()).or_default();
        match cache.graphs.get_mut(hash) {
            Some(entry) => {
                entry.used = self.clock;
                cache.hits += 1;
                Some(entry.graph.clone())
            }
            None => {
                cache.misses += 1;
                None
            }
        }
    }

    /// Caches a freshly compiled graph costing `bytes`, evicting the least
    /// recently used until the tenant's graphs fit in `budget`. A graph
    /// larger than the whole budget is refused.
    pub fn insert(
        &mut self,
        tenant: &Arc<str>,
        hash: ContentHash,
        graph: Arc<dyn Graph>,
        bytes: u64,
        budget: u64,
    ) -> Result<(), NnError> {
        if bytes > budget {
            return Err(NnError::new(
                ErrorCode::TooLarge,
                format!(
                    "the graph needs {} MiB; this tenant's loaded graphs may take {} MiB (quota max_model_memory_mib)",
                    bytes.div_ceil(1 << 20),
                    budget >> 20
                ),
            ));
        }
        self.clock += 1;
        let cache = self.tenants.entry(tenant.clone()).or_default();
        if let Some(old) = cache.graphs.insert(
            hash,
            Entry {
                graph,
                bytes,
                used: self.clock,
            },
        ) {
            // Two instances compiled the same bytes at once: keep one.
            cache.bytes -= old.bytes;
        }
        cache.bytes += bytes;
        while cache.bytes > budget {
            let oldest = cache
                .graphs
                .iter()
                .min_by_key(|(_, entry)| entry.used)
                .map(|(hash, _)| *hash)
                .expect("over budget, so not empty");
            let evicted = cache.graphs.remove(&oldest).expect("present");
            cache.bytes -= evicted.bytes;
            cache.evictions += 1;
        }
        Ok(())
    }

    /// What `tenant`'s cache holds.
    pub fn stats(&self, tenant: &str) -> TenantGraphStats {
        self.tenants
            .get(tenant)
            .map(Cache::stats)
            .unwrap_or_default()
    }

    /// Drops everything of a deleted tenant.
    pub fn forget(&mut self, tenant: &str) {
        self.tenants.remove(tenant);
    }

    /// Appends the per-tenant cache series.
    pub fn render(&self, out: &mut String) {
        let mut tenants: Vec<(&Arc<str>, TenantGraphStats)> = self
            .tenants
            .iter()
            .map(|(tenant, cache)| (tenant, cache.stats()))
            .collect();
        tenants.sort_by(|a, b| a.0.cmp(b.0));
        header(
            out,
            "gigafactory_tenant_graph_bytes",
            "gauge",
            "Weights of the graphs a tenant loaded from its own ONNX bytes, cached.",
        );
        for (tenant, stats) in &tenants {
            let _ = writeln!(
                out,
                "gigafactory_tenant_graph_bytes{{tenant=\"{}\"}} {}",
                label(tenant),
                stats.bytes
            );
        }
        header(
            out,
            "gigafactory_tenant_graph_loads_total",
            "counter",
            "Tenant graph loads by result: hit (cached) or miss (compiled).",
        );
        for (tenant, stats) in &tenants {
            for (result, count) in [("hit", stats.hits), ("miss", stats.misses)] {
                let _ = writeln!(
                    out,
                    "gigafactory_tenant_graph_loads_total{{tenant=\"{}\",result=\"{result}\"}} {count}",
                    label(tenant)
                );
            }
        }
        header(
            out,
            "gigafactory_tenant_graph_evictions_total",
            "counter",
            "Tenant graphs evicted to stay within the tenant's model memory.",
        );
        for (tenant, stats) in &tenants {
            let _ = writeln!(
                out,
                "gigafactory_tenant_graph_evictions_total{{tenant=\"{}\"}} {}",
                label(tenant),
                stats.evictions
            );
        }
    }
}

impl Cache {
    fn stats(&self) -> TenantGraphStats {
        TenantGraphStats {
            graphs: self.graphs.len(),
            bytes: self.bytes,
            hits: self.hits,
            misses: self.misses,
            evictions: self.evictions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Arc<dyn Graph> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tiny.onnx");
        super::super::engines::tract::TractGraph::from_path(&path).unwrap()
    }

    #[test]
    fn evicts_the_least_recently_used_within_the_budget() {
        let mut graphs = TenantGraphs::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let graph = tiny();
        graphs.insert(&a, [1; 32], graph.clone(), 40, 100).unwrap();
        graphs.insert(&a, [2; 32], graph.clone(), 40, 100).unwrap();
        assert!(
            graphs.get(&a, &[1; 32]).is_some(),
            "1 is now the most recent"
        );
        graphs.insert(&a, [3; 32], graph.clone(), 40, 100).unwrap();
        assert!(graphs.get(&a, &[2; 32]).is_none(), "2 was the least recent");
        assert!(graphs.get(&a, &[1; 32]).is_some());
        assert!(graphs.get(&a, &[3; 32]).is_some());
        // Another tenant's budget is its own.
        graphs.insert(&b, [1; 32], graph.clone(), 90, 100).unwrap();
        assert_eq!(
            graphs.stats("a"),
            TenantGraphStats {
                graphs: 2,
                bytes: 80,
                hits: 3,
                misses: 1,
                evictions: 1
            }
        );
        assert_eq!(graphs.stats("b").bytes, 90);
        let error = graphs.insert(&a, [4; 32], graph, 101, 100).unwrap_err();
        assert_eq!(error.code, ErrorCode::TooLarge);
        assert_eq!(
            graphs.stats("a").graphs,
            2,
            "a refused graph evicts nothing"
        );
        graphs.forget("a");
        assert_eq!(graphs.stats("a"), TenantGraphStats::default());
    }
}
