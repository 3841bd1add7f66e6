//! The queries of the live signal-chain test, read from the manifests and the dashboard: the KEDA ScaledObjects'
//! prometheus triggers, the HPAs' External metrics through the prometheus-adapter rules, the dashboard's targets.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use serde_yaml_ng::Value as Yaml;

use crate::{NAMESPACE, Prometheus, repo};

/// A query to run and where it comes from.
#[derive(Debug, Clone)]
pub(crate) struct Query {
    pub(crate) source: String,
    pub(crate) expr: String,
}

pub(crate) fn yaml_documents(path: &Path) -> Vec<Yaml> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            serde::Deserialize::deserialize(document)
                .unwrap_or_else(|err| panic!("{}: not YAML: {err}", path.display()))
        })
        .filter(|document: &Yaml| !document.is_null())
        .collect()
}

pub(crate) fn yaml_str<'a>(value: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |node, key| node.get(*key))?
        .as_str()
}

/// The `prometheus` triggers of every ScaledObject: (ScaledObject, trigger name) → query.
pub(crate) fn keda_queries() -> BTreeMap<(String, String), String> {
    let mut queries = BTreeMap::new();
    for document in yaml_documents(&repo().join("k8s/components/keda/scaledobjects.yaml")) {
        if yaml_str(&document, &["kind"]) != Some("ScaledObject") {
            continue;
        }
        let name = yaml_str(&document, &["metadata", "name"])
            .expect("a name")
            .to_string();
        let triggers = document["spec"]["triggers"]
            .as_sequence()
            .expect("triggers");
        for trigger in triggers {
            if yaml_str(trigger, &["type"]) != Some("prometheus") {
                continue;
            }
            let trigger_name = yaml_str(trigger, &["name"])
                .expect("a trigger name")
                .to_string();
            let query = yaml_str(trigger, &["metadata", "query"])
                .expect("a query")
                .to_string();
            queries.insert((name.clone(), trigger_name), query);
        }
    }
    assert!(
        queries.len() >= 5,
        "expected the ScaledObjects' prometheus triggers, found {queries:?}"
    );
    queries
}

