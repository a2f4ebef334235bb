//! `gigafactory-bench chat`: generated tokens/s of the `chat` example
//! through the whole platform (HTTP, Wasm, the shared text engine) against
//! the same engine called directly in this process (no HTTP, no Wasm), the
//! two taking turns in the same run; then the aggregate of both with 8 and
//! 32 concurrent clients.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use gigafactory_runtime::llm::{Event, Prompt, Request, TextModel};
use gigafactory_runtime::models::ModelConfig;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;

use super::Gigafactory;

const MODEL: &str = "smollm2-135m-instruct";
const QUESTION: &str = "Tell me a story about a dragon who learns to read.";

/// `bench chat` options.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// The chat component.
    #[arg(
        long,
        default_value = "examples/target/wasm32-wasip2/release/chat.wasm"
    )]
    pub component: PathBuf,
    /// The model repository (it must hold smollm2-135m-instruct).
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// Tokens per generation.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Single-stream runs per side (the median counts).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Concurrent clients for the aggregate measurements.
    #[arg(long, value_delimiter = ',', default_values_t = [8, 32])]
    pub clients: Vec<usize>,
    /// Seconds per aggregate measurement.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
}

pub(super) async fn run(args: ChatArgs) -> Result<()> {
    let dir = args.models.join(MODEL);
    let config: ModelConfig = toml::from_str(
        &std::fs::read_to_string(dir.join("model.toml"))
            .with_context(|| format!("reading {}/model.toml (./dev models)", dir.display()))?,
    )?;
    let generation = config.generation.clone().unwrap_or_default();

    eprintln!("loading the engine in this process …");
    let engine = {
        let (file, generation) = (dir.join(&config.file), generation.clone());
        tokio::task::spawn_blocking(move || TextModel::load(MODEL, &file, generation, "cpu", &[]))
            .await?
            .map_err(anyhow::Error::msg)?
    };
    eprintln!("starting gigafactory serve …");
    let models = args.models.display().to_string();
    let server = Gigafactory::start(&["--models", &models]).await?;
    server.deploy("chat", &args.component).await?;
    let url = Target {
        address: server.address.to_string(),
        key: server.key.clone(),
        max_tokens: args.max_tokens,
    };
    // Warm-ups: the platform loads the model on first use.
    direct_run(&engine, args.max_tokens).await?;
    url.request().await?;

    // The two sides alternate, so a machine that speeds up or slows down
    // during the run (shared cores) affects both alike.
    eprintln!(
        "one stream, engine and platform in turn: {} runs each of {} tokens …",
        args.runs, args.max_tokens
    );
    let (mut direct, mut platform) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        direct.push(direct_run(&engine, args.max_tokens).await?);
        let (tokens, took) = url.request().await?;
        platform.push(tokens as f64 / took.as_secs_f64());
    }
    let (mut direct_aggregate, mut aggregate) = (Vec::new(), Vec::new());
    for &clients in &args.clients {
        eprintln!(
            "{clients} concurrent generations for {} s, engine then platform …",
            args.seconds
        );
        direct_aggregate.push(engine_aggregate(&engine, clients, &args).await?);
        aggregate.push((
            clients,
            platform_aggregate(&url, clients, args.seconds).await?,
        ));
    }
    drop(engine);

    let direct = median(&mut direct);
    let single = median(&mut platform);
    println!("| setup | clients | generated tokens/s |\n|---|---|---|");
    println!("| engine called directly (no HTTP, no Wasm) | 1 | {direct:.1} |");
    println!("| gigafactory, chat function, SSE | 1 | {single:.1} |");
    for ((clients, rate), direct_rate) in aggregate.iter().zip(&direct_aggregate) {
        println!("| engine called directly | {clients} | {direct_rate:.1} (aggregate) |");
        println!("| gigafactory, chat function, SSE | {clients} | {rate:.1} (aggregate) |");
    }
    println!(
        "\n- single stream: platform / direct = {:.2}x",
        single / direct
    );
    for ((clients, rate), direct_rate) in aggregate.iter().zip(&direct_aggregate) {
        println!(
            "- {clients} clients: aggregate / single stream = {:.2}x (the engine alone: {:.2}x); platform / engine = {:.2}x",
            rate / single,
            direct_rate / direct,
            rate / direct_rate
        );
    }
    println!(
        "\n({} tokens per generation, greedy, median of {} single-stream runs, {} s per aggregate point, {} CPU threads)",
        args.max_tokens,
        args.runs,
        args.seconds,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}

