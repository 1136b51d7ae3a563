//! File-granular laziness: mounting an eStargz image (a layer whose descriptor carries the
//! `toc.digest` annotation) fetches only its footer and TOC; reading a file fetches only that
//! file's chunks, verified; what was read survives an offline remount. By default the first
//! access also fetches the landmark region with one request, then the rest in the background.
//! Tests that count bytes pass `--prefetch none --read-around 0`.

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use imagefs::layer::estargz::{
    Chunk, FOOTER_SIZE, TOC_DIGEST_ANNOTATION, parse_footer, parse_toc_member,
};
use imagefs::layer::estargz::{Landmark, WriterOptions, build};
use imagefs::layer::index::{Entry as IndexEntry, EntryKind};

use crate::cli_mount::assert_expected_rootfs;
use crate::support::adversary::{Adversary, Recorded, Reply};
use crate::support::mounts::{Mount, TIMEOUT, wait_until};
use crate::support::{
    AccessLine, Auth, Compression, Entry, Format, ImageBuilder, Imagefs, Layer, Registry,
    fixture_path, manifest_layers, noise, skopeo_copy_fixture,
};

/// Chunk size of the written images: big enough that kernel readahead inside the middle
/// chunk of a file stays inside it.
const CHUNK: u64 = 256 << 10;

/// Mount flags for a mount that fetches only what is read: no prefetch, and no read-around
/// (by default a small read also takes the free chunks after it in the blob along).
const NO_PREFETCH: &[&str] = &["--prefetch", "none", "--read-around", "0"];

/// (digest, size) of every layer of the mounted image, from `.manifest.json` (a meta file:
/// reading it fetches nothing).
fn layers_of(m: &Mount) -> Vec<(String, u64)> {
    manifest_layers(&fs::read(m.p(".manifest.json")).unwrap())
}

/// The GETs of blob `digest` in the access log.
fn blob_gets<'a>(log: &'a [AccessLine], digest: &str) -> Vec<&'a AccessLine> {
    let suffix = format!("/blobs/{digest}");
    log.iter()
        .filter(|l| l.method == "GET" && l.uri.ends_with(&suffix))
        .collect()
}

fn check_estargz_fixture(archive: &str, tag: &str) {
    let registry = Registry::start(Auth::Anonymous);
    skopeo_copy_fixture(&fixture_path(archive), &registry, &format!("busybox:{tag}"));
    let imagefs = Imagefs::new();
    let m = Mount::new_with(
        &imagefs,
        &[],
        NO_PREFETCH,
        &registry.reference(&format!("busybox:{tag}")),
    );
    let layers = layers_of(&m);
    let os_release = fs::read_to_string(m.p("etc/os-release")).unwrap();
    assert!(os_release.contains("NAME="), "{archive}: {os_release:?}");

    let log = registry.access_log();
    let blob_total: u64 = layers.iter().map(|(_, s)| s).sum();
    let served: u64 = layers
        .iter()
        .flat_map(|(d, _)| blob_gets(&log, d))
        .map(|l| l.bytes)
        .sum();
    eprintln!(
        "{archive}: reading /etc/os-release fetched {served} of {blob_total} layer blob bytes"
    );
    assert!(
        served * 10 < blob_total,
        "{archive}: {served} of {blob_total} layer bytes fetched to read one file:\n{}",
        registry.log()
    );
    for (d, _) in &layers {
        assert!(
            blob_gets(&log, d).iter().all(|l| l.status == 206),
            "{archive}: a whole-blob GET of {d}:\n{}",
            registry.log()
        );
    }

    assert_expected_rootfs(&m, archive);
    m.unmount();
}

#[test]
fn fixture_estargz_reads_one_file_with_a_few_small_ranges() {
    check_estargz_fixture("busybox-estargz.oci.tar", "estargz");
}

#[test]
fn fixture_estargz_optimized_reads_one_file_with_a_few_small_ranges() {
    check_estargz_fixture("busybox-estargz-opt.oci.tar", "estargz-opt");
}

