//! Cache management on a store shared by several images: `cache ls` / `du` count shared
//! layers once, `prune` evicts the least recently used images but never what a live mount
//! uses, `verify` finds and drops a corrupted blob, `gc` removes what no image uses, and
//! `--cache-max-size` (or `cache_max_size` in the cache's config.toml) bounds the store
//! during pulls.

use std::fs;
use std::path::Path;

use crate::support::mounts::Mount;
use crate::support::{
    Auth, Compression, Entry, Format, Image, ImageBuilder, Imagefs, Layer, Registry, noise,
};

/// A 1 MiB base layer shared by every image, and a 2 MiB layer of each image's own.
fn images() -> (Layer, Image, Image) {
    let base = Layer::new(
        &[
            Entry::dir("etc"),
            Entry::file("etc/os-release", "ID=shared\n"),
            Entry::file("etc/base.bin", noise(1 << 20, 1)),
        ],
        Compression::Gzip,
    );
    let image = |name: &str, seed| {
        ImageBuilder::new(Format::Oci)
            .layer(base.clone())
            .layer(Layer::new(
                &[
                    Entry::dir("app"),
                    Entry::file(format!("app/{name}"), noise(2 << 20, seed)),
                ],
                Compression::Gzip,
            ))
            .build()
    };
    let a = image("a", 2);
    let b = image("b", 3);
    (base, a, b)
}

/// `cache ls` rows: (manifest digest, size column, exclusive column, mounted-at column).
fn ls(imagefs: &Imagefs) -> Vec<Vec<String>> {
    let out = imagefs.cmd(["cache", "ls"]).run();
    out.assert_success();
    out.stdout_str()
        .lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// `cache du` total in bytes.
fn du_total(imagefs: &Imagefs) -> u64 {
    let out = imagefs.cmd(["cache", "du"]).run();
    out.assert_success();
    let text = out.stdout_str();
    let total = text.lines().find(|l| l.starts_with("total\t")).unwrap();
    total.split('\t').nth(1).unwrap().parse().unwrap()
}

fn layer_dir(imagefs: &Imagefs, diff_id: &str) -> std::path::PathBuf {
    imagefs
        .cache_dir()
        .join("layers/sha256")
        .join(diff_id.trim_start_matches("sha256:"))
}

fn blob(imagefs: &Imagefs, digest: &str) -> std::path::PathBuf {
    imagefs
        .cache_dir()
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn pull(imagefs: &Imagefs, global: &[&str], reference: &str) {
    let mut args: Vec<&str> = global.to_vec();
    args.extend(["pull", "-q", reference]);
    imagefs.cmd(args).run().assert_success();
}

struct Setup {
    registry: Registry,
    base: Layer,
    a: Image,
    b: Image,
}

fn setup() -> Setup {
    let registry = Registry::start(Auth::Anonymous);
    let (base, a, b) = images();
    registry.push_image("img/a", "v1", &a);
    registry.push_image("img/b", "v1", &b);
    Setup {
        registry,
        base,
        a,
        b,
    }
}

fn exists(p: &Path) -> bool {
    p.exists()
}

#[test]
fn ls_and_du_count_a_shared_layer_once() {
    let s = setup();
    let imagefs = Imagefs::new();
    pull(&imagefs, &[], &s.registry.reference("img/a:v1"));
    pull(&imagefs, &[], &s.registry.reference("img/b:v1"));
    let rows = ls(&imagefs);
    assert_eq!(rows.len(), 2, "{rows:?}");
    // Most recently used first: b.
    assert_eq!(rows[0][0], s.b.manifest.digest);
    assert_eq!(rows[1][0], s.a.manifest.digest);
    assert!(rows.iter().all(|r| r[1] == "2" && r[5] == "-"), "{rows:?}");

    // Each image holds base (≈2 MiB: blob + extracted) + its own (≈4 MiB); the store holds
    // base once: less than the two images' sizes added up.
    let total = du_total(&imagefs);
    let mib = |x: u64| x as f64 / (1 << 20) as f64;
    assert!(mib(total) > 9.5 && mib(total) < 13.0, "du total {total}");
    assert!(
        rows.iter()
            .all(|r| r[2].ends_with("MiB") && r[3].ends_with("MiB")),
        "{rows:?}"
    );
}

#[test]
fn prune_evicts_the_least_recently_used_but_keeps_shared_and_mounted_data() {
    let s = setup();
    let imagefs = Imagefs::new();
    let (ra, rb) = (
        s.registry.reference("img/a:v1"),
        s.registry.reference("img/b:v1"),
    );
    pull(&imagefs, &[], &ra);
    pull(&imagefs, &[], &rb);

    // Room for one image: a (used least recently) goes, b and the shared base stay.
    let out = imagefs.cmd(["cache", "prune", "--max-size", "7M"]).run();
    out.assert_success();
    assert!(
        out.stdout_str()
            .contains(&format!("evicted {}", s.a.manifest.digest)),
        "{}",
        out.report()
    );
    let rows = ls(&imagefs);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], s.b.manifest.digest);
    assert!(exists(&layer_dir(&imagefs, &s.base.diff_id)));
    assert!(!exists(&layer_dir(&imagefs, &s.a.layers[1].diff_id)));
    assert!(!exists(&blob(&imagefs, &s.a.layers[1].digest)));
    // b still mounts with no network.
    let m = Mount::new(&imagefs, &["--offline"], &rb);
    assert_eq!(
        fs::read_to_string(m.p("etc/os-release")).unwrap(),
        "ID=shared\n"
    );

    // While b is mounted, --all keeps it, and the mount keeps reading.
    let out = imagefs.cmd(["cache", "prune", "--all"]).run();
    out.assert_success();
    let rows = ls(&imagefs);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_ne!(rows[0][5], "-", "the mount is listed: {rows:?}");
    assert_eq!(fs::read(m.p("app/b")).unwrap(), noise(2 << 20, 3));
    m.unmount();

    // Unmounted, it goes; the store is empty but for bookkeeping.
    imagefs
        .cmd(["cache", "prune", "--all"])
        .run()
        .assert_success();
    assert!(ls(&imagefs).is_empty());
    assert!(!exists(&layer_dir(&imagefs, &s.base.diff_id)));
    let out = imagefs.cmd(["--offline", "inspect", &rb]).run();
    out.assert_failure_contains("not in the cache");
}

