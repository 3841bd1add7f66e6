//! Every instrument of the encoder, in one place: names, help texts, units and buckets (the catalogue is
//! `docs/metrics.md`; the service tests compare `/metrics` with it). The common ones (`kosmos_build_info`,
//! `rpc_server_call_duration_seconds`) come from [`kosmos_runtime::metrics`].
//!
//! Recording is cheap (atomic adds behind the SDK) and happens where the events do: the engine thread records
//! batches and queue times, the blocking pool decode and preprocess times, the handlers rejections. The queue
//! length is an observable gauge read at every scrape.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kosmos_runtime::metrics::{Registry, STAGE_BUCKETS, histogram};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

use kosmos_processor::ImageRejection;

use crate::error::RequestError;

/// The OpenTelemetry names of the encoder's instruments (Prometheus adds `_seconds` / `_total`).
pub mod names {
    /// Histogram (s): `kosmos_encoder_queue_time_seconds`.
    pub const QUEUE_TIME: &str = "kosmos.encoder.queue_time";
    /// Histogram (images): `kosmos_encoder_batch_size`.
    pub const BATCH_SIZE: &str = "kosmos.encoder.batch_size";
    /// Counter: `kosmos_encoder_batch_executions_total`.
    pub const BATCH_EXECUTIONS: &str = "kosmos.encoder.batch_executions";
    /// Counter: `kosmos_encoder_images_encoded_total`.
    pub const IMAGES_ENCODED: &str = "kosmos.encoder.images_encoded";
    /// Histogram (s): `kosmos_encoder_encode_time_seconds`.
    pub const ENCODE_TIME: &str = "kosmos.encoder.encode_time";
    /// Histogram (s): `kosmos_encoder_image_decode_time_seconds`.
    pub const IMAGE_DECODE_TIME: &str = "kosmos.encoder.image_decode_time";
    /// Histogram (s): `kosmos_encoder_image_preprocess_time_seconds`.
    pub const IMAGE_PREPROCESS_TIME: &str = "kosmos.encoder.image_preprocess_time";
    /// Counter, label `reason`: `kosmos_encoder_images_rejected_total`.
    pub const IMAGES_REJECTED: &str = "kosmos.encoder.images_rejected";
    /// Gauge: `kosmos_encoder_queue_images`.
    pub const QUEUE_IMAGES: &str = "kosmos.encoder.queue_images";
}

/// Bucket boundaries of the batch size histogram (images per batch).
pub const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The `reason` label of a rejected image (`bytes`, `format`, `width`, `height`, `pixels` or `decode`); `None`
/// when the error is not about one image. Oversized metadata counts as `bytes`.
pub fn rejection_reason(error: &RequestError) -> Option<&'static str> {
    let reason = match error {
        RequestError::Image { reason, .. } => reason,
        RequestError::Preprocess { .. } => return Some("decode"),
        _ => return None,
    };
    Some(match reason {
        ImageRejection::TooManyBytes { .. }
        | ImageRejection::MetadataTooLarge { .. }
        | ImageRejection::TooManyMetadataItems { .. } => "bytes",
        ImageRejection::Empty
        | ImageRejection::UnsupportedFormat { .. }
        | ImageRejection::FormatNotAccepted { .. }
        | ImageRejection::UnknownMimeType { .. }
        | ImageRejection::MimeTypeMismatch { .. } => "format",
        ImageRejection::TooWide { .. } => "width",
        ImageRejection::TooTall { .. } => "height",
        // The decoder's budget is derived from `limits.max_image_pixels`.
        ImageRejection::TooManyPixels { .. } | ImageRejection::DecoderMemory { .. } => "pixels",
        ImageRejection::ZeroSized { .. } | ImageRejection::Corrupt(_) => "decode",
    })
}

