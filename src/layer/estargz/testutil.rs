//! Helpers shared by the eStargz unit tests: open a blob in memory, read files through
//! their chunks, the reference fixtures, a sample layer with every kind of entry, TOC edits.

use std::collections::HashMap;
use std::io::{Read, Write as _};
use std::path::PathBuf;

use super::toc::toc_json;
use super::writer::{Landmark, WriterOptions, Written, build};
use super::{
    Chunk, ChunkMap, EstargzError, FOOTER_SIZE, Footer, TOC_DIGEST_ANNOTATION, TOC_NAME, Toc,
    decode_chunk, footer_bytes, parse_footer, parse_toc_member,
};
use crate::layer::index::{DataRef, Entry, EntryKind, LayerIndex, Xattr};
use crate::oci::Digest;
use crate::overlay::{Content, InodeId, ROOT, Tree};

/// Footer, TOC and model of a whole in-memory blob.
pub(crate) fn open(
    blob: &[u8],
    toc_digest: Option<&Digest>,
) -> Result<(Footer, Toc, LayerIndex, ChunkMap), EstargzError> {
    let footer = parse_footer(&blob[blob.len().saturating_sub(FOOTER_SIZE)..])?;
    let range = footer.toc_range(blob.len() as u64)?;
    let toc = parse_toc_member(&blob[range.start as usize..range.end as usize], toc_digest)?;
    let (index, chunks) = toc.to_layer(footer.toc_offset)?;
    Ok((footer, toc, index, chunks))
}

pub(crate) fn read_file(blob: &[u8], chunks: &[Chunk]) -> Result<Vec<u8>, EstargzError> {
    let mut out = Vec::new();
    for c in chunks {
        let r = c.compressed_range();
        out.extend(decode_chunk(&blob[r.start as usize..r.end as usize], c)?);
    }
    Ok(out)
}

pub(crate) fn gunzip_all(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut out)
        .unwrap();
    out
}

pub(crate) fn tar_index(blob: &[u8]) -> LayerIndex {
    crate::layer::tar::index_layer(&gunzip_all(blob)[..], None).unwrap()
}

/// `tests/fixtures` (see its README.md), or `IMAGEFS_FIXTURES` if set.
pub(crate) fn fixtures_dir() -> PathBuf {
    match std::env::var_os("IMAGEFS_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

pub(crate) struct FixtureLayer {
    pub(crate) blob: Vec<u8>,
    pub(crate) toc_digest: Digest,
}

/// The layers of an OCI archive fixture, base first, with their `toc.digest`.
pub(crate) fn fixture_layers(archive: &str) -> Vec<FixtureLayer> {
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
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
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
pub(crate) fn render(tree: &Tree, layers: &[(&[u8], &ChunkMap)]) -> String {
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
            Content::Dir { .. } => {
                for entry in tree.children(inode) {
                    let name = String::from_utf8_lossy(tree.name(entry));
                    walk(tree, entry.ino, format!("{path}/{name}"), layers, out);
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
pub(crate) fn chunk_table(
    index: &LayerIndex,
    map: &ChunkMap,
    path: &str,
) -> Vec<(u64, u64, u64, u64)> {
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

// --- writer round trip --------------------------------------------------------------

pub(crate) const CHUNK: u64 = 64 << 10;

pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
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

pub(crate) fn entry(path: &str, kind: EntryKind, mode: u32) -> Entry {
    let mut e = Entry::new(path, kind, mode);
    e.mtime.sec = 1_704_067_200;
    e
}

pub(crate) fn xattr(name: &str, value: &[u8]) -> Xattr {
    Xattr {
        name: name.as_bytes().to_vec(),
        value: value.to_vec(),
    }
}

/// A layer with every kind of entry; file sizes are filled in from the content.
pub(crate) fn sample() -> Vec<(Entry, Vec<u8>)> {
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
pub(crate) fn expected_index(
    entries: &[(Entry, Vec<u8>)],
    landmark_at: Option<usize>,
) -> LayerIndex {
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
    LayerIndex::of(entries)
}

// --- errors -------------------------------------------------------------------------

/// The TOC JSON of a written blob.
pub(crate) fn toc_value(w: &Written) -> serde_json::Value {
    let member = &w.blob[w.toc_offset as usize..w.blob.len() - FOOTER_SIZE];
    serde_json::from_slice(&toc_json(member).unwrap()).unwrap()
}

/// A TOC member (gzip of a tar holding `name` with `json`).
pub(crate) fn toc_member(name: &str, json: &[u8]) -> Vec<u8> {
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
pub(crate) fn with_toc(w: &Written, f: impl FnOnce(&mut serde_json::Value)) -> (Vec<u8>, Digest) {
    let mut toc = toc_value(w);
    f(&mut toc);
    let json = serde_json::to_vec(&toc).unwrap();
    let mut blob = w.blob[..w.toc_offset as usize].to_vec();
    blob.extend(toc_member(TOC_NAME, &json));
    blob.extend(footer_bytes(w.toc_offset, false));
    (blob, Digest::sha256(&json))
}

pub(crate) fn written() -> Written {
    build(
        &sample(),
        &WriterOptions {
            chunk_size: CHUNK,
            landmark: Landmark::NoPrefetch,
            legacy_footer: false,
            compression: 9,
        },
    )
    .unwrap()
}

/// Index in the TOC JSON of the n-th entry named `name`.
pub(crate) fn find(toc: &serde_json::Value, name: &str, nth: usize) -> usize {
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

/// The TOC offset of `written()`, which is deterministic.
pub(crate) fn w_toc_offset() -> u64 {
    written().toc_offset
}
