//! Manifests, indexes and image configs: parse the JSON a registry returns, tell an index
//! from an image manifest, pick the entry for a platform, and check that a config matches its
//! manifest. Pure parsing of bytes already fetched: no network, no store, no layer contents.
//!
//! # Why our own serde structs and not `oci_spec::image::{ImageIndex, ImageManifest}`
//!
//! oci-spec 0.10 does parse real documents (Docker schema 2, manifest lists, manifests
//! without `mediaType`), so it is not too strict; it is too loose and too indirect for us:
//! - its `Digest` accepts any algorithm (`multihash+base58:…`), so every descriptor would
//!   need a second conversion to [`crate::oci::Digest`] (sha256/sha512, which we can verify).
//!   Here a bad digest fails the parse, with serde's line and column;
//! - annotations are a `HashMap`: iteration order changes between runs, which `inspect`
//!   output and tests must not see. Here they are a `BTreeMap`;
//! - getters and builders on every field, and Os/Arch enums, where we need plain strings to
//!   normalise (`aarch64`) and to print exactly what the index says.
//!
//! The structs follow image-spec v1.1 (`manifest.md`, `image-index.md`, `descriptor.md`,
//! `config.md`), which Docker's schema 2 is a subset of (same field names). Unknown fields
//! are ignored, as the spec requires of consumers.
//!
//! # How a document is recognised (`parse_manifest`)
//!
//! 1. `schemaVersion: 1` (or schema 1's `fsLayers` / `signatures`) → a Docker schema 1
//!    manifest, parsed and validated by [`crate::oci::schema1`].
//! 2. The body's `mediaType` if present: authoritative, an unknown one is an error.
//! 3. Else the response `Content-Type` if it names a manifest type (registries often send
//!    `application/json` or `text/plain` for manifests pushed without `mediaType`; those are
//!    ignored).
//! 4. Else the shape: `manifests` → index; `config` and `layers` → image manifest.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::oci::Digest;
use crate::oci::media::{self, Compression, ManifestKind, MediaError};
use crate::oci::platform::Platform;
use crate::oci::schema1::{self, Schema1Error, Schema1Manifest};

/// The annotation BuildKit puts on attestation (SBOM / provenance) entries of an index.
pub const ANNOTATION_REFERENCE_TYPE: &str = "vnd.docker.reference.type";
const ATTESTATION_MANIFEST: &str = "attestation-manifest";

/// A content descriptor (`descriptor.md`): what a manifest or index points to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// REQUIRED by the spec, but tolerated as missing (empty): what a blob is can still be
    /// found out from the blob, and the error then names the real problem.
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    /// The spec's int64; negative sizes fail to parse, sizes above `i64::MAX` are refused
    /// after parsing.
    pub size: u64,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub urls: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

/// A layer of an image manifest: digest, media type, size, annotations (eStargz's
/// `containerd.io/snapshot/stargz/toc.digest` among them), in `ImageManifest::layers`.
pub type LayerDescriptor = Descriptor;

impl Descriptor {
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }

    /// How this layer is compressed, from its media type.
    pub fn compression(&self) -> Result<Compression, MediaError> {
        media::layer_compression(&self.media_type)
    }

    /// Whether this index entry is an attestation (BuildKit writes SBOM and provenance as
    /// manifests with platform `unknown/unknown` and a reference-type annotation).
    pub fn is_attestation(&self) -> bool {
        let unknown_platform = self
            .platform
            .as_ref()
            .is_some_and(|p| p.os == "unknown" && p.architecture == "unknown");
        unknown_platform || self.annotation(ANNOTATION_REFERENCE_TYPE) == Some(ATTESTATION_MANIFEST)
    }
}

/// An OCI image index or a Docker manifest list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    #[serde(default = "schema_version_2")]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest or a Docker v2 schema 2 manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    #[serde(default = "schema_version_2")]
    pub schema_version: u32,
    /// Absent in manifests written by umoci and ctr-remote (the spec only RECOMMENDs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    /// Base layer first, as the spec orders them.
    #[serde(deserialize_with = "null_as_default")]
    pub layers: Vec<LayerDescriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
}

