//! The two pools behind the gateway: probing every replica, learning the model from the decoders, and turning
//! that into grpc.health.v1 statuses.
//!
//! Every `probe_interval` each replica's `Info` is called with a short timeout; the answer marks it healthy or
//! not (calls mark it too, in between) and says which model build (fingerprint) it serves. The decoders tell the
//! gateway the model (fingerprint, context length, image tokens).
//!
//! **Two model builds side by side** (a rollout): replicas of several fingerprints may be in the pools at once.
//! Every request is pinned, at its start, to one build — the newest one that both pools serve (see
//! [`choose_model`]) — and every call it makes (encode, generate, a resumption, score) goes only to replicas of
//! that build, so embeddings of build A only ever reach decoders of A. Once a newer build is served by both pools
//! new requests go to it and the old build's replicas only finish what they hold: they can be stopped without
//! failing a call.
//!
//! **Health.** `""` (liveness) says only that the process works: it is SERVING from the start to the end, so a
//! pool's outage never makes a kubelet restart gateways. `kosmos.v1.Kosmos` and `readiness` are SERVING while a
//! decoder serves the model (text-only requests can be served; image requests also need an encoder, and fail
//! fast without one); with `health.ready_without_decoders` `readiness` is SERVING regardless, for a decoder pool
//! that scales to zero and is woken by the requests that wait for it. `readiness` turns NOT_SERVING as soon as
//! shutdown begins. While a pool does not serve, its replicas are probed every 100 ms rather than every
//! `probe_interval`, so a replica that comes up takes traffic at once.

use std::collections::HashMap;
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
    /// Every image position holds `image_placeholder_first_id` (Kosmos-2.5).
    pub image_placeholder_repeated: bool,
    /// The model family (`kosmos-2`, `kosmos-2.5`; empty from a decoder that predates the field: `kosmos-2`).
    pub family: Arc<str>,
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
            image_placeholder_repeated: info.image_placeholder_repeated,
            family: Arc::from(if info.family.is_empty() {
                "kosmos-2"
            } else {
                info.family.as_str()
            }),
            eos_token_id: info.eos_token_id,
        }
    }

    /// Whether the model reads pages (Kosmos-2.5): one image, then the task.
    pub fn reads_pages(&self) -> bool {
        &*self.family == KOSMOS_2_5
    }

    /// Whether the gateway's tokenizer builds prompts this model understands.
    fn check_tokenizer(&self, tokenizer: &KosmosTokenizer) -> Result<(), String> {
        if self.image_placeholder_repeated {
            if tokenizer.bos_id() != self.image_placeholder_first_id {
                return Err(format!(
                    "the decoders mark image positions with id {}, the tokenizer's `<s>` is {}",
                    self.image_placeholder_first_id,
                    tokenizer.bos_id()
                ));
            }
        } else if tokenizer.first_image_placeholder_id() != self.image_placeholder_first_id {
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

/// The family name (`config.json`'s `model_type`, the decoders' `Info.family`) of Kosmos-2.5.
pub const KOSMOS_2_5: &str = "kosmos-2.5";

/// Both pools and what the gateway knows about the model.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// The encoder pool.
    pub encoder: Pool,
    /// The decoder pool.
    pub decoder: Pool,
    model: watch::Receiver<Option<Arc<ModelInfo>>>,
    serving: watch::Receiver<Serving>,
}

/// Which pools serve the model new requests are pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Serving {
    /// An encoder of that build answers.
    pub encoders: bool,
    /// A decoder of that build answers.
    pub decoders: bool,
    /// `readiness` as published: decoders serve (or `health.ready_without_decoders`), not shutting down.
    pub ready: bool,
}

/// The writing side of [`Upstreams`], owned by the probe task.
#[derive(Debug)]
pub struct UpstreamsWriter {
    model: watch::Sender<Option<Arc<ModelInfo>>>,
    serving: watch::Sender<Serving>,
}

