//! The gRPC face of the encoder (`kosmos.encoder.v1.VisionEncoder`): wire requests become checked domain values
//! here, and engine results become wire responses here; no other module sees proto types.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kosmos_model::DType as ModelDType;
use kosmos_proto::encoder::v1::vision_encoder_server::VisionEncoder;
use kosmos_proto::encoder::v1::{
    EncodeRequest, EncodeResponse, EncodeTimings, EncoderBatching, EncoderLimits, InfoRequest,
    InfoResponse,
};
use kosmos_proto::tensor::v1::{DType, Tensor};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::config::Limits;
use crate::engine::{ChunkOutput, EngineHandle};
use crate::error::RequestError;
use crate::images::{CheckedImage, Preprocessor, check_image};
use crate::metrics::EncoderMetrics;

/// What the loaded model is, as `Info` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSummary {
    /// The model fingerprint (see `kosmos_model::ModelFiles::fingerprint`).
    pub fingerprint: String,
    /// Side of the square input of the tower, in pixels (0 for Kosmos-2.5's pages).
    pub image_size: usize,
    /// The model family (`kosmos-2`, `kosmos-2.5`).
    pub family: &'static str,
    /// Kosmos-2.5: patches per page; 0 otherwise.
    pub max_patches: usize,
    /// Embedding rows per image.
    pub tokens_per_image: usize,
    /// Embedding width.
    pub hidden_size: usize,
    /// Device name as configured.
    pub device: String,
    /// Dtype of the weights.
    pub weights_dtype: ModelDType,
}

/// State shared by every call.
#[derive(Debug)]
pub(crate) struct ServiceState {
    limits: Limits,
    preprocessor: Arc<Preprocessor>,
    engine: EngineHandle,
    /// Set once the weights are loaded and the engine takes work.
    model: OnceLock<ModelSummary>,
    /// Set when shutdown begins: new calls are refused, calls in flight finish.
    draining: AtomicBool,
    metrics: Arc<EncoderMetrics>,
}

impl ServiceState {
    pub(crate) fn new(
        limits: Limits,
        preprocessor: Arc<Preprocessor>,
        engine: EngineHandle,
        metrics: Arc<EncoderMetrics>,
    ) -> Self {
        Self {
            limits,
            preprocessor,
            engine,
            model: OnceLock::new(),
            draining: AtomicBool::new(false),
            metrics,
        }
    }

    /// Marks the model loaded; calls are served from now on.
    pub(crate) fn set_ready(&self, model: ModelSummary) {
        if self.model.set(model).is_err() {
            tracing::warn!("the model summary was already set");
        }
    }

    /// Refuses new calls from now on.
    pub(crate) fn begin_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn serving_model(&self) -> Result<&ModelSummary, RequestError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(RequestError::ShuttingDown);
        }
        self.model.get().ok_or(RequestError::Loading)
    }
}

/// The `VisionEncoder` service.
#[derive(Debug, Clone)]
pub struct EncoderService {
    state: Arc<ServiceState>,
}

impl EncoderService {
    pub(crate) fn new(state: Arc<ServiceState>) -> Self {
        Self { state }
    }
}

/// An Encode request after the cheap checks: count, dtype, and each image's bytes and format.
#[derive(Debug)]
struct ValidEncodeRequest {
    images: Vec<CheckedImage>,
    dtype: DType,
}

impl ValidEncodeRequest {
    fn parse(request: EncodeRequest, limits: &Limits) -> Result<Self, RequestError> {
        let count = request.images.len();
        if count == 0 {
            return Err(RequestError::NoImages);
        }
        let max = limits.max_images_per_request.get();
        if count > max {
            return Err(RequestError::TooManyImages { count, max });
        }
        let dtype = match DType::try_from(request.dtype) {
            Ok(DType::DtypeUnspecified) => DType::DtypeF32,
            Ok(dtype) => dtype,
            Err(_) => return Err(RequestError::UnknownDtype(request.dtype)),
        };
        let images = request
            .images
            .into_iter()
            .enumerate()
            .map(|(index, image)| check_image(index, image.data, &image.mime_type, limits))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { images, dtype })
    }
}

fn wire_dtype(dtype: ModelDType) -> DType {
    match dtype {
        ModelDType::F32 => DType::DtypeF32,
        ModelDType::F16 => DType::DtypeF16,
        ModelDType::BF16 => DType::DtypeBf16,
        _ => DType::DtypeUnspecified,
    }
}

