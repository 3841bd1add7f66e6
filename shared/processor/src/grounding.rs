//! Grounding post-processing and box <-> patch index conversion, ported from HF's
//! `processing_kosmos2.py` (itself from unilm's `kosmos-2/demo/decode_string.py`).
//!
//! Entity spans are **character offsets** (Unicode code points) into the cleaned text, exactly as HF
//! computes them on a Python `str`; use [`char_span_to_byte_range`] to slice a Rust `&str`.

use std::ops::Range;
use std::sync::LazyLock;

use regex::Regex;

use crate::error::GroundingError;
use crate::pystr;
use crate::tokenizer::{Tag, patch_index_token};

/// Patches per side of the Kosmos-2 location grid (`sqrt(1024)`).
pub const NUM_PATCHES_PER_SIDE: u32 = 32;

/// One grounded phrase of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    /// The phrase, stripped; `<patch_index_X><patch_index_Y>` (unpadded numbers) for an `<object>`
    /// without a phrase, as HF names it.
    pub phrase: String,
    /// `[start, end)` in characters of the cleaned text. HF can produce `end < start` for a
    /// whitespace-only phrase; negative values HF would give (such a phrase at the very start) are
    /// clamped to 0.
    pub span: (usize, usize),
    /// Boxes `[x1, y1, x2, y2]` in normalised image coordinates.
    pub boxes: Vec<[f32; 4]>,
}

/// HF's `post_process_generation(text)`: keeps what follows the last `</image>`, removes the tags and
/// extracts the entities on the 32 x 32 grid.
pub fn post_process_generation(text: &str) -> (String, Vec<Entity>) {
    clean_text_and_extract_entities(caption_after_image(text), NUM_PATCHES_PER_SIDE)
}

/// HF's `text.split("</image>")[-1]` (`post_process_generation` with `cleanup_and_extract=False`).
pub fn caption_after_image(text: &str) -> &str {
    text.rsplit(Tag::EndImage.as_str()).next().unwrap_or(text)
}

static TAG_PATTERN: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new("<.*?>").ok());
static ENTITY_PATTERN: LazyLock<Option<Regex>> = LazyLock::new(|| {
    // HF uses `\d`, which in Python also matches non-ASCII decimal digits; `int()` would parse them. This
    // port matches ASCII digits only (the model's patch tokens are ASCII), see `entity_patch_pairs`.
    Regex::new(
        r"(?:(<phrase>([^<]+)</phrase>))?<object>((?:<patch_index_[0-9]+><patch_index_[0-9]+></delimiter_of_multi_objects/>)*<patch_index_[0-9]+><patch_index_[0-9]+>)</object>",
    )
    .ok()
});
static PATCH_INDEX_PATTERN: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"<patch_index_([0-9]+)>").ok());

/// HF's `remove_special_fields`: `re.sub("<.*?>", "", text)`.
pub fn remove_tags(text: &str) -> String {
    match TAG_PATTERN.as_ref() {
        Some(pattern) => pattern.replace_all(text, "").into_owned(),
        None => text.to_owned(),
    }
}

fn char_len(text: &str) -> usize {
    text.chars().count()
}

/// Parses digits like Python's `int()`, saturating where Python would grow without bound.
fn parse_index(digits: &str) -> u64 {
    digits.parse::<u64>().unwrap_or(u64::MAX)
}

/// The patch index pairs of one `<object>` body: HF splits on the delimiter and, per pair, takes the first
/// `<patch_index_N>` and the first one found after skipping one character (the second).
fn entity_patch_pairs(body: &str, patch_pattern: &Regex) -> Vec<(u64, u64)> {
    let mut pairs = Vec::new();
    for pair in body.split(Tag::ObjectDelimiter.as_str()) {
        let first = patch_pattern.captures(pair);
        let second = pair.get(1..).and_then(|rest| patch_pattern.captures(rest));
        if let (Some(first), Some(second)) = (first, second) {
            pairs.push((parse_index(&first[1]), parse_index(&second[1])));
        }
    }
    pairs
}

