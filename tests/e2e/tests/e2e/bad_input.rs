//! Every bad input is INVALID_ARGUMENT naming the field, and the system keeps serving.

use kosmos_e2e::{Cluster, ClusterOptions, fixture_image, image, text};
use kosmos_proto::encoder::v1 as enc;
use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_client::KosmosClient;
use tonic::transport::Channel;

use crate::{IMAGE, greedy_request};

use kosmos_testkit::png::header_only as png_header_only;

async fn expect_invalid<T: std::fmt::Debug>(
    what: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
    field: &str,
) {
    match result {
        Ok(response) => panic!("{what}: expected INVALID_ARGUMENT, got {response:?}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{what}: {status:?}"
            );
            assert!(
                status.message().contains(field),
                "{what}: `{}` should name {field}",
                status.message()
            );
        }
    }
}

async fn still_serves(client: &mut KosmosClient<Channel>, after: &str) {
    let request = greedy_request(vec![image(fixture_image(IMAGE)), text("An image of")], 3);
    let response = client.generate(request).await;
    assert!(response.is_ok(), "after {after}: {response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_is_invalid_argument_and_the_system_keeps_serving() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut client = cluster.client().await?;
    let good = fixture_image(IMAGE);
    let with_params = |params: pb::GenerationParams| pb::GenerateRequest {
        prompt: vec![image(good.clone()), text("An image of")],
        params: Some(params),
        grounding: false,
    };

    let cases: Vec<(&str, pb::GenerateRequest, &str)> = vec![
        ("an empty prompt", greedy_request(Vec::new(), 3), "`prompt`"),
        (
            "a segment with nothing",
            greedy_request(vec![pb::Segment { kind: None }], 3),
            "`prompt[0]`",
        ),
        (
            "bytes that are no image",
            greedy_request(vec![image(b"GIF89a not really".to_vec())], 3),
            "`prompt[0].image",
        ),
        (
            "a decompression bomb",
            greedy_request(vec![text("x"), image(png_header_only(100_000, 100_000))], 3),
            "max_image_width",
        ),
        (
            "an image above the byte limit",
            greedy_request(
                vec![image({
                    let mut big = good.clone();
                    big.resize(10 * 1024 * 1024 + 1, 0);
                    big
                })],
                3,
            ),
            "max_image_bytes",
        ),
        (
            "too many images",
            greedy_request((0..9).map(|_| image(good.clone())).collect(), 3),
            "max_images",
        ),
        (
            "max_new_tokens beyond the context",
            with_params(pb::GenerationParams {
                max_new_tokens: 1000,
                ..Default::default()
            }),
            "params.max_new_tokens",
        ),
        (
            "a negative temperature",
            with_params(pb::GenerationParams {
                temperature: -0.5,
                ..Default::default()
            }),
            "params.temperature",
        ),
        (
            "top_p above one",
            with_params(pb::GenerationParams {
                top_p: 1.5,
                ..Default::default()
            }),
            "params.top_p",
        ),
        (
            "an empty stop string",
            with_params(pb::GenerationParams {
                stop: vec![String::new()],
                ..Default::default()
            }),
            "params.stop[0]",
        ),
        (
            "a reserved tag in the text",
            greedy_request(vec![text("look <image> here")], 3),
            "reserved tag",
        ),
    ];
    for (what, request, field) in cases {
        expect_invalid(what, client.generate(request.clone()).await, field).await;
        expect_invalid(what, client.generate_stream(request).await, field).await;
        still_serves(&mut client, what).await;
    }
    // None of the images above reached the encoder: they were refused from their headers.
    let mut encoder = cluster.encoder(0).await?;
    let encoded = encoder
        .info(enc::InfoRequest {})
        .await?
        .into_inner()
        .images_encoded;
    assert_eq!(encoded, 1, "only the good image was encoded (then cached)");

    // Corrupt pixel data behind a valid header passes the gateway's checks and is refused by the encoder.
    let mut corrupt = good.clone();
    corrupt.truncate(good.len() / 2);
    let request = greedy_request(vec![image(corrupt), text("x")], 3);
    expect_invalid(
        "a corrupt image",
        client.generate(request).await,
        "`prompt[0].image",
    )
    .await;
    still_serves(&mut client, "a corrupt image").await;

    let score = |candidates: Vec<String>| pb::ScoreRequest {
        prompt: vec![image(good.clone()), text("This is")],
        candidates,
    };
    expect_invalid(
        "no candidates",
        client.score(score(Vec::new())).await,
        "`candidates`",
    )
    .await;
    expect_invalid(
        "an empty candidate",
        client.score(score(vec![" ".into()])).await,
        "`candidates[0]`",
    )
    .await;
    expect_invalid(
        "a score with an empty prompt",
        client
            .score(pb::ScoreRequest {
                prompt: Vec::new(),
                candidates: vec!["a".into()],
            })
            .await,
        "`prompt`",
    )
    .await;
    still_serves(&mut client, "bad scores").await;
    let stats = cluster.gateway().stats();
    assert_eq!(
        stats.requests_in_flight, 0,
        "every refused request released its slot"
    );
    cluster.shutdown().await;
    Ok(())
}
