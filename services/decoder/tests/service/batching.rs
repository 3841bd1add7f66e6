//! Continuous batching never changes what a caller gets: the same tokens alone or among 15 other requests of
//! different prompt and output lengths, for greedy decoding and for seeded sampling; scoring several candidates
//! at once equals scoring each alone.

use kosmos_proto::decoder::v1 as pb;

use crate::common::{
    TestServer, generate, get, image_embeddings, image_segment, pseudo_random_ids, reference,
    request, start, tokens_segment,
};

/// Sixteen requests: prompts of 3 to 48 tokens (two of them with an image in the middle), 4 to 40 new tokens.
fn sixteen_requests(
    fingerprint: &str,
    sampling: impl Fn(usize) -> pb::SamplingParams,
) -> Vec<pb::GenerateRequest> {
    let images = image_embeddings(get(&reference(), "images.pixel_values"));
    (0..16)
        .map(|index| {
            let ids = pseudo_random_ids(index as u64, 3 + (index * 7) % 46);
            let prompt = if index % 7 == 3 {
                let (head, tail) = ids.split_at(ids.len() / 2);
                vec![
                    tokens_segment(head),
                    image_segment(&images[index % images.len()], fingerprint),
                    tokens_segment(tail),
                ]
            } else {
                vec![tokens_segment(&ids)]
            };
            let max_new_tokens = 4 + ((index * 11) % 37) as u32;
            request(prompt, sampling(index), max_new_tokens, true)
        })
        .collect()
}

/// Runs every request alone, then all at once; returns (alone, batched) ids and the engine steps of the batch.
async fn alone_and_batched(
    server: &TestServer,
    requests: &[pb::GenerateRequest],
) -> (Vec<Vec<u32>>, Vec<Vec<u32>>, u64) {
    let mut client = server.client().await;
    let mut alone = Vec::new();
    for request in requests {
        alone.push(
            generate(&mut client, request.clone())
                .await
                .expect("generates alone")
                .ids(),
        );
    }
    let steps_before = server.engine.snapshot().steps_total;
    let mut tasks = Vec::new();
    for request in requests {
        let mut client = server.client().await;
        let request = request.clone();
        tasks.push(tokio::spawn(
            async move { generate(&mut client, request).await },
        ));
    }
    let mut batched = Vec::new();
    for task in tasks {
        batched.push(task.await.expect("task").expect("generates batched").ids());
    }
    let steps = server.engine.snapshot().steps_total - steps_before;
    (alone, batched, steps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_tokens_are_the_same_alone_and_batched_with_fifteen_others() {
    let server = start(&["scheduler.max_running_sequences=16"]).await;
    let fingerprint = server.info().await.model_fingerprint;
    let requests = sixteen_requests(&fingerprint, |index| pb::SamplingParams {
        no_repeat_ngram_size: (index % 4) as u32,
        repetition_penalty: if index % 5 == 0 { 1.3 } else { 0.0 },
        ..pb::SamplingParams::default()
    });
    let (alone, batched, steps) = alone_and_batched(&server, &requests).await;
    let total_tokens: usize = alone.iter().map(Vec::len).sum();
    for (index, (alone, batched)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(alone, batched, "request {index}");
    }
    // The requests really shared steps: far fewer steps than tokens.
    assert!(
        (steps as usize) < total_tokens / 2,
        "{steps} steps for {total_tokens} tokens: requests were not batched"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_sampling_gives_the_same_tokens_alone_and_batched() {
    let server = start(&["scheduler.max_running_sequences=16"]).await;
    let fingerprint = server.info().await.model_fingerprint;
    let requests = sixteen_requests(&fingerprint, |index| pb::SamplingParams {
        temperature: 0.7 + 0.1 * (index % 5) as f32,
        top_k: if index % 2 == 0 { 50 } else { 0 },
        top_p: if index % 3 == 0 { 0.9 } else { 0.0 },
        repetition_penalty: if index % 4 == 1 { 1.2 } else { 0.0 },
        no_repeat_ngram_size: (index % 3) as u32,
        seed: Some(1000 + index as u64),
        top_logprobs: 2,
    });
    let (alone, batched, _) = alone_and_batched(&server, &requests).await;
    for (index, (alone, batched)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(alone, batched, "request {index}");
    }
    // Different seeds really sample differently.
    let mut reseeded = requests[1].clone();
    if let Some(sampling) = reseeded.sampling.as_mut() {
        sampling.seed = Some(424_242);
    }
    let mut client = server.client().await;
    let other = generate(&mut client, reseeded)
        .await
        .expect("generates")
        .ids();
    assert_ne!(other, alone[1], "another seed gives other tokens");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_eight_candidates_together_equals_scoring_each_alone() {
    let server = start(&[]).await;
    let mut client = server.client().await;
    let context = vec![tokens_segment(&pseudo_random_ids(99, 20))];
    let candidates: Vec<pb::Candidate> = (0..8)
        .map(|index| pb::Candidate {
            ids: pseudo_random_ids(200 + index, 1 + index as usize),
        })
        .collect();
    let together = client
        .score(pb::ScoreRequest {
            tenant: String::new(),
            context: context.clone(),
            candidates: candidates.clone(),
        })
        .await
        .expect("scores")
        .into_inner();
    for (index, candidate) in candidates.into_iter().enumerate() {
        let alone = client
            .score(pb::ScoreRequest {
                tenant: String::new(),
                context: context.clone(),
                candidates: vec![candidate],
            })
            .await
            .expect("scores")
            .into_inner();
        let a = &together.scores[index].token_logprobs;
        let b = &alone.scores[0].token_logprobs;
        assert_eq!(a.len(), index + 1);
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "candidate {index}: {a:?} vs {b:?}");
    }
    server.stop().await;
}
