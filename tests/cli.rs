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
        listed.starts_with("NAME ")
            && listed.contains("hello")
            && listed.contains("/fn/demo/hello"),
        "{listed}"
    );
    // Times as RFC 3339, not Unix seconds.
    let rfc3339 = |word: &str| {
        let b = word.as_bytes();
        b.len() == 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[19] == b'Z'
    };
    assert!(listed.split_whitespace().any(rfc3339), "{listed}");
    let models = success(gigafactory(&server, key, &["models", "list"]));
    assert!(
        models.contains("all-minilm-l6-v2")
            && models.contains("ready")
            && models.contains("0 calls, 0 batches"),
        "{models}"
    );
    // A text model counts generations and tokens.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let chat = serde_json::json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "logit_bias": {"0": -100, "2": -100},
    });
    let answered = runtime
        .block_on(server.client(Some(key)).api(
            hyper::Method::POST,
            "/v1/chat/completions",
            Some(("application/json", chat.to_string().into())),
        ))
        .unwrap();
    assert_eq!(answered["usage"]["completion_tokens"], 4, "{answered}");
    let models = success(gigafactory(&server, key, &["models", "list"]));
    assert!(
        models.contains("1 generations (0 decoding, 0 queued)")
            && models.contains(" and 4 generated tokens"),
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

    // A second version, rolled back to the first; a missing one is refused.
    let probe = data.path().join("probe.wasm");
    std::fs::write(&probe, wasm("manifest_probe")).unwrap();
    success(gigafactory(
        &server,
        key,
        &["deploy", "hello", probe.to_str().unwrap()],
    ));
    let rolled = success(gigafactory(
        &server,
        key,
        &["functions", "rollback", "hello", "1"],
    ));
    assert_eq!(rolled, "hello now runs version 1\n");
    let missing = gigafactory(&server, key, &["functions", "rollback", "hello", "9"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("has no version 9"));

    // invoke with a method, and the status line and headers.
    let shown = success(gigafactory(
        &server,
        key,
        &["invoke", "hello", "-i", "-X", "put", "--path", "/again"],
    ));
    assert!(shown.starts_with("HTTP/1.1 200 OK\n"), "{shown}");
    assert!(
        shown.contains("gigafactory-function-version: 1\n"),
        "{shown}"
    );
    assert!(shown.ends_with("You asked for /again\n"), "{shown}");

    // A reader that leaves early (`| head`) ends the CLI quietly.
    success(gigafactory(
        &server,
        key,
        &["deploy", "probe", probe.to_str().unwrap()],
    ));
    let piped = Command::new("sh")
        .arg("-c")
        .arg("\"$0\" invoke probe --path '/big?bytes=8000000' 2>\"$1\" | head -c 10 >/dev/null")
        .arg(binary())
        .arg(data.path().join("stderr"))
        .env("GIGAFACTORY_URL", &server.url)
        .env("GIGAFACTORY_TOKEN", key)
        .status()
        .unwrap();
    assert!(piped.success());
    let said = std::fs::read_to_string(data.path().join("stderr")).unwrap();
    assert!(!said.contains("panicked"), "{said}");

    // Who a token is; a tenant's keys, one revoked.
    let me = success(gigafactory(&server, key, &["whoami"]));
    assert!(me.starts_with("tenant demo\n"), "{me}");
    let made = success(gigafactory(
        &server,
        ADMIN_TOKEN,
        &["--json", "keys", "create", "demo"],
    ));
    let made: serde_json::Value = serde_json::from_str(&made).unwrap();
    let second = made["key"].as_str().unwrap().to_string();
    let keys = success(gigafactory(
        &server,
        ADMIN_TOKEN,
        &["--json", "keys", "list", "demo"],
    ));
    let keys: serde_json::Value = serde_json::from_str(&keys).unwrap();
    let ids: Vec<&str> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{keys}");
    let id = ids
        .iter()
        .find(|id| second.contains(*id))
        .expect("the new key's id is a part of it");
    success(gigafactory(
        &server,
        ADMIN_TOKEN,
        &["keys", "revoke", "demo", id],
    ));
    let refused = gigafactory(&server, &second, &["whoami"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown API key"));
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
    let used = crate_dir.path().join("gigafactory.toml");
    assert!(
        stderr.contains(&format!("with {}", used.display())),
        "{stderr}"
    );
    assert_eq!(
        runtime.block_on(server.get_text(&key, "/fn/acme/probe/file")),
        "ok:hello from the crate"
    );
    assert_eq!(
        runtime.block_on(server.get_text(&key, "/fn/acme/probe/env")),
        "GREETING=from the manifest PATH=-"
    );

    // From elsewhere, a workspace's build: the member the wasm is named
    // after has the manifest, and deploy says it used it.
    let workspace = tempfile::tempdir().unwrap();
    let member = workspace.path().join("probe-fn");
    std::fs::create_dir(&member).unwrap();
    std::fs::write(
        member.join("Cargo.toml"),
        "[package]\nname = \"probe-fn\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();
    let manifest = "[env]\nGREETING = \"from the member\"\n";
    std::fs::write(member.join("gigafactory.toml"), manifest).unwrap();
    let built = workspace.path().join("target/wasm32-wasip2/release");
    std::fs::create_dir_all(&built).unwrap();
    std::fs::write(built.join("probe_fn.wasm"), wasm("manifest_probe")).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let output = Command::new(binary())
        .args(["deploy", "probe"])
        .arg(built.join("probe_fn.wasm"))
        .current_dir(elsewhere.path())
        .env("GIGAFACTORY_URL", &server.url)
        .env("GIGAFACTORY_TOKEN", &key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let used = member.join("gigafactory.toml");
    assert!(
        stderr.contains(&format!("with {}", used.display())),
        "{stderr}"
    );
    assert_eq!(
        runtime.block_on(server.get_text(&key, "/fn/acme/probe/env")),
        "GREETING=from the member PATH=-"
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

#[test]
fn login_saves_profiles_the_commands_use() {
    use std::os::unix::fs::PermissionsExt as _;
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_without_models(data.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let key = runtime.block_on(server.tenant("acme"));
    let config = data.path().join("config/gigafactory.toml");
    let cli = |args: &[&str]| {
        Command::new(binary())
            .args(args)
            .env_remove("GIGAFACTORY_URL")
            .env_remove("GIGAFACTORY_TOKEN")
            .env("GIGAFACTORY_CONFIG", &config)
            .output()
            .unwrap()
    };

    // Nothing configured: says how to configure it.
    let unset = cli(&["functions", "list"]);
    assert!(!unset.status.success());
    let said = String::from_utf8_lossy(&unset.stderr);
    assert!(
        said.contains("GIGAFACTORY_TOKEN") && said.contains("gigafactory login"),
        "{said}"
    );

    // A token the gateway refuses is not saved.
    let refused = cli(&[
        "login",
        "--url",
        &server.url,
        "--with-token",
        "gf_not-a-key",
    ]);
    assert!(!refused.status.success());
    assert!(!config.exists());

    let saved = success(cli(&[
        "login",
        "--url",
        &server.url,
        "--with-token",
        &key,
        "--profile",
        "dev",
    ]));
    assert!(saved.contains("as tenant acme: profile dev"), "{saved}");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the config holds tokens");
    // The first profile is the default; --profile names one.
    assert!(success(cli(&["whoami"])).starts_with("tenant acme\n"));
    assert!(success(cli(&["--profile", "dev", "whoami"])).starts_with("tenant acme\n"));
    let unknown = cli(&["--profile", "prod", "whoami"]);
    assert!(!unknown.status.success());
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        said.contains("no profile \"prod\"") && said.contains("dev"),
        "{said}"
    );
}

#[test]
fn completions_cover_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let script = success(
            Command::new(binary())
                .args(["completions", shell])
                .output()
                .unwrap(),
        );
        for word in ["rollback", "login", "profile"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let unknown = Command::new(binary())
        .args(["completions", "cmd"])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
}

#[test]
fn deploy_watch_redeploys_on_rebuild() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_without_models(data.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let key = runtime.block_on(server.tenant("acme"));
    let file = data.path().join("hello.wasm");
    std::fs::write(&file, wasm("hello")).unwrap();
    let mut watching = Command::new(binary())
        .args(["deploy", "hello", "--watch"])
        .arg(&file)
        .env("GIGAFACTORY_URL", &server.url)
        .env("GIGAFACTORY_TOKEN", &key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let active = || {
        runtime
            .block_on(server.client(Some(&key)).send(
                hyper::Method::GET,
                "/v1/functions/hello",
                None,
                &[],
            ))
            .ok()
            .filter(|reply| reply.status == 200)
            .map(|reply| support::json(&reply)["active_version"].as_u64().unwrap())
    };
    let wait_for = |version: u64| {
        for _ in 0..200 {
            if active() == Some(version) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "version {version} was not deployed (active: {:?})",
            active()
        );
    };
    wait_for(1);
    // A rebuild: the file replaced by another, as cargo does.
    let rebuilt = data.path().join("hello.wasm.new");
    std::fs::write(&rebuilt, wasm("manifest_probe")).unwrap();
    std::fs::rename(&rebuilt, &file).unwrap();
    wait_for(2);
    let _ = watching.kill();
    let _ = watching.wait();
}

/// Runs `program` with `args` in `dir`, asserting that it succeeds.
fn run_in(dir: &std::path::Path, program: &std::path::Path, args: &[&str]) -> String {
    success(
        Command::new(program)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display())),
    )
}

#[test]
fn templates_build_out_of_the_tree_and_deploy() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_without_models(data.path());
    let key = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(server.tenant("demo"));
    // Outside this repository: no workspace, no .cargo/config.toml above it.
    let home = tempfile::tempdir().unwrap();
    let cargo = std::path::PathBuf::from(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // One target directory for the four crates: the SDK's dependencies
    // are built once.
    let target = home.path().join("target");
    for (name, template) in [
        ("greeter", "http"),
        ("cgi-echo", "command"),
        ("embedder", "embed"),
        ("chatter", "chat"),
    ] {
        let said = run_in(
            home.path(),
            &binary(),
            &["new", name, "--template", template],
        );
        assert!(
            said.contains("cargo build --release --target wasm32-wasip2"),
            "{said}"
        );
        let crate_dir = home.path().join(name);
        assert!(crate_dir.join("gigafactory.toml").is_file());
        let built = Command::new(&cargo)
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "{name} ({template}) did not build:\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
    }
    let again = Command::new(binary())
        .args(["new", "greeter"])
        .current_dir(home.path())
        .output()
        .unwrap();
    assert!(!again.status.success(), "an existing directory is kept");

    // Deployed from the crate's directory, with its manifest.
    let wasm_of = |file: &str| {
        target
            .join("wasm32-wasip2/release")
            .join(format!("{file}.wasm"))
            .to_string_lossy()
            .into_owned()
    };
    for (name, file) in [("greeter", "greeter"), ("cgi-echo", "cgi-echo")] {
        let deployed = Command::new(binary())
            .args(["deploy", name, &wasm_of(file)])
            .current_dir(home.path().join(name))
            .env("GIGAFACTORY_URL", &server.url)
            .env("GIGAFACTORY_TOKEN", &key)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&deployed.stderr).into_owned();
        assert!(success(deployed).contains("version 1"));
        assert!(said.contains("gigafactory.toml"), "{said}");
    }
    let function = success(gigafactory(
        &server,
        &key,
        &["--json", "functions", "get", "greeter"],
    ));
    assert!(
        function.contains("\"memory_mib\": 64"),
        "the template's manifest: {function}"
    );
    let greeting = success(gigafactory(
        &server,
        &key,
        &["invoke", "greeter", "-X", "POST", "-d", "Ada"],
    ));
    assert!(greeting.starts_with("Hello, Ada!"), "{greeting}");
    let echoed = success(gigafactory(
        &server,
        &key,
        &["invoke", "cgi-echo", "-X", "POST", "-d", "abc"],
    ));
    assert!(echoed.contains("sent 3 bytes"), "{echoed}");
}
