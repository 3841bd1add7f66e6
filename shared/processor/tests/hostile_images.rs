//! Hostile image bytes: metadata bombs are refused from their container before any decoder inflates them, and
//! seeded mutations of real PNG, JPEG and WebP files (bit flips, truncation, huge declared sizes, forged chunks
//! and headers) never panic, never hold more than their limit and never take longer than a second, through the
//! header checks the services run and through the decoder.
//!
//! `cargo test --test hostile_images` runs the CI budget; `cargo test --test hostile_images -- --ignored` the
//! long mode (a million cases; `KOSMOS_FUZZ_CASES` sets another count).

use std::io::Cursor;

use image::ImageEncoder as _;
use kosmos_processor::{
    AcceptedFormat, DecodeLimits, ImageLimits, ImageRejection, MAX_METADATA_BYTES, check_image,
    decode_image, header_alloc_budget,
};
use kosmos_testkit::bombs;
use kosmos_testkit::fuzz::{self, CountingAllocator, Mode, Suite, peak_bytes_during};
use rand::Rng as _;
use rand_chacha::ChaCha8Rng;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The limits of the fuzz cases: small enough that a header that passes cannot make a slow case.
fn limits() -> ImageLimits {
    ImageLimits {
        max_image_bytes: 20 << 20,
        max_image_width: 1024,
        max_image_height: 1024,
        max_image_pixels: 1 << 20,
        formats: AcceptedFormat::ALL.to_vec(),
    }
}

/// The decoder's budget as the encoder derives it: 8 bytes per allowed pixel and 16 MiB of slack.
fn decode_limits() -> DecodeLimits {
    DecodeLimits {
        max_width: 1024,
        max_height: 1024,
        max_alloc_bytes: (1 << 20) * 8 + (16 << 20),
    }
}

fn encoded(image: &image::RgbaImage, format: image::ImageFormat) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    let (width, height) = image.dimensions();
    let result = match format {
        image::ImageFormat::WebP => image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
            .write_image(image, width, height, image::ExtendedColorType::Rgba8),
        image::ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 80).write_image(
                &image::DynamicImage::ImageRgba8(image.clone()).to_rgb8(),
                width,
                height,
                image::ExtendedColorType::Rgb8,
            )
        }
        _ => image::DynamicImage::ImageRgba8(image.clone()).write_to(&mut bytes, format),
    };
    result.expect("encoding a test image");
    bytes.into_inner()
}

fn gradient(width: u32, height: u32) -> image::RgbaImage {
    image::RgbaImage::from_fn(width, height, |x, y| {
        image::Rgba([(x * 7) as u8, (y * 5) as u8, (x ^ y) as u8, (x + y) as u8])
    })
}

/// Real files of every format, the fixtures among them, and metadata bombs small enough to mutate quickly.
fn seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = [
        "a_gradient_48x32.png",
        "b_shapes_32x64.jpg",
        "c_alpha_40x40.png",
        "d_gray_37x23.png",
    ]
    .iter()
    .map(|name| kosmos_testkit::fixture_image(name).expect("fixture image"))
    .collect();
    let picture = gradient(24, 16);
    let webp = encoded(&picture, image::ImageFormat::WebP);
    seeds.push(encoded(&picture, image::ImageFormat::Jpeg));
    seeds.push(encoded(&picture, image::ImageFormat::Png));
    seeds.push(
        bombs::webp_with_chunk(&webp, (24, 16), b"EXIF", 64, b"MM\0*\0\0\0\x08")
            .expect("a VP8X WebP"),
    );
    seeds.push(webp);
    seeds.push(bombs::png_iccp_bomb(2 * MAX_METADATA_BYTES));
    seeds.push(bombs::png_ztxt_bomb(64 << 10));
    seeds
}

/// PNG chunk kinds worth forging: metadata, critical chunks out of place, animation, and an unknown one.
const PNG_KINDS: [&[u8; 4]; 10] = [
    b"iCCP", b"zTXt", b"iTXt", b"tEXt", b"eXIf", b"IHDR", b"PLTE", b"IDAT", b"acTL", b"xXxX",
];

/// Values that break arithmetic: zero, one, sign bits, all ones.
const INTERESTING_U32: [u32; 7] = [
    0,
    1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0xffff_fff0,
    65_536,
];

