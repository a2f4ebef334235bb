//! The other nodes, as their heartbeats describe them, and requests sent
//! to them.
//!
//! Models stay where they are loaded; a request goes to them. A function
//! whose manifest names a model this node does not hold runs on a node
//! that holds them all, chosen by least outstanding work (the requests it
//! reported in flight plus those this node has sent it since). Its calls
//! join that node's batchers with everyone else's, so cross-tenant
//! batching holds across the cluster. A forwarded request carries the
//! cluster secret in [`CLUSTER_HEADER`]: the receiving node runs it
//! itself, never forwards it again, and no guest ever sees the header.
//!
//! A node serving HTTPS advertises an `https://` address, and the others
//! reach it over TLS, checking its certificate against the system's roots
//! and `serve --peer-ca` (the cluster's own CA): the secret and the
//! tenants' requests never cross the network in the clear.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use hyper::StatusCode;
use hyper::header::{CONNECTION, CONTENT_LENGTH, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE};
use tokio::sync::OwnedSemaphorePermit;

use super::admission::{ClusterLoad, TenantLoad};
use super::routes::Request;
use super::{ApiError, Gateway, Response};
use crate::auth::TokenHash;
use crate::store::Node;

/// The header a forwarded request carries the cluster secret in.
pub const CLUSTER_HEADER: &str = "gigafactory-cluster-secret";

/// How long a node whose connection was refused gets no requests.
const UNREACHABLE_FOR: Duration = Duration::from_secs(3);

/// Nodes tried for one request before giving up.
const ATTEMPTS: usize = 3;

/// What this node knows of the others.
pub(super) struct Peers {
    secret: Option<(String, TokenHash)>,
    nodes: RwLock<Vec<Peer>>,
    /// Models other live nodes hold, each with whether it is public.
    models: RwLock<Arc<BTreeMap<String, bool>>>,
    /// This node's public models (`public = true` in model.toml).
    public_here: RwLock<BTreeSet<String>>,
    /// Models every tenant may use: public ones here or on a live node.
    public: RwLock<Arc<BTreeSet<String>>>,
    load: Mutex<HashMap<String, Arc<PeerLoad>>>,
    client: reqwest::Client,
}

/// Another live node that takes work.
struct Peer {
    name: String,
    address: String,
    /// Its models and whether each is public.
    models: BTreeMap<String, bool>,
    /// Requests it reported in flight at its last heartbeat.
    in_flight: usize,
}

/// This node's view of the load it put on a peer.
#[derive(Default)]
struct PeerLoad {
    sending: AtomicUsize,
    unreachable_until: Mutex<Option<Instant>>,
}

