//! NetworkPolicy checks (issue 13): default deny in every namespace with a Deployment, each pool's gRPC port open
//! to the gateway's pods and no one else, every `/metrics` port to the monitoring namespace and no one else, the
//! gateway's public port open, DNS and the pools reachable from egress-isolated pods.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Container;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::security::{POOLS, Pod};
use crate::{Manifests, Profile, selector_matches};

/// The namespace Prometheus scrapes from (kube-prometheus-stack installed as k8s/README.md says).
pub const MONITORING_NAMESPACE: &str = "monitoring";

/// The label every namespace carries with its own name (Kubernetes >= 1.22).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

fn is_empty_selector(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}

/// A NetworkPolicy's `podSelector` selects `labels`; an empty or absent one selects every pod of the namespace.
fn policy_selects(np: &NetworkPolicy, labels: &BTreeMap<String, String>) -> bool {
    match np.spec.as_ref().and_then(|s| s.pod_selector.as_ref()) {
        None => true,
        Some(selector) if is_empty_selector(selector) => true,
        Some(selector) => selector_matches(selector, labels),
    }
}

/// Whether the policy isolates `direction` (`Ingress` or `Egress`); without `policyTypes`, Ingress always and
/// Egress when it has egress rules (the API's defaulting).
fn isolates(np: &NetworkPolicy, direction: &str) -> bool {
    let Some(spec) = np.spec.as_ref() else {
        return false;
    };
    match &spec.policy_types {
        Some(types) => types.iter().any(|t| t == direction),
        None => direction == "Ingress" || spec.egress.is_some(),
    }
}

/// Whether a rule's `ports` (absent or empty: every port) allow `port`/`protocol` on container `c` (named ports
/// are resolved against it).
fn ports_allow(
    ports: Option<&Vec<NetworkPolicyPort>>,
    port: i32,
    protocol: &str,
    c: Option<&Container>,
) -> bool {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return true;
    };
    ports.iter().any(|p| {
        p.protocol.as_deref().unwrap_or("TCP") == protocol
            && match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => {
                    *n == port || p.end_port.is_some_and(|end| *n <= port && port <= end)
                }
                Some(IntOrString::String(name)) => c.is_some_and(|c| {
                    c.ports
                        .iter()
                        .flatten()
                        .any(|cp| cp.name.as_deref() == Some(name) && cp.container_port == port)
                }),
            }
    })
}

fn describe_peer(peer: &NetworkPolicyPeer) -> String {
    let mut parts = Vec::new();
    if let Some(block) = &peer.ip_block {
        parts.push(format!("ipBlock {}", block.cidr));
    }
    if let Some(ns) = &peer.namespace_selector {
        parts.push(format!(
            "namespaceSelector {:?}",
            ns.match_labels.clone().unwrap_or_default()
        ));
    }
    if let Some(pods) = &peer.pod_selector {
        parts.push(format!(
            "podSelector {:?}",
            pods.match_labels.clone().unwrap_or_default()
        ));
    }
    parts.join(" + ")
}

/// One ingress rule that lets traffic reach a pod's port: the policy's name and the rule's sources (`None`: every
/// source).
struct Admission<'a> {
    policy: &'a str,
    from: Option<&'a Vec<NetworkPolicyPeer>>,
}

impl Manifests {
    /// The ingress rules that admit someone to `pod`'s TCP `port`.
    fn admissions<'a>(&'a self, pod: &Pod<'a>, port: i32) -> Vec<Admission<'a>> {
        let mut found = Vec::new();
        for np in &self.network_policies {
            if np.namespace != pod.namespace()
                || !isolates(&np.object, "Ingress")
                || !policy_selects(&np.object, &pod.labels)
            {
                continue;
            }
            for rule in np
                .object
                .spec
                .iter()
                .flat_map(|s| s.ingress.iter().flatten())
            {
                if ports_allow(rule.ports.as_ref(), port, "TCP", pod.container) {
                    found.push(Admission {
                        policy: &np.name,
                        from: rule.from.as_ref().filter(|f| !f.is_empty()),
                    });
                }
            }
        }
        found
    }

