//! Text generation: GGUF models run by llama.cpp, loaded once and shared by
//! every tenant. The host owns tokenisation, the chat template, the KV cache
//! and batching: one scheduler thread per model decodes every active
//! sequence of every tenant together, one `llama_batch` per step
//! (continuous batching); sequences join and leave between steps.

mod scheduler;
mod template;
mod text;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::{LlamaModelParams, LlamaSplitMode};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc as tokio_mpsc;

use crate::ComputeBudget;
use crate::service::AiError;
use template::ChatTemplate;

/// ChatML, llama.cpp's choice for a model that carries no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The model's chat template (`tokenizer.chat_template`), or ChatML when
/// it carries none; a template that does not compile leaves chat prompts
/// refused with the reason (raw prompts still work).
fn chat_template(name: &str, model: &LlamaModel) -> Result<ChatTemplate, String> {
    let vocab = model.vocab();
    let text = |token: LlamaToken| {
        if token.0 < 0 || token.0 >= vocab.n_tokens() {
            return String::new();
        }
        vocab
            .text(token)
            .map(|text| text.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let (bos, eos) = (text(vocab.bos()), text(vocab.eos()));
    let source = model.meta_val_str("tokenizer.chat_template");
    let source = source.as_deref().unwrap_or(CHATML);
    ChatTemplate::new(source, bos, eos).inspect_err(|e| {
        tracing::warn!(model = %name, "{e}: chat prompts are refused, raw prompts work");
    })
}

/// `[generation]` in a text model's `model.toml`.
///
/// ```toml
/// [generation]
/// max_sequences = 8      # generations decoded together
/// context_tokens = 2048  # KV cache of each (prompt + output tokens)
/// batch_tokens = 512     # most tokens per decode step (prompts are fed in chunks)
/// threads = 0            # 0: the machine's cores
/// max_queue = 64         # waiting generations; past it, refused at once
/// max_sequences_per_tenant = 6  # slots one tenant may hold (default: three quarters)
/// default_max_tokens = 256      # an answer's length when the caller sets none
/// prompt_cache = "tenant"       # or "shared": whose cached prompts a generation may reuse
/// ```
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// Sequences decoded together.
    #[serde(default = "default_sequences")]
    pub max_sequences: u32,
    /// Tokens of KV cache per sequence: a prompt plus `max_tokens` must fit.
    /// The model's KV budget is `max_sequences × context_tokens`.
    #[serde(default = "default_context")]
    pub context_tokens: u32,
    /// Most tokens in one decode step.
    #[serde(default = "default_batch")]
    pub batch_tokens: u32,
    /// Threads llama.cpp uses; 0: the machine's cores.
    #[serde(default)]
    pub threads: u32,
    /// Generations waiting for a slot; past it `generate` is refused at once.
    #[serde(default = "default_queue")]
    pub max_queue: usize,
    /// Generations one tenant may have waiting (default: half of `max_queue`).
    #[serde(default)]
    pub max_queue_per_tenant: Option<usize>,
    /// Sequence slots one tenant may hold at once (default: all but a
    /// quarter of `max_sequences`, leaving at least one, and holding at
    /// least one), so that a tenant running long generations leaves slots
    /// for the others.
    #[serde(default)]
    pub max_sequences_per_tenant: Option<u32>,
    /// Most tokens of an answer whose caller sets no `max_tokens` (the
    /// OpenAI-compatible API), lowered to what the context leaves: small
    /// models can run on for as long as they are let.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// Whose cached prompt a generation may start from.
    #[serde(default)]
    pub prompt_cache: PromptCache,
}

/// Whose prompt a slot's KV cache may serve again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptCache {
    /// Only the tenant that left it: another tenant's faster first token
    /// would tell it that someone sent the same start of a prompt.
    #[default]
    Tenant,
    /// Any tenant's, for installs whose tenants trust each other: every
    /// generation that starts like a cached prompt (a common system
    /// prompt) skips that part, whoever sent it.
    Shared,
}

impl GenerationConfig {
    /// Slots one tenant may hold at once: by default all but a quarter
    /// (at least one slot is left to the others when there are two or more).
    pub fn sequences_per_tenant(&self) -> u32 {
        let slots = self.max_sequences;
        self.max_sequences_per_tenant
            .unwrap_or(slots - (slots / 4).max(1))
            .clamp(1, slots.max(1))
    }
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_sequences: default_sequences(),
            context_tokens: default_context(),
            batch_tokens: default_batch(),
            threads: 0,
            max_queue: default_queue(),
            max_queue_per_tenant: None,
            max_sequences_per_tenant: None,
            default_max_tokens: default_max_tokens(),
            prompt_cache: PromptCache::default(),
        }
    }
}

fn default_max_tokens() -> u32 {
    256
}

fn default_sequences() -> u32 {
    8
}

fn default_context() -> u32 {
    2048
}

fn default_batch() -> u32 {
    512
}

