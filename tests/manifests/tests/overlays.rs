//! Renders every overlay with `kubectl kustomize` and runs the semantic checks; then mutates a copy of the rendered
//! documents once per check and asserts that the check catches it (so that no check passes vacuously).

mod common;

use common::*;
use kosmos_manifests::Manifests;
use serde_json::json;

#[test]
fn dev_passes_every_check() {
    assert_clean("dev", DEV);
}

#[test]
fn prod_passes_every_check() {
    assert_clean("prod", PROD);
    let Some(docs) = rendered("prod") else { return };
    let m = manifests(&docs);
    assert_eq!(m.scaled_objects.len(), 3, "a ScaledObject per Deployment");
    assert_eq!(m.service_monitors.len(), 3, "a ServiceMonitor per service");
    assert!(
        !m.prometheus_rules.is_empty(),
        "the rules of k8s/monitoring as a PrometheusRule"
    );
}

#[test]
fn prod_hpa_passes_every_check() {
    assert_clean("prod-hpa", PROD);
    let Some(docs) = rendered("prod-hpa") else {
        return;
    };
    let m = manifests(&docs);
    assert_eq!(m.hpas.len(), 3, "an HPA per Deployment");
    assert!(m.scaled_objects.is_empty(), "no KEDA objects without KEDA");
}

#[test]
fn a_wrongly_typed_field_fails_deserialisation() {
    let Some(mut docs) = rendered("dev") else {
        return;
    };
    object(&mut docs, "Deployment", "kosmos-decoder")["spec"]["replicas"] = json!("one");
    let err = Manifests::from_documents(&docs).expect_err("replicas must be an integer");
    assert!(format!("{err:#}").contains("kosmos-decoder"), "{err:#}");
}

// gpu-pools

#[test]
fn a_gpu_pool_without_a_pdb_is_caught() {
    assert_caught(
        "prod",
        |docs| remove(docs, "PodDisruptionBudget", "kosmos-decoder"),
        Manifests::check_gpu_pools,
        "kosmos-decoder has no PodDisruptionBudget",
    );
}

#[test]
fn a_gpu_pool_without_an_autoscaler_is_caught() {
    assert_caught(
        "prod",
        |docs| remove(docs, "ScaledObject", "kosmos-encoder"),
        Manifests::check_gpu_pools,
        "kosmos-encoder has no ScaledObject or HorizontalPodAutoscaler",
    );
    assert_caught(
        "prod-hpa",
        |docs| remove(docs, "HorizontalPodAutoscaler", "kosmos-decoder"),
        Manifests::check_gpu_pools,
        "kosmos-decoder has no ScaledObject or HorizontalPodAutoscaler",
    );
}

// autoscaler-targets

#[test]
fn an_autoscaler_for_a_missing_deployment_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            object(docs, "ScaledObject", "kosmos-decoder")["spec"]["scaleTargetRef"]["name"] =
                json!("kosmos-decodr")
        },
        Manifests::check_autoscaler_targets,
        "targets Deployment `kosmos-decodr`, which does not exist",
    );
    assert_caught(
        "prod-hpa",
        |docs| {
            object(docs, "HorizontalPodAutoscaler", "kosmos-encoder")["spec"]["scaleTargetRef"]["name"] =
                json!("encoder")
        },
        Manifests::check_autoscaler_targets,
        "targets Deployment `encoder`, which does not exist",
    );
}

#[test]
fn two_autoscalers_on_one_deployment_are_caught() {
    let Some(hpa_docs) = rendered("prod-hpa") else {
        return;
    };
    let hpa = hpa_docs
        .iter()
        .find(|d| {
            d["kind"] == "HorizontalPodAutoscaler" && d["metadata"]["name"] == "kosmos-decoder"
        })
        .expect("HPA")
        .clone();
    assert_caught(
        "prod",
        move |docs| docs.push(hpa),
        Manifests::check_autoscaler_targets,
        "has 2 autoscalers",
    );
}

// probes

