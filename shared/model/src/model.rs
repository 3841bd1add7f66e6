//! Loading a model directory in Hugging Face layout, the two independently loadable halves (vision: pixels →
//! image embeddings; text: token ids + image embeddings → logits), and the reference's left-padded batch layout
//! on top of the packed text forward.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::{KosmosConfig, TextConfig};
use crate::connector::Connector;
use crate::error::{ModelError, Result};
use crate::page::{Kosmos25Config, PageEncoder};
use crate::paged::KvCacheConfig;
use crate::text::{ImageInjection, SeqChunk, TextFamily, TextModel};
use crate::vision::VisionTower;
use crate::weights::Weights;

/// The files of a model directory in Hugging Face layout.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The directory.
    pub dir: PathBuf,
    /// Its parsed `config.json`, by family.
    pub config: ModelConfig,
    /// `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
}

impl ModelFiles {
    /// Reads `config.json` and locates the weights of the model directory `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let index_path = dir.join("model.safetensors.index.json");
        let weights = if index_path.exists() {
            shards_from_index(&index_path)?
        } else {
            vec![dir.join("model.safetensors")]
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
        })
    }

    fn weights(&self, dtype: DType, device: &Device) -> Result<Weights> {
        Weights::from_mmaped_safetensors(&self.weights, dtype, device)
    }

    /// The id of the added token `content` in the directory's `tokenizer.json` (its `added_tokens` list), for the
    /// few ids a model half needs without a tokenizer (Kosmos-2.5's `<image>` and `</image>`).
    pub fn added_token_id(&self, content: &str) -> Result<u32> {
        #[derive(serde::Deserialize)]
        struct Added {
            id: u32,
            content: String,
        }
        #[derive(serde::Deserialize)]
        struct TokenizerJson {
            #[serde(default)]
            added_tokens: Vec<Added>,
        }
        let path = self.dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let parsed: TokenizerJson =
            serde_json::from_slice(&bytes).map_err(|err| ModelError::Config {
                path: path.clone(),
                key: "added_tokens".into(),
                message: err.to_string(),
            })?;
        parsed
            .added_tokens
            .iter()
            .find(|token| token.content == content)
            .map(|token| token.id)
            .ok_or_else(|| ModelError::Config {
                path,
                key: "added_tokens".into(),
                message: format!("no added token `{content}`"),
            })
    }

    /// The decoder family of this directory: Kosmos-2.5's needs its image block's tag ids.
    pub fn text_family(&self) -> Result<TextFamily> {
        Ok(match self.config.family() {
            Family::Kosmos2 => TextFamily::Kosmos2,
            Family::Kosmos25 => TextFamily::Kosmos25 {
                image_start: self.added_token_id("<image>")?,
                image_end: self.added_token_id("</image>")?,
            },
        })
    }
}

/// The KOSMOS model families this crate loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// KOSMOS-1 and Kosmos-2 (`model_type` `kosmos-2`, or none): CLIP tower, 224-pixel images.
    Kosmos2,
    /// Kosmos-2.5 (`model_type` `kosmos-2.5`): the page encoder over flattened patches.
    Kosmos25,
}

impl Family {
    /// The `model_type` naming it (`kosmos-2` for KOSMOS-1 too).
    pub fn name(self) -> &'static str {
        match self {
            Family::Kosmos2 => "kosmos-2",
            Family::Kosmos25 => KOSMOS_2_5,
        }
    }
}

/// A model directory's `config.json`, by family (`model_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// KOSMOS-1 / Kosmos-2.
    Kosmos2(KosmosConfig),
    /// Kosmos-2.5.
    Kosmos25(Kosmos25Config),
}

