//! Metadata bombs: small, valid 1×1 images whose ICC profile, text or EXIF inflates to (or claims) far more than a
//! header check should ever hold in memory. What issue 13 measured: a 1 MB PNG whose iCCP chunk inflates to
//! 1 GiB of zeros took `kosmos serve` from 18 MiB to 1 GiB while its header was read.

use std::io::Write as _;

use crate::png::chunk;

/// Most bytes of zeros one compressed block stands for; the stream repeats it (see [`zlib_of_zeros`]).
const MAX_BLOCK_OF_ZEROS: u64 = 4 << 20;

/// A zlib stream that inflates to `inflated` zero bytes (above 4 MiB rounded up to whole 4 MiB blocks), about
/// 1,000 times smaller, built in milliseconds: one block of zeros is deflated once with a sync flush (byte
/// aligned, no reference before its own start), repeated, and closed by an empty final block and the Adler-32
/// of the whole, which for zeros is `(n mod 65521) << 16 | 1`.
pub fn zlib_of_zeros(inflated: u64) -> Vec<u8> {
    let block_len = inflated.clamp(1, MAX_BLOCK_OF_ZEROS);
    let zeros = vec![0u8; block_len as usize];
    let mut compressor = flate2::Compress::new(flate2::Compression::best(), false);
    // A compressed block of zeros is about a thousandth of its size; one call with this much room suffices.
    let mut block = Vec::with_capacity(zeros.len() / 256 + 64);
    let _ = compressor.compress_vec(&zeros, &mut block, flate2::FlushCompress::Sync);
    let blocks = inflated.div_ceil(block_len).max(1);
    let total = blocks * block_len;
    let mut stream = vec![0x78, 0xda];
    for _ in 0..blocks {
        stream.extend_from_slice(&block);
    }
    // BFINAL = 1, BTYPE = 01 (fixed Huffman), end-of-block code 0000000.
    stream.extend_from_slice(&[0x03, 0x00]);
    let adler = (((total % 65_521) as u32) << 16) | 1;
    stream.extend_from_slice(&adler.to_be_bytes());
    stream
}

