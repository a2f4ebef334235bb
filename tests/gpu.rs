//! Devices and model placement. Where there is no GPU (or the binary was
//! built without the `cuda` feature), `auto` models run on the CPU and
//! `gpu` models fail with the reason; where there is one, an ONNX model
//! placed on it runs on ONNX Runtime's CUDA execution provider (the
//! library must be `onnxruntime-gpu`'s: `GIGAFACTORY_ONNXRUNTIME`) and
//! gives the same embeddings as onnxruntime on the CPU within 1e-3. Text
//! models go to a GPU only in a build with llama.cpp's CUDA backend
//! (`llm-cuda`), and there give the reference answer.

mod support;

use std::path::Path;

use hyper::Method;
use support::{Server, floats, json, largest_difference, reference_embeddings, root, text, wasm};

const MODEL: &str = "all-minilm-l6-v2";

/// A repository with the shipped MiniLM placed by `device`.
fn repository(dir: &Path, device: &str) {
    let model = dir.join(MODEL);
    std::fs::create_dir_all(&model).unwrap();
    let shipped = root().join("models").join(MODEL);
    std::os::unix::fs::symlink(shipped.join("model.onnx"), model.join("model.onnx")).unwrap();
    std::fs::write(
        model.join("model.toml"),
        format!("format = \"onnx\"\npublic = true\ndevice = \"{device}\"\n"),
    )
    .unwrap();
}

async fn devices(server: &Server, key: &str) -> serde_json::Value {
    server
        .client(Some(key))
        .api(Method::GET, "/v1/devices", None)
        .await
        .unwrap()
}

fn gpus(devices: &serde_json::Value) -> usize {
    devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["id"].as_str().unwrap().starts_with("cuda:"))
        .count()
}

/// A server whose repository asks for MiniLM on a GPU, a tenant's key,
/// and the devices it found.
async fn start_with_a_gpu_model() -> ([tempfile::TempDir; 2], Server, String, serde_json::Value) {
    let (data, models) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    repository(models.path(), "gpu");
    let server = Server::start_with_models(data.path(), models.path(), &[]);
    let key = server.tenant("acme").await;
    let listed = devices(&server, &key).await;
    ([data, models], server, key, listed)
}

#[tokio::test]
async fn devices_are_listed_and_placement_says_where_each_model_went() {
    let (_dirs, server, key, listed) = start_with_a_gpu_model().await;
    assert_eq!(listed["devices"][0]["id"], "cpu", "{listed}");
    assert!(listed["devices"][0]["memory_total_bytes"].as_u64().unwrap() > 0);
    let unauthenticated = server
        .client(None)
        .send(Method::GET, "/v1/devices", None, &[])
        .await
        .unwrap();
    assert_eq!(unauthenticated.status, 401);

    let model = &server
        .client(Some(&key))
        .api(Method::GET, "/v1/models", None)
        .await
        .unwrap()["models"][0];
    if gpus(&listed) == 0 {
        let why = listed["cuda_unavailable"].as_str().expect("a reason");
        eprintln!("no GPU here ({why}): checking that device = \"gpu\" fails clearly");
        assert_eq!(model["state"], "failed", "{model}");
        let error = model["error"].as_str().unwrap();
        assert!(
            error.contains("device = \"gpu\"") && error.contains(why),
            "{error}"
        );
    } else {
        assert_eq!(
            model["state"], "ready",
            "with a GPU, MiniLM must load on it through ONNX Runtime's CUDA provider \
             (is GIGAFACTORY_ONNXRUNTIME onnxruntime-gpu's library?): {model}"
        );
        assert_eq!(model["device"], "cuda:0", "{model}");
        assert_eq!(model["engine"], "onnxruntime", "{model}");
        let used = listed["devices"][1]["used_bytes"].as_u64().unwrap();
        assert_eq!(used, model["memory_bytes"].as_u64().unwrap(), "{listed}");
    }
}

#[tokio::test]
async fn gpu_embeddings_equal_the_cpu_reference() {
    let (_dirs, server, key, listed) = start_with_a_gpu_model().await;
    if gpus(&listed) == 0 {
        eprintln!(
            "skipping: no GPU ({})",
            listed["cuda_unavailable"].as_str().unwrap_or("?")
        );
        return;
    }
    server.deploy(&key, "embed", wasm("embed")).await;
    for (text_in, expected, _) in reference_embeddings() {
        let reply = server
            .post(&key, "/fn/acme/embed", "text/plain", text_in.clone())
            .await;
        assert_eq!(reply.status, 200, "{}", text(&reply));
        let off = largest_difference(&floats(&json(&reply)["embedding"]), &expected);
        assert!(off < 1e-3, "{text_in:?}: GPU differs by {off}");
    }
}

/// A repository with the shipped SmolLM2 placed by `device`, loaded at boot.
fn text_repository(dir: &Path, device: &str) {
    let model = dir.join(TEXT_MODEL);
    std::fs::create_dir_all(&model).unwrap();
    let shipped = root().join("models").join(TEXT_MODEL);
    std::os::unix::fs::symlink(shipped.join("model.gguf"), model.join("model.gguf")).unwrap();
    std::fs::write(
        model.join("model.toml"),
        format!(
            "format = \"gguf\"\nfile = \"model.gguf\"\npublic = true\ndevice = \"{device}\"\n\
             [generation]\nmax_sequences = 2\ncontext_tokens = 512\n"
        ),
    )
    .unwrap();
}

const TEXT_MODEL: &str = "smollm2-135m-instruct";

#[tokio::test]
async fn text_models_go_to_a_gpu_only_in_an_llm_cuda_build() {
    let (data, models) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    text_repository(models.path(), "gpu");
    let server = Server::start_with_models(data.path(), models.path(), &[]);
    let key = server.tenant("acme").await;
    let listed = devices(&server, &key).await;
    let model = &server
        .client(Some(&key))
        .api(Method::GET, "/v1/models", None)
        .await
        .unwrap()["models"][0];
    if !cfg!(feature = "llm-cuda") {
        eprintln!("built without llm-cuda: checking that device = \"gpu\" fails clearly");
        assert_eq!(model["state"], "failed", "{model}");
        let error = model["error"].as_str().unwrap();
        assert!(error.contains("llm-cuda"), "{error}");
        return;
    }
    if gpus(&listed) == 0 {
        eprintln!("no GPU here: checking that device = \"gpu\" fails clearly");
        assert_eq!(model["state"], "failed", "{model}");
        return;
    }
    assert_eq!(model["state"], "ready", "{model}");
    assert_eq!(model["device"], "cuda:0", "{model}");
    let chat = serde_json::json!({
        "model": TEXT_MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "temperature": 0,
    });
    let reply = server
        .post(
            &key,
            "/openai/v1/chat/completions",
            "application/json",
            chat.to_string(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(
        json(&reply)["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
}
