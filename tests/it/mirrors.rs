//! Pull mirrors (`--mirror REGISTRY=URL`, `--hosts-dir DIR` with containerd-style
//! `hosts.toml`) against a real distribution registry in proxy mode (a pull-through cache of
//! the origin): mirrors are tried in order, a failed one is skipped, the origin is the last
//! resort, and everything fetched is verified the same way.

use std::fs;

use crate::support::mounts::Mount;
use crate::support::{
    AccessLine, Auth, Compression, Entry, Format, Image, ImageBuilder, Imagefs, Layer, Registry,
};

fn image() -> Image {
    ImageBuilder::new(Format::Oci)
        .layer(Layer::new(
            &[
                Entry::dir("etc"),
                Entry::file("etc/os-release", "ID=mirrored\n"),
            ],
            Compression::Gzip,
        ))
        .layer(Layer::new(
            &[
                Entry::dir("data"),
                Entry::file("data/x", "from layer two\n"),
            ],
            Compression::Zstd,
        ))
        .build()
}

/// A port nothing listens on: bind, note the port, close.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

fn gets<'a>(log: &'a [AccessLine], what: &str) -> Vec<&'a AccessLine> {
    log.iter()
        .filter(|l| l.method == "GET" && l.uri.contains(what))
        .collect()
}

/// Pull `reference` with `args`, then check the image reads back offline.
fn pull_and_check(imagefs: &Imagefs, args: &[&str], reference: &str) {
    let mut all = vec!["-v"];
    all.extend_from_slice(args);
    all.extend(["pull", reference]);
    imagefs.cmd(all).run().assert_success();
    let m = Mount::new(imagefs, &["--offline"], reference);
    assert_eq!(
        fs::read_to_string(m.p("etc/os-release")).unwrap(),
        "ID=mirrored\n"
    );
    assert_eq!(
        fs::read_to_string(m.p("data/x")).unwrap(),
        "from layer two\n"
    );
    m.unmount();
}

struct Setup {
    origin: Registry,
    proxy: Registry,
    image: Image,
    reference: String,
}

fn setup() -> Setup {
    let origin = Registry::start(Auth::Anonymous);
    let image = image();
    origin.push_image("team/app", "v1", &image);
    let proxy = Registry::start_proxy_of(&origin);
    let reference = origin.reference("team/app:v1");
    Setup {
        origin,
        proxy,
        image,
        reference,
    }
}

/// Requests for blobs that imagefs itself sent to the origin (the proxy's own requests to
/// fill its cache carry Go's user agent).
fn origin_blob_requests_by_imagefs(s: &Setup) -> usize {
    s.origin
        .log()
        .lines()
        .filter(|l| l.contains("/blobs/") && l.contains("useragent=imagefs/"))
        .count()
}

#[test]
fn a_pull_through_cache_mirror_serves_the_pull() {
    let s = setup();
    let imagefs = Imagefs::new();
    let mirror = format!("{}=http://{}", s.origin.addr(), s.proxy.addr());
    pull_and_check(&imagefs, &["--mirror", &mirror], &s.reference);
    let log = s.proxy.access_log();
    assert_eq!(gets(&log, "/manifests/v1").len(), 1, "{}", s.proxy.log());
    for l in &s.image.layers {
        assert_eq!(gets(&log, &l.digest).len(), 1, "{}", s.proxy.log());
    }
    // The origin saw only the proxy filling its cache.
    assert_eq!(origin_blob_requests_by_imagefs(&s), 0, "{}", s.origin.log());
}

#[test]
fn a_dead_mirror_is_skipped_for_the_next_and_the_origin_is_the_last_resort() {
    let s = setup();
    let dead = format!("{}={}", s.origin.addr(), dead_url());
    let live = format!("{}=http://{}", s.origin.addr(), s.proxy.addr());

    // Dead, then the proxy: the proxy serves.
    let imagefs = Imagefs::new();
    let started = std::time::Instant::now();
    pull_and_check(
        &imagefs,
        &["--timeout", "5s", "--mirror", &dead, "--mirror", &live],
        &s.reference,
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(gets(&s.proxy.access_log(), "/manifests/v1").len(), 1);

    // Only a dead mirror: the origin serves.
    let imagefs = Imagefs::new();
    let before = gets(&s.origin.access_log(), "/manifests/v1").len();
    pull_and_check(&imagefs, &["--mirror", &dead], &s.reference);
    assert!(origin_blob_requests_by_imagefs(&s) >= s.image.layers.len());
    assert_eq!(
        gets(&s.origin.access_log(), "/manifests/v1").len(),
        before + 1
    );
}

#[test]
fn hosts_toml_lists_mirrors_and_their_capabilities() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let reg_dir = dir.path().join(s.origin.addr());
    fs::create_dir_all(&reg_dir).unwrap();
    // A pull-only mirror (no "resolve"): the tag is resolved at the origin, content comes
    // from the mirror by digest.
    fs::write(
        reg_dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n\
             [host.\"http://{}\"]\n  capabilities = [\"pull\"]\n",
            s.origin.addr(),
            dead_url(),
            s.proxy.addr()
        ),
    )
    .unwrap();
    let imagefs = Imagefs::new();
    let hosts = dir.path().to_str().unwrap();
    pull_and_check(&imagefs, &["--hosts-dir", hosts], &s.reference);
    assert_eq!(gets(&s.proxy.access_log(), "/manifests/v1").len(), 0);
    assert_eq!(gets(&s.origin.access_log(), "/manifests/v1").len(), 1);
    for l in &s.image.layers {
        assert_eq!(
            gets(&s.proxy.access_log(), &l.digest).len(),
            1,
            "{}",
            s.proxy.log()
        );
    }

    // A bad hosts.toml is an error that names the file.
    fs::write(reg_dir.join("hosts.toml"), "[host.\"ftp://x\"]\n").unwrap();
    let out = Imagefs::new()
        .cmd(["--hosts-dir", hosts, "inspect", &s.reference])
        .run();
    out.assert_failure_contains("hosts.toml");
}
