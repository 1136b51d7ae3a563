//! The `imagefs` command line: clap definitions, global options, and one file per
//! subcommand. Only this module (and `main.rs`) knows clap, anyhow, environment variables and
//! the tracing subscriber.

mod cache;
mod common;
mod convert;
mod inspect;
mod keeper;
mod layers;
mod mount;
mod progress;
mod pull;
mod snapshotter;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub use common::{Context, take_secrets_from_env};
pub use units::parse_size;
use units::parse_timeout;

#[derive(Debug, Parser)]
#[command(
    name = "imagefs",
    version,
    about = "Mount a container image straight from a registry as a read-only filesystem",
    long_about = "Mount a container image straight from a registry as a read-only filesystem.\n\
                  Layers are fetched, verified and extracted on first access and cached."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// Cache directory [default: /var/lib/imagefs for root, else $XDG_CACHE_HOME/imagefs]
    #[arg(long, global = true, env = "IMAGEFS_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Platform to pick from a multi-platform index: os/arch[/variant] [default: the host's]
    #[arg(long, global = true, value_name = "OS/ARCH[/VARIANT]",
          value_parser = <crate::oci::Platform as std::str::FromStr>::from_str)]
    pub platform: Option<crate::oci::Platform>,
    /// Talk plain HTTP to the registry (loopback registries may use it without this flag)
    #[arg(long, global = true)]
    pub plain_http: bool,
    /// Trust this PEM CA certificate for registry TLS (repeatable)
    #[arg(long = "ca-cert", global = true, value_name = "FILE")]
    pub ca_certs: Vec<PathBuf>,
    /// Do not verify the registry's TLS certificate (dangerous)
    #[arg(long, global = true)]
    pub insecure_skip_tls_verify: bool,
    /// Registry user name (the password is read from stdin with --password-stdin)
    #[arg(long, short = 'u', global = true, value_name = "USER")]
    pub username: Option<String>,
    /// Read the registry password from standard input
    #[arg(long, global = true)]
    pub password_stdin: bool,
    /// Network timeout: connect, and silence on an open connection (e.g. 15s, 2m, 500ms).
    /// Failed connections are retried (up to 4 times, with backoff) only within this time, so
    /// a read of remote data through a mount fails within about twice this when the registry
    /// is unreachable
    #[arg(long, global = true, default_value = "15s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Pull mirror for a registry, tried before it: REGISTRY=URL, e.g.
    /// docker.io=http://127.0.0.1:5000 (repeatable; tried in order, then hosts.toml mirrors,
    /// then the registry itself)
    #[arg(long = "mirror", global = true, value_name = "REGISTRY=URL")]
    pub mirrors: Vec<String>,
    /// Directory of per-registry mirror configuration, containerd style:
    /// DIR/<registry>/hosts.toml [default: /etc/imagefs/certs.d]
    #[arg(long, global = true, env = "IMAGEFS_HOSTS_DIR", value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,
    /// Bound the cache (e.g. 20G, 512M): after a pull or a mount's fetch, least recently used
    /// images no live mount uses are evicted [default: `cache_max_size` in CACHE/config.toml,
    /// else unbounded]
    #[arg(
        long,
        global = true,
        env = "IMAGEFS_CACHE_MAX_SIZE",
        value_name = "SIZE",
        allow_negative_numbers = true,
        value_parser = parse_size
    )]
    pub cache_max_size: Option<u64>,
    /// Largest uncompressed size of one layer (e.g. 64G); larger layers are refused as
    /// decompression bombs [default: 256G]
    #[arg(
        long,
        global = true,
        value_name = "SIZE",
        allow_negative_numbers = true,
        value_parser = parse_size
    )]
    pub max_layer_size: Option<u64>,
    /// Largest ratio uncompressed / compressed of a layer past its first 64 MiB [default: 1024]
    #[arg(long, global = true, value_name = "RATIO", allow_negative_numbers = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_expansion: Option<u64>,
    /// Most entries (files, directories, links…) one layer may have [default: 1048576]
    #[arg(long, global = true, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_entries: Option<u64>,
    /// Use only the cache; never contact a registry
    #[arg(long, global = true)]
    pub offline: bool,
    /// No progress output (results such as `Digest:` lines are still printed)
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    /// More logging (-v info, -vv debug, -vvv trace); IMAGEFS_LOG sets a tracing filter
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch, verify and extract an image into the cache
    Pull(pull::PullArgs),
    /// Show an image's manifest, config and layers (fetches no layer)
    Inspect(inspect::InspectArgs),
    /// List an image's layers, base first, and whether each is cached
    Layers(layers::LayersArgs),
    /// What the cache holds, and keeping it in bounds: ls, du, prune, verify, gc
    Cache(cache::CacheArgs),
    /// Mount an image read-only; layers are fetched on first access
    Mount(mount::MountArgs),
    /// Unmount an imagefs mount point
    Umount(mount::UmountArgs),
    /// List the live mounts of the cache: keeper and server processes, restarts, uptime
    Ps(keeper::PsArgs),
    /// Replace the servers of live mounts by this binary, without unmounting
    Upgrade(keeper::UpgradeArgs),
    /// Serve containerd's snapshots API: containers start from lazily served images
    Snapshotter(snapshotter::SnapshotterArgs),
    /// Make an image lazy: rewrite its layers as eStargz and push it to another reference
    Convert(convert::ConvertArgs),
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        // Mount manages its own runtime (it may daemonise first).
        Command::Mount(args) => mount::run(&cli.global, args),
        Command::Umount(args) => mount::umount(args),
        Command::Ps(args) => keeper::ps(&cli.global, args),
        Command::Upgrade(args) => keeper::upgrade(&cli.global, args),
        Command::Snapshotter(args) => snapshotter::run(&cli.global, args),
        command => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let result = rt.block_on(async move {
                let ctx = Context::new(&cli.global)?;
                match command {
                    Command::Pull(a) => pull::run(&ctx, a).await,
                    Command::Inspect(a) => inspect::run(&ctx, a).await,
                    Command::Layers(a) => layers::run(&ctx, a).await,
                    Command::Cache(a) => cache::run(&ctx, a),
                    Command::Convert(a) => convert::run(&ctx, a).await,
                    Command::Mount(_)
                    | Command::Umount(_)
                    | Command::Ps(_)
                    | Command::Upgrade(_)
                    | Command::Snapshotter(_) => {
                        unreachable!()
                    }
                }
            });
            if result.is_err() {
                // The first failure ends the command while other layers may still be
                // extracting on blocking threads, which read the network through this
                // runtime: shutting it down under them would make them panic. The process
                // exits right after the error line; their temporaries are removed by the
                // next `Store::open`.
                std::mem::forget(rt);
            }
            result
        }
    }
}

