//! Tenant quotas, set by the admin, hold on every deploy and request —
//! and one tenant's limits never touch another's requests.

mod support;

use std::time::Duration;

use bytes::Bytes;
use gigafactory_gateway::cli::client::Reply;
use hyper::Method;
use serde_json::json;
use support::{Server, assert_error, probe_bundle, text, wasm};

async fn put(server: &Server, key: &str, name: &str, wasm: Vec<u8>) -> Reply {
    server.put(key, name, "application/wasm", wasm).await
}

#[tokio::test]
async fn deploys_stay_within_function_and_storage_quotas() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let hello = wasm("hello");
    let cap = hello.len() as u64 * 3 / 2;
    server
        .set_quota("acme", json!({"max_functions": 1, "max_stored_bytes": cap}))
        .await;

    server.deploy(&key, "hello", hello.clone()).await;
    assert_error(
        &put(&server, &key, "second", hello.clone()).await,
        403,
        "quota_exceeded",
    );
    let bigger = put(&server, &key, "hello", wasm("invoke_misbehave")).await;
    assert_error(&bigger, 403, "quota_exceeded");
    let me = server
        .client(Some(&key))
        .api(Method::GET, "/v1/whoami", None)
        .await
        .unwrap();
    assert_eq!(
        me["usage"],
        json!({"functions": 1, "stored_bytes": hello.len(), "model_bytes": 0})
    );

    let deleted = server
        .client(Some(&key))
        .send(Method::DELETE, "/v1/functions/hello", None, &[])
        .await
        .unwrap();
    assert_eq!(deleted.status, 204);
    server.deploy(&key, "second", hello).await;
}

#[tokio::test]
async fn manifests_cannot_ask_for_more_than_the_tenant_may_have() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server
        .set_quota("acme", json!({"max_memory_mib": 32, "models": []}))
        .await;

    let memory = server
        .deploy_bundle(&key, "probe", probe_bundle("memory_mib = 64", &[]))
        .await;
    assert_error(&memory, 403, "quota_exceeded");
    let models = server
        .deploy_bundle(
            &key,
            "probe",
            probe_bundle("models = [\"all-minilm-l6-v2\"]", &[]),
        )
        .await;
    assert_error(&models, 403, "quota_exceeded");

    let listed = server
        .client(Some(&key))
        .api(Method::GET, "/v1/models", None)
        .await
        .unwrap();
    assert_eq!(
        listed["models"],
        json!([]),
        "a tenant sees only the models it may use"
    );
    let all = server
        .admin()
        .api(Method::GET, "/v1/models", None)
        .await
        .unwrap();
    let names: Vec<&str> = all["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["all-minilm-l6-v2", "smollm2-135m-instruct"]);

    // Without a manifest the tenant's caps apply: 32 MiB, and no models at all.
    server.deploy(&key, "probe", wasm("manifest_probe")).await;
    let grown = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/probe/grow?mib=48", None, &[])
        .await
        .unwrap();
    assert_error(&grown, 500, "out_of_memory");
    assert_eq!(
        server
            .get_text(&key, "/fn/acme/probe/model?name=all-minilm-l6-v2")
            .await,
        "notfound"
    );
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after_and_spares_other_tenants() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let a = server.tenant("tenant-a").await;
    let b = server.tenant("tenant-b").await;
    server
        .set_quota("tenant-a", json!({"requests_per_second": 0.5, "burst": 2}))
        .await;
    server.deploy(&a, "hello", wasm("hello")).await;
    server.deploy(&b, "hello", wasm("hello")).await;

    let a_client = server.client(Some(&a));
    for _ in 0..2 {
        let reply = a_client
            .send(Method::GET, "/fn/tenant-a/hello", None, &[])
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", text(&reply));
    }
    let limited = a_client
        .send(Method::GET, "/fn/tenant-a/hello", None, &[])
        .await
        .unwrap();
    assert_error(&limited, 429, "too_many_requests");
    let wait: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&wait), "retry after {wait}");
    for _ in 0..5 {
        assert!(
            server
                .get_text(&b, "/fn/tenant-b/hello")
                .await
                .starts_with("Hello")
        );
    }
    tokio::time::sleep(Duration::from_millis(wait * 1000 + 100)).await;
    assert!(
        server
            .get_text(&a, "/fn/tenant-a/hello")
            .await
            .starts_with("Hello")
    );
}

