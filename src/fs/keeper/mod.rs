//! The keeper: a small supervisor that holds a mount's `/dev/fuse` connection so the mount
//! outlives the process serving it.
//!
//! ```text
//!   imagefs mount ──spawns──▶ keeper ──spawns──▶ server (resolve, fetch, extract, serve)
//!                              │  ▲   SOCK_SEQPACKET: Start / Mounted+fds / Kept / Serving
//!                              │  └── control socket <run>/<pid>.sock: status, upgrade
//!                              └── holds: the connection fd, the open-file table, Takeover
//! ```
//!
//! The keeper never reads the connection and knows nothing of images: it starts the server
//! command it was given, keeps the fds the first server hands it after mounting, and when a
//! server dies while the mount lives, starts another and hands it those fds (`SCM_RIGHTS`);
//! the new server takes the session over ([`crate::fs::take_over`]). A planned replacement
//! (`upgrade`, SIGHUP) is the same path, started from another binary. SIGINT/SIGTERM unmount.
//! The keeper exits when the mount is gone and its server has exited; its servers die with it
//! (`PR_SET_PDEATHSIG`), so a dead keeper means a dead mount (`ENOTCONN`), never a mount
//! served by nobody's supervision.
//!
//! What a crash costs: the server's in-memory caches (fds, tree, decoded TOCs: rebuilt from
//! the store) and the requests in flight, which the kernel resends; work in progress in the
//! store (a download, an extraction) restarts from its last durable point. The keeper itself
//! is a poll loop over a signalfd and a few sockets, with no allocation-heavy or fallible
//! work: it has little reason to crash, and if it does, the mount ends as it would have
//! without a keeper.

mod wire;

pub(crate) use wire::{Msg, Takeover};

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use super::Handoff;

/// The server's end of its keeper link, as an fd number in its environment.
pub const KEEPER_FD_ENV: &str = "IMAGEFS_KEEPER_FD";
/// The fd number the link has in the server.
const LINK_FD: RawFd = 3;
/// Servers that died before serving, in a row, before the keeper gives up the mount.
const MAX_FAILED_STARTS: u32 = 5;
/// How long `upgrade` waits for the new server to serve.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(120);

/// How to run a mount's servers.
pub struct KeeperConfig {
    /// The server binary and its arguments; [`KEEPER_FD_ENV`] is added to its environment.
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub envs: Vec<(OsString, OsString)>,
    /// Written to each server's stdin (e.g. registry credentials), then closed.
    pub stdin: Vec<u8>,
    /// The mount point (resolved): what SIGINT/SIGTERM unmount.
    pub mountpoint: PathBuf,
    /// Where the control socket goes (`<run_dir>/<pid>.sock`; created 0700).
    pub run_dir: PathBuf,
    /// Dropped once the first server serves (e.g. the mount point's lock).
    pub hold_until_serving: Option<std::fs::File>,
}

struct Server {
    pid: libc::pid_t,
    /// `None` once the server closed its end.
    link: Option<OwnedFd>,
    exe: PathBuf,
    serving: bool,
}

/// A control client waiting for an upgrade to finish.
struct Waiter {
    stream: UnixStream,
    previous: PathBuf,
    deadline: Instant,
}

struct Keeper {
    cfg: KeeperConfig,
    exe: PathBuf,
    server: Option<Server>,
    /// Set once the first server mounted.
    fuse: Option<OwnedFd>,
    open_state: Option<OwnedFd>,
    takeover: Option<Takeover>,
    info: Value,
    restarts: u32,
    failed_starts: u32,
    started: SystemTime,
    stopping: bool,
    /// The next server comes from this binary (an upgrade in progress).
    next_exe: Option<PathBuf>,
    waiter: Option<Waiter>,
    socket: PathBuf,
}

