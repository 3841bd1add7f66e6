//! Every metric the gateway exports (the gateway rows of `docs/metrics.md`): GenAI request metrics as callers
//! see them, the per-pool queue signals the autoscalers read, the embedding cache and the concurrency limit.
//!
//! Live state (pool gauges, cache, in-flight requests) is observed at scrape time from [`GatewayState::stats`];
//! request metrics are recorded when a request ends.

use std::sync::{Arc, Weak};
use std::time::Instant;

use kosmos_runtime::metrics::{
    LATENCY_BUCKETS, Registry, RpcMetrics, STAGE_BUCKETS, TOKEN_BUCKETS, code_name, histogram,
};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;

use crate::state::{GatewayState, GatewayStats};

/// The gateway's instrument names (OpenTelemetry names; the Prometheus names are in `docs/metrics.md`).
pub mod names {
    pub use kosmos_runtime::metrics::gen_ai::{
        REQUEST_DURATION, TIME_PER_OUTPUT_TOKEN, TIME_TO_FIRST_TOKEN, TOKEN_USAGE,
    };
    /// `kosmos_gateway_requests_in_flight`
    pub const REQUESTS_IN_FLIGHT: &str = "kosmos.gateway.requests_in_flight";
    /// `kosmos_gateway_requests_rejected_total`
    pub const REQUESTS_REJECTED: &str = "kosmos.gateway.requests_rejected";
    /// `kosmos_gateway_pool_pending_requests`
    pub const POOL_PENDING_REQUESTS: &str = "kosmos.gateway.pool.pending_requests";
    /// `kosmos_gateway_pool_inflight_requests`
    pub const POOL_INFLIGHT_REQUESTS: &str = "kosmos.gateway.pool.inflight_requests";
    /// `kosmos_gateway_pool_pending_images`
    pub const POOL_PENDING_IMAGES: &str = "kosmos.gateway.pool.pending_images";
    /// `kosmos_gateway_pool_replicas`
    pub const POOL_REPLICAS: &str = "kosmos.gateway.pool.replicas";
    /// `kosmos_gateway_pool_ready_replicas`
    pub const POOL_READY_REPLICAS: &str = "kosmos.gateway.pool.ready_replicas";
    /// `kosmos_gateway_pool_calls_total`
    pub const POOL_CALLS: &str = "kosmos.gateway.pool.calls";
    /// `kosmos_gateway_pool_failures_total`
    pub const POOL_FAILURES: &str = "kosmos.gateway.pool.failures";
    /// `kosmos_gateway_pool_retries_total`
    pub const POOL_RETRIES: &str = "kosmos.gateway.pool.retries";
    /// `kosmos_gateway_embedding_cache_queries_total`
    pub const CACHE_QUERIES: &str = "kosmos.gateway.embedding_cache.queries";
    /// `kosmos_gateway_embedding_cache_hits_total`
    pub const CACHE_HITS: &str = "kosmos.gateway.embedding_cache.hits";
    /// `kosmos_gateway_embedding_cache_evictions_total`
    pub const CACHE_EVICTIONS: &str = "kosmos.gateway.embedding_cache.evictions";
    /// `kosmos_gateway_embedding_cache_bytes`
    pub const CACHE_BYTES: &str = "kosmos.gateway.embedding_cache.bytes";
    /// `kosmos_gateway_embedding_cache_entries`
    pub const CACHE_ENTRIES: &str = "kosmos.gateway.embedding_cache.entries";
}

pub use kosmos_runtime::metrics::gen_ai::Operation;

/// What a finished request used and how long its stages took.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The RPC.
    pub operation: Operation,
    /// Arrival at the gateway.
    pub arrived: Instant,
    /// First generated token (generation only).
    pub first_token_at: Option<Instant>,
    /// Last generated token (generation only).
    pub last_token_at: Option<Instant>,
    /// Text prompt tokens.
    pub input_tokens: u32,
    /// Image positions.
    pub image_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
}

