//! `kosmos gateway|encoder|decoder`: one service alone, configured by a TOML file, `KOSMOS_<SERVICE>__…`
//! environment variables and `--set key=value` flags (later wins), until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use kosmos_runtime::Shutdown;
use kosmos_runtime::config::Layers;

/// Flags shared by the single-service commands.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// TOML configuration file (see the service's `config.rs` for the keys).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Any key, e.g. `--set listen=0.0.0.0:50051`; repeatable; wins over the file and the environment.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Log one JSON object per line.
    #[arg(long)]
    log_json: bool,
}

impl ServiceArgs {
    /// Logs and traces for `service` (spans exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set);
    /// flushed when the returned guard drops, at exit.
    fn telemetry(&self, service: &'static str) -> kosmos_runtime::telemetry::TelemetryGuard {
        kosmos_runtime::telemetry::init(
            service,
            kosmos_runtime::telemetry::LogFormat::from_json_flag(self.log_json),
            "info",
        )
    }

    fn layers(self, env_prefix: &str) -> Layers {
        Layers::from_process(env_prefix, self.config, self.overrides)
    }
}

/// Runs the gateway.
pub async fn gateway(args: ServiceArgs) -> anyhow::Result<()> {
    let _telemetry = args.telemetry("kosmos-gateway");
    let layers = args.layers(kosmos_gateway::config::ENV_PREFIX);
    let config =
        kosmos_gateway::GatewayConfig::load(&layers).context("invalid gateway configuration")?;
    kosmos_gateway::run(config, Shutdown::on_signals()).await?;
    Ok(())
}

/// Runs an encoder replica.
pub async fn encoder(args: ServiceArgs) -> anyhow::Result<()> {
    let _telemetry = args.telemetry("kosmos-encoder");
    let layers = args.layers(kosmos_encoder::ENV_PREFIX);
    let config =
        kosmos_encoder::EncoderConfig::load(&layers).context("invalid encoder configuration")?;
    kosmos_encoder::run(config, Shutdown::on_signals()).await?;
    Ok(())
}

/// Runs a decoder replica.
pub async fn decoder(args: ServiceArgs) -> anyhow::Result<()> {
    let _telemetry = args.telemetry("kosmos-decoder");
    let layers = args.layers(kosmos_decoder::config::ENV_PREFIX);
    let config =
        kosmos_decoder::DecoderConfig::load(&layers).context("invalid decoder configuration")?;
    kosmos_decoder::run(config, Shutdown::on_signals()).await?;
    Ok(())
}
