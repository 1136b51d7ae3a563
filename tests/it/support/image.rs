//! Container images built in code: tar layers, configs, manifests and indexes, with the exact
//! bytes of every blob and JSON document kept so tests can compare digests.
//!
//! ```ignore
//! let layer = Layer::new(&[
//!     Entry::dir("etc"),
//!     Entry::file("etc/hello", "hi\n").mode(0o600).mtime(1_700_000_000, 123_456_789),
//!     Entry::symlink("etc/link", "hello"),
//!     Entry::whiteout("etc/old"),
//! ], Compression::Gzip);
//! let image = ImageBuilder::new(Format::Oci).layer(layer).cmd(&["/bin/sh"]).build();
//! let index = IndexBuilder::new(Format::Oci).image(image).attestation().build();
//! ```
//!
//! Tar headers are written byte by byte on top of `tar::Header` (ustar by default), so any name
//! can be stored: non-UTF-8, absolute, `..`, longer than 100 bytes (PAX `path` by default, GNU
//! `././@LongLink` on request). PAX records carry what ustar cannot: `mtime` with nanoseconds,
//! `SCHILY.xattr.*`, large uid/gid, long names and link targets.
//!
//! This module knows nothing of imagefs or registries.

use std::io::Write;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// 2024-01-01T00:00:00Z, the default mtime of every entry.
pub const DEFAULT_MTIME: i64 = 1_704_067_200;

/// `sha256:HEX` of `bytes`.
/// `(digest, size)` of every layer an image manifest (JSON bytes) lists, base first.
pub fn manifest_layers(manifest: &[u8]) -> Vec<(String, u64)> {
    let m: serde_json::Value = serde_json::from_slice(manifest).expect("a manifest");
    m["layers"]
        .as_array()
        .expect("a manifest with layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_owned(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

// ---------------------------------------------------------------------------------------------
// Tar entries

/// What a tar entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    /// A hard link to an earlier entry's path.
    Hardlink(Vec<u8>),
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// How a name longer than the 100-byte ustar field is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LongNames {
    /// A PAX `path` / `linkpath` record (what Go's archive/tar and umoci write).
    #[default]
    Pax,
    /// GNU `././@LongLink` entries of type `L` / `K` (what GNU tar writes).
    Gnu,
}

/// One tar entry. Build with [`Entry::file`], [`Entry::dir`], … then adjust with the
/// chainable setters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name exactly as stored (directories get a trailing `/` when written).
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits incl. setuid/setgid/sticky (no file-type bits).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds; non-zero values go into a PAX `mtime` record.
    pub mtime_nanos: u32,
    /// `SCHILY.xattr.NAME` PAX records, in order.
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub long_names: LongNames,
    /// Extra PAX records, written verbatim after the computed ones.
    pub pax: Vec<(String, Vec<u8>)>,
}

impl Entry {
    fn new(path: impl AsRef<[u8]>, kind: Kind, mode: u32) -> Entry {
        Entry {
            path: path.as_ref().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            mtime_nanos: 0,
            xattrs: Vec::new(),
            long_names: LongNames::Pax,
            pax: Vec::new(),
        }
    }

