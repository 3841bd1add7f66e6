//! Generate and GenerateStream against the model run directly.

use kosmos_e2e::{
    Cluster, ClusterOptions, DirectModel, DirectSegment, fixture_image, image, text, tiny_model_dir,
};
use kosmos_proto::v1 as pb;

use crate::{IMAGE, greedy_request};

fn ids(response: &pb::GenerateResponse) -> Vec<u32> {
    response.tokens.iter().map(|token| token.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_through_the_gateway_equals_the_direct_greedy_output() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let direct = DirectModel::load(&tiny_model_dir())?;
    let mut client = cluster.client().await?;
    let picture = fixture_image(IMAGE);
    let request = greedy_request(vec![image(picture.clone()), text("An image of")], 20);
    let response = client.generate(request).await?.into_inner();

    let (prompt_ids, expected) = direct.greedy(
        &[
            DirectSegment::Image(picture),
            DirectSegment::Text("An image of".into()),
        ],
        20,
        3,
    )?;
    assert_eq!(response.prompt_token_ids, prompt_ids);
    assert_eq!(ids(&response), expected);
    assert_eq!(response.text, direct.decode(&expected)?);
    let usage = response.usage.expect("usage");
    assert_eq!(usage.prompt_tokens as usize, prompt_ids.len());
    assert_eq!(usage.image_tokens, 3);
    assert_eq!(usage.completion_tokens as usize, expected.len());
    let eos = 2;
    let reason = if expected.last() == Some(&eos) {
        pb::FinishReason::Eos
    } else {
        pb::FinishReason::Length
    };
    assert_eq!(response.finish_reason, reason as i32);
    let timings = response.timings.expect("timings");
    assert!(timings.time_to_first_token_seconds > 0.0);
    assert!(timings.total_seconds >= timings.time_to_first_token_seconds);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_concatenates_to_the_unary_result() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut client = cluster.client().await?;
    let request = greedy_request(vec![image(fixture_image(IMAGE)), text("Describe")], 40);
    let unary = client.generate(request.clone()).await?.into_inner();
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut streamed_text = String::new();
    let mut streamed_ids = Vec::new();
    let mut last = None;
    let mut messages = 0;
    while let Some(message) = stream.message().await? {
        messages += 1;
        let token_text: String = message
            .tokens
            .iter()
            .map(|token| token.text.as_str())
            .collect();
        assert!(
            message.text.starts_with(&token_text),
            "token texts are the message's text, in order"
        );
        streamed_text.push_str(&message.text);
        streamed_ids.extend(message.tokens.iter().map(|token| token.id));
        if message.finish_reason != 0 {
            last = Some(message);
        }
    }
    let last = last.expect("a final message");
    assert!(messages >= 1);
    assert_eq!(streamed_text, unary.text);
    assert_eq!(streamed_ids, ids(&unary));
    assert_eq!(last.finish_reason, unary.finish_reason);
    assert_eq!(last.usage, unary.usage);
    assert_eq!(last.prompt_token_ids, unary.prompt_token_ids);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_with_zero_one_and_three_images_match_the_direct_model() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let direct = DirectModel::load(&tiny_model_dir())?;
    let mut client = cluster.client().await?;
    let a = fixture_image("a_gradient_48x32.png");
    let b = fixture_image("b_shapes_32x64.jpg");
    let c = fixture_image("c_alpha_40x40.png");
    let cases: Vec<Vec<DirectSegment>> = vec![
        vec![DirectSegment::Text("Once upon a time".into())],
        vec![
            DirectSegment::Text("Look:".into()),
            DirectSegment::Image(b.clone()),
            DirectSegment::Text("it is".into()),
        ],
        vec![
            DirectSegment::Image(a),
            DirectSegment::Text("and".into()),
            DirectSegment::Image(b),
            DirectSegment::Text("then".into()),
            DirectSegment::Image(c),
            DirectSegment::Text("compare them".into()),
        ],
    ];
    for segments in cases {
        let prompt = segments
            .iter()
            .map(|segment| match segment {
                DirectSegment::Text(words) => text(words),
                DirectSegment::Image(bytes) => image(bytes.clone()),
            })
            .collect();
        let response = client
            .generate(greedy_request(prompt, 16))
            .await?
            .into_inner();
        let (prompt_ids, expected) = direct.greedy(&segments, 16, 3)?;
        let images = segments
            .iter()
            .filter(|s| matches!(s, DirectSegment::Image(_)))
            .count();
        assert_eq!(response.prompt_token_ids, prompt_ids, "{images} images");
        assert_eq!(ids(&response), expected, "{images} images");
        assert_eq!(
            response.usage.expect("usage").image_tokens as usize,
            images * 3
        );
    }
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_ends_the_text_right_before_it() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut client = cluster.client().await?;
    let request = greedy_request(vec![image(fixture_image(IMAGE)), text("An image of")], 40);
    let full = client.generate(request.clone()).await?.into_inner().text;
    let chars: Vec<char> = full.chars().collect();
    anyhow::ensure!(
        chars.len() >= 8,
        "the tiny model wrote too little to cut: {full:?}"
    );
    let stop: String = chars[4..7].iter().collect();
    let mut stopped_request = request;
    if let Some(params) = stopped_request.params.as_mut() {
        params.stop = vec![stop.clone()];
    }
    let stopped = client.generate(stopped_request.clone()).await?.into_inner();
    let cut = full
        .find(&stop)
        .expect("the stop string is in the full text");
    assert_eq!(stopped.text, full[..cut]);
    assert_eq!(stopped.finish_reason, pb::FinishReason::StopSequence as i32);
    let mut stream = client.generate_stream(stopped_request).await?.into_inner();
    let mut streamed = String::new();
    while let Some(message) = stream.message().await? {
        streamed.push_str(&message.text);
    }
    assert_eq!(
        streamed, stopped.text,
        "held-back text never leaks into the stream"
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grounding_adds_the_tag_and_returns_clean_text() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut client = cluster.client().await?;
    let mut request = greedy_request(vec![image(fixture_image(IMAGE)), text("An image of")], 12);
    let plain = client.generate(request.clone()).await?.into_inner();
    request.grounding = true;
    let grounded = client.generate(request).await?.into_inner();
    assert_eq!(
        grounded.prompt_token_ids.len(),
        plain.prompt_token_ids.len() + 1,
        "one <grounding> token"
    );
    assert!(
        !grounded.clean_text.contains('<'),
        "tags removed: {:?}",
        grounded.clean_text
    );
    for entity in &grounded.entities {
        for b in &entity.boxes {
            assert!(
                (0.0..=1.0).contains(&b.x1) && (0.0..=1.0).contains(&b.y2),
                "{b:?}"
            );
        }
    }
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await?
        .into_inner();
    assert!(info.supports_grounding);
    assert_eq!(info.num_image_tokens, 3);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unseeded_sampling_request_returns_the_seed_that_replays_it() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut client = cluster.client().await?;
    let sampled = |seed: u64| pb::GenerateRequest {
        prompt: vec![image(fixture_image(IMAGE)), text("Once upon a time")],
        params: Some(pb::GenerationParams {
            max_new_tokens: 24,
            temperature: 1.0,
            seed,
            ..Default::default()
        }),
        grounding: false,
    };
    let first = client.generate(sampled(0)).await?.into_inner();
    assert_ne!(first.seed, 0, "the gateway picked a seed and says which");
    let replayed = client.generate(sampled(first.seed)).await?.into_inner();
    assert_eq!(replayed.seed, first.seed);
    assert_eq!(
        ids(&replayed),
        ids(&first),
        "the returned seed replays the generation"
    );
    let other = client.generate(sampled(0)).await?.into_inner();
    assert_ne!(
        other.seed, first.seed,
        "each unseeded request gets its own seed"
    );

    let mut stream = client.generate_stream(sampled(77)).await?.into_inner();
    let mut last = None;
    while let Some(message) = stream.message().await? {
        last = Some(message);
    }
    assert_eq!(
        last.map(|message| message.seed),
        Some(77),
        "the last stream message carries the seed"
    );
    let greedy = client
        .generate(greedy_request(vec![text("An image of")], 4))
        .await?
        .into_inner();
    assert_eq!(greedy.seed, 0, "greedy decoding without a seed uses none");
    Ok(())
}
