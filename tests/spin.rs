//! `fermyon:spin/llm@2.0.0`: a component built with the Spin SDK's `llm`
//! module (tests/guests/spin_llm, unchanged Spin code) runs here, over the
//! same engines as `gigafactory:ai`.

mod support;

use support::{Reply, Server, floats, json, largest_difference, reference_embeddings, text, wasm};

/// SmolLM2's chat template around the reference question (../MODELS.md).
const PROMPT: &str =
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

async fn post(server: &Server, key: &str, route: &str, body: &str) -> Reply {
    server
        .post(
            key,
            &format!("/fn/acme/spin{route}"),
            "text/plain",
            body.to_string(),
        )
        .await
}

#[tokio::test]
async fn a_spin_sdk_component_infers_and_embeds() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "spin", wasm("spin_llm")).await;

    let greedy = post(&server, &key, "/infer", PROMPT).await;
    assert_eq!(greedy.status, 200, "{}", text(&greedy));
    let body = json(&greedy);
    assert_eq!(body["text"], "The capital of France is Paris.", "{body}");
    assert_eq!(body["generated_tokens"], 7);
    assert!(body["prompt_tokens"].as_u64().unwrap() > 10, "{body}");

    // Without parameters: Spin's defaults (sampled, at most 100 tokens).
    let sampled = post(&server, &key, "/infer-defaults", "Once upon a time").await;
    assert_eq!(sampled.status, 200, "{}", text(&sampled));
    let generated = json(&sampled)["generated_tokens"].as_u64().unwrap();
    assert!((1..=100).contains(&generated), "{generated} tokens");

    let cases = reference_embeddings();
    let lines: Vec<&str> = cases
        .iter()
        .map(|(text_in, _, _)| text_in.as_str())
        .collect();
    let embedded = post(&server, &key, "/embed", &lines.join("\n")).await;
    assert_eq!(embedded.status, 200, "{}", text(&embedded));
    let body = json(&embedded);
    let tokens: usize = cases.iter().map(|(_, _, n)| n).sum();
    assert_eq!(body["prompt_tokens"], tokens);
    for ((text_in, expected, _), vector) in cases.iter().zip(body["vectors"].as_array().unwrap()) {
        let off = largest_difference(&floats(vector), expected);
        assert!(off < 1e-3, "{text_in:?}: differs from onnxruntime by {off}");
    }
}

#[tokio::test]
async fn models_outside_the_quota_are_not_supported() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "spin", wasm("spin_llm")).await;
    server
        .set_quota("acme", serde_json::json!({"models": ["all-minilm-l6-v2"]}))
        .await;
    let hidden = post(&server, &key, "/infer", PROMPT).await;
    assert_eq!(hidden.status, 500);
    assert!(
        text(&hidden).contains("ModelNotSupported"),
        "{}",
        text(&hidden)
    );
    let allowed = post(&server, &key, "/embed", "still allowed").await;
    assert_eq!(allowed.status, 200, "{}", text(&allowed));
}
