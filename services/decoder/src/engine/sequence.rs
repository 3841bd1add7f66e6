//! The state the engine keeps per admitted request: a generating [`Sequence`] (cache, sampler, stream) and a
//! [`ScoreTask`] (context cache, then one cache per candidate).

use std::time::{Duration, Instant};

use kosmos_model::{Device, ImageInjection, SeqChunk, SequenceCache, Tensor, TextModel};
use tokio::sync::{mpsc, oneshot};

use super::types::{
    CandidateScore, Finish, FinishReason, GenerateEvent, GenerateJob, GenerateUpdate, Prompt,
    ScoreJob, ScoreOutput, StoppingRule, Timings, Usage,
};
use crate::error::RequestError;
use crate::metrics::TokenCounts;
use crate::sampling::{SampledToken, Sampler};

/// Which logits rows of a chunk the request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowsWanted {
    /// The last row (the next-token distribution).
    Last,
    /// Every row.
    All,
}

/// The image rows of a prompt as a `(image_tokens, hidden)` tensor on the model's device.
pub(crate) fn image_tensor(
    prompt: &Prompt,
    device: &Device,
) -> Result<Option<Tensor>, RequestError> {
    if prompt.image_tokens == 0 {
        return Ok(None);
    }
    let hidden = prompt.image_rows.len() / prompt.image_tokens;
    Tensor::from_slice(&prompt.image_rows, (prompt.image_tokens, hidden), device)
        .map(Some)
        .map_err(|err| {
            RequestError::Engine(format!(
                "cannot place the image embeddings on the device: {err}"
            ))
        })
}

/// What happened when a stream's pending messages were offered to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Nothing is pending any more.
    Done,
    /// The client's buffer is full; the message stays pending.
    Blocked,
    /// The client went away.
    Closed,
}

/// The tokens (and finish) a stream has not received yet, coalesced into one message.
#[derive(Debug)]
pub(crate) struct Delivery {
    events: mpsc::Sender<GenerateEvent>,
    pending: GenerateUpdate,
}

impl Delivery {
    pub(crate) fn new(events: mpsc::Sender<GenerateEvent>) -> Self {
        Self {
            events,
            pending: GenerateUpdate::default(),
        }
    }

    /// Whether a message waits for the client.
    pub(crate) fn is_pending(&self) -> bool {
        !self.pending.tokens.is_empty() || self.pending.finish.is_some()
    }

    /// Whether the client dropped its stream.
    pub(crate) fn is_closed(&self) -> bool {
        self.events.is_closed()
    }

    /// Offers the pending message to the client without blocking.
    pub(crate) fn flush(&mut self) -> Flush {
        if !self.is_pending() {
            return Flush::Done;
        }
        let update = std::mem::take(&mut self.pending);
        match self.events.try_send(Ok(update)) {
            Ok(()) => Flush::Done,
            Err(mpsc::error::TrySendError::Full(Ok(update))) => {
                self.pending = update;
                Flush::Blocked
            }
            Err(mpsc::error::TrySendError::Full(Err(_))) => Flush::Blocked,
            Err(mpsc::error::TrySendError::Closed(_)) => Flush::Closed,
        }
    }

    /// Ends the stream with `error`, best effort: a client whose buffer is full sees the stream end instead.
    pub(crate) fn fail(self, error: RequestError) {
        let _ = self.events.try_send(Err(error));
    }
}

/// A generation in the running batch.
#[derive(Debug)]
pub(crate) struct Sequence {
    pub(crate) span: tracing::Span,
    /// `decoder.prefill` during the prefill step, then `decoder.decode` until the sequence ends (children of
    /// `span`, closed when replaced or dropped).
    pub(crate) phase_span: tracing::Span,
    /// Prompt then generated ids: the history of the penalties and the n-gram ban.
    history: Vec<u32>,
    usage: Usage,
    /// The ids of the next chunk: the prompt before the prefill, then the last token.
    next_input: Vec<u32>,
    /// The prompt's image mask and rows, dropped after the prefill.
    image_mask: Vec<bool>,
    images: Option<Tensor>,
    cache: SequenceCache,
    sampler: Sampler,
    stopping: StoppingRule,
    pub(crate) kv_reserved: usize,
    pub(crate) delivery: Delivery,
    pub(crate) deadline: Option<Instant>,
    arrived: Instant,
    first_step: Option<Instant>,
    prefill: Duration,
    first_token: Option<Instant>,
}

