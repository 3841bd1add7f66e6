//! Configuration: a raw serde tree (defaults < TOML file < `KOSMOS_ENCODER__SECTION__KEY` < `--set key=value`)
//! merged by [`kosmos_runtime::config`], then validated into [`EncoderConfig`].
//!
//! ```toml
//! model_dir = "/models/kosmos-2"
//! device = "cpu"            # cpu | cuda | cuda:N
//! dtype = "f32"             # f32 | f16 | bf16 (weights and compute)
//!
//! [limits]
//! max_image_bytes = 20971520
//! max_image_width = 8192
//! max_image_height = 8192
//! max_image_pixels = 33554432
//! max_images_per_request = 16
//! formats = ["image/jpeg", "image/png", "image/webp"]
//!
//! [batching]
//! max_batch_images = 16
//! max_queue_delay_seconds = 0.005
//! max_queued_images = 256
//!
//! [preprocess]
//! workers = 0               # 0: one per core
//!
//! [server]                  # shared by every service (kosmos_runtime::config)
//! listen = "0.0.0.0:50052"
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

use kosmos_model::DType;
use kosmos_processor::{AcceptedFormat, ImageLimits};
use kosmos_runtime::config::{
    ConfigError, Layers, RawGrpc, RawMetrics, RawServer, ServerSettings, invalid, positive,
    required_path, seconds,
};
use serde::{Deserialize, Serialize};

/// The prefix of the environment variables that configure the encoder (`KOSMOS_ENCODER__LIMITS__MAX_WIDTH=4096`).
pub const ENV_PREFIX: &str = "KOSMOS_ENCODER";

/// Upper bound of `batching.max_queued_images`.
const MAX_QUEUED_IMAGES: usize = 1 << 16;

/// The configuration as written in files, the environment and flags; see the module docs for the keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Model directory in Hugging Face layout (`config.json`, `model.safetensors`, `preprocessor_config.json`).
    pub model_dir: PathBuf,
    /// Device the vision half runs on.
    pub device: String,
    /// Dtype of the weights and of the computation.
    pub dtype: String,
    /// Limits enforced on every request.
    pub limits: RawLimits,
    /// Dynamic batching.
    pub batching: RawBatching,
    /// Decoding and preprocessing.
    pub preprocess: RawPreprocess,
    /// Serving (shared section).
    pub server: RawServer,
    /// Transport (shared section).
    pub grpc: RawGrpc,
    /// Prometheus metrics (shared section).
    pub metrics: RawMetrics,
    /// `[tls]`, shared: the server's certificate, and the client CA for mTLS.
    pub tls: kosmos_runtime::tls::RawTls,
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Most bytes per encoded image.
    pub max_image_bytes: u64,
    /// Largest width in pixels.
    pub max_image_width: u32,
    /// Largest height in pixels.
    pub max_image_height: u32,
    /// Largest width × height.
    pub max_image_pixels: u64,
    /// Most images per request.
    pub max_images_per_request: u32,
    /// Accepted formats: `image/jpeg`, `image/png`, `image/webp` (or `jpeg`, `png`, `webp`).
    pub formats: Vec<String>,
}

/// `[batching]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBatching {
    /// Most images per engine batch.
    pub max_batch_images: u32,
    /// Longest time the first image of a batch waits for more, in seconds.
    #[serde(rename = "max_queue_delay_seconds", with = "seconds")]
    pub max_queue_delay: Duration,
    /// Most images admitted and not yet running; beyond it Encode answers RESOURCE_EXHAUSTED.
    pub max_queued_images: u32,
}

/// `[preprocess]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPreprocess {
    /// Images decoded and preprocessed at the same time on the blocking pool; 0 means one per core.
    pub workers: usize,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            dtype: "f32".into(),
            device: "cpu".into(),
            model_dir: PathBuf::new(),
            limits: RawLimits::default(),
            batching: RawBatching::default(),
            preprocess: RawPreprocess::default(),
            server: RawServer::on_port(50052),
            grpc: RawGrpc::default(),
            metrics: RawMetrics::default(),
            tls: kosmos_runtime::tls::RawTls::default(),
        }
    }
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_image_bytes: 20 * 1024 * 1024,
            max_image_width: 8192,
            max_image_height: 8192,
            max_image_pixels: 32 * 1024 * 1024,
            max_images_per_request: 16,
            formats: vec!["image/jpeg".into(), "image/png".into(), "image/webp".into()],
        }
    }
}

