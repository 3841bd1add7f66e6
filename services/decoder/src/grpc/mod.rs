//! The `kosmos.decoder.v1.Decoder` service: validates at the edge, hands jobs to the engine, streams results, and
//! enforces the caller's deadline (`grpc-timeout`) on streams as well as unary calls.

mod convert;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use kosmos_proto::decoder::v1 as pb;
use kosmos_proto::decoder::v1::decoder_server::Decoder;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::config::RequestLimits;
use crate::engine::{EngineHandle, GenerateEvent, ModelInfo};
use crate::error::RequestError;
use crate::metrics::{DecoderMetrics, Operation};

/// The gRPC face of one engine.
#[derive(Debug, Clone)]
pub struct DecoderService {
    engine: EngineHandle,
    info: Arc<ModelInfo>,
    limits: RequestLimits,
    metrics: Option<Arc<DecoderMetrics>>,
}

impl DecoderService {
    /// A service over `engine` with the request `limits`.
    pub fn new(engine: EngineHandle, limits: RequestLimits) -> Self {
        let info = Arc::new(engine.info().clone());
        Self {
            engine,
            info,
            limits,
            metrics: None,
        }
    }

    /// Records the requests refused before they reach the engine in `metrics` (the engine records the rest).
    pub fn with_metrics(mut self, metrics: Arc<DecoderMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Records `result`'s failure, if any, as a request refused `arrived` ago.
    fn refused<T>(
        &self,
        operation: Operation,
        arrived: Instant,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        if let (Err(status), Some(metrics)) = (&result, &self.metrics) {
            metrics.refused(operation, status.code(), arrived.elapsed());
        }
        result
    }

    /// Runs `parse` on a blocking thread when the request carries image embeddings (decoding them is too much
    /// work for an async task), inline otherwise.
    async fn parse<T, F>(&self, has_images: bool, parse: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&ModelInfo) -> Result<T, RequestError> + Send + 'static,
    {
        if !has_images {
            return parse(&self.info).map_err(Status::from);
        }
        let info = self.info.clone();
        tokio::task::spawn_blocking(move || parse(&info))
            .await
            .map_err(|err| Status::internal(format!("request parsing failed: {err}")))?
            .map_err(Status::from)
    }
}

/// The caller's deadline (a little early, see `kosmos_runtime::grpc::answer_by`), or DEADLINE_EXCEEDED when it
/// has already passed.
fn deadline_of<T>(request: &Request<T>, arrived: Instant) -> Result<Option<Instant>, Status> {
    match kosmos_runtime::grpc::request_deadline(request, arrived) {
        Some(deadline) if deadline <= Instant::now() => {
            Err(RequestError::DeadlineExceeded("before the request started").into())
        }
        deadline => Ok(deadline),
    }
}

/// A generation's response stream: engine updates as they come, ended by DEADLINE_EXCEEDED once the caller's
/// deadline passes (even while the engine holds the sequence back). Dropping it cancels the generation.
#[derive(Debug)]
pub struct GenerateStream {
    events: mpsc::Receiver<GenerateEvent>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    ended: bool,
}

impl GenerateStream {
    fn new(events: mpsc::Receiver<GenerateEvent>, deadline: Option<Instant>) -> Self {
        Self {
            events,
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at.into()))),
            ended: false,
        }
    }
}

impl Stream for GenerateStream {
    type Item = Result<pb::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.ended = true;
            self.events.close();
            return Poll::Ready(Some(Err(RequestError::DeadlineExceeded(
                "while generating",
            )
            .into())));
        }
        match self.events.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                // The engine dropped the stream without a finish: it stopped.
                self.ended = true;
                Poll::Ready(Some(Err(RequestError::EngineStopped.into())))
            }
            Poll::Ready(Some(Err(error))) => {
                self.ended = true;
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(Some(Ok(update))) => {
                if update.finish.is_some() {
                    self.ended = true;
                }
                Poll::Ready(Some(Ok(update.into())))
            }
        }
    }
}

#[tonic::async_trait]
impl Decoder for DecoderService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let arrived = Instant::now();
        let submitted = async {
            let deadline = deadline_of(&request, arrived)?;
            let request = request.into_inner();
            let has_images = convert::has_images(&request.prompt);
            let job = self
                .parse(has_images, move |info| {
                    convert::generate_job(&request, info, deadline, arrived)
                })
                .await?;
            Ok::<_, Status>((self.engine.generate(job)?, deadline))
        }
        .await;
        let (events, deadline) = self.refused(Operation::TextCompletion, arrived, submitted)?;
        Ok(Response::new(GenerateStream::new(events, deadline)))
    }

    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let arrived = Instant::now();
        let submitted = async {
            let deadline = deadline_of(&request, arrived)?;
            let request = request.into_inner();
            let has_images = convert::has_images(&request.context);
            let limits = self.limits.clone();
            let job = self
                .parse(has_images, move |info| {
                    convert::score_job(&request, info, &limits, deadline, arrived)
                })
                .await?;
            Ok::<_, Status>((self.engine.score(job)?, deadline))
        }
        .await;
        // From here on the engine records how the request ends.
        let (reply, deadline) = self.refused(Operation::Score, arrived, submitted)?;
        let result = match deadline {
            Some(deadline) => tokio::time::timeout(convert::remaining(deadline), reply)
                .await
                .map_err(|_| Status::from(RequestError::DeadlineExceeded("while scoring")))?,
            None => reply.await,
        };
        let output = result.map_err(|_| Status::from(RequestError::EngineStopped))??;
        Ok(Response::new(output.into()))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(convert::info_response(
            &self.info,
            self.engine.settings(),
            &self.engine.snapshot(),
        )))
    }
}
