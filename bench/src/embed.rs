//! `gigafactory-bench embed`: the `embed` example through the whole
//! platform (HTTP, Wasm, the shared model pool) with 1, 8 and 64 clients,
//! dynamic batching on and off (same binary, `--no-batching`), on each
//! ONNX engine (`--onnx-engine`), against onnxruntime running the same
//! ONNX model on the same sentences in-process
//! (bench/onnxruntime_embed.py): one request at a time, and at its
//! most efficient batch size. Then where a lone request's time goes: the
//! engines alone on one sentence (in this process, vs onnxruntime's
//! `session.run`), the host's own embedding endpoint (no Wasm), and an
//! empty function (HTTP and a fresh instance).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use hyper::Method;
use serde::Deserialize;

use gigafactory_runtime::models::{ElementType, HostTensor};
use gigafactory_runtime::{EngineOptions, ModelPool, PoolOptions};

use super::{Gigafactory, Load, Stats, row};

/// Sentences of everyday lengths (8 to 30 tokens), sent in turn.
pub(super) const SENTENCES: &[&str] = &[
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner tonight.",
    "Serverless functions share one resident copy of the model.",
    "How far is the moon from the earth?",
    "She sells sea shells by the sea shore every summer morning.",
    "The stock market fell sharply after the central bank's announcement.",
    "I would like to order a large pizza with extra cheese and olives.",
    "Rust makes systems programming safer without giving up speed.",
    "Our flight was delayed by three hours because of the storm.",
    "Please send me the quarterly report before Friday afternoon.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The children built a sandcastle that the tide washed away.",
    "Can you recommend a good book about the history of mathematics?",
    "The new library opens next week with a larger reading room.",
    "He forgot his umbrella and got soaked on the way home.",
    "Embeddings map sentences with similar meanings to nearby vectors.",
];

/// `bench embed` options.
#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// The embed component.
    #[arg(
        long,
        default_value = "examples/target/wasm32-wasip2/release/embed.wasm"
    )]
    pub component: PathBuf,
    /// The model repository (it must hold all-minilm-l6-v2).
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// Concurrent clients, one measurement each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 64])]
    pub clients: Vec<usize>,
    /// Seconds measured per point.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Seconds of warm-up per point before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// The Python with onnxruntime, numpy and tokenizers for the peer.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// The peer's script.
    #[arg(long, default_value = "bench/onnxruntime_embed.py")]
    pub peer_script: PathBuf,
    /// The ONNX engines measured, each with batching on and off.
    #[arg(long, value_delimiter = ',', default_values_t = ["onnxruntime".to_string(), "tract".to_string()])]
    pub engines: Vec<String>,
}

/// What the peer script prints.
#[derive(Debug, Deserialize)]
struct PeerReport {
    onnxruntime: String,
    sequential: Option<PeerStats>,
    best: PeerStats,
    compute: Vec<PeerCompute>,
    best_batched: PeerBatched,
}

#[derive(Debug, Deserialize)]
struct PeerCompute {
    threads: usize,
    tokens: usize,
    p50_ms: f64,
}

#[derive(Debug, Deserialize)]
struct PeerBatched {
    batch: usize,
    threads: usize,
    sentences_per_s: f64,
}

