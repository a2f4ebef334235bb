//! `gigafactory bench embed`: the `embed` example through the whole
//! platform (HTTP, Wasm, the shared model pool) with 1, 8 and 64 clients,
//! dynamic batching on and off (same binary, `--no-batching`), against
//! onnxruntime running the same ONNX model on the same sentences in-process
//! (gateway/bench/onnxruntime_embed.py), one request at a time.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use hyper::Method;
use serde::Deserialize;

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
    #[arg(long, default_value = "gateway/bench/onnxruntime_embed.py")]
    pub peer_script: PathBuf,
}

/// What the peer script prints.
#[derive(Debug, Deserialize)]
struct PeerReport {
    onnxruntime: String,
    sequential: Option<PeerStats>,
    best: PeerStats,
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
    eprintln!("measuring onnxruntime in-process (one request at a time) …");
    let peer = onnxruntime(&args, &model_dir)?;
    let sequential = peer
        .sequential
        .as_ref()
        .context("the peer did not measure 1 thread")?;

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
    ];
    let mut measured: Vec<(bool, usize, Stats)> = Vec::new();
    for batching in [true, false] {
        let label = if batching { "on" } else { "off" };
        eprintln!("starting gigafactory serve with batching {label} …");
        let mut flags = vec!["--models".to_string(), args.models.display().to_string()];
        if !batching {
            flags.push("--no-batching".into());
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let server = Gigafactory::start(&flags).await?;
        server.deploy("embed", &args.component).await?;
        for &clients in &args.clients {
            eprintln!("  {clients} clients …");
            let stats = Load {
                method: Method::POST,
                path: "/fn/bench/embed".into(),
                key: Some(server.key.clone()),
                bodies: SENTENCES
                    .iter()
                    .map(|s| ("text/plain", Bytes::from_static(s.as_bytes())))
                    .collect(),
                connections: clients,
                warmup: Duration::from_secs(args.warmup),
                seconds: Duration::from_secs(args.seconds),
            }
            .run(server.address)
            .await?;
            rows.push(row(
                &[
                    &format!("gigafactory, batching {label}"),
                    &clients.to_string(),
                ],
                &stats,
            ));
            measured.push((batching, clients, stats));
        }
    }

    println!(
        "| setup | clients | req/s | p50 | p99 | errors |\n|---|---|---|---|---|---|\n{}",
        rows.join("\n")
    );
    println!();
    let find = |batching: bool, clients: usize| {
        measured
            .iter()
            .find(|(b, c, _)| *b == batching && *c == clients)
            .map(|(_, _, stats)| stats.rps)
    };
    for &clients in &args.clients {
        if let (Some(on), Some(off)) = (find(true, clients), find(false, clients)) {
            println!(
                "- {clients} clients: batching on / off = {:.2}x; on / onnxruntime 1 thread = {:.2}x; on / onnxruntime best = {:.2}x",
                on / off,
                on / sequential.rps,
                on / peer.best.rps
            );
        }
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
