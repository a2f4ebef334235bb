//! The HTTP server: one axum router for the control plane (`/v1/…`), the
//! data plane (`/fn/{tenant}/{function}/…`), the OpenAI-compatible API,
//! health and metrics, served on hyper connections the gateway accepts
//! and watches itself (caps, idle timeouts, drain).

mod access;
mod admission;
mod bodies;
mod cluster;
mod connections;
mod console;
mod control;
mod error;
mod files;
mod fleet;
mod follow;
mod functions;
mod invoke;
mod metrics;
mod models;
mod nodes;
mod openai;
mod operations;
mod routes;
mod tls;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures_util::future::Either;
use gigafactory_runtime::{ModelPool, PoolOptions, Runtime, SandboxLimits};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

use crate::auth::{self, TokenHash};
use crate::logs::FunctionLogs;
use crate::store::Store;

use connections::{Activity, Connections, Watched};

pub use error::ApiError;
use functions::FunctionCache;
pub use nodes::NodeConfig;
pub use tls::TlsFiles;

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every request and response.
pub type Body = axum::body::Body;
/// Every response.
pub type Response = axum::response::Response;

/// CORS for `origins` (`*`: any), or none. Browser apps send the API key
/// as a bearer token, so no credentials (cookies) are allowed; the
/// headers clients read (`retry-after`) are exposed.
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| origin.parse().ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(tower_http::cors::Any)
            .allow_headers(tower_http::cors::Any)
            .expose_headers([hyper::header::RETRY_AFTER])
            .max_age(Duration::from_secs(3600)),
    )
}

/// A whole body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::from(bytes.into())
}

/// How the gateway is set up.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where the embedded store, function files and the generated admin token live.
    pub data_dir: PathBuf,
    /// The store: `None` for sled in the data directory, or a
    /// `postgres://` URL shared by the nodes of a cluster.
    pub store: Option<String>,
    /// The model repository.
    pub models_dir: Option<PathBuf>,
    /// The admin token to use instead of a generated one.
    pub admin_token: Option<String>,
    /// A token that reads `/metrics` only.
    pub metrics_token: Option<String>,
    /// Largest deploy upload (wasm or bundle).
    pub max_upload_bytes: usize,
    /// Largest request body a function may receive (and a manifest may allow).
    pub max_request_bytes: u64,
    /// Largest response body a function may send (and a manifest may allow).
    pub max_response_bytes: u64,
    /// Sandbox sizing and the request deadline.
    pub limits: SandboxLimits,
    /// Inference workers, batching and engines.
    pub pool: PoolOptions,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Time a request body may stall before the request is refused (408).
    pub body_idle_timeout: Duration,
    /// A connection idle this long (no request in flight, no bytes) is closed.
    pub idle_timeout: Duration,
    /// Client connections open at once (also kept under the descriptor limit).
    pub max_connections: usize,
    /// Wall-clock limit of a control-plane request.
    pub control_timeout: Duration,
    /// Wall-clock limit of an OpenAI-compatible chat completion.
    pub generation_timeout: Duration,
    /// Origins browser apps may call the API from (`*`: any); none: no
    /// CORS headers, and preflights are not answered.
    pub cors_origins: Vec<String>,
    /// Function versions kept loaded; the least recently used are unloaded.
    pub max_loaded_functions: usize,
    /// Whether manifests may allow outbound requests to loopback addresses.
    pub allow_loopback_outbound: bool,
    /// This process as a node of its cluster.
    pub node: NodeConfig,
    /// The secret nodes present to each other; without it, requests are
    /// never sent to other nodes.
    pub cluster_secret: Option<String>,
    /// HTTPS with this certificate and key; none: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// PEM certificates to trust for other nodes' HTTPS besides the
    /// system's roots (the cluster's own CA).
    pub peer_ca: Option<PathBuf>,
}

impl GatewayConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            store: None,
            models_dir: None,
            admin_token: None,
            metrics_token: None,
            max_upload_bytes: 64 << 20,
            max_request_bytes: 16 << 20,
            max_response_bytes: 64 << 20,
            limits: SandboxLimits::default(),
            pool: PoolOptions::default(),
            header_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            control_timeout: Duration::from_secs(120),
            generation_timeout: Duration::from_secs(300),
            cors_origins: Vec::new(),
            max_loaded_functions: 256,
            allow_loopback_outbound: false,
            node: NodeConfig::default(),
            cluster_secret: None,
            peer_ca: None,
            tls: None,
        }
    }
}

