//! Configuration: a raw serde struct (file < environment `KOSMOS_DECODER__SECTION__KEY` < flags, merged by
//! `kosmos_runtime::config`) validated into [`DecoderConfig`].
//!
//! ```toml
//! model_dir = "/models/kosmos-2"
//! device = "cpu"            # cpu, cuda, cuda:N
//! dtype = "f32"             # f32, f16, bf16
//! image_placeholder_first_id = 4
//!
//! [scheduler]
//! max_running_sequences = 32
//! kv_token_budget = 0       # token positions of the paged KV pool; 0: max_running_sequences × the context length
//! kv_block_size = 16        # token positions per KV block
//! prefix_caching = true     # share the blocks of common prompt prefixes between requests
//! kv_cache_dtype = "auto"   # auto (the weights' dtype), f32, f16, bf16; narrower than the weights: CPU only
//! max_waiting_requests = 256
//! max_prefill_tokens_per_step = 4096
//! stream_buffer_messages = 16
//! stalled_poll_seconds = 0.002
//! paused_timeout_seconds = 60.0    # a stream whose client has not read for this long is dropped, its KV freed
//!
//! [limits]
//! max_score_candidates = 64
//! max_candidate_tokens = 256
//!
//! [server]                  # shared by every service (kosmos_runtime::config)
//! listen = "0.0.0.0:50053"
//! drain_timeout_seconds = 30.0
//! log_json = false
//!
//! [grpc]
//! max_message_bytes = 67108864
//! keepalive_interval_seconds = 0.0   # 0: no keepalive pings
//!
//! [metrics]
//! listen = "0.0.0.0:9090"   # GET /metrics (Prometheus text); port 0: any free port
//! ```

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use kosmos_runtime::config::{
    ConfigError, Layers, RawGrpc, RawMetrics, RawServer, ServerSettings, invalid, required_path,
    seconds,
};
use serde::{Deserialize, Serialize};

/// The prefix of the decoder's environment variables.
pub const ENV_PREFIX: &str = "KOSMOS_DECODER";

/// The configuration as written in a file, before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// The model directory (Hugging Face layout); only its text half is loaded.
    pub model_dir: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Weights dtype: `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Id at the first image position (`<unk>` + 1 in the Kosmos-2 processor).
    pub image_placeholder_first_id: u32,
    /// Batching.
    pub scheduler: RawScheduler,
    /// Request limits.
    pub limits: RawLimits,
    /// Serving (shared section).
    pub server: RawServer,
    /// Transport (shared section).
    pub grpc: RawGrpc,
    /// Prometheus metrics (shared section).
    pub metrics: RawMetrics,
    /// `[tls]`, shared: the server's certificate, and the client CA for mTLS.
    pub tls: kosmos_runtime::tls::RawTls,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            model_dir: PathBuf::new(),
            device: "cpu".into(),
            dtype: "f32".into(),
            image_placeholder_first_id: 4,
            scheduler: RawScheduler::default(),
            limits: RawLimits::default(),
            server: RawServer::on_port(50053),
            grpc: RawGrpc::default(),
            metrics: RawMetrics::default(),
            tls: kosmos_runtime::tls::RawTls::default(),
        }
    }
}

/// `[scheduler]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawScheduler {
    /// Most requests in the running batch.
    pub max_running_sequences: usize,
    /// Token positions of the paged KV pool; 0 means `max_running_sequences` × the context length.
    pub kv_token_budget: usize,
    /// Token positions per KV block.
    pub kv_block_size: usize,
    /// Whether requests share the KV blocks of a common prompt prefix.
    pub prefix_caching: bool,
    /// Storage type of the KV cache: `auto` (the weights' dtype), `f32`, `f16` or `bf16`.
    pub kv_cache_dtype: String,
    /// Most requests waiting for admission.
    pub max_waiting_requests: usize,
    /// Most prompt tokens prefilled in one step.
    pub max_prefill_tokens_per_step: usize,
    /// Messages buffered per stream before its sequence pauses.
    pub stream_buffer_messages: usize,
    /// Sleep between looks while every running sequence waits for its client.
    #[serde(rename = "stalled_poll_seconds", with = "seconds")]
    pub stalled_poll: Duration,
    /// A sequence whose client has not taken a message for this long is dropped and its KV freed.
    #[serde(rename = "paused_timeout_seconds", with = "seconds")]
    pub paused_timeout: Duration,
}

impl Default for RawScheduler {
    fn default() -> Self {
        Self {
            max_running_sequences: 32,
            kv_token_budget: 0,
            kv_block_size: 16,
            prefix_caching: true,
            kv_cache_dtype: "auto".into(),
            max_waiting_requests: 256,
            max_prefill_tokens_per_step: 4096,
            stream_buffer_messages: 16,
            stalled_poll: Duration::from_millis(2),
            paused_timeout: Duration::from_secs(60),
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Most candidates in one `Score`.
    pub max_score_candidates: usize,
    /// Most tokens in one candidate.
    pub max_candidate_tokens: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_score_candidates: 64,
            max_candidate_tokens: 256,
        }
    }
}

