//! The replicas of one pool (encoder or decoder): discovery from a static list or a DNS name re-resolved
//! periodically, client-side balancing by power of two choices on in-flight calls, and the pool's gauges.
//!
//! Every replica holds one lazily connected HTTP/2 channel; calls multiplex over it. A call holds a
//! [`CallGuard`] from the moment a replica is picked until the call (or the stream) ends, so the in-flight and
//! pending gauges are right even when a caller goes away mid-stream: dropping the guard is the accounting.
//!
//! **Outlier ejection.** A replica whose calls fail `eject_after_failures` times in a row (its `Info` may still
//! answer: a GPU that throws errors, a process that is half up) is taken out of rotation for `ejection_seconds`,
//! twice as long at each ejection after the first (at most ten times as long) until a call on it succeeds again.
//! Probes do not bring it back early. When every replica a call may use is ejected, they are all used anyway:
//! ejection steers traffic away from the worst replicas, it never turns a degraded pool into an outage.
//!
//! **Waiting for a replica.** A call that finds no replica serving its model build (a pool scaled to zero, every
//! replica gone) waits for one, as a pending call — the signal an autoscaler wakes the pool by — for at most
//! `limits.max_waiting_for_replica_seconds` and the caller's deadline ([`Pool::wait_for_replica`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kosmos_runtime::telemetry::TracePropagation;
use rand::Rng;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tower::retry::budget::{Budget as _, TpsBudget};

/// A channel to a replica that propagates the caller's trace context (`traceparent`) on every call.
pub type UpstreamChannel = InterceptedService<Channel, TracePropagation>;

use kosmos_runtime::tls::TlsConnector;

use crate::config::{Discovery, PoolConfig, endpoint_uri};
use crate::error::StartError;

/// One replica of a pool.
#[derive(Debug)]
pub struct Replica {
    address: String,
    channel: Channel,
    in_flight: AtomicU64,
    calls_total: AtomicU64,
    healthy: AtomicBool,
    /// The model build the replica serves, as its last answered probe said (`None` until then).
    fingerprint: RwLock<Option<Arc<str>>>,
    /// Calls on it that failed in a row (its fault); a call it answers resets it.
    failures_in_a_row: AtomicU32,
    /// Ejections since a call on it last succeeded: each one lasts twice as long as the one before.
    ejections: AtomicU32,
    /// Out of rotation until then.
    ejected_until: Mutex<Option<Instant>>,
}

impl Replica {
    /// A replica at `address` (`http://host:port`), connected over TLS when `tls` is set (the TLS is made by
    /// the connector; the URI keeps its `http` scheme, which tonic requires of a custom connector).
    fn new(
        address: String,
        connect_timeout: Duration,
        tls: Option<&TlsConnector>,
    ) -> Result<Self, StartError> {
        let endpoint = Endpoint::from_shared(address.clone())
            .map_err(|err| StartError::Endpoint {
                endpoint: address.clone(),
                message: err.to_string(),
            })?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = match tls {
            Some(tls) => endpoint.connect_with_connector_lazy(tls.service()),
            None => endpoint.connect_lazy(),
        };
        Ok(Self {
            address,
            channel,
            // Optimistic until a probe or a call says otherwise: a new replica takes traffic at once.
            healthy: AtomicBool::new(true),
            fingerprint: RwLock::new(None),
            failures_in_a_row: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
            in_flight: AtomicU64::new(0),
            calls_total: AtomicU64::new(0),
        })
    }

    /// The replica's URI.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A channel to the replica (cheap to clone; calls multiplex over one connection) that carries the current
    /// span's trace context to the replica.
    pub fn channel(&self) -> UpstreamChannel {
        InterceptedService::new(self.channel.clone(), TracePropagation)
    }

    /// Calls open against this replica.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Calls started on this replica since the gateway started (retries included).
    pub fn calls_total(&self) -> u64 {
        self.calls_total.load(Ordering::Relaxed)
    }

