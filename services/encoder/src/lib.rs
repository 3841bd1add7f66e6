//! The vision-encoder service: encoded images in, image embeddings out, dynamically batched across requests.
//!
//! * [`config`]: the configuration (file < environment < flags) and its validation;
//! * [`images`]: the cheap checks on untrusted bytes, then header limits, one decode and the CLIP preprocessing
//!   on the blocking pool;
//! * [`engine`]: the engine thread that owns the model, its bounded queue and the dynamic batching;
//! * [`grpc`]: `kosmos.encoder.v1.VisionEncoder` and the proto conversions;
//! * [`metrics`]: every instrument of the encoder (Prometheus text on `metrics.listen`, see `docs/metrics.md`);
//! * [`bind`] / [`run`] / [`Encoder`]: the service through the runtime's one lifecycle (health with `readiness`,
//!   reflection, `/metrics`, drain on shutdown).
//!
//! A call's path: `grpc` parses the request (count, dtype, each image's size, format and MIME type), `images`
//! decodes and preprocesses the images in parallel, `engine` admits them whole or answers RESOURCE_EXHAUSTED,
//! batches them with other callers' images, and `grpc` turns the embeddings into wire tensors.

pub mod config;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod images;
pub mod metrics;
mod server;

pub use config::{ENV_PREFIX, EncoderConfig};
pub use error::{ConfigError, ImageRejection, RequestError, StartError};
pub use server::{Encoder, bind, run};