/// Limits checked on every request at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most candidates in one `Score`.
    pub max_score_candidates: NonZeroUsize,
    /// Most tokens in one candidate.
    pub max_candidate_tokens: NonZeroUsize,
}

/// Scheduler settings before the model is known (the KV budget may depend on its context length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most requests in the running batch.
    pub max_running_sequences: NonZeroUsize,
    /// Token positions of the KV pool; `None`: `max_running_sequences` × the context length.
    pub kv_token_budget: Option<NonZeroUsize>,
    /// Most requests waiting for admission.
    pub max_waiting_requests: NonZeroUsize,
    /// Most prompt tokens prefilled in one step.
    pub max_prefill_tokens_per_step: NonZeroUsize,
    /// Messages buffered per stream.
    pub stream_buffer_messages: NonZeroUsize,
    /// Sleep between looks while every running sequence waits for its client.
    pub stalled_poll: Duration,
    /// How long a sequence may wait for its client to read before it is dropped.
    pub paused_timeout: Duration,
    /// Whether requests share the KV blocks of a common prompt prefix.
    pub prefix_caching: bool,
    /// Token positions per KV block.
    pub kv_block_size: NonZeroUsize,
    /// Storage type of the KV cache; `None`: the weights' dtype.
    pub kv_cache_dtype: Option<kosmos_model::DType>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// The model directory.
    pub model_dir: PathBuf,
    /// Device name as configured.
    pub device: String,
    /// Weights dtype.
    pub dtype: kosmos_model::DType,
    /// Id at the first image position.
    pub image_placeholder_first_id: u32,
    /// Batching.
    pub scheduler: SchedulerConfig,
    /// Request limits.
    pub limits: RequestLimits,
    /// `[server]`, `[grpc]` and `[metrics]`.
    pub server: ServerSettings,
}

/// A `scheduler.kv_cache_dtype` value: `auto` (`None`: the weights' dtype), `f32`, `f16` or `bf16`.
pub fn parse_kv_cache_dtype(name: &str) -> Result<Option<kosmos_model::DType>, ConfigError> {
    match name {
        "auto" => Ok(None),
        name => kosmos_model::parse_dtype(name).map(Some).map_err(|_| {
            invalid(
                "scheduler.kv_cache_dtype",
                format!("must be auto, f32, f16 or bf16, got `{name}`"),
            )
        }),
    }
}

fn positive(key: &str, value: usize) -> Result<NonZeroUsize, ConfigError> {
    kosmos_runtime::config::positive(key, value as u64)
}

impl TryFrom<RawConfig> for DecoderConfig {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let server = ServerSettings::from_raw(&raw.server, &raw.grpc, &raw.metrics, &raw.tls)?;
        let model_dir = required_path("model_dir", &raw.model_dir)?;
        let dtype = kosmos_model::parse_dtype(&raw.dtype)
            .map_err(|err| invalid("dtype", err.to_string()))?;
        let scheduler = &raw.scheduler;
        if scheduler.stalled_poll.is_zero() || scheduler.stalled_poll > Duration::from_secs(1) {
            return Err(invalid(
                "scheduler.stalled_poll_seconds",
                format!(
                    "must be in (0, 1], got {}",
                    scheduler.stalled_poll.as_secs_f64()
                ),
            ));
        }
        if scheduler.paused_timeout.is_zero() {
            return Err(invalid("scheduler.paused_timeout_seconds", "must be > 0"));
        }
        let kv_cache_dtype = parse_kv_cache_dtype(&scheduler.kv_cache_dtype)?;
        if let Some(kv) = kv_cache_dtype.filter(|&kv| kv != dtype)
            && raw.device != "cpu"
        {
            return Err(invalid(
                "scheduler.kv_cache_dtype",
                format!(
                    "{kv:?} differs from the weights' {dtype:?}: only the CPU ops convert, so on `{}` the KV cache \
                     stores the weights' dtype (set auto)",
                    raw.device
                ),
            ));
        }
        Ok(Self {
            model_dir,
            device: raw.device,
            dtype,
            image_placeholder_first_id: raw.image_placeholder_first_id,
            scheduler: SchedulerConfig {
                max_running_sequences: positive(
                    "scheduler.max_running_sequences",
                    scheduler.max_running_sequences,
                )?,
                kv_token_budget: NonZeroUsize::new(scheduler.kv_token_budget),
                kv_block_size: positive("scheduler.kv_block_size", scheduler.kv_block_size)?,
                prefix_caching: scheduler.prefix_caching,
                kv_cache_dtype,
                max_waiting_requests: positive(
                    "scheduler.max_waiting_requests",
                    scheduler.max_waiting_requests,
                )?,
                max_prefill_tokens_per_step: positive(
                    "scheduler.max_prefill_tokens_per_step",
                    scheduler.max_prefill_tokens_per_step,
                )?,
                stream_buffer_messages: positive(
                    "scheduler.stream_buffer_messages",
                    scheduler.stream_buffer_messages,
                )?,
                stalled_poll: scheduler.stalled_poll,
                paused_timeout: scheduler.paused_timeout,
            },
            limits: RequestLimits {
                max_score_candidates: positive(
                    "limits.max_score_candidates",
                    raw.limits.max_score_candidates,
                )?,
                max_candidate_tokens: positive(
                    "limits.max_candidate_tokens",
                    raw.limits.max_candidate_tokens,
                )?,
            },
            server,
        })
    }
}

