//! The chunk map: where each file's bytes are in the blob, as gzip members to fetch and
//! decode. Built while [`Toc::to_layer`](super::Toc::to_layer) walks the TOC, which is where
//! offsets are validated: data offsets never go backwards or overlap, stay before the TOC,
//! each file's chunks tile it exactly, and no chunk claims more bytes than its compressed
//! range can inflate to. Then [`decode_chunk`] turns one fetched range into verified bytes.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::{EstargzError, TocEntry};
use crate::layer::index::{DataRef, clean_path};
use crate::oci::Digest;

/// DEFLATE expands at most ~1032:1 (a 258-byte match in two 1-bit codes); a chunk claiming
/// more bytes than its compressed range can hold is rejected before anything is allocated.
const MAX_DEFLATE_RATIO: u64 = 1032;

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

/// The chunks of the files of one TOC, collected in TOC order by
/// [`Toc::to_layer`](super::Toc::to_layer): a `reg` with content opens a file, its `chunk`
/// entries add to it, the next other entry closes it.
pub(super) struct ChunkMapBuilder {
    toc_offset: u64,
    files: Vec<OpenFile>,
    open: Option<OpenFile>,
    last: Option<LastData>,
}

impl ChunkMapBuilder {
    /// `toc_offset` is [`Footer::toc_offset`](super::Footer::toc_offset): no data may start
    /// at or after it.
    pub(super) fn new(toc_offset: u64) -> ChunkMapBuilder {
        ChunkMapBuilder {
            toc_offset,
            files: Vec::new(),
            open: None,
            last: None,
        }
    }

    /// A regular file with content (TOC entry `index`), whose first chunk its entry holds.
    /// Files that are not `keep` (the eStargz metadata files) are checked but not mapped.
    pub(super) fn open_file(
        &mut self,
        index: usize,
        te: &TocEntry,
        path: Vec<u8>,
        id: u32,
        keep: bool,
    ) -> Result<(), EstargzError> {
        let first = data_chunk(te, index, te.size, self.toc_offset, &mut self.last, Some(0))?;
        self.open = Some(OpenFile {
            index,
            path,
            id,
            size: te.size,
            keep,
            digest: te.digest.clone(),
            chunks: vec![first],
        });
        Ok(())
    }

    /// A `chunk` entry: more data of the file just opened.
    pub(super) fn add_chunk(&mut self, index: usize, te: &TocEntry) -> Result<(), EstargzError> {
        let Some(file) = self.open.as_mut() else {
            return Err(EstargzError::UnknownFile {
                index,
                name: te.name.clone(),
            });
        };
        // Go's reader takes a chunk's name from the entry before it; a name that says
        // otherwise is a TOC out of order.
        if !te.name.is_empty() && clean_path(te.name.as_bytes()) != file.path {
            return Err(EstargzError::UnknownFile {
                index,
                name: te.name.clone(),
            });
        }
        let chunk = data_chunk(te, index, file.size, self.toc_offset, &mut self.last, None)?;
        file.chunks.push(chunk);
        Ok(())
    }

    /// Any entry but a `chunk` ends the open file, whose chunks must then tile it.
    pub(super) fn close_file(&mut self, toc: &[TocEntry]) -> Result<(), EstargzError> {
        if let Some(file) = self.open.take() {
            self.files.push(finish_file(file, toc)?);
        }
        Ok(())
    }

    /// The map, once each chunk knows its compressed length.
    pub(super) fn finish(mut self, toc: &[TocEntry]) -> Result<ChunkMap, EstargzError> {
        self.close_file(toc)?;
        // Each chunk's compressed range runs to the next larger data offset: data offsets
        // increase in TOC order (checked as they came), so this list is sorted.
        let mut offsets: Vec<u64> = self
            .files
            .iter()
            .flat_map(|f| f.chunks.iter().map(|c| c.offset))
            .collect();
        offsets.dedup();
        let mut map = ChunkMap::default();
        for mut file in self.files {
            for chunk in &mut file.chunks {
                let i = offsets.partition_point(|&o| o <= chunk.offset);
                let next = offsets.get(i).copied().unwrap_or(self.toc_offset);
                chunk.compressed_len = next - chunk.offset;
                let need = chunk.inner_offset.saturating_add(chunk.chunk_size);
                if need > chunk.compressed_len.saturating_mul(MAX_DEFLATE_RATIO) {
                    return Err(EstargzError::TocEntry {
                        index: file.index,
                        name: toc[file.index].name.clone(),
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
        Ok(map)
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

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::layer::estargz::testutil::*;
    use crate::layer::estargz::{Toc, TocEntryType};
    use crate::layer::index::Timespec;
    use crate::oci::Digest;

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
}
