//! The tract backend: ONNX graphs loaded, typed and optimised once, then
//! run by any number of callers.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::DimLike;

use super::error::NnError;
use super::tensor::HostTensor;

/// One input or output of a model: name, element type and shape
/// (`None` for a dimension fixed only at run time, such as the batch).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorSpec {
    /// The tensor's name in the graph.
    pub name: String,
    /// The element type, in wasi-nn's spelling (`FP32`, `I64`, …).
    #[serde(rename = "type")]
    pub ty: String,
    /// Dimensions; `None` where the model leaves it symbolic.
    pub shape: Vec<Option<usize>>,
    /// The symbol of each symbolic dimension (`batch`, `sequence` …), so
    /// that inputs sharing one can be checked to agree.
    #[serde(skip)]
    symbols: Vec<Option<String>>,
    #[serde(skip)]
    datum: DatumType,
}

impl TensorSpec {
    /// The element type, when wasi-nn can carry it.
    pub(crate) fn element_type(&self) -> Option<super::tensor::ElementType> {
        super::tensor::ElementType::from_datum(self.datum)
    }

    /// Each dimension's symbol, where it is a plain symbol.
    pub(crate) fn symbols(&self) -> &[Option<String>] {
        &self.symbols
    }
}

/// An optimised ONNX graph, ready to run.
pub struct OnnxGraph {
    plan: Box<dyn Runnable>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    weight_bytes: u64,
    device: String,
}

/// A parsed, typed and folded graph, not yet placed on a device.
pub struct TypedGraph {
    model: TypedModel,
    weight_bytes: u64,
}

impl TypedGraph {
    /// Parses and simplifies the ONNX file at `path`.
    pub fn from_path(path: &Path) -> Result<Self> {
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .with_context(|| format!("parsing {}", path.display()))?;
        Self::new(model)
    }

    fn new(model: InferenceModel) -> Result<Self> {
        let mut model = model
            .into_typed()
            .context("inferring types and shapes")?
            .into_decluttered()
            .context("simplifying the graph")?;
        let folded = fold_constants(&mut model).context("folding constant subgraphs")?;
        if folded > 0 {
            model.declutter().context("simplifying the folded graph")?;
        }
        let weight_bytes = weight_bytes(&model);
        Ok(Self {
            model,
            weight_bytes,
        })
    }

    /// Bytes of constants (weights) the graph holds.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Optimises the graph for `device` (`cpu`, or `cuda:N` in builds with
    /// the `cuda` feature) and makes it runnable.
    pub fn place(self, device: &str) -> Result<Arc<OnnxGraph>> {
        let inputs = specs(&self.model, &self.model.inputs)?;
        let outputs = specs(&self.model, &self.model.outputs)?;
        let plan = if device == "cpu" {
            let runtime = runtime_for_name("cpu")?.context("tract has no cpu runtime")?;
            runtime
                .prepare(self.model)
                .context("optimising the graph")?
        } else {
            prepare_gpu(self.model, device)?
        };
        Ok(Arc::new(OnnxGraph {
            plan,
            inputs,
            outputs,
            weight_bytes: self.weight_bytes,
            device: device.to_string(),
        }))
    }
}

#[cfg(feature = "cuda")]
fn prepare_gpu(model: TypedModel, device: &str) -> Result<Box<dyn Runnable>> {
    // Linking the crate registers tract's "cuda" runtime.
    use tract_cuda as _;
    if device != "cuda:0" {
        anyhow::bail!("tract-cuda runs on cuda:0 only (select the GPU with CUDA_VISIBLE_DEVICES)");
    }
    let runtime = runtime_for_name("cuda")
        .context("the CUDA runtime is not usable")?
        .context("this build has no CUDA runtime")?;
    // tract-cuda panics when the toolkit or the GPU misbehaves: keep that to this model.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.prepare(model)))
        .map_err(|panic| anyhow::anyhow!("tract-cuda panicked: {}", panic_text(&panic)))?
        .context("optimising the graph for the GPU")
}

#[cfg(not(feature = "cuda"))]
fn prepare_gpu(_model: TypedModel, device: &str) -> Result<Box<dyn Runnable>> {
    anyhow::bail!(
        "cannot place a graph on {device}: this binary was built without the `cuda` feature"
    )
}

/// A caught panic's message.
pub(crate) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

