//! `imagefs mount REF MOUNTPOINT` and `imagefs umount MOUNTPOINT`.
//!
//! `mount` resolves the reference (manifest + config, verified), mounts, and returns once the
//! mount is live; the filesystem is then served by a daemon: the same binary re-executed with
//! `--foreground`, in its own session, logging to `<cache>/logs/`. The parent waits on a pipe
//! for the word `ready` (or an error line) so that every failure before the mount is live
//! reaches the user's terminal, and nothing is left mounted. Layers are fetched on the first
//! access to anything but the meta files: whole, or — for eStargz layers, recognised by the
//! `containerd.io/snapshot/stargz/toc.digest` annotation on their descriptor, else by the
//! eStargz footer at the end of a gzip blob — only their footer and TOC, each file's chunks
//! then being fetched with Range requests when read.
//! With `--prefetch landmark` (the default), that first access also fetches each lazy layer's
//! prioritised files (the landmark region) with one Range request, and then the rest of the
//! layer in the background at low priority, as stargz-snapshotter does. The TOC of an
//! annotated layer must match the annotation; an unannotated layer's TOC is used as served
//! (chunks are verified against it, the TOC itself vouched for by nothing in the manifest),
//! unless `--require-toc-digest` has such layers fetched whole. A registry that ignores Range (200 with the whole body) gets the layer fetched
//! whole once, through the store, instead of a whole body per chunk.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use clap::Args;

use super::GlobalOpts;
use super::common::{self, Context, RegistrySource, Resolved};
use super::progress::Reporter;
use crate::fs::{Backend, BackendError, MetaFiles, MountOptions};
use crate::layer::estargz::TOC_DIGEST_ANNOTATION;
use crate::layer::index::DataRef;
use crate::oci::Digest;
use crate::overlay::Tree;
use crate::store::{BlobSource, LazyLayer, RangeSource, SourceError, Store};

/// Set in the daemon's environment: the parent waits for `ready` on the daemon's stdout.
const READY_ENV: &str = "IMAGEFS_MOUNT_NOTIFY";

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Image reference, e.g. busybox, registry:5000/app:1.0, name@sha256:…
    pub reference: String,
    /// An existing empty directory (not inside another imagefs mount)
    pub mountpoint: PathBuf,
    /// Stay in the foreground and serve until unmounted (SIGINT/SIGTERM unmount cleanly)
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Let users other than the mounting one access the mount. With --suid or --dev, the
    /// mount point must be in a directory other users cannot enter
    #[arg(long)]
    pub allow_other: bool,
    /// Mount even if the mount point is not empty (its contents are hidden while mounted)
    #[arg(long)]
    pub nonempty: bool,
    /// FUSE worker threads
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Do not use FUSE passthrough for local file data (serve reads with pread instead)
    #[arg(long)]
    pub no_passthrough: bool,
    /// Honour the image's setuid/setgid bits (off by default: an untrusted image's setuid
    /// programs would run with their owner's rights)
    #[arg(long, conflicts_with = "nosuid")]
    pub suid: bool,
    /// Allow opening the image's device nodes (off by default)
    #[arg(long, conflicts_with = "nodev")]
    pub dev: bool,
    /// Mount for use as a container's root filesystem: --suid and --dev
    #[arg(long, conflicts_with_all = ["nosuid", "nodev"])]
    pub rootfs: bool,
    /// Do not honour setuid/setgid bits (the default)
    #[arg(long)]
    pub nosuid: bool,
    /// Do not allow opening device nodes (the default)
    #[arg(long)]
    pub nodev: bool,
    /// What to fetch of eStargz layers beyond the files read: `landmark`: at the first access,
    /// the files before `.prefetch.landmark` (one request per layer), then the rest in the
    /// background at low priority; `all`: everything in the background; `none`: nothing
    #[arg(long, value_enum, default_value_t = Prefetch::Landmark)]
    pub prefetch: Prefetch,
    /// Serve eStargz layers lazily only when their descriptor carries the TOC digest
    /// annotation (as stargz-snapshotter does by default); others are fetched whole and
    /// verified against their blob digest and diff_id before anything is served
    #[arg(long)]
    pub require_toc_digest: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Prefetch {
    /// The landmark region at the first access, then the rest in the background
    Landmark,
    /// Every file in the background from the first access
    All,
    /// Only the files read
    None,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
}

