//! JSON request → the gRPC request the shared pipeline takes (`pb::GenerateRequest`, `pb::ScoreRequest`): the
//! HTTP API's only mapping. Validation, limits and defaults stay the pipeline's; what is checked here is only what
//! the JSON shape adds (which endpoint needs which field, roles, `data:` URIs, URL fetching).
//!
//! Messages become the prompt's segments in order, each part one segment, so one user message with parts
//! [image, text] is exactly the gRPC prompt [image, text]. KOSMOS has no chat format: several messages are
//! joined in order (as the gRPC API joins segments: stripped, separated by one space) and roles are not
//! rendered — unless the model directory carries a chat template, which then renders the conversation
//! ([`super::template`]; the images go where it puts them).

use kosmos_proto::v1 as pb;

use super::error::{ApiError, FieldNames};
use super::images::{ImageSource, ImageSources};
use super::template::{ChatTemplate, IMAGE_MARKER, Rendered, TemplateMessage};
use super::wire::{Content, Logprobs, Part, PromptInput, RequestBody, StopInput};

/// What a request's `messages` or `prompt` became: the segments (images still to be read) and the JSON names
/// of each segment.
#[derive(Debug)]
pub struct PromptSegments {
    /// In order; images as sources to read ([`ImageSources::read`]).
    pub parts: Vec<SegmentSource>,
    /// JSON names for error messages.
    pub names: FieldNames,
}

/// One segment before its image (if any) is read.
#[derive(Debug)]
pub enum SegmentSource {
    /// Text.
    Text(String),
    /// An image at this URL.
    Image(ImageSource),
}

/// Which of `messages` / `prompt` an endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptField {
    /// `/v1/chat/completions`.
    Messages,
    /// `/v1/completions`.
    Prompt,
    /// `/v1/score`: either.
    Either,
}

const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// The prompt of `body` as the endpoint `field` takes it; `template`, the model's chat template, renders
/// `messages` when there is one.
pub fn prompt_segments(
    body: &mut RequestBody,
    field: PromptField,
    template: Option<&ChatTemplate>,
) -> Result<PromptSegments, ApiError> {
    let messages = body.messages.take();
    let prompt = body.prompt.take();
    match (field, messages, prompt) {
        (PromptField::Messages | PromptField::Either, Some(messages), None) => {
            let segments = message_segments(messages)?;
            match template {
                Some(template) => render(segments, template),
                None => Ok(segments.plain),
            }
        }
        (PromptField::Prompt | PromptField::Either, None, Some(prompt)) => prompt_text(prompt),
        (PromptField::Messages, _, Some(_)) => Err(ApiError::bad_request(
            "`prompt` is for /v1/completions; a chat completion takes `messages`",
        )),
        (PromptField::Messages, None, None) => Err(ApiError::bad_request("`messages` is required")),
        (PromptField::Prompt, Some(_), _) => Err(ApiError::bad_request(
            "`messages` is for /v1/chat/completions; a completion takes `prompt`",
        )),
        (PromptField::Prompt, None, None) => Err(ApiError::bad_request("`prompt` is required")),
        (PromptField::Either, Some(_), Some(_)) => Err(ApiError::bad_request(
            "`messages` and `prompt` are exclusive: send one of them",
        )),
        (PromptField::Either, None, None) => {
            Err(ApiError::bad_request("`messages` or `prompt` is required"))
        }
    }
}

fn names(prompt: &str, segments: Vec<String>, logprobs: &'static str) -> FieldNames {
    FieldNames {
        prompt: prompt.into(),
        segments,
        max_new_tokens: "max_tokens",
        logprobs,
    }
}

/// The messages' parts as segments, and each message's role and parts for a chat template.
struct MessageSegments {
    /// Every part one segment, in order.
    plain: PromptSegments,
    /// Each message's role and the range of `plain`'s parts it holds.
    messages: Vec<(String, std::ops::Range<usize>)>,
}

