//! eStargz layers, the groundwork of lazy pulling: the footer, the table of contents (TOC),
//! the chunk map that says which compressed bytes of the blob hold which bytes of each file,
//! and the decoding and verification of one chunk. Pure: byte slices in, values out. It must
//! not know HTTP, the store, async or FUSE — the caller fetches the ranges this module names.
//!
//! The format (containerd/stargz-snapshotter `docs/estargz.md`; stargz from google/crfs):
//!
//! ```text
//! blob = gzip member*  TOC member  footer          (still one valid tar.gz)
//! ```
//!
//! - Every non-empty regular file's payload starts a new gzip member, and large files MAY
//!   be split into several members ("chunks"). The file's tar header is *not* in that
//!   member: it ends the previous one. The tar padding and the following entries' headers
//!   (directories, symlinks, the next file's header) come after the payload of the last
//!   chunk, in the same member or in members of their own (`ctr-remote` does both). So the
//!   bytes of a chunk are the first `chunkSize` bytes that its member decompresses to —
//!   after `innerOffset` bytes when several payloads share one member (the `innerOffset`
//!   extension) — and the range up to the next data offset may hold more than the chunk.
//! - The TOC is the tar entry `stargz.index.json`, the last in the tar, alone in its gzip
//!   member (tar header + JSON + padding + end-of-archive blocks).
//! - The footer is an empty gzip member whose Extra field carries the TOC member's offset:
//!
//! ```text
//! eStargz, 51 bytes                          legacy stargz, 47 bytes
//! 10  gzip header (FLG = FEXTRA)             10  gzip header (FLG = FEXTRA)
//!  2  XLEN = 26                               2  XLEN = 22
//!  2  SI1 SI2 = 'S' 'G'                      22  "%016xSTARGZ" (TOC offset)
//!  2  LEN = 22                                5  empty stored deflate block
//! 22  "%016xSTARGZ" (TOC offset)              8  CRC32 = 0, ISIZE = 0
//!  5  empty stored deflate block
//!  8  CRC32 = 0, ISIZE = 0
//! ```
//!
//! - TOC JSON, `version` 1: `entries` in tar order, one per tar entry (except the TOC) and
//!   one `chunk` entry per chunk after a file's first; `offset` is the gzip member of a
//!   `reg`'s first chunk or of a `chunk`, `chunkOffset` the chunk's place in the file,
//!   `chunkSize` its uncompressed length (absent on the last chunk: up to the file size),
//!   `chunkDigest` its sha256. Absent numbers mean 0, as Go's `omitempty` writes them.
//! - The TOC is verified against the layer descriptor's annotation
//!   `containerd.io/snapshot/stargz/toc.digest` (sha256 of the JSON bytes), and each chunk
//!   against its `chunkDigest` from the verified TOC.
//! - Landmarks: a root file `.prefetch.landmark` ends the prioritised files, so bytes
//!   `[0, its offset)` are worth prefetching; `.no.prefetch.landmark` says there are none.
//!   They and `stargz.index.json` are format metadata, not image content: they are dropped
//!   from the [`LayerIndex`], as the tar indexer drops them.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::ops::Range;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::index::{DataRef, Entry, EntryKind, LayerIndex, Timespec, Xattr, clean_path};
use super::tar::ESTARGZ_META_NAMES;
use crate::oci::Digest;

/// Size of the eStargz footer.
pub const FOOTER_SIZE: usize = 51;
/// Size of the footer of legacy stargz (google/crfs), which lacks the `SG` subfield header.
pub const LEGACY_FOOTER_SIZE: usize = 47;
/// Name of the TOC tar entry.
pub const TOC_NAME: &str = "stargz.index.json";
/// Layer descriptor annotation holding the digest of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Root file marking the end of the prioritised (prefetch) region.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Root file saying that no file is prioritised.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// Largest TOC JSON accepted (stargz-snapshotter's own limit is 50 MB of compressed TOC).
pub const MAX_TOC_JSON_SIZE: u64 = 64 << 20;
/// Largest TOC member (compressed) accepted: the JSON, its tar framing and gzip overhead.
pub const MAX_TOC_MEMBER_SIZE: u64 = MAX_TOC_JSON_SIZE + (1 << 20);
/// DEFLATE expands at most ~1032:1 (a 258-byte match in two 1-bit codes); a chunk claiming
/// more bytes than its compressed range can hold is rejected before anything is allocated.
const MAX_DEFLATE_RATIO: u64 = 1032;
/// Uncompressed bytes allowed in the TOC member besides the JSON (headers, padding, end).
const TOC_FRAMING_ALLOWANCE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EstargzError {
    #[error("not an eStargz footer: {reason} (the layer is not eStargz: fetch it whole instead)")]
    Footer { reason: String },
    #[error(
        "eStargz footer points at TOC offset {toc_offset}, outside the {blob_size}-byte blob (corrupt layer: fetch it whole instead)"
    )]
    TocOffset { toc_offset: u64, blob_size: u64 },
    #[error(
        "eStargz TOC member is {size} bytes, more than the {max}-byte limit (fetch the layer whole instead)"
    )]
    TocMemberTooLarge { size: u64, max: u64 },
    #[error("reading the eStargz TOC member: {source} (corrupt layer: fetch it whole instead)")]
    TocMember {
        #[source]
        source: io::Error,
    },
    #[error(
        "the eStargz TOC member holds {name:?}, not {TOC_NAME} (corrupt layer: fetch it whole instead)"
    )]
    TocName { name: String },
    #[error(
        "eStargz TOC is {size} bytes, more than the {max}-byte limit (fetch the layer whole instead)"
    )]
    TocTooLarge { size: u64, max: u64 },
    #[error(
        "eStargz TOC digest mismatch: the manifest says {expected}, the TOC is {actual} (the layer does not match its manifest: re-pull the image)"
    )]
    TocDigestMismatch { expected: Digest, actual: Digest },
    #[error("parsing the eStargz TOC JSON: {source} (corrupt layer: fetch it whole instead)")]
    TocJson {
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "eStargz TOC version {version} is not supported (only version 1 is): fetch the layer whole instead"
    )]
    TocVersion { version: i64 },
    #[error(
        "eStargz TOC entry {index} ({name:?}): {reason} (corrupt TOC: fetch the layer whole instead)"
    )]
    TocEntry {
        index: usize,
        name: String,
        reason: String,
    },
    #[error(
        "eStargz TOC entry {index} ({name:?}): data offset {offset} is not before the TOC at {toc_offset} (corrupt TOC: fetch the layer whole instead)"
    )]
    OffsetOutOfRange {
        index: usize,
        name: String,
        offset: u64,
        toc_offset: u64,
    },
    #[error(
        "eStargz TOC entry {index} ({name:?}): data at offset {offset}+{inner_offset} overlaps or precedes the previous data at {previous_offset}+{previous_inner_end} (corrupt TOC: fetch the layer whole instead)"
    )]
    Overlap {
        index: usize,
        name: String,
        offset: u64,
        inner_offset: u64,
        previous_offset: u64,
        previous_inner_end: u64,
    },
    #[error(
        "eStargz TOC entry {index} ({name:?}): a chunk that follows no regular file with content (corrupt TOC: fetch the layer whole instead)"
    )]
    UnknownFile { index: usize, name: String },
    #[error(
        "eStargz TOC: the chunks of {name:?} do not cover the file exactly: {reason} (corrupt TOC: fetch the layer whole instead)"
    )]
    ChunkCoverage { name: String, reason: String },
    #[error(
        "decompressing the eStargz chunk at offset {offset}: {source} (corrupt layer: re-fetch it)"
    )]
    ChunkDecode {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "eStargz chunk at offset {offset} ends after {actual} of its {expected} bytes (truncated range or corrupt layer: re-fetch it)"
    )]
    ChunkTruncated {
        offset: u64,
        expected: u64,
        actual: u64,
    },
    #[error(
        "eStargz chunk at offset {offset}: digest mismatch, the TOC says {expected}, the data is {actual} (corrupt layer or registry: re-fetch it)"
    )]
    ChunkDigestMismatch {
        offset: u64,
        expected: Digest,
        actual: Digest,
    },
}

// ---------------------------------------------------------------------------------------
// Footer

/// The parsed footer: where the TOC member starts and how long the footer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Blob offset of the gzip member holding the TOC tar entry.
    pub toc_offset: u64,
    /// [`FOOTER_SIZE`], or [`LEGACY_FOOTER_SIZE`] for legacy stargz.
    pub size: u64,
}

impl Footer {
    pub fn is_legacy(&self) -> bool {
        self.size == LEGACY_FOOTER_SIZE as u64
    }

    /// The blob range holding the TOC member (from the TOC offset up to the footer), checked
    /// against the blob size and [`MAX_TOC_MEMBER_SIZE`] before anyone fetches it.
    pub fn toc_range(&self, blob_size: u64) -> Result<Range<u64>, EstargzError> {
        let end = blob_size
            .checked_sub(self.size)
            .filter(|&end| self.toc_offset < end)
            .ok_or(EstargzError::TocOffset {
                toc_offset: self.toc_offset,
                blob_size,
            })?;
        let size = end - self.toc_offset;
        if size > MAX_TOC_MEMBER_SIZE {
            return Err(EstargzError::TocMemberTooLarge {
                size,
                max: MAX_TOC_MEMBER_SIZE,
            });
        }
        Ok(self.toc_offset..end)
    }
}

const GZIP_FTEXT: u8 = 0x01;
const GZIP_FEXTRA: u8 = 0x04;
const STARGZ_MAGIC: &[u8] = b"STARGZ";

/// Parse the footer at the end of `tail` (the last bytes of the blob: at least
/// [`LEGACY_FOOTER_SIZE`], normally [`FOOTER_SIZE`] or more). The eStargz footer is tried
/// first, then the legacy stargz one. The footer must be a complete, empty gzip member.
pub fn parse_footer(tail: &[u8]) -> Result<Footer, EstargzError> {
    let first = if tail.len() >= FOOTER_SIZE {
        match footer_offset(&tail[tail.len() - FOOTER_SIZE..], false) {
            Ok(toc_offset) => {
                return Ok(Footer {
                    toc_offset,
                    size: FOOTER_SIZE as u64,
                });
            }
            Err(reason) => Some(reason),
        }
    } else {
        None
    };
    if tail.len() < LEGACY_FOOTER_SIZE {
        return Err(EstargzError::Footer {
            reason: format!(
                "{} bytes given, the footer needs {FOOTER_SIZE} ({LEGACY_FOOTER_SIZE} for legacy stargz)",
                tail.len()
            ),
        });
    }
    match footer_offset(&tail[tail.len() - LEGACY_FOOTER_SIZE..], true) {
        Ok(toc_offset) => Ok(Footer {
            toc_offset,
            size: LEGACY_FOOTER_SIZE as u64,
        }),
        Err(legacy) => Err(EstargzError::Footer {
            reason: match first {
                Some(first) => format!("{first}; as a legacy stargz footer: {legacy}"),
                None => format!("as a legacy stargz footer: {legacy}"),
            },
        }),
    }
}