fn mutate(bytes: &mut Vec<u8>, rng: &mut ChaCha8Rng) {
    let position = |rng: &mut ChaCha8Rng, len: usize| rng.random_range(0..=len);
    match rng.random_range(0..9) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                if !bytes.is_empty() {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
            }
        }
        1 => {
            if !bytes.is_empty() {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = [0, 0xff, 0x7f, 0x80, rng.random()][rng.random_range(0..5)];
            }
        }
        2 => bytes.truncate(position(rng, bytes.len())),
        3 => {
            let at = position(rng, bytes.len());
            let inserted: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
            bytes.splice(at..at, inserted);
        }
        4 => {
            let start = position(rng, bytes.len());
            let end = (start + rng.random_range(1..256)).min(bytes.len());
            bytes.drain(start..end);
        }
        5 => {
            // A huge declared size where a length field may be (big-endian for PNG and JPEG, little for RIFF).
            if bytes.len() >= 4 {
                let at = rng.random_range(0..=bytes.len() - 4);
                let value = INTERESTING_U32[rng.random_range(0..INTERESTING_U32.len())];
                let word = if rng.random() {
                    value.to_be_bytes()
                } else {
                    value.to_le_bytes()
                };
                bytes[at..at + 4].copy_from_slice(&word);
            }
        }
        6 => {
            // Repeat a slice of the file elsewhere (chunks and segments out of order or twice).
            let start = position(rng, bytes.len());
            let end = (start + rng.random_range(1..512)).min(bytes.len());
            let slice = bytes[start..end].to_vec();
            let at = position(rng, bytes.len());
            bytes.splice(at..at, slice);
        }
        7 => {
            // A forged PNG chunk with a valid CRC, possibly compressed zeros, after the signature.
            let kind = PNG_KINDS[rng.random_range(0..PNG_KINDS.len())];
            let mut data: Vec<u8> = (0..rng.random_range(0..32)).map(|_| rng.random()).collect();
            if rng.random() {
                data.extend(bombs::zlib_of_zeros(
                    rng.random_range(1..3 * MAX_METADATA_BYTES),
                ));
            }
            let at = if bytes.starts_with(b"\x89PNG") {
                33.min(bytes.len())
            } else {
                position(rng, bytes.len())
            };
            bytes.splice(at..at, kosmos_testkit::png::chunk(kind, &data));
        }
        _ => {
            // Huge dimensions in a PNG header, with the CRC fixed so that only a size check can refuse them.
            let width = INTERESTING_U32[rng.random_range(0..INTERESTING_U32.len())];
            let height = rng.random_range(1..70_000);
            if let Some(resized) =
                kosmos_testkit::png::with_header_dimensions(bytes.clone(), width, height)
            {
                *bytes = resized;
            }
        }
    }
}

/// One case: checks and decodes the mutated bytes; returns the most it may hold at once (the decoder's budget,
/// the header's, and copies of the input).
fn mutated_case(seeds: &[Vec<u8>], rng: &mut ChaCha8Rng) -> usize {
    let mut bytes = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..5) {
        mutate(&mut bytes, rng);
    }
    let header = check_image(&bytes, "", &limits());
    let decoded = decode_image(&bytes, &decode_limits());
    if let (Ok(header), Ok(rgb)) = (&header, &decoded) {
        assert_eq!(
            (header.width, header.height),
            rgb.dimensions(),
            "the header's dimensions are the decoded image's"
        );
    }
    if let Err(rejection) = &header {
        assert!(!rejection.to_string().is_empty());
    }
    let budget = decode_limits().max_alloc_bytes + header_alloc_budget(bytes.len());
    usize::try_from(budget).unwrap_or(usize::MAX) + 4 * bytes.len() + (1 << 20)
}

const MUTATIONS: Suite<'static> = Suite {
    name: "image mutations",
    seed: 0x1a6e_5eed,
    ci_cases: 3_000,
    long_cases: 1_000_000,
};

#[test]
fn mutated_png_jpeg_and_webp_files_never_panic_or_exceed_their_limits() {
    let seeds = seeds();
    fuzz::run(MUTATIONS, Mode::Ci, |rng| mutated_case(&seeds, rng));
}

#[test]
#[ignore = "long mode: a million mutations, minutes of CPU"]
fn mutated_png_jpeg_and_webp_files_never_panic_or_exceed_their_limits_long() {
    let seeds = seeds();
    fuzz::run(MUTATIONS, Mode::Long, |rng| mutated_case(&seeds, rng));
}

/// Checks `bytes` the way the services do and returns the rejection, the time and the peak bytes held.
fn refused(bytes: &[u8]) -> (ImageRejection, std::time::Duration, usize) {
    let started = std::time::Instant::now();
    let (result, peak) = peak_bytes_during(|| check_image(bytes, "", &limits()));
    let elapsed = started.elapsed();
    match result {
        Ok(header) => panic!("a bomb of {} bytes passed as {header:?}", bytes.len()),
        Err(rejection) => (rejection, elapsed, peak),
    }
}

