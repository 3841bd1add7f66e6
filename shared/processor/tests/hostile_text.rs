//! Hostile text: random UTF-8 and tag soup (image, grounding, phrase and patch tags, half tags, control and
//! combining characters) through the tokenizer, the prompt builder and grounding post-processing. No case may
//! panic, hold more than its limit or take longer than a second; the prompt builder lays out every image it
//! was given unless a text segment carries a reserved image tag, and then says which.
//!
//! `cargo test --test hostile_text` runs the CI budget, `-- --ignored` the long mode (a million cases).

use kosmos_processor::{
    KosmosTokenizer, PromptError, PromptOptions, Segment, build_prompt, post_process_generation,
};
use kosmos_testkit::fuzz::{self, CountingAllocator, Mode, Suite};
use rand::Rng as _;
use rand_chacha::ChaCha8Rng;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Pieces of markup the model and HF's processor give meaning to, whole and broken.
const TAG_SOUP: [&str; 24] = [
    "<image>",
    "</image>",
    "<grounding>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<patch_index_0000>",
    "<patch_index_1023>",
    "<patch_index_1024>",
    "<patch_index_9999>",
    "<patch_index_",
    "<s>",
    "</s>",
    "<unk>",
    "<pad>",
    "</doc>",
    "</line>",
    "<",
    ">",
    "</",
    "Question: what is it? Answer:",
    "\u{301}\u{200d}\u{1f600}\u{0}\r\n\t ",
];

/// Random text: tags, random Unicode scalar values and ASCII, up to `max_pieces` pieces.
fn random_text(rng: &mut ChaCha8Rng, max_pieces: usize) -> String {
    let mut text = String::new();
    for _ in 0..rng.random_range(0..=max_pieces) {
        match rng.random_range(0..4) {
            0 | 1 => text.push_str(TAG_SOUP[rng.random_range(0..TAG_SOUP.len())]),
            2 => text.push(rng.random::<char>()),
            _ => text.push(char::from(rng.random_range(0x20u8..0x7f))),
        }
    }
    text
}

fn tokenizer() -> KosmosTokenizer {
    let path = kosmos_testkit::tiny_model_dir().join("tokenizer.json");
    KosmosTokenizer::from_file(path).expect("the tiny model's tokenizer")
}

/// What one case may hold at once: the tokenizer's working set grows with the text, a few hundred bytes per
/// input byte at most, above a fixed floor for its caches.
fn limit_for(text_bytes: usize) -> usize {
    (8 << 20) + 512 * text_bytes
}

fn prompt_case(tokenizer: &KosmosTokenizer, rng: &mut ChaCha8Rng) -> usize {
    let segments: Vec<Segment> = (0..rng.random_range(0..6))
        .map(|_| {
            if rng.random_range(0..3) == 0 {
                Segment::Image
            } else {
                Segment::Text(random_text(rng, 12))
            }
        })
        .collect();
    let options = PromptOptions {
        num_image_tokens: rng.random_range(1..9),
        grounding: rng.random(),
        add_eos_token: rng.random(),
    };
    let images = segments
        .iter()
        .filter(|segment| matches!(segment, Segment::Image))
        .count();
    let reserved = segments.iter().any(|segment| {
        matches!(segment, Segment::Text(text) if text.contains("<image>") || text.contains("</image>"))
    });
    match build_prompt(tokenizer, &segments, &options) {
        Ok(prompt) => {
            assert!(!reserved, "a reserved tag passed: {segments:?}");
            let len = prompt.input_ids.len();
            assert_eq!(prompt.attention_mask.len(), len);
            assert_eq!(prompt.image_embeds_position_mask.len(), len);
            assert_eq!(prompt.image_placeholder_ranges.len(), images);
            let marked = prompt
                .image_embeds_position_mask
                .iter()
                .filter(|&&flag| flag == 1)
                .count();
            assert_eq!(marked, images * options.num_image_tokens, "{segments:?}");
            let vocab = tokenizer.vocab_size();
            assert!(prompt.input_ids.iter().all(|&id| (id as usize) < vocab));
        }
        Err(PromptError::ReservedTag { segment, tag }) => {
            assert!(reserved, "refused without a reserved tag: {segments:?}");
            assert!(
                matches!(&segments[segment], Segment::Text(text) if text.contains(tag)),
                "segment {segment} named for `{tag}`: {segments:?}"
            );
        }
        Err(other) => panic!("{other} for {segments:?}"),
    }
    let text_bytes: usize = segments
        .iter()
        .map(|segment| match segment {
            Segment::Text(text) => text.len(),
            Segment::Image => 0,
        })
        .sum();
    limit_for(text_bytes + 64 * options.num_image_tokens * images)
}

