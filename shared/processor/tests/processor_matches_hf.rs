//! Prompt ids, decoding and grounding post-processing against HF `Kosmos2Processor`
//! (`reference/processor.json`, tokenizer of `tiny/`).

mod common;

use anyhow::{Context, Result, bail};
use kosmos_processor::{
    KosmosTokenizer, PromptOptions, Segment, Tag, build_prompt, post_process_generation,
    prompt_text,
};
use serde_json::Value;

fn cases(key: &str) -> Result<(Vec<Value>, usize)> {
    let fixture = common::read_json("reference/processor.json")?;
    let num_image_tokens = fixture["num_image_tokens"]
        .as_u64()
        .context("num_image_tokens")? as usize;
    let Some(items) = fixture[key].as_array() else {
        bail!("no `{key}` array")
    };
    Ok((items.clone(), num_image_tokens))
}

fn hf_segments(text: &str, with_image: bool) -> Vec<Segment> {
    if with_image {
        vec![Segment::Image, Segment::text(text)]
    } else {
        vec![Segment::text(text)]
    }
}

#[test]
fn prompt_ids_and_masks_equal_the_hf_processor_for_every_case() -> Result<()> {
    let tokenizer = common::tiny_tokenizer()?;
    let (prompts, num_image_tokens) = cases("prompts")?;
    assert!(prompts.len() >= 10);
    for case in &prompts {
        let text = case["text"].as_str().context("text")?;
        let with_image = case["with_image"].as_bool().context("with_image")?;
        let options = PromptOptions {
            num_image_tokens,
            grounding: false,
            add_eos_token: case["add_eos_token"].as_bool().context("add_eos_token")?,
        };
        let encoded = build_prompt(&tokenizer, &hf_segments(text, with_image), &options)?;
        assert_eq!(
            encoded.input_ids,
            common::json_u32s(&case["input_ids"])?,
            "input_ids of {text:?}"
        );
        assert_eq!(
            encoded.attention_mask,
            common::json_u32s(&case["attention_mask"])?,
            "attention_mask of {text:?}"
        );
        assert_eq!(
            encoded.image_embeds_position_mask,
            common::json_u32s(&case["image_embeds_position_mask"])?,
            "image_embeds_position_mask of {text:?}"
        );
        assert_eq!(encoded.num_images(), usize::from(with_image));
    }
    Ok(())
}

#[test]
fn the_grounding_flag_gives_the_ids_of_a_grounding_prefixed_text() -> Result<()> {
    let tokenizer = common::tiny_tokenizer()?;
    let (prompts, num_image_tokens) = cases("prompts")?;
    let reference = prompts
        .iter()
        .find(|case| case["text"] == "<grounding>An image of" && case["with_image"] == true)
        .context("the <grounding>An image of case")?;
    let options = PromptOptions {
        num_image_tokens,
        grounding: true,
        add_eos_token: false,
    };
    let encoded = build_prompt(
        &tokenizer,
        &[Segment::Image, Segment::text("An image of")],
        &options,
    )?;
    assert_eq!(
        encoded.input_ids,
        common::json_u32s(&reference["input_ids"])?
    );
    Ok(())
}

#[test]
fn placeholders_are_the_ids_after_unk_and_masked_as_images() -> Result<()> {
    let tokenizer = common::tiny_tokenizer()?;
    let options = PromptOptions {
        num_image_tokens: 3,
        ..PromptOptions::default()
    };
    let encoded = build_prompt(
        &tokenizer,
        &[Segment::Image, Segment::text("An image of")],
        &options,
    )?;
    let begin = tokenizer.require_tag_id(Tag::BeginImage)?;
    let end = tokenizer.require_tag_id(Tag::EndImage)?;
    assert_eq!(
        &encoded.input_ids[..6],
        &[tokenizer.bos_id(), begin, 4, 5, 6, end]
    );
    assert_eq!(
        &encoded.image_embeds_position_mask[..6],
        &[0, 0, 1, 1, 1, 0]
    );
    assert_eq!(encoded.image_placeholder_ranges, vec![2..5]);
    Ok(())
}

