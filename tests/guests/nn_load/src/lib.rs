//! Loads its own ONNX bytes with `wasi:nn/graph.load` (tests/data/tiny.onnx:
//! `y = x + x` for each element type) and reports every output as
//! `name type dims values`, one per line.

use gigafactory_sdk::http::{Handler, Request, Response};
use gigafactory_sdk::nn::{Element, Graph, Tensor, TensorType};

const TINY: &[u8] = include_bytes!("../../../data/tiny.onnx");

struct Load;

fn values<T: Element + ToString>(tensor: &Tensor) -> String {
    let values: Vec<String> = tensor
        .to_vec::<T>()
        .expect("typed output")
        .iter()
        .map(T::to_string)
        .collect();
    values.join(",")
}

fn describe(name: &str, tensor: &Tensor) -> String {
    let (ty, values) = match tensor.ty() {
        TensorType::Fp16 => ("FP16", hex(tensor.bytes())),
        TensorType::Fp32 => ("FP32", values::<f32>(tensor)),
        TensorType::Fp64 => ("FP64", values::<f64>(tensor)),
        TensorType::U8 => ("U8", values::<u8>(tensor)),
        TensorType::I32 => ("I32", values::<i32>(tensor)),
        TensorType::I64 => ("I64", values::<i64>(tensor)),
        TensorType::Bf16 => ("BF16", hex(tensor.bytes())),
    };
    format!("{name} {ty} {:?} {values}", tensor.dims())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run() -> Result<String, gigafactory_sdk::nn::Error> {
    let graph = Graph::from_onnx(TINY)?;
    // 1.5 and -2.0 as little-endian IEEE half floats.
    let half = Tensor::from_bytes(&[2], TensorType::Fp16, vec![0x00, 0x3e, 0x00, 0xc0]);
    let outputs = graph.context()?.compute(vec![
        ("x_fp16", half),
        ("x_fp32", Tensor::new(&[2], &[1.25f32, -3.0])),
        ("x_fp64", Tensor::new(&[2], &[0.1f64, 1.5e10])),
        ("x_u8", Tensor::new(&[2], &[7u8, 200])),
        ("x_i32", Tensor::new(&[2], &[-5i32, 1_000_000])),
        ("x_i64", Tensor::new(&[2], &[-7i64, 1 << 40])),
    ])?;
    Ok(outputs
        .iter()
        .map(|(name, tensor)| describe(name, tensor) + "\n")
        .collect())
}

impl Handler for Load {
    fn handle(_request: Request) -> Response {
        match run() {
            Ok(report) => Response::text(200, report),
            Err(e) => Response::error(500, "nn", &e.to_string()),
        }
    }
}

gigafactory_sdk::export_handler!(Load);
