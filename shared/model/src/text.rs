//! The text decoder (`Kosmos2TextTransformer`, torchscale's MAGNETO decoder): pre-LN layers with Sub-LN in
//! attention (`inner_attn_ln` before `out_proj`) and in the FFN (`ffn_layernorm` on the wide activations), exact
//! erf GELU, sinusoidal absolute positions and/or xPos, a final LayerNorm and an LM head tied to the embeddings.
//!
//! The forward runs over a *packed* batch: the tokens of several sequences, each with its own KV cache and its
//! own number of new tokens, are concatenated into one `(tokens, hidden)` matrix. Every weight product (QKV,
//! out, FFN, LM head) therefore runs once for the whole batch, and only attention is done per sequence against
//! that sequence's cache. There is no padding anywhere, so a left-padded batch in the reference's layout gives the
//! same values at its non-pad positions (see `model.rs`), and continuous batching can mix a prefill of one
//! sequence with decode steps of others in one call.
//!
//! References: `transformers/models/kosmos2/modeling_kosmos2.py`; torchscale `architecture/decoder.py`,
//! `component/multihead_attention.py`, `component/xpos_relative_position.py`; MAGNETO (Wang et al. 2022).

use candle_core::{D, DType, Device, Tensor};
use candle_nn::LayerNorm;

use crate::config::{Activation, TextConfig};
use crate::error::{ModelError, Result};
use crate::kv_cache::SequenceCache;
use crate::nn::{AttentionProjections, Projection, attention, layer_norm};
use crate::positions::{SinusoidalPositions, XPos, pad_aware_positions};
use crate::weights::Weights;

/// One sequence's share of a packed forward.
#[derive(Debug)]
pub struct SeqChunk<'a> {
    /// The new tokens of this sequence (placeholder ids at image positions).
    pub input_ids: &'a [u32],
    /// Image embeddings written over the token embeddings of this chunk, if any.
    pub images: Option<ImageInjection<'a>>,
    /// The sequence's cache; the chunk's keys and values are appended to it.
    pub cache: &'a mut SequenceCache,
}

/// Image embeddings for the positions of a chunk that the image mask marks.
#[derive(Debug, Clone, Copy)]
pub struct ImageInjection<'a> {
    /// One flag per token of the chunk; `true` where an image embedding replaces the token embedding.
    pub mask: &'a [bool],
    /// `(marked positions, embed_dim)` rows, in the order of the marked positions (images in row-major order).
    pub embeds: &'a Tensor,
}