#[derive(Debug, Deserialize)]
struct PeerStats {
    threads: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl PeerStats {
    fn stats(&self) -> Stats {
        Stats {
            rps: self.rps,
            p50: Duration::from_secs_f64(self.p50_ms / 1e3),
            p99: Duration::from_secs_f64(self.p99_ms / 1e3),
            errors: 0,
        }
    }
}

pub(super) async fn run(args: EmbedArgs) -> Result<()> {
    let model_dir = args.models.join("all-minilm-l6-v2");
    if !model_dir.join("model.onnx").is_file() {
        bail!(
            "{} has no model.onnx (fetch the models first: ./dev models)",
            model_dir.display()
        );
    }
    eprintln!("measuring onnxruntime in-process …");
    let peer = onnxruntime(&args, &model_dir)?;
    let sequential = peer
        .sequential
        .as_ref()
        .context("the peer did not measure 1 thread")?;
    let batched = &peer.best_batched;
    let mut rows = vec![
        row(
            &[&format!("onnxruntime {}, 1 thread", peer.onnxruntime), "1"],
            &sequential.stats(),
        ),
        row(
            &[
                &format!(
                    "onnxruntime {}, {} threads (its best)",
                    peer.onnxruntime, peer.best.threads
                ),
                "1",
            ],
            &peer.best.stats(),
        ),
        format!(
            "| onnxruntime {}, {} threads, {} sentences per run (its best) | – | {:.0} | | | |",
            peer.onnxruntime, batched.threads, batched.batch, batched.sentences_per_s
        ),
    ];
    let mut measured: Vec<(String, bool, usize, Stats)> = Vec::new();
    let mut lone = Vec::new();
    for engine in &args.engines {
        for batching in [true, false] {
            let label = if batching { "on" } else { "off" };
            eprintln!("starting gigafactory serve ({engine}, batching {label}) …");
            let mut flags = vec![
                "--models".to_string(),
                args.models.display().to_string(),
                "--onnx-engine".to_string(),
                engine.clone(),
            ];
            if !batching {
                flags.push("--no-batching".into());
            }
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let server = Gigafactory::start(&flags).await?;
            server.deploy("embed", &args.component).await?;
            for &clients in &args.clients {
                eprintln!("  {clients} clients …");
                let stats =
                    load(&args, &server, "/fn/bench/embed", embed_bodies(), clients).await?;
                rows.push(row(
                    &[
                        &format!("gigafactory, {engine}, batching {label}"),
                        &clients.to_string(),
                    ],
                    &stats,
                ));
                measured.push((engine.clone(), batching, clients, stats));
            }
            if batching {
                lone.push(breakdown(&args, &server, engine).await?);
            }
        }
    }
    println!(
        "| setup | clients | req/s | p50 | p99 | errors |\n|---|---|---|---|---|---|\n{}",
        rows.join("\n")
    );
    println!();
    let find = |engine: &str, batching: bool, clients: usize| {
        measured
            .iter()
            .find(|(e, b, c, _)| e == engine && *b == batching && *c == clients)
            .map(|(.., stats)| *stats)
    };
    for engine in &args.engines {
        for &clients in &args.clients {
            if let (Some(on), Some(off)) =
                (find(engine, true, clients), find(engine, false, clients))
            {
                println!(
                    "- {engine}, {clients} clients: batching on / off = {:.2}x; on / onnxruntime 1 thread = {:.2}x; on / onnxruntime at its best batch = {:.2}x",
                    on.rps / off.rps,
                    on.rps / sequential.rps,
                    on.rps / batched.sentences_per_s
                );
            }
        }
        if let Some(one) = find(engine, true, 1) {
            println!(
                "- {engine}, a lone embedding: p50 {:.2} ms = {:.2}x onnxruntime's single call with {} threads ({:.2} ms)",
                one.p50.as_secs_f64() * 1e3,
                one.p50.as_secs_f64() * 1e3 / peer.best.p50_ms,
                peer.best.threads,
                peer.best.p50_ms
            );
        }
    }
    println!("\nWhere a lone request's time goes (p50, 1 client):\n");
    println!(
        "| engine | model alone, in-process | /openai/v1/embeddings (host tokenises, no Wasm) | embed function | empty function (HTTP + instance) |\n|---|---|---|---|---|"
    );
    for line in &lone {
        println!("{line}");
    }
    for compute in &peer.compute {
        println!(
            "| onnxruntime {} (Python), {} threads, session.run of {} tokens | {:.2} ms | | | |",
            peer.onnxruntime, compute.threads, compute.tokens, compute.p50_ms
        );
    }
    println!(
        "\n({} s per point after {} s of warm-up; {} sentences of 8–30 tokens sent in turn; {} CPU threads)",
        args.seconds,
        args.warmup,
        SENTENCES.len(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}

fn embed_bodies() -> Vec<(&'static str, Bytes)> {
    SENTENCES
        .iter()
        .map(|s| ("text/plain", Bytes::from_static(s.as_bytes())))
        .collect()
}

async fn load(
    args: &EmbedArgs,
    server: &Gigafactory,
    path: &str,
    bodies: Vec<(&'static str, Bytes)>,
    clients: usize,
) -> Result<Stats> {
    Load {
        method: Method::POST,
        path: path.into(),
        key: Some(server.key.clone()),
        bodies,
        connections: clients,
        warmup: Duration::from_secs(args.warmup),
        seconds: Duration::from_secs(args.seconds),
    }
    .run(server.address)
    .await
}

/// A lone request's parts on `server` (batching on), 1 client each: the
/// engine alone in this process, the host's embedding endpoint, the embed
/// function, and an empty function. One Markdown row.
async fn breakdown(args: &EmbedArgs, server: &Gigafactory, engine: &str) -> Result<String> {
    let alone = engine_alone(args, engine).await?;
    let sentence = SENTENCES[0];
    let request = serde_json::json!({"model": "all-minilm-l6-v2", "input": sentence}).to_string();
    let host = load(
        args,
        server,
        "/openai/v1/embeddings",
        vec![("application/json", Bytes::from(request))],
        1,
    )
    .await?;
    let body = vec![("text/plain", Bytes::from_static(sentence.as_bytes()))];
    let function = load(args, server, "/fn/bench/embed", body.clone(), 1).await?;
    let hello = args.component.with_file_name("hello.wasm");
    server.deploy("hello", &hello).await?;
    let empty = load(args, server, "/fn/bench/hello", body, 1).await?;
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    Ok(format!(
        "| {engine} | {} | {} | {} | {} |",
        ms(alone),
        ms(host.p50),
        ms(function.p50),
        ms(empty.p50)
    ))
}

/// The p50 of the model alone on the first sentence (12 tokens), run by
/// `engine` in this process with nothing around it: no HTTP, no Wasm, no
/// pool queue.
async fn engine_alone(args: &EmbedArgs, engine: &str) -> Result<Duration> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let options = PoolOptions {
        workers: threads,
        batching: false,
        engines: EngineOptions {
            onnxruntime: None,
            onnx_engine: Some(engine.to_string()),
            guest_engine: None,
            threads,
        },
        cpu_memory_budget: None,
    };
    let dir = args.models.join("all-minilm-l6-v2");
    let vocab = std::fs::read_to_string(dir.join("vocab.txt")).context("reading vocab.txt")?;
    let ids = gigafactory_runtime::text::WordPiece::from_vocab(&vocab)
        .map_err(anyhow::Error::msg)?
        .encode(SENTENCES[0], 256)
        .ids;
    let tensor = |values: Vec<i64>| HostTensor {
        dims: vec![1, values.len() as u32],
        ty: ElementType::I64,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let inputs = vec![
        tensor(ids.clone()),
        tensor(vec![1; ids.len()]),
        tensor(vec![0; ids.len()]),
    ];
    let pool = {
        let (models, options) = (args.models.clone(), options.clone());
        tokio::task::block_in_place(|| ModelPool::load_repository(&models, &options))?
    };
    let graph = pool
        .get("all-minilm-l6-v2")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .graph()
        .clone();
    let (warmup, seconds) = (
        Duration::from_secs(args.warmup),
        Duration::from_secs(args.seconds),
    );
    tokio::task::spawn_blocking(move || {
        let run = || graph.run(inputs.clone()).map(drop);
        let started = std::time::Instant::now();
        while started.elapsed() < warmup {
            run()?;
        }
        let mut latencies = Vec::new();
        let started = std::time::Instant::now();
        while started.elapsed() < seconds {
            let before = std::time::Instant::now();
            run()?;
            latencies.push(before.elapsed());
        }
        latencies.sort();
        Ok(latencies[latencies.len() / 2])
    })
    .await?
}

/// Runs the onnxruntime peer on the same sentences.
fn onnxruntime(args: &EmbedArgs, model_dir: &std::path::Path) -> Result<PeerReport> {
    let mut sentences = tempfile::NamedTempFile::new()?;
    for sentence in SENTENCES {
        writeln!(sentences, "{sentence}")?;
    }
    let output = Command::new(&args.python)
        .arg(&args.peer_script)
        .arg("--model-dir")
        .arg(model_dir)
        .arg("--sentences")
        .arg(sentences.path())
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| {
            format!(
                "running {} {} (it needs onnxruntime, numpy and tokenizers; ./dev bench embed sets them up)",
                args.python,
                args.peer_script.display()
            )
        })?;
    if !output.status.success() {
        bail!("the onnxruntime peer failed ({})", output.status);
    }
    serde_json::from_slice(&output.stdout).context("reading the onnxruntime peer's report")
}
