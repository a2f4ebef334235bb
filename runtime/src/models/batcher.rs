//! Dynamic batching: `compute` calls of any instance of any tenant queue
//! per model; a batch forms when `max_batch` rows wait or the oldest call
//! has waited `max_queue_delay`, runs as one backend call, and its outputs
//! are split back to each caller. Inputs named in `pad` are padded along
//! their axis so calls of different lengths batch together; outputs named
//! in `slice` are cut back to each caller's length. Calls whose shapes do
//! not match otherwise wait for a batch of their own. Batches are filled
//! round-robin across tenants, and the queue is bounded.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::error::{ErrorCode, NnError};
use super::graph::Graph;
use super::limits::ShapeCaps;
use super::stats::ModelStats;
use super::tensor::{ElementType, HostTensor};
use crate::queue::Waiting;

/// `[batching]` in `model.toml`. The batch axis is axis 0 of every input and output.
///
/// ```toml
/// [batching]
/// max_batch = 16
/// max_queue_delay_ms = 2
/// max_queue = 256
/// [batching.pad]
/// input_ids = { axis = 1, value = 0 }
/// [batching.slice]
/// last_hidden_state = { axis = 1, like = "input_ids" }
/// ```
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most rows (along axis 0) in one batch.
    pub max_batch: usize,
    /// How long the oldest call may wait for others, in milliseconds.
    #[serde(default = "default_delay")]
    pub max_queue_delay_ms: u64,
    /// Most calls waiting; past it `compute` fails at once.
    #[serde(default = "default_queue")]
    pub max_queue: usize,
    /// Most calls one tenant may have waiting (default: half of
    /// `max_queue`), so a tenant flooding the model leaves room for others.
    #[serde(default)]
    pub max_queue_per_tenant: Option<usize>,
    /// Inputs that may be padded: input name → axis and fill value.
    #[serde(default)]
    pub pad: BTreeMap<String, Pad>,
    /// Outputs cut back to each caller's length: output name → axis and the
    /// input whose length along that axis it follows.
    #[serde(default)]
    pub slice: BTreeMap<String, SliceBack>,
}

fn default_delay() -> u64 {
    2
}

fn default_queue() -> usize {
    256
}

/// How an input is padded.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pad {
    /// The padded axis (not 0).
    pub axis: usize,
    /// The fill value.
    #[serde(default)]
    pub value: f64,
}

/// How an output is cut back.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SliceBack {
    /// The output's axis to cut.
    pub axis: usize,
    /// The input whose length (along the same padded axis) it follows.
    pub like: String,
}

/// A caller's outputs and its share of the run time.
pub type Answer = (Vec<(String, HostTensor)>, Duration);

/// What a caller gets back: its outputs or error, and the run time to
/// charge it either way.
pub type Reply = super::Charged<Vec<(String, HostTensor)>>;

struct Call {
    tenant: Arc<str>,
    inputs: Vec<HostTensor>,
    arrived: Instant,
    reply: oneshot::Sender<Reply>,
    /// The call's span (under the request that made it).
    span: tracing::Span,
}

impl Call {
    fn rows(&self) -> usize {
        self.inputs
            .first()
            .map_or(1, |t| t.dims.first().copied().unwrap_or(1) as usize)
    }
}

/// One model's batching queue.
pub struct Batcher {
    calls: mpsc::UnboundedSender<Call>,
    waiting: Arc<Waiting>,
    stats: Arc<ModelStats>,
}

/// Everything a batch run needs, shared by the scheduler and its runs.
struct Plan {
    graph: Arc<dyn Graph>,
    config: BatchConfig,
    /// Per input (model order): the padded axis and its fill bytes.
    pads: Vec<Option<(usize, Vec<u8>)>>,
    workers: Arc<Semaphore>,
    stats: Arc<ModelStats>,
    /// The model's `[limits]`: a batch holds no more elements of an input
    /// than one call may.
    caps: Option<Arc<ShapeCaps>>,
}

