//! The image-to-text connector (`Kosmos2ImageToTextProjection`, unilm's `XConnector`): a dense projection of the
//! L2-normalised vision features followed by one cross-attention in which learned latent queries attend over
//! `[features; queries]`. There is no residual and no LayerNorm after it.

use candle_core::Tensor;

use crate::config::{KosmosConfig, TextConfig};
use crate::error::Result;
use crate::nn::{AttentionProjections, Projection, l2_normalize};
use crate::weights::Weights;

/// Turns vision features into `latent_query_num` image embeddings in the text model's width.
#[derive(Debug)]
pub struct Connector {
    dense: Projection,
    latent_query: Tensor,
    x_attn: AttentionProjections,
}

impl Connector {
    /// Loads the connector from `weights` positioned at `image_to_text_projection`.
    pub fn new(cfg: &KosmosConfig, weights: &Weights) -> Result<Self> {
        Self::from_dims(
            cfg.vision_config.hidden_size,
            &cfg.text_config,
            cfg.latent_query_num,
            weights,
        )
    }

    /// Loads a connector from `vision_hidden`-wide features into `text`'s width with `latent_query_num` queries
    /// (Kosmos-2.5's `Kosmos2_5ImageToTextProjection` has the same weights and arithmetic).
    pub fn from_dims(
        vision_hidden: usize,
        text: &TextConfig,
        latent_query_num: usize,
        weights: &Weights,
    ) -> Result<Self> {
        let width = text.embed_dim;
        Ok(Self {
            dense: weights.projection(vision_hidden, width, "dense")?,
            latent_query: weights.get(&[latent_query_num, width], "latent_query")?,
            x_attn: AttentionProjections::new(&weights.pp("x_attn"), width, text.attention_heads)?,
        })
    }

    /// `(batch, vision_tokens, vision_hidden)` post-LN features → `(batch, latent_query_num, embed_dim)`.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (batch, vision_tokens, _) = features.dims3()?;
        let features = self.dense.forward(&l2_normalize(features)?)?;
        let (queries, width) = self.latent_query.dims2()?;
        // (batch, queries, width)
        let latents = self
            .latent_query
            .reshape((1, queries, width))?
            .repeat((batch, 1, 1))?;
        // (batch, vision_tokens + queries, width): the latents attend to the features and to themselves, so the
        // queries are the last rows of the keys and values.
        let key_value = Tensor::cat(&[&features, &latents], 1)?;
        self.x_attn.attend(&key_value, vision_tokens)
    }
}
