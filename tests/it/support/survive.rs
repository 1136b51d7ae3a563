//! What the survival tests (`survive.rs`) need around mounts whose server is killed or
//! replaced under load. Each piece only runs and measures; the tests assert.
//!
//! - [`ps`], [`PsEntry`]: `imagefs ps --format json`, parsed; [`restart_servers`] SIGKILLs or
//!   upgrades the servers of some mounts and waits (bounded) until `ps` shows their successors.
//! - [`ReaderLoop`]: threads reading random files whole, checking every byte (sha256), counting
//!   reads, errors (by errno, the first few kept verbatim) and wrong bytes, until stopped.
//! - [`SlowProxy`]: a TCP proxy on 127.0.0.1 in front of the real registry that sleeps before
//!   relaying each response chunk, and counts the connections with a fetch in flight.
//! - [`RuncLoop`]: a detached runc container, the mount as its read-only rootfs, whose shell
//!   loop reads files of the image and logs `OK` or what it got to a host directory.
//! - [`TestUser`], [`UserScratch`]: an unprivileged user, and a directory it owns holding a
//!   copy of the binary it can execute, to run imagefs rootless.
//! - Image builders with deterministic content ([`gzip_image`], [`estargz_image`],
//!   [`busybox_image`]) that also return every regular file's expected bytes.
//!
//! This module knows nothing of how imagefs restarts its servers; it sees only `ps`, `/proc`,
//! the cache directory and the bytes read.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use imagefs::layer::estargz::{Landmark, TOC_DIGEST_ANNOTATION, WriterOptions, build};
use imagefs::layer::index::{Entry as IndexEntry, EntryKind};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::cmd::{Cmd, Imagefs, Output, imagefs_bin};
use super::mounts::{TIMEOUT, cleanup, is_mounted, mount_cmd, mountpoint_dir, mounts_under};
use super::mounts::{umount_cmd, wait_until};
use super::{Compression, Entry, Format, Image, ImageBuilder, Layer, noise, sha256_digest};

// ---------------------------------------------------------------------------------------------
// Processes

/// Whether `pid` runs (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// The scheduler state letter of `pid` (`S` sleeping, `D` uninterruptible, …), if it exists.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Sends `signal` to `pid`; whether it was delivered.
pub fn signal(pid: u32, signal: i32) -> bool {
    // SAFETY: kill(2) has no memory effects; callers pass pids of processes this test started.
    unsafe { libc::kill(pid as libc::pid_t, signal) == 0 }
}

/// The pids of processes whose real, effective, saved or filesystem uid is `uid`.
pub fn pids_of_uid(uid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .is_some_and(|ids| ids.split_whitespace().any(|id| id == uid.to_string()))
            })
        })
        .collect()
}

/// The owner uid of a running process.
pub fn uid_of(pid: u32) -> Option<u32> {
    fs::metadata(format!("/proc/{pid}")).ok().map(|m| m.uid())
}

// ---------------------------------------------------------------------------------------------
// `imagefs ps --format json`

/// One live mount as `imagefs ps --format json` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct PsEntry {
    pub mountpoint: PathBuf,
    pub reference: String,
    pub manifest_digest: String,
    pub keeper_pid: u32,
    /// `None` (JSON `null`) while the keeper has no server (between a death and the next).
    pub server_pid: Option<u32>,
    pub restarts: u64,
    pub uptime: f64,
    pub passthrough: bool,
}

impl PsEntry {
    fn from_json(o: &Value) -> Result<PsEntry, String> {
        let s = |k: &str| {
            o.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("no string {k:?}"))
        };
        let n = |k: &str| {
            o.get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("no number {k:?}"))
        };
        Ok(PsEntry {
            mountpoint: PathBuf::from(s("mountpoint")?),
            reference: s("reference")?,
            manifest_digest: s("manifestDigest")?,
            keeper_pid: n("keeperPid")? as u32,
            server_pid: match o.get("serverPid") {
                Some(Value::Null) => None,
                _ => Some(n("serverPid")? as u32),
            },
            restarts: n("restarts")?,
            uptime: o
                .get("uptime")
                .and_then(Value::as_f64)
                .ok_or("no number \"uptime\"")?,
            passthrough: o
                .get("passthrough")
                .and_then(Value::as_bool)
                .ok_or("no bool \"passthrough\"")?,
        })
    }
}

/// The entries of a successful `ps --format json`; panics with the report otherwise.
pub fn parse_ps(out: &Output) -> Vec<PsEntry> {
    out.assert_success();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ps --format json printed no JSON ({e})\n{}", out.report()));
    let Some(list) = v.as_array() else {
        panic!("ps --format json printed no array\n{}", out.report());
    };
    list.iter()
        .map(|o| {
            PsEntry::from_json(o)
                .unwrap_or_else(|what| panic!("ps entry {o}: {what}\n{}", out.report()))
        })
        .collect()
}

/// `imagefs ps --format json` over `imagefs`'s cache.
pub fn ps(imagefs: &Imagefs) -> Vec<PsEntry> {
    parse_ps(
        &imagefs
            .cmd(["ps", "--format", "json"])
            .timeout(TIMEOUT)
            .run(),
    )
}

/// `path` with its parent resolved; never looks at `path` itself (it may be a mount that does
/// not answer, or one another user's mount hides).
fn resolved(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// The entry for mount point `mp`, if listed.
pub fn find_entry<'a>(entries: &'a [PsEntry], mp: &Path) -> Option<&'a PsEntry> {
    let want = resolved(mp);
    entries
        .iter()
        .find(|e| e.mountpoint == mp || resolved(&e.mountpoint) == want)
}