/// The TOC offset from a footer of exactly the right size, or why it is not one.
fn footer_offset(footer: &[u8], legacy: bool) -> Result<u64, String> {
    let xlen = if legacy { 22 } else { 26 };
    if footer[..2] != [0x1f, 0x8b] {
        return Err("no gzip magic".into());
    }
    if footer[2] != 8 {
        return Err(format!(
            "gzip compression method {} is not deflate",
            footer[2]
        ));
    }
    // FEXTRA is required; FNAME, FCOMMENT, FHCRC or reserved bits would shift the layout.
    if footer[3] & !GZIP_FTEXT != GZIP_FEXTRA {
        return Err(format!(
            "gzip flags {:#04x}, expected only FEXTRA",
            footer[3]
        ));
    }
    let got_xlen = u16::from_le_bytes([footer[10], footer[11]]);
    if usize::from(got_xlen) != xlen {
        return Err(format!(
            "gzip Extra field is {got_xlen} bytes, expected {xlen}"
        ));
    }
    let extra = &footer[12..12 + xlen];
    let payload = if legacy {
        extra
    } else {
        if &extra[..2] != b"SG" {
            return Err(format!(
                "Extra subfield id {:?}, expected \"SG\"",
                String::from_utf8_lossy(&extra[..2])
            ));
        }
        let len = u16::from_le_bytes([extra[2], extra[3]]);
        if len != 22 {
            return Err(format!("Extra subfield is {len} bytes, expected 22"));
        }
        &extra[4..]
    };
    if &payload[16..] != STARGZ_MAGIC {
        return Err("no STARGZ magic in the gzip Extra field".into());
    }
    let hex = &payload[..16];
    if !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!(
            "TOC offset {:?} is not 16 hex digits",
            String::from_utf8_lossy(hex)
        ));
    }
    // Safe: 16 ASCII hex digits always parse into a u64.
    let offset = u64::from_str_radix(std::str::from_utf8(hex).unwrap_or("x"), 16)
        .map_err(|e| format!("TOC offset: {e}"))?;
    if offset > i64::MAX as u64 {
        return Err(format!("TOC offset {offset:#x} does not fit in int64"));
    }
    // The rest must be an empty deflate stream and a matching trailer, with nothing after.
    let mut rest = footer;
    let mut out = Vec::new();
    flate2::bufread::GzDecoder::new(&mut rest)
        .take(1)
        .read_to_end(&mut out)
        .map_err(|e| format!("footer gzip member: {e}"))?;
    if !out.is_empty() {
        return Err("footer gzip member is not empty".into());
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the footer gzip member", rest.len()));
    }
    Ok(offset)
}

/// The footer bytes for a TOC at `toc_offset` (as the Go writer lays them out).
pub fn footer_bytes(toc_offset: u64, legacy: bool) -> Vec<u8> {
    let subfield = format!("{toc_offset:016x}STARGZ");
    let mut out = vec![0x1f, 0x8b, 8, GZIP_FEXTRA, 0, 0, 0, 0, 0, 0xff];
    if legacy {
        out.extend_from_slice(&22u16.to_le_bytes());
    } else {
        out.extend_from_slice(&26u16.to_le_bytes());
        out.extend_from_slice(b"SG");
        out.extend_from_slice(&22u16.to_le_bytes());
    }
    out.extend_from_slice(subfield.as_bytes());
    // A final stored block of length 0, then CRC32 and ISIZE of nothing.
    out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    out.extend_from_slice(&[0; 8]);
    out
}

// ---------------------------------------------------------------------------------------
// TOC

/// A parsed, digest-checked TOC. Entries are validated one by one (types, digests, times);
/// how they fit together (offsets, chunks) is checked by [`Toc::to_layer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Toc {
    pub version: i64,
    pub entries: Vec<TocEntry>,
    /// sha256 of the TOC JSON bytes (what the `toc.digest` annotation names).
    pub digest: Digest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TocEntryType {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    Chunk,
}

impl TocEntryType {
    fn parse(s: &str) -> Option<TocEntryType> {
        Some(match s {
            "dir" => TocEntryType::Dir,
            "reg" => TocEntryType::Reg,
            "symlink" => TocEntryType::Symlink,
            "hardlink" => TocEntryType::Hardlink,
            "char" => TocEntryType::Char,
            "block" => TocEntryType::Block,
            "fifo" => TocEntryType::Fifo,
            "chunk" => TocEntryType::Chunk,
            _ => return None,
        })
    }

    /// The index kind of an entry; `None` for `chunk`, which is data of the file before it.
    pub fn entry_kind(self) -> Option<EntryKind> {
        Some(match self {
            TocEntryType::Dir => EntryKind::Dir,
            TocEntryType::Reg => EntryKind::File,
            TocEntryType::Symlink => EntryKind::Symlink,
            TocEntryType::Hardlink => EntryKind::Hardlink,
            TocEntryType::Char => EntryKind::CharDev,
            TocEntryType::Block => EntryKind::BlockDev,
            TocEntryType::Fifo => EntryKind::Fifo,
            TocEntryType::Chunk => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TocEntryType::Dir => "dir",
            TocEntryType::Reg => "reg",
            TocEntryType::Symlink => "symlink",
            TocEntryType::Hardlink => "hardlink",
            TocEntryType::Char => "char",
            TocEntryType::Block => "block",
            TocEntryType::Fifo => "fifo",
            TocEntryType::Chunk => "chunk",
        }
    }
}

/// One TOC entry, typed. Absent numbers and strings are 0 and empty, as in the JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocEntry {
    /// The tar name, as written (not cleaned).
    pub name: String,
    pub kind: TocEntryType,
    pub size: u64,
    /// From `modtime` (RFC 3339); the epoch when absent.
    pub mtime: Timespec,
    pub link_name: String,
    /// The tar mode as written; only `mode & 0o7777` is used.
    pub mode: i64,
    pub uid: u32,
    pub gid: u32,
    pub user_name: String,
    pub group_name: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Decoded from the base64 values of `xattrs`, sorted by name.
    pub xattrs: Vec<Xattr>,
    pub digest: Option<Digest>,
    pub offset: u64,
    pub chunk_offset: u64,
    /// 0 means "up to the end of the file".
    pub chunk_size: u64,
    pub chunk_digest: Option<Digest>,
    pub inner_offset: u64,
}

#[derive(Deserialize)]
struct RawToc {
    version: Option<i64>,
    #[serde(default)]
    entries: Option<Vec<RawEntry>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    modtime: Option<String>,
    #[serde(default)]
    link_name: Option<String>,
    #[serde(default)]
    mode: i64,
    #[serde(default)]
    uid: u64,
    #[serde(default)]
    gid: u64,
    #[serde(default)]
    user_name: Option<String>,
    #[serde(default)]
    group_name: Option<String>,
    #[serde(default)]
    dev_major: u64,
    #[serde(default)]
    dev_minor: u64,
    /// Go's `map[string][]byte`: base64 strings, `null` for a nil value.
    #[serde(default)]
    xattrs: Option<BTreeMap<String, Option<String>>>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    chunk_offset: u64,
    #[serde(default)]
    chunk_size: u64,
    #[serde(default)]
    chunk_digest: Option<String>,
    #[serde(default)]
    inner_offset: u64,
}

/// Parse the TOC member: `member` is the blob from the TOC offset up to the footer
/// ([`Footer::toc_range`]). When `expected_digest` (the layer's `toc.digest` annotation) is
/// given, the JSON must match it before anything in it is used.
pub fn parse_toc_member(
    member: &[u8],
    expected_digest: Option<&Digest>,
) -> Result<Toc, EstargzError> {
    if member.len() as u64 > MAX_TOC_MEMBER_SIZE {
        return Err(EstargzError::TocMemberTooLarge {
            size: member.len() as u64,
            max: MAX_TOC_MEMBER_SIZE,
        });
    }
    let json = toc_json(member)?;
    if let Some(expected) = expected_digest {
        expected
            .verify(&json)
            .map_err(|actual| EstargzError::TocDigestMismatch {
                expected: expected.clone(),
                actual,
            })?;
    }
    parse_toc_json(&json, Digest::sha256(&json))
}

/// The JSON bytes of the TOC tar entry, reading the whole gzip member so its CRC is checked.
fn toc_json(member: &[u8]) -> Result<Vec<u8>, EstargzError> {
    let read = |source| EstargzError::TocMember { source };
    let limit = MAX_TOC_JSON_SIZE + TOC_FRAMING_ALLOWANCE;
    // One member only (Go reads it with Multistream(false)); bytes after it are ignored.
    let mut gz = flate2::bufread::GzDecoder::new(member).take(limit);
    let json = {
        let mut archive = tar::Archive::new(&mut gz);
        let mut entries = archive.entries().map_err(read)?;
        let mut entry = match entries.next() {
            Some(entry) => entry.map_err(read)?,
            None => {
                return Err(read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "no tar entry",
                )));
            }
        };
        let name = entry.path_bytes();
        if name.as_ref() != TOC_NAME.as_bytes() {
            return Err(EstargzError::TocName {
                name: String::from_utf8_lossy(&name).into_owned(),
            });
        }
        let size = entry.header().entry_size().map_err(read)?;
        if size > MAX_TOC_JSON_SIZE {
            return Err(EstargzError::TocTooLarge {
                size,
                max: MAX_TOC_JSON_SIZE,
            });
        }
        let mut json = Vec::with_capacity(size.min(1 << 20) as usize);
        (&mut entry)
            .take(size)
            .read_to_end(&mut json)
            .map_err(read)?;
        if (json.len() as u64) < size {
            return Err(read(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("TOC entry ends after {} of {size} bytes", json.len()),
            )));
        }
        json
    };
    // The padding and end-of-archive blocks follow; reading to the member's end checks its
    // CRC, so a corrupt member fails here even without a digest to compare.
    io::copy(&mut gz, &mut io::sink()).map_err(read)?;
    if gz.limit() == 0 {
        return Err(EstargzError::TocTooLarge {
            size: limit,
            max: MAX_TOC_JSON_SIZE,
        });
    }
    Ok(json)
}

fn parse_toc_json(json: &[u8], digest: Digest) -> Result<Toc, EstargzError> {
    let raw: RawToc =
        serde_json::from_slice(json).map_err(|source| EstargzError::TocJson { source })?;
    let version = raw.version.unwrap_or(0);
    if version != 1 {
        return Err(EstargzError::TocVersion { version });
    }
    let entries = raw
        .entries
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, e)| typed_entry(index, e))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Toc {
        version,
        entries,
        digest,
    })
}

