//! End to end: `imagefs mount` of images in a real registry, checked against a peer (`skopeo`
//! and `umoci unpack`), the interop fixtures, and real consumers (`chroot`, `runc`); plus the
//! mount's life cycle: meta files before any layer, offline remounts, concurrent cold readers,
//! unmounting under load, failures that leave nothing behind, EROFS.
//!
//! Every mount is a [`Mount`] guard (unmounted in `Drop`); readiness and exits are polled from
//! `/proc` with bounded loops.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use crate::support::mounts::{
    Mount, TIMEOUT, daemon_pids, is_mounted, mount_cmd, mountpoint_dir, umount_cmd, wait_until,
};
use crate::support::oracle::Oracle;
use crate::support::sparse::{
    Segment, expanded_sha256, gnu_sparse_entry, pax_sparse_entry, tar_with_raw,
};
use crate::support::tree::{self, Compare, Snapshot, Walk};
use crate::support::{Auth, image::DEFAULT_MTIME, noise};
use crate::support::{
    Cmd, Compression, Entry, Format, Image, ImageBuilder, Imagefs, IndexBuilder, Layer, Registry,
    fixture_path, sha256_digest, skopeo_copy_fixture,
};

/// imagefs's own files at the root of every mount.
const META_FILES: [&str; 4] = [".config.json", ".manifest.json", ".digest", ".id"];

/// A valid v2 `security.capability` (cap_net_bind_service, effective): the kernel parses this
/// xattr on set, so it must be well-formed for umoci to restore it.
const CAP_V2: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// The mounted tree. The root is listed first: until something needs the image tree, `stat`
/// of the mount root answers placeholder attributes (0755, root, mtime 0, not cached) so that
/// it never starts the fetch; the image's root metadata shows from the first real access on.
pub(crate) fn walk_mount(m: &Mount) -> Snapshot {
    let listed = fs::read_dir(m.path()).expect("list the mount root").count();
    assert!(listed > 0, "empty mount root");
    let walk = Walk {
        skip_root_names: META_FILES.iter().map(|n| n.as_bytes().to_vec()).collect(),
        hash: true,
    };
    Snapshot::take(m.path(), &walk)
}

pub(crate) fn walk_dir(root: &Path) -> Snapshot {
    Snapshot::take(
        root,
        &Walk {
            skip_root_names: Vec::new(),
            hash: true,
        },
    )
}

