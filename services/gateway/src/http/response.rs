//! The pipeline's answers (`pb::GenerateResponse`, stream messages) → OpenAI's JSON: `chat.completion`,
//! `text_completion` and their SSE chunks, with usage, log-probabilities and, with `grounding`, the entities
//! with boxes normalised to [0, 1] and in the original image's pixels.

use std::sync::Arc;

use axum::response::sse::Event;
use kosmos_processor::{KosmosTokenizer, post_process_generation};
use kosmos_proto::v1 as pb;
use serde_json::{Value, json};

use super::error::{ApiError, FieldNames};
use crate::error::RequestError;

/// Which API shape an answer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Text,
}

/// What every answer of one request shares.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Chat or text completion.
    pub shape: Shape,
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// The model fingerprint (`system_fingerprint`).
    pub fingerprint: String,
    /// Decodes top log-probability tokens.
    pub tokenizer: Arc<KosmosTokenizer>,
    /// Whether log-probabilities are returned.
    pub logprobs: bool,
    /// Whether entities are returned.
    pub grounding: bool,
    /// `(width, height)` of the image grounding boxes refer to (the prompt's first), if any.
    pub image_size: Option<(u32, u32)>,
}

/// OpenAI's name of a finish reason: `stop` (end of sequence or a stop string) or `length`.
pub fn finish_reason(reason: i32) -> Option<&'static str> {
    match pb::FinishReason::try_from(reason) {
        Ok(pb::FinishReason::Eos | pb::FinishReason::StopSequence) => Some("stop"),
        Ok(pb::FinishReason::Length | pb::FinishReason::ContextLength) => Some("length"),
        Ok(pb::FinishReason::Unspecified) | Err(_) => None,
    }
}

/// OpenAI's usage, plus `image_tokens` (prompt positions filled by images, included in `prompt_tokens`).
pub fn usage(usage: Option<&pb::Usage>) -> Value {
    let usage = usage.cloned().unwrap_or_default();
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "image_tokens": usage.image_tokens,
    })
}

fn boxes_json(boxes: impl Iterator<Item = [f32; 4]>, scale: (f32, f32)) -> Vec<Value> {
    boxes
        .map(|[x1, y1, x2, y2]| {
            json!({"x1": x1 * scale.0, "y1": y1 * scale.1, "x2": x2 * scale.0, "y2": y2 * scale.1})
        })
        .collect()
}

impl Answer {
    /// One entity: the phrase, its span in `clean_text` (code points), boxes in [0, 1] and, when the prompt has
    /// an image, in that image's pixels (the processor resizes the whole image, so a box scales by its size).
    fn entity(&self, phrase: &str, span: (u32, u32), boxes: &[[f32; 4]]) -> Value {
        let mut entity = json!({
            "phrase": phrase,
            "start": span.0,
            "end": span.1,
            "boxes": boxes_json(boxes.iter().copied(), (1.0, 1.0)),
        });
        if let Some((width, height)) = self.image_size {
            entity["boxes_px"] = Value::from(boxes_json(
                boxes.iter().copied(),
                (width as f32, height as f32),
            ));
        }
        entity
    }

    fn entities(&self, entities: &[pb::Entity]) -> Vec<Value> {
        entities
            .iter()
            .map(|entity| {
                let span = entity.span.unwrap_or_default();
                let boxes: Vec<[f32; 4]> = entity
                    .boxes
                    .iter()
                    .map(|b| [b.x1, b.y1, b.x2, b.y2])
                    .collect();
                self.entity(&entity.phrase, (span.start, span.end), &boxes)
            })
            .collect()
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Log-probabilities of `tokens` (special tokens, which add no text, left out), or null. `offset` is where
    /// the first token's text starts in the answer (completions' `text_offset`).
    fn logprobs(&self, tokens: &[pb::Token], offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let tokens: Vec<&pb::Token> = tokens.iter().filter(|token| !token.special).collect();
        match self.shape {
            Shape::Chat => {
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|token| {
                        let text = self.token_text(token.id);
                        let top: Vec<Value> = token
                            .top_logprobs
                            .iter()
                            .map(|top| {
                                json!({"token": top.text, "logprob": top.logprob, "bytes": top.text.as_bytes()})
                            })
                            .collect();
                        json!({"token": text, "logprob": token.logprob, "bytes": text.as_bytes(), "top_logprobs": top})
                    })
                    .collect();
                json!({ "content": content })
            }
            Shape::Text => {
                let mut text_offset = Vec::with_capacity(tokens.len());
                let mut at = offset;
                for token in &tokens {
                    text_offset.push(at);
                    at += token.text.len();
                }
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|token| {
                        let map: serde_json::Map<String, Value> = token
                            .top_logprobs
                            .iter()
                            .map(|top| (top.text.clone(), Value::from(top.logprob)))
                            .collect();
                        Value::Object(map)
                    })
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|token| self.token_text(token.id)).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|token| token.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": text_offset,
                })
            }
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.shape, chunk) {
            (Shape::Chat, false) => "chat.completion",
            (Shape::Chat, true) => "chat.completion.chunk",
            (Shape::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        })
    }

    /// The whole answer of a unary request.
    pub fn unary(&self, response: &pb::GenerateResponse) -> Value {
        let mut choice = json!({
            "index": 0,
            "logprobs": self.logprobs(&response.tokens, 0),
            "finish_reason": finish_reason(response.finish_reason),
        });
        let grounding = self.grounding.then(|| {
            (
                Value::from(self.entities(&response.entities)),
                Value::from(response.clean_text.clone()),
            )
        });
        match self.shape {
            Shape::Chat => {
                let mut message = json!({"role": "assistant", "content": response.text});
                if let Some((entities, clean_text)) = grounding {
                    message["entities"] = entities;
                    message["clean_text"] = clean_text;
                }
                if !response.lines.is_empty() {
                    message["lines"] = lines_json(&response.lines);
                }
                choice["message"] = message;
            }
            Shape::Text => {
                choice["text"] = Value::from(response.text.clone());
                if let Some((entities, clean_text)) = grounding {
                    choice["entities"] = entities;
                    choice["clean_text"] = clean_text;
                }
                if !response.lines.is_empty() {
                    choice["lines"] = lines_json(&response.lines);
                }
            }
        }
        let mut answer = self.envelope(false, vec![choice]);
        answer["usage"] = usage(response.usage.as_ref());
        answer
    }
}

