//! The checks behind `components/security` (issue 13, "the pools accept only the gateway"; NetworkPolicies are in
//! `network_policies`): TLS files that come from cert-manager Certificates, mounted so that renewals reach the pods; the
//! gateway's view of the pools' certificates (DNS names, usages, issuers); probes that reach a plaintext health port
//! when the gRPC port speaks TLS; the API keys file from a Secret that the manifests do not contain; and the
//! gateway's memory budget in bytes.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Container;
use serde_json::Value;

use crate::{Manifests, Named, Profile, containers, template, template_labels};

/// The GPU pools, which only the gateway may call.
pub(crate) const POOLS: [&str; 2] = ["encoder", "decoder"];

/// A Deployment with what the checks need of it: its component, pod labels, main container and configuration.
pub(crate) struct Pod<'a> {
    pub(crate) deployment: &'a Named<Deployment>,
    pub(crate) component: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) container: Option<&'a Container>,
    pub(crate) config: toml::Table,
}

impl Pod<'_> {
    pub(crate) fn at(&self) -> String {
        format!("{}/{}", self.deployment.namespace, self.deployment.name)
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.deployment.namespace
    }

    pub(crate) fn str(&self, dotted: &str) -> Option<&str> {
        lookup(&self.config, dotted).and_then(toml::Value::as_str)
    }

    /// `server.listen`'s port, or the service's default.
    pub(crate) fn grpc_port(&self) -> i32 {
        self.str("server.listen")
            .and_then(listen_port)
            .unwrap_or(match self.component.as_str() {
                "encoder" => 50052,
                "decoder" => 50053,
                _ => 50051,
            })
    }

    /// `http.listen`'s port (the gateway's OpenAI-compatible API), when the API is on.
    pub(crate) fn http_port(&self) -> Option<i32> {
        self.str("http.listen")
            .filter(|listen| !listen.is_empty() && *listen != "off")
            .and_then(listen_port)
    }

    /// `metrics.listen`'s port, or the default 9090.
    pub(crate) fn metrics_port(&self) -> i32 {
        self.str("metrics.listen")
            .and_then(listen_port)
            .unwrap_or(9090)
    }
}

/// A value at a dotted path of a configuration table.
fn lookup<'a>(table: &'a toml::Table, dotted: &str) -> Option<&'a toml::Value> {
    let mut parts = dotted.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// The port of a `host:port` address.
fn listen_port(address: &str) -> Option<i32> {
    address.rsplit_once(':')?.1.parse().ok()
}

/// A cert-manager Certificate read from JSON.
struct Cert<'a>(&'a Named<Value>);

impl Cert<'_> {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn usages(&self) -> Vec<&str> {
        self.0.object["spec"]["usages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect()
    }

    fn dns_names(&self) -> Vec<&str> {
        self.0.object["spec"]["dnsNames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect()
    }

    /// `kind/name` of the issuer (kind defaults to Issuer).
    fn issuer(&self) -> String {
        let reference = &self.0.object["spec"]["issuerRef"];
        format!(
            "{}/{}",
            reference["kind"].as_str().unwrap_or("Issuer"),
            reference["name"].as_str().unwrap_or_default()
        )
    }
}

/// The file a TLS key names, as found in the pod: the Secret behind the volume and the key inside it.
struct SecretFile {
    secret: String,
    key: String,
}

impl Manifests {
    pub(crate) fn pods(&self) -> (Vec<Pod<'_>>, Vec<String>) {
        let mut pods = Vec::new();
        let mut problems = Vec::new();
        for d in &self.deployments {
            match self.effective_config(d) {
                Ok(config) => pods.push(Pod {
                    deployment: d,
                    component: Self::component(d),
                    labels: template_labels(&d.object),
                    container: containers(&d.object).into_iter().next(),
                    config,
                }),
                Err(err) => problems.push(format!("{}/{}: config: {err:#}", d.namespace, d.name)),
            }
        }
        (pods, problems)
    }

