//! `kosmos-e2e-replica SERVICE [FLAGS]`: one service (`encoder`, `decoder` or `gateway`) as its own process, with
//! the service binaries' flags (`--listen`, `--set KEY=VALUE`, ...), serving until SIGINT or SIGTERM and then
//! draining. The fault tests start replicas with it so that they can kill one (SIGKILL) or stop it (SIGTERM) as
//! a node would, which an in-process replica cannot show.

use std::process::ExitCode;

use clap::{Args as _, FromArgMatches as _};
use kosmos_runtime::cli::{ServiceArgs, ServiceMain, describe, run};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args();
    let program = args.next().unwrap_or_default();
    let service = args.next().unwrap_or_default();
    let rest: Vec<String> = std::iter::once(program).chain(args).collect();
    let result = match service.as_str() {
        "encoder" => serve::<kosmos_encoder::Encoder>(rest).await,
        "decoder" => serve::<kosmos_decoder::Decoder>(rest).await,
        "gateway" => serve::<kosmos_gateway::Gateway>(rest).await,
        other => Err(format!(
            "unknown service `{other}`: expected encoder, decoder or gateway"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve<S: ServiceMain>(args: Vec<String>) -> Result<(), String> {
    let command = ServiceArgs::augment_args(clap::Command::new(S::BINARY));
    let matches = command
        .try_get_matches_from(args)
        .map_err(|err| err.to_string())?;
    let args = ServiceArgs::from_arg_matches(&matches).map_err(|err| err.to_string())?;
    run::<S>(args).await.map_err(|err| describe(&err))
}
