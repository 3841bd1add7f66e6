//! Faults: replicas killed (SIGKILL) or stopped (SIGTERM) as separate processes while calls are in flight. A
//! killed decoder's generations resume on the other replica and end exactly as a fault-free run does; a killed
//! encoder's images are encoded by the other.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use kosmos_e2e::process::{Process, ProcessCluster};
use kosmos_e2e::{fixture_image, image, text, tiny_model_dir};
use kosmos_proto::decoder::v1 as dec;
use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_client::KosmosClient;
use kosmos_testkit::metrics as prom;
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::{IMAGE, distinct_png, greedy_request};

/// The replica binary this test binary's package builds.
pub fn replica_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kosmos-e2e-replica"))
}

fn caption() -> pb::GenerateRequest {
    greedy_request(vec![image(fixture_image(IMAGE)), text("An image of")], 12)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_encoder_restarts_on_its_port_and_serves_again() -> anyhow::Result<()> {
    let model = tiny_model_dir();
    let mut cluster = ProcessCluster::start(replica_binary(), &model, 1, 1, &[], &[]).await?;
    let mut client = cluster.gateway.client().await?;
    let before = client.generate(caption()).await?.into_inner();

    cluster.encoders[0].kill();
    cluster.encoders[0].restart()?;
    cluster.encoders[0]
        .wait_serving("", Duration::from_secs(120))
        .await?;
    // The gateway sees the replica again within a few probe intervals.
    let mut after = None;
    for _ in 0..100 {
        match client.generate(caption()).await {
            Ok(answer) => {
                after = Some(answer.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let after = after.expect("the gateway serves again after the encoder restarted");
    assert_eq!(after.text, before.text);
    Ok(())
}

/// Concurrent calls of each kind.
const CALLS: usize = 12;

/// A long seeded sampling generation with an image (the tiny model's outputs run long at temperature 1).
pub(crate) fn sampled(index: usize) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: vec![
            image(fixture_image(IMAGE)),
            text(&format!("Story number {index}:")),
        ],
        params: Some(pb::GenerationParams {
            max_new_tokens: 240,
            temperature: 1.0,
            top_k: 50,
            repetition_penalty: 1.1,
            seed: 500 + index as u64,
            ..Default::default()
        }),
        grounding: false,
    }
}

pub(crate) fn score(index: usize) -> pb::ScoreRequest {
    pb::ScoreRequest {
        prompt: vec![
            image(fixture_image(IMAGE)),
            text(&format!("Question {index}: what is it? Answer:")),
        ],
        candidates: ["a gradient", "a cat", "two red squares", "nothing at all"]
            .iter()
            .map(|candidate| format!("{candidate} {index}"))
            .collect(),
    }
}

/// What a generation delivered: ids (each once), text, the usage's completion count, the returned seed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Delivered {
    pub ids: Vec<u32>,
    pub text: String,
    pub completion_tokens: u32,
    pub seed: u64,
}

/// Reads a GenerateStream to its end; `started` is counted up once 5 tokens have arrived.
pub(crate) async fn stream(
    mut client: KosmosClient<Channel>,
    request: pb::GenerateRequest,
    started: Arc<AtomicUsize>,
) -> Result<Delivered, tonic::Status> {
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut delivered = Delivered {
        ids: Vec::new(),
        text: String::new(),
        completion_tokens: 0,
        seed: 0,
    };
    let mut counted = false;
    while let Some(message) = stream.message().await? {
        delivered
            .ids
            .extend(message.tokens.iter().map(|token| token.id));
        delivered.text.push_str(&message.text);
        if let Some(usage) = message.usage {
            delivered.completion_tokens = usage.completion_tokens;
            delivered.seed = message.seed;
        }
        if !counted && delivered.ids.len() >= 5 {
            counted = true;
            started.fetch_add(1, Ordering::SeqCst);
        }
    }
    if !counted {
        started.fetch_add(1, Ordering::SeqCst);
    }
    Ok(delivered)
}

pub(crate) async fn unary(
    mut client: KosmosClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<Delivered, tonic::Status> {
    let answer = client.generate(request).await?.into_inner();
    Ok(Delivered {
        ids: answer.tokens.iter().map(|token| token.id).collect(),
        text: answer.text,
        completion_tokens: answer.usage.map_or(0, |usage| usage.completion_tokens),
        seed: answer.seed,
    })
}

/// Runs every future of `calls` at once; their results in order.
pub(crate) async fn all<T: Send + 'static>(
    calls: Vec<impl std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static>,
) -> Vec<Result<T, tonic::Status>> {
    let mut set = JoinSet::new();
    for (index, call) in calls.into_iter().enumerate() {
        set.spawn(async move { (index, call.await) });
    }
    let mut results: Vec<Option<Result<T, tonic::Status>>> = (0..set.len()).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (index, result) = joined.expect("a call task");
        results[index] = Some(result);
    }
    results
        .into_iter()
        .map(|result| result.expect("every call answered"))
        .collect()
}

/// The fault-free answers to `sampled(0..count)`, generated concurrently.
pub(crate) async fn fault_free(
    client: &KosmosClient<Channel>,
    count: usize,
) -> anyhow::Result<Vec<Delivered>> {
    Ok(all((0..count)
        .map(|index| unary(client.clone(), sampled(index)))
        .collect())
    .await
    .into_iter()
    .collect::<Result<_, _>>()?)
}

/// Steady mixed load until stopped: callers each cycling through a seeded stream and a seeded unary Generate (both
/// compared with the fault-free `clean` answers), a Score, and a caption of a new image (so the encoders work: the
/// embedding cache cannot answer it). Every call is counted; a failed or different one is recorded.
pub(crate) struct MixedLoad {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<(usize, Vec<String>)>>,
    workers: JoinSet<()>,
}

impl MixedLoad {
    /// Starts `workers` callers cycling through the requests `sampled(0..clean.len())`.
    pub(crate) fn start(
        client: &KosmosClient<Channel>,
        clean: Vec<Delivered>,
        workers: usize,
    ) -> Self {
        let clean = Arc::new(clean);
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new((0usize, Vec::new())));
        let mut set = JoinSet::new();
        for worker in 0..workers {
            let (client, clean, stop, outcomes) = (
                client.clone(),
                clean.clone(),
                stop.clone(),
                outcomes.clone(),
            );
            set.spawn(async move {
                let mut calls = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let index = (worker + calls) % clean.len();
                    let differs =
                        |got: Delivered| (got.ids != clean[index].ids).then_some("other tokens");
                    let outcome = match calls % 4 {
                        0 => stream(client.clone(), sampled(index), Default::default())
                            .await
                            .map(differs),
                        1 => unary(client.clone(), sampled(index)).await.map(differs),
                        2 => client.clone().score(score(index)).await.map(|_| None),
                        _ => {
                            let picture = distinct_png((worker * 1_000_000 + calls) as u32);
                            let request =
                                greedy_request(vec![image(picture), text("An image of")], 4);
                            client.clone().generate(request).await.map(|_| None)
                        }
                    };
                    let mut outcomes = outcomes.lock().await;
                    outcomes.0 += 1;
                    match outcome {
                        Ok(None) => {}
                        Ok(Some(problem)) => outcomes
                            .1
                            .push(format!("worker {worker} call {calls}: {problem}")),
                        Err(status) => outcomes
                            .1
                            .push(format!("worker {worker} call {calls}: {status:?}")),
                    }
                    calls += 1;
                }
            });
        }
        Self {
            stop,
            outcomes,
            workers: set,
        }
    }

    /// Stops the callers after their current call; the number of calls and the failures.
    pub(crate) async fn stop(mut self) -> anyhow::Result<(usize, Vec<String>)> {
        self.stop.store(true, Ordering::SeqCst);
        while let Some(done) = self.workers.join_next().await {
            done?;
        }
        let outcomes = self.outcomes.lock().await;
        Ok((outcomes.0, outcomes.1.clone()))
    }
}

