//! Pools that have no replica: a request waits for one, counted as pending (the signal an autoscaler wakes a
//! pool scaled to zero by), and goes on when a replica starts; a gateway being stopped finishes its streams.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use kosmos_e2e::process::{Kind, Process, ProcessCluster, free_port};
use kosmos_e2e::{fixture_image, image, text, tiny_model_dir};
use kosmos_testkit::metrics as prom;

use crate::faults::{all, fault_free, replica_binary, sampled, stream};
use crate::{IMAGE, greedy_request};

/// The gateway's `kosmos_gateway_pool_{pending,waiting}_requests` of `pool`.
async fn pending_and_waiting(gateway: &Process, pool: &str) -> anyhow::Result<(f64, f64)> {
    let scrape = prom::parse(&prom::scrape(gateway.metrics_addr()).await?)?;
    Ok((
        prom::value(
            &scrape,
            "kosmos_gateway_pool_pending_requests",
            &[("pool", pool)],
        ),
        prom::value(
            &scrape,
            "kosmos_gateway_pool_waiting_requests",
            &[("pool", pool)],
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_decoder_pool_at_zero_waits_as_pending_and_ends_when_a_replica_starts()
-> anyhow::Result<()> {
    let model = tiny_model_dir();
    let binary = replica_binary();
    let mut encoder = Process::spawn(binary, Kind::Encoder, free_port()?, &model, &[])?;
    // The decoder pool's one address has no process yet: the pool is at zero.
    let decoder_port = free_port()?;
    let overrides = vec![
        format!("encoder.endpoints=[\"{}\"]", encoder.endpoint()),
        format!("decoder.endpoints=[\"http://127.0.0.1:{decoder_port}\"]"),
        "encoder.probe_interval_seconds=0.2".to_string(),
        "decoder.probe_interval_seconds=0.2".to_string(),
        "limits.max_waiting_for_replica_seconds=600".to_string(),
        "health.ready_without_decoders=true".to_string(),
    ];
    let mut gateway = Process::spawn(binary, Kind::Gateway, free_port()?, &model, &overrides)?;
    encoder.wait_serving("", Duration::from_secs(180)).await?;
    // Ready without a decoder, so that the requests that wake the pool reach it.
    gateway
        .wait_serving("readiness", Duration::from_secs(60))
        .await?;
    let mut client = gateway.client().await?;
    let call = tokio::spawn(async move {
        client
            .generate(greedy_request(
                vec![image(fixture_image(IMAGE)), text("An image of")],
                8,
            ))
            .await
    });
    let started = Instant::now();
    loop {
        let (pending, waiting) = pending_and_waiting(&gateway, "decoder").await?;
        if pending >= 1.0 && waiting >= 1.0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the waiting request never showed as pending (pending {pending}, waiting {waiting})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!call.is_finished(), "the request waits for a decoder");
    // The autoscaler's part: a decoder starts where the pool expects it.
    let mut decoder = Process::spawn(binary, Kind::Decoder, decoder_port, &model, &[])?;
    decoder.wait_serving("", Duration::from_secs(180)).await?;
    let answer = tokio::time::timeout(Duration::from_secs(120), call)
        .await??
        .map_err(|status| anyhow::anyhow!("the waiting request failed: {status}"))?
        .into_inner();
    assert!(answer.usage.expect("usage").completion_tokens > 0);
    assert_eq!(
        pending_and_waiting(&gateway, "decoder").await?,
        (0.0, 0.0),
        "nothing pending once served"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_stopped_mid_stream_finishes_its_streams_and_refuses_new_calls()
-> anyhow::Result<()> {
    let model = tiny_model_dir();
    let mut cluster = ProcessCluster::start(replica_binary(), &model, 1, 1, &[], &[]).await?;
    let client = cluster.gateway.client().await?;
    const STREAMS: usize = 6;
    let clean = fault_free(&client, STREAMS).await?;
    let started = Arc::new(AtomicUsize::new(0));
    let streams = tokio::spawn(all((0..STREAMS)
        .map(|index| stream(client.clone(), sampled(index), Arc::clone(&started)))
        .collect()));
    let waited = Instant::now();
    while started.load(std::sync::atomic::Ordering::SeqCst) < STREAMS {
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(60),
            "streams did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What Kubernetes does at a scale-in or a rollout, after the preStop sleep.
    cluster.gateway.terminate()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new call is refused once the gateway stops accepting (the connection, or the call on it).
    let late = async {
        match cluster.gateway.client().await {
            Err(_) => true,
            Ok(mut late) => late
                .generate(greedy_request(vec![text("Too late")], 4))
                .await
                .is_err_and(|status| status.code() == tonic::Code::Unavailable),
        }
    };
    let refused = tokio::time::timeout(Duration::from_secs(10), late)
        .await
        .unwrap_or(true);
    assert!(refused, "a call after SIGTERM is refused");
    let results = streams.await?;
    crate::faults::assert_same("stream", &results, &clean);
    let status = cluster.gateway.wait_exit(Duration::from_secs(60)).await?;
    assert!(
        status.success(),
        "the gateway exits cleanly after draining: {status}"
    );
    Ok(())
}