impl ImageManifest {
    /// Check that this manifest describes a container image we can mount: an image config
    /// (not an artifact such as a Helm chart) and layers of known compression.
    pub fn check_image(&self) -> Result<(), ManifestError> {
        // An empty config media type is tolerated like elsewhere; the config parse decides.
        if !self.config.media_type.is_empty() && !media::is_image_config(&self.config.media_type) {
            return Err(ManifestError::NotAnImage {
                media_type: self.config.media_type.clone(),
            });
        }
        for layer in &self.layers {
            layer.compression()?;
        }
        Ok(())
    }
}

/// A parsed manifest document: either an index of per-platform manifests, or one image.
#[expect(
    clippy::large_enum_variant,
    reason = "one short-lived value per pull; boxing would only add noise at every match"
)]
#[derive(Clone, Debug, PartialEq)]
pub enum Manifest {
    Index(ImageIndex),
    Image(ImageManifest),
    /// A legacy Docker schema 1 manifest: becomes an [`ImageManifest`] once its layers are
    /// fetched (see [`crate::oci::schema1`]).
    Schema1(Schema1Manifest),
}

/// An image config (`config.md`): the fields imagefs uses, plus the whole document.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageConfig {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub rootfs: RootFs,
    /// The whole config as parsed (Env, Cmd, Labels, history, ...), for `inspect`.
    pub raw: Value,
}

/// `rootfs` of an image config; `type` is always `layers` (checked when parsing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootFs {
    /// The sha256 of each layer's uncompressed tar, base layer first.
    pub diff_ids: Vec<Digest>,
}

impl ImageConfig {
    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// `reason` is serde_json's message, with line and column.
    #[error("malformed {document}: {reason}")]
    Json {
        document: &'static str,
        reason: String,
    },
    /// Ends in advice, so the cause is in the message, not `source()`.
    #[error("schema 1 manifest: {0}: the image is malformed, re-push it with a current client")]
    Schema1(Schema1Error),
    #[error("unsupported manifest schemaVersion {version}: expected 2")]
    SchemaVersion { version: String },
    #[error(
        "unsupported manifest media type {media_type:?}: expected an OCI image index or \
         manifest, a Docker manifest list or a Docker schema 2 manifest"
    )]
    UnknownMediaType { media_type: String },
    #[error(
        "cannot tell what kind of manifest this is: it has no mediaType, {}, and neither a \
         `manifests` list nor `config` and `layers`",
        describe_content_type(.content_type)
    )]
    UnknownShape { content_type: Option<String> },
    #[error("{document} refers to {digest} with size {size}, beyond the spec's int64 range")]
    Size {
        document: &'static str,
        digest: Digest,
        size: u64,
    },
    #[error("no manifest for platform {want} in index; available: {}", list_or_none(.available))]
    NoPlatform {
        want: Platform,
        available: Vec<Platform>,
    },
    #[error(
        "this is not a container image: its config media type is {media_type:?} (an OCI \
         artifact such as a Helm chart or a signature?)"
    )]
    NotAnImage { media_type: String },
    #[error(transparent)]
    Layer(#[from] MediaError),
    #[error("unsupported image config: rootfs.type is {rootfs_type:?}, expected \"layers\"")]
    RootfsType { rootfs_type: String },
    #[error(
        "the manifest lists {layers} layers but its config has {diff_ids} diff_ids: the \
         image is inconsistent, rebuild or re-push it"
    )]
    LayerCount { layers: usize, diff_ids: usize },
}

fn describe_content_type(content_type: &Option<String>) -> String {
    match content_type {
        Some(ct) => format!("Content-Type {ct:?}"),
        None => "no Content-Type".to_owned(),
    }
}

fn list_or_none(platforms: &[Platform]) -> String {
    if platforms.is_empty() {
        return "none".to_owned();
    }
    let names: Vec<String> = platforms.iter().map(Platform::to_string).collect();
    names.join(", ")
}

