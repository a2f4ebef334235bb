//! Function manifests: what a function asks for is all it gets — env,
//! read-only files, models, outbound hosts — and its limits hold.

mod support;

use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use support::{Server, assert_error, probe_bundle, text, wasm};

async fn deployed(server: &Server, key: &str, name: &str, manifest: &str, files: &[(&str, &str)]) {
    let reply = server
        .deploy_bundle(key, name, probe_bundle(manifest, files))
        .await;
    assert!(
        reply.status.is_success(),
        "deploying {name}: {}",
        text(&reply)
    );
}

#[tokio::test]
async fn a_function_sees_its_env_and_files_and_nothing_else() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let manifest =
        "[env]\nGREETING = \"hi\"\n[files]\n\"/data/greeting.txt\" = \"assets/greeting.txt\"\n";
    deployed(
        &server,
        &key,
        "probe",
        manifest,
        &[("assets/greeting.txt", "hello from a file\n")],
    )
    .await;

    assert_eq!(
        server.get_text(&key, "/fn/acme/probe/env").await,
        "GREETING=hi PATH=-"
    );
    assert_eq!(
        server.get_text(&key, "/fn/acme/probe/file").await,
        "ok:hello from a file"
    );
    let escapes = server.get_text(&key, "/fn/acme/probe/escape").await;
    assert!(
        escapes.split(' ').all(|r| r.starts_with("err:")),
        "{escapes}"
    );

    server.deploy(&key, "bare", wasm("manifest_probe")).await;
    assert_eq!(
        server.get_text(&key, "/fn/acme/bare/env").await,
        "GREETING=- PATH=-"
    );
    assert!(
        server
            .get_text(&key, "/fn/acme/bare/file")
            .await
            .starts_with("err:")
    );
}

#[tokio::test]
async fn a_function_over_its_memory_limit_traps_alone() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    deployed(&server, &key, "small", "memory_mib = 32", &[]).await;
    assert_eq!(
        server.get_text(&key, "/fn/acme/small/grow?mib=8").await,
        format!("grew {}", 8 << 20)
    );
    let reply = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/small/grow?mib=64", None, &[])
        .await
        .unwrap();
    assert_error(&reply, 500, "out_of_memory");
    // The platform default (256 MiB) still lets another function grow past 32.
    server.deploy(&key, "roomy", wasm("manifest_probe")).await;
    assert_eq!(
        server.get_text(&key, "/fn/acme/roomy/grow?mib=64").await,
        format!("grew {}", 64 << 20)
    );
}

#[tokio::test]
async fn request_and_response_bodies_are_bounded() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    deployed(
        &server,
        &key,
        "probe",
        "max_request_bytes = 1000\nmax_response_bytes = 100000",
        &[],
    )
    .await;
    let client = server.client(Some(&key));

    let small = client
        .send(
            Method::POST,
            "/fn/acme/probe/size",
            Some(("text/plain", Bytes::from(vec![b'a'; 1000]))),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(text(&small), "1000");
    let declared = client
        .send(
            Method::POST,
            "/fn/acme/probe/size",
            Some(("text/plain", Bytes::from(vec![b'a'; 1001]))),
            &[],
        )
        .await
        .unwrap();
    assert_error(&declared, 413, "payload_too_large");

    assert_eq!(
        server
            .get_text(&key, "/fn/acme/probe/big?bytes=100000")
            .await
            .len(),
        100000
    );
    let cut = client
        .send(Method::GET, "/fn/acme/probe/big?bytes=300000", None, &[])
        .await;
    match cut {
        Err(_) => {}
        Ok(reply) => assert!(
            reply.body.len() < 300000,
            "a {}-byte response got through",
            reply.body.len()
        ),
    }
}

#[tokio::test]
async fn past_max_concurrency_requests_get_429_with_retry_after() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    deployed(&server, &key, "probe", "max_concurrency = 1", &[]).await;
    let busy = tokio::spawn({
        let client = server.client(Some(&key));
        async move {
            client
                .send(Method::GET, "/fn/acme/probe/sleep?ms=3000", None, &[])
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let refused = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/probe/env", None, &[])
        .await
        .unwrap();
    assert_error(&refused, 429, "too_many_requests");
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(text(&busy.await.unwrap()), "slept");
    assert_eq!(
        server.get_text(&key, "/fn/acme/probe/env").await,
        "GREETING=- PATH=-"
    );
}

/// A one-shot HTTP server answering `pong`, for outbound requests.
async fn pong_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\npong")
                .await;
        }
    });
    port
}