    /// Whether its last probe or call succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The model build the replica serves, once a probe has answered.
    pub fn fingerprint(&self) -> Option<Arc<str>> {
        self.fingerprint
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records the model build a probe reported.
    pub fn set_fingerprint(&self, fingerprint: &str) {
        let mut known = self
            .fingerprint
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.as_deref() != Some(fingerprint) {
            tracing::info!(replica = %self.address, fingerprint, "replica serves model build");
            *known = Some(Arc::from(fingerprint));
        }
    }

    /// Whether the replica serves `model` (any replica when `None`; a replica not probed yet serves none).
    pub fn serves(&self, model: Option<&str>) -> bool {
        model.is_none_or(|model| self.fingerprint().as_deref() == Some(model))
    }

    /// Records the outcome of a probe or a call.
    pub fn set_healthy(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            tracing::info!(replica = %self.address, healthy, "replica health changed");
        }
    }

    /// Whether the replica is out of rotation for failing call after call (see the module doc).
    pub fn is_ejected(&self) -> bool {
        self.ejected_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    /// A call on the replica failed by its fault; ejects it after `eject_after` failures in a row, for `ejection`
    /// doubled by each earlier ejection (at most 10 × `ejection`). Returns whether this failure ejected it.
    fn call_failed(&self, eject_after: Option<std::num::NonZeroU32>, ejection: Duration) -> bool {
        let failures = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        let Some(eject_after) = eject_after else {
            return false;
        };
        if failures < eject_after.get() {
            return false;
        }
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        let earlier = self.ejections.fetch_add(1, Ordering::Relaxed);
        let length = ejection
            .saturating_mul(1 << earlier.min(4))
            .min(ejection.saturating_mul(10));
        *self
            .ejected_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now() + length);
        tracing::warn!(
            replica = %self.address,
            failures,
            ejection_seconds = length.as_secs_f64(),
            "replica ejected: its calls keep failing"
        );
        true
    }

    /// A call on the replica succeeded (it may have been called while ejected, when every replica was): its
    /// failure streak, ejection and ejection history are over.
    fn call_answered(&self) {
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        if self.ejections.swap(0, Ordering::Relaxed) > 0 {
            let mut until = self
                .ejected_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if until.take().is_some_and(|until| Instant::now() < until) {
                tracing::info!(replica = %self.address, "ejected replica answers again: back in rotation");
            }
        }
    }
}

/// The gauges and counters of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Replicas known.
    pub replicas: u32,
    /// Replicas whose last probe or call succeeded.
    pub healthy_replicas: u32,
    /// Calls open that have not received their first response yet.
    pub pending: u64,
    /// The most calls ever pending at once (high-water mark of `pending`).
    pub pending_peak: u64,
    /// Calls open.
    pub in_flight: u64,
    /// Images in calls that have not received their first response yet (encoder pool).
    pub pending_images: u64,
    /// The most images ever pending at once (high-water mark of `pending_images`).
    pub pending_images_peak: u64,
    /// Calls started (retries included).
    pub calls_total: u64,
    /// Calls that failed.
    pub failures_total: u64,
    /// Calls retried on another replica.
    pub retries_total: u64,
    /// Calls waiting for a replica (the pool has none serving their model build); counted in `pending` too.
    pub waiting: u64,
    /// Replicas out of rotation for failing call after call.
    pub ejected_replicas: u32,
    /// Replicas healthy and not ejected: the ones calls go to.
    pub usable_replicas: u32,
    /// Ejections since the gateway started.
    pub ejections_total: u64,
    /// Retries not made because the pool's retry budget was spent.
    pub retries_refused_total: u64,
}

/// What a pool can do now, as `GetModelInfo` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolHealth {
    /// Every replica answers.
    Serving,
    /// Some replicas answer, others are down or ejected.
    Degraded,
    /// Replicas are known but none answers.
    Down,
    /// No replica at all (scaled to zero, or none discovered yet): calls wait for one.
    Empty,
}

