//! `kosmos serve`: the encoder, the decoder and the gateway in one process, connected by real gRPC on loopback
//! ports, with readable progress while the model loads and a clean exit on Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use kosmos_runtime::Shutdown;
use kosmos_runtime::config::Layers;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{default_model_dir, json_string, path_value};

/// Flags of `kosmos serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model directory in Hugging Face layout (config.json, model.safetensors, tokenizer.json,
    /// preprocessor_config.json). Defaults to the model shipped in `models/demo`.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Address of the public API (kosmos.v1.Kosmos).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
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

type ServiceTask = JoinHandle<anyhow::Result<()>>;

/// Where each service serves `GET /metrics` unless `--<service>-set metrics.listen=…` says otherwise (9464: the
/// OpenTelemetry Prometheus exporter's usual port, clear of a local Prometheus on 9090).
const GATEWAY_METRICS: &str = "127.0.0.1:9464";
const ENCODER_METRICS: &str = "127.0.0.1:9465";
const DECODER_METRICS: &str = "127.0.0.1:9466";

/// Logs go to stderr below the progress lines: warnings only, unless `RUST_LOG` says otherwise. Spans of all
/// three services are exported (as service `kosmos`) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
fn init_telemetry() -> kosmos_runtime::telemetry::TelemetryGuard {
    kosmos_runtime::telemetry::init("kosmos", kosmos_runtime::telemetry::LogFormat::Text, "warn")
}

fn step(service: &str, message: impl std::fmt::Display) {
    eprintln!("  {service:<8} {message}");
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
    let mut tasks: Vec<(&str, ServiceTask)> = Vec::new();

    // The encoder loads its model on its own thread while the decoder loads here: both load at once.
    let encoder_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind a loopback port")?;
    let encoder_addr = encoder_listener.local_addr()?;
    let mut encoder_overrides = vec![
        format!("model={}", path_value(&model)),
        "listen=\"127.0.0.1:0\"".to_string(),
        format!("metrics.listen={}", json_string(ENCODER_METRICS)),
        format!("device={}", json_string(&args.device)),
    ];
    encoder_overrides.extend(args.encoder_overrides);
    let encoder_config = kosmos_encoder::EncoderConfig::from_overrides(&encoder_overrides)
        .context("invalid encoder settings")?;
    step(
        "encoder",
        format!("listening on {encoder_addr}, loading the vision tower…"),
    );
    let stop = backends.clone();
    tasks.push((
        "encoder",
        tokio::spawn(async move {
            Ok(kosmos_encoder::serve(encoder_listener, encoder_config, stop).await?)
        }),
    ));

    step("decoder", "loading the language model…");
    let decoder_started = Instant::now();
    let mut decoder_overrides = vec![
        format!("model_dir={}", path_value(&model)),
        "listen=\"127.0.0.1:0\"".to_string(),
        format!("metrics.listen={}", json_string(DECODER_METRICS)),
        format!("device={}", json_string(&args.device)),
    ];
    decoder_overrides.extend(args.decoder_overrides);
    let decoder_config = kosmos_decoder::DecoderConfig::load(&Layers {
        env_prefix: kosmos_decoder::config::ENV_PREFIX.into(),
        overrides: decoder_overrides,
        ..Layers::default()
    })
    .context("invalid decoder settings")?;
    let decoder = kosmos_decoder::start(decoder_config)
        .await
        .context("the decoder could not start")?;
    let decoder_addr = decoder.local_addr()?;
    step(
        "decoder",
        format!(
            "loaded in {:.1} s, listening on {decoder_addr}",
            decoder_started.elapsed().as_secs_f64()
        ),
    );
    let stop = backends.clone();
    tasks.push((
        "decoder",
        tokio::spawn(async move { Ok(decoder.serve(stop).await?) }),
    ));

    let mut gateway_overrides = vec![
        format!("model_dir={}", path_value(&model)),
        format!("listen={}", json_string(&args.listen.to_string())),
        format!("metrics.listen={}", json_string(GATEWAY_METRICS)),
        format!(
            "encoder.endpoints=[{}]",
            json_string(&format!("http://{encoder_addr}"))
        ),
        format!(
            "decoder.endpoints=[{}]",
            json_string(&format!("http://{decoder_addr}"))
        ),
    ];
    gateway_overrides.extend(args.gateway_overrides);
    let gateway_config = kosmos_gateway::GatewayConfig::load(&Layers {
        env_prefix: kosmos_gateway::config::ENV_PREFIX.into(),
        overrides: gateway_overrides,
        ..Layers::default()
    })
    .context("invalid gateway settings")?;
    let gateway = kosmos_gateway::start(gateway_config)
        .await
        .context("the gateway could not start")?;
    let gateway_addr = gateway.local_addr()?;
    let gateway_metrics = gateway.metrics_addr()?;
    let handle = gateway.handle();
    step(
        "gateway",
        format!(
            "listening on {gateway_addr} (metrics http://{gateway_metrics}/metrics), waiting for both pools…"
        ),
    );
    let stop = shutdown.clone();
    tasks.push((
        "gateway",
        tokio::spawn(async move { Ok(gateway.serve(stop).await?) }),
    ));

    let ready = wait_until_ready(&handle, &shutdown, &tasks, started).await;
    if ready {
        if let Some(info) = handle.model() {
            let short: String = info.fingerprint.chars().take(12).collect();
            eprintln!(
                "ready in {:.1} s · model {short} · context {} tokens · {} tokens per image",
                started.elapsed().as_secs_f64(),
                info.context_length,
                info.num_image_tokens
            );
        }
        eprintln!("serving kosmos.v1.Kosmos on {gateway_addr} (Ctrl-C to stop)");
        eprintln!(
            "  try: kosmos ask --addr http://{gateway_addr} --image photo.jpg \"What is in this picture?\""
        );
        shutdown.wait().await;
        eprintln!("shutting down: finishing the requests in flight…");
    }
    // A service died while loading, or Ctrl-C came: stop the gateway, let it drain, then stop the backends.
    shutdown.trigger();
    let mut failed = false;
    let mut report =
        |service: &str, joined: Result<anyhow::Result<()>, tokio::task::JoinError>| match joined {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                failed = true;
                eprintln!("{service} failed: {}", crate::describe(&err));
            }
            Err(err) => {
                failed = true;
                eprintln!("{service} task failed: {err}");
            }
        };
    let (gateways, others): (Vec<_>, Vec<_>) = tasks
        .into_iter()
        .partition(|(service, _)| *service == "gateway");
    for (service, task) in gateways {
        report(service, task.await);
    }
    backends.trigger();
    for (service, task) in others {
        report(service, task.await);
    }
    anyhow::ensure!(!failed, "a service failed");
    eprintln!("stopped");
    Ok(())
}

/// Waits until the gateway is ready, printing a line every few seconds; false if shutdown comes first or a
/// service stops.
async fn wait_until_ready(
    handle: &kosmos_gateway::GatewayHandle,
    shutdown: &Shutdown,
    tasks: &[(&str, ServiceTask)],
    started: Instant,
) -> bool {
    loop {
        tokio::select! {
            ready = handle.wait_ready(Duration::from_secs(5)) => {
                if ready {
                    return true;
                }
                if let Some((service, _)) = tasks.iter().find(|(_, task)| task.is_finished()) {
                    eprintln!("{service} stopped while the model was loading");
                    return false;
                }
                eprintln!("  still loading… ({:.0} s)", started.elapsed().as_secs_f64());
            }
            () = shutdown.wait() => return false,
        }
    }
}