/// The gateway's request instruments; the gauges live in callbacks registered by [`GatewayMetrics::observe`].
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    registry: Arc<Registry>,
    rpc: RpcMetrics,
    model: Arc<str>,
    request_duration: Histogram<f64>,
    time_to_first_token: Histogram<f64>,
    time_per_output_token: Histogram<f64>,
    token_usage: Histogram<f64>,
}

impl GatewayMetrics {
    /// Declares the request instruments on a new registry; `model` names the model in the GenAI labels.
    pub fn new(model: &str) -> Result<Self, kosmos_runtime::metrics::MetricsError> {
        let registry = Arc::new(Registry::new("gateway")?);
        let meter = registry.meter();
        Ok(Self {
            rpc: RpcMetrics::new(&registry),
            model: Arc::from(model),
            request_duration: histogram(
                meter,
                names::REQUEST_DURATION,
                "Time from a request's arrival to its last token or score.",
                "s",
                LATENCY_BUCKETS,
            ),
            time_to_first_token: histogram(
                meter,
                names::TIME_TO_FIRST_TOKEN,
                "Time from a request's arrival to its first generated token.",
                "s",
                LATENCY_BUCKETS,
            ),
            time_per_output_token: histogram(
                meter,
                names::TIME_PER_OUTPUT_TOKEN,
                "Mean time per generated token after the first, per request.",
                "s",
                STAGE_BUCKETS,
            ),
            token_usage: histogram(
                meter,
                names::TOKEN_USAGE,
                "Tokens per request by type: input (text prompt), image (image positions), output (generated).",
                "{token}",
                TOKEN_BUCKETS,
            ),
            registry,
        })
    }

    /// The registry `/metrics` renders.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The gRPC server's call metrics.
    pub fn rpc(&self) -> &RpcMetrics {
        &self.rpc
    }

    fn labels(&self, operation: Operation) -> [KeyValue; 2] {
        [
            KeyValue::new("gen_ai_operation_name", operation.name()),
            KeyValue::new("gen_ai_request_model", self.model.to_string()),
        ]
    }

    /// Records a request that succeeded.
    pub fn succeeded(&self, outcome: &Outcome) {
        let labels = self.labels(outcome.operation);
        self.request_duration
            .record(outcome.arrived.elapsed().as_secs_f64(), &labels);
        if let Some(first) = outcome.first_token_at {
            self.time_to_first_token
                .record((first - outcome.arrived).as_secs_f64(), &labels);
            if let Some(last) = outcome.last_token_at
                && outcome.output_tokens > 1
            {
                let per_token = (last - first).as_secs_f64() / f64::from(outcome.output_tokens - 1);
                self.time_per_output_token.record(per_token, &labels);
            }
        }
        for (kind, tokens) in [
            ("input", outcome.input_tokens),
            ("image", outcome.image_tokens),
            ("output", outcome.output_tokens),
        ] {
            if kind == "output" && outcome.operation == Operation::Score {
                continue;
            }
            let [operation, model] = labels.clone();
            self.token_usage.record(
                f64::from(tokens),
                &[operation, model, KeyValue::new("gen_ai_token_type", kind)],
            );
        }
    }

    /// Records a request that failed with `code`.
    pub fn failed(&self, operation: Operation, arrived: Instant, code: tonic::Code) {
        let [operation, model] = self.labels(operation);
        self.request_duration.record(
            arrived.elapsed().as_secs_f64(),
            &[
                operation,
                model,
                KeyValue::new("error_type", code_name(code)),
            ],
        );
    }

