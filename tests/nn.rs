//! wasi-nn as a function sees it: the repository model, and every error
//! code the host can return for a mistake — on each ONNX engine (ONNX
//! Runtime needs its library: `./dev test` fetches it and sets
//! `GIGAFACTORY_ONNXRUNTIME`; without it those tests fail, saying so).

mod support;

use std::collections::BTreeMap;

use hyper::Method;
use support::{Server, text, wasm};

/// Runs a test body once per ONNX engine, as `<name>_on_<engine>`.
macro_rules! on_each_engine {
    ($test:ident) => {
        mod $test {
            #[tokio::test]
            async fn on_tract() {
                super::$test("tract").await
            }

            #[tokio::test]
            async fn on_onnxruntime() {
                super::$test("onnxruntime").await
            }
        }
    };
}

on_each_engine!(wasi_nn_reports_each_mistake_with_its_error_code);
on_each_engine!(models_are_listed_with_their_signature);
on_each_engine!(a_function_loads_its_own_onnx_and_computes_with_every_tensor_type);

/// A server whose ONNX models and functions' own graphs run on `engine`.
fn start(data: &std::path::Path, engine: &str) -> Server {
    Server::start_with(data, &["--onnx-engine", engine])
}

async fn wasi_nn_reports_each_mistake_with_its_error_code(engine: &str) {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), engine);
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

async fn models_are_listed_with_their_signature(engine: &str) {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), engine);
    let key = server.tenant("acme").await;
    let models = server
        .client(Some(&key))
        .api(Method::GET, "/v1/models", None)
        .await
        .unwrap();
    let minilm = &models["models"][0];
    assert_eq!(minilm["name"], "all-minilm-l6-v2");
    assert_eq!(minilm["state"], "ready");
    assert_eq!(minilm["engine"], engine, "{minilm}");
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
    let (memory, file) = (
        minilm["memory_bytes"].as_u64().unwrap(),
        minilm["size_bytes"].as_u64().unwrap(),
    );
    if engine == "tract" {
        // Weights are held as f32 once folded: about 4x the int8 file.
        assert!(memory > 2 * file, "memory {memory} for a file of {file}");
    } else {
        // ONNX Runtime keeps the int8 weights, once per session.
        assert!(memory >= file, "memory {memory} for a file of {file}");
    }
    assert_eq!(minilm["batching"]["max_batch"], 32, "{minilm}");
    assert_eq!(minilm["stats"]["calls"], 0, "{minilm}");
    assert_eq!(minilm["stats"]["queued"], 0, "{minilm}");
}

/// What `nn_load` answers: `tests/data/tiny.onnx` loaded from its own
/// bytes, each output `x + x` of one tensor type.
const EVERY_TYPE: &str = "y_fp16 FP16 [2] 004200c4\n\
                          y_fp32 FP32 [2] 2.5,-6\n\
                          y_fp64 FP64 [2] 0.2,30000000000\n\
                          y_u8 U8 [2] 14,144\n\
                          y_i32 I32 [2] -10,2000000\n\
                          y_i64 I64 [2] -14,2199023255552\n";

/// Deploys `nn_load` for acme and checks its answer.
async fn load_own_graph(server: &Server, key: &str) {
    server.deploy(key, "tiny", wasm("nn_load")).await;
    let reply = server
        .client(Some(key))
        .send(Method::GET, "/fn/acme/tiny", None, &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(text(&reply), EVERY_TYPE);
}

async fn a_function_loads_its_own_onnx_and_computes_with_every_tensor_type(engine: &str) {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), engine);
    let key = server.tenant("acme").await;
    load_own_graph(&server, &key).await;
}

#[tokio::test]
async fn a_model_toml_with_another_formats_section_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    let source = support::root().join("models/all-minilm-l6-v2");
    for (name, extra) in [
        ("mixed", "\n[generation]\nmax_sequences = 2\n"),
        ("unknown-engine", ""),
    ] {
        let dir = models.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let mut toml = std::fs::read_to_string(source.join("model.toml")).unwrap();
        if name == "unknown-engine" {
            toml = toml.replace(
                "device = \"auto\"",
                "device = \"auto\"\nengine = \"tensorrt\"",
            );
        }
        std::fs::write(dir.join("model.toml"), toml + extra).unwrap();
        std::fs::copy(source.join("model.onnx"), dir.join("model.onnx")).unwrap();
        std::fs::copy(source.join("vocab.txt"), dir.join("vocab.txt")).unwrap();
    }
    let server = Server::start_with_models(data.path(), models.path(), &[]);
    let mixed = server.model("mixed").await;
    assert_eq!(mixed["state"], "failed", "{mixed}");
    let error = mixed["error"].as_str().unwrap();
    assert!(
        error.contains("an ONNX model cannot have [generation]"),
        "{error}"
    );
    let unknown = server.model("unknown-engine").await;
    assert_eq!(unknown["state"], "failed", "{unknown}");
    let error = unknown["error"].as_str().unwrap();
    assert!(
        error
            .contains("no engine \"tensorrt\" for Onnx models (engines: auto, onnxruntime, tract)"),
        "{error}"
    );
}

#[test]
fn a_named_onnxruntime_library_that_does_not_load_stops_the_start() {
    let data = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(support::binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--onnxruntime",
            "/nonexistent/libonnxruntime.so",
        ])
        .arg("--data")
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("loading ONNX Runtime from /nonexistent/libonnxruntime.so"),
        "{stderr}"
    );
}

#[tokio::test]
async fn functions_own_graphs_may_run_on_another_engine_than_the_repository() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        data.path(),
        &[
            "--onnx-engine",
            "onnxruntime",
            "--guest-onnx-engine",
            "tract",
        ],
    );
    let key = server.tenant("acme").await;
    assert_eq!(
        server.model("all-minilm-l6-v2").await["engine"],
        "onnxruntime"
    );
    load_own_graph(&server, &key).await;
    // tract holds the graph's (absent) weights once; ONNX Runtime would
    // hold the file once per session.
    let size = std::fs::metadata(support::root().join("tests/data/tiny.onnx"))
        .unwrap()
        .len();
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(&format!(
            "gigafactory_tenant_graph_bytes{{tenant=\"acme\"}} {size}\n"
        )),
        "{metrics}"
    );
}
