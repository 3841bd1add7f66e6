//! Shared helpers of the fixture tests: paths and safetensors/JSON loading.
//!
//! The fixtures are written by HF transformers (`tools/reference/make_fixtures.py`); see
//! `tests/fixtures/README.md` at the workspace root.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use safetensors::{Dtype, SafeTensors};

/// `tests/fixtures/` at the workspace root.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A file under `tests/fixtures/`.
pub fn fixture(relative: &str) -> PathBuf {
    fixtures_dir().join(relative)
}

/// Parses a JSON fixture.
pub fn read_json(relative: &str) -> Result<serde_json::Value> {
    let path = fixture(relative);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The bytes of a safetensors fixture.
pub fn read_bytes(relative: &str) -> Result<Vec<u8>> {
    let path = fixture(relative);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// An f32 tensor: values and shape.
pub fn f32_tensor(tensors: &SafeTensors<'_>, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let view = tensors
        .tensor(name)
        .with_context(|| format!("tensor {name}"))?;
    ensure!(
        view.dtype() == Dtype::F32,
        "{name} is {:?}, expected f32",
        view.dtype()
    );
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((values, view.shape().to_vec()))
}

/// An i64 tensor: values and shape.
pub fn i64_tensor(tensors: &SafeTensors<'_>, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
    let view = tensors
        .tensor(name)
        .with_context(|| format!("tensor {name}"))?;
    ensure!(
        view.dtype() == Dtype::I64,
        "{name} is {:?}, expected i64",
        view.dtype()
    );
    let values = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect();
    Ok((values, view.shape().to_vec()))
}

/// Row `row` of a `[rows, columns]` i64 tensor with the left padding (attention mask 0) removed, as u32.
pub fn unpadded_row(
    ids: &[i64],
    attention: &[i64],
    columns: usize,
    row: usize,
) -> Result<Vec<u32>> {
    let range = row * columns..(row + 1) * columns;
    let mut out = Vec::new();
    for (&id, &mask) in ids[range.clone()].iter().zip(&attention[range]) {
        if mask == 1 {
            out.push(u32::try_from(id)?);
        }
    }
    Ok(out)
}

/// A JSON array of integers as u32.
pub fn json_u32s(value: &serde_json::Value) -> Result<Vec<u32>> {
    let Some(items) = value.as_array() else {
        bail!("expected an array, got {value}")
    };
    items
        .iter()
        .map(|item| {
            item.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .with_context(|| format!("not a u32: {item}"))
        })
        .collect()
}

/// The kosmos tokenizer of the tiny fixture model.
pub fn tiny_tokenizer() -> Result<kosmos_processor::KosmosTokenizer> {
    Ok(kosmos_processor::KosmosTokenizer::from_file(fixture(
        "tiny/tokenizer.json",
    ))?)
}
