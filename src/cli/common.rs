//! What every subcommand shares: the store, the registry client and the resolver built from
//! the global flags (cache directory, platform, credentials, mirrors, limits).

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{Context as _, bail};

use super::GlobalOpts;
use crate::image::Resolver;
use crate::oci::{Digest, Platform};
use crate::reference::Reference;
use crate::registry::{Client, ClientConfig, Credentials, Mirror, Secret};
use crate::store::Store;

pub struct Context {
    pub store: Store,
    pub client: Client,
    pub platform: Platform,
    /// `--platform` was given: a requirement, checked against single-platform images too.
    pub platform_explicit: bool,
    pub offline: bool,
    pub quiet: bool,
    pub tty: bool,
    /// `--cache-max-size` (or `cache_max_size` in `<cache>/config.toml`).
    pub cache_max: Option<u64>,
    /// Decompression bounds for every layer.
    pub limits: crate::layer::decompress::Limits,
}

impl Context {
    /// What resolving an image reference needs, from the flags.
    pub fn resolver(&self) -> Resolver {
        Resolver {
            store: self.store.clone(),
            client: self.client.clone(),
            platform: self.platform.clone(),
            platform_explicit: self.platform_explicit,
            offline: self.offline,
            limits: self.limits,
        }
    }

    pub fn new(g: &GlobalOpts) -> anyhow::Result<Context> {
        let cache = cache_dir(g)?;
        let store = Store::open(&cache)
            .with_context(|| format!("cannot use cache directory {}", cache.display()))?;
        let platform = g.platform.clone().unwrap_or_else(Platform::host);
        let cache_max = cache_max_size(g, &cache)?;
        let credentials = credentials(g)?;
        let client = Client::new(ClientConfig {
            plain_http: g.plain_http,
            ca_certs: g.ca_certs.clone(),
            insecure_skip_tls_verify: g.insecure_skip_tls_verify,
            timeout: g.timeout,
            credentials,
            mirrors: mirrors(g)?,
            ..ClientConfig::default()
        })?;
        Ok(Context {
            store,
            client,
            platform,
            platform_explicit: g.platform.is_some(),
            offline: g.offline,
            quiet: g.quiet,
            tty: std::io::stderr().is_terminal(),
            cache_max,
            limits: limits(g)?,
        })
    }
}

/// The cache bound: `--cache-max-size`, else `cache_max_size = "20G"` in
/// `<cache>/config.toml`, else none.
fn cache_max_size(g: &GlobalOpts, cache: &std::path::Path) -> anyhow::Result<Option<u64>> {
    if let Some(max) = g.cache_max_size {
        return Ok(Some(max));
    }
    let path = cache.join("config.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        cache_max_size: Option<String>,
    }
    let c: Config =
        toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
    c.cache_max_size
        .map(|s| super::parse_size(&s))
        .transpose()
        .map_err(|e| anyhow::anyhow!("{}: cache_max_size: {e}", path.display()))
}

/// Decompression-bomb bounds from `--max-layer-size`, `--max-expansion` and `--max-entries`.
fn limits(g: &GlobalOpts) -> anyhow::Result<crate::layer::decompress::Limits> {
    let mut l = crate::layer::decompress::Limits::default();
    if let Some(max) = g.max_layer_size {
        l.max_size = max;
    }
    if let Some(r) = g.max_expansion {
        l.max_ratio = r;
    }
    if let Some(n) = g.max_entries {
        l.max_entries = n;
    }
    Ok(l)
}

/// Where hosts.toml files live when `--hosts-dir` is not given.
const DEFAULT_HOSTS_DIR: &str = "/etc/imagefs/certs.d";

/// The mirrors from `--mirror` (first, in order), then from `DIR/<registry>/hosts.toml`.
fn mirrors(g: &GlobalOpts) -> anyhow::Result<Vec<Mirror>> {
    let mut out = Vec::new();
    for m in &g.mirrors {
        let Some((registry, url)) = m.split_once('=') else {
            bail!("--mirror {m:?}: expected REGISTRY=URL, e.g. docker.io=http://127.0.0.1:5000");
        };
        out.push(Mirror::new(registry, url).context("--mirror")?);
    }
    let (dir, explicit) = match &g.hosts_dir {
        Some(d) => (d.clone(), true),
        None => (PathBuf::from(DEFAULT_HOSTS_DIR), false),
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("hosts directory {}", dir.display())),
    };
    let mut registries: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            Some((
                e.file_name().into_string().ok()?,
                e.path().join("hosts.toml"),
            ))
        })
        .filter(|(_, p)| p.is_file())
        .collect();
    registries.sort();
    for (registry, path) in registries {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        out.extend(parse_hosts_toml(&registry, &text).with_context(|| path.display().to_string())?);
    }
    Ok(out)
}