/// A request on its way to a peer, counted against it until dropped.
struct Sending(Arc<PeerLoad>);

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.sending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Peers {
    /// The cluster as this node starts: no peers yet; their HTTPS
    /// certificates checked against the system's roots and `peer_ca`.
    pub(super) fn new(
        secret: Option<String>,
        peer_ca: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            // A peer's answer is relayed as it is, redirects included.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30));
        if let Some(ca) = peer_ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the peers' CA file {}", ca.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{}: not PEM certificates", ca.display()))?;
            anyhow::ensure!(
                !certificates.is_empty(),
                "{}: holds no PEM certificate",
                ca.display()
            );
            builder = builder.tls_certs_merge(certificates);
        }
        let client = builder
            .build()
            .context("setting up the peers' HTTP client")?;
        Ok(Self {
            secret: secret.map(|s| {
                let hash = TokenHash::of(&s);
                (s, hash)
            }),
            nodes: RwLock::default(),
            models: RwLock::default(),
            public: RwLock::default(),
            public_here: RwLock::default(),
            load: Mutex::default(),
            client,
        })
    }

    /// Replaces the view with the store's list: live nodes other than
    /// `me` that are not draining. Returns their load of each tenant.
    pub(super) fn refresh(&self, nodes: &[Node], me: &str, dead_after: Duration) -> ClusterLoad {
        let live: Vec<&Node> = nodes
            .iter()
            .filter(|n| n.status.name != me && !n.status.draining && n.silent_for < dead_after)
            .collect();
        let peers = live
            .iter()
            .map(|n| {
                let report = &n.status.report;
                let models = report["models"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|m| m["state"] != "failed")
                    .filter_map(|m| {
                        let name = m["name"].as_str()?.to_string();
                        Some((name, m["public"].as_bool().unwrap_or(false)))
                    })
                    .collect();
                Peer {
                    name: n.status.name.clone(),
                    address: n.status.address.clone(),
                    models,
                    in_flight: report["in_flight"].as_u64().unwrap_or(0) as usize,
                }
            })
            .collect::<Vec<Peer>>();
        let mut models = BTreeMap::new();
        for (name, public) in peers.iter().flat_map(|n| &n.models) {
            *models.entry(name.clone()).or_insert(false) |= *public;
        }
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = peers;
        *self.models.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(models);
        self.update_public();
        let mut load = ClusterLoad {
            nodes: 1 + live.len(),
            others: HashMap::new(),
        };
        for node in live {
            let tenants: BTreeMap<String, TenantLoad> =
                serde_json::from_value(node.status.report["tenants"].clone()).unwrap_or_default();
            for (tenant, theirs) in tenants {
                let sum = load.others.entry(tenant).or_default();
                sum.demand += theirs.demand;
                sum.compute_seconds += theirs.compute_seconds;
                sum.tokens += theirs.tokens;
            }
        }
        load
    }

    /// Models other live nodes hold, each with whether it is public (as
    /// of the last heartbeat: computed then, not per request).
    pub(super) fn models(&self) -> Arc<BTreeMap<String, bool>> {
        self.models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces this node's public models (after its catalog changed).
    pub(super) fn set_public_here(&self, public: BTreeSet<String>) {
        *self.public_here.write().unwrap_or_else(|e| e.into_inner()) = public;
        self.update_public();
    }

    fn update_public(&self) {
        let mut public = self
            .public_here
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let models = self.models();
        public.extend(models.iter().filter(|(_, p)| **p).map(|(m, _)| m.clone()));
        *self.public.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(public);
    }

    /// Models every tenant without a model list in its quota may use.
    pub(super) fn public_models(&self) -> Arc<BTreeSet<String>> {
        self.public
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `request` was forwarded by another node: it carries the
    /// cluster secret. The header with anything else is refused.
    pub(super) fn forwarded(&self, request: &Request) -> Result<bool, ApiError> {
        let Some(presented) = request.headers().get(CLUSTER_HEADER) else {
            return Ok(false);
        };
        let matches = self.secret.as_ref().is_some_and(|(_, hash)| {
            presented
                .to_str()
                .is_ok_and(|p| TokenHash::of(p).matches(hash))
        });
        if matches {
            Ok(true)
        } else {
            Err(ApiError::forbidden(format!(
                "{CLUSTER_HEADER} is for the cluster's nodes only"
            )))
        }
    }

    /// The least loaded reachable peer holding every one of `models`,
    /// counted as sent to until the guard drops.
    fn choose(&self, models: &[String], skip: &[String]) -> Option<(String, String, Sending)> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        let mut loads = self.load.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (peer, load) = nodes
            .iter()
            .filter(|p| !skip.contains(&p.name))
            .filter(|p| models.iter().all(|m| p.models.contains_key(m)))
            .map(|p| (p, loads.entry(p.name.clone()).or_default().clone()))
            .filter(|(_, load)| {
                let until = load
                    .unreachable_until
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                until.is_none_or(|until| until <= now)
            })
            .min_by_key(|(p, load)| p.in_flight + load.sending.load(Ordering::Relaxed))?;
        load.sending.fetch_add(1, Ordering::Relaxed);
        Some((peer.name.clone(), peer.address.clone(), Sending(load)))
    }

    fn unreachable(&self, name: &str) {
        let loads = self.load.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(load) = loads.get(name) {
            *load
                .unreachable_until
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + UNREACHABLE_FOR);
        }
    }
}

impl Gateway {
    /// Whether this node's catalog has `model` for `tenant` (its private
    /// model of that name, or the operator's; it loads it on first use).
    pub(super) fn holds(&self, tenant: &str, model: &str) -> bool {
        let pool = self.runtime.models();
        pool.has(model) || pool.has(&gigafactory_runtime::models::private_key(tenant, model))
    }