impl ModelConfig {
    /// Reads `config.json`, choosing the family by its `model_type`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Ok(match model_type(path)?.as_deref() {
            Some(KOSMOS_2_5) => ModelConfig::Kosmos25(Kosmos25Config::from_file(path)?),
            _ => ModelConfig::Kosmos2(KosmosConfig::from_file(path)?),
        })
    }

    /// The family.
    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Kosmos2(_) => Family::Kosmos2,
            ModelConfig::Kosmos25(_) => Family::Kosmos25,
        }
    }

    /// The text decoder's configuration.
    pub fn text_config(&self) -> &TextConfig {
        match self {
            ModelConfig::Kosmos2(config) => &config.text_config,
            ModelConfig::Kosmos25(config) => &config.text_config,
        }
    }

    /// Image tokens per image: the connector's latent queries.
    pub fn latent_query_num(&self) -> usize {
        match self {
            ModelConfig::Kosmos2(config) => config.latent_query_num,
            ModelConfig::Kosmos25(config) => config.latent_query_num,
        }
    }

    /// Whether the LM head is the embedding matrix (always for Kosmos-2.5).
    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            ModelConfig::Kosmos2(config) => config.tie_word_embeddings,
            ModelConfig::Kosmos25(_) => true,
        }
    }

    /// The Kosmos-2 configuration, or an error naming the family for a Kosmos-2.5 one.
    pub fn kosmos2(&self) -> Result<&KosmosConfig> {
        match self {
            ModelConfig::Kosmos2(config) => Ok(config),
            ModelConfig::Kosmos25(_) => Err(ModelError::InvalidInput(
                "this needs a KOSMOS-1 / Kosmos-2 model, the directory holds a Kosmos-2.5 one"
                    .into(),
            )),
        }
    }
}

/// `model_type` of Kosmos-2.5's `config.json`.
pub const KOSMOS_2_5: &str = "kosmos-2.5";

/// The `model_type` a `config.json` names, if any.
pub fn model_type(config_path: &Path) -> Result<Option<String>> {
    let value: serde_json::Value =
        crate::config::parse_json(&crate::config::read_file(config_path)?, config_path)?;
    Ok(value
        .get("model_type")
        .and_then(|kind| kind.as_str())
        .map(str::to_string))
}

