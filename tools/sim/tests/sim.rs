//! The simulator against queueing theory, itself (determinism, conservation) and the repository's KEDA manifests.

use std::path::{Path, PathBuf};

use kosmos_sim::calibration::{
    DecoderCalibration, EncoderCalibration, EncoderPoint, ServiceDistribution, StepPoint,
};
use kosmos_sim::cluster::{
    DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS, DropReason, Outcome,
    SCALE_TO_ZERO_MAX_WAIT_FOR_REPLICA_SECONDS,
};
use kosmos_sim::keda::{Gauge, MetricType, PolicyKind, PoolKind, SelectPolicy, Signal};
use kosmos_sim::trace::exponential;
use kosmos_sim::{
    Calibration, CompareParams, Deployment, KedaConfig, Request, Routing, Scaling, SimParams, Slo,
    TraceSpec, compare, simulate,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load_calibration(name: &str) -> Calibration {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("calibration")
        .join(name);
    Calibration::load(&path).unwrap_or_else(|err| panic!("{err}"))
}

fn load_keda() -> KedaConfig {
    KedaConfig::load_dir(&repo_root().join("k8s/components/keda"))
        .unwrap_or_else(|err| panic!("{err}"))
}

/// One encoder image per request and a decoder that answers at once: the encoder pool alone decides the wait.
fn single_server_calibration(images_per_second: f64) -> Calibration {
    Calibration {
        name: "mmc".to_owned(),
        source: "test".to_owned(),
        pod_startup_seconds: 0.0,
        encoder: EncoderCalibration {
            max_batch_images: 1,
            max_queue_delay_seconds: 0.0,
            max_queued_images: 1_000_000,
            service: ServiceDistribution::Exponential,
            throughput: vec![EncoderPoint {
                batch: 1,
                images_per_second,
            }],
        },
        decoder: DecoderCalibration {
            max_running_sequences: 1024,
            max_waiting_requests: 1_000_000,
            max_prefill_tokens_per_step: 1_000_000,
            prefill_tokens_per_second: 1.0e9,
            image_tokens: 0,
            step: vec![StepPoint {
                batch: 1,
                context: 1,
                ms: 0.001,
            }],
        },
    }
}

fn erlang_c_mean_wait(arrival_rate: f64, service_rate: f64, servers: u32) -> f64 {
    let offered = arrival_rate / service_rate;
    let mut term = 1.0;
    let mut below = 0.0;
    for k in 0..servers {
        if k > 0 {
            term *= offered / f64::from(k);
        }
        below += term;
    }
    let top =
        term * offered / f64::from(servers) * f64::from(servers) / (f64::from(servers) - offered);
    let waiting_probability = top / (below + top);
    waiting_probability / (f64::from(servers) * service_rate - arrival_rate)
}

#[test]
fn an_mmc_pool_waits_as_long_as_erlang_c_says() {
    let (servers, service_rate, arrival_rate) = (3, 1.0, 2.1);
    let calibration = single_server_calibration(service_rate);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut time = 0.0;
    let requests: Vec<Request> = (0..200_000)
        .map(|_| {
            time += exponential(&mut rng, arrival_rate);
            Request {
                arrival: time,
                images: 1,
                prompt_tokens: 1,
                output_tokens: 1,
                image_heavy: true,
            }
        })
        .collect();
    let outcome = simulate(&SimParams {
        calibration: &calibration,
        deployment: Deployment::Split {
            encoder: Scaling::Fixed(servers),
            decoder: Scaling::Fixed(1),
        },
        requests: &requests,
        horizon_seconds: time,
        routing: Routing::SharedQueue,
        seed: 5,
        sample_interval_seconds: 3600.0,
        max_wait_for_replica_seconds: DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS,
    });
    assert_eq!(outcome.encode_calls, 200_000);
    let simulated = outcome.encode_wait_seconds / outcome.encode_calls as f64;
    let expected = erlang_c_mean_wait(arrival_rate, service_rate, servers);
    let relative = (simulated - expected).abs() / expected;
    eprintln!("M/M/3 at rho 0.7: simulated mean wait {simulated:.4} s, Erlang C {expected:.4} s");
    assert!(
        relative < 0.03,
        "mean wait {simulated:.4} s, Erlang C {expected:.4} s ({:.1} % off)",
        100.0 * relative
    );
}

fn small_comparison(seed: u64) -> String {
    let calibration = load_calibration("gpu-class-assumed.toml");
    let keda = load_keda();
    let spec = TraceSpec::preset("shifting", 4.0, 1200.0).unwrap_or_else(|err| panic!("{err}"));
    let requests = spec.generate(seed);
    let comparison = compare(&CompareParams {
        calibration: &calibration,
        keda: &keda,
        requests: &requests,
        horizon_seconds: spec.duration_seconds,
        slo: Slo {
            ttft_seconds: 2.0,
            tpot_seconds: 0.1,
        },
        routing: Routing::PowerOfTwo,
        seed,
        sample_interval_seconds: 60.0,
        monolith_threshold: None,
        fixed: None,
        max_wait_for_replica_seconds: DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS,
    })
    .unwrap_or_else(|err| panic!("{err}"));
    serde_json::to_string(&comparison).unwrap_or_else(|err| panic!("{err}"))
}

#[test]
fn a_seed_gives_identical_output() {
    let first = small_comparison(11);
    let second = small_comparison(11);
    assert!(first == second, "two runs with seed 11 differ");
    assert_ne!(
        first,
        small_comparison(12),
        "another seed should give another trace"
    );
}

fn assert_conserved(outcome: &Outcome, requests: &[Request]) -> usize {
    assert_eq!(outcome.records.len(), requests.len());
    let mut dropped = 0;
    for (index, record) in outcome.records.iter().enumerate() {
        match (record.latency, record.dropped) {
            (Some(latency), None) => {
                let ttft = record.ttft.unwrap_or(f64::NAN);
                assert!(
                    ttft <= latency,
                    "request {index}: ttft {ttft} after completion {latency}"
                );
            }
            (None, Some(_)) => dropped += 1,
            other => {
                panic!("request {index} is neither completed nor dropped exactly once: {other:?}")
            }
        }
    }
    dropped
}

#[test]
fn every_request_completes_or_is_counted_as_dropped() {
    // Overload with small queues: replicas refuse calls (RESOURCE_EXHAUSTED after the gateway's retries).
    let mut calibration = load_calibration("cpu-2core.toml");
    calibration.encoder.max_queued_images = 8;
    calibration.decoder.max_waiting_requests = 4;
    let spec = TraceSpec::preset("image-heavy", 2.0, 900.0).unwrap_or_else(|err| panic!("{err}"));
    let requests = spec.generate(2);
    let keda = load_keda();
    let outcome = simulate(&SimParams {
        calibration: &calibration,
        deployment: Deployment::Split {
            encoder: Scaling::Autoscaled(keda.encoder.clone()),
            decoder: Scaling::Autoscaled(keda.decoder.clone()),
        },
        requests: &requests,
        horizon_seconds: spec.duration_seconds,
        routing: Routing::PowerOfTwo,
        seed: 2,
        sample_interval_seconds: 60.0,
        max_wait_for_replica_seconds: DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS,
    });
    let dropped = assert_conserved(&outcome, &requests);
    assert!(
        dropped > 0 && dropped < requests.len(),
        "dropped {dropped} of {}",
        requests.len()
    );
    assert!(
        outcome
            .records
            .iter()
            .any(|r| r.dropped == Some(DropReason::ResourceExhausted))
    );
}

/// `limits.max_waiting_for_replica_seconds` as `k8s/components/scale-to-zero` sets it: an independent read of the
/// component's gateway environment, so the test follows the manifest.
fn scale_to_zero_wait_bound() -> f64 {
    let path = repo_root().join("k8s/components/scale-to-zero/kustomization.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{err}"));
    let mut lines = text.lines().skip_while(|line| {
        !line.contains("KOSMOS_GATEWAY__LIMITS__MAX_WAITING_FOR_REPLICA_SECONDS")
    });
    lines.next();
    let value = lines
        .find_map(|line| line.trim().strip_prefix("value:"))
        .unwrap_or_else(|| panic!("{}: no value for the wait bound", path.display()));
    value
        .trim()
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|err| panic!("{}: `{value}`: {err}", path.display()))
}

