//! Proto ↔ domain: wire requests become validated engine jobs (every error names the field and the limit), engine
//! results become wire responses.

use std::time::{Duration, Instant};

use kosmos_proto::decoder::v1 as pb;
use kosmos_proto::tensor::v1::DType as WireDType;

use crate::config::RequestLimits;
use crate::engine::{
    EngineSettings, EngineSnapshot, Finish, FinishReason, GenerateJob, GenerateUpdate, ModelInfo,
    Prompt, Resume, ScoreJob, ScoreOutput, StoppingRule, Timings,
};
use crate::error::RequestError;
use crate::sampling::{MAX_TOP_LOGPROBS, SampledToken, SamplingParams};

fn invalid(message: String) -> RequestError {
    RequestError::InvalidArgument(message)
}

/// Whether any segment carries an image embedding (their conversion is worth a blocking thread).
pub(crate) fn has_images(segments: &[pb::Segment]) -> bool {
    segments
        .iter()
        .any(|segment| matches!(segment.kind, Some(pb::segment::Kind::Image(_))))
}

/// Lays out `segments` (named `field` in errors) as a prompt: token ids as given, each image as
/// `num_image_tokens` placeholder positions carrying its embedding rows. Every embedding is checked (fingerprint,
/// dtype, shape, byte length, finite values) before a byte of it is read.
pub(crate) fn prompt(
    segments: &[pb::Segment],
    info: &ModelInfo,
    field: &str,
) -> Result<Prompt, RequestError> {
    let mut prompt = Prompt::default();
    let expected_shape = [info.num_image_tokens as u64, info.hidden_size as u64];
    for (segment, item) in segments.iter().enumerate() {
        match &item.kind {
            None => {
                return Err(invalid(format!(
                    "`{field}[{segment}]` has neither tokens nor an image"
                )));
            }
            Some(pb::segment::Kind::Tokens(tokens)) => {
                if let Some(&bad) = tokens
                    .ids
                    .iter()
                    .find(|&&id| id as usize >= info.vocab_size)
                {
                    return Err(invalid(format!(
                        "`{field}[{segment}].tokens.ids` contains {bad}, outside the vocabulary (size {})",
                        info.vocab_size
                    )));
                }
                prompt.ids.extend_from_slice(&tokens.ids);
                prompt
                    .image_mask
                    .extend(std::iter::repeat_n(false, tokens.ids.len()));
            }
            Some(pb::segment::Kind::Image(image)) => {
                if image.model_fingerprint != info.fingerprint {
                    return Err(RequestError::FingerprintMismatch {
                        segment,
                        expected: info.fingerprint.clone(),
                        found: image.model_fingerprint.clone(),
                    });
                }
                let tensor = image.embedding.as_ref().ok_or_else(|| {
                    invalid(format!(
                        "segment {segment}: `{field}[{segment}].image.embedding` is missing"
                    ))
                })?;
                let rows = kosmos_runtime::tensor::to_f32(tensor, Some(&expected_shape))
                    .map_err(|source| RequestError::InvalidEmbedding { segment, source })?;
                let first = info.image_placeholder_first_id;
                let step = u32::from(!info.image_placeholder_repeated);
                prompt
                    .ids
                    .extend((0..info.num_image_tokens as u32).map(|offset| first + step * offset));
                prompt
                    .image_mask
                    .extend(std::iter::repeat_n(true, info.num_image_tokens));
                prompt.image_rows.extend_from_slice(&rows);
                prompt.image_tokens += info.num_image_tokens;
            }
        }
    }
    if prompt.is_empty() {
        return Err(invalid(format!(
            "`{field}` must contain at least one token"
        )));
    }
    Ok(prompt)
}

