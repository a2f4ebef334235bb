//! A WAGI program for preview 1 hosts (wasmtime's and WasmEdge's witx
//! wasi-nn): loads tests/data/tiny.onnx from its own bytes, computes
//! `y = x + x` for f32 and i64 (the graph's other inputs set too), and
//! reports each call's errno, then the errnos of calls that must fail.

use std::fmt::Write;

const TINY: &[u8] = include_bytes!("../../../data/tiny.onnx");

#[repr(C)]
struct Tensor {
    dims: *const u32,
    dims_len: u32,
    ty: u8,
    data: *const u8,
    data_len: u32,
}

#[repr(C)]
struct Builder {
    data: *const u8,
    len: u32,
}

#[link(wasm_import_module = "wasi_ephemeral_nn")]
unsafe extern "C" {
    fn load(
        builders: *const Builder,
        count: u32,
        encoding: u32,
        target: u32,
        graph: *mut u32,
    ) -> u32;
    fn load_by_name(name: *const u8, len: u32, graph: *mut u32) -> u32;
    fn init_execution_context(graph: u32, context: *mut u32) -> u32;
    fn set_input(context: u32, index: u32, tensor: *const Tensor) -> u32;
    fn compute(context: u32) -> u32;
    fn get_output(context: u32, index: u32, out: *mut u8, max: u32, written: *mut u32) -> u32;
    fn load_by_name_with_config(
        name: *const u8,
        len: u32,
        config: *const u8,
        config_len: u32,
        graph: *mut u32,
    ) -> u32;
    fn compute_single(context: u32) -> u32;
    fn get_output_single(
        context: u32,
        index: u32,
        out: *mut u8,
        max: u32,
        written: *mut u32,
    ) -> u32;
    fn fini_single(context: u32) -> u32;
    fn finalize_execution_context(context: u32) -> u32;
    fn unload(graph: u32) -> u32;
}

/// witx tensor types.
const F16: u8 = 0;
const F32: u8 = 1;
const F64: u8 = 2;
const U8: u8 = 3;
const I32: u8 = 4;
const I64: u8 = 5;

fn input(context: u32, index: u32, ty: u8, data: &[u8]) -> u32 {
    let element = match ty {
        F16 => 2,
        F32 | I32 => 4,
        F64 | I64 => 8,
        _ => 1,
    };
    let dims = [(data.len() / element) as u32];
    let tensor = Tensor {
        dims: dims.as_ptr(),
        dims_len: 1,
        ty,
        data: data.as_ptr(),
        data_len: data.len() as u32,
    };
    unsafe { set_input(context, index, &tensor) }
}

fn bytes<T: Copy, const N: usize>(values: [T; N], to: fn(T) -> Vec<u8>) -> Vec<u8> {
    values.into_iter().flat_map(to).collect()
}

/// `all-minilm-l6-v2` from the model repository, by name: "[CLS] hello
/// [SEP]" through the shared, batched pool; reports each errno and the
/// output's size.
fn minilm() -> String {
    let name = b"all-minilm-l6-v2";
    let (mut graph, mut context) = (0, 0);
    let loaded = unsafe { load_by_name(name.as_ptr(), name.len() as u32, &mut graph) };
    let init = unsafe { init_execution_context(graph, &mut context) };
    let ids = bytes([101i64, 7592, 102], |v| v.to_le_bytes().to_vec());
    let ones = bytes([1i64, 1, 1], |v| v.to_le_bytes().to_vec());
    let zeros = vec![0u8; 24];
    let dims = [1u32, 3];
    let set: Vec<String> = [ids, ones, zeros]
        .iter()
        .enumerate()
        .map(|(index, data)| {
            let tensor = Tensor {
                dims: dims.as_ptr(),
                dims_len: 2,
                ty: I64,
                data: data.as_ptr(),
                data_len: data.len() as u32,
            };
            unsafe { set_input(context, index as u32, &tensor) }.to_string()
        })
        .collect();
    let computed = unsafe { compute(context) };
    let mut buffer = vec![0u8; 8192];
    let mut written = 0;
    let output = unsafe { get_output(context, 0, buffer.as_mut_ptr(), 8192, &mut written) };
    format!(
        "Content-Type: text/plain\n\nminilm {loaded} {init} {} {computed} {output} {written}\n",
        set.join(",")
    )
}

