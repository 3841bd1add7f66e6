//! Readiness, startup failures and graceful shutdown.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use kosmos_encoder::{EncoderConfig, StartError};
use kosmos_proto::tensor::v1::DType;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::{TestServer, png, request};

#[tokio::test]
async fn readiness_is_serving_once_the_model_is_loaded() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    ensure!(
        server.readiness().await? == ServingStatus::Serving as i32,
        "readiness"
    );
    server.assert_serves_a_good_request().await?;
    server.stop().await
}

#[tokio::test]
async fn shutdown_lets_the_call_in_flight_finish() -> Result<()> {
    let server = TestServer::start(&["batching.max_queue_delay_seconds=0.5"]).await?;
    let mut client = server.client.clone();
    let call = request(vec![png(20, 20, 3)?], DType::DtypeUnspecified);
    let in_flight = tokio::spawn(async move { client.encode(call).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.shutdown().trigger();
    let response = in_flight.await??.into_inner();
    ensure!(
        response.embeddings.len() == 1,
        "the call in flight completes"
    );
    tokio::time::timeout(Duration::from_secs(10), server.join()).await??;
    Ok(())
}

#[tokio::test]
async fn a_missing_model_directory_fails_startup_naming_it() -> Result<()> {
    let config = EncoderConfig::from_overrides(&[
        "model_dir=/nonexistent/kosmos-model",
        "server.listen=127.0.0.1:0",
        "metrics.listen=127.0.0.1:0",
    ])?;
    match kosmos_encoder::bind(config).await {
        Ok(_) => bail!("started without a model"),
        Err(err @ StartError::Model { .. }) => {
            ensure!(
                err.to_string().contains("/nonexistent/kosmos-model"),
                "{err}"
            );
        }
        Err(other) => bail!("unexpected error: {other}"),
    }
    Ok(())
}
