//! The JSON requests of the HTTP API, as OpenAI (and vLLM's extensions) spell them. One body type serves
//! `/v1/chat/completions` (`messages`), `/v1/completions` (`prompt`) and `/v1/score` (`candidates` after either);
//! each handler checks which fields it needs. Unknown fields are ignored, as vLLM ignores them; fields we cannot
//! honour are refused by name ([`RequestBody::refuse_unsupported`]).

use serde::Deserialize;

use super::error::ApiError;

/// Any request body of the API.
#[derive(Debug, Default, Deserialize)]
pub struct RequestBody {
    /// The model id (`GET /v1/models`); absent: the served model.
    pub model: Option<String>,
    /// Chat messages, in order.
    pub messages: Option<Vec<Message>>,
    /// A completion prompt (a string, or a list of one string).
    pub prompt: Option<PromptInput>,
    /// Score candidates.
    pub candidates: Option<Vec<String>>,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Most tokens to generate (OpenAI's newer name).
    pub max_completion_tokens: Option<u32>,
    /// Softmax temperature; absent: greedy, the gRPC API's default.
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// The request's random stream.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<StopInput>,
    /// Chat: whether to return log-probabilities; completions: how many top log-probabilities per token.
    pub logprobs: Option<Logprobs>,
    /// Chat: how many top log-probabilities per token.
    pub top_logprobs: Option<u32>,
    /// Answer with server-sent events.
    pub stream: Option<bool>,
    /// `include_usage`: a last chunk with the usage.
    pub stream_options: Option<StreamOptions>,
    /// Choices per request; only 1.
    pub n: Option<u32>,
    /// Keep the top-k tokens (vLLM's extension; 0 or -1: off).
    pub top_k: Option<i64>,
    /// CTRL-style repetition penalty (vLLM's extension).
    pub repetition_penalty: Option<f32>,
    /// Never repeat an n-gram of this size (Kosmos-2's generation config uses 3).
    pub no_repeat_ngram_size: Option<u32>,
    /// Kosmos-2 grounding: entities with boxes.
    pub grounding: Option<bool>,
    /// Not supported unless 0.
    pub presence_penalty: Option<f32>,
    /// Not supported unless 0.
    pub frequency_penalty: Option<f32>,
    /// Not supported unless 1.
    pub best_of: Option<u32>,
    /// Not supported unless false.
    pub echo: Option<bool>,
    /// Not supported.
    pub suffix: Option<String>,
    /// Not supported.
    pub tools: Option<serde_json::Value>,
    /// Not supported.
    pub logit_bias: Option<serde_json::Value>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `developer`, `user` or `assistant`; not rendered (KOSMOS has no chat format).
    pub role: String,
    /// The message's text and images.
    pub content: Option<Content>,
}

/// A message's content: a string, or parts in order.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and image parts.
    Parts(Vec<Part>),
}

/// One part of a message.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    /// `{"type": "text", "text": …}`.
    Text {
        /// The text.
        text: String,
    },
    /// `{"type": "image_url", "image_url": {"url": …}}`.
    ImageUrl {
        /// Where the image is.
        image_url: ImageUrl,
    },
}

/// An image's address: `{"url": …, "detail": …}` or, as some clients send it, the URL alone.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    /// OpenAI's object (`detail` is accepted and ignored: KOSMOS has one resolution).
    Object {
        /// `data:` URI or `http(s)` URL.
        url: String,
    },
    /// The URL alone.
    Url(String),
}

impl ImageUrl {
    /// The URL.
    pub fn url(&self) -> &str {
        match self {
            Self::Object { url } | Self::Url(url) => url,
        }
    }
}

/// `prompt`: a string or a list of one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One prompt.
    Text(String),
    /// A batch; only batches of one are served.
    List(Vec<String>),
}

/// `stop`: a string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `logprobs`: a flag (chat) or a count (completions).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum Logprobs {
    /// Chat: return log-probabilities.
    Flag(bool),
    /// Completions: this many top log-probabilities.
    Count(u32),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// End the stream with a chunk carrying the usage.
    #[serde(default)]
    pub include_usage: bool,
}

impl RequestBody {
    /// Parses a body; a malformed one is a 400 naming the field at fault.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if path == "." || path.is_empty() {
                ApiError::bad_request(format!("the body is not a valid request: {inner}"))
            } else {
                ApiError::bad_request(format!("`{path}` is invalid: {inner}"))
            }
        })
    }

    /// Refuses what this server cannot honour, naming the field, instead of ignoring it.
    pub fn refuse_unsupported(&self) -> Result<(), ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::bad_request(format!(
                "`n` must be 1 (one choice per request), got {n}"
            )));
        }
        if let Some(best_of) = self.best_of.filter(|&best_of| best_of != 1) {
            return Err(ApiError::bad_request(format!(
                "`best_of` must be 1, got {best_of}"
            )));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(value) = value.filter(|&value| value != 0.0) {
                return Err(ApiError::bad_request(format!(
                    "`{name}` is not supported (use `repetition_penalty`), got {value}"
                )));
            }
        }
        if self.echo == Some(true) {
            return Err(ApiError::bad_request("`echo` is not supported"));
        }
        if self.suffix.is_some() {
            return Err(ApiError::bad_request("`suffix` is not supported"));
        }
        if self.tools.as_ref().is_some_and(|tools| !tools.is_null()) {
            return Err(ApiError::bad_request(
                "`tools` is not supported: KOSMOS models do not call tools",
            ));
        }
        if self.logit_bias.as_ref().is_some_and(|bias| !bias.is_null()) {
            return Err(ApiError::bad_request("`logit_bias` is not supported"));
        }
        Ok(())
    }

    /// Whether the answer is a stream of server-sent events.
    pub fn streams(&self) -> bool {
        self.stream == Some(true)
    }

    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|options| options.include_usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_request_with_parts_parses() {
        let body = RequestBody::parse(
            br#"{"model":"demo","messages":[{"role":"user","content":[
                {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"high"}},
                {"type":"text","text":"An image of"}]}],"stop":"x","logprobs":true,"top_logprobs":2}"#,
        )
        .expect("valid");
        let messages = body.messages.expect("messages");
        let Some(Content::Parts(parts)) = &messages[0].content else {
            panic!("parts expected");
        };
        assert!(
            matches!(&parts[0], Part::ImageUrl { image_url } if image_url.url().starts_with("data:"))
        );
        assert!(matches!(body.stop, Some(StopInput::One(_))));
        assert!(matches!(body.logprobs, Some(Logprobs::Flag(true))));
    }

    #[test]
    fn a_malformed_field_is_named() {
        let err = RequestBody::parse(br#"{"temperature":"hot"}"#).expect_err("a string");
        assert!(err.message.contains("`temperature`"), "{}", err.message);
        let err = RequestBody::parse(
            br#"{"messages":[{"role":"user","content":[{"type":"input_audio"}]}]}"#,
        )
        .expect_err("unknown part");
        assert!(
            err.message.contains("messages[0].content"),
            "{}",
            err.message
        );
        let err = RequestBody::parse(b"{not json").expect_err("not JSON");
        assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let body = RequestBody::parse(br#"{"n":2}"#).expect("parses");
        let err = body.refuse_unsupported().expect_err("n = 2");
        assert_eq!(err.param.as_deref(), Some("n"));
        let body = RequestBody::parse(br#"{"n":1,"presence_penalty":0}"#).expect("parses");
        assert!(body.refuse_unsupported().is_ok());
    }
}
