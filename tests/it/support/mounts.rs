//! Mounts made by the real `imagefs mount` (a daemon in its own session) and what a test
//! needs around them: a [`Mount`] guard that unmounts in `Drop`, `/proc/self/mountinfo`
//! lookups, finding the daemon process, and bounded polling.
//!
//! ```ignore
//! let imagefs = Imagefs::new();
//! let m = Mount::new(&imagefs, &[], &registry.reference("app:1"));   // panics with the report
//! assert!(m.path().join("etc/os-release").is_file());
//! m.unmount();                                                        // or just drop it
//! ```
//!
//! Dropping a [`Mount`] runs `imagefs umount`, falls back to `fusermount3 -uz`, then waits
//! (bounded) for the daemon to exit and kills it if it does not.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::cmd::{Cmd, Imagefs, Output, imagefs_bin};

/// How long a mount, an unmount or a daemon exit may take before a test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `cond` every few milliseconds until it holds or `timeout` passes; returns whether it
/// held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Decodes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The `/proc/self/mountinfo` lines whose mount point is `path` (after symlinks are resolved
/// in its parent), split at ` - ` into (mount part, filesystem part). Stacked mounts give
/// several lines.
pub fn mountinfo(path: &Path) -> Vec<(String, String)> {
    let abs = match path.canonicalize() {
        Ok(p) => p,
        // A dead FUSE mount point cannot be resolved; its parent can.
        Err(_) => match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => match parent.canonicalize() {
                Ok(p) => p.join(name),
                Err(_) => path.to_path_buf(),
            },
            _ => path.to_path_buf(),
        },
    };
    let want = abs.as_os_str().as_bytes();
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mp = mount.split(' ').nth(4)?;
            (unescape(mp) == want).then(|| (mount.to_owned(), fs.to_owned()))
        })
        .collect()
}

/// Every mount point at or below `dir` (resolved), in mount order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|mp| PathBuf::from(OsStr::from_bytes(&unescape(mp))))
        .filter(|mp| mp.starts_with(dir))
        .collect()
}

/// Whether anything is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    !mountinfo(path).is_empty()
}

/// Whether an imagefs FUSE filesystem (`fuse.imagefs`) is mounted at `path`.
pub fn is_imagefs_mounted(path: &Path) -> bool {
    mountinfo(path)
        .iter()
        .any(|(_, fs)| fs.starts_with("fuse.imagefs "))
}

