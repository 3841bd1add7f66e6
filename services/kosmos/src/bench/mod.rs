//! `kosmos bench`: a load generator for a running gateway (the public API, `kosmos.v1.Kosmos`, over gRPC).
//!
//! Open loop (`--rate`: Poisson arrivals; a comma list makes a sweep) or closed loop (`--concurrency`), bounded by
//! `--requests` or `--duration`, seeded. Each request is timed from the client: time to first token (TTFT), time
//! per output token (TPOT), inter-token latency (ITL), end-to-end latency; every request ends in a record, OK or
//! counted by its gRPC status code. Prints a Markdown table, writes `--json` (schema in [`schema`]) and, for a
//! sweep, `--chart` (SVG). Definitions follow `vllm bench serve`: TPOT = (e2e − TTFT) / (output tokens − 1), ITL =
//! gaps between consecutive stream messages carrying tokens, percentiles interpolated linearly.

mod chart;
mod report;
mod runner;
pub mod schema;
mod stats;
mod workload;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kosmos_proto::v1 as pb;

use crate::client::Connection;
use runner::{Bound, Mode, RunParams};
use schema::{BenchConfig, LengthRange, Load, Report, Run, SCHEMA_VERSION};
use stats::Slo;
use workload::{ImageSource, Workload, WorkloadSpec};

/// Which RPC to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// GenerateStream: generation, streamed (TTFT, TPOT, ITL, end-to-end).
    GenerateStream,
    /// Score: candidate log-likelihoods (end-to-end latency only).
    Score,
}

/// An offered rate: requests/s, or `inf` for every request at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(Option<f64>);

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("inf") {
            return Ok(Self(None));
        }
        match text.parse::<f64>() {
            Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(Self(Some(rate))),
            _ => Err(format!(
                "a rate is a positive number of requests/s or `inf`, got `{text}`"
            )),
        }
    }
}

/// A length, fixed (`48`) or a range drawn uniformly (`48..64`, both ends included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Length(LengthRange);

impl FromStr for Length {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let number = |part: &str| {
            part.trim()
                .parse::<u32>()
                .map_err(|_| format!("a length is N or MIN..MAX (whole numbers), got `{text}`"))
        };
        let (min, max) = match text.split_once("..") {
            Some((min, max)) => (number(min)?, number(max.trim_start_matches('='))?),
            None => {
                let fixed = number(text)?;
                (fixed, fixed)
            }
        };
        if min > max {
            return Err(format!(
                "the range `{text}` is empty (its minimum exceeds its maximum)"
            ));
        }
        Ok(Self(LengthRange { min, max }))
    }
}

/// An image size, `WIDTHxHEIGHT` in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    width: u32,
    height: u32,
}

impl FromStr for ImageSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parsed = text.split_once(['x', 'X']).and_then(|(w, h)| {
            Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?))
        });
        match parsed {
            Some((width, height))
                if width >= 8 && height >= 8 && width <= 8192 && height <= 8192 =>
            {
                Ok(Self { width, height })
            }
            _ => Err(format!(
                "an image size is WIDTHxHEIGHT, each in 8..=8192 pixels, got `{text}`"
            )),
        }
    }
}

