//! One generation: admit, validate, tokenize, encode the images, open the decoder stream, then turn decoder
//! messages into public stream messages (incremental text, stop strings, finish, usage, timings, grounding).
//!
//! `Generate` and `GenerateStream` share this code: the unary call folds the stream messages (see
//! [`collect`]), so a streamed generation always concatenates to the unary result.
//!
//! **Failover.** A generation keeps its decoder request (prompt segments with their image embeddings), the ids
//! delivered so far and its seed. When the decoder stream breaks before its finish (the replica died, was cut off,
//! or failed the sequence), the generation resumes on another replica: the same request plus
//! `resume { generated_ids, random_draws }`, which the decoder prefills and continues exactly (the random stream is
//! positioned after the draws already made, one per sampled token). A sampling request without a seed gets one
//! here, returned in the last message, so that a resumed run is the run the caller would have had. The caller sees
//! one stream: no gap, no repeat, no error, each token counted once. At most `limits.max_resumptions` resumptions
//! per request, within its deadline; a refusal (INVALID_ARGUMENT) or a passed deadline is not resumed. The
//! embeddings stay in memory for the stream's life (bounded by `limits.max_concurrent_requests` ×
//! `limits.max_images`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kosmos_processor::{OcrLine, OcrStream, PageGeometry, post_process_generation};
use kosmos_proto::decoder::v1 as dec;
use kosmos_proto::v1 as pb;
use tokio::sync::OwnedSemaphorePermit;
use tonic::Code;
use tracing::Instrument as _;

use crate::auth::{Caller, QuotaPermit};
use crate::call::{CallContext, Verdict, classify};
use crate::domain::{ValidParams, validate_params};
use crate::encode::Embeddings;
use crate::error::RequestError;
use crate::metrics::{Operation, Outcome};
use crate::pool::{CallGuard, Pool};
use crate::prompt::{PrepareInput, PreparedPrompt, decoder_segments, prepare};
use crate::state::{GatewayState, within};
use crate::text::{Detokenizer, StopFilter};
use crate::upstream::ModelInfo;

/// How long a finished decoder stream's trailers are awaited in the background before the stream is dropped.
const FINISHED_STREAM_TRAILERS: Duration = Duration::from_secs(5);

/// When a request arrived and when it must be answered.
#[derive(Debug, Clone, Copy)]
pub struct RequestClock {
    /// Arrival at the gateway.
    pub arrived: Instant,
    /// The caller's deadline, if any.
    pub deadline: Option<Instant>,
}

/// A generation in progress: the decoder stream and what is needed to turn it into public messages. Dropping it
/// drops the decoder stream, which frees the sequence's decoder slot.
#[derive(Debug)]
pub struct Generation {
    state: Arc<GatewayState>,
    stream: Option<tonic::Streaming<dec::GenerateResponse>>,
    call: Option<CallGuard>,
    /// The request as first sent: what a resumption sends again, with the ids delivered so far.
    decoder_request: dec::GenerateRequest,
    /// Every id the decoder delivered, in order.
    generated_ids: Vec<u32>,
    /// Whether each token costs one random draw (temperature > 0).
    sampled: bool,
    /// The seed of the request's random stream (0 for greedy decoding without a seed).
    seed: u64,
    /// Resumptions so far.
    resumptions: u32,
    _permit: OwnedSemaphorePermit,
    quota: QuotaPermit,
    clock: RequestClock,
    model: Arc<ModelInfo>,
    grounding: bool,
    /// Kosmos-2.5 `<ocr>`: the lines of the answer as they complete, and the page they map back to.
    ocr: Option<(OcrStream, PageGeometry)>,
    logprobs: bool,
    capped_by_context: bool,
    prompt_ids: Vec<u32>,
    image_tokens: u32,
    image_sizes: Vec<(u32, u32)>,
    detokenizer: Detokenizer,
    stop: StopFilter,
    completion_tokens: u32,
    tokenize_seconds: f64,
    encode_seconds: f64,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    done: bool,
}

