//! Docker image manifest v2, schema 1 (distribution `docs/spec/manifest-v2-1.md`; deprecated
//! since 2015, still served by old registries and old tags): parse it, find the bytes its
//! digest covers, and turn it into an ordinary image manifest + config once the layers'
//! diff_ids are known. Pure: no network, no store, no layer contents.
//!
//! # The document
//!
//! ```text
//! {"schemaVersion": 1, "name": "library/busybox", "tag": "latest", "architecture": "amd64",
//!  "fsLayers": [{"blobSum": "sha256:…"}, …],                  newest first
//!  "history":  [{"v1Compatibility": "{\"id\":…,\"parent\":…}"}, …],   one per fsLayers entry
//!  "signatures": [{"header": {"jwk": …, "alg": "ES256"}, "signature": "…", "protected": "…"}]}
//! ```
//!
//! Each `v1Compatibility` is a JSON *string* holding a Docker v1 image: `id`, `parent` (the id
//! of the next, older entry), `created`, `author`, `comment`, `container_config.Cmd` (the
//! build step), `throwaway` (the step changed no file). The newest entry also carries the
//! image's configuration (`architecture`, `os`, `config`, …). There is no config blob and no
//! diff_id: those exist only once every layer has been decompressed and hashed, which is
//! why a schema 1 image cannot be mounted lazily.
//!
//! # Signatures and the manifest digest
//!
//! A signed manifest (`application/vnd.docker.distribution.manifest.v1+prettyjws`) is
//! libtrust's "pretty JWS": the manifest JSON with a `signatures` array spliced in before its
//! closing brace. Each signature's `protected` header (base64url JSON) holds `formatLength`
//! and `formatTail`; the signed payload is the first `formatLength` bytes of the document
//! followed by base64url-decode(`formatTail`) — the document without its signatures. The
//! registry's digest (`Docker-Content-Digest`, and the digest to pull by) is the digest of
//! that payload, not of the bytes served: [`canonical_bytes`] computes it.
//!
//! The signatures themselves are **not verified**, as neither containerd nor containers/image
//! verify them by default: the keys were per-daemon throwaway keys that chain to nothing (a
//! registry converting on the fly signs with its own). Integrity comes from the manifest
//! digest, checked against the one asked for or the registry's `Docker-Content-Digest`, and
//! from each layer blob's `blobSum`.
//!
//! # Validation (containers/image `fixManifestLayers`, Docker's pull)
//!
//! `fsLayers` and `history` have the same length, at least one entry; every v1 id is 64
//! lowercase hex digits; the base (last) entry has no parent; an id appears twice only in
//! consecutive entries, and such repeats are collapsed (the newer entry dropped, as Docker
//! does); every other entry's `parent` is the id of the entry after it.
//!
//! # Conversion (containers/image `ToSchema2Config`, containerd's schema 1 converter)
//!
//! A layer is *empty* when its `v1Compatibility` says `throwaway: true` or its blob is the
//! well-known gzipped empty tar ([`EMPTY_LAYER_BLOB`], which Docker used for throwaway steps
//! before the flag existed): it is never fetched, has no diff_id, and its history entry says
//! `empty_layer`. The image config is the newest `v1Compatibility` object without its v1
//! bookkeeping (`id`, `parent`, `parent_id`, `layer_id`, `throwaway`, `Size`), plus
//! `rootfs` (`layers`, the diff_ids of the non-empty layers, base first) and `history` (one
//! entry per `history` element, base first: `created`, `created_by` = `container_config.Cmd`
//! joined by spaces, `author`, `comment`, `empty_layer`). Very old entries without `os` get
//! `linux`, without `architecture` the manifest's. The config is serialised compactly with
//! every object's keys sorted, so the same manifest and diff_ids always give the same bytes
//! and so the same image ID. (Docker, containerd and containers/image each serialise it their
//! own way, so their image IDs for a schema 1 image differ from each other's and from ours.)

use std::borrow::Cow;
use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::oci::Digest;
use crate::oci::manifest::{Descriptor, ImageManifest, ManifestError};
use crate::oci::media::{self, Compression};

/// The gzipped empty tar (1024 zero bytes) Docker pushes for steps that changed no file.
pub const EMPTY_LAYER_BLOB: &str =
    "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";

