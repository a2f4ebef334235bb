//! Text generation through a function: the `chat` example streams
//! SmolLM2's answer as server-sent events through wasi:http while the model
//! decodes it on the host; a client that leaves frees its sequence.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use support::{Server, assert_error, text, wasm};

const MODEL: &str = "smollm2-135m-instruct";
/// The system message the reference answers are given with (without one,
/// the model's template adds its own default, which steers this small
/// model elsewhere).
const SYSTEM: &str = "You are a helpful assistant.";

fn chat(question: &str, extra: serde_json::Value) -> Bytes {
    let mut body = serde_json::json!({
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Bytes::from(body.to_string())
}

/// The `(event, data)` pairs of a server-sent event stream.
fn events(stream: &str) -> Vec<(String, serde_json::Value)> {
    stream
        .split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = "message".to_string();
            let mut data = serde_json::Value::Null;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_string();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(value).unwrap();
                }
            }
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn chat_streams_the_reference_answer_as_server_sent_events() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "chat", wasm("chat")).await;
    let reply = server
        .client(Some(&key))
        .send(
            Method::POST,
            "/fn/acme/chat",
            Some((
                "application/json",
                chat("What is the capital of France?", serde_json::json!({})),
            )),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(reply.headers["content-type"], "text/event-stream");
    let events = events(&text(&reply));
    let answer: String = events
        .iter()
        .filter(|(name, _)| name == "message")
        .map(|(_, data)| data["text"].as_str().unwrap())
        .collect();
    assert_eq!(answer, "The capital of France is Paris.");
    let (name, usage) = events.last().unwrap();
    assert_eq!(name, "done");
    assert_eq!(usage["finish_reason"], "stop");
    assert_eq!(usage["completion_tokens"], 7);

    let model = server.model(MODEL).await;
    assert_eq!(model["state"], "ready", "{model}");
    assert_eq!(model["generation"]["completion_tokens"], 7, "{model}");
    assert_eq!(model["generation"]["active"], 0, "{model}");
}

#[tokio::test]
async fn tokens_arrive_while_generating_and_a_client_that_leaves_frees_its_sequence() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "chat", wasm("chat")).await;

    let (response, connection) = support::post_on_own_connection(
        &server,
        &key,
        "/fn/acme/chat",
        chat(
            "Tell me a long story about a dragon and a knight.",
            serde_json::json!({"max_tokens": 500}),
        ),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = loop {
        let frame = body.frame().await.expect("a frame").unwrap();
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            break String::from_utf8(data.to_vec()).unwrap();
        }
    };
    assert!(first.starts_with("data: {\"text\":"), "{first}");
    let model = server.model(MODEL).await;
    assert_eq!(
        model["generation"]["active"], 1,
        "the first token reached the client while generation goes on: {model}"
    );

    // The client leaves mid-stream.
    drop(body);
    drop(connection);
    for _ in 0..300 {
        let model = server.model(MODEL).await;
        if model["generation"]["active"] == 0 {
            assert_eq!(model["generation"]["cancelled"], 1, "{model}");
            assert!(
                model["generation"]["completion_tokens"].as_u64().unwrap() < 500,
                "{model}"
            );
            let metrics = server.metrics().await;
            for line in [
                format!("gigafactory_text_active_sequences{{model=\"{MODEL}\"}} 0"),
                format!("gigafactory_text_cancellations_total{{model=\"{MODEL}\"}} 1"),
            ] {
                assert!(metrics.lines().any(|l| l == line), "no {line}:\n{metrics}");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the sequence of a client that left is still active");
}

#[tokio::test]
async fn bad_chats_and_forbidden_models_get_clear_errors() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "chat", wasm("chat")).await;
    let post = |body: Bytes| {
        let client = server.client(Some(&key));
        async move {
            client
                .send(
                    Method::POST,
                    "/fn/acme/chat",
                    Some(("application/json", body)),
                    &[],
                )
                .await
                .unwrap()
        }
    };
    let hi = |extra| chat("Hi", extra);
    assert_error(
        &post(hi(serde_json::json!({"max_tokens": 0}))).await,
        400,
        "invalid_request",
    );
    assert_error(
        &post(hi(serde_json::json!({"temperature": 5.0}))).await,
        400,
        "invalid_request",
    );
    assert_error(
        &post(hi(serde_json::json!({"top_p": 0.0}))).await,
        400,
        "invalid_request",
    );
    assert_error(
        &post(Bytes::from_static(b"{\"messages\": 3}")).await,
        400,
        "bad_request",
    );

    // A tenant whose quota does not include the model does not see it.
    server
        .set_quota("acme", serde_json::json!({"models": ["all-minilm-l6-v2"]}))
        .await;
    assert_error(
        &post(hi(serde_json::json!({}))).await,
        404,
        "model_not_found",
    );
}