/// Sequences running or waiting on a decoder process now.
pub(crate) async fn decoder_load(process: &Process) -> anyhow::Result<u32> {
    let mut client = dec::decoder_client::DecoderClient::connect(process.endpoint()).await?;
    let info = client.info(dec::InfoRequest {}).await?.into_inner();
    Ok(info.running_sequences + info.waiting_requests)
}

/// Waits (at most a minute) until the gateway counts `replicas` healthy replicas in `pool` (`encoder`, `decoder`).
pub(crate) async fn wait_healthy(
    client: &mut KosmosClient<Channel>,
    pool: &str,
    replicas: u32,
) -> anyhow::Result<()> {
    for _ in 0..600 {
        let stats = client
            .get_model_info(pb::GetModelInfoRequest::default())
            .await?
            .into_inner()
            .stats
            .unwrap_or_default();
        let counted = match pool {
            "encoder" => stats.encoder,
            _ => stats.decoder,
        };
        if counted.map_or(0, |pool| pool.healthy_replicas) == replicas {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the gateway did not count {replicas} healthy {pool} replicas within a minute")
}

pub(crate) async fn resumptions(gateway: &Process, outcome: &str) -> anyhow::Result<f64> {
    let scrape = prom::parse(&prom::scrape(gateway.metrics_addr()).await?)?;
    Ok(prom::value(
        &scrape,
        "kosmos_gateway_decoder_resumptions_total",
        &[("outcome", outcome)],
    ))
}

pub(crate) fn assert_same(
    name: &str,
    faulty: &[Result<Delivered, tonic::Status>],
    clean: &[Delivered],
) {
    for (index, (faulty, clean)) in faulty.iter().zip(clean).enumerate() {
        let faulty = faulty
            .as_ref()
            .unwrap_or_else(|status| panic!("{name} {index} failed: {status:?}"));
        assert_eq!(
            faulty.ids, clean.ids,
            "{name} {index}: the same tokens, none lost or repeated"
        );
        assert_eq!(faulty.text, clean.text, "{name} {index}");
        assert_eq!(
            faulty.completion_tokens as usize,
            faulty.ids.len(),
            "{name} {index}: usage counts each token once"
        );
        assert_eq!(faulty.seed, clean.seed, "{name} {index}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_decoder_or_an_encoder_mid_way_loses_no_call() -> anyhow::Result<()> {
    let model = tiny_model_dir();
    let mut cluster = ProcessCluster::start(replica_binary(), &model, 2, 2, &[], &[]).await?;
    let client = cluster.gateway.client().await?;
    let mut control = client.clone();

    // Fault-free: what every call gives.
    let clean = fault_free(&client, CALLS).await?;
    let long = clean
        .iter()
        .filter(|delivered| delivered.ids.len() >= 40)
        .count();
    assert!(
        long >= CALLS / 2,
        "most generations run long enough to be cut mid-way: {clean:?}"
    );
    let clean_scores: Vec<pb::ScoreResponse> = all((0..CALLS)
        .map(|index| {
            let mut client = client.clone();
            async move { Ok(client.score(score(index)).await?.into_inner()) }
        })
        .collect())
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;

    // Streams: decoder 0 is killed once every stream has its first tokens.
    let started = Arc::new(AtomicUsize::new(0));
    let streams = tokio::spawn(all((0..CALLS)
        .map(|index| stream(client.clone(), sampled(index), started.clone()))
        .collect()));
    for _ in 0..3000 {
        if started.load(Ordering::SeqCst) >= CALLS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let load = decoder_load(&cluster.decoders[0]).await?;
    cluster.decoders[0].kill();
    let streamed = streams.await?;
    eprintln!(
        "decoder 0 held {load} sequences when killed; stream lengths {:?}",
        clean.iter().map(|d| d.ids.len()).collect::<Vec<_>>()
    );
    assert!(load > 0, "decoder 0 held sequences when it was killed");
    assert_same("stream", &streamed, &clean);
    let resumed = resumptions(&cluster.gateway, "resumed").await?;
    eprintln!("resumptions after the stream phase: {resumed}");
    assert!(
        resumed >= 1.0,
        "the killed decoder's streams resumed ({resumed})"
    );

    // Unary Generate: decoder 1 is killed while it runs sequences.
    cluster.decoders[0].restart()?;
    cluster.decoders[0]
        .wait_serving("", Duration::from_secs(120))
        .await?;
    wait_healthy(&mut control, "decoder", 2).await?;
    let calls = tokio::spawn(all((0..CALLS)
        .map(|index| unary(client.clone(), sampled(index)))
        .collect()));
    let mut load = 0;
    for _ in 0..3000 {
        load = decoder_load(&cluster.decoders[1]).await?;
        if load >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cluster.decoders[1].kill();
    let generated = calls.await?;
    eprintln!("decoder 1 held {load} sequences when killed");
    assert!(load > 0, "decoder 1 held sequences when it was killed");
    assert_same("generate", &generated, &clean);
    let resumed_again = resumptions(&cluster.gateway, "resumed").await?;
    eprintln!("resumptions after the unary phase: {resumed_again}");
    assert!(
        resumed_again > resumed,
        "the unary calls resumed ({resumed_again})"
    );

    // Score: decoder 0 is killed during a burst; each call is retried on decoder 1.
    cluster.decoders[1].restart()?;
    cluster.decoders[1]
        .wait_serving("", Duration::from_secs(120))
        .await?;
    wait_healthy(&mut control, "decoder", 2).await?;
    let scores = tokio::spawn(all((0..CALLS)
        .map(|index| {
            let mut client = client.clone();
            async move { Ok(client.score(score(index)).await?.into_inner()) }
        })
        .collect()));
    tokio::time::sleep(Duration::from_millis(5)).await;
    cluster.decoders[0].kill();
    for (index, (scored, clean)) in scores.await?.iter().zip(&clean_scores).enumerate() {
        let scored = scored
            .as_ref()
            .unwrap_or_else(|status| panic!("score {index} failed: {status:?}"));
        for (a, b) in scored.scores.iter().zip(&clean.scores) {
            assert!(
                (a.sum_logprob - b.sum_logprob).abs() < 1e-3,
                "score {index}"
            );
        }
    }

    // Encoders: encoder 0 is killed under a burst of new images; the other encodes them.
    let calls = tokio::spawn(all((0..CALLS)
        .map(|index| {
            let mut client = client.clone();
            let request = greedy_request(
                vec![
                    image(distinct_png(9000 + index as u32)),
                    text("An image of"),
                ],
                4,
            );
            async move { Ok(client.generate(request).await?.into_inner()) }
        })
        .collect()));
    tokio::time::sleep(Duration::from_millis(5)).await;
    cluster.encoders[0].kill();
    for (index, answer) in calls.await?.iter().enumerate() {
        assert!(answer.is_ok(), "image call {index} failed: {answer:?}");
    }
    assert_eq!(resumptions(&cluster.gateway, "failed").await?, 0.0);
    Ok(())
}
