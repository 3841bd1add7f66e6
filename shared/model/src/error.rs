//! Errors of the model crate: loading (config, weights) and running (shapes of inputs).

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a KOSMOS model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or a key has the wrong type.
    #[error("malformed config {path}: key `{key}`: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The dotted path of the offending key (`text_config.embed_dim`), or `.` for the document.
        key: String,
        /// What the parser said.
        message: String,
    },
    /// The config parses but describes an impossible model.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A tensor the architecture needs is not in the weights file.
    #[error("missing tensor `{name}` (expected shape {expected:?}) in {path}")]
    MissingTensor {
        /// Full tensor name.
        name: String,
        /// The shape the architecture expects.
        expected: Vec<usize>,
        /// The weights file.
        path: PathBuf,
    },
    /// A tensor exists but its shape differs from what the config implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Full tensor name.
        name: String,
        /// The shape the architecture expects.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored with a dtype this crate cannot convert.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// Full tensor name.
        name: String,
        /// The stored dtype.
        dtype: String,
    },
    /// The caller's inputs do not fit the model (shapes, lengths, image counts).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The paged KV cache has fewer free blocks than a reservation needs.
    #[error("the KV cache is out of blocks: {needed} needed, {available} available")]
    OutOfKvBlocks {
        /// Blocks the reservation needed.
        needed: usize,
        /// Blocks the pool could give.
        available: usize,
    },
    /// An error from candle while computing.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, ModelError>;
