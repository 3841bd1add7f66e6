//! The two pools behind the gateway: probing every replica, learning the model from the decoders, and turning
//! that into grpc.health.v1 statuses.
//!
//! Every `probe_interval` each replica's `Info` is called with a short timeout; the answer marks it healthy or
//! not (calls mark it too, in between). The decoders tell the gateway the model (fingerprint, context length,
//! image tokens); an encoder serving another fingerprint is kept out of rotation, since the decoders would refuse
//! its embeddings. The overall status and `readiness` are SERVING once the model is known and each pool has a
//! healthy replica, and `readiness` turns NOT_SERVING as soon as shutdown begins.

use std::sync::Arc;
use std::time::Duration;

use kosmos_processor::KosmosTokenizer;
use kosmos_proto::decoder::v1 as dec;
use kosmos_proto::encoder::v1 as enc;
use kosmos_runtime::Shutdown;
use kosmos_runtime::grpc::{Health, READINESS};
use tokio::sync::watch;

use crate::pool::{Pool, Replica};

/// The health service name of the public API (besides `""` and `readiness`).
pub const SERVICE_NAME: &str = "kosmos.v1.Kosmos";

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probe period until the gateway is first ready (start-up should not wait a full `probe_interval`).
const STARTUP_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// The served model, as the decoder pool describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Identifies the connector and text model; encoders must agree.
    pub fingerprint: Arc<str>,
    /// Most positions a sequence may hold.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Positions per image.
    pub num_image_tokens: usize,
    /// Embedding width.
    pub hidden_size: usize,
    /// Id of the first image placeholder.
    pub image_placeholder_first_id: u32,
    /// End of sequence.
    pub eos_token_id: u32,
}

impl ModelInfo {
    fn from_decoder(info: &dec::InfoResponse) -> Self {
        Self {
            fingerprint: Arc::from(info.model_fingerprint.as_str()),
            context_length: info.context_length as usize,
            vocab_size: info.vocab_size as usize,
            num_image_tokens: info.num_image_tokens as usize,
            hidden_size: info.hidden_size as usize,
            image_placeholder_first_id: info.image_placeholder_first_id,
            eos_token_id: info.eos_token_id,
        }
    }

    /// Whether the gateway's tokenizer builds prompts this model understands.
    fn check_tokenizer(&self, tokenizer: &KosmosTokenizer) -> Result<(), String> {
        if tokenizer.first_image_placeholder_id() != self.image_placeholder_first_id {
            return Err(format!(
                "the tokenizer's first image placeholder id is {}, the decoders use {}",
                tokenizer.first_image_placeholder_id(),
                self.image_placeholder_first_id
            ));
        }
        if tokenizer.vocab_size() > self.vocab_size {
            return Err(format!(
                "the tokenizer has {} tokens, more than the model's vocabulary of {}",
                tokenizer.vocab_size(),
                self.vocab_size
            ));
        }
        Ok(())
    }
}

/// Both pools and what the gateway knows about the model.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// The encoder pool.
    pub encoder: Pool,
    /// The decoder pool.
    pub decoder: Pool,
    model: watch::Receiver<Option<Arc<ModelInfo>>>,
    ready: watch::Receiver<bool>,
}

/// The writing side of [`Upstreams`], owned by the probe task.
#[derive(Debug)]
pub struct UpstreamsWriter {
    model: watch::Sender<Option<Arc<ModelInfo>>>,
    ready: watch::Sender<bool>,
}

impl Upstreams {
    /// Pools with no model known yet.
    pub fn new(encoder: Pool, decoder: Pool) -> (Self, UpstreamsWriter) {
        let (model_tx, model) = watch::channel(None);
        let (ready_tx, ready) = watch::channel(false);
        (
            Self {
                encoder,
                decoder,
                model,
                ready,
            },
            UpstreamsWriter {
                model: model_tx,
                ready: ready_tx,
            },
        )
    }

