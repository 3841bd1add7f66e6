//! Image embeddings for a request: the cache first, then the encoder pool for the misses, one `Encode` per
//! distinct image, all concurrently, each through the pool's call policy ([`crate::call`]).
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
use tracing::Instrument as _;

use crate::cache::{CacheKey, ContentHash, EmbeddingCache};
use crate::call::CallContext;
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
        tenant: &str,
    ) -> Result<Embeddings, RequestError> {
        let tenant: Arc<str> = Arc::from(tenant);
        let mut found: HashMap<ContentHash, Arc<Tensor>> = HashMap::new();
        let mut calls: JoinSet<(ContentHash, Result<Arc<Tensor>, RequestError>)> = JoinSet::new();
        let mut cached = 0;
        for image in images {
            if found.contains_key(&image.hash) {
                cached += 1;
                continue;
            }
            let key = CacheKey {
                tenant: tenant.clone(),
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
                    let result = this.encode_one(&image, &model, deadline).await;
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
                    tenant: tenant.clone(),
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

    /// One image through the pool's call policy; an answer that is not one usable embedding counts as the
    /// replica's failure and is retried on another.
    async fn encode_one(
        &self,
        image: &ValidImage,
        model: &ModelInfo,
        deadline: Option<Instant>,
    ) -> Result<Arc<Tensor>, RequestError> {
        let context = CallContext {
            stage: "encoding the images",
            subject: format!("`prompt[{}].image.data`", image.segment),
            images: 1,
            model: Some(model.fingerprint.clone()),
        };
        let max_message_bytes = self.max_message_bytes;
        let (embedding, mut guard) = self
            .pool
            .call(&context, deadline, |channel, timeout| {
                let mut client = enc::vision_encoder_client::VisionEncoderClient::new(channel)
                    .max_decoding_message_size(max_message_bytes)
                    .max_encoding_message_size(max_message_bytes);
                let mut request = tonic::Request::new(enc::EncodeRequest {
                    images: vec![enc::Image {
                        data: image.data.as_ref().clone(),
                        mime_type: image.mime_type().to_string(),
                    }],
                    dtype: DType::DtypeF32 as i32,
                });
                request.set_timeout(timeout);
                async move {
                    let response = client.encode(request).await?.into_inner();
                    check_embedding(response, model).map_err(|problem| {
                        tonic::Status::internal(format!("unusable embeddings: {problem}"))
                    })
                }
            })
            .await?;
        guard.responded();
        Ok(Arc::new(embedding))
    }
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