#[test]
fn a_probe_on_an_undeclared_port_is_caught() {
    assert_caught(
        "prod",
        |docs| container(docs, "kosmos-encoder")["readinessProbe"]["grpc"]["port"] = json!(50053),
        Manifests::check_probes,
        "readinessProbe port Int(50053) is not a container port",
    );
}

#[test]
fn a_probe_on_the_wrong_health_service_is_caught() {
    assert_caught(
        "dev",
        |docs| {
            container(docs, "kosmos-gateway")["livenessProbe"]["grpc"]["service"] =
                json!("readiness")
        },
        Manifests::check_probes,
        "livenessProbe asks for gRPC health service `readiness`, expected ``",
    );
    assert_caught(
        "dev",
        |docs| {
            container(docs, "kosmos-decoder")["startupProbe"]["grpc"]
                .as_object_mut()
                .expect("grpc")
                .remove("service");
        },
        Manifests::check_probes,
        "startupProbe asks for gRPC health service ``, expected `readiness`",
    );
    // A gateway whose startup waits for readiness would be restarted by a decoder outage longer than it waits.
    assert_caught(
        "dev",
        |docs| {
            container(docs, "kosmos-gateway")["startupProbe"]["grpc"]["service"] =
                json!("readiness")
        },
        Manifests::check_probes,
        "startupProbe asks for gRPC health service `readiness`, expected ``",
    );
}

// selectors

#[test]
fn a_service_selecting_no_pods_is_caught() {
    assert_caught(
        "dev",
        |docs| {
            object(docs, "Service", "kosmos-encoder")["spec"]["selector"]["app.kubernetes.io/name"] =
                json!("encoder")
        },
        Manifests::check_selectors,
        "Service kosmos-dev/kosmos-encoder selects",
    );
}

#[test]
fn a_service_port_targeting_an_undeclared_container_port_is_caught() {
    assert_caught(
        "dev",
        |docs| {
            object(docs, "Service", "kosmos-decoder")["spec"]["ports"][1]["targetPort"] =
                json!("prometheus")
        },
        Manifests::check_selectors,
        "targets String(\"prometheus\")",
    );
}

#[test]
fn a_pdb_selecting_no_pods_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            object(docs, "PodDisruptionBudget", "kosmos-gateway")["spec"]["selector"]["matchLabels"]
                ["app.kubernetes.io/part-of"] = json!("other")
        },
        Manifests::check_selectors,
        "PodDisruptionBudget kosmos/kosmos-gateway selects no Deployment's pods",
    );
}

// resources

#[test]
fn a_container_without_limits_is_caught() {
    assert_caught(
        "dev",
        |docs| {
            container(docs, "kosmos-gateway")["resources"]["limits"]
                .as_object_mut()
                .expect("limits")
                .remove("cpu");
        },
        |m| m.check_resources(DEV),
        "container gateway: no cpu limit",
    );
}

#[test]
fn a_gpu_pool_without_a_gpu_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            let resources = &mut container(docs, "kosmos-decoder")["resources"];
            for side in ["limits", "requests"] {
                resources[side]
                    .as_object_mut()
                    .expect(side)
                    .remove("nvidia.com/gpu");
            }
        },
        |m| m.check_resources(PROD),
        "GPU pool without an nvidia.com/gpu limit",
    );
}

// upstreams

#[test]
fn a_gateway_upstream_naming_no_service_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            gateway_config(
                docs,
                "dns = \"kosmos-encoder:50052\"",
                "dns = \"kosmos-encoders:50052\"",
            )
        },
        Manifests::check_gateway_upstreams,
        "no Service `kosmos-encoders` in namespace `kosmos`",
    );
}

#[test]
fn a_gateway_upstream_on_the_wrong_port_or_namespace_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            gateway_config(
                docs,
                "dns = \"kosmos-decoder:50053\"",
                "dns = \"kosmos-decoder:50052\"",
            )
        },
        Manifests::check_gateway_upstreams,
        "has no port 50052",
    );
    assert_caught(
        "prod",
        |docs| {
            gateway_config(
                docs,
                "dns = \"kosmos-decoder:50053\"",
                "dns = \"kosmos-decoder.kosmos-dev.svc.cluster.local:50053\"",
            )
        },
        Manifests::check_gateway_upstreams,
        "no Service `kosmos-decoder` in namespace `kosmos-dev`",
    );
}

