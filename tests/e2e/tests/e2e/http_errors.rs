//! Every failure of the HTTP API is in OpenAI's shape with the documented status: 400 naming the field (and the
//! limit), 404 for an unknown model or path, 413 for a body or an image over its limit, 429 with `Retry-After`
//! at the concurrency limit, 503 when a pool is gone, 504 past the deadline; and the gateway keeps serving.

use std::time::Duration;

use kosmos_e2e::fixture_image;
use kosmos_e2e::http::{HttpAnswer, Protocol, call, send};
use serde_json::{Value, json};

use crate::IMAGE;
use crate::http_api::{chat_body, data_uri, http_cluster, model_id};

/// Asserts an error answer: its status, OpenAI's shape, and that the message names `names`.
fn expect_error(what: &str, answer: &HttpAnswer, status: u16, names: &str) -> Value {
    assert_eq!(
        answer.status.as_u16(),
        status,
        "{what}: {}",
        String::from_utf8_lossy(&answer.body)
    );
    let body = answer
        .json()
        .unwrap_or_else(|err| panic!("{what}: {err:#}"));
    let error = &body["error"];
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(names),
        "{what}: `{message}` should name {names}"
    );
    assert!(error["type"].is_string(), "{what}: {body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{what}: {body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_mistake_is_a_4xx_naming_the_field_and_the_gateway_keeps_serving()
-> anyhow::Result<()> {
    let (cluster, addr) = http_cluster(&[
        "limits.max_image_bytes=20000",
        "grpc.max_message_bytes=1048576",
    ])
    .await?;
    let model = model_id(addr).await?;
    let png = fixture_image(IMAGE);
    let good = chat_body(&model, &data_uri(&png), "An image of", 3);
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let chat = |body: Value| async move { call(addr, "/v1/chat/completions", Some(&body)).await };

    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("n = 2", with("n", json!(2)), 400, "`n`"),
        (
            "max_tokens over the limit",
            with("max_tokens", json!(5000)),
            400,
            "`max_tokens` is 5000, above the limit `limits.max_new_tokens`",
        ),
        (
            "a negative temperature",
            with("temperature", json!(-1.0)),
            400,
            "`temperature`",
        ),
        ("top_p above 1", with("top_p", json!(1.5)), 400, "`top_p`"),
        (
            "a string temperature",
            with("temperature", json!("hot")),
            400,
            "`temperature`",
        ),
        (
            "an unknown role",
            with("messages", json!([{"role": "tool", "content": "x"}])),
            400,
            "`messages[0].role`",
        ),
        (
            "no messages",
            with("messages", json!([])),
            400,
            "`messages`",
        ),
        (
            "an unknown model",
            with("model", json!("gpt-4o")),
            404,
            "gpt-4o",
        ),
        (
            "bytes that are no image",
            chat_body(&model, "data:image/png;base64,R0lGODlhAQABAAAAACw=", "x", 3),
            400,
            "`messages[0].content[0].image_url`",
        ),
        (
            "a data: URI that is not base64",
            chat_body(&model, "data:image/png,abc", "x", 3),
            400,
            "`messages[0].content[0].image_url.url`",
        ),
        (
            "an image URL while fetching is off",
            chat_body(&model, "http://example.com/cat.png", "x", 3),
            400,
            "`http.fetch_urls` is off",
        ),
        (
            "an image over limits.max_image_bytes",
            chat_body(&model, &data_uri(&vec![7u8; 30_000]), "x", 3),
            413,
            "limits.max_image_bytes",
        ),
        (
            "a reserved tag in the text",
            with(
                "messages",
                json!([{"role": "user", "content": "<image> x"}]),
            ),
            400,
            "`messages[0].content` contains the reserved tag",
        ),
    ];
    for (what, body, status, names) in cases {
        let answer = chat(body).await?;
        expect_error(what, &answer, status, names);
    }
    let answer = call(addr, "/v1/completions", Some(&json!({"messages": []}))).await?;
    expect_error("messages on /v1/completions", &answer, 400, "`messages`");
    let answer = call(addr, "/v1/score", Some(&json!({"prompt": "x"}))).await?;
    expect_error("score without candidates", &answer, 400, "`candidates`");
    let answer = call(addr, "/v1/nothing", None).await?;
    expect_error("an unknown path", &answer, 404, "/v1/nothing");
    let answer = call(addr, "/v1/models/other", None).await?;
    expect_error("an unknown model id", &answer, 404, "other");
    let answer = call(addr, "/v1/chat/completions", None).await?;
    expect_error("GET on a POST route", &answer, 405, "GET");
    let answer = send(
        addr,
        Protocol::Http1,
        http::Method::POST,
        "/v1/chat/completions",
        &[],
        Some(b"{\"messages\": [".to_vec()),
    )
    .await?;
    expect_error("malformed JSON", &answer, 400, "EOF while parsing");
    // The body limit: `grpc.max_message_bytes` × 4/3 (1 MiB here).
    let huge = chat_body(
        &model,
        &format!("data:image/png;base64,{}", "A".repeat(1_500_000)),
        "x",
        3,
    );
    let answer = chat(huge).await?;
    expect_error("a body over the limit", &answer, 413, "over the limit");

    // Still serving, and the same request answered whole.
    let answer = chat(good.clone()).await?;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );

    // With the only encoder gone, a request with an image not in the cache is 503; the gateway stays ready (the
    // decoder serves text).
    cluster.stop_encoder(0);
    let mut unavailable = None;
    for attempt in 0..100 {
        let fresh = chat_body(
            &model,
            &data_uri(&crate::distinct_png(attempt)),
            "An image of",
            3,
        );
        let answer = chat(fresh).await?;
        if answer.status == 503 {
            unavailable = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = unavailable.expect("503 once the encoder is gone");
    expect_error("no encoder", &answer, 503, "encoder");
    assert_eq!(
        call(addr, "/ready", None).await?.status,
        200,
        "ready without an encoder: text is still served"
    );
    assert_eq!(call(addr, "/health", None).await?.status, 200);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_is_429_with_retry_after() -> anyhow::Result<()> {
    let (cluster, addr) = http_cluster(&["limits.max_concurrent_requests=1"]).await?;
    let mut client = cluster.client().await?;
    let mut held = client
        .generate_stream(crate::resilience::long_request())
        .await?
        .into_inner();
    let _ = held.message().await?;
    let answer = call(
        addr,
        "/v1/completions",
        Some(&json!({"prompt": "Hello", "max_tokens": 2})),
    )
    .await?;
    let body = expect_error(
        "over the concurrency limit",
        &answer,
        429,
        "max_concurrent_requests",
    );
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(
        answer
            .headers
            .get(http::header::RETRY_AFTER)
            .map(|value| value.as_bytes()),
        Some(&b"1"[..])
    );
    drop(held);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bodies_share_the_byte_budget_with_grpc_calls() -> anyhow::Result<()> {
    const BUDGET: usize = 20_000;
    let budget = format!("limits.max_inflight_bytes={BUDGET}");
    let message = format!("grpc.max_message_bytes={BUDGET}");
    let (cluster, addr) = http_cluster(&[budget.as_str(), message.as_str()]).await?;
    // A body of `size` bytes: a short completion padded by OpenAI's `user` field (which the API ignores).
    let body_of = |size: usize| {
        let bare = json!({"prompt": "Hello", "max_tokens": 2, "user": ""}).to_string();
        json!({"prompt": "Hello", "max_tokens": 2, "user": "u".repeat(size - bare.len())})
    };
    assert_eq!(body_of(12_000).to_string().len(), 12_000);
    // A gRPC stream holds its request's bytes while it runs.
    let mut client = cluster.client().await?;
    let mut held = client
        .generate_stream(crate::resilience::long_request())
        .await?
        .into_inner();
    let _ = held.message().await?;
    let holding = cluster.gateway().stats().inflight_bytes as usize;
    assert!(holding > 0, "the stream holds its bytes");
    // An HTTP body that fits the budget alone but not beside the stream: 429, before a byte of it is read.
    let answer = call(
        addr,
        "/v1/completions",
        Some(&body_of(BUDGET - holding + 1)),
    )
    .await?;
    let body = expect_error(
        "over the byte budget",
        &answer,
        429,
        "limits.max_inflight_bytes",
    );
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(answer.headers.contains_key(http::header::RETRY_AFTER));
    // Once the stream ends its bytes return, and the same body is served.
    drop(held);
    let drained = || async {
        let started = std::time::Instant::now();
        while cluster.gateway().stats().inflight_bytes != 0 {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "bytes still held: {}",
                cluster.gateway().stats().inflight_bytes
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    };
    drained().await?;
    let answer = call(
        addr,
        "/v1/completions",
        Some(&body_of(BUDGET - holding + 1)),
    )
    .await?;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    // The HTTP call's bytes return with its response.
    drained().await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_504() -> anyhow::Result<()> {
    let (cluster, addr) = http_cluster(&["http.request_timeout_seconds=0.000001"]).await?;
    let answer = call(
        addr,
        "/v1/completions",
        Some(&json!({"prompt": "Hello", "max_tokens": 2})),
    )
    .await?;
    let body = expect_error("past the deadline", &answer, 504, "deadline exceeded");
    assert_eq!(body["error"]["type"], "timeout_error");
    cluster.shutdown().await;
    Ok(())
}