impl Default for RawBatching {
    fn default() -> Self {
        Self {
            max_batch_images: 16,
            max_queue_delay: Duration::from_millis(5),
            max_queued_images: 256,
        }
    }
}

/// The validated configuration of the encoder service.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Model directory.
    pub model_dir: PathBuf,
    /// Device name (`cpu`, `cuda`, `cuda:N`), resolved when the model loads.
    pub device: String,
    /// Dtype of the weights and of the computation.
    pub dtype: DType,
    /// Limits enforced on every request.
    pub limits: Limits,
    /// Dynamic batching.
    pub batching: Batching,
    /// Images decoded and preprocessed at the same time.
    pub preprocess_workers: NonZeroUsize,
    /// `[server]`, `[grpc]` and `[metrics]`.
    pub server: ServerSettings,
}

/// Limits enforced on every request, each named in the error that reports a violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Per image: bytes, accepted formats (in the configured order), width, height and pixels from the header.
    pub image: ImageLimits,
    /// Most images per request.
    pub max_images_per_request: NonZeroUsize,
}

/// Dynamic batching settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most images per engine batch.
    pub max_batch_images: NonZeroUsize,
    /// Longest time the first image of a batch waits for more.
    pub max_queue_delay: Duration,
    /// Most images admitted and not yet running.
    pub max_queued_images: NonZeroUsize,
}

impl EncoderConfig {
    /// Merges the layers over the defaults and validates the result.
    pub fn load(layers: &Layers) -> Result<Self, ConfigError> {
        let raw: RawConfig = kosmos_runtime::config::load(layers)?;
        Self::try_from(raw)
    }

    /// The configuration of `overrides` (`key=value`) over the defaults, without file or environment (tests).
    pub fn from_overrides<S: AsRef<str>>(overrides: &[S]) -> Result<Self, ConfigError> {
        Self::load(&Layers {
            env_prefix: ENV_PREFIX.into(),
            overrides: overrides.iter().map(|s| s.as_ref().to_string()).collect(),
            ..Layers::default()
        })
    }
}

impl TryFrom<RawConfig> for EncoderConfig {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let model_dir = required_path("model_dir", &raw.model_dir)?;
        let dtype = kosmos_model::parse_dtype(&raw.dtype)
            .map_err(|_| invalid("dtype", format!("`{}` is not f32, f16 or bf16", raw.dtype)))?;
        let limits = validate_limits(&raw.limits)?;
        let batching = Batching {
            max_batch_images: positive(
                "batching.max_batch_images",
                raw.batching.max_batch_images.into(),
            )?,
            max_queue_delay: raw.batching.max_queue_delay,
            max_queued_images: positive(
                "batching.max_queued_images",
                raw.batching.max_queued_images.into(),
            )?,
        };
        // The queue's channel holds one slot per queued image, allocated up front.
        if batching.max_queued_images.get() > MAX_QUEUED_IMAGES {
            return Err(invalid(
                "batching.max_queued_images",
                format!(
                    "must be at most {MAX_QUEUED_IMAGES}, got {}",
                    batching.max_queued_images
                ),
            ));
        }
        // A request is admitted whole, so one that the queue could never hold must be refused by the limits.
        if batching.max_queued_images < limits.max_images_per_request {
            return Err(invalid(
                "batching.max_queued_images",
                format!(
                    "must be at least limits.max_images_per_request ({}), got {}",
                    limits.max_images_per_request, batching.max_queued_images
                ),
            ));
        }
        let preprocess_workers = match NonZeroUsize::new(raw.preprocess.workers) {
            Some(workers) => workers,
            None => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        };
        let server = ServerSettings::from_raw(&raw.server, &raw.grpc, &raw.metrics, &raw.tls)?;
        Ok(Self {
            model_dir,
            device: raw.device,
            dtype,
            limits,
            batching,
            preprocess_workers,
            server,
        })
    }
}

