//! `imagefs snapshotter` as containerd's remote snapshotter: a real containerd 1.6, real runc
//! containers (`ctr run`), `ctr-remote image rpull` and a real registry. Images are built by
//! the harness; the eStargz ones are converted by the reference tool (`ctr-remote image
//! convert --estargz --oci`) inside the same containerd, then pushed.
//!
//! containerd 1.6's `ctr images mount` ignores its `--snapshotter` flag (it reads a global
//! flag `ctr` does not have, and unpacks into overlayfs), so views are made the way it would:
//! `ctr snapshots view` + the mount `ctr snapshots mounts` prints.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use crate::cli_mount::{oracle_compare, rule_layers, walk_dir};
use crate::support::containerd::Containerd;
use crate::support::oracle::Oracle;
use crate::support::tree;
use crate::support::{
    Auth, Cmd, Compression, Entry, Format, Image, ImageBuilder, Layer, Registry, manifest_layers,
    noise, skopeo_inspect_raw,
};

const SNAP: &str = "imagefs";
const OS_RELEASE: &str = "ID=imagefs-ctr\nNAME=\"imagefs containerd test\"\n";
/// Entries containerd's runtime mounts over (or creates in the upper directory).
const RUNTIME_DIRS: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// busybox-static with the applets the tests run, `/etc/os-release`, `/tmp`, and `filler`
/// bytes of noise (so that what one `cat` needs is a small part of the image).
fn base_layer(filler: usize) -> Vec<Entry> {
    let busybox = fs::read("/bin/busybox").expect("busybox-static (scripts/setup installs it)");
    let mut e = vec![
        Entry::dir(""),
        Entry::dir("bin"),
        Entry::file("bin/busybox", busybox).mode(0o755),
    ];
    for applet in [
        "sh", "cat", "ls", "find", "stat", "echo", "test", "rm", "mkdir",
    ] {
        e.push(Entry::symlink(format!("bin/{applet}"), "busybox"));
    }
    e.push(Entry::dir("etc"));
    e.push(Entry::file("etc/os-release", OS_RELEASE));
    e.push(Entry::dir("tmp").mode(0o1777));
    if filler > 0 {
        e.push(Entry::dir("data"));
        e.push(Entry::file("data/filler.bin", noise(filler, 7)));
    }
    e
}

/// The merge rules of `rule_layers`, but for a file deleted by a whiteout that follows it in
/// the same layer (containerd's own applier refuses that: "failed to convert whiteout file:
/// file exists", and the tests convert and apply images with it) and the stand-in busybox.
fn rules() -> [Vec<Entry>; 3] {
    let [mut l1, mut l2, l3] = rule_layers();
    // Keep the base layer's busybox, which the containers run.
    l1.retain(|e| e.path != b"bin/busybox");
    l2.retain(|e| e.path != b"again2" && e.path != b".wh.again2");
    [l1, l2, l3]
}

fn image(layers: Vec<Vec<Entry>>) -> Image {
    let mut b = ImageBuilder::new(Format::Oci).env(&["PATH=/bin"]);
    for l in layers {
        b = b.layer(Layer::new(&l, Compression::Gzip));
    }
    b.build()
}

/// A small two-layer image: the base and a layer that deletes and adds a file.
fn two_layers(filler: usize) -> Image {
    image(vec![
        base_layer(filler),
        vec![
            Entry::whiteout("etc/os-release"),
            Entry::file("etc/os-release", OS_RELEASE),
            Entry::file("etc/motd", "from layer 2\n"),
        ],
    ])
}

/// Convert `src` (REPO:TAG in `registry`) to eStargz as `dst` with the reference tool, push
/// it, and drop both from containerd again (content included), so a pull starts cold.
pub(crate) fn convert_to_estargz(c: &Containerd, registry: &Registry, src: &str, dst: &str) {
    let (src, dst) = (registry.reference(src), registry.reference(dst));
    // Fetched, not unpacked: containerd's applier refuses a hardlink to a file of a lower
    // layer, which the rules image has.
    c.ctr(&["content", "fetch", "--plain-http", &src])
        .assert_success();
    c.ctr_remote(&["image", "convert", "--oci", "--estargz", &src, &dst])
        .assert_success();
    c.ctr(&["image", "push", "--plain-http", &dst])
        .assert_success();
    c.ctr(&["image", "rm", "--sync", &src, &dst])
        .assert_success();
}

