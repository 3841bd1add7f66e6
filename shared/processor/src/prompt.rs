//! Interleaved text-and-image prompts, tokenized exactly as HF's `Kosmos2Processor` tokenizes its
//! one-image prompts.
//!
//! # The string rule
//!
//! HF builds `"<s>" + img_info + " " + text.strip()` with
//! `img_info = " ".join(["<image>"] * (Q + 1) + ["</image>"])`, tokenizes it once with
//! `add_special_tokens=False`, then overwrites the Q inner `<image>` ids with the placeholder ids
//! `unk+1 .. unk+1+Q` (4..4+Q for XLM-R).
//!
//! For any sequence of segments this module builds `"<s>" + " ".join(parts)`, where a text segment's part
//! is its Python-`strip()`ped text and an image's part is `img_info`, tokenizes that string once, and
//! overwrites the inner ids of every image block. For `[Image, Text(t)]` this is HF's string byte for
//! byte, so the ids are HF's. Joining with one space is harmless elsewhere: the tag tokens are
//! `lstrip=True`, so the space before an `<image>` is absorbed into it, and the space after `</image>` is
//! the word boundary the Metaspace pre-tokenizer would add to a text section anyway. Each text segment
//! therefore tokenizes as it would on its own, whatever its neighbours. An empty text segment still
//! contributes its joining space (HF's `text=""` with an image ends with `"</image> "` too).
//!
//! With `grounding`, `<grounding>` is prefixed to the first text segment (as a user writes
//! `"<grounding>An image of"` for HF), unless that text already starts with it; with no text segment a
//! final `<grounding>` part is added.
//!
//! With `add_eos_token`, as in HF, the literal `<s>` is not prepended and the tokenizer's post-processor
//! adds `<s> … </s>` instead.

use std::ops::Range;

use crate::error::PromptError;
use crate::pystr;
use crate::tokenizer::{KosmosTokenizer, Tag};

/// One piece of an interleaved prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Text; leading and trailing whitespace is stripped as HF strips its text.
    Text(String),
    /// An image: `<image>`, one placeholder per latent query, `</image>`.
    Image,
}

impl Segment {
    /// A text segment.
    pub fn text(text: impl Into<String>) -> Segment {
        Segment::Text(text.into())
    }
}

/// How to build a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptOptions {
    /// Placeholders per image: the model's `latent_query_num` (64 for Kosmos-2).
    pub num_image_tokens: usize,
    /// Prefix `<grounding>` to the first text segment.
    pub grounding: bool,
    /// Let the tokenizer add `<s> … </s>` instead of a literal `<s>` (HF's `add_eos_token=True`).
    pub add_eos_token: bool,
}

impl Default for PromptOptions {
    /// 64 image tokens, no grounding, no eos.
    fn default() -> Self {
        PromptOptions {
            num_image_tokens: 64,
            grounding: false,
            add_eos_token: false,
        }
    }
}

/// Model inputs for one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    /// Token ids, image placeholders included.
    pub input_ids: Vec<u32>,
    /// 1 for every token (no padding).
    pub attention_mask: Vec<u32>,
    /// 1 at image placeholder positions, 0 elsewhere.
    pub image_embeds_position_mask: Vec<u32>,
    /// Positions of each image's placeholders, in segment order.
    pub image_placeholder_ranges: Vec<Range<usize>>,
}

