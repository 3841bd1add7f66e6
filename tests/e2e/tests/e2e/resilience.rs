//! Cancellation, overload, replica loss, health.

use std::time::Duration;

use kosmos_e2e::{Cluster, ClusterOptions, fixture_image, image, text};
use kosmos_proto::decoder::v1 as dec;
use kosmos_proto::v1 as pb;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::{IMAGE, greedy_request};

/// A request that would run to the end of the context (it holds its slots while a test looks).
pub fn long_request() -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: vec![image(fixture_image(IMAGE)), text("Tell me everything")],
        params: Some(pb::GenerationParams {
            max_new_tokens: 480,
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        }),
        grounding: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_frees_its_decoder_slot() -> anyhow::Result<()> {
    let options = ClusterOptions {
        decoder_overrides: vec!["scheduler.max_running_sequences=1".into()],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await?;
    let mut client = cluster.client().await?;
    let mut decoder = cluster.decoder().await?;
    let before = decoder.info(dec::InfoRequest {}).await?.into_inner();

    let mut stream = client.generate_stream(long_request()).await?.into_inner();
    let first = stream.message().await?;
    assert!(first.is_some(), "the generation started");
    drop(stream);

    let mut freed = false;
    for _ in 0..200 {
        let info = decoder.info(dec::InfoRequest {}).await?.into_inner();
        if info.running_sequences == 0 && info.waiting_requests == 0 {
            freed = true;
            eprintln!("decoder after the cancel: {info:?}");
            assert!(
                info.cancelled_total > before.cancelled_total || info.kv_tokens_in_use == 0,
                "the sequence was cancelled or had finished: {info:?}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(freed, "the decoder slot was not freed");
    // The single slot takes the next request.
    let next = tokio::time::timeout(
        Duration::from_secs(30),
        client.generate(greedy_request(vec![text("Hello")], 4)),
    )
    .await??;
    assert!(!next.into_inner().tokens.is_empty());
    let stats = cluster.gateway().stats();
    assert_eq!((stats.decoder.in_flight, stats.requests_in_flight), (0, 0));
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_answers_resource_exhausted() -> anyhow::Result<()> {
    let options = ClusterOptions {
        gateway_overrides: vec!["limits.max_concurrent_requests=1".into()],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await?;
    let mut client = cluster.client().await?;
    let mut held = client.generate_stream(long_request()).await?.into_inner();
    let _ = held.message().await?;
    let refused = client
        .generate(greedy_request(vec![text("Hello")], 4))
        .await;
    let status = refused.expect_err("the only slot is taken");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_concurrent_requests"),
        "{status:?}"
    );
    drop(held);
    let mut served = false;
    for _ in 0..100 {
        if client
            .generate(greedy_request(vec![text("Hello")], 4))
            .await
            .is_ok()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the slot came back after the stream was dropped");
    assert!(cluster.gateway().stats().requests_rejected_total >= 1);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_encoders_mid_run_loses_no_request() -> anyhow::Result<()> {
    let options = ClusterOptions {
        encoders: 2,
        // No cache: every request goes to the encoder pool.
        gateway_overrides: vec!["cache.capacity_bytes=0".into()],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await?;
    let client = cluster.client().await?;
    let images = [
        "a_gradient_48x32.png",
        "b_shapes_32x64.jpg",
        "c_alpha_40x40.png",
        "e_blocks_64x64.png",
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..24 {
        let mut client = client.clone();
        let picture = fixture_image(images[index % images.len()]);
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(15 * index as u64)).await;
            let request = greedy_request(vec![image(picture), text("An image of")], 4);
            client.generate(request).await.map(|_| index)
        });
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    cluster.stop_encoder(0);
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Err(status) = joined? {
            failures.push(status);
        }
    }
    assert!(failures.is_empty(), "lost requests: {failures:?}");
    // Later requests still work on the surviving replica.
    let mut client = client;
    client
        .generate(greedy_request(
            vec![image(fixture_image(IMAGE)), text("x")],
            2,
        ))
        .await?;
    let stats = cluster.gateway().stats();
    eprintln!("gateway after losing an encoder: {stats:?}");
    assert_eq!(stats.encoder.in_flight, 0);
    cluster.shutdown().await;
    Ok(())
}

/// The three health statuses of a gateway at `addr`: `""`, `readiness`, `kosmos.v1.Kosmos`.
async fn health_of(addr: std::net::SocketAddr) -> anyhow::Result<[bool; 3]> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);
    let mut statuses = [false; 3];
    for (status, service) in statuses
        .iter_mut()
        .zip(["", "readiness", "kosmos.v1.Kosmos"])
    {
        *status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner()
            .status
            == ServingStatus::Serving as i32;
    }
    Ok(statuses)
}

/// A gateway in this process over the given pool endpoints (plus `overrides`), served until the returned stop
/// trips.
async fn gateway_over(
    encoder: &str,
    decoder: &str,
    overrides: &[&str],
) -> anyhow::Result<(
    std::net::SocketAddr,
    kosmos_gateway::GatewayHandle,
    kosmos_runtime::Shutdown,
    tokio::task::JoinHandle<Result<(), kosmos_runtime::ServeError>>,
)> {
    let mut all = vec![
        format!("model_dir={}", kosmos_e2e::tiny_model_dir().display()),
        "server.listen=127.0.0.1:0".into(),
        format!("encoder.endpoints=[\"{encoder}\"]"),
        format!("decoder.endpoints=[\"{decoder}\"]"),
        "encoder.probe_interval_seconds=0.2".into(),
        "decoder.probe_interval_seconds=0.2".into(),
        "metrics.listen=\"127.0.0.1:0\"".into(),
    ];
    all.extend(overrides.iter().map(|set| set.to_string()));
    let config = kosmos_gateway::GatewayConfig::load(&kosmos_runtime::config::Layers {
        overrides: all,
        ..Default::default()
    })?;
    let (bound, handle) = kosmos_gateway::bind(config).await?;
    let addr = bound.local_addr();
    let stop = kosmos_runtime::Shutdown::new();
    let server = tokio::spawn(bound.serve(stop.clone()));
    Ok((addr, handle, stop, server))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_is_the_process_and_readiness_follows_the_decoders() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    assert_eq!(health_of(cluster.gateway_addr).await?, [true, true, true]);
    let encoder = format!("http://{}", cluster.encoder_addrs[0]);
    let decoder = format!("http://{}", cluster.decoder_addrs[0]);
    // With a decoder that never answers the gateway is alive but not ready, and not serving its API.
    let (addr, handle, stop, server) = gateway_over(&encoder, "http://127.0.0.1:9", &[]).await?;
    assert!(!handle.wait_ready(Duration::from_millis(800)).await);
    assert_eq!(health_of(addr).await?, [true, false, false]);
    stop.trigger();
    server.await??;
    // A decoder pool that scales to zero: ready regardless, so the requests that wake the pool arrive.
    let (addr, _handle, stop, server) = gateway_over(
        &encoder,
        "http://127.0.0.1:9",
        &["health.ready_without_decoders=true"],
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(health_of(addr).await?, [true, true, false]);
    stop.trigger();
    server.await??;
    // With no encoder at all, the decoders make the gateway ready.
    let (addr, _handle, stop, server) = gateway_over("http://127.0.0.1:9", &decoder, &[]).await?;
    let started = std::time::Instant::now();
    while health_of(addr).await? != [true, true, true] {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.trigger();
    server.await??;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_encoder_text_is_served_and_images_fail_within_seconds() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let decoder = format!("http://{}", cluster.decoder_addrs[0]);
    // Port 9 (discard) has nothing listening: an encoder pool whose every replica is gone.
    let (addr, handle, stop, server) = gateway_over("http://127.0.0.1:9", &decoder, &[]).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = pb::kosmos_client::KosmosClient::new(channel);
    let started = std::time::Instant::now();
    let answer = loop {
        match client
            .generate(greedy_request(vec![text("A dog and a cat")], 6))
            .await
        {
            Ok(answer) => break answer.into_inner(),
            Err(status) if started.elapsed() < Duration::from_secs(30) => {
                eprintln!("not yet: {status}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => anyhow::bail!("text-only request failed: {status}"),
        }
    };
    assert!(answer.usage.expect("usage").completion_tokens > 0);
    let started = std::time::Instant::now();
    let status = client
        .generate(greedy_request(
            vec![image(fixture_image(IMAGE)), text("An image of")],
            6,
        ))
        .await
        .expect_err("no encoder");
    let took = started.elapsed();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(
        status.message().contains("encoder"),
        "the error names the pool: {status}"
    );
    assert!(took < Duration::from_secs(10), "failed after {took:?}");
    assert!(
        handle.stats().encoder.waiting == 0,
        "no call is left waiting"
    );
    stop.trigger();
    server.await??;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_is_deadline_exceeded() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut client = cluster.client().await?;
    let mut request = tonic::Request::new(long_request());
    request.set_timeout(Duration::from_millis(30));
    let status = client
        .generate(request)
        .await
        .expect_err("30 ms is too short for 480 tokens");
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = cluster.gateway().stats();
    assert_eq!(
        (stats.decoder.in_flight, stats.requests_in_flight),
        (0, 0),
        "nothing left behind"
    );
    cluster.shutdown().await;
    Ok(())
}
