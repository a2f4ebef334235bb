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
use super::onnx::TensorSpec;
use super::tensor::HostTensor;

/// `[limits]` in `model.toml`.
///
/// ```toml
/// [limits]
/// # Largest dimensions of each input, outermost first.
/// max_shape = { input_ids = [64, 512], attention_mask = [64, 512] }
/// ```
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputLimits {
    /// Input name → its largest dimensions.
    #[serde(default)]
    pub max_shape: BTreeMap<String, Vec<u32>>,
}

/// The caps of a graph's inputs, in the graph's input order.
#[derive(Debug, Clone, Default)]
pub struct ShapeCaps(Vec<Option<Vec<u32>>>);

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
        Ok(Self(
            inputs
                .iter()
                .map(|spec| limits.max_shape.get(&spec.name).cloned())
                .collect(),
        ))
    }

    /// Checks ordered inputs against the caps.
    pub fn check(&self, specs: &[TensorSpec], tensors: &[HostTensor]) -> Result<(), NnError> {
        for ((spec, tensor), cap) in specs.iter().zip(tensors).zip(&self.0) {
            let Some(cap) = cap else { continue };
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