fn default_queue() -> usize {
    64
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Raw text, tokenised as is (special tokens in it are parsed).
    Text(String),
    /// Chat messages `(role, content)`, rendered with the model's own template.
    Chat(Vec<(String, String)>),
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The prompt.
    pub prompt: Prompt,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Lower `max_tokens` to what the context leaves after the prompt,
    /// instead of refusing a request that does not fit.
    pub fit_context: bool,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability (1: off).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: u32,
    /// The sampler's seed.
    pub seed: u32,
    /// Generation ends before the first of these strings.
    pub stop: Vec<String>,
    /// Divides the odds of tokens among the last `repeat_last_n` (prompt
    /// included) by this much (1: off).
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat, frequency and presence
    /// penalties look at.
    pub repeat_last_n: u32,
    /// Subtracted from a token's logit once per time it occurred in the
    /// window (OpenAI's `frequency_penalty`, -2 to 2; 0: off).
    pub frequency_penalty: f32,
    /// Subtracted from a token's logit if it occurred in the window at all
    /// (OpenAI's `presence_penalty`, -2 to 2; 0: off).
    pub presence_penalty: f32,
    /// Added to these tokens' logits before sampling (OpenAI's
    /// `logit_bias`: the model's own token ids, -100 to 100; -100 bans a
    /// token, 100 all but forces it). At most [`MAX_LOGIT_BIASES`].
    pub logit_bias: Vec<(i32, f32)>,
    /// What the text must match, enforced token by token.
    pub constraint: Option<Constraint>,
    /// Report each generated token's log-probability and this many
    /// alternatives ([`Event::Token`]; at most [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<u32>,
    /// Who pays for the tokens, charged as each is generated.
    pub budget: Option<Arc<dyn ComputeBudget>>,
}

/// Lexer work one constrained token may take (llguidance's fuel: about
/// 14 000 a millisecond, so about 7 ms).
const STEP_LEXER_FUEL: u64 = 100_000;
/// Lexer states one constraint may build (1–2 kB each).
const MAX_LEXER_STATES: usize = 20_000;

/// The most tokens one request may bias (OpenAI's limit).
pub const MAX_LOGIT_BIASES: usize = 300;

/// The most alternatives a token's log-probability may list.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// What a generation's text must match. Enforced by constrained decoding
/// (llguidance): each step, every token that would leave the language is
/// masked before sampling, so the text always parses, unless `max_tokens`
/// cuts it short.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON value valid against this JSON schema.
    JsonSchema(serde_json::Value),
    /// A grammar in llguidance's Lark syntax (`%json { … }` embeds a schema).
    Lark(String),
}

/// A token and how likely the model found it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Its text (lossy where it is part of a character).
    pub text: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Natural log of its probability under the model's distribution
    /// (before sampling settings and constraints).
    pub logprob: f32,
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token generated.
    pub chosen: Candidate,
    /// The most likely tokens at that step, most likely first.
    pub top: Vec<Candidate>,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            prompt: Prompt::Text(String::new()),
            max_tokens: 256,
            fit_context: false,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: vec![],
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            constraint: None,
            logprobs: None,
            budget: None,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn, or a stop string was reached.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// Token counts of a finished generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Tokens of the prompt (after the chat template).
    pub prompt_tokens: u32,
    /// Of those, the tokens whose KV cache a previous generation with the
    /// same start left in the slot (not computed again).
    pub cached_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// What a generation yields, in order: text chunks, then one `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next piece of text.
    Text(String),
    /// A generated token's log-probability, when the request asked for
    /// them: sent as the token is sampled, before the text it adds.
    Token(TokenLogprob),
    /// Generation ended.
    Done(Usage),
    /// Generation failed.
    Failed(String),
}

/// Why an adapter of a loaded base cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterError {
    /// The base was loaded before the adapter was added: it must load again.
    NotLoaded,
    /// llama.cpp refused it when the base loaded.
    Failed(String),
}

/// Why a request could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerateError {
    /// A parameter is out of range, or the prompt cannot be rendered.
    #[error("{0}")]
    Invalid(String),
    /// The prompt and `max_tokens` need more KV cache than the model has.
    #[error("{0}")]
    TooLarge(String),
    /// The queue is full (in all, or this tenant's share); retry shortly.
    #[error("model busy: {0}; retry shortly")]
    Busy(String),
    /// The model's scheduler stopped.
    #[error("the model stopped: {0}")]
    Stopped(String),
}

/// A running generation; dropping it cancels the generation and frees its
/// KV cache at the scheduler's next step.
pub struct Generation {
    events: tokio_mpsc::UnboundedReceiver<Event>,
    prompt_tokens: u32,
}

impl Generation {
    /// The next event; `None` after `Done`/`Failed`.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Polls for the next event (for hand-written futures and bodies).
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }

    /// Tokens in the prompt.
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt_tokens
    }

    /// The whole answer, once the generation ends; or why it failed.
    pub async fn collect(mut self) -> Result<Answer, AiError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        loop {
            match self.next().await {
                Some(Event::Text(piece)) => text.push_str(&piece),
                Some(Event::Token(token)) => tokens.push(token),
                Some(Event::Done(usage)) => {
                    return Ok(Answer {
                        text,
                        tokens,
                        usage,
                    });
                }
                Some(Event::Failed(why)) => return Err(AiError::Failed(why)),
                None => return Err(AiError::Unavailable("the model stopped".into())),
            }
        }
    }
}

/// A whole generation.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Its text.
    pub text: String,
    /// Its tokens' log-probabilities, when the request asked for them.
    pub tokens: Vec<TokenLogprob>,
    /// Its token counts and why it ended.
    pub usage: Usage,
}

/// Counters for `/v1/models` and `/metrics`.
#[derive(Debug, Default)]
pub struct TextStats {
    /// Generations decoding now.
    pub active: AtomicUsize,
    /// Generations waiting for a slot.
    pub queued: AtomicUsize,
    /// Generations started.
    pub started: AtomicU64,
    /// Generations refused because the queue was full.
    pub rejected: AtomicU64,
    /// Generations cancelled by their caller before the end.
    pub cancelled: AtomicU64,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub completion_tokens: AtomicU64,
    /// Decode steps run.
    pub steps: AtomicU64,
    /// Per tenant: prompt and generated tokens of its finished (or
    /// cancelled) generations. Only `/metrics` (admin) shows it.
    tenants: Mutex<BTreeMap<Arc<str>, (u64, u64)>>,
}

