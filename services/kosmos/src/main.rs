//! `kosmos`: the whole system in one command (`kosmos serve`), each service on its own
//! (`kosmos gateway|encoder|decoder --config FILE`), small clients (`kosmos ask|caption|score|eval`) and a load
//! generator (`kosmos bench`).

mod bench;
mod client;
mod eval;
mod serve;
mod services;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    Gateway(services::ServiceArgs),
    /// Runs a vision-encoder replica alone.
    Encoder(services::ServiceArgs),
    /// Runs a decoder replica alone.
    Decoder(services::ServiceArgs),
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
        Command::Gateway(args) => services::gateway(args).await,
        Command::Encoder(args) => services::encoder(args).await,
        Command::Decoder(args) => services::decoder(args).await,
        Command::Ask(args) => client::ask(args).await,
        Command::Caption(args) => client::caption(args).await,
        Command::Score(args) => client::score(args).await,
        Command::Eval(args) => eval::run(args).await,
        Command::Bench(args) => bench::run(*args).await,
    }
}

/// `value` as a JSON string, so a config override keeps it a string (a directory named `2024` stays a path).
fn json_string(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// `path` as a config override value.
fn path_value(path: &std::path::Path) -> String {
    json_string(&path.display().to_string())
}

/// An error and its causes on one line, `a: b: c`, skipping a cause whose text an outer message already quotes
/// (many of our errors name their cause in their own message).
fn describe(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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
        assert_eq!(json_string("2024"), "\"2024\"");
        assert_eq!(json_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
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
