//! Preprocessing parity with HF `CLIPImageProcessor` (transformers 5, torchvision backend) on the fixture
//! images, for both forms of `size` (`reference/pixels.safetensors`) and for the tiny model's config
//! (`images.pixel_values` of `reference/tiny.safetensors`).
//!
//! PNG inputs must match bit for bit. JPEG inputs go through a different decoder than Pillow's
//! (zune-jpeg vs libjpeg-turbo, whose IDCTs round differently), so a few samples may differ by up to
//! two u8 levels, i.e. `2 / 255 / min(std)` = 0.0301 after normalisation.

mod common;

use anyhow::{Context, Result, ensure};
use kosmos_processor::{
    DecodeLimits, ImageProcessorConfig, OPENAI_CLIP_STD, PixelValues, PreprocessBackend,
    decode_image, preprocess,
};
use safetensors::SafeTensors;

/// One u8 level after rescale and normalisation, for the channel with the smallest std.
fn one_level() -> f32 {
    let smallest_std = OPENAI_CLIP_STD
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    (1.0 / 255.0 / smallest_std) as f32
}

fn image_names() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(common::fixture("images"))? {
        let name = entry?
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("bad name {n:?}"))?;
        names.push(name);
    }
    names.sort();
    ensure!(
        names.len() >= 5,
        "expected the fixture images, found {names:?}"
    );
    Ok(names)
}

fn preprocess_file(name: &str, config: &ImageProcessorConfig) -> Result<PixelValues> {
    let encoded = std::fs::read(common::fixture(&format!("images/{name}")))?;
    let image =
        decode_image(&encoded, &DecodeLimits::default()).with_context(|| name.to_owned())?;
    Ok(preprocess(&image, config)?)
}

struct Comparison {
    max_error: f32,
    differing: usize,
    total: usize,
}

fn compare(ours: &[f32], expected: &[f32]) -> Comparison {
    Comparison {
        max_error: ours
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max),
        differing: ours.iter().zip(expected).filter(|(a, b)| a != b).count(),
        total: expected.len(),
    }
}

/// Checks every fixture image against `pixels.safetensors` for one config and backend tolerance.
fn check_config(config_name: &str) -> Result<()> {
    let bytes = common::read_bytes("reference/pixels.safetensors")?;
    let reference = SafeTensors::deserialize(&bytes)?;
    let config = ImageProcessorConfig::from_file(common::fixture(&format!(
        "preprocessor/{config_name}.json"
    )))?;
    for name in image_names()? {
        let ours = preprocess_file(&name, &config)?;
        let (expected, shape) = common::f32_tensor(&reference, &format!("{config_name}.{name}"))?;
        assert_eq!(ours.shape().to_vec(), shape, "{config_name} {name}");
        let result = compare(&ours.data, &expected);
        eprintln!(
            "{config_name} {name}: max |diff| {:e} ({} of {} values differ)",
            result.max_error, result.differing, result.total
        );
        if name.ends_with(".png") {
            assert_eq!(
                result.differing, 0,
                "{config_name} {name}: png must be bit-exact, max |diff| {}",
                result.max_error
            );
        } else {
            assert!(
                result.max_error <= 2.0 * one_level() + 1e-6,
                "{config_name} {name}: {}",
                result.max_error
            );
            assert!(
                result.differing * 10 < result.total,
                "{config_name} {name}: {} values differ",
                result.differing
            );
        }
    }
    Ok(())
}

#[test]
fn squash_config_matches_hf_pixel_values() -> Result<()> {
    check_config("squash")
}

#[test]
fn shortest_edge_config_matches_hf_pixel_values() -> Result<()> {
    check_config("shortest_edge")
}

#[test]
fn tiny_model_config_reproduces_the_model_fixture_pixel_values() -> Result<()> {
    let bytes = common::read_bytes("reference/tiny.safetensors")?;
    let reference = SafeTensors::deserialize(&bytes)?;
    let config = ImageProcessorConfig::from_file(common::fixture("tiny/preprocessor_config.json"))?;
    let (expected, shape) = common::f32_tensor(&reference, "images.pixel_values")?;
    let names = image_names()?;
    assert_eq!(shape[0], names.len());
    let per_image = shape[1..].iter().product::<usize>();
    for (index, name) in names.iter().enumerate() {
        let ours = preprocess_file(name, &config)?;
        let result = compare(
            &ours.data,
            &expected[index * per_image..(index + 1) * per_image],
        );
        let tolerance = if name.ends_with(".png") {
            0.0
        } else {
            2.0 * one_level() + 1e-6
        };
        assert!(
            result.max_error <= tolerance,
            "{name}: {}",
            result.max_error
        );
    }
    Ok(())
}

#[test]
fn pil_backend_stays_within_one_level_of_the_torchvision_reference_on_png() -> Result<()> {
    // HF's two backends differ by up to one u8 level (Pillow's 22-bit weights vs ATen's int16 weights).
    let bytes = common::read_bytes("reference/pixels.safetensors")?;
    let reference = SafeTensors::deserialize(&bytes)?;
    for config_name in ["squash", "shortest_edge"] {
        let mut config = ImageProcessorConfig::from_file(common::fixture(&format!(
            "preprocessor/{config_name}.json"
        )))?;
        config.backend = PreprocessBackend::Pil;
        for name in image_names()?.iter().filter(|name| name.ends_with(".png")) {
            let ours = preprocess_file(name, &config)?;
            let (expected, _) = common::f32_tensor(&reference, &format!("{config_name}.{name}"))?;
            let result = compare(&ours.data, &expected);
            assert!(
                result.max_error <= one_level() + 1e-6,
                "{config_name} {name}: {}",
                result.max_error
            );
        }
    }
    Ok(())
}
