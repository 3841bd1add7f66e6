//! `kosmos-decoder`: parse flags, load the layered configuration, start logging, serve until SIGINT/SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use kosmos_decoder::config::{DecoderConfig, ENV_PREFIX};
use kosmos_runtime::config::Layers;
use kosmos_runtime::telemetry::LogFormat;

/// The kosmos decoder service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "KOSMOS_DECODER_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address (`listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Model directory (`model_dir`).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Device: cpu, cuda, cuda:N (`device`).
    #[arg(long)]
    device: Option<String>,
    /// Any other key, e.g. `--set scheduler.max_running_sequences=64`; flags win over the file and environment.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut overrides = Vec::new();
    if let Some(listen) = &args.listen {
        overrides.push(format!("listen={listen}"));
    }
    if let Some(model_dir) = &args.model_dir {
        overrides.push(format!("model_dir={}", model_dir.display()));
    }
    if let Some(device) = &args.device {
        overrides.push(format!("device={device}"));
    }
    overrides.extend(args.overrides);
    let config = DecoderConfig::load(&Layers::from_process(ENV_PREFIX, args.config, overrides))?;
    let format = if config.log_json {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    // Kept until the end of main: dropping it flushes the spans not exported yet.
    let _telemetry = kosmos_runtime::telemetry::init("kosmos-decoder", format, "info");
    let shutdown = kosmos_runtime::Shutdown::on_signals();
    kosmos_decoder::run(config, shutdown).await?;
    Ok(())
}