#[test]
fn a_gateway_upstream_through_the_wrong_service_or_env_is_caught() {
    // The encoder pool pointed at the decoder's Service.
    assert_caught(
        "dev",
        |docs| {
            gateway_config(
                docs,
                "dns = \"kosmos-encoder:50052\"",
                "dns = \"kosmos-decoder:50053\"",
            )
        },
        Manifests::check_gateway_upstreams,
        "does not select the encoder pods",
    );
    // An environment override wins over the file, as in the services.
    assert_caught(
        "dev",
        |docs| {
            container(docs, "kosmos-gateway")["env"]
                .as_array_mut()
                .expect("env")
                .push(json!({"name": "KOSMOS_GATEWAY__DECODER__DNS", "value": "decoder:50053"}));
        },
        Manifests::check_gateway_upstreams,
        "no Service `decoder`",
    );
}

#[test]
fn a_gateway_upstream_through_a_non_headless_service_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            object(docs, "Service", "kosmos-encoder")["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("clusterIP");
        },
        Manifests::check_gateway_upstreams,
        "is not headless",
    );
}

// shutdown

#[test]
fn a_grace_period_shorter_than_the_drain_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            object(docs, "Deployment", "kosmos-decoder")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] =
                json!(60)
        },
        Manifests::check_shutdown,
        "terminationGracePeriodSeconds 60 < preStop sleep 10 + drain timeout 120",
    );
    assert_caught(
        "dev",
        |docs| {
            container(docs, "kosmos-encoder")
                .as_object_mut()
                .expect("container")
                .remove("lifecycle");
        },
        Manifests::check_shutdown,
        "no preStop sleep",
    );
}

// rollout

#[test]
fn a_rollout_that_drops_capacity_or_hides_a_build_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            object(docs, "Deployment", "kosmos-decoder")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] =
                json!(1)
        },
        Manifests::check_rollout,
        "a rollout must add a new pod before it takes an old one away",
    );
    assert_caught(
        "dev",
        |docs| {
            object(docs, "Deployment", "kosmos-encoder")["spec"]["strategy"] =
                json!({"type": "Recreate"})
        },
        Manifests::check_rollout,
        "strategy Recreate",
    );
    assert_caught(
        "prod",
        |docs| {
            object(docs, "Service", "kosmos-encoder")["spec"]["selector"]["app.kubernetes.io/version"] =
                json!("0.1.0")
        },
        Manifests::check_rollout,
        "selects on `app.kubernetes.io/version`",
    );
}

// scaledobject-shape

#[test]
fn a_metric_type_inside_metadata_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            let t = trigger(docs, "kosmos-decoder", "decoder-ttft-p95");
            let metric_type = t
                .as_object_mut()
                .expect("trigger")
                .remove("metricType")
                .expect("metricType");
            t["metadata"]["metricType"] = metric_type;
        },
        Manifests::check_scaled_object_shape,
        "`metricType` is inside `metadata`",
    );
}

#[test]
fn a_fallback_next_to_a_value_trigger_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            object(docs, "ScaledObject", "kosmos-decoder")["spec"]["fallback"] =
                json!({"failureThreshold": 3, "replicas": 2})
        },
        Manifests::check_scaled_object_shape,
        "a fallback needs every trigger",
    );
}

// service-monitors

