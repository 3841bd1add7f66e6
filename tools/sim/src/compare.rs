//! The comparison: one trace through three deployments, reported as GPU-hours, SLO attainment and latency.
//!
//! Policy:
//! - **split**: the encoder and decoder pools, each autoscaled by its own ScaledObject from `k8s/components/keda`;
//! - **monolithic**: one pool of pods hosting encoder and decoder on one GPU, scaled on one signal: the gateway's
//!   pending + in-flight requests of that pool, `AverageValue` at the decoder-calls threshold (a pod runs as many
//!   sequences as a decoder pod), with the decoder ScaledObject's polling, cooldown and behaviour and a replica
//!   range of `[max(min_enc, min_dec), max_enc + max_dec]` (the same GPU ceiling as the split);
//! - **fixed**: the split pools at fixed sizes, by default sized for the trace's busiest minute at 80 % device
//!   busy time (encoder: images × batch time per image at full batches; decoder: prefill plus output tokens at the
//!   step time of a full batch), within each ScaledObject's replica range;
//! - a GPU-hour is a replica-hour (one GPU per pod); SLO attainment is the share of *all* requests of the trace
//!   whose TTFT and TPOT are both within the SLO (a dropped request misses); latency percentiles are over the
//!   requests that got a first token.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::calibration::Calibration;
use crate::cluster::{
    Deployment, Outcome, PoolSample, RequestRecord, Routing, Scaling, SimParams, quantile_of,
    simulate,
};
use crate::error::{Result, SimError};
use crate::keda::{Gauge, KedaConfig, MetricType, PoolKind, ScalerSpec, Signal, Trigger};
use crate::trace::Request;

/// The latency objectives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// Time to first token, seconds.
    pub ttft_seconds: f64,
    /// Time per output token after the first, seconds.
    pub tpot_seconds: f64,
}

/// Inputs of a comparison.
#[derive(Debug, Clone)]
pub struct CompareParams<'a> {
    /// Service times.
    pub calibration: &'a Calibration,
    /// The ScaledObjects.
    pub keda: &'a KedaConfig,
    /// The trace.
    pub requests: &'a [Request],
    /// Replica-hours and timelines cover `[0, horizon]`.
    pub horizon_seconds: f64,
    /// The SLOs.
    pub slo: Slo,
    /// Replica choice.
    pub routing: Routing,
    /// Seed of every run's random stream.
    pub seed: u64,
    /// Timeline sampling period.
    pub sample_interval_seconds: f64,
    /// The monolithic pool's target per replica; `None`: the decoder's `AverageValue` gauge threshold.
    pub monolith_threshold: Option<f64>,
    /// Fixed (encoders, decoders); `None`: sized for the busiest minute.
    pub fixed: Option<(u32, u32)>,
    /// How long a call waits for a replica of a pool that has none ready before its request is dropped
    /// ([`SimParams::max_wait_for_replica_seconds`]; finite, >= 0).
    pub max_wait_for_replica_seconds: f64,
}

/// One pool of a deployment, summarised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolReport {
    /// Which pool.
    pub kind: PoolKind,
    /// Replica-hours.
    pub gpu_hours: f64,
    /// Mean replicas over the horizon.
    pub mean_replicas: f64,
    /// Most replicas at once.
    pub peak_replicas: u32,
    /// Replicas over time.
    pub timeline: Vec<PoolSample>,
}

/// SLO attainment and tail latency of a group of requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Requests in the group.
    pub requests: u64,
    /// Requests that completed.
    pub completed: u64,
    /// Share meeting both SLOs.
    pub slo_attainment: f64,
    /// Share meeting the TTFT SLO.
    pub ttft_attainment: f64,
    /// Share meeting the TPOT SLO (one-token outputs meet it when they complete).
    pub tpot_attainment: f64,
    /// TTFT median, seconds.
    pub ttft_p50: Option<f64>,
    /// TTFT p90.
    pub ttft_p90: Option<f64>,
    /// TTFT p99.
    pub ttft_p99: Option<f64>,
    /// TPOT median.
    pub tpot_p50: Option<f64>,
    /// TPOT p99.
    pub tpot_p99: Option<f64>,
}

