//! `kosmos serve`: the encoder, the decoder and the gateway in one process, connected by real gRPC on loopback
//! ports, each started through the runtime's one lifecycle, with readable progress while the model loads and a
//! clean exit on Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use kosmos_proto::v1::kosmos_client::KosmosClient;
use kosmos_runtime::cli::ServiceMain;
use kosmos_runtime::config::Overrides;
use kosmos_runtime::grpc::READINESS;
use kosmos_runtime::{ServeError, Shutdown};
use tokio::task::JoinHandle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::default_model_dir;

/// Flags of `kosmos serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model directory in Hugging Face layout (config.json, model.safetensors, tokenizer.json,
    /// preprocessor_config.json). Defaults to the model shipped in `models/demo`.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Address of the public API (kosmos.v1.Kosmos); port 0: any free port (printed).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (`/v1/chat/completions`, …); `off` disables it; port 0: any
    /// free port (printed).
    #[arg(long, value_name = "HOST:PORT|off", default_value = "127.0.0.1:8000")]
    http_listen: String,
    /// Where the gateway serves `GET /metrics`; the encoder and the decoder take the next two ports. A taken
    /// port falls back to a free one; every address is printed at startup. (9464: the OpenTelemetry Prometheus
    /// exporter's usual port, clear of a local Prometheus on 9090.)
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9464")]
    metrics_listen: SocketAddr,
    /// Serve the public API over TLS with this PEM certificate chain (with --tls-key). The loopback hops between
    /// the three services stay plaintext.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA (mTLS); needs --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Require API keys from this TOML file (see `kosmos keys new`); without it every caller is served.
    #[arg(long, value_name = "FILE")]
    api_keys: Option<PathBuf>,
    /// Device of the encoder and the decoder: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// A gateway setting, e.g. `--gateway-set limits.max_images=16`; repeatable.
    #[arg(long = "gateway-set", value_name = "KEY=VALUE")]
    gateway_overrides: Vec<String>,
    /// An encoder setting, e.g. `--encoder-set batching.max_batch_images=32`; repeatable.
    #[arg(long = "encoder-set", value_name = "KEY=VALUE")]
    encoder_overrides: Vec<String>,
    /// A decoder setting, e.g. `--decoder-set scheduler.max_running_sequences=64`; repeatable.
    #[arg(long = "decoder-set", value_name = "KEY=VALUE")]
    decoder_overrides: Vec<String>,
}

/// One service started and serving in a task of its own.
struct Running {
    name: &'static str,
    address: SocketAddr,
    /// Where its health answers in plaintext: the gRPC address, or its health-only port when that is TLS.
    health: SocketAddr,
    http_address: Option<SocketAddr>,
    task: JoinHandle<Result<(), ServeError>>,
}

/// Logs go to stderr below the progress lines: warnings only, unless `RUST_LOG` says otherwise. Spans of all
/// three services are exported (as service `kosmos`) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, whatever the
/// log level.
fn init_telemetry() -> kosmos_runtime::telemetry::TelemetryGuard {
    kosmos_runtime::telemetry::init("kosmos", kosmos_runtime::telemetry::LogFormat::Text, "warn")
}

fn step(service: &str, message: impl std::fmt::Display) {
    eprintln!("  {service:<8} {message}");
}

/// The settings every service of `kosmos serve` gets: the model, loopback ports, `/metrics` on `metrics` or a
/// free port when it is taken.
fn common(model: &Path, listen: SocketAddr, metrics: SocketAddr) -> Overrides {
    Overrides::new()
        .path("model_dir", model)
        .string("server.listen", listen)
        .string("metrics.listen", metrics)
        .flag("metrics.fallback_to_free_port", true)
}

