//! The state of one request's store: WASI with only the granted env and
//! read-only files, wasi:http with outbound requests limited to granted
//! hosts, wasi-nn limited to granted models, and the memory limiter.

use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::capabilities::{Capabilities, OutboundAccess};
use crate::function::InstanceState;
use crate::logs::{LogStream, RequestLog};
use crate::models::ModelPool;
use crate::nn::{ModelView, NnCtx, WitxNn};

/// Per-request store data.
pub struct HostState {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: OutboundPolicy,
    nn: NnCtx,
    pub(crate) memory: MemoryLimiter,
}

/// The WASI modules core modules may import: preview 1, and preview 0
/// (`wasi_unstable`, what older toolchains emit).
pub(crate) const PREVIEW1: &str = "wasi_snapshot_preview1";
pub(crate) const PREVIEW0: &str = "wasi_unstable";

/// A command's standard streams, arguments and CGI environment.
pub(crate) struct Stdio {
    pub stdin: Bytes,
    pub stdout: MemoryOutputPipe,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// WASI as every function gets it: output to its log, its manifest's env,
/// its files read-only (at `/`, and as the working directory so relative
/// paths work), no sockets.
fn wasi(log: &Arc<RequestLog>, capabilities: &Capabilities) -> anyhow::Result<WasiCtxBuilder> {
    let mut wasi = WasiCtx::builder();
    wasi.stdout(log.stream(LogStream::Stdout))
        .stderr(log.stream(LogStream::Stderr))
        .envs(&capabilities.env)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    if let Some(dir) = &capabilities.files {
        for guest in ["/", "."] {
            wasi.preopened_dir(dir, guest, FsPerms::ReadOnly)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("opening the function's files {}", dir.display()))?;
        }
    }
    Ok(wasi)
}

/// A command's WASI: the body on stdin, stdout captured, stderr to the
/// log, the CGI variables after the manifest's env.
fn command_wasi(
    log: &Arc<RequestLog>,
    capabilities: &Capabilities,
    stdio: Stdio,
) -> anyhow::Result<WasiCtxBuilder> {
    let mut wasi = wasi(log, capabilities)?;
    wasi.stdin(MemoryInputPipe::new(stdio.stdin))
        .stdout(stdio.stdout)
        .args(&stdio.args)
        .envs(&stdio.env);
    Ok(wasi)
}

impl HostState {
    /// A component's store data; a command's (`stdio`) reads its stdin from
    /// the request and writes its stdout to be parsed as CGI.
    pub(crate) fn new(
        log: &Arc<RequestLog>,
        pool: Arc<ModelPool>,
        memory_bytes: usize,
        capabilities: &Capabilities,
        stdio: Option<Stdio>,
    ) -> anyhow::Result<Self> {
        let mut wasi = match stdio {
            Some(stdio) => command_wasi(log, capabilities, stdio)?,
            None => wasi(log, capabilities)?,
        };
        Ok(Self {
            table: ResourceTable::new(),
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: OutboundPolicy(capabilities.outbound.clone()),
            nn: NnCtx::new(pool, capabilities.clone(), memory_bytes),
            memory: MemoryLimiter::new(memory_bytes),
        })
    }

    /// The view every host interface over the models is implemented on.
    pub(crate) fn models(&mut self) -> ModelView<'_> {
        ModelView::new(&self.nn, &mut self.table)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Per-request store data of a core module: WASI preview 1 and witx
/// wasi-nn.
pub struct ModuleState {
    wasi: WasiP1Ctx,
    pub(crate) nn: WitxNn,
    pub(crate) memory: MemoryLimiter,
}

impl ModuleState {
    pub(crate) fn new(
        log: &Arc<RequestLog>,
        pool: Arc<ModelPool>,
        memory_bytes: usize,
        capabilities: &Capabilities,
        stdio: Stdio,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            wasi: command_wasi(log, capabilities, stdio)?.build_p1(),
            nn: WitxNn::new(NnCtx::new(pool, capabilities.clone(), memory_bytes)),
            memory: MemoryLimiter::new(memory_bytes),
        })
    }

    pub(crate) fn wasi(&mut self) -> &mut WasiP1Ctx {
        &mut self.wasi
    }
}

/// Both kinds of store data answer for their memory and models the same
/// way: linear memory and host-held tensors count against the limit.
macro_rules! instance_state {
    ($state:ty) => {
        impl InstanceState for $state {
            fn limiter(&mut self) -> &mut MemoryLimiter {
                &mut self.memory
            }

            fn memory_refused(&self) -> bool {
                self.memory.refused || self.nn.was_over_memory()
            }

            fn model_busy(&self) -> bool {
                self.nn.was_refused_busy()
            }
        }
    };
}

instance_state!(HostState);
instance_state!(ModuleState);

/// Caps linear memory and remembers whether it refused a growth, so a
/// trap that follows can be reported as running out of memory.
pub(crate) struct MemoryLimiter {
    limit: usize,
    pub(crate) refused: bool,
}

impl MemoryLimiter {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            refused: false,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Outbound requests reach only the granted hosts; the rest are denied
/// inside the guest (`HTTP-request-denied`).
struct OutboundPolicy(OutboundAccess);

type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<wasmtime_wasi_http::WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _io: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        use wasmtime_wasi_http::Error as HttpError;
        let uri = request.uri();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = uri.host().unwrap_or_default().to_string();
        if !self.0.permits(&host, port) {
            tracing::debug!(uri = %uri, "outbound request denied");
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let permit = match &self.0.connections {
            Some(connections) => match connections.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return Box::new(async { Err(HttpError::ConnectionLimitReached) }),
            },
            None => None,
        };
        let allow_local = self.0.allow_local;
        Box::new(async move {
            use http_body_util::BodyExt;
            if !allow_local && reaches_this_machine(&host, port).await {
                tracing::debug!(%host, "outbound request to this machine denied");
                return Err(HttpError::HttpRequestDenied);
            }
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            // The connection holds its permit until it closes.
            let io = async move {
                let _permit = permit;
                io.await
            };
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// Whether `host` names or resolves to this machine. A name that does not
/// resolve is left to the request to fail.
async fn reaches_this_machine(host: &str, port: u16) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return crate::capabilities::is_local_address(ip);
    }
    match tokio::net::lookup_host((host, port)).await {
        Ok(addresses) => addresses
            .map(|address| address.ip())
            .any(crate::capabilities::is_local_address),
        Err(_) => false,
    }
}
