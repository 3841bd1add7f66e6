//! Starting and serving: load the text half, start the engine, bind, then serve through the runtime's one
//! lifecycle ([`kosmos_runtime::service`]): health and reflection, readiness following the engine, drain on
//! shutdown.

use std::sync::Arc;

use kosmos_model::{Family, ModelFiles, TextHalf, parse_device};
use kosmos_proto::decoder::v1::decoder_server::DecoderServer;
use kosmos_runtime::config::invalid;
use kosmos_runtime::grpc::Health;
use kosmos_runtime::metrics::{Registry, model_name};
use kosmos_runtime::service::{BoxError, Watcher, watcher};
use kosmos_runtime::{Bound, Service, Shutdown};

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
    let text_config = files.config.text_config();
    let num_image_tokens = files.config.latent_query_num();
    // Kosmos-2.5 marks every image position with its image token `<s>` (the processor's `image_token`); KOSMOS-1
    // and Kosmos-2 with consecutive ids from `image_placeholder_first_id`.
    let (placeholder, repeated) = match files.config.family() {
        Family::Kosmos2 => (config.image_placeholder_first_id, false),
        Family::Kosmos25 => (text_config.bos_token_id, true),
    };
    let last_placeholder = config.image_placeholder_first_id as usize + num_image_tokens;
    if !repeated && last_placeholder > text_config.vocab_size {
        return Err(invalid(
            "image_placeholder_first_id",
            format!(
                "{} + {num_image_tokens} image tokens must fit the vocabulary ({})",
                config.image_placeholder_first_id, text_config.vocab_size
            ),
        )
        .into());
    }
    let info = ModelInfo {
        fingerprint,
        context_length: text_config.max_position_embeddings,
        vocab_size: text_config.vocab_size,
        num_image_tokens,
        hidden_size: text_config.embed_dim,
        image_placeholder_first_id: placeholder,
        image_placeholder_repeated: repeated,
        family: files.config.family().name(),
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
                    .ok_or_else(|| invalid("model_dir", "the model's context length is 0"))?,
            )
            .ok_or_else(|| invalid("scheduler.kv_token_budget", "overflows"))?,
    };
    if budget.get() < context_length {
        return Err(invalid(
            "scheduler.kv_token_budget",
            format!(
                "({budget}) must be >= the model's context length ({context_length}), or a full-length request \
                 could never run"
            ),
        )
        .into());
    }
    Ok(EngineSettings {
        max_running_sequences: config.max_running_sequences,
        kv_token_budget: budget,
        kv_block_size: config.kv_block_size,
        prefix_caching: config.prefix_caching,
        kv_cache_dtype: config.kv_cache_dtype,
        max_waiting_requests: config.max_waiting_requests,
        max_prefill_tokens_per_step: config.max_prefill_tokens_per_step,
        stream_buffer_messages: config.stream_buffer_messages,
        stalled_poll: config.stalled_poll,
        paused_timeout: config.paused_timeout,
    })
}

kosmos_runtime::service_main!(
    Decoder,
    "decoder",
    DecoderConfig,
    EngineHandle,
    StartError,
    bind
);

/// Loads the model (on a blocking thread), starts the engine and binds `server.listen` and `metrics.listen`;
/// returns the bound service and a handle on the engine (in-process callers, tests, benchmarks).
pub async fn bind(config: DecoderConfig) -> Result<(Bound, EngineHandle), StartError> {
    let registry = Arc::new(Registry::new("decoder").map_err(kosmos_runtime::ServeError::from)?);
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
    let max_message_bytes = config.server.max_message_bytes.get();
    let service = DecoderService::new(engine.clone(), config.limits.clone()).with_metrics(metrics);
    let decoder = DecoderServer::new(service)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let bound = Service::new("decoder", config.server.clone(), registry)?
        .add_service(decoder)
        .watch(follow_engine(engine.clone()))
        .bind()
        .await?;
    Ok((bound, engine))
}

/// Starts the decoder and serves it until `shutdown` trips, then drains in-flight calls.
pub async fn run(config: DecoderConfig, shutdown: Shutdown) -> Result<(), StartError> {
    Ok(bind(config).await?.0.serve(shutdown).await?)
}

fn follow_engine(engine: EngineHandle) -> Watcher {
    watcher(move |health, shutdown| async move {
        watch_health(engine, health, shutdown).await;
        Ok::<(), BoxError>(())
    })
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
