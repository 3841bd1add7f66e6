//! The engine: one dedicated OS thread owns the model and every KV cache; callers talk to it through an
//! [`EngineHandle`] (a bounded command channel, per-request bounded reply channels, and atomics for the load).
//!
//! ## Scheduler policy
//! * **KV memory is blocks.** The engine owns one paged KV cache (`kosmos_model::PagedKvCache`): per decoder layer
//!   a preallocated pool of `kv_token_budget / kv_block_size` blocks. A request takes blocks as its sequence grows and
//!   gives them back when it ends; `Info` and `/metrics` report blocks total / used / cached. Blocks store the
//!   weights' dtype, or `kv_cache_dtype` when set (f16 or bf16 for f32 weights: half the bytes per token, on the
//!   CPU only; `Info` names it).
//! * **Admission** is first-come first-served between steps, and stops at the first request that does not fit (no
//!   overtaking, so a long prompt is never starved by short ones). Preempted requests come first, in admission
//!   order, then the queue. A request fits when the batch has fewer than `max_running_sequences` requests, the
//!   blocks of its prompt plus one token fit beside what the running batch takes in its next step, and the prompt
//!   tokens admitted into this step stay within `max_prefill_tokens_per_step` (the first prefill of a step always
//!   fits).
//! * **Prefix cache** (`prefix_caching`): a full block is registered under a hash chain of the token ids before and
//!   in it, with the content of image rows at image positions and the model fingerprint in the chain, rooted in the
//!   request's tenant (the gateway's API key id), so one tenant's blocks never serve another's prompt. An admitted
//!   request attaches the cached blocks of its longest matching prefix and prefills only the rest; blocks no one
//!   references stay cached and are evicted least recently used first. A scoring's candidates run on forks of the
//!   context's table (shared blocks; the partial last block is copied on first write).
//! * **Preemption**: before each step every runnable request gets the blocks of its chunk, oldest first. When the
//!   pool runs out, the youngest request of the batch (paused ones included) is preempted: its blocks are freed, its
//!   prompt, generated tokens, sampler position and stream are kept, and it is resumed later by recomputing prompt +
//!   generated ids in one prefill (through the prefix cache when its blocks are still there). Its output is the one
//!   an uninterrupted run gives: attention computes every row the same way in a prefill or a decode step.
//! * **A step** packs the prefill chunks of newly admitted sequences with the one-token decode chunks of running
//!   ones (and the context or candidate chunks of scorings) into one `TextModel::forward`: every weight product
//!   runs once per step for the whole batch, and so does attention (one paged-attention op per layer). The forward
//!   runs on a worker of the model's thread pool (this thread waits), so its kernels of one task run inline. Then
//!   every sequence with a logits row draws its token from its own sampler, the sequences of the step in parallel on
//!   the model's thread pool (a draw reads only its own row, history and random stream), and the tokens are appended
//!   in batch order.
//! * **Backpressure**: each stream has `stream_buffer_messages` slots; a sequence whose client stops reading keeps
//!   its unsent tokens (coalesced into one message) and sits out the steps until the client reads again (it keeps
//!   its blocks, but is the first to be preempted when it is the youngest). Nothing buffers without bound.
//! * **Removal**: before each step, requests whose client went away (dropped stream or reply) or whose deadline
//!   passed leave the queue or the batch and free their blocks.
//! * **Failures**: an error or a panic inside a step fails only the requests in that step (their blocks are freed);
//!   after a panic the cache is replaced by a fresh one and the requests not in the step are recomputed. The loop
//!   goes on.
//! * **Idle**: with nothing to do the thread blocks on the command channel; when every running sequence waits for
//!   its client it sleeps `stalled_poll` between looks.

mod delivery;
mod scheduler;
mod score;
mod sequence;
mod step;
mod types;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use kosmos_model::TextHalf;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{RequestError, StartError};
use crate::metrics::{DecoderMetrics, Load};

pub use types::{
    CandidateScore, EngineSettings, EngineSnapshot, Finish, FinishReason, GenerateEvent,
    GenerateJob, GenerateUpdate, ModelInfo, Prompt, Resume, ScoreJob, ScoreOutput, StoppingRule,
    Timings, Usage,
};

