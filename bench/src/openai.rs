//! `gigafactory-bench openai`: generated tokens/s and time to first token
//! through `/v1/chat/completions`, Gigafactory against llama.cpp's own
//! `llama-server` on the same GGUF, threads and sequence slots, with the
//! same streaming client taking turns between the two; then the cost of
//! a `json_schema` answer against a free one on each.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use gigafactory_runtime::models::ModelConfig;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use tokio::net::TcpStream;

use super::{Gigafactory, Guard, free_address, wait_until_up};
use gigafactory_gateway::cli::Client;

const MODEL: &str = "smollm2-135m-instruct";
const QUESTION: &str = "Tell me a story about a dragon who learns to read.";

/// `bench openai` options.
#[derive(Debug, clap::Args)]
pub struct OpenaiArgs {
    /// llama.cpp's `llama-server` (`./dev bench openai` builds it).
    #[arg(long)]
    pub llama_server: PathBuf,
    /// The model repository (it must hold smollm2-135m-instruct).
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// Tokens per answer.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Concurrent clients, one measurement each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32])]
    pub clients: Vec<usize>,
    /// Seconds per measurement and side (after a warm-up as long).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Tenants the clients are spread over (round-robin), as on a shared
    /// platform; one tenant alone holds at most its share of the slots.
    #[arg(long, default_value_t = 4)]
    pub tenants: usize,
}

/// One side: a base URL and the keys its clients use.
#[derive(Clone)]
struct Side {
    address: String,
    keys: Vec<String>,
}

/// What one closed-loop measurement saw.
struct Measured {
    tokens_per_second: f64,
    first_token: Vec<Duration>,
    failed: usize,
}

pub(super) async fn run(args: OpenaiArgs) -> Result<()> {
    let dir = args.models.join(MODEL);
    let config: ModelConfig = toml::from_str(
        &std::fs::read_to_string(dir.join("model.toml"))
            .with_context(|| format!("reading {}/model.toml (./dev models)", dir.display()))?,
    )?;
    let generation = config.generation.clone().unwrap_or_default();
    let threads = match generation.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };

    eprintln!("starting gigafactory serve …");
    let models = args.models.display().to_string();
    let server = Gigafactory::start(&["--models", &models]).await?;
    let admin = Client::new(
        &format!("http://{}", server.address),
        Some(super::TOKEN.into()),
    )?;
    let mut keys = vec![server.key.clone()];
    for index in 1..args.tenants.max(1) {
        let name = format!("bench{index}");
        let body = serde_json::json!({ "name": name }).to_string();
        admin
            .api(
                Method::POST,
                "/v1/tenants",
                Some(("application/json", Bytes::from(body))),
            )
            .await?;
        let key = admin
            .api(Method::POST, &format!("/v1/tenants/{name}/keys"), None)
            .await?;
        keys.push(key["key"].as_str().context("no key")?.to_string());
    }
    let ours = Side {
        address: server.address.to_string(),
        keys,
    };

    eprintln!(
        "starting llama-server ({} slots of {} tokens, {threads} threads) …",
        generation.max_sequences, generation.context_tokens
    );
    let address = free_address()?;
    let _peer = Guard(
        Command::new(&args.llama_server)
            .arg("--model")
            .arg(dir.join(&config.file))
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &address.port().to_string(),
                "--parallel",
                &generation.max_sequences.to_string(),
                "--ctx-size",
                &(generation.max_sequences * generation.context_tokens).to_string(),
                "--batch-size",
                &generation.batch_tokens.to_string(),
                "--threads",
                &threads.to_string(),
                "--threads-batch",
                &threads.to_string(),
                "--jinja",
                "--no-webui",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.llama_server.display()))?,
    );
    wait_until_up(&address, "/health").await?;
    let peer = Side {
        address: address.to_string(),
        keys: vec!["none".into()],
    };

    // Gigafactory loads the model on first use.
    let never = Instant::now() + Duration::from_secs(600);
    ours.answer(args.max_tokens, None, 0, never).await?;
    peer.answer(args.max_tokens, None, 0, never).await?;

    let mut rows = Vec::new();
    for &clients in &args.clients {
        eprintln!(
            "{clients} clients for {} s, gigafactory then llama-server …",
            args.seconds
        );
        let a = ours.closed_loop(clients, &args, None).await?;
        let b = peer.closed_loop(clients, &args, None).await?;
        rows.push((clients, a, b));
    }
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "moral": {"type": "string", "maxLength": 200},
            "characters": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 30}},
        },
        "required": ["title", "moral", "characters"],
        "additionalProperties": false,
    });
    eprintln!("1 client, free then json_schema answers, on each side …");
    let free = (
        ours.closed_loop(1, &args, None).await?,
        peer.closed_loop(1, &args, None).await?,
    );
    let constrained = (
        ours.closed_loop(1, &args, Some(&schema)).await?,
        peer.closed_loop(1, &args, Some(&schema)).await?,
    );

    println!(
        "| clients | gigafactory tokens/s | llama-server tokens/s | ratio | TTFT p50 / p99 gigafactory | TTFT p50 / p99 llama-server | failed |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (clients, a, b) in &rows {
        println!(
            "| {clients} | {:.1} | {:.1} | **{:.2}×** | {} | {} | {} / {} |",
            a.tokens_per_second,
            b.tokens_per_second,
            a.tokens_per_second / b.tokens_per_second,
            latency(&a.first_token),
            latency(&b.first_token),
            a.failed,
            b.failed
        );
    }
    println!(
        "\n| 1 client | free tokens/s | json_schema tokens/s | constrained / free |\n|---|---|---|---|"
    );
    for (name, free, constrained) in [
        ("gigafactory (llguidance)", &free.0, &constrained.0),
        ("llama-server (GBNF)", &free.1, &constrained.1),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}× |",
            free.tokens_per_second,
            constrained.tokens_per_second,
            constrained.tokens_per_second / free.tokens_per_second
        );
    }
    println!(
        "\n({} tokens per answer on average, greedy, streamed; {} s per measurement after {1} s of warm-up; clients over {} tenants on gigafactory; {threads} threads, {} slots on both)",
        args.max_tokens, args.seconds, args.tenants, generation.max_sequences
    );
    Ok(())
}