impl PsEntry {
    /// The server's pid; panics if the entry shows none.
    pub fn server(&self) -> u32 {
        self.server_pid
            .unwrap_or_else(|| panic!("no server in {self:#?}"))
    }
}

/// Polls `list` (a `ps`) until `mp` is listed with a live server (bounded by [`TIMEOUT`]) and
/// returns its entry; panics with the last listing if it never is.
pub fn served_entry(mut list: impl FnMut() -> Vec<PsEntry>, mp: &Path) -> PsEntry {
    let mut all = Vec::new();
    let served = wait_until(TIMEOUT, || {
        all = list();
        find_entry(&all, mp).is_some_and(|e| e.server_pid.is_some_and(alive))
    });
    assert!(
        served,
        "imagefs ps does not list {} with a live server: {all:#?}",
        mp.display()
    );
    find_entry(&all, mp).cloned().expect("checked above")
}

/// The `ps` entry of `mp` once it has a live server ([`served_entry`] over [`ps`]).
pub fn entry_of(imagefs: &Imagefs, mp: &Path) -> PsEntry {
    served_entry(|| ps(imagefs), mp)
}

/// How a test replaces the server of a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// SIGKILL the server; the keeper starts another.
    Kill,
    /// `imagefs upgrade MP` for each mount.
    Upgrade,
    /// One `imagefs upgrade --all`.
    UpgradeAll,
}

/// A mount's server before and after a restart.
#[derive(Debug, Clone)]
pub struct Replaced {
    pub mountpoint: PathBuf,
    pub old: PsEntry,
    pub new: PsEntry,
}

/// Replaces the servers of all of `mps` (all killed first, then all waited for) and returns
/// what `ps` showed before and after. Kills: waits (bounded by [`TIMEOUT`]) until `ps` shows a
/// live new server with `restarts + 1` for each; upgrades: `upgrade` must exit 0 and `ps` must
/// show the new server at once (it returns once the new server serves), started from the
/// binary that ran `upgrade`.
pub fn restart_servers(imagefs: &Imagefs, mps: &[&Path], how: Restart) -> Vec<Replaced> {
    let old: Vec<PsEntry> = mps.iter().map(|mp| entry_of(imagefs, mp)).collect();
    match how {
        Restart::Kill => {
            for e in &old {
                assert!(
                    signal(e.server(), libc::SIGKILL),
                    "cannot SIGKILL server {} of {}",
                    e.server(),
                    e.mountpoint.display()
                );
            }
        }
        Restart::Upgrade => {
            for mp in mps {
                imagefs
                    .cmd(["upgrade"])
                    .arg(mp)
                    .timeout(TIMEOUT)
                    .run()
                    .assert_success();
            }
        }
        Restart::UpgradeAll => {
            imagefs
                .cmd(["upgrade", "--all"])
                .timeout(TIMEOUT)
                .run()
                .assert_success();
        }
    }
    let replaced = if how == Restart::Kill {
        wait_replaced(|| ps(imagefs), &old)
    } else {
        let after = ps(imagefs);
        old.iter()
            .map(|o| Replaced {
                mountpoint: o.mountpoint.clone(),
                new: successor(&after, o).cloned().unwrap_or_else(|| {
                    panic!(
                        "after {how:?}, ps does not show a new live server with restarts+1 \
                         for {}\nbefore: {o:#?}\nafter: {after:#?}",
                        o.mountpoint.display()
                    )
                }),
                old: o.clone(),
            })
            .collect()
    };
    if how != Restart::Kill {
        let want = imagefs_bin().canonicalize().expect("the imagefs binary");
        for r in &replaced {
            let exe = fs::read_link(format!("/proc/{}/exe", r.new.server()));
            assert_eq!(
                exe.as_deref().ok(),
                Some(want.as_path()),
                "the upgraded server of {} does not run the binary that ran upgrade",
                r.mountpoint.display()
            );
        }
    }
    replaced
}

/// The entry in `all` that replaced `old`: same mount point, another live server,
/// `restarts + 1`.
fn successor<'a>(all: &'a [PsEntry], old: &PsEntry) -> Option<&'a PsEntry> {
    find_entry(all, &old.mountpoint).filter(|n| {
        n.server_pid != old.server_pid
            && n.restarts == old.restarts + 1
            && n.server_pid.is_some_and(alive)
    })
}

/// Polls `list` (a `ps`) until every mount of `old` shows a successor (bounded by
/// [`TIMEOUT`]); panics with both listings if one never does.
pub fn wait_replaced(mut list: impl FnMut() -> Vec<PsEntry>, old: &[PsEntry]) -> Vec<Replaced> {
    let mut after = Vec::new();
    let done = wait_until(TIMEOUT, || {
        after = list();
        old.iter().all(|o| successor(&after, o).is_some())
    });
    assert!(
        done,
        "ps does not show a new live server with restarts+1 for every mount\n\
         before: {old:#?}\nafter: {after:#?}"
    );
    old.iter()
        .map(|o| Replaced {
            mountpoint: o.mountpoint.clone(),
            new: successor(&after, o).cloned().expect("checked above"),
            old: o.clone(),
        })
        .collect()
}

/// Whether the store under `cache_dir` is downloading or extracting a layer: `tmp/` holds a
/// layer's extraction directory (`layer-PID-…`) of a live process (a dead one's leftover does
/// not count), or `partial/` holds a layer download not yet complete.
pub fn layer_in_progress(cache_dir: &Path) -> bool {
    let extracting = fs::read_dir(cache_dir.join("tmp")).is_ok_and(|d| {
        d.flatten().any(|e| {
            e.file_type().is_ok_and(|t| t.is_dir())
                && e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("layer-"))
                    .and_then(|n| n.split('-').next())
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(alive)
        })
    });
    let downloading = fs::read_dir(cache_dir.join("partial")).is_ok_and(|mut d| d.next().is_some());
    extracting || downloading
}

