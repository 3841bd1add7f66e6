//! The engine thread's loop: receive, remove the abandoned, admit, plan the step's KV blocks (preempting when the
//! pool runs out), step, publish. The policy is described in the parent module.

mod apply;
mod memory;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use kosmos_model::{KvCacheConfig, PagedKvCache, TextHalf};
use tokio::sync::mpsc;

use super::delivery::{Delivery, Flush};
use super::score::ScoreTask;
use super::sequence::Sequence;
use super::types::EngineSettings;
use super::{Command, EngineStats};
use crate::error::{RequestError, StartError};
use crate::metrics::{DecoderMetrics, Ending, Operation};

impl Command {
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

/// An admitted request that was preempted: it holds no block and waits to be recomputed.
#[derive(Debug)]
enum Preempted {
    Generate(Box<Sequence>),
    Score(Box<ScoreTask>),
}

impl Preempted {
    fn admitted(&self) -> u64 {
        match self {
            Self::Generate(sequence) => sequence.admitted,
            Self::Score(task) => task.admitted,
        }
    }

    /// Positions its resumption prefills.
    fn prefill_tokens(&self) -> usize {
        match self {
            Self::Generate(sequence) => sequence.history_len(),
            Self::Score(task) => task.context_tokens(),
        }
    }
}

/// The state of the engine thread.
pub(super) struct Scheduler {
    model: TextHalf,
    cache: PagedKvCache,
    settings: EngineSettings,
    /// The fingerprint the prefix hashes are salted with (a fresh cache after a panic uses it again).
    fingerprint: String,
    commands: mpsc::Receiver<Command>,
    commands_open: bool,
    stats: Arc<EngineStats>,
    waiting: VecDeque<Command>,
    /// Preempted requests, oldest admission first: they are resumed before anything new is admitted.
    preempted: VecDeque<Preempted>,
    running: Vec<Sequence>,
    scoring: Vec<ScoreTask>,
    /// Ended generations whose last message their client has not taken yet (their KV is already freed).
    finishing: Vec<Delivery>,
    next_admission: u64,
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

/// The pool's size for `settings`.
pub(super) fn cache_config(settings: &EngineSettings) -> KvCacheConfig {
    let block_size = settings.kv_block_size.get();
    KvCacheConfig {
        block_size,
        num_blocks: settings.kv_token_budget.get().div_ceil(block_size),
        prefix_caching: settings.prefix_caching,
        dtype: settings.kv_cache_dtype,
    }
}

impl Scheduler {
    pub(super) fn new(
        model: TextHalf,
        fingerprint: String,
        settings: EngineSettings,
        commands: mpsc::Receiver<Command>,
        stats: Arc<EngineStats>,
        metrics: Option<Arc<DecoderMetrics>>,
    ) -> Result<Self, StartError> {
        let cache = model
            .model()
            .kv_cache(cache_config(&settings), &fingerprint)
            .map_err(StartError::KvCache)?;
        Ok(Self {
            model,
            cache,
            settings,
            fingerprint,
            commands,
            commands_open: true,
            stats,
            waiting: VecDeque::new(),
            preempted: VecDeque::new(),
            running: Vec::new(),
            scoring: Vec::new(),
            finishing: Vec::new(),
            next_admission: 0,
            metrics,
        })
    }

    /// Records a request leaving the engine.
    fn ended(&self, operation: Operation, ending: Ending, arrived: Instant) {
        if let Some(metrics) = &self.metrics {
            metrics.finished(operation, ending, arrived.elapsed());
        }
    }

    /// Runs until every handle is dropped and every request has ended.
    pub(super) fn run(mut self) {
        let counts = self.cache.counts();
        tracing::info!(
            max_running = self.settings.max_running_sequences.get(),
            kv_blocks = counts.total,
            kv_block_size = self.cache.block_size(),
            kv_bytes_per_token = self.cache.bytes_per_token(),
            prefix_caching = self.settings.prefix_caching,
            "decoder engine started"
        );
        self.publish();
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
            // Every running sequence waits for its client (or the queue for the blocks they hold).
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
            || self.next_admission_fits()
    }

    fn has_pending_work(&self) -> bool {
        !self.waiting.is_empty()
            || !self.preempted.is_empty()
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

    /// Removes requests whose caller went away or whose deadline passed, freeing their blocks.
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
        for preempted in std::mem::take(&mut self.preempted) {
            match preempted {
                Preempted::Generate(sequence) => {
                    if let Some(sequence) = self.drop_if_gone(*sequence, now) {
                        self.preempted
                            .push_back(Preempted::Generate(Box::new(sequence)));
                    }
                }
                Preempted::Score(task) => {
                    if let Some(task) = self.drop_task_if_gone(*task, now) {
                        self.preempted.push_back(Preempted::Score(Box::new(task)));
                    }
                }
            }
        }
        for sequence in std::mem::take(&mut self.running) {
            if let Some(sequence) = self.drop_if_gone(sequence, now) {
                self.running.push(sequence);
            }
        }
        for task in std::mem::take(&mut self.scoring) {
            if let Some(task) = self.drop_task_if_gone(task, now) {
                self.scoring.push(task);
            }
        }
        let paused_timeout = self.settings.paused_timeout;
        self.finishing
            .retain(|delivery| !delivery.is_closed() && !delivery.stalled(now, paused_timeout));
    }