/// Run a mount's keeper until the mount is gone; returns the exit code (the first server's
/// when it failed before mounting).
pub fn run(cfg: KeeperConfig) -> io::Result<i32> {
    let signals = block_signals()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.run_dir)?;
    let socket = cfg.run_dir.join(format!("{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    // A mount must not fail for want of `ps` and `upgrade`: without its socket (e.g. a cache
    // path longer than a socket address holds) the keeper still keeps the mount.
    let listener = match UnixListener::bind(&socket).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    }) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(
                socket = %socket.display(),
                "no control socket, so `imagefs ps` and `upgrade` will not see this mount: {e}"
            );
            None
        }
    };
    let mut k = Keeper {
        exe: cfg.exe.clone(),
        cfg,
        server: None,
        fuse: None,
        open_state: None,
        takeover: None,
        info: Value::Null,
        restarts: 0,
        failed_starts: 0,
        started: SystemTime::now(),
        stopping: false,
        next_exe: None,
        waiter: None,
        socket,
    };
    let code = k.serve(signals, listener.as_ref());
    let _ = std::fs::remove_file(&k.socket);
    code
}

impl Keeper {
    fn serve(&mut self, signals: OwnedFd, listener: Option<&UnixListener>) -> io::Result<i32> {
        self.spawn(true)?;
        loop {
            let link = self
                .server
                .as_ref()
                .and_then(|s| s.link.as_ref())
                .map_or(-1, |l| l.as_raw_fd());
            let fuse = self.fuse.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
            let mut fds = [
                pollfd(signals.as_raw_fd(), libc::POLLIN),
                pollfd(listener.map_or(-1, |l| l.as_raw_fd()), libc::POLLIN),
                pollfd(link, libc::POLLIN),
                // Events 0: only POLLERR, which the device reports once the connection is gone.
                pollfd(fuse, 0),
            ];
            // SAFETY: poll on a stack array of valid pollfds (-1 entries are ignored).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 1000) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[2].revents != 0 {
                self.on_link();
            }
            if fds[1].revents != 0
                && let Some(l) = listener
            {
                self.on_control(l);
            }
            if fds[3].revents & libc::POLLERR != 0 && !self.stopping {
                tracing::info!("the mount is gone; waiting for its server to exit");
                self.stopping = true;
            }
            if fds[0].revents != 0 {
                for sig in read_signals(&signals) {
                    match sig {
                        libc::SIGTERM | libc::SIGINT => self.stop(),
                        libc::SIGHUP => self.replace(self.exe.clone()),
                        _ => {}
                    }
                }
            }
            if let Some(code) = self.reap()? {
                return Ok(code);
            }
            if let Some(w) = &self.waiter
                && Instant::now() > w.deadline
            {
                self.answer(Err("the new server did not start serving in time".into()));
            }
        }
    }

    /// Start a server (the first, or a replacement that takes the mount over).
    fn spawn(&mut self, first: bool) -> io::Result<()> {
        let exe = self.next_exe.take().unwrap_or_else(|| self.exe.clone());
        let (ours, theirs) = super::session::seqpacket_pair()?;
        let keeper = std::process::id() as libc::pid_t;
        let their_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&exe);
        cmd.args(&self.cfg.args)
            .envs(self.cfg.envs.iter().map(|(k, v)| (k, v)))
            .env(KEEPER_FD_ENV, LINK_FD.to_string())
            .stdin(Stdio::piped())
            .stdout(if first {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if their_fd == LINK_FD {
                    libc::fcntl(LINK_FD, libc::F_SETFD, 0);
                } else if libc::dup2(their_fd, LINK_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                // A server never outlives its keeper; and a terminal's ^C is the keeper's.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != keeper {
                    libc::_exit(1);
                }
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        drop(theirs);
        if let Some(mut stdin) = child.stdin.take() {
            // A server that died at once closed its end; its exit is handled like any other.
            let _ = stdin.write_all(&self.cfg.stdin);
        }
        let pid = child.id() as libc::pid_t;
        // Reaped with waitpid in `reap`, not through `child`.
        drop(child);
        let start = Msg::Start {
            takeover: self.takeover.clone(),
        };
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        if let Some(f) = &self.fuse {
            fds.push(f.as_fd());
            if let Some(o) = &self.open_state {
                fds.push(o.as_fd());
            }
        }
        if let Err(e) = wire::send(ours.as_fd(), &start, &fds) {
            tracing::warn!(pid, "starting server: {e}");
        }
        tracing::info!(pid, exe = %exe.display(), takeover = !first, "server started");
        self.server = Some(Server {
            pid,
            link: Some(ours),
            exe,
            serving: false,
        });
        Ok(())
    }

    /// A message from the server (or its end closing).
    fn on_link(&mut self) {
        let Some(server) = &mut self.server else {
            return;
        };
        let Some(link) = &server.link else {
            return;
        };
        let msg = match wire::recv(link.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => {
                // Gone: `reap` handles the exit.
                server.link = None;
                return;
            }
        };
        let link = link.as_fd();
        match msg {
            (Msg::Mounted { takeover }, fds) if self.fuse.is_none() => {
                let mut fds = fds.into_iter();
                self.fuse = fds.next();
                if takeover.open_state {
                    self.open_state = fds.next();
                }
                self.takeover = Some(takeover);
                let _ = wire::send(link, &Msg::Kept, &[]);
            }
            (Msg::Serving { info }, _) => {
                server.serving = true;
                self.failed_starts = 0;
                self.info = info;
                if self.restarts == 0 {
                    self.cfg.hold_until_serving = None;
                    detach_stdio();
                }
                let pid = server.pid;
                self.answer(Ok(pid));
            }
            (other, _) => tracing::warn!("unexpected message from the server: {other:?}"),
        }
    }

    /// Replace the server by one started from `exe` (upgrade, SIGHUP).
    fn replace(&mut self, exe: PathBuf) {
        if self.stopping || self.fuse.is_none() {
            return;
        }
        self.next_exe = Some(exe);
        if let Some(s) = &self.server {
            tracing::info!(pid = s.pid, "replacing the server");
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(s.pid, libc::SIGKILL) };
        }
    }

    /// SIGINT/SIGTERM: unmount; the server then sees the session end and exits.
    fn stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if self.fuse.is_none() {
            if let Some(s) = &self.server {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(s.pid, libc::SIGKILL) };
            }
            return;
        }
        tracing::info!("signal received, unmounting");
        match super::unmount_path(&self.cfg.mountpoint) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::info!("mount busy; detached lazily, serving until its last user leaves");
                if let Err(e) = super::lazy_unmount(&self.cfg.mountpoint) {
                    tracing::error!("cannot unmount: {e}");
                }
            }
            Err(e) => tracing::error!("cannot unmount: {e}"),
        }
    }

    /// Collect an exited server; restart it while the mount lives. `Some(code)` to exit.
    fn reap(&mut self) -> io::Result<Option<i32>> {
        let Some(server) = &self.server else {
            return Ok(Some(0));
        };
        let mut status = 0;
        // SAFETY: waitpid on our own child, non-blocking.
        let r = unsafe { libc::waitpid(server.pid, &mut status, libc::WNOHANG) };
        if r == 0 {
            return Ok(None);
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        let server = self.server.take().expect("checked");
        if self.fuse.is_none() {
            // It failed before mounting: nothing to keep, its error went to the user.
            return Ok(Some(code));
        }
        if self.stopping || connection_gone(self.fuse.as_ref().expect("checked")) {
            tracing::info!(pid = server.pid, code, "server exited; the mount is gone");
            return Ok(Some(0));
        }
        tracing::warn!(
            pid = server.pid,
            code,
            "server exited while the mount lives; restarting"
        );
        if !server.serving {
            self.failed_starts += 1;
            if let Some(w) = &self.waiter {
                // The upgrade's binary could not serve: back to the one before.
                self.next_exe = Some(w.previous.clone());
                self.answer(Err(format!(
                    "the new server exited with status {code} before serving; the previous \
                     binary serves again"
                )));
            }
            if self.failed_starts >= MAX_FAILED_STARTS {
                tracing::error!(
                    "{MAX_FAILED_STARTS} servers in a row exited before serving: giving the \
                     mount up"
                );
                let _ = super::lazy_unmount(&self.cfg.mountpoint);
                return Ok(Some(1));
            }
            std::thread::sleep(Duration::from_millis(100 << self.failed_starts.min(4)));
        }
        self.restarts += 1;
        if let Some(exe) = &self.next_exe {
            self.exe = exe.clone();
        }
        self.spawn(false)?;
        Ok(None)
    }

    /// A control connection: one JSON request line, one JSON answer line.
    fn on_control(&mut self, listener: &UnixListener) {
        while let Ok((stream, _)) = listener.accept() {
            if !peer_allowed(&stream) {
                continue;
            }
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_err() {
                continue;
            }
            let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            match req["op"].as_str() {
                Some("status") => reply(&stream, &self.status()),
                Some("upgrade") => {
                    let Some(exe) = req["exe"].as_str().map(PathBuf::from) else {
                        reply(&stream, &json!({"error": "no exe"}));
                        continue;
                    };
                    if self.waiter.is_some() || self.fuse.is_none() || self.stopping {
                        reply(
                            &stream,
                            &json!({"error": "busy: not serving, or upgrading"}),
                        );
                        continue;
                    }
                    if !exe.is_file() {
                        reply(
                            &stream,
                            &json!({"error": format!("{} is not a file", exe.display())}),
                        );
                        continue;
                    }
                    self.waiter = Some(Waiter {
                        stream,
                        previous: self.exe.clone(),
                        deadline: Instant::now() + UPGRADE_TIMEOUT,
                    });
                    self.replace(exe);
                }
                _ => reply(&stream, &json!({"error": "unknown request"})),
            }
        }
    }

    fn answer(&mut self, result: Result<libc::pid_t, String>) {
        let Some(w) = self.waiter.take() else {
            return;
        };
        let body = match result {
            Ok(pid) => json!({"serverPid": pid, "restarts": self.restarts}),
            Err(e) => json!({"error": e}),
        };
        reply(&w.stream, &body);
    }

    fn status(&self) -> Value {
        let mut v = json!({
            "mountpoint": self.cfg.mountpoint,
            "keeperPid": std::process::id(),
            "serverPid": self.server.as_ref().filter(|s| s.serving).map(|s| s.pid),
            "restarts": self.restarts,
            "uptime": self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            "exe": self.server.as_ref().map(|s| &s.exe).unwrap_or(&self.exe),
        });
        if let (Some(obj), Some(info)) = (v.as_object_mut(), self.info.as_object()) {
            for (k, val) in info {
                obj.entry(k.clone()).or_insert(val.clone());
            }
        }
        v
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Whether the connection has ended (unmounted, or aborted).
fn connection_gone(fuse: &OwnedFd) -> bool {
    let mut p = [pollfd(fuse.as_raw_fd(), 0)];
    // SAFETY: poll on one valid pollfd, no wait.
    (unsafe { libc::poll(p.as_mut_ptr(), 1, 0) }) > 0 && p[0].revents & libc::POLLERR != 0
}

/// SIGCHLD, SIGINT, SIGTERM, SIGHUP as a signalfd (blocked for normal delivery; servers
/// unblock them before exec).
fn block_signals() -> io::Result<OwnedFd> {
    // SAFETY: building a sigset and blocking it; signalfd returns a new fd.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGCHLD, libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn read_signals(fd: &OwnedFd) -> Vec<i32> {
    let mut out = Vec::new();
    loop {
        // SAFETY: reading one signalfd_siginfo into a zeroed struct of its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size_of::<libc::signalfd_siginfo>(),
            )
        };
        if n != size_of::<libc::signalfd_siginfo>() as isize {
            return out;
        }
        out.push(info.ssi_signo as i32);
    }
}

