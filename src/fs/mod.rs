//! The FUSE filesystem: serves a merged [`Tree`](crate::overlay::Tree) read-only over FUSE (fuser 0.18), with four
//! meta files at the root. The only module that knows `fuser`, errno, inode numbers and TTLs.
//!
//! It does not know where the tree and file data come from: a [`Backend`] (the store, in the
//! binary) produces the tree and opens local files, blocking until they are there. A file may
//! be opened before its content is local (lazily fetched layers): then each read first asks the
//! backend to make its range local, and such files are served with `pread`, never passthrough.
//! FUSE worker threads simply wait on the backend; readers never see EAGAIN.
//!
//! What the kernel sees:
//! - inode numbers: tree inode id + 1 (the root, id 0, is FUSE inode 1); the meta files use the
//!   top of the `u64` range;
//! - `.config.json`, `.manifest.json`, `.digest`, `.id` at the root: 0444, root-owned, served
//!   from memory; looking them up, reading them and `stat` of the root never ask for the tree.
//!   Before the tree exists the root's attributes are a placeholder 0755 directory (not cached
//!   by the kernel); `statfs` answers zeros;
//! - a read-only mount (`ro`, `default_permissions` (plus `nosuid`, `nodev` when asked), fstype
//!   `fuse.imagefs`), EROFS for every change, day-long entry/attribute TTLs and cached negative
//!   lookups, kept page cache, 1 MiB requests, READDIRPLUS, several worker threads, and kernel
//!   passthrough reads when asked for and available (else `pread`).

mod attr;
mod backend;
mod errno;
mod fdpass;
mod filesystem;
mod fusermount;
pub mod keeper;
mod meta;
mod mountinfo;
mod open;
mod open_state;
mod record;
mod session;

pub use open_state::OpenState;
pub use session::Negotiated;

pub use backend::{Backend, BackendError};
pub use meta::MetaFiles;

pub use mountinfo::{
    IMAGEFS_FSTYPE, MountEntry, mount_at, mount_containing, mount_device, mounts_under,
};

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuser::{Config, MountOption, SessionACL};

use filesystem::{Handshake, ImageFs};
use meta::MetaTable;
use open::Persist;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The mount source shown in `/proc/mounts`, e.g. `imagefs:docker.io/library/busybox:latest`.
    pub fs_name: String,
    /// Let other users than the mounting one in (`allow_other`; for non-root mounts this needs
    /// `user_allow_other` in `/etc/fuse.conf`).
    pub allow_other: bool,
    /// FUSE worker threads (at least 1). Each blocks while its request waits on the backend.
    pub threads: usize,
    /// Use kernel passthrough for reads of regular files when the kernel grants it (Linux ≥ 6.9,
    /// `CAP_SYS_ADMIN`); falls back to `pread` silently otherwise.
    pub passthrough: bool,
    /// Mount `nosuid` (setuid/setgid bits shown but not honoured). Off by default: a container
    /// rootfs needs them, as on overlayfs.
    pub nosuid: bool,
    /// Mount `nodev` (device nodes shown but not openable). Off by default, like a rootfs.
    pub nodev: bool,
    /// Write the paths of the files read, in first-access order, to this file (created or
    /// truncated): `mount --record`.
    pub record: Option<std::path::PathBuf>,
    /// The connection may outlive this process and be taken over by another
    /// ([`Mounted::handoff`], [`take_over`]): all worker threads share one fd (a cloned fd's
    /// unanswered requests die with it), and passthrough backing ids are mirrored in an
    /// [`OpenState`].
    pub survivable: bool,
}

