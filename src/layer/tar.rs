//! One pass over a layer's tar stream: every entry becomes an [`Entry`] of the
//! [`LayerIndex`], and the content of regular files is written to `data_dir`: small files
//! into its pack, the others to `data_dir/<id>` (see [`super::extract`]).
//!
//! Tar flavours: ustar, PAX (long names and link targets, `mtime` with nanoseconds,
//! `SCHILY.xattr.*`, large `size`/`uid`/`gid`), GNU long names and GNU sparse files (the
//! `tar` crate expands sparse data; zero runs are written back as holes). Names are kept as
//! raw bytes.
//!
//! Paths are cleaned lexically as if joined to `/` (Go's `filepath.Clean("/" + name)`, which
//! is what umoci and containerd do): absolute names are relative to the layer root and `..`
//! cannot climb above it. Nothing here touches the host outside `data_dir`, and data files
//! are named by number, never by the entry's name, so no tar entry can write elsewhere.

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tar::EntryType;

use super::estargz;
use super::extract::{Extractor, WriteError};
use super::index::{
    DataRef, Entry, EntryKind, LayerIndex, Packed, PackedAt, Timespec, Xattr, clean_path,
};

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading the layer tar")]
    Read {
        #[source]
        source: io::Error,
    },
    #[error("tar entry {path:?}: {message}")]
    Entry { path: String, message: String },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the layer has more than {max} entries (refused; `--max-entries` raises the limit)")]
    TooManyEntries { max: u64 },
}

/// [`index_layer_bounded`] with the default entry limit ([`super::decompress::MAX_ENTRIES`]).
pub fn index_layer<R: Read>(reader: R, data_dir: Option<&Path>) -> Result<LayerIndex, TarError> {
    index_layer_bounded(reader, data_dir, super::decompress::MAX_ENTRIES)
}

/// Index `reader` (an uncompressed tar stream) and, when `data_dir` is given, extract file
/// contents into it; more than `max_entries` entries is an error. Reads up to the tar
/// end-of-archive marker; the caller drains the rest of the stream (to hash all of it for the
/// diff_id).
pub fn index_layer_bounded<R: Read>(
    reader: R,
    data_dir: Option<&Path>,
    max_entries: u64,
) -> Result<LayerIndex, TarError> {
    let mut archive = tar::Archive::new(reader);
    let mut entries = Vec::new();
    let mut out = data_dir.map(Extractor::new);
    let mut packed = Vec::new();
    let mut seen: u64 = 0;
    let mut next_id: u32 = 0;
    let iter = archive
        .entries()
        .map_err(|source| TarError::Read { source })?;
    for item in iter {
        let mut te = item.map_err(|source| TarError::Read { source })?;
        // Every tar entry counts, also the kinds skipped below.
        seen += 1;
        if seen > max_entries {
            return Err(TarError::TooManyEntries { max: max_entries });
        }
        let raw_path = te.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let bad = |message: String| TarError::Entry {
            path: shown.clone(),
            message,
        };
        let Some(kind) = entry_kind(&te, &shown) else {
            continue;
        };
        let (mut entry, sparse) = entry_metadata(&mut te, clean_path(&raw_path), kind, &bad)?;
        match kind {
            EntryKind::Symlink => {
                // Verbatim: a symlink target is never cleaned or resolved.
                entry.link = Some(
                    te.link_name_bytes()
                        .map(|l| l.into_owned())
                        .unwrap_or_default(),
                );
            }
            EntryKind::Hardlink => {
                let target = te
                    .link_name_bytes()
                    .ok_or_else(|| bad("hardlink without a target".into()))?;
                entry.link = Some(clean_path(&target));
            }
            EntryKind::CharDev | EntryKind::BlockDev => {
                let major = te.header().device_major().ok().flatten().unwrap_or(0);
                let minor = te.header().device_minor().ok().flatten().unwrap_or(0);
                entry.rdev = (major, minor);
            }
            EntryKind::File => {
                let id = next_id;
                let to = data_dir.zip(out.as_mut());
                let (size, at) = file_content(&mut te, to, DataRef { id }, sparse, &bad)?;
                entry.size = size;
                if entry.size > 0 {
                    entry.data = Some(DataRef { id });
                    packed.push(at);
                    next_id = next_id
                        .checked_add(1)
                        .ok_or_else(|| bad("more than 2^32 files in one layer".into()))?;
                }
            }
            EntryKind::Dir | EntryKind::Fifo => {}
        }
        entries.push(entry);
    }
    if let Some(out) = out {
        out.finish().map_err(write_error)?;
    }

    // eStargz layers are valid tar.gz; their metadata entries are not part of the image.
    let is_estargz = entries
        .iter()
        .any(|e| e.path == estargz::TOC_NAME.as_bytes() && e.kind == EntryKind::File);
    if is_estargz {
        entries.retain(|e| !estargz::is_meta_name(&e.path));
    }
    // All in files of their own (or only indexed): nothing to record.
    if packed.iter().all(Option::is_none) {
        packed = Vec::new();
    }
    Ok(LayerIndex {
        entries,
        packed: Packed(packed),
    })
}