/// One greedy OpenAI chat completion of `model`: its answer.
async fn answer(server: &Server, key: &str, model: &str) -> Result<String, String> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    });
    let reply = server
        .client(Some(key))
        .send(
            Method::POST,
            "/openai/v1/chat/completions",
            Some(("application/json", Bytes::from(body.to_string()))),
            &[],
        )
        .await
        .map_err(|e| format!("{e:#}"))?;
    if reply.status != 200 {
        return Err(format!("{}: {}", reply.status, text(&reply)));
    }
    let body = support::json(&reply);
    Ok(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string())
}

fn adapter_toml(scale: f32, public: bool) -> String {
    format!(
        "format = \"gguf\"\nfile = \"adapter.gguf\"\npublic = {public}\n\
         [lora]\nbase = \"{MODEL}\"\nscale = {scale}\n"
    )
}

#[tokio::test]
async fn lora_adapters_answer_differently_from_their_base_while_all_run() {
    let data = tempfile::tempdir().unwrap();
    let server = std::sync::Arc::new(Server::start(data.path()));
    let adapter = std::fs::read(support::root().join("tests/data/lora/adapter.gguf")).unwrap();
    let admin = support::ADMIN_TOKEN;
    let files = [("adapter.gguf", adapter.as_slice())];
    let toml = adapter_toml(1.0, true);
    let added = support::add_model(&server, admin, "noisy", &files, Some(&toml)).await;
    assert_eq!(added.status, 201, "{}", text(&added));
    let key = server.tenant("acme").await;

    // The base and its adapter, three generations each, all at once.
    let asked: Vec<_> = [MODEL, "noisy", MODEL, "noisy", MODEL, "noisy"]
        .into_iter()
        .map(|model| {
            let (server, key) = (server.clone(), key.clone());
            tokio::spawn(async move { (model, answer(&server, &key, model).await) })
        })
        .collect();
    let mut answers = std::collections::BTreeMap::<&str, Vec<String>>::new();
    for asked in asked {
        let (model, answered) = asked.await.unwrap();
        answers.entry(model).or_default().push(answered.unwrap());
    }
    eprintln!("{answers:?}");
    let base = &answers[MODEL];
    let noisy = &answers["noisy"];
    assert!(
        base.iter().all(|a| a == "The capital of France is Paris."),
        "{base:?}"
    );
    assert!(
        noisy.iter().all(|a| a == &noisy[0]),
        "greedy answers vary: {noisy:?}"
    );
    assert_ne!(noisy[0], base[0]);
    let listed = server.model("noisy").await;
    assert_eq!(listed["lora"]["base"], MODEL, "{listed}");
    assert_eq!(listed["generation"]["started"], 3, "{listed}");
    assert_eq!(listed["memory_bytes"], 0, "{listed}");
    assert_eq!(server.model(MODEL).await["generation"]["started"], 3);

    // Added while the base is loaded: the base loads again, with it.
    let toml = adapter_toml(0.3, true);
    let added = support::add_model(&server, admin, "mild", &files, Some(&toml)).await;
    assert_eq!(added.status, 201, "{}", text(&added));
    let mild = answer(&server, &key, "mild").await.unwrap();
    assert!(mild != base[0] && mild != noisy[0], "{mild}");
    assert_eq!(answer(&server, &key, "noisy").await.unwrap(), noisy[0]);
    assert_eq!(answer(&server, &key, MODEL).await.unwrap(), base[0]);

    let selfish = "format = \"gguf\"\nfile = \"adapter.gguf\"\n[lora]\nbase = \"selfish\"\n";
    let refused = support::add_model(&server, admin, "selfish", &files, Some(selfish)).await;
    assert_error(&refused, 400, "invalid_config");

    // An adapter reaches its base's weights: a tenant that may not use
    // the base may not use the adapter either.
    let limited = server.tenant("limited").await;
    server
        .set_quota("limited", serde_json::json!({"models": ["noisy"]}))
        .await;
    let refused = answer(&server, &limited, "noisy").await.unwrap_err();
    assert!(refused.starts_with("404"), "{refused}");
    // A tenant's private adapter on the operator's base.
    server
        .set_quota("acme", serde_json::json!({"max_model_bytes": 1_000_000}))
        .await;
    let private = support::add_model(
        &server,
        &key,
        "mine",
        &files,
        Some(&adapter_toml(1.0, false)),
    )
    .await;
    assert_eq!(private.status, 201, "{}", text(&private));
    assert_eq!(answer(&server, &key, "mine").await.unwrap(), noisy[0]);
    let hidden = answer(&server, &limited, "mine").await.unwrap_err();
    assert!(hidden.starts_with("404"), "{hidden}");
}