/// The warnings and errors the keepers and servers of `imagefs`'s mounts logged (last `max`
/// bytes), for failure reports.
pub fn daemon_logs(imagefs: &Imagefs, max: usize) -> String {
    let mut out = String::new();
    for e in fs::read_dir(imagefs.cache_dir().join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        out.push_str(&format!("== {}\n", e.path().display()));
        for line in fs::read_to_string(e.path()).unwrap_or_default().lines() {
            if line.contains(" WARN ") || line.contains(" ERROR ") || line.contains("panicked") {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    let cut = out.len().saturating_sub(max);
    let cut = (cut..out.len())
        .find(|&i| out.is_char_boundary(i))
        .unwrap_or(out.len());
    out[cut..].to_owned()
}

/// `(st_dev, st_ino)` of each path; panics naming a path that cannot be stat'ed, or if the
/// mount does not answer within [`TIMEOUT`].
pub fn inode_sample(paths: &[PathBuf]) -> Vec<(PathBuf, u64, u64)> {
    let owned = paths.to_vec();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let sample: Result<Vec<_>, String> = owned
            .into_iter()
            .map(|p| match fs::symlink_metadata(&p) {
                Ok(m) => Ok((p, m.dev(), m.ino())),
                Err(e) => Err(format!("stat {}: {e}", p.display())),
            })
            .collect();
        let _ = tx.send(sample);
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(Ok(sample)) => sample,
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!(
            "stat of {} paths got no answer within {TIMEOUT:?}",
            paths.len()
        ),
    }
}

/// Asks the kernel to forget unused dentries and inodes (so that the next `stat`s are
/// lookups answered by the current server, not the kernel's memory of the old one).
pub fn drop_dentries() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "2");
}

