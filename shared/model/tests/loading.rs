//! Loading errors are clear: a missing tensor, a tensor of the wrong shape and a malformed config each name what
//! is wrong; nothing falls back to random weights.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{fixtures, temp_dir};
use kosmos_model::{
    DType, Device, KosmosModel, ModelError, ModelFiles, Tensor, TextHalf, VisionHalf,
};

fn tiny_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("tiny/model.safetensors"), &Device::Cpu)
        .expect("tiny weights")
}

fn write_model(dir: &Path, tensors: &HashMap<String, Tensor>, config: &[u8]) {
    std::fs::write(dir.join("config.json"), config).expect("config");
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).expect("weights");
}

fn tiny_config() -> Vec<u8> {
    std::fs::read(fixtures().join("tiny/config.json")).expect("tiny config")
}

#[test]
fn a_missing_tensor_is_an_error_naming_it_and_its_shape() {
    let dir = temp_dir("missing");
    let mut tensors = tiny_tensors();
    let name = "text_model.model.layers.1.ffn.ffn_layernorm.weight";
    let removed = tensors
        .remove(name)
        .expect("the tiny model has this tensor");
    write_model(&dir, &tensors, &tiny_config());
    let err = KosmosModel::load(&dir, DType::F32, &Device::Cpu).expect_err("must fail");
    match &err {
        ModelError::MissingTensor {
            name: missing,
            expected,
            ..
        } => {
            assert_eq!(missing, name);
            assert_eq!(expected, removed.dims());
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains(name), "{err}");
    // The vision half does not need that tensor and still loads.
    let files = ModelFiles::open(&dir).expect("files");
    VisionHalf::load(&files, DType::F32, &Device::Cpu)
        .expect("vision half loads without text weights");
}

#[test]
fn a_tensor_of_the_wrong_shape_is_an_error_with_both_shapes() {
    let dir = temp_dir("shape");
    let mut tensors = tiny_tensors();
    let name = "image_to_text_projection.latent_query";
    tensors.insert(
        name.to_string(),
        Tensor::zeros((5, 7), DType::F32, &Device::Cpu).expect("zeros"),
    );
    write_model(&dir, &tensors, &tiny_config());
    let files = ModelFiles::open(&dir).expect("files");
    let err = VisionHalf::load(&files, DType::F32, &Device::Cpu).expect_err("must fail");
    let message = err.to_string();
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{message}");
    assert!(
        message.contains(name) && message.contains("[5, 7]"),
        "{message}"
    );
    // The text half does not touch the connector and loads.
    TextHalf::load(&files, DType::F32, &Device::Cpu).expect("text half loads");
}

#[test]
fn a_malformed_config_is_an_error_naming_the_key() {
    let dir = temp_dir("config");
    let config = String::from_utf8(tiny_config()).expect("utf-8");
    let broken = config.replacen("\"attention_heads\": 4", "\"attention_heads\": \"four\"", 1);
    assert_ne!(broken, config, "the tiny config sets attention_heads");
    write_model(&dir, &tiny_tensors(), broken.as_bytes());
    let err = ModelFiles::open(&dir).expect_err("must fail");
    assert!(
        err.to_string().contains("text_config.attention_heads"),
        "{err}"
    );

    std::fs::write(dir.join("config.json"), b"{ not json").expect("write");
    let err = ModelFiles::open(&dir).expect_err("must fail");
    assert!(matches!(err, ModelError::Config { .. }), "{err}");
}

#[test]
fn a_missing_weights_file_is_an_io_error_naming_the_path() {
    let dir = temp_dir("nofile");
    std::fs::write(dir.join("config.json"), tiny_config()).expect("config");
    let err = KosmosModel::load(&dir, DType::F32, &Device::Cpu).expect_err("must fail");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn the_head_is_read_from_lm_head_when_only_that_name_is_stored() {
    let dir = temp_dir("tied");
    let mut tensors = tiny_tensors();
    if let Some(embed) = tensors.remove("text_model.model.embed_tokens.weight") {
        tensors.insert("text_model.lm_head.weight".into(), embed);
    }
    write_model(&dir, &tensors, &tiny_config());
    let ids = Tensor::new(&[[0u32, 5, 9]], &Device::Cpu).expect("ids");
    let ones = Tensor::new(&[[1u32, 1, 1]], &Device::Cpu).expect("mask");
    let zeros = ones.zeros_like().expect("zeros");
    let original =
        KosmosModel::load(&fixtures().join("tiny"), DType::F32, &Device::Cpu).expect("tiny");
    let renamed = KosmosModel::load(&dir, DType::F32, &Device::Cpu).expect("loads from lm_head");
    let (a, _) = original
        .forward_padded(&ids, &ones, &zeros, None)
        .expect("forward");
    let (b, _) = renamed
        .forward_padded(&ids, &ones, &zeros, None)
        .expect("forward");
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
}

#[test]
fn bf16_on_the_cpu_is_refused_with_a_clear_error() {
    let err = KosmosModel::load(&fixtures().join("tiny"), DType::BF16, &Device::Cpu)
        .expect_err("must fail");
    assert!(
        err.to_string().contains("bf16 is not supported on the cpu"),
        "{err}"
    );
}

#[test]
fn the_fingerprint_follows_the_connector_weights_and_not_the_text_values() {
    let tiny = ModelFiles::open(&fixtures().join("tiny")).expect("tiny");
    let original = tiny.fingerprint().expect("fingerprint");
    assert_eq!(original.len(), 32);
    assert_eq!(
        original,
        tiny.fingerprint().expect("fingerprint"),
        "deterministic"
    );

    let dir = temp_dir("fingerprint");
    let mut tensors = tiny_tensors();
    let name = "image_to_text_projection.dense.bias";
    let bias = tensors.get(name).expect("bias");
    let changed = (bias + 1.0).expect("add");
    tensors.insert(name.to_string(), changed);
    write_model(&dir, &tensors, &tiny_config());
    let connector_changed = ModelFiles::open(&dir)
        .expect("files")
        .fingerprint()
        .expect("fingerprint");
    assert_ne!(connector_changed, original);

    let mut tensors = tiny_tensors();
    let name = "text_model.model.layers.0.ffn.fc1.bias";
    let changed = (tensors.get(name).expect("bias") + 1.0).expect("add");
    tensors.insert(name.to_string(), changed);
    write_model(&dir, &tensors, &tiny_config());
    let text_values_changed = ModelFiles::open(&dir)
        .expect("files")
        .fingerprint()
        .expect("fingerprint");
    assert_eq!(
        text_values_changed, original,
        "text weight values are not hashed (only names and shapes)"
    );
}
