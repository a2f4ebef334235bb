//! The `gigafactory` command line against a running gateway.

mod support;

use std::process::Command;

use support::{ADMIN_TOKEN, Server, binary, gigafactory, root, success, wasm};

#[test]
fn a_tour_of_the_cli() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let hello = wasm("hello");
    let file = data.path().join("hello.wasm");
    std::fs::write(&file, hello).unwrap();

    assert!(
        success(gigafactory(
            &server,
            ADMIN_TOKEN,
            &["tenant", "create", "demo"]
        ))
        .contains("created tenant demo")
    );
    assert!(success(gigafactory(&server, ADMIN_TOKEN, &["tenant", "list"])).contains("demo"));
    let key = success(gigafactory(
        &server,
        ADMIN_TOKEN,
        &["tenant", "key", "demo", "--quiet"],
    ));
    let key = key.trim();
    assert!(key.starts_with("gf_"), "{key}");

    let deployed = success(gigafactory(
        &server,
        key,
        &["deploy", "hello", file.to_str().unwrap()],
    ));
    assert!(
        deployed.contains("deployed hello version 1 at /fn/demo/hello"),
        "{deployed}"
    );
    let answer = success(gigafactory(
        &server,
        key,
        &["invoke", "hello", "--path", "/cli"],
    ));
    assert_eq!(answer, "Hello from Gigafactory! You asked for /cli\n");
    let listed = success(gigafactory(&server, key, &["functions", "list"]));
    assert!(
        listed.contains("hello") && listed.contains("/fn/demo/hello"),
        "{listed}"
    );
    let models = success(gigafactory(&server, key, &["models", "list"]));
    assert!(
        models.contains("all-minilm-l6-v2")
            && models.contains("ready")
            && models.contains("0 calls, 0 batches"),
        "{models}"
    );
    let devices = success(gigafactory(&server, key, &["models", "devices"]));
    assert!(
        devices.starts_with("cpu ") && devices.contains("MiB total"),
        "{devices}"
    );
    let quota = success(gigafactory(
        &server,
        ADMIN_TOKEN,
        &[
            "tenant",
            "quota",
            "demo",
            "--set",
            r#"{"max_functions": 5}"#,
        ],
    ));
    let quota: serde_json::Value = serde_json::from_str(&quota).unwrap();
    assert_eq!(quota["quota"]["max_functions"], 5);
    assert_eq!(quota["usage"]["functions"], 1);
    let as_json = success(gigafactory(
        &server,
        key,
        &["--json", "functions", "get", "hello"],
    ));
    let parsed: serde_json::Value = serde_json::from_str(&as_json).unwrap();
    assert_eq!(parsed["active_version"], 1);
}

#[test]
fn failures_exit_non_zero_with_the_cause() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let missing = gigafactory(
        &server,
        ADMIN_TOKEN,
        &["deploy", "x", "/nonexistent/file.wasm"],
    );
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("error: reading /nonexistent/file.wasm"),
        "{stderr}"
    );
    assert!(stderr.contains("caused by:"), "{stderr}");

    let not_a_tenant = gigafactory(&server, ADMIN_TOKEN, &["invoke", "hello"]);
    assert!(!not_a_tenant.status.success());
    assert!(String::from_utf8_lossy(&not_a_tenant.stderr).contains("needs a tenant API key"));

    let unknown = gigafactory(&server, "gf_nope", &["functions", "list"]);
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("unknown API key"),
        "{stderr}"
    );

    let mut offline = Command::new(binary());
    let refused = offline
        .args(["models", "list"])
        .env("GIGAFACTORY_URL", "http://127.0.0.1:9")
        .env("GIGAFACTORY_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is `gigafactory serve` running there?")
    );
}

#[test]
fn serve_generates_and_keeps_an_admin_token() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .arg("--models")
        .arg(root().join("models"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let token_file = data.path().join("admin-token");
    for _ in 0..600 {
        if token_file.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let token = std::fs::read_to_string(&token_file).expect("the admin token file");
    assert!(
        token.trim().starts_with("gfadmin_") && token.trim().len() == 8 + 64,
        "{token}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is private");
}

#[test]
fn logs_follow_prints_new_lines_as_they_are_written() {
    use std::io::{BufRead, BufReader};
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let key = runtime.block_on(server.tenant("acme"));
    runtime.block_on(server.deploy(&key, "misbehave", wasm("invoke_misbehave")));

    let mut follower = Command::new(binary())
        .args(["logs", "misbehave", "--follow"])
        .env("GIGAFACTORY_URL", &server.url)
        .env("GIGAFACTORY_TOKEN", &key)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        runtime.block_on(server.get_text(&key, "/fn/acme/misbehave/log")),
        "logged"
    );
    let mut seen = Vec::new();
    while let Ok(line) = lines_rx.recv_timeout(std::time::Duration::from_secs(10)) {
        seen.push(line);
        if seen.iter().any(|l| l == "[stderr] to stderr")
            && seen.iter().any(|l| l == "[stdout] to stdout")
        {
            break;
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(seen.contains(&"[stdout] to stdout".to_string()), "{seen:?}");
    assert!(seen.contains(&"[stderr] to stderr".to_string()), "{seen:?}");
}

#[test]
fn deploy_bundles_the_manifest_next_to_the_crate() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let key = runtime.block_on(server.tenant("acme"));
    let crate_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(crate_dir.path().join("assets")).unwrap();
    std::fs::write(
        crate_dir.path().join("assets/greeting.txt"),
        "hello from the crate\n",
    )
    .unwrap();
    let manifest = "memory_mib = 32\n[env]\nGREETING = \"from the manifest\"\n[files]\n\"/data/greeting.txt\" = \"assets/greeting.txt\"\n";
    std::fs::write(crate_dir.path().join("gigafactory.toml"), manifest).unwrap();
    let component = crate_dir.path().join("probe.wasm");
    std::fs::write(&component, wasm("manifest_probe")).unwrap();

    let output = Command::new(binary())
        .args(["deploy", "probe", "probe.wasm"])
        .current_dir(crate_dir.path())
        .env("GIGAFACTORY_URL", &server.url)
        .env("GIGAFACTORY_TOKEN", &key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("with gigafactory.toml"), "{stderr}");
    assert_eq!(
        runtime.block_on(server.get_text(&key, "/fn/acme/probe/file")),
        "ok:hello from the crate"
    );
    assert_eq!(
        runtime.block_on(server.get_text(&key, "/fn/acme/probe/env")),
        "GREETING=from the manifest PATH=-"
    );
}

/// deploy/kubernetes fits together and runs `serve` with flags it has
/// (tests/data/check_manifests.py; PyYAML from `./dev test`'s venv).
#[test]
fn the_kubernetes_manifests_fit_the_binary() {
    let help = Command::new(binary())
        .args(["serve", "--help"])
        .output()
        .expect("gigafactory serve --help");
    assert!(help.status.success());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &help.stdout).unwrap();
    let python = std::env::var("GIGAFACTORY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let checked = Command::new(&python)
        .arg(root().join("tests/data/check_manifests.py"))
        .arg(root().join("deploy/kubernetes"))
        .arg(file.path())
        .output()
        .expect("running python");
    assert!(
        checked.status.success(),
        "the manifests do not fit (does {python} have PyYAML? ./dev test sets it up):\n{}\n{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(summary["workloads"], 2, "{summary}");
}