/// An eStargz image: `big` (3 chunks), `small`, `other`.
pub(crate) struct Written {
    pub(crate) big: Vec<u8>,
    pub(crate) blob: Vec<u8>,
    tar: Vec<u8>,
    toc_digest: String,
    /// The chunks of `big`, in file order.
    big_chunks: Vec<Chunk>,
}

pub(crate) fn written() -> Written {
    let big = noise(3 * CHUNK as usize - 1000, 1);
    let file = |path: &str, content: &[u8]| {
        let mut e = IndexEntry::new(path, EntryKind::File, 0o644);
        e.size = content.len() as u64;
        (e, content.to_vec())
    };
    let w = build(
        &[
            (IndexEntry::new("data", EntryKind::Dir, 0o755), Vec::new()),
            file("data/big", &big),
            file("data/small", b"small file\n"),
            file("data/other", &noise(5000, 2)),
        ],
        &WriterOptions {
            chunk_size: CHUNK,
            landmark: Landmark::NoPrefetch,
            legacy_footer: false,
            compression: 9,
        },
    )
    .expect("an eStargz layer");
    let tar = gunzip(&w.blob);
    let footer = parse_footer(&w.blob[w.blob.len() - FOOTER_SIZE..]).unwrap();
    let range = footer.toc_range(w.blob.len() as u64).unwrap();
    let toc = parse_toc_member(
        &w.blob[range.start as usize..range.end as usize],
        Some(&w.toc_digest),
    )
    .unwrap();
    let (index, chunks) = toc.to_layer(footer.toc_offset).unwrap();
    let data = index
        .entries
        .iter()
        .find(|e| e.path == b"data/big")
        .and_then(|e| e.data)
        .unwrap();
    let big_chunks = chunks.chunks(data).unwrap().to_vec();
    assert_eq!(big_chunks.len(), 3);
    Written {
        big,
        blob: w.blob,
        tar,
        toc_digest: w.toc_digest.to_string(),
        big_chunks,
    }
}

pub(crate) fn push(registry: &Registry, repo: &str, blob: Vec<u8>, w: &Written) -> String {
    push_layer(registry, repo, w.tar.clone(), blob, &w.toc_digest)
}

/// Push `repo:v1`, an image of one gzip layer (`blob`, holding `tar`) annotated with
/// `toc_digest`; the layer's digest.
fn push_layer(
    registry: &Registry,
    repo: &str,
    tar: Vec<u8>,
    blob: Vec<u8>,
    toc_digest: &str,
) -> String {
    let layer = Layer::from_parts(tar, blob, Compression::Gzip);
    let digest = layer.digest.clone();
    let image = ImageBuilder::new(Format::Oci)
        .layer(layer)
        .layer_annotation(TOC_DIGEST_ANNOTATION, toc_digest)
        .build();
    registry.push_image(repo, "v1", &image);
    digest
}

/// The tar inside an eStargz (or any multi-member gzip) blob.
fn gunzip(blob: &[u8]) -> Vec<u8> {
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut tar)
        .unwrap();
    tar
}

fn layers_state(imagefs: &Imagefs, reference: &str) -> String {
    let out = imagefs.cmd(["layers", reference]).run();
    out.assert_success();
    let text = out.stdout_str();
    let cols: Vec<&str> = text.trim_end().split('\t').collect();
    assert_eq!(cols[3], "estargz", "{text}");
    cols[4].to_owned()
}