    /// A regular file, mode 0644.
    pub fn file(path: impl AsRef<[u8]>, content: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, Kind::File(content.as_ref().to_vec()), 0o644)
    }

    /// A directory, mode 0755.
    pub fn dir(path: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, Kind::Dir, 0o755)
    }

    /// A symbolic link, mode 0777.
    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, Kind::Symlink(target.as_ref().to_vec()), 0o777)
    }

    /// A hard link to the earlier entry `target` (a path in the same layer), mode 0644.
    pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, Kind::Hardlink(target.as_ref().to_vec()), 0o644)
    }

    /// A character device, mode 0666.
    pub fn char_device(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Entry {
        Entry::new(path, Kind::Char { major, minor }, 0o666)
    }

    /// A block device, mode 0660.
    pub fn block_device(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Entry {
        Entry::new(path, Kind::Block { major, minor }, 0o660)
    }

    /// A named pipe, mode 0644.
    pub fn fifo(path: impl AsRef<[u8]>) -> Entry {
        Entry::new(path, Kind::Fifo, 0o644)
    }

    /// The whiteout deleting `path` from lower layers: an empty file `DIR/.wh.NAME`.
    pub fn whiteout(path: impl AsRef<[u8]>) -> Entry {
        let path = path.as_ref();
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..=i], &path[i + 1..]),
            None => (&path[..0], path),
        };
        let mut wh = dir.to_vec();
        wh.extend_from_slice(b".wh.");
        wh.extend_from_slice(name);
        Entry::file(wh, b"")
    }

    /// The opaque whiteout hiding everything lower layers put in `dir`: `DIR/.wh..wh..opq`.
    pub fn opaque(dir: impl AsRef<[u8]>) -> Entry {
        let mut p = dir.as_ref().to_vec();
        if !p.is_empty() && !p.ends_with(b"/") {
            p.push(b'/');
        }
        p.extend_from_slice(b".wh..wh..opq");
        Entry::file(p, b"")
    }

    pub fn mode(mut self, mode: u32) -> Entry {
        self.mode = mode;
        self
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> Entry {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn mtime(mut self, secs: i64, nanos: u32) -> Entry {
        self.mtime = secs;
        self.mtime_nanos = nanos;
        self
    }

    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Entry {
        self.xattrs.push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    /// Store names longer than 100 bytes as GNU `././@LongLink` entries instead of PAX.
    pub fn gnu_long_names(mut self) -> Entry {
        self.long_names = LongNames::Gnu;
        self
    }

    /// Adds a raw PAX record (after the computed ones; readers take the last).
    pub fn pax(mut self, key: &str, value: impl AsRef<[u8]>) -> Entry {
        self.pax.push((key.to_owned(), value.as_ref().to_vec()));
        self
    }

    fn stored_path(&self) -> Vec<u8> {
        let mut p = self.path.clone();
        if self.kind == Kind::Dir && !p.ends_with(b"/") {
            p.push(b'/');
        }
        p
    }

    fn link_target(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Symlink(t) | Kind::Hardlink(t) => Some(t),
            _ => None,
        }
    }

    /// Appends this entry's tar blocks (extension headers first) to `out`.
    fn write_to(&self, out: &mut Vec<u8>) {
        let path = self.stored_path();
        let link = self.link_target();
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if path.len() > 100 {
            match self.long_names {
                LongNames::Pax => pax.push(("path".into(), path.clone())),
                LongNames::Gnu => write_gnu_long(out, b'L', &path),
            }
        }
        if let Some(link) = link.filter(|l| l.len() > 100) {
            match self.long_names {
                LongNames::Pax => pax.push(("linkpath".into(), link.to_vec())),
                LongNames::Gnu => write_gnu_long(out, b'K', link),
            }
        }
        if self.mtime_nanos != 0 {
            pax.push((
                "mtime".into(),
                format!("{}.{:09}", self.mtime, self.mtime_nanos).into_bytes(),
            ));
        }
        // ustar's 8-byte octal fields hold 7 digits.
        if self.uid > 0o7777777 {
            pax.push(("uid".into(), self.uid.to_string().into_bytes()));
        }
        if self.gid > 0o7777777 {
            pax.push(("gid".into(), self.gid.to_string().into_bytes()));
        }
        for (name, value) in &self.xattrs {
            pax.push((format!("SCHILY.xattr.{name}"), value.clone()));
        }
        pax.extend(self.pax.iter().cloned());
        if !pax.is_empty() {
            let records = pax_records(&pax);
            let mut name = b"PaxHeaders.0/".to_vec();
            name.extend_from_slice(&path[..path.len().min(80)]);
            let mut h = blank_header(b'x', &name, records.len() as u64);
            h.set_mtime(self.mtime.max(0) as u64);
            append(out, h, &records);
        }

        let (type_byte, data): (u8, &[u8]) = match &self.kind {
            Kind::File(data) => (b'0', data),
            Kind::Dir => (b'5', b""),
            Kind::Symlink(_) => (b'2', b""),
            Kind::Hardlink(_) => (b'1', b""),
            Kind::Char { .. } => (b'3', b""),
            Kind::Block { .. } => (b'4', b""),
            Kind::Fifo => (b'6', b""),
        };
        let mut h = blank_header(type_byte, &path, data.len() as u64);
        h.set_mode(self.mode);
        h.set_uid(self.uid.min(0o7777777));
        h.set_gid(self.gid.min(0o7777777));
        h.set_mtime(self.mtime.max(0) as u64);
        if let Some(link) = link {
            let field = &mut h.as_old_mut().linkname;
            let n = link.len().min(field.len());
            field[..n].copy_from_slice(&link[..n]);
        }
        if let Kind::Char { major, minor } | Kind::Block { major, minor } = self.kind {
            h.set_device_major(major).expect("ustar device major");
            h.set_device_minor(minor).expect("ustar device minor");
        }
        append(out, h, data);
    }
}

/// A ustar header of `type_byte` whose name field holds the first 100 bytes of `name` verbatim
/// (no normalisation: `..`, `/abs`, invalid UTF-8 all pass through).
fn blank_header(type_byte: u8, name: &[u8], size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    let field = &mut h.as_old_mut().name;
    let n = name.len().min(field.len());
    field[..n].copy_from_slice(&name[..n]);
    h.set_entry_type(tar::EntryType::new(type_byte));
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    // Zeros rather than empty fields, as GNU tar and Go write: strict readers reject blanks.
    h.set_device_major(0).expect("ustar header");
    h.set_device_minor(0).expect("ustar header");
    h
}

/// Header (checksummed here), data, zero padding to the next 512-byte block.
fn append(out: &mut Vec<u8>, mut h: tar::Header, data: &[u8]) {
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}

/// A GNU long-name (`L`) or long-link (`K`) entry: `././@LongLink` holding `name` + NUL.
fn write_gnu_long(out: &mut Vec<u8>, type_byte: u8, name: &[u8]) {
    let mut h = tar::Header::new_gnu();
    let field = &mut h.as_old_mut().name;
    field[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::new(type_byte));
    h.set_size(name.len() as u64 + 1);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    let mut data = name.to_vec();
    data.push(0);
    append(out, h, &data);
}

/// PAX records `"LEN KEY=VALUE\n"`, where LEN counts the whole record including itself.
fn pax_records(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let body = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = body + body.to_string().len();
        if len.to_string().len() != body.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {key}=").as_bytes());
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Layers

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One layer: the tar, the blob (compressed tar) and their digests.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// The bytes the registry serves.
    pub blob: Vec<u8>,
    pub compression: Compression,
    /// `sha256:` of [`Layer::blob`].
    pub digest: String,
    /// `sha256:` of [`Layer::tar`], as listed in the config's `rootfs.diff_ids`.
    pub diff_id: String,
}

impl Layer {
    /// Writes `entries` in order, ends the archive with two zero blocks, and compresses.
    pub fn new(entries: &[Entry], compression: Compression) -> Layer {
        let mut tar = Vec::new();
        for e in entries {
            e.write_to(&mut tar);
        }
        tar.resize(tar.len() + 1024, 0);
        Layer::from_tar(tar, compression)
    }

    /// A layer from a ready tar (e.g. deliberately truncated or malformed).
    pub fn from_tar(tar: Vec<u8>, compression: Compression) -> Layer {
        let blob = match compression {
            Compression::None => tar.clone(),
            Compression::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                enc.write_all(&tar).expect("gzip to memory");
                enc.finish().expect("gzip to memory")
            }
            Compression::Zstd => zstd::encode_all(&tar[..], 3).expect("zstd to memory"),
        };
        Layer::from_parts(tar, blob, compression)
    }

    /// A layer whose blob is given as is (e.g. a multi-member gzip); `tar` is what it
    /// decompresses to.
    pub fn from_parts(tar: Vec<u8>, blob: Vec<u8>, compression: Compression) -> Layer {
        Layer {
            digest: sha256_digest(&blob),
            diff_id: sha256_digest(&tar),
            tar,
            blob,
            compression,
        }
    }

    /// Size of the blob in bytes.
    pub fn size(&self) -> u64 {
        self.blob.len() as u64
    }

    /// The layer media type in `format`.
    pub fn media_type(&self, format: Format) -> &'static str {
        match (format, self.compression) {
            (Format::Oci, Compression::None) => "application/vnd.oci.image.layer.v1.tar",
            (Format::Oci, Compression::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
            (Format::Oci, Compression::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
            (Format::Docker, Compression::None) => "application/vnd.docker.image.rootfs.diff.tar",
            (Format::Docker, Compression::Gzip) => {
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            }
            (Format::Docker, Compression::Zstd) => {
                "application/vnd.docker.image.rootfs.diff.tar.zstd"
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Documents, images, indexes

/// OCI or Docker media types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Oci,
    Docker,
}

impl Format {
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.manifest.v1+json",
            Format::Docker => "application/vnd.docker.distribution.manifest.v2+json",
        }
    }

    pub fn config_media_type(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.config.v1+json",
            Format::Docker => "application/vnd.docker.container.image.v1+json",
        }
    }

    pub fn index_media_type(self) -> &'static str {
        match self {
            Format::Oci => "application/vnd.oci.image.index.v1+json",
            Format::Docker => "application/vnd.docker.distribution.manifest.list.v2+json",
        }
    }
}