/// The layer digests and sizes of `repo_ref`'s manifest, as the registry serves it.
fn layers_of(registry: &Registry, repo_ref: &str) -> Vec<(String, u64)> {
    manifest_layers(&skopeo_inspect_raw(registry, repo_ref))
}

/// The chain id of `repo_ref`'s top layer: the name of its committed snapshot.
fn top_chain_id(registry: &Registry, repo_ref: &str) -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&skopeo_inspect_raw(registry, repo_ref)).unwrap();
    let name = repo_ref.split(':').next().unwrap();
    let blob = Cmd::program("curl")
        .args([
            "-fsS",
            &format!(
                "{}/v2/{name}/blobs/{}",
                registry.url(),
                m["config"]["digest"].as_str().unwrap()
            ),
        ])
        .run();
    blob.assert_success();
    let config: serde_json::Value = serde_json::from_slice(blob.stdout.as_slice()).unwrap();
    let diff_ids: Vec<imagefs::oci::Digest> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().parse().unwrap())
        .collect();
    imagefs::snapshotter::chain_id(&diff_ids).to_string()
}

/// Body bytes the registry served for `blobs` since access-log line `since`.
fn served(registry: &Registry, since: usize, blobs: &[(String, u64)]) -> u64 {
    registry.access_log()[since..]
        .iter()
        .filter(|l| l.method == "GET" && blobs.iter().any(|(d, _)| l.uri.ends_with(d.as_str())))
        .map(|l| l.bytes)
        .sum()
}

fn rpull(c: &Containerd, reference: &str) {
    let out = c.ctr_remote(&[
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        SNAP,
        reference,
    ]);
    assert!(out.status.success(), "{}\n{}", out.report(), c.logs());
}

/// `ctr run --snapshotter imagefs --rm REF ID ARGS…`, asserted to succeed; its stdout.
fn run(c: &Containerd, reference: &str, id: &str, args: &[&str]) -> String {
    let mut all = vec!["run", "--snapshotter", SNAP, "--rm", reference, id];
    all.extend_from_slice(args);
    let out = c.ctr(&all);
    assert!(out.status.success(), "{}\n{}", out.report(), c.logs());
    out.stdout_str()
}

/// What `stat` says of every entry of a tree, as busybox prints it: `path|mode|uid|gid|size|
/// name-and-link-target` (directory sizes left out: they are the filesystem's business).
/// `root` is stripped from the paths; the root itself and the runtime's mount points are
/// left out.
fn stat_listing(output: &str, root: &str) -> BTreeSet<String> {
    output
        .lines()
        .filter_map(|l| {
            let l = if root.is_empty() {
                l.to_owned()
            } else {
                l.replace(root, "")
            };
            let mut f: Vec<String> = l.splitn(6, '|').map(str::to_owned).collect();
            if f.len() < 6 {
                return None;
            }
            let path = f[0].clone();
            if path.is_empty()
                || path == "/"
                || RUNTIME_DIRS
                    .iter()
                    .any(|d| path == *d || path.starts_with(&format!("{d}/")))
            {
                return None;
            }
            let mode = u32::from_str_radix(&f[1], 16).unwrap_or(0);
            if mode & 0o170000 == 0o040000 {
                f[4] = "-".into();
            }
            Some(f.join("|"))
        })
        .collect()
}

const STAT_FORMAT: &str = "%n|%f|%u|%g|%s|%N";

/// The listing of the container's root filesystem, made inside a container.
fn container_listing(c: &Containerd, reference: &str, id: &str) -> BTreeSet<String> {
    let out = run(
        c,
        reference,
        id,
        &[
            "find",
            "/",
            "-xdev",
            "-exec",
            "stat",
            "-c",
            STAT_FORMAT,
            "{}",
            "+",
        ],
    );
    stat_listing(&out, "")
}

/// The same listing of a directory on the host, with the host's busybox.
fn host_listing(root: &Path) -> BTreeSet<String> {
    let out = Cmd::program("/bin/busybox")
        .arg("find")
        .arg(root)
        .args([
            "-xdev",
            "-exec",
            "/bin/busybox",
            "stat",
            "-c",
            STAT_FORMAT,
            "{}",
            "+",
        ])
        .run();
    out.assert_success();
    stat_listing(&out.stdout_str(), &root.display().to_string())
}

