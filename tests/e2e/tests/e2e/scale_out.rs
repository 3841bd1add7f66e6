//! The local scale-out check of the Kubernetes design: two encoder and two decoder replicas behind one gateway.
//! Under an image-heavy burst the load spreads over both replicas of each pool, and the encoder pool's queue signal
//! (`kosmos_gateway_pool_pending_requests` and `…_pending_images`, what its autoscaler reads) rises while the
//! decoder pool's stays low; both fall back to zero afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kosmos_e2e::{Cluster, ClusterOptions, image, text};
use kosmos_runtime::testing::metrics::{parse, scrape, value};

use crate::{distinct_png, greedy_request};

/// One sample of the gateway's per-pool queue gauges.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    encoder_pending: f64,
    encoder_images: f64,
    decoder_pending: f64,
}

async fn sample(addr: std::net::SocketAddr) -> anyhow::Result<Sample> {
    let scraped = parse(&scrape(addr).await?)?;
    let pending = |pool| {
        value(
            &scraped,
            "kosmos_gateway_pool_pending_requests",
            &[("pool", pool)],
        )
    };
    Ok(Sample {
        encoder_pending: pending("encoder"),
        encoder_images: value(
            &scraped,
            "kosmos_gateway_pool_pending_images",
            &[("pool", "encoder")],
        ),
        decoder_pending: pending("decoder"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_heavy_burst_raises_only_the_encoder_pools_queue_signal() -> anyhow::Result<()> {
    const REQUESTS: u32 = 12;
    const IMAGES_PER_REQUEST: u32 = 4;
    let cluster = Cluster::start(ClusterOptions {
        encoders: 2,
        decoders: 2,
        // A batching window long enough that encode calls visibly wait (as on a busy GPU).
        encoder_overrides: vec!["batching.max_queue_delay=0.25".into()],
        gateway_overrides: vec!["cache.capacity_bytes=0".into()],
        ..ClusterOptions::default()
    })
    .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let addr = cluster.gateway_metrics_addr;
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push(sample(addr).await?);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(samples)
        })
    };
    let mut burst = tokio::task::JoinSet::new();
    for request in 0..REQUESTS {
        let mut client = cluster.client().await?;
        let mut prompt = Vec::new();
        for index in 0..IMAGES_PER_REQUEST {
            prompt.push(image(distinct_png(
                request * IMAGES_PER_REQUEST + index + 100,
            )));
        }
        prompt.push(text("Which is brightest?"));
        burst.spawn(async move { client.generate(greedy_request(prompt, 1)).await });
    }
    while let Some(done) = burst.join_next().await {
        done??;
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await??;
    let after = sample(cluster.gateway_metrics_addr).await?;

    let max = |f: fn(&Sample) -> f64| samples.iter().map(f).fold(0.0, f64::max);
    let mean = |f: fn(&Sample) -> f64| samples.iter().map(f).sum::<f64>() / samples.len() as f64;
    let (encoder_max, images_max, decoder_max) = (
        max(|s| s.encoder_pending),
        max(|s| s.encoder_images),
        max(|s| s.decoder_pending),
    );
    let (encoder_mean, decoder_mean) = (mean(|s| s.encoder_pending), mean(|s| s.decoder_pending));
    eprintln!(
        "{} samples: encoder pending max {encoder_max} mean {encoder_mean:.2} (images max {images_max}); \
         decoder pending max {decoder_max} mean {decoder_mean:.2}",
        samples.len()
    );
    assert!(
        encoder_max >= f64::from(REQUESTS),
        "the encoder pool's pending calls should rise to at least one per request, peaked at {encoder_max}"
    );
    assert!(
        images_max >= f64::from(REQUESTS),
        "pending images peaked at {images_max}"
    );
    assert!(
        encoder_mean > 3.0 * decoder_mean.max(0.1),
        "the encoder pool's queue (mean {encoder_mean:.2}) should dominate the decoder pool's (mean {decoder_mean:.2})"
    );
    assert_eq!(
        (
            after.encoder_pending,
            after.encoder_images,
            after.decoder_pending
        ),
        (0.0, 0.0, 0.0),
        "the gauges return to zero"
    );

    // Both replicas of each pool took part of the load.
    let total = f64::from(REQUESTS * IMAGES_PER_REQUEST);
    let mut encoded = Vec::new();
    for addr in &cluster.encoder_metrics_addrs {
        let scraped = parse(&scrape(*addr).await?)?;
        encoded.push(value(&scraped, "kosmos_encoder_images_encoded_total", &[]));
    }
    let mut generated = Vec::new();
    for addr in &cluster.decoder_metrics_addrs {
        let scraped = parse(&scrape(*addr).await?)?;
        generated.push(value(
            &scraped,
            "rpc_server_call_duration_seconds_count",
            &[
                ("rpc_method", "kosmos.decoder.v1.Decoder/Generate"),
                ("rpc_response_status_code", "OK"),
            ],
        ));
    }
    eprintln!(
        "images per encoder replica {encoded:?}, generations per decoder replica {generated:?}"
    );
    assert_eq!(encoded.iter().sum::<f64>(), total);
    assert!(
        encoded.iter().all(|&n| n > 0.0),
        "an encoder replica got nothing: {encoded:?}"
    );
    assert_eq!(generated.iter().sum::<f64>(), f64::from(REQUESTS));
    assert!(
        generated.iter().all(|&n| n > 0.0),
        "a decoder replica got nothing: {generated:?}"
    );
    cluster.shutdown().await;
    Ok(())
}
