//! Faults survived, with real parts: a real registry killed mid-pull and restarted, the
//! network gone after a mount (gzip and eStargz), a mount daemon SIGKILLed during extraction.
//! Each time: a clear error within a bounded time, never a hang, nothing inconsistent left in
//! the store, and recovery once the fault is gone.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::mounts::{Mount, TIMEOUT, daemon_pids, is_mounted, umount_cmd, wait_until};
use crate::support::{
    Auth, Compression, Entry, Format, Image, ImageBuilder, Imagefs, Layer, Registry, noise,
};

/// A small base layer and a `big_mib` MiB layer that takes a while to fetch and extract.
fn image(big_mib: usize) -> Image {
    ImageBuilder::new(Format::Oci)
        .layer(Layer::new(
            &[
                Entry::dir("etc"),
                Entry::file("etc/os-release", "ID=faults\n"),
            ],
            Compression::Gzip,
        ))
        .layer(Layer::new(
            &[
                Entry::dir("data"),
                Entry::file("data/big", noise(big_mib << 20, 5)),
            ],
            Compression::Gzip,
        ))
        .build()
}

/// Nothing in the store looks complete without being so: every blob hashes to its name,
/// every layer directory has its index.
fn assert_store_consistent(imagefs: &Imagefs) {
    let root = imagefs.cache_dir();
    if let Ok(blobs) = fs::read_dir(root.join("blobs/sha256")) {
        for b in blobs.flatten() {
            let name = b.file_name().into_string().unwrap();
            let digest = crate::support::image::sha256_digest(&fs::read(b.path()).unwrap());
            assert_eq!(
                digest,
                format!("sha256:{name}"),
                "blob {name} does not match its name"
            );
        }
    }
    if let Ok(layers) = fs::read_dir(root.join("layers/sha256")) {
        for l in layers.flatten() {
            assert!(
                l.path().join("index.json").is_file(),
                "layer {} without its index",
                l.path().display()
            );
        }
    }
}

#[test]
fn a_registry_killed_mid_pull_is_survived_and_the_download_resumes() {
    let mut registry = Registry::start(Auth::Anonymous);
    let image = image(48);
    registry.push_image("big", "v1", &image);
    let reference = registry.reference("big:v1");
    let imagefs = Imagefs::new();
    let big = image.layers[1].digest.clone();
    let partial = imagefs
        .cache_dir()
        .join("partial")
        .join(big.replace(':', "-"));

    let cmd = imagefs.cmd(["--timeout", "2s", "pull", "-q", &reference]);
    let pull = std::thread::spawn(move || cmd.run());
    assert!(
        wait_until(TIMEOUT, || fs::metadata(&partial)
            .is_ok_and(|m| m.len() > 0)),
        "the download never started"
    );
    registry.stop();
    let out = pull.join().unwrap();
    // Either the retries outlived the outage (unlikely, it is not back yet) or a clear error.
    if !out.status.success() {
        let err = out.stderr_str();
        assert!(
            err.trim_end()
                .lines()
                .last()
                .is_some_and(|l| l.starts_with("imagefs: ")),
            "no closing error line (retries are logged as warnings before it):\n{}",
            out.report()
        );
    }
    assert_store_consistent(&imagefs);
    let kept = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);

    registry.restart();
    imagefs
        .cmd(["pull", "-q", &reference])
        .run()
        .assert_success();
    assert_store_consistent(&imagefs);
    // What had arrived was kept and the rest asked for with Range.
    if kept > 0 {
        let resumed = registry
            .access_log()
            .iter()
            .any(|l| l.uri.ends_with(&big) && l.status == 206);
        assert!(
            resumed,
            "no Range request after {kept} bytes were kept:\n{}",
            registry.log()
        );
    }
    let m = Mount::new(&imagefs, &["--offline"], &reference);
    assert_eq!(fs::read(m.p("data/big")).unwrap(), noise(48 << 20, 5));
    m.unmount();
}

/// Reads `path`: the bytes or the errno, and how long it took.
fn timed_read(path: &Path) -> (Result<Vec<u8>, Option<i32>>, Duration) {
    let started = Instant::now();
    let r = fs::read(path).map_err(|e| e.raw_os_error());
    (r, started.elapsed())
}

