//! `imagefs layers REF`: one line per layer, base first: digest, media type, size, format, and
//! whether it is cached (extracted, blob only, or not at all). eStargz layers (those with a TOC
//! digest annotation) show format `estargz`, and when served lazily, `toc-only` or how many of
//! their file bytes are local.
//!
//! A gzip layer without the annotation is still reported `estargz` when a TOC of it is in the
//! store or its last 51 bytes parse as an eStargz footer (one Range request); `mount` serves
//! such layers lazily too (see `cli::mount`).

use std::process::ExitCode;

use clap::Args;

use super::common::{self, Context};
use crate::image::RegistryRanges;
use crate::layer::estargz::{FOOTER_SIZE, TOC_DIGEST_ANNOTATION, parse_footer};
use crate::oci::{Compression, Descriptor, Digest};
use crate::store::{LazyState, RangeSource};

#[derive(Debug, Args)]
pub struct LayersArgs {
    pub reference: String,
}

pub async fn run(ctx: &Context, args: LayersArgs) -> anyhow::Result<ExitCode> {
    let reference = common::parse_reference(&args.reference)?;
    let resolver = ctx.resolver();
    let r = resolver.resolve(&reference).await?;
    let ranges = RegistryRanges::new(resolver.source(&reference));
    for (l, diff_id) in r.manifest.layers.iter().zip(&r.config.rootfs.diff_ids) {
        let toc = l
            .annotation(TOC_DIGEST_ANNOTATION)
            .and_then(|t| t.parse::<Digest>().ok());
        let lazy = match ctx.store.has_layer(diff_id) {
            false => ctx.store.load_lazy_layer(&l.digest, toc.as_ref())?,
            true => None,
        };
        let lazy_known = lazy.is_some();
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
            _ if toc.is_some() || lazy_known => "estargz".to_owned(),
            Ok(Compression::Gzip) if has_estargz_footer(ctx, &ranges, l, diff_id).await => {
                "estargz".to_owned()
            }
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

/// Whether the blob of `layer` ends with an eStargz footer: read from the cached blob, else
/// with one Range request — but not for a layer extracted already (it is served whole anyway,
/// and a cached image must list without the network). Any failure, e.g. `--offline`, counts
/// as no.
async fn has_estargz_footer(
    ctx: &Context,
    ranges: &RegistryRanges,
    layer: &Descriptor,
    diff_id: &Digest,
) -> bool {
    let Some(start) = layer.size.checked_sub(FOOTER_SIZE as u64) else {
        return false;
    };
    if ctx.store.has_blob(&layer.digest) {
        use std::os::unix::fs::FileExt as _;
        let mut tail = [0u8; FOOTER_SIZE];
        return std::fs::File::open(ctx.store.blob_path(&layer.digest))
            .and_then(|f| f.read_exact_at(&mut tail, start))
            .is_ok_and(|()| parse_footer(&tail).is_ok());
    }
    if ctx.store.has_layer(diff_id) {
        return false;
    }
    match ranges.fetch_range(&layer.digest, start..layer.size).await {
        Ok(tail) => parse_footer(&tail).is_ok(),
        Err(e) => {
            tracing::debug!(digest = %layer.digest, "no eStargz footer read: {}", crate::error::Chain(&*e));
            false
        }
    }
}
