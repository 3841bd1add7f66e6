//! Delivering a started generation: into a stream's channel ([`forward`], with the caller's idle timeout), or
//! folded into the unary response ([`collect`]).

use kosmos_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Code;

use super::Generation;
use crate::error::RequestError;
use crate::metrics::Operation;

/// Drives a started generation into `sender`: each public message (or the error that ends it) becomes the items
/// `wrap` makes of it, sent in order. It ends after the last message, after an error, or when the caller goes away
/// (the receiver is dropped), which drops the decoder stream; failures and cancellations are counted in the
/// request metrics. Both streaming front doors (GenerateStream, the HTTP API's SSE) run it in a task.
pub async fn forward<T>(
    mut generation: Generation,
    sender: mpsc::Sender<T>,
    mut wrap: impl FnMut(Result<pb::GenerateStreamResponse, RequestError>) -> Vec<T>,
) -> Option<RequestError> {
    let state = generation.state.clone();
    let arrived = generation.clock.arrived;
    let idle_timeout = state.limits.stream_idle_timeout;
    let failed = |code| {
        state
            .metrics
            .failed(Operation::TextCompletion, arrived, code)
    };
    loop {
        // Waiting on the decoder and on the caller at once: a caller that goes away ends the task (and drops the
        // decoder stream) even while the decoder is silent.
        let next = tokio::select! {
            next = generation.next() => next,
            () = sender.closed() => {
                tracing::debug!("caller went away, dropping the decoder stream");
                failed(Code::Cancelled);
                return None;
            }
        };
        let message = match next {
            Ok(Some(message)) => Ok(message),
            Ok(None) => return None,
            Err(err) => {
                failed(err.code());
                Err(err)
            }
        };
        let is_error = message.is_err();
        for item in wrap(message) {
            match tokio::time::timeout(idle_timeout, sender.send(item)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    if !is_error {
                        failed(Code::Cancelled);
                    }
                    return None;
                }
                Err(_) => {
                    // The caller holds a full buffer and reads nothing: end the call (dropping the decoder stream
                    // frees its sequence); the caller's stream says why if it ever reads again.
                    tracing::info!(
                        stream_idle_timeout_seconds = idle_timeout.as_secs_f64(),
                        "caller stopped reading, ending its stream"
                    );
                    failed(Code::Cancelled);
                    return Some(RequestError::StreamAbandoned {
                        seconds: idle_timeout.as_secs_f64(),
                    });
                }
            }
        }
        if is_error {
            return None;
        }
    }
}

/// Folds a whole generation into the unary response.
pub async fn collect(mut generation: Generation) -> Result<pb::GenerateResponse, RequestError> {
    let mut response = pb::GenerateResponse::default();
    while let Some(message) = generation.next().await? {
        response.text.push_str(&message.text);
        response.tokens.extend(message.tokens);
        response.lines.extend(message.lines);
        if message.finish_reason != pb::FinishReason::Unspecified as i32 {
            response.finish_reason = message.finish_reason;
            response.usage = message.usage;
            response.entities = message.entities;
            response.timings = message.timings;
            response.prompt_token_ids = message.prompt_token_ids;
            response.clean_text = message.clean_text;
            response.seed = message.seed;
        }
    }
    Ok(response)
}