#[derive(Debug)]
struct SelfAttention {
    projections: AttentionProjections,
    inner_attn_ln: LayerNorm,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &TextConfig, weights: &Weights) -> Result<Self> {
        let width = cfg.embed_dim;
        Ok(Self {
            projections: AttentionProjections::new(weights, width, cfg.attention_heads)?,
            inner_attn_ln: weights.layer_norm(width, cfg.layer_norm_eps, "inner_attn_ln")?,
            head_dim: cfg.head_dim(),
        })
    }

    /// `(tokens, width)` rows → `(1, heads, rows, head_dim)` for one sequence's slice.
    fn heads_of(&self, xs: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        Ok(xs
            .narrow(0, start, len)?
            .reshape((1, len, self.projections.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    fn forward(
        &self,
        xs: &Tensor,
        layer: usize,
        batch: &mut PackedState<'_, '_>,
    ) -> Result<Tensor> {
        let proj = &self.projections;
        let (query, key, value) = proj.qkv(xs)?;
        let mut outputs = Vec::with_capacity(batch.chunks.len());
        for (chunk, slot) in batch.chunks.iter_mut().zip(&batch.slots) {
            let mut q = self.heads_of(&query, slot.start, slot.len)?;
            let mut k = self.heads_of(&key, slot.start, slot.len)?;
            let v = self.heads_of(&value, slot.start, slot.len)?;
            if let Some(tables) = &slot.xpos {
                q = XPos::apply(&q, &tables.0)?;
                k = XPos::apply(&k, &tables.1)?;
            }
            let (keys, values) = chunk.cache.append(layer, &k, &v)?;
            // (1, heads, len, head_dim) → (len, width)
            let context = attention(&q, &keys, &values, slot.causal_bias.as_ref())?;
            outputs.push(
                context
                    .transpose(1, 2)?
                    .reshape((slot.len, proj.heads * self.head_dim))?,
            );
        }
        let context = Tensor::cat(&outputs, 0)?;
        let context = layer_norm(&self.inner_attn_ln, &context)?;
        proj.out_proj.forward(&context)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    self_attn_layer_norm: LayerNorm,
    self_attn: SelfAttention,
    final_layer_norm: LayerNorm,
    fc1: Projection,
    ffn_layernorm: LayerNorm,
    fc2: Projection,
    activation: Activation,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, weights: &Weights) -> Result<Self> {
        let width = cfg.embed_dim;
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            self_attn_layer_norm: weights.layer_norm(width, eps, "self_attn_layer_norm")?,
            self_attn: SelfAttention::new(cfg, &weights.pp("self_attn"))?,
            final_layer_norm: weights.layer_norm(width, eps, "final_layer_norm")?,
            fc1: weights.projection(width, cfg.ffn_dim, "ffn.fc1")?,
            ffn_layernorm: weights.layer_norm(cfg.ffn_dim, eps, "ffn.ffn_layernorm")?,
            fc2: weights.projection(cfg.ffn_dim, width, "ffn.fc2")?,
            activation: cfg.activation_function,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        layer: usize,
        batch: &mut PackedState<'_, '_>,
    ) -> Result<Tensor> {
        let attended =
            self.self_attn
                .forward(&layer_norm(&self.self_attn_layer_norm, xs)?, layer, batch)?;
        let xs = (xs + attended)?;
        let hidden = self
            .fc1
            .forward(&layer_norm(&self.final_layer_norm, &xs)?)?;
        let hidden = layer_norm(&self.ffn_layernorm, &self.activation.forward(&hidden)?)?;
        let hidden = self.fc2.forward(&hidden)?;
        Ok((xs + hidden)?)
    }
}

/// Where each chunk sits in the packed rows, with its per-forward attention inputs.
struct Slot {
    start: usize,
    len: usize,
    /// `(len, past + len)` additive causal mask, only when `len > 1`.
    causal_bias: Option<Tensor>,
    /// (query tables, key tables) when xPos is on.
    xpos: Option<(crate::positions::XPosTables, crate::positions::XPosTables)>,
}

struct PackedState<'c, 'a> {
    chunks: &'c mut [SeqChunk<'a>],
    slots: Vec<Slot>,
}

/// The text half of a KOSMOS model: token embeddings, decoder layers, final LayerNorm and tied LM head
/// (weights under `text_model`).
#[derive(Debug)]
pub struct TextModel {
    embed_tokens: Tensor,
    lm_head: Tensor,
    layers: Vec<DecoderLayer>,
    layer_norm: LayerNorm,
    sinusoidal: Option<SinusoidalPositions>,
    xpos: Option<XPos>,
    embed_scale: f64,
    config: TextConfig,
}

impl TextModel {
    /// Loads the decoder from `weights` positioned at `text_model`.
    ///
    /// The embeddings are read from `model.embed_tokens.weight`, or from `lm_head.weight` when only that name is
    /// stored (tied weights are saved once, under either name). The head is `lm_head.weight` only when the file
    /// stores it and `tie_word_embeddings` is false; otherwise it is the embedding matrix.
    pub fn new(cfg: &TextConfig, tie_word_embeddings: bool, weights: &Weights) -> Result<Self> {
        let shape = [cfg.vocab_size, cfg.embed_dim];
        let model = weights.pp("model");
        let embed_tokens =
            if model.contains("embed_tokens.weight") || !weights.contains("lm_head.weight") {
                model.get(&shape, "embed_tokens.weight")?
            } else {
                weights.get(&shape, "lm_head.weight")?
            };
        let lm_head = if !tie_word_embeddings && weights.contains("lm_head.weight") {
            weights.get(&shape, "lm_head.weight")?
        } else {
            embed_tokens.clone()
        };
        let layers = (0..cfg.layers)
            .map(|index| DecoderLayer::new(cfg, &model.pp(format!("layers.{index}"))))
            .collect::<Result<Vec<_>>>()?;
        let sinusoidal = (!cfg.no_token_positional_embeddings)
            .then(|| SinusoidalPositions::new(cfg.embed_dim, cfg.pad_token_id));
        let xpos = cfg.xpos_rel_pos.then(|| {
            XPos::new(
                cfg.head_dim(),
                cfg.xpos_scale_base,
                cfg.max_position_embeddings / 2,
            )
        });
        Ok(Self {
            embed_tokens,
            lm_head,
            layers,
            layer_norm: model.layer_norm(cfg.embed_dim, cfg.layer_norm_eps, "layer_norm")?,
            sinusoidal,
            xpos,
            embed_scale: if cfg.scale_embedding {
                (cfg.embed_dim as f64).sqrt()
            } else {
                1.0
            },
            config: cfg.clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// A fresh, empty cache for one sequence of this model.
    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache::new(self.layers.len())
    }

    /// Runs the decoder over the new tokens of every chunk and appends their keys and values to each chunk's
    /// cache. Returns the final hidden states `(total new tokens, embed_dim)`, chunk after chunk.
    ///
    /// On error the caches of the chunks are left in an unspecified state and must be discarded.
    pub fn forward(&self, chunks: &mut [SeqChunk<'_>]) -> Result<Tensor> {
        let device = self.device().clone();
        let dtype = self.dtype();
        let mut slots = Vec::with_capacity(chunks.len());
        let mut all_ids = Vec::new();
        let mut all_positions = Vec::new();
        let mut start = 0;
        for chunk in chunks.iter() {
            let len = chunk.input_ids.len();
            if len == 0 {
                return Err(ModelError::InvalidInput("a chunk has no tokens".into()));
            }
            if let Some(&bad) = chunk
                .input_ids
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                return Err(ModelError::InvalidInput(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    self.config.vocab_size
                )));
            }
            let past = chunk.cache.len();
            all_ids.extend_from_slice(chunk.input_ids);
            all_positions.extend(pad_aware_positions(
                chunk.cache.tokens(),
                chunk.input_ids,
                self.config.pad_token_id,
            ));
            let causal_bias = (len > 1)
                .then(|| causal_bias(past, len, &device))
                .transpose()?;
            let xpos = self
                .xpos
                .as_ref()
                .map(|xpos| -> Result<_> {
                    Ok((
                        xpos.tables(past, len, false, dtype, &device)?,
                        xpos.tables(past, len, true, dtype, &device)?,
                    ))
                })
                .transpose()?;
            slots.push(Slot {
                start,
                len,
                causal_bias,
                xpos,
            });
            start += len;
        }
        let mut xs = self.embed(chunks, &all_ids)?;
        if let Some(sinusoidal) = &self.sinusoidal {
            xs = (xs + sinusoidal.embed(&all_positions, dtype, &device)?)?;
        }
        let mut batch = PackedState { chunks, slots };
        for (index, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, index, &mut batch)?;
        }
        for chunk in batch.chunks.iter_mut() {
            chunk.cache.commit(chunk.input_ids);
        }
        layer_norm(&self.layer_norm, &xs)
    }

    /// Token embeddings with image embeddings written at the masked positions, then scaled (images included,
    /// as the reference scales after the replacement). `(total tokens, embed_dim)`.
    fn embed(&self, chunks: &[SeqChunk<'_>], all_ids: &[u32]) -> Result<Tensor> {
        let device = self.device();
        let ids = Tensor::from_slice(all_ids, all_ids.len(), device)?;
        let tokens = self.embed_tokens.index_select(&ids, 0)?;
        let has_images = chunks.iter().any(|chunk| chunk.images.is_some());
        let xs = if has_images {
            // Gather rows from [token embeddings; image rows] with one index: row r of the result is token r,
            // unless the mask marks it, then the next unused image row.
            let total = all_ids.len();
            let mut image_rows = Vec::new();
            let mut gather = Vec::with_capacity(total);
            let mut row = 0u32;
            let mut next_image_row = total as u32;
            for chunk in chunks {
                match &chunk.images {
                    None => {
                        gather.extend(row..row + chunk.input_ids.len() as u32);
                    }
                    Some(images) => {
                        let marked = images.mask.iter().filter(|&&m| m).count();
                        let (rows, width) = images.embeds.dims2()?;
                        if images.mask.len() != chunk.input_ids.len() {
                            return Err(ModelError::InvalidInput(format!(
                                "image mask has {} entries for {} tokens",
                                images.mask.len(),
                                chunk.input_ids.len()
                            )));
                        }
                        if rows != marked || width != self.config.embed_dim {
                            return Err(ModelError::InvalidInput(format!(
                                "image embeddings are ({rows}, {width}) but the mask marks {marked} positions of \
                                 width {}",
                                self.config.embed_dim
                            )));
                        }
                        for (offset, &marked) in images.mask.iter().enumerate() {
                            if marked {
                                gather.push(next_image_row);
                                next_image_row += 1;
                            } else {
                                gather.push(row + offset as u32);
                            }
                        }
                        image_rows.push(images.embeds.to_dtype(self.dtype())?);
                    }
                }
                row += chunk.input_ids.len() as u32;
            }
            let mut sources = vec![tokens];
            sources.extend(image_rows);
            let pool = Tensor::cat(&sources, 0)?;
            let gather = Tensor::from_vec(gather, total, device)?;
            pool.index_select(&gather, 0)?
        } else {
            tokens
        };
        Ok((xs * self.embed_scale)?)
    }

    /// Logits `(rows, vocab)` in f32 for final hidden states `(rows, embed_dim)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?)
    }

    /// Log-softmax over the vocabulary of [`TextModel::logits`].
    pub fn log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(
            &self.logits(hidden)?,
            D::Minus1,
        )?)
    }
}

/// `(len, past + len)` additive mask in f32: 0 where query `i` may see key `j` (`j <= past + i`), else -inf.
/// Every row keeps its own diagonal, so no row is fully masked and the softmax never sees NaN.
fn causal_bias(past: usize, len: usize, device: &Device) -> Result<Tensor> {
    let total = past + len;
    let values: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(values, (len, total), device)?)
}
