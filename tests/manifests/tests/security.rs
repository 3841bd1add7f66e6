//! The checks of components/security (issue 13) on the prod overlays: each mutation of a copy of the rendered YAML
//! — a pool opened to other pods, a TLS file from no Certificate, a subPath mount, a probe on the TLS port, a
//! committed API keys Secret, … — must be caught by the check that targets it.

mod common;

use common::*;
use kosmos_manifests::Manifests;
use serde_json::{Value, json};

/// Sets (or, with `None`, removes) variable `name` of the envFrom ConfigMap `config_map` (`kosmos-<svc>-security`).
fn security_env(docs: &mut [Value], config_map: &str, name: &str, value: Option<&str>) {
    let data = object(docs, "ConfigMap", config_map)["data"]
        .as_object_mut()
        .expect("data");
    match value {
        Some(value) => {
            data.insert(name.into(), json!(value));
        }
        None => {
            assert!(data.remove(name).is_some(), "{config_map} has {name}");
        }
    }
}

fn policy_rule<'a>(
    docs: &'a mut [Value],
    policy: &str,
    direction: &str,
    index: usize,
) -> &'a mut Value {
    &mut object(docs, "NetworkPolicy", policy)["spec"][direction][index]
}

fn volume<'a>(docs: &'a mut [Value], deployment: &str, name: &str) -> &'a mut Value {
    object(docs, "Deployment", deployment)["spec"]["template"]["spec"]["volumes"]
        .as_array_mut()
        .expect("volumes")
        .iter_mut()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

fn mount<'a>(docs: &'a mut [Value], deployment: &str, name: &str) -> &'a mut Value {
    container(docs, deployment)["volumeMounts"]
        .as_array_mut()
        .expect("volumeMounts")
        .iter_mut()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no volumeMount {name}"))
}

#[test]
fn dev_fails_the_secure_profile() {
    // The secure checks are not vacuous: the plaintext dev overlay trips each of them.
    let Some(docs) = rendered("dev") else { return };
    let m = manifests(&docs);
    let problems = m.check_network_policies(PROD);
    assert!(
        problems.iter().any(|p| p.contains("no default-deny")),
        "{problems:#?}"
    );
    let problems = m.check_tls(PROD);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("no `tls.client_ca_file`")),
        "{problems:#?}"
    );
    let problems = m.check_api_keys(PROD);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("no `auth.api_keys_file`")),
        "{problems:#?}"
    );
}

// network-policies

#[test]
fn a_namespace_without_default_deny_is_caught() {
    assert_caught(
        "prod",
        |docs| remove(docs, "NetworkPolicy", "kosmos-default-deny"),
        |m| m.check_network_policies(PROD),
        "namespace `kosmos` has no default-deny NetworkPolicy",
    );
}

#[test]
fn a_gateway_http_port_no_policy_admits_is_caught() {
    // The ingress rule of the public API without the HTTP API's port: the API would be unreachable.
    assert_caught(
        "prod",
        |docs| {
            policy_rule(docs, "kosmos-gateway", "ingress", 0)["ports"] =
                json!([{"protocol": "TCP", "port": 50051}])
        },
        |m| m.check_network_policies(PROD),
        "kosmos/kosmos-gateway HTTP port 8000 (`http.listen`): no NetworkPolicy admits clients to the HTTP API",
    );
}

#[test]
fn a_pool_open_to_other_sources_is_caught() {
    // Every pod of the application, not only the gateway's.
    assert_caught(
        "prod",
        |docs| {
            policy_rule(docs, "kosmos-encoder", "ingress", 0)["from"][0]["podSelector"]["matchLabels"] =
                json!({"app.kubernetes.io/part-of": "kosmos"})
        },
        |m| m.check_network_policies(PROD),
        "kosmos/kosmos-encoder gRPC (gateway only) port 50052: NetworkPolicy kosmos-encoder admits podSelector",
    );
    // A rule without `from`: everyone.
    assert_caught(
        "prod-hpa",
        |docs| {
            policy_rule(docs, "kosmos-decoder", "ingress", 0)
                .as_object_mut()
                .expect("rule")
                .remove("from");
        },
        |m| m.check_network_policies(PROD),
        "kosmos/kosmos-decoder gRPC (gateway only) port 50053: NetworkPolicy kosmos-decoder admits every source",
    );
    // The gateway's pods of every namespace.
    assert_caught(
        "prod",
        |docs| {
            policy_rule(docs, "kosmos-decoder", "ingress", 0)["from"][0]["namespaceSelector"] =
                json!({})
        },
        |m| m.check_network_policies(PROD),
        "NetworkPolicy kosmos-decoder admits namespaceSelector",
    );
    // Another policy that opens every port of the pools to the namespace.
    assert_caught(
        "prod",
        |docs| {
            docs.push(json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "allow-same-namespace", "namespace": "kosmos"},
                "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}
            }))
        },
        |m| m.check_network_policies(PROD),
        "port 50052: NetworkPolicy allow-same-namespace admits podSelector {}",
    );
}

