//! The one `main` of every service: the three service binaries and the `kosmos gateway|encoder|decoder`
//! subcommands parse the same [`ServiceArgs`], turn them into typed overrides (strings always strings), load the
//! layered configuration (defaults < file < `KOSMOS_<SERVICE>__…` < flags), start telemetry and run the service
//! through [`crate::service`] until SIGINT or SIGTERM.

use std::future::Future;
use std::path::PathBuf;

use crate::config::{Layers, Overrides, ServerSettings};
use crate::service::{Bound, BoxError};
use crate::shutdown::Shutdown;
use crate::telemetry::LogFormat;

/// A service as its `main` starts it: its names, its configuration, and how it binds.
pub trait ServiceMain {
    /// The short name: `gateway`, `encoder`, `decoder`.
    const NAME: &'static str;
    /// The binary's name and the traces' `service.name`: `kosmos-gateway`, …
    const BINARY: &'static str;
    /// The prefix of its environment variables: `KOSMOS_GATEWAY`, …
    const ENV_PREFIX: &'static str;
    /// The validated configuration.
    type Config: Send + 'static;
    /// What in-process callers get besides the bound service (tests, `kosmos serve`).
    type Handle: Send + 'static;
    /// Why the configuration is invalid or the service cannot start.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Loads and validates the configuration from its layers.
    fn load(layers: &Layers) -> Result<Self::Config, Self::Error>;

    /// The shared sections of the configuration.
    fn settings(config: &Self::Config) -> &ServerSettings;

    /// Loads what must be loaded before serving and binds the ports.
    fn bind(
        config: Self::Config,
    ) -> impl Future<Output = Result<(Bound, Self::Handle), Self::Error>> + Send;

    /// The configuration from `overrides` over the defaults and the given environment (no file).
    fn from_overrides(
        overrides: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Result<Self::Config, Self::Error> {
        Self::load(&Layers {
            file: None,
            env,
            env_prefix: Self::ENV_PREFIX.into(),
            overrides,
        })
    }
}

/// Declares the unit struct `$service` as the [`ServiceMain`] of the calling service crate, whose
/// `crate::config::ENV_PREFIX` names its environment prefix, whose config type has `load(&Layers)` and a `server`
/// field (the [`ServerSettings`]), and whose `$bind` function binds it: `kosmos_runtime::service_main!(Encoder,
/// "encoder", EncoderConfig, (), StartError, bind_service);`.
#[macro_export]
// `crate::config::ENV_PREFIX` is the calling service crate's on purpose, not this crate's.
#[allow(clippy::crate_in_macro_def)]
macro_rules! service_main {
    ($service:ident, $name:literal, $config:ty, $handle:ty, $error:ty, $bind:path) => {
        /// The service as the runtime starts it: its binary, `kosmos serve`, the tests.
        #[derive(Debug)]
        pub struct $service;

        impl $crate::cli::ServiceMain for $service {
            const NAME: &'static str = $name;
            const BINARY: &'static str = concat!("kosmos-", $name);
            const ENV_PREFIX: &'static str = crate::config::ENV_PREFIX;
            type Config = $config;
            type Handle = $handle;
            type Error = $error;

            fn load(layers: &$crate::config::Layers) -> Result<$config, $error> {
                Ok(<$config>::load(layers)?)
            }

            fn settings(config: &$config) -> &$crate::config::ServerSettings {
                &config.server
            }

            fn bind(
                config: $config,
            ) -> impl ::std::future::Future<Output = Result<($crate::Bound, $handle), $error>> + Send {
                $bind(config)
            }
        }
    };
}

/// The flags of every service binary and single-service `kosmos` subcommand.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceArgs {
    /// TOML configuration file (the keys: the service's README and `config.rs`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listen address (`server.listen`).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// `GET /metrics` listen address (`metrics.listen`).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    /// Model directory in Hugging Face layout (`model_dir`; the gateway reads only its tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model_dir: Option<PathBuf>,
    /// Encoder and decoder: cpu, cuda or cuda:N (`device`).
    #[arg(long)]
    pub device: Option<String>,
    /// Encoder and decoder: weights dtype f32, f16 or bf16 (`dtype`).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Any key, e.g. `--set server.drain_timeout_seconds=10`; repeatable; the named flags win over it.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Log one JSON object per line (`server.log_json`).
    #[arg(long)]
    pub log_json: bool,
}

impl ServiceArgs {
    /// The flag overrides, `--set` first and the named flags last (they win).
    pub fn overrides(&self) -> Vec<String> {
        let overrides = Overrides::new()
            .raw(&self.overrides)
            .string_opt("server.listen", self.listen.as_ref())
            .string_opt("metrics.listen", self.metrics_listen.as_ref())
            .string_opt(
                "model_dir",
                self.model_dir.as_ref().map(|dir| dir.display()),
            )
            .string_opt("device", self.device.as_ref())
            .string_opt("dtype", self.dtype.as_ref());
        if self.log_json {
            overrides.flag("server.log_json", true).into_vec()
        } else {
            overrides.into_vec()
        }
    }

    /// The layers: the process environment under `env_prefix`, the file, the flags.
    pub fn layers(&self, env_prefix: &str) -> Layers {
        Layers::from_process(env_prefix, self.config.clone(), self.overrides())
    }
}

/// Why a service's `main` failed.
#[derive(Debug, thiserror::Error)]
pub enum MainError {
    /// The configuration is invalid.
    #[error("invalid {service} configuration: {source}")]
    Config {
        /// The service.
        service: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The service failed to start or while serving.
    #[error("{service} failed: {source}")]
    Service {
        /// The service.
        service: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

/// The whole `main` of a service binary: parses [`ServiceArgs`] (with `about` as the help's summary), runs the
/// service, and reports a failure on stderr, each cause once.
pub async fn main<S: ServiceMain>(about: &'static str) -> std::process::ExitCode {
    use clap::{Args as _, FromArgMatches as _};
    let command = ServiceArgs::augment_args(
        clap::Command::new(S::BINARY)
            .version(env!("CARGO_PKG_VERSION"))
            .about(about),
    );
    let args =
        ServiceArgs::from_arg_matches(&command.get_matches()).unwrap_or_else(|err| err.exit());
    match run::<S>(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", describe(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, `a: b: c`, skipping a cause whose text an outer message already quotes
/// (many errors name their cause in their own message).
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(err);
    while let Some(current) = cause {
        let text = current.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = current.source();
    }
    line
}

/// Runs service `S` as its binary does: config from `args`, telemetry, serve until SIGINT or SIGTERM, drain.
pub async fn run<S: ServiceMain>(args: ServiceArgs) -> Result<(), MainError> {
    let config = S::load(&args.layers(S::ENV_PREFIX)).map_err(|err| MainError::Config {
        service: S::NAME,
        source: Box::new(err),
    })?;
    let format = LogFormat::from_json_flag(S::settings(&config).log_json);
    // Kept until the end: dropping it flushes the spans not exported yet.
    let _telemetry = crate::telemetry::init(S::BINARY, format, "info");
    let failed = |source: BoxError| MainError::Service {
        service: S::NAME,
        source,
    };
    let (bound, _handle) = S::bind(config).await.map_err(|err| failed(Box::new(err)))?;
    bound
        .serve(Shutdown::on_signals())
        .await
        .map_err(|err| failed(Box::new(err)))
}
