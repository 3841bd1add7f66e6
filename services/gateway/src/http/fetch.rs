//! Fetching an image URL without becoming a proxy into the cluster (SSRF): every hop (the URL and each redirect)
//! is checked against `http.fetch_allow_hosts`, its name resolved here and every resolved address checked
//! against the private, loopback, link-local and other non-public ranges; the connection then goes to the
//! address that was checked (a second resolution could answer differently). The body is capped at the image
//! byte limit while it streams, and the whole fetch, redirects included, at `http.fetch_timeout_seconds`.
//!
//! The client is hyper's own connection over a tokio socket (no pool: one image, one connection). An `https://`
//! hop wraps that same checked socket in a rustls client connection (SNI: the URL's host, ALPN `http/1.1`), the
//! server's certificate verified against Mozilla's roots (webpki-roots, compiled in) or, when
//! `http.fetch_ca_file` is set, against that file's certificates instead.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use http::Uri;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use kosmos_runtime::reload::ReloadError;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::FetchConfig;

/// The TLS client configuration of `https://` fetches: ALPN `http/1.1`, servers verified against the
/// certificates of `ca_file` or, without one, Mozilla's roots (webpki-roots).
pub fn client_tls(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ReloadError> {
    let roots = match ca_file {
        Some(path) => kosmos_runtime::tls::read_roots(path)?,
        None => Arc::new(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(kosmos_runtime::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| ReloadError::Build(format!("TLS client configuration: {err}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL does not parse or has no host.
    #[error("not a valid URL: {0}")]
    BadUrl(String),
    /// Neither `http://` nor `https://`.
    #[error("only http:// and https:// URLs are fetched, got {0}")]
    Scheme(String),
    /// The host is not in `http.fetch_allow_hosts`.
    #[error("host `{0}` is not in `http.fetch_allow_hosts`")]
    HostNotAllowed(String),
    /// The host resolves to an address fetches may not reach.
    #[error("host `{host}` resolves to {address}, a private, loopback or link-local address")]
    Forbidden {
        /// The host.
        host: String,
        /// The address refused.
        address: IpAddr,
    },
    /// Name resolution, connection or the HTTP exchange failed.
    #[error("{0}")]
    Connection(String),
    /// A redirect from `https://` to `http://`: the image would travel in the clear after the caller asked for TLS.
    #[error(
        "a redirect from https:// to http:// (`{0}`) is not followed: the image would travel unencrypted"
    )]
    Downgrade(String),
    /// More redirects than `http.fetch_max_redirects`.
    #[error("more than {0} redirects (`http.fetch_max_redirects`)")]
    TooManyRedirects(u32),
    /// The server answered with an error status.
    #[error("the server answered {0}")]
    Status(http::StatusCode),
    /// The body is over the image byte limit.
    #[error("{bytes}")]
    TooLarge {
        /// How much was seen ("over N bytes" while streaming).
        bytes: String,
    },
    /// `http.fetch_timeout_seconds` passed.
    #[error("no complete answer within {0:.1} s (`http.fetch_timeout_seconds`)")]
    Timeout(f64),
}

/// The bytes at `url`, following at most `config.max_redirects` redirects, at most `max_bytes` of them;
/// `https://` hops use `tls` ([`client_tls`]).
pub async fn fetch(
    url: &str,
    config: &FetchConfig,
    tls: &Arc<rustls::ClientConfig>,
    max_bytes: u64,
) -> Result<Vec<u8>, FetchError> {
    tokio::time::timeout(config.timeout, fetch_hops(url, config, tls, max_bytes))
        .await
        .unwrap_or(Err(FetchError::Timeout(config.timeout.as_secs_f64())))
}

async fn fetch_hops(
    url: &str,
    config: &FetchConfig,
    tls: &Arc<rustls::ClientConfig>,
    max_bytes: u64,
) -> Result<Vec<u8>, FetchError> {
    let mut uri: Uri = url
        .parse()
        .map_err(|err: http::uri::InvalidUri| FetchError::BadUrl(err.to_string()))?;
    for _ in 0..=config.max_redirects {
        let hop = check_hop(&uri, config).await?;
        let response = get(&uri, &hop, tls).await?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .ok_or_else(|| FetchError::Connection(format!("a {status} without a Location")))?;
            let target = redirect_target(&uri, location)?;
            if hop.https
                && !target
                    .scheme_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case("https"))
            {
                return Err(FetchError::Downgrade(target.to_string()));
            }
            uri = target;
            continue;
        }
        if !status.is_success() {
            return Err(FetchError::Status(status));
        }
        if let Some(length) = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
            && length > max_bytes
        {
            return Err(FetchError::TooLarge {
                bytes: format!("{length} bytes"),
            });
        }
        let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|err| {
                if err.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge {
                        bytes: format!("over {max_bytes} bytes"),
                    }
                } else {
                    FetchError::Connection(format!("reading the body failed: {err}"))
                }
            })?;
        return Ok(body.to_bytes().to_vec());
    }
    Err(FetchError::TooManyRedirects(config.max_redirects))
}

