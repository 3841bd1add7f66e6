//! The OpenAI-compatible HTTP API answers what the gRPC API answers for the same prompt: chat completions (unary
//! and SSE), text completions, log-probabilities, Score, the model list, health and readiness, over HTTP/1.1 and
//! HTTP/2.

use base64::Engine as _;
use kosmos_e2e::http::{Protocol, call, send};
use kosmos_e2e::{Cluster, ClusterOptions, fixture_image, image, text};
use kosmos_proto::v1 as pb;
use serde_json::{Value, json};

use crate::{IMAGE, greedy_request};

/// A cluster serving the HTTP API on a free port.
pub async fn http_cluster(extra: &[&str]) -> anyhow::Result<(Cluster, std::net::SocketAddr)> {
    let mut gateway_overrides = vec!["http.listen=\"127.0.0.1:0\"".to_string()];
    gateway_overrides.extend(extra.iter().map(|item| item.to_string()));
    let cluster = Cluster::start(ClusterOptions {
        gateway_overrides,
        ..ClusterOptions::default()
    })
    .await?;
    let addr = cluster
        .gateway_http_addr
        .ok_or_else(|| anyhow::anyhow!("the gateway serves no HTTP API"))?;
    Ok((cluster, addr))
}

/// `data:` URI of a PNG.
pub fn data_uri(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// A chat request of one user message [image, text], greedy with the reference's n-gram ban.
pub fn chat_body(model: &str, image_url: &str, prompt: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": prompt},
        ]}],
        "max_tokens": max_tokens,
        "no_repeat_ngram_size": 3,
    })
}

