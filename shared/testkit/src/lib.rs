//! Test-only helpers every kosmos crate's tests share (a dev-dependency only, never linked into a service):
//!
//! * fixture paths: the repository root, the tiny model, the fixture images;
//! * [`png`]: PNG chunks with their CRC, header-only PNGs and header rewrites (decompression bombs as far as a
//!   header check is concerned);
//! * [`bombs`]: 1×1 images whose ICC profile, text or EXIF inflates to (or declares) far more than they weigh;
//! * [`fuzz`]: seeded fuzz-style property runs with a per-case allocation and time bound;
//! * [`metrics`]: scraping `/metrics`, the catalogue of `docs/metrics.md`, `promtool check metrics`;
//! * [`traces`]: a subscriber that collects every ended span in memory.

pub mod bombs;
pub mod fuzz;
pub mod metrics;
pub mod png;
pub mod traces;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny random Kosmos-2 of the reference fixtures (image size 32, 3 tokens per image, hidden 32, context
/// 512).
pub fn tiny_model_dir() -> PathBuf {
    repo_root().join("tests/fixtures/tiny")
}

/// The tiny random Kosmos-2.5 of the reference fixtures (`tests/fixtures/kosmos25/tiny`: patch 4x4, 16 patches, 5
/// tokens per image, hidden 24, a character-level tokenizer).
pub fn tiny_kosmos25_dir() -> PathBuf {
    repo_root().join("tests/fixtures/kosmos25/tiny")
}

/// A file of `tests/fixtures/kosmos25/` (`images/page_landscape_300x200.png`, …).
pub fn kosmos25_fixture(relative: &str) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    let path = repo_root().join("tests/fixtures/kosmos25").join(relative);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// One tensor of `tests/fixtures/kosmos25/reference.safetensors` (written by HF transformers) as f64 values and
/// its shape; f32 and i64 tensors.
pub fn kosmos25_reference(key: &str) -> anyhow::Result<(Vec<f64>, Vec<usize>)> {
    use anyhow::Context as _;
    let bytes = kosmos25_fixture("reference.safetensors")?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)?;
    let view = tensors
        .tensor(key)
        .with_context(|| format!("reference tensor {key}"))?;
    let values = match view.dtype() {
        safetensors::Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        safetensors::Dtype::I64 => view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64)
            .collect(),
        other => anyhow::bail!("reference tensor {key} is {other:?}"),
    };
    Ok((values, view.shape().to_vec()))
}

/// The demo model `kosmos serve` uses by default.
pub fn demo_model_dir() -> PathBuf {
    repo_root().join("models/demo")
}

/// The bytes of a fixture image (`tests/fixtures/images/<name>`).
pub fn fixture_image(name: &str) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    let path = repo_root().join("tests/fixtures/images").join(name);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}
