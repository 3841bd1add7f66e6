//! Service plumbing shared by the gateway, the encoder and the decoder: one copy of each piece.
//!
//! * [`config`]: layered configuration (defaults < TOML file < environment < flags) with key-naming errors;
//! * [`shutdown`]: a cancellation token tripped by SIGINT/SIGTERM or by a test;
//! * [`grpc`]: health (overall + `readiness`), reflection v1 and v1alpha, message limits, deadlines;
//! * [`tensor`]: the wire tensor (`kosmos.tensor.v1.Tensor`) checked and converted to and from f32;
//! * [`logging`]: the tracing subscriber.

pub mod config;
pub mod grpc;
pub mod logging;
pub mod shutdown;
pub mod tensor;

pub use shutdown::Shutdown;