/// One deployment's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentReport {
    /// `split`, `monolithic` or `fixed`.
    pub name: String,
    /// How it was scaled.
    pub description: String,
    /// Replica-hours of every pool.
    pub gpu_hours: f64,
    /// Requests meeting both SLOs per GPU-hour.
    pub goodput_per_gpu_hour: f64,
    /// All requests.
    pub all: LatencyReport,
    /// Image-heavy requests.
    pub image_heavy: LatencyReport,
    /// Image-light requests.
    pub image_light: LatencyReport,
    /// Dropped requests by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Per pool.
    pub pools: Vec<PoolReport>,
}

/// Offered load per timeline interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrafficSample {
    /// Interval start.
    pub time: f64,
    /// Arrivals per second in the interval.
    pub rate: f64,
    /// Share of image-heavy arrivals in the interval.
    pub image_heavy_share: f64,
}

/// Everything a comparison says, as written to JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Calibration name.
    pub calibration: String,
    /// Where its numbers come from.
    pub calibration_source: String,
    /// Pod start-up time used.
    pub pod_startup_seconds: f64,
    /// Requests in the trace.
    pub requests: u64,
    /// Images in the trace.
    pub images: u64,
    /// Horizon.
    pub horizon_seconds: f64,
    /// The SLOs.
    pub slo: Slo,
    /// Replica choice.
    pub routing: Routing,
    /// Seed.
    pub seed: u64,
    /// The autoscalers used (split encoder, split decoder, monolithic).
    pub autoscalers: Vec<ScalerSpec>,
    /// Fixed sizing used (encoders, decoders).
    pub fixed: (u32, u32),
    /// The gateway's wait for a replica of a pool that has none ready, seconds.
    pub max_wait_for_replica_seconds: f64,
    /// Offered load over time.
    pub traffic: Vec<TrafficSample>,
    /// split, monolithic, fixed.
    pub deployments: Vec<DeploymentReport>,
}

/// The monolithic pool's autoscaler, derived from the decoder's ScaledObject (module docs).
pub fn monolith_spec(keda: &KedaConfig, threshold: Option<f64>) -> Result<ScalerSpec> {
    let threshold = match threshold {
        Some(value) if value.is_finite() && value > 0.0 => value,
        Some(value) => {
            return Err(SimError::Params {
                key: "monolith_threshold".to_owned(),
                message: format!("must be > 0, got {value}"),
            });
        }
        None => keda
            .decoder
            .triggers
            .iter()
            .find(|trigger| {
                trigger.metric_type == MetricType::AverageValue
                    && matches!(trigger.signal, Signal::GaugeSum(_))
            })
            .map(|trigger| trigger.threshold)
            .ok_or_else(|| SimError::Keda {
                object: keda.decoder.name.clone(),
                message:
                    "has no AverageValue gauge trigger to derive the monolithic threshold from"
                        .to_owned(),
            })?,
    };
    Ok(ScalerSpec {
        name: "kosmos-monolith (derived)".to_owned(),
        min_replicas: keda.encoder.min_replicas.max(keda.decoder.min_replicas),
        max_replicas: keda.encoder.max_replicas + keda.decoder.max_replicas,
        triggers: vec![Trigger {
            name: "monolith-calls".to_owned(),
            metric_type: MetricType::AverageValue,
            threshold,
            activation_threshold: 0.0,
            signal: Signal::GaugeSum(vec![
                (Gauge::PendingRequests, PoolKind::Monolith),
                (Gauge::InflightRequests, PoolKind::Monolith),
            ]),
        }],
        ..keda.decoder.clone()
    })
}