/// `v1Compatibility` keys that are v1 bookkeeping, not image configuration.
const V1_ONLY_KEYS: [&str; 6] = ["id", "parent", "parent_id", "layer_id", "throwaway", "Size"];

/// A parsed, validated schema 1 manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Schema1Manifest {
    pub name: String,
    pub tag: String,
    pub architecture: String,
    /// Newest first, as in the document, repeats of an id collapsed; never empty.
    pub layers: Vec<Schema1Layer>,
    /// Whether the document carries signatures (they are not verified: see the module docs).
    pub signed: bool,
}

/// One `fsLayers` entry with its `history` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Schema1Layer {
    pub blob_sum: Digest,
    pub v1: V1Compatibility,
}

/// The fields of a `v1Compatibility` string that matter here, and the whole object.
#[derive(Clone, Debug, PartialEq)]
pub struct V1Compatibility {
    pub id: String,
    pub parent: Option<String>,
    pub created: Option<String>,
    pub author: Option<String>,
    pub comment: Option<String>,
    /// `container_config.Cmd`, joined by spaces.
    pub created_by: String,
    pub throwaway: bool,
    pub raw: Map<String, Value>,
}

impl Schema1Layer {
    /// Whether this step changed no file: no blob to fetch, no diff_id.
    pub fn is_empty(&self) -> bool {
        self.v1.throwaway || self.blob_sum.to_string() == EMPTY_LAYER_BLOB
    }
}

/// A malformed schema 1 document; shown after "schema 1 manifest: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Schema1Error {
    #[error("history has {history} entries, fsLayers {fs_layers}")]
    LengthMismatch { history: usize, fs_layers: usize },
    #[error("fsLayers is empty")]
    NoLayers,
    /// `reason` is serde_json's message.
    #[error("history[{index}].v1Compatibility is not valid: {reason}")]
    V1Json { index: usize, reason: String },
    #[error("history[{index}] has an invalid v1 id {id:?}: expected 64 lowercase hex digits")]
    BadId { index: usize, id: String },
    #[error("the base layer {id} has a parent ({parent})")]
    BaseHasParent { id: String, parent: String },
    #[error("v1 id {id} appears more than once, not in consecutive entries")]
    DuplicateId { id: String },
    #[error(
        "history[{index}] has parent {actual:?}, expected {expected} (the id of the entry after it)"
    )]
    BrokenChain {
        index: usize,
        expected: String,
        actual: String,
    },
    #[error("bad signature block: {reason}")]
    Signature { reason: String },
    #[error("{layers} non-empty layers but {diff_ids} diff_ids")]
    DiffIdCount { layers: usize, diff_ids: usize },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    name: String,
    #[serde(default)]
    tag: String,
    #[serde(default)]
    architecture: String,
    fs_layers: Vec<FsLayer>,
    history: Vec<History>,
    #[serde(default)]
    signatures: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct FsLayer {
    #[serde(rename = "blobSum")]
    blob_sum: Digest,
}

#[derive(Deserialize)]
struct History {
    #[serde(rename = "v1Compatibility")]
    v1_compatibility: String,
}

#[derive(Deserialize)]
struct V1Fields {
    id: String,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    author: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    throwaway: Option<bool>,
    #[serde(default)]
    container_config: Option<ContainerConfig>,
}

#[derive(Deserialize)]
struct ContainerConfig {
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
}

/// Parse and validate a schema 1 manifest, signed or not (the signatures are ignored).
pub fn parse(bytes: &[u8]) -> Result<Schema1Manifest, ManifestError> {
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| ManifestError::Json {
        document: "schema 1 manifest",
        reason: e.to_string(),
    })?;
    let invalid = ManifestError::Schema1;
    if doc.history.len() != doc.fs_layers.len() {
        return Err(invalid(Schema1Error::LengthMismatch {
            history: doc.history.len(),
            fs_layers: doc.fs_layers.len(),
        }));
    }
    if doc.fs_layers.is_empty() {
        return Err(invalid(Schema1Error::NoLayers));
    }
    let mut layers = Vec::with_capacity(doc.fs_layers.len());
    for (index, (fs, h)) in doc.fs_layers.into_iter().zip(doc.history).enumerate() {
        let v1 = parse_v1(index, &h.v1_compatibility).map_err(invalid)?;
        layers.push(Schema1Layer {
            blob_sum: fs.blob_sum,
            v1,
        });
    }
    let layers = check_chain(layers).map_err(invalid)?;
    Ok(Schema1Manifest {
        name: doc.name,
        tag: doc.tag,
        architecture: doc.architecture,
        layers,
        signed: doc.signatures.is_some_and(|s| !s.is_empty()),
    })
}