pub fn run(g: &GlobalOpts, mut args: MountArgs) -> anyhow::Result<ExitCode> {
    // The daemon of a `mount` runs this again; its parent holds the mount point's lock.
    let daemon = std::env::var_os(READY_ENV).is_some();
    let mp = &args.mountpoint;
    let meta = std::fs::metadata(mp).with_context(|| format!("mount point {}", mp.display()))?;
    if !meta.is_dir() {
        bail!("mount point {} is not a directory", mp.display());
    }
    // Symlinks and `..` are resolved once, before mounting: mountinfo lists the resolved path
    // (a `link` or `mnt/../mnt` spelling would pass the check below and stack a second mount),
    // and resolving a path through the new mount before it is served would wait on a FUSE
    // request nobody answers yet.
    let canonical = mp
        .canonicalize()
        .with_context(|| format!("mount point {}", mp.display()))?;
    // Held until the mount is live (or failed): a second `imagefs mount` on the same
    // directory waits here, then finds it mounted.
    let lock = match daemon {
        true => None,
        false => Some(lock_mountpoint(&canonical)?),
    };
    check_mountpoint(&canonical, mp, args.nonempty)?;
    let (suid, dev) = (args.suid || args.rootfs, args.dev || args.rootfs);
    if args.allow_other && (suid || dev) {
        check_unreachable_by_others(&canonical)?;
    }
    args.mountpoint = canonical;
    if args.foreground || daemon {
        foreground(g, &args, lock)
    } else {
        let code = daemonise(g, &args)?;
        drop(lock);
        Ok(code)
    }
}

