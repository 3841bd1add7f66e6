//! The KEDA ScaledObjects of `k8s/components/keda`, read into what the simulated autoscaler needs.
//!
//! Policy: read, never guess. Each pool's object gives `pollingInterval`, `cooldownPeriod`, `minReplicaCount`,
//! `maxReplicaCount`, the HPA `behavior` (stabilisation windows, policies, selectPolicy) and its triggers; what the
//! YAML leaves out takes KEDA's / the HPA's documented default. Each trigger's PromQL query is matched against the
//! signals the simulated gateway and decoder produce: a sum of the gateway's per-pool gauges
//! (`kosmos_gateway_pool_{pending_requests,inflight_requests,pending_images}`) or a `histogram_quantile` of the
//! decoder's time to first token over a window. A query, trigger type or field the simulator cannot reproduce is an
//! error naming the object and the trigger, so a changed manifest cannot be simulated as something else.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};

/// KEDA's default `pollingInterval` (seconds).
const DEFAULT_POLLING_INTERVAL: u32 = 30;
/// KEDA's default `cooldownPeriod` (seconds).
const DEFAULT_COOLDOWN_PERIOD: u32 = 300;
/// KEDA's default `minReplicaCount`.
const DEFAULT_MIN_REPLICAS: u32 = 0;
/// KEDA's default `maxReplicaCount`.
const DEFAULT_MAX_REPLICAS: u32 = 100;

/// A pool of replicas the gateway publishes gauges for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// The vision-encoder pool.
    Encoder,
    /// The decoder pool.
    Decoder,
    /// Encoder and decoder in one pod (the monolithic deployment; not in the manifests).
    Monolith,
}

impl PoolKind {
    /// The `pool` label value.
    pub fn label(self) -> &'static str {
        match self {
            PoolKind::Encoder => "encoder",
            PoolKind::Decoder => "decoder",
            PoolKind::Monolith => "monolith",
        }
    }
}

/// One of the gateway's per-pool gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gauge {
    /// `kosmos_gateway_pool_pending_requests`: calls sent and not yet answered with a first message.
    PendingRequests,
    /// `kosmos_gateway_pool_inflight_requests`: calls open.
    InflightRequests,
    /// `kosmos_gateway_pool_pending_images`: images in encode calls not yet answered.
    PendingImages,
}

impl Gauge {
    const ALL: [Gauge; 3] = [
        Gauge::PendingRequests,
        Gauge::InflightRequests,
        Gauge::PendingImages,
    ];

    /// The Prometheus metric name.
    pub fn metric_name(self) -> &'static str {
        match self {
            Gauge::PendingRequests => "kosmos_gateway_pool_pending_requests",
            Gauge::InflightRequests => "kosmos_gateway_pool_inflight_requests",
            Gauge::PendingImages => "kosmos_gateway_pool_pending_images",
        }
    }
}

/// What a trigger's query reads, in simulator terms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// The sum of gateway gauges.
    GaugeSum(Vec<(Gauge, PoolKind)>),
    /// A quantile of the decoder-measured time to first token (its queue + prefill) over a trailing window; 0 when
    /// the window holds no sample (`or vector(0)`).
    DecoderTtftQuantile {
        /// The quantile, e.g. 0.95.
        quantile: f64,
        /// The rate window in seconds, e.g. 120 for `[2m]`.
        window_seconds: f64,
    },
}

/// How the HPA compares a metric with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetricType {
    /// The metric divided by the current replicas is compared with the target: desired = ceil(metric / target).
    AverageValue,
    /// The metric itself: desired = ceil(current × metric / target).
    Value,
}

/// One trigger of a ScaledObject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    /// The trigger's `name`.
    pub name: String,
    /// `metricType` (default AverageValue).
    pub metric_type: MetricType,
    /// `metadata.threshold`.
    pub threshold: f64,
    /// `metadata.activationThreshold` (default 0): above it the pool is active (scale from / keep above zero).
    pub activation_threshold: f64,
    /// What the query reads.
    pub signal: Signal,
}