/// Aborts the FUSE connection of the mount at `mp` (through
/// `/sys/fs/fuse/connections/N/abort`): the last resort of a cleanup when a request can
/// never be answered.
pub fn abort_fuse_connection(mp: &Path) {
    for (mount, _) in super::mounts::mountinfo(mp) {
        // `ID PARENT MAJOR:MINOR ROOT MOUNTPOINT ...`: the connection is named by the minor.
        if let Some(minor) = mount
            .split(' ')
            .nth(2)
            .and_then(|d| d.split_once(':'))
            .map(|(_, minor)| minor.to_owned())
        {
            let _ = fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Readers

/// A file to read and what it must hold.
#[derive(Debug, Clone)]
pub struct Expected {
    pub path: PathBuf,
    pub len: u64,
    pub sha256: String,
}

impl Expected {
    pub fn new(path: PathBuf, content: &[u8]) -> Expected {
        Expected {
            path,
            len: content.len() as u64,
            sha256: sha256_digest(content),
        }
    }

    /// `root/rel` for every `(rel, content)`.
    pub fn under(root: &Path, files: &[(String, Vec<u8>)]) -> Vec<Expected> {
        files
            .iter()
            .map(|(rel, c)| Expected::new(root.join(rel), c))
            .collect()
    }

    /// Like [`Expected::check`], on a thread of its own: a read with no answer within
    /// `timeout` is an error (and its thread is left behind).
    pub fn check_within(&self, timeout: Duration) -> Result<(), Failure> {
        let (tx, rx) = std::sync::mpsc::channel();
        let me = self.clone();
        std::thread::spawn(move || {
            let _ = tx.send(me.check());
        });
        rx.recv_timeout(timeout).unwrap_or_else(|_| {
            Err(Failure::Error {
                errno: None,
                message: format!("{}: no answer within {timeout:?}", self.path.display()),
            })
        })
    }

    /// Reads the file whole; `Err` describes an error or wrong bytes.
    pub fn check(&self) -> Result<(), Failure> {
        match fs::read(&self.path) {
            Err(e) => Err(Failure::Error {
                errno: e.raw_os_error(),
                message: format!("{}: {e}", self.path.display()),
            }),
            Ok(got) if got.len() as u64 != self.len || sha256_digest(&got) != self.sha256 => {
                Err(Failure::Wrong(format!(
                    "{}: {} bytes, {}; want {} bytes, {}",
                    self.path.display(),
                    got.len(),
                    sha256_digest(&got),
                    self.len,
                    self.sha256
                )))
            }
            Ok(_) => Ok(()),
        }
    }
}

/// How one read failed.
#[derive(Debug, Clone)]
pub enum Failure {
    Error { errno: Option<i32>, message: String },
    Wrong(String),
}

/// The name of an errno the tests meet (`ENOTCONN`, …), else its number.
pub fn errno_name(errno: Option<i32>) -> String {
    match errno {
        None => "not an OS error".to_owned(),
        Some(libc::ENOTCONN) => "ENOTCONN".to_owned(),
        Some(libc::ECONNABORTED) => "ECONNABORTED".to_owned(),
        Some(libc::EIO) => "EIO".to_owned(),
        Some(libc::ENOENT) => "ENOENT".to_owned(),
        Some(libc::EINTR) => "EINTR".to_owned(),
        Some(libc::EACCES) => "EACCES".to_owned(),
        Some(libc::EAGAIN) => "EAGAIN".to_owned(),
        Some(libc::ESTALE) => "ESTALE".to_owned(),
        Some(n) => format!("errno {n}"),
    }
}

/// How many failures [`ReadTotals::first_failures`] keeps verbatim.
const KEPT_FAILURES: usize = 8;

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    errors: AtomicU64,
    wrong: AtomicU64,
    /// Failure details; a mutex because failures are rare and only counted under it.
    detail: Mutex<Detail>,
}

#[derive(Default)]
struct Detail {
    first: Vec<String>,
    by_errno: BTreeMap<Option<i32>, u64>,
}

impl Counters {
    fn record(&self, result: Result<(), Failure>) {
        let failure = match result {
            Ok(()) => {
                self.reads.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Err(f) => f,
        };
        let mut detail = self.detail.lock().unwrap();
        let line = match failure {
            Failure::Error { errno, message } => {
                self.errors.fetch_add(1, Ordering::SeqCst);
                *detail.by_errno.entry(errno).or_default() += 1;
                format!("error {}: {message}", errno_name(errno))
            }
            Failure::Wrong(what) => {
                self.wrong.fetch_add(1, Ordering::SeqCst);
                format!("wrong bytes: {what}")
            }
        };
        if detail.first.len() < KEPT_FAILURES {
            detail.first.push(line);
        }
    }
}

/// What a [`ReaderLoop`] saw.
#[derive(Debug, Clone)]
pub struct ReadTotals {
    /// Whole files read with the right bytes.
    pub reads: u64,
    /// Reads that failed with an error.
    pub errors: u64,
    /// Reads that returned other bytes than the file's.
    pub wrong: u64,
    /// Threads still inside a read when asked to stop (after [`TIMEOUT`]).
    pub hung: usize,
    /// The first few failures, verbatim.
    pub first_failures: Vec<String>,
    /// Errors by errno (`None`: not an OS error).
    pub errors_by_errno: BTreeMap<Option<i32>, u64>,
}

impl ReadTotals {
    /// `ENOTCONN×3, EIO×1`.
    pub fn errno_summary(&self) -> String {
        self.errors_by_errno
            .iter()
            .map(|(e, n)| format!("{}×{n}", errno_name(*e)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Threads that each, until stopped, pick a random file of a list, read it whole and check
/// its bytes (fresh open every time).
pub struct ReaderLoop {
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Reads by threads outside the loop ([`ReaderLoop::check_in_background`]).
    extra: Vec<JoinHandle<()>>,
}

impl ReaderLoop {
    /// How many threads the survival tests run.
    pub const THREADS: usize = 32;

    /// Starts `threads` readers over `files` (deterministic choices from `seed`).
    pub fn start(files: Vec<Expected>, threads: usize, seed: u64) -> ReaderLoop {
        assert!(!files.is_empty(), "nothing to read");
        let files = Arc::new(files);
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|i| {
                let (files, counters, stop) = (files.clone(), counters.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(seed ^ ((i as u64 + 1) * 0x9e37_79b9));
                    while !stop.load(Ordering::SeqCst) {
                        let f = &files[rng.usize(..files.len())];
                        counters.record(f.check());
                    }
                })
            })
            .collect();
        ReaderLoop {
            counters,
            stop,
            threads,
            extra: Vec::new(),
        }
    }

    /// Whole files read right so far.
    pub fn reads(&self) -> u64 {
        self.counters.reads.load(Ordering::SeqCst)
    }

    /// Errors and wrong reads so far.
    pub fn failures(&self) -> u64 {
        self.counters.errors.load(Ordering::SeqCst) + self.counters.wrong.load(Ordering::SeqCst)
    }

    /// Reads `file` once on a thread of its own, counted with the loop's reads; the handle
    /// tells whether it has finished.
    pub fn check_in_background(&mut self, file: Expected) -> Arc<AtomicBool> {
        let finished = Arc::new(AtomicBool::new(false));
        let (counters, flag) = (self.counters.clone(), finished.clone());
        self.extra.push(std::thread::spawn(move || {
            counters.record(file.check());
            flag.store(true, Ordering::SeqCst);
        }));
        finished
    }

    /// Stops the threads (waiting at most [`TIMEOUT`] for those inside a read) and returns the
    /// totals. A thread that never returns is counted in `hung` and left behind.
    pub fn stop(mut self) -> ReadTotals {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + TIMEOUT;
        let mut hung = 0;
        let threads = std::mem::take(&mut self.threads);
        let extra = std::mem::take(&mut self.extra);
        for t in threads.into_iter().chain(extra) {
            let left = deadline.saturating_duration_since(Instant::now());
            if wait_until(left, || t.is_finished()) {
                let _ = t.join();
            } else {
                hung += 1;
            }
        }
        let c = &self.counters;
        let detail = c.detail.lock().unwrap();
        ReadTotals {
            reads: c.reads.load(Ordering::SeqCst),
            errors: c.errors.load(Ordering::SeqCst),
            wrong: c.wrong.load(Ordering::SeqCst),
            hung,
            first_failures: detail.first.clone(),
            errors_by_errno: detail.by_errno.clone(),
        }
    }
}

/// A test that panics midway leaves no reader spinning over its (then unmounted) files.
impl Drop for ReaderLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// A slow proxy

/// Largest response chunk relayed after one delay.
const RELAY_CHUNK: usize = 256 << 10;

/// Receive buffer of the upstream socket: while the proxy sleeps, the registry fills it, so a
/// chunk after a delay is large and big blobs still arrive in seconds.
const UPSTREAM_RCVBUF: libc::c_int = 1 << 20;

/// A connection whose response went quiet this long after data (with no new request) has no
/// fetch in flight any more (an idle keep-alive connection).
const QUIET: Duration = Duration::from_millis(200);

struct ProxyShared {
    upstream: String,
    /// The delay range before each response chunk; a mutex since tests change it rarely.
    delay: Mutex<Range<Duration>>,
    /// Bumped by [`SlowProxy::set_delay`]: chunks held under the old delay go at once.
    epoch: AtomicU64,
    stop: AtomicBool,
    in_flight: AtomicUsize,
    connections: AtomicUsize,
    requests: AtomicUsize,
    bytes: AtomicU64,
    /// Clones of every socket, shut down when the proxy drops (a mutex: touched per connection).
    sockets: Mutex<Vec<TcpStream>>,
}

impl ProxyShared {
    /// Sleeps the current delay (random in its range), or less if the delay changes or the
    /// proxy stops meanwhile.
    fn hold(&self, rng: &mut fastrand::Rng) {
        let range = self.delay.lock().unwrap().clone();
        let epoch = self.epoch.load(Ordering::SeqCst);
        let (lo, hi) = (range.start.as_micros() as u64, range.end.as_micros() as u64);
        let d = Duration::from_micros(if hi > lo { rng.u64(lo..hi) } else { lo });
        let until = Instant::now() + d;
        while Instant::now() < until
            && !self.stop.load(Ordering::SeqCst)
            && self.epoch.load(Ordering::SeqCst) == epoch
        {
            std::thread::sleep(
                until
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(5)),
            );
        }
    }
}

/// Whether one connection has a fetch in flight: from a request forwarded until its response
/// went quiet, counted in [`ProxyShared::in_flight`].
struct Flight {
    shared: Arc<ProxyShared>,
    on: AtomicBool,
    /// Response bytes arrived since the last request bytes.
    answered: AtomicBool,
}

impl Flight {
    fn set(&self, on: bool) {
        if self.on.swap(on, Ordering::SeqCst) != on {
            if on {
                self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
            } else {
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// A TCP proxy on 127.0.0.1 to one upstream address (plain HTTP passes through untouched):
/// requests are forwarded at once, each response chunk (up to 256 KiB) only after a random
/// delay in the configured range. Stops (listener and connections) when dropped.
pub struct SlowProxy {
    addr: String,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

impl SlowProxy {
    /// A proxy to `upstream` (`127.0.0.1:PORT`) delaying each response chunk by `delay`.
    pub fn start(upstream: &str, delay: Range<Duration>) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy on 127.0.0.1");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let shared = Arc::new(ProxyShared {
            upstream: upstream.to_owned(),
            delay: Mutex::new(delay),
            epoch: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            sockets: Mutex::new(Vec::new()),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for (n, client) in listener.incoming().enumerate() {
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    let shared = shared.clone();
                    std::thread::spawn(move || relay(shared, client, n as u64));
                }
            })
        };
        SlowProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `127.0.0.1:PORT/REPO_REF`: the image reference through the proxy.
    pub fn reference(&self, repo_ref: &str) -> String {
        format!("{}/{repo_ref}", self.addr)
    }

    /// Connections with a fetch in flight now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// HTTP requests forwarded so far (request chunks that start with a method).
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Response bytes relayed so far.
    pub fn bytes_relayed(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }

    /// From now on, delay each response chunk by `delay`; chunks already held go at once.
    pub fn set_delay(&self, delay: Range<Duration>) {
        *self.shared.delay.lock().unwrap() = delay;
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(&self.addr);
        for s in self.shared.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Sets `SO_RCVBUF` of `s`.
fn set_rcvbuf(s: &TcpStream, bytes: libc::c_int) {
    // SAFETY: a valid socket fd and a pointer to a live c_int of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Relays one client connection: requests straight through on a second thread, responses
/// chunk by chunk after a delay on this one.
fn relay(shared: Arc<ProxyShared>, client: TcpStream, seed: u64) {
    let Ok(upstream) = TcpStream::connect(&shared.upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    set_rcvbuf(&upstream, UPSTREAM_RCVBUF);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(mut from_client), Ok(mut to_upstream)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    {
        let mut sockets = shared.sockets.lock().unwrap();
        sockets.extend(client.try_clone().ok());
        sockets.extend(upstream.try_clone().ok());
    }
    let flight = Arc::new(Flight {
        shared: shared.clone(),
        on: AtomicBool::new(false),
        answered: AtomicBool::new(false),
    });
    let requests = {
        let (flight, shared) = (flight.clone(), shared.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match from_client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let head = &buf[..n.min(8)];
                        if [&b"GET "[..], b"HEAD ", b"POST ", b"PUT ", b"PATCH "]
                            .iter()
                            .any(|m| head.starts_with(m))
                        {
                            shared.requests.fetch_add(1, Ordering::SeqCst);
                        }
                        flight.answered.store(false, Ordering::SeqCst);
                        flight.set(true);
                        if to_upstream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to_upstream.shutdown(Shutdown::Write);
        })
    };
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let (mut from_upstream, mut to_client) = (upstream, client);
    let _ = from_upstream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; RELAY_CHUNK];
    let mut last_data = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        match from_upstream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                flight.answered.store(true, Ordering::SeqCst);
                flight.set(true);
                shared.hold(&mut rng);
                if to_client.write_all(&buf[..n]).is_err() {
                    break;
                }
                shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
                last_data = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if flight.answered.load(Ordering::SeqCst) && last_data.elapsed() >= QUIET {
                    flight.set(false);
                }
            }
            Err(_) => break,
        }
    }
    flight.set(false);
    let _ = to_client.shutdown(Shutdown::Both);
    let _ = from_upstream.shutdown(Shutdown::Both);
    let _ = requests.join();
}

// ---------------------------------------------------------------------------------------------
// Images

/// `(path in the image, content)` of every regular file an image shows.
pub type Files = Vec<(String, Vec<u8>)>;

/// `layers` gzip layers of `files_per_layer` files each (1–48 KiB, and every 25th 1.5 MiB) of
/// incompressible content from `seed`, spread over 8 directories per layer; every layer also
/// rewrites `shared/version`, so the mount shows the top one's.
pub fn gzip_image(layers: usize, files_per_layer: usize, seed: u64) -> (Image, Files) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut files = Files::new();
    let mut builder = ImageBuilder::new(Format::Oci);
    for l in 0..layers {
        let mut entries = vec![Entry::dir(format!("l{l}")), Entry::dir("shared")];
        for d in 0..8 {
            entries.push(Entry::dir(format!("l{l}/d{d}")));
        }
        for i in 0..files_per_layer {
            let len = if i % 25 == 24 {
                3 << 19
            } else {
                rng.usize(1 << 10..48 << 10)
            };
            let path = format!("l{l}/d{}/f{i:03}", i % 8);
            let content = noise(len, rng.u64(..));
            entries.push(Entry::file(&path, &content));
            files.push((path, content));
        }
        let version = format!("layer {l}\n").into_bytes();
        entries.push(Entry::file("shared/version", &version));
        builder = builder.layer(Layer::new(&entries, Compression::Gzip));
        if l + 1 == layers {
            files.push(("shared/version".to_owned(), version));
        }
    }
    (builder.build(), files)
}

/// Chunk size of [`estargz_image`]'s layer.
pub const ESTARGZ_CHUNK: u64 = 64 << 10;

/// One eStargz layer (64 KiB chunks, TOC digest annotated) of `files` files in `many/`
/// (1–32 KiB, every 25th 512 KiB) and `reserved` files of 1 MiB in `cold/`, all from `seed`.
/// Returns the image, the `many/` files and the `cold/` files (for a test to read on purpose).
pub fn estargz_image(files: usize, reserved: usize, seed: u64) -> (Image, Files, Files) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let many: Files = (0..files)
        .map(|i| {
            let len = if i % 25 == 24 {
                512 << 10
            } else {
                rng.usize(1 << 10..32 << 10)
            };
            (format!("many/f{i:03}"), noise(len, rng.u64(..)))
        })
        .collect();
    let cold: Files = (0..reserved)
        .map(|i| (format!("cold/c{i:02}"), noise(1 << 20, rng.u64(..))))
        .collect();
    let mut entries = vec![
        (IndexEntry::new("many", EntryKind::Dir, 0o755), Vec::new()),
        (IndexEntry::new("cold", EntryKind::Dir, 0o755), Vec::new()),
    ];
    for (path, content) in many.iter().chain(&cold) {
        let mut e = IndexEntry::new(path.as_str(), EntryKind::File, 0o644);
        e.size = content.len() as u64;
        entries.push((e, content.clone()));
    }
    let w = build(
        &entries,
        &WriterOptions {
            chunk_size: ESTARGZ_CHUNK,
            landmark: Landmark::NoPrefetch,
            legacy_footer: false,
            compression: 1,
        },
    )
    .expect("an eStargz layer");
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(&w.blob[..])
        .read_to_end(&mut tar)
        .expect("the eStargz blob gunzips");
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::from_parts(tar, w.blob, Compression::Gzip))
        .layer_annotation(TOC_DIGEST_ANNOTATION, &w.toc_digest.to_string())
        .build();
    (image, many, cold)
}

/// The applets [`busybox_image`] links in `/bin` (besides `busybox`).
const APPLETS: [&str; 8] = [
    "sh",
    "cat",
    "ls",
    "echo",
    "sha256sum",
    "sleep",
    "head",
    "true",
];

/// A busybox rootfs from the host's static busybox (as `cli_mount`'s runc test builds it),
/// with the applets [`RuncLoop`] uses and `/out` for its log bind mount.
pub fn busybox_image() -> (Image, Files) {
    let busybox = fs::read("/bin/busybox").expect("/bin/busybox (install busybox-static)");
    let os_release = b"ID=imagefs-busybox\nNAME=\"imagefs survive test\"\n".to_vec();
    let mut entries = vec![Entry::dir("")];
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root", "out"] {
        entries.push(Entry::dir(d));
    }
    entries.push(Entry::file("bin/busybox", &busybox).mode(0o755));
    for applet in APPLETS {
        entries.push(Entry::symlink(format!("bin/{applet}"), "busybox"));
    }
    entries.push(Entry::file("etc/os-release", &os_release));
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&entries, Compression::Gzip))
        .env(&["PATH=/bin"])
        .cmd(&["/bin/sh"])
        .build();
    let files = vec![
        ("bin/busybox".to_owned(), busybox),
        ("etc/os-release".to_owned(), os_release),
    ];
    (image, files)
}

