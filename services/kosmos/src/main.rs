//! `kosmos`: the whole system in one command (`kosmos serve`), each service on its own
//! (`kosmos gateway|encoder|decoder --config FILE`), small clients (`kosmos ask|caption|score|eval`) and a load
//! generator (`kosmos bench`).

mod bench;
mod client;
mod eval;
mod keys;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kosmos_runtime::cli::ServiceArgs;

/// KOSMOS multimodal language model serving: images interleaved with text in, text (optionally grounded) out.
///
/// Start everything on this machine with `kosmos serve`, then ask it something with
/// `kosmos ask --image photo.jpg "What is in this picture?"`.
#[derive(Debug, Parser)]
#[command(name = "kosmos", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the encoder, the decoder and the gateway in this process, connected by gRPC on loopback.
    Serve(serve::ServeArgs),
    /// Runs the gateway alone (the public API in front of the encoder and decoder pools).
    Gateway(ServiceArgs),
    /// Runs a vision-encoder replica alone.
    Encoder(ServiceArgs),
    /// Runs a decoder replica alone.
    Decoder(ServiceArgs),
    /// Asks a question about an image (or about nothing) and streams the answer.
    Ask(client::AskArgs),
    /// Captions each image.
    Caption(client::CaptionArgs),
    /// Scores candidate continuations of a prompt about an image, best first.
    Score(client::ScoreArgs),
    /// Runs a held-out set (e.g. the demo model's, models/demo/heldout) through a running gateway and prints the
    /// accuracy table.
    Eval(eval::EvalArgs),
    /// Loads a running gateway (open loop at Poisson rates, or closed loop) and reports throughput, time to first
    /// token, time per output token, inter-token and end-to-end latency, goodput and errors.
    Bench(Box<bench::BenchArgs>),
    /// Manages the gateway's API keys (`kosmos keys new --id NAME --file keys.toml`).
    Keys(keys::KeysArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", describe(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve::run(args).await,
        Command::Gateway(args) => {
            Ok(kosmos_runtime::cli::run::<kosmos_gateway::Gateway>(args).await?)
        }
        Command::Encoder(args) => {
            Ok(kosmos_runtime::cli::run::<kosmos_encoder::Encoder>(args).await?)
        }
        Command::Decoder(args) => {
            Ok(kosmos_runtime::cli::run::<kosmos_decoder::Decoder>(args).await?)
        }
        Command::Ask(args) => client::ask(args).await,
        Command::Caption(args) => client::caption(args).await,
        Command::Score(args) => client::score(args).await,
        Command::Eval(args) => eval::run(args).await,
        Command::Bench(args) => bench::run(*args).await,
        Command::Keys(args) => keys::run(args),
    }
}

/// An error and its causes on one line, `a: b: c`, each cause once (the runtime's [`describe`]).
///
/// [`describe`]: kosmos_runtime::cli::describe
fn describe(err: &anyhow::Error) -> String {
    kosmos_runtime::cli::describe(err.as_ref())
}

/// The model `kosmos serve` uses when `--model` is not given: `models/demo` under the current directory,
/// else under the source checkout this binary was built from.
fn default_model_dir() -> PathBuf {
    let relative = PathBuf::from("models/demo");
    if relative.join("config.json").is_file() {
        return relative;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn overrides_keep_strings_strings() {
        let json_string = kosmos_runtime::config::json_string;
        assert_eq!(json_string("2024"), "\"2024\"");
        assert_eq!(json_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        let cli = Cli::parse_from(["kosmos", "decoder", "--model-dir", "2024"]);
        let Command::Decoder(args) = cli.command else {
            panic!("a decoder command");
        };
        assert_eq!(args.overrides(), vec!["model_dir=\"2024\"".to_string()]);
    }

    #[test]
    fn the_shipped_model_is_found() {
        assert!(default_model_dir().join("tokenizer.json").is_file());
    }

    #[test]
    fn errors_name_each_cause_once() {
        let bind = kosmos_runtime::metrics::BindError {
            address: ([127, 0, 0, 1], 9465).into(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use"),
        };
        // BindError quotes its cause in its message and also reports it as its source.
        let err = anyhow::Error::new(bind).context("encoder failed");
        assert_eq!(
            describe(&err),
            "encoder failed: cannot listen for /metrics on 127.0.0.1:9465: Address already in use"
        );
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let chained = anyhow::Error::new(io).context("cannot read config.json");
        assert_eq!(describe(&chained), "cannot read config.json: no such file");
    }
}
