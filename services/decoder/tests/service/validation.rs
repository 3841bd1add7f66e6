//! Bad input is refused at the edge with the right code and a message naming the field (or segment) and the
//! limit, and the service keeps serving afterwards.

use kosmos_proto::decoder::v1 as pb;
use kosmos_proto::tensor::v1::{DType as WireDType, Tensor as WireTensor};
use tonic::Code;

use crate::common::{
    fingerprint, generate, get, greedy, image_embeddings, image_segment, reference, request, start,
    tokens_segment,
};

fn image_with(tensor: Option<WireTensor>, fingerprint: &str) -> pb::Segment {
    pb::Segment {
        kind: Some(pb::segment::Kind::Image(pb::ImageEmbedding {
            embedding: tensor,
            model_fingerprint: fingerprint.to_string(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_embeddings_are_rejected_naming_the_segment_and_the_service_keeps_serving() {
    let server = start(&[]).await;
    let fingerprint = fingerprint();
    assert_eq!(server.info().await.model_fingerprint, fingerprint);
    let rows = image_embeddings(get(&reference(), "images.pixel_values")).remove(0);
    let good =
        kosmos_runtime::tensor::from_f32(&rows, &[3, 32], WireDType::DtypeF32).expect("tensor");
    let wrong_shape = WireTensor {
        shape: vec![4, 24],
        ..good.clone()
    };
    let unknown_dtype = WireTensor {
        dtype: 0,
        ..good.clone()
    };
    let short = WireTensor {
        data: good.data[..good.data.len() - 3].to_vec(),
        ..good.clone()
    };
    let f16_with_f32_bytes = WireTensor {
        dtype: WireDType::DtypeF16 as i32,
        ..good.clone()
    };
    let mut not_finite = good.clone();
    not_finite.data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let cases = [
        (
            "wrong shape",
            image_with(Some(wrong_shape), &fingerprint),
            Code::InvalidArgument,
            "shape",
        ),
        (
            "unknown dtype",
            image_with(Some(unknown_dtype), &fingerprint),
            Code::InvalidArgument,
            "dtype",
        ),
        (
            "short data",
            image_with(Some(short), &fingerprint),
            Code::InvalidArgument,
            "bytes",
        ),
        (
            "dtype vs bytes",
            image_with(Some(f16_with_f32_bytes), &fingerprint),
            Code::InvalidArgument,
            "bytes",
        ),
        (
            "not finite",
            image_with(Some(not_finite), &fingerprint),
            Code::InvalidArgument,
            "finite",
        ),
        (
            "no tensor",
            image_with(None, &fingerprint),
            Code::InvalidArgument,
            "missing",
        ),
        (
            "other model",
            image_with(Some(good.clone()), "0123456789abcdef"),
            Code::FailedPrecondition,
            "fingerprint",
        ),
    ];
    let mut client = server.client().await;
    for (name, segment, code, needle) in cases {
        let prompt = vec![tokens_segment(&[0, 7]), segment, tokens_segment(&[9])];
        let error = client
            .generate(request(prompt.clone(), greedy(0), 3, false))
            .await
            .expect_err(name);
        assert_eq!(error.code(), code, "{name}: {error:?}");
        assert!(
            error.message().contains("segment 1"),
            "{name}: {}",
            error.message()
        );
        assert!(
            error.message().contains(needle),
            "{name}: {}",
            error.message()
        );
        let error = client
            .score(pb::ScoreRequest {
                tenant: String::new(),
                context: prompt,
                candidates: vec![pb::Candidate { ids: vec![10] }],
            })
            .await
            .expect_err(name);
        assert_eq!(error.code(), code, "score, {name}: {error:?}");
    }

    // Still serving, and half-precision embeddings are accepted and close to f32.
    let reference_run = generate(
        &mut client,
        request(
            vec![
                tokens_segment(&[0]),
                image_segment(&rows, &fingerprint),
                tokens_segment(&[9, 10]),
            ],
            greedy(0),
            4,
            true,
        ),
    )
    .await
    .expect("f32 embedding");
    for dtype in [WireDType::DtypeF16, WireDType::DtypeBf16] {
        let tensor = kosmos_runtime::tensor::from_f32(&rows, &[3, 32], dtype).expect("tensor");
        let prompt = vec![
            tokens_segment(&[0]),
            image_with(Some(tensor), &fingerprint),
            tokens_segment(&[9, 10]),
        ];
        let generated = generate(&mut client, request(prompt, greedy(0), 4, true))
            .await
            .expect("half embedding");
        assert_eq!(generated.tokens.len(), 4);
        let difference = (generated.tokens[0].logprob - reference_run.tokens[0].logprob).abs();
        assert!(
            difference < 0.05,
            "{dtype:?}: first log-prob differs by {difference}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_rejected_naming_the_field_and_the_limit() {
    let server = start(&[
        "limits.max_score_candidates=4",
        "limits.max_candidate_tokens=8",
    ])
    .await;
    let mut client = server.client().await;
    let ten = tokens_segment(&[0, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
    let invalid =
        |request: pb::GenerateRequest, needles: &'static [&'static str]| (request, needles);
    let generate_cases = [
        invalid(
            request(vec![ten.clone()], greedy(0), 600, false),
            &["10", "600", "512"],
        ),
        invalid(
            request(
                vec![ten.clone()],
                pb::SamplingParams {
                    top_logprobs: 21,
                    ..greedy(0)
                },
                4,
                false,
            ),
            &["top_logprobs", "20", "21"],
        ),
        invalid(
            request(
                vec![ten.clone()],
                pb::SamplingParams {
                    temperature: -1.0,
                    ..greedy(0)
                },
                4,
                false,
            ),
            &["temperature"],
        ),
        invalid(
            request(
                vec![ten.clone()],
                pb::SamplingParams {
                    top_p: 1.5,
                    ..greedy(0)
                },
                4,
                false,
            ),
            &["top_p"],
        ),
        invalid(
            request(vec![tokens_segment(&[0, 5000])], greedy(0), 4, false),
            &["prompt[0]", "5000", "2035"],
        ),
        invalid(
            request(Vec::new(), greedy(0), 4, false),
            &["prompt", "at least one token"],
        ),
        invalid(
            request(vec![pb::Segment { kind: None }], greedy(0), 4, false),
            &["prompt[0]"],
        ),
        invalid(
            request(vec![tokens_segment(&vec![7; 512])], greedy(0), 0, false),
            &["512", "no room"],
        ),
    ];
    for (request, needles) in generate_cases {
        let error = client.generate(request).await.expect_err("invalid");
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        for needle in needles {
            assert!(
                error.message().contains(needle),
                "`{needle}` not in `{}`",
                error.message()
            );
        }
    }
    let candidates = |lists: &[&[u32]]| -> Vec<pb::Candidate> {
        lists
            .iter()
            .map(|ids| pb::Candidate { ids: ids.to_vec() })
            .collect()
    };
    let score_cases: [(Vec<pb::Candidate>, &[&str]); 4] = [
        (Vec::new(), &["candidates", "at least one"]),
        (candidates(&[&[7], &[]]), &["candidates[1]", "empty"]),
        (candidates(&[&[7], &[8], &[9], &[10], &[11]]), &["4", "5"]),
        (candidates(&[&[7; 9]]), &["candidates[0]", "8", "9"]),
    ];
    for (candidates, needles) in score_cases {
        let error = client
            .score(pb::ScoreRequest {
                tenant: String::new(),
                context: vec![ten.clone()],
                candidates,
            })
            .await
            .expect_err("invalid");
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        for needle in needles {
            assert!(
                error.message().contains(needle),
                "`{needle}` not in `{}`",
                error.message()
            );
        }
    }
    // Still serving.
    let generated = generate(&mut client, request(vec![ten], greedy(0), 3, true))
        .await
        .expect("valid");
    assert_eq!(generated.tokens.len(), 3);
    server.stop().await;
}