// ---------------------------------------------------------------------------------------------
// A runc container reading its rootfs in a loop

static CONTAINERS: AtomicUsize = AtomicUsize::new(0);

/// A detached `runc run -d` container whose read-only rootfs is a mount of [`busybox_image`];
/// its shell loop hashes `/bin/busybox` and `/etc/os-release`, lists `/bin`, and appends `OK`
/// (all as expected) or `FAIL` and what it got to `/out/log` (a host directory). Killed and
/// deleted on drop.
pub struct RuncLoop {
    state: TempDir,
    bundle: TempDir,
    out: TempDir,
    id: String,
}

impl RuncLoop {
    /// Starts the container on `rootfs`; `files` are [`busybox_image`]'s files.
    pub fn start(rootfs: &Path, files: &Files) -> RuncLoop {
        let mut want: Vec<String> = files
            .iter()
            .map(|(p, c)| format!("{}  /{p}", &sha256_digest(c)["sha256:".len()..]))
            .collect();
        let mut bin: Vec<&str> = APPLETS.to_vec();
        bin.push("busybox");
        bin.sort_unstable();
        want.extend(bin.iter().map(|s| s.to_string()));
        let hashed: Vec<String> = files.iter().map(|(p, _)| format!("/{p}")).collect();
        let script = format!(
            "while :; do \
               got=$(sha256sum {} 2>&1; ls -1 /bin 2>&1); \
               if [ \"$got\" = \"$WANT\" ]; then echo OK >> /out/log; \
               else echo \"FAIL $got\" >> /out/log; fi; \
               sleep 0.05; \
             done",
            hashed.join(" ")
        );

        let bundle = tempfile::Builder::new()
            .prefix("imagefs-runc-bundle-")
            .tempdir()
            .unwrap();
        let out = tempfile::Builder::new()
            .prefix("imagefs-runc-out-")
            .tempdir()
            .unwrap();
        let (config_path, mut config) = runc_spec(bundle.path(), rootfs, &script);
        config["process"]["env"] = json!(["PATH=/bin", format!("WANT={}", want.join("\n"))]);
        config["mounts"]
            .as_array_mut()
            .expect("runc spec lists mounts")
            .push(json!({
                "destination": "/out",
                "type": "bind",
                "source": out.path(),
                "options": ["rbind", "rw"],
            }));
        fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();

        let state = tempfile::Builder::new()
            .prefix("imagefs-runc-state-")
            .tempdir()
            .unwrap();
        let id = format!(
            "imagefs-survive-{}-{}",
            std::process::id(),
            CONTAINERS.fetch_add(1, Ordering::SeqCst)
        );
        let container = RuncLoop {
            state,
            bundle,
            out,
            id,
        };
        // Not `Cmd::run`: a detached container inherits runc's stdout and stderr, whose pipes
        // would then never close. Files instead, read on failure.
        let stdio = |name: &str| fs::File::create(container.out.path().join(name)).unwrap();
        let mut child = Command::new("runc")
            .arg("--root")
            .arg(container.state.path())
            .args(["run", "-d", "--bundle"])
            .arg(container.bundle.path())
            .arg(&container.id)
            .stdin(Stdio::null())
            .stdout(stdio("runc.stdout"))
            .stderr(stdio("runc.stderr"))
            .spawn()
            .expect("run runc");
        let mut status = None;
        let exited = wait_until(Duration::from_secs(60), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "runc run -d {}: {status:?}\n{}",
            container.id,
            container.runc_output()
        );
        container
    }

