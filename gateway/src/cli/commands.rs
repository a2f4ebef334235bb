//! What each command does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt as _;
use hyper::Method;
use serde_json::Value;

use super::profiles;
use super::{
    Cli, Client, Command, FunctionsCommand, InvokeArgs, KeysCommand, LogFormat, ModelsCommand,
    NodesCommand, ServeArgs, TenantCommand,
};
use crate::bundle::{Bundle, MANIFEST_ENTRY};
use crate::manifest::Manifest;
use crate::server::{Gateway, GatewayConfig, TlsFiles};

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    if let Command::Login {
        with_token,
        default,
    } = &cli.command
    {
        return login(&cli, with_token.clone(), *default).await;
    }
    let client = || {
        let target = profiles::resolve(
            cli.url.clone(),
            cli.token.clone(),
            cli.ca.clone(),
            cli.profile.as_deref(),
        )?;
        if target.token.is_none() {
            bail!("no token: set GIGAFACTORY_TOKEN (or --token), or run `gigafactory login`");
        }
        Client::with_ca(&target.url, target.token, target.ca.as_deref())
    };
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Tenant(command) => tenant(&client()?, command, cli.json).await,
        Command::Keys(command) => keys(&client()?, command, cli.json).await,
        Command::Whoami => whoami(&client()?, cli.json).await,
        Command::Login { .. } => unreachable!("handled above"),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "gigafactory", &mut script);
            super::write_bytes(&script);
            Ok(())
        }
        Command::Deploy {
            name,
            file,
            manifest,
            watch: false,
        } => deploy(&client()?, &name, &file, manifest, cli.json).await,
        Command::Deploy {
            name,
            file,
            manifest,
            watch: true,
        } => deploy_on_change(&client()?, &name, &file, manifest, cli.json).await,
        Command::Invoke(args) => invoke(&client()?, args).await,
        Command::Functions(command) => functions(&client()?, command, cli.json).await,
        Command::Models(ModelsCommand::List) => models(&client()?, cli.json).await,
        Command::Models(ModelsCommand::Devices) => devices(&client()?, cli.json).await,
        Command::Models(command) => super::models::run(&client()?, command, cli.json).await,
        Command::Nodes(NodesCommand::List) => nodes(&client()?, cli.json).await,
        Command::Logs { name, follow } => logs(&client()?, &name, follow, cli.json).await,
        Command::New {
            name,
            template,
            sdk,
        } => {
            outln!("{}", super::new::create(&name, template, sdk.as_deref())?);
            Ok(())
        }
        Command::Backup { file } => super::operations::backup(&client()?, &file).await,
        Command::Restore { file, data } => super::operations::restore(&file, &data),
        Command::Usage {
            tenant,
            since,
            until,
            csv,
        } => {
            let range = super::operations::Range {
                tenant,
                since,
                until,
            };
            super::operations::usage(&client()?, range, csv, cli.json).await
        }
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    init_tracing(args.log_format);
    log_panics_briefly();
    let mut config = GatewayConfig::new(args.data);
    config.store = Some(args.store);
    config.models_dir = args.models;
    config.admin_token = args.admin_token;
    config.metrics_token = args.metrics_token;
    config.max_upload_bytes = args.max_upload_mib << 20;
    config.max_request_bytes = args.max_request_mib << 20;
    config.max_response_bytes = args.max_response_mib << 20;
    config.limits.timeout = Duration::from_secs(args.timeout_secs);
    config.limits.max_memory_bytes = args.memory_mib << 20;
    config.limits.max_instances = args.max_instances;
    config.pool.batching = !args.no_batching;
    config.pool.engines.onnxruntime = args.onnxruntime;
    config.pool.engines.onnx_engine = Some(args.onnx_engine);
    config.pool.engines.guest_engine = args.guest_onnx_engine;
    config.pool.cpu_memory_budget = args.cpu_model_memory_mib.map(|mib| mib << 20);
    // Below 100 ms these would refuse ordinary clients.
    let at_least = |ms: u64| Duration::from_millis(ms.max(100));
    config.header_timeout = at_least(args.header_timeout_ms);
    config.body_idle_timeout = at_least(args.body_idle_timeout_ms);
    config.idle_timeout = at_least(args.idle_timeout_ms);
    config.max_connections = args.max_connections;
    config.control_timeout = Duration::from_secs(args.control_timeout_secs);
    config.generation_timeout = Duration::from_secs(args.generation_timeout_secs);
    config.cors_origins = args.cors_origins;
    config.max_loaded_functions = args.max_loaded_functions.max(1);
    config.allow_loopback_outbound = args.allow_loopback_outbound;
    config.node.name = args.node_name;
    config.cluster_secret = args.cluster_secret;
    config.node.advertise = args.advertise;
    config.peer_ca = args.peer_ca;
    config.node.labels = args.labels.into_iter().collect();
    config.node.dead_after = Duration::from_secs(args.node_timeout_secs.max(1));
    config.node.heartbeat =
        (config.node.dead_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    config.node.drain_grace = Duration::from_secs(args.drain_secs);
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(TlsFiles { cert, key });
    }
    if let Some(threads) = args.inference_threads {
        config.pool.workers = threads.max(1);
        config.pool.engines.threads = threads.max(1);
    }
    let gateway = Gateway::start(config)
        .await
        .context("starting the gateway")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    Arc::clone(&gateway)
        .serve(listener, shutdown_signal())
        .await
}