fn typed_entry(index: usize, raw: RawEntry) -> Result<TocEntry, EstargzError> {
    let bad = |reason: String| EstargzError::TocEntry {
        index,
        name: raw.name.clone(),
        reason,
    };
    let kind = TocEntryType::parse(&raw.kind)
        .ok_or_else(|| bad(format!("unknown type {:?}", raw.kind)))?;
    let mtime = match raw.modtime.as_deref() {
        None | Some("") => Timespec::default(),
        Some(s) => parse_rfc3339(s).ok_or_else(|| bad(format!("modtime {s:?} is not RFC 3339")))?,
    };
    let id32 = |what: &str, v: u64| {
        u32::try_from(v).map_err(|_| bad(format!("{what} {v} does not fit in 32 bits")))
    };
    let digest = |what: &str, v: &Option<String>| -> Result<Option<Digest>, EstargzError> {
        match v.as_deref() {
            None | Some("") => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|e| bad(format!("{what}: {e}"))),
        }
    };
    let mut xattrs = Vec::new();
    for (name, value) in raw.xattrs.iter().flatten() {
        let value = match value {
            None => Vec::new(),
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|e| bad(format!("xattr {name:?} is not base64: {e}")))?,
        };
        xattrs.push(Xattr {
            name: name.clone().into_bytes(),
            value,
        });
    }
    Ok(TocEntry {
        kind,
        size: raw.size,
        mtime,
        mode: raw.mode,
        uid: id32("uid", raw.uid)?,
        gid: id32("gid", raw.gid)?,
        dev_major: id32("devMajor", raw.dev_major)?,
        dev_minor: id32("devMinor", raw.dev_minor)?,
        xattrs,
        digest: digest("digest", &raw.digest)?,
        chunk_digest: digest("chunkDigest", &raw.chunk_digest)?,
        offset: raw.offset,
        chunk_offset: raw.chunk_offset,
        chunk_size: raw.chunk_size,
        inner_offset: raw.inner_offset,
        link_name: raw.link_name.clone().unwrap_or_default(),
        user_name: raw.user_name.clone().unwrap_or_default(),
        group_name: raw.group_name.clone().unwrap_or_default(),
        name: raw.name,
    })
}

// ---------------------------------------------------------------------------------------
// The layer model: index + chunk map

/// Where one chunk of a file lives in the blob and how to check it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Blob offset of the gzip member holding the chunk.
    pub offset: u64,
    /// Compressed bytes from `offset` to the next larger data offset (or to the TOC): the
    /// range to fetch for [`decode_chunk`].
    pub compressed_len: u64,
    /// Where the chunk starts in the file.
    pub chunk_offset: u64,
    /// Uncompressed length of the chunk (never 0).
    pub chunk_size: u64,
    /// `chunkDigest` from the TOC (for a single-chunk file without one, the file's `digest`).
    pub chunk_digest: Option<Digest>,
    /// Uncompressed bytes to skip in the member before the chunk's data.
    pub inner_offset: u64,
}

impl Chunk {
    /// The blob range to fetch for this chunk.
    pub fn compressed_range(&self) -> Range<u64> {
        self.offset..self.offset.saturating_add(self.compressed_len)
    }

    /// The file bytes this chunk holds.
    pub fn file_range(&self) -> Range<u64> {
        self.chunk_offset..self.chunk_end()
    }

    fn chunk_end(&self) -> u64 {
        self.chunk_offset.saturating_add(self.chunk_size)
    }
}

/// The chunks of every file with content, keyed by the file's [`DataRef`] id, each list in
/// file order and covering the file exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMap {
    files: BTreeMap<u32, Vec<Chunk>>,
}

impl ChunkMap {
    /// All chunks of a file, in file order.
    pub fn chunks(&self, data: DataRef) -> Option<&[Chunk]> {
        self.files.get(&data.id).map(Vec::as_slice)
    }

    /// The chunk holding byte `pos` of the file.
    pub fn chunk_at(&self, data: DataRef, pos: u64) -> Option<&Chunk> {
        let chunks = self.files.get(&data.id)?;
        let i = chunks.partition_point(|c| c.chunk_end() <= pos);
        chunks.get(i).filter(|c| c.chunk_offset <= pos)
    }

    /// The chunks overlapping the file bytes `range` (empty for an empty range or none).
    pub fn chunks_in(&self, data: DataRef, range: Range<u64>) -> &[Chunk] {
        let Some(chunks) = self.files.get(&data.id) else {
            return &[];
        };
        if range.start >= range.end {
            return &[];
        }
        let first = chunks.partition_point(|c| c.chunk_end() <= range.start);
        let end = chunks.partition_point(|c| c.chunk_offset < range.end);
        &chunks[first..end.max(first)]
    }

