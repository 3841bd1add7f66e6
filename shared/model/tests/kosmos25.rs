//! Kosmos-2.5 parity with HF transformers on the tiny random model of `tests/fixtures/kosmos25/` (written by
//! `tools/reference/make_kosmos25_fixtures.py`): the page tower's last hidden state (padded rows included) and the
//! image embeddings after the connector, for three pages with different patch grids in one batch.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use kosmos_model::{DType, Device, Kosmos25Config, PageEncoder, Tensor, Weights};

fn kosmos25() -> PathBuf {
    common::fixtures().join("kosmos25")
}

fn reference() -> HashMap<String, Tensor> {
    let path = kosmos25().join("reference.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

fn encoder() -> (Kosmos25Config, PageEncoder) {
    let dir = kosmos25().join("tiny");
    let config = Kosmos25Config::from_file(&dir.join("config.json")).expect("config");
    let weights = Weights::from_mmaped_safetensors(
        &[dir.join("model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .expect("weights");
    let encoder = PageEncoder::new(&config, &weights).expect("loads");
    (config, encoder)
}

#[test]
fn the_tiny_config_is_read_as_hf_wrote_it() {
    let (config, _) = encoder();
    assert_eq!(config.latent_query_num, 5);
    assert_eq!(config.vision_config.patch_embed_hidden_size, 48);
    assert_eq!(config.vision_config.head_dim, 8);
    assert_eq!(config.vision_config.max_num_patches, 17);
    assert_eq!(config.text_config.embed_dim, 24);
    assert_eq!(config.text_config.vocab_size, 97);
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