    /// Whether `model` is not here for `tenant` but another live node holds it.
    pub(super) fn elsewhere(&self, tenant: &str, model: &str) -> bool {
        !self.holds(tenant, model) && self.peers.models().contains_key(model)
    }

    /// Sends `request` to a node holding all of `models`, and relays its
    /// answer. A node that refuses the connection is skipped for a few
    /// seconds and the next is tried; one that fails after taking the
    /// request answers 502 (the request may have run).
    /// `held` (the tenant's concurrency slot here) is released when the
    /// relayed answer ends.
    pub(super) async fn forward(
        &self,
        request: Request,
        models: &[String],
        body_limit: u64,
        held: Option<OwnedSemaphorePermit>,
    ) -> Result<Response, ApiError> {
        let outgoing = Outgoing::of(&request);
        let limit = usize::try_from(body_limit).unwrap_or(usize::MAX);
        let body = self.read_body(request, limit).await?;
        self.send_to_holder(outgoing, body, models, held).await
    }

    /// [`Self::forward`] for a request whose body was read already.
    pub(super) async fn send_to_holder(
        &self,
        outgoing: Outgoing,
        body: Bytes,
        models: &[String],
        held: Option<OwnedSemaphorePermit>,
    ) -> Result<Response, ApiError> {
        let Some((secret, _)) = &self.peers.secret else {
            return Err(model_unavailable(models, "no --cluster-secret is set"));
        };
        let Outgoing {
            method,
            path,
            mut headers,
        } = outgoing;
        let secret =
            HeaderValue::from_str(secret).map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
        headers.insert(CLUSTER_HEADER, secret);
        let mut tried = Vec::new();
        while tried.len() < ATTEMPTS {
            let Some((name, address, sending)) = self.peers.choose(models, &tried) else {
                break;
            };
            let sent = self
                .peers
                .client
                .request(method.clone(), format!("{}{path}", base_url(&address)))
                .headers(headers.clone())
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(response) => {
                    self.metrics.forwarded(&name, "ok");
                    let (status, headers) = (response.status(), response.headers().clone());
                    // The peer's load and the tenant's slot are held until
                    // the relayed body ends.
                    let held = (sending, held);
                    let body = response.bytes_stream().map(move |chunk| {
                        let _held = &held;
                        chunk
                    });
                    let mut relayed = hyper::Response::new(super::Body::from_stream(body));
                    *relayed.status_mut() = status;
                    *relayed.headers_mut() = headers;
                    return Ok(relayed);
                }
                Err(error) if error.is_connect() => {
                    tracing::warn!(node = %name, "node unreachable: {error}");
                    self.metrics.forwarded(&name, "unreachable");
                    self.peers.unreachable(&name);
                    tried.push(name);
                }
                Err(error) => {
                    tracing::warn!(node = %name, "forwarded request failed: {error}");
                    self.metrics.forwarded(&name, "failed");
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "node_failed",
                        format!("node {name}, which was running the request, failed: {error}"),
                    ));
                }
            }
        }
        Err(model_unavailable(models, "no live node holds them"))
    }
}

/// A node's base URL from its advertised address: `http://host:port`
/// unless it names its scheme (`https://…` for a node serving TLS).
fn base_url(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.trim_end_matches('/').to_string()
    } else {
        format!("http://{address}")
    }
}

/// What is sent on of a request: its method, path and end-to-end headers.
pub(super) struct Outgoing {
    method: hyper::Method,
    path: String,
    headers: hyper::HeaderMap,
}

impl Outgoing {
    pub(super) fn of(request: &Request) -> Self {
        let mut headers = request.headers().clone();
        // The body is sent whole, with its own length.
        for hop in [CONNECTION, TRANSFER_ENCODING, CONTENT_LENGTH, TE, UPGRADE] {
            headers.remove(hop);
        }
        Self {
            method: request.method().clone(),
            path: request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            headers,
        }
    }
}

fn model_unavailable(models: &[String], why: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "model_unavailable",
        format!(
            "this node does not hold {} and {why}; try again shortly",
            models.join(", ")
        ),
    )
    .retry_after(1)
}