/// The log on stderr: text (colours only on a terminal) or JSON lines.
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("GIGAFACTORY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,llama-cpp-2=warn,ort=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// Panics go to the log as one line each, at most [`PANICS_PER_MINUTE`]
/// a minute and without a backtrace: a model's panic on a tenant's input
/// is caught and becomes that call's error, so a tenant sending such
/// inputs must not be able to flood the operator's log (nor show it the
/// gateway's stack).
fn log_panics_briefly() {
    use std::sync::Mutex;
    use std::time::Instant;
    let window: Mutex<(Instant, u32)> = Mutex::new((Instant::now(), 0));
    std::panic::set_hook(Box::new(move |info| {
        let mut window = window.lock().unwrap_or_else(|e| e.into_inner());
        if window.0.elapsed() >= Duration::from_secs(60) {
            *window = (Instant::now(), 0);
        }
        window.1 += 1;
        match window.1 {
            n if n <= PANICS_PER_MINUTE => tracing::error!("panic: {info}"),
            n if n == PANICS_PER_MINUTE + 1 => {
                tracing::error!("more panics this minute are not logged")
            }
            _ => {}
        }
    }));
}

/// Panics logged per minute (see [`log_panics_briefly`]).
const PANICS_PER_MINUTE: u32 = 10;

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

async fn tenant(client: &Client, command: TenantCommand, as_json: bool) -> Result<()> {
    match command {
        TenantCommand::Create { name } => {
            let body = serde_json::json!({ "name": name }).to_string();
            let tenant = client
                .api(
                    Method::POST,
                    "/v1/tenants",
                    Some(("application/json", body.into())),
                )
                .await?;
            print_or(as_json, &tenant, || format!("created tenant {name}"));
        }
        TenantCommand::List => {
            let reply = client.api(Method::GET, "/v1/tenants", None).await?;
            print_or(as_json, &reply, || {
                list(&reply["tenants"], |t| {
                    t["name"].as_str().unwrap_or("?").to_string()
                })
            });
        }
        TenantCommand::Delete { name } => {
            client
                .api(Method::DELETE, &format!("/v1/tenants/{name}"), None)
                .await?;
            outln!("deleted tenant {name}");
        }
        TenantCommand::Quota { name, set } => {
            let tenant = match set {
                Some(quota) => {
                    let path = format!("/v1/tenants/{name}/quota");
                    client
                        .api(Method::PUT, &path, Some(("application/json", quota.into())))
                        .await?
                }
                None => {
                    client
                        .api(Method::GET, &format!("/v1/tenants/{name}"), None)
                        .await?
                }
            };
            let shown = serde_json::json!({"quota": tenant["quota"], "usage": tenant["usage"]});
            outln!(
                "{}",
                serde_json::to_string_pretty(if as_json { &tenant } else { &shown })?
            );
        }
        TenantCommand::Key { name, quiet } => tenant_key(client, &name, quiet, as_json).await?,
    }
    Ok(())
}

/// Creates a key for `tenant` and prints it (it is shown only this once).
async fn tenant_key(client: &Client, tenant: &str, quiet: bool, as_json: bool) -> Result<()> {
    let key = client
        .api(Method::POST, &format!("/v1/tenants/{tenant}/keys"), None)
        .await?;
    let secret = key["key"].as_str().unwrap_or_default();
    if quiet {
        outln!("{secret}");
    } else {
        print_or(as_json, &key, || {
            format!("API key for {tenant} (shown only this once):\n{secret}")
        });
    }
    Ok(())
}

async fn deploy(
    client: &Client,
    name: &str,
    file: &Path,
    manifest: Option<PathBuf>,
    as_json: bool,
) -> Result<()> {
    let wasm = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let manifest = manifest.or_else(|| find_manifest(file));
    let (content_type, body) = match &manifest {
        Some(path) => ("application/x-tar", bundle(&wasm, path)?),
        None => ("application/wasm", wasm),
    };
    match &manifest {
        Some(path) => eprintln!(
            "deploying {name} with {} ({} KiB bundle) …",
            path.display(),
            body.len() / 1024
        ),
        None => eprintln!(
            "deploying {name} ({} KiB) without a manifest: no {MANIFEST_ENTRY} next to {} or its crate, nor here (--manifest names one) …",
            body.len() / 1024,
            file.display()
        ),
    }
    let function = client
        .api(
            Method::PUT,
            &format!("/v1/functions/{name}"),
            Some((content_type, Bytes::from(body))),
        )
        .await
        .with_context(|| format!("deploying {}", file.display()))?;
    print_or(as_json, &function, || {
        format!(
            "deployed {name} version {} at {}",
            function["active_version"],
            function["url"].as_str().unwrap_or("?")
        )
    });
    Ok(())
}

/// `deploy --watch`: deploys now and again after each change of the wasm
/// or its manifest (once the file has stopped changing: a build may still
/// be writing it). A failed deploy is reported and the watch goes on.
///
/// The files' metadata is polled: cargo replaces the wasm by renaming a
/// new file over it, which polling sees on any file system.
async fn deploy_on_change(
    client: &Client,
    name: &str,
    file: &Path,
    manifest: Option<PathBuf>,
    as_json: bool,
) -> Result<()> {
    let stamp = |manifest: Option<&Path>| {
        [Some(file), manifest]
            .into_iter()
            .flatten()
            .map(|path| {
                std::fs::metadata(path)
                    .ok()
                    .map(|m| (m.modified().ok(), m.len()))
            })
            .collect::<Vec<_>>()
    };
    let manifest_of = || manifest.clone().or_else(|| find_manifest(file));
    let mut deployed = stamp(manifest_of().as_deref());
    if let Err(error) = deploy(client, name, file, manifest.clone(), as_json).await {
        eprintln!("error: {error:#}");
    }
    eprintln!("watching {} for changes (Ctrl-C stops) …", file.display());
    let mut seen = deployed.clone();
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let now = stamp(manifest_of().as_deref());
        // Deployed once the change has settled for one interval.
        let settled = now == seen;
        seen = now.clone();
        if !settled || now == deployed || now.first().is_some_and(Option::is_none) {
            continue;
        }
        deployed = now;
        if let Err(error) = deploy(client, name, file, manifest.clone(), as_json).await {
            eprintln!("error: {error:#}");
        }
    }
}

