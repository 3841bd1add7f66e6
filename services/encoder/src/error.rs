//! Errors of the encoder: what one request can fail with (each maps to one gRPC code, in [`RequestError::code`])
//! and what stops the service from starting. Why one image was refused is `kosmos_processor`'s
//! [`ImageRejection`], as in the gateway.

use std::path::PathBuf;

/// Why one image of a request was refused: the workspace's one vocabulary, shared with the gateway.
pub use kosmos_processor::ImageRejection;

/// Why one Encode or Info call failed.
///
/// Cloneable: a failed engine batch reports the same error to every request that rode in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request holds no image.
    #[error("images: at least one image is required")]
    NoImages,
    /// More images than `limits.max_images_per_request`.
    #[error("images: {count} images exceeds max_images_per_request {max}")]
    TooManyImages {
        /// Images sent.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The requested embedding dtype is unknown.
    #[error("dtype: {0} is not one of DTYPE_UNSPECIFIED, DTYPE_F32, DTYPE_F16, DTYPE_BF16")]
    UnknownDtype(i32),
    /// One image was refused.
    #[error("images[{index}]: {reason}")]
    Image {
        /// Index of the image in the request.
        index: usize,
        /// Why.
        reason: ImageRejection,
    },
    /// One decoded image could not be preprocessed.
    #[error("images[{index}]: cannot preprocess the image: {message}")]
    Preprocess {
        /// Index of the image in the request.
        index: usize,
        /// Why.
        message: String,
    },
    /// The batching queue cannot take the request's images now.
    #[error(
        "encoder queue full: {queued} images waiting, {requested} more would exceed max_queued_images {max}"
    )]
    QueueFull {
        /// Images of this request.
        requested: usize,
        /// Images waiting when the request arrived.
        queued: usize,
        /// The limit.
        max: usize,
    },
    /// The caller's deadline passed before the embeddings were computed; no compute was spent on them.
    #[error("deadline exceeded {0}")]
    DeadlineExceeded(&'static str),
    /// The model is still loading.
    #[error("the encoder is still loading its model")]
    Loading,
    /// Shutdown has begun; no new work is admitted.
    #[error("the encoder is shutting down")]
    ShuttingDown,
    /// The engine thread is gone.
    #[error("the encoder engine is not running")]
    EngineStopped,
    /// The engine failed (or panicked) on the batch that carried this request; other batches are unaffected.
    #[error("encoding failed: {0}")]
    Engine(String),
    /// An invariant of the service broke.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    /// The gRPC code of this error (the one place where errors become codes).
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::NoImages
            | Self::TooManyImages { .. }
            | Self::UnknownDtype(_)
            | Self::Image { .. }
            | Self::Preprocess { .. } => tonic::Code::InvalidArgument,
            Self::QueueFull { .. } => tonic::Code::ResourceExhausted,
            Self::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
            Self::Loading | Self::ShuttingDown | Self::EngineStopped => tonic::Code::Unavailable,
            Self::Engine(_) | Self::Internal(_) => tonic::Code::Internal,
        }
    }
}

kosmos_runtime::status_from!(RequestError);

/// Why the configuration is unusable (the runtime's: every error names its key).
pub use kosmos_runtime::config::ConfigError;

/// Why the service could not start, or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The model directory could not be loaded.
    #[error("cannot load the model from {dir}: {source}")]
    Model {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: kosmos_model::ModelError,
    },
    /// `preprocessor_config.json` could not be read.
    #[error(transparent)]
    Preprocessor(#[from] kosmos_processor::ConfigError),
    /// The preprocessor and the model disagree (the crop is not the tower's input size).
    #[error("{0}")]
    Incompatible(String),
    /// The engine thread could not be started or died while loading.
    #[error("engine thread: {0}")]
    Engine(String),
    /// Binding or serving failed.
    #[error(transparent)]
    Serve(#[from] kosmos_runtime::ServeError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_errors_name_the_index_the_limit_and_the_value() {
        let error = RequestError::Image {
            index: 2,
            reason: ImageRejection::TooManyBytes {
                bytes: 31_457_280,
                max: 20_971_520,
            },
        };
        assert_eq!(
            error.to_string(),
            "images[2]: 31457280 bytes, above the limit `limits.max_image_bytes` = 20971520"
        );
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_header_larger_than_the_limits_names_the_dimension_over_its_limit() {
        let tall = ImageRejection::from(kosmos_processor::DecodeError::TooLarge {
            width: 10,
            height: 9000,
            max_width: 8192,
            max_height: 8192,
        });
        assert_eq!(
            tall.to_string(),
            "9000 pixels high, above the limit `limits.max_image_height` = 8192"
        );
    }
}
