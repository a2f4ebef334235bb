//! Functions: compiled once at deploy, persisted as a precompiled artifact,
//! instantiated fresh for every request. Four kinds run: components
//! exporting `wasi:http/incoming-handler@0.2` or `wasi:http/handler@0.3`
//! (the request and response streamed through), components exporting
//! `wasi:cli/run` and core modules exporting `_start` over
//! `wasi_snapshot_preview1` (commands, spoken to in CGI as WAGI does:
//! `cgi.rs`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tracing::Instrument as _;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use wasmtime::component::Component;
use wasmtime::{
    Engine, InstancePre, Module, PoolConcurrencyLimitError, Precompiled, Store, Trap,
    UpdateDeadline,
};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p3::bindings::ServicePre;

use crate::Runtime;
use crate::capabilities::Capabilities;
use crate::cgi;
use crate::host::{HostState, MemoryLimiter, ModuleState, Stdio};
use crate::logs::{LogLimits, LogSink, RequestLog, bounded};

/// A function ready to serve: its code pre-linked against the host.
#[derive(Clone)]
pub struct Function {
    entry: Entry,
    runtime: Runtime,
}

#[derive(Clone)]
enum Entry {
    Http(ProxyPre<HostState>),
    Http3(ServicePre<HostState>),
    Command(CommandPre<HostState>),
    Module(InstancePre<ModuleState>),
}

/// What a function is, found in its binary at deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionKind {
    /// A component exporting `wasi:http/incoming-handler@0.2`.
    Http,
    /// A component exporting `wasi:http/handler@0.3`.
    Http3,
    /// A component exporting `wasi:cli/run`, served as CGI.
    Command,
    /// A core module with `_start` over `wasi_snapshot_preview1`, served as CGI (WAGI).
    Module,
}

impl FunctionKind {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            FunctionKind::Http => "http",
            FunctionKind::Http3 => "http-0.3",
            FunctionKind::Command => "command",
            FunctionKind::Module => "wagi",
        }
    }
}

/// Why a deploy was refused.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly binary (no \\0asm header)")]
    NotWasm,
    /// Malformed or invalid component or module.
    #[error("invalid WebAssembly: {0}")]
    Invalid(String),
    /// It imports something the platform does not provide.
    #[error("{0}")]
    UnsupportedImport(String),
    /// It exports nothing the platform can call.
    #[error("{0}")]
    MissingHandler(String),
}

/// Why a request to a function failed (the response was not produced).
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The function ran past its deadline and was interrupted.
    #[error("the function did not finish within {0:?}")]
    Deadline(Duration),
    /// The function trapped (a panic, an out-of-bounds access, …).
    #[error("the function trapped: {}", .0.reason)]
    Trap(TrapDetails),
    /// The function trapped after its memory limit refused to grow.
    #[error("the function ran out of memory (limit {} bytes) and trapped: {}", .0, .1.reason)]
    OutOfMemory(usize, TrapDetails),
    /// The function returned without setting a response.
    #[error("the function returned without sending a response")]
    NoResponse,
    /// The function answered with a wasi:http error code, or a command
    /// wrote something that is not a CGI response.
    #[error("the function failed with {0}")]
    Guest(String),
    /// A command exited with a status other than 0.
    #[error("the function exited with status {0} (its stderr is in the function's log)")]
    Exited(i32),
    /// The request body could not be read to the end (for a command,
    /// which reads it before it starts).
    #[error("reading the request body failed: {0}")]
    Body(String),
    /// The function failed after a model refused its `compute` because the
    /// model's queue was full; try again shortly.
    #[error(
        "a model the function uses is busy (its queue is full); retry shortly (the function then failed: {0})"
    )]
    ModelBusy(Box<InvokeError>),
    /// Every instance slot is busy; try again shortly.
    #[error("the platform is at its limit of concurrent instances; retry shortly")]
    Overloaded,
    /// The host could not set the request up.
    #[error("could not start the function: {0}")]
    Host(String),
}

/// A trap: its reason for the client, the whole story for the function's log.
#[derive(Debug, Clone)]
pub struct TrapDetails {
    /// The trap itself, e.g. `wasm trap: wasm `unreachable` instruction executed`.
    pub reason: String,
    /// The reason with the guest's backtrace.
    pub details: String,
}

