//! Every refusal answers with its status and a JSON error, and changes
//! nothing; tenants cannot reach each other's functions.

mod support;

use bytes::Bytes;
use gigafactory_gateway::cli::client::Reply;
use hyper::Method;
use support::{Server, assert_error, json, text, wasm};

async fn put(server: &Server, key: &str, name: &str, wasm: Vec<u8>) -> Reply {
    server.put(key, name, "application/wasm", wasm).await
}

async fn snapshot(server: &Server, key: &str) -> (serde_json::Value, serde_json::Value) {
    let functions = server
        .client(Some(key))
        .api(Method::GET, "/v1/functions", None)
        .await
        .unwrap();
    let tenants = server
        .admin()
        .api(Method::GET, "/v1/tenants", None)
        .await
        .unwrap();
    (functions, tenants)
}

#[tokio::test]
async fn bad_deploys_are_refused_and_change_nothing() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(data.path(), &["--max-upload-mib", "1"]);
    let key = server.tenant("acme").await;
    server.deploy(&key, "hello", wasm("hello")).await;
    let before = snapshot(&server, &key).await;

    assert_error(
        &put(&server, &key, "hello", b"definitely not wasm".to_vec()).await,
        400,
        "invalid_wasm",
    );
    let truncated = wasm("hello")[..1000].to_vec();
    assert_error(
        &put(&server, &key, "hello", truncated).await,
        400,
        "invalid_wasm",
    );
    // Core modules run as WAGI commands: one with no `_start`, or that
    // imports anything but WASI preview 1, is refused saying so.
    let library = wat::parse_str("(module (func (export \"add\")))").unwrap();
    let refused = put(&server, &key, "hello", library).await;
    assert_error(&refused, 400, "missing_handler");
    assert!(text(&refused).contains("_start"), "{}", text(&refused));
    // As AssemblyScript writes for its own host.
    let foreign =
        wat::parse_str(r#"(module (import "env" "abort" (func)) (func (export "_start")))"#)
            .unwrap();
    let refused = put(&server, &key, "hello", foreign).await;
    assert_error(&refused, 400, "unsupported_import");
    assert!(
        text(&refused).contains("a core module importing env::abort"),
        "{}",
        text(&refused)
    );
    let refused = put(&server, &key, "hello", wasm("deploy_no_handler")).await;
    assert_error(&refused, 400, "missing_handler");
    assert!(
        text(&refused).contains(
            "none of wasi:http/handler@0.3.x, wasi:http/incoming-handler@0.2.x (HTTP handlers)"
        ),
        "{}",
        text(&refused)
    );
    // WASI 0.3.0 handlers are served; one built for a release candidate of
    // it is named as one.
    let p3 = wat::parse_str(
        r#"(component (import "wasi:http/types@0.3.0-rc-2025-09-16" (instance (export "f" (func)))))"#,
    )
    .unwrap();
    let refused = put(&server, &key, "hello", p3).await;
    assert_error(&refused, 400, "unsupported_import");
    assert!(
        text(&refused)
            .contains("a WASI 0.3 release candidate (it uses wasi:http/types@0.3.0-rc-2025-09-16)"),
        "{}",
        text(&refused)
    );
    let bad_import = put(&server, &key, "hello", wasm("deploy_bad_import")).await;
    assert_error(&bad_import, 400, "unsupported_import");
    assert!(
        text(&bad_import).contains("acme:missing/oracle"),
        "names the import: {}",
        text(&bad_import)
    );
    assert_error(
        &put(&server, &key, "hello", vec![0; 2 << 20]).await,
        413,
        "payload_too_large",
    );
    assert_error(
        &support::send_verbatim(
            &server,
            &key,
            Method::PUT,
            &format!("/v1/functions/{}", ".."),
            Some(("application/wasm", Bytes::from(wasm("hello")))),
        )
        .await,
        400,
        "invalid_name",
    );
    assert_error(
        &support::send_verbatim(
            &server,
            &key,
            Method::PUT,
            &format!("/v1/functions/{}", "%2e%2e"),
            Some(("application/wasm", Bytes::from(wasm("hello")))),
        )
        .await,
        400,
        "invalid_name",
    );
    assert_error(
        &put(&server, &key, "Hello", wasm("hello")).await,
        400,
        "invalid_name",
    );

    assert_eq!(snapshot(&server, &key).await, before);
    let still = server
        .client(Some(&key))
        .send(Method::GET, "/fn/acme/hello", None, &[])
        .await
        .unwrap();
    assert_eq!(still.status, 200);
    assert_eq!(still.headers["gigafactory-function-version"], "1");
}

