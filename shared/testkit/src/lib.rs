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