#[test]
fn network_lost_after_mount_is_eio_in_bounded_time_and_heals_without_remount() {
    let mut registry = Registry::start(Auth::Anonymous);
    registry.push_image("net", "v1", &image(1));
    let imagefs = Imagefs::new();
    let m = Mount::new(
        &imagefs,
        &["--timeout", "2s"],
        &registry.reference("net:v1"),
    );
    registry.stop();

    let (r, took) = timed_read(&m.p("etc/os-release"));
    eprintln!("MEASURE first access with the registry gone: {r:?} after {took:?}");
    assert_eq!(r.unwrap_err(), Some(libc::EIO));
    assert!(took < Duration::from_secs(40), "took {took:?}");
    // Meta files never needed the network.
    assert!(
        fs::read_to_string(m.p(".digest"))
            .unwrap()
            .starts_with("sha256:")
    );

    registry.restart();
    assert_eq!(
        fs::read_to_string(m.p("etc/os-release")).unwrap(),
        "ID=faults\n"
    );
    assert_eq!(fs::read(m.p("data/big")).unwrap(), noise(1 << 20, 5));
    m.unmount();
    assert_store_consistent(&imagefs);
}

#[test]
fn network_lost_mid_estargz_mount_fails_reads_of_remote_chunks_only() {
    let mut registry = Registry::start(Auth::Anonymous);
    let w = crate::estargz::written();
    crate::estargz::push(&registry, "lazy", w.blob.clone(), &w);
    let imagefs = Imagefs::new();
    let m = Mount::new_with(
        &imagefs,
        &["--timeout", "2s"],
        &["--prefetch", "none"],
        &registry.reference("lazy:v1"),
    );
    assert_eq!(fs::read(m.p("data/small")).unwrap(), b"small file\n");
    registry.stop();

    let (r, took) = timed_read(&m.p("data/big"));
    eprintln!("MEASURE read of a remote chunk with the registry gone: {r:?} after {took:?}");
    assert_eq!(r.unwrap_err(), Some(libc::EIO));
    assert!(took < Duration::from_secs(40), "took {took:?}");
    // What is local keeps being served.
    assert_eq!(fs::read(m.p("data/small")).unwrap(), b"small file\n");

    registry.restart();
    assert_eq!(fs::read(m.p("data/big")).unwrap(), w.big);
    m.unmount();
}

#[test]
fn a_daemon_killed_during_extraction_leaves_a_cleanable_mount_and_a_recoverable_store() {
    let registry = Registry::start(Auth::Anonymous);
    let image = image(96);
    registry.push_image("kill", "v1", &image);
    let reference = registry.reference("kill:v1");
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &reference);
    let pid = m.daemon_pid();
    let path = m.p("etc/os-release");
    let reader = std::thread::spawn(move || fs::read(path).map_err(|e| e.raw_os_error()));
    // Extraction runs in tmp/ until the layer is complete.
    let tmp = imagefs.cache_dir().join("tmp");
    assert!(
        wait_until(TIMEOUT, || fs::read_dir(&tmp).is_ok_and(|d| d
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("layer-")))),
        "extraction never started"
    );
    // SAFETY: kill(2) on the daemon's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert!(
        reader.join().unwrap().is_err(),
        "a read through a dead daemon succeeded"
    );

    // The dead mount is cleaned by `imagefs umount`, and the store holds nothing half-done.
    let mp = m.path().to_path_buf();
    umount_cmd(&mp).run().assert_success();
    assert!(wait_until(TIMEOUT, || !is_mounted(&mp)));
    drop(m);
    assert_store_consistent(&imagefs);

    let m = Mount::new(&imagefs, &[], &reference);
    assert_eq!(
        fs::read_to_string(m.p("etc/os-release")).unwrap(),
        "ID=faults\n"
    );
    assert_eq!(fs::read(m.p("data/big")).unwrap(), noise(96 << 20, 5));
    m.unmount();
    assert_store_consistent(&imagefs);
}