fn sampling(wire: Option<&pb::SamplingParams>) -> Result<SamplingParams, RequestError> {
    let Some(wire) = wire else {
        return Ok(SamplingParams {
            seed: rand::random(),
            ..SamplingParams::default()
        });
    };
    if !wire.temperature.is_finite() || wire.temperature < 0.0 {
        return Err(invalid(format!(
            "`sampling.temperature` must be a number >= 0, got {}",
            wire.temperature
        )));
    }
    if !(0.0..=1.0).contains(&wire.top_p) {
        return Err(invalid(format!(
            "`sampling.top_p` must be in [0, 1], got {}",
            wire.top_p
        )));
    }
    if !wire.repetition_penalty.is_finite() || wire.repetition_penalty < 0.0 {
        return Err(invalid(format!(
            "`sampling.repetition_penalty` must be a number >= 0, got {}",
            wire.repetition_penalty
        )));
    }
    let top_logprobs = wire.top_logprobs as usize;
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(invalid(format!(
            "`sampling.top_logprobs` must be <= {MAX_TOP_LOGPROBS}, got {top_logprobs}"
        )));
    }
    Ok(SamplingParams {
        temperature: wire.temperature,
        top_k: wire.top_k as usize,
        // 0 and 1 both mean "no nucleus truncation".
        top_p: if wire.top_p == 0.0 { 1.0 } else { wire.top_p },
        repetition_penalty: if wire.repetition_penalty == 0.0 {
            1.0
        } else {
            wire.repetition_penalty
        },
        no_repeat_ngram_size: wire.no_repeat_ngram_size as usize,
        seed: wire.seed.unwrap_or_else(rand::random),
        top_logprobs,
    })
}

fn stopping(
    wire: Option<&pb::StoppingParams>,
    prompt_len: usize,
    info: &ModelInfo,
) -> Result<StoppingRule, RequestError> {
    let default = pb::StoppingParams::default();
    let wire = wire.unwrap_or(&default);
    let context = info.context_length;
    let requested = wire.max_new_tokens as usize;
    let (max_new_tokens, limit_reason) = if requested == 0 {
        if prompt_len >= context {
            return Err(invalid(format!(
                "the prompt ({prompt_len} tokens) leaves no room to generate in the context length ({context})"
            )));
        }
        (context - prompt_len, FinishReason::ContextLength)
    } else {
        if prompt_len + requested > context {
            return Err(invalid(format!(
                "prompt ({prompt_len} tokens) + `stopping.max_new_tokens` ({requested}) must be <= the context \
                 length ({context})"
            )));
        }
        (requested, FinishReason::Length)
    };
    if let Some(&bad) = wire
        .stop_token_ids
        .iter()
        .find(|&&id| id as usize >= info.vocab_size)
    {
        return Err(invalid(format!(
            "`stopping.stop_token_ids` contains {bad}, outside the vocabulary (size {})",
            info.vocab_size
        )));
    }
    Ok(StoppingRule {
        max_new_tokens,
        limit_reason,
        stop_token_ids: wire.stop_token_ids.clone(),
        eos_token_id: (!wire.ignore_eos).then_some(info.eos_token_id),
    })
}

/// A failover's resume: the delivered ids fit the vocabulary and leave at least one token to generate, and the
/// draws are possible (one per token) and reproducible (a seed is given).
fn resume(
    wire: &pb::Resume,
    sampling: Option<&pb::SamplingParams>,
    stopping: &StoppingRule,
    info: &ModelInfo,
) -> Result<Resume, RequestError> {
    let generated = wire.generated_ids.len();
    if generated >= stopping.max_new_tokens {
        return Err(invalid(format!(
            "`resume.generated_ids` holds {generated} tokens: it must hold fewer than the {} tokens the request \
             may generate",
            stopping.max_new_tokens
        )));
    }
    if let Some(&bad) = wire
        .generated_ids
        .iter()
        .find(|&&id| id as usize >= info.vocab_size)
    {
        return Err(invalid(format!(
            "`resume.generated_ids` contains {bad}, outside the vocabulary (size {})",
            info.vocab_size
        )));
    }
    if wire.random_draws > generated as u64 {
        return Err(invalid(format!(
            "`resume.random_draws` is {}: at most one draw per generated token ({generated})",
            wire.random_draws
        )));
    }
    if wire.random_draws > 0 && sampling.is_none_or(|sampling| sampling.seed.is_none()) {
        return Err(invalid(
            "`resume.random_draws` needs `sampling.seed`: only the same random stream continues a generation"
                .into(),
        ));
    }
    Ok(Resume {
        generated_ids: wire.generated_ids.clone(),
        random_draws: wire.random_draws,
    })
}

