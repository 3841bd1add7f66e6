//! A generating [`Sequence`]: its history (prompt then generated ids), its block table in the engine's paged KV
//! cache, its sampler and its stream. The next chunk is always `history[table.len()..]`: the prompt (after any
//! prefix hit) before the prefill, the last token while decoding, and prompt + generated ids after a preemption.

use std::time::{Duration, Instant};

use kosmos_model::{
    BlockTable, Device, ImageInjection, PagedKvCache, SeqChunk, Tensor, content_key,
};
use tokio::sync::mpsc;

use super::delivery::Delivery;
use super::types::{
    Finish, FinishReason, GenerateEvent, GenerateJob, Prompt, StoppingRule, Timings, Usage,
};
use crate::error::RequestError;
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

/// Per-position content keys of a prompt for the prefix cache: the hash of the embedding row at image positions,
/// 0 at text positions.
pub(crate) fn content_keys(prompt: &Prompt) -> Vec<u64> {
    if prompt.image_tokens == 0 {
        return Vec::new();
    }
    let hidden = prompt.image_rows.len() / prompt.image_tokens;
    let mut rows = prompt.image_rows.chunks_exact(hidden.max(1));
    prompt
        .image_mask
        .iter()
        .map(
            |&marked| match (marked, marked.then(|| rows.next()).flatten()) {
                (true, Some(row)) => content_key(row),
                _ => 0,
            },
        )
        .collect()
}

/// The image rows of the chunk of `mask` starting at `start`: `(marked positions in the chunk, hidden)`.
pub(crate) fn chunk_images(
    images: Option<&Tensor>,
    mask: &[bool],
    start: usize,
) -> Result<Option<Tensor>, RequestError> {
    let Some(images) = images else {
        return Ok(None);
    };
    let before = mask[..start.min(mask.len())].iter().filter(|&&m| m).count();
    let inside = mask[start.min(mask.len())..].iter().filter(|&&m| m).count();
    if inside == 0 {
        return Ok(None);
    }
    images
        .narrow(0, before, inside)
        .map(Some)
        .map_err(|err| RequestError::Engine(format!("cannot slice the image rows: {err}")))
}

/// A generation admitted to the engine (running, or preempted and waiting to be recomputed).
#[derive(Debug)]
pub(crate) struct Sequence {
    pub(crate) span: tracing::Span,
    /// `decoder.prefill` during the prefill step, then `decoder.decode` until the sequence ends (children of
    /// `span`, closed when replaced or dropped).
    pub(crate) phase_span: tracing::Span,
    /// Admission order: the youngest running request is preempted first.
    pub(crate) admitted: u64,
    /// Prompt then generated ids: the next chunk's source, and the history of the penalties and the n-gram ban.
    history: Vec<u32>,
    /// One flag per position of `history`: an image row replaces the token embedding (never past the prompt).
    image_mask: Vec<bool>,
    /// The prompt's image rows, kept until the end (a preempted sequence recomputes them).
    images: Option<Tensor>,
    /// The image rows of the next chunk (set by [`Sequence::prepare`]).
    chunk_images: Option<Tensor>,
    pub(crate) table: BlockTable,
    usage: Usage,
    sampler: Sampler,
    stopping: StoppingRule,
    pub(crate) delivery: Delivery,
    pub(crate) deadline: Option<Instant>,
    arrived: Instant,
    first_step: Option<Instant>,
    prefill: Duration,
    first_token: Option<Instant>,
}

