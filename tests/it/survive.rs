//! A mount outlives its server. `imagefs mount` runs a keeper (holding `/dev/fuse`) and a
//! server; when the server is SIGKILLed or upgraded, the keeper starts another on the same
//! FUSE connection, which asks the kernel to resend what the old one had not answered. So
//! 32 readers of a gzip image and of a lazy eStargz image (both behind a slow proxy, so that
//! fetches and extractions are under way) and a runc container on a third mount see no error,
//! no wrong byte, and the same inode numbers, across 10 restarts. Also: a killed keeper ends
//! its mount cleanly; without resend a reader in flight waits forever while new reads work;
//! a non-root user mounts, runs a program, survives a server kill and unmounts.
//!
//! Every restart round replaces the servers of all three mounts at once (kills back to back,
//! then waits for all three successors).

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::mounts::{Mount, TIMEOUT, is_mounted, umount_cmd, wait_until};
use crate::support::survive::{
    Expected, Files, ReaderLoop, Restart, RuncLoop, SlowProxy, TestUser, UserScratch,
    abort_fuse_connection, alive, busybox_image, daemon_logs, drop_dentries, entry_of,
    estargz_image, find_entry, gzip_image, inode_sample, layer_in_progress, proc_state, ps,
    restart_servers, served_entry, signal, uid_of, wait_replaced,
};
use crate::support::{Auth, Imagefs, Registry, sha256_digest};

/// Restart rounds per test.
const ROUNDS: usize = 10;

/// What the slow proxy waits before relaying each response chunk.
const SLOW: Range<Duration> = Duration::from_millis(30)..Duration::from_millis(150);

/// Lazy eStargz mounts fetch only the files read, one by one (no prefetch, no read-around):
/// reads keep fetching while the rounds run.
const LAZY: &[&str] = &["--prefetch", "none", "--read-around", "0"];

/// Every `n`th path of `files` under `root`.
fn every(n: usize, root: &Path, files: &Files) -> Vec<PathBuf> {
    files.iter().step_by(n).map(|(p, _)| root.join(p)).collect()
}

/// Three mounts of one cache under load: a gzip image (4 layers, 300 files, ~25 MiB) and an
/// eStargz image (400 files, mounted lazily) through a slow proxy, and a busybox image
/// (`--rootfs`, straight from the registry) as the read-only rootfs of a runc container.
struct Scene {
    // Fields drop in order: the container before its mount, the mounts before the proxy,
    // the registry and the cache.
    container: RuncLoop,
    gzip: Mount,
    estargz: Mount,
    busybox: Mount,
    gzip_files: Files,
    estargz_files: Files,
    busybox_files: Files,
    /// Cold eStargz files no reader touches: read on purpose to have a fetch in flight.
    cold: Files,
    proxy: SlowProxy,
    _registry: Registry,
    imagefs: Imagefs,
}

impl Scene {
    fn start() -> Scene {
        let registry = Registry::start(Auth::Anonymous);
        let (image, gzip_files) = gzip_image(4, 75, 1);
        registry.push_image("survive-gzip", "v1", &image);
        let (image, estargz_files, cold) = estargz_image(400, 6, 2);
        registry.push_image("survive-estargz", "v1", &image);
        let (image, busybox_files) = busybox_image();
        registry.push_image("survive-busybox", "v1", &image);
        let proxy = SlowProxy::start(registry.addr(), SLOW);

        let imagefs = Imagefs::new();
        let http = &["--plain-http"];
        let gzip = Mount::new_with(&imagefs, http, &[], &proxy.reference("survive-gzip:v1"));
        let estargz = Mount::new_with(&imagefs, http, LAZY, &proxy.reference("survive-estargz:v1"));
        let busybox = Mount::new_with(
            &imagefs,
            http,
            &["--rootfs"],
            &registry.reference("survive-busybox:v1"),
        );
        let container = RuncLoop::start(busybox.path(), &busybox_files);
        assert!(
            wait_until(TIMEOUT, || container.ok_lines() >= 3),
            "the container's loop does not work before any restart:\n{}\n{}",
            container.log(),
            daemon_logs(&imagefs, 4000)
        );
        Scene {
            container,
            gzip,
            estargz,
            busybox,
            gzip_files,
            estargz_files,
            busybox_files,
            cold,
            proxy,
            _registry: registry,
            imagefs,
        }
    }