/// The mirrors a containerd-style `hosts.toml` lists for `registry`, in file order:
///
/// ```toml
/// server = "https://registry-1.docker.io"   # the registry itself (optional, not used)
///
/// [host."http://127.0.0.1:5000"]
///   capabilities = ["pull", "resolve"]      # optional; without "pull" the host is skipped,
///                                           # without "resolve" tags are not looked up there
/// ```
///
/// Other keys (`ca`, `skip_verify`, `header`, `override_path`) are refused rather than
/// silently ignored.
pub fn parse_hosts_toml(registry: &str, text: &str) -> anyhow::Result<Vec<Mirror>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[allow(dead_code)]
        server: Option<String>,
        #[serde(default)]
        host: toml::map::Map<String, toml::Value>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Host {
        capabilities: Option<Vec<String>>,
    }
    let file: File = toml::from_str(text).context("not a valid hosts.toml")?;
    let mut out = Vec::new();
    for (url, value) in file.host {
        let host: Host = value
            .try_into()
            .with_context(|| format!("[host.{url:?}]"))?;
        let can = |c: &str| {
            host.capabilities
                .as_ref()
                .is_none_or(|caps| caps.iter().any(|x| x == c))
        };
        if !can("pull") {
            continue;
        }
        let mut mirror = Mirror::new(registry, &url)?;
        mirror.resolve = can("resolve");
        out.push(mirror);
    }
    Ok(out)
}

pub fn cache_dir(g: &GlobalOpts) -> anyhow::Result<PathBuf> {
    if let Some(d) = &g.cache_dir {
        return Ok(d.clone());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/lib/imagefs"));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("imagefs"));
    }
    match std::env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".cache/imagefs")),
        None => bail!("no cache directory: set --cache-dir or IMAGEFS_CACHE_DIR"),
    }
}

/// The environment variable that may hold the registry password.
const PASSWORD_VAR: &str = "IMAGEFS_PASSWORD";

/// Set by `mount` in its daemon's environment: the credentials come as one JSON line on
/// the daemon's stdin (never in its environment or argv).
pub const HANDED_CREDENTIALS_ENV: &str = "IMAGEFS_MOUNT_CREDENTIALS";

/// `IMAGEFS_PASSWORD` as it was at start-up (see [`take_secrets_from_env`]).
static PASSWORD_ENV: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Take `IMAGEFS_PASSWORD` out of the environment, and blank its value in the memory that
/// `/proc/PID/environ` shows, so that a long-running mount daemon does not expose it to
/// whoever may read that file. Call first thing in `main`, while the process has one thread.
pub fn take_secrets_from_env() {
    let value = std::env::var(PASSWORD_VAR).ok();
    if std::env::var_os(PASSWORD_VAR).is_some() {
        blank_initial_environ(PASSWORD_VAR);
        // SAFETY: main calls this before any other thread exists.
        unsafe { std::env::remove_var(PASSWORD_VAR) };
    }
    let _ = PASSWORD_ENV.set(value);
}

fn password_env() -> Option<String> {
    match PASSWORD_ENV.get() {
        Some(v) => v.clone(),
        None => std::env::var(PASSWORD_VAR).ok(),
    }
}

/// Zero the value of `NAME=value` in the process's environment block. `remove_var` only
/// unlinks the entry from `environ`; `/proc/PID/environ` reads the block the kernel set up at
/// exec, which the entries point into, so the bytes themselves must go.
fn blank_initial_environ(name: &str) {
    unsafe extern "C" {
        static environ: *const *mut libc::c_char;
    }
    let prefix = format!("{name}=");
    // SAFETY: single-threaded (see the caller); `environ` is a NULL-terminated array of
    // NUL-terminated strings, writable (the exec-time block, or libc's own copies), and we
    // write only within each string's length.
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let entry = *p;
            let len = std::ffi::CStr::from_ptr(entry).to_bytes().len();
            let bytes = std::slice::from_raw_parts(entry as *const u8, len);
            if bytes.starts_with(prefix.as_bytes()) {
                for i in prefix.len()..len {
                    std::ptr::write_volatile(entry.add(i), 0);
                }
            }
            p = p.add(1);
        }
    }
}

