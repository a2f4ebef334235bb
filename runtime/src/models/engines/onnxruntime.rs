//! The ONNX Runtime engine, through the `ort` crate: the shared library is
//! loaded at run time (`load-dynamic`), so building needs no ONNX Runtime
//! and a binary without one runs ONNX models with tract. On the CPU each
//! model keeps one wide session (as many compute threads as inference
//! workers) for a run alone, and a narrow single-threaded session per
//! worker for runs side by side: a lone call gets every core, and under
//! load concurrent batches each take one core instead of fighting over
//! all of them (measured in BENCHMARKS.md). On a GPU
//! (feature `cuda`, with an `onnxruntime-gpu` library) a model runs through
//! the CUDA execution provider on the device placement chose.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use anyhow::{Context as _, Result, anyhow};
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::{Data, Engine, Loaded, Source};
use crate::models::config::ModelFormat;
use crate::models::graph::{Graph, TensorSpec, guarded, panic_text};
use crate::models::tensor::{ElementType, HostTensor};

/// The environment variable naming the library, as `--onnxruntime` does.
pub const LIBRARY_ENV: &str = "GIGAFACTORY_ONNXRUNTIME";

/// Narrow sessions a model keeps on the CPU at most: runs past it wait for one.
const MAX_NARROW_SESSIONS: usize = 4;

/// The ONNX Runtime engine: the library once loaded, or why it is not.
pub struct OnnxRuntime {
    runtime: Result<Runtime, String>,
}

struct Runtime {
    environment: Environment,
    /// Compute threads of a model's wide session, and its narrow sessions.
    threads: usize,
}

/// The process's one ONNX Runtime environment (the library allows one).
static RUNTIME: OnceLock<Result<Environment, String>> = OnceLock::new();

impl OnnxRuntime {
    /// Loads the library at `library` (or, without one, from
    /// `GIGAFACTORY_ONNXRUNTIME`, next to the executable, or the system's
    /// library path); models run on at most `threads` compute threads at
    /// once. Without a library the engine is unavailable and says why;
    /// a library named explicitly that fails to load is an error.
    pub fn new(library: Option<&Path>, threads: usize) -> Result<Self> {
        let explicit = library
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(LIBRARY_ENV).map(PathBuf::from));
        let found = match &explicit {
            Some(path) => Some(path.clone()),
            None => find_library(),
        };
        let Some(path) = found else {
            return Ok(Self {
                runtime: Err(format!(
                    "no ONNX Runtime library found (give `serve --onnxruntime PATH` or set \
                     {LIBRARY_ENV}; ./dev fetches one from the onnxruntime wheel)"
                )),
            });
        };
        let loaded = RUNTIME.get_or_init(|| {
            // `ort` panics where the library misbehaves: keep that a reason.
            std::panic::catch_unwind(|| init(&path))
                .unwrap_or_else(|panic| Err(anyhow!("{}", panic_text(&panic))))
                .map_err(|e| format!("{e:#}"))
        });
        let runtime = match loaded {
            Ok(environment) => Ok(Runtime {
                environment: environment.clone(),
                threads: threads.max(1),
            }),
            Err(why) if explicit.is_some() => {
                anyhow::bail!("loading ONNX Runtime from {}: {why}", path.display())
            }
            Err(why) => Err(format!(
                "ONNX Runtime at {} did not load: {why}",
                path.display()
            )),
        };
        if runtime.is_ok() {
            tracing::info!(library = %path.display(), "ONNX Runtime loaded");
        }
        Ok(Self { runtime })
    }

    fn runtime(&self) -> Result<&Runtime, String> {
        self.runtime.as_ref().map_err(Clone::clone)
    }
}

impl Runtime {
    /// Single-threaded sessions a model keeps on `device` beside its wide one.
    fn narrow_sessions(&self, device: &str) -> usize {
        if device == "cpu" {
            self.threads.min(MAX_NARROW_SESSIONS)
        } else {
            0
        }
    }
}

fn init(path: &Path) -> Result<Environment> {
    ort::init_from(path)
        .map_err(|e| anyhow!("{e}"))?
        .with_name("gigafactory")
        .with_telemetry(false)
        .build()
        .map_err(|e| anyhow!("{e}"))
}

