//! Exercises wasi-nn failure paths and reports the error code each one
//! returned, one `case=code message` line each (or `case=ok`).

use gigafactory_sdk::http::{Handler, Request, Response};
use gigafactory_sdk::nn::{ExecutionTarget, Graph, GraphEncoding, Tensor, TensorType};

const MODEL: &str = "all-minilm-l6-v2";

struct Probe;

/// `ok`, or the error code in lower case followed by the host's message.
fn outcome<T>(result: Result<T, gigafactory_sdk::nn::Error>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => {
            let code = format!("{:?}", e.code).to_lowercase();
            let code = code.rsplit("::").next().unwrap_or_default().to_string();
            format!("{code} {}", e.message)
        }
    }
}

fn filled(dims: &[u32], value: i64) -> Tensor {
    let count = dims.iter().product::<u32>() as usize;
    Tensor::new(dims, &vec![value; count])
}

fn ids(dims: &[u32]) -> Tensor {
    filled(dims, 101)
}

fn mask(dims: &[u32]) -> Tensor {
    filled(dims, 1)
}

fn types(dims: &[u32]) -> Tensor {
    filled(dims, 0)
}

impl Handler for Probe {
    fn handle(_request: Request) -> Response {
        let mut lines = Vec::new();
        let mut case = |name: &str, result: String| lines.push(format!("{name}={result}"));
        case("unknown-model", outcome(Graph::by_name("no-such-model")));
        case(
            "wrong-encoding",
            outcome(Graph::from_bytes(
                b"x",
                GraphEncoding::Tensorflow,
                ExecutionTarget::Cpu,
            )),
        );
        case(
            "garbage-onnx",
            outcome(Graph::from_bytes(
                b"not a model",
                GraphEncoding::Onnx,
                ExecutionTarget::Cpu,
            )),
        );
        case(
            "tpu-target",
            outcome(Graph::from_bytes(
                b"x",
                GraphEncoding::Onnx,
                ExecutionTarget::Tpu,
            )),
        );
        let graph = Graph::by_name(MODEL).expect("the model is in the repository");
        let run =
            |inputs: Vec<(&str, Tensor)>| outcome(graph.context().and_then(|c| c.compute(inputs)));
        let dims = [1u32, 3];
        case(
            "valid",
            run(vec![
                ("input_ids", ids(&dims)),
                ("attention_mask", mask(&dims)),
                ("token_type_ids", types(&dims)),
            ]),
        );
        case("missing-input", run(vec![("input_ids", ids(&dims))]));
        case(
            "unknown-input",
            run(vec![
                ("input_ids", ids(&dims)),
                ("attention_mask", mask(&dims)),
                ("token_type_ids", types(&dims)),
                ("extra", ids(&dims)),
            ]),
        );
        let floats = Tensor::new(&dims, &[0f32; 3]);
        case(
            "wrong-type",
            run(vec![
                ("input_ids", floats),
                ("attention_mask", mask(&dims)),
                ("token_type_ids", types(&dims)),
            ]),
        );
        let short = Tensor::from_bytes(&dims, TensorType::I64, vec![0; 7]);
        case(
            "wrong-length",
            run(vec![
                ("input_ids", short),
                ("attention_mask", mask(&dims)),
                ("token_type_ids", types(&dims)),
            ]),
        );
        case(
            "wrong-rank",
            run(vec![
                ("input_ids", ids(&[3])),
                ("attention_mask", mask(&dims)),
                ("token_type_ids", types(&dims)),
            ]),
        );
        let bf16 = Tensor::from_bytes(&dims, TensorType::Bf16, vec![0; 6]);
        case(
            "bf16",
            run(vec![
                ("input_ids", bf16),
                ("attention_mask", mask(&dims)),
                ("token_type_ids", types(&dims)),
            ]),
        );
        // Token type 7 indexes past the model's 2-row embedding table.
        case(
            "out-of-range-index",
            run(vec![
                ("input_ids", ids(&dims)),
                ("attention_mask", mask(&dims)),
                ("token_type_ids", filled(&dims, 7)),
            ]),
        );
        case(
            "after-a-failure",
            run(vec![
                ("input_ids", ids(&dims)),
                ("attention_mask", mask(&dims)),
                ("token_type_ids", types(&dims)),
            ]),
        );
        Response::text(200, lines.join("\n") + "\n")
    }
}

gigafactory_sdk::export_handler!(Probe);
