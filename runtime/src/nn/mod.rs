//! The host side of `wasi:nn@0.2.0-rc-2024-10-28` for components.
//!
//! `load` and `compute` are async on the host: a guest waiting for a model
//! holds no tokio worker; the work runs on the model pool's workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::capabilities::Capabilities;
use crate::models::{ElementType, ErrorCode, HostTensor, ModelPool, NnError, PoolGraph};
use crate::service::{AiError, AiService};

mod generated {
    wasmtime::component::bindgen!({
        world: "ml",
        path: "../sdk/wit/wasi-nn",
        with: {
            "wasi:nn/graph.graph": super::Graph,
            "wasi:nn/tensor.tensor": super::Tensor,
            "wasi:nn/inference.graph-execution-context": super::ExecutionContext,
            "wasi:nn/errors.error": super::Error,
        },
        imports: {
            "wasi:nn/graph.load": async | trappable,
            "wasi:nn/graph.load-by-name": async | trappable,
            "wasi:nn/inference.[method]graph-execution-context.compute": async | trappable,
            default: trappable,
        },
    });
}

use generated::wasi::nn::{errors, graph, inference, tensor};

mod witx;
pub(crate) use witx::{MODULE as WITX_MODULE, WitxNn, add_to_linker as add_witx_to_linker};

/// A loaded graph, as a guest holds it.
pub struct Graph(PoolGraph);

/// An execution context bound to a graph.
pub struct ExecutionContext(PoolGraph);

/// A guest-visible tensor.
pub struct Tensor(HostTensor);

/// A guest-visible error.
pub struct Error(NnError);

/// What one instance needs for its models: its way to the shared pool
/// (every host interface's), and the tensor data the host holds for it.
pub struct NnCtx {
    service: AiService,
    /// Bytes of tensor data the host holds for this instance (tensors it
    /// made, inputs being computed, outputs not yet dropped).
    held: AtomicUsize,
    /// The most `held` may reach: the instance's own memory limit, so a
    /// guest cannot park more host memory than it may use itself.
    held_limit: usize,
    /// Whether the instance was trapped for going past `held_limit`.
    over_limit: AtomicBool,
}

impl NnCtx {
    /// A context over `pool` limited to the `capabilities`' model access,
    /// charging compute to their budget, batched fairly as their tenant;
    /// the tensors the host holds for it may take at most `memory_bytes`.
    pub fn new(pool: Arc<ModelPool>, capabilities: Capabilities, memory_bytes: usize) -> Self {
        Self {
            service: AiService::new(pool, capabilities),
            held: AtomicUsize::new(0),
            held_limit: memory_bytes,
            over_limit: AtomicBool::new(false),
        }
    }

    /// Whether the instance was trapped for holding more tensor data on
    /// the host than its memory limit.
    pub fn was_over_memory(&self) -> bool {
        self.over_limit.load(Ordering::Relaxed)
    }

    /// Counts `bytes` more of tensor data held for the instance, or traps
    /// it past its limit.
    fn hold(&self, bytes: usize) -> wasmtime::Result<()> {
        let held = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if held > self.held_limit {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            self.over_limit.store(true, Ordering::Relaxed);
            return Err(wasmtime::Error::msg(format!(
                "wasi-nn tensors would hold {held} bytes on the host, over the function's memory limit of {} bytes",
                self.held_limit
            )));
        }
        Ok(())
    }

    fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The instance's way to the models.
    pub(crate) fn service(&self) -> &AiService {
        &self.service
    }

    /// Whether this instance was refused a model call because a model's
    /// queue was full: the gateway answers 503 if the guest then fails.
    pub fn was_refused_busy(&self) -> bool {
        self.service.was_refused_busy()
    }
}

/// How WIT wasi-nn words a refusal: its error codes, the message kept (a
/// busy one says so: WIT wasi-nn has no code for it).
impl From<AiError> for NnError {
    fn from(error: AiError) -> Self {
        let code = match &error {
            AiError::NotFound(_) => ErrorCode::NotFound,
            AiError::Denied(_) => ErrorCode::Security,
            AiError::Invalid(_) => ErrorCode::InvalidArgument,
            AiError::Unsupported(_) => ErrorCode::UnsupportedOperation,
            AiError::Encoding(_) => ErrorCode::InvalidEncoding,
            AiError::TooLarge(_) => ErrorCode::TooLarge,
            AiError::Busy(_) => ErrorCode::Busy,
            AiError::Timeout(_) => ErrorCode::Timeout,
            AiError::Quota(_) | AiError::Unavailable(_) | AiError::Failed(_) => {
                ErrorCode::RuntimeError
            }
        };
        NnError::new(code, error.message())
    }
}

