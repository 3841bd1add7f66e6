//! `/metrics` after known traffic (one Generate with an image, one Score, one refused Generate): the counts are
//! right, and the families are exactly the decoder's rows of `docs/metrics.md` (names, types, help texts,
//! labels); `promtool check metrics` accepts the text.

use std::time::{Duration, Instant};

use kosmos_proto::decoder::v1 as pb;
use tonic::Code;

use crate::common::{
    fingerprint, generate, greedy, image_segment, pseudo_random_ids, request, start, tokens_segment,
};
use crate::metrics_catalogue::{assert_matches_catalogue, parse, promtool_check, scrape, value};

const GENERATE: &str = "kosmos.decoder.v1.Decoder/Generate";
const SCORE: &str = "kosmos.decoder.v1.Decoder/Score";
const NEW_TOKENS: u32 = 4;

fn calls(scrape: &prometheus_parse::Scrape, method: &str, code: &str) -> f64 {
    value(
        scrape,
        "rpc_server_call_duration_seconds_count",
        &[("rpc_method", method), ("rpc_response_status_code", code)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_traffic_and_match_the_catalogue() {
    let server = start(&[]).await;
    let mut client = server.client().await;

    // 5 + 3 text tokens around one image (3 positions), 4 new tokens.
    let rows: Vec<f32> = (0..3 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
    let prompt = vec![
        tokens_segment(&pseudo_random_ids(7, 5)),
        image_segment(&rows, &fingerprint()),
        tokens_segment(&pseudo_random_ids(8, 3)),
    ];
    let generated = generate(&mut client, request(prompt, greedy(0), NEW_TOKENS, true))
        .await
        .expect("generates");
    assert_eq!(generated.ids().len(), NEW_TOKENS as usize);

    // A 10-token context and candidates of 1 and 3 tokens.
    client
        .score(pb::ScoreRequest {
            tenant: String::new(),
            context: vec![tokens_segment(&pseudo_random_ids(9, 10))],
            candidates: vec![
                pb::Candidate {
                    ids: pseudo_random_ids(10, 1),
                },
                pb::Candidate {
                    ids: pseudo_random_ids(11, 3),
                },
            ],
        })
        .await
        .expect("scores");

    // Refused at the edge: an empty prompt.
    let refused = generate(&mut client, request(Vec::new(), greedy(0), 2, true))
        .await
        .expect_err("an empty prompt is refused");
    assert_eq!(refused.code(), Code::InvalidArgument);

    // A call is recorded when its last frame is written: wait until the scrape shows all three, and an idle engine.
    let started = Instant::now();
    let (text, scraped) = loop {
        let text = scrape(server.metrics_addr).await.expect("scrape");
        let scraped = parse(&text).expect("parses");
        let seen = calls(&scraped, GENERATE, "OK")
            + calls(&scraped, GENERATE, "INVALID_ARGUMENT")
            + calls(&scraped, SCORE, "OK");
        // The engine publishes its load after the step that answered the last request.
        let idle = value(&scraped, "kosmos_decoder_num_requests_running", &[]) == 0.0
            && value(&scraped, "kosmos_decoder_kv_cache_usage_perc", &[]) == 0.0;
        if (seen >= 3.0 && idle) || started.elapsed() > Duration::from_secs(10) {
            break (text, scraped);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let get = |metric: &str, labels: &[(&str, &str)]| value(&scraped, metric, labels);
    let generation = ("gen_ai_operation_name", "text_completion");
    let scoring = ("gen_ai_operation_name", "score");
    let model = ("gen_ai_request_model", "tiny");

    assert_eq!(calls(&scraped, GENERATE, "OK"), 1.0, "{text}");
    assert_eq!(calls(&scraped, GENERATE, "INVALID_ARGUMENT"), 1.0, "{text}");
    assert_eq!(calls(&scraped, SCORE, "OK"), 1.0, "{text}");

    let finished = |reason: &str| {
        get(
            "kosmos_decoder_finished_requests_total",
            &[("finish_reason", reason)],
        )
    };
    assert_eq!(finished("length"), 1.0, "{text}");
    assert_eq!(finished("stop"), 1.0, "the completed scoring\n{text}");
    assert_eq!(
        finished("error") + finished("cancelled") + finished("deadline"),
        0.0
    );

    let duration = "gen_ai_server_request_duration_seconds_count";
    assert_eq!(get(duration, &[generation, model]), 2.0, "{text}");
    assert_eq!(
        get(duration, &[generation, ("error_type", "INVALID_ARGUMENT")]),
        1.0,
        "{text}"
    );
    assert_eq!(get(duration, &[scoring, model]), 1.0, "{text}");
    assert_eq!(
        get(
            "gen_ai_server_time_to_first_token_seconds_count",
            &[generation, model]
        ),
        1.0
    );
    assert_eq!(
        get(
            "gen_ai_server_time_per_output_token_seconds_count",
            &[generation, model]
        ),
        1.0
    );
    let tokens = |operation: (&'static str, &'static str), kind: &'static str| {
        get(
            "gen_ai_server_token_usage_sum",
            &[operation, model, ("gen_ai_token_type", kind)],
        )
    };
    assert_eq!(tokens(generation, "input"), 8.0, "{text}");
    assert_eq!(tokens(generation, "image"), 3.0, "{text}");
    assert_eq!(
        tokens(generation, "output"),
        f64::from(NEW_TOKENS),
        "{text}"
    );
    assert_eq!(tokens(scoring, "input"), 14.0, "{text}");
    assert_eq!(tokens(scoring, "output"), 0.0, "{text}");

    assert_eq!(
        get("kosmos_decoder_queue_time_seconds_count", &[]),
        2.0,
        "{text}"
    );
    assert_eq!(
        get("kosmos_decoder_prefill_time_seconds_count", &[]),
        2.0,
        "{text}"
    );
    assert_eq!(
        get("kosmos_decoder_decode_time_seconds_count", &[]),
        1.0,
        "{text}"
    );
    // 4 steps for the generation, 2 for the scoring (context, then the 3-token candidate).
    let steps = get("kosmos_decoder_batch_occupancy_count", &[]);
    assert!((2.0..=6.0).contains(&steps), "{steps} steps\n{text}");
    assert_eq!(
        get("kosmos_decoder_num_requests_running", &[]),
        0.0,
        "{text}"
    );
    assert_eq!(
        get("kosmos_decoder_num_requests_waiting", &[]),
        0.0,
        "{text}"
    );
    assert_eq!(
        get("kosmos_decoder_kv_cache_usage_perc", &[]),
        0.0,
        "{text}"
    );
    let fingerprint = fingerprint();
    let info = [
        ("service", "decoder"),
        ("model", "tiny"),
        ("model_fingerprint", fingerprint.as_str()),
    ];
    assert_eq!(get("kosmos_build_info", &info), 1.0, "{text}");

    assert_matches_catalogue(&text, "decoder").expect("matches docs/metrics.md");
    promtool_check(&text).expect("promtool accepts the exposition");
    server.stop().await;
}