#[test]
fn a_read_inside_one_chunk_fetches_only_that_chunk_and_remounts_offline() {
    let registry = Registry::start(Auth::Anonymous);
    let w = written();
    let digest = push(&registry, "lazy", w.blob.clone(), &w);
    let reference = registry.reference("lazy:v1");
    let imagefs = Imagefs::new();
    let m = Mount::new_with(&imagefs, &[], NO_PREFETCH, &reference);

    // Listing needs the TOC only: footer + TOC, two small Range reads.
    assert_eq!(fs::read_dir(m.p("data")).unwrap().count(), 3);
    let log = registry.wait_for_access_log("footer and TOC", |l| blob_gets(l, &digest).len() >= 2);
    let gets = blob_gets(&log, &digest);
    assert_eq!(gets.len(), 2, "{}", registry.log());
    assert_eq!(gets[0].bytes, FOOTER_SIZE as u64);
    assert_eq!(layers_state(&imagefs, &reference), "toc-only");

    // A read in the middle of the middle chunk: that chunk, one request.
    let middle = &w.big_chunks[1];
    let at = middle.chunk_offset + CHUNK / 2;
    let mut buf = vec![0u8; 4096];
    fs::File::open(m.p("data/big"))
        .unwrap()
        .read_exact_at(&mut buf, at)
        .unwrap();
    assert_eq!(buf, w.big[at as usize..at as usize + 4096]);
    let log = registry.wait_for_access_log("the chunk", |l| blob_gets(l, &digest).len() >= 3);
    let gets = blob_gets(&log, &digest);
    assert_eq!(gets.len(), 3, "{}", registry.log());
    assert_eq!(gets[2].status, 206);
    assert_eq!(gets[2].bytes, middle.compressed_len, "{}", registry.log());
    assert_eq!(
        layers_state(&imagefs, &reference),
        format!("partial:{}/{}", CHUNK, w.big.len() + 11 + 5000)
    );

    // The whole file, and a second file.
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    assert_eq!(fs::read(m.p("data/small")).unwrap(), b"small file\n");
    m.unmount();

    // Offline: what was read is local, the rest is EIO.
    drop(registry);
    let m = Mount::new(&imagefs, &["--offline"], &reference);
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    assert_eq!(fs::read(m.p("data/small")).unwrap(), b"small file\n");
    let err = fs::read(m.p("data/other")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    m.unmount();
}

#[test]
fn a_corrupt_chunk_is_eio_and_nothing_is_recorded() {
    let registry = Registry::start(Auth::Anonymous);
    let w = written();
    let bad_chunk = &w.big_chunks[1];
    let mut bad = w.blob.clone();
    let mid = (bad_chunk.offset + bad_chunk.compressed_len / 2) as usize;
    bad[mid] ^= 0xff;
    push(&registry, "tampered", bad, &w);
    let reference = registry.reference("tampered:v1");
    let imagefs = Imagefs::new();
    let m = Mount::new_with(&imagefs, &[], NO_PREFETCH, &reference);

    let mut buf = vec![0u8; 4096];
    let big = fs::File::open(m.p("data/big")).unwrap();
    // The first chunk is intact; the middle one fails verification.
    big.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, w.big[..4096]);
    let err = big
        .read_exact_at(&mut buf, bad_chunk.chunk_offset + CHUNK / 2)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Again: still EIO (nothing was recorded as present), and other files are fine.
    let err = big
        .read_exact_at(&mut buf, bad_chunk.chunk_offset + CHUNK / 2)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(big);
    assert_eq!(fs::read(m.p("data/small")).unwrap(), b"small file\n");
    assert_eq!(
        layers_state(&imagefs, &reference),
        format!("partial:{}/{}", CHUNK + 11, w.big.len() + 11 + 5000)
    );
    m.unmount();
}