/// What a process needs to take over a live mount ([`take_over`]): the connection, the INIT
/// it was set up with, and the table of passthrough backing ids in use.
pub struct Handoff {
    pub fuse: OwnedFd,
    pub negotiated: Negotiated,
    pub open_state: Option<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("cannot mount at {}", mountpoint.display())]
    Mount {
        mountpoint: PathBuf,
        source: io::Error,
    },
    #[error(
        "cannot mount at {}: /dev/fuse does not exist: load the FUSE module (`modprobe fuse`) \
         or, in a container, pass the device in",
        mountpoint.display()
    )]
    NoDevFuse { mountpoint: PathBuf },
    #[error(
        "cannot mount at {}: /dev/fuse is not readable and writable for uid {uid} (mode {mode:o}, \
         owner uid {owner}; the setuid fusermount3 opens it as the calling user too): mount as \
         root, or have an administrator make /dev/fuse 0666 (Debian's default)",
        mountpoint.display()
    )]
    DevFuseDenied {
        mountpoint: PathBuf,
        uid: u32,
        mode: u32,
        owner: u32,
    },
    #[error("the FUSE session at {} failed", mountpoint.display())]
    Session {
        mountpoint: PathBuf,
        source: io::Error,
    },
    /// Ends in advice, so the cause is in the message, not `source()`.
    #[error("cannot unmount {}: {cause}; try `fusermount3 -u {}`", mountpoint.display(), mountpoint.display())]
    Unmount {
        mountpoint: PathBuf,
        cause: io::Error,
    },
}

/// Mount and serve until unmounted (`fusermount3 -u` / `umount`, or [`Unmounter::unmount`]);
/// returns after the kernel session ended. `on_ready` is called once the mount is live.
///
/// For a clean shutdown on signals use [`mount`] instead: take an [`Unmounter`] before
/// [`Mounted::run`] and call it from the thread that waits for the signal.
pub fn serve(
    backend: Arc<dyn Backend>,
    meta: Option<MetaFiles>,
    mountpoint: &Path,
    opts: &MountOptions,
    on_ready: impl FnOnce(),
) -> Result<(), FsError> {
    let mounted = mount(backend, meta, mountpoint, opts)?;
    on_ready();
    mounted.run()
}

/// Mount without serving yet. When this returns the mount is live (the kernel's INIT has been
/// answered); requests queue in the kernel until [`Mounted::run`].
///
/// Shutting down on SIGINT/SIGTERM:
///
/// ```no_run
/// # fn f(backend: std::sync::Arc<dyn imagefs::fs::Backend>, meta: Option<imagefs::fs::MetaFiles>,
/// #      opts: imagefs::fs::MountOptions) -> Result<(), imagefs::fs::FsError> {
/// let mut mounted = imagefs::fs::mount(backend, meta, "/mnt/x".as_ref(), &opts)?;
/// let unmounter = mounted.unmounter();
/// std::thread::spawn(move || {
///     // wait for the signal here (e.g. a tokio task awaiting ctrl_c / SIGTERM), then:
///     if let Err(e) = unmounter.unmount() {
///         tracing::error!("{e}");
///     }
/// });
/// mounted.run() // returns once the kernel session ended
/// # }
/// ```
pub fn mount(
    backend: Arc<dyn Backend>,
    meta: Option<MetaFiles>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<Mounted, FsError> {
    let mount_err = |source| FsError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    };
    let recorder = match &opts.record {
        Some(path) => Some(record::Recorder::new(
            std::fs::File::create(path).map_err(mount_err)?,
        )),
        None => None,
    };
    let persist = match opts.survivable {
        true => Some(Persist::new(OpenState::create().map_err(mount_err)?)),
        false => None,
    };
    let handshake = Arc::new(Handshake::default());
    let fs = image_fs(backend, meta, opts, recorder, &persist, &handshake);
    let config = session_config(opts);
    // Resolve the path before mounting: once the mount is live but not yet served, a lookup
    // that passes through it would wait on ourselves.
    let mountpoint = mountpoint.canonicalize().map_err(mount_err)?;
    let unmounter = |inner| Unmounter {
        inner: Arc::new(Mutex::new(inner)),
        mountpoint: mountpoint.clone(),
    };
    let (session, unmounter) = if fusermount::needed() {
        let fd = fusermount::mount(&mountpoint, &fusermount_options(opts))
            .map_err(|source| mount_error(&mountpoint, source))?;
        let session =
            fuser::Session::from_fd(fs, fd, config.acl, config.clone()).map_err(mount_err)?;
        // Unmounted by path, with `fusermount3 -u`.
        (session, unmounter(None))
    } else {
        let mut session = fuser::Session::new(fs, &mountpoint, &config)
            .map_err(|source| mount_error(&mountpoint, source))?;
        let u = unmounter(Some(session.unmount_callable()));
        (session, u)
    };
    tracing::debug!(mountpoint = %mountpoint.display(), "mounted");
    let negotiated = handshake.result.lock().unwrap().take();
    let mounted = Mounted::new(session, mountpoint, unmounter, negotiated, persist);
    if !mounted.passthrough() {
        raise_read_ahead(&mounted.mountpoint);
    }
    Ok(mounted)
}