/// What a tar entry is, or `None` for entries that carry no file (global PAX headers).
fn entry_kind<R: Read>(te: &tar::Entry<'_, R>, shown: &str) -> Option<EntryKind> {
    Some(match te.header().entry_type() {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => EntryKind::File,
        EntryType::Directory => EntryKind::Dir,
        EntryType::Symlink => EntryKind::Symlink,
        EntryType::Link => EntryKind::Hardlink,
        EntryType::Char => EntryKind::CharDev,
        EntryType::Block => EntryKind::BlockDev,
        EntryType::Fifo => EntryKind::Fifo,
        // Global PAX headers carry no entry; we read no archive-wide defaults from them
        // (umoci ignores them as well).
        EntryType::XGlobalHeader => return None,
        other => {
            // Unknown types are treated as regular files by POSIX tar readers
            // ("unrecognized typeflag … shall be treated as a regular file").
            tracing::debug!(path = %shown, typeflag = ?other, "unknown tar type, treating as file");
            EntryKind::File
        }
    })
}

/// The entry's metadata from its header and PAX records (mode, owners, mtime with ns,
/// xattrs), and the layout of a sparse file (whose PAX name, if any, replaces `path`).
fn entry_metadata<R: Read>(
    te: &mut tar::Entry<'_, R>,
    path: Vec<u8>,
    kind: EntryKind,
    bad: &impl Fn(String) -> TarError,
) -> Result<(Entry, Option<SparseLayout>), TarError> {
    let header = te.header().clone();
    let old = header.as_old();
    let mode = numeric(header.mode().map(u64::from), &old.mode).map_err(bad)?;
    let mut entry = Entry::new(path, kind, (mode & 0o7777) as u32);
    entry.uid = u32::try_from(numeric(header.uid(), &old.uid).map_err(bad)?)
        .map_err(|_| bad("uid does not fit in 32 bits".into()))?;
    entry.gid = u32::try_from(numeric(header.gid(), &old.gid).map_err(bad)?)
        .map_err(|_| bad("gid does not fit in 32 bits".into()))?;
    entry.mtime = Timespec {
        sec: numeric(header.mtime(), &old.mtime).map_err(bad)? as i64,
        nsec: 0,
    };

    let mut sparse = PaxSparse::default();
    if let Some(pax) = te
        .pax_extensions()
        .map_err(|source| TarError::Read { source })?
    {
        for ext in pax {
            let ext = ext.map_err(|source| TarError::Read { source })?;
            let key = ext.key_bytes();
            if key == b"mtime" {
                if let Some(ts) = parse_pax_time(ext.value_bytes()) {
                    entry.mtime = ts;
                }
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                entry.xattrs.push(Xattr {
                    name: name.to_vec(),
                    value: ext.value_bytes().to_vec(),
                });
            } else if let Some(key) = key.strip_prefix(b"GNU.sparse.") {
                sparse.record(key, ext.value_bytes());
            }
        }
    }
    let sparse = match kind {
        EntryKind::File => sparse.layout().map_err(bad)?,
        _ => None,
    };
    if let Some(s) = &sparse
        && let Some(name) = &s.name
    {
        entry.path = clean_path(name);
    }
    Ok((entry, sparse))
}