    pub fn iter(&self) -> impl Iterator<Item = (DataRef, &[Chunk])> {
        self.files
            .iter()
            .map(|(&id, chunks)| (DataRef { id }, chunks.as_slice()))
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// A file with content whose chunks are being collected.
struct OpenFile {
    index: usize,
    path: Vec<u8>,
    id: u32,
    size: u64,
    keep: bool,
    digest: Option<Digest>,
    chunks: Vec<Chunk>,
}

/// Position of the last data seen, to check that data never goes backwards or overlaps.
struct LastData {
    offset: u64,
    inner_end: u64,
}

impl Toc {
    /// The layer as the overlay sees it, plus where each file's bytes are. `toc_offset` is
    /// [`Footer::toc_offset`]: no data may start at or after it.
    ///
    /// Entries are in TOC order with paths cleaned like the tar indexer's; eStargz metadata
    /// files at the root are dropped. `DataRef` ids follow the tar indexer's numbering (every
    /// regular file with content takes the next id, the dropped metadata files included),
    /// so an id names the same file whichever way the layer was indexed.
    pub fn to_layer(&self, toc_offset: u64) -> Result<(LayerIndex, ChunkMap), EstargzError> {
        let mut entries = Vec::new();
        let mut files: Vec<OpenFile> = Vec::new();
        let mut open: Option<OpenFile> = None;
        let mut last: Option<LastData> = None;
        let mut next_id: u32 = 0;

        for (index, te) in self.entries.iter().enumerate() {
            let bad = |reason: String| EstargzError::TocEntry {
                index,
                name: te.name.clone(),
                reason,
            };
            let Some(kind) = te.kind.entry_kind() else {
                // A `chunk`: more data of the file just opened.
                let Some(file) = open.as_mut() else {
                    return Err(EstargzError::UnknownFile {
                        index,
                        name: te.name.clone(),
                    });
                };
                // Go's reader takes a chunk's name from the entry before it; a name that
                // says otherwise is a TOC out of order.
                if !te.name.is_empty() && clean_path(te.name.as_bytes()) != file.path {
                    return Err(EstargzError::UnknownFile {
                        index,
                        name: te.name.clone(),
                    });
                }
                let chunk = data_chunk(te, index, file.size, toc_offset, &mut last, None)?;
                file.chunks.push(chunk);
                continue;
            };
            if let Some(file) = open.take() {
                files.push(finish_file(file, &self.entries)?);
            }

            let path = clean_path(te.name.as_bytes());
            let keep = !ESTARGZ_META_NAMES.contains(&path.as_slice());
            let mut entry = Entry::new(path.clone(), kind, (te.mode & 0o7777) as u32);
            entry.uid = te.uid;
            entry.gid = te.gid;
            entry.mtime = te.mtime;
            entry.xattrs = te.xattrs.clone();
            match kind {
                EntryKind::File => {
                    entry.size = te.size;
                    if te.size > 0 {
                        let id = next_id;
                        next_id = next_id
                            .checked_add(1)
                            .ok_or_else(|| bad("more than 2^32 files in one layer".into()))?;
                        entry.data = Some(DataRef { id });
                        let first = data_chunk(te, index, te.size, toc_offset, &mut last, Some(0))?;
                        open = Some(OpenFile {
                            index,
                            path: path.clone(),
                            id,
                            size: te.size,
                            keep,
                            digest: te.digest.clone(),
                            chunks: vec![first],
                        });
                    }
                }
                // Verbatim: a symlink target is never cleaned or resolved.
                EntryKind::Symlink => entry.link = Some(te.link_name.clone().into_bytes()),
                EntryKind::Hardlink => {
                    if te.link_name.is_empty() {
                        return Err(bad("hardlink without a linkName".into()));
                    }
                    entry.link = Some(clean_path(te.link_name.as_bytes()));
                }
                EntryKind::CharDev | EntryKind::BlockDev => {
                    entry.rdev = (te.dev_major, te.dev_minor);
                }
                EntryKind::Dir | EntryKind::Fifo => {}
            }
            if keep {
                entries.push(entry);
            }
        }
        if let Some(file) = open.take() {
            files.push(finish_file(file, &self.entries)?);
        }

        // Each chunk's compressed range runs to the next larger data offset: data offsets
        // increase in TOC order (checked above), so this list is sorted.
        let mut offsets: Vec<u64> = files
            .iter()
            .flat_map(|f| f.chunks.iter().map(|c| c.offset))
            .collect();
        offsets.dedup();
        let mut map = ChunkMap::default();
        for mut file in files {
            for chunk in &mut file.chunks {
                let i = offsets.partition_point(|&o| o <= chunk.offset);
                let next = offsets.get(i).copied().unwrap_or(toc_offset);
                chunk.compressed_len = next - chunk.offset;
                let need = chunk.inner_offset.saturating_add(chunk.chunk_size);
                if need > chunk.compressed_len.saturating_mul(MAX_DEFLATE_RATIO) {
                    return Err(EstargzError::TocEntry {
                        index: file.index,
                        name: self.entries[file.index].name.clone(),
                        reason: format!(
                            "a chunk of {need} bytes cannot come from the {} compressed bytes at offset {}",
                            chunk.compressed_len, chunk.offset
                        ),
                    });
                }
            }
            if file.keep {
                map.files.insert(file.id, file.chunks);
            }
        }
        Ok((LayerIndex { entries }, map))
    }

    /// Offset of `.prefetch.landmark`: the prioritised files are in bytes `[0, offset)`.
    pub fn prefetch_landmark_offset(&self) -> Option<u64> {
        self.entries
            .iter()
            .find(|e| {
                e.kind == TocEntryType::Reg
                    && clean_path(e.name.as_bytes()) == PREFETCH_LANDMARK.as_bytes()
            })
            .map(|e| e.offset)
            .filter(|&offset| offset > 0)
    }

    /// Whether the layer says that no file is prioritised.
    pub fn has_no_prefetch_landmark(&self) -> bool {
        self.entries.iter().any(|e| {
            e.kind == TocEntryType::Reg
                && clean_path(e.name.as_bytes()) == NO_PREFETCH_LANDMARK.as_bytes()
        })
    }
}

/// The chunk described by a `reg` (`first` = its required chunk offset, 0) or `chunk` entry,
/// with its place in the blob checked against the data before it.
fn data_chunk(
    te: &TocEntry,
    index: usize,
    file_size: u64,
    toc_offset: u64,
    last: &mut Option<LastData>,
    first: Option<u64>,
) -> Result<Chunk, EstargzError> {
    let bad = |reason: String| EstargzError::TocEntry {
        index,
        name: te.name.clone(),
        reason,
    };
    if let Some(want) = first
        && te.chunk_offset != want
    {
        return Err(bad(format!(
            "the first chunk of a file starts at {} instead of {want}",
            te.chunk_offset
        )));
    }
    // Offset 0 is the first member, which starts with a tar header, never with file data.
    if te.offset == 0 && te.inner_offset == 0 {
        return Err(bad("file data without an offset".into()));
    }
    if te.offset >= toc_offset {
        return Err(EstargzError::OffsetOutOfRange {
            index,
            name: te.name.clone(),
            offset: te.offset,
            toc_offset,
        });
    }
    let chunk_size = if te.chunk_size > 0 {
        te.chunk_size
    } else {
        file_size.saturating_sub(te.chunk_offset)
    };
    if chunk_size == 0 {
        return Err(EstargzError::ChunkCoverage {
            name: te.name.clone(),
            reason: format!("an empty chunk at file offset {}", te.chunk_offset),
        });
    }
    if let Some(prev) = last.as_ref() {
        let overlaps = te.offset < prev.offset
            || (te.offset == prev.offset && te.inner_offset < prev.inner_end);
        if overlaps {
            return Err(EstargzError::Overlap {
                index,
                name: te.name.clone(),
                offset: te.offset,
                inner_offset: te.inner_offset,
                previous_offset: prev.offset,
                previous_inner_end: prev.inner_end,
            });
        }
    }
    *last = Some(LastData {
        offset: te.offset,
        inner_end: te.inner_offset.saturating_add(chunk_size),
    });
    Ok(Chunk {
        offset: te.offset,
        compressed_len: 0,
        chunk_offset: te.chunk_offset,
        chunk_size,
        chunk_digest: te.chunk_digest.clone(),
        inner_offset: te.inner_offset,
    })
}

/// Check that a file's chunks tile it exactly.
fn finish_file(mut file: OpenFile, toc: &[TocEntry]) -> Result<OpenFile, EstargzError> {
    let name = toc[file.index].name.clone();
    let mut pos: u64 = 0;
    for (i, c) in file.chunks.iter().enumerate() {
        if c.chunk_offset != pos {
            return Err(EstargzError::ChunkCoverage {
                name,
                reason: format!(
                    "chunk {i} starts at {} where the data so far ends at {pos}",
                    c.chunk_offset
                ),
            });
        }
        pos = pos
            .checked_add(c.chunk_size)
            .ok_or_else(|| EstargzError::ChunkCoverage {
                name: name.clone(),
                reason: format!("chunk {i} ends beyond 2^64"),
            })?;
    }
    if pos != file.size {
        return Err(EstargzError::ChunkCoverage {
            name,
            reason: format!("the chunks hold {pos} bytes of a {}-byte file", file.size),
        });
    }
    // A file in one chunk: its whole-file digest is the chunk's digest.
    if let [only] = file.chunks.as_mut_slice()
        && only.chunk_digest.is_none()
    {
        only.chunk_digest = file.digest.take();
    }
    Ok(file)
}

// ---------------------------------------------------------------------------------------
// Chunks

/// Decode one chunk from `compressed`, the blob bytes starting at `chunk.offset` (normally
/// exactly [`Chunk::compressed_range`]; bytes past what the chunk needs are not read), and
/// verify it against its digest. Without a digest, the rest of the gzip member is read so
/// that its CRC is checked instead.
pub fn decode_chunk(compressed: &[u8], chunk: &Chunk) -> Result<Vec<u8>, EstargzError> {
    let decode = |source| EstargzError::ChunkDecode {
        offset: chunk.offset,
        source,
    };
    let truncated = |actual: u64| EstargzError::ChunkTruncated {
        offset: chunk.offset,
        expected: chunk.inner_offset.saturating_add(chunk.chunk_size),
        actual,
    };
    let mut gz = flate2::bufread::MultiGzDecoder::new(compressed);
    let skipped =
        io::copy(&mut (&mut gz).take(chunk.inner_offset), &mut io::sink()).map_err(decode)?;
    if skipped < chunk.inner_offset {
        return Err(truncated(skipped));
    }
    // Grow as data arrives rather than trusting the TOC's size for the allocation.
    let mut out = Vec::with_capacity(chunk.chunk_size.min(8 << 20) as usize);
    (&mut gz)
        .take(chunk.chunk_size)
        .read_to_end(&mut out)
        .map_err(decode)?;
    if (out.len() as u64) < chunk.chunk_size {
        return Err(truncated(
            chunk.inner_offset.saturating_add(out.len() as u64),
        ));
    }
    match &chunk.chunk_digest {
        Some(expected) => {
            expected
                .verify(&out)
                .map_err(|actual| EstargzError::ChunkDigestMismatch {
                    offset: chunk.offset,
                    expected: expected.clone(),
                    actual,
                })?;
        }
        None => {
            let limit = (compressed.len() as u64).saturating_mul(MAX_DEFLATE_RATIO);
            io::copy(&mut gz.take(limit), &mut io::sink()).map_err(decode)?;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// RFC 3339

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, as Go's `time.RFC3339` parses it.
fn parse_rfc3339(s: &str) -> Option<Timespec> {
    let b = s.as_bytes();
    let num = |r: Range<usize>| -> Option<i64> {
        let digits = b.get(r)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            digits
                .iter()
                .fold(0, |acc, &d| acc * 10 + i64::from(d - b'0')),
        )
    };
    let at = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut nsec: u32 = 0;
    if at(i, b".") {
        let start = i + 1;
        i = start;
        while at(i, b"0123456789") {
            i += 1;
        }
        if i == start {
            return None;
        }
        let mut scale = 100_000_000;
        for &d in &b[start..i.min(start + 9)] {
            nsec += u32::from(d - b'0') * scale;
            scale /= 10;
        }
    }
    let zone = if at(i, b"Zz") {
        i += 1;
        0
    } else if at(i, b"+-") && at(i + 3, b":") {
        let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
        if h > 23 || m > 59 {
            return None;
        }
        let sign = if b[i] == b'-' { -1 } else { 1 };
        i += 6;
        sign * (h * 3600 + m * 60)
    } else {
        return None;
    };
    if i != b.len() {
        return None;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(Timespec {
        sec: days * 86_400 + hour * 3600 + minute * 60 + second - zone,
        nsec,
    })
}

/// `sec` as `YYYY-MM-DDTHH:MM:SSZ` (years 0 to 9999).
fn format_rfc3339(sec: i64) -> String {
    let (days, rem) = (sec.div_euclid(86_400), sec.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------------------------------
// Writer

/// An eStargz writer for tests (unit and integration), laying members out as the reference
/// Go writer does. Not for production images: it buffers the whole blob in memory.
pub mod testing {
    use std::io::Write as _;

    use base64::Engine as _;
    use serde::Serialize;

    use super::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME, footer_bytes, format_rfc3339};
    use crate::layer::index::{Entry, EntryKind};
    use crate::oci::{Digest, Hasher};

    /// Which landmark file the writer adds.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Landmark {
        None,
        /// `.no.prefetch.landmark` first, as `ctr-remote image convert` writes.
        NoPrefetch,
        /// `.prefetch.landmark` after the first `after` entries (the prioritised ones).
        Prefetch {
            after: usize,
        },
    }

    #[derive(Clone, Copy, Debug)]
    pub struct WriterOptions {
        /// Largest chunk of file data per gzip member.
        pub chunk_size: u64,
        pub landmark: Landmark,
        /// Write the 47-byte legacy stargz footer.
        pub legacy_footer: bool,
    }

    /// A written blob and what a manifest would say about it.
    #[derive(Clone, Debug)]
    pub struct Written {
        pub blob: Vec<u8>,
        /// sha256 of the TOC JSON: the `toc.digest` annotation.
        pub toc_digest: Digest,
        /// sha256 of the uncompressed tar.
        pub diff_id: Digest,
        pub toc_offset: u64,
    }

    /// Write `entries` (each with its file content; ignored for non-files) as an eStargz
    /// blob with a `.no.prefetch.landmark`. Returns (blob, TOC digest, diff_id).
    pub fn write_estargz(
        entries: &[(Entry, Vec<u8>)],
        chunk_size: u64,
    ) -> (Vec<u8>, Digest, Digest) {
        let w = write_estargz_with(
            entries,
            &WriterOptions {
                chunk_size,
                landmark: Landmark::NoPrefetch,
                legacy_footer: false,
            },
        );
        (w.blob, w.toc_digest, w.diff_id)
    }

    /// Members: headers accumulate in the current member; each chunk of file data starts a
    /// new one; the tar padding after a file stays in its last chunk's member, followed by
    /// the next headers; the TOC entry gets a member of its own; then the footer.
    pub fn write_estargz_with(entries: &[(Entry, Vec<u8>)], options: &WriterOptions) -> Written {
        assert!(options.chunk_size > 0, "chunk_size must be positive");
        let landmark = |name: &str| {
            let mut e = Entry::new(name, EntryKind::File, 0);
            e.size = 1;
            (e, vec![0x0f])
        };
        let mut all: Vec<(Entry, Vec<u8>)> = entries.to_vec();
        match options.landmark {
            Landmark::None => {}
            Landmark::NoPrefetch => all.insert(0, landmark(NO_PREFETCH_LANDMARK)),
            Landmark::Prefetch { after } => {
                all.insert(after.min(all.len()), landmark(PREFETCH_LANDMARK))
            }
        }

        let mut w = Members::default();
        let mut toc = Vec::new();
        for (entry, content) in &all {
            let name = tar_name(entry);
            let bytes = tar_entry(entry, &name, content);
            let mut te = TocOut::new(&name, entry);
            let is_data = entry.kind == EntryKind::File && !content.is_empty();
            if !is_data {
                if entry.kind == EntryKind::File {
                    te.digest = Some(Digest::sha256(&[]).to_string());
                }
                w.write(&bytes);
                toc.push(te);
                continue;
            }
            let padded = content.len().div_ceil(512) * 512;
            let header_len = bytes.len() - padded;
            w.write(&bytes[..header_len]);
            te.size = Some(content.len() as u64);
            te.digest = Some(Digest::sha256(content).to_string());
            let mut pos = 0usize;
            let mut te = Some(te);
            while pos < content.len() {
                w.close();
                let remain = (content.len() - pos) as u64;
                let size = remain.min(options.chunk_size) as usize;
                let mut ce = te.take().unwrap_or_else(|| TocOut::chunk(&name));
                ce.offset = Some(w.blob.len() as u64);
                ce.chunk_offset = (pos > 0).then_some(pos as u64);
                // As the Go writer: chunkSize on full chunks only; the last runs to the end.
                ce.chunk_size = (remain >= options.chunk_size).then_some(size as u64);
                ce.chunk_digest = Some(Digest::sha256(&content[pos..pos + size]).to_string());
                w.write(&content[pos..pos + size]);
                toc.push(ce);
                pos += size;
            }
            w.write(&bytes[header_len + content.len()..]);
        }
        w.close();

        let toc_offset = w.blob.len() as u64;
        let json = serde_json::to_vec_pretty(&TocJson {
            version: 1,
            entries: toc,
        })
        .expect("TOC serialises");
        let toc_digest = Digest::sha256(&json);
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(json.len() as u64);
        header.set_mode(0o644);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut header, TOC_NAME, &json[..])
            .expect("TOC tar entry");
        w.write(&b.into_inner().expect("TOC tar"));
        w.close();
        w.blob
            .extend_from_slice(&footer_bytes(toc_offset, options.legacy_footer));
        Written {
            blob: w.blob,
            toc_digest,
            diff_id: w.diff.finish(),
            toc_offset,
        }
    }

    /// The blob so far, the open member, and the diff_id of everything written.
    struct Members {
        blob: Vec<u8>,
        current: Option<flate2::write::GzEncoder<Vec<u8>>>,
        diff: Hasher,
    }

    impl Default for Members {
        fn default() -> Members {
            Members {
                blob: Vec::new(),
                current: None,
                diff: Hasher::new(crate::oci::digest::Algorithm::Sha256),
            }
        }
    }

    impl Members {
        fn write(&mut self, bytes: &[u8]) {
            self.diff.update(bytes);
            self.current
                .get_or_insert_with(|| {
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best())
                })
                .write_all(bytes)
                .expect("writing to memory");
        }

        fn close(&mut self) {
            if let Some(gz) = self.current.take() {
                self.blob
                    .extend_from_slice(&gz.finish().expect("writing to memory"));
            }
        }
    }

    /// Tar names as umoci writes them: `./` for the root, a trailing `/` on directories.
    fn tar_name(entry: &Entry) -> String {
        let path = String::from_utf8_lossy(&entry.path).into_owned();
        match entry.kind {
            EntryKind::Dir if path.is_empty() => "./".into(),
            EntryKind::Dir => format!("{path}/"),
            _ => path,
        }
    }

    /// One entry as tar bytes: extension headers, header, content and padding.
    fn tar_entry(entry: &Entry, name: &str, content: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        if !entry.xattrs.is_empty() {
            let keys: Vec<String> = entry
                .xattrs
                .iter()
                .map(|x| format!("SCHILY.xattr.{}", String::from_utf8_lossy(&x.name)))
                .collect();
            b.append_pax_extensions(
                keys.iter()
                    .map(String::as_str)
                    .zip(entry.xattrs.iter().map(|x| x.value.as_slice())),
            )
            .expect("pax header");
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(entry.mode & 0o7777);
        h.set_uid(u64::from(entry.uid));
        h.set_gid(u64::from(entry.gid));
        h.set_mtime(entry.mtime.sec.max(0) as u64);
        let link = entry.link.as_deref().map(String::from_utf8_lossy);
        let kind = match entry.kind {
            EntryKind::File => tar::EntryType::Regular,
            EntryKind::Dir => tar::EntryType::Directory,
            EntryKind::Symlink => tar::EntryType::Symlink,
            EntryKind::Hardlink => tar::EntryType::Link,
            EntryKind::CharDev => tar::EntryType::Char,
            EntryKind::BlockDev => tar::EntryType::Block,
            EntryKind::Fifo => tar::EntryType::Fifo,
        };
        h.set_entry_type(kind);
        if matches!(entry.kind, EntryKind::CharDev | EntryKind::BlockDev) {
            h.set_device_major(entry.rdev.0).expect("device major");
            h.set_device_minor(entry.rdev.1).expect("device minor");
        }
        match (entry.kind, link) {
            (EntryKind::Symlink | EntryKind::Hardlink, Some(target)) => {
                h.set_size(0);
                b.append_link(&mut h, name, target.as_ref())
                    .expect("link entry");
            }
            (EntryKind::File, _) => {
                h.set_size(content.len() as u64);
                b.append_data(&mut h, name, content).expect("file entry");
            }
            _ => {
                h.set_size(0);
                b.append_data(&mut h, name, &[][..]).expect("entry");
            }
        }
        let mut bytes = b.into_inner().expect("tar to memory");
        // Drop the end-of-archive blocks that into_inner appends.
        bytes.truncate(bytes.len() - 1024);
        bytes
    }

    #[derive(Serialize)]
    struct TocJson {
        version: i64,
        entries: Vec<TocOut>,
    }

    #[derive(Serialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct TocOut {
        name: String,
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        modtime: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        link_name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        gid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dev_major: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dev_minor: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        xattrs: Option<std::collections::BTreeMap<String, String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        chunk_offset: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        chunk_size: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        chunk_digest: Option<String>,
    }

    impl TocOut {
        fn new(name: &str, e: &Entry) -> TocOut {
            let nonzero = |v: u32| (v != 0).then_some(v);
            let kind = match e.kind {
                EntryKind::File => "reg",
                EntryKind::Dir => "dir",
                EntryKind::Symlink => "symlink",
                EntryKind::Hardlink => "hardlink",
                EntryKind::CharDev => "char",
                EntryKind::BlockDev => "block",
                EntryKind::Fifo => "fifo",
            };
            let dev = matches!(e.kind, EntryKind::CharDev | EntryKind::BlockDev);
            TocOut {
                name: name.to_owned(),
                kind,
                modtime: (e.mtime.sec != 0).then(|| format_rfc3339(e.mtime.sec)),
                link_name: e
                    .link
                    .as_deref()
                    .map(|l| String::from_utf8_lossy(l).into_owned()),
                mode: nonzero(e.mode & 0o7777),
                uid: nonzero(e.uid),
                gid: nonzero(e.gid),
                dev_major: if dev { nonzero(e.rdev.0) } else { None },
                dev_minor: if dev { nonzero(e.rdev.1) } else { None },
                xattrs: (!e.xattrs.is_empty()).then(|| {
                    e.xattrs
                        .iter()
                        .map(|x| {
                            (
                                String::from_utf8_lossy(&x.name).into_owned(),
                                base64::engine::general_purpose::STANDARD.encode(&x.value),
                            )
                        })
                        .collect()
                }),
                ..TocOut::default()
            }
        }

        fn chunk(name: &str) -> TocOut {
            TocOut {
                name: name.to_owned(),
                kind: "chunk",
                ..TocOut::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Write as _;
    use std::path::PathBuf;

    use super::testing::{Landmark, WriterOptions, Written, write_estargz, write_estargz_with};
    use super::*;
    use crate::overlay::{Content, InodeId, ROOT, Tree, merge};

    // --- helpers ------------------------------------------------------------------------

    /// Footer, TOC and model of a whole in-memory blob.
    fn open(
        blob: &[u8],
        toc_digest: Option<&Digest>,
    ) -> Result<(Footer, Toc, LayerIndex, ChunkMap), EstargzError> {
        let footer = parse_footer(&blob[blob.len().saturating_sub(FOOTER_SIZE)..])?;
        let range = footer.toc_range(blob.len() as u64)?;
        let toc = parse_toc_member(&blob[range.start as usize..range.end as usize], toc_digest)?;
        let (index, chunks) = toc.to_layer(footer.toc_offset)?;
        Ok((footer, toc, index, chunks))
    }

    fn read_file(blob: &[u8], chunks: &[Chunk]) -> Result<Vec<u8>, EstargzError> {
        let mut out = Vec::new();
        for c in chunks {
            let r = c.compressed_range();
            out.extend(decode_chunk(&blob[r.start as usize..r.end as usize], c)?);
        }
        Ok(out)
    }

    fn gunzip_all(blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(blob)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn tar_index(blob: &[u8]) -> LayerIndex {
        crate::layer::tar::index_layer(&gunzip_all(blob)[..], None).unwrap()
    }

    fn fixtures_dir() -> PathBuf {
        match std::env::var_os("IMAGEFS_FIXTURES") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
        }
    }

    struct FixtureLayer {
        blob: Vec<u8>,
        toc_digest: Digest,
    }

    /// The layers of an OCI archive fixture, base first, with their `toc.digest`.
    fn fixture_layers(archive: &str) -> Vec<FixtureLayer> {
        let path = fixtures_dir().join(archive);
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (set IMAGEFS_FIXTURES)", path.display()));
        let mut files = HashMap::new();
        for entry in tar::Archive::new(file).entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            files.insert(name, data);
        }
        let blob = |digest: &str| -> Vec<u8> {
            let hex = digest.strip_prefix("sha256:").unwrap();
            files[&format!("blobs/sha256/{hex}")].clone()
        };
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap()))
                .unwrap();
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| FixtureLayer {
                blob: blob(l["digest"].as_str().unwrap()),
                toc_digest: l["annotations"][TOC_DIGEST_ANNOTATION]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap(),
            })
            .collect()
    }

    /// The merged tree in `expected-rootfs.txt`'s notation, file content read via chunks.
    fn render(tree: &Tree, layers: &[(&[u8], &ChunkMap)]) -> String {
        fn walk(
            tree: &Tree,
            id: InodeId,
            path: String,
            layers: &[(&[u8], &ChunkMap)],
            out: &mut Vec<(String, String)>,
        ) {
            let inode = tree.get(id).unwrap();
            let mode = format!("{:04o}", inode.meta.mode);
            let shown = if path.is_empty() {
                "/".to_owned()
            } else {
                path.clone()
            };
            let line = match &inode.content {
                Content::Dir { children, .. } => {
                    for (name, child) in children {
                        let name = String::from_utf8_lossy(name);
                        walk(tree, *child, format!("{path}/{name}"), layers, out);
                    }
                    format!("{shown} dir {mode} - -")
                }
                Content::File { size, layer, data } => {
                    let content = match data {
                        None => Vec::new(),
                        Some(d) => {
                            let (blob, map) = layers[*layer as usize];
                            read_file(blob, map.chunks(*d).unwrap()).unwrap()
                        }
                    };
                    assert_eq!(content.len() as u64, *size, "{shown}");
                    format!(
                        "{shown} file {mode} {size} {}",
                        Digest::sha256(&content).hex()
                    )
                }
                Content::Symlink { target } => format!(
                    "{shown} symlink {mode} {} {}",
                    target.len(),
                    String::from_utf8_lossy(target)
                ),
                other => panic!("{shown}: unexpected {other:?}"),
            };
            out.push((shown, line));
        }
        let mut lines = Vec::new();
        walk(tree, ROOT, String::new(), layers, &mut lines);
        lines.sort();
        lines.into_iter().map(|(_, l)| l + "\n").collect()
    }

    /// (blob offset, compressed length, offset in file, size) of each chunk of `path`.
    fn chunk_table(index: &LayerIndex, map: &ChunkMap, path: &str) -> Vec<(u64, u64, u64, u64)> {
        let entry = index
            .entries
            .iter()
            .find(|e| e.path == path.as_bytes())
            .unwrap();
        map.chunks(entry.data.unwrap())
            .unwrap()
            .iter()
            .map(|c| (c.offset, c.compressed_len, c.chunk_offset, c.chunk_size))
            .collect()
    }

    // --- the reference tool's output ----------------------------------------------------

    #[test]
    fn fixtures_match_the_expected_rootfs() {
        let expected = std::fs::read_to_string(fixtures_dir().join("expected-rootfs.txt")).unwrap();
        let cases: &[(&str, [u64; 2])] = &[
            ("busybox-estargz.oci.tar", [2388697, 0x14b]),
            ("busybox-estargz-opt.oci.tar", [2388138, 0x14b]),
        ];
        for (archive, toc_offsets) in cases {
            let layers = fixture_layers(archive);
            assert_eq!(layers.len(), 2, "{archive}");
            let mut opened = Vec::new();
            for (layer, want_offset) in layers.iter().zip(toc_offsets) {
                let (footer, toc, index, map) = open(&layer.blob, Some(&layer.toc_digest))
                    .unwrap_or_else(|e| panic!("{archive}: {e}"));
                assert_eq!(footer.toc_offset, *want_offset, "{archive}");
                assert_eq!(footer.size, FOOTER_SIZE as u64);
                assert_eq!(toc.digest, layer.toc_digest);
                // The writer lays the footer out byte for byte as the Go tool does.
                assert_eq!(
                    footer_bytes(footer.toc_offset, false),
                    layer.blob[layer.blob.len() - FOOTER_SIZE..]
                );
                // Same model as the tar indexer over the whole decompressed blob.
                assert_eq!(index, tar_index(&layer.blob), "{archive}");
                // Every chunk decodes and verifies.
                for (_, chunks) in map.iter() {
                    for c in chunks {
                        assert!(c.chunk_digest.is_some(), "{archive}: {c:?}");
                    }
                    read_file(&layer.blob, chunks).unwrap();
                }
                assert!(
                    index
                        .entries
                        .iter()
                        .all(|e| !ESTARGZ_META_NAMES.contains(&e.path.as_slice()))
                );
                opened.push((toc, index, map));
            }
            let indexes: Vec<LayerIndex> = opened.iter().map(|(_, i, _)| i.clone()).collect();
            let tree = merge(&indexes).unwrap();
            let views: Vec<(&[u8], &ChunkMap)> = layers
                .iter()
                .zip(&opened)
                .map(|(l, (_, _, m))| (l.blob.as_slice(), m))
                .collect();
            assert_eq!(render(&tree, &views), expected, "{archive}");
            // Layer 2 keeps its whiteout as an ordinary name.
            assert!(
                opened[1]
                    .1
                    .entries
                    .iter()
                    .any(|e| e.path == b"data/.wh.deleted.txt")
            );
            assert!(opened[1].0.has_no_prefetch_landmark());
            assert_eq!(opened[1].0.prefetch_landmark_offset(), None);
        }
    }

    #[test]
    fn fixture_chunks_match_the_readme() {
        let layers = fixture_layers("busybox-estargz.oci.tar");
        let (_, toc, index, map) = open(&layers[0].blob, Some(&layers[0].toc_digest)).unwrap();
        assert!(toc.has_no_prefetch_landmark());
        assert_eq!(toc.prefetch_landmark_offset(), None);
        let mib = 1 << 20;
        // (blob offset, compressed length, offset in file, size) of each chunk.
        type Row = (u64, u64, u64, u64);
        let cases: &[(&str, &[Row])] = &[
            (
                "bin/busybox",
                &[(217, 537500, 0, mib), (537717, 526452, mib, 933680)],
            ),
            (
                "data/big.txt",
                &[
                    (1064169, 91528, 0, mib),
                    (1155697, 91507, mib, mib),
                    // Up to the next data offset: this range also holds the member with
                    // data/deleted.txt's tar header.
                    (1247204, 1338925 - 1247204, 2 * mib, mib),
                ],
            ),
            ("data/random.bin", &[(1339199, 1049011, 0, mib)]),
        ];
        for (path, want) in cases {
            assert_eq!(chunk_table(&index, &map, path), *want, "{path}");
        }
        let empty = index
            .entries
            .iter()
            .find(|e| e.path == b"data/empty.txt")
            .unwrap();
        assert_eq!((empty.size, empty.data), (0, None));
        // Ids as the tar indexer numbers them: the landmark took id 0.
        let busybox = index
            .entries
            .iter()
            .find(|e| e.path == b"bin/busybox")
            .unwrap();
        assert_eq!(busybox.data, Some(DataRef { id: 1 }));

        // A read of big.txt's lines 16384..16386 spans the first two chunks.
        let big = index
            .entries
            .iter()
            .find(|e| e.path == b"data/big.txt")
            .unwrap();
        let data = big.data.unwrap();
        let spanning = map.chunks_in(data, mib - 64..mib + 64);
        assert_eq!(spanning.len(), 2);
        let c = map.chunk_at(data, mib).unwrap();
        assert_eq!(c.offset, 1155697);
        let r = c.compressed_range();
        let bytes = decode_chunk(&layers[0].blob[r.start as usize..r.end as usize], c).unwrap();
        assert!(
            bytes.starts_with(b"big.txt line 016385 of 049152 at offset 01048576"),
            "{:?}",
            String::from_utf8_lossy(&bytes[..64])
        );
    }

    #[test]
    fn optimised_fixture_has_a_prefetch_region() {
        let layers = fixture_layers("busybox-estargz-opt.oci.tar");
        let (_, toc, index, map) = open(&layers[0].blob, Some(&layers[0].toc_digest)).unwrap();
        assert_eq!(toc.prefetch_landmark_offset(), Some(1063890));
        assert!(!toc.has_no_prefetch_landmark());
        assert_eq!(
            chunk_table(&index, &map, "bin/busybox"),
            [(127, 1063676 - 127, 0, 1982256)]
        );
        // The prioritised files lie inside the prefetch region; the others after it.
        for (path, inside) in [
            ("bin/busybox", true),
            ("etc/os-release", true),
            ("etc/passwd", false),
        ] {
            let chunks = chunk_table(&index, &map, path);
            let end = chunks[0].0 + chunks[0].1;
            assert_eq!(end <= 1063890, inside, "{path}");
        }
    }

    // --- footer -------------------------------------------------------------------------

    #[test]
    fn footers() {
        let good = footer_bytes(0x1234_5678, false);
        assert_eq!(good.len(), FOOTER_SIZE);
        assert_eq!(
            parse_footer(&good).unwrap(),
            Footer {
                toc_offset: 0x1234_5678,
                size: 51
            }
        );
        // Bytes before the footer do not matter.
        let mut longer = vec![7u8; 100];
        longer.extend(&good);
        assert_eq!(parse_footer(&longer).unwrap().toc_offset, 0x1234_5678);

        let legacy = footer_bytes(0xabc, true);
        assert_eq!(legacy.len(), LEGACY_FOOTER_SIZE);
        let f = parse_footer(&legacy).unwrap();
        assert_eq!((f.toc_offset, f.size, f.is_legacy()), (0xabc, 47, true));
        let mut longer = vec![0u8; 4];
        longer.extend(&legacy);
        assert_eq!(parse_footer(&longer).unwrap().toc_offset, 0xabc);

        type Mutation = fn(&mut Vec<u8>);
        let cases: &[(&str, Mutation, &str)] = &[
            ("magic", |f| f[0] = 0, "no gzip magic"),
            ("method", |f| f[2] = 7, "not deflate"),
            ("flags", |f| f[3] |= 0x08, "expected only FEXTRA"),
            ("no extra", |f| f[3] = 0, "expected only FEXTRA"),
            ("xlen", |f| f[10] = 27, "Extra field is 27 bytes"),
            ("subfield id", |f| f[13] = b'X', "subfield id"),
            ("subfield len", |f| f[14] = 23, "subfield is 23 bytes"),
            ("magic string", |f| f[37] = b'Y', "no STARGZ magic"),
            ("hex", |f| f[20] = b'z', "not 16 hex digits"),
            (
                "int64",
                |f| f[16..32].copy_from_slice(b"ffffffffffffffff"),
                "does not fit in int64",
            ),
            ("crc", |f| f[46] = 1, "footer gzip member"),
            ("isize", |f| f[50] = 1, "footer gzip member"),
            ("not empty", |f| f[39] = 0x01, "footer gzip member"),
            ("short", |f| f.truncate(46), "46 bytes given"),
        ];
        for (what, mutate, want) in cases {
            let mut f = good.clone();
            mutate(&mut f);
            let err = parse_footer(&f).unwrap_err();
            assert!(matches!(err, EstargzError::Footer { .. }), "{what}");
            let msg = err.to_string();
            assert!(msg.contains(want), "{what}: {msg}");
            assert!(msg.contains("fetch it whole"), "{what}: {msg}");
        }
        let mut bad_legacy = legacy.clone();
        bad_legacy[33] = b'Y';
        let msg = parse_footer(&bad_legacy).unwrap_err().to_string();
        assert!(
            msg.contains("legacy stargz footer: no STARGZ magic"),
            "{msg}"
        );
    }

    #[test]
    fn toc_ranges() {
        let f = Footer {
            toc_offset: 100,
            size: 51,
        };
        assert_eq!(f.toc_range(200).unwrap(), 100..149);
        for blob_size in [151, 100, 10] {
            let err = f.toc_range(blob_size).unwrap_err();
            assert!(
                matches!(err, EstargzError::TocOffset { .. }),
                "{blob_size}: {err}"
            );
        }
        let err = Footer {
            toc_offset: 0,
            size: 51,
        }
        .toc_range(MAX_TOC_MEMBER_SIZE + 52)
        .unwrap_err();
        assert!(
            matches!(err, EstargzError::TocMemberTooLarge { .. }),
            "{err}"
        );
    }

    // --- RFC 3339 -----------------------------------------------------------------------

    #[test]
    fn rfc3339_times() {
        let cases: &[(&str, Option<(i64, u32)>)] = &[
            ("2024-01-01T00:00:00Z", Some((1_704_067_200, 0))),
            ("1970-01-01T00:00:00Z", Some((0, 0))),
            ("1969-12-31T23:59:59Z", Some((-1, 0))),
            ("0001-01-01T00:00:00Z", Some((-62_135_596_800, 0))),
            ("2024-02-29T12:34:56.5Z", Some((1_709_210_096, 500_000_000))),
            (
                "2024-02-29T12:34:56.1234567891Z",
                Some((1_709_210_096, 123_456_789)),
            ),
            ("2024-01-01T01:00:00+01:00", Some((1_704_067_200, 0))),
            ("2023-12-31T19:00:00-05:00", Some((1_704_067_200, 0))),
            ("2024-01-01t00:00:00z", Some((1_704_067_200, 0))),
            ("2023-02-29T00:00:00Z", None),
            ("2024-01-01 00:00:00Z", None),
            ("2024-01-01T00:00:00", None),
            ("2024-13-01T00:00:00Z", None),
            ("2024-01-01T24:00:00Z", None),
            ("2024-01-01T00:00:60Z", None),
            ("2024-01-01T00:00:00.Z", None),
            ("2024-01-01T00:00:00Zx", None),
            ("2024-01-01T00:00:00+0100", None),
            ("+024-01-01T00:00:00Z", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = parse_rfc3339(input).map(|t| (t.sec, t.nsec));
            assert_eq!(got, *want, "{input}");
        }
        for sec in [
            0,
            1,
            -1,
            1_704_067_200,
            1_709_210_096,
            253_402_300_799,
            -62_135_596_800,
        ] {
            let text = format_rfc3339(sec);
            assert_eq!(parse_rfc3339(&text).map(|t| t.sec), Some(sec), "{text}");
        }
        assert_eq!(format_rfc3339(1_704_067_200), "2024-01-01T00:00:00Z");
    }

    // --- writer round trip --------------------------------------------------------------

    const CHUNK: u64 = 64 << 10;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (x >> 56) as u8
            })
            .collect()
    }