/// The longest tenant name accepted (the gateway's key ids are at most 64 characters).
const MAX_TENANT_BYTES: usize = 128;

fn tenant(wire: &str) -> Result<String, RequestError> {
    if wire.len() > MAX_TENANT_BYTES {
        return Err(invalid(format!(
            "`tenant` must be <= {MAX_TENANT_BYTES} bytes, got {}",
            wire.len()
        )));
    }
    Ok(wire.to_string())
}

/// A validated generation job.
pub(crate) fn generate_job(
    request: &pb::GenerateRequest,
    info: &ModelInfo,
    deadline: Option<Instant>,
    arrived: Instant,
) -> Result<GenerateJob, RequestError> {
    let prompt = prompt(&request.prompt, info, "prompt")?;
    let sampling = sampling(request.sampling.as_ref())?;
    let stopping = stopping(request.stopping.as_ref(), prompt.len(), info)?;
    let resume = match &request.resume {
        Some(wire) => resume(wire, request.sampling.as_ref(), &stopping, info)?,
        None => Resume::default(),
    };
    Ok(GenerateJob {
        prompt,
        sampling,
        stopping,
        resume,
        tenant: tenant(&request.tenant)?,
        deadline,
        arrived,
    })
}

/// A validated scoring job.
pub(crate) fn score_job(
    request: &pb::ScoreRequest,
    info: &ModelInfo,
    limits: &RequestLimits,
    deadline: Option<Instant>,
    arrived: Instant,
) -> Result<ScoreJob, RequestError> {
    let context = prompt(&request.context, info, "context")?;
    let max_candidates = limits.max_score_candidates.get();
    let count = request.candidates.len();
    if count == 0 {
        return Err(invalid(
            "`candidates` must contain at least one candidate".into(),
        ));
    }
    if count > max_candidates {
        return Err(invalid(format!(
            "`candidates` must hold <= {max_candidates} candidates, got {count}"
        )));
    }
    let max_tokens = limits.max_candidate_tokens.get();
    let mut candidates = Vec::with_capacity(count);
    for (index, candidate) in request.candidates.iter().enumerate() {
        let len = candidate.ids.len();
        if len == 0 {
            return Err(invalid(format!(
                "`candidates[{index}].ids` must not be empty"
            )));
        }
        if len > max_tokens {
            return Err(invalid(format!(
                "`candidates[{index}].ids` must hold <= {max_tokens} tokens, got {len}"
            )));
        }
        if context.len() + len > info.context_length {
            return Err(invalid(format!(
                "context ({} tokens) + `candidates[{index}]` ({len} tokens) must be <= the context length ({})",
                context.len(),
                info.context_length
            )));
        }
        if let Some(&bad) = candidate
            .ids
            .iter()
            .find(|&&id| id as usize >= info.vocab_size)
        {
            return Err(invalid(format!(
                "`candidates[{index}].ids` contains {bad}, outside the vocabulary (size {})",
                info.vocab_size
            )));
        }
        candidates.push(candidate.ids.clone());
    }
    Ok(ScoreJob {
        context,
        candidates,
        tenant: tenant(&request.tenant)?,
        deadline,
        arrived,
    })
}

impl From<SampledToken> for pb::Token {
    fn from(token: SampledToken) -> Self {
        Self {
            id: token.id,
            logprob: token.logprob,
            top_logprobs: token
                .top_logprobs
                .into_iter()
                .map(|(id, logprob)| pb::TopLogprob { id, logprob })
                .collect(),
        }
    }
}

impl From<FinishReason> for pb::FinishReason {
    fn from(reason: FinishReason) -> Self {
        match reason {
            FinishReason::Length => Self::Length,
            FinishReason::Eos => Self::Eos,
            FinishReason::StopToken => Self::StopToken,
            FinishReason::ContextLength => Self::ContextLength,
        }
    }
}

impl From<Timings> for pb::Timings {
    fn from(timings: Timings) -> Self {
        Self {
            queue_seconds: timings.queue.as_secs_f64(),
            prefill_seconds: timings.prefill.as_secs_f64(),
            time_to_first_token_seconds: timings.time_to_first_token.as_secs_f64(),
            decode_seconds: timings.decode.as_secs_f64(),
        }
    }
}

fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

