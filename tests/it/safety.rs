//! Safety and misuse, as a hostile local user or a careless one would try: `umount` only ever
//! unmounts imagefs mounts, setuid/devices are opt-in, a cache another user controls is
//! refused, the password is not left in the daemon's environment, mount points must be empty,
//! unmounted and outside imagefs, two racing mounts leave one, `-q` keeps results, errors are
//! one line, `--platform` is a requirement, the root's attributes are real when known, and
//! non-root failures name their cause.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::mounts::{
    Mount, TIMEOUT, cleanup, daemon_pids, is_imagefs_mounted, is_mounted, mount_cmd, mountinfo,
    mountpoint_dir, umount_cmd, wait_until,
};
use crate::support::{
    Auth, Cmd, Compression, Entry, Format, Image, ImageBuilder, Imagefs, Layer, Registry,
    image::DEFAULT_MTIME, noise,
};

/// The root's own entry, so that the mount root has attributes of the image's.
const ROOT_MTIME: i64 = DEFAULT_MTIME + 12_345;

fn image() -> Image {
    ImageBuilder::new(Format::Oci)
        .layer(Layer::new(
            &[
                Entry::dir("").mode(0o751).mtime(ROOT_MTIME, 0),
                Entry::dir("etc"),
                Entry::file("etc/os-release", "ID=safety\n"),
                Entry::dir("tmp").mode(0o1777),
                Entry::file("bin/su", "#!/bin/sh\n").mode(0o4755),
                // Open to all in the image: only the mount's nodev keeps users from it.
                Entry::char_device("dev/null", 1, 3).mode(0o666),
            ],
            Compression::Gzip,
        ))
        .layer(Layer::new(
            &[
                Entry::dir("data"),
                Entry::file("data/blob", noise(2 << 20, 9)),
            ],
            Compression::Gzip,
        ))
        .build()
}

fn registry_with_image(repo: &str) -> (Registry, String) {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image(repo, "v1", &image());
    let reference = registry.reference(&format!("{repo}:v1"));
    (registry, reference)
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
}

/// `mount ARGS…`, asserting success (for tmpfs and bind mounts the tests make).
fn sys_mount(args: &[&str], target: &Path) {
    let status = Command::new("mount")
        .args(args)
        .arg(target)
        .status()
        .unwrap();
    assert!(status.success(), "mount {args:?} {}", target.display());
}

/// Unmounts whatever is stacked at a mount point (imagefs, tmpfs, bind) when a test ends,
/// passed or failed, and waits for an imagefs daemon there to exit.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        while is_mounted(&self.0) {
            if Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
            {
                break;
            }
        }
        cleanup(&self.0);
    }
}

