//! `imagefs layers REF`: one line per layer, base first: digest, media type, size, format, and
//! whether it is cached (extracted, blob only, or not at all). eStargz layers (those with a TOC
//! digest annotation) show format `estargz`, and when served lazily, `toc-only` or how many of
//! their file bytes are local.

use std::process::ExitCode;

use clap::Args;

use super::common::{self, Context};
use crate::layer::estargz::TOC_DIGEST_ANNOTATION;
use crate::oci::Digest;
use crate::store::LazyState;

#[derive(Debug, Args)]
pub struct LayersArgs {
    pub reference: String,
}

pub async fn run(ctx: &Context, args: LayersArgs) -> anyhow::Result<ExitCode> {
    let reference = common::parse_reference(&args.reference)?;
    let r = common::resolve(ctx, &reference).await?;
    for (l, diff_id) in r.manifest.layers.iter().zip(&r.config.rootfs.diff_ids) {
        let toc = l
            .annotation(TOC_DIGEST_ANNOTATION)
            .and_then(|t| t.parse::<Digest>().ok());
        let lazy = match &toc {
            Some(toc) if !ctx.store.has_layer(diff_id) => {
                ctx.store.load_lazy_layer(&l.digest, toc)?
            }
            _ => None,
        };
        let state = if ctx.store.has_layer(diff_id) {
            "cached".to_owned()
        } else if ctx.store.has_blob(&l.digest) {
            "blob-cached".to_owned()
        } else if let Some(lazy) = lazy {
            match lazy.state() {
                LazyState { local: 0, .. } => "toc-only".to_owned(),
                LazyState { local, total } if local == total => "local".to_owned(),
                LazyState { local, total } => format!("partial:{local}/{total}"),
            }
        } else {
            "not-cached".to_owned()
        };
        let format = match l.compression() {
            _ if toc.is_some() => "estargz".to_owned(),
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
