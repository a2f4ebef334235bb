//! One thread per text model owns its llama.cpp context. Each step it
//! admits waiting generations into free sequence slots (round-robin across
//! tenants, within the KV budget), drops cancelled ones, puts one token of
//! every active sequence — or a chunk of a new one's prompt — into a
//! `llama_batch`, decodes, and samples each sequence's next token. The
//! model's LoRA adapters share it: sequences of one adapter (or of none)
//! decode together, one `llama_batch` per adapter in use each step, with
//! that adapter applied to the context. Each sequence has its own KV
//! stream of `context_tokens`, so its output is the same whether it runs
//! alone or with others. A slot keeps its last prompt's KV cells when its
//! sequence ends: a new generation of the same tenant (of any tenant, with
//! `prompt_cache = "shared"`) takes the free slot whose cached prompt
//! shares the longest prefix with its own (same adapter) and computes only
//! the rest (`cached_tokens` in its usage).

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::vocab::LlamaVocab;
use tokio::sync::mpsc as tokio_mpsc;

use super::text::{Step, TextStream};
use super::{Candidate, Event, FinishReason, PromptCache, Request, TextStats, TokenLogprob, Usage};
use crate::ComputeBudget;
use crate::queue::Waiting;

/// A queued generation.
pub struct Job {
    pub tenant: Arc<str>,
    pub tokens: Vec<LlamaToken>,
    pub request: Request,
    /// Keeps the output within the request's constraint.
    pub grammar: Option<LlamaSampler>,
    pub events: tokio_mpsc::UnboundedSender<Event>,
    /// The LoRA adapter it runs with (an index into [`Setup::adapters`]).
    pub adapter: Option<usize>,
    /// The counters of the model it was asked of (the base or an adapter).
    pub stats: Arc<TextStats>,
    /// The generation's span (under the request that asked for it).
    pub span: tracing::Span,
    /// When it was queued.
    pub queued_at: std::time::Instant,
}

/// What the scheduler thread is given.
pub struct Setup {
    pub model: Arc<LlamaModel>,
    /// KV cache per sequence, in tokens.
    pub context: NonZeroU32,
    pub batch_tokens: u32,
    pub max_sequences: u32,
    /// Slots one tenant may hold at once.
    pub sequences_per_tenant: u32,
    /// Whose cached prompts a generation may start from.
    pub prompt_cache: PromptCache,
    pub threads: i32,
    pub waiting: Arc<Waiting>,
    /// The base model's counters (decode steps; its generations' are in each job).
    pub stats: Arc<TextStats>,
    /// The LoRA adapters loaded with the model, and their scales.
    pub adapters: Vec<(LlamaLoraAdapter, f32)>,
}

/// Starts the scheduler thread; the returned channel says whether its
/// context could be created.
pub fn start(
    name: &str,
    setup: Setup,
    jobs: mpsc::Receiver<Job>,
) -> Result<mpsc::Receiver<Result<(), String>>, String> {
    let (ready, started) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("llm-{name}"))
        .spawn(move || run(setup, jobs, ready))
        .map_err(|e| format!("starting the scheduler thread: {e}"))?;
    Ok(started)
}

/// An active generation.
struct Sequence {
    id: i32,
    tenant: Arc<str>,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens already in the KV cache.
    fed: usize,
    /// The next position in the sequence.
    position: i32,
    /// Prompt tokens whose KV cells were found in the slot.
    reused: usize,
    /// The last sampled token, fed at the next step.
    last: Option<LlamaToken>,
    /// This step's logits row in the batch, when it asked for one.
    row: Option<i32>,
    sampler: LlamaSampler,
    text: TextStream,
    generated: u32,
    max_tokens: u32,
    /// Alternatives to report with each token's log-probability.
    logprobs: Option<u32>,
    budget: Option<Arc<dyn ComputeBudget>>,
    events: tokio_mpsc::UnboundedSender<Event>,
    adapter: Option<usize>,
    stats: Arc<TextStats>,
    span: tracing::Span,
    queued_at: std::time::Instant,
    /// When its first token was sampled.
    first_token: Option<std::time::Duration>,
}