/// How often `deploy --watch` looks at the files.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// The manifest of the crate that built `wasm`: a `gigafactory.toml` in
/// the wasm's directory or one above it (a crate's own `target/`), or in
/// the workspace member whose package the wasm is named after (a
/// workspace's `target/`); else `./gigafactory.toml`.
fn find_manifest(wasm: &Path) -> Option<PathBuf> {
    let wasm = std::path::absolute(wasm).ok()?;
    let stem = wasm.file_stem()?.to_str()?.to_string();
    for dir in wasm.ancestors().skip(1) {
        let candidate = dir.join(MANIFEST_ENTRY);
        if candidate.is_file() {
            return Some(candidate);
        }
        if dir.file_name().is_some_and(|name| name == "target") {
            let root = dir.parent()?;
            let member = workspace_member(root, &stem).map(|member| member.join(MANIFEST_ENTRY));
            let own = root.join(MANIFEST_ENTRY);
            match member.filter(|manifest| manifest.is_file()) {
                Some(manifest) => return Some(manifest),
                None if own.is_file() => return Some(own),
                None => break,
            }
        }
    }
    let here = PathBuf::from(MANIFEST_ENTRY);
    here.is_file().then_some(here)
}

/// The directory under `root` (itself, or one level down) of the package
/// whose library compiles to `stem` (`my-fn` or `my_fn` → `my_fn.wasm`).
fn workspace_member(root: &Path, stem: &str) -> Option<PathBuf> {
    let named = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join("Cargo.toml")).ok()?;
        let cargo: toml::Table = text.parse().ok()?;
        let package = cargo.get("package")?.get("name")?.as_str()?;
        (package.replace('-', "_") == stem.replace('-', "_")).then(|| dir.to_path_buf())
    };
    named(root).or_else(|| {
        std::fs::read_dir(root)
            .ok()?
            .filter_map(Result::ok)
            .filter(|entry| entry.path().is_dir())
            .find_map(|entry| named(&entry.path()))
    })
}