    fn mountpoints(&self) -> [&Path; 3] {
        [self.gzip.path(), self.estargz.path(), self.busybox.path()]
    }

    /// Every file the readers check: all three images' (the cold ones excepted).
    fn expected(&self) -> Vec<Expected> {
        let mut all = Expected::under(self.gzip.path(), &self.gzip_files);
        all.extend(Expected::under(self.estargz.path(), &self.estargz_files));
        all.extend(Expected::under(self.busybox.path(), &self.busybox_files));
        all
    }

    /// Starts a read of a cold eStargz file on its own thread and returns once its fetch is
    /// on the wire (the proxy forwarded a new request and has a fetch in flight, and the read
    /// has not returned). Tries the next cold file if a read was too quick; false if all were.
    fn force_a_fetch(&self, readers: &mut ReaderLoop, next_cold: &mut usize) -> bool {
        while let Some((rel, content)) = self.cold.get(*next_cold) {
            *next_cold += 1;
            let requests = self.proxy.requests();
            let done = readers.check_in_background(Expected::new(self.estargz.p(rel), content));
            let done_now = || done.load(std::sync::atomic::Ordering::SeqCst);
            wait_until(TIMEOUT, || {
                done_now() || (self.proxy.requests() > requests && self.proxy.in_flight() > 0)
            });
            if !done_now() {
                return true;
            }
        }
        false
    }
}

/// What a run of restart rounds measured.
struct Rounds {
    mid_fetch: usize,
    mid_extraction: usize,
    /// How long each round's restart took (from the kill or upgrade to all three successors).
    took: Vec<Duration>,
}

