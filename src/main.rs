//! The `imagefs` binary: parse the command line, install logging, run, and map every error
//! to one clear line on stderr and a non-zero exit code.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // First, while this is the only thread: a secret must not stay in /proc/PID/environ.
    imagefs::cli::take_secrets_from_env();
    let cli = match imagefs::cli::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let default = match cli.global.verbose {
        // fuser warns about a failed second unmount after an external `fusermount3 -u`
        // (its mounted-check is inverted in 0.18): harmless, so only its errors are shown.
        0 => "warn,fuser=error",
        1 => "warn,fuser=error,imagefs=info",
        2 => "warn,fuser=error,imagefs=debug",
        _ => "warn,imagefs=trace",
    };
    let filter = EnvFilter::try_from_env("IMAGEFS_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    raise_fd_limit();
    match imagefs::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("imagefs: {}", imagefs::cli::error_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// A mount keeps one fd per open file it serves with pread: allow as many as the hard limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
