//! An image as a front end serves it: the engine every front end shares (the `mount`
//! command today; the containerd snapshotter next).
//!
//! - [`resolve`]: a reference → a verified manifest and config ([`Resolver`], [`Resolved`]),
//!   from the registry or the cache alone.
//! - [`source`]: the registry as the store's source of blobs and of byte ranges, with the
//!   failures a caller acts on typed ([`SourceFailure`]: Range ignored, offline).
//! - [`engine`]: a mounted image ([`MountedImage`]): which layers are lazy eStargz, fetching
//!   and extracting the others, building and keeping the merged tree (the one place it is
//!   kept), prefetch, and the whole-layer fallback when the registry ignores Range; it is the
//!   `fs::Backend` a FUSE front end serves. [`fetch_layers`] is `pull`'s whole-image fetch.
//! - [`status`]: each layer's format and what of it is cached ([`layer_statuses`]).
//! - [`convert`]: an image rewritten with eStargz layers and pushed (`imagefs convert`).
//!
//! This module knows no clap, anyhow, environment variables or progress bars: its errors are
//! typed ([`Error`]), progress goes through the store's callbacks.

pub mod convert;
pub mod engine;
pub mod resolve;
pub mod source;
pub mod status;

pub use engine::{MountedImage, Prefetch, ServeOptions, fetch_layers, layer_jobs};
pub use resolve::{IndexEntryKind, LAYER_CONCURRENCY, MAX_DOCUMENT, Resolved, Resolver, ref_key};
pub use source::{RegistryRanges, RegistrySource, SourceFailure, is_range_ignored};
pub use status::{LayerFormat, LayerState, LayerStatus, layer_statuses};

use crate::oci::Digest;
use crate::oci::manifest::ManifestError;
use crate::oci::media::MediaError;
use crate::oci::schema1::Schema1Error;
use crate::store::StoreError;

/// Why an image could not be resolved or served. Each variant names what failed; causes are
/// kept as sources (shown after it, `: `-separated, by the front end).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} is not in the cache: pull it without --offline first")]
    NotCached { what: String },
    #[error("{what} {digest} of {reference}")]
    Document {
        what: &'static str,
        digest: Digest,
        reference: String,
        #[source]
        source: Box<ManifestError>,
    },
    #[error("{digest} is a {len}-byte blob, not a manifest or config")]
    NotADocument { digest: Digest, len: u64 },
    #[error("{reference} is a multi-platform index")]
    Platform {
        reference: String,
        #[source]
        source: Box<ManifestError>,
    },
    #[error("manifest {digest} of {reference} is {kind}")]
    IndexEntry {
        digest: Digest,
        reference: String,
        kind: IndexEntryKind,
    },
    #[error(
        "{reference} is a single-platform image for {image}, not {wanted}: drop --platform or \
         pick an image built for it"
    )]
    PlatformMismatch {
        reference: String,
        /// The image's platform and the one asked for, as `os/arch[/variant]`.
        image: String,
        wanted: String,
    },
    #[error("schema 1 manifest {digest} of {reference}")]
    Schema1 {
        digest: Digest,
        reference: String,
        #[source]
        source: Box<Error>,
    },
    #[error(
        "{reference} is a schema 1 image whose layers are not all in the cache: pull it \
         without --offline first"
    )]
    Schema1NotCached { reference: String },
    #[error("the cache's record of it is not a schema 1 manifest")]
    Schema1Record,
    #[error("the registry now serves something else under {digest}")]
    Schema1Changed { digest: Digest },
    #[error("the manifest is not UTF-8")]
    Schema1NotUtf8,
    #[error(transparent)]
    Schema1Convert(#[from] Schema1Error),
    #[error("layer {digest}")]
    LayerMedia {
        digest: Digest,
        #[source]
        source: MediaError,
    },
    #[error("merging the layers of {reference}")]
    Merge {
        reference: String,
        #[source]
        source: crate::overlay::MergeError,
    },
    #[error("no layer {layer} in this image")]
    NoLayer { layer: u32 },
    #[error("file bytes {offset}+{len}")]
    Chunk {
        offset: u64,
        len: u64,
        #[source]
        source: Box<StoreError>,
    },
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error(transparent)]
    Store(Box<StoreError>),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::Store(Box::new(e))
    }
}

impl Error {
    fn not_cached(reference: &crate::reference::Reference) -> Error {
        Error::NotCached {
            what: reference.to_string(),
        }
    }

    fn document(
        what: &'static str,
        digest: &Digest,
        reference: &crate::reference::Reference,
        source: ManifestError,
    ) -> Error {
        Error::Document {
            what,
            digest: digest.clone(),
            reference: reference.to_string(),
            source: Box::new(source),
        }
    }
}
