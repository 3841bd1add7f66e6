//! Wiring: the model loads on the engine thread while the gRPC server (health, reflection, the encoder) already
//! answers; readiness turns SERVING once the engine takes work and NOT_SERVING when shutdown begins; shutdown
//! stops admitting, lets the calls in flight finish, then stops the engine. The lifecycle itself is the runtime's
//! ([`kosmos_runtime::service`]).

use std::sync::Arc;

use kosmos_model::{DType, ModelConfig, ModelFiles, Tensor, VisionHalf, parse_device};
use kosmos_processor::{FlattenedPatchConfig, ImageProcessorConfig, ResizeTarget};
use kosmos_proto::encoder::v1::vision_encoder_server::VisionEncoderServer;
use kosmos_runtime::metrics::{Registry, model_name};
use kosmos_runtime::service::{BoxError, Watcher, watcher};
use kosmos_runtime::{Bound, Service, Shutdown};

use crate::config::EncoderConfig;
use crate::engine::{self, EngineThread, Startup, VisionEngine};
use crate::error::StartError;
use crate::grpc::{EncoderService, ModelSummary, ServiceState};
use crate::images::{Pipeline, Preprocessor};
use crate::metrics::EncoderMetrics;

kosmos_runtime::service_main!(
    Encoder,
    "encoder",
    EncoderConfig,
    (),
    StartError,
    bind_service
);

/// [`bind`] as the runtime's [`ServiceMain`](kosmos_runtime::cli::ServiceMain) binds (the encoder has no handle).
async fn bind_service(config: EncoderConfig) -> Result<(Bound, ()), StartError> {
    Ok((bind(config).await?, ()))
}

/// Checks the model directory, starts loading the model on the engine thread and binds `server.listen` and
/// `metrics.listen`. Encode and Info answer UNAVAILABLE until the model is loaded; a model that fails to load
/// stops the service with that error.
pub async fn bind(config: EncoderConfig) -> Result<Bound, StartError> {
    let registry = Arc::new(Registry::new("encoder").map_err(kosmos_runtime::ServeError::from)?);
    let metrics = Arc::new(EncoderMetrics::new(Arc::clone(&registry)));
    let model_dir = config.model_dir.clone();
    let files = ModelFiles::open(&model_dir).map_err(|source| StartError::Model {
        dir: model_dir.clone(),
        source,
    })?;
    let processor_path = model_dir.join("preprocessor_config.json");
    let pipeline = match &files.config {
        ModelConfig::Kosmos2(model) => {
            let image_size = model.vision_config.image_size;
            let processor = ImageProcessorConfig::from_file(&processor_path)?;
            check_preprocessor(&processor, image_size)?;
            Pipeline::Clip {
                config: processor,
                image_size,
            }
        }
        ModelConfig::Kosmos25(model) => {
            let processor = FlattenedPatchConfig::from_file(&processor_path)?;
            let expected = 2 + model.vision_config.patch_embed_hidden_size;
            if processor.row_len() != expected {
                return Err(StartError::Incompatible(format!(
                    "preprocessor_config.json's patch_size {}x{} gives rows of {} values, the page tower takes {expected}",
                    processor.patch_height,
                    processor.patch_width,
                    processor.row_len()
                )));
            }
            Pipeline::Pages {
                config: processor,
                max_num_patches: model.vision_config.max_num_patches,
            }
        }
    };
    let preprocessor = Arc::new(
        Preprocessor::with_pipeline(
            config.limits.clone(),
            pipeline.clone(),
            config.preprocess_workers,
        )
        .with_metrics(Arc::clone(&metrics)),
    );
    let (device, dtype) = (config.device.clone(), config.dtype);
    let (engine, engine_thread, startup) =
        engine::start(config.batching, Some(Arc::clone(&metrics)), move || {
            load_model(&files, &pipeline, device, dtype)
        })?;
    let state = Arc::new(ServiceState::new(
        config.limits.clone(),
        preprocessor,
        engine,
        metrics,
    ));
    let max_message_bytes = config.server.max_message_bytes.get();
    // Explicit limits both ways: tonic's 4 MiB default is below a request of a few photos.
    let encoder_service = VisionEncoderServer::new(EncoderService::new(Arc::clone(&state)))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    tracing::info!(model = %model_dir.display(), "encoder loading the model");
    let draining = Arc::clone(&state);
    let watcher = ready_once_loaded(startup, state, Arc::clone(&registry), model_dir);
    let service = Service::new("encoder", config.server.clone(), registry)?
        .add_service(encoder_service)
        .watch(watcher)
        .on_drain(move || draining.begin_draining())
        .on_stop(stop_engine(engine_thread));
    Ok(service.bind().await?)
}