fn run(mut setup: Setup, jobs: mpsc::Receiver<Job>, ready: mpsc::Sender<Result<(), String>>) {
    let backend = match super::backend() {
        Ok(backend) => backend,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(setup.context.get() * setup.max_sequences))
        .with_n_batch(setup.batch_tokens)
        .with_n_ubatch(setup.batch_tokens)
        .with_n_seq_max(setup.max_sequences)
        // One KV stream per sequence: a sequence's attention sees the same
        // cache layout as when it runs alone, so batching never changes
        // what a sequence generates.
        .with_kv_unified(false)
        .with_n_threads(setup.threads)
        .with_n_threads_batch(setup.threads);
    let mut context = match setup.model.new_context(backend, params) {
        Ok(context) => context,
        Err(e) => {
            let _ = ready.send(Err(format!("creating the llama.cpp context: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let adapters = std::mem::take(&mut setup.adapters);
    Scheduler {
        setup: &setup,
        adapters,
        applied: None,
        batch: LlamaBatch::new(setup.batch_tokens as usize, 1),
        queue: VecDeque::new(),
        active: Vec::new(),
        free: (0..setup.max_sequences as i32).rev().collect(),
        cached: vec![Cached::default(); setup.max_sequences as usize],
    }
    .serve(&mut context, &jobs);
}

struct Scheduler<'a> {
    setup: &'a Setup,
    adapters: Vec<(LlamaLoraAdapter, f32)>,
    /// The adapter the context applies now.
    applied: Option<usize>,
    batch: LlamaBatch<'static>,
    /// Waiting generations per tenant, served round-robin.
    queue: VecDeque<(Arc<str>, VecDeque<Job>)>,
    active: Vec<Sequence>,
    free: Vec<i32>,
    /// Per slot: the prompt its KV stream still holds.
    cached: Vec<Cached>,
}

/// The prompt tokens a free slot's KV stream still holds (from position
/// 0), the adapter they were computed with, and the tenant whose they
/// were: only that tenant reuses them, as a faster first token would tell
/// another what someone else asked.
#[derive(Clone, Default)]
struct Cached {
    tokens: Vec<LlamaToken>,
    adapter: Option<usize>,
    tenant: Option<Arc<str>>,
}

impl Scheduler<'_> {
    fn serve(&mut self, context: &mut LlamaContext<'_>, jobs: &mpsc::Receiver<Job>) {
        loop {
            if self.active.is_empty() && self.queue.is_empty() {
                match jobs.recv() {
                    Ok(job) => self.push(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                self.push(job);
            }
            self.drop_cancelled(context);
            self.admit(context);
            if self.active.is_empty() {
                continue;
            }
            self.step(context);
        }
    }

    fn push(&mut self, job: Job) {
        job.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.queue.iter_mut().find(|(t, _)| *t == job.tenant) {
            Some((_, jobs)) => jobs.push_back(job),
            None => self
                .queue
                .push_back((job.tenant.clone(), VecDeque::from([job]))),
        }
    }

    /// Callers that went away: queued ones are forgotten, active ones
    /// leave the batch and their KV cells are freed now.
    fn drop_cancelled(&mut self, context: &mut LlamaContext<'_>) {
        for (tenant, jobs) in &mut self.queue {
            jobs.retain(|job| {
                let gone = job.events.is_closed();
                if gone {
                    self.setup.waiting.leave(tenant);
                    job.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    job.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                !gone
            });
        }
        self.queue.retain(|(_, jobs)| !jobs.is_empty());
        let mut index = 0;
        while index < self.active.len() {
            if self.active[index].events.is_closed() {
                let sequence = self.active.swap_remove(index);
                sequence.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                self.release(context, sequence);
            } else {
                index += 1;
            }
        }
    }

    /// Fills free slots from the queue, one tenant at a time, skipping
    /// tenants that hold their share of the slots. Every request fits a
    /// slot's KV stream (`generate` checked it).
    fn admit(&mut self, context: &mut LlamaContext<'_>) {
        let mut skipped = 0;
        while !self.free.is_empty() && skipped < self.queue.len() {
            let Some((tenant, mut jobs)) = self.queue.pop_front() else {
                break;
            };
            let holds = self.active.iter().filter(|s| s.tenant == tenant).count();
            if holds >= self.setup.sequences_per_tenant as usize {
                self.queue.push_back((tenant, jobs));
                skipped += 1;
                continue;
            }
            skipped = 0;
            let job = jobs.pop_front().expect("queues are never empty");
            if !jobs.is_empty() {
                self.queue.push_back((tenant.clone(), jobs));
            }
            self.setup.waiting.leave(&tenant);
            let stats = &job.stats;
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            stats.active.fetch_add(1, Ordering::Relaxed);
            stats.started.fetch_add(1, Ordering::Relaxed);
            let (id, reused) = self.take_slot(context, &tenant, &job.tokens, job.adapter);
            self.active.push(Sequence {
                id,
                tenant,
                sampler: sampler(&job.request, &self.setup.model, &job.tokens, job.grammar),
                text: TextStream::new(job.request.stop.clone()),
                prompt: job.tokens,
                fed: reused,
                position: reused as i32,
                reused,
                last: None,
                row: None,
                generated: 0,
                max_tokens: job.request.max_tokens,
                logprobs: job.request.logprobs,
                budget: job.request.budget.clone(),
                events: job.events,
                adapter: job.adapter,
                stats: job.stats,
                span: job.span,
                queued_at: job.queued_at,
                first_token: None,
            });
        }
    }

    /// One decode per adapter in use (the base alone first).
    fn step(&mut self, context: &mut LlamaContext<'_>) {
        let mut groups: Vec<Option<usize>> = Vec::new();
        for sequence in &self.active {
            if !groups.contains(&sequence.adapter) {
                groups.push(sequence.adapter);
            }
        }
        groups.sort();
        for group in groups {
            match self.apply(context, group) {
                Ok(()) => self.step_group(context, group),
                Err(why) => self.fail(context, group, &why),
            }
        }
    }

    /// Applies `adapter` (or none) to the context, if it is not applied.
    fn apply(
        &mut self,
        context: &mut LlamaContext<'_>,
        adapter: Option<usize>,
    ) -> Result<(), String> {
        if self.applied == adapter {
            return Ok(());
        }
        let outcome = match adapter {
            Some(index) => {
                let (lora, scale) = &mut self.adapters[index];
                context
                    .lora_adapter_set(lora, *scale)
                    .map_err(|e| e.to_string())
            }
            None => match self.adapters.first_mut() {
                Some((lora, _)) => context.lora_adapter_remove(lora).map_err(|e| e.to_string()),
                None => Ok(()),
            },
        };
        outcome.map_err(|e| format!("applying the LoRA adapter: {e}"))?;
        self.applied = adapter;
        Ok(())
    }

    /// Ends the sequences of `group` with `why`.
    fn fail(&mut self, context: &mut LlamaContext<'_>, group: Option<usize>, why: &str) {
        tracing::error!("{why}");
        let (failed, kept) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|s| s.adapter == group);
        self.active = kept;
        for sequence in failed {
            let _ = sequence.events.send(Event::Failed(why.to_string()));
            self.release(context, sequence);
        }
    }

    /// One decode of the sequences of one adapter: a token of every
    /// generating sequence, and prompt chunks in the room the batch has
    /// left. The batch lists sequences by id: llama.cpp splits a batch
    /// over per-sequence KV streams into micro-batches of sequences with
    /// consecutive ids, so ids in order (and slots taken lowest first)
    /// keep one step one computation.
    fn step_group(&mut self, context: &mut LlamaContext<'_>, group: Option<usize>) {
        self.batch.clear();
        self.active.sort_unstable_by_key(|sequence| sequence.id);
        let decoding = self
            .active
            .iter()
            .filter(|s| s.adapter == group && s.last.is_some())
            .count();
        let mut room = (self.setup.batch_tokens as usize).saturating_sub(decoding);
        for sequence in &mut self.active {
            sequence.row = None;
            if sequence.adapter != group {
                continue;
            }
            if let Some(token) = sequence.last {
                let row = self.batch.n_tokens();
                if self
                    .batch
                    .add(token, sequence.position, &[sequence.id], true)
                    .is_ok()
                {
                    sequence.row = Some(row);
                    sequence.position += 1;
                }
                continue;
            }
            if room == 0 {
                continue;
            }
            let end = (sequence.fed + room).min(sequence.prompt.len());
            for index in sequence.fed..end {
                let last = index + 1 == sequence.prompt.len();
                let row = self.batch.n_tokens();
                if self
                    .batch
                    .add(sequence.prompt[index], index as i32, &[sequence.id], last)
                    .is_err()
                {
                    break;
                }
                if last {
                    sequence.row = Some(row);
                }
                sequence.fed = index + 1;
                sequence.position = index as i32 + 1;
                room -= 1;
            }
        }
        if self.batch.n_tokens() == 0 {
            return;
        }
        if let Err(e) = context.decode(&mut self.batch) {
            self.fail(context, group, &format!("decoding failed: {e}"));
            return;
        }
        self.setup.stats.steps.fetch_add(1, Ordering::Relaxed);
        let vocab = self.setup.model.vocab();
        let mut finished = Vec::new();
        for (index, sequence) in self.active.iter_mut().enumerate() {
            let Some(row) = sequence.row else {
                continue;
            };
            let stats = &sequence.stats;
            if sequence.last.is_none() {
                stats
                    .prompt_tokens
                    .fetch_add(sequence.prompt.len() as u64, Ordering::Relaxed);
                if let Some(budget) = &sequence.budget {
                    budget.charge_prompt_tokens(sequence.prompt.len() as u64);
                }
            }
            let token = sequence.sampler.sample(context, row);
            if vocab.is_eog(token) {
                finished.push((index, FinishReason::Stop));
                continue;
            }
            if let Some(top) = sequence.logprobs {
                let logits = context.get_logits_ith(row);
                let _ = sequence
                    .events
                    .send(Event::Token(logprobs(&vocab, logits, token, top)));
            }
            sequence.generated += 1;
            if sequence.first_token.is_none() {
                sequence.first_token = Some(sequence.queued_at.elapsed());
            }
            stats.completion_tokens.fetch_add(1, Ordering::Relaxed);
            if let Some(budget) = &sequence.budget {
                budget.charge_tokens(1);
            }
            sequence.last = Some(token);
            let piece = vocab.token_to_piece(token, false, None);
            match sequence.text.push(&piece) {
                Step::Text(text) => {
                    if !text.is_empty() {
                        let _ = sequence.events.send(Event::Text(text));
                    }
                    if sequence.generated >= sequence.max_tokens {
                        finished.push((index, FinishReason::Length));
                    }
                }
                Step::Stopped(text) => {
                    if !text.is_empty() {
                        let _ = sequence.events.send(Event::Text(text));
                    }
                    finished.push((index, FinishReason::Stop));
                }
            }
        }
        for (index, reason) in finished.into_iter().rev() {
            let mut sequence = self.active.swap_remove(index);
            let rest = if reason == FinishReason::Length {
                sequence.text.finish()
            } else {
                String::new()
            };
            let usage = Usage {
                prompt_tokens: sequence.prompt.len() as u32,
                cached_tokens: sequence.reused as u32,
                completion_tokens: sequence.generated,
                finish_reason: reason,
            };
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            // Entered, so that the log line lists the request's span above it.
            sequence.span.in_scope(|| {
                tracing::debug!(
                prompt_tokens = usage.prompt_tokens,
                cached_tokens = usage.cached_tokens,
                completion_tokens = usage.completion_tokens,
                finish_reason = ?usage.finish_reason,
                first_token_ms = sequence.first_token.map(ms),
                total_ms = ms(sequence.queued_at.elapsed()),
                "generation finished"
                );
            });
            let events = sequence.events.clone();
            // Freed before the caller hears of the end.
            self.release(context, sequence);
            if !rest.is_empty() {
                let _ = events.send(Event::Text(rest));
            }
            let _ = events.send(Event::Done(usage));
        }
    }

    /// The free slot for a generation of `prompt` with `adapter`: the
    /// one whose cached prompt shares the longest prefix with it (the
    /// lowest id among equals), its other cells freed; and how many
    /// prompt tokens it already holds (never the last one, whose logits
    /// are needed).
    fn take_slot(
        &mut self,
        context: &mut LlamaContext<'_>,
        tenant: &Arc<str>,
        prompt: &[LlamaToken],
        adapter: Option<usize>,
    ) -> (i32, usize) {
        let shared = |id: i32| {
            let cached = &self.cached[id as usize];
            let theirs = cached.tenant.as_ref() != Some(tenant)
                && self.setup.prompt_cache == PromptCache::Tenant;
            if cached.adapter != adapter || theirs {
                return 0;
            }
            let common = cached
                .tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count();
            common.min(prompt.len().saturating_sub(1))
        };
        let (at, reused) = self
            .free
            .iter()
            .enumerate()
            .map(|(at, &id)| (at, shared(id)))
            // `free` is highest id first: the last of the longest wins.
            .max_by_key(|&(at, reused)| (reused, at))
            .expect("a free slot");
        let id = self.free.remove(at);
        self.cached[id as usize] = Cached::default();
        let from = u32::try_from(reused).unwrap_or(u32::MAX);
        match context.clear_kv_cache_seq(Some(id as u32), Some(from), None) {
            Ok(true) => (id, reused),
            // Cells this model cannot free in part: computed again.
            outcome => {
                if let Err(e) = outcome {
                    tracing::error!("freeing a slot's KV cache: {e}");
                }
                let _ = context.clear_kv_cache_seq(Some(id as u32), None, None);
                (id, 0)
            }
        }
    }

    /// Frees a sequence's slot and the KV cells past its prompt, which
    /// stay for the next generation that starts the same way.
    fn release(&mut self, context: &mut LlamaContext<'_>, sequence: Sequence) {
        sequence.stats.charge_tenant(
            &sequence.tenant,
            sequence.fed as u64,
            u64::from(sequence.generated),
        );
        let kept = u32::try_from(sequence.fed).unwrap_or(u32::MAX);
        let slot = &mut self.cached[sequence.id as usize];
        match context.clear_kv_cache_seq(Some(sequence.id as u32), Some(kept), None) {
            Ok(true) => {
                *slot = Cached {
                    tokens: sequence.prompt[..sequence.fed].to_vec(),
                    adapter: sequence.adapter,
                    tenant: Some(sequence.tenant.clone()),
                };
            }
            outcome => {
                if let Err(e) = outcome {
                    tracing::error!(tenant = %sequence.tenant, "freeing a sequence's KV cache: {e}");
                }
                let _ = context.clear_kv_cache_seq(Some(sequence.id as u32), None, None);
                *slot = Cached::default();
            }
        }
        self.free.push(sequence.id);
        // Lowest first (popped from the end), so the ids in use stay consecutive.
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        sequence.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The request's sampler chain: penalties (having seen the `prompt`),
/// logit biases, the output constraint, then greedy at temperature 0 or top-k, top-p,
/// temperature and a seeded draw.
fn sampler(
    request: &Request,
    model: &LlamaModel,
    prompt: &[LlamaToken],
    grammar: Option<LlamaSampler>,
) -> LlamaSampler {
    let mut chain = Vec::new();
    let penalised = request.repeat_last_n > 0
        && (request.repeat_penalty != 1.0
            || request.frequency_penalty != 0.0
            || request.presence_penalty != 0.0);
    if penalised {
        let penalties = LlamaSampler::penalties(
            model.n_vocab(),
            i32::try_from(request.repeat_last_n).unwrap_or(i32::MAX),
            request.repeat_penalty,
            request.frequency_penalty,
            request.presence_penalty,
        );
        chain.push(penalties.with_tokens(prompt));
    }
    if !request.logit_bias.is_empty() {
        let biases: Vec<LlamaLogitBias> = request
            .logit_bias
            .iter()
            .map(|&(token, bias)| LlamaLogitBias::new(LlamaToken(token), bias))
            .collect();
        chain.push(LlamaSampler::logit_bias(model.n_vocab(), &biases));
    }
    chain.extend(grammar);
    if request.temperature <= 0.0 {
        if chain.is_empty() {
            return LlamaSampler::greedy();
        }
        chain.push(LlamaSampler::greedy());
        return LlamaSampler::chain_simple(chain);
    }
    if request.top_k > 0 {
        chain.push(LlamaSampler::top_k(request.top_k as i32));
    }
    if request.top_p < 1.0 {
        chain.push(LlamaSampler::top_p(request.top_p, 1));
    }
    chain.push(LlamaSampler::temp(request.temperature));
    chain.push(LlamaSampler::dist(request.seed));
    LlamaSampler::chain_simple(chain)
}

/// The log-probability of `chosen` under `logits` and the `top` most
/// likely tokens: a log-softmax over the whole vocabulary.
fn logprobs(vocab: &LlamaVocab<'_>, logits: &[f32], chosen: LlamaToken, top: u32) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let normaliser = max + sum.ln();
    let candidate = |token: LlamaToken| {
        let bytes = vocab.token_to_piece(token, false, None);
        Candidate {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob: logits
                .get(token.0 as usize)
                .map_or(f32::NEG_INFINITY, |l| l - normaliser),
        }
    };
    let mut best: Vec<usize> = (0..logits.len()).collect();
    let top = (top as usize).min(best.len());
    if top > 0 {
        best.select_nth_unstable_by(top - 1, |a, b| logits[*b].total_cmp(&logits[*a]));
        best.truncate(top);
        best.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    } else {
        best.clear();
    }
    TokenLogprob {
        chosen: candidate(chosen),
        top: best
            .into_iter()
            .map(|t| candidate(LlamaToken(t as i32)))
            .collect(),
    }
}