    fn entry(path: &str, kind: EntryKind, mode: u32) -> Entry {
        let mut e = Entry::new(path, kind, mode);
        e.mtime.sec = 1_704_067_200;
        e
    }

    fn xattr(name: &str, value: &[u8]) -> Xattr {
        Xattr {
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
        }
    }

    /// A layer with every kind of entry; file sizes are filled in from the content.
    fn sample() -> Vec<(Entry, Vec<u8>)> {
        let mut v = Vec::new();
        let mut push = |e: Entry, content: Vec<u8>| v.push((e, content));
        push(entry("", EntryKind::Dir, 0o755), vec![]);
        let mut d = entry("dir", EntryKind::Dir, 0o750);
        d.xattrs = vec![xattr("user.a", b"1"), xattr("user.empty", b"")];
        push(d, vec![]);
        let mut big = entry("dir/big", EntryKind::File, 0o4755);
        (big.uid, big.gid) = (1000, 1001);
        push(big, noise(2 * CHUNK as usize + 1000, 1));
        let mut hard = entry("dir/hard", EntryKind::Hardlink, 0o4755);
        hard.link = Some(b"dir/big".to_vec());
        push(hard, vec![]);
        push(Entry::new("dir/.wh.gone", EntryKind::File, 0), vec![]);
        push(entry("opq", EntryKind::Dir, 0o755), vec![]);
        push(Entry::new("opq/.wh..wh..opq", EntryKind::File, 0), vec![]);
        let mut link = entry("link", EntryKind::Symlink, 0o777);
        link.link = Some(b"../x/y".to_vec());
        push(link, vec![]);
        push(entry("empty", EntryKind::File, 0o644), vec![]);
        push(entry("dev", EntryKind::Dir, 0o755), vec![]);
        let mut null = entry("dev/null", EntryKind::CharDev, 0o666);
        null.rdev = (1, 3);
        push(null, vec![]);
        let mut sda = entry("dev/sda", EntryKind::BlockDev, 0o660);
        sda.rdev = (8, 0);
        push(sda, vec![]);
        push(entry("fifo", EntryKind::Fifo, 0o600), vec![]);
        let mut cap = entry("cap", EntryKind::File, 0o755);
        cap.xattrs = vec![xattr("security.capability", b"\x01\x00\x00\x02\xff")];
        push(cap, b"ping".to_vec());
        push(
            entry("exact", EntryKind::File, 0o644),
            noise(CHUNK as usize, 2),
        );
        let long = format!("{}/file", "d".repeat(150));
        push(entry(&long, EntryKind::File, 0o644), b"long name".to_vec());
        for (e, content) in &mut v {
            e.size = content.len() as u64;
        }
        v
    }