/// What a single invocation is given.
#[derive(Clone)]
pub struct Invocation {
    /// Where the guest's stdout/stderr lines go.
    pub log: Arc<dyn LogSink>,
    /// How much it may log.
    pub log_limits: LogLimits,
    /// Its wall-clock deadline.
    pub timeout: Duration,
    /// Its linear memory limit in bytes (at most the sandbox's).
    pub memory_bytes: usize,
    /// Env, files, models and hosts it may use.
    pub capabilities: Capabilities,
    /// The public path that chose the function (`/fn/acme/hello`): a
    /// command's `SCRIPT_NAME`; the request's path is what follows it.
    pub route: String,
}

impl Runtime {
    /// Validates a component and compiles it to an artifact for [`Runtime::load`].
    /// CPU-heavy: call it off the async workers.
    pub fn compile(&self, wasm: &[u8]) -> Result<Vec<u8>, CompileError> {
        let invalid = |e: wasmtime::Error| CompileError::Invalid(format!("{e:#}"));
        let engine = &self.inner.engine;
        let artifact = if is_core_module(wasm)? {
            let module = Module::new(engine, wasm).map_err(invalid)?;
            self.prepare_module(&module)?;
            module.serialize()
        } else {
            let component = Component::new(engine, wasm).map_err(invalid)?;
            self.prepare(&component)?;
            component.serialize()
        };
        self.inner.counters.compiled();
        artifact.map_err(|e| CompileError::Invalid(format!("serialising: {e:#}")))
    }

    /// Loads an artifact made by [`Runtime::compile`] with this engine.
    pub fn load(&self, artifact: &[u8]) -> anyhow::Result<Function> {
        let engine = &self.inner.engine;
        // SAFETY: artifacts are produced by `compile` on an engine with the
        // same fingerprint and kept in the platform's own store; tenants
        // never supply precompiled bytes.
        #[allow(unsafe_code)]
        let entry = match Engine::detect_precompiled(artifact) {
            Some(Precompiled::Module) => {
                let module = unsafe { Module::deserialize(engine, artifact) }?;
                Entry::Module(self.prepare_module(&module)?)
            }
            _ => {
                let component = unsafe { Component::deserialize(engine, artifact) }?;
                self.prepare(&component)?
            }
        };
        self.inner.counters.loaded();
        Ok(Function {
            entry,
            runtime: self.clone(),
        })
    }

    /// A component's entry point: an HTTP handler (WASI 0.3, else 0.2),
    /// else a command.
    fn prepare(&self, component: &Component) -> Result<Entry, CompileError> {
        let engine = &self.inner.engine;
        let instance_pre = self.inner.linker.instantiate_pre(component).map_err(|e| {
            let kind = component.component_type();
            let candidate = kind
                .imports(engine)
                .chain(kind.exports(engine))
                .find(|(name, _)| name.starts_with("wasi:") && name.contains("@0.3.0-rc"));
            CompileError::UnsupportedImport(match candidate {
                Some((name, _)) => format!(
                    "a component built for a WASI 0.3 release candidate (it uses {name}): WASI 0.3.0 and later 0.3.x (e.g. the wasip3 crate 0.7 or newer) and WASI 0.2 are served"
                ),
                None => format!(
                    "the component imports something the platform does not provide: {e:#}"
                ),
            })
        })?;
        if let Ok(service) = ServicePre::new(instance_pre.clone()) {
            return Ok(Entry::Http3(service));
        }
        if let Ok(proxy) = ProxyPre::new(instance_pre.clone()) {
            return Ok(Entry::Http(proxy));
        }
        CommandPre::new(instance_pre)
            .map(Entry::Command)
            .map_err(|_| {
                let exports: Vec<String> = component
                    .component_type()
                    .exports(engine)
                    .map(|(name, _)| name.to_string())
                    .collect();
                CompileError::MissingHandler(format!(
                    "the component exports none of wasi:http/handler@0.3.x, wasi:http/incoming-handler@0.2.x (HTTP handlers) and wasi:cli/run@0.2.x (a command, served as CGI); it exports {exports:?}"
                ))
            })
    }

