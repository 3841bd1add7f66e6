//! Kosmos-2.5: the decoder serves the tiny Kosmos-2.5 model (segment embedding on the image block, `<s>` at every
//! image position), and greedy generations from `Kosmos2_5Processor`'s prompts equal HF `generate`'s ids
//! (`tests/fixtures/kosmos25/reference.safetensors`), alone and batched together.

use kosmos_model::ModelFiles;
use kosmos_proto::decoder::v1 as pb;
use kosmos_proto::tensor::v1::DType as WireDType;
use kosmos_testkit::{kosmos25_reference, tiny_kosmos25_dir};

use crate::common::{generate, greedy, request, start, tokens_segment};

/// The reference prompt `name` as segments: the ids around the image block, the first page's embedding in it.
fn prompt(name: &str, fingerprint: &str) -> Vec<pb::Segment> {
    let (ids, _) = kosmos25_reference(&format!("{name}.input_ids")).expect("ids");
    let (mask, _) =
        kosmos25_reference(&format!("{name}.image_embeds_position_mask")).expect("mask");
    let (embeds, _) = kosmos25_reference("images.image_embeds").expect("embeds");
    let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
    let first = mask.iter().position(|&m| m == 1.0).expect("placeholders");
    let count = mask.iter().filter(|&&m| m == 1.0).count();
    assert_eq!(count, 5);
    assert!(
        ids[first..first + count].iter().all(|&id| id == 0),
        "the placeholders are <s>"
    );
    let page: Vec<f32> = embeds[..5 * 24].iter().map(|&v| v as f32).collect();
    let embedding =
        kosmos_runtime::tensor::from_f32(&page, &[5, 24], WireDType::DtypeF32).expect("tensor");
    vec![
        tokens_segment(&ids[..first]),
        pb::Segment {
            kind: Some(pb::segment::Kind::Image(pb::ImageEmbedding {
                embedding: Some(embedding),
                model_fingerprint: fingerprint.to_string(),
            })),
        },
        tokens_segment(&ids[first + count..]),
    ]
}

fn expected(name: &str) -> Vec<u32> {
    let (ids, _) = kosmos25_reference(&format!("{name}.greedy_ids")).expect("greedy ids");
    ids.iter().map(|&id| id as u32).collect()
}

#[tokio::test]
async fn greedy_ids_equal_hf_generate_alone_and_batched() {
    let model = format!("model_dir={}", tiny_kosmos25_dir().display());
    let server = start(&[model.as_str()]).await;
    let info = server.info().await;
    assert_eq!(info.family, "kosmos-2.5");
    assert!(info.image_placeholder_repeated);
    assert_eq!(
        (
            info.image_placeholder_first_id,
            info.num_image_tokens,
            info.hidden_size,
            info.vocab_size
        ),
        (0, 5, 24, 122)
    );
    let fingerprint = ModelFiles::open(&tiny_kosmos25_dir())
        .expect("files")
        .fingerprint()
        .expect("fingerprint");
    assert_eq!(info.model_fingerprint, fingerprint);

    let mut client = server.client().await;
    for name in ["chat", "ocr"] {
        let generated = generate(
            &mut client,
            request(prompt(name, &fingerprint), greedy(0), 12, true),
        )
        .await
        .expect("generates");
        assert_eq!(generated.ids(), expected(name), "{name} alone");
    }
    // Both at once: one batch, the same ids.
    let (mut first, mut second) = (server.client().await, server.client().await);
    let (chat, ocr) = tokio::join!(
        generate(
            &mut first,
            request(prompt("chat", &fingerprint), greedy(0), 12, true)
        ),
        generate(
            &mut second,
            request(prompt("ocr", &fingerprint), greedy(0), 12, true)
        ),
    );
    assert_eq!(chat.expect("chat").ids(), expected("chat"), "chat batched");
    assert_eq!(ocr.expect("ocr").ids(), expected("ocr"), "ocr batched");
    server.stop().await;
}
