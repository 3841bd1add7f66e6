//! The text decoder (`Kosmos2TextTransformer`, torchscale's MAGNETO decoder): pre-LN layers with Sub-LN in
//! attention (`inner_attn_ln` before `out_proj`) and in the FFN (`ffn_layernorm` on the wide activations), exact
//! erf GELU, sinusoidal absolute positions and/or xPos, a final LayerNorm and an LM head tied to the embeddings.
//!
//! The forward runs over a *packed* batch: the tokens of several sequences, each with its own block table in one
//! [`PagedKvCache`] and its own number of new tokens, are concatenated into one `(tokens, hidden)` matrix. Every
//! weight product (QKV, out, FFN, LM head) runs once for the whole batch, and so does attention: one
//! [`PagedAttention`] op per layer reads every sequence's keys and values through its block table. There is no
//! padding anywhere, so a left-padded batch in the reference's layout gives the same values at its non-pad positions
//! (see `model.rs`), continuous batching can mix a prefill of one sequence with decode steps of others in one call,
//! and a sequence's values do not depend on what it is batched with.
//!
//! References: `transformers/models/kosmos2/modeling_kosmos2.py`; torchscale `architecture/decoder.py`,
//! `component/multihead_attention.py`, `component/xpos_relative_position.py`; MAGNETO (Wang et al. 2022).

use candle_core::{D, DType, Device, Tensor};
use candle_nn::LayerNorm;

use crate::config::{Activation, TextConfig};
use crate::error::{ModelError, Result};
use crate::nn::{AttentionProjections, Projection, layer_norm};
use crate::paged::{BlockTable, KvCacheConfig, PagedAttention, PagedKvCache, WriteKv};
use crate::positions::{SinusoidalPositions, XPos, pad_aware_positions};
use crate::weights::Weights;

/// Which KOSMOS decoder the weights hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFamily {
    /// KOSMOS-1 / Kosmos-2: Sub-LN in attention (`inner_attn_ln`), no segment embedding.
    Kosmos2,
    /// Kosmos-2.5 (`Kosmos2_5TextTransformer`): no `inner_attn_ln`; `segment_emb` row 1 is added to the positions
    /// of the tokens of an image block (`<image>`, the placeholders and `</image>`: where the processor's
    /// `image_embeds_position_mask` is not 0) and row 0 to every other token, generated ones included.
    Kosmos25 {
        /// The id of `<image>`, which opens an image block.
        image_start: u32,
        /// The id of `</image>`, which closes it.
        image_end: u32,
    },
}

/// Whether each of `new_ids` lies in an image block (`<image>` … `</image>`, both tags included), given the
/// sequence's earlier tokens `history`.
pub fn image_block_flags(
    history: &[u32],
    new_ids: &[u32],
    image_start: u32,
    image_end: u32,
) -> Vec<bool> {
    // Open if the last tag before the new tokens is `<image>`.
    let mut inside = history
        .iter()
        .rev()
        .find(|&&id| id == image_start || id == image_end)
        .is_some_and(|&id| id == image_start);
    new_ids
        .iter()
        .map(|&id| {
            if id == image_start {
                inside = true;
                true
            } else if id == image_end {
                inside = false;
                true
            } else {
                inside
            }
        })
        .collect()
}

