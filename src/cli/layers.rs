//! `imagefs layers REF`: one line per layer, base first: digest, media type, size, format, and
//! whether it is cached (extracted, blob only, or not at all). eStargz layers show format
//! `estargz`, and when served lazily, `toc-only` or how many of their file bytes are local.
//! The answer is [`crate::image::layer_statuses`]'s; this prints it.

use std::process::ExitCode;

use clap::Args;

use super::common::{self, Context};
use crate::image::{RegistryRanges, layer_statuses};

#[derive(Debug, Args)]
pub struct LayersArgs {
    pub reference: String,
}

pub async fn run(ctx: &Context, args: LayersArgs) -> anyhow::Result<ExitCode> {
    let reference = common::parse_reference(&args.reference)?;
    let resolver = ctx.resolver();
    let r = resolver.resolve(&reference).await?;
    let ranges = RegistryRanges::new(resolver.source(&reference));
    for l in layer_statuses(&ctx.store, &ranges, &r).await? {
        let d = &l.descriptor;
        println!(
            "{}\t{}\t{}\t{}\t{}",
            d.digest,
            d.media_type,
            d.size,
            l.format.as_str(),
            l.state
        );
    }
    Ok(ExitCode::SUCCESS)
}
