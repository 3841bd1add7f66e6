//! A [`ScoreTask`]: one step over the context (after any prefix hit), whose last row scores the first token of
//! every candidate, then one step in which every candidate longer than one token runs on a fork of the context's
//! block table (shared blocks, the partial last block copied on first write) instead of a copy of the context.

use std::time::{Duration, Instant};

use kosmos_model::{BlockTable, Device, ImageInjection, PagedKvCache, SeqChunk, Tensor};
use tokio::sync::oneshot;

use super::sequence::{RowsWanted, chunk_images, content_keys, image_tensor};
use super::types::{CandidateScore, Prompt, ScoreJob, ScoreOutput, Timings};
use crate::error::RequestError;
use crate::metrics::TokenCounts;

/// A candidate being scored: its index in the request and its fork of the context's table.
#[derive(Debug)]
struct CandidateRun {
    index: usize,
    table: BlockTable,
}

/// The caller's end of a scoring.
pub(crate) type ScoreReply = oneshot::Sender<Result<ScoreOutput, RequestError>>;

/// A scoring admitted to the engine.
#[derive(Debug)]
pub(crate) struct ScoreTask {
    pub(crate) span: tracing::Span,
    /// `decoder.prefill` during the context step, then `decoder.decode` during the candidate step.
    pub(crate) phase_span: tracing::Span,
    /// Admission order (see [`super::sequence::Sequence::admitted`]).
    pub(crate) admitted: u64,
    context: Prompt,
    images: Option<Tensor>,
    chunk_images: Option<Tensor>,
    candidates: Vec<Vec<u32>>,
    context_table: BlockTable,
    /// Whether the context step has run (its logits taken, the candidate runs forked).
    context_done: bool,
    runs: Vec<CandidateRun>,
    /// Per candidate, the log-probabilities found so far.
    logprobs: Vec<Vec<f32>>,
    reply: ScoreReply,
    pub(crate) deadline: Option<Instant>,
    arrived: Instant,
    first_step: Option<Instant>,
    prefill: Duration,
    decode: Duration,
    done: bool,
}

impl ScoreTask {
    /// A task for `job`, ready for its context step.
    pub(crate) fn new(
        cache: &PagedKvCache,
        device: &Device,
        admitted: u64,
        job: ScoreJob,
        reply: ScoreReply,
        span: tracing::Span,
    ) -> Result<Self, (RequestError, ScoreReply)> {
        let images = match image_tensor(&job.context, device) {
            Ok(images) => images,
            Err(error) => return Err((error, reply)),
        };
        let logprobs = job
            .candidates
            .iter()
            .map(|candidate| Vec::with_capacity(candidate.len()))
            .collect();
        Ok(Self {
            span,
            phase_span: tracing::Span::none(),
            admitted,
            context_table: cache.new_table(&job.tenant, content_keys(&job.context)),
            context: job.context,
            images,
            chunk_images: None,
            candidates: job.candidates,
            context_done: false,
            runs: Vec::new(),
            logprobs,
            reply,
            deadline: job.deadline,
            arrived: job.arrived,
            first_step: None,
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            done: false,
        })
    }

    /// Whether the caller stopped waiting.
    pub(crate) fn is_closed(&self) -> bool {
        self.reply.is_closed()
    }

    /// Whether every candidate is scored.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// When the request arrived.
    pub(crate) fn arrived(&self) -> Instant {
        self.arrived
    }

    /// Context positions.
    pub(crate) fn context_tokens(&self) -> usize {
        self.context.len()
    }

    /// Its tokens: the context's text tokens and every candidate token as input, the context's image positions.
    pub(crate) fn token_counts(&self) -> TokenCounts {
        let candidates: usize = self.candidates.iter().map(Vec::len).sum();
        TokenCounts {
            input: self.context.len().saturating_sub(self.context.image_tokens) + candidates,
            image: self.context.image_tokens,
            output: None,
        }
    }

    /// KV rows written.
    pub(crate) fn cached(&self) -> usize {
        self.context_table.len() + self.runs.iter().map(|run| run.table.len()).sum::<usize>()
    }

    /// Whether the next step is the context step.
    pub(crate) fn in_context_step(&self) -> bool {
        !self.context_done
    }

    /// Attaches the cached blocks of the longest known prefix of the context.
    pub(crate) fn attach_prefix(&mut self, cache: &mut PagedKvCache) {
        if !self.context_done {
            cache.match_prefix(&mut self.context_table, &self.context.ids);
        }
    }

    /// Blocks the next step takes from the pool.
    pub(crate) fn blocks_needed(&self, cache: &PagedKvCache) -> usize {
        if !self.context_done {
            return cache.blocks_needed(
                &self.context_table,
                self.context.len() - self.context_table.len(),
            );
        }
        self.runs
            .iter()
            .map(|run| cache.blocks_needed(&run.table, self.fed(run.index).len()))
            .sum()
    }

    /// The ids a candidate run feeds: all but the candidate's last (row j predicts candidate[j + 1]).
    fn fed(&self, index: usize) -> &[u32] {
        let candidate = &self.candidates[index];
        &candidate[..candidate.len().saturating_sub(1)]
    }

    /// Gives every block back (the scores found so far stay).
    pub(crate) fn release(&mut self, cache: &mut PagedKvCache) {
        cache.release(&mut self.context_table);
        for mut run in self.runs.drain(..) {
            cache.release(&mut run.table);
        }
        self.chunk_images = None;
    }

    /// Gives every block back and starts over at the context step (a preemption).
    pub(crate) fn preempt(&mut self, cache: &mut PagedKvCache) {
        self.release(cache);
        self.context_done = false;
        self.logprobs.iter_mut().for_each(Vec::clear);
    }

