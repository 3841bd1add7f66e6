//! `kosmos-gateway`: the runtime's one service `main` (flags, layered configuration, telemetry, serve until
//! SIGINT/SIGTERM, drain).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    kosmos_runtime::cli::main::<kosmos_gateway::Gateway>("The kosmos gateway: the public API (kosmos.v1.Kosmos) in front of the encoder and decoder pools").await
}
