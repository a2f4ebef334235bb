//! What one `compute` call may send, checked per call before it queues or
//! runs: inputs that share a symbolic dimension (`batch`, `sequence` …)
//! must agree on it, symbolic dimensions may not be empty, and a model's
//! `[limits]` in `model.toml` caps each input's shape. A call that breaks
//! these is refused with `invalid-argument` (or `too-large`) before the
//! host allocates anything for it, so it can neither fail other tenants'
//! calls batched with it nor make the host compute on an unbounded input.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{ErrorCode, NnError};
use super::graph::TensorSpec;
use super::tensor::HostTensor;

/// `[limits]` in `model.toml`.
///
/// ```toml
/// [limits]
/// # Largest dimensions of each input, outermost first.
/// max_shape = { input_ids = [32, 512], attention_mask = [32, 512] }
/// # Most elements of an input in one call, and in one batch after padding.
/// max_elements = { input_ids = 4096 }
/// ```
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputLimits {
    /// Input name → its largest dimensions.
    #[serde(default)]
    pub max_shape: BTreeMap<String, Vec<u32>>,
    /// Input name → the most elements it may hold in one call, and in one
    /// batch once padded: what bounds a run's time and memory.
    #[serde(default)]
    pub max_elements: BTreeMap<String, u64>,
}

/// The caps of a graph's inputs, in the graph's input order.
#[derive(Debug, Clone, Default)]
pub struct ShapeCaps {
    shapes: Vec<Option<Vec<u32>>>,
    elements: Vec<Option<u64>>,
}

impl ShapeCaps {
    /// Resolves `limits` against the graph's `inputs`: every named input
    /// must exist and have the graph's rank.
    pub fn new(limits: &InputLimits, inputs: &[TensorSpec]) -> Result<Self, String> {
        for (name, shape) in &limits.max_shape {
            let spec = inputs
                .iter()
                .find(|spec| &spec.name == name)
                .ok_or_else(|| format!("limits.max_shape: the model has no input {name:?}"))?;
            if spec.shape.len() != shape.len() {
                return Err(format!(
                    "limits.max_shape: {name} has {} dimensions, not {}",
                    spec.shape.len(),
                    shape.len()
                ));
            }
        }
        if let Some(name) = limits
            .max_elements
            .keys()
            .find(|name| !inputs.iter().any(|spec| &spec.name == *name))
        {
            return Err(format!(
                "limits.max_elements: the model has no input {name:?}"
            ));
        }
        Ok(Self {
            shapes: inputs
                .iter()
                .map(|spec| limits.max_shape.get(&spec.name).cloned())
                .collect(),
            elements: inputs
                .iter()
                .map(|spec| limits.max_elements.get(&spec.name).copied())
                .collect(),
        })
    }

    /// The most elements input `index` may hold in a call or a batch.
    pub fn max_elements(&self, index: usize) -> Option<u64> {
        self.elements.get(index).copied().flatten()
    }

    /// Checks ordered inputs against the caps.
    pub fn check(&self, specs: &[TensorSpec], tensors: &[HostTensor]) -> Result<(), NnError> {
        for (index, (spec, tensor)) in specs.iter().zip(tensors).enumerate() {
            let elements: u64 = tensor.dims.iter().map(|&d| u64::from(d)).product();
            if let Some(most) = self.max_elements(index)
                && elements > most
            {
                return Err(NnError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "input {:?} holds {elements} elements ({:?}); this model takes at most {most} per call",
                        spec.name, tensor.dims
                    ),
                ));
            }
            let Some(cap) = &self.shapes[index] else {
                continue;
            };
            if let Some((axis, (&got, &most))) = tensor
                .dims
                .iter()
                .zip(cap)
                .enumerate()
                .find(|(_, (got, most))| got > most)
            {
                return Err(NnError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "input {:?} has {got} along axis {axis}; this model takes at most {most} (shape at most {cap:?})",
                        spec.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks that inputs sharing a symbolic dimension agree on it and that no
/// symbolic dimension is empty.
pub fn check_symbols(specs: &[TensorSpec], tensors: &[HostTensor]) -> Result<(), NnError> {
    let mut seen: Vec<(&str, u32, &str)> = Vec::new();
    for (spec, tensor) in specs.iter().zip(tensors) {
        for (axis, (symbol, &value)) in spec.symbols().iter().zip(&tensor.dims).enumerate() {
            if spec.shape.get(axis).is_some_and(Option::is_none) && value == 0 {
                return Err(NnError::invalid(format!(
                    "input {:?} is empty along axis {axis}",
                    spec.name
                )));
            }
            let Some(symbol) = symbol else { continue };
            match seen.iter().find(|(known, ..)| known == symbol) {
                Some(&(_, first, other)) if first != value => {
                    return Err(NnError::invalid(format!(
                        "input {:?} has {value} along axis {axis} ({symbol}), but {other:?} has {first}: inputs sharing {symbol} must agree",
                        spec.name
                    )));
                }
                Some(_) => {}
                None => seen.push((symbol, value, &spec.name)),
            }
        }
    }
    Ok(())
}
