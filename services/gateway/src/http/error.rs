//! Errors of the HTTP API in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
//! each gRPC code maps to (in one place, [`ApiError::from_request`]) and the gRPC field names of the shared
//! validation translated to the JSON request's ([`FieldNames`]).

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use crate::error::RequestError;

/// One failed HTTP request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, naming the field and the limit.
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `request_too_large`, …).
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (429 only).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            status,
            param: first_field(&message),
            message,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request is wrong; `message` names the field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: no such model or path.
    pub fn not_found(message: impl Into<String>, code: &'static str) -> Self {
        Self {
            code: Some(code),
            ..Self::new(StatusCode::NOT_FOUND, message)
        }
    }

    /// 413: the body or an image is over its limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(StatusCode::PAYLOAD_TOO_LARGE, message)
        }
    }

    /// 500: the deployment's fault (e.g. its chat template failed), never the caller's.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// 504: the request's time ran out.
    pub fn deadline(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, message)
    }

    /// The status of a failure of the shared request pipeline, by its gRPC code.
    pub fn from_request(err: &RequestError, names: &FieldNames) -> Self {
        let message = names.rename(&err.to_string());
        let status = match err.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            tonic::Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            tonic::Code::Ok
            | tonic::Code::Unknown
            | tonic::Code::AlreadyExists
            | tonic::Code::FailedPrecondition
            | tonic::Code::Aborted
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut api = Self::new(status, message);
        if status == StatusCode::TOO_MANY_REQUESTS {
            api.retry_after = Some(retry_after_seconds(err).unwrap_or(1));
        }
        api
    }

    /// OpenAI's `type` for this status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 413 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            504 => "timeout_error",
            _ => "server_error",
        }
    }

    /// The JSON body (also sent as an SSE event when a stream fails after it started).
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// How long a caller refused with RESOURCE_EXHAUSTED should wait: the concurrency limit and a full pool queue
/// clear within about a second; a spent quota says when its bucket allows the next request (rounded up).
fn retry_after_seconds(err: &RequestError) -> Option<u64> {
    match err {
        RequestError::Overloaded { .. } | RequestError::PoolOverloaded { .. } => Some(1),
        RequestError::QuotaExceeded { retry_after, .. } => {
            Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
        }
        RequestError::InvalidArgument(_)
        | RequestError::NotReady(_)
        | RequestError::Unavailable { .. }
        | RequestError::DeadlineExceeded(_)
        | RequestError::Internal(_)
        | RequestError::Unauthenticated(_)
        | RequestError::StreamAbandoned { .. } => None,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), message = %self.message, "http request failed");
        }
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after
            && let Ok(value) = http::HeaderValue::from_str(&seconds.to_string())
        {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, value);
        }
        response
    }
}

/// The first backquoted name in a message (`` `max_tokens` is 5000, … `` → `max_tokens`): the field at fault,
/// as every validation message names it first.
fn first_field(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let length = message[start..].find('`')?;
    let field = &message[start..start + length];
    (!field.is_empty() && !field.starts_with("limits.") && !field.contains(' '))
        .then(|| field.to_string())
}

/// The JSON names of what the shared validation calls `prompt[i]` and `params.x`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldNames {
    /// What `prompt` is called (`messages` or `prompt`).
    pub prompt: String,
    /// The JSON path of each prompt segment (`messages[0].content[1].image_url`).
    pub segments: Vec<String>,
    /// What `params.max_new_tokens` is called (`max_tokens` or `max_completion_tokens`).
    pub max_new_tokens: &'static str,
    /// What `params.logprobs` is called (`top_logprobs` or `logprobs`).
    pub logprobs: &'static str,
}

impl FieldNames {
    /// `message` with the gRPC field names replaced by the JSON request's.
    pub fn rename(&self, message: &str) -> String {
        let mut renamed = message.to_string();
        for (index, path) in self.segments.iter().enumerate() {
            for suffix in [".image.data", ".image.mime_type", ".image", ".text", ""] {
                renamed =
                    renamed.replace(&format!("`prompt[{index}]{suffix}`"), &format!("`{path}`"));
            }
        }
        renamed = renamed.replace("`prompt`", &format!("`{}`", self.prompt));
        renamed = renamed.replace(
            "`params.max_new_tokens`",
            &format!("`{}`", self.max_new_tokens),
        );
        renamed = renamed.replace("`params.logprobs`", &format!("`{}`", self.logprobs));
        renamed.replace("`params.", "`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> FieldNames {
        FieldNames {
            prompt: "messages".into(),
            segments: vec![
                "messages[0].content".into(),
                "messages[1].content[0].image_url".into(),
            ],
            max_new_tokens: "max_tokens",
            logprobs: "top_logprobs",
        }
    }

    #[test]
    fn grpc_field_names_become_the_json_requests() {
        let names = names();
        assert_eq!(
            names.rename(
                "`prompt[1].image.data` is 11 bytes, above the limit `limits.max_image_bytes` = 10"
            ),
            "`messages[1].content[0].image_url` is 11 bytes, above the limit `limits.max_image_bytes` = 10"
        );
        assert_eq!(
            names.rename("`params.max_new_tokens` is 5000, above the limit"),
            "`max_tokens` is 5000, above the limit"
        );
        assert_eq!(
            names.rename("`params.top_p` must be in [0, 1], got 2"),
            "`top_p` must be in [0, 1], got 2"
        );
        assert_eq!(
            names.rename("`prompt` is 9000 tokens"),
            "`messages` is 9000 tokens"
        );
    }

    #[test]
    fn each_code_has_its_status_and_overload_says_when_to_retry() {
        let names = names();
        let overloaded = ApiError::from_request(&RequestError::Overloaded { limit: 2 }, &names);
        assert_eq!(overloaded.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(overloaded.retry_after, Some(1));
        assert_eq!(overloaded.kind(), "rate_limit_error");
        let invalid = ApiError::from_request(
            &RequestError::invalid("`params.temperature` must be a number >= 0, got -1"),
            &names,
        );
        assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
        assert_eq!(invalid.param.as_deref(), Some("temperature"));
        let late = ApiError::from_request(&RequestError::DeadlineExceeded("generating"), &names);
        assert_eq!(late.status, StatusCode::GATEWAY_TIMEOUT);
        let down = ApiError::from_request(&RequestError::NotReady("no decoder".into()), &names);
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
        let body = down.body();
        assert_eq!(body["error"]["type"], "service_unavailable_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("no decoder"))
        );
    }
}
