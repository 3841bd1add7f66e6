//! The model inputs stored in `reference/tiny.safetensors` (built by HF's processor, or for two images by
//! the fixture script's "<s>" + " ".join(...) rule) are reproduced by `build_prompt` and
//! `continuation_ids`.

mod common;

use anyhow::{Context, Result};
use kosmos_processor::{EncodedPrompt, PromptOptions, Segment, build_prompt, continuation_ids};
use safetensors::SafeTensors;

const NUM_IMAGE_TOKENS: usize = 3;

fn options() -> PromptOptions {
    PromptOptions {
        num_image_tokens: NUM_IMAGE_TOKENS,
        ..PromptOptions::default()
    }
}

/// A `[rows, columns]` i64 tensor's row without its left padding, for ids and image mask.
fn reference_row(
    tensors: &SafeTensors<'_>,
    prefix: &str,
    row: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let (ids, shape) = common::i64_tensor(tensors, &format!("{prefix}.input_ids"))?;
    let (attention, _) = common::i64_tensor(tensors, &format!("{prefix}.attention_mask"))?;
    let (image_mask, _) =
        common::i64_tensor(tensors, &format!("{prefix}.image_embeds_position_mask"))?;
    let columns = shape[1];
    let ids = common::unpadded_row(&ids, &attention, columns, row)?;
    let padding = columns - ids.len();
    let image_mask = image_mask[row * columns + padding..(row + 1) * columns]
        .iter()
        .map(|&m| u32::try_from(m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ids, image_mask))
}

fn assert_matches(encoded: &EncodedPrompt, (ids, image_mask): &(Vec<u32>, Vec<u32>), what: &str) {
    assert_eq!(&encoded.input_ids, ids, "{what} input_ids");
    assert_eq!(
        &encoded.image_embeds_position_mask, image_mask,
        "{what} image mask"
    );
    assert!(encoded.attention_mask.iter().all(|&m| m == 1));
}

#[test]
fn batch_rows_are_reproduced_including_two_interleaved_images() -> Result<()> {
    let tokenizer = common::tiny_tokenizer()?;
    let bytes = common::read_bytes("reference/tiny.safetensors")?;
    let tensors = SafeTensors::deserialize(&bytes)?;

    let grounded = PromptOptions {
        grounding: true,
        ..options()
    };
    let first = build_prompt(
        &tokenizer,
        &[Segment::Image, Segment::text("An image of")],
        &grounded,
    )?;
    assert_matches(&first, &reference_row(&tensors, "batch", 0)?, "batch row 0");

    let interleaved = [
        Segment::text("This is"),
        Segment::Image,
        Segment::text("and this is"),
        Segment::Image,
        Segment::text("two pictures of the same place."),
    ];
    let second = build_prompt(&tokenizer, &interleaved, &options())?;
    assert_matches(
        &second,
        &reference_row(&tensors, "batch", 1)?,
        "batch row 1",
    );
    assert_eq!(second.num_images(), 2);

    let third = build_prompt(&tokenizer, &[Segment::text("A short text.")], &options())?;
    assert_matches(&third, &reference_row(&tensors, "batch", 2)?, "batch row 2");
    Ok(())
}

#[test]
fn generation_prompts_are_reproduced() -> Result<()> {
    let tokenizer = common::tiny_tokenizer()?;
    let bytes = common::read_bytes("reference/tiny.safetensors")?;
    let tensors = SafeTensors::deserialize(&bytes)?;
    let grounded = PromptOptions {
        grounding: true,
        ..options()
    };
    let greedy = build_prompt(
        &tokenizer,
        &[Segment::Image, Segment::text("An image of")],
        &grounded,
    )?;
    assert_matches(&greedy, &reference_row(&tensors, "greedy", 0)?, "greedy");

    let batch_texts = [
        "<grounding>An image of",
        "Describe this image in detail: the photo shows a",
    ];
    for (row, text) in batch_texts.into_iter().enumerate() {
        let encoded = build_prompt(
            &tokenizer,
            &[Segment::Image, Segment::text(text)],
            &options(),
        )?;
        assert_matches(
            &encoded,
            &reference_row(&tensors, "greedy_batch", row)?,
            text,
        );
    }
    Ok(())
}

#[test]
fn a_scored_continuation_is_the_prompt_followed_by_the_candidate_ids() -> Result<()> {
    let tokenizer = common::tiny_tokenizer()?;
    let bytes = common::read_bytes("reference/tiny.safetensors")?;
    let tensors = SafeTensors::deserialize(&bytes)?;
    let (expected, _) = reference_row(&tensors, "score", 0)?;
    let (start, _) = common::i64_tensor(&tensors, "score.continuation_start")?;
    let start = usize::try_from(*start.first().context("continuation_start")?)?;

    let mut encoded = build_prompt(
        &tokenizer,
        &[Segment::Image, Segment::text("An image of")],
        &options(),
    )?;
    assert_eq!(encoded.len(), start);
    // The fixture tokenizes " a snowman ..." (leading space); the candidate alone gives the same ids.
    for candidate in [
        " a snowman warming himself by a fire.",
        "a snowman warming himself by a fire.",
    ] {
        let continuation = continuation_ids(&tokenizer, candidate)?;
        assert_eq!(continuation, &expected[start..], "{candidate:?}");
    }
    encoded.extend_with(&continuation_ids(
        &tokenizer,
        "a snowman warming himself by a fire.",
    )?);
    assert_eq!(encoded.input_ids, expected);
    assert_eq!(
        encoded
            .image_embeds_position_mask
            .iter()
            .filter(|&&m| m == 1)
            .count(),
        NUM_IMAGE_TOKENS
    );
    Ok(())
}