impl Upstreams {
    /// Pools with no model known yet.
    pub fn new(encoder: Pool, decoder: Pool) -> (Self, UpstreamsWriter) {
        let (model_tx, model) = watch::channel(None);
        let (serving_tx, serving) = watch::channel(Serving::default());
        (
            Self {
                encoder,
                decoder,
                model,
                serving,
            },
            UpstreamsWriter {
                model: model_tx,
                serving: serving_tx,
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

    /// Which pools serve now.
    pub fn serving(&self) -> Serving {
        *self.serving.borrow()
    }

    /// The gateway's readiness now (the `readiness` health status).
    pub fn is_ready(&self) -> bool {
        self.serving().ready
    }

    /// Waits until both pools serve the model, or `timeout`; returns whether they do.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut serving = self.serving.clone();
        tokio::time::timeout(
            timeout,
            serving.wait_for(|serving| serving.encoders && serving.decoders),
        )
        .await
        .is_ok_and(|result| result.is_ok())
    }

    /// The model, waiting for a decoder to describe it when none has yet (a decoder pool that scales from zero)
    /// for at most `limits.max_waiting_for_replica_seconds` and until `deadline`, counted as a pending call of
    /// the decoder pool (the signal that wakes it). `None` when no decoder came.
    pub async fn wait_model(&self, deadline: Option<std::time::Instant>) -> Option<Arc<ModelInfo>> {
        if let Some(model) = self.model() {
            return Some(model);
        }
        let _waiting = self.decoder.waiting(0);
        let mut wait = self.decoder.config().max_wait_for_replica;
        if let Some(deadline) = deadline {
            wait = wait.min(deadline.saturating_duration_since(std::time::Instant::now()));
        }
        let mut changes = self.model.clone();
        tokio::time::timeout(wait, changes.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|found| found.ok().and_then(|model| model.clone()))
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
    /// The model build new requests are pinned to.
    model: Option<Arc<ModelInfo>>,
    /// Whether an encoder serving that build answers.
    encoders_ok: bool,
    /// Whether a decoder serving that build answers.
    decoders_ok: bool,
}

/// The probe round in which each model build was first seen (a later round: a newer build).
type FirstSeen = HashMap<Arc<str>, u64>;

async fn probe_round(
    upstreams: &Upstreams,
    tokenizer: &KosmosTokenizer,
    round: u64,
    first_seen: &mut FirstSeen,
) -> Round {
    let decoders = upstreams.decoder.replicas();
    let encoders = upstreams.encoder.replicas();
    let (decoder_answers, encoder_answers) = tokio::join!(
        probe_all(&decoders, probe_decoder),
        probe_all(&encoders, probe_encoder),
    );
    let mut models: Vec<Arc<ModelInfo>> = Vec::new();
    let mut decoders_of: HashMap<Arc<str>, usize> = HashMap::new();
    for (replica, answer) in decoders.iter().zip(decoder_answers) {
        let Some(info) = answer else {
            replica.set_healthy(false);
            continue;
        };
        let described = ModelInfo::from_decoder(&info);
        replica.set_fingerprint(&described.fingerprint);
        if let Err(problem) = described.check_tokenizer(tokenizer) {
            tracing::error!(replica = replica.address(), %problem, "decoder serves a model the gateway's tokenizer does not match");
            replica.set_healthy(false);
            continue;
        }
        replica.set_healthy(true);
        *decoders_of
            .entry(described.fingerprint.clone())
            .or_default() += 1;
        if !models
            .iter()
            .any(|model| model.fingerprint == described.fingerprint)
        {
            models.push(Arc::new(described));
        }
    }
    let mut encoders_of: HashMap<Arc<str>, usize> = HashMap::new();
    for (replica, answer) in encoders.iter().zip(encoder_answers) {
        match answer {
            Some(info) => {
                replica.set_fingerprint(&info.model_fingerprint);
                replica.set_healthy(true);
                *encoders_of
                    .entry(Arc::from(info.model_fingerprint.as_str()))
                    .or_default() += 1;
            }
            None => replica.set_healthy(false),
        }
    }
    for model in &models {
        first_seen.entry(model.fingerprint.clone()).or_insert(round);
    }
    let model = choose_model(&models, &decoders_of, &encoders_of, first_seen);
    Round {
        encoders_ok: model
            .as_ref()
            .is_some_and(|model| encoders_of.contains_key(&model.fingerprint)),
        decoders_ok: model.is_some(),
        model,
    }
}

/// The model build new requests are pinned to, among those a decoder serves: one that both pools serve before
/// one only the decoders serve (text-only requests still work); then the newest (first seen in a later probe
/// round: the build being rolled out); then the one with more decoders; then the smaller fingerprint, so that
/// every gateway started at the same time agrees.
fn choose_model(
    models: &[Arc<ModelInfo>],
    decoders_of: &HashMap<Arc<str>, usize>,
    encoders_of: &HashMap<Arc<str>, usize>,
    first_seen: &FirstSeen,
) -> Option<Arc<ModelInfo>> {
    models
        .iter()
        .max_by_key(|model| {
            let fingerprint = &model.fingerprint;
            (
                encoders_of.contains_key(fingerprint),
                first_seen.get(fingerprint).copied().unwrap_or(0),
                decoders_of.get(fingerprint).copied().unwrap_or(0),
                std::cmp::Reverse(fingerprint.clone()),
            )
        })
        .cloned()
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
    ready_without_decoders: bool,
) {
    let interval = upstreams
        .encoder
        .config()
        .probe_interval
        .min(upstreams.decoder.config().probe_interval);
    let mut last: Option<Serving> = None;
    let mut last_dns_refresh: Option<tokio::time::Instant> = None;
    let mut first_seen = FirstSeen::new();
    let mut rounds: u64 = 0;
    loop {
        rounds += 1;
        if shutdown.is_triggered() {
            break;
        }
        let refresh_due =
            last_dns_refresh.is_none_or(|at| at.elapsed() >= dns_refresh_period(&upstreams));
        if refresh_due {
            tokio::join!(upstreams.encoder.refresh(), upstreams.decoder.refresh());
            last_dns_refresh = Some(tokio::time::Instant::now());
        }
        let round = probe_round(&upstreams, &tokenizer, rounds, &mut first_seen).await;
        if round.model.is_some() && round.model != upstreams.model() {
            if let Some(model) = &round.model {
                tracing::info!(
                    fingerprint = %model.fingerprint,
                    previous = upstreams.model().map(|previous| previous.fingerprint.to_string()),
                    context_length = model.context_length,
                    num_image_tokens = model.num_image_tokens,
                    "new requests now go to this model build"
                );
            }
            writer.model.send_replace(round.model.clone());
        }
        if shutdown.is_triggered() {
            break;
        }
        let serving = Serving {
            encoders: round.encoders_ok,
            decoders: round.decoders_ok,
            ready: round.decoders_ok || ready_without_decoders,
        };
        if last != Some(serving) {
            log_change(last, serving);
            health.set_status(SERVICE_NAME, serving.decoders).await;
            health.set_status(READINESS, serving.ready).await;
            writer.serving.send_replace(serving);
            last = Some(serving);
        }
        let period = if serving.encoders && serving.decoders {
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
    writer.serving.send_modify(|serving| serving.ready = false);
}

/// Logs what changed in which pools serve.
fn log_change(last: Option<Serving>, now: Serving) {
    match (last, now.encoders, now.decoders) {
        (_, true, true) => tracing::info!("both pools serve, gateway serving"),
        (None, encoders_ok, decoders_ok) => {
            tracing::info!(encoders_ok, decoders_ok, "waiting for both pools to answer")
        }
        (Some(_), true, false) => tracing::warn!(
            ready = now.ready,
            "no decoder serves: requests wait for one (up to limits.max_waiting_for_replica_seconds)"
        ),
        (Some(_), false, true) => tracing::warn!(
            "no encoder serves: text-only requests are served, requests with images wait for one (up to \
             limits.max_waiting_for_replica_seconds)"
        ),
        (Some(_), false, false) => tracing::warn!(ready = now.ready, "neither pool serves"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn model(fingerprint: &str) -> Arc<ModelInfo> {
        Arc::new(ModelInfo {
            fingerprint: Arc::from(fingerprint),
            context_length: 2048,
            vocab_size: 65037,
            num_image_tokens: 64,
            hidden_size: 2048,
            image_placeholder_first_id: 4,
            image_placeholder_repeated: false,
            family: Arc::from("kosmos-2"),
            eos_token_id: 2,
        })
    }

    fn counts(pairs: &[(&str, usize)]) -> HashMap<Arc<str>, usize> {
        pairs
            .iter()
            .map(|(fingerprint, count)| (Arc::from(*fingerprint), *count))
            .collect()
    }

    fn chosen(
        models: &[Arc<ModelInfo>],
        decoders: &[(&str, usize)],
        encoders: &[(&str, usize)],
        first_seen: &[(&str, u64)],
    ) -> Option<String> {
        let first_seen: FirstSeen = first_seen
            .iter()
            .map(|(fingerprint, round)| (Arc::from(*fingerprint), *round))
            .collect();
        choose_model(models, &counts(decoders), &counts(encoders), &first_seen)
            .map(|model| model.fingerprint.to_string())
    }

    #[test]
    fn the_newest_build_both_pools_serve_takes_new_requests() {
        let models = [model("old"), model("new")];
        let seen = [("old", 1), ("new", 7)];
        // The new build's decoders are up, its encoders not yet: the old build keeps serving.
        assert_eq!(
            chosen(&models, &[("old", 2), ("new", 1)], &[("old", 2)], &seen).as_deref(),
            Some("old")
        );
        // Both pools serve the new build: it takes new requests, even with fewer replicas.
        assert_eq!(
            chosen(
                &models,
                &[("old", 2), ("new", 1)],
                &[("old", 2), ("new", 1)],
                &seen
            )
            .as_deref(),
            Some("new")
        );
        // No encoder at all: the newest build the decoders serve (text-only requests still work).
        assert_eq!(
            chosen(&models, &[("old", 2), ("new", 1)], &[], &seen).as_deref(),
            Some("new")
        );
        assert_eq!(chosen(&[], &[], &[], &[]), None);
    }

    #[test]
    fn builds_first_seen_together_go_by_decoders_then_by_fingerprint() {
        let models = [model("b"), model("a")];
        let seen = [("a", 1), ("b", 1)];
        assert_eq!(
            chosen(&models, &[("a", 1), ("b", 3)], &[("a", 1), ("b", 1)], &seen).as_deref(),
            Some("b")
        );
        assert_eq!(
            chosen(&models, &[("a", 2), ("b", 2)], &[("a", 1), ("b", 1)], &seen).as_deref(),
            Some("a"),
            "every gateway breaks the tie the same way"
        );
    }
}