fn assert_same_listing(what: &str, want: &BTreeSet<String>, got: &BTreeSet<String>) {
    let missing: Vec<&String> = want.difference(got).collect();
    let extra: Vec<&String> = got.difference(want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: the container's tree differs from umoci's\nonly in umoci's: {missing:#?}\nonly in the container: {extra:#?}"
    );
    assert!(
        want.len() > 10,
        "{what}: suspiciously few entries: {want:?}"
    );
}

/// A read-only View snapshot of the committed snapshot `parent`, mounted at `target` the way
/// `ctr images mount --rw=false` mounts it.
fn mount_view(c: &Containerd, key: &str, parent: &str, target: &Path) {
    fs::create_dir_all(target).unwrap();
    // The mount command comes from the `view` itself: ctr's lease on the new snapshot ends
    // with the command, and containerd's garbage collector may remove an unreferenced
    // snapshot before a second `ctr snapshots mounts` asks for it (seen once under load).
    let target_arg = target.display().to_string();
    let cmd = c.ctr(&[
        "snapshots",
        "--snapshotter",
        SNAP,
        "view",
        "--target",
        &target_arg,
        key,
        parent,
    ]);
    assert!(cmd.status.success(), "{}\n{}", cmd.report(), c.logs());
    Cmd::program("sh")
        .args(["-c", cmd.stdout_str().trim()])
        .run()
        .assert_success();
}

fn unmount_view(c: &Containerd, key: &str, target: &Path) {
    Cmd::program("umount").arg(target).run().assert_success();
    c.ctr(&["snapshots", "--snapshotter", SNAP, "rm", key])
        .assert_success();
}

#[test]
fn an_estargz_image_runs_lazily_and_containers_see_the_image_and_only_their_own_writes() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("lazy", "gzip", &two_layers(24 << 20));
    let c = Containerd::start(&["--prefetch", "none"]);
    convert_to_estargz(&c, &registry, "lazy:gzip", "lazy:esgz");
    let reference = registry.reference("lazy:esgz");
    let blobs = layers_of(&registry, "lazy:esgz");
    let total: u64 = blobs.iter().map(|(_, s)| s).sum();

    let since = registry.access_log().len();
    rpull(&c, &reference);
    assert_eq!(
        served(&registry, since, &blobs),
        0,
        "rpull fetched layer bytes: containerd downloaded layers\n{}",
        c.logs()
    );
    let out = run(&c, &reference, "cat", &["cat", "/etc/os-release"]);
    assert_eq!(out, OS_RELEASE);
    let bytes = served(&registry, since, &blobs);
    eprintln!("rpull + ctr run cat: {bytes} of {total} layer bytes served");
    assert!(
        bytes * 10 < total,
        "{bytes} of {total} layer bytes served for one cat: not lazy"
    );

    // The rootfs, listed inside a container, is umoci's tree of the source image.
    let oracle = Oracle::unpack(&registry, "lazy:gzip", None);
    assert_same_listing(
        "eStargz",
        &host_listing(&oracle.rootfs()),
        &container_listing(&c, &reference, "list"),
    );

    // Writes land in the container's upper directory, and the next container sees none.
    let w = c.ctr(&[
        "run",
        "--snapshotter",
        SNAP,
        &reference,
        "writer",
        "sh",
        "-c",
        "echo changed > /etc/os-release && echo new > /tmp/new && rm /etc/motd",
    ]);
    assert!(w.status.success(), "{}\n{}", w.report(), c.logs());
    let uppers: Vec<_> = fs::read_dir(c.cache_dir().join("snapshotter/snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs"))
        .filter(|fs| fs.join("tmp/new").is_file())
        .collect();
    assert_eq!(uppers.len(), 1, "one upper directory holds the writes");
    assert_eq!(
        fs::read_to_string(uppers[0].join("etc/os-release")).unwrap(),
        "changed\n"
    );
    let after = run(
        &c,
        &reference,
        "reader",
        &[
            "sh",
            "-c",
            "cat /etc/os-release /etc/motd; test -e /tmp/new && echo LEAK; true",
        ],
    );
    assert_eq!(after, format!("{OS_RELEASE}from layer 2\n"));
    c.ctr(&["container", "rm", "writer"]).assert_success();
    // containerd removes the snapshot from its backend in its next garbage collection.
    assert!(
        crate::support::mounts::wait_until(std::time::Duration::from_secs(20), || !uppers[0]
            .exists()),
        "removing the container removes its upper directory\n{}",
        c.logs()
    );
}