impl std::fmt::Debug for OnnxGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxGraph")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl OnnxGraph {
    /// Loads and optimises the ONNX file at `path` for the CPU.
    pub fn from_path(path: &Path) -> Result<Arc<Self>> {
        TypedGraph::from_path(path)?.place("cpu")
    }

    /// Loads and optimises ONNX bytes (a function's own model) for the CPU.
    pub fn from_bytes(mut bytes: &[u8]) -> Result<Arc<Self>> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut bytes)
            .context("parsing the ONNX graph")?;
        TypedGraph::new(model)?.place("cpu")
    }

    /// Where the graph runs: `cpu` or `cuda:N`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Bytes of constants (weights) the graph holds: what it costs in memory,
    /// give or take the optimiser's repacking.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The graph's inputs, in order.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// The graph's outputs, in order.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// Puts named tensors in the graph's input order, checking names,
    /// types, shapes and lengths so a mistake is an invalid-argument, not a crash.
    pub fn order(&self, named: Vec<(String, HostTensor)>) -> Result<Vec<HostTensor>, NnError> {
        let mut slots: Vec<Option<HostTensor>> = vec![None; self.inputs.len()];
        for (name, tensor) in named {
            let index = self
                .inputs
                .iter()
                .position(|spec| spec.name == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = self.inputs.iter().map(|s| s.name.as_str()).collect();
                    NnError::invalid(format!(
                        "the model has no input {name:?} (inputs: {known:?})"
                    ))
                })?;
            if slots[index].replace(tensor).is_some() {
                return Err(NnError::invalid(format!("input {name:?} given twice")));
            }
        }
        let tensors = self
            .inputs
            .iter()
            .zip(slots)
            .map(|(spec, slot)| {
                let tensor =
                    slot.ok_or_else(|| NnError::invalid(format!("missing input {:?}", spec.name)))?;
                check_shape(spec, &tensor)?;
                tensor.check_for(spec.datum, &spec.name)?;
                Ok(tensor)
            })
            .collect::<Result<Vec<_>, NnError>>()?;
        super::limits::check_symbols(&self.inputs, &tensors)?;
        Ok(tensors)
    }

    /// Converts ordered, checked tensors into the graph's inputs.
    pub fn inputs_of(&self, tensors: Vec<HostTensor>) -> Result<TVec<TValue>, NnError> {
        self.inputs
            .iter()
            .zip(tensors)
            .map(|(spec, tensor)| Ok(tensor.into_tract(spec.datum, &spec.name)?.into_tvalue()))
            .collect()
    }

    /// [`Self::order`] then [`Self::inputs_of`].
    pub fn bind(&self, named: Vec<(String, HostTensor)>) -> Result<TVec<TValue>, NnError> {
        self.inputs_of(self.order(named)?)
    }

    /// Runs the graph on bound inputs; blocking, call it off the async workers.
    pub fn run(&self, inputs: TVec<TValue>) -> Result<Vec<(String, HostTensor)>> {
        // tract panics on some inputs it does not check (an index past a
        // table, lengths that disagree) and tract-cuda on device errors: the
        // plan is immutable and each run has its own state, so a panic stays
        // this call's error.
        let outputs =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.plan.run(inputs)))
                .map_err(|panic| anyhow::anyhow!("the model panicked: {}", panic_text(&panic)))?
                .context("running the graph")?;
        self.outputs
            .iter()
            .zip(outputs)
            .map(|(spec, value)| Ok((spec.name.clone(), HostTensor::from_tract(&value)?)))
            .collect()
    }
}

fn check_shape(spec: &TensorSpec, tensor: &HostTensor) -> Result<(), NnError> {
    let fits = spec.shape.len() == tensor.dims.len()
        && spec
            .shape
            .iter()
            .zip(&tensor.dims)
            .all(|(want, &got)| want.is_none_or(|w| w == got as usize));
    if fits {
        Ok(())
    } else {
        Err(NnError::invalid(format!(
            "input {:?} has shape {:?}, the model expects {}",
            spec.name,
            tensor.dims,
            shape_text(&spec.shape)
        )))
    }
}

fn shape_text(shape: &[Option<usize>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map_or_else(|| "?".into(), |d| d.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

fn specs(model: &TypedModel, outlets: &[OutletId]) -> Result<Vec<TensorSpec>> {
    outlets
        .iter()
        .map(|&outlet| {
            let fact = model.outlet_fact(outlet)?;
            Ok(TensorSpec {
                name: model
                    .outlet_label(outlet)
                    .unwrap_or(&model.node(outlet.node).name)
                    .to_string(),
                ty: super::tensor::wasi_type_name(fact.datum_type),
                shape: fact.shape.iter().map(|d| d.to_usize().ok()).collect(),
                symbols: fact
                    .shape
                    .iter()
                    .map(|d| match d {
                        TDim::Sym(symbol) => Some(symbol.to_string()),
                        _ => None,
                    })
                    .collect(),
                datum: fact.datum_type,
            })
        })
        .collect()
}

fn weight_bytes(model: &TypedModel) -> u64 {
    model
        .nodes()
        .iter()
        .filter_map(|node| node.op_as::<tract_onnx::tract_core::ops::konst::Const>())
        .map(|konst| (konst.val().len() * konst.val().datum_type().size_of()) as u64)
        .sum()
}

/// The largest tensor [`fold_constants`] materialises.
const MAX_FOLDED_BYTES: usize = 1 << 30;

/// Evaluates once, at load, every node whose inputs are all constants, and
/// replaces it by its value. tract's own folding declines to grow a
/// constant (to save memory), which leaves quantised graphs — int8 weights
/// cast and scaled to f32 inside the graph, as in the shipped MiniLM —
/// dequantising their weights on every call. Returns how many nodes it folded.
fn fold_constants(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    while let Some(patch) = next_fold(model)? {
        patch.apply(model)?;
        folded += 1;
    }
    Ok(folded)
}

fn next_fold(model: &TypedModel) -> TractResult<Option<TypedModelPatch>> {
    for id in model.eval_order()? {
        let node = model.node(id);
        if node.inputs.is_empty() || node.op_is::<tract_onnx::tract_core::ops::konst::Const>() {
            continue;
        }
        let facts = model.node_input_facts(id)?;
        let Some(inputs) = facts
            .iter()
            .map(|fact| fact.konst.clone().map(|k| k.into_tvalue()))
            .collect::<Option<TVec<_>>>()
        else {
            continue;
        };
        let Ok(Some(outputs)) = node.op.eval_out_of_plan(inputs) else {
            continue;
        };
        if outputs
            .iter()
            .any(|t| t.datum_type().size_of() * t.volume() > MAX_FOLDED_BYTES)
        {
            continue;
        }
        let mut patch = TypedModelPatch::default();
        for (slot, output) in outputs.into_iter().enumerate() {
            let wire = patch.add_const(
                format!("{}.folded.{slot}", node.name),
                output.into_arc_tensor(),
            )?;
            patch.shunt_outside(model, OutletId::new(id, slot), wire)?;
        }
        return Ok(Some(patch));
    }
    Ok(None)
}
