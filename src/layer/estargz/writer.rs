//! An eStargz writer for tests (unit and integration), laying members out as the reference
//! Go writer does. Not for production images: it buffers the whole blob in memory.

use std::io::Write as _;

use base64::Engine as _;
use serde::Serialize;

use super::toc::format_rfc3339;
use super::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME, footer_bytes};
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
pub fn write_estargz(entries: &[(Entry, Vec<u8>)], chunk_size: u64) -> (Vec<u8>, Digest, Digest) {
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
            modtime: (e.mtime.sec != 0)
                .then(|| format_rfc3339(e.mtime.sec).expect("an mtime in the years 0 to 9999")),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::estargz::ChunkMap;
    use crate::layer::estargz::testutil::*;
    use crate::layer::index::DataRef;

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
}
