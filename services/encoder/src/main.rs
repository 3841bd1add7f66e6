//! `kosmos-encoder`: the vision-encoder service binary. Parses flags, loads the configuration, starts logging
//! and runs the service until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use kosmos_encoder::{ENV_PREFIX, EncoderConfig};
use kosmos_runtime::Shutdown;
use kosmos_runtime::config::Layers;
use kosmos_runtime::telemetry::LogFormat;

/// The KOSMOS vision encoder: images in, embeddings out (gRPC `kosmos.encoder.v1.VisionEncoder`).
///
/// Configuration layers, later wins: defaults, the TOML file, `KOSMOS_ENCODER__SECTION__KEY` variables, `--set`,
/// then the named flags.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (`listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Model directory in Hugging Face layout (`model`).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N (`device`).
    #[arg(long)]
    device: Option<String>,
    /// Weights dtype: f32, f16 or bf16 (`dtype`).
    #[arg(long)]
    dtype: Option<String>,
    /// Any key, e.g. `--set batching.max_queue_delay=0.01`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Log one JSON object per line.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let format = if args.log_json {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    // Kept until the end of main: dropping it flushes the spans not exported yet.
    let _telemetry = kosmos_runtime::telemetry::init("kosmos-encoder", format, "info");
    let mut overrides = args.set;
    let named = [
        ("listen", args.listen),
        ("model", args.model.map(|path| path.display().to_string())),
        ("device", args.device),
        ("dtype", args.dtype),
    ];
    for (key, value) in named {
        if let Some(value) = value {
            // Quoted as a JSON string so that a value such as a numeric directory name stays a string.
            overrides.push(format!("{key}={}", serde_json_string(&value)));
        }
    }
    let layers = Layers::from_process(ENV_PREFIX, args.config, overrides);
    let config = EncoderConfig::load(&layers).context("invalid configuration")?;
    kosmos_encoder::run(config, Shutdown::on_signals())
        .await
        .context("encoder failed")?;
    Ok(())
}

/// `value` as a JSON string literal.
fn serde_json_string(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for character in value.chars() {
        match character {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04x}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}