fn assert_meta_files_present(m: &Mount) {
    for name in META_FILES {
        let md = fs::symlink_metadata(m.p(name))
            .unwrap_or_else(|e| panic!("meta file {name} missing from the mount: {e}"));
        assert!(md.is_file() && md.len() > 0, "{name}: {md:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The images

/// The layers that exercise every overlay rule, base first.
pub(crate) fn rule_layers() -> [Vec<Entry>; 3] {
    let ns = |secs: i64, nanos: u32| (secs, nanos);
    let (t1, n1) = ns(1_700_000_000, 123_456_789);
    let long_dir = "long/".to_owned() + &"d".repeat(90);
    let pax_long = format!("{long_dir}/a-file-whose-path-needs-a-pax-record");
    let gnu_long = format!("{long_dir}/a-file-whose-path-needs-a-gnu-longlink-entry");
    let long_target = "../".repeat(10) + &"t".repeat(100);
    let l1 = vec![
        Entry::dir("").mode(0o755).mtime(DEFAULT_MTIME + 1, 111),
        Entry::dir("etc"),
        Entry::file("etc/os-release", "ID=imagefs-oracle\nNAME=\"first\"\n"),
        Entry::file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        Entry::dir("bin"),
        Entry::file("bin/busybox", noise(300_000, 1)).mode(0o755),
        Entry::symlink("bin/sh", "busybox"),
        Entry::symlink("abs", "/etc/os-release"),
        Entry::symlink("dangling", "nowhere/at/all"),
        Entry::file("empty", ""),
        // Deleted in layer 2: a file and a whole directory.
        Entry::dir("del"),
        Entry::file("del/file", "deleted in layer 2"),
        Entry::file("del/keep", "kept"),
        Entry::dir("deldir"),
        Entry::file("deldir/a", "a"),
        Entry::dir("deldir/sub"),
        Entry::file("deldir/sub/b", "b"),
        // Made opaque in layer 2, the opaque entry before / after the new children.
        Entry::dir("opq1"),
        Entry::file("opq1/old1", "old"),
        Entry::dir("opq1/olddir"),
        Entry::file("opq1/olddir/x", "x"),
        Entry::dir("opq2"),
        Entry::file("opq2/old2", "old"),
        // Type changes in layer 2.
        Entry::file("f2d", "a file that becomes a directory"),
        Entry::dir("d2f"),
        Entry::file("d2f/x", "a child of a directory that becomes a file"),
        // Deleted in layer 2, re-created (as a directory) in layer 3.
        Entry::file("gone", "v1"),
        // Deleted and re-created within layer 2, in both tar orders.
        Entry::file("again", "v1"),
        Entry::file("again2", "v1"),
        // Hardlinks: inside this layer, and across layers (the link comes in layer 2).
        Entry::dir("hl"),
        Entry::file("hl/orig", "the original"),
        Entry::file("hl/in1", "linked inside layer 1"),
        Entry::hardlink("hl/in2", "hl/in1"),
        // Special files.
        Entry::dir("dev"),
        Entry::char_device("dev/null", 1, 3),
        Entry::char_device("dev/tty", 5, 0).mode(0o620).owner(0, 5),
        Entry::block_device("dev/sda", 8, 0),
        Entry::block_device("dev/big", 259, 0x12345),
        Entry::fifo("dev/fifo"),
        // Extended attributes.
        Entry::dir("x").xattr("user.dir", "on a directory"),
        Entry::file("x/empty-value", "e")
            .xattr("user.empty", "")
            .xattr("user.k", "v\0binary"),
        Entry::file("x/cap", "pretend binary")
            .mode(0o755)
            .xattr("security.capability", CAP_V2),
        Entry::file("x/trusted", "t").xattr("trusted.imagefs", "t"),
        // Modes and owners.
        Entry::dir("modes"),
        Entry::file("modes/suid", "s").mode(0o4755),
        Entry::file("modes/sgid", "s").mode(0o2755),
        Entry::file("modes/all", "s").mode(0o7777),
        Entry::file("modes/none", "s").mode(0o000),
        Entry::dir("modes/sgid-dir").mode(0o2775),
        Entry::dir("modes/sticky").mode(0o1777),
        Entry::dir("owners").owner(123, 456),
        Entry::file("owners/u1000", "u").owner(1000, 1000),
        Entry::file("owners/big", "u").owner(3_000_000, 3_000_001),
        Entry::symlink("owners/link", "u1000").owner(1000, 1001),
        // mtimes with nanoseconds (PAX), on every kind of entry.
        Entry::dir("times").mtime(t1 + 5, 5),
        Entry::file("times/ns", "t").mtime(t1, n1),
        Entry::file("times/whole", "t").mtime(t1, 0),
        Entry::file("times/epoch", "t").mtime(0, 0),
        Entry::symlink("times/link", "ns").mtime(t1 + 1, 999_999_999),
        Entry::fifo("times/fifo").mtime(t1 + 2, 1),
        Entry::dir("times/sub").mtime(t1 + 3, 300),
        Entry::file("times/sub/child", "c").mtime(t1 + 4, 400),
        // Long names and link targets: PAX and GNU.
        Entry::dir("long"),
        Entry::dir(long_dir.as_str()),
        Entry::file(pax_long.as_str(), "pax"),
        Entry::file(gnu_long.as_str(), "gnu").gnu_long_names(),
        Entry::symlink("long/pax-target", long_target.as_str()),
        Entry::symlink("long/gnu-target", long_target.as_str()).gnu_long_names(),
        Entry::hardlink("long/hard-to-long", pax_long.as_str()),
        // Names that are not UTF-8.
        Entry::dir("utf"),
        Entry::file(&b"utf/\xff\xfe-latin1-caf\xe9"[..], "latin1"),
        Entry::dir(&b"utf/\xe9t\xe9"[..]),
        Entry::file(&b"utf/\xe9t\xe9/\x80child"[..], "child"),
        Entry::symlink("utf/link", &b"\xff\xfe-latin1-caf\xe9"[..]),
    ];
    let l2 = vec![
        Entry::whiteout("del/file"),
        Entry::whiteout("deldir"),
        Entry::opaque("opq1"),
        Entry::file("opq1/new1", "new"),
        Entry::file("opq2/new2", "new"),
        Entry::dir("opq2/newdir"),
        Entry::file("opq2/newdir/y", "y"),
        Entry::opaque("opq2"),
        Entry::dir("f2d"),
        Entry::file("f2d/child", "inside the former file"),
        Entry::file("d2f", "now a file"),
        Entry::whiteout("gone"),
        Entry::whiteout("again"),
        Entry::file("again", "v2, after its whiteout"),
        Entry::file("again2", "v2, before its whiteout"),
        Entry::whiteout("again2"),
        Entry::hardlink("hl/link2", "hl/orig"),
        Entry::dir("etc").mode(0o750).mtime(t1, 42),
        Entry::file("etc/os-release", "ID=imagefs-oracle\nNAME=\"second\"\n"),
        Entry::file("modes/suid", "replaced, no longer setuid").mode(0o755),
    ];
    let l3 = vec![
        Entry::dir("gone").mode(0o700),
        Entry::file("gone/inside", "re-created as a directory"),
        Entry::dir("deldir"),
        Entry::file("deldir/new", "re-created directory, old children gone"),
        Entry::file("bin/added-late", "top layer"),
    ];
    [l1, l2, l3]
}

/// 1 GiB + 64 KiB + 5 bytes, mostly holes: data at the start, beyond 1 GiB, and the last bytes.
/// Segment lengths are whole 512-byte blocks but for the last, as GNU tar writes them (the
/// `tar` crate refuses anything else in old-GNU sparse entries).
fn sparse_segments() -> (u64, Vec<Segment>) {
    let size = (1u64 << 30) + (64 << 10) + 5;
    let segs = vec![
        (0, noise(512, 6)),
        ((1 << 30) + 12_345, noise(96 * 512, 7)),
        (size - 5, b"tail!".to_vec()),
    ];
    (size, segs)
}

/// A base layer with the heavy cases: a 20,000-entry directory and a PAX sparse file > 1 GiB.
fn heavy_layer() -> Vec<Entry> {
    let mut entries = vec![Entry::dir(""), Entry::dir("many"), Entry::dir("big")];
    for i in 0..20_000 {
        let name = format!("many/f{i:05}");
        entries.push(if i % 1000 == 0 {
            Entry::file(name, format!("file {i}\n"))
        } else {
            Entry::file(name, "")
        });
    }
    let (size, segs) = sparse_segments();
    entries.push(pax_sparse_entry("big/sparse.img", size, &segs));
    entries
}

/// What to compare with umoci's tree: everything, except xattrs with an empty value. umoci
/// reads layers with Go's `archive/tar`, whose `mergePAX` skips every PAX record with an empty
/// value ("Keep the original USTAR value"), so `SCHILY.xattr.user.empty=` never reaches it (nor
/// containerd, which reads tars the same way; POSIX pax says an empty value deletes the
/// keyword). imagefs keeps such an xattr with an empty value, as GNU tar extracts it; the
/// tests check it against the image's intended value instead.
pub(crate) fn oracle_compare() -> Compare {
    Compare {
        ignore_empty_xattrs: true,
        ..Compare::default()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Oracle comparisons

/// Push, mount, unpack with the peer, compare entry by entry.
fn compare_with_oracle(
    registry: &Registry,
    repo_ref: &str,
    global: &[&str],
    platform: Option<&str>,
) -> (Snapshot, Snapshot) {
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, global, &registry.reference(repo_ref));
    let started = Instant::now();
    let got = walk_mount(&m);
    let walked = started.elapsed();
    assert_meta_files_present(&m);
    let oracle = Oracle::unpack(registry, repo_ref, platform);
    let want = walk_dir(&oracle.rootfs());
    eprintln!(
        "{repo_ref}: {} entries; mount walk+hash {walked:?}, skopeo+umoci {:?}",
        got.nodes.len(),
        oracle.took
    );
    tree::assert_same(repo_ref, &want, &got, &oracle_compare());
    m.unmount();
    (want, got)
}

#[test]
fn oci_image_with_every_rule_matches_umoci() {
    let registry = Registry::start(Auth::Anonymous);
    let [l1, l2, l3] = rule_layers();
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&heavy_layer(), Compression::Gzip))
        .layer(Layer::new(&l1, Compression::Gzip))
        .layer(Layer::new(&l2, Compression::Zstd))
        .layer(Layer::new(&l3, Compression::None))
        .build();
    registry.push_image("rules", "oci", &image);
    let (want, got) = compare_with_oracle(&registry, "rules:oci", &[], None);

    // The comparison is only as good as what the oracle holds: make sure the interesting
    // cases are really there (and that umoci restored what we compare).
    let n = |p: &str| got.get(p).clone();
    assert_eq!(
        want.nodes
            .keys()
            .filter(|k| k.starts_with(b"many/"))
            .count(),
        20_000
    );
    let (size, segs) = sparse_segments();
    let sparse = n("big/sparse.img");
    assert_eq!(sparse.size, Some(size));
    assert_eq!(sparse.sha256, Some(expanded_sha256(size, &segs)));
    assert_eq!(n("hl/orig").inode, n("hl/link2").inode);
    assert_eq!(n("hl/orig").nlink, 2);
    assert_eq!(n("dev/big").rdev, Some((259, 0x12345)));
    assert_eq!(n("modes/all").mode, 0o7777);
    assert_eq!(n("owners/big").uid, 3_000_000);
    assert_eq!(n("times/ns").mtime, (1_700_000_000, 123_456_789));
    assert_eq!(
        n("x/cap").xattrs,
        [(b"security.capability".to_vec(), CAP_V2.to_vec())]
    );
    assert_eq!(
        n("x/empty-value").xattrs,
        [
            (b"user.empty".to_vec(), b"".to_vec()),
            (b"user.k".to_vec(), b"v\0binary".to_vec())
        ]
    );
    assert!(got.nodes.contains_key(&b"utf/\xe9t\xe9/\x80child"[..]));
    for gone in [
        "del/file",
        "deldir/a",
        "opq1/old1",
        "opq1/olddir",
        "opq2/old2",
        "d2f/x",
    ] {
        assert!(!got.nodes.contains_key(gone.as_bytes()), "{gone}");
    }
    for kept in [
        "opq1/new1",
        "opq2/new2",
        "opq2/newdir/y",
        "f2d/child",
        "gone/inside",
    ] {
        assert!(got.nodes.contains_key(kept.as_bytes()), "{kept}");
    }
}

#[test]
fn docker_image_matches_umoci() {
    let registry = Registry::start(Auth::Anonymous);
    let [l1, l2, l3] = rule_layers();
    let image = ImageBuilder::new(Format::Docker)
        .layer(Layer::new(&l1, Compression::None))
        .layer(Layer::new(&l2, Compression::Gzip))
        .layer(Layer::new(&l3, Compression::Gzip))
        .build();
    registry.push_image("rules", "docker", &image);
    compare_with_oracle(&registry, "rules:docker", &[], None);
}

#[test]
fn platform_flag_picks_the_index_entry_umoci_picks() {
    let registry = Registry::start(Auth::Anonymous);
    let arch_layer = |arch: &str| {
        Layer::new(
            &[
                Entry::dir(""),
                Entry::dir("etc"),
                Entry::file("etc/arch", format!("{arch}\n")),
                Entry::file(format!("only-{arch}"), arch),
            ],
            Compression::Gzip,
        )
    };
    let amd64 = ImageBuilder::new(Format::Oci)
        .platform("linux/amd64")
        .layer(arch_layer("amd64"))
        .build();
    let arm64 = ImageBuilder::new(Format::Oci)
        .platform("linux/arm64")
        .layer(Layer::new(&rule_layers()[0], Compression::Zstd))
        .layer(arch_layer("arm64"))
        .build();
    let index = IndexBuilder::new(Format::Oci)
        .image(amd64)
        .image(arm64.clone())
        .attestation()
        .build();
    registry.push_index("multi", "v1", &index);
    let (_, got) = compare_with_oracle(
        &registry,
        "multi:v1",
        &["--platform", "linux/arm64"],
        Some("linux/arm64"),
    );
    assert!(got.nodes.contains_key(&b"only-arm64"[..]));
    assert!(!got.nodes.contains_key(&b"only-amd64"[..]));

    let imagefs = Imagefs::new();
    let m = Mount::new(
        &imagefs,
        &["--platform", "linux/arm64"],
        &registry.reference("multi:v1"),
    );
    assert_eq!(
        fs::read_to_string(m.p(".digest")).unwrap(),
        format!("{}\n", arm64.manifest.digest)
    );
    assert_eq!(
        fs::read(m.p(".manifest.json")).unwrap(),
        arm64.manifest.bytes
    );
}

/// umoci cannot read old-GNU sparse entries (Go's archive/tar: "unknown typeflag 'S'"
/// surfaces as umoci's error), so this case is checked against the content the entry encodes.
#[test]
fn gnu_sparse_file_over_1gib_reads_back() {
    let registry = Registry::start(Auth::Anonymous);
    let (size, segs) = sparse_segments();
    let tar = tar_with_raw(
        &[Entry::dir(""), Entry::dir("big")],
        &[gnu_sparse_entry("big/gnu-sparse.img", size, &segs)],
    );
    assert!(
        tar.len() < 1 << 20,
        "the tar must stay small: {}",
        tar.len()
    );
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::from_tar(tar, Compression::Gzip))
        .build();
    registry.push_image("sparse", "gnu", &image);
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &registry.reference("sparse:gnu"));
    let md = fs::metadata(m.p("big/gnu-sparse.img"))
        .unwrap_or_else(|e| panic!("stat: {e}; daemon log:\n{}", daemon_log(&imagefs)));
    assert_eq!(md.len(), size);
    assert_eq!(
        tree::sha256_file(&m.p("big/gnu-sparse.img")).unwrap(),
        expanded_sha256(size, &segs)
    );
    // The extracted copy in the cache stays sparse.
    let cached: u64 = du_bytes(&imagefs.cache_dir().join("layers"));
    assert!(
        cached < 64 << 20,
        "cache holds {cached} bytes for a sparse file"
    );
    m.unmount();
}

