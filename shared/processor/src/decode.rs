//! Decoding untrusted image bytes into RGB, with limits checked from the header before any pixel buffer
//! is allocated.
//!
//! Only JPEG, PNG and WebP are accepted, recognised by content (never by a file name). The conversion to
//! RGB follows what transformers 5's `convert_to_rgb` does to the image Pillow decodes: grey is
//! replicated, palettes are expanded, and alpha is composited onto white (`Image.alpha_composite`).
//! EXIF orientation is ignored, as Pillow and HF ignore it.
//!
//! Every header read is bounded: the container's metadata is measured first ([`crate::metadata`]: ICC profiles,
//! EXIF, XMP and text, 1 MiB each as Pillow caps them), and the decoder's header parsing runs under an
//! allocation budget of [`header_alloc_budget`] bytes.
//!
//! Pixels match Pillow exactly for PNG. JPEG goes through `zune-jpeg`, whose IDCT rounds differently from
//! libjpeg-turbo's (Pillow's decoder; the colour conversion agrees): a few samples differ by a level or two.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::DecodeError;
use crate::metadata::{MAX_METADATA_BYTES, check_metadata};

/// Caller-chosen bounds on what an encoded image may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Maximum width in pixels, checked against the header.
    pub max_width: u32,
    /// Maximum height in pixels, checked against the header.
    pub max_height: u32,
    /// Maximum bytes the decoder may allocate, the decoded pixel buffer included.
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    /// 8192 x 8192 pixels and 512 MiB.
    fn default() -> Self {
        DecodeLimits {
            max_width: 8192,
            max_height: 8192,
            max_alloc_bytes: 512 * 1024 * 1024,
        }
    }
}

/// The container formats this crate decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptedFormat {
    /// JPEG (baseline and progressive).
    Jpeg,
    /// PNG.
    Png,
    /// WebP (lossy and lossless).
    WebP,
}

impl AcceptedFormat {
    /// Every format, in the order error messages list them.
    pub const ALL: [Self; 3] = [Self::Jpeg, Self::Png, Self::WebP];

    /// The MIME type of the format (`image/jpeg`, `image/png`, `image/webp`).
    pub fn mime_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::WebP => "image/webp",
        }
    }

    /// The format a MIME type or short name stands for (`image/png`, `png`, `image/jpg`, `jpg`; any case);
    /// `None` for anything else. The one MIME ↔ format table of the workspace.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "image/jpeg" | "image/jpg" | "jpeg" | "jpg" => Some(Self::Jpeg),
            "image/png" | "png" => Some(Self::Png),
            "image/webp" | "webp" => Some(Self::WebP),
            _ => None,
        }
    }

    /// The format a MIME type stands for (`image/png`, `image/jpeg`, `image/jpg`, `image/webp`; any case), as a
    /// request's `mime_type` may name it; `None` for anything else, short names included.
    pub fn from_mime_type(mime_type: &str) -> Option<Self> {
        let trimmed = mime_type.trim();
        let is_image_type = trimmed
            .get(.."image/".len())
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("image/"));
        if is_image_type {
            Self::from_name(trimmed)
        } else {
            None
        }
    }
}

/// Recognises the format from the first bytes; `Err` for anything but JPEG, PNG and WebP.
pub fn sniff_format(bytes: &[u8]) -> Result<AcceptedFormat, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => Ok(AcceptedFormat::Jpeg),
        Ok(ImageFormat::Png) => Ok(AcceptedFormat::Png),
        Ok(ImageFormat::WebP) => Ok(AcceptedFormat::WebP),
        Ok(other) => Err(DecodeError::UnsupportedFormat {
            format: format!("{other:?}").to_lowercase(),
        }),
        Err(_) => Err(DecodeError::UnsupportedFormat {
            format: "unknown".to_owned(),
        }),
    }
}

