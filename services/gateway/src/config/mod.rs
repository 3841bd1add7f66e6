//! Configuration: a raw serde struct (file < environment `KOSMOS_GATEWAY__SECTION__KEY` < flags, merged by
//! `kosmos_runtime::config`) validated into [`GatewayConfig`].
//!
//! ```toml
//! model_dir = "/models/kosmos-2"      # only tokenizer.json is read
//! stream_buffer_messages = 16         # per GenerateStream, before the gateway stops reading the decoder
//!
//! [encoder]
//! endpoints = ["http://10.0.0.7:50052"] # a static list, or:
//! dns = "kosmos-encoder-headless:50052" # a name re-resolved every `dns_refresh_seconds` (headless Service)
//! dns_refresh_seconds = 5.0
//! connect_timeout_seconds = 2.0
//! call_timeout_seconds = 0.0            # 0: only the caller's deadline bounds a call
//! max_attempts = 3                      # every call may be retried on another replica before any answer
//! probe_interval_seconds = 1.0
//! retry_budget_percent = 20.0           # retries add at most 20 % to the calls (+ 10 a second)
//! retry_backoff_seconds = 0.025         # full-jitter exponential backoff between attempts, from this base
//! eject_after_failures = 5              # calls failing in a row that eject a replica (0: never)
//! ejection_seconds = 30.0               # a first ejection; doubled each time after, at most 10 times
//!
//! [decoder]
//! endpoints = ["http://10.0.0.8:50053"]
//!
//! [limits]
//! max_images = 8
//! max_image_bytes = 10485760
//! max_concurrent_requests = 256
//! max_inflight_bytes = 1073741824      # request bytes held at once, across calls
//! default_deadline_seconds = 300.0     # a call without a deadline gets this one (0: none)
//! max_deadline_seconds = 1800.0        # longer deadlines are shortened to this (0: no bound)
//! stream_idle_timeout_seconds = 60.0   # a stream whose caller stops reading ends, its decoder work freed
//! max_resumptions = 3                  # a generation whose decoder fails mid-stream resumes on another (0: never)
//! max_waiting_for_replica_seconds = 3.0 # a call to a pool with no replica waits (pending) this long for one
//! # … every limit of `Limits` in kosmos.v1
//!
//! [health]
//! ready_without_decoders = false       # true: `readiness` SERVING with no decoder (a pool that scales to zero)
//!
//! [cache]
//! capacity_bytes = 268435456           # 0 disables the embedding cache (partitioned by API key)
//!
//! [auth]
//! api_keys_file = "/etc/kosmos/keys/api-keys.toml"  # unset: open to every caller (see `crate::auth`)
//!
//! [tls]                                # shared: TLS / mTLS of the public port (kosmos_runtime::tls)
//! cert_file = "/etc/kosmos/tls/tls.crt"
//! key_file = "/etc/kosmos/tls/tls.key"
//! client_ca_file = ""                  # set: client certificates required
//!
//! [decoder.tls]                        # and [encoder.tls]: TLS to the pool's replicas
//! ca_file = "/etc/kosmos/tls/ca.crt"
//! cert_file = "/etc/kosmos/tls/tls.crt" # the gateway's client certificate (mTLS)
//! key_file = "/etc/kosmos/tls/tls.key"
//! server_name = "kosmos-decoder"       # default: the endpoint's host, or the `dns` name
//!
//! [server]                             # shared by every service (kosmos_runtime::config)
//! listen = "0.0.0.0:50051"
//! drain_timeout_seconds = 30.0
//! log_json = false
//!
//! [grpc]
//! max_message_bytes = 100663296        # 8 images of 10 MiB plus text, with room to spare
//! keepalive_interval_seconds = 0.0     # 0: no keepalive pings
//!
//! [metrics]
//! listen = "0.0.0.0:9090"              # GET /metrics (Prometheus text); port 0: any free port
//!
//! [http]                               # the OpenAI-compatible API (crate::http)
//! listen = "0.0.0.0:8000"              # unset (default) or "off": no HTTP API
//! request_timeout_seconds = 0.0        # 0: no bound but the client's; otherwise 504 beyond it
//! fetch_urls = false                   # fetch http(s):// image URLs (data: URIs are always accepted)
//! fetch_allow_hosts = []               # e.g. ["images.example.com", "*.cdn.example.com"]; empty: any host
//! fetch_allow_private = false          # reach private/loopback/link-local addresses (trusted networks only)
//! fetch_timeout_seconds = 10.0         # per image, redirects included
//! fetch_max_redirects = 3
//! fetch_max_urls = 4                   # per request; each fetch is capped at `limits.max_image_bytes`
//! fetch_ca_file = ""                   # PEM roots for https:// image servers; empty: Mozilla's (webpki-roots)
//! ```

