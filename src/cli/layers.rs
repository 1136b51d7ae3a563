//! `imagefs layers REF`: one line per layer, base first: digest, media type, size, and
//! whether it is cached (extracted, blob only, or not at all).

use std::process::ExitCode;

use clap::Args;

use super::common::{self, Context};

#[derive(Debug, Args)]
pub struct LayersArgs {
    pub reference: String,
}

pub async fn run(ctx: &Context, args: LayersArgs) -> anyhow::Result<ExitCode> {
    let reference = common::parse_reference(&args.reference)?;
    let r = common::resolve(ctx, &reference).await?;
    for (l, diff_id) in r.manifest.layers.iter().zip(&r.config.rootfs.diff_ids) {
        let state = if ctx.store.has_layer(diff_id) {
            "cached"
        } else if ctx.store.has_blob(&l.digest) {
            "blob-cached"
        } else {
            "not-cached"
        };
        let format = match l.compression() {
            Ok(c) => c.as_str().to_owned(),
            Err(_) => "unknown".to_owned(),
        };
        println!(
            "{}\t{}\t{}\t{}\t{}",
            l.digest, l.media_type, l.size, format, state
        );
    }
    Ok(ExitCode::SUCCESS)
}
