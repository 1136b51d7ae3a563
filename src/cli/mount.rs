//! `imagefs mount REF MOUNTPOINT` and `imagefs umount MOUNTPOINT`: argument handling,
//! daemonising and serving; the image itself is served by [`crate::image::MountedImage`].
//!
//! `mount` checks the mount point (empty, not mounted on, not inside an imagefs mount; a
//! lock serialises racing mounts), resolves the reference (manifest + config, verified),
//! mounts, and returns once the mount is live; the filesystem is then served by a daemon: the
//! same binary re-executed with `--foreground`, in its own session, logging to
//! `<cache>/logs/`. The parent waits on a pipe for the word `ready` (or an error line) so that
//! every failure before the mount is live reaches the user's terminal, and nothing is left
//! mounted. Layers are fetched on the first access to anything but the meta files (see
//! `image::engine` for what is fetched when).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::Args;

use super::GlobalOpts;
use super::common::{self, Context};
use crate::fs::keeper::{KeeperConfig, KeeperLink, Start};
use crate::fs::{MetaFiles, MountOptions};
use crate::image::{MountedImage, Prefetch, ServeOptions};

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
    /// Write the paths of the image's files read through the mount to FILE, in the order of
    /// their first access, one per line (for `imagefs convert --prioritize FILE`)
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// How an image is served: the flags `mount` and `snapshotter` share.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// FUSE worker threads
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    /// Do not use FUSE passthrough for local file data (serve reads with pread instead)
    #[arg(long)]
    pub no_passthrough: bool,
    /// What to fetch of eStargz layers beyond the files read: `landmark`: at the first access,
    /// the files before `.prefetch.landmark` (one request per layer), then the rest in the
    /// background at low priority; `all`: everything in the background; `none`: nothing
    #[arg(long, value_enum, default_value_t = PrefetchArg::Landmark)]
    pub prefetch: PrefetchArg,
    /// Serve eStargz layers lazily only when their descriptor carries the TOC digest
    /// annotation (as stargz-snapshotter does by default); others are fetched whole and
    /// verified against their blob digest and diff_id before anything is served
    #[arg(long)]
    pub require_toc_digest: bool,
    /// When reads walk a lazy eStargz layer (whole files, each just after the previous request
    /// in the blob), each request also fetches the free chunks that follow it in the blob, up
    /// to this much (the next files, as a tree walk reads them); 0 fetches only what is read
    #[arg(long, value_name = "SIZE", default_value_t = crate::store::READ_AROUND, value_parser = crate::cli::units::parse_size)]
    pub read_around: u64,
}