/// A JSON document (config, manifest, index) with its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub digest: String,
}

impl Document {
    /// Serialises `value` (pretty, as most tools write) and digests the bytes.
    pub fn new(media_type: &str, value: &Value) -> Document {
        Document::from_bytes(
            media_type,
            serde_json::to_vec_pretty(value).expect("serialise json"),
        )
    }

    /// A document from exact bytes (need not be valid JSON).
    pub fn from_bytes(media_type: &str, bytes: Vec<u8>) -> Document {
        Document {
            media_type: media_type.to_owned(),
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// `{"mediaType", "digest", "size"}`.
    pub fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size() })
    }

    /// The parsed JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).expect("document is json")
    }
}

/// `os/arch[/variant]`, e.g. `linux/arm/v7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`; panics on anything else (test input).
    pub fn parse(s: &str) -> Platform {
        let parts: Vec<&str> = s.split('/').collect();
        match parts[..] {
            [os, arch] => Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            },
            [os, arch, variant] => Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: Some(variant.into()),
            },
            _ => panic!("platform {s:?} is not os/arch[/variant]"),
        }
    }

    /// The `platform` object of an index entry.
    pub fn json(&self) -> Value {
        let mut v = json!({ "architecture": self.architecture, "os": self.os });
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        v
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A single-platform image: layers, config, manifest.
#[derive(Debug, Clone)]
pub struct Image {
    pub format: Format,
    pub platform: Platform,
    pub layers: Vec<Layer>,
    pub config: Document,
    pub manifest: Document,
}

impl Image {
    /// An image from hand-made documents (e.g. a manifest without `mediaType`); `layers` are
    /// the blobs to push besides the config.
    pub fn from_parts(
        format: Format,
        platform: Platform,
        layers: Vec<Layer>,
        config: Document,
        manifest: Document,
    ) -> Image {
        Image {
            format,
            platform,
            layers,
            config,
            manifest,
        }
    }
}

/// Builds an [`Image`]; defaults: `linux/amd64`, no Env/Cmd, one history entry per layer.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    format: Format,
    platform: Platform,
    layers: Vec<Layer>,
    config: Value,
    annotations: Vec<(String, String)>,
    layer_annotations: Vec<Vec<(String, String)>>,
    /// History entries with `empty_layer: true` (`ENV`, `CMD`, …), each after the first
    /// `.0` layers.
    empty_steps: Vec<(usize, String)>,
}

