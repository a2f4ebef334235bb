//! Gigafactory's runtime: the wasmtime sandbox that runs tenants'
//! functions, the host interfaces they may use (WASI, `wasi:http`,
//! `wasi:nn`) and the shared model pool behind `wasi:nn`.
//!
//! It has no HTTP server and no storage: the gateway hands it wasm to
//! [`Runtime::compile`], keeps the artifact, [`Runtime::load`]s it into a
//! [`Function`] and calls [`Function::handle`] per request.

mod ai;
mod capabilities;
mod cgi;
pub mod devices;
mod engine;
mod function;
mod host;
pub mod llm;
pub mod logs;
pub mod models;
pub mod nn;
mod queue;
mod service;
mod spin;
pub mod stats;
/// The SDK's BERT WordPiece tokenizer, compiled into the host too: one
/// implementation, so `gigafactory:ai` `embed` and a guest tokenising for
/// itself agree token for token.
#[path = "../../sdk/src/text.rs"]
pub mod text;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Linker;

pub use capabilities::{Capabilities, ComputeBudget, ModelAccess, OutboundAccess};
pub use engine::{EPOCH_TICK, SandboxLimits};
pub use function::{CompileError, CutOff, Function, FunctionKind, Invocation, InvokeError};
pub use host::{HostState, ModuleState};
pub use models::{EngineOptions, ModelPool, PoolOptions};
pub use service::{AiError, AiService};
pub use wasmtime_wasi_http::Error as HttpError;
pub use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// The sandbox: one engine and linker shared by every function.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<HostState>,
    /// For core modules: WASI preview 1.
    module_linker: wasmtime::Linker<ModuleState>,
    models: Arc<ModelPool>,
    limits: SandboxLimits,
    fingerprint: String,
    counters: Counters,
}

/// How much compiling the runtime has done (restarts should not compile).
#[derive(Debug, Default)]
pub struct Counters {
    compiled: AtomicU64,
    loaded: AtomicU64,
}

impl Counters {
    fn compiled(&self) {
        self.compiled.fetch_add(1, Ordering::Relaxed);
    }

    fn loaded(&self) {
        self.loaded.fetch_add(1, Ordering::Relaxed);
    }

    /// Components compiled from wasm since start.
    pub fn compilations(&self) -> u64 {
        self.compiled.load(Ordering::Relaxed)
    }

    /// Precompiled artifacts loaded since start.
    pub fn artifact_loads(&self) -> u64 {
        self.loaded.load(Ordering::Relaxed)
    }
}

impl Runtime {
    /// Builds the engine and links the host interfaces over `models`.
    pub fn new(limits: SandboxLimits, models: Arc<ModelPool>) -> Result<Self> {
        let engine = engine::build(&limits)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        // WASI 0.3 next to 0.2: a 0.3 handler built by Rust's std imports both.
        wasmtime_wasi::p3::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
        nn::add_to_linker(&mut linker, HostState::models)?;
        ai::add_to_linker(&mut linker, HostState::models)?;
        spin::add_to_linker(&mut linker, HostState::models)?;
        let mut module_linker = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut module_linker, ModuleState::wasi)?;
        wasmtime_wasi::p0::add_to_linker_async(&mut module_linker, ModuleState::wasi)?;
        nn::add_witx_to_linker(&mut module_linker)?;
        let fingerprint = fingerprint(&engine);
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                linker,
                module_linker,
                models,
                limits,
                fingerprint,
                counters: Counters::default(),
            }),
        })
    }

    /// Identifies the engine's compiled-code format: an artifact is only
    /// loadable by an engine with the same fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }

    /// The shared model pool.
    pub fn models(&self) -> &ModelPool {
        &self.inner.models
    }

    /// The models as `capabilities` may use them: the way every model
    /// call goes, from a function or from the gateway's own API.
    pub fn ai(&self, capabilities: Capabilities) -> AiService {
        AiService::new(self.inner.models.clone(), capabilities)
    }

    /// The sandbox limits every function runs under.
    pub fn limits(&self) -> &SandboxLimits {
        &self.inner.limits
    }

    /// Compile and load counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }
}

fn fingerprint(engine: &Engine) -> String {
    use std::hash::{Hash, Hasher};
    struct Sha(Sha256);
    impl Hasher for Sha {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut hasher = Sha(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(&hasher.0.finalize()[..16])
}