/// Which of a direction's policies wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectPolicy {
    /// The policy allowing the largest change.
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// A scaling policy's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyKind {
    /// A number of pods per period.
    Pods,
    /// A percentage of the replicas at the period's start.
    Percent,
}

/// One HPA scaling policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Pods or Percent.
    pub kind: PolicyKind,
    /// How many pods / what percentage.
    pub value: u32,
    /// Over how many seconds.
    pub period_seconds: f64,
}

/// The HPA behaviour of one direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rules {
    /// `stabilizationWindowSeconds`.
    pub stabilization_window_seconds: f64,
    /// `selectPolicy`.
    pub select_policy: SelectPolicy,
    /// `policies`.
    pub policies: Vec<Policy>,
}

impl Rules {
    /// The HPA's default scale-up: no window, max of 100 % or 4 pods per 15 s.
    pub fn default_scale_up() -> Self {
        Self {
            stabilization_window_seconds: 0.0,
            select_policy: SelectPolicy::Max,
            policies: vec![
                Policy {
                    kind: PolicyKind::Percent,
                    value: 100,
                    period_seconds: 15.0,
                },
                Policy {
                    kind: PolicyKind::Pods,
                    value: 4,
                    period_seconds: 15.0,
                },
            ],
        }
    }

    /// The HPA's default scale-down: 300 s window, 100 % per 15 s.
    pub fn default_scale_down() -> Self {
        Self {
            stabilization_window_seconds: 300.0,
            select_policy: SelectPolicy::Max,
            policies: vec![Policy {
                kind: PolicyKind::Percent,
                value: 100,
                period_seconds: 15.0,
            }],
        }
    }
}

/// Everything the simulated autoscaler of one Deployment needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalerSpec {
    /// The ScaledObject's name.
    pub name: String,
    /// `pollingInterval` in seconds (the simulated HPA also evaluates at this period).
    pub polling_interval_seconds: f64,
    /// `cooldownPeriod` in seconds: inactive this long at one replica before going to zero (when min is 0).
    pub cooldown_seconds: f64,
    /// `minReplicaCount`.
    pub min_replicas: u32,
    /// `maxReplicaCount`.
    pub max_replicas: u32,
    /// `behavior.scaleUp`.
    pub scale_up: Rules,
    /// `behavior.scaleDown`.
    pub scale_down: Rules,
    /// The triggers, in the object's order.
    pub triggers: Vec<Trigger>,
}

/// The two GPU pools' ScaledObjects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KedaConfig {
    /// `kosmos-encoder`.
    pub encoder: ScalerSpec,
    /// `kosmos-decoder`.
    pub decoder: ScalerSpec,
}