impl Sequence {
    /// A sequence for `job` with an empty table (its blocks come from `cache` at each step).
    pub(crate) fn new(
        cache: &PagedKvCache,
        device: &Device,
        admitted: u64,
        job: GenerateJob,
        events: mpsc::Sender<GenerateEvent>,
        span: tracing::Span,
    ) -> Result<Self, (RequestError, mpsc::Sender<GenerateEvent>)> {
        let images = match image_tensor(&job.prompt, device) {
            Ok(images) => images,
            Err(error) => return Err((error, events)),
        };
        let table = cache.new_table(&job.tenant, content_keys(&job.prompt));
        let GenerateJob {
            prompt,
            sampling,
            stopping,
            deadline,
            arrived,
            resume,
            tenant: _,
        } = job;
        let prompt_tokens = prompt.len();
        // A resumed generation (failover) prefills what the lost replica delivered after the prompt, as text, and
        // continues the random stream where that replica left it.
        let mut history = prompt.ids;
        history.extend_from_slice(&resume.generated_ids);
        let mut image_mask = prompt.image_mask;
        image_mask.extend(std::iter::repeat_n(false, resume.generated_ids.len()));
        let mut sampler = Sampler::new(sampling);
        sampler.skip_draws(resume.random_draws);
        Ok(Self {
            span,
            phase_span: tracing::Span::none(),
            admitted,
            usage: Usage {
                prompt_tokens,
                image_tokens: prompt.image_tokens,
                completion_tokens: resume.generated_ids.len(),
            },
            history,
            image_mask,
            images,
            chunk_images: None,
            table,
            sampler,
            stopping,
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
        self.table.len()
    }

    /// The ids the next step feeds: everything of the history not in the cache yet.
    pub(crate) fn pending_ids(&self) -> &[u32] {
        &self.history[self.table.len().min(self.history.len())..]
    }

    /// Positions to prefill when (re)admitted: the whole history.
    pub(crate) fn history_len(&self) -> usize {
        self.history.len()
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

    /// Attaches the cached blocks of the longest known prefix of the history (at admission, and again when a
    /// preempted sequence resumes).
    pub(crate) fn attach_prefix(&mut self, cache: &mut PagedKvCache) {
        cache.match_prefix(&mut self.table, &self.history);
    }

    /// Gives every block back; the history, the sampler and the stream stay, so the sequence can be recomputed.
    pub(crate) fn release(&mut self, cache: &mut PagedKvCache) {
        cache.release(&mut self.table);
        self.chunk_images = None;
    }

    /// Starts over without blocks after the cache they were in was replaced.
    pub(crate) fn forget_blocks(&mut self) {
        self.table = self.table.detached();
        self.chunk_images = None;
    }

    /// Slices the image rows of the next chunk.
    pub(crate) fn prepare(&mut self) -> Result<(), RequestError> {
        self.chunk_images = chunk_images(self.images.as_ref(), &self.image_mask, self.table.len())?;
        Ok(())
    }

    /// This sequence's chunk of the next step (after [`Sequence::prepare`]).
    pub(crate) fn chunk(&mut self, step_started: Instant) -> (SeqChunk<'_>, RowsWanted) {
        self.first_step.get_or_insert(step_started);
        let start = self.table.len().min(self.history.len());
        let images = self.chunk_images.as_ref().map(|embeds| ImageInjection {
            mask: &self.image_mask[start.min(self.image_mask.len())..],
            embeds,
        });
        let chunk = SeqChunk {
            input_ids: &self.history[start..],
            images,
            table: &mut self.table,
        };
        (chunk, RowsWanted::Last)
    }

    /// Draws the next token from the step's `logits` row. It reads and advances only this sequence's sampler, so
    /// the engine picks the tokens of a step's sequences in parallel, then [`Sequence::accept`]s them in order.
    pub(crate) fn pick(&mut self, logits: &[f32]) -> Result<SampledToken, RequestError> {
        self.sampler
            .sample(logits, &self.history)
            .map_err(|err| RequestError::Engine(err.to_string()))
    }

    /// Appends the token [`Sequence::pick`] drew. Returns whether the sequence has finished; its tokens and finish
    /// wait in `delivery`.
    pub(crate) fn accept(
        &mut self,
        token: SampledToken,
        step_started: Instant,
        step_ended: Instant,
    ) -> bool {
        if self.first_token.is_none() {
            self.first_token = Some(step_ended);
            self.prefill = step_ended.saturating_duration_since(step_started);
        }
        self.chunk_images = None;
        let id = token.id;
        self.history.push(id);
        // Generated positions are text: a recomputation after a preemption feeds them with the prompt.
        self.image_mask.push(false);
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
                true
            }
            None => false,
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

    /// Keeps only what still has to reach the client (the caller has released the blocks).
    pub(crate) fn into_delivery(self) -> Delivery {
        self.delivery
    }
}