    /// A core module runs as a WAGI command: `_start` over WASI preview 1.
    fn prepare_module(&self, module: &Module) -> Result<InstancePre<ModuleState>, CompileError> {
        let known = [
            crate::host::PREVIEW1,
            crate::host::PREVIEW0,
            crate::nn::WITX_MODULE,
        ];
        if let Some(import) = module.imports().find(|i| !known.contains(&i.module())) {
            return Err(CompileError::UnsupportedImport(format!(
                "a core module importing {}::{}: core modules may import {}, {} and {} (witx wasi-nn, with WasmEdge's additions), and run as WAGI commands; build for wasm32-wasip2 for the component interfaces (wasi:http, wasi:nn, gigafactory:ai)",
                import.module(),
                import.name(),
                known[0],
                known[1],
                known[2],
            )));
        }
        if !matches!(
            module.get_export("_start"),
            Some(wasmtime::ExternType::Func(_))
        ) {
            return Err(CompileError::MissingHandler(
                "a core module without a `_start` function (a library or reactor): core modules run as WAGI commands, from `_start`".into(),
            ));
        }
        self.inner
            .module_linker
            .instantiate_pre(module)
            .map_err(|e| CompileError::UnsupportedImport(format!("{e:#}")))
    }
}

/// Whether `wasm` is a core module (layer 0, version 1) rather than a component.
fn is_core_module(wasm: &[u8]) -> Result<bool, CompileError> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(CompileError::NotWasm);
    }
    Ok(wasm[4..8] == [1, 0, 0, 0])
}

/// Longest trap reason or guest error the client is told.
const MAX_REASON_BYTES: usize = 4096;

/// Longest trap story (with the guest's backtrace) the function's log gets.
const MAX_DETAILS_BYTES: usize = 16 * 1024;

impl TrapDetails {
    /// The trap and its causes, one per line, with the guest's backtrace
    /// (wasmtime adds it as a cause) but never the host's own Rust
    /// backtrace, which `{:?}` would print when `RUST_BACKTRACE` is set.
    fn of(error: &wasmtime::Error) -> Self {
        let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
        Self {
            reason: bounded(error.root_cause().to_string(), MAX_REASON_BYTES),
            details: bounded(chain.join("\n"), MAX_DETAILS_BYTES),
        }
    }
}

impl Function {
    /// What it is.
    pub fn kind(&self) -> FunctionKind {
        match self.entry {
            Entry::Http(_) => FunctionKind::Http,
            Entry::Http3(_) => FunctionKind::Http3,
            Entry::Command(_) => FunctionKind::Command,
            Entry::Module(_) => FunctionKind::Module,
        }
    }

    /// Runs one HTTP request in a fresh instance. The response's body may
    /// still be streaming from the guest when this returns; the instance
    /// lives until it is done or the deadline passes. A command reads the
    /// whole body first and answers when it exits.
    pub async fn handle<B>(
        &self,
        request: hyper::Request<B>,
        invocation: Invocation,
    ) -> Result<hyper::Response<HyperOutgoingBody>, InvokeError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error> + std::fmt::Display,
    {
        match &self.entry {
            Entry::Http(pre) => self.serve_http(pre.clone(), request, invocation).await,
            Entry::Http3(pre) => self.serve_http3(pre.clone(), request, invocation).await,
            Entry::Command(_) | Entry::Module(_) => self.run_command(request, invocation).await,
        }
    }

    async fn serve_http<B>(
        &self,
        pre: ProxyPre<HostState>,
        request: hyper::Request<B>,
        invocation: Invocation,
    ) -> Result<hyper::Response<HyperOutgoingBody>, InvokeError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let RequestStore {
            mut store,
            log,
            memory_bytes,
            deadline,
        } = self.request_store(&invocation)?;
        let host_error = |e: wasmtime::Error| InvokeError::Host(format!("{e:#}"));
        let (sender, receiver) = oneshot::channel();
        let (finished, finished_receiver) = oneshot::channel();
        let timeout = invocation.timeout;
        let request = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)
            .map_err(host_error)?;
        let response_out = store
            .data_mut()
            .http()
            .new_response_outparam(sender)
            .map_err(host_error)?;
        let task = tokio::spawn(
            async move {
                let run = async {
                    let proxy = pre.instantiate_async(&mut store).await?;
                    proxy
                        .wasi_http_incoming_handler()
                        .call_handle(&mut store, request, response_out)
                        .await
                };
                let outcome = tokio::time::timeout_at(deadline.into(), run).await;
                let ending = Ending::of(outcome, store.data());
                ending.tell(finished, timeout, memory_bytes);
                drop(store);
                drop(log);
                ending
            }
            .in_current_span(),
        );
        response_or_why(receiver, task, finished_receiver, &invocation, memory_bytes).await
    }

    /// A fresh store for one HTTP request, interrupted at its deadline.
    fn request_store(&self, invocation: &Invocation) -> Result<RequestStore, InvokeError> {
        let inner = &self.runtime.inner;
        let log = RequestLog::new(invocation.log.clone(), invocation.log_limits);
        let memory_bytes = invocation.memory_bytes.min(inner.limits.max_memory_bytes);
        let state = HostState::new(
            &log,
            inner.models.clone(),
            memory_bytes,
            &invocation.capabilities,
            None,
        )
        .map_err(|e| InvokeError::Host(format!("{e:#}")))?;
        let deadline = Instant::now() + invocation.timeout;
        Ok(RequestStore {
            store: sandbox(&inner.engine, state, deadline),
            log,
            memory_bytes,
            deadline,
        })
    }
}