    /// What the index of `entries` must be when the writer put a landmark (which takes an
    /// id but is not in the index) before entry `landmark_at`.
    fn expected_index(entries: &[(Entry, Vec<u8>)], landmark_at: Option<usize>) -> LayerIndex {
        let mut id = 0;
        let entries = entries
            .iter()
            .enumerate()
            .map(|(i, (e, content))| {
                if landmark_at == Some(i) {
                    id += 1;
                }
                let mut e = e.clone();
                if !content.is_empty() {
                    e.data = Some(DataRef { id });
                    id += 1;
                }
                e
            })
            .collect();
        LayerIndex { entries }
    }

    #[test]
    fn writer_round_trip() {
        let input = sample();
        let (blob, toc_digest, diff_id) = write_estargz(&input, CHUNK);
        let (footer, toc, index, map) = open(&blob, Some(&toc_digest)).unwrap();
        assert!(!footer.is_legacy());
        assert_eq!(toc.digest, toc_digest);
        assert_eq!(Digest::sha256(&gunzip_all(&blob)), diff_id);
        assert!(toc.has_no_prefetch_landmark());
        // The landmark comes first and takes id 0, as with the tar indexer.
        assert_eq!(index, expected_index(&input, Some(0)));
        assert_eq!(index, tar_index(&blob));

        for ((e, content), got) in input.iter().zip(&index.entries) {
            let Some(data) = got.data else { continue };
            let chunks = map.chunks(data).unwrap();
            assert_eq!(read_file(&blob, chunks).unwrap(), *content, "{:?}", e.path);
            assert!(chunks.iter().all(|c| c.chunk_digest.is_some()));
        }
        assert_eq!(map.len(), 4);
        let big = index.entries[2].data.unwrap();
        let table: Vec<_> = map
            .chunks(big)
            .unwrap()
            .iter()
            .map(|c| (c.chunk_offset, c.chunk_size))
            .collect();
        assert_eq!(table, [(0, CHUNK), (CHUNK, CHUNK), (2 * CHUNK, 1000)]);

        // Lookups by file position.
        assert_eq!(map.chunk_at(big, 0).unwrap().chunk_offset, 0);
        assert_eq!(map.chunk_at(big, CHUNK - 1).unwrap().chunk_offset, 0);
        assert_eq!(map.chunk_at(big, CHUNK).unwrap().chunk_offset, CHUNK);
        assert_eq!(
            map.chunk_at(big, 2 * CHUNK + 999).unwrap().chunk_offset,
            2 * CHUNK
        );
        assert!(map.chunk_at(big, 2 * CHUNK + 1000).is_none());
        assert_eq!(map.chunks_in(big, 0..1).len(), 1);
        assert_eq!(map.chunks_in(big, CHUNK - 1..CHUNK + 1).len(), 2);
        assert_eq!(map.chunks_in(big, 0..u64::MAX).len(), 3);
        assert_eq!(map.chunks_in(big, 5..5).len(), 0);
        assert_eq!(map.chunks_in(big, 3 * CHUNK..4 * CHUNK).len(), 0);
        assert!(
            map.chunks(DataRef { id: 0 }).is_none(),
            "the landmark has no chunks"
        );

        // The chunk map survives serialisation (for a cache index).
        let json = serde_json::to_string(&map).unwrap();
        assert_eq!(serde_json::from_str::<ChunkMap>(&json).unwrap(), map);
    }

