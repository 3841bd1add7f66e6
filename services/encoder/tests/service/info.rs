//! Info describes the model, the limits and the batching settings.

use anyhow::{Result, ensure};
use kosmos_proto::tensor::v1::DType;

use crate::common::{DirectModel, TestServer};

#[tokio::test]
async fn info_reports_the_model_the_limits_and_the_batching_settings() -> Result<()> {
    let server = TestServer::start(&[
        "limits.max_image_width=1000",
        "limits.formats=[\"png\", \"jpeg\"]",
        "batching.max_batch_images=8",
        "batching.max_queue_delay_seconds=0.02",
    ])
    .await?;
    let info = server.info().await?;
    ensure!(
        info.model_fingerprint == DirectModel::load()?.fingerprint,
        "fingerprint"
    );
    ensure!(
        info.image_size == 32 && info.tokens_per_image == 3 && info.hidden_size == 32,
        "{info:?}"
    );
    ensure!(
        info.device == "cpu" && info.weights_dtype == DType::DtypeF32 as i32,
        "{info:?}"
    );
    let limits = info.limits.clone().unwrap_or_default();
    ensure!(
        limits.max_width == 1000 && limits.max_image_bytes == 20 << 20,
        "{limits:?}"
    );
    ensure!(
        limits.formats == vec!["image/png", "image/jpeg"],
        "{limits:?}"
    );
    let batching = info.batching.unwrap_or_default();
    ensure!(
        batching.max_batch_images == 8 && batching.max_queued_images == 256,
        "{batching:?}"
    );
    ensure!(
        (batching.max_queue_delay_seconds - 0.02).abs() < 1e-9,
        "{batching:?}"
    );
    ensure!(
        info.batches_executed == 0 && info.images_encoded == 0,
        "{info:?}"
    );
    server.stop().await
}
