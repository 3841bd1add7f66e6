//! `[http]`: the OpenAI-compatible HTTP API (off unless `listen` is set) and its image-URL fetching (off unless
//! `fetch_urls`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kosmos_runtime::config::{ConfigError, address, invalid};
use serde::{Deserialize, Serialize};

/// `[http]` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    /// `host:port` of the HTTP API; empty or `off`: no HTTP API.
    pub listen: String,
    /// Longest an HTTP request may take, in seconds (504 beyond it); 0: no limit but the client's.
    pub request_timeout_seconds: f64,
    /// Fetch `http://` and `https://` image URLs (`data:` URIs are always accepted).
    pub fetch_urls: bool,
    /// Hosts image URLs may name (exact names, or `*.example.com` for its subdomains); empty: any host.
    pub fetch_allow_hosts: Vec<String>,
    /// Let fetches reach private, loopback and link-local addresses (trusted networks and tests only).
    pub fetch_allow_private: bool,
    /// Longest one image fetch may take (every redirect included), in seconds.
    pub fetch_timeout_seconds: f64,
    /// Most redirects one fetch follows.
    pub fetch_max_redirects: u32,
    /// Most image URLs one request may name.
    pub fetch_max_urls: u32,
    /// PEM CA certificates `https://` image servers must chain to, instead of Mozilla's roots; empty: those.
    pub fetch_ca_file: PathBuf,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: String::new(),
            request_timeout_seconds: 0.0,
            fetch_urls: false,
            fetch_allow_hosts: Vec::new(),
            fetch_allow_private: false,
            fetch_timeout_seconds: 10.0,
            fetch_max_redirects: 3,
            fetch_max_urls: 4,
            fetch_ca_file: PathBuf::new(),
        }
    }
}

/// How image URLs are fetched.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchConfig {
    /// Whether URLs are fetched at all.
    pub enabled: bool,
    /// Allowed host names (lowercase; `*.` prefixes match subdomains); empty: any.
    pub allow_hosts: Vec<String>,
    /// Whether private, loopback and link-local addresses may be reached.
    pub allow_private: bool,
    /// Bound on one fetch, redirects included.
    pub timeout: Duration,
    /// Most redirects followed.
    pub max_redirects: u32,
    /// Most URLs per request.
    pub max_urls: usize,
    /// The roots `https://` servers are verified against; `None`: Mozilla's (webpki-roots).
    pub ca_file: Option<PathBuf>,
}

/// The validated `[http]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    /// Where the HTTP API listens; `None`: off.
    pub listen: Option<SocketAddr>,
    /// Bound on a whole request; `None`: none.
    pub request_timeout: Option<Duration>,
    /// Image URL fetching.
    pub fetch: FetchConfig,
}

fn seconds(key: &str, value: f64) -> Result<Duration, ConfigError> {
    if !value.is_finite() || value < 0.0 {
        return Err(invalid(key, format!("must be a number >= 0, got {value}")));
    }
    Ok(Duration::from_secs_f64(value))
}

/// Validates `[http]`.
pub(super) fn http(raw: RawHttp) -> Result<HttpConfig, ConfigError> {
    let listen = match raw.listen.trim() {
        "" | "off" => None,
        text => Some(address("http.listen", text)?),
    };
    let request_timeout = Some(seconds(
        "http.request_timeout_seconds",
        raw.request_timeout_seconds,
    )?)
    .filter(|timeout| !timeout.is_zero());
    let timeout = seconds("http.fetch_timeout_seconds", raw.fetch_timeout_seconds)?;
    if timeout.is_zero() {
        return Err(invalid(
            "http.fetch_timeout_seconds",
            "must be > 0 (a fetch without a time cap is not allowed)",
        ));
    }
    let mut allow_hosts = Vec::with_capacity(raw.fetch_allow_hosts.len());
    for (index, host) in raw.fetch_allow_hosts.iter().enumerate() {
        let host = host.trim().to_ascii_lowercase();
        let bare = host.strip_prefix("*.").unwrap_or(&host);
        if bare.is_empty() || bare.contains(['/', ':', '*', ' ']) {
            return Err(invalid(
                &format!("http.fetch_allow_hosts[{index}]"),
                format!("`{host}` is not a host name (`example.com` or `*.example.com`)"),
            ));
        }
        allow_hosts.push(host);
    }
    Ok(HttpConfig {
        listen,
        request_timeout,
        fetch: FetchConfig {
            enabled: raw.fetch_urls,
            allow_hosts,
            allow_private: raw.fetch_allow_private,
            timeout,
            max_redirects: raw.fetch_max_redirects,
            max_urls: raw.fetch_max_urls as usize,
            ca_file: kosmos_runtime::reload::optional_path(&raw.fetch_ca_file),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_is_off_by_default_and_off_means_off() {
        let config = http(RawHttp::default()).expect("defaults");
        assert_eq!(config.listen, None);
        assert!(!config.fetch.enabled);
        let off = http(RawHttp {
            listen: "off".into(),
            ..RawHttp::default()
        })
        .expect("off");
        assert_eq!(off.listen, None);
        let on = http(RawHttp {
            listen: "127.0.0.1:8000".into(),
            ..RawHttp::default()
        })
        .expect("on");
        assert_eq!(on.listen, Some(SocketAddr::from(([127, 0, 0, 1], 8000))));
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = http(RawHttp {
            listen: "nowhere".into(),
            ..RawHttp::default()
        })
        .expect_err("not an address");
        assert!(err.to_string().contains("http.listen"), "{err}");
        let err = http(RawHttp {
            fetch_allow_hosts: vec!["http://x".into()],
            ..RawHttp::default()
        })
        .expect_err("a URL is no host");
        assert!(err.to_string().contains("fetch_allow_hosts[0]"), "{err}");
        let err = http(RawHttp {
            fetch_timeout_seconds: 0.0,
            ..RawHttp::default()
        })
        .expect_err("no time cap");
        assert!(err.to_string().contains("fetch_timeout_seconds"), "{err}");
    }
}
