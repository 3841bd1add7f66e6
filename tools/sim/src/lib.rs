//! `kosmos-sim`: a discrete-event simulator of kosmos-serve's autoscaling, to say with numbers when splitting the
//! vision encoder and the decoder into independently scaled pools saves GPUs at the same latency, and when not.
//!
//! One run replays a traffic trace ([`trace`]: generated with a diurnal cycle, bursts and a drifting image-heavy
//! share, or read from a file) through a simulated cluster ([`cluster`]): the gateway's routing and per-pool
//! gauges, each pool's batching ([`replica`]: the encoder's dynamic batching, the decoder's continuous batching),
//! service times from a [`calibration`] file (measured numbers for some hardware), pod start-up time, and KEDA
//! exactly as `k8s/components/keda` configures it ([`keda`] reads the YAML, [`autoscaler`] runs the HPA algorithm).
//! [`compare`] runs the split deployment, a monolithic one and fixed sizing over the same trace and reports
//! GPU-hours, SLO attainment and p99 TTFT; [`chart`] draws replicas over time.
//!
//! Determinism: a seed fixes the trace and every run's random stream; the event order breaks time ties by
//! scheduling order, so the same inputs give byte-identical JSON.

pub mod autoscaler;
pub mod calibration;
pub mod chart;
pub mod cluster;
pub mod compare;
pub mod error;
pub mod keda;
pub mod outcome;
pub mod replica;
pub mod trace;

pub use calibration::Calibration;
pub use cluster::{Deployment, Outcome, Routing, Scaling, SimParams, simulate};
pub use compare::{CompareParams, Comparison, Slo, compare};
pub use error::{Result, SimError};
pub use keda::KedaConfig;
pub use trace::{Request, TraceSpec};
