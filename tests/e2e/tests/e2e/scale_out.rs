//! The local scale-out check of the Kubernetes design: two encoder and two decoder replicas behind one gateway.
//! Under an image-heavy burst the gateway's own counters show the load spread over both replicas of each pool, and
//! the encoder pool's queue signal (`pending`, what its autoscaler reads, through its high-water mark) rising above
//! the decoder pool's; the gauges fall back to zero afterwards.

use kosmos_e2e::{Cluster, ClusterOptions, image, text};
use kosmos_testkit::metrics::{parse, scrape, value};

use crate::{distinct_png, greedy_request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_heavy_burst_spreads_over_both_replicas_and_queues_on_the_encoder_pool()
-> anyhow::Result<()> {
    const REQUESTS: u32 = 12;
    const IMAGES_PER_REQUEST: u32 = 4;
    let cluster = Cluster::start(ClusterOptions {
        encoders: 2,
        decoders: 2,
        // A batching window long enough that encode calls wait (as on a busy GPU).
        encoder_overrides: vec!["batching.max_queue_delay_seconds=0.25".into()],
        gateway_overrides: vec!["cache.capacity_bytes=0".into()],
        ..ClusterOptions::default()
    })
    .await?;
    let before = cluster.gateway().replica_calls();

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

    // What each replica took, as the gateway counted its calls (one Encode per distinct image, one Generate per
    // request, no retries in a healthy cluster).
    let (encoder_calls, decoder_calls) = cluster.gateway().replica_calls();
    let taken = |now: &[u64], then: &[u64]| -> Vec<u64> {
        now.iter().zip(then).map(|(now, then)| now - then).collect()
    };
    let (encoded, generated) = (
        taken(&encoder_calls, &before.0),
        taken(&decoder_calls, &before.1),
    );
    let stats = cluster.gateway().stats();
    eprintln!(
        "encode calls per replica {encoded:?}, generate calls per replica {generated:?}; pending peak: encoder \
         {} calls ({} images), decoder {} calls",
        stats.encoder.pending_peak, stats.encoder.pending_images_peak, stats.decoder.pending_peak
    );
    let total_images = u64::from(REQUESTS * IMAGES_PER_REQUEST);
    assert_eq!(encoded.iter().sum::<u64>(), total_images);
    assert_eq!(generated.iter().sum::<u64>(), u64::from(REQUESTS));
    // Power of two choices on in-flight calls: each of two replicas takes at least a quarter of its pool's calls.
    assert!(
        encoded.iter().all(|&calls| 4 * calls >= total_images),
        "an encoder replica took less than a quarter of the images: {encoded:?}"
    );
    assert!(
        generated
            .iter()
            .all(|&calls| 4 * calls >= u64::from(REQUESTS)),
        "a decoder replica took less than a quarter of the generations: {generated:?}"
    );
    // Every image of a request is sent at once and waits for its batch: the encoder pool's queue signal rises to
    // at least one call per request, above the decoder pool's.
    assert!(
        stats.encoder.pending_peak >= u64::from(REQUESTS),
        "the encoder pool's pending calls peaked at {}",
        stats.encoder.pending_peak
    );
    assert!(
        stats.encoder.pending_peak > stats.decoder.pending_peak,
        "the encoder pool's queue (peak {}) should exceed the decoder pool's (peak {})",
        stats.encoder.pending_peak,
        stats.decoder.pending_peak
    );

    // The gauges the autoscalers read return to zero once the burst is served.
    let scraped = parse(&scrape(cluster.gateway_metrics_addr).await?)?;
    for (metric, pool) in [
        ("kosmos_gateway_pool_pending_requests", "encoder"),
        ("kosmos_gateway_pool_pending_images", "encoder"),
        ("kosmos_gateway_pool_pending_requests", "decoder"),
    ] {
        assert_eq!(
            value(&scraped, metric, &[("pool", pool)]),
            0.0,
            "{metric}{{pool={pool}}}"
        );
    }
    cluster.shutdown().await;
    Ok(())
}
