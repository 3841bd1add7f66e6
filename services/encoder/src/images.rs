//! Untrusted images at the edge: cheap checks on the bytes first (size, format, declared MIME type), then on the
//! blocking pool the header's dimensions (before any pixel buffer exists), one decode and the model family's
//! preprocessing (CLIP for KOSMOS-1 / Kosmos-2, flattened patches for Kosmos-2.5).

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use kosmos_processor::{
    AcceptedFormat, DecodeLimits, FlattenedPatchConfig, ImageProcessorConfig, ImageRejection,
    check_encoded, check_header, decode_image, flatten_patches, preprocess,
};
use tokio::sync::Semaphore;

use crate::config::Limits;
use crate::engine::ModelInput;
use crate::error::RequestError;
use crate::metrics::EncoderMetrics;

/// Allocation slack the decoder may use beyond the decoded pixels (row buffers, JPEG component planes).
const DECODER_SLACK_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes per pixel of the widest layout a decoder may produce (16-bit RGBA).
const MAX_BYTES_PER_PIXEL: u64 = 8;

/// An image whose bytes passed the cheap checks: within `max_image_bytes`, an accepted format that agrees with
/// the declared MIME type. Not decoded yet.
#[derive(Debug, Clone)]
pub struct CheckedImage {
    /// Index of the image in its request (named in every error).
    pub index: usize,
    /// The encoded bytes.
    pub bytes: Vec<u8>,
    /// The format recognised from the bytes.
    pub format: AcceptedFormat,
}

fn rejected(index: usize, reason: ImageRejection) -> RequestError {
    RequestError::Image { index, reason }
}

/// Checks the bytes of image `index` against the limits without decoding anything
/// ([`kosmos_processor::check_encoded`]: size, emptiness, sniffed format, declared `mime_type`,
/// `limits.formats`).
pub fn check_image(
    index: usize,
    bytes: Vec<u8>,
    declared_mime_type: &str,
    limits: &Limits,
) -> Result<CheckedImage, RequestError> {
    let format = check_encoded(&bytes, declared_mime_type, &limits.image)
        .map_err(|reason| rejected(index, reason))?;
    Ok(CheckedImage {
        index,
        bytes,
        format,
    })
}

/// What a decoded image becomes, by model family.
#[derive(Debug, Clone)]
pub enum Pipeline {
    /// CLIP preprocessing with the checkpoint's `preprocessor_config.json` to `(3, image_size, image_size)`.
    Clip {
        /// The CLIP image processor's settings.
        config: ImageProcessorConfig,
        /// The tower's input side.
        image_size: usize,
    },
    /// Kosmos-2.5: flattened patches with the checkpoint's `Kosmos2_5ImageProcessor` settings.
    Pages {
        /// Patch size and patch budget.
        config: FlattenedPatchConfig,
        /// The tower's row and column tables: a page's grid must stay below it on both sides.
        max_num_patches: usize,
    },
}

/// Decodes and preprocesses images on tokio's blocking pool, at most `workers` at a time across all requests.
#[derive(Debug)]
pub struct Preprocessor {
    limits: Limits,
    pipeline: Pipeline,
    workers: Arc<Semaphore>,
    metrics: Option<Arc<EncoderMetrics>>,
}

impl Preprocessor {
    /// A preprocessor producing `(3, image_size, image_size)` pixels with `config` (the checkpoint's
    /// `preprocessor_config.json`).
    pub fn new(
        limits: Limits,
        config: ImageProcessorConfig,
        image_size: usize,
        workers: NonZeroUsize,
    ) -> Self {
        Self::with_pipeline(limits, Pipeline::Clip { config, image_size }, workers)
    }

    /// A preprocessor running `pipeline`.
    pub fn with_pipeline(limits: Limits, pipeline: Pipeline, workers: NonZeroUsize) -> Self {
        Self {
            limits,
            pipeline,
            workers: Arc::new(Semaphore::new(workers.get())),
            metrics: None,
        }
    }

