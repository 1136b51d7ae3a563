//! A real distribution registry (Debian's `docker-registry`, distribution 2.8) for one test.
//!
//! [`Registry::start`] writes a config into a fresh temp dir, launches `docker-registry serve`
//! on a free 127.0.0.1 port, and returns once `/v2/` answers. Dropping the [`Registry`] kills
//! the process and waits for it, then removes the storage.
//!
//! Request counting reads the access log that distribution writes next to its own log lines,
//! in Apache combined format:
//!
//! ```text
//! 127.0.0.1 - - [28/Nov/2026:12:43:50 +0000] "GET /v2/foo/blobs/sha256:… HTTP/1.1" 200 157 "" "curl/7.88.1"
//! ```
//!
//! Distribution's access logger wraps the whole server and writes its line when the handler
//! returns, before the server's final flush of the response: once a client has read a whole
//! response, its line is in the log. A request the client abandoned mid-body is logged when the
//! registry notices; use [`Registry::wait_for_access_log`] for those.
//!
//! This module knows nothing of imagefs; it only runs the registry and reads its log.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::token::{TOKEN_PASS, TOKEN_USER, TokenIssuer};

/// The registry binary; `IMAGEFS_TEST_REGISTRY` overrides it.
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How long a registry may take to answer `/v2/` after launch.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Launch attempts: another process may take the free port between our probe and the bind.
const START_ATTEMPTS: usize = 3;

/// How the registry authenticates clients.
#[derive(Clone)]
pub enum Auth {
    /// No auth at all: anyone may pull and push.
    Anonymous,
    /// htpasswd (bcrypt) with exactly one user.
    Basic { user: String, pass: String },
    /// Docker-Hub-style Bearer tokens from an in-process [`TokenIssuer`] (see `token.rs`):
    /// [`TOKEN_USER`]/[`TOKEN_PASS`] get what they ask for; anonymous clients may only pull
    /// `public/*` repositories.
    Token,
}

impl Auth {
    /// Shorthand for [`Auth::Basic`].
    pub fn basic(user: &str, pass: &str) -> Auth {
        Auth::Basic {
            user: user.to_owned(),
            pass: pass.to_owned(),
        }
    }
}

// Passwords never show in test output.
impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Anonymous => f.write_str("Anonymous"),
            Auth::Basic { user, .. } => write!(f, "Basic {{ user: {user:?}, pass: <redacted> }}"),
            Auth::Token => f.write_str("Token"),
        }
    }
}

/// One line of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLine {
    /// `GET`, `HEAD`, `PUT`, …
    pub method: String,
    /// Path and query as requested, e.g. `/v2/busybox/blobs/sha256:…`.
    pub uri: String,
    /// HTTP status the registry answered.
    pub status: u16,
    /// Body bytes written (0 for HEAD and errors without body).
    pub bytes: u64,
}

/// A running `docker-registry`; killed and cleaned up on drop.
pub struct Registry {
    child: Child,
    addr: String,
    auth: Auth,
    issuer: Option<TokenIssuer>,
    log_path: PathBuf,
    // Dropped last (fields drop in declaration order), after the process is gone.
    dir: TempDir,
}

impl Registry {
    /// Starts a registry with `auth` on a free loopback port; panics with the registry's log
    /// if it does not come up.
    pub fn start(auth: Auth) -> Registry {
        Registry::start_with(auth, "")
    }

    /// Like [`Registry::start`], with distribution's schema 1 compatibility on
    /// (`compatibility: schema1: enabled: true`): without it distribution 2.8 refuses every
    /// schema 1 manifest PUT ("manifest schema v1 unsupported", 500). It then accepts signed
    /// schema 1 manifests only (an unsigned one is MANIFEST_INVALID) and serves them as
    /// pushed, signatures included.
    pub fn start_schema1(auth: Auth) -> Registry {
        Registry::start_with(auth, "compatibility:\n  schema1:\n    enabled: true\n")
    }