#[test]
fn a_service_monitor_with_a_wrong_job_or_port_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            object(docs, "ServiceMonitor", "kosmos-encoder")["spec"]["jobLabel"] =
                json!("app.kubernetes.io/component")
        },
        Manifests::check_service_monitors,
        "job would be `encoder`",
    );
    assert_caught(
        "prod",
        |docs| {
            let spec = object(docs, "ServiceMonitor", "kosmos-decoder")["spec"]
                .as_object_mut()
                .expect("spec");
            let job_label = spec.remove("jobLabel").expect("jobLabel");
            spec.insert("jobLabl".into(), job_label);
        },
        Manifests::check_service_monitors,
        "no jobLabel",
    );
    assert_caught(
        "prod",
        |docs| {
            object(docs, "ServiceMonitor", "kosmos-gateway")["spec"]["endpoints"][0]["port"] =
                json!("http-metrics")
        },
        Manifests::check_service_monitors,
        "endpoint port `http-metrics` is not a port of Service kosmos-gateway",
    );
}

// metric-names

#[test]
fn an_unknown_metric_in_an_autoscaler_query_is_caught() {
    let catalogue = catalogue();
    assert_caught(
        "prod",
        |docs| {
            let t = trigger(docs, "kosmos-encoder", "encoder-images");
            t["metadata"]["query"] = json!(
                r#"sum(kosmos_gateway_pool_pending_image{job="kosmos-gateway",namespace="kosmos",pool="encoder"})"#
            );
        },
        |m| m.check_metric_names(&catalogue),
        "`kosmos_gateway_pool_pending_image` is not exported",
    );
}

#[test]
fn a_metric_read_from_the_wrong_job_is_caught() {
    let catalogue = catalogue();
    assert_caught(
        "prod",
        |docs| {
            let t = trigger(docs, "kosmos-decoder", "decoder-ttft-p95");
            let query = t["metadata"]["query"]
                .as_str()
                .expect("query")
                .replace("kosmos-decoder", "kosmos-encoder");
            t["metadata"]["query"] = json!(query);
        },
        |m| m.check_metric_names(&catalogue),
        "`gen_ai_server_time_to_first_token_seconds_bucket` is not exported by job `kosmos-encoder`",
    );
}

#[test]
fn an_unknown_metric_in_an_hpa_or_a_relabeling_is_caught() {
    let catalogue = catalogue();
    assert_caught(
        "prod-hpa",
        |docs| {
            object(docs, "HorizontalPodAutoscaler", "kosmos-decoder")["spec"]["metrics"][2]["external"]
                ["metric"]["name"] = json!("gen_ai_server_time_to_first_token_p95")
        },
        |m| m.check_metric_names(&catalogue),
        "`gen_ai_server_time_to_first_token_p95` is not exported",
    );
    assert_caught(
        "prod",
        |docs| {
            let r = &mut object(docs, "ServiceMonitor", "kosmos-decoder")["spec"]["endpoints"][0]["metricRelabelings"]
                [0];
            let regex = r["regex"]
                .as_str()
                .expect("regex")
                .replace("_count", "_total");
            r["regex"] = json!(regex);
        },
        |m| m.check_metric_names(&catalogue),
        "`rpc_server_call_duration_seconds_total` is not exported",
    );
}

#[test]
fn an_unknown_metric_in_an_alerting_rule_is_caught() {
    let catalogue = catalogue();
    assert_caught(
        "prod",
        |docs| {
            let rule = docs
                .iter_mut()
                .find(|d| d["kind"] == "PrometheusRule")
                .expect("a PrometheusRule")["spec"]["groups"][0]["rules"][0]
                .as_object_mut()
                .expect("a rule");
            rule.insert(
                "expr".into(),
                json!("sum(kosmos_gateway_pool_queue_depth) > 1"),
            );
        },
        |m| m.check_metric_names(&catalogue),
        "`kosmos_gateway_pool_queue_depth` is not exported",
    );
}

// query-namespaces

#[test]
fn a_query_reading_another_namespace_is_caught() {
    assert_caught(
        "prod",
        |docs| {
            let t = trigger(docs, "kosmos-encoder", "encoder-calls");
            let query = t["metadata"]["query"].as_str().expect("query").replacen(
                "namespace=\"kosmos\"",
                "namespace=\"kosmos-dev\"",
                1,
            );
            t["metadata"]["query"] = json!(query);
        },
        Manifests::check_query_namespaces,
        "query reads namespace=\"kosmos-dev\"",
    );
}
