//! wasi-nn for core modules: the witx `wasi_ephemeral_nn` ABI that
//! wasmtime ships (`load`, `load_by_name`, `init_execution_context`,
//! `set_input`, `compute`, `get_output`) and WasmEdge's additions
//! (`load_by_name_with_config`, `compute_single`, `get_output_single`,
//! `fini_single`, `unload`, `finalize_execution_context`), over the same
//! model pool, permissions, memory accounting and budgets as the WIT
//! interface (`NnCtx`). Host calls are async: a module waiting for a
//! model holds no tokio worker. Errors are witx `nn_errno` numbers.
//!
//! A repository text model loaded by name speaks WasmEdge's GGML ABI
//! (`ggml.rs`): the prompt as input 0, options as JSON, the text and its
//! usage as outputs 0 and 1, or token by token with `compute_single`.

use std::future::Future;

use wasmtime::{Caller, Extern, Linker};

use super::NnCtx;
use crate::host::ModuleState;
use crate::models::{ElementType, HostTensor, PoolGraph, Resident};
use crate::service::{AiError, MAX_MODEL_NAME};

mod ggml;
use ggml::{Text, TextGraph};

/// The witx module name.
pub(crate) const MODULE: &str = "wasi_ephemeral_nn";

/// Graphs or execution contexts one instance may hold at once.
const MAX_HANDLES: usize = 1024;

/// witx `nn_errno` (WasmEdge numbers the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Errno {
    Success = 0,
    InvalidArgument = 1,
    InvalidEncoding = 2,
    Busy = 4,
    RuntimeError = 5,
    UnsupportedOperation = 6,
    TooLarge = 7,
    NotFound = 8,
    /// WasmEdge: a token-by-token generation ended.
    EndOfSequence = 100,
    /// WasmEdge: the prompt and the tokens asked for exceed the context.
    PromptTooLong = 102,
}

/// How witx wasi-nn numbers a refusal.
impl From<&AiError> for Errno {
    fn from(error: &AiError) -> Self {
        // witx has no room for the message: it goes to the debug log.
        tracing::debug!("wasi-nn (witx) error for guest: {error}");
        match error {
            // A model the function may not use is one it cannot find.
            AiError::NotFound(_) | AiError::Denied(_) => Errno::NotFound,
            AiError::Invalid(_) => Errno::InvalidArgument,
            AiError::Encoding(_) => Errno::InvalidEncoding,
            AiError::Unsupported(_) => Errno::UnsupportedOperation,
            AiError::TooLarge(_) => Errno::TooLarge,
            // Both pass: retry later.
            AiError::Busy(_) | AiError::Quota(_) => Errno::Busy,
            AiError::Timeout(_) | AiError::Unavailable(_) | AiError::Failed(_) => {
                Errno::RuntimeError
            }
        }
    }
}

/// A call's outcome: an errno for the guest, or a trap.
type Outcome = wasmtime::Result<Result<(), Errno>>;

/// One instance's witx wasi-nn state: its handles over the shared pool.
pub struct WitxNn {
    ctx: NnCtx,
    graphs: Handles<Graph>,
    contexts: Handles<Context>,
}

/// A loaded graph: tensors in and out, or a text model.
#[derive(Clone)]
enum Graph {
    Tensor(PoolGraph),
    Text(TextGraph),
}

/// An execution context of either kind.
enum Context {
    Tensor(Execution),
    Text(Text),
}

/// A tensor execution context: its graph, the inputs set so far, and the
/// outputs of its last `compute`.
struct Execution {
    graph: PoolGraph,
    inputs: Vec<Option<HostTensor>>,
    outputs: Vec<HostTensor>,
}

/// Handles as the guest holds them: indexes into a table with holes.
struct Handles<T>(Vec<Option<T>>);

impl<T> Handles<T> {
    fn insert(&mut self, item: T) -> Result<u32, Errno> {
        if let Some(free) = self.0.iter().position(Option::is_none) {
            self.0[free] = Some(item);
            return Ok(free as u32);
        }
        if self.0.len() >= MAX_HANDLES {
            return Err(Errno::TooLarge);
        }
        self.0.push(Some(item));
        Ok(self.0.len() as u32 - 1)
    }

    fn get(&mut self, handle: i32) -> Result<&mut T, Errno> {
        usize::try_from(handle)
            .ok()
            .and_then(|index| self.0.get_mut(index))
            .and_then(Option::as_mut)
            .ok_or(Errno::InvalidArgument)
    }

