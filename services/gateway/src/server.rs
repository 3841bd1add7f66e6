//! Starting and serving: load the tokenizer, build the pools, bind, then serve the public API through the
//! runtime's one lifecycle ([`kosmos_runtime::service`]): readiness follows the pools' probes, drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use kosmos_processor::KosmosTokenizer;
use kosmos_proto::v1::kosmos_server::KosmosServer;
use kosmos_runtime::metrics::{Registry, model_name};
use kosmos_runtime::service::{BoxError, Watcher, watcher};
use kosmos_runtime::{Bound, Service, Shutdown};

use crate::auth::Authenticator;
use crate::cache::EmbeddingCache;
use crate::config::GatewayConfig;
use crate::encode::ImageEncoder;
use crate::error::StartError;
use crate::grpc::KosmosService;
use crate::metrics::{GatewayMetrics, GatewayStats};
use crate::pool::Pool;
use crate::state::GatewayState;
use crate::upstream::{self, ModelInfo, SERVICE_NAME, Upstreams, UpstreamsWriter};

/// A handle on a running gateway's state, for in-process callers (tests, benchmarks).
#[derive(Debug, Clone)]
pub struct GatewayHandle {
    state: Arc<GatewayState>,
}

impl GatewayHandle {
    /// The gateway's load now.
    pub fn stats(&self) -> GatewayStats {
        self.state.stats()
    }

    /// The model, once a decoder described it.
    pub fn model(&self) -> Option<Arc<ModelInfo>> {
        self.state.upstreams.model()
    }

    /// Calls started on each replica of the encoder and the decoder pool (in the pools' replica order), as the
    /// gateway counted them.
    pub fn replica_calls(&self) -> (Vec<u64>, Vec<u64>) {
        let calls = |pool: &crate::pool::Pool| -> Vec<u64> {
            pool.replicas()
                .iter()
                .map(|replica| replica.calls_total())
                .collect()
        };
        (
            calls(&self.state.upstreams.encoder),
            calls(&self.state.upstreams.decoder),
        )
    }

    /// Waits until both pools serve the model, or `timeout`; returns whether they do.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        self.state.upstreams.wait_ready(timeout).await
    }
}

kosmos_runtime::service_main!(
    Gateway,
    "gateway",
    GatewayConfig,
    GatewayHandle,
    StartError,
    bind
);

/// A Kosmos-2.5 directory's page processor (`config.json` `model_type` `kosmos-2.5`); `None` for other models.
fn page_processor(
    dir: &std::path::Path,
) -> Result<Option<kosmos_processor::FlattenedPatchConfig>, StartError> {
    let kosmos25 = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .is_some_and(|config| {
            config.get("model_type").and_then(|t| t.as_str()) == Some(crate::upstream::KOSMOS_2_5)
        });
    if !kosmos25 {
        return Ok(None);
    }
    kosmos_processor::FlattenedPatchConfig::from_file(dir.join("preprocessor_config.json"))
        .map(Some)
        .map_err(|source| StartError::PageProcessor {
            dir: dir.to_path_buf(),
            source,
        })
}