#[test]
fn waiting_calls_wake_an_encoder_pool_at_zero() {
    let bound = scale_to_zero_wait_bound();
    assert_eq!(bound, SCALE_TO_ZERO_MAX_WAIT_FOR_REPLICA_SECONDS);
    let calibration = load_calibration("gpu-class-assumed.toml");
    let keda = load_keda();
    let mut to_zero = keda.encoder.clone();
    to_zero.min_replicas = 0;
    let spec = TraceSpec::preset("image-heavy", 2.0, 900.0).unwrap_or_else(|err| panic!("{err}"));
    let requests = spec.generate(2);
    let run = |max_wait_for_replica_seconds: f64| {
        simulate(&SimParams {
            calibration: &calibration,
            deployment: Deployment::Split {
                encoder: Scaling::Autoscaled(to_zero.clone()),
                decoder: Scaling::Fixed(1),
            },
            requests: &requests,
            horizon_seconds: spec.duration_seconds,
            routing: Routing::PowerOfTwo,
            seed: 2,
            sample_interval_seconds: 15.0,
            max_wait_for_replica_seconds,
        })
    };
    let count = |outcome: &Outcome, reason: DropReason| {
        outcome
            .records
            .iter()
            .filter(|record| record.dropped == Some(reason))
            .count()
    };
    let with_images: Vec<usize> = (0..requests.len())
        .filter(|&index| requests[index].images > 0)
        .collect();

    // Held for up to 300 s, the calls of a pool at zero are pending: KEDA's activation wakes it, and the first pod
    // serves after the start-up time.
    let outcome = run(bound);
    let dropped = assert_conserved(&outcome, &requests);
    let encoder = &outcome.pools[0];
    assert_eq!(encoder.kind, PoolKind::Encoder);
    assert!(encoder.peak_replicas >= 1, "the encoder pool never woke");
    let startup = calibration.pod_startup_seconds;
    let first = with_images[0];
    let first_arrival = requests[first].arrival;
    assert!(
        encoder
            .timeline
            .iter()
            .filter(|sample| sample.time < first_arrival + startup)
            .all(|sample| sample.ready == 0),
        "an encoder served before a pod could start"
    );
    let first_ttft = outcome.records[first].ttft;
    assert!(
        first_ttft.is_some_and(|ttft| ttft >= startup && ttft < bound),
        "the first request with an image waited for the first pod: TTFT {first_ttft:?}, start-up {startup} s"
    );
    let unavailable = count(&outcome, DropReason::Unavailable);
    let exhausted = count(&outcome, DropReason::ResourceExhausted);
    let completed_with_images = with_images
        .iter()
        .filter(|&&index| outcome.records[index].latency.is_some())
        .count();
    eprintln!(
        "scale to zero, {bound} s wait: {} requests ({} with images): {completed_with_images} with images \
         completed, {unavailable} UNAVAILABLE, {exhausted} RESOURCE_EXHAUSTED; encoder peak {}",
        requests.len(),
        with_images.len(),
        encoder.peak_replicas
    );
    assert!(
        unavailable * 10 < with_images.len(),
        "{unavailable} UNAVAILABLE of {} requests with images",
        with_images.len()
    );
    assert!(
        completed_with_images * 2 > with_images.len(),
        "{completed_with_images} of {} requests with images completed",
        with_images.len()
    );
    assert_eq!(dropped, unavailable + exhausted);

    // With the gateway's default 3 s the pool wakes too (a poll sees the calls of the last 3 s), but the calls
    // made while its pod starts give up first.
    let short = run(DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS);
    assert_conserved(&short, &requests);
    assert!(short.pools[0].peak_replicas >= 1);
    let short_unavailable = count(&short, DropReason::Unavailable);
    eprintln!(
        "scale to zero, {DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS} s wait: {short_unavailable} UNAVAILABLE"
    );
    assert!(
        short_unavailable > unavailable,
        "3 s wait: {short_unavailable} UNAVAILABLE, {bound} s wait: {unavailable}"
    );
    assert!(
        short.records[first].dropped == Some(DropReason::Unavailable),
        "with a 3 s wait the first request cannot outlast the start-up time"
    );
}