    /// The Secret and key behind file `path` in the Deployment's main container: a whole Secret volume (no subPath,
    /// so that the kubelet replaces renewed files in place).
    fn secret_file(&self, d: &Named<Deployment>, path: &str) -> Result<SecretFile, String> {
        let c = containers(&d.object)
            .into_iter()
            .next()
            .ok_or("no container")?;
        let file = Path::new(path);
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| file.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .ok_or_else(|| format!("{path} lies in no mounted volume"))?;
        if mount.sub_path.is_some() || mount.sub_path_expr.is_some() {
            return Err(format!(
                "{path} is mounted with subPath (volume `{}`): the kubelet never updates such a file, so a renewal \
                 would need a restart",
                mount.name
            ));
        }
        let relative = file
            .strip_prefix(&mount.mount_path)
            .ok()
            .and_then(Path::to_str)
            .unwrap_or_default()
            .to_string();
        let volume = template(&d.object)
            .and_then(|t| t.spec.as_ref())
            .and_then(|s| s.volumes.as_ref())
            .and_then(|v| v.iter().find(|v| v.name == mount.name))
            .ok_or_else(|| format!("no volume `{}`", mount.name))?;
        let secret = volume.secret.as_ref().ok_or_else(|| {
            format!(
                "{path} lies in volume `{}`, which is not a Secret",
                mount.name
            )
        })?;
        let key = match secret.items.as_ref().filter(|i| !i.is_empty()) {
            Some(items) => items
                .iter()
                .find(|i| i.path == relative)
                .map(|i| i.key.clone())
                .ok_or_else(|| {
                    format!(
                        "volume `{}` projects no item at `{relative}` (its items: {:?})",
                        mount.name,
                        items.iter().map(|i| &i.path).collect::<Vec<_>>()
                    )
                })?,
            None => relative,
        };
        Ok(SecretFile {
            secret: secret.secret_name.clone().unwrap_or_default(),
            key,
        })
    }

