//! Spans in tests: a `tracing` subscriber whose OpenTelemetry layer exports every ended span into memory, and
//! lookups over them. Install it once per test binary (a binary of its own: the subscriber is process-global).

use std::sync::{Arc, Mutex, OnceLock};

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The spans ended so far.
#[derive(Debug, Clone, Default)]
pub struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        if let Ok(mut spans) = self.0.lock() {
            spans.extend(batch);
        }
        std::future::ready(Ok(()))
    }
}

impl Collected {
    /// Every span ended so far.
    pub fn spans(&self) -> Vec<SpanData> {
        self.0.lock().map(|spans| spans.clone()).unwrap_or_default()
    }

    /// The ended spans named `name`.
    pub fn named(&self, name: &str) -> Vec<SpanData> {
        self.spans()
            .into_iter()
            .filter(|span| span.name == name)
            .collect()
    }

    /// The ended spans named `name` once there are at least `count` of them, or what there is after `limit`. A
    /// server's call span ends when its handler's future is dropped, which may be just after the client has its
    /// answer.
    pub async fn named_eventually(
        &self,
        name: &str,
        count: usize,
        limit: std::time::Duration,
    ) -> Vec<SpanData> {
        let started = std::time::Instant::now();
        loop {
            let spans = self.named(name);
            if spans.len() >= count || started.elapsed() >= limit {
                return spans;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Installs the collecting subscriber (once per process) and returns the collector.
pub fn collect() -> Collected {
    static COLLECTED: OnceLock<(Collected, SdkTracerProvider)> = OnceLock::new();
    let (collected, _provider) = COLLECTED.get_or_init(|| {
        let collected = Collected::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(collected.clone())
            .build();
        let tracer = provider.tracer("test");
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(tracer))
            .try_init()
            .expect("no other subscriber in this test binary");
        (collected, provider)
    });
    collected.clone()
}

/// A `traceparent` value for `trace_id` (32 hex digits), sampled, with a made-up parent span.
pub fn traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-00f067aa0ba902b7-01")
}

/// The span ids of `spans`.
pub fn ids(spans: &[SpanData]) -> Vec<SpanId> {
    spans
        .iter()
        .map(|span| span.span_context.span_id())
        .collect()
}

/// The trace id of `span`.
pub fn trace_of(span: &SpanData) -> TraceId {
    span.span_context.trace_id()
}

/// The span ids `span` links to.
pub fn links(span: &SpanData) -> Vec<SpanId> {
    span.links
        .iter()
        .map(|link| link.span_context.span_id())
        .collect()
}
