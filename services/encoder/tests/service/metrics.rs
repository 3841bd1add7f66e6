//! `/metrics` after known traffic: the counts are right, and the families are exactly the encoder's rows of
//! `docs/metrics.md` (names, types, help texts, labels); `promtool check metrics` accepts the text.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use kosmos_proto::tensor::v1::DType;

use crate::common::{TestServer, png, png_claiming, request};
use crate::metrics_catalogue::{assert_matches_catalogue, parse, promtool_check, scrape, value};

const ENCODE: &str = "kosmos.encoder.v1.VisionEncoder/Encode";

fn calls(scrape: &prometheus_parse::Scrape, code: &str) -> f64 {
    value(
        scrape,
        "rpc_server_call_duration_seconds_count",
        &[("rpc_method", ENCODE), ("rpc_response_status_code", code)],
    )
}

#[tokio::test]
async fn metrics_count_the_traffic_and_match_the_catalogue() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    // Three images in two calls.
    let two = server
        .encode(request(
            vec![png(40, 30, 1)?, png(30, 40, 2)?],
            DType::DtypeUnspecified,
        ))
        .await?;
    ensure!(two.embeddings.len() == 2, "two embeddings");
    server
        .encode(request(vec![png(33, 33, 3)?], DType::DtypeUnspecified))
        .await?;
    // One image refused by the cheap checks (not an image), one by the header check on the blocking pool.
    for (bad, expected) in [
        (
            b"definitely not an image".to_vec(),
            "not a JPEG, PNG or WebP image",
        ),
        (png_claiming(100_000, 10)?, "`limits.max_image_width`"),
    ] {
        match server
            .encode(request(vec![bad], DType::DtypeUnspecified))
            .await
        {
            Ok(_) => bail!("a bad image was accepted"),
            Err(status) => ensure!(status.message().contains(expected), "{status:?}"),
        }
    }
    let fingerprint = server.info().await?.model_fingerprint;

    // A call is recorded when its last frame is written: wait until the scrape shows all four.
    let started = Instant::now();
    let (text, scraped) = loop {
        let text = scrape(server.metrics_addr).await?;
        let scraped = parse(&text)?;
        if calls(&scraped, "OK") + calls(&scraped, "INVALID_ARGUMENT") >= 4.0
            || started.elapsed() > Duration::from_secs(10)
        {
            break (text, scraped);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let get = |metric: &str, labels: &[(&str, &str)]| value(&scraped, metric, labels);

    ensure!(calls(&scraped, "OK") == 2.0, "OK calls\n{text}");
    ensure!(
        calls(&scraped, "INVALID_ARGUMENT") == 2.0,
        "refused calls\n{text}"
    );
    ensure!(
        get("kosmos_encoder_images_encoded_total", &[]) == 3.0,
        "{text}"
    );
    let batches = get("kosmos_encoder_batch_executions_total", &[]);
    ensure!((1.0..=3.0).contains(&batches), "batches {batches}\n{text}");
    ensure!(
        get("kosmos_encoder_batch_size_count", &[]) == batches,
        "{text}"
    );
    ensure!(get("kosmos_encoder_batch_size_sum", &[]) == 3.0, "{text}");
    ensure!(
        get("kosmos_encoder_encode_time_seconds_count", &[]) == batches,
        "{text}"
    );
    ensure!(
        get("kosmos_encoder_queue_time_seconds_count", &[]) == 3.0,
        "{text}"
    );
    ensure!(
        get("kosmos_encoder_image_decode_time_seconds_count", &[]) == 3.0,
        "{text}"
    );
    ensure!(
        get("kosmos_encoder_image_preprocess_time_seconds_count", &[]) == 3.0,
        "{text}"
    );
    for (reason, expected) in [
        ("format", 1.0),
        ("width", 1.0),
        ("bytes", 0.0),
        ("decode", 0.0),
    ] {
        let rejected = get(
            "kosmos_encoder_images_rejected_total",
            &[("reason", reason)],
        );
        ensure!(
            rejected == expected,
            "rejected {reason}: {rejected}\n{text}"
        );
    }
    ensure!(get("kosmos_encoder_queue_images", &[]) == 0.0, "{text}");
    let info = [
        ("service", "encoder"),
        ("model", "tiny"),
        ("model_fingerprint", fingerprint.as_str()),
    ];
    ensure!(get("kosmos_build_info", &info) == 1.0, "{text}");

    assert_matches_catalogue(&text, "encoder")?;
    promtool_check(&text)?;
    server.stop().await
}