/// Only our own user (or root) may ask a keeper anything: `upgrade` starts a binary.
fn peer_allowed(stream: &UnixStream) -> bool {
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a ucred of the given size.
    let ok = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    } == 0;
    // SAFETY: geteuid has no preconditions.
    ok && (cred.uid == 0 || cred.uid == unsafe { libc::geteuid() })
}

fn reply(stream: &UnixStream, body: &Value) {
    let mut line = body.to_string();
    line.push('\n');
    let _ = (&*stream).write_all(line.as_bytes());
}

/// Stop holding the stdin and stdout of the `imagefs mount` that started us (it returned at
/// `ready`): /dev/null instead, so its pipe or terminal is not kept.
pub fn detach_stdio() {
    // SAFETY: plain fd juggling on fds we own; /dev/null always exists.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if fd >= 0 {
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}

// ---- the server's side ----

/// A server's link to its keeper (from [`KEEPER_FD_ENV`]).
pub struct KeeperLink {
    sock: OwnedFd,
}

/// What the keeper asks a new server to do.
pub enum Start {
    /// Mount afresh.
    Mount,
    /// Take over the live mount.
    TakeOver {
        handoff: Handoff,
        /// The front end's state, as given to [`KeeperLink::mounted`].
        state: Value,
    },
}

