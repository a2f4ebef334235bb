//! `gigafactory-bench`: the platform measured against a peer in the same
//! run, on the same machine, under the same closed-loop load from the same
//! built-in client. It runs the `gigafactory` binary beside it
//! (`cargo build --release --bin gigafactory --bin gigafactory-bench`;
//! `./dev bench NAME` builds both and installs the peers).
//!
//! - `bench hello`: requests/s of a plain component through gigafactory and
//!   through `wasmtime serve`.
//! - `bench kinds`: the same hello as a wasi:http 0.2 handler, a WASI 0.3
//!   handler, a command and a WAGI module.
//! - `bench embed`: the `embed` function with 1, 8 and 64 clients, batching
//!   on and off, against onnxruntime running the same model in-process.
//! - `bench chat`: generated tokens/s of the `chat` function against the
//!   text engine called directly, then with 8 and 32 clients.
//! - `bench cluster`: the `embed` function on the node holding the model
//!   against the same function through a node without it.
//! - `bench models`: how long each shipped model takes to load on demand,
//!   and a resident model's latency while another loads beside it.
//! - `bench openai`: tokens/s and time to first token through
//!   `/v1/chat/completions` against llama.cpp's `llama-server`.

mod chat;
mod cluster;
mod embed;
mod hello;
mod kinds;
mod load;
mod lora;
mod models;
mod openai;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use hyper::Method;

pub use chat::ChatArgs;
pub use cluster::ClusterArgs;
pub use embed::EmbedArgs;
pub use hello::HelloArgs;
pub use kinds::KindsArgs;
pub use load::{Load, Stats};
pub use lora::LoraArgs;
pub use models::ModelsArgs;
pub use openai::OpenaiArgs;

use gigafactory_gateway::cli::Client;

/// `gigafactory-bench NAME`: one benchmark, printed as a Markdown table.
#[derive(Debug, clap::Parser)]
#[command(name = "gigafactory-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    match run(Cli::parse().command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
enum BenchCommand {
    /// Requests/s of a component: gigafactory vs `wasmtime serve`.
    Hello(HelloArgs),
    /// The same hello as each kind of function: wasi:http 0.2 and 0.3
    /// handlers, a command and a WAGI module.
    Kinds(KindsArgs),
    /// The embed function (1/8/64 clients, batching on and off) vs onnxruntime.
    Embed(EmbedArgs),
    /// The chat function's tokens/s vs the text engine called directly.
    Chat(ChatArgs),
    /// The embed function through a node without the model vs on its holder.
    Cluster(ClusterArgs),
    /// Load times of the shipped models on demand, and a resident model's
    /// latency while another loads.
    Models(ModelsArgs),
    /// Four LoRA adapters on one base vs four copies of the base.
    Lora(LoraArgs),
    /// `/v1/chat/completions` tokens/s and time to first token vs llama.cpp's `llama-server`.
    Openai(OpenaiArgs),
}

/// Runs a benchmark and prints its Markdown table.
async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Hello(args) => hello::run(args).await,
        BenchCommand::Kinds(args) => kinds::run(args).await,
        BenchCommand::Embed(args) => embed::run(args).await,
        BenchCommand::Chat(args) => chat::run(args).await,
        BenchCommand::Cluster(args) => cluster::run(args).await,
        BenchCommand::Models(args) => models::run(args).await,
        BenchCommand::Lora(args) => lora::run(args).await,
        BenchCommand::Openai(args) => openai::run(args).await,
    }
}

/// The `gigafactory` binary beside this one.
fn gigafactory() -> Result<std::path::PathBuf> {
    let beside = std::env::current_exe()?.with_file_name("gigafactory");
    if !beside.is_file() {
        bail!(
            "no gigafactory binary at {}: build it with `cargo build --release --bin gigafactory`",
            beside.display()
        );
    }
    Ok(beside)
}

/// A `gigafactory serve` child on a scratch data directory with one tenant
/// (`bench`) and its key; killed when dropped.
struct Gigafactory {
    _child: Guard,
    _data: tempfile::TempDir,
    address: SocketAddr,
    key: String,
}

impl Gigafactory {
    /// Starts `gigafactory serve` with `extra` flags and creates the tenant.
    async fn start(extra: &[&str]) -> Result<Self> {
        let mut server = Self::launch(extra).await?;
        let admin = Client::new(&format!("http://{}", server.address), Some(TOKEN.into()))?;
        let body = Bytes::from_static(br#"{"name":"bench"}"#);
        admin
            .api(
                Method::POST,
                "/v1/tenants",
                Some(("application/json", body)),
            )
            .await?;
        let key = admin
            .api(Method::POST, "/v1/tenants/bench/keys", None)
            .await?;
        server.key = key["key"]
            .as_str()
            .context("no key in the reply")?
            .to_string();
        Ok(server)
    }

    /// Starts `gigafactory serve` with `extra` flags (no tenant: `key` is empty).
    async fn launch(extra: &[&str]) -> Result<Self> {
        let data = tempfile::tempdir().context("creating a scratch data directory")?;
        let address = free_address()?;
        let child = Command::new(gigafactory()?)
            .args([
                "serve",
                "--listen",
                &address.to_string(),
                "--admin-token",
                TOKEN,
            ])
            .arg("--data")
            .arg(data.path())
            .args(extra)
            .env("GIGAFACTORY_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting gigafactory serve")?;
        let child = Guard(child);
        wait_until_up(&address, "/healthz").await?;
        Ok(Self {
            _child: child,
            _data: data,
            address,
            key: String::new(),
        })
    }

    /// Deploys `wasm` as the tenant's function `name`.
    async fn deploy(&self, name: &str, wasm: &Path) -> Result<()> {
        let bytes = std::fs::read(wasm).with_context(|| {
            format!(
                "reading {} (build the examples first: ./dev build)",
                wasm.display()
            )
        })?;
        Client::new(&format!("http://{}", self.address), Some(self.key.clone()))?
            .api(
                Method::PUT,
                &format!("/v1/functions/{name}"),
                Some(("application/wasm", Bytes::from(bytes))),
            )
            .await?;
        Ok(())
    }
}

/// The admin token of the benchmarks' servers.
const TOKEN: &str = "gfadmin_bench";

/// Kills the child when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_address() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

async fn wait_until_up(address: &SocketAddr, path: &str) -> Result<()> {
    for _ in 0..600 {
        if let Ok(status) = load::request_once(address, path).await
            && status == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the server at {address} did not come up")
}

/// A Markdown table row for `stats`.
fn row(cells: &[&str], stats: &Stats) -> String {
    format!(
        "| {} | {:.0} | {:.2} ms | {:.2} ms | {} |",
        cells.join(" | "),
        stats.rps,
        stats.p50.as_secs_f64() * 1e3,
        stats.p99.as_secs_f64() * 1e3,
        stats.errors
    )
}