/// A request for the engine thread.
#[derive(Debug)]
enum Command {
    Generate(Box<GenerateCommand>),
    Score(Box<ScoreCommand>),
}

#[derive(Debug)]
struct GenerateCommand {
    job: GenerateJob,
    events: mpsc::Sender<GenerateEvent>,
    /// The caller's span: the parent of the request's engine spans, linked from the step spans.
    span: tracing::Span,
    /// `decoder.queue`, from submission to admission (closed when dropped).
    queue_span: tracing::Span,
    submitted: Instant,
}

#[derive(Debug)]
struct ScoreCommand {
    job: ScoreJob,
    reply: oneshot::Sender<Result<ScoreOutput, RequestError>>,
    span: tracing::Span,
    queue_span: tracing::Span,
    submitted: Instant,
}

/// The `decoder.queue` span of a request being submitted, a child of the caller's span.
fn queue_span(prompt_tokens: usize) -> tracing::Span {
    tracing::info_span!("decoder.queue", prompt_tokens)
}

/// Where the engine thread is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineState {
    /// The thread is starting.
    Starting,
    /// The loop runs and takes requests.
    Running,
    /// The thread has ended (every handle dropped, or it died).
    Stopped,
}

/// Load counters the engine publishes after every step and the handles update on submission.
#[derive(Debug, Default)]
struct EngineStats {
    running: AtomicUsize,
    /// Submitted and not yet admitted or removed; incremented by handles, decremented by the engine.
    waiting: AtomicUsize,
    /// Preempted requests waiting to be recomputed.
    preempted: AtomicUsize,
    kv_blocks_total: AtomicUsize,
    kv_blocks_used: AtomicUsize,
    kv_blocks_cached: AtomicUsize,
    kv_tokens_cached: AtomicUsize,
    preemptions_total: AtomicU64,
    prefix_queried_blocks: AtomicU64,
    prefix_hit_blocks: AtomicU64,
    cancelled_total: AtomicU64,
    steps_total: AtomicU64,
    generated_tokens_total: AtomicU64,
}

/// The caller's side of the engine: cheap to clone; the engine thread ends when the last handle is dropped and its
/// work is done.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    stats: Arc<EngineStats>,
    info: Arc<ModelInfo>,
    settings: Arc<EngineSettings>,
    state: watch::Receiver<EngineState>,
}

impl EngineStats {
    /// The load `/metrics` reads at each scrape.
    fn load(&self) -> Load {
        let total = self.kv_blocks_total.load(Ordering::Relaxed);
        let used = self.kv_blocks_used.load(Ordering::Relaxed);
        Load {
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed) + self.preempted.load(Ordering::Relaxed),
            kv_usage: if total == 0 {
                0.0
            } else {
                used as f64 / total as f64
            },
            kv_blocks_total: total,
            kv_blocks_used: used,
            kv_blocks_cached: self.kv_blocks_cached.load(Ordering::Relaxed),
            preemptions_total: self.preemptions_total.load(Ordering::Relaxed),
            prefix_queried_blocks: self.prefix_queried_blocks.load(Ordering::Relaxed),
            prefix_hit_blocks: self.prefix_hit_blocks.load(Ordering::Relaxed),
        }
    }
}

/// Watches the engine's state without keeping it alive.
#[derive(Debug, Clone)]
pub struct EngineMonitor {
    state: watch::Receiver<EngineState>,
}

impl EngineMonitor {
    /// The current state.
    pub fn state(&self) -> EngineState {
        *self.state.borrow()
    }

    /// Resolves once the loop runs (true) or the thread ended before (false).
    pub async fn running(&mut self) -> bool {
        match self
            .state
            .wait_for(|state| *state != EngineState::Starting)
            .await
        {
            Ok(state) => *state == EngineState::Running,
            Err(_) => false,
        }
    }

    /// Resolves once the thread has ended.
    pub async fn stopped(&mut self) {
        // The sender lives in the thread's guard: an error means it was dropped, i.e. the thread ended.
        let _ = self
            .state
            .wait_for(|state| *state == EngineState::Stopped)
            .await;
    }
}

