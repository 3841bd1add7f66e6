//! Admission and KV blocks: who joins the batch, who gets blocks for the next step, who is preempted when the
//! pool runs out.

use std::sync::atomic::Ordering;

use super::{Preempted, Scheduler};
use crate::engine::score::ScoreTask;
use crate::engine::sequence::Sequence;
use crate::error::RequestError;
use crate::metrics::Ending;

/// A request of the running batch, by kind and admission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Generate(u64),
    Score(u64),
}

impl Scheduler {
    /// Blocks a request of `tokens` prefill positions may take at admission: its prompt plus one token of growth
    /// (a prefix hit only lowers this).
    fn admission_blocks(&self, tokens: usize) -> usize {
        (tokens + 1).div_ceil(self.cache.block_size())
    }

    /// Blocks the running batch takes in its next step.
    fn growth_blocks(&self) -> usize {
        let sequences: usize = self
            .running
            .iter()
            .filter(|sequence| sequence.is_runnable())
            .map(|sequence| {
                self.cache
                    .blocks_needed(&sequence.table, sequence.pending_ids().len())
            })
            .sum();
        sequences
            + self
                .scoring
                .iter()
                .map(|task| task.blocks_needed(&self.cache))
                .sum::<usize>()
    }

    /// The prefill positions of the next request to admit (a preempted one first), if any.
    fn next_candidate(&self) -> Option<usize> {
        match self.preempted.front() {
            Some(preempted) => Some(preempted.prefill_tokens()),
            None => self.waiting.front().map(|command| command.prefill_tokens()),
        }
    }

    /// Whether the next request could be admitted now.
    pub(super) fn next_admission_fits(&self) -> bool {
        self.next_candidate().is_some_and(|tokens| {
            self.running.len() + self.scoring.len() < self.settings.max_running_sequences.get()
                && self.growth_blocks() + self.admission_blocks(tokens)
                    <= self.cache.counts().available
        })
    }

    /// Moves requests into the batch while they fit, first come first served: preempted requests (in admission
    /// order) before waiting ones, and no overtaking, so a long prompt is never starved by short ones.
    pub(super) fn admit(&mut self) {
        let mut prefill_tokens = 0;
        let mut promised = self.growth_blocks();
        while let Some(tokens) = self.next_candidate() {
            let blocks = self.admission_blocks(tokens);
            let fits = self.running.len() + self.scoring.len()
                < self.settings.max_running_sequences.get()
                && promised + blocks <= self.cache.counts().available
                && (prefill_tokens == 0
                    || prefill_tokens + tokens <= self.settings.max_prefill_tokens_per_step.get());
            if !fits {
                break;
            }
            prefill_tokens += tokens;
            promised += blocks;
            match self.preempted.pop_front() {
                Some(Preempted::Generate(mut sequence)) => {
                    sequence.attach_prefix(&mut self.cache);
                    self.running.push(*sequence);
                }
                Some(Preempted::Score(mut task)) => {
                    task.attach_prefix(&mut self.cache);
                    self.scoring.push(*task);
                }
                None => self.admit_waiting(),
            }
        }
    }

