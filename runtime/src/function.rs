//! Functions: compiled once at deploy, persisted as a precompiled artifact,
//! instantiated fresh for every request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Body;
use tokio::sync::oneshot;
use wasmtime::component::Component;
use wasmtime::{PoolConcurrencyLimitError, Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::Runtime;
use crate::capabilities::Capabilities;
use crate::host::HostState;
use crate::logs::{LogLimits, LogSink, RequestLog, bounded};

/// A function ready to serve: its component pre-linked against the host.
#[derive(Clone)]
pub struct Function {
    pre: ProxyPre<HostState>,
    runtime: Runtime,
}

/// Why a deploy was refused.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly binary (no \\0asm header)")]
    NotWasm,
    /// A core module where a component is needed.
    #[error(
        "this is a core WebAssembly module, not a component: build the function with `cargo build --target wasm32-wasip2`"
    )]
    CoreModule,
    /// Malformed or invalid component.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component imports an interface the platform does not provide.
    #[error("the component imports something the platform does not provide: {0}")]
    UnsupportedImport(String),
    /// The component does not export `wasi:http/incoming-handler`.
    #[error("the component does not export wasi:http/incoming-handler@0.2.x: {0}")]
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
    /// The function answered with a wasi:http error code.
    #[error("the function failed with {0}")]
    Guest(String),
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
}

impl Runtime {
    /// Validates a component and compiles it to an artifact for [`Runtime::load`].
    /// CPU-heavy: call it off the async workers.
    pub fn compile(&self, wasm: &[u8]) -> Result<Vec<u8>, CompileError> {
        check_header(wasm)?;
        let component = Component::new(&self.inner.engine, wasm)
            .map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
        self.prepare(&component)?;
        self.inner.counters.compiled();
        component
            .serialize()
            .map_err(|e| CompileError::Invalid(format!("serialising: {e:#}")))
    }

    /// Loads an artifact made by [`Runtime::compile`] with this engine.
    pub fn load(&self, artifact: &[u8]) -> anyhow::Result<Function> {
        // SAFETY: artifacts are produced by `compile` on an engine with the
        // same fingerprint and kept in the platform's own store; tenants
        // never supply precompiled bytes.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(&self.inner.engine, artifact) }
            .map_err(anyhow::Error::from)?;
        let pre = self.prepare(&component).map_err(anyhow::Error::from)?;
        self.inner.counters.loaded();
        Ok(Function {
            pre,
            runtime: self.clone(),
        })
    }

    fn prepare(&self, component: &Component) -> Result<ProxyPre<HostState>, CompileError> {
        let instance_pre = self
            .inner
            .linker
            .instantiate_pre(component)
            .map_err(|e| CompileError::UnsupportedImport(format!("{e:#}")))?;
        ProxyPre::new(instance_pre).map_err(|e| CompileError::MissingHandler(format!("{e:#}")))
    }
}

fn check_header(wasm: &[u8]) -> Result<(), CompileError> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(CompileError::NotWasm);
    }
    // Layer 0 with version 1 is a core module; components use layer 1.
    if wasm[4..8] == [1, 0, 0, 0] {
        return Err(CompileError::CoreModule);
    }
    Ok(())
}

/// Longest trap reason or guest error the client is told.
const MAX_REASON_BYTES: usize = 4096;

/// Longest trap story (with the guest's backtrace) the function's log gets.
const MAX_DETAILS_BYTES: usize = 16 * 1024;

impl TrapDetails {
    /// The trap and its causes, one per line, with the guest's backtrace
    /// (wasmtime adds it as a cause) but never the host's own Rust
    /// backtrace, which `{:?}` would print when `RUST_BACKTRACE` is set.
    fn of(error: &anyhow::Error) -> Self {
        let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
        Self {
            reason: bounded(error.root_cause().to_string(), MAX_REASON_BYTES),
            details: bounded(chain.join("\n"), MAX_DETAILS_BYTES),
        }
    }
}

impl Function {
    /// Runs one HTTP request in a fresh instance. The response's body may
    /// still be streaming from the guest when this returns; the instance
    /// lives until it is done or the deadline passes.
    pub async fn handle<B>(
        &self,
        request: hyper::Request<B>,
        invocation: Invocation,
    ) -> Result<hyper::Response<HyperOutgoingBody>, InvokeError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let inner = &self.runtime.inner;
        let log = RequestLog::new(invocation.log.clone(), invocation.log_limits);
        let memory_bytes = invocation.memory_bytes.min(inner.limits.max_memory_bytes);
        let state = HostState::new(
            &log,
            inner.models.clone(),
            memory_bytes,
            &invocation.capabilities,
        )
        .map_err(|e| InvokeError::Host(format!("{e:#}")))?;
        let mut store = Store::new(&inner.engine, state);
        store.limiter(|state| &mut state.memory);
        let deadline = Instant::now() + invocation.timeout;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        let host_error = |e: wasmtime::Error| InvokeError::Host(format!("{e:#}"));
        let (sender, receiver) = oneshot::channel();
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
        let pre = self.pre.clone();
        let task = tokio::spawn(async move {
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, request, response_out)
                    .await
            };
            let outcome = tokio::time::timeout_at(deadline.into(), run).await;
            let memory_refused = store.data().memory_refused();
            let model_busy = store.data().model_busy();
            drop(store);
            drop(log);
            Ending {
                outcome,
                memory_refused,
                model_busy,
            }
        });
        let error = match receiver.await {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(code)) => InvokeError::Guest(bounded(format!("{code:?}"), MAX_REASON_BYTES)),
            Err(_) => match task.await {
                Ok(ending) => ending.classify(invocation.timeout, memory_bytes),
                Err(join) => InvokeError::Host(format!("the request task failed: {join}")),
            },
        };
        Err(error)
    }
}

/// How a request's instance ended.
struct Ending {
    outcome: Result<wasmtime::Result<()>, tokio::time::error::Elapsed>,
    memory_refused: bool,
    model_busy: bool,
}

impl Ending {
    /// Why the guest ended without sending a response: a trap or a missing
    /// response after a model refused it as busy is that model's doing.
    fn classify(self, timeout: Duration, memory_bytes: usize) -> InvokeError {
        let model_busy = self.model_busy;
        let error = self.cause(timeout, memory_bytes);
        match error {
            InvokeError::Trap(_) | InvokeError::NoResponse if model_busy => {
                InvokeError::ModelBusy(Box::new(error))
            }
            error => error,
        }
    }

    fn cause(self, timeout: Duration, memory_bytes: usize) -> InvokeError {
        let error = match self.outcome {
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
        let trap = TrapDetails::of(&anyhow::Error::from(error));
        if self.memory_refused {
            InvokeError::OutOfMemory(memory_bytes, trap)
        } else {
            InvokeError::Trap(trap)
        }
    }
}
