//! What every subcommand shares: the store, the registry client, and resolving a reference
//! to a verified manifest + config (from the registry, or from the cache when that needs no
//! network).

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use futures_util::StreamExt;

use super::GlobalOpts;
use crate::oci::manifest::{Descriptor, ImageConfig, ImageManifest, Manifest};
use crate::oci::schema1::{FetchedLayer, Schema1Manifest};
use crate::oci::{Digest, Platform, media};
use crate::reference::Reference;
use crate::registry::{Client, ClientConfig, Credentials, Mirror, Secret};
use crate::store::{BlobBody, BlobSource, Converted, SourceError, Store};

/// Largest manifest or config we accept (real ones are a few KiB; this stops a hostile
/// registry from making us buffer gigabytes).
pub const MAX_DOCUMENT: u64 = 32 << 20;

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
    pub fn new(g: &GlobalOpts) -> anyhow::Result<Context> {
        let cache = cache_dir(g)?;
        let store = Store::open(&cache)
            .with_context(|| format!("cannot use cache directory {}", cache.display()))?;
        let platform = match &g.platform {
            Some(p) => p
                .parse()
                .with_context(|| format!("invalid --platform {p:?}"))?,
            None => Platform::host(),
        };
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
        .map(|s| crate::store::parse_size(&s))
        .transpose()
        .map_err(|e| anyhow::anyhow!("{}: cache_max_size: {e}", path.display()))
}

/// Decompression-bomb bounds from `--max-layer-size` and `--max-expansion`.
fn limits(g: &GlobalOpts) -> anyhow::Result<crate::layer::decompress::Limits> {
    let mut l = crate::layer::decompress::Limits::default();
    if let Some(max) = g.max_layer_size {
        l.max_size = max;
    }
    if let Some(r) = g.max_expansion {
        l.max_ratio = r;
    }
    Ok(l)
}