/// Packs the component, the manifest and the files it maps (paths
/// relative to the manifest's directory) into a bundle.
fn bundle(wasm: &[u8], manifest_path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest = Manifest::parse(&text).map_err(anyhow::Error::msg)?;
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    for source in manifest
        .files
        .values()
        .collect::<std::collections::BTreeSet<_>>()
    {
        let path = base.join(source);
        let content = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (named in {})",
                path.display(),
                manifest_path.display()
            )
        })?;
        files.push((source.clone(), content));
    }
    Bundle::pack(wasm, Some(&text), &files).context("packing the bundle")
}

async fn invoke(client: &Client, args: InvokeArgs) -> Result<()> {
    let me = client.api(Method::GET, "/v1/whoami", None).await?;
    let Some(tenant) = me["tenant"].as_str() else {
        bail!("invoking needs a tenant API key (GIGAFACTORY_TOKEN), not the admin token");
    };
    let body = match args.data {
        Some(data) => Some(match data.strip_prefix('@') {
            Some(file) => std::fs::read(file).with_context(|| format!("reading {file}"))?,
            None => data.into_bytes(),
        }),
        None => None,
    };
    let headers = args
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("header {h:?} is not `name: value`"))
        })
        .collect::<Result<Vec<_>>>()?;
    let method = match (&args.method, &body) {
        (Some(method), _) => Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .with_context(|| format!("{method:?} is not an HTTP method"))?,
        (None, Some(_)) => Method::POST,
        (None, None) => Method::GET,
    };
    let path = format!(
        "/fn/{tenant}/{}{}",
        args.name,
        if args.path.starts_with('/') {
            args.path.clone()
        } else {
            format!("/{}", args.path)
        }
    );
    let body = body.map(|b| ("text/plain", Bytes::from(b)));
    let response = client.open(method, &path, body, &headers).await?;
    let status = response.status();
    if args.include {
        outln!("{:?} {status}", response.version());
        for (name, value) in response.headers() {
            outln!("{name}: {}", String::from_utf8_lossy(value.as_bytes()));
        }
        outln!();
    } else if !status.is_success() {
        let reply = super::client::Reply {
            status,
            headers: response.headers().clone(),
            body: response.bytes().await.unwrap_or_default(),
        };
        bail!("{}", super::client::describe_error(&reply));
    }
    // Streamed as it comes: a function's server-sent events show as sent.
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        super::write_bytes(&chunk.context("reading the response")?);
    }
    if args.include && !status.is_success() {
        bail!("the function answered {status}");
    }
    Ok(())
}