/// Allocated bytes under `dir`.
fn du_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let md = e.metadata().unwrap();
            if md.is_dir() {
                todo.push(e.path());
            } else {
                total += md.blocks() * 512;
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// The mount of a fixture (`what` names it) shows exactly `expected-rootfs.txt`.
#[track_caller]
pub(crate) fn assert_expected_rootfs(m: &Mount, what: &str) {
    let got = rootfs_lines(&walk_mount(m));
    let want: Vec<String> = fs::read_to_string(fixture_path("expected-rootfs.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        got.join("\n"),
        want.join("\n"),
        "{what}: the mount (left) differs from expected-rootfs.txt (right)"
    );
}

/// The mount in `expected-rootfs.txt`'s format: `PATH TYPE MODE SIZE SHA256-or-TARGET`.
pub(crate) fn rootfs_lines(snap: &Snapshot) -> Vec<String> {
    snap.nodes
        .iter()
        .map(|(path, n)| {
            let p = format!("/{}", tree::show(path));
            let (kind, size, last) = match n.kind {
                tree::Kind::Dir => ("dir", "-".to_owned(), "-".to_owned()),
                tree::Kind::File => (
                    "file",
                    n.size.unwrap().to_string(),
                    n.sha256
                        .clone()
                        .unwrap()
                        .trim_start_matches("sha256:")
                        .to_owned(),
                ),
                tree::Kind::Symlink => (
                    "symlink",
                    n.size.unwrap().to_string(),
                    tree::show(n.target.as_deref().unwrap()),
                ),
                other => panic!("{p}: unexpected {other:?} in a fixture"),
            };
            let p = if p == "/" {
                p
            } else {
                p.trim_end_matches('/').to_owned()
            };
            format!("{p} {kind} {:04o} {size} {last}", n.mode)
        })
        .collect()
}

fn check_fixture(archive: &str, tag: &str) {
    let registry = Registry::start(Auth::Anonymous);
    skopeo_copy_fixture(&fixture_path(archive), &registry, &format!("busybox:{tag}"));
    let imagefs = Imagefs::new();
    let m = Mount::new(
        &imagefs,
        &[],
        &registry.reference(&format!("busybox:{tag}")),
    );
    let root: BTreeSet<Vec<u8>> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    for meta in META_FILES {
        assert!(root.contains(meta.as_bytes()), "{archive}: no {meta}");
    }
    assert_expected_rootfs(&m, archive);
    m.unmount();
}

#[test]
fn fixture_gzip_shows_expected_rootfs() {
    check_fixture("busybox-gzip.oci.tar", "gzip");
}

#[test]
fn fixture_estargz_shows_expected_rootfs_without_estargz_files() {
    check_fixture("busybox-estargz.oci.tar", "estargz");
}

#[test]
fn fixture_estargz_optimized_shows_expected_rootfs_without_landmarks() {
    check_fixture("busybox-estargz-opt.oci.tar", "estargz-opt");
}

// ---------------------------------------------------------------------------------------------
// 2. Meta files before any layer byte

fn two_layer_image() -> Image {
    ImageBuilder::new(Format::Oci)
        .layer(Layer::new(
            &[
                Entry::dir(""),
                Entry::dir("etc"),
                Entry::file("etc/os-release", "ID=two\n"),
            ],
            Compression::Gzip,
        ))
        .layer(Layer::new(
            &[
                Entry::dir("data"),
                Entry::file("data/blob", noise(1 << 20, 3)),
            ],
            Compression::Zstd,
        ))
        .cmd(&["/bin/sh"])
        .build()
}

#[test]
fn meta_files_are_served_before_any_layer_is_fetched() {
    let registry = Registry::start(Auth::Anonymous);
    let image = two_layer_image();
    registry.push_image("meta", "v1", &image);
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &registry.reference("meta:v1"));

    assert_eq!(fs::read(m.p(".config.json")).unwrap(), image.config.bytes);
    assert_eq!(
        fs::read(m.p(".manifest.json")).unwrap(),
        image.manifest.bytes
    );
    assert_eq!(
        fs::read_to_string(m.p(".digest")).unwrap(),
        format!("{}\n", image.manifest.digest)
    );
    assert_eq!(
        fs::read_to_string(m.p(".id")).unwrap(),
        format!("{}\n", sha256_digest(&image.config.bytes))
    );
    // stat of the mount point and of the meta files must not fetch either.
    fs::metadata(m.path()).unwrap();
    for name in META_FILES {
        assert_eq!(fs::metadata(m.p(name)).unwrap().mode() & 0o7777, 0o444);
    }
    for layer in &image.layers {
        assert_eq!(
            registry.blob_gets(&layer.digest),
            0,
            "layer {} fetched before anything but meta files was read:\n{}",
            layer.digest,
            registry.log()
        );
    }

    let names: BTreeSet<String> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = [".config.json", ".manifest.json", ".digest", ".id"]
        .into_iter()
        .chain(["etc", "data"])
        .map(str::to_owned)
        .collect();
    assert_eq!(names, want);
    for layer in &image.layers {
        assert_eq!(registry.blob_fetches(&layer.digest), 1, "{}", layer.digest);
    }
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 3. Remounts without the network

#[test]
fn remounts_by_digest_and_offline_by_tag_need_no_registry() {
    let registry = Registry::start(Auth::Anonymous);
    let image = two_layer_image();
    registry.push_image("remount", "v1", &image);
    let reference = registry.reference("remount:v1");
    let imagefs = Imagefs::new();

    let m = Mount::new(&imagefs, &[], &reference);
    let first = walk_mount(&m);
    let digest = fs::read_to_string(m.p(".digest")).unwrap();
    m.unmount();

    let by_digest = registry.reference(&format!("remount@{}", digest.trim_end()));
    let before = registry.access_log().len();
    let m = Mount::new(&imagefs, &[], &by_digest);
    let second = walk_mount(&m);
    m.unmount();
    tree::assert_same("by digest", &first, &second, &Compare::default());
    let after = registry.access_log();
    assert_eq!(
        after.len(),
        before,
        "a by-digest remount of a cached image talked to the registry: {:?}",
        &after[before..]
    );

    drop(registry);
    let m = Mount::new(&imagefs, &["--offline"], &reference);
    let third = walk_mount(&m);
    assert_eq!(fs::read_to_string(m.p(".digest")).unwrap(), digest);
    m.unmount();
    tree::assert_same("offline by tag", &first, &third, &Compare::default());

    // And without --offline, a tag needs the (now gone) registry: a clear failure.
    let (_dir, mp) = mountpoint_dir();
    let out = mount_cmd(&imagefs, &["--timeout", "5s"], &reference, &mp).run();
    assert!(!out.status.success(), "{}", out.report());
    assert!(!is_mounted(&mp));
    assert!(wait_until(TIMEOUT, || daemon_pids(&mp).is_empty()));
    eprintln!("tag without registry: {}", out.stderr_str().trim());
}

// ---------------------------------------------------------------------------------------------
// 4, 5. Real consumers: chroot and runc

#[test]
fn chroot_runs_busybox_from_the_fixture_mount() {
    let registry = Registry::start(Auth::Anonymous);
    skopeo_copy_fixture(
        &fixture_path("busybox-gzip.oci.tar"),
        &registry,
        "busybox:gzip",
    );
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &["-v"], &registry.reference("busybox:gzip"));
    let started = Instant::now();
    let out = Cmd::program("chroot")
        .arg(m.path())
        .args(["/bin/sh", "-c", "cat /etc/os-release"])
        .run();
    let cold = started.elapsed();
    out.assert_success();
    assert!(
        out.stdout_str().contains("ID=imagefs-fixture"),
        "{}",
        out.report()
    );
    let started = Instant::now();
    Cmd::program("chroot")
        .arg(m.path())
        .args(["/bin/sh", "-c", "cat /etc/os-release"])
        .run()
        .assert_success();
    let warm = started.elapsed();
    // Reads wait for the whole merged tree: when the first cat is done, both layers are in.
    let layers_fetched = registry
        .access_log()
        .iter()
        .filter(|l| l.method == "GET" && l.uri.contains("/blobs/") && l.status == 200)
        .count();
    eprintln!(
        "MEASURE fixture busybox-gzip: imagefs mount took {:?}; first chroot cat /etc/os-release \
         {cold:?} after mount returned, second {warm:?}; blob GETs (config + layers) when the \
         first cat returned: {layers_fetched}; daemon log: {}",
        m.took,
        tree_ready_line(&imagefs)
    );
    m.unmount();
}

/// Everything the mount daemons of `imagefs` logged.
fn daemon_log(imagefs: &Imagefs) -> String {
    let mut out = String::new();
    for e in fs::read_dir(imagefs.cache_dir().join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        out.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
    }
    out
}

/// The daemon's "image tree ready" log line (fetch and merge times), if logged.
fn tree_ready_line(imagefs: &Imagefs) -> String {
    let logs = imagefs.cache_dir().join("logs");
    let mut found = String::new();
    for e in fs::read_dir(&logs).into_iter().flatten().flatten() {
        let text = fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("image tree ready")) {
            found = line.to_owned();
        }
    }
    found
}

