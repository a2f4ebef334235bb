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
