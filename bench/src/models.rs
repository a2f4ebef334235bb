//! `gigafactory-bench models`: how long each shipped model takes to load
//! on demand, warm (from the page cache: the files were read before) and
//! cold (the files' pages dropped from the cache first), and what a
//! resident model's callers see while another model loads beside it.
//! Every model is a copy that unloads after a second unused, so each
//! round loads it again; the load time is the server's own (`load_ms` of
//! `GET /v1/models`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use hyper::Method;

use super::Gigafactory;
use gigafactory_gateway::cli::Client;

/// The shipped models, each with a request that uses it.
const MODELS: &[(&str, &str)] = &[
    ("all-minilm-l6-v2", "/openai/v1/embeddings"),
    ("smollm2-135m-instruct", "/openai/v1/chat/completions"),
];

/// `bench models` options.
#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    /// The model repository (it must hold the shipped models).
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// Loads measured per model.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

pub(super) async fn run(args: ModelsArgs) -> Result<()> {
    let repository = tempfile::tempdir()?;
    for (name, _) in MODELS {
        copy(&args.models.join(name), &repository.path().join(name), true)?;
    }
    // The model called while the others load: always resident.
    let resident = "resident";
    copy(
        &args.models.join(MODELS[0].0),
        &repository.path().join(resident),
        false,
    )?;
    let repository_flag = repository.path().display().to_string();
    let server = Gigafactory::start(&["--models", &repository_flag]).await?;
    let client = Client::new(
        &format!("http://{}", server.address),
        Some(server.key.clone()),
    )?;
    println!(
        "| model | file | loads | warm p50 | warm max | cold p50 | cold max |\n|---|---|---|---|---|---|---|"
    );
    for (name, path) in MODELS {
        let (mut warm, mut cold) = (Vec::new(), Vec::new());
        for round in 0..2 * args.rounds {
            let is_cold = round % 2 == 1;
            eprintln!("{name}: load {} of {} …", round + 1, 2 * args.rounds);
            wait_until_unloaded(&client, name).await?;
            if is_cold {
                drop_cached(&args.models.join(name))?;
            }
            call(&client, name, path).await?;
            let ms = model(&client, name).await?["load_ms"].as_u64().unwrap_or(0);
            if is_cold { &mut cold } else { &mut warm }.push(ms);
        }
        warm.sort_unstable();
        cold.sort_unstable();
        let size = model(&client, name).await?["size_bytes"]
            .as_u64()
            .unwrap_or(0);
        println!(
            "| {name} | {} MiB | {} + {} | {} ms | {} ms | {} ms | {} ms |",
            size >> 20,
            warm.len(),
            cold.len(),
            warm[warm.len() / 2],
            warm[warm.len() - 1],
            cold[cold.len() / 2],
            cold[cold.len() - 1]
        );
    }

    eprintln!("calls to a resident model, alone and while another loads …");
    let (text, chat) = MODELS[1];
    let mut quiet = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        quiet.push(timed_call(&client, resident).await?);
    }
    let mut beside = Vec::new();
    for _ in 0..args.rounds {
        wait_until_unloaded(&client, text).await?;
        let loading = {
            let client = Client::new(
                &format!("http://{}", server.address),
                Some(server.key.clone()),
            )?;
            tokio::spawn(async move { call(&client, text, chat).await })
        };
        while !loading.is_finished() {
            beside.push(timed_call(&client, resident).await?);
        }
        loading.await??;
    }
    println!(
        "\n| calls to a resident MiniLM | calls | p50 | p99 |\n|---|---|---|---|\n{}\n{}",
        latency_row("alone", &mut quiet),
        latency_row(&format!("while {text} loads beside it"), &mut beside)
    );
    println!(
        "\n(cold: the model's files dropped from the page cache before the load; {} CPU threads)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}

/// Drops the pages of the files in `dir` from the page cache
/// (`posix_fadvise(DONTNEED)`: clean pages nobody maps), so the next
/// load reads them from the disk.
fn drop_cached(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let file = std::fs::File::open(entry?.path().canonicalize()?)?;
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)?;
    }
    Ok(())
}

/// A copy of the model at `from` (files linked) that loads on first use,
/// and with `idle` unloads after a second unused.
fn copy(from: &Path, to: &Path, idle: bool) -> Result<()> {
    let toml = std::fs::read_to_string(from.join("model.toml"))
        .with_context(|| format!("reading {} (./dev models fetches it)", from.display()))?;
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n != "model.toml") {
            std::os::unix::fs::symlink(path.canonicalize()?, to.join(path.file_name().unwrap()))?;
        }
    }
    let kept: Vec<&str> = toml.lines().filter(|l| !l.starts_with("load =")).collect();
    let toml = kept.join("\n");
    let (top, sections) = toml.split_at(toml.find("\n[").unwrap_or(toml.len()));
    let extra = if idle {
        "load = \"first-use\"\nidle_unload_after_secs = 1"
    } else {
        ""
    };
    std::fs::write(
        to.join("model.toml"),
        format!("{top}\n{extra}\n{sections}\n"),
    )?;
    Ok(())
}

async fn model(client: &Client, name: &str) -> Result<serde_json::Value> {
    let models = client.api(Method::GET, "/v1/models", None).await?;
    models["models"]
        .as_array()
        .and_then(|all| all.iter().find(|m| m["name"] == name))
        .cloned()
        .with_context(|| format!("no model {name}"))
}

async fn wait_until_unloaded(client: &Client, name: &str) -> Result<()> {
    for _ in 0..200 {
        if model(client, name).await?["state"] != "ready" {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{name} was not unloaded within 20 s")
}

/// One request that uses `name` (an embedding, or one generated token).
async fn call(client: &Client, name: &str, path: &str) -> Result<()> {
    let body = if path.ends_with("embeddings") {
        serde_json::json!({"model": name, "input": "The quick brown fox jumps over the lazy dog."})
    } else {
        serde_json::json!({
            "model": name,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 1
        })
    };
    let body = Bytes::from(body.to_string());
    client
        .api(Method::POST, path, Some(("application/json", body)))
        .await
        .map(drop)
}

async fn timed_call(client: &Client, name: &str) -> Result<Duration> {
    let started = Instant::now();
    call(client, name, MODELS[0].1).await?;
    Ok(started.elapsed())
}

fn latency_row(label: &str, latencies: &mut [Duration]) -> String {
    latencies.sort_unstable();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index].as_secs_f64() * 1e3
    };
    format!(
        "| {label} | {} | {:.2} ms | {:.2} ms |",
        latencies.len(),
        at(0.5),
        at(0.99)
    )
}
