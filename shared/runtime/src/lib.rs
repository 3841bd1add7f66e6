//! Service plumbing shared by the gateway, the encoder and the decoder: one copy of each piece.
//!
//! * [`config`]: layered configuration (defaults < TOML file < environment < flags) with key-naming errors;
//! * [`shutdown`]: a cancellation token tripped by SIGINT/SIGTERM or by a test;
//! * [`grpc`]: health (overall + `readiness`), reflection v1 and v1alpha, message limits, deadlines;
//! * [`tensor`]: the wire tensor (`kosmos.tensor.v1.Tensor`) checked and converted to and from f32;
//! * [`telemetry`]: logs (text or JSON, with trace ids), OpenTelemetry traces exported over OTLP, W3C propagation;
//! * [`rpc`]: the server layer that continues the caller's trace and meters every call;
//! * [`metrics`]: a per-service metrics registry served as Prometheus text on `/metrics`;
//! * [`service`]: the one lifecycle of every service: describe, bind, serve until shutdown, drain;
//! * [`tls`], [`reload`]: TLS and mTLS with rustls, certificates (and other files) re-read when they change;
//! * [`budget`]: admission weighted by request bytes (a server layer);
//! * [`cli`]: the one `main` of every service binary and `kosmos` subcommand: flags, config layers, telemetry.

pub mod budget;
pub mod cli;
pub mod config;
pub mod grpc;
pub mod metrics;
pub mod reload;
pub mod rpc;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tensor;
pub mod tls;

pub use service::{Bound, ServeError, Service};
pub use shutdown::Shutdown;