impl Batcher {
    /// Checks `config` against the graph and starts the model's scheduler,
    /// which records what it does in `stats`.
    pub fn start(
        graph: Arc<dyn Graph>,
        config: BatchConfig,
        workers: Arc<Semaphore>,
        stats: Arc<ModelStats>,
        caps: Option<Arc<ShapeCaps>>,
    ) -> Result<Self, String> {
        if config.max_batch == 0 || config.max_queue == 0 {
            return Err("batching: max_batch and max_queue must be at least 1".into());
        }
        let mut pads = Vec::new();
        for spec in graph.inputs() {
            pads.push(match config.pad.get(&spec.name) {
                Some(pad) => Some((pad.axis, fill(spec.element_type(), pad.value)?)),
                None => None,
            });
        }
        for name in config.pad.keys() {
            if !graph.inputs().iter().any(|s| &s.name == name) {
                return Err(format!("batching.pad: the model has no input {name:?}"));
            }
        }
        for (name, slice) in &config.slice {
            if !graph.outputs().iter().any(|s| &s.name == name) {
                return Err(format!("batching.slice: the model has no output {name:?}"));
            }
            if !config.pad.contains_key(&slice.like) {
                return Err(format!(
                    "batching.slice: {name} follows {:?}, which is not padded",
                    slice.like
                ));
            }
        }
        let (calls, receiver) = mpsc::unbounded_channel();
        let waiting = Arc::new(Waiting::new(config.max_queue, config.max_queue_per_tenant));
        let plan = Arc::new(Plan {
            graph,
            config,
            pads,
            workers,
            stats: stats.clone(),
            caps,
        });
        tokio::spawn(schedule(plan, receiver, waiting.clone()));
        Ok(Self {
            calls,
            waiting,
            stats,
        })
    }

    /// Queues a call (inputs in model order, already checked) and waits for its outputs.
    pub async fn compute(&self, tenant: Arc<str>, inputs: Vec<HostTensor>) -> Reply {
        if let Err(why) = self.waiting.enter(&tenant) {
            self.stats.rejected();
            return (Err(NnError::busy(why)), Duration::ZERO);
        }
        let (reply, answer) = oneshot::channel();
        let call = Call {
            tenant,
            inputs,
            arrived: Instant::now(),
            reply,
            span: tracing::Span::current(),
        };
        if let Err(refused) = self.calls.send(call) {
            self.waiting.leave(&refused.0.tenant);
            let error = NnError::new(ErrorCode::RuntimeError, "the model's scheduler stopped");
            return (Err(error), Duration::ZERO);
        }
        answer.await.unwrap_or_else(|_| {
            let error = NnError::new(ErrorCode::RuntimeError, "the batch was dropped");
            (Err(error), Duration::ZERO)
        })
    }

    /// Calls waiting now.
    pub fn queued(&self) -> usize {
        self.waiting.total()
    }

    /// Batches run so far.
    pub fn batches(&self) -> u64 {
        self.stats.snapshot(0).batches
    }
}

/// Calls per tenant, served round-robin.
#[derive(Default)]
struct Queues {
    tenants: VecDeque<(Arc<str>, VecDeque<Call>)>,
    rows: usize,
}

impl Queues {
    fn push(&mut self, call: Call) {
        self.rows += call.rows();
        match self.tenants.iter_mut().find(|(t, _)| *t == call.tenant) {
            Some((_, calls)) => calls.push_back(call),
            None => self
                .tenants
                .push_back((call.tenant.clone(), VecDeque::from([call]))),
        }
    }

    /// Drops calls whose caller went away (its instance hit its deadline
    /// or ended) before they ran; returns their tenants.
    fn purge_abandoned(&mut self) -> Vec<Arc<str>> {
        let mut gone = Vec::new();
        for (tenant, calls) in &mut self.tenants {
            calls.retain(|call| {
                let abandoned = call.reply.is_closed();
                if abandoned {
                    gone.push(tenant.clone());
                    self.rows -= call.rows();
                }
                !abandoned
            });
        }
        self.tenants.retain(|(_, calls)| !calls.is_empty());
        gone
    }

    fn oldest(&self) -> Option<Instant> {
        self.tenants
            .iter()
            .filter_map(|(_, calls)| calls.front())
            .map(|c| c.arrived)
            .min()
    }