/// Starts a generation: everything up to an open decoder stream, so that bad input and unavailable pools fail
/// the call before any message is sent.
pub async fn start(
    state: Arc<GatewayState>,
    request: pb::GenerateRequest,
    clock: RequestClock,
    caller: Caller,
) -> Result<Generation, RequestError> {
    let permit = state.admit()?;
    let quota = state.admit_caller(&caller)?;
    let model = state.wait_model(clock.deadline).await?;
    let params = tracing::info_span!("gateway.validate")
        .in_scope(|| validate_params(request.params, &state.limits, model.vocab_size))?;
    let asks_ocr = model.reads_pages()
        && request.prompt.iter().any(|segment| {
            matches!(&segment.kind, Some(pb::segment::Kind::Text(text)) if text.trim_start().starts_with("<ocr>"))
        });
    let input = PrepareInput {
        segments: request.prompt,
        grounding: request.grounding,
        candidates: Vec::new(),
    };
    let (prepared, tokenize_seconds) = tokenize(&state, &model, input, clock).await?;
    // The page as the encoder resizes it, for the boxes of an `<ocr>` answer.
    let ocr = match (&state.pages, prepared.images.first()) {
        (Some(pages), Some(image)) if asks_ocr => {
            let (rows, cols) = pages.grid((image.height, image.width));
            let resized = (
                (cols as u32).saturating_mul(pages.patch_width),
                (rows as u32).saturating_mul(pages.patch_height),
            );
            Some((
                OcrStream::default(),
                PageGeometry {
                    resized,
                    original: (image.width, image.height),
                },
            ))
        }
        _ => None,
    };
    quota.charge((prepared.encoded.len() + prepared.images.len() * model.num_image_tokens) as u64);
    let prompt_len = prepared.encoded.len();
    let (max_new_tokens, capped_by_context) = max_new_tokens(&params, prompt_len, &model, &state)?;

    let (embeddings, encode_seconds) =
        encode_images(&state, &prepared, &model, clock, caller.tenant()).await?;

    // A sampled generation always runs on a known seed, so that a resumption on another replica continues the
    // same random stream.
    let sampled = params.temperature > 0.0;
    let seed = match params.seed {
        Some(seed) => Some(seed),
        None if sampled => Some(rand::random::<u64>().max(1)),
        None => None,
    };

    let decoder_request = dec::GenerateRequest {
        resume: None,
        tenant: caller.tenant().to_string(),
        prompt: decoder_segments(&prepared.encoded, &embeddings.tensors, &model.fingerprint),
        sampling: Some(dec::SamplingParams {
            seed,
            ..sampling(&params)
        }),
        stopping: Some(dec::StoppingParams {
            max_new_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }),
    };
    let (stream, call) = within(
        clock.deadline,
        "waiting for the decoder",
        open_stream(
            &state.upstreams.decoder,
            &model,
            decoder_request.clone(),
            clock.deadline,
            state.limits.max_message_bytes.get(),
        )
        .instrument(tracing::info_span!("gateway.decoder.open")),
    )
    .await?;
    Ok(Generation {
        decoder_request,
        generated_ids: Vec::new(),
        sampled,
        seed: seed.unwrap_or(0),
        resumptions: 0,
        grounding: request.grounding,
        ocr,
        logprobs: params.logprobs > 0,
        capped_by_context,
        image_tokens: (prepared.images.len() * model.num_image_tokens) as u32,
        image_sizes: prepared
            .images
            .iter()
            .map(|image| (image.width, image.height))
            .collect(),
        prompt_ids: prepared.encoded.input_ids,
        stop: StopFilter::new(params.stop),
        detokenizer: Detokenizer::new(),
        stream: Some(stream),
        call: Some(call),
        _permit: permit,
        quota,
        clock,
        model,
        state,
        completion_tokens: 0,
        tokenize_seconds,
        encode_seconds,
        first_token_at: None,
        last_token_at: None,
        done: false,
    })
}

