//! Helpers shared by the parity tests: fixture paths and tensor comparisons.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use kosmos_model::{DType, Device, Tensor};

/// `tests/fixtures` at the workspace root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The tensors of `tests/fixtures/reference/NAME.safetensors`.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures()
        .join("reference")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// One tensor of a reference map, by key.
pub fn get<'a>(tensors: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    tensors
        .get(key)
        .unwrap_or_else(|| panic!("fixture has no `{key}`"))
}

/// Largest absolute elementwise difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let diff =
        (a.to_dtype(DType::F32).expect("f32") - b.to_dtype(DType::F32).expect("f32")).expect("sub");
    diff.abs()
        .expect("abs")
        .flatten_all()
        .expect("flatten")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

/// A tensor's rows as `Vec<Vec<i64>>`.
pub fn i64_rows(tensor: &Tensor) -> Vec<Vec<i64>> {
    tensor
        .to_dtype(DType::I64)
        .expect("i64")
        .to_vec2::<i64>()
        .expect("rows")
}

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kosmos-model-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