async fn functions(client: &Client, command: FunctionsCommand, as_json: bool) -> Result<()> {
    match command {
        FunctionsCommand::List => {
            let reply = client.api(Method::GET, "/v1/functions", None).await?;
            print_or(as_json, &reply, || {
                let header = format!(
                    "{:<24} {:<7} {:>12}  {:<20}  URL",
                    "NAME", "VERSION", "SIZE", "CREATED"
                );
                table(&header, &reply["functions"], |f| {
                    format!(
                        "{:<24} {:<7} {:>8} KiB  {:<20}  {}",
                        f["name"].as_str().unwrap_or("?"),
                        format!("v{}", f["active_version"]),
                        f["size"].as_u64().unwrap_or(0) / 1024,
                        when(&f["created_at"]),
                        f["url"].as_str().unwrap_or("?")
                    )
                })
            });
        }
        FunctionsCommand::Get { name } => {
            let function = client
                .api(Method::GET, &format!("/v1/functions/{name}"), None)
                .await?;
            outln!("{}", serde_json::to_string_pretty(&function)?);
        }
        FunctionsCommand::Delete { name } => {
            client
                .api(Method::DELETE, &format!("/v1/functions/{name}"), None)
                .await?;
            outln!("deleted function {name}");
        }
        FunctionsCommand::Rollback { name, version } => {
            let body = serde_json::json!({ "version": version }).to_string();
            let function = client
                .api(
                    Method::PUT,
                    &format!("/v1/functions/{name}/active"),
                    Some(("application/json", body.into())),
                )
                .await?;
            print_or(as_json, &function, || {
                format!("{name} now runs version {}", function["active_version"])
            });
        }
    }
    Ok(())
}

async fn keys(client: &Client, command: KeysCommand, as_json: bool) -> Result<()> {
    match command {
        KeysCommand::List { tenant } => {
            let reply = client
                .api(Method::GET, &format!("/v1/tenants/{tenant}/keys"), None)
                .await?;
            print_or(as_json, &reply, || {
                let header = format!("{:<20} CREATED", "ID");
                table(&header, &reply["keys"], |key| {
                    format!(
                        "{:<20} {}",
                        key["id"].as_str().unwrap_or("?"),
                        when(&key["created_at"])
                    )
                })
            });
        }
        KeysCommand::Create { tenant } => {
            tenant_key(client, &tenant, false, as_json).await?;
        }
        KeysCommand::Revoke { tenant, id } => {
            client
                .api(
                    Method::DELETE,
                    &format!("/v1/tenants/{tenant}/keys/{id}"),
                    None,
                )
                .await?;
            outln!("revoked key {id} of {tenant}");
        }
    }
    Ok(())
}