#[test]
fn a_toc_digest_mismatch_is_eio_for_the_tree_and_stores_nothing() {
    let registry = Registry::start(Auth::Anonymous);
    let mut w = written();
    w.toc_digest = imagefs::oci::Digest::sha256(b"another toc").to_string();
    push(&registry, "wrongtoc", w.blob.clone(), &w);
    let reference = registry.reference("wrongtoc:v1");
    let imagefs = Imagefs::new();
    let m = Mount::new_with(&imagefs, &[], NO_PREFETCH, &reference);
    let err = fs::read_dir(m.p("data")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(layers_state(&imagefs, &reference), "not-cached");
    m.unmount();
}

#[test]
fn a_walk_over_small_files_takes_their_neighbours_along_in_few_requests() {
    // 600 files of 1,500 incompressible bytes: about 900 KB of chunks in the blob.
    const FILES: usize = 600;
    let contents: Vec<Vec<u8>> = (0..FILES).map(|i| noise(1500, 100 + i as u64)).collect();
    let mut entries = vec![(IndexEntry::new("walk", EntryKind::Dir, 0o755), Vec::new())];
    for (i, c) in contents.iter().enumerate() {
        let mut e = IndexEntry::new(format!("walk/f{i:03}"), EntryKind::File, 0o644);
        e.size = c.len() as u64;
        entries.push((e, c.clone()));
    }
    let options = WriterOptions {
        chunk_size: CHUNK,
        landmark: Landmark::NoPrefetch,
        legacy_footer: false,
        compression: 9,
    };
    let w = build(&entries, &options).expect("an eStargz layer");
    let registry = Registry::start(Auth::Anonymous);
    let tar = gunzip(&w.blob);
    let digest = push_layer(
        &registry,
        "walk",
        tar,
        w.blob.clone(),
        &w.toc_digest.to_string(),
    );
    let imagefs = Imagefs::new();
    // No background prefetch: every byte fetched is for the walk.
    let m = Mount::new_with(
        &imagefs,
        &[],
        &["--prefetch", "none"],
        &registry.reference("walk:v1"),
    );
    for (i, c) in contents.iter().enumerate() {
        assert_eq!(
            &fs::read(m.p(format!("walk/f{i:03}"))).unwrap(),
            c,
            "f{i:03}"
        );
    }
    let log = registry.wait_for_access_log("the walk", |l| blob_gets(l, &digest).len() >= 3);
    let gets = blob_gets(&log, &digest);
    // Footer, TOC, then one request per 512 KiB of files (not one per file).
    assert!(
        gets.len() <= 2 + 3,
        "{} requests:\n{}",
        gets.len(),
        registry.log()
    );
    let fetched: u64 = gets[2..].iter().map(|g| g.bytes).sum();
    assert!(
        fetched <= w.blob.len() as u64,
        "{fetched} bytes: none twice"
    );
    m.unmount();
}

#[test]
fn concurrent_cold_readers_of_one_chunk_cause_one_request() {
    let registry = Registry::start(Auth::Anonymous);
    let w = written();
    let digest = push(&registry, "flight", w.blob.clone(), &w);
    let imagefs = Imagefs::new();
    let m = Mount::new_with(&imagefs, &[], NO_PREFETCH, &registry.reference("flight:v1"));
    assert_eq!(fs::read_dir(m.p("data")).unwrap().count(), 3);

    let middle = w.big_chunks[1].clone();
    let barrier = std::sync::Barrier::new(16);
    std::thread::scope(|s| {
        for i in 0..16u64 {
            let (barrier, path, w, middle) = (&barrier, m.p("data/big"), &w, &middle);
            s.spawn(move || {
                let f = fs::File::open(path).unwrap();
                let at = middle.chunk_offset + i * 8192;
                let mut buf = vec![0u8; 4096];
                barrier.wait();
                f.read_exact_at(&mut buf, at).unwrap();
                assert_eq!(buf, w.big[at as usize..at as usize + 4096], "reader {i}");
            });
        }
    });
    let log = registry.wait_for_access_log("the chunk", |l| blob_gets(l, &digest).len() >= 3);
    let gets = blob_gets(&log, &digest);
    assert_eq!(gets.len(), 3, "footer, TOC, one chunk:\n{}", registry.log());
    assert_eq!(gets[2].bytes, middle.compressed_len);
    m.unmount();
}

#[test]
fn a_sequential_reader_gets_the_next_chunks_fetched_ahead() {
    let registry = Registry::start(Auth::Anonymous);
    let w = written();
    let digest = push(&registry, "ahead", w.blob.clone(), &w);
    let reference = registry.reference("ahead:v1");
    let imagefs = Imagefs::new();
    let m = Mount::new_with(&imagefs, &[], NO_PREFETCH, &reference);
    assert_eq!(fs::read_dir(m.p("data")).unwrap().count(), 3);

    // The first page of `big`, with the kernel's own readahead off: the FUSE read covers
    // chunk 0 only, and starts the file, so imagefs fetches the next chunks in the background.
    let f = fs::File::open(m.p("data/big")).unwrap();
    {
        use std::os::fd::AsRawFd as _;
        // SAFETY: a valid fd; advice only.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        assert_eq!(rc, 0);
    }
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, w.big[..4096]);
    let log = registry.wait_for_access_log("the read-ahead", |l| blob_gets(l, &digest).len() >= 4);
    let gets = blob_gets(&log, &digest);
    assert_eq!(
        gets.len(),
        4,
        "footer, TOC, chunk 0, chunks 1-2:\n{}",
        registry.log()
    );
    assert_eq!(gets[2].bytes, w.big_chunks[0].compressed_len);
    let ahead = w.big_chunks[1].compressed_len + w.big_chunks[2].compressed_len;
    assert_eq!(gets[3].bytes, ahead, "{}", registry.log());
    // The rest of the file is then read without another request.
    let want = format!("partial:{}/{}", w.big.len(), w.big.len() + 11 + 5000);
    assert!(
        wait_until(TIMEOUT, || layers_state(&imagefs, &reference) == want),
        "the read-ahead's chunks are not recorded: {}",
        layers_state(&imagefs, &reference)
    );
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    assert_eq!(
        blob_gets(&registry.access_log(), &digest).len(),
        4,
        "{}",
        registry.log()
    );
    drop(f);
    m.unmount();
}