impl KeeperLink {
    /// The link, when this process was started by a keeper.
    pub fn from_env() -> Option<KeeperLink> {
        let fd: RawFd = std::env::var(KEEPER_FD_ENV).ok()?.parse().ok()?;
        // SAFETY: set up by our keeper before exec; nothing else in this process owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not to be inherited by anything we start.
        // SAFETY: fcntl on our fd.
        unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Some(KeeperLink { sock })
    }

    /// The keeper's first message.
    pub fn start(&self) -> io::Result<Start> {
        let Some((msg, fds)) = wire::recv(self.sock.as_fd())? else {
            return Err(io::Error::other("the keeper is gone"));
        };
        let Msg::Start { takeover } = msg else {
            return Err(io::Error::other("unexpected first message from the keeper"));
        };
        let Some(t) = takeover else {
            return Ok(Start::Mount);
        };
        let mut fds = fds.into_iter();
        let fuse = fds
            .next()
            .ok_or_else(|| io::Error::other("the keeper sent no connection"))?;
        Ok(Start::TakeOver {
            handoff: Handoff {
                fuse,
                negotiated: t.negotiated,
                open_state: if t.open_state { fds.next() } else { None },
            },
            state: t.state,
        })
    }

    /// Hand the fresh mount to the keeper; returns once it holds it.
    pub fn mounted(&self, handoff: Handoff, state: Value) -> io::Result<()> {
        let takeover = Takeover {
            negotiated: handoff.negotiated,
            state,
            open_state: handoff.open_state.is_some(),
        };
        let mut fds = vec![handoff.fuse.as_fd()];
        if let Some(o) = &handoff.open_state {
            fds.push(o.as_fd());
        }
        wire::send(self.sock.as_fd(), &Msg::Mounted { takeover }, &fds)?;
        match wire::recv(self.sock.as_fd())? {
            Some((Msg::Kept, _)) => Ok(()),
            _ => Err(io::Error::other("the keeper did not take the mount")),
        }
    }