#[test]
fn a_pool_the_gateway_cannot_reach_is_caught() {
    assert_caught(
        "prod",
        |docs| remove(docs, "NetworkPolicy", "kosmos-decoder"),
        |m| m.check_network_policies(PROD),
        "kosmos/kosmos-decoder gRPC (gateway only) port 50053: no NetworkPolicy admits its only client",
    );
    assert_caught(
        "prod",
        |docs| {
            object(docs, "NetworkPolicy", "kosmos-gateway")["spec"]["egress"]
                .as_array_mut()
                .expect("egress")
                .remove(0);
        },
        |m| m.check_network_policies(PROD),
        "kosmos/kosmos-gateway: egress does not allow the encoder pods on port 50052",
    );
    assert_caught(
        "prod",
        |docs| remove(docs, "NetworkPolicy", "kosmos-egress"),
        |m| m.check_network_policies(PROD),
        "egress is isolated but allows no DNS (UDP 53)",
    );
}

#[test]
fn metrics_open_beyond_the_monitoring_namespace_are_caught() {
    assert_caught(
        "prod",
        |docs| {
            policy_rule(docs, "kosmos-gateway", "ingress", 1)["from"][0]["namespaceSelector"]["matchLabels"]
                ["kubernetes.io/metadata.name"] = json!("default")
        },
        |m| m.check_network_policies(PROD),
        "kosmos/kosmos-gateway /metrics (monitoring only) port 9090: NetworkPolicy kosmos-gateway admits \
         namespaceSelector",
    );
    // The gateway's public rule widened to every port exposes /metrics too.
    assert_caught(
        "prod",
        |docs| {
            policy_rule(docs, "kosmos-gateway", "ingress", 0)
                .as_object_mut()
                .expect("rule")
                .remove("ports");
        },
        |m| m.check_network_policies(PROD),
        "kosmos/kosmos-gateway /metrics (monitoring only) port 9090: NetworkPolicy kosmos-gateway admits every \
         source",
    );
}

// tls

#[test]
fn a_tls_file_from_no_certificate_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            volume(docs, "kosmos-gateway", "tls")["secret"]["secretName"] = json!("gateway-certs")
        },
        |m| m.check_tls(PROD),
        "comes from Secret `gateway-certs`, which no Certificate in namespace `kosmos` writes",
    );
    assert_caught(
        "prod",
        |docs| {
            security_env(
                docs,
                "kosmos-encoder-security",
                "KOSMOS_ENCODER__TLS__CLIENT_CA_FILE",
                Some("/etc/kosmos/ca.crt"),
            )
        },
        |m| m.check_tls(PROD),
        "`tls.client_ca_file`: /etc/kosmos/ca.crt lies in volume `config`, which is not a Secret",
    );
    assert_caught(
        "prod",
        |docs| {
            security_env(
                docs,
                "kosmos-decoder-security",
                "KOSMOS_DECODER__TLS__KEY_FILE",
                Some("/etc/kosmos-tls/tls.crt"),
            )
        },
        |m| m.check_tls(PROD),
        "`tls.key_file` = /etc/kosmos-tls/tls.crt is key `tls.crt` of Secret `kosmos-decoder-tls`, expected `tls.key`",
    );
}

#[test]
fn a_tls_secret_mounted_with_sub_path_is_caught() {
    assert_caught(
        "prod",
        |docs| mount(docs, "kosmos-encoder", "tls")["subPath"] = json!("tls.crt"),
        |m| m.check_tls(PROD),
        "is mounted with subPath (volume `tls`)",
    );
}

#[test]
fn a_pool_without_mtls_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            security_env(
                docs,
                "kosmos-decoder-security",
                "KOSMOS_DECODER__TLS__CLIENT_CA_FILE",
                None,
            )
        },
        |m| m.check_tls(PROD),
        "kosmos/kosmos-decoder: no `tls.client_ca_file`",
    );
}

#[test]
fn a_server_name_the_pool_certificate_lacks_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            security_env(
                docs,
                "kosmos-gateway-security",
                "KOSMOS_GATEWAY__ENCODER__TLS__SERVER_NAME",
                Some("kosmos-encoder.kosmos-dev.svc"),
            )
        },
        |m| m.check_tls(PROD),
        "`encoder.tls`: server_name `kosmos-encoder.kosmos-dev.svc` is not a DNS name of Certificate kosmos-encoder-tls",
    );
}

