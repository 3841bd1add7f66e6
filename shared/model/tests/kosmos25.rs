//! Kosmos-2.5 parity with HF transformers on the tiny random model of `tests/fixtures/kosmos25/` (written by
//! `tools/reference/make_kosmos25_fixtures.py`): the page tower's last hidden state (padded rows included) and the
//! image embeddings after the connector, for three pages with different patch grids in one batch; the text
//! decoder's logits over the processor's prompt layout (segment embeddings on the image block), in one prefill and
//! in chunks that split the image block; and greedy ids equal to `generate`'s.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use kosmos_model::{
    DType, Device, Family, GreedyParams, ImageInjection, Kosmos25Config, KosmosModel,
    KvCacheConfig, ModelFiles, PageEncoder, Prompt, SeqChunk, Tensor, TextFamily, TextModel,
    Weights, greedy_generate, image_block_flags,
};

/// `<image>` and `</image>` in the fixture's ids.
const FAMILY: TextFamily = TextFamily::Kosmos25 {
    image_start: 4,
    image_end: 5,
};

fn kosmos25() -> PathBuf {
    common::fixtures().join("kosmos25")
}

fn reference() -> HashMap<String, Tensor> {
    let path = kosmos25().join("reference.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

fn load() -> (Kosmos25Config, Weights) {
    let dir = kosmos25().join("tiny");
    let config = Kosmos25Config::from_file(&dir.join("config.json")).expect("config");
    let weights = Weights::from_mmaped_safetensors(
        &[dir.join("model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .expect("weights");
    (config, weights)
}

fn encoder() -> (Kosmos25Config, PageEncoder) {
    let (config, weights) = load();
    let encoder = PageEncoder::new(&config, &weights).expect("loads");
    (config, encoder)
}

fn text_model() -> TextModel {
    let (config, weights) = load();
    TextModel::new_family(&config.text_config, true, FAMILY, &weights.pp("text_model"))
        .expect("text model")
}

/// The prompt's ids, its image mask (1 in the processor's mask) and the first page's image embeddings.
fn prompt(reference: &HashMap<String, Tensor>) -> (Vec<u32>, Vec<bool>, Tensor) {
    let flat = |key: &str| -> Vec<i64> {
        common::get(reference, key)
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("values")
    };
    let embeds = common::get(reference, "images.image_embeds")
        .get(0)
        .expect("page 0");
    (
        flat("chat.input_ids").iter().map(|&id| id as u32).collect(),
        flat("chat.image_embeds_position_mask")
            .iter()
            .map(|&m| m == 1)
            .collect(),
        embeds,
    )
}

#[test]
fn the_tiny_config_is_read_as_hf_wrote_it() {
    let (config, _) = encoder();
    assert_eq!(config.latent_query_num, 5);
    assert_eq!(config.vision_config.patch_embed_hidden_size, 48);
    assert_eq!(config.vision_config.head_dim, 8);
    assert_eq!(config.vision_config.max_num_patches, 17);
    assert_eq!(config.text_config.embed_dim, 24);
    assert_eq!(config.text_config.vocab_size, 122);
}

#[test]
fn page_tower_and_image_embeds_match_hf() {
    let (_, encoder) = encoder();
    let reference = reference();
    let patches = common::get(&reference, "images.flattened_patches");
    let mask = common::get(&reference, "images.attention_mask");
    // The pages have different grids, so their padding differs (one has none).
    let valid: Vec<f32> = mask.sum(1).expect("sum").to_vec1().expect("vec");
    assert_eq!(valid, vec![12.0, 15.0, 16.0]);

    let hidden = encoder.tower().forward(patches, mask).expect("tower");
    let diff = common::max_abs_diff(
        &hidden,
        common::get(&reference, "images.vision_last_hidden_state"),
    );
    println!("vision last hidden state: max |diff| {diff:e}");
    assert!(diff < 1e-5, "vision last hidden state differs by {diff}");

    let embeds = encoder.image_embeds(patches, mask).expect("embeds");
    let diff = common::max_abs_diff(&embeds, common::get(&reference, "images.image_embeds"));
    println!("image embeds: max |diff| {diff:e}");
    assert!(diff < 1e-5, "image embeds differ by {diff}");
}

#[test]
fn bad_patch_ids_and_shapes_are_errors() {
    let (_, encoder) = encoder();
    let reference = reference();
    let patches = common::get(&reference, "images.flattened_patches");
    let mask = common::get(&reference, "images.attention_mask");
    // A row id beyond the embedding table.
    let (pages, rows, width) = patches.dims3().expect("dims");
    let mut values: Vec<f32> = patches.flatten_all().expect("flat").to_vec1().expect("vec");
    values[0] = 17.0;
    let bad = Tensor::from_vec(values.clone(), (pages, rows, width), &Device::Cpu).expect("tensor");
    let err = encoder
        .tower()
        .forward(&bad, mask)
        .expect_err("id 17 of 17");
    assert!(err.to_string().contains("0..17"), "{err}");
    values[0] = 1.5;
    let bad = Tensor::from_vec(values, (pages, rows, width), &Device::Cpu).expect("tensor");
    assert!(encoder.tower().forward(&bad, mask).is_err());
    let narrow = patches.narrow(2, 0, width - 1).expect("narrow");
    let err = encoder
        .tower()
        .forward(&narrow, mask)
        .expect_err("short rows");
    assert!(err.to_string().contains("values per row"), "{err}");
}

#[test]
fn image_blocks_are_found_across_chunks() {
    // <s> <image> <s> <s> </image> text: the tags and what lies between them.
    let ids = [0, 4, 0, 0, 5, 9, 9];
    let whole = image_block_flags(&[], &ids, 4, 5);
    assert_eq!(whole, vec![false, true, true, true, true, false, false]);
    for split in 0..ids.len() {
        let mut flags = image_block_flags(&[], &ids[..split], 4, 5);
        flags.extend(image_block_flags(&ids[..split], &ids[split..], 4, 5));
        assert_eq!(flags, whole, "split at {split}");
    }
}

#[test]
fn text_logits_match_hf_in_one_prefill_and_in_chunks() {
    let reference = reference();
    let text = text_model();
    let (ids, mask, embeds) = prompt(&reference);
    let expected = common::get(&reference, "chat.logits").get(0).expect("row");
    // One prefill, then chunks of 3 that cut the image block (the segment must follow the tags across chunks).
    for chunk_len in [ids.len(), 3] {
        let mut cache = text
            .kv_cache(KvCacheConfig::for_sequences([ids.len()], 4), "")
            .expect("cache");
        let mut table = cache.new_table("", Vec::new());
        let mut rows = Vec::new();
        let mut image_row = 0;
        for start in (0..ids.len()).step_by(chunk_len) {
            let end = (start + chunk_len).min(ids.len());
            let marked = mask[start..end].iter().filter(|&&m| m).count();
            let chunk_embeds = embeds.narrow(0, image_row, marked).expect("rows");
            image_row += marked;
            let hidden = text
                .forward(
                    &mut cache,
                    &mut [SeqChunk {
                        input_ids: &ids[start..end],
                        images: (marked > 0).then_some(ImageInjection {
                            mask: &mask[start..end],
                            embeds: &chunk_embeds,
                        }),
                        table: &mut table,
                    }],
                )
                .expect("forward");
            rows.push(text.logits(&hidden).expect("logits"));
        }
        let logits = Tensor::cat(&rows, 0).expect("cat");
        let diff = common::max_abs_diff(&logits, &expected);
        println!("logits in chunks of {chunk_len}: max |diff| {diff:e}");
        assert!(
            diff < 1e-5,
            "chunks of {chunk_len}: logits differ by {diff}"
        );
    }
}

#[test]
fn greedy_ids_match_hf_generate() {
    let reference = reference();
    let text = text_model();
    let (ids, mask, embeds) = prompt(&reference);
    let expected: Vec<i64> = common::get(&reference, "chat.greedy_ids")
        .to_vec1()
        .expect("ids");
    let generated = greedy_generate(
        &text,
        &[Prompt {
            ids,
            image_mask: mask,
            image_embeds: Some(embeds),
        }],
        GreedyParams {
            max_new_tokens: expected.len(),
            no_repeat_ngram_size: 0,
            eos_token_id: None,
        },
    )
    .expect("generates");
    let expected: Vec<u32> = expected.iter().map(|&id| id as u32).collect();
    assert_eq!(generated, vec![expected]);
}

#[test]
fn a_kosmos_2_5_directory_loads_by_its_model_type() {
    let dir = kosmos25().join("tiny");
    let files = ModelFiles::open(&dir).expect("opens");
    assert_eq!(files.config.family(), Family::Kosmos25);
    assert_eq!(files.text_family().expect("tags"), FAMILY);
    assert_eq!(files.config.latent_query_num(), 5);
    let model = KosmosModel::load(&dir, DType::F32, &Device::Cpu).expect("loads");
    let reference = reference();
    // The halves the services load: pages (mask from the patches, as the reference's forward computes it) and
    // the decoder.
    let embeds = model
        .vision
        .encode_pages(common::get(&reference, "images.flattened_patches"))
        .expect("pages");
    let diff = common::max_abs_diff(&embeds, common::get(&reference, "images.image_embeds"));
    assert!(
        diff < 1e-5,
        "image embeds from the vision half differ by {diff}"
    );
    assert!(
        model
            .vision
            .encode(&Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).expect("zeros"))
            .is_err()
    );
    let (ids, mask, page) = prompt(&reference);
    let generated = greedy_generate(
        model.text.model(),
        &[Prompt {
            ids,
            image_mask: mask,
            image_embeds: Some(page),
        }],
        GreedyParams {
            max_new_tokens: 12,
            no_repeat_ngram_size: 0,
            eos_token_id: None,
        },
    )
    .expect("generates");
    let expected: Vec<i64> = common::get(&reference, "chat.greedy_ids")
        .to_vec1()
        .expect("ids");
    assert_eq!(
        generated[0],
        expected.iter().map(|&id| id as u32).collect::<Vec<_>>()
    );
}