#[test]
fn a_gibibyte_iccp_bomb_is_refused_holding_a_few_megabytes() {
    let bomb = bombs::png_iccp_bomb(1 << 30);
    assert!(bomb.len() < 2 << 20, "the bomb is {} bytes", bomb.len());
    let (rejection, elapsed, peak) = refused(&bomb);
    assert_eq!(
        rejection.to_string(),
        "PNG iCCP chunk holds at least 1048577 bytes, above the metadata limit of 1048576 bytes"
    );
    // The scan inflates one byte past the limit: about 1 MiB, not 1 GiB.
    assert!(peak < 4 << 20, "checking the bomb held {peak} bytes");
    assert!(
        elapsed < fuzz::MAX_CASE_TIME,
        "checking the bomb took {elapsed:?}"
    );
    // The decoder, on its own, refuses it the same way.
    assert!(matches!(
        decode_image(&bomb, &DecodeLimits::default()),
        Err(kosmos_processor::DecodeError::MetadataTooLarge {
            item: "PNG iCCP chunk",
            ..
        })
    ));
}

#[test]
fn ztxt_itxt_and_exif_cousins_are_refused_naming_the_item() {
    let picture = gradient(8, 8);
    let webp = encoded(&picture, image::ImageFormat::WebP);
    let jpeg = encoded(&picture, image::ImageFormat::Jpeg);
    let two_mib = 2 * MAX_METADATA_BYTES;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("PNG zTXt chunk", bombs::png_ztxt_bomb(1 << 30)),
        ("PNG iTXt chunk", bombs::png_itxt_bomb(1 << 30)),
        ("PNG eXIf chunk", bombs::png_with_exif(two_mib as usize)),
        (
            "WebP EXIF chunk",
            bombs::webp_with_chunk(&webp, (8, 8), b"EXIF", 1 << 30, b"MM\0*").expect("webp"),
        ),
        (
            "WebP ICCP chunk",
            bombs::webp_with_chunk(
                &webp,
                (8, 8),
                b"ICCP",
                two_mib as u32,
                &vec![0; two_mib as usize],
            )
            .expect("webp"),
        ),
        (
            "JPEG ICC profile (APP2)",
            bombs::jpeg_with_icc_profile(&jpeg, two_mib as usize).expect("jpeg"),
        ),
    ];
    for (item, bomb) in cases {
        let (rejection, elapsed, peak) = refused(&bomb);
        assert!(
            matches!(rejection, ImageRejection::MetadataTooLarge { item: found, max, .. }
                if found == item && max == MAX_METADATA_BYTES),
            "{item}: {rejection}"
        );
        let budget = 2 * bomb.len() + (4 << 20);
        assert!(peak < budget, "{item}: checking it held {peak} bytes");
        assert!(elapsed < fuzz::MAX_CASE_TIME, "{item}: took {elapsed:?}");
    }
}

#[test]
fn metadata_under_the_limit_is_accepted_and_decodes() {
    let picture = gradient(8, 8);
    let webp = encoded(&picture, image::ImageFormat::WebP);
    let jpeg = encoded(&picture, image::ImageFormat::Jpeg);
    let half = MAX_METADATA_BYTES as usize / 2;
    for bytes in [
        bombs::png_ztxt_bomb(MAX_METADATA_BYTES / 2),
        bombs::png_with_exif(half),
        bombs::webp_with_chunk(&webp, (8, 8), b"EXIF", half as u32, &vec![0; half]).expect("webp"),
        bombs::jpeg_with_icc_profile(&jpeg, half).expect("jpeg"),
    ] {
        let header = check_image(&bytes, "", &limits()).expect("metadata within the limit");
        let rgb = decode_image(&bytes, &decode_limits()).expect("decodes");
        assert_eq!((header.width, header.height), rgb.dimensions());
    }
}

#[test]
fn a_flood_of_tiny_compressed_chunks_is_refused_by_count() {
    // 20,000 empty zTXt chunks: a few hundred kilobytes, each one an inflater set-up and a record in the decoder.
    let empty = {
        let mut data = b"k\0\0".to_vec();
        data.extend(bombs::zlib_of_zeros(1));
        data
    };
    let chunks: Vec<(&[u8; 4], Vec<u8>)> = (0..20_000).map(|_| (b"zTXt", empty.clone())).collect();
    let (rejection, elapsed, _) = refused(&bombs::png_with_chunks(&chunks));
    assert_eq!(
        rejection,
        ImageRejection::TooManyMetadataItems {
            max: kosmos_processor::MAX_METADATA_ITEMS
        }
    );
    assert!(elapsed < fuzz::MAX_CASE_TIME, "took {elapsed:?}");
}

#[test]
fn metadata_are_also_limited_all_together() {
    // Five text chunks of 1 MiB each: every one within the limit, 5 MiB together above the 4 MiB total.
    let chunk = vec![b'a'; MAX_METADATA_BYTES as usize - 8];
    let chunks: Vec<(&[u8; 4], Vec<u8>)> = (0..5)
        .map(|_| {
            let mut data = b"Comment\0".to_vec();
            data.extend_from_slice(&chunk);
            (b"tEXt", data)
        })
        .collect();
    let (rejection, _, _) = refused(&bombs::png_with_chunks(&chunks));
    assert!(
        rejection
            .to_string()
            .starts_with("all metadata together holds at least"),
        "{rejection}"
    );
}