#[test]
fn two_mounts_of_one_image_and_32_cold_readers_fetch_each_blob_once() {
    let registry = Registry::start(Auth::Anonymous);
    // 32 files of distinct content over two layers.
    let files = |from: usize, seed: u64| -> Vec<Entry> {
        let mut v = vec![Entry::dir("f")];
        v.extend(
            (from..from + 16)
                .map(|i| Entry::file(format!("f/{i:02}"), noise(64 << 10, seed + i as u64))),
        );
        v
    };
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&files(0, 100), Compression::Gzip))
        .layer(Layer::new(&files(16, 100), Compression::Zstd))
        .build();
    registry.push_image("many", "v1", &image);
    let reference = registry.reference("many:v1");
    let imagefs = Imagefs::new();
    let m1 = Mount::new(&imagefs, &[], &reference);
    let m2 = Mount::new(&imagefs, &[], &reference);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(32));
    let readers: Vec<_> = (0..32usize)
        .map(|i| {
            let path = if i % 2 == 0 {
                m1.p(format!("f/{i:02}"))
            } else {
                m2.p(format!("f/{i:02}"))
            };
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                (i, fs::read(path))
            })
        })
        .collect();
    for r in readers {
        let (i, got) = r.join().unwrap();
        assert_eq!(got.unwrap(), noise(64 << 10, 100 + i as u64), "file {i}");
    }
    for l in &image.layers {
        assert_eq!(
            registry.blob_fetches(&l.digest),
            1,
            "{}:\n{}",
            l.digest,
            registry.log()
        );
    }
    m1.unmount();
    m2.unmount();
    assert_store_consistent(&imagefs);
}

#[test]
fn a_registry_gone_silent_is_eio_within_about_one_timeout() {
    // A host that accepts connections and never answers (a black hole, not a refusal): each
    // attempt waits out `--timeout`, so retries must stop once the timeout has passed.
    let mut registry = Registry::start(Auth::Anonymous);
    registry.push_image("gzip", "v1", &image(1));
    let w = crate::estargz::written();
    crate::estargz::push(&registry, "lazy", w.blob.clone(), &w);
    let imagefs = Imagefs::new();
    let plain = Mount::new(
        &imagefs,
        &["--timeout", "2s"],
        &registry.reference("gzip:v1"),
    );
    let lazy = Mount::new_with(
        &imagefs,
        &["--timeout", "2s"],
        &["--prefetch", "none"],
        &registry.reference("lazy:v1"),
    );
    assert_eq!(fs::read(lazy.p("data/small")).unwrap(), b"small file\n");
    registry.stop();
    let silent = std::net::TcpListener::bind(registry.addr()).unwrap();

    for (what, path) in [
        ("first access of a gzip image", plain.p("etc/os-release")),
        ("a remote eStargz chunk", lazy.p("data/big")),
    ] {
        let (r, took) = timed_read(&path);
        eprintln!("MEASURE {what} with the registry silent: {r:?} after {took:?}");
        assert_eq!(r.unwrap_err(), Some(libc::EIO), "{what}");
        assert!(took < Duration::from_secs(10), "{what} took {took:?}");
    }
    assert_eq!(fs::read(lazy.p("data/small")).unwrap(), b"small file\n");

    drop(silent);
    registry.restart();
    assert_eq!(
        fs::read_to_string(plain.p("etc/os-release")).unwrap(),
        "ID=faults\n"
    );
    assert_eq!(fs::read(lazy.p("data/big")).unwrap(), w.big);
    plain.unmount();
    lazy.unmount();
}

#[test]
fn a_dead_daemons_mount_point_is_cleaned_by_fusermount3_too() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("dead", "v1", &image(1));
    let reference = registry.reference("dead:v1");
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &reference);
    assert_eq!(
        fs::read_to_string(m.p("etc/os-release")).unwrap(),
        "ID=faults\n"
    );
    // SAFETY: kill(2) on the daemon's pid.
    assert_eq!(
        unsafe { libc::kill(m.daemon_pid() as i32, libc::SIGKILL) },
        0
    );
    // Its server dies with it (PR_SET_PDEATHSIG), a moment later.
    assert!(wait_until(TIMEOUT, || daemon_pids(m.path()).is_empty()));
    // The kernel answers an aborted connection with ENOTCONN, or with ECONNABORTED while it
    // is still tearing the connection down (seen on 6.18): both say the daemon is gone.
    let err = fs::read(m.p("etc/os-release")).unwrap_err();
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED)
        ),
        "{err}"
    );
    let mp = m.path().to_path_buf();
    let out = crate::support::Cmd::program("fusermount3")
        .args(["-u"])
        .arg(&mp)
        .run();
    out.assert_success();
    assert!(wait_until(TIMEOUT, || !is_mounted(&mp)));
    drop(m);
    // And the image mounts again from the cache.
    let m = Mount::new(&imagefs, &["--offline"], &reference);
    assert_eq!(fs::read(m.p("data/big")).unwrap(), noise(1 << 20, 5));
    m.unmount();
}