    /// Up to `max_rows` rows of mutually compatible calls, one per tenant
    /// per round; served tenants move to the back.
    fn take(&mut self, plan: &Plan) -> Vec<Call> {
        let mut batch: Vec<Call> = Vec::new();
        let mut rows = 0;
        loop {
            let mut added = false;
            for _ in 0..self.tenants.len() {
                let Some((tenant, mut calls)) = self.tenants.pop_front() else {
                    break;
                };
                // A call larger than max_batch still runs, alone.
                let fits = calls.front().is_some_and(|call| {
                    batch.is_empty()
                        || (rows + call.rows() <= plan.config.max_batch
                            && plan.compatible(&batch[0], call)
                            && plan.within_caps(&batch, call))
                });
                if fits {
                    let call = calls.pop_front().expect("checked");
                    rows += call.rows();
                    batch.push(call);
                    added = true;
                }
                if !calls.is_empty() {
                    self.tenants.push_back((tenant, calls));
                }
            }
            if !added || rows >= plan.config.max_batch {
                break;
            }
        }
        self.rows -= rows;
        batch
    }
}

impl Plan {
    /// Whether `batch` with `call` added stays within the model's element
    /// caps once padded (calls are compatible: only axis 0 and padded axes
    /// differ, and a padded axis takes the longest).
    fn within_caps(&self, batch: &[Call], call: &Call) -> bool {
        let Some(caps) = &self.caps else {
            return true;
        };
        let rows: u64 = batch.iter().chain([call]).map(|c| c.rows() as u64).sum();
        (0..call.inputs.len()).all(|input| {
            let Some(most) = caps.max_elements(input) else {
                return true;
            };
            let dims = &call.inputs[input].dims;
            let row: u64 = (1..dims.len())
                .map(|axis| {
                    let longest = batch
                        .iter()
                        .chain([call])
                        .map(|c| c.inputs[input].dims[axis])
                        .max()
                        .unwrap_or(0);
                    u64::from(longest)
                })
                .product();
            rows * row <= most
        })
    }

    /// Same element types and dimensions, except axis 0 and padded axes.
    fn compatible(&self, a: &Call, b: &Call) -> bool {
        a.inputs
            .iter()
            .zip(&b.inputs)
            .zip(&self.pads)
            .all(|((x, y), pad)| {
                x.ty == y.ty
                    && x.dims.len() == y.dims.len()
                    && x.dims
                        .iter()
                        .zip(&y.dims)
                        .enumerate()
                        .skip(1)
                        .all(|(axis, (m, n))| {
                            m == n || pad.as_ref().is_some_and(|(padded, _)| *padded == axis)
                        })
            })
    }
}

async fn schedule(
    plan: Arc<Plan>,
    mut receiver: mpsc::UnboundedReceiver<Call>,
    waiting: Arc<Waiting>,
) {
    let delay = Duration::from_millis(plan.config.max_queue_delay_ms);
    let mut queues = Queues::default();
    loop {
        if queues.rows == 0 {
            match receiver.recv().await {
                Some(call) => queues.push(call),
                None => return,
            }
        }
        let deadline = queues.oldest().expect("a call waits") + delay;
        while queues.rows < plan.config.max_batch {
            // Past the deadline (always, with no delay) nothing is waited
            // for: a timer would add up to a millisecond to a lone call.
            if Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                call = receiver.recv() => match call {
                    Some(call) => queues.push(call),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline.into()) => break,
            }
        }
        let Ok(permit) = plan.workers.clone().acquire_owned().await else {
            return;
        };
        while let Ok(call) = receiver.try_recv() {
            queues.push(call);
        }
        for tenant in queues.purge_abandoned() {
            waiting.leave(&tenant);
            plan.stats.abandoned();
        }
        if queues.rows == 0 {
            continue;
        }
        let batch = queues.take(&plan);
        for call in &batch {
            waiting.leave(&call.tenant);
        }
        let now = Instant::now();
        for call in &batch {
            plan.stats.waited(now - call.arrived);
        }
        tokio::spawn(run(plan.clone(), batch, permit));
    }
}

