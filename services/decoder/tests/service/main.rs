//! Service tests: the decoder on 127.0.0.1:0 with the tiny fixture model, called through the generated client.
//! One test binary (modules per behaviour) keeps link time down.

mod batching;
mod common;
mod kosmos25;
mod lifecycle;
mod metrics;
mod paged;
mod resume;
use kosmos_testkit::metrics as metrics_catalogue;
mod parity;
mod validation;
