//! `gigafactory-bench kinds`: the same hello logic deployed as each kind of
//! function the platform runs — a wasi:http 0.2 handler (the reference), a
//! WASI 0.3 handler, a `wasi:cli` command and a WAGI core module (both
//! spoken to in CGI) — measured one after another on one server, with
//! `wasmtime serve` running the two handlers as the outside peer.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use hyper::Method;

use super::{Gigafactory, Guard, Load, Stats, free_address, row, wait_until_up};
use gigafactory_gateway::cli::Client;

/// `bench kinds` options.
#[derive(Debug, clap::Args)]
pub struct KindsArgs {
    /// Where the examples were built (`hello`, `hello_p3` and `hello-cgi`
    /// for wasm32-wasip2, `hello-cgi` for wasm32-wasip1).
    #[arg(long, default_value = "examples/target")]
    pub examples: PathBuf,
    /// The peer's `wasmtime` binary; `none` to skip it.
    #[arg(long, default_value = "wasmtime")]
    pub wasmtime: String,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Seconds measured per kind.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Seconds of warm-up per kind before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
}

pub(super) async fn run(args: KindsArgs) -> Result<()> {
    let built = |target: &str, file: &str| args.examples.join(target).join("release").join(file);
    let kinds = [
        (
            "wasi:http 0.2 handler",
            "http",
            built("wasm32-wasip2", "hello.wasm"),
        ),
        (
            "wasi:http 0.3 handler",
            "http-0.3",
            built("wasm32-wasip2", "hello_p3.wasm"),
        ),
        (
            "wasi:cli command (CGI)",
            "command",
            built("wasm32-wasip2", "hello-cgi.wasm"),
        ),
        (
            "WAGI core module (CGI)",
            "wagi",
            built("wasm32-wasip1", "hello-cgi.wasm"),
        ),
    ];
    let load = |path: String, key: Option<String>| Load {
        method: Method::GET,
        path,
        key,
        bodies: vec![],
        connections: args.connections,
        warmup: Duration::from_secs(args.warmup),
        seconds: Duration::from_secs(args.seconds),
    };

    let server = Gigafactory::start(&[]).await?;
    let client = Client::new(
        &format!("http://{}", server.address),
        Some(server.key.clone()),
    )?;
    let mut ours: Vec<(&str, Stats)> = Vec::new();
    for (label, kind, wasm) in &kinds {
        let name = kind.replace('.', "-");
        server.deploy(&name, wasm).await?;
        let described = client
            .api(Method::GET, &format!("/v1/functions/{name}"), None)
            .await?;
        ensure!(
            described["kind"] == *kind,
            "{} deployed as {}, not {kind}",
            wasm.display(),
            described["kind"]
        );
        // The same answer from every kind, or the comparison is not fair.
        let path = format!("/fn/bench/{name}/bench");
        let reply = client.send(Method::GET, &path, None, &[]).await?;
        let text = String::from_utf8_lossy(&reply.body);
        ensure!(
            text == "Hello from Gigafactory! You asked for /bench\n",
            "{kind} answered {text:?}"
        );
        eprintln!("measuring the {label} …");
        ours.push((
            label,
            load(path, Some(server.key.clone()))
                .run(server.address)
                .await?,
        ));
    }
    drop(server);

    // wasmtime serve runs a 0.3 handler's requests concurrently in reused
    // instances by default; gigafactory gives each request a fresh one, as
    // `--max-instance-reuse-count 1` does.
    let peer_runs = [
        ("wasi:http 0.2 handler", &kinds[0].2, &[][..]),
        (
            "wasi:http 0.3 handler, fresh instances",
            &kinds[1].2,
            &["--max-instance-reuse-count", "1"][..],
        ),
        (
            "wasi:http 0.3 handler, reused instances",
            &kinds[1].2,
            &[][..],
        ),
    ];
    let mut peers: Vec<(&str, Stats)> = Vec::new();
    if args.wasmtime != "none" {
        for (label, wasm, extra) in peer_runs {
            eprintln!("measuring the {label} under wasmtime serve …");
            let address = free_address()?;
            let peer = Command::new(&args.wasmtime)
                .args(["serve", "-Scli", "--addr", &address.to_string()])
                .args(extra)
                .arg(wasm)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {} serve (install it: cargo install wasmtime-cli --version 48.0.8 --locked, or pass --wasmtime none)", args.wasmtime))?;
            let guard = Guard(peer);
            wait_until_up(&address, "/").await?;
            peers.push((label, load("/bench".into(), None).run(address).await?));
            drop(guard);
        }
    }

    let reference = ours[0].1.rps;
    println!(
        "| kind | server | req/s | p50 | p99 | errors | vs 0.2 handler |\n|---|---|---|---|---|---|---|"
    );
    for (label, stats) in &ours {
        let ratio = stats.rps / reference;
        println!("{} **{ratio:.2}×** |", row(&[label, "gigafactory"], stats));
    }
    for (label, stats) in &peers {
        let ratio = stats.rps / peers[0].1.rps;
        println!("{} {ratio:.2}× |", row(&[label, "wasmtime serve"], stats));
    }
    println!(
        "\n({} connections, {} s per kind after {} s of warm-up)",
        args.connections, args.seconds, args.warmup
    );
    Ok(())
}
