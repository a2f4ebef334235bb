//! The platform end to end: deploy the example functions over HTTP, invoke
//! them over HTTP, run the real model through wasi-nn, survive a restart.

mod support;

use bytes::Bytes;
use hyper::Method;
use support::{Server, assert_error, floats, json, text, wasm};

fn reference() -> serde_json::Value {
    serde_json::from_str(include_str!("data/reference.json")).expect("reference.json")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

async fn embed_one(server: &Server, key: &str, text_in: &str) -> Vec<f32> {
    let reply = server
        .client(Some(key))
        .send(
            Method::POST,
            "/fn/acme/embed",
            Some(("text/plain", Bytes::from(text_in.to_string()))),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let body = json(&reply);
    assert_eq!(body["model"], "all-minilm-l6-v2");
    assert_eq!(body["dimensions"], 384);
    floats(&body["embedding"])
}

#[tokio::test]
async fn hello_answers_with_the_path_it_was_given() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let deployed = server.deploy(&key, "hello", wasm("hello")).await;
    assert_eq!(deployed["active_version"], 1);
    assert_eq!(deployed["url"], "/fn/acme/hello");

    let reply = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/hello/some/path?x=1", None, &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(
        text(&reply),
        "Hello from Gigafactory! You asked for /some/path?x=1\n"
    );
    assert_eq!(reply.headers["gigafactory-function-version"], "1");
    assert_eq!(reply.headers["content-type"], "text/plain; charset=utf-8");
}

#[tokio::test]
async fn embed_matches_the_onnxruntime_reference() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "embed", wasm("embed")).await;

    for case in reference()["cases"].as_array().unwrap() {
        let expected = floats(&case["embedding"]);
        let got = embed_one(&server, &key, case["text"].as_str().unwrap()).await;
        assert_eq!(got.len(), 384);
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-3,
            "{:?}: largest difference {worst}",
            case["text"]
        );
        let norm: f32 = got.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not normalised: {norm}");
    }
}

#[tokio::test]
async fn a_batch_gives_distinct_embeddings_with_sensible_similarities() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "embed", wasm("embed")).await;

    let texts = [
        "A man is playing a guitar.",
        "Someone is playing an instrument: a guitar.",
        "The stock market fell sharply this morning.",
        "Bread rises when yeast ferments the dough.",
    ];
    let body = serde_json::json!({ "texts": texts }).to_string();
    let reply = server
        .client(Some(&key))
        .send(
            Method::POST,
            "/fn/acme/embed",
            Some(("application/json", body.into())),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let embeddings: Vec<Vec<f32>> = json(&reply)["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    assert_eq!(embeddings.len(), texts.len());
    for i in 0..texts.len() {
        for j in i + 1..texts.len() {
            assert!(
                cosine(&embeddings[i], &embeddings[j]) < 0.99,
                "{i} and {j} are the same"
            );
        }
    }
    let paraphrase = cosine(&embeddings[0], &embeddings[1]);
    for unrelated in [2, 3] {
        let score = cosine(&embeddings[0], &embeddings[unrelated]);
        assert!(
            paraphrase > score + 0.2,
            "paraphrase {paraphrase} vs unrelated {score}"
        );
    }
    // Padding inside the batch must not change any text's embedding.
    for (text_in, batched) in texts.iter().zip(&embeddings) {
        let alone = embed_one(&server, &key, text_in).await;
        let worst = alone
            .iter()
            .zip(batched)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{text_in:?} differs by {worst} in a batch");
    }
}

fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{metrics}"))
}

#[tokio::test]
async fn a_restart_serves_deployed_functions_without_recompiling() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "hello", wasm("hello")).await;
    server.deploy(&key, "embed", wasm("embed")).await;
    server.stop();

    let server = Server::start(data.path());
    let client = server.client(Some(&key));
    let reply = client
        .send(Method::GET, "/fn/acme/hello", None, &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let embedding = embed_one(&server, &key, "still here after a restart").await;
    assert_eq!(embedding.len(), 384);

    let metrics = text(
        &server
            .admin()
            .send(Method::GET, "/metrics", None, &[])
            .await
            .unwrap(),
    );
    assert_eq!(
        metric(&metrics, "gigafactory_compilations_total"),
        0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "gigafactory_artifact_loads_total"),
        2,
        "{metrics}"
    );
    let listed = client
        .api(Method::GET, "/v1/functions", None)
        .await
        .unwrap();
    assert_eq!(listed["functions"].as_array().unwrap().len(), 2);
    let requests =
        "gigafactory_function_requests_total{tenant=\"acme\",function=\"hello\",outcome=\"ok\"} 1";
    assert!(metrics.contains(requests), "{metrics}");
    let refused = client
        .send(Method::GET, "/metrics", None, &[])
        .await
        .unwrap();
    assert_error(&refused, 403, "forbidden");
}