    #[test]
    fn writer_variants() {
        let input = sample();
        let legacy = write_estargz_with(
            &input,
            &WriterOptions {
                chunk_size: CHUNK,
                landmark: Landmark::None,
                legacy_footer: true,
            },
        );
        let (footer, toc, index, _) = open(&legacy.blob, Some(&legacy.toc_digest)).unwrap();
        assert_eq!((footer.size, footer.toc_offset), (47, legacy.toc_offset));
        assert!(!toc.has_no_prefetch_landmark());
        assert_eq!(toc.prefetch_landmark_offset(), None);
        assert_eq!(index, expected_index(&input, None));
        assert_eq!(index, tar_index(&legacy.blob));

        // Prioritise the first three entries (root, dir, dir/big).
        let opt = write_estargz_with(
            &input,
            &WriterOptions {
                chunk_size: CHUNK,
                landmark: Landmark::Prefetch { after: 3 },
                legacy_footer: false,
            },
        );
        let (_, toc, index, map) = open(&opt.blob, Some(&opt.toc_digest)).unwrap();
        let landmark = toc.prefetch_landmark_offset().unwrap();
        assert!(!toc.has_no_prefetch_landmark());
        assert_eq!(index, expected_index(&input, Some(3)));
        assert_eq!(index, tar_index(&opt.blob));
        for (data, chunks) in map.iter() {
            let last = chunks.last().unwrap();
            let in_region = last.offset + last.compressed_len <= landmark;
            assert_eq!(in_region, data.id == 0, "{data:?}");
        }
    }

    // --- errors -------------------------------------------------------------------------

    /// The TOC JSON of a written blob.
    fn toc_value(w: &Written) -> serde_json::Value {
        let member = &w.blob[w.toc_offset as usize..w.blob.len() - FOOTER_SIZE];
        serde_json::from_slice(&toc_json(member).unwrap()).unwrap()
    }