/// The shared body of the SIGKILL and upgrade tests: [`ROUNDS`] rounds of `how(round)` on
/// all three servers under 32 readers and the container, then every check.
fn restarts_lose_no_reads(name: &str, how: impl Fn(usize) -> Restart) {
    let s = Scene::start();
    let mps = s.mountpoints();
    let cache = s.imagefs.cache_dir();
    // Inode numbers, where the tree is there without a layer fetch (the gzip mount's tree is
    // fetched by the readers' first access: sampled after round 1).
    let sample_lazy: Vec<PathBuf> = every(10, s.estargz.path(), &s.estargz_files)
        .into_iter()
        .chain(every(1, s.busybox.path(), &s.busybox_files))
        .collect();
    let sample_gzip = every(10, s.gzip.path(), &s.gzip_files);
    let lazy_before = inode_sample(&sample_lazy);
    let mut gzip_before = None;
    let ok_before = s.container.ok_lines();

    let mut readers = ReaderLoop::start(s.expected(), ReaderLoop::THREADS, 0x5eed);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut next_cold = 0;
    let mut rounds = Rounds {
        mid_fetch: 0,
        mid_extraction: 0,
        took: Vec::new(),
    };
    let started = Instant::now();
    for round in 1..=ROUNDS {
        if round == 1 {
            // The readers' first access to the gzip mount fetches and extracts its layers
            // through the slow proxy: round 1 strikes in the middle of that.
            assert!(
                wait_until(TIMEOUT, || layer_in_progress(&cache)),
                "no layer download or extraction was ever seen in {}",
                cache.display()
            );
        } else {
            std::thread::sleep(Duration::from_millis(rng.u64(150..=900)));
        }
        if round == 2 && rounds.mid_fetch == 0 {
            assert!(
                s.force_a_fetch(&mut readers, &mut next_cold),
                "no cold eStargz read stayed in flight long enough to restart during it"
            );
        }
        let fetching = s.proxy.in_flight() > 0;
        let writing = layer_in_progress(&cache);
        let at = Instant::now();
        let replaced = restart_servers(&s.imagefs, &mps, how(round));
        rounds.took.push(at.elapsed());
        rounds.mid_fetch += fetching as usize;
        rounds.mid_extraction += writing as usize;
        let pids: Vec<String> = replaced
            .iter()
            .map(|r| format!("{}→{}", r.old.server(), r.new.server()))
            .collect();
        eprintln!(
            "{name}: round {round} ({:?}) at {:?}: fetch in flight {fetching}, store writing \
             {writing}, servers {}, {} reads so far",
            how(round),
            started.elapsed(),
            pids.join(" "),
            readers.reads()
        );
        if round == 1 {
            // Waits for the gzip tree, served by round 1's successor.
            gzip_before = Some(inode_sample(&sample_gzip));
        }
    }
    let elapsed = started.elapsed();

    // Reads go on after the last round.
    let reads_then = readers.reads();
    let went_on = wait_until(TIMEOUT, || readers.reads() >= reads_then + 200);
    let totals = readers.stop();
    let logs = || daemon_logs(&s.imagefs, 6000);
    assert!(
        went_on,
        "reads stalled after the last round: {totals:?}\n{}",
        logs()
    );
    assert_eq!(totals.hung, 0, "readers hung: {totals:?}\n{}", logs());
    assert_eq!(
        (totals.errors, totals.wrong),
        (0, 0),
        "reads failed across restarts ({}): {:#?}\n{}",
        totals.errno_summary(),
        totals.first_failures,
        logs()
    );
    assert!(totals.reads > 0);

    let listed = ps(&s.imagefs);
    for mp in mps {
        let e = find_entry(&listed, mp)
            .unwrap_or_else(|| panic!("ps lost {}: {listed:#?}", mp.display()));
        assert_eq!(
            e.restarts,
            ROUNDS as u64,
            "restarts of {}: {listed:#?}",
            mp.display()
        );
    }
    assert!(
        rounds.mid_fetch >= 1,
        "no round struck while a fetch was in flight"
    );
    assert!(
        rounds.mid_extraction >= 1,
        "no round struck while a layer was being written"
    );

    // The same inode numbers, from lookups answered by the last server.
    drop_dentries();
    assert_eq!(
        inode_sample(&sample_lazy),
        lazy_before,
        "inode numbers changed"
    );
    assert_eq!(
        Some(inode_sample(&sample_gzip)),
        gzip_before,
        "inode numbers changed"
    );

    assert!(
        s.container.is_running(),
        "the container died:\n{}",
        s.container.log()
    );
    let failures = s.container.failure_lines();
    let ok_after = s.container.ok_lines();
    assert!(
        failures.is_empty(),
        "the container's reads failed: {:#?}",
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok_after > ok_before,
        "the container made no progress across the rounds ({ok_before} OK lines before, {ok_after} after)"
    );

    let max = rounds.took.iter().max().copied().unwrap_or_default();
    let mean = rounds.took.iter().sum::<Duration>() / rounds.took.len().max(1) as u32;
    eprintln!(
        "MEASURE {name}: {ROUNDS} rounds × 3 servers in {elapsed:?}; restart of all three: mean \
         {mean:?}, max {max:?}; rounds with a fetch in flight: {}; with a layer being \
         written: {}; reads checked: {}; errors: {}; wrong bytes: {}; container OK lines: \
         {ok_before} before, {ok_after} after; proxy: {} connections, {} requests, {} MiB",
        rounds.mid_fetch,
        rounds.mid_extraction,
        totals.reads,
        totals.errors,
        totals.wrong,
        s.proxy.connections(),
        s.proxy.requests(),
        s.proxy.bytes_relayed() >> 20
    );
    let Scene { container, .. } = s;
    container.stop();
}

#[test]
fn server_sigkills_lose_no_reads() {
    restarts_lose_no_reads("server_sigkills_lose_no_reads", |_| Restart::Kill);
}

#[test]
fn upgrades_lose_no_reads() {
    restarts_lose_no_reads("upgrades_lose_no_reads", |round| {
        if round == ROUNDS / 2 {
            Restart::UpgradeAll
        } else {
            Restart::Upgrade
        }
    });
}

