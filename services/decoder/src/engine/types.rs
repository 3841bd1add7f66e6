//! The engine's domain types: validated requests going in, tokens, finishes and scores coming out. No proto types
//! here; `grpc` converts at the edge.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use crate::error::RequestError;
use crate::sampling::{SampledToken, SamplingParams};

/// What the loaded model is and how its prompts are laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The fingerprint image embeddings must carry (see `kosmos_model::ModelFiles::fingerprint`).
    pub fingerprint: String,
    /// Most positions a sequence may hold, prompt and generated tokens together (`max_position_embeddings`).
    pub context_length: usize,
    /// Rows of the LM head.
    pub vocab_size: usize,
    /// Embedding rows per image (`latent_query_num`).
    pub num_image_tokens: usize,
    /// Embedding width (`text_config.embed_dim`).
    pub hidden_size: usize,
    /// Id at the first position of an image; position `i` of an image carries this id + `i`, or this id when
    /// `image_placeholder_repeated`.
    pub image_placeholder_first_id: u32,
    /// Every image position carries `image_placeholder_first_id` (Kosmos-2.5's `<s>`).
    pub image_placeholder_repeated: bool,
    /// The model family (`kosmos-2`, `kosmos-2.5`).
    pub family: &'static str,
    /// Beginning-of-sequence id.
    pub bos_token_id: u32,
    /// End-of-sequence id.
    pub eos_token_id: u32,
    /// Padding id.
    pub pad_token_id: u32,
    /// The device the model runs on, as configured (`cpu`, `cuda:0`).
    pub device: String,
    /// The dtype of the weights.
    pub dtype: kosmos_model::DType,
}

/// The scheduler's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    /// Most requests (generations and scorings) in the running batch.
    pub max_running_sequences: NonZeroUsize,
    /// Token positions the KV pool holds (rounded up to whole blocks; see the scheduler policy in `engine`).
    pub kv_token_budget: NonZeroUsize,
    /// Token positions per KV block.
    pub kv_block_size: NonZeroUsize,
    /// Whether full blocks are shared between requests with a common prefix.
    pub prefix_caching: bool,
    /// Storage type of the keys and values; `None`: the weights' dtype.
    pub kv_cache_dtype: Option<kosmos_model::DType>,
    /// Most requests waiting for admission; beyond it requests are refused with RESOURCE_EXHAUSTED.
    pub max_waiting_requests: NonZeroUsize,
    /// Most prompt tokens prefilled in one step; a single longer prompt still runs, alone among the prefills.
    pub max_prefill_tokens_per_step: NonZeroUsize,
    /// Messages buffered per stream before the sequence pauses until its client reads.
    pub stream_buffer_messages: NonZeroUsize,
    /// How often the engine looks again when every running sequence waits for its client.
    pub stalled_poll: Duration,
    /// How long a sequence may wait for its client to read before it is dropped and its blocks freed.
    pub paused_timeout: Duration,
}

/// A prompt laid out for the model: token ids (placeholder ids at image positions), the image mask and the image
/// rows in order of their positions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Prompt {
    /// Token ids, one per position.
    pub ids: Vec<u32>,
    /// One flag per position: an image embedding row replaces the token embedding.
    pub image_mask: Vec<bool>,
    /// `(image_tokens, hidden)` rows in row-major order, f32.
    pub image_rows: Vec<f32>,
    /// Positions filled by image rows (the `true` entries of `image_mask`).
    pub image_tokens: usize,
}

impl Prompt {
    /// Positions of the prompt.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the prompt has no position.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Why a generation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` were generated.
    Length,
    /// The model produced EOS.
    Eos,
    /// A caller-given stop id was produced.
    StopToken,
    /// The context is full.
    ContextLength,
}

/// When a generation stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppingRule {
    /// Most tokens to generate (prompt + this fits the context).
    pub max_new_tokens: usize,
    /// The reason reported when `max_new_tokens` is reached: `Length` when the caller set it, `ContextLength`
    /// when it was the room left in the context.
    pub limit_reason: FinishReason,
    /// Ids that end the generation (the id is returned).
    pub stop_token_ids: Vec<u32>,
    /// The EOS id, unless the caller asked to ignore it.
    pub eos_token_id: Option<u32>,
}

/// The part of a generation another replica delivered before it was lost: the job continues after it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resume {
    /// The tokens delivered, in order (prefilled after the prompt; counted as completion tokens).
    pub generated_ids: Vec<u32>,
    /// Random numbers drawn for them (the sampler skips that many before its next draw).
    pub random_draws: u64,
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    /// The prompt.
    pub prompt: Prompt,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// When to stop.
    pub stopping: StoppingRule,
    /// The caller's tenant (empty: none); the prefix cache is partitioned by it.
    pub tenant: String,
    /// What a lost replica already delivered (empty for a new generation).
    pub resume: Resume,
    /// The caller's deadline.
    pub deadline: Option<Instant>,
    /// When the request arrived.
    pub arrived: Instant,
}

