//! Model configuration: serde mirrors of the Hugging Face `Kosmos2Config` (`config.json`) with the reference's
//! defaults for missing keys and unknown keys ignored, plus the KOSMOS-1 extensions (xPos, absolute positions).
//!
//! Reference: `transformers/models/kosmos2/configuration_kosmos2.py`; the KOSMOS-1 flags follow torchscale's
//! `DecoderConfig` (`xpos_rel_pos`, `xpos_scale_base`, `no_token_positional_embeddings`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// An activation function named in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// Exact erf GELU (`torch.nn.functional.gelu`), the text decoder's activation.
    #[serde(rename = "gelu")]
    Gelu,
    /// `x * sigmoid(1.702 x)`, CLIP's activation.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// The tanh approximation of GELU.
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh", rename = "gelu_tanh")]
    GeluTanh,
    /// `max(x, 0)`.
    #[serde(rename = "relu")]
    Relu,
}

/// The text decoder's configuration (`text_config`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    /// Vocabulary size, the rows of `embed_tokens`.
    pub vocab_size: usize,
    /// Largest position the sinusoidal table is built for (it grows on demand, like the reference's).
    pub max_position_embeddings: usize,
    /// Model width.
    #[serde(alias = "hidden_size")]
    pub embed_dim: usize,
    /// Number of decoder layers.
    #[serde(alias = "num_hidden_layers")]
    pub layers: usize,
    /// Width of the feed-forward layer.
    pub ffn_dim: usize,
    /// Attention heads per layer (also used by the connector's cross-attention).
    #[serde(alias = "num_attention_heads")]
    pub attention_heads: usize,
    /// Feed-forward activation.
    pub activation_function: Activation,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// Multiply token embeddings by `sqrt(embed_dim)`.
    pub scale_embedding: bool,
    /// Padding token id; also the padding index of the sinusoidal positions.
    pub pad_token_id: u32,
    /// Beginning-of-sequence id.
    pub bos_token_id: u32,
    /// End-of-sequence id.
    pub eos_token_id: u32,
    /// KOSMOS-1: xPos relative positions in self-attention (torchscale `xpos_rel_pos`).
    pub xpos_rel_pos: bool,
    /// KOSMOS-1: xPos scale base (torchscale `xpos_scale_base`).
    pub xpos_scale_base: f64,
    /// KOSMOS-1: disables the absolute sinusoidal positions (torchscale/fairseq `no_token_positional_embeddings`).
    pub no_token_positional_embeddings: bool,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 65037,
            max_position_embeddings: 2048,
            embed_dim: 2048,
            layers: 24,
            ffn_dim: 8192,
            attention_heads: 32,
            activation_function: Activation::Gelu,
            layer_norm_eps: 1e-5,
            scale_embedding: true,
            pad_token_id: 1,
            bos_token_id: 0,
            eos_token_id: 2,
            xpos_rel_pos: false,
            xpos_scale_base: 512.0,
            no_token_positional_embeddings: false,
        }
    }
}

impl TextConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.attention_heads
    }
}

/// The vision tower's configuration (`vision_config`), a CLIP ViT.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    /// Width of the tower.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Input resolution (square).
    pub image_size: usize,
    /// Patch side.
    pub patch_size: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl VisionConfig {
    /// Patches per image side.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens the tower produces per image: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        self.patches_per_side() * self.patches_per_side() + 1
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The whole model's configuration (`config.json` of `Kosmos2ForConditionalGeneration`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct KosmosConfig {
    /// The text decoder.
    pub text_config: TextConfig,
    /// The vision tower.
    pub vision_config: VisionConfig,
    /// Image tokens per image: the connector's latent queries.
    pub latent_query_num: usize,
    /// The LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
}

impl Default for KosmosConfig {
    fn default() -> Self {
        Self {
            text_config: TextConfig::default(),
            vision_config: VisionConfig::default(),
            latent_query_num: 64,
            tie_word_embeddings: true,
        }
    }
}

/// The bytes of a file, or an error naming it.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// JSON bytes as `T`, an error naming the key path that failed; `path` only names the source.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T> {
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(deserializer).map_err(|err| ModelError::Config {
        path: path.to_path_buf(),
        key: err.path().to_string(),
        message: err.inner().to_string(),
    })
}

