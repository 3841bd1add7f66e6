//! The paged KV cache in the engine: preempted sequences resume with the tokens of an uninterrupted run, a prefix
//! hit changes nothing but the work done, and every block comes back whatever way the requests end.

use std::time::{Duration, Instant};

use kosmos_decoder::engine::{FinishReason, GenerateJob, Prompt, StoppingRule};
use kosmos_decoder::sampling::SamplingParams;
use kosmos_proto::decoder::v1 as pb;
use kosmos_proto::tensor::v1::DType as WireDType;

use crate::common::{
    TestServer, generate, get, image_embeddings, image_segment, pseudo_random_ids, reference,
    request, start, tokens_segment,
};

/// Eight seeded sampling requests of 40 to 61 prompt tokens (one with an image) and 50 to 64 new tokens: about 7
/// blocks of 16 each, far more than a pool of 32 blocks holds at once.
fn long_requests(fingerprint: &str) -> Vec<pb::GenerateRequest> {
    let images = image_embeddings(get(&reference(), "images.pixel_values"));
    (0..8u64)
        .map(|index| {
            let ids = pseudo_random_ids(300 + index, 40 + (index as usize * 3));
            let prompt = if index == 5 {
                let (head, tail) = ids.split_at(20);
                vec![
                    tokens_segment(head),
                    image_segment(&images[0], fingerprint),
                    tokens_segment(tail),
                ]
            } else {
                vec![tokens_segment(&ids)]
            };
            let sampling = pb::SamplingParams {
                temperature: 0.8,
                top_k: 40,
                seed: Some(77 + index),
                ..pb::SamplingParams::default()
            };
            request(prompt, sampling, 50 + 2 * index as u32, true)
        })
        .collect()
}

async fn run_all(server: &TestServer, requests: &[pb::GenerateRequest]) -> Vec<Vec<u32>> {
    let mut tasks = Vec::new();
    for request in requests {
        let mut client = server.client().await;
        let request = request.clone();
        tasks.push(tokio::spawn(
            async move { generate(&mut client, request).await },
        ));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("task").expect("generates").ids());
    }
    out
}

async fn wait_until_idle(server: &TestServer) -> pb::InfoResponse {
    server
        .wait_for_info("every block back", |info| {
            info.running_sequences == 0
                && info.waiting_requests == 0
                && info.preempted_requests == 0
                && info.kv_blocks_used == 0
        })
        .await
}

