//! What one tenant does to the shared model pool stays its own: a bad
//! input fails only the calls that sent it, even inside a shared batch;
//! the host memory a model call makes the gateway hold is bounded by the
//! function's own limit; guest-controlled text is cut before it is kept;
//! one tenant cannot hold every text-generation slot; and OpenAI calls end
//! at their deadline. A victim tenant's calls are checked for correctness
//! while each attack runs.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use support::{Launch, Server, assert_error, floats, json, largest_difference, text, wasm};

const SENTENCE: &str = "The quick brown fox jumps over the lazy dog.";

/// A prompt whose answer runs long (the attacker's and the deadline's).
const LONG_PROMPT: &str = "Tell me a very long story about a dragon.";

/// A tenant `attacker` with the `hostile_nn` guest (under `manifest`) and
/// a tenant `victim` with the `embed` example; returns their keys.
async fn tenants(server: &Server, manifest: &str) -> (String, String) {
    let attacker = server.tenant("attacker").await;
    let victim = server.tenant("victim").await;
    let bundle =
        gigafactory_gateway::bundle::Bundle::pack(&wasm("hostile_nn"), Some(manifest), &[])
            .unwrap();
    let deployed = server.deploy_bundle(&attacker, "evil", bundle).await;
    assert_eq!(deployed.status, 201, "{}", text(&deployed));
    server.deploy(&victim, "embed", wasm("embed")).await;
    (attacker, victim)
}

async fn embed(server: &Server, key: &str) -> Vec<f32> {
    let reply = server
        .post(key, "/fn/victim/embed", "text/plain", SENTENCE)
        .await;
    assert_eq!(reply.status, 200, "the victim failed: {}", text(&reply));
    floats(&json(&reply)["embedding"])
}

async fn attack(server: &Server, key: &str, path: &str) -> support::Reply {
    server
        .client(Some(key))
        .send(Method::GET, &format!("/fn/attacker/evil{path}"), None, &[])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_fails_only_the_calls_that_sent_it() {
    let data = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::start(data.path()));
    let (attacker, victim) = tenants(&server, "timeout_ms = 20000\n").await;
    let reference = embed(&server, &victim).await;
    assert!(attack(&server, &attacker, "/good").await.status == 200);

    let attacks: Vec<_> = ["/bad-types", "/bad-mask", "/empty"]
        .into_iter()
        .map(|path| {
            let (server, key) = (server.clone(), attacker.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for _ in 0..30 {
                    let reply = attack(&server, &key, path).await;
                    assert_eq!(reply.status, 200, "{path}: {}", text(&reply));
                    outcomes.push(text(&reply));
                }
                (path, outcomes)
            })
        })
        .collect();
    let victims: Vec<_> = (0..4)
        .map(|_| {
            let (server, key, reference) = (server.clone(), victim.clone(), reference.clone());
            tokio::spawn(async move {
                for _ in 0..25 {
                    let got = embed(&server, &key).await;
                    let worst = largest_difference(&got, &reference);
                    assert!(worst < 1e-4, "the victim's embedding moved by {worst}");
                }
            })
        })
        .collect();
    for victim in victims {
        victim.await.expect("every victim call succeeded");
    }
    for attack in attacks {
        let (path, outcomes) = attack.await.unwrap();
        for outcome in outcomes {
            let expected = match path {
                "/bad-types" => "error runtime-error",
                _ => "error invalid-argument",
            };
            assert!(outcome.starts_with(expected), "{path}: {outcome}");
        }
    }
    let metrics = server.metrics().await;
    let retried = metrics
        .lines()
        .find(|l| l.starts_with("gigafactory_model_batches_retried_alone_total"))
        .unwrap_or("(none)");
    eprintln!("100 victim embeddings correct during 90 bad calls; {retried}");
}

#[tokio::test]
async fn host_memory_for_a_model_call_is_bounded_by_the_function() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let (attacker, victim) = tenants(&server, "memory_mib = 128\ntimeout_ms = 20000\n").await;
    embed(&server, &victim).await;
    let before = server.rss_bytes();

    // 24 tensors of 64 MiB, each made from the same 64 MiB of guest memory.
    let hoard = attack(&server, &attacker, "/hoard?mb=64&count=24").await;
    assert_error(&hoard, 500, "out_of_memory");
    assert!(text(&hoard).contains("tensors"), "{}", text(&hoard));

    // Two million tokens: refused by the model's limits before it runs.
    let started = Instant::now();
    let long = attack(&server, &attacker, "/long?tokens=2000000").await;
    assert_eq!(long.status, 200, "{}", text(&long));
    assert!(
        text(&long).starts_with("error too-large"),
        "{}",
        text(&long)
    );
    let refused_in = started.elapsed();
    let limit = attack(&server, &attacker, "/long?tokens=513").await;
    assert!(
        text(&limit).starts_with("error too-large"),
        "{}",
        text(&limit)
    );
    let fits = attack(&server, &attacker, "/long?tokens=512").await;
    assert!(
        text(&fits).starts_with("ok [1, 512, 384]"),
        "{}",
        text(&fits)
    );

    let grown = server.rss_bytes().saturating_sub(before);
    eprintln!(
        "gateway grew {} MiB; 2M tokens refused in {:.0} ms",
        grown >> 20,
        refused_in.as_secs_f64() * 1e3
    );
    assert!(grown < 512 << 20, "the gateway grew by {} MiB", grown >> 20);
    embed(&server, &victim).await;
}

