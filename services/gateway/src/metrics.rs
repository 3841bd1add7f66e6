//! Every metric the gateway exports (the gateway rows of `docs/metrics.md`): GenAI request metrics as callers
//! see them, the per-pool queue signals the autoscalers read, the embedding cache and the concurrency limit.
//!
//! Live state (pool gauges, cache, in-flight requests) is observed at scrape time from [`GatewayStats`];
//! request metrics are recorded when a request ends.

use std::sync::Arc;
use std::time::Instant;

use kosmos_runtime::metrics::{Registry, code_name, gen_ai};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{AsyncInstrument, Histogram};

use crate::cache::CacheStats;
use crate::pool::PoolStats;

/// The gateway's load, for `GetModelInfo`, the observed metrics and in-process callers (tests, the `kosmos`
/// command).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GatewayStats {
    /// Requests being served now.
    pub requests_in_flight: u32,
    /// Requests refused by the concurrency limit since start.
    pub requests_rejected_total: u64,
    /// Request bytes held by calls now (`limits.max_inflight_bytes` bounds it).
    pub inflight_bytes: u64,
    /// Calls refused because their bytes would exceed `limits.max_inflight_bytes`, since start.
    pub inflight_bytes_rejected_total: u64,
    /// The encoder pool.
    pub encoder: PoolStats,
    /// The decoder pool.
    pub decoder: PoolStats,
    /// The embedding cache.
    pub cache: CacheStats,
}

/// The gateway's instrument names (OpenTelemetry names; the Prometheus names are in `docs/metrics.md`).
pub mod names {
    pub use kosmos_runtime::metrics::gen_ai::{
        REQUEST_DURATION, TIME_PER_OUTPUT_TOKEN, TIME_TO_FIRST_TOKEN, TOKEN_USAGE,
    };
    /// `kosmos_gateway_requests_in_flight`
    pub const REQUESTS_IN_FLIGHT: &str = "kosmos.gateway.requests_in_flight";
    /// `kosmos_gateway_requests_rejected_total`
    pub const REQUESTS_REJECTED: &str = "kosmos.gateway.requests_rejected";
    /// `kosmos_gateway_inflight_bytes`
    pub const INFLIGHT_BYTES: &str = "kosmos.gateway.inflight_bytes";
    /// `kosmos_gateway_inflight_bytes_rejected_total`
    pub const INFLIGHT_BYTES_REJECTED: &str = "kosmos.gateway.inflight_bytes_rejected";
    /// `kosmos_gateway_api_key_refusals_total`
    pub const API_KEY_REFUSALS: &str = "kosmos.gateway.api_key.refusals";
    /// `kosmos_gateway_decoder_resumptions_total`
    pub const DECODER_RESUMPTIONS: &str = "kosmos.gateway.decoder.resumptions";
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
    /// `kosmos_gateway_pool_retries_refused_total`
    pub const POOL_RETRIES_REFUSED: &str = "kosmos.gateway.pool.retries_refused";
    /// `kosmos_gateway_pool_waiting_requests`
    pub const POOL_WAITING_REQUESTS: &str = "kosmos.gateway.pool.waiting_requests";
    /// `kosmos_gateway_pool_ejected_replicas`
    pub const POOL_EJECTED_REPLICAS: &str = "kosmos.gateway.pool.ejected_replicas";
    /// `kosmos_gateway_pool_ejections_total`
    pub const POOL_EJECTIONS: &str = "kosmos.gateway.pool.ejections";
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
    model: Arc<str>,
    request_duration: Histogram<f64>,
    time_to_first_token: Histogram<f64>,
    time_per_output_token: Histogram<f64>,
    token_usage: Histogram<f64>,
    api_key_refusals: opentelemetry::metrics::Counter<u64>,
    resumptions: opentelemetry::metrics::Counter<u64>,
}

