//! Helpers: a server on a free port, images made on the fly, and the embedding computed directly with
//! `kosmos-model` for comparison.

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kosmos_model::{DType, Device, ModelFiles, Tensor, VisionHalf};
use kosmos_processor::{DecodeLimits, ImageProcessorConfig, decode_image, preprocess};
use kosmos_proto::encoder::v1::vision_encoder_client::VisionEncoderClient;
use kosmos_proto::encoder::v1::{EncodeRequest, EncodeResponse, Image, InfoRequest, InfoResponse};
use kosmos_runtime::{ServeError, Shutdown};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The tiny Kosmos-2 fixture (image size 32, 3 tokens per image, hidden 32).
pub fn tiny_model_dir() -> PathBuf {
    kosmos_testkit::tiny_model_dir()
}

/// The bytes of a fixture image.
pub fn fixture_image(name: &str) -> Result<Vec<u8>> {
    kosmos_testkit::fixture_image(name)
}

/// Every fixture image's file name.
pub const FIXTURE_IMAGES: [&str; 5] = [
    "a_gradient_48x32.png",
    "b_shapes_32x64.jpg",
    "c_alpha_40x40.png",
    "d_gray_37x23.png",
    "e_blocks_64x64.png",
];

/// An RGB image whose pixels depend on `seed`, so that images of different seeds differ everywhere.
pub fn pattern(width: u32, height: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        let mix = x.wrapping_mul(31 + seed) ^ y.wrapping_mul(17 + 3 * seed) ^ seed.wrapping_mul(97);
        image::Rgb([
            mix as u8,
            (mix >> 3) as u8 ^ (seed as u8),
            (x + y + seed) as u8,
        ])
    })
}

/// `image` encoded as `format`.
pub fn encode_as(image: &image::RgbImage, format: image::ImageFormat) -> Result<Vec<u8>> {
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, format)?;
    Ok(bytes.into_inner())
}

/// A PNG of `width` x `height` patterned pixels.
pub fn png(width: u32, height: u32, seed: u32) -> Result<Vec<u8>> {
    encode_as(&pattern(width, height, seed), image::ImageFormat::Png)
}

/// A PNG of one flat colour: a few hundred bytes whatever its size.
pub fn flat_png(width: u32, height: u32) -> Result<Vec<u8>> {
    let image = image::RgbImage::from_pixel(width, height, image::Rgb([90, 120, 200]));
    encode_as(&image, image::ImageFormat::Png)
}

/// A JPEG of `width` x `height` patterned pixels.
pub fn jpeg(width: u32, height: u32, seed: u32) -> Result<Vec<u8>> {
    encode_as(&pattern(width, height, seed), image::ImageFormat::Jpeg)
}

/// A valid 1x1 PNG whose header claims `width` x `height` (CRC fixed), a few dozen bytes: a decompression bomb as
/// far as any check that trusts the header is concerned.
pub fn png_claiming(width: u32, height: u32) -> Result<Vec<u8>> {
    kosmos_testkit::png::with_header_dimensions(png(1, 1, 0)?, width, height)
        .context("unexpected PNG layout")
}

/// An Encode request for `images` (no MIME types) in `dtype`.
pub fn request(images: Vec<Vec<u8>>, dtype: kosmos_proto::tensor::v1::DType) -> EncodeRequest {
    EncodeRequest {
        images: images
            .into_iter()
            .map(|data| Image {
                data,
                mime_type: String::new(),
            })
            .collect(),
        dtype: dtype as i32,
    }
}

/// The vision half of the tiny model, run directly for comparison.
pub struct DirectModel {
    half: VisionHalf,
    processor: ImageProcessorConfig,
    /// The model fingerprint.
    pub fingerprint: String,
}

impl DirectModel {
    /// Loads the tiny model in f32 on the CPU.
    pub fn load() -> Result<Self> {
        let files = ModelFiles::open(&tiny_model_dir())?;
        Ok(Self {
            half: VisionHalf::load(&files, DType::F32, &Device::Cpu)?,
            processor: ImageProcessorConfig::from_file(
                tiny_model_dir().join("preprocessor_config.json"),
            )?,
            fingerprint: files.fingerprint()?,
        })
    }

