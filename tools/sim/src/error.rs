//! The simulator's one error type: every message names the file, the key or the object it is about.

use std::path::PathBuf;

/// What can go wrong reading the simulator's inputs or writing its outputs.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write `{path}`: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not valid TOML / JSON / YAML for its schema.
    #[error("`{path}`: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (it names the key).
        message: String,
    },
    /// A calibration value is out of range.
    #[error("calibration `{key}`: {message}")]
    Calibration {
        /// The key, e.g. `decoder.step[2].ms`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A KEDA ScaledObject uses something the simulator does not model, or is missing.
    #[error("ScaledObject `{object}`: {message}")]
    Keda {
        /// The object's name (or the file when no object is found).
        object: String,
        /// What is wrong.
        message: String,
    },
    /// A traffic specification or a trace record is out of range.
    #[error("trace `{key}`: {message}")]
    Trace {
        /// The key, or `line N` of a trace file.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A simulation parameter is out of range.
    #[error("simulation `{key}`: {message}")]
    Params {
        /// The parameter.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The simulator's result type.
pub type Result<T> = std::result::Result<T, SimError>;