mod http;
mod limits;
mod pool;

use std::num::NonZeroUsize;
use std::path::PathBuf;

use kosmos_runtime::config::{
    ConfigError, Layers, RawGrpc, RawMetrics, RawServer, ServerSettings, positive, required_path,
};
use serde::{Deserialize, Serialize};

pub use http::{FetchConfig, HttpConfig, RawHttp};
pub use limits::{Limits, RawLimits};
pub use pool::{Discovery, PoolConfig, RawPool, endpoint_uri};

/// The prefix of the gateway's environment variables.
pub const ENV_PREFIX: &str = "KOSMOS_GATEWAY";

/// The configuration as written in a file, before validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// The model directory; the gateway reads only its `tokenizer.json`.
    pub model_dir: PathBuf,
    /// `[server]`, shared by every service: listen address, drain, logs.
    pub server: RawServer,
    /// `[grpc]`, shared: message size, keepalive.
    pub grpc: RawGrpc,
    /// `[metrics]`, shared: the Prometheus endpoint.
    pub metrics: RawMetrics,
    /// `[tls]`, shared: the server's certificate, and the client CA for mTLS.
    pub tls: kosmos_runtime::tls::RawTls,
    /// Messages buffered per GenerateStream before the gateway stops reading the decoder.
    pub stream_buffer_messages: usize,
    /// The encoder pool.
    pub encoder: RawPool,
    /// The decoder pool.
    pub decoder: RawPool,
    /// Request limits.
    pub limits: RawLimits,
    /// The embedding cache.
    pub cache: RawCache,
    /// API keys.
    pub auth: RawAuth,
    /// `[http]`: the OpenAI-compatible API.
    pub http: RawHttp,
    /// `[health]`: what the gateway's readiness means.
    pub health: RawHealth,
}

/// `[health]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    /// `readiness` is SERVING even while no decoder serves (the decoder pool scales to zero and the requests
    /// that wake it must reach the gateway); by default the gateway is ready while its decoder pool serves.
    pub ready_without_decoders: bool,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            model_dir: PathBuf::new(),
            server: RawServer::on_port(50051),
            grpc: RawGrpc {
                // 8 images of 10 MiB plus text, with room to spare (tonic's 4 MiB default is far too small).
                max_message_bytes: 96 << 20,
                ..RawGrpc::default()
            },
            metrics: RawMetrics::default(),
            tls: kosmos_runtime::tls::RawTls::default(),
            stream_buffer_messages: 16,
            encoder: RawPool::default(),
            decoder: RawPool::default(),
            limits: RawLimits::default(),
            cache: RawCache::default(),
            auth: RawAuth::default(),
            http: RawHttp::default(),
            health: RawHealth::default(),
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    /// The API keys file (see [`crate::auth`]); empty: the gateway is open to every caller.
    pub api_keys_file: PathBuf,
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

/// The validated gateway configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
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
    /// Messages buffered per stream.
    pub stream_buffer_messages: NonZeroUsize,
    /// `[server]`, `[grpc]`, `[metrics]` and `[tls]`.
    pub server: ServerSettings,
    /// The API keys file (`auth.api_keys_file`), if any.
    pub api_keys_file: Option<PathBuf>,
    /// `[http]`.
    pub http: HttpConfig,
    /// `health.ready_without_decoders`.
    pub ready_without_decoders: bool,
}

impl GatewayConfig {
    /// Loads and validates the layered configuration.
    pub fn load(layers: &Layers) -> Result<Self, ConfigError> {
        let raw: RawConfig = kosmos_runtime::config::load(layers)?;
        Self::try_from(raw)
    }
}

impl TryFrom<RawConfig> for GatewayConfig {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let server = ServerSettings::from_raw(&raw.server, &raw.grpc, &raw.metrics, &raw.tls)?;
        Ok(Self {
            model_dir: required_path("model_dir", &raw.model_dir)?,
            encoder: pool::pool(raw.encoder, "encoder", raw.limits.max_waiting_for_replica)?,
            decoder: pool::pool(raw.decoder, "decoder", raw.limits.max_waiting_for_replica)?,
            limits: limits::limits(raw.limits, server.max_message_bytes)?,
            cache_capacity_bytes: raw.cache.capacity_bytes,
            stream_buffer_messages: positive(
                "stream_buffer_messages",
                raw.stream_buffer_messages as u64,
            )?,
            http: http::http(raw.http)?,
            server,
            api_keys_file: kosmos_runtime::reload::optional_path(&raw.auth.api_keys_file),
            ready_without_decoders: raw.health.ready_without_decoders,
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
            "decoder.dns=decoder-headless:50053",
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
            matches!(config.decoder.discovery, Discovery::Dns { ref name, .. } if name == "decoder-headless:50053")
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
