//! The control plane against both stores: every scenario runs once on the
//! embedded sled store and once on PostgreSQL (a fresh database each), on
//! the real binary over HTTP.

mod support;

use std::path::Path;

use hyper::Method;
use support::{Server, assert_error, json, probe_bundle, text, wasm};

/// Where a scenario's server keeps its state.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Sled,
    Postgres,
}

/// A data directory and a store, which servers can be started on again.
struct Setup {
    data: tempfile::TempDir,
    flags: Vec<String>,
}

impl Setup {
    async fn new(backend: Backend) -> Self {
        let flags = match backend {
            Backend::Sled => Vec::new(),
            Backend::Postgres => vec!["--store".into(), support::postgres_database().await],
        };
        Self {
            data: tempfile::tempdir().unwrap(),
            flags,
        }
    }

    fn server(&self) -> Server {
        self.server_in(self.data.path())
    }

    fn server_in(&self, data: &Path) -> Server {
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        Server::start_without_models_with(data, &flags)
    }
}

/// Runs a scenario once per backend, as two tests.
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod sled {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $scenario() {
                super::$scenario(super::Backend::Sled).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $scenario() {
                super::$scenario(super::Backend::Postgres).await;
            })*
        }
    };
}

on_both_stores!(
    tenants_keys_and_quotas,
    versions_and_files_survive_a_restart,
    deleting_a_tenant_takes_its_keys_and_functions_only,
    racing_deploys_are_numbered_without_gaps,
    models_live_in_the_store,
);

