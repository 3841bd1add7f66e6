//! Configuration: a raw serde struct (file < environment `KOSMOS_GATEWAY__SECTION__KEY` < flags, merged by
//! `kosmos_runtime::config`) validated into [`GatewayConfig`].
//!
//! ```toml
//! listen = "0.0.0.0:50051"
//! model_dir = "/models/kosmos-2"      # only tokenizer.json is read
//!
//! [encoder]
//! endpoints = ["http://10.0.0.7:50053"] # a static list, or:
//! dns = "kosmos-encoder-headless:50053" # a name re-resolved every `dns_refresh_seconds` (headless Service)
//! dns_refresh_seconds = 5.0
//! connect_timeout_seconds = 2.0
//! call_timeout_seconds = 0.0            # 0: only the caller's deadline bounds a call
//! max_attempts = 3                      # Encode is retried on another replica; Generate/Score before any answer
//! probe_interval_seconds = 1.0
//!
//! [decoder]
//! endpoints = ["http://10.0.0.8:50052"]
//!
//! [limits]
//! max_images = 8
//! max_image_bytes = 10485760
//! max_concurrent_requests = 256
//! # … every limit of `Limits` in kosmos.v1
//!
//! [cache]
//! capacity_bytes = 268435456           # 0 disables the embedding cache
//!
//! [server]
//! drain_timeout_seconds = 30.0
//! stream_buffer_messages = 16
//! log_json = false
//!
//! [metrics]
//! listen = "0.0.0.0:9090"              # GET /metrics (Prometheus text); port 0: any free port
//! ```

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use kosmos_runtime::config::{Layers, seconds};
use serde::{Deserialize, Serialize};

use crate::error::StartError;

/// The prefix of the gateway's environment variables.
pub const ENV_PREFIX: &str = "KOSMOS_GATEWAY";

/// The configuration as written in a file, before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// gRPC listen address of the public API.
    pub listen: String,
    /// The model directory; the gateway reads only its `tokenizer.json`.
    pub model_dir: PathBuf,
    /// The encoder pool.
    pub encoder: RawPool,
    /// The decoder pool.
    pub decoder: RawPool,
    /// Request limits.
    pub limits: RawLimits,
    /// The embedding cache.
    pub cache: RawCache,
    /// Serving.
    pub server: RawServer,
    /// The Prometheus endpoint.
    pub metrics: kosmos_runtime::config::RawMetrics,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            model_dir: PathBuf::new(),
            encoder: RawPool::default(),
            decoder: RawPool::default(),
            limits: RawLimits::default(),
            cache: RawCache::default(),
            server: RawServer::default(),
            metrics: kosmos_runtime::config::RawMetrics::default(),
        }
    }
}

/// `[encoder]` and `[decoder]`: where the replicas are and how to call them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPool {
    /// A static list of replicas (`http://host:port` or `host:port`).
    pub endpoints: Vec<String>,
    /// A `host:port` name re-resolved periodically; every address it resolves to is a replica. Exclusive with
    /// `endpoints`.
    pub dns: String,
    /// How often `dns` is re-resolved.
    #[serde(rename = "dns_refresh_seconds", with = "seconds")]
    pub dns_refresh: Duration,
    /// Connection timeout to one replica.
    #[serde(rename = "connect_timeout_seconds", with = "seconds")]
    pub connect_timeout: Duration,
    /// Upper bound of one call when the caller sets a longer deadline or none; 0 means none.
    #[serde(rename = "call_timeout_seconds", with = "seconds")]
    pub call_timeout: Duration,
    /// Most replicas tried for one call.
    pub max_attempts: u32,
    /// How often every replica is probed (its `Info`).
    #[serde(rename = "probe_interval_seconds", with = "seconds")]
    pub probe_interval: Duration,
}

impl Default for RawPool {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            dns: String::new(),
            dns_refresh: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            call_timeout: Duration::ZERO,
            max_attempts: 3,
            probe_interval: Duration::from_secs(1),
        }
    }
}

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
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: u64,
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
            max_temperature: 100.0,
            max_repetition_penalty: 10.0,
            max_no_repeat_ngram_size: 16,
            max_stop_strings: 8,
            max_stop_string_bytes: 128,
            max_top_logprobs: 20,
            max_candidates: 64,
            max_candidate_bytes: 1024,
            max_concurrent_requests: 256,
            // 8 images of 10 MiB plus text, with room to spare (tonic's 4 MiB default is far too small).
            max_message_bytes: 96 << 20,
        }
    }
}

/// `[cache]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    /// Most bytes of embeddings held; 0 disables the cache.
    pub capacity_bytes: u64,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            capacity_bytes: 256 << 20,
        }
    }
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// How long in-flight calls may take to finish after shutdown begins.
    #[serde(rename = "drain_timeout_seconds", with = "seconds")]
    pub drain_timeout: Duration,
    /// Messages buffered per GenerateStream before the gateway stops reading the decoder.
    pub stream_buffer_messages: usize,
    /// Log JSON lines instead of text.
    pub log_json: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            stream_buffer_messages: 16,
            log_json: false,
        }
    }
}