    /// Takes the blocks of the next step from `cache`.
    pub(crate) fn reserve(&mut self, cache: &mut PagedKvCache) -> kosmos_model::Result<()> {
        if !self.context_done {
            let remaining = self.context.len() - self.context_table.len();
            return cache.reserve(&mut self.context_table, remaining);
        }
        for run in &mut self.runs {
            let candidate = &self.candidates[run.index];
            cache.reserve(&mut run.table, candidate.len().saturating_sub(1))?;
        }
        Ok(())
    }

    /// Starts over at the context step without blocks after the cache they were in was replaced.
    pub(crate) fn forget_blocks(&mut self) {
        self.context_table = self.context_table.detached();
        self.runs.clear();
        self.context_done = false;
        self.chunk_images = None;
        self.logprobs.iter_mut().for_each(Vec::clear);
    }

    /// Slices the image rows of the context chunk.
    pub(crate) fn prepare(&mut self) -> Result<(), RequestError> {
        self.chunk_images = if self.context_done {
            None
        } else {
            chunk_images(
                self.images.as_ref(),
                &self.context.image_mask,
                self.context_table.len(),
            )?
        };
        Ok(())
    }

    /// This task's chunks of the next step: the context before its step, then one chunk per candidate run.
    pub(crate) fn chunks<'a>(
        &'a mut self,
        step_started: Instant,
        out: &mut Vec<(SeqChunk<'a>, RowsWanted)>,
    ) {
        self.first_step.get_or_insert(step_started);
        if !self.context_done {
            let start = self.context_table.len();
            let images = self.chunk_images.as_ref().map(|embeds| ImageInjection {
                mask: &self.context.image_mask[start..],
                embeds,
            });
            out.push((
                SeqChunk {
                    input_ids: &self.context.ids[start..],
                    images,
                    table: &mut self.context_table,
                },
                RowsWanted::Last,
            ));
            return;
        }
        for run in &mut self.runs {
            let candidate = &self.candidates[run.index];
            out.push((
                SeqChunk {
                    input_ids: &candidate[..candidate.len().saturating_sub(1)],
                    images: None,
                    table: &mut run.table,
                },
                RowsWanted::All,
            ));
        }
    }

    /// Takes the context step's last row: the first token of every candidate, then forks a run per candidate
    /// longer than one token and gives the context's own table back (the forks hold its blocks).
    pub(crate) fn accept_context(
        &mut self,
        cache: &mut PagedKvCache,
        logits: &[f32],
        step_started: Instant,
        step_ended: Instant,
    ) -> Result<(), RequestError> {
        self.prefill = step_ended.saturating_duration_since(step_started);
        self.chunk_images = None;
        let log_probs = log_softmax(logits);
        for (candidate, logprobs) in self.candidates.iter().zip(&mut self.logprobs) {
            let first = candidate.first().ok_or_else(|| {
                RequestError::Engine("an empty candidate reached the engine".into())
            })?;
            logprobs.push(pick(&log_probs, *first)?);
        }
        for index in 0..self.candidates.len() {
            if self.candidates[index].len() > 1 {
                let table = cache.fork(&self.context_table);
                self.runs.push(CandidateRun { index, table });
            }
        }
        cache.release(&mut self.context_table);
        self.context_done = true;
        self.done = self.runs.is_empty();
        Ok(())
    }

    /// Takes the rows of the candidate run at `run` (in the order of [`ScoreTask::chunks`]).
    pub(crate) fn accept_candidate(
        &mut self,
        run: usize,
        rows: &[Vec<f32>],
    ) -> Result<(), RequestError> {
        let index = self
            .runs
            .get(run)
            .map(|run| run.index)
            .ok_or_else(|| RequestError::Engine(format!("no candidate run {run}")))?;
        let candidate = &self.candidates[index];
        for (row, &target) in rows.iter().zip(&candidate[1..]) {
            let log_probs = log_softmax(row);
            self.logprobs[index].push(pick(&log_probs, target)?);
        }
        Ok(())
    }

    /// Marks the candidate step over: every run has its rows; their blocks go back.
    pub(crate) fn candidates_done(
        &mut self,
        cache: &mut PagedKvCache,
        step_started: Instant,
        step_ended: Instant,
    ) {
        self.decode = step_ended.saturating_duration_since(step_started);
        for mut run in self.runs.drain(..) {
            cache.release(&mut run.table);
        }
        self.done = true;
    }

    /// Sends the scores to the caller (the caller has released the blocks).
    pub(crate) fn complete(self) {
        let timings = Timings {
            queue: self.first_step.map_or(Duration::ZERO, |first| {
                first.saturating_duration_since(self.arrived)
            }),
            prefill: self.prefill,
            time_to_first_token: Duration::ZERO,
            decode: self.decode,
        };
        let output = ScoreOutput {
            scores: self
                .logprobs
                .into_iter()
                .map(CandidateScore::from_logprobs)
                .collect(),
            context_tokens: self.context.len(),
            timings,
        };
        let _ = self.reply.send(Ok(output));
    }

    /// Sends `error` to the caller.
    pub(crate) fn fail(self, error: RequestError) {
        let _ = self.reply.send(Err(error));
    }
}

/// `log_softmax` of one row in f64 (stable for large vocabularies), back in f32.
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits
        .iter()
        .map(|&value| f64::from(value - max).exp())
        .sum();
    let log_total = total.ln();
    logits
        .iter()
        .map(|&value| (f64::from(value - max) - log_total) as f32)
        .collect()
}

fn pick(log_probs: &[f32], id: u32) -> Result<f32, RequestError> {
    log_probs.get(id as usize).copied().ok_or_else(|| {
        RequestError::Engine(format!(
            "candidate token {id} is outside the vocabulary ({})",
            log_probs.len()
        ))
    })
}
