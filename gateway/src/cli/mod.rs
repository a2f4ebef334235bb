//! The command line: `serve` runs the platform; the other commands talk to
//! a running gateway over its HTTP API.

/// `println!` for the CLI's output: a closed pipe (`… | head`) ends the
/// program quietly instead of panicking.
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` as [`outln!`] does it.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

pub mod client;
mod commands;
mod models;
mod new;
mod operations;
mod profiles;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use client::Client;

/// Gigafactory: a serverless platform for AI functions in WebAssembly.
#[derive(Debug, Parser)]
#[command(name = "gigafactory", version, about)]
pub struct Cli {
    /// The gateway to talk to [default: the profile's, else http://127.0.0.1:8080].
    #[arg(long, global = true, env = "GIGAFACTORY_URL")]
    pub url: Option<String>,
    /// A profile `gigafactory login` saved [default: the config's default].
    #[arg(long, global = true, env = "GIGAFACTORY_PROFILE")]
    pub profile: Option<String>,
    /// An API key (tenant commands) or the admin token (tenant management).
    #[arg(long, global = true, env = "GIGAFACTORY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM certificates to trust for an https:// URL besides the system's
    /// (a private CA, or the server's self-signed certificate).
    #[arg(long, global = true, env = "GIGAFACTORY_CA")]
    pub ca: Option<PathBuf>,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the platform: HTTP gateway, sandbox and model pool.
    Serve(Box<ServeArgs>),
    /// Manage tenants (needs the admin token).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Deploy a function: a wasm32-wasip2 component exporting wasi:http/incoming-handler,
    /// with its gigafactory.toml and the files it names.
    Deploy {
        /// The function's name (a-z, 0-9, '-').
        name: String,
        /// The component file.
        file: PathBuf,
        /// The function's manifest [default: the gigafactory.toml of the
        /// wasm's crate, else ./gigafactory.toml when present].
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Keep running and deploy again whenever the wasm or the manifest
        /// changes (a rebuild); Ctrl-C stops.
        #[arg(long)]
        watch: bool,
    },
    /// Call a function of your tenant and print its response body as it streams.
    Invoke(InvokeArgs),
    /// List, show, roll back or delete your functions.
    #[command(subcommand)]
    Functions(FunctionsCommand),
    /// A tenant's API keys (the admin, or a key of that tenant).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Who the token is: the admin, or a tenant with its quota and usage.
    Whoami,
    /// Print a completion script for your shell, e.g.
    /// `gigafactory completions bash > ~/.local/share/bash-completion/completions/gigafactory`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Save a gateway's URL and token as a profile (checked first; the
    /// config file is readable by you only).
    Login {
        /// The token [default: --token / GIGAFACTORY_TOKEN, else read from stdin].
        #[arg(long = "with-token", value_name = "TOKEN", hide_env_values = true)]
        with_token: Option<String>,
        /// Make this profile the default.
        #[arg(long)]
        default: bool,
    },
    /// The model repository.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// The cluster's nodes (admin).
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Print a function's recent log lines (its stdout and stderr).
    Logs {
        /// The function's name.
        name: String,
        /// Keep printing new lines as they are written.
        #[arg(long, short)]
        follow: bool,
    },
    /// Create a function crate in ./NAME from a template: it builds with
    /// `cargo build --release --target wasm32-wasip2`, with its gigafactory.toml.
    New {
        /// The function's (and crate's) name.
        name: String,
        /// What it starts as.
        #[arg(long, value_enum, default_value = "http")]
        template: new::Template,
        /// Use the SDK crate at this path rather than a vendored copy.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Save a backup of the gateway's store (admin): every tenant, key,
    /// function, model and usage record, one moment of them, taken while
    /// it serves. Written beside FILE and checked before it replaces it.
    Backup {
        /// The archive to write (a tar file).
        file: PathBuf,
    },
    /// Restore a backup into a new data directory, before `serve` starts
    /// there (offline; the directory must hold no store).
    Restore {
        /// An archive written by `gigafactory backup`.
        file: PathBuf,
        /// The data directory to restore into.
        #[arg(long, env = "GIGAFACTORY_DATA", default_value = ".gigafactory")]
        data: PathBuf,
    },
    /// Usage per tenant and hour (requests, compute seconds, generated
    /// tokens, bytes): every tenant's for the admin, your own for a tenant.
    Usage {
        /// One tenant's (admin).
        #[arg(long)]
        tenant: Option<String>,
        /// From this time: RFC 3339 (2026-12-01T00:00:00Z) or Unix seconds
        /// [default: the last 24 hours].
        #[arg(long)]
        since: Option<String>,
        /// Until this time [default: now].
        #[arg(long)]
        until: Option<String>,
        /// Print CSV (for spreadsheets and billing) rather than a table.
        #[arg(long)]
        csv: bool,
    },
}

/// `gigafactory serve` options.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "GIGAFACTORY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Data directory (the embedded store, function files, generated admin token).
    #[arg(long, env = "GIGAFACTORY_DATA", default_value = ".gigafactory")]
    pub data: PathBuf,
    /// Control-plane store: `sled` (embedded, in the data directory) or a
    /// `postgres://user:password@host:port/database` URL shared by a cluster's nodes.
    #[arg(
        long,
        env = "GIGAFACTORY_STORE",
        hide_env_values = true,
        default_value = "sled"
    )]
    pub store: String,
    /// Model repository: `<dir>/<name>/model.toml` and the model files.
    #[arg(long, env = "GIGAFACTORY_MODELS")]
    pub models: Option<PathBuf>,
    /// Use this admin token instead of generating one.
    #[arg(long, env = "GIGAFACTORY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A token that may read /metrics and nothing else (for Prometheus).
    #[arg(long, env = "GIGAFACTORY_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Wall-clock limit of one request, in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// Linear memory limit of one instance, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: usize,
    /// Instances that may run at once.
    #[arg(long, default_value_t = 1000)]
    pub max_instances: u32,
    /// Largest wasm or bundle a deploy accepts, in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_upload_mib: usize,
    /// Largest request body a function receives (and a manifest may allow), in MiB.
    #[arg(long, default_value_t = 16)]
    pub max_request_mib: u64,
    /// Largest response body a function sends (and a manifest may allow), in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_response_mib: u64,
    /// Threads running inference (default: all cores).
    #[arg(long)]
    pub inference_threads: Option<usize>,
    /// The ONNX Runtime shared library (`libonnxruntime.so…`, e.g. from the
    /// `onnxruntime` or `onnxruntime-gpu` wheel); default: looked for next
    /// to the executable and on the system's library path.
    #[arg(long, env = "GIGAFACTORY_ONNXRUNTIME")]
    pub onnxruntime: Option<PathBuf>,
    /// The engine for ONNX models whose `model.toml` says `engine = "auto"`,
    /// and for functions' own graphs: `auto` (ONNX Runtime when its library
    /// is present, else tract), `onnxruntime` or `tract`.
    #[arg(long, default_value = "auto")]
    pub onnx_engine: String,
    /// The engine for the ONNX graphs functions pass to wasi-nn `load`
    /// (default: as `--onnx-engine`): `tract` keeps untrusted graphs in
    /// memory-safe Rust while the repository's models run on ONNX Runtime.
    #[arg(long)]
    pub guest_onnx_engine: Option<String>,
    /// Host memory the repository's models may take, in MiB (default: what
    /// is free at start). Loading a model past it unloads the least recently
    /// used ones nobody is calling (never `pin = true` ones).
    #[arg(long)]
    pub cpu_model_memory_mib: Option<u64>,
    /// Run every model call on its own, ignoring models' `[batching]` sections.
    #[arg(long)]
    pub no_batching: bool,
    /// Time a client has to send a request's headers, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Time a client may leave a request body without sending more, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub body_idle_timeout_ms: u64,
    /// A connection with no request in flight and no bytes moving for this
    /// long is closed, in milliseconds (1 s when connections are near their cap).
    #[arg(long, default_value_t = 30_000)]
    pub idle_timeout_ms: u64,
    /// Client connections open at once (also kept under the descriptor limit).
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Wall-clock limit of a control-plane request (deploys included), in seconds.
    #[arg(long, default_value_t = 120)]
    pub control_timeout_secs: u64,
    /// Wall-clock limit of an OpenAI-compatible chat completion, streamed or not, in seconds.
    #[arg(long, default_value_t = 300)]
    pub generation_timeout_secs: u64,
    /// Origins of browser apps that may call the API (CORS), repeatable:
    /// `https://app.example.com`, or `*` for any. None by default.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Function versions kept loaded (compiled code and its descriptors);
    /// the least recently used are unloaded past it.
    #[arg(long, default_value_t = 256)]
    pub max_loaded_functions: usize,
    /// Let manifests allow outbound requests to loopback addresses (and
    /// so to this gateway itself). Off by default.
    #[arg(long)]
    pub allow_loopback_outbound: bool,
    /// This node's name, unique in the cluster (default: the host name).
    #[arg(long, env = "GIGAFACTORY_NODE_NAME", value_parser = parse_node_name)]
    pub node_name: Option<String>,
    /// The secret the cluster's nodes present to each other when one sends
    /// another a request for models it holds (the same on every node).
    #[arg(long, env = "GIGAFACTORY_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Address other nodes reach this one at, `host:port` or with its
    /// scheme (default: the listening address; https:// with --tls-cert).
    #[arg(long, env = "GIGAFACTORY_ADVERTISE")]
    pub advertise: Option<String>,
    /// PEM certificates to trust for other nodes' HTTPS besides the
    /// system's roots: the cluster's own CA.
    #[arg(long, env = "GIGAFACTORY_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
    /// A label other nodes and placement rules see, `key=value` (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A node not heard from for this long is dead to the others, in seconds.
    #[arg(long, default_value_t = 5)]
    pub node_timeout_secs: u64,
    /// On SIGTERM, how long requests in flight may take to finish, in seconds.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    /// Serve HTTPS with this PEM certificate chain (reloaded on SIGHUP); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The log's format: `text` for people, `json` (one object a line) for
    /// log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "GIGAFACTORY_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// `gigafactory invoke`.