    /// What runc and the container wrote besides the log.
    fn runc_output(&self) -> String {
        let read = |n: &str| fs::read_to_string(self.out.path().join(n)).unwrap_or_default();
        format!(
            "--- runc stdout ---\n{}\n--- runc stderr ---\n{}",
            read("runc.stdout"),
            read("runc.stderr")
        )
    }

    /// `runc state` says `running`.
    pub fn is_running(&self) -> bool {
        let out = Cmd::program("runc")
            .arg("--root")
            .arg(self.state.path())
            .args(["state", &self.id])
            .timeout(TIMEOUT)
            .run();
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| v["status"] == "running")
    }

    /// The container's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.out.path().join("log")).unwrap_or_default()
    }

    /// `OK` lines so far.
    pub fn ok_lines(&self) -> usize {
        self.log().lines().filter(|l| *l == "OK").count()
    }

    /// Every other line so far (a failed iteration and what it got).
    pub fn failure_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| *l != "OK")
            .map(str::to_owned)
            .collect()
    }

    /// `runc kill KILL` then `runc delete`; panics if runc fails.
    pub fn stop(self) {
        let runc = |args: &[&str]| {
            Cmd::program("runc")
                .arg("--root")
                .arg(self.state.path())
                .args(args)
                .timeout(TIMEOUT)
                .run()
        };
        runc(&["kill", &self.id, "KILL"]).assert_success();
        assert!(
            wait_until(TIMEOUT, || !self.is_running()),
            "container {} still running after runc kill",
            self.id
        );
        runc(&["delete", "-f", &self.id]).assert_success();
    }
}