impl PoolStats {
    /// The pool's state from its replica counts.
    pub fn health(&self) -> PoolHealth {
        let usable = self.usable_replicas;
        if self.replicas == 0 {
            PoolHealth::Empty
        } else if usable == 0 {
            PoolHealth::Down
        } else if usable < self.replicas {
            PoolHealth::Degraded
        } else {
            PoolHealth::Serving
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    pending: AtomicU64,
    pending_peak: AtomicU64,
    pending_images: AtomicU64,
    pending_images_peak: AtomicU64,
    in_flight: AtomicU64,
    calls_total: AtomicU64,
    failures_total: AtomicU64,
    retries_total: AtomicU64,
    waiting: AtomicU64,
    ejections_total: AtomicU64,
    retries_refused_total: AtomicU64,
}

#[derive(Debug)]
struct PoolState {
    name: &'static str,
    config: PoolConfig,
    tls: Option<TlsConnector>,
    /// Replaced whole on discovery changes; readers clone the `Arc` and never hold the lock across an await.
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    counters: Counters,
    /// Retries at most `retry_budget_percent` of the calls (see [`Pool::call`]).
    retry_budget: TpsBudget,
}

/// The window over which the retry budget counts calls, and the retries a second it allows regardless.
const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);
const RETRY_BUDGET_RESERVE_PER_SECOND: u32 = 10;

/// How often a call waiting for a replica looks again.
const WAIT_FOR_REPLICA_POLL: Duration = Duration::from_millis(50);

/// One pool of replicas, cheap to clone.
#[derive(Debug, Clone)]
pub struct Pool {
    state: Arc<PoolState>,
}

impl Pool {
    /// A pool named `name` (`encoder`, `decoder`); a static list is connected lazily now, a DNS name is resolved
    /// by [`Pool::refresh`].
    pub fn new(name: &'static str, config: PoolConfig) -> Result<Self, StartError> {
        let tls = match &config.tls {
            Some(settings) => {
                let mut settings = settings.clone();
                // Replicas found by DNS are IP addresses: their certificates name the DNS name.
                if let (None, Discovery::Dns { name: dns, .. }) =
                    (&settings.server_name, &config.discovery)
                {
                    settings.server_name = dns.rsplit_once(':').map(|(host, _)| host.to_string());
                }
                Some(
                    TlsConnector::load(&settings)
                        .map_err(|source| StartError::Tls { pool: name, source })?,
                )
            }
            None => None,
        };
        let replicas = match &config.discovery {
            Discovery::Static(uris) => uris
                .iter()
                .map(|uri| {
                    Replica::new(uri.clone(), config.connect_timeout, tls.as_ref()).map(Arc::new)
                })
                .collect::<Result<Vec<_>, _>>()?,
            Discovery::Dns { .. } => Vec::new(),
        };
        let retry_budget = TpsBudget::new(
            RETRY_BUDGET_WINDOW,
            RETRY_BUDGET_RESERVE_PER_SECOND,
            config.retry_budget_percent / 100.0,
        );
        Ok(Self {
            state: Arc::new(PoolState {
                name,
                config,
                tls,
                retry_budget,
                replicas: RwLock::new(Arc::new(replicas)),
                counters: Counters::default(),
            }),
        })
    }

    /// `encoder` or `decoder`.
    pub fn name(&self) -> &'static str {
        self.state.name
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.state.config
    }