impl From<Finish> for pb::Finish {
    fn from(finish: Finish) -> Self {
        Self {
            reason: pb::FinishReason::from(finish.reason) as i32,
            usage: Some(pb::Usage {
                prompt_tokens: saturating_u32(finish.usage.prompt_tokens),
                image_tokens: saturating_u32(finish.usage.image_tokens),
                completion_tokens: saturating_u32(finish.usage.completion_tokens),
            }),
            timings: Some(finish.timings.into()),
        }
    }
}

impl From<GenerateUpdate> for pb::GenerateResponse {
    fn from(update: GenerateUpdate) -> Self {
        Self {
            tokens: update.tokens.into_iter().map(pb::Token::from).collect(),
            finish: update.finish.map(pb::Finish::from),
        }
    }
}

impl From<ScoreOutput> for pb::ScoreResponse {
    fn from(output: ScoreOutput) -> Self {
        Self {
            scores: output
                .scores
                .into_iter()
                .map(|score| pb::CandidateScore {
                    token_logprobs: score.token_logprobs,
                    sum_logprob: score.sum_logprob,
                    mean_logprob: score.mean_logprob,
                })
                .collect(),
            context_tokens: saturating_u32(output.context_tokens),
            timings: Some(output.timings.into()),
        }
    }
}

fn wire_dtype(dtype: kosmos_model::DType) -> WireDType {
    match dtype {
        kosmos_model::DType::F32 => WireDType::DtypeF32,
        kosmos_model::DType::F16 => WireDType::DtypeF16,
        kosmos_model::DType::BF16 => WireDType::DtypeBf16,
        // The loader only produces the three float types above.
        _ => WireDType::DtypeUnspecified,
    }
}

/// The `Info` response for a model, its scheduler limits and the current load.
pub(crate) fn info_response(
    info: &ModelInfo,
    settings: &EngineSettings,
    snapshot: &EngineSnapshot,
) -> pb::InfoResponse {
    let block_size = snapshot.kv_block_size;
    pb::InfoResponse {
        model_fingerprint: info.fingerprint.clone(),
        context_length: saturating_u32(info.context_length),
        vocab_size: saturating_u32(info.vocab_size),
        num_image_tokens: saturating_u32(info.num_image_tokens),
        hidden_size: saturating_u32(info.hidden_size),
        image_placeholder_first_id: info.image_placeholder_first_id,
        image_placeholder_repeated: info.image_placeholder_repeated,
        family: info.family.to_string(),
        bos_token_id: info.bos_token_id,
        eos_token_id: info.eos_token_id,
        pad_token_id: info.pad_token_id,
        max_running_sequences: saturating_u32(settings.max_running_sequences.get()),
        kv_token_budget: (snapshot.kv_blocks_total * block_size) as u64,
        max_waiting_requests: saturating_u32(settings.max_waiting_requests.get()),
        running_sequences: saturating_u32(snapshot.running),
        waiting_requests: saturating_u32(snapshot.waiting),
        kv_tokens_in_use: (snapshot.kv_blocks_used * block_size) as u64,
        kv_usage_ratio: if snapshot.kv_blocks_total == 0 {
            0.0
        } else {
            snapshot.kv_blocks_used as f64 / snapshot.kv_blocks_total as f64
        },
        device: info.device.clone(),
        weights_dtype: wire_dtype(info.dtype) as i32,
        kv_cache_dtype: wire_dtype(settings.kv_cache_dtype.unwrap_or(info.dtype)) as i32,
        kv_tokens_cached: snapshot.kv_tokens_cached as u64,
        cancelled_total: snapshot.cancelled_total,
        kv_block_size: saturating_u32(block_size),
        kv_blocks_total: snapshot.kv_blocks_total as u64,
        kv_blocks_used: snapshot.kv_blocks_used as u64,
        kv_blocks_cached: snapshot.kv_blocks_cached as u64,
        preemptions_total: snapshot.preemptions_total,
        preempted_requests: saturating_u32(snapshot.preempted),
        prefix_cache_queries_total: snapshot.prefix_queried_blocks,
        prefix_cache_hits_total: snapshot.prefix_hit_blocks,
    }
}

/// How long until `deadline`, zero when it has passed.
pub(crate) fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod fuzz;