/// The error and its causes on one line ("layer sha256:…: fetching …: connection refused").
/// Each cause is printed once because every error type keeps its cause in `source()`, not in
/// its own message (see [`crate::error`]).
pub fn error_line(err: &anyhow::Error) -> String {
    format!("{err:#}")
}

/// Parse the command line; a usage error becomes one `imagefs: …` line on stderr and exit
/// code 2 (clap's), help and version are printed as clap prints them.
pub fn parse_args() -> Result<Cli, ExitCode> {
    use clap::Parser as _;
    Cli::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                ExitCode::from(if e.use_stderr() { 2 } else { 0 })
            }
            _ => {
                eprintln!("imagefs: {}", usage_error_line(&e.render().to_string()));
                ExitCode::from(2)
            }
        }
    })
}

/// clap's multi-line usage error as one line: its first paragraph, lines joined.
fn usage_error_line(rendered: &str) -> String {
    let first = rendered
        .trim_start()
        .strip_prefix("error: ")
        .unwrap_or(rendered)
        .split("\n\n")
        .next()
        .unwrap_or_default();
    let mut line = first
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    line.push_str(" (see --help)");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_are_one_line() {
        for args in [
            &["imagefs", "--timeout", "abc", "layers", "x"][..],
            &["imagefs", "--timeout", "0", "layers", "x"],
            &["imagefs", "--cache-max-size", "-1", "layers", "x"],
            &["imagefs", "--cache-max-size=-1", "layers", "x"],
            &["imagefs", "inspect", "--format", "yaml", "x"],
            &["imagefs", "mount", "x"],
            &["imagefs", "--max-expansion", "0", "layers", "x"],
            &["imagefs", "--platform", "linux", "layers", "x"],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            let line = usage_error_line(&e.render().to_string());
            assert!(!line.contains('\n'), "{args:?}: {line}");
            assert!(!line.starts_with("error"), "{args:?}: {line}");
            assert!(line.len() > 20, "{args:?}: {line}");
        }
        let e =
            Cli::try_parse_from(["imagefs", "--cache-max-size", "-1", "layers", "x"]).unwrap_err();
        let dash = usage_error_line(&e.render().to_string());
        let e = Cli::try_parse_from(["imagefs", "--cache-max-size=-1", "layers", "x"]).unwrap_err();
        assert_eq!(dash, usage_error_line(&e.render().to_string()));
        assert!(dash.contains("not a size"), "{dash}");
    }

    #[test]
    fn causes_are_joined_each_once() {
        let err = anyhow::anyhow!("connection refused")
            .context("fetching y")
            .context("layer z");
        assert_eq!(error_line(&err), "layer z: fetching y: connection refused");
        // A library error with a typed source: its own message, then the cause, once.
        let err = anyhow::Error::new(crate::store::StoreError::Io {
            path: "x".into(),
            source: std::io::Error::other("disk full"),
        })
        .context("layer sha256:ab");
        assert_eq!(error_line(&err), "layer sha256:ab: x: disk full");
    }
}