fn parse_v1(index: usize, text: &str) -> Result<V1Compatibility, Schema1Error> {
    let json_error = |e: serde_json::Error| Schema1Error::V1Json {
        index,
        reason: e.to_string(),
    };
    let raw: Map<String, Value> = serde_json::from_str(text).map_err(json_error)?;
    let f: V1Fields = serde_json::from_str(text).map_err(json_error)?;
    let is_hex = f.id.len() == 64 && f.id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !is_hex {
        return Err(Schema1Error::BadId { index, id: f.id });
    }
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    Ok(V1Compatibility {
        id: f.id,
        parent: non_empty(f.parent),
        created: non_empty(f.created),
        author: non_empty(f.author),
        comment: non_empty(f.comment),
        created_by: f
            .container_config
            .and_then(|c| c.cmd)
            .unwrap_or_default()
            .join(" "),
        throwaway: f.throwaway.unwrap_or(false),
        raw,
    })
}

/// The v1 parent chain must run from the newest entry down to a base without parent.
/// Consecutive repeats of an id (old Docker pushes) are collapsed, dropping the newer one.
fn check_chain(mut layers: Vec<Schema1Layer>) -> Result<Vec<Schema1Layer>, Schema1Error> {
    let base = layers.last().expect("checked non-empty");
    if let Some(parent) = &base.v1.parent {
        return Err(Schema1Error::BaseHasParent {
            id: base.v1.id.clone(),
            parent: parent.clone(),
        });
    }
    let mut seen = HashSet::new();
    let mut last: Option<&str> = None;
    for l in &layers {
        let id = l.v1.id.as_str();
        if last != Some(id) && !seen.insert(id) {
            return Err(Schema1Error::DuplicateId { id: id.to_owned() });
        }
        last = Some(id);
    }
    for i in (0..layers.len() - 1).rev() {
        if layers[i].v1.id == layers[i + 1].v1.id {
            layers.remove(i);
        } else if layers[i].v1.parent.as_deref() != Some(layers[i + 1].v1.id.as_str()) {
            return Err(Schema1Error::BrokenChain {
                index: i,
                expected: layers[i + 1].v1.id.clone(),
                actual: layers[i].v1.parent.clone().unwrap_or_default(),
            });
        }
    }
    Ok(layers)
}

/// The bytes a manifest's digest covers. For a signed schema 1 manifest: the payload its
/// signatures cover (see the module docs); for any other document, the bytes themselves.
/// A document that is not JSON is returned as is (its parse reports it).
pub fn canonical_bytes(bytes: &[u8]) -> Result<Cow<'_, [u8]>, Schema1Error> {
    // Cheap test first: every manifest fetch passes here.
    if !bytes.windows(12).any(|w| w == b"\"signatures\"") {
        return Ok(Cow::Borrowed(bytes));
    }
    #[derive(Deserialize)]
    struct Signed {
        #[serde(rename = "schemaVersion")]
        schema_version: Option<Value>,
        signatures: Option<Vec<Signature>>,
    }
    #[derive(Deserialize)]
    struct Signature {
        protected: String,
    }
    #[derive(Deserialize)]
    struct Protected {
        #[serde(rename = "formatLength")]
        format_length: usize,
        #[serde(rename = "formatTail")]
        format_tail: String,
    }
    let Ok(doc) = serde_json::from_slice::<Signed>(bytes) else {
        return Ok(Cow::Borrowed(bytes));
    };
    if doc.schema_version.as_ref().and_then(Value::as_u64) != Some(1) {
        return Ok(Cow::Borrowed(bytes));
    }
    let Some(signatures) = doc.signatures else {
        return Ok(Cow::Borrowed(bytes));
    };
    let bad = |reason: String| Schema1Error::Signature { reason };
    let mut payload: Option<(usize, Vec<u8>)> = None;
    for (i, s) in signatures.iter().enumerate() {
        let header = BASE64URL
            .decode(&s.protected)
            .map_err(|e| bad(format!("signatures[{i}].protected is not base64url: {e}")))?;
        let p: Protected = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("signatures[{i}].protected: {e}")))?;
        let tail = BASE64URL
            .decode(&p.format_tail)
            .map_err(|e| bad(format!("signatures[{i}] formatTail is not base64url: {e}")))?;
        if p.format_length > bytes.len() {
            return Err(bad(format!(
                "signatures[{i}] formatLength {} is beyond the document's {} bytes",
                p.format_length,
                bytes.len()
            )));
        }
        match &payload {
            None => payload = Some((p.format_length, tail)),
            Some(first) if *first == (p.format_length, tail) => {}
            Some(_) => {
                return Err(bad(format!(
                    "signatures[{i}] covers other bytes than signatures[0]"
                )));
            }
        }
    }
    let Some((length, tail)) = payload else {
        return Err(bad(
            "signatures is empty: nothing says which bytes were signed".to_owned(),
        ));
    };
    let mut out = bytes[..length].to_vec();
    out.extend_from_slice(&tail);
    Ok(Cow::Owned(out))
}

