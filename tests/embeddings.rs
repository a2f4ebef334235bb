//! Sentence embeddings computed by the host: `gigafactory:ai` `embed` from
//! a function, and `POST /openai/v1/embeddings` with the official `openai`
//! Python client (`GIGAFACTORY_TEST_PYTHON`, set up by `./dev test`).
//! Both must match onnxruntime's reference vectors and the `embed`
//! example, which tokenises in the sandbox and calls wasi-nn itself.

mod support;

use bytes::Bytes;
use hyper::Method;
use support::{
    Reply, Server, assert_error, floats, json, largest_difference, reference_embeddings,
    run_python, text, wasm,
};

const MODEL: &str = "all-minilm-l6-v2";

async fn embed_via_function(server: &Server, key: &str, model: &str, texts: &[&str]) -> Reply {
    server
        .client(Some(key))
        .send(
            Method::POST,
            "/fn/acme/ai-embed",
            Some(("text/plain", Bytes::from(texts.join("\n")))),
            &[("x-model".to_string(), model.to_string())],
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn a_function_embeds_through_the_host_as_the_reference_does() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "ai-embed", wasm("ai_embed")).await;
    server.deploy(&key, "embed", wasm("embed")).await;
    let cases = reference_embeddings();

    // All three texts (12 to 19 tokens) in one call: padded together.
    let texts: Vec<&str> = cases.iter().map(|(t, _, _)| t.as_str()).collect();
    let reply = embed_via_function(&server, &key, MODEL, &texts).await;
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let body = json(&reply);
    let tokens: usize = cases.iter().map(|(_, _, n)| n).sum();
    assert_eq!(body["prompt_tokens"], tokens, "{body}");
    let vectors = body["vectors"].as_array().unwrap();
    assert_eq!(vectors.len(), cases.len());
    for ((text_in, expected, _), vector) in cases.iter().zip(vectors) {
        let got = floats(vector);
        assert_eq!(got.len(), 384);
        let off = largest_difference(&got, expected);
        assert!(off < 1e-3, "{text_in:?} vs onnxruntime: {off}");
        // The example tokenises in the sandbox and runs the model alone.
        let reply = server
            .post(&key, "/fn/acme/embed", "text/plain", text_in.clone())
            .await;
        assert_eq!(reply.status, 200, "{}", text(&reply));
        let guest = floats(&json(&reply)["embedding"]);
        let off = largest_difference(&got, &guest);
        assert!(off < 1e-4, "{text_in:?} vs the wasi-nn example: {off}");
    }
}

#[tokio::test]
async fn embed_refuses_what_it_cannot_do() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "ai-embed", wasm("ai_embed")).await;

    let unknown = embed_via_function(&server, &key, "no-such-model", &["hi"]).await;
    assert_error(&unknown, 404, "model_not_found");
    let text_model = embed_via_function(&server, &key, "smollm2-135m-instruct", &["hi"]).await;
    assert_error(&text_model, 400, "invalid_request");
    assert!(
        text(&text_model).contains("does not make sentence embeddings"),
        "{}",
        text(&text_model)
    );
    let none = embed_via_function(&server, &key, MODEL, &[]).await;
    assert_error(&none, 400, "invalid_request");
    let many = vec!["a"; 2049];
    let too_many = embed_via_function(&server, &key, MODEL, &many).await;
    assert_error(&too_many, 400, "invalid_request");

    // A function whose manifest names another model is denied this one.
    let bundle = gigafactory_gateway::bundle::Bundle::pack(
        &wasm("ai_embed"),
        Some("models = [\"smollm2-135m-instruct\"]"),
        &[],
    )
    .unwrap();
    let deployed = server.deploy_bundle(&key, "ai-embed", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    let denied = embed_via_function(&server, &key, MODEL, &["hi"]).await;
    assert_error(&denied, 403, "model_denied");
}

