//! The one upstream call policy, used by encode, generate and score: pick a replica, apply the deadline, send,
//! classify the answer's status from one table ([`classify`]), retry on another replica or give up, and keep the
//! pool's accounting ([`CallGuard`]) right throughout.
//!
//! When every attempt found its replica saturated (RESOURCE_EXHAUSTED), the pool is overloaded and the caller
//! gets RESOURCE_EXHAUSTED too (with a retry-later meaning), not UNAVAILABLE.
//!
//! Retries are spaced by exponential backoff with full jitter (the n-th retry waits a uniform time up to
//! `retry_backoff · 2ⁿ⁻¹`, at most 32 × `retry_backoff`, never past the deadline) and rationed by the pool's retry
//! budget (`retry_budget_percent` of the calls, over 10 s, plus 10 a second), so that callers of a sick pool do
//! not multiply its load. A call that finds no replica at all waits for one ([`Pool::wait_for_replica`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tonic::Code;

use crate::error::RequestError;
use crate::pool::{CallGuard, Pool, UpstreamChannel};

/// What an upstream status means for the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The request itself is refused: no replica would take it; the caller sees INVALID_ARGUMENT.
    Final,
    /// The replica is full: try another; the replica stays in rotation.
    Overloaded,
    /// The replica failed or cannot serve this request (down, timed out, another model): try another; the
    /// replica is marked unhealthy until a probe or a call succeeds.
    Retry,
}

/// The one status table of every upstream call.
pub fn classify(code: Code) -> Verdict {
    match code {
        Code::InvalidArgument | Code::OutOfRange => Verdict::Final,
        Code::ResourceExhausted => Verdict::Overloaded,
        // FAILED_PRECONDITION: a replica of another model build (fingerprint mismatch); another may match.
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::Unimplemented
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss
        | Code::Unauthenticated => Verdict::Retry,
    }
}

/// What a call is, for its errors: the stage a passed deadline names and the field a refusal names.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// `encoding the images`, `waiting for the decoder`, `scoring`: named by DEADLINE_EXCEEDED.
    pub stage: &'static str,
    /// What the caller sent that a refusal is about, e.g. "`prompt[2].image.data`" or "refused by the decoder".
    pub subject: String,
    /// Images the call carries (the encoder pool's pending-images gauge).
    pub images: u64,
    /// The model build the request is pinned to: only replicas serving it are called (`None`: any replica).
    pub model: Option<Arc<str>>,
}

/// The time a downstream call may take: what is left of the caller's deadline, bounded by the pool's call
/// timeout. `None` when the deadline has passed.
pub fn call_timeout(deadline: Option<Instant>, pool_timeout: Option<Duration>) -> Option<Duration> {
    // With neither bound, a day stands for "unbounded" (tonic needs a finite grpc-timeout to send one).
    let unbounded = Duration::from_secs(24 * 3600);
    let left = match deadline {
        Some(deadline) => {
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            left
        }
        None => unbounded,
    };
    Some(pool_timeout.map_or(left, |bound| bound.min(left)))
}

