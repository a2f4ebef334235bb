//! Operating the gateway: the HTTP layer (methods, 404/405, HEAD, request
//! ids), access logs and request metrics, log formats, and the drain on
//! SIGTERM, on the real binary over HTTP.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use gigafactory_gateway::cli::Client;
use hyper::Method;
use support::{Server, assert_error, text};

/// Waits for a log line of `server` that `wanted` accepts.
async fn log_line(
    server: &Server,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..100 {
        let found = server
            .output()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| wanted(line));
        if let Some(line) = found {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no such log line in:\n{}", server.output());
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_methods_request_ids_and_access_logs() {
    let data = tempfile::tempdir().unwrap();
    let flags = [
        "--log-format",
        "json",
        "--metrics-token",
        "prometheus-reads-this",
    ];
    let server = Server::start_without_models_with(data.path(), &flags);
    let key = server.tenant("acme").await;
    let client = server.client(Some(&key));

    // HEAD answers as GET does, without a body.
    let head = client
        .send(Method::HEAD, "/healthz", None, &[])
        .await
        .unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "{}", text(&head));

    // A known path with another method: 405 naming what is allowed.
    let wrong = client
        .send(Method::DELETE, "/v1/functions", None, &[])
        .await
        .unwrap();
    assert_error(&wrong, 405, "method_not_allowed");
    let allow = wrong.headers["allow"].to_str().unwrap().to_string();
    assert!(allow.contains("GET"), "{allow}");
    let unknown = client
        .send(Method::GET, "/v2/functions", None, &[])
        .await
        .unwrap();
    assert_error(&unknown, 404, "not_found");

    // Every answer has an id; a client's own is kept.
    let id = unknown.headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 16, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let traced = [("x-request-id".to_string(), "trace-me-7".to_string())];
    let listed = client
        .send(Method::GET, "/v1/functions", None, &traced)
        .await
        .unwrap();
    assert_eq!(listed.status, 200, "{}", text(&listed));
    assert_eq!(listed.headers["x-request-id"], "trace-me-7");
    // One that would bloat or garble every log line is replaced.
    let bloated = [("x-request-id".to_string(), "x".repeat(500))];
    let replaced = client
        .send(Method::GET, "/healthz", None, &bloated)
        .await
        .unwrap();
    assert_eq!(replaced.headers["x-request-id"].len(), 16);

    // The access log: one JSON object per request, with who, what and how long.
    let line = log_line(&server, |line| line["request_id"] == "trace-me-7").await;
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["tenant"], "acme", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["route"], "/v1/functions", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["bytes"], listed.body.len() as u64, "{line}");
    assert!(line["total_ms"].as_f64().unwrap() >= 0.0, "{line}");
    // Lines logged while a request is handled carry its id.
    let created = log_line(&server, |line| line["message"] == "tenant created").await;
    let within = created["span"]["request_id"].as_str().unwrap_or_default();
    assert_eq!(within.len(), 16, "{created}");
    let refused = log_line(&server, |line| line["status"] == 405).await;
    assert_eq!(refused["path"], "/v1/functions", "{refused}");
    assert!(!server.output().contains('\u{1b}'), "colours in a log file");

    // Request metrics by route template, for every part of the API, the
    // process's and the build's, for a token that reads nothing else.
    let prometheus = server.client(Some("prometheus-reads-this"));
    let scraped = prometheus
        .send(Method::GET, "/metrics", None, &[])
        .await
        .unwrap();
    assert_eq!(scraped.status, 200, "{}", text(&scraped));
    let metrics = text(&scraped);
    let elsewhere = prometheus
        .send(Method::GET, "/v1/tenants", None, &[])
        .await
        .unwrap();
    assert_error(&elsewhere, 401, "unauthorized");
    for series in [
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "gigafactory_build_info{version=\"",
        "gigafactory_http_requests_total{route=\"/v1/functions\",method=\"GET\",status=\"200\"} 1",
        "gigafactory_http_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"} 1",
        "gigafactory_http_request_duration_seconds_count{route=\"/v1/functions\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}

/// The small text model's name.
const TEXT_MODEL: &str = "smollm2-135m-instruct";

/// A streamed chat completion that runs for long: end-of-text banned.
fn long_chat() -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": TEXT_MODEL,
            "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 1900,
            "stream": true,
            "logit_bias": {"0": -100, "2": -100},
        })
        .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_without_losing_an_accepted_request() {
    let models = tempfile::tempdir().unwrap();
    let shipped = support::root().join("models").join(TEXT_MODEL);
    std::os::unix::fs::symlink(
        shipped.canonicalize().unwrap(),
        models.path().join(TEXT_MODEL),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with_models(data.path(), models.path(), &["--drain-secs", "3"]);
    let key = server.tenant("acme").await;
    server
        .deploy(&key, "probe", support::wasm("manifest_probe"))
        .await;
    let client = server.client(Some(&key));

    // In flight at the signal: a log follow, a generation that would run
    // for minutes, and requests that finish within the grace.
    let follow = client
        .open(
            Method::GET,
            "/v1/functions/probe/logs?follow=true",
            None,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    let chat = client
        .open(
            Method::POST,
            "/openai/v1/chat/completions",
            Some(("application/json", long_chat())),
            &[],
        )
        .await
        .unwrap();
    if chat.status() != 200 {
        panic!("{}: {}", chat.status(), chat.text().await.unwrap());
    }
    let mut chat = chat.bytes_stream();
    let first = chat.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    let slow: Vec<_> = (0..4)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let path = format!("/fn/acme/probe/sleep?ms={}", 1000 + 200 * i);
                client.send(Method::GET, &path, None, &[]).await.unwrap()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signal = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(signal.success());

    // At once: not ready, and new requests are refused with a retry hint.
    let mut refused = None;
    for _ in 0..100 {
        // (A pooled connection the server closes meanwhile is an error to retry.)
        let ready = client.send(Method::GET, "/readyz", None, &[]).await;
        if ready.is_ok_and(|ready| ready.status == 503)
            && let Ok(again) = client.send(Method::GET, "/v1/functions", None, &[]).await
        {
            refused = Some(again);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = refused.expect("/readyz never answered 503");
    assert_error(&refused, 503, "draining");
    assert_eq!(refused.headers["retry-after"], "1");

    // The follow ends cleanly; every accepted request is answered.
    let lines = tokio::time::timeout(Duration::from_secs(5), follow.bytes())
        .await
        .expect("the follow did not end");
    lines.expect("the follow ended in an error");
    for request in slow {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 200, "{}", text(&reply));
    }

    // The generation, still running at the end of the grace, ends with
    // an error event rather than a cut chunk.
    let mut rest = Vec::new();
    while let Some(chunk) = chat.next().await {
        rest.extend_from_slice(&chunk.expect("the stream was cut"));
    }
    let rest = String::from_utf8(rest).unwrap();
    let last = rest.trim_end().lines().last().unwrap().to_string();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "shutting_down", "{last}");
    server.stop();
}

/// A self-signed certificate for 127.0.0.1 written to `dir`: (cert, key) paths.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let issued =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, issued.cert.pem()).unwrap();
    std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_the_cli_and_a_renewed_certificate() {
    let data = tempfile::tempdir().unwrap();
    let first = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(first.path());
    let live = tempfile::tempdir().unwrap();
    let (live_cert, live_key) = (live.path().join("cert.pem"), live.path().join("key.pem"));
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let flags = [
        "--tls-cert",
        live_cert.to_str().unwrap(),
        "--tls-key",
        live_key.to_str().unwrap(),
    ];
    let server = Server::start_without_models_with(data.path(), &flags);
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );

    // Trusted through --ca; refused without it.
    let admin =
        Client::with_ca(&server.url, Some(support::ADMIN_TOKEN.into()), Some(&cert)).unwrap();
    let tenants = admin.api(Method::GET, "/v1/tenants", None).await.unwrap();
    assert_eq!(tenants["tenants"], serde_json::json!([]), "{tenants}");
    let untrusted = Client::new(&server.url, None).unwrap();
    let refused = untrusted.send(Method::GET, "/healthz", None, &[]).await;
    let error = format!(
        "{:#}",
        refused
            .err()
            .expect("an untrusted certificate was accepted")
    );
    assert!(error.to_lowercase().contains("certificate"), "{error}");

    // The CLI over https.
    let created = std::process::Command::new(support::binary())
        .args(["tenant", "create", "acme", "--url", &server.url, "--ca"])
        .arg(&cert)
        .env("GIGAFACTORY_TOKEN", support::ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let listed = admin
        .api(Method::GET, "/v1/tenants/acme", None)
        .await
        .unwrap();
    assert_eq!(listed["name"], "acme", "{listed}");

    // A renewed certificate takes effect on SIGHUP, without a restart.
    let second = tempfile::tempdir().unwrap();
    let (renewed, renewed_key) = certificate(second.path());
    std::fs::copy(&renewed, &live_cert).unwrap();
    std::fs::copy(&renewed_key, &live_key).unwrap();
    let hangup = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hangup.success());
    let fresh = Client::with_ca(&server.url, None, Some(&renewed)).unwrap();
    let mut answered = None;
    for _ in 0..100 {
        if let Ok(reply) = fresh.send(Method::GET, "/healthz", None, &[]).await {
            answered = Some(reply.status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answered, Some(hyper::StatusCode::OK), "{}", server.output());
    let stale = Client::with_ca(&server.url, None, Some(&cert)).unwrap();
    assert!(
        stale
            .send(Method::GET, "/healthz", None, &[])
            .await
            .is_err()
    );
}

/// A model repository holding only the small text model.
fn text_model_only() -> tempfile::TempDir {
    let models = tempfile::tempdir().unwrap();
    let shipped = support::root().join("models").join(TEXT_MODEL);
    std::os::unix::fs::symlink(
        shipped.canonicalize().unwrap(),
        models.path().join(TEXT_MODEL),
    )
    .unwrap();
    models
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_figures_equal_what_was_sent() {
    let models = text_model_only();
    let embedder = support::root().join("models").join("all-minilm-l6-v2");
    std::os::unix::fs::symlink(
        embedder.canonicalize().unwrap(),
        models.path().join("all-minilm-l6-v2"),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    // Model calls' spans are at DEBUG.
    let launch = support::Launch {
        env: vec![(
            "GIGAFACTORY_LOG".into(),
            "info,gigafactory_runtime=debug".into(),
        )],
        models: Some(models.path().to_path_buf()),
        ..support::Launch::default()
    };
    let server = Server::start_launched(data.path(), &["--log-format", "json"], &launch);
    let key = server.tenant("acme").await;
    let other = server.tenant("globex").await;
    server
        .deploy(&key, "echo", support::wasm("invoke_misbehave"))
        .await;
    let client = server.client(Some(&key));

    // Every request's body and answer, counted as the client saw them.
    let (mut sent, mut received) = (0u64, 0u64);
    let mut post = async |path: &str, content_type: &'static str, body: Bytes| {
        sent += body.len() as u64;
        let reply = client
            .send(Method::POST, path, Some((content_type, body)), &[])
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", text(&reply));
        received += reply.body.len() as u64;
        reply
    };
    for i in 0..5 {
        let body = Bytes::from(format!("payload number {i} {}", "x".repeat(100 * i)));
        post("/fn/acme/echo/echo", "text/plain", body).await;
    }
    let chat = serde_json::json!({
        "model": TEXT_MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 12,
    });
    let answer = post(
        "/openai/v1/chat/completions",
        "application/json",
        Bytes::from(chat.to_string()),
    )
    .await;
    let generated = support::json(&answer)["usage"]["completion_tokens"]
        .as_u64()
        .unwrap();
    let prompted = support::json(&answer)["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap();
    assert!(generated > 0 && prompted > 0);
    // Text generation is billed in tokens; tensor models in compute time.
    let embed = serde_json::json!({"model": "all-minilm-l6-v2", "input": ["a cat", "a dog"]});
    post(
        "/openai/v1/embeddings",
        "application/json",
        Bytes::from(embed.to_string()),
    )
    .await;
    // Traced from the request into the model: each model call's line
    // carries the request's span, with its id.
    let traced = |route: &'static str, message: &'static str| {
        let server = &server;
        async move {
            let access = log_line(server, |line| line["route"] == route).await;
            let id = access["request_id"].as_str().unwrap().to_string();
            log_line(server, |line| {
                line["message"] == message
                    && line["spans"]
                        .as_array()
                        .is_some_and(|spans| spans.iter().any(|s| s["request_id"] == id.as_str()))
            })
            .await
        }
    };
    let generation = traced("/openai/v1/chat/completions", "generation finished").await;
    assert_eq!(generation["completion_tokens"], generated, "{generation}");
    assert_eq!(generation["span"]["model"], TEXT_MODEL, "{generation}");
    let call = traced("/openai/v1/embeddings", "model call answered").await;
    assert_eq!(call["span"]["model"], "all-minilm-l6-v2", "{call}");
    assert_eq!(call["ok"], true, "{call}");

    // A call of a function that does not exist is not billed, nor one
    // its quota refuses.
    let others = server.client(Some(&other));
    let reply = others
        .send(Method::GET, "/fn/globex/nothing", None, &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 404);
    server
        .set_quota(
            "globex",
            serde_json::json!({"requests_per_second": 0.01, "burst": 1}),
        )
        .await;
    server
        .deploy(&other, "echo", support::wasm("invoke_misbehave"))
        .await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let reply = others
            .send(Method::GET, "/fn/globex/echo/", None, &[])
            .await
            .unwrap();
        statuses.push(reply.status.as_u16());
    }
    assert_eq!(statuses, [200, 429]);

    // The tenant's own figures (summed over hours: the test may span two).
    let report = client.api(Method::GET, "/v1/usage", None).await.unwrap();
    let rows = report["usage"].as_array().unwrap();
    assert!(rows.iter().all(|row| row["tenant"] == "acme"), "{report}");
    let total = |field: &str| -> f64 { rows.iter().map(|r| r[field].as_f64().unwrap()).sum() };
    assert_eq!(total("requests") as u64, 7, "{report}");
    assert_eq!(total("bytes_in") as u64, sent, "{report}");
    assert_eq!(total("bytes_out") as u64, received, "{report}");
    assert_eq!(total("generated_tokens") as u64, generated, "{report}");
    assert_eq!(total("prompt_tokens") as u64, prompted, "{report}");
    assert!(total("compute_seconds") > 0.0, "{report}");
    assert!(total("model_seconds") > 0.0, "{report}");

    // Not another tenant's; the admin sees every tenant's, also as CSV.
    let refused = others
        .send(Method::GET, "/v1/usage?tenant=acme", None, &[])
        .await
        .unwrap();
    assert_error(&refused, 403, "forbidden");
    let bad = client
        .send(Method::GET, "/v1/usage?since=yesterday", None, &[])
        .await
        .unwrap();
    assert_error(&bad, 400, "invalid_query");
    let csv = support::success(support::gigafactory(
        &server,
        support::ADMIN_TOKEN,
        &["usage", "--csv"],
    ));
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "tenant,hour,requests,compute_seconds,model_seconds,prompt_tokens,generated_tokens,bytes_in,bytes_out"
    );
    let acme: Vec<Vec<&str>> = lines
        .map(|line| line.split(',').collect::<Vec<_>>())
        .filter(|fields| fields[0] == "acme")
        .collect();
    let column = |i: usize| -> u64 { acme.iter().map(|f| f[i].parse::<u64>().unwrap()).sum() };
    assert_eq!(column(2), 7, "{csv}");
    assert_eq!((column(5), column(6)), (prompted, generated), "{csv}");
    assert_eq!((column(7), column(8)), (sent, received), "{csv}");
    let globex_requests: u64 = csv
        .lines()
        .filter(|line| line.starts_with("globex,"))
        .map(|line| line.split(',').nth(2).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(globex_requests, 1, "only globex's call that ran:\n{csv}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_while_deploying_under_load_restores_every_function_and_key() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_without_models(data.path());
    let mut keys = Vec::new();
    for tenant in ["acme", "globex", "initech"] {
        let key = server.tenant(tenant).await;
        server.deploy(&key, "hello", support::wasm("hello")).await;
        keys.push((tenant, key));
    }

    // Load: each tenant deploys new functions and calls its hello while
    // the backup is taken. What was acknowledged before it began must be
    // in it; all that is in it must serve.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for (tenant, key) in keys.clone() {
        let (client, stop, acknowledged) = (
            server.client(Some(&key)),
            stop.clone(),
            acknowledged.clone(),
        );
        load.push(tokio::spawn(async move {
            let wasm = Bytes::from(support::wasm("hello"));
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("f{round}");
                let deployed = client
                    .send(
                        Method::PUT,
                        &format!("/v1/functions/{name}"),
                        Some(("application/wasm", wasm.clone())),
                        &[],
                    )
                    .await
                    .unwrap();
                assert_eq!(deployed.status, 201, "{}", text(&deployed));
                acknowledged.lock().unwrap().push((tenant, name));
                let called = client
                    .send(Method::GET, &format!("/fn/{tenant}/hello/"), None, &[])
                    .await
                    .unwrap();
                assert_eq!(called.status, 200, "{}", text(&called));
                round += 1;
            }
        }));
    }
    // Some deploys are done before the backup begins.
    while acknowledged.lock().unwrap().len() < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before: Vec<(&str, String)> = acknowledged.lock().unwrap().clone();
    let file = data.path().join("backup.tar");
    let admin_token = support::ADMIN_TOKEN;
    let taken = {
        let (url, file) = (server.url.clone(), file.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(support::binary())
                .args(["backup"])
                .arg(&file)
                .env("GIGAFACTORY_URL", url)
                .env("GIGAFACTORY_TOKEN", admin_token)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let said = support::success(taken);
    assert!(said.contains("backed up 3 tenants, 3 keys"), "{said}");
    // Load goes on past the backup, then stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    server.stop();

    // Restored on a fresh data directory: every key works, every function
    // acknowledged before the backup is there, and every function there serves.
    let fresh = tempfile::tempdir().unwrap();
    let restored = std::process::Command::new(support::binary())
        .arg("restore")
        .arg(&file)
        .arg("--data")
        .arg(fresh.path())
        .output()
        .unwrap();
    let said = support::success(restored);
    assert!(said.contains("restored 3 tenants, 3 keys"), "{said}");
    let again = std::process::Command::new(support::binary())
        .arg("restore")
        .arg(&file)
        .arg("--data")
        .arg(fresh.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds a store"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let server = Server::start_without_models(fresh.path());
    for (tenant, key) in &keys {
        let client = server.client(Some(key));
        let me = client.api(Method::GET, "/v1/whoami", None).await.unwrap();
        assert_eq!(me["tenant"], *tenant);
        let listed = client
            .api(Method::GET, "/v1/functions", None)
            .await
            .unwrap();
        let names: Vec<&str> = listed["functions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        for (owner, name) in &before {
            if owner == tenant {
                assert!(
                    names.contains(&name.as_str()),
                    "{tenant}/{name} lost: {names:?}"
                );
            }
        }
        for name in names {
            let reply = client
                .send(Method::GET, &format!("/fn/{tenant}/{name}/x"), None, &[])
                .await
                .unwrap();
            assert_eq!(reply.status, 200, "{tenant}/{name}: {}", text(&reply));
            assert!(text(&reply).starts_with("Hello from Gigafactory!"));
        }
    }
    server.stop();
}
