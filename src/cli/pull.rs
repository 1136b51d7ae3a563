//! `imagefs pull REF`: resolve, then fetch, verify and extract every layer (in parallel,
//! bounded), so that a later mount needs no network.

use std::process::ExitCode;

use clap::Args;

use super::common::{self, Context};
use super::progress::Reporter;
use crate::image;
use crate::store::LayerJob;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference, e.g. busybox, registry:5000/app:1.0, name@sha256:…
    pub reference: String,
}

pub async fn run(ctx: &Context, args: PullArgs) -> anyhow::Result<ExitCode> {
    let reference = common::parse_reference(&args.reference)?;
    let reporter = Reporter::new(ctx.quiet, ctx.tty);
    reporter.line(&format!("Pulling {reference}"));
    let resolver = ctx.resolver();
    let resolved = resolver.resolve(&reference).await?;
    let progress = |job: &LayerJob| reporter.layer(common::short(&job.digest), job.size);
    image::fetch_layers(
        &ctx.store,
        resolver.source(&reference),
        &resolved,
        &progress,
    )
    .await?;
    image::engine::enforce_cache_bound(&ctx.store, ctx.cache_max, &resolved.manifest_digest);
    // Results, not progress: printed with -q too (scripts read them).
    println!("Digest: {}", resolved.manifest_digest);
    println!("Image ID: {}", resolved.image_id());
    Ok(ExitCode::SUCCESS)
}
