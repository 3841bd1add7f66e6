//! The OpenAI-compatible HTTP API, beside the gRPC one on its own port (`http.listen`), HTTP/1.1 and HTTP/2.
//!
//! It is a second front door onto the same pipeline: each JSON request becomes the gRPC request
//! ([`convert`]) and goes through [`crate::generate`] / [`crate::score`], so validation, limits, the concurrency
//! limit, the pools, the embedding cache and the request metrics are the gRPC API's; only the wire mapping
//! differs ([`wire`] in, [`response`] out, [`error`] for failures). A `traceparent` header is continued.
//!
//! Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`, `POST /v1/completions`,
//! `POST /v1/score` (extension), `GET /health` (live), `GET /ready` (a decoder serves the model).
//!
//! Request bodies are charged to the gateway's byte budget (`limits.max_inflight_bytes`) like gRPC messages: up
//! front when `Content-Length` says how much, else as they arrive; a body that does not fit is refused with 429
//! before it is read, and the bytes return when the response ends (a stream's last event included).

mod completions;
mod convert;
mod error;
mod fetch;
mod images;
mod response;
pub mod template;
mod wire;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode};
use serde_json::json;

pub use error::{ApiError, FieldNames};
pub use template::ChatTemplate;

use kosmos_runtime::budget::{ByteBudget, Charge, ChargedBody, HeldBody, OverBudget};
use kosmos_runtime::reload::ReloadError;

use crate::auth::Caller;
use crate::config::HttpConfig;
use crate::generate::RequestClock;
use crate::state::GatewayState;

/// The caller of a request, from its `authorization: Bearer …` header, by the gateway's API keys ([`crate::auth`];
/// anonymous on an open gateway): the one place every HTTP handler asks. No valid key → 401; the quotas are
/// applied where the request is admitted (429 with `Retry-After`).
pub fn caller(state: &GatewayState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .map(|value| value.as_bytes());
    state.auth.authenticate(header).map_err(|err| {
        state.metrics.refused_by_key("", "unauthenticated");
        ApiError::from_request(
            &crate::error::RequestError::from(err),
            &FieldNames::default(),
        )
    })
}

/// What the HTTP handlers share: the gateway's state and the API's settings.
#[derive(Debug)]
pub struct HttpApi {
    state: Arc<GatewayState>,
    config: HttpConfig,
    model_id: String,
    fetch_tls: Arc<rustls::ClientConfig>,
    /// The model's chat template, which renders `messages` when the model directory carries one.
    template: Option<ChatTemplate>,
}

/// The model directory's chat template (see [`template`]), with the tokenizer's special tokens; `None` when it
/// carries none.
pub fn chat_template(
    model_dir: &std::path::Path,
    tokenizer: &kosmos_processor::KosmosTokenizer,
) -> Result<Option<ChatTemplate>, template::TemplateError> {
    let token = |id: u32| tokenizer.inner().id_to_token(id);
    let tokens = template::SpecialTokens {
        bos_token: token(tokenizer.bos_id()),
        eos_token: token(tokenizer.eos_id()),
        pad_token: token(tokenizer.pad_id()),
        unk_token: tokenizer
            .inner()
            .get_vocab(true)
            .contains_key("<unk>")
            .then(|| "<unk>".to_string()),
    };
    ChatTemplate::load(model_dir, tokens)
}

/// Charges the request's body to the byte budget (see the module doc) and holds the charge until the response
/// body ends.
async fn charge_bytes(
    State(budget): State<Arc<ByteBudget>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let charge = Charge::new(&budget);
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    if let Err(over) = charge.take(declared) {
        return over_budget(&over).into_response();
    }
    let request = request
        .map(|body| axum::body::Body::new(ChargedBody::new(body, Arc::clone(&charge), declared)));
    next.run(request)
        .await
        .map(|body| axum::body::Body::new(HeldBody::new(body, charge)))
}

/// 429 for a body the byte budget cannot take (a retry may fit).
pub(crate) fn over_budget(over: &OverBudget) -> ApiError {
    ApiError {
        code: Some("server_overloaded"),
        retry_after: Some(1),
        ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, over.0.clone())
    }
}

