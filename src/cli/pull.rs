//! `imagefs pull REF`: resolve, then fetch, verify and extract every layer (in parallel,
//! bounded), so that a later mount needs no network.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use super::common::{self, Context, RegistrySource, Resolved};
use super::progress::Reporter;
use crate::retry::RetryPolicy;
use crate::store::{BlobSource, LayerJob, Store};

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference, e.g. busybox, registry:5000/app:1.0, name@sha256:…
    pub reference: String,
}

/// How many layers download at once.
pub const LAYER_CONCURRENCY: usize = 4;

pub async fn run(ctx: &Context, args: PullArgs) -> anyhow::Result<ExitCode> {
    let reference = common::parse_reference(&args.reference)?;
    let reporter = Reporter::new(ctx.quiet, ctx.tty);
    reporter.line(&format!("Pulling {reference}"));
    let resolved = common::resolve(ctx, &reference).await?;
    let source = RegistrySource::new(ctx, &reference);
    fetch_layers(&ctx.store, source, &resolved, &reporter).await?;
    common::enforce_cache_bound(&ctx.store, ctx.cache_max, &resolved.manifest_digest);
    // Results, not progress: printed with -q too (scripts read them).
    println!("Digest: {}", resolved.manifest_digest);
    println!("Image ID: {}", resolved.image_id());
    Ok(ExitCode::SUCCESS)
}

/// How a layer download is resumed: 4 attempts, 400 ms doubling (jittered), no deadline
/// (an attempt is retried only after it made progress, see [`LayerJob::retry`]).
pub fn layer_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        first_backoff: Duration::from_millis(400),
        max_backoff: Duration::from_millis(6400),
        ..RetryPolicy::default()
    }
}

/// The jobs for every layer of `resolved`, base first.
pub fn layer_jobs(resolved: &Resolved) -> anyhow::Result<Vec<LayerJob>> {
    resolved
        .manifest
        .layers
        .iter()
        .zip(&resolved.config.rootfs.diff_ids)
        .map(|(desc, diff_id)| {
            Ok(LayerJob {
                digest: desc.digest.clone(),
                size: desc.size,
                diff_id: diff_id.clone(),
                compression: desc
                    .compression()
                    .with_context(|| format!("layer {}", desc.digest))?,
                limits: resolved.limits,
                retry: layer_retry(),
            })
        })
        .collect()
}

/// Fetch, verify and extract all layers concurrently (bounded); the first failure wins.
pub async fn fetch_layers(
    store: &Store,
    source: Arc<dyn BlobSource>,
    resolved: &Resolved,
    reporter: &Reporter,
) -> anyhow::Result<()> {
    let jobs = layer_jobs(resolved)?;
    let sem = Arc::new(tokio::sync::Semaphore::new(LAYER_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for job in jobs {
        let store = store.clone();
        let source = source.clone();
        let sem = sem.clone();
        let progress = reporter.layer(common::short(&job.digest), job.size);
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore never closes");
            store
                .ensure_layer(source, &job, progress)
                .await
                .with_context(|| format!("layer {}", job.digest))
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("layer task panicked")?;
    }
    Ok(())
}