/// `gigafactory login`: checks the token against the gateway, then saves
/// both as a profile.
async fn login(cli: &Cli, with_token: Option<String>, default: bool) -> Result<()> {
    let token = match with_token.or_else(|| cli.token.clone()) {
        Some(token) => token,
        None => {
            eprintln!("paste the token (an API key or the admin token), then Enter:");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the token from stdin")?;
            line.trim().to_string()
        }
    };
    if token.is_empty() {
        bail!("no token given");
    }
    let url = cli
        .url
        .clone()
        .unwrap_or_else(|| profiles::DEFAULT_URL.to_string());
    let client = Client::with_ca(&url, Some(token.clone()), cli.ca.as_deref())?;
    let me = client
        .api(Method::GET, "/v1/whoami", None)
        .await
        .with_context(|| format!("checking the token with {url}"))?;
    let name = cli.profile.clone().unwrap_or_else(|| "default".to_string());
    let path = profiles::config_path()?;
    let mut config = profiles::Config::read(&path)?;
    let ca = match &cli.ca {
        Some(ca) => Some(std::path::absolute(ca).with_context(|| format!("{}", ca.display()))?),
        None => None,
    };
    config.profiles.insert(
        name.clone(),
        profiles::Profile {
            url: url.clone(),
            token,
            ca,
        },
    );
    if default || config.default.is_none() {
        config.default = Some(name.clone());
    }
    config.write(&path)?;
    let who = me["tenant"]
        .as_str()
        .map_or("the admin".to_string(), |t| format!("tenant {t}"));
    outln!(
        "logged in to {url} as {who}: profile {name} in {}",
        path.display()
    );
    Ok(())
}

async fn whoami(client: &Client, as_json: bool) -> Result<()> {
    let me = client.api(Method::GET, "/v1/whoami", None).await?;
    print_or(as_json, &me, || match me["tenant"].as_str() {
        Some(tenant) => format!(
            "tenant {tenant}\nquota: {}\nusage: {}",
            me["quota"], me["usage"]
        ),
        None => "the admin".to_string(),
    });
    Ok(())
}

async fn models(client: &Client, as_json: bool) -> Result<()> {
    let reply = client.api(Method::GET, "/v1/models", None).await?;
    print_or(as_json, &reply, || {
        list(&reply["models"], |m| {
            let stats = &m["stats"];
            let generation = &m["generation"];
            let counters = if generation.is_object() {
                // A text model counts generations and tokens, not calls.
                format!(
                    "{} generations ({} decoding, {} queued), {} prompt and {} generated tokens, {} rejected, {} cancelled",
                    generation["started"].as_u64().unwrap_or(0),
                    generation["active"].as_u64().unwrap_or(0),
                    generation["queued"].as_u64().unwrap_or(0),
                    generation["prompt_tokens"].as_u64().unwrap_or(0),
                    generation["completion_tokens"].as_u64().unwrap_or(0),
                    generation["rejected"].as_u64().unwrap_or(0),
                    generation["cancelled"].as_u64().unwrap_or(0),
                )
            } else {
                format!(
                    "{} calls, {} batches ({:.1} rows each), {} rejected, {} queued, {:.1} s compute",
                    stats["calls"].as_u64().unwrap_or(0),
                    stats["batches"].as_u64().unwrap_or(0),
                    stats["mean_batch_rows"].as_f64().unwrap_or(0.0),
                    stats["rejected"].as_u64().unwrap_or(0),
                    stats["queued"].as_u64().unwrap_or(0),
                    stats["compute_seconds"].as_f64().unwrap_or(0.0),
                )
            };
            let mut line = format!(
                "{:<24} {:<7} {:<11} {:<6} {:>5} MiB  {}\n    {counters}",
                match (m["owner"].as_str(), m["name"].as_str().unwrap_or("?")) {
                    (Some(owner), name) => format!("{owner}/{name}"),
                    (None, name) => name.to_string(),
                },
                m["state"].as_str().unwrap_or("?"),
                m["engine"].as_str().unwrap_or("?"),
                m["device"].as_str().unwrap_or("?"),
                m["memory_bytes"].as_u64().unwrap_or(0) >> 20,
                m["description"].as_str().unwrap_or(""),
            );
            if let Some(error) = m["error"].as_str() {
                line.push_str(&format!("\n    error: {error}"));
            }
            line
        })
    });
    Ok(())
}

