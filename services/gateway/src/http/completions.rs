//! `POST /v1/chat/completions`, `POST /v1/completions` and `POST /v1/score`: parse, convert to the gRPC request,
//! run the shared pipeline, answer in OpenAI's JSON (or SSE). Failures of the pipeline are counted in the request
//! metrics as the gRPC service counts them.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use kosmos_proto::v1 as pb;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument as _;

use super::convert::{self, PromptField, read_segments};
use super::error::{ApiError, FieldNames};
use super::images::ImageSources;
use super::response::{Answer, ChunkWriter, Shape};
use super::wire::RequestBody;
use super::{HttpApi, caller, unix_now};
use crate::error::RequestError;
use crate::generate::{self, RequestClock};
use crate::metrics::Operation;
use crate::score as score_pipeline;

/// The server span of one HTTP request, continuing the caller's `traceparent`.
fn request_span(route: &'static str, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "http.server",
        otel.name = %format!("POST {route}"),
        otel.kind = "server",
        http.request.method = "POST",
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        caller = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    kosmos_runtime::telemetry::continue_trace(&span, headers);
    span
}

/// The body, or 413 when it is over the limit, or 429 when the byte budget could not take it as it arrived.
fn body_of(body: Result<Bytes, BytesRejection>) -> Result<RequestBody, ApiError> {
    let rejection = match body {
        Ok(bytes) => return RequestBody::parse(&bytes),
        Err(rejection) => rejection,
    };
    if let Some(over) = over_budget_in(&rejection) {
        return Err(super::over_budget(over));
    }
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return Err(ApiError::too_large(format!(
            "the request body is over the limit ({}); the limit is `grpc.max_message_bytes` × 4/3 (base64 images)",
            rejection.body_text()
        )));
    }
    Err(ApiError::bad_request(format!(
        "the request body could not be read: {}",
        rejection.body_text()
    )))
}

/// The budget refusal a body-read failure carries, if it is one (somewhere in its source chain).
fn over_budget_in(rejection: &BytesRejection) -> Option<&kosmos_runtime::budget::OverBudget> {
    let mut source: Option<&(dyn std::error::Error + 'static)> =
        std::error::Error::source(rejection);
    while let Some(err) = source {
        if let Some(over) = err.downcast_ref::<kosmos_runtime::budget::OverBudget>() {
            return Some(over);
        }
        source = err.source();
    }
    None
}

/// Runs a handler's work in its span and records the status.
async fn serve(
    span: tracing::Span,
    work: impl Future<Output = Result<Response, ApiError>>,
) -> Response {
    let response = work
        .instrument(span.clone())
        .await
        .unwrap_or_else(IntoResponse::into_response);
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// What a request's prompt became on the gRPC wire, with the JSON names of its fields.
async fn read_prompt(
    api: &HttpApi,
    body: &mut RequestBody,
    field: PromptField,
    clock: RequestClock,
) -> Result<(Vec<pb::Segment>, FieldNames), ApiError> {
    let prompt = convert::prompt_segments(body, field, api.template.as_ref())?;
    let sources = ImageSources {
        fetch: api.config.fetch.clone(),
        max_image_bytes: api.state.limits.max_image_bytes,
        tls: Arc::clone(&api.fetch_tls),
    };
    let reading = read_segments(prompt, &sources);
    let (segments, mut names) = match clock.deadline {
        None => reading.await?,
        Some(deadline) => tokio::time::timeout_at(deadline.into(), reading)
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::deadline(
                    "deadline exceeded while reading the images (`http.request_timeout_seconds`)",
                ))
            })?,
    };
    if body.max_completion_tokens.is_some() {
        names.max_new_tokens = "max_completion_tokens";
    }
    Ok((segments, names))
}

