//! Untrusted image bytes: limits are enforced from the header, and every failure is a typed error.

use std::io::Cursor;

use anyhow::Result;
use kosmos_processor::{DecodeError, DecodeLimits, decode_image, read_dimensions};

/// A valid PNG of `width` x `height` RGB pixels.
fn png(width: u32, height: u32) -> Result<Vec<u8>> {
    let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

/// Rewrites the IHDR width and height of a PNG and fixes the chunk CRC, so that only the size check can reject
/// it.
fn with_header_dimensions(png: Vec<u8>, width: u32, height: u32) -> Vec<u8> {
    kosmos_testkit::png::with_header_dimensions(png, width, height)
        .expect("a PNG with an IHDR chunk")
}

#[test]
fn a_small_png_decodes_to_rgb() -> Result<()> {
    let image = decode_image(&png(5, 3)?, &DecodeLimits::default())?;
    assert_eq!(image.dimensions(), (5, 3));
    assert_eq!(image.get_pixel(4, 2).0, [4, 2, 7]);
    Ok(())
}

#[test]
fn rejects_a_30000_square_png_from_its_header_before_allocating() -> Result<()> {
    let bomb = with_header_dimensions(png(1, 1)?, 30_000, 30_000);
    assert!(bomb.len() < 200, "the test image is {} bytes", bomb.len());
    assert_eq!(read_dimensions(&bomb)?, (30_000, 30_000));
    let limits = DecodeLimits {
        max_width: 4096,
        max_height: 4096,
        max_alloc_bytes: 64 * 1024 * 1024,
    };
    assert_eq!(
        decode_image(&bomb, &limits),
        Err(DecodeError::TooLarge {
            width: 30_000,
            height: 30_000,
            max_width: 4096,
            max_height: 4096,
        })
    );
    Ok(())
}

#[test]
fn rejects_an_image_whose_pixels_exceed_the_allocation_limit() -> Result<()> {
    let limits = DecodeLimits {
        max_width: 4096,
        max_height: 4096,
        max_alloc_bytes: 1000,
    };
    // 20 x 20 x 3 = 1200 bytes of pixels.
    assert_eq!(
        decode_image(&png(20, 20)?, &limits),
        Err(DecodeError::TooManyBytes {
            needed_bytes: 1200,
            max_bytes: 1000,
        })
    );
    Ok(())
}

#[test]
fn rejects_empty_bytes() {
    assert_eq!(
        decode_image(&[], &DecodeLimits::default()),
        Err(DecodeError::Empty)
    );
}

#[test]
fn rejects_gif_bmp_and_unknown_bytes_as_unsupported_formats() {
    let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;".to_vec();
    let bmp = b"BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00".to_vec();
    let text = b"definitely not an image".to_vec();
    for (bytes, format) in [(gif, "gif"), (bmp, "bmp"), (text, "unknown")] {
        assert_eq!(
            decode_image(&bytes, &DecodeLimits::default()),
            Err(DecodeError::UnsupportedFormat {
                format: format.to_owned()
            })
        );
    }
}

#[test]
fn rejects_corrupt_and_truncated_images() -> Result<()> {
    let valid = png(16, 16)?;
    let truncated = valid[..valid.len() / 2].to_vec();
    let mut garbage_after_signature = valid[..8].to_vec();
    garbage_after_signature.extend_from_slice(&[0x42; 64]);
    let mut bad_crc = valid.clone();
    bad_crc[30] ^= 0xff;
    let jpeg_header_only = vec![
        0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00,
    ];
    let riff_webp_garbage =
        b"RIFF\x10\x00\x00\x00WEBPVP8 \x04\x00\x00\x00\x00\x00\x00\x00".to_vec();
    for (name, bytes) in [
        ("truncated png", truncated),
        ("png signature then garbage", garbage_after_signature),
        ("png with a bad IHDR crc", bad_crc),
        ("jpeg header only", jpeg_header_only),
        ("webp garbage", riff_webp_garbage),
    ] {
        let result = decode_image(&bytes, &DecodeLimits::default());
        assert!(
            matches!(result, Err(DecodeError::Corrupt(_))),
            "{name}: {result:?}"
        );
    }
    Ok(())
}

#[test]
fn error_messages_are_lowercase_and_name_the_limit() {
    let message = DecodeError::TooLarge {
        width: 30_000,
        height: 30_000,
        max_width: 4096,
        max_height: 4096,
    }
    .to_string();
    assert_eq!(
        message,
        "image is 30000x30000, larger than the limit of 4096x4096"
    );
    assert_eq!(DecodeError::Empty.to_string(), "image is empty");
}