#[test]
fn mixed_images_merge_a_whole_layer_and_a_lazy_one() {
    let registry = Registry::start(Auth::Anonymous);
    let w = written();
    let base = Layer::new(
        &[
            Entry::dir("etc"),
            Entry::file("etc/base", "from the plain layer\n"),
            Entry::dir("data"),
            Entry::file("data/big", "shadowed by the eStargz layer"),
        ],
        Compression::Gzip,
    );
    let base_digest = base.digest.clone();
    let base_size = base.blob.len() as u64;
    let lazy = Layer::from_parts(w.tar.clone(), w.blob.clone(), Compression::Gzip);
    let lazy_digest = lazy.digest.clone();
    let image = ImageBuilder::new(Format::Oci)
        .layer(base)
        .layer(lazy)
        .layer_annotation(TOC_DIGEST_ANNOTATION, &w.toc_digest)
        .build();
    registry.push_image("mixed", "v1", &image);
    let imagefs = Imagefs::new();
    let m = Mount::new_with(&imagefs, &[], NO_PREFETCH, &registry.reference("mixed:v1"));
    assert_eq!(
        fs::read_to_string(m.p("etc/base")).unwrap(),
        "from the plain layer\n"
    );
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    let log =
        registry.wait_for_access_log("the plain layer", |l| blob_gets(l, &base_digest).len() >= 2);
    // The plain layer: its last 51 bytes (no eStargz footer there), then the whole blob once.
    let plain: Vec<(u16, u64)> = blob_gets(&log, &base_digest)
        .iter()
        .map(|l| (l.status, l.bytes))
        .collect();
    assert_eq!(
        plain,
        [(206, FOOTER_SIZE as u64), (200, base_size)],
        "{}",
        registry.log()
    );
    assert!(
        blob_gets(&log, &lazy_digest)
            .iter()
            .all(|l| l.status == 206),
        "{}",
        registry.log()
    );
    m.unmount();
}