#[derive(Debug, clap::Args)]
pub struct InvokeArgs {
    /// The function's name.
    pub name: String,
    /// Request body; `@file` reads a file. Without it the request is a GET.
    #[arg(long, short)]
    pub data: Option<String>,
    /// The method [default: POST with --data, else GET].
    #[arg(long = "request", short = 'X')]
    pub method: Option<String>,
    /// Path below the function, e.g. `/search?q=fox`.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Extra header `name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Print the response's status line and headers first.
    #[arg(long, short = 'i')]
    pub include: bool,
}

/// How `serve` writes its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people (coloured on a terminal only).
    Text,
    /// One JSON object a line: time, level, target, fields, spans.
    Json,
}

fn parse_node_name(text: &str) -> Result<String, String> {
    if text.is_empty()
        || text.len() > 63
        || !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "node name {text:?}: 1 to 63 of a-z, A-Z, 0-9, `-`, `_`, `.`"
        ));
    }
    Ok(text.to_string())
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("a label is `key=value`, not {text:?}"))?;
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !valid(key) || !(value.is_empty() || valid(value)) {
        return Err(format!(
            "label {text:?}: keys and values are 1 to 63 of a-z, A-Z, 0-9, `-`, `_`, `.`"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// `gigafactory tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant.
    Create {
        /// The tenant's name (a-z, 0-9, '-').
        name: String,
    },
    /// List tenants.
    List,
    /// Delete a tenant with its keys and functions.
    Delete {
        /// The tenant's name.
        name: String,
    },
    /// Show a tenant's quota and usage, or set its quota.
    Quota {
        /// The tenant's name.
        name: String,
        /// The new quota as JSON, e.g. '{"requests_per_second": 50, "max_memory_mib": 128}'.
        #[arg(long)]
        set: Option<String>,
    },
    /// Create an API key for a tenant (shown once).
    Key {
        /// The tenant's name.
        name: String,
        /// Print only the key.
        #[arg(long, short)]
        quiet: bool,
    },
}

/// `gigafactory functions …`
#[derive(Debug, Subcommand)]
pub enum FunctionsCommand {
    /// List your functions.
    List,
    /// Show one function and its versions.
    Get {
        /// The function's name.
        name: String,
    },
    /// Delete a function and all its versions.
    Delete {
        /// The function's name.
        name: String,
    },
    /// Send a function's requests to one of its earlier (or later) versions.
    Rollback {
        /// The function's name.
        name: String,
        /// The version to run (see `functions get`).
        version: u32,
    },
}

/// `gigafactory keys` (the admin, or a key of that tenant).
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// A tenant's keys: their public ids and when they were made.
    List {
        /// The tenant's name.
        tenant: String,
    },
    /// Create a key for a tenant (shown once).
    Create {
        /// The tenant's name.
        tenant: String,
    },
    /// Revoke a key: requests with it are refused from now on.
    Revoke {
        /// The tenant's name.
        tenant: String,
        /// The key's public id (see `keys list`).
        id: String,
    },
}

/// `gigafactory nodes …`
#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List the nodes, their state, labels, models and requests in flight.
    List,
}

