//! Service tests: the encoder served on `127.0.0.1:0` with the tiny fixture model, called with the generated
//! client. One module per behaviour; one test binary keeps link time down.

mod common;
use kosmos_testkit::metrics as metrics_catalogue;

mod concurrent_calls;
mod deadlines;
mod embeddings;
mod health_and_shutdown;
mod info;
mod limits;
mod metrics;
mod pages;
mod queue_full;
