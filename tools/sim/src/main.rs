//! `kosmos-sim`: replays a trace through the split, monolithic and fixed deployments and writes `report.json` and
//! `replicas.svg` (tools/sim/README.md).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Parser;
use kosmos_sim::cluster::{
    DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS, SCALE_TO_ZERO_MAX_WAIT_FOR_REPLICA_SECONDS,
};
use kosmos_sim::compare::DeploymentReport;
use kosmos_sim::{Calibration, CompareParams, KedaConfig, Routing, Slo, TraceSpec, chart, trace};

/// Discrete-event autoscaling simulator of kosmos-serve.
#[derive(Debug, Parser)]
#[command(name = "kosmos-sim", version)]
struct Args {
    /// Calibration file (TOML or JSON): service times and knobs (tools/sim/calibration/*.toml).
    #[arg(long)]
    calibration: PathBuf,
    /// Directory of the KEDA ScaledObjects to simulate.
    #[arg(long, default_value = "k8s/components/keda")]
    keda: PathBuf,
    /// Built-in traffic pattern: image-heavy, image-light or shifting.
    #[arg(long, conflicts_with_all = ["trace_spec", "trace"])]
    preset: Option<String>,
    /// Traffic pattern from a TOML file (the fields of `TraceSpec`).
    #[arg(long, conflicts_with = "trace")]
    trace_spec: Option<PathBuf>,
    /// A JSON-lines trace file to replay.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Mean arrival rate of a preset, requests/s.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Length of a preset trace (also its diurnal period), seconds; for a trace file, the horizon (default: its last
    /// arrival).
    #[arg(long)]
    duration: Option<f64>,
    /// Seed of the trace and of every run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// TTFT SLO, seconds.
    #[arg(long, default_value_t = 2.0)]
    slo_ttft: f64,
    /// TPOT SLO, seconds.
    #[arg(long, default_value_t = 0.1)]
    slo_tpot: f64,
    /// Replica choice: power-of-two (the gateway's) or shared-queue (what-if).
    #[arg(long, default_value = "power-of-two", value_parser = parse_routing)]
    routing: Routing,
    /// Target per replica of the monolithic pool (default: the decoder-calls threshold).
    #[arg(long)]
    monolith_threshold: Option<f64>,
    /// Fixed sizing as ENCODERS,DECODERS (default: sized for the busiest minute).
    #[arg(long, value_parser = parse_pair)]
    fixed: Option<(u32, u32)>,
    /// Override a trigger's threshold by trigger name, e.g. `encoder-images=16` (repeatable; what-if runs).
    #[arg(long = "set-threshold", value_parser = parse_assignment)]
    set_threshold: Vec<(String, f64)>,
    /// Override the calibration's pod start-up time, seconds.
    #[arg(long)]
    startup: Option<f64>,
    /// As `k8s/components/scale-to-zero` deploys: both ScaledObjects at `minReplicaCount` 0 (so the monolithic pool
    /// too) and, unless `--max-wait-for-replica` says otherwise, a 300 s wait for a replica.
    #[arg(long)]
    scale_to_zero: bool,
    /// How long the gateway holds a call (as pending) for a pool with no ready replica before it drops the request
    /// UNAVAILABLE, seconds (`limits.max_waiting_for_replica_seconds`; default 3, or 300 with `--scale-to-zero`).
    #[arg(long)]
    max_wait_for_replica: Option<f64>,
    /// Timeline sampling period, seconds.
    #[arg(long, default_value_t = 60.0)]
    sample_interval: f64,
    /// Output directory for report.json and replicas.svg.
    #[arg(long, default_value = "target/sim")]
    out: PathBuf,
    /// Also write the trace used, as JSON lines.
    #[arg(long)]
    write_trace: Option<PathBuf>,
}

fn parse_routing(text: &str) -> Result<Routing, String> {
    match text {
        "power-of-two" | "p2c" => Ok(Routing::PowerOfTwo),
        "shared-queue" => Ok(Routing::SharedQueue),
        other => Err(format!("`{other}`: expected power-of-two or shared-queue")),
    }
}

fn parse_pair(text: &str) -> Result<(u32, u32), String> {
    let (encoders, decoders) = text
        .split_once(',')
        .ok_or_else(|| format!("`{text}`: expected ENCODERS,DECODERS"))?;
    let number = |part: &str| {
        part.trim()
            .parse::<u32>()
            .map_err(|err| format!("`{part}` in `{text}`: {err}"))
    };
    Ok((number(encoders)?, number(decoders)?))
}

