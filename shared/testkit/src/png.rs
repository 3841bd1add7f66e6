//! PNG bytes built by hand: chunks with their CRC, a PNG that is all header, and header rewrites, so that only a
//! header check can refuse them.

/// CRC-32 (ISO-HDLC), as PNG chunks carry it.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One chunk: length, kind, data, CRC of kind and data.
pub fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut out = length.to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// A PNG whose header announces `width` × `height` RGB pixels, with no pixel data worth the name: a
/// decompression bomb as far as the header is concerned.
pub fn header_only(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00]));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// `png` with its IHDR width and height rewritten (the chunk's CRC fixed); `None` when the bytes do not start
/// with a PNG signature and an IHDR chunk.
pub fn with_header_dimensions(mut png: Vec<u8>, width: u32, height: u32) -> Option<Vec<u8>> {
    if png.get(12..16)? != b"IHDR" || png.len() < 33 {
        return None;
    }
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    Some(png)
}

/// `png` with a `tEXt` chunk carrying `nonce` before `IEND`: new bytes, same pixels; `None` when the bytes do
/// not end with an `IEND` chunk.
pub fn with_nonce(png: &[u8], nonce: u64) -> Option<Vec<u8>> {
    let iend = png.len().checked_sub(12)?;
    if png.get(iend + 4..iend + 8)? != b"IEND" {
        return None;
    }
    let mut data = b"nonce\0".to_vec();
    data.extend_from_slice(nonce.to_string().as_bytes());
    let mut out = png[..iend].to_vec();
    out.extend(chunk(b"tEXt", &data));
    out.extend_from_slice(&png[iend..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_only_png_announces_its_dimensions_with_valid_crcs() {
        let png = header_only(70_000, 3);
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(
            u32::from_be_bytes([png[16], png[17], png[18], png[19]]),
            70_000
        );
        let crc = u32::from_be_bytes([png[29], png[30], png[31], png[32]]);
        assert_eq!(crc, crc32(&png[12..29]));
        let resized = with_header_dimensions(png, 5, 6).expect("a PNG");
        assert_eq!(
            u32::from_be_bytes([resized[20], resized[21], resized[22], resized[23]]),
            6
        );
        let tagged = with_nonce(&resized, 42).expect("ends with IEND");
        assert_eq!(&tagged[tagged.len() - 8..tagged.len() - 4], b"IEND");
        assert!(tagged.len() > resized.len());
    }
}