    /// Admits the request at the front of the queue.
    fn admit_waiting(&mut self) {
        let Some(command) = self.waiting.pop_front() else {
            return;
        };
        self.leave_queue();
        let admitted = self.next_admission;
        self.next_admission += 1;
        let device = self.model.model().device().clone();
        let (operation, arrived) = (command.operation(), command.arrived());
        if let Some(metrics) = &self.metrics {
            metrics.admitted(command.submitted().elapsed());
        }
        let failed = match command {
            super::Command::Generate(command) => {
                let crate::engine::GenerateCommand {
                    job,
                    events,
                    span,
                    queue_span,
                    submitted: _,
                } = *command;
                // `decoder.queue` ends at admission.
                drop(queue_span);
                match Sequence::new(&self.cache, &device, admitted, job, events, span) {
                    Ok(mut sequence) => {
                        sequence.attach_prefix(&mut self.cache);
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
            super::Command::Score(command) => {
                let crate::engine::ScoreCommand {
                    job,
                    reply,
                    span,
                    queue_span,
                    submitted: _,
                } = *command;
                drop(queue_span);
                match ScoreTask::new(&self.cache, &device, admitted, job, reply, span) {
                    Ok(mut task) => {
                        task.attach_prefix(&mut self.cache);
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

    /// Reserves the blocks of the next step for every runnable request, oldest first; when the pool runs out,
    /// preempts the youngest running request (which may be the one asking) until the ask fits. Then slices each
    /// request's image rows for its chunk.
    pub(super) fn plan(&mut self) {
        let mut members: Vec<Member> = self
            .running
            .iter()
            .filter(|sequence| sequence.is_runnable())
            .map(|sequence| Member::Generate(sequence.admitted))
            .chain(self.scoring.iter().map(|task| Member::Score(task.admitted)))
            .collect();
        members.sort_by_key(|member| match member {
            Member::Generate(order) | Member::Score(order) => *order,
        });
        for member in members {
            // `None`: the member was preempted meanwhile (or failed).
            while let Some(needed) = self.blocks_needed(member) {
                if needed <= self.cache.counts().available {
                    if let Err(error) = self.reserve(member) {
                        self.fail_member(member, error);
                    }
                    break;
                }
                match self.youngest() {
                    Some(victim) => self.preempt(victim),
                    None => break,
                }
            }
        }
    }

    fn blocks_needed(&self, member: Member) -> Option<usize> {
        match member {
            Member::Generate(order) => self
                .running
                .iter()
                .find(|sequence| sequence.admitted == order)
                .map(|sequence| {
                    self.cache
                        .blocks_needed(&sequence.table, sequence.pending_ids().len())
                }),
            Member::Score(order) => self
                .scoring
                .iter()
                .find(|task| task.admitted == order)
                .map(|task| task.blocks_needed(&self.cache)),
        }
    }

    fn reserve(&mut self, member: Member) -> Result<(), RequestError> {
        let cache = &mut self.cache;
        let engine_error = |err: kosmos_model::ModelError| RequestError::Engine(err.to_string());
        match member {
            Member::Generate(order) => {
                if let Some(sequence) = self.running.iter_mut().find(|s| s.admitted == order) {
                    let pending = sequence.pending_ids().len();
                    cache
                        .reserve(&mut sequence.table, pending)
                        .map_err(engine_error)?;
                    sequence.prepare()?;
                }
            }
            Member::Score(order) => {
                if let Some(task) = self.scoring.iter_mut().find(|t| t.admitted == order) {
                    task.reserve(cache).map_err(engine_error)?;
                    task.prepare()?;
                }
            }
        }
        Ok(())
    }

    /// Fails one request of the batch (its blocks freed).
    fn fail_member(&mut self, member: Member, error: RequestError) {
        let ending = Ending::Error(error.code());
        match member {
            Member::Generate(order) => {
                if let Some(index) = self.running.iter().position(|s| s.admitted == order) {
                    let mut sequence = self.running.swap_remove(index);
                    sequence.release(&mut self.cache);
                    tracing::warn!(parent: &sequence.span, %error, "sequence failed");
                    self.ended(
                        crate::metrics::Operation::TextCompletion,
                        ending,
                        sequence.arrived(),
                    );
                    sequence.into_delivery().fail(error);
                }
            }
            Member::Score(order) => {
                if let Some(index) = self.scoring.iter().position(|t| t.admitted == order) {
                    let mut task = self.scoring.swap_remove(index);
                    task.release(&mut self.cache);
                    self.ended(crate::metrics::Operation::Score, ending, task.arrived());
                    task.fail(error);
                }
            }
        }
    }

    /// The most recently admitted request of the batch, paused ones included.
    fn youngest(&self) -> Option<Member> {
        let sequence = self
            .running
            .iter()
            .map(|sequence| Member::Generate(sequence.admitted));
        let tasks = self.scoring.iter().map(|task| Member::Score(task.admitted));
        sequence.chain(tasks).max_by_key(|member| match member {
            Member::Generate(order) | Member::Score(order) => *order,
        })
    }

    /// Frees the blocks of `member` and queues it for recomputation, in admission order.
    fn preempt(&mut self, member: Member) {
        let preempted = match member {
            Member::Generate(order) => {
                let Some(index) = self.running.iter().position(|s| s.admitted == order) else {
                    return;
                };
                let mut sequence = self.running.remove(index);
                sequence.release(&mut self.cache);
                tracing::debug!(parent: &sequence.span, "sequence preempted");
                Preempted::Generate(Box::new(sequence))
            }
            Member::Score(order) => {
                let Some(index) = self.scoring.iter().position(|t| t.admitted == order) else {
                    return;
                };
                let mut task = self.scoring.remove(index);
                task.preempt(&mut self.cache);
                tracing::debug!(parent: &task.span, "scoring preempted");
                Preempted::Score(Box::new(task))
            }
        };
        self.stats.preemptions_total.fetch_add(1, Ordering::Relaxed);
        let at = self
            .preempted
            .iter()
            .position(|other| other.admitted() > preempted.admitted())
            .unwrap_or(self.preempted.len());
        self.preempted.insert(at, preempted);
    }

    /// After a panic inside a step the pools may be unusable (a poisoned lock, half-written blocks): a fresh cache
    /// replaces them and every request still admitted is queued for recomputation.
    pub(super) fn reset_cache(&mut self) {
        let fresh = self
            .model
            .model()
            .kv_cache(super::cache_config(&self.settings), &self.fingerprint);
        match fresh {
            Ok(cache) => self.cache = cache,
            Err(error) => {
                tracing::error!(%error, "cannot allocate a fresh KV cache; keeping the old one");
                return;
            }
        }
        for mut sequence in std::mem::take(&mut self.running) {
            sequence.forget_blocks();
            self.preempted
                .push_back(Preempted::Generate(Box::new(sequence)));
        }
        for mut task in std::mem::take(&mut self.scoring) {
            task.forget_blocks();
            self.preempted.push_back(Preempted::Score(Box::new(task)));
        }
        for preempted in &mut self.preempted {
            match preempted {
                Preempted::Generate(sequence) => sequence.forget_blocks(),
                Preempted::Score(task) => task.forget_blocks(),
            }
        }
        self.preempted
            .make_contiguous()
            .sort_by_key(Preempted::admitted);
    }
}