#[tokio::test]
async fn authentication_failures_are_401_and_403() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "hello", wasm("hello")).await;

    let anonymous = server.client(None);
    assert_error(
        &anonymous
            .send(Method::GET, "/fn/acme/hello", None, &[])
            .await
            .unwrap(),
        401,
        "unauthorized",
    );
    assert_error(
        &anonymous
            .send(Method::GET, "/v1/functions", None, &[])
            .await
            .unwrap(),
        401,
        "unauthorized",
    );
    let wrong = server.client(Some(
        "gf_0000000000000000000000000000000000000000000000000000000000000000",
    ));
    assert_error(
        &wrong
            .send(Method::GET, "/fn/acme/hello", None, &[])
            .await
            .unwrap(),
        401,
        "unauthorized",
    );
    let basic = anonymous
        .send(
            Method::GET,
            "/v1/functions",
            None,
            &[("authorization".into(), "Basic YTpi".into())],
        )
        .await
        .unwrap();
    assert_error(&basic, 401, "unauthorized");

    // The admin token manages tenants but is not a tenant key, and tenant
    // keys cannot manage tenants.
    let admin = server.admin();
    assert_error(
        &admin
            .send(Method::GET, "/fn/acme/hello", None, &[])
            .await
            .unwrap(),
        403,
        "forbidden",
    );
    assert_error(
        &admin
            .send(
                Method::PUT,
                "/v1/functions/x",
                Some(("application/wasm", wasm("hello").into())),
                &[],
            )
            .await
            .unwrap(),
        403,
        "forbidden",
    );
    let tenant = server.client(Some(&key));
    assert_error(
        &tenant
            .send(Method::GET, "/v1/tenants", None, &[])
            .await
            .unwrap(),
        403,
        "forbidden",
    );
    // A tenant manages its own keys, and no other tenant's.
    server.tenant("globex").await;
    for (method, path) in [
        (Method::POST, "/v1/tenants/globex/keys"),
        (Method::GET, "/v1/tenants/globex/keys"),
        (Method::DELETE, "/v1/tenants/globex/keys/gf_00000000"),
    ] {
        assert_error(
            &tenant.send(method, path, None, &[]).await.unwrap(),
            403,
            "forbidden",
        );
    }
    let own = tenant
        .send(Method::POST, "/v1/tenants/acme/keys", None, &[])
        .await
        .unwrap();
    assert_eq!(own.status, 201, "{}", text(&own));
    let listed = tenant
        .send(Method::GET, "/v1/tenants/acme/keys", None, &[])
        .await
        .unwrap();
    assert_eq!(json(&listed)["keys"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn tenants_cannot_invoke_see_or_delete_each_others_functions() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let a = server.tenant("tenant-a").await;
    let b = server.tenant("tenant-b").await;
    server.deploy(&a, "hello", wasm("hello")).await;
    let b_client = server.client(Some(&b));

    let invoke = b_client
        .send(Method::GET, "/fn/tenant-a/hello", None, &[])
        .await
        .unwrap();
    assert_error(&invoke, 403, "forbidden");
    let see = b_client
        .send(Method::GET, "/v1/functions/hello", None, &[])
        .await
        .unwrap();
    assert_error(&see, 404, "not_found");
    let logs = b_client
        .send(Method::GET, "/v1/functions/hello/logs", None, &[])
        .await
        .unwrap();
    assert_error(&logs, 404, "not_found");
    let listed = b_client
        .api(Method::GET, "/v1/functions", None)
        .await
        .unwrap();
    assert_eq!(listed["functions"], serde_json::json!([]));
    let delete = b_client
        .send(Method::DELETE, "/v1/functions/hello", None, &[])
        .await
        .unwrap();
    assert_error(&delete, 404, "not_found");
    // B deploying the same name makes B's own function, not a new version of A's.
    server.deploy(&b, "hello", wasm("invoke_misbehave")).await;

    let a_client = server.client(Some(&a));
    let reply = a_client
        .send(Method::GET, "/fn/tenant-a/hello", None, &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert!(text(&reply).starts_with("Hello from Gigafactory!"));
    let function = a_client
        .api(Method::GET, "/v1/functions/hello", None)
        .await
        .unwrap();
    assert_eq!(function["versions"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn control_plane_refusals() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    let admin = server.admin();
    let tenants_before = admin.api(Method::GET, "/v1/tenants", None).await.unwrap();
    let post_tenant = |body: &'static str| {
        let admin = server.admin();
        async move {
            admin
                .send(
                    Method::POST,
                    "/v1/tenants",
                    Some(("application/json", Bytes::from(body))),
                    &[],
                )
                .await
                .unwrap()
        }
    };

    assert_error(&post_tenant(r#"{"name": "acme"}"#).await, 409, "conflict");
    assert_error(
        &post_tenant(r#"{"name": "../etc"}"#).await,
        400,
        "invalid_name",
    );
    assert_error(&post_tenant(r#"{"name": 7}"#).await, 400, "bad_json");
    assert_error(
        &post_tenant(r#"{"name": "x", "plan": "gold"}"#).await,
        400,
        "bad_json",
    );
    assert_error(&post_tenant("{").await, 400, "bad_json");
    assert_error(
        &admin
            .send(Method::POST, "/v1/tenants/nobody/keys", None, &[])
            .await
            .unwrap(),
        404,
        "not_found",
    );
    assert_error(
        &admin
            .send(Method::DELETE, "/v1/tenants/nobody", None, &[])
            .await
            .unwrap(),
        404,
        "not_found",
    );
    assert_error(
        &admin
            .send(Method::PATCH, "/v1/tenants", None, &[])
            .await
            .unwrap(),
        405,
        "method_not_allowed",
    );
    assert_error(
        &admin
            .send(Method::GET, "/v1/nothing-here", None, &[])
            .await
            .unwrap(),
        404,
        "not_found",
    );
    assert_error(
        &admin
            .send(Method::GET, "/elsewhere", None, &[])
            .await
            .unwrap(),
        404,
        "not_found",
    );
    let client = server.client(Some(&key));
    assert_error(
        &client
            .send(Method::GET, "/fn/acme/missing", None, &[])
            .await
            .unwrap(),
        404,
        "not_found",
    );
    assert_error(
        &support::send_verbatim(&server, &key, Method::GET, "/fn/acme/%2e%2e", None).await,
        400,
        "invalid_name",
    );
    assert_error(
        &client
            .send(Method::DELETE, "/v1/functions/missing", None, &[])
            .await
            .unwrap(),
        404,
        "not_found",
    );

    assert_eq!(
        admin.api(Method::GET, "/v1/tenants", None).await.unwrap(),
        tenants_before
    );
    let health = json(
        &client
            .send(Method::GET, "/healthz", None, &[])
            .await
            .unwrap(),
    );
    assert_eq!(health["status"], "ok");
}

#[tokio::test]
async fn deleting_a_tenant_revokes_its_keys_and_functions() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "hello", wasm("hello")).await;
    let admin = server.admin();
    let deleted = admin
        .send(Method::DELETE, "/v1/tenants/acme", None, &[])
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", text(&deleted));

    let client = server.client(Some(&key));
    assert_error(
        &client
            .send(Method::GET, "/fn/acme/hello", None, &[])
            .await
            .unwrap(),
        401,
        "unauthorized",
    );
    let key = server.tenant("acme").await;
    let listed = server
        .client(Some(&key))
        .api(Method::GET, "/v1/functions", None)
        .await
        .unwrap();
    assert_eq!(listed["functions"], serde_json::json!([]));
}

#[tokio::test]
async fn keys_are_listed_without_secrets_and_revocable() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let first = server.tenant("acme").await;
    let admin = server.admin();
    let second = admin
        .api(Method::POST, "/v1/tenants/acme/keys", None)
        .await
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    server.deploy(&first, "hello", wasm("hello")).await;

    let keys = admin
        .api(Method::GET, "/v1/tenants/acme/keys", None)
        .await
        .unwrap();
    let listed = keys.to_string();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 2);
    assert!(
        !listed.contains(&first) && !listed.contains(&second),
        "a secret leaked: {listed}"
    );

    let id = gigafactory_gateway::auth::key_id(&first);
    let revoked = admin
        .send(
            Method::DELETE,
            &format!("/v1/tenants/acme/keys/{id}"),
            None,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(revoked.status, 204, "{}", text(&revoked));
    let old = server
        .client(Some(&first))
        .send(Method::GET, "/fn/acme/hello", None, &[])
        .await
        .unwrap();
    assert_error(&old, 401, "unauthorized");
    assert!(
        server
            .get_text(&second, "/fn/acme/hello")
            .await
            .starts_with("Hello")
    );
    let again = admin
        .send(
            Method::DELETE,
            &format!("/v1/tenants/acme/keys/{id}"),
            None,
            &[],
        )
        .await
        .unwrap();
    assert_error(&again, 404, "not_found");
}