/// Turns stream messages into SSE events: a chunk per message (entities as soon as their `</object>` arrives),
/// the usage chunk when asked, `[DONE]` after the last; an error becomes one `{"error": …}` event.
#[derive(Debug)]
pub struct ChunkWriter {
    answer: Answer,
    names: FieldNames,
    include_usage: bool,
    first: bool,
    text: String,
    entities_sent: usize,
}

impl ChunkWriter {
    /// A writer for one request's stream.
    pub fn new(answer: Answer, names: FieldNames, include_usage: bool) -> Self {
        Self {
            answer,
            names,
            include_usage,
            first: true,
            text: String::new(),
            entities_sent: 0,
        }
    }

    fn data(value: &Value) -> Event {
        Event::default().data(value.to_string())
    }

    /// The events of one stream message (or of the error that ends the stream).
    pub fn events(
        &mut self,
        message: Result<pb::GenerateStreamResponse, RequestError>,
    ) -> Vec<Event> {
        let message = match message {
            Ok(message) => message,
            Err(err) => {
                let api = ApiError::from_request(&err, &self.names);
                return vec![Self::data(&api.body())];
            }
        };
        let offset = self.text.len();
        self.text.push_str(&message.text);
        let finish = finish_reason(message.finish_reason);
        let new_entities = if !self.answer.grounding {
            Vec::new()
        } else if finish.is_some() {
            // The last message carries every entity, computed as the unary answer computes them.
            self.answer
                .entities(&message.entities[self.entities_sent.min(message.entities.len())..])
        } else {
            let (_, entities) = post_process_generation(&self.text);
            let fresh: Vec<Value> = entities[self.entities_sent.min(entities.len())..]
                .iter()
                .map(|entity| {
                    let span = (entity.span.0 as u32, entity.span.1 as u32);
                    self.answer.entity(&entity.phrase, span, &entity.boxes)
                })
                .collect();
            fresh
        };
        self.entities_sent += new_entities.len();
        let mut choice = json!({
            "index": 0,
            "logprobs": self.answer.logprobs(&message.tokens, offset),
            "finish_reason": finish,
        });
        match self.answer.shape {
            Shape::Chat => {
                let mut delta = json!({"content": message.text});
                if self.first {
                    delta["role"] = Value::from("assistant");
                }
                if !new_entities.is_empty() {
                    delta["entities"] = Value::from(new_entities);
                }
                if finish.is_some() && self.answer.grounding {
                    delta["clean_text"] = Value::from(message.clean_text.clone());
                }
                if !message.lines.is_empty() {
                    delta["lines"] = lines_json(&message.lines);
                }
                choice["delta"] = delta;
            }
            Shape::Text => {
                choice["text"] = Value::from(message.text.clone());
                if !new_entities.is_empty() {
                    choice["entities"] = Value::from(new_entities);
                }
                if finish.is_some() && self.answer.grounding {
                    choice["clean_text"] = Value::from(message.clean_text.clone());
                }
                if !message.lines.is_empty() {
                    choice["lines"] = lines_json(&message.lines);
                }
            }
        }
        self.first = false;
        let mut events = vec![Self::data(&self.answer.envelope(true, vec![choice]))];
        if finish.is_some() {
            if self.include_usage {
                let mut chunk = self.answer.envelope(true, Vec::new());
                chunk["usage"] = usage(message.usage.as_ref());
                events.push(Self::data(&chunk));
            }
            events.push(Event::default().data("[DONE]"));
        }
        events
    }
}

/// Kosmos-2.5 `<ocr>` lines: `[{text, box, box_px}]`, each box `{x1, y1, x2, y2}` (normalised; in pixels) or null.
fn lines_json(lines: &[pb::TextLine]) -> Value {
    let wire = |b: &Option<pb::Box>| match b {
        Some(b) => json!({"x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2}),
        None => Value::Null,
    };
    Value::from(
        lines
            .iter()
            .map(|line| json!({"text": line.text, "box": wire(&line.r#box), "box_px": wire(&line.box_px)}))
            .collect::<Vec<_>>(),
    )
}