/// What every host interface over the models (wasi-nn here,
/// `gigafactory:ai`, Spin's `llm`) is implemented on: the instance's model
/// context and its resource table. A new one is its own module plus one
/// `add_to_linker(&mut linker, HostState::models)` line.
pub struct ModelView<'a> {
    pub(crate) ctx: &'a NnCtx,
    pub(crate) table: &'a mut ResourceTable,
}

impl<'a> ModelView<'a> {
    /// A view over an instance's context and resource table.
    pub fn new(ctx: &'a NnCtx, table: &'a mut ResourceTable) -> Self {
        Self { ctx, table }
    }

    /// The instance's way to the models.
    pub(crate) fn service(&self) -> &AiService {
        self.ctx.service()
    }

    fn fail<T>(
        &mut self,
        error: impl Into<NnError>,
    ) -> wasmtime::Result<Result<T, Resource<Error>>> {
        let error = error.into();
        tracing::debug!("wasi-nn error for guest: {error}");
        Ok(Err(self.table.push(Error(error))?))
    }
}

struct Nn;

impl HasData for Nn {
    type Data<'a> = ModelView<'a>;
}

/// Adds wasi-nn to `linker`; `view` finds the instance's context.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> ModelView<'_>,
) -> wasmtime::Result<()> {
    graph::add_to_linker::<_, Nn>(linker, view)?;
    tensor::add_to_linker::<_, Nn>(linker, view)?;
    inference::add_to_linker::<_, Nn>(linker, view)?;
    errors::add_to_linker::<_, Nn>(linker, view)?;
    Ok(())
}

type NnResult<T> = wasmtime::Result<Result<T, Resource<Error>>>;

impl graph::Host for ModelView<'_> {
    async fn load(
        &mut self,
        builders: Vec<graph::GraphBuilder>,
        encoding: graph::GraphEncoding,
        target: graph::ExecutionTarget,
    ) -> NnResult<Resource<Graph>> {
        use graph::{ExecutionTarget, GraphEncoding};
        if !matches!(encoding, GraphEncoding::Onnx | GraphEncoding::Autodetect) {
            return self.fail(NnError::new(
                ErrorCode::InvalidEncoding,
                format!("{encoding:?} graphs are not supported; this host runs ONNX"),
            ));
        }
        if !matches!(target, ExecutionTarget::Cpu) {
            return self.fail(NnError::unsupported(format!(
                "execution target {target:?} is not available to loaded graphs; use cpu"
            )));
        }
        let mut builders = builders;
        if builders.len() != 1 {
            return self.fail(NnError::invalid(format!(
                "an ONNX graph is one builder (the .onnx bytes), got {}",
                builders.len()
            )));
        }
        let bytes = builders.pop().expect("one builder");
        match self.ctx.service.load_bytes(bytes).await {
            Ok(graph) => Ok(Ok(self.table.push(Graph(graph))?)),
            Err(error) => self.fail(error),
        }
    }

    async fn load_by_name(&mut self, name: String) -> NnResult<Resource<Graph>> {
        match self.ctx.service.graph(&name).await {
            Ok(graph) => Ok(Ok(self.table.push(Graph(graph))?)),
            Err(error) => self.fail(error),
        }
    }
}

impl graph::HostGraph for ModelView<'_> {
    fn init_execution_context(
        &mut self,
        graph: Resource<Graph>,
    ) -> NnResult<Resource<ExecutionContext>> {
        let graph = self.table.get(&graph)?.0.clone();
        Ok(Ok(self.table.push(ExecutionContext(graph))?))
    }

    fn drop(&mut self, graph: Resource<Graph>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

impl inference::Host for ModelView<'_> {}

impl inference::HostGraphExecutionContext for ModelView<'_> {
    async fn compute(
        &mut self,
        context: Resource<ExecutionContext>,
        inputs: Vec<inference::NamedTensor>,
    ) -> NnResult<Vec<inference::NamedTensor>> {
        let graph = self.table.get(&context)?.0.clone();
        let mut named = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            // Inputs are owned handles: the guest gave them up. Their bytes
            // stay held until the call is over.
            named.push((name, self.table.delete(tensor)?.0));
        }
        let input_bytes: usize = named.iter().map(|(_, t)| t.data.len()).sum();
        let result = self.compute_named(graph, named).await;
        self.ctx.release(input_bytes);
        result
    }

    fn drop(&mut self, context: Resource<ExecutionContext>) -> wasmtime::Result<()> {
        self.table.delete(context)?;
        Ok(())
    }
}