impl Sequence {
    /// A sequence for `job` with an empty cache, ready for its prefill.
    pub(crate) fn new(
        model: &TextModel,
        job: GenerateJob,
        events: mpsc::Sender<GenerateEvent>,
        span: tracing::Span,
    ) -> Result<Self, (RequestError, mpsc::Sender<GenerateEvent>)> {
        let images = match image_tensor(&job.prompt, model.device()) {
            Ok(images) => images,
            Err(error) => return Err((error, events)),
        };
        let kv_reserved = job.kv_need();
        let GenerateJob {
            prompt,
            sampling,
            stopping,
            deadline,
            arrived,
        } = job;
        Ok(Self {
            span,
            phase_span: tracing::Span::none(),
            usage: Usage {
                prompt_tokens: prompt.len(),
                image_tokens: prompt.image_tokens,
                completion_tokens: 0,
            },
            history: prompt.ids.clone(),
            next_input: prompt.ids,
            image_mask: prompt.image_mask,
            images,
            cache: model.new_cache(),
            sampler: Sampler::new(sampling),
            stopping,
            kv_reserved,
            delivery: Delivery::new(events),
            deadline,
            arrived,
            first_step: None,
            prefill: Duration::ZERO,
            first_token: None,
        })
    }

    /// Whether the sequence takes part in the next step: not while its client has an unread message pending.
    pub(crate) fn is_runnable(&self) -> bool {
        !self.delivery.is_pending()
    }

    /// KV rows written.
    pub(crate) fn cached(&self) -> usize {
        self.cache.len()
    }

    /// When the request arrived.
    pub(crate) fn arrived(&self) -> Instant {
        self.arrived
    }

    /// Whether the next step is this sequence's prefill.
    pub(crate) fn awaiting_prefill(&self) -> bool {
        self.first_step.is_none()
    }

    /// Whether the first token has been produced.
    pub(crate) fn has_first_token(&self) -> bool {
        self.first_token.is_some()
    }

    /// Prompt positions (images included).
    pub(crate) fn prompt_tokens(&self) -> usize {
        self.usage.prompt_tokens
    }

    /// The finish waiting for the client, once the sequence has ended.
    pub(crate) fn finish_pending(&self) -> Option<&Finish> {
        self.delivery.pending.finish.as_ref()
    }

    /// This sequence's chunk of the next step.
    pub(crate) fn chunk(&mut self, step_started: Instant) -> (SeqChunk<'_>, RowsWanted) {
        self.first_step.get_or_insert(step_started);
        let images = self.images.as_ref().map(|embeds| ImageInjection {
            mask: &self.image_mask,
            embeds,
        });
        let chunk = SeqChunk {
            input_ids: &self.next_input,
            images,
            cache: &mut self.cache,
        };
        (chunk, RowsWanted::Last)
    }

    /// Picks the next token from the step's `logits` row. Returns whether the sequence has finished; its tokens
    /// and finish wait in `delivery`.
    pub(crate) fn accept(
        &mut self,
        logits: &[f32],
        step_started: Instant,
        step_ended: Instant,
    ) -> Result<bool, RequestError> {
        let token: SampledToken = self
            .sampler
            .sample(logits, &self.history)
            .map_err(|err| RequestError::Engine(err.to_string()))?;
        if self.first_token.is_none() {
            self.first_token = Some(step_ended);
            self.prefill = step_ended.saturating_duration_since(step_started);
            self.images = None;
            self.image_mask = Vec::new();
        }
        let id = token.id;
        self.history.push(id);
        self.usage.completion_tokens += 1;
        self.delivery.pending.tokens.push(token);
        let reason = if self.stopping.eos_token_id == Some(id) {
            Some(FinishReason::Eos)
        } else if self.stopping.stop_token_ids.contains(&id) {
            Some(FinishReason::StopToken)
        } else if self.usage.completion_tokens >= self.stopping.max_new_tokens {
            Some(self.stopping.limit_reason)
        } else {
            None
        };
        match reason {
            Some(reason) => {
                self.delivery.pending.finish = Some(self.finish(reason, step_ended));
                Ok(true)
            }
            None => {
                self.next_input.clear();
                self.next_input.push(id);
                Ok(false)
            }
        }
    }

    fn finish(&self, reason: FinishReason, now: Instant) -> Finish {
        let first_step = self.first_step.unwrap_or(now);
        let first_token = self.first_token.unwrap_or(now);
        Finish {
            reason,
            usage: self.usage,
            timings: Timings {
                queue: first_step.saturating_duration_since(self.arrived),
                prefill: self.prefill,
                time_to_first_token: first_token.saturating_duration_since(self.arrived),
                decode: now.saturating_duration_since(first_token),
            },
        }
    }

    /// Drops the KV state and keeps only what still has to reach the client.
    pub(crate) fn into_delivery(self) -> Delivery {
        self.delivery
    }
}

/// A candidate being scored: its index in the request and its own copy of the context cache.
#[derive(Debug)]
struct CandidateRun {
    index: usize,
    cache: SequenceCache,
}

