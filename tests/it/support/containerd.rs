//! A real containerd (Debian's 1.6) for the snapshotter tests: its own root, state, socket
//! and config with `[proxy_plugins.imagefs]` pointing at a real `imagefs snapshotter` started
//! beside it, both stopped (and everything they mounted unmounted) on drop.
//!
//! ```ignore
//! let c = Containerd::start(&["--prefetch", "none"]);
//! c.ctr_remote(&["image", "rpull", "--plain-http", "--snapshotter", "imagefs", &r]).assert_success();
//! c.ctr(&["run", "--snapshotter", "imagefs", "--rm", &r, "id", "cat", "/etc/os-release"]);
//! ```

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::cmd::{Cmd, Output, imagefs_bin};
use super::mounts::{mounts_under, wait_until};

/// Where a harness' files go: short, as unix socket paths must be (108 bytes).
fn base_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("ifs-ctd-")
        .tempdir_in("/tmp")
        .expect("create containerd dir")
}

pub struct Containerd {
    containerd: Option<Child>,
    snapshotter: Option<Child>,
    snapshotter_args: Vec<String>,
    /// Dropped last.
    dir: TempDir,
}

impl Containerd {
    /// containerd plus `imagefs snapshotter` with `args` (after the subcommand).
    pub fn start(args: &[&str]) -> Containerd {
        let dir = base_dir();
        let p = dir.path();
        fs::create_dir_all(p.join("cache")).unwrap();
        fs::write(
            p.join("config.toml"),
            format!(
                r#"version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{root}/c.sock"
[ttrpc]
  address = "{root}/c.sock.ttrpc"
[proxy_plugins.imagefs]
  type = "snapshot"
  address = "{root}/s.sock"
"#,
                root = p.display()
            ),
        )
        .unwrap();
        let mut c = Containerd {
            containerd: None,
            snapshotter: None,
            snapshotter_args: args.iter().map(|a| a.to_string()).collect(),
            dir,
        };
        c.start_snapshotter();
        let log = fs::File::create(c.path("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(c.path("config.toml"))
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd (is it installed? scripts/setup installs it)");
        c.containerd = Some(child);
        let ready = wait_until(Duration::from_secs(30), || {
            c.path("c.sock").exists()
                && c.ctr(&["plugins", "ls"]).stdout_str().lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.first() == Some(&"io.containerd.snapshotter.v1")
                        && f.get(1) == Some(&"imagefs")
                        && f.last() == Some(&"ok")
                })
        });
        assert!(ready, "containerd did not start:\n{}", c.logs());
        c
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The snapshotter's cache (`--cache-dir`).
    pub fn cache_dir(&self) -> PathBuf {
        self.path("cache")
    }

    /// Start the snapshotter (again), with the arguments given at start plus `extra` global
    /// options (e.g. `--offline`).
    pub fn start_snapshotter_with(&mut self, extra: &[&str]) {
        assert!(self.snapshotter.is_none(), "the snapshotter runs already");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("snapshotter.log"))
            .unwrap();
        let child = Command::new(imagefs_bin())
            .arg("--cache-dir")
            .arg(self.cache_dir())
            .args(extra)
            .arg("snapshotter")
            .arg("--address")
            .arg(self.path("s.sock"))
            .args(&self.snapshotter_args)
            .env("IMAGEFS_LOG", "info,imagefs=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start imagefs snapshotter");
        self.snapshotter = Some(child);
        let sock = self.path("s.sock");
        assert!(
            wait_until(Duration::from_secs(30), || sock.exists()),
            "the snapshotter did not start:\n{}",
            self.logs()
        );
    }

    fn start_snapshotter(&mut self) {
        self.start_snapshotter_with(&[]);
    }

    /// SIGTERM the snapshotter and wait for it (it unmounts its views).
    pub fn stop_snapshotter(&mut self) {
        if let Some(mut child) = self.snapshotter.take() {
            terminate(&mut child);
        }
        let sock = self.path("s.sock");
        assert!(
            wait_until(Duration::from_secs(10), || !sock.exists()),
            "the snapshotter left its socket"
        );
    }

    /// `ctr --address … ARGS`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.tool("ctr", args)
    }

    /// `ctr-remote --address … ARGS`.
    pub fn ctr_remote(&self, args: &[&str]) -> Output {
        self.tool("ctr-remote", args)
    }

    fn tool(&self, tool: &str, args: &[&str]) -> Output {
        Cmd::program(tool)
            .arg("--address")
            .arg(self.path("c.sock"))
            .args(args)
            .timeout(Duration::from_secs(120))
            .run()
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        let read = |n: &str| fs::read_to_string(self.path(n)).unwrap_or_default();
        format!(
            "--- containerd.log ---\n{}\n--- snapshotter.log ---\n{}",
            tail(&read("containerd.log"), 60),
            tail(&read("snapshotter.log"), 60)
        )
    }

    /// Mount points under this harness' directory (containerd's and the snapshotter's).
    pub fn mounts(&self) -> Vec<PathBuf> {
        mounts_under(self.dir.path())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers a failed test left running.
        let tasks = self.ctr(&["task", "ls", "-q"]).stdout_str();
        for id in tasks.lines().filter(|l| !l.trim().is_empty()) {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id.trim()]);
            let _ = self.ctr(&["task", "delete", "-f", id.trim()]);
        }
        if let Some(mut c) = self.containerd.take() {
            terminate(&mut c);
        }
        if let Some(mut s) = self.snapshotter.take() {
            terminate(&mut s);
        }
        for m in self.mounts().into_iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let pid = child.id();
    let exited = wait_until(Duration::from_secs(15), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        eprintln!("process {pid} ignored SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
