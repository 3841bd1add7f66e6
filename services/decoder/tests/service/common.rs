//! Helpers shared by the service tests: a decoder on 127.0.0.1:0 with the tiny fixture model, clients, the
//! reference fixtures and request builders.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kosmos_decoder::{DecoderConfig, EngineHandle, Shutdown};
use kosmos_model::{DType, Device, ModelFiles, Tensor, VisionHalf};
use kosmos_proto::decoder::v1 as pb;
use kosmos_proto::decoder::v1::decoder_client::DecoderClient;
use kosmos_proto::tensor::v1::DType as WireDType;
use kosmos_runtime::ServeError;
use kosmos_runtime::config::Layers;
use tonic::transport::{Channel, Endpoint};

/// `tests/fixtures` at the workspace root.
pub fn fixtures() -> PathBuf {
    kosmos_testkit::repo_root().join("tests/fixtures")
}

/// The tiny model directory.
pub fn tiny_dir() -> PathBuf {
    kosmos_testkit::tiny_model_dir()
}

/// A decoder serving in the background.
pub struct TestServer {
    pub addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    pub engine: EngineHandle,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

/// Starts a decoder on the tiny model with config `overrides` (`key=value`).
pub async fn start(overrides: &[&str]) -> TestServer {
    let mut all = vec![
        format!("model_dir={}", tiny_dir().display()),
        "server.listen=127.0.0.1:0".to_string(),
        // Every test server has its own metrics port (the default, 9090, would collide).
        "metrics.listen=127.0.0.1:0".to_string(),
    ];
    all.extend(overrides.iter().map(|item| item.to_string()));
    let layers = Layers {
        overrides: all,
        ..Layers::default()
    };
    let config = DecoderConfig::load(&layers).expect("test config is valid");
    let (bound, engine) = kosmos_decoder::bind(config).await.expect("decoder starts");
    let addr = bound.local_addr();
    let metrics_addr = bound.metrics_addr();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(bound.serve(shutdown.clone()));
    TestServer {
        addr,
        metrics_addr,
        engine,
        shutdown,
        task,
    }
}

impl TestServer {
    fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("http://{}", self.addr)).expect("endpoint")
    }

    /// A client on its own connection.
    pub async fn client(&self) -> DecoderClient<Channel> {
        let channel = self.endpoint().connect().await.expect("connects");
        DecoderClient::new(channel).max_decoding_message_size(64 << 20)
    }

    /// A client whose HTTP/2 receive window is tiny, so a stream it does not read stalls the server quickly.
    pub async fn slow_reader_client(&self) -> DecoderClient<Channel> {
        let channel = self
            .endpoint()
            .initial_stream_window_size(Some(64))
            .connect()
            .await
            .expect("connects");
        DecoderClient::new(channel)
    }

    /// The current `Info`.
    pub async fn info(&self) -> pb::InfoResponse {
        self.client()
            .await
            .info(pb::InfoRequest {})
            .await
            .expect("info")
            .into_inner()
    }

    /// Polls `Info` until `done` holds (panics after 10 s with the last answer).
    pub async fn wait_for_info(
        &self,
        what: &str,
        done: impl Fn(&pb::InfoResponse) -> bool,
    ) -> pb::InfoResponse {
        let mut last = None;
        for _ in 0..1000 {
            let info = self.info().await;
            if done(&info) {
                return info;
            }
            last = Some(info);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}; last info {last:?}");
    }

    /// Trips shutdown and waits for the server to end.
    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server ends")
            .expect("server task")
            .expect("server returns ok");
    }
}

/// The tensors of `tests/fixtures/reference/tiny.safetensors`.
pub fn reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("reference/tiny.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).expect("reference fixture")
}

/// One fixture tensor.
pub fn get<'a>(tensors: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    tensors
        .get(key)
        .unwrap_or_else(|| panic!("fixture has no `{key}`"))
}

/// A `(batch, seq)` integer tensor as rows.
pub fn i64_rows(tensor: &Tensor) -> Vec<Vec<i64>> {
    tensor
        .to_dtype(DType::I64)
        .expect("i64")
        .to_vec2::<i64>()
        .expect("rows")
}

