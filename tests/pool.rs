//! The shared model pool through HTTP: a tenant flooding a model gets
//! prompt 503s and never starves another tenant; the pool's counters show
//! in `GET /v1/models` and `/metrics`; tenants' own graphs are compiled once;
//! models load on demand, are evicted least recently used past a memory
//! budget (never a pinned one) and unloaded when idle.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use support::{
    Server, assert_error, floats, json, largest_difference, reference_embeddings, root, text, wasm,
};

const MODEL: &str = "all-minilm-l6-v2";

/// A repository with the shipped MiniLM under a small queue: 4 rows per
/// batch, 8 calls waiting at most, 4 of them per tenant.
fn small_queue_repository(dir: &Path) {
    let model = dir.join(MODEL);
    std::fs::create_dir_all(&model).unwrap();
    let shipped = root().join("models").join(MODEL).join("model.onnx");
    assert!(
        shipped.is_file(),
        "{} is missing: run ./dev models",
        shipped.display()
    );
    std::os::unix::fs::symlink(&shipped, model.join("model.onnx")).unwrap();
    std::fs::write(
        model.join("model.toml"),
        r#"
format = "onnx"
public = true
[batching]
max_batch = 4
max_queue_delay_ms = 2
max_queue = 8
[batching.pad]
input_ids = { axis = 1 }
attention_mask = { axis = 1 }
token_type_ids = { axis = 1 }
[batching.slice]
last_hidden_state = { axis = 1, like = "input_ids" }
"#,
    )
    .unwrap();
}

async fn embed(server: &Server, key: &str, tenant: &str, function: &str) -> support::Reply {
    server
        .client(Some(key))
        .send(
            Method::POST,
            &format!("/fn/{tenant}/{function}"),
            Some(("text/plain", Bytes::from_static(b"a quick brown fox"))),
            &[],
        )
        .await
        .unwrap()
}

fn summary(latencies: &mut [Duration]) -> String {
    latencies.sort();
    format!(
        "p50 {:.1} ms, max {:.1} ms over {}",
        latencies[latencies.len() / 2].as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
        latencies.len()
    )
}