/// A busybox rootfs built from the host's static busybox, with the directories a runtime
/// mounts over (a read-only rootfs cannot get them created).
fn busybox_image() -> Image {
    let busybox = fs::read("/bin/busybox").expect("/bin/busybox (install busybox-static)");
    let mut entries = vec![Entry::dir("")];
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root"] {
        entries.push(Entry::dir(d));
    }
    entries.push(Entry::file("bin/busybox", busybox).mode(0o755));
    for applet in ["sh", "cat", "ls", "echo"] {
        entries.push(Entry::symlink(format!("bin/{applet}"), "busybox"));
    }
    entries.push(Entry::file(
        "etc/os-release",
        "ID=imagefs-busybox\nNAME=\"imagefs runc test\"\n",
    ));
    ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&entries, Compression::Gzip))
        .env(&["PATH=/bin"])
        .cmd(&["/bin/sh"])
        .build()
}

/// `runc delete -f` on drop.
struct Container {
    state: tempfile::TempDir,
    id: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        crate::support::survive::runc_delete(self.state.path(), &self.id);
    }
}

#[test]
fn runc_runs_a_container_with_the_mount_as_read_only_rootfs() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("busybox", "runc", &busybox_image());
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &registry.reference("busybox:runc"));

    let bundle = tempfile::tempdir().unwrap();
    let (config_path, config) =
        crate::support::survive::runc_spec(bundle.path(), m.path(), "cat /etc/os-release");
    fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

    let container = Container {
        state: tempfile::tempdir().unwrap(),
        id: format!("imagefs-it-{}", std::process::id()),
    };
    let out = Cmd::program("runc")
        .arg("--root")
        .arg(container.state.path())
        .args(["run", "--bundle"])
        .arg(bundle.path())
        .arg(&container.id)
        .timeout(Duration::from_secs(60))
        .run();
    out.assert_success();
    assert!(
        out.stdout_str().contains("ID=imagefs-busybox"),
        "{}",
        out.report()
    );
    drop(container);
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 6. Concurrent cold readers