/// `libonnxruntime.so*` next to the executable or in `lib/` beside it;
/// else the plain name, which the system's loader may find.
fn find_library() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    for candidate in [dir.to_path_buf(), dir.join("lib"), dir.join("../lib")] {
        let Ok(entries) = std::fs::read_dir(&candidate) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        names.sort();
        if let Some(path) = names.pop() {
            return Some(path);
        }
    }
    // dlopen searches the loader's path for a bare name.
    let system = PathBuf::from("libonnxruntime.so");
    let known = ["/usr/lib", "/usr/local/lib", "/usr/lib/x86_64-linux-gnu"]
        .iter()
        .any(|dir| Path::new(dir).join(&system).exists());
    known.then_some(system)
}

impl Engine for OnnxRuntime {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn format(&self) -> ModelFormat {
        ModelFormat::Onnx
    }

    fn unavailable(&self) -> Option<String> {
        self.runtime.as_ref().err().cloned()
    }

    fn gpu_support(&self) -> Result<(), String> {
        if cfg!(feature = "cuda") {
            Ok(())
        } else {
            Err("this binary was built without the `cuda` feature".into())
        }
    }

    fn estimate(&self, source: &Source, device: &str) -> Result<u64, String> {
        let sessions = 1 + self.runtime().map_or(0, |r| r.narrow_sessions(device)) as u64;
        Ok(source.data.size() * sessions)
    }

    fn load(&self, source: &Source, device: &str) -> Result<Loaded, String> {
        let runtime = self.runtime()?;
        let narrow = runtime.narrow_sessions(device);
        let load = |threads| session(runtime, &source.data, device, threads);
        let sessions = load(runtime.threads)
            .and_then(|wide| {
                let narrow = (0..narrow).map(|_| load(1)).collect::<Result<Vec<_>>>()?;
                OrtGraph::new(wide, narrow, device, source.data.size())
            })
            .map_err(|e| format!("{e:#}"))?;
        Ok(Loaded::Graph(Arc::new(sessions)))
    }
}

/// A session on `device` computing with `threads` threads (the caller's
/// among them). The wide session's threads spin between operators, as
/// onnxruntime's do by default (a lone embedding: 11.3 → 9.5 ms p50 here),
/// and stop when the run ends; narrow sessions have no threads to spin.
fn session(runtime: &Runtime, data: &Data, device: &str, threads: usize) -> Result<Session> {
    let failed = |e: ort::Error<SessionBuilder>| anyhow!("{e}");
    let mut builder = Session::builder(&runtime.environment)
        .map_err(|e| anyhow!("{e}"))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(failed)?
        .with_intra_threads(threads)
        .map_err(failed)?
        .with_inter_threads(1)
        .map_err(failed)?
        .with_intra_op_spinning(threads > 1)
        .map_err(failed)?
        // Spin between a run's operators only: not after it, on cores
        // that other runs and the sandboxes need.
        .with_config_entry("session.force_spinning_stop", "1")
        .map_err(failed)?;
    if device != "cpu" {
        builder = on_gpu(builder, device)?;
    }
    match data {
        Data::File(path) => builder
            .commit_from_file(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("loading {}", path.display())),
        Data::Bytes(bytes) => builder
            .commit_from_memory(bytes)
            .map_err(|e| anyhow!("{e}"))
            .context("loading the ONNX graph"),
    }
}

