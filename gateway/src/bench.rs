//! `gigafactory bench`: requests/s of one component through gigafactory
//! and through `wasmtime serve` (the peer), under the same closed-loop
//! load from the same built-in client, in the same run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Method;
use tokio::net::TcpStream;

use crate::cli::Client;

/// Benchmark options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
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

/// What one measured run gave.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Successful requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Responses that were not 200.
    pub errors: u64,
}

/// Runs the benchmark and prints a Markdown table.
pub async fn run(args: BenchArgs) -> Result<()> {
    let wasm = std::fs::read(&args.component).with_context(|| {
        format!(
            "reading {} (build the examples first: ./dev build)",
            args.component.display()
        )
    })?;
    let version = Command::new(&args.wasmtime)
        .arg("--version")
        .output()
        .with_context(|| format!("running `{} --version` (install it: cargo install wasmtime-cli --version 48.0.8 --locked)", args.wasmtime))?;
    let peer_version = String::from_utf8_lossy(&version.stdout).trim().to_string();

    eprintln!("measuring gigafactory serve …");
    let ours = measure_gigafactory(&wasm, &args).await?;
    eprintln!("measuring {peer_version} serve …");
    let peer = measure_wasmtime(&args).await?;

    println!(
        "| server | req/s | p50 | p99 | errors |\n|---|---|---|---|---|\n{}\n{}",
        row("gigafactory", &ours),
        row(&format!("{peer_version} serve -Scli"), &peer)
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

fn row(name: &str, stats: &Stats) -> String {
    format!(
        "| {name} | {:.0} | {:.2} ms | {:.2} ms | {} |",
        stats.rps,
        stats.p50.as_secs_f64() * 1e3,
        stats.p99.as_secs_f64() * 1e3,
        stats.errors
    )
}

async fn measure_gigafactory(wasm: &[u8], args: &BenchArgs) -> Result<Stats> {
    let data = tempfile::tempdir().context("creating a scratch data directory")?;
    let address = free_address()?;
    let token = "gfadmin_bench";
    let server = Command::new(std::env::current_exe()?)
        .args([
            "serve",
            "--listen",
            &address.to_string(),
            "--admin-token",
            token,
        ])
        .arg("--data")
        .arg(data.path())
        .env("GIGAFACTORY_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting gigafactory serve")?;
    let server = Guard(server);
    let url = format!("http://{address}");
    wait_until_up(&address, "/healthz").await?;
    let admin = Client::new(&url, Some(token.into()))?;
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
    let key = key["key"]
        .as_str()
        .context("no key in the reply")?
        .to_string();
    let tenant = Client::new(&url, Some(key.clone()))?;
    tenant
        .api(
            Method::PUT,
            "/v1/functions/bench",
            Some(("application/wasm", Bytes::copy_from_slice(wasm))),
        )
        .await?;
    let stats = load(address, "/fn/bench/bench", Some(&key), args).await;
    drop(server);
    stats
}

async fn measure_wasmtime(args: &BenchArgs) -> Result<Stats> {
    let address = free_address()?;
    let server = Command::new(&args.wasmtime)
        .args(["serve", "-Scli", "--addr", &address.to_string()])
        .arg(&args.component)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting wasmtime serve")?;
    let server = Guard(server);
    wait_until_up(&address, "/").await?;
    let stats = load(address, "/", None, args).await;
    drop(server);
    stats
}

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
        if let Ok((status, _)) = request_once(address, path, None).await
            && status == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the server at {address} did not come up")
}

async fn request_once(
    address: &SocketAddr,
    path: &str,
    key: Option<&str>,
) -> Result<(u16, Duration)> {
    let mut sender = connect(address).await?;
    send(&mut sender, address, path, key).await
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(address: &SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn send(
    sender: &mut Sender,
    address: &SocketAddr,
    path: &str,
    key: Option<&str>,
) -> Result<(u16, Duration)> {
    let mut request = hyper::Request::get(path).header("host", address.to_string());
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let started = Instant::now();
    sender.ready().await?;
    let response = sender.send_request(request.body(Empty::new())?).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok((status, started.elapsed()))
}

/// Closed loop: each connection sends its next request when the previous
/// one is answered; a warm-up period is discarded.
async fn load(
    address: SocketAddr,
    path: &str,
    key: Option<&str>,
    args: &BenchArgs,
) -> Result<Stats> {
    let warm_until = Instant::now() + Duration::from_secs(args.warmup);
    let end = warm_until + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let path = path.to_string();
        let key = key.map(str::to_string);
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&address).await?;
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let (status, latency) = send(&mut sender, &address, &path, key.as_deref()).await?;
                if now >= warm_until {
                    if status == 200 {
                        latencies.push(latency);
                    } else {
                        errors += 1;
                    }
                }
            }
            anyhow::Ok((latencies, errors))
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mine, my_errors) = task.await??;
        latencies.extend(mine);
        errors += my_errors;
    }
    if latencies.is_empty() {
        bail!("no successful requests to {path}");
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Ok(Stats {
        rps: latencies.len() as f64 / args.seconds as f64,
        p50: at(0.50),
        p99: at(0.99),
        errors,
    })
}
