//! The `kosmos.v1.Kosmos` service: reads the caller's deadline, hands the request to [`crate::generate`] or
//! [`crate::score`], and converts domain values to wire messages.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_server::Kosmos;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::auth::Caller;
use crate::cache::CacheStats;
use crate::config::Limits;
use crate::error::RequestError;
use crate::generate::{self, RequestClock};
use crate::metrics::GatewayStats;
use crate::metrics::Operation;
use crate::pool::{PoolHealth, PoolStats};
use crate::score;
use crate::state::{GatewayState, deadline_of};

/// The public API over the shared gateway state.
#[derive(Debug, Clone)]
pub struct KosmosService {
    state: Arc<GatewayState>,
}

impl KosmosService {
    /// A service over `state`.
    pub fn new(state: Arc<GatewayState>) -> Self {
        Self { state }
    }
}

impl KosmosService {
    /// The caller (from its API key) and the request's clock; no valid key, or a deadline already passed, fails
    /// (and is counted) here.
    fn begin<T>(
        &self,
        request: &Request<T>,
        operation: Operation,
    ) -> Result<(Caller, RequestClock), Status> {
        let arrived = Instant::now();
        let clock = RequestClock {
            arrived,
            deadline: None,
        };
        let caller = self.failed_if_err(operation, clock, self.caller(request))?;
        let deadline = self.failed_if_err(
            operation,
            clock,
            deadline_of(request, arrived, &self.state.limits),
        )?;
        Ok((caller, RequestClock { arrived, deadline }))
    }

    /// The caller its `authorization` header names (anonymous on an open gateway); UNAUTHENTICATED otherwise.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, RequestError> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        let caller = self.state.auth.authenticate(header).inspect_err(|err| {
            tracing::info!(%err, "refused a call without a valid API key");
            self.state.metrics.refused_by_key("", "unauthenticated");
        })?;
        if !caller.tenant().is_empty() {
            tracing::Span::current().record("api_key.id", caller.tenant());
        }
        Ok(caller)
    }

    /// Counts a failed request in the GenAI duration histogram (successes are counted where they finish, with
    /// their token timings) and turns the error into its status.
    fn failed_if_err<T>(
        &self,
        operation: Operation,
        clock: RequestClock,
        result: Result<T, RequestError>,
    ) -> Result<T, Status> {
        result.map_err(|err| {
            let status = Status::from(err);
            self.state
                .metrics
                .failed(operation, clock.arrived, status.code());
            status
        })
    }
}

#[tonic::async_trait]
impl Kosmos for KosmosService {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let (caller, clock) = self.begin(&request, Operation::TextCompletion)?;
        // If the caller goes away, tonic drops this future, and with it the generation and its decoder stream.
        let result = async {
            let generation =
                generate::start(self.state.clone(), request.into_inner(), clock, caller).await?;
            generate::collect(generation).await
        }
        .await;
        let response = self.failed_if_err(Operation::TextCompletion, clock, result)?;
        Ok(Response::new(response))
    }

    type GenerateStreamStream = ResponseStream;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (caller, clock) = self.begin(&request, Operation::TextCompletion)?;
        let started =
            generate::start(self.state.clone(), request.into_inner(), clock, caller).await;
        let generation = self.failed_if_err(Operation::TextCompletion, clock, started)?;
        let (sender, receiver) = mpsc::channel(self.state.stream_buffer_messages);
        let abandoned = Arc::new(OnceLock::new());
        let stream = ResponseStream {
            messages: ReceiverStream::new(receiver),
            abandoned: Arc::clone(&abandoned),
            ended: false,
        };
        let forward = async move {
            let ended = generate::forward(generation, sender, |message| {
                vec![message.map_err(Status::from)]
            });
            if let Some(error) = ended.await {
                let _ = abandoned.set(Status::from(error));
            }
        };
        tokio::spawn(forward.instrument(tracing::Span::current()));
        Ok(Response::new(stream))
    }

    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let (caller, clock) = self.begin(&request, Operation::Score)?;
        let result = score::score(self.state.clone(), request.into_inner(), clock, caller).await;
        let response = self.failed_if_err(Operation::Score, clock, result)?;
        Ok(Response::new(response))
    }

    async fn get_model_info(
        &self,
        request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::GetModelInfoResponse>, Status> {
        self.caller(&request)?;
        let model = self.state.model()?;
        let tokenizer = &self.state.tokenizer;
        Ok(Response::new(pb::GetModelInfoResponse {
            model_fingerprint: model.fingerprint.to_string(),
            context_length: model.context_length as u32,
            vocab_size: model.vocab_size as u32,
            num_image_tokens: model.num_image_tokens as u32,
            supports_grounding: tokenizer.tag_id(kosmos_processor::Tag::Grounding).is_some()
                && tokenizer.num_patch_index_tokens() > 0,
            limits: Some(wire_limits(&self.state.limits)),
            stats: Some(wire_stats(&self.state.stats())),
            eos_token_id: model.eos_token_id,
            family: model.family.to_string(),
        }))
    }
}

