//! A call whose deadline passes while it waits for the engine is answered DEADLINE_EXCEEDED, and its image is
//! never computed.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use kosmos_proto::tensor::v1::DType;

use crate::common::{TestServer, png, request};

#[tokio::test]
async fn an_expired_deadline_is_answered_deadline_exceeded_without_compute() -> Result<()> {
    // The first image of a batch waits up to 1.5 s for company: far past the 400 ms deadline.
    let server = TestServer::start(&[
        "batching.max_queue_delay_seconds=1.5",
        "batching.max_batch_images=16",
    ])
    .await?;
    let mut late = tonic::Request::new(request(vec![png(20, 20, 1)?], DType::DtypeUnspecified));
    late.set_timeout(Duration::from_millis(400));
    match server.client.clone().encode(late).await {
        Ok(_) => bail!("the call outlived its deadline"),
        Err(status) => ensure!(
            status.code() == tonic::Code::DeadlineExceeded,
            "code {:?}: {}",
            status.code(),
            status.message()
        ),
    }
    let info = server.info().await?;
    ensure!(
        info.images_encoded == 0 && info.batches_executed == 0,
        "{info:?}"
    );
    // This call joins the batch window the expired one opened; only its own image may be computed.
    server.assert_serves_a_good_request().await?;
    let info = server.info().await?;
    ensure!(
        info.images_encoded == 1 && info.batches_executed == 1,
        "the expired image was computed: {} images in {} batches",
        info.images_encoded,
        info.batches_executed
    );
    server.stop().await
}