impl TextStats {
    /// Adds a generation's tokens to its tenant, when it leaves its slot.
    pub(crate) fn charge_tenant(&self, tenant: &Arc<str>, prompt: u64, generated: u64) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = tenants.entry(tenant.clone()).or_default();
        tokens.0 += prompt;
        tokens.1 += generated;
    }

    /// Forgets a deleted tenant.
    pub(crate) fn forget_tenant(&self, tenant: &str) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants.remove(tenant);
    }

    /// `(tenant, prompt tokens, generated tokens)` of generations that ended.
    pub fn tenant_tokens(&self) -> Vec<(Arc<str>, u64, u64)> {
        let tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants
            .iter()
            .map(|(t, &(p, g))| (t.clone(), p, g))
            .collect()
    }
}

/// A text model's settings and counters, as `GET /v1/models` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct TextInfo {
    /// Its `[generation]` settings.
    pub config: GenerationConfig,
    /// Generations decoding now.
    pub active: usize,
    /// Generations waiting for a slot.
    pub queued: usize,
    /// Generations started.
    pub started: u64,
    /// Generations refused because the queue was full.
    pub rejected: u64,
    /// Generations their caller dropped before the end.
    pub cancelled: u64,
    /// Prompt tokens processed.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Decode steps run.
    pub steps: u64,
}

/// A LoRA adapter loaded with its base model.
#[derive(Debug, Clone)]
pub struct AdapterFile {
    /// The adapter's catalog key.
    pub key: String,
    /// Its GGUF file.
    pub path: PathBuf,
    /// How much of it applies (1: all).
    pub scale: f32,
}

/// A resident text model and its scheduler — or a LoRA adapter of one,
/// which shares its base's weights, scheduler and sequence slots.
pub struct TextModel {
    /// Its repository name (an adapter's: `base:adapter`), for spans.
    name: Arc<str>,
    model: Arc<LlamaModel>,
    /// For an adapter: its index among the base's adapters, and the base
    /// (held, so the base is in use while an adapter of it is loaded).
    adapter: Option<(usize, Arc<TextModel>)>,
    /// The adapters loaded with this model, by key: their index, or why
    /// they did not load.
    adapters: Arc<BTreeMap<String, Result<usize, String>>>,
    /// Bytes of the adapters' files, held with the weights.
    adapter_bytes: u64,
    /// `cpu`, or `cuda:N` where its layers and KV cache live.
    device: String,
    /// Renders chat prompts: the model's own template, else ChatML.
    template: Arc<Result<ChatTemplate, String>>,
    /// Compiles output constraints against the model's vocabulary; built
    /// on the first constrained request (it walks the whole vocabulary)
    /// and shared with the model's adapters.
    grammars: Arc<OnceLock<Result<Arc<ParserFactory>, String>>>,
    config: GenerationConfig,
    jobs: Mutex<mpsc::Sender<scheduler::Job>>,
    waiting: Arc<crate::queue::Waiting>,
    stats: Arc<TextStats>,
}