#[test]
fn the_keda_scaled_objects_of_the_repository_are_read() {
    let keda = load_keda();
    // An independent, untyped read of the same file for the thresholds, so the test follows the manifests.
    let text = std::fs::read_to_string(repo_root().join("k8s/components/keda/scaledobjects.yaml"))
        .unwrap_or_else(|err| panic!("{err}"));
    let mut thresholds = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: serde_yaml_ng::Value =
            serde::Deserialize::deserialize(document).unwrap_or_else(|err| panic!("{err}"));
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(triggers) = value["spec"]["triggers"].as_sequence() {
            for trigger in triggers {
                if let Some(threshold) = trigger["metadata"]["threshold"].as_str() {
                    let trigger_name = trigger["name"].as_str().unwrap_or_default().to_owned();
                    thresholds.push((
                        name.clone(),
                        trigger_name,
                        threshold.parse::<f64>().unwrap_or(f64::NAN),
                    ));
                }
            }
        }
    }
    for spec in [&keda.encoder, &keda.decoder] {
        assert_eq!(spec.polling_interval_seconds, 15.0, "{}", spec.name);
        assert_eq!(spec.cooldown_seconds, 300.0, "{}", spec.name);
        assert_eq!(
            (spec.min_replicas, spec.max_replicas),
            (1, 8),
            "{}",
            spec.name
        );
        assert_eq!(spec.scale_up.stabilization_window_seconds, 0.0);
        assert_eq!(spec.scale_up.select_policy, SelectPolicy::Max);
        assert_eq!(spec.scale_up.policies.len(), 2);
        assert_eq!(spec.scale_up.policies[0].kind, PolicyKind::Pods);
        assert_eq!(spec.scale_up.policies[1].kind, PolicyKind::Percent);
        assert_eq!(spec.scale_down.stabilization_window_seconds, 600.0);
        assert_eq!(spec.scale_down.select_policy, SelectPolicy::Min);
        assert_eq!(spec.scale_down.policies[0].value, 1);
        assert_eq!(spec.scale_down.policies[0].period_seconds, 300.0);
        for trigger in &spec.triggers {
            let expected = thresholds
                .iter()
                .find(|(object, name, _)| object == &spec.name && name == &trigger.name)
                .map(|(_, _, value)| *value);
            assert_eq!(
                Some(trigger.threshold),
                expected,
                "{} / {}",
                spec.name,
                trigger.name
            );
        }
    }
    let names = |spec: &kosmos_sim::keda::ScalerSpec| -> Vec<String> {
        spec.triggers.iter().map(|t| t.name.clone()).collect()
    };
    assert_eq!(names(&keda.encoder), ["encoder-calls", "encoder-images"]);
    assert_eq!(names(&keda.decoder), ["decoder-calls", "decoder-ttft-p95"]);
    assert_eq!(
        keda.encoder.triggers[0].signal,
        Signal::GaugeSum(vec![
            (Gauge::PendingRequests, PoolKind::Encoder),
            (Gauge::InflightRequests, PoolKind::Encoder),
        ])
    );
    assert_eq!(
        keda.encoder.triggers[1].signal,
        Signal::GaugeSum(vec![(Gauge::PendingImages, PoolKind::Encoder)])
    );
    let guard = &keda.decoder.triggers[1];
    assert_eq!(guard.metric_type, MetricType::Value);
    assert_eq!(
        guard.signal,
        Signal::DecoderTtftQuantile {
            quantile: 0.95,
            window_seconds: 120.0,
        }
    );
}

