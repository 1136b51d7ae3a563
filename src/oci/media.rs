//! Media types of the OCI image-spec (`media-types.md`) and of Docker's image manifest v2
//! schema 2, and what they mean to us: which document a manifest is, and how a layer is
//! compressed. Strings only: this module knows nothing of JSON or of the network.

use std::fmt;

// OCI image-spec v1.1, media-types.md.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
// Deprecated in image-spec 1.1 but still found in the wild (Windows base layers); the blob
// itself is an ordinary layer, only its redistribution was restricted.
pub const OCI_LAYER_NONDISTRIBUTABLE_TAR: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar";
pub const OCI_LAYER_NONDISTRIBUTABLE_TAR_GZIP: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub const OCI_LAYER_NONDISTRIBUTABLE_TAR_ZSTD: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";

// Docker image manifest v2, schema 2 (distribution `docs/spec/manifest-v2-2.md`).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_FOREIGN_LAYER_GZIP: &str =
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
// Not in Docker's spec, but written by containerd and BuildKit (containerd `images/mediatypes.go`).
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

// Docker image manifest v2, schema 1: deprecated, read by converting it (`oci::schema1`).
pub const DOCKER_SCHEMA1_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED_MANIFEST: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The `Accept` header for manifest requests, most preferred first. Without the two Docker
/// types a distribution 2.x registry would down-convert schema 2 manifests to schema 1;
/// schema 1 itself is left out (the client appends it last: it is used only when it is all
/// a registry has, as it cannot be mounted lazily).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// What kind of document a manifest media type announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestKind {
    /// An OCI image index or a Docker manifest list: one entry per platform.
    Index,
    /// An OCI image manifest or a Docker v2 schema 2 manifest: config + layers.
    Image,
    /// Docker v2 schema 1, signed or not: converted to an image manifest on pull.
    Schema1,
}

/// The kind of manifest `media_type` names, `None` if it is not a manifest type we know.
/// Parameters (`; charset=utf-8`) and case are ignored, as RFC 6838 media types are
/// case-insensitive and some registries append a charset.
pub fn manifest_kind(media_type: &str) -> Option<ManifestKind> {
    let essence = essence(media_type);
    let is = |known: &str| essence.eq_ignore_ascii_case(known);
    if is(OCI_INDEX) || is(DOCKER_MANIFEST_LIST) {
        Some(ManifestKind::Index)
    } else if is(OCI_MANIFEST) || is(DOCKER_MANIFEST) {
        Some(ManifestKind::Image)
    } else if is(DOCKER_SCHEMA1_MANIFEST) || is(DOCKER_SCHEMA1_SIGNED_MANIFEST) {
        Some(ManifestKind::Schema1)
    } else {
        None
    }
}

/// Whether `media_type` is an image config (OCI or Docker), as opposed to an artifact's.
pub fn is_image_config(media_type: &str) -> bool {
    let essence = essence(media_type);
    essence.eq_ignore_ascii_case(OCI_CONFIG) || essence.eq_ignore_ascii_case(DOCKER_CONFIG)
}

/// The media type without its parameters: `a/b; charset=utf-8` → `a/b`.
fn essence(media_type: &str) -> &str {
    media_type.split(';').next().unwrap_or("").trim()
}

/// How a layer blob is compressed; the uncompressed content is always a tar stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    #[error(
        "unsupported layer media type {media_type:?}: expected an OCI or Docker tar layer \
         (uncompressed, gzip or zstd)"
    )]
    UnknownLayer { media_type: String },
    #[error(
        "layer media type {media_type:?} is encrypted (ocicrypt); encrypted images are not \
         supported, use an unencrypted copy of the image"
    )]
    EncryptedLayer { media_type: String },
}

