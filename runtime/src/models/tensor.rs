//! Tensors as they cross the sandbox boundary: dimensions, a wasi-nn
//! element type and little-endian bytes.

use super::error::NnError;

/// The wasi-nn tensor element types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    /// IEEE half precision.
    Fp16,
    /// IEEE single precision.
    Fp32,
    /// IEEE double precision.
    Fp64,
    /// bfloat16 (accepted from guests; no engine runs it yet).
    Bf16,
    /// Unsigned byte.
    U8,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
}

impl ElementType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::Fp16 | Self::Bf16 => 2,
            Self::Fp32 | Self::I32 => 4,
            Self::Fp64 | Self::I64 => 8,
            Self::U8 => 1,
        }
    }
}

/// A tensor owned by the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub dims: Vec<u32>,
    /// Element type.
    pub ty: ElementType,
    /// Row-major little-endian bytes.
    pub data: Vec<u8>,
}

impl HostTensor {
    /// Checks that `data` holds exactly the elements `dims` describe.
    pub fn validate(&self) -> Result<(), NnError> {
        let count = self
            .dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d as usize));
        let expected = count.and_then(|n| n.checked_mul(self.ty.size()));
        if expected == Some(self.data.len()) {
            Ok(())
        } else {
            Err(NnError::invalid(format!(
                "a {:?} tensor of {:?} needs {} bytes, got {}",
                self.ty,
                self.dims,
                expected.map_or_else(|| "too many".into(), |n| n.to_string()),
                self.data.len()
            )))
        }
    }
}

/// Layout helpers for batching: a tensor seen as `[outer, axis, inner]`.
impl HostTensor {
    fn split_at_axis(&self, axis: usize) -> (usize, usize, usize) {
        let dims: Vec<usize> = self.dims.iter().map(|&d| d as usize).collect();
        let outer = dims[..axis].iter().product();
        let inner = dims[axis + 1..].iter().product::<usize>() * self.ty.size();
        (outer, dims[axis], inner)
    }

    /// Pads (or cuts) `axis` to `len`, filling with the element `fill`
    /// (little-endian bytes of one element).
    pub(crate) fn resized(&self, axis: usize, len: usize, fill: &[u8]) -> Self {
        let (outer, old, inner) = self.split_at_axis(axis);
        let elem = self.ty.size();
        let mut data = Vec::with_capacity(outer * len * inner);
        for block in 0..outer {
            let start = block * old * inner;
            let kept = old.min(len) * inner;
            data.extend_from_slice(&self.data[start..start + kept]);
            for _ in 0..(len.saturating_sub(old) * inner / elem) {
                data.extend_from_slice(fill);
            }
        }
        let mut dims = self.dims.clone();
        dims[axis] = len as u32;
        Self {
            dims,
            ty: self.ty,
            data,
        }
    }

    /// Stacks tensors of equal trailing dimensions along axis 0.
    pub(crate) fn concat(parts: &[Self]) -> Self {
        let mut dims = parts[0].dims.clone();
        dims[0] = parts.iter().map(|p| p.dims[0]).sum();
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Self {
            dims,
            ty: parts[0].ty,
            data,
        }
    }

    /// Rows `start..start + rows` of axis 0.
    pub(crate) fn rows(&self, start: usize, rows: usize) -> Self {
        let (_, _, row) = self.split_at_axis(0);
        let mut dims = self.dims.clone();
        dims[0] = rows as u32;
        let data = self.data[start * row..(start + rows) * row].to_vec();
        Self {
            dims,
            ty: self.ty,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: &[u32], ty: ElementType, bytes: usize) -> HostTensor {
        HostTensor {
            dims: dims.to_vec(),
            ty,
            data: vec![0; bytes],
        }
    }

    fn ints(dims: &[u32], values: &[i32]) -> HostTensor {
        HostTensor {
            dims: dims.to_vec(),
            ty: ElementType::I32,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn pads_concatenates_and_splits_rows() {
        let a = ints(&[1, 2], &[1, 2]);
        let b = ints(&[2, 3], &[3, 4, 5, 6, 7, 8]);
        let padded = a.resized(1, 3, &0i32.to_le_bytes());
        assert_eq!(padded, ints(&[1, 3], &[1, 2, 0]));
        let batch = HostTensor::concat(&[padded, b]);
        assert_eq!(batch, ints(&[3, 3], &[1, 2, 0, 3, 4, 5, 6, 7, 8]));
        assert_eq!(batch.rows(1, 2).resized(1, 1, &[]), ints(&[2, 1], &[3, 6]));
        assert_eq!(batch.rows(0, 1).resized(1, 2, &[]), ints(&[1, 2], &[1, 2]));
    }

    #[test]
    fn validate_checks_the_byte_length() {
        assert!(tensor(&[2, 3], ElementType::I64, 48).validate().is_ok());
        let error = tensor(&[2, 3], ElementType::I64, 47)
            .validate()
            .unwrap_err();
        assert!(error.message.contains("needs 48 bytes, got 47"), "{error}");
    }

    #[test]
    fn validate_survives_overflowing_dimensions() {
        let error = tensor(&[u32::MAX, u32::MAX, u32::MAX], ElementType::Fp64, 8)
            .validate()
            .unwrap_err();
        assert!(error.message.contains("too many"), "{error}");
    }
}