fn validate_limits(raw: &RawLimits) -> Result<Limits, ConfigError> {
    positive("limits.max_image_bytes", raw.max_image_bytes)?;
    positive("limits.max_image_width", raw.max_image_width.into())?;
    positive("limits.max_image_height", raw.max_image_height.into())?;
    positive("limits.max_image_pixels", raw.max_image_pixels)?;
    let mut formats = Vec::with_capacity(raw.formats.len());
    for name in &raw.formats {
        let format = AcceptedFormat::from_name(name).ok_or_else(|| {
            invalid(
                "limits.formats",
                format!("`{name}` is not one of image/jpeg, image/png, image/webp"),
            )
        })?;
        if !formats.contains(&format) {
            formats.push(format);
        }
    }
    if formats.is_empty() {
        return Err(invalid("limits.formats", "at least one format is required"));
    }
    Ok(Limits {
        image: ImageLimits {
            max_image_bytes: raw.max_image_bytes,
            max_image_width: raw.max_image_width,
            max_image_height: raw.max_image_height,
            max_image_pixels: raw.max_image_pixels,
            formats,
        },
        max_images_per_request: positive(
            "limits.max_images_per_request",
            raw.max_images_per_request.into(),
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_with_a_model_are_valid() {
        let config = EncoderConfig::from_overrides(&["model_dir=/m"]).expect("valid");
        assert_eq!(config.batching.max_batch_images.get(), 16);
        assert_eq!(config.batching.max_queue_delay, Duration::from_millis(5));
        assert_eq!(config.limits.image.formats.len(), 3);
        assert_eq!(config.dtype, DType::F32);
        assert_eq!(config.server.listen.port(), 50052);
        assert_eq!(config.server.metrics_listen.port(), 9090);
    }

    #[test]
    fn a_missing_model_directory_is_named() {
        let err = EncoderConfig::from_overrides::<&str>(&[]).expect_err("no model");
        assert!(err.to_string().contains("`model_dir`"), "{err}");
    }

    #[test]
    fn environment_and_overrides_layer_over_the_defaults() {
        let layers = Layers {
            env: vec![
                ("KOSMOS_ENCODER__MODEL_DIR".into(), "/env".into()),
                (
                    "KOSMOS_ENCODER__BATCHING__MAX_QUEUE_DELAY_SECONDS".into(),
                    "0.05".into(),
                ),
            ],
            env_prefix: ENV_PREFIX.into(),
            overrides: vec!["limits.formats=[\"png\"]".into()],
            ..Layers::default()
        };
        let config = EncoderConfig::load(&layers).expect("valid");
        assert_eq!(config.model_dir, PathBuf::from("/env"));
        assert_eq!(config.batching.max_queue_delay, Duration::from_millis(50));
        assert_eq!(config.limits.image.formats, vec![AcceptedFormat::Png]);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (overrides, key) in [
            (
                vec!["model_dir=/m", "limits.formats=[\"gif\"]"],
                "limits.formats",
            ),
            (
                vec!["model_dir=/m", "batching.max_batch_images=0"],
                "batching.max_batch_images",
            ),
            (vec!["model_dir=/m", "dtype=f64"], "dtype"),
            (
                vec!["model_dir=/m", "metrics.listen=\"nowhere\""],
                "metrics.listen",
            ),
            (vec!["model_dir=/m", "metrics.port=9"], "port"),
            (vec!["model_dir=/m", "limits.max_widht=3"], "max_widht"),
            (
                vec!["model_dir=/m", "batching.max_queued_images=2"],
                "batching.max_queued_images",
            ),
        ] {
            let err = EncoderConfig::from_overrides(&overrides).expect_err("invalid");
            assert!(err.to_string().contains(key), "{overrides:?}: {err}");
        }
    }
}
