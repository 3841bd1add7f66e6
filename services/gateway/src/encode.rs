//! Image embeddings for a request: the cache first, then the encoder pool for the misses, one `Encode` per
//! distinct image, all concurrently, each retried on another replica when one fails.
//!
//! Repeated images within a request are encoded once (deduplicated by content hash). Encoded embeddings are
//! checked (fingerprint, shape, byte length) before they are cached or forwarded, so a misbehaving replica costs a
//! retry rather than a decoder-side error.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use kosmos_proto::encoder::v1 as enc;
use kosmos_proto::tensor::v1::{DType, Tensor};
use tokio::task::JoinSet;
use tonic::Code;
use tracing::Instrument as _;

use crate::cache::{CacheKey, ContentHash, EmbeddingCache};
use crate::domain::ValidImage;
use crate::error::RequestError;
use crate::pool::Pool;
use crate::upstream::ModelInfo;

/// Calls the encoder pool through the embedding cache.
#[derive(Debug, Clone)]
pub struct ImageEncoder {
    pool: Pool,
    cache: Arc<EmbeddingCache>,
    max_message_bytes: usize,
}

/// One embedding per image of the request, in order, and whether each came from the cache.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// `[num_image_tokens, hidden_size]` tensors, one per image in order of appearance.
    pub tensors: Vec<Arc<Tensor>>,
    /// Images served by the cache (or by an identical image earlier in the same request).
    pub cached: usize,
}