/// One sequence's share of a packed forward.
#[derive(Debug)]
pub struct SeqChunk<'a> {
    /// The new tokens of this sequence (placeholder ids at image positions).
    pub input_ids: &'a [u32],
    /// Image embeddings written over the token embeddings of this chunk, if any.
    pub images: Option<ImageInjection<'a>>,
    /// The sequence's block table; the chunk's keys and values are appended to it.
    pub table: &'a mut BlockTable,
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
    /// KOSMOS-1 / Kosmos-2's Sub-LN before `out_proj`; Kosmos-2.5 has none.
    inner_attn_ln: Option<LayerNorm>,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &TextConfig, family: TextFamily, weights: &Weights) -> Result<Self> {
        let width = cfg.embed_dim;
        let inner_attn_ln = match family {
            TextFamily::Kosmos2 => {
                Some(weights.layer_norm(width, cfg.layer_norm_eps, "inner_attn_ln")?)
            }
            TextFamily::Kosmos25 { .. } => None,
        };
        Ok(Self {
            projections: AttentionProjections::new(weights, width, cfg.attention_heads)?,
            inner_attn_ln,
            head_dim: cfg.head_dim(),
        })
    }

    /// Attention of every packed row: writes the step's keys and values into the layer's pool at their slots, then
    /// one [`PagedAttention`] over every sequence. `(tokens, width)` → `(tokens, width)`.
    fn forward(&self, xs: &Tensor, layer: usize, step: &StepInputs) -> Result<Tensor> {
        let proj = &self.projections;
        let (tokens, width) = xs.dims2()?;
        let heads = proj.heads;
        // Query already scaled (folded into the fused weights).
        let (query, key, value) = proj.qkv(xs)?;
        // (tokens, heads, head_dim)
        let mut query = query.reshape((tokens, heads, self.head_dim))?;
        let mut key = key.reshape((tokens, heads, self.head_dim))?;
        let value = value.reshape((tokens, heads, self.head_dim))?;
        if let Some(tables) = &step.xpos {
            query = XPos::apply_rows(&query, &tables.0)?;
            key = XPos::apply_rows(&key, &tables.1)?;
        }
        // (tokens, 2, heads, head_dim)
        let new_kv = Tensor::stack(&[&key, &value], 1)?;
        let pool = step.cache.pool(layer)?;
        pool.inplace_op3(&new_kv, &step.slots, &WriteKv)?;
        let context = query
            .contiguous()?
            .apply_op3_no_bwd(pool, &step.meta, &step.op)?
            .reshape((tokens, width))?;
        let context = match &self.inner_attn_ln {
            Some(norm) => layer_norm(norm, &context)?,
            None => context,
        };
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
    fn new(cfg: &TextConfig, family: TextFamily, weights: &Weights) -> Result<Self> {
        let width = cfg.embed_dim;
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            self_attn_layer_norm: weights.layer_norm(width, eps, "self_attn_layer_norm")?,
            self_attn: SelfAttention::new(cfg, family, &weights.pp("self_attn"))?,
            final_layer_norm: weights.layer_norm(width, eps, "final_layer_norm")?,
            fc1: weights.projection(width, cfg.ffn_dim, "ffn.fc1")?,
            ffn_layernorm: weights.layer_norm(cfg.ffn_dim, eps, "ffn.ffn_layernorm")?,
            fc2: weights.projection(cfg.ffn_dim, width, "ffn.fc2")?,
            activation: cfg.activation_function,
        })
    }

    fn forward(&self, xs: &Tensor, layer: usize, step: &StepInputs) -> Result<Tensor> {
        let attended =
            self.self_attn
                .forward(&layer_norm(&self.self_attn_layer_norm, xs)?, layer, step)?;
        let xs = (xs + attended)?;
        let hidden = self
            .fc1
            .forward_activated(&layer_norm(&self.final_layer_norm, &xs)?, self.activation)?;
        let hidden = layer_norm(&self.ffn_layernorm, &hidden)?;
        let hidden = self.fc2.forward(&hidden)?;
        Ok((xs + hidden)?)
    }
}

/// What every layer's attention needs for one packed step.
struct StepInputs<'c> {
    cache: &'c PagedKvCache,
    /// `(tokens,)` u32: the pool slot of each packed row.
    slots: Tensor,
    /// The [`PagedAttention`] meta: per sequence `[q_start, q_len, context_len, table_offset]`, then the tables.
    meta: Tensor,
    op: PagedAttention,
    /// (query tables, key tables) `(tokens, 1, head_dim / 2)` when xPos is on.
    xpos: Option<(crate::positions::XPosTables, crate::positions::XPosTables)>,
}

/// The token embeddings and the LM head.
#[derive(Debug)]
enum Vocabulary {
    /// `(vocab, embed_dim)` matrices (the same tensor when tied); the head multiplies by its transposed view.
    Matrices {
        embed_tokens: Tensor,
        lm_head: Tensor,
    },
    /// CPU, f32: the head as a packed [`Projection`] with a zero bias (the 16-row product costs about what one
    /// row does, where `gemm` repacks the vocabulary matrix every call); tied embeddings (`embed_tokens: None`) are
    /// gathered from the head's panels, so the vocabulary is stored once, as before.
    Packed {
        head: Projection,
        embed_tokens: Option<Tensor>,
    },
}

