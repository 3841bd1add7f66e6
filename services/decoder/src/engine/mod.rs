//! The engine: one dedicated OS thread owns the model and every KV cache; callers talk to it through an
//! [`EngineHandle`] (a bounded command channel, per-request bounded reply channels, and atomics for the load).
//!
//! ## Scheduler policy
//! * **Admission** is first-come first-served between steps, and stops at the first waiting request that does not
//!   fit (no overtaking, so a long prompt is never starved by short ones). A request fits when the running batch
//!   has fewer than `max_running_sequences` requests, its KV reservation fits `kv_token_budget`, and the prompt
//!   tokens admitted into this step stay within `max_prefill_tokens_per_step` (the first prefill of a step always
//!   fits).
//! * **The KV budget counts reservations**, not current usage: a generation reserves `prompt + max_new_tokens`
//!   when admitted and releases it when it ends, a scoring its contexts and candidates (see
//!   [`ScoreJob::kv_need`]). An admitted sequence therefore always has room to finish and nothing ever needs to be
//!   preempted. `Info` reports both the reservation and the rows actually written.
//! * **A step** packs the prefill chunks of newly admitted sequences with the one-token decode chunks of running
//!   ones (and the context or candidate chunks of scorings) into one `TextModel::forward`: every weight product
//!   runs once per step for the whole batch, attention per sequence against its own cache.
//! * **Backpressure**: each stream has `stream_buffer_messages` slots; a sequence whose client stops reading keeps
//!   its unsent tokens (coalesced into one message) and sits out the steps until the client reads again. Nothing
//!   buffers without bound.
//! * **Removal**: before each step, requests whose client went away (dropped stream or reply) or whose deadline
//!   passed leave the queue or the batch and free their KV.
//! * **Failures**: an error or a panic inside a step fails only the requests in that step (their caches are in an
//!   unknown state and are dropped); the loop goes on.
//! * **Idle**: with nothing to do the thread blocks on the command channel; when every running sequence waits for
//!   its client it sleeps `stalled_poll` between looks.

mod scheduler;
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
    GenerateJob, GenerateUpdate, ModelInfo, Prompt, ScoreJob, ScoreOutput, StoppingRule, Timings,
    Usage,
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
    kv_tokens_reserved: AtomicUsize,
    kv_tokens_cached: AtomicUsize,
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
            let budget = settings.kv_token_budget.get();
            metrics.observe_load(move || Load {
                running: stats.running.load(Ordering::Relaxed),
                waiting: stats.waiting.load(Ordering::Relaxed),
                kv_usage: stats.kv_tokens_reserved.load(Ordering::Relaxed) as f64 / budget as f64,
            });
        }
        let (state_sender, state) = watch::channel(EngineState::Starting);
        let scheduler =
            scheduler::Scheduler::new(model, settings.clone(), receiver, stats.clone(), metrics);
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
            kv_tokens_reserved: stats.kv_tokens_reserved.load(Ordering::Relaxed),
            kv_tokens_cached: stats.kv_tokens_cached.load(Ordering::Relaxed),
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
        self.check_budget(job.kv_need(), "prompt + max_new_tokens")?;
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
        self.check_budget(
            job.kv_need(),
            "the KV tokens of the context copies and candidates",
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
        let budget = self.settings.kv_token_budget.get();
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