/// The conversation rendered by the model's chat template, cut into segments: text as rendered, images where it
/// put them (see [`super::template`]).
fn render(segments: MessageSegments, template: &ChatTemplate) -> Result<PromptSegments, ApiError> {
    let MessageSegments { plain, messages } = segments;
    let mut conversation = Vec::with_capacity(messages.len());
    for (role, range) in messages {
        let mut content = Vec::with_capacity(range.len());
        for index in range {
            match &plain.parts[index] {
                SegmentSource::Text(text) if text.contains(IMAGE_MARKER) => {
                    return Err(ApiError::bad_request(format!(
                        "`{}` holds U+FFFC, the character the model's chat template places images by",
                        plain.names.segments[index]
                    )));
                }
                SegmentSource::Text(text) => content.push(text.clone()),
                SegmentSource::Image(_) => content.push(IMAGE_MARKER.to_string()),
            }
        }
        conversation.push(TemplateMessage {
            role,
            content: content.join(" "),
        });
    }
    let mut images = Vec::new();
    let mut image_paths = Vec::new();
    for (part, path) in plain.parts.into_iter().zip(plain.names.segments) {
        if let SegmentSource::Image(source) = part {
            images.push(source);
            image_paths.push(path);
        }
    }
    let rendered = template
        .render(&conversation, images.len())
        .map_err(|err| match err {
            super::template::RenderError::Failed(_) => {
                tracing::error!(template = %template.path.display(), %err, "the chat template failed");
                ApiError::internal(err.to_string())
            }
            refused => ApiError::bad_request(refused.to_string()),
        })?;
    let mut images = images.into_iter().zip(image_paths);
    let mut parts = Vec::with_capacity(rendered.len());
    let mut paths = Vec::with_capacity(rendered.len());
    for piece in rendered {
        match piece {
            Rendered::Text(text) => {
                parts.push(SegmentSource::Text(text));
                paths.push("messages".to_string());
            }
            Rendered::Image => {
                // `render` checked that the rendered text holds exactly one marker per image.
                let Some((source, path)) = images.next() else {
                    return Err(ApiError::internal(
                        "the chat template's images are off by one",
                    ));
                };
                parts.push(SegmentSource::Image(source));
                paths.push(path);
            }
        }
    }
    Ok(PromptSegments {
        parts,
        names: names("messages", paths, "top_logprobs"),
    })
}

fn message_segments(messages: Vec<super::wire::Message>) -> Result<MessageSegments, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "`messages` must contain at least one message",
        ));
    }
    let mut parts = Vec::new();
    let mut paths = Vec::new();
    let mut roles = Vec::new();
    for (index, message) in messages.into_iter().enumerate() {
        let first = parts.len();
        if !ROLES.contains(&message.role.as_str()) {
            return Err(ApiError::bad_request(format!(
                "`messages[{index}].role` must be one of {}, got `{}`",
                ROLES.join(", "),
                message.role
            )));
        }
        match message.content {
            None => {
                return Err(ApiError::bad_request(format!(
                    "`messages[{index}].content` is required"
                )));
            }
            Some(Content::Text(text)) => {
                parts.push(SegmentSource::Text(text));
                paths.push(format!("messages[{index}].content"));
            }
            Some(Content::Parts(content)) => {
                for (part_index, part) in content.into_iter().enumerate() {
                    let path = format!("messages[{index}].content[{part_index}]");
                    match part {
                        Part::Text { text } => {
                            parts.push(SegmentSource::Text(text));
                            paths.push(format!("{path}.text"));
                        }
                        Part::ImageUrl { image_url } => {
                            let path = format!("{path}.image_url");
                            parts.push(SegmentSource::Image(ImageSource::new(
                                image_url.url(),
                                path.clone(),
                            )));
                            paths.push(path);
                        }
                    }
                }
            }
        }
        roles.push((message.role, first..parts.len()));
    }
    Ok(MessageSegments {
        plain: PromptSegments {
            parts,
            names: names("messages", paths, "top_logprobs"),
        },
        messages: roles,
    })
}

fn prompt_text(prompt: PromptInput) -> Result<PromptSegments, ApiError> {
    let text = match prompt {
        PromptInput::Text(text) => text,
        PromptInput::List(mut list) if list.len() == 1 => list.remove(0),
        PromptInput::List(list) => {
            return Err(ApiError::bad_request(format!(
                "`prompt` must be a string or a list of one string, got a list of {}",
                list.len()
            )));
        }
    };
    Ok(PromptSegments {
        parts: vec![SegmentSource::Text(text)],
        names: names("prompt", vec!["prompt".into()], "logprobs"),
    })
}

/// Reads every image of `prompt` (data: URIs decoded, URLs fetched when allowed) into the gRPC segments.
pub async fn read_segments(
    prompt: PromptSegments,
    sources: &ImageSources,
) -> Result<(Vec<pb::Segment>, FieldNames), ApiError> {
    sources.check_count(&prompt.parts)?;
    let mut segments = Vec::with_capacity(prompt.parts.len());
    for part in prompt.parts {
        let kind = match part {
            SegmentSource::Text(text) => pb::segment::Kind::Text(text),
            SegmentSource::Image(source) => pb::segment::Kind::Image(sources.read(source).await?),
        };
        segments.push(pb::Segment { kind: Some(kind) });
    }
    Ok((segments, prompt.names))
}