/// The compression of a layer of media type `media_type`.
///
/// eStargz layers are ordinary `tar+gzip` layers (recognised by annotations and footer, not
/// by media type), so they land in `Gzip` here.
pub fn layer_compression(media_type: &str) -> Result<Compression, MediaError> {
    let essence = essence(media_type).to_ascii_lowercase();
    let compression = match essence.as_str() {
        OCI_LAYER_TAR | OCI_LAYER_NONDISTRIBUTABLE_TAR | DOCKER_LAYER_TAR => Compression::None,
        OCI_LAYER_TAR_GZIP
        | OCI_LAYER_NONDISTRIBUTABLE_TAR_GZIP
        | DOCKER_LAYER_GZIP
        | DOCKER_FOREIGN_LAYER_GZIP => Compression::Gzip,
        OCI_LAYER_TAR_ZSTD | OCI_LAYER_NONDISTRIBUTABLE_TAR_ZSTD | DOCKER_LAYER_ZSTD => {
            Compression::Zstd
        }
        other if other.ends_with("+encrypted") => {
            return Err(MediaError::EncryptedLayer {
                media_type: media_type.to_owned(),
            });
        }
        _ => {
            return Err(MediaError::UnknownLayer {
                media_type: media_type.to_owned(),
            });
        }
    };
    Ok(compression)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_compressions() {
        let cases = [
            (OCI_LAYER_TAR, Compression::None),
            (OCI_LAYER_TAR_GZIP, Compression::Gzip),
            (OCI_LAYER_TAR_ZSTD, Compression::Zstd),
            (OCI_LAYER_NONDISTRIBUTABLE_TAR, Compression::None),
            (OCI_LAYER_NONDISTRIBUTABLE_TAR_GZIP, Compression::Gzip),
            (OCI_LAYER_NONDISTRIBUTABLE_TAR_ZSTD, Compression::Zstd),
            (DOCKER_LAYER_GZIP, Compression::Gzip),
            (DOCKER_FOREIGN_LAYER_GZIP, Compression::Gzip),
            (DOCKER_LAYER_TAR, Compression::None),
            (DOCKER_LAYER_ZSTD, Compression::Zstd),
            (
                "Application/VND.oci.image.layer.v1.tar+gzip; foo=bar",
                Compression::Gzip,
            ),
        ];
        for (media_type, want) in cases {
            assert_eq!(layer_compression(media_type), Ok(want), "{media_type}");
        }
    }

    #[test]
    fn unknown_layers_are_named() {
        let cases = [
            (
                "application/vnd.oci.image.layer.v1.tar+lz4",
                "unsupported layer media type",
            ),
            ("", "unsupported layer media type"),
            (OCI_CONFIG, "unsupported layer media type"),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
                "encrypted",
            ),
        ];
        for (media_type, want) in cases {
            let err = layer_compression(media_type).unwrap_err().to_string();
            assert!(err.contains(want), "{media_type:?}: {err}");
            assert!(
                err.contains(&format!("{media_type:?}")),
                "{media_type:?}: {err}"
            );
        }
    }

    #[test]
    fn manifest_kinds() {
        let cases = [
            (OCI_INDEX, Some(ManifestKind::Index)),
            (DOCKER_MANIFEST_LIST, Some(ManifestKind::Index)),
            (OCI_MANIFEST, Some(ManifestKind::Image)),
            (DOCKER_MANIFEST, Some(ManifestKind::Image)),
            (DOCKER_SCHEMA1_MANIFEST, Some(ManifestKind::Schema1)),
            (DOCKER_SCHEMA1_SIGNED_MANIFEST, Some(ManifestKind::Schema1)),
            (
                "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
                Some(ManifestKind::Image),
            ),
            ("application/json", None),
            (OCI_CONFIG, None),
            ("", None),
        ];
        for (media_type, want) in cases {
            assert_eq!(manifest_kind(media_type), want, "{media_type}");
        }
    }

    #[test]
    fn accept_lists_every_usable_manifest_type() {
        let listed: Vec<&str> = MANIFEST_ACCEPT.split(',').map(str::trim).collect();
        for media_type in [
            OCI_INDEX,
            OCI_MANIFEST,
            DOCKER_MANIFEST_LIST,
            DOCKER_MANIFEST,
        ] {
            assert!(
                listed.contains(&media_type),
                "{media_type} missing from Accept"
            );
        }
        assert!(listed.iter().all(|m| manifest_kind(m).is_some()));
        assert!(!listed.contains(&DOCKER_SCHEMA1_MANIFEST));
    }

    #[test]
    fn image_configs() {
        assert!(is_image_config(OCI_CONFIG));
        assert!(is_image_config(DOCKER_CONFIG));
        assert!(!is_image_config("application/vnd.cncf.helm.config.v1+json"));
        assert!(!is_image_config(""));
    }
}