/// Tokenizes a request's prompt and checks its images (on the blocking pool, span `gateway.tokenize`) within the
/// caller's deadline; returns the prompt and the seconds it took.
pub(crate) async fn tokenize(
    state: &GatewayState,
    model: &Arc<ModelInfo>,
    input: PrepareInput,
    clock: RequestClock,
) -> Result<(PreparedPrompt, f64), RequestError> {
    let started = Instant::now();
    let prepared = within(
        clock.deadline,
        "tokenizing the prompt",
        prepare(
            state.tokenizer.clone(),
            state.limits.clone(),
            model.clone(),
            input,
        )
        .instrument(tracing::info_span!("gateway.tokenize")),
    )
    .await?;
    Ok((prepared, started.elapsed().as_secs_f64()))
}

/// The embeddings of a prompt's images (cache, then the encoder pool; span `gateway.images`) within the caller's
/// deadline; returns them and the seconds it took.
pub(crate) async fn encode_images(
    state: &GatewayState,
    prepared: &PreparedPrompt,
    model: &ModelInfo,
    clock: RequestClock,
    tenant: &str,
) -> Result<(Embeddings, f64), RequestError> {
    let started = Instant::now();
    let embeddings = within(
        clock.deadline,
        "encoding the images",
        state
            .encoder
            .embeddings(&prepared.images, model, clock.deadline, tenant)
            .instrument(tracing::info_span!(
                "gateway.images",
                images = prepared.images.len()
            )),
    )
    .await?;
    Ok((embeddings, started.elapsed().as_secs_f64()))
}

/// The caller's max_new_tokens, or the default reduced to what fits; and whether the context is what bounds it.
fn max_new_tokens(
    params: &ValidParams,
    prompt_len: usize,
    model: &ModelInfo,
    state: &GatewayState,
) -> Result<(u32, bool), RequestError> {
    let room = model.context_length.saturating_sub(prompt_len);
    match params.max_new_tokens {
        Some(requested) => {
            if prompt_len + requested as usize > model.context_length {
                return Err(RequestError::invalid(format!(
                    "`params.max_new_tokens` is {requested}, above the {room} tokens the prompt ({prompt_len} \
                     tokens) leaves in the model's context length ({})",
                    model.context_length
                )));
            }
            Ok((requested, false))
        }
        None => {
            let default = if model.reads_pages() {
                state.limits.default_max_new_tokens_pages
            } else {
                state.limits.default_max_new_tokens
            } as usize;
            Ok((default.min(room) as u32, room < default))
        }
    }
}

fn sampling(params: &ValidParams) -> dec::SamplingParams {
    dec::SamplingParams {
        temperature: params.temperature,
        top_p: params.top_p,
        top_k: params.top_k,
        repetition_penalty: params.repetition_penalty,
        no_repeat_ngram_size: params.no_repeat_ngram_size,
        seed: params.seed,
        top_logprobs: params.logprobs,
    }
}

/// Opens a decoder stream, trying another replica while none has answered.
async fn open_stream(
    pool: &Pool,
    model: &ModelInfo,
    request: dec::GenerateRequest,
    deadline: Option<Instant>,
    max_message_bytes: usize,
) -> Result<(tonic::Streaming<dec::GenerateResponse>, CallGuard), RequestError> {
    let context = CallContext {
        stage: "waiting for the decoder",
        subject: "refused by the decoder".into(),
        images: 0,
        model: Some(model.fingerprint.clone()),
    };
    pool.call(&context, deadline, |channel, timeout| {
        let mut client = dec::decoder_client::DecoderClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let mut wire = tonic::Request::new(request.clone());
        wire.set_timeout(timeout);
        async move { Ok(client.generate(wire).await?.into_inner()) }
    })
    .await
}

