//! Models as a managed fleet, through the real binary: added over the API
//! (with the CLI) and called from a function without a restart, updated
//! under load with no failed call and the new answers after the switch,
//! refused removal while a manifest names them, private models a tenant
//! adds within its quota that no other tenant sees, the repository
//! directory reread on SIGHUP, and an upload of several gigabytes cut
//! short and resumed.

mod support;

use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use support::{
    Server, assert_error, binary, gigafactory, json, probe_bundle, reference_embeddings, root,
    success, text,
};

const MINILM: &str = "all-minilm-l6-v2";

/// A copy of the shipped MiniLM's files (hard links) in `dir`, with a
/// model.toml of its own: `normalize` as given.
fn minilm_dir(dir: &Path, normalize: bool) {
    let shipped = root().join("models").join(MINILM);
    assert!(
        shipped.join("model.onnx").is_file(),
        "{} is missing: run ./dev models",
        shipped.display()
    );
    std::fs::create_dir_all(dir).unwrap();
    for file in ["model.onnx", "vocab.txt"] {
        std::fs::copy(shipped.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("model.toml"), minilm_toml(normalize)).unwrap();
}

fn minilm_toml(normalize: bool) -> String {
    format!(
        r#"description = "MiniLM added through the API"
format = "onnx"
file = "model.onnx"
public = true
[batching]
max_batch = 8
max_queue_delay_ms = 0
max_queue = 512
[batching.pad]
input_ids = {{ axis = 1 }}
attention_mask = {{ axis = 1 }}
token_type_ids = {{ axis = 1 }}
[batching.slice]
last_hidden_state = {{ axis = 1, like = "input_ids" }}
[embedding]
vocabulary = "vocab.txt"
max_tokens = 256
output = "last_hidden_state"
pooling = "mean"
normalize = {normalize}
"#
    )
}

/// `POST /openai/v1/embeddings` of one text: the vector (after checking
/// the status).
async fn embed_openai(
    server: &Server,
    key: &str,
    model: &str,
    input: &str,
) -> Result<Vec<f32>, String> {
    let body = serde_json::json!({"model": model, "input": input}).to_string();
    let reply = server
        .client(Some(key))
        .send(
            Method::POST,
            "/openai/v1/embeddings",
            Some(("application/json", Bytes::from(body))),
            &[],
        )
        .await
        .map_err(|e| format!("{e:#}"))?;
    if reply.status != 200 {
        return Err(format!("{}: {}", reply.status, text(&reply)));
    }
    Ok(support::floats(&json(&reply)["data"][0]["embedding"]))
}

fn norm(vector: &[f32]) -> f32 {
    vector.iter().map(|v| v * v).sum::<f32>().sqrt()
}

async fn probe(server: &Server, key: &str, tenant: &str, path: &str) -> String {
    let reply = server
        .client(Some(key))
        .send(Method::GET, &format!("/fn/{tenant}/probe{path}"), None, &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    text(&reply)
}

#[tokio::test]
async fn models_are_added_updated_and_removed_at_run_time() {
    let data = tempfile::tempdir().unwrap();
    let repository = tempfile::tempdir().unwrap();
    // Tenants' graphs (private models too) on tract, the operator's on
    // the default engine.
    let server = Arc::new(Server::start_with_models(
        data.path(),
        repository.path(),
        &["--guest-onnx-engine", "tract"],
    ));
    let admin = support::ADMIN_TOKEN;
    let alice = server.tenant("alice").await;
    let bob = server.tenant("bob").await;

    // Added over the API with the CLI, then called from a function: no restart.
    let files = tempfile::tempdir().unwrap();
    minilm_dir(&files.path().join("v1"), true);
    let added = gigafactory(
        &server,
        admin,
        &[
            "models",
            "add",
            MINILM,
            files.path().join("v1").to_str().unwrap(),
        ],
    );
    let shown = success(added);
    assert!(shown.contains("version 1"), "{shown}");
    server.deploy(&alice, "embed", support::wasm("embed")).await;
    let (sentence, expected, _) = reference_embeddings().remove(0);
    let reply = server
        .client(Some(&alice))
        .send(
            Method::POST,
            "/fn/alice/embed",
            Some(("text/plain", Bytes::from(sentence.clone()))),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let got = support::floats(&json(&reply)["embedding"]);
    let off = support::largest_difference(&got, &expected);
    assert!(
        off < 1e-3,
        "the added model answers {off} away from the reference"
    );
    let model = server.model(MINILM).await;
    assert_eq!(model["origin"]["api"]["version"], 1, "{model}");
    assert_eq!(model["state"], "ready", "{model}");

    // Updated under load: every call answers, and after the update returns
    // every call gets the new version (vectors no longer normalised).
    let before = embed_openai(&server, &alice, MINILM, &sentence)
        .await
        .unwrap();
    assert!((norm(&before) - 1.0).abs() < 1e-3, "norm {}", norm(&before));
    let updated = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(true));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (server, key, sentence) = (server.clone(), alice.clone(), sentence.clone());
            let (updated, running) = (updated.clone(), running.clone());
            tokio::spawn(async move {
                let (mut calls, mut after, mut failures) = (0, Vec::new(), Vec::new());
                while running.load(Ordering::Relaxed) {
                    let done = updated.load(Ordering::Acquire);
                    match embed_openai(&server, &key, MINILM, &sentence).await {
                        Ok(vector) if done => after.push(norm(&vector)),
                        Ok(_) => {}
                        Err(error) => failures.push(error),
                    }
                    calls += 1;
                }
                (calls, after, failures)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let config = files.path().join("v2.toml");
    std::fs::write(&config, minilm_toml(false)).unwrap();
    let output = gigafactory(
        &server,
        admin,
        &[
            "models",
            "update",
            MINILM,
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert!(success(output).contains("version 2"));
    updated.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::Relaxed);
    let (mut calls, mut after) = (0, Vec::new());
    for client in clients {
        let (n, norms, failures) = client.await.unwrap();
        assert!(
            failures.is_empty(),
            "calls failed during the update: {failures:?}"
        );
        calls += n;
        after.extend(norms);
    }
    eprintln!(
        "{calls} calls during the update, {} after it, none failed",
        after.len()
    );
    assert!(!after.is_empty(), "no call after the update");
    for norm in &after {
        assert!(
            (norm - 1.0).abs() > 1e-2,
            "a call after the update got the old version (norm {norm})"
        );
    }
    let model = server.model(MINILM).await;
    assert_eq!(model["origin"]["api"]["version"], 2, "{model}");

    // Removal is refused while a manifest names the model.
    let manifest = format!("models = [\"{MINILM}\"]");
    let deployed = server
        .deploy_bundle(&bob, "probe", probe_bundle(&manifest, &[]))
        .await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    let refused = server
        .admin()
        .send(Method::DELETE, &format!("/v1/models/{MINILM}"), None, &[])
        .await
        .unwrap();
    assert_error(&refused, 409, "conflict");
    assert!(text(&refused).contains("bob/probe"), "{}", text(&refused));

    // Private models: bob adds one within his quota; alice never sees it.
    let tiny = root().join("tests/data/tiny.onnx");
    let over = gigafactory(
        &server,
        &bob,
        &["models", "add", "mine", tiny.to_str().unwrap()],
    );
    assert!(!over.status.success());
    assert!(
        String::from_utf8_lossy(&over.stderr).contains("max_model_bytes"),
        "{over:?}"
    );
    server
        .set_quota("bob", serde_json::json!({"max_model_bytes": 4096}))
        .await;
    let tiny_bytes = std::fs::read(&tiny).unwrap();
    let files = [("tiny.onnx", tiny_bytes.as_slice())];
    let named = "format = \"onnx\"\nfile = \"tiny.onnx\"\nengine = \"onnxruntime\"\n";
    let refused = support::add_model(&server, &bob, "mine", &files, Some(named)).await;
    assert_error(&refused, 400, "invalid_config");
    success(gigafactory(
        &server,
        &bob,
        &["models", "add", "mine", tiny.to_str().unwrap()],
    ));
    assert_eq!(server.whoami(&bob).await["usage"]["model_bytes"], 552);
    let mine = server
        .client(Some(&bob))
        .api(Method::GET, "/v1/models/mine", None)
        .await
        .unwrap();
    assert_eq!(mine["model"]["engine"], "tract", "{mine}");
    let bob_probe = probe_bundle("models = [\"mine\"]", &[]);
    let deployed = server.deploy_bundle(&bob, "probe", bob_probe).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    assert_eq!(probe(&server, &bob, "bob", "/model?name=mine").await, "ok");
    let alice_probe = server
        .deploy_bundle(&alice, "probe", probe_bundle("", &[]))
        .await;
    assert_eq!(alice_probe.status, 201, "{}", text(&alice_probe));
    assert_eq!(
        probe(&server, &alice, "alice", "/model?name=mine").await,
        "notfound"
    );
    assert_eq!(
        probe(&server, &alice, "alice", "/model?name=bob/mine").await,
        "notfound"
    );
    let listed = server
        .client(Some(&alice))
        .api(Method::GET, "/v1/models", None)
        .await
        .unwrap();
    assert!(!listed.to_string().contains("\"mine\""), "{listed}");
    let shown = server
        .client(Some(&alice))
        .send(Method::GET, "/v1/models/mine", None, &[])
        .await
        .unwrap();
    assert_error(&shown, 404, "not_found");
    let refused = server
        .client(Some(&alice))
        .send(Method::DELETE, "/v1/models/mine", None, &[])
        .await
        .unwrap();
    assert_error(&refused, 404, "not_found");

    // --force removes it even though bob's manifest names it.
    let forced = gigafactory(&server, admin, &["models", "remove", MINILM, "--force"]);
    success(forced);
    assert_eq!(
        probe(&server, &bob, "bob", "/model?name=all-minilm-l6-v2").await,
        "notfound"
    );
    let forced = gigafactory(&server, &bob, &["models", "remove", "mine", "--force"]);
    success(forced);
    assert_eq!(server.whoami(&bob).await["usage"]["model_bytes"], 0);

    // The repository directory is reread on SIGHUP.
    let dir = repository.path().join("tiny");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&tiny, dir.join("tiny.onnx")).unwrap();
    std::fs::write(
        dir.join("model.toml"),
        "format = \"onnx\"\nfile = \"tiny.onnx\"\npublic = true\n",
    )
    .unwrap();
    hang_up(&server);
    wait_for(&server, "tiny", true).await;
    assert_eq!(server.model("tiny").await["origin"], "directory");
    std::fs::remove_dir_all(&dir).unwrap();
    hang_up(&server);
    wait_for(&server, "tiny", false).await;
}

fn hang_up(server: &Server) {
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (10 s at most) until `GET /v1/models` lists `name` or not.
async fn wait_for(server: &Server, name: &str, listed: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let models = server
            .admin()
            .api(Method::GET, "/v1/models", None)
            .await
            .unwrap();
        let names: Vec<String> = models["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect();
        if names.iter().any(|n| n == name) == listed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} listed: {names:?}, wanted {listed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `tests/data/big/model.onnx` reads its 2.25 GiB table from `table.bin`.
const TABLE_ROWS: u64 = 589_824;
const ROW_BYTES: u64 = 1024 * 4;

#[tokio::test]
async fn an_upload_of_gigabytes_cut_short_resumes_where_it_stopped() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_without_models(data.path());
    let admin = support::ADMIN_TOKEN;
    // The model: a small graph and a sparse 2.25 GiB table, rows marked
    // at both ends, across the first part boundary (16 MiB = 4096 rows)
    // and in the middle.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        root().join("tests/data/big/model.onnx"),
        dir.path().join("model.onnx"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.toml"),
        "format = \"onnx\"\nfile = \"model.onnx\"\nload = \"first-use\"\npublic = true\n",
    )
    .unwrap();
    let marked = [0u64, 4095, 4096, 300_000, TABLE_ROWS - 1];
    let mut table = std::fs::File::create(dir.path().join("table.bin")).unwrap();
    table.set_len(TABLE_ROWS * ROW_BYTES).unwrap();
    for row in marked {
        table.seek(SeekFrom::Start(row * ROW_BYTES)).unwrap();
        table.write_all(&(row as f32 + 0.5).to_le_bytes()).unwrap();
    }
    drop(table);

    // Cut short: the upload is stopped once it has sent some parts.
    let path = dir.path().to_str().unwrap();
    let mut first = Command::new(binary())
        .args(["models", "add", "big", path])
        .env("GIGAFACTORY_URL", &server.url)
        .env("GIGAFACTORY_TOKEN", admin)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines.next().expect("the upload ended early").unwrap();
        seen.push(line.clone());
        if line.contains("table.bin: part 20 of") {
            break;
        }
    }
    first.kill().unwrap();
    first.wait().unwrap();
    eprintln!("first attempt, cut short after: {}", seen.last().unwrap());

    // Run again: it resumes from the parts the store has.
    let started = Instant::now();
    let second = Command::new(binary())
        .args(["models", "add", "big", path])
        .env("GIGAFACTORY_URL", &server.url)
        .env("GIGAFACTORY_TOKEN", admin)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    let resumed = stderr
        .lines()
        .find(|l| l.contains("resuming the upload"))
        .unwrap_or_else(|| panic!("it did not resume: {stderr}"));
    let stored: u64 = resumed
        .split("resuming the upload, ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(stored >= 20, "{resumed}");
    eprintln!(
        "{resumed}; the rest took {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The whole file arrived: the server checked its sha256, and the
    // marked rows come back from the model.
    let shown = server
        .admin()
        .api(Method::GET, "/v1/models/big", None)
        .await
        .unwrap();
    assert_eq!(
        shown["files"]["table.bin"]["size"],
        TABLE_ROWS * ROW_BYTES,
        "{shown}"
    );
    let key = server.tenant("t").await;
    let deployed = server
        .deploy_bundle(&key, "probe", probe_bundle("", &[]))
        .await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    let rows: Vec<String> = marked.iter().map(|r| r.to_string()).collect();
    let answer = probe(
        &server,
        &key,
        "t",
        &format!("/lookup?name=big&rows={}", rows.join(",")),
    )
    .await;
    let expected: Vec<String> = marked
        .iter()
        .map(|r| (*r as f32 + 0.5).to_string())
        .collect();
    assert_eq!(answer, expected.join(","));
    let unmarked = probe(&server, &key, "t", "/lookup?name=big&rows=1,200000").await;
    assert_eq!(unmarked, "0,0");

    // A file whose parts do not add up to its sha256 is refused and dropped.
    let client = server.admin();
    let body = |v: serde_json::Value| Some(("application/json", Bytes::from(v.to_string())));
    let fake = "ab".repeat(32);
    let begun = client
        .api(
            Method::PUT,
            &format!("/v1/model-files/{fake}"),
            body(serde_json::json!({"size": 5})),
        )
        .await
        .unwrap();
    assert_eq!(begun["parts"], 1, "{begun}");
    let sent = client
        .send(
            Method::PUT,
            &format!("/v1/model-files/{fake}/parts/0"),
            Some(("application/octet-stream", Bytes::from_static(b"hello"))),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(sent.status, 200, "{}", text(&sent));
    let refused = client
        .send(
            Method::POST,
            "/v1/models",
            body(serde_json::json!({
                "name": "fake", "files": {"model.onnx": {"sha256": fake, "size": 5}},
            })),
            &[],
        )
        .await
        .unwrap();
    assert_error(&refused, 400, "file_mismatch");
    let state = client
        .api(Method::GET, &format!("/v1/model-files/{fake}"), None)
        .await
        .unwrap();
    assert_eq!(state["received"], serde_json::json!([]), "{state}");
    // A part of the wrong size, or past the end, is refused.
    let wrong = client
        .send(
            Method::PUT,
            &format!("/v1/model-files/{fake}/parts/1"),
            Some(("application/octet-stream", Bytes::from_static(b"hello"))),
            &[],
        )
        .await
        .unwrap();
    assert_error(&wrong, 409, "conflict");
}
