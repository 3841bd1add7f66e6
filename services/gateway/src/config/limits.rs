//! `[limits]`: every request limit, as `kosmos.v1.Limits` publishes them.

use std::num::NonZeroUsize;
use std::time::Duration;

use kosmos_processor::{AcceptedFormat, ImageLimits};
use kosmos_runtime::config::{ConfigError, invalid, seconds};
use serde::{Deserialize, Serialize};

/// The most `limits.max_resumptions` may be: a request that lost more decoders than this is not going to succeed.
const MAX_RESUMPTIONS: u32 = 16;

/// The longest `limits.max_waiting_for_replica_seconds`: a GPU node and a model load take minutes, not hours.
const MAX_WAITING_FOR_REPLICA: Duration = Duration::from_secs(3600);

/// `[limits]`, as `kosmos.v1.Limits` publishes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Most segments in a prompt.
    pub max_segments: u32,
    /// Most images in a prompt.
    pub max_images: u32,
    /// Most bytes per image.
    pub max_image_bytes: u64,
    /// Widest image in pixels, read from the header.
    pub max_image_width: u32,
    /// Tallest image in pixels, read from the header.
    pub max_image_height: u32,
    /// Most pixels (width × height) per image.
    pub max_image_pixels: u64,
    /// Most bytes of text in a prompt.
    pub max_text_bytes: u64,
    /// Most tokens in a prompt, image positions included.
    pub max_prompt_tokens: u32,
    /// Largest `max_new_tokens` a request may ask for.
    pub max_new_tokens: u32,
    /// `max_new_tokens` when a request leaves it 0.
    pub default_max_new_tokens: u32,
    /// `max_new_tokens` when a request to a Kosmos-2.5 model leaves it 0 (a page's text is long).
    pub default_max_new_tokens_pages: u32,
    /// Highest temperature.
    pub max_temperature: f32,
    /// Highest repetition penalty.
    pub max_repetition_penalty: f32,
    /// Largest `no_repeat_ngram_size`.
    pub max_no_repeat_ngram_size: u32,
    /// Most stop strings.
    pub max_stop_strings: u32,
    /// Longest stop string, in bytes.
    pub max_stop_string_bytes: u32,
    /// Largest `logprobs` (top log-probabilities per step).
    pub max_top_logprobs: u32,
    /// Most candidates per Score.
    pub max_candidates: u32,
    /// Longest candidate, in bytes.
    pub max_candidate_bytes: u32,
    /// Most requests served at once; beyond it RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: u32,
    /// Most request bytes held at once across all calls (admission weighted by size); beyond it
    /// RESOURCE_EXHAUSTED. Bounds the gateway's memory in bytes, not only in requests.
    pub max_inflight_bytes: u64,
    /// The deadline of a call that sets none (0: none).
    #[serde(rename = "default_deadline_seconds", with = "seconds")]
    pub default_deadline: Duration,
    /// The longest deadline a call may have; a longer one is shortened to this (0: no bound).
    #[serde(rename = "max_deadline_seconds", with = "seconds")]
    pub max_deadline: Duration,
    /// A stream whose caller has not taken a message for this long is ended and its decoder work freed.
    #[serde(rename = "stream_idle_timeout_seconds", with = "seconds")]
    pub stream_idle_timeout: Duration,
    /// Most times one generation is resumed on another decoder after its replica failed mid-stream (0: never).
    pub max_resumptions: u32,
    /// How long a call waits for a replica when its pool has none that serves the model (a pool scaled to zero,
    /// or every replica gone): it waits as a pending call, the signal that wakes the pool. The caller's deadline
    /// bounds it too.
    #[serde(rename = "max_waiting_for_replica_seconds", with = "seconds")]
    pub max_waiting_for_replica: Duration,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_segments: 64,
            max_images: 8,
            max_image_bytes: 10 << 20,
            max_image_width: 8192,
            max_image_height: 8192,
            max_image_pixels: 40_000_000,
            max_text_bytes: 64 << 10,
            max_prompt_tokens: 4096,
            max_new_tokens: 1024,
            default_max_new_tokens: 64,
            default_max_new_tokens_pages: 1024,
            max_temperature: 100.0,
            max_repetition_penalty: 10.0,
            max_no_repeat_ngram_size: 16,
            max_stop_strings: 8,
            max_stop_string_bytes: 128,
            max_top_logprobs: 20,
            max_candidates: 64,
            max_candidate_bytes: 1024,
            max_concurrent_requests: 256,
            max_inflight_bytes: 1 << 30,
            default_deadline: Duration::from_secs(300),
            max_deadline: Duration::from_secs(1800),
            stream_idle_timeout: Duration::from_secs(60),
            max_resumptions: 3,
            max_waiting_for_replica: Duration::from_secs(3),
        }
    }
}