/// A handler's store and what its request task keeps until it ends.
struct RequestStore {
    store: Store<HostState>,
    log: Arc<RequestLog>,
    memory_bytes: usize,
    deadline: Instant,
}

/// The response a handler set, else why it set none: its error code, or
/// how its instance ended.
async fn response_or_why<C: std::fmt::Debug>(
    receiver: oneshot::Receiver<Result<hyper::Response<HyperOutgoingBody>, C>>,
    task: tokio::task::JoinHandle<Ending>,
    finished: oneshot::Receiver<Option<InvokeError>>,
    invocation: &Invocation,
    memory_bytes: usize,
) -> Result<hyper::Response<HyperOutgoingBody>, InvokeError> {
    let error = match receiver.await {
        Ok(Ok(response)) => {
            // The body may still be streaming: it ends cleanly only if the
            // instance does.
            let cut = CutOff::default();
            let (mut parts, body) = response.into_parts();
            parts.extensions.insert(cut.clone());
            let body = UntilFinished {
                body,
                finished: Some(finished),
                cut,
            };
            return Ok(hyper::Response::from_parts(parts, body.boxed_unsync()));
        }
        Ok(Err(code)) => InvokeError::Guest(bounded(format!("{code:?}"), MAX_REASON_BYTES)),
        Err(_) => match task.await {
            Ok(ending) => ending.classify(invocation.timeout, memory_bytes),
            Err(join) => InvokeError::Host(format!("the request task failed: {join}")),
        },
    };
    Err(error)
}

impl Function {
    /// Runs one request through a WASI 0.3 handler. Its body streams while
    /// the store's event loop runs, so the task owning the store runs it
    /// until the guest's last task ends (or the deadline), also after the
    /// response head has gone back.
    async fn serve_http3<B>(
        &self,
        pre: ServicePre<HostState>,
        request: hyper::Request<B>,
        invocation: Invocation,
    ) -> Result<hyper::Response<HyperOutgoingBody>, InvokeError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let RequestStore {
            mut store,
            log,
            memory_bytes,
            deadline,
        } = self.request_store(&invocation)?;
        let request = with_authority(request)?;
        let (request, request_io) =
            wasmtime_wasi_http::p3::Request::from_http(store.data_mut().http().hooks, request);
        let (sender, receiver) = oneshot::channel();
        let (finished, finished_receiver) = oneshot::channel();
        let timeout = invocation.timeout;
        let task = tokio::spawn(
            async move {
                let run = async {
                    let service = pre.instantiate_async(&mut store).await?;
                    store
                        .run_concurrent(async move |accessor| {
                            let response =
                                match service.handle(accessor, request).await? {
                                    Ok(response) => Ok(accessor
                                        .with(|store| response.into_http(store, request_io))?),
                                    Err(code) => Err(code),
                                };
                            let _ = sender.send(response);
                            std::future::poll_fn(|cx| accessor.poll_no_interesting_tasks(cx)).await;
                            wasmtime::Result::<()>::Ok(())
                        })
                        .await?
                };
                let outcome = tokio::time::timeout_at(deadline.into(), run).await;
                let ending = Ending::of(outcome, store.data());
                ending.tell(finished, timeout, memory_bytes);
                drop(store);
                drop(log);
                ending
            }
            .in_current_span(),
        );
        response_or_why(receiver, task, finished_receiver, &invocation, memory_bytes).await
    }
}