#[tokio::test]
async fn guest_output_goes_to_the_function_log_not_the_terminal() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server
        .deploy(&key, "misbehave", wasm("invoke_misbehave"))
        .await;
    let client = server.client(Some(&key));
    let reply = client
        .send(Method::GET, "/fn/acme/misbehave/log", None, &[])
        .await
        .unwrap();
    assert_eq!(text(&reply), "logged");

    let logs = client
        .api(Method::GET, "/v1/functions/misbehave/logs", None)
        .await
        .unwrap();
    let lines: Vec<(String, String)> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["stream"].as_str().unwrap().into(),
                l["line"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        lines.contains(&("stdout".into(), "to stdout".into())),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("stderr".into(), "to stderr".into())),
        "{lines:?}"
    );
    assert!(
        !server.output().contains("to stdout"),
        "guest output reached the gateway's log"
    );
}

#[tokio::test]
async fn a_trap_or_a_deadline_fails_only_that_request() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(data.path(), &["--timeout-secs", "1"]);
    let key = server.tenant("acme").await;
    server
        .deploy(&key, "misbehave", wasm("invoke_misbehave"))
        .await;
    let client = server.client(Some(&key));

    let panicked = client
        .send(Method::GET, "/fn/acme/misbehave/panic", None, &[])
        .await
        .unwrap();
    assert_error(&panicked, 500, "function_trapped");
    let looped = client
        .send(Method::GET, "/fn/acme/misbehave/loop", None, &[])
        .await
        .unwrap();
    assert_error(&looped, 504, "deadline_exceeded");

    let fine = client
        .send(Method::GET, "/fn/acme/misbehave/ok", None, &[])
        .await
        .unwrap();
    assert_eq!(text(&fine), "ok");
    let logs = client
        .api(Method::GET, "/v1/functions/misbehave/logs", None)
        .await
        .unwrap();
    let all = logs["lines"].to_string();
    assert!(
        all.contains("asked to panic"),
        "the panic message is in the log: {all}"
    );
}

#[tokio::test]
async fn past_the_instance_limit_requests_get_503() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        data.path(),
        &["--max-instances", "1", "--timeout-secs", "6"],
    );
    let key = server.tenant("acme").await;
    server
        .deploy(&key, "misbehave", wasm("invoke_misbehave"))
        .await;
    let client = server.client(Some(&key));

    let busy = tokio::spawn({
        let client = server.client(Some(&key));
        async move {
            client
                .send(Method::GET, "/fn/acme/misbehave/loop", None, &[])
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
    let refused = client
        .send(Method::GET, "/fn/acme/misbehave/ok", None, &[])
        .await
        .unwrap();
    assert_error(&refused, 503, "overloaded");
    assert_error(&busy.await.unwrap(), 504, "deadline_exceeded");
    let fine = client
        .send(Method::GET, "/fn/acme/misbehave/ok", None, &[])
        .await
        .unwrap();
    assert_eq!(text(&fine), "ok");
}

#[tokio::test]
async fn method_headers_path_and_body_reach_the_function_but_the_key_does_not() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server
        .deploy(&key, "misbehave", wasm("invoke_misbehave"))
        .await;
    let reply = server
        .client(Some(&key))
        .send(
            Method::PATCH,
            "/fn/acme/misbehave/echo/deeper?q=fox&n=1",
            Some(("text/plain", Bytes::from_static(b"payload \xe2\x9c\x93"))),
            &[("x-custom".into(), "value-1".into())],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    assert_eq!(reply.headers["x-echoed"], "yes");
    assert_eq!(
        text(&reply),
        "PATCH /echo/deeper?q=fox&n=1 x-custom=value-1 authorization=- body=payload \u{2713}"
    );
}

#[tokio::test]
async fn versions_advance_and_delete_removes_every_version() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let client = server.client(Some(&key));
    assert_eq!(
        server.deploy(&key, "fn", wasm("hello")).await["active_version"],
        1
    );
    let unchanged = server.deploy(&key, "fn", wasm("hello")).await;
    assert_eq!(
        unchanged["active_version"], 1,
        "the same wasm is not a new version"
    );
    let second = server.deploy(&key, "fn", wasm("invoke_misbehave")).await;
    assert_eq!(second["active_version"], 2);
    assert_eq!(second["versions"].as_array().unwrap().len(), 2);
    let reply = client
        .send(Method::GET, "/fn/acme/fn/ok", None, &[])
        .await
        .unwrap();
    assert_eq!(
        (
            text(&reply).as_str(),
            &reply.headers["gigafactory-function-version"]
        ),
        ("ok", &"2".parse().unwrap())
    );

    let deleted = client
        .send(Method::DELETE, "/v1/functions/fn", None, &[])
        .await
        .unwrap();
    assert_eq!(deleted.status, 204);
    assert_error(
        &client
            .send(Method::GET, "/fn/acme/fn", None, &[])
            .await
            .unwrap(),
        404,
        "not_found",
    );
    assert_error(
        &client
            .send(Method::GET, "/v1/functions/fn", None, &[])
            .await
            .unwrap(),
        404,
        "not_found",
    );
    assert_eq!(
        server.deploy(&key, "fn", wasm("hello")).await["active_version"],
        1
    );
}