/// Validated request limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most segments in a prompt.
    pub max_segments: usize,
    /// Most images in a prompt.
    pub max_images: usize,
    /// Most bytes per image.
    pub max_image_bytes: u64,
    /// Widest image in pixels, read from the header.
    pub max_image_width: u32,
    /// Tallest image in pixels, read from the header.
    pub max_image_height: u32,
    /// Most pixels (width × height) per image.
    pub max_image_pixels: u64,
    /// Most bytes of text in a prompt.
    pub max_text_bytes: u64,
    /// Most tokens in a prompt, image positions included.
    pub max_prompt_tokens: usize,
    /// Largest `max_new_tokens` a request may ask for.
    pub max_new_tokens: u32,
    /// `max_new_tokens` when a request leaves it 0.
    pub default_max_new_tokens: u32,
    /// `max_new_tokens` when a request to a Kosmos-2.5 model leaves it 0 (a page's text is long).
    pub default_max_new_tokens_pages: u32,
    /// Highest temperature.
    pub max_temperature: f32,
    /// Highest repetition penalty.
    pub max_repetition_penalty: f32,
    /// Largest `no_repeat_ngram_size`.
    pub max_no_repeat_ngram_size: u32,
    /// Most stop strings.
    pub max_stop_strings: usize,
    /// Longest stop string, in bytes.
    pub max_stop_string_bytes: usize,
    /// Largest `logprobs` (top log-probabilities per step).
    pub max_top_logprobs: u32,
    /// Most candidates per Score.
    pub max_candidates: usize,
    /// Longest candidate, in bytes.
    pub max_candidate_bytes: usize,
    /// Most requests served at once; beyond it RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: NonZeroUsize,
    /// Largest gRPC message accepted or sent, in bytes (`grpc.max_message_bytes`).
    pub max_message_bytes: NonZeroUsize,
    /// Request bytes held at once (`limits.max_inflight_bytes`).
    pub max_inflight_bytes: NonZeroUsize,
    /// Deadline of a call that sets none, if any.
    pub default_deadline: Option<Duration>,
    /// Bound of any call's deadline, if any.
    pub max_deadline: Option<Duration>,
    /// How long a stream may wait for its caller to read.
    pub stream_idle_timeout: Duration,
    /// Most resumptions of one generation on another decoder (`limits.max_resumptions`).
    pub max_resumptions: u32,
    /// Longest wait for a replica of a pool that has none (`limits.max_waiting_for_replica_seconds`).
    pub max_waiting_for_replica: Duration,
}

impl Limits {
    /// The per-image limits, as the shared header checks take them (every format accepted).
    pub fn image_limits(&self) -> ImageLimits {
        ImageLimits {
            max_image_bytes: self.max_image_bytes,
            max_image_width: self.max_image_width,
            max_image_height: self.max_image_height,
            max_image_pixels: self.max_image_pixels,
            formats: AcceptedFormat::ALL.to_vec(),
        }
    }
}