    /// Records decode and preprocess times and rejected images in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<EncoderMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The limits the decoder enforces on its own, a second line behind the header checks.
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_width: self.limits.image.max_image_width,
            max_height: self.limits.image.max_image_height,
            max_alloc_bytes: self
                .limits
                .image
                .max_image_pixels
                .saturating_mul(MAX_BYTES_PER_PIXEL)
                .saturating_add(DECODER_SLACK_BYTES),
        }
    }

    /// Header check, decode and preprocessing of one image, on the calling thread (blocking, CPU-bound).
    pub fn process_one(&self, image: &CheckedImage) -> Result<ModelInput, RequestError> {
        let index = image.index;
        check_header(&image.bytes, image.format, &self.limits.image)
            .map_err(|reason| rejected(index, reason))?;
        let decode_started = Instant::now();
        let rgb = decode_image(&image.bytes, &self.decode_limits())
            .map_err(|err| rejected(index, err.into()))?;
        let preprocess_started = Instant::now();
        if let Some(metrics) = &self.metrics {
            metrics.image_decoded(preprocess_started - decode_started);
        }
        let failed = |message: String| RequestError::Preprocess { index, message };
        let input = match &self.pipeline {
            Pipeline::Clip { config, image_size } => {
                let values = preprocess(&rgb, config).map_err(|err| failed(err.to_string()))?;
                let expected = [3, *image_size, *image_size];
                if values.shape() != expected {
                    return Err(RequestError::Internal(format!(
                        "images[{index}]: preprocessing produced {:?}, the model expects {expected:?}",
                        values.shape()
                    )));
                }
                ModelInput::Pixels(values)
            }
            Pipeline::Pages {
                config,
                max_num_patches,
            } => {
                // A very thin page gets a grid longer than the tower's row or column table on one side.
                let (rows, cols) = config.grid((rgb.height(), rgb.width()));
                if rows >= *max_num_patches || cols >= *max_num_patches {
                    return Err(failed(format!(
                        "a {}x{} page gives a grid of {rows}x{cols} patches; the model numbers rows and columns \
                         below {max_num_patches} (max_num_patches): the page is too thin",
                        rgb.width(),
                        rgb.height()
                    )));
                }
                ModelInput::Page(
                    flatten_patches(&rgb, config).map_err(|err| failed(err.to_string()))?,
                )
            }
        };
        if let Some(metrics) = &self.metrics {
            metrics.image_preprocessed(preprocess_started.elapsed());
        }
        Ok(input)
    }

    /// Processes every image of a request in parallel on the blocking pool; on failure, the error of the first
    /// failing image in request order.
    pub async fn process_all(
        self: &Arc<Self>,
        images: Vec<CheckedImage>,
    ) -> Result<Vec<ModelInput>, RequestError> {
        let mut tasks = Vec::with_capacity(images.len());
        for image in images {
            // The permit is taken before spawning, so a burst of requests queues here (fairly, in arrival order)
            // instead of oversubscribing the cores with hundreds of blocking threads.
            let permit = Arc::clone(&self.workers)
                .acquire_owned()
                .await
                .map_err(|_| RequestError::ShuttingDown)?;
            let preprocessor = Arc::clone(self);
            // A child of the call's span, entered on the blocking thread that does the work.
            let span = tracing::info_span!(
                "encoder.preprocess",
                image.index = image.index,
                image.bytes = image.bytes.len()
            );
            let index = image.index;
            let task = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                span.in_scope(|| preprocessor.process_one(&image))
            });
            tasks.push((index, task));
        }
        let mut pixels = Vec::with_capacity(tasks.len());
        let mut first_error = None;
        for (index, task) in tasks {
            match task.await {
                Ok(Ok(values)) => pixels.push(values),
                Ok(Err(err)) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.image_rejected(&err);
                    }
                    first_error.get_or_insert(err);
                }
                Err(join_error) => {
                    first_error.get_or_insert(RequestError::Internal(format!(
                        "images[{index}]: preprocessing failed: {join_error}"
                    )));
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(pixels),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            image: kosmos_processor::ImageLimits {
                max_image_bytes: 100,
                max_image_width: 64,
                max_image_height: 64,
                max_image_pixels: 1024,
                formats: vec![AcceptedFormat::Png, AcceptedFormat::Jpeg],
            },
            max_images_per_request: NonZeroUsize::MIN,
        }
    }

    const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    #[test]
    fn the_byte_limit_is_checked_before_anything_else() {
        let err = check_image(3, vec![0; 101], "", &limits()).expect_err("too big");
        assert_eq!(
            err.to_string(),
            "images[3]: 101 bytes, above the limit `limits.max_image_bytes` = 100"
        );
    }

    #[test]
    fn a_declared_mime_type_must_agree_with_the_bytes() {
        let err =
            check_image(0, PNG_SIGNATURE.to_vec(), "image/jpeg", &limits()).expect_err("mismatch");
        assert_eq!(
            err.to_string(),
            "images[0]: mime_type `image/jpeg` disagrees with the bytes, which are image/png"
        );
        let ok = check_image(0, PNG_SIGNATURE.to_vec(), "image/png", &limits()).expect("agrees");
        assert_eq!(ok.format, AcceptedFormat::Png);
        let err = check_image(0, PNG_SIGNATURE.to_vec(), "text/plain", &limits())
            .expect_err("unknown type");
        assert!(err.to_string().contains("`text/plain`"), "{err}");
    }

    #[test]
    fn a_supported_format_outside_the_accepted_list_is_refused() {
        let webp = b"RIFF\x24\0\0\0WEBPVP8 ".to_vec();
        let err = check_image(1, webp, "", &limits()).expect_err("webp not accepted");
        assert_eq!(
            err.to_string(),
            "images[1]: format image/webp is not accepted (`limits.formats` = image/png, image/jpeg)"
        );
    }

    #[test]
    fn a_page_too_thin_for_the_row_and_column_tables_is_refused_by_name() {
        let mut limits = limits();
        limits.image.max_image_bytes = 1 << 20;
        limits.image.max_image_width = 4096;
        limits.image.max_image_pixels = 1 << 20;
        let pages = |max_num_patches| {
            Preprocessor::with_pipeline(
                limits.clone(),
                Pipeline::Pages {
                    config: kosmos_processor::FlattenedPatchConfig {
                        patch_height: 4,
                        patch_width: 4,
                        max_patches: 16,
                    },
                    max_num_patches,
                },
                NonZeroUsize::MIN,
            )
        };
        // 2000 x 4: one row of 16 patches.
        let strip = image::RgbImage::from_pixel(2000, 4, image::Rgb([10, 200, 30]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        strip
            .write_to(&mut bytes, image::ImageFormat::Png)
            .expect("png");
        let checked = check_image(0, bytes.into_inner(), "image/png", &limits).expect("checked");
        let err = pages(16)
            .process_one(&checked)
            .expect_err("16 columns need ids up to 16");
        assert!(
            err.to_string().contains("1x16 patches") && err.to_string().contains("max_num_patches"),
            "{err}"
        );
        match pages(17).process_one(&checked).expect("17 ids are enough") {
            ModelInput::Page(page) => assert_eq!((page.rows, page.cols), (1, 16)),
            other => panic!("expected a page, got {other:?}"),
        }
    }
}