#[test]
fn concurrent_cold_readers_get_the_same_bytes_from_one_fetch() {
    let registry = Registry::start(Auth::Anonymous);
    let content = noise(24 << 20, 11);
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(
            &[Entry::dir(""), Entry::file("small", "s")],
            Compression::Gzip,
        ))
        .layer(Layer::new(
            &[Entry::dir("data"), Entry::file("data/big.bin", &content)],
            Compression::Gzip,
        ))
        .build();
    registry.push_image("concurrent", "v1", &image);
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &registry.reference("concurrent:v1"));
    let path = m.p("data/big.bin");
    let want = sha256_digest(&content);
    let barrier = Arc::new(Barrier::new(16));
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let path = path.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                fs::read(&path).map(|b| sha256_digest(&b))
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap().unwrap(), want);
    }
    for layer in &image.layers {
        assert_eq!(
            registry.blob_fetches(&layer.digest),
            1,
            "layer {} fetched more than once:\n{}",
            layer.digest,
            registry.log()
        );
    }
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 7. Unmounting while a read is in flight

/// What a reader thread reports: full passes over the file, and how it ended.
struct Reader {
    passes: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<io::Result<()>>,
    thread: std::thread::JoinHandle<()>,
}

impl Reader {
    /// Reads `path` in full again and again, checking every pass against `want` (sha256).
    /// `hold`: through one descriptor kept open throughout; else opening it for every pass.
    fn start(path: std::path::PathBuf, want: String, hold: bool) -> Reader {
        let passes = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        let thread = {
            let (passes, stop) = (passes.clone(), stop.clone());
            std::thread::spawn(move || {
                let result = (|| -> io::Result<()> {
                    let mut held = if hold {
                        Some(fs::File::open(&path)?)
                    } else {
                        None
                    };
                    while !stop.load(Ordering::SeqCst) {
                        let mut fresh;
                        let f = match &mut held {
                            Some(f) => {
                                io::Seek::seek(f, io::SeekFrom::Start(0))?;
                                f
                            }
                            None => {
                                fresh = fs::File::open(&path)?;
                                &mut fresh
                            }
                        };
                        let mut content = Vec::new();
                        f.read_to_end(&mut content)?;
                        if sha256_digest(&content) != want {
                            return Err(io::Error::other("a pass read the wrong bytes"));
                        }
                        passes.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                })();
                let _ = tx.send(result);
            })
        };
        Reader {
            passes,
            stop,
            done,
            thread,
        }
    }

    fn passes(&self) -> usize {
        self.passes.load(Ordering::SeqCst)
    }

    /// Asks it to stop and returns how it ended; panics if it hangs.
    fn finish(self) -> io::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let r = self
            .done
            .recv_timeout(TIMEOUT)
            .expect("a reader hung after umount");
        self.thread.join().unwrap();
        r
    }
}