/// A regular file's content, written to `data` under `data_dir` or to its pack (or read
/// past, when only indexing); returns its size and where it was packed. An empty file
/// leaves no data.
fn file_content<R: Read>(
    te: &mut tar::Entry<'_, R>,
    data_dir: Option<(&Path, &mut Extractor)>,
    data: DataRef,
    sparse: Option<SparseLayout>,
    bad: &impl Fn(String) -> TarError,
) -> Result<(u64, Option<PackedAt>), TarError> {
    let Some((dir, out)) = data_dir else {
        let size = match sparse {
            Some(s) => write_sparse(te, None, &s, bad),
            None => io::copy(te, &mut io::sink()).map_err(|source| TarError::Read { source }),
        }?;
        return Ok((size, None));
    };
    match sparse {
        Some(s) => {
            let file_path = data_path(dir, data);
            let n = write_sparse(te, Some(&file_path), &s, bad)?;
            if n == 0 {
                let _ = std::fs::remove_file(&file_path);
            }
            Ok((n, None))
        }
        None => {
            let size = te.size();
            let at = out
                .write(te, size, data)
                .map_err(write_error)?
                .map_err(|source| TarError::Read { source })?;
            Ok((size, at))
        }
    }
}

fn write_error(e: WriteError) -> TarError {
    TarError::Write {
        path: e.path,
        source: e.source,
    }
}

/// Where the content with `data` lives under a layer's data directory.
pub fn data_path(dir: &Path, data: DataRef) -> PathBuf {
    dir.join(data.id.to_string())
}

/// GNU tar's sparse files in PAX archives (`tar --sparse --format=pax`), which the `tar`
/// crate does not expand (it only knows the old GNU `S` type). GNU tar's manual, "Storing
/// Sparse Files", and Go's `archive/tar` (which umoci uses) define three versions:
///
/// - 0.0: repeated `GNU.sparse.offset` / `GNU.sparse.numbytes` records, in order;
/// - 0.1: one `GNU.sparse.map` record, `offset,numbytes,offset,numbytes,…`;
/// - 1.0 (`GNU.sparse.major=1`, `GNU.sparse.minor=0`): the map is at the start of the entry's
///   data, decimal numbers one per line — the count, then offset/numbytes pairs — padded with
///   NULs to a 512-byte block.
///
/// In all three the entry's data holds the segments' bytes back to back (after the map for
/// 1.0); everything else reads as zeros. The real name is `GNU.sparse.name` (the header holds
/// `GNUSparseFile.N/…`), the real size `GNU.sparse.size` (0.x) or `GNU.sparse.realsize` (1.0).
#[derive(Default)]
struct PaxSparse {
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    size: Option<Vec<u8>>,
    realsize: Option<Vec<u8>>,
    map: Option<Vec<u8>>,
    /// 0.0's offset/numbytes records in archive order.
    pairs: Vec<Vec<u8>>,
}

/// A sparse file's layout, from [`PaxSparse::layout`].
struct SparseLayout {
    name: Option<Vec<u8>>,
    real_size: u64,
    /// `None`: the map is at the start of the data (1.0).
    map: Option<Vec<(u64, u64)>>,
}

impl PaxSparse {
    fn record(&mut self, key: &[u8], value: &[u8]) {
        let v = Some(value.to_vec());
        match key {
            b"major" => self.major = v,
            b"minor" => self.minor = v,
            b"name" => self.name = v,
            b"size" => self.size = v,
            b"realsize" => self.realsize = v,
            b"map" => self.map = v,
            b"offset" | b"numbytes" => self.pairs.push(value.to_vec()),
            _ => {}
        }
    }

    /// Which format this is (as Go's `readGNUSparsePAXHeaders` decides), `None` if none.
    fn layout(self) -> Result<Option<SparseLayout>, String> {
        let in_data = match (self.major.as_deref(), self.minor.as_deref()) {
            (Some(b"1"), Some(b"0")) => true,
            (Some(b"0"), Some(b"0" | b"1")) => false,
            // An unknown version: like Go, treat the entry as a plain file.
            (Some(_), _) | (_, Some(_)) => return Ok(None),
            (None, None) if self.map.is_some() || !self.pairs.is_empty() => false,
            (None, None) => return Ok(None),
        };
        let size = self
            .size
            .or(self.realsize)
            .ok_or("no GNU.sparse.size or GNU.sparse.realsize record")?;
        let real_size = decimal(&size).ok_or("GNU.sparse size is not a number")?;
        let map = if in_data {
            None
        } else {
            let numbers: Vec<Vec<u8>> = match &self.map {
                Some(m) if !m.is_empty() => m.split(|&b| b == b',').map(<[u8]>::to_vec).collect(),
                Some(_) => Vec::new(),
                None => self.pairs,
            };
            Some(pairs(&numbers)?)
        };
        Ok(Some(SparseLayout {
            name: self.name,
            real_size,
            map,
        }))
    }
}

