//! `imagefs::layer::estargz`: footer, TOC member, `Toc::to_layer` and the chunk map.
//! The selector byte's low two bits pick what the rest of the input is:
//!
//! - 0: a whole blob — footer, TOC range, TOC member, layer, and `decode_chunk` on every
//!   chunk whose range lies in the blob;
//! - 1: the TOC JSON, which the harness wraps in a tar entry and a gzip member (so the
//!   fuzzer mutates JSON, not deflate); `toc_offset` from a small table;
//! - 2: a TOC member as fetched;
//! - 3: a footer (and `footer_bytes` must round-trip what parses).
//!
//! Invariants: nothing panics; every chunk lies before the TOC; each file's chunks tile it;
//! `chunk_at` and `chunks_in` agree with the chunk list.
#![no_main]

use std::io::Write;

use imagefs::layer::estargz::{self, ChunkMap, Toc};
use imagefs::layer::{EntryKind, LayerIndex};
use imagefs::oci::Digest;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use common::assert_clean;

const TOC_OFFSETS: [u64; 4] = [1 << 20, 4096, i64::MAX as u64, u64::MAX];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector & 3 {
        0 => blob(bytes),
        1 => {
            let member = wrap_toc(bytes);
            let Ok(toc) = estargz::parse_toc_member(&member, None) else {
                return;
            };
            assert_eq!(toc.digest, Digest::sha256(bytes));
            let toc_offset = TOC_OFFSETS[usize::from(selector >> 2) % TOC_OFFSETS.len()];
            layer(&toc, toc_offset);
        }
        2 => {
            if let Ok(toc) = estargz::parse_toc_member(bytes, None) {
                layer(&toc, i64::MAX as u64);
            }
        }
        _ => {
            if let Ok(footer) = estargz::parse_footer(bytes) {
                let again = estargz::footer_bytes(footer.toc_offset, footer.is_legacy());
                assert_eq!(estargz::parse_footer(&again).ok(), Some(footer));
                if let Ok(range) = footer.toc_range(bytes.len() as u64) {
                    assert!(range.start < range.end);
                    assert!(range.end + footer.size == bytes.len() as u64);
                }
            }
        }
    }
});

/// `IMAGEFS_FUZZ_DEBUG=1` prints how far an input got (to check seeds reach `to_layer`).
fn debug(what: impl FnOnce() -> String) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("IMAGEFS_FUZZ_DEBUG").is_some()) {
        eprintln!("estargz: {}", what());
    }
}

fn blob(blob: &[u8]) {
    let Ok(footer) = estargz::parse_footer(blob) else {
        return;
    };
    let Ok(range) = footer.toc_range(blob.len() as u64) else {
        return;
    };
    let member = &blob[range.start as usize..range.end as usize];
    let Ok(toc) = estargz::parse_toc_member(member, None) else {
        return;
    };
    let Some(map) = layer(&toc, footer.toc_offset) else {
        return;
    };
    for (_, chunks) in map.iter() {
        for chunk in chunks {
            let r = chunk.compressed_range();
            if r.end <= blob.len() as u64 {
                match estargz::decode_chunk(&blob[r.start as usize..r.end as usize], chunk) {
                    Ok(out) => {
                        assert_eq!(out.len() as u64, chunk.chunk_size);
                        debug(|| "decoded a chunk".into());
                    }
                    Err(e) => debug(|| format!("decode_chunk: {e}")),
                }
            }
        }
    }
}

/// `to_layer` and the invariants of what it returns.
fn layer(toc: &Toc, toc_offset: u64) -> Option<ChunkMap> {
    let _ = toc.prefetch_landmark_offset();
    let _ = toc.has_no_prefetch_landmark();
    let (index, map): (LayerIndex, ChunkMap) = match toc.to_layer(toc_offset) {
        Ok(layer) => layer,
        Err(e) => {
            debug(|| format!("to_layer: {e}"));
            return None;
        }
    };
    debug(|| {
        format!(
            "{} entries, {} files with chunks",
            index.entries.len(),
            map.len()
        )
    });
    let mut with_data = 0;
    for entry in &index.entries {
        assert_clean(&entry.path);
        if entry.kind == EntryKind::Hardlink {
            assert_clean(entry.link.as_deref().expect("hardlink target"));
        }
        assert!(entry.mode <= 0o7777);
        let Some(data) = entry.data else {
            continue;
        };
        with_data += 1;
        assert_eq!(entry.kind, EntryKind::File);
        let chunks = map.chunks(data).expect("a file with data has chunks");
        let mut pos = 0u64;
        for chunk in chunks {
            assert_eq!(chunk.chunk_offset, pos);
            assert!(chunk.chunk_size > 0);
            assert!(chunk.compressed_len > 0);
            assert!(chunk.offset < toc_offset);
            assert!(chunk.compressed_range().end <= toc_offset);
            pos += chunk.chunk_size;
            let last = pos - 1;
            assert_eq!(map.chunk_at(data, chunk.chunk_offset), Some(chunk));
            assert_eq!(map.chunk_at(data, last), Some(chunk));
            assert_eq!(
                map.chunks_in(data, chunk.chunk_offset..pos),
                std::slice::from_ref(chunk)
            );
            assert_eq!(
                map.chunks_in(data, last..last + 1),
                std::slice::from_ref(chunk)
            );
        }
        assert_eq!(pos, entry.size);
        assert_eq!(map.chunk_at(data, entry.size), None);
        assert_eq!(map.chunks_in(data, 0..entry.size), chunks);
        assert!(map.chunks_in(data, entry.size..u64::MAX).is_empty());
    }
    assert_eq!(map.len(), with_data);
    Some(map)
}

/// The TOC member a writer would produce for `json`: one tar entry, end blocks, one gzip member.
fn wrap_toc(json: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_path(estargz::TOC_NAME).expect("a short name");
    header.set_size(json.len() as u64);
    header.set_mode(0o444);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append(&header, json).expect("tar to memory");
    let tar = builder.into_inner().expect("tar to memory");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip to memory");
    gz.finish().expect("gzip to memory")
}