/// The request with an absolute URI: a WASI 0.3 guest reads the authority
/// from the URI only (the `Host` header is forbidden to it), where 0.2's
/// incoming request took it from `Host`.
fn with_authority<B>(mut request: hyper::Request<B>) -> Result<hyper::Request<B>, InvokeError> {
    if request.uri().authority().is_some() {
        return Ok(request);
    }
    let host = request
        .headers()
        .get(hyper::header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_owned();
    *request.uri_mut() = hyper::Uri::builder()
        .scheme("http")
        .authority(host)
        .path_and_query(path)
        .build()
        .map_err(|e| InvokeError::Host(format!("the request's URI: {e}")))?;
    Ok(request)
}

/// Why a function's response body was cut off, once it was (a trap or
/// the deadline while the function wrote it); in the response's
/// extensions, for the host to count and log.
#[derive(Clone, Default, Debug)]
pub struct CutOff(Arc<std::sync::OnceLock<InvokeError>>);

impl CutOff {
    /// The failure that cut the body off, once it has.
    pub fn why(&self) -> Option<&InvokeError> {
        self.0.get()
    }
}

/// A handler's response body, which ends in an error rather than cleanly
/// when its instance did not finish (a trap or the deadline while
/// writing it): a cut-off chunked body must not look complete.
struct UntilFinished {
    body: HyperOutgoingBody,
    /// How the instance ended, sent before its store (and so the body's
    /// channel) is dropped; nothing yet when the guest finished its body
    /// and is still running.
    finished: Option<oneshot::Receiver<Option<InvokeError>>>,
    cut: CutOff,
}

impl Body for UntilFinished {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = ready!(Pin::new(&mut this.body).poll_frame(cx)) {
            return Poll::Ready(Some(frame));
        }
        let Some(mut finished) = this.finished.take() else {
            return Poll::Ready(None);
        };
        let failure = match finished.try_recv() {
            Ok(Some(failure)) => failure,
            Ok(None) | Err(oneshot::error::TryRecvError::Empty) => return Poll::Ready(None),
            Err(oneshot::error::TryRecvError::Closed) => {
                InvokeError::Host("the request task ended without a word".into())
            }
        };
        let message = format!("the function's response was cut off: {failure}");
        let _ = this.cut.0.set(failure);
        Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(Some(
            message,
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.finished.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request's store: its memory limited, its guest interrupted at
/// `deadline` and yielding to the other tasks on its worker every epoch
/// tick until then.
fn sandbox<T: InstanceState>(engine: &Engine, state: T, deadline: Instant) -> Store<T> {
    let mut store = Store::new(engine, state);
    store.limiter(|state| state.limiter());
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        Ok(if Instant::now() >= deadline {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Yield(1)
        })
    });
    store
}

/// What the sandbox asks of a store's data.
pub(crate) trait InstanceState: Send + 'static {
    /// Its linear-memory limiter.
    fn limiter(&mut self) -> &mut MemoryLimiter;
    /// Whether it hit its memory limit (linear memory or host-held tensors).
    fn memory_refused(&self) -> bool;
    /// Whether a model refused its `compute` as busy.
    fn model_busy(&self) -> bool;
}

impl Function {
    /// A command: the body on stdin, the request in its environment and
    /// arguments, its stdout (at most its memory limit) the CGI response.
    async fn run_command<B>(
        &self,
        request: hyper::Request<B>,
        invocation: Invocation,
    ) -> Result<hyper::Response<HyperOutgoingBody>, InvokeError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let inner = &self.runtime.inner;
        // The deadline counts from the request, as a handler's does: a body
        // that never ends meets it here.
        let deadline = Instant::now() + invocation.timeout;
        let (parts, body) = request.into_parts();
        let body = tokio::time::timeout_at(deadline.into(), body.collect())
            .await
            .map_err(|_elapsed| InvokeError::Deadline(invocation.timeout))?
            .map_err(|e| InvokeError::Body(e.to_string()))?
            .to_bytes();
        let start = cgi::start(&parts, &invocation.route, body.len());
        let log = RequestLog::new(invocation.log.clone(), invocation.log_limits);
        let memory_bytes = invocation.memory_bytes.min(inner.limits.max_memory_bytes);
        let stdout = MemoryOutputPipe::new(memory_bytes);
        let stdio = Stdio {
            stdin: body,
            stdout: stdout.clone(),
            args: start.args,
            env: start.env,
        };
        let host_error = |e: anyhow::Error| InvokeError::Host(format!("{e:#}"));
        let ending = match &self.entry {
            Entry::Command(pre) => {
                let state = HostState::new(
                    &log,
                    inner.models.clone(),
                    memory_bytes,
                    &invocation.capabilities,
                    Some(stdio),
                )
                .map_err(host_error)?;
                let mut store = sandbox(&inner.engine, state, deadline);
                let pre = pre.clone();
                let run = async {
                    let command = pre.instantiate_async(&mut store).await?;
                    match command.wasi_cli_run().call_run(&mut store).await? {
                        Ok(()) => Ok(()),
                        Err(()) => Err(wasmtime::Error::from(I32Exit(1))),
                    }
                };
                let outcome = tokio::time::timeout_at(deadline.into(), run).await;
                Ending::of(outcome, store.data())
            }
            Entry::Module(pre) => {
                let state = ModuleState::new(
                    &log,
                    inner.models.clone(),
                    memory_bytes,
                    &invocation.capabilities,
                    stdio,
                )
                .map_err(host_error)?;
                let mut store = sandbox(&inner.engine, state, deadline);
                let run = async {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    start.call_async(&mut store, ()).await
                };
                let outcome = tokio::time::timeout_at(deadline.into(), run).await;
                Ending::of(outcome, store.data())
            }
            Entry::Http(_) | Entry::Http3(_) => {
                unreachable!("HTTP handlers are served by serve_http and serve_http3")
            }
        };
        drop(log);
        match ending.outcome {
            Ok(Ok(())) => {}
            Ok(Err(error)) => match error.downcast_ref::<I32Exit>() {
                Some(I32Exit(0)) => {}
                Some(I32Exit(status)) => return Err(InvokeError::Exited(*status)),
                None => {
                    return Err(Ending {
                        outcome: Ok(Err(error)),
                        ..ending
                    }
                    .classify(invocation.timeout, memory_bytes));
                }
            },
            Err(_elapsed) => return Err(InvokeError::Deadline(invocation.timeout)),
        }
        // The store is gone: the output is ours alone, taken without a copy.
        let Some(output) = stdout.try_into_inner() else {
            return Err(InvokeError::Host(
                "the command's output is still held after its store ended".into(),
            ));
        };
        let output = output.freeze();
        let response = cgi::response(output).map_err(|why| {
            InvokeError::Guest(format!("output that is not a CGI response: {why}"))
        })?;
        Ok(response.map(|body| {
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync()
        }))
    }
}

