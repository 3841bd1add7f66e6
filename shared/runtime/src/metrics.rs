//! Metrics of every service: OpenTelemetry instruments on a meter provider of the service's own, read by a
//! Prometheus registry and served as Prometheus text on `/metrics` from a separate HTTP port.
//!
//! Each service owns one [`Registry`] (several services in one process — `kosmos serve`, tests — never share
//! series). The instruments common to all services are declared here ([`names`], [`RpcMetrics`], build info);
//! each service declares its own in its `metrics` module. The catalogue of every exported name is
//! `docs/metrics.md`, and each service's tests compare its `/metrics` with it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// The instrument names declared by this crate (OpenTelemetry names; Prometheus adds `_seconds` / `_total`).
pub mod names {
    /// Gauge, always 1: `kosmos_build_info{service, version, model, model_fingerprint}`.
    pub const BUILD_INFO: &str = "kosmos.build_info";
    /// Histogram (s): `rpc_server_call_duration_seconds{rpc_method, rpc_response_status_code}`.
    pub const RPC_SERVER_CALL_DURATION: &str = "rpc.server.call.duration";
}

/// The OpenTelemetry GenAI server metrics the gateway and the decoder both export (each with its own help texts:
/// the gateway measures what callers see, the decoder its own share).
pub mod gen_ai {
    use opentelemetry::metrics::{Histogram, Meter};

    /// Histogram (s), `gen_ai_server_request_duration_seconds`.
    pub const REQUEST_DURATION: &str = "gen_ai.server.request.duration";
    /// Histogram (s), `gen_ai_server_time_to_first_token_seconds`.
    pub const TIME_TO_FIRST_TOKEN: &str = "gen_ai.server.time_to_first_token";
    /// Histogram (s), `gen_ai_server_time_per_output_token_seconds`.
    pub const TIME_PER_OUTPUT_TOKEN: &str = "gen_ai.server.time_per_output_token";
    /// Histogram ({token}), `gen_ai_server_token_usage`.
    pub const TOKEN_USAGE: &str = "gen_ai.server.token.usage";

    /// `gen_ai_operation_name` of a request.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Operation {
        /// Generate and GenerateStream.
        TextCompletion,
        /// Score.
        Score,
    }

    impl Operation {
        /// The label value.
        pub fn name(self) -> &'static str {
            match self {
                Self::TextCompletion => "text_completion",
                Self::Score => "score",
            }
        }
    }

    /// The four GenAI histograms, declared once for the gateway and the decoder (each with its own help texts for
    /// the two that measure from a different arrival).
    #[derive(Debug, Clone)]
    pub struct Histograms {
        /// `gen_ai_server_request_duration_seconds`.
        pub request_duration: Histogram<f64>,
        /// `gen_ai_server_time_to_first_token_seconds`.
        pub time_to_first_token: Histogram<f64>,
        /// `gen_ai_server_time_per_output_token_seconds`.
        pub time_per_output_token: Histogram<f64>,
        /// `gen_ai_server_token_usage`.
        pub token_usage: Histogram<f64>,
    }

    impl Histograms {
        /// Declares them on `meter`; `request_help` and `first_token_help` say where the service measures from.
        pub fn new(
            meter: &Meter,
            request_help: &'static str,
            first_token_help: &'static str,
        ) -> Self {
            use super::{LATENCY_BUCKETS, STAGE_BUCKETS, TOKEN_BUCKETS, histogram};
            Self {
                request_duration: histogram(
                    meter,
                    REQUEST_DURATION,
                    request_help,
                    "s",
                    LATENCY_BUCKETS,
                ),
                time_to_first_token: histogram(
                    meter,
                    TIME_TO_FIRST_TOKEN,
                    first_token_help,
                    "s",
                    LATENCY_BUCKETS,
                ),
                time_per_output_token: histogram(
                    meter,
                    TIME_PER_OUTPUT_TOKEN,
                    "Mean time per generated token after the first, per request.",
                    "s",
                    STAGE_BUCKETS,
                ),
                token_usage: histogram(
                    meter,
                    TOKEN_USAGE,
                    "Tokens per request by type: input (text prompt), image (image positions), output (generated).",
                    "{token}",
                    TOKEN_BUCKETS,
                ),
            }
        }
    }
}

/// Bucket boundaries (seconds) for request-scale latencies: time to first token, request duration, RPC calls.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Bucket boundaries (seconds) for short stages: one token, one image decode, a queue wait, one engine step.
pub const STAGE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// Bucket boundaries for token counts per request.
pub const TOKEN_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// Bucket boundaries for fractions in [0, 1].
pub const RATIO_BUCKETS: &[f64] = &[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0];

/// A histogram with explicit buckets (the SDK's defaults suit milliseconds, not seconds or token counts).
pub fn histogram(
    meter: &Meter,
    name: &'static str,
    help: &'static str,
    unit: &'static str,
    buckets: &[f64],
) -> Histogram<f64> {
    meter
        .f64_histogram(name)
        .with_description(help)
        .with_unit(unit)
        .with_boundaries(buckets.to_vec())
        .build()
}

/// What the build-info gauge says about the model; the gateway learns it from the decoders after start.
#[derive(Debug, Clone, Default)]
struct BuildInfo {
    model: String,
    fingerprint: String,
}