/// Binds and serves until `shutdown` trips and the calls in flight have finished.
pub async fn run(config: EncoderConfig, shutdown: Shutdown) -> Result<(), StartError> {
    Ok(bind(config).await?.serve(shutdown).await?)
}

/// Readiness: SERVING once the engine thread has loaded the model; a failed load stops the service.
fn ready_once_loaded(
    startup: Startup<ModelSummary>,
    state: Arc<ServiceState>,
    registry: Arc<Registry>,
    model_dir: std::path::PathBuf,
) -> Watcher {
    watcher(move |health, shutdown| async move {
        let loaded = tokio::select! {
            loaded = startup => loaded,
            () = shutdown.wait() => return Ok(()),
        };
        match loaded {
            Ok(Ok(model)) => {
                tracing::info!(fingerprint = %model.fingerprint, device = %model.device, "encoder ready");
                registry.set_model(&model_name(&model_dir), &model.fingerprint);
                state.set_ready(model);
                health.set_ready().await;
                Ok(())
            }
            Ok(Err(err)) => Err(BoxError::from(err)),
            Err(_) => Err(BoxError::from(StartError::Engine(
                "the engine thread ended while loading the model".into(),
            ))),
        }
    })
}

/// Once the server has drained no handler can submit work: the engine finishes what is queued and stops.
async fn stop_engine(engine_thread: EngineThread) {
    engine_thread.stop().await;
    tracing::info!("encoder engine stopped");
}

/// Loads the vision half and the fingerprint on the engine thread, and runs one image through it so that the
/// first request does not pay for lazy initialisation (kernels, allocator pools).
fn load_model(
    files: &ModelFiles,
    pipeline: &Pipeline,
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
    let summary = |image_size, max_patches| ModelSummary {
        fingerprint: fingerprint.clone(),
        image_size,
        family: files.config.family().name(),
        max_patches,
        tokens_per_image: files.config.latent_query_num(),
        hidden_size: files.config.text_config().embed_dim,
        device: device_name.clone(),
        weights_dtype: dtype,
    };
    match pipeline {
        Pipeline::Clip { image_size, .. } => {
            let size = *image_size;
            // (1, 3, size, size)
            let warm_up = Tensor::zeros((1, 3, size, size), dtype, &device)
                .map_err(|err| model_error(err.into()))?;
            half.encode(&warm_up).map_err(model_error)?;
            Ok((
                VisionEngine::new(half, device, dtype, size),
                summary(size, 0),
            ))
        }
        Pipeline::Pages { config, .. } => {
            let (max_patches, row_len) = (config.max_patches, config.row_len());
            // One patch at row 1, column 1 (an all-zero page would have no patch to attend to).
            let mut values = vec![0f32; max_patches * row_len];
            values[0] = 1.0;
            values[1] = 1.0;
            let warm_up = Tensor::from_vec(values, (1, max_patches, row_len), &device)
                .map_err(|err| model_error(err.into()))?;
            half.encode_pages(&warm_up).map_err(model_error)?;
            Ok((
                VisionEngine::pages(half, device, dtype, max_patches, row_len),
                summary(0, max_patches),
            ))
        }
    }
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