fn parse_assignment(text: &str) -> Result<(String, f64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected TRIGGER=VALUE"))?;
    let value: f64 = value
        .trim()
        .parse()
        .map_err(|err| format!("`{value}` in `{text}`: {err}"))?;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("`{text}`: the threshold must be > 0"));
    }
    Ok((name.trim().to_owned(), value))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut calibration = Calibration::load(&args.calibration)?;
    if let Some(startup) = args.startup {
        calibration.pod_startup_seconds = startup;
        calibration.validate()?;
    }
    let mut keda = KedaConfig::load_dir(&args.keda)?;
    for (name, value) in &args.set_threshold {
        let trigger = keda
            .encoder
            .triggers
            .iter_mut()
            .chain(keda.decoder.triggers.iter_mut())
            .find(|trigger| &trigger.name == name);
        match trigger {
            Some(trigger) => trigger.threshold = *value,
            None => bail!(
                "--set-threshold: no trigger named `{name}` in the encoder or decoder ScaledObject"
            ),
        }
    }
    if args.scale_to_zero {
        keda.encoder.min_replicas = 0;
        keda.decoder.min_replicas = 0;
    }
    let max_wait_for_replica = args.max_wait_for_replica.unwrap_or(if args.scale_to_zero {
        SCALE_TO_ZERO_MAX_WAIT_FOR_REPLICA_SECONDS
    } else {
        DEFAULT_MAX_WAIT_FOR_REPLICA_SECONDS
    });
    let (requests, horizon) = match (&args.preset, &args.trace_spec, &args.trace) {
        (_, _, Some(path)) => {
            let requests = trace::read_trace(path)?;
            let last = requests.last().map_or(0.0, |r| r.arrival);
            (requests, args.duration.unwrap_or(last.ceil().max(1.0)))
        }
        (_, Some(path), None) => {
            let spec = TraceSpec::load(path)?;
            (spec.generate(args.seed), spec.duration_seconds)
        }
        (preset, None, None) => {
            let name = preset.as_deref().unwrap_or("shifting");
            let spec = TraceSpec::preset(name, args.rate, args.duration.unwrap_or(14_400.0))?;
            (spec.generate(args.seed), spec.duration_seconds)
        }
    };
    if let Some(path) = &args.write_trace {
        trace::write_trace(path, &requests)?;
    }
    let comparison = kosmos_sim::compare(&CompareParams {
        calibration: &calibration,
        keda: &keda,
        requests: &requests,
        horizon_seconds: horizon,
        slo: Slo {
            ttft_seconds: args.slo_ttft,
            tpot_seconds: args.slo_tpot,
        },
        routing: args.routing,
        seed: args.seed,
        sample_interval_seconds: args.sample_interval,
        monolith_threshold: args.monolith_threshold,
        fixed: args.fixed,
        max_wait_for_replica_seconds: max_wait_for_replica,
    })?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating `{}`", args.out.display()))?;
    let json_path = args.out.join("report.json");
    let json = serde_json::to_string_pretty(&comparison)?;
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("writing `{}`", json_path.display()))?;
    let svg_path = args.out.join("replicas.svg");
    std::fs::write(&svg_path, chart::render_svg(&comparison))
        .with_context(|| format!("writing `{}`", svg_path.display()))?;

    println!(
        "{} requests ({} images) over {:.1} h, calibration {}, SLO TTFT <= {} s and TPOT <= {} s, \
         wait for a replica <= {} s",
        comparison.requests,
        comparison.images,
        horizon / 3600.0,
        comparison.calibration,
        args.slo_ttft,
        args.slo_tpot,
        comparison.max_wait_for_replica_seconds
    );
    println!(
        "{:<11} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9} {:>9} {:>7} {:>9}",
        "deployment",
        "GPU-h",
        "SLO%",
        "heavy%",
        "light%",
        "TTFT%",
        "TPOT%",
        "p99 TTFT",
        "p99 TPOT",
        "dropped",
        "peak GPUs"
    );
    for deployment in &comparison.deployments {
        print_row(deployment);
    }
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

fn print_row(deployment: &DeploymentReport) {
    let seconds = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
    let dropped: u64 = deployment.dropped.values().sum();
    let peak: u32 = deployment.pools.iter().map(|pool| pool.peak_replicas).sum();
    println!(
        "{:<11} {:>7.2} {:>6.1} {:>6.1} {:>6.1} {:>6.1} {:>6.1} {:>9} {:>9} {:>7} {:>9}",
        deployment.name,
        deployment.gpu_hours,
        100.0 * deployment.all.slo_attainment,
        100.0 * deployment.image_heavy.slo_attainment,
        100.0 * deployment.image_light.slo_attainment,
        100.0 * deployment.all.ttft_attainment,
        100.0 * deployment.all.tpot_attainment,
        seconds(deployment.all.ttft_p99),
        seconds(deployment.all.tpot_p99),
        dropped,
        peak
    );
}