/// `setpriv` running `program` as `nobody` (uid and gid 65534, no supplementary groups).
fn as_nobody(program: impl AsRef<Path>) -> Cmd {
    Cmd::program("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(program.as_ref())
}

/// The imagefs binary where an unprivileged user can run it (the build directory may not be
/// reachable for them), and the command to run it as `nobody`.
struct AsNobody {
    dir: tempfile::TempDir,
}

const NOBODY: u32 = 65534;

impl AsNobody {
    fn new() -> AsNobody {
        let dir = tempfile::Builder::new()
            .prefix("imagefs-nobody-")
            .tempdir()
            .unwrap();
        chmod(dir.path(), 0o755);
        fs::copy(
            crate::support::cmd::imagefs_bin(),
            dir.path().join("imagefs"),
        )
        .unwrap();
        chmod(&dir.path().join("imagefs"), 0o755);
        AsNobody { dir }
    }

    fn cmd(&self, args: &[&str]) -> Cmd {
        as_nobody(self.dir.path().join("imagefs"))
            .args(args)
            .env("HOME", self.dir.path())
            .env("XDG_CACHE_HOME", self.dir.path().join("cache"))
    }
}

/// `imagefs --cache-dir CACHE ARGS…` (a cache other than the [`Imagefs`] one).
fn with_cache(cache: &Path, args: &[&str]) -> Cmd {
    Cmd::program(crate::support::cmd::imagefs_bin())
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
}

// ---------------------------------------------------------------------------------------------
// 1. umount

#[test]
fn umount_refuses_anything_but_an_imagefs_mount() {
    let scratch = tempfile::tempdir().unwrap();
    let tmpfs = scratch.path().join("tmpfs");
    fs::create_dir(&tmpfs).unwrap();
    sys_mount(&["-t", "tmpfs", "-o", "size=1m", "imagefs-test"], &tmpfs);
    let _t = Cleanup(tmpfs.clone());
    umount_cmd(&tmpfs)
        .run()
        .assert_failure_contains("is not an imagefs mount (it is a tmpfs mount");
    assert!(is_mounted(&tmpfs), "imagefs umount unmounted a tmpfs");

    let (src, bind) = (scratch.path().join("src"), scratch.path().join("bind"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&bind).unwrap();
    sys_mount(&["--bind", src.to_str().unwrap()], &bind);
    let _b = Cleanup(bind.clone());
    umount_cmd(&bind)
        .run()
        .assert_failure_contains("is not an imagefs mount");
    assert!(is_mounted(&bind), "imagefs umount unmounted a bind mount");

    // A symlink to an imagefs mount is not the mount point: refused, the mount stays.
    let (_registry, reference) = registry_with_image("umount");
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &reference);
    let link = scratch.path().join("link");
    std::os::unix::fs::symlink(m.path(), &link).unwrap();
    umount_cmd(&link)
        .run()
        .assert_failure_contains("is a symbolic link");
    assert!(is_imagefs_mounted(m.path()));
    // A symlink to a tmpfs, the same.
    let link2 = scratch.path().join("link2");
    std::os::unix::fs::symlink(&tmpfs, &link2).unwrap();
    umount_cmd(&link2)
        .run()
        .assert_failure_contains("is a symbolic link");
    assert!(is_mounted(&tmpfs));
    m.unmount();
}

#[test]
fn umount_of_another_users_mount_names_the_owner() {
    let (_registry, reference) = registry_with_image("owner");
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &reference);
    let nobody = AsNobody::new();
    let out = nobody.cmd(&["umount", m.path().to_str().unwrap()]).run();
    out.assert_failure_contains("was mounted by uid 0: only that user or root can unmount it");
    assert!(is_imagefs_mounted(m.path()));
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 2. setuid and devices

#[test]
fn suid_or_dev_with_allow_other_needs_a_mount_point_others_cannot_reach() {
    let (_registry, reference) = registry_with_image("reach");
    let imagefs = Imagefs::new();
    let (dir, mp) = mountpoint_dir();
    let _cleanup = Cleanup(mp.clone());
    // Every directory above the mount point lets others through.
    chmod(dir.path(), 0o755);
    for args in [&["--rootfs"][..], &["--suid"], &["--dev"]] {
        let out = mount_cmd(&imagefs, &[], &reference, &mp)
            .arg("--allow-other")
            .args(args)
            .run();
        out.assert_failure_contains("other users cannot enter");
        assert!(!is_mounted(&mp), "{args:?}");
    }
    // Safe by default: --allow-other alone mounts nosuid,nodev.
    mount_cmd(&imagefs, &[], &reference, &mp)
        .arg("--allow-other")
        .run()
        .assert_success();
    umount_cmd(&mp).run().assert_success();
    assert!(wait_until(TIMEOUT, || daemon_pids(&mp).is_empty()));
    // Under a directory only its owner can enter, --rootfs is fine.
    chmod(dir.path(), 0o700);
    mount_cmd(&imagefs, &[], &reference, &mp)
        .args(["--allow-other", "--rootfs"])
        .run()
        .assert_success();
    let flags = &mountinfo(&mp)[0].0;
    assert!(!flags.contains("nosuid"), "{flags}");
    umount_cmd(&mp).run().assert_success();
    cleanup(&mp);
}

#[test]
fn an_unprivileged_user_cannot_use_the_images_setuid_programs_or_devices() {
    let (_registry, reference) = registry_with_image("nosuid");
    let imagefs = Imagefs::new();
    let (dir, mp) = mountpoint_dir();
    let _cleanup = Cleanup(mp.clone());
    chmod(dir.path(), 0o755);
    mount_cmd(&imagefs, &[], &reference, &mp)
        .arg("--allow-other")
        .run()
        .assert_success();
    // The bits are shown, the kernel does not honour them (nosuid) nor open devices (nodev).
    let su = fs::metadata(mp.join("bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    let open = as_nobody("sh")
        .args([
            "-c",
            "exec 3<>\"$0\"",
            mp.join("dev/null").to_str().unwrap(),
        ])
        .run();
    assert!(!open.status.success(), "{}", open.report());
    assert!(
        open.stderr_str().contains("Permission denied"),
        "{}",
        open.report()
    );
    umount_cmd(&mp).run().assert_success();
    cleanup(&mp);
}

// ---------------------------------------------------------------------------------------------
// 3. cache directory ownership

#[test]
fn a_cache_directory_another_user_controls_is_refused() {
    let (registry, reference) = registry_with_image("cache");
    let pushed = registry.access_log().len();
    let scratch = tempfile::tempdir().unwrap();

    let theirs = scratch.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    chown(&theirs, NOBODY);
    let open = scratch.path().join("open");
    fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let home = scratch.path().join("home");
    fs::create_dir_all(home.join("cache")).unwrap();
    chown(&home, NOBODY);
    let inside = scratch.path().join("inside");
    fs::create_dir_all(inside.join("layers")).unwrap();
    chown(&inside.join("layers"), NOBODY);

    for (cache, why) in [
        (&theirs, "theirs is owned by uid 65534"),
        (&open, "open is writable by others (mode 777)"),
        (&home.join("cache"), "home is owned by uid 65534"),
        (&inside, "layers is owned by uid 65534"),
    ] {
        with_cache(cache, &["pull", &reference])
            .run()
            .assert_failure_contains(why);
        let (_d, mp) = mountpoint_dir();
        let _cleanup = Cleanup(mp.clone());
        with_cache(cache, &["mount", &reference, mp.to_str().unwrap()])
            .run()
            .assert_failure_contains(why);
        assert!(!is_mounted(&mp));
    }
    assert_eq!(
        registry.access_log().len(),
        pushed,
        "the registry was asked for something"
    );
    assert_eq!(
        fs::read_dir(&theirs).unwrap().count(),
        0,
        "wrote into theirs"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. secrets

#[test]
fn the_registry_password_is_not_in_the_daemons_environment() {
    const PASS: &str = "pw-in-env-7f3a9c";
    let registry = Registry::start(Auth::basic("alice", PASS));
    registry.push_image("secret", "v1", &image());
    let reference = registry.reference("secret:v1");
    let imagefs = Imagefs::new();

    // The daemon of a background mount.
    let (_d, mp) = mountpoint_dir();
    let _cleanup = Cleanup(mp.clone());
    mount_cmd(&imagefs, &[], &reference, &mp)
        .env("IMAGEFS_USERNAME", "alice")
        .env("IMAGEFS_PASSWORD", PASS)
        .run()
        .assert_success();
    // The keeper and its server.
    let pids = daemon_pids(&mp);
    assert_eq!(pids.len(), 2, "{pids:?}");
    for pid in pids {
        let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(!contains(&environ, PASS.as_bytes()), "password in environ");
    }
    // It authenticates all the same: layers come from the Basic-auth registry.
    assert_eq!(fs::read(mp.join("etc/os-release")).unwrap(), b"ID=safety\n");
    umount_cmd(&mp).run().assert_success();
    cleanup(&mp);

    // A foreground mount (the process that read the variable itself).
    let (_d, mp) = mountpoint_dir();
    let _cleanup = Cleanup(mp.clone());
    let mut child = Command::new(crate::support::cmd::imagefs_bin())
        .args(["--cache-dir", imagefs.cache_dir().to_str().unwrap()])
        .args(["mount", "-f", &reference, mp.to_str().unwrap()])
        .env("IMAGEFS_USERNAME", "alice")
        .env("IMAGEFS_PASSWORD", PASS)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(TIMEOUT, || is_imagefs_mounted(&mp)));
    let environ = fs::read(format!("/proc/{}/environ", child.id())).unwrap();
    assert!(!contains(&environ, PASS.as_bytes()), "password in environ");
    assert_eq!(fs::read(mp.join("etc/os-release")).unwrap(), b"ID=safety\n");
    umount_cmd(&mp).run().assert_success();
    assert!(child.wait().unwrap().success());
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// 5, 6. mount points

#[test]
fn a_mount_point_must_be_empty_and_outside_imagefs_mounts() {
    let (_registry, reference) = registry_with_image("empty");
    let imagefs = Imagefs::new();
    let (_d, mp) = mountpoint_dir();
    let _cleanup = Cleanup(mp.clone());
    fs::write(mp.join("precious"), "keep me").unwrap();
    mount_cmd(&imagefs, &[], &reference, &mp)
        .run()
        .assert_failure_contains("is not empty");
    assert!(!is_mounted(&mp));
    assert_eq!(fs::read(mp.join("precious")).unwrap(), b"keep me");
    // Asked for explicitly, it mounts over them.
    mount_cmd(&imagefs, &[], &reference, &mp)
        .arg("--nonempty")
        .run()
        .assert_success();
    assert!(is_imagefs_mounted(&mp));
    umount_cmd(&mp).run().assert_success();
    cleanup(&mp);
    assert_eq!(fs::read(mp.join("precious")).unwrap(), b"keep me");

    // An (empty) directory of a mounted image.
    let m = Mount::new(&imagefs, &[], &reference);
    assert_eq!(fs::read_dir(m.p("tmp")).unwrap().count(), 0);
    mount_cmd(&imagefs, &[], &reference, &m.p("tmp"))
        .run()
        .assert_failure_contains("is inside the imagefs mount");
    assert_eq!(mountinfo(&m.p("tmp")).len(), 0);
    m.unmount();
}

#[test]
fn concurrent_mounts_of_one_directory_leave_one_mount() {
    let (_registry, reference) = registry_with_image("race");
    let imagefs = Imagefs::new();
    let (_d, mp) = mountpoint_dir();
    let _cleanup = Cleanup(mp.clone());
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let cmd = mount_cmd(&imagefs, &[], &reference, &mp);
            std::thread::spawn(move || cmd.run())
        })
        .collect();
    let outs: Vec<_> = runs.into_iter().map(|t| t.join().unwrap()).collect();
    let won = outs.iter().filter(|o| o.status.success()).count();
    let info = mountinfo(&mp);
    let report: Vec<String> = outs.iter().map(|o| o.report()).collect();
    assert_eq!(won, 1, "{report:#?}");
    assert_eq!(info.len(), 1, "{info:?}");
    for o in outs.iter().filter(|o| !o.status.success()) {
        o.assert_failure_contains("is already a mount point");
    }
    umount_cmd(&mp).run().assert_success();
    cleanup(&mp);
    assert!(!is_mounted(&mp));
}

// ---------------------------------------------------------------------------------------------
// 7, 8. output

#[test]
fn quiet_hides_progress_not_results() {
    let (_registry, reference) = registry_with_image("quiet");
    let imagefs = Imagefs::new();
    let out = imagefs.cmd(["-q", "pull", &reference]).run();
    out.assert_success();
    let stdout = out.stdout_str();
    assert!(stdout.contains("Digest: sha256:"), "{}", out.report());
    assert!(stdout.contains("Image ID: sha256:"), "{}", out.report());
    assert_eq!(out.stderr_str(), "", "{}", out.report());
}

#[test]
fn usage_errors_are_one_line() {
    let imagefs = Imagefs::new();
    for args in [
        &["--timeout", "abc", "layers", "x"][..],
        &["--timeout", "0", "layers", "x"],
        &["--cache-max-size", "-1", "layers", "x"],
        &["--cache-max-size=-1", "layers", "x"],
        &["inspect", "--format", "yaml", "x"],
        &["mount", "x"],
    ] {
        let out = imagefs.cmd(args).run();
        assert_eq!(out.status.code(), Some(2), "{}", out.report());
        let err = out.stderr_str();
        assert!(err.starts_with("imagefs: "), "{}", out.report());
        assert_eq!(err.lines().count(), 1, "{}", out.report());
    }
    let zero = imagefs.cmd(["--timeout", "0", "layers", "x"]).run();
    zero.assert_failure_contains("is zero");
}

#[test]
fn a_full_disk_is_one_line_naming_the_layer_once() {
    let (_registry, reference) = registry_with_image("enospc");
    let scratch = tempfile::tempdir().unwrap();
    let cache = scratch.path().join("small");
    fs::create_dir(&cache).unwrap();
    sys_mount(
        &["-t", "tmpfs", "-o", "size=1m,mode=0700", "imagefs-test"],
        &cache,
    );
    let _t = Cleanup(cache.clone());
    let out = with_cache(&cache, &["-q", "pull", &reference]).run();
    out.assert_failure_contains("No space left on device");
    let err = out.stderr_str();
    // A full disk is not the blob's fault.
    assert!(!err.contains("failed verification"), "{}", out.report());
    assert!(!err.contains("panicked"), "{}", out.report());
    assert_eq!(err.lines().count(), 1, "{}", out.report());
    let big = &image().layers[1].digest;
    assert!(err.matches(big.as_str()).count() <= 1, "{}", out.report());
}

// ---------------------------------------------------------------------------------------------
// 9, 10. platform, root attributes

#[test]
fn an_explicit_platform_must_match_a_single_platform_image() {
    let (_registry, reference) = registry_with_image("platform");
    let imagefs = Imagefs::new();
    imagefs
        .cmd(["--platform", "linux/arm64", "inspect", &reference])
        .run()
        .assert_failure_contains("is a single-platform image for linux/amd64, not linux/arm64");
    let (_d, mp) = mountpoint_dir();
    let _cleanup = Cleanup(mp.clone());
    mount_cmd(&imagefs, &["--platform", "linux/arm64"], &reference, &mp)
        .run()
        .assert_failure_contains("linux/amd64");
    assert!(!is_mounted(&mp));
    imagefs
        .cmd(["--platform", "linux/amd64", "inspect", &reference])
        .run()
        .assert_success();
    // Without --platform, the host's platform is a preference, as before.
    imagefs.cmd(["inspect", &reference]).run().assert_success();
}

#[test]
fn a_cached_images_root_shows_its_real_attributes_at_once() {
    let (_registry, reference) = registry_with_image("rootattr");
    let imagefs = Imagefs::new();
    imagefs.cmd(["pull", &reference]).run().assert_success();
    let m = Mount::new(&imagefs, &[], &reference);
    let root = fs::metadata(m.path()).unwrap();
    assert_eq!(root.mtime(), ROOT_MTIME);
    assert_eq!(root.mode() & 0o7777, 0o751);
    assert!(root.nlink() > 2, "nlink {}", root.nlink());
    m.unmount();
}

// ---------------------------------------------------------------------------------------------
// 11. non-root errors

#[test]
fn a_non_root_mount_without_access_to_dev_fuse_says_so() {
    let (_registry, reference) = registry_with_image("nonroot");
    let nobody = AsNobody::new();
    let mp = nobody.dir.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    chown(&mp, NOBODY);
    let cache = nobody.dir.path().join("cache");
    fs::create_dir(&cache).unwrap();
    chown(&cache, NOBODY);
    // Debian makes /dev/fuse 0666; some machines (this one at times) keep it root-only.
    let open_to_all = fs::metadata("/dev/fuse").unwrap().mode() & 0o006 == 0o006;
    let out = nobody
        .cmd(&[
            "--cache-dir",
            cache.to_str().unwrap(),
            "mount",
            &reference,
            mp.to_str().unwrap(),
        ])
        .run();
    if open_to_all {
        // fuser falls back to the setuid fusermount3: the supported non-root way.
        out.assert_success();
        assert!(is_imagefs_mounted(&mp), "{}", out.report());
        nobody
            .cmd(&["umount", mp.to_str().unwrap()])
            .run()
            .assert_success();
        assert!(wait_until(TIMEOUT, || !is_mounted(&mp)));
    } else {
        out.assert_failure_contains("/dev/fuse is not readable and writable for uid 65534");
        assert!(!is_mounted(&mp));
    }
    cleanup(&mp);
}
