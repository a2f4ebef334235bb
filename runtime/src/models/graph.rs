//! A tensor graph as the pool, the batcher and wasi-nn see it, whichever
//! engine loaded it: its signature, where it runs, and `run`.

use super::error::NnError;
use super::tensor::{ElementType, HostTensor};

/// One input or output of a model: name, element type and shape
/// (`None` for a dimension fixed only at run time, such as the batch).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorSpec {
    /// The tensor's name in the graph.
    pub name: String,
    /// The element type, in wasi-nn's spelling (`FP32`, `I64`, …), or the
    /// engine's own name for one wasi-nn cannot carry.
    #[serde(rename = "type")]
    pub ty: String,
    /// Dimensions; `None` where the model leaves it symbolic.
    pub shape: Vec<Option<usize>>,
    /// The symbol of each symbolic dimension (`batch`, `sequence` …), so
    /// that inputs sharing one can be checked to agree.
    #[serde(skip)]
    pub(crate) symbols: Vec<Option<String>>,
    /// The element type, when wasi-nn can carry it.
    #[serde(skip)]
    pub(crate) element: Option<ElementType>,
}

impl TensorSpec {
    /// A spec of a type wasi-nn carries; `other` names the type when it is not.
    pub(crate) fn new(
        name: String,
        element: Option<ElementType>,
        other: impl FnOnce() -> String,
        shape: Vec<Option<usize>>,
        symbols: Vec<Option<String>>,
    ) -> Self {
        let ty = element.map_or_else(other, |ty| format!("{ty:?}").to_uppercase());
        Self {
            name,
            ty,
            shape,
            symbols,
            element,
        }
    }

    /// The element type, when wasi-nn can carry it.
    pub(crate) fn element_type(&self) -> Option<ElementType> {
        self.element
    }

    /// Each dimension's symbol, where it is a plain symbol.
    pub(crate) fn symbols(&self) -> &[Option<String>] {
        &self.symbols
    }
}

/// A graph an engine loaded onto a device, ready for any number of callers.
pub trait Graph: Send + Sync + 'static {
    /// The engine that runs it (`tract`, `onnxruntime`).
    fn engine(&self) -> &'static str;
    /// Where it runs: `cpu` or `cuda:N`.
    fn device(&self) -> &str;
    /// What it takes in memory where it runs (weights, and the engine's
    /// copies of them), as the engine estimates it.
    fn memory_bytes(&self) -> u64;
    /// Its inputs, in order.
    fn inputs(&self) -> &[TensorSpec];
    /// Its outputs, in order.
    fn outputs(&self) -> &[TensorSpec];
    /// Whether the engine runs tensors of `ty`.
    fn supports(&self, ty: ElementType) -> bool;
    /// Runs on inputs in the graph's order, already checked with
    /// [`order`]; blocking, so call it off the async workers. A failure or
    /// a panic inside the engine is this call's error.
    fn run(&self, inputs: Vec<HostTensor>) -> anyhow::Result<Vec<(String, HostTensor)>>;
}

/// Puts named tensors in `graph`'s input order, checking names, types,
/// shapes and lengths, so a mistake is an `invalid-argument` (or
/// `unsupported-operation` for a type the engine does not run), not a crash.
pub fn order(
    graph: &dyn Graph,
    named: Vec<(String, HostTensor)>,
) -> Result<Vec<HostTensor>, NnError> {
    let inputs = graph.inputs();
    let mut slots: Vec<Option<HostTensor>> = vec![None; inputs.len()];
    for (name, tensor) in named {
        let index = inputs
            .iter()
            .position(|spec| spec.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = inputs.iter().map(|s| s.name.as_str()).collect();
                NnError::invalid(format!(
                    "the model has no input {name:?} (inputs: {known:?})"
                ))
            })?;
        if slots[index].replace(tensor).is_some() {
            return Err(NnError::invalid(format!("input {name:?} given twice")));
        }
    }
    let tensors = inputs
        .iter()
        .zip(slots)
        .map(|(spec, slot)| {
            let tensor =
                slot.ok_or_else(|| NnError::invalid(format!("missing input {:?}", spec.name)))?;
            check_shape(spec, &tensor)?;
            check_type(graph, spec, &tensor)?;
            Ok(tensor)
        })
        .collect::<Result<Vec<_>, NnError>>()?;
    super::limits::check_symbols(inputs, &tensors)?;
    Ok(tensors)
}

fn check_type(graph: &dyn Graph, spec: &TensorSpec, tensor: &HostTensor) -> Result<(), NnError> {
    tensor.validate()?;
    if !graph.supports(tensor.ty) {
        return Err(NnError::unsupported(format!(
            "input {:?}: {:?} tensors are not supported by the {} engine",
            spec.name,
            tensor.ty,
            graph.engine()
        )));
    }
    if spec.element != Some(tensor.ty) {
        return Err(NnError::invalid(format!(
            "input {:?} is {}, the model expects {}",
            spec.name,
            format!("{:?}", tensor.ty).to_uppercase(),
            spec.ty
        )));
    }
    Ok(())
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

/// A caught panic's message.
pub(crate) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Runs `run`, turning a panic inside an engine into this call's error:
/// engines panic on some inputs they do not check (an index past a table,
/// lengths that disagree), and a loaded graph is immutable, each run with
/// its own state, so the graph stays usable.
pub(crate) fn guarded<T>(run: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .map_err(|panic| anyhow::anyhow!("the model panicked: {}", panic_text(&panic)))?
}