impl Vocabulary {
    /// From the embeddings and, when not tied, a separate head (both `(vocab, embed_dim)`).
    fn new(embed_tokens: Tensor, lm_head: Option<Tensor>) -> Result<Self> {
        if !(embed_tokens.device().is_cpu() && embed_tokens.dtype() == DType::F32) {
            let lm_head = lm_head.unwrap_or_else(|| embed_tokens.clone());
            return Ok(Self::Matrices {
                embed_tokens,
                lm_head,
            });
        }
        let (vocab, _) = embed_tokens.dims2()?;
        let zero = Tensor::zeros(vocab, DType::F32, embed_tokens.device())?;
        Ok(match lm_head {
            Some(lm_head) => Self::Packed {
                head: Projection::from_out_in(&lm_head, zero)?,
                embed_tokens: Some(embed_tokens),
            },
            None => Self::Packed {
                head: Projection::from_out_in(&embed_tokens, zero)?,
                embed_tokens: None,
            },
        })
    }

    /// The embeddings of `ids`, `(ids, embed_dim)`.
    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let table = match self {
            Self::Matrices { embed_tokens, .. }
            | Self::Packed {
                embed_tokens: Some(embed_tokens),
                ..
            } => embed_tokens,
            Self::Packed {
                head,
                embed_tokens: None,
            } => return head.gather_weight_rows(ids),
        };
        let ids = Tensor::from_slice(ids, ids.len(), table.device())?;
        Ok(table.index_select(&ids, 0)?)
    }

    /// Logits `(rows, vocab)` in f32.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match self {
            Self::Matrices { lm_head, .. } => {
                Ok(hidden.matmul(&lm_head.t()?)?.to_dtype(DType::F32)?)
            }
            Self::Packed { head, .. } => head.forward(hidden),
        }
    }
}

