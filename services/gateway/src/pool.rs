//! The replicas of one pool (encoder or decoder): discovery from a static list or a DNS name re-resolved
//! periodically, client-side balancing by power of two choices on in-flight calls, and the pool's gauges.
//!
//! Every replica holds one lazily connected HTTP/2 channel; calls multiplex over it. A call holds a
//! [`CallGuard`] from the moment a replica is picked until the call (or the stream) ends, so the in-flight and
//! pending gauges are right even when a caller goes away mid-stream: dropping the guard is the accounting.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kosmos_runtime::telemetry::TracePropagation;
use rand::Rng;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

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
}

#[derive(Debug)]
struct PoolState {
    name: &'static str,
    config: PoolConfig,
    tls: Option<TlsConnector>,
    /// Replaced whole on discovery changes; readers clone the `Arc` and never hold the lock across an await.
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    counters: Counters,
}

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
        Ok(Self {
            state: Arc::new(PoolState {
                name,
                config,
                tls,
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
    /// replicas a retry already tried); when none is healthy, among all not excluded. `None` when every replica
    /// was tried.
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
        let healthy: Vec<&Arc<Replica>> =
            allowed.iter().copied().filter(|r| r.is_healthy()).collect();
        let candidates = if healthy.is_empty() { allowed } else { healthy };
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
    }

    /// The call failed; `replica_at_fault` marks the replica unhealthy until a probe or call succeeds.
    pub fn failed(&self, replica_at_fault: bool) {
        self.state
            .counters
            .failures_total
            .fetch_add(1, Ordering::Relaxed);
        if replica_at_fault {
            self.replica.set_healthy(false);
        }
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

    fn pool(addresses: &[&str]) -> Pool {
        let config = PoolConfig {
            discovery: Discovery::Static(addresses.iter().map(|a| endpoint_uri(a)).collect()),
            connect_timeout: Duration::from_secs(1),
            call_timeout: None,
            max_attempts: NonZeroU32::MIN,
            probe_interval: Duration::from_secs(1),
            tls: None,
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
