//! The checks every service runs on untrusted image bytes before anything is decoded, with one set of messages:
//! the size, the format sniffed from the bytes (never from a name), the declared MIME type, the accepted
//! formats, then from the header the metadata (ICC, EXIF, XMP, text), the width, the height and the pixel count.
//!
//! [`check_encoded`] is the cheap part (no parsing beyond the magic bytes), [`check_header`] reads the header
//! (bounded: see [`crate::read_dimensions`]); [`check_image`] runs both. Every [`ImageRejection`] message names
//! the limit (as its `[limits]` key) and the value, and reads after the field it concerns:
//! `images[2]: 100000 pixels wide, above the limit `limits.max_image_width` = 8192`.

use crate::decode::{AcceptedFormat, read_dimensions, sniff_format};
use crate::error::DecodeError;

/// What an encoded image may be, checked from its bytes and its header; the names are the `[limits]` keys of
/// the services that enforce them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLimits {
    /// Most bytes per encoded image.
    pub max_image_bytes: u64,
    /// Widest image in pixels, from the header.
    pub max_image_width: u32,
    /// Tallest image in pixels, from the header.
    pub max_image_height: u32,
    /// Most pixels (width × height), from the header.
    pub max_image_pixels: u64,
    /// The accepted formats (`limits.formats`), in the order messages list them.
    pub formats: Vec<AcceptedFormat>,
}

/// What the header of an image that passed every check says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// The format sniffed from the bytes.
    pub format: AcceptedFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Why an image was refused, as the services report it after the field it concerns (`images[2]: …`). Every
/// message names the limit and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRejection {
    /// The encoded image is larger than `limits.max_image_bytes` (checked before anything else).
    #[error("{bytes} bytes, above the limit `limits.max_image_bytes` = {max}")]
    TooManyBytes {
        /// Bytes sent.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// No bytes at all.
    #[error("image is empty (0 bytes)")]
    Empty,
    /// The bytes are not JPEG, PNG or WebP.
    #[error("not a JPEG, PNG or WebP image (recognised: {format})")]
    UnsupportedFormat {
        /// What the bytes look like, or `unknown`.
        format: String,
    },
    /// The format is supported but not in `limits.formats`.
    #[error("format {format} is not accepted (`limits.formats` = {accepted})")]
    FormatNotAccepted {
        /// The detected format's MIME type.
        format: &'static str,
        /// The accepted MIME types, comma separated.
        accepted: String,
    },
    /// `mime_type` names no supported format.
    #[error("mime_type `{mime_type}` is not one of image/jpeg, image/png, image/webp")]
    UnknownMimeType {
        /// The declared type.
        mime_type: String,
    },
    /// `mime_type` disagrees with the bytes.
    #[error("mime_type `{declared}` disagrees with the bytes, which are {detected}")]
    MimeTypeMismatch {
        /// The declared type.
        declared: String,
        /// The detected type.
        detected: &'static str,
    },
    /// A metadata item, or all of them together, is above its limit.
    #[error("{item} holds at least {bytes} bytes, above the metadata limit of {max} bytes")]
    MetadataTooLarge {
        /// What was measured (`PNG iCCP chunk`, `JPEG ICC profile (APP2)`, `all metadata together`, ...).
        item: &'static str,
        /// Bytes measured when the limit was crossed (declared, or inflated up to one byte past the limit).
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The image holds more metadata items (chunks or segments) than allowed.
    #[error("more than {max} metadata items (ICC, EXIF, XMP, text chunks or segments)")]
    TooManyMetadataItems {
        /// The limit.
        max: u64,
    },
    /// The header's width exceeds `limits.max_image_width`.
    #[error("{width} pixels wide, above the limit `limits.max_image_width` = {max}")]
    TooWide {
        /// Width from the header.
        width: u32,
        /// The limit.
        max: u32,
    },
    /// The header's height exceeds `limits.max_image_height`.
    #[error("{height} pixels high, above the limit `limits.max_image_height` = {max}")]
    TooTall {
        /// Height from the header.
        height: u32,
        /// The limit.
        max: u32,
    },
    /// The header's width × height exceeds `limits.max_image_pixels`.
    #[error(
        "{width}x{height} = {pixels} pixels, above the limit `limits.max_image_pixels` = {max}"
    )]
    TooManyPixels {
        /// Width × height.
        pixels: u64,
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The limit.
        max: u64,
    },
    /// The header announces a zero width or height.
    #[error("image has a zero dimension ({width}x{height})")]
    ZeroSized {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
    },
    /// Decoding would allocate more than the decoder's budget.
    #[error("decoding needs {needed} bytes, above the decoder's allocation budget of {max} bytes")]
    DecoderMemory {
        /// Bytes needed, as far as known.
        needed: u64,
        /// The budget.
        max: u64,
    },
    /// The bytes claim a supported format but do not decode.
    #[error("corrupt image data: {0}")]
    Corrupt(String),
}

