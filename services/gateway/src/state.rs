//! What every request shares: the tokenizer, the pools, the cache, the limits and the concurrency limit, and the
//! gateway's statistics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kosmos_processor::KosmosTokenizer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Authenticator;
use crate::config::Limits;
use crate::encode::ImageEncoder;
use crate::error::RequestError;
use crate::metrics::{GatewayMetrics, GatewayStats};
use crate::upstream::{ModelInfo, Upstreams};

/// The state every request shares.
#[derive(Debug)]
pub struct GatewayState {
    /// The tokenizer with the Kosmos tags configured.
    pub tokenizer: Arc<KosmosTokenizer>,
    /// Both pools and the model.
    pub upstreams: Upstreams,
    /// The encoder pool behind the embedding cache.
    pub encoder: ImageEncoder,
    /// Request limits.
    pub limits: Limits,
    /// Messages buffered per stream.
    pub stream_buffer_messages: usize,
    /// Request metrics.
    pub metrics: GatewayMetrics,
    /// API keys and quotas (or none: open).
    pub auth: Authenticator,
    /// Request bytes held by all calls (`limits.max_inflight_bytes`).
    pub budget: Arc<kosmos_runtime::budget::ByteBudget>,
    /// Kosmos-2.5: the page processor's settings, to map `<ocr>` boxes back to the page (`None` for Kosmos-2).
    pub pages: Option<kosmos_processor::FlattenedPatchConfig>,
    permits: Arc<Semaphore>,
    rejected: AtomicU64,
}

impl GatewayState {
    /// State over a loaded tokenizer and the pools.
    pub fn new(
        tokenizer: Arc<KosmosTokenizer>,
        upstreams: Upstreams,
        encoder: ImageEncoder,
        limits: Limits,
        stream_buffer_messages: usize,
        metrics: GatewayMetrics,
        auth: Authenticator,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(limits.max_concurrent_requests.get()));
        let budget = kosmos_runtime::budget::ByteBudget::new(
            limits.max_inflight_bytes.get() as u64,
            "limits.max_inflight_bytes",
        );
        Self {
            auth,
            budget,
            tokenizer,
            upstreams,
            encoder,
            limits,
            stream_buffer_messages,
            metrics,
            pages: None,
            permits,
            rejected: AtomicU64::new(0),
        }
    }

    /// The same state for a Kosmos-2.5 model directory whose page processor is `pages`.
    pub fn with_pages(mut self, pages: Option<kosmos_processor::FlattenedPatchConfig>) -> Self {
        self.pages = pages;
        self
    }

    /// A slot under the concurrency limit, held for the whole request (stream included); RESOURCE_EXHAUSTED when
    /// none is free. Requests are refused rather than queued: a queue in the gateway would hide the overload
    /// from the callers' retry logic and from autoscaling.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, RequestError> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                limit = self.limits.max_concurrent_requests.get(),
                "concurrency limit reached, refusing a request"
            );
            RequestError::Overloaded {
                limit: self.limits.max_concurrent_requests.get(),
            }
        })
    }

    /// Admits `caller`'s request under its key's quotas (see [`crate::auth`]); a refusal is counted by key and
    /// quota.
    pub fn admit_caller(
        &self,
        caller: &crate::auth::Caller,
    ) -> Result<crate::auth::QuotaPermit, RequestError> {
        caller.admit().inspect_err(|err| {
            if let RequestError::QuotaExceeded { quota, .. } = err {
                self.metrics.refused_by_key(caller.tenant(), quota);
            }
        })
    }

    /// The model, or UNAVAILABLE while no decoder has described it.
    pub fn model(&self) -> Result<Arc<ModelInfo>, RequestError> {
        self.upstreams
            .model()
            .ok_or_else(|| RequestError::NotReady("no decoder replica has answered yet".into()))
    }

    /// The model for a request: while no decoder has described it yet, waits for one (as a pending call of the
    /// decoder pool, see [`crate::upstream::Upstreams::wait_model`]); UNAVAILABLE if none came, DEADLINE_EXCEEDED
    /// if the deadline passed first.
    pub async fn wait_model(
        &self,
        deadline: Option<std::time::Instant>,
    ) -> Result<Arc<ModelInfo>, RequestError> {
        match self.upstreams.wait_model(deadline).await {
            Some(model) => Ok(model),
            None if deadline.is_some_and(|at| std::time::Instant::now() >= at) => Err(
                RequestError::DeadlineExceeded("waiting for a decoder replica"),
            ),
            None => Err(RequestError::NotReady(format!(
                "no decoder replica has answered (waited {:.1} s: limits.max_waiting_for_replica_seconds)",
                self.upstreams
                    .decoder
                    .config()
                    .max_wait_for_replica
                    .as_secs_f64()
            ))),
        }
    }

    /// The gateway's load now.
    pub fn stats(&self) -> GatewayStats {
        let free = self.permits.available_permits();
        GatewayStats {
            requests_in_flight: self
                .limits
                .max_concurrent_requests
                .get()
                .saturating_sub(free) as u32,
            requests_rejected_total: self.rejected.load(Ordering::Relaxed),
            inflight_bytes: self.budget.used(),
            inflight_bytes_rejected_total: self.budget.rejected(),
            encoder: self.upstreams.encoder.stats(),
            decoder: self.upstreams.decoder.stats(),
            cache: self.encoder.cache().stats(),
        }
    }
}

/// The caller's deadline (`grpc-timeout`, else `limits.default_deadline_seconds`, bounded by
/// `limits.max_deadline_seconds`), slightly early; DEADLINE_EXCEEDED when it has already passed.
pub fn deadline_of<T>(
    request: &tonic::Request<T>,
    arrived: Instant,
    limits: &Limits,
) -> Result<Option<Instant>, RequestError> {
    let timeout = kosmos_runtime::grpc::request_timeout(request).or(limits.default_deadline);
    let timeout = match (timeout, limits.max_deadline) {
        (Some(timeout), Some(max)) => Some(timeout.min(max)),
        (None, max) => max,
        (timeout, None) => timeout,
    };
    match timeout.map(|timeout| kosmos_runtime::grpc::answer_by(arrived, timeout)) {
        Some(deadline) if deadline <= Instant::now() => {
            Err(RequestError::DeadlineExceeded("waiting to start"))
        }
        deadline => Ok(deadline),
    }
}

/// Runs `work` until `deadline`; DEADLINE_EXCEEDED (naming `stage`) if it passes first.
pub async fn within<T>(
    deadline: Option<Instant>,
    stage: &'static str,
    work: impl std::future::Future<Output = Result<T, RequestError>>,
) -> Result<T, RequestError> {
    match deadline {
        None => work.await,
        Some(deadline) => tokio::time::timeout_at(deadline.into(), work)
            .await
            .unwrap_or(Err(RequestError::DeadlineExceeded(stage))),
    }
}