/// A 1×1 RGB PNG (one white pixel) with `chunks` between IHDR and IDAT.
pub fn png_with_chunks(chunks: &[(&[u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 2, 0, 0, 0]));
    for (kind, data) in chunks {
        png.extend(chunk(kind, data));
    }
    let mut pixel = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    // One row: filter byte 0, then R, G, B.
    let _ = pixel.write_all(&[0, 255, 255, 255]);
    let idat = pixel.finish().unwrap_or_default();
    png.extend(chunk(b"IDAT", &idat));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// The PNG of issue 13: an iCCP profile of compressed zeros that inflates to `inflated` bytes.
pub fn png_iccp_bomb(inflated: u64) -> Vec<u8> {
    // profile name, NUL, compression method, zlib stream
    png_with_compressed_chunk(b"iCCP", b"icc\0\0", inflated)
}

/// A zTXt chunk of compressed zeros that inflates to `inflated` bytes.
pub fn png_ztxt_bomb(inflated: u64) -> Vec<u8> {
    // keyword, NUL, compression method, zlib stream
    png_with_compressed_chunk(b"zTXt", b"Comment\0\0", inflated)
}

/// A compressed iTXt chunk (XMP's keyword) of zeros that inflates to `inflated` bytes.
pub fn png_itxt_bomb(inflated: u64) -> Vec<u8> {
    // keyword, NUL, compressed, method, language, NUL, translated keyword, NUL, text
    png_with_compressed_chunk(b"iTXt", b"XML:com.adobe.xmp\0\x01\0\0\0", inflated)
}

fn png_with_compressed_chunk(kind: &[u8; 4], header: &[u8], inflated: u64) -> Vec<u8> {
    let mut data = header.to_vec();
    data.extend(zlib_of_zeros(inflated));
    png_with_chunks(&[(kind, data)])
}

/// An eXIf chunk of `bytes` bytes (a big-endian TIFF header, then zeros).
pub fn png_with_exif(bytes: usize) -> Vec<u8> {
    let mut exif = b"MM\0*\0\0\0\x08".to_vec();
    exif.resize(bytes.max(exif.len()), 0);
    png_with_chunks(&[(b"eXIf", exif)])
}

/// A RIFF chunk: FourCC, little-endian size, data, a pad byte when the size is odd.
fn riff_chunk(fourcc: &[u8; 4], declared_size: u32, data: &[u8]) -> Vec<u8> {
    let mut out = fourcc.to_vec();
    out.extend_from_slice(&declared_size.to_le_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
    out
}

/// An extended (VP8X) WebP around the image chunk of the simple WebP `simple` (its bytes after the 12-byte RIFF
/// header), with one metadata chunk `fourcc` (`ICCP`, `EXIF` or `XMP `) holding `data` but declaring
/// `declared_size` bytes (a size larger than the data is a truncated chunk, as an attacker writes it). `None`
/// when `simple` is not a RIFF WebP or its dimensions do not fit.
pub fn webp_with_chunk(
    simple: &[u8],
    (width, height): (u32, u32),
    fourcc: &[u8; 4],
    declared_size: u32,
    data: &[u8],
) -> Option<Vec<u8>> {
    if simple.get(0..4)? != b"RIFF" || simple.get(8..12)? != b"WEBP" {
        return None;
    }
    let flag = match fourcc {
        b"ICCP" => 0x20,
        b"EXIF" => 0x08,
        _ => 0x04,
    };
    let mut vp8x = vec![flag, 0, 0, 0];
    vp8x.extend_from_slice(&width.checked_sub(1)?.to_le_bytes()[..3]);
    vp8x.extend_from_slice(&height.checked_sub(1)?.to_le_bytes()[..3]);
    let metadata = riff_chunk(fourcc, declared_size, data);
    let mut body = b"WEBP".to_vec();
    body.extend(riff_chunk(b"VP8X", 10, &vp8x));
    // ICCP comes before the image data, EXIF and XMP after it (the container specification's order).
    if fourcc == b"ICCP" {
        body.extend_from_slice(&metadata);
        body.extend_from_slice(&simple[12..]);
    } else {
        body.extend_from_slice(&simple[12..]);
        body.extend_from_slice(&metadata);
    }
    let mut webp = b"RIFF".to_vec();
    webp.extend_from_slice(&u32::try_from(body.len()).ok()?.to_le_bytes());
    webp.extend(body);
    Some(webp)
}

/// `jpeg` with an ICC profile of `profile_bytes` zeros split over APP2 segments right after SOI (at most 255
/// segments of 65,519 bytes each, as the ICC specification splits it). `None` when `jpeg` has no SOI.
pub fn jpeg_with_icc_profile(jpeg: &[u8], profile_bytes: usize) -> Option<Vec<u8>> {
    const PER_SEGMENT: usize = 65_519;
    if jpeg.get(0..2)? != [0xff, 0xd8] {
        return None;
    }
    let segments = profile_bytes.div_ceil(PER_SEGMENT).clamp(1, 255);
    let mut out = vec![0xff, 0xd8];
    let mut left = profile_bytes;
    for index in 0..segments {
        let size = left.min(PER_SEGMENT);
        left -= size;
        let mut data = b"ICC_PROFILE\0".to_vec();
        data.push(u8::try_from(index + 1).ok()?);
        data.push(u8::try_from(segments).ok()?);
        data.resize(data.len() + size, 0);
        out.extend_from_slice(&[0xff, 0xe2]);
        out.extend_from_slice(&u16::try_from(data.len() + 2).ok()?.to_be_bytes());
        out.extend(data);
    }
    out.extend_from_slice(&jpeg[2..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn the_zlib_stream_of_zeros_inflates_to_what_it_claims() {
        for (asked, expected) in [(10 << 20, 12 << 20), (1000, 1000)] {
            let stream = zlib_of_zeros(asked);
            assert!(stream.len() < 40 << 10, "{} bytes", stream.len());
            let mut inflated = Vec::new();
            flate2::read::ZlibDecoder::new(&stream[..])
                .read_to_end(&mut inflated)
                .expect("a valid zlib stream");
            assert_eq!(inflated.len(), expected);
            assert!(inflated.iter().all(|&byte| byte == 0));
        }
    }

    #[test]
    fn a_gibibyte_bomb_is_about_a_megabyte() {
        let bomb = png_iccp_bomb(1 << 30);
        assert!(bomb.len() < 2 << 20, "{} bytes", bomb.len());
        assert_eq!(&bomb[37..41], b"iCCP");
    }
}