impl From<DecodeError> for ImageRejection {
    fn from(error: DecodeError) -> Self {
        match error {
            DecodeError::Empty => Self::Empty,
            DecodeError::UnsupportedFormat { format } => Self::UnsupportedFormat { format },
            DecodeError::TooLarge {
                width,
                max_width,
                height,
                max_height,
            } => {
                if width > max_width {
                    Self::TooWide {
                        width,
                        max: max_width,
                    }
                } else {
                    Self::TooTall {
                        height,
                        max: max_height,
                    }
                }
            }
            DecodeError::TooManyBytes {
                needed_bytes,
                max_bytes,
            } => Self::DecoderMemory {
                needed: needed_bytes,
                max: max_bytes,
            },
            DecodeError::ZeroSized { width, height } => Self::ZeroSized { width, height },
            DecodeError::MetadataTooLarge {
                item,
                bytes,
                max_bytes,
            } => Self::MetadataTooLarge {
                item,
                bytes,
                max: max_bytes,
            },
            DecodeError::TooManyMetadataItems { max_items } => {
                Self::TooManyMetadataItems { max: max_items }
            }
            DecodeError::Corrupt(message) => Self::Corrupt(message),
        }
    }
}

/// The cheap checks, in order: size (so an oversized image costs nothing more), emptiness, the format sniffed
/// from the bytes, the declared `mime_type` (when not blank it must be a MIME type naming the same format), then
/// `limits.formats`.
pub fn check_encoded(
    bytes: &[u8],
    declared_mime_type: &str,
    limits: &ImageLimits,
) -> Result<AcceptedFormat, ImageRejection> {
    let size = bytes.len() as u64;
    if size > limits.max_image_bytes {
        return Err(ImageRejection::TooManyBytes {
            bytes: size,
            max: limits.max_image_bytes,
        });
    }
    let detected = sniff_format(bytes)?;
    let declared = declared_mime_type.trim();
    if !declared.is_empty() {
        let declared_format = AcceptedFormat::from_mime_type(declared).ok_or_else(|| {
            ImageRejection::UnknownMimeType {
                mime_type: declared.to_owned(),
            }
        })?;
        if declared_format != detected {
            return Err(ImageRejection::MimeTypeMismatch {
                declared: declared.to_owned(),
                detected: detected.mime_type(),
            });
        }
    }
    if !limits.formats.contains(&detected) {
        let accepted: Vec<&str> = limits.formats.iter().map(|f| f.mime_type()).collect();
        return Err(ImageRejection::FormatNotAccepted {
            format: detected.mime_type(),
            accepted: accepted.join(", "),
        });
    }
    Ok(detected)
}