impl Pool {
    /// Calls the pool: `send` gets a channel to the chosen replica and the time the attempt may take, and
    /// answers the replica's response or its status (a response `send` finds unusable is a status too,
    /// e.g. INTERNAL, and is retried). Returns the response and the call's guard (the call is pending until the
    /// caller says [`CallGuard::responded`], in flight until the guard drops).
    pub async fn call<T, F, Fut>(
        &self,
        context: &CallContext,
        deadline: Option<Instant>,
        mut send: F,
    ) -> Result<(T, CallGuard), RequestError>
    where
        F: FnMut(UpstreamChannel, Duration) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let max_attempts = self.config().max_attempts.get();
        let mut tried = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        let mut all_overloaded = true;
        let mut budget_spent = false;
        let mut waited = None;
        self.deposit_call();
        for attempt in 0..max_attempts {
            if attempt > 0 {
                if !self.may_retry() {
                    budget_spent = true;
                    tracing::warn!(
                        pool = self.name(),
                        "retry budget spent: not retrying (the pool fails too many calls)"
                    );
                    break;
                }
                let wait = backoff(self.config().retry_backoff, attempt);
                let wait = match deadline {
                    Some(at) => wait.min(at.saturating_duration_since(Instant::now())),
                    None => wait,
                };
                tokio::time::sleep(wait).await;
            }
            let model = context.model.as_deref();
            let picked = match self.pick_serving(model, &tried) {
                Some(replica) => Some(replica),
                // No replica serves the request at all (none tried yet): wait for one to come.
                None if tried.is_empty() => {
                    let started = Instant::now();
                    let found = self.wait_for_replica(model, context.images, deadline).await;
                    waited = Some(started.elapsed());
                    found
                }
                None => None,
            };
            let Some(replica) = picked else {
                if deadline.is_some_and(|at| Instant::now() >= at) {
                    return Err(RequestError::DeadlineExceeded(context.stage));
                }
                break;
            };
            tried.push(replica.clone());
            let timeout = call_timeout(deadline, self.config().call_timeout)
                .ok_or(RequestError::DeadlineExceeded(context.stage))?;
            let guard = self.begin_with_images(replica.clone(), attempt, context.images);
            let status = match tokio::time::timeout(timeout, send(replica.channel(), timeout)).await
            {
                Ok(Ok(response)) => return Ok((response, guard)),
                Ok(Err(status)) => status,
                Err(_) => {
                    tonic::Status::deadline_exceeded(format!("{} call timed out", self.name()))
                }
            };
            if status.code() == Code::DeadlineExceeded
                && deadline.is_some_and(|at| Instant::now() >= at)
            {
                guard.failed(false);
                return Err(RequestError::DeadlineExceeded(context.stage));
            }
            let verdict = classify(status.code());
            guard.failed(verdict == Verdict::Retry);
            if verdict == Verdict::Final {
                return Err(RequestError::invalid(format!(
                    "{}: {}",
                    context.subject,
                    status.message()
                )));
            }
            all_overloaded &= verdict == Verdict::Overloaded;
            tracing::warn!(
                pool = self.name(),
                replica = replica.address(),
                attempt,
                code = ?status.code(),
                message = status.message(),
                "upstream call failed, trying another replica"
            );
            // The caller sees the code and the replica's message, never the replica's address (logged above).
            failures.push(format!("{:?}: {}", status.code(), status.message()));
        }
        let message = match (failures.last(), waited) {
            (Some(last), _) if budget_spent => format!(
                "{} ({last}; not retried: the pool's retry budget is spent)",
                context.subject
            ),
            (Some(last), _) => format!("{} ({last})", context.subject),
            (None, Some(waited)) => format!(
                "{} (no replica; waited {:.1} s for one)",
                context.subject,
                waited.as_secs_f64()
            ),
            (None, None) => format!("{} (no replica)", context.subject),
        };
        if all_overloaded && !failures.is_empty() {
            return Err(RequestError::PoolOverloaded {
                pool: self.name(),
                message,
            });
        }
        Err(RequestError::Unavailable {
            pool: self.name(),
            message,
        })
    }
}

/// The wait before retry `attempt` (1, 2, …): uniform in [0, `base` · 2^(attempt-1)], capped at 32 × `base`.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1 << attempt.saturating_sub(1).min(5));
    if ceiling.is_zero() {
        return Duration::ZERO;
    }
    ceiling.mul_f64(rand::rng().random_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_its_ceiling_up_to_32_times_the_base() {
        let base = Duration::from_millis(10);
        for attempt in 1..12 {
            let ceiling = Duration::from_millis(10 << (attempt - 1).min(5));
            let waits: Vec<Duration> = (0..200).map(|_| backoff(base, attempt)).collect();
            assert!(
                waits.iter().all(|wait| *wait <= ceiling),
                "attempt {attempt}"
            );
            // Full jitter: the waits spread over the range rather than sitting at its top.
            assert!(
                waits.iter().any(|wait| *wait < ceiling / 2),
                "attempt {attempt}"
            );
        }
        assert_eq!(backoff(Duration::ZERO, 3), Duration::ZERO);
    }

    #[test]
    fn call_timeouts_take_the_tighter_bound_and_refuse_a_passed_deadline() {
        let soon = Instant::now() + Duration::from_secs(1);
        let bounded = call_timeout(Some(soon), Some(Duration::from_secs(10))).expect("time left");
        assert!(bounded <= Duration::from_secs(1));
        let pool_bound = call_timeout(None, Some(Duration::from_secs(3))).expect("no deadline");
        assert_eq!(pool_bound, Duration::from_secs(3));
        let past = Instant::now() - Duration::from_millis(1);
        assert_eq!(call_timeout(Some(past), None), None);
    }

    #[test]
    fn one_table_says_what_each_status_means() {
        assert_eq!(classify(Code::InvalidArgument), Verdict::Final);
        assert_eq!(classify(Code::ResourceExhausted), Verdict::Overloaded);
        assert_eq!(classify(Code::FailedPrecondition), Verdict::Retry);
        assert_eq!(classify(Code::Unavailable), Verdict::Retry);
    }
}
