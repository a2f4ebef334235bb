//! `gigafactory-bench hello`: requests/s of one component through
//! gigafactory and through `wasmtime serve` (the peer).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};
use hyper::Method;

use super::{Gigafactory, Guard, Load, free_address, row, wait_until_up};

/// `bench hello` options.
#[derive(Debug, clap::Args)]
pub struct HelloArgs {
    /// The wasi:http component both servers run.
    #[arg(
        long,
        default_value = "examples/target/wasm32-wasip2/release/hello.wasm"
    )]
    pub component: PathBuf,
    /// The peer's `wasmtime` binary (use the version gigafactory embeds).
    #[arg(long, default_value = "wasmtime")]
    pub wasmtime: String,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Seconds measured per server.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Seconds of warm-up per server before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
}

pub(super) async fn run(args: HelloArgs) -> Result<()> {
    let version = Command::new(&args.wasmtime)
        .arg("--version")
        .output()
        .with_context(|| format!("running `{} --version` (install it: cargo install wasmtime-cli --version 48.0.8 --locked)", args.wasmtime))?;
    let peer_version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let load = |path: &str, key: Option<String>| Load {
        method: Method::GET,
        path: path.into(),
        key,
        bodies: vec![],
        connections: args.connections,
        warmup: Duration::from_secs(args.warmup),
        seconds: Duration::from_secs(args.seconds),
    };

    eprintln!("measuring gigafactory serve …");
    let server = Gigafactory::start(&[]).await?;
    server.deploy("bench", &args.component).await?;
    let ours = load("/fn/bench/bench", Some(server.key.clone()))
        .run(server.address)
        .await?;
    drop(server);

    eprintln!("measuring {peer_version} serve …");
    let address = free_address()?;
    let peer = Command::new(&args.wasmtime)
        .args(["serve", "-Scli", "--addr", &address.to_string()])
        .arg(&args.component)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting wasmtime serve")?;
    let peer_guard = Guard(peer);
    wait_until_up(&address, "/").await?;
    let peer = load("/", None).run(address).await?;
    drop(peer_guard);

    println!(
        "| server | req/s | p50 | p99 | errors |\n|---|---|---|---|---|\n{}\n{}",
        row(&["gigafactory"], &ours),
        row(&[&format!("{peer_version} serve -Scli")], &peer)
    );
    println!(
        "\ngigafactory / wasmtime serve: {:.2}x requests/s ({} connections, {} s, component {})",
        ours.rps / peer.rps,
        args.connections,
        args.seconds,
        args.component.display()
    );
    Ok(())
}
