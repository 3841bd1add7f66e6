//! Error types of the processor crate, one enum per stage.
//!
//! Messages are lowercase without a trailing period and name the field and the limit involved.

use thiserror::Error;

/// Why encoded image bytes could not be turned into an RGB image.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The input holds no bytes at all.
    #[error("image is empty")]
    Empty,
    /// The bytes are not JPEG, PNG or WebP (`format` is what was recognised, or "unknown").
    #[error("unsupported image format: {format} (accepted: jpeg, png, webp)")]
    UnsupportedFormat {
        /// The recognised format, or "unknown".
        format: String,
    },
    /// The header announces dimensions beyond the caller's limits; nothing was allocated.
    #[error("image is {width}x{height}, larger than the limit of {max_width}x{max_height}")]
    TooLarge {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The caller's maximum width.
        max_width: u32,
        /// The caller's maximum height.
        max_height: u32,
    },
    /// Decoding would need more memory than the caller allows.
    #[error("decoding the image needs {needed_bytes} bytes, more than the limit of {max_bytes}")]
    TooManyBytes {
        /// Bytes needed (as far as known when the limit was hit).
        needed_bytes: u64,
        /// The caller's maximum.
        max_bytes: u64,
    },
    /// The header announces a zero width or height.
    #[error("image has a zero dimension ({width}x{height})")]
    ZeroSized {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
    },
    /// A metadata item (ICC profile, EXIF, XMP, text) or all of them together, as declared or inflated, is
    /// above its limit; nothing was inflated beyond it.
    #[error("{item} holds at least {bytes} bytes, above the metadata limit of {max_bytes} bytes")]
    MetadataTooLarge {
        /// What was measured (`PNG iCCP chunk`, `WebP EXIF chunk`, `all metadata together`, ...).
        item: &'static str,
        /// Bytes measured when the limit was crossed.
        bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// The image holds more metadata items (chunks or segments) than allowed.
    #[error(
        "image holds more than {max_items} metadata items (ICC, EXIF, XMP, text chunks or segments)"
    )]
    TooManyMetadataItems {
        /// The limit.
        max_items: u64,
    },
    /// The bytes claim a supported format but could not be decoded.
    #[error("image is corrupt: {0}")]
    Corrupt(String),
}

/// Why a `preprocessor_config.json` could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read image processor config {path}: {source}")]
    Io {
        /// The path that was read.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The text is not a JSON object.
    #[error("image processor config is not a json object: {0}")]
    Json(String),
    /// One key has a value of the wrong type or out of range.
    #[error("image processor config key `{key}` {message}")]
    InvalidKey {
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// Why an image could not be preprocessed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PreprocessError {
    /// The input image has a zero width or height.
    #[error("image has a zero dimension ({width}x{height})")]
    EmptyImage {
        /// Input width.
        width: u32,
        /// Input height.
        height: u32,
    },
    /// The backend has no such resampling filter.
    #[error("resample filter {resample} is not available in the torchvision backend")]
    UnsupportedResample {
        /// The configured filter.
        resample: String,
    },
    /// The resize target computed from the config is unusable.
    #[error("resize target {width}x{height} is invalid")]
    InvalidTarget {
        /// Target width.
        width: u64,
        /// Target height.
        height: u64,
    },
}

/// Why the tokenizer could not be loaded or used.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// `tokenizer.json` could not be read or parsed.
    #[error("cannot load tokenizer: {0}")]
    Load(String),
    /// A token the processor needs is not in the vocabulary.
    #[error("tokenizer has no `{0}` token")]
    MissingToken(String),
    /// The tokenizers library failed to encode.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// The tokenizers library failed to decode.
    #[error("cannot decode ids: {0}")]
    Decode(String),
}

/// Why a prompt could not be built.
#[derive(Debug, Error)]
pub enum PromptError {
    /// Tokenization failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A text segment contains an image tag, which would break the image placeholder layout.
    #[error("text segment {segment} contains the reserved tag `{tag}`")]
    ReservedTag {
        /// Index of the segment in the request.
        segment: usize,
        /// The tag found.
        tag: &'static str,
    },
    /// The image placeholder ids `unk+1 .. unk+1+num_image_tokens` do not fit in the vocabulary.
    #[error(
        "num_image_tokens {num_image_tokens} does not fit in the vocabulary of {vocab_size} (placeholders start at id {first_id})"
    )]
    PlaceholdersOutOfVocab {
        /// Requested placeholders per image.
        num_image_tokens: usize,
        /// First placeholder id.
        first_id: u32,
        /// Vocabulary size with added tokens.
        vocab_size: usize,
    },
    /// A Kosmos-2.5 prompt is not one page followed by at most one text.
    #[error(
        "a Kosmos-2.5 prompt is one image (the page) followed by at most one text segment (the task)"
    )]
    PageLayout,
    /// The tokenized prompt does not show the expected image layout (an internal invariant).
    #[error("tokenized prompt has {found} image blocks, expected {expected}")]
    ImageLayout {
        /// Image segments requested.
        expected: usize,
        /// Well-formed image blocks found in the ids.
        found: usize,
    },
}

/// Why a bounding box could not be turned into patch indices.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum GroundingError {
    /// The box is not `(x1, y1, x2, y2)` with `0 <= x1 < x2 <= 1` and `0 <= y1 < y2 <= 1`.
    #[error("bounding box {0:?} must satisfy 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")]
    InvalidBox([f32; 4]),
    /// The patch grid has no cells.
    #[error("num_patches_per_side must be at least 1")]
    EmptyGrid,
}

/// Any error of the processor, for callers that do not care which stage failed.
#[derive(Debug, Error)]
pub enum ProcessorError {
    /// Image decoding failed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The image processor config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Preprocessing failed.
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Prompt building failed.
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// Box conversion failed.
    #[error(transparent)]
    Grounding(#[from] GroundingError),
}