/// An entity as `extract_entities_with_patch_indices` returns it: name, byte span in the tagged text,
/// (upper-left, lower-right) patch index pairs.
struct RawEntity {
    name: String,
    byte_span: Range<usize>,
    pairs: Vec<(u64, u64)>,
}

/// HF's `clean_text_and_extract_entities_with_bboxes(text, num_patches_per_side)`.
pub fn clean_text_and_extract_entities(
    text: &str,
    num_patches_per_side: u32,
) -> (String, Vec<Entity>) {
    let processed = remove_tags(text);
    let (Some(entity_pattern), Some(patch_pattern)) =
        (ENTITY_PATTERN.as_ref(), PATCH_INDEX_PATTERN.as_ref())
    else {
        return (pystr::strip(&processed).to_owned(), Vec::new());
    };
    let mut raw_entities: Vec<RawEntity> = Vec::new();
    for captures in entity_pattern.captures_iter(text) {
        let Some(whole) = captures.get(0) else {
            continue;
        };
        let body = captures.get(3).map_or("", |m| m.as_str());
        let pairs = entity_patch_pairs(body, patch_pattern);
        match captures.get(2) {
            Some(phrase) => raw_entities.push(RawEntity {
                name: phrase.as_str().to_owned(),
                byte_span: phrase.range(),
                pairs,
            }),
            None => {
                // No phrase: one fake entity per box, named by its unpadded indices, at `<object>`.
                for (ul, lr) in pairs {
                    let name = format!("<patch_index_{ul}><patch_index_{lr}>");
                    raw_entities.push(RawEntity {
                        name,
                        byte_span: whole.start()..whole.start(),
                        pairs: vec![(ul, lr)],
                    });
                }
            }
        }
    }

    // `adjust_entity_positions` then `cleanup_spaces`.
    let leading_spaces = pystr::leading_whitespace_chars(&processed);
    let entities = raw_entities
        .into_iter()
        .map(
            |RawEntity {
                 name,
                 byte_span,
                 pairs,
             }| {
                let adjusted_start = char_len(&remove_tags(&text[..byte_span.start]));
                let adjusted_end = char_len(&remove_tags(&text[..byte_span.end]));
                let name_leading = pystr::leading_whitespace_chars(&name);
                let name_trailing = pystr::trailing_whitespace_chars(&name);
                let start = (adjusted_start + name_leading) as i64 - leading_spaces as i64;
                let end = adjusted_end as i64 - leading_spaces as i64 - name_trailing as i64;
                Entity {
                    phrase: pystr::strip(&name).to_owned(),
                    span: (start.max(0) as usize, end.max(0) as usize),
                    boxes: pairs
                        .into_iter()
                        .map(|(ul, lr)| patch_index_to_coordinate(ul, lr, num_patches_per_side))
                        .collect(),
                }
            },
        )
        .collect();
    (pystr::strip(&processed).to_owned(), entities)
}

/// HF's `patch_index_to_coordinate`: the normalised box `[x1, y1, x2, y2]` of two grid cells.
///
/// Whole cells when the corners coincide or share a row or column, cell centres otherwise. Computed in
/// f64 like Python, then rounded to f32 (exact on the 32 grid). `num_patches_per_side` 0 gives NaNs.
pub fn patch_index_to_coordinate(
    ul_index: u64,
    lr_index: u64,
    num_patches_per_side: u32,
) -> [f32; 4] {
    let side = u64::from(num_patches_per_side.max(1));
    let cell = 1.0 / f64::from(num_patches_per_side);
    let (ul_x, ul_y) = ((ul_index % side) as f64, (ul_index / side) as f64);
    let (lr_x, lr_y) = ((lr_index % side) as f64, (lr_index / side) as f64);
    let coordinates = if ul_index == lr_index || ul_x == lr_x || ul_y == lr_y {
        [
            ul_x * cell,
            ul_y * cell,
            lr_x * cell + cell,
            lr_y * cell + cell,
        ]
    } else {
        [
            ul_x * cell + cell / 2.0,
            ul_y * cell + cell / 2.0,
            lr_x * cell + cell / 2.0,
            lr_y * cell + cell / 2.0,
        ]
    };
    coordinates.map(|value| value as f32)
}