/// Serve a live mount whose previous server is gone: the connection and state in `handoff`,
/// the INIT replayed (see `session`), and the requests the previous server left unanswered
/// resent by the kernel when `resend` (and the kernel can). `backend`, `meta` and `opts` must
/// describe the same image and options as the mount's first server had.
pub fn take_over(
    backend: Arc<dyn Backend>,
    meta: Option<MetaFiles>,
    mountpoint: &Path,
    opts: &MountOptions,
    handoff: Handoff,
    resend: bool,
) -> Result<Mounted, FsError> {
    let mountpoint = mountpoint.to_path_buf();
    let err = |source| FsError::Session {
        mountpoint: mountpoint.clone(),
        source,
    };
    let recorder = match &opts.record {
        Some(path) => Some(record::Recorder::new(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(err)?,
        )),
        None => None,
    };
    let persist = match handoff.open_state {
        Some(fd) => Some(Persist::new(OpenState::attach(fd).map_err(err)?)),
        None => None,
    };
    let handshake = Arc::new(Handshake {
        resume: Some(handoff.negotiated),
        result: Mutex::new(None),
    });
    let fs = image_fs(backend, meta, opts, recorder, &persist, &handshake);
    let config = session_config(opts);
    let session = session::take_over(
        fs,
        handoff.fuse,
        &handoff.negotiated,
        config.acl,
        config.clone(),
    )
    .map_err(err)?;
    if resend && handoff.negotiated.can_resend() {
        session::resend(session.as_fd()).map_err(err)?;
        tracing::info!("took over the mount; unanswered requests resent");
    } else {
        tracing::warn!(
            "took over the mount without resending: requests the previous server left \
             unanswered stay unanswered (the kernel lacks FUSE_NOTIFY_RESEND, Linux < 6.9)"
        );
    }
    let unmounter = Unmounter {
        inner: Arc::new(Mutex::new(None)),
        mountpoint: mountpoint.clone(),
    };
    // What this server took of the replayed INIT (at most what the first one had).
    let negotiated = handshake.result.lock().unwrap().take();
    Ok(Mounted::new(
        session, mountpoint, unmounter, negotiated, persist,
    ))
}

fn image_fs(
    backend: Arc<dyn Backend>,
    meta: Option<MetaFiles>,
    opts: &MountOptions,
    recorder: Option<record::Recorder>,
    persist: &Option<Arc<Persist>>,
    handshake: &Arc<Handshake>,
) -> ImageFs {
    ImageFs::new(
        backend,
        MetaTable::new(meta),
        opts.passthrough && may_passthrough(),
        recorder,
        persist.clone(),
        handshake.clone(),
    )
}

/// Passthrough registers backing files with an ioctl that needs `CAP_SYS_ADMIN`: without it,
/// do not ask (opens then cost no round trip at all, see `ImageFs::open`).
fn may_passthrough() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// The mount options of [`session_config`] as `fusermount3 -o` takes them.
fn fusermount_options(opts: &MountOptions) -> String {
    let mut o = vec![
        format!("fsname={}", opts.fs_name.replace(',', "_")),
        "subtype=imagefs".to_owned(),
        "ro".to_owned(),
        "default_permissions".to_owned(),
    ];
    // fusermount3 adds nosuid and nodev for users anyway.
    o.extend(["nosuid".to_owned(), "nodev".to_owned()]);
    if opts.allow_other {
        o.push("allow_other".to_owned());
    }
    o.join(",")
}

