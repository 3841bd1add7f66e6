//! Test certificates made at test time with rcgen: a CA, a server certificate for `localhost` / 127.0.0.1 (also
//! good as a client certificate, as the services' certificates are in the Kubernetes manifests), and a client
//! certificate. Written as PEM files under a fresh directory; the server's can be re-issued in place (rotation).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};

/// PEM files of a test PKI.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// A new CA, server and client certificates under a fresh temporary directory named after `name`.
    pub fn generate(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "kosmos-pki-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "kosmos test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        let pki = Self { dir, ca };
        pki.issue("server", "kosmos test server")?;
        pki.issue("client", "kosmos test client")?;
        Ok(pki)
    }

    /// Issues (or re-issues, in place) the leaf `name`: `name.pem` and `name.key`.
    pub fn issue(&self, name: &str, common_name: &str) -> anyhow::Result<Vec<u8>> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        // Key first: a reader between the two writes sees a key that does not match and keeps the old pair.
        std::fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem())?;
        std::fs::write(self.dir.join(format!("{name}.pem")), cert.pem())?;
        Ok(cert.der().to_vec())
    }

    /// `name` in the PKI's directory (`ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Overrides giving a service TLS with the server certificate, requiring client certificates of the CA.
    pub fn server_overrides(&self) -> Vec<String> {
        vec![
            format!("tls.cert_file={}", json(&self.path("server.pem"))),
            format!("tls.key_file={}", json(&self.path("server.key"))),
            format!("tls.client_ca_file={}", json(&self.path("ca.pem"))),
            "tls.reload_interval_seconds=0.1".to_string(),
        ]
    }

    /// Overrides giving the gateway's pool `pool` TLS to its replicas, with the server certificate as its client
    /// certificate.
    pub fn pool_overrides(&self, pool: &str) -> Vec<String> {
        vec![
            format!("{pool}.tls.ca_file={}", json(&self.path("ca.pem"))),
            format!("{pool}.tls.cert_file={}", json(&self.path("server.pem"))),
            format!("{pool}.tls.key_file={}", json(&self.path("server.key"))),
            format!("{pool}.tls.server_name=\"localhost\""),
        ]
    }
}

fn json(path: &Path) -> String {
    kosmos_runtime::config::json_string(&path.display().to_string())
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
