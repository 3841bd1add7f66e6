//! Kosmos-2.5's page encoder: the Pix2Struct-style vision tower over flattened patches and the connector, page →
//! image embeddings `(pages, latent_query_num, embed_dim)`.
//!
//! Reference: `transformers/models/kosmos2_5/modeling_kosmos2_5.py` (`Kosmos2_5VisionEmbeddings`,
//! `Kosmos2_5VisionLayer`, `Kosmos2_5VisionModel`, `Kosmos2_5ImageToTextProjection`); paper: Lv et al.,
//! "Kosmos-2.5: A Multimodal Literate Model" (arXiv 2309.11419), and Lee et al., "Pix2Struct".
//!
//! Unlike the CLIP tower, the input is a variable grid: `max_patches` rows of `[row id, column id, pixels…]` (the
//! processor's `flatten_patches`), rows past the page's grid zero. Per layer, T5-style:
//! `x += attention(rms(x))` (no biases, padded rows masked out as keys), `x += wo(gelu_tanh(wi_0 rms(x)) * wi_1
//! rms(x))`, then a final RMS norm. Every row comes out, padded ones included, and the connector attends over all
//! of them without a mask, as the reference does.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::config::{Activation, TextConfig, parse_json, read_file, require_positive};
use crate::connector::Connector;
use crate::error::{ModelError, Result};
use crate::nn::{AttentionProjections, Projection};
use crate::weights::Weights;

/// The page tower's configuration (`vision_config` of a `kosmos-2.5` `config.json`), HF's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct PageVisionConfig {
    /// Width of the tower.
    pub hidden_size: usize,
    /// Values per patch: `patch_height * patch_width * 3`.
    pub patch_embed_hidden_size: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
    /// Width of one attention head (heads × head_dim need not equal `hidden_size`).
    pub head_dim: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// The gate's activation (`gelu_new`: the tanh approximation).
    pub dense_act_fn: Activation,
    /// Epsilon of every RMS norm.
    pub layer_norm_eps: f64,
    /// Rows of the row and column embedding tables: ids run `0..max_num_patches`.
    pub max_num_patches: usize,
}

impl Default for PageVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1536,
            patch_embed_hidden_size: 768,
            intermediate_size: 3968,
            head_dim: 64,
            num_hidden_layers: 18,
            num_attention_heads: 24,
            dense_act_fn: Activation::GeluTanh,
            layer_norm_eps: 1e-6,
            max_num_patches: 4096,
        }
    }
}

/// A Kosmos-2.5 `config.json` (`Kosmos2_5ForConditionalGeneration`, `model_type` `kosmos-2.5`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Kosmos25Config {
    /// The text decoder (the KOSMOS decoder plus a segment embedding).
    pub text_config: TextConfig,
    /// The page tower.
    pub vision_config: PageVisionConfig,
    /// Image tokens per page: the connector's latent queries.
    pub latent_query_num: usize,
}

impl Default for Kosmos25Config {
    fn default() -> Self {
        Self {
            text_config: TextConfig {
                vocab_size: 108_481,
                max_position_embeddings: 4096,
                embed_dim: 1536,
                layers: 24,
                ffn_dim: 6144,
                attention_heads: 16,
                ..TextConfig::default()
            },
            vision_config: PageVisionConfig::default(),
            latent_query_num: 2048,
        }
    }
}

impl Kosmos25Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_slice(&read_file(path)?, path)
    }

    /// Parses and validates a config from JSON bytes; `path` only names the source in errors.
    pub fn from_slice(bytes: &[u8], path: &Path) -> Result<Self> {
        let config: Kosmos25Config = parse_json(bytes, path)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between fields that serde cannot express.
    pub fn validate(&self) -> Result<()> {
        self.text_config.validate()?;
        let vision = &self.vision_config;
        require_positive(&[
            ("vision_config.hidden_size", vision.hidden_size),
            (
                "vision_config.patch_embed_hidden_size",
                vision.patch_embed_hidden_size,
            ),
            ("vision_config.intermediate_size", vision.intermediate_size),
            ("vision_config.head_dim", vision.head_dim),
            ("vision_config.num_hidden_layers", vision.num_hidden_layers),
            (
                "vision_config.num_attention_heads",
                vision.num_attention_heads,
            ),
            ("vision_config.max_num_patches", vision.max_num_patches),
            ("latent_query_num", self.latent_query_num),
        ])?;
        if !vision.patch_embed_hidden_size.is_multiple_of(3) {
            return Err(ModelError::InvalidConfig(format!(
                "`vision_config.patch_embed_hidden_size` ({}) must be patch_height * patch_width * 3",
                vision.patch_embed_hidden_size
            )));
        }
        Ok(())
    }
}

