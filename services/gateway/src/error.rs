//! Errors of the gateway: what a request can fail with (each maps to one gRPC code, in one place) and what can
//! stop the service from starting.

use std::path::PathBuf;

/// Why one request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// A field is missing, out of range or inconsistent; the message names the field, the limit and the value.
    #[error("{0}")]
    InvalidArgument(String),
    /// The gateway already works on as many requests as it may.
    #[error(
        "gateway overloaded: {limit} requests in flight (`limits.max_concurrent_requests`), retry later"
    )]
    Overloaded {
        /// The configured bound.
        limit: usize,
    },
    /// A pool refused the work because its own queue is full.
    #[error("{pool} pool overloaded: {message}")]
    PoolOverloaded {
        /// `encoder` or `decoder`.
        pool: &'static str,
        /// The replica's message.
        message: String,
    },
    /// The gateway does not know the model yet (no decoder answered) or is shutting down.
    #[error("gateway not ready: {0}")]
    NotReady(String),
    /// No replica of a pool could serve the call.
    #[error("{pool} pool unavailable: {message}")]
    Unavailable {
        /// `encoder` or `decoder`.
        pool: &'static str,
        /// What the last replica answered.
        message: String,
    },
    /// The caller's deadline passed.
    #[error("deadline exceeded while {0}")]
    DeadlineExceeded(&'static str),
    /// A bug or an inconsistent answer from a pool.
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller left its stream unread for `limits.stream_idle_timeout_seconds`; the stream was ended.
    #[error(
        "stream abandoned: the caller did not read for {seconds} s (`limits.stream_idle_timeout_seconds`)"
    )]
    StreamAbandoned {
        /// The configured timeout.
        seconds: f64,
    },
    /// No valid API key.
    #[error("{0}")]
    Unauthenticated(#[from] crate::auth::AuthError),
    /// The caller's key has spent one of its quotas.
    #[error("API key `{key}` is over its quota `{quota}` ({limit}); retry in {:.1} s", retry_after.as_secs_f64())]
    QuotaExceeded {
        /// The key's id.
        key: String,
        /// `requests_per_minute`, `tokens_per_minute` or `max_concurrent_requests`.
        quota: &'static str,
        /// The quota's value.
        limit: u64,
        /// When a retry may succeed.
        retry_after: std::time::Duration,
    },
}

impl RequestError {
    /// The gRPC code of this error (the one place where errors become codes).
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Self::Overloaded { .. } | Self::PoolOverloaded { .. } | Self::QuotaExceeded { .. } => {
                tonic::Code::ResourceExhausted
            }
            Self::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Self::StreamAbandoned { .. } => tonic::Code::Cancelled,
            Self::NotReady(_) | Self::Unavailable { .. } => tonic::Code::Unavailable,
            Self::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
            Self::Internal(_) => tonic::Code::Internal,
        }
    }

    /// An INVALID_ARGUMENT with `message`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }
}

impl RequestError {
    /// When a retry may succeed, for errors that know (a spent quota).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::QuotaExceeded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl From<RequestError> for tonic::Status {
    /// The error's code and message; a spent quota also carries a `google.rpc.RetryInfo` detail.
    fn from(error: RequestError) -> Self {
        use tonic_types::{ErrorDetails, StatusExt as _};
        match error.retry_after() {
            Some(after) => tonic::Status::with_error_details(
                error.code(),
                error.to_string(),
                ErrorDetails::with_retry_info(Some(after)),
            ),
            None => tonic::Status::new(error.code(), error.to_string()),
        }
    }
}

/// Why the gateway could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid or could not be loaded (the error names the key).
    #[error(transparent)]
    Config(#[from] kosmos_runtime::config::ConfigError),
    /// The tokenizer could not be loaded.
    #[error("cannot load the tokenizer from {dir}: {source}")]
    Tokenizer {
        /// The model directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: kosmos_processor::TokenizerError,
    },
    /// A Kosmos-2.5 model directory's `preprocessor_config.json` could not be read (the gateway maps `<ocr>`
    /// boxes back to the page with it).
    #[error("cannot read the page processor of {dir}: {source}")]
    PageProcessor {
        /// The model directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: kosmos_processor::ConfigError,
    },
    /// An endpoint could not be turned into a channel.
    #[error("invalid endpoint `{endpoint}`: {message}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        message: String,
    },
    /// The API keys file could not be read or is invalid.
    #[error("auth.api_keys_file: {0}")]
    ApiKeys(#[source] kosmos_runtime::reload::ReloadError),
    /// `http.fetch_ca_file` could not be read or holds no certificate.
    #[error("http.fetch_ca_file: {0}")]
    FetchCa(#[source] kosmos_runtime::reload::ReloadError),
    /// The model directory's chat template could not be read or compiled.
    #[error(transparent)]
    ChatTemplate(#[from] crate::http::template::TemplateError),
    /// A pool's TLS files could not be read or used.
    #[error("{pool}.tls: {source}")]
    Tls {
        /// `encoder` or `decoder`.
        pool: &'static str,
        /// The cause, naming the file.
        #[source]
        source: kosmos_runtime::reload::ReloadError,
    },
    /// Binding or serving failed.
    #[error(transparent)]
    Serve(#[from] kosmos_runtime::ServeError),
    /// A blocking task panicked or was cancelled.
    #[error("startup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_the_documented_code() {
        assert_eq!(
            RequestError::invalid("x").code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            RequestError::Overloaded { limit: 1 }.code(),
            tonic::Code::ResourceExhausted
        );
        let unavailable = RequestError::Unavailable {
            pool: "decoder",
            message: "gone".into(),
        };
        assert_eq!(unavailable.code(), tonic::Code::Unavailable);
        let status = tonic::Status::from(unavailable);
        assert!(
            status.message().contains("decoder pool unavailable"),
            "{status:?}"
        );
    }
}