#[test]
fn umount_during_reads_detaches_and_the_daemon_exits() {
    let registry = Registry::start(Auth::Anonymous);
    let content = noise(32 << 20, 5);
    let want = sha256_digest(&content);
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(
            &[Entry::dir(""), Entry::file("large", &content)],
            Compression::Gzip,
        ))
        .build();
    registry.push_image("busy", "v1", &image);
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &registry.reference("busy:v1"));
    let daemon = m.daemon_pid();
    let alive =
        || Path::new(&format!("/proc/{daemon}")).exists() && !daemon_pids(m.path()).is_empty();

    // One reader keeps its descriptor open across the umount, one reopens for every pass.
    let holder = Reader::start(m.p("large"), want.clone(), true);
    let reopener = Reader::start(m.p("large"), want, false);
    assert!(
        wait_until(TIMEOUT, || holder.passes() >= 1 && reopener.passes() >= 1),
        "the readers made no progress"
    );
    let started = Instant::now();
    let out = umount_cmd(m.path()).run();
    let took = started.elapsed();
    out.assert_success();
    assert!(
        !is_mounted(m.path()),
        "still in mountinfo after imagefs umount returned"
    );
    // The reopening reader cannot open the detached path any more.
    let reopened = reopener
        .done
        .recv_timeout(TIMEOUT)
        .expect("the reopening reader hung after umount");
    assert_eq!(
        reopened.as_ref().map_err(io::Error::kind).unwrap_err(),
        io::ErrorKind::NotFound,
        "{reopened:?}"
    );
    reopener.thread.join().unwrap();
    // The open descriptor still reads correct bytes from the lazily detached mount.
    let passes = holder.passes();
    assert!(
        wait_until(TIMEOUT, || holder.passes() >= passes + 2),
        "the open descriptor stopped working after a lazy umount"
    );
    assert!(
        alive(),
        "the daemon exited while a descriptor was still open"
    );
    holder
        .finish()
        .expect("the open descriptor failed after umount");
    assert!(
        wait_until(TIMEOUT, || !alive()),
        "daemon {daemon} still running after the last descriptor closed"
    );
    eprintln!("MEASURE umount with an open, busy descriptor returned after {took:?}");
}