#[test]
fn a_gzip_image_is_fetched_on_first_access_once() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("whole", "v1", &two_layers(1 << 20));
    let c = Containerd::start(&[]);
    let reference = registry.reference("whole:v1");
    let blobs = layers_of(&registry, "whole:v1");
    rpull(&c, &reference);
    for (d, _) in &blobs {
        assert_eq!(registry.blob_fetches(d), 0, "rpull fetched layer {d}");
    }
    assert_eq!(
        run(&c, &reference, "one", &["cat", "/etc/os-release"]),
        OS_RELEASE
    );
    assert_eq!(
        run(&c, &reference, "two", &["cat", "/etc/motd"]),
        "from layer 2\n"
    );
    for (d, _) in &blobs {
        assert_eq!(registry.blob_fetches(d), 1, "layer {d} fetched once");
    }
    let tree = c.ctr(&["snapshots", "--snapshotter", SNAP, "tree"]);
    tree.assert_success();
    let top = top_chain_id(&registry, "whole:v1");
    assert!(
        tree.stdout_str().contains(&format!("\\_ {top}")),
        "the top layer's snapshot is its base's child:\n{}",
        tree.stdout_str()
    );
}

/// The CRI plugin's labels (`cri.image-ref`, `cri.layer-digest`, `cri.manifest-digest`),
/// through the library without containerd (Debian has no CRI client): each layer becomes a
/// remote snapshot named by its chain id, and a container snapshot on top mounts the view.
/// The image has one blob twice (as old images repeat an empty layer): the second is found
/// by its chain id.
#[test]
fn cri_labels_make_remote_snapshots() {
    use imagefs::snapshotter::{self, Error, Options, Snapshotter};
    use std::collections::BTreeMap;
    let registry = Registry::start(Auth::Anonymous);
    let motd = vec![Entry::file("etc/motd", "from layer 2\n")];
    let image = image(vec![
        base_layer(0),
        motd.clone(),
        vec![Entry::dir("opt")],
        motd,
    ]);
    registry.push_image("cri", "v1", &image);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = imagefs::store::Store::open(dir.path().join("cache")).unwrap();
    let resolver = imagefs::image::Resolver {
        store,
        client: imagefs::registry::Client::new(Default::default()).unwrap(),
        platform: imagefs::oci::Platform::host(),
        platform_explicit: false,
        offline: false,
        limits: Default::default(),
    };
    let options = Options {
        root: dir.path().join("root"),
        serve: imagefs::image::ServeOptions {
            prefetch: imagefs::image::Prefetch::None,
            require_toc_digest: false,
            cache_max: None,
            read_around: 0,
        },
        threads: 2,
        passthrough: true,
    };
    let s = Snapshotter::open(resolver, rt.handle().clone(), options).unwrap();
    let manifest = image.manifest.digest.clone();
    let layers = layers_of(&registry, "cri:v1");
    let mut parent = String::new();
    for (i, (digest, _)) in layers.iter().enumerate() {
        let diff_ids: Vec<imagefs::oci::Digest> = image.layers[..=i]
            .iter()
            .map(|l| l.diff_id.parse().unwrap())
            .collect();
        let chain = snapshotter::chain_id(&diff_ids).to_string();
        let labels = BTreeMap::from([
            (snapshotter::TARGET_REF.to_string(), chain.clone()),
            (
                snapshotter::CRI_IMAGE_REF.to_string(),
                registry.reference("cri:v1"),
            ),
            (snapshotter::CRI_LAYER_DIGEST.to_string(), digest.clone()),
            (
                snapshotter::CRI_MANIFEST_DIGEST.to_string(),
                manifest.clone(),
            ),
        ]);
        let r = s.prepare(&format!("extract-{i}"), &parent, labels);
        assert!(matches!(r, Err(Error::AlreadyExists(_))), "{r:?}");
        let info = s.stat(&chain).unwrap();
        assert_eq!(info.record.parent, parent);
        assert!(info.record.remote.is_some());
        parent = chain;
    }
    for (d, _) in &layers {
        assert_eq!(
            registry.blob_fetches(d),
            0,
            "nothing fetched before a container reads"
        );
    }
    let m = s.prepare("container", &parent, BTreeMap::new()).unwrap();
    let lower = m[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap()
        .to_owned();
    assert!(
        crate::support::mounts::is_imagefs_mounted(Path::new(&lower)),
        "{lower} is the view"
    );
    assert_eq!(
        fs::read_to_string(Path::new(&lower).join("etc/motd")).unwrap(),
        "from layer 2\n"
    );
    assert!(
        !Path::new(&lower).join(".manifest.json").exists(),
        "no meta files in a view"
    );
    s.remove("container").unwrap();
    s.remove(&parent).unwrap();
    assert!(
        !crate::support::mounts::is_mounted(Path::new(&lower)),
        "removal unmounts the view"
    );
    s.shutdown();
}

/// Every rule the merge knows (whiteouts, opaque directories, hardlinks across layers,
/// devices, xattrs, long and non-UTF-8 names), through a View of the remote snapshots, as
/// gzip and as eStargz, and inside a container; no eStargz metadata entry shows.
#[test]
fn every_rule_is_exact_through_views_of_gzip_and_estargz_images() {
    let registry = Registry::start(Auth::Anonymous);
    let [l1, l2, l3] = rules();
    registry.push_image("rules", "gzip", &image(vec![base_layer(0), l1, l2, l3]));
    let c = Containerd::start(&[]);
    convert_to_estargz(&c, &registry, "rules:gzip", "rules:esgz");
    let oracle = Oracle::unpack(&registry, "rules:gzip", None);
    let want = walk_dir(&oracle.rootfs());
    // An eStargz TOC is JSON with whole-second times: the reference converter writes names
    // that are not UTF-8 with U+FFFD and drops sub-second mtimes, so the converted image
    // itself says so; those two are compared on the gzip image only.
    let estargz_can_say = |s: &tree::Snapshot| tree::Snapshot {
        nodes: s
            .nodes
            .iter()
            .filter(|(p, _)| !p.starts_with(b"utf/"))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect(),
    };
    let whole_seconds = tree::Compare {
        file_mtimes: false,
        dir_mtimes: false,
        ..oracle_compare()
    };
    for (tag, cmp) in [
        ("rules:gzip", oracle_compare()),
        ("rules:esgz", whole_seconds),
    ] {
        let reference = registry.reference(tag);
        rpull(&c, &reference);
        let target = c.path(&format!("view-{}", tag.replace(':', "-")));
        mount_view(&c, tag, &top_chain_id(&registry, tag), &target);
        let got = walk_dir(&target);
        for meta in [
            "stargz.index.json",
            ".prefetch.landmark",
            ".no.prefetch.landmark",
        ] {
            assert!(
                !got.nodes.contains_key(meta.as_bytes()),
                "{tag}: {meta} shows in the view"
            );
        }
        if tag.ends_with("esgz") {
            tree::assert_same(tag, &estargz_can_say(&want), &estargz_can_say(&got), &cmp);
        } else {
            tree::assert_same(tag, &want, &got, &cmp);
        }
        unmount_view(&c, tag, &target);
    }
    assert_same_listing(
        "rules in a container",
        &host_listing(&oracle.rootfs()),
        &container_listing(&c, &registry.reference("rules:gzip"), "rules"),
    );
}

/// Without the remote labels (`ctr image pull`), containerd applies each layer into an
/// active snapshot, as with its overlayfs snapshotter; the result is just as exact. (Minus a
/// hardlink to a file of a lower layer: containerd's applier links inside the upper
/// directory, where the target is not, and fails on such an image with any snapshotter.)
#[test]
fn layers_pulled_without_labels_are_applied_by_containerd() {
    let registry = Registry::start(Auth::Anonymous);
    let [l1, mut l2, l3] = rules();
    l2.retain(|e| e.path != b"hl/link2");
    registry.push_image("plain", "v1", &image(vec![base_layer(0), l1, l2, l3]));
    let c = Containerd::start(&[]);
    let reference = registry.reference("plain:v1");
    let out = c.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        SNAP,
        &reference,
    ]);
    assert!(out.status.success(), "{}\n{}", out.report(), c.logs());
    let info = c.ctr(&[
        "snapshots",
        "--snapshotter",
        SNAP,
        "info",
        &top_chain_id(&registry, "plain:v1"),
    ]);
    info.assert_success();
    assert!(
        !info
            .stdout_str()
            .contains(imagefs::snapshotter::REMOTE_LABEL),
        "a snapshot containerd applied is not remote: {}",
        info.stdout_str()
    );
    let oracle = Oracle::unpack(&registry, "plain:v1", None);
    let target = c.path("view-plain");
    mount_view(
        &c,
        "plain-view",
        &top_chain_id(&registry, "plain:v1"),
        &target,
    );
    // containerd's applier (the same with its overlayfs snapshotter) leaves a directory
    // with the mtime of the apply when a later layer changes it, and does not apply trusted.*
    // xattrs.
    let cmp = tree::Compare {
        dir_mtimes: false,
        ignore_xattrs: vec![b"trusted.imagefs".to_vec()],
        ..oracle_compare()
    };
    tree::assert_same(
        "applied",
        &walk_dir(&oracle.rootfs()),
        &walk_dir(&target),
        &cmp,
    );
    unmount_view(&c, "plain-view", &target);
    assert_eq!(
        run(&c, &reference, "plain", &["cat", "/etc/os-release"]),
        "ID=imagefs-oracle\nNAME=\"second\"\n"
    );
    let usage = c.ctr(&["snapshots", "--snapshotter", SNAP, "usage"]);
    usage.assert_success();
    assert!(
        usage.stdout_str().lines().count() >= 5,
        "{}",
        usage.stdout_str()
    );
}