#[test]
fn prefetch_all_makes_every_file_local_for_offline_remounts() {
    let registry = Registry::start(Auth::Anonymous);
    let w = written();
    push(&registry, "prefetch", w.blob.clone(), &w);
    let reference = registry.reference("prefetch:v1");
    let imagefs = Imagefs::new();
    let m = Mount::new_with(&imagefs, &[], &["--prefetch", "all"], &reference);
    // Prefetching starts with the tree.
    assert!(m.p("data/small").is_file());
    assert!(
        wait_until(TIMEOUT, || layers_state(&imagefs, &reference) == "local"),
        "prefetch did not finish: {}\n{}",
        layers_state(&imagefs, &reference),
        registry.log()
    );
    m.unmount();

    drop(registry);
    let m = Mount::new(&imagefs, &["--offline"], &reference);
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    assert_eq!(fs::read(m.p("data/small")).unwrap(), b"small file\n");
    assert_eq!(fs::read(m.p("data/other")).unwrap(), noise(5000, 2));
    m.unmount();
}

/// `imagefs layers` rows as (format, state).
fn layer_states(imagefs: &Imagefs, reference: &str, global: &[&str]) -> Vec<(String, String)> {
    let out = imagefs.cmd(global).arg("layers").arg(reference).run();
    out.assert_success();
    out.stdout_str()
        .lines()
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            (cols[3].to_owned(), cols[4].to_owned())
        })
        .collect()
}

/// Offset of `.prefetch.landmark` in layer 1 of the optimised fixture (tests/fixtures/README.md).
const OPT_LANDMARK: u64 = 1_063_890;

#[test]
fn the_default_prefetch_takes_the_landmark_region_in_one_request_then_the_rest() {
    let registry = Registry::start(Auth::Anonymous);
    skopeo_copy_fixture(
        &fixture_path("busybox-estargz-opt.oci.tar"),
        &registry,
        "busybox:estargz-opt",
    );
    let reference = registry.reference("busybox:estargz-opt");
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &reference);
    let layers = layers_of(&m);
    // Meta files do not count as an access: no layer blob was asked for.
    let log = registry.access_log();
    for (d, _) in &layers {
        assert!(blob_gets(&log, d).is_empty(), "{}", registry.log());
    }

    let os_release = fs::read_to_string(m.p("etc/os-release")).unwrap();
    assert!(os_release.contains("NAME="), "{os_release:?}");
    let first = &layers[0].0;
    let log = registry.wait_for_access_log("footer, TOC, landmark region", |l| {
        blob_gets(l, first).len() >= 3
    });
    let gets = blob_gets(&log, first);
    // Footer, TOC, then the landmark region [0, 1063890), all before the background fill.
    assert_eq!(gets[0].bytes, FOOTER_SIZE as u64, "{}", registry.log());
    assert_eq!(gets[2].bytes, OPT_LANDMARK, "{}", registry.log());
    assert!(gets.iter().all(|g| g.status == 206), "{}", registry.log());
    assert_eq!(
        gets.iter().filter(|g| g.bytes == OPT_LANDMARK).count(),
        1,
        "{}",
        registry.log()
    );

    // The background fill makes every layer local.
    let all_local = || {
        layer_states(&imagefs, &reference, &[])
            .iter()
            .all(|(f, s)| f == "estargz" && (s == "local" || s == "toc-only"))
    };
    assert!(
        wait_until(TIMEOUT, all_local),
        "{:?}\n{}",
        layer_states(&imagefs, &reference, &[]),
        registry.log()
    );
    assert_eq!(layer_states(&imagefs, &reference, &[])[0].1, "local");
    m.unmount();

    // Offline, everything reads.
    drop(registry);
    let m = Mount::new(&imagefs, &["--offline"], &reference);
    assert_expected_rootfs(&m, "the optimized fixture, offline");
    m.unmount();
}

/// The `Range` header's `bytes=A-B`, as `A..B+1`.
fn requested_range(r: &Recorded) -> Option<std::ops::Range<usize>> {
    let (a, b) = r.header("range")?.strip_prefix("bytes=")?.split_once('-')?;
    Some(a.parse().ok()?..b.parse::<usize>().ok()? + 1)
}

