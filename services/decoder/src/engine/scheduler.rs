//! The engine thread's loop: receive, remove the abandoned, admit, step, publish. The policy is described in the
//! parent module.

use std::collections::{HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use kosmos_model::TextHalf;
use kosmos_runtime::telemetry::span_context;
use tokio::sync::mpsc;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::sequence::{Delivery, Flush, ScoreTask, Sequence};
use super::step::{self, ChunkLogits, Owner};
use super::types::{EngineSettings, FinishReason, Usage};
use super::{Command, EngineStats};
use crate::error::RequestError;
use crate::metrics::{DecoderMetrics, Ending, Operation, TokenCounts};

impl Command {
    /// KV tokens the request reserves once admitted.
    fn kv_need(&self) -> usize {
        match self {
            Self::Generate(command) => command.job.kv_need(),
            Self::Score(command) => command.job.kv_need(),
        }
    }

    /// Tokens its first step prefills.
    fn prefill_tokens(&self) -> usize {
        match self {
            Self::Generate(command) => command.job.prompt.len(),
            Self::Score(command) => command.job.context.len(),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self {
            Self::Generate(command) => command.job.deadline,
            Self::Score(command) => command.job.deadline,
        }
    }

    fn arrived(&self) -> Instant {
        match self {
            Self::Generate(command) => command.job.arrived,
            Self::Score(command) => command.job.arrived,
        }
    }

    /// When the handler handed the request to the engine (the start of its admission wait).
    fn submitted(&self) -> Instant {
        match self {
            Self::Generate(command) => command.submitted,
            Self::Score(command) => command.submitted,
        }
    }

    fn operation(&self) -> Operation {
        match self {
            Self::Generate(_) => Operation::TextCompletion,
            Self::Score(_) => Operation::Score,
        }
    }

    /// Whether the caller dropped its end.
    fn is_abandoned(&self) -> bool {
        match self {
            Self::Generate(command) => command.events.is_closed(),
            Self::Score(command) => command.reply.is_closed(),
        }
    }

    fn fail(self, error: RequestError) {
        match self {
            Self::Generate(command) => {
                let _ = command.events.try_send(Err(error));
            }
            Self::Score(command) => {
                let _ = command.reply.send(Err(error));
            }
        }
    }
}

/// What a step did to one request.
#[derive(Debug)]
enum Outcome {
    Continue,
    Finished,
    Failed(RequestError),
}

/// The state of the engine thread.
pub(super) struct Scheduler {
    model: TextHalf,
    settings: EngineSettings,
    commands: mpsc::Receiver<Command>,
    commands_open: bool,
    stats: Arc<EngineStats>,
    waiting: VecDeque<Command>,
    running: Vec<Sequence>,
    scoring: Vec<ScoreTask>,
    /// Ended generations whose last message their client has not taken yet (their KV is already freed).
    finishing: Vec<Delivery>,
    kv_reserved: usize,
    metrics: Option<Arc<DecoderMetrics>>,
}

/// Why a request whose caller went away left: its deadline had passed, or it was cancelled.
fn closed_ending(deadline: Option<Instant>, now: Instant) -> Ending {
    if deadline.is_some_and(|deadline| deadline <= now) {
        Ending::Deadline
    } else {
        Ending::Cancelled
    }
}

/// The `finish_reason` of a generation that ended normally.
fn finish_ending(reason: FinishReason) -> Ending {
    match reason {
        FinishReason::Eos => Ending::Stop,
        FinishReason::StopToken => Ending::StopSequence,
        FinishReason::Length | FinishReason::ContextLength => Ending::Length,
    }
}

fn generation_tokens(usage: &Usage) -> TokenCounts {
    TokenCounts {
        input: usage.prompt_tokens.saturating_sub(usage.image_tokens),
        image: usage.image_tokens,
        output: Some(usage.completion_tokens),
    }
}

impl Scheduler {
    pub(super) fn new(
        model: TextHalf,
        settings: EngineSettings,
        commands: mpsc::Receiver<Command>,
        stats: Arc<EngineStats>,
        metrics: Option<Arc<DecoderMetrics>>,
    ) -> Self {
        Self {
            model,
            settings,
            commands,
            commands_open: true,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
            scoring: Vec::new(),
            finishing: Vec::new(),
            kv_reserved: 0,
            metrics,
        }
    }

    /// Records a request leaving the engine.
    fn ended(&self, operation: Operation, ending: Ending, arrived: Instant) {
        if let Some(metrics) = &self.metrics {
            metrics.finished(operation, ending, arrived.elapsed());
        }
    }

    /// Runs until every handle is dropped and every request has ended.
    pub(super) fn run(mut self) {
        tracing::info!(
            max_running = self.settings.max_running_sequences.get(),
            kv_token_budget = self.settings.kv_token_budget.get(),
            "decoder engine started"
        );
        while self.receive_commands() {
            self.remove_abandoned(Instant::now());
            self.flush_deliveries();
            self.admit();
            self.step();
            self.publish();
        }
        tracing::info!("decoder engine stopped");
    }

    /// Takes new commands, blocking when there is nothing else to do. Returns false when the engine should end.
    fn receive_commands(&mut self) -> bool {
        let runnable = self.has_runnable_work();
        let pending = self.has_pending_work();
        if self.commands_open && !runnable && !pending {
            match self.commands.blocking_recv() {
                Some(command) => self.waiting.push_back(command),
                None => self.commands_open = false,
            }
        } else if !runnable && pending {
            // Every running sequence waits for its client (or the queue for the budget they hold).
            std::thread::sleep(self.settings.stalled_poll);
        }
        while self.commands_open {
            match self.commands.try_recv() {
                Ok(command) => self.waiting.push_back(command),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.commands_open = false,
            }
        }
        self.commands_open || self.has_pending_work()
    }

    fn has_runnable_work(&self) -> bool {
        self.running.iter().any(Sequence::is_runnable)
            || !self.scoring.is_empty()
            || self
                .waiting
                .front()
                .is_some_and(|command| self.fits(command, 0))
    }

    fn has_pending_work(&self) -> bool {
        !self.waiting.is_empty()
            || !self.running.is_empty()
            || !self.scoring.is_empty()
            || !self.finishing.is_empty()
    }

    fn count_cancelled(&self) {
        self.stats.cancelled_total.fetch_add(1, Ordering::Relaxed);
    }

    fn leave_queue(&self) {
        self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
    }

    /// Removes requests whose caller went away or whose deadline passed, freeing their KV.
    fn remove_abandoned(&mut self, now: Instant) {
        let expired = |deadline: Option<Instant>| deadline.is_some_and(|deadline| deadline <= now);
        for command in std::mem::take(&mut self.waiting) {
            if command.is_abandoned() {
                self.leave_queue();
                self.count_cancelled();
                let ending = closed_ending(command.deadline(), now);
                self.ended(command.operation(), ending, command.arrived());
            } else if expired(command.deadline()) {
                self.leave_queue();
                self.count_cancelled();
                self.ended(command.operation(), Ending::Deadline, command.arrived());
                command.fail(RequestError::DeadlineExceeded(
                    "while waiting for admission",
                ));
            } else {
                self.waiting.push_back(command);
            }
        }
        for sequence in std::mem::take(&mut self.running) {
            if sequence.delivery.is_closed() {
                self.kv_reserved -= sequence.kv_reserved;
                self.count_cancelled();
                let ending = closed_ending(sequence.deadline, now);
                self.ended(Operation::TextCompletion, ending, sequence.arrived());
                tracing::debug!(parent: &sequence.span, "client went away, sequence removed");
            } else if expired(sequence.deadline) {
                self.kv_reserved -= sequence.kv_reserved;
                self.count_cancelled();
                self.ended(
                    Operation::TextCompletion,
                    Ending::Deadline,
                    sequence.arrived(),
                );
                sequence
                    .into_delivery()
                    .fail(RequestError::DeadlineExceeded("while generating"));
            } else {
                self.running.push(sequence);
            }
        }
        for task in std::mem::take(&mut self.scoring) {
            if task.is_closed() {
                self.kv_reserved -= task.kv_reserved;
                self.count_cancelled();
                let ending = closed_ending(task.deadline, now);
                self.ended(Operation::Score, ending, task.arrived());
            } else if expired(task.deadline) {
                self.kv_reserved -= task.kv_reserved;
                self.count_cancelled();
                self.ended(Operation::Score, Ending::Deadline, task.arrived());
                task.fail(RequestError::DeadlineExceeded("while scoring"));
            } else {
                self.scoring.push(task);
            }
        }
        self.finishing.retain(|delivery| !delivery.is_closed());
    }

    /// Offers every pending message to its client; drops sequences whose client went away.
    fn flush_deliveries(&mut self) {
        for sequence in std::mem::take(&mut self.running) {
            let mut sequence = sequence;
            if sequence.delivery.flush() == Flush::Closed {
                self.kv_reserved -= sequence.kv_reserved;
                self.count_cancelled();
                let ending = closed_ending(sequence.deadline, Instant::now());
                self.ended(Operation::TextCompletion, ending, sequence.arrived());
            } else {
                self.running.push(sequence);
            }
        }
        self.finishing
            .retain_mut(|delivery| delivery.flush() == Flush::Blocked);
    }

    /// Whether `command` can join the batch now, with `prefill_tokens` already admitted into this step.
    fn fits(&self, command: &Command, prefill_tokens: usize) -> bool {
        let settings = &self.settings;
        self.running.len() + self.scoring.len() < settings.max_running_sequences.get()
            && self.kv_reserved + command.kv_need() <= settings.kv_token_budget.get()
            && (prefill_tokens == 0
                || prefill_tokens + command.prefill_tokens()
                    <= settings.max_prefill_tokens_per_step.get())
    }

    /// Moves waiting requests into the batch, first come first served, while they fit.
    fn admit(&mut self) {
        let mut prefill_tokens = 0;
        while let Some(front) = self.waiting.front() {
            if !self.fits(front, prefill_tokens) {
                break;
            }
            let Some(command) = self.waiting.pop_front() else {
                break;
            };
            self.leave_queue();
            prefill_tokens += command.prefill_tokens();
            let model = self.model.model();
            let (operation, arrived) = (command.operation(), command.arrived());
            if let Some(metrics) = &self.metrics {
                metrics.admitted(command.submitted().elapsed());
            }
            let failed = match command {
                Command::Generate(command) => {
                    let super::GenerateCommand {
                        job,
                        events,
                        span,
                        queue_span,
                        submitted: _,
                    } = *command;
                    drop(queue_span);
                    match Sequence::new(model, job, events, span) {
                        Ok(sequence) => {
                            self.kv_reserved += sequence.kv_reserved;
                            self.running.push(sequence);
                            None
                        }
                        Err((error, events)) => {
                            let code = error.code();
                            let _ = events.try_send(Err(error));
                            Some(code)
                        }
                    }
                }
                Command::Score(command) => {
                    let super::ScoreCommand {
                        job,
                        reply,
                        span,
                        queue_span,
                        submitted: _,
                    } = *command;
                    drop(queue_span);
                    match ScoreTask::new(model, job, reply, span) {
                        Ok(task) => {
                            self.kv_reserved += task.kv_reserved;
                            self.scoring.push(task);
                            None
                        }
                        Err((error, reply)) => {
                            let code = error.code();
                            let _ = reply.send(Err(error));
                            Some(code)
                        }
                    }
                }
            };
            if let Some(code) = failed {
                self.ended(operation, Ending::Error(code), arrived);
            }
        }
    }

    /// Runs one packed step over the runnable requests; an error or a panic fails exactly those requests.
    fn step(&mut self) {
        if !self.running.iter().any(Sequence::is_runnable) && self.scoring.is_empty() {
            return;
        }
        let step_span = self.open_step();
        let started = Instant::now();
        let model = self.model.model();
        let running = &mut self.running;
        let scoring = &mut self.scoring;
        // Unwind safety: on a panic every request that was in the step is failed and dropped below, so no cache
        // left half-written is ever used again.
        let outcome = step_span.in_scope(|| {
            catch_unwind(AssertUnwindSafe(|| {
                step::run(model, running, scoring, started)
            }))
        });
        let ended = Instant::now();
        self.stats.steps_total.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(Ok(outputs)) => self.apply(outputs, started, ended),
            Ok(Err(error)) => {
                tracing::warn!(%error, "engine step failed, failing its requests");
                self.fail_step(&RequestError::Engine(error.to_string()));
            }
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                tracing::error!(%message, "engine step panicked, failing its requests");
                self.fail_step(&RequestError::Engine(format!(
                    "panic in the engine step: {message}"
                )));
            }
        }
        self.flush_deliveries();
    }

    /// The `decoder.step` span of the step about to run (a root span linked to the span of every request in
    /// it), opening the `decoder.prefill` span of each request it prefills, and the step's occupancy.
    fn open_step(&mut self) -> tracing::Span {
        let sequences =
            self.running.iter().filter(|s| s.is_runnable()).count() + self.scoring.len();
        if let Some(metrics) = &self.metrics {
            metrics.step(sequences, self.settings.max_running_sequences.get());
        }
        let step_span = tracing::info_span!(
            parent: None,
            "decoder.step",
            step.sequences = sequences,
            step.id = self.stats.steps_total.load(Ordering::Relaxed),
        );
        let traced = !step_span.is_disabled();
        for sequence in self.running.iter_mut().filter(|s| s.is_runnable()) {
            if traced {
                step_span.add_link(span_context(&sequence.span));
            }
            if sequence.awaiting_prefill() {
                sequence.phase_span = tracing::info_span!(
                    parent: &sequence.span,
                    "decoder.prefill",
                    prompt_tokens = sequence.prompt_tokens(),
                );
            }
        }
        for task in &mut self.scoring {
            if traced {
                step_span.add_link(span_context(&task.span));
            }
            if task.in_context_step() && task.phase_span.is_none() {
                task.phase_span = tracing::info_span!(
                    parent: &task.span,
                    "decoder.prefill",
                    prompt_tokens = task.context_tokens(),
                );
            }
        }
        step_span
    }

    /// Fails every request that took part in the step that just failed.
    fn fail_step(&mut self, error: &RequestError) {
        let ending = Ending::Error(error.code());
        for sequence in std::mem::take(&mut self.running) {
            if sequence.is_runnable() {
                self.kv_reserved -= sequence.kv_reserved;
                self.ended(Operation::TextCompletion, ending, sequence.arrived());
                sequence.into_delivery().fail(error.clone());
            } else {
                self.running.push(sequence);
            }
        }
        for task in std::mem::take(&mut self.scoring) {
            self.kv_reserved -= task.kv_reserved;
            self.ended(Operation::Score, ending, task.arrived());
            task.fail(error.clone());
        }
    }

    /// Hands each chunk's logits to its request, then retires finished and failed requests.
    fn apply(&mut self, outputs: Vec<ChunkLogits>, started: Instant, ended: Instant) {
        let mut sequence_outcomes: Vec<Outcome> =
            self.running.iter().map(|_| Outcome::Continue).collect();
        let mut task_outcomes: Vec<Outcome> =
            self.scoring.iter().map(|_| Outcome::Continue).collect();
        let mut candidate_steps = HashSet::new();
        let mut generated = 0u64;
        for ChunkLogits { owner, rows } in outputs {
            let missing = || RequestError::Engine("the step returned no logits for a chunk".into());
            match owner {
                Owner::Sequence(index) => {
                    generated += 1;
                    let sequence = &mut self.running[index];
                    let first = !sequence.has_first_token();
                    let result = match rows.first() {
                        Some(row) => guarded(|| sequence.accept(row, started, ended)),
                        None => Err(missing()),
                    };
                    if first && result.is_ok() {
                        if let Some(metrics) = &self.metrics {
                            metrics.prefilled(ended.saturating_duration_since(started));
                            metrics.first_token(
                                Operation::TextCompletion,
                                ended.saturating_duration_since(sequence.arrived()),
                            );
                        }
                        sequence.phase_span =
                            tracing::info_span!(parent: &sequence.span, "decoder.decode");
                    }
                    sequence_outcomes[index] = match result {
                        Ok(true) => Outcome::Finished,
                        Ok(false) => Outcome::Continue,
                        Err(error) => Outcome::Failed(error),
                    };
                }
                Owner::ScoreContext(index) => {
                    let task = &mut self.scoring[index];
                    let result = match rows.first() {
                        Some(row) => guarded(|| task.accept_context(row, started, ended)),
                        None => Err(missing()),
                    };
                    match result {
                        Ok(()) => {
                            if let Some(metrics) = &self.metrics {
                                metrics.prefilled(ended.saturating_duration_since(started));
                            }
                            task.phase_span = if task.is_done() {
                                tracing::Span::none()
                            } else {
                                tracing::info_span!(parent: &task.span, "decoder.decode")
                            };
                        }
                        Err(error) => task_outcomes[index] = Outcome::Failed(error),
                    }
                }
                Owner::ScoreCandidate { task, run } => {
                    candidate_steps.insert(task);
                    let scoring = &mut self.scoring[task];
                    if let Err(error) = guarded(|| scoring.accept_candidate(run, &rows)) {
                        task_outcomes[task] = Outcome::Failed(error);
                    }
                }
            }
        }
        self.stats
            .generated_tokens_total
            .fetch_add(generated, Ordering::Relaxed);
        for task in candidate_steps {
            self.scoring[task].candidates_done(started, ended);
        }
        let running = std::mem::take(&mut self.running);
        for (sequence, outcome) in running.into_iter().zip(sequence_outcomes) {
            match outcome {
                Outcome::Continue => self.running.push(sequence),
                Outcome::Finished => {
                    self.kv_reserved -= sequence.kv_reserved;
                    self.record_generation_end(&sequence, ended);
                    let mut delivery = sequence.into_delivery();
                    if delivery.flush() == Flush::Blocked {
                        self.finishing.push(delivery);
                    }
                }
                Outcome::Failed(error) => {
                    tracing::warn!(parent: &sequence.span, %error, "sequence failed");
                    self.kv_reserved -= sequence.kv_reserved;
                    let ending = Ending::Error(error.code());
                    self.ended(Operation::TextCompletion, ending, sequence.arrived());
                    sequence.into_delivery().fail(error);
                }
            }
        }
        let scoring = std::mem::take(&mut self.scoring);
        for (task, outcome) in scoring.into_iter().zip(task_outcomes) {
            match outcome {
                Outcome::Failed(error) => {
                    tracing::warn!(parent: &task.span, %error, "scoring failed");
                    self.kv_reserved -= task.kv_reserved;
                    self.ended(
                        Operation::Score,
                        Ending::Error(error.code()),
                        task.arrived(),
                    );
                    task.fail(error);
                }
                Outcome::Continue | Outcome::Finished if task.is_done() => {
                    self.kv_reserved -= task.kv_reserved;
                    if let Some(metrics) = &self.metrics {
                        metrics.token_usage(Operation::Score, task.token_counts());
                    }
                    self.ended(Operation::Score, Ending::Stop, task.arrived());
                    task.complete();
                }
                Outcome::Continue | Outcome::Finished => self.scoring.push(task),
            }
        }
    }

    /// Records a generation that just finished normally: its decode, tokens and end.
    fn record_generation_end(&self, sequence: &Sequence, ended: Instant) {
        let (Some(metrics), Some(finish)) = (&self.metrics, sequence.finish_pending()) else {
            return;
        };
        let usage = &finish.usage;
        metrics.decoded(
            Operation::TextCompletion,
            usage.completion_tokens,
            finish.timings.decode,
        );
        metrics.token_usage(Operation::TextCompletion, generation_tokens(usage));
        metrics.finished(
            Operation::TextCompletion,
            finish_ending(finish.reason),
            ended.saturating_duration_since(sequence.arrived()),
        );
    }

    /// Publishes the load for `Info` and the handles.
    fn publish(&self) {
        let cached = self.running.iter().map(Sequence::cached).sum::<usize>()
            + self.scoring.iter().map(ScoreTask::cached).sum::<usize>();
        let stats = &self.stats;
        stats
            .running
            .store(self.running.len() + self.scoring.len(), Ordering::Relaxed);
        stats
            .kv_tokens_reserved
            .store(self.kv_reserved, Ordering::Relaxed);
        stats.kv_tokens_cached.store(cached, Ordering::Relaxed);
    }
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs one request's share of the step's aftermath (sampling, scoring); a panic fails that request only.
fn guarded<T>(work: impl FnOnce() -> Result<T, RequestError>) -> Result<T, RequestError> {
    catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic_message(panic.as_ref());
        tracing::error!(%message, "request handling panicked, failing the request");
        Err(RequestError::Engine(format!(
            "panic while handling the request: {message}"
        )))
    })
}
