//! `kosmos-decoder`: the runtime's one service `main` (flags, layered configuration, telemetry, serve until
//! SIGINT/SIGTERM, drain).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    kosmos_runtime::cli::main::<kosmos_decoder::Decoder>(
        "The kosmos decoder: continuous batching, sampling and scoring (kosmos.decoder.v1.Decoder)",
    )
    .await
}