    /// The model, once a decoder described it.
    pub fn model(&self) -> Option<Arc<ModelInfo>> {
        self.model.borrow().clone()
    }

    /// The model as the decoders describe it, watched: changes when a decoder with another model answers.
    pub fn model_changes(&self) -> watch::Receiver<Option<Arc<ModelInfo>>> {
        self.model.clone()
    }

    /// Whether both pools answer and the model is known, now.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until both pools answer and the model is known, or `timeout`; returns readiness.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut ready = self.ready.clone();
        tokio::time::timeout(timeout, ready.wait_for(|ready| *ready))
            .await
            .is_ok_and(|result| result.is_ok())
    }
}

async fn probe_decoder(replica: Arc<Replica>) -> Option<dec::InfoResponse> {
    let mut client = dec::decoder_client::DecoderClient::new(replica.channel());
    let mut request = tonic::Request::new(dec::InfoRequest {});
    request.set_timeout(PROBE_TIMEOUT);
    let answer = tokio::time::timeout(PROBE_TIMEOUT, client.info(request)).await;
    match answer {
        Ok(Ok(response)) => Some(response.into_inner()),
        Ok(Err(status)) => {
            tracing::debug!(replica = replica.address(), %status, "decoder probe failed");
            None
        }
        Err(_) => None,
    }
}

async fn probe_encoder(replica: Arc<Replica>) -> Option<enc::InfoResponse> {
    let mut client = enc::vision_encoder_client::VisionEncoderClient::new(replica.channel());
    let mut request = tonic::Request::new(enc::InfoRequest {});
    request.set_timeout(PROBE_TIMEOUT);
    let answer = tokio::time::timeout(PROBE_TIMEOUT, client.info(request)).await;
    match answer {
        Ok(Ok(response)) => Some(response.into_inner()),
        Ok(Err(status)) => {
            tracing::debug!(replica = replica.address(), %status, "encoder probe failed");
            None
        }
        Err(_) => None,
    }
}

/// What one probe round found.
struct Round {
    model: Option<Arc<ModelInfo>>,
    encoders_ok: bool,
    decoders_ok: bool,
}