/// T5's RMS norm (`Kosmos2_5LayerNorm`): `weight * x / sqrt(mean(x²) + eps)`, the mean in f32, no bias.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(weights: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weights.get(&[dim], "weight")?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs32 = xs.to_dtype(DType::F32)?;
        let variance = xs32.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let normed = xs32.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}

/// A bias-free linear layer, as a [`Projection`] with a zero bias (`x + 0` is exact).
fn linear_no_bias(
    weights: &Weights,
    in_dim: usize,
    out_dim: usize,
    name: &str,
) -> Result<Projection> {
    let weight = weights.pp(name).get(&[out_dim, in_dim], "weight")?;
    let bias = Tensor::zeros(out_dim, weight.dtype(), weight.device())?;
    Projection::from_out_in(&weight, bias)
}

#[derive(Debug)]
struct PageLayer {
    pre_attention_norm: RmsNorm,
    /// `query`, `key` and `value` fused (the query's `head_dim^-0.5` folded in), and `output`.
    attention: AttentionProjections,
    pre_mlp_norm: RmsNorm,
    wi_0: Projection,
    wi_1: Projection,
    wo: Projection,
    act: Activation,
}

impl PageLayer {
    fn new(cfg: &PageVisionConfig, weights: &Weights) -> Result<Self> {
        let hidden = cfg.hidden_size;
        let inner = cfg.num_attention_heads * cfg.head_dim;
        let attention = weights.pp("attention");
        let mlp = weights.pp("mlp");
        Ok(Self {
            pre_attention_norm: RmsNorm::new(
                &weights.pp("pre_attention_layer_norm"),
                hidden,
                cfg.layer_norm_eps,
            )?,
            attention: AttentionProjections::from_parts(
                &linear_no_bias(&attention, hidden, inner, "query")?,
                &linear_no_bias(&attention, hidden, inner, "key")?,
                &linear_no_bias(&attention, hidden, inner, "value")?,
                linear_no_bias(&attention, inner, hidden, "output")?,
                cfg.num_attention_heads,
            )?,
            pre_mlp_norm: RmsNorm::new(
                &weights.pp("pre_mlp_layer_norm"),
                hidden,
                cfg.layer_norm_eps,
            )?,
            wi_0: linear_no_bias(&mlp, hidden, cfg.intermediate_size, "wi_0")?,
            wi_1: linear_no_bias(&mlp, hidden, cfg.intermediate_size, "wi_1")?,
            wo: linear_no_bias(&mlp, cfg.intermediate_size, hidden, "wo")?,
            act: cfg.dense_act_fn,
        })
    }

    /// `(pages, rows, hidden)` with the additive key mask `(pages, rows)`.
    fn forward(&self, xs: &Tensor, key_mask: &Tensor) -> Result<Tensor> {
        let normed = self.pre_attention_norm.forward(xs)?;
        // One op per layer on the CPU (`kernels.rs`), a task per (page, head).
        let attended = self
            .attention
            .attend_with_key_bias(&normed, 0, Some(key_mask))?;
        let xs = (attended + xs)?;

        let normed = self.pre_mlp_norm.forward(&xs)?;
        let gate = self.wi_0.forward_activated(&normed, self.act)?;
        let gated = (gate * self.wi_1.forward(&normed)?)?;
        Ok((self.wo.forward(&gated)? + xs)?)
    }
}

/// The Pix2Struct-style tower (`Kosmos2_5VisionModel`).
#[derive(Debug)]
pub struct PageTower {
    patch_projection: Projection,
    row_embedder: Tensor,
    column_embedder: Tensor,
    layers: Vec<PageLayer>,
    final_norm: RmsNorm,
    cfg: PageVisionConfig,
}

