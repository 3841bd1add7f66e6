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
    /// TLS to the replicas, if set.
    pub tls: Option<kosmos_runtime::tls::ClientTlsSettings>,
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

/// Validates one pool's section; `name` is `encoder` or `decoder`, the section's name.
pub(super) fn pool(raw: RawPool, name: &str) -> Result<PoolConfig, ConfigError> {
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
    let tls = kosmos_runtime::tls::ClientTlsSettings::from_raw(&key("tls"), &raw.tls)?;
    Ok(PoolConfig {
        tls,
        discovery,
        connect_timeout: raw.connect_timeout,
        call_timeout: (!raw.call_timeout.is_zero()).then_some(raw.call_timeout),
        max_attempts,
        probe_interval: raw.probe_interval,
    })
}