/// One checked hop: where to connect, and how.
#[derive(Debug)]
struct Hop {
    /// The resolved address that was checked.
    address: SocketAddr,
    /// The URL's host (lowercase, IPv6 without brackets): the TLS server name.
    host: String,
    /// Whether the hop is `https://`.
    https: bool,
}

/// Checks one hop's scheme, host and resolved addresses; the address to connect to.
async fn check_hop(uri: &Uri, config: &FetchConfig) -> Result<Hop, FetchError> {
    let https = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => false,
        Some("https") => true,
        other => {
            return Err(FetchError::Scheme(other.unwrap_or("no scheme").to_string()));
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| FetchError::BadUrl("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if !host_allowed(&host, &config.allow_hosts) {
        return Err(FetchError::HostNotAllowed(host));
    }
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|err| FetchError::Connection(format!("cannot resolve `{host}`: {err}")))?
        .collect();
    if !config.allow_private
        && let Some(address) = addresses.iter().find(|address| !is_public(address.ip()))
    {
        return Err(FetchError::Forbidden {
            host,
            address: address.ip(),
        });
    }
    let address = addresses
        .into_iter()
        .next()
        .ok_or_else(|| FetchError::Connection(format!("`{host}` has no address")))?;
    Ok(Hop {
        address,
        host,
        https,
    })
}

/// Whether `host` is allowed: any host when the list is empty, else an exact name or a `*.` suffix.
fn host_allowed(host: &str, allow_hosts: &[String]) -> bool {
    allow_hosts.is_empty()
        || allow_hosts
            .iter()
            .any(|allowed| match allowed.strip_prefix("*.") {
                Some(domain) => host
                    .strip_suffix(domain)
                    .is_some_and(|rest| rest.ends_with('.')),
                None => allowed == host,
            })
}

/// Whether an address is on the public internet (not private, loopback, link-local, shared, reserved,
/// multicast or documentation space; IPv4-mapped and NAT64 IPv6 addresses are judged by their IPv4 address).
fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let segments = v6.segments();
            if segments[0] == 0x64 && segments[1] == 0xff9b && segments[2..6] == [0, 0, 0, 0] {
                let octets = v6.octets();
                return is_public_v4(Ipv4Addr::new(
                    octets[12], octets[13], octets[14], octets[15],
                ));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (segments[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (segments[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (segments[0] & 0xffc0) == 0xfec0 // site-local fec0::/10
                || (segments[0] == 0x2001 && segments[1] == 0x0db8)) // documentation
        }
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    !(v4.is_private()
        || v4.is_loopback()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space 100.64.0.0/10
        || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

/// One GET over a fresh connection to the checked address (TLS on it for `https://`).
async fn get(
    uri: &Uri,
    hop: &Hop,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<http::Response<hyper::body::Incoming>, FetchError> {
    let address = hop.address;
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|err| FetchError::Connection(format!("{address}: {err}")))?;
    if !hop.https {
        return exchange(uri, address, stream).await;
    }
    let server_name = ServerName::try_from(hop.host.clone()).map_err(|err| {
        FetchError::BadUrl(format!("`{}` is not a TLS server name: {err}", hop.host))
    })?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(server_name, stream)
        .await
        .map_err(|err| {
            FetchError::Connection(format!(
                "{address}: TLS handshake with `{}` failed: {err}",
                hop.host
            ))
        })?;
    exchange(uri, address, stream).await
}

/// The GET of `uri` over an open connection to `address`.
async fn exchange<Stream>(
    uri: &Uri,
    address: SocketAddr,
    stream: Stream,
) -> Result<http::Response<hyper::body::Incoming>, FetchError>
where
    Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection =
        |err: &dyn std::fmt::Display| FetchError::Connection(format!("{address}: {err}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| connection(&err))?;
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            tracing::debug!(%err, "image fetch connection ended with an error");
        }
    });
    let authority = uri
        .authority()
        .map(|authority| authority.as_str())
        .unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |path| path.as_str());
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, "kosmos-serve")
        .header(http::header::ACCEPT, "image/*")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|err| FetchError::BadUrl(err.to_string()))?;
    sender
        .send_request(request)
        .await
        .map_err(|err| connection(&err))
}

