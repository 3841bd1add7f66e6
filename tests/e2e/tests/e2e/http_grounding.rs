//! Grounding over the HTTP API with the demo model: the entities are the gRPC API's (phrase, span, boxes in
//! [0, 1]) plus `boxes_px` in the original image's pixels, in the message and, as they complete, in the stream.

use kosmos_e2e::http::call;
use kosmos_e2e::{Cluster, ClusterOptions, image, text};
use kosmos_proto::v1 as pb;
use serde_json::{Value, json};

use crate::http_api::data_uri;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grounded_entities_carry_boxes_and_pixel_boxes() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        model_dir: kosmos_testkit::demo_model_dir(),
        gateway_overrides: vec!["http.listen=\"127.0.0.1:0\"".into()],
        ..ClusterOptions::default()
    })
    .await?;
    let addr = cluster
        .gateway_http_addr
        .ok_or_else(|| anyhow::anyhow!("no HTTP API"))?;
    let png = std::fs::read(kosmos_testkit::demo_model_dir().join("heldout/images/001.png"))?;
    let (width, height) = image::load_from_memory(&png)?.into_rgb8().dimensions();
    let mut client = cluster.client().await?;
    let grpc = client
        .generate(pb::GenerateRequest {
            prompt: vec![image(png.clone()), text("An image of")],
            params: Some(pb::GenerationParams {
                max_new_tokens: 64,
                no_repeat_ngram_size: 3,
                ..Default::default()
            }),
            grounding: true,
        })
        .await?
        .into_inner();
    assert!(
        !grpc.entities.is_empty(),
        "the demo model grounds its caption"
    );

    let body = json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(&png)}},
            {"type": "text", "text": "An image of"}]}],
        "max_tokens": 64, "no_repeat_ngram_size": 3, "grounding": true,
    });
    let chat = call(addr, "/v1/chat/completions", Some(&body))
        .await?
        .ok_json()?;
    let message = &chat["choices"][0]["message"];
    assert_eq!(message["content"], grpc.text.as_str());
    assert_eq!(message["clean_text"], grpc.clean_text.as_str());
    let entities = message["entities"].as_array().cloned().unwrap_or_default();
    assert_eq!(entities.len(), grpc.entities.len(), "{message}");
    for (entity, expected) in entities.iter().zip(&grpc.entities) {
        assert_eq!(entity["phrase"], expected.phrase.as_str());
        let span = expected.span.unwrap_or_default();
        assert_eq!(
            (entity["start"].as_u64(), entity["end"].as_u64()),
            (Some(span.start.into()), Some(span.end.into()))
        );
        for ((normalised, pixels), expected) in entity["boxes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .zip(entity["boxes_px"].as_array().cloned().unwrap_or_default())
            .zip(&expected.boxes)
        {
            let close = |value: &Value, want: f64| {
                value.as_f64().is_some_and(|got| (got - want).abs() < 1e-3)
            };
            assert!(
                close(&normalised["x1"], expected.x1.into())
                    && close(&normalised["y2"], expected.y2.into())
            );
            assert!(
                close(&pixels["x1"], f64::from(expected.x1) * f64::from(width)),
                "{pixels}"
            );
            assert!(
                close(&pixels["y2"], f64::from(expected.y2) * f64::from(height)),
                "{pixels}"
            );
        }
    }

    // Streamed: the entities arrive in the chunks, and together they are the unary answer's.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = call(addr, "/v1/chat/completions", Some(&streamed))
        .await?
        .sse_data()?;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut streamed_entities = Vec::new();
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event)?;
        if let Some(found) = chunk["choices"][0]["delta"]["entities"].as_array() {
            streamed_entities.extend(found.iter().cloned());
        }
    }
    assert_eq!(streamed_entities, entities);
    cluster.shutdown().await;
    Ok(())
}