impl PageTower {
    /// Loads the tower from `weights` positioned at `vision_model`.
    pub fn new(cfg: &PageVisionConfig, weights: &Weights) -> Result<Self> {
        let hidden = cfg.hidden_size;
        let embeddings = weights.pp("embeddings");
        let encoder = weights.pp("encoder.layer");
        Ok(Self {
            patch_projection: embeddings.projection(
                cfg.patch_embed_hidden_size,
                hidden,
                "patch_projection",
            )?,
            row_embedder: embeddings.get(&[cfg.max_num_patches, hidden], "row_embedder.weight")?,
            column_embedder: embeddings
                .get(&[cfg.max_num_patches, hidden], "column_embedder.weight")?,
            layers: (0..cfg.num_hidden_layers)
                .map(|index| PageLayer::new(cfg, &encoder.pp(index)))
                .collect::<Result<_>>()?,
            final_norm: RmsNorm::new(&weights.pp("layernorm"), hidden, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    /// `(pages, rows, 2 + patch_embed_hidden_size)` flattened patches and their `(pages, rows)` mask (1 on patches,
    /// 0 on padding) → `(pages, rows, hidden)`, after the final RMS norm.
    ///
    /// Row and column ids must be whole numbers in `0..max_num_patches`; anything else is an error naming the
    /// value, not an out-of-bounds read.
    pub fn forward(&self, flattened_patches: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (pages, rows, width) = flattened_patches.dims3()?;
        let expected = 2 + self.cfg.patch_embed_hidden_size;
        if width != expected {
            return Err(ModelError::InvalidInput(format!(
                "flattened patches have {width} values per row, the tower takes {expected} (2 ids + {} pixels)",
                self.cfg.patch_embed_hidden_size
            )));
        }
        if attention_mask.dims() != [pages, rows] {
            return Err(ModelError::InvalidInput(format!(
                "the patch attention mask is {:?}, expected [{pages}, {rows}]",
                attention_mask.dims()
            )));
        }
        let dtype = self.row_embedder.dtype();
        let patches = flattened_patches.to_dtype(DType::F32)?;
        let row_ids = self.ids(&patches.narrow(2, 0, 1)?.flatten_all()?, "row")?;
        let column_ids = self.ids(&patches.narrow(2, 1, 1)?.flatten_all()?, "column")?;
        let hidden = self.cfg.hidden_size;
        let pixels = patches.narrow(2, 2, width - 2)?.to_dtype(dtype)?;
        // (pages, rows, hidden)
        let mut xs = self.patch_projection.forward(&pixels)?;
        xs = (xs
            + self
                .row_embedder
                .index_select(&row_ids, 0)?
                .reshape((pages, rows, hidden))?)?;
        xs = (xs
            + self
                .column_embedder
                .index_select(&column_ids, 0)?
                .reshape((pages, rows, hidden))?)?;

        // (pages, rows): 0 on patches, f32::MIN on padding (the reference's `_expand_mask`).
        let key_mask =
            (attention_mask.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * f64::from(f32::MIN))?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &key_mask)?;
        }
        self.final_norm.forward(&xs)
    }

    /// The ids column `(n,)` as u32 indices, checked.
    fn ids(&self, column: &Tensor, what: &str) -> Result<Tensor> {
        let values = column.to_vec1::<f32>()?;
        let limit = self.cfg.max_num_patches;
        let ids = values
            .iter()
            .map(|&value| {
                if value.fract() == 0.0 && value >= 0.0 && (value as usize) < limit {
                    Ok(value as u32)
                } else {
                    Err(ModelError::InvalidInput(format!(
                        "a patch {what} id is {value}, ids must be whole numbers in 0..{limit} (max_num_patches)"
                    )))
                }
            })
            .collect::<Result<Vec<u32>>>()?;
        Ok(Tensor::new(ids, column.device())?)
    }
}

/// The tower and the connector: pages to image embeddings.
#[derive(Debug)]
pub struct PageEncoder {
    tower: PageTower,
    connector: Connector,
}

impl PageEncoder {
    /// Loads both from a Kosmos-2.5 checkpoint (`vision_model.*`, `image_to_text_projection.*`).
    pub fn new(cfg: &Kosmos25Config, weights: &Weights) -> Result<Self> {
        Ok(Self {
            tower: PageTower::new(&cfg.vision_config, &weights.pp("vision_model"))?,
            connector: Connector::from_dims(
                cfg.vision_config.hidden_size,
                &cfg.text_config,
                cfg.latent_query_num,
                &weights.pp("image_to_text_projection"),
            )?,
        })
    }

    /// The tower alone (its last hidden state, for parity checks).
    pub fn tower(&self) -> &PageTower {
        &self.tower
    }

    /// `(pages, rows, 2 + pixels)` patches and `(pages, rows)` mask → `(pages, latent_query_num, embed_dim)`:
    /// the tower's rows, L2 normalised, through the connector.
    pub fn image_embeds(
        &self,
        flattened_patches: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let features = self.tower.forward(flattened_patches, attention_mask)?;
        self.connector.forward(&features)
    }
}
