//! An in-process kosmos cluster for end-to-end tests and benchmarks: encoder replicas, a decoder and a gateway,
//! each on a free loopback port, talking real gRPC to each other; plus the model run directly (no services) as
//! the reference the cluster's answers are compared with.

pub mod http;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use kosmos_decoder::Decoder;
use kosmos_encoder::Encoder;
use kosmos_gateway::Gateway;
use kosmos_gateway::GatewayHandle;
use kosmos_model::{DType, Device, GreedyParams, KosmosModel, Prompt, Tensor, greedy_generate};
use kosmos_processor::{DecodeLimits, KosmosProcessor, Segment};
use kosmos_proto::decoder::v1::decoder_client::DecoderClient;
use kosmos_proto::encoder::v1::vision_encoder_client::VisionEncoderClient;
use kosmos_proto::v1 as pb;
use kosmos_proto::v1::kosmos_client::KosmosClient;
use kosmos_runtime::Shutdown;
use kosmos_runtime::cli::ServiceMain;
use kosmos_runtime::config::Overrides;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Largest message the test clients send or accept.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

pub use kosmos_testkit::tiny_model_dir;

pub mod pki;
pub mod process;

/// The bytes of a fixture image (`tests/fixtures/images/<name>`); panics when it cannot be read.
pub fn fixture_image(name: &str) -> Vec<u8> {
    kosmos_testkit::fixture_image(name).unwrap_or_else(|err| panic!("{err:#}"))
}

/// A text segment.
pub fn text(text: &str) -> pb::Segment {
    pb::Segment {
        kind: Some(pb::segment::Kind::Text(text.to_string())),
    }
}