#[tokio::test]
async fn guest_controlled_text_is_cut_before_it_is_kept() {
    let data = tempfile::tempdir().unwrap();
    let launch = Launch {
        env: vec![("RUST_BACKTRACE".into(), "1".into())],
        ..Launch::default()
    };
    let server = Server::start_launched(data.path(), &[], &launch);
    let (attacker, _) = tenants(&server, "timeout_ms = 20000\n").await;
    let before = server.rss_bytes();
    for _ in 0..5 {
        let reply = attack(&server, &attacker, "/huge-error?mb=100").await;
        assert_error(&reply, 500, "function_error");
        assert!(reply.body.len() < 16 << 10, "{} bytes", reply.body.len());
        let reply = attack(&server, &attacker, "/long-error?mb=8").await;
        assert_error(&reply, 500, "function_error");
        assert!(reply.body.len() < 16 << 10, "{} bytes", reply.body.len());
    }
    let trap = attack(&server, &attacker, "/long-name-trap?mb=8").await;
    assert_error(&trap, 500, "function_trapped");
    let logs = server
        .client(Some(&attacker))
        .send(Method::GET, "/v1/functions/evil/logs", None, &[])
        .await
        .unwrap();
    assert_eq!(logs.status, 200);
    assert!(
        logs.body.len() < 1 << 20,
        "the logs are {} bytes",
        logs.body.len()
    );
    let platform: Vec<String> = json(&logs)["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["stream"] == "platform")
        .map(|l| l["line"].as_str().unwrap().to_string())
        .collect();
    let trapped = platform.last().expect("the trap was logged");
    assert!(trapped.contains("wasm backtrace"), "{trapped}");
    for host_frame in ["tokio::", "std::rt", "gigafactory_runtime::"] {
        assert!(
            !trapped.contains(host_frame),
            "the host's backtrace leaked: {trapped}"
        );
    }
    let grown = server.rss_bytes().saturating_sub(before);
    eprintln!(
        "after 10 oversized errors the gateway grew {} MiB",
        grown >> 20
    );
    assert!(grown < 256 << 20, "the gateway grew by {} MiB", grown >> 20);
}

/// A chat request that runs to `max_tokens`: the end of turn (SmolLM2's
/// token 2, `<|im_end|>`) and of text (0) are banned, so a sampled answer
/// cannot end early.
fn chat_body(prompt: &str, max_tokens: u32, stream: bool) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": stream,
            "logit_bias": {"0": -100, "2": -100},
        })
        .to_string(),
    )
}

/// A streamed chat completion whose body is left unread (the caller holds
/// it open), once its response head arrived.
async fn open_stream(
    server: &Server,
    key: &str,
    max_tokens: u32,
) -> (
    hyper::Response<hyper::body::Incoming>,
    support::OwnConnection,
) {
    let prompt = LONG_PROMPT;
    let body = chat_body(prompt, max_tokens, true);
    let path = "/openai/v1/chat/completions";
    let (response, connection) = support::post_on_own_connection(server, key, path, body).await;
    assert_eq!(response.status(), 200);
    (response, connection)
}

async fn generation(server: &Server) -> serde_json::Value {
    server.model("smollm2-135m-instruct").await["generation"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tenant_cannot_hold_every_generation_slot() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let attacker = server.tenant("attacker").await;
    let victim = server.tenant("victim").await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(open_stream(&server, &attacker, 1500).await);
    }
    let mut state = generation(&server).await;
    for _ in 0..200 {
        if state["active"].as_u64().unwrap_or(0) >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        state = generation(&server).await;
    }
    assert_eq!(
        state["active"], 6,
        "a tenant holds at most 6 of 8 slots: {state}"
    );
    assert_eq!(state["queued"], 2, "{state}");

    let started = Instant::now();
    let reply = server
        .post(
            &victim,
            "/openai/v1/chat/completions",
            "application/json",
            chat_body("Say hi.", 8, false),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", text(&reply));
    let after = generation(&server).await;
    let finished = after["started"].as_u64().unwrap()
        - after["active"].as_u64().unwrap()
        - after["cancelled"].as_u64().unwrap();
    eprintln!(
        "the victim's chat took {:.0} ms beside 8 long streams of another tenant",
        started.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        finished, 1,
        "the victim finished before any of the attacker's streams: {after}"
    );
    drop(held);
}

#[tokio::test]
async fn openai_completions_end_at_their_deadline() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with(data.path(), &["--generation-timeout-secs", "2"]);
    let key = server.tenant("acme").await;
    let whole = server
        .post(
            &key,
            "/openai/v1/chat/completions",
            "application/json",
            chat_body(LONG_PROMPT, 1900, false),
        )
        .await;
    assert_error(&whole, 504, "deadline_exceeded");

    let streamed = server
        .post(
            &key,
            "/openai/v1/chat/completions",
            "application/json",
            chat_body(LONG_PROMPT, 1900, true),
        )
        .await;
    assert_eq!(streamed.status, 200);
    let events = text(&streamed);
    let last = events.trim_end().rsplit("\n\n").next().unwrap_or_default();
    assert!(
        last.contains("\"deadline_exceeded\"") && !events.contains("[DONE]"),
        "{events}"
    );
    let mut idle = false;
    for _ in 0..100 {
        if generation(&server).await["active"] == 0 {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(idle, "the cut generations still decode");
}