/// Everything a request handler needs.
pub struct Gateway {
    config: GatewayConfig,
    store: Arc<dyn Store>,
    runtime: Runtime,
    functions: FunctionCache,
    logs: FunctionLogs,
    admin_token: TokenHash,
    metrics: Arc<metrics::Metrics>,
    /// Running requests per function version with a `max_concurrency`.
    concurrency: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Per-tenant rate, concurrency and compute state.
    admission: admission::Admission,
    /// The tenants' use not yet added to the store.
    usage: Arc<crate::usage::Meter>,
    /// Set when shutting down: the node takes no new work.
    draining: AtomicBool,
    /// The phases of a shutdown, for streams that end cleanly.
    drain: Drain,
    /// Requests being answered (until their response body ends).
    in_flight: Arc<AtomicUsize>,
    /// The other nodes of the cluster.
    peers: cluster::Peers,
    /// The models added through the API, as this node holds them.
    fleet: fleet::Fleet,
}

/// Requests one HTTP/2 connection may have in flight at once.
const MAX_STREAMS: u32 = 100;

/// The name of the generated admin token's file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

impl Gateway {
    /// Loads the models, opens the store and prepares the admin token.
    pub async fn start(config: GatewayConfig) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let runtime = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || load_runtime(&config))
                .await
                .context("loading the models")??
        };
        let store = crate::store::open(
            config.store.as_deref(),
            &config.data_dir,
            runtime.fingerprint(),
        )
        .await?;
        let store: Arc<dyn Store> = Arc::new(crate::store::Cached::new(store));
        tracing::info!(store = store.kind(), "opened the store");
        let pruned = store.prune_artifacts().await?;
        if pruned > 0 {
            tracing::info!(
                pruned,
                "dropped artifacts compiled by another engine version"
            );
        }
        let admin_token = admin_token(&config, store.as_ref()).await?;
        files::remove_staging(&config.data_dir.join("files"));
        let fleet = fleet::Fleet::new(config.data_dir.join("models"));
        let usage = Arc::new(crate::usage::Meter::default());
        let gateway = Arc::new(Self {
            functions: FunctionCache::new(config.max_loaded_functions),
            logs: FunctionLogs::default(),
            metrics: Arc::new(metrics::Metrics::new()),
            concurrency: Mutex::default(),
            admission: admission::Admission::new(usage.clone()),
            usage,
            draining: AtomicBool::new(false),
            drain: Drain::default(),
            in_flight: Arc::default(),
            peers: cluster::Peers::new(config.cluster_secret.clone(), config.peer_ca.as_deref())?,
            fleet,
            config,
            store,
            runtime,
            admin_token,
        });
        // The models added through the API, installed before the node serves.
        gateway.public_models_changed();
        if let Err(error) = gateway.sync_models().await {
            tracing::error!("installing the models added through the API: {error:#}");
        }
        gateway.follow_models();
        Ok(gateway)
    }

    /// Registers the node, serves connections from `listener` until
    /// `shutdown` resolves, then drains: takes no new connections, lets
    /// requests in flight finish (up to the drain grace) and leaves the cluster.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let tls = match &self.config.tls {
            Some(files) => {
                let tls = tls::Tls::load(files.clone()).context("loading the TLS certificate")?;
                tls.reload_on_sighup()?;
                Some(tls)
            }
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut node = self.node_status(listener.local_addr()?)?;
        self.heartbeat(&mut node).await?;
        tracing::info!(node = %node.name, address = %node.address, "joined the cluster");
        // Announced once the node is registered: from here other nodes see it.
        tracing::info!(
            "gigafactory listening on {scheme}://{}",
            listener.local_addr()?
        );
        let heartbeats = tokio::spawn(self.clone().heartbeats(node.clone()));
        let metering = tokio::spawn(self.clone().meter_usage());
        let builder = self.http_builder();
        let app = Front {
            app: self.app(),
            tls,
        };
        let cap = connections::connection_cap(self.config.max_connections);
        let connections = Arc::new(Connections::new(cap, self.config.idle_timeout));
        tracing::info!(connections = cap, "accepting connections");
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            if !connections.has_room() {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => continue,
                    () = &mut shutdown => break,
                }
            }
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            // Responses are written as soon as they are ready: a small
            // write (a head, a streamed token) must not wait for an ACK.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, "TCP_NODELAY: {e}");
            }
            let connection = Connection {
                stream,
                peer,
                opened: connections.opened(),
                activity: Activity::new(),
            };
            self.clone()
                .spawn_connection(&builder, &app, &graceful, &connections, connection);
        }
        // Draining: /readyz and new requests answer 503 at once, the other
        // nodes hear of it, open connections close once their requests end.
        self.draining.store(true, Ordering::Relaxed);
        self.drain.begun.send_replace(true);
        let closing = tokio::spawn(graceful.shutdown());
        heartbeats.abort();
        if let Err(error) = self.heartbeat(&mut node).await {
            tracing::warn!("{error:#}");
        }
        let grace = self.config.node.drain_grace;
        tracing::info!(
            in_flight = self.in_flight.load(Ordering::Relaxed),
            grace_secs = grace.as_secs(),
            "draining: waiting for requests in flight"
        );
        // Clients that still reach the node (a balancer not yet told) get
        // a 503 with Retry-After rather than a refused connection.
        let late = GracefulShutdown::new();
        let deadline = tokio::time::Instant::now() + grace;
        while !self.settled() {
            tokio::select! {
                accepted = listener.accept() => if let Ok((stream, peer)) = accepted {
                    let connection = Connection {
                        stream,
                        peer,
                        opened: connections.opened(),
                        activity: Activity::new(),
                    };
                    self.clone().spawn_connection(&builder, &app, &late, &connections, connection);
                },
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !self.settled() {
            // Past the grace: streams end with a terminal event, not a cut.
            tracing::warn!(
                in_flight = self.in_flight.load(Ordering::Relaxed),
                "the drain grace is over: ending the streams still open"
            );
            self.drain.grace_over.send_replace(true);
            let ended = tokio::time::Instant::now() + STREAM_END_GRACE;
            while !self.settled() && tokio::time::Instant::now() < ended {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !self.settled() {
                tracing::warn!("gave up waiting for requests in flight");
            }
        }
        closing.abort();
        metering.abort();
        self.flush_usage().await;
        if let Err(error) = self.store.leave(&node).await {
            tracing::warn!("leaving the cluster: {error:#}");
        }
        tracing::info!(node = %node.name, "left the cluster");
        Ok(self.store.flush().await?)
    }

    /// Adds the tenants' use to the store every [`FLUSH_EVERY`](crate::usage::FLUSH_EVERY).
    async fn meter_usage(self: Arc<Self>) {
        let mut every = tokio::time::interval(crate::usage::FLUSH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.flush_usage().await;
        }
    }

    /// Adds the use recorded so far to the store; what it cannot add (the
    /// store is unreachable) is kept for the next time.
    async fn flush_usage(&self) {
        let _flushing = self.usage.flushing.lock().await;
        let rows = self.usage.take();
        if rows.is_empty() {
            return;
        }
        if let Err(error) = self.store.add_usage(&rows).await {
            tracing::warn!("adding the tenants' usage to the store (kept for later): {error:#}");
            self.usage.put_back(rows);
        }
    }

    /// HTTP/1 and HTTP/2 with the header read timeout.
    fn http_builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20));
        builder
    }

    /// The routes behind request ids and CORS.
    fn app(self: &Arc<Self>) -> access::App {
        let cors = cors_layer(&self.config.cors_origins);
        tower::util::BoxCloneSyncService::new(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(access::RequestIds))
                .layer(PropagateRequestIdLayer::x_request_id())
                .option_layer(cors)
                .service(self.router()),
        )
    }

    /// Serves one connection on its own task until it ends or idles out.
    fn spawn_connection(
        self: Arc<Self>,
        builder: &auto::Builder<TokioExecutor>,
        front: &Front,
        graceful: &GracefulShutdown,
        connections: &Arc<Connections>,
        connection: Connection,
    ) {
        let Connection {
            stream,
            peer,
            opened,
            activity,
        } = connection;
        let (acceptor, handshake_limit) = (
            front.tls.as_ref().map(|tls| tls.acceptor()),
            self.config.header_timeout,
        );
        let service = {
            let (activity, app) = (activity.clone(), front.app.clone());
            tower::service_fn(move |request: hyper::Request<Incoming>| {
                // The body holds its request in flight until it ends or is
                // dropped: a quiet stream (`logs --follow`) is not idle.
                let holds = (activity.request(), InFlight::new(&self.in_flight));
                let answered = self
                    .clone()
                    .answer(app.clone(), request.map(Body::new), holds);
                async move { Ok::<_, std::convert::Infallible>(answered.await) }
            })
        };
        let service = TowerToHyperService::new(service);
        let watched = Watched::new(stream, activity.clone());
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let connections = connections.clone();
        tokio::spawn(async move {
            let _opened = opened;
            let served = match acceptor {
                None => Either::Left(
                    watcher.watch(
                        builder
                            .serve_connection(TokioIo::new(watched), service)
                            .into_owned(),
                    ),
                ),
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(handshake_limit, acceptor.accept(watched)).await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                return tracing::debug!(%peer, "TLS handshake failed: {e}");
                            }
                            Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                        };
                    Either::Right(
                        watcher.watch(
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .into_owned(),
                        ),
                    )
                }
            };
            tokio::select! {
                ended = served => if let Err(e) = ended {
                    tracing::debug!(%peer, "connection ended: {e}");
                },
                () = activity.idle(&connections) => {
                    tracing::debug!(%peer, "closing an idle connection");
                }
            }
        });
    }
}