/// The errors a dead FUSE connection gives.
fn dead_connection(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::ENOTCONN | libc::ECONNABORTED))
}

#[test]
fn killing_the_keeper_ends_the_mount_cleanly() {
    let registry = Registry::start(Auth::Anonymous);
    let (image, files) = gzip_image(2, 50, 3);
    registry.push_image("keeper", "v1", &image);
    let reference = registry.reference("keeper:v1");
    let imagefs = Imagefs::new();
    let m = Mount::new(&imagefs, &[], &reference);
    for f in Expected::under(m.path(), &files) {
        f.check_within(TIMEOUT)
            .unwrap_or_else(|e| panic!("before the kill: {e:?}"));
    }
    let readers = ReaderLoop::start(
        Expected::under(m.path(), &files),
        ReaderLoop::THREADS,
        0x4ee9,
    );
    assert!(
        wait_until(TIMEOUT, || readers.reads() >= 100),
        "the readers made no progress"
    );

    let e = entry_of(&imagefs, m.path());
    assert!(
        signal(e.keeper_pid, libc::SIGKILL),
        "cannot SIGKILL the keeper"
    );
    let killed = Instant::now();
    assert!(
        wait_until(TIMEOUT, || !alive(e.server())),
        "server {} still running after its keeper was killed",
        e.server()
    );
    let server_gone = killed.elapsed();
    let totals = readers.stop();
    assert_eq!(totals.hung, 0, "readers hung on a dead mount: {totals:?}");
    assert_eq!(totals.wrong, 0, "wrong bytes: {:#?}", totals.first_failures);
    assert!(
        totals.errors_by_errno.keys().all(|e| dead_connection(*e)),
        "errors other than ENOTCONN/ECONNABORTED: {}: {:#?}",
        totals.errno_summary(),
        totals.first_failures
    );
    let err = fs::read(m.p(&files[0].0)).expect_err("a read through a dead mount succeeded");
    assert!(dead_connection(err.raw_os_error()), "{err}");

    let mp = m.path().to_path_buf();
    umount_cmd(&mp).run().assert_success();
    assert!(
        wait_until(TIMEOUT, || !is_mounted(&mp)),
        "still mounted after umount"
    );
    let listed = ps(&imagefs);
    assert!(
        find_entry(&listed, &mp).is_none(),
        "ps lists the dead mount: {listed:#?}"
    );
    drop(m);

    // Nothing in the store was hurt: an offline mount has every byte.
    let m = Mount::new(&imagefs, &["--offline"], &reference);
    for f in Expected::under(m.path(), &files) {
        f.check_within(TIMEOUT)
            .unwrap_or_else(|e| panic!("offline after the kill: {e:?}"));
    }
    let listed = ps(&imagefs);
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert!(find_entry(&listed, m.path()).is_some(), "{listed:#?}");
    eprintln!(
        "MEASURE killing_the_keeper: server gone {server_gone:?} after the keeper's SIGKILL; \
         readers: {} reads, errors {} ({}), wrong bytes {}",
        totals.reads,
        totals.errors,
        totals.errno_summary(),
        totals.wrong
    );
    m.unmount();
}