#[cfg(feature = "cuda")]
fn on_gpu(builder: SessionBuilder, device: &str) -> Result<SessionBuilder> {
    let ordinal: i32 = device
        .strip_prefix("cuda:")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no such device {device:?}"))?;
    // Fail rather than run on the CPU behind placement's back: placement
    // decides the fall-back, and says so.
    let cuda = ort::ep::CUDA::default()
        .with_device_id(ordinal)
        .build()
        .error_on_failure();
    builder
        .with_execution_providers([cuda])
        .map_err(|e| anyhow!("the CUDA execution provider: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn on_gpu(_builder: SessionBuilder, device: &str) -> Result<SessionBuilder> {
    anyhow::bail!(
        "cannot place a graph on {device}: this binary was built without the `cuda` feature"
    )
}

/// A model's sessions: a run alone takes the wide one; runs side by side
/// take narrow ones (or the wide one when every narrow one is busy), or
/// wait for one.
struct Sessions {
    state: Mutex<Free>,
    returned: Condvar,
}

struct Free {
    wide: Option<Session>,
    narrow: Vec<Session>,
    running: usize,
}

impl Sessions {
    fn run<T>(&self, job: impl FnOnce(&mut Session) -> Result<T>) -> Result<T> {
        let mut free = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (mut session, wide) = loop {
            let alone = free.running == 0;
            if alone && let Some(session) = free.wide.take() {
                break (session, true);
            }
            if let Some(session) = free.narrow.pop() {
                break (session, false);
            }
            if let Some(session) = free.wide.take() {
                break (session, true);
            }
            free = self.returned.wait(free).unwrap_or_else(|e| e.into_inner());
        };
        free.running += 1;
        drop(free);
        let result = guarded(|| job(&mut session));
        let mut free = self.state.lock().unwrap_or_else(|e| e.into_inner());
        free.running -= 1;
        if wide {
            free.wide = Some(session);
        } else {
            free.narrow.push(session);
        }
        drop(free);
        self.returned.notify_one();
        result
    }
}

/// An ONNX graph loaded into ONNX Runtime sessions on one device.
pub struct OrtGraph {
    sessions: Sessions,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    device: String,
    memory_bytes: u64,
}

impl OrtGraph {
    fn new(wide: Session, narrow: Vec<Session>, device: &str, file_bytes: u64) -> Result<Self> {
        let inputs = wide
            .inputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect::<Result<_>>()?;
        let outputs = wide
            .outputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect::<Result<_>>()?;
        Ok(Self {
            memory_bytes: file_bytes * (1 + narrow.len() as u64),
            sessions: Sessions {
                state: Mutex::new(Free {
                    wide: Some(wide),
                    narrow,
                    running: 0,
                }),
                returned: Condvar::new(),
            },
            inputs,
            outputs,
            device: device.to_string(),
        })
    }
}

fn spec(name: &str, dtype: &ValueType) -> Result<TensorSpec> {
    let ValueType::Tensor {
        ty,
        shape,
        dimension_symbols,
    } = dtype
    else {
        anyhow::bail!("{name:?} is a {dtype:?}, not a tensor: wasi-nn carries tensors only");
    };
    let dims = shape.iter().map(|&d| usize::try_from(d).ok()).collect();
    let symbols = dimension_symbols
        .iter()
        .zip(shape.iter())
        .map(|(symbol, &d)| (d < 0 && !symbol.is_empty()).then(|| symbol.to_string()))
        .collect();
    Ok(TensorSpec::new(
        name.to_string(),
        element(*ty),
        || format!("{ty:?}"),
        dims,
        symbols,
    ))
}

fn element(ty: TensorElementType) -> Option<ElementType> {
    Some(match ty {
        TensorElementType::Float16 => ElementType::Fp16,
        TensorElementType::Float32 => ElementType::Fp32,
        TensorElementType::Float64 => ElementType::Fp64,
        TensorElementType::Uint8 => ElementType::U8,
        TensorElementType::Int32 => ElementType::I32,
        TensorElementType::Int64 => ElementType::I64,
        _ => return None,
    })
}

impl Graph for OrtGraph {
    fn engine(&self) -> &'static str {
        "onnxruntime"
    }

    fn device(&self) -> &str {
        &self.device
    }

    fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn supports(&self, ty: ElementType) -> bool {
        ty != ElementType::Bf16
    }

    fn run(&self, inputs: Vec<HostTensor>) -> Result<Vec<(String, HostTensor)>> {
        let values = self
            .inputs
            .iter()
            .zip(inputs)
            .map(|(spec, tensor)| Ok((spec.name.clone(), to_value(tensor)?)))
            .collect::<Result<Vec<(String, DynValue)>>>()?;
        self.sessions.run(|session| {
            let outputs = session
                .run(values)
                .map_err(|e| anyhow!("{e}"))
                .context("running the graph")?;
            self.outputs
                .iter()
                .map(|spec| {
                    let value = outputs
                        .get(&spec.name)
                        .with_context(|| format!("no output {:?}", spec.name))?;
                    Ok((spec.name.clone(), from_value(value)?))
                })
                .collect()
        })
    }
}

/// Element types as little-endian bytes.
trait Le: Sized {
    const SIZE: usize;
    fn read(bytes: &[u8]) -> Self;
    fn write(&self, out: &mut Vec<u8>);
}

macro_rules! le {
    ($($ty:ty),*) => {$(
        impl Le for $ty {
            const SIZE: usize = size_of::<$ty>();
            fn read(bytes: &[u8]) -> Self {
                <$ty>::from_le_bytes(bytes.try_into().expect("one element"))
            }
            fn write(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
le!(f32, f64, u8, i8, u16, i16, i32, u32, i64, u64);

impl Le for half::f16 {
    const SIZE: usize = 2;
    fn read(bytes: &[u8]) -> Self {
        half::f16::from_bits(u16::read(bytes))
    }
    fn write(&self, out: &mut Vec<u8>) {
        self.to_bits().write(out);
    }
}

impl Le for bool {
    const SIZE: usize = 1;
    fn read(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
    fn write(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

fn typed<T: Le + ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
    tensor: &HostTensor,
) -> Result<DynValue> {
    let shape: Vec<i64> = tensor.dims.iter().map(|&d| i64::from(d)).collect();
    let data: Vec<T> = tensor.data.chunks_exact(T::SIZE).map(T::read).collect();
    Ok(Tensor::from_array((shape, data))
        .map_err(|e| anyhow!("{e}"))?
        .into_dyn())
}

fn to_value(tensor: HostTensor) -> Result<DynValue> {
    match tensor.ty {
        ElementType::Fp16 => typed::<half::f16>(&tensor),
        ElementType::Fp32 => typed::<f32>(&tensor),
        ElementType::Fp64 => typed::<f64>(&tensor),
        ElementType::U8 => typed::<u8>(&tensor),
        ElementType::I32 => typed::<i32>(&tensor),
        ElementType::I64 => typed::<i64>(&tensor),
        ElementType::Bf16 => anyhow::bail!("the onnxruntime engine does not run BF16 tensors"),
    }
}

/// Copies an output out as `ty`, converting each element with `convert`.
fn extract<T, U>(value: &DynValue, ty: ElementType, convert: impl Fn(&T) -> U) -> Result<HostTensor>
where
    T: ort::value::PrimitiveTensorElementType + std::fmt::Debug,
    U: Le,
{
    let (shape, data) = value
        .try_extract_tensor::<T>()
        .map_err(|e| anyhow!("{e}"))?;
    let mut bytes = Vec::with_capacity(data.len() * U::SIZE);
    for element in data {
        convert(element).write(&mut bytes);
    }
    Ok(HostTensor {
        dims: shape.iter().map(|&d| d as u32).collect(),
        ty,
        data: bytes,
    })
}

/// An output as a host tensor, widening types wasi-nn cannot name (bool,
/// i8, u16 …) to the nearest one it can.
fn from_value(value: &DynValue) -> Result<HostTensor> {
    let ty = value
        .dtype()
        .tensor_type()
        .context("the model returned a value that is not a tensor")?;
    match ty {
        TensorElementType::Float16 => extract(value, ElementType::Fp16, |v: &half::f16| *v),
        TensorElementType::Float32 => extract(value, ElementType::Fp32, |v: &f32| *v),
        TensorElementType::Float64 => extract(value, ElementType::Fp64, |v: &f64| *v),
        TensorElementType::Uint8 => extract(value, ElementType::U8, |v: &u8| *v),
        TensorElementType::Int32 => extract(value, ElementType::I32, |v: &i32| *v),
        TensorElementType::Int64 => extract(value, ElementType::I64, |v: &i64| *v),
        TensorElementType::Bool => extract(value, ElementType::U8, |v: &bool| u8::from(*v)),
        TensorElementType::Int8 => extract(value, ElementType::I32, |v: &i8| i32::from(*v)),
        TensorElementType::Int16 => extract(value, ElementType::I32, |v: &i16| i32::from(*v)),
        TensorElementType::Uint16 => extract(value, ElementType::I32, |v: &u16| i32::from(*v)),
        TensorElementType::Uint32 => extract(value, ElementType::I64, |v: &u32| i64::from(*v)),
        TensorElementType::Uint64 => extract(value, ElementType::I64, |v: &u64| *v as i64),
        other => anyhow::bail!("the model returns {other:?}, which wasi-nn cannot carry"),
    }
}