/// Parse a manifest or index fetched from a registry; `content_type` is the response's
/// `Content-Type`, if any. See the module docs for how the kind is decided.
pub fn parse_manifest(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
    // A first pass as a map: gives the kind-deciding fields, and refuses non-objects with a
    // clear message (serde's derive would otherwise accept an array, positionally).
    // serde_json's recursion limit (128) bounds nesting in both passes.
    let fields: serde_json::Map<String, Value> =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Json {
            document: "manifest",
            reason: e.to_string(),
        })?;

    match fields.get("schemaVersion") {
        None => {}
        Some(v) if v.as_u64() == Some(2) => {}
        Some(v) if v.as_u64() == Some(1) => return Ok(Manifest::Schema1(schema1::parse(bytes)?)),
        Some(v) => {
            return Err(ManifestError::SchemaVersion {
                version: v.to_string(),
            });
        }
    }
    if fields.contains_key("fsLayers") || fields.contains_key("signatures") {
        return Ok(Manifest::Schema1(schema1::parse(bytes)?));
    }

    let kind = match fields.get("mediaType") {
        Some(Value::String(mt)) if !mt.is_empty() => {
            media::manifest_kind(mt).ok_or_else(|| ManifestError::UnknownMediaType {
                media_type: mt.clone(),
            })?
        }
        Some(Value::String(_) | Value::Null) | None => {
            match content_type.and_then(media::manifest_kind) {
                Some(kind) => kind,
                None if fields.contains_key("manifests") => ManifestKind::Index,
                None if fields.contains_key("config") && fields.contains_key("layers") => {
                    ManifestKind::Image
                }
                None => {
                    return Err(ManifestError::UnknownShape {
                        content_type: content_type.map(str::to_owned),
                    });
                }
            }
        }
        Some(other) => {
            return Err(ManifestError::Json {
                document: "manifest",
                reason: format!("mediaType must be a string, found {other}"),
            });
        }
    };

    match kind {
        ManifestKind::Schema1 => Ok(Manifest::Schema1(schema1::parse(bytes)?)),
        ManifestKind::Index => {
            let index: ImageIndex = parse_typed(bytes, "image index")?;
            check_sizes("image index", index.manifests.iter().chain(&index.subject))?;
            Ok(Manifest::Index(index))
        }
        ManifestKind::Image => {
            let image: ImageManifest = parse_typed(bytes, "image manifest")?;
            let descriptors = std::iter::once(&image.config)
                .chain(&image.layers)
                .chain(&image.subject);
            check_sizes("image manifest", descriptors)?;
            Ok(Manifest::Image(image))
        }
    }
}

fn parse_typed<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    document: &'static str,
) -> Result<T, ManifestError> {
    serde_json::from_slice(bytes).map_err(|e| ManifestError::Json {
        document,
        reason: e.to_string(),
    })
}

fn check_sizes<'a>(
    document: &'static str,
    descriptors: impl IntoIterator<Item = &'a Descriptor>,
) -> Result<(), ManifestError> {
    for d in descriptors {
        if i64::try_from(d.size).is_err() {
            return Err(ManifestError::Size {
                document,
                digest: d.digest.clone(),
                size: d.size,
            });
        }
    }
    Ok(())
}

/// The index entry to use for platform `want`: the first entry whose platform matches
/// (see [`Platform::matches`]). Attestations and entries without a platform are skipped.
pub fn select_platform(index: &ImageIndex, want: &Platform) -> Result<Descriptor, ManifestError> {
    let candidates = index
        .manifests
        .iter()
        .filter(|d| !d.is_attestation())
        .filter_map(|d| d.platform.as_ref().map(|p| (d, p)));
    let mut available = Vec::new();
    for (descriptor, platform) in candidates {
        if want.matches(platform) {
            return Ok(descriptor.clone());
        }
        if !available.contains(platform) {
            available.push(platform.clone());
        }
    }
    Err(ManifestError::NoPlatform {
        want: want.clone(),
        available,
    })
}

#[derive(Deserialize)]
struct ConfigFields {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
    rootfs: RootFsFields,
}

#[derive(Deserialize)]
struct RootFsFields {
    #[serde(rename = "type")]
    rootfs_type: String,
    #[serde(default, deserialize_with = "null_as_default")]
    diff_ids: Vec<Digest>,
}

/// Parse an image config (OCI or Docker: same fields).
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, ManifestError> {
    let json_error = |e: serde_json::Error| ManifestError::Json {
        document: "image config",
        reason: e.to_string(),
    };
    // The map pass refuses non-objects (see parse_manifest) and keeps the raw document.
    let raw: serde_json::Map<String, Value> = serde_json::from_slice(bytes).map_err(json_error)?;
    let fields: ConfigFields = serde_json::from_slice(bytes).map_err(json_error)?;
    if fields.rootfs.rootfs_type != "layers" {
        return Err(ManifestError::RootfsType {
            rootfs_type: fields.rootfs.rootfs_type,
        });
    }
    Ok(ImageConfig {
        os: fields.os,
        architecture: fields.architecture,
        variant: fields.variant.filter(|v| !v.is_empty()),
        rootfs: RootFs {
            diff_ids: fields.rootfs.diff_ids,
        },
        raw: Value::Object(raw),
    })
}