    /// The replicas now.
    pub fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        self.state
            .replicas
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-resolves a DNS-discovered pool: new addresses become replicas, vanished ones are dropped (calls open on
    /// them finish on their own channel), known ones keep their channel and counters. No-op for a static list.
    pub async fn refresh(&self) {
        let Discovery::Dns { name, .. } = &self.state.config.discovery else {
            return;
        };
        let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(name.as_str()).await {
            Ok(addresses) => addresses.collect(),
            Err(err) => {
                tracing::warn!(pool = self.state.name, %name, %err, "dns resolution failed, keeping the replicas");
                return;
            }
        };
        let wanted: HashSet<String> = resolved
            .iter()
            .map(|address| endpoint_uri(&address.to_string()))
            .collect();
        let current = self.replicas();
        let known: HashSet<&str> = current.iter().map(|r| r.address()).collect();
        let unchanged =
            wanted.len() == known.len() && wanted.iter().all(|a| known.contains(a.as_str()));
        if unchanged {
            return;
        }
        let mut next: Vec<Arc<Replica>> = current
            .iter()
            .filter(|replica| wanted.contains(replica.address()))
            .cloned()
            .collect();
        for address in wanted {
            if known.contains(address.as_str()) {
                continue;
            }
            match Replica::new(
                address.clone(),
                self.state.config.connect_timeout,
                self.state.tls.as_ref(),
            ) {
                Ok(replica) => next.push(Arc::new(replica)),
                Err(err) => {
                    tracing::warn!(pool = self.state.name, %address, %err, "cannot add replica")
                }
            }
        }
        next.sort_by(|a, b| a.address().cmp(b.address()));
        tracing::info!(
            pool = self.state.name,
            replicas = ?next.iter().map(|r| r.address()).collect::<Vec<_>>(),
            "replica set changed"
        );
        *self
            .state
            .replicas
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
    }

    /// Picks a replica by power of two choices on in-flight calls among the healthy ones not in `exclude` (the
    /// replicas a retry already tried) and not ejected; when there is none, among the healthy ejected ones, then
    /// the unhealthy ones not ejected, then any. `None` when every replica was tried.
    pub fn pick(&self, exclude: &[Arc<Replica>]) -> Option<Arc<Replica>> {
        self.pick_serving(None, exclude)
    }

    /// [`Pool::pick`] among the replicas that serve `model` (a request pinned to one model build, see
    /// `crate::upstream`); any replica when `None`.
    pub fn pick_serving(
        &self,
        model: Option<&str>,
        exclude: &[Arc<Replica>],
    ) -> Option<Arc<Replica>> {
        let replicas = self.replicas();
        let allowed: Vec<&Arc<Replica>> = replicas
            .iter()
            .filter(|replica| replica.serves(model))
            .filter(|replica| !exclude.iter().any(|tried| Arc::ptr_eq(tried, replica)))
            .collect();
        let of = |keep: &dyn Fn(&Replica) -> bool| -> Vec<&Arc<Replica>> {
            allowed.iter().copied().filter(|r| keep(r)).collect()
        };
        // Healthy and in rotation; else healthy though ejected (a probe answers, the last calls failed); else
        // any not ejected; else any.
        let candidates = [
            of(&|r| r.is_healthy() && !r.is_ejected()),
            of(&|r| r.is_healthy()),
            of(&|r| !r.is_ejected()),
        ]
        .into_iter()
        .find(|candidates| !candidates.is_empty())
        .unwrap_or(allowed);
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0].clone()),
            len => {
                let mut rng = rand::rng();
                let first = rng.random_range(0..len);
                // A second, different index: shift by 1..len so the two choices never coincide.
                let second = (first + rng.random_range(1..len)) % len;
                let (a, b) = (candidates[first], candidates[second]);
                Some(if b.in_flight() < a.in_flight() { b } else { a }.clone())
            }
        }
    }

    /// Waits until a replica serving `model` (any, when `None`) is known, for at most `max_wait_for_replica`
    /// and until `deadline`; the wait counts as a pending call (with its `images`) and in `waiting`. `None` when
    /// none came.
    pub async fn wait_for_replica(
        &self,
        model: Option<&str>,
        images: u64,
        deadline: Option<Instant>,
    ) -> Option<Arc<Replica>> {
        if let Some(replica) = self.pick_serving(model, &[]) {
            return Some(replica);
        }
        let _waiting = self.waiting(images);
        let mut until = Instant::now() + self.state.config.max_wait_for_replica;
        if let Some(deadline) = deadline {
            until = until.min(deadline);
        }
        tracing::info!(
            pool = self.name(),
            model,
            "no replica serves the request's model build: waiting for one"
        );
        while Instant::now() < until {
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(WAIT_FOR_REPLICA_POLL.min(left)).await;
            if let Some(replica) = self.pick_serving(model, &[]) {
                return Some(replica);
            }
        }
        None
    }

    /// Counts a caller waiting for this pool (for a replica, or for the model it describes) as pending, with
    /// its `images`, until the guard drops.
    pub fn waiting(&self, images: u64) -> WaitingGuard {
        let counters = &self.state.counters;
        let pending = counters.pending.fetch_add(1, Ordering::Relaxed) + 1;
        counters.pending_peak.fetch_max(pending, Ordering::Relaxed);
        let pending_images = counters.pending_images.fetch_add(images, Ordering::Relaxed) + images;
        counters
            .pending_images_peak
            .fetch_max(pending_images, Ordering::Relaxed);
        counters.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingGuard {
            state: self.state.clone(),
            images,
        }
    }

    /// Takes a token of the retry budget for one retry; `false` (and counted) when the budget is spent.
    pub(crate) fn may_retry(&self) -> bool {
        let allowed = self.state.retry_budget.withdraw();
        if !allowed {
            self.state
                .counters
                .retries_refused_total
                .fetch_add(1, Ordering::Relaxed);
        }
        allowed
    }

    /// Credits the retry budget with one call.
    pub(crate) fn deposit_call(&self) {
        self.state.retry_budget.deposit();
    }

    /// Starts accounting a call on `replica` (pending and in flight until the guard says otherwise or drops).
    pub fn begin(&self, replica: Arc<Replica>, attempt: u32) -> CallGuard {
        self.begin_with_images(replica, attempt, 0)
    }

    /// [`Pool::begin`] for a call carrying `images` images, counted as pending images until it is answered.
    pub fn begin_with_images(&self, replica: Arc<Replica>, attempt: u32, images: u64) -> CallGuard {
        let counters = &self.state.counters;
        let pending = counters.pending.fetch_add(1, Ordering::Relaxed) + 1;
        counters.pending_peak.fetch_max(pending, Ordering::Relaxed);
        let pending_images = counters.pending_images.fetch_add(images, Ordering::Relaxed) + images;
        counters
            .pending_images_peak
            .fetch_max(pending_images, Ordering::Relaxed);
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        counters.calls_total.fetch_add(1, Ordering::Relaxed);
        if attempt > 0 {
            counters.retries_total.fetch_add(1, Ordering::Relaxed);
        }
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        replica.calls_total.fetch_add(1, Ordering::Relaxed);
        CallGuard {
            state: self.state.clone(),
            replica,
            pending: true,
            images,
        }
    }

    /// The gauges and counters now.
    pub fn stats(&self) -> PoolStats {
        let replicas = self.replicas();
        let counters = &self.state.counters;
        PoolStats {
            replicas: replicas.len() as u32,
            healthy_replicas: replicas.iter().filter(|r| r.is_healthy()).count() as u32,
            ejected_replicas: replicas.iter().filter(|r| r.is_ejected()).count() as u32,
            usable_replicas: replicas
                .iter()
                .filter(|r| r.is_healthy() && !r.is_ejected())
                .count() as u32,
            waiting: counters.waiting.load(Ordering::Relaxed),
            ejections_total: counters.ejections_total.load(Ordering::Relaxed),
            retries_refused_total: counters.retries_refused_total.load(Ordering::Relaxed),
            pending: counters.pending.load(Ordering::Relaxed),
            pending_peak: counters.pending_peak.load(Ordering::Relaxed),
            in_flight: counters.in_flight.load(Ordering::Relaxed),
            pending_images: counters.pending_images.load(Ordering::Relaxed),
            pending_images_peak: counters.pending_images_peak.load(Ordering::Relaxed),
            calls_total: counters.calls_total.load(Ordering::Relaxed),
            failures_total: counters.failures_total.load(Ordering::Relaxed),
            retries_total: counters.retries_total.load(Ordering::Relaxed),
        }
    }
}