/// Evict least recently used images until the cache fits its bound, if it has one. Images
/// that live mounts use, and `current`, are kept; a failure is logged, never fatal to the
/// command.
pub fn enforce_cache_bound(store: &Store, max: Option<u64>, current: &Digest) {
    let Some(max) = max else { return };
    match store.prune_to(max, std::slice::from_ref(current)) {
        Ok(r) if !r.images.is_empty() => tracing::info!(
            images = r.images.len(),
            freed = %crate::store::format_size(r.bytes),
            "cache over its bound: evicted the least recently used images"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("enforcing the cache bound: {e}"),
    }
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
        out.push(Mirror::new(registry, url).map_err(|e| anyhow::anyhow!("--mirror: {e}"))?);
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
        let mut mirror = Mirror::new(registry, &url).map_err(|e| anyhow::anyhow!("{e}"))?;
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

/// A reference resolved to one image: verified manifest and config bytes, all stored.
pub struct Resolved {
    pub reference: Reference,
    /// Digest of the image manifest (for a multi-platform reference: the chosen entry).
    pub manifest_digest: Digest,
    pub manifest_bytes: Vec<u8>,
    pub media_type: String,
    pub manifest: ImageManifest,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfig,
    /// How far its layers may expand (`--max-layer-size`, `--max-expansion`).
    pub limits: crate::layer::decompress::Limits,
}

impl Resolved {
    /// The image ID: the digest of the exact config bytes.
    pub fn image_id(&self) -> &Digest {
        &self.manifest.config.digest
    }
}

/// Resolve `reference` for `ctx.platform`. Uses only the cache when the reference is pinned
/// by digest and cached, or with `--offline`.
pub async fn resolve(ctx: &Context, reference: &Reference) -> anyhow::Result<Resolved> {
    let ref_key = ref_key(reference);
    // The top-level document: by digest from the cache if we can, else from the registry.
    let local_top = match reference.digest() {
        Some(d) if ctx.store.has_blob(d) => Some(d.clone()),
        Some(d) if ctx.offline => {
            bail!("{reference} is not in the cache ({d}): pull it without --offline first")
        }
        Some(_) => None,
        None if ctx.offline => Some(ctx.store.get_ref(&ref_key)?.with_context(|| {
            format!("{reference} is not in the cache: pull it without --offline first")
        })?),
        None => None,
    };
    let from_registry = local_top.is_none();
    let (top_digest, top_bytes, top_type) = match local_top {
        Some(d) => {
            let bytes = read_document(ctx, &d)?;
            (d, bytes, None)
        }
        None => {
            let resp = ctx
                .client
                .manifest(
                    reference.registry(),
                    reference.repository(),
                    &reference.manifest_reference(),
                )
                .await?;
            // Under its digest, the bytes the digest covers (a signed schema 1 manifest's
            // signatures are kept in its conversion record).
            ctx.store.put_blob_bytes(&resp.digest, &resp.canonical)?;
            if reference.digest().is_none() {
                ctx.store.set_ref(&ref_key, &resp.digest)?;
            }
            (resp.digest, resp.bytes.to_vec(), resp.content_type)
        }
    };

    let parsed = crate::oci::manifest::parse_manifest(&top_bytes, top_type.as_deref())
        .with_context(|| format!("manifest {top_digest} of {reference}"))?;
    let from_index = matches!(parsed, Manifest::Index(_));
    // A converted schema 1 manifest is shown as what was served, not as what it became.
    let mut schema1_type = None;
    let (manifest_digest, manifest_bytes, content_type, manifest) = match parsed {
        Manifest::Image(m) => (top_digest, top_bytes, top_type, m),
        Manifest::Schema1(s1) => {
            let (served, s1, m) =
                convert_schema1(ctx, reference, &top_digest, top_bytes, from_registry, s1)
                    .await
                    .with_context(|| format!("schema 1 manifest {top_digest} of {reference}"))?;
            schema1_type = Some(s1.media_type().to_owned());
            (top_digest, served, None, m)
        }
        Manifest::Index(index) => {
            let entry: Descriptor = crate::oci::manifest::select_platform(&index, &ctx.platform)
                .with_context(|| format!("{reference} is a multi-platform index"))?;
            let (bytes, ct) = fetch_document(ctx, reference, &entry.digest, "manifest").await?;
            let ct = ct.or_else(|| Some(entry.media_type.clone()).filter(|m| !m.is_empty()));
            match crate::oci::manifest::parse_manifest(&bytes, ct.as_deref())
                .with_context(|| format!("manifest {} of {reference}", entry.digest))?
            {
                Manifest::Image(m) => (entry.digest, bytes, ct, m),
                Manifest::Index(_) => bail!(
                    "manifest {} of {reference} is a nested index: not supported",
                    entry.digest
                ),
                Manifest::Schema1(_) => bail!(
                    "manifest {} of {reference} is a schema 1 manifest inside an index: not \
                     supported (schema 1 images are single-platform; pull one by its own tag)",
                    entry.digest
                ),
            }
        }
    };
    manifest
        .check_image()
        .with_context(|| format!("manifest {manifest_digest} of {reference}"))?;
    let media_type = schema1_type
        .or(manifest.media_type.clone())
        .or(content_type.filter(|c| media::manifest_kind(c).is_some()))
        .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());

    let (config_bytes, _) =
        fetch_document(ctx, reference, &manifest.config.digest, "config").await?;
    let config = crate::oci::manifest::parse_config(&config_bytes)
        .with_context(|| format!("config {} of {reference}", manifest.config.digest))?;
    crate::oci::manifest::check_layers(&manifest, &config)
        .with_context(|| format!("image {manifest_digest} of {reference}"))?;
    // An index entry was chosen for the platform already; a single-platform image must be
    // for the platform asked for.
    let image_platform = config.platform();
    if ctx.platform_explicit
        && !from_index
        && !image_platform.architecture.is_empty()
        && !ctx.platform.matches(&image_platform)
    {
        bail!(
            "{reference} is a single-platform image for {image_platform}, not {}: \
             drop --platform or pick an image built for it",
            ctx.platform
        );
    }

    let layers = manifest
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .map(|(l, diff_id)| crate::store::LayerRecord {
            blob: l.digest.clone(),
            diff_id: diff_id.clone(),
            size: l.size,
        })
        .collect();
    // Bookkeeping for `cache ls` and eviction: its failure must not fail the command.
    if let Err(e) = ctx.store.record_image(
        &reference.to_string(),
        &manifest_digest,
        &manifest.config.digest,
        layers,
    ) {
        tracing::warn!("recording {reference} in the cache index: {e}");
    }
    Ok(Resolved {
        reference: reference.clone(),
        manifest_digest,
        manifest_bytes,
        media_type,
        manifest,
        config_bytes,
        config,
        limits: ctx.limits,
    })
}

/// A schema 1 manifest as an image manifest, with the manifest bytes as served: from the
/// store's record of an earlier conversion, else by fetching every layer now — a schema 1
/// manifest has no diff_ids, so each layer is downloaded, verified against its blobSum,
/// decompressed, hashed and extracted — and synthesising the config (`oci::schema1`).
/// `bytes` are what the registry served when `from_registry`, else the cached canonical
/// bytes (a signed manifest's signatures are then fetched again, by digest).
async fn convert_schema1(
    ctx: &Context,
    reference: &Reference,
    digest: &Digest,
    bytes: Vec<u8>,
    from_registry: bool,
    s1: Schema1Manifest,
) -> anyhow::Result<(Vec<u8>, Schema1Manifest, ImageManifest)> {
    if let Some(c) = ctx.store.get_converted(digest)? {
        let served = c.served.into_bytes();
        let s1 = match crate::oci::manifest::parse_manifest(&served, None)? {
            Manifest::Schema1(s1) => s1,
            _ => bail!("the cache's record of it is not a schema 1 manifest"),
        };
        return Ok((served, s1, c.manifest));
    }
    if ctx.offline {
        bail!(
            "{reference} is a schema 1 image whose layers are not all in the cache: pull it \
             without --offline first"
        );
    }
    let (served, s1) = if from_registry {
        (bytes, s1)
    } else {
        let resp = ctx
            .client
            .manifest(
                reference.registry(),
                reference.repository(),
                &digest.to_string(),
            )
            .await?;
        match crate::oci::manifest::parse_manifest(&resp.bytes, None)? {
            Manifest::Schema1(s1) => (resp.bytes.to_vec(), s1),
            _ => bail!("the registry now serves something else under {digest}"),
        }
    };

    let blobs = s1.layer_blobs();
    let mut unique: Vec<Digest> = Vec::new();
    for b in &blobs {
        if !unique.contains(b) {
            unique.push((*b).clone());
        }
    }
    tracing::info!(
        %reference,
        layers = unique.len(),
        "schema 1 image: fetching every layer to compute its diff_id"
    );
    let source: Arc<dyn BlobSource> = RegistrySource::new(ctx, reference);
    let fetches = unique.iter().map(|blob| {
        let source = source.clone();
        async move {
            ctx.store
                .ensure_layer_of_blob(
                    source,
                    blob,
                    ctx.limits,
                    super::pull::layer_retry(),
                    Arc::new(|_| {}),
                )
                .await
                .map(|found| (blob.clone(), found))
                .with_context(|| format!("layer {blob}"))
        }
    });
    let mut found = std::collections::HashMap::new();
    let mut results =
        futures_util::stream::iter(fetches).buffer_unordered(super::pull::LAYER_CONCURRENCY);
    while let Some(r) = results.next().await {
        let (blob, f) = r?;
        found.insert(blob, f);
    }
    let layers: Vec<FetchedLayer> = blobs
        .iter()
        .map(|b| {
            let f: &crate::store::FoundLayer = &found[*b];
            FetchedLayer {
                blob: (*b).clone(),
                size: f.size,
                compression: f.compression,
                diff_id: f.diff_id.clone(),
            }
        })
        .collect();
    let diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config = s1.image_config(&diff_ids)?;
    let manifest = s1.image_manifest(&config, &layers);
    ctx.store.put_blob_bytes(&manifest.config.digest, &config)?;
    let converted = Converted {
        served: String::from_utf8(served).context("the manifest is not UTF-8")?,
        manifest,
    };
    ctx.store.set_converted(digest, &converted)?;
    Ok((converted.served.into_bytes(), s1, converted.manifest))
}

/// A cached manifest or config; a digest naming something large (a layer blob) is refused
/// before it is read into memory.
fn read_document(ctx: &Context, digest: &Digest) -> anyhow::Result<Vec<u8>> {
    let len = std::fs::metadata(ctx.store.blob_path(digest))
        .map(|m| m.len())
        .unwrap_or(0);
    if len > MAX_DOCUMENT {
        bail!("{digest} is a {len}-byte blob, not a manifest or config");
    }
    Ok(ctx.store.read_blob(digest)?)
}

/// A manifest or config by digest: from the cache, else from the registry (verified, then
/// stored).
async fn fetch_document(
    ctx: &Context,
    reference: &Reference,
    digest: &Digest,
    what: &str,
) -> anyhow::Result<(Vec<u8>, Option<String>)> {
    if ctx.store.has_blob(digest) {
        return Ok((read_document(ctx, digest)?, None));
    }
    if ctx.offline {
        bail!(
            "{what} {digest} of {reference} is not in the cache: pull it without --offline first"
        );
    }
    let (bytes, ct) = if what == "config" {
        let b = ctx
            .client
            .blob_bytes(
                reference.registry(),
                reference.repository(),
                digest,
                MAX_DOCUMENT,
            )
            .await?;
        (b.to_vec(), None)
    } else {
        let r = ctx
            .client
            .manifest(
                reference.registry(),
                reference.repository(),
                &digest.to_string(),
            )
            .await?;
        (r.bytes.to_vec(), r.content_type)
    };
    ctx.store.put_blob_bytes(digest, &bytes)?;
    Ok((bytes, ct))
}

/// The key of a tag in the store's reference index.
pub fn ref_key(r: &Reference) -> String {
    format!(
        "{}/{}:{}",
        r.registry(),
        r.repository(),
        r.tag().unwrap_or("latest")
    )
}

pub fn parse_reference(s: &str) -> anyhow::Result<Reference> {
    Ok(s.parse::<Reference>()?)
}

/// Layer blobs from the registry, for the store.
pub struct RegistrySource {
    pub client: Client,
    pub registry: String,
    pub repository: String,
    pub offline: bool,
}

impl BlobSource for RegistrySource {
    fn fetch<'a>(
        &'a self,
        digest: &'a Digest,
        offset: u64,
    ) -> Pin<Box<dyn Future<Output = Result<BlobBody, SourceError>> + Send + 'a>> {
        Box::pin(async move {
            if self.offline {
                return Err(
                    format!("blob {digest} is not in the cache and --offline is set").into(),
                );
            }
            let b = self
                .client
                .blob(&self.registry, &self.repository, digest, offset, None)
                .await?;
            let stream = b.body.map(|r| r.map_err(|e| Box::new(e) as SourceError));
            Ok(BlobBody {
                start: b.start,
                stream: Box::pin(stream),
            })
        })
    }
}

impl RegistrySource {
    pub fn new(ctx: &Context, r: &Reference) -> Arc<RegistrySource> {
        Arc::new(RegistrySource {
            client: ctx.client.clone(),
            registry: r.registry().to_owned(),
            repository: r.repository().to_owned(),
            offline: ctx.offline,
        })
    }
}

/// `sha256:0123456789ab` — short digests for progress lines.
pub fn short(d: &Digest) -> String {
    d.hex()[..12].to_owned()
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
