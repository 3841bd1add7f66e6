//! Every instrument of the decoder, in one place: names, help texts, units and buckets (the catalogue is
//! `docs/metrics.md`; the service tests compare `/metrics` with it). The common ones (`kosmos_build_info`,
//! `rpc_server_call_duration_seconds`) come from [`kosmos_runtime::metrics`].
//!
//! The engine thread records what it sees happen (admissions, steps, first tokens, ends of requests); the gRPC
//! handlers record the requests refused before they reach the engine. The load (running, waiting, KV usage) is
//! published as observable gauges read at each scrape from the atomics the engine keeps anyway.

use std::sync::Arc;
use std::time::Duration;

use kosmos_runtime::metrics::{
    LATENCY_BUCKETS, RATIO_BUCKETS, Registry, STAGE_BUCKETS, code_name, histogram,
};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

/// The OpenTelemetry names of the decoder's instruments (Prometheus adds `_seconds` / `_total`).
pub mod names {
    pub use kosmos_runtime::metrics::gen_ai::{
        REQUEST_DURATION, TIME_PER_OUTPUT_TOKEN, TIME_TO_FIRST_TOKEN, TOKEN_USAGE,
    };
    /// Gauge: `kosmos_decoder_num_requests_running`.
    pub const NUM_REQUESTS_RUNNING: &str = "kosmos.decoder.num_requests_running";
    /// Gauge: `kosmos_decoder_num_requests_waiting`.
    pub const NUM_REQUESTS_WAITING: &str = "kosmos.decoder.num_requests_waiting";
    /// Gauge (0 to 1): `kosmos_decoder_kv_cache_usage_perc`.
    pub const KV_CACHE_USAGE_PERC: &str = "kosmos.decoder.kv_cache_usage_perc";
    /// Histogram (0 to 1): `kosmos_decoder_batch_occupancy`.
    pub const BATCH_OCCUPANCY: &str = "kosmos.decoder.batch_occupancy";
    /// Histogram (s): `kosmos_decoder_queue_time_seconds`.
    pub const QUEUE_TIME: &str = "kosmos.decoder.queue_time";
    /// Histogram (s): `kosmos_decoder_prefill_time_seconds`.
    pub const PREFILL_TIME: &str = "kosmos.decoder.prefill_time";
    /// Histogram (s): `kosmos_decoder_decode_time_seconds`.
    pub const DECODE_TIME: &str = "kosmos.decoder.decode_time";
    /// Counter, label `finish_reason`: `kosmos_decoder_finished_requests_total`.
    pub const FINISHED_REQUESTS: &str = "kosmos.decoder.finished_requests";
    /// Gauge: `kosmos_decoder_kv_cache_blocks_capacity`.
    pub const KV_CACHE_BLOCKS_CAPACITY: &str = "kosmos.decoder.kv_cache_blocks_capacity";
    /// Gauge: `kosmos_decoder_kv_cache_blocks_used`.
    pub const KV_CACHE_BLOCKS_USED: &str = "kosmos.decoder.kv_cache_blocks_used";
    /// Gauge: `kosmos_decoder_kv_cache_blocks_cached`.
    pub const KV_CACHE_BLOCKS_CACHED: &str = "kosmos.decoder.kv_cache_blocks_cached";
    /// Counter: `kosmos_decoder_preemptions_total`.
    pub const PREEMPTIONS: &str = "kosmos.decoder.preemptions";
    /// Counter: `kosmos_decoder_prefix_cache_queries_total`.
    pub const PREFIX_CACHE_QUERIES: &str = "kosmos.decoder.prefix_cache_queries";
    /// Counter: `kosmos_decoder_prefix_cache_hits_total`.
    pub const PREFIX_CACHE_HITS: &str = "kosmos.decoder.prefix_cache_hits";
    /// Gauge (0 to 1): `kosmos_decoder_prefix_cache_hit_rate`.
    pub const PREFIX_CACHE_HIT_RATE: &str = "kosmos.decoder.prefix_cache_hit_rate";
}

pub use kosmos_runtime::metrics::gen_ai::Operation;

/// `finish_reason` of a request that left the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// End of sequence (a completed scoring counts here too).
    Stop,
    /// A caller's stop id.
    StopSequence,
    /// `max_new_tokens` (or the room left in the context).
    Length,
    /// The caller went away.
    Cancelled,
    /// The caller's deadline passed.
    Deadline,
    /// The request failed (a failed step, a bad embedding, …).
    Error(tonic::Code),
}

impl Ending {
    /// The label value.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::StopSequence => "stop_sequence",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
            Self::Deadline => "deadline",
            Self::Error(_) => "error",
        }
    }

    /// The gRPC status the caller saw, when the request failed.
    pub fn error_code(self) -> Option<tonic::Code> {
        match self {
            Self::Stop | Self::StopSequence | Self::Length => None,
            Self::Cancelled => Some(tonic::Code::Cancelled),
            Self::Deadline => Some(tonic::Code::DeadlineExceeded),
            Self::Error(code) => Some(code),
        }
    }
}