/// JOSE's base64url: unpadded as libtrust writes it, padding tolerated.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A layer blob once fetched: what only its content could tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedLayer {
    pub blob: Digest,
    pub size: u64,
    pub compression: Compression,
    pub diff_id: Digest,
}

impl Schema1Manifest {
    /// The media type of this document.
    pub fn media_type(&self) -> &'static str {
        if self.signed {
            media::DOCKER_SCHEMA1_SIGNED_MANIFEST
        } else {
            media::DOCKER_SCHEMA1_MANIFEST
        }
    }

    /// The blobs to fetch, base first: one per non-empty layer (a blob may repeat).
    pub fn layer_blobs(&self) -> Vec<&Digest> {
        self.base_first()
            .filter(|l| !l.is_empty())
            .map(|l| &l.blob_sum)
            .collect()
    }

    fn base_first(&self) -> impl Iterator<Item = &Schema1Layer> {
        self.layers.iter().rev()
    }

    /// The image config, given the diff_id of each [`Schema1Manifest::layer_blobs`] entry.
    pub fn image_config(&self, diff_ids: &[Digest]) -> Result<Vec<u8>, Schema1Error> {
        let layers = self.layer_blobs().len();
        if layers != diff_ids.len() {
            return Err(Schema1Error::DiffIdCount {
                layers,
                diff_ids: diff_ids.len(),
            });
        }
        let mut config = self.layers[0].v1.raw.clone();
        for key in V1_ONLY_KEYS {
            config.remove(key);
        }
        let missing = |v: Option<&Value>| v.and_then(Value::as_str).is_none_or(str::is_empty);
        if missing(config.get("architecture")) && !self.architecture.is_empty() {
            config.insert("architecture".into(), self.architecture.clone().into());
        }
        if missing(config.get("os")) {
            config.insert("os".into(), "linux".into());
        }
        let history: Vec<Value> = self
            .base_first()
            .map(|l| {
                let mut h = Map::new();
                let mut put = |key: &str, value: &Option<String>| {
                    if let Some(v) = value {
                        h.insert(key.into(), v.clone().into());
                    }
                };
                put("created", &l.v1.created);
                put("author", &l.v1.author);
                put("comment", &l.v1.comment);
                if !l.v1.created_by.is_empty() {
                    h.insert("created_by".into(), l.v1.created_by.clone().into());
                }
                if l.is_empty() {
                    h.insert("empty_layer".into(), true.into());
                }
                Value::Object(h)
            })
            .collect();
        let diff_ids: Vec<Value> = diff_ids.iter().map(|d| d.to_string().into()).collect();
        let mut rootfs = Map::new();
        rootfs.insert("type".into(), "layers".into());
        rootfs.insert("diff_ids".into(), diff_ids.into());
        config.insert("rootfs".into(), rootfs.into());
        config.insert("history".into(), history.into());
        let bytes =
            serde_json::to_vec(&sorted(Value::Object(config))).expect("a JSON value serialises");
        Ok(bytes)
    }

    /// The image manifest equivalent to this one: `config` is the bytes
    /// [`Schema1Manifest::image_config`] returned, `layers` the fetched blobs, base first.
    pub fn image_manifest(&self, config: &[u8], layers: &[FetchedLayer]) -> ImageManifest {
        let descriptor = |media_type: &str, digest: Digest, size: u64| Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size,
            urls: Vec::new(),
            annotations: Default::default(),
            platform: None,
            artifact_type: None,
        };
        ImageManifest {
            schema_version: 2,
            media_type: Some(media::DOCKER_MANIFEST.to_owned()),
            artifact_type: None,
            config: descriptor(
                media::DOCKER_CONFIG,
                Digest::sha256(config),
                config.len() as u64,
            ),
            layers: layers
                .iter()
                .map(|l| {
                    let media_type = match l.compression {
                        Compression::Gzip => media::DOCKER_LAYER_GZIP,
                        Compression::None => media::DOCKER_LAYER_TAR,
                        Compression::Zstd => media::DOCKER_LAYER_ZSTD,
                    };
                    descriptor(media_type, l.blob.clone(), l.size)
                })
                .collect(),
            subject: None,
            annotations: Default::default(),
        }
    }
}

