//! A WAGI program written with the `wasi-nn` crate (its witx bindings), as
//! programs for wasmtime's preview 1 wasi-nn are: nothing in it knows
//! Gigafactory.
//!
//! - `?file`: loads `fixture/tiny.onnx` from its preopened bundle with
//!   `build_from_files` and prints `y = x + x` for `x = [1.25, -3]`.
//! - otherwise: all-MiniLM-L6-v2 by name over the token ids on stdin
//!   (whitespace-separated), mean-pooled over the tokens and L2-normalised,
//!   printed as a JSON array.

use std::io::Read;

use wasi_nn::{ExecutionTarget, GraphBuilder, GraphEncoding, TensorType};

const DIMENSIONS: usize = 384;

fn tiny() -> String {
    let graph = GraphBuilder::new(GraphEncoding::Onnx, ExecutionTarget::CPU)
        .build_from_files(["fixture/tiny.onnx"])
        .expect("load fixture/tiny.onnx");
    let mut context = graph.init_execution_context().expect("context");
    // tiny.onnx's inputs, one per element type: f16, f32, f64, u8, i32, i64.
    let set = [
        context.set_input(0, TensorType::F16, &[2], [0x3e00u16, 0xc000]),
        context.set_input(1, TensorType::F32, &[2], [1.25f32, -3.0]),
        context.set_input(2, TensorType::F64, &[2], [0.5f64, 2.0]),
        context.set_input(3, TensorType::U8, &[2], [7u8, 200]),
        context.set_input(4, TensorType::I32, &[2], [-5i32, 1_000_000]),
        context.set_input(5, TensorType::I64, &[2], [-7i64, 1 << 40]),
    ];
    for result in set {
        result.expect("set input");
    }
    context.compute().expect("compute");
    let mut y = [0f32; 2];
    let bytes = context.get_output(1, &mut y).expect("y_fp32");
    format!("y {bytes} {},{}", y[0], y[1])
}

fn embed(tokens: &[i64]) -> String {
    let graph = GraphBuilder::new(GraphEncoding::Onnx, ExecutionTarget::CPU)
        .build_from_cache("all-minilm-l6-v2")
        .expect("load all-minilm-l6-v2 by name");
    let mut context = graph.init_execution_context().expect("context");
    let dims = [1, tokens.len()];
    let ones = vec![1i64; tokens.len()];
    let zeros = vec![0i64; tokens.len()];
    for (index, values) in [tokens, &ones, &zeros].into_iter().enumerate() {
        context
            .set_input(index, TensorType::I64, &dims, values)
            .expect("set input");
    }
    context.compute().expect("compute");
    let mut hidden = vec![0f32; tokens.len() * DIMENSIONS];
    context.get_output(0, &mut hidden).expect("output");
    let mut pooled = vec![0f32; DIMENSIONS];
    for token in hidden.chunks(DIMENSIONS) {
        for (sum, value) in pooled.iter_mut().zip(token) {
            *sum += value / tokens.len() as f32;
        }
    }
    let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    let values: Vec<String> = pooled.iter().map(|v| (v / norm).to_string()).collect();
    format!("[{}]", values.join(","))
}

fn main() {
    let body = if std::env::var("QUERY_STRING").as_deref() == Ok("file") {
        tiny()
    } else {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).expect("stdin");
        let tokens: Vec<i64> = input
            .split_whitespace()
            .map(|t| t.parse().expect("a token id"))
            .collect();
        embed(&tokens)
    };
    print!("Content-Type: text/plain\n\n{body}");
}