/// How the replicas of a pool are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// A fixed list of `http://host:port` URIs.
    Static(Vec<String>),
    /// Every address `host:port` resolves to, re-resolved every `refresh`.
    Dns {
        /// `host:port`.
        name: String,
        /// Re-resolution period.
        refresh: Duration,
    },
}

/// A validated pool configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Where the replicas are.
    pub discovery: Discovery,
    /// Connection timeout to one replica.
    pub connect_timeout: Duration,
    /// Upper bound of one call, if any.
    pub call_timeout: Option<Duration>,
    /// Most replicas tried for one call.
    pub max_attempts: NonZeroU32,
    /// Probe period.
    pub probe_interval: Duration,
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
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: NonZeroUsize,
}

/// The validated gateway configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Where `tokenizer.json` is.
    pub model_dir: PathBuf,
    /// The encoder pool.
    pub encoder: PoolConfig,
    /// The decoder pool.
    pub decoder: PoolConfig,
    /// Request limits.
    pub limits: Limits,
    /// Embedding cache bound in bytes (0: off).
    pub cache_capacity_bytes: u64,
    /// Drain period on shutdown.
    pub drain_timeout: Duration,
    /// Messages buffered per stream.
    pub stream_buffer_messages: NonZeroUsize,
    /// JSON logs.
    pub log_json: bool,
    /// Where `GET /metrics` is served.
    pub metrics_listen: SocketAddr,
}

impl GatewayConfig {
    /// Loads and validates the layered configuration.
    pub fn load(layers: &Layers) -> Result<Self, StartError> {
        let raw: RawConfig = kosmos_runtime::config::load(layers)?;
        Self::try_from(raw)
    }
}

fn config_error(message: impl Into<String>) -> StartError {
    StartError::Config(message.into())
}

/// `host:port` or `http://host:port` as a URI tonic accepts.
pub fn endpoint_uri(endpoint: &str) -> String {
    let trimmed = endpoint.trim();
    if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    }
}

fn pool(raw: RawPool, name: &str) -> Result<PoolConfig, StartError> {
    let has_dns = !raw.dns.trim().is_empty();
    let discovery = match (raw.endpoints.is_empty(), has_dns) {
        (true, false) => {
            return Err(config_error(format!(
                "`{name}.endpoints` or `{name}.dns` must name at least one replica"
            )));
        }
        (false, true) => {
            return Err(config_error(format!(
                "`{name}.endpoints` and `{name}.dns` are exclusive, both are set"
            )));
        }
        (false, false) => {
            let uris: Vec<String> = raw.endpoints.iter().map(|e| endpoint_uri(e)).collect();
            for uri in &uris {
                tonic::transport::Endpoint::from_shared(uri.clone()).map_err(|err| {
                    config_error(format!(
                        "`{name}.endpoints` entry `{uri}` is not a valid URI: {err}"
                    ))
                })?;
            }
            Discovery::Static(uris)
        }
        (true, true) => {
            let dns = raw.dns.trim().to_string();
            let port_ok = dns
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(config_error(format!(
                    "`{name}.dns` must be `host:port`, got `{dns}`"
                )));
            }
            if raw.dns_refresh.is_zero() {
                return Err(config_error(format!(
                    "`{name}.dns_refresh_seconds` must be > 0"
                )));
            }
            Discovery::Dns {
                name: dns,
                refresh: raw.dns_refresh,
            }
        }
    };
    let max_attempts = NonZeroU32::new(raw.max_attempts)
        .ok_or_else(|| config_error(format!("`{name}.max_attempts` must be >= 1")))?;
    if raw.probe_interval.is_zero() {
        return Err(config_error(format!(
            "`{name}.probe_interval_seconds` must be > 0"
        )));
    }
    if raw.connect_timeout.is_zero() {
        return Err(config_error(format!(
            "`{name}.connect_timeout_seconds` must be > 0"
        )));
    }
    Ok(PoolConfig {
        discovery,
        connect_timeout: raw.connect_timeout,
        call_timeout: (!raw.call_timeout.is_zero()).then_some(raw.call_timeout),
        max_attempts,
        probe_interval: raw.probe_interval,
    })
}

fn positive(value: u64, key: &str) -> Result<(), StartError> {
    if value == 0 {
        return Err(config_error(format!("`limits.{key}` must be >= 1")));
    }
    Ok(())
}