impl GatewayMetrics {
    /// Declares the request instruments on a new registry; `model` names the model in the GenAI labels.
    pub fn new(model: &str) -> Result<Self, kosmos_runtime::metrics::MetricsError> {
        let registry = Arc::new(Registry::new("gateway")?);
        let meter = registry.meter();
        let gen_ai::Histograms {
            request_duration,
            time_to_first_token,
            time_per_output_token,
            token_usage,
        } = gen_ai::Histograms::new(
            meter,
            "Time from a request's arrival to its last token or score.",
            "Time from a request's arrival to its first generated token.",
        );
        let api_key_refusals = meter
            .u64_counter(names::API_KEY_REFUSALS)
            .with_description(
                "Calls refused by API key checks: no or unknown key (`api_key` = \"\"), or a spent quota \
                 (`reason`: the quota's name).",
            )
            .build();
        // Exported from the start (a zero), so dashboards and the catalogue see the family before any refusal.
        api_key_refusals.add(
            0,
            &[
                KeyValue::new("api_key", ""),
                KeyValue::new("reason", "unauthenticated"),
            ],
        );
        let resumptions = meter
            .u64_counter(names::DECODER_RESUMPTIONS)
            .with_description(
                "Generations whose decoder stream broke mid-way: `outcome` = resumed (continued on another \
                 replica from the tokens delivered), or failed (`limits.max_resumptions` spent, or no replica \
                 took the resume).",
            )
            .build();
        for outcome in ["resumed", "failed"] {
            resumptions.add(0, &[KeyValue::new("outcome", outcome)]);
        }
        Ok(Self {
            api_key_refusals,
            resumptions,
            model: Arc::from(model),
            request_duration,
            time_to_first_token,
            time_per_output_token,
            token_usage,
            registry,
        })
    }

    /// The registry `/metrics` renders.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
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

    /// Counts a call refused by the API key checks: `key` is the key's id (empty when no key matched), `reason`
    /// `unauthenticated` or the quota spent.
    pub fn refused_by_key(&self, key: &str, reason: &'static str) {
        self.api_key_refusals.add(
            1,
            &[
                KeyValue::new("api_key", key.to_string()),
                KeyValue::new("reason", reason),
            ],
        );
    }

