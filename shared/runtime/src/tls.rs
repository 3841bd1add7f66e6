//! TLS and mTLS on every hop, with rustls (ring provider), certificates re-read when their files change.
//!
//! * Servers: `[tls] cert_file`, `key_file` turn TLS on; `client_ca_file` also requires a client certificate
//!   signed by that CA (mTLS). [`TlsAcceptor`] performs handshakes off the accept loop (bounded in number and in
//!   time), with the configuration current at that moment: a rotated certificate serves the next handshake.
//! * Clients (the gateway's pools): `[encoder.tls]` / `[decoder.tls]` `ca_file` (the CA that signed the
//!   replicas' certificates), optional `cert_file` + `key_file` (the gateway's client certificate, for mTLS),
//!   `server_name` (the name the replicas' certificates carry; default: the host of each endpoint).
//!   [`TlsConnector`] makes every new connection with the configuration current at that moment.
//!
//! ALPN is `h2` both ways (gRPC is HTTP/2 only).
//!
//! ```toml
//! [tls]
//! cert_file = "/etc/kosmos/tls/tls.crt"
//! key_file = "/etc/kosmos/tls/tls.key"
//! client_ca_file = "/etc/kosmos/tls/ca.crt"   # optional: mTLS
//! reload_interval_seconds = 10.0              # 0: read once
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::config::{ConfigError, invalid, seconds};
use crate::reload::{ReloadError, Reloading, optional_path};

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 256;

/// The crypto provider every TLS configuration of the workspace uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn default_reload() -> Duration {
    Duration::from_secs(10)
}

/// `[tls]` of a server, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    /// PEM certificate chain, leaf first; empty: plaintext.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf.
    pub key_file: PathBuf,
    /// PEM CA certificates client certificates must chain to; when set, a client certificate is required.
    pub client_ca_file: PathBuf,
    /// How often the files are re-read (0: never).
    #[serde(rename = "reload_interval_seconds", with = "seconds")]
    pub reload_interval: Duration,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            client_ca_file: PathBuf::new(),
            reload_interval: default_reload(),
        }
    }
}

/// A server's validated TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Certificate chain file.
    pub cert_file: PathBuf,
    /// Private key file.
    pub key_file: PathBuf,
    /// Client CA file: mTLS when set.
    pub client_ca_file: Option<PathBuf>,
    /// Re-read period.
    pub reload_interval: Duration,
}

impl TlsSettings {
    /// `None` when `[tls]` is empty (plaintext); every error names its key.
    pub fn from_raw(raw: &RawTls) -> Result<Option<Self>, ConfigError> {
        let cert = optional_path(&raw.cert_file);
        let key = optional_path(&raw.key_file);
        let client_ca = optional_path(&raw.client_ca_file);
        match (cert, key) {
            (Some(cert_file), Some(key_file)) => Ok(Some(Self {
                cert_file,
                key_file,
                client_ca_file: client_ca,
                reload_interval: raw.reload_interval,
            })),
            (None, None) if client_ca.is_none() => Ok(None),
            (None, None) => Err(invalid(
                "tls.client_ca_file",
                "requires tls.cert_file and tls.key_file (mTLS needs a server certificate)",
            )),
            (Some(_), None) => Err(invalid(
                "tls.key_file",
                "required when tls.cert_file is set",
            )),
            (None, Some(_)) => Err(invalid(
                "tls.cert_file",
                "required when tls.key_file is set",
            )),
        }
    }
}

/// `[<pool>.tls]` of a client, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawClientTls {
    /// PEM CA certificates the servers' certificates must chain to; empty: plaintext.
    pub ca_file: PathBuf,
    /// PEM client certificate chain (mTLS); with `key_file`.
    pub cert_file: PathBuf,
    /// PEM private key of the client certificate.
    pub key_file: PathBuf,
    /// The name the servers' certificates must carry; empty: each endpoint's host.
    pub server_name: String,
    /// How often the files are re-read (0: never).
    #[serde(rename = "reload_interval_seconds", with = "seconds")]
    pub reload_interval: Duration,
}