fn limits(raw: RawLimits) -> Result<Limits, StartError> {
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
            u64::from(raw.max_stop_string_bytes),
            "max_stop_string_bytes",
        ),
        (u64::from(raw.max_candidates), "max_candidates"),
        (u64::from(raw.max_candidate_bytes), "max_candidate_bytes"),
    ] {
        positive(value, key)?;
    }
    if raw.default_max_new_tokens > raw.max_new_tokens {
        return Err(config_error(format!(
            "`limits.default_max_new_tokens` ({}) must be <= `limits.max_new_tokens` ({})",
            raw.default_max_new_tokens, raw.max_new_tokens
        )));
    }
    for (value, key) in [
        (raw.max_temperature, "max_temperature"),
        (raw.max_repetition_penalty, "max_repetition_penalty"),
    ] {
        if !value.is_finite() || value <= 0.0 {
            return Err(config_error(format!(
                "`limits.{key}` must be a number > 0, got {value}"
            )));
        }
    }
    let max_concurrent_requests = NonZeroUsize::new(raw.max_concurrent_requests as usize)
        .ok_or_else(|| config_error("`limits.max_concurrent_requests` must be >= 1"))?;
    let max_message_bytes = usize::try_from(raw.max_message_bytes)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| config_error("`limits.max_message_bytes` must be >= 1 and fit in memory"))?;
    let needed = raw
        .max_image_bytes
        .saturating_mul(u64::from(raw.max_images))
        .saturating_add(raw.max_text_bytes);
    if (max_message_bytes.get() as u64) < needed {
        tracing::warn!(
            max_message_bytes = max_message_bytes.get(),
            needed,
            "limits.max_message_bytes is smaller than max_images × max_image_bytes + max_text_bytes; the largest \
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
    })
}

impl TryFrom<RawConfig> for GatewayConfig {
    type Error = StartError;

    fn try_from(raw: RawConfig) -> Result<Self, StartError> {
        let listen: SocketAddr = raw.listen.parse().map_err(|err| {
            config_error(format!(
                "`listen` must be an ip:port address, got `{}`: {err}",
                raw.listen
            ))
        })?;
        if raw.model_dir.as_os_str().is_empty() {
            return Err(config_error(
                "`model_dir` must name the model directory (its tokenizer.json)",
            ));
        }
        let metrics_listen = raw.metrics.listen_address().map_err(config_error)?;
        let stream_buffer_messages = NonZeroUsize::new(raw.server.stream_buffer_messages)
            .ok_or_else(|| config_error("`server.stream_buffer_messages` must be >= 1"))?;
        Ok(Self {
            listen,
            model_dir: raw.model_dir,
            encoder: pool(raw.encoder, "encoder")?,
            decoder: pool(raw.decoder, "decoder")?,
            limits: limits(raw.limits)?,
            cache_capacity_bytes: raw.cache.capacity_bytes,
            drain_timeout: raw.server.drain_timeout,
            stream_buffer_messages,
            log_json: raw.server.log_json,
            metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(overrides: &[&str]) -> Layers {
        Layers {
            overrides: overrides.iter().map(|s| s.to_string()).collect(),
            env_prefix: ENV_PREFIX.into(),
            ..Layers::default()
        }
    }

    #[test]
    fn a_minimal_config_names_both_pools_and_the_model() {
        let config = GatewayConfig::load(&layers(&[
            "model_dir=/models/tiny",
            "encoder.endpoints=[\"127.0.0.1:1\", \"http://127.0.0.1:2\"]",
            "decoder.dns=decoder-headless:50052",
        ]))
        .expect("valid");
        assert_eq!(
            config.encoder.discovery,
            Discovery::Static(vec![
                "http://127.0.0.1:1".into(),
                "http://127.0.0.1:2".into()
            ])
        );
        assert!(
            matches!(config.decoder.discovery, Discovery::Dns { ref name, .. } if name == "decoder-headless:50052")
        );
        assert_eq!(config.encoder.call_timeout, None);
    }

    #[test]
    fn a_pool_without_replicas_or_with_both_sources_is_refused() {
        let err = GatewayConfig::load(&layers(&["model_dir=/m", "decoder.endpoints=[\"a:1\"]"]))
            .expect_err("no encoder");
        assert!(err.to_string().contains("encoder.endpoints"), "{err}");
        let err = GatewayConfig::load(&layers(&[
            "model_dir=/m",
            "encoder.endpoints=[\"a:1\"]",
            "encoder.dns=b:2",
            "decoder.endpoints=[\"a:1\"]",
        ]))
        .expect_err("both");
        assert!(err.to_string().contains("exclusive"), "{err}");
    }

    #[test]
    fn a_default_above_the_maximum_is_refused() {
        let err = GatewayConfig::load(&layers(&[
            "model_dir=/m",
            "encoder.endpoints=[\"a:1\"]",
            "decoder.endpoints=[\"a:1\"]",
            "limits.default_max_new_tokens=2000",
        ]))
        .expect_err("default > max");
        assert!(err.to_string().contains("default_max_new_tokens"), "{err}");
    }
}