impl EncoderService {
    async fn encode_request(
        &self,
        request: EncodeRequest,
        deadline: Option<Instant>,
    ) -> Result<EncodeResponse, RequestError> {
        let model = self.state.serving_model()?;
        let request =
            ValidEncodeRequest::parse(request, &self.state.limits).inspect_err(|err| {
                // The first image that fails the cheap checks (the others are not looked at); the ones failing later
                // on the blocking pool are counted there.
                self.state.metrics.image_rejected(err);
            })?;
        let preprocess_started = Instant::now();
        let pixels = self.state.preprocessor.process_all(request.images).await?;
        let preprocess_time = preprocess_started.elapsed();
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Err(RequestError::DeadlineExceeded("after preprocessing"));
        }
        let receivers = self.state.engine.submit(pixels, deadline)?;
        let replies = async {
            let mut outputs = Vec::with_capacity(receivers.len());
            for receiver in receivers {
                outputs.push(receiver.await.map_err(|_| RequestError::EngineStopped)??);
            }
            Ok::<_, RequestError>(outputs)
        };
        let outputs = match deadline {
            // Dropping the receivers on timeout tells the engine to skip whatever is still queued.
            Some(deadline) => tokio::time::timeout_at(deadline.into(), replies)
                .await
                .map_err(|_| RequestError::DeadlineExceeded("while waiting for the encoder"))??,
            None => replies.await?,
        };
        let shape = [model.tokens_per_image, model.hidden_size];
        let dtype = request.dtype;
        let fingerprint = model.fingerprint.clone();
        // Converting up to max_images_per_request embeddings is milliseconds of CPU: off the async workers.
        tokio::task::spawn_blocking(move || {
            build_response(outputs, shape, dtype, fingerprint, preprocess_time)
        })
        .await
        .map_err(|err| RequestError::Internal(format!("building the response failed: {err}")))?
    }

    fn info_response(&self) -> Result<InfoResponse, RequestError> {
        let model = self.state.serving_model()?;
        let limits = &self.state.limits;
        let batching = self.state.engine.settings();
        let stats = self.state.engine.stats();
        Ok(InfoResponse {
            model_fingerprint: model.fingerprint.clone(),
            image_size: model.image_size as u32,
            tokens_per_image: model.tokens_per_image as u32,
            hidden_size: model.hidden_size as u32,
            limits: Some(EncoderLimits {
                max_image_bytes: limits.image.max_image_bytes,
                max_width: limits.image.max_image_width,
                max_height: limits.image.max_image_height,
                max_pixels: limits.image.max_image_pixels,
                max_images_per_request: saturating_u32(limits.max_images_per_request.get()),
                formats: limits
                    .image
                    .formats
                    .iter()
                    .map(|format| format.mime_type().to_string())
                    .collect(),
            }),
            batching: Some(EncoderBatching {
                max_batch_images: saturating_u32(batching.max_batch_images.get()),
                max_queue_delay_seconds: batching.max_queue_delay.as_secs_f64(),
                max_queued_images: saturating_u32(batching.max_queued_images.get()),
            }),
            batches_executed: stats.batches_executed,
            images_encoded: stats.images_encoded,
            device: model.device.clone(),
            weights_dtype: wire_dtype(model.weights_dtype) as i32,
            family: model.family.to_string(),
            max_patches: saturating_u32(model.max_patches),
        })
    }
}

fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn build_response(
    outputs: Vec<ChunkOutput>,
    shape: [usize; 2],
    dtype: DType,
    fingerprint: String,
    preprocess_time: Duration,
) -> Result<EncodeResponse, RequestError> {
    let mut embeddings: Vec<Tensor> = Vec::new();
    let mut queue_time = Duration::ZERO;
    let mut batch_size = 0;
    // Items of one request may ride in the same batch: count each batch's compute once.
    let mut encode_times = BTreeMap::new();
    for output in outputs {
        queue_time = queue_time.max(output.queue_time);
        batch_size = batch_size.max(output.batch_size);
        encode_times.insert(output.batch_id, output.encode_time);
        for values in &output.embeddings {
            if values.len() != shape[0] * shape[1] {
                return Err(RequestError::Internal(format!(
                    "an embedding has {} values, expected {}x{}",
                    values.len(),
                    shape[0],
                    shape[1]
                )));
            }
            let tensor = kosmos_runtime::tensor::from_f32(values, &shape, dtype)
                .map_err(|err| RequestError::Internal(format!("embedding to wire: {err}")))?;
            embeddings.push(tensor);
        }
    }
    Ok(EncodeResponse {
        embeddings,
        model_fingerprint: fingerprint,
        timings: Some(EncodeTimings {
            queue_seconds: queue_time.as_secs_f64(),
            preprocess_seconds: preprocess_time.as_secs_f64(),
            encode_seconds: encode_times.values().sum::<Duration>().as_secs_f64(),
            batch_size: saturating_u32(batch_size),
        }),
    })
}

fn log_failure(error: &RequestError) {
    match error.code() {
        tonic::Code::InvalidArgument | tonic::Code::DeadlineExceeded => {
            tracing::debug!(%error, "encode refused");
        }
        tonic::Code::Internal => tracing::error!(%error, "encode failed"),
        _ => tracing::info!(%error, "encode failed"),
    }
}

#[tonic::async_trait]
impl VisionEncoder for EncoderService {
    async fn encode(
        &self,
        request: Request<EncodeRequest>,
    ) -> Result<Response<EncodeResponse>, Status> {
        let received = Instant::now();
        let deadline = kosmos_runtime::grpc::request_deadline(&request, received);
        let span = tracing::info_span!("encode", images = request.get_ref().images.len());
        let result = self
            .encode_request(request.into_inner(), deadline)
            .instrument(span.clone())
            .await;
        match result {
            Ok(response) => Ok(Response::new(response)),
            Err(error) => {
                span.in_scope(|| log_failure(&error));
                Err(error.into())
            }
        }
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.info_response()?))
    }
}