/// The generation parameters of `body` in the gRPC message (0 means the pipeline's default, as on the wire);
/// `chat` says how `logprobs` is spelled. The pipeline checks every value against the limits.
pub fn generation_params(body: &RequestBody, chat: bool) -> Result<pb::GenerationParams, ApiError> {
    let max_new_tokens = match (body.max_tokens, body.max_completion_tokens) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "`max_tokens` and `max_completion_tokens` are the same setting: send one",
            ));
        }
        (Some(0), None) => return Err(ApiError::bad_request("`max_tokens` must be at least 1")),
        (None, Some(0)) => {
            return Err(ApiError::bad_request(
                "`max_completion_tokens` must be at least 1",
            ));
        }
        (Some(value), None) | (None, Some(value)) => value,
        (None, None) => 0,
    };
    let top_k = match body.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(value) => u32::try_from(value).map_err(|_| {
            ApiError::bad_request(format!("`top_k` must be -1 (off) or positive, got {value}"))
        })?,
    };
    let logprobs = match (chat, body.logprobs, body.top_logprobs) {
        (true, Some(Logprobs::Count(_)), _) => {
            return Err(ApiError::bad_request(
                "`logprobs` is a boolean in a chat completion (the count is `top_logprobs`)",
            ));
        }
        (true, Some(Logprobs::Flag(true)), top) => top.unwrap_or(0),
        (true, _, Some(top)) if top > 0 => {
            return Err(ApiError::bad_request(
                "`top_logprobs` needs `logprobs: true`",
            ));
        }
        (true, _, _) => 0,
        (false, Some(Logprobs::Flag(_)), _) => {
            return Err(ApiError::bad_request(
                "`logprobs` is a count in a completion (top log-probabilities per token)",
            ));
        }
        (false, Some(Logprobs::Count(count)), _) => count,
        (false, None, _) => 0,
    };
    let stop = match &body.stop {
        None => Vec::new(),
        Some(StopInput::One(stop)) => vec![stop.clone()],
        Some(StopInput::Many(stops)) => stops.clone(),
    };
    Ok(pb::GenerationParams {
        max_new_tokens,
        temperature: body.temperature.unwrap_or(0.0),
        top_p: body.top_p.unwrap_or(0.0),
        top_k,
        repetition_penalty: body.repetition_penalty.unwrap_or(0.0),
        no_repeat_ngram_size: body.no_repeat_ngram_size.unwrap_or(0),
        seed: body.seed.unwrap_or(0),
        stop,
        logprobs,
    })
}

/// Whether the response carries log-probabilities (a chat's `logprobs: true` may ask for no top ones).
pub fn wants_logprobs(body: &RequestBody) -> bool {
    matches!(
        body.logprobs,
        Some(Logprobs::Flag(true)) | Some(Logprobs::Count(1..))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> RequestBody {
        RequestBody::parse(json.as_bytes()).expect("valid JSON")
    }

    #[test]
    fn message_parts_become_segments_in_order_with_their_json_names() {
        let mut body = parse(
            r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[
                {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},{"type":"text","text":"An image of"}]}]}"#,
        );
        let prompt = prompt_segments(&mut body, PromptField::Messages, None).expect("valid");
        assert_eq!(prompt.parts.len(), 3);
        assert!(matches!(&prompt.parts[0], SegmentSource::Text(text) if text == "Be brief."));
        assert!(matches!(&prompt.parts[1], SegmentSource::Image(_)));
        assert_eq!(
            prompt.names.segments,
            vec![
                "messages[0].content",
                "messages[1].content[0].image_url",
                "messages[1].content[1].text"
            ]
        );
    }

    #[test]
    fn the_wrong_prompt_field_or_role_is_refused_by_name() {
        let mut body = parse(r#"{"prompt":"x"}"#);
        let err =
            prompt_segments(&mut body, PromptField::Messages, None).expect_err("prompt in chat");
        assert_eq!(err.param.as_deref(), Some("prompt"));
        let mut body = parse(r#"{"messages":[{"role":"tool","content":"x"}]}"#);
        let err = prompt_segments(&mut body, PromptField::Messages, None).expect_err("tool role");
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
        let mut body = parse(r#"{"prompt":["a","b"]}"#);
        assert!(prompt_segments(&mut body, PromptField::Prompt, None).is_err());
    }

    #[test]
    fn parameters_map_to_the_grpc_message() {
        let body = parse(
            r#"{"max_tokens":7,"temperature":0.5,"stop":["a","b"],"logprobs":true,"top_logprobs":3,"top_k":-1,"seed":9}"#,
        );
        let params = generation_params(&body, true).expect("valid");
        assert_eq!(
            (
                params.max_new_tokens,
                params.logprobs,
                params.top_k,
                params.seed
            ),
            (7, 3, 0, 9)
        );
        assert_eq!(params.stop, vec!["a", "b"]);
        assert!(wants_logprobs(&body));
        let err = generation_params(&parse(r#"{"max_tokens":0}"#), true).expect_err("zero");
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
        let err = generation_params(&parse(r#"{"logprobs":2}"#), true).expect_err("count in chat");
        assert_eq!(err.param.as_deref(), Some("logprobs"));
        let params = generation_params(&parse(r#"{"logprobs":2}"#), false).expect("completion");
        assert_eq!(params.logprobs, 2);
    }
}