/// WasmEdge's GGML ABI, as its LLM programs use it: the model the
/// manifest calls `default`, options as JSON, the prompt as input 0; the
/// whole answer and its usage, then the same answer token by token.
fn ggml() -> String {
    let mut out = String::from("Content-Type: text/plain\n\n");
    let name = b"default";
    let config = br#"{"n-predict": 16, "temp": 0, "repeat-penalty": 1.0, "ctx-size": 1024}"#;
    let (mut graph, mut context) = (0, 0);
    let loaded = unsafe {
        load_by_name_with_config(
            name.as_ptr(),
            name.len() as u32,
            config.as_ptr(),
            config.len() as u32,
            &mut graph,
        )
    };
    let init = unsafe { init_execution_context(graph, &mut context) };
    let prompt =
        b"<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let set = input(context, 0, U8, prompt);
    let computed = unsafe { compute(context) };
    let mut buffer = vec![0u8; 4096];
    let mut written = 0;
    let text = unsafe { get_output(context, 0, buffer.as_mut_ptr(), 4096, &mut written) };
    let whole = String::from_utf8_lossy(&buffer[..written as usize]).into_owned();
    let usage = unsafe { get_output(context, 1, buffer.as_mut_ptr(), 4096, &mut written) };
    let usage_json = String::from_utf8_lossy(&buffer[..written as usize]).into_owned();
    writeln!(out, "whole {loaded} {init} {set} {computed} {text} {whole}").unwrap();
    writeln!(out, "usage {usage} {usage_json}").unwrap();
    let mut pieces = Vec::new();
    let end = loop {
        let status = unsafe { compute_single(context) };
        if status != 0 {
            break status;
        }
        unsafe { get_output_single(context, 0, buffer.as_mut_ptr(), 4096, &mut written) };
        pieces.push(String::from_utf8_lossy(&buffer[..written as usize]).into_owned());
    };
    unsafe { get_output_single(context, 1, buffer.as_mut_ptr(), 4096, &mut written) };
    let streamed_usage = String::from_utf8_lossy(&buffer[..written as usize]).into_owned();
    let fini = unsafe { fini_single(context) };
    writeln!(
        out,
        "stream {end} {} {} {fini}",
        pieces.len(),
        pieces.concat()
    )
    .unwrap();
    writeln!(out, "stream usage {streamed_usage}").unwrap();
    let nope = b"nope";
    let bad = b"{not json";
    let mut other = 0;
    let unknown = unsafe { load_by_name(nope.as_ptr(), nope.len() as u32, &mut other) };
    let bad_config = unsafe {
        load_by_name_with_config(name.as_ptr(), 7, bad.as_ptr(), bad.len() as u32, &mut other)
    };
    let third_input = input(context, 2, U8, b"x");
    writeln!(
        out,
        "errors unknown={unknown} config={bad_config} input={third_input}"
    )
    .unwrap();
    out
}

fn main() {
    match std::env::var("QUERY_STRING").as_deref() {
        Ok("minilm") => return print!("{}", minilm()),
        Ok("ggml") => return print!("{}", ggml()),
        _ => {}
    }
    let mut out = String::from("Content-Type: text/plain\n\n");
    let builder = Builder {
        data: TINY.as_ptr(),
        len: TINY.len() as u32,
    };
    let (mut graph, mut context) = (u32::MAX, u32::MAX);
    // encoding 1: ONNX; target 0: CPU.
    writeln!(out, "load {}", unsafe {
        load(&builder, 1, 1, 0, &mut graph)
    })
    .unwrap();
    writeln!(out, "init {}", unsafe {
        init_execution_context(graph, &mut context)
    })
    .unwrap();
    let inputs = [
        (F16, vec![0x00, 0x3e, 0x00, 0xc0]),
        (F32, bytes([1.25f32, -3.0], |v| v.to_le_bytes().to_vec())),
        (F64, bytes([0.5f64, 2.0], |v| v.to_le_bytes().to_vec())),
        (U8, vec![7, 200]),
        (I32, bytes([-5i32, 1_000_000], |v| v.to_le_bytes().to_vec())),
        (I64, bytes([-7i64, 1 << 40], |v| v.to_le_bytes().to_vec())),
    ];
    let set: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(index, (ty, data))| input(context, index as u32, *ty, data).to_string())
        .collect();
    writeln!(out, "set {}", set.join(",")).unwrap();
    writeln!(out, "compute {}", unsafe { compute(context) }).unwrap();
    let mut buffer = [0u8; 64];
    let mut written = 0u32;
    let status = unsafe { get_output(context, 1, buffer.as_mut_ptr(), 64, &mut written) };
    let floats: Vec<String> = buffer[..written as usize]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()).to_string())
        .collect();
    writeln!(out, "y_fp32 {status} {}", floats.join(",")).unwrap();
    let status = unsafe { get_output(context, 5, buffer.as_mut_ptr(), 64, &mut written) };
    let longs: Vec<String> = buffer[..written as usize]
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()).to_string())
        .collect();
    writeln!(out, "y_i64 {status} {}", longs.join(",")).unwrap();

    // What must fail, and how.
    let small = unsafe { get_output(context, 1, buffer.as_mut_ptr(), 4, &mut written) };
    let missing = unsafe { get_output(context, 9, buffer.as_mut_ptr(), 64, &mut written) };
    let single = unsafe { compute_single(context) };
    let name = b"no-such-model";
    let mut other = 0;
    let unknown = unsafe { load_by_name(name.as_ptr(), name.len() as u32, &mut other) };
    let wrong_type = input(context, 1, 9, &[0; 8]);
    let encoding = unsafe { load(&builder, 1, 0, 0, &mut other) };
    let finalized = unsafe { finalize_execution_context(context) };
    let after = unsafe { compute(context) };
    let unloaded = unsafe { unload(graph) };
    let twice = unsafe { unload(graph) };
    writeln!(
        out,
        "errors small={small} missing={missing} single={single} unknown={unknown} \
         type={wrong_type} encoding={encoding} finalized={finalized} after={after} \
         unloaded={unloaded} twice={twice}"
    )
    .unwrap();
    print!("{out}");
}
