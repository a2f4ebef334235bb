//! Every resource a client or a function makes the gateway hold is bounded:
//! connections (half-sent headers, idle sockets, stalled bodies, a
//! descriptor budget shared with thousands of sockets), loaded function
//! versions and their descriptors, outbound connections per tenant, and
//! requests whose client left are still counted. A victim tenant's `hello`
//! keeps answering through each attack.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::Method;
use support::{Launch, Server, assert_error, text, wasm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server without models (they are not needed here: it starts at once).
fn start(data: &Path, extra: &[&str], nofile: Option<u64>) -> Server {
    let models = data.join("no-models");
    std::fs::create_dir_all(&models).unwrap();
    let launch = Launch {
        models: Some(models),
        nofile,
        ..Launch::default()
    };
    Server::start_launched(data, extra, &launch)
}

async fn victim(server: &Server) -> String {
    let key = server.tenant("victim").await;
    server.deploy(&key, "hello", wasm("hello")).await;
    key
}

async fn hello(server: &Server, key: &str) {
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        server
            .client(Some(key))
            .send(Method::GET, "/fn/victim/hello", None, &[]),
    )
    .await
    .expect("the victim was answered within 30 s")
    .expect("the victim's request went through");
    assert_eq!(reply.status, 200, "the victim failed: {}", text(&reply));
}

/// Whether the server closed `stream` (EOF or reset) within `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buffer = [0u8; 1024];
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A 408 or similar before the close is fine.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_idle_connections_are_closed() {
    let data = tempfile::tempdir().unwrap();
    let flags = [
        "--header-timeout-ms",
        "1000",
        "--idle-timeout-ms",
        "1500",
        "--body-idle-timeout-ms",
        "1000",
    ];
    let server = start(data.path(), &flags, None);
    let key = victim(&server).await;
    let mut sockets = Vec::new();
    for i in 0..200 {
        let mut socket = TcpStream::connect(server.address()).await.unwrap();
        match i % 4 {
            // Half-sent headers, then a byte now and then (slowloris).
            0 => socket
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
                .await
                .unwrap(),
            // The start of HTTP/2's preface, never finished.
            1 => socket.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap(),
            // A keep-alive connection after one request, then nothing.
            2 => {
                socket
                    .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                    .await
                    .unwrap();
                let mut head = [0u8; 256];
                let _ = socket.read(&mut head).await.unwrap();
            }
            // Nothing at all.
            _ => {}
        }
        sockets.push(socket);
    }
    let trickle: Vec<usize> = (0..sockets.len()).step_by(4).collect();
    for _ in 0..4 {
        for &i in &trickle {
            let _ = sockets[i].write_all(b"x").await;
        }
        hello(&server, &key).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let checks: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move { closed_within(&mut socket, Duration::from_secs(4)).await })
        })
        .collect();
    let mut open = 0;
    for check in checks {
        if !check.await.unwrap() {
            open += 1;
        }
    }
    assert_eq!(
        open, 0,
        "{open} of 200 slow or idle connections are still open"
    );

    // A control-plane body that stops arriving is refused, not held.
    let mut stalled = TcpStream::connect(server.address()).await.unwrap();
    let head = format!(
        "POST /v1/tenants HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"name\":",
        support::ADMIN_TOKEN
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut response = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut response))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let status = String::from_utf8_lossy(&response[..n]);
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    hello(&server, &key).await;
}

#[tokio::test]
async fn pings_do_not_keep_an_idle_http2_connection_open() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), &["--idle-timeout-ms", "1000"], None);
    let stream = TcpStream::connect(server.address()).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                stream,
            ))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get(format!("{}/healthz", server.url))
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    // The client pings every 200 ms; the server still closes it once no
    // request has been in flight for its idle timeout.
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(
        ended.is_ok(),
        "the idle HTTP/2 connection was kept open by its pings"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sockets_cannot_use_up_the_descriptors() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), &[], Some(512));
    let key = victim(&server).await;
    let mut parked = Vec::new();
    for _ in 0..600 {
        match TcpStream::connect(server.address()).await {
            Ok(socket) => parked.push(socket),
            Err(_) => break,
        }
    }
    eprintln!("{} idle sockets parked", parked.len());
    let started = Instant::now();
    for _ in 0..10 {
        hello(&server, &key).await;
    }
    eprintln!(
        "10 victim requests took {:.1} s beside them ({} descriptors open)",
        started.elapsed().as_secs_f64(),
        server.open_descriptors()
    );
}