impl ImageEncoder {
    /// An encoder client over `pool` and `cache`.
    pub fn new(pool: Pool, cache: Arc<EmbeddingCache>, max_message_bytes: usize) -> Self {
        Self {
            pool,
            cache,
            max_message_bytes,
        }
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<EmbeddingCache> {
        &self.cache
    }

    /// The embedding of every image of a request; `deadline` bounds every call.
    pub async fn embeddings(
        &self,
        images: &[ValidImage],
        model: &ModelInfo,
        deadline: Option<Instant>,
    ) -> Result<Embeddings, RequestError> {
        let mut found: HashMap<ContentHash, Arc<Tensor>> = HashMap::new();
        let mut calls: JoinSet<(ContentHash, Result<Arc<Tensor>, RequestError>)> = JoinSet::new();
        let mut cached = 0;
        for image in images {
            if found.contains_key(&image.hash) {
                cached += 1;
                continue;
            }
            let key = CacheKey {
                hash: image.hash,
                fingerprint: model.fingerprint.clone(),
            };
            if let Some(embedding) = self.cache.get(&key) {
                found.insert(image.hash, embedding);
                cached += 1;
                continue;
            }
            // Placeholder so a repeat of this image later in the request waits for this call.
            found.insert(image.hash, Arc::new(Tensor::default()));
            let this = self.clone();
            let image = image.clone();
            let model = model.clone();
            let span = tracing::info_span!(
                "gateway.encode",
                image.segment = image.segment,
                image.bytes = image.data.len()
            );
            calls.spawn(
                async move {
                    let result = this.encode_with_retries(&image, &model, deadline).await;
                    (image.hash, result)
                }
                .instrument(span),
            );
        }
        // Dropping `calls` (the caller went away, or one image failed) aborts every call still running.
        while let Some(joined) = calls.join_next().await {
            let (hash, result) = joined
                .map_err(|err| RequestError::Internal(format!("encode task failed: {err}")))?;
            let embedding = result?;
            self.cache.insert(
                CacheKey {
                    hash,
                    fingerprint: model.fingerprint.clone(),
                },
                embedding.clone(),
            );
            found.insert(hash, embedding);
        }
        let tensors = images
            .iter()
            .map(|image| {
                found.get(&image.hash).cloned().ok_or_else(|| {
                    RequestError::Internal("an image's embedding went missing".into())
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Embeddings { tensors, cached })
    }

    async fn encode_with_retries(
        &self,
        image: &ValidImage,
        model: &ModelInfo,
        deadline: Option<Instant>,
    ) -> Result<Arc<Tensor>, RequestError> {
        let max_attempts = self.pool.config().max_attempts.get();
        let mut tried = Vec::new();
        let mut last_error = String::from("no replica");
        for attempt in 0..max_attempts {
            let Some(replica) = self.pool.pick(&tried) else {
                break;
            };
            tried.push(replica.clone());
            let timeout = call_timeout(deadline, self.pool.config().call_timeout)
                .ok_or(RequestError::DeadlineExceeded("encoding the images"))?;
            let mut guard = self.pool.begin_with_images(replica.clone(), attempt, 1);
            let mut client =
                enc::vision_encoder_client::VisionEncoderClient::new(replica.channel())
                    .max_decoding_message_size(self.max_message_bytes)
                    .max_encoding_message_size(self.max_message_bytes);
            let mut request = tonic::Request::new(enc::EncodeRequest {
                images: vec![enc::Image {
                    data: image.data.as_ref().clone(),
                    mime_type: image.mime_type().to_string(),
                }],
                dtype: DType::DtypeF32 as i32,
            });
            request.set_timeout(timeout);
            let answer = tokio::time::timeout(timeout, client.encode(request)).await;
            let status = match answer {
                Ok(Ok(response)) => {
                    guard.responded();
                    match check_embedding(response.into_inner(), model) {
                        Ok(embedding) => return Ok(Arc::new(embedding)),
                        Err(problem) => {
                            guard.failed(true);
                            tracing::warn!(replica = replica.address(), %problem, "encoder answered unusable embeddings");
                            last_error = format!("{}: {problem}", replica.address());
                            continue;
                        }
                    }
                }
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded("encode call timed out"),
            };
            match status.code() {
                // The image itself is bad: no other replica would take it.
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                    guard.failed(false);
                    return Err(RequestError::invalid(format!(
                        "`prompt[{}].image.data`: {}",
                        image.segment,
                        status.message()
                    )));
                }
                Code::DeadlineExceeded if deadline.is_some_and(|d| Instant::now() >= d) => {
                    guard.failed(false);
                    return Err(RequestError::DeadlineExceeded("encoding the images"));
                }
                code => {
                    // Overload is the replica's state, not a fault: keep it in rotation but try another.
                    guard.failed(code != Code::ResourceExhausted);
                    tracing::warn!(
                        replica = replica.address(),
                        attempt,
                        code = ?code,
                        message = status.message(),
                        "encode failed, trying another replica"
                    );
                    last_error = format!("{}: {:?}: {}", replica.address(), code, status.message());
                }
            }
        }
        Err(RequestError::Unavailable {
            pool: "encoder",
            message: format!(
                "no replica could encode `prompt[{}].image` ({last_error})",
                image.segment
            ),
        })
    }
}

/// The time a downstream call may take: what is left of the caller's deadline, bounded by the pool's call
/// timeout. `None` when the deadline has passed.
pub fn call_timeout(
    deadline: Option<Instant>,
    pool_timeout: Option<std::time::Duration>,
) -> Option<std::time::Duration> {
    // With neither bound, a day stands for "unbounded" (tonic needs a finite grpc-timeout to send one).
    let unbounded = std::time::Duration::from_secs(24 * 3600);
    let left = match deadline {
        Some(deadline) => {
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            left
        }
        None => unbounded,
    };
    Some(pool_timeout.map_or(left, |bound| bound.min(left)))
}

fn check_embedding(response: enc::EncodeResponse, model: &ModelInfo) -> Result<Tensor, String> {
    if *response.model_fingerprint != *model.fingerprint {
        return Err(format!(
            "fingerprint `{}` differs from the decoders' `{}`",
            response.model_fingerprint, model.fingerprint
        ));
    }
    let count = response.embeddings.len();
    let Some(embedding) = response
        .embeddings
        .into_iter()
        .next()
        .filter(|_| count == 1)
    else {
        return Err(format!("{count} embeddings for one image"));
    };
    let expected = [model.num_image_tokens as u64, model.hidden_size as u64];
    kosmos_runtime::tensor::check(&embedding, Some(&expected)).map_err(|err| err.to_string())?;
    Ok(embedding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_timeouts_take_the_tighter_bound_and_refuse_a_passed_deadline() {
        let soon = Instant::now() + std::time::Duration::from_secs(1);
        let bounded =
            call_timeout(Some(soon), Some(std::time::Duration::from_secs(10))).expect("time left");
        assert!(bounded <= std::time::Duration::from_secs(1));
        let pool_bound =
            call_timeout(None, Some(std::time::Duration::from_secs(3))).expect("no deadline");
        assert_eq!(pool_bound, std::time::Duration::from_secs(3));
        let past = Instant::now() - std::time::Duration::from_millis(1);
        assert_eq!(call_timeout(Some(past), None), None);
    }
}
