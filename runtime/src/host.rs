//! The state of one request's store: WASI (no files, no env, no network),
//! wasi:http with outbound requests denied, wasi-nn, memory limits.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::logs::{LogStream, RequestLog};
use crate::models::ModelPool;
use crate::nn::{NnCtx, NnView};

/// Per-request store data.
pub struct HostState {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: OutboundPolicy,
    nn: NnCtx,
    pub(crate) limits: StoreLimits,
}

impl HostState {
    pub(crate) fn new(log: &Arc<RequestLog>, pool: Arc<ModelPool>, max_memory: usize) -> Self {
        let wasi = WasiCtx::builder()
            .stdout(log.stream(LogStream::Stdout))
            .stderr(log.stream(LogStream::Stderr))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            table: ResourceTable::new(),
            wasi,
            http: WasiHttpCtx::new(),
            hooks: OutboundPolicy,
            nn: NnCtx::new(pool),
            limits: StoreLimitsBuilder::new().memory_size(max_memory).build(),
        }
    }

    pub(crate) fn nn(&mut self) -> NnView<'_> {
        NnView::new(&self.nn, &mut self.table)
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

/// Functions get no outbound network: every outgoing request is denied.
struct OutboundPolicy;

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
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _io: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        tracing::debug!(uri = %request.uri(), "outbound request denied");
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}