/// llama.cpp's process-wide state, initialised once.
fn backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| format!("initialising llama.cpp: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Bytes of KV cache `config` makes `model` allocate: keys and values (f16,
/// llama.cpp's default) of every layer for `max_sequences × context_tokens`
/// cells. Read from the GGUF header (`<arch>.block_count`, …), which a
/// header-only load has too; 0 if the header lacks them.
fn kv_bytes(model: &LlamaModel, config: &GenerationConfig) -> u64 {
    let number = |key: &str| -> Option<u64> {
        let arch = model.meta_val_str("general.architecture").ok()?;
        model
            .meta_val_str(&format!("{arch}.{key}"))
            .ok()?
            .parse()
            .ok()
    };
    let (Some(layers), Some(width), Some(heads)) = (
        number("block_count"),
        number("embedding_length"),
        number("attention.head_count"),
    ) else {
        return 0;
    };
    let kv_heads = number("attention.head_count_kv").unwrap_or(heads);
    let per_token = 2 * layers * kv_heads * (width / heads.max(1)) * 2;
    per_token * u64::from(config.max_sequences) * u64::from(config.context_tokens)
}

/// The memory loading the GGUF file at `path` with `config` will take
/// (weights and KV cache), read from its header without loading weights.
pub fn estimate_memory(path: &Path, config: &GenerationConfig) -> Result<u64, String> {
    let header = header_only(path)?;
    let weights = std::fs::metadata(path).map_or(0, |m| m.len());
    Ok(weights + kv_bytes(&header, config))
}

/// What a GGUF file's header says about its model.
#[derive(Debug, Clone)]
pub struct Header {
    /// `general.architecture` (`llama`, `qwen2` …).
    pub architecture: String,
    /// `general.name`, when set.
    pub name: Option<String>,
    /// `<arch>.context_length`: the context it was trained for.
    pub context_length: Option<u32>,
    /// Whether it carries a chat template (`tokenizer.chat_template`).
    pub chat_template: bool,
}

/// Reads the header of the GGUF file at `path` (metadata and vocabulary,
/// no weights).
pub fn read_header(path: &Path) -> Result<Header, String> {
    let header = header_only(path)?;
    let architecture = header
        .meta_val_str("general.architecture")
        .map_err(|_| format!("{} has no general.architecture", path.display()))?;
    Ok(Header {
        name: header.meta_val_str("general.name").ok(),
        context_length: header
            .meta_val_str(&format!("{architecture}.context_length"))
            .ok()
            .and_then(|n| n.parse().ok()),
        chat_template: header.meta_val_str("tokenizer.chat_template").is_ok(),
        architecture,
    })
}

/// The GGUF file at `path` loaded without its weights: metadata and vocabulary.
fn header_only(path: &Path) -> Result<LlamaModel, String> {
    let params = LlamaModelParams::default()
        .with_vocab_only(true)
        .with_n_gpu_layers(0);
    LlamaModel::load_from_file(backend()?, path, &params)
        .map_err(|e| format!("reading the GGUF header of {}: {e}", path.display()))
}

/// Whether this build can run text models on GPUs (feature `llm-cuda`:
/// llama.cpp's CUDA backend, which needs the CUDA toolkit to build).
pub const GPU_BUILD: bool = cfg!(feature = "llm-cuda");

impl TextModel {
    /// Loads the GGUF file at `path` onto `device` (`cpu`, or `cuda:N` in a
    /// [`GPU_BUILD`]: every layer and the KV cache on that GPU) and starts
    /// its scheduler thread (named after `name`); blocking.
    pub fn load(
        name: &str,
        path: &Path,
        config: GenerationConfig,
        device: &str,
        adapters: &[AdapterFile],
    ) -> Result<Arc<Self>, String> {
        if config.max_sequences == 0
            || config.context_tokens == 0
            || config.batch_tokens == 0
            || config
                .context_tokens
                .checked_mul(config.max_sequences)
                .is_none()
        {
            return Err(
                "generation: max_sequences, context_tokens and batch_tokens must be at least 1, and their product fit 32 bits"
                    .into(),
            );
        }
        let params = match device.strip_prefix("cuda:") {
            None if device == "cpu" => LlamaModelParams::default().with_n_gpu_layers(0),
            Some(index) if GPU_BUILD => {
                let index: i32 = index
                    .parse()
                    .map_err(|_| format!("no such device {device:?}"))?;
                LlamaModelParams::default()
                    .with_n_gpu_layers(u32::MAX)
                    .with_split_mode(LlamaSplitMode::None)
                    .with_main_gpu(index)
            }
            _ => {
                return Err(format!(
                    "text models cannot run on {device:?} in this build"
                ));
            }
        };
        let backend = backend()?;
        let mut model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
        // Adapters load before the context: it sizes its graphs for them.
        let mut loaded = Vec::new();
        let mut index = BTreeMap::new();
        let mut adapter_bytes = 0;
        for adapter in adapters {
            let outcome = match model.lora_adapter_init(&adapter.path) {
                Ok(lora) => {
                    adapter_bytes += std::fs::metadata(&adapter.path).map_or(0, |m| m.len());
                    loaded.push((lora, adapter.scale));
                    Ok(loaded.len() - 1)
                }
                Err(e) => {
                    tracing::error!(adapter = %adapter.key, base = %name, "LoRA adapter refused: {e}");
                    Err(format!(
                        "loading the LoRA adapter {}: {e}",
                        adapter.path.display()
                    ))
                }
            };
            index.insert(adapter.key.clone(), outcome);
        }
        let model = Arc::new(model);
        let template = Arc::new(chat_template(name, &model));
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()) as i32,
            n => n as i32,
        };
        let context = NonZeroU32::new(config.context_tokens).expect("checked above");
        let waiting = Arc::new(crate::queue::Waiting::new(
            config.max_queue,
            config.max_queue_per_tenant,
        ));
        let stats = Arc::new(TextStats::default());
        let (jobs, receiver) = mpsc::channel();
        let started = scheduler::start(
            name,
            scheduler::Setup {
                model: model.clone(),
                context,
                batch_tokens: config.batch_tokens,
                max_sequences: config.max_sequences,
                sequences_per_tenant: config.sequences_per_tenant(),
                prompt_cache: config.prompt_cache,
                threads,
                waiting: waiting.clone(),
                stats: stats.clone(),
                adapters: loaded,
            },
            receiver,
        )?;
        started
            .recv()
            .map_err(|_| "the scheduler thread died".to_string())??;
        Ok(Arc::new(Self {
            name: name.into(),
            model,
            adapter: None,
            adapters: Arc::new(index),
            adapter_bytes,
            device: device.to_string(),
            template,
            grammars: Arc::default(),
            config,
            jobs: Mutex::new(jobs),
            waiting,
            stats,
        }))
    }

    /// The LoRA adapter `key` of this base model, loaded with it: a text
    /// model of its own (its own counters) whose generations run in this
    /// model's scheduler, batched with the base's and other adapters'.
    pub fn adapter(self: &Arc<Self>, key: &str) -> Result<Arc<TextModel>, AdapterError> {
        let index = match self.adapters.get(key) {
            Some(Ok(index)) => *index,
            Some(Err(why)) => return Err(AdapterError::Failed(why.clone())),
            None => return Err(AdapterError::NotLoaded),
        };
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(Arc::new(Self {
            name: format!("{}:{key}", self.name).into(),
            model: self.model.clone(),
            adapter: Some((index, self.clone())),
            adapters: Arc::default(),
            adapter_bytes: 0,
            device: self.device.clone(),
            template: self.template.clone(),
            grammars: self.grammars.clone(),
            config: self.config.clone(),
            jobs: Mutex::new(jobs),
            waiting: self.waiting.clone(),
            stats: Arc::new(TextStats::default()),
        }))
    }

    /// The model's counters.
    pub fn stats(&self) -> &TextStats {
        &self.stats
    }

    /// Settings and counters for `GET /v1/models`.
    pub fn info(&self) -> TextInfo {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let stats = &self.stats;
        TextInfo {
            config: self.config.clone(),
            active: stats.active.load(Ordering::Relaxed),
            queued: stats.queued.load(Ordering::Relaxed),
            started: load(&stats.started),
            rejected: load(&stats.rejected),
            cancelled: load(&stats.cancelled),
            prompt_tokens: load(&stats.prompt_tokens),
            completion_tokens: load(&stats.completion_tokens),
            steps: load(&stats.steps),
        }
    }

    /// The model's `[generation]` settings.
    pub fn config(&self) -> &GenerationConfig {
        &self.config
    }

    /// Bytes of weights (none of its own for an adapter: its base's).
    pub fn size_bytes(&self) -> u64 {
        if self.adapter.is_some() {
            return 0;
        }
        self.model.size()
    }

    /// Where it runs: `cpu` or `cuda:N`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Memory it holds where it runs: weights and the KV cache of every
    /// sequence slot.
    pub fn memory_bytes(&self) -> u64 {
        if self.adapter.is_some() {
            // Counted with its base, which loaded it.
            return 0;
        }
        self.model.size() + self.adapter_bytes + kv_bytes(&self.model, &self.config)
    }

    /// Renders `prompt` (the chat template for messages) and tokenises it.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<LlamaToken>, GenerateError> {
        let text = match prompt {
            Prompt::Text(text) => text.clone(),
            Prompt::Chat(messages) => {
                let template = self.template.as_ref().as_ref().map_err(|e| {
                    GenerateError::Invalid(format!("{e}; send a prompt instead of messages"))
                })?;
                let text = template.render(messages).map_err(|e| {
                    GenerateError::Invalid(format!("the model's chat template: {e}"))
                })?;
                let vocab = self.model.vocab();
                // Templates that write the BOS token themselves get no second one.
                let bos = vocab.should_add_bos() && !template.starts_with_bos(&text);
                return Ok(vocab.tokenize(text.as_bytes(), bos, true));
            }
        };
        let vocab = self.model.vocab();
        Ok(vocab.tokenize(text.as_bytes(), vocab.should_add_bos(), true))
    }

    /// A sampler that keeps the output within `constraint`.
    fn grammar(&self, constraint: &Constraint) -> Result<LlamaSampler, GenerateError> {
        let factory = self
            .grammars
            .get_or_init(|| {
                let vocabulary = LlamaSampler::llguidance_tok_env(&self.model);
                let mut factory =
                    ParserFactory::new_simple(&vocabulary).map_err(|e| e.to_string())?;
                factory.quiet();
                // A grammar is the caller's: bound what it may cost the
                // scheduler thread each step (every tenant's tokens wait
                // for it) and the memory its lexer may take.
                let limits = factory.limits_mut();
                limits.step_lexer_fuel = STEP_LEXER_FUEL;
                limits.max_lexer_states = MAX_LEXER_STATES;
                limits.verbose_errors = false;
                Ok(Arc::new(factory))
            })
            .as_ref()
            .map_err(|e| GenerateError::Stopped(format!("preparing constrained decoding: {e}")))?;
        let grammar = match constraint {
            Constraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(schema.clone()),
            Constraint::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
        };
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| GenerateError::Invalid(format!("the output constraint: {e}")))?;
        Ok(LlamaSampler::from(Matcher::new(Ok(parser))))
    }

    /// [`Self::generate`] off the async workers: rendering and tokenising
    /// a prompt is CPU work proportional to its length.
    pub async fn start(
        self: &Arc<Self>,
        tenant: Arc<str>,
        request: Request,
    ) -> Result<Generation, GenerateError> {
        let model = self.clone();
        // Under the request that asked for it, on the blocking thread
        // that tokenises and on the scheduler's.
        let span = tracing::debug_span!("generation", model = %self.name, tenant = %tenant);
        tokio::task::spawn_blocking(move || span.in_scope(|| model.generate(tenant, request)))
            .await
            .unwrap_or_else(|e| Err(GenerateError::Stopped(format!("tokenising failed: {e}"))))
    }

    /// Queues a generation for `tenant`; text arrives through the returned
    /// [`Generation`] as it is produced. Blocking (it tokenises the prompt).
    pub fn generate(
        &self,
        tenant: Arc<str>,
        request: Request,
    ) -> Result<Generation, GenerateError> {
        check(&request)?;
        let vocabulary = self.model.n_vocab();
        if let Some((token, _)) = request
            .logit_bias
            .iter()
            .find(|(token, _)| !(0..vocabulary).contains(token))
        {
            return Err(GenerateError::Invalid(format!(
                "logit_bias: token {} is not in the model's vocabulary (ids 0 to {})",
                token,
                vocabulary - 1
            )));
        }
        let grammar = request
            .constraint
            .as_ref()
            .map(|constraint| self.grammar(constraint))
            .transpose()?;
        let tokens = self.tokenize(&request.prompt)?;
        if tokens.is_empty() {
            return Err(GenerateError::Invalid("the prompt is empty".into()));
        }
        let mut request = request;
        if request.fit_context {
            let room = u64::from(self.config.context_tokens).saturating_sub(tokens.len() as u64);
            request.max_tokens = request.max_tokens.min(room.max(1) as u32);
        }
        let needed = tokens.len() as u64 + u64::from(request.max_tokens);
        if needed > u64::from(self.config.context_tokens) {
            return Err(GenerateError::TooLarge(format!(
                "the prompt ({} tokens) plus max_tokens ({}) exceed the model's context of {} tokens",
                tokens.len(),
                request.max_tokens,
                self.config.context_tokens
            )));
        }
        self.waiting.enter(&tenant).map_err(|why| {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            GenerateError::Busy(why)
        })?;
        let (events, receiver) = tokio_mpsc::unbounded_channel();
        let prompt_tokens = tokens.len() as u32;
        let job = scheduler::Job {
            tenant,
            tokens,
            request,
            grammar,
            events,
            adapter: self.adapter.as_ref().map(|(index, _)| *index),
            stats: self.stats.clone(),
            span: tracing::Span::current(),
            queued_at: std::time::Instant::now(),
        };
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(refused) = jobs.send(job) {
            self.waiting.leave(&refused.0.tenant);
            return Err(GenerateError::Stopped("its scheduler is gone".into()));
        }
        Ok(Generation {
            events: receiver,
            prompt_tokens,
        })
    }
}