impl EncodedPrompt {
    /// Number of images in the prompt.
    pub fn num_images(&self) -> usize {
        self.image_placeholder_ranges.len()
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Appends continuation ids (see [`continuation_ids`]): attention 1, image mask 0.
    pub fn extend_with(&mut self, continuation: &[u32]) {
        self.input_ids.extend_from_slice(continuation);
        self.attention_mask
            .extend(std::iter::repeat_n(1, continuation.len()));
        self.image_embeds_position_mask
            .extend(std::iter::repeat_n(0, continuation.len()));
    }
}

/// HF's `img_info`: `<image>` repeated `num_image_tokens + 1` times, then `</image>`, joined by spaces.
pub fn image_block_text(num_image_tokens: usize) -> String {
    let mut block = String::with_capacity((num_image_tokens + 1) * 8 + 8);
    for _ in 0..=num_image_tokens {
        block.push_str(Tag::BeginImage.as_str());
        block.push(' ');
    }
    block.push_str(Tag::EndImage.as_str());
    block
}

/// The exact string that is tokenized for `segments` (see the module docs for the rule).
pub fn prompt_text(segments: &[Segment], options: &PromptOptions) -> String {
    let grounding_tag = Tag::Grounding.as_str();
    let mut grounding_pending = options.grounding;
    let mut parts: Vec<String> = Vec::with_capacity(segments.len() + 1);
    for segment in segments {
        match segment {
            Segment::Text(text) => {
                let stripped = pystr::strip(text);
                if grounding_pending && !stripped.starts_with(grounding_tag) {
                    parts.push(format!("{grounding_tag}{stripped}"));
                } else {
                    parts.push(stripped.to_owned());
                }
                grounding_pending = false;
            }
            Segment::Image => parts.push(image_block_text(options.num_image_tokens)),
        }
    }
    if grounding_pending {
        parts.push(grounding_tag.to_owned());
    }
    let joined = parts.join(" ");
    if options.add_eos_token {
        joined
    } else {
        format!("<s>{joined}")
    }
}

/// Tokenizes an interleaved prompt and marks its image placeholders.
pub fn build_prompt(
    tokenizer: &KosmosTokenizer,
    segments: &[Segment],
    options: &PromptOptions,
) -> Result<EncodedPrompt, PromptError> {
    for (index, segment) in segments.iter().enumerate() {
        if let Segment::Text(text) = segment {
            for tag in [Tag::BeginImage, Tag::EndImage] {
                if text.contains(tag.as_str()) {
                    return Err(PromptError::ReservedTag {
                        segment: index,
                        tag: tag.as_str(),
                    });
                }
            }
        }
    }
    let first_placeholder = tokenizer.first_image_placeholder_id();
    let vocab_size = tokenizer.vocab_size();
    if first_placeholder as usize + options.num_image_tokens > vocab_size {
        return Err(PromptError::PlaceholdersOutOfVocab {
            num_image_tokens: options.num_image_tokens,
            first_id: first_placeholder,
            vocab_size,
        });
    }
    if options.grounding {
        tokenizer.require_tag_id(Tag::Grounding)?;
    }
    let begin_image = tokenizer.require_tag_id(Tag::BeginImage)?;
    let end_image = tokenizer.require_tag_id(Tag::EndImage)?;

    let text = prompt_text(segments, options);
    let mut input_ids = tokenizer.encode_with(&text, options.add_eos_token)?;
    let expected_images = segments
        .iter()
        .filter(|s| matches!(s, Segment::Image))
        .count();
    let ranges = find_image_blocks(&input_ids, begin_image, end_image, options.num_image_tokens);
    if ranges.len() != expected_images {
        return Err(PromptError::ImageLayout {
            expected: expected_images,
            found: ranges.len(),
        });
    }
    let mut image_embeds_position_mask = vec![0u32; input_ids.len()];
    for range in &ranges {
        for (offset, position) in range.clone().enumerate() {
            input_ids[position] = first_placeholder + offset as u32;
            image_embeds_position_mask[position] = 1;
        }
    }
    Ok(EncodedPrompt {
        attention_mask: vec![1; input_ids.len()],
        input_ids,
        image_embeds_position_mask,
        image_placeholder_ranges: ranges,
    })
}

/// Finds `<image>` followed by `num_image_tokens` `<image>` and `</image>`; returns the inner ranges.
fn find_image_blocks(
    ids: &[u32],
    begin_image: u32,
    end_image: u32,
    num_image_tokens: usize,
) -> Vec<Range<usize>> {
    let block_len = num_image_tokens + 2;
    let mut ranges = Vec::new();
    let mut index = 0;
    while index + block_len <= ids.len() {
        let window = &ids[index..index + block_len];
        let well_formed = window[..block_len - 1].iter().all(|&id| id == begin_image)
            && window[block_len - 1] == end_image;
        if well_formed {
            ranges.push(index + 1..index + 1 + num_image_tokens);
            index += block_len;
        } else {
            index += 1;
        }
    }
    ranges
}

/// Ids of a candidate continuation, to append after a prompt's ids (scoring, ranking).
///
/// The candidate is tokenized on its own without special tokens. With a Metaspace pre-tokenizer
/// (XLM-R: `prepend_scheme` "always") a lone text section gets a word-boundary `▁` prepended, so the
/// candidate behaves as if separated from the prompt by one space: `"Paris"` and `" Paris"` give the same
/// ids, the ids HF gets for `prompt + " Paris"`. A candidate cannot continue the prompt's last word.
pub fn continuation_ids(
    tokenizer: &KosmosTokenizer,
    candidate: &str,
) -> Result<Vec<u32>, PromptError> {
    Ok(tokenizer.encode(candidate)?)
}

/// Kosmos-2.5's prompt (`Kosmos2_5Processor`): one page, then the task text (`<ocr>`, `<md>`, or a `<md>` chat
/// prompt). The processor tokenizes `"<s><image>" + "<s>" × num_image_tokens + "</image>" + text` as it is (the
/// text is not stripped) with the tokenizer's special tokens added, and the image positions hold `<s>`.
///
/// `segments` must be one image followed by at most one text segment; a text that holds `<image>` or
/// `</image>` is refused, and so is a tokenizer that does not lay the block out as the processor assumes (an
/// extra `<s>` added in front, say).
pub fn build_page_prompt(
    tokenizer: &KosmosTokenizer,
    segments: &[Segment],
    num_image_tokens: usize,
) -> Result<EncodedPrompt, PromptError> {
    let text = match segments {
        [Segment::Image] => "",
        [Segment::Image, Segment::Text(text)] => text.as_str(),
        _ => return Err(PromptError::PageLayout),
    };
    for tag in [Tag::BeginImage, Tag::EndImage] {
        if text.contains(tag.as_str()) {
            return Err(PromptError::ReservedTag {
                segment: 1,
                tag: tag.as_str(),
            });
        }
    }
    let begin_image = tokenizer.require_tag_id(Tag::BeginImage)?;
    let end_image = tokenizer.require_tag_id(Tag::EndImage)?;
    let bos = tokenizer.bos_id();
    let mut prompt = String::with_capacity(32 + 3 * num_image_tokens + text.len());
    prompt.push_str("<s>");
    prompt.push_str(Tag::BeginImage.as_str());
    for _ in 0..num_image_tokens {
        prompt.push_str("<s>");
    }
    prompt.push_str(Tag::EndImage.as_str());
    prompt.push_str(text);
    let input_ids = tokenizer.encode_with(&prompt, true)?;
    let block = 2..2 + num_image_tokens;
    let laid_out = input_ids.len() > block.end
        && input_ids[0] == bos
        && input_ids[1] == begin_image
        && input_ids[block.clone()].iter().all(|&id| id == bos)
        && input_ids[block.end] == end_image;
    if !laid_out {
        return Err(PromptError::ImageLayout {
            expected: 1,
            found: 0,
        });
    }
    let mut image_embeds_position_mask = vec![0u32; input_ids.len()];
    for position in block.clone() {
        image_embeds_position_mask[position] = 1;
    }
    Ok(EncodedPrompt {
        attention_mask: vec![1; input_ids.len()],
        input_ids,
        image_embeds_position_mask,
        image_placeholder_ranges: vec![block],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_image_then_text_gives_hf_string() {
        let options = PromptOptions {
            num_image_tokens: 2,
            ..PromptOptions::default()
        };
        let text = prompt_text(&[Segment::Image, Segment::text("  An image of ")], &options);
        assert_eq!(text, "<s><image> <image> <image> </image> An image of");
    }

    #[test]
    fn grounding_prefixes_the_first_text_once() {
        let options = PromptOptions {
            num_image_tokens: 1,
            grounding: true,
            add_eos_token: false,
        };
        let text = prompt_text(&[Segment::Image, Segment::text("An image of")], &options);
        assert_eq!(text, "<s><image> <image> </image> <grounding>An image of");
        let already = prompt_text(
            &[Segment::Image, Segment::text("<grounding>An image of")],
            &options,
        );
        assert_eq!(already, text);
        let image_only = prompt_text(&[Segment::Image], &options);
        assert_eq!(image_only, "<s><image> <image> </image> <grounding>");
    }

    #[test]
    fn interleaved_segments_join_with_single_spaces() {
        let options = PromptOptions {
            num_image_tokens: 1,
            ..PromptOptions::default()
        };
        let segments = [
            Segment::text("This is"),
            Segment::Image,
            Segment::text(" a cat. "),
            Segment::Image,
        ];
        assert_eq!(
            prompt_text(&segments, &options),
            "<s>This is <image> <image> </image> a cat. <image> <image> </image>"
        );
    }

    #[test]
    fn add_eos_token_drops_the_literal_bos() {
        let options = PromptOptions {
            num_image_tokens: 0,
            grounding: false,
            add_eos_token: true,
        };
        assert_eq!(prompt_text(&[Segment::text("hi")], &options), "hi");
    }

    #[test]
    fn image_blocks_are_found_only_when_well_formed() {
        let (b, e) = (10, 11);
        let ids = [0, b, b, b, e, 7, b, b, e, b, b, b, e];
        assert_eq!(find_image_blocks(&ids, b, e, 2), vec![2..4, 10..12]);
    }
}