/// The API's routes over the gateway's state; `model_id` is the served model's name (its directory's), `template`
/// its chat template if it has one. Fails when `http.fetch_ca_file` cannot be read.
pub fn router(
    state: Arc<GatewayState>,
    config: HttpConfig,
    model_id: String,
    template: Option<ChatTemplate>,
) -> Result<Router, ReloadError> {
    let fetch_tls = fetch::client_tls(config.fetch.ca_file.as_deref())?;
    // Images arrive base64-encoded (4 characters per 3 bytes): the body may be a third larger than the gRPC
    // message the same request makes.
    let body_limit = state.limits.max_message_bytes.get().saturating_mul(4) / 3;
    let api = Arc::new(HttpApi {
        state,
        config,
        model_id,
        fetch_tls,
        template,
    });
    let router = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::text))
        .route("/v1/score", post(completions::score))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&api.state.budget),
            charge_bytes,
        ))
        .with_state(api);
    Ok(router)
}

impl HttpApi {
    /// The request's clock: arrival now, the deadline `http.request_timeout_seconds` later (if set).
    fn clock(&self) -> RequestClock {
        let arrived = Instant::now();
        RequestClock {
            arrived,
            deadline: self.config.request_timeout.map(|timeout| arrived + timeout),
        }
    }

    /// Refuses a model other than the served one (absent: the served one).
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            None => Ok(()),
            Some(model) if model == self.model_id => Ok(()),
            Some(model) => Err(ApiError::not_found(
                format!(
                    "`model` `{model}` does not exist; this server serves `{}` (GET /v1/models)",
                    self.model_id
                ),
                "model_not_found",
            )),
        }
    }

    fn model_json(&self) -> Result<serde_json::Value, ApiError> {
        let model = self
            .state
            .model()
            .map_err(|err| ApiError::from_request(&err, &FieldNames::default()))?;
        Ok(json!({
            "id": self.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "kosmos-serve",
            "fingerprint": model.fingerprint.to_string(),
            "context_length": model.context_length,
            "num_image_tokens": model.num_image_tokens,
        }))
    }
}

/// Unix seconds now.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

async fn list_models(State(api): State<Arc<HttpApi>>, headers: HeaderMap) -> Response {
    let listed = caller(&api.state, &headers)
        .and_then(|_| api.model_json())
        .map(|model| axum::Json(json!({"object": "list", "data": [model]})));
    listed.into_response()
}

async fn get_model(
    State(api): State<Arc<HttpApi>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let found = caller(&api.state, &headers)
        .and_then(|_| api.check_model(Some(&id)))
        .and_then(|()| api.model_json())
        .map(axum::Json);
    found.into_response()
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn ready(State(api): State<Arc<HttpApi>>) -> Response {
    if api.state.upstreams.is_ready() {
        return axum::Json(json!({"status": "ready"})).into_response();
    }
    let mut err = ApiError::from_request(
        &crate::error::RequestError::NotReady("no decoder replica serves the model".into()),
        &FieldNames::default(),
    );
    err.code = Some("not_ready");
    err.into_response()
}

async fn no_route(uri: http::Uri) -> Response {
    ApiError::not_found(format!("no route for {}", uri.path()), "not_found").into_response()
}

async fn wrong_method(method: http::Method, uri: http::Uri) -> Response {
    let mut err = ApiError::bad_request(format!("{} does not accept {method}", uri.path()));
    err.status = StatusCode::METHOD_NOT_ALLOWED;
    err.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_model_has_no_chat_template_and_its_special_tokens_are_named() {
        let dir = kosmos_testkit::demo_model_dir();
        let tokenizer = kosmos_processor::KosmosTokenizer::from_file(dir.join("tokenizer.json"))
            .expect("the demo tokenizer");
        assert!(chat_template(&dir, &tokenizer).expect("loads").is_none());
        // A directory with a template: rendered with the tokenizer's `<s>` (removed again: the prompt builder
        // adds it) and `</s>`.
        let with =
            std::env::temp_dir().join(format!("kosmos-chat-template-{}", std::process::id()));
        std::fs::create_dir_all(&with).expect("a temporary directory");
        std::fs::write(
            with.join("chat_template.jinja"),
            "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
        )
        .expect("writing the template");
        let template = chat_template(&with, &tokenizer)
            .expect("loads")
            .expect("a template");
        let message = template::TemplateMessage {
            role: "user".into(),
            content: "hi".into(),
        };
        assert_eq!(
            template.render(&[message], 0),
            Ok(vec![template::Rendered::Text("hi</s>".into())])
        );
        std::fs::remove_dir_all(&with).ok();
    }
}
