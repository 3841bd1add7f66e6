//! The decoder service (`kosmos.decoder.v1.Decoder`): the text half of a KOSMOS model behind continuous batching.
//!
//! * [`engine`]: one OS thread owns the model and every KV cache, admits requests between steps under a KV
//!   token budget and packs prefills and decodes into one forward per step (the policy is documented there);
//! * [`sampling`]: greedy, temperature, top-k, top-p, repetition penalty, no-repeat-n-gram, seeded per request;
//! * [`grpc`]: the service, validation at the edge (`grpc/convert.rs`), deadlines;
//! * [`server`]: model loading, health (`readiness`), reflection, message limits, `/metrics`, graceful drain;
//! * [`metrics`]: every instrument of the decoder (Prometheus text on `metrics.listen`, see `docs/metrics.md`);
//! * [`config`]: file < environment < flags, validated;
//! * [`error`]: request errors (one gRPC code each) and startup errors.

pub mod config;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod sampling;
pub mod server;

pub use config::DecoderConfig;
pub use engine::EngineHandle;
pub use error::{RequestError, StartError};
pub use kosmos_runtime::Shutdown;
pub use server::{Decoder, bind, run};
