//! `imagefs snapshotter`: serve containerd's snapshots API on a unix socket until SIGINT or
//! SIGTERM (see [`crate::snapshotter`] and docs/containerd.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use super::GlobalOpts;
use super::common::Context;
use super::mount::ServeArgs;
use crate::snapshotter::{Options, Snapshotter, service};

#[derive(Debug, Args)]
pub struct SnapshotterArgs {
    /// The unix socket containerd's `[proxy_plugins.imagefs]` connects to (created 0600)
    #[arg(
        long,
        default_value = "/run/imagefs/snapshotter.sock",
        value_name = "PATH"
    )]
    pub address: PathBuf,
    /// Snapshot metadata and directories [default: CACHE/snapshotter]
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub fn run(g: &GlobalOpts, args: SnapshotterArgs) -> anyhow::Result<ExitCode> {
    crate::image::engine::tune_allocator();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ctx = rt.block_on(async { Context::new(g) })?;
    let root = args
        .root
        .clone()
        .unwrap_or_else(|| ctx.store.root().join("snapshotter"));
    let snapshotter = Arc::new(
        Snapshotter::open(
            ctx.resolver(),
            rt.handle().clone(),
            Options {
                root: root.clone(),
                serve: args.serve.serve_options(ctx.cache_max),
                threads: args.serve.threads,
                passthrough: !args.serve.no_passthrough,
            },
        )
        .with_context(|| format!("cannot open the snapshotter at {}", root.display()))?,
    );
    let shutdown = async {
        super::common::terminated().await;
        tracing::info!("signal received, shutting down");
    };
    let served = rt.block_on(service::serve(snapshotter.clone(), &args.address, shutdown));
    snapshotter.shutdown();
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    served.with_context(|| format!("serving on {}", args.address.display()))?;
    Ok(ExitCode::SUCCESS)
}