impl KosmosConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_slice(&read_file(path)?, path)
    }

    /// Parses and validates a config from JSON bytes; `path` only names the source in errors.
    pub fn from_slice(bytes: &[u8], path: &Path) -> Result<Self> {
        let config: KosmosConfig = parse_json(bytes, path)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between fields that serde cannot express.
    pub fn validate(&self) -> Result<()> {
        self.text_config.validate()?;
        let vision = &self.vision_config;
        require_positive(&[
            ("vision_config.hidden_size", vision.hidden_size),
            ("vision_config.intermediate_size", vision.intermediate_size),
            ("vision_config.num_hidden_layers", vision.num_hidden_layers),
            (
                "vision_config.num_attention_heads",
                vision.num_attention_heads,
            ),
            ("vision_config.num_channels", vision.num_channels),
            ("vision_config.patch_size", vision.patch_size),
            ("latent_query_num", self.latent_query_num),
        ])?;
        if !vision
            .hidden_size
            .is_multiple_of(vision.num_attention_heads)
        {
            return Err(ModelError::InvalidConfig(format!(
                "`vision_config.hidden_size` ({}) must be divisible by `vision_config.num_attention_heads` ({})",
                vision.hidden_size, vision.num_attention_heads
            )));
        }
        if !vision.image_size.is_multiple_of(vision.patch_size) || vision.image_size == 0 {
            return Err(ModelError::InvalidConfig(format!(
                "`vision_config.image_size` ({}) must be a positive multiple of `vision_config.patch_size` ({})",
                vision.image_size, vision.patch_size
            )));
        }
        Ok(())
    }
}

impl TextConfig {
    /// The text decoder's own checks (every family's decoder): positive sizes, heads that split the width, xPos
    /// settings, a positive LayerNorm epsilon. Keys are named under `text_config`.
    pub fn validate(&self) -> Result<()> {
        require_positive(&[
            ("text_config.vocab_size", self.vocab_size),
            ("text_config.embed_dim", self.embed_dim),
            ("text_config.layers", self.layers),
            ("text_config.ffn_dim", self.ffn_dim),
            ("text_config.attention_heads", self.attention_heads),
        ])?;
        if !self.embed_dim.is_multiple_of(self.attention_heads) {
            return Err(ModelError::InvalidConfig(format!(
                "`text_config.embed_dim` ({}) must be divisible by `text_config.attention_heads` ({})",
                self.embed_dim, self.attention_heads
            )));
        }
        if self.xpos_rel_pos && !self.head_dim().is_multiple_of(2) {
            return Err(ModelError::InvalidConfig(format!(
                "xPos needs an even head dimension, got {}",
                self.head_dim()
            )));
        }
        if self.xpos_rel_pos && self.xpos_scale_base <= 0.0 {
            return Err(ModelError::InvalidConfig(format!(
                "`text_config.xpos_scale_base` must be > 0, got {}",
                self.xpos_scale_base
            )));
        }
        if !self.layer_norm_eps.is_finite() || self.layer_norm_eps <= 0.0 {
            return Err(ModelError::InvalidConfig(
                "`text_config.layer_norm_eps` must be a positive number".into(),
            ));
        }
        Ok(())
    }
}

/// An error naming the first `(key, value)` whose value is 0.
pub(crate) fn require_positive(fields: &[(&str, usize)]) -> Result<()> {
    match fields.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(ModelError::InvalidConfig(format!("`{key}` must be > 0"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_take_the_reference_defaults() {
        let config = KosmosConfig::from_slice(b"{}", Path::new("config.json")).expect("parses");
        assert_eq!(config, KosmosConfig::default());
        assert_eq!(config.text_config.head_dim(), 64);
        assert_eq!(config.vision_config.num_positions(), 257);
    }

    #[test]
    fn unknown_keys_are_ignored_and_aliases_accepted() {
        let json =
            br#"{"architectures": ["Kosmos2ForConditionalGeneration"], "latent_query_num": 3,
            "text_config": {"hidden_size": 32, "attention_heads": 4, "foo": 1},
            "vision_config": {"hidden_act": "quick_gelu", "bar": [1, 2]}}"#;
        let config = KosmosConfig::from_slice(json, Path::new("config.json")).expect("parses");
        assert_eq!(config.text_config.embed_dim, 32);
        assert_eq!(config.latent_query_num, 3);
    }

    #[test]
    fn a_mistyped_key_is_named_in_the_error() {
        let json = br#"{"text_config": {"embed_dim": "wide"}}"#;
        let err = KosmosConfig::from_slice(json, Path::new("m/config.json")).expect_err("rejects");
        let message = err.to_string();
        assert!(message.contains("text_config.embed_dim"), "{message}");
    }

    #[test]
    fn an_unknown_activation_is_rejected_with_its_key() {
        let json = br#"{"vision_config": {"hidden_act": "swish"}}"#;
        let err = KosmosConfig::from_slice(json, Path::new("config.json")).expect_err("rejects");
        assert!(
            err.to_string().contains("vision_config.hidden_act"),
            "{err}"
        );
    }

    #[test]
    fn heads_that_do_not_divide_the_width_are_rejected() {
        let json = br#"{"text_config": {"embed_dim": 30, "attention_heads": 4}}"#;
        let err = KosmosConfig::from_slice(json, Path::new("config.json")).expect_err("rejects");
        assert!(err.to_string().contains("divisible"), "{err}");
    }
}