impl KedaConfig {
    /// Reads every `*.yaml` file of a directory (e.g. `k8s/components/keda`) and takes the ScaledObjects
    /// `kosmos-encoder` and `kosmos-decoder`.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|source| SimError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SimError::Read {
                path: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "yaml") {
                files.push(path);
            }
        }
        files.sort();
        let mut objects = BTreeMap::new();
        for path in &files {
            let text = std::fs::read_to_string(path).map_err(|source| SimError::Read {
                path: path.clone(),
                source,
            })?;
            for spec in parse_scaled_objects(&text).map_err(|err| match err {
                SimError::Parse { message, .. } => SimError::Parse {
                    path: path.clone(),
                    message,
                },
                other => other,
            })? {
                objects.insert(spec.name.clone(), spec);
            }
        }
        let mut take = |name: &str| {
            objects.remove(name).ok_or_else(|| SimError::Keda {
                object: name.to_owned(),
                message: format!("not found in the *.yaml files of `{}`", dir.display()),
            })
        };
        Ok(Self {
            encoder: take("kosmos-encoder")?,
            decoder: take("kosmos-decoder")?,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawObject {
    metadata: RawMetadata,
    spec: serde_yaml_ng::Value,
}

#[derive(Debug, Deserialize)]
struct RawMetadata {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    polling_interval: Option<u32>,
    cooldown_period: Option<u32>,
    min_replica_count: Option<u32>,
    max_replica_count: Option<u32>,
    advanced: Option<RawAdvanced>,
    triggers: Vec<RawTrigger>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAdvanced {
    horizontal_pod_autoscaler_config: Option<RawHpaConfig>,
}

#[derive(Debug, Deserialize)]
struct RawHpaConfig {
    behavior: Option<RawBehavior>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBehavior {
    scale_up: Option<RawRules>,
    scale_down: Option<RawRules>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRules {
    stabilization_window_seconds: Option<u32>,
    select_policy: Option<String>,
    policies: Option<Vec<RawPolicy>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPolicy {
    #[serde(rename = "type")]
    kind: String,
    value: u32,
    period_seconds: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTrigger {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    metric_type: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// The ScaledObjects of a (multi-document) YAML text; other kinds are skipped. Objects whose triggers are not all
/// Prometheus queries (the gateway's cpu trigger) are skipped too: the simulator models the GPU pools only.
pub fn parse_scaled_objects(text: &str) -> Result<Vec<ScalerSpec>> {
    let parse_error = |message: String| SimError::Parse {
        path: "<yaml>".into(),
        message,
    };
    let mut specs = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = serde_yaml_ng::Value::deserialize(document)
            .map_err(|err| parse_error(err.to_string()))?;
        let is_scaled_object = value
            .get("kind")
            .and_then(serde_yaml_ng::Value::as_str)
            .is_some_and(|kind| kind == "ScaledObject");
        if !is_scaled_object {
            continue;
        }
        let object: RawObject =
            serde_yaml_ng::from_value(value).map_err(|err| parse_error(err.to_string()))?;
        let name = object.metadata.name;
        let spec: RawSpec =
            serde_yaml_ng::from_value(object.spec).map_err(|err| SimError::Keda {
                object: name.clone(),
                message: format!("spec: {err}"),
            })?;
        if spec
            .triggers
            .iter()
            .any(|trigger| trigger.kind != "prometheus")
        {
            continue;
        }
        specs.push(convert(&name, spec)?);
    }
    Ok(specs)
}

fn convert(name: &str, spec: RawSpec) -> Result<ScalerSpec> {
    let keda_error = |message: String| SimError::Keda {
        object: name.to_owned(),
        message,
    };
    let behavior = spec
        .advanced
        .and_then(|advanced| advanced.horizontal_pod_autoscaler_config)
        .and_then(|config| config.behavior);
    let (raw_up, raw_down) = match behavior {
        Some(behavior) => (behavior.scale_up, behavior.scale_down),
        None => (None, None),
    };
    let scale_up = convert_rules(name, "scaleUp", raw_up, Rules::default_scale_up())?;
    let scale_down = convert_rules(name, "scaleDown", raw_down, Rules::default_scale_down())?;
    let min_replicas = spec.min_replica_count.unwrap_or(DEFAULT_MIN_REPLICAS);
    let max_replicas = spec.max_replica_count.unwrap_or(DEFAULT_MAX_REPLICAS);
    if max_replicas == 0 || max_replicas < min_replicas {
        return Err(keda_error(format!(
            "maxReplicaCount {max_replicas} must be >= 1 and >= minReplicaCount {min_replicas}"
        )));
    }
    let polling = spec.polling_interval.unwrap_or(DEFAULT_POLLING_INTERVAL);
    if polling == 0 {
        return Err(keda_error("pollingInterval must be >= 1, got 0".to_owned()));
    }
    let mut triggers = Vec::new();
    for (index, trigger) in spec.triggers.into_iter().enumerate() {
        let trigger_name = trigger
            .name
            .clone()
            .unwrap_or_else(|| format!("triggers[{index}]"));
        triggers.push(convert_trigger(name, &trigger_name, trigger)?);
    }
    if triggers.is_empty() {
        return Err(keda_error("has no trigger".to_owned()));
    }
    Ok(ScalerSpec {
        name: name.to_owned(),
        polling_interval_seconds: f64::from(polling),
        cooldown_seconds: f64::from(spec.cooldown_period.unwrap_or(DEFAULT_COOLDOWN_PERIOD)),
        min_replicas,
        max_replicas,
        scale_up,
        scale_down,
        triggers,
    })
}

fn convert_rules(
    object: &str,
    direction: &str,
    raw: Option<RawRules>,
    default: Rules,
) -> Result<Rules> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    let keda_error = |message: String| SimError::Keda {
        object: object.to_owned(),
        message,
    };
    let select_policy = match raw.select_policy.as_deref() {
        None | Some("Max") => SelectPolicy::Max,
        Some("Min") => SelectPolicy::Min,
        Some("Disabled") => SelectPolicy::Disabled,
        Some(other) => {
            return Err(keda_error(format!(
                "behavior.{direction}.selectPolicy must be Max, Min or Disabled, got `{other}`"
            )));
        }
    };
    let policies = match raw.policies {
        None => default.policies,
        Some(raw_policies) => {
            let mut policies = Vec::new();
            for (index, policy) in raw_policies.into_iter().enumerate() {
                let kind = match policy.kind.as_str() {
                    "Pods" => PolicyKind::Pods,
                    "Percent" => PolicyKind::Percent,
                    other => {
                        return Err(keda_error(format!(
                            "behavior.{direction}.policies[{index}].type must be Pods or Percent, got `{other}`"
                        )));
                    }
                };
                if policy.period_seconds == 0 {
                    return Err(keda_error(format!(
                        "behavior.{direction}.policies[{index}].periodSeconds must be >= 1, got 0"
                    )));
                }
                policies.push(Policy {
                    kind,
                    value: policy.value,
                    period_seconds: f64::from(policy.period_seconds),
                });
            }
            policies
        }
    };
    Ok(Rules {
        stabilization_window_seconds: raw
            .stabilization_window_seconds
            .map_or(default.stabilization_window_seconds, f64::from),
        select_policy,
        policies,
    })
}

fn convert_trigger(object: &str, trigger_name: &str, raw: RawTrigger) -> Result<Trigger> {
    let keda_error = |message: String| SimError::Keda {
        object: object.to_owned(),
        message: format!("trigger `{trigger_name}`: {message}"),
    };
    let metric_type = match raw.metric_type.as_deref() {
        None | Some("AverageValue") => MetricType::AverageValue,
        Some("Value") => MetricType::Value,
        Some(other) => {
            return Err(keda_error(format!(
                "metricType must be AverageValue or Value for a prometheus trigger, got `{other}`"
            )));
        }
    };
    let number = |key: &str, default: Option<f64>| -> Result<f64> {
        match raw.metadata.get(key) {
            Some(text) => match text.trim().parse::<f64>() {
                Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
                _ => Err(keda_error(format!(
                    "metadata.{key} must be a number >= 0, got `{text}`"
                ))),
            },
            None => default.ok_or_else(|| keda_error(format!("metadata.{key} is missing"))),
        }
    };
    let threshold = number("threshold", None)?;
    if threshold <= 0.0 {
        return Err(keda_error(format!(
            "metadata.threshold must be > 0, got {threshold}"
        )));
    }
    let activation_threshold = number("activationThreshold", Some(0.0))?;
    let query = raw
        .metadata
        .get("query")
        .ok_or_else(|| keda_error("metadata.query is missing".to_owned()))?;
    let signal = parse_query(query).map_err(keda_error)?;
    Ok(Trigger {
        name: trigger_name.to_owned(),
        metric_type,
        threshold,
        activation_threshold,
        signal,
    })
}

/// Matches a PromQL query with a simulated signal, or says why it cannot.
pub fn parse_query(query: &str) -> std::result::Result<Signal, String> {
    let query = query.trim();
    if query.contains("histogram_quantile(") {
        return parse_ttft_quantile(query);
    }
    let mut terms = Vec::new();
    for term in query.split('+') {
        let term = term.trim();
        let inner = term
            .strip_prefix("sum(")
            .and_then(|rest| rest.strip_suffix(')'))
            .ok_or_else(|| {
                format!("unsupported query term `{term}`: expected sum(<gauge>{{...}})")
            })?;
        let (metric, labels) = inner
            .split_once('{')
            .ok_or_else(|| format!("unsupported query term `{term}`: no label selector"))?;
        let gauge = Gauge::ALL
            .into_iter()
            .find(|gauge| gauge.metric_name() == metric.trim())
            .ok_or_else(|| format!("unsupported metric `{}` in query", metric.trim()))?;
        let pool = match label_value(labels, "pool") {
            Some("encoder") => PoolKind::Encoder,
            Some("decoder") => PoolKind::Decoder,
            Some(other) => return Err(format!("unknown pool `{other}` in query term `{term}`")),
            None => return Err(format!("query term `{term}` has no pool=\"...\" matcher")),
        };
        terms.push((gauge, pool));
    }
    Ok(Signal::GaugeSum(terms))
}

fn parse_ttft_quantile(query: &str) -> std::result::Result<Signal, String> {
    if !query.contains("gen_ai_server_time_to_first_token_seconds_bucket")
        || !query.contains("job=\"kosmos-decoder\"")
    {
        return Err(format!(
            "unsupported histogram_quantile query `{query}`: only the decoder's gen_ai_server_time_to_first_token_seconds is simulated"
        ));
    }
    let after = query
        .split_once("histogram_quantile(")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let quantile_text = after.split(',').next().unwrap_or_default().trim();
    let quantile: f64 = quantile_text
        .parse()
        .ok()
        .filter(|quantile: &f64| (0.0..=1.0).contains(quantile))
        .ok_or_else(|| format!("quantile `{quantile_text}` must be a number in [0, 1]"))?;
    let window_text = query
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(window, _)| window.trim())
        .ok_or_else(|| format!("no rate window `[...]` in `{query}`"))?;
    let window_seconds = parse_duration(window_text)
        .ok_or_else(|| format!("rate window `{window_text}` must look like 30s, 2m or 1h"))?;
    Ok(Signal::DecoderTtftQuantile {
        quantile,
        window_seconds,
    })
}

fn parse_duration(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(number) = text.strip_suffix('s') {
        (number, 1.0)
    } else if let Some(number) = text.strip_suffix('m') {
        (number, 60.0)
    } else if let Some(number) = text.strip_suffix('h') {
        (number, 3600.0)
    } else {
        return None;
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|value| *value > 0.0)
        .map(|value| value * scale)
}

fn label_value<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels
        .trim_end_matches('}')
        .split(',')
        .filter_map(|matcher| matcher.split_once('='))
        .find(|(label, _)| label.trim() == name)
        .map(|(_, value)| value.trim().trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sum_of_gauges_is_read_with_its_pools() {
        let signal = parse_query(
            r#"sum(kosmos_gateway_pool_pending_requests{job="kosmos-gateway",pool="decoder"}) + sum(kosmos_gateway_pool_inflight_requests{pool="decoder",namespace="kosmos"})"#,
        );
        assert_eq!(
            signal,
            Ok(Signal::GaugeSum(vec![
                (Gauge::PendingRequests, PoolKind::Decoder),
                (Gauge::InflightRequests, PoolKind::Decoder),
            ]))
        );
    }

    #[test]
    fn an_unknown_metric_is_refused_by_name() {
        let err = parse_query(r#"sum(kosmos_decoder_kv_usage{pool="decoder"})"#);
        assert!(
            matches!(&err, Err(message) if message.contains("kosmos_decoder_kv_usage")),
            "{err:?}"
        );
    }

    #[test]
    fn defaults_apply_where_the_yaml_is_silent() {
        let yaml = r#"
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: kosmos-encoder}
spec:
  scaleTargetRef: {name: kosmos-encoder}
  triggers:
    - type: prometheus
      metadata:
        query: sum(kosmos_gateway_pool_pending_images{pool="encoder"})
        threshold: "10"
"#;
        let specs = match parse_scaled_objects(yaml) {
            Ok(specs) => specs,
            Err(err) => panic!("{err}"),
        };
        let spec = &specs[0];
        assert_eq!(spec.polling_interval_seconds, 30.0);
        assert_eq!(spec.cooldown_seconds, 300.0);
        assert_eq!((spec.min_replicas, spec.max_replicas), (0, 100));
        assert_eq!(spec.scale_down, Rules::default_scale_down());
        assert_eq!(spec.triggers[0].metric_type, MetricType::AverageValue);
        assert_eq!(spec.triggers[0].name, "triggers[0]");
    }
}