/// `p50 / p99` in milliseconds.
fn latency(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "–".into();
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    format!(
        "{:.0} / {:.0} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    )
}

impl Side {
    /// `clients` clients, each asking one streamed answer after another;
    /// measured over `args.seconds` after a warm-up as long, so the
    /// figures are the steady state and not the first wave of cold
    /// prompts. Answer lengths vary around `args.max_tokens` (from a
    /// half to one and a half times, in a sequence fixed per client, the
    /// same on both sides), so the clients do not all finish, and ask
    /// again, in the same step. Tokens count when they arrive within the
    /// window; streams still open at its end are dropped.
    async fn closed_loop(
        &self,
        clients: usize,
        args: &OpenaiArgs,
        schema: Option<&serde_json::Value>,
    ) -> Result<Measured> {
        let measure = Duration::from_secs(args.seconds);
        let from = Instant::now() + measure;
        let window = from..from + measure;
        let tasks: Vec<_> = (0..clients)
            .map(|client| {
                let (side, schema, window) = (self.clone(), schema.cloned(), window.clone());
                let mut lengths = Lengths::new(client, args.max_tokens);
                tokio::spawn(async move {
                    let (mut tokens, mut first, mut failed) = (0u64, Vec::new(), 0);
                    while Instant::now() < window.end {
                        let asked = Instant::now();
                        let length = lengths.next();
                        match side
                            .answer(length, schema.as_ref(), client, window.end)
                            .await
                        {
                            Ok(answer) => {
                                tokens +=
                                    answer.tokens.iter().filter(|t| window.contains(t)).count()
                                        as u64;
                                if window.contains(&asked) {
                                    first.extend(answer.first);
                                }
                            }
                            Err(_) => failed += 1,
                        }
                    }
                    (tokens, first, failed)
                })
            })
            .collect();
        let mut measured = Measured {
            tokens_per_second: 0.0,
            first_token: Vec::new(),
            failed: 0,
        };
        let mut tokens = 0;
        for task in tasks {
            let (count, first, failed) = task.await?;
            tokens += count;
            measured.first_token.extend(first);
            measured.failed += failed;
        }
        measured.tokens_per_second = tokens as f64 / measure.as_secs_f64();
        Ok(measured)
    }

    /// One streamed answer of at most `max_tokens`, read until it ends
    /// or `until` (or its first token, if it was asked before `until`).
    async fn answer(
        &self,
        max_tokens: u32,
        schema: Option<&serde_json::Value>,
        client: usize,
        until: Instant,
    ) -> Result<Answer> {
        let mut body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": true,
        });
        if let Some(schema) = schema {
            body["response_format"] = serde_json::json!({"type": "json_schema",
                "json_schema": {"name": "story", "strict": true, "schema": schema}});
        }
        let started = Instant::now();
        let stream = TcpStream::connect(&self.address).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let key = &self.keys[client % self.keys.len()];
        let request = hyper::Request::post("/v1/chat/completions")
            .header("host", &self.address)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from(body.to_string())))?;
        let response = sender.send_request(request).await?;
        if response.status() != 200 {
            bail!("answered {}", response.status());
        }
        let mut body = response.into_body();
        let mut answer = Answer {
            first: None,
            tokens: Vec::new(),
        };
        // Both servers send one chunk per generated token.
        loop {
            // A request asked in time is followed to its first token, however
            // long it queues, so that its wait is measured.
            let until = match answer.first {
                Some(_) => until,
                None if started < until => until + QUEUE_WAIT,
                None => until,
            };
            let frame = match tokio::time::timeout_at(until.into(), body.frame()).await {
                Ok(Some(frame)) => frame?,
                Ok(None) | Err(_) => break,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let piece = String::from_utf8_lossy(&data);
            let arrived = Instant::now();
            for event in piece.split("data: ") {
                if event.contains("\"content\":\"") && !event.contains("\"content\":\"\"") {
                    answer.first.get_or_insert(arrived - started);
                    answer.tokens.push(arrived);
                }
            }
        }
        Ok(answer)
    }
}

/// How long past the window a request asked within it is followed to its
/// first token.
const QUEUE_WAIT: Duration = Duration::from_secs(300);

/// One streamed answer: when its first text came, after the request,
/// and when each token arrived.
struct Answer {
    first: Option<Duration>,
    tokens: Vec<Instant>,
}

/// A client's answer lengths: uniform in [max/2, 3·max/2], from a
/// generator seeded by the client's number.
struct Lengths {
    state: u64,
    max_tokens: u32,
}

impl Lengths {
    fn new(client: usize, max_tokens: u32) -> Self {
        Lengths {
            state: 0x9E37_79B9_7F4A_7C15 ^ client as u64,
            max_tokens,
        }
    }

    fn next(&mut self) -> u32 {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let draw = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32;
        let low = (self.max_tokens / 2).max(1);
        low + (draw % u64::from(self.max_tokens + 1)) as u32
    }
}
