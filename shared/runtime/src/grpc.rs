//! gRPC server basics every service shares: health with a `readiness` service name, reflection v1 and v1alpha
//! over every kosmos proto, serving on a bound listener until shutdown, and the caller's deadline.

use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::shutdown::Shutdown;

/// The health service name Kubernetes probes for readiness (`grpc: {service: readiness}`).
pub const READINESS: &str = "readiness";

/// Health of one server: the overall status (`""`, liveness) and `readiness`.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").finish_non_exhaustive()
    }
}

/// The grpc.health.v1 service to add to a router.
pub type HealthService =
    tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>;

impl Health {
    /// A reporter whose overall status is SERVING (the process answers) and whose readiness is NOT_SERVING until
    /// [`Health::set_ready`].
    pub async fn new() -> (Self, HealthService) {
        let (health, service) = Self::detached();
        health
            .reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        health
            .reporter
            .set_service_status(READINESS, ServingStatus::NotServing)
            .await;
        (health, service)
    }

    /// A reporter with no status set yet (every name answers NOT_FOUND until set); [`crate::service`] sets them
    /// before it serves.
    pub fn detached() -> (Self, HealthService) {
        let reporter = HealthReporter::new();
        let service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        (Self { reporter }, service)
    }

    /// Readiness SERVING: the service can take traffic.
    pub async fn set_ready(&self) {
        self.reporter
            .set_service_status(READINESS, ServingStatus::Serving)
            .await;
    }

    /// Readiness NOT_SERVING: shutting down or lost a dependency.
    pub async fn set_not_ready(&self) {
        self.reporter
            .set_service_status(READINESS, ServingStatus::NotServing)
            .await;
    }

    /// Sets the status of any other service name.
    pub async fn set_status(&self, service: &str, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(service, status).await;
    }
}

/// The reflection services (v1 and v1alpha: grpcurl 1.8 speaks only v1alpha) over grpc.health.v1 and the kosmos
/// protos of `packages` (with the files they import): a server describes what it serves and nothing else, so the
/// public port never lists the internal encoder and decoder APIs.
pub fn reflection(
    packages: &[String],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let files = descriptors_of(packages)?;
    let v1 = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(files.clone())
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(files)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// The files of the kosmos descriptor set whose package is one of `packages`, with everything they import.
fn descriptors_of(
    packages: &[String],
) -> Result<prost_types::FileDescriptorSet, tonic_reflection::server::Error> {
    use prost::Message as _;
    let all = prost_types::FileDescriptorSet::decode(kosmos_proto::FILE_DESCRIPTOR_SET)?;
    let mut wanted: std::collections::BTreeSet<String> = all
        .file
        .iter()
        .filter(|file| packages.iter().any(|package| file.package() == package))
        .map(|file| file.name().to_string())
        .collect();
    loop {
        let imports: Vec<String> = all
            .file
            .iter()
            .filter(|file| wanted.contains(file.name()))
            .flat_map(|file| file.dependency.iter().cloned())
            .filter(|name| !wanted.contains(name))
            .collect();
        if imports.is_empty() {
            break;
        }
        wanted.extend(imports);
    }
    Ok(prost_types::FileDescriptorSet {
        file: all
            .file
            .into_iter()
            .filter(|file| wanted.contains(file.name()))
            .collect(),
    })
}

/// Serves `router` (with any layers, e.g. [`crate::rpc::RpcLayer`]) on `listener` (over TLS when `tls` is set)
/// until `shutdown` trips, then stops accepting and lets in-flight calls finish.
pub async fn serve<L, ResBody>(
    router: tonic::transport::server::Router<L>,
    listener: TcpListener,
    tls: Option<&crate::tls::TlsAcceptor>,
    shutdown: Shutdown,
) -> Result<(), tonic::transport::Error>
where
    L: tower::Layer<tonic::service::Routes>,
    L::Service: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Future: Send,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    ResBody: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use tokio_stream::StreamExt as _;
    let stopped = async move { shutdown.wait().await };
    if let Some(tls) = tls {
        let incoming = tokio_stream::wrappers::ReceiverStream::new(tls.incoming(listener));
        return router.serve_with_incoming_shutdown(incoming, stopped).await;
    }
    // tonic does not set TCP_NODELAY on connections from a listener it did not bind; without it a streamed
    // response's first message waits for the peer's delayed ACK (~40 ms on Linux).
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(%err, "cannot set TCP_NODELAY");
            }
        })
    });
    router.serve_with_incoming_shutdown(incoming, stopped).await
}

/// `impl From<$error> for tonic::Status` through the error's own `code()` (an exhaustive match in the service's
/// `error.rs`) and its message: the one way a service's request errors become statuses.
#[macro_export]
macro_rules! status_from {
    ($error:ty) => {
        impl From<$error> for ::tonic::Status {
            fn from(error: $error) -> Self {
                ::tonic::Status::new(error.code(), error.to_string())
            }
        }
    };
}

/// The server side of the caller's deadline: the `grpc-timeout` header, if any.
pub fn request_timeout<T>(request: &tonic::Request<T>) -> Option<Duration> {
    let header = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(header)
}

/// The instant by which a call whose `grpc-timeout` is `timeout`, arrived at `arrived`, must be answered: a little
/// before the caller's deadline (5% of the timeout, at most 20 ms). tonic's own timers fire exactly at the deadline
/// and answer CANCELLED ("Timeout expired"); giving up first lets the caller see DEADLINE_EXCEEDED, the code the
/// gRPC spec asks for, and frees the work's resources a moment earlier.
pub fn answer_by(arrived: Instant, timeout: Duration) -> Instant {
    let margin = (timeout / 20).min(Duration::from_millis(20));
    arrived + timeout.saturating_sub(margin)
}

/// [`answer_by`] for `request`'s own timeout, if it has one.
pub fn request_deadline<T>(request: &tonic::Request<T>, arrived: Instant) -> Option<Instant> {
    request_timeout(request).map(|timeout| answer_by(arrived, timeout))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_describes_only_the_packages_served_and_their_imports() {
        let public = descriptors_of(&["kosmos.v1".to_string()]).expect("descriptors");
        let packages: Vec<&str> = public.file.iter().map(|file| file.package()).collect();
        assert!(packages.contains(&"kosmos.v1"), "{packages:?}");
        assert!(
            !packages
                .iter()
                .any(|p| p.contains("decoder") || p.contains("encoder")),
            "{packages:?}"
        );
        let decoder = descriptors_of(&["kosmos.decoder.v1".to_string()]).expect("descriptors");
        let packages: Vec<&str> = decoder.file.iter().map(|file| file.package()).collect();
        assert!(packages.contains(&"kosmos.decoder.v1"), "{packages:?}");
        assert!(
            packages.contains(&"kosmos.tensor.v1"),
            "imports follow: {packages:?}"
        );
        assert!(!packages.contains(&"kosmos.v1"), "{packages:?}");
    }

    #[test]
    fn answers_are_due_a_little_before_the_deadline() {
        let now = Instant::now();
        assert_eq!(
            answer_by(now, Duration::from_millis(100)),
            now + Duration::from_millis(95)
        );
        assert_eq!(
            answer_by(now, Duration::from_secs(10)),
            now + Duration::from_millis(9980)
        );
    }

    #[test]
    fn grpc_timeouts_parse_every_unit_and_reject_garbage() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