/// Flags of `kosmos bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    connection: Connection,
    /// The RPC each request calls.
    #[arg(long, value_enum, default_value_t = BenchMode::GenerateStream)]
    mode: BenchMode,
    /// Open loop: Poisson arrivals at this many requests/s (`inf`: all at once); a comma list (`1,2,4`) runs a
    /// sweep, one run per rate.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "REQ/S",
        conflicts_with = "concurrency"
    )]
    rate: Vec<Rate>,
    /// Closed loop: this many clients, each sending its next request when the previous one completes (the
    /// default, with 1, when no --rate is given).
    #[arg(long, value_name = "N")]
    concurrency: Option<u32>,
    /// Requests per run (default 32 unless --duration is given).
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    requests: Option<u64>,
    /// Seconds per run: no request starts after it; those in flight complete.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Seed of the arrival times, the images, the prompts and the lengths.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A folder of images (PNG, JPEG, WebP) to send (default: the demo model's held-out images,
    /// models/demo/heldout/images).
    #[arg(long, value_name = "DIR", conflicts_with = "image_size")]
    images: Option<PathBuf>,
    /// Send generated PNGs of this size instead of a folder's images, e.g. `224x224`.
    #[arg(long, value_name = "WxH")]
    image_size: Option<ImageSize>,
    /// Images in each request (0: text only).
    #[arg(long, default_value_t = 1, value_name = "N")]
    images_per_request: u32,
    /// Share of requests (0–1) whose images come from a pool of --image-pool images, to exercise the gateway's
    /// embedding cache; the others send images the server has never seen.
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    image_reuse: f64,
    /// Images in the reuse pool.
    #[arg(long, default_value_t = 8, value_name = "K")]
    image_pool: u32,
    /// Words of text in each prompt, N or MIN..MAX (the server's token count is in the report).
    #[arg(long, default_value = "8", value_name = "LEN")]
    prompt_words: Length,
    /// max_new_tokens of each request, N or MIN..MAX. The public API has no way to ignore the end-of-sequence
    /// token, so a request may stop earlier: the report counts those and uses the tokens actually generated.
    #[arg(long, default_value = "32", value_name = "LEN")]
    output_tokens: Length,
    /// Candidates of each Score request (--mode score).
    #[arg(long, default_value_t = 4, value_name = "N")]
    score_candidates: u32,
    /// Sampling temperature (0: greedy); each request has its own seed.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Client-side deadline of each request, seconds (a request past it counts as DEADLINE_EXCEEDED).
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    timeout: f64,
    /// Goodput counts requests whose time to first token is at most this (Score: its end-to-end latency).
    #[arg(long, value_name = "MS")]
    slo_ttft: Option<f64>,
    /// Goodput counts requests whose time per output token is at most this.
    #[arg(long, value_name = "MS")]
    slo_tpot: Option<f64>,
    /// Write the report as JSON (schema_version 1, every request's record; docs/benchmarks.md).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the latency-throughput chart of the runs (SVG; meant for a --rate sweep).
    #[arg(long, value_name = "FILE.svg")]
    chart: Option<PathBuf>,
}