#[test]
fn text_containing_an_image_tag_is_rejected() -> Result<()> {
    let tokenizer = common::tiny_tokenizer()?;
    let result = build_prompt(
        &tokenizer,
        &[Segment::text("look <image> here")],
        &PromptOptions::default(),
    );
    assert!(matches!(
        result,
        Err(kosmos_processor::PromptError::ReservedTag {
            segment: 0,
            tag: "<image>"
        })
    ));
    Ok(())
}

#[test]
fn a_placeholder_count_beyond_the_vocabulary_is_rejected() -> Result<()> {
    let tokenizer = common::tiny_tokenizer()?;
    let options = PromptOptions {
        num_image_tokens: tokenizer.vocab_size(),
        ..PromptOptions::default()
    };
    let result = build_prompt(&tokenizer, &[Segment::Image], &options);
    assert!(matches!(
        result,
        Err(kosmos_processor::PromptError::PlaceholdersOutOfVocab { .. })
    ));
    Ok(())
}

#[test]
fn decoded_text_equals_hf_decode_with_and_without_special_tokens() -> Result<()> {
    let tokenizer = common::tiny_tokenizer()?;
    let (decodes, _) = cases("decode")?;
    assert!(!decodes.is_empty());
    for case in &decodes {
        let ids = common::json_u32s(&case["ids"])?;
        let skip = case["skip_special_tokens"]
            .as_bool()
            .context("skip_special_tokens")?;
        let expected = case["text"].as_str().context("text")?;
        assert_eq!(
            tokenizer.decode(&ids, skip)?,
            expected,
            "ids {ids:?} skip {skip}"
        );
    }
    Ok(())
}

#[test]
fn post_processing_equals_hf_for_every_case() -> Result<()> {
    let (post, _) = cases("post_process")?;
    assert!(post.len() >= 5);
    for case in &post {
        let text = case["text"].as_str().context("text")?;
        let (clean, entities) = post_process_generation(text);
        assert_eq!(
            clean,
            case["clean_text"].as_str().context("clean_text")?,
            "{text:?}"
        );
        let expected = case["entities"].as_array().context("entities")?;
        assert_eq!(
            entities.len(),
            expected.len(),
            "entities of {text:?}: {entities:?}"
        );
        for (entity, reference) in entities.iter().zip(expected) {
            assert_eq!(
                entity.phrase,
                reference[0].as_str().context("phrase")?,
                "{text:?}"
            );
            let span = (
                reference[1][0].as_u64().context("start")? as usize,
                reference[1][1].as_u64().context("end")? as usize,
            );
            assert_eq!(entity.span, span, "span of {:?} in {text:?}", entity.phrase);
            let boxes = reference[2].as_array().context("boxes")?;
            assert_eq!(entity.boxes.len(), boxes.len(), "{text:?}");
            for (ours, theirs) in entity.boxes.iter().zip(boxes) {
                for (coordinate, value) in ours.iter().zip(theirs.as_array().context("box")?) {
                    let value = value.as_f64().context("coordinate")?;
                    assert!(
                        (f64::from(*coordinate) - value).abs() <= 1e-6,
                        "{ours:?} vs {theirs} in {text:?}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn snowman_generation_decodes_and_post_processes_like_hf() -> Result<()> {
    // The first decode case holds the MODEL_SPEC 2.6 snowman generation (with a 3-placeholder image).
    let tokenizer: KosmosTokenizer = common::tiny_tokenizer()?;
    let (decodes, _) = cases("decode")?;
    let ids = common::json_u32s(&decodes[0]["ids"])?;
    let (clean, entities) = post_process_generation(&tokenizer.decode(&ids, true)?);
    assert_eq!(clean, "An image of a snowman warming himself by a fire .");
    assert_eq!(entities.len(), 2);
    assert_eq!(entities[0].phrase, "a snowman");
    assert_eq!(
        entities[0].boxes,
        vec![[0.390625, 0.046875, 0.984375, 0.828125]]
    );
    Ok(())
}

#[test]
fn the_prompt_string_is_hf_preprocessed_text_with_a_literal_bos() {
    let options = PromptOptions {
        num_image_tokens: 3,
        ..PromptOptions::default()
    };
    assert_eq!(
        prompt_text(
            &[Segment::Image, Segment::text("<grounding>An image of")],
            &options
        ),
        "<s><image> <image> <image> <image> </image> <grounding>An image of"
    );
}