/// Appends the text models' Prometheus series: per model, and per tenant
/// and model the tokens of generations that ended.
pub fn render_metrics(out: &mut String, models: &[(&str, &TextModel)]) {
    let infos: Vec<(&str, TextInfo)> = models.iter().map(|(n, m)| (*n, m.info())).collect();
    render_model_series(out, &infos);
    use crate::stats::{header, label};
    for (name, help, pick) in [
        (
            "gigafactory_text_tenant_prompt_tokens_total",
            "Prompt tokens of each tenant's ended generations.",
            (|(_, p, _)| *p) as fn(&(Arc<str>, u64, u64)) -> u64,
        ),
        (
            "gigafactory_text_tenant_generated_tokens_total",
            "Tokens generated for each tenant (ended generations).",
            |(_, _, g)| *g,
        ),
    ] {
        header(out, name, "counter", help);
        for (model, text) in models {
            for entry in text.stats().tenant_tokens() {
                out.push_str(&format!(
                    "{name}{{model=\"{}\",tenant=\"{}\"}} {}\n",
                    label(model),
                    label(&entry.0),
                    pick(&entry)
                ));
            }
        }
    }
}

fn render_model_series(out: &mut String, models: &[(&str, TextInfo)]) {
    use crate::stats::{header, label};
    /// Name, type, help, and the value of one model.
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&TextInfo) -> u64,
    );
    let series: [Series; 7] = [
        (
            "gigafactory_text_active_sequences",
            "gauge",
            "Generations decoding now.",
            |i| i.active as u64,
        ),
        (
            "gigafactory_text_queued",
            "gauge",
            "Generations waiting for a sequence slot.",
            |i| i.queued as u64,
        ),
        (
            "gigafactory_text_generations_total",
            "counter",
            "Generations started.",
            |i| i.started,
        ),
        (
            "gigafactory_text_rejections_total",
            "counter",
            "Generations refused because the queue was full.",
            |i| i.rejected,
        ),
        (
            "gigafactory_text_cancellations_total",
            "counter",
            "Generations their caller left before the end.",
            |i| i.cancelled,
        ),
        (
            "gigafactory_text_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            |i| i.prompt_tokens,
        ),
        (
            "gigafactory_text_completion_tokens_total",
            "counter",
            "Tokens generated.",
            |i| i.completion_tokens,
        ),
    ];
    for (name, kind, help, value) in series {
        header(out, name, kind, help);
        for (model, info) in models {
            out.push_str(&format!(
                "{name}{{model=\"{}\"}} {}\n",
                label(model),
                value(info)
            ));
        }
    }
}

