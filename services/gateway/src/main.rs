//! `kosmos-gateway`: parse flags, load the layered configuration, start logging, serve until SIGINT/SIGTERM.

use std::path::PathBuf;

use clap::Parser;
use kosmos_gateway::config::{ENV_PREFIX, GatewayConfig};
use kosmos_runtime::config::Layers;

/// The kosmos gateway: the public API in front of the encoder and decoder pools.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "KOSMOS_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address (`listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Model directory holding tokenizer.json (`model_dir`).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Any other key, e.g. `--set encoder.endpoints=["http://10.0.0.7:50053"]`; flags win over the file and
    /// environment.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut overrides = Vec::new();
    if let Some(listen) = &args.listen {
        overrides.push(format!("listen={}", quoted(listen)));
    }
    if let Some(model_dir) = &args.model_dir {
        overrides.push(format!(
            "model_dir={}",
            quoted(&model_dir.display().to_string())
        ));
    }
    overrides.extend(args.overrides);
    let config = GatewayConfig::load(&Layers::from_process(ENV_PREFIX, args.config, overrides))?;
    let _telemetry = kosmos_runtime::telemetry::init(
        "kosmos-gateway",
        kosmos_runtime::telemetry::LogFormat::from_json_flag(config.log_json),
        "info",
    );
    let shutdown = kosmos_runtime::Shutdown::on_signals();
    kosmos_gateway::run(config, shutdown).await?;
    Ok(())
}

/// `value` as a JSON string, so an override keeps it a string (a directory named `2024` stays a path).
fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}
