//! What a run produces: one record per request, and per pool its replica-seconds and replicas over time.

use serde::{Deserialize, Serialize};

use crate::keda::PoolKind;

/// Why a request did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// A call found no ready replica in its pool and none became ready within the gateway's wait for one
    /// (`SimParams::max_wait_for_replica_seconds`, `limits.max_waiting_for_replica_seconds`): the gateway answers
    /// UNAVAILABLE.
    Unavailable,
    /// Every replica tried refused the call, its queue full (RESOURCE_EXHAUSTED).
    ResourceExhausted,
    /// Still unfinished a day after the horizon.
    Unfinished,
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Arrival time.
    pub arrival: f64,
    /// Tokens it asked for.
    pub output_tokens: u32,
    /// Whether it was image-heavy.
    pub image_heavy: bool,
    /// First token time minus arrival.
    pub ttft: Option<f64>,
    /// Completion time minus arrival.
    pub latency: Option<f64>,
    /// Why it was dropped.
    pub dropped: Option<DropReason>,
}

impl RequestRecord {
    /// Mean time per output token after the first; `None` for one-token outputs or unfinished requests.
    pub fn tpot(&self) -> Option<f64> {
        match (self.ttft, self.latency) {
            (Some(ttft), Some(latency)) if self.output_tokens > 1 => {
                Some((latency - ttft) / f64::from(self.output_tokens - 1))
            }
            _ => None,
        }
    }
}

/// One timeline point of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PoolSample {
    /// Time.
    pub time: f64,
    /// Replicas the Deployment asks for (starting + ready).
    pub desired: u32,
    /// Replicas serving.
    pub ready: u32,
}

/// What one pool did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolOutcome {
    /// Which pool.
    pub kind: PoolKind,
    /// Replica-seconds within the horizon.
    pub replica_seconds: f64,
    /// The most replicas asked for at once.
    pub peak_replicas: u32,
    /// The timeline.
    pub timeline: Vec<PoolSample>,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// One record per request of the trace, in order.
    pub records: Vec<RequestRecord>,
    /// One per pool.
    pub pools: Vec<PoolOutcome>,
    /// Encode calls and their summed wait (gateway send to batch start), for queueing checks.
    pub encode_calls: u64,
    /// Sum of encode waits in seconds.
    pub encode_wait_seconds: f64,
    /// When the last event ran.
    pub end_time: f64,
}

/// The `quantile` of `values` (nearest rank); `None` when empty.
pub fn quantile_of(values: &mut [f64], quantile: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = (quantile * values.len() as f64).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1])
}