impl ServeArgs {
    pub fn serve_options(&self, cache_max: Option<u64>) -> ServeOptions {
        ServeOptions {
            prefetch: match self.prefetch {
                PrefetchArg::Landmark => Prefetch::Landmark,
                PrefetchArg::All => Prefetch::All,
                PrefetchArg::None => Prefetch::None,
            },
            require_toc_digest: self.require_toc_digest,
            cache_max,
            read_around: self.read_around,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrefetchArg {
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
    // A server started by a keeper: mount, or take the keeper's mount over.
    if let Some(link) = KeeperLink::from_env() {
        return server(g, &args, link);
    }
    // The keeper a `mount` started; its parent holds the mount point's lock.
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
    // The parent of a daemon checked already, and holds the lock until the daemon is done.
    if !daemon {
        check_mountpoint(&canonical, mp, args.nonempty)?;
        let (suid, dev) = (args.suid || args.rootfs, args.dev || args.rootfs);
        if args.allow_other && (suid || dev) {
            check_unreachable_by_others(&canonical)?;
        }
    }
    args.mountpoint = canonical;
    if args.foreground || daemon {
        keep(g, &args, lock)
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

/// Re-run ourselves (the keeper, which starts the server) in a new session and wait until the
/// server says `ready`.
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

/// The keeper of the mount (see `fs::keeper`): it starts the server (this binary, same
/// arguments), holds the mount's connection, restarts the server if it dies, and unmounts on
/// SIGINT/SIGTERM. Returns when the mount is gone.
fn keep(g: &GlobalOpts, args: &MountArgs, lock: Option<std::fs::File>) -> anyhow::Result<ExitCode> {
    let cache = common::cache_dir(g)?;
    crate::store::Store::open(&cache)
        .with_context(|| format!("cannot use cache directory {}", cache.display()))?;
    // Read once (from the user's stdin, or the `mount` that started us), handed to every
    // server on a pipe.
    let credentials = common::credentials(g)?;
    let cfg = KeeperConfig {
        exe: std::env::current_exe().context("locating the imagefs executable")?,
        args: std::env::args_os().skip(1).collect(),
        envs: vec![
            (common::HANDED_CREDENTIALS_ENV.into(), "1".into()),
            ("IMAGEFS_CACHE_DIR".into(), cache.clone().into()),
        ],
        stdin: common::handed_credentials_line(credentials.as_ref()).into_bytes(),
        mountpoint: args.mountpoint.clone(),
        run_dir: cache.join("run"),
        hold_until_serving: lock,
    };
    let code = crate::fs::keeper::run(cfg).context("running the mount's keeper")?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// A server: mount (reporting `ready`, or the error, to the `mount` that started the keeper)
/// or take the live mount over, then serve until the mount goes away.
fn server(g: &GlobalOpts, args: &MountArgs, link: KeeperLink) -> anyhow::Result<ExitCode> {
    let notify = std::env::var_os(READY_ENV).is_some();
    let result = serve(g, args, &link, notify);
    if notify && let Err(e) = &result {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "error: {}", super::error_line(e));
        let _ = out.flush();
    }
    result
}

/// The keeper's state for the next server: which manifest this mount serves (a tag may have
/// moved since; the mount must not).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServerState {
    manifest_digest: crate::oci::Digest,
}

/// Set (to anything) in `mount`'s environment: servers taking the mount over do not ask the
/// kernel to resend the requests their predecessor left unanswered (what a kernel without
/// FUSE_NOTIFY_RESEND does; for tests and comparison).
const NO_RESEND_ENV: &str = "IMAGEFS_NO_RESEND";

fn serve(
    g: &GlobalOpts,
    args: &MountArgs,
    link: &KeeperLink,
    notify: bool,
) -> anyhow::Result<ExitCode> {
    crate::image::engine::tune_allocator();
    let start = link.start().context("starting from the keeper")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    let ctx = rt.block_on(async { Context::new(g) })?;
    let reference = common::parse_reference(&args.reference)?;
    let resolver = ctx.resolver();
    // Taking over: the very manifest the mount was made from, found in the store.
    let pinned = match &start {
        Start::TakeOver { state, .. } => {
            let state: ServerState = serde_json::from_value(state.clone())
                .context("the keeper's state is not this version's")?;
            Some(reference.with_digest(state.manifest_digest))
        }
        Start::Mount => None,
    };
    let resolved = rt.block_on(resolver.resolve(pinned.as_ref().unwrap_or(&reference)))?;
    let meta = MetaFiles {
        config: resolved.config_bytes.clone(),
        manifest: resolved.manifest_bytes.clone(),
        digest: resolved.manifest_digest.to_string(),
        id: resolved.image_id().to_string(),
    };
    let digest = resolved.manifest_digest.clone();
    // `cache ls` shows the mount, and eviction keeps its image, for as long as we serve.
    let _registration = ctx.store.register_mount(&digest, &args.mountpoint)?;
    let image = Arc::new(MountedImage::new(
        ctx.store.clone(),
        resolver.source(&reference),
        resolved,
        rt.handle().clone(),
        args.serve.serve_options(ctx.cache_max),
    ));
    // A cached image's tree needs no network: build it before mounting, so that the root's
    // attributes are the image's from the first `stat` (otherwise a placeholder, which the
    // kernel never caches, stands in until the first access builds the tree).
    if image.is_local()
        && let Err(e) = image.tree()
    {
        tracing::warn!(
            "building the tree of a cached image: {}",
            crate::error::Chain(&e)
        );
    }
    let opts = MountOptions {
        fs_name: format!("imagefs:{reference}"),
        allow_other: args.allow_other,
        threads: args.serve.threads.max(1),
        passthrough: !args.serve.no_passthrough,
        nosuid: !(args.suid || args.rootfs),
        nodev: !(args.dev || args.rootfs),
        record: args.record.clone(),
        survivable: true,
    };
    let mounted = match start {
        Start::Mount => {
            let mounted = crate::fs::mount(image, Some(meta), &args.mountpoint, &opts)?;
            let state = serde_json::to_value(ServerState {
                manifest_digest: digest.clone(),
            })?;
            link.mounted(mounted.handoff()?, state)
                .context("handing the mount to the keeper")?;
            mounted
        }
        Start::TakeOver { handoff, .. } => {
            let resend = std::env::var_os(NO_RESEND_ENV).is_none();
            crate::fs::take_over(image, Some(meta), &args.mountpoint, &opts, handoff, resend)?
        }
    };
    if notify {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
        drop(out);
        // The parent is gone after `ready`: stdout and stdin must not keep its pipe/terminal.
        crate::fs::keeper::detach_stdio();
    }
    link.serving(serde_json::json!({
        "reference": reference.to_string(),
        "manifestDigest": digest.to_string(),
        "passthrough": mounted.passthrough(),
    }))?;
    mounted.run()?;
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
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