    /// Default deny in every namespace with a Deployment; each pool's gRPC port admits the gateway's pods and no one
    /// else; every `/metrics` port admits the monitoring namespace and no one else; the gateway's gRPC port admits
    /// someone; egress-isolated pods may resolve names, and the gateway may reach both pools.
    pub fn check_network_policies(&self, profile: Profile) -> Vec<String> {
        if !profile.secure {
            return Vec::new();
        }
        let (pods, mut problems) = self.pods();
        let mut namespaces: Vec<&str> = pods.iter().map(Pod::namespace).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        for ns in namespaces {
            let default_deny = self.network_policies.iter().any(|np| {
                let Some(spec) = np.object.spec.as_ref() else {
                    return false;
                };
                np.namespace == ns
                    && spec.pod_selector.as_ref().is_none_or(is_empty_selector)
                    && isolates(&np.object, "Ingress")
                    && isolates(&np.object, "Egress")
                    && spec.ingress.as_ref().is_none_or(Vec::is_empty)
                    && spec.egress.as_ref().is_none_or(Vec::is_empty)
            });
            if !default_deny {
                problems.push(format!(
                    "namespace `{ns}` has no default-deny NetworkPolicy (podSelector {{}}, policyTypes Ingress and \
                     Egress, no rules)"
                ));
            }
        }
        for pod in &pods {
            let gateways: Vec<&Pod> = pods
                .iter()
                .filter(|p| p.namespace() == pod.namespace() && p.component == "gateway")
                .collect();
            let others: Vec<&Pod> = pods
                .iter()
                .filter(|p| p.namespace() == pod.namespace() && p.component != "gateway")
                .collect();
            // A source is the gateway when it is a podSelector of this namespace that selects the gateway's pods
            // and no other Deployment's.
            let is_gateway = |peer: &NetworkPolicyPeer| {
                peer.ip_block.is_none()
                    && peer.namespace_selector.is_none()
                    && peer.pod_selector.as_ref().is_some_and(|s| {
                        !is_empty_selector(s)
                            && gateways.iter().any(|g| selector_matches(s, &g.labels))
                            && !others.iter().any(|o| selector_matches(s, &o.labels))
                    })
            };
            let is_monitoring = |peer: &NetworkPolicyPeer| {
                peer.ip_block.is_none()
                    && peer.namespace_selector.as_ref().is_some_and(|s| {
                        s.match_labels
                            .as_ref()
                            .and_then(|l| l.get(NAMESPACE_NAME_LABEL))
                            .is_some_and(|n| n == MONITORING_NAMESPACE)
                    })
            };
            let mut only = |port: i32, what: &str, allowed: &dyn Fn(&NetworkPolicyPeer) -> bool| {
                let admissions = self.admissions(pod, port);
                for a in &admissions {
                    match a.from {
                        None => problems.push(format!(
                            "{} {what} port {port}: NetworkPolicy {} admits every source",
                            pod.at(),
                            a.policy
                        )),
                        Some(from) => {
                            for peer in from.iter().filter(|p| !allowed(p)) {
                                problems.push(format!(
                                    "{} {what} port {port}: NetworkPolicy {} admits {}",
                                    pod.at(),
                                    a.policy,
                                    describe_peer(peer)
                                ));
                            }
                        }
                    }
                }
                if !admissions
                    .iter()
                    .any(|a| a.from.is_some_and(|f| f.iter().any(allowed)))
                {
                    problems.push(format!(
                        "{} {what} port {port}: no NetworkPolicy admits its only client",
                        pod.at()
                    ));
                }
            };
            if POOLS.contains(&pod.component.as_str()) {
                only(pod.grpc_port(), "gRPC (gateway only)", &is_gateway);
            }
            only(
                pod.metrics_port(),
                "/metrics (monitoring only)",
                &is_monitoring,
            );
            if pod.component == "gateway" && self.admissions(pod, pod.grpc_port()).is_empty() {
                problems.push(format!(
                    "{} gRPC port {}: no NetworkPolicy admits clients to the public API",
                    pod.at(),
                    pod.grpc_port()
                ));
            }
            if let Some(http) = pod.http_port().filter(|_| pod.component == "gateway")
                && self.admissions(pod, http).is_empty()
            {
                problems.push(format!(
                    "{} HTTP port {http} (`http.listen`): no NetworkPolicy admits clients to the HTTP API",
                    pod.at()
                ));
            }
            problems.extend(self.egress_problems(pod, &pods));
        }
        problems
    }

    /// An egress-isolated pod may reach DNS; an egress-isolated gateway may reach each pool's gRPC port.
    fn egress_problems(&self, pod: &Pod<'_>, pods: &[Pod<'_>]) -> Vec<String> {
        let policies: Vec<&NetworkPolicy> = self
            .network_policies
            .iter()
            .filter(|np| {
                np.namespace == pod.namespace()
                    && isolates(&np.object, "Egress")
                    && policy_selects(&np.object, &pod.labels)
            })
            .map(|np| &np.object)
            .collect();
        if policies.is_empty() {
            return Vec::new();
        }
        let rules: Vec<_> = policies
            .iter()
            .flat_map(|np| np.spec.iter().flat_map(|s| s.egress.iter().flatten()))
            .collect();
        let mut problems = Vec::new();
        if !rules
            .iter()
            .any(|r| ports_allow(r.ports.as_ref(), 53, "UDP", None))
        {
            problems.push(format!(
                "{}: egress is isolated but allows no DNS (UDP 53)",
                pod.at()
            ));
        }
        if pod.component == "gateway" {
            for pool in pods.iter().filter(|p| {
                p.namespace() == pod.namespace() && POOLS.contains(&p.component.as_str())
            }) {
                let reaches = rules.iter().any(|r| {
                    ports_allow(r.ports.as_ref(), pool.grpc_port(), "TCP", pool.container)
                        && r.to.as_ref().filter(|t| !t.is_empty()).is_none_or(|to| {
                            to.iter().any(|peer| {
                                peer.ip_block.is_none()
                                    && peer.namespace_selector.is_none()
                                    && peer
                                        .pod_selector
                                        .as_ref()
                                        .is_some_and(|s| selector_matches(s, &pool.labels))
                            })
                        })
                });
                if !reaches {
                    problems.push(format!(
                        "{}: egress does not allow the {} pods on port {}",
                        pod.at(),
                        pool.component,
                        pool.grpc_port()
                    ));
                }
            }
        }
        problems
    }
}
