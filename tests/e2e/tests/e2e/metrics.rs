//! `/metrics` of all three services after known traffic through the gateway: the counts agree with what was sent,
//! the gateway's exposition equals its rows of `docs/metrics.md`, parses, and passes `promtool check metrics`.

use kosmos_e2e::{Cluster, ClusterOptions, fixture_image, image, text};
use kosmos_testkit::metrics::{
    assert_matches_catalogue, parse, promtool_check, scrape, scrape_eventually, value,
};

use crate::{distinct_png, greedy_request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_counts_the_traffic_it_saw() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut client = cluster.client().await?;
    let tokens_per_image = cluster.gateway().model().expect("ready").num_image_tokens as f64;
    let (a, b, c) = (distinct_png(1), distinct_png(2), distinct_png(3));

    // Two images, then one repeat (a cache hit) and one new: three images encoded, four looked up.
    let first = client
        .generate(greedy_request(
            vec![image(a.clone()), text("and"), image(b), text("Describe:")],
            5,
        ))
        .await?
        .into_inner();
    let second = client
        .generate(greedy_request(vec![image(a), image(c), text("Again:")], 5))
        .await?
        .into_inner();
    // A refused request: counted by status, not as tokens.
    let refused = client.generate(greedy_request(Vec::new(), 5)).await;
    assert_eq!(
        refused.expect_err("an empty prompt is refused").code(),
        tonic::Code::InvalidArgument
    );
    let usage = |r: &kosmos_proto::v1::GenerateResponse| r.usage.expect("usage");
    let completion = f64::from(usage(&first).completion_tokens + usage(&second).completion_tokens);
    let prompt_text = f64::from(
        usage(&first).prompt_tokens + usage(&second).prompt_tokens
            - usage(&first).image_tokens
            - usage(&second).image_tokens,
    );

    let exposition = scrape(cluster.gateway_metrics_addr).await?;
    let gateway = parse(&exposition)?;
    let generate = "kosmos.v1.Kosmos/Generate";
    let calls = |scrape: &prometheus_parse::Scrape, method: &str, code: &str| {
        value(
            scrape,
            "rpc_server_call_duration_seconds_count",
            &[("rpc_method", method), ("rpc_response_status_code", code)],
        )
    };
    assert_eq!(calls(&gateway, generate, "OK"), 2.0);
    assert_eq!(calls(&gateway, generate, "INVALID_ARGUMENT"), 1.0);
    assert_eq!(
        value(
            &gateway,
            "kosmos_gateway_embedding_cache_queries_total",
            &[]
        ),
        4.0
    );
    assert_eq!(
        value(&gateway, "kosmos_gateway_embedding_cache_hits_total", &[]),
        1.0
    );
    assert_eq!(
        value(&gateway, "kosmos_gateway_embedding_cache_entries", &[]),
        3.0
    );
    assert_eq!(
        value(
            &gateway,
            "kosmos_gateway_pool_calls_total",
            &[("pool", "encoder")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &gateway,
            "kosmos_gateway_pool_calls_total",
            &[("pool", "decoder")]
        ),
        2.0
    );
    for gauge in [
        "kosmos_gateway_pool_pending_requests",
        "kosmos_gateway_pool_inflight_requests",
    ] {
        assert_eq!(
            value(&gateway, gauge, &[("pool", "encoder")]),
            0.0,
            "{gauge}"
        );
        assert_eq!(
            value(&gateway, gauge, &[("pool", "decoder")]),
            0.0,
            "{gauge}"
        );
    }
    assert_eq!(
        value(
            &gateway,
            "kosmos_gateway_pool_ready_replicas",
            &[("pool", "decoder")]
        ),
        1.0
    );
    let tokens = |scrape: &prometheus_parse::Scrape, kind: &str| {
        value(
            scrape,
            "gen_ai_server_token_usage_sum",
            &[
                ("gen_ai_operation_name", "text_completion"),
                ("gen_ai_token_type", kind),
            ],
        )
    };
    assert_eq!(tokens(&gateway, "output"), completion);
    assert_eq!(tokens(&gateway, "image"), 4.0 * tokens_per_image);
    assert_eq!(tokens(&gateway, "input"), prompt_text);
    assert_eq!(
        value(
            &gateway,
            "gen_ai_server_time_to_first_token_seconds_count",
            &[]
        ),
        2.0
    );
    assert_eq!(
        value(
            &gateway,
            "gen_ai_server_request_duration_seconds_count",
            &[("error_type", "INVALID_ARGUMENT")]
        ),
        1.0
    );
    let info = gateway
        .samples
        .iter()
        .find(|s| s.metric == "kosmos_build_info")
        .expect("build info");
    assert_eq!(info.labels.get("service"), Some("gateway"));
    assert_eq!(info.labels.get("model"), Some("tiny"));
    assert_matches_catalogue(&exposition, "gateway")?;
    promtool_check(&exposition)?;

    // The encoder encoded the three distinct images; the decoder generated what the gateway returned.
    let encoder = parse(&scrape(cluster.encoder_metrics_addrs[0]).await?)?;
    assert_eq!(
        value(&encoder, "kosmos_encoder_images_encoded_total", &[]),
        3.0
    );
    // The decoder counts a stream when its trailers pass, which can be just after the gateway has answered.
    let decoder_generate = "kosmos.decoder.v1.Decoder/Generate";
    let decoder = scrape_eventually(
        cluster.decoder_metrics_addrs[0],
        std::time::Duration::from_secs(10),
        |scrape| calls(scrape, decoder_generate, "OK") >= 2.0,
    )
    .await?;
    assert_eq!(calls(&decoder, decoder_generate, "OK"), 2.0);
    assert_eq!(calls(&decoder, decoder_generate, "CANCELLED"), 0.0);
    assert_eq!(tokens(&decoder, "output"), completion);
    assert_eq!(tokens(&decoder, "image"), 4.0 * tokens_per_image);

    // A repeat of a fixture image through Score: one more lookup, counted under its own operation.
    let scored = client
        .score(kosmos_proto::v1::ScoreRequest {
            prompt: vec![image(fixture_image(crate::IMAGE)), text("This is")],
            candidates: vec![" red".into(), " blue".into()],
        })
        .await?
        .into_inner();
    assert_eq!(scored.scores.len(), 2);
    let gateway = parse(&scrape(cluster.gateway_metrics_addr).await?)?;
    assert_eq!(
        value(
            &gateway,
            "gen_ai_server_request_duration_seconds_count",
            &[("gen_ai_operation_name", "score")]
        ),
        1.0
    );
    assert_eq!(calls(&gateway, "kosmos.v1.Kosmos/Score", "OK"), 1.0);
    cluster.shutdown().await;
    Ok(())
}
