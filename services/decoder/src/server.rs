//! Starting and serving: load the text half, start the engine, bind, serve the decoder with health and reflection
//! until shutdown, then drain.

use std::net::SocketAddr;
use std::sync::Arc;

use kosmos_model::{ModelFiles, TextHalf, parse_device};
use kosmos_proto::decoder::v1::decoder_server::DecoderServer;
use kosmos_runtime::Shutdown;
use kosmos_runtime::grpc::Health;
use kosmos_runtime::metrics::{Registry, RpcMetrics, model_name};
use kosmos_runtime::rpc::RpcLayer;
use tokio::net::TcpListener;

use crate::config::{DecoderConfig, SchedulerConfig};
use crate::engine::{EngineHandle, EngineSettings, ModelInfo};
use crate::error::StartError;
use crate::grpc::DecoderService;
use crate::metrics::DecoderMetrics;

/// Loads the text half of the configured model and describes it.
pub fn load_model(config: &DecoderConfig) -> Result<(TextHalf, ModelInfo), StartError> {
    let model_error = |source| StartError::Model {
        dir: config.model_dir.clone(),
        source,
    };
    let files = ModelFiles::open(&config.model_dir).map_err(model_error)?;
    let device = parse_device(&config.device).map_err(model_error)?;
    let fingerprint = files.fingerprint().map_err(model_error)?;
    let text = TextHalf::load(&files, config.dtype, &device).map_err(model_error)?;
    let text_config = &files.config.text_config;
    let num_image_tokens = files.config.latent_query_num;
    let last_placeholder = config.image_placeholder_first_id as usize + num_image_tokens;
    if last_placeholder > text_config.vocab_size {
        return Err(StartError::Config(format!(
            "`image_placeholder_first_id` ({}) + {num_image_tokens} image tokens must fit the vocabulary ({})",
            config.image_placeholder_first_id, text_config.vocab_size
        )));
    }
    let info = ModelInfo {
        fingerprint,
        context_length: text_config.max_position_embeddings,
        vocab_size: text_config.vocab_size,
        num_image_tokens,
        hidden_size: text_config.embed_dim,
        image_placeholder_first_id: config.image_placeholder_first_id,
        bos_token_id: text_config.bos_token_id,
        eos_token_id: text_config.eos_token_id,
        pad_token_id: text_config.pad_token_id,
        device: config.device.clone(),
        dtype: config.dtype,
    };
    Ok((text, info))
}

/// The scheduler settings for a model of `context_length` positions.
pub fn engine_settings(
    config: &SchedulerConfig,
    context_length: usize,
) -> Result<EngineSettings, StartError> {
    let budget = match config.kv_token_budget {
        Some(budget) => budget,
        None => config
            .max_running_sequences
            .checked_mul(
                std::num::NonZeroUsize::new(context_length)
                    .ok_or_else(|| StartError::Config("the model's context length is 0".into()))?,
            )
            .ok_or_else(|| StartError::Config("`scheduler.kv_token_budget` overflows".into()))?,
    };
    if budget.get() < context_length {
        return Err(StartError::Config(format!(
            "`scheduler.kv_token_budget` ({budget}) must be >= the model's context length ({context_length}), or a \
             full-length request could never run"
        )));
    }
    Ok(EngineSettings {
        max_running_sequences: config.max_running_sequences,
        kv_token_budget: budget,
        kv_block_size: config.kv_block_size,
        prefix_caching: config.prefix_caching,
        max_waiting_requests: config.max_waiting_requests,
        max_prefill_tokens_per_step: config.max_prefill_tokens_per_step,
        stream_buffer_messages: config.stream_buffer_messages,
        stalled_poll: config.stalled_poll,
    })
}

/// A decoder with its model loaded, its engine running and its ports bound (gRPC and `/metrics`), not yet
/// serving.
#[derive(Debug)]
pub struct BoundDecoder {
    config: DecoderConfig,
    engine: EngineHandle,
    listener: TcpListener,
    metrics_listener: TcpListener,
    metrics: Arc<DecoderMetrics>,
}

/// Loads the model (on a blocking thread), starts the engine and binds `config.listen` and
/// `config.metrics_listen`.
pub async fn start(config: DecoderConfig) -> Result<BoundDecoder, StartError> {
    let metrics_listener = kosmos_runtime::metrics::bind(config.metrics_listen).await?;
    start_with_metrics(config, metrics_listener).await
}

