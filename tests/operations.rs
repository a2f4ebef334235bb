//! Operating the gateway: the HTTP layer (methods, 404/405, HEAD, request
//! ids), access logs and request metrics, log formats, and the drain on
//! SIGTERM, on the real binary over HTTP.

mod support;

use std::time::Duration;

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
    let server = Server::start_without_models_with(data.path(), &["--log-format", "json"]);
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

    // The access log: one JSON object per request, with who, what and how long.
    let line = log_line(&server, |line| line["request_id"] == "trace-me-7").await;
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["tenant"], "acme", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["route"], "/v1/functions", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["bytes"], listed.body.len() as u64, "{line}");
    assert!(line["total_ms"].as_f64().unwrap() >= 0.0, "{line}");
    let refused = log_line(&server, |line| line["status"] == 405).await;
    assert_eq!(refused["path"], "/v1/functions", "{refused}");
    assert!(!server.output().contains('\u{1b}'), "colours in a log file");

    // Request metrics by route template, for every part of the API.
    let metrics = server.metrics().await;
    for series in [
        "gigafactory_http_requests_total{route=\"/v1/functions\",method=\"GET\",status=\"200\"} 1",
        "gigafactory_http_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"} 1",
        "gigafactory_http_request_duration_seconds_count{route=\"/v1/functions\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}