#[tokio::test]
async fn the_tenant_concurrency_cap_spans_its_functions() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server
        .set_quota("acme", json!({"max_concurrency": 1}))
        .await;
    server.deploy(&key, "slow", wasm("manifest_probe")).await;
    server.deploy(&key, "other", wasm("manifest_probe")).await;
    let busy = tokio::spawn({
        let client = server.client(Some(&key));
        async move {
            client
                .send(Method::GET, "/fn/acme/slow/sleep?ms=3000", None, &[])
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let refused = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/other/env", None, &[])
        .await
        .unwrap();
    assert_error(&refused, 429, "too_many_requests");
    assert_eq!(text(&busy.await.unwrap()), "slept");
    assert_eq!(
        server.get_text(&key, "/fn/acme/other/env").await,
        "GREETING=- PATH=-"
    );
}

#[tokio::test]
async fn model_compute_per_minute_is_charged_and_enforced() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server
        .set_quota("acme", json!({"compute_seconds_per_minute": 0.001}))
        .await;
    server.deploy(&key, "embed", wasm("embed")).await;
    let client = server.client(Some(&key));
    let embed = || {
        client.send(
            Method::POST,
            "/fn/acme/embed",
            Some(("text/plain", Bytes::from_static(b"a sentence"))),
            &[],
        )
    };

    let first = embed().await.unwrap();
    assert_eq!(first.status, 200, "{}", text(&first));
    let second = embed().await.unwrap();
    assert_error(&second, 429, "too_many_requests");
    let wait: u64 = second.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "retry after {wait}");
}

#[tokio::test]
async fn quotas_are_validated_and_only_the_admin_sets_them() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let admin = server.admin();
    let put_quota = |client: gigafactory_gateway::cli::Client, body: &'static str| async move {
        client
            .send(
                Method::PUT,
                "/v1/tenants/acme/quota",
                Some(("application/json", Bytes::from_static(body.as_bytes()))),
                &[],
            )
            .await
            .unwrap()
    };
    assert_error(
        &put_quota(server.admin(), r#"{"requests_per_second": 0}"#).await,
        400,
        "invalid_quota",
    );
    assert_error(
        &put_quota(server.admin(), r#"{"models": ["gpt-9"]}"#).await,
        400,
        "invalid_quota",
    );
    // Values that validate as "positive" but break every request later:
    // an overflowing duration, a refill rate of nothing, a memory cap
    // that wraps to 0 bytes, more concurrency than the platform has.
    for absurd in [
        r#"{"compute_seconds_per_minute": 1e300}"#,
        r#"{"requests_per_second": 1e-300}"#,
        r#"{"max_memory_mib": 17592186044416}"#,
        r#"{"max_memory_mib": 100000}"#,
        r#"{"max_concurrency": 4000000000}"#,
        r#"{"generated_tokens_per_minute": 1000000000000000}"#,
        r#"{"max_outbound_connections": 0}"#,
    ] {
        let reply = put_quota(server.admin(), absurd).await;
        assert_eq!(reply.status, 400, "{absurd} was accepted: {}", text(&reply));
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["error"]["code"], "invalid_quota", "{absurd}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("out of range"),
            "{absurd}: {body}"
        );
    }
    server.deploy(&key, "hello", wasm("hello")).await;
    let hello = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/hello", None, &[])
        .await
        .unwrap();
    assert_eq!(hello.status, 200, "{}", text(&hello));
    assert_error(
        &put_quota(server.admin(), r#"{"cpus": 2}"#).await,
        400,
        "bad_json",
    );
    assert_error(
        &put_quota(server.client(Some(&key)), r#"{"max_functions": 100}"#).await,
        403,
        "forbidden",
    );
    let tenant = admin
        .api(Method::GET, "/v1/tenants/acme", None)
        .await
        .unwrap();
    assert_eq!(tenant["quota"], json!({}));
}

#[tokio::test]
async fn a_quota_lowered_after_a_deploy_caps_the_manifest() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let deployed = server
        .deploy_bundle(&key, "probe", probe_bundle("memory_mib = 64", &[]))
        .await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    let grow = || async {
        server
            .client(Some(&key))
            .send(Method::GET, "/fn/acme/probe/grow?mib=48", None, &[])
            .await
            .unwrap()
    };
    assert_eq!(grow().await.status, 200, "within the manifest's 64 MiB");
    server
        .set_quota("acme", json!({"max_memory_mib": 32}))
        .await;
    assert_error(&grow().await, 500, "out_of_memory");
}