    /// Registers the gauges and counters read from `state` at each scrape (they report nothing once the state
    /// is gone).
    pub fn observe(&self, state: Weak<GatewayState>) {
        let meter = self.registry.meter();
        let stats = move || state.upgrade().map(|state| state.stats());
        type Read = fn(&GatewayStats) -> u64;
        let gauges: [(&'static str, &'static str, Read); 3] = [
            (
                names::REQUESTS_IN_FLIGHT,
                "Public requests being served now.",
                |s| u64::from(s.requests_in_flight),
            ),
            (
                names::CACHE_BYTES,
                "Bytes of embeddings held by the cache.",
                |s| s.cache.bytes,
            ),
            (names::CACHE_ENTRIES, "Embeddings held by the cache.", |s| {
                s.cache.entries
            }),
        ];
        for (name, help, read) in gauges {
            let stats = stats.clone();
            let _ = meter
                .u64_observable_gauge(name)
                .with_description(help)
                .with_callback(move |observer| {
                    if let Some(stats) = stats() {
                        observer.observe(read(&stats), &[]);
                    }
                })
                .build();
        }
        let counters: [(&'static str, &'static str, Read); 4] = [
            (
                names::REQUESTS_REJECTED,
                "Requests refused by the gateway's concurrency limit (RESOURCE_EXHAUSTED).",
                |s| s.requests_rejected_total,
            ),
            (
                names::CACHE_QUERIES,
                "Image embedding cache lookups.",
                |s| s.cache.hits + s.cache.misses,
            ),
            (
                names::CACHE_HITS,
                "Image embedding cache lookups that found the embedding.",
                |s| s.cache.hits,
            ),
            (
                names::CACHE_EVICTIONS,
                "Embeddings evicted from the cache to stay within its byte budget.",
                |s| s.cache.evictions,
            ),
        ];
        for (name, help, read) in counters {
            let stats = stats.clone();
            let _ = meter
                .u64_observable_counter(name)
                .with_description(help)
                .with_callback(move |observer| {
                    if let Some(stats) = stats() {
                        observer.observe(read(&stats), &[]);
                    }
                })
                .build();
        }
        type PoolRead = fn(&crate::pool::PoolStats) -> u64;
        let pool_gauges: [(&'static str, &'static str, PoolRead, bool); 5] = [
            (
                names::POOL_PENDING_REQUESTS,
                "Calls to the pool sent and not yet answered with a first message (queued or computing upstream).",
                |p| p.pending,
                false,
            ),
            (
                names::POOL_INFLIGHT_REQUESTS,
                "Calls to the pool open now (streams included until they end).",
                |p| p.in_flight,
                false,
            ),
            (
                names::POOL_PENDING_IMAGES,
                "Images in encode calls sent to the pool and not yet answered (encoder pool only).",
                |p| p.pending_images,
                true,
            ),
            (
                names::POOL_REPLICAS,
                "Replicas of the pool the gateway knows (from its static list or DNS).",
                |p| u64::from(p.replicas),
                false,
            ),
            (
                names::POOL_READY_REPLICAS,
                "Replicas of the pool whose last health probe or call succeeded.",
                |p| u64::from(p.healthy_replicas),
                false,
            ),
        ];
        for (name, help, read, encoder_only) in pool_gauges {
            let stats = stats.clone();
            let _ = meter
                .u64_observable_gauge(name)
                .with_description(help)
                .with_callback(move |observer| {
                    if let Some(stats) = stats() {
                        observer.observe(read(&stats.encoder), &[KeyValue::new("pool", "encoder")]);
                        if !encoder_only {
                            observer
                                .observe(read(&stats.decoder), &[KeyValue::new("pool", "decoder")]);
                        }
                    }
                })
                .build();
        }
        let pool_counters: [(&'static str, &'static str, PoolRead); 3] = [
            (
                names::POOL_CALLS,
                "Calls started to the pool's replicas, retries included.",
                |p| p.calls_total,
            ),
            (
                names::POOL_FAILURES,
                "Calls to the pool that failed.",
                |p| p.failures_total,
            ),
            (
                names::POOL_RETRIES,
                "Calls retried on another replica of the pool.",
                |p| p.retries_total,
            ),
        ];
        for (name, help, read) in pool_counters {
            let stats = stats.clone();
            let _ = meter
                .u64_observable_counter(name)
                .with_description(help)
                .with_callback(move |observer| {
                    if let Some(stats) = stats() {
                        observer.observe(read(&stats.encoder), &[KeyValue::new("pool", "encoder")]);
                        observer.observe(read(&stats.decoder), &[KeyValue::new("pool", "decoder")]);
                    }
                })
                .build();
        }
    }
}
