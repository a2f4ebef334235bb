//! The tract engine: ONNX graphs parsed, typed, constant-folded and
//! optimised once by tract (pure Rust, always built), then run by any
//! number of callers on the CPU.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::DimLike;

use super::{Data, Engine, Loaded, Source};
use crate::models::config::ModelFormat;
use crate::models::graph::{Graph, TensorSpec, guarded};
use crate::models::tensor::{ElementType, HostTensor};

/// The tract engine.
pub struct Tract;

impl Engine for Tract {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn format(&self) -> ModelFormat {
        ModelFormat::Onnx
    }

    fn estimate(&self, source: &Source, _device: &str) -> Result<u64, String> {
        // Int8 weights dequantised in the graph are folded to f32: up to 4x.
        Ok(source.data.size().saturating_mul(4))
    }

    fn load(&self, source: &Source, device: &str) -> Result<Loaded, String> {
        if device != "cpu" {
            return Err(format!(
                "the tract engine runs on the CPU only, not {device}"
            ));
        }
        let model = match &source.data {
            Data::File(path) => tract_onnx::onnx()
                .model_for_path(path)
                .with_context(|| format!("parsing {}", path.display())),
            Data::Bytes(bytes) => tract_onnx::onnx()
                .model_for_read(&mut &bytes[..])
                .context("parsing the ONNX graph"),
        };
        let graph = model
            .and_then(TractGraph::new)
            .map_err(|e| format!("{e:#}"))?;
        Ok(Loaded::Graph(Arc::new(graph)))
    }
}

/// An optimised ONNX graph, ready to run on the CPU.
pub struct TractGraph {
    plan: Box<dyn Runnable>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    /// Each input's element type, in order.
    datums: Vec<DatumType>,
    weight_bytes: u64,
}

impl TractGraph {
    /// Types, simplifies, folds and optimises a parsed graph.
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
        let inputs = specs(&model, &model.inputs)?;
        let outputs = specs(&model, &model.outputs)?;
        let datums = model
            .inputs
            .iter()
            .map(|&outlet| Ok(model.outlet_fact(outlet)?.datum_type))
            .collect::<Result<_>>()?;
        let runtime = runtime_for_name("cpu")?.context("tract has no cpu runtime")?;
        let plan = runtime.prepare(model).context("optimising the graph")?;
        Ok(Self {
            plan,
            inputs,
            outputs,
            datums,
            weight_bytes,
        })
    }

    /// Loads and optimises the ONNX file at `path` (for tests).
    #[cfg(test)]
    pub(crate) fn from_path(path: &std::path::Path) -> Result<Arc<dyn Graph>> {
        let model = tract_onnx::onnx().model_for_path(path)?;
        Ok(Arc::new(Self::new(model)?))
    }
}

impl Graph for TractGraph {
    fn engine(&self) -> &'static str {
        "tract"
    }

    fn device(&self) -> &str {
        "cpu"
    }

    fn memory_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn supports(&self, ty: ElementType) -> bool {
        datum(ty).is_some()
    }

    fn run(&self, inputs: Vec<HostTensor>) -> Result<Vec<(String, HostTensor)>> {
        let inputs = inputs
            .into_iter()
            .zip(&self.datums)
            .map(|(tensor, &datum)| Ok(into_tract(tensor, datum)?.into_tvalue()))
            .collect::<Result<TVec<TValue>>>()?;
        let outputs = guarded(|| self.plan.run(inputs).context("running the graph"))?;
        self.outputs
            .iter()
            .zip(outputs)
            .map(|(spec, value)| Ok((spec.name.clone(), from_tract(&value)?)))
            .collect()
    }
}

/// tract's type for a wasi-nn element type (bf16 has none).
fn datum(ty: ElementType) -> Option<DatumType> {
    Some(match ty {
        ElementType::Fp16 => DatumType::F16,
        ElementType::Fp32 => DatumType::F32,
        ElementType::Fp64 => DatumType::F64,
        ElementType::U8 => DatumType::U8,
        ElementType::I32 => DatumType::I32,
        ElementType::I64 => DatumType::I64,
        ElementType::Bf16 => return None,
    })
}

fn element(datum: DatumType) -> Option<ElementType> {
    Some(match datum {
        DatumType::F16 => ElementType::Fp16,
        DatumType::F32 => ElementType::Fp32,
        DatumType::F64 => ElementType::Fp64,
        DatumType::U8 => ElementType::U8,
        DatumType::I32 => ElementType::I32,
        DatumType::I64 => ElementType::I64,
        _ => return None,
    })
}

/// A checked input as a tract tensor of the model's element type.
fn into_tract(tensor: HostTensor, datum: DatumType) -> Result<Tensor> {
    let shape: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
    let mut out = Tensor::zero_dt(datum, &shape)?;
    anyhow::ensure!(
        out.as_bytes().len() == tensor.data.len(),
        "input length changed"
    );
    // wasi-nn data is little-endian, as is every host this runs on.
    out.as_bytes_mut().copy_from_slice(&tensor.data);
    Ok(out)
}

/// Copies a tract output out, widening types wasi-nn cannot name
/// (bool, i8, u16 …) to the nearest one it can.
fn from_tract(tensor: &Tensor) -> Result<HostTensor> {
    let own = tensor.datum_type();
    let (ty, tensor) = match element(own) {
        Some(ty) => (ty, std::borrow::Cow::Borrowed(tensor)),
        None => {
            let ty = match own {
                DatumType::Bool => ElementType::U8,
                DatumType::I8 | DatumType::I16 | DatumType::U16 => ElementType::I32,
                DatumType::U32 | DatumType::U64 => ElementType::I64,
                other => anyhow::bail!("the model returns {other:?}, which wasi-nn cannot carry"),
            };
            (
                ty,
                tensor.cast_to_dt(datum(ty).expect("widened types have a datum"))?,
            )
        }
    };
    Ok(HostTensor {
        dims: tensor.shape().iter().map(|&d| d as u32).collect(),
        ty,
        data: tensor.as_bytes().to_vec(),
    })
}

fn specs(model: &TypedModel, outlets: &[OutletId]) -> Result<Vec<TensorSpec>> {
    outlets
        .iter()
        .map(|&outlet| {
            let fact = model.outlet_fact(outlet)?;
            let name = model
                .outlet_label(outlet)
                .unwrap_or(&model.node(outlet.node).name)
                .to_string();
            let symbols = fact
                .shape
                .iter()
                .map(|d| match d {
                    TDim::Sym(symbol) => Some(symbol.to_string()),
                    _ => None,
                })
                .collect();
            let shape = fact.shape.iter().map(|d| d.to_usize().ok()).collect();
            let datum = fact.datum_type;
            Ok(TensorSpec::new(
                name,
                element(datum),
                || format!("{datum:?}"),
                shape,
                symbols,
            ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_tract() {
        let original = HostTensor {
            dims: vec![2],
            ty: ElementType::Fp32,
            data: [1.5f32, -3.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        };
        let tract = into_tract(original.clone(), DatumType::F32).unwrap();
        assert_eq!(from_tract(&tract).unwrap(), original);
    }

    #[test]
    fn has_no_bf16() {
        assert!(datum(ElementType::Bf16).is_none());
        assert!(datum(ElementType::Fp16).is_some());
    }
}
