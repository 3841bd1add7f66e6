//! Semantic checks of the Kubernetes manifests in `k8s/`, on what `kubectl kustomize` renders: the things a schema
//! cannot see. Each check returns the problems it found (empty: passed), so that a test can show every problem at
//! once and a negative test can assert that one mutation trips exactly the check it targets.
//!
//! The rendered documents are kept as JSON values (so tests can mutate them) and read through `k8s-openapi` types
//! for the built-in kinds; KEDA and prometheus-operator objects are read as JSON.

pub mod catalogue;
pub mod network_policies;
pub mod promql;
pub mod security;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodTemplateSpec, Probe, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

pub use catalogue::Catalogue;

/// The scrape jobs the ServiceMonitors must produce.
pub const JOBS: [&str; 3] = ["kosmos-gateway", "kosmos-encoder", "kosmos-decoder"];

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Renders `k8s/overlays/<overlay>` with `kubectl kustomize`. `Ok(None)` when kubectl is missing and
/// `KOSMOS_SKIP_KUBECTL=1` asks to skip; an error naming the fix when it is missing otherwise.
pub fn render(overlay: &str) -> anyhow::Result<Option<String>> {
    let dir = repo_root().join("k8s/overlays").join(overlay);
    let output = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("KOSMOS_SKIP_KUBECTL").as_deref() == Ok("1") {
                eprintln!(
                    "kubectl not found and KOSMOS_SKIP_KUBECTL=1: skipping the manifest checks"
                );
                return Ok(None);
            }
            bail!(
                "kubectl is not on PATH: the manifest checks render k8s/overlays with `kubectl kustomize`. Install \
                 kubectl (any version with kustomize v5), or set KOSMOS_SKIP_KUBECTL=1 to skip these tests"
            );
        }
        Err(err) => return Err(err).context("running kubectl"),
    };
    if !output.status.success() {
        bail!(
            "kubectl kustomize {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(Some(
        String::from_utf8(output.stdout).context("kubectl output is not UTF-8")?,
    ))
}

/// Splits a multi-document YAML stream into JSON values (empty documents dropped).
pub fn parse_documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(document)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Expectations that differ between overlays.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// The encoder and decoder must each request an `nvidia.com/gpu`.
    pub gpu_pools: bool,
    /// TLS everywhere, mTLS to the pools, API keys and NetworkPolicies are required (components/security).
    pub secure: bool,
}

/// A named object with its namespace.
#[derive(Debug, Clone)]
pub struct Named<T> {
    /// `metadata.namespace` (empty when unset).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The object.
    pub object: T,
}

/// The rendered objects, by kind.
#[derive(Debug, Default)]
pub struct Manifests {
    /// Deployments.
    pub deployments: Vec<Named<Deployment>>,
    /// Services.
    pub services: Vec<Named<Service>>,
    /// PodDisruptionBudgets.
    pub pdbs: Vec<Named<PodDisruptionBudget>>,
    /// HorizontalPodAutoscalers (autoscaling/v2).
    pub hpas: Vec<Named<HorizontalPodAutoscaler>>,
    /// ConfigMaps.
    pub config_maps: Vec<Named<ConfigMap>>,
    /// KEDA ScaledObjects, as JSON.
    pub scaled_objects: Vec<Named<Value>>,
    /// prometheus-operator ServiceMonitors, as JSON.
    pub service_monitors: Vec<Named<Value>>,
    /// prometheus-operator PrometheusRules, as JSON.
    pub prometheus_rules: Vec<Named<Value>>,
    /// NetworkPolicies.
    pub network_policies: Vec<Named<NetworkPolicy>>,
    /// cert-manager Certificates, as JSON.
    pub certificates: Vec<Named<Value>>,
    /// cert-manager Issuers (namespaced), as JSON.
    pub issuers: Vec<Named<Value>>,
    /// Secrets, as JSON (their data is never read).
    pub secrets: Vec<Named<Value>>,
}

fn named<T: serde::de::DeserializeOwned>(doc: &Value) -> anyhow::Result<Named<T>> {
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let object = serde_json::from_value(doc.clone())
        .with_context(|| format!("{} {name}", doc["kind"].as_str().unwrap_or("object")))?;
    Ok(Named {
        namespace,
        name,
        object,
    })
}