/// Whether every `<patch_index_N>` of `text` has N < 1024.
fn every_patch_index_is_on_the_grid(text: &str) -> bool {
    text.split("<patch_index_").skip(1).all(|rest| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        !rest[digits.len()..].starts_with('>')
            || digits.parse::<u64>().is_ok_and(|index| index < 1024)
    })
}

fn text_case(tokenizer: &KosmosTokenizer, rng: &mut ChaCha8Rng) -> usize {
    let text = random_text(rng, 40);
    let ids = tokenizer.encode(&text).expect("any text encodes");
    let vocab = tokenizer.vocab_size();
    assert!(ids.iter().all(|&id| (id as usize) < vocab));
    tokenizer
        .decode(&ids, rng.random())
        .expect("its ids decode");
    // Generated ids are arbitrary too: random ids, special ones included, decode without a panic.
    let random_ids: Vec<u32> = (0..rng.random_range(0..32))
        .map(|_| rng.random_range(0..vocab as u32 + 4))
        .collect();
    let _ = tokenizer.decode(&random_ids, rng.random());
    let (clean, entities) = post_process_generation(&text);
    // HF's post-processing, which ours reproduces, turns an index outside the 32 x 32 grid (a model only writes
    // 0..1023, so only typed text has them) into a box outside the image and a span counted with the tag left in;
    // every other text gives spans inside the clean text and boxes inside the image.
    if every_patch_index_is_on_the_grid(&text) {
        let chars = clean.chars().count();
        for entity in &entities {
            assert!(
                entity.span.0 <= chars && entity.span.1 <= chars,
                "{entity:?} in {clean:?}"
            );
            for bbox in &entity.boxes {
                assert!(bbox.iter().all(|v| (0.0..=1.0).contains(v)), "{bbox:?}");
            }
        }
    }
    limit_for(text.len())
}

const PROMPTS: Suite<'static> = Suite {
    name: "prompt builder tag soup",
    seed: 0x70_6b,
    ci_cases: 2_000,
    long_cases: 1_000_000,
};

const TEXTS: Suite<'static> = Suite {
    name: "tokenizer and grounding tag soup",
    seed: 0x7e_47,
    ci_cases: 2_000,
    long_cases: 1_000_000,
};

#[test]
fn the_prompt_builder_survives_random_utf8_and_tag_soup() {
    let tokenizer = tokenizer();
    fuzz::run(PROMPTS, Mode::Ci, |rng| prompt_case(&tokenizer, rng));
}

#[test]
fn the_tokenizer_and_grounding_survive_random_utf8_and_tag_soup() {
    let tokenizer = tokenizer();
    fuzz::run(TEXTS, Mode::Ci, |rng| text_case(&tokenizer, rng));
}

#[test]
#[ignore = "long mode: a million prompts"]
fn the_prompt_builder_survives_random_utf8_and_tag_soup_long() {
    let tokenizer = tokenizer();
    fuzz::run(PROMPTS, Mode::Long, |rng| prompt_case(&tokenizer, rng));
}

#[test]
#[ignore = "long mode: a million texts"]
fn the_tokenizer_and_grounding_survive_random_utf8_and_tag_soup_long() {
    let tokenizer = tokenizer();
    fuzz::run(TEXTS, Mode::Long, |rng| text_case(&tokenizer, rng));
}