/// The text half of a KOSMOS model: token embeddings, decoder layers, final LayerNorm and tied LM head
/// (weights under `text_model`).
#[derive(Debug)]
pub struct TextModel {
    vocabulary: Vocabulary,
    layers: Vec<DecoderLayer>,
    layer_norm: LayerNorm,
    sinusoidal: Option<SinusoidalPositions>,
    xpos: Option<XPos>,
    /// Kosmos-2.5: `segment_emb` `(2, embed_dim)` and the image block's tags.
    segments: Option<(Tensor, u32, u32)>,
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
        Self::new_family(cfg, tie_word_embeddings, TextFamily::Kosmos2, weights)
    }

    /// [`TextModel::new`] for the decoder of `family` (Kosmos-2.5's also loads `model.segment_emb.weight`).
    pub fn new_family(
        cfg: &TextConfig,
        tie_word_embeddings: bool,
        family: TextFamily,
        weights: &Weights,
    ) -> Result<Self> {
        let shape = [cfg.vocab_size, cfg.embed_dim];
        let model = weights.pp("model");
        let embed_tokens =
            if model.contains("embed_tokens.weight") || !weights.contains("lm_head.weight") {
                model.get(&shape, "embed_tokens.weight")?
            } else {
                weights.get(&shape, "lm_head.weight")?
            };
        let lm_head = (!tie_word_embeddings && weights.contains("lm_head.weight"))
            .then(|| weights.get(&shape, "lm_head.weight"))
            .transpose()?;
        let vocabulary = Vocabulary::new(embed_tokens, lm_head)?;
        let layers = (0..cfg.layers)
            .map(|index| DecoderLayer::new(cfg, family, &model.pp(format!("layers.{index}"))))
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
        let segments = match family {
            TextFamily::Kosmos2 => None,
            TextFamily::Kosmos25 {
                image_start,
                image_end,
            } => Some((
                model.get(&[2, cfg.embed_dim], "segment_emb.weight")?,
                image_start,
                image_end,
            )),
        };
        Ok(Self {
            vocabulary,
            layers,
            segments,
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
        self.layer_norm.weight().dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.layer_norm.weight().device()
    }

    /// A paged KV cache for this model of `config`'s size, whose prefix hashes are salted with `fingerprint`.
    pub fn kv_cache(&self, config: KvCacheConfig, fingerprint: &str) -> Result<PagedKvCache> {
        PagedKvCache::new(
            self.layers.len(),
            self.config.attention_heads,
            self.config.head_dim(),
            self.dtype(),
            self.device(),
            config,
            fingerprint,
        )
    }

    /// Runs the decoder over the new tokens of every chunk: reserves their KV blocks in `cache` (see
    /// [`PagedKvCache::reserve`]), writes their keys and values, and appends their ids to each chunk's table.
    /// Returns the final hidden states `(total new tokens, embed_dim)`, chunk after chunk.
    ///
    /// On error the chunks' tables are left holding blocks whose contents are unspecified: release them.
    pub fn forward(&self, cache: &mut PagedKvCache, chunks: &mut [SeqChunk<'_>]) -> Result<Tensor> {
        let device = self.device().clone();
        let dtype = self.dtype();
        let block_size = cache.block_size();
        let mut all_ids = Vec::new();
        let mut all_positions = Vec::new();
        let mut slots = Vec::new();
        let mut header = Vec::with_capacity(4 * chunks.len());
        let mut tables = Vec::new();
        let mut xpos_parts = Vec::new();
        let mut segment_ids = Vec::new();
        let (mut max_context, mut max_q_len) = (0, 0);
        for chunk in chunks.iter_mut() {
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
            cache.reserve(chunk.table, len)?;
            let past = chunk.table.len();
            let context = past + len;
            header.extend([all_ids.len(), len, context, 0].map(|v| v as u32));
            for position in past..context {
                slots.push(cache.slot(chunk.table, position)?);
            }
            all_ids.extend_from_slice(chunk.input_ids);
            all_positions.extend(pad_aware_positions(
                chunk.table.tokens(),
                chunk.input_ids,
                self.config.pad_token_id,
            ));
            if let Some((_, image_start, image_end)) = &self.segments {
                segment_ids.extend(
                    image_block_flags(
                        chunk.table.tokens(),
                        chunk.input_ids,
                        *image_start,
                        *image_end,
                    )
                    .into_iter()
                    .map(u32::from),
                );
            }
            tables.push(chunk.table.blocks()[..context.div_ceil(block_size)].to_vec());
            if let Some(xpos) = &self.xpos {
                xpos_parts.push((
                    xpos.tables(past, len, false, dtype, &device)?,
                    xpos.tables(past, len, true, dtype, &device)?,
                ));
            }
            max_context = max_context.max(context);
            max_q_len = max_q_len.max(len);
        }
        let mut meta = header;
        for (index, table) in tables.iter().enumerate() {
            meta[4 * index + 3] = meta.len() as u32;
            meta.extend_from_slice(table);
        }
        let tokens = all_ids.len();
        let meta_len = meta.len();
        let xpos = if xpos_parts.is_empty() {
            None
        } else {
            let (queries, keys): (Vec<_>, Vec<_>) = xpos_parts.into_iter().unzip();
            Some((XPos::concat(&queries)?, XPos::concat(&keys)?))
        };
        let step = StepInputs {
            cache,
            slots: Tensor::from_vec(slots, tokens, &device)?,
            meta: Tensor::from_vec(meta, meta_len, &device)?,
            op: PagedAttention {
                num_seqs: chunks.len(),
                block_size,
                max_context,
                max_q_len,
            },
            xpos,
        };
        let mut xs = self.embed(chunks, &all_ids)?;
        // Positions, plus the segment embedding (Kosmos-2.5), summed before they are added to the tokens, as the
        // reference sums them.
        let mut positions = match &self.sinusoidal {
            Some(sinusoidal) => Some(sinusoidal.embed(&all_positions, dtype, &device)?),
            None => None,
        };
        if let Some((table, _, _)) = &self.segments {
            let segments =
                table.index_select(&Tensor::from_vec(segment_ids, tokens, &device)?, 0)?;
            positions = Some(match positions {
                Some(positions) => (positions + segments)?,
                None => segments,
            });
        }
        if let Some(positions) = positions {
            xs = (xs + positions)?;
        }
        for (index, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, index, &step)?;
        }
        drop(step);
        for chunk in chunks.iter_mut() {
            cache.commit(chunk.table, chunk.input_ids);
        }
        layer_norm(&self.layer_norm, &xs)
    }

    /// Token embeddings with image embeddings written at the masked positions, then scaled (images included,
    /// as the reference scales after the replacement). `(total tokens, embed_dim)`.
    fn embed(&self, chunks: &[SeqChunk<'_>], all_ids: &[u32]) -> Result<Tensor> {
        let device = self.device();
        let tokens = self.vocabulary.embed(all_ids)?;
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
        self.vocabulary.logits(hidden)
    }

    /// Log-softmax over the vocabulary of [`TextModel::logits`].
    pub fn log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(
            &self.logits(hidden)?,
            D::Minus1,
        )?)
    }
}