impl Gateway {
    /// Whether no request is in flight.
    fn settled(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }
}

/// How long streams get to write their terminal event after the grace.
const STREAM_END_GRACE: Duration = Duration::from_secs(2);

/// The phases of a shutdown, watched by the streams that must end cleanly.
#[derive(Default)]
pub(super) struct Drain {
    /// Set on the shutdown signal: endless streams (`logs --follow`) end.
    pub begun: tokio::sync::watch::Sender<bool>,
    /// Set when the grace is over: generations end with an error event.
    pub grace_over: tokio::sync::watch::Sender<bool>,
}

impl Drain {
    /// Resolves once the drain has begun.
    pub fn begun(&self) -> impl Future<Output = ()> + Send + 'static {
        Self::reached(&self.begun)
    }

    /// Resolves once the drain's grace is over.
    pub fn grace_over(&self) -> impl Future<Output = ()> + Send + 'static {
        Self::reached(&self.grace_over)
    }

    fn reached(
        phase: &tokio::sync::watch::Sender<bool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut watch = phase.subscribe();
        async move {
            let _ = watch.wait_for(|set| *set).await;
        }
    }
}

/// What connections are served with: the application, and TLS when on.
struct Front {
    app: access::App,
    tls: Option<Arc<tls::Tls>>,
}