/// Flags first (`--username` + `--password-stdin`), then `IMAGEFS_USERNAME` /
/// `IMAGEFS_PASSWORD`; `None` lets the client look in the docker config. A mount daemon
/// reads what its parent found, from stdin.
pub fn credentials(g: &GlobalOpts) -> anyhow::Result<Option<Credentials>> {
    if std::env::var_os(HANDED_CREDENTIALS_ENV).is_some() {
        return read_handed_credentials();
    }
    if g.password_stdin {
        let Some(username) = g.username.clone() else {
            bail!("--password-stdin needs --username");
        };
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        let password = line.trim_end_matches(['\n', '\r']).to_owned();
        if password.is_empty() {
            bail!("--password-stdin: no password on standard input");
        }
        return Ok(Some(Credentials {
            username,
            password: Secret::new(password),
        }));
    }
    if let Some(username) = &g.username {
        let Some(password) = password_env() else {
            bail!("--username needs a password: pass --password-stdin or set IMAGEFS_PASSWORD");
        };
        return Ok(Some(Credentials {
            username: username.clone(),
            password: Secret::new(password),
        }));
    }
    match (std::env::var("IMAGEFS_USERNAME"), password_env()) {
        (Ok(username), Some(password)) if !username.is_empty() => Ok(Some(Credentials {
            username,
            password: Secret::new(password),
        })),
        _ => Ok(None),
    }
}

/// The line [`read_handed_credentials`] reads: `null` or `{"username":…,"password":…}`.
pub fn handed_credentials_line(c: Option<&Credentials>) -> String {
    let value =
        c.map(|c| serde_json::json!({ "username": c.username, "password": c.password.expose() }));
    let mut line = serde_json::Value::from(value).to_string();
    line.push('\n');
    line
}

fn read_handed_credentials() -> anyhow::Result<Option<Credentials>> {
    #[derive(serde::Deserialize)]
    struct Handed {
        username: String,
        password: String,
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the credentials from the parent process")?;
    let handed: Option<Handed> =
        serde_json::from_str(&line).context("credentials from the parent process")?;
    Ok(handed.map(|h| Credentials {
        username: h.username,
        password: Secret::new(h.password),
    }))
}

pub fn parse_reference(s: &str) -> anyhow::Result<Reference> {
    Ok(s.parse::<Reference>()?)
}

/// `sha256:0123456789ab` — short digests for progress lines.
pub fn short(d: &Digest) -> String {
    d.hex()[..12].to_owned()
}

/// Returns once the process got SIGTERM or SIGINT: a daemon's cue to stop serving.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::parse_hosts_toml;

    #[test]
    fn hosts_toml_keeps_file_order_and_capabilities() {
        let text = r#"
server = "https://registry-1.docker.io"

[host."http://b.local:5000"]
  capabilities = ["pull", "resolve"]

[host."https://a.local"]
  capabilities = ["pull"]

[host."https://push-only.local"]
  capabilities = ["push"]

[host."http://c.local"]
"#;
        let m = parse_hosts_toml("docker.io", text).unwrap();
        let got: Vec<(&str, bool)> = m.iter().map(|m| (m.host.as_str(), m.resolve)).collect();
        assert_eq!(
            got,
            [
                ("b.local:5000", true),
                ("a.local", false),
                ("c.local", true)
            ]
        );
        assert!(m.iter().all(|m| m.registry == "docker.io"));
    }

    #[test]
    fn bad_hosts_toml_is_refused() {
        for text in [
            "[host.\"ftp://x\"]\n",
            "[host.\"http://x\"]\nskip_verify = true\n",
            "server = 3\n",
            "not toml",
            "mirrors = []\n",
        ] {
            assert!(parse_hosts_toml("docker.io", text).is_err(), "{text:?}");
        }
    }
}