/// The pipeline's error as an API error, counted in the request metrics.
fn failed(
    api: &HttpApi,
    operation: Operation,
    clock: RequestClock,
    names: &FieldNames,
    err: RequestError,
) -> ApiError {
    api.state
        .metrics
        .failed(operation, clock.arrived, err.code());
    ApiError::from_request(&err, names)
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat(
    State(api): State<Arc<HttpApi>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = request_span("/v1/chat/completions", &headers);
    serve(
        span.clone(),
        complete(api, headers, body, Shape::Chat, span),
    )
    .await
}

/// `POST /v1/completions`.
pub(super) async fn text(
    State(api): State<Arc<HttpApi>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = request_span("/v1/completions", &headers);
    serve(
        span.clone(),
        complete(api, headers, body, Shape::Text, span),
    )
    .await
}

async fn complete(
    api: Arc<HttpApi>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    shape: Shape,
    span: tracing::Span,
) -> Result<Response, ApiError> {
    let caller = caller(&api.state, &headers)?;
    span.record("caller", caller.name());
    let mut body = body_of(body)?;
    api.check_model(body.model.as_deref())?;
    body.refuse_unsupported()?;
    let params = convert::generation_params(&body, shape == Shape::Chat)?;
    let clock = api.clock();
    let field = match shape {
        Shape::Chat => PromptField::Messages,
        Shape::Text => PromptField::Prompt,
    };
    let (prompt, names) = read_prompt(&api, &mut body, field, clock).await?;
    let grounding = body.grounding.unwrap_or(false);
    let request = pb::GenerateRequest {
        prompt,
        params: Some(params),
        grounding,
    };
    let operation = Operation::TextCompletion;
    let generation = generate::start(Arc::clone(&api.state), request, clock, caller)
        .await
        .map_err(|err| failed(&api, operation, clock, &names, err))?;
    let fingerprint = api
        .state
        .model()
        .map(|model| model.fingerprint.to_string())
        .unwrap_or_default();
    let answer = Answer {
        shape,
        id: format!(
            "{}-{:032x}",
            if shape == Shape::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u128>()
        ),
        created: unix_now(),
        model: api.model_id.clone(),
        fingerprint,
        tokenizer: Arc::clone(&api.state.tokenizer),
        logprobs: convert::wants_logprobs(&body),
        grounding,
        image_size: generation.image_sizes().first().copied(),
    };
    if body.streams() {
        let (sender, receiver) = mpsc::channel(api.state.stream_buffer_messages);
        let mut writer = ChunkWriter::new(answer, names, body.include_usage());
        let forward = generate::forward(generation, sender, move |message| {
            writer
                .events(message)
                .into_iter()
                .map(Ok::<_, Infallible>)
                .collect()
        });
        tokio::spawn(forward.instrument(span));
        let events = Sse::new(ReceiverStream::new(receiver)).keep_alive(KeepAlive::default());
        return Ok(events.into_response());
    }
    let response = generate::collect(generation)
        .await
        .map_err(|err| failed(&api, operation, clock, &names, err))?;
    Ok(Json(answer.unary(&response)).into_response())
}

/// `POST /v1/score`: `{model, messages or prompt, candidates}` → the gRPC `Score` result in JSON.
pub(super) async fn score(
    State(api): State<Arc<HttpApi>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = request_span("/v1/score", &headers);
    let work = async {
        let caller = caller(&api.state, &headers)?;
        span.record("caller", caller.name());
        let mut body = body_of(body)?;
        api.check_model(body.model.as_deref())?;
        let candidates = body
            .candidates
            .take()
            .ok_or_else(|| ApiError::bad_request("`candidates` is required"))?;
        let clock = api.clock();
        let (prompt, names) = read_prompt(&api, &mut body, PromptField::Either, clock).await?;
        let request = pb::ScoreRequest { prompt, candidates };
        let scored = score_pipeline::score(Arc::clone(&api.state), request, clock, caller)
            .await
            .map_err(|err| failed(&api, Operation::Score, clock, &names, err))?;
        let scores: Vec<serde_json::Value> = scored
            .scores
            .iter()
            .map(|score| {
                json!({
                    "candidate": score.candidate,
                    "token_ids": score.token_ids,
                    "token_logprobs": score.token_logprobs,
                    "sum_logprob": score.sum_logprob,
                    "mean_logprob": score.mean_logprob,
                })
            })
            .collect();
        Ok(Json(json!({
            "object": "score",
            "model": api.model_id,
            "scores": scores,
            "best_index": scored.best_index,
            "prompt_token_ids": scored.prompt_token_ids,
        }))
        .into_response())
    };
    serve(span.clone(), work).await
}