/// The HPAs' External metrics, each turned into the PromQL prometheus-adapter runs for it: the rule of
/// prometheus-adapter-values.yaml whose series (after its `name` rewrite) is the metric, its `metricsQuery` with
/// the series, the HPA's selector plus the namespace as label matchers, grouped by namespace.
pub(crate) fn hpa_queries() -> Vec<Query> {
    let adapter =
        &yaml_documents(&repo().join("k8s/components/hpa/prometheus-adapter-values.yaml"))[0];
    let series_name = regex::Regex::new(r#"__name__\s*(=~|=)\s*"([^"]*)""#).expect("regex");
    // (metric name the HPA asks for, series name, metricsQuery template)
    let mut served = Vec::new();
    for rule in adapter["rules"]["external"]
        .as_sequence()
        .expect("external rules")
    {
        let series_query = yaml_str(rule, &["seriesQuery"]).expect("seriesQuery");
        let captures = series_name
            .captures(series_query)
            .expect("a __name__ matcher");
        let names: Vec<String> = if &captures[1] == "=~" {
            captures[2].split('|').map(String::from).collect()
        } else {
            vec![captures[2].to_string()]
        };
        let template = yaml_str(rule, &["metricsQuery"])
            .expect("metricsQuery")
            .to_string();
        for series in names {
            let exposed = match (
                yaml_str(rule, &["name", "matches"]),
                yaml_str(rule, &["name", "as"]),
            ) {
                (Some(matches), Some(replacement)) => regex::Regex::new(matches)
                    .expect("name.matches")
                    .replace(&series, replacement)
                    .into_owned(),
                _ => series.clone(),
            };
            served.push((exposed, series, template.clone()));
        }
    }
    let mut queries = Vec::new();
    for document in yaml_documents(&repo().join("k8s/components/hpa/hpas.yaml")) {
        let hpa = yaml_str(&document, &["metadata", "name"])
            .expect("a name")
            .to_string();
        for metric in document["spec"]["metrics"].as_sequence().expect("metrics") {
            if yaml_str(metric, &["type"]) != Some("External") {
                continue;
            }
            let name = yaml_str(metric, &["external", "metric", "name"]).expect("metric name");
            let (_, series, template) = served
                .iter()
                .find(|(exposed, _, _)| exposed == name)
                .unwrap_or_else(|| panic!("HPA {hpa}: no prometheus-adapter rule serves {name}"));
            let mut matchers = vec![format!("namespace=\"{NAMESPACE}\"")];
            if let Some(labels) =
                metric["external"]["metric"]["selector"]["matchLabels"].as_mapping()
            {
                for (key, value) in labels {
                    matchers.push(format!(
                        "{}=\"{}\"",
                        key.as_str().expect("label"),
                        value.as_str().expect("value")
                    ));
                }
            }
            queries.push(Query {
                source: format!("hpa {hpa} external {name}"),
                expr: template
                    .replace("<<.Series>>", series)
                    .replace("<<.LabelMatchers>>", &matchers.join(","))
                    .replace("<<.GroupBy>>", "namespace"),
            });
        }
    }
    assert!(
        queries.len() >= 6,
        "expected the HPAs' External metrics, found {queries:?}"
    );
    queries
}

/// Every target `expr` of the dashboard, with Grafana's variables as Grafana would fill them: `$namespace` and
/// `$model` (multi-value, "All") as the regex of every value their `label_values` query finds, `$pool` once per
/// pool (the rows repeat per pool), `$__rate_interval` 1m (4 scrape intervals would do; 1m spans the bursts).
pub(crate) fn dashboard_queries(prometheus: &Prometheus) -> Vec<Query> {
    let text = std::fs::read_to_string(repo().join("k8s/monitoring/dashboard.json"))
        .expect("dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let label_values =
        regex::Regex::new(r"^\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*$")
            .expect("regex");
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if variable["type"] != "query" {
            continue;
        }
        let name = variable["name"].as_str().expect("name").to_string();
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .expect("query");
        let captures = label_values
            .captures(query)
            .unwrap_or_else(|| panic!("${name}: {query}"));
        let found = prometheus.label_values(&captures[1], &captures[2]);
        assert!(
            !found.is_empty(),
            "dashboard variable ${name} ({query}) finds no value"
        );
        values.insert(name, found.into_iter().collect());
    }
    let pools = values.get("pool").cloned().expect("a pool variable");
    let all = |name: &str| format!("({})", values[name].join("|"));
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, "dashboard", &mut exprs);
    let mut queries = Vec::new();
    for (panel, expr) in exprs {
        let filled = expr
            .replace("$__rate_interval", "1m")
            .replace("$namespace", &all("namespace"))
            .replace("$model", &all("model"));
        assert!(
            !filled.replace("$pool", "").contains('$'),
            "{panel}: a Grafana variable this test does not fill: {expr}"
        );
        if filled.contains("$pool") {
            for pool in &pools {
                queries.push(Query {
                    source: format!("{panel} (pool {pool})"),
                    expr: filled.replace("$pool", pool),
                });
            }
        } else {
            queries.push(Query {
                source: panel,
                expr: filled,
            });
        }
    }
    assert!(
        queries.len() >= 60,
        "expected the dashboard's targets, found {}",
        queries.len()
    );
    queries
}

fn collect_exprs(node: &Value, title: &str, out: &mut Vec<(String, String)>) {
    match node {
        Value::Object(object) => {
            let title = object.get("title").and_then(Value::as_str).unwrap_or(title);
            if let Some(expr) = object.get("expr").and_then(Value::as_str) {
                out.push((format!("dashboard panel {title:?}"), expr.to_string()));
            }
            for value in object.values() {
                collect_exprs(value, title, out);
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| collect_exprs(item, title, out)),
        _ => {}
    }
}

/// Series other exporters provide in a cluster (kube-state-metrics, KEDA's operator, NVIDIA's dcgm-exporter;
/// k8s/monitoring/README.md lists them): a query reading them has nothing to return here.
pub(crate) fn reads_external_series(expr: &str) -> bool {
    regex::Regex::new(r"\b(kube_|keda_|DCGM_)\w+")
        .expect("regex")
        .is_match(expr)
}

/// The gateway exports `kosmos_gateway_pool_pending_images` for the encoder pool only (docs/metrics.md, "pending
/// images, encoder"); the dashboard's per-pool row also draws it for the decoder pool, where it is empty by design.
pub(crate) fn reads_a_series_not_exported_by_design(expr: &str) -> bool {
    expr.contains("kosmos_gateway_pool_pending_images") && expr.contains("pool=\"decoder\"")
}