#[test]
fn a_registry_that_stops_honouring_range_gets_the_layer_fetched_whole_once() {
    let w = written();
    let layer = Layer::from_parts(w.tar.clone(), w.blob.clone(), Compression::Gzip);
    let digest = layer.digest.clone();
    let image = ImageBuilder::new(Format::Oci)
        .layer(layer)
        .layer_annotation(TOC_DIGEST_ANNOTATION, &w.toc_digest)
        .build();
    let (manifest, config) = (image.manifest.clone(), image.config.clone());
    let blob = w.blob.clone();
    let layer_gets = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let counter = layer_gets.clone();
    let layer_route = format!("/v2/lazy/blobs/{digest}");
    let adv = rt.block_on(Adversary::start(move |r| {
        let route = r.route();
        if route == "/v2/" {
            Reply::json(serde_json::json!({}))
        } else if route.starts_with("/v2/lazy/manifests/") {
            Reply::ok(manifest.bytes.clone()).header("content-type", &manifest.media_type)
        } else if route == format!("/v2/lazy/blobs/{}", config.digest) {
            Reply::ok(config.bytes.clone())
        } else if route == layer_route && r.method == "GET" {
            // Footer and TOC as asked; from then on the whole blob, whatever the Range.
            let n = counter.fetch_add(1, Ordering::SeqCst);
            match requested_range(r) {
                Some(range) if n < 2 => Reply::status(206)
                    .header(
                        "content-range",
                        &format!("bytes {}-{}/{}", range.start, range.end - 1, blob.len()),
                    )
                    .body(blob[range].to_vec()),
                _ => Reply::ok(blob.clone()),
            }
        } else {
            Reply::error(404, "NOT_FOUND", "not here")
        }
    }));
    let reference = format!("{}/lazy:v1", adv.host());
    let imagefs = Imagefs::new();
    let m = Mount::new_with(&imagefs, &[], NO_PREFETCH, &reference);
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    assert_eq!(fs::read(m.p("data/small")).unwrap(), b"small file\n");
    assert_eq!(fs::read(m.p("data/other")).unwrap(), noise(5000, 2));
    // Footer, TOC, the chunk request answered whole, then one whole fetch: not one per chunk.
    assert_eq!(layer_gets.load(Ordering::SeqCst), 4);
    m.unmount();
    drop(adv);
}

#[test]
fn a_registry_that_ignores_range_from_the_start_gets_the_layer_fetched_whole() {
    let w = written();
    let layer = Layer::from_parts(w.tar.clone(), w.blob.clone(), Compression::Gzip);
    let digest = layer.digest.clone();
    let image = ImageBuilder::new(Format::Oci)
        .layer(layer)
        .layer_annotation(TOC_DIGEST_ANNOTATION, &w.toc_digest)
        .build();
    let (manifest, config) = (image.manifest.clone(), image.config.clone());
    let blob = w.blob.clone();
    let layer_gets = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let counter = layer_gets.clone();
    let layer_route = format!("/v2/lazy/blobs/{digest}");
    let adv = rt.block_on(Adversary::start(move |r| {
        let route = r.route();
        if route == "/v2/" {
            Reply::json(serde_json::json!({}))
        } else if route.starts_with("/v2/lazy/manifests/") {
            Reply::ok(manifest.bytes.clone()).header("content-type", &manifest.media_type)
        } else if route == format!("/v2/lazy/blobs/{}", config.digest) {
            Reply::ok(config.bytes.clone())
        } else if route == layer_route && r.method == "GET" {
            counter.fetch_add(1, Ordering::SeqCst);
            Reply::ok(blob.clone())
        } else {
            Reply::error(404, "NOT_FOUND", "not here")
        }
    }));
    let reference = format!("{}/lazy:v1", adv.host());
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &reference);
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    assert_eq!(fs::read(m.p("data/other")).unwrap(), noise(5000, 2));
    // The footer request answered whole, then the layer once through the store.
    assert_eq!(layer_gets.load(Ordering::SeqCst), 2);
    m.unmount();
    drop(adv);
}

