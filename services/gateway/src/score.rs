//! Score: log-likelihoods of candidate continuations after a shared prompt. The prompt is prepared and its
//! images encoded as for Generate; each candidate's own tokens go to the decoder, which prefills the prompt
//! once and scores every candidate after it.

use std::sync::Arc;
use std::time::Instant;

use kosmos_proto::decoder::v1 as dec;
use kosmos_proto::v1 as pb;
use tracing::Instrument as _;

use crate::auth::Caller;
use crate::call::CallContext;
use crate::domain::validate_candidates;
use crate::error::RequestError;
use crate::generate::{RequestClock, encode_images, tokenize};
use crate::metrics::{Operation, Outcome};
use crate::pool::Pool;
use crate::prompt::{PrepareInput, decoder_segments};
use crate::state::{GatewayState, within};
use crate::upstream::ModelInfo;

/// Serves one Score request.
pub async fn score(
    state: Arc<GatewayState>,
    request: pb::ScoreRequest,
    clock: RequestClock,
    caller: Caller,
) -> Result<pb::ScoreResponse, RequestError> {
    let _permit = state.admit()?;
    let quota = state.admit_caller(&caller)?;
    let model = state.wait_model(clock.deadline).await?;
    tracing::info_span!("gateway.validate")
        .in_scope(|| validate_candidates(&request.candidates, &state.limits))?;
    let input = PrepareInput {
        segments: request.prompt,
        grounding: false,
        candidates: request.candidates.clone(),
    };
    let (prepared, tokenize_seconds) = tokenize(&state, &model, input, clock).await?;
    let candidate_tokens: usize = prepared.candidates.iter().map(Vec::len).sum();
    quota.charge(
        (prepared.encoded.len() + prepared.images.len() * model.num_image_tokens + candidate_tokens)
            as u64,
    );
    let (embeddings, encode_seconds) =
        encode_images(&state, &prepared, &model, clock, caller.tenant()).await?;
    let decoder_request = dec::ScoreRequest {
        tenant: caller.tenant().to_string(),
        context: decoder_segments(&prepared.encoded, &embeddings.tensors, &model.fingerprint),
        candidates: prepared
            .candidates
            .iter()
            .map(|ids| dec::Candidate { ids: ids.clone() })
            .collect(),
    };
    let answer = within(
        clock.deadline,
        "scoring",
        call_score(
            &state.upstreams.decoder,
            &model,
            decoder_request,
            clock.deadline,
            state.limits.max_message_bytes.get(),
        )
        .instrument(tracing::info_span!("gateway.decoder.score")),
    )
    .await?;
    if answer.scores.len() != request.candidates.len() {
        return Err(RequestError::Internal(format!(
            "the decoder scored {} candidates, {} were sent",
            answer.scores.len(),
            request.candidates.len()
        )));
    }
    let scores: Vec<pb::CandidateScore> = request
        .candidates
        .into_iter()
        .zip(prepared.candidates)
        .zip(answer.scores)
        .map(|((candidate, token_ids), score)| pb::CandidateScore {
            candidate,
            token_ids,
            token_logprobs: score.token_logprobs,
            sum_logprob: score.sum_logprob,
            mean_logprob: score.mean_logprob,
        })
        .collect();
    let best_index = scores
        .iter()
        .enumerate()
        .fold(None::<(usize, f64)>, |best, (index, score)| match best {
            Some((_, best_mean)) if best_mean >= score.mean_logprob => best,
            _ => Some((index, score.mean_logprob)),
        })
        .map_or(0, |(index, _)| index as u32);
    let decoder_timings = answer.timings.unwrap_or_default();
    let image_tokens = (prepared.images.len() * model.num_image_tokens) as u32;
    let candidate_tokens: usize = scores.iter().map(|score| score.token_ids.len()).sum();
    state.metrics.succeeded(&Outcome {
        operation: Operation::Score,
        arrived: clock.arrived,
        first_token_at: None,
        last_token_at: None,
        input_tokens: (prepared.encoded.input_ids.len() + candidate_tokens) as u32 - image_tokens,
        image_tokens,
        output_tokens: 0,
    });
    Ok(pb::ScoreResponse {
        scores,
        prompt_token_ids: prepared.encoded.input_ids,
        best_index,
        timings: Some(pb::Timings {
            tokenize_seconds,
            encode_seconds,
            queue_seconds: decoder_timings.queue_seconds,
            prefill_seconds: decoder_timings.prefill_seconds,
            total_seconds: clock.arrived.elapsed().as_secs_f64(),
            ..pb::Timings::default()
        }),
    })
}

/// One decoder Score through the pool's call policy (scoring has no side effects: any replica may retry it).
async fn call_score(
    pool: &Pool,
    model: &ModelInfo,
    request: dec::ScoreRequest,
    deadline: Option<Instant>,
    max_message_bytes: usize,
) -> Result<dec::ScoreResponse, RequestError> {
    let context = CallContext {
        stage: "scoring",
        subject: "refused by the decoder".into(),
        images: 0,
        model: Some(model.fingerprint.clone()),
    };
    let (response, mut call) = pool
        .call(&context, deadline, |channel, timeout| {
            let mut client = dec::decoder_client::DecoderClient::new(channel)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes);
            let mut wire = tonic::Request::new(request.clone());
            wire.set_timeout(timeout);
            async move { Ok(client.score(wire).await?.into_inner()) }
        })
        .await?;
    call.responded();
    Ok(response)
}