/// How a request's instance ended.
struct Ending {
    outcome: Result<wasmtime::Result<()>, tokio::time::error::Elapsed>,
    memory_refused: bool,
    model_busy: bool,
}

impl Ending {
    /// Tells the response body how the instance ended; called before the
    /// store (and so the body's channel) is dropped.
    fn tell(
        &self,
        finished: oneshot::Sender<Option<InvokeError>>,
        timeout: Duration,
        memory_bytes: usize,
    ) {
        let _ = finished.send(self.failure(timeout, memory_bytes));
    }

    /// Why the instance ended, unless it returned within its deadline.
    fn failure(&self, timeout: Duration, memory_bytes: usize) -> Option<InvokeError> {
        (!matches!(self.outcome, Ok(Ok(())))).then(|| self.classify(timeout, memory_bytes))
    }

    fn of(
        outcome: Result<wasmtime::Result<()>, tokio::time::error::Elapsed>,
        state: &impl InstanceState,
    ) -> Self {
        Ending {
            outcome,
            memory_refused: state.memory_refused(),
            model_busy: state.model_busy(),
        }
    }

    /// Why the guest ended without sending a response: a trap or a missing
    /// response after a model refused it as busy is that model's doing.
    fn classify(&self, timeout: Duration, memory_bytes: usize) -> InvokeError {
        let model_busy = self.model_busy;
        let error = self.cause(timeout, memory_bytes);
        match error {
            InvokeError::Trap(_) | InvokeError::NoResponse if model_busy => {
                InvokeError::ModelBusy(Box::new(error))
            }
            error => error,
        }
    }

    fn cause(&self, timeout: Duration, memory_bytes: usize) -> InvokeError {
        let error = match &self.outcome {
            Ok(Ok(())) => return InvokeError::NoResponse,
            Err(_elapsed) => return InvokeError::Deadline(timeout),
            Ok(Err(error)) => error,
        };
        if error.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
            return InvokeError::Overloaded;
        }
        if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
            return InvokeError::Deadline(timeout);
        }
        let trap = TrapDetails::of(error);
        if self.memory_refused {
            InvokeError::OutOfMemory(memory_bytes, trap)
        } else {
            InvokeError::Trap(trap)
        }
    }
}