/// Live (not zombie) processes running the imagefs binary with `mountpoint` among their
/// arguments and `mount` as a subcommand: the mount's keeper and its server (and, briefly,
/// the `mount` that started them).
pub fn daemon_pids(mountpoint: &Path) -> Vec<u32> {
    let want = mountpoint.as_os_str().as_bytes();
    let bin = imagefs_bin().as_os_str().as_bytes();
    let mut pids = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_ours = args.first().is_some_and(|a| *a == bin)
            && args.contains(&&b"mount"[..])
            && args.contains(&want);
        if is_ours && !is_zombie(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// The parent of `pid`, from `/proc/PID/stat`.
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ppid ...`
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn is_zombie(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(true),
        Err(_) => true,
    }
}

/// A live `imagefs mount`; unmounted (and its daemon reaped or killed) on drop.
pub struct Mount {
    mountpoint: PathBuf,
    /// The mount point's parent, removed on drop (after the unmount).
    _dir: tempfile::TempDir,
    /// What `imagefs mount` printed.
    pub output: Output,
    /// How long `imagefs mount` took to return.
    pub took: Duration,
    unmounted: bool,
}

/// A fresh, empty mount point directory under a temp dir that lives as long as the guard.
pub fn mountpoint_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("imagefs-mnt-")
        .tempdir()
        .expect("create mount point parent");
    let mp = dir.path().join("mnt");
    fs::create_dir(&mp).expect("create mount point");
    (dir, mp)
}

impl Mount {
    /// `imagefs [global...] mount REFERENCE <fresh dir>`; panics with the command's report
    /// unless it succeeded and the mount shows in mountinfo.
    pub fn new(imagefs: &Imagefs, global: &[&str], reference: &str) -> Mount {
        Mount::try_new(imagefs, global, reference)
            .unwrap_or_else(|out| panic!("imagefs mount failed\n{}", out.report()))
    }

    /// Like [`Mount::new`], but hands back the report of a failed `imagefs mount`.
    pub fn try_new(imagefs: &Imagefs, global: &[&str], reference: &str) -> Result<Mount, Output> {
        Mount::try_new_with(imagefs, global, &[], reference)
    }

    /// Like [`Mount::new`], with `mount_args` after the mount point (`--prefetch all`, …).
    pub fn new_with(
        imagefs: &Imagefs,
        global: &[&str],
        mount_args: &[&str],
        reference: &str,
    ) -> Mount {
        Mount::try_new_with(imagefs, global, mount_args, reference)
            .unwrap_or_else(|out| panic!("imagefs mount failed\n{}", out.report()))
    }

    pub fn try_new_with(
        imagefs: &Imagefs,
        global: &[&str],
        mount_args: &[&str],
        reference: &str,
    ) -> Result<Mount, Output> {
        Mount::try_new_env(imagefs, global, mount_args, &[], reference)
    }

    /// Like [`Mount::new_with`], with extra environment variables for `imagefs mount` (and so
    /// for its daemon), e.g. `IMAGEFS_NO_RESEND=1`.
    pub fn new_env(
        imagefs: &Imagefs,
        global: &[&str],
        mount_args: &[&str],
        env: &[(&str, &str)],
        reference: &str,
    ) -> Mount {
        Mount::try_new_env(imagefs, global, mount_args, env, reference)
            .unwrap_or_else(|out| panic!("imagefs mount failed\n{}", out.report()))
    }

    fn try_new_env(
        imagefs: &Imagefs,
        global: &[&str],
        mount_args: &[&str],
        env: &[(&str, &str)],
        reference: &str,
    ) -> Result<Mount, Output> {
        let (dir, mp) = mountpoint_dir();
        let mut cmd = mount_cmd(imagefs, global, reference, &mp).args(mount_args);
        for (k, v) in env {
            cmd = cmd.env(k, v);
        }
        let started = Instant::now();
        let output = cmd.run();
        let took = started.elapsed();
        if output.timed_out || !output.status.success() {
            cleanup(&mp);
            return Err(output);
        }
        assert!(
            is_imagefs_mounted(&mp),
            "imagefs mount returned success but {} is not a fuse.imagefs mount:\n{}\nmountinfo: {:?}",
            mp.display(),
            output.report(),
            mountinfo(&mp)
        );
        Ok(Mount {
            mountpoint: mp,
            _dir: dir,
            output,
            took,
            unmounted: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// `path()/rel`.
    pub fn p(&self, rel: impl AsRef<OsStr>) -> PathBuf {
        self.mountpoint.join(rel.as_ref())
    }

    /// The daemon of this mount: its keeper, the one of its processes whose parent is not
    /// another (exactly one, or panics).
    pub fn daemon_pid(&self) -> u32 {
        let pids = daemon_pids(&self.mountpoint);
        let keepers: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| !parent_pid(*p).is_some_and(|pp| pids.contains(&pp)))
            .collect();
        assert_eq!(
            keepers.len(),
            1,
            "expected one keeper for {}, found {keepers:?} among {pids:?}",
            self.mountpoint.display()
        );
        keepers[0]
    }

    /// The server of this mount: the keeper's child (exactly one, or panics).
    pub fn server_pid(&self) -> u32 {
        let keeper = self.daemon_pid();
        let servers: Vec<u32> = daemon_pids(&self.mountpoint)
            .into_iter()
            .filter(|p| parent_pid(*p) == Some(keeper))
            .collect();
        assert_eq!(servers.len(), 1, "expected one server, found {servers:?}");
        servers[0]
    }

    /// `imagefs umount`; asserts it succeeded, the mount is gone and the daemon exited.
    pub fn unmount(mut self) -> Output {
        let out = umount_cmd(&self.mountpoint).run();
        self.unmounted = true;
        out.assert_success();
        assert!(
            wait_until(TIMEOUT, || !is_mounted(&self.mountpoint)),
            "{} still mounted after imagefs umount",
            self.mountpoint.display()
        );
        assert!(
            wait_until(TIMEOUT, || daemon_pids(&self.mountpoint).is_empty()),
            "the daemon of {} did not exit after imagefs umount: {:?}",
            self.mountpoint.display(),
            daemon_pids(&self.mountpoint)
        );
        out
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.unmounted && is_mounted(&self.mountpoint) {
            let _ = umount_cmd(&self.mountpoint)
                .timeout(Duration::from_secs(20))
                .run();
        }
        cleanup(&self.mountpoint);
    }
}

/// `imagefs [global...] mount REFERENCE MOUNTPOINT` with the test's cache.
pub fn mount_cmd(imagefs: &Imagefs, global: &[&str], reference: &str, mp: &Path) -> Cmd {
    imagefs
        .cmd(global)
        .arg("mount")
        .arg(reference)
        .arg(mp)
        .timeout(Duration::from_secs(180))
}

/// `imagefs umount MOUNTPOINT`.
pub fn umount_cmd(mp: &Path) -> Cmd {
    Cmd::program(imagefs_bin())
        .arg("umount")
        .arg(mp)
        .timeout(TIMEOUT)
}

/// Whatever is still mounted at `mp` is detached, and its daemon waited for (killed after
/// [`TIMEOUT`]).
pub fn cleanup(mp: &Path) {
    if is_mounted(mp) {
        let _ = Command::new("fusermount3").arg("-uz").arg(mp).status();
    }
    if is_mounted(mp) {
        let _ = Command::new("umount").arg("-l").arg(mp).status();
    }
    if !wait_until(TIMEOUT, || daemon_pids(mp).is_empty()) {
        for pid in daemon_pids(mp) {
            // SAFETY: kill(2) has no memory effects; the pid runs our own binary.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}