fn push_unannotated(registry: &Registry, repo: &str, w: &Written) -> String {
    let layer = Layer::from_parts(w.tar.clone(), w.blob.clone(), Compression::Gzip);
    let digest = layer.digest.clone();
    let image = ImageBuilder::new(Format::Oci).layer(layer).build();
    registry.push_image(repo, "v1", &image);
    digest
}

#[test]
fn an_unannotated_estargz_layer_is_found_by_its_footer_and_served_lazily() {
    let registry = Registry::start(Auth::Anonymous);
    let w = written();
    let digest = push_unannotated(&registry, "plain", &w);
    let reference = registry.reference("plain:v1");
    let imagefs = Imagefs::new();
    assert_eq!(
        layer_states(&imagefs, &reference, &[]),
        [("estargz".to_owned(), "not-cached".to_owned())]
    );
    let log = registry.wait_for_access_log("the footer", |l| !blob_gets(l, &digest).is_empty());
    let gets = blob_gets(&log, &digest);
    assert_eq!(gets.len(), 1, "{}", registry.log());
    assert_eq!(
        (gets[0].status, gets[0].bytes),
        (206, FOOTER_SIZE as u64),
        "{}",
        registry.log()
    );

    // Footer, TOC, and the one chunk of `small`: three Range requests, a sliver of the blob.
    let m = Mount::new_with(&imagefs, &[], NO_PREFETCH, &reference);
    assert_eq!(fs::read(m.p("data/small")).unwrap(), b"small file\n");
    let log =
        registry.wait_for_access_log("footer, TOC, chunk", |l| blob_gets(l, &digest).len() >= 4);
    let gets = &blob_gets(&log, &digest)[1..];
    assert_eq!(gets.len(), 3, "{}", registry.log());
    assert!(gets.iter().all(|g| g.status == 206), "{}", registry.log());
    let served: u64 = gets.iter().map(|g| g.bytes).sum();
    assert!(
        served * 20 < w.blob.len() as u64,
        "{served} of {} bytes:\n{}",
        w.blob.len(),
        registry.log()
    );
    assert_eq!(
        layers_state(&imagefs, &reference),
        format!("partial:11/{}", w.big.len() + 11 + 5000)
    );
    m.unmount();

    // The TOC was kept: offline, what was read is served, the rest is EIO.
    drop(registry);
    let m = Mount::new(&imagefs, &["--offline"], &reference);
    assert_eq!(fs::read(m.p("data/small")).unwrap(), b"small file\n");
    let err = fs::read(m.p("data/big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    m.unmount();
}

#[test]
fn require_toc_digest_fetches_an_unannotated_estargz_layer_whole() {
    let registry = Registry::start(Auth::Anonymous);
    let w = written();
    let digest = push_unannotated(&registry, "plain", &w);
    let reference = registry.reference("plain:v1");
    let imagefs = Imagefs::new();
    let m = Mount::new_with(&imagefs, &[], &["--require-toc-digest"], &reference);
    assert_eq!(fs::read(m.p("data/small")).unwrap(), b"small file\n");
    let log = registry.wait_for_access_log("the blob", |l| !blob_gets(l, &digest).is_empty());
    let gets = blob_gets(&log, &digest);
    assert_eq!(gets.len(), 1, "{}", registry.log());
    assert_eq!(
        (gets[0].status, gets[0].bytes),
        (200, w.blob.len() as u64),
        "{}",
        registry.log()
    );
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    m.unmount();
    // Once cached, the footer is read from the cached blob, offline.
    assert_eq!(
        layer_states(&imagefs, &reference, &["--offline"]),
        [("estargz".to_owned(), "cached".to_owned())]
    );
}
