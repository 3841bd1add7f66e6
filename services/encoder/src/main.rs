//! `kosmos-encoder`: the runtime's one service `main` (flags, layered configuration, telemetry, serve until
//! SIGINT/SIGTERM, drain).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    kosmos_runtime::cli::main::<kosmos_encoder::Encoder>(
        "The KOSMOS vision encoder: images in, embeddings out (kosmos.encoder.v1.VisionEncoder)",
    )
    .await
}
