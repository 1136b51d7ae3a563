//! The table of contents: `stargz.index.json`, the last tar entry of the blob, alone in its
//! gzip member. [`parse_toc_member`] reads that member (checking its gzip CRC and, when the
//! manifest names one, the JSON's digest) into a typed [`Toc`], each entry checked on its
//! own (types, digests, times, ids); [`Toc::to_layer`] then checks how they fit together
//! and gives the [`LayerIndex`] the overlay merges and the [`ChunkMap`] reads use.

use std::collections::BTreeMap;
use std::io::{self, Read};

use base64::Engine as _;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::chunks::ChunkMapBuilder;
use super::{
    ChunkMap, EstargzError, MAX_TOC_JSON_SIZE, MAX_TOC_MEMBER_SIZE, NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK, TOC_NAME, is_meta_name,
};
use crate::layer::index::{DataRef, Entry, EntryKind, LayerIndex, Timespec, Xattr, clean_path};
use crate::oci::Digest;

/// Uncompressed bytes allowed in the TOC member besides the JSON (headers, padding, end).
const TOC_FRAMING_ALLOWANCE: u64 = 1 << 20;

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

impl From<EntryKind> for TocEntryType {
    fn from(kind: EntryKind) -> TocEntryType {
        match kind {
            EntryKind::Dir => TocEntryType::Dir,
            EntryKind::File => TocEntryType::Reg,
            EntryKind::Symlink => TocEntryType::Symlink,
            EntryKind::Hardlink => TocEntryType::Hardlink,
            EntryKind::CharDev => TocEntryType::Char,
            EntryKind::BlockDev => TocEntryType::Block,
            EntryKind::Fifo => TocEntryType::Fifo,
        }
    }
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
pub(super) fn toc_json(member: &[u8]) -> Result<Vec<u8>, EstargzError> {
    let read = |cause| EstargzError::TocMember { cause };
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
        serde_json::from_slice(json).map_err(|cause| EstargzError::TocJson { cause })?;
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

impl Toc {
    /// The layer as the overlay sees it, plus where each file's bytes are. `toc_offset` is
    /// [`Footer::toc_offset`](super::Footer::toc_offset): no data may start at or after it.
    ///
    /// Entries are in TOC order with paths cleaned like the tar indexer's; eStargz metadata
    /// files at the root are dropped. `DataRef` ids follow the tar indexer's numbering (every
    /// regular file with content takes the next id, the dropped metadata files included),
    /// so an id names the same file whichever way the layer was indexed.
    pub fn to_layer(&self, toc_offset: u64) -> Result<(LayerIndex, ChunkMap), EstargzError> {
        let mut entries = Vec::new();
        let mut chunks = ChunkMapBuilder::new(toc_offset);
        let mut next_id: u32 = 0;
        for (index, te) in self.entries.iter().enumerate() {
            let Some(kind) = te.kind.entry_kind() else {
                chunks.add_chunk(index, te)?;
                continue;
            };
            chunks.close_file(&self.entries)?;
            let mut entry = index_entry(index, te, kind)?;
            let keep = !is_meta_name(&entry.path);
            if kind == EntryKind::File && te.size > 0 {
                let id = next_id;
                next_id = next_id.checked_add(1).ok_or_else(|| {
                    entry_error(index, te, "more than 2^32 files in one layer".into())
                })?;
                entry.data = Some(DataRef { id });
                chunks.open_file(index, te, entry.path.clone(), id, keep)?;
            }
            if keep {
                entries.push(entry);
            }
        }
        let map = chunks.finish(&self.entries)?;
        Ok((LayerIndex::of(entries), map))
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

fn entry_error(index: usize, te: &TocEntry, reason: String) -> EstargzError {
    EstargzError::TocEntry {
        index,
        name: te.name.clone(),
        reason,
    }
}

/// The index entry of a TOC entry other than a `chunk`, without its data (the caller numbers
/// files with content).
fn index_entry(index: usize, te: &TocEntry, kind: EntryKind) -> Result<Entry, EstargzError> {
    let mut entry = Entry::new(
        clean_path(te.name.as_bytes()),
        kind,
        (te.mode & 0o7777) as u32,
    );
    entry.uid = te.uid;
    entry.gid = te.gid;
    entry.mtime = te.mtime;
    entry.xattrs = te.xattrs.clone();
    match kind {
        EntryKind::File => entry.size = te.size,
        // Verbatim: a symlink target is never cleaned or resolved.
        EntryKind::Symlink => entry.link = Some(te.link_name.clone().into_bytes()),
        EntryKind::Hardlink => {
            if te.link_name.is_empty() {
                return Err(entry_error(index, te, "hardlink without a linkName".into()));
            }
            entry.link = Some(clean_path(te.link_name.as_bytes()));
        }
        EntryKind::CharDev | EntryKind::BlockDev => entry.rdev = (te.dev_major, te.dev_minor),
        EntryKind::Dir | EntryKind::Fifo => {}
    }
    Ok(entry)
}

// ---------------------------------------------------------------------------------------
// `modtime`: RFC 3339, as Go reads and writes it

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, as Go's `time.RFC3339` parses it: the `time`
/// crate's RFC 3339 parser, plus the two rules where Go is stricter, checked by hand because
/// the crate has no switch for them. The crate takes any byte between date and time (RFC
/// 3339 §5.6 allows a space) and reads `23:59:60` at the end of a month as a leap second;
/// Go takes only `T` or `t`, and no second 60. A fraction longer than 9 digits is truncated
/// to nanoseconds by both.
pub(super) fn parse_rfc3339(s: &str) -> Option<Timespec> {
    let b = s.as_bytes();
    // The crate requires exactly four year digits, so the layout before the fraction is
    // fixed: the separator is byte 10 and the seconds are bytes 17..19.
    if !matches!(b.get(10), Some(b'T' | b't')) || b.get(17..19) == Some(b"60") {
        return None;
    }
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    Some(Timespec {
        sec: t.unix_timestamp(),
        nsec: t.nanosecond(),
    })
}

/// `sec` and `nsec` as `YYYY-MM-DDTHH:MM:SS[.fraction]Z`: whole seconds as Go's writer
/// formats `modtime`, a fraction only when there is one (Go's RFC 3339 parser reads it);
/// `None` outside the years 0 to 9999, which RFC 3339 cannot write.
pub(super) fn format_rfc3339(sec: i64, nsec: u32) -> Option<String> {
    let t = OffsetDateTime::from_unix_timestamp(sec).ok()?;
    t.replace_nanosecond(nsec).ok()?.format(&Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::layer::estargz::FOOTER_SIZE;
    use crate::layer::estargz::testutil::*;

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
            // A leap second where the `time` crate would take one: Go never does.
            ("2016-12-31T23:59:60Z", None),
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
            let text = format_rfc3339(sec, 0).unwrap();
            assert_eq!(parse_rfc3339(&text).map(|t| t.sec), Some(sec), "{text}");
            let text = format_rfc3339(sec, 123_456_789).unwrap();
            let t = parse_rfc3339(&text).unwrap();
            assert_eq!((t.sec, t.nsec), (sec, 123_456_789), "{text}");
        }
        assert_eq!(
            format_rfc3339(1_704_067_200, 0).unwrap(),
            "2024-01-01T00:00:00Z"
        );
        assert_eq!(
            format_rfc3339(1_704_067_200, 500_000_000).unwrap(),
            "2024-01-01T00:00:00.5Z"
        );
    }

    #[test]
    fn rewritten_toc_is_still_valid() {
        let w = written();
        let (blob, digest) = with_toc(&w, |_| {});
        let (_, _, index, _) = open(&blob, Some(&digest)).unwrap();
        assert_eq!(index, expected_index(&sample(), Some(0)));
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
}