    /// A TOC member (gzip of a tar holding `name` with `json`).
    fn toc_member(name: &str, json: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_size(json.len() as u64);
        h.set_mode(0o644);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut h, name, json).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&b.into_inner().unwrap()).unwrap();
        gz.finish().unwrap()
    }

    /// `w`'s blob with its TOC replaced by `f(toc)`; returns the blob and the new digest.
    fn with_toc(w: &Written, f: impl FnOnce(&mut serde_json::Value)) -> (Vec<u8>, Digest) {
        let mut toc = toc_value(w);
        f(&mut toc);
        let json = serde_json::to_vec(&toc).unwrap();
        let mut blob = w.blob[..w.toc_offset as usize].to_vec();
        blob.extend(toc_member(TOC_NAME, &json));
        blob.extend(footer_bytes(w.toc_offset, false));
        (blob, Digest::sha256(&json))
    }

    fn written() -> Written {
        write_estargz_with(
            &sample(),
            &WriterOptions {
                chunk_size: CHUNK,
                landmark: Landmark::NoPrefetch,
                legacy_footer: false,
            },
        )
    }

    /// Index in the TOC JSON of the n-th entry named `name`.
    fn find(toc: &serde_json::Value, name: &str, nth: usize) -> usize {
        toc["entries"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, e)| e["name"] == name)
            .nth(nth)
            .unwrap()
            .0
    }

    #[test]
    fn rewritten_toc_is_still_valid() {
        let w = written();
        let (blob, digest) = with_toc(&w, |_| {});
        let (_, _, index, _) = open(&blob, Some(&digest)).unwrap();
        assert_eq!(index, expected_index(&sample(), Some(0)));
    }

    #[test]
    fn malformed_tocs_are_rejected() {
        let w = written();
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "overlapping chunks",
                Box::new(|t| {
                    let first = find(t, "dir/big", 0);
                    t["entries"][first + 1]["offset"] = t["entries"][first]["offset"].clone();
                }),
                "overlaps or precedes",
            ),
            (
                "offsets going backwards",
                Box::new(|t| {
                    let first = find(t, "dir/big", 0);
                    t["entries"][first + 2]["offset"] = t["entries"][first]["offset"].clone();
                }),
                "overlaps or precedes",
            ),
            (
                "offset at the TOC",
                Box::new(move |t| {
                    let i = find(t, "exact", 0);
                    t["entries"][i]["offset"] = w_toc_offset().into();
                }),
                "is not before the TOC",
            ),
            (
                "offset beyond the TOC",
                Box::new(|t| {
                    let i = find(t, "cap", 0);
                    t["entries"][i]["offset"] = (1u64 << 40).into();
                }),
                "is not before the TOC",
            ),
            (
                "chunk after a directory",
                Box::new(|t| {
                    let i = find(t, "opq/", 0);
                    let chunk = serde_json::json!({"name": "opq/", "type": "chunk", "offset": 10, "chunkOffset": 5, "chunkSize": 5});
                    t["entries"].as_array_mut().unwrap().insert(i + 1, chunk);
                }),
                "follows no regular file",
            ),
            (
                "chunk named after another file",
                Box::new(|t| {
                    let i = find(t, "dir/big", 1);
                    t["entries"][i]["name"] = "cap".into();
                }),
                "follows no regular file",
            ),
            (
                "chunk gap",
                Box::new(|t| {
                    let i = find(t, "dir/big", 1);
                    t["entries"][i]["chunkOffset"] = (CHUNK + 1).into();
                }),
                "chunk 1 starts at 65537",
            ),
            (
                "missing last chunk",
                Box::new(|t| {
                    let i = find(t, "dir/big", 2);
                    t["entries"].as_array_mut().unwrap().remove(i);
                }),
                "do not cover the file exactly",
            ),
            (
                "file larger than its chunks",
                Box::new(|t| {
                    let i = find(t, "exact", 0);
                    t["entries"][i]["size"] = (CHUNK + 1).into();
                }),
                "hold 65536 bytes of a 65537-byte file",
            ),
            (
                "first chunk not at 0",
                Box::new(|t| {
                    let i = find(t, "cap", 0);
                    t["entries"][i]["chunkOffset"] = 1.into();
                }),
                "first chunk of a file starts at 1",
            ),
            (
                "data without offset",
                Box::new(|t| {
                    let i = find(t, "cap", 0);
                    t["entries"][i].as_object_mut().unwrap().remove("offset");
                }),
                "without an offset",
            ),
            (
                "impossible chunk size",
                Box::new(|t| {
                    let i = find(t, "cap", 0);
                    t["entries"][i]["size"] = (1u64 << 40).into();
                    t["entries"][i]["chunkSize"] = (1u64 << 40).into();
                }),
                "cannot come from",
            ),
            (
                "hardlink without target",
                Box::new(|t| {
                    let i = find(t, "dir/hard", 0);
                    t["entries"][i].as_object_mut().unwrap().remove("linkName");
                }),
                "hardlink without a linkName",
            ),
        ];
        for (what, edit, want) in cases {
            let (blob, digest) = with_toc(&w, edit);
            let err = open(&blob, Some(&digest)).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(want), "{what}: {msg}");
            assert!(msg.contains("fetch the layer whole"), "{what}: {msg}");
        }
    }

    /// The TOC offset of `written()`, which is deterministic.
    fn w_toc_offset() -> u64 {
        written().toc_offset
    }

    #[test]
    fn bad_toc_json_is_rejected() {
        let w = written();
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "version",
                Box::new(|t| t["version"] = 2.into()),
                "version 2 is not supported",
            ),
            (
                "no version",
                Box::new(|t| {
                    t.as_object_mut().unwrap().remove("version");
                }),
                "version 0",
            ),
            (
                "type",
                Box::new(|t| t["entries"][1]["type"] = "socket".into()),
                "unknown type \"socket\"",
            ),
            (
                "modtime",
                Box::new(|t| t["entries"][1]["modtime"] = "yesterday".into()),
                "not RFC 3339",
            ),
            (
                "uid",
                Box::new(|t| t["entries"][1]["uid"] = (1u64 << 32).into()),
                "uid 4294967296",
            ),
            (
                "digest",
                Box::new(|t| t["entries"][0]["chunkDigest"] = "md5:00".into()),
                "chunkDigest",
            ),
            (
                "xattr",
                Box::new(|t| {
                    let i = find(t, "cap", 0);
                    t["entries"][i]["xattrs"]["security.capability"] = "!!".into();
                }),
                "not base64",
            ),
            (
                "negative size",
                Box::new(|t| t["entries"][0]["size"] = (-1).into()),
                "parsing the eStargz TOC JSON",
            ),
            (
                "entries",
                Box::new(|t| t["entries"] = "x".into()),
                "parsing the eStargz TOC JSON",
            ),
        ];
        for (what, edit, want) in cases {
            let (blob, digest) = with_toc(&w, edit);
            let msg = open(&blob, Some(&digest)).unwrap_err().to_string();
            assert!(msg.contains(want), "{what}: {msg}");
        }

        // Null and absent optional values are accepted, as Go writes them.
        let (blob, digest) = with_toc(&w, |t| {
            t["entries"] = serde_json::json!([
                {"name": "a", "type": "dir", "xattrs": {"user.nil": null}, "digest": "", "modtime": ""},
            ]);
        });
        let (_, _, index, map) = open(&blob, Some(&digest)).unwrap();
        assert_eq!(index.entries[0].xattrs, [xattr("user.nil", b"")]);
        assert!(map.is_empty());
        let (blob, digest) = with_toc(&w, |t| t["entries"] = serde_json::Value::Null);
        assert!(open(&blob, Some(&digest)).unwrap().2.entries.is_empty());
    }

    #[test]
    fn toc_member_errors() {
        let w = written();
        let member = &w.blob[w.toc_offset as usize..w.blob.len() - FOOTER_SIZE];
        assert!(parse_toc_member(member, None).is_ok());

        let wrong = Digest::sha256(b"something else");
        match parse_toc_member(member, Some(&wrong)).unwrap_err() {
            EstargzError::TocDigestMismatch { expected, actual } => {
                assert_eq!(expected, wrong);
                assert_eq!(actual, w.toc_digest);
            }
            other => panic!("{other}"),
        }

        let err = parse_toc_member(&toc_member("other.json", b"{}"), None).unwrap_err();
        assert!(
            matches!(err, EstargzError::TocName { ref name } if name == "other.json"),
            "{err}"
        );

        // A corrupt CRC is caught by reading the whole member.
        let mut corrupt = member.to_vec();
        let n = corrupt.len();
        corrupt[n - 6] ^= 0xff;
        let err = parse_toc_member(&corrupt, None).unwrap_err();
        assert!(matches!(err, EstargzError::TocMember { .. }), "{err}");

        let err = parse_toc_member(&member[..member.len() / 2], None).unwrap_err();
        assert!(matches!(err, EstargzError::TocMember { .. }), "{err}");
        let err = parse_toc_member(b"not gzip at all", None).unwrap_err();
        assert!(matches!(err, EstargzError::TocMember { .. }), "{err}");

        // A header claiming a huge TOC is refused before anything is read or allocated.
        let mut h = tar::Header::new_ustar();
        h.set_path(TOC_NAME).unwrap();
        h.set_size(MAX_TOC_JSON_SIZE + 1);
        h.set_cksum();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(h.as_bytes()).unwrap();
        let err = parse_toc_member(&gz.finish().unwrap(), None).unwrap_err();
        assert!(matches!(err, EstargzError::TocTooLarge { .. }), "{err}");
    }

    #[test]
    fn chunk_errors() {
        let w = written();
        let (_, _, index, map) = open(&w.blob, Some(&w.toc_digest)).unwrap();
        let big = index.entries.iter().find(|e| e.path == b"dir/big").unwrap();
        let chunk = map.chunks(big.data.unwrap()).unwrap()[1].clone();
        let r = chunk.compressed_range();
        let bytes = &w.blob[r.start as usize..r.end as usize];
        assert_eq!(decode_chunk(bytes, &chunk).unwrap().len() as u64, CHUNK);

        // Wrong digest in the (verified) TOC.
        let mut lying = chunk.clone();
        lying.chunk_digest = Some(Digest::sha256(b"x"));
        let err = decode_chunk(bytes, &lying).unwrap_err();
        assert!(
            matches!(err, EstargzError::ChunkDigestMismatch { .. }),
            "{err}"
        );

        // Corrupted compressed bytes: a decode or digest error, never silent data.
        for at in [bytes.len() / 2, 20, bytes.len() - 9] {
            let mut corrupt = bytes.to_vec();
            corrupt[at] ^= 0x55;
            let err = decode_chunk(&corrupt, &chunk).unwrap_err();
            assert!(
                matches!(
                    err,
                    EstargzError::ChunkDecode { .. }
                        | EstargzError::ChunkDigestMismatch { .. }
                        | EstargzError::ChunkTruncated { .. }
                ),
                "byte {at}: {err}"
            );
        }

        // Truncated range.
        let err = decode_chunk(&bytes[..bytes.len() / 2], &chunk).unwrap_err();
        assert!(
            matches!(
                err,
                EstargzError::ChunkDecode { .. } | EstargzError::ChunkTruncated { .. }
            ),
            "{err}"
        );

        // A chunk that claims more data than its member holds.
        let mut long = chunk.clone();
        long.chunk_digest = None;
        long.inner_offset = 2 * CHUNK;
        let err = decode_chunk(bytes, &long).unwrap_err();
        assert!(matches!(err, EstargzError::ChunkTruncated { .. }), "{err}");

        // Without a digest the member's CRC still protects the data.
        let mut unchecked = chunk.clone();
        unchecked.chunk_digest = None;
        assert!(decode_chunk(bytes, &unchecked).is_ok());
        let mut corrupt = bytes.to_vec();
        let n = corrupt.len();
        corrupt[n - 7] ^= 1;
        let err = decode_chunk(&corrupt, &unchecked).unwrap_err();
        assert!(matches!(err, EstargzError::ChunkDecode { .. }), "{err}");
    }

    #[test]
    fn inner_offsets_share_a_member() {
        // Two small files packed into one gzip member, as the innerOffset extension allows:
        // the second file's data follows the first's padding and its own header.
        let a = b"first file".to_vec();
        let b = b"second".to_vec();
        let mut member_plain = a.clone();
        member_plain.resize(512 + 512, 0); // padding + b's header (content irrelevant here)
        member_plain.extend(&b);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&member_plain).unwrap();
        let member = gz.finish().unwrap();
        let toc = Toc {
            version: 1,
            digest: Digest::sha256(b""),
            entries: [("a", &a, 0u64), ("b", &b, 1024u64)]
                .iter()
                .map(|(name, content, inner)| TocEntry {
                    name: (*name).into(),
                    kind: TocEntryType::Reg,
                    size: content.len() as u64,
                    mtime: Timespec::default(),
                    link_name: String::new(),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    user_name: String::new(),
                    group_name: String::new(),
                    dev_major: 0,
                    dev_minor: 0,
                    xattrs: vec![],
                    digest: None,
                    offset: 512,
                    chunk_offset: 0,
                    chunk_size: 0,
                    chunk_digest: Some(Digest::sha256(content)),
                    inner_offset: *inner,
                })
                .collect(),
        };
        let toc_offset = 512 + member.len() as u64;
        let (index, map) = toc.to_layer(toc_offset).unwrap();
        for (e, want) in index.entries.iter().zip([&a, &b]) {
            let chunks = map.chunks(e.data.unwrap()).unwrap();
            assert_eq!(chunks[0].compressed_len, member.len() as u64);
            assert_eq!(decode_chunk(&member, &chunks[0]).unwrap(), *want);
        }
        // The same inner range twice is an overlap.
        let mut twice = toc.clone();
        twice.entries[1].inner_offset = 5;
        let err = twice.to_layer(toc_offset).unwrap_err();
        assert!(matches!(err, EstargzError::Overlap { .. }), "{err}");
    }

    #[test]
    fn mutated_blobs_never_panic() {
        // Every single-byte change of a small blob's TOC member and footer, and every
        // truncation of the footer, ends in a value or an error: never a panic.
        let mut file = entry("f", EntryKind::File, 0o644);
        file.size = 3000;
        let input = vec![
            (entry("", EntryKind::Dir, 0o755), vec![]),
            (file, noise(3000, 3)),
        ];
        let w = write_estargz_with(
            &input,
            &WriterOptions {
                chunk_size: 1024,
                landmark: Landmark::NoPrefetch,
                legacy_footer: false,
            },
        );
        let start = w.toc_offset as usize;
        let mut outcomes = [0usize; 2];
        for at in start..w.blob.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut blob = w.blob.clone();
                blob[at] ^= flip;
                let result = open(&blob, None).and_then(|(_, _, index, map)| {
                    for (_, chunks) in map.iter() {
                        read_file(&blob, chunks)?;
                    }
                    Ok(index)
                });
                outcomes[usize::from(result.is_ok())] += 1;
            }
        }
        for len in 0..FOOTER_SIZE {
            assert!(
                parse_footer(&w.blob[w.blob.len() - len..]).is_err(),
                "{len}"
            );
        }
        // The gzip CRC and the footer checks catch nearly all of them.
        assert!(outcomes[0] > outcomes[1], "{outcomes:?}");
    }
}