#[tokio::test]
async fn the_openai_client_gets_the_reference_embeddings() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let cases = reference_embeddings();
    let mut args = vec![format!("{}/openai/v1", server.url), key, MODEL.to_string()];
    args.extend(cases.iter().map(|(t, _, _)| t.clone()));
    let report = run_python("openai_embeddings.py", args).await;
    let batch = &report["batch"];
    assert_eq!(batch["model"], MODEL);
    assert_eq!(batch["indices"], serde_json::json!([0, 1, 2]));
    let tokens: usize = cases.iter().map(|(_, _, n)| n).sum();
    assert_eq!(batch["prompt_tokens"], tokens, "{batch}");
    assert_eq!(batch["total_tokens"], tokens);
    for ((text_in, expected, _), vector) in cases.iter().zip(batch["vectors"].as_array().unwrap()) {
        let off = largest_difference(&floats(vector), expected);
        assert!(off < 1e-3, "{text_in:?} (base64) vs onnxruntime: {off}");
    }
    let off = largest_difference(&floats(&report["single"]), &cases[0].1);
    assert!(off < 1e-3, "float encoding vs onnxruntime: {off}");
    assert_eq!(report["unknown_model"], 404);
}

#[tokio::test]
async fn the_embeddings_endpoint_checks_its_input_keys_and_quotas() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let path = "/openai/v1/embeddings";
    let post = |token: Option<String>, body: serde_json::Value| {
        let client = server.client(token.as_deref());
        async move {
            client
                .send(
                    Method::POST,
                    path,
                    Some(("application/json", Bytes::from(body.to_string()))),
                    &[],
                )
                .await
                .unwrap()
        }
    };
    let me = || Some(key.clone());

    let one = post(me(), serde_json::json!({"model": MODEL, "input": "hello"})).await;
    assert_eq!(one.status, 200, "{}", text(&one));
    let body = json(&one);
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["object"], "embedding");
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 384);
    assert_eq!(body["usage"]["prompt_tokens"], 3, "[CLS] hello [SEP]");
    // A text past the model's 256 tokens is truncated, whatever its size.
    let huge = "!".repeat(4 << 20);
    let truncated = post(me(), serde_json::json!({"model": MODEL, "input": huge})).await;
    assert_eq!(truncated.status, 200, "{}", text(&truncated));
    assert_eq!(json(&truncated)["usage"]["prompt_tokens"], 256);

    // Ids of the model's own vocabulary embed as the text they encode.
    let ids = post(
        me(),
        serde_json::json!({"model": MODEL, "input": [101, 7592, 102]}),
    )
    .await;
    assert_eq!(ids.status, 200, "{}", text(&ids));
    assert_eq!(json(&ids)["usage"]["prompt_tokens"], 3);
    let (from_text, from_ids) = (
        &body["data"][0]["embedding"],
        &json(&ids)["data"][0]["embedding"],
    );
    for (a, b) in from_text
        .as_array()
        .unwrap()
        .iter()
        .zip(from_ids.as_array().unwrap())
    {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5);
    }
    let lists = post(
        me(),
        serde_json::json!({"model": MODEL, "input": [[101, 7592, 102], [101, 102]]}),
    )
    .await;
    assert_eq!(lists.status, 200, "{}", text(&lists));
    assert_eq!(json(&lists)["data"].as_array().unwrap().len(), 2);
    assert_eq!(json(&lists)["usage"]["prompt_tokens"], 5);

    let cases = [
        (
            serde_json::json!({"model": MODEL, "input": [101, 999_999, 102]}),
            "not in the model's vocabulary",
        ),
        (
            serde_json::json!({"model": MODEL, "input": vec![101; 300]}),
            "1 to 256 token ids",
        ),
        (
            serde_json::json!({"model": MODEL, "input": [101, "hello"]}),
            "token ids",
        ),
        (
            serde_json::json!({"model": MODEL, "input": []}),
            "at least one",
        ),
        (
            serde_json::json!({"model": MODEL, "input": {"text": "hi"}}),
            "a string, a list",
        ),
        (
            serde_json::json!({"model": MODEL, "input": "hi", "dimensions": 128}),
            "384-dimensional",
        ),
        (
            serde_json::json!({"model": MODEL, "input": "hi", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (
            serde_json::json!({"model": "smollm2-135m-instruct", "input": "hi"}),
            "does not make sentence embeddings",
        ),
        (serde_json::json!({"input": "hi"}), "model"),
    ];
    for (request, why) in cases {
        let refused = post(me(), request.clone()).await;
        assert_error(&refused, 400, "invalid_request");
        assert!(
            text(&refused).contains(why),
            "{request}: {}",
            text(&refused)
        );
    }
    let unknown = post(me(), serde_json::json!({"model": "gpt-9", "input": "hi"})).await;
    assert_error(&unknown, 404, "model_not_found");
    let anonymous = post(None, serde_json::json!({"model": MODEL, "input": "hi"})).await;
    assert_error(&anonymous, 401, "unauthorized");
    let listed = server
        .client(me().as_deref())
        .send(Method::GET, path, None, &[])
        .await
        .unwrap();
    assert_error(&listed, 405, "method_not_allowed");

    // Compute is charged to the tenant: with a tiny compute quota, the
    // first call spends it and the next is refused until it expires.
    server
        .set_quota(
            "acme",
            serde_json::json!({"compute_seconds_per_minute": 0.001}),
        )
        .await;
    let spent = post(me(), serde_json::json!({"model": MODEL, "input": "hello"})).await;
    assert_eq!(spent.status, 200, "{}", text(&spent));
    let refused = post(me(), serde_json::json!({"model": MODEL, "input": "hello"})).await;
    assert_error(&refused, 429, "too_many_requests");
    assert!(refused.headers.contains_key("retry-after"));

    // A quota without the model hides it.
    server
        .set_quota(
            "acme",
            serde_json::json!({"models": ["smollm2-135m-instruct"]}),
        )
        .await;
    let hidden = post(me(), serde_json::json!({"model": MODEL, "input": "hi"})).await;
    assert_error(&hidden, 404, "model_not_found");
}

/// The vectors `ai-embed` returns for `texts`, in one call.
async fn vectors(server: &Server, key: &str, texts: &[&str]) -> Vec<Vec<f32>> {
    let reply = embed_via_function(server, key, MODEL, texts).await;
    assert_eq!(reply.status, 200, "{}", text(&reply));
    json(&reply)["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect()
}

#[tokio::test]
async fn both_onnx_engines_agree_with_each_other_and_batched_with_alone() {
    let cases = reference_embeddings();
    let texts: Vec<&str> = cases.iter().map(|(t, _, _)| t.as_str()).collect();
    let mut per_engine = Vec::new();
    for engine in ["tract", "onnxruntime"] {
        let data = tempfile::tempdir().unwrap();
        let server = Server::start_with(data.path(), &["--onnx-engine", engine]);
        let key = server.tenant("acme").await;
        server.deploy(&key, "ai-embed", wasm("ai_embed")).await;
        // All texts in one call: one batch, padded to the longest.
        let batched = vectors(&server, &key, &texts).await;
        for ((text_in, expected, _), together) in cases.iter().zip(&batched) {
            let off = largest_difference(together, expected);
            assert!(
                off < 1e-3,
                "{engine}: {text_in:?} vs onnxruntime in Python: {off}"
            );
            let alone = vectors(&server, &key, &[text_in.as_str()]).await.remove(0);
            let off = largest_difference(together, &alone);
            assert!(off < 1e-4, "{engine}: {text_in:?} batched vs alone: {off}");
        }
        per_engine.push(batched);
    }
    for (index, (tract, onnxruntime)) in per_engine[0].iter().zip(&per_engine[1]).enumerate() {
        let off = largest_difference(tract, onnxruntime);
        assert!(off < 1e-4, "text {index}: tract vs onnxruntime: {off}");
    }
}