/// A `cat` of a file of a mount, as a child process (a thread blocked in a FUSE read cannot
/// be killed). On drop: SIGKILLed, and if the kernel keeps waiting for the answer, the mount's
/// FUSE connection is aborted so that it ends.
struct CatChild {
    child: Child,
    mountpoint: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl CatChild {
    fn start(path: &Path, mountpoint: &Path) -> CatChild {
        let dir = tempfile::tempdir().unwrap();
        let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let child = Command::new("cat")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("run cat");
        CatChild {
            child,
            mountpoint: mountpoint.to_path_buf(),
            stdout,
            stderr,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// What it got: bytes on stdout, its stderr, its exit status.
    fn report(&mut self) -> String {
        format!(
            "{} bytes out, stderr {:?}, status {:?}",
            fs::metadata(&self.stdout).map_or(0, |m| m.len()),
            fs::read_to_string(&self.stderr).unwrap_or_default(),
            self.child.try_wait().ok().flatten()
        )
    }
}

impl Drop for CatChild {
    fn drop(&mut self) {
        // Once reaped, its pid may be another process's.
        if self.exited() {
            return;
        }
        signal(self.pid(), libc::SIGKILL);
        if !wait_until(Duration::from_secs(2), || self.exited()) {
            abort_fuse_connection(&self.mountpoint);
            wait_until(TIMEOUT, || self.exited());
        }
    }
}

#[test]
fn without_resend_a_reader_in_flight_waits_and_new_reads_work() {
    let registry = Registry::start(Auth::Anonymous);
    let (image, many, cold) = estargz_image(20, 2, 4);
    registry.push_image("noresend", "v1", &image);
    let proxy = SlowProxy::start(registry.addr(), SLOW);
    let imagefs = Imagefs::new();
    let m = Mount::new_env(
        &imagefs,
        &["--plain-http"],
        LAZY,
        &[("IMAGEFS_NO_RESEND", "1")],
        &proxy.reference("noresend:v1"),
    );
    let digest = Expected::new(m.p(".digest"), &fs::read(m.p(".digest")).unwrap());
    let warm = Expected::new(m.p(&many[0].0), &many[0].1);
    warm.check_within(TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:?}"));

    // From now on every response chunk is held: the cold read's fetch stays in flight.
    assert!(
        wait_until(TIMEOUT, || proxy.in_flight() == 0),
        "the proxy never went idle"
    );
    proxy.set_delay(Duration::from_secs(120)..Duration::from_secs(120));
    let requests = proxy.requests();
    let mut reader = CatChild::start(&m.p(&cold[0].0), m.path());
    assert!(
        wait_until(TIMEOUT, || proxy.requests() > requests
            && proxy.in_flight() > 0),
        "the cold read's fetch never reached the proxy: {}",
        reader.report()
    );
    assert!(
        !reader.exited(),
        "the cold read returned while its fetch was held: {}",
        reader.report()
    );

    let old = entry_of(&imagefs, m.path());
    assert!(signal(old.server(), libc::SIGKILL));
    assert!(
        wait_until(TIMEOUT, || !alive(old.server())),
        "server {} survived SIGKILL",
        old.server()
    );
    // The held chunk goes to the dead server's closed connection; new fetches are quick.
    proxy.set_delay(SLOW);
    let replaced = wait_replaced(|| ps(&imagefs), std::slice::from_ref(&old));
    let new = &replaced[0].new;

    // New reads work: a meta file, a file read before, cold files fetched by the new server.
    for f in [&digest, &warm] {
        f.check_within(TIMEOUT)
            .unwrap_or_else(|e| panic!("after the restart: {e:?}"));
    }
    for (rel, content) in [&many[1], &cold[1]] {
        Expected::new(m.p(rel), content)
            .check_within(TIMEOUT)
            .unwrap_or_else(|e| panic!("a cold read after the restart: {e:?}"));
    }

    // The read that was in flight in the killed server is never answered.
    let returned = wait_until(Duration::from_secs(3), || reader.exited());
    let state = proc_state(reader.pid());
    assert!(
        !returned,
        "the in-flight read returned without resend: {}",
        reader.report()
    );
    // SIGKILL: the kernel waits out a request a server already took, so the reader may only
    // go once the connection ends (the keeper killed).
    signal(reader.pid(), libc::SIGKILL);
    let died_on_sigkill = wait_until(Duration::from_secs(2), || reader.exited());
    let state_after = if reader.exited() {
        None
    } else {
        proc_state(reader.pid())
    };
    if !died_on_sigkill {
        assert!(signal(new.keeper_pid, libc::SIGKILL));
        assert!(
            wait_until(TIMEOUT, || reader.exited()),
            "the reader is still there once the keeper is gone (state {:?})",
            proc_state(reader.pid())
        );
    }
    eprintln!(
        "MEASURE without_resend: the reader in flight in the killed server was still waiting \
         3 s after the restart (state {state:?}); after SIGKILL: {} (state {state_after:?}); \
         it got {}; new reads after the restart: .digest, 1 warm, 2 cold, all right; server \
         {} → {}",
        if died_on_sigkill {
            "exited within 2 s".to_owned()
        } else {
            "still there after 2 s, gone once the keeper was killed".to_owned()
        },
        reader.report(),
        old.server(),
        new.server()
    );
}

#[test]
fn rootless_user_mounts_runs_and_unmounts() {
    let registry = Registry::start(Auth::Anonymous);
    let (image, files) = busybox_image();
    registry.push_image("rootless", "v1", &image);
    let scratch = UserScratch::new(TestUser::ensure());
    let uid = scratch.user.uid;
    let mp = scratch.mkdir("mnt");

    let started = Instant::now();
    scratch
        .imagefs(["--plain-http", "mount", &registry.reference("rootless:v1")])
        .arg(&mp)
        .run()
        .assert_success();
    let mount_took = started.elapsed();
    assert!(scratch.is_mounted(&mp), "{} not mounted", mp.display());
    // Without allow_other only the user may enter its mount (root included): it reads.
    let check_bytes = |when: &str| {
        let out = scratch
            .cmd("sha256sum", files.iter().map(|(p, _)| mp.join(p)))
            .run();
        out.assert_success();
        for ((rel, content), line) in files.iter().zip(out.stdout_str().lines()) {
            assert_eq!(
                line,
                format!(
                    "{}  {}",
                    &sha256_digest(content)["sha256:".len()..],
                    mp.join(rel).display()
                ),
                "{when}: {}",
                out.report()
            );
        }
    };
    check_bytes("after the mount");

    let e = served_entry(|| scratch.ps(), &mp);
    assert!(
        !e.passthrough,
        "passthrough on for a rootless mount: {e:#?}"
    );
    for pid in [e.keeper_pid, e.server()] {
        assert!(alive(pid), "{pid} of {e:#?} is not running");
        assert_eq!(uid_of(pid), Some(uid), "{pid} does not run as the user");
    }

    // A program from the mount, as root of a user namespace.
    let userns = scratch.cmd("unshare", ["-r", "true"]).run();
    let ran = userns.status.success();
    if ran {
        let out = scratch
            .cmd("unshare", ["-r", "chroot"])
            .arg(&mp)
            .args(["/bin/busybox", "cat", "/etc/os-release"])
            .run();
        out.assert_success();
        assert!(
            out.stdout_str().contains("ID=imagefs-busybox"),
            "{}",
            out.report()
        );
    } else {
        eprintln!(
            "NOTE: unprivileged user namespaces are off here, the chroot run is skipped: {}",
            userns.stderr_str().trim()
        );
    }

    // The keeper works rootless too: a killed server is replaced.
    assert!(signal(e.server(), libc::SIGKILL));
    let killed = Instant::now();
    let replaced = wait_replaced(|| scratch.ps(), std::slice::from_ref(&e));
    let restart_took = killed.elapsed();
    assert_eq!(uid_of(replaced[0].new.server()), Some(uid));
    check_bytes("after the server was killed");

    scratch.imagefs(["umount"]).arg(&mp).run().assert_success();
    assert!(
        wait_until(TIMEOUT, || !scratch.is_mounted(&mp)),
        "still mounted after the user's umount"
    );
    assert!(
        wait_until(TIMEOUT, || scratch.pids().is_empty()),
        "processes of the user remain: {:?}",
        scratch
            .pids()
            .iter()
            .map(|p| fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default())
            .collect::<Vec<_>>()
    );
    assert!(scratch.ps().is_empty(), "ps still lists a mount");
    eprintln!(
        "MEASURE rootless: mount {mount_took:?}; passthrough {}; chroot run from the mount: {}; \
         server {} → {} in {restart_took:?}; unmounted, no process of uid {uid} left",
        e.passthrough,
        if ran {
            "ok"
        } else {
            "skipped (no user namespaces)"
        },
        e.server(),
        replaced[0].new.server()
    );
}