/// One service's metrics: the meter its instruments come from and the registry `/metrics` renders.
#[derive(Debug)]
pub struct Registry {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    meter: Meter,
    build: Arc<RwLock<BuildInfo>>,
}

/// The Prometheus exporter could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the Prometheus exporter: {0}")]
pub struct MetricsError(String);

impl Registry {
    /// A registry for `service` (`gateway`, `encoder`, `decoder`) with the build-info gauge.
    pub fn new(service: &'static str) -> Result<Self, MetricsError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()
            .map_err(|err| MetricsError(err.to_string()))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter(scope_name(service));
        let build = Arc::new(RwLock::new(BuildInfo::default()));
        let info = Arc::clone(&build);
        // Observed at every scrape, so a model learnt later shows up without re-registering.
        let _gauge = meter
            .u64_observable_gauge(names::BUILD_INFO)
            .with_description("Always 1; the labels name the build and the model served.")
            .with_callback(move |observer| {
                let info = info.read().map(|info| info.clone()).unwrap_or_default();
                observer.observe(
                    1,
                    &[
                        KeyValue::new("service", service),
                        KeyValue::new("version", env!("CARGO_PKG_VERSION")),
                        KeyValue::new("model", info.model),
                        KeyValue::new("model_fingerprint", info.fingerprint),
                    ],
                );
            })
            .build();
        Ok(Self {
            provider,
            registry,
            meter,
            build,
        })
    }

    /// The meter a service declares its instruments on.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Names the model in `kosmos_build_info`.
    pub fn set_model(&self, model: &str, fingerprint: &str) {
        if let Ok(mut info) = self.build.write() {
            info.model = model.to_string();
            info.fingerprint = fingerprint.to_string();
        }
    }

    /// Every series now, as Prometheus text (version 0.0.4).
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|err| format!("# encoding the metrics failed: {err}\n"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

fn scope_name(service: &'static str) -> &'static str {
    match service {
        "gateway" => "kosmos-gateway",
        "encoder" => "kosmos-encoder",
        "decoder" => "kosmos-decoder",
        other => other,
    }
}

/// The model name services report: the model directory's last component.
pub fn model_name(dir: &std::path::Path) -> String {
    dir.canonicalize()
        .unwrap_or_else(|_| dir.to_path_buf())
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// The gRPC server's call metrics, recorded by [`crate::rpc::RpcLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    duration: Histogram<f64>,
}

impl RpcMetrics {
    /// Declares `rpc_server_call_duration_seconds` on `registry`.
    pub fn new(registry: &Registry) -> Self {
        Self {
            duration: histogram(
                registry.meter(),
                names::RPC_SERVER_CALL_DURATION,
                "Duration of gRPC calls handled, by method and status (streams: until the last message). Its \
                 _count is the request count by outcome.",
                "s",
                LATENCY_BUCKETS,
            ),
        }
    }

    /// Records one finished call.
    pub fn record(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.duration.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("rpc_method", method.to_string()),
                KeyValue::new("rpc_response_status_code", code_name(code)),
            ],
        );
    }
}

/// The gRPC status name (`OK`, `INVALID_ARGUMENT`, …) as the gRPC spec and OpenTelemetry write it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` (Prometheus text) on `listener` until `shutdown` trips.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = Arc::clone(&registry);
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    registry.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

/// Binds `address` for [`serve`], naming it in the error.
pub async fn bind(address: std::net::SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BindError { address, source })
}

/// The metrics port could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for /metrics on {address}: {source}")]
pub struct BindError {
    /// The address asked for.
    pub address: std::net::SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_calls_and_build_info_render_as_prometheus_text() {
        let registry = Registry::new("encoder").expect("registry");
        registry.set_model("demo", "abc123");
        let rpc = RpcMetrics::new(&registry);
        rpc.record(
            "kosmos.encoder.v1.VisionEncoder/Encode",
            tonic::Code::Ok,
            Duration::from_millis(3),
        );
        rpc.record(
            "kosmos.encoder.v1.VisionEncoder/Encode",
            tonic::Code::InvalidArgument,
            Duration::from_millis(1),
        );
        let text = registry.render();
        let lines: Vec<_> = text.lines().map(|l| Ok(l.to_string())).collect();
        let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).expect("parses");
        let count = |code: &str| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == "rpc_server_call_duration_seconds_count"
                        && s.labels.get("rpc_response_status_code") == Some(code)
                })
                .map(|s| match s.value {
                    prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
                    ref other => panic!("unexpected {other:?}"),
                })
        };
        assert_eq!(count("OK"), Some(1.0));
        assert_eq!(count("INVALID_ARGUMENT"), Some(1.0));
        let info = scrape
            .samples
            .iter()
            .find(|s| s.metric == "kosmos_build_info")
            .expect("build info");
        assert_eq!(info.labels.get("model"), Some("demo"));
        assert_eq!(info.labels.get("model_fingerprint"), Some("abc123"));
        assert_eq!(info.labels.get("service"), Some("encoder"));
        assert!(text.contains("# HELP rpc_server_call_duration_seconds Duration of gRPC calls"));
    }
}