/// `wasm` with a custom section making its sha256 unique to `n`.
fn unique(wasm: &[u8], n: u32) -> Vec<u8> {
    let name = b"unique";
    let payload = n.to_le_bytes();
    let mut out = wasm.to_vec();
    out.push(0);
    out.push((1 + name.len() + payload.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

fn gauge(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}

#[tokio::test]
async fn replaced_and_idle_function_versions_are_unloaded() {
    let data = tempfile::tempdir().unwrap();
    // Idle client connections close at once: only functions hold descriptors.
    let flags = ["--max-loaded-functions", "4", "--idle-timeout-ms", "200"];
    let server = start(data.path(), &flags, None);
    let key = server.tenant("victim").await;
    let hello = wasm("hello");
    let mut descriptors = Vec::new();
    for n in 0..40 {
        // Half redeploy one function, half deploy new ones.
        let name = if n % 2 == 0 {
            "hello".to_string()
        } else {
            format!("hello-{n}")
        };
        server.deploy(&key, &name, unique(&hello, n)).await;
        let reply = server
            .client(Some(&key))
            .send(Method::GET, &format!("/fn/victim/{name}"), None, &[])
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", text(&reply));
        if n == 9 || n == 39 {
            descriptors.push(server.open_descriptors());
        }
    }
    let loaded = gauge(&server.metrics().await, "gigafactory_loaded_functions");
    eprintln!("descriptors after 10 and 40 versions: {descriptors:?}; {loaded} loaded");
    assert!(loaded <= 4, "{loaded} versions loaded");
    assert!(
        descriptors[1] <= descriptors[0] + 8,
        "descriptors grew with versions: {descriptors:?}"
    );
}

/// A local HTTP server answering each request after `delay`, counting the
/// connections open at once (their most).
async fn slow_upstream(delay: Duration) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let seen = most.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (open, most) = (open.clone(), most.clone());
            tokio::spawn(async move {
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                tokio::time::sleep(delay).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_s_outbound_connections_are_capped() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), &["--allow-loopback-outbound"], None);
    let key = server.tenant("attacker").await;
    server
        .set_quota(
            "attacker",
            serde_json::json!({"max_outbound_connections": 8}),
        )
        .await;
    let (port, most) = slow_upstream(Duration::from_millis(300)).await;
    let manifest = format!("timeout_ms = 20000\nallowed_hosts = [\"127.0.0.1:{port}\"]\n");
    let bundle =
        gigafactory_gateway::bundle::Bundle::pack(&wasm("hostile_nn"), Some(&manifest), &[])
            .unwrap();
    let deployed = server.deploy_bundle(&key, "evil", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    let path = format!("/fn/attacker/evil/outbound?url=http://127.0.0.1:{port}/&count=50");
    let tally = server.get_text(&key, &path).await;
    eprintln!(
        "50 outbound requests under a cap of 8: {tally}; upstream saw at most {}",
        most.load(Ordering::SeqCst)
    );
    assert_eq!(tally, "ok=8 denied=42 other=0");
    assert!(most.load(Ordering::SeqCst) <= 8);
    // The permits come back when the connections close.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = server.get_text(&key, &path).await;
    assert_eq!(again, "ok=8 denied=42 other=0");
}

#[tokio::test]
async fn functions_cannot_reach_this_machine_unless_the_operator_allows_it() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), &[], None);
    let key = server.tenant("acme").await;
    let (port, most) = slow_upstream(Duration::ZERO).await;
    let loopback = format!("allowed_hosts = [\"127.0.0.1:{port}\"]");
    let refused = server
        .deploy_bundle(&key, "probe", support::probe_bundle(&loopback, &[]))
        .await;
    assert_error(&refused, 400, "invalid_manifest");
    assert!(
        text(&refused).contains("--allow-loopback-outbound"),
        "{}",
        text(&refused)
    );

    // A name that resolves to this machine ("127.1" is 127.0.0.1 to the
    // resolver) passes the deploy, not the request.
    let named = format!("allowed_hosts = [\"127.1:{port}\"]");
    let deployed = server
        .deploy_bundle(&key, "probe", support::probe_bundle(&named, &[]))
        .await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    let fetched = server
        .get_text(
            &key,
            &format!("/fn/acme/probe/fetch?url=http://127.1:{port}/"),
        )
        .await;
    assert_eq!(fetched, "err:ErrorCode::HttpRequestDenied");
    assert_eq!(
        most.load(Ordering::SeqCst),
        0,
        "nothing reached the local server"
    );
}

#[tokio::test]
async fn a_request_whose_client_left_is_still_counted() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), &[], None);
    let key = server.tenant("acme").await;
    let bundle = gigafactory_gateway::bundle::Bundle::pack(
        &wasm("hostile"),
        Some("timeout_ms = 3000\n"),
        &[],
    )
    .unwrap();
    let deployed = server.deploy_bundle(&key, "spin", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    let mut socket = TcpStream::connect(server.address()).await.unwrap();
    let request = format!(
        "GET /fn/acme/spin/loop HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(socket);
    for _ in 0..100 {
        let metrics = server.metrics().await;
        if let Some(line) = metrics.lines().find(|l| {
            l.starts_with("gigafactory_function_requests_total{") && l.contains("function=\"spin\"")
        }) {
            eprintln!("{line}");
            assert!(line.contains("outcome=\"client_closed\""), "{line}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the request of a client that left was never counted");
}

#[tokio::test]
async fn files_that_cannot_coexist_are_refused_at_deploy() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path(), &[], None);
    let key = server.tenant("acme").await;
    let manifest = "[files]\n\"/a\" = \"one.txt\"\n\"/a/b\" = \"two.txt\"\n";
    let bundle = support::probe_bundle(manifest, &[("one.txt", "1"), ("two.txt", "2")]);
    let refused = server.deploy_bundle(&key, "probe", bundle).await;
    assert_error(&refused, 400, "invalid_manifest");
    assert!(
        text(&refused).contains("\\\"/a\\\" is a file"),
        "{}",
        text(&refused)
    );
    let staged = std::fs::read_dir(data.path().join("files"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(staged, 0, "nothing was written for the refused bundle");
}
