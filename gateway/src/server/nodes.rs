//! This process as a node of its cluster: it registers in the store,
//! heartbeats what it holds and does, lists the cluster's nodes
//! (`GET /v1/nodes`), and on shutdown drains and leaves.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::response::IntoResponse as _;
use hyper::HeaderMap;
use hyper::StatusCode;

use super::routes::json;
use super::{ApiError, Gateway, Response};
use crate::store::{Node, NodeStatus};

/// How this process takes part in a cluster.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Unique in the cluster; the host name when not given.
    pub name: Option<String>,
    /// Where other nodes reach this one; the listening address when not given.
    pub advertise: Option<String>,
    /// The operator's labels (`gpu=h200`).
    pub labels: BTreeMap<String, String>,
    /// How often it heartbeats.
    pub heartbeat: Duration,
    /// A node not heard from for this long is dead to the others.
    pub dead_after: Duration,
    /// How long a shutdown waits for requests in flight.
    pub drain_grace: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: None,
            advertise: None,
            labels: BTreeMap::new(),
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            drain_grace: Duration::from_secs(30),
        }
    }
}

/// The address other nodes reach this one at: `advertise` (given as
/// `host:port` or with its scheme), else the listening address, with
/// `https://` when the node serves TLS.
fn advertised(advertise: Option<&str>, listening: std::net::SocketAddr, tls: bool) -> String {
    let address = advertise.map_or_else(|| listening.to_string(), str::to_string);
    if tls && !address.contains("://") {
        format!("https://{address}")
    } else {
        address
    }
}

/// The host's name, for a node that was not given one.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "gigafactory".to_string())
}

/// How long `/readyz` waits for the store.
const READY_STORE_WAIT: Duration = Duration::from_secs(2);

impl Gateway {
    /// This node's identity, as its first heartbeat will report it.
    pub(super) fn node_status(&self, listening: std::net::SocketAddr) -> Result<NodeStatus> {
        let config = &self.config.node;
        let mut instance = [0u8; 8];
        getrandom::fill(&mut instance).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
        Ok(NodeStatus {
            name: config.name.clone().unwrap_or_else(host_name),
            instance: hex::encode(instance),
            address: advertised(
                config.advertise.as_deref(),
                listening,
                self.config.tls.is_some(),
            ),
            labels: config.labels.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            draining: false,
            report: serde_json::Value::Null,
        })
    }

    /// Sends one heartbeat with what the node holds and does now, and
    /// reads what the others reported.
    pub(super) async fn heartbeat(&self, node: &mut NodeStatus) -> Result<()> {
        node.draining = self.draining.load(Ordering::Relaxed);
        node.report = self.node_report();
        self.store
            .heartbeat(node, self.config.node.dead_after)
            .await
            .with_context(|| format!("heartbeat of node {:?}", node.name))?;
        let nodes = self.store.nodes().await.context("listing the nodes")?;
        let load = self
            .peers
            .refresh(&nodes, &node.name, self.config.node.dead_after);
        self.admission.set_cluster(load);
        Ok(())
    }

    /// Heartbeats until the task is dropped; an unreachable store is
    /// logged once per outage.
    pub(super) async fn heartbeats(self: Arc<Self>, mut node: NodeStatus) {
        let mut failing = false;
        loop {
            tokio::time::sleep(self.config.node.heartbeat).await;
            match self.heartbeat(&mut node).await {
                Ok(()) if failing => {
                    tracing::info!("heartbeats reach the store again");
                    failing = false;
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    tracing::warn!("{error:#}");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }

    /// Devices, resident models with their state and queue, requests in flight.
    fn node_report(&self) -> serde_json::Value {
        let models: Vec<serde_json::Value> = self
            .runtime
            .models()
            .list()
            .into_iter()
            .map(|m| {
                serde_json::json!({
                    // A private model by its key, which no manifest can name.
                    "name": m.key(),
                    "public": m.public,
                    "state": m.state,
                    "device": m.device,
                    "queued": m.stats.queued,
                    "memory_bytes": m.memory_bytes,
                })
            })
            .collect();
        serde_json::json!({
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "tenants": self.admission.report(),
            "models": models,
            "devices": self.runtime.models().devices().list(),
            "store": self.store.kind(),
        })
    }

    /// `GET /v1/nodes` (admin): every node heard from lately, and whether
    /// it is alive.
    pub(super) async fn list_nodes(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        self.require_admin(headers).await?;
        let nodes = self.store.nodes().await?;
        let nodes: Vec<serde_json::Value> = nodes.iter().map(|n| self.node_json(n)).collect();
        Ok(json(StatusCode::OK, serde_json::json!({ "nodes": nodes })))
    }

    fn node_json(&self, node: &Node) -> serde_json::Value {
        let status = &node.status;
        let state = if node.silent_for >= self.config.node.dead_after {
            "dead"
        } else if status.draining {
            "draining"
        } else {
            "ready"
        };
        serde_json::json!({
            "name": status.name,
            "address": status.address,
            "labels": status.labels,
            "version": status.version,
            "started_at": status.started_at,
            "state": state,
            "last_heartbeat_ms": node.silent_for.as_millis() as u64,
            "report": status.report,
        })
    }

    /// `GET /readyz`: 200 while the node takes work: it is not draining
    /// and its store answers within [`READY_STORE_WAIT`] (its boot-time
    /// models are loaded before it listens); else 503 saying which.
    pub(super) async fn readiness(&self) -> Response {
        if self.draining.load(Ordering::Relaxed) {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "this node is shutting down and takes no new work",
            )
            .into_response();
        }
        let store = match tokio::time::timeout(READY_STORE_WAIT, self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("{error}")),
            Err(_) => Err(format!(
                "no answer within {} ms",
                READY_STORE_WAIT.as_millis()
            )),
        };
        match store {
            Ok(()) => json(
                StatusCode::OK,
                serde_json::json!({"status": "ready", "store": self.store.kind()}),
            ),
            Err(why) => {
                tracing::warn!("not ready: the store: {why}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "this node cannot reach its store right now",
                )
                .retry_after(2)
                .into_response()
            }
        }
    }
}