/// The served model's id, from `GET /v1/models`.
pub async fn model_id(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let models = call(addr, "/v1/models", None).await?.json()?;
    Ok(models["data"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_text_completions_answer_what_grpc_answers() -> anyhow::Result<()> {
    let (cluster, addr) = http_cluster(&[]).await?;
    let mut client = cluster.client().await?;
    let png = fixture_image(IMAGE);

    // The model list names the model directory and carries the fingerprint GetModelInfo gives.
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await?
        .into_inner();
    let models = call(addr, "/v1/models", None).await?;
    assert_eq!(models.status, 200);
    let models = models.json()?;
    let model = models["data"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        Some(model.as_str()),
        kosmos_e2e::tiny_model_dir()
            .file_name()
            .and_then(|name| name.to_str())
    );
    assert_eq!(models["data"][0]["fingerprint"], info.model_fingerprint);
    assert_eq!(
        call(addr, &format!("/v1/models/{model}"), None)
            .await?
            .status,
        200
    );
    assert_eq!(call(addr, "/health", None).await?.status, 200);
    assert_eq!(call(addr, "/ready", None).await?.status, 200);

    // One user message [image, text] is the gRPC prompt [image, text]: same prompt tokens, same greedy text.
    let grpc = client
        .generate(greedy_request(
            vec![image(png.clone()), text("An image of")],
            12,
        ))
        .await?
        .into_inner();
    let body = chat_body(&model, &data_uri(&png), "An image of", 12);
    let chat = call(addr, "/v1/chat/completions", Some(&body))
        .await?
        .ok_json()?;
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert_eq!(chat["choices"][0]["message"]["content"], grpc.text.as_str());
    let usage = grpc.usage.unwrap_or_default();
    assert_eq!(chat["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(chat["usage"]["completion_tokens"], usage.completion_tokens);
    assert_eq!(
        chat["usage"]["total_tokens"],
        usage.prompt_tokens + usage.completion_tokens
    );
    assert_eq!(chat["usage"]["image_tokens"], usage.image_tokens);
    let expected_finish = if grpc.finish_reason == pb::FinishReason::Length as i32 {
        "length"
    } else {
        "stop"
    };
    assert_eq!(chat["choices"][0]["finish_reason"], expected_finish);
    assert_eq!(chat["system_fingerprint"], info.model_fingerprint);

    // The same over HTTP/2 (prior knowledge).
    let h2 = send(
        addr,
        Protocol::Http2,
        http::Method::POST,
        "/v1/chat/completions",
        &[],
        Some(body.to_string().into_bytes()),
    )
    .await?;
    assert_eq!(h2.status, 200);
    assert_eq!(
        h2.json()?["choices"][0]["message"]["content"],
        grpc.text.as_str()
    );

    // Streaming: every line a `data:` event, chunks joining to the unary text, a usage chunk, then [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let answer = call(addr, "/v1/chat/completions", Some(&streamed)).await?;
    assert_eq!(answer.status, 200);
    assert!(
        answer.headers[http::header::CONTENT_TYPE]
            .to_str()?
            .starts_with("text/event-stream")
    );
    let events = answer.sse_data()?;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event))
        .collect::<Result<_, _>>()?;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, grpc.text);
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|chunk| &chunk["choices"][0]["finish_reason"])
        .filter(|finish| !finish.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!(expected_finish)]);
    let last = chunks.last().cloned().unwrap_or_default();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], usage.completion_tokens);
    assert!(
        chunks
            .iter()
            .all(|chunk| chunk["object"] == "chat.completion.chunk")
    );

    // Chat log-probabilities: one entry per token, each with the asked top log-probabilities.
    let mut with_logprobs = body.clone();
    with_logprobs["logprobs"] = json!(true);
    with_logprobs["top_logprobs"] = json!(2);
    let chat = call(addr, "/v1/chat/completions", Some(&with_logprobs))
        .await?
        .json()?;
    let content = chat["choices"][0]["logprobs"]["content"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!content.is_empty(), "{chat}");
    for entry in &content {
        assert!(
            entry["logprob"]
                .as_f64()
                .is_some_and(|logprob| logprob <= 0.0),
            "{entry}"
        );
        assert_eq!(
            entry["top_logprobs"].as_array().map(Vec::len),
            Some(2),
            "{entry}"
        );
    }

    // A text-only completion equals the gRPC text-only generation, with completions' log-probabilities.
    let grpc_text = client
        .generate(greedy_request(vec![text("Hello there")], 6))
        .await?
        .into_inner();
    let completion = call(
        addr,
        "/v1/completions",
        Some(
            &json!({"model": model, "prompt": "Hello there", "max_tokens": 6,
                     "no_repeat_ngram_size": 3, "logprobs": 2}),
        ),
    )
    .await?
    .json()?;
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["choices"][0]["text"], grpc_text.text.as_str());
    let logprobs = &completion["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"]
        .as_array()
        .map(Vec::len)
        .unwrap_or_default();
    assert!(tokens > 0, "{completion}");
    assert_eq!(
        logprobs["token_logprobs"].as_array().map(Vec::len),
        Some(tokens)
    );
    assert_eq!(
        logprobs["text_offset"].as_array().map(Vec::len),
        Some(tokens)
    );

    // A streamed completion ends with [DONE] and joins to the same text.
    let events = call(
        addr,
        "/v1/completions",
        Some(&json!({"prompt": ["Hello there"], "max_tokens": 6, "no_repeat_ngram_size": 3, "stream": true})),
    )
    .await?
    .sse_data()?;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let joined: String = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str::<Value>(event))
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(joined, grpc_text.text);

    // Score: the gRPC Score result in JSON.
    let candidates = vec!["a gradient".to_string(), "a cat".to_string()];
    let grpc_score = client
        .score(pb::ScoreRequest {
            prompt: vec![image(png.clone()), text("An image of")],
            candidates: candidates.clone(),
        })
        .await?
        .into_inner();
    let scored = call(
        addr,
        "/v1/score",
        Some(&json!({"model": model, "candidates": candidates, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(&png)}},
            {"type": "text", "text": "An image of"}]}]})),
    )
    .await?
    .json()?;
    assert_eq!(scored["best_index"], grpc_score.best_index);
    for (json_score, grpc) in scored["scores"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .zip(&grpc_score.scores)
    {
        assert_eq!(json_score["candidate"], grpc.candidate.as_str());
        let sum = json_score["sum_logprob"].as_f64().unwrap_or(f64::NAN);
        assert!(
            (sum - grpc.sum_logprob).abs() < 1e-9,
            "{sum} vs {}",
            grpc.sum_logprob
        );
    }
    assert_eq!(
        scored["prompt_token_ids"].as_array().map(Vec::len),
        Some(grpc_score.prompt_token_ids.len())
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_continues_the_callers_trace_through_the_pipeline() -> anyhow::Result<()> {
    let spans = kosmos_testkit::traces::collect();
    let (cluster, addr) = http_cluster(&[]).await?;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = kosmos_testkit::traces::traceparent(trace_id);
    let answer = send(
        addr,
        Protocol::Http1,
        http::Method::POST,
        "/v1/completions",
        &[("traceparent", traceparent.as_str())],
        Some(
            json!({"prompt": "Hello", "max_tokens": 2})
                .to_string()
                .into_bytes(),
        ),
    )
    .await?;
    assert_eq!(answer.status, 200);
    let in_trace = |name: &str| {
        spans
            .named(name)
            .iter()
            .any(|span| kosmos_testkit::traces::trace_of(span).to_string() == trace_id)
    };
    let mut seen = false;
    for _ in 0..100 {
        // The server span takes its `otel.name`, as the gRPC server spans do.
        seen = in_trace("POST /v1/completions") && in_trace("gateway.tokenize");
        if seen {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let names: Vec<String> = spans
        .spans()
        .iter()
        .filter(|span| kosmos_testkit::traces::trace_of(span).to_string() == trace_id)
        .map(|span| span.name.to_string())
        .collect();
    assert!(
        seen,
        "the server span and the pipeline's spans continue the caller's trace: {names:?}"
    );
    cluster.shutdown().await;
    Ok(())
}