/// One call's share of the gauges; dropping it ends the call's accounting.
#[derive(Debug)]
pub struct CallGuard {
    state: Arc<PoolState>,
    replica: Arc<Replica>,
    pending: bool,
    images: u64,
}

impl CallGuard {
    /// The replica the call goes to.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// The first response arrived: the call is no longer pending; the replica answers.
    pub fn responded(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.state.counters.pending.fetch_sub(1, Ordering::Relaxed);
            self.state
                .counters
                .pending_images
                .fetch_sub(self.images, Ordering::Relaxed);
        }
        self.replica.set_healthy(true);
        self.replica.call_answered();
    }

    /// The call failed; `replica_at_fault` marks the replica unhealthy until a probe or call succeeds, and counts
    /// towards its ejection.
    pub fn failed(&self, replica_at_fault: bool) {
        let counters = &self.state.counters;
        counters.failures_total.fetch_add(1, Ordering::Relaxed);
        if replica_at_fault {
            self.replica.set_healthy(false);
            let config = &self.state.config;
            if self
                .replica
                .call_failed(config.eject_after_failures, config.ejection)
            {
                counters.ejections_total.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A caller counted as pending while it waits for a pool to have a replica; dropping it ends the count.
#[derive(Debug)]
pub struct WaitingGuard {
    state: Arc<PoolState>,
    images: u64,
}

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        let counters = &self.state.counters;
        counters.pending.fetch_sub(1, Ordering::Relaxed);
        counters
            .pending_images
            .fetch_sub(self.images, Ordering::Relaxed);
        counters.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let counters = &self.state.counters;
        if self.pending {
            counters.pending.fetch_sub(1, Ordering::Relaxed);
            counters
                .pending_images
                .fetch_sub(self.images, Ordering::Relaxed);
        }
        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    /// A pool of fixed `addresses` ejecting after `eject_after` failures for 60 s, waiting `max_wait` for a
    /// replica.
    pub(super) fn static_config(
        addresses: &[&str],
        eject_after: u32,
        max_wait: Duration,
    ) -> PoolConfig {
        PoolConfig {
            eject_after_failures: NonZeroU32::new(eject_after),
            ejection: Duration::from_secs(60),
            max_wait_for_replica: max_wait,
            ..PoolConfig::with_discovery(Discovery::Static(
                addresses.iter().map(|a| endpoint_uri(a)).collect(),
            ))
        }
    }

    fn pool(addresses: &[&str]) -> Pool {
        let config = PoolConfig {
            max_attempts: NonZeroU32::MIN,
            ..static_config(addresses, 3, Duration::from_millis(200))
        };
        Pool::new("encoder", config).expect("pool")
    }

    #[tokio::test]
    async fn the_less_loaded_of_two_replicas_is_picked() {
        let pool = pool(&["127.0.0.1:1", "127.0.0.1:2"]);
        let busy = pool.replicas()[0].clone();
        let _guards: Vec<CallGuard> = (0..3).map(|_| pool.begin(busy.clone(), 0)).collect();
        for _ in 0..20 {
            let picked = pool.pick(&[]).expect("a replica");
            assert_eq!(picked.address(), "http://127.0.0.1:2");
        }
    }

    #[tokio::test]
    async fn retries_skip_tried_replicas_and_unhealthy_ones_are_avoided() {
        let pool = pool(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let replicas = pool.replicas();
        replicas[2].set_healthy(false);
        for _ in 0..20 {
            let picked = pool.pick(&[replicas[0].clone()]).expect("a replica");
            assert_eq!(picked.address(), "http://127.0.0.1:2");
        }
        let all: Vec<Arc<Replica>> = replicas.iter().cloned().collect();
        assert!(pool.pick(&all).is_none());
        // Only unhealthy replicas left: they are still tried.
        let picked = pool.pick(&all[..2]).expect("the unhealthy one");
        assert_eq!(picked.address(), "http://127.0.0.1:3");
    }

    #[tokio::test]
    async fn a_pinned_pick_takes_only_replicas_of_that_build() {
        let pool = pool(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let replicas = pool.replicas();
        replicas[0].set_fingerprint("old");
        replicas[1].set_fingerprint("new");
        // replicas[2] has not answered a probe: it serves no known build yet.
        for _ in 0..20 {
            let picked = pool.pick_serving(Some("new"), &[]).expect("a replica");
            assert_eq!(picked.address(), "http://127.0.0.1:2");
        }
        assert!(
            pool.pick_serving(Some("new"), &[replicas[1].clone()])
                .is_none()
        );
        assert!(pool.pick_serving(Some("other"), &[]).is_none());
        assert!(
            pool.pick_serving(None, &[replicas[0].clone(), replicas[1].clone()])
                .is_some()
        );
    }

    #[tokio::test]
    async fn guards_keep_the_gauges_right() {
        let pool = pool(&["127.0.0.1:1"]);
        let replica = pool.pick(&[]).expect("replica");
        let mut first = pool.begin(replica.clone(), 0);
        let second = pool.begin(replica, 1);
        assert_eq!((pool.stats().pending, pool.stats().in_flight), (2, 2));
        second.failed(true);
        assert_eq!(pool.stats().healthy_replicas, 0);
        first.responded();
        assert_eq!((pool.stats().pending, pool.stats().in_flight), (1, 2));
        drop(second);
        drop(first);
        let stats = pool.stats();
        assert_eq!((stats.pending, stats.in_flight), (0, 0));
        assert_eq!(
            (stats.calls_total, stats.failures_total, stats.retries_total),
            (2, 1, 1)
        );
        assert_eq!(stats.pending_peak, 2, "the high-water mark stays");
        assert_eq!(pool.replicas()[0].calls_total(), 2);
        assert_eq!(
            stats.healthy_replicas, 1,
            "responded() after failed() restores health"
        );
    }
}

#[cfg(test)]
mod ejection_tests {
    use super::*;

    fn pool(addresses: &[&str], eject_after: u32) -> Pool {
        let config =
            super::tests::static_config(addresses, eject_after, Duration::from_millis(300));
        Pool::new("decoder", config).expect("pool")
    }

    #[tokio::test]
    async fn a_replica_that_keeps_failing_is_ejected_until_every_one_is() {
        let pool = pool(&["127.0.0.1:1", "127.0.0.1:2"], 3);
        let replicas = pool.replicas();
        // Two failures, then an answer: the streak is over, nobody is ejected.
        for _ in 0..2 {
            pool.begin(replicas[0].clone(), 0).failed(true);
        }
        pool.begin(replicas[0].clone(), 0).responded();
        pool.begin(replicas[0].clone(), 0).failed(true);
        assert!(!replicas[0].is_ejected());
        // Three in a row: ejected, and probes saying it answers do not bring it back.
        for _ in 0..2 {
            pool.begin(replicas[0].clone(), 0).failed(true);
        }
        assert!(replicas[0].is_ejected());
        replicas[0].set_healthy(true);
        for _ in 0..20 {
            assert_eq!(
                pool.pick(&[]).expect("a replica").address(),
                "http://127.0.0.1:2"
            );
        }
        let stats = pool.stats();
        assert_eq!((stats.ejected_replicas, stats.ejections_total), (1, 1));
        assert_eq!(stats.health(), PoolHealth::Degraded);
        // An overloaded replica is not at fault: it is never ejected.
        for _ in 0..5 {
            pool.begin(replicas[1].clone(), 0).failed(false);
        }
        assert!(!replicas[1].is_ejected());
        // Every replica ejected: they are all used anyway.
        for _ in 0..3 {
            pool.begin(replicas[1].clone(), 0).failed(true);
        }
        assert!(replicas[1].is_ejected());
        assert!(pool.pick(&[]).is_some(), "ejection never empties the pool");
        assert_eq!(pool.stats().health(), PoolHealth::Down);
    }

    #[tokio::test]
    async fn ejection_is_off_at_zero() {
        let pool = pool(&["127.0.0.1:1"], 0);
        let replica = pool.replicas()[0].clone();
        for _ in 0..50 {
            pool.begin(replica.clone(), 0).failed(true);
        }
        assert!(!replica.is_ejected());
    }

    #[tokio::test]
    async fn a_call_waits_for_a_replica_as_a_pending_call_and_takes_one_that_comes() {
        let pool = pool(&["127.0.0.1:1"], 3);
        let replica = pool.replicas()[0].clone();
        // The only replica has not told its build yet: a call pinned to build "b" waits, counted pending.
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.wait_for_replica(Some("b"), 2, None).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stats = pool.stats();
        assert_eq!(
            (stats.waiting, stats.pending, stats.pending_images),
            (1, 1, 2)
        );
        replica.set_fingerprint("b");
        let found = waiting
            .await
            .expect("joined")
            .expect("the replica that came");
        assert!(Arc::ptr_eq(&found, &replica));
        let stats = pool.stats();
        assert_eq!(
            (stats.waiting, stats.pending, stats.pending_images),
            (0, 0, 0)
        );
        // Nothing comes: the wait ends at `max_wait_for_replica`, or sooner at the deadline.
        let started = Instant::now();
        assert!(pool.wait_for_replica(Some("c"), 0, None).await.is_none());
        assert!(started.elapsed() >= Duration::from_millis(300));
        let started = Instant::now();
        let deadline = Some(Instant::now() + Duration::from_millis(60));
        assert!(
            pool.wait_for_replica(Some("c"), 0, deadline)
                .await
                .is_none()
        );
        assert!(started.elapsed() < Duration::from_millis(300));
        assert_eq!(pool.stats().waiting, 0);
    }

    #[tokio::test]
    async fn the_retry_budget_allows_a_share_of_the_calls() {
        let config = PoolConfig {
            retry_budget_percent: 0.0,
            ..PoolConfig::with_discovery(Discovery::Static(vec!["http://127.0.0.1:1".into()]))
        };
        let pool = Pool::new("encoder", config).expect("pool");
        // With no share, only the reserve of retries a second is allowed, then none.
        let allowed = (0..1000).filter(|_| pool.may_retry()).count();
        assert!(allowed > 0 && allowed < 1000, "{allowed}");
        assert_eq!(pool.stats().retries_refused_total, 1000 - allowed as u64);
    }
}