async fn nodes(client: &Client, as_json: bool) -> Result<()> {
    let reply = client.api(Method::GET, "/v1/nodes", None).await?;
    print_or(as_json, &reply, || {
        list(&reply["nodes"], |n| {
            let labels: Vec<String> = n["labels"]
                .as_object()
                .map(|labels| {
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect()
                })
                .unwrap_or_default();
            let models: Vec<String> = n["report"]["models"]
                .as_array()
                .map(|models| {
                    models
                        .iter()
                        .map(|m| {
                            format!(
                                "{} ({}, {} queued)",
                                m["name"].as_str().unwrap_or("?"),
                                m["state"].as_str().unwrap_or("?"),
                                m["queued"].as_u64().unwrap_or(0)
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "{:<20} {:<9} {:<22} {:>4} in flight  heard {:.1} s ago  {}\n    models: {}",
                n["name"].as_str().unwrap_or("?"),
                n["state"].as_str().unwrap_or("?"),
                n["address"].as_str().unwrap_or("?"),
                n["report"]["in_flight"].as_u64().unwrap_or(0),
                n["last_heartbeat_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                labels.join(","),
                if models.is_empty() {
                    "none".to_string()
                } else {
                    models.join(", ")
                },
            )
        })
    });
    Ok(())
}

async fn devices(client: &Client, as_json: bool) -> Result<()> {
    let reply = client.api(Method::GET, "/v1/devices", None).await?;
    print_or(as_json, &reply, || {
        let mut text = list(&reply["devices"], |d| {
            format!(
                "{:<8} {:<40} {:>7} MiB total {:>7} MiB free {:>7} MiB budget {:>7} MiB used by models",
                d["id"].as_str().unwrap_or("?"),
                d["name"].as_str().unwrap_or("?"),
                d["memory_total_bytes"].as_u64().unwrap_or(0) >> 20,
                d["memory_free_bytes"].as_u64().unwrap_or(0) >> 20,
                d["budget_bytes"].as_u64().unwrap_or(0) >> 20,
                d["used_bytes"].as_u64().unwrap_or(0) >> 20,
            )
        });
        if let Some(why) = reply["cuda_unavailable"].as_str() {
            text.push_str(&format!("\nno GPU: {why}"));
        }
        text
    });
    Ok(())
}

async fn logs(client: &Client, name: &str, follow: bool, as_json: bool) -> Result<()> {
    let show = |l: &Value| {
        format!(
            "[{}] {}",
            l["stream"].as_str().unwrap_or("?"),
            l["line"].as_str().unwrap_or("")
        )
    };
    if follow {
        let path = format!("/v1/functions/{name}/logs?follow=true");
        return client
            .follow_lines(&path, |line| match serde_json::from_str::<Value>(line) {
                Ok(value) if !as_json => outln!("{}", show(&value)),
                _ => outln!("{line}"),
            })
            .await;
    }
    let reply = client
        .api(Method::GET, &format!("/v1/functions/{name}/logs"), None)
        .await?;
    print_or(as_json, &reply, || list(&reply["lines"], show));
    Ok(())
}

pub(super) fn print_or(as_json: bool, value: &Value, summary: impl FnOnce() -> String) {
    if as_json {
        outln!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        outln!("{}", summary());
    }
}

/// `items` as a table: `header`, then a line each.
pub(super) fn table(header: &str, items: &Value, line: impl Fn(&Value) -> String) -> String {
    match items.as_array() {
        Some(rows) if !rows.is_empty() => format!("{header}\n{}", list(items, line)),
        _ => "(none)".to_string(),
    }
}

/// Unix seconds as an RFC 3339 time (UTC).
fn when(seconds: &Value) -> String {
    match seconds.as_u64() {
        Some(seconds) => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
        )
        .to_string(),
        None => "-".to_string(),
    }
}

fn list(items: &Value, line: impl Fn(&Value) -> String) -> String {
    match items.as_array() {
        Some(items) if !items.is_empty() => items.iter().map(line).collect::<Vec<_>>().join("\n"),
        _ => "(none)".to_string(),
    }
}