/// `gigafactory models …`
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List the models and their state.
    List,
    /// Show one model: its state, and for a model added through the API
    /// its version, files and model.toml.
    Show {
        /// The model's name.
        name: String,
        /// Print only its model.toml (to edit and pass to `models update --config`).
        #[arg(long)]
        config: bool,
    },
    /// Add a model from a file (`model.onnx`, `model.gguf`) or a directory
    /// (its files, and its model.toml when it has one). Files are uploaded
    /// in parts, and an interrupted upload resumes where it stopped when
    /// the command runs again. With the admin token it is the operator's
    /// model; with a tenant's key, a private model only that tenant sees.
    Add {
        /// The model's name (a-z, 0-9, '.', '_', '-').
        name: String,
        /// The model file, or a directory of its files.
        path: PathBuf,
        /// Its model.toml (default: the directory's, else one generated
        /// from what the file declares).
        #[arg(long)]
        config: Option<PathBuf>,
        /// For a generated model.toml: the format, when the file's name
        /// and content do not tell.
        #[arg(long, value_parser = ["onnx", "gguf"])]
        format: Option<String>,
        /// For a generated model.toml: what the model does
        /// (`feature-extraction`, `text-generation` …).
        #[arg(long)]
        task: Option<String>,
        /// For a generated model.toml: which file of a directory is the model.
        #[arg(long)]
        model_file: Option<String>,
        /// For a generated model.toml: every tenant may use it (operator only).
        #[arg(long)]
        public: bool,
        /// PATH is on the node the command talks to, which stores it
        /// itself: nothing is uploaded (operator only).
        #[arg(long)]
        on_node: bool,
    },
    /// Add a LoRA adapter of a GGUF text model as a model of its own: its
    /// calls run on the base's weights and scheduler, batched with the
    /// base's and its other adapters'.
    AddAdapter {
        /// The base text model.
        base: String,
        /// The adapter's name.
        name: String,
        /// The adapter's GGUF file.
        file: PathBuf,
        /// How much of the adapter applies.
        #[arg(long, default_value_t = 1.0)]
        scale: f32,
        /// Every tenant may use it (operator only).
        #[arg(long)]
        public: bool,
    },
    /// Store a new version of a model: new files, a new model.toml, or
    /// both. Calls in flight finish on the old version; new ones get the
    /// new one, loaded before it takes over when the old one was loaded.
    Update {
        /// The model's name.
        name: String,
        /// The new model file or directory (default: keep the files).
        path: Option<PathBuf>,
        /// The new model.toml (default: the directory's, else keep the
        /// current one when it still fits the files).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Remove a model added through the API.
    Remove {
        /// The model's name.
        name: String,
        /// Remove it even while functions' manifests name it.
        #[arg(long)]
        force: bool,
    },
    /// Reread the repository directory (`--models`) of the node (as SIGHUP does).
    Rescan,
    /// List the machine's devices (CPU, GPUs) and their memory.
    Devices,
}

/// Writes to stdout; exits quietly once the reader has gone.
pub(crate) fn write_out(text: std::fmt::Arguments) {
    write_bytes(text.to_string().as_bytes());
}

/// Writes bytes to stdout; exits quietly once the reader has gone.
pub(crate) fn write_bytes(bytes: &[u8]) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {error}");
        std::process::exit(1);
    }
}

/// Parses the command line, runs it, prints the cause chain on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
