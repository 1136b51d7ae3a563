//! What the cache holds of each layer of a resolved image, and in which format the layer is:
//! the answer of `imagefs layers`, kept here so every front end reports it the same way.
//!
//! A gzip layer without the TOC digest annotation still counts as eStargz when a TOC of it is
//! in the store or its last 51 bytes parse as an eStargz footer (one Range request) — the
//! same test [`super::MountedImage`] applies before serving a layer lazily.

use std::ops::Range;

use super::{Error, Resolved};
use crate::layer::estargz::{FOOTER_SIZE, TOC_DIGEST_ANNOTATION, parse_footer};
use crate::oci::{Compression, Descriptor, Digest};
use crate::store::{LazyState, RangeSource, Store};

/// One layer: its descriptor, its format and what of it is local.
#[derive(Debug, Clone)]
pub struct LayerStatus {
    pub descriptor: Descriptor,
    pub format: LayerFormat,
    pub state: LayerState,
}

/// How a layer's blob is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    /// Gzip with a TOC: servable lazily, per chunk.
    Estargz,
    Plain(Compression),
    /// A media type imagefs does not read.
    Unknown,
}

impl LayerFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerFormat::Estargz => "estargz",
            LayerFormat::Plain(c) => c.as_str(),
            LayerFormat::Unknown => "unknown",
        }
    }
}

/// What of a layer the cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerState {
    /// Extracted in the store.
    Extracted,
    /// The verified blob, not extracted yet.
    BlobOnly,
    /// A lazily served eStargz layer: `local` of its `total` file bytes are here.
    Lazy(LazyState),
    NotCached,
}

impl std::fmt::Display for LayerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerState::Extracted => f.write_str("cached"),
            LayerState::BlobOnly => f.write_str("blob-cached"),
            LayerState::Lazy(LazyState { local: 0, .. }) => f.write_str("toc-only"),
            LayerState::Lazy(LazyState { local, total }) if local == total => f.write_str("local"),
            LayerState::Lazy(LazyState { local, total }) => write!(f, "partial:{local}/{total}"),
            LayerState::NotCached => f.write_str("not-cached"),
        }
    }
}

/// The status of every layer of `image`, base first. Reads the store; asks `ranges` only for
/// the footer of a gzip layer that is neither annotated nor local (any failure, e.g. offline,
/// counts as "not eStargz").
pub async fn layer_statuses(
    store: &Store,
    ranges: &(dyn RangeSource + Sync),
    image: &Resolved,
) -> Result<Vec<LayerStatus>, Error> {
    let mut out = Vec::with_capacity(image.manifest.layers.len());
    for (l, diff_id) in image
        .manifest
        .layers
        .iter()
        .zip(&image.config.rootfs.diff_ids)
    {
        let toc = l
            .annotation(TOC_DIGEST_ANNOTATION)
            .and_then(|t| t.parse::<Digest>().ok());
        let extracted = store.has_layer(diff_id);
        let lazy = match extracted {
            false => store.load_lazy_layer(&l.digest, toc.as_ref())?,
            true => None,
        };
        let state = if extracted {
            LayerState::Extracted
        } else if store.has_blob(&l.digest) {
            LayerState::BlobOnly
        } else if let Some(lazy) = &lazy {
            LayerState::Lazy(lazy.state())
        } else {
            LayerState::NotCached
        };
        let format = match l.compression() {
            _ if toc.is_some() || lazy.is_some() => LayerFormat::Estargz,
            Ok(Compression::Gzip) if has_estargz_footer(store, ranges, l, extracted).await => {
                LayerFormat::Estargz
            }
            Ok(c) => LayerFormat::Plain(c),
            Err(_) => LayerFormat::Unknown,
        };
        out.push(LayerStatus {
            descriptor: l.clone(),
            format,
            state,
        });
    }
    Ok(out)
}

/// Whether the blob of `layer` ends with an eStargz footer: read from the cached blob, else
/// with one Range request — but not for a layer extracted already (it is served whole
/// anyway, and a cached image must list without the network).
async fn has_estargz_footer(
    store: &Store,
    ranges: &(dyn RangeSource + Sync),
    layer: &Descriptor,
    extracted: bool,
) -> bool {
    let Some(start) = layer.size.checked_sub(FOOTER_SIZE as u64) else {
        return false;
    };
    let tail: Range<u64> = start..layer.size;
    if store.has_blob(&layer.digest) {
        use std::os::unix::fs::FileExt as _;
        let mut bytes = [0u8; FOOTER_SIZE];
        return std::fs::File::open(store.blob_path(&layer.digest))
            .and_then(|f| f.read_exact_at(&mut bytes, start))
            .is_ok_and(|()| parse_footer(&bytes).is_ok());
    }
    if extracted {
        return false;
    }
    match ranges.fetch_range(&layer.digest, tail).await {
        Ok(bytes) => parse_footer(&bytes).is_ok(),
        Err(e) => {
            tracing::debug!(digest = %layer.digest, "no eStargz footer read: {}", crate::error::Chain(&*e));
            false
        }
    }
}