async fn tenants_keys_and_quotas(backend: Backend) {
    let setup = Setup::new(backend).await;
    let server = setup.server();
    let admin = server.admin();
    let key = server.tenant("acme").await;
    let again = admin
        .send(
            Method::POST,
            "/v1/tenants",
            Some(("application/json", r#"{"name":"acme"}"#.into())),
            &[],
        )
        .await
        .unwrap();
    assert_error(&again, 409, "conflict");
    server.tenant("bravo").await;
    let tenants = admin.api(Method::GET, "/v1/tenants", None).await.unwrap();
    let names: Vec<&str> = tenants["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "bravo"], "{backend:?}");

    server
        .set_quota("acme", serde_json::json!({"max_functions": 1}))
        .await;
    server.deploy(&key, "one", wasm("hello")).await;
    let refused = server
        .put(&key, "two", "application/wasm", wasm("hello"))
        .await;
    assert_error(&refused, 403, "quota_exceeded");
    let me = server.whoami(&key).await;
    assert_eq!(me["quota"]["max_functions"], 1, "{me}");
    assert_eq!(me["usage"]["functions"], 1, "{me}");
    assert!(me["usage"]["stored_bytes"].as_u64().unwrap() > 0, "{me}");

    let keys = admin
        .api(Method::GET, "/v1/tenants/acme/keys", None)
        .await
        .unwrap();
    let id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    assert!(key.starts_with(&id), "{id} is not the start of the key");
    server.revoke_key("acme", &id).await;
    let refused = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/one/", None, &[])
        .await
        .unwrap();
    assert_error(&refused, 401, "unauthorized");
    let twice = admin
        .send(
            Method::DELETE,
            &format!("/v1/tenants/acme/keys/{id}"),
            None,
            &[],
        )
        .await
        .unwrap();
    assert_error(&twice, 404, "not_found");
}

async fn versions_and_files_survive_a_restart(backend: Backend) {
    let setup = Setup::new(backend).await;
    let server = setup.server();
    let key = server.tenant("acme").await;
    let first = server.deploy(&key, "probe", wasm("manifest_probe")).await;
    assert_eq!(first["active_version"], 1);
    let same = server
        .put(&key, "probe", "application/wasm", wasm("manifest_probe"))
        .await;
    assert_eq!(same.status, 200, "the same wasm again: {}", text(&same));
    assert_eq!(json(&same)["active_version"], 1);
    let manifest = "[files]\n\"/data/greeting.txt\" = \"greeting.txt\"\n";
    let bundle = probe_bundle(manifest, &[("greeting.txt", "hello from the store\n")]);
    let second = server.deploy_bundle(&key, "probe", bundle).await;
    assert_eq!(second.status, 201, "{}", text(&second));
    assert_eq!(json(&second)["active_version"], 2);
    let file = server.get_text(&key, "/fn/acme/probe/file").await;
    assert_eq!(file, "ok:hello from the store");
    server.stop();

    // Another data directory: with PostgreSQL everything a node needs is
    // in the store; with sled, the same directory.
    let elsewhere = tempfile::tempdir().unwrap();
    let data = match backend {
        Backend::Sled => setup.data.path(),
        Backend::Postgres => elsewhere.path(),
    };
    let server = setup.server_in(data);
    // The first server's use was added to the store as it stopped.
    let usage = server
        .client(Some(&key))
        .api(Method::GET, "/v1/usage", None)
        .await
        .unwrap();
    let requests: u64 = usage["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 1, "one call of the function: {usage}");
    let function = server
        .client(Some(&key))
        .api(Method::GET, "/v1/functions/probe", None)
        .await
        .unwrap();
    let numbers: Vec<u64> = function["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2], "{function}");
    assert_eq!(
        function["versions"][1]["files"]["/data/greeting.txt"]["size"],
        21
    );
    let file = server.get_text(&key, "/fn/acme/probe/file").await;
    assert_eq!(file, "ok:hello from the store", "{backend:?}");

    // Rolled back to the first version (no file), then forward again; a
    // version it does not have is refused and changes nothing.
    let activate = |version: u32| {
        let client = server.client(Some(&key));
        async move {
            let body = serde_json::json!({ "version": version }).to_string();
            client
                .send(
                    Method::PUT,
                    "/v1/functions/probe/active",
                    Some(("application/json", body.into())),
                    &[],
                )
                .await
                .unwrap()
        }
    };
    let back = activate(1).await;
    assert_eq!(back.status, 200, "{}", text(&back));
    assert_eq!(json(&back)["active_version"], 1);
    let file = server.get_text(&key, "/fn/acme/probe/file").await;
    assert!(file.starts_with("err:"), "version 1 has no file: {file}");
    assert_error(&activate(7).await, 404, "not_found");
    assert_eq!(json(&activate(2).await)["active_version"], 2);
    let file = server.get_text(&key, "/fn/acme/probe/file").await;
    assert_eq!(file, "ok:hello from the store", "{backend:?}");

    let deleted = server
        .client(Some(&key))
        .send(Method::DELETE, "/v1/functions/probe", None, &[])
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", text(&deleted));
    let gone = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/probe/file", None, &[])
        .await
        .unwrap();
    assert_error(&gone, 404, "not_found");
    let me = server.whoami(&key).await;
    assert_eq!(
        me["usage"],
        serde_json::json!({"functions": 0, "stored_bytes": 0, "model_bytes": 0})
    );
}

async fn deleting_a_tenant_takes_its_keys_and_functions_only(backend: Backend) {
    let setup = Setup::new(backend).await;
    let server = setup.server();
    let doomed = server.tenant("doomed").await;
    let other = server.tenant("other").await;
    // The same wasm for both: the blob outlives the deleted tenant.
    server.deploy(&doomed, "hello", wasm("hello")).await;
    server.deploy(&other, "hello", wasm("hello")).await;
    let deleted = server
        .admin()
        .send(Method::DELETE, "/v1/tenants/doomed", None, &[])
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", text(&deleted));
    let refused = server
        .client(Some(&doomed))
        .send(Method::GET, "/fn/doomed/hello/", None, &[])
        .await
        .unwrap();
    assert_error(&refused, 401, "unauthorized");
    server.stop();

    // A restart loads the survivor's code from the store, not a cache.
    let server = setup.server();
    let answer = server.get_text(&other, "/fn/other/hello/x").await;
    assert!(answer.contains("/x"), "{answer}");
    server.tenant("doomed").await;
    let refused = server
        .client(Some(&doomed))
        .send(Method::GET, "/v1/functions", None, &[])
        .await
        .unwrap();
    assert_error(&refused, 401, "unauthorized");
    let missing = server
        .admin()
        .send(Method::DELETE, "/v1/tenants/nobody", None, &[])
        .await
        .unwrap();
    assert_error(&missing, 404, "not_found");
}

async fn racing_deploys_are_numbered_without_gaps(backend: Backend) {
    const RACERS: usize = 16;
    let setup = Setup::new(backend).await;
    let server = setup.server();
    let key = server.tenant("acme").await;
    let manifest = "[files]\n\"/data/greeting.txt\" = \"greeting.txt\"\n";
    let deploys = (0..RACERS).map(|i| {
        let bundle = probe_bundle(manifest, &[("greeting.txt", &format!("racer {i}\n"))]);
        server.deploy_bundle(&key, "probe", bundle)
    });
    let replies = futures_util::future::join_all(deploys).await;
    let expected: Vec<u64> = (1..=RACERS as u64).collect();
    assert_eq!(support::created_versions(&replies), expected, "{backend:?}");
    let function = server
        .client(Some(&key))
        .api(Method::GET, "/v1/functions/probe", None)
        .await
        .unwrap();
    assert_eq!(function["versions"].as_array().unwrap().len(), RACERS);
    let me = server.whoami(&key).await;
    assert_eq!(me["usage"]["functions"], 1, "{me}");
}

/// Models added through the API are in the store: a node started on it
/// (with PostgreSQL, on another data directory) serves them, private ones
/// to their tenant only, and deleting a tenant deletes its models.
async fn models_live_in_the_store(backend: Backend) {
    let setup = Setup::new(backend).await;
    let server = setup.server();
    let tiny = std::fs::read(support::root().join("tests/data/tiny.onnx")).unwrap();
    let admin = support::ADMIN_TOKEN;
    let added = support::add_model(&server, admin, "tiny", &[("tiny.onnx", &tiny)], None).await;
    assert_eq!(added.status, 201, "{}\n{}", text(&added), server.output());
    assert_eq!(json(&added)["version"], 1);
    let acme = server.tenant("acme").await;
    let other = server.tenant("other").await;
    // A file already on the node, registered by the operator: stored too.
    let path = support::root().join("tests/data/tiny.onnx");
    let on_node = serde_json::json!({"name": "local", "path": path, "public": true});
    let body = || Some(("application/json", on_node.to_string().into()));
    let registered = server
        .admin()
        .send(Method::POST, "/v1/models", body(), &[])
        .await
        .unwrap();
    assert_eq!(registered.status, 201, "{}", text(&registered));
    let refused = server
        .client(Some(&acme))
        .send(Method::POST, "/v1/models", body(), &[])
        .await
        .unwrap();
    assert_error(&refused, 403, "forbidden");
    server
        .set_quota("acme", serde_json::json!({"max_model_bytes": 1000}))
        .await;
    let private = support::add_model(&server, &acme, "mine", &[("m.onnx", &tiny)], None).await;
    assert_eq!(
        private.status,
        201,
        "{}\n{}",
        text(&private),
        server.output()
    );
    // Twice is a conflict; past the quota is refused.
    let again = support::add_model(&server, &acme, "mine", &[("m.onnx", &tiny)], None).await;
    assert_error(&again, 409, "conflict");
    let over = support::add_model(&server, &acme, "more", &[("m.onnx", &tiny)], None).await;
    assert_error(&over, 403, "quota_exceeded");
    let config = "format = \"onnx\"\nfile = \"tiny.onnx\"\npublic = true\n";
    let updated = support::add_model(&server, admin, "tiny", &[], Some(config)).await;
    assert_eq!(updated.status, 200, "{}", text(&updated));
    assert_eq!(json(&updated)["version"], 2);
    server.stop();

    let elsewhere = tempfile::tempdir().unwrap();
    let data = match backend {
        Backend::Sled => setup.data.path(),
        Backend::Postgres => elsewhere.path(),
    };
    let server = setup.server_in(data);
    for (key, tenant) in [(&acme, "acme"), (&other, "other")] {
        let deployed = server
            .deploy_bundle(key, "probe", probe_bundle("", &[]))
            .await;
        assert_eq!(deployed.status, 201, "{}", text(&deployed));
        let tiny = server
            .get_text(key, &format!("/fn/{tenant}/probe/model?name=tiny"))
            .await;
        assert_eq!(tiny, "ok", "{backend:?} {tenant}");
    }
    let mine = server
        .get_text(&acme, "/fn/acme/probe/model?name=mine")
        .await;
    assert_eq!(mine, "ok", "{backend:?}");
    let local = server
        .get_text(&other, "/fn/other/probe/model?name=local")
        .await;
    assert_eq!(local, "ok", "{backend:?}");
    let hidden = server
        .get_text(&other, "/fn/other/probe/model?name=mine")
        .await;
    assert_eq!(hidden, "notfound", "{backend:?}");
    let shown = server
        .admin()
        .api(Method::GET, "/v1/models/tiny", None)
        .await
        .unwrap();
    assert_eq!(shown["version"], 2, "{shown}");
    assert_eq!(shown["model"]["public"], true, "{shown}");

    // Uploads in progress count against the quota too.
    let begin = |sha: &str, size: u64| {
        let (client, path) = (server.client(Some(&acme)), format!("/v1/model-files/{sha}"));
        let body = serde_json::json!({ "size": size }).to_string();
        async move {
            client
                .send(
                    Method::PUT,
                    &path,
                    Some(("application/json", body.into())),
                    &[],
                )
                .await
                .unwrap()
        }
    };
    let pending = "ab".repeat(32);
    assert_eq!(begin(&pending, 400).await.status, 200);
    assert_error(&begin(&"cd".repeat(32), 100).await, 403, "quota_exceeded");

    let deleted = server
        .admin()
        .send(Method::DELETE, "/v1/tenants/acme", None, &[])
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", text(&deleted));
    let listed = server
        .admin()
        .api(Method::GET, "/v1/models", None)
        .await
        .unwrap();
    let owners: Vec<&serde_json::Value> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["owner"])
        .collect();
    assert!(owners.iter().all(|o| o.is_null()), "{listed}");
    // A new tenant of the name starts with none of the old one's uploads.
    let again = server.tenant("acme").await;
    let upload = server
        .client(Some(&again))
        .send(
            Method::GET,
            &format!("/v1/model-files/{pending}"),
            None,
            &[],
        )
        .await
        .unwrap();
    assert_error(&upload, 404, "not_found");
    let removed = server
        .admin()
        .send(Method::DELETE, "/v1/models/tiny", None, &[])
        .await
        .unwrap();
    assert_eq!(removed.status, 204, "{}", text(&removed));
    let gone = server
        .get_text(&other, "/fn/other/probe/model?name=tiny")
        .await;
    assert_eq!(gone, "notfound");
}
