//! Logs and traces of every binary: one `tracing` subscriber that writes human-readable or JSON lines (each with
//! the trace id of the request it belongs to) and turns spans into OpenTelemetry spans, exported over OTLP/gRPC
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; W3C trace context in and out of every gRPC call.
//!
//! Spans always get OpenTelemetry ids, exported or not, so that the trace id a caller sent (`traceparent`) is
//! continued, logged and forwarded to the next service even where nothing is collected.
//!
//! The resource names the service (`OTEL_SERVICE_NAME`, else the binary's service name), its version, and the
//! pod (`k8s.pod.name` from `POD_NAME`, the downward API's usual variable, else the host name); any other
//! attribute comes from `OTEL_RESOURCE_ATTRIBUTES`. The other `OTEL_*` variables of the OTLP exporter and the batch
//! processor (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_SCHEDULE_DELAY`, …) apply as the SDK documents them.

use std::fmt;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The environment variable that turns OTLP export on.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The span field that carries the trace id into log lines; [`crate::rpc`] records it on every server span.
pub const TRACE_ID_FIELD: &str = "trace_id";

/// Keeps the tracer provider alive; dropping it flushes the spans not exported yet.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("flushing traces at exit failed: {err}");
        }
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00Z  INFO target: message key=value trace_id=…`
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`, the event's fields, `span`,
    /// `trace_id` and `span_id`.
    Json,
}

impl LogFormat {
    /// `Json` when `json`, else `Text` (the services' `log_json` settings).
    pub fn from_json_flag(json: bool) -> Self {
        if json { Self::Json } else { Self::Text }
    }
}

/// Installs the global subscriber (filtered by `RUST_LOG`, else `default_filter`) and the W3C propagator, and
/// starts the OTLP exporter when [`OTLP_ENDPOINT_ENV`] is set. Must run inside a Tokio runtime (the exporter's
/// gRPC client needs one). A second call in the same process (tests) installs nothing and exports nothing.
pub fn init(service: &'static str, format: LogFormat, default_filter: &str) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporting = std::env::var_os(OTLP_ENDPOINT_ENV).is_some_and(|value| !value.is_empty());
    let mut exporter_error = None;
    let provider = {
        let builder = SdkTracerProvider::builder().with_resource(resource(service));
        let builder = if exporting {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
            {
                Ok(exporter) => builder.with_batch_exporter(exporter),
                Err(err) => {
                    exporter_error = Some(err.to_string());
                    builder
                }
            }
        } else {
            builder
        };
        builder.build()
    };
    let tracer = provider.tracer(service);
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // The log filter applies to the log lines only: spans are exported (and carry their trace ids) at INFO and
    // above whatever the logs show, so a quiet `kosmos serve` (logs at `warn`) still exports every request.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_location(false)
        .with_filter(LevelFilter::INFO);
    let fmt_layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry()
        .with(otel)
        .with(TraceIdLayer.with_filter(LevelFilter::INFO));
    let installed = registry
        .with(
            fmt_layer
                .event_format(LineFormat::from(format))
                .with_filter(filter),
        )
        .try_init();
    if installed.is_err() {
        // Another subscriber (an earlier init in this process) owns the spans; this provider would get none.
        let _ = provider.shutdown();
        return TelemetryGuard { provider: None };
    }
    if let Some(err) = &exporter_error {
        tracing::error!(%err, "cannot create the OTLP span exporter; traces are not exported");
    } else if exporting {
        tracing::info!(
            endpoint = %std::env::var(OTLP_ENDPOINT_ENV).unwrap_or_default(),
            "exporting traces over OTLP/gRPC"
        );
    }
    TelemetryGuard {
        provider: Some(provider),
    }
}

fn resource(service: &'static str) -> opentelemetry_sdk::Resource {
    let mut builder = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name(service);
    }
    let pod = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let mut attributes = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    if !pod.is_empty() {
        attributes.push(KeyValue::new("k8s.pod.name", pod));
    }
    builder.with_attributes(attributes).build()
}

// ------------------------------------------------------------------------------------------------ propagation

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Reads W3C headers from an HTTP request's headers.
pub(crate) struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The OpenTelemetry context a request's headers carry (empty without `traceparent`).
pub(crate) fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Makes `span` continue the trace a request's headers carry (W3C `traceparent`), and records its trace id in
/// the span's `trace_id` field when it has one: what the RPC layer does for gRPC, for the HTTP API.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    let _ = span.set_parent(extract(headers));
    if let Some(id) = trace_id(span) {
        span.record(TRACE_ID_FIELD, id.as_str());
    }
}