/// Fixed pool sizes for the busiest minute of the trace at 80 % busy time (module docs).
pub fn peak_sizing(
    calibration: &Calibration,
    keda: &KedaConfig,
    requests: &[Request],
) -> (u32, u32) {
    const WINDOW: f64 = 60.0;
    const UTILISATION: f64 = 0.8;
    let full_batch = calibration.encoder.max_batch_images;
    let seconds_per_image = calibration.encoder_batch_seconds(full_batch) / f64::from(full_batch);
    let rows = calibration.decoder.max_running_sequences;
    let mut encoder_busy: BTreeMap<u64, f64> = BTreeMap::new();
    let mut decoder_busy: BTreeMap<u64, f64> = BTreeMap::new();
    for request in requests {
        let bucket = (request.arrival / WINDOW) as u64;
        let prompt = request.prompt_tokens + request.images * calibration.decoder.image_tokens;
        let context = f64::from(prompt) + f64::from(request.output_tokens) / 2.0;
        let step = calibration.decoder_step_seconds(rows, context, 0);
        let decode = f64::from(request.output_tokens) * step / f64::from(rows)
            + f64::from(prompt) / calibration.decoder.prefill_tokens_per_second;
        *encoder_busy.entry(bucket).or_default() += f64::from(request.images) * seconds_per_image;
        *decoder_busy.entry(bucket).or_default() += decode;
    }
    let size = |busy: &BTreeMap<u64, f64>, spec: &ScalerSpec| {
        let peak = busy.values().copied().fold(0.0, f64::max);
        let replicas = (peak / WINDOW / UTILISATION).ceil() as u32;
        replicas.clamp(spec.min_replicas.max(1), spec.max_replicas)
    };
    (
        size(&encoder_busy, &keda.encoder),
        size(&decoder_busy, &keda.decoder),
    )
}

/// Runs the three deployments over the trace.
pub fn compare(params: &CompareParams<'_>) -> Result<Comparison> {
    if !(params.horizon_seconds.is_finite() && params.horizon_seconds > 0.0) {
        return Err(SimError::Params {
            key: "horizon_seconds".to_owned(),
            message: format!("must be > 0, got {}", params.horizon_seconds),
        });
    }
    if !(params.sample_interval_seconds.is_finite() && params.sample_interval_seconds > 0.0) {
        return Err(SimError::Params {
            key: "sample_interval_seconds".to_owned(),
            message: format!("must be > 0, got {}", params.sample_interval_seconds),
        });
    }
    if !(params.max_wait_for_replica_seconds.is_finite()
        && params.max_wait_for_replica_seconds >= 0.0)
    {
        return Err(SimError::Params {
            key: "max_wait_for_replica_seconds".to_owned(),
            message: format!("must be >= 0, got {}", params.max_wait_for_replica_seconds),
        });
    }
    let monolith = monolith_spec(params.keda, params.monolith_threshold)?;
    let fixed = params
        .fixed
        .unwrap_or_else(|| peak_sizing(params.calibration, params.keda, params.requests));
    let deployments = [
        (
            "split",
            format!(
                "encoder and decoder pools, KEDA `{}` and `{}`",
                params.keda.encoder.name, params.keda.decoder.name
            ),
            Deployment::Split {
                encoder: Scaling::Autoscaled(params.keda.encoder.clone()),
                decoder: Scaling::Autoscaled(params.keda.decoder.clone()),
            },
        ),
        (
            "monolithic",
            format!(
                "encoder + decoder in one pod, scaled on pending + in-flight requests, {} per replica",
                monolith.triggers[0].threshold
            ),
            Deployment::Monolithic {
                pods: Scaling::Autoscaled(monolith.clone()),
            },
        ),
        (
            "fixed",
            format!(
                "split pools fixed at {} encoders + {} decoders",
                fixed.0, fixed.1
            ),
            Deployment::Split {
                encoder: Scaling::Fixed(fixed.0),
                decoder: Scaling::Fixed(fixed.1),
            },
        ),
    ];
    let mut reports = Vec::new();
    for (name, description, deployment) in deployments {
        let outcome = simulate(&SimParams {
            calibration: params.calibration,
            deployment,
            requests: params.requests,
            horizon_seconds: params.horizon_seconds,
            routing: params.routing,
            seed: params.seed,
            sample_interval_seconds: params.sample_interval_seconds,
            max_wait_for_replica_seconds: params.max_wait_for_replica_seconds,
        });
        reports.push(report(name, description, &outcome, params));
    }
    Ok(Comparison {
        calibration: params.calibration.name.clone(),
        calibration_source: params.calibration.source.clone(),
        pod_startup_seconds: params.calibration.pod_startup_seconds,
        requests: params.requests.len() as u64,
        images: params.requests.iter().map(|r| u64::from(r.images)).sum(),
        horizon_seconds: params.horizon_seconds,
        slo: params.slo,
        routing: params.routing,
        seed: params.seed,
        autoscalers: vec![
            params.keda.encoder.clone(),
            params.keda.decoder.clone(),
            monolith,
        ],
        fixed,
        max_wait_for_replica_seconds: params.max_wait_for_replica_seconds,
        traffic: traffic(
            params.requests,
            params.horizon_seconds,
            params.sample_interval_seconds,
        ),
        deployments: reports,
    })
}