/// An image segment (format detected from the bytes).
pub fn image(data: Vec<u8>) -> pb::Segment {
    pb::Segment {
        kind: Some(pb::segment::Kind::Image(pb::Image {
            data,
            mime_type: String::new(),
        })),
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The model directory.
    pub model_dir: PathBuf,
    /// Encoder replicas.
    pub encoders: usize,
    /// `key=value` overrides of every encoder's configuration.
    pub encoder_overrides: Vec<String>,
    /// Decoder replicas.
    pub decoders: usize,
    /// Overrides of every decoder's configuration.
    pub decoder_overrides: Vec<String>,
    /// Overrides of the gateway's configuration.
    pub gateway_overrides: Vec<String>,
    /// mTLS between the gateway and the pools (and for the cluster's direct clients of the pools).
    pub internal_tls: Option<std::sync::Arc<pki::Pki>>,
}

impl Default for ClusterOptions {
    /// The tiny model, one encoder.
    fn default() -> Self {
        Self {
            model_dir: tiny_model_dir(),
            encoders: 1,
            encoder_overrides: Vec::new(),
            decoders: 1,
            decoder_overrides: Vec::new(),
            gateway_overrides: Vec::new(),
            internal_tls: None,
        }
    }
}

/// Encoders, a decoder and a gateway running in this process; dropping it shuts them all down.
#[derive(Debug)]
pub struct Cluster {
    /// The gateway's address.
    pub gateway_addr: SocketAddr,
    /// Where the gateway serves `GET /metrics`.
    pub gateway_metrics_addr: SocketAddr,
    /// Where the gateway serves the OpenAI-compatible HTTP API (with `http.listen` among the gateway overrides).
    pub gateway_http_addr: Option<SocketAddr>,
    /// The (first) decoder's address.
    pub decoder_addr: SocketAddr,
    /// Each decoder's address.
    pub decoder_addrs: Vec<SocketAddr>,
    /// Each encoder's address.
    pub encoder_addrs: Vec<SocketAddr>,
    /// Where each encoder serves `GET /metrics`.
    pub encoder_metrics_addrs: Vec<SocketAddr>,
    /// Where each decoder serves `GET /metrics`.
    pub decoder_metrics_addrs: Vec<SocketAddr>,
    gateway: GatewayHandle,
    encoder_shutdowns: Vec<Shutdown>,
    decoder_shutdowns: Vec<Shutdown>,
    gateway_shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
    internal_tls: Option<std::sync::Arc<pki::Pki>>,
}

/// One service started through the runtime's lifecycle and serving in a task.
struct Replica<H> {
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    handle: H,
    shutdown: Shutdown,
}

/// Binds service `S` with `overrides` (over its defaults, no file, no environment) and serves it in a task
/// pushed on `tasks`.
async fn start<S: ServiceMain>(
    overrides: Overrides,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<Replica<S::Handle>> {
    let config = S::from_overrides(overrides.into_vec(), Vec::new())?;
    let (bound, handle) = S::bind(config).await?;
    let shutdown = Shutdown::new();
    let replica = Replica {
        addr: bound.local_addr(),
        metrics_addr: bound.metrics_addr(),
        http_addr: bound.http_addr(),
        handle,
        shutdown: shutdown.clone(),
    };
    tasks.push(tokio::spawn(async move {
        if let Err(err) = bound.serve(shutdown).await {
            eprintln!("{} stopped with an error: {err}", S::NAME);
        }
    }));
    Ok(replica)
}

/// What every service of the cluster gets: the model and free loopback ports.
fn on_free_ports(model_dir: &Path, extra: &[String]) -> Overrides {
    Overrides::new()
        .path("model_dir", model_dir)
        .string("server.listen", "127.0.0.1:0")
        .string("metrics.listen", "127.0.0.1:0")
        .raw(extra)
}

fn endpoints<H>(replicas: &[Replica<H>]) -> Vec<String> {
    replicas
        .iter()
        .map(|replica| format!("http://{}", replica.addr))
        .collect()
}

impl Cluster {
    /// Starts the encoders, the decoders and the gateway, and waits until the gateway is ready.
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Self> {
        let model = options.model_dir.as_path();
        let mut tasks = Vec::new();
        let (server_tls, pool_tls) = match &options.internal_tls {
            Some(pki) => (
                pki.server_overrides(),
                [pki.pool_overrides("encoder"), pki.pool_overrides("decoder")].concat(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let mut encoders = Vec::new();
        for _ in 0..options.encoders {
            let overrides = on_free_ports(model, &server_tls).raw(&options.encoder_overrides);
            encoders.push(start::<Encoder>(overrides, &mut tasks).await?);
        }
        let mut decoders = Vec::new();
        for _ in 0..options.decoders.max(1) {
            let overrides = on_free_ports(model, &server_tls).raw(&options.decoder_overrides);
            decoders.push(start::<Decoder>(overrides, &mut tasks).await?);
        }
        let gateway_overrides = on_free_ports(model, &pool_tls)
            .strings("encoder.endpoints", &endpoints(&encoders))
            .strings("decoder.endpoints", &endpoints(&decoders))
            .raw([
                "encoder.probe_interval_seconds=0.2",
                "decoder.probe_interval_seconds=0.2",
            ])
            .raw(&options.gateway_overrides);
        let gateway = start::<Gateway>(gateway_overrides, &mut tasks).await?;

        let cluster = Self {
            gateway_addr: gateway.addr,
            gateway_metrics_addr: gateway.metrics_addr,
            gateway_http_addr: gateway.http_addr,
            decoder_addr: decoders[0].addr,
            decoder_addrs: decoders.iter().map(|replica| replica.addr).collect(),
            decoder_metrics_addrs: decoders
                .iter()
                .map(|replica| replica.metrics_addr)
                .collect(),
            encoder_addrs: encoders.iter().map(|replica| replica.addr).collect(),
            encoder_metrics_addrs: encoders
                .iter()
                .map(|replica| replica.metrics_addr)
                .collect(),
            gateway: gateway.handle,
            encoder_shutdowns: encoders
                .into_iter()
                .map(|replica| replica.shutdown)
                .collect(),
            decoder_shutdowns: decoders
                .into_iter()
                .map(|replica| replica.shutdown)
                .collect(),
            gateway_shutdown: gateway.shutdown,
            tasks,
            internal_tls: options.internal_tls.clone(),
        };
        anyhow::ensure!(
            cluster.gateway.wait_ready(Duration::from_secs(120)).await,
            "the gateway did not become ready (stats: {:?})",
            cluster.gateway.stats()
        );
        cluster.wait_every_replica(Duration::from_secs(120)).await?;
        Ok(cluster)
    }

    /// Waits until every encoder has loaded its model (its `Info` answers; encoders load on their engine thread
    /// after they start listening) and the gateway's probes count every replica of both pools healthy, so that
    /// load spreads over all of them from the first request. The gateway is ready as soon as one replica per
    /// pool answers.
    async fn wait_every_replica(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let pause = || tokio::time::sleep(Duration::from_millis(50));
        for index in 0..self.encoder_addrs.len() {
            let mut encoder = self.encoder(index).await?;
            while encoder
                .info(kosmos_proto::encoder::v1::InfoRequest {})
                .await
                .is_err()
            {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "encoder {index} did not load its model"
                );
                pause().await;
            }
        }
        let all_healthy = || {
            let stats = self.gateway.stats();
            stats.encoder.healthy_replicas as usize == self.encoder_addrs.len()
                && stats.decoder.healthy_replicas as usize == self.decoder_addrs.len()
        };
        // Twice, a probe interval apart: a probe answered while an encoder was still loading may land late.
        let mut settled = 0;
        while settled < 2 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the gateway does not count every replica healthy (stats: {:?})",
                self.gateway.stats()
            );
            settled = if all_healthy() { settled + 1 } else { 0 };
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    /// A client of the public API.
    pub async fn client(&self) -> anyhow::Result<KosmosClient<Channel>> {
        Ok(KosmosClient::new(channel(self.gateway_addr).await?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// A client of the decoder, bypassing the gateway.
    pub async fn decoder(&self) -> anyhow::Result<DecoderClient<Channel>> {
        Ok(
            DecoderClient::new(self.internal_channel(self.decoder_addr).await?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// A client of encoder `index`, bypassing the gateway.
    pub async fn encoder(&self, index: usize) -> anyhow::Result<VisionEncoderClient<Channel>> {
        let addr = *self.encoder_addrs.get(index).context("no such encoder")?;
        Ok(VisionEncoderClient::new(self.internal_channel(addr).await?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// A channel to a replica of a pool (over mTLS when the cluster's internal hops use it).
    async fn internal_channel(&self, addr: SocketAddr) -> anyhow::Result<Channel> {
        match &self.internal_tls {
            Some(pki) => tls_channel(addr, pki, Some("client")).await,
            None => channel(addr).await,
        }
    }

    /// The gateway's in-process handle (stats, model).
    pub fn gateway(&self) -> &GatewayHandle {
        &self.gateway
    }

    /// Shuts encoder `index` down (as SIGTERM would).
    pub fn stop_encoder(&self, index: usize) {
        if let Some(shutdown) = self.encoder_shutdowns.get(index) {
            shutdown.trigger();
        }
    }

    /// Shuts everything down and waits for every service to stop.
    pub async fn shutdown(mut self) {
        self.trigger_all();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }

    fn trigger_all(&self) {
        self.gateway_shutdown.trigger();
        for shutdown in self.decoder_shutdowns.iter().chain(&self.encoder_shutdowns) {
            shutdown.trigger();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.trigger_all();
    }
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?,
    )
}

/// A TLS channel to `addr` trusting `pki`'s CA for the name `localhost`, with the client certificate `identity`
/// (`client`, `server`) if any.
pub async fn tls_channel(
    addr: SocketAddr,
    pki: &pki::Pki,
    identity: Option<&str>,
) -> anyhow::Result<Channel> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(
            pki.path("ca.pem"),
        )?))
        .domain_name("localhost");
    if let Some(name) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(pki.path(&format!("{name}.pem")))?,
            std::fs::read(pki.path(&format!("{name}.key")))?,
        ));
    }
    Ok(
        tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await?,
    )
}

/// A prompt piece for [`DirectModel`].
#[derive(Debug, Clone)]
pub enum DirectSegment {
    /// Text.
    Text(String),
    /// Encoded image bytes.
    Image(Vec<u8>),
}

/// The model run directly in this process, without any service: the reference for end-to-end results.
#[derive(Debug)]
pub struct DirectModel {
    model: KosmosModel,
    processor: KosmosProcessor,
}

impl DirectModel {
    /// Loads both halves of the model in `dir` (f32, CPU).
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let model = KosmosModel::load(dir, DType::F32, &Device::Cpu)?;
        let num_image_tokens = model.text.config().latent_query_num();
        let processor = KosmosProcessor::from_dir(dir, num_image_tokens)?;
        Ok(Self { model, processor })
    }

    /// Greedy generation as HF `generate` does it: `(prompt ids, generated ids)`, the end token included.
    pub fn greedy(
        &self,
        segments: &[DirectSegment],
        max_new_tokens: usize,
        no_repeat_ngram_size: usize,
    ) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
        let mut pixels = Vec::new();
        let mut count = 0;
        let mut side = (0, 0);
        for segment in segments {
            if let DirectSegment::Image(bytes) = segment {
                let values = self
                    .processor
                    .process_image_bytes(bytes, &DecodeLimits::default())?;
                side = (values.height, values.width);
                pixels.extend_from_slice(&values.data);
                count += 1;
            }
        }
        let pixel_values = if count == 0 {
            None
        } else {
            Some(Tensor::from_vec(
                pixels,
                (count, 3, side.0, side.1),
                &Device::Cpu,
            )?)
        };
        self.greedy_with_pixels(
            segments,
            pixel_values,
            false,
            max_new_tokens,
            no_repeat_ngram_size,
        )
    }

    /// [`DirectModel::greedy`] with the images given as pixel values `(images, 3, height, width)` (e.g. the exact
    /// values the reference was given); the image segments' bytes are not read. `grounding` prefixes the prompt
    /// with `<grounding>` as Kosmos2Processor places it.
    pub fn greedy_with_pixels(
        &self,
        segments: &[DirectSegment],
        pixel_values: Option<Tensor>,
        grounding: bool,
        max_new_tokens: usize,
        no_repeat_ngram_size: usize,
    ) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
        let prompt_segments: Vec<Segment> = segments
            .iter()
            .map(|segment| match segment {
                DirectSegment::Text(text) => Segment::Text(text.clone()),
                DirectSegment::Image(_) => Segment::Image,
            })
            .collect();
        let encoded = self.processor.encode_prompt(&prompt_segments, grounding)?;
        let image_embeds = match pixel_values {
            None => None,
            Some(pixel_values) => {
                // (images, latent queries, hidden) → (marked positions, hidden)
                let embeds = self.model.vision.encode(&pixel_values)?;
                let (images, queries, hidden) = embeds.dims3()?;
                Some(embeds.reshape((images * queries, hidden))?)
            }
        };
        let prompt = Prompt {
            ids: encoded.input_ids.clone(),
            image_mask: encoded
                .image_embeds_position_mask
                .iter()
                .map(|&m| m == 1)
                .collect(),
            image_embeds,
        };
        let params = GreedyParams {
            max_new_tokens,
            no_repeat_ngram_size,
            eos_token_id: Some(self.model.text.config().text_config().eos_token_id),
        };
        let generated = greedy_generate(self.model.text.model(), &[prompt], params)?;
        let ids = generated
            .into_iter()
            .next()
            .context("one prompt, one output")?;
        Ok((encoded.input_ids, ids))
    }

    /// The tokenizer's decode of `ids` (special tokens skipped), as the gateway's text should read.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        Ok(self.processor.tokenizer.decode(ids, true)?)
    }
}