fn decimal(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// `[offset, numbytes, …]` as pairs, each checked to follow the previous one.
fn pairs(numbers: &[Vec<u8>]) -> Result<Vec<(u64, u64)>, String> {
    if !numbers.len().is_multiple_of(2) {
        return Err("the sparse map has an odd count of numbers".into());
    }
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(numbers.len() / 2);
    for pair in numbers.chunks(2) {
        let (Some(off), Some(len)) = (decimal(&pair[0]), decimal(&pair[1])) else {
            return Err("the sparse map holds something other than numbers".into());
        };
        off.checked_add(len).ok_or("a sparse segment overflows")?;
        if out.last().is_some_and(|&(o, l)| o + l > off) {
            return Err("sparse segments overlap or are out of order".into());
        }
        out.push((off, len));
    }
    Ok(out)
}

/// Reads a 1.0 sparse map from the start of the data: whole 512-byte blocks until the count
/// and that many pairs were read.
fn read_map_1x0(reader: &mut impl Read) -> Result<Result<Vec<(u64, u64)>, String>, TarError> {
    // A count above this is a corrupt header, not a file: each pair costs at least 4 bytes.
    const MAX_SEGMENTS: usize = 1 << 20;
    let mut text = Vec::new();
    let mut block = [0u8; 512];
    loop {
        let n = read_full(reader, &mut block).map_err(|source| TarError::Read { source })?;
        if n != block.len() {
            return Ok(Err("the sparse map is truncated".into()));
        }
        text.extend_from_slice(&block);
        let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
        // The last piece is unterminated; only complete lines count.
        let complete = &lines[..lines.len() - 1];
        let Some(count) = complete.first() else {
            continue;
        };
        let Some(count) = decimal(count).map(|c| c as usize) else {
            return Ok(Err("the sparse map count is not a number".into()));
        };
        if count > MAX_SEGMENTS {
            return Ok(Err(format!("the sparse map claims {count} segments")));
        }
        if complete.len() > 2 * count {
            let numbers: Vec<Vec<u8>> =
                complete[1..=2 * count].iter().map(|l| l.to_vec()).collect();
            return Ok(pairs(&numbers));
        }
        if text.len() > 64 * MAX_SEGMENTS {
            return Ok(Err("the sparse map is too long".into()));
        }
    }
}

/// Expands a PAX sparse entry into `path` (or only reads it through, for indexing without
/// extraction). Returns the real size.
fn write_sparse(
    reader: &mut impl Read,
    path: Option<&Path>,
    layout: &SparseLayout,
    bad: &dyn Fn(String) -> TarError,
) -> Result<u64, TarError> {
    let map = match &layout.map {
        Some(m) => m.clone(),
        None => read_map_1x0(reader)?.map_err(bad)?,
    };
    if let Some(&(off, len)) = map.last()
        && off + len > layout.real_size
    {
        return Err(bad(format!(
            "a segment ends at {} beyond the real size {}",
            off + len,
            layout.real_size
        )));
    }
    let mut file = match path {
        Some(p) => Some(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(|source| TarError::Write {
                    path: p.to_owned(),
                    source,
                })?,
        ),
        None => None,
    };
    for (off, len) in map {
        let mut seg = (&mut *reader).take(len);
        let copied = match (&mut file, path) {
            (Some(f), Some(p)) => {
                let werr = |source| TarError::Write {
                    path: p.to_owned(),
                    source,
                };
                f.seek(SeekFrom::Start(off)).map_err(werr)?;
                io::copy(&mut seg, f).map_err(|source| TarError::Read { source })?
            }
            _ => io::copy(&mut seg, &mut io::sink()).map_err(|source| TarError::Read { source })?,
        };
        if copied != len {
            return Err(bad(format!(
                "the data ends inside the segment at {off} ({copied} of {len} bytes)"
            )));
        }
    }
    if let (Some(f), Some(p)) = (&file, path) {
        f.set_len(layout.real_size)
            .map_err(|source| TarError::Write {
                path: p.to_owned(),
                source,
            })?;
    }
    // Anything after the segments (there should be nothing) is skipped by the tar reader.
    Ok(layout.real_size)
}

/// Read until `buf` is full or the input ends (`read_exact` without the error at the end);
/// the number of bytes read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A numeric header field; an empty one (all NUL or spaces) reads as 0, as in GNU tar and
/// Go's archive/tar.
fn numeric(parsed: io::Result<u64>, raw: &[u8]) -> Result<u64, String> {
    match parsed {
        Ok(v) => Ok(v),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}

/// PAX times are decimal seconds with an optional fraction: `1704067200.123456789`.
fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = int.parse().ok()?;
    let mut nsec: u32 = 0;
    if !frac.is_empty() {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nsec = digits.parse().ok()?;
    }
    // A negative time with a fraction counts the fraction towards the past.
    if (sec < 0 || int.starts_with('-')) && nsec > 0 {
        return Some(Timespec {
            sec: sec - 1,
            nsec: 1_000_000_000 - nsec,
        });
    }
    Some(Timespec { sec, nsec })
}

/// The content of `data` of a layer extracted into `dir` as `index` says: from the pack
/// or from its own file.
pub fn read_data(dir: &Path, index: &LayerIndex, data: DataRef) -> io::Result<Vec<u8>> {
    match index.packed.get(data) {
        Some(at) => super::extract::read_packed(dir, at),
        None => std::fs::read(data_path(dir, data)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        let cases: &[(&str, Option<(i64, u32)>)] = &[
            ("1704067200", Some((1704067200, 0))),
            ("1704067200.5", Some((1704067200, 500_000_000))),
            ("1704067200.123456789", Some((1704067200, 123_456_789))),
            ("1704067200.1234567891", Some((1704067200, 123_456_789))),
            ("-1.5", Some((-2, 500_000_000))),
            ("x", None),
            ("1.x", None),
        ];
        for (input, want) in cases {
            let got = parse_pax_time(input.as_bytes()).map(|t| (t.sec, t.nsec));
            assert_eq!(got, *want, "{input}");
        }
    }

    fn build(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_704_067_200);
        h
    }

    #[test]
    fn indexes_and_extracts() {
        let tarball = build(|b| {
            b.append_data(&mut header(EntryType::Directory, 0, 0o755), "./", &[][..])
                .unwrap();
            let mut h = header(EntryType::Regular, 5, 0o4755);
            h.set_uid(1000);
            h.set_gid(1001);
            b.append_data(&mut h, "./bin/su", &b"hello"[..]).unwrap();
            b.append_data(&mut header(EntryType::Regular, 0, 0o644), "empty", &[][..])
                .unwrap();
            let mut h = header(EntryType::Symlink, 0, 0o777);
            b.append_link(&mut h, "bin/sh", "../x/y").unwrap();
            let mut h = header(EntryType::Link, 0, 0o755);
            b.append_link(&mut h, "bin/su2", "./bin/su").unwrap();
            let long = format!("{}/file", "d".repeat(200));
            b.append_data(&mut header(EntryType::Regular, 2, 0o600), &long, &b"ok"[..])
                .unwrap();
            let mut h = header(EntryType::Char, 0, 0o666);
            h.set_device_major(5).unwrap();
            h.set_device_minor(1).unwrap();
            b.append_data(&mut h, "dev/console", &[][..]).unwrap();
            b.append_data(
                &mut header(EntryType::Regular, 0, 0o644),
                "dir/.wh.gone",
                &[][..],
            )
            .unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let idx = index_layer(&tarball[..], Some(dir.path())).unwrap();
        let paths: Vec<String> = idx
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        let long = format!("{}/file", "d".repeat(200));
        assert_eq!(
            paths,
            [
                "",
                "bin/su",
                "empty",
                "bin/sh",
                "bin/su2",
                &long,
                "dev/console",
                "dir/.wh.gone"
            ]
        );
        let su = &idx.entries[1];
        assert_eq!((su.mode, su.uid, su.gid, su.size), (0o4755, 1000, 1001, 5));
        assert_eq!(su.mtime.sec, 1_704_067_200);
        let data = su.data.unwrap();
        assert_eq!(read_data(dir.path(), &idx, data).unwrap(), b"hello");
        assert_eq!(idx.entries[2].data, None);
        assert_eq!(idx.entries[3].link.as_deref(), Some(&b"../x/y"[..]));
        assert_eq!(idx.entries[4].kind, EntryKind::Hardlink);
        assert_eq!(idx.entries[4].link.as_deref(), Some(&b"bin/su"[..]));
        assert_eq!(idx.entries[6].rdev, (5, 1));
        assert_eq!(idx.entries[6].kind, EntryKind::CharDev);
    }

    #[test]
    fn pax_xattrs_and_nanoseconds() {
        let tarball = build(|b| {
            let mut h = header(EntryType::Regular, 1, 0o755);
            let pax: Vec<(&str, &[u8])> = vec![
                ("mtime", b"1704067200.000000123"),
                ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
                ("SCHILY.xattr.user.empty", b""),
            ];
            b.append_pax_extensions(pax).unwrap();
            b.append_data(&mut h, "ping", &b"x"[..]).unwrap();
        });
        let idx = index_layer(&tarball[..], None).unwrap();
        let e = &idx.entries[0];
        assert_eq!(
            e.mtime,
            Timespec {
                sec: 1_704_067_200,
                nsec: 123
            }
        );
        assert_eq!(e.xattrs.len(), 2);
        assert_eq!(e.xattrs[0].name, b"security.capability");
        assert_eq!(e.xattrs[1].value, b"");
        assert_eq!(e.data, Some(DataRef { id: 0 }));
    }

    #[test]
    fn zero_runs_become_holes() {
        let mut content = vec![0u8; 8 << 20];
        content[0] = 1;
        let last = content.len() - 1;
        content[last] = 2;
        let tarball = build(|b| {
            b.append_data(
                &mut header(EntryType::Regular, content.len() as u64, 0o644),
                "big",
                &content[..],
            )
            .unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let idx = index_layer(&tarball[..], Some(dir.path())).unwrap();
        let p = data_path(dir.path(), idx.entries[0].data.unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), content);
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&p).unwrap().blocks();
        assert!(blocks * 512 < 1 << 20, "{blocks} blocks: not sparse");
    }

    #[test]
    fn pax_sparse_files_are_expanded() {
        let real: u64 = (1 << 20) + 3;
        let mut want = vec![0u8; real as usize];
        want[4096..4099].copy_from_slice(b"abc");
        want[1 << 20..].copy_from_slice(b"xyz");
        let mut map_1x0 = b"2\n4096\n3\n1048576\n3\n".to_vec();
        map_1x0.resize(512, 0);
        map_1x0.extend_from_slice(b"abcxyz");
        let real_s = real.to_string();
        type Case<'a> = (&'a str, Vec<(&'a str, &'a [u8])>, &'a [u8]);
        let cases: Vec<Case> = vec![
            (
                "1.0",
                vec![
                    ("GNU.sparse.major", b"1"),
                    ("GNU.sparse.minor", b"0"),
                    ("GNU.sparse.name", b"./dir/sparse"),
                    ("GNU.sparse.realsize", real_s.as_bytes()),
                ],
                &map_1x0,
            ),
            (
                "0.1",
                vec![
                    ("GNU.sparse.major", b"0"),
                    ("GNU.sparse.minor", b"1"),
                    ("GNU.sparse.name", b"dir/sparse"),
                    ("GNU.sparse.size", real_s.as_bytes()),
                    ("GNU.sparse.map", b"4096,3,1048576,3"),
                ],
                b"abcxyz",
            ),
            (
                "0.0",
                vec![
                    ("GNU.sparse.size", real_s.as_bytes()),
                    ("GNU.sparse.name", b"dir/sparse"),
                    ("GNU.sparse.offset", b"4096"),
                    ("GNU.sparse.numbytes", b"3"),
                    ("GNU.sparse.offset", b"1048576"),
                    ("GNU.sparse.numbytes", b"3"),
                ],
                b"abcxyz",
            ),
        ];
        for (version, records, data) in cases {
            let tarball = build(|b| {
                b.append_pax_extensions(records.iter().copied()).unwrap();
                let mut h = header(EntryType::Regular, data.len() as u64, 0o640);
                b.append_data(&mut h, "GNUSparseFile.0/sparse", data)
                    .unwrap();
                b.append_data(
                    &mut header(EntryType::Regular, 2, 0o644),
                    "after",
                    &b"ok"[..],
                )
                .unwrap();
            });
            let dir = tempfile::tempdir().unwrap();
            let idx = index_layer(&tarball[..], Some(dir.path())).unwrap();
            let e = &idx.entries[0];
            assert_eq!(e.path, b"dir/sparse", "{version}");
            assert_eq!((e.size, e.mode), (real, 0o640), "{version}");
            let got = read_data(dir.path(), &idx, e.data.unwrap()).unwrap();
            assert!(got == want, "{version}: content differs");
            let after = &idx.entries[1];
            assert_eq!(after.path, b"after", "{version}");
            let got = read_data(dir.path(), &idx, after.data.unwrap()).unwrap();
            assert_eq!(got, b"ok", "{version}");
            // Indexing without extraction agrees.
            let idx2 = index_layer(&tarball[..], None).unwrap();
            assert_eq!(idx2.entries[0].size, real, "{version}");
            assert_eq!(idx2.entries[0].path, b"dir/sparse", "{version}");
        }
    }

    #[test]
    fn malformed_pax_sparse_maps_are_errors() {
        type Case<'a> = (Vec<(&'a str, &'a [u8])>, &'a [u8], &'a str);
        let cases: Vec<Case> = vec![
            (
                vec![("GNU.sparse.size", b"10"), ("GNU.sparse.map", b"0,3,1")],
                b"abc",
                "odd count",
            ),
            (
                vec![("GNU.sparse.size", b"10"), ("GNU.sparse.map", b"4,3,0,3")],
                b"abcxyz",
                "out of order",
            ),
            (
                vec![("GNU.sparse.size", b"10"), ("GNU.sparse.map", b"0,3,2,3")],
                b"abcxyz",
                "overlap",
            ),
            (
                vec![("GNU.sparse.size", b"4"), ("GNU.sparse.map", b"2,3")],
                b"abc",
                "beyond the real size",
            ),
            (
                vec![("GNU.sparse.size", b"100"), ("GNU.sparse.map", b"0,30")],
                b"abc",
                "data ends inside",
            ),
            (
                vec![
                    ("GNU.sparse.major", b"1"),
                    ("GNU.sparse.minor", b"0"),
                    ("GNU.sparse.realsize", b"10"),
                ],
                b"1\n0\n",
                "truncated",
            ),
        ];
        for (records, data, want) in cases {
            let tarball = build(|b| {
                b.append_pax_extensions(records.iter().copied()).unwrap();
                let mut h = header(EntryType::Regular, data.len() as u64, 0o644);
                b.append_data(&mut h, "s", data).unwrap();
            });
            let dir = tempfile::tempdir().unwrap();
            let err = index_layer(&tarball[..], Some(dir.path())).unwrap_err();
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn estargz_metadata_is_hidden_only_in_estargz_layers() {
        let with_toc = build(|b| {
            for name in [".prefetch.landmark", "etc/os-release", "stargz.index.json"] {
                b.append_data(&mut header(EntryType::Regular, 1, 0o644), name, &b"x"[..])
                    .unwrap();
            }
        });
        let idx = index_layer(&with_toc[..], None).unwrap();
        assert_eq!(idx.entries.len(), 1);
        assert_eq!(idx.entries[0].path, b"etc/os-release");

        let plain = build(|b| {
            b.append_data(
                &mut header(EntryType::Regular, 1, 0o644),
                ".prefetch.landmark",
                &b"x"[..],
            )
            .unwrap();
        });
        assert_eq!(index_layer(&plain[..], None).unwrap().entries.len(), 1);
    }

    #[test]
    fn more_entries_than_the_limit_is_an_error() {
        let tarball = build(|b| {
            for name in ["a", "b", "c"] {
                b.append_data(&mut header(EntryType::Regular, 1, 0o644), name, &b"x"[..])
                    .unwrap();
            }
        });
        let err = index_layer_bounded(&tarball[..], None, 2).unwrap_err();
        assert!(matches!(err, TarError::TooManyEntries { max: 2 }), "{err}");
        assert_eq!(
            index_layer_bounded(&tarball[..], None, 3)
                .unwrap()
                .entries
                .len(),
            3
        );
    }

    #[test]
    fn truncated_archive_is_an_error() {
        let tarball = build(|b| {
            b.append_data(
                &mut header(EntryType::Regular, 5000, 0o644),
                "f",
                &vec![7u8; 5000][..],
            )
            .unwrap();
        });
        let err = index_layer(&tarball[..2048], None).unwrap_err();
        assert!(err.to_string().contains("reading the layer tar"), "{err}");
    }
}