    /// Counts a generation whose decoder stream broke: `resumed` on another replica, or not.
    pub fn decoder_stream_broke(&self, resumed: bool) {
        let outcome = if resumed { "resumed" } else { "failed" };
        self.resumptions
            .add(1, &[KeyValue::new("outcome", outcome)]);
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

    /// Registers the gauges and counters read from `stats` at each scrape (a closure over the gateway's state,
    /// as the decoder's `observe_load`: the metrics never hold the state; `None` reports nothing).
    pub fn observe(&self, stats: impl Fn() -> Option<GatewayStats> + Send + Sync + 'static) {
        let stats: StatsSource = Arc::new(stats);
        for row in OBSERVED {
            let stats = Arc::clone(&stats);
            let read = row.read;
            let callback = move |observer: &dyn AsyncInstrument<u64>| {
                if let Some(stats) = stats() {
                    read.observe(&stats, observer);
                }
            };
            let meter = self.registry.meter();
            match row.kind {
                Kind::Gauge => {
                    let _ = meter
                        .u64_observable_gauge(row.name)
                        .with_description(row.help)
                        .with_callback(callback)
                        .build();
                }
                Kind::Counter => {
                    let _ = meter
                        .u64_observable_counter(row.name)
                        .with_description(row.help)
                        .with_callback(callback)
                        .build();
                }
            }
        }
    }
}

type StatsSource = Arc<dyn Fn() -> Option<GatewayStats> + Send + Sync>;

#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// What one observed instrument reads from the stats.
#[derive(Clone, Copy)]
enum Read {
    /// One unlabelled value.
    Gateway(fn(&GatewayStats) -> u64),
    /// One value per pool (`pool` label); `encoder_only` for what only the encoder pool has.
    Pool {
        read: fn(&PoolStats) -> u64,
        encoder_only: bool,
    },
}

impl Read {
    fn observe(self, stats: &GatewayStats, observer: &dyn AsyncInstrument<u64>) {
        match self {
            Self::Gateway(read) => observer.observe(read(stats), &[]),
            Self::Pool { read, encoder_only } => {
                observer.observe(read(&stats.encoder), &[KeyValue::new("pool", "encoder")]);
                if !encoder_only {
                    observer.observe(read(&stats.decoder), &[KeyValue::new("pool", "decoder")]);
                }
            }
        }
    }
}

struct Observed {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    read: Read,
}

const fn pool(read: fn(&PoolStats) -> u64) -> Read {
    Read::Pool {
        read,
        encoder_only: false,
    }
}

/// Every instrument observed at scrape time.
const OBSERVED: [Observed; 21] = [
    Observed {
        name: names::INFLIGHT_BYTES,
        help: "Request bytes held by calls now (bounded by limits.max_inflight_bytes).",
        kind: Kind::Gauge,
        read: Read::Gateway(|s| s.inflight_bytes),
    },
    Observed {
        name: names::INFLIGHT_BYTES_REJECTED,
        help: "Calls refused because their bytes would exceed limits.max_inflight_bytes (RESOURCE_EXHAUSTED).",
        kind: Kind::Counter,
        read: Read::Gateway(|s| s.inflight_bytes_rejected_total),
    },
    Observed {
        name: names::REQUESTS_IN_FLIGHT,
        help: "Public requests being served now.",
        kind: Kind::Gauge,
        read: Read::Gateway(|s| u64::from(s.requests_in_flight)),
    },
    Observed {
        name: names::CACHE_BYTES,
        help: "Bytes of embeddings held by the cache.",
        kind: Kind::Gauge,
        read: Read::Gateway(|s| s.cache.bytes),
    },
    Observed {
        name: names::CACHE_ENTRIES,
        help: "Embeddings held by the cache.",
        kind: Kind::Gauge,
        read: Read::Gateway(|s| s.cache.entries),
    },
    Observed {
        name: names::REQUESTS_REJECTED,
        help: "Requests refused by the gateway's concurrency limit (RESOURCE_EXHAUSTED).",
        kind: Kind::Counter,
        read: Read::Gateway(|s| s.requests_rejected_total),
    },
    Observed {
        name: names::CACHE_QUERIES,
        help: "Image embedding cache lookups.",
        kind: Kind::Counter,
        read: Read::Gateway(|s| s.cache.hits + s.cache.misses),
    },
    Observed {
        name: names::CACHE_HITS,
        help: "Image embedding cache lookups that found the embedding.",
        kind: Kind::Counter,
        read: Read::Gateway(|s| s.cache.hits),
    },
    Observed {
        name: names::CACHE_EVICTIONS,
        help: "Embeddings evicted from the cache to stay within its byte budget.",
        kind: Kind::Counter,
        read: Read::Gateway(|s| s.cache.evictions),
    },
    Observed {
        name: names::POOL_PENDING_REQUESTS,
        help: "Calls to the pool sent and not yet answered with a first message (queued or computing upstream).",
        kind: Kind::Gauge,
        read: pool(|p| p.pending),
    },
    Observed {
        name: names::POOL_INFLIGHT_REQUESTS,
        help: "Calls to the pool open now (streams included until they end).",
        kind: Kind::Gauge,
        read: pool(|p| p.in_flight),
    },
    Observed {
        name: names::POOL_PENDING_IMAGES,
        help: "Images in encode calls sent to the pool and not yet answered (encoder pool only).",
        kind: Kind::Gauge,
        read: Read::Pool {
            read: |p| p.pending_images,
            encoder_only: true,
        },
    },
    Observed {
        name: names::POOL_REPLICAS,
        help: "Replicas of the pool the gateway knows (from its static list or DNS).",
        kind: Kind::Gauge,
        read: pool(|p| u64::from(p.replicas)),
    },
    Observed {
        name: names::POOL_READY_REPLICAS,
        help: "Replicas of the pool whose last health probe or call succeeded.",
        kind: Kind::Gauge,
        read: pool(|p| u64::from(p.healthy_replicas)),
    },
    Observed {
        name: names::POOL_CALLS,
        help: "Calls started to the pool's replicas, retries included.",
        kind: Kind::Counter,
        read: pool(|p| p.calls_total),
    },
    Observed {
        name: names::POOL_FAILURES,
        help: "Calls to the pool that failed.",
        kind: Kind::Counter,
        read: pool(|p| p.failures_total),
    },
    Observed {
        name: names::POOL_RETRIES,
        help: "Calls retried on another replica of the pool.",
        kind: Kind::Counter,
        read: pool(|p| p.retries_total),
    },
    Observed {
        name: names::POOL_RETRIES_REFUSED,
        help: "Retries not made because the pool's retry budget (`retry_budget_percent` of its calls, plus 10 a \
               second) was spent.",
        kind: Kind::Counter,
        read: pool(|p| p.retries_refused_total),
    },
    Observed {
        name: names::POOL_WAITING_REQUESTS,
        help: "Calls waiting for the pool to have a replica serving their model build (scaled to zero, or every \
               replica gone), at most `limits.max_waiting_for_replica_seconds`; also counted as pending.",
        kind: Kind::Gauge,
        read: pool(|p| p.waiting),
    },
    Observed {
        name: names::POOL_EJECTED_REPLICAS,
        help: "Replicas of the pool out of rotation for failing call after call (`eject_after_failures`).",
        kind: Kind::Gauge,
        read: pool(|p| u64::from(p.ejected_replicas)),
    },
    Observed {
        name: names::POOL_EJECTIONS,
        help: "Ejections of the pool's replicas for failing call after call.",
        kind: Kind::Counter,
        read: pool(|p| p.ejections_total),
    },
];
