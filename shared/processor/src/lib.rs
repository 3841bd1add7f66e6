//! KOSMOS prompt building, tokenizer, CLIP image preprocessing and grounding post-processing.
//!
//! The reference is HF transformers' `Kosmos2Processor` and `CLIPImageProcessor`
//! (`docs/MODEL_SPEC.md` §2.6–2.7); every step reproduces HF's output for the same input:
//! - [`decode_image`]: untrusted JPEG/PNG/WebP bytes to RGB within [`DecodeLimits`], checked from the
//!   header before allocating;
//! - [`check_image`]: the header checks every service runs on untrusted image bytes (size, format, declared
//!   MIME type, metadata, dimensions) before anything is decoded, with one [`ImageRejection`] vocabulary;
//! - [`preprocess`]: CLIP resize (bit-exact ports of torchvision's uint8 antialiased resize, the
//!   transformers 5 default, and of Pillow's resampler), center crop, rescale, normalize, to
//!   channels-first f32 [`PixelValues`];
//! - [`KosmosTokenizer`]: `tokenizer.json` with the Kosmos tag tokens configured as HF configures them;
//! - [`build_prompt`]: interleaved text and images to `input_ids`, `attention_mask` and
//!   `image_embeds_position_mask`;
//! - [`flatten_patches`]: Kosmos-2.5's per-image normalisation and resize to a grid of flattened patches
//!   (`Kosmos2_5ImageProcessor`);
//! - [`parse_ocr`] / [`OcrStream`]: Kosmos-2.5 `<ocr>` answers to text lines with boxes;
//! - [`post_process_generation`]: generated text to clean text plus grounded entities with boxes.
//!
//! No candle, no async: everything here is plain CPU work on owned data.

mod config;
mod decode;
mod error;
mod flattened;
mod grounding;
mod header;
mod metadata;
mod ocr;
mod preprocess;
mod processor;
mod prompt;
mod pystr;
mod resample;
mod tokenizer;

pub use config::{
    ImageProcessorConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessBackend, Resample,
    ResizeTarget,
};
pub use decode::{
    AcceptedFormat, AlphaHandling, DecodeLimits, decode_dynamic_image, decode_image,
    flatten_to_rgb, header_alloc_budget, read_dimensions, sniff_format,
};
pub use error::{
    ConfigError, DecodeError, GroundingError, PreprocessError, ProcessorError, PromptError,
    TokenizerError,
};
pub use flattened::{
    FlattenedPatchConfig, FlattenedPatches, MAX_PATCH_SIDE, MAX_PATCHES_LIMIT, flatten_patches,
};
pub use grounding::{
    Entity, NUM_PATCHES_PER_SIDE, box_to_patch_tokens, caption_after_image,
    char_span_to_byte_range, clean_text_and_extract_entities, coordinate_to_patch_index,
    patch_index_to_coordinate, post_process_generation, remove_tags,
};
pub use header::{
    ImageHeader, ImageLimits, ImageRejection, check_encoded, check_header, check_image,
};
pub use image::RgbImage;
pub use metadata::{MAX_METADATA_BYTES, MAX_METADATA_ITEMS, MAX_TOTAL_METADATA_BYTES};
pub use ocr::{OcrLine, OcrStream, PageGeometry, parse_ocr};
pub use preprocess::{PixelValues, decode_and_preprocess, preprocess, resize_output_size};
pub use processor::KosmosProcessor;
pub use prompt::{
    EncodedPrompt, PromptOptions, Segment, build_page_prompt, build_prompt, continuation_ids,
    image_block_text, prompt_text,
};
pub use tokenizer::{
    KosmosTokenizer, NUM_PATCH_INDEX_TOKENS, SpecialTokenIds, Tag, clean_up_tokenization,
    patch_index_token,
};
