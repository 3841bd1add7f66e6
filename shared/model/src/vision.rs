//! The vision tower: a CLIP ViT (`Kosmos2VisionTransformer`), with `pre_layrnorm` (the reference's spelling),
//! pre-LN encoder layers and `post_layernorm`, which KOSMOS applies to **all** tokens (not just the class token).
//!
//! Reference: `transformers/models/kosmos2/modeling_kosmos2.py` (`Kosmos2VisionEmbeddings`,
//! `Kosmos2VisionEncoderLayer`, `Kosmos2VisionTransformer`); paper: Radford et al., "Learning Transferable Visual
//! Models From Natural Language Supervision".

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm};

use crate::config::{Activation, VisionConfig};
use crate::error::{ModelError, Result};
use crate::nn::{AttentionProjections, Projection, layer_norm};
use crate::weights::Weights;

#[derive(Debug)]
struct Embeddings {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
}

impl Embeddings {
    fn new(cfg: &VisionConfig, weights: &Weights) -> Result<Self> {
        let hidden = cfg.hidden_size;
        let class_embedding = weights.get(&[hidden], "class_embedding")?;
        let patch_weight = weights.get(
            &[hidden, cfg.num_channels, cfg.patch_size, cfg.patch_size],
            "patch_embedding.weight",
        )?;
        let conv_config = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let position_embedding =
            weights.get(&[cfg.num_positions(), hidden], "position_embedding.weight")?;
        Ok(Self {
            class_embedding,
            patch_embedding: Conv2d::new(patch_weight, None, conv_config),
            position_embedding,
        })
    }

    /// `(batch, channels, height, width)` → `(batch, patches + 1, hidden)`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let batch = pixel_values.dim(0)?;
        let pixel_values = pixel_values.to_dtype(self.class_embedding.dtype())?;
        // (batch, hidden, grid, grid) → (batch, patches, hidden)
        let patches = self
            .patch_embedding
            .forward(&pixel_values)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let hidden = self.class_embedding.dim(0)?;
        let class = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .repeat((batch, 1, 1))?;
        let tokens = Tensor::cat(&[&class, &patches], 1)?;
        Ok(tokens.broadcast_add(&self.position_embedding)?)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: AttentionProjections,
    layer_norm2: LayerNorm,
    fc1: Projection,
    fc2: Projection,
    activation: Activation,
}

impl EncoderLayer {
    fn new(cfg: &VisionConfig, weights: &Weights) -> Result<Self> {
        let hidden = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            layer_norm1: weights.layer_norm(hidden, eps, "layer_norm1")?,
            self_attn: AttentionProjections::new(
                &weights.pp("self_attn"),
                hidden,
                cfg.num_attention_heads,
            )?,
            layer_norm2: weights.layer_norm(hidden, eps, "layer_norm2")?,
            fc1: weights.projection(hidden, cfg.intermediate_size, "mlp.fc1")?,
            fc2: weights.projection(cfg.intermediate_size, hidden, "mlp.fc2")?,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let normed = layer_norm(&self.layer_norm1, xs)?;
        // No mask: every patch sees every patch.
        let attended = self.self_attn.attend(&normed, 0)?;
        let xs = (xs + attended)?;
        let hidden = self
            .fc1
            .forward_activated(&layer_norm(&self.layer_norm2, &xs)?, self.activation)?;
        let hidden = self.fc2.forward(&hidden)?;
        Ok((xs + hidden)?)
    }
}

/// The CLIP ViT tower of a KOSMOS model (weights under `vision_model.model`).
#[derive(Debug)]
pub struct VisionTower {
    embeddings: Embeddings,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    config: VisionConfig,
}

impl VisionTower {
    /// Loads the tower from `weights` positioned at `vision_model.model`.
    pub fn new(cfg: &VisionConfig, weights: &Weights) -> Result<Self> {
        let hidden = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|index| EncoderLayer::new(cfg, &weights.pp(format!("encoder.layers.{index}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::new(cfg, &weights.pp("embeddings"))?,
            pre_layrnorm: weights.layer_norm(hidden, eps, "pre_layrnorm")?,
            layers,
            post_layernorm: weights.layer_norm(hidden, eps, "post_layernorm")?,
            config: cfg.clone(),
        })
    }

    /// `(batch, channels, image_size, image_size)` → the last hidden state `(batch, patches + 1, hidden)`,
    /// without the post LayerNorm (the reference's `last_hidden_state`).
    pub fn last_hidden_state(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, channels, height, width) = pixel_values.dims4()?;
        let cfg = &self.config;
        if channels != cfg.num_channels || height != cfg.image_size || width != cfg.image_size {
            return Err(ModelError::InvalidInput(format!(
                "pixel_values must be (batch, {}, {}, {}), got {:?}",
                cfg.num_channels,
                cfg.image_size,
                cfg.image_size,
                pixel_values.dims()
            )));
        }
        let mut xs = layer_norm(&self.pre_layrnorm, &self.embeddings.forward(pixel_values)?)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }

    /// The post LayerNorm over every token, as KOSMOS feeds the connector.
    pub fn post_layernorm(&self, last_hidden_state: &Tensor) -> Result<Tensor> {
        layer_norm(&self.post_layernorm, last_hidden_state)
    }
}
