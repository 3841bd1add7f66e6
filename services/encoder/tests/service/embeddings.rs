//! An embedding over gRPC is what `kosmos-model` computes directly for the same image.

use anyhow::{Result, ensure};
use kosmos_proto::tensor::v1::DType;

use crate::common::{
    DirectModel, FIXTURE_IMAGES, TestServer, fixture_image, max_abs_diff, request,
};

#[tokio::test]
async fn an_f32_embedding_equals_the_direct_vision_half_computation() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    let direct = DirectModel::load()?;
    for name in FIXTURE_IMAGES {
        let bytes = fixture_image(name)?;
        let response = server
            .encode(request(vec![bytes.clone()], DType::DtypeUnspecified))
            .await?;
        ensure!(
            response.model_fingerprint == direct.fingerprint,
            "fingerprint"
        );
        ensure!(response.embeddings.len() == 1, "one embedding");
        let tensor = &response.embeddings[0];
        ensure!(
            tensor.dtype == DType::DtypeF32 as i32,
            "{name}: dtype {}",
            tensor.dtype
        );
        ensure!(
            tensor.shape == vec![3, 32],
            "{name}: shape {:?}",
            tensor.shape
        );
        let served = kosmos_runtime::tensor::to_f32(tensor, Some(&[3, 32]))?;
        let expected = direct.embedding(&bytes)?;
        ensure!(
            served == expected,
            "{name}: differs by {}",
            max_abs_diff(&served, &expected)?
        );
    }
    server.stop().await
}

#[tokio::test]
async fn f16_and_bf16_embeddings_are_the_direct_computation_rounded_once() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    let direct = DirectModel::load()?;
    let bytes = fixture_image("e_blocks_64x64.png")?;
    let expected = direct.embedding(&bytes)?;
    for dtype in [DType::DtypeF16, DType::DtypeBf16] {
        let response = server.encode(request(vec![bytes.clone()], dtype)).await?;
        let tensor = &response.embeddings[0];
        ensure!(
            tensor.dtype == dtype as i32,
            "{dtype:?}: dtype {}",
            tensor.dtype
        );
        ensure!(
            tensor.data.len() == 3 * 32 * 2,
            "{dtype:?}: two bytes per value"
        );
        let served = kosmos_runtime::tensor::to_f32(tensor, Some(&[3, 32]))?;
        let rounded: Vec<f32> = expected
            .iter()
            .map(|&value| match dtype {
                DType::DtypeF16 => half::f16::from_f32(value).to_f32(),
                _ => half::bf16::from_f32(value).to_f32(),
            })
            .collect();
        ensure!(
            served == rounded,
            "{dtype:?}: differs by {}",
            max_abs_diff(&served, &rounded)?
        );
    }
    server.stop().await
}

#[tokio::test]
async fn the_embeddings_of_a_multi_image_request_come_back_in_request_order() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    let direct = DirectModel::load()?;
    let images: Vec<Vec<u8>> = FIXTURE_IMAGES
        .iter()
        .map(|name| fixture_image(name))
        .collect::<Result<_>>()?;
    let response = server
        .encode(request(images.clone(), DType::DtypeF32))
        .await?;
    ensure!(
        response.embeddings.len() == images.len(),
        "one embedding per image"
    );
    for ((name, bytes), tensor) in FIXTURE_IMAGES.iter().zip(&images).zip(&response.embeddings) {
        let served = kosmos_runtime::tensor::to_f32(tensor, Some(&[3, 32]))?;
        let difference = max_abs_diff(&served, &direct.embedding(bytes)?)?;
        ensure!(difference <= 1e-6, "{name}: differs by {difference}");
    }
    let timings = response.timings.unwrap_or_default();
    ensure!(
        timings.batch_size == 5,
        "one batch of five, got {}",
        timings.batch_size
    );
    server.stop().await
}