/// A `GenerateStream` response: the forwarded messages, unless the stream was abandoned because its caller stopped
/// reading (then that error, once, and the end).
#[derive(Debug)]
pub struct ResponseStream {
    messages: ReceiverStream<Result<pb::GenerateStreamResponse, Status>>,
    abandoned: Arc<OnceLock<Status>>,
    ended: bool,
}

impl tokio_stream::Stream for ResponseStream {
    type Item = Result<pb::GenerateStreamResponse, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        if let Some(status) = self.abandoned.get() {
            let status = status.clone();
            self.ended = true;
            return std::task::Poll::Ready(Some(Err(status)));
        }
        std::pin::Pin::new(&mut self.messages).poll_next(cx)
    }
}

/// The limits on the wire.
pub fn wire_limits(limits: &Limits) -> pb::Limits {
    pb::Limits {
        max_segments: limits.max_segments as u32,
        max_images: limits.max_images as u32,
        max_image_bytes: limits.max_image_bytes,
        max_image_width: limits.max_image_width,
        max_image_height: limits.max_image_height,
        max_image_pixels: limits.max_image_pixels,
        max_text_bytes: limits.max_text_bytes,
        max_prompt_tokens: limits.max_prompt_tokens as u32,
        max_new_tokens: limits.max_new_tokens,
        default_max_new_tokens: limits.default_max_new_tokens,
        default_max_new_tokens_pages: limits.default_max_new_tokens_pages,
        max_temperature: limits.max_temperature,
        max_repetition_penalty: limits.max_repetition_penalty,
        max_no_repeat_ngram_size: limits.max_no_repeat_ngram_size,
        max_stop_strings: limits.max_stop_strings as u32,
        max_stop_string_bytes: limits.max_stop_string_bytes as u32,
        max_top_logprobs: limits.max_top_logprobs,
        max_candidates: limits.max_candidates as u32,
        max_candidate_bytes: limits.max_candidate_bytes as u32,
        max_concurrent_requests: limits.max_concurrent_requests.get() as u32,
        max_message_bytes: limits.max_message_bytes.get() as u64,
    }
}

fn wire_pool(name: &str, stats: &PoolStats) -> pb::PoolStats {
    pb::PoolStats {
        name: name.to_string(),
        replicas: stats.replicas,
        healthy_replicas: stats.healthy_replicas,
        pending: stats.pending,
        in_flight: stats.in_flight,
        calls_total: stats.calls_total,
        failures_total: stats.failures_total,
        retries_total: stats.retries_total,
        waiting: stats.waiting,
        ejected_replicas: stats.ejected_replicas,
        retries_refused_total: stats.retries_refused_total,
        state: match stats.health() {
            PoolHealth::Serving => pb::PoolState::Serving,
            PoolHealth::Degraded => pb::PoolState::Degraded,
            PoolHealth::Down => pb::PoolState::Down,
            PoolHealth::Empty => pb::PoolState::Empty,
        } as i32,
    }
}

fn wire_cache(stats: &CacheStats) -> pb::CacheStats {
    pb::CacheStats {
        hits: stats.hits,
        misses: stats.misses,
        entries: stats.entries,
        bytes: stats.bytes,
        capacity_bytes: stats.capacity_bytes,
        evictions: stats.evictions,
    }
}

/// The gateway's load on the wire.
pub fn wire_stats(stats: &GatewayStats) -> pb::GatewayStats {
    pb::GatewayStats {
        requests_in_flight: stats.requests_in_flight,
        requests_rejected_total: stats.requests_rejected_total,
        encoder: Some(wire_pool("encoder", &stats.encoder)),
        decoder: Some(wire_pool("decoder", &stats.decoder)),
        cache: Some(wire_cache(&stats.cache)),
    }
}