/// Sets the state to `Stopped` when the engine thread ends, whether it returns or unwinds.
struct StoppedGuard(watch::Sender<EngineState>);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        self.0.send_replace(EngineState::Stopped);
    }
}

impl EngineHandle {
    /// Starts the engine thread with `model`. The returned handle accepts requests at once; they run once the
    /// loop is up (see [`EngineMonitor::running`]).
    pub fn start(
        model: TextHalf,
        info: ModelInfo,
        settings: EngineSettings,
    ) -> Result<Self, StartError> {
        Self::start_with_metrics(model, info, settings, None)
    }

    /// [`EngineHandle::start`], recording the engine's metrics in `metrics` and publishing its load there.
    pub fn start_with_metrics(
        model: TextHalf,
        info: ModelInfo,
        settings: EngineSettings,
        metrics: Option<Arc<DecoderMetrics>>,
    ) -> Result<Self, StartError> {
        let capacity = settings.max_waiting_requests.get();
        // The waiting counter admits at most `capacity` commands, so a send with a counted slot never finds the
        // channel full.
        let (commands, receiver) = mpsc::channel(capacity);
        let stats = Arc::new(EngineStats::default());
        if let Some(metrics) = &metrics {
            // The gauges hold the counters only, never a handle: the engine must be free to stop.
            let stats = Arc::clone(&stats);
            metrics.observe_load(move || stats.load());
        }
        let (state_sender, state) = watch::channel(EngineState::Starting);
        let scheduler = scheduler::Scheduler::new(
            model,
            info.fingerprint.clone(),
            settings.clone(),
            receiver,
            stats.clone(),
            metrics,
        )?;
        std::thread::Builder::new()
            .name("kosmos-decoder-engine".into())
            .spawn(move || {
                let guard = StoppedGuard(state_sender);
                guard.0.send_replace(EngineState::Running);
                scheduler.run();
                drop(guard);
            })
            .map_err(StartError::EngineThread)?;
        Ok(Self {
            commands,
            stats,
            info: Arc::new(info),
            settings: Arc::new(settings),
            state,
        })
    }

    /// The loaded model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The scheduler's limits.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// A watcher of the engine's state that does not keep the engine alive.
    pub fn monitor(&self) -> EngineMonitor {
        EngineMonitor {
            state: self.state.clone(),
        }
    }

    /// The current load.
    pub fn snapshot(&self) -> EngineSnapshot {
        let stats = &self.stats;
        EngineSnapshot {
            running: stats.running.load(Ordering::Relaxed),
            waiting: stats.waiting.load(Ordering::Relaxed),
            kv_block_size: self.settings.kv_block_size.get(),
            kv_blocks_total: stats.kv_blocks_total.load(Ordering::Relaxed),
            kv_blocks_used: stats.kv_blocks_used.load(Ordering::Relaxed),
            kv_blocks_cached: stats.kv_blocks_cached.load(Ordering::Relaxed),
            kv_tokens_cached: stats.kv_tokens_cached.load(Ordering::Relaxed),
            preempted: stats.preempted.load(Ordering::Relaxed),
            preemptions_total: stats.preemptions_total.load(Ordering::Relaxed),
            prefix_queried_blocks: stats.prefix_queried_blocks.load(Ordering::Relaxed),
            prefix_hit_blocks: stats.prefix_hit_blocks.load(Ordering::Relaxed),
            cancelled_total: stats.cancelled_total.load(Ordering::Relaxed),
            steps_total: stats.steps_total.load(Ordering::Relaxed),
            generated_tokens_total: stats.generated_tokens_total.load(Ordering::Relaxed),
        }
    }

