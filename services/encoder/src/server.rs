//! Wiring: the model loads on the engine thread while the gRPC server (health, reflection, the encoder) already
//! answers; readiness turns SERVING once the engine takes work and NOT_SERVING when shutdown begins; shutdown
//! stops admitting, lets the calls in flight finish, then stops the engine.

use std::sync::Arc;

use kosmos_model::{DType, ModelFiles, Tensor, VisionHalf, parse_device};
use kosmos_processor::{ImageProcessorConfig, ResizeTarget};
use kosmos_proto::encoder::v1::vision_encoder_server::VisionEncoderServer;
use kosmos_runtime::Shutdown;
use kosmos_runtime::grpc::{Health, reflection};
use kosmos_runtime::metrics::{Registry, RpcMetrics, model_name};
use kosmos_runtime::rpc::RpcLayer;
use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::config::EncoderConfig;
use crate::engine::{self, VisionEngine};
use crate::error::StartError;
use crate::grpc::{EncoderService, ModelSummary, ServiceState};
use crate::images::Preprocessor;
use crate::metrics::EncoderMetrics;

/// Binds `config.listen` and `config.metrics_listen` and serves until `shutdown` trips and the calls in flight
/// have finished.
pub async fn run(config: EncoderConfig, shutdown: Shutdown) -> Result<(), StartError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            address: config.listen,
            source,
        })?;
    serve(listener, config, shutdown).await
}

/// Serves on an already bound `listener` (`config.listen` is ignored) until `shutdown` trips and the calls in
/// flight have finished; binds `config.metrics_listen` for `/metrics`. Tests bind `127.0.0.1:0`, read
/// `local_addr()`, then spawn this.
///
/// Returns an error when the model cannot be loaded; Encode and Info answer UNAVAILABLE until it is.
pub async fn serve(
    listener: TcpListener,
    config: EncoderConfig,
    shutdown: Shutdown,
) -> Result<(), StartError> {
    let metrics_listener = kosmos_runtime::metrics::bind(config.metrics_listen).await?;
    serve_with_metrics(listener, metrics_listener, config, shutdown).await
}

/// [`serve`] with `/metrics` served on an already bound `metrics_listener` (`config.metrics_listen` is ignored)
/// until `shutdown` trips.
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics_listener: TcpListener,
    config: EncoderConfig,
    shutdown: Shutdown,
) -> Result<(), StartError> {
    let registry =
        Arc::new(Registry::new("encoder").map_err(|err| StartError::Metrics(err.to_string()))?);
    let metrics = Arc::new(EncoderMetrics::new(Arc::clone(&registry)));
    let metrics_address = metrics_listener.local_addr().ok();
    let metrics_server = tokio::spawn(kosmos_runtime::metrics::serve(
        metrics_listener,
        Arc::clone(&registry),
        shutdown.clone(),
    ));
    tracing::info!(address = ?metrics_address, "encoder metrics on /metrics");
    let result = serve_grpc(listener, config, shutdown.clone(), &registry, metrics).await;
    // The metrics server stops with `shutdown`; on an early error it is stopped here.
    metrics_server.abort();
    if let Ok(Err(err)) = metrics_server.await {
        tracing::warn!(%err, "the metrics server failed");
    }
    result
}

