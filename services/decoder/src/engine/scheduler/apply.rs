//! Running a step and applying its outcome: logits to each request, finished and failed requests retired with
//! their blocks freed, spans and metrics recorded.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::time::Instant;

use kosmos_runtime::telemetry::span_context;
use rayon::prelude::*;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::Scheduler;
use crate::engine::delivery::Flush;
use crate::engine::sequence::Sequence;
use crate::engine::step::{self, ChunkLogits, Owner};
use crate::engine::types::{FinishReason, Usage};
use crate::error::RequestError;
use crate::metrics::{Ending, Operation, TokenCounts};
use crate::sampling::SampledToken;

/// What a step did to one request.
#[derive(Debug)]
enum Outcome {
    Continue,
    Finished,
    Failed(RequestError),
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
    /// Plans the step's blocks, then runs one packed step over the runnable requests; an error or a panic fails
    /// exactly those requests.
    pub(super) fn step(&mut self) {
        if !self.running.iter().any(Sequence::is_runnable) && self.scoring.is_empty() {
            return;
        }
        self.plan();
        if !self.running.iter().any(Sequence::is_runnable) && self.scoring.is_empty() {
            return;
        }
        let step_span = self.open_step();
        let started = Instant::now();
        let model = self.model.model();
        let cache = &mut self.cache;
        let running = &mut self.running;
        let scoring = &mut self.scoring;
        // Unwind safety: on a panic every request that was in the step is failed, and the cache is replaced, so no
        // block left half-written is ever used again.
        let outcome = step_span.in_scope(|| {
            catch_unwind(AssertUnwindSafe(|| {
                // On a worker of the model's thread pool, this thread waiting: called from outside the pool, every
                // parallel kernel of the step (dozens per layer, many of one task on a decode step's few rows)
                // would be handed to a worker and waited for, two context switches each; on a worker a one-task
                // kernel runs inline and the others split with the pool.
                rayon::scope(|_| step::run(model, cache, running, scoring, started))
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
                self.reset_cache();
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
        for mut sequence in std::mem::take(&mut self.running) {
            if sequence.is_runnable() {
                sequence.release(&mut self.cache);
                self.ended(Operation::TextCompletion, ending, sequence.arrived());
                sequence.into_delivery().fail(error.clone());
            } else {
                self.running.push(sequence);
            }
        }
        for mut task in std::mem::take(&mut self.scoring) {
            task.release(&mut self.cache);
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
        let mut picks = self.pick_tokens(&outputs);
        for ChunkLogits { owner, rows } in outputs {
            let missing = || RequestError::Engine("the step returned no logits for a chunk".into());
            match owner {
                Owner::Sequence(index) => {
                    generated += 1;
                    let sequence = &mut self.running[index];
                    let first = !sequence.has_first_token();
                    let result = match picks[index].take() {
                        Some(Ok(token)) => guarded(|| Ok(sequence.accept(token, started, ended))),
                        Some(Err(error)) => Err(error),
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
                    let cache = &mut self.cache;
                    let result = match rows.first() {
                        Some(row) => guarded(|| task.accept_context(cache, row, started, ended)),
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
            self.scoring[task].candidates_done(&mut self.cache, started, ended);
        }
        self.retire(sequence_outcomes, task_outcomes, ended);
    }

    /// The next token of every sequence that has a logits row in `outputs`, by its index in `running` (`None`
    /// without a row). A draw reads only its own sequence, so the step's sequences draw in parallel on the model's
    /// thread pool (one after another on this thread, 16 rows over Kosmos-2's 65,037 tokens took longer than a
    /// decode step of the bench models: `sampling_bench`); a lone sequence draws on this thread. Each sequence
    /// draws the same token either way.
    fn pick_tokens(
        &mut self,
        outputs: &[ChunkLogits],
    ) -> Vec<Option<Result<SampledToken, RequestError>>> {
        let mut rows: Vec<Option<&[f32]>> = vec![None; self.running.len()];
        for ChunkLogits {
            owner,
            rows: logits,
        } in outputs
        {
            if let (Owner::Sequence(index), Some(row)) = (owner, logits.first()) {
                rows[*index] = Some(row.as_slice());
            }
        }
        let pick = |(sequence, row): (&mut Sequence, &Option<&[f32]>)| {
            row.map(|row| guarded(|| sequence.pick(row)))
        };
        if rows.iter().flatten().count() > 1 {
            self.running.par_iter_mut().zip(&rows).map(pick).collect()
        } else {
            self.running.iter_mut().zip(&rows).map(pick).collect()
        }
    }

    /// Keeps the requests that go on; finishes and fails the others, freeing their blocks.
    fn retire(&mut self, sequences: Vec<Outcome>, tasks: Vec<Outcome>, ended: Instant) {
        let running = std::mem::take(&mut self.running);
        for (mut sequence, outcome) in running.into_iter().zip(sequences) {
            match outcome {
                Outcome::Continue => self.running.push(sequence),
                Outcome::Finished => {
                    sequence.release(&mut self.cache);
                    self.record_generation_end(&sequence, ended);
                    let mut delivery = sequence.into_delivery();
                    if delivery.flush() == Flush::Blocked {
                        self.finishing.push(delivery);
                    }
                }
                Outcome::Failed(error) => {
                    tracing::warn!(parent: &sequence.span, %error, "sequence failed");
                    sequence.release(&mut self.cache);
                    let ending = Ending::Error(error.code());
                    self.ended(Operation::TextCompletion, ending, sequence.arrived());
                    sequence.into_delivery().fail(error);
                }
            }
        }
        let scoring = std::mem::take(&mut self.scoring);
        for (mut task, outcome) in scoring.into_iter().zip(tasks) {
            match outcome {
                Outcome::Failed(error) => {
                    tracing::warn!(parent: &task.span, %error, "scoring failed");
                    task.release(&mut self.cache);
                    let ending = Ending::Error(error.code());
                    self.ended(Operation::Score, ending, task.arrived());
                    task.fail(error);
                }
                Outcome::Continue | Outcome::Finished if task.is_done() => {
                    task.release(&mut self.cache);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_on_the_pool_reaches_the_step_s_catch_unwind_with_its_message() {
        // The step runs in `rayon::scope` under `catch_unwind`; rayon must carry the payload back to this thread.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            rayon::scope(|_| -> Result<(), ()> { panic!("a kernel broke on row {}", 3) })
        }));
        let panic = outcome.expect_err("the panic comes back");
        assert_eq!(panic_message(panic.as_ref()), "a kernel broke on row 3");
    }

    #[test]
    fn a_panicking_draw_fails_its_request_only() {
        let picks: Vec<Result<u32, RequestError>> = (0..4u32)
            .into_par_iter()
            .map(|index| {
                guarded(|| {
                    assert!(index != 2, "draw {index} broke");
                    Ok(index)
                })
            })
            .collect();
        assert_eq!(picks[0], Ok(0));
        assert_eq!(picks[3], Ok(3));
        assert!(
            matches!(&picks[2], Err(RequestError::Engine(message)) if message.contains("draw 2 broke")),
            "{:?}",
            picks[2]
        );
    }
}