/// Reads only the header: `(width, height)`, after checking the format is accepted and its metadata are
/// within the limits, under an allocation budget of [`header_alloc_budget`] bytes.
pub fn read_dimensions(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    let format = sniff_format(bytes)?;
    check_metadata(bytes, format)?;
    let decoder = header_decoder(bytes, format, header_alloc_budget(bytes.len()))?;
    Ok(decoder.dimensions())
}

/// What reading the header of `input_bytes` bytes may allocate: a copy of the input twice over (JPEG reads the
/// whole input; PNG buffers its largest chunk in a doubling buffer) and metadata items of the maximum size.
pub fn header_alloc_budget(input_bytes: usize) -> u64 {
    (input_bytes as u64)
        .saturating_mul(2)
        .saturating_add(4 * MAX_METADATA_BYTES)
}

fn image_format(format: AcceptedFormat) -> ImageFormat {
    match format {
        AcceptedFormat::Jpeg => ImageFormat::Jpeg,
        AcceptedFormat::Png => ImageFormat::Png,
        AcceptedFormat::WebP => ImageFormat::WebP,
    }
}

/// Builds a decoder that has parsed the header, with no dimension limit yet (so the dimensions can be
/// reported) but with the allocation limit for whatever the header parsing itself allocates.
fn header_decoder(
    bytes: &[u8],
    format: AcceptedFormat,
    max_alloc_bytes: u64,
) -> Result<impl ImageDecoder + '_, DecodeError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), image_format(format));
    let mut header_limits = Limits::no_limits();
    header_limits.max_alloc = Some(max_alloc_bytes);
    reader.limits(header_limits);
    reader
        .into_decoder()
        .map_err(|err| map_image_error(err, max_alloc_bytes))
}

fn map_image_error(error: ImageError, max_alloc_bytes: u64) -> DecodeError {
    match error {
        ImageError::Limits(limit_error) => match limit_error.kind() {
            image::error::LimitErrorKind::InsufficientMemory => DecodeError::TooManyBytes {
                needed_bytes: max_alloc_bytes.saturating_add(1),
                max_bytes: max_alloc_bytes,
            },
            _ => DecodeError::Corrupt(limit_error.to_string()),
        },
        ImageError::Unsupported(unsupported) => {
            DecodeError::Corrupt(format!("unsupported feature: {unsupported}"))
        }
        ImageError::Decoding(decoding) => DecodeError::Corrupt(decoding.to_string()),
        ImageError::IoError(io) => DecodeError::Corrupt(io.to_string()),
        other => DecodeError::Corrupt(other.to_string()),
    }
}

/// Decodes JPEG, PNG or WebP bytes into an 8-bit RGB image within `limits`, alpha composited onto white
/// as HF does.
///
/// The header is parsed first and its dimensions checked against `limits` (and the decoded size against
/// `max_alloc_bytes`) before the pixel buffer is allocated.
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    Ok(flatten_to_rgb(
        decode_dynamic_image(bytes, limits)?,
        AlphaHandling::CompositeOnWhite,
    ))
}

/// Decodes like [`decode_image`] but keeps the decoder's colour type (alpha, 16-bit samples).
pub fn decode_dynamic_image(
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<DynamicImage, DecodeError> {
    let format = sniff_format(bytes)?;
    check_metadata(bytes, format)?;
    let header_budget = header_alloc_budget(bytes.len()).min(limits.max_alloc_bytes);
    let mut decoder = header_decoder(bytes, format, header_budget)?;
    let (width, height) = decoder.dimensions();
    if width > limits.max_width || height > limits.max_height {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_width: limits.max_width,
            max_height: limits.max_height,
        });
    }
    if width == 0 || height == 0 {
        return Err(DecodeError::ZeroSized { width, height });
    }
    let output_bytes = decoder.total_bytes();
    if output_bytes > limits.max_alloc_bytes {
        return Err(DecodeError::TooManyBytes {
            needed_bytes: output_bytes,
            max_bytes: limits.max_alloc_bytes,
        });
    }
    // As `ImageReader::decode` does: the output buffer is reserved out of the allocation budget.
    let mut decode_limits = Limits::no_limits();
    decode_limits.max_image_width = Some(limits.max_width);
    decode_limits.max_image_height = Some(limits.max_height);
    decode_limits.max_alloc = Some(limits.max_alloc_bytes - output_bytes);
    decoder
        .set_limits(decode_limits)
        .map_err(|err| map_image_error(err, limits.max_alloc_bytes))?;
    let image = DynamicImage::from_decoder(decoder)
        .map_err(|err| map_image_error(err, limits.max_alloc_bytes))?;
    Ok(image)
}