#[test]
fn after_a_snapshotter_restart_containers_run_again_from_the_cache_alone() {
    let mut registry = Registry::start(Auth::Anonymous);
    registry.push_image("again", "v1", &two_layers(1 << 20));
    let mut c = Containerd::start(&[]);
    let reference = registry.reference("again:v1");
    rpull(&c, &reference);
    assert_eq!(
        run(&c, &reference, "before", &["cat", "/etc/motd"]),
        "from layer 2\n"
    );
    let before = c
        .ctr(&["snapshots", "--snapshotter", SNAP, "ls"])
        .stdout_str();

    c.stop_snapshotter();
    assert!(
        !c.mounts().iter().any(|m| m.starts_with(c.cache_dir())),
        "the snapshotter left views mounted: {:?}",
        c.mounts()
    );
    registry.stop();
    c.start_snapshotter_with(&[]);
    // containerd reconnects to the proxy plugin with a backoff of a few seconds.
    let mut listed = String::new();
    let answered = crate::support::mounts::wait_until(std::time::Duration::from_secs(30), || {
        let out = c.ctr(&["snapshots", "--snapshotter", SNAP, "ls"]);
        listed = out.stdout_str();
        out.status.success()
    });
    assert!(
        answered,
        "containerd never reached the restarted snapshotter\n{}",
        c.logs()
    );
    assert_eq!(listed, before, "the snapshots survive the restart");
    assert_eq!(
        run(&c, &reference, "after", &["cat", "/etc/motd"]),
        "from layer 2\n"
    );
}