    /// Queues a generation; its tokens arrive on the returned stream, the last message carrying the finish or an
    /// error. Dropping the receiver cancels the generation.
    pub fn generate(
        &self,
        job: GenerateJob,
    ) -> Result<mpsc::Receiver<GenerateEvent>, RequestError> {
        check_layout(&job.prompt)?;
        if job.stopping.max_new_tokens == 0 {
            return Err(RequestError::InvalidArgument(
                "`max_new_tokens` must be >= 1".into(),
            ));
        }
        let block_size = self.settings.kv_block_size.get();
        self.check_budget(
            job.kv_need(block_size),
            "prompt + max_new_tokens, in whole KV blocks,",
        )?;
        let (events, receiver) = mpsc::channel(self.settings.stream_buffer_messages.get());
        let queue_span = queue_span(job.prompt.len());
        let command = Command::Generate(Box::new(GenerateCommand {
            job,
            events,
            span: tracing::Span::current(),
            queue_span,
            submitted: Instant::now(),
        }));
        self.submit(command)?;
        Ok(receiver)
    }

    /// Queues a scoring; the result arrives on the returned receiver. Dropping it cancels the scoring.
    pub fn score(
        &self,
        job: ScoreJob,
    ) -> Result<oneshot::Receiver<Result<ScoreOutput, RequestError>>, RequestError> {
        check_layout(&job.context)?;
        if job.candidates.is_empty() || job.candidates.iter().any(Vec::is_empty) {
            return Err(RequestError::InvalidArgument(
                "a scoring needs at least one candidate and no empty candidate".into(),
            ));
        }
        let block_size = self.settings.kv_block_size.get();
        self.check_budget(
            job.kv_need(block_size),
            "the KV tokens of the context and the candidates, in whole blocks,",
        )?;
        let (reply, receiver) = oneshot::channel();
        let queue_span = queue_span(job.context.len());
        let command = Command::Score(Box::new(ScoreCommand {
            job,
            reply,
            span: tracing::Span::current(),
            queue_span,
            submitted: Instant::now(),
        }));
        self.submit(command)?;
        Ok(receiver)
    }

    /// A request that could never be admitted is refused at once rather than blocking the queue forever.
    fn check_budget(&self, need: usize, what: &str) -> Result<(), RequestError> {
        let budget =
            scheduler::cache_config(&self.settings).num_blocks * self.settings.kv_block_size.get();
        if need > budget {
            return Err(RequestError::InvalidArgument(format!(
                "{what} ({need}) must be <= the KV token budget ({budget})"
            )));
        }
        Ok(())
    }

    fn submit(&self, command: Command) -> Result<(), RequestError> {
        let max_waiting = self.settings.max_waiting_requests.get();
        let reserved =
            self.stats
                .waiting
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                    (waiting < max_waiting).then_some(waiting + 1)
                });
        if reserved.is_err() {
            return Err(RequestError::QueueFull { max_waiting });
        }
        match self.commands.try_send(command) {
            Ok(()) => Ok(()),
            Err(error) => {
                self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
                match error {
                    mpsc::error::TrySendError::Full(_) => {
                        Err(RequestError::QueueFull { max_waiting })
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(RequestError::EngineStopped),
                }
            }
        }
    }
}

/// The structural invariants the engine relies on (the gRPC edge checks far more: vocabulary, widths, limits).
/// In-process callers that break the widths get a failed step, never a panic.
fn check_layout(prompt: &Prompt) -> Result<(), RequestError> {
    let invalid = |message: String| Err(RequestError::InvalidArgument(message));
    if prompt.is_empty() {
        return invalid("the prompt must contain at least one token".into());
    }
    if prompt.image_mask.len() != prompt.ids.len() {
        return invalid(format!(
            "the image mask has {} entries for {} tokens",
            prompt.image_mask.len(),
            prompt.ids.len()
        ));
    }
    let marked = prompt.image_mask.iter().filter(|&&marked| marked).count();
    if marked != prompt.image_tokens {
        return invalid(format!(
            "the image mask marks {marked} positions but `image_tokens` is {}",
            prompt.image_tokens
        ));
    }
    let rows_fit = match prompt.image_tokens {
        0 => prompt.image_rows.is_empty(),
        tokens => !prompt.image_rows.is_empty() && prompt.image_rows.len().is_multiple_of(tokens),
    };
    if !rows_fit {
        return invalid(format!(
            "{} image values do not make {} rows",
            prompt.image_rows.len(),
            prompt.image_tokens
        ));
    }
    Ok(())
}
