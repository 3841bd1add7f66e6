//! Parse, don't validate: wire requests become `Valid…` domain types here, and every violation is an
//! INVALID_ARGUMENT naming the field, the limit and the value.
//!
//! Image bytes are checked before anything is forwarded, by the checks the encoder runs too
//! ([`kosmos_processor::check_image`]): the size, the format from the magic bytes (never from a name or the MIME
//! type alone), the metadata, and the width and height from the header, so that a decompression bomb costs the
//! encoder pool nothing. Checking the headers and hashing the bytes is CPU work that grows with the request,
//! so [`validate_prompt`] runs on the blocking pool.

use std::sync::Arc;

use kosmos_processor::{AcceptedFormat, ImageRejection, check_image};
use kosmos_proto::v1 as pb;

mod params;

use crate::cache::ContentHash;
use crate::config::Limits;
use crate::error::RequestError;

pub use params::{ValidParams, validate_candidates, validate_params};

/// "`field` is value, above the limit `limits.name` = limit".
pub(crate) fn over(
    field: &str,
    value: impl std::fmt::Display,
    limit: &str,
    bound: impl std::fmt::Display,
) -> RequestError {
    RequestError::invalid(format!(
        "`{field}` is {value}, above the limit `limits.{limit}` = {bound}"
    ))
}

/// An image whose bytes passed the checks.
#[derive(Debug, Clone)]
pub struct ValidImage {
    /// Index of its segment in the request (for error messages).
    pub segment: usize,
    /// The encoded bytes, shared by retries and concurrent encodes.
    pub data: Arc<Vec<u8>>,
    /// The format recognised from the bytes.
    pub format: AcceptedFormat,
    /// Width from the header.
    pub width: u32,
    /// Height from the header.
    pub height: u32,
    /// Content hash of the bytes.
    pub hash: ContentHash,
}

impl ValidImage {
    /// The MIME type of the recognised format.
    pub fn mime_type(&self) -> &'static str {
        self.format.mime_type()
    }
}

/// One piece of a valid prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptPart {
    /// Text.
    Text(String),
    /// The image at this index of [`ValidPrompt::images`].
    Image(usize),
}

/// A prompt whose segments and images passed the checks.
#[derive(Debug, Clone)]
pub struct ValidPrompt {
    /// The segments, in order.
    pub parts: Vec<PromptPart>,
    /// The images, in order of appearance.
    pub images: Vec<ValidImage>,
}

/// Checks every segment of a prompt (`field` names it in errors) and every image's bytes.
pub fn validate_prompt(
    segments: Vec<pb::Segment>,
    limits: &Limits,
    field: &str,
) -> Result<ValidPrompt, RequestError> {
    if segments.is_empty() {
        return Err(RequestError::invalid(format!(
            "`{field}` must contain at least one segment"
        )));
    }
    if segments.len() > limits.max_segments {
        return Err(over(
            field,
            format!("{} segments", segments.len()),
            "max_segments",
            limits.max_segments,
        ));
    }
    let image_count = segments
        .iter()
        .filter(|segment| matches!(segment.kind, Some(pb::segment::Kind::Image(_))))
        .count();
    if image_count > limits.max_images {
        return Err(over(
            field,
            format!("{image_count} images"),
            "max_images",
            limits.max_images,
        ));
    }
    let text_bytes: u64 = segments
        .iter()
        .map(|segment| match &segment.kind {
            Some(pb::segment::Kind::Text(text)) => text.len() as u64,
            _ => 0,
        })
        .sum();
    if text_bytes > limits.max_text_bytes {
        return Err(over(
            field,
            format!("{text_bytes} bytes of text"),
            "max_text_bytes",
            limits.max_text_bytes,
        ));
    }
    let mut parts = Vec::with_capacity(segments.len());
    let mut images = Vec::with_capacity(image_count);
    for (index, segment) in segments.into_iter().enumerate() {
        match segment.kind {
            None => {
                return Err(RequestError::invalid(format!(
                    "`{field}[{index}]` has neither text nor an image"
                )));
            }
            Some(pb::segment::Kind::Text(text)) => parts.push(PromptPart::Text(text)),
            Some(pb::segment::Kind::Image(image)) => {
                let valid =
                    validate_image(image, limits, &format!("{field}[{index}].image"), index)?;
                parts.push(PromptPart::Image(images.len()));
                images.push(valid);
            }
        }
    }
    Ok(ValidPrompt { parts, images })
}