impl DecoderConfig {
    /// Loads and validates the configuration from its layers.
    pub fn load(layers: &Layers) -> Result<Self, ConfigError> {
        let raw: RawConfig = kosmos_runtime::config::load(layers)?;
        Self::try_from(raw)
    }

    /// A configuration for `model_dir` with every other key at its default (tests, tools).
    pub fn for_model(model_dir: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        Self::try_from(RawConfig {
            model_dir: model_dir.into(),
            ..RawConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_the_defaults_and_bad_values_name_their_key() {
        let layers = Layers {
            env: vec![(
                "KOSMOS_DECODER__SCHEDULER__MAX_RUNNING_SEQUENCES".into(),
                "4".into(),
            )],
            env_prefix: ENV_PREFIX.into(),
            overrides: vec![
                "model_dir=/m".into(),
                "scheduler.stalled_poll_seconds=0.01".into(),
            ],
            ..Layers::default()
        };
        let config = DecoderConfig::load(&layers).expect("loads");
        assert_eq!(config.scheduler.max_running_sequences.get(), 4);
        assert_eq!(config.scheduler.stalled_poll, Duration::from_millis(10));
        assert_eq!(config.scheduler.kv_token_budget, None);
        assert_eq!(config.model_dir, PathBuf::from("/m"));
        let ports = (
            config.server.listen.port(),
            config.server.metrics_listen.port(),
        );
        assert_eq!(
            ports,
            (50053, 9090),
            "the decoder's own gRPC port, the shared metrics port"
        );

        for (overrides, message) in [
            (
                vec!["scheduler.kv_cache_dtype=f8"],
                "must be auto, f32, f16 or bf16, got `f8`",
            ),
            (
                vec!["scheduler.kv_cache_dtype=f16", "device=cuda"],
                "only the CPU ops convert",
            ),
        ] {
            let layers = Layers {
                overrides: [vec!["model_dir=/m"], overrides]
                    .concat()
                    .into_iter()
                    .map(String::from)
                    .collect(),
                ..Layers::default()
            };
            let err = DecoderConfig::load(&layers).expect_err("rejects");
            let err = err.to_string();
            assert!(
                err.contains("scheduler.kv_cache_dtype") && err.contains(message),
                "{err}"
            );
        }
        let half_kv = Layers {
            overrides: vec![
                "model_dir=/m".into(),
                "scheduler.kv_cache_dtype=bf16".into(),
            ],
            ..Layers::default()
        };
        let half_kv = DecoderConfig::load(&half_kv).expect("loads");
        assert_eq!(
            half_kv.scheduler.kv_cache_dtype,
            Some(kosmos_model::DType::BF16)
        );
        assert_eq!(config.scheduler.kv_cache_dtype, None, "auto by default");
        let same_on_gpu = Layers {
            overrides: vec![
                "model_dir=/m".into(),
                "device=cuda".into(),
                "dtype=f16".into(),
                "scheduler.kv_cache_dtype=f16".into(),
            ],
            ..Layers::default()
        };
        DecoderConfig::load(&same_on_gpu).expect("the weights' own dtype is fine on a GPU");

        let bad_metrics = Layers {
            overrides: vec!["model_dir=/m".into(), "metrics.listen=nowhere".into()],
            ..Layers::default()
        };
        let err = DecoderConfig::load(&bad_metrics).expect_err("rejects");
        assert!(err.to_string().contains("metrics.listen"), "{err}");

        let zero = Layers {
            overrides: vec![
                "model_dir=/m".into(),
                "scheduler.max_waiting_requests=0".into(),
            ],
            ..Layers::default()
        };
        let err = DecoderConfig::load(&zero).expect_err("rejects");
        assert!(
            err.to_string().contains("scheduler.max_waiting_requests"),
            "{err}"
        );

        let unknown = Layers {
            overrides: vec!["scheduler.max_runing=3".into()],
            ..Layers::default()
        };
        let err = DecoderConfig::load(&unknown).expect_err("rejects");
        assert!(err.to_string().contains("max_runing"), "{err}");

        let missing = DecoderConfig::load(&Layers::default()).expect_err("needs a model");
        assert!(missing.to_string().contains("model_dir"), "{missing}");
    }
}
