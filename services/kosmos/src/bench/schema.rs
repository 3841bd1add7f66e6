//! The JSON report of `kosmos bench --json FILE` (schema version 1).
//!
//! Stable: within a schema version no field is added, renamed or removed and none changes meaning; any such change
//! bumps `schema_version` (and docs/benchmarks.md, which documents the fields). Times are milliseconds (`_ms`) or
//! seconds (`_seconds`), as each name says. This module depends on serde alone, so the tests read reports back
//! into these same types (with `deny_unknown_fields`, so a field added without a new version fails them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The version of this schema, written as `schema_version`.
pub const SCHEMA_VERSION: u32 = 1;

/// A whole `kosmos bench` invocation: its settings and one run per load level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Always [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// `kosmos bench`.
    pub tool: String,
    /// The version of the `kosmos` binary that measured.
    pub kosmos_version: String,
    /// When the first run started, seconds since the Unix epoch.
    pub started_at_unix_seconds: f64,
    /// The gateway measured.
    pub target: String,
    /// The settings every run shares.
    pub config: BenchConfig,
    /// One run per load level, in the order run (a sweep's rates in the order given).
    pub runs: Vec<Run>,
}

/// The settings of an invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchConfig {
    /// `generate_stream` or `score`.
    pub mode: String,
    /// Requests per run, when the run is bounded by a count.
    pub requests: Option<u64>,
    /// Seconds per run, when the run is bounded by time (requests in flight at the end still complete).
    pub duration_seconds: Option<f64>,
    /// Seed of the arrival times and of the workload.
    pub seed: u64,
    /// Where the images come from: `folder:<dir>` or `generated:<w>x<h>`.
    pub images: String,
    /// Images in each request.
    pub images_per_request: u32,
    /// Share of requests whose images come from the reuse pool (the rest bring images new to the server).
    pub image_reuse: f64,
    /// Size of the reuse pool.
    pub image_pool: u32,
    /// Words of text in each prompt (drawn uniformly in the range).
    pub prompt_words: LengthRange,
    /// `max_new_tokens` of each request (drawn uniformly in the range); the model may stop earlier at its
    /// end-of-sequence token (the public API cannot ignore it), so compare with the records' `output_tokens`.
    pub output_tokens: LengthRange,
    /// Candidates per Score request.
    pub score_candidates: u32,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Client-side deadline of each request, seconds.
    pub timeout_seconds: f64,
    /// The time-to-first-token objective of goodput, when given.
    pub slo_ttft_ms: Option<f64>,
    /// The time-per-output-token objective of goodput, when given.
    pub slo_tpot_ms: Option<f64>,
}

/// An inclusive range of lengths (`min == max` for a fixed length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthRange {
    /// Smallest length.
    pub min: u32,
    /// Largest length.
    pub max: u32,
}

/// How a run loads the server.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Load {
    /// Open loop: requests arrive as a Poisson process of this rate (requests/s), whatever the server does;
    /// `rate` is null for "all at once".
    Poisson {
        /// Requests per second; null: every request at time 0.
        rate: Option<f64>,
    },
    /// Closed loop: this many clients, each sending its next request when the previous one completes.
    Concurrency {
        /// Clients.
        concurrency: u32,
    },
}

/// One load level: its summary and every request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// The load.
    pub load: Load,
    /// What the records add up to.
    pub summary: Summary,
    /// Every request sent, in the order planned (`index`), successful or not.
    pub requests: Vec<RequestRecord>,
}

/// The aggregate of a run. Latency statistics cover successful requests only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    /// Requests sent (= successful + every error).
    pub requests: u64,
    /// Requests that ended with status OK.
    pub successful: u64,
    /// Requests that failed, by gRPC status code name (`RESOURCE_EXHAUSTED`, …; a client-side deadline is
    /// `DEADLINE_EXCEEDED`).
    pub errors_by_code: BTreeMap<String, u64>,
    /// From the first request sent to the last one completed, seconds.
    pub duration_seconds: f64,
    /// Successful requests per second.
    pub request_throughput: f64,
    /// Output tokens of successful requests per second.
    pub output_token_throughput: f64,
    /// Prompt tokens of successful requests (image positions included), as the server counted them.
    pub total_prompt_tokens: u64,
    /// Output tokens of successful requests.
    pub total_output_tokens: u64,
    /// Successful requests whose generation stopped before their `max_new_tokens` (end of sequence, context).
    pub ended_early: u64,
    /// Successful requests meeting every SLO given (all successful requests when none is given).
    pub goodput_requests: u64,
    /// `goodput_requests` per second.
    pub goodput: f64,
    /// Time to first token (GenerateStream).
    pub ttft_ms: Stats,
    /// Time per output token after the first, per request (requests with at least two output tokens).
    pub tpot_ms: Stats,
    /// Inter-token latency: every gap between consecutive messages carrying tokens, over all requests.
    pub itl_ms: Stats,
    /// End-to-end latency: request sent to last message received.
    pub e2e_ms: Stats,
}

/// Distribution of a latency: linear-interpolation percentiles (numpy's default) over `count` values; every
/// field is null when `count` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// Values.
    pub count: u64,
    /// Arithmetic mean.
    pub mean: Option<f64>,
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
}

/// One request of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRecord {
    /// Position in the run's plan (0-based).
    pub index: u64,
    /// When it was sent, ms after the run started.
    pub sent_ms: f64,
    /// Open loop: how late it was sent after its planned arrival, ms (0 in a closed loop).
    pub send_lag_ms: f64,
    /// `OK` or the gRPC status code name.
    pub status: String,
    /// The status message of a failed request.
    pub error: Option<String>,
    /// Images in the prompt.
    pub images: u32,
    /// Bytes of those images.
    pub image_bytes: u64,
    /// Whether the images came from the reuse pool.
    pub reused_images: bool,
    /// Words of text in the prompt.
    pub prompt_words: u32,
    /// `max_new_tokens` asked for (0 for Score).
    pub max_new_tokens: u32,
    /// Prompt tokens as the server counted them (null when it did not say, e.g. after an error).
    pub prompt_tokens: Option<u32>,
    /// Tokens generated.
    pub output_tokens: u32,
    /// The finish reason (`LENGTH`, `EOS`, `STOP_SEQUENCE`, `CONTEXT_LENGTH`), null for Score and errors.
    pub finish_reason: Option<String>,
    /// Time to first token: sent to the first message carrying a token, ms.
    pub ttft_ms: Option<f64>,
    /// (e2e − ttft) / (output_tokens − 1), ms; null below two output tokens.
    pub tpot_ms: Option<f64>,
    /// Gaps between consecutive messages carrying tokens, ms.
    pub itl_ms: Vec<f64>,
    /// Sent to the last message (or the error), ms.
    pub e2e_ms: f64,
    /// Whether it succeeded and met every SLO given.
    pub good: bool,
}
