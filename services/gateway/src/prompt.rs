//! Wire prompt → token ids and image positions, on the blocking pool, then → the decoder's segments.
//!
//! The prompt is built by `kosmos-processor` (`build_prompt`), so for one image followed by text the ids are
//! exactly HF `Kosmos2Processor`'s. Checking the images, hashing them and tokenizing grow with the request,
//! so they run together in one `spawn_blocking` call, off the async threads.

use std::sync::Arc;

use kosmos_processor::{
    EncodedPrompt, KosmosTokenizer, PromptError, PromptOptions, Segment, Tag, TokenizerError,
    build_page_prompt, build_prompt, continuation_ids,
};
use kosmos_proto::decoder::v1 as dec;
use kosmos_proto::tensor::v1::Tensor;
use kosmos_proto::v1 as pb;

use crate::config::Limits;
use crate::domain::{PromptPart, ValidImage, validate_prompt};
use crate::error::RequestError;
use crate::upstream::ModelInfo;

/// A tokenized prompt and its checked images.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// Ids, masks and image placeholder ranges.
    pub encoded: EncodedPrompt,
    /// The images, in order of appearance (one per placeholder range).
    pub images: Vec<ValidImage>,
    /// Token ids of each Score candidate (empty for Generate).
    pub candidates: Vec<Vec<u32>>,
}

/// What to prepare.
#[derive(Debug)]
pub struct PrepareInput {
    /// The wire segments.
    pub segments: Vec<pb::Segment>,
    /// Prefix `<grounding>`.
    pub grounding: bool,
    /// Score candidates to tokenize, if any.
    pub candidates: Vec<String>,
}

/// Checks and tokenizes a prompt on the blocking pool.
pub async fn prepare(
    tokenizer: Arc<KosmosTokenizer>,
    limits: Limits,
    model: Arc<ModelInfo>,
    input: PrepareInput,
) -> Result<PreparedPrompt, RequestError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        span.in_scope(|| prepare_blocking(&tokenizer, &limits, &model, input))
    })
    .await
    .map_err(|err| RequestError::Internal(format!("tokenization task failed: {err}")))?
}

fn prepare_blocking(
    tokenizer: &KosmosTokenizer,
    limits: &Limits,
    model: &ModelInfo,
    input: PrepareInput,
) -> Result<PreparedPrompt, RequestError> {
    let valid = validate_prompt(input.segments, limits, "prompt")?;
    if input.grounding && model.reads_pages() {
        return Err(RequestError::invalid(
            "`grounding` is Kosmos-2's: this model is Kosmos-2.5 (ask for `<ocr>` to get text lines with boxes)",
        ));
    }
    if input.grounding && tokenizer.tag_id(Tag::Grounding).is_none() {
        return Err(RequestError::invalid(
            "`grounding` is not supported: the model's vocabulary has no `<grounding>` tag",
        ));
    }
    let segments: Vec<Segment> = valid
        .parts
        .iter()
        .map(|part| match part {
            PromptPart::Text(text) => Segment::Text(text.clone()),
            PromptPart::Image(_) => Segment::Image,
        })
        .collect();
    let options = PromptOptions {
        num_image_tokens: model.num_image_tokens,
        grounding: input.grounding,
        add_eos_token: false,
    };
    let encoded = if model.reads_pages() {
        build_page_prompt(tokenizer, &segments, model.num_image_tokens)
    } else {
        build_prompt(tokenizer, &segments, &options)
    }
    .map_err(prompt_error)?;
    let prompt_len = encoded.len();
    if prompt_len > limits.max_prompt_tokens {
        return Err(RequestError::invalid(format!(
            "`prompt` is {prompt_len} tokens, above the limit `limits.max_prompt_tokens` = {}",
            limits.max_prompt_tokens
        )));
    }
    if prompt_len >= model.context_length {
        return Err(RequestError::invalid(format!(
            "`prompt` is {prompt_len} tokens, it leaves no room in the model's context length ({})",
            model.context_length
        )));
    }
    let mut candidates = Vec::with_capacity(input.candidates.len());
    for (index, candidate) in input.candidates.iter().enumerate() {
        let ids = continuation_ids(tokenizer, candidate).map_err(prompt_error)?;
        if ids.is_empty() {
            return Err(RequestError::invalid(format!(
                "`candidates[{index}]` tokenizes to no tokens"
            )));
        }
        if prompt_len + ids.len() > model.context_length {
            return Err(RequestError::invalid(format!(
                "`prompt` ({prompt_len} tokens) + `candidates[{index}]` ({} tokens) must fit the model's context \
                 length ({})",
                ids.len(),
                model.context_length
            )));
        }
        candidates.push(ids);
    }
    Ok(PreparedPrompt {
        encoded,
        images: valid.images,
        candidates,
    })
}

