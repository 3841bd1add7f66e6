//! KOSMOS-1 / Kosmos-2 in candle.
//!
//! The model is split into two halves that load independently from one Hugging Face model directory, so that the
//! vision-encoder and decoder services each hold only their own weights:
//! * [`VisionHalf`]: CLIP ViT tower + connector, pixels → image embeddings `(images, latent_query_num, embed_dim)`;
//! * [`TextHalf`]: the MAGNETO decoder with sinusoidal positions and optional xPos, token ids + image embeddings →
//!   logits, over a packed batch of sequences that each own a [`BlockTable`] in one [`PagedKvCache`].
//!
//! Kosmos-2.5's page encoder ([`PageEncoder`]: a Pix2Struct-style tower over flattened patches, then the same
//! connector) loads from a `kosmos-2.5` directory ([`Kosmos25Config`]).
//!
//! Numerics follow HF transformers' `modeling_kosmos2.py` (and torchscale for xPos); `tests/` compares against
//! fixtures those implementations wrote. See `../../shared/docs/MODEL_SPEC.md` in the design notes for the traps.

mod config;
mod connector;
mod error;
mod generate;
mod kernels;
mod memory;
mod model;
mod nn;
mod page;
pub mod paged;
mod panels;
mod positions;
mod text;
mod vision;
mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use config::{Activation, KosmosConfig, TextConfig, VisionConfig};
pub use error::{ModelError, Result};
pub use generate::{
    GreedyParams, Prompt, argmax, banned_ngram_tokens, continuation_logprobs, greedy_generate,
};
pub use model::{
    Family, KOSMOS_2_5, KosmosModel, ModelConfig, ModelFiles, PaddedRow, PaddedRows, TextHalf,
    VisionHalf, model_type, parse_device, parse_dtype,
};
pub use nn::Projection;
pub use page::{Kosmos25Config, PageEncoder, PageTower, PageVisionConfig};
pub use paged::{BlockCounts, BlockTable, KvCacheConfig, PagedKvCache, PrefixStats, content_key};
pub use positions::{SinusoidalPositions, XPos, pad_aware_positions};
pub use text::{ImageInjection, SeqChunk, TextFamily, TextModel, image_block_flags};
pub use weights::Weights;
