//! Three nodes on one PostgreSQL database, on loopback: every node takes
//! any request, changes made on one reach the others, racing deploys are
//! numbered without gaps, and nodes come, die and drain.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use support::{Server, assert_error, json, probe_bundle, text, wasm};

/// Node names and their labels.
const NODES: [(&str, &str); 3] = [("a", "zone=east"), ("b", "zone=west"), ("c", "gpu=h200")];

/// How soon a change on one node must be seen on another.
const PROPAGATION: Duration = Duration::from_secs(1);
/// How long a model change may take to reach another node: fetching the
/// files from the store and loading the model come after the notification.
const MODEL_PROPAGATION: Duration = Duration::from_secs(10);

struct Cluster {
    nodes: Vec<Server>,
    url: String,
    _data: Vec<tempfile::TempDir>,
}

impl Cluster {
    async fn start() -> Self {
        let url = support::postgres_database().await;
        let mut data = Vec::new();
        let mut nodes = Vec::new();
        for (name, label) in NODES {
            let dir = tempfile::tempdir().unwrap();
            let flags = [
                "--store",
                &url,
                "--node-name",
                name,
                "--label",
                label,
                "--node-timeout-secs",
                "2",
                "--drain-secs",
                "10",
            ];
            nodes.push(Server::start_without_models_with(dir.path(), &flags));
            data.push(dir);
        }
        Self {
            nodes,
            url,
            _data: data,
        }
    }
}

