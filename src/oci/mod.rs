//! OCI / Docker image-spec types: digests, media types, platforms, manifests, indexes and
//! configs, and legacy Docker schema 1 manifests. Pure parsing: no network, no async, no
//! filesystem.

pub mod digest;
pub mod manifest;
pub mod media;
pub mod platform;
pub mod schema1;

pub use digest::{Digest, DigestError, Hasher};
pub use manifest::{
    Descriptor, ImageConfig, ImageIndex, ImageManifest, LayerDescriptor, Manifest, ManifestError,
    RootFs, check_layers, parse_config, parse_manifest, select_platform,
};
pub use media::{Compression, MediaError, layer_compression};
pub use platform::{Platform, PlatformError};
pub use schema1::{Schema1Error, Schema1Manifest};