/// A scoring in the running batch: the context step, then one step for every candidate longer than one token.
#[derive(Debug)]
pub(crate) struct ScoreTask {
    pub(crate) span: tracing::Span,
    /// `decoder.prefill` during the context step, then `decoder.decode` during the candidate step.
    pub(crate) phase_span: tracing::Span,
    context: Prompt,
    images: Option<Tensor>,
    candidates: Vec<Vec<u32>>,
    context_cache: Option<SequenceCache>,
    runs: Vec<CandidateRun>,
    /// Per candidate, the log-probabilities found so far.
    logprobs: Vec<Vec<f32>>,
    pub(crate) kv_reserved: usize,
    reply: oneshot::Sender<Result<ScoreOutput, RequestError>>,
    pub(crate) deadline: Option<Instant>,
    arrived: Instant,
    first_step: Option<Instant>,
    prefill: Duration,
    decode: Duration,
    done: bool,
}

/// The state of a scoring after a step.
pub(crate) type ScoreReply = oneshot::Sender<Result<ScoreOutput, RequestError>>;

impl ScoreTask {
    /// A task for `job`, ready for its context step.
    pub(crate) fn new(
        model: &TextModel,
        job: ScoreJob,
        reply: ScoreReply,
        span: tracing::Span,
    ) -> Result<Self, (RequestError, ScoreReply)> {
        let images = match image_tensor(&job.context, model.device()) {
            Ok(images) => images,
            Err(error) => return Err((error, reply)),
        };
        let kv_reserved = job.kv_need();
        let logprobs = job
            .candidates
            .iter()
            .map(|candidate| Vec::with_capacity(candidate.len()))
            .collect();
        Ok(Self {
            span,
            phase_span: tracing::Span::none(),
            context: job.context,
            images,
            candidates: job.candidates,
            context_cache: Some(model.new_cache()),
            runs: Vec::new(),
            logprobs,
            kv_reserved,
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
        self.context_cache.as_ref().map_or(0, SequenceCache::len)
            + self.runs.iter().map(|run| run.cache.len()).sum::<usize>()
    }

    /// This task's chunks of the next step: the context before its step, then one chunk per candidate run.
    pub(crate) fn chunks<'a>(
        &'a mut self,
        step_started: Instant,
        out: &mut Vec<(SeqChunk<'a>, RowsWanted)>,
    ) {
        self.first_step.get_or_insert(step_started);
        if let Some(cache) = self.context_cache.as_mut().filter(|cache| cache.is_empty()) {
            let images = self.images.as_ref().map(|embeds| ImageInjection {
                mask: &self.context.image_mask,
                embeds,
            });
            out.push((
                SeqChunk {
                    input_ids: &self.context.ids,
                    images,
                    cache,
                },
                RowsWanted::Last,
            ));
            return;
        }
        for run in &mut self.runs {
            let candidate = &self.candidates[run.index];
            // Feeding all but the last token: row j predicts candidate[j + 1] (runs exist only for
            // candidates of two tokens or more).
            out.push((
                SeqChunk {
                    input_ids: &candidate[..candidate.len().saturating_sub(1)],
                    images: None,
                    cache: &mut run.cache,
                },
                RowsWanted::All,
            ));
        }
    }

    /// Takes the context step's last row: the first token of every candidate, then the candidate runs.
    pub(crate) fn accept_context(
        &mut self,
        logits: &[f32],
        step_started: Instant,
        step_ended: Instant,
    ) -> Result<(), RequestError> {
        self.prefill = step_ended.saturating_duration_since(step_started);
        self.images = None;
        let log_probs = log_softmax(logits);
        for (candidate, logprobs) in self.candidates.iter().zip(&mut self.logprobs) {
            let first = candidate.first().ok_or_else(|| {
                RequestError::Engine("an empty candidate reached the engine".into())
            })?;
            logprobs.push(pick(&log_probs, *first)?);
        }
        let mut context_cache = self.context_cache.take();
        let longer: Vec<usize> = (0..self.candidates.len())
            .filter(|&index| self.candidates[index].len() > 1)
            .collect();
        for (position, &index) in longer.iter().enumerate() {
            let is_last = position + 1 == longer.len();
            let cache = match (is_last, context_cache.take()) {
                // The last run reuses the context's own cache instead of a copy.
                (true, Some(cache)) => cache,
                (_, Some(cache)) => {
                    let copy = cache.deep_clone().map_err(|err| {
                        RequestError::Engine(format!("cannot copy the context cache: {err}"))
                    })?;
                    context_cache = Some(cache);
                    copy
                }
                (_, None) => return Err(RequestError::Engine("the context cache is gone".into())),
            };
            self.runs.push(CandidateRun { index, cache });
        }
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

    /// Marks the candidate step over: every run has its rows.
    pub(crate) fn candidates_done(&mut self, step_started: Instant, step_ended: Instant) {
        self.decode = step_ended.saturating_duration_since(step_started);
        self.runs.clear();
        self.done = true;
    }

    /// Whether the next step is the context step.
    pub(crate) fn in_context_step(&self) -> bool {
        self.context_cache
            .as_ref()
            .is_some_and(SequenceCache::is_empty)
    }

    /// Sends the scores to the caller.
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