/// An exclusive `flock` on the mount point directory itself (the directory under the mount,
/// once mounted). Waits for another `imagefs mount` of the same directory to finish.
fn lock_mountpoint(mp: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let dir = std::fs::File::open(mp).with_context(|| format!("opening {}", mp.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", mp.display()));
    }
    Ok(dir)
}

/// A mount point must not be mounted on already, must not be inside an imagefs mount (the
/// image's own directories are no place to stack mounts), and must be empty (a mount would
/// hide what it holds) unless `--nonempty`.
fn check_mountpoint(mp: &Path, given: &Path, nonempty: bool) -> anyhow::Result<()> {
    if is_mounted(mp)? {
        bail!(
            "{} is already a mount point: unmount it first (imagefs umount {})",
            given.display(),
            given.display()
        );
    }
    if let Some(outer) = crate::fs::mount_containing(mp)?
        && outer.is_imagefs()
    {
        bail!(
            "{} is inside the imagefs mount {}: choose a directory outside it",
            given.display(),
            String::from_utf8_lossy(&outer.mountpoint)
        );
    }
    let has_entries = std::fs::read_dir(mp)
        .with_context(|| format!("reading mount point {}", given.display()))?
        .next()
        .is_some();
    if has_entries && !nonempty {
        bail!(
            "mount point {} is not empty: mounting would hide its contents (use an empty \
             directory, or --nonempty)",
            given.display()
        );
    }
    Ok(())
}

/// With `--allow-other`, setuid programs and device nodes of the image would be within
/// reach of every local user: refuse unless some directory above the mount point keeps
/// other users out (as containerd keeps its mounts under 0700 directories).
fn check_unreachable_by_others(mp: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for dir in mp.ancestors().skip(1) {
        let mode = std::fs::metadata(dir)
            .with_context(|| format!("checking {}", dir.display()))?
            .permissions()
            .mode();
        if mode & 0o011 == 0 {
            return Ok(());
        }
    }
    bail!(
        "--allow-other with --suid, --dev or --rootfs would let every local user run the \
         image's setuid programs and open its devices through {}: mount under a directory \
         other users cannot enter (chmod 700 a parent), or drop --allow-other",
        mp.display()
    )
}

/// Re-run ourselves with `--foreground` in a new session and wait until it says `ready`.
fn daemonise(g: &GlobalOpts, args: &MountArgs) -> anyhow::Result<ExitCode> {
    let cache = common::cache_dir(g)?;
    // Checked (and created) before anything is written into it.
    crate::store::Store::open(&cache)
        .with_context(|| format!("cannot use cache directory {}", cache.display()))?;
    let logs = cache.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let abs = std::path::absolute(&args.mountpoint)?;
    let log_path = logs.join(format!(
        "mount-{}.log",
        abs.to_string_lossy().trim_matches('/').replace('/', "_")
    ));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;

    // Read here (stdin is the user's), handed to the daemon on a pipe: never in its
    // environment, where /proc/PID/environ would show it for the mount's life.
    let credentials = common::credentials(g)?;
    let exe = std::env::current_exe().context("locating the imagefs executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(READY_ENV, "1")
        .env(common::HANDED_CREDENTIALS_ENV, "1")
        // Flags from the environment that the child must see the same way.
        .env("IMAGEFS_CACHE_DIR", &cache)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    // SAFETY: setsid is async-signal-safe; the daemon must not die with our terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        // A daemon that failed before reading closed its end; its error line says why.
        let _ = stdin.write_all(common::handed_credentials_line(credentials.as_ref()).as_bytes());
    }
    let out = child.stdout.take().expect("piped stdout");
    let mut last = String::new();
    for line in BufReader::new(out).lines() {
        let line = line.unwrap_or_default();
        if line == "ready" {
            return Ok(ExitCode::SUCCESS);
        }
        last = line;
    }
    let status = child.wait()?;
    let msg = last
        .strip_prefix("error: ")
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!(
                "mount daemon exited with {status}; see {}",
                log_path.display()
            )
        });
    bail!("{msg}")
}

/// Resolve, mount, tell the parent (if any), serve until unmounted or signalled.
fn foreground(
    g: &GlobalOpts,
    args: &MountArgs,
    lock: Option<std::fs::File>,
) -> anyhow::Result<ExitCode> {
    let notify = std::env::var_os(READY_ENV).is_some();
    let result = serve(g, args, notify, lock);
    if notify && let Err(e) = &result {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "error: {}", super::error_line(e));
        let _ = out.flush();
    }
    result
}

