//! The `imagefs` binary: parse the command line, install logging, run, and map every error
//! to one clear line on stderr and a non-zero exit code.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = imagefs::cli::Cli::parse();
    let default = match cli.global.verbose {
        0 => "warn",
        1 => "imagefs=info",
        2 => "imagefs=debug",
        _ => "imagefs=trace",
    };
    let filter = EnvFilter::try_from_env("IMAGEFS_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match imagefs::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("imagefs: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line ("layer sha256:…: fetching …: connection refused"),
/// skipping a cause whose text the line already contains (library errors often include
/// their source in their own message).
fn one_line(err: &anyhow::Error) -> String {
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