/// Loads, binds and starts serving service `S` with `overrides` until `stop` trips.
async fn start<S: ServiceMain>(overrides: Overrides, stop: Shutdown) -> anyhow::Result<Running> {
    let started = Instant::now();
    let config = S::from_overrides(overrides.into_vec(), Vec::new())
        .with_context(|| format!("invalid {} settings", S::NAME))?;
    let (bound, _handle) = S::bind(config)
        .await
        .with_context(|| format!("the {} could not start", S::NAME))?;
    let address = bound.local_addr();
    let tls = if bound.is_tls() { " over TLS" } else { "" };
    let http_address = bound.http_addr();
    step(
        S::NAME,
        format!(
            "listening on {address}{tls} (metrics http://{}/metrics) after {:.1} s",
            bound.metrics_addr(),
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(Running {
        name: S::NAME,
        address,
        health: bound.health_addr().unwrap_or(address),
        http_address,
        task: tokio::spawn(bound.serve(stop)),
    })
}

/// The port `offset` after `address`'s, for the next service's `/metrics` (port 0, any free port, stays 0).
fn next_port(address: SocketAddr, offset: u16) -> SocketAddr {
    match address.port() {
        0 => address,
        port => SocketAddr::new(address.ip(), port.saturating_add(offset)),
    }
}

/// Runs the three services until Ctrl-C (or SIGTERM).
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let _telemetry = init_telemetry();
    let started = Instant::now();
    let model = args.model.clone().unwrap_or_else(default_model_dir);
    anyhow::ensure!(
        model.join("config.json").is_file(),
        "no model in {} (expected config.json, model.safetensors, tokenizer.json, preprocessor_config.json); pass \
         --model DIR",
        model.display()
    );
    eprintln!(
        "kosmos serve · model {} · device {}",
        model.display(),
        args.device
    );
    // Ctrl-C stops the gateway first; the encoder and the decoder stop once the gateway has drained, so that a
    // request in flight never finds its backends gone.
    let shutdown = Shutdown::on_signals();
    let backends = Shutdown::new();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    // The encoder loads its model on its own thread while the decoder loads: both load at once.
    let encoder = start::<kosmos_encoder::Encoder>(
        common(&model, loopback, next_port(args.metrics_listen, 1))
            .string("device", &args.device)
            .raw(&args.encoder_overrides),
        backends.clone(),
    )
    .await?;
    let decoder = start::<kosmos_decoder::Decoder>(
        common(&model, loopback, next_port(args.metrics_listen, 2))
            .string("device", &args.device)
            .raw(&args.decoder_overrides),
        backends.clone(),
    )
    .await?;
    let mut gateway_settings = common(&model, args.listen, args.metrics_listen);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        gateway_settings = gateway_settings
            .path("tls.cert_file", cert)
            .path("tls.key_file", key)
            // Readiness is checked here in plaintext, on a loopback health-only port.
            .string(
                "server.health_listen",
                SocketAddr::from(([127, 0, 0, 1], 0)),
            );
        if let Some(ca) = &args.tls_client_ca {
            gateway_settings = gateway_settings.path("tls.client_ca_file", ca);
        }
    }
    if let Some(keys) = &args.api_keys {
        gateway_settings = gateway_settings.path("auth.api_keys_file", keys);
    }
    let gateway = start::<kosmos_gateway::Gateway>(
        gateway_settings
            .strings(
                "encoder.endpoints",
                &[format!("http://{}", encoder.address)],
            )
            .strings(
                "decoder.endpoints",
                &[format!("http://{}", decoder.address)],
            )
            .string("http.listen", &args.http_listen)
            .raw(&args.gateway_overrides),
        shutdown.clone(),
    )
    .await?;
    let gateway_addr = gateway.address;
    let http_addr = gateway.http_address;
    let mut services = vec![gateway, encoder, decoder];

    if wait_until_ready(&shutdown, &services, started).await {
        let (tls, keys) = (args.tls_cert.is_some(), args.api_keys.is_some());
        print_ready(gateway_addr, http_addr, started, tls, keys).await;
        shutdown.wait().await;
        eprintln!("shutting down: finishing the requests in flight…");
    }
    // A service died while loading, or Ctrl-C came: stop the gateway, let it drain, then stop the backends.
    shutdown.trigger();
    let mut failed = false;
    let backend_services = services.split_off(1);
    for service in services {
        failed |= !report(service).await;
    }
    backends.trigger();
    for service in backend_services {
        failed |= !report(service).await;
    }
    anyhow::ensure!(!failed, "a service failed");
    eprintln!("stopped");
    Ok(())
}

/// Waits for a service's task and says how it ended; false when it failed.
async fn report(service: Running) -> bool {
    match service.task.await {
        Ok(Ok(())) => true,
        Ok(Err(err)) => {
            eprintln!(
                "{} failed: {}",
                service.name,
                kosmos_runtime::cli::describe(&err)
            );
            false
        }
        Err(err) => {
            eprintln!("{} task failed: {err}", service.name);
            false
        }
    }
}

/// The model the gateway serves (when it can be asked without a key or TLS), and how to reach it.
async fn print_ready(
    gateway_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    started: Instant,
    tls: bool,
    keys: bool,
) {
    if tls || keys {
        eprintln!("ready in {:.1} s", started.elapsed().as_secs_f64());
    } else if let Ok(mut client) = KosmosClient::connect(format!("http://{gateway_addr}")).await
        && let Ok(info) = client
            .get_model_info(kosmos_proto::v1::GetModelInfoRequest {})
            .await
    {
        let info = info.into_inner();
        let short: String = info.model_fingerprint.chars().take(12).collect();
        eprintln!(
            "ready in {:.1} s · model {short} · context {} tokens · {} tokens per image",
            started.elapsed().as_secs_f64(),
            info.context_length,
            info.num_image_tokens
        );
    }
    eprintln!("serving kosmos.v1.Kosmos on {gateway_addr} (Ctrl-C to stop)");
    // With keys or TLS the hint names the flags the client needs.
    let scheme = if tls { "https" } else { "http" };
    let extra = match (tls, keys) {
        (false, false) => "",
        (true, false) => " --ca-cert CA.pem",
        (false, true) => " --api-key KEY",
        (true, true) => " --ca-cert CA.pem --api-key KEY",
    };
    eprintln!(
        "  try: kosmos ask --addr {scheme}://{gateway_addr}{extra} --image photo.jpg \"What is in this picture?\""
    );
    if let Some(http_addr) = http_addr {
        eprintln!("serving the OpenAI-compatible API on http://{http_addr}/v1");
    }
}

/// Waits until every service's `readiness` is SERVING (its health, as Kubernetes probes it; the gateway's alone
/// says only that the decoder serves), printing a line every few seconds; false if shutdown comes first or a
/// service stops.
async fn wait_until_ready(shutdown: &Shutdown, services: &[Running], started: Instant) -> bool {
    let mut last_note = Instant::now();
    loop {
        let mut ready = true;
        for service in services {
            ready &= readiness(service.health).await == Some(ServingStatus::Serving);
        }
        if ready {
            return true;
        }
        if let Some(service) = services.iter().find(|service| service.task.is_finished()) {
            eprintln!("{} stopped while the model was loading", service.name);
            return false;
        }
        if last_note.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "  still loading… ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
            last_note = Instant::now();
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = shutdown.wait() => return false,
        }
    }
}

/// The `readiness` status of the server at `address`, if it answers.
async fn readiness(address: SocketAddr) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: READINESS.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}