#[test]
fn sigterm_to_the_daemon_unmounts_and_exits() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("term", "v1", &two_layer_image());
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &registry.reference("term:v1"));
    assert_eq!(
        fs::read_to_string(m.p("etc/os-release")).unwrap(),
        "ID=two\n"
    );
    let daemon = m.daemon_pid();
    // SAFETY: kill(2) has no memory effects; the pid is our daemon.
    assert_eq!(
        unsafe { libc::kill(daemon as libc::pid_t, libc::SIGTERM) },
        0
    );
    assert!(
        wait_until(TIMEOUT, || !is_mounted(m.path())),
        "still mounted after SIGTERM"
    );
    assert!(
        wait_until(TIMEOUT, || daemon_pids(m.path()).is_empty()),
        "daemon still running after SIGTERM"
    );
    let log = daemon_log(&imagefs);
    assert!(!log.contains("ERROR"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// 8. Failed mounts leave nothing behind

#[test]
fn failed_mounts_exit_non_zero_and_leave_nothing_mounted() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("app", "v1", &two_layer_image());
    let imagefs = Imagefs::new();

    let (_dir, mp) = mountpoint_dir();
    let file = mp.parent().unwrap().join("a-file");
    fs::write(&file, "not a directory").unwrap();
    let missing = mp.parent().unwrap().join("missing");
    let good = registry.reference("app:v1");
    let cases: Vec<(&str, String, &Path, &str)> = vec![
        (
            "bad reference",
            "Not//A:Valid Reference".into(),
            &mp,
            "reference",
        ),
        (
            "unknown tag",
            registry.reference("app:no-such-tag"),
            &mp,
            "no-such-tag",
        ),
        (
            "unknown repository",
            registry.reference("nothing-here:v1"),
            &mp,
            "nothing-here",
        ),
        (
            "mount point is a file",
            good.clone(),
            &file,
            "not a directory",
        ),
        ("mount point missing", good.clone(), &missing, "missing"),
    ];
    for (what, reference, target, msg) in cases {
        let out = mount_cmd(&imagefs, &[], &reference, target).run();
        assert!(
            !out.timed_out && !out.status.success(),
            "{what}: expected failure\n{}",
            out.report()
        );
        let err = out.stderr_str();
        assert!(
            err.to_lowercase().contains(&msg.to_lowercase()),
            "{what}: stderr should mention {msg:?}\n{}",
            out.report()
        );
        assert!(
            !err.contains("{:?}") && !err.contains("Error {"),
            "{what}: {err}"
        );
        assert!(!is_mounted(target), "{what}: something is mounted");
        assert!(
            wait_until(TIMEOUT, || daemon_pids(target).is_empty()),
            "{what}: a daemon is still running: {:?}",
            daemon_pids(target)
        );
        eprintln!("{what}: {}", err.trim());
    }

    // Mounting over a live mount is refused, and the first mount is unharmed.
    let m = Mount::new(&imagefs, &[], &good);
    let out = mount_cmd(&imagefs, &[], &good, m.path()).run();
    out.assert_failure_contains("already a mount point");
    // One keeper and its server.
    assert_eq!(daemon_pids(m.path()).len(), 2);
    m.daemon_pid();
    assert_eq!(
        fs::read_to_string(m.p("etc/os-release")).unwrap(),
        "ID=two\n"
    );
    m.unmount();
}

#[test]
fn mount_points_given_through_symlinks_and_dot_dot_are_the_same_mount() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("paths", "v1", &two_layer_image());
    let imagefs = Imagefs::new();
    let (dir, mp) = mountpoint_dir();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&mp, &link).unwrap();
    let dotted = dir.path().join("mnt/../mnt");
    let reference = registry.reference("paths:v1");

    mount_cmd(&imagefs, &[], &reference, &link)
        .run()
        .assert_success();
    assert!(
        is_mounted(&mp),
        "mounting through a symlink mounted elsewhere"
    );
    assert_eq!(
        fs::read_to_string(mp.join("etc/os-release")).unwrap(),
        "ID=two\n"
    );
    // A second mount on the same directory, named differently, is refused.
    for other in [&mp, &dotted] {
        let out = mount_cmd(&imagefs, &[], &reference, other).run();
        out.assert_failure_contains("already a mount point");
    }
    assert_eq!(mountinfo_count(&mp), 1);
    // And the other spellings unmount it.
    umount_cmd(&dotted).run().assert_success();
    assert!(wait_until(TIMEOUT, || !is_mounted(&mp)));
    assert!(wait_until(TIMEOUT, || daemon_pids(&link).is_empty()));

    mount_cmd(&imagefs, &[], &reference, &dotted)
        .run()
        .assert_success();
    // `umount` does not follow a symlink out of the path it is given: name the mount itself.
    umount_cmd(&link)
        .run()
        .assert_failure_contains("is a symbolic link");
    assert!(is_mounted(&mp));
    umount_cmd(&mp).run().assert_success();
    assert!(wait_until(TIMEOUT, || !is_mounted(&mp)));
    assert!(wait_until(TIMEOUT, || daemon_pids(&dotted).is_empty()));
    crate::support::mounts::cleanup(&mp);
}

fn mountinfo_count(mp: &Path) -> usize {
    crate::support::mounts::mountinfo(mp).len()
}