/// Polls `probe` until it returns true; the time that took, or a panic
/// naming `what` after `limit`.
async fn within<F: Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> F,
) -> Duration {
    let started = Instant::now();
    loop {
        if probe().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not seen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn status(server: &Server, key: &str, method: Method, path: &str) -> u16 {
    server
        .client(Some(key))
        .send(method, path, None, &[])
        .await
        .unwrap()
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_on_one_node_reach_the_others_within_a_second() {
    let cluster = Cluster::start().await;
    let [a, b, c] = &cluster.nodes[..] else {
        unreachable!()
    };
    let key = a.tenant("acme").await;
    a.deploy(&key, "hello", wasm("hello")).await;
    for node in [b, c] {
        let answer = node.get_text(&key, "/fn/acme/hello/from-afar").await;
        assert!(answer.contains("/from-afar"), "{answer}");
    }

    // A redeploy on C: A and B run the new version.
    let bundle = probe_bundle(
        "[files]\n\"/data/greeting.txt\" = \"g.txt\"\n",
        &[("g.txt", "version two\n")],
    );
    let reply = c.deploy_bundle(&key, "hello", bundle).await;
    assert_eq!(reply.status, 201, "{}", text(&reply));
    for node in [a, b] {
        within(PROPAGATION, "a redeploy", || async {
            let reply = node
                .client(Some(&key))
                .send(Method::GET, "/fn/acme/hello/file", None, &[])
                .await
                .unwrap();
            text(&reply) == "ok:version two"
        })
        .await;
    }

    // A model added on A is served on B and C; updated on B, A serves
    // the new version; removed on C, it is gone everywhere (here within a
    // second too, but a larger model takes its fetch and load).
    let tiny = std::fs::read(support::root().join("tests/data/tiny.onnx")).unwrap();
    let admin = support::ADMIN_TOKEN;
    let public = "format = \"onnx\"\nfile = \"tiny.onnx\"\npublic = true\n";
    let added = support::add_model(a, admin, "tiny", &[("tiny.onnx", &tiny)], Some(public)).await;
    assert_eq!(added.status, 201, "{}", text(&added));
    let model_here = |node: &Server| {
        let client = node.client(Some(&key));
        async move {
            let reply = client
                .send(Method::GET, "/fn/acme/hello/model?name=tiny", None, &[])
                .await
                .unwrap();
            text(&reply)
        }
    };
    for node in [b, c] {
        within(MODEL_PROPAGATION, "an added model", || async {
            model_here(node).await == "ok"
        })
        .await;
    }
    let config = "format = \"onnx\"\nfile = \"tiny.onnx\"\npublic = true\nload = \"first-use\"\n";
    let updated = support::add_model(b, admin, "tiny", &[], Some(config)).await;
    assert_eq!(updated.status, 200, "{}", text(&updated));
    within(MODEL_PROPAGATION, "an updated model", || async {
        let shown = a
            .admin()
            .api(Method::GET, "/v1/models/tiny", None)
            .await
            .unwrap();
        shown["model"]["origin"]["api"]["version"] == 2
    })
    .await;
    let removed = c
        .admin()
        .send(Method::DELETE, "/v1/models/tiny", None, &[])
        .await
        .unwrap();
    assert_eq!(removed.status, 204, "{}", text(&removed));
    for node in [a, b] {
        within(MODEL_PROPAGATION, "a removed model", || async {
            model_here(node).await == "notfound"
        })
        .await;
    }

    // A key revoked on C is refused on A, which had it cached.
    let (second_key, id) = c.create_key("acme").await;
    assert_eq!(
        status(a, &second_key, Method::GET, "/v1/functions").await,
        200
    );
    c.revoke_key("acme", &id).await;
    within(PROPAGATION, "a revocation", || async {
        status(a, &second_key, Method::GET, "/v1/functions").await == 401
    })
    .await;
    assert_eq!(status(a, &key, Method::GET, "/v1/functions").await, 200);

    // A quota set on B is enforced on A.
    b.set_quota("acme", serde_json::json!({"requests_per_second": 1}))
        .await;
    within(PROPAGATION, "a quota", || async {
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(status(a, &key, Method::GET, "/fn/acme/hello/env").await);
        }
        statuses.contains(&429)
    })
    .await;

    // A tenant deleted on C is gone on A and B.
    let doomed = a.tenant("doomed").await;
    assert_eq!(status(b, &doomed, Method::GET, "/v1/functions").await, 200);
    let deleted = c
        .admin()
        .send(Method::DELETE, "/v1/tenants/doomed", None, &[])
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", text(&deleted));
    for node in [a, b] {
        within(PROPAGATION, "a tenant deletion", || async {
            status(node, &doomed, Method::GET, "/v1/functions").await == 401
        })
        .await;
    }
}

/// 100 keys, each used on A (so A caches it), revoked on C, and polled on
/// A until refused: prints the propagation time's p50 and maximum.
#[tokio::test(flavor = "multi_thread")]
async fn revocations_propagate_and_their_delay_is_measured() {
    const CHANGES: usize = 100;
    let cluster = Cluster::start().await;
    let [a, _, c] = &cluster.nodes[..] else {
        unreachable!()
    };
    a.tenant("acme").await;
    let mut delays = Vec::with_capacity(CHANGES);
    for _ in 0..CHANGES {
        let (key, id) = c.create_key("acme").await;
        assert_eq!(status(a, &key, Method::GET, "/v1/functions").await, 200);
        c.revoke_key("acme", &id).await;
        let delay = within(PROPAGATION, "a revocation", || async {
            status(a, &key, Method::GET, "/v1/functions").await == 401
        })
        .await;
        delays.push(delay);
    }
    delays.sort_unstable();
    eprintln!(
        "revocation on C refused on A after: p50 {:.1} ms, max {:.1} ms ({CHANGES} changes)",
        delays[CHANGES / 2].as_secs_f64() * 1000.0,
        delays[CHANGES - 1].as_secs_f64() * 1000.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_deploys_on_two_nodes_are_numbered_one_to_sixteen() {
    let cluster = Cluster::start().await;
    let [a, b, _] = &cluster.nodes[..] else {
        unreachable!()
    };
    let key = a.tenant("acme").await;
    let manifest = "[files]\n\"/data/greeting.txt\" = \"g.txt\"\n";
    let deploys = (0..16).map(|i| {
        let node = if i % 2 == 0 { a } else { b };
        let bundle = probe_bundle(manifest, &[("g.txt", &format!("racer {i}\n"))]);
        node.deploy_bundle(&key, "probe", bundle)
    });
    let replies = futures_util::future::join_all(deploys).await;
    assert_eq!(
        support::created_versions(&replies),
        (1..=16).collect::<Vec<u64>>()
    );
    let function = b
        .client(Some(&key))
        .api(Method::GET, "/v1/functions/probe", None)
        .await
        .unwrap();
    assert_eq!(function["versions"].as_array().unwrap().len(), 16);
    assert_eq!(function["active_version"], 16, "{function}");
}

/// The nodes as `GET /v1/nodes` on `server` shows them: name → state.
async fn node_states(server: &Server) -> Vec<(String, String)> {
    let nodes = server
        .admin()
        .api(Method::GET, "/v1/nodes", None)
        .await
        .unwrap();
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let name = n["name"].as_str().unwrap().to_string();
            (name, n["state"].as_str().unwrap().to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_register_die_and_drain() {
    let mut cluster = Cluster::start().await;
    let a = &cluster.nodes[0];
    let listed = a.admin().api(Method::GET, "/v1/nodes", None).await.unwrap();
    let nodes = listed["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{listed}");
    assert_eq!(nodes[2]["labels"]["gpu"], "h200", "{listed}");
    assert_eq!(nodes[1]["state"], "ready", "{listed}");
    assert_eq!(nodes[0]["report"]["store"], "postgres", "{listed}");
    let key = a.tenant("acme").await;
    let refused = a
        .client(Some(&key))
        .send(Method::GET, "/v1/nodes", None, &[])
        .await
        .unwrap();
    assert_error(&refused, 403, "forbidden");

    // A second process cannot take a live node's name.
    let dir = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    let duplicate = std::process::Command::new(support::binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--store", &cluster.url])
        .args(["--node-name", "a", "--data"])
        .arg(dir.path())
        .arg("--models")
        .arg(models.path())
        .output()
        .unwrap();
    assert!(!duplicate.status.success());
    let said = String::from_utf8_lossy(&duplicate.stderr);
    assert!(said.contains("another process is node \"a\""), "{said}");

    // kill -9: dead to the others once its heartbeats stop.
    cluster.nodes.pop().unwrap().kill();
    within(Duration::from_secs(10), "c dead", || async {
        node_states(&cluster.nodes[0])
            .await
            .contains(&("c".into(), "dead".into()))
    })
    .await;

    // SIGTERM while requests run: every one finishes, then the node leaves.
    let b = cluster.nodes.pop().unwrap();
    b.deploy(&key, "probe", wasm("manifest_probe")).await;
    let slow: Vec<_> = (0..8)
        .map(|i| {
            let client = b.client(Some(&key));
            tokio::spawn(async move {
                let path = format!("/fn/acme/probe/sleep?ms={}", 1000 + 100 * i);
                client.send(Method::GET, &path, None, &[]).await.unwrap()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = std::thread::spawn(move || b.stop());
    for request in slow {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 200, "{}", text(&reply));
    }
    stopping.join().unwrap();
    let states = node_states(&cluster.nodes[0]).await;
    assert!(
        !states.iter().any(|(name, _)| name == "b"),
        "b left: {states:?}"
    );
}

/// The embedding model's name.
const MODEL: &str = "all-minilm-l6-v2";

/// A model repository with only the embedding model.
fn embedding_repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let real = support::root().join("models").join(MODEL);
    std::os::unix::fs::symlink(real.canonicalize().unwrap(), dir.path().join(MODEL)).unwrap();
    dir
}

/// Starts node `name` on `url`: with the embedding model, or none.
fn node(url: &str, name: &str, data: &std::path::Path, models: Option<&std::path::Path>) -> Server {
    node_with(url, name, data, models, &[])
}

/// [`node`] with extra `serve` flags.
fn node_with(
    url: &str,
    name: &str,
    data: &std::path::Path,
    models: Option<&std::path::Path>,
    extra: &[&str],
) -> Server {
    let mut flags = vec![
        "--store",
        url,
        "--node-name",
        name,
        "--cluster-secret",
        "test-cluster-secret",
        "--node-timeout-secs",
        "2",
    ];
    flags.extend_from_slice(extra);
    match models {
        Some(models) => Server::start_with_models(data, models, &flags),
        None => Server::start_without_models_with(data, &flags),
    }
}

/// The embedding of `input` through `server`'s `/fn/acme/embed`, or the
/// status and body it failed with.
async fn embedding(server: &Server, key: &str, input: &str) -> Result<Vec<f32>, (u16, String)> {
    let reply = server
        .client(Some(key))
        .send(
            Method::POST,
            "/fn/acme/embed",
            Some(("text/plain", Bytes::from(input.to_string()))),
            &[],
        )
        .await
        .map_err(|e| (0, format!("{e:#}")))?;
    if reply.status != 200 {
        return Err((reply.status.as_u16(), text(&reply)));
    }
    Ok(support::floats(&json(&reply)["embedding"]))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_runs_where_its_model_is_and_survives_a_replica_killed() {
    let url = support::postgres_database().await;
    let repository = embedding_repository();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(&url, "a", dirs[0].path(), Some(repository.path()));
    let b = node(&url, "b", dirs[1].path(), Some(repository.path()));
    let c = node(&url, "c", dirs[2].path(), None);
    // C has no models: its deploy checks the model against the cluster's.
    let key = c.tenant("acme").await;
    let manifest = format!("models = [\"{MODEL}\"]");
    let bundle =
        gigafactory_gateway::bundle::Bundle::pack(&wasm("embed"), Some(&manifest), &[]).unwrap();
    let deployed = c.deploy_bundle(&key, "embed", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));

    let sentence = "A model on another node answers as if it were here.";
    let here = embedding(&a, &key, sentence).await.unwrap();
    let through_c = embedding(&c, &key, sentence).await.unwrap();
    assert_eq!(here.len(), 384);
    let largest = support::largest_difference(&here, &through_c);
    assert!(largest <= 1e-5, "differs by {largest}");
    let metrics = c.metrics().await;
    assert!(
        metrics.contains("gigafactory_forwarded_requests_total{node=\"a\",outcome=\"ok\"}")
            || metrics.contains("gigafactory_forwarded_requests_total{node=\"b\",outcome=\"ok\"}"),
        "{metrics}"
    );

    // The OpenAI-compatible endpoint too.
    let body = serde_json::json!({"model": MODEL, "input": [sentence]}).to_string();
    let mut vectors = Vec::new();
    for server in [&a, &c] {
        let reply = server
            .post(
                &key,
                "/openai/v1/embeddings",
                "application/json",
                body.clone(),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", text(&reply));
        vectors.push(support::floats(&json(&reply)["data"][0]["embedding"]));
    }
    let largest = support::largest_difference(&vectors[0], &vectors[1]);
    assert!(largest <= 1e-5, "OpenAI embeddings differ by {largest}");
    let listed = c
        .client(Some(&key))
        .api(Method::GET, "/openai/v1/models", None)
        .await
        .unwrap();
    assert_eq!(listed["data"][0]["id"], MODEL, "{listed}");

    // The cluster's header is the nodes' own.
    let spoofed = c
        .client(Some(&key))
        .send(
            Method::POST,
            "/fn/acme/embed",
            Some(("text/plain", Bytes::from_static(b"x"))),
            &[("gigafactory-cluster-secret".into(), "a guess".into())],
        )
        .await
        .unwrap();
    assert_error(&spoofed, 403, "forbidden");

    // Clients load the cluster through C while A is killed: requests in
    // flight on A fail cleanly, and within 3 s every request goes to B.
    let load = {
        let (c, key) = (std::sync::Arc::new(c), key.clone());
        (0..8)
            .map(|i| {
                let (c, key) = (c.clone(), key.clone());
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    let started = Instant::now();
                    while started.elapsed() < Duration::from_secs(6) {
                        let outcome = embedding(&c, &key, &format!("sentence {i}")).await;
                        outcomes.push((started.elapsed(), outcome.map(|_| ())));
                    }
                    outcomes
                })
            })
            .collect::<Vec<_>>()
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let killed_at = Duration::from_millis(1000);
    a.kill();
    let mut failures = Vec::new();
    let mut late_ok = 0;
    for client in load {
        for (at, outcome) in client.await.unwrap() {
            match outcome {
                Ok(()) if at > killed_at + Duration::from_secs(3) => late_ok += 1,
                Ok(()) => {}
                Err((status, body)) => {
                    assert!(
                        body.contains("node_failed") || body.contains("model_unavailable"),
                        "an unclean failure ({status}): {body}"
                    );
                    failures.push(at);
                }
            }
        }
    }
    assert!(late_ok > 0, "nothing succeeded after the kill");
    for at in &failures {
        assert!(
            *at < killed_at + Duration::from_secs(3),
            "a request failed {at:?} after start, over 3 s after the kill"
        );
    }
    eprintln!(
        "{} requests failed around the kill; {late_ok} succeeded after it",
        failures.len()
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_serve_through_a_database_restart_and_recover_without_one() {
    let database = support::PrivatePostgres::start();
    let url = database.url();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let flags = ["--store", &url, "--node-timeout-secs", "2"];
    let a = Server::start_without_models_with(
        dirs[0].path(),
        &[&flags[..], &["--node-name", "a"]].concat(),
    );
    let b = Server::start_without_models_with(
        dirs[1].path(),
        &[&flags[..], &["--node-name", "b"]].concat(),
    );
    let key = a.tenant("acme").await;
    a.deploy(&key, "hello", wasm("hello")).await;
    for node in [&a, &b] {
        assert!(
            node.get_text(&key, "/fn/acme/hello/warm")
                .await
                .contains("/warm")
        );
    }

    // Clients keep calling both nodes through the stop and the start.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load: Vec<_> = [&a, &b]
        .into_iter()
        .map(|node| {
            let (client, running) = (node.client(Some(&key)), running.clone());
            tokio::spawn(async move {
                let mut answered = 0;
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    let reply = client
                        .send(Method::GET, "/fn/acme/hello/under-load", None, &[])
                        .await
                        .unwrap();
                    assert_eq!(reply.status, 200, "{}", text(&reply));
                    answered += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                answered
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    database.stop();
    for node in [&a, &b] {
        let answer = node.get_text(&key, "/fn/acme/hello/cached").await;
        assert!(answer.contains("/cached"), "{answer}");
    }
    let refused = a
        .admin()
        .send(
            Method::POST,
            "/v1/tenants",
            Some(("application/json", r#"{"name":"later"}"#.into())),
            &[],
        )
        .await
        .unwrap();
    assert_error(&refused, 503, "store_unavailable");
    assert!(
        refused.headers.contains_key("retry-after"),
        "{:?}",
        refused.headers
    );
    // Not ready while its store is away (it still serves what it cached).
    let ready = a
        .admin()
        .send(Method::GET, "/readyz", None, &[])
        .await
        .unwrap();
    assert_error(&ready, 503, "store_unavailable");

    database.start_again();
    within(Duration::from_secs(20), "writes accepted again", || async {
        let created = a
            .admin()
            .send(
                Method::POST,
                "/v1/tenants",
                Some(("application/json", r#"{"name":"later"}"#.into())),
                &[],
            )
            .await
            .unwrap();
        created.status == 201
    })
    .await;
    let ready = a
        .admin()
        .send(Method::GET, "/readyz", None, &[])
        .await
        .unwrap();
    assert_eq!(ready.status, 200, "{}", text(&ready));
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    for client in load {
        assert!(client.await.unwrap() > 0, "a client got no answer");
    }
    // B listens again: a key revoked on A is refused on B within a second.
    let (second, id) = a.create_key("acme").await;
    assert_eq!(status(&b, &second, Method::GET, "/v1/functions").await, 200);
    a.revoke_key("acme", &id).await;
    within(PROPAGATION, "a revocation after the restart", || async {
        status(&b, &second, Method::GET, "/v1/functions").await == 401
    })
    .await;
}

/// A tenant limited to 30 requests/s, loaded through all three nodes:
/// the cluster admits 30/s ± 15% over 10 s, not 30/s per node.
#[tokio::test(flavor = "multi_thread")]
async fn a_rate_quota_holds_across_the_cluster() {
    const RATE: f64 = 30.0;
    let cluster = Cluster::start().await;
    let key = cluster.nodes[0].tenant("acme").await;
    cluster.nodes[0].deploy(&key, "hello", wasm("hello")).await;
    cluster.nodes[0]
        .set_quota("acme", serde_json::json!({"requests_per_second": RATE}))
        .await;
    let (settle, measure) = (Duration::from_secs(3), Duration::from_secs(10));
    let started = Instant::now();
    let clients: Vec<_> = cluster
        .nodes
        .iter()
        .flat_map(|node| (0..3).map(|_| node.client(Some(&key))))
        .map(|client| {
            tokio::spawn(async move {
                let mut admitted = 0u32;
                while started.elapsed() < settle + measure {
                    let reply = client
                        .send(Method::GET, "/fn/acme/hello/", None, &[])
                        .await
                        .unwrap();
                    let counted = started.elapsed() > settle;
                    match reply.status.as_u16() {
                        200 if counted => admitted += 1,
                        200 | 429 => {}
                        other => panic!("{other}: {}", text(&reply)),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for client in clients {
        admitted += client.await.unwrap();
    }
    let per_second = f64::from(admitted) / measure.as_secs_f64();
    eprintln!("admitted {per_second:.1} requests/s across three nodes (quota {RATE})");
    assert!(
        (RATE * 0.85..=RATE * 1.15).contains(&per_second),
        "admitted {per_second:.1}/s for a quota of {RATE}/s"
    );
}

/// The text model's name.
const TEXT_MODEL: &str = "smollm2-135m-instruct";

/// Models on A only: B's and C's calls join A's batches, and a greedy
/// answer through C is A's word for word.
#[tokio::test(flavor = "multi_thread")]
async fn one_nodes_models_serve_the_cluster_in_shared_batches() {
    let url = support::postgres_database().await;
    let repository = embedding_repository();
    let text_model = support::root().join("models").join(TEXT_MODEL);
    std::os::unix::fs::symlink(
        text_model.canonicalize().unwrap(),
        repository.path().join(TEXT_MODEL),
    )
    .unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node(&url, "a", dirs[0].path(), Some(repository.path()));
    let b = node(&url, "b", dirs[1].path(), None);
    let c = node(&url, "c", dirs[2].path(), None);
    let key = a.tenant("acme").await;
    let manifest = format!("models = [\"{MODEL}\"]");
    let bundle =
        gigafactory_gateway::bundle::Bundle::pack(&wasm("embed"), Some(&manifest), &[]).unwrap();
    let deployed = a.deploy_bundle(&key, "embed", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));

    let before = a.model(MODEL).await["stats"].clone();
    let calls = (0..24).map(|i| {
        let via = if i % 2 == 0 { &b } else { &c };
        embedding(via, &key, SENTENCES[i % SENTENCES.len()])
    });
    for outcome in futures_util::future::join_all(calls).await {
        assert_eq!(outcome.unwrap().len(), 384);
    }
    let after = a.model(MODEL).await["stats"].clone();
    let count = |stats: &serde_json::Value, name: &str| stats[name].as_u64().unwrap();
    let calls = count(&after, "calls") - count(&before, "calls");
    let batches = count(&after, "batches") - count(&before, "batches");
    assert_eq!(calls, 24, "{after}");
    assert!(
        batches < calls,
        "{calls} calls from B and C ran in {batches} batches on A"
    );

    let chat = serde_json::json!({
        "model": TEXT_MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "temperature": 0,
        "max_tokens": 16,
    })
    .to_string();
    let mut answers = Vec::new();
    for server in [&a, &c] {
        let reply = server
            .post(
                &key,
                "/openai/v1/chat/completions",
                "application/json",
                chat.clone(),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", text(&reply));
        answers.push(json(&reply)["choices"][0]["message"]["content"].clone());
    }
    assert!(
        answers[0].as_str().is_some_and(|a| !a.is_empty()),
        "{answers:?}"
    );
    assert_eq!(answers[0], answers[1]);

    // With the only holder gone, the function is unavailable, not broken.
    a.kill();
    let unavailable = c
        .client(Some(&key))
        .send(
            Method::POST,
            "/fn/acme/embed",
            Some(("text/plain", Bytes::from_static(b"anyone there?"))),
            &[],
        )
        .await
        .unwrap();
    assert_error(&unavailable, 503, "model_unavailable");
    assert!(unavailable.headers.contains_key("retry-after"));
}

/// Sentences for concurrent embedding calls.
const SENTENCES: [&str; 4] = [
    "The quick brown fox jumps over the lazy dog.",
    "Batches fill with calls from every node.",
    "A model on one node serves the whole cluster.",
    "How far is the moon from the earth?",
];

#[tokio::test(flavor = "multi_thread")]
async fn nodes_serving_https_reach_each_other_over_tls() {
    let url = support::postgres_database().await;
    let repository = embedding_repository();
    // One certificate for both nodes' address, and the CA they trust.
    let pki = tempfile::tempdir().unwrap();
    let issued =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (pki.path().join("cert.pem"), pki.path().join("key.pem"));
    std::fs::write(&cert, issued.cert.pem()).unwrap();
    std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
    let tls = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--peer-ca",
        cert.to_str().unwrap(),
    ];
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = node_with(&url, "a", dirs[0].path(), Some(repository.path()), &tls).trusting(&cert);
    let c = node_with(&url, "c", dirs[1].path(), None, &tls).trusting(&cert);
    let key = c.tenant("acme").await;
    let manifest = format!("models = [\"{MODEL}\"]");
    let bundle =
        gigafactory_gateway::bundle::Bundle::pack(&wasm("embed"), Some(&manifest), &[]).unwrap();
    let deployed = c.deploy_bundle(&key, "embed", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));

    // Each advertises its https:// address; C sends A the request over TLS.
    let nodes = a.admin().api(Method::GET, "/v1/nodes", None).await.unwrap();
    let addresses: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["address"].as_str().unwrap())
        .collect();
    assert!(
        addresses
            .iter()
            .all(|a| a.starts_with("https://127.0.0.1:")),
        "{nodes}"
    );
    let sentence = "Sent between nodes over TLS.";
    let here = embedding(&a, &key, sentence).await.unwrap();
    let through_c = embedding(&c, &key, sentence).await.unwrap();
    assert!(support::largest_difference(&here, &through_c) <= 1e-5);
    assert!(
        c.metrics()
            .await
            .contains("gigafactory_forwarded_requests_total{node=\"a\",outcome=\"ok\"}")
    );

    // Billed once: the forwarded call is one request (C's), run on A.
    a.stop();
    c.stop();
    let reader = node(&url, "reader", dirs[0].path(), None);
    let usage = reader
        .client(Some(&key))
        .api(Method::GET, "/v1/usage", None)
        .await
        .unwrap();
    let total = |field: &str| -> f64 {
        usage["usage"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row[field].as_f64().unwrap())
            .sum()
    };
    assert_eq!(
        total("requests"),
        2.0,
        "one call on A, one through C: {usage}"
    );
    assert!(total("compute_seconds") > 0.0, "{usage}");
}
