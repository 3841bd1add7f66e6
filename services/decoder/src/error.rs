//! Errors of the decoder: what a request can fail with (each maps to one gRPC code, in one place) and what can
//! stop the service from starting.

use std::path::PathBuf;

use kosmos_runtime::tensor::TensorError;

/// Why one request failed. Cloneable: an engine step that fails reports the same error to every request in it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// A field is missing, out of range or inconsistent; the message names the field and the limit.
    #[error("{0}")]
    InvalidArgument(String),
    /// An image embedding's tensor is malformed (dtype, shape or byte length).
    #[error("segment {segment}: image embedding: {source}")]
    InvalidEmbedding {
        /// Index of the offending segment in the request.
        segment: usize,
        /// What is wrong with the tensor.
        #[source]
        source: TensorError,
    },
    /// An image embedding was made by an encoder of another model.
    #[error(
        "segment {segment}: image embedding fingerprint `{found}` differs from this decoder's `{expected}`"
    )]
    FingerprintMismatch {
        /// Index of the offending segment in the request.
        segment: usize,
        /// The loaded model's fingerprint.
        expected: String,
        /// The fingerprint the embedding carries.
        found: String,
    },
    /// The waiting queue is full.
    #[error(
        "decoder queue full: {max_waiting} requests are already waiting (max_waiting_requests)"
    )]
    QueueFull {
        /// The configured bound.
        max_waiting: usize,
    },
    /// The caller's deadline passed.
    #[error("deadline exceeded {0}")]
    DeadlineExceeded(&'static str),
    /// The engine is not running (shutting down, or its thread died).
    #[error("decoder engine is not running")]
    EngineStopped,
    /// The model or the scheduler failed while running the request; other requests are unaffected.
    #[error("engine step failed: {0}")]
    Engine(String),
    /// The client left a message untaken for `scheduler.paused_timeout_seconds`; its sequence was dropped.
    #[error(
        "stream abandoned: the client did not read for {seconds} s (scheduler.paused_timeout_seconds); its \
         sequence was dropped"
    )]
    Abandoned {
        /// The configured timeout.
        seconds: f64,
    },
}

impl RequestError {
    /// The gRPC code of this error (the one place where errors become codes).
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::InvalidArgument(_) | Self::InvalidEmbedding { .. } => {
                tonic::Code::InvalidArgument
            }
            Self::FingerprintMismatch { .. } => tonic::Code::FailedPrecondition,
            Self::QueueFull { .. } => tonic::Code::ResourceExhausted,
            Self::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
            Self::EngineStopped => tonic::Code::Unavailable,
            Self::Engine(_) => tonic::Code::Internal,
            Self::Abandoned { .. } => tonic::Code::Cancelled,
        }
    }
}

kosmos_runtime::status_from!(RequestError);

/// Why the service could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid or could not be loaded (the error names the key).
    #[error(transparent)]
    Config(#[from] kosmos_runtime::config::ConfigError),
    /// The model could not be loaded.
    #[error("cannot load the model from {dir}: {source}")]
    Model {
        /// The model directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: kosmos_model::ModelError,
    },
    /// The KV cache could not be allocated (its size is `scheduler.kv_token_budget` / `scheduler.kv_block_size`).
    #[error(
        "cannot allocate the KV cache (`scheduler.kv_token_budget` / `scheduler.kv_block_size`): {0}"
    )]
    KvCache(#[source] kosmos_model::ModelError),
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    EngineThread(#[source] std::io::Error),
    /// Binding or serving failed.
    #[error(transparent)]
    Serve(#[from] kosmos_runtime::ServeError),
    /// A blocking task panicked or was cancelled.
    #[error("startup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
