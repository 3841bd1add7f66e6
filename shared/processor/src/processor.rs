//! `KosmosProcessor`: the tokenizer, the image config and the placeholder count of one checkpoint, loaded
//! together from a model directory.

use std::path::Path;

use image::RgbImage;

use crate::config::ImageProcessorConfig;
use crate::decode::{DecodeLimits, decode_image};
use crate::error::ProcessorError;
use crate::grounding::{Entity, post_process_generation};
use crate::preprocess::{PixelValues, preprocess};
use crate::prompt::{EncodedPrompt, PromptOptions, Segment, build_prompt};
use crate::tokenizer::KosmosTokenizer;

/// Everything needed to turn a request into model inputs and a generation into grounded text.
#[derive(Debug, Clone)]
pub struct KosmosProcessor {
    /// The tokenizer with the Kosmos tags configured.
    pub tokenizer: KosmosTokenizer,
    /// The CLIP preprocessing settings.
    pub image_config: ImageProcessorConfig,
    /// Placeholders per image: the model's `latent_query_num`.
    pub num_image_tokens: usize,
}

impl KosmosProcessor {
    /// Loads `tokenizer.json` and `preprocessor_config.json` from `dir`.
    pub fn from_dir(
        dir: impl AsRef<Path>,
        num_image_tokens: usize,
    ) -> Result<Self, ProcessorError> {
        let dir = dir.as_ref();
        Ok(KosmosProcessor {
            tokenizer: KosmosTokenizer::from_file(dir.join("tokenizer.json"))?,
            image_config: ImageProcessorConfig::from_file(dir.join("preprocessor_config.json"))?,
            num_image_tokens,
        })
    }

    /// Builds the model inputs of an interleaved prompt.
    pub fn encode_prompt(
        &self,
        segments: &[Segment],
        grounding: bool,
    ) -> Result<EncodedPrompt, ProcessorError> {
        let options = PromptOptions {
            num_image_tokens: self.num_image_tokens,
            grounding,
            add_eos_token: false,
        };
        Ok(build_prompt(&self.tokenizer, segments, &options)?)
    }

    /// Decodes untrusted image bytes within `limits` and preprocesses them.
    pub fn process_image_bytes(
        &self,
        bytes: &[u8],
        limits: &DecodeLimits,
    ) -> Result<PixelValues, ProcessorError> {
        let image = decode_image(bytes, limits)?;
        self.process_image(&image)
    }

    /// Preprocesses an already decoded image.
    pub fn process_image(&self, image: &RgbImage) -> Result<PixelValues, ProcessorError> {
        Ok(preprocess(image, &self.image_config)?)
    }

    /// Decodes generated ids (special tokens skipped) and extracts the grounded entities.
    pub fn post_process(
        &self,
        generated_ids: &[u32],
    ) -> Result<(String, Vec<Entity>), ProcessorError> {
        let text = self.tokenizer.decode(generated_ids, true)?;
        Ok(post_process_generation(&text))
    }
}