fn prompt_error(err: PromptError) -> RequestError {
    match err {
        PromptError::ReservedTag { segment, tag } => RequestError::invalid(format!(
            "`prompt[{segment}].text` contains the reserved tag `{tag}`"
        )),
        PromptError::PageLayout => RequestError::invalid(
            "`prompt`: this model (Kosmos-2.5) reads one image (the page) followed by at most one text segment, \
             the task: `<ocr>` (text lines with boxes) or `<md>` (markdown)",
        ),
        PromptError::Tokenizer(TokenizerError::Encode(message)) => {
            RequestError::invalid(format!("`prompt` cannot be tokenized: {message}"))
        }
        other => RequestError::Internal(format!("prompt building failed: {other}")),
    }
}

/// The decoder's view of a prompt: runs of token ids with each image's embedding at its placeholder range.
///
/// The `<image>` and `</image>` tags around a range belong to the neighbouring id runs; the decoder writes the
/// placeholder ids itself (`image_placeholder_first_id + i`), as `build_prompt` did here.
pub fn decoder_segments(
    encoded: &EncodedPrompt,
    embeddings: &[Arc<Tensor>],
    fingerprint: &str,
) -> Vec<dec::Segment> {
    debug_assert_eq!(encoded.image_placeholder_ranges.len(), embeddings.len());
    let mut segments = Vec::with_capacity(2 * embeddings.len() + 1);
    let mut start = 0;
    let ids = &encoded.input_ids;
    let tokens = |ids: &[u32]| dec::Segment {
        kind: Some(dec::segment::Kind::Tokens(dec::TokenIds {
            ids: ids.to_vec(),
        })),
    };
    for (range, embedding) in encoded.image_placeholder_ranges.iter().zip(embeddings) {
        if range.start > start {
            segments.push(tokens(&ids[start..range.start]));
        }
        segments.push(dec::Segment {
            kind: Some(dec::segment::Kind::Image(dec::ImageEmbedding {
                embedding: Some(embedding.as_ref().clone()),
                model_fingerprint: fingerprint.to_string(),
            })),
        });
        start = range.end;
    }
    if start < ids.len() {
        segments.push(tokens(&ids[start..]));
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_sit_between_the_id_runs_at_their_placeholders() {
        let encoded = EncodedPrompt {
            input_ids: vec![0, 10, 4, 5, 11, 7, 10, 4, 5, 11],
            attention_mask: vec![1; 10],
            image_embeds_position_mask: vec![0, 0, 1, 1, 0, 0, 0, 1, 1, 0],
            image_placeholder_ranges: vec![2..4, 7..9],
        };
        let embedding = Arc::new(Tensor::default());
        let segments = decoder_segments(&encoded, &[embedding.clone(), embedding], "fp");
        let shape: Vec<String> = segments
            .iter()
            .map(|segment| match &segment.kind {
                Some(dec::segment::Kind::Tokens(tokens)) => format!("{:?}", tokens.ids),
                Some(dec::segment::Kind::Image(image)) => {
                    format!("img:{}", image.model_fingerprint)
                }
                None => "none".into(),
            })
            .collect();
        assert_eq!(
            shape,
            vec!["[0, 10]", "img:fp", "[11, 7, 10]", "img:fp", "[11]"]
        );
    }
}