    /// An anonymous registry in proxy mode (distribution's pull-through cache) for `remote`:
    /// it serves `remote`'s repositories under the same names, fetching what it lacks.
    pub fn start_proxy_of(remote: &Registry) -> Registry {
        Registry::start_with(
            Auth::Anonymous,
            &format!("proxy:\n  remoteurl: http://{}\n", remote.addr()),
        )
    }

    fn start_with(auth: Auth, extra_yaml: &str) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("imagefs-registry-")
            .tempdir()
            .expect("create registry temp dir");
        let issuer = match auth {
            Auth::Token => Some(TokenIssuer::start()),
            _ => None,
        };
        let auth_yaml = match &auth {
            Auth::Anonymous => String::new(),
            Auth::Basic { user, pass } => {
                let htpasswd = dir.path().join("htpasswd");
                write_htpasswd(&htpasswd, user, pass);
                format!(
                    "auth:\n  htpasswd:\n    realm: imagefs-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            Auth::Token => issuer
                .as_ref()
                .expect("issuer started above")
                .registry_auth_yaml(),
        };
        let storage = dir.path().join("storage");
        let log_path = dir.path().join("registry.log");
        let config_path = dir.path().join("config.yml");
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let addr = format!("127.0.0.1:{}", free_port());
            let yaml = format!("{}{extra_yaml}", config_yaml(&storage, &addr, &auth_yaml));
            fs::write(&config_path, yaml).expect("write registry config");
            let log = fs::File::create(&log_path).expect("create registry log");
            let mut child = serve(&config_path, log);
            if wait_ready(&mut child, &addr) {
                return Registry {
                    child,
                    addr,
                    auth,
                    issuer,
                    log_path,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = fs::read_to_string(&log_path).unwrap_or_default();
        }
        panic!(
            "docker-registry did not answer /v2/ after {START_ATTEMPTS} attempts; last log:\n{last_log}"
        );
    }

    /// Kill the registry process (as a crash would); its storage and address stay, for
    /// [`Registry::restart`].
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start the registry again on the same address and storage (after [`Registry::stop`]).
    pub fn restart(&mut self) {
        let config_path = self.dir.path().join("config.yml");
        let log = fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .expect("open registry log");
        self.child = serve(&config_path, log);
        assert!(
            wait_ready(&mut self.child, &self.addr),
            "the registry did not come back on {}:\n{}",
            self.addr,
            self.log()
        );
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT/REPO_REF`, an image reference for the CLI (`repo_ref` is `REPO:TAG` or
    /// `REPO@DIGEST`).
    pub fn reference(&self, repo_ref: &str) -> String {
        format!("{}/{repo_ref}", self.addr)
    }

    /// How this registry authenticates.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The user and password that this registry accepts (Basic: the htpasswd user; Token: the
    /// issuer's user), or `None` for an anonymous registry.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        match &self.auth {
            Auth::Anonymous => None,
            Auth::Basic { user, pass } => Some((user, pass)),
            Auth::Token => Some((TOKEN_USER, TOKEN_PASS)),
        }
    }

    /// The token issuer of an [`Auth::Token`] registry.
    pub fn issuer(&self) -> Option<&TokenIssuer> {
        self.issuer.as_ref()
    }

    /// The registry's root storage directory (filesystem driver).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Everything the registry has logged so far (its own lines and the access log).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The access-log lines so far, in order.
    pub fn access_log(&self) -> Vec<AccessLine> {
        self.log().lines().filter_map(parse_access_line).collect()
    }

    /// Polls the access log until `pred` holds (10 s at most), then returns the lines; panics
    /// with the log and `what` if it never does.
    pub fn wait_for_access_log(
        &self,
        what: &str,
        pred: impl Fn(&[AccessLine]) -> bool,
    ) -> Vec<AccessLine> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.access_log();
            if pred(&lines) {
                return lines;
            }
            if Instant::now() > deadline {
                panic!("registry log never showed {what}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many `GET`s of blob `digest` (any repository, any status, Range or not) the
    /// registry has served so far.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let suffix = format!("/blobs/{digest}");
        self.access_log()
            .iter()
            .filter(|l| l.method == "GET" && l.uri.starts_with("/v2/") && l.uri.ends_with(&suffix))
            .count()
    }

    /// Like [`Registry::blob_gets`], without the 51-byte Range reads of a blob's end with which
    /// a mount looks for the eStargz footer of an unannotated gzip layer.
    pub fn blob_fetches(&self, digest: &str) -> usize {
        let suffix = format!("/blobs/{digest}");
        self.access_log()
            .iter()
            .filter(|l| l.method == "GET" && l.uri.starts_with("/v2/") && l.uri.ends_with(&suffix))
            .filter(|l| !(l.status == 206 && l.bytes == ESTARGZ_FOOTER_PROBE))
            .count()
    }
}

/// Size of the eStargz footer a mount reads from the end of unannotated gzip layers.
pub const ESTARGZ_FOOTER_PROBE: u64 = imagefs::layer::estargz::FOOTER_SIZE as u64;

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `docker-registry serve CONFIG`, logging to `log`.
fn serve(config_path: &Path, log: fs::File) -> Child {
    Command::new(registry_bin())
        .arg("serve")
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (run scripts/setup)", registry_bin()))
}

fn registry_bin() -> String {
    std::env::var("IMAGEFS_TEST_REGISTRY").unwrap_or_else(|_| REGISTRY_BIN.to_owned())
}

fn config_yaml(storage: &Path, addr: &str, auth_yaml: &str) -> String {
    // A fixed http.secret silences the "No HTTP secret provided" warning; upload purging is
    // off so that no background job touches storage during a test.
    format!(
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: {addr}\n  secret: imagefs-test-secret\n\
         {auth_yaml}",
        storage.display()
    )
}

/// Writes a one-user bcrypt htpasswd file (the only hash distribution accepts).
fn write_htpasswd(path: &Path, user: &str, pass: &str) {
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, pass])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run htpasswd: {e} (install apache2-utils: scripts/setup)")
        });
    assert!(
        out.status.success(),
        "htpasswd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(path, out.stdout).expect("write htpasswd");
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Polls `/v2/` until any HTTP answer arrives (401 counts: the server is up), the process
/// exits, or [`START_TIMEOUT`] passes.
fn wait_ready(child: &mut Child, addr: &str) -> bool {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if probe_v2(addr) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// True when `GET /v2/` gets any HTTP status line back.
fn probe_v2(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

/// Parses one Apache-combined access line: `IP - - [DATE] "METHOD URI PROTO" STATUS BYTES …`.
fn parse_access_line(line: &str) -> Option<AccessLine> {
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut parts = request.split(' ');
    let method = parts.next()?.to_owned();
    let uri = parts.next()?.to_owned();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let mut tail = rest.split(' ');
    let status = tail.next()?.parse().ok()?;
    let bytes = tail.next()?.parse().unwrap_or(0);
    Some(AccessLine {
        method,
        uri,
        status,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_lines() {
        type Want<'a> = Option<(&'a str, &'a str, u16, u64)>;
        let cases: &[(&str, Want)] = &[
            (
                r#"127.0.0.1 - - [28/Nov/2026:12:43:50 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1""#,
                Some(("GET", "/v2/", 200, 2)),
            ),
            (
                r#"127.0.0.1 - - [28/Nov/2026:12:43:50 +0000] "HEAD /v2/a/b/blobs/sha256:00 HTTP/1.1" 404 0 "" "x y""#,
                Some(("HEAD", "/v2/a/b/blobs/sha256:00", 404, 0)),
            ),
            (
                r#"time="2026-11-28T12:43:50Z" level=info msg="response completed" http.request.method=GET"#,
                None,
            ),
        ];
        for (line, want) in cases {
            let got = parse_access_line(line);
            let want = want.map(|(m, u, s, b)| AccessLine {
                method: m.into(),
                uri: u.into(),
                status: s,
                bytes: b,
            });
            assert_eq!(got, want, "{line}");
        }
    }
}
