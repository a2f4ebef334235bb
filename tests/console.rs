//! The web console, served by the gateway and used in a real browser:
//! Debian's headless Chromium driven by Playwright (`tests/console/`,
//! set up by `./dev test`) against a real server, as a tenant and as the
//! operator.

mod support;

use std::path::PathBuf;
use std::process::Command;

use hyper::Method;
use support::{ADMIN_TOKEN, Server, assert_error, root, success, wasm};

const MODEL: &str = "smollm2-135m-instruct";

#[tokio::test]
async fn the_console_is_served_from_the_binary_with_a_strict_policy() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_without_models(data.path());
    let anyone = server.client(None);
    let bare = anyone
        .send(Method::GET, "/console", None, &[])
        .await
        .unwrap();
    assert_eq!(bare.status, 308);
    assert_eq!(bare.headers["location"], "/console/");
    let page = anyone
        .send(Method::GET, "/console/", None, &[])
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert!(
        page.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let policy = page.headers["content-security-policy"].to_str().unwrap();
    assert!(policy.starts_with("default-src 'self'"), "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    let script = anyone
        .send(Method::GET, "/console/console.js", None, &[])
        .await
        .unwrap();
    assert!(
        script.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let missing = anyone
        .send(Method::GET, "/console/nothing.js", None, &[])
        .await
        .unwrap();
    assert_error(&missing, 404, "not_found");
}

#[tokio::test]
async fn tenants_and_the_operator_use_the_console_in_a_browser() {
    let chromium = std::env::var("GIGAFACTORY_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "no Chromium at {} (./dev test installs Debian's chromium; or set GIGAFACTORY_TEST_CHROMIUM)",
        chromium.display()
    );
    let scripts = root().join("tests/console");
    assert!(
        scripts.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci` in {} (./dev test does)",
        scripts.display()
    );
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let acme = server.tenant("acme").await;
    // Another tenant's function, whose names must never reach acme's pages.
    let globex = server.tenant("globex").await;
    server.deploy(&globex, "globex-ledger", wasm("hello")).await;
    assert!(
        server
            .get_text(&globex, "/fn/globex/globex-ledger")
            .await
            .starts_with("Hello")
    );
    let files = tempfile::tempdir().unwrap();
    let hello = files.path().join("hello.wasm");
    std::fs::write(&hello, wasm("hello")).unwrap();
    // The same function as a CGI command: a second version of another kind.
    let second = files.path().join("hello-cgi.wasm");
    std::fs::write(&second, wasm("hello-cgi")).unwrap();
    // GIGAFACTORY_CONSOLE_SHOTS=docs regenerates the README's screenshots.
    let shots = match std::env::var("GIGAFACTORY_CONSOLE_SHOTS") {
        Ok(dir) => root().join(dir),
        Err(_) => files.path().to_path_buf(),
    };

    let output = tokio::task::spawn_blocking({
        let url = server.url.clone();
        let acme = acme.clone();
        move || {
            Command::new("node")
                .arg("console.mjs")
                .current_dir(&scripts)
                .env("GIGAFACTORY_URL", url)
                .env("GIGAFACTORY_ADMIN", ADMIN_TOKEN)
                .env("GIGAFACTORY_KEY", &acme)
                .env("GIGAFACTORY_OTHER", "globex")
                .env("GIGAFACTORY_HELLO", &hello)
                .env("GIGAFACTORY_SECOND", &second)
                .env("GIGAFACTORY_CHROMIUM", &chromium)
                .env("GIGAFACTORY_SHOTS", &shots)
                .output()
                .expect("running node")
        }
    })
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the browser run failed:\n{log}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("the browser run printed no report ({e}):\n{log}"));
    let seen = |key: &str| report[key].clone();

    // Nothing went wrong in the page, nothing left the gateway, and the
    // tenant's pages were never told of another tenant.
    assert_eq!(seen("page_errors"), serde_json::json!([]), "{report:#}");
    assert_eq!(seen("outside"), serde_json::json!([]), "{report:#}");
    assert_eq!(seen("leaks"), serde_json::json!([]), "{report:#}");
    let requests = report["requests"].as_array().unwrap();
    for needed in [
        "GET /v1/functions",
        "PUT /v1/functions/hello",
        "GET /v1/usage",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.as_str().unwrap().starts_with(needed)),
            "the tenant's pages never sent {needed}: {requests:?}"
        );
    }
    assert_eq!(seen("token_in_url"), false);
    assert_eq!(seen("token_in_local_storage"), false);
    assert_eq!(seen("token_after_signout"), 0);

    // Tenant: deploy, invoke, live log, chat, keys, usage, models.
    assert_eq!(
        seen("tenant_nav"),
        serde_json::json!(["Functions", "Playground", "Models", "Keys", "Usage"])
    );
    assert_eq!(seen("deployed"), "Deployed hello version 1.");
    assert_eq!(
        seen("invoke_body"),
        "Hello from Gigafactory! You asked for /from-the-console\n"
    );
    assert!(
        report["log"]
            .as_str()
            .unwrap()
            .contains("stderr hello served /from-the-console"),
        "{report:#}"
    );
    // hello, v1, 1 version, size, deployed, 1 request, none failed.
    let row = report["functions_row"].as_array().unwrap();
    assert_eq!(
        (&row[0], &row[5], &row[6]),
        (&"hello".into(), &"1".into(), &"0".into()),
        "{report:#}"
    );
    assert_eq!(seen("second"), "Deployed hello version 2.");
    assert_eq!(seen("kind_v2"), "command");
    assert_eq!(seen("kind_rolled_back"), "http");
    assert_eq!(
        seen("versions_after_rollback"),
        serde_json::json!(["v2 Roll forward", "v1 Active"])
    );
    assert!(
        report["embedding"]
            .as_str()
            .unwrap()
            .starts_with("384 dimensions · "),
        "{report:#}"
    );
    let answer = report["chat_answer"].as_str().unwrap();
    // The greedy answer tests/openai.rs gets with the official client.
    assert_eq!(answer, "The capital of France is Paris.", "{report:#}");
    assert!(
        report["chat_appended"].as_u64().unwrap() > 1,
        "the answer arrived in one piece, not streamed: {report:#}"
    );
    assert!(
        report["chat_stats"].as_str().unwrap().contains("prompt +"),
        "{report:#}"
    );
    let code = report["chat_code"].as_str().unwrap();
    assert!(
        code.contains(&format!("curl {}/v1/chat/completions", server.url)),
        "{code}"
    );
    assert!(code.contains("client.chat.completions.create("), "{code}");
    assert!(
        !code.contains(&acme),
        "the token is never written into the code"
    );
    let (curl, python) = equivalents(code, &acme).await;
    assert!(curl.starts_with("data: {"), "{curl}");
    assert_eq!(python, MODEL);
    assert_eq!(seen("new_key_before"), 200);
    assert_eq!(seen("new_key_after"), 401);
    let usage = report["usage_rows"].as_array().unwrap();
    assert_eq!(usage.len(), 1, "{report:#}");
    assert!(usage[0].as_str().unwrap().starts_with("acme"), "{report:#}");
    assert_eq!(seen("usage_charts"), 4, "three per hour, one by outcome");
    assert_eq!(
        seen("tenant_models"),
        serde_json::json!(["all-minilm-l6-v2", MODEL])
    );
    assert_eq!(seen("tenant_sent_to"), "#/functions");
    assert!(
        report["phone_overflow"].as_i64().unwrap() <= 0,
        "{report:#}"
    );

    // Operator: keyboard sign-in, tenants and quotas, models under load.
    assert_eq!(seen("focused_on_signin"), "token");
    assert_eq!(
        seen("operator_nav"),
        serde_json::json!(["Tenants", "Models", "Devices", "Nodes", "Usage"])
    );
    assert!(
        report["quota_refused"]
            .as_str()
            .unwrap()
            .contains("max_memory_mib"),
        "{report:#}"
    );
    assert_eq!(
        seen("quota_saved"),
        serde_json::json!({"requests_per_second": 50, "burst": 10})
    );
    assert_eq!(seen("queued_before"), 0);
    assert!(report["queued_under_load"].as_u64().unwrap() > 0);
    assert_eq!(seen("load_statuses"), serde_json::json!([200]));
    let by_tenant = report["model_by_tenant"].as_str().unwrap();
    assert!(
        by_tenant.starts_with("acme: ")
            && by_tenant.ends_with(" tokens")
            && !by_tenant.contains("globex"),
        "{report:#}"
    );
    assert!(
        report["devices"].as_array().unwrap()[0]
            .as_str()
            .unwrap()
            .starts_with("cpu"),
        "{report:#}"
    );
    let tenants = report["operator_usage_tenants"].as_array().unwrap();
    assert!(
        tenants.contains(&"acme".into()) && tenants.contains(&"globex".into()),
        "{report:#}"
    );
}

/// Runs the curl and Python lines the chat playground showed, with the
/// tenant's key in `GIGAFACTORY_TOKEN`: curl's answer, and the model the
/// Python client's first streamed chunk names.
async fn equivalents(code: &str, key: &str) -> (String, String) {
    let (curl, python) = code.split_once("\n\n").expect("curl, a blank line, Python");
    let python_bin =
        std::env::var("GIGAFACTORY_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let run = |program: String, args: Vec<String>| {
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let output = Command::new(&program)
                .args(&args)
                .env("GIGAFACTORY_TOKEN", key)
                .output()
                .unwrap_or_else(|e| panic!("running {program}: {e}"));
            success(output).trim().to_string()
        })
    };
    let curl = run(
        "sh".into(),
        vec!["-c".into(), format!("{curl} --fail --silent --show-error")],
    );
    let python = run(
        python_bin,
        vec![
            "-c".into(),
            format!("{python}\nprint(next(iter(result)).model)"),
        ],
    );
    (curl.await.unwrap(), python.await.unwrap())
}