/// The header checks of bytes that passed [`check_encoded`] as `format`: metadata within their limits, then a
/// non-zero width and height within `limits`. Bounded work and memory whatever the bytes (CPU work that grows
/// with the input: callers in async code run it on a blocking thread).
pub fn check_header(
    bytes: &[u8],
    format: AcceptedFormat,
    limits: &ImageLimits,
) -> Result<ImageHeader, ImageRejection> {
    let (width, height) = read_dimensions(bytes)?;
    if width == 0 || height == 0 {
        return Err(ImageRejection::ZeroSized { width, height });
    }
    if width > limits.max_image_width {
        return Err(ImageRejection::TooWide {
            width,
            max: limits.max_image_width,
        });
    }
    if height > limits.max_image_height {
        return Err(ImageRejection::TooTall {
            height,
            max: limits.max_image_height,
        });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_image_pixels {
        return Err(ImageRejection::TooManyPixels {
            pixels,
            width,
            height,
            max: limits.max_image_pixels,
        });
    }
    Ok(ImageHeader {
        format,
        width,
        height,
    })
}

/// [`check_encoded`] then [`check_header`].
pub fn check_image(
    bytes: &[u8],
    declared_mime_type: &str,
    limits: &ImageLimits,
) -> Result<ImageHeader, ImageRejection> {
    let format = check_encoded(bytes, declared_mime_type, limits)?;
    check_header(bytes, format, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ImageLimits {
        ImageLimits {
            max_image_bytes: 100,
            max_image_width: 64,
            max_image_height: 64,
            max_image_pixels: 1024,
            formats: vec![AcceptedFormat::Png, AcceptedFormat::Jpeg],
        }
    }

    const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    #[test]
    fn the_byte_limit_is_checked_before_anything_else() {
        let err = check_encoded(&[0; 101], "", &limits()).expect_err("too big");
        assert_eq!(
            err.to_string(),
            "101 bytes, above the limit `limits.max_image_bytes` = 100"
        );
    }

    #[test]
    fn a_declared_mime_type_must_be_a_mime_type_that_agrees_with_the_bytes() {
        let err = check_encoded(PNG_SIGNATURE, "image/jpeg", &limits()).expect_err("mismatch");
        assert_eq!(
            err.to_string(),
            "mime_type `image/jpeg` disagrees with the bytes, which are image/png"
        );
        assert_eq!(
            check_encoded(PNG_SIGNATURE, " IMAGE/PNG ", &limits()),
            Ok(AcceptedFormat::Png)
        );
        for declared in ["text/plain", "png"] {
            let err =
                check_encoded(PNG_SIGNATURE, declared, &limits()).expect_err("not a mime type");
            assert!(err.to_string().contains(&format!("`{declared}`")), "{err}");
        }
    }

    #[test]
    fn a_supported_format_outside_the_accepted_list_is_refused() {
        let err = check_encoded(b"RIFF\x24\0\0\0WEBPVP8 ", "", &limits()).expect_err("webp");
        assert_eq!(
            err.to_string(),
            "format image/webp is not accepted (`limits.formats` = image/png, image/jpeg)"
        );
    }

    #[test]
    fn header_dimensions_name_the_limit_they_exceed() {
        let header_only = |width: u32, height: u32| kosmos_testkit::png::header_only(width, height);
        let cases = [
            (
                header_only(65, 1),
                "65 pixels wide, above the limit `limits.max_image_width` = 64",
            ),
            (
                header_only(1, 65),
                "65 pixels high, above the limit `limits.max_image_height` = 64",
            ),
            (
                header_only(40, 40),
                "40x40 = 1600 pixels, above the limit `limits.max_image_pixels` = 1024",
            ),
        ];
        for (png, expected) in cases {
            let err = check_header(&png, AcceptedFormat::Png, &limits()).expect_err(expected);
            assert_eq!(err.to_string(), expected);
        }
        let header = check_image(&header_only(8, 4), "image/png", &limits()).expect("small");
        assert_eq!((header.width, header.height), (8, 4));
    }
}