/// Validates `[limits]`; `max_message_bytes` is the server's (`grpc.max_message_bytes`).
pub(super) fn limits(
    raw: RawLimits,
    max_message_bytes: NonZeroUsize,
) -> Result<Limits, ConfigError> {
    for (value, key) in [
        (u64::from(raw.max_segments), "max_segments"),
        (raw.max_image_bytes, "max_image_bytes"),
        (u64::from(raw.max_image_width), "max_image_width"),
        (u64::from(raw.max_image_height), "max_image_height"),
        (raw.max_image_pixels, "max_image_pixels"),
        (raw.max_text_bytes, "max_text_bytes"),
        (u64::from(raw.max_prompt_tokens), "max_prompt_tokens"),
        (u64::from(raw.max_new_tokens), "max_new_tokens"),
        (
            u64::from(raw.default_max_new_tokens),
            "default_max_new_tokens",
        ),
        (
            u64::from(raw.default_max_new_tokens_pages),
            "default_max_new_tokens_pages",
        ),
        (
            u64::from(raw.max_stop_string_bytes),
            "max_stop_string_bytes",
        ),
        (u64::from(raw.max_candidates), "max_candidates"),
        (u64::from(raw.max_candidate_bytes), "max_candidate_bytes"),
    ] {
        kosmos_runtime::config::positive(&format!("limits.{key}"), value)?;
    }
    for (default, key) in [
        (raw.default_max_new_tokens, "limits.default_max_new_tokens"),
        (
            raw.default_max_new_tokens_pages,
            "limits.default_max_new_tokens_pages",
        ),
    ] {
        if default > raw.max_new_tokens {
            return Err(invalid(
                key,
                format!(
                    "({default}) must be <= `limits.max_new_tokens` ({})",
                    raw.max_new_tokens
                ),
            ));
        }
    }
    for (value, key) in [
        (raw.max_temperature, "max_temperature"),
        (raw.max_repetition_penalty, "max_repetition_penalty"),
    ] {
        if !value.is_finite() || value <= 0.0 {
            return Err(invalid(
                &format!("limits.{key}"),
                format!("must be a number > 0, got {value}"),
            ));
        }
    }
    let max_concurrent_requests = kosmos_runtime::config::positive(
        "limits.max_concurrent_requests",
        raw.max_concurrent_requests.into(),
    )?;
    let max_inflight_bytes =
        kosmos_runtime::config::positive("limits.max_inflight_bytes", raw.max_inflight_bytes)?;
    if raw.max_inflight_bytes < max_message_bytes.get() as u64 {
        return Err(invalid(
            "limits.max_inflight_bytes",
            format!(
                "({}) must be >= `grpc.max_message_bytes` ({}), or the largest request could never be admitted",
                raw.max_inflight_bytes,
                max_message_bytes.get()
            ),
        ));
    }
    if raw.max_resumptions > MAX_RESUMPTIONS {
        return Err(invalid(
            "limits.max_resumptions",
            format!("must be <= {MAX_RESUMPTIONS}, got {}", raw.max_resumptions),
        ));
    }
    if raw.max_waiting_for_replica > MAX_WAITING_FOR_REPLICA {
        return Err(invalid(
            "limits.max_waiting_for_replica_seconds",
            format!(
                "must be <= {} (an hour), got {}",
                MAX_WAITING_FOR_REPLICA.as_secs(),
                raw.max_waiting_for_replica.as_secs_f64()
            ),
        ));
    }
    if raw.stream_idle_timeout.is_zero() {
        return Err(invalid("limits.stream_idle_timeout_seconds", "must be > 0"));
    }
    let default_deadline = (!raw.default_deadline.is_zero()).then_some(raw.default_deadline);
    let max_deadline = (!raw.max_deadline.is_zero()).then_some(raw.max_deadline);
    if let (Some(default), Some(max)) = (default_deadline, max_deadline)
        && default > max
    {
        return Err(invalid(
            "limits.default_deadline_seconds",
            format!(
                "({}) must be <= `limits.max_deadline_seconds` ({})",
                default.as_secs_f64(),
                max.as_secs_f64()
            ),
        ));
    }
    let needed = raw
        .max_image_bytes
        .saturating_mul(u64::from(raw.max_images))
        .saturating_add(raw.max_text_bytes);
    if (max_message_bytes.get() as u64) < needed {
        tracing::warn!(
            max_message_bytes = max_message_bytes.get(),
            needed,
            "grpc.max_message_bytes is smaller than max_images × max_image_bytes + max_text_bytes; the largest \
             allowed requests will be refused by the transport"
        );
    }
    Ok(Limits {
        max_segments: raw.max_segments as usize,
        max_images: raw.max_images as usize,
        max_image_bytes: raw.max_image_bytes,
        max_image_width: raw.max_image_width,
        max_image_height: raw.max_image_height,
        max_image_pixels: raw.max_image_pixels,
        max_text_bytes: raw.max_text_bytes,
        max_prompt_tokens: raw.max_prompt_tokens as usize,
        max_new_tokens: raw.max_new_tokens,
        default_max_new_tokens: raw.default_max_new_tokens,
        default_max_new_tokens_pages: raw.default_max_new_tokens_pages,
        max_temperature: raw.max_temperature,
        max_repetition_penalty: raw.max_repetition_penalty,
        max_no_repeat_ngram_size: raw.max_no_repeat_ngram_size,
        max_stop_strings: raw.max_stop_strings as usize,
        max_stop_string_bytes: raw.max_stop_string_bytes as usize,
        max_top_logprobs: raw.max_top_logprobs,
        max_candidates: raw.max_candidates as usize,
        max_candidate_bytes: raw.max_candidate_bytes as usize,
        max_concurrent_requests,
        max_message_bytes,
        max_inflight_bytes,
        default_deadline,
        max_deadline,
        stream_idle_timeout: raw.stream_idle_timeout,
        max_resumptions: raw.max_resumptions,
        max_waiting_for_replica: raw.max_waiting_for_replica,
    })
}
