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
            eprintln!("imagefs: {}", imagefs::cli::error_line(&err));
            ExitCode::FAILURE
        }
    }
}

