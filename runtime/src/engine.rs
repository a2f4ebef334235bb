//! The wasmtime engine: component model, pooling allocator, epoch
//! interruption, and the ticker that advances epochs.

use std::time::Duration;

use anyhow::Result;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances: the granularity of deadlines and of the
/// cooperative yields that keep a busy guest from hogging an async worker.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Sizing of the sandbox, shared by every function.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    /// Instances that may run at once (pooling allocator slots).
    pub max_instances: u32,
    /// Linear memory one instance may grow to, in bytes.
    pub max_memory_bytes: usize,
    /// Wall-clock time a request may run before it is interrupted.
    pub timeout: Duration,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            max_instances: 1000,
            max_memory_bytes: 256 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Builds the engine and starts its epoch ticker (which stops when the
/// engine is dropped).
pub fn build(limits: &SandboxLimits) -> Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    // WASI 0.3 handlers: async exports, streams and futures.
    config.wasm_component_model_async(true);
    config.epoch_interruption(true);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(limits)));
    let engine = Engine::new(&config)?;
    start_ticker(&engine);
    Ok(engine)
}

fn pooling(limits: &SandboxLimits) -> PoolingAllocationConfig {
    let instances = limits.max_instances;
    let mut pool = PoolingAllocationConfig::new();
    // A Rust wasip2 component has a few core instances (its module plus
    // adapter shims) and tables, usually one memory.
    pool.total_component_instances(instances)
        .total_core_instances(instances * 4)
        .total_memories(instances * 2)
        .total_tables(instances * 4)
        // A store's fiber, and a WASI 0.3 instance's for each task blocked
        // in a host call.
        .total_stacks(instances * 2)
        .max_memory_size(limits.max_memory_bytes);
    pool
}

fn start_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawning the epoch ticker");
}