impl ModelView<'_> {
    async fn compute_named(
        &mut self,
        graph: PoolGraph,
        named: Vec<(String, HostTensor)>,
    ) -> NnResult<Vec<inference::NamedTensor>> {
        match self.ctx.service.compute(graph, named).await {
            Ok(outputs) => {
                let mut named = Vec::with_capacity(outputs.len());
                for (name, tensor) in outputs {
                    self.ctx.hold(tensor.data.len())?;
                    named.push((name, self.table.push(Tensor(tensor))?));
                }
                Ok(Ok(named))
            }
            Err(error) => self.fail(error),
        }
    }
}

impl tensor::Host for ModelView<'_> {}

impl tensor::HostTensor for ModelView<'_> {
    fn new(
        &mut self,
        dimensions: tensor::TensorDimensions,
        ty: tensor::TensorType,
        data: tensor::TensorData,
    ) -> wasmtime::Result<Resource<Tensor>> {
        // Checked at `compute`, where a mismatch can be reported as an error.
        self.ctx.hold(data.len())?;
        let tensor = HostTensor {
            dims: dimensions,
            ty: element_type(ty),
            data,
        };
        Ok(self.table.push(Tensor(tensor))?)
    }

    fn dimensions(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.0.dims.clone())
    }

    fn ty(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<tensor::TensorType> {
        Ok(tensor_type(self.table.get(&tensor)?.0.ty))
    }

    fn data(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&tensor)?.0.data.clone())
    }

    fn drop(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<()> {
        let tensor = self.table.delete(tensor)?;
        self.ctx.release(tensor.0.data.len());
        Ok(())
    }
}

impl errors::Host for ModelView<'_> {}

impl errors::HostError for ModelView<'_> {
    fn code(&mut self, error: Resource<Error>) -> wasmtime::Result<errors::ErrorCode> {
        Ok(error_code(self.table.get(&error)?.0.code))
    }

    fn data(&mut self, error: Resource<Error>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.0.message.clone())
    }

    fn drop(&mut self, error: Resource<Error>) -> wasmtime::Result<()> {
        self.table.delete(error)?;
        Ok(())
    }
}

fn element_type(ty: tensor::TensorType) -> ElementType {
    use tensor::TensorType as T;
    match ty {
        T::Fp16 => ElementType::Fp16,
        T::Fp32 => ElementType::Fp32,
        T::Fp64 => ElementType::Fp64,
        T::Bf16 => ElementType::Bf16,
        T::U8 => ElementType::U8,
        T::I32 => ElementType::I32,
        T::I64 => ElementType::I64,
    }
}

fn tensor_type(ty: ElementType) -> tensor::TensorType {
    use tensor::TensorType as T;
    match ty {
        ElementType::Fp16 => T::Fp16,
        ElementType::Fp32 => T::Fp32,
        ElementType::Fp64 => T::Fp64,
        ElementType::Bf16 => T::Bf16,
        ElementType::U8 => T::U8,
        ElementType::I32 => T::I32,
        ElementType::I64 => T::I64,
    }
}

fn error_code(code: ErrorCode) -> errors::ErrorCode {
    use errors::ErrorCode as E;
    match code {
        ErrorCode::InvalidArgument => E::InvalidArgument,
        ErrorCode::InvalidEncoding => E::InvalidEncoding,
        ErrorCode::Timeout => E::Timeout,
        // The message says busy: WIT wasi-nn has no code for it.
        ErrorCode::RuntimeError | ErrorCode::Busy => E::RuntimeError,
        ErrorCode::UnsupportedOperation => E::UnsupportedOperation,
        ErrorCode::TooLarge => E::TooLarge,
        ErrorCode::NotFound => E::NotFound,
        ErrorCode::Security => E::Security,
        ErrorCode::Unknown => E::Unknown,
    }
}
