//! `[encoder]` and `[decoder]`: where the replicas of a pool are and how the gateway calls them.

use std::num::NonZeroU32;
use std::time::Duration;

use kosmos_runtime::config::{ConfigError, invalid, seconds};
use serde::{Deserialize, Serialize};

/// `[encoder]` and `[decoder]`: where the replicas are and how to call them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPool {
    /// A static list of replicas (`http://host:port` or `host:port`).
    pub endpoints: Vec<String>,
    /// A `host:port` name re-resolved periodically; every address it resolves to is a replica. Exclusive with
    /// `endpoints`.
    pub dns: String,
    /// How often `dns` is re-resolved.
    #[serde(rename = "dns_refresh_seconds", with = "seconds")]
    pub dns_refresh: Duration,
    /// Connection timeout to one replica.
    #[serde(rename = "connect_timeout_seconds", with = "seconds")]
    pub connect_timeout: Duration,
    /// Upper bound of one call when the caller sets a longer deadline or none; 0 means none.
    #[serde(rename = "call_timeout_seconds", with = "seconds")]
    pub call_timeout: Duration,
    /// Most replicas tried for one call.
    pub max_attempts: u32,
    /// How often every replica is probed (its `Info`).
    #[serde(rename = "probe_interval_seconds", with = "seconds")]
    pub probe_interval: Duration,
    /// Retries may add at most this percentage to the pool's calls (over the last 10 seconds, beyond a reserve
    /// of 10 retries a second), so that a sick pool is not hammered by its own callers.
    pub retry_budget_percent: f32,
    /// The first retry waits up to this long (full jitter), each further one up to twice as long as the one
    /// before, at most 32 times this; the caller's deadline bounds every wait. 0: retry at once.
    #[serde(rename = "retry_backoff_seconds", with = "seconds")]
    pub retry_backoff: Duration,
    /// A replica whose calls fail this many times in a row is ejected (taken out of rotation, probes
    /// notwithstanding) for `ejection_seconds`, doubled at each ejection after the first, at most 10 times as
    /// long; 0: never ejected.
    pub eject_after_failures: u32,
    /// How long a first ejection lasts.
    #[serde(rename = "ejection_seconds", with = "seconds")]
    pub ejection: Duration,
    /// `[<pool>.tls]`: TLS (and the gateway's client certificate for mTLS) to the replicas.
    pub tls: kosmos_runtime::tls::RawClientTls,
}

impl Default for RawPool {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            dns: String::new(),
            dns_refresh: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            call_timeout: Duration::ZERO,
            max_attempts: 3,
            probe_interval: Duration::from_secs(1),
            retry_budget_percent: 20.0,
            retry_backoff: Duration::from_millis(25),
            eject_after_failures: 5,
            ejection: Duration::from_secs(30),
            tls: kosmos_runtime::tls::RawClientTls::default(),
        }
    }
}

/// How the replicas of a pool are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// A fixed list of `http://host:port` URIs.
    Static(Vec<String>),
    /// Every address `host:port` resolves to, re-resolved every `refresh`.
    Dns {
        /// `host:port`.
        name: String,
        /// Re-resolution period.
        refresh: Duration,
    },
}

/// A validated pool configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Where the replicas are.
    pub discovery: Discovery,
    /// Connection timeout to one replica.
    pub connect_timeout: Duration,
    /// Upper bound of one call, if any.
    pub call_timeout: Option<Duration>,
    /// Most replicas tried for one call.
    pub max_attempts: NonZeroU32,
    /// Probe period.
    pub probe_interval: Duration,
    /// Retries allowed, in percent of calls (`retry_budget_percent`).
    pub retry_budget_percent: f32,
    /// The base of the exponential backoff between attempts (`retry_backoff_seconds`).
    pub retry_backoff: Duration,
    /// Failures in a row that eject a replica, if ejection is on (`eject_after_failures`).
    pub eject_after_failures: Option<NonZeroU32>,
    /// The first ejection's length (`ejection_seconds`).
    pub ejection: Duration,
    /// How long a call waits for a replica when none serves (`limits.max_waiting_for_replica_seconds`).
    pub max_wait_for_replica: Duration,
    /// TLS to the replicas, if set.
    pub tls: Option<kosmos_runtime::tls::ClientTlsSettings>,
}

