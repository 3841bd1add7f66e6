//! Kosmos-2.5 through the gateway: the tiny Kosmos-2.5 model (`tests/fixtures/kosmos25/tiny`) served by an
//! encoder, a decoder and the gateway. A page and a task give the prompt ids of HF's `Kosmos2_5Processor` and the
//! greedy ids of HF's `generate` (`tests/fixtures/kosmos25/reference.safetensors`), unary and streamed; `<ocr>`
//! answers come with their lines; prompts that are not one page and one task are refused by name.

use kosmos_e2e::http::call;
use kosmos_e2e::{Cluster, ClusterOptions, image, text};
use kosmos_proto::v1 as pb;
use kosmos_testkit::{kosmos25_fixture, kosmos25_reference, tiny_kosmos25_dir};
use tokio_stream::StreamExt as _;

use crate::http_api::{data_uri, model_id};

fn reference_ids(key: &str) -> Vec<u32> {
    let (values, _) = kosmos25_reference(key).expect("reference tensor");
    values.iter().map(|&v| v as u32).collect()
}

fn page() -> Vec<u8> {
    kosmos25_fixture("images/page_landscape_300x200.png").expect("page")
}

fn request(task: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: vec![image(page()), text(task)],
        params: Some(pb::GenerationParams {
            max_new_tokens: 12,
            ..Default::default()
        }),
        grounding: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_and_a_task_give_hf_prompt_and_greedy_ids() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        model_dir: tiny_kosmos25_dir(),
        gateway_overrides: vec!["http.listen=\"127.0.0.1:0\"".to_string()],
        ..ClusterOptions::default()
    })
    .await?;
    let mut client = cluster.client().await?;
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(info.family, "kosmos-2.5");
    assert_eq!(info.num_image_tokens, 5);
    assert!(!info.supports_grounding);
    // A page's text is long: its own default length, stated with the limits.
    assert_eq!(
        info.limits.expect("limits").default_max_new_tokens_pages,
        1024
    );

    for (task, name) in [("<ocr>", "ocr"), ("<md>Total? A:", "chat")] {
        let response = client.generate(request(task)).await?.into_inner();
        // Image positions hold `<s>` (id 0), as in the processor's ids.
        assert_eq!(
            response.prompt_token_ids,
            reference_ids(&format!("{name}.input_ids")),
            "{name}"
        );
        let ids: Vec<u32> = response.tokens.iter().map(|token| token.id).collect();
        assert_eq!(ids, reference_ids(&format!("{name}.greedy_ids")), "{name}");
        let concatenated: String = response
            .tokens
            .iter()
            .map(|token| token.text.as_str())
            .collect();
        assert_eq!(response.text, concatenated, "{name}");
        if name == "ocr" {
            // The random model writes no box: its answer is one line without one.
            assert_eq!(response.lines.len(), 1, "{:?}", response.lines);
            assert_eq!(response.lines[0].text, response.text.trim_end_matches('\n'));
            assert!(response.lines[0].r#box.is_none() && response.lines[0].box_px.is_none());
        } else {
            assert!(response.lines.is_empty(), "only <ocr> answers have lines");
        }

        // Streamed: the same tokens, and the same lines once the stream ends.
        let mut stream = client.generate_stream(request(task)).await?.into_inner();
        let (mut streamed, mut lines) = (Vec::new(), Vec::new());
        while let Some(message) = stream.next().await {
            let message = message?;
            streamed.extend(message.tokens.iter().map(|token| token.id));
            lines.extend(message.lines);
        }
        assert_eq!(streamed, ids, "{name} streamed");
        assert_eq!(lines, response.lines, "{name} streamed lines");

        // The OpenAI-compatible API: the same answer, and the lines beside the content.
        let addr = cluster.gateway_http_addr.expect("http");
        let body = serde_json::json!({
            "model": model_id(addr).await?,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri(&page())}},
                {"type": "text", "text": task},
            ]}],
            "max_tokens": 12,
        });
        let answer = call(addr, "/v1/chat/completions", Some(&body))
            .await?
            .ok_json()?;
        let message = &answer["choices"][0]["message"];
        assert_eq!(
            message["content"],
            response.text.as_str(),
            "{name} over HTTP"
        );
        if name == "ocr" {
            assert_eq!(message["lines"][0]["text"], response.lines[0].text.as_str());
            assert!(message["lines"][0]["box"].is_null());
        } else {
            assert!(message.get("lines").is_none());
        }
    }
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kosmos_2_5_prompt_is_one_page_then_the_task() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        model_dir: tiny_kosmos25_dir(),
        ..ClusterOptions::default()
    })
    .await?;
    let mut client = cluster.client().await?;
    for prompt in [
        vec![text("<ocr>"), image(page())],
        vec![image(page()), image(page()), text("<ocr>")],
        vec![text("<md> no page")],
    ] {
        let status = client
            .generate(pb::GenerateRequest {
                prompt,
                params: None,
                grounding: false,
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("Kosmos-2.5"),
            "{}",
            status.message()
        );
    }
    let mut grounded = request("<ocr>");
    grounded.grounding = true;
    let status = client.generate(grounded).await.expect_err("no grounding");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("grounding"),
        "{}",
        status.message()
    );
    cluster.shutdown().await;
    Ok(())
}