fn shards_from_index(index_path: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let bytes = std::fs::read(index_path).map_err(|source| ModelError::Io {
        path: index_path.to_path_buf(),
        source,
    })?;
    let index: Index = serde_json::from_slice(&bytes).map_err(|err| ModelError::Config {
        path: index_path.to_path_buf(),
        key: "weight_map".into(),
        message: err.to_string(),
    })?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = index
        .weight_map
        .values()
        .map(|file| dir.join(file))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Parses a dtype name: `f32`, `f16` or `bf16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(ModelError::InvalidInput(format!(
            "unknown dtype `{other}` (expected f32, f16 or bf16)"
        ))),
    }
}

/// Parses a device name: `cpu`, `cuda` or `cuda:N` (CUDA only when built with the `cuda` feature).
pub fn parse_device(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                ModelError::InvalidInput(format!(
                    "unknown device `{name}` (expected cpu, cuda or cuda:N)"
                ))
            })?,
        None => {
            return Err(ModelError::InvalidInput(format!(
                "unknown device `{name}` (expected cpu, cuda or cuda:N)"
            )));
        }
    };
    if cfg!(feature = "cuda") {
        Ok(Device::new_cuda(ordinal)?)
    } else {
        Err(ModelError::InvalidInput(format!(
            "device `{name}` needs a build with the `cuda` feature"
        )))
    }
}

/// The vision half: the CLIP tower and the connector (weights `vision_model.model.*` and
/// `image_to_text_projection.*`), or Kosmos-2.5's page encoder (`vision_model.*` and `image_to_text_projection.*`).
#[derive(Debug)]
pub struct VisionHalf {
    encoder: VisionEncoder,
    config: ModelConfig,
}

#[derive(Debug)]
enum VisionEncoder {
    Clip {
        tower: VisionTower,
        connector: Connector,
    },
    Page(PageEncoder),
}

impl VisionHalf {
    /// Loads only the vision tower and the connector of `files`.
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let weights = files.weights(dtype, device)?;
        Self::new(&files.config, &weights)
    }

    /// Builds the vision half from `weights` at the checkpoint's root.
    pub fn new(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        let encoder = match config {
            ModelConfig::Kosmos2(config) => VisionEncoder::Clip {
                tower: VisionTower::new(&config.vision_config, &weights.pp("vision_model.model"))?,
                connector: Connector::new(config, &weights.pp("image_to_text_projection"))?,
            },
            ModelConfig::Kosmos25(config) => {
                VisionEncoder::Page(PageEncoder::new(config, weights)?)
            }
        };
        Ok(Self {
            encoder,
            config: config.clone(),
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The family of the model.
    pub fn family(&self) -> Family {
        self.config.family()
    }

    fn clip(&self) -> Result<(&VisionTower, &Connector)> {
        match &self.encoder {
            VisionEncoder::Clip { tower, connector } => Ok((tower, connector)),
            VisionEncoder::Page(_) => Err(ModelError::InvalidInput(
                "a Kosmos-2.5 model encodes pages (flattened patches), not CLIP pixels".into(),
            )),
        }
    }

    /// `(images, channels, size, size)` → the tower's last hidden state `(images, patches + 1, vision_hidden)`.
    pub fn vision_last_hidden_state(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.clip()?.0.last_hidden_state(pixel_values)
    }

    /// `(images, channels, size, size)` → image embeddings `(images, latent_query_num, embed_dim)` (Kosmos-2).
    pub fn encode(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (tower, connector) = self.clip()?;
        let hidden = tower.last_hidden_state(pixel_values)?;
        connector.forward(&tower.post_layernorm(&hidden)?)
    }

    /// Kosmos-2.5: `(pages, max_patches, 2 + patch values)` flattened patches → image embeddings `(pages,
    /// latent_query_num, embed_dim)`. The patch mask is 1 on rows whose sum is not zero, as the reference's
    /// `Kosmos2_5ForConditionalGeneration` computes it.
    pub fn encode_pages(&self, flattened_patches: &Tensor) -> Result<Tensor> {
        let VisionEncoder::Page(encoder) = &self.encoder else {
            return Err(ModelError::InvalidInput(
                "a KOSMOS-1 / Kosmos-2 model encodes CLIP pixels, not pages".into(),
            ));
        };
        let mask = flattened_patches
            .to_dtype(DType::F32)?
            .sum(2)?
            .ne(0f32)?
            .to_dtype(DType::F32)?;
        encoder.image_embeds(flattened_patches, &mask)
    }
}

/// The text half: the decoder with its LM head (weights `text_model.*`).
#[derive(Debug)]
pub struct TextHalf {
    model: TextModel,
    config: ModelConfig,
}

impl TextHalf {
    /// Loads only the text decoder of `files`.
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self> {
        let weights = files.weights(dtype, device)?;
        Self::new(&files.config, files.text_family()?, &weights)
    }

    /// Builds the text half of `family` from `weights` at the checkpoint's root.
    pub fn new(config: &ModelConfig, family: TextFamily, weights: &Weights) -> Result<Self> {
        Ok(Self {
            model: TextModel::new_family(
                config.text_config(),
                config.tie_word_embeddings(),
                family,
                &weights.pp("text_model"),
            )?,
            config: config.clone(),
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The decoder, for packed forwards over per-sequence caches.
    pub fn model(&self) -> &TextModel {
        &self.model
    }

    /// Logits `(batch, seq, vocab)` in f32 for a left-padded batch in the reference's layout.
    ///
    /// `input_ids`, `attention_mask` and `image_embeds_position_mask` are `(batch, seq)` integer tensors;
    /// `attention_mask` must be zeros then ones in every row (left padding). `image_embeds` holds
    /// `(images, latent_query_num, embed_dim)` for the marked positions in row-major order. Positions on left
    /// padding get zero logits (the reference computes values there that nothing may use).
    pub fn forward_padded(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        image_embeds_position_mask: &Tensor,
        image_embeds: Option<&Tensor>,
    ) -> Result<Tensor> {
        let rows = PaddedRows::new(input_ids, attention_mask, image_embeds_position_mask)?;
        let embed_dim = self.config.text_config().embed_dim;
        let image_rows = match image_embeds {
            Some(embeds) => Some(embeds.flatten_to(1)?.reshape(((), embed_dim))?),
            None => None,
        };
        let marked_total: usize = rows
            .rows
            .iter()
            .map(|row| row.image_mask.iter().filter(|&&m| m).count())
            .sum();
        let available = image_rows.as_ref().map_or(Ok(0), |rows| rows.dim(0))?;
        if marked_total != available {
            return Err(ModelError::InvalidInput(format!(
                "the image mask marks {marked_total} positions but {available} image embedding rows were given"
            )));
        }
        let mut cache = self.model.kv_cache(
            KvCacheConfig::for_sequences(rows.rows.iter().map(|row| row.ids.len()), 16),
            "",
        )?;
        let mut tables: Vec<_> = rows
            .rows
            .iter()
            .map(|_| cache.new_table("", Vec::new()))
            .collect();
        let mut row_images = Vec::with_capacity(rows.rows.len());
        let mut next_image_row = 0;
        for row in &rows.rows {
            let marked = row.image_mask.iter().filter(|&&m| m).count();
            let embeds = match (&image_rows, marked) {
                (Some(all), marked) if marked > 0 => Some(all.narrow(0, next_image_row, marked)?),
                _ => None,
            };
            next_image_row += marked;
            row_images.push(embeds);
        }
        let mut chunks: Vec<SeqChunk<'_>> = rows
            .rows
            .iter()
            .zip(tables.iter_mut())
            .zip(row_images.iter())
            .map(|((row, table), embeds)| SeqChunk {
                input_ids: &row.ids,
                images: embeds.as_ref().map(|embeds| ImageInjection {
                    mask: &row.image_mask,
                    embeds,
                }),
                table,
            })
            .collect();
        let hidden = self.model.forward(&mut cache, &mut chunks)?;
        let logits = self.model.logits(&hidden)?;
        let vocab = logits.dim(1)?;
        let mut padded = Vec::with_capacity(rows.rows.len());
        let mut start = 0;
        for row in &rows.rows {
            let len = row.ids.len();
            let real = logits.narrow(0, start, len)?;
            let full = if row.pad > 0 {
                let zeros = Tensor::zeros((row.pad, vocab), DType::F32, logits.device())?;
                Tensor::cat(&[&zeros, &real], 0)?
            } else {
                real
            };
            padded.push(full);
            start += len;
        }
        Ok(Tensor::stack(&padded, 0)?)
    }
}

/// One row of a left-padded batch without its padding.
#[derive(Debug, Clone)]
pub struct PaddedRow {
    /// Left padding length.
    pub pad: usize,
    /// The ids after the padding.
    pub ids: Vec<u32>,
    /// The image mask after the padding.
    pub image_mask: Vec<bool>,
}

/// A left-padded batch in the reference's layout, split into unpadded rows.
#[derive(Debug, Clone)]
pub struct PaddedRows {
    /// The rows.
    pub rows: Vec<PaddedRow>,
    /// The padded length.
    pub seq_len: usize,
}

impl PaddedRows {
    /// Splits `(batch, seq)` integer tensors into rows; rejects a mask that is not left padding and image
    /// positions on padding.
    pub fn new(
        input_ids: &Tensor,
        attention_mask: &Tensor,
        image_embeds_position_mask: &Tensor,
    ) -> Result<Self> {
        let ids = as_i64_rows(input_ids, "input_ids")?;
        let mask = as_i64_rows(attention_mask, "attention_mask")?;
        let image_mask = as_i64_rows(image_embeds_position_mask, "image_embeds_position_mask")?;
        let seq_len = input_ids.dim(1)?;
        if attention_mask.dims() != input_ids.dims()
            || image_embeds_position_mask.dims() != input_ids.dims()
        {
            return Err(ModelError::InvalidInput(format!(
                "input_ids {:?}, attention_mask {:?} and image_embeds_position_mask {:?} must have the same shape",
                input_ids.dims(),
                attention_mask.dims(),
                image_embeds_position_mask.dims()
            )));
        }
        let mut rows = Vec::with_capacity(ids.len());
        for (index, ((ids, mask), image_mask)) in ids.iter().zip(&mask).zip(&image_mask).enumerate()
        {
            let pad = mask.iter().take_while(|&&m| m == 0).count();
            if pad == seq_len || mask[pad..].iter().any(|&m| m != 1) {
                return Err(ModelError::InvalidInput(format!(
                    "attention_mask row {index} must be zeros (left padding) followed by at least one 1"
                )));
            }
            if image_mask[..pad].iter().any(|&m| m != 0) {
                return Err(ModelError::InvalidInput(format!(
                    "image_embeds_position_mask row {index} marks padding"
                )));
            }
            let real_ids = ids[pad..]
                .iter()
                .map(|&id| {
                    u32::try_from(id)
                        .map_err(|_| ModelError::InvalidInput(format!("negative token id {id}")))
                })
                .collect::<Result<Vec<_>>>()?;
            rows.push(PaddedRow {
                pad,
                ids: real_ids,
                image_mask: image_mask[pad..].iter().map(|&m| m != 0).collect(),
            });
        }
        Ok(Self { rows, seq_len })
    }
}

fn as_i64_rows(tensor: &Tensor, name: &str) -> Result<Vec<Vec<i64>>> {
    if tensor.rank() != 2 {
        return Err(ModelError::InvalidInput(format!(
            "{name} must be (batch, seq), got {:?}",
            tensor.dims()
        )));
    }
    Ok(tensor.to_dtype(DType::I64)?.to_vec2::<i64>()?)
}

/// Both halves together, for tests, tools and single-process use.
#[derive(Debug)]
pub struct KosmosModel {
    /// Pixels → image embeddings.
    pub vision: VisionHalf,
    /// Token ids + image embeddings → logits.
    pub text: TextHalf,
}

impl KosmosModel {
    /// Loads both halves of the model directory `dir`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = ModelFiles::open(dir)?;
        let weights = files.weights(dtype, device)?;
        Ok(Self {
            vision: VisionHalf::new(&files.config, &weights)?,
            text: TextHalf::new(&files.config, files.text_family()?, &weights)?,
        })
    }

    /// Logits `(batch, seq, vocab)` for a left-padded batch with its images `(images, channels, size, size)` in
    /// row-major order of their positions, and the image embeddings when images were given.
    pub fn forward_padded(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        image_embeds_position_mask: &Tensor,
        pixel_values: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let image_embeds = pixel_values
            .map(|pixels| self.vision.encode(pixels))
            .transpose()?;
        let logits = self.text.forward_padded(
            input_ids,
            attention_mask,
            image_embeds_position_mask,
            image_embeds.as_ref(),
        )?;
        Ok((logits, image_embeds))
    }
}

impl ModelFiles {
    /// A fingerprint of what image embeddings mean for this model: a SHA-256 over the config fields that shape
    /// them (`latent_query_num`, the text width), the raw bytes of every connector tensor
    /// (`image_to_text_projection.*`) and the names, dtypes and shapes of the text tensors.
    ///
    /// The encoder (which makes embeddings) and the decoder (which consumes them) compute it from the same
    /// model directory and agree exactly when the connector weights and the text architecture are the same, so a
    /// decoder can refuse embeddings made by an incompatible encoder build. Reading the connector costs one pass
    /// over a few tens of MB; the text weights are not read.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let weights = self.weights(DType::F32, &Device::Cpu)?;
        let mut hasher = Sha256::new();
        hasher.update(b"kosmos-fingerprint-v1\0");
        hasher.update((self.config.latent_query_num() as u64).to_le_bytes());
        hasher.update((self.config.text_config().embed_dim as u64).to_le_bytes());
        let mut tensors = weights.stored_tensors();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        for tensor in &tensors {
            if tensor.name.starts_with("image_to_text_projection.") {
                hasher.update(tensor.name.as_bytes());
                hasher.update(format!("{:?}{:?}", tensor.dtype, tensor.shape).as_bytes());
                hasher.update(weights.raw_bytes(&tensor.name)?);
            } else if tensor.name.starts_with("text_model.") {
                hasher.update(tensor.name.as_bytes());
                hasher.update(format!("{:?}{:?}", tensor.dtype, tensor.shape).as_bytes());
            }
        }
        let digest = hasher.finalize();
        Ok(digest
            .iter()
            .take(16)
            .map(|byte| format!("{byte:02x}"))
            .collect())
    }
}