/// Where a redirect points, resolved against the URL that answered it.
fn redirect_target(base: &Uri, location: &str) -> Result<Uri, FetchError> {
    let bad = |err: http::Error| FetchError::BadUrl(format!("redirect to `{location}`: {err}"));
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base
        .authority()
        .map(|authority| authority.as_str())
        .unwrap_or_default();
    let absolute = if location.contains("://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let directory = base
            .path()
            .rsplit_once('/')
            .map_or("", |(directory, _)| directory);
        format!("{scheme}://{authority}{directory}/{location}")
    };
    absolute
        .parse::<Uri>()
        .map_err(|err| bad(http::Error::from(err)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "224.0.0.1",
        ] {
            let address: IpAddr = private.parse().expect("an address");
            assert!(!is_public(address), "{private} must not be reachable");
        }
        for public in [
            "93.184.215.14",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            let address: IpAddr = public.parse().expect("an address");
            assert!(is_public(address), "{public} is public");
        }
    }

    #[test]
    fn allowed_hosts_match_exactly_or_by_subdomain() {
        let allow = vec![
            "images.example.com".to_string(),
            "*.cdn.example.org".to_string(),
        ];
        assert!(host_allowed("images.example.com", &allow));
        assert!(host_allowed("a.cdn.example.org", &allow));
        assert!(!host_allowed("cdn.example.org", &allow));
        assert!(!host_allowed("evilcdn.example.org", &allow));
        assert!(!host_allowed("example.com", &allow));
        assert!(host_allowed("anything", &[]));
    }

    #[test]
    fn redirects_resolve_against_the_answering_url() {
        let base: Uri = "http://a.example/img/x.png".parse().expect("a URL");
        let target = |location| redirect_target(&base, location).expect("valid").to_string();
        assert_eq!(target("/y.png"), "http://a.example/y.png");
        assert_eq!(target("y.png"), "http://a.example/img/y.png");
        assert_eq!(target("//b.example/z.png"), "http://b.example/z.png");
        assert_eq!(target("http://c.example/w.png"), "http://c.example/w.png");
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_unless_private_is_allowed() {
        let mut config = FetchConfig {
            enabled: true,
            allow_hosts: Vec::new(),
            allow_private: false,
            timeout: std::time::Duration::from_secs(5),
            max_redirects: 2,
            max_urls: 2,
            ca_file: None,
        };
        let uri: Uri = "http://localhost:9/x.png".parse().expect("a URL");
        let err = check_hop(&uri, &config).await.expect_err("loopback");
        assert!(matches!(err, FetchError::Forbidden { .. }), "{err}");
        config.allow_private = true;
        assert!(check_hop(&uri, &config).await.is_ok());
        let https: Uri = "https://localhost:9/x.png".parse().expect("a URL");
        let hop = check_hop(&https, &config).await.expect("https is fetched");
        assert!(hop.https && hop.host == "localhost");
        let ftp: Uri = "ftp://localhost/x.png".parse().expect("a URL");
        assert!(matches!(
            check_hop(&ftp, &config).await,
            Err(FetchError::Scheme(_))
        ));
    }
}
