//! A walk over an encoded image's container (PNG chunks, JPEG segments, WebP RIFF chunks) that measures its
//! ancillary metadata (ICC profiles, EXIF, XMP, text, comments) before any decoder parses it, and refuses an item
//! above [`MAX_METADATA_BYTES`], a file whose metadata together exceed [`MAX_TOTAL_METADATA_BYTES`], and a file
//! of more than [`MAX_METADATA_ITEMS`] items.
//!
//! Why here and not in the decoders: the `png` crate inflates an iCCP profile while it reads the header, bounded
//! only by the one allocation budget it shares with the pixels, and it keeps zTXt / iTXt compressed until
//! someone asks, so a 1 MB file of compressed zeros is either a 1 GiB allocation or an image that smuggles it
//! on. Pillow caps each text or profile chunk at `ImageFile.SAFEBLOCK` (1 MiB, `PngImagePlugin.MAX_TEXT_CHUNK`);
//! we cap the same items the same way, and declared sizes count as they are declared, so a chunk header that
//! promises 1 GiB is refused without reading on.
//!
//! Compressed PNG items are inflated at most to one byte past the limit, and the inflated bytes of a file count
//! against the total, so the scan's own work is bounded too. A container that is malformed (a chunk running
//! past the end, a missing marker) ends the walk without an error: the decoder reports the corruption with
//! its own message.

use crate::decode::AcceptedFormat;
use crate::error::DecodeError;

/// Largest metadata item, compressed or inflated: an ICC profile, an EXIF or XMP block, one text chunk.
pub const MAX_METADATA_BYTES: u64 = 1 << 20;

/// Largest sum of every metadata item of one image, inflated.
pub const MAX_TOTAL_METADATA_BYTES: u64 = 4 << 20;

/// Most metadata items (chunks or segments) in one image: bytes alone would let a file of a million empty
/// compressed chunks cost a million inflater set-ups, and the `png` crate a record each. Real files hold a few,
/// an ICC profile split over JPEG segments at most 255.
pub const MAX_METADATA_ITEMS: u64 = 1024;

/// Running totals of one walk; every item goes through [`Budget::check_item`].
struct Budget {
    total: u64,
    items: u64,
}

impl Budget {
    /// Counts one item and refuses it when it is one too many or holds more than the per-item limit; its
    /// bytes are added to the total by [`Budget::add`].
    fn check_item(&mut self, item: &'static str, bytes: u64) -> Result<(), DecodeError> {
        self.items += 1;
        if self.items > MAX_METADATA_ITEMS {
            return Err(DecodeError::TooManyMetadataItems {
                max_items: MAX_METADATA_ITEMS,
            });
        }
        if bytes > MAX_METADATA_BYTES {
            return Err(DecodeError::MetadataTooLarge {
                item,
                bytes,
                max_bytes: MAX_METADATA_BYTES,
            });
        }
        Ok(())
    }

    /// Checks one item and adds it to the total.
    fn charge(&mut self, item: &'static str, bytes: u64) -> Result<(), DecodeError> {
        self.check_item(item, bytes)?;
        self.add(bytes)
    }

    /// Checks the inflated size of an item already counted by [`Budget::check_item`], and adds it.
    fn charge_inflated(&mut self, item: &'static str, bytes: u64) -> Result<(), DecodeError> {
        if bytes > MAX_METADATA_BYTES {
            return Err(DecodeError::MetadataTooLarge {
                item,
                bytes,
                max_bytes: MAX_METADATA_BYTES,
            });
        }
        self.add(bytes)
    }

    /// Adds `bytes` to the total (their item already checked).
    fn add(&mut self, bytes: u64) -> Result<(), DecodeError> {
        self.total = self.total.saturating_add(bytes);
        if self.total > MAX_TOTAL_METADATA_BYTES {
            return Err(DecodeError::MetadataTooLarge {
                item: "all metadata together",
                bytes: self.total,
                max_bytes: MAX_TOTAL_METADATA_BYTES,
            });
        }
        Ok(())
    }
}

/// Refuses `bytes` (already sniffed as `format`) when a metadata item or their sum is over the limits.
pub(crate) fn check_metadata(bytes: &[u8], format: AcceptedFormat) -> Result<(), DecodeError> {
    let mut budget = Budget { total: 0, items: 0 };
    match format {
        AcceptedFormat::Png => scan_png(bytes, &mut budget),
        AcceptedFormat::Jpeg => scan_jpeg(bytes, &mut budget),
        AcceptedFormat::WebP => scan_webp(bytes, &mut budget),
    }
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([word[0], word[1], word[2], word[3]]))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([word[0], word[1], word[2], word[3]]))
}

/// The bytes after the first NUL of `data` (a PNG keyword's terminator); empty when there is none.
fn after_nul(data: &[u8]) -> &[u8] {
    match data.iter().position(|&byte| byte == 0) {
        Some(nul) => &data[nul + 1..],
        None => &[],
    }
}

/// Charges the inflated size of a zlib stream: one byte past the per-item limit at most is ever inflated. A
/// corrupt stream is charged its compressed size (the decoders refuse or ignore it).
fn charge_zlib(budget: &mut Budget, item: &'static str, zlib: &[u8]) -> Result<(), DecodeError> {
    let bound = MAX_METADATA_BYTES as usize + 1;
    let inflated = match fdeflate::decompress_to_vec_bounded(zlib, bound) {
        Ok(output) => output.len() as u64,
        Err(fdeflate::BoundedDecompressionError::OutputTooLarge { partial_output }) => {
            partial_output.len() as u64
        }
        Err(fdeflate::BoundedDecompressionError::DecompressionError { .. }) => zlib.len() as u64,
    };
    budget.charge_inflated(item, inflated)
}