/// An image refused by the shared header checks, reported after the field it concerns: the MIME type's
/// refusals name `mime_type` themselves, every other one is about `data`.
fn image_error(field: &str, rejection: ImageRejection) -> RequestError {
    let subject = match rejection {
        ImageRejection::UnknownMimeType { .. } | ImageRejection::MimeTypeMismatch { .. } => {
            format!("`{field}`")
        }
        _ => format!("`{field}.data`"),
    };
    RequestError::invalid(format!("{subject}: {rejection}"))
}

fn validate_image(
    image: pb::Image,
    limits: &Limits,
    field: &str,
    segment: usize,
) -> Result<ValidImage, RequestError> {
    let header = check_image(&image.data, &image.mime_type, &limits.image_limits())
        .map_err(|rejection| image_error(field, rejection))?;
    let hash = ContentHash::of(&image.data);
    Ok(ValidImage {
        segment,
        data: Arc::new(image.data),
        format: header.format,
        width: header.width,
        height: header.height,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GatewayConfig, RawConfig};

    pub(super) fn limits() -> Limits {
        let mut raw = RawConfig {
            model_dir: "/m".into(),
            ..RawConfig::default()
        };
        raw.encoder.endpoints = vec!["a:1".into()];
        raw.decoder.endpoints = vec!["a:1".into()];
        GatewayConfig::try_from(raw).expect("valid").limits
    }

    fn png() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/images/a_gradient_48x32.png"
        ))
        .expect("fixture image")
    }

    fn image_segment(data: Vec<u8>, mime_type: &str) -> pb::Segment {
        pb::Segment {
            kind: Some(pb::segment::Kind::Image(pb::Image {
                data,
                mime_type: mime_type.into(),
            })),
        }
    }

    fn text_segment(text: &str) -> pb::Segment {
        pb::Segment {
            kind: Some(pb::segment::Kind::Text(text.into())),
        }
    }

    fn message(result: Result<ValidPrompt, RequestError>) -> String {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(err) => {
                assert_eq!(err.code(), tonic::Code::InvalidArgument);
                err.to_string()
            }
        }
    }

    #[test]
    fn a_valid_prompt_keeps_its_order_and_reads_the_header() {
        let prompt = validate_prompt(
            vec![
                text_segment("a"),
                image_segment(png(), "image/png"),
                text_segment("b"),
            ],
            &limits(),
            "prompt",
        )
        .expect("valid");
        assert_eq!(prompt.parts[1], PromptPart::Image(0));
        assert_eq!((prompt.images[0].width, prompt.images[0].height), (48, 32));
        assert_eq!(prompt.images[0].segment, 1);
    }

    #[test]
    fn bad_images_name_the_field_and_the_limit() {
        let limits = limits();
        let err = message(validate_prompt(
            vec![image_segment(b"not an image".to_vec(), "")],
            &limits,
            "prompt",
        ));
        assert!(err.contains("`prompt[0].image.data`"), "{err}");
        let err = message(validate_prompt(
            vec![image_segment(png(), "image/jpeg")],
            &limits,
            "prompt",
        ));
        assert_eq!(
            err,
            "`prompt[0].image`: mime_type `image/jpeg` disagrees with the bytes, which are image/png"
        );
        let mut small = limits.clone();
        small.max_image_width = 40;
        let err = message(validate_prompt(
            vec![image_segment(png(), "")],
            &small,
            "prompt",
        ));
        assert!(
            err.contains("limits.max_image_width` = 40") && err.contains("48 pixels wide"),
            "{err}"
        );
        let mut few = limits.clone();
        few.max_images = 1;
        let two = vec![image_segment(png(), ""), image_segment(png(), "")];
        let err = message(validate_prompt(two, &few, "prompt"));
        assert!(
            err.contains("max_images") && err.contains("2 images"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_prompt_or_segment_is_refused() {
        let err = message(validate_prompt(Vec::new(), &limits(), "prompt"));
        assert!(err.contains("at least one segment"), "{err}");
        let err = message(validate_prompt(
            vec![pb::Segment { kind: None }],
            &limits(),
            "prompt",
        ));
        assert!(err.contains("`prompt[0]`"), "{err}");
    }
}
