//! Typed access to models through the standard `wasi:nn` interface.
//!
//! ```ignore
//! use gigafactory_sdk::nn::{Graph, Tensor};
//!
//! let graph = Graph::by_name("all-minilm-l6-v2")?;
//! let ids = Tensor::new(&[1, 3], &[101i64, 7592, 102]);
//! let outputs = graph.context()?.compute(vec![("input_ids", ids), /* … */])?;
//! let hidden: Vec<f32> = outputs.get("last_hidden_state").unwrap().to_vec()?;
//! ```

use std::fmt;

#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit/wasi-nn",
        world: "ml",
    });
}

use bindings::wasi::nn::{errors, graph, inference, tensor};

pub use bindings::wasi::nn::errors::ErrorCode;
pub use bindings::wasi::nn::graph::{ExecutionTarget, GraphEncoding};
pub use bindings::wasi::nn::tensor::TensorType;

/// A wasi-nn failure: the standard error code and the host's message.
#[derive(Debug, Clone)]
pub struct Error {
    /// The standard error code.
    pub code: ErrorCode,
    /// What the host said about it.
    pub message: String,
}

impl Error {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Whether the host refused the call because the model is busy (its
    /// queue is full): retrying shortly may succeed, so answer 503.
    pub fn is_busy(&self) -> bool {
        matches!(self.code, ErrorCode::RuntimeError) && self.message.starts_with(BUSY_PREFIX)
    }
}

/// How Gigafactory's `runtime-error` message starts when a model is busy.
pub const BUSY_PREFIX: &str = "model busy: ";

impl From<errors::Error> for Error {
    fn from(error: errors::Error) -> Self {
        Self::new(error.code(), error.data())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wasi-nn {:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// A loaded model.
pub struct Graph(graph::Graph);

impl Graph {
    /// A model of the host's repository, by name (e.g. `all-minilm-l6-v2`).
    pub fn by_name(name: &str) -> Result<Self, Error> {
        Ok(Self(graph::load_by_name(name)?))
    }

    /// A model from ONNX bytes the function brings itself.
    pub fn from_onnx(bytes: &[u8]) -> Result<Self, Error> {
        Self::from_bytes(bytes, GraphEncoding::Onnx, ExecutionTarget::Cpu)
    }

    /// A model from bytes in any encoding, for any target (`wasi:nn/graph.load`).
    pub fn from_bytes(
        bytes: &[u8],
        encoding: GraphEncoding,
        target: ExecutionTarget,
    ) -> Result<Self, Error> {
        let builders = vec![bytes.to_vec()];
        Ok(Self(graph::load(&builders, encoding, target)?))
    }

    /// A fresh execution context to run the model with.
    pub fn context(&self) -> Result<Context, Error> {
        Ok(Context(self.0.init_execution_context()?))
    }
}

/// One model execution context.
pub struct Context(inference::GraphExecutionContext);

impl Context {
    /// Runs the model on named inputs and returns every named output.
    pub fn compute<N: Into<String>>(&self, inputs: Vec<(N, Tensor)>) -> Result<Outputs, Error> {
        let inputs = inputs
            .into_iter()
            .map(|(name, t)| {
                let resource = tensor::Tensor::new(&t.dims, t.ty, &t.data);
                (name.into(), resource)
            })
            .collect::<Vec<_>>();
        let outputs = self.0.compute(inputs)?;
        Ok(Outputs(
            outputs
                .into_iter()
                .map(|(name, t)| (name, Tensor::from_resource(&t)))
                .collect(),
        ))
    }
}

/// A tensor held in the guest: dimensions, element type and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    dims: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

impl Tensor {
    /// A tensor of `dims` holding `values` (row-major).
    ///
    /// Panics when `values.len()` is not the product of `dims`.
    pub fn new<T: Element>(dims: &[u32], values: &[T]) -> Self {
        let count: usize = dims.iter().map(|&d| d as usize).product();
        assert_eq!(
            count,
            values.len(),
            "tensor of {dims:?} needs {count} values"
        );
        let mut data = Vec::with_capacity(values.len() * T::SIZE);
        for value in values {
            value.write_le(&mut data);
        }
        Self::from_bytes(dims, T::TYPE, data)
    }

    /// A tensor from raw little-endian bytes, e.g. for FP16 or BF16 data.
    pub fn from_bytes(dims: &[u32], ty: TensorType, data: Vec<u8>) -> Self {
        Self {
            dims: dims.to_vec(),
            ty,
            data,
        }
    }

    fn from_resource(t: &tensor::Tensor) -> Self {
        Self::from_bytes(&t.dimensions(), t.ty(), t.data())
    }

    /// The dimensions.
    pub fn dims(&self) -> &[u32] {
        &self.dims
    }

    /// The element type.
    pub fn ty(&self) -> TensorType {
        self.ty
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The values as `T`; an error when the element type is not `T`'s.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, Error> {
        if self.ty != T::TYPE {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("tensor holds {:?}, not {:?}", self.ty, T::TYPE),
            ));
        }
        Ok(self.data.chunks_exact(T::SIZE).map(T::read_le).collect())
    }
}

/// The named outputs of one [`Context::compute`].
#[derive(Debug, Clone)]
pub struct Outputs(Vec<(String, Tensor)>);

impl Outputs {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// All outputs in the model's order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.0.iter().map(|(n, t)| (n.as_str(), t))
    }
}

/// A Rust type that maps to a wasi-nn tensor element type.
pub trait Element: Copy {
    /// The wasi-nn element type.
    const TYPE: TensorType;
    /// Bytes per element.
    const SIZE: usize;
    /// Appends the little-endian encoding of `self`.
    fn write_le(&self, out: &mut Vec<u8>);
    /// Decodes one element from exactly [`Self::SIZE`] bytes.
    fn read_le(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($($rust:ty => $ty:ident),* $(,)?) => {$(
        impl Element for $rust {
            const TYPE: TensorType = TensorType::$ty;
            const SIZE: usize = std::mem::size_of::<$rust>();
            fn write_le(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Self {
                <$rust>::from_le_bytes(bytes.try_into().expect("element width"))
            }
        }
    )*};
}

element!(f32 => Fp32, f64 => Fp64, u8 => U8, i32 => I32, i64 => I64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_round_trips_values() {
        let t = Tensor::new(&[2, 2], &[1.5f32, -2.0, 0.0, 3.25]);
        assert_eq!(t.bytes().len(), 16);
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.5, -2.0, 0.0, 3.25]);
    }

    #[test]
    fn tensor_refuses_the_wrong_type() {
        let t = Tensor::new(&[1], &[7i64]);
        let error = t.to_vec::<f32>().unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidArgument);
    }

    #[test]
    #[should_panic(expected = "needs 4 values")]
    fn tensor_checks_its_length() {
        Tensor::new(&[2, 2], &[1i32, 2, 3]);
    }
}
