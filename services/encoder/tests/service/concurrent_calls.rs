//! Concurrent callers are batched together and each gets its own embedding back.

use anyhow::{Result, ensure};
use kosmos_proto::tensor::v1::DType;

use crate::common::{DirectModel, TestServer, encode_as, max_abs_diff, request};

/// Image `seed` of the test: its own base colour and gradient, so that every pair differs a lot.
fn distinct_image(seed: u32) -> Result<Vec<u8>> {
    let image = image::RgbImage::from_fn(40, 36, |x, y| {
        image::Rgb([
            (seed * 8) as u8,
            ((x * 6) as u8) ^ (seed as u8).wrapping_mul(37),
            (y * 7 + seed * 3) as u8,
        ])
    });
    encode_as(&image, image::ImageFormat::Png)
}

#[tokio::test]
async fn thirty_two_concurrent_calls_each_get_their_own_embedding_and_share_batches() -> Result<()>
{
    let server = TestServer::start(&[
        "batching.max_queue_delay_seconds=0.05",
        "batching.max_batch_images=16",
        "batching.max_queued_images=64",
    ])
    .await?;
    let direct = DirectModel::load()?;
    let images: Vec<Vec<u8>> = (0..32).map(distinct_image).collect::<Result<_>>()?;
    let expected: Vec<Vec<f32>> = images
        .iter()
        .map(|bytes| direct.embedding(bytes))
        .collect::<Result<_>>()?;
    // Distinct images have embeddings at least 10x the tolerance apart, so a mix-up cannot pass the comparison.
    let mut closest_pair = f32::INFINITY;
    for (index, embedding) in expected.iter().enumerate() {
        for other in &expected[index + 1..] {
            closest_pair = closest_pair.min(max_abs_diff(embedding, other)?);
        }
    }
    ensure!(
        closest_pair > 1e-5,
        "two test images have embeddings {closest_pair} apart"
    );
    let mut calls = tokio::task::JoinSet::new();
    for (index, bytes) in images.iter().enumerate() {
        let mut client = server.client.clone();
        let call = request(vec![bytes.clone()], DType::DtypeF32);
        calls.spawn(async move { (index, client.encode(call).await) });
    }
    let mut largest_batch = 0;
    while let Some(joined) = calls.join_next().await {
        let (index, response) = joined?;
        let response = response?.into_inner();
        let served = kosmos_runtime::tensor::to_f32(&response.embeddings[0], Some(&[3, 32]))?;
        let difference = max_abs_diff(&served, &expected[index])?;
        ensure!(
            difference <= 1e-6,
            "call {index}: differs from its own image by {difference}"
        );
        largest_batch = largest_batch.max(response.timings.unwrap_or_default().batch_size);
    }
    let info = server.info().await?;
    ensure!(
        info.images_encoded == 32,
        "images_encoded {}",
        info.images_encoded
    );
    ensure!(
        info.batches_executed < info.images_encoded,
        "no batching: {} batches for {} images",
        info.batches_executed,
        info.images_encoded
    );
    ensure!(largest_batch > 1, "every call reports a batch of one");
    server.stop().await
}
