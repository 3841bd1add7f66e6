//! Helpers for the services' tests (feature `testing`): scraping and checking `/metrics` against the catalogue,
//! and collecting spans in memory.

pub mod metrics;
pub mod traces;