/// Loads the tokenizer (on a blocking thread), builds the pools and binds `server.listen`, `metrics.listen` and
/// `http.listen` (when set).
pub async fn bind(config: GatewayConfig) -> Result<(Bound, GatewayHandle), StartError> {
    let dir = config.model_dir.clone();
    let tokenizer = tokio::task::spawn_blocking(move || {
        KosmosTokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|source| StartError::Tokenizer { dir, source })
    })
    .await??;
    let encoder_pool = Pool::new("encoder", config.encoder.clone())?;
    let decoder_pool = Pool::new("decoder", config.decoder.clone())?;
    let (upstreams, writer) = Upstreams::new(encoder_pool.clone(), decoder_pool);
    let cache = Arc::new(EmbeddingCache::new(config.cache_capacity_bytes));
    let max_message_bytes = config.server.max_message_bytes.get();
    let encoder = ImageEncoder::new(encoder_pool, cache, max_message_bytes);
    let auth = match &config.api_keys_file {
        Some(path) => {
            let auth = Authenticator::from_file(path, crate::auth::RELOAD_INTERVAL)
                .map_err(StartError::ApiKeys)?;
            tracing::info!(file = %path.display(), keys = auth.key_count(), "API keys required");
            auth
        }
        None => {
            tracing::warn!(
                "no API keys configured (`auth.api_keys_file` / --api-keys): every caller is served, without \
                 quotas; fine on a laptop, not on a network"
            );
            Authenticator::open()
        }
    };
    let model = model_name(&config.model_dir);
    let metrics = GatewayMetrics::new(&model).map_err(kosmos_runtime::ServeError::from)?;
    let registry = Arc::clone(metrics.registry());
    let pages = page_processor(&config.model_dir)?;
    let state = Arc::new(
        GatewayState::new(
            Arc::new(tokenizer),
            upstreams,
            encoder,
            config.limits.clone(),
            config.stream_buffer_messages.get(),
            metrics,
            auth,
        )
        .with_pages(pages),
    );
    let observed = Arc::downgrade(&state);
    state
        .metrics
        .observe(move || observed.upgrade().map(|state| state.stats()));
    let kosmos = KosmosServer::new(KosmosService::new(Arc::clone(&state)))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let http_api = match config.http.listen {
        Some(listen) => {
            let template = crate::http::chat_template(&config.model_dir, &state.tokenizer)
                .map_err(StartError::ChatTemplate)?;
            match &template {
                Some(template) => tracing::info!(
                    template = %template.path.display(),
                    "the HTTP API renders chat messages with the model's chat template"
                ),
                None => tracing::info!(
                    "the model directory carries no chat template: the HTTP API joins chat messages in order"
                ),
            }
            let router = crate::http::router(
                Arc::clone(&state),
                config.http.clone(),
                model.clone(),
                template,
            )
            .map_err(StartError::FetchCa)?;
            Some((listen, router))
        }
        None => None,
    };
    let watcher = follow_pools(
        Arc::clone(&state),
        writer,
        Arc::clone(&registry),
        model,
        config.ready_without_decoders,
    );
    let mut service = Service::new("gateway", config.server.clone(), registry)?
        .byte_budget(Arc::clone(&state.budget))
        .add_service(kosmos)
        .watch(watcher);
    if let Some((listen, router)) = http_api {
        service = service.http(listen, router);
    }
    let bound = service.bind().await?;
    Ok((bound, GatewayHandle { state }))
}

/// Starts the gateway and serves it until `shutdown` trips, then drains in-flight calls.
pub async fn run(config: GatewayConfig, shutdown: Shutdown) -> Result<(), StartError> {
    Ok(bind(config).await?.0.serve(shutdown).await?)
}

/// Health follows the probes of both pools (see `crate::upstream`); `kosmos_build_info` names the model the
/// decoders serve once they have described it.
fn follow_pools(
    state: Arc<GatewayState>,
    writer: UpstreamsWriter,
    registry: Arc<Registry>,
    model: String,
    ready_without_decoders: bool,
) -> Watcher {
    watcher(move |health, shutdown| async move {
        health.set_status(SERVICE_NAME, false).await;
        let mut changes = state.upstreams.model_changes();
        let build_info = async move {
            loop {
                let fingerprint = changes
                    .borrow_and_update()
                    .as_ref()
                    .map(|model| model.fingerprint.to_string())
                    .unwrap_or_default();
                registry.set_model(&model, &fingerprint);
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        let probes = upstream::watch(
            state.upstreams.clone(),
            writer,
            state.tokenizer.clone(),
            health,
            shutdown,
            ready_without_decoders,
        );
        // The probes end at shutdown; the model watch ends with them.
        tokio::select! {
            () = probes => {}
            () = build_info => {}
        }
        Ok::<(), BoxError>(())
    })
}