/// One request in flight, counted until dropped (with its response body).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted connection, counted under the cap, its activity watched.
struct Connection {
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    opened: connections::Opened,
    activity: Arc<Activity>,
}

/// The models and the sandbox (blocking: models load from disk).
fn load_runtime(config: &GatewayConfig) -> Result<Runtime> {
    let models = match &config.models_dir {
        Some(dir) => ModelPool::load_repository(dir, &config.pool)?,
        None => ModelPool::new(&config.pool)?,
    };
    let models = Arc::new(models);
    models.start_housekeeping();
    Runtime::new(config.limits.clone(), models).context("building the sandbox")
}

/// The admin token's hash: the configured token, the stored one, or a new
/// one written to `<data>/admin-token` for the operator.
async fn admin_token(config: &GatewayConfig, store: &dyn Store) -> Result<TokenHash> {
    if let Some(token) = &config.admin_token {
        let hash = TokenHash::of(token);
        store.set_admin_token(&hash).await?;
        return Ok(hash);
    }
    if let Some(hash) = store.admin_token().await? {
        return Ok(hash);
    }
    let token = auth::generate(auth::ADMIN_PREFIX)?;
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    write_secret(&path, &token)?;
    let hash = TokenHash::of(&token);
    store.set_admin_token(&hash).await?;
    tracing::info!("generated the admin token: {}", path.display());
    Ok(hash)
}

/// Writes `secret` to `path` (owner-only), whole or not at all: it is
/// written beside it and renamed into place, so no reader ever sees a
/// half-written file.
fn write_secret(path: &std::path::Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let partial = path.with_extension("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    writeln!(file, "{secret}")?;
    file.sync_all()?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
}