fn serve(
    g: &GlobalOpts,
    args: &MountArgs,
    notify: bool,
    lock: Option<std::fs::File>,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    let ctx = rt.block_on(async { Context::new(g) })?;
    let reference = common::parse_reference(&args.reference)?;
    let resolved = rt.block_on(common::resolve(&ctx, &reference))?;
    let meta = MetaFiles {
        config: resolved.config_bytes.clone(),
        manifest: resolved.manifest_bytes.clone(),
        digest: resolved.manifest_digest.to_string(),
        id: resolved.image_id().to_string(),
    };
    // `cache ls` shows the mount, and eviction keeps its image, for as long as we serve.
    let _registration = ctx
        .store
        .register_mount(&resolved.manifest_digest, &args.mountpoint)?;
    let source = RegistrySource::new(&ctx, &reference);
    let backend = Arc::new(ImageBackend {
        cache_max: ctx.cache_max,
        store: ctx.store.clone(),
        ranges: Arc::new(RegistryRanges::new(source.clone())),
        source,
        lazy: std::sync::OnceLock::new(),
        prefetch: args.prefetch,
        require_toc_digest: args.require_toc_digest,
        diff_ids: resolved.config.rootfs.diff_ids.clone(),
        resolved,
        rt: rt.handle().clone(),
        tree: Mutex::new(None),
        building: Mutex::new(()),
        whole: Mutex::new(std::collections::HashSet::new()),
        whole_flight: Mutex::new(()),
    });
    // A cached image's tree needs no network: build it before mounting, so that the root's
    // attributes are the image's from the first `stat` (otherwise a placeholder, which the
    // kernel never caches, stands in until the first access builds the tree).
    if backend.diff_ids.iter().all(|d| backend.store.has_layer(d))
        && let Err(e) = backend.tree()
    {
        tracing::warn!("building the tree of a cached image: {e}");
    }
    let opts = MountOptions {
        fs_name: format!("imagefs:{reference}"),
        allow_other: args.allow_other,
        threads: args.threads.max(1),
        passthrough: !args.no_passthrough,
        nosuid: !(args.suid || args.rootfs),
        nodev: !(args.dev || args.rootfs),
    };
    let mounted = crate::fs::mount(backend, meta, &args.mountpoint, &opts)?;
    drop(lock);
    let unmounter = mounted.unmounter();
    rt.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received, unmounting");
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = unmounter.unmount() {
                tracing::error!("{e}");
            }
        })
        .await;
    });
    if notify {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
        drop(out);
        // The parent is gone after `ready`: stdout and stdin must not keep its pipe/terminal.
        detach_stdio();
    }
    mounted.run()?;
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}