fn session_config(opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        // fusermount3 splits its -o list at commas; a reference has none, but be sure.
        MountOption::FSName(opts.fs_name.replace(',', "_")),
        // As a kernel option rather than `MountOption::Subtype`: fuser's direct mount (as root)
        // drops `Subtype`, and the kernel needs it to show `fuse.imagefs`.
        MountOption::CUSTOM("subtype=imagefs".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
    ];
    // fuser mounts nosuid,nodev unless told otherwise: say it either way.
    config.mount_options.push(match opts.nosuid {
        true => MountOption::NoSuid,
        false => MountOption::Suid,
    });
    config.mount_options.push(match opts.nodev {
        true => MountOption::NoDev,
        false => MountOption::Dev,
    });
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    // One /dev/fuse fd per worker thread: no contention on a single fd's request queue. Not
    // for a connection that must outlive us: the kernel fails the unanswered requests of a
    // cloned fd when it closes (ECONNABORTED), where it keeps those of a shared one for
    // whoever holds it.
    config.clone_fd = !opts.survivable;
    config
}

/// Why a mount failed, naming the real cause when it is `/dev/fuse` itself (fuser reports a
/// bare "permission denied" for a root-only device, for instance).
fn mount_error(mountpoint: &Path, source: io::Error) -> FsError {
    use std::os::unix::fs::MetadataExt as _;
    let mountpoint = mountpoint.to_path_buf();
    match std::fs::metadata("/dev/fuse") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => FsError::NoDevFuse { mountpoint },
        // SAFETY: access(2) on a constant NUL-terminated path; geteuid has no preconditions.
        Ok(m) if unsafe { libc::access(c"/dev/fuse".as_ptr(), libc::R_OK | libc::W_OK) } != 0 => {
            FsError::DevFuseDenied {
                mountpoint,
                uid: unsafe { libc::geteuid() },
                mode: m.mode() & 0o7777,
                owner: m.uid(),
            }
        }
        _ => FsError::Mount { mountpoint, source },
    }
}

/// A live mount whose requests are not served yet.
pub struct Mounted {
    session: fuser::Session<ImageFs>,
    mountpoint: PathBuf,
    unmounter: Unmounter,
    negotiated: Option<Negotiated>,
    persist: Option<Arc<Persist>>,
}

impl Mounted {
    fn new(
        session: fuser::Session<ImageFs>,
        mountpoint: PathBuf,
        unmounter: Unmounter,
        negotiated: Option<Negotiated>,
        persist: Option<Arc<Persist>>,
    ) -> Mounted {
        if let Some(p) = &persist {
            let _ = p.fuse.set(session.as_fd().as_raw_fd());
        }
        Mounted {
            session,
            mountpoint,
            unmounter,
            negotiated,
            persist,
        }
    }

    /// What another process needs to take this mount over: copies of the connection's fd
    /// and of the open-file table's (for a `survivable` mount).
    pub fn handoff(&self) -> io::Result<Handoff> {
        let negotiated = self
            .negotiated
            .ok_or_else(|| io::Error::other("the mount's INIT was not seen"))?;
        Ok(Handoff {
            fuse: self.session.as_fd().try_clone_to_owned()?,
            negotiated,
            open_state: match &self.persist {
                Some(p) => Some(p.state.fd().try_clone_to_owned()?),
                None => None,
            },
        })
    }

    /// Whether reads of complete files go through kernel passthrough.
    pub fn passthrough(&self) -> bool {
        self.negotiated.is_some_and(|n| {
            fuser::InitFlags::from_bits_retain(n.granted)
                .contains(fuser::InitFlags::FUSE_PASSTHROUGH)
        })
    }

    /// A handle that unmounts this mount from any thread.
    pub fn unmounter(&self) -> Unmounter {
        self.unmounter.clone()
    }