/// `v` with every object's keys in sorted order, whatever order the map type keeps.
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::manifest::{Manifest, parse_config, parse_manifest};

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/oci");
    /// What distribution 2.8 answered as `Docker-Content-Digest` for the signed fixture.
    const REGISTRY_DIGEST: &str =
        "sha256:5ca3dd566f4061690372da76f442319d28c3606e3c06a78534a3de7547e1f1e5";
    const LAYER_1: &str = "sha256:f00d6d9b6fcc022985defa8c121c3196d481aa1d00a2350aac1b49e70121ea4a";
    const LAYER_2: &str = "sha256:8de7e9c5b10a3e2713ac02158cb29dce8236f89ed94edf79c2bb7551240cccb6";

    /// Captured from `skopeo copy --format v2s1` of busybox-gzip.oci.tar into distribution
    /// 2.8 (`compatibility.schema1.enabled`): signed with skopeo's throwaway key; the
    /// unsigned one is its payload.
    fn data(name: &str) -> Vec<u8> {
        let path = format!("{DATA}/{name}");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn schema1(bytes: &[u8], content_type: Option<&str>) -> Schema1Manifest {
        match parse_manifest(bytes, content_type) {
            Ok(Manifest::Schema1(m)) => m,
            other => panic!("{}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn d(s: &str) -> Digest {
        s.parse().unwrap()
    }

    fn id(c: char) -> String {
        c.to_string().repeat(64)
    }

    /// An unsigned schema 1 document of `(blobSum, v1Compatibility)`, newest first.
    fn doc(entries: &[(&str, String)]) -> Vec<u8> {
        let fs: Vec<Value> = entries
            .iter()
            .map(|(b, _)| serde_json::json!({ "blobSum": b }))
            .collect();
        let history: Vec<Value> = entries
            .iter()
            .map(|(_, v1)| serde_json::json!({ "v1Compatibility": v1 }))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 1, "name": "x", "tag": "t", "architecture": "arm64",
            "fsLayers": fs, "history": history,
        }))
        .unwrap()
    }

    fn v1(id: &str, parent: Option<&str>, extra: &str) -> String {
        match parent {
            Some(p) => format!(r#"{{"id":"{id}","parent":"{p}"{extra}}}"#),
            None => format!(r#"{{"id":"{id}"{extra}}}"#),
        }
    }

    #[test]
    fn signed_and_unsigned_parse_alike() {
        let cases = [
            ("docker-schema1-signed.json", None, true),
            (
                "docker-schema1-signed.json",
                Some(media::DOCKER_SCHEMA1_SIGNED_MANIFEST),
                true,
            ),
            ("docker-schema1-unsigned.json", None, false),
            (
                "docker-schema1-unsigned.json",
                Some("application/json"),
                false,
            ),
            // A body without schemaVersion is still told by its fsLayers.
            ("docker-schema1.json", None, true),
        ];
        for (name, content_type, signed) in cases {
            let m = schema1(&data(name), content_type);
            assert_eq!(m.signed, signed, "{name}");
            let want_type = match signed {
                true => media::DOCKER_SCHEMA1_SIGNED_MANIFEST,
                false => media::DOCKER_SCHEMA1_MANIFEST,
            };
            assert_eq!(m.media_type(), want_type, "{name}");
        }
        let signed = schema1(&data("docker-schema1-signed.json"), None);
        let unsigned = schema1(&data("docker-schema1-unsigned.json"), None);
        assert_eq!(signed.layers, unsigned.layers);
        assert_eq!((signed.name.as_str(), signed.tag.as_str()), ("bb", "s1"));
        assert_eq!(signed.architecture, "amd64");
        assert_eq!(signed.layers.len(), 3);
        let top = &signed.layers[0];
        assert!(top.v1.throwaway && top.is_empty());
        assert_eq!(top.blob_sum.to_string(), EMPTY_LAYER_BLOB);
        assert_eq!(
            signed.layers[2].v1.created_by,
            "layer 1: /bin/busybox (busybox-static 1.35.0) + applet symlinks, /etc, /data, /tmp"
        );
        assert_eq!(signed.layers[2].v1.parent, None);
        assert_eq!(signed.layer_blobs(), [&d(LAYER_1), &d(LAYER_2)]);
    }

    #[test]
    fn the_digest_of_a_signed_manifest_covers_its_payload() {
        let signed = data("docker-schema1-signed.json");
        let unsigned = data("docker-schema1-unsigned.json");
        let payload = canonical_bytes(&signed).unwrap();
        assert!(matches!(payload, Cow::Owned(_)));
        assert_eq!(*payload, *unsigned);
        assert_eq!(Digest::sha256(&payload), d(REGISTRY_DIGEST));
        assert_ne!(Digest::sha256(&signed), d(REGISTRY_DIGEST));

        // Everything else is its own canonical form.
        let v2 = br#"{"schemaVersion":2,"signatures":[{"protected":"e30"}],"layers":[]}"#;
        for bytes in [&unsigned[..], &v2[..], b"not json \"signatures\"", b"{}"] {
            let got = canonical_bytes(bytes).unwrap();
            assert!(matches!(got, Cow::Borrowed(b) if b == bytes));
        }
    }

    #[test]
    fn bad_signature_blocks_are_refused() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let good = b64(r#"{"formatLength":10,"formatTail":"fQ"}"#);
        let other = b64(r#"{"formatLength":11,"formatTail":"fQ"}"#);
        let signed = |protected: &[&str]| {
            let sigs: Vec<String> = protected
                .iter()
                .map(|p| format!(r#"{{"protected":"{p}"}}"#))
                .collect();
            format!(
                r#"{{"schemaVersion":1,"fsLayers":[],"signatures":[{}]}}"#,
                sigs.join(",")
            )
        };
        let too_long = b64(r#"{"formatLength":100000,"formatTail":"fQ"}"#);
        let cases = [
            (signed(&[]), "signatures is empty"),
            (signed(&["%%%"]), "signatures[0].protected is not base64url"),
            (signed(&[&b64("{}")]), "missing field `formatLength`"),
            (
                signed(&[&too_long]),
                "formatLength 100000 is beyond the document's",
            ),
            (signed(&[&good, &other]), "signatures[1] covers other bytes"),
        ];
        for (json, want) in cases {
            let err = canonical_bytes(json.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
        let ok = signed(&[&good, &good]);
        let payload = canonical_bytes(ok.as_bytes()).unwrap();
        assert_eq!(*payload, *format!("{}}}", &ok[..10]).as_bytes());
        // Padded base64url is accepted too.
        let padded = signed(&[&format!("{good}{}", "=".repeat((4 - good.len() % 4) % 4))]);
        assert!(canonical_bytes(padded.as_bytes()).is_ok(), "{padded}");
    }

    #[test]
    fn empty_layers_are_skipped() {
        let blob = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
        // (throwaway field, blobSum, empty?)
        let cases = [
            (r#","throwaway":true"#, blob, true),
            (r#","throwaway":false"#, blob, false),
            ("", blob, false),
            ("", EMPTY_LAYER_BLOB, true),
            (r#","throwaway":false"#, EMPTY_LAYER_BLOB, true),
            // `Size: 0` is not enough (containerd's guess): a layer of deletions has no size.
            (r#","Size":0"#, blob, false),
        ];
        for (extra, blob_sum, empty) in cases {
            let bytes = doc(&[
                (blob_sum, v1(&id('b'), Some(&id('a')), extra)),
                (LAYER_1, v1(&id('a'), None, "")),
            ]);
            let m = schema1(&bytes, None);
            assert_eq!(m.layers[0].is_empty(), empty, "{extra} {blob_sum}");
            let want: Vec<&str> = if empty {
                vec![LAYER_1]
            } else {
                vec![LAYER_1, blob_sum]
            };
            let got: Vec<String> = m.layer_blobs().iter().map(|d| d.to_string()).collect();
            assert_eq!(got, want, "{extra} {blob_sum}");
        }
    }

    #[test]
    fn config_is_synthesised_from_the_newest_entry() {
        let diff_1 = "sha256:d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1";
        let diff_2 = "sha256:d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2";
        let m = schema1(&data("docker-schema1-signed.json"), None);
        let config = m.image_config(&[d(diff_1), d(diff_2)]).unwrap();
        let want = concat!(
            r#"{"architecture":"amd64","author":"imagefs fixtures","#,
            r#""config":{"Cmd":["/bin/sh"],"#,
            r#""Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"#,
            r#""Labels":{"org.opencontainers.image.title":"imagefs-fixture-busybox"}},"#,
            r#""created":"2026-11-28T06:34:08.162614637Z","#,
            r#""history":["#,
            r#"{"created":"2026-11-28T06:34:08.332692369Z","#,
            r#""created_by":"layer 1: /bin/busybox (busybox-static 1.35.0) + applet symlinks, /etc, /data, /tmp"},"#,
            r#"{"created":"2026-11-28T06:34:08.408032757Z","#,
            r#""created_by":"layer 2: delete /data/deleted.txt (whiteout), add /data/added.txt"},"#,
            r#"{"author":"imagefs fixtures","created":"2026-11-28T06:34:08.162614637Z","empty_layer":true}],"#,
            r#""os":"linux","#,
            r#""rootfs":{"diff_ids":["sha256:d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d1","#,
            r#""sha256:d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2"],"type":"layers"}}"#,
        );
        assert_eq!(String::from_utf8(config.clone()).unwrap(), want);
        // Deterministic: the unsigned form and a second run give the same bytes.
        let again = schema1(&data("docker-schema1-unsigned.json"), None)
            .image_config(&[d(diff_1), d(diff_2)])
            .unwrap();
        assert_eq!(again, config);
        // And it is a config the rest of imagefs reads.
        let parsed = parse_config(&config).unwrap();
        assert_eq!(parsed.rootfs.diff_ids, [d(diff_1), d(diff_2)]);
        assert_eq!(parsed.platform().to_string(), "linux/amd64");

        let err = m.image_config(&[d(diff_1)]).unwrap_err();
        assert_eq!(err.to_string(), "2 non-empty layers but 1 diff_ids");

        let fetched = [
            FetchedLayer {
                blob: d(LAYER_1),
                size: 10,
                compression: Compression::Gzip,
                diff_id: d(diff_1),
            },
            FetchedLayer {
                blob: d(LAYER_2),
                size: 20,
                compression: Compression::None,
                diff_id: d(diff_2),
            },
        ];
        let image = m.image_manifest(&config, &fetched);
        assert_eq!(image.config.digest, Digest::sha256(&config));
        assert_eq!(image.config.size, config.len() as u64);
        assert_eq!(image.config.media_type, media::DOCKER_CONFIG);
        let layers: Vec<(String, &str, u64)> = image
            .layers
            .iter()
            .map(|l| (l.digest.to_string(), l.media_type.as_str(), l.size))
            .collect();
        assert_eq!(
            layers,
            [
                (LAYER_1.to_owned(), media::DOCKER_LAYER_GZIP, 10),
                (LAYER_2.to_owned(), media::DOCKER_LAYER_TAR, 20)
            ]
        );
        assert!(image.check_image().is_ok());
    }

    #[test]
    fn old_entries_get_os_and_architecture() {
        // (newest v1Compatibility extra fields, os, architecture)
        let cases = [
            ("", "linux", "arm64"),
            (r#","os":"","architecture":"""#, "linux", "arm64"),
            (
                r#","os":"windows","architecture":"amd64""#,
                "windows",
                "amd64",
            ),
        ];
        for (extra, os, arch) in cases {
            let m = schema1(&doc(&[(LAYER_1, v1(&id('a'), None, extra))]), None);
            let diff = d(LAYER_2);
            let config = parse_config(&m.image_config(&[diff]).unwrap()).unwrap();
            assert_eq!(
                (config.os.as_str(), config.architecture.as_str()),
                (os, arch)
            );
        }
    }

    #[test]
    fn consecutive_repeats_of_an_id_are_collapsed() {
        let bytes = doc(&[
            (
                LAYER_2,
                v1(&id('b'), Some(&id('a')), r#","comment":"newer""#),
            ),
            (
                LAYER_2,
                v1(&id('b'), Some(&id('a')), r#","comment":"older""#),
            ),
            (LAYER_1, v1(&id('a'), None, "")),
        ]);
        let m = schema1(&bytes, None);
        let comments: Vec<Option<&str>> =
            m.layers.iter().map(|l| l.v1.comment.as_deref()).collect();
        assert_eq!(comments, [Some("older"), None]);
    }

    #[test]
    fn malformed_documents_are_refused() {
        let (a, b, c) = (id('a'), id('b'), id('c'));
        let entry = |i: &str, p: Option<&str>| (LAYER_1, v1(i, p, ""));
        let mut short = doc(&[entry(&b, Some(&a)), entry(&a, None)]);
        // Four fsLayers, three history entries.
        let text = String::from_utf8(short.clone()).unwrap().replacen(
            r#""fsLayers":["#,
            &format!(r#""fsLayers":[{{"blobSum":"{LAYER_2}"}},{{"blobSum":"{LAYER_2}"}},"#),
            1,
        );
        let text = text.replacen(
            r#""history":["#,
            &format!(
                r#""history":[{{"v1Compatibility":{:?}}},"#,
                v1(&c, Some(&b), "")
            ),
            1,
        );
        short = text.into_bytes();
        let has_parent = format!("the base layer {b} has a parent ({a})");
        let wrong_parent = format!("history[0] has parent \"{a}\", expected {b}");
        let no_parent = format!("history[0] has parent \"\", expected {b}");
        let twice = format!("v1 id {a} appears more than once, not in consecutive entries");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                short,
                "schema 1 manifest: history has 3 entries, fsLayers 4: the image is malformed, \
                 re-push it with a current client",
            ),
            (doc(&[]), "schema 1 manifest: fsLayers is empty"),
            (
                doc(&[(LAYER_1, "not json".to_owned())]),
                "history[0].v1Compatibility is not valid: expected ident",
            ),
            (
                doc(&[(LAYER_1, r#"{"parent":""}"#.to_owned())]),
                "history[0].v1Compatibility is not valid: missing field `id`",
            ),
            (
                doc(&[entry("ABC", None)]),
                "history[0] has an invalid v1 id \"ABC\"",
            ),
            (doc(&[entry(&b, Some(&a))]), &has_parent),
            (
                doc(&[entry(&c, Some(&a)), entry(&b, Some(&a)), entry(&a, None)]),
                &wrong_parent,
            ),
            (
                doc(&[entry(&c, None), entry(&b, Some(&a)), entry(&a, None)]),
                &no_parent,
            ),
            (
                doc(&[entry(&a, Some(&b)), entry(&b, Some(&a)), entry(&a, None)]),
                &twice,
            ),
            (
                br#"{"schemaVersion":1,"fsLayers":[{"blobSum":"md5:x"}],"history":[]}"#.to_vec(),
                "malformed schema 1 manifest: invalid digest \"md5:x\"",
            ),
            (
                br#"{"schemaVersion":1,"history":[]}"#.to_vec(),
                "malformed schema 1 manifest: missing field `fsLayers`",
            ),
            (
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#
                    .to_vec(),
                "missing field `fsLayers`",
            ),
        ];
        for (bytes, want) in cases {
            let shown = String::from_utf8_lossy(&bytes).into_owned();
            match parse_manifest(&bytes, None) {
                Ok(m) => panic!("{shown}: parsed as {m:?}"),
                Err(e) => assert!(e.to_string().contains(want), "{shown}: {e}"),
            }
        }
    }
}