/// [`start`] with `/metrics` on an already bound `metrics_listener` (`config.metrics_listen` is ignored).
pub async fn start_with_metrics(
    config: DecoderConfig,
    metrics_listener: TcpListener,
) -> Result<BoundDecoder, StartError> {
    let registry =
        Arc::new(Registry::new("decoder").map_err(|err| StartError::Metrics(err.to_string()))?);
    let model = model_name(&config.model_dir);
    let metrics = Arc::new(DecoderMetrics::new(Arc::clone(&registry), model.clone()));
    let load_config = config.clone();
    let (text, info) = tokio::task::spawn_blocking(move || load_model(&load_config)).await??;
    let settings = engine_settings(&config.scheduler, info.context_length)?;
    tracing::info!(
        model = %config.model_dir.display(),
        fingerprint = %info.fingerprint,
        context_length = info.context_length,
        kv_token_budget = settings.kv_token_budget.get(),
        kv_block_size = settings.kv_block_size.get(),
        "decoder model loaded"
    );
    registry.set_model(&model, &info.fingerprint);
    let engine =
        EngineHandle::start_with_metrics(text, info, settings, Some(Arc::clone(&metrics)))?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    Ok(BoundDecoder {
        config,
        engine,
        listener,
        metrics_listener,
        metrics,
    })
}

/// Starts the decoder and serves it until `shutdown` trips, then drains in-flight calls.
pub async fn run(config: DecoderConfig, shutdown: Shutdown) -> Result<(), StartError> {
    start(config).await?.serve(shutdown).await
}

impl BoundDecoder {
    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, StartError> {
        self.listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: self.config.listen,
                source,
            })
    }

    /// The bound `/metrics` address (the real port when configured with port 0).
    pub fn metrics_addr(&self) -> Result<SocketAddr, StartError> {
        self.metrics_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: self.config.metrics_listen,
                source,
            })
    }

    /// A handle on the engine (in-process callers, tests, benchmarks).
    pub fn engine(&self) -> EngineHandle {
        self.engine.clone()
    }

    /// Serves until `shutdown` trips. Readiness turns SERVING once the engine loop runs, NOT_SERVING when shutdown
    /// begins (before draining) or the engine stops; in-flight calls then get `drain_timeout` to finish.
    pub async fn serve(self, shutdown: Shutdown) -> Result<(), StartError> {
        let Self {
            config,
            engine,
            listener,
            metrics_listener,
            metrics,
        } = self;
        let registry = Arc::clone(metrics.registry());
        tracing::info!(addr = ?metrics_listener.local_addr().ok(), "decoder metrics on /metrics");
        let metrics_server = tokio::spawn(kosmos_runtime::metrics::serve(
            metrics_listener,
            Arc::clone(&registry),
            shutdown.clone(),
        ));
        let (health, health_service) = Health::new().await;
        let (reflection_v1, reflection_v1alpha) = kosmos_runtime::grpc::reflection()
            .map_err(|err| StartError::Reflection(err.to_string()))?;
        let watcher = tokio::spawn(watch_health(engine.clone(), health, shutdown.clone()));
        let max_message_bytes = config.limits.max_message_bytes.get();
        let service = DecoderService::new(engine, config.limits.clone()).with_metrics(metrics);
        let decoder = DecoderServer::new(service)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let router = tonic::transport::Server::builder()
            .layer(RpcLayer::new(RpcMetrics::new(&registry)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(decoder);
        tracing::info!(addr = ?listener.local_addr().ok(), "decoder serving");
        let result = kosmos_runtime::grpc::serve_with_drain(
            router,
            listener,
            shutdown.clone(),
            config.drain_timeout,
        )
        .await
        .map_err(StartError::from);
        watcher.abort();
        // The metrics server stops with `shutdown`; after a server error it is stopped here.
        metrics_server.abort();
        if let Ok(Err(err)) = metrics_server.await {
            tracing::warn!(%err, "the metrics server failed");
        }
        tracing::info!("decoder stopped serving");
        result
    }
}

/// Readiness follows the engine: SERVING once its loop runs, NOT_SERVING on shutdown or when it stops.
async fn watch_health(engine: EngineHandle, health: Health, shutdown: Shutdown) {
    let mut monitor = engine.monitor();
    // Only the monitor is kept: the engine must be free to stop when the server drops its handles.
    drop(engine);
    if monitor.running().await && !shutdown.is_triggered() {
        health.set_ready().await;
    }
    tokio::select! {
        () = monitor.stopped() => {
            tracing::error!("decoder engine stopped, marking the service not serving");
            health.set_not_ready().await;
            health.set_status("", false).await;
        }
        () = shutdown.wait() => {
            health.set_not_ready().await;
        }
    }
}