    /// Serve requests until the mount goes away; returns after the kernel session ended (and
    /// after requests still waiting on the backend returned).
    pub fn run(self) -> Result<(), FsError> {
        let Mounted {
            session,
            mountpoint,
            ..
        } = self;
        match session.run() {
            Ok(()) => {}
            // After an unmount, a worker blocked on its cloned /dev/fuse fd can see the
            // connection aborted instead of ENODEV (which fuser treats as the normal end).
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
                tracing::debug!(mountpoint = %mountpoint.display(), "connection aborted at unmount");
            }
            Err(source) => {
                return Err(FsError::Session {
                    mountpoint: mountpoint.clone(),
                    source,
                });
            }
        }
        tracing::debug!(mountpoint = %mountpoint.display(), "session ended");
        Ok(())
    }
}

/// Kernel readahead for a mount whose reads we serve ourselves (no passthrough): the default
/// 128 KiB makes a sequential read a stream of small requests; 4 MiB lets the kernel send
/// full-size (1 MiB) reads several at a time. Measured on a cold 1 GiB read: 0.61–0.70 s at
/// 128 KiB, 0.41–0.43 s at 4 MiB. Best effort: without the sysfs knob, reads still work.
fn raise_read_ahead(mountpoint: &Path) {
    const READ_AHEAD_KB: u32 = 4096;
    let Ok(Some(dev)) = mount_device(mountpoint) else {
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, format!("{READ_AHEAD_KB}\n")) {
        tracing::debug!(%knob, "not raising readahead: {e}");
    }
}

/// Unmounts a [`Mounted`] from another thread (`Clone`, `Send`, `Sync`). Call it from an
/// ordinary thread or task that waits for the signal — not from inside an async signal handler:
/// it makes system calls and may run `fusermount3`.
#[derive(Clone)]
pub struct Unmounter {
    /// fuser's, for a mount this process made; a taken-over one is unmounted by path.
    inner: Arc<Mutex<Option<fuser::SessionUnmounter>>>,
    mountpoint: PathBuf,
}

impl Unmounter {
    /// Unmount; `run` then returns. If the mount is busy (a process has its cwd or a file open
    /// in it), detach it lazily: it disappears from the namespace now, and `run` returns once
    /// the last user left. Unmounting twice, or after an external `umount`, is fine.
    pub fn unmount(&self) -> Result<(), FsError> {
        let first = match &mut *self.inner.lock().unwrap() {
            Some(u) => u.unmount(),
            None => unmount_path(&self.mountpoint),
        };
        match first {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::info!(
                    mountpoint = %self.mountpoint.display(),
                    "mount busy; detached lazily, serving until its last user leaves"
                );
                lazy_unmount(&self.mountpoint).map_err(|cause| FsError::Unmount {
                    mountpoint: self.mountpoint.clone(),
                    cause,
                })
            }
            Err(cause) => Err(FsError::Unmount {
                mountpoint: self.mountpoint.clone(),
                cause,
            }),
        }
    }
}

/// Detach the imagefs mount at `mountpoint`, if mountinfo shows one there (and nothing else:
/// any other filesystem is left alone): for a front end cleaning up after a previous run of
/// its own, whose daemon is gone. `mountpoint` must be absolute and resolved. Returns whether
/// there was one.
pub fn detach_imagefs(mountpoint: &Path) -> io::Result<bool> {
    match mount_at(mountpoint)? {
        Some(e) if e.is_imagefs() => lazy_unmount(mountpoint).map(|()| true),
        _ => Ok(false),
    }
}

/// Unmount the imagefs mount at `mountpoint` (resolved): `umount2` as root, else
/// `fusermount3 -u`, which checks the caller mounted it. EBUSY when in use.
pub fn unmount_path(mountpoint: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    match mount_at(mountpoint)? {
        Some(e) if e.is_imagefs() => {}
        _ => return Err(io::Error::other("not an imagefs mount")),
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(path.as_ptr(), libc::UMOUNT_NOFOLLOW) } == 0 {
            return Ok(());
        }
        return Err(io::Error::last_os_error());
    }
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    if msg.contains("busy") {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    Err(io::Error::other(msg.trim().to_owned()))
}

/// `umount -l` (as root; `fusermount3 -uz` for others).
pub(crate) fn lazy_unmount(mountpoint: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let out = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(mountpoint)
            .output()?;
        return match out.status.success() {
            true => Ok(()),
            false => Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            )),
        };
    }
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path; umount2 does not retain it.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