impl Default for RawClientTls {
    fn default() -> Self {
        Self {
            ca_file: PathBuf::new(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            server_name: String::new(),
            reload_interval: default_reload(),
        }
    }
}

/// A client's validated TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsSettings {
    /// CA file.
    pub ca_file: PathBuf,
    /// Client certificate and key files (mTLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Expected server name, if fixed.
    pub server_name: Option<String>,
    /// Re-read period.
    pub reload_interval: Duration,
}

impl ClientTlsSettings {
    /// `None` when the section is empty (plaintext); `section` is e.g. `encoder.tls`, named by errors.
    pub fn from_raw(section: &str, raw: &RawClientTls) -> Result<Option<Self>, ConfigError> {
        let key = |name: &str| format!("{section}.{name}");
        let cert = optional_path(&raw.cert_file);
        let private = optional_path(&raw.key_file);
        let identity = match (cert, private) {
            (Some(cert), Some(private)) => Some((cert, private)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(&key("key_file"), "required when cert_file is set"));
            }
            (None, Some(_)) => {
                return Err(invalid(&key("cert_file"), "required when key_file is set"));
            }
        };
        let server_name = (!raw.server_name.is_empty()).then(|| raw.server_name.clone());
        if let Some(name) = &server_name
            && ServerName::try_from(name.as_str()).is_err()
        {
            return Err(invalid(
                &key("server_name"),
                format!("`{name}` is not a DNS name or IP address"),
            ));
        }
        match optional_path(&raw.ca_file) {
            Some(ca_file) => Ok(Some(Self {
                ca_file,
                identity,
                server_name,
                reload_interval: raw.reload_interval,
            })),
            None if identity.is_none() && server_name.is_none() => Ok(None),
            None => Err(invalid(
                &key("ca_file"),
                "required when any other TLS key of the section is set",
            )),
        }
    }
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ReloadError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| {
            ReloadError::Build(format!("{}: not PEM certificates: {err}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(ReloadError::Build(format!(
            "{}: holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, ReloadError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|err| ReloadError::Build(format!("{}: no PEM private key: {err}", path.display())))
}

/// The CA certificates of the PEM file at `path` as a root store (read once; for clients that do not reload).
pub fn read_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, ReloadError> {
    let pem = std::fs::read(path).map_err(|source| ReloadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    roots(path, &pem)
}

fn roots(path: &Path, pem: &[u8]) -> Result<Arc<rustls::RootCertStore>, ReloadError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path, pem)? {
        roots
            .add(cert)
            .map_err(|err| ReloadError::Build(format!("{}: {err}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

fn tls_error(what: &Path, err: impl std::fmt::Display) -> ReloadError {
    ReloadError::Build(format!("{}: {err}", what.display()))
}

/// The server configuration from the files' contents (certificate, key[, client CA]).
fn server_config(
    settings: &TlsSettings,
    contents: &[Vec<u8>],
) -> Result<rustls::ServerConfig, ReloadError> {
    let certs = certificates(&settings.cert_file, &contents[0])?;
    let key = private_key(&settings.key_file, &contents[1])?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| tls_error(&settings.cert_file, err))?;
    let builder = match &settings.client_ca_file {
        Some(ca_file) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots(ca_file, &contents[2])?,
                provider(),
            )
            .build()
            .map_err(|err| tls_error(ca_file, err))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|err| {
        tls_error(
            &settings.key_file,
            format!("does not match the certificate: {err}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The client configuration from the files' contents (CA[, certificate, key]).
fn client_config(
    settings: &ClientTlsSettings,
    contents: &[Vec<u8>],
) -> Result<rustls::ClientConfig, ReloadError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| tls_error(&settings.ca_file, err))?
        .with_root_certificates(roots(&settings.ca_file, &contents[0])?);
    let mut config = match &settings.identity {
        Some((cert_file, key_file)) => builder
            .with_client_auth_cert(
                certificates(cert_file, &contents[1])?,
                private_key(key_file, &contents[2])?,
            )
            .map_err(|err| tls_error(key_file, format!("does not match the certificate: {err}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A server's TLS: handshakes with the configuration current when each connection arrives.
#[derive(Debug, Clone)]
pub struct TlsAcceptor {
    config: Reloading<rustls::ServerConfig>,
    mutual: bool,
    /// ALPN protocols offered instead of `h2` alone (an HTTP API also speaks HTTP/1.1).
    alpn: Option<Vec<Vec<u8>>>,
}

impl TlsAcceptor {
    /// Reads the files (an error names the file) and re-reads them every `reload_interval`.
    pub fn load(settings: &TlsSettings) -> Result<Self, ReloadError> {
        let mut files = vec![settings.cert_file.clone(), settings.key_file.clone()];
        files.extend(settings.client_ca_file.clone());
        let owned = settings.clone();
        let config = Reloading::load(
            "tls certificate",
            files,
            settings.reload_interval,
            move |contents| server_config(&owned, contents),
        )?;
        Ok(Self {
            config,
            mutual: settings.client_ca_file.is_some(),
            alpn: None,
        })
    }

    /// The same certificates (and client CA), offering `protocols` by ALPN (e.g. `h2` and `http/1.1` for an
    /// HTTP API) instead of `h2` alone.
    pub fn with_alpn(&self, protocols: &[&[u8]]) -> Self {
        Self {
            alpn: Some(protocols.iter().map(|protocol| protocol.to_vec()).collect()),
            ..self.clone()
        }
    }

    /// The server configuration a handshake starting now uses.
    fn current(&self) -> Arc<rustls::ServerConfig> {
        let config = self.config.current();
        match &self.alpn {
            None => config,
            Some(alpn) => {
                let mut config = (*config).clone();
                config.alpn_protocols = alpn.clone();
                Arc::new(config)
            }
        }
    }

    /// Whether client certificates are required.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    /// Re-reads the files now (tests; the background task does it every `reload_interval`).
    pub fn reload(&self) -> Result<bool, ReloadError> {
        self.config.reload()
    }

    /// Accepts TCP connections on `listener` and yields those whose handshake completed, until the returned
    /// receiver is dropped. Handshakes run on their own tasks, at most [`MAX_HANDSHAKES`] at once, each within
    /// [`HANDSHAKE_TIMEOUT`]: a slow or plaintext client never blocks the others.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> mpsc::Receiver<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
        let (sender, receiver) = mpsc::channel(64);
        let acceptor = self.clone();
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = sender.closed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::debug!(%err, "accept failed");
                        continue;
                    }
                };
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%err, "cannot set TCP_NODELAY");
                }
                let acceptor = tokio_rustls::TlsAcceptor::from(acceptor.current());
                let sender = sender.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = sender.send(Ok(tls)).await;
                        }
                        Ok(Err(err)) => tracing::debug!(%peer, %err, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        receiver
    }
}

/// An `axum::serve` listener yielding the TLS connections of [`TlsAcceptor::incoming`] (an HTTP API over TLS).
#[derive(Debug)]
pub struct TlsListener {
    connections: mpsc::Receiver<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>>,
    local_addr: std::net::SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` with `acceptor` (whose ALPN should offer `http/1.1` too; see
    /// [`TlsAcceptor::with_alpn`]).
    pub fn new(listener: TcpListener, acceptor: &TlsAcceptor) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        Ok(Self {
            connections: acceptor.incoming(listener),
            local_addr,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.connections.recv().await {
                Some(Ok(stream)) => {
                    let peer = stream
                        .get_ref()
                        .0
                        .peer_addr()
                        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
                    return (stream, peer);
                }
                Some(Err(err)) => tracing::debug!(%err, "TLS connection failed"),
                // The accept task ended (it only does when this receiver is gone): nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// A client's TLS: every new connection is made with the configuration current at that moment.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    config: Reloading<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl TlsConnector {
    /// Reads the files (an error names the file) and re-reads them every `reload_interval`.
    pub fn load(settings: &ClientTlsSettings) -> Result<Self, ReloadError> {
        let mut files = vec![settings.ca_file.clone()];
        if let Some((cert, key)) = &settings.identity {
            files.push(cert.clone());
            files.push(key.clone());
        }
        let owned = settings.clone();
        let config = Reloading::load(
            "tls client certificate",
            files,
            settings.reload_interval,
            move |contents| client_config(&owned, contents),
        )?;
        Ok(Self {
            config,
            server_name: settings.server_name.clone(),
        })
    }

    /// Connects to `host:port` over TCP and completes a TLS handshake, checking the server's certificate
    /// against the configured name (or `host`).
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_string()).map_err(|err| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("server name `{name}`: {err}"),
            )
        })?;
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(self.config.current())
            .connect(name, tcp)
            .await
    }

    /// A connector for tonic's `Endpoint::connect_with_connector_lazy`: each call connects to the URI's host
    /// and port (default 443) over TLS. The endpoint's URI scheme must be `http` (tonic refuses `https` with a
    /// connector of its own; the TLS happens here).
    pub fn service(
        &self,
    ) -> impl tower::Service<
        http::Uri,
        Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        Error = std::io::Error,
        Future = impl Future<
            Output = std::io::Result<
                hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
            >,
        > + Send,
    > + Clone
    + Send
    + 'static {
        let connector = self.clone();
        tower::service_fn(move |uri: http::Uri| {
            let connector = connector.clone();
            async move {
                let host = uri
                    .host()
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("`{uri}` has no host"),
                        )
                    })?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                let port = uri.port_u16().unwrap_or(443);
                let stream = connector.connect(&host, port).await?;
                Ok(hyper_util::rt::TokioIo::new(stream))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_the_missing_key() {
        let mut raw = RawTls::default();
        assert_eq!(TlsSettings::from_raw(&raw).expect("empty"), None);
        raw.cert_file = "c.pem".into();
        let err = TlsSettings::from_raw(&raw).expect_err("no key").to_string();
        assert!(err.contains("tls.key_file"), "{err}");
        let raw = RawTls {
            client_ca_file: "ca.pem".into(),
            ..RawTls::default()
        };
        let err = TlsSettings::from_raw(&raw)
            .expect_err("ca alone")
            .to_string();
        assert!(err.contains("tls.client_ca_file"), "{err}");

        let raw = RawClientTls {
            cert_file: "c.pem".into(),
            key_file: "k.pem".into(),
            ..RawClientTls::default()
        };
        let err = ClientTlsSettings::from_raw("decoder.tls", &raw)
            .expect_err("no ca")
            .to_string();
        assert!(err.contains("decoder.tls.ca_file"), "{err}");
        let raw = RawClientTls {
            ca_file: "ca.pem".into(),
            server_name: "not a name!".into(),
            ..RawClientTls::default()
        };
        let err = ClientTlsSettings::from_raw("encoder.tls", &raw)
            .expect_err("bad name")
            .to_string();
        assert!(err.contains("encoder.tls.server_name"), "{err}");
    }

    #[test]
    fn unreadable_or_mismatched_files_name_the_file() {
        let dir = std::env::temp_dir().join(format!("kosmos-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cert_file = dir.join("cert.pem");
        std::fs::write(&cert_file, "not pem").expect("write");
        let settings = TlsSettings {
            cert_file: cert_file.clone(),
            key_file: dir.join("missing.key"),
            client_ca_file: None,
            reload_interval: Duration::ZERO,
        };
        let err = TlsAcceptor::load(&settings)
            .expect_err("missing key")
            .to_string();
        assert!(err.contains("missing.key"), "{err}");
        std::fs::write(dir.join("missing.key"), "junk").expect("write");
        let err = TlsAcceptor::load(&settings)
            .expect_err("bad cert")
            .to_string();
        assert!(err.contains("cert.pem"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