/// Runs one batch on a worker and answers every caller.
async fn run(plan: Arc<Plan>, batch: Vec<Call>, permit: OwnedSemaphorePermit) {
    let rows: usize = batch.iter().map(Call::rows).sum();
    let mut tenants = Vec::with_capacity(batch.len());
    let mut inputs = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    let mut traced = Vec::with_capacity(batch.len());
    let started = Instant::now();
    for call in batch {
        tenants.push(call.tenant);
        inputs.push(call.inputs);
        replies.push(call.reply);
        traced.push((call.span, started.saturating_duration_since(call.arrived)));
    }
    let calls = inputs.len();
    let worker_plan = plan.clone();
    let answers = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        worker_plan.execute_isolated(&inputs)
    })
    .await
    .unwrap_or_else(|e| {
        let error = NnError::new(
            ErrorCode::RuntimeError,
            format!("inference worker failed: {e}"),
        );
        vec![(Err(error), Duration::ZERO); calls]
    });
    let failed = answers.iter().filter(|(a, _)| a.is_err()).count();
    plan.stats.ran(rows, started.elapsed(), failed);
    for (((reply, answer), tenant), (span, queued)) in
        replies.into_iter().zip(answers).zip(&tenants).zip(traced)
    {
        plan.stats.charge(tenant, answer.1);
        // Entered, so that the log line lists the request's span above it.
        span.in_scope(|| {
            tracing::debug!(
                batch_calls = calls,
                batch_rows = rows,
                queued_ms = queued.as_secs_f64() * 1e3,
                compute_ms = answer.1.as_secs_f64() * 1e3,
                ok = answer.0.is_ok(),
                "model call answered"
            );
        });
        let _ = reply.send(answer);
    }
}

impl Plan {
    /// Runs a batch; if it fails, runs each call alone, so that only the
    /// calls that cause a failure get it (one tenant's bad input must not
    /// fail the others' calls batched with it). Blocking.
    fn execute_isolated(&self, calls: &[Vec<HostTensor>]) -> Vec<Reply> {
        let started = Instant::now();
        let error = match self.execute(calls) {
            Ok(answers) => {
                let reply = |(outputs, share)| (Ok(outputs), share);
                return answers.into_iter().map(reply).collect();
            }
            Err(error) if calls.len() == 1 => return vec![(Err(error), started.elapsed())],
            Err(error) => error,
        };
        tracing::debug!(
            "a batch of {} calls failed ({error}); running each alone",
            calls.len()
        );
        self.stats.retried_alone();
        // Each call pays for its own run; the failed batch is shared out.
        let failed_share = started.elapsed() / calls.len() as u32;
        calls
            .iter()
            .map(|call| {
                let alone = Instant::now();
                let result = self
                    .execute(std::slice::from_ref(call))
                    .map(|mut answers| answers.remove(0).0);
                (result, failed_share + alone.elapsed())
            })
            .collect()
    }