fn report(
    name: &str,
    description: String,
    outcome: &Outcome,
    params: &CompareParams<'_>,
) -> DeploymentReport {
    let hours = |seconds: f64| seconds / 3600.0;
    let pools: Vec<PoolReport> = outcome
        .pools
        .iter()
        .map(|pool| PoolReport {
            kind: pool.kind,
            gpu_hours: hours(pool.replica_seconds),
            mean_replicas: pool.replica_seconds / params.horizon_seconds,
            peak_replicas: pool.peak_replicas,
            timeline: pool.timeline.clone(),
        })
        .collect();
    let gpu_hours: f64 = pools.iter().map(|pool| pool.gpu_hours).sum();
    let all: Vec<&RequestRecord> = outcome.records.iter().collect();
    let heavy: Vec<&RequestRecord> = outcome.records.iter().filter(|r| r.image_heavy).collect();
    let light: Vec<&RequestRecord> = outcome.records.iter().filter(|r| !r.image_heavy).collect();
    let all_report = latency(&all, params.slo);
    let mut dropped = BTreeMap::new();
    for record in &outcome.records {
        if let Some(reason) = record.dropped {
            let key = serde_json::to_value(reason)
                .ok()
                .and_then(|value| value.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{reason:?}"));
            *dropped.entry(key).or_insert(0) += 1;
        }
    }
    let good = all_report.slo_attainment * all_report.requests as f64;
    DeploymentReport {
        name: name.to_owned(),
        description,
        gpu_hours,
        goodput_per_gpu_hour: if gpu_hours > 0.0 {
            good / gpu_hours
        } else {
            0.0
        },
        all: all_report,
        image_heavy: latency(&heavy, params.slo),
        image_light: latency(&light, params.slo),
        dropped,
        pools,
    }
}

fn latency(records: &[&RequestRecord], slo: Slo) -> LatencyReport {
    let count = records.len() as u64;
    let share = |hits: usize| {
        if count == 0 {
            0.0
        } else {
            hits as f64 / count as f64
        }
    };
    let ttft_ok = |record: &RequestRecord| record.ttft.is_some_and(|ttft| ttft <= slo.ttft_seconds);
    let tpot_ok = |record: &RequestRecord| {
        record.latency.is_some() && record.tpot().is_none_or(|tpot| tpot <= slo.tpot_seconds)
    };
    let mut ttfts: Vec<f64> = records.iter().filter_map(|r| r.ttft).collect();
    let mut tpots: Vec<f64> = records.iter().filter_map(|r| r.tpot()).collect();
    LatencyReport {
        requests: count,
        completed: records.iter().filter(|r| r.latency.is_some()).count() as u64,
        slo_attainment: share(records.iter().filter(|r| ttft_ok(r) && tpot_ok(r)).count()),
        ttft_attainment: share(records.iter().filter(|r| ttft_ok(r)).count()),
        tpot_attainment: share(records.iter().filter(|r| tpot_ok(r)).count()),
        ttft_p50: quantile_of(&mut ttfts, 0.5),
        ttft_p90: quantile_of(&mut ttfts, 0.9),
        ttft_p99: quantile_of(&mut ttfts, 0.99),
        tpot_p50: quantile_of(&mut tpots, 0.5),
        tpot_p99: quantile_of(&mut tpots, 0.99),
    }
}

fn traffic(requests: &[Request], horizon: f64, interval: f64) -> Vec<TrafficSample> {
    let buckets = (horizon / interval).ceil() as usize;
    let mut counts = vec![(0u64, 0u64); buckets];
    for request in requests {
        let bucket = (request.arrival / interval) as usize;
        if let Some((total, heavy)) = counts.get_mut(bucket) {
            *total += 1;
            *heavy += u64::from(request.image_heavy);
        }
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(index, (total, heavy))| TrafficSample {
            time: index as f64 * interval,
            rate: total as f64 / interval,
            image_heavy_share: if total == 0 {
                0.0
            } else {
                heavy as f64 / total as f64
            },
        })
        .collect()
}