// ---------------------------------------------------------------------------------------------
// 9. Read-only

#[test]
fn writes_fail_with_erofs() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("ro", "v1", &two_layer_image());
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &registry.reference("ro:v1"));
    let erofs = |what: &str, r: io::Result<()>| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs("create", fs::File::create(m.p("etc/new")).map(drop));
    erofs(
        "open for writing",
        fs::OpenOptions::new()
            .write(true)
            .open(m.p("etc/os-release"))
            .map(drop),
    );
    erofs("mkdir", fs::create_dir(m.p("newdir")));
    erofs("unlink", fs::remove_file(m.p("etc/os-release")));
    erofs("rmdir", fs::remove_dir(m.p("data")));
    erofs("rename", fs::rename(m.p("etc/os-release"), m.p("etc/x")));
    erofs("symlink", std::os::unix::fs::symlink("x", m.p("etc/link")));
    erofs(
        "chmod",
        fs::set_permissions(
            m.p("etc/os-release"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        ),
    );
    erofs("create meta", fs::File::create(m.p(".digest")).map(drop));
    // The shell tools a user would try.
    for (tool, args) in [
        ("touch", vec![m.p("etc/touched")]),
        ("mkdir", vec![m.p("made")]),
        ("rm", vec![m.p("etc/os-release")]),
    ] {
        let out = Cmd::program(tool).args(args).run();
        assert!(!out.status.success(), "{tool}: {}", out.report());
        assert!(
            out.stderr_str().contains("Read-only file system"),
            "{tool}: {}",
            out.report()
        );
    }
    assert_eq!(
        fs::read_to_string(m.p("etc/os-release")).unwrap(),
        "ID=two\n"
    );
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// Observation: the first read waits for every layer

#[test]
fn first_read_waits_for_every_layer() {
    let registry = Registry::start(Auth::Anonymous);
    let big = noise(64 << 20, 9);
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(
            &[
                Entry::dir(""),
                Entry::dir("etc"),
                Entry::file("etc/os-release", "ID=small-layer\n"),
            ],
            Compression::Gzip,
        ))
        .layer(Layer::new(
            &[Entry::dir("data"), Entry::file("data/big.bin", &big)],
            Compression::Gzip,
        ))
        .build();
    registry.push_image("wait", "v1", &image);
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &["-v"], &registry.reference("wait:v1"));
    let started = Instant::now();
    let got = fs::read_to_string(m.p("etc/os-release")).unwrap();
    let cold = started.elapsed();
    assert_eq!(got, "ID=small-layer\n");
    // By design the first access builds the whole merged tree: the 64 MiB layer, which holds
    // nothing this read needs, is completely downloaded by the time the read returns.
    let big_layer = &image.layers[1];
    // The store holds a layer only once it was fully fetched and verified.
    let diff_hex = big_layer.diff_id.strip_prefix("sha256:").unwrap();
    assert!(
        imagefs
            .cache_dir()
            .join("layers/sha256")
            .join(diff_hex)
            .join("index.json")
            .is_file(),
        "the big layer was not extracted when the first read returned"
    );
    // The registry may log a request a moment after its last byte went out.
    let served = |lines: &[crate::support::AccessLine]| -> u64 {
        lines
            .iter()
            .filter(|l| l.method == "GET" && l.uri.ends_with(&big_layer.digest))
            .filter(|l| l.status == 200)
            .map(|l| l.bytes)
            .sum()
    };
    let lines = registry.wait_for_access_log("the whole big layer served", |lines| {
        served(lines) >= big_layer.size()
    });
    assert_eq!(served(&lines), big_layer.size(), "{}", registry.log());
    let started = Instant::now();
    fs::read_to_string(m.p("etc/os-release")).unwrap();
    let warm = started.elapsed();
    eprintln!(
        "MEASURE first read of a 15-byte file from the small layer: {cold:?} (waited for the \
         {} byte second layer); warm: {warm:?}; daemon: {}",
        big_layer.size(),
        tree_ready_line(&imagefs)
    );
    m.unmount();
}

/// The kernel's per-mount flags (`ro,nosuid,…`) of the mount at `path`.
fn mount_flags(path: &Path) -> Vec<String> {
    let info = crate::support::mounts::mountinfo(path);
    assert_eq!(info.len(), 1, "{info:?}");
    info[0]
        .0
        .split(' ')
        .nth(5)
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect()
}

#[test]
fn setuid_and_devices_are_ignored_unless_asked_for() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("flags", "v1", &two_layer_image());
    let imagefs = Imagefs::new();
    let reference = registry.reference("flags:v1");

    // An untrusted image's setuid programs and device nodes do nothing by default.
    let m = Mount::new(&imagefs, &[], &reference);
    let flags = mount_flags(m.path());
    for want in ["ro", "nosuid", "nodev"] {
        assert!(flags.contains(&want.to_owned()), "{want}: {flags:?}");
    }
    m.unmount();

    // A rootfs needs its setuid binaries (su, passwd) and /dev nodes to work: opt in.
    for args in [&["--suid", "--dev"][..], &["--rootfs"]] {
        let m = Mount::new_with(&imagefs, &[], args, &reference);
        let flags = mount_flags(m.path());
        assert!(!flags.contains(&"nosuid".to_owned()), "{args:?}: {flags:?}");
        assert!(!flags.contains(&"nodev".to_owned()), "{args:?}: {flags:?}");
        m.unmount();
    }
    let m = Mount::new_with(&imagefs, &[], &["--suid"], &reference);
    let flags = mount_flags(m.path());
    assert!(!flags.contains(&"nosuid".to_owned()), "{flags:?}");
    assert!(flags.contains(&"nodev".to_owned()), "{flags:?}");
    m.unmount();
}
