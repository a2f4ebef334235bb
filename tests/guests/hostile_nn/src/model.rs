//! The wasi-nn paths: malformed inputs to the repository's sentence model,
//! tensors hoarded on the host, and huge model names.

mod bindings {
    wit_bindgen::generate!({
        path: "../../../sdk/wit/wasi-nn",
        world: "ml",
    });
}

use bindings::wasi::nn::errors::{Error, ErrorCode};
use bindings::wasi::nn::graph;
use bindings::wasi::nn::tensor::{Tensor, TensorType};

const MODEL: &str = "all-minilm-l6-v2";
const OUTPUT: &str = "last_hidden_state";

/// "The quick brown fox jumps over the lazy dog." with `[CLS]` and `[SEP]`.
const SENTENCE: [i64; 12] = [
    101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102,
];

/// One named I64 input: its dimensions and values.
struct Input {
    name: &'static str,
    dims: Vec<u32>,
    values: Vec<i64>,
}

impl Input {
    /// A `[1, values.len()]` row.
    fn row(name: &'static str, values: Vec<i64>) -> Self {
        Self {
            name,
            dims: vec![1, values.len() as u32],
            values,
        }
    }

    fn tensor(&self) -> Tensor {
        let bytes: Vec<u8> = self.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(&self.dims, TensorType::I64, &bytes)
    }
}

/// The wasi-nn error code in the WIT's lower-case kebab spelling.
fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidArgument => "invalid-argument",
        ErrorCode::InvalidEncoding => "invalid-encoding",
        ErrorCode::Timeout => "timeout",
        ErrorCode::RuntimeError => "runtime-error",
        ErrorCode::UnsupportedOperation => "unsupported-operation",
        ErrorCode::TooLarge => "too-large",
        ErrorCode::NotFound => "not-found",
        ErrorCode::Security => "security",
        ErrorCode::Unknown => "unknown",
    }
}

/// Runs the model; `ok <dims>` or `error <code> <message>`.
fn run(inputs: [Input; 3]) -> String {
    match compute(&inputs) {
        Ok(Some(dims)) => format!("ok {dims:?}"),
        Ok(None) => format!("error missing-output no {OUTPUT} among the outputs"),
        Err(e) => format!("error {} {}", code_name(e.code()), e.data()),
    }
}

/// The dimensions of the model's output, if it has one called [`OUTPUT`].
fn compute(inputs: &[Input]) -> Result<Option<Vec<u32>>, Error> {
    let graph = graph::load_by_name(MODEL)?;
    let context = graph.init_execution_context()?;
    let named = inputs
        .iter()
        .map(|input| (input.name.to_string(), input.tensor()))
        .collect();
    let outputs = context.compute(named)?;
    Ok(outputs
        .iter()
        .find(|(name, _)| name == OUTPUT)
        .map(|(_, tensor)| tensor.dimensions()))
}

/// The three inputs for `ids`, with the mask and token types given.
fn sentence(ids: Vec<i64>, mask: Vec<i64>, types: Vec<i64>) -> [Input; 3] {
    [
        Input::row("input_ids", ids),
        Input::row("attention_mask", mask),
        Input::row("token_type_ids", types),
    ]
}

pub fn good() -> String {
    run(sentence(SENTENCE.to_vec(), vec![1; 12], vec![0; 12]))
}

pub fn bad_types() -> String {
    run(sentence(SENTENCE.to_vec(), vec![1; 12], vec![5; 12]))
}

pub fn bad_mask() -> String {
    run(sentence(SENTENCE.to_vec(), vec![1; 5], vec![0; 12]))
}

pub fn empty() -> String {
    let nothing = |name| Input {
        name,
        dims: vec![0, 0],
        values: Vec::new(),
    };
    run([
        nothing("input_ids"),
        nothing("attention_mask"),
        nothing("token_type_ids"),
    ])
}

/// `[CLS]`, then "the" until `tokens` long with `[SEP]` at the end.
pub fn long(tokens: usize) -> String {
    let mut ids = vec![1996; tokens];
    if let Some(first) = ids.first_mut() {
        *first = 101;
    }
    if tokens > 1 {
        ids[tokens - 1] = 102;
    }
    run(sentence(ids, vec![1; tokens], vec![0; tokens]))
}

/// Creates `count` tensors of `mb` MiB from one buffer and keeps them all.
pub fn hoard(mb: usize, count: usize) -> String {
    let zeros = vec![0u8; mb << 20];
    let dims = [(zeros.len() / 8) as u32];
    let held: Vec<Tensor> = (0..count)
        .map(|_| Tensor::new(&dims, TensorType::I64, &zeros))
        .collect();
    format!("held {}", held.len())
}

/// The host's message for a model named `mb` MiB of `x`.
pub fn long_name_error(mb: usize) -> String {
    match graph::load_by_name(&"x".repeat(mb << 20)) {
        Ok(_) => "a model with that name loaded".to_string(),
        Err(e) => e.data(),
    }
}