    /// Pads, stacks, runs and splits; blocking. A panic inside (tract
    /// panics on some inputs it does not check) is this batch's error.
    fn execute(&self, calls: &[Vec<HostTensor>]) -> Result<Vec<Answer>, NnError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.execute_unguarded(calls)
        }))
        .unwrap_or_else(|panic| {
            Err(NnError::new(
                ErrorCode::RuntimeError,
                format!(
                    "the model failed on this input: {}",
                    super::graph::panic_text(&panic)
                ),
            ))
        })
    }

    /// Runs the calls in groups of similar padded lengths (see
    /// [`padding_groups`]) and answers them in their order.
    fn execute_unguarded(&self, calls: &[Vec<HostTensor>]) -> Result<Vec<Answer>, NnError> {
        let sizes: Vec<(u64, u64)> = calls
            .iter()
            .map(|inputs| {
                let rows = u64::from(inputs[0].dims[0]);
                let padded = inputs
                    .iter()
                    .zip(&self.pads)
                    .filter_map(|(tensor, pad)| pad.as_ref().map(|(axis, _)| tensor.dims[*axis]))
                    .max()
                    .map_or(1, u64::from);
                (rows, padded)
            })
            .collect();
        let mut answers: Vec<Option<Answer>> = vec![None; calls.len()];
        for group in padding_groups(&sizes, RUN_OVERHEAD_ROWS) {
            let members: Vec<&Vec<HostTensor>> = group.iter().map(|&i| &calls[i]).collect();
            for (index, answer) in group.into_iter().zip(self.run_stacked(&members)?) {
                answers[index] = Some(answer);
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.expect("every call is in a group"))
            .collect())
    }

    /// Pads and stacks `calls` into one run, and splits its outputs.
    fn run_stacked(&self, calls: &[&Vec<HostTensor>]) -> Result<Vec<Answer>, NnError> {
        let started = Instant::now();
        let rows: Vec<usize> = calls
            .iter()
            .map(|inputs| inputs[0].dims[0] as usize)
            .collect();
        let total_rows: usize = rows.iter().sum();
        let lengths: Vec<Vec<u32>> = calls
            .iter()
            .map(|inputs| {
                inputs
                    .iter()
                    .zip(&self.pads)
                    .map(|(tensor, pad)| pad.as_ref().map_or(0, |(axis, _)| tensor.dims[*axis]))
                    .collect()
            })
            .collect();
        let merged: Vec<HostTensor> = (0..self.pads.len())
            .map(|input| {
                let parts: Vec<&HostTensor> = calls.iter().map(|inputs| &inputs[input]).collect();
                self.stack(input, &parts)
            })
            .collect();
        let outputs = self
            .graph
            .run(merged)
            .map_err(|e| NnError::new(ErrorCode::RuntimeError, format!("{e:#}")))?;
        let spent = started.elapsed();
        let mut start = 0;
        let mut answers = Vec::with_capacity(calls.len());
        for (call, &count) in rows.iter().enumerate() {
            let mine = outputs
                .iter()
                .map(|(name, tensor)| {
                    let mut part = tensor.rows(start, count);
                    if let Some(slice) = self.config.slice.get(name) {
                        let like = self
                            .graph
                            .inputs()
                            .iter()
                            .position(|s| s.name == slice.like)
                            .expect("checked at start");
                        part = part.resized(slice.axis, lengths[call][like] as usize, &[]);
                    }
                    (name.clone(), part)
                })
                .collect();
            let share = spent.mul_f64(count as f64 / total_rows.max(1) as f64);
            answers.push((mine, share));
            start += count;
        }
        Ok(answers)
    }

    fn stack(&self, input: usize, parts: &[&HostTensor]) -> HostTensor {
        let padded: Vec<HostTensor> = match &self.pads[input] {
            Some((axis, fill)) => {
                let len = parts.iter().map(|t| t.dims[*axis]).max().unwrap_or(0) as usize;
                parts.iter().map(|t| t.resized(*axis, len, fill)).collect()
            }
            None => parts.iter().map(|t| (*t).clone()).collect(),
        };
        if padded.len() == 1 {
            return padded.into_iter().next().expect("one part");
        }
        HostTensor::concat(&padded)
    }
}

/// What one more run of a batch costs, in padded rows of one element
/// along the padded axis (for a text model: tokens): splitting a batch
/// into runs of similar lengths must save more padding than this.
const RUN_OVERHEAD_ROWS: u64 = 48;

/// Splits calls of `(rows, padded length)` into runs: calls sorted by
/// length, cut where the padding saved outweighs `overhead` per extra run
/// (a run costs its rows times its longest length, plus `overhead`). Texts
/// of 8 to 30 tokens padded together waste up to three quarters of a
/// batch on padding; a run per band of lengths wastes little, and on CPUs
/// a run of a few hundred tokens is as efficient per token as a larger one.
fn padding_groups(sizes: &[(u64, u64)], overhead: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| sizes[i].1);
    // best[i]: the cheapest split of the first i calls (in `order`), and where its last run starts.
    let mut best: Vec<(u64, usize)> = vec![(0, 0); order.len() + 1];
    for end in 1..=order.len() {
        let longest = sizes[order[end - 1]].1;
        let mut rows = 0;
        best[end] = (u64::MAX, 0);
        for start in (0..end).rev() {
            rows += sizes[order[start]].0;
            let cost = best[start].0 + rows * longest + overhead;
            if cost < best[end].0 {
                best[end] = (cost, start);
            }
        }
    }
    let mut groups = Vec::new();
    let mut end = order.len();
    while end > 0 {
        let start = best[end].1;
        groups.push(order[start..end].to_vec());
        end = start;
    }
    groups.reverse();
    groups
}