    fn remove(&mut self, handle: i32) -> Result<T, Errno> {
        usize::try_from(handle)
            .ok()
            .and_then(|index| self.0.get_mut(index))
            .and_then(Option::take)
            .ok_or(Errno::InvalidArgument)
    }
}

impl WitxNn {
    pub(crate) fn new(ctx: NnCtx) -> Self {
        Self {
            ctx,
            graphs: Handles(Vec::new()),
            contexts: Handles(Vec::new()),
        }
    }

    /// Whether the instance was trapped for holding more tensor data on
    /// the host than its memory limit.
    pub(crate) fn was_over_memory(&self) -> bool {
        self.ctx.was_over_memory()
    }

    /// Whether a model refused a `compute` as busy.
    pub(crate) fn was_refused_busy(&self) -> bool {
        self.ctx.was_refused_busy()
    }

    /// Lets go of an execution context and the tensor bytes it holds.
    fn finalize(&mut self, context: Context) {
        let held: usize = match context {
            Context::Tensor(execution) => execution
                .inputs
                .iter()
                .flatten()
                .chain(&execution.outputs)
                .map(|t| t.data.len())
                .sum(),
            Context::Text(text) => text.held(),
        };
        self.ctx.release(held);
    }

    /// The tensor execution context `handle`.
    fn tensor(&mut self, handle: i32) -> Result<&mut Execution, Errno> {
        match self.contexts.get(handle)? {
            Context::Tensor(execution) => Ok(execution),
            Context::Text(_) => Err(Errno::InvalidArgument),
        }
    }
}

