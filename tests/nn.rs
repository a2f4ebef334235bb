//! wasi-nn as a function sees it: the repository model, and every error
//! code the host can return for a mistake.

mod support;

use std::collections::BTreeMap;

use hyper::Method;
use support::{Server, text, wasm};

#[tokio::test]
async fn wasi_nn_reports_each_mistake_with_its_error_code() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "probe", wasm("nn_errors")).await;
    let reply = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/probe", None, &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let outcomes: BTreeMap<String, String> = text(&reply)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(case, outcome)| {
            let code = outcome.split(' ').next().unwrap_or_default();
            (case.to_string(), code.to_string())
        })
        .collect();
    let expected: BTreeMap<String, String> = [
        ("unknown-model", "notfound"),
        ("wrong-encoding", "invalidencoding"),
        ("garbage-onnx", "invalidencoding"),
        ("tpu-target", "unsupportedoperation"),
        ("valid", "ok"),
        ("missing-input", "invalidargument"),
        ("unknown-input", "invalidargument"),
        ("wrong-type", "invalidargument"),
        ("wrong-length", "invalidargument"),
        ("wrong-rank", "invalidargument"),
        ("bf16", "unsupportedoperation"),
        ("out-of-range-index", "runtimeerror"),
        ("after-a-failure", "ok"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(outcomes, expected, "{}", text(&reply));
}

#[tokio::test]
async fn models_are_listed_with_their_signature() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let models = server
        .client(Some(&key))
        .api(Method::GET, "/v1/models", None)
        .await
        .unwrap();
    let minilm = &models["models"][0];
    assert_eq!(minilm["name"], "all-minilm-l6-v2");
    assert_eq!(minilm["state"], "ready");
    let devices = server
        .client(Some(&key))
        .api(Method::GET, "/v1/devices", None)
        .await
        .unwrap();
    let has_gpu = devices["devices"].as_array().unwrap().len() > 1;
    assert_eq!(minilm["device"], if has_gpu { "cuda:0" } else { "cpu" });
    let inputs: Vec<&str> = minilm["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["input_ids", "attention_mask", "token_type_ids"]);
    assert_eq!(minilm["inputs"][0]["type"], "I64");
    assert_eq!(minilm["outputs"][0]["name"], "last_hidden_state");
    assert_eq!(minilm["outputs"][0]["type"], "FP32");
    assert_eq!(minilm["outputs"][0]["shape"][2], 384);
    // Weights are held as f32 once folded: about 4x the int8 file.
    let (memory, file) = (
        minilm["memory_bytes"].as_u64().unwrap(),
        minilm["size_bytes"].as_u64().unwrap(),
    );
    assert!(memory > 2 * file, "memory {memory} for a file of {file}");
    assert_eq!(minilm["batching"]["max_batch"], 32, "{minilm}");
    assert_eq!(minilm["stats"]["calls"], 0, "{minilm}");
    assert_eq!(minilm["stats"]["queued"], 0, "{minilm}");
}

#[tokio::test]
async fn a_function_loads_its_own_onnx_and_computes_with_every_tensor_type() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "tiny", wasm("nn_load")).await;
    let reply = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/tiny", None, &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(
        text(&reply),
        "y_fp16 FP16 [2] 004200c4\n\
         y_fp32 FP32 [2] 2.5,-6\n\
         y_fp64 FP64 [2] 0.2,30000000000\n\
         y_u8 U8 [2] 14,144\n\
         y_i32 I32 [2] -10,2000000\n\
         y_i64 I64 [2] -14,2199023255552\n"
    );
}