/// Token counts of a request for `gen_ai_server_token_usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenCounts {
    /// Text prompt tokens (for a scoring: the context's text tokens and every candidate token).
    pub input: usize,
    /// Image positions.
    pub image: usize,
    /// Generated tokens (`None` for a scoring: nothing is generated).
    pub output: Option<usize>,
}

/// The engine's load, read at each scrape.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// Sequences admitted and generating (or scoring).
    pub running: usize,
    /// Requests waiting for admission, preempted ones included.
    pub waiting: usize,
    /// KV blocks used over blocks in the pool, 0 to 1.
    pub kv_usage: f64,
    /// Blocks in the KV pool.
    pub kv_blocks_total: usize,
    /// Blocks held by admitted requests.
    pub kv_blocks_used: usize,
    /// Blocks registered in the prefix cache.
    pub kv_blocks_cached: usize,
    /// Preemptions since start.
    pub preemptions_total: u64,
    /// Full prompt blocks looked up in the prefix cache since start.
    pub prefix_queried_blocks: u64,
    /// Of those, blocks reused.
    pub prefix_hit_blocks: u64,
}

/// An instrument read from the [`Load`] at each scrape: name, help text, and how to read it.
type LoadInstrument = (&'static str, &'static str, fn(&Load) -> u64);

/// The decoder's instruments on its own [`Registry`].
#[derive(Debug)]
pub struct DecoderMetrics {
    registry: Arc<Registry>,
    model: String,
    request_duration: Histogram<f64>,
    time_to_first_token: Histogram<f64>,
    time_per_output_token: Histogram<f64>,
    token_usage: Histogram<f64>,
    batch_occupancy: Histogram<f64>,
    queue_time: Histogram<f64>,
    prefill_time: Histogram<f64>,
    decode_time: Histogram<f64>,
    finished_requests: Counter<u64>,
}

impl DecoderMetrics {
    /// Declares every instrument of the decoder on `registry`; `model` is `gen_ai_request_model`.
    pub fn new(registry: Arc<Registry>, model: impl Into<String>) -> Self {
        let meter = registry.meter();
        let gen_ai = kosmos_runtime::metrics::gen_ai::Histograms::new(
            meter,
            "Time from a request's arrival at the decoder to its last token or score.",
            "Time from a request's arrival at the decoder to its first token (queue + prefill).",
        );
        Self {
            request_duration: gen_ai.request_duration,
            time_to_first_token: gen_ai.time_to_first_token,
            time_per_output_token: gen_ai.time_per_output_token,
            token_usage: gen_ai.token_usage,
            batch_occupancy: histogram(
                meter,
                names::BATCH_OCCUPANCY,
                "Sequences in an engine step over max_running_sequences (0 to 1), per step.",
                "",
                RATIO_BUCKETS,
            ),
            queue_time: histogram(
                meter,
                names::QUEUE_TIME,
                "Time a request waited for admission.",
                "s",
                LATENCY_BUCKETS,
            ),
            prefill_time: histogram(
                meter,
                names::PREFILL_TIME,
                "Time of the engine step that prefilled a request's prompt.",
                "s",
                STAGE_BUCKETS,
            ),
            decode_time: histogram(
                meter,
                names::DECODE_TIME,
                "Time from a request's first token to its last.",
                "s",
                LATENCY_BUCKETS,
            ),
            finished_requests: meter
                .u64_counter(names::FINISHED_REQUESTS)
                .with_description("Requests that left the engine, by why they finished.")
                .build(),
            model: model.into(),
            registry,
        }
    }

