//! `gigafactory-bench cluster`: two nodes on one PostgreSQL database, the
//! model on one of them. The `embed` function (its manifest names the
//! model) measured on the node holding the model, and through the other,
//! which sends each request on: the cost of a model on another node.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use hyper::Method;

use super::{Gigafactory, Load, Stats, row};
use gigafactory_gateway::bundle::Bundle;
use gigafactory_gateway::cli::Client;

/// The model the function uses.
const MODEL: &str = "all-minilm-l6-v2";

/// `bench cluster` options.
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// A PostgreSQL server (`./dev postgres` prints one); the benchmark
    /// makes its own database there and drops it after.
    #[arg(long)]
    pub store: String,
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
    #[arg(long, value_delimiter = ',', default_values_t = [1, 64])]
    pub clients: Vec<usize>,
    /// Seconds measured per point.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Seconds of warm-up per point before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
}

pub(super) async fn run(args: ClusterArgs) -> Result<()> {
    let model = args.models.join(MODEL);
    if !model.join("model.onnx").is_file() {
        bail!(
            "{} has no model.onnx (fetch the models first: ./dev models)",
            model.display()
        );
    }
    let repository = tempfile::tempdir()?;
    std::os::unix::fs::symlink(model.canonicalize()?, repository.path().join(MODEL))?;
    let empty = tempfile::tempdir()?;
    let database = Database::create(&args.store).await?;
    let node = |name: &'static str, models: PathBuf| {
        let url = database.url.clone();
        async move {
            let flags = [
                "--store".to_string(),
                url,
                "--node-name".into(),
                name.into(),
                "--cluster-secret".into(),
                "bench-cluster-secret".into(),
                "--models".into(),
                models.display().to_string(),
            ];
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            Gigafactory::launch(&flags).await
        }
    };
    eprintln!("starting the node holding the model …");
    let mut holder = node("holder", repository.path().to_path_buf()).await?;
    let admin = Client::new(
        &format!("http://{}", holder.address),
        Some(super::TOKEN.into()),
    )?;
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
    holder.key = key["key"].as_str().context("no key")?.to_string();
    let wasm = std::fs::read(&args.component).with_context(|| {
        format!(
            "reading {} (build the examples first: ./dev build)",
            args.component.display()
        )
    })?;
    let manifest = format!("models = [\"{MODEL}\"]");
    let bundle = Bundle::pack(&wasm, Some(&manifest), &[])?;
    Client::new(
        &format!("http://{}", holder.address),
        Some(holder.key.clone()),
    )?
    .api(
        Method::PUT,
        "/v1/functions/embed",
        Some(("application/x-tar", Bytes::from(bundle))),
    )
    .await?;
    eprintln!("starting the node without it …");
    let mut front = node("front", empty.path().to_path_buf()).await?;
    front.key = holder.key.clone();

    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for &clients in &args.clients {
        let mut measured: Vec<Stats> = Vec::new();
        for (label, server) in [
            ("on the holder", &holder),
            ("through the other node", &front),
        ] {
            eprintln!("  {clients} clients, {label} …");
            let stats = Load {
                method: Method::POST,
                path: "/fn/bench/embed".into(),
                key: Some(server.key.clone()),
                bodies: super::embed::SENTENCES
                    .iter()
                    .map(|s| ("text/plain", Bytes::from_static(s.as_bytes())))
                    .collect(),
                connections: clients,
                warmup: Duration::from_secs(args.warmup),
                seconds: Duration::from_secs(args.seconds),
            }
            .run(server.address)
            .await?;
            rows.push(row(&[label, &clients.to_string()], &stats));
            measured.push(stats);
        }
        let (local, remote) = (&measured[0], &measured[1]);
        ratios.push(format!(
            "- {clients} clients: through the other node / on the holder = {:.2}x req/s; added p50 {:.2} ms, p99 {:.2} ms",
            remote.rps / local.rps,
            (remote.p50.as_secs_f64() - local.p50.as_secs_f64()) * 1e3,
            (remote.p99.as_secs_f64() - local.p99.as_secs_f64()) * 1e3,
        ));
    }
    drop((front, holder));
    database.drop_it().await?;
    println!(
        "| embed function | clients | req/s | p50 | p99 | errors |\n|---|---|---|---|---|---|\n{}\n\n{}",
        rows.join("\n"),
        ratios.join("\n")
    );
    println!(
        "\n({} s per point after {} s of warm-up; both nodes and PostgreSQL on this machine, {} CPU threads)",
        args.seconds,
        args.warmup,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    Ok(())
}

/// A scratch database on the benchmark's server.
struct Database {
    admin: tokio_postgres::Client,
    name: String,
    url: String,
}

impl Database {
    async fn create(server: &str) -> Result<Self> {
        let (admin, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls)
            .await
            .context("connecting to the PostgreSQL server")?;
        tokio::spawn(connection);
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
        let name = format!("gigafactory_bench_{}", hex::encode(nonce));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let (base, _) = server
            .rsplit_once('/')
            .context("the store URL ends in /database")?;
        let url = format!("{base}/{name}");
        Ok(Self { admin, name, url })
    }

    async fn drop_it(self) -> Result<()> {
        // The nodes' connections close as they exit.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping database {}", self.name))
    }
}