/// HF's `coordinate_to_patch_index`: the (upper-left, lower-right) cells covering a normalised box.
///
/// Stricter than HF, which would return out-of-grid indices: the box must satisfy
/// `0 <= x1 < x2 <= 1` and `0 <= y1 < y2 <= 1`. Computed in f64 from the f32 inputs.
pub fn coordinate_to_patch_index(
    bbox: [f32; 4],
    num_patches_per_side: u32,
) -> Result<(u32, u32), GroundingError> {
    if num_patches_per_side == 0 {
        return Err(GroundingError::EmptyGrid);
    }
    let [x1, y1, x2, y2] = bbox.map(f64::from);
    let in_unit = |v: f64| (0.0..=1.0).contains(&v);
    if !(in_unit(x1) && in_unit(y1) && in_unit(x2) && in_unit(y2) && x2 > x1 && y2 > y1) {
        return Err(GroundingError::InvalidBox(bbox));
    }
    let side = f64::from(num_patches_per_side);
    let last = f64::from(num_patches_per_side - 1);
    // Inside the unit square these already lie in 0..=side-1; the clamp guards float edge cases.
    let ul_x = (x1 * side).floor().clamp(0.0, last) as u32;
    let ul_y = (y1 * side).floor().clamp(0.0, last) as u32;
    let lr_x = (x2 * side - 1.0).ceil().clamp(0.0, last) as u32;
    let lr_y = (y2 * side - 1.0).ceil().clamp(0.0, last) as u32;
    Ok((
        ul_y * num_patches_per_side + ul_x,
        lr_y * num_patches_per_side + lr_x,
    ))
}

/// The location tokens of a box: `<patch_index_AAAA><patch_index_BBBB>`.
pub fn box_to_patch_tokens(
    bbox: [f32; 4],
    num_patches_per_side: u32,
) -> Result<String, GroundingError> {
    let (ul, lr) = coordinate_to_patch_index(bbox, num_patches_per_side)?;
    Ok(format!(
        "{}{}",
        patch_index_token(ul),
        patch_index_token(lr)
    ))
}

