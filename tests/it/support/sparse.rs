//! Sparse files in layer tars, cheap to build however large the file: GNU tar's two ways of
//! storing them, which the image builder does not write itself.
//!
//! - [`pax_sparse_entry`]: PAX format 1.0 (`tar --sparse --format=pax`; Go's `archive/tar`,
//!   hence umoci, reads it): an ordinary [`Entry`] whose data is the map then the segments.
//! - [`gnu_sparse_entry`]: the old GNU `S` type (`tar --sparse --format=gnu`), which Go's
//!   reader (and so umoci) refuses.
//!
//! [`expanded_sha256`] digests the file a reader must see without materialising it.

use sha2::{Digest as _, Sha256};

use super::image::{DEFAULT_MTIME, Entry};

/// Data at `offset`; everything between segments reads as zeros.
pub type Segment = (u64, Vec<u8>);

/// A PAX 1.0 sparse file at `path` of `real_size` bytes. The header name is GNU tar's
/// `GNUSparseFile.0/NAME`; readers that do not know the format show that name and the raw
/// map, so a mount showing `path` with the right content proves the format was understood.
pub fn pax_sparse_entry(path: &str, real_size: u64, segments: &[Segment]) -> Entry {
    let mut data = format!("{}\n", segments.len()).into_bytes();
    for (off, bytes) in segments {
        data.extend_from_slice(format!("{off}\n{}\n", bytes.len()).as_bytes());
    }
    data.resize(data.len().next_multiple_of(512), 0);
    for (_, bytes) in segments {
        data.extend_from_slice(bytes);
    }
    let base = path.rsplit('/').next().unwrap_or(path);
    Entry::file(format!("GNUSparseFile.0/{base}"), data)
        .pax("GNU.sparse.major", "1")
        .pax("GNU.sparse.minor", "0")
        .pax("GNU.sparse.name", path)
        .pax("GNU.sparse.realsize", real_size.to_string())
}

/// The tar blocks of an old-GNU sparse (`S`) file at `path`: at most 4 segments (no extension
/// headers), mode 0644, owner 0:0, mtime [`DEFAULT_MTIME`].
pub fn gnu_sparse_entry(path: &str, real_size: u64, segments: &[Segment]) -> Vec<u8> {
    assert!(segments.len() <= 4, "only the header's 4 sparse slots");
    let stored: u64 = segments.iter().map(|(_, b)| b.len() as u64).sum();
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(stored);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(DEFAULT_MTIME as u64);
    let gnu = h.as_gnu_mut().expect("gnu header");
    octal(&mut gnu.realsize, real_size);
    for (slot, (off, bytes)) in gnu.sparse.iter_mut().zip(segments) {
        octal(&mut slot.offset, *off);
        octal(&mut slot.numbytes, bytes.len() as u64);
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    for (_, bytes) in segments {
        out.extend_from_slice(bytes);
    }
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

/// A 12-byte octal field: 11 digits and a NUL.
fn octal(field: &mut [u8; 12], v: u64) {
    let s = format!("{v:011o}");
    assert_eq!(s.len(), 11, "{v} does not fit an octal field");
    field[..11].copy_from_slice(s.as_bytes());
    field[11] = 0;
}

/// A layer tar of `entries`, then the raw blocks `raw`, then the end-of-archive blocks.
pub fn tar_with_raw(entries: &[Entry], raw: &[Vec<u8>]) -> Vec<u8> {
    let mut tar = super::image::Layer::new(entries, super::image::Compression::None).tar;
    tar.truncate(tar.len() - 1024);
    for r in raw {
        tar.extend_from_slice(r);
    }
    tar.resize(tar.len() + 1024, 0);
    tar
}

/// `sha256:` of the `real_size`-byte file with `segments`, streamed.
pub fn expanded_sha256(real_size: u64, segments: &[Segment]) -> String {
    let zeros = vec![0u8; 1 << 20];
    let mut h = Sha256::new();
    let mut pos = 0u64;
    let zero_until = |h: &mut Sha256, end: u64, pos: &mut u64| {
        while *pos < end {
            let n = (end - *pos).min(zeros.len() as u64) as usize;
            h.update(&zeros[..n]);
            *pos += n as u64;
        }
    };
    for (off, bytes) in segments {
        zero_until(&mut h, *off, &mut pos);
        h.update(bytes);
        pos += bytes.len() as u64;
    }
    zero_until(&mut h, real_size, &mut pos);
    format!("sha256:{}", hex::encode(h.finalize()))
}