impl GenerateJob {
    /// KV positions the job may hold at most, in whole blocks of `block_size`: its prompt plus every token it may
    /// generate. A job needing more than the whole pool could never finish and is refused at submission.
    pub fn kv_need(&self, block_size: usize) -> usize {
        (self.prompt.len() + self.stopping.max_new_tokens).div_ceil(block_size) * block_size
    }
}

/// A validated scoring request.
#[derive(Debug, Clone)]
pub struct ScoreJob {
    /// The shared context.
    pub context: Prompt,
    /// The candidate continuations (each non-empty).
    pub candidates: Vec<Vec<u32>>,
    /// The caller's tenant (empty: none); the prefix cache is partitioned by it.
    pub tenant: String,
    /// The caller's deadline.
    pub deadline: Option<Instant>,
    /// When the request arrived.
    pub arrived: Instant,
}

impl ScoreJob {
    /// KV positions the job may hold at most, in whole blocks of `block_size`: the context's blocks, and per
    /// candidate longer than one token a copy of the context's partial last block plus the fed candidate tokens
    /// (all but each candidate's last).
    pub fn kv_need(&self, block_size: usize) -> usize {
        let context = self.context.len();
        let runs: usize = self
            .candidates
            .iter()
            .filter(|candidate| candidate.len() > 1)
            .map(|candidate| {
                let partial = context % block_size;
                1 + (partial + candidate.len() - 1).div_ceil(block_size)
            })
            .sum();
        (context.div_ceil(block_size) + runs) * block_size
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt positions, image positions included.
    pub prompt_tokens: usize,
    /// Prompt positions filled by image embeddings.
    pub image_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

/// Where a request's time went.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Arrival to the first engine step that included the request.
    pub queue: Duration,
    /// The prefill step.
    pub prefill: Duration,
    /// Arrival to the first generated token.
    pub time_to_first_token: Duration,
    /// First to last generated token (for scoring: the candidate step).
    pub decode: Duration,
}

/// The end of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// Why it ended.
    pub reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
}

/// Tokens produced since the previous update and, in the last update, the finish.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateUpdate {
    /// New tokens, in order.
    pub tokens: Vec<SampledToken>,
    /// Present in the last update of a stream.
    pub finish: Option<Finish>,
}

/// One message of a generation stream: an update, or the error that ended it.
pub type GenerateEvent = Result<GenerateUpdate, RequestError>;

/// The score of one candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateScore {
    /// `log P(candidate[i] | context, candidate[..i])` per token.
    pub token_logprobs: Vec<f32>,
    /// Their sum.
    pub sum_logprob: f64,
    /// Their mean.
    pub mean_logprob: f64,
}

impl CandidateScore {
    /// Sums and averages per-token log-probabilities.
    pub fn from_logprobs(token_logprobs: Vec<f32>) -> Self {
        let sum_logprob: f64 = token_logprobs.iter().map(|&value| f64::from(value)).sum();
        let mean_logprob = if token_logprobs.is_empty() {
            0.0
        } else {
            sum_logprob / token_logprobs.len() as f64
        };
        Self {
            token_logprobs,
            sum_logprob,
            mean_logprob,
        }
    }
}

/// The result of a scoring request.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOutput {
    /// One per candidate, in request order.
    pub scores: Vec<CandidateScore>,
    /// Context positions.
    pub context_tokens: usize,
    /// Timings (`prefill`: the context step, `decode`: the candidate step).
    pub timings: Timings,
}

/// The engine's load at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineSnapshot {
    /// Requests in the running batch.
    pub running: usize,
    /// Requests waiting for admission.
    pub waiting: usize,
    /// Token positions per KV block.
    pub kv_block_size: usize,
    /// Blocks in the KV pool.
    pub kv_blocks_total: usize,
    /// Blocks held by admitted requests.
    pub kv_blocks_used: usize,
    /// Blocks registered in the prefix cache (held or not).
    pub kv_blocks_cached: usize,
    /// KV rows actually written now.
    pub kv_tokens_cached: usize,
    /// Preempted requests waiting to be recomputed.
    pub preempted: usize,
    /// Preemptions since start.
    pub preemptions_total: u64,
    /// Full prompt blocks looked up in the prefix cache since start.
    pub prefix_queried_blocks: u64,
    /// Of those, blocks found and reused.
    pub prefix_hit_blocks: u64,
    /// Requests removed because their client went away or their deadline passed, since start.
    pub cancelled_total: u64,
    /// Engine steps run since start.
    pub steps_total: u64,
    /// Tokens generated since start.
    pub generated_tokens_total: u64,
}