/// What [`flatten_to_rgb`] does with an alpha channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlphaHandling {
    /// Composite onto opaque white with Pillow's integer `alpha_composite` (transformers 5's
    /// `convert_to_rgb`, the reference of the fixtures).
    #[default]
    CompositeOnWhite,
    /// Drop alpha (`PIL.Image.convert("RGB")`, transformers 4's `convert_to_rgb`).
    Drop,
}

/// Pillow's `SHIFTFORDIV255`: `x / 255` for the ranges `alpha_composite` uses.
fn shift_for_div255(x: u32) -> u32 {
    ((x >> 8) + x) >> 8
}

/// `Image.alpha_composite(white, rgba)` for one pixel (Pillow's `ImagingAlphaComposite`, 7 extra bits).
fn composite_on_white(red: u8, green: u8, blue: u8, alpha: u8) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    if alpha == 0 {
        return [255, 255, 255];
    }
    let alpha = u32::from(alpha);
    // dst is opaque white: blend = 255 * (255 - a), so outa255 = 255 * 255 and coef1 = a << 7 exactly.
    let out_alpha_255 = alpha * 255 + 255 * (255 - alpha);
    let coef1 = alpha * 255 * 255 * (1 << PRECISION_BITS) / out_alpha_255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    [red, green, blue].map(|channel| {
        let mixed = u32::from(channel) * coef1 + 255 * coef2;
        (shift_for_div255(mixed + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
    })
}

/// Converts any decoded image to RGB8 the way HF's `convert_to_rgb` treats Pillow's decode of the same
/// file: grey is replicated and alpha is handled per `alpha`.
///
/// Pillow keeps the most significant byte of 16-bit RGB(A) and grey+alpha PNG samples (raw modes
/// `RGB;16B`, `RGBA;16B`, `LA;16B`), and opens 16-bit grey as mode `I;16`, whose conversion clips at 255.
/// The `image` crate would round `v / 257` instead, so those cases are handled here.
pub fn flatten_to_rgb(image: DynamicImage, alpha: AlphaHandling) -> RgbImage {
    let (width, height) = (image.width(), image.height());
    let with_alpha = |rgba: &mut dyn Iterator<Item = [u8; 4]>| -> Vec<u8> {
        rgba.flat_map(|[r, g, b, a]| match alpha {
            AlphaHandling::CompositeOnWhite => composite_on_white(r, g, b, a),
            AlphaHandling::Drop => [r, g, b],
        })
        .collect()
    };
    let high = |v: u16| (v >> 8) as u8;
    let data = match image {
        DynamicImage::ImageRgb8(rgb) => return rgb,
        DynamicImage::ImageRgba8(rgba) => with_alpha(
            &mut rgba
                .as_raw()
                .chunks_exact(4)
                .map(|p| [p[0], p[1], p[2], p[3]]),
        ),
        DynamicImage::ImageLuma8(grey) => grey.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(grey_alpha) => with_alpha(
            &mut grey_alpha
                .as_raw()
                .chunks_exact(2)
                .map(|p| [p[0], p[0], p[0], p[1]]),
        ),
        DynamicImage::ImageRgb16(rgb) => rgb.as_raw().iter().map(|&v| high(v)).collect(),
        DynamicImage::ImageRgba16(rgba) => with_alpha(
            &mut rgba
                .as_raw()
                .chunks_exact(4)
                .map(|p| [high(p[0]), high(p[1]), high(p[2]), high(p[3])]),
        ),
        DynamicImage::ImageLuma16(grey) => grey
            .as_raw()
            .iter()
            .flat_map(|&v| {
                let clipped = v.min(255) as u8;
                [clipped, clipped, clipped]
            })
            .collect(),
        DynamicImage::ImageLumaA16(grey_alpha) => with_alpha(
            &mut grey_alpha
                .as_raw()
                .chunks_exact(2)
                .map(|p| [high(p[0]), high(p[0]), high(p[0]), high(p[1])]),
        ),
        other => match alpha {
            AlphaHandling::Drop => return other.to_rgb8(),
            AlphaHandling::CompositeOnWhite => {
                let rgba = other.to_rgba8();
                with_alpha(
                    &mut rgba
                        .as_raw()
                        .chunks_exact(4)
                        .map(|p| [p[0], p[1], p[2], p[3]]),
                )
            }
        },
    };
    rgb_from_raw(width, height, data)
}

fn rgb_from_raw(width: u32, height: u32, data: Vec<u8>) -> RgbImage {
    // The length is width * height * 3 by construction from a buffer of the same dimensions.
    RgbImage::from_raw(width, height, data).unwrap_or_else(|| RgbImage::new(width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_bytes_are_rejected_as_empty() {
        assert_eq!(
            decode_image(&[], &DecodeLimits::default()),
            Err(DecodeError::Empty)
        );
    }

    #[test]
    fn gif_and_bmp_signatures_are_unsupported_formats() {
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        let bmp = b"BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00";
        for bytes in [&gif[..], &bmp[..]] {
            assert!(
                matches!(
                    decode_image(bytes, &DecodeLimits::default()),
                    Err(DecodeError::UnsupportedFormat { .. })
                ),
                "{bytes:?}"
            );
        }
        assert_eq!(
            sniff_format(b"hello world, not an image"),
            Err(DecodeError::UnsupportedFormat {
                format: "unknown".to_owned()
            })
        );
    }

    #[test]
    fn sixteen_bit_rgb_keeps_the_high_byte_like_pillow() {
        let image =
            image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![0x12ff, 0x0080, 0xffff])
                .expect("1x1 buffer");
        let rgb = flatten_to_rgb(DynamicImage::ImageRgb16(image), AlphaHandling::default());
        assert_eq!(rgb.as_raw(), &vec![0x12, 0x00, 0xff]);
    }

    #[test]
    fn alpha_is_composited_onto_white_or_dropped() {
        let image = image::RgbaImage::from_raw(
            3,
            1,
            vec![10, 20, 30, 0, 10, 20, 30, 255, 0, 100, 200, 128],
        )
        .expect("3x1 buffer");
        let composited = flatten_to_rgb(
            DynamicImage::ImageRgba8(image.clone()),
            AlphaHandling::CompositeOnWhite,
        );
        // 0 alpha gives the background, 255 the pixel; 128 mixes: 255 * 127 / 255 + c * 128 / 255, rounded.
        assert_eq!(
            composited.as_raw(),
            &vec![255, 255, 255, 10, 20, 30, 127, 177, 227]
        );
        let dropped = flatten_to_rgb(DynamicImage::ImageRgba8(image), AlphaHandling::Drop);
        assert_eq!(dropped.as_raw(), &vec![10, 20, 30, 10, 20, 30, 0, 100, 200]);
    }

    #[test]
    fn opaque_pixels_survive_compositing_unchanged() {
        for value in 0..=255u8 {
            assert_eq!(composite_on_white(value, value, value, 255), [value; 3]);
        }
    }
}
