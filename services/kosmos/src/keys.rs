//! `kosmos keys new`: a fresh API key for the gateway's `auth.api_keys_file` (see `kosmos_gateway::auth`).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};

/// `kosmos keys …`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Prints a new random secret once (to stdout) and appends its SHA-256 as a `[[keys]]` entry to the file
    /// (or prints the entry, to stderr, without `--file`). The secret itself is stored nowhere.
    New(NewArgs),
}

#[derive(Debug, Args)]
struct NewArgs {
    /// The key's public name: appears in logs, traces and metrics (letters, digits, `-`, `_`, `.`).
    #[arg(long)]
    id: String,
    /// The keys file to append to (created if missing); the gateway re-reads it within seconds.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
}

/// Runs `kosmos keys …`.
pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    let KeysCommand::New(args) = args.command;
    let (secret, entry) = kosmos_gateway::auth::new_key(&args.id).map_err(anyhow::Error::msg)?;
    match &args.file {
        Some(path) => {
            let existing = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(err) => {
                    return Err(err).with_context(|| format!("cannot read {}", path.display()));
                }
            };
            // The file must stay valid with the new entry, and ids unique: check before writing.
            kosmos_gateway::auth::KeySet::parse(&format!("{existing}{entry}"))
                .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            file.write_all(entry.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("appended key `{}` to {}", args.id, path.display());
        }
        None => eprintln!("add this entry to the gateway's keys file:{entry}"),
    }
    eprintln!("the secret below is shown once; send it as `authorization: Bearer <secret>`:");
    println!("{secret}");
    Ok(())
}