/// Runs [`long_requests`] one at a time, then all at once, on a pool of 32 blocks of 16 (512 positions, the context
/// length) without prefix sharing, plus `settings`: the tokens must agree although the second run preempts, since
/// recomputation alone restores a preempted sequence. Returns the server's `Info` before the runs.
async fn preempted_runs_equal_uninterrupted_ones(settings: &[&str]) -> pb::InfoResponse {
    let small = start(
        &[
            &[
                "scheduler.kv_token_budget=512",
                "scheduler.kv_block_size=16",
                "scheduler.prefix_caching=false",
            ],
            settings,
        ]
        .concat(),
    )
    .await;
    let info = small.info().await;
    let requests = long_requests(&info.model_fingerprint);
    let mut alone = Vec::new();
    let mut client = small.client().await;
    for request in &requests {
        alone.push(
            generate(&mut client, request.clone())
                .await
                .expect("alone")
                .ids(),
        );
    }
    assert_eq!(
        small.info().await.preemptions_total,
        0,
        "one at a time fits"
    );
    let together = run_all(&small, &requests).await;
    for (index, (alone, together)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(alone, together, "request {index}");
    }
    let idle = wait_until_idle(&small).await;
    assert!(
        idle.preemptions_total > 0,
        "eight requests of ~7 blocks in a pool of 32 must preempt: {idle:?}"
    );
    assert_eq!(idle.kv_blocks_total, 32);
    small.stop().await;
    info
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preempted_sequences_resume_with_the_tokens_of_an_uninterrupted_run() {
    preempted_runs_equal_uninterrupted_ones(&[]).await;
}

/// `scheduler.kv_cache_dtype=f16` for f32 weights: Info names both dtypes, and batching and preemption stay exact
/// (each (sequence, head) reads the same rounded values whatever else the step holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_half_precision_kv_cache_keeps_batched_and_preempted_runs_exact() {
    let info = preempted_runs_equal_uninterrupted_ones(&["scheduler.kv_cache_dtype=f16"]).await;
    assert_eq!(info.weights_dtype, WireDType::DtypeF32 as i32);
    assert_eq!(info.kv_cache_dtype, WireDType::DtypeF16 as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prefix_is_reused_and_gives_the_same_tokens() {
    let cached = start(&["scheduler.kv_block_size=4"]).await;
    let uncached = start(&[
        "scheduler.kv_block_size=4",
        "scheduler.prefix_caching=false",
    ])
    .await;
    let fingerprint = cached.info().await.model_fingerprint;
    let images = image_embeddings(get(&reference(), "images.pixel_values"));
    let prompt = vec![
        tokens_segment(&pseudo_random_ids(1, 6)),
        image_segment(&images[1], &fingerprint),
        tokens_segment(&pseudo_random_ids(2, 9)),
    ];
    let sampling = pb::SamplingParams {
        temperature: 0.9,
        seed: Some(5),
        ..pb::SamplingParams::default()
    };
    let mut client = cached.client().await;
    let first = generate(&mut client, request(prompt.clone(), sampling, 12, true))
        .await
        .expect("first")
        .ids();
    let after_first = wait_until_idle(&cached).await;
    assert_eq!(after_first.prefix_cache_hits_total, 0);
    assert!(
        after_first.kv_blocks_cached > 0,
        "full blocks stay cached: {after_first:?}"
    );
    let second = generate(&mut client, request(prompt.clone(), sampling, 12, true))
        .await
        .expect("second")
        .ids();
    let after_second = wait_until_idle(&cached).await;
    // 18 prompt positions: the first four blocks (16 positions, the image's three among them) are reused.
    assert_eq!(after_second.prefix_cache_hits_total, 4, "{after_second:?}");
    let mut plain = uncached.client().await;
    let expected = generate(&mut plain, request(prompt.clone(), sampling, 12, true))
        .await
        .expect("uncached")
        .ids();
    assert_eq!(first, expected);
    assert_eq!(second, expected);

    // Another image at the same positions shares only the text block before it.
    let other = vec![
        tokens_segment(&pseudo_random_ids(1, 6)),
        image_segment(&images[0], &fingerprint),
        tokens_segment(&pseudo_random_ids(2, 9)),
    ];
    generate(&mut client, request(other, sampling, 4, true))
        .await
        .expect("other image");
    let after_other = wait_until_idle(&cached).await;
    assert_eq!(after_other.prefix_cache_hits_total, 5, "{after_other:?}");
    cached.stop().await;
    uncached.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_block_comes_back_after_finished_cancelled_expired_preempted_and_failed_requests() {
    let server = start(&[
        "scheduler.kv_token_budget=512",
        "scheduler.kv_block_size=16",
    ])
    .await;
    let fingerprint = server.info().await.model_fingerprint;
    let requests = long_requests(&fingerprint);
    // Finished (and preempted along the way).
    let finished = run_all(&server, &requests[..6]).await;
    assert_eq!(finished.len(), 6);
    // Cancelled: a stream dropped after its first message.
    let mut client = server.slow_reader_client().await;
    let mut stream = client
        .generate(requests[6].clone())
        .await
        .expect("starts")
        .into_inner();
    stream.message().await.expect("first").expect("not ended");
    drop(stream);
    // Expired: a deadline shorter than the generation (in process, so the deadline is exact).
    let job = |ids: Vec<u32>, deadline: Option<Instant>| GenerateJob {
        tenant: String::new(),
        resume: Default::default(),
        prompt: Prompt {
            image_mask: vec![false; ids.len()],
            ids,
            ..Prompt::default()
        },
        sampling: SamplingParams::default(),
        stopping: StoppingRule {
            max_new_tokens: 470,
            limit_reason: FinishReason::Length,
            stop_token_ids: Vec::new(),
            eos_token_id: None,
        },
        deadline,
        arrived: Instant::now(),
    };
    let mut expiring = server
        .engine
        .generate(job(
            pseudo_random_ids(9, 30),
            Some(Instant::now() + Duration::from_millis(30)),
        ))
        .expect("queued");
    let mut last = None;
    while let Some(event) = expiring.recv().await {
        last = Some(event);
    }
    assert!(
        matches!(last, Some(Err(ref error)) if error.code() == tonic::Code::DeadlineExceeded),
        "{last:?}"
    );
    // Failed: an id outside the vocabulary fails its step inside the engine.
    let mut failing = server
        .engine
        .generate(job(vec![7, 8, 1_000_000], None))
        .expect("queued");
    let mut last = None;
    while let Some(event) = failing.recv().await {
        last = Some(event);
    }
    assert!(matches!(last, Some(Err(_))), "{last:?}");
    let idle = wait_until_idle(&server).await;
    assert!(idle.preemptions_total > 0, "{idle:?}");
    assert_eq!(idle.kv_blocks_used, 0);
    assert_eq!(idle.kv_tokens_cached, 0);
    assert!(idle.cancelled_total >= 2, "{idle:?}");
    server.stop().await;
}