async fn probe_round(upstreams: &Upstreams, tokenizer: &KosmosTokenizer) -> Round {
    let decoders = upstreams.decoder.replicas();
    let encoders = upstreams.encoder.replicas();
    let (decoder_answers, encoder_answers) = tokio::join!(
        probe_all(&decoders, probe_decoder),
        probe_all(&encoders, probe_encoder),
    );
    let mut model: Option<Arc<ModelInfo>> = None;
    for (replica, answer) in decoders.iter().zip(decoder_answers) {
        let Some(info) = answer else {
            replica.set_healthy(false);
            continue;
        };
        let described = ModelInfo::from_decoder(&info);
        if let Err(problem) = described.check_tokenizer(tokenizer) {
            tracing::error!(replica = replica.address(), %problem, "decoder serves a model the gateway's tokenizer does not match");
            replica.set_healthy(false);
            continue;
        }
        match &model {
            None => {
                replica.set_healthy(true);
                model = Some(Arc::new(described));
            }
            Some(known) if known.fingerprint == described.fingerprint => replica.set_healthy(true),
            Some(known) => {
                tracing::warn!(
                    replica = replica.address(),
                    fingerprint = %described.fingerprint,
                    expected = %known.fingerprint,
                    "decoder serves another model build, keeping it out of rotation"
                );
                replica.set_healthy(false);
            }
        }
    }
    let mut encoders_ok = false;
    for (replica, answer) in encoders.iter().zip(encoder_answers) {
        let matches = match (&answer, &model) {
            (Some(info), Some(model)) => *info.model_fingerprint == *model.fingerprint,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if let (Some(info), Some(model), false) = (&answer, &model, matches) {
            tracing::warn!(
                replica = replica.address(),
                fingerprint = %info.model_fingerprint,
                expected = %model.fingerprint,
                "encoder serves another model build, keeping it out of rotation"
            );
        }
        replica.set_healthy(matches);
        encoders_ok |= matches;
    }
    Round {
        decoders_ok: model.is_some(),
        model,
        encoders_ok,
    }
}

/// Probes every replica at once (one task each); the answers in the replicas' order.
async fn probe_all<T, F, Fut>(replicas: &[Arc<Replica>], probe: F) -> Vec<Option<T>>
where
    T: Send + 'static,
    F: Fn(Arc<Replica>) -> Fut,
    Fut: std::future::Future<Output = Option<T>> + Send + 'static,
{
    let mut probes = tokio::task::JoinSet::new();
    for (index, replica) in replicas.iter().enumerate() {
        let answer = probe(Arc::clone(replica));
        probes.spawn(async move { (index, answer.await) });
    }
    let mut answers: Vec<Option<T>> = replicas.iter().map(|_| None).collect();
    while let Some(joined) = probes.join_next().await {
        if let Ok((index, answer)) = joined {
            answers[index] = answer;
        }
    }
    answers
}

/// Probes both pools until shutdown, re-resolves DNS pools, and keeps the health statuses and the model current.
pub async fn watch(
    upstreams: Upstreams,
    writer: UpstreamsWriter,
    tokenizer: Arc<KosmosTokenizer>,
    health: Health,
    shutdown: Shutdown,
) {
    let interval = upstreams
        .encoder
        .config()
        .probe_interval
        .min(upstreams.decoder.config().probe_interval);
    let mut last_ready: Option<bool> = None;
    let mut last_dns_refresh: Option<tokio::time::Instant> = None;
    loop {
        if shutdown.is_triggered() {
            break;
        }
        let refresh_due =
            last_dns_refresh.is_none_or(|at| at.elapsed() >= dns_refresh_period(&upstreams));
        if refresh_due {
            tokio::join!(upstreams.encoder.refresh(), upstreams.decoder.refresh());
            last_dns_refresh = Some(tokio::time::Instant::now());
        }
        let round = probe_round(&upstreams, &tokenizer).await;
        if round.model.is_some() && round.model != upstreams.model() {
            if let Some(model) = &round.model {
                tracing::info!(
                    fingerprint = %model.fingerprint,
                    context_length = model.context_length,
                    num_image_tokens = model.num_image_tokens,
                    "model learned from the decoder pool"
                );
            }
            writer.model.send_replace(round.model.clone());
        }
        if shutdown.is_triggered() {
            break;
        }
        let ready = round.decoders_ok && round.encoders_ok;
        if last_ready != Some(ready) {
            if ready {
                tracing::info!("both pools answer, gateway serving");
            } else if last_ready.is_none() {
                tracing::info!(
                    encoders_ok = round.encoders_ok,
                    decoders_ok = round.decoders_ok,
                    "waiting for both pools to answer"
                );
            } else {
                tracing::warn!(
                    encoders_ok = round.encoders_ok,
                    decoders_ok = round.decoders_ok,
                    "gateway not serving: a pool has no healthy replica"
                );
            }
            health.set_status("", ready).await;
            health.set_status(SERVICE_NAME, ready).await;
            health.set_status(READINESS, ready).await;
            writer.ready.send_replace(ready);
            last_ready = Some(ready);
        }
        let period = if ready {
            interval
        } else {
            STARTUP_PROBE_INTERVAL.min(interval)
        };
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = shutdown.wait() => break,
        }
    }
    tracing::info!("shutting down, readiness off");
    health.set_not_ready().await;
    health.set_status(SERVICE_NAME, false).await;
    writer.ready.send_replace(false);
}

fn dns_refresh_period(upstreams: &Upstreams) -> Duration {
    use crate::config::Discovery;
    [upstreams.encoder.config(), upstreams.decoder.config()]
        .iter()
        .filter_map(|config| match &config.discovery {
            Discovery::Dns { refresh, .. } => Some(*refresh),
            Discovery::Static(_) => None,
        })
        .min()
        .unwrap_or(Duration::MAX)
}