    /// `(tokens * hidden)` values: decode, preprocess and `VisionHalf::encode` on a batch of one.
    pub fn embedding(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        let rgb = decode_image(bytes, &DecodeLimits::default())?;
        let pixels = preprocess(&rgb, &self.processor)?;
        // (1, 3, size, size)
        let tensor = Tensor::from_vec(
            pixels.data,
            (1, pixels.channels, pixels.height, pixels.width),
            &Device::Cpu,
        )?;
        Ok(self.half.encode(&tensor)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// The largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> Result<f32> {
    if a.len() != b.len() {
        bail!("lengths differ: {} vs {}", a.len(), b.len());
    }
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max))
}

/// An encoder served on a free loopback port.
pub struct TestServer {
    /// A connected client.
    pub client: VisionEncoderClient<Channel>,
    /// A connected channel (for the health client).
    pub channel: Channel,
    /// Where `/metrics` is served.
    pub metrics_addr: std::net::SocketAddr,
    shutdown: Shutdown,
    task: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    /// Starts the encoder with the tiny model and `overrides` (`key=value`), and waits for readiness.
    pub async fn start(overrides: &[&str]) -> Result<Self> {
        let model = format!("model_dir={}", tiny_model_dir().display());
        // Every test server has its own ports (the defaults would collide).
        let mut all = vec![
            model.as_str(),
            "preprocess.workers=4",
            "server.listen=127.0.0.1:0",
            "metrics.listen=127.0.0.1:0",
        ];
        all.extend_from_slice(overrides);
        let config = kosmos_encoder::EncoderConfig::from_overrides(&all)?;
        let bound = kosmos_encoder::bind(config).await?;
        let address = bound.local_addr();
        let metrics_addr = bound.metrics_addr();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(bound.serve(shutdown.clone()));
        let channel = Endpoint::from_shared(format!("http://{address}"))?
            .connect()
            .await?;
        let client = VisionEncoderClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let server = Self {
            client,
            channel,
            metrics_addr,
            shutdown,
            task,
        };
        server.wait_ready(Duration::from_secs(30)).await?;
        Ok(server)
    }

    /// The readiness status (`grpc.health.v1`, service `readiness`).
    pub async fn readiness(&self) -> Result<i32> {
        let mut health = HealthClient::new(self.channel.clone());
        let response = health
            .check(HealthCheckRequest {
                service: "readiness".into(),
            })
            .await?;
        Ok(response.into_inner().status)
    }

    async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        let started = std::time::Instant::now();
        while self.readiness().await? != serving {
            if started.elapsed() > limit || self.task.is_finished() {
                bail!("the encoder did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Calls Encode.
    pub async fn encode(&self, request: EncodeRequest) -> Result<EncodeResponse, tonic::Status> {
        Ok(self.client.clone().encode(request).await?.into_inner())
    }

    /// Calls Info.
    pub async fn info(&self) -> Result<InfoResponse> {
        Ok(self.client.clone().info(InfoRequest {}).await?.into_inner())
    }

    /// Encodes one fresh image and checks that an embedding comes back.
    pub async fn assert_serves_a_good_request(&self) -> Result<()> {
        let response = self
            .encode(request(
                vec![png(40, 30, 99)?],
                kosmos_proto::tensor::v1::DType::DtypeUnspecified,
            ))
            .await?;
        if response.embeddings.len() != 1 {
            bail!("expected one embedding, got {}", response.embeddings.len());
        }
        Ok(())
    }

    /// Trips shutdown and waits for `serve` to return.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.trigger();
        self.task.await??;
        Ok(())
    }

    /// The shutdown signal, to trip it while calls are in flight.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Waits for `serve` to return (after [`TestServer::shutdown`] was tripped).
    pub async fn join(self) -> Result<()> {
        self.task.await??;
        Ok(())
    }
}