#[test]
fn a_gateway_certificate_without_client_auth_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            object(docs, "Certificate", "kosmos-gateway-tls")["spec"]["usages"] =
                json!(["digital signature", "server auth"])
        },
        |m| m.check_tls(PROD),
        "client Certificate kosmos-gateway-tls has no `client auth` usage",
    );
    assert_caught(
        "prod",
        |docs| {
            object(docs, "Certificate", "kosmos-encoder-tls")["spec"]["usages"] =
                json!(["digital signature", "client auth"])
        },
        |m| m.check_tls(PROD),
        "Certificate kosmos-encoder-tls has no `server auth` usage",
    );
}

#[test]
fn certificates_from_different_issuers_are_caught() {
    assert_caught(
        "prod",
        |docs| {
            object(docs, "Certificate", "kosmos-decoder-tls")["spec"]["issuerRef"]["name"] =
                json!("kosmos-selfsigned")
        },
        |m| m.check_tls(PROD),
        "`decoder.tls`: ca_file is the CA of Issuer/kosmos-ca, but kosmos-decoder's certificate comes from \
         Issuer/kosmos-selfsigned",
    );
    assert_caught(
        "prod",
        |docs| {
            object(docs, "Certificate", "kosmos-encoder-tls")["spec"]["issuerRef"]["name"] =
                json!("kosmos-ca-2")
        },
        |m| m.check_tls(PROD),
        "issuerRef names Issuer `kosmos-ca-2`, which does not exist in namespace `kosmos`",
    );
    assert_caught(
        "prod",
        |docs| {
            object(docs, "Certificate", "kosmos-ca")["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("isCA");
        },
        |m| m.check_tls(PROD),
        "Issuer kosmos/kosmos-ca: CA Secret `kosmos-ca` is written by no `isCA: true` Certificate",
    );
}

#[test]
fn a_dns_name_in_another_namespace_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            object(docs, "Certificate", "kosmos-decoder-tls")["spec"]["dnsNames"][1] =
                json!("kosmos-decoder.kosmos-dev.svc")
        },
        |m| m.check_tls(PROD),
        "DNS name `kosmos-decoder.kosmos-dev.svc` names namespace `kosmos-dev`",
    );
}

// probes with TLS

#[test]
fn a_probe_on_the_tls_port_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            let c = container(docs, "kosmos-gateway");
            c["livenessProbe"]["grpc"]["port"] = json!(50051);
        },
        |m| m.check_tls(PROD),
        "livenessProbe asks port 50051, not the plaintext health port 8081",
    );
    assert_caught(
        "prod",
        |docs| {
            security_env(
                docs,
                "kosmos-encoder-security",
                "KOSMOS_ENCODER__SERVER__HEALTH_LISTEN",
                None,
            )
        },
        |m| m.check_tls(PROD),
        "kosmos/kosmos-encoder: TLS on gRPC port 50052 but no `server.health_listen`",
    );
}

// api-keys

#[test]
fn api_keys_unmounted_or_committed_are_caught() {
    assert_caught(
        "prod",
        |docs| {
            container(docs, "kosmos-gateway")["volumeMounts"]
                .as_array_mut()
                .expect("volumeMounts")
                .retain(|m| m["name"] != "api-keys");
        },
        |m| m.check_api_keys(PROD),
        "`auth.api_keys_file`: /etc/kosmos-api-keys/api-keys.toml lies in no mounted volume",
    );
    assert_caught(
        "prod",
        |docs| {
            volume(docs, "kosmos-gateway", "api-keys")["secret"]["items"][0]["path"] =
                json!("keys.toml")
        },
        |m| m.check_api_keys(PROD),
        "projects no item at `api-keys.toml`",
    );
    assert_caught(
        "prod",
        |docs| {
            docs.push(json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "kosmos-api-keys", "namespace": "kosmos"},
                "stringData": {"api-keys.toml": "[[keys]]\nid = \"example\"\nsha256 = \"00\"\n"}
            }))
        },
        |m| m.check_api_keys(PROD),
        "Secret `kosmos-api-keys` (API keys) is part of the manifests",
    );
    assert_caught(
        "prod",
        |docs| {
            security_env(
                docs,
                "kosmos-gateway-security",
                "KOSMOS_GATEWAY__AUTH__API_KEYS_FILE",
                None,
            )
        },
        |m| m.check_api_keys(PROD),
        "no `auth.api_keys_file`",
    );
}

// memory-budget

#[test]
fn a_gateway_byte_budget_beyond_its_memory_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            let env = container(docs, "kosmos-gateway")["env"]
                .as_array_mut()
                .expect("env");
            let entry = env
                .iter_mut()
                .find(|e| e["name"] == "KOSMOS_GATEWAY__LIMITS__MAX_INFLIGHT_BYTES")
                .expect("the prod byte budget");
            entry["value"] = json!("4294967296");
        },
        Manifests::check_memory_budget,
        "limits.max_inflight_bytes 4294967296 + cache.capacity_bytes 268435456 do not fit in the memory limit",
    );
}