impl ImageBuilder {
    pub fn new(format: Format) -> ImageBuilder {
        ImageBuilder {
            format,
            platform: Platform::parse("linux/amd64"),
            layers: Vec::new(),
            config: json!({}),
            annotations: Vec::new(),
            layer_annotations: Vec::new(),
            empty_steps: Vec::new(),
        }
    }

    /// A build step that changed no file (`empty_layer: true` in the config's history),
    /// after the layers added so far.
    pub fn empty_step(mut self, created_by: &str) -> ImageBuilder {
        self.empty_steps
            .push((self.layers.len(), created_by.to_owned()));
        self
    }

    /// `os/arch[/variant]`.
    pub fn platform(mut self, platform: &str) -> ImageBuilder {
        self.platform = Platform::parse(platform);
        self
    }

    pub fn layer(mut self, layer: Layer) -> ImageBuilder {
        self.layers.push(layer);
        self.layer_annotations.push(Vec::new());
        self
    }

    /// Adds an annotation to the most recently added layer's descriptor.
    pub fn layer_annotation(mut self, key: &str, value: &str) -> ImageBuilder {
        let last = self
            .layer_annotations
            .last_mut()
            .expect("layer_annotation needs a layer first");
        last.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets `config.<key>` of the image config (`Env`, `Cmd`, `Entrypoint`, `User`,
    /// `WorkingDir`, `Labels`, …).
    pub fn config(mut self, key: &str, value: Value) -> ImageBuilder {
        self.config[key] = value;
        self
    }

    pub fn env(self, env: &[&str]) -> ImageBuilder {
        self.config("Env", json!(env))
    }

    pub fn cmd(self, cmd: &[&str]) -> ImageBuilder {
        self.config("Cmd", json!(cmd))
    }

    /// A manifest annotation (OCI only).
    pub fn annotation(mut self, key: &str, value: &str) -> ImageBuilder {
        self.annotations.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn build(self) -> Image {
        let f = self.format;
        let empty_after = |n: usize| {
            self.empty_steps
                .iter()
                .filter(move |(after, _)| *after == n)
                .map(|(_, step)| json!({ "created": "2024-01-01T00:00:00Z", "created_by": step, "empty_layer": true }))
        };
        let mut history: Vec<Value> = empty_after(0).collect();
        for i in 0..self.layers.len() {
            history.push(json!({ "created": "2024-01-01T00:00:00Z", "created_by": format!("imagefs test layer {i}") }));
            history.extend(empty_after(i + 1));
        }
        let mut config = json!({
            "architecture": self.platform.architecture,
            "os": self.platform.os,
            "created": "2024-01-01T00:00:00Z",
            "config": self.config,
            "rootfs": { "type": "layers", "diff_ids": self.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>() },
            "history": history,
        });
        if let Some(v) = &self.platform.variant {
            config["variant"] = json!(v);
        }
        let config = Document::new(f.config_media_type(), &config);
        let layers: Vec<Value> = self
            .layers
            .iter()
            .zip(&self.layer_annotations)
            .map(|(l, ann)| {
                let mut d =
                    json!({ "mediaType": l.media_type(f), "digest": l.digest, "size": l.size() });
                if !ann.is_empty() {
                    d["annotations"] = annotations_json(ann);
                }
                d
            })
            .collect();
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": f.manifest_media_type(),
            "config": config.descriptor(),
            "layers": layers,
        });
        if !self.annotations.is_empty() {
            manifest["annotations"] = annotations_json(&self.annotations);
        }
        let manifest = Document::new(f.manifest_media_type(), &manifest);
        Image {
            format: f,
            platform: self.platform,
            layers: self.layers,
            config,
            manifest,
        }
    }
}

fn annotations_json(pairs: &[(String, String)]) -> Value {
    Value::Object(pairs.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

/// A multi-platform index (OCI) or manifest list (Docker).
#[derive(Debug, Clone)]
pub struct Index {
    pub format: Format,
    pub images: Vec<Image>,
    /// Attestation manifests (`unknown/unknown` entries), pushed like images.
    pub attestations: Vec<Image>,
    pub manifest: Document,
}

impl Index {
    /// The image for `platform` (`os/arch[/variant]`).
    pub fn image(&self, platform: &str) -> &Image {
        let p = Platform::parse(platform);
        self.images
            .iter()
            .find(|i| i.platform == p)
            .unwrap_or_else(|| panic!("no {platform} image in index"))
    }
}

/// Builds an [`Index`].
#[derive(Debug, Clone)]
pub struct IndexBuilder {
    format: Format,
    images: Vec<Image>,
    attestation: bool,
}

impl IndexBuilder {
    pub fn new(format: Format) -> IndexBuilder {
        IndexBuilder {
            format,
            images: Vec::new(),
            attestation: false,
        }
    }

    pub fn image(mut self, image: Image) -> IndexBuilder {
        self.images.push(image);
        self
    }

    /// Adds a BuildKit-style attestation manifest (platform `unknown/unknown`) for the first
    /// image, listed last.
    pub fn attestation(mut self) -> IndexBuilder {
        self.attestation = true;
        self
    }

    pub fn build(self) -> Index {
        let f = self.format;
        let mut entries: Vec<Value> = self
            .images
            .iter()
            .map(|i| {
                json!({
                    "mediaType": i.manifest.media_type,
                    "digest": i.manifest.digest,
                    "size": i.manifest.size(),
                    "platform": i.platform.json(),
                })
            })
            .collect();
        let mut attestations = Vec::new();
        if self.attestation {
            let subject = self.images.first().expect("an attestation needs an image");
            let statement = Layer::from_tar(
                br#"{"_type":"https://in-toto.io/Statement/v0.1","predicateType":"https://spdx.dev/Document","subject":[]}"#.to_vec(),
                Compression::None,
            );
            let config = Document::new(
                Format::Oci.config_media_type(),
                &json!({
                    "architecture": "unknown", "os": "unknown", "config": {},
                    "rootfs": { "type": "layers", "diff_ids": [statement.diff_id] },
                }),
            );
            let manifest = Document::new(
                Format::Oci.manifest_media_type(),
                &json!({
                    "schemaVersion": 2,
                    "mediaType": Format::Oci.manifest_media_type(),
                    "config": config.descriptor(),
                    "layers": [{
                        "mediaType": "application/vnd.in-toto+json",
                        "digest": statement.digest,
                        "size": statement.size(),
                        "annotations": { "in-toto.io/predicate-type": "https://spdx.dev/Document" },
                    }],
                }),
            );
            entries.push(json!({
                "mediaType": manifest.media_type,
                "digest": manifest.digest,
                "size": manifest.size(),
                "annotations": {
                    "vnd.docker.reference.digest": subject.manifest.digest,
                    "vnd.docker.reference.type": "attestation-manifest",
                },
                "platform": { "architecture": "unknown", "os": "unknown" },
            }));
            let platform = Platform::parse("unknown/unknown");
            attestations.push(Image::from_parts(
                Format::Oci,
                platform,
                vec![statement],
                config,
                manifest,
            ));
        }
        let manifest = Document::new(
            f.index_media_type(),
            &json!({ "schemaVersion": 2, "mediaType": f.index_media_type(), "manifests": entries }),
        );
        Index {
            format: f,
            images: self.images,
            attestations,
            manifest,
        }
    }
}

/// Deterministic bytes that do not compress (xorshift), `len` of them from `seed`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
