//! A full batching queue answers RESOURCE_EXHAUSTED, naming the limit.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use kosmos_proto::tensor::v1::DType;

use crate::common::{TestServer, png, request};

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_and_recovers() -> Result<()> {
    // One image fills the queue, and it stays queued for a second while its batch waits for company.
    let server = TestServer::start(&[
        "limits.max_images_per_request=1",
        "batching.max_queued_images=1",
        "batching.max_batch_images=4",
        "batching.max_queue_delay_seconds=1.0",
    ])
    .await?;
    let mut client = server.client.clone();
    let first = request(vec![png(20, 20, 1)?], DType::DtypeUnspecified);
    let waiting = tokio::spawn(async move { client.encode(first).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    match server
        .encode(request(vec![png(20, 20, 2)?], DType::DtypeUnspecified))
        .await
    {
        Ok(_) => bail!("the second image was admitted to a full queue"),
        Err(status) => {
            ensure!(
                status.code() == tonic::Code::ResourceExhausted,
                "code {:?}: {}",
                status.code(),
                status.message()
            );
            ensure!(
                status.message().contains("max_queued_images 1"),
                "{}",
                status.message()
            );
        }
    }
    let first = waiting.await??.into_inner();
    ensure!(first.embeddings.len() == 1, "the queued call completes");
    server.assert_serves_a_good_request().await?;
    server.stop().await
}