    fn certificate_writing(&self, namespace: &str, secret: &str) -> Option<Cert<'_>> {
        self.certificates
            .iter()
            .find(|c| c.namespace == namespace && c.object["spec"]["secretName"] == secret)
            .map(Cert)
    }

    /// The Certificate behind TLS key `key` of `pod`, whose file must be `expected` (tls.crt, tls.key or ca.crt)
    /// in that Certificate's Secret.
    fn certificate_file<'a>(
        &'a self,
        pod: &Pod<'_>,
        key: &str,
        expected: &str,
    ) -> Result<Option<Cert<'a>>, String> {
        let Some(path) = pod.str(key) else {
            return Ok(None);
        };
        let file = self
            .secret_file(pod.deployment, path)
            .map_err(|err| format!("`{key}`: {err}"))?;
        let cert = self
            .certificate_writing(pod.namespace(), &file.secret)
            .ok_or_else(|| {
                format!(
                    "`{key}` = {path} comes from Secret `{}`, which no Certificate in namespace `{}` writes",
                    file.secret,
                    pod.namespace()
                )
            })?;
        if file.key != expected {
            return Err(format!(
                "`{key}` = {path} is key `{}` of Secret `{}`, expected `{expected}`",
                file.key, file.secret
            ));
        }
        Ok(Some(cert))
    }

    /// TLS on every gRPC port (in the secure profile), from files of cert-manager Certificates mounted as whole
    /// Secret volumes; mTLS on the pools; the gateway's client side matching the pools' certificates (DNS name,
    /// usages, one issuer both ways); probes on a plaintext health port; Certificates and Issuers consistent.
    pub fn check_tls(&self, profile: Profile) -> Vec<String> {
        let (pods, mut problems) = self.pods();
        let mut fail =
            |pod: &Pod, message: String| problems.push(format!("{}: {message}", pod.at()));
        for pod in &pods {
            let pool = POOLS.contains(&pod.component.as_str());
            let tls_on = pod.str("tls.cert_file").is_some();
            if profile.secure {
                let mut required = vec!["tls.cert_file", "tls.key_file"];
                if pool {
                    required.push("tls.client_ca_file");
                }
                for key in required {
                    if pod.str(key).is_none() {
                        fail(
                            pod,
                            format!(
                                "no `{key}` (the secure profile serves mTLS on the pools, TLS on the gateway)"
                            ),
                        );
                    }
                }
            }
            let mut server_cert = None;
            for (key, expected) in [
                ("tls.cert_file", "tls.crt"),
                ("tls.key_file", "tls.key"),
                ("tls.client_ca_file", "ca.crt"),
            ] {
                match self.certificate_file(pod, key, expected) {
                    Ok(Some(cert)) if key == "tls.cert_file" => server_cert = Some(cert),
                    Ok(Some(cert)) if key == "tls.key_file" => {
                        if server_cert
                            .as_ref()
                            .is_some_and(|s| s.name() != cert.name())
                        {
                            fail(
                                pod,
                                format!(
                                    "`tls.key_file` comes from Certificate {}, `tls.cert_file` from another",
                                    cert.name()
                                ),
                            );
                        }
                    }
                    Ok(_) => {}
                    Err(err) => fail(pod, err),
                }
            }
            if let Some(cert) = &server_cert
                && !cert.usages().contains(&"server auth")
            {
                fail(
                    pod,
                    format!("Certificate {} has no `server auth` usage", cert.name()),
                );
            }
            if tls_on {
                for problem in self.health_port_problems(pod) {
                    fail(pod, problem);
                }
            }
            if pod.component == "gateway" {
                for problem in self.gateway_client_problems(pod, &pods, profile) {
                    fail(pod, problem);
                }
            }
        }
        problems.extend(self.certificate_problems());
        problems
    }

    /// With TLS on the gRPC port, the kubelet's gRPC probes (plaintext only) must ask `server.health_listen`.
    fn health_port_problems(&self, pod: &Pod<'_>) -> Vec<String> {
        let grpc = pod.grpc_port();
        let Some(health) = pod.str("server.health_listen").and_then(listen_port) else {
            return vec![format!(
                "TLS on gRPC port {grpc} but no `server.health_listen`: the kubelet's gRPC probes speak plaintext \
                 only"
            )];
        };
        if health == grpc {
            return vec![format!(
                "`server.health_listen` is the TLS gRPC port {grpc}; the probes need a plaintext port of their own"
            )];
        }
        let mut problems = Vec::new();
        let Some(c) = pod.container else {
            return problems;
        };
        for (kind, probe) in [
            ("startupProbe", c.startup_probe.as_ref()),
            ("readinessProbe", c.readiness_probe.as_ref()),
            ("livenessProbe", c.liveness_probe.as_ref()),
        ] {
            if let Some(port) = probe.and_then(|p| p.grpc.as_ref()).map(|g| g.port)
                && port != health
            {
                problems.push(format!(
                    "{kind} asks port {port}, not the plaintext health port {health} (`server.health_listen`): a \
                     gRPC probe cannot do TLS"
                ));
            }
        }
        problems
    }

    /// The gateway's `[encoder.tls]` and `[decoder.tls]`: files from Certificates, a client certificate with
    /// `client auth` from the issuer the pool trusts, a CA of the issuer that signed the pool's certificate, and a
    /// `server_name` among the pool certificate's DNS names.
    fn gateway_client_problems(
        &self,
        gateway: &Pod<'_>,
        pods: &[Pod<'_>],
        profile: Profile,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        for pool in POOLS {
            let at = format!("`{pool}.tls`");
            if profile.secure {
                for key in ["ca_file", "cert_file", "key_file", "server_name"] {
                    if gateway.str(&format!("{pool}.tls.{key}")).is_none() {
                        problems.push(format!("no `{pool}.tls.{key}` (mTLS to the {pool} pool)"));
                    }
                }
            }
            let mut file = |key: &str, expected: &str| match self.certificate_file(
                gateway,
                &format!("{pool}.tls.{key}"),
                expected,
            ) {
                Ok(cert) => cert,
                Err(err) => {
                    problems.push(err);
                    None
                }
            };
            let ca = file("ca_file", "ca.crt");
            let client = file("cert_file", "tls.crt");
            let client_key = file("key_file", "tls.key");
            if let (Some(client), Some(key)) = (&client, &client_key)
                && client.name() != key.name()
            {
                problems.push(format!(
                    "{at}: cert_file comes from Certificate {}, key_file from {}",
                    client.name(),
                    key.name()
                ));
            }
            if let Some(client) = &client
                && !client.usages().contains(&"client auth")
            {
                problems.push(format!(
                    "{at}: client Certificate {} has no `client auth` usage (the pool would refuse it)",
                    client.name()
                ));
            }
            let server_name = gateway.str(&format!("{pool}.tls.server_name"));
            for target in pods
                .iter()
                .filter(|p| p.namespace() == gateway.namespace() && p.component == pool)
            {
                let served = self
                    .certificate_file(target, "tls.cert_file", "tls.crt")
                    .ok()
                    .flatten();
                let trusted = self
                    .certificate_file(target, "tls.client_ca_file", "ca.crt")
                    .ok()
                    .flatten();
                if let (Some(name), Some(served)) = (server_name, &served)
                    && !served.dns_names().contains(&name)
                {
                    problems.push(format!(
                        "{at}: server_name `{name}` is not a DNS name of Certificate {} ({:?}), which {} serves",
                        served.name(),
                        served.dns_names(),
                        target.deployment.name
                    ));
                }
                if let (Some(ca), Some(served)) = (&ca, &served)
                    && ca.issuer() != served.issuer()
                {
                    problems.push(format!(
                        "{at}: ca_file is the CA of {}, but {}'s certificate comes from {}",
                        ca.issuer(),
                        target.deployment.name,
                        served.issuer()
                    ));
                }
                if let (Some(client), Some(trusted)) = (&client, &trusted)
                    && client.issuer() != trusted.issuer()
                {
                    problems.push(format!(
                        "{at}: the client certificate comes from {}, but {} trusts clients of {}",
                        client.issuer(),
                        target.deployment.name,
                        trusted.issuer()
                    ));
                }
            }
        }
        problems
    }

    /// Namespaced DNS names (`name.<ns>.svc…`) name the Certificate's own namespace (kustomize does not rewrite
    /// them); issuers exist; a CA Issuer's Secret is written by an `isCA` Certificate.
    fn certificate_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &self.certificates {
            let at = format!("Certificate {}/{}", c.namespace, c.name);
            for name in Cert(c).dns_names() {
                let parts: Vec<&str> = name.split('.').collect();
                if let [_, ns, "svc", ..] = parts.as_slice()
                    && *ns != c.namespace
                {
                    problems.push(format!(
                        "{at}: DNS name `{name}` names namespace `{ns}`, but the Certificate is in `{}`",
                        c.namespace
                    ));
                }
            }
            let reference = &c.object["spec"]["issuerRef"];
            let kind = reference["kind"].as_str().unwrap_or("Issuer");
            let name = reference["name"].as_str().unwrap_or_default();
            if kind == "Issuer"
                && !self
                    .issuers
                    .iter()
                    .any(|i| i.namespace == c.namespace && i.name == name)
            {
                problems.push(format!(
                    "{at}: issuerRef names Issuer `{name}`, which does not exist in namespace `{}`",
                    c.namespace
                ));
            }
        }
        for issuer in &self.issuers {
            let Some(secret) = issuer.object["spec"]["ca"]["secretName"].as_str() else {
                continue;
            };
            let is_ca = self.certificates.iter().any(|c| {
                c.namespace == issuer.namespace
                    && c.object["spec"]["secretName"] == secret
                    && c.object["spec"]["isCA"] == true
            });
            if !is_ca {
                problems.push(format!(
                    "Issuer {}/{}: CA Secret `{secret}` is written by no `isCA: true` Certificate",
                    issuer.namespace, issuer.name
                ));
            }
        }
        problems
    }

    /// The gateway reads API keys (in the secure profile) from a whole Secret volume that the manifests do not
    /// contain: keys are made with `kosmos keys new` and never committed.
    pub fn check_api_keys(&self, profile: Profile) -> Vec<String> {
        let (pods, mut problems) = self.pods();
        for pod in pods.iter().filter(|p| p.component == "gateway") {
            let Some(path) = pod.str("auth.api_keys_file") else {
                if profile.secure {
                    problems.push(format!(
                        "{}: no `auth.api_keys_file`: the public API would be open to anyone who reaches it",
                        pod.at()
                    ));
                }
                continue;
            };
            match self.secret_file(pod.deployment, path) {
                Err(err) => problems.push(format!("{}: `auth.api_keys_file`: {err}", pod.at())),
                Ok(file) => {
                    if self
                        .certificate_writing(pod.namespace(), &file.secret)
                        .is_some()
                    {
                        problems.push(format!(
                            "{}: `auth.api_keys_file` reads Secret `{}`, which a Certificate writes",
                            pod.at(),
                            file.secret
                        ));
                    }
                    if self
                        .secrets
                        .iter()
                        .any(|s| s.namespace == pod.namespace() && s.name == file.secret)
                    {
                        problems.push(format!(
                            "{}: Secret `{}` (API keys) is part of the manifests; keys must never be committed \
                             (create it with `kosmos keys new`, k8s/README.md)",
                            pod.at(),
                            file.secret
                        ));
                    }
                }
            }
        }
        problems
    }

    /// The gateway's bytes in flight plus its embedding cache fit in its memory limit.
    pub fn check_memory_budget(&self) -> Vec<String> {
        let (pods, mut problems) = self.pods();
        for pod in pods.iter().filter(|p| p.component == "gateway") {
            let Some(inflight) =
                lookup(&pod.config, "limits.max_inflight_bytes").and_then(toml::Value::as_integer)
            else {
                continue;
            };
            let cache = lookup(&pod.config, "cache.capacity_bytes")
                .and_then(toml::Value::as_integer)
                .unwrap_or(0);
            let limit = pod
                .container
                .and_then(|c| c.resources.as_ref())
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("memory"))
                .and_then(|q| quantity_bytes(&q.0));
            if let Some(limit) = limit
                && inflight + cache >= limit
            {
                problems.push(format!(
                    "{}: limits.max_inflight_bytes {inflight} + cache.capacity_bytes {cache} do not fit in the \
                     memory limit ({limit} bytes)",
                    pod.at()
                ));
            }
        }
        problems
    }
}

/// A memory quantity (`512Mi`, `4Gi`, `1G`, `1000`) in bytes; `None` for forms these manifests do not use.
pub fn quantity_bytes(quantity: &str) -> Option<i64> {
    let split = quantity
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let number: i64 = number.parse().ok()?;
    let factor: i64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_in_bytes() {
        assert_eq!(quantity_bytes("512Mi"), Some(512 << 20));
        assert_eq!(quantity_bytes("4Gi"), Some(4 << 30));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("1000"), Some(1000));
        assert_eq!(quantity_bytes("1.5Gi"), None);
    }

    #[test]
    fn addresses_and_dotted_keys() {
        assert_eq!(listen_port("0.0.0.0:8081"), Some(8081));
        assert_eq!(listen_port("[::]:50051"), Some(50051));
        let table: toml::Table = toml::from_str("[encoder.tls]\nca_file = \"/x\"\n").expect("toml");
        assert_eq!(
            lookup(&table, "encoder.tls.ca_file").and_then(toml::Value::as_str),
            Some("/x")
        );
        assert!(lookup(&table, "decoder.tls.ca_file").is_none());
    }
}