#[test]
fn removing_the_image_frees_its_snapshots_and_cache_gc_reclaims_the_layers() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("gone", "v1", &two_layers(4 << 20));
    let c = Containerd::start(&[]);
    let reference = registry.reference("gone:v1");
    rpull(&c, &reference);
    assert_eq!(
        run(&c, &reference, "read", &["cat", "/etc/motd"]),
        "from layer 2\n"
    );
    let layers = c.cache_dir().join("layers/sha256");
    let entries = |dir: &Path| fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(entries(&layers), 2, "both layers extracted");

    // Nothing of a live snapshot goes while it lives.
    let imagefs = |args: &[&str]| {
        Cmd::program(crate::support::cmd::imagefs_bin())
            .arg("--cache-dir")
            .arg(c.cache_dir())
            .args(args)
            .run()
    };
    imagefs(&["cache", "prune", "--all"]).assert_success();
    imagefs(&["cache", "gc", "--min-age", "0s"]).assert_success();
    assert_eq!(
        entries(&layers),
        2,
        "prune and gc kept what live snapshots need"
    );

    c.ctr(&["image", "rm", "--sync", &reference])
        .assert_success();
    let gone = crate::support::mounts::wait_until(std::time::Duration::from_secs(20), || {
        c.ctr(&["snapshots", "--snapshotter", SNAP, "ls"])
            .stdout_str()
            .lines()
            .count()
            <= 1
    });
    assert!(gone, "snapshots left after the image went:\n{}", c.logs());
    assert_eq!(
        entries(&c.cache_dir().join("snapshotter/snapshots")),
        0,
        "snapshot directories left"
    );
    imagefs(&["cache", "gc", "--min-age", "0s"]).assert_success();
    assert_eq!(entries(&layers), 0, "gc reclaimed the layers");
    assert_eq!(
        entries(&c.cache_dir().join("blobs/sha256")),
        0,
        "gc reclaimed the blobs"
    );
}