/// Adds every function to the core-module linker.
pub(crate) fn add_to_linker(linker: &mut Linker<ModuleState>) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        MODULE,
        "load",
        |caller, (builders, count, encoding, target, out): (i32, i32, i32, i32, i32)| {
            call(caller, move |caller| {
                Box::new(load(caller, builders, count, encoding, target, out))
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "load_by_name",
        |caller, (name, length, out): (i32, i32, i32)| {
            call(caller, move |caller| {
                Box::new(load_by_name(caller, name, length, None, out))
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "load_by_name_with_config",
        |caller, (name, length, config, config_length, out): (i32, i32, i32, i32, i32)| {
            call(caller, move |caller| {
                Box::new(load_by_name(
                    caller,
                    name,
                    length,
                    Some((config, config_length)),
                    out,
                ))
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "init_execution_context",
        |mut caller: Caller<'_, ModuleState>, graph: i32, out: i32| {
            errno(init_execution_context(&mut caller, graph, out))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "set_input",
        |mut caller: Caller<'_, ModuleState>, context: i32, index: i32, tensor: i32| {
            errno(set_input(&mut caller, context, index, tensor))
        },
    )?;
    linker.func_wrap_async(MODULE, "compute", |caller, (context,): (i32,)| {
        call(caller, move |caller| Box::new(compute(caller, context)))
    })?;
    linker.func_wrap_async(MODULE, "compute_single", |caller, (context,): (i32,)| {
        call(caller, move |caller| {
            Box::new(ggml::compute_single(caller, context))
        })
    })?;
    linker.func_wrap(
        MODULE,
        "fini_single",
        |mut caller: Caller<'_, ModuleState>, context: i32| {
            errno(ggml::fini_single(&mut caller, context))
        },
    )?;
    // (context, index, buffer, its size, where to write the length)
    type Output = fn(&mut Caller<'_, ModuleState>, i32, i32, i32, i32, i32) -> Outcome;
    let outputs: [(&str, Output); 2] = [
        ("get_output", get_output),
        ("get_output_single", ggml::get_output_single),
    ];
    for (name, output) in outputs {
        linker.func_wrap(
            MODULE,
            name,
            move |mut caller: Caller<'_, ModuleState>,
                  context: i32,
                  index: i32,
                  buffer: i32,
                  size: i32,
                  written: i32| {
                errno(output(&mut caller, context, index, buffer, size, written))
            },
        )?;
    }
    linker.func_wrap(
        MODULE,
        "unload",
        |mut caller: Caller<'_, ModuleState>, graph: i32| {
            errno(Ok(caller.data_mut().nn.graphs.remove(graph).map(drop)))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "finalize_execution_context",
        |mut caller: Caller<'_, ModuleState>, context: i32| {
            let nn = &mut caller.data_mut().nn;
            errno(Ok(nn.contexts.remove(context).map(|e| nn.finalize(e))))
        },
    )?;
    Ok(())
}

/// Runs an async host call; its errno is the guest's result.
fn call<'a, F>(
    caller: Caller<'a, ModuleState>,
    body: F,
) -> Box<dyn Future<Output = wasmtime::Result<i32>> + Send + 'a>
where
    F: FnOnce(Caller<'a, ModuleState>) -> Box<dyn Future<Output = Outcome> + Send + 'a> + Send + 'a,
{
    let future = Box::into_pin(body(caller));
    Box::new(async move { errno(future.await) })
}

fn errno(outcome: Outcome) -> wasmtime::Result<i32> {
    Ok(match outcome? {
        Ok(()) => Errno::Success,
        Err(errno) => errno,
    } as i32)
}

/// The instance's exported memory.
fn memory(caller: &mut Caller<'_, ModuleState>) -> wasmtime::Result<wasmtime::Memory> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| {
            wasmtime::Error::msg("wasi_ephemeral_nn needs the module to export its memory")
        })
}

/// `length` bytes of guest memory at `pointer`.
fn read(
    caller: &mut Caller<'_, ModuleState>,
    pointer: i32,
    length: i32,
) -> wasmtime::Result<Result<Vec<u8>, Errno>> {
    let memory = memory(caller)?;
    let (Ok(start), Ok(length)) = (
        usize::try_from(pointer as u32),
        usize::try_from(length as u32),
    ) else {
        return Ok(Err(Errno::InvalidArgument));
    };
    let data = memory.data(&*caller);
    Ok(start
        .checked_add(length)
        .and_then(|end| data.get(start..end))
        .map(<[u8]>::to_vec)
        .ok_or(Errno::InvalidArgument))
}

/// A little-endian u32 of guest memory.
fn read_u32(
    caller: &mut Caller<'_, ModuleState>,
    pointer: i32,
) -> wasmtime::Result<Result<u32, Errno>> {
    Ok(read(caller, pointer, 4)?.map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
}

/// Writes `bytes` to guest memory at `pointer`.
fn write(caller: &mut Caller<'_, ModuleState>, pointer: i32, bytes: &[u8]) -> Outcome {
    let memory = memory(caller)?;
    let start = pointer as u32 as usize;
    let data = memory.data_mut(&mut *caller);
    match start
        .checked_add(bytes.len())
        .and_then(|end| data.get_mut(start..end))
    {
        Some(target) => {
            target.copy_from_slice(bytes);
            Ok(Ok(()))
        }
        None => Ok(Err(Errno::InvalidArgument)),
    }
}

/// `?` for the guest's errno inside an [`Outcome`].
macro_rules! guest {
    ($value:expr) => {
        match $value {
            Ok(value) => value,
            Err(errno) => return Ok(Err(errno)),
        }
    };
}

async fn load(
    mut caller: Caller<'_, ModuleState>,
    builders: i32,
    count: i32,
    encoding: i32,
    target: i32,
    out: i32,
) -> Outcome {
    // openvino, onnx, tensorflow, pytorch, tensorflowlite, autodetect; ggml (WasmEdge).
    if !matches!(encoding, 1 | 5) {
        return Ok(Err(Errno::InvalidEncoding));
    }
    if target != 0 {
        return Ok(Err(Errno::UnsupportedOperation));
    }
    if count != 1 {
        return Ok(Err(Errno::InvalidArgument));
    }
    let pointer = guest!(read_u32(&mut caller, builders)?);
    let length = guest!(read_u32(&mut caller, builders.wrapping_add(4))?);
    let bytes = guest!(read(&mut caller, pointer as i32, length as i32)?);
    let graph = match caller.data().nn.ctx.service().load_bytes(bytes).await {
        Ok(graph) => graph,
        Err(error) => return Ok(Err(Errno::from(&error))),
    };
    let handle = guest!(caller.data_mut().nn.graphs.insert(Graph::Tensor(graph)));
    write(&mut caller, out, &handle.to_le_bytes())
}

async fn load_by_name(
    mut caller: Caller<'_, ModuleState>,
    name: i32,
    length: i32,
    config: Option<(i32, i32)>,
    out: i32,
) -> Outcome {
    if length as u32 as usize > MAX_MODEL_NAME {
        return Ok(Err(Errno::NotFound));
    }
    let name = guest!(read(&mut caller, name, length)?);
    let Ok(name) = String::from_utf8(name) else {
        return Ok(Err(Errno::InvalidArgument));
    };
    // Options as JSON (WasmEdge's GGML keys); a tensor graph takes none.
    let options = match config {
        Some((config, config_length)) => {
            let config = guest!(read(&mut caller, config, config_length)?);
            guest!(ggml::Options::parse(&config))
        }
        None => ggml::Options::default(),
    };
    let graph = match caller.data().nn.ctx.service().resident(&name).await {
        Ok((_, Resident::Graph(graph))) => Graph::Tensor(graph),
        Ok((name, Resident::Text(_))) => Graph::Text(TextGraph::new(name, options)),
        Err(error) => return Ok(Err(Errno::from(&error))),
    };
    let handle = guest!(caller.data_mut().nn.graphs.insert(graph));
    write(&mut caller, out, &handle.to_le_bytes())
}

fn init_execution_context(caller: &mut Caller<'_, ModuleState>, graph: i32, out: i32) -> Outcome {
    let nn = &mut caller.data_mut().nn;
    let context = match guest!(nn.graphs.get(graph)).clone() {
        Graph::Tensor(graph) => Context::Tensor(Execution {
            inputs: vec![None; graph.input_names().len()],
            graph,
            outputs: Vec::new(),
        }),
        Graph::Text(graph) => Context::Text(Text::new(graph)),
    };
    let handle = guest!(nn.contexts.insert(context));
    write(caller, out, &handle.to_le_bytes())
}

/// The witx `tensor` record at `pointer`: dimensions (pointer, count of
/// u32), type (u8), data (pointer, length); 20 bytes.
fn set_input(
    caller: &mut Caller<'_, ModuleState>,
    context: i32,
    index: i32,
    pointer: i32,
) -> Outcome {
    let record = guest!(read(caller, pointer, 20)?);
    let word = |at: usize| u32::from_le_bytes(record[at..at + 4].try_into().expect("4 bytes"));
    let (dims_at, dims_count, ty, data_at, data_length) =
        (word(0), word(4), record[8], word(12), word(16));
    if let Ok(Context::Text(_)) = caller.data_mut().nn.contexts.get(context) {
        // The prompt (input 0) or options (input 1), as the tensor's bytes,
        // held on the host (and counted) until replaced or finalized.
        let data = guest!(read(caller, data_at as i32, data_length as i32)?);
        let nn = &mut caller.data_mut().nn;
        nn.ctx.hold(data.len())?;
        let Ok(Context::Text(text)) = nn.contexts.get(context) else {
            unreachable!("checked above");
        };
        let (outcome, released) = text.set_input(index, data);
        nn.ctx.release(released);
        return Ok(outcome);
    }
    let Some(ty) = element_type(ty) else {
        return Ok(Err(Errno::InvalidArgument));
    };
    let dims_bytes = guest!(read(
        caller,
        dims_at as i32,
        dims_count.saturating_mul(4) as i32
    )?);
    let dims = dims_bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    // The tensor's bytes are held on the host until the context ends.
    caller.data().nn.ctx.hold(data_length as usize)?;
    let data = match read(caller, data_at as i32, data_length as i32)? {
        Ok(data) => data,
        Err(errno) => {
            caller.data().nn.ctx.release(data_length as usize);
            return Ok(Err(errno));
        }
    };
    let nn = &mut caller.data_mut().nn;
    let tensor = HostTensor { dims, ty, data };
    let execution = match nn.tensor(context) {
        Ok(execution) => execution,
        Err(errno) => {
            nn.ctx.release(tensor.data.len());
            return Ok(Err(errno));
        }
    };
    let Some(slot) = usize::try_from(index)
        .ok()
        .and_then(|i| execution.inputs.get_mut(i))
    else {
        nn.ctx.release(tensor.data.len());
        return Ok(Err(Errno::InvalidArgument));
    };
    let replaced = slot.replace(tensor);
    if let Some(old) = replaced {
        nn.ctx.release(old.data.len());
    }
    Ok(Ok(()))
}

async fn compute(mut caller: Caller<'_, ModuleState>, context: i32) -> Outcome {
    if let Ok(Context::Text(_)) = caller.data_mut().nn.contexts.get(context) {
        return ggml::compute(caller, context).await;
    }
    let nn = &mut caller.data_mut().nn;
    let execution = guest!(nn.tensor(context));
    let names = execution.graph.input_names();
    let mut named = Vec::with_capacity(names.len());
    for (index, (name, slot)) in names.into_iter().zip(&execution.inputs).enumerate() {
        match slot {
            Some(tensor) => named.push((name, tensor.clone())),
            None => {
                tracing::debug!(index, "compute without input {index}");
                return Ok(Err(Errno::InvalidArgument));
            }
        }
    }
    let graph = execution.graph.clone();
    // The inputs stay set for the next `compute`: the copies the pool
    // runs on count against the memory limit while it does.
    let copied: usize = named.iter().map(|(_, t)| t.data.len()).sum();
    nn.ctx.hold(copied)?;
    let outcome = nn.ctx.service().compute(graph, named).await;
    let nn = &mut caller.data_mut().nn;
    nn.ctx.release(copied);
    let outputs = match outcome {
        Ok(outputs) => outputs,
        Err(error) => return Ok(Err(Errno::from(&error))),
    };
    let mut tensors = Vec::with_capacity(outputs.len());
    for (_, tensor) in outputs {
        nn.ctx.hold(tensor.data.len())?;
        tensors.push(tensor);
    }
    let execution = guest!(nn.tensor(context));
    let previous = std::mem::replace(&mut execution.outputs, tensors);
    let released: usize = previous.iter().map(|t| t.data.len()).sum();
    nn.ctx.release(released);
    Ok(Ok(()))
}

fn get_output(
    caller: &mut Caller<'_, ModuleState>,
    context: i32,
    index: i32,
    buffer: i32,
    size: i32,
    written: i32,
) -> Outcome {
    let data = match guest!(caller.data_mut().nn.contexts.get(context)) {
        Context::Tensor(execution) => usize::try_from(index)
            .ok()
            .and_then(|i| execution.outputs.get(i))
            .map(|tensor| tensor.data.clone()),
        Context::Text(text) => text.output(index),
    };
    let Some(data) = data else {
        return Ok(Err(Errno::InvalidArgument));
    };
    give(caller, &data, buffer, size, written)
}

/// Copies an output into the guest's buffer of `size` bytes and writes
/// its length; a buffer too small is `too_large`.
fn give(
    caller: &mut Caller<'_, ModuleState>,
    data: &[u8],
    buffer: i32,
    size: i32,
    written: i32,
) -> Outcome {
    if data.len() > size as u32 as usize {
        return Ok(Err(Errno::TooLarge));
    }
    guest!(write(caller, buffer, data)?);
    write(caller, written, &(data.len() as u32).to_le_bytes())
}

/// witx `tensor_type`: f16, f32, f64, u8, i32, i64.
fn element_type(tag: u8) -> Option<ElementType> {
    Some(match tag {
        0 => ElementType::Fp16,
        1 => ElementType::Fp32,
        2 => ElementType::Fp64,
        3 => ElementType::U8,
        4 => ElementType::I32,
        5 => ElementType::I64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{ErrorCode, NnError};

    #[test]
    fn handles_reuse_freed_slots_and_refuse_unknown_ones() {
        let mut handles = Handles(Vec::new());
        assert_eq!(handles.insert("a"), Ok(0));
        assert_eq!(handles.insert("b"), Ok(1));
        assert_eq!(handles.remove(0), Ok("a"));
        assert_eq!(handles.get(0), Err(Errno::InvalidArgument));
        assert_eq!(handles.get(-1), Err(Errno::InvalidArgument));
        assert_eq!(handles.insert("c"), Ok(0));
        assert_eq!(*handles.get(1).unwrap(), "b");
    }

    #[test]
    fn pool_errors_keep_their_witx_numbers() {
        let witx = |error: NnError| Errno::from(&AiError::from(error)) as i32;
        assert_eq!(witx(NnError::busy("full")), 4);
        assert_eq!(witx(NnError::new(ErrorCode::NotFound, "x")), 8);
        assert_eq!(witx(NnError::new(ErrorCode::Security, "x")), 8);
        assert_eq!(witx(NnError::unsupported("x")), 6);
        assert_eq!(Errno::from(&AiError::Quota("x".into())) as i32, 4);
    }
}
