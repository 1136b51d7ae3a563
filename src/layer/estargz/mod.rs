//! eStargz layers, the groundwork of lazy pulling: the footer, the table of contents (TOC),
//! the chunk map that says which compressed bytes of the blob hold which bytes of each file,
//! the decoding and verification of one chunk, and a writer. Pure: byte slices in, values
//! out. It must not know HTTP, the store, async or FUSE — the caller fetches the ranges this
//! module names (`store::estargz` does, through a `RangeSource`).
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
//! - The footer is an empty gzip member whose Extra field carries the TOC member's offset
//!   (its layout byte by byte is in `footer.rs`).
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
//!   They and `stargz.index.json` are format metadata, not image content ([`META_NAMES`]):
//!   they are dropped from the [`LayerIndex`](super::LayerIndex), as the tar indexer drops
//!   them.
//!
//! Split as stargz-snapshotter's `estargz/` package is: `footer.rs` (the layout, its parser
//! and bytes), `toc.rs` (the TOC model, its parser, and the layer index it describes),
//! `chunks.rs` (the chunk map, offset validation, verified chunk decoding), `writer.rs` (the
//! writer), `testutil.rs` (helpers of the unit tests). A reader goes footer → TOC member range → [`parse_toc_member`] →
//! [`Toc::to_layer`] → [`decode_chunk`] per chunk read.

mod chunks;
mod footer;
#[cfg(test)]
pub(crate) mod testutil;
mod toc;
mod writer;

pub use chunks::{Chunk, ChunkMap, decode_chunk};
pub use footer::{FOOTER_SIZE, Footer, LEGACY_FOOTER_SIZE, footer_bytes, parse_footer};
pub use toc::{Toc, TocEntry, TocEntryType, parse_toc_member};
pub use writer::{Landmark, Pool, WriteError, Writer, WriterOptions, Written, build};

use std::io;

use crate::oci::Digest;

/// Name of the TOC tar entry.
pub const TOC_NAME: &str = "stargz.index.json";
/// Root file marking the end of the prioritised (prefetch) region.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Root file saying that no file is prioritised.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The names eStargz tools write at the layer root: format metadata, not image content.
/// Readers that know eStargz (this module, the tar indexer) hide them.
pub const META_NAMES: [&str; 3] = [TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK];
/// Layer descriptor annotation holding the digest of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The layer descriptor annotation with the size of the uncompressed tar (stargz-snapshotter
/// reads it to size its cache without fetching the blob).
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Largest TOC JSON accepted (stargz-snapshotter's own limit is 50 MB of compressed TOC).
pub const MAX_TOC_JSON_SIZE: u64 = 64 << 20;
/// Largest TOC member (compressed) accepted: the JSON, its tar framing and gzip overhead.
pub const MAX_TOC_MEMBER_SIZE: u64 = MAX_TOC_JSON_SIZE + (1 << 20);

/// Whether a cleaned path (an [`Entry::path`](super::Entry::path)) is one of [`META_NAMES`].
pub fn is_meta_name(path: &[u8]) -> bool {
    META_NAMES.iter().any(|name| name.as_bytes() == path)
}

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
    /// Ends in advice, so the cause is in the message, not `source()`.
    #[error("reading the eStargz TOC member: {cause} (corrupt layer: fetch it whole instead)")]
    TocMember { cause: io::Error },
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
    #[error(
        "the eStargz TOC lists {entries} entries, more than the limit of {max} (refused; `--max-entries` raises the limit)"
    )]
    TooManyEntries { entries: u64, max: u64 },
    #[error("parsing the eStargz TOC JSON: {cause} (corrupt layer: fetch it whole instead)")]
    TocJson { cause: serde_json::Error },
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

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use crate::layer::index::{DataRef, EntryKind, LayerIndex};
    use crate::overlay::merge;

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
                assert!(index.entries.iter().all(|e| !is_meta_name(&e.path)));
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
        let w = build(
            &input,
            &WriterOptions {
                chunk_size: 1024,
                landmark: Landmark::NoPrefetch,
                legacy_footer: false,
                compression: 9,
            },
        )
        .unwrap();
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