/// The encoder's instruments on its own [`Registry`].
#[derive(Debug)]
pub struct EncoderMetrics {
    registry: Arc<Registry>,
    queue_time: Histogram<f64>,
    batch_size: Histogram<f64>,
    batch_executions: Counter<u64>,
    images_encoded: Counter<u64>,
    encode_time: Histogram<f64>,
    image_decode_time: Histogram<f64>,
    image_preprocess_time: Histogram<f64>,
    images_rejected: Counter<u64>,
}

impl EncoderMetrics {
    /// Declares every instrument of the encoder on `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        let meter = registry.meter();
        let counter = |name: &'static str, help: &'static str| {
            meter.u64_counter(name).with_description(help).build()
        };
        Self {
            queue_time: histogram(
                meter,
                names::QUEUE_TIME,
                "Time an image waited in the engine queue before its batch started.",
                "s",
                STAGE_BUCKETS,
            ),
            batch_size: histogram(
                meter,
                names::BATCH_SIZE,
                "Images per executed batch (its _count is the batches executed).",
                "",
                BATCH_SIZE_BUCKETS,
            ),
            batch_executions: counter(
                names::BATCH_EXECUTIONS,
                "Batches executed by the engine; mean batch size = images_encoded / batch_executions.",
            ),
            images_encoded: counter(names::IMAGES_ENCODED, "Images encoded into embeddings."),
            encode_time: histogram(
                meter,
                names::ENCODE_TIME,
                "Engine time of one batch (vision tower + connector).",
                "s",
                STAGE_BUCKETS,
            ),
            image_decode_time: histogram(
                meter,
                names::IMAGE_DECODE_TIME,
                "Time to decode one image file to pixels.",
                "s",
                STAGE_BUCKETS,
            ),
            image_preprocess_time: histogram(
                meter,
                names::IMAGE_PREPROCESS_TIME,
                "Time to resize and normalise one decoded image.",
                "s",
                STAGE_BUCKETS,
            ),
            images_rejected: counter(
                names::IMAGES_REJECTED,
                "Images refused by a limit or as undecodable (INVALID_ARGUMENT), by reason.",
            ),
            registry,
        }
    }

    /// The registry `/metrics` renders.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Publishes `queued` (images admitted and not yet running) as `kosmos_encoder_queue_images`, read at each
    /// scrape. Call once per engine.
    pub fn observe_queue(&self, queued: Arc<AtomicUsize>) {
        let _gauge = self
            .registry
            .meter()
            .u64_observable_gauge(names::QUEUE_IMAGES)
            .with_description("Images waiting in the engine queue.")
            .with_callback(move |observer| {
                observer.observe(queued.load(Ordering::Relaxed) as u64, &[]);
            })
            .build();
    }

    /// One successful batch of `images` images that took `encode_time` on the engine.
    pub fn batch_executed(&self, images: usize, encode_time: Duration) {
        self.batch_size.record(images as f64, &[]);
        self.batch_executions.add(1, &[]);
        self.images_encoded.add(images as u64, &[]);
        self.encode_time.record(encode_time.as_secs_f64(), &[]);
    }

    /// `images` images that waited `waited` in the queue before their batch started.
    pub fn queued(&self, images: usize, waited: Duration) {
        let seconds = waited.as_secs_f64();
        for _ in 0..images {
            self.queue_time.record(seconds, &[]);
        }
    }

    /// One image file decoded to pixels.
    pub fn image_decoded(&self, elapsed: Duration) {
        self.image_decode_time.record(elapsed.as_secs_f64(), &[]);
    }

    /// One decoded image resized and normalised.
    pub fn image_preprocessed(&self, elapsed: Duration) {
        self.image_preprocess_time
            .record(elapsed.as_secs_f64(), &[]);
    }

    /// Counts `error` when it refuses one image (nothing otherwise).
    pub fn image_rejected(&self, error: &RequestError) {
        if let Some(reason) = rejection_reason(error) {
            self.images_rejected
                .add(1, &[KeyValue::new("reason", reason)]);
        }
    }
}