/// The image embeddings of `pixel_values` `(images, 3, size, size)`, one `(num_image_tokens × hidden)` f32 row-major
/// vector per image, made with the fixture model's vision half.
pub fn image_embeddings(pixel_values: &Tensor) -> Vec<Vec<f32>> {
    let files = ModelFiles::open(&tiny_dir()).expect("model files");
    let vision = VisionHalf::load(&files, DType::F32, &Device::Cpu).expect("vision half");
    let embeds = vision.encode(pixel_values).expect("encode");
    (0..embeds.dim(0).expect("images"))
        .map(|index| {
            embeds
                .get(index)
                .and_then(|image| image.flatten_all())
                .and_then(|image| image.to_vec1::<f32>())
                .expect("image rows")
        })
        .collect()
}

/// The fixture model's fingerprint.
pub fn fingerprint() -> String {
    ModelFiles::open(&tiny_dir())
        .expect("model files")
        .fingerprint()
        .expect("fingerprint")
}

/// An image segment holding `rows` (`(3, 32)` for the tiny model) as f32.
pub fn image_segment(rows: &[f32], fingerprint: &str) -> pb::Segment {
    let embedding =
        kosmos_runtime::tensor::from_f32(rows, &[3, 32], WireDType::DtypeF32).expect("tensor");
    pb::Segment {
        kind: Some(pb::segment::Kind::Image(pb::ImageEmbedding {
            embedding: Some(embedding),
            model_fingerprint: fingerprint.to_string(),
        })),
    }
}

/// A token segment.
pub fn tokens_segment(ids: &[u32]) -> pb::Segment {
    pb::Segment {
        kind: Some(pb::segment::Kind::Tokens(pb::TokenIds {
            ids: ids.to_vec(),
        })),
    }
}

/// Segments for a prompt in the reference layout: runs of unmasked ids become token segments, each run of
/// `num_image_tokens` masked positions the next image of `images`. Checks that the placeholder ids are the ones
/// the decoder writes (4, 5, 6 for the tiny model).
pub fn segments(
    ids: &[u32],
    mask: &[bool],
    images: &[Vec<f32>],
    fingerprint: &str,
) -> Vec<pb::Segment> {
    let mut segments = Vec::new();
    let mut text = Vec::new();
    let mut next_image = 0;
    let mut position = 0;
    while position < ids.len() {
        if mask[position] {
            if !text.is_empty() {
                segments.push(tokens_segment(&text));
                text.clear();
            }
            assert_eq!(
                &ids[position..position + 3],
                &[4, 5, 6],
                "placeholder ids at {position}"
            );
            segments.push(image_segment(&images[next_image], fingerprint));
            next_image += 1;
            position += 3;
        } else {
            text.push(ids[position]);
            position += 1;
        }
    }
    if !text.is_empty() {
        segments.push(tokens_segment(&text));
    }
    assert_eq!(next_image, images.len(), "every image is used");
    segments
}

/// Sampling parameters for greedy decoding with an n-gram ban.
pub fn greedy(no_repeat_ngram_size: u32) -> pb::SamplingParams {
    pb::SamplingParams {
        no_repeat_ngram_size,
        ..pb::SamplingParams::default()
    }
}

/// A generation request.
pub fn request(
    prompt: Vec<pb::Segment>,
    sampling: pb::SamplingParams,
    max_new_tokens: u32,
    ignore_eos: bool,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        tenant: String::new(),
        resume: None,
        prompt,
        sampling: Some(sampling),
        stopping: Some(pb::StoppingParams {
            max_new_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos,
        }),
    }
}

/// What a finished stream delivered.
#[derive(Debug, Clone)]
pub struct Generated {
    pub tokens: Vec<pb::Token>,
    pub finish: Option<pb::Finish>,
}

impl Generated {
    /// The generated ids.
    pub fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|token| token.id).collect()
    }
}

/// Runs a generation to its end.
pub async fn generate(
    client: &mut DecoderClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<Generated, tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut generated = Generated {
        tokens: Vec::new(),
        finish: None,
    };
    while let Some(message) = stream.message().await? {
        assert!(generated.finish.is_none(), "nothing follows the finish");
        generated.tokens.extend(message.tokens);
        generated.finish = message.finish;
    }
    assert!(generated.finish.is_some(), "a stream ends with a finish");
    Ok(generated)
}

/// Deterministic pseudo-random ids in `[7, 2000)` (clear of the specials and the image placeholders).
pub fn pseudo_random_ids(seed: u64, len: usize) -> Vec<u32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            7 + ((state >> 33) % 1993) as u32
        })
        .collect()
}
