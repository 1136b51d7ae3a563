//! Running the real `imagefs` binary, ripgrep-`tests/util.rs` style: a failed assertion prints
//! the command line, the exit status, stdout and stderr.
//!
//! ```ignore
//! let imagefs = Imagefs::new();                 // owns a temp cache dir and docker config dir
//! let out = imagefs.cmd(["pull", "--plain-http", &reference]).run();
//! out.assert_success();
//! imagefs.cmd(["inspect", "nope"]).run().assert_failure_contains("not found");
//! imagefs.cmd(["pull", "--username", "u", "--password-stdin", &r]).stdin("secret\n").run();
//! ```
//!
//! Every command gets `--cache-dir <temp>` first, `DOCKER_CONFIG=<temp>/docker` (so the host's
//! credentials never leak in; tests may write a `config.json` there) and `NO_COLOR=1`. A
//! command that outlives its timeout (default [`DEFAULT_TIMEOUT`]) is killed and reported.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

/// How long one command may run before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The `imagefs` binary cargo built for this test run.
pub fn imagefs_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_imagefs"))
}

/// A private environment for running `imagefs`: a temp cache dir and docker config dir that
/// live as long as this value, shared by every [`Cmd`] made from it.
pub struct Imagefs {
    dir: TempDir,
}

impl Default for Imagefs {
    fn default() -> Self {
        Imagefs::new()
    }
}

impl Imagefs {
    pub fn new() -> Imagefs {
        let dir = tempfile::Builder::new()
            .prefix("imagefs-cmd-")
            .tempdir()
            .expect("create imagefs temp dir");
        std::fs::create_dir(dir.path().join("cache")).expect("create cache dir");
        std::fs::create_dir(dir.path().join("docker")).expect("create docker config dir");
        Imagefs { dir }
    }

    /// What `--cache-dir` points at.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// What `DOCKER_CONFIG` points at (empty unless a test writes `config.json`).
    pub fn docker_config_dir(&self) -> PathBuf {
        self.dir.path().join("docker")
    }

    /// A scratch directory that lives as long as this value (e.g. for mount points).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// `imagefs --cache-dir <cache> ARGS…`, ready to adjust and [`Cmd::run`].
    pub fn cmd<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<OsString> = vec!["--cache-dir".into(), self.cache_dir().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        Cmd {
            program: imagefs_bin().to_owned(),
            args: all,
            env: vec![
                ("DOCKER_CONFIG".into(), self.docker_config_dir().into()),
                ("NO_COLOR".into(), "1".into()),
            ],
            stdin: None,
            timeout: DEFAULT_TIMEOUT,
            current_dir: None,
        }
    }
}

/// One invocation of `imagefs`, built up then [`Cmd::run`].
#[derive(Debug, Clone)]
pub struct Cmd {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    current_dir: Option<PathBuf>,
}

impl Cmd {
    /// Any other program, run the same way (no cache dir, no extra env); for harness tests and
    /// for tools a test needs to drive beside imagefs.
    pub fn program(program: impl AsRef<Path>) -> Cmd {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            timeout: DEFAULT_TIMEOUT,
            current_dir: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Bytes fed to stdin (then closed); without it stdin is `/dev/null`.
    pub fn stdin(mut self, bytes: impl AsRef<[u8]>) -> Cmd {
        self.stdin = Some(bytes.as_ref().to_vec());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Cmd {
        self.timeout = timeout;
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Cmd {
        self.current_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// The command line as a shell would show it (stdin is not shown: it may hold a password).
    pub fn command_line(&self) -> String {
        let mut words = vec![shell_quote(&self.program.to_string_lossy())];
        words.extend(self.args.iter().map(|a| shell_quote(&a.to_string_lossy())));
        let mut line = words.join(" ");
        if let Some(stdin) = &self.stdin {
            line.push_str(&format!(" <<< ({} bytes on stdin)", stdin.len()));
        }
        line
    }

    /// Runs to completion (or until the timeout, then kills it) and collects the output.
    pub fn run(&self) -> Output {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.command_line()));
        let pid = child.id();
        let writer = child.stdin.take().map(|mut pipe| {
            let bytes = self.stdin.clone().unwrap_or_default();
            // The child may exit without reading: a broken pipe is not our failure.
            std::thread::spawn(move || drop(pipe.write_all(&bytes)))
        });
        let stdout = read_in_background(child.stdout.take().expect("piped stdout"));
        let stderr = read_in_background(child.stderr.take().expect("piped stderr"));
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let (status, timed_out) = match rx.recv_timeout(self.timeout) {
            Ok(status) => (status, false),
            Err(_) => {
                // The waiter has not reaped the child, so `pid` is still ours.
                // SAFETY: kill(2) with a valid signal number has no memory effects.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                (rx.recv().expect("waiter thread reports"), true)
            }
        };
        waiter.join().expect("waiter thread");
        if let Some(w) = writer {
            let _ = w.join();
        }
        let status = status.unwrap_or_else(|e| panic!("waiting for {}: {e}", self.command_line()));
        Output {
            command_line: self.command_line(),
            status,
            timed_out,
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
        }
    }
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What a finished [`Cmd`] produced.
#[derive(Debug)]
pub struct Output {
    pub command_line: String,
    pub status: ExitStatus,
    /// True when the command was killed for running past its timeout.
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    /// stdout as UTF-8 (lossy).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as UTF-8 (lossy).
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Panics with the full report unless the command exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Output {
        if self.timed_out || !self.status.success() {
            panic!("expected success\n{}", self.report());
        }
        self
    }

    /// Panics with the full report unless the command exited non-zero (not by timeout) and
    /// `msg` occurs in its stderr.
    #[track_caller]
    pub fn assert_failure_contains(&self, msg: &str) -> &Output {
        if self.timed_out || self.status.success() {
            panic!("expected failure mentioning {msg:?}\n{}", self.report());
        }
        if !self.stderr_str().contains(msg) {
            panic!("expected stderr to mention {msg:?}\n{}", self.report());
        }
        self
    }

    /// The command line, status, stdout and stderr, for failure messages.
    pub fn report(&self) -> String {
        let status = if self.timed_out {
            format!("killed after timeout ({})", self.status)
        } else {
            self.status.to_string()
        };
        format!(
            "command: {}\nstatus: {status}\n--- stdout ---\n{}\n--- stderr ---\n{}\n---",
            self.command_line,
            self.stdout_str(),
            self.stderr_str()
        )
    }
}