impl PoolConfig {
    /// The replicas `discovery` finds, called with every default of `[encoder]` / `[decoder]` and `[limits]`.
    pub fn with_discovery(discovery: Discovery) -> Self {
        let raw = RawPool::default();
        Self {
            discovery,
            connect_timeout: raw.connect_timeout,
            call_timeout: None,
            max_attempts: NonZeroU32::new(raw.max_attempts).unwrap_or(NonZeroU32::MIN),
            probe_interval: raw.probe_interval,
            retry_budget_percent: raw.retry_budget_percent,
            retry_backoff: raw.retry_backoff,
            eject_after_failures: NonZeroU32::new(raw.eject_after_failures),
            ejection: raw.ejection,
            max_wait_for_replica: super::RawLimits::default().max_waiting_for_replica,
            tls: None,
        }
    }
}

/// `host:port` or `http://host:port` as a URI tonic accepts.
pub fn endpoint_uri(endpoint: &str) -> String {
    let trimmed = endpoint.trim();
    if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    }
}

/// Validates one pool's section; `name` is `encoder` or `decoder`, the section's name; a call waits up to
/// `max_wait_for_replica` for a replica (`limits.max_waiting_for_replica_seconds`).
pub(super) fn pool(
    raw: RawPool,
    name: &str,
    max_wait_for_replica: Duration,
) -> Result<PoolConfig, ConfigError> {
    let key = |field: &str| format!("{name}.{field}");
    let has_dns = !raw.dns.trim().is_empty();
    let discovery = match (raw.endpoints.is_empty(), has_dns) {
        (true, false) => {
            return Err(invalid(
                &key("endpoints"),
                format!("`{name}.endpoints` or `{name}.dns` must name at least one replica"),
            ));
        }
        (false, true) => {
            return Err(invalid(
                &key("endpoints"),
                format!("`{name}.endpoints` and `{name}.dns` are exclusive, both are set"),
            ));
        }
        (false, false) => {
            let uris: Vec<String> = raw.endpoints.iter().map(|e| endpoint_uri(e)).collect();
            for uri in &uris {
                tonic::transport::Endpoint::from_shared(uri.clone()).map_err(|err| {
                    invalid(
                        &key("endpoints"),
                        format!("entry `{uri}` is not a valid URI: {err}"),
                    )
                })?;
            }
            Discovery::Static(uris)
        }
        (true, true) => {
            let dns = raw.dns.trim().to_string();
            let port_ok = dns
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(invalid(
                    &key("dns"),
                    format!("must be `host:port`, got `{dns}`"),
                ));
            }
            Discovery::Dns {
                name: dns,
                refresh: raw.dns_refresh,
            }
        }
    };
    let max_attempts = NonZeroU32::new(raw.max_attempts)
        .ok_or_else(|| invalid(&key("max_attempts"), "must be at least 1, got 0"))?;
    for (field, value) in [
        ("dns_refresh_seconds", raw.dns_refresh),
        ("probe_interval_seconds", raw.probe_interval),
        ("connect_timeout_seconds", raw.connect_timeout),
    ] {
        if value.is_zero() {
            return Err(invalid(&key(field), "must be > 0"));
        }
    }
    if raw.eject_after_failures > 0 && raw.ejection.is_zero() {
        return Err(invalid(
            &key("ejection_seconds"),
            "must be > 0 while `eject_after_failures` is set",
        ));
    }
    // tower's retry budget takes 0 ..= 1000 percent.
    if !(0.0..=1000.0).contains(&raw.retry_budget_percent) {
        return Err(invalid(
            &key("retry_budget_percent"),
            format!("must be in 0 ..= 1000, got {}", raw.retry_budget_percent),
        ));
    }
    if raw.retry_backoff > Duration::from_secs(10) {
        return Err(invalid(
            &key("retry_backoff_seconds"),
            format!("must be <= 10, got {}", raw.retry_backoff.as_secs_f64()),
        ));
    }
    let tls = kosmos_runtime::tls::ClientTlsSettings::from_raw(&key("tls"), &raw.tls)?;
    Ok(PoolConfig {
        tls,
        discovery,
        connect_timeout: raw.connect_timeout,
        call_timeout: (!raw.call_timeout.is_zero()).then_some(raw.call_timeout),
        max_attempts,
        probe_interval: raw.probe_interval,
        retry_budget_percent: raw.retry_budget_percent,
        retry_backoff: raw.retry_backoff,
        eject_after_failures: NonZeroU32::new(raw.eject_after_failures),
        ejection: raw.ejection,
        max_wait_for_replica,
    })
}