fn detach_stdio() {
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

/// The store as the filesystem's backend: the first `tree()` fetches, verifies and extracts
/// every plain layer (concurrently) and only the TOC of every eStargz layer, then merges their
/// indexes; later calls return the same tree. Files of eStargz layers are fetched chunk by
/// chunk as they are read.
struct ImageBackend {
    store: Store,
    source: Arc<RegistrySource>,
    ranges: Arc<RegistryRanges>,
    resolved: Resolved,
    diff_ids: Vec<Digest>,
    rt: tokio::runtime::Handle,
    /// Per layer, the lazily served eStargz layer (`None`: extracted whole). Set once by the
    /// build that succeeded, before the tree is published.
    lazy: std::sync::OnceLock<Vec<Option<Arc<LazyLayer>>>>,
    /// Background fetching of lazy layers, started once the tree is built.
    prefetch: Prefetch,
    /// Unannotated eStargz layers are fetched whole (`--require-toc-digest`).
    require_toc_digest: bool,
    /// The cache bound, enforced once the tree is built.
    cache_max: Option<u64>,
    /// The merged tree once built. A std Mutex: held only to clone the Arc.
    tree: Mutex<Option<Arc<Tree>>>,
    /// Single flight for the build: the first caller builds, the others wait here and then
    /// find the tree (or try again after a failure, e.g. once the network is back).
    building: Mutex<()>,
    /// Lazy layers extracted whole because the registry ignored Range: their files are
    /// copied from the extracted layer. A std Mutex: held for set lookups only.
    whole: Mutex<std::collections::HashSet<u32>>,
    /// Single flight for those whole fetches; held across the fetch (a FUSE thread waits for
    /// the layer anyway).
    whole_flight: Mutex<()>,
}

impl ImageBackend {
    fn build(&self) -> anyhow::Result<Tree> {
        let reporter = Reporter::Quiet;
        let started = std::time::Instant::now();
        let jobs = super::pull::layer_jobs(&self.resolved)?;
        let lazy = self.rt.block_on(self.lazy_layers())?;
        let source: Arc<dyn BlobSource> = self.source.clone();
        self.rt.block_on(async {
            use futures_util::StreamExt as _;
            let whole = jobs
                .iter()
                .zip(&lazy)
                .filter(|(_, l)| l.is_none())
                .map(|(job, _)| {
                    let progress = reporter.layer(common::short(&job.digest), job.size);
                    let source = source.clone();
                    async move {
                        self.store
                            .ensure_layer(source, job, progress)
                            .await
                            .with_context(|| format!("layer {}", job.digest))
                    }
                });
            let mut results =
                futures_util::stream::iter(whole).buffer_unordered(super::pull::LAYER_CONCURRENCY);
            let landmarks = self.fetch_landmarks(&lazy);
            let wholes = async {
                while let Some(r) = results.next().await {
                    r?;
                }
                anyhow::Ok(())
            };
            let ((), r) = futures_util::future::join(landmarks, wholes).await;
            r
        })?;
        let fetched = started.elapsed();
        let mut indexes = Vec::with_capacity(self.diff_ids.len());
        for (d, l) in self.diff_ids.iter().zip(&lazy) {
            indexes.push(match l {
                Some(l) => l.index().clone(),
                None => self.store.load_layer_index(d)?,
            });
        }
        let tree = crate::overlay::merge(&indexes)
            .with_context(|| format!("merging the layers of {}", self.resolved.reference))?;
        tracing::info!(
            layers = indexes.len(),
            lazy = lazy.iter().flatten().count(),
            inodes = tree.inodes.len(),
            fetch_ms = fetched.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "image tree ready"
        );
        let _ = self.lazy.set(lazy);
        // Sizing the cache walks every layer directory: not on the first reader's path.
        if self.cache_max.is_some() {
            let (store, max) = (self.store.clone(), self.cache_max);
            let image = self.resolved.manifest_digest.clone();
            self.rt
                .spawn_blocking(move || common::enforce_cache_bound(&store, max, &image));
        }
        self.start_prefetch();
        Ok(tree)
    }

    /// With `--prefetch landmark`, each lazy layer's landmark region, one request per layer.
    /// A failure only costs the prioritised files their head start: they are fetched when
    /// read.
    async fn fetch_landmarks(&self, lazy: &[Option<Arc<LazyLayer>>]) {
        if self.prefetch != Prefetch::Landmark || self.source.offline {
            return;
        }
        let fetches = lazy.iter().flatten().map(|l| async move {
            if let Err(e) = l.fetch_landmark(&*self.ranges).await {
                tracing::warn!(digest = %l.digest(), "prefetching the landmark region: {e}");
            }
        });
        futures_util::future::join_all(fetches).await;
    }

    /// One background task per lazy layer, yielding to readers (see [`LazyLayer::fill`]); they
    /// end with the runtime at unmount.
    fn start_prefetch(&self) {
        // Offline, there is nothing to fetch from.
        if self.prefetch == Prefetch::None || self.source.offline {
            return;
        }
        for l in self.lazy.get().into_iter().flatten().flatten() {
            let (l, ranges) = (l.clone(), self.ranges.clone());
            self.rt.spawn(async move {
                let started = std::time::Instant::now();
                match l.fill(&*ranges).await {
                    Ok(()) => tracing::info!(
                        digest = %l.digest(),
                        ms = started.elapsed().as_millis() as u64,
                        "prefetch done"
                    ),
                    Err(e) => tracing::warn!(digest = %l.digest(), "prefetch stopped: {e}"),
                }
            });
        }
    }

    /// Per layer, its lazy eStargz form when it is eStargz (a TOC digest annotation, else — for
    /// gzip layers, unless `--require-toc-digest` — an eStargz footer), is not extracted
    /// already, and its footer and TOC are usable (else it is fetched whole).
    async fn lazy_layers(&self) -> anyhow::Result<Vec<Option<Arc<LazyLayer>>>> {
        let layers = &self.resolved.manifest.layers;
        let probes = layers.iter().zip(&self.diff_ids).map(|(desc, diff_id)| async move {
            if self.store.has_layer(diff_id) {
                return Ok(None);
            }
            let toc = match desc.annotation(TOC_DIGEST_ANNOTATION).map(str::parse::<Digest>) {
                Some(Ok(d)) => Some(d),
                Some(Err(e)) => {
                    tracing::warn!(digest = %desc.digest, "bad {TOC_DIGEST_ANNOTATION} annotation, fetching the layer whole: {e}");
                    return Ok(None);
                }
                None if self.require_toc_digest => return Ok(None),
                None if desc.compression().ok() != Some(crate::oci::Compression::Gzip) => {
                    return Ok(None);
                }
                None => None,
            };
            let l = match self
                .store
                .lazy_layer(&*self.ranges, &desc.digest, desc.size, toc.as_ref())
                .await
            {
                Err(_) if self.ranges.ignored(&desc.digest) => {
                    if toc.is_some() {
                        tracing::warn!(digest = %desc.digest, "the registry ignores Range: fetching the layer whole");
                    }
                    return Ok(None);
                }
                // Only the footer tells an unannotated layer is eStargz: when it cannot be
                // read (offline, say), the layer is what its media type says, fetched whole
                // (or found in the cache) like any gzip layer.
                Err(e) if toc.is_none() => {
                    tracing::debug!(digest = %desc.digest, "no eStargz footer read: {e:#}");
                    return Ok(None);
                }
                l => l.with_context(|| format!("layer {}", desc.digest))?,
            };
            if let (Some(_), None) = (&l, &toc) {
                tracing::info!(digest = %desc.digest, "eStargz layer without a {TOC_DIGEST_ANNOTATION} annotation: served lazily with its TOC as the registry sent it (--require-toc-digest fetches such layers whole)");
            }
            anyhow::Ok(l.map(Arc::new))
        });
        futures_util::future::try_join_all(probes).await
    }

    fn lazy_layer(&self, layer: u32) -> Option<&Arc<LazyLayer>> {
        self.lazy.get()?.get(layer as usize)?.as_ref()
    }

    /// Serve a file of lazy layer `layer` from the layer fetched whole (once, through the
    /// store: blob digest and diff_id verified), for a registry that ignores Range.
    fn ensure_from_whole(&self, layer: u32, l: &LazyLayer, data: DataRef) -> anyhow::Result<()> {
        let diff_id = &self.diff_ids[layer as usize];
        if !self.whole.lock().expect("whole lock").contains(&layer) {
            let _flight = self.whole_flight.lock().expect("whole flight lock");
            if !self.whole.lock().expect("whole lock").contains(&layer) {
                let jobs = super::pull::layer_jobs(&self.resolved)?;
                let job = &jobs[layer as usize];
                let progress = Reporter::Quiet.layer(common::short(&job.digest), job.size);
                let source: Arc<dyn BlobSource> = self.source.clone();
                self.rt
                    .block_on(self.store.ensure_layer(source, job, progress))
                    .with_context(|| format!("layer {}", job.digest))?;
                self.whole.lock().expect("whole lock").insert(layer);
            }
        }
        let path = self.store.data_path(diff_id, data);
        let content =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        l.fill_from(data, &content)?;
        Ok(())
    }
}

impl Backend for ImageBackend {
    fn tree(&self) -> Result<Arc<Tree>, BackendError> {
        if let Some(t) = self.tree.lock().expect("tree lock").clone() {
            return Ok(t);
        }
        let _building = self.building.lock().expect("build lock");
        if let Some(t) = self.tree.lock().expect("tree lock").clone() {
            return Ok(t);
        }
        let tree = Arc::new(
            self.build()
                .map_err(|e| BackendError::new(super::error_line(&e)))?,
        );
        *self.tree.lock().expect("tree lock") = Some(tree.clone());
        Ok(tree)
    }

    fn built_tree(&self) -> Option<Arc<Tree>> {
        self.tree.lock().expect("tree lock").clone()
    }

    fn open(&self, layer: u32, data: DataRef) -> Result<std::fs::File, BackendError> {
        if let Some(l) = self.lazy_layer(layer) {
            return l
                .data_file(data)
                .map_err(|e| BackendError::new(e.to_string()));
        }
        let diff_id = self
            .diff_ids
            .get(layer as usize)
            .ok_or_else(|| BackendError::new(format!("no layer {layer} in this image")))?;
        let path = self.store.data_path(diff_id, data);
        std::fs::File::open(&path)
            .map_err(|e| BackendError::new(format!("opening {}: {e}", path.display())))
    }

    fn is_complete(&self, layer: u32, data: DataRef) -> bool {
        self.lazy_layer(layer).is_none_or(|l| l.is_complete(data))
    }

    fn ensure(&self, layer: u32, data: DataRef, offset: u64, len: u64) -> Result<(), BackendError> {
        let Some(l) = self.lazy_layer(layer) else {
            return Ok(());
        };
        if !self.ranges.ignored(l.digest()) {
            match self.rt.block_on(l.ensure(
                &*self.ranges,
                data,
                offset..offset.saturating_add(len),
            )) {
                Ok(()) => return Ok(()),
                Err(_) if self.ranges.ignored(l.digest()) => {}
                Err(e) => {
                    return Err(BackendError::new(format!(
                        "{e} (file bytes {offset}+{len})"
                    )));
                }
            }
        }
        self.ensure_from_whole(layer, l, data)
            .map_err(|e| BackendError::new(super::error_line(&e)))
    }
}

/// Blob ranges from the registry, for eStargz layers. A registry that answers a Range request
/// with the whole body (200) has the blob remembered and every later range of it refused
/// without a request: the caller fetches such a layer whole instead of once per chunk.
pub(super) struct RegistryRanges {
    source: Arc<RegistrySource>,
    /// Blobs whose registry ignored Range. A std Mutex: held for set operations only.
    ignored: Mutex<std::collections::HashSet<Digest>>,
}

impl RegistryRanges {
    pub(super) fn new(source: Arc<RegistrySource>) -> RegistryRanges {
        RegistryRanges {
            source,
            ignored: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Whether the registry answered a Range request for `digest` with the whole blob.
    fn ignored(&self, digest: &Digest) -> bool {
        self.ignored.lock().expect("ignored lock").contains(digest)
    }
}

impl RangeSource for RegistryRanges {
    fn fetch_range<'a>(
        &'a self,
        digest: &'a Digest,
        range: std::ops::Range<u64>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<u8>, SourceError>> + Send + 'a>,
    > {
        Box::pin(async move {
            use futures_util::StreamExt as _;
            let s = &self.source;
            let ignored =
                || format!("the registry ignores Range requests for blob {digest}: fetch it whole");
            if self.ignored(digest) {
                return Err(ignored().into());
            }
            if s.offline {
                return Err(format!(
                    "bytes {}..{} of blob {digest} are not in the cache and --offline is set",
                    range.start, range.end
                )
                .into());
            }
            if range.is_empty() {
                return Ok(Vec::new());
            }
            let b = s
                .client
                .blob(
                    &s.registry,
                    &s.repository,
                    digest,
                    range.start,
                    Some(range.end - 1),
                )
                .await?;
            // A registry that ignores Range sends the blob from 0: dropping the body closes
            // the connection rather than downloading it all once per chunk. (A range from 0,
            // like the landmark region, is served right either way: its bytes come first.)
            if b.start != range.start {
                self.ignored
                    .lock()
                    .expect("ignored lock")
                    .insert(digest.clone());
                return Err(ignored().into());
            }
            let len = (range.end - range.start) as usize;
            let mut out = Vec::with_capacity(len);
            let mut body = b.body;
            while out.len() < len {
                let Some(bytes) = body.next().await else {
                    break;
                };
                let bytes = bytes?;
                let take = bytes.len().min(len - out.len());
                out.extend_from_slice(&bytes[..take]);
            }
            Ok(out)
        })
    }
}

/// Unmount an imagefs mount, and nothing else: the target must be a `fuse.imagefs` mount in
/// `/proc/self/mountinfo`, named by its own path (not a symlink to it). Root unmounts with
/// `umount2(UMOUNT_NOFOLLOW)`, detaching lazily if the mount is busy or its daemon is gone;
/// other users go through `fusermount3 -u` (then `-uz`), which checks they own the mount. The
/// daemon exits when its session ends.
pub fn umount(args: UmountArgs) -> anyhow::Result<ExitCode> {
    let given = &args.mountpoint;
    if std::fs::symlink_metadata(given).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(
            "{} is a symbolic link: give the mount point itself",
            given.display()
        );
    }
    let mp = resolve_mountpoint(given)?;
    let Some(entry) = crate::fs::mount_at(&mp)? else {
        bail!("{} is not mounted", mp.display());
    };
    if !entry.is_imagefs() {
        bail!(
            "{} is not an imagefs mount (it is a {} mount of {}): refusing to unmount it",
            mp.display(),
            entry.fstype,
            entry.source
        );
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return unmount_as_root(&mp);
    }
    if let Some(owner) = entry.fuse_owner()
        && owner != euid
    {
        bail!(
            "{} was mounted by uid {owner}: only that user or root can unmount it",
            mp.display()
        );
    }
    let plain = Command::new("fusermount3").arg("-u").arg(&mp).output();
    if let Ok(o) = &plain
        && o.status.success()
    {
        return Ok(ExitCode::SUCCESS);
    }
    let lazy = Command::new("fusermount3")
        .arg("-uz")
        .arg(&mp)
        .output()
        .context("running fusermount3 (install fuse3)")?;
    if lazy.status.success() || !is_mounted(&mp)? {
        return Ok(ExitCode::SUCCESS);
    }
    bail!(
        "cannot unmount {}: {}",
        mp.display(),
        String::from_utf8_lossy(&lazy.stderr).trim()
    )
}

/// `umount2` without following a symlink at the last component (the path was checked to be
/// an imagefs mount; a symlink swapped in since must not redirect the unmount); lazily
/// (`MNT_DETACH`) when busy or when its daemon is gone.
fn unmount_as_root(mp: &Path) -> anyhow::Result<ExitCode> {
    let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes())?;
    for flags in [
        libc::UMOUNT_NOFOLLOW,
        libc::UMOUNT_NOFOLLOW | libc::MNT_DETACH,
    ] {
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
            return Ok(ExitCode::SUCCESS);
        }
    }
    Err(std::io::Error::last_os_error()).with_context(|| format!("cannot unmount {}", mp.display()))
}

