//! Score against the decoder called directly with the same context and candidates.

use kosmos_e2e::{Cluster, ClusterOptions, fixture_image, image, text};
use kosmos_proto::decoder::v1 as dec;
use kosmos_proto::encoder::v1 as enc;
use kosmos_proto::v1 as pb;

use crate::IMAGE;

/// Splits prompt ids at the image placeholder runs (`first..first + count`), putting `embedding` there.
fn decoder_context(
    ids: &[u32],
    first: u32,
    count: usize,
    embedding: &enc::EncodeResponse,
) -> Vec<dec::Segment> {
    let mut segments = Vec::new();
    let mut run = Vec::new();
    let mut index = 0;
    let mut image_index = 0;
    while index < ids.len() {
        let is_block = index + count <= ids.len()
            && (0..count).all(|offset| ids[index + offset] == first + offset as u32);
        if is_block {
            if !run.is_empty() {
                segments.push(dec::Segment {
                    kind: Some(dec::segment::Kind::Tokens(dec::TokenIds {
                        ids: std::mem::take(&mut run),
                    })),
                });
            }
            segments.push(dec::Segment {
                kind: Some(dec::segment::Kind::Image(dec::ImageEmbedding {
                    embedding: embedding.embeddings.get(image_index).cloned(),
                    model_fingerprint: embedding.model_fingerprint.clone(),
                })),
            });
            image_index += 1;
            index += count;
        } else {
            run.push(ids[index]);
            index += 1;
        }
    }
    if !run.is_empty() {
        segments.push(dec::Segment {
            kind: Some(dec::segment::Kind::Tokens(dec::TokenIds { ids: run })),
        });
    }
    segments
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_equals_the_decoders_direct_scores() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut client = cluster.client().await?;
    let picture = fixture_image(IMAGE);
    let candidates = vec![
        "a red circle".to_string(),
        "a cat".to_string(),
        "snow".to_string(),
    ];
    let response = client
        .score(pb::ScoreRequest {
            prompt: vec![image(picture.clone()), text("This is")],
            candidates: candidates.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(response.scores.len(), 3);

    let mut encoder = cluster.encoder(0).await?;
    let embedding = encoder
        .encode(enc::EncodeRequest {
            images: vec![enc::Image {
                data: picture,
                mime_type: String::new(),
            }],
            dtype: 0,
        })
        .await?
        .into_inner();
    let mut decoder = cluster.decoder().await?;
    let info = decoder.info(dec::InfoRequest {}).await?.into_inner();
    let context = decoder_context(
        &response.prompt_token_ids,
        info.image_placeholder_first_id,
        info.num_image_tokens as usize,
        &embedding,
    );
    let direct = decoder
        .score(dec::ScoreRequest {
            tenant: String::new(),
            context,
            candidates: response
                .scores
                .iter()
                .map(|score| dec::Candidate {
                    ids: score.token_ids.clone(),
                })
                .collect(),
        })
        .await?
        .into_inner();
    for ((mine, theirs), candidate) in response.scores.iter().zip(&direct.scores).zip(&candidates) {
        assert_eq!(&mine.candidate, candidate);
        assert!(!mine.token_ids.is_empty());
        assert_eq!(mine.token_logprobs.len(), mine.token_ids.len());
        for (a, b) in mine.token_logprobs.iter().zip(&theirs.token_logprobs) {
            assert!((a - b).abs() <= 1e-5, "{candidate}: {a} vs {b}");
        }
        assert!((mine.sum_logprob - theirs.sum_logprob).abs() <= 1e-4);
        assert!((mine.mean_logprob - theirs.mean_logprob).abs() <= 1e-4);
    }
    let best = response
        .scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.mean_logprob.total_cmp(&b.1.mean_logprob))
        .map(|(index, _)| index as u32);
    assert_eq!(Some(response.best_index), best);
    cluster.shutdown().await;
    Ok(())
}