impl Manifests {
    /// Sorts the documents by kind; built-in kinds are deserialised into `k8s-openapi` types (wrong types fail).
    pub fn from_documents(docs: &[Value]) -> anyhow::Result<Self> {
        let mut m = Self::default();
        for doc in docs {
            let api_version = doc["apiVersion"].as_str().unwrap_or_default();
            match (api_version, doc["kind"].as_str().unwrap_or_default()) {
                ("apps/v1", "Deployment") => m.deployments.push(named(doc)?),
                ("v1", "Service") => m.services.push(named(doc)?),
                ("policy/v1", "PodDisruptionBudget") => m.pdbs.push(named(doc)?),
                ("autoscaling/v2", "HorizontalPodAutoscaler") => m.hpas.push(named(doc)?),
                ("v1", "ConfigMap") => m.config_maps.push(named(doc)?),
                ("keda.sh/v1alpha1", "ScaledObject") => m.scaled_objects.push(named(doc)?),
                ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                    m.service_monitors.push(named(doc)?)
                }
                ("monitoring.coreos.com/v1", "PrometheusRule") => {
                    m.prometheus_rules.push(named(doc)?)
                }
                ("networking.k8s.io/v1", "NetworkPolicy") => m.network_policies.push(named(doc)?),
                ("cert-manager.io/v1", "Certificate") => m.certificates.push(named(doc)?),
                ("cert-manager.io/v1", "Issuer") => m.issuers.push(named(doc)?),
                ("v1", "Secret") => m.secrets.push(named(doc)?),
                _ => {}
            }
        }
        Ok(m)
    }

    /// Parses a rendered YAML stream.
    pub fn from_yaml(yaml: &str) -> anyhow::Result<Self> {
        Self::from_documents(&parse_documents(yaml)?)
    }

    /// Every check; the problems found, prefixed with the check's name.
    pub fn check_all(&self, catalogue: &Catalogue, profile: Profile) -> Vec<String> {
        let mut problems = Vec::new();
        let mut add = |check: &str, found: Vec<String>| {
            problems.extend(found.into_iter().map(|p| format!("[{check}] {p}")));
        };
        add("gpu-pools", self.check_gpu_pools());
        add("autoscaler-targets", self.check_autoscaler_targets());
        add("probes", self.check_probes());
        add("selectors", self.check_selectors());
        add("resources", self.check_resources(profile));
        add("upstreams", self.check_gateway_upstreams());
        add("shutdown", self.check_shutdown());
        add("rollout", self.check_rollout());
        add("scaledobject-shape", self.check_scaled_object_shape());
        add("service-monitors", self.check_service_monitors());
        add("metric-names", self.check_metric_names(catalogue));
        add("query-namespaces", self.check_query_namespaces());
        add("network-policies", self.check_network_policies(profile));
        add("tls", self.check_tls(profile));
        add("api-keys", self.check_api_keys(profile));
        add("memory-budget", self.check_memory_budget());
        problems
    }

    /// The pod template's `app.kubernetes.io/component` label.
    pub fn component(deployment: &Named<Deployment>) -> String {
        template(&deployment.object)
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.labels.as_ref())
            .and_then(|l| l.get("app.kubernetes.io/component"))
            .cloned()
            .unwrap_or_default()
    }

    fn deployment(&self, namespace: &str, name: &str) -> Option<&Named<Deployment>> {
        self.deployments
            .iter()
            .find(|d| d.namespace == namespace && d.name == name)
    }

    /// Every GPU Deployment (a container asks for `nvidia.com/gpu`) has a PDB selecting its pods and an autoscaler.
    pub fn check_gpu_pools(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for d in &self.deployments {
            let uses_gpu = containers(&d.object).iter().any(|c| {
                let r = c.resources.as_ref();
                [
                    r.and_then(|r| r.limits.as_ref()),
                    r.and_then(|r| r.requests.as_ref()),
                ]
                .into_iter()
                .flatten()
                .any(|m| m.contains_key("nvidia.com/gpu"))
            });
            if !uses_gpu {
                continue;
            }
            let labels = template_labels(&d.object);
            let has_pdb = self.pdbs.iter().any(|p| {
                p.namespace == d.namespace
                    && p.object
                        .spec
                        .as_ref()
                        .and_then(|s| s.selector.as_ref())
                        .is_some_and(|s| selector_matches(s, &labels))
            });
            if !has_pdb {
                problems.push(format!(
                    "GPU Deployment {}/{} has no PodDisruptionBudget selecting its pods",
                    d.namespace, d.name
                ));
            }
            if self.autoscalers_of(&d.namespace, &d.name).is_empty() {
                problems.push(format!(
                    "GPU Deployment {}/{} has no ScaledObject or HorizontalPodAutoscaler",
                    d.namespace, d.name
                ));
            }
        }
        problems
    }

    /// The autoscalers targeting Deployment `name`, as `kind/name`.
    fn autoscalers_of(&self, namespace: &str, name: &str) -> Vec<String> {
        let mut found = Vec::new();
        for so in &self.scaled_objects {
            let target = &so.object["spec"]["scaleTargetRef"];
            let kind = target["kind"].as_str().unwrap_or("Deployment");
            if so.namespace == namespace && kind == "Deployment" && target["name"] == name {
                found.push(format!("ScaledObject/{}", so.name));
            }
        }
        for hpa in &self.hpas {
            let target = hpa.object.spec.as_ref().map(|s| &s.scale_target_ref);
            if hpa.namespace == namespace
                && target.is_some_and(|t| t.kind == "Deployment" && t.name == name)
            {
                found.push(format!("HorizontalPodAutoscaler/{}", hpa.name));
            }
        }
        found
    }

    /// Every autoscaler targets an existing Deployment (apps/v1), and no Deployment has two autoscalers.
    pub fn check_autoscaler_targets(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut targets: Vec<(String, String, String)> = Vec::new();
        for so in &self.scaled_objects {
            let target = &so.object["spec"]["scaleTargetRef"];
            let kind = target["kind"].as_str().unwrap_or("Deployment");
            let api = target["apiVersion"].as_str().unwrap_or("apps/v1");
            let name = target["name"].as_str().unwrap_or_default();
            targets.push((
                so.namespace.clone(),
                format!("ScaledObject/{}", so.name),
                name.into(),
            ));
            if kind != "Deployment" || api != "apps/v1" {
                problems.push(format!(
                    "ScaledObject {}/{} targets {api} {kind}, expected apps/v1 Deployment",
                    so.namespace, so.name
                ));
            }
        }
        for hpa in &self.hpas {
            let Some(spec) = hpa.object.spec.as_ref() else {
                problems.push(format!("HPA {}/{} has no spec", hpa.namespace, hpa.name));
                continue;
            };
            let target = &spec.scale_target_ref;
            targets.push((
                hpa.namespace.clone(),
                format!("HorizontalPodAutoscaler/{}", hpa.name),
                target.name.clone(),
            ));
            if target.kind != "Deployment" || target.api_version.as_deref() != Some("apps/v1") {
                problems.push(format!(
                    "HPA {}/{} targets {:?} {}, expected apps/v1 Deployment",
                    hpa.namespace, hpa.name, target.api_version, target.kind
                ));
            }
        }
        for (namespace, autoscaler, name) in &targets {
            if self.deployment(namespace, name).is_none() {
                problems.push(format!(
                    "{autoscaler} in namespace `{namespace}` targets Deployment `{name}`, which does not exist"
                ));
            }
        }
        for d in &self.deployments {
            let owners = self.autoscalers_of(&d.namespace, &d.name);
            if owners.len() > 1 {
                problems.push(format!(
                    "Deployment {}/{} has {} autoscalers ({}); they would fight over its replicas",
                    d.namespace,
                    d.name,
                    owners.len(),
                    owners.join(", ")
                ));
            }
        }
        problems
    }

    /// Probe ports exist on the container; readiness probes gRPC `readiness`, liveness the server, startup
    /// `readiness` on the GPU pools and the server on the gateway.
    pub fn check_probes(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for d in &self.deployments {
            for c in containers(&d.object) {
                let at = format!("{}/{} container {}", d.namespace, d.name, c.name);
                let probes = [
                    ("startupProbe", c.startup_probe.as_ref()),
                    ("readinessProbe", c.readiness_probe.as_ref()),
                    ("livenessProbe", c.liveness_probe.as_ref()),
                ];
                for (kind, probe) in probes {
                    let Some(probe) = probe else {
                        problems.push(format!("{at}: no {kind}"));
                        continue;
                    };
                    problems.extend(
                        probe_port_problems(probe, c)
                            .into_iter()
                            .map(|p| format!("{at}: {kind} {p}")),
                    );
                    let Some(grpc) = probe.grpc.as_ref() else {
                        problems.push(format!("{at}: {kind} is not a native gRPC probe"));
                        continue;
                    };
                    let service = grpc.service.as_deref().unwrap_or_default();
                    // The gateway's startup is its process (its readiness depends on the decoder pool, which may
                    // be down or at zero for longer than any startup probe waits); a GPU replica's startup is its
                    // model load, which `readiness` reports.
                    let gateway_startup = kind == "startupProbe" && Self::component(d) == "gateway";
                    let expected = if kind == "livenessProbe" || gateway_startup {
                        ""
                    } else {
                        "readiness"
                    };
                    if service != expected {
                        problems.push(format!(
                            "{at}: {kind} asks for gRPC health service `{service}`, expected `{expected}`"
                        ));
                    }
                }
            }
        }
        problems
    }

    /// Deployment, Service and PDB selectors select pod template labels.
    pub fn check_selectors(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for d in &self.deployments {
            let labels = template_labels(&d.object);
            let selector = d.object.spec.as_ref().map(|s| &s.selector);
            if !selector.is_some_and(|s| selector_matches(s, &labels)) {
                problems.push(format!(
                    "Deployment {}/{}: its selector does not match its own pod template labels",
                    d.namespace, d.name
                ));
            }
        }
        for s in &self.services {
            let Some(selector) = s.object.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
                continue;
            };
            let matching: Vec<&Named<Deployment>> = self
                .deployments
                .iter()
                .filter(|d| {
                    d.namespace == s.namespace && map_matches(selector, &template_labels(&d.object))
                })
                .collect();
            if matching.is_empty() {
                problems.push(format!(
                    "Service {}/{} selects {selector:?}, which no Deployment's pods carry",
                    s.namespace, s.name
                ));
            }
            for port in s
                .object
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
            {
                let target = port
                    .target_port
                    .clone()
                    .unwrap_or(IntOrString::Int(port.port));
                for d in &matching {
                    if !containers(&d.object)
                        .iter()
                        .any(|c| container_has_port(c, &target))
                    {
                        problems.push(format!(
                            "Service {}/{} port {} targets {target:?}, which Deployment {} does not declare",
                            s.namespace, s.name, port.port, d.name
                        ));
                    }
                }
            }
        }
        for p in &self.pdbs {
            let selector = p.object.spec.as_ref().and_then(|s| s.selector.as_ref());
            let matches_any = self.deployments.iter().any(|d| {
                d.namespace == p.namespace
                    && selector.is_some_and(|s| selector_matches(s, &template_labels(&d.object)))
            });
            if !matches_any {
                problems.push(format!(
                    "PodDisruptionBudget {}/{} selects no Deployment's pods",
                    p.namespace, p.name
                ));
            }
        }
        problems
    }

    /// Every container requests and limits cpu and memory; GPU pools (encoder, decoder) ask for one GPU.
    pub fn check_resources(&self, profile: Profile) -> Vec<String> {
        let mut problems = Vec::new();
        for d in &self.deployments {
            let component = Self::component(d);
            for c in containers(&d.object) {
                let at = format!("{}/{} container {}", d.namespace, d.name, c.name);
                let r = c.resources.as_ref();
                let requests = r.and_then(|r| r.requests.clone()).unwrap_or_default();
                let limits = r.and_then(|r| r.limits.clone()).unwrap_or_default();
                for resource in ["cpu", "memory"] {
                    if !requests.contains_key(resource) {
                        problems.push(format!("{at}: no {resource} request"));
                    }
                    if !limits.contains_key(resource) {
                        problems.push(format!("{at}: no {resource} limit"));
                    }
                }
                if profile.gpu_pools && (component == "encoder" || component == "decoder") {
                    match (limits.get("nvidia.com/gpu"), requests.get("nvidia.com/gpu")) {
                        (None, _) => problems.push(format!("{at}: GPU pool without an nvidia.com/gpu limit")),
                        (Some(limit), Some(request)) if limit != request => problems.push(format!(
                            "{at}: nvidia.com/gpu request {request:?} differs from its limit {limit:?}"
                        )),
                        _ => {}
                    }
                }
            }
        }
        problems
    }

    /// The TOML text a Deployment's container reads (the ConfigMap key behind its `--config FILE` argument) and the
    /// environment of that container: the variables of its `envFrom` ConfigMaps, then its literal `env` values (which
    /// win, as in Kubernetes).
    pub fn config_file(
        &self,
        d: &Named<Deployment>,
    ) -> anyhow::Result<(String, Vec<(String, String)>)> {
        let c = containers(&d.object)
            .into_iter()
            .next()
            .context("no container")?;
        let args: Vec<&String> = c
            .command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .collect();
        let path = args
            .iter()
            .position(|a| *a == "--config")
            .and_then(|i| args.get(i + 1))
            .context("no `--config FILE` argument")?;
        let path = Path::new(path.as_str());
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| path.parent() == Some(Path::new(&m.mount_path)))
            .with_context(|| format!("no volume mounted at the directory of {}", path.display()))?;
        let volume = template(&d.object)
            .and_then(|t| t.spec.as_ref())
            .and_then(|s| s.volumes.as_ref())
            .and_then(|v| v.iter().find(|v| v.name == mount.name))
            .with_context(|| format!("no volume `{}`", mount.name))?;
        let cm_name = &volume
            .config_map
            .as_ref()
            .with_context(|| format!("volume `{}` is not a ConfigMap", mount.name))?
            .name;
        let cm = self
            .config_maps
            .iter()
            .find(|m| m.namespace == d.namespace && &m.name == cm_name)
            .with_context(|| format!("ConfigMap {}/{cm_name} does not exist", d.namespace))?;
        let key = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default();
        let text = cm
            .object
            .data
            .as_ref()
            .and_then(|data| data.get(key))
            .with_context(|| format!("ConfigMap {cm_name} has no key `{key}`"))?;
        let mut env = Vec::new();
        for source in c.env_from.iter().flatten() {
            let Some(reference) = source.config_map_ref.as_ref() else {
                continue;
            };
            let from = self
                .config_maps
                .iter()
                .find(|m| m.namespace == d.namespace && m.name == reference.name);
            let Some(from) = from else {
                if reference.optional != Some(true) {
                    bail!(
                        "envFrom ConfigMap {}/{} does not exist",
                        d.namespace,
                        reference.name
                    );
                }
                continue;
            };
            let prefix = source.prefix.clone().unwrap_or_default();
            for (name, value) in from.object.data.iter().flatten() {
                env.push((format!("{prefix}{name}"), value.clone()));
            }
        }
        env.extend(
            c.env
                .iter()
                .flatten()
                .filter_map(|e| Some((e.name.clone(), e.value.clone()?))),
        );
        Ok((text.clone(), env))
    }

    /// The service's effective configuration: its TOML file (from the ConfigMap behind `--config`) with the
    /// `KOSMOS_<SERVICE>__…` environment overrides of the container applied.
    pub fn effective_config(&self, d: &Named<Deployment>) -> anyhow::Result<toml::Table> {
        let (text, env) = self.config_file(d)?;
        let mut table: toml::Table = toml::from_str(&text).context("the config file")?;
        let prefix = format!("KOSMOS_{}__", Self::component(d).to_ascii_uppercase());
        for (name, value) in &env {
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            let parsed: toml::Value = serde_json::from_str::<Value>(value)
                .ok()
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_else(|| toml::Value::String(value.clone()));
            let keys: Vec<String> = rest
                .to_ascii_lowercase()
                .split("__")
                .map(str::to_string)
                .collect();
            set_path(&mut table, &keys, parsed);
        }
        Ok(table)
    }

    /// The gateway finds each pool through a headless Service that exists (name, namespace, port) and selects that
    /// pool's pods on a port they declare.
    pub fn check_gateway_upstreams(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let gateways: Vec<&Named<Deployment>> = self
            .deployments
            .iter()
            .filter(|d| Self::component(d) == "gateway")
            .collect();
        if gateways.is_empty() {
            problems.push("no gateway Deployment (app.kubernetes.io/component=gateway)".into());
        }
        for g in gateways {
            let config = match self.effective_config(g) {
                Ok(config) => config,
                Err(err) => {
                    problems.push(format!(
                        "gateway {}/{}: config: {err:#}",
                        g.namespace, g.name
                    ));
                    continue;
                }
            };
            for pool in ["encoder", "decoder"] {
                let at = format!("gateway {}/{} `{pool}`", g.namespace, g.name);
                let section = config.get(pool).and_then(toml::Value::as_table);
                let Some(dns) = section
                    .and_then(|s| s.get("dns"))
                    .and_then(toml::Value::as_str)
                else {
                    problems.push(format!(
                        "{at}: no `dns` name (a static list does not follow the pool's pods)"
                    ));
                    continue;
                };
                match self.resolve_upstream(dns, &g.namespace, pool) {
                    Ok(()) => {}
                    Err(err) => problems.push(format!("{at}: dns = \"{dns}\": {err}")),
                }
            }
        }
        problems
    }

    fn resolve_upstream(
        &self,
        dns: &str,
        gateway_namespace: &str,
        pool: &str,
    ) -> Result<(), String> {
        let (host, port) = dns.rsplit_once(':').ok_or("not host:port")?;
        let port: i32 = port
            .parse()
            .map_err(|_| format!("port `{port}` is not a number"))?;
        let host = host.trim_end_matches('.');
        let parts: Vec<&str> = host.split('.').collect();
        let (name, namespace) = match parts.as_slice() {
            [name] => (*name, gateway_namespace),
            [name, ns] | [name, ns, "svc"] | [name, ns, "svc", "cluster", "local"] => (*name, *ns),
            _ => {
                return Err(format!(
                    "`{host}` is not a Service name (name[.namespace[.svc[.cluster.local]]])"
                ));
            }
        };
        let service = self
            .services
            .iter()
            .find(|s| s.name == name && s.namespace == namespace)
            .ok_or_else(|| format!("no Service `{name}` in namespace `{namespace}`"))?;
        let spec = service.object.spec.as_ref().ok_or("Service without spec")?;
        if spec.cluster_ip.as_deref() != Some("None") {
            return Err(format!(
                "Service {namespace}/{name} is not headless (clusterIP: None)"
            ));
        }
        let service_port = spec
            .ports
            .iter()
            .flatten()
            .find(|p| p.port == port)
            .ok_or_else(|| format!("Service {namespace}/{name} has no port {port}"))?;
        let selector = spec.selector.clone().unwrap_or_default();
        let pods: Vec<&Named<Deployment>> = self
            .deployments
            .iter()
            .filter(|d| {
                d.namespace == namespace && map_matches(&selector, &template_labels(&d.object))
            })
            .collect();
        if !pods.iter().any(|d| Self::component(d) == pool) {
            return Err(format!(
                "Service {namespace}/{name} does not select the {pool} pods"
            ));
        }
        let target = service_port
            .target_port
            .clone()
            .unwrap_or(IntOrString::Int(port));
        for d in pods {
            if !containers(&d.object)
                .iter()
                .any(|c| container_has_port(c, &target))
            {
                return Err(format!(
                    "port {port} targets {target:?}, which {} does not declare",
                    d.name
                ));
            }
        }
        Ok(())
    }

    /// Pods stop gracefully: a preStop sleep, then the service's drain timeout, both within the grace period.
    pub fn check_shutdown(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for d in &self.deployments {
            let Some(spec) = template(&d.object).and_then(|t| t.spec.as_ref()) else {
                continue;
            };
            let grace = spec.termination_grace_period_seconds.unwrap_or(30);
            let Some(c) = containers(&d.object).into_iter().next() else {
                continue;
            };
            let Some(sleep) = c
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .and_then(|p| p.sleep.as_ref())
                .map(|s| s.seconds)
            else {
                problems.push(format!("{}/{}: no preStop sleep", d.namespace, d.name));
                continue;
            };
            let drain = match self.effective_config(d) {
                Ok(config) => config
                    .get("server")
                    .and_then(|s| s.get("drain_timeout_seconds"))
                    .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
                    .unwrap_or(match Self::component(d).as_str() {
                        "gateway" | "decoder" => 30.0,
                        _ => 0.0,
                    }),
                Err(err) => {
                    problems.push(format!("{}/{}: config: {err:#}", d.namespace, d.name));
                    continue;
                }
            };
            if (grace as f64) < sleep as f64 + drain {
                problems.push(format!(
                    "{}/{}: terminationGracePeriodSeconds {grace} < preStop sleep {sleep} + drain timeout {drain}",
                    d.namespace, d.name
                ));
            }
        }
        problems
    }

    /// A new model build rolls out without an outage (k8s/README.md, section 2): the encoder and decoder
    /// Deployments roll one new pod at a time without taking an old one away first (`RollingUpdate`,
    /// `maxUnavailable: 0`), and the headless Services the gateways resolve select no build-specific label
    /// (`app.kubernetes.io/version`, `pod-template-hash`), so pods of both builds (a rolling update, or a second
    /// Deployment with the same name and part-of labels) are replicas the gateways find and pin requests to.
    pub fn check_rollout(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for d in &self.deployments {
            if !matches!(Self::component(d).as_str(), "encoder" | "decoder") {
                continue;
            }
            let strategy = d.object.spec.as_ref().and_then(|s| s.strategy.as_ref());
            let kind = strategy
                .and_then(|s| s.type_.as_deref())
                .unwrap_or("RollingUpdate");
            let max_unavailable = strategy
                .and_then(|s| s.rolling_update.as_ref())
                .and_then(|r| r.max_unavailable.clone());
            let keeps_capacity = matches!(&max_unavailable, Some(IntOrString::Int(0)))
                || matches!(&max_unavailable, Some(IntOrString::String(v)) if v == "0%" || v == "0");
            if kind != "RollingUpdate" || !keeps_capacity {
                problems.push(format!(
                    "Deployment {}/{}: strategy {kind} with maxUnavailable {max_unavailable:?}: a rollout must add \
                     a new pod before it takes an old one away (RollingUpdate, maxUnavailable 0)",
                    d.namespace, d.name
                ));
            }
        }
        for s in &self.services {
            let Some(spec) = s.object.spec.as_ref() else {
                continue;
            };
            if spec.cluster_ip.as_deref() != Some("None") {
                continue;
            }
            for key in ["app.kubernetes.io/version", "pod-template-hash"] {
                if spec
                    .selector
                    .as_ref()
                    .is_some_and(|selector| selector.contains_key(key))
                {
                    problems.push(format!(
                        "Service {}/{} selects on `{key}`: the gateways would not find the other model build's pods",
                        s.namespace, s.name
                    ));
                }
            }
        }
        problems
    }

    /// ScaledObject triggers carry `metricType` (and `name`, `authenticationRef`, `useCachedMetrics`) at trigger
    /// level, not inside `metadata` (a string map KEDA would silently accept); a `fallback` only with AverageValue
    /// triggers, as KEDA's admission check demands; prometheus triggers have a query, server and threshold.
    pub fn check_scaled_object_shape(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for so in &self.scaled_objects {
            let at = format!("ScaledObject {}/{}", so.namespace, so.name);
            let spec = &so.object["spec"];
            let Some(triggers) = spec["triggers"].as_array() else {
                problems.push(format!("{at}: no triggers"));
                continue;
            };
            let has_fallback = !spec["fallback"].is_null();
            for (i, t) in triggers.iter().enumerate() {
                let at = format!(
                    "{at} trigger {i} ({})",
                    t["name"].as_str().unwrap_or("unnamed")
                );
                for key in [
                    "metricType",
                    "name",
                    "authenticationRef",
                    "useCachedMetrics",
                ] {
                    if !t["metadata"][key].is_null() {
                        problems.push(format!(
                            "{at}: `{key}` is inside `metadata`; it belongs on the trigger"
                        ));
                    }
                }
                let metric_type = t["metricType"].as_str();
                if let Some(mt) = metric_type
                    && !["AverageValue", "Value", "Utilization"].contains(&mt)
                {
                    problems.push(format!(
                        "{at}: metricType `{mt}` is not AverageValue, Value or Utilization"
                    ));
                }
                let kind = t["type"].as_str().unwrap_or_default();
                if has_fallback
                    && (kind == "cpu" || kind == "memory" || metric_type != Some("AverageValue"))
                {
                    problems.push(format!(
                        "{at}: a fallback needs every trigger to be a non-cpu/memory trigger with metricType: \
                         AverageValue (KEDA refuses the object otherwise)"
                    ));
                }
                if kind == "prometheus" {
                    for key in ["serverAddress", "query", "threshold"] {
                        if !t["metadata"][key].is_string() {
                            problems.push(format!("{at}: metadata.{key} missing or not a string"));
                        }
                    }
                }
            }
        }
        problems
    }

    /// Each ServiceMonitor selects a Service with the scraped port, and `job` comes out as a kosmos-* job.
    pub fn check_service_monitors(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for sm in &self.service_monitors {
            let at = format!("ServiceMonitor {}/{}", sm.namespace, sm.name);
            let spec = &sm.object["spec"];
            let selector: BTreeMap<String, String> =
                serde_json::from_value(spec["selector"]["matchLabels"].clone()).unwrap_or_default();
            let services: Vec<&Named<Service>> = self
                .services
                .iter()
                .filter(|s| {
                    s.namespace == sm.namespace
                        && map_matches(
                            &selector,
                            &s.object.metadata.labels.clone().unwrap_or_default(),
                        )
                })
                .collect();
            if services.is_empty() {
                problems.push(format!("{at}: selects no Service"));
            }
            let job_label = spec["jobLabel"].as_str();
            if job_label.is_none() {
                problems.push(format!(
                    "{at}: no jobLabel (job would fall back to the Service name)"
                ));
            }
            for s in &services {
                let labels = s.object.metadata.labels.clone().unwrap_or_default();
                let job = job_label
                    .and_then(|l| labels.get(l))
                    .map(String::as_str)
                    .unwrap_or(s.name.as_str());
                if !JOBS.contains(&job) {
                    problems.push(format!(
                        "{at}: job would be `{job}` for Service {}, not one of {JOBS:?}",
                        s.name
                    ));
                }
                for endpoint in spec["endpoints"].as_array().into_iter().flatten() {
                    let port = endpoint["port"].as_str().unwrap_or_default();
                    let declared = s
                        .object
                        .spec
                        .as_ref()
                        .and_then(|s| s.ports.as_ref())
                        .is_some_and(|ports| ports.iter().any(|p| p.name.as_deref() == Some(port)));
                    if !declared {
                        problems.push(format!(
                            "{at}: endpoint port `{port}` is not a port of Service {}",
                            s.name
                        ));
                    }
                }
            }
        }
        problems
    }

    /// Every metric an autoscaler, a ServiceMonitor relabeling or a rule reads is one the services export
    /// (docs/metrics.md), by the job the selector names.
    pub fn check_metric_names(&self, catalogue: &Catalogue) -> Vec<String> {
        let mut problems = Vec::new();
        let check = |at: &str, name: &str, job: Option<&str>, allowed: &[String]| {
            if allowed.iter().any(|a| a == name) || catalogue.exports(name, job) {
                return None;
            }
            let by = job.map(|j| format!(" by job `{j}`")).unwrap_or_default();
            Some(format!(
                "{at}: `{name}` is not exported{by} (docs/metrics.md)"
            ))
        };
        for so in &self.scaled_objects {
            for t in so.object["spec"]["triggers"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let Some(query) = t["metadata"]["query"].as_str() else {
                    continue;
                };
                let at = format!("ScaledObject {}/{} query", so.namespace, so.name);
                match promql::selectors(query) {
                    Ok(selectors) => {
                        for s in selectors {
                            problems.extend(check(&at, &s.name, s.equal("job"), &[]));
                        }
                    }
                    Err(err) => problems.push(format!("{at}: {err:#}")),
                }
            }
        }
        for hpa in &self.hpas {
            let at = format!("HPA {}/{}", hpa.namespace, hpa.name);
            for metric in hpa
                .object
                .spec
                .iter()
                .flat_map(|s| s.metrics.iter().flatten())
            {
                let ids = [
                    metric.external.as_ref().map(|m| &m.metric),
                    metric.pods.as_ref().map(|m| &m.metric),
                    metric.object.as_ref().map(|m| &m.metric),
                ];
                for id in ids.into_iter().flatten() {
                    let job = id
                        .selector
                        .as_ref()
                        .and_then(|s| s.match_labels.as_ref())
                        .and_then(|l| l.get("job"))
                        .map(String::as_str);
                    problems.extend(check(&at, &id.name, job, &[]));
                }
            }
        }
        for sm in &self.service_monitors {
            let at = format!(
                "ServiceMonitor {}/{} metricRelabelings",
                sm.namespace, sm.name
            );
            let job = JOBS.contains(&sm.name.as_str()).then_some(sm.name.as_str());
            for endpoint in sm.object["spec"]["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
            {
                for r in endpoint["metricRelabelings"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let sources: Vec<&str> = r["sourceLabels"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let Some(index) = sources.iter().position(|s| *s == "__name__") else {
                        continue;
                    };
                    let separator = r["separator"].as_str().unwrap_or(";");
                    let regex = r["regex"].as_str().unwrap_or("(.*)");
                    let part = regex.split(separator).nth(index).unwrap_or_default();
                    match promql::alternatives(part) {
                        Ok(names) => {
                            for name in names {
                                problems.extend(check(&at, &name, job, &[]));
                            }
                        }
                        Err(err) => problems.push(format!("{at}: {err:#}")),
                    }
                }
            }
        }
        // Rules may read their own recorded series, Prometheus' own and kube-state-metrics' series.
        let mut recorded: Vec<String> = ["up", "ALERTS", "ALERTS_FOR_STATE"]
            .map(String::from)
            .to_vec();
        for rule in self.rules() {
            if let Some(record) = rule["record"].as_str() {
                recorded.push(record.to_string());
            }
        }
        for pr in &self.prometheus_rules {
            for rule in pr.object["spec"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            {
                let Some(expr) = rule["expr"].as_str() else {
                    continue;
                };
                let at = format!(
                    "PrometheusRule {}/{} {}",
                    pr.namespace,
                    pr.name,
                    rule["record"]
                        .as_str()
                        .or(rule["alert"].as_str())
                        .unwrap_or("rule")
                );
                match promql::selectors(expr) {
                    Ok(selectors) => {
                        for s in selectors {
                            if s.name.starts_with("kube_") {
                                continue;
                            }
                            problems.extend(check(&at, &s.name, s.equal("job"), &recorded));
                        }
                    }
                    Err(err) => problems.push(format!("{at}: {err:#}")),
                }
            }
        }
        problems
    }

    fn rules(&self) -> Vec<&Value> {
        self.prometheus_rules
            .iter()
            .flat_map(|pr| pr.object["spec"]["groups"].as_array().into_iter().flatten())
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect()
    }

    /// A `namespace="…"` matcher in an autoscaler query names the autoscaler's own namespace (kustomize's namespace
    /// transformer does not rewrite queries).
    pub fn check_query_namespaces(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for so in &self.scaled_objects {
            for t in so.object["spec"]["triggers"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let Some(query) = t["metadata"]["query"].as_str() else {
                    continue;
                };
                for s in promql::selectors(query).unwrap_or_default() {
                    if let Some(ns) = s.equal("namespace")
                        && ns != so.namespace
                    {
                        problems.push(format!(
                            "ScaledObject {}/{}: query reads namespace=\"{ns}\" but the object is in `{}`",
                            so.namespace, so.name, so.namespace
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// Sets `keys` (a dotted path) in `table`, creating tables on the way, as the services' config loader does.
fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) {
    match keys {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let Some(inner) = entry.as_table_mut() {
                set_path(inner, rest, value);
            }
        }
    }
}

fn template(d: &Deployment) -> Option<&PodTemplateSpec> {
    d.spec.as_ref().map(|s| &s.template)
}

fn template_labels(d: &Deployment) -> BTreeMap<String, String> {
    template(d)
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn containers(d: &Deployment) -> Vec<&Container> {
    template(d)
        .and_then(|t| t.spec.as_ref())
        .map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .collect()
        })
        .unwrap_or_default()
}

fn map_matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `matchLabels` and `matchExpressions` (In, NotIn, Exists, DoesNotExist); an empty selector matches nothing here
/// (for our objects it would be a mistake).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let match_labels = selector.match_labels.clone().unwrap_or_default();
    let expressions = selector.match_expressions.clone().unwrap_or_default();
    if match_labels.is_empty() && expressions.is_empty() {
        return false;
    }
    match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && expressions.iter().all(|e| {
            let value = labels.get(&e.key);
            let values = e.values.clone().unwrap_or_default();
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

fn container_has_port(c: &Container, port: &IntOrString) -> bool {
    c.ports.iter().flatten().any(|p| match port {
        IntOrString::Int(n) => p.container_port == *n,
        IntOrString::String(name) => p.name.as_deref() == Some(name.as_str()),
    })
}

fn probe_port_problems(probe: &Probe, c: &Container) -> Vec<String> {
    let port = if let Some(grpc) = &probe.grpc {
        Some(IntOrString::Int(grpc.port))
    } else if let Some(http) = &probe.http_get {
        Some(http.port.clone())
    } else {
        probe.tcp_socket.as_ref().map(|t| t.port.clone())
    };
    match port {
        Some(port) if !container_has_port(c, &port) => {
            vec![format!("port {port:?} is not a container port")]
        }
        _ => Vec::new(),
    }
}
