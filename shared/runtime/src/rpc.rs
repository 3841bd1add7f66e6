//! The server layer every service installs (`Server::builder().layer(RpcLayer::new(..))`): for each call it
//! continues the caller's W3C trace (`traceparent`) in a `grpc.server` span that lives until the response's last
//! message, and records `rpc_server_call_duration_seconds` with the call's final status, read from the trailers
//! (a stream that the caller drops counts as CANCELLED).
//!
//! Health checks and reflection get no span (probes every few seconds would bury the traces); they are still
//! counted.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::metrics::{RpcMetrics, code_name};
use crate::telemetry::{TRACE_ID_FIELD, extract, trace_id};

/// Traces and meters every call of a server.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    metrics: RpcMetrics,
}

impl RpcLayer {
    /// Traces every call and records call durations in `metrics`.
    pub fn new(metrics: RpcMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`RpcLayer`].
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: RpcMetrics,
}

fn is_infrastructure(method: &str) -> bool {
    method.starts_with("grpc.health.") || method.starts_with("grpc.reflection.")
}

/// The server span of a call, continuing the trace in `headers`.
fn server_span(method: &str, headers: &http::HeaderMap) -> Span {
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %method,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.method = %method,
        rpc.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        // The caller's API key id, recorded by a service that authenticates (never the secret).
        api_key.id = tracing::field::Empty,
    );
    let _ = span.set_parent(extract(headers));
    if let Some(id) = trace_id(&span) {
        span.record(TRACE_ID_FIELD, id.as_str());
    }
    span
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<RpcBody<ResBody>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = request.uri().path().trim_start_matches('/').to_string();
        let span = if is_infrastructure(&method) {
            Span::none()
        } else {
            server_span(&method, request.headers())
        };
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        RpcFuture {
            inner,
            call: Some(Call {
                span,
                method,
                started: Instant::now(),
                metrics: self.metrics.clone(),
            }),
        }
    }
}

/// What is recorded when a call ends.
#[derive(Debug)]
struct Call {
    span: Span,
    method: String,
    started: Instant,
    metrics: RpcMetrics,
}

impl Call {
    fn finish(self, code: tonic::Code) {
        self.metrics
            .record(&self.method, code, self.started.elapsed());
        self.span
            .record("rpc.response.status_code", code_name(code));
        if code != tonic::Code::Ok {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(tonic::Code::from)
}

pin_project! {
    /// The response future of [`RpcService`].
    #[derive(Debug)]
    pub struct RpcFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, ResBody, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<RpcBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.call.as_ref().map(|call| call.span.enter());
            std::task::ready!(this.inner.poll(cx))
        };
        let call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response (every error before the first message) has its status in the headers.
                let call = match (grpc_status(response.headers()), call) {
                    (Some(code), Some(call)) => {
                        call.finish(code);
                        None
                    }
                    (_, call) => call,
                };
                Ok(response.map(|inner| RpcBody { inner, call }))
            }
            Err(err) => {
                if let Some(call) = call {
                    call.finish(tonic::Code::Internal);
                }
                Err(err)
            }
        })
    }
}

pin_project! {
    /// The response body of [`RpcService`]: records the call when the trailers pass, or when it is dropped
    /// unfinished (the caller went away).
    #[derive(Debug)]
    pub struct RpcBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for RpcBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.finish(tonic::Code::Cancelled);
            }
        }
    }
}

impl<B: Body> Body for RpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = {
            let _entered = this.call.as_ref().map(|call| call.span.enter());
            std::task::ready!(this.inner.poll_frame(cx))
        };
        match &polled {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status)
                    && let Some(call) = this.call.take()
                {
                    call.finish(code);
                }
            }
            Some(Err(_)) => {
                if let Some(call) = this.call.take() {
                    call.finish(tonic::Code::Internal);
                }
            }
            None => {
                if let Some(call) = this.call.take() {
                    call.finish(tonic::Code::Ok);
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