fn scan_png(bytes: &[u8], budget: &mut Budget) -> Result<(), DecodeError> {
    const SIGNATURE_BYTES: usize = 8;
    let mut position = SIGNATURE_BYTES;
    while let (Some(length), Some(kind)) = (
        be_u32(bytes, position),
        bytes.get(position + 4..position + 8),
    ) {
        let data_start = position + 8;
        let declared_end = data_start as u64 + u64::from(length);
        let data =
            &bytes[data_start.min(bytes.len())..(declared_end.min(bytes.len() as u64) as usize)];
        let item = match kind {
            b"iCCP" => Some("PNG iCCP chunk"),
            b"zTXt" => Some("PNG zTXt chunk"),
            b"iTXt" => Some("PNG iTXt chunk"),
            b"tEXt" => Some("PNG tEXt chunk"),
            b"eXIf" => Some("PNG eXIf chunk"),
            _ => None,
        };
        if let Some(item) = item {
            // The declared length first, so that a header promising 1 GiB is refused as it stands.
            budget.check_item(item, u64::from(length))?;
            match kind {
                // keyword, NUL, compression method, zlib stream: counted inflated
                b"iCCP" | b"zTXt" => {
                    charge_zlib(budget, item, after_nul(data).get(1..).unwrap_or(&[]))?;
                }
                // keyword, NUL, compressed flag, method, language, NUL, translated keyword, NUL, text
                b"iTXt" if after_nul(data).first() == Some(&1) => {
                    let text = after_nul(after_nul(after_nul(data).get(2..).unwrap_or(&[])));
                    charge_zlib(budget, item, text)?;
                }
                _ => budget.add(u64::from(length))?,
            }
        }
        if kind == b"IEND" || declared_end + 4 > bytes.len() as u64 {
            break;
        }
        position = declared_end as usize + 4;
    }
    Ok(())
}

/// JPEG markers without a length field: TEM, RST0..RST7, SOI, EOI.
fn is_standalone_marker(marker: u8) -> bool {
    marker == 0x01 || (0xd0..=0xd9).contains(&marker)
}

fn scan_jpeg(bytes: &[u8], budget: &mut Budget) -> Result<(), DecodeError> {
    const EOI: u8 = 0xd9;
    // One running sum per kind: an ICC profile is split over APP2 segments of at most 64 KiB each.
    let mut sums = [
        ("JPEG ICC profile (APP2)", 0u64),
        ("JPEG EXIF (APP1)", 0),
        ("JPEG XMP (APP1)", 0),
        ("JPEG APPn and COM segments", 0),
    ];
    let mut position = 2;
    loop {
        // Skip to the next marker: fill bytes 0xFF, and inside entropy-coded data everything but a 0xFF that
        // starts a marker (0xFF00 is a stuffed byte, 0xFFD0..0xFFD7 a restart).
        let Some(offset) = bytes
            .get(position..)
            .and_then(|rest| rest.iter().position(|&b| b == 0xff))
        else {
            return Ok(());
        };
        position += offset;
        while bytes.get(position + 1) == Some(&0xff) {
            position += 1;
        }
        let Some(&marker) = bytes.get(position + 1) else {
            return Ok(());
        };
        if marker == 0x00 || is_standalone_marker(marker) {
            if marker == EOI {
                return Ok(());
            }
            position += 2;
            continue;
        }
        let Some(length) = bytes
            .get(position + 2..position + 4)
            .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
        else {
            return Ok(());
        };
        let data = bytes
            .get(position + 4..(position + 2 + length).min(bytes.len()))
            .unwrap_or(&[]);
        let kind = match marker {
            0xe2 if data.starts_with(b"ICC_PROFILE\0") => Some(0),
            0xe1 if data.starts_with(b"Exif\0") => Some(1),
            0xe1 if data.starts_with(b"http://ns.adobe.com/xap/1.0/\0") => Some(2),
            0xe0..=0xef | 0xfe => Some(3),
            _ => None,
        };
        if let Some(kind) = kind {
            let (item, sum) = &mut sums[kind];
            *sum += length as u64;
            budget.check_item(item, *sum)?;
            budget.add(length as u64)?;
        }
        // After an SOS header come entropy-coded bytes: the marker search above walks through them.
        position += 2 + length;
    }
}

fn scan_webp(bytes: &[u8], budget: &mut Budget) -> Result<(), DecodeError> {
    const RIFF_HEADER_BYTES: usize = 12;
    let mut position = RIFF_HEADER_BYTES;
    while let (Some(fourcc), Some(size)) = (
        bytes.get(position..position + 4),
        le_u32(bytes, position + 4),
    ) {
        let item = match fourcc {
            b"ICCP" => Some("WebP ICCP chunk"),
            b"EXIF" => Some("WebP EXIF chunk"),
            b"XMP " => Some("WebP XMP chunk"),
            _ => None,
        };
        if let Some(item) = item {
            budget.charge(item, u64::from(size))?;
        }
        let padded = u64::from(size) + u64::from(size & 1);
        let next = position as u64 + 8 + padded;
        if next > bytes.len() as u64 {
            return Ok(());
        }
        position = next as usize;
    }
    Ok(())
}