/// The path mountinfo shows for `p`: symlinks and `..` resolved. A mount whose daemon died
/// cannot be resolved itself (ENOTCONN), so then only its parent is.
fn resolve_mountpoint(p: &Path) -> anyhow::Result<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Ok(c);
    }
    let abs = std::path::absolute(p)?;
    Ok(match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(parent) => parent.join(name),
            Err(_) => abs,
        },
        _ => abs,
    })
}

/// Whether `mp` is a mount point, from /proc/self/mountinfo (field 5, where the kernel writes
/// space, tab, newline and backslash as octal escapes like `\040`).
pub fn is_mounted(mp: &Path) -> anyhow::Result<bool> {
    Ok(crate::fs::mount_device(mp)?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_resolve_through_symlinks_and_dot_dot() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap().join("mnt");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        for p in ["mnt", "link", "mnt/../mnt", "link/."] {
            assert_eq!(
                resolve_mountpoint(&dir.path().join(p)).unwrap(),
                real,
                "{p}"
            );
        }
        // A path that cannot be resolved (like a dead FUSE mount) keeps its last component.
        let gone = dir.path().join("link/../missing");
        assert_eq!(
            resolve_mountpoint(&gone).unwrap(),
            real.parent().unwrap().join("missing")
        );
    }
}