    /// The sequence back, unless its client went away, stopped reading for `paused_timeout`, or its deadline
    /// passed (then its blocks are freed).
    fn drop_if_gone(&mut self, mut sequence: Sequence, now: Instant) -> Option<Sequence> {
        let closed = sequence.delivery.is_closed();
        let expired = sequence.deadline.is_some_and(|deadline| deadline <= now);
        let stalled = sequence.delivery.stalled(now, self.settings.paused_timeout);
        if !closed && !expired && !stalled {
            return Some(sequence);
        }
        sequence.release(&mut self.cache);
        self.count_cancelled();
        if stalled && !closed && !expired {
            self.ended(
                Operation::TextCompletion,
                Ending::Error(tonic::Code::Cancelled),
                sequence.arrived(),
            );
            tracing::info!(
                parent: &sequence.span,
                paused_timeout_seconds = self.settings.paused_timeout.as_secs_f64(),
                "client stopped reading, sequence dropped and its blocks freed"
            );
            sequence.into_delivery().fail(RequestError::Abandoned {
                seconds: self.settings.paused_timeout.as_secs_f64(),
            });
        } else if closed {
            let ending = closed_ending(sequence.deadline, now);
            self.ended(Operation::TextCompletion, ending, sequence.arrived());
            tracing::debug!(parent: &sequence.span, "client went away, sequence removed");
        } else {
            self.ended(
                Operation::TextCompletion,
                Ending::Deadline,
                sequence.arrived(),
            );
            sequence
                .into_delivery()
                .fail(RequestError::DeadlineExceeded("while generating"));
        }
        None
    }

    /// The task back, unless its caller went away or its deadline passed (then its blocks are freed).
    fn drop_task_if_gone(&mut self, mut task: ScoreTask, now: Instant) -> Option<ScoreTask> {
        let closed = task.is_closed();
        let expired = task.deadline.is_some_and(|deadline| deadline <= now);
        if !closed && !expired {
            return Some(task);
        }
        task.release(&mut self.cache);
        self.count_cancelled();
        if closed {
            let ending = closed_ending(task.deadline, now);
            self.ended(Operation::Score, ending, task.arrived());
        } else {
            self.ended(Operation::Score, Ending::Deadline, task.arrived());
            task.fail(RequestError::DeadlineExceeded("while scoring"));
        }
        None
    }

    /// Offers every pending message to its client; drops sequences whose client went away.
    fn flush_deliveries(&mut self) {
        for mut sequence in std::mem::take(&mut self.running) {
            if sequence.delivery.flush() == Flush::Closed {
                sequence.release(&mut self.cache);
                self.count_cancelled();
                let ending = closed_ending(sequence.deadline, Instant::now());
                self.ended(Operation::TextCompletion, ending, sequence.arrived());
            } else {
                self.running.push(sequence);
            }
        }
        // A preempted sequence still owes its client the tokens it made before it was preempted.
        for preempted in std::mem::take(&mut self.preempted) {
            match preempted {
                Preempted::Generate(mut sequence) => {
                    if sequence.delivery.flush() == Flush::Closed {
                        self.count_cancelled();
                        let ending = closed_ending(sequence.deadline, Instant::now());
                        self.ended(Operation::TextCompletion, ending, sequence.arrived());
                    } else {
                        self.preempted.push_back(Preempted::Generate(sequence));
                    }
                }
                other => self.preempted.push_back(other),
            }
        }
        self.finishing
            .retain_mut(|delivery| delivery.flush() == Flush::Blocked);
    }

    /// Publishes the load for `Info`, the handles and `/metrics`.
    fn publish(&self) {
        let cached = self.running.iter().map(Sequence::cached).sum::<usize>()
            + self.scoring.iter().map(ScoreTask::cached).sum::<usize>();
        let counts = self.cache.counts();
        let prefix = self.cache.prefix_stats();
        let stats = &self.stats;
        stats
            .running
            .store(self.running.len() + self.scoring.len(), Ordering::Relaxed);
        stats
            .preempted
            .store(self.preempted.len(), Ordering::Relaxed);
        stats.kv_blocks_total.store(counts.total, Ordering::Relaxed);
        stats.kv_blocks_used.store(counts.used, Ordering::Relaxed);
        stats
            .kv_blocks_cached
            .store(counts.cached, Ordering::Relaxed);
        stats.kv_tokens_cached.store(cached, Ordering::Relaxed);
        stats
            .prefix_queried_blocks
            .store(prefix.queried_blocks, Ordering::Relaxed);
        stats
            .prefix_hit_blocks
            .store(prefix.hit_blocks, Ordering::Relaxed);
    }
}