fn chat_request(max_tokens: u32) -> Request {
    Request {
        prompt: Prompt::Chat(vec![("user".into(), QUESTION.into())]),
        max_tokens,
        // Greedy, as the chat function defaults to: both sides generate
        // the same tokens.
        ..Request::default()
    }
}

/// Aggregate tokens/s of `clients` callers of the engine, each starting
/// one generation after another for `args.seconds`.
async fn engine_aggregate(
    engine: &std::sync::Arc<TextModel>,
    clients: usize,
    args: &ChatArgs,
) -> Result<f64> {
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let engine = engine.clone();
            let max_tokens = args.max_tokens;
            tokio::spawn(async move {
                let mut tokens = 0.0;
                while Instant::now() < end {
                    let (rate, took) = direct_generation(&engine, max_tokens).await?;
                    tokens += rate * took;
                }
                anyhow::Ok(tokens)
            })
        })
        .collect();
    let mut tokens = 0.0;
    for task in tasks {
        tokens += task.await??;
    }
    Ok(tokens / started.elapsed().as_secs_f64())
}

/// Aggregate tokens/s of `clients` HTTP clients of the chat function, each
/// sending one chat after another for `seconds`.
async fn platform_aggregate(url: &Target, clients: usize, seconds: u64) -> Result<f64> {
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut tokens = 0u64;
                while Instant::now() < end {
                    tokens += url.request().await?.0 as u64;
                }
                anyhow::Ok(tokens)
            })
        })
        .collect();
    let mut tokens = 0;
    for task in tasks {
        tokens += task.await??;
    }
    Ok(tokens as f64 / started.elapsed().as_secs_f64())
}

/// Tokens/s of one generation through the engine.
async fn direct_run(engine: &TextModel, max_tokens: u32) -> Result<f64> {
    Ok(direct_generation(engine, max_tokens).await?.0)
}

/// Tokens/s of one generation through the engine, and the seconds it took.
pub(super) async fn direct_generation(engine: &TextModel, max_tokens: u32) -> Result<(f64, f64)> {
    let started = Instant::now();
    let mut generation = engine
        .generate("bench".into(), chat_request(max_tokens))
        .map_err(anyhow::Error::msg)?;
    loop {
        match generation.next().await {
            Some(Event::Text(_) | Event::Token(_)) => {}
            Some(Event::Done(usage)) => {
                let took = started.elapsed().as_secs_f64();
                return Ok((usage.completion_tokens as f64 / took, took));
            }
            Some(Event::Failed(why)) => bail!("generation failed: {why}"),
            None => bail!("the engine stopped"),
        }
    }
}

/// The chat function, called over HTTP.
#[derive(Clone)]
struct Target {
    address: String,
    key: String,
    max_tokens: u32,
}

impl Target {
    /// One streamed chat: the tokens it reported and the time to its end.
    async fn request(&self) -> Result<(u32, Duration)> {
        let body = serde_json::json!({
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": self.max_tokens,
        });
        let started = Instant::now();
        let stream = TcpStream::connect(&self.address).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::post("/fn/bench/chat")
            .header("host", &self.address)
            .header("authorization", format!("Bearer {}", self.key))
            .body(Full::new(Bytes::from(body.to_string())))?;
        let response = sender.send_request(request).await?;
        if response.status() != 200 {
            bail!("the chat function answered {}", response.status());
        }
        let text = response.into_body().collect().await?.to_bytes();
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&text);
        let Some(usage) = text.split("event: done\ndata: ").nth(1) else {
            // Cut short (the function's deadline while it queued): count
            // the tokens that did arrive, one text event each.
            let tokens = text.matches("data: {\"text\"").count() as u32;
            return Ok((tokens, took));
        };
        let usage: serde_json::Value = serde_json::from_str(usage.trim())?;
        let tokens = usage["completion_tokens"]
            .as_u64()
            .context("no completion_tokens")?;
        Ok((tokens as u32, took))
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