/// One element of `value` in the input's type, little-endian.
fn fill(ty: Option<ElementType>, value: f64) -> Result<Vec<u8>, String> {
    Ok(match ty {
        Some(ElementType::Fp32) => (value as f32).to_le_bytes().to_vec(),
        Some(ElementType::Fp64) => value.to_le_bytes().to_vec(),
        Some(ElementType::I64) => (value as i64).to_le_bytes().to_vec(),
        Some(ElementType::I32) => (value as i32).to_le_bytes().to_vec(),
        Some(ElementType::U8) => vec![value as u8],
        Some(ElementType::Fp16 | ElementType::Bf16) if value == 0.0 => vec![0, 0],
        other => {
            return Err(format!(
                "batching.pad: cannot pad {other:?} inputs with {value}"
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn start(graph: Arc<dyn Graph>, config: BatchConfig, workers: usize) -> Arc<Batcher> {
        let stats = Arc::new(ModelStats::default());
        let workers = Arc::new(Semaphore::new(workers));
        Arc::new(Batcher::start(graph, config, workers, stats, None).unwrap())
    }

    fn minilm() -> Option<(Arc<dyn Graph>, BatchConfig)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-minilm-l6-v2");
        if !dir.join("model.onnx").is_file() {
            eprintln!(
                "skipping: {} has no model.onnx (run ./dev models)",
                dir.display()
            );
            return None;
        }
        let toml = std::fs::read_to_string(dir.join("model.toml")).unwrap();
        let config: super::super::ModelConfig = toml::from_str(&toml).unwrap();
        let graph =
            super::super::engines::tract::TractGraph::from_path(&dir.join("model.onnx")).unwrap();
        Some((graph, config.batching.expect("model.toml has [batching]")))
    }

    fn ids(tokens: &[i64]) -> Vec<HostTensor> {
        let tensor = |values: Vec<i64>| HostTensor {
            dims: vec![1, values.len() as u32],
            ty: ElementType::I64,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        vec![
            tensor(tokens.to_vec()),
            tensor(vec![1; tokens.len()]),
            tensor(vec![0; tokens.len()]),
        ]
    }

    fn floats(tensor: &HostTensor) -> Vec<f32> {
        tensor
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    fn alone(graph: &dyn Graph, inputs: Vec<HostTensor>) -> HostTensor {
        graph.run(inputs).unwrap().remove(0).1
    }

    #[test]
    fn padding_groups_split_only_where_padding_costs_more_than_a_run() {
        // Equal lengths: one run.
        assert_eq!(
            padding_groups(&[(1, 12), (1, 12), (1, 12)], 48),
            vec![vec![0, 1, 2]]
        );
        // Two bands of lengths: a run each, calls in each sorted by length.
        let sizes = [(8, 30), (8, 8), (8, 29), (8, 9)];
        assert_eq!(padding_groups(&sizes, 48), vec![vec![1, 3], vec![2, 0]]);
        // The same calls, when a run costs more than the padding it saves.
        assert_eq!(padding_groups(&sizes, 1000), vec![vec![1, 3, 2, 0]]);
        assert!(padding_groups(&[], 48).is_empty());
    }

    const SENTENCES: [&[i64]; 3] = [
        &[101, 1996, 4248, 102],
        &[
            101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102,
        ],
        &[101, 7592, 2088, 999, 102],
    ];

    async fn check_against_unbatched(graph: Arc<dyn Graph>, config: BatchConfig) -> u64 {
        let batcher = start(graph.clone(), config, 2);
        let calls: Vec<_> = SENTENCES
            .iter()
            .zip(["a", "b", "a"])
            .map(|(tokens, tenant)| {
                let (batcher, inputs) = (batcher.clone(), ids(tokens));
                tokio::spawn(async move { batcher.compute(Arc::from(tenant), inputs).await })
            })
            .collect();
        for (tokens, call) in SENTENCES.iter().zip(calls) {
            let outputs = call.await.unwrap().0.unwrap();
            let batched = &outputs[0].1;
            let expected = alone(&*graph, ids(tokens));
            assert_eq!(
                batched.dims, expected.dims,
                "cut back to the caller's length"
            );
            let worst = floats(batched)
                .iter()
                .zip(floats(&expected))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{} tokens: batched differs by {worst}",
                tokens.len()
            );
        }
        batcher.batches()
    }

    #[tokio::test]
    async fn padded_batches_equal_unbatched_results() {
        let Some((graph, mut config)) = minilm() else {
            return;
        };
        config.max_queue_delay_ms = 200;
        assert_eq!(
            check_against_unbatched(graph, config).await,
            1,
            "one batch for the three calls"
        );
    }

    #[tokio::test]
    async fn calls_that_cannot_merge_run_in_separate_batches() {
        let Some((graph, mut config)) = minilm() else {
            return;
        };
        config.max_queue_delay_ms = 200;
        config.pad.clear();
        config.slice.clear();
        assert_eq!(
            check_against_unbatched(graph, config).await,
            3,
            "three lengths, no padding: three batches"
        );
    }

    #[tokio::test]
    async fn a_flooding_tenant_does_not_starve_another() {
        let Some((graph, mut config)) = minilm() else {
            return;
        };
        config.max_batch = 2;
        config.max_queue_delay_ms = 200;
        let batcher = start(graph, config, 1);
        let finished = Arc::new(AtomicUsize::new(0));
        let call = |tenant: &'static str| {
            let (batcher, finished) = (batcher.clone(), finished.clone());
            tokio::spawn(async move {
                batcher
                    .compute(Arc::from(tenant), ids(SENTENCES[0]))
                    .await
                    .0
                    .unwrap();
                finished.fetch_add(1, Ordering::SeqCst)
            })
        };
        let flood: Vec<_> = (0..10).map(|_| call("flooder")).collect();
        let single = call("quiet");
        let rank = single.await.unwrap();
        for call in flood {
            call.await.unwrap();
        }
        assert!(
            rank < 2,
            "the quiet tenant finished {rank}th; it belongs in the first batch"
        );
    }

    #[tokio::test]
    async fn a_failing_call_fails_alone_in_a_shared_batch() {
        let Some((graph, mut config)) = minilm() else {
            return;
        };
        config.max_queue_delay_ms = 200;
        let batcher = start(graph.clone(), config, 1);
        let mut bad = ids(SENTENCES[1]);
        // Token types past the model's table: the model itself fails.
        bad[2] = ids(&[5; 12])[0].clone();
        let calls: Vec<_> = [ids(SENTENCES[0]), bad, ids(SENTENCES[2])]
            .into_iter()
            .zip(["victim", "attacker", "victim"])
            .map(|(inputs, tenant)| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.compute(Arc::from(tenant), inputs).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.unwrap());
        }
        assert!(outcomes[1].0.is_err(), "the bad call failed");
        assert!(outcomes[1].1 > Duration::ZERO, "and is charged its runs");
        for (outcome, tokens) in [(&outcomes[0], SENTENCES[0]), (&outcomes[2], SENTENCES[2])] {
            let outputs = outcome.0.as_ref().expect("the good calls succeeded");
            let expected = alone(&*graph, ids(tokens));
            assert_eq!(outputs[0].1.dims, expected.dims);
        }
        let stats = batcher.stats.snapshot(0);
        assert_eq!(stats.failed, 1, "{stats:?}");
        assert_eq!(stats.batches_retried_alone, 1, "{stats:?}");
    }

    #[test]
    fn inputs_that_disagree_on_a_shared_dimension_are_refused() {
        let Some((graph, _)) = minilm() else {
            return;
        };
        let named = |inputs: Vec<HostTensor>| {
            ["input_ids", "attention_mask", "token_type_ids"]
                .iter()
                .map(|n| n.to_string())
                .zip(inputs)
                .collect::<Vec<_>>()
        };
        let mut mismatched = ids(SENTENCES[1]);
        mismatched[1] = ids(&[1; 5])[1].clone();
        let error = super::super::graph::order(&*graph, named(mismatched)).unwrap_err();
        assert!(error.message.contains("must agree"), "{error}");
        let empty = vec![
            HostTensor {
                dims: vec![0, 0],
                ty: ElementType::I64,
                data: vec![],
            };
            3
        ];
        let error = super::super::graph::order(&*graph, named(empty)).unwrap_err();
        assert!(error.message.contains("empty"), "{error}");
        assert!(super::super::graph::order(&*graph, named(ids(SENTENCES[0]))).is_ok());
    }

    #[tokio::test]
    async fn batches_stay_within_the_models_element_caps() {
        let Some((graph, mut config)) = minilm() else {
            return;
        };
        config.max_queue_delay_ms = 200;
        let limits = super::super::InputLimits {
            max_elements: [("input_ids".to_string(), 16)].into(),
            ..Default::default()
        };
        let caps = Arc::new(ShapeCaps::new(&limits, graph.inputs()).unwrap());
        let workers = Arc::new(Semaphore::new(2));
        let stats = Arc::new(ModelStats::default());
        let batcher = Batcher::start(graph, config, workers, stats, Some(caps)).unwrap();
        let batcher = Arc::new(batcher);
        // 4 + 5 tokens fit in 16 once padded (2 × 5); 12 more do not.
        let calls: Vec<_> = [SENTENCES[0], SENTENCES[2], SENTENCES[1]]
            .into_iter()
            .zip(["a", "b", "c"])
            .map(|(tokens, tenant)| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.compute(Arc::from(tenant), ids(tokens)).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().0.unwrap();
        }
        let stats = batcher.stats.snapshot(0);
        assert_eq!(stats.batches, 2, "{stats:?}");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let Some((graph, mut config)) = minilm() else {
            return;
        };
        config.max_queue = 1;
        config.max_queue_delay_ms = 500;
        let batcher = start(graph, config, 1);
        let ((first, _), (second, _)) = tokio::join!(
            batcher.compute(Arc::from("a"), ids(SENTENCES[0])),
            batcher.compute(Arc::from("a"), ids(SENTENCES[1])),
        );
        let refused = [&first, &second].iter().filter(|r| r.is_err()).count();
        assert_eq!(refused, 1);
        let error = first.err().or(second.err()).unwrap();
        assert!(error.is_busy(), "{error}");
        assert!(error.message.contains("queue is full"), "{error}");
        let stats = batcher.stats.snapshot(batcher.queued());
        assert_eq!((stats.calls, stats.rejected, stats.batches), (1, 1, 1));
        assert_eq!(stats.queued, 0);
    }

    #[tokio::test]
    async fn one_tenant_cannot_take_the_whole_queue() {
        let Some((graph, mut config)) = minilm() else {
            return;
        };
        config.max_batch = 1;
        config.max_queue = 4;
        config.max_queue_delay_ms = 300;
        let batcher = start(graph, config, 1);
        let call = |tenant: &'static str| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.compute(Arc::from(tenant), ids(SENTENCES[0])).await })
        };
        let flood: Vec<_> = (0..8).map(|_| call("flooder")).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let quiet = call("quiet").await.unwrap().0;
        assert!(quiet.is_ok(), "the quiet tenant was refused: {quiet:?}");
        let mut refused = 0;
        for call in flood {
            if let Err(error) = call.await.unwrap().0 {
                assert!(error.is_busy(), "{error}");
                assert!(error.message.contains("its share"), "{error}");
                refused += 1;
            }
        }
        // Half of the queue (2) may wait, one more may be running: at least 5 of 8 refused.
        assert!(refused >= 5, "only {refused} of the flood refused");
    }
}
