//! Kosmos-2.5 prompts: `build_page_prompt` gives the ids `Kosmos2_5Processor` gives for the same page and task
//! with the tiny fixture tokenizer (`tests/fixtures/kosmos25/reference.safetensors`, `{ocr,md,chat}.input_ids`),
//! its image positions are the processor's mask == 1, and the resized page is the processor's `width`/`height`.

mod common;

use anyhow::{Result, ensure};
use kosmos_processor::{
    FlattenedPatchConfig, KosmosTokenizer, PromptError, Segment, build_page_prompt,
};
use safetensors::SafeTensors;

const PROMPTS: [(&str, &str); 3] = [("ocr", "<ocr>"), ("md", "<md>"), ("chat", "<md>Total? A:")];

fn tokenizer() -> Result<KosmosTokenizer> {
    Ok(KosmosTokenizer::from_file(common::fixture(
        "kosmos25/tiny/tokenizer.json",
    ))?)
}

#[test]
fn page_prompts_equal_the_processors() -> Result<()> {
    let tokenizer = tokenizer()?;
    let bytes = common::read_bytes("kosmos25/reference.safetensors")?;
    let reference = SafeTensors::deserialize(&bytes)?;
    let config =
        FlattenedPatchConfig::from_file(common::fixture("kosmos25/tiny/preprocessor_config.json"))?;
    for (name, text) in PROMPTS {
        let encoded = build_page_prompt(&tokenizer, &[Segment::Image, Segment::text(text)], 5)?;
        let (ids, _) = common::i64_tensor(&reference, &format!("{name}.input_ids"))?;
        let (mask, _) =
            common::i64_tensor(&reference, &format!("{name}.image_embeds_position_mask"))?;
        let ours: Vec<i64> = encoded.input_ids.iter().map(|&id| i64::from(id)).collect();
        ensure!(ours == ids, "{name}: {ours:?} vs HF {ids:?}");
        let marked: Vec<i64> = mask.iter().map(|&m| i64::from(m == 1)).collect();
        let ours_mask: Vec<i64> = encoded
            .image_embeds_position_mask
            .iter()
            .map(|&m| i64::from(m))
            .collect();
        ensure!(ours_mask == marked, "{name}: image positions");
        ensure!(
            encoded.image_placeholder_ranges.len() == 1
                && encoded.image_placeholder_ranges[0] == (2..7),
            "{name}"
        );
        // The processor's resized page (the first fixture page, 300 x 200).
        let (geometry, _) = common::i64_tensor(&reference, &format!("{name}.geometry"))?;
        let (rows, cols) = config.grid((200, 300));
        let resized = [
            (cols * config.patch_width as usize) as i64,
            (rows * config.patch_height as usize) as i64,
        ];
        ensure!(
            resized.to_vec() == geometry,
            "{name}: {resized:?} vs {geometry:?}"
        );
    }
    Ok(())
}

#[test]
fn a_page_prompt_is_one_image_then_at_most_one_text() -> Result<()> {
    let tokenizer = tokenizer()?;
    // The page alone is the processor's layout with no task text.
    let alone = build_page_prompt(&tokenizer, &[Segment::Image], 5)?;
    ensure!(
        alone.input_ids == vec![0, 4, 0, 0, 0, 0, 0, 5],
        "{:?}",
        alone.input_ids
    );
    for segments in [
        vec![Segment::text("<ocr>")],
        vec![Segment::text("<ocr>"), Segment::Image],
        vec![Segment::Image, Segment::Image],
        vec![Segment::Image, Segment::text("a"), Segment::text("b")],
    ] {
        let err = build_page_prompt(&tokenizer, &segments, 5).expect_err("refused");
        ensure!(
            matches!(err, PromptError::PageLayout),
            "{segments:?}: {err}"
        );
    }
    let err = build_page_prompt(
        &tokenizer,
        &[Segment::Image, Segment::text("<md></image>")],
        5,
    )
    .expect_err("reserved");
    ensure!(
        matches!(
            err,
            PromptError::ReservedTag {
                tag: "</image>",
                ..
            }
        ),
        "{err}"
    );
    Ok(())
}