#[tokio::test]
async fn a_flooding_tenant_gets_503s_and_another_tenant_is_always_served() {
    let data = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    small_queue_repository(models.path());
    let server = Arc::new(Server::start_with_models(data.path(), models.path(), &[]));
    let flooder = server.tenant("flooder").await;
    let quiet = server.tenant("quiet").await;
    server.deploy(&flooder, "embed", wasm("embed")).await;
    server.deploy(&flooder, "unwrap", wasm("nn_unwrap")).await;
    server.deploy(&quiet, "embed", wasm("embed")).await;

    let mut alone = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let reply = embed(&server, &quiet, "quiet", "embed").await;
        assert_eq!(reply.status, 200, "{}", text(&reply));
        alone.push(started.elapsed());
    }

    // 32 clients of the flooder, half through the SDK's error handling
    // (embed answers 503 itself), half through a function that traps on
    // the refusal (the gateway answers 503 for it).
    let flooding = Arc::new(AtomicBool::new(true));
    let clients: Vec<_> = (0..32)
        .map(|client| {
            let (server, key, flooding) = (server.clone(), flooder.clone(), flooding.clone());
            let function = ["embed", "unwrap"][client % 2];
            tokio::spawn(async move {
                let (mut served, mut refused) = (0, 0);
                while flooding.load(Ordering::Relaxed) {
                    let reply = embed(&server, &key, "flooder", function).await;
                    if reply.status == 200 {
                        served += 1;
                    } else {
                        assert_error(&reply, 503, "model_busy");
                        assert_eq!(
                            reply.headers.get("retry-after").map(|v| v.as_bytes()),
                            Some(&b"1"[..]),
                            "{function}: 503 without Retry-After"
                        );
                        refused += 1;
                    }
                }
                (client % 2, served, refused)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut during = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let reply = embed(&server, &quiet, "quiet", "embed").await;
        assert_eq!(
            reply.status,
            200,
            "the quiet tenant was refused during the flood: {}",
            text(&reply)
        );
        during.push(started.elapsed());
    }
    flooding.store(false, Ordering::Relaxed);
    let (mut served, mut refused, mut refused_by) = (0, 0, [0u64; 2]);
    for client in clients {
        let (function, s, r) = client.await.unwrap();
        served += s;
        refused += r;
        refused_by[function] += r;
    }
    eprintln!(
        "quiet tenant alone: {}; during the flood: {}; flooder: {served} served, {refused} refused with 503",
        summary(&mut alone),
        summary(&mut during)
    );
    assert!(served > 0, "the flooder was never served");
    assert!(
        refused_by.iter().all(|&r| r > 0),
        "32 clients never overflowed a queue of 8 for both functions: {refused_by:?}"
    );

    let models = server
        .client(Some(&quiet))
        .api(Method::GET, "/v1/models", None)
        .await
        .unwrap();
    let stats = &models["models"][0]["stats"];
    assert_eq!(stats["rejected"].as_u64(), Some(refused), "{stats}");
    assert_eq!(
        stats["calls"].as_u64(),
        Some(served + 25),
        "every served request is one call: {stats}"
    );
    assert!(
        stats["batches"].as_u64().unwrap() < stats["calls"].as_u64().unwrap(),
        "no call shared a batch: {stats}"
    );
    assert_eq!(stats["queued"], 0, "{stats}");

    let metrics = server.metrics().await;
    let series = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in /metrics:\n{metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    let model = format!("{{model=\"{MODEL}\"}}");
    assert_eq!(
        series(&format!("gigafactory_model_rejections_total{model}")),
        refused as f64
    );
    assert_eq!(
        series(&format!("gigafactory_model_batch_rows_count{model}")),
        stats["batches"].as_f64().unwrap()
    );
    assert_eq!(
        series(&format!(
            "gigafactory_model_queue_wait_seconds_count{model}"
        )),
        stats["calls"].as_f64().unwrap()
    );
    for tenant in ["flooder", "quiet"] {
        let seconds = series(&format!(
            "gigafactory_model_tenant_compute_seconds_total{{model=\"{MODEL}\",tenant=\"{tenant}\"}}"
        ));
        assert!(seconds > 0.0, "{tenant} was charged nothing");
    }
    assert_eq!(
        series("gigafactory_function_duration_seconds_count{tenant=\"quiet\",function=\"embed\"}"),
        25.0
    );
    // The function that traps was answered 503 by the gateway; embed
    // answered its own 503s, which count as responses.
    assert_eq!(
        series(
            "gigafactory_function_requests_total{tenant=\"flooder\",function=\"unwrap\",outcome=\"model_busy\"}"
        ),
        refused_by[1] as f64
    );

    // The same numbers as JSON, for the console: distributions on every
    // model, each tenant's calls for the operator only, each function's
    // outcomes and latency for its tenant.
    let batch_rows = &stats["batch_rows"];
    assert_eq!(batch_rows["count"], stats["batches"], "{stats}");
    let in_buckets: u64 = batch_rows["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(in_buckets, batch_rows["count"].as_u64().unwrap());
    let wait = &stats["queue_wait_seconds"];
    assert_eq!(wait["count"], stats["calls"], "{stats}");
    assert!(
        wait["p50"].as_f64().unwrap() <= wait["p99"].as_f64().unwrap(),
        "{wait}"
    );
    assert!(
        models["models"][0].get("tenants").is_none(),
        "a tenant saw who else uses the model: {}",
        models["models"][0]
    );
    let operator = server
        .admin()
        .api(Method::GET, "/v1/models", None)
        .await
        .unwrap();
    let tenants = &operator["models"][0]["tenants"];
    let calls = |tenant: &str| tenants[tenant]["calls"].as_u64().unwrap();
    assert_eq!(calls("quiet"), 25, "{tenants}");
    assert_eq!(
        calls("quiet") + calls("flooder"),
        stats["calls"].as_u64().unwrap(),
        "{tenants}"
    );
    assert!(tenants["flooder"]["compute_seconds"].as_f64().unwrap() > 0.0);
    let function = server
        .client(Some(&flooder))
        .api(Method::GET, "/v1/functions/unwrap", None)
        .await
        .unwrap();
    let requests = &function["requests"];
    assert_eq!(
        requests["outcomes"]["model_busy"].as_u64(),
        Some(refused_by[1]),
        "{requests}"
    );
    let answered: u64 = requests["outcomes"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(
        requests["latency_seconds"]["count"].as_u64(),
        Some(answered),
        "{requests}"
    );
}

#[tokio::test]
async fn a_tenants_own_graph_is_compiled_once_and_dropped_with_the_tenant() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let key = server.tenant("acme").await;
    server.deploy(&key, "tiny", wasm("nn_load")).await;
    for _ in 0..3 {
        server.get_text(&key, "/fn/acme/tiny").await;
    }
    let before = server.metrics().await;
    for line in [
        "gigafactory_tenant_graph_loads_total{tenant=\"acme\",result=\"miss\"} 1",
        "gigafactory_tenant_graph_loads_total{tenant=\"acme\",result=\"hit\"} 2",
        "gigafactory_tenant_graph_evictions_total{tenant=\"acme\"} 0",
    ] {
        assert!(before.lines().any(|l| l == line), "no {line}:\n{before}");
    }
    let cached: u64 = before
        .lines()
        .find_map(|l| l.strip_prefix("gigafactory_tenant_graph_bytes{tenant=\"acme\"} "))
        .expect("the tenant's cached bytes")
        .parse()
        .unwrap();
    assert!(cached > 0, "{before}");

    let reply = server
        .admin()
        .send(Method::DELETE, "/v1/tenants/acme", None, &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 204, "{}", text(&reply));
    let after = server.metrics().await;
    assert!(!after.contains("tenant=\"acme\""), "{after}");
}

#[tokio::test]
async fn models_load_at_boot_or_on_first_use_and_failures_keep_their_reason() {
    let data = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    let lazy = models.path().join(MODEL);
    std::fs::create_dir_all(&lazy).unwrap();
    std::os::unix::fs::symlink(
        root().join("models").join(MODEL).join("model.onnx"),
        lazy.join("model.onnx"),
    )
    .unwrap();
    std::fs::write(
        lazy.join("model.toml"),
        "format = \"onnx\"\npublic = true\nload = \"first-use\"\n",
    )
    .unwrap();
    let broken = models.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("model.onnx"), b"not an onnx graph").unwrap();
    std::fs::write(
        broken.join("model.toml"),
        "format = \"onnx\"\npublic = true\n",
    )
    .unwrap();

    let server = Server::start_with_models(data.path(), models.path(), &[]);
    let key = server.tenant("acme").await;
    let listed = || async {
        let models = server
            .client(Some(&key))
            .api(Method::GET, "/v1/models", None)
            .await
            .unwrap();
        models["models"].as_array().unwrap().clone()
    };
    let before = listed().await;
    let (minilm, broken) = (&before[0], &before[1]);
    assert_eq!(minilm["name"], MODEL);
    assert_eq!(minilm["load"], "first-use", "{minilm}");
    assert_eq!(minilm["state"], "unloaded", "{minilm}");
    assert_eq!(broken["state"], "failed", "{broken}");
    assert!(
        broken["error"].as_str().unwrap().contains("parsing"),
        "{broken}"
    );

    server.deploy(&key, "unwrap", wasm("nn_unwrap")).await;
    assert_eq!(
        server.get_text(&key, "/fn/acme/unwrap").await,
        "[1, 6, 384]\n"
    );
    let after = listed().await;
    assert_eq!(after[0]["state"], "ready", "{}", after[0]);
    assert!(after[0]["load_ms"].as_u64().unwrap() > 0, "{}", after[0]);
    assert_eq!(after[0]["stats"]["calls"], 1, "{}", after[0]);
}

/// A repository of copies of the shipped MiniLM, each `name` with extra
/// `model.toml` lines.
fn minilm_copies(dir: &Path, copies: &[(&str, &str)]) {
    let shipped = root().join("models").join(MODEL);
    let toml = std::fs::read_to_string(shipped.join("model.toml")).unwrap();
    for (name, extra) in copies {
        let model = dir.join(name);
        std::fs::create_dir_all(&model).unwrap();
        for file in ["model.onnx", "vocab.txt"] {
            std::os::unix::fs::symlink(shipped.join(file), model.join(file)).unwrap();
        }
        // Top-level keys go before the first [section].
        let (top, sections) = toml.split_at(toml.find("\n[").unwrap());
        std::fs::write(
            model.join("model.toml"),
            format!("{top}\n{extra}\n{sections}"),
        )
        .unwrap();
    }
}

/// Embeds the first reference sentence with `model` and checks the vector.
async fn embeds_correctly(server: &Server, key: &str, model: &str) {
    let (sentence, expected, _) = &reference_embeddings()[0];
    let body = serde_json::json!({"model": model, "input": sentence}).to_string();
    let reply = server
        .post(key, "/openai/v1/embeddings", "application/json", body)
        .await;
    assert_eq!(reply.status, 200, "{model}: {}", text(&reply));
    let vector = floats(&json(&reply)["data"][0]["embedding"]);
    let off = largest_difference(&vector, expected);
    assert!(off < 1e-3, "{model}: {off}");
}

#[tokio::test]
async fn past_the_memory_budget_the_least_recently_used_model_is_evicted_never_a_pinned_one() {
    let (data, models) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    minilm_copies(
        models.path(),
        &[
            ("pinned", "pin = true"),
            ("b", "load = \"first-use\""),
            ("c", "load = \"first-use\""),
        ],
    );
    // On ONNX Runtime with 2 inference threads each copy takes ~69 MiB
    // (three sessions of a 23 MB file): two fit in 160 MiB, three do not.
    let server = Server::start_with_models(
        data.path(),
        models.path(),
        &[
            "--cpu-model-memory-mib",
            "160",
            "--onnx-engine",
            "onnxruntime",
            "--inference-threads",
            "2",
        ],
    );
    let key = server.tenant("acme").await;
    assert_eq!(server.model("pinned").await["state"], "ready");
    for model in ["b", "c", "b", "pinned", "c", "b"] {
        embeds_correctly(&server, &key, model).await;
        assert_eq!(server.model(model).await["state"], "ready");
    }
    let (b, c, pinned) = (
        server.model("b").await,
        server.model("c").await,
        server.model("pinned").await,
    );
    assert_eq!(pinned["unloads"], 0, "{pinned}");
    assert_eq!(pinned["loads"], 1, "{pinned}");
    assert_eq!(pinned["pin"], true);
    // b and c took turns: each call after the first evicted the other.
    assert_eq!(b["loads"], 3, "{b}");
    assert_eq!(c["loads"], 2, "{c}");
    assert_eq!(c["unloads"], 2, "{c}");
    assert_eq!(c["state"], "evicted", "{c}");
    let devices = server
        .client(Some(&key))
        .api(Method::GET, "/v1/devices", None)
        .await
        .unwrap();
    let cpu = &devices["devices"][0];
    assert!(
        cpu["used_bytes"].as_u64().unwrap() <= cpu["budget_bytes"].as_u64().unwrap(),
        "{cpu}"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("gigafactory_model_unloads_total{model=\"b\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gigafactory_model_load_wait_seconds_count 5\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_idle_model_is_unloaded_and_the_next_call_loads_it_again() {
    let (data, models) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    minilm_copies(models.path(), &[("idle", "idle_unload_after_secs = 1")]);
    let server = Server::start_with_models(data.path(), models.path(), &[]);
    let key = server.tenant("acme").await;
    embeds_correctly(&server, &key, "idle").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let evicted = loop {
        let model = server.model("idle").await;
        if model["state"] == "evicted" || Instant::now() > deadline {
            break model;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(evicted["state"], "evicted", "{evicted}");
    assert_eq!(evicted["unloads"], 1, "{evicted}");
    let devices = server
        .client(Some(&key))
        .api(Method::GET, "/v1/devices", None)
        .await
        .unwrap();
    assert_eq!(devices["devices"][0]["used_bytes"], 0, "{devices}");
    embeds_correctly(&server, &key, "idle").await;
    let again = server.model("idle").await;
    assert_eq!(again["state"], "ready", "{again}");
    assert_eq!(again["loads"], 2, "{again}");
}