async fn serve_grpc(
    listener: TcpListener,
    config: EncoderConfig,
    shutdown: Shutdown,
    registry: &Arc<Registry>,
    metrics: Arc<EncoderMetrics>,
) -> Result<(), StartError> {
    let model_dir = config.model_dir.clone();
    let files = ModelFiles::open(&model_dir).map_err(|source| StartError::Model {
        dir: model_dir.clone(),
        source,
    })?;
    let image_size = files.config.vision_config.image_size;
    let processor = ImageProcessorConfig::from_file(model_dir.join("preprocessor_config.json"))?;
    check_preprocessor(&processor, image_size)?;
    let preprocessor = Arc::new(
        Preprocessor::new(
            config.limits.clone(),
            processor,
            image_size,
            config.preprocess_workers,
        )
        .with_metrics(Arc::clone(&metrics)),
    );
    let (device, dtype) = (config.device.clone(), config.dtype);
    let (engine, engine_thread, startup) =
        engine::start_with_metrics(config.batching, Some(Arc::clone(&metrics)), move || {
            load_model(&files, device, dtype)
        })?;
    let state = Arc::new(ServiceState::new(
        config.limits.clone(),
        preprocessor,
        engine,
        metrics,
    ));

    let (health, health_service) = Health::new().await;
    let (reflection_v1, reflection_v1alpha) =
        reflection().map_err(|err| StartError::Reflection(err.to_string()))?;
    // Explicit limits both ways: tonic's 4 MiB default is below a request of a few photos.
    let encoder_service = VisionEncoderServer::new(EncoderService::new(Arc::clone(&state)))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let router = Server::builder()
        .layer(RpcLayer::new(RpcMetrics::new(registry)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(encoder_service);
    let address = listener.local_addr().ok();
    let stop_serving = Shutdown::new();
    let mut server = tokio::spawn(kosmos_runtime::grpc::serve(
        router,
        listener,
        stop_serving.clone(),
    ));
    tracing::info!(?address, model = %model_dir.display(), "encoder listening, loading the model");

    let loaded = tokio::select! {
        loaded = startup => Some(loaded),
        () = shutdown.wait() => None,
    };
    let mut server_result = None;
    let outcome = match loaded {
        Some(Ok(Ok(model))) => {
            tracing::info!(fingerprint = %model.fingerprint, device = %model.device, "encoder ready");
            registry.set_model(&model_name(&model_dir), &model.fingerprint);
            state.set_ready(model);
            health.set_ready().await;
            tokio::select! {
                () = shutdown.wait() => {}
                result = &mut server => server_result = Some(result),
            }
            Ok(())
        }
        Some(Ok(Err(err))) => Err(err),
        Some(Err(_)) => Err(StartError::Engine(
            "the engine thread ended while loading the model".into(),
        )),
        None => Ok(()),
    };

    tracing::info!("encoder shutting down: refusing new calls, finishing the ones in flight");
    health.set_not_ready().await;
    state.begin_draining();
    stop_serving.trigger();
    let served = match server_result {
        Some(result) => result,
        None => server.await,
    };
    // The handlers are gone with the server; stopping the engine now loses nothing.
    drop(state);
    engine_thread.stop().await;
    tracing::info!("encoder stopped");
    outcome?;
    served.map_err(|err| StartError::ServerTask(err.to_string()))??;
    Ok(())
}

/// Loads the vision half and the fingerprint on the engine thread, and runs one image through it so that the
/// first request does not pay for lazy initialisation (kernels, allocator pools).
fn load_model(
    files: &ModelFiles,
    device_name: String,
    dtype: DType,
) -> Result<(VisionEngine, ModelSummary), StartError> {
    let model_error = |source| StartError::Model {
        dir: files.dir.clone(),
        source,
    };
    let device = parse_device(&device_name).map_err(model_error)?;
    let half = VisionHalf::load(files, dtype, &device).map_err(model_error)?;
    let fingerprint = files.fingerprint().map_err(model_error)?;
    let size = files.config.vision_config.image_size;
    // (1, 3, size, size)
    let warm_up =
        Tensor::zeros((1, 3, size, size), dtype, &device).map_err(|err| model_error(err.into()))?;
    half.encode(&warm_up).map_err(model_error)?;
    let summary = ModelSummary {
        fingerprint,
        image_size: size,
        tokens_per_image: files.config.latent_query_num,
        hidden_size: files.config.text_config.embed_dim,
        device: device_name,
        weights_dtype: dtype,
    };
    Ok((VisionEngine::new(half, device, dtype), summary))
}

/// The preprocessor must produce exactly the tower's input: a `size` × `size` crop (or exact resize).
fn check_preprocessor(config: &ImageProcessorConfig, image_size: usize) -> Result<(), StartError> {
    let output = if config.do_center_crop {
        Some(config.crop_size)
    } else {
        match config.size {
            ResizeTarget::Exact { height, width } if config.do_resize => Some((height, width)),
            _ => None,
        }
    };
    let size = u32::try_from(image_size).ok();
    match (output, size) {
        (Some((height, width)), Some(size)) if height == size && width == size => Ok(()),
        (output, _) => Err(StartError::Incompatible(format!(
            "preprocessor_config.json produces {} images, the vision tower takes {image_size}x{image_size}",
            output.map_or("variable-size".to_string(), |(h, w)| format!("{h}x{w}"))
        ))),
    }
}
