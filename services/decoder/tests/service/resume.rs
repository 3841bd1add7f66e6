//! Failover: a generation resumed on a replica with what another replica had delivered (`GenerateRequest.resume`)
//! continues token for token as the uninterrupted run, for seeded sampling (the random stream is positioned, not
//! reseeded) and for greedy decoding; a resume that cannot be continued exactly is refused, naming the field.

use kosmos_proto::decoder::v1 as pb;
use tonic::Code;

use crate::common::{
    generate, get, image_embeddings, image_segment, pseudo_random_ids, reference, request, start,
    tokens_segment,
};

const MAX_NEW_TOKENS: u32 = 40;

fn prompt(fingerprint: &str) -> Vec<pb::Segment> {
    let images = image_embeddings(get(&reference(), "images.pixel_values"));
    vec![
        tokens_segment(&pseudo_random_ids(3, 9)),
        image_segment(&images[0], fingerprint),
        tokens_segment(&pseudo_random_ids(4, 5)),
    ]
}

fn resumed(original: &pb::GenerateRequest, generated: &[u32], draws: u64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        resume: Some(pb::Resume {
            generated_ids: generated.to_vec(),
            random_draws: draws,
        }),
        ..original.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_generation_continues_exactly_where_the_lost_one_stopped() {
    let server = start(&[]).await;
    let fingerprint = server.info().await.model_fingerprint;
    let mut client = server.client().await;
    let sampled = pb::SamplingParams {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        repetition_penalty: 1.3,
        no_repeat_ngram_size: 3,
        seed: Some(2024),
        top_logprobs: 2,
    };
    let greedy = pb::SamplingParams {
        repetition_penalty: 1.2,
        no_repeat_ngram_size: 2,
        ..pb::SamplingParams::default()
    };
    for (name, sampling, draws_per_token) in [("sampled", sampled, 1), ("greedy", greedy, 0)] {
        let original = request(prompt(&fingerprint), sampling, MAX_NEW_TOKENS, true);
        let whole = generate(&mut client, original.clone())
            .await
            .expect("generates");
        let ids = whole.ids();
        assert_eq!(ids.len(), MAX_NEW_TOKENS as usize, "{name}");
        for done in [1usize, 13, 39] {
            let rest = generate(
                &mut client,
                resumed(&original, &ids[..done], (done * draws_per_token) as u64),
            )
            .await
            .expect("a resume generates");
            assert_eq!(
                rest.ids(),
                ids[done..],
                "{name}: resumed after {done} tokens"
            );
            for (resumed, uninterrupted) in rest.tokens.iter().zip(&whole.tokens[done..]) {
                assert!(
                    (resumed.logprob - uninterrupted.logprob).abs() < 1e-4,
                    "{name}: the same distribution after the resume"
                );
            }
            let usage = rest.finish.and_then(|finish| finish.usage).expect("usage");
            assert_eq!(
                usage.completion_tokens, MAX_NEW_TOKENS,
                "{name}: completion tokens count the delivered ones once"
            );
            assert_eq!(
                usage.prompt_tokens,
                whole
                    .finish
                    .as_ref()
                    .and_then(|f| f.usage)
                    .expect("usage")
                    .prompt_tokens,
                "{name}: the prompt is the original one"
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_cannot_continue_exactly_is_refused_naming_the_field() {
    let server = start(&[]).await;
    let mut client = server.client().await;
    let seeded = pb::SamplingParams {
        temperature: 1.0,
        seed: Some(5),
        ..pb::SamplingParams::default()
    };
    let unseeded = pb::SamplingParams {
        seed: None,
        ..seeded
    };
    let base = request(
        vec![tokens_segment(&pseudo_random_ids(1, 6))],
        seeded,
        4,
        true,
    );
    let cases = [
        (
            resumed(&base, &[10, 11, 12, 13], 4),
            "`resume.generated_ids` holds 4 tokens",
        ),
        (resumed(&base, &[10, 11], 3), "`resume.random_draws` is 3"),
        (
            resumed(&base, &[10, 999_999], 2),
            "`resume.generated_ids` contains 999999",
        ),
        (
            pb::GenerateRequest {
                sampling: Some(unseeded),
                ..resumed(&base, &[10], 1)
            },
            "needs `sampling.seed`",
        ),
    ];
    for (request, expected) in cases {
        let status = generate(&mut client, request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        assert!(status.message().contains(expected), "{}", status.message());
    }
    server.stop().await;
}