/// Writes the current span's context (`traceparent`, `tracestate`) into an outgoing call's metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
    }
}

/// A client interceptor that propagates the caller's trace to the callee: `Client::with_interceptor(channel,
/// TracePropagation)`. It runs when the call starts, in the span the calling future runs in.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracePropagation;

impl tonic::service::Interceptor for TracePropagation {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject(request.metadata_mut());
        Ok(request)
    }
}

/// The OpenTelemetry span context of `span`, to link a batch span to the requests that rode in it.
pub fn span_context(span: &tracing::Span) -> opentelemetry::trace::SpanContext {
    span.context().span().span_context().clone()
}

/// The trace id of `span` as 32 hex digits, if it has one.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span_context(span);
    context.is_valid().then(|| context.trace_id().to_string())
}

// ------------------------------------------------------------------------------------------------ log lines

/// A span's trace id, kept in its extensions for the log formatters: recorded on a server span
/// ([`TRACE_ID_FIELD`]) and inherited by every span below it, on any thread.
#[derive(Debug, Clone)]
struct TraceId(String);

struct TraceIdLayer;

struct TraceIdVisitor(Option<String>);

impl Visit for TraceIdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == TRACE_ID_FIELD && !value.is_empty() {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == TRACE_ID_FIELD {
            let value = format!("{value:?}");
            if !value.is_empty() {
                self.0 = Some(value.trim_matches('"').to_string());
            }
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for TraceIdLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: LayerContext<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let mut visitor = TraceIdVisitor(None);
        attrs.record(&mut visitor);
        let inherited = || {
            span.parent()
                .and_then(|parent| parent.extensions().get::<TraceId>().cloned())
        };
        if let Some(trace_id) = visitor.0.map(TraceId).or_else(inherited) {
            span.extensions_mut().insert(trace_id);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: LayerContext<'_, S>,
    ) {
        let mut visitor = TraceIdVisitor(None);
        values.record(&mut visitor);
        if let (Some(trace_id), Some(span)) = (visitor.0, ctx.span(id)) {
            span.extensions_mut().replace(TraceId(trace_id));
        }
    }
}

fn current_trace_id<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<String>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let span = ctx.lookup_current()?;
    let extensions = span.extensions();
    extensions.get::<TraceId>().map(|id| id.0.clone())
}

/// How one log line is written: the standard text format with ` trace_id=…` appended inside a traced request, or
/// one JSON object per line.
enum LineFormat {
    Text(tracing_subscriber::fmt::format::Format),
    Json,
}

impl From<LogFormat> for LineFormat {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => Self::Text(tracing_subscriber::fmt::format::Format::default()),
            LogFormat::Json => Self::Json,
        }
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        match self {
            Self::Text(inner) => {
                let mut line = String::new();
                inner.format_event(ctx, Writer::new(&mut line), event)?;
                let line = line.trim_end_matches('\n');
                match current_trace_id(ctx) {
                    Some(trace_id) => writeln!(writer, "{line} trace_id={trace_id}"),
                    None => writeln!(writer, "{line}"),
                }
            }
            Self::Json => writeln!(writer, "{}", json_line(ctx, event)?),
        }
    }
}

struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

/// `event` as one JSON object: `timestamp`, `level`, `target`, `message`, its fields, `span` and `trace_id`.
fn json_line<S, N>(
    ctx: &FmtContext<'_, S, N>,
    event: &tracing::Event<'_>,
) -> Result<String, fmt::Error>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    {
        let metadata = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert("timestamp".into(), rfc3339_now().into());
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        if let Some(message) = fields.0.remove("message") {
            line.insert("message".into(), message);
        }
        for (key, value) in fields.0 {
            line.entry(key).or_insert(value);
        }
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
        }
        if let Some(trace_id) = current_trace_id(ctx) {
            line.insert(TRACE_ID_FIELD.into(), trace_id.into());
        }
        serde_json::to_string(&line).map_err(|_| fmt::Error)
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), without a date crate.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        now.subsec_millis()
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar, days since 1970-01-01).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn trace_context_round_trips_through_metadata() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let remote = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(remote);
        let mut metadata = tonic::metadata::MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(&mut metadata));
        assert_eq!(
            metadata.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let headers = metadata.into_headers();
        let back = extract(&headers);
        assert_eq!(
            back.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
}