fn finish_reason(reason: i32, capped_by_context: bool) -> pb::FinishReason {
    match dec::FinishReason::try_from(reason) {
        Ok(dec::FinishReason::Length) if capped_by_context => pb::FinishReason::ContextLength,
        Ok(dec::FinishReason::Length) => pb::FinishReason::Length,
        Ok(dec::FinishReason::Eos | dec::FinishReason::StopToken) => pb::FinishReason::Eos,
        Ok(dec::FinishReason::ContextLength) => pb::FinishReason::ContextLength,
        Ok(dec::FinishReason::Unspecified) | Err(_) => {
            tracing::warn!(
                reason,
                "decoder finished without a known reason, reporting length"
            );
            pb::FinishReason::Length
        }
    }
}

impl Generation {
    /// `(width, height)` of each image of the prompt, in order, as read from its header (what grounding boxes
    /// are scaled by to give pixels).
    pub fn image_sizes(&self) -> &[(u32, u32)] {
        &self.image_sizes
    }

    /// The next public message; `None` after the last one. Each decoder message gives at most one public message.
    pub async fn next(&mut self) -> Result<Option<pb::GenerateStreamResponse>, RequestError> {
        if self.done {
            return Ok(None);
        }
        let deadline = self.clock.deadline;
        loop {
            let Some(stream) = self.stream.as_mut() else {
                return Ok(None);
            };
            let received = match deadline {
                None => stream.message().await,
                Some(at) => match tokio::time::timeout_at(at.into(), stream.message()).await {
                    Ok(received) => received,
                    Err(_) => {
                        self.end_stream();
                        return Err(RequestError::DeadlineExceeded("generating"));
                    }
                },
            };
            let message = match received {
                Ok(Some(message)) => message,
                Ok(None) => {
                    let ended =
                        tonic::Status::unavailable("the decoder stream ended without a finish");
                    self.stream_broke(&ended).await?;
                    continue;
                }
                Err(status) => {
                    self.stream_broke(&status).await?;
                    continue;
                }
            };
            if let Some(call) = self.call.as_mut() {
                call.responded();
            }
            self.quota.charge(message.tokens.len() as u64);
            let mut out = pb::GenerateStreamResponse::default();
            let mut stopped = false;
            for token in message.tokens {
                let now = Instant::now();
                self.first_token_at.get_or_insert(now);
                self.last_token_at = Some(now);
                self.completion_tokens += 1;
                self.generated_ids.push(token.id);
                let raw = self.detokenizer.push(&self.state.tokenizer, token.id);
                let released = self.stop.push(&raw);
                out.text.push_str(&released.text);
                out.tokens.push(self.public_token(&token, released.text));
                if released.stopped {
                    stopped = true;
                    break;
                }
            }
            self.push_lines(&mut out);
            if stopped {
                // Dropping the decoder stream now frees the sequence's slot at the decoder's next step.
                self.end_stream();
                self.finish(&mut out, pb::FinishReason::StopSequence, None);
                return Ok(Some(out));
            }
            if let Some(finish) = message.finish {
                self.end_finished_stream();
                let tail = self.detokenizer.finish(&self.state.tokenizer);
                let released = self.stop.push(&tail);
                let text_before = out.text.len();
                out.text.push_str(&released.text);
                if released.stopped {
                    self.push_lines_from(&mut out, text_before);
                    self.finish(&mut out, pb::FinishReason::StopSequence, Some(&finish));
                } else {
                    out.text.push_str(&self.stop.flush());
                    self.push_lines_from(&mut out, text_before);
                    let reason = finish_reason(finish.reason, self.capped_by_context);
                    self.finish(&mut out, reason, Some(&finish));
                }
                return Ok(Some(out));
            }
            if !out.tokens.is_empty() {
                return Ok(Some(out));
            }
        }
    }