impl Drop for RuncLoop {
    fn drop(&mut self) {
        runc_delete(self.state.path(), &self.id);
    }
}

/// `runc spec` in `bundle`, with `rootfs` as the read-only root and `/bin/sh -c script` as
/// the process (no terminal): the config's path and value, to adjust and write back.
pub fn runc_spec(bundle: &Path, rootfs: &Path, script: &str) -> (PathBuf, Value) {
    Cmd::program("runc")
        .args(["spec", "--bundle"])
        .arg(bundle)
        .run()
        .assert_success();
    let config_path = bundle.join("config.json");
    let mut config: Value = serde_json::from_slice(&fs::read(&config_path).unwrap()).unwrap();
    config["root"] = json!({ "path": rootfs, "readonly": true });
    config["process"]["args"] = json!(["/bin/sh", "-c", script]);
    config["process"]["terminal"] = json!(false);
    (config_path, config)
}

/// `runc --root STATE delete -f ID`, best effort (for `Drop`s).
pub fn runc_delete(state: &Path, id: &str) {
    let _ = Cmd::program("runc")
        .arg("--root")
        .arg(state)
        .args(["delete", "-f", id])
        .timeout(Duration::from_secs(20))
        .run();
}

// ---------------------------------------------------------------------------------------------
// Rootless