    /// Tell the keeper we serve; `info` shows in `imagefs ps`.
    pub fn serving(&self, info: Value) -> io::Result<()> {
        wire::send(self.sock.as_fd(), &Msg::Serving { info }, &[])
    }
}

// ---- clients: `imagefs ps`, `imagefs upgrade` ----

/// The live keepers under `run_dir`, each with its status; sockets nobody answers on are
/// removed.
pub fn live(run_dir: &Path) -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(run_dir) else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        if !is_socket || path.extension().is_none_or(|e| e != "sock") {
            continue;
        }
        match request(&path, &json!({"op": "status"}), Duration::from_secs(5)) {
            Ok(v) => out.push((path, v)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)) => {
                // Its keeper is gone.
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => tracing::warn!(socket = %path.display(), "keeper not answering: {e}"),
        }
    }
    out.sort_by(|a, b| a.1["mountpoint"].as_str().cmp(&b.1["mountpoint"].as_str()));
    out
}

/// Ask the keeper at `socket` to replace its server by one started from `exe`; returns the
/// keeper's answer once the new server serves (or failed).
pub fn upgrade(socket: &Path, exe: &Path) -> io::Result<Value> {
    request(
        socket,
        &json!({"op": "upgrade", "exe": exe}),
        UPGRADE_TIMEOUT + Duration::from_secs(10),
    )
}

fn request(socket: &Path, body: &Value, timeout: Duration) -> io::Result<Value> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = body.to_string();
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
