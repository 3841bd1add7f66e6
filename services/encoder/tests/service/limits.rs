//! Every limit, and every kind of bad image, is INVALID_ARGUMENT with a message naming the image, the limit and
//! the value; the next good request succeeds.

use anyhow::{Result, bail, ensure};
use kosmos_proto::encoder::v1::{EncodeRequest, Image};
use kosmos_proto::tensor::v1::DType;

use crate::common::{TestServer, flat_png, jpeg, png, png_claiming, request};

const SMALL_LIMITS: [&str; 5] = [
    "limits.max_image_bytes=4096",
    "limits.max_image_width=100",
    "limits.max_image_height=80",
    "limits.max_image_pixels=6000",
    "limits.max_images_per_request=3",
];

async fn assert_refused(server: &TestServer, call: EncodeRequest, expected: &str) -> Result<()> {
    match server.encode(call).await {
        Ok(_) => bail!("expected INVALID_ARGUMENT containing {expected:?}, the call succeeded"),
        Err(status) => {
            ensure!(
                status.code() == tonic::Code::InvalidArgument,
                "code {:?}: {}",
                status.code(),
                status.message()
            );
            ensure!(
                status.message().contains(expected),
                "message {:?} does not contain {expected:?}",
                status.message()
            );
        }
    }
    server.assert_serves_a_good_request().await
}

/// A good image at index 0 and `bad` at index 1.
fn second_is(bad: Vec<u8>) -> Result<EncodeRequest> {
    Ok(request(vec![png(20, 20, 1)?, bad], DType::DtypeUnspecified))
}

#[tokio::test]
async fn rejects_an_image_over_max_image_bytes_before_decoding() -> Result<()> {
    let server = TestServer::start(&SMALL_LIMITS).await?;
    let mut oversized = png(10, 10, 2)?;
    oversized.resize(5000, 0);
    let call = second_is(oversized)?;
    assert_refused(
        &server,
        call,
        "images[1]: 5000 bytes, above the limit `limits.max_image_bytes` = 4096",
    )
    .await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_an_image_wider_than_max_image_width() -> Result<()> {
    let server = TestServer::start(&SMALL_LIMITS).await?;
    let call = second_is(flat_png(101, 10)?)?;
    let expected = "images[1]: 101 pixels wide, above the limit `limits.max_image_width` = 100";
    assert_refused(&server, call, expected).await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_an_image_taller_than_max_image_height() -> Result<()> {
    let server = TestServer::start(&SMALL_LIMITS).await?;
    let call = second_is(flat_png(10, 81)?)?;
    let expected = "images[1]: 81 pixels high, above the limit `limits.max_image_height` = 80";
    assert_refused(&server, call, expected).await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_an_image_with_more_than_max_image_pixels() -> Result<()> {
    let server = TestServer::start(&SMALL_LIMITS).await?;
    let call = second_is(flat_png(90, 70)?)?;
    assert_refused(
        &server,
        call,
        "images[1]: 90x70 = 6300 pixels, above the limit `limits.max_image_pixels` = 6000",
    )
    .await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_more_images_than_max_images_per_request() -> Result<()> {
    let server = TestServer::start(&SMALL_LIMITS).await?;
    let images = (0..4).map(|seed| png(8, 8, seed)).collect::<Result<_>>()?;
    let call = request(images, DType::DtypeUnspecified);
    assert_refused(
        &server,
        call,
        "images: 4 images exceeds max_images_per_request 3",
    )
    .await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_a_request_without_images() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    let call = request(Vec::new(), DType::DtypeUnspecified);
    assert_refused(&server, call, "images: at least one image is required").await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_a_format_outside_limits_formats() -> Result<()> {
    let server = TestServer::start(&["limits.formats=[\"image/png\"]"]).await?;
    let call = second_is(jpeg(16, 16, 6)?)?;
    let expected = "images[1]: format image/jpeg is not accepted (`limits.formats` = image/png)";
    assert_refused(&server, call, expected).await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_a_mime_type_that_disagrees_with_the_bytes() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    let call = EncodeRequest {
        images: vec![Image {
            data: png(16, 16, 7)?,
            mime_type: "image/jpeg".into(),
        }],
        dtype: DType::DtypeUnspecified as i32,
    };
    let expected =
        "images[0]: mime_type `image/jpeg` disagrees with the bytes, which are image/png";
    assert_refused(&server, call, expected).await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_corrupt_bytes() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    let mut truncated = png(30, 30, 8)?;
    truncated.truncate(truncated.len() / 2);
    let call = second_is(truncated)?;
    assert_refused(&server, call, "images[1]: corrupt image data").await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_an_empty_image() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    let call = second_is(Vec::new())?;
    assert_refused(&server, call, "images[1]: image is empty").await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_an_unsupported_format() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;".to_vec();
    let call = second_is(gif)?;
    assert_refused(
        &server,
        call,
        "images[1]: not a JPEG, PNG or WebP image (recognised: gif)",
    )
    .await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_a_30000_square_png_of_a_few_dozen_bytes_from_its_header() -> Result<()> {
    let bomb = png_claiming(30_000, 30_000)?;
    ensure!(bomb.len() < 300, "the bomb is {} bytes", bomb.len());
    let server = TestServer::start(&[]).await?;
    let call = second_is(bomb.clone())?;
    assert_refused(
        &server,
        call,
        "images[1]: 30000 pixels wide, above the limit `limits.max_image_width` = 8192",
    )
    .await?;
    server.stop().await?;
    // With the width and height limits out of the way, the pixel limit still stops it before any allocation.
    let server = TestServer::start(&[
        "limits.max_image_width=100000",
        "limits.max_image_height=100000",
    ])
    .await?;
    let call = second_is(bomb)?;
    let expected = "images[1]: 30000x30000 = 900000000 pixels, above the limit `limits.max_image_pixels` = 33554432";
    assert_refused(&server, call, expected).await?;
    server.stop().await
}

#[tokio::test]
async fn rejects_an_unknown_embedding_dtype() -> Result<()> {
    let server = TestServer::start(&[]).await?;
    let mut call = request(vec![png(8, 8, 9)?], DType::DtypeF32);
    call.dtype = 42;
    assert_refused(&server, call, "dtype: 42 is not one of").await?;
    server.stop().await
}
