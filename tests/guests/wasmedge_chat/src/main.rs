//! A chat program written with the `wasmedge-wasi-nn` crate as LlamaEdge's
//! programs are: the model the host calls `default`, options as WasmEdge's
//! JSON, a ChatML prompt built here (a system message, then the question
//! on stdin). Nothing in it knows Gigafactory.
//!
//! Prints the whole answer (`compute`), then the same answer token by
//! token (`compute_single` until end of sequence), the number of pieces
//! and the usage JSON (output 1).

use std::io::Read;

use wasmedge_wasi_nn::{
    BackendError, Error, ExecutionTarget, GraphBuilder, GraphEncoding, TensorType,
};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn main() {
    let mut question = String::new();
    std::io::stdin()
        .read_to_string(&mut question)
        .expect("stdin");
    let options = r#"{"n-predict": 32, "temp": 0, "repeat-penalty": 1.0, "ctx-size": 1024}"#;
    let graph = GraphBuilder::new(GraphEncoding::Ggml, ExecutionTarget::AUTO)
        .config(options.to_string())
        .build_from_cache("default")
        .expect("load the default model");
    let mut context = graph.init_execution_context().expect("context");
    let prompt = format!(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    );
    context
        .set_input(0, TensorType::U8, &[1], prompt.as_bytes())
        .expect("set the prompt");

    context.compute().expect("compute");
    let mut buffer = vec![0u8; 4096];
    let size = context.get_output(0, &mut buffer).expect("the answer");
    let whole = text(&buffer[..size]);

    let mut pieces = Vec::new();
    loop {
        match context.compute_single() {
            Ok(()) => {}
            Err(Error::BackendError(BackendError::EndOfSequence)) => break,
            Err(error) => panic!("compute_single: {error}"),
        }
        let size = context
            .get_output_single(0, &mut buffer)
            .expect("the token");
        pieces.push(text(&buffer[..size]));
    }
    let size = context.get_output_single(1, &mut buffer).expect("usage");
    let usage = text(&buffer[..size]);
    context.fini_single().expect("fini_single");

    print!(
        "Content-Type: text/plain\n\nwhole: {whole}\nstream: {}\npieces: {}\nusage: {usage}\n",
        pieces.concat(),
        pieces.len()
    );
}