#[tokio::test]
async fn outbound_requests_reach_only_allowed_hosts() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(data.path(), &["--allow-loopback-outbound"]);
    let key = server.tenant("acme").await;
    let allowed = pong_server().await;
    let other = pong_server().await;
    deployed(
        &server,
        &key,
        "probe",
        &format!("allowed_hosts = [\"127.0.0.1:{allowed}\"]"),
        &[],
    )
    .await;
    server.deploy(&key, "bare", wasm("manifest_probe")).await;

    let fetch =
        |name: &str, port: u16| format!("/fn/acme/{name}/fetch?url=http://127.0.0.1:{port}/");
    assert_eq!(
        server.get_text(&key, &fetch("probe", allowed)).await,
        "ok:200 pong"
    );
    assert_eq!(
        server.get_text(&key, &fetch("probe", other)).await,
        "err:ErrorCode::HttpRequestDenied"
    );
    assert_eq!(
        server.get_text(&key, &fetch("bare", allowed)).await,
        "err:ErrorCode::HttpRequestDenied"
    );
}

#[tokio::test]
async fn models_are_limited_to_the_manifest() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    deployed(
        &server,
        &key,
        "listed",
        "models = [\"all-minilm-l6-v2\"]",
        &[],
    )
    .await;
    deployed(&server, &key, "none", "models = []", &[]).await;
    assert_eq!(
        server
            .get_text(&key, "/fn/acme/listed/model?name=all-minilm-l6-v2")
            .await,
        "ok"
    );
    assert_eq!(
        server
            .get_text(&key, "/fn/acme/none/model?name=all-minilm-l6-v2")
            .await,
        "security"
    );
    assert_eq!(
        server
            .get_text(&key, "/fn/acme/listed/model?name=nope")
            .await,
        "notfound"
    );
}

/// A tar whose single entry is named `name`, written raw so even `../`
/// survives (tar builders refuse to write such paths).
fn raw_tar(name: &str, data: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, data).unwrap();
    builder.into_inner().unwrap()
}

#[tokio::test]
async fn bad_manifests_and_bundles_are_refused_and_change_nothing() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "probe", wasm("manifest_probe")).await;
    let client = server.client(Some(&key));
    let before = client
        .api(Method::GET, "/v1/functions", None)
        .await
        .unwrap();

    let cases = [
        (
            probe_bundle("memory_mib = 100000", &[]),
            "invalid_manifest",
            "over the limit",
        ),
        (
            probe_bundle("cpus = 4", &[]),
            "invalid_bundle",
            "unknown field `cpus`",
        ),
        (
            probe_bundle("[files]\n\"/x\" = \"missing.txt\"", &[]),
            "invalid_manifest",
            "not in the bundle",
        ),
        (
            probe_bundle("models = [\"gpt-9\"]", &[]),
            "invalid_manifest",
            "no model \"gpt-9\"",
        ),
        (
            raw_tar("../escape.txt", b"x"),
            "invalid_bundle",
            "outside the bundle",
        ),
        (
            raw_tar("/etc/cron.d/evil", b"x"),
            "invalid_bundle",
            "outside the bundle",
        ),
        (
            raw_tar("other.wasm", b"x"),
            "invalid_bundle",
            "no function.wasm",
        ),
        (
            b"not a tar at all, just text".repeat(40),
            "invalid_bundle",
            "bundle",
        ),
    ];
    for (tar, code, message) in cases {
        let reply = server.deploy_bundle(&key, "probe", tar).await;
        assert_error(&reply, 400, code);
        let said = support::json(&reply)["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(said.contains(message), "expected {message:?}: {said}");
    }
    assert_eq!(
        client
            .api(Method::GET, "/v1/functions", None)
            .await
            .unwrap(),
        before
    );
    assert!(
        !data.path().join("escape.txt").exists() && !data.path().join("../escape.txt").exists()
    );
}