    /// The registry `/metrics` renders.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The model name the GenAI series carry.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Publishes the engine's load, read by `load` at each scrape. Call once per engine.
    pub fn observe_load(&self, load: impl Fn() -> Load + Send + Sync + 'static) {
        let load = Arc::new(load);
        let meter = self.registry.meter();
        let running = Arc::clone(&load);
        let _running = meter
            .u64_observable_gauge(names::NUM_REQUESTS_RUNNING)
            .with_description(
                "Sequences admitted and generating (Inference Extension: running requests).",
            )
            .with_callback(move |observer| observer.observe(running().running as u64, &[]))
            .build();
        let waiting = Arc::clone(&load);
        let _waiting = meter
            .u64_observable_gauge(names::NUM_REQUESTS_WAITING)
            .with_description(
                "Requests queued for admission (Inference Extension: TotalQueuedRequests).",
            )
            .with_callback(move |observer| observer.observe(waiting().waiting as u64, &[]))
            .build();
        let usage = Arc::clone(&load);
        let _kv = meter
            .f64_observable_gauge(names::KV_CACHE_USAGE_PERC)
            .with_description(
                "Fraction (0 to 1) of the KV cache's blocks held by admitted requests (Inference Extension: \
                 KVCacheUtilization).",
            )
            .with_callback(move |observer| observer.observe(usage().kv_usage.clamp(0.0, 1.0), &[]))
            .build();
        let gauges: [LoadInstrument; 3] = [
            (
                names::KV_CACHE_BLOCKS_CAPACITY,
                "Blocks in the KV cache's pool.",
                |load| load.kv_blocks_total as u64,
            ),
            (
                names::KV_CACHE_BLOCKS_USED,
                "KV blocks held by admitted requests.",
                |load| load.kv_blocks_used as u64,
            ),
            (
                names::KV_CACHE_BLOCKS_CACHED,
                "KV blocks registered in the prefix cache (held by a request or kept for a later hit).",
                |load| load.kv_blocks_cached as u64,
            ),
        ];
        for (name, help, read) in gauges {
            let load = Arc::clone(&load);
            let _gauge = meter
                .u64_observable_gauge(name)
                .with_description(help)
                .with_callback(move |observer| observer.observe(read(&load()), &[]))
                .build();
        }
        let counters: [LoadInstrument; 3] = [
            (
                names::PREEMPTIONS,
                "Requests preempted because the KV cache ran out of blocks (resumed later by recomputation).",
                |load| load.preemptions_total,
            ),
            (
                names::PREFIX_CACHE_QUERIES,
                "Full prompt blocks looked up in the prefix cache.",
                |load| load.prefix_queried_blocks,
            ),
            (
                names::PREFIX_CACHE_HITS,
                "Full prompt blocks found in the prefix cache and reused instead of computed.",
                |load| load.prefix_hit_blocks,
            ),
        ];
        for (name, help, read) in counters {
            let load = Arc::clone(&load);
            let _counter = meter
                .u64_observable_counter(name)
                .with_description(help)
                .with_callback(move |observer| observer.observe(read(&load()), &[]))
                .build();
        }
        let _hit_rate = meter
            .f64_observable_gauge(names::PREFIX_CACHE_HIT_RATE)
            .with_description(
                "Fraction (0 to 1) of the prompt blocks looked up in the prefix cache that were found, since start.",
            )
            .with_callback(move |observer| {
                let load = load();
                let rate = if load.prefix_queried_blocks == 0 {
                    0.0
                } else {
                    load.prefix_hit_blocks as f64 / load.prefix_queried_blocks as f64
                };
                observer.observe(rate, &[]);
            })
            .build();
    }

    fn request_labels(&self, operation: Operation) -> [KeyValue; 2] {
        [
            KeyValue::new("gen_ai.operation.name", operation.name()),
            KeyValue::new("gen_ai.request.model", self.model.clone()),
        ]
    }

    /// One engine step carrying `sequences` requests out of `max_running` slots.
    pub fn step(&self, sequences: usize, max_running: usize) {
        let occupancy = sequences as f64 / max_running.max(1) as f64;
        self.batch_occupancy.record(occupancy.min(1.0), &[]);
    }

    /// A request admitted after waiting `waited`.
    pub fn admitted(&self, waited: Duration) {
        self.queue_time.record(waited.as_secs_f64(), &[]);
    }

    /// A request's prompt prefilled by a step of `step_time`.
    pub fn prefilled(&self, step_time: Duration) {
        self.prefill_time.record(step_time.as_secs_f64(), &[]);
    }

    /// A generation's first token, `since_arrival` after it arrived.
    pub fn first_token(&self, operation: Operation, since_arrival: Duration) {
        self.time_to_first_token
            .record(since_arrival.as_secs_f64(), &self.request_labels(operation));
    }

    /// A generation that produced `tokens` tokens in `decode` from its first token to its last.
    pub fn decoded(&self, operation: Operation, tokens: usize, decode: Duration) {
        self.decode_time.record(decode.as_secs_f64(), &[]);
        if tokens > 1 {
            self.time_per_output_token.record(
                decode.as_secs_f64() / (tokens - 1) as f64,
                &self.request_labels(operation),
            );
        }
    }

    /// A request that completed with `tokens`.
    pub fn token_usage(&self, operation: Operation, tokens: TokenCounts) {
        let [name, model] = self.request_labels(operation);
        let record = |kind: &'static str, count: usize| {
            self.token_usage.record(
                count as f64,
                &[
                    name.clone(),
                    model.clone(),
                    KeyValue::new("gen_ai.token.type", kind),
                ],
            );
        };
        record("input", tokens.input);
        if tokens.image > 0 {
            record("image", tokens.image);
        }
        if let Some(output) = tokens.output {
            record("output", output);
        }
    }

    /// A request that left the engine `since_arrival` after it arrived.
    pub fn finished(&self, operation: Operation, ending: Ending, since_arrival: Duration) {
        self.finished_requests
            .add(1, &[KeyValue::new("finish_reason", ending.reason())]);
        self.request_done(operation, ending.error_code(), since_arrival);
    }

    /// A request refused before it reached the engine (validation, a full queue): its duration, with its status.
    pub fn refused(&self, operation: Operation, code: tonic::Code, since_arrival: Duration) {
        self.request_done(operation, Some(code), since_arrival);
    }

    fn request_done(&self, operation: Operation, error: Option<tonic::Code>, elapsed: Duration) {
        let [name, model] = self.request_labels(operation);
        match error {
            None => self
                .request_duration
                .record(elapsed.as_secs_f64(), &[name, model]),
            Some(code) => self.request_duration.record(
                elapsed.as_secs_f64(),
                &[name, model, KeyValue::new("error.type", code_name(code))],
            ),
        }
    }
}
