//! Kosmos-2.5 pages: the encoder serves the tiny Kosmos-2.5 model, and a page's embedding is what HF transformers
//! computed for it (`tests/fixtures/kosmos25/reference.safetensors`, `images.image_embeds`).

use anyhow::{Result, ensure};
use kosmos_proto::tensor::v1::DType;
use kosmos_testkit::{fixture_image, kosmos25_fixture, kosmos25_reference, tiny_kosmos25_dir};

use crate::common::{TestServer, max_abs_diff, request};

#[tokio::test]
async fn pages_are_encoded_as_hf_encodes_them() -> Result<()> {
    let model = format!("model_dir={}", tiny_kosmos25_dir().display());
    let server = TestServer::start(&[model.as_str()]).await?;
    let info = server.info().await?;
    ensure!(info.family == "kosmos-2.5", "family {:?}", info.family);
    ensure!(
        (
            info.image_size,
            info.max_patches,
            info.tokens_per_image,
            info.hidden_size
        ) == (0, 16, 5, 24),
        "{info:?}"
    );
    let (expected, shape) = kosmos25_reference("images.image_embeds")?;
    ensure!(shape == vec![3, 5, 24], "{shape:?}");
    // The reference's three pages, in its order, in one request (one batch).
    let pages = vec![
        kosmos25_fixture("images/page_landscape_300x200.png")?,
        fixture_image("d_gray_37x23.png")?,
        fixture_image("e_blocks_64x64.png")?,
    ];
    let response = server
        .encode(request(pages, DType::DtypeUnspecified))
        .await?;
    ensure!(response.embeddings.len() == 3, "three embeddings");
    for (index, tensor) in response.embeddings.iter().enumerate() {
        let served = kosmos_runtime::tensor::to_f32(tensor, Some(&[5, 24]))?;
        let reference: Vec<f32> = expected[index * 120..(index + 1) * 120]
            .iter()
            .map(|&v| v as f32)
            .collect();
        let diff = max_abs_diff(&served, &reference)?;
        ensure!(diff < 1e-5, "page {index}: differs from HF by {diff}");
    }
    server.stop().await
}