/// The most recent tokens a repeat penalty may look at (llama.cpp keeps a
/// window of that many per sequence).
const MAX_REPEAT_WINDOW: u32 = 4096;

fn check(request: &Request) -> Result<(), GenerateError> {
    let invalid = |why: String| Err(GenerateError::Invalid(why));
    if request.max_tokens == 0 {
        return invalid("max_tokens must be at least 1".into());
    }
    if !(request.temperature.is_finite() && (0.0..=2.0).contains(&request.temperature)) {
        return invalid(format!(
            "temperature must be between 0 and 2, got {}",
            request.temperature
        ));
    }
    if !(request.top_p > 0.0 && request.top_p <= 1.0) {
        return invalid(format!("top_p must be in (0, 1], got {}", request.top_p));
    }
    if request.stop.len() > 16 || request.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return invalid("stop: at most 16 strings of 1 to 256 bytes".into());
    }
    if request.repeat_last_n > MAX_REPEAT_WINDOW {
        return invalid(format!(
            "repeat_last_n: at most {MAX_REPEAT_WINDOW} tokens, got {}",
            request.repeat_last_n
        ));
    }
    for (name, value) in [
        ("frequency_penalty", request.frequency_penalty),
        ("presence_penalty", request.presence_penalty),
    ] {
        if !(-2.0..=2.0).contains(&value) {
            return invalid(format!("{name} must be between -2 and 2, got {value}"));
        }
    }
    if request.logit_bias.len() > MAX_LOGIT_BIASES
        || request
            .logit_bias
            .iter()
            .any(|(_, bias)| !(-100.0..=100.0).contains(bias))
    {
        return invalid(format!(
            "logit_bias: at most {MAX_LOGIT_BIASES} tokens, each biased by -100 to 100"
        ));
    }
    if let Some(top) = request.logprobs
        && top > MAX_TOP_LOGPROBS
    {
        return invalid(format!(
            "top_logprobs: at most {MAX_TOP_LOGPROBS} alternatives, got {top}"
        ));
    }
    if !(request.repeat_penalty > 0.0 && request.repeat_penalty <= 2.0) {
        return invalid(format!(
            "repeat_penalty must be in (0, 2], got {}",
            request.repeat_penalty
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    /// The reference prompt of SmolLM2-135M-Instruct and its greedy answer.
    const PROMPT: &str =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    const ANSWER: &str = "The capital of France is Paris.";

    /// The model shared by the tests that only look at outputs.
    fn model() -> Option<Arc<TextModel>> {
        static MODEL: OnceLock<Option<Arc<TextModel>>> = OnceLock::new();
        MODEL.get_or_init(own_model).clone()
    }

    /// A model of its own, for tests that count its sequences.
    fn own_model() -> Option<Arc<TextModel>> {
        model_with(PromptCache::Tenant)
    }

    fn model_with(prompt_cache: PromptCache) -> Option<Arc<TextModel>> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/smollm2-135m-instruct/model.gguf");
        if !path.is_file() {
            eprintln!("skipping: {} is missing (run ./dev models)", path.display());
            return None;
        }
        let config = GenerationConfig {
            max_sequences: 8,
            context_tokens: 1024,
            prompt_cache,
            ..GenerationConfig::default()
        };
        Some(TextModel::load("smollm2", &path, config, "cpu", &[]).unwrap())
    }

    fn request(prompt: Prompt, max_tokens: u32) -> Request {
        Request {
            prompt,
            max_tokens,
            ..Request::default()
        }
    }

    async fn collect(generation: Generation) -> (String, Usage) {
        let answer = generation
            .collect()
            .await
            .unwrap_or_else(|why| panic!("generation failed: {why}"));
        (answer.text, answer.usage)
    }

    fn tenant(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn greedy_generation_answers_the_reference_prompt() {
        let Some(model) = model() else { return };
        let question = || {
            (
                "user".to_string(),
                "What is the capital of France?".to_string(),
            )
        };
        let system = "You are a helpful assistant.";
        let chat = Prompt::Chat(vec![("system".into(), system.into()), question()]);
        let rendered = format!("<|im_start|>system\n{system}<|im_end|>\n{PROMPT}");
        assert_eq!(
            model.tokenize(&chat).unwrap(),
            model.tokenize(&Prompt::Text(rendered)).unwrap(),
            "the chat template renders the reference prompt"
        );
        // Without a system message, the template's own default.
        let default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
        assert_eq!(
            model.tokenize(&Prompt::Chat(vec![question()])).unwrap(),
            model
                .tokenize(&Prompt::Text(format!("{default}{PROMPT}")))
                .unwrap(),
        );
        let generation = model.generate(tenant("a"), request(chat, 64)).unwrap();
        let (text, usage) = collect(generation).await;
        assert_eq!(text, ANSWER);
        assert_eq!(usage.finish_reason, FinishReason::Stop);
        assert_eq!(
            usage.completion_tokens, 7,
            "7 tokens of text, then end of turn (not counted)"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_prompt_that_starts_the_same_reuses_the_cached_prefix() {
        let Some(model) = own_model() else { return };
        let first = model
            .generate(tenant("a"), request(Prompt::Text(PROMPT.into()), 64))
            .unwrap();
        let (text, usage) = collect(first).await;
        assert_eq!((text.as_str(), usage.cached_tokens), (ANSWER, 0));
        // The same prompt again: all of it but its last token is reused,
        // and the answer is the same.
        let again = model
            .generate(tenant("a"), request(Prompt::Text(PROMPT.into()), 64))
            .unwrap();
        let (text, reused) = collect(again).await;
        assert_eq!(text, ANSWER);
        assert_eq!(reused.cached_tokens, usage.prompt_tokens - 1);
        // Never another tenant's: its first token would come sooner.
        let other = model
            .generate(tenant("b"), request(Prompt::Text(PROMPT.into()), 64))
            .unwrap();
        assert_eq!(collect(other).await.1.cached_tokens, 0);
        // A prompt that shares only its start reuses that start.
        let other = PROMPT.replace("France", "Italy");
        let shared = model.tokenize(&Prompt::Text(other.clone())).unwrap();
        let original = model.tokenize(&Prompt::Text(PROMPT.into())).unwrap();
        let common = shared
            .iter()
            .zip(&original)
            .take_while(|(a, b)| a == b)
            .count();
        // (b's answer took the slot, lowest first, and left its prompt there.)
        let italy = model
            .generate(tenant("b"), request(Prompt::Text(other), 64))
            .unwrap();
        let (text, usage) = collect(italy).await;
        assert_eq!(usage.cached_tokens as usize, common);
        assert!(text.contains("Rome"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_shared_prompt_cache_serves_every_tenant() {
        let Some(model) = model_with(PromptCache::Shared) else {
            return;
        };
        let ask = |who: &str| {
            model
                .generate(tenant(who), request(Prompt::Text(PROMPT.into()), 64))
                .unwrap()
        };
        let (_, first) = collect(ask("a")).await;
        assert_eq!(first.cached_tokens, 0);
        let (text, other) = collect(ask("b")).await;
        assert_eq!(text, ANSWER);
        assert_eq!(other.cached_tokens, first.prompt_tokens - 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_generations_equal_each_one_alone() {
        let Some(model) = own_model() else { return };
        let questions = [
            "What is the capital of France?",
            "Name three colours.",
            "What is 2 plus 2?",
            "Write a haiku about the sea.",
            "Who wrote Romeo and Juliet?",
            "What do bees make?",
            "Say hello in Spanish.",
            "What is the largest planet?",
        ];
        let prompt = |q: &str| Prompt::Chat(vec![("user".into(), q.into())]);
        let mut alone = Vec::new();
        for question in questions {
            let generation = model
                .generate(tenant("a"), request(prompt(question), 24))
                .unwrap();
            alone.push(collect(generation).await);
        }
        let together: Vec<_> = questions
            .iter()
            .enumerate()
            .map(|(i, question)| {
                model
                    .generate(tenant(["a", "b"][i % 2]), request(prompt(question), 24))
                    .unwrap()
            })
            .collect();
        let mut results = Vec::new();
        for generation in together {
            results.push(collect(generation).await);
        }
        for ((question, alone), together) in questions.iter().zip(&alone).zip(&results) {
            // Equal whether alone or batched, and whether the prompt's
            // start was computed now or found in the slot's cache.
            let (alone, together) = (
                (&alone.0, alone.1.completion_tokens, alone.1.finish_reason),
                (
                    &together.0,
                    together.1.completion_tokens,
                    together.1.finish_reason,
                ),
            );
            assert_eq!(alone, together, "{question}");
        }
        assert_eq!(model.stats().active.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn max_tokens_and_stop_strings_end_generation() {
        let Some(model) = model() else { return };
        let (text, usage) = collect(
            model
                .generate(tenant("a"), request(Prompt::Text(PROMPT.into()), 3))
                .unwrap(),
        )
        .await;
        assert_eq!(usage.finish_reason, FinishReason::Length);
        assert_eq!(usage.completion_tokens, 3);
        assert_eq!(text, "The capital of");
        let stopped = Request {
            stop: vec![" is".into()],
            ..request(Prompt::Text(PROMPT.into()), 64)
        };
        let (text, usage) = collect(model.generate(tenant("a"), stopped).unwrap()).await;
        assert_eq!(text, "The capital of France");
        assert_eq!(usage.finish_reason, FinishReason::Stop);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dropping_a_generation_frees_its_sequence() {
        let Some(model) = own_model() else { return };
        let long = Prompt::Chat(vec![(
            "user".into(),
            "Tell me a long story about a dragon.".into(),
        )]);
        let mut generation = model.generate(tenant("a"), request(long, 900)).unwrap();
        assert!(matches!(generation.next().await, Some(Event::Text(_))));
        assert_eq!(model.stats().active.load(Ordering::Relaxed), 1);
        drop(generation);
        for _ in 0..200 {
            if model.stats().active.load(Ordering::Relaxed) == 0 {
                assert_eq!(model.info().cancelled, 1);
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the dropped generation still holds its sequence");
    }

    #[test]
    fn memory_counts_the_kv_cache_of_every_slot() {
        let Some(model) = model() else { return };
        // SmolLM2-135M: 30 layers, 3 KV heads of 64 dimensions, f16 keys
        // and values: 22.5 KiB per token.
        let per_token = 2 * 30 * 3 * 64 * 2;
        let config = &model.config;
        let kv = per_token * u64::from(config.max_sequences) * u64::from(config.context_tokens);
        assert_eq!(model.memory_bytes(), model.size_bytes() + kv);
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/smollm2-135m-instruct/model.gguf");
        let estimate = estimate_memory(&path, config).unwrap();
        let file = std::fs::metadata(&path).unwrap().len();
        assert_eq!(estimate, file + kv);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_repeat_penalty_steers_away_from_the_prompt_repeatably() {
        let Some(model) = model() else { return };
        let penalised = || Request {
            repeat_penalty: 2.0,
            repeat_last_n: 64,
            ..request(Prompt::Text(PROMPT.into()), 7)
        };
        let (first, _) = collect(model.generate(tenant("a"), penalised()).unwrap()).await;
        let (again, _) = collect(model.generate(tenant("a"), penalised()).unwrap()).await;
        assert_eq!(first, again, "greedy with a penalty is still deterministic");
        // The answer repeats the prompt's "capital of France": penalised, it cannot.
        assert_ne!(first, ANSWER);
        assert!(!first.contains("capital of France"), "{first:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn bad_requests_are_refused_before_queueing() {
        let Some(model) = model() else { return };
        let refuse = |request: Request| model.generate(tenant("a"), request).err().unwrap();
        let base = || request(Prompt::Text(PROMPT.into()), 16);
        assert!(matches!(
            refuse(Request {
                max_tokens: 0,
                ..base()
            }),
            GenerateError::Invalid(_)
        ));
        assert!(matches!(
            refuse(Request {
                temperature: 3.0,
                ..base()
            }),
            GenerateError::Invalid(_)
        ));
        assert!(matches!(
            refuse(Request {
                top_p: 0.0,
                ..base()
            }),
            GenerateError::Invalid(_)
        ));
        assert!(matches!(
            refuse(Request {
                repeat_penalty: 0.0,
                ..base()
            }),
            GenerateError::Invalid(_)
        ));
        assert!(matches!(
            refuse(Request {
                repeat_penalty: 1.1,
                repeat_last_n: u32::MAX,
                ..base()
            }),
            GenerateError::Invalid(_)
        ));
        assert!(matches!(
            refuse(Request {
                max_tokens: 1024,
                ..base()
            }),
            GenerateError::TooLarge(_)
        ));
        assert!(matches!(
            refuse(request(Prompt::Text(String::new()), 4)),
            GenerateError::Invalid(_)
        ));
    }
}
