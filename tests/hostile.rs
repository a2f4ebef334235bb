//! Hostile functions and hostile requests: each offender is stopped within
//! its limits, the gateway's memory stays bounded, and another tenant's
//! well-behaved function keeps answering (its latency during each attack
//! is printed, not asserted).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use support::{Server, assert_error, core_module, text, wasm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MANIFEST: &str =
    "timeout_ms = 2000\nmax_response_bytes = 1048576\nmax_concurrency = 4\nmemory_mib = 64\n";

/// Calls the victim's `hello` every 20 ms until stopped; returns latencies,
/// asserting every answer was right.
fn watch_victim(
    server: &Server,
    key: &str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Duration>> {
    let client = server.client(Some(key));
    tokio::spawn(async move {
        let mut latencies = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let reply = client
                .send(Method::GET, "/fn/victim/hello", None, &[])
                .await
                .unwrap();
            latencies.push(started.elapsed());
            assert_eq!(reply.status, 200, "the victim failed: {}", text(&reply));
            assert!(text(&reply).starts_with("Hello from Gigafactory!"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies
    })
}

/// Runs `attack` while watching the victim, and reports the victim's latency.
async fn during<T>(
    server: &Server,
    victim: &str,
    name: &str,
    attack: impl Future<Output = T>,
) -> T {
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_victim(server, victim, stop.clone());
    let outcome = attack.await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = watcher.await.expect("the victim's watcher panicked");
    latencies.sort();
    let p50 = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();
    let max = latencies.last().copied().unwrap_or_default();
    eprintln!(
        "victim during {name:<28} {:>4} requests, p50 {:>7.2} ms, max {:>7.2} ms",
        latencies.len(),
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    outcome
}

async fn setup() -> (tempfile::TempDir, Server, String, String) {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let attacker = server.tenant("attacker").await;
    let victim = server.tenant("victim").await;
    // The same attacks from a wasi:http handler, a command component and a
    // WAGI core module.
    for (name, wasm) in [
        ("evil", wasm("hostile")),
        ("evil-command", wasm("hostile_command")),
        ("evil-wagi", core_module("hostile_command")),
    ] {
        let bundle = gigafactory_gateway::bundle::Bundle::pack(&wasm, Some(MANIFEST), &[]).unwrap();
        let deployed = server.deploy_bundle(&attacker, name, bundle).await;
        assert!(deployed.status.is_success(), "{}", text(&deployed));
    }
    server.deploy(&victim, "hello", wasm("hello")).await;
    (data, server, attacker, victim)
}

#[tokio::test]
async fn hostile_functions_harm_only_themselves() {
    let (_data, server, attacker, victim) = setup().await;
    let rss_before = server.rss_bytes();
    for function in ["evil", "evil-command", "evil-wagi"] {
        eprintln!("{function}:");
        attack(&server, &attacker, &victim, function).await;
    }
    let rss_after = server.rss_bytes();
    eprintln!(
        "gateway RSS: {} MiB before the attacks, {} MiB after",
        rss_before >> 20,
        rss_after >> 20
    );
    assert!(
        rss_after < rss_before + (200 << 20),
        "the gateway grew from {rss_before} to {rss_after} bytes"
    );
}

/// Every attack of the hostile suite by `function`, each contained.
async fn attack(server: &Server, attacker: &str, victim: &str, function: &str) {
    let command = function != "evil";
    let evil = server.client(Some(attacker));
    let call = |path: &str| {
        let evil = server.client(Some(attacker));
        let url = format!("/fn/attacker/{function}{path}");
        async move { evil.send(Method::GET, &url, None, &[]).await }
    };

    let reply = during(server, victim, "an infinite loop", call("/loop"))
        .await
        .unwrap();
    assert_error(&reply, 504, "deadline_exceeded");
    let reply = during(
        server,
        victim,
        "memory.grow until refused",
        call("/grow-forever"),
    )
    .await
    .unwrap();
    assert_error(&reply, 500, "out_of_memory");
    let reply = during(server, victim, "unbounded recursion", call("/recurse"))
        .await
        .unwrap();
    // Rust keeps its stack in linear memory: overflowing it is an out-of-bounds trap.
    assert_error(&reply, 500, "function_trapped");
    assert!(
        !text(&reply).contains("backtrace"),
        "the client gets the reason only: {}",
        text(&reply)
    );
    let reply = during(
        server,
        victim,
        "a trap before responding",
        call("/trap-before"),
    )
    .await
    .unwrap();
    assert_error(&reply, 500, "function_trapped");
    match during(
        server,
        victim,
        "a trap after responding",
        call("/trap-after"),
    )
    .await
    {
        // A command's output is its response only once it exits; a
        // handler's body, cut off by the trap, must not look whole.
        Ok(reply) if command => assert_error(&reply, 500, "function_trapped"),
        Err(_) => {}
        Ok(reply) => panic!("a body cut off by a trap arrived whole: {}", text(&reply)),
    }
    match during(server, victim, "an endless response body", call("/endless")).await {
        Err(_) => {}
        Ok(reply) => assert!(
            reply.body.len() <= 1 << 20,
            "{} bytes got through",
            reply.body.len()
        ),
    }

    let reply = during(server, victim, "128 MiB of output", call("/spam?mb=64"))
        .await
        .unwrap();
    assert_eq!(text(&reply), "spammed");
    let logs = evil
        .api(Method::GET, &format!("/v1/functions/{function}/logs"), None)
        .await
        .unwrap();
    let lines = logs["lines"].as_array().unwrap();
    assert!(lines.len() <= 1000, "{} log lines kept", lines.len());
    assert!(
        logs.to_string().contains("[truncated]"),
        "the cut is marked"
    );

    let flood = during(server, victim, "64 concurrent infinite loops", async {
        let calls: Vec<_> = (0..64).map(|_| tokio::spawn(call("/loop"))).collect();
        let mut statuses = Vec::new();
        for call in calls {
            statuses.push(call.await.unwrap().unwrap().status.as_u16());
        }
        statuses
    })
    .await;
    assert_eq!(flood.iter().filter(|&&s| s == 504).count(), 4, "{flood:?}");
    assert_eq!(flood.iter().filter(|&&s| s == 429).count(), 60, "{flood:?}");
    assert_eq!(
        server
            .get_text(attacker, &format!("/fn/attacker/{function}/"))
            .await,
        "fine"
    );
}

/// Sends a chunked request body one byte every 50 ms, never ending it, and
/// returns the response's status line.
async fn slow_body(server: &Server, key: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(server.address()).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        while writer.write_all(b"1\r\nx\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut response = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(20), reader.read(&mut response)).await;
    trickle.abort();
    let n = read.expect("an answer within 20 s").unwrap();
    String::from_utf8_lossy(&response[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_request_body_that_never_ends_meets_the_deadline() {
    let (_data, server, attacker, victim) = setup().await;
    // A handler reads it as it comes; a command gets it on stdin once whole.
    for function in ["evil", "evil-command"] {
        let path = format!("/fn/attacker/{function}/read-forever");
        let started = Instant::now();
        let status = during(
            &server,
            &victim,
            "a body that never ends",
            slow_body(&server, &attacker, &path),
        )
        .await;
        assert_eq!(status, "HTTP/1.1 504 Gateway Timeout", "{function}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

async fn raw(server: &Server, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(server.address()).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn hostile_requests_get_clear_errors() {
    let (_data, server, attacker, _victim) = setup().await;
    assert!(
        raw(&server, b"GARBAGE\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400")
    );
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let status = raw(&server, huge.as_bytes()).await;
    assert!(
        status.starts_with("HTTP/1.1 431") || status.is_empty(),
        "{status}"
    );
    let non_ascii = raw(
        &server,
        b"GET /fn/attacker/\xff\xfe HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert!(non_ascii.starts_with("HTTP/1.1 400"), "{non_ascii}");
    let client = server.client(Some(&attacker));
    let encoded = client
        .send(Method::GET, "/fn/attacker/%ff%fe", None, &[])
        .await
        .unwrap();
    assert_error(&encoded, 400, "invalid_name");
    let traversal = client
        .send(
            Method::PUT,
            "/v1/functions/..%2f..%2fetc",
            Some(("application/wasm", Bytes::new())),
            &[],
        )
        .await
        .unwrap();
    assert_error(&traversal, 400, "invalid_name");
    assert_eq!(
        server.get_text(&attacker, "/fn/attacker/evil/").await,
        "fine"
    );
}

#[tokio::test]
async fn racing_deploys_each_get_their_own_version() {
    let (_data, server, attacker, _victim) = setup().await;
    let components = [wasm("hello"), wasm("invoke_misbehave")];
    let deploys: Vec<_> = (0..8)
        .map(|i| {
            let client = server.client(Some(&attacker));
            let body = Bytes::from(components[i % 2].clone());
            tokio::spawn(async move {
                client
                    .send(
                        Method::PUT,
                        "/v1/functions/raced",
                        Some(("application/wasm", body)),
                        &[],
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    for deploy in deploys {
        let reply = deploy.await.unwrap();
        assert!(reply.status.is_success(), "{}", text(&reply));
    }
    let function = server
        .client(Some(&attacker))
        .api(Method::GET, "/v1/functions/raced", None)
        .await
        .unwrap();
    let numbers: Vec<u64> = function["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["number"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
    assert_eq!(
        numbers, expected,
        "versions are numbered without gaps or duplicates"
    );
    assert!(!numbers.is_empty() && numbers.len() <= 8);
    assert_eq!(function["active_version"], *numbers.last().unwrap());
}