#[test]
fn a_burst_scales_the_encoder_pool_out_after_start_up_and_back_in() {
    let calibration = load_calibration("cpu-2core.toml");
    let keda = load_keda();
    // 200 images at t = 0..20 s on a CPU encoder (about 1.3 images/s per replica), then silence: far above the
    // 32 pending images per replica the ScaledObject targets.
    let requests: Vec<Request> = (0..200)
        .map(|index| Request {
            arrival: f64::from(index) * 0.1,
            images: 1,
            prompt_tokens: 4,
            output_tokens: 1,
            image_heavy: true,
        })
        .collect();
    let outcome = simulate(&SimParams {
        calibration: &calibration,
        deployment: Deployment::Split {
            encoder: Scaling::Autoscaled(keda.encoder.clone()),
            decoder: Scaling::Fixed(1),
        },
        requests: &requests,
        horizon_seconds: 3600.0,
        routing: Routing::PowerOfTwo,
        seed: 1,
        sample_interval_seconds: 15.0,
        max_wait_for_replica_seconds: DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS,
    });
    assert_conserved(&outcome, &requests);
    let encoder = &outcome.pools[0];
    assert_eq!(encoder.kind, PoolKind::Encoder);
    assert!(encoder.peak_replicas > 1, "peak {}", encoder.peak_replicas);
    let startup = calibration.pod_startup_seconds;
    // Nothing new serves before the start-up time has passed.
    assert!(
        encoder
            .timeline
            .iter()
            .filter(|sample| sample.time < startup)
            .all(|sample| sample.ready == 1)
    );
    // Back at min after the 600 s window and one pod per 300 s.
    let last = encoder.timeline.last().map(|sample| sample.desired);
    assert_eq!(last, Some(keda.encoder.min_replicas));
}