/// Check that `config` has one diff_id per layer of `manifest`: layer `i` must decompress
/// to a tar whose sha256 is `diff_ids[i]`, so the counts must agree.
pub fn check_layers(manifest: &ImageManifest, config: &ImageConfig) -> Result<(), ManifestError> {
    let (layers, diff_ids) = (manifest.layers.len(), config.rootfs.diff_ids.len());
    if layers != diff_ids {
        return Err(ManifestError::LayerCount { layers, diff_ids });
    }
    Ok(())
}

fn schema_version_2() -> u32 {
    2
}

/// Go writes a nil slice or map as `null`; read it as empty.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/oci");

    fn data(name: &str) -> Vec<u8> {
        let path = format!("{DATA}/{name}");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn index(bytes: &[u8]) -> ImageIndex {
        match parse_manifest(bytes, None).unwrap() {
            Manifest::Index(index) => index,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn image(bytes: &[u8], content_type: Option<&str>) -> ImageManifest {
        match parse_manifest(bytes, content_type).unwrap() {
            Manifest::Image(image) => image,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn oci_index_selects_platforms_and_skips_attestations() {
        let index = index(&data("index-multiarch.json"));
        assert_eq!(index.media_type.as_deref(), Some(media::OCI_INDEX));
        assert_eq!(index.manifests.len(), 4);
        assert!(index.manifests[3].is_attestation());

        let cases = [
            ("linux/amd64", Some("sha256:a1")),
            ("linux/x86_64", Some("sha256:a1")),
            ("linux/arm/v7", Some("sha256:a2")),
            ("linux/arm", Some("sha256:a2")),
            ("linux/armhf", Some("sha256:a2")),
            ("linux/arm64", Some("sha256:a3")),
            ("linux/arm64/v8", Some("sha256:a3")),
            ("linux/aarch64", Some("sha256:a3")),
            ("linux/arm/v6", None),
            ("linux/s390x", None),
            ("unknown/unknown", None),
            ("windows/amd64", None),
        ];
        for (want, digest_prefix) in cases {
            let got = select_platform(&index, &p(want));
            match digest_prefix {
                Some(prefix) => {
                    let d = got.unwrap_or_else(|e| panic!("{want}: {e}"));
                    assert!(
                        d.digest.to_string().starts_with(prefix),
                        "{want}: {}",
                        d.digest
                    );
                    assert_eq!(d.media_type, media::OCI_MANIFEST);
                }
                None => {
                    let err = got.unwrap_err().to_string();
                    assert_eq!(
                        err,
                        format!(
                            "no manifest for platform {want} in index; available: \
                             linux/amd64, linux/arm/v7, linux/arm64/v8"
                        )
                    );
                }
            }
        }
    }

    #[test]
    fn attestations_by_annotation_and_entries_without_platform_are_skipped() {
        let json = br#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json",
             "digest":"sha256:b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1","size":1,
             "platform":{"os":"linux","architecture":"amd64"},
             "annotations":{"vnd.docker.reference.type":"attestation-manifest"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json",
             "digest":"sha256:b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2","size":2},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json",
             "digest":"sha256:b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3b3","size":3,
             "platform":{"os":"linux","architecture":"amd64"}}]}"#;
        let index = index(json);
        let d = select_platform(&index, &p("linux/amd64")).unwrap();
        assert_eq!(d.size, 3);

        let empty = self::index(br#"{"schemaVersion":2,"manifests":null}"#);
        let err = select_platform(&empty, &p("linux/amd64")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no manifest for platform linux/amd64 in index; available: none"
        );
    }

    #[test]
    fn docker_manifest_list() {
        let bytes = data("docker-manifest-list.json");
        let index = index(&bytes);
        assert_eq!(
            index.media_type.as_deref(),
            Some(media::DOCKER_MANIFEST_LIST)
        );
        let d = select_platform(&index, &p("linux/arm64")).unwrap();
        assert_eq!(d.media_type, media::DOCKER_MANIFEST);
        assert_eq!(d.size, 527);
        let d = select_platform(&index, &p("linux/arm/v6")).unwrap();
        assert_eq!(d.platform, Some(p("linux/arm/v6")));
        let err = select_platform(&index, &p("linux/riscv64"))
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(
                "available: linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64/v8, linux/386"
            ),
            "{err}"
        );
    }

    #[test]
    fn docker_schema2_manifest() {
        let m = image(&data("docker-v2s2.json"), Some(media::DOCKER_MANIFEST));
        assert_eq!(m.media_type.as_deref(), Some(media::DOCKER_MANIFEST));
        assert_eq!(m.config.media_type, media::DOCKER_CONFIG);
        assert_eq!(m.config.size, 1472);
        assert_eq!(m.layers.len(), 2);
        assert_eq!(m.layers[0].compression(), Ok(Compression::Gzip));
        assert_eq!(m.layers[1].media_type, media::DOCKER_FOREIGN_LAYER_GZIP);
        assert_eq!(
            m.layers[1].urls,
            vec!["https://example.com/layer.tar.gz".to_owned()]
        );
        assert!(m.check_image().is_ok());
    }

    #[test]
    fn oci_manifest_without_media_type_as_umoci_writes_it() {
        // Captured from the fixture busybox-estargz.oci.tar (blob d44ab81d…).
        let bytes = data("manifest-estargz-no-mediatype.json");
        assert_eq!(
            Digest::sha256(&bytes).to_string(),
            "sha256:d44ab81df62ae545df0ae60621f70654802221f43947fa7ef7e62eb3a95cb0c6"
        );
        // Whatever the registry says the type is, or nothing at all.
        for content_type in [None, Some("application/json"), Some(media::OCI_MANIFEST)] {
            let m = image(&bytes, content_type);
            assert_eq!(m.media_type, None);
            assert_eq!(m.config.media_type, media::OCI_CONFIG);
            assert_eq!(m.layers.len(), 2);
            let l = &m.layers[0];
            assert_eq!(
                l.digest.to_string(),
                "sha256:27a9e8eb0c960f71a9c3368ffa5782c2530d6644aac0364b139dd81f2cc453e5"
            );
            assert_eq!(l.size, 2389971);
            assert_eq!(
                l.annotation("containerd.io/snapshot/stargz/toc.digest"),
                Some("sha256:ac74a36d20c572967b2b143cf675479adc691685026ef8150ca9c7a557c3049f")
            );
            assert_eq!(
                l.annotation("io.containers.estargz.uncompressed-size"),
                Some("6200320")
            );
            assert!(m.check_image().is_ok());
        }
    }

    #[test]
    fn config_of_the_fixture() {
        // Captured from busybox-estargz.oci.tar (blob 7299bf0c…).
        let bytes = data("config-estargz.json");
        let config = parse_config(&bytes).unwrap();
        assert_eq!(config.platform(), p("linux/amd64"));
        assert_eq!(
            config.rootfs.diff_ids,
            vec![
                "sha256:e091a6b7460b90ac05aa8b5a57265144e20e4e798df78d0b188a878f7b44d404"
                    .parse::<Digest>()
                    .unwrap(),
                "sha256:7a6357dfc19cf7e72f4e0ffd9f2f1fd8d4fde6fc67e4703e35eff3dd2ff7661f"
                    .parse()
                    .unwrap(),
            ]
        );
        assert_eq!(config.raw["config"]["Cmd"][0], "/bin/sh");

        let manifest = image(&data("manifest-estargz-no-mediatype.json"), None);
        assert!(check_layers(&manifest, &config).is_ok());
        let mut short = manifest.clone();
        short.layers.pop();
        assert_eq!(
            check_layers(&short, &config).unwrap_err().to_string(),
            "the manifest lists 1 layers but its config has 2 diff_ids: the image is \
             inconsistent, rebuild or re-push it"
        );
    }

    #[test]
    fn bad_configs() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let cases = [
            (format!(r#"{{"os":"linux","architecture":"amd64","rootfs":{{"type":"zfs","diff_ids":["{d}"]}}}}"#), "rootfs.type is \"zfs\""),
            (r#"{"os":"linux","architecture":"amd64"}"#.to_owned(), "missing field `rootfs`"),
            (r#"{"os":"linux","architecture":"amd64","rootfs":{"type":"layers","diff_ids":["sha256:zz"]}}"#.to_owned(), "invalid digest \"sha256:zz\""),
            (r#"{"architecture":"amd64","rootfs":{"type":"layers","diff_ids":[]}}"#.to_owned(), "missing field `os`"),
            ("[]".to_owned(), "malformed image config: invalid type: sequence"),
            ("".to_owned(), "malformed image config: EOF"),
            (format!("{{\"x\":{}", "[".repeat(10_000)), "recursion limit exceeded"),
        ];
        for (json, want) in cases {
            let err = parse_config(json.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{json:.80}: {err}");
        }
        let ok = r#"{"os":"linux","architecture":"arm","variant":"v7","rootfs":{"type":"layers","diff_ids":null}}"#;
        let config = parse_config(ok.as_bytes()).unwrap();
        assert_eq!(config.platform(), p("linux/arm/v7"));
        assert!(config.rootfs.diff_ids.is_empty());
    }

    #[test]
    fn refused_documents() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let deep_top = "[".repeat(10_000);
        let deep_inner = format!(r#"{{"schemaVersion":2,"layers":{}"#, "[".repeat(10_000));
        let deep_annotations = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{d}","size":1,"annotations":{{"a":{}}}}},"layers":[]}}"#,
            "{\"a\":".repeat(10_000)
        );
        let cases: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
            // Schema 1 is told by its schemaVersion, media type or keys, then must be whole
            // (more cases in `oci::schema1`).
            (br#"{"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#.to_vec(), None, "malformed schema 1 manifest: missing field `fsLayers`"),
            (br#"{"name":"x","tag":"y","fsLayers":[]}"#.to_vec(), None, "malformed schema 1 manifest: missing field `history`"),
            (br#"{"config":{},"layers":[]}"#.to_vec(), Some(media::DOCKER_SCHEMA1_MANIFEST), "malformed schema 1 manifest: missing field `fsLayers`"),
            (br#"{"schemaVersion":1,"fsLayers":[],"history":[]}"#.to_vec(), None, "schema 1 manifest: fsLayers is empty: the image is malformed"),
            (br#"{"schemaVersion":3,"manifests":[]}"#.to_vec(), None, "unsupported manifest schemaVersion 3: expected 2"),
            (br#"{"schemaVersion":"2","manifests":[]}"#.to_vec(), None, "schemaVersion \"2\""),
            (br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.artifact.manifest.v1+json","blobs":[]}"#.to_vec(), None, "unsupported manifest media type \"application/vnd.oci.artifact.manifest.v1+json\""),
            (br#"{"schemaVersion":2,"mediaType":7}"#.to_vec(), None, "mediaType must be a string"),
            (br#"{"schemaVersion":2}"#.to_vec(), Some("application/json"), "cannot tell what kind of manifest this is: it has no mediaType, Content-Type \"application/json\""),
            (br#"{"schemaVersion":2,"config":{}}"#.to_vec(), None, "no Content-Type"),
            (b"<html>502 Bad Gateway</html>".to_vec(), None, "malformed manifest: expected value at line 1 column 1"),
            (b"".to_vec(), None, "malformed manifest: EOF while parsing"),
            (b"[1,2]".to_vec(), None, "malformed manifest: invalid type: sequence, expected a map"),
            (b"{\"schemaVersion\":2,\"manifests\":[]} trailing".to_vec(), None, "malformed manifest: trailing characters"),
            (deep_top.into_bytes(), None, "malformed manifest: invalid type: sequence"),
            (deep_inner.into_bytes(), None, "recursion limit exceeded"),
            (deep_annotations.into_bytes(), None, "recursion limit exceeded"),
            (br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","manifests":[]}"#.to_vec(), None, "malformed image manifest: missing field `config`"),
            (format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"m","digest":"{d}","size":-1}}]}}"#).into_bytes(), None, "malformed image index: invalid value: integer `-1`, expected u64"),
            (format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"m","digest":"{d}","size":18446744073709551615}}]}}"#).into_bytes(), None, "beyond the spec's int64 range"),
            (br#"{"schemaVersion":2,"config":{"mediaType":"m","digest":"md5:abc","size":1},"layers":[]}"#.to_vec(), None, "malformed image manifest: invalid digest \"md5:abc\": unsupported algorithm"),
            (br#"{"schemaVersion":2,"config":{"mediaType":"m","digest":"sha384:abc","size":1},"layers":[]}"#.to_vec(), None, "unsupported algorithm \"sha384\""),
            (format!(r#"{{"schemaVersion":2,"config":{{"mediaType":"m","digest":"{d}","size":1}},"layers":[{{"mediaType":"m","digest":"{d}"}}]}}"#).into_bytes(), None, "missing field `size` at line 1"),
        ];
        for (bytes, content_type, want) in cases {
            let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
            let err = match parse_manifest(&bytes, content_type) {
                Ok(m) => panic!("{shown}: parsed as {m:?}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(want), "{shown}: {err}");
        }
    }

    #[test]
    fn kind_comes_from_media_type_then_content_type_then_shape() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let image_body = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{}","digest":"{d}","size":2}},"layers":[]}}"#,
            media::OCI_CONFIG
        );
        let index_body = r#"{"schemaVersion":2,"manifests":[]}"#.to_owned();
        let with_type =
            |body: &str, mt: &str| body.replacen('{', &format!(r#"{{"mediaType":"{mt}","#), 1);
        let cases: Vec<(String, Option<&str>, Result<&str, &str>)> = vec![
            (image_body.clone(), None, Ok("image")),
            (
                image_body.clone(),
                Some("text/plain; charset=utf-8"),
                Ok("image"),
            ),
            (
                image_body.clone(),
                Some(media::DOCKER_MANIFEST),
                Ok("image"),
            ),
            (
                image_body.clone(),
                Some(media::OCI_INDEX),
                Err("missing field `manifests`"),
            ),
            (
                with_type(&image_body, media::OCI_MANIFEST),
                Some(media::OCI_INDEX),
                Ok("image"),
            ),
            (
                with_type(&image_body, media::OCI_INDEX),
                Some(media::OCI_MANIFEST),
                Err("missing field `manifests`"),
            ),
            (index_body.clone(), None, Ok("index")),
            (
                index_body.clone(),
                Some("application/octet-stream"),
                Ok("index"),
            ),
            (
                with_type(&index_body, media::DOCKER_MANIFEST_LIST),
                None,
                Ok("index"),
            ),
            (with_type(&index_body, ""), None, Ok("index")),
        ];
        for (body, content_type, want) in cases {
            let got = parse_manifest(body.as_bytes(), content_type);
            match (got, want) {
                (Ok(Manifest::Image(_)), Ok("image")) | (Ok(Manifest::Index(_)), Ok("index")) => {}
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{body}: {e}"),
                (got, want) => panic!("{body} with {content_type:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn artifacts_and_unknown_layers_are_not_images() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let manifest = |config_type: &str, layer_type: &str| {
            format!(
                r#"{{"schemaVersion":2,"config":{{"mediaType":"{config_type}","digest":"{d}","size":2}},"layers":[{{"mediaType":"{layer_type}","digest":"{d}","size":0}}]}}"#
            )
        };
        let cases = [
            (manifest(media::OCI_CONFIG, media::OCI_LAYER_TAR_ZSTD), None),
            (manifest("", media::OCI_LAYER_TAR), None),
            (
                manifest(
                    "application/vnd.cncf.helm.config.v1+json",
                    media::OCI_LAYER_TAR_GZIP,
                ),
                Some("not a container image"),
            ),
            (
                manifest(
                    media::OCI_CONFIG,
                    "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                ),
                Some(
                    "unsupported layer media type \"application/vnd.cncf.helm.chart.content.v1.tar+gzip\"",
                ),
            ),
        ];
        for (json, want) in cases {
            let m = image(json.as_bytes(), None);
            match (m.check_image(), want) {
                (Ok(()), None) => {}
                (Err(e), Some(want)) => assert!(e.to_string().contains(want), "{json}: {e}"),
                (got, want) => panic!("{json}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn annotations_survive_a_round_trip() {
        let bytes = data("index-multiarch.json");
        let index = index(&bytes);
        assert_eq!(
            index
                .annotations
                .get("org.opencontainers.image.created")
                .map(String::as_str),
            Some("2024-01-01T00:00:00Z")
        );
        let json = serde_json::to_vec(&index).unwrap();
        let again = self::index(&json);
        assert_eq!(again, index);
    }
}