#[test]
fn verify_drops_a_corrupt_blob_and_a_pull_fetches_it_again() {
    let s = setup();
    let imagefs = Imagefs::new();
    let ra = s.registry.reference("img/a:v1");
    pull(&imagefs, &[], &ra);
    let out = imagefs.cmd(["cache", "verify"]).run();
    out.assert_success();

    let own = &s.a.layers[1].digest;
    let path = blob(&imagefs, own);
    let mut bytes = fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    let out = imagefs.cmd(["cache", "verify"]).run();
    assert!(!out.status.success(), "{}", out.report());
    assert!(out.stdout_str().contains("corrupt"), "{}", out.report());
    assert!(out.stdout_str().contains(own.trim_start_matches("sha256:")));
    assert!(!exists(&path));

    let before = s.registry.blob_fetches(own);
    // The layer is still extracted; dropping it makes the pull need the blob again.
    fs::remove_dir_all(layer_dir(&imagefs, &s.a.layers[1].diff_id)).unwrap();
    pull(&imagefs, &[], &ra);
    assert_eq!(s.registry.blob_fetches(own), before + 1);
    imagefs.cmd(["cache", "verify"]).run().assert_success();
}

#[test]
fn gc_removes_only_what_no_image_uses() {
    let s = setup();
    let imagefs = Imagefs::new();
    pull(&imagefs, &[], &s.registry.reference("img/a:v1"));
    let stray = blob(&imagefs, &format!("sha256:{}", "ab".repeat(32)));
    fs::write(&stray, b"not referenced by anything").unwrap();
    // Young entries may belong to a pull in progress: kept by default.
    imagefs.cmd(["cache", "gc"]).run().assert_success();
    assert!(exists(&stray));
    let out = imagefs.cmd(["cache", "gc", "--min-age", "0s"]).run();
    out.assert_success();
    assert!(out.stdout_str().contains("1 entry"), "{}", out.report());
    assert!(!exists(&stray));
    for l in &s.a.layers {
        assert!(exists(&blob(&imagefs, &l.digest)));
        assert!(exists(&layer_dir(&imagefs, &l.diff_id)));
    }
}

#[test]
fn cache_max_size_bounds_the_store_during_pulls() {
    let s = setup();
    let (ra, rb) = (
        s.registry.reference("img/a:v1"),
        s.registry.reference("img/b:v1"),
    );

    // From the flag.
    let imagefs = Imagefs::new();
    pull(&imagefs, &["--cache-max-size", "7M"], &ra);
    pull(&imagefs, &["--cache-max-size", "7M"], &rb);
    let rows = ls(&imagefs);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0], s.b.manifest.digest);
    assert!(du_total(&imagefs) < 8 << 20);

    // From the cache's config.toml; a bound smaller than the image being pulled keeps it.
    let imagefs = Imagefs::new();
    fs::create_dir_all(imagefs.cache_dir()).unwrap();
    fs::write(
        imagefs.cache_dir().join("config.toml"),
        "cache_max_size = \"1M\"\n",
    )
    .unwrap();
    pull(&imagefs, &[], &ra);
    pull(&imagefs, &[], &rb);
    let rows = ls(&imagefs);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0], s.b.manifest.digest);

    // A bad value is a clear error.
    fs::write(
        imagefs.cache_dir().join("config.toml"),
        "cache_max_size = \"lots\"\n",
    )
    .unwrap();
    let out = imagefs.cmd(["cache", "du"]).run();
    out.assert_failure_contains("cache_max_size");
}

#[test]
fn verify_forgets_a_damaged_estargz_chunk_and_a_read_fetches_it_again() {
    let registry = Registry::start(Auth::Anonymous);
    let w = crate::estargz::written();
    let blob_digest = crate::estargz::push(&registry, "lazy", w.blob.clone(), &w);
    let reference = registry.reference("lazy:v1");
    let imagefs = Imagefs::new();
    let m = Mount::new_with(&imagefs, &[], &["--prefetch", "none"], &reference);
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    m.unmount();
    imagefs.cmd(["cache", "verify"]).run().assert_success();

    // Damage the middle of `big`'s local copy (the largest data file).
    let data = imagefs
        .cache_dir()
        .join("estargz/sha256")
        .join(blob_digest.trim_start_matches("sha256:"))
        .join("data");
    let big = fs::read_dir(&data)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = fs::read(&big).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&big, bytes).unwrap();

    let out = imagefs.cmd(["cache", "verify"]).run();
    assert!(!out.status.success(), "{}", out.report());
    assert!(out.stdout_str().contains("chunkDigest"), "{}", out.report());
    let before = registry.blob_gets(&blob_digest);
    let m = Mount::new_with(&imagefs, &[], &["--prefetch", "none"], &reference);
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    m.unmount();
    assert!(
        registry.blob_gets(&blob_digest) > before,
        "the chunk was not fetched again"
    );
    imagefs.cmd(["cache", "verify"]).run().assert_success();
}