    fn public_token(&self, token: &dec::Token, text: String) -> pb::Token {
        let tokenizer = &self.state.tokenizer;
        let special = tokenizer.special_ids();
        let top_logprobs = if self.logprobs {
            token
                .top_logprobs
                .iter()
                .map(|top| pb::TopLogprob {
                    id: top.id,
                    text: tokenizer.decode(&[top.id], false).unwrap_or_default(),
                    logprob: top.logprob,
                })
                .collect()
        } else {
            Vec::new()
        };
        pb::Token {
            id: token.id,
            text,
            logprob: token.logprob,
            top_logprobs,
            special: [special.bos, special.eos, special.pad].contains(&token.id),
        }
    }

    /// The decoder stream broke with `status` before its finish: resumes the generation on another replica, or
    /// returns the error that ends the call (a refusal, a passed deadline, `limits.max_resumptions` spent, or no
    /// replica took the resume).
    async fn stream_broke(&mut self, status: &tonic::Status) -> Result<(), RequestError> {
        let error = self.stream_error(status);
        let replica = self
            .call
            .as_ref()
            .map(|call| call.replica().address().to_string());
        self.end_stream();
        let resumable =
            status.code() != Code::DeadlineExceeded && classify(status.code()) != Verdict::Final;
        if !resumable {
            return Err(error);
        }
        let metrics = &self.state.metrics;
        if self.resumptions >= self.state.limits.max_resumptions {
            metrics.decoder_stream_broke(false);
            tracing::warn!(
                resumptions = self.resumptions,
                "decoder stream broke and `limits.max_resumptions` is spent"
            );
            return Err(error);
        }
        self.resumptions += 1;
        let delivered = self.generated_ids.len();
        tracing::warn!(
            replica,
            code = ?status.code(),
            message = status.message(),
            delivered,
            resumption = self.resumptions,
            "decoder stream broke, resuming the generation on another replica"
        );
        let request = dec::GenerateRequest {
            resume: Some(dec::Resume {
                generated_ids: self.generated_ids.clone(),
                random_draws: if self.sampled { delivered as u64 } else { 0 },
            }),
            ..self.decoder_request.clone()
        };
        let deadline = self.clock.deadline;
        let opened = within(
            deadline,
            "waiting for the decoder",
            open_stream(
                &self.state.upstreams.decoder,
                &self.model,
                request,
                deadline,
                self.state.limits.max_message_bytes.get(),
            )
            .instrument(tracing::info_span!("gateway.decoder.resume", delivered)),
        )
        .await;
        match opened {
            Ok((stream, call)) => {
                metrics.decoder_stream_broke(true);
                self.stream = Some(stream);
                self.call = Some(call);
                Ok(())
            }
            Err(resume_error) => {
                metrics.decoder_stream_broke(false);
                tracing::warn!(%resume_error, "no decoder took the resumption");
                Err(resume_error)
            }
        }
    }