/// Converts a `[start, end)` character span of `text` to a byte range (`None` if out of bounds or
/// reversed).
pub fn char_span_to_byte_range(text: &str, (start, end): (usize, usize)) -> Option<Range<usize>> {
    if end < start {
        return None;
    }
    let mut boundaries = text
        .char_indices()
        .map(|(byte, _)| byte)
        .chain(std::iter::once(text.len()));
    let start_byte = boundaries.nth(start)?;
    let end_byte = if end == start {
        start_byte
    } else {
        boundaries.nth(end - start - 1)?
    };
    Some(start_byte..end_byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNOWMAN: &str = "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.";

    #[test]
    fn snowman_example_matches_the_hf_expected_output() {
        let (text, entities) = post_process_generation(SNOWMAN);
        assert_eq!(text, "An image of a snowman warming himself by a fire.");
        assert_eq!(
            entities,
            vec![
                Entity {
                    phrase: "a snowman".into(),
                    span: (12, 21),
                    boxes: vec![[0.390625, 0.046875, 0.984375, 0.828125]],
                },
                Entity {
                    phrase: "a fire".into(),
                    span: (41, 47),
                    boxes: vec![[0.171875, 0.015625, 0.484375, 0.890625]],
                },
            ]
        );
        let range = char_span_to_byte_range(&text, entities[0].span).expect("in bounds");
        assert_eq!(&text[range], "a snowman");
    }

    #[test]
    fn only_the_text_after_the_last_image_block_is_kept() {
        let text = format!("<image>x</image> ignored </image>{SNOWMAN}");
        assert_eq!(
            post_process_generation(&text),
            post_process_generation(SNOWMAN)
        );
    }

    #[test]
    fn an_object_without_a_phrase_gets_an_unpadded_fake_name_per_box() {
        let text = "look<object><patch_index_0001><patch_index_0002></delimiter_of_multi_objects/><patch_index_0003><patch_index_0100></object> here";
        let (clean, entities) = clean_text_and_extract_entities(text, 32);
        assert_eq!(clean, "look here");
        assert_eq!(entities.len(), 2);
        assert_eq!(entities[0].phrase, "<patch_index_1><patch_index_2>");
        assert_eq!(entities[0].span, (4, 4));
        assert_eq!(entities[1].phrase, "<patch_index_3><patch_index_100>");
        // 1 and 2 share row 0: whole cells.
        assert_eq!(
            entities[0].boxes,
            vec![[1.0 / 32.0, 0.0, 3.0 / 32.0, 1.0 / 32.0]]
        );
        // 3 = (3, 0) and 100 = (4, 3): cell centres.
        assert_eq!(
            entities[1].boxes,
            vec![[3.5 / 32.0, 0.5 / 32.0, 4.5 / 32.0, 3.5 / 32.0]]
        );
    }

    #[test]
    fn a_phrase_with_several_boxes_keeps_them_in_order() {
        let text = "<phrase>two dogs</phrase><object><patch_index_0000><patch_index_0033></delimiter_of_multi_objects/><patch_index_0064><patch_index_0064></object>";
        let (clean, entities) = clean_text_and_extract_entities(text, 32);
        assert_eq!(clean, "two dogs");
        assert_eq!(entities.len(), 1);
        assert_eq!(entities[0].span, (0, 8));
        assert_eq!(entities[0].boxes.len(), 2);
        assert_eq!(
            entities[0].boxes[1],
            [0.0, 2.0 / 32.0, 1.0 / 32.0, 3.0 / 32.0]
        );
    }

    #[test]
    fn spans_count_characters_not_bytes() {
        let text =
            "é<phrase> naïve cat</phrase><object><patch_index_0000><patch_index_0000></object>";
        let (clean, entities) = clean_text_and_extract_entities(text, 32);
        assert_eq!(clean, "é naïve cat");
        assert_eq!(entities[0].span, (2, 11));
        assert_eq!(entities[0].phrase, "naïve cat");
    }

    #[test]
    fn boxes_round_trip_through_patch_indices() {
        assert_eq!(
            coordinate_to_patch_index([0.390625, 0.046875, 0.984375, 0.828125], 32),
            Ok((44, 863))
        );
        for (ul, lr) in [(0u32, 1023u32), (44, 863), (5, 911), (33, 33), (2, 98)] {
            let bbox = patch_index_to_coordinate(u64::from(ul), u64::from(lr), 32);
            assert_eq!(
                coordinate_to_patch_index(bbox, 32),
                Ok((ul, lr)),
                "{ul} {lr} {bbox:?}"
            );
        }
        assert_eq!(
            box_to_patch_tokens([0.0, 0.0, 1.0, 1.0], 32),
            Ok("<patch_index_0000><patch_index_1023>".to_owned())
        );
    }

    #[test]
    fn invalid_boxes_are_rejected() {
        for bbox in [
            [0.5, 0.0, 0.5, 1.0],
            [0.0, 0.0, 1.5, 1.0],
            [-0.1, 0.0, 1.0, 1.0],
            [0.0, f32::NAN, 1.0, 1.0],
        ] {
            assert!(matches!(
                coordinate_to_patch_index(bbox, 32),
                Err(GroundingError::InvalidBox(_))
            ));
        }
        assert_eq!(
            coordinate_to_patch_index([0.0, 0.0, 1.0, 1.0], 0),
            Err(GroundingError::EmptyGrid)
        );
    }

    #[test]
    fn char_spans_convert_to_byte_ranges() {
        assert_eq!(char_span_to_byte_range("aé b", (1, 3)), Some(1..4));
        assert_eq!(char_span_to_byte_range("ab", (2, 2)), Some(2..2));
        assert_eq!(char_span_to_byte_range("ab", (1, 3)), None);
        assert_eq!(char_span_to_byte_range("ab", (2, 1)), None);
    }
}
