//! `gigafactory-bench lora`: four LoRA adapters on one base model (one
//! scheduler, the base's weights once) against four separate copies of the
//! base (four schedulers, four copies of the weights), the same sequence
//! slots and KV cache in all, in the same run: aggregate generated tokens/s
//! and the memory each takes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use gigafactory_runtime::llm::{AdapterFile, TextModel};
use gigafactory_runtime::models::ModelConfig;

const MODEL: &str = "smollm2-135m-instruct";

/// `bench lora` options.
#[derive(Debug, clap::Args)]
pub struct LoraArgs {
    /// The model repository (it must hold smollm2-135m-instruct).
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// The LoRA adapter (loaded four times, at four scales).
    #[arg(long, default_value = "tests/data/lora/adapter.gguf")]
    pub adapter: PathBuf,
    /// Concurrent generations per adapter (or per copy).
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Tokens per generation.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
}

const WAYS: usize = 4;

pub(super) async fn run(args: LoraArgs) -> Result<()> {
    let dir = args.models.join(MODEL);
    let config: ModelConfig = toml::from_str(
        &std::fs::read_to_string(dir.join("model.toml"))
            .with_context(|| format!("reading {}/model.toml (./dev models)", dir.display()))?,
    )?;
    let file = dir.join(&config.file);
    let mut generation = config.generation.clone().unwrap_or_default();
    generation.context_tokens = 1024;
    let slots = (WAYS * args.clients) as u32;

    eprintln!("loading the base with {WAYS} adapters …");
    let before = rss_bytes();
    let adapters: Vec<AdapterFile> = (0..WAYS)
        .map(|i| AdapterFile {
            key: format!("adapter-{i}"),
            path: args.adapter.clone(),
            scale: (i + 1) as f32 / WAYS as f32,
        })
        .collect();
    let shared = {
        let (file, mut generation, adapters) = (file.clone(), generation.clone(), adapters.clone());
        generation.max_sequences = slots;
        tokio::task::spawn_blocking(move || {
            TextModel::load(MODEL, &file, generation, "cpu", &adapters)
        })
        .await?
        .map_err(anyhow::Error::msg)?
    };
    let views: Vec<Arc<TextModel>> = adapters
        .iter()
        .map(|a| shared.adapter(&a.key).map_err(|e| anyhow::anyhow!("{e:?}")))
        .collect::<Result<_>>()?;
    let shared_rss = rss_bytes().saturating_sub(before);
    let shared_memory = shared.memory_bytes()
        + adapters
            .iter()
            .map(|a| std::fs::metadata(&a.path).map_or(0, |m| m.len()))
            .sum::<u64>();
    eprintln!(
        "{WAYS} adapters × {} clients for {} s …",
        args.clients, args.seconds
    );
    let shared_rate = aggregate(&views, &args).await?;
    drop(views);
    drop(shared);

    eprintln!("loading {WAYS} copies of the base …");
    let before = rss_bytes();
    let mut copies = Vec::new();
    for _ in 0..WAYS {
        let (file, mut generation) = (file.clone(), generation.clone());
        generation.max_sequences = args.clients as u32;
        copies.push(
            tokio::task::spawn_blocking(move || {
                TextModel::load(MODEL, &file, generation, "cpu", &[])
            })
            .await?
            .map_err(anyhow::Error::msg)?,
        );
    }
    let copies_rss = rss_bytes().saturating_sub(before);
    let copies_memory: u64 = copies.iter().map(|c| c.memory_bytes()).sum();
    eprintln!(
        "{WAYS} copies × {} clients for {} s …",
        args.clients, args.seconds
    );
    let copies_rate = aggregate(&copies, &args).await?;

    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "| setup | generated tokens/s (aggregate) | model memory (MiB) | resident growth (MiB) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| {WAYS} LoRA adapters on one base | {shared_rate:.1} | {:.0} | {:.0} |",
        mib(shared_memory),
        mib(shared_rss)
    );
    println!(
        "| {WAYS} copies of the base | {copies_rate:.1} | {:.0} | {:.0} |",
        mib(copies_memory),
        mib(copies_rss)
    );
    println!(
        "\n- adapters / copies: throughput {:.2}x, model memory {:.2}x",
        shared_rate / copies_rate,
        shared_memory as f64 / copies_memory as f64
    );
    println!(
        "\n({} concurrent generations of {} tokens in each setup, {} sequence slots of {} tokens in all, {} s each, {} CPU threads)",
        WAYS * args.clients,
        args.max_tokens,
        slots,
        generation.context_tokens,
        args.seconds,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}

/// Aggregate tokens/s of `args.clients` callers of each model, each
/// starting one generation after another for `args.seconds`.
async fn aggregate(models: &[Arc<TextModel>], args: &LoraArgs) -> Result<f64> {
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for model in models {
        for _ in 0..args.clients {
            let (model, max_tokens) = (model.clone(), args.max_tokens);
            tasks.push(tokio::spawn(async move {
                let mut tokens = 0.0;
                while Instant::now() < end {
                    let (rate, took) = super::chat::direct_generation(&model, max_tokens).await?;
                    tokens += rate * took;
                }
                anyhow::Ok(tokens)
            }));
        }
    }
    let mut tokens = 0.0;
    for task in tasks {
        tokens += task.await??;
    }
    Ok(tokens / started.elapsed().as_secs_f64())
}

/// This process's resident memory.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib << 10)
}