    fn stream_error(&self, status: &tonic::Status) -> RequestError {
        if status.code() == Code::DeadlineExceeded {
            return RequestError::DeadlineExceeded("generating");
        }
        if let Some(call) = &self.call {
            call.failed(matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Internal
            ));
        }
        RequestError::Unavailable {
            pool: "decoder",
            message: format!(
                "the decoder stream failed: {:?}: {}",
                status.code(),
                status.message()
            ),
        }
    }

    /// `<ocr>`: the lines completed by this message's text.
    fn push_lines(&mut self, out: &mut pb::GenerateStreamResponse) {
        self.push_lines_from(out, 0);
    }

    /// `<ocr>`: the lines completed by `out.text[from..]`.
    fn push_lines_from(&mut self, out: &mut pb::GenerateStreamResponse, from: usize) {
        if let Some((stream, page)) = self.ocr.as_mut() {
            let page = *page;
            out.lines.extend(
                stream
                    .push(&out.text[from..])
                    .iter()
                    .map(|line| wire_line(line, page)),
            );
        }
    }

    fn end_stream(&mut self) {
        self.stream = None;
        self.call = None;
    }

    /// Ends a decoder stream whose finish arrived. Its trailers (status OK) follow at once; they are read in the
    /// background, so the caller's last message waits for nothing, and the decoder counts the call as OK. Dropping
    /// the stream unread could reset it before the decoder passed its trailers, which the decoder counts as
    /// CANCELLED.
    fn end_finished_stream(&mut self) {
        if let Some(mut stream) = self.stream.take() {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(FINISHED_STREAM_TRAILERS, stream.trailers()).await;
            });
        }
        self.end_stream();
    }

    fn finish(
        &mut self,
        out: &mut pb::GenerateStreamResponse,
        reason: pb::FinishReason,
        decoder_finish: Option<&dec::Finish>,
    ) {
        self.done = true;
        self.state.metrics.succeeded(&Outcome {
            operation: Operation::TextCompletion,
            arrived: self.clock.arrived,
            first_token_at: self.first_token_at,
            last_token_at: self.last_token_at,
            input_tokens: (self.prompt_ids.len() as u32).saturating_sub(self.image_tokens),
            image_tokens: self.image_tokens,
            output_tokens: self.completion_tokens,
        });
        let now = Instant::now();
        let decoder_timings = decoder_finish.and_then(|finish| finish.timings.as_ref());
        out.finish_reason = reason as i32;
        out.seed = self.seed;
        out.usage = Some(pb::Usage {
            prompt_tokens: self.prompt_ids.len() as u32,
            image_tokens: self.image_tokens,
            completion_tokens: self.completion_tokens,
        });
        out.timings = Some(pb::Timings {
            tokenize_seconds: self.tokenize_seconds,
            encode_seconds: self.encode_seconds,
            queue_seconds: decoder_timings.map_or(0.0, |t| t.queue_seconds),
            prefill_seconds: decoder_timings.map_or(0.0, |t| t.prefill_seconds),
            time_to_first_token_seconds: self
                .first_token_at
                .map_or(0.0, |at| (at - self.clock.arrived).as_secs_f64()),
            decode_seconds: match (self.first_token_at, self.last_token_at) {
                (Some(first), Some(last)) => (last - first).as_secs_f64(),
                _ => 0.0,
            },
            total_seconds: (now - self.clock.arrived).as_secs_f64(),
        });
        out.prompt_token_ids = std::mem::take(&mut self.prompt_ids);
        if let Some((stream, page)) = self.ocr.take() {
            out.lines
                .extend(stream.finish().map(|line| wire_line(&line, page)));
        }
        if self.grounding {
            let (clean_text, entities) = post_process_generation(self.stop.released_text());
            out.clean_text = clean_text;
            out.entities = entities
                .into_iter()
                .map(|entity| pb::Entity {
                    phrase: entity.phrase,
                    span: Some(pb::Span {
                        start: entity.span.0 as u32,
                        end: entity.span.1 as u32,
                    }),
                    boxes: entity
                        .boxes
                        .into_iter()
                        .map(|[x1, y1, x2, y2]| pb::Box { x1, y1, x2, y2 })
                        .collect(),
                })
                .collect();
        }
        tracing::debug!(
            finish = ?reason,
            completion_tokens = self.completion_tokens,
            model = %self.model.fingerprint,
            "generation finished"
        );
    }
}

mod deliver;

pub use deliver::{collect, forward};

/// An `<ocr>` line on the wire: its box normalised to the page and in the image's pixels.
fn wire_line(line: &OcrLine, page: PageGeometry) -> pb::TextLine {
    let wire = |[x1, y1, x2, y2]: [f32; 4]| pb::Box { x1, y1, x2, y2 };
    pb::TextLine {
        text: line.text.clone(),
        r#box: line.box_normalized(page).map(wire),
        box_px: line.box_px(page).map(wire),
    }
}
