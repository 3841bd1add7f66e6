//! The gateway (`kosmos.v1.Kosmos`): the one public API in front of the encoder and decoder pools. CPU only: it
//! never links candle.
//!
//! A request flows through these modules in order:
//! * [`grpc`]: the service; reads the caller's API key ([`auth`]: keys, quotas) and deadline;
//! * [`state`]: the concurrency limit (RESOURCE_EXHAUSTED beyond it) and the shared state;
//! * [`domain`]: wire request → validated domain types, image bytes checked from their headers;
//! * [`prompt`]: tokenization with `kosmos-processor` on the blocking pool, then the decoder's segments;
//! * [`encode`]: the images of a request through the [`cache`], misses encoded concurrently, retried on another
//!   replica on failure;
//! * [`generate`] / [`score`]: the decoder call, incremental detokenization and stop strings ([`text`]), finish
//!   reasons, usage, timings, grounding;
//! * [`call`]: the one upstream call policy (replica, deadline, status table, retries, overload) of every call;
//! * [`pool`]: replicas per pool, power-of-two-choices balancing, per-pool pending/in-flight gauges;
//! * [`upstream`]: probes, the model learned from the decoders, grpc.health.v1;
//! * [`metrics`]: everything `/metrics` exports (GenAI request metrics, per-pool queue signals, the cache);
//! * [`http`]: the OpenAI-compatible HTTP API, a second front door onto the same pipeline;
//! * [`server`]: start, serve with health and reflection, drain; [`config`]: file < environment < flags.

pub mod auth;
pub mod cache;
pub mod call;
pub mod config;
pub mod domain;
pub mod encode;
pub mod error;
pub mod generate;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod pool;
pub mod prompt;
pub mod score;
pub mod server;
pub mod state;
pub mod text;
pub mod upstream;

pub use config::GatewayConfig;
pub use error::{RequestError, StartError};
pub use kosmos_runtime::Shutdown;
pub use metrics::GatewayStats;
pub use server::{Gateway, GatewayHandle, bind, run};