/// The demo model's held-out images: under the current directory, else under the source checkout.
fn default_images() -> PathBuf {
    let relative = PathBuf::from("models/demo/heldout/images");
    if relative.is_dir() {
        return relative;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo/heldout/images")
}

/// Runs the benchmark and reports it.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let loads: Vec<Load> = if args.rate.is_empty() {
        vec![Load::Concurrency {
            concurrency: args.concurrency.unwrap_or(1),
        }]
    } else {
        args.rate
            .iter()
            .map(|rate| Load::Poisson { rate: rate.0 })
            .collect()
    };
    let bound = match (args.requests, args.duration) {
        (Some(count), _) => Bound::Requests(count),
        (None, Some(seconds)) => {
            anyhow::ensure!(
                seconds > 0.0 && seconds.is_finite(),
                "--duration must be a positive number of seconds, got {seconds}"
            );
            Bound::Duration(Duration::from_secs_f64(seconds))
        }
        (None, None) => Bound::Requests(32),
    };
    anyhow::ensure!(
        args.timeout > 0.0 && args.timeout.is_finite(),
        "--timeout must be a positive number of seconds, got {}",
        args.timeout
    );
    let mode = match args.mode {
        BenchMode::GenerateStream => Mode::GenerateStream,
        BenchMode::Score => Mode::Score,
    };
    anyhow::ensure!(
        mode == Mode::GenerateStream || args.score_candidates >= 1,
        "--score-candidates must be at least 1"
    );
    let source = match (args.image_size, &args.images) {
        (Some(size), _) => ImageSource::Generated {
            width: size.width,
            height: size.height,
        },
        (None, Some(dir)) => ImageSource::Folder(dir.clone()),
        (None, None) => ImageSource::Folder(default_images()),
    };
    let slo = Slo {
        ttft_ms: args.slo_ttft,
        tpot_ms: args.slo_tpot,
    };
    let spec = WorkloadSpec {
        seed: args.seed,
        source,
        images_per_request: args.images_per_request,
        image_reuse: args.image_reuse,
        image_pool: args.image_pool,
        prompt_words: args.prompt_words.0,
        output_tokens: args.output_tokens.0,
        score_candidates: if mode == Mode::Score {
            args.score_candidates
        } else {
            0
        },
    };
    anyhow::ensure!(
        spec.images_per_request > 0 || spec.prompt_words.min > 0,
        "a prompt needs at least one image or one word (--images-per-request or --prompt-words)"
    );
    let workload = Arc::new(
        tokio::task::spawn_blocking(move || Workload::new(spec))
            .await?
            .context("cannot prepare the workload")?,
    );

    let mut client = args.connection.client().await?;
    let info = client
        .get_model_info(pb::GetModelInfoRequest::default())
        .await
        .map_err(|status| {
            anyhow::anyhow!("GetModelInfo: {:?}: {}", status.code(), status.message())
        })?
        .into_inner();
    let target = args.connection.uri();
    eprintln!(
        "kosmos bench · {target} · model {} · context {} tokens · {} tokens per image",
        info.model_fingerprint.chars().take(12).collect::<String>(),
        info.context_length,
        info.num_image_tokens
    );

    let config = BenchConfig {
        mode: match mode {
            Mode::GenerateStream => "generate_stream".into(),
            Mode::Score => "score".into(),
        },
        requests: match bound {
            Bound::Requests(count) => Some(count),
            Bound::Duration(_) => None,
        },
        duration_seconds: match bound {
            Bound::Requests(_) => None,
            Bound::Duration(limit) => Some(limit.as_secs_f64()),
        },
        seed: args.seed,
        images: workload.spec().source.describe(),
        images_per_request: workload.spec().images_per_request,
        image_reuse: workload.spec().image_reuse,
        image_pool: workload.spec().image_pool,
        prompt_words: workload.spec().prompt_words,
        output_tokens: workload.spec().output_tokens,
        score_candidates: workload.spec().score_candidates,
        temperature: args.temperature,
        timeout_seconds: args.timeout,
        slo_ttft_ms: slo.ttft_ms,
        slo_tpot_ms: slo.tpot_ms,
    };
    let started_at_unix_seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64());
    let mut runs = Vec::with_capacity(loads.len());
    for (number, load) in loads.iter().enumerate() {
        let params = RunParams {
            load: *load,
            bound,
            mode,
            temperature: args.temperature,
            timeout: Duration::from_secs_f64(args.timeout),
            slo,
            seed: args.seed,
            run: number as u32,
        };
        let progress = progress_bar(&report::describe_load(load));
        let (records, duration) =
            runner::run(client.clone(), workload.clone(), &params, &progress).await?;
        progress.finish_and_clear();
        let summary = stats::summarize(&records, duration);
        debug_assert_eq!(
            summary.requests,
            summary.successful + summary.errors_by_code.values().sum::<u64>()
        );
        let run = Run {
            load: *load,
            summary,
            requests: records,
        };
        println!("{}", report::run_table(&run, &slo));
        runs.push(run);
    }
    if runs.len() > 1 {
        println!("### sweep\n\n{}", report::sweep_table(&runs));
    }
    let report = Report {
        schema_version: SCHEMA_VERSION,
        tool: "kosmos bench".into(),
        kosmos_version: env!("CARGO_PKG_VERSION").into(),
        started_at_unix_seconds,
        target: target.clone(),
        config,
        runs,
    };
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.chart {
        let title = format!(
            "kosmos bench · {} · {}",
            report.config.mode, report.config.images
        );
        chart::write_svg(path, &report.runs, &title)?;
        eprintln!("wrote {}", path.display());
    } else if report.runs.len() > 1 {
        eprintln!("(add --chart FILE.svg for the latency-throughput chart of the sweep)");
    }
    Ok(())
}

/// A bar on stderr while a run goes, hidden when stderr is not a terminal (logs, CI, tests).
fn progress_bar(load: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} requests",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(load.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_fixed_or_ranges() {
        assert_eq!(
            "48".parse::<Length>().expect("a test value").0,
            LengthRange { min: 48, max: 48 }
        );
        assert_eq!(
            "48..64".parse::<Length>().expect("a test value").0,
            LengthRange { min: 48, max: 64 }
        );
        assert_eq!(
            "1..=3".parse::<Length>().expect("a test value").0,
            LengthRange { min: 1, max: 3 }
        );
        assert!("64..48".parse::<Length>().is_err());
        assert!("many".parse::<Length>().is_err());
    }

    #[test]
    fn rates_and_sizes_parse() {
        assert_eq!(
            "2.5".parse::<Rate>().expect("a test value"),
            Rate(Some(2.5))
        );
        assert_eq!("inf".parse::<Rate>().expect("a test value"), Rate(None));
        assert!("0".parse::<Rate>().is_err() && "-1".parse::<Rate>().is_err());
        assert_eq!(
            "640x480".parse::<ImageSize>().expect("a test value"),
            ImageSize {
                width: 640,
                height: 480
            }
        );
        assert!("640".parse::<ImageSize>().is_err() && "1x1".parse::<ImageSize>().is_err());
    }

    #[test]
    fn the_default_images_are_found() {
        assert!(default_images().join("000.png").is_file());
    }
}