/// An unprivileged system user for rootless runs (created once, kept across runs).
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl TestUser {
    pub const NAME: &'static str = "imagefs-test";

    /// The user, created with `useradd --system --create-home` if missing (tests run as
    /// root); its home is created if it has none.
    pub fn ensure() -> TestUser {
        if TestUser::lookup().is_none() {
            let out = Cmd::program("useradd")
                .args([
                    "--system",
                    "--create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    TestUser::NAME,
                ])
                .run();
            // Another test run may have created it meanwhile: the lookup below decides.
            if TestUser::lookup().is_none() {
                panic!("cannot create user {}\n{}", TestUser::NAME, out.report());
            }
        }
        let user = TestUser::lookup().expect("looked up above");
        if !user.home.is_dir() {
            fs::create_dir_all(&user.home).expect("create the test user's home");
            std::os::unix::fs::chown(&user.home, Some(user.uid), Some(user.gid))
                .expect("chown the test user's home");
        }
        user
    }

    fn lookup() -> Option<TestUser> {
        let out = Cmd::program("getent")
            .args(["passwd", TestUser::NAME])
            .run();
        if !out.status.success() {
            return None;
        }
        let line = out.stdout_str();
        let f: Vec<&str> = line.trim_end().split(':').collect();
        (f.len() >= 7).then(|| TestUser {
            name: f[0].to_owned(),
            uid: f[2].parse().expect("uid"),
            gid: f[3].parse().expect("gid"),
            home: PathBuf::from(f[5]),
        })
    }
}

/// A directory under the test user's home, owned by it, with a copy of the imagefs binary it
/// can execute (the build tree need not be traversable by it) and an XDG cache home. Commands
/// run as the user with a clean environment, in a private mount namespace where `/dev/fuse`
/// is usable by every user (a 0666 node of the same device bound over it, as Debian's udev
/// rule makes it): some hosts keep the device 0600, and the host's own is never changed.
/// Mounts the user makes live in that namespace ([`UserScratch::is_mounted`]). On drop: the
/// user's remaining processes are killed (all started by this test), then the namespace's
/// holder, which ends the namespace and its mounts; the directory goes.
pub struct UserScratch {
    pub user: TestUser,
    dir: TempDir,
    bin: PathBuf,
    /// `sleep` in the private mount namespace; commands join it with `nsenter`.
    ns: Child,
}

impl UserScratch {
    pub fn new(user: TestUser) -> UserScratch {
        let dir = tempfile::Builder::new()
            .prefix("imagefs-rootless-")
            .tempdir_in(&user.home)
            .expect("create a scratch dir in the test user's home");
        let rdev = fs::metadata("/dev/fuse")
            .expect("/dev/fuse (FUSE is needed)")
            .rdev();
        let node = dir.path().join("fuse");
        let script = format!(
            "mknod -m 666 {node} c {major} {minor} && mount --bind {node} /dev/fuse && \
             echo ready && exec sleep 100000",
            node = node.display(),
            major = libc::major(rdev),
            minor = libc::minor(rdev),
        );
        let mut ns = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(ns.stdout.take().expect("piped")),
            &mut line,
        )
        .expect("reading the namespace holder");
        assert_eq!(
            line.trim(),
            "ready",
            "the private mount namespace was not set up"
        );
        let scratch = UserScratch {
            bin: dir.path().join("bin").join("imagefs"),
            user,
            dir,
            ns,
        };
        scratch.chown(scratch.dir.path());
        let bin_dir = scratch.dir.path().join("bin");
        fs::create_dir(&bin_dir).unwrap();
        fs::set_permissions(&bin_dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::copy(imagefs_bin(), &scratch.bin).expect("copy the imagefs binary");
        fs::set_permissions(&scratch.bin, fs::Permissions::from_mode(0o755)).unwrap();
        scratch.mkdir("cache");
        scratch
    }

    /// Whether something is mounted at `path` in the user's mount namespace.
    pub fn is_mounted(&self, path: &Path) -> bool {
        let info = fs::read_to_string(format!("/proc/{}/mountinfo", self.ns.id()))
            .expect("the namespace holder's mountinfo");
        let want = path.to_str().expect("a UTF-8 path");
        info.lines().any(|l| l.split(' ').nth(4) == Some(want))
    }

    fn chown(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.user.uid), Some(self.user.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A new directory in the scratch directory, owned by the user.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        self.chown(&p);
        p
    }

    /// What `XDG_CACHE_HOME` is for the user's commands (imagefs uses `<it>/imagefs`).
    pub fn cache_home(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// The user's copy of the imagefs binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// `program args…` as the user (setpriv, its groups) in its mount namespace, with only `HOME`,
    /// `XDG_CACHE_HOME`, `PATH` and `NO_COLOR` in the environment.
    pub fn cmd<I, S>(&self, program: impl AsRef<std::ffi::OsStr>, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Cmd::program("nsenter")
            .arg(format!("--target={}", self.ns.id()))
            .args(["--mount", "--", "setpriv"])
            .arg(format!("--reuid={}", self.user.uid))
            .arg(format!("--regid={}", self.user.gid))
            .args(["--init-groups", "--", "env", "-i"])
            .arg(format!("HOME={}", self.user.home.display()))
            .arg(format!("XDG_CACHE_HOME={}", self.cache_home().display()))
            .args([
                "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                "NO_COLOR=1",
            ])
            .arg(program)
            .args(args)
            .current_dir(self.dir.path())
            .timeout(Duration::from_secs(180))
    }

    /// `imagefs args…` as the user (its own cache: no `--cache-dir`).
    pub fn imagefs<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd(&self.bin, args)
    }

    /// `imagefs ps --format json` as the user.
    pub fn ps(&self) -> Vec<PsEntry> {
        parse_ps(&self.imagefs(["ps", "--format", "json"]).run())
    }

    /// The user's processes now.
    pub fn pids(&self) -> Vec<u32> {
        pids_of_uid(self.user.uid)
    }
}

impl Drop for UserScratch {
    fn drop(&mut self) {
        for pid in self.pids() {
            signal(pid, libc::SIGKILL);
        }
        wait_until(TIMEOUT, || self.pids().is_empty());
        let _ = self.ns.kill();
        let _ = self.ns.wait();
    }
}
