//! The `fuser::Filesystem` over the merged tree: lookups, attributes, listings, reads (pread or
//! kernel passthrough), xattrs, and EROFS for everything that would change the image.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, CopyFileRangeFlags, FileAttr, FileHandle, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode,
    OpenFlags, PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::Backend;
use super::attr::{BLKSIZE, TTL, id_of, inode_attr, placeholder_root_attr};
use super::errno::OpError;
use super::meta::{self, MetaTable, Sized};
use super::open::{NO_BACKING, OpenFile, OpenTable, Persist, Readable};
use super::record::Recorder;
use super::session::Negotiated;
use crate::layer::index::DataRef;
use crate::overlay::{Content, Inode, InodeId, ROOT, Tree};

/// Largest read and write the kernel may send. Reads are served from one buffer of this size per
/// worker thread.
const MAX_IO: u32 = 1 << 20;

/// Pending background requests (readahead, async reads) the kernel may queue before throttling.
const MAX_BACKGROUND: u16 = 256;

/// `fh` of opens that need no backing file: meta files and empty files.
const FH_NONE: FileHandle = FileHandle(0);
/// `fh` of opens recorded in the `ImageFs::open` table (keyed by inode, see [`OpenTable`]).
const FH_OPEN: FileHandle = FileHandle(1);

/// Page cache kept across opens (the content never changes); no FLUSH on close (nothing to
/// flush).
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);
/// Passthrough opens: the kernel rejects (EIO to the caller) any flag outside
/// `FOPEN_PASSTHROUGH_MASK` (passthrough, direct_io, parallel direct writes, noflush), so no
/// KEEP_CACHE — there is no FUSE page cache to keep anyway, reads go to the backing file's.
const PASSTHROUGH_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// How long the root's placeholder attributes (served before the tree exists) may be cached:
/// not at all, so the real ones replace them as soon as the tree is there.
const PLACEHOLDER_TTL: Duration = Duration::ZERO;

pub(crate) struct ImageFs {
    backend: Arc<dyn Backend>,
    meta: MetaTable,
    /// statfs totals, computed once from the tree.
    totals: OnceLock<Totals>,
    /// Passthrough asked for by the caller.
    want_passthrough: bool,
    /// Passthrough granted by the kernel at init (written once in `init`, before any other
    /// request).
    passthrough: bool,
    /// Regular files open through OPEN, and the fds of zero-message opens.
    open: OpenTable,
    /// `mount --record`.
    record: Option<Recorder>,
    /// The INIT exchange: what a replayed one may grant, and what this one agreed to.
    handshake: Arc<Handshake>,
}

/// What `init` may take when it replays a previous server's INIT, and what it took.
#[derive(Default)]
pub(crate) struct Handshake {
    /// Replaying: only these capabilities of ours may be taken (the first server's).
    pub(crate) resume: Option<Negotiated>,
    /// Filled by `init`.
    pub(crate) result: Mutex<Option<Negotiated>>,
}

#[derive(Clone, Copy)]
struct Totals {
    blocks: u64,
    files: u64,
}

thread_local! {
    /// Read buffer of this worker thread, grown to the largest request seen (at most MAX_IO).
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl ImageFs {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        meta: MetaTable,
        passthrough: bool,
        record: Option<Recorder>,
        persist: Option<Arc<Persist>>,
        handshake: Arc<Handshake>,
    ) -> ImageFs {
        ImageFs {
            record,
            backend,
            meta,
            totals: OnceLock::new(),
            want_passthrough: passthrough,
            passthrough: false,
            open: OpenTable::new(persist),
            handshake,
        }
    }

    /// The tree, from the backend (which keeps it; the first call blocks until it is built).
    /// Failures are not kept: the next request asks again.
    fn tree(&self) -> Result<&Tree, OpError> {
        self.backend.tree().map_err(OpError::Tree)
    }

    /// `mount --record`: a file of the image (not a meta file) is opened or read.
    fn record_access(&self, ino: INodeNo) {
        if let Some(r) = &self.record
            && self.meta.by_ino(ino).is_none()
        {
            r.accessed(ino);
        }
    }

    /// The tree inode behind `ino`.
    fn inode(&self, ino: INodeNo) -> Result<(&Tree, InodeId, &Inode), OpError> {
        let tree = self.tree()?;
        let id = id_of(ino).ok_or(OpError::NotFound)?;
        let inode = tree.get(id).ok_or(OpError::NotFound)?;
        Ok((tree, id, inode))
    }

    fn lookup_attr(&self, parent: INodeNo, name: &[u8]) -> Result<FileAttr, OpError> {
        if parent == INodeNo::ROOT
            && let Some(i) = self.meta.by_name(name)
        {
            return Ok(self.meta.attr(i));
        }
        let (tree, dir, inode) = self.inode(parent)?;
        if !matches!(inode.content, Content::Dir { .. }) {
            return Err(OpError::NotDir);
        }
        let id = tree.lookup(dir, name).ok_or(OpError::NotFound)?;
        let child = tree.get(id).ok_or(OpError::NotFound)?;
        Ok(inode_attr(id, child))
    }

    /// Attributes and how long they may be cached.
    fn getattr_ttl(&self, ino: INodeNo) -> Result<(FileAttr, Duration), OpError> {
        if let Some(i) = self.meta.by_ino(ino) {
            return Ok((self.meta.attr(i), TTL));
        }
        // `stat` of the mountpoint must not start fetching every layer: until something else
        // needed the tree (or the backend had it without fetching), the root is a plain 0755
        // directory, not cached.
        if ino == INodeNo::ROOT && self.backend.built_tree().is_none() {
            return Ok((placeholder_root_attr(), PLACEHOLDER_TTL));
        }
        let (_, id, inode) = self.inode(ino)?;
        Ok((inode_attr(id, inode), TTL))
    }

    /// Walk the listing of directory `ino` from `offset`, calling `emit(next_offset, name,
    /// attr)` until it reports a full buffer. Entry `n` has offset `n + 1`; the numbering is
    /// fixed (".", "..", at the root the meta files, then the children by name) and stays valid
    /// because the tree never changes. Root children shadowed by a meta file keep their number
    /// but are not emitted.
    fn list(
        &self,
        ino: INodeNo,
        offset: u64,
        mut emit: impl FnMut(u64, &OsStr, &FileAttr) -> bool,
    ) -> Result<(), OpError> {
        let (tree, id, inode) = self.inode(ino)?;
        let Content::Dir { parent, .. } = &inode.content else {
            return Err(OpError::NotDir);
        };
        let children = tree.children(inode);
        let metas = if id == ROOT { self.meta.count() } else { 0 };
        let prefix = 2 + metas as u64;
        let end = prefix + children.len() as u64;
        for n in offset..end {
            let full = match n {
                0 => emit(1, OsStr::new("."), &inode_attr(id, inode)),
                1 => {
                    let p = tree.get(*parent).ok_or(OpError::NotFound)?;
                    emit(2, OsStr::new(".."), &inode_attr(*parent, p))
                }
                n if n < prefix => {
                    let i = (n - 2) as usize;
                    emit(n + 1, OsStr::from_bytes(meta::NAMES[i]), &self.meta.attr(i))
                }
                n => {
                    let entry = &children[(n - prefix) as usize];
                    let (name, child) = (tree.name(entry), entry.ino);
                    if metas > 0 && self.meta.by_name(name).is_some() {
                        continue;
                    }
                    let node = tree.get(child).ok_or(OpError::NotFound)?;
                    emit(n + 1, OsStr::from_bytes(name), &inode_attr(child, node))
                }
            };
            if full {
                break;
            }
        }
        Ok(())
    }

    fn xattrs(&self, ino: INodeNo) -> Result<&[crate::layer::index::Xattr], OpError> {
        if self.meta.by_ino(ino).is_some() {
            return Ok(&[]);
        }
        let (_, _, inode) = self.inode(ino)?;
        Ok(&inode.meta.xattrs)
    }

    fn totals(&self) -> Option<Totals> {
        let tree = self.backend.built_tree()?;
        Some(*self.totals.get_or_init(|| {
            let blocks = tree
                .inodes
                .iter()
                .map(|i| match i.content {
                    Content::File { size, .. } => size.div_ceil(u64::from(BLKSIZE)),
                    _ => 0,
                })
                .sum();
            Totals {
                blocks,
                files: (tree.inodes.len() + self.meta.count()) as u64,
            }
        }))
    }

    /// Open regular file `ino` (content `data` of `layer`): share the inode's open entry, or
    /// fetch the file from the backend and make one.
    fn open_data(
        &self,
        reply: &ReplyOpen,
        ino: INodeNo,
        layer: u32,
        data: DataRef,
        size: u64,
    ) -> Result<Option<Arc<BackingId>>, OpError> {
        self.open.open(ino, |inherited| {
            let file = self.backing_file(layer, data)?;
            let complete = self.backend.is_complete(layer, data);
            // Passthrough reads never reach us, so only complete files may use it. An inode a
            // previous server left open with passthrough must keep its backing id (the kernel
            // refuses another one while those files are open).
            let backing_raw = match inherited {
                // Its pread handles are still open: no passthrough on this inode yet.
                Some(NO_BACKING) => None,
                Some(id) => Some(id),
                None if self.passthrough && complete => match reply.open_backing(&file) {
                    Ok(id) => Some(id.into_raw()),
                    Err(e) => {
                        // e.g. EPERM without CAP_SYS_ADMIN, or a backing file on a stacked fs.
                        tracing::debug!(ino = ino.0, "passthrough unavailable, using pread: {e}");
                        None
                    }
                },
                None => None,
            };
            // SAFETY: the id is open on this connection (just registered, or kept open by the
            // previous server for files still open) and is closed only by this BackingId.
            let backing = backing_raw.map(|raw| Arc::new(unsafe { reply.wrap_backing(raw) }));
            Ok(OpenFile {
                file: if backing.is_some() {
                    None
                } else {
                    Some(Arc::new(file))
                },
                backing,
                backing_raw,
                size,
                layer,
                data,
                complete,
            })
        })
    }

    fn do_open(
        &self,
        ino: INodeNo,
        flags: OpenFlags,
        reply: ReplyOpen,
    ) -> Result<(), (OpError, ReplyOpen)> {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return Err((OpError::ReadOnly, reply));
        }
        if self.meta.by_ino(ino).is_some() {
            reply.opened(FH_NONE, OPEN_FLAGS);
            return Ok(());
        }
        let (layer, data, size) = match self.inode(ino) {
            Ok((_, _, inode)) => match inode.content {
                Content::File { size, layer, data } => (layer, data, size),
                _ => return Err((OpError::NotFile, reply)),
            },
            Err(e) => return Err((e, reply)),
        };
        let Some(data) = data.filter(|_| size > 0) else {
            reply.opened(FH_NONE, OPEN_FLAGS);
            return Ok(());
        };
        match self.open_data(&reply, ino, layer, data, size) {
            Ok(Some(backing)) => reply.opened_passthrough(FH_OPEN, PASSTHROUGH_FLAGS, &backing),
            Ok(None) => reply.opened(FH_OPEN, OPEN_FLAGS),
            Err(e) => return Err((e, reply)),
        }
        Ok(())
    }

    /// The local file holding content `data` of `layer`. Blocks until the layer is local;
    /// other inodes keep being served meanwhile.
    fn backing_file(&self, layer: u32, data: DataRef) -> Result<File, OpError> {
        self.backend
            .open(layer, data)
            .map_err(|source| OpError::Data {
                layer,
                id: data.id,
                source,
            })
    }

    /// The backing file of `ino` for a read without a file handle, from the fd cache or
    /// opened now (which waits for the layer like `open` does).
    fn handle_less_file(
        &self,
        ino: INodeNo,
        layer: u32,
        data: DataRef,
    ) -> Result<Arc<File>, OpError> {
        self.open
            .handle_less(ino, || self.backing_file(layer, data))
    }

    fn do_read(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) -> Result<(), (OpError, ReplyData)> {
        if let Some(i) = self.meta.by_ino(ino) {
            reply.data(window(self.meta.content(i), offset, size));
            return Ok(());
        }
        let Readable {
            file,
            size: file_size,
            layer,
            data,
            complete,
        } = match (fh, self.open.readable(ino)) {
            (FH_OPEN, Some(f)) => f,
            // An empty file, a zero-message open (see `OpenTable::handle_less`), or a handle
            // opened by a previous server of this mount (handles carry no state of their own:
            // the file is found again from the inode).
            _ => {
                let (layer, data, size) = match self.inode(ino) {
                    Ok((_, _, inode)) => match inode.content {
                        Content::File {
                            size,
                            layer,
                            data: Some(data),
                        } if size > 0 => (layer, data, size),
                        _ => {
                            reply.data(&[]);
                            return Ok(());
                        }
                    },
                    Err(e) => return Err((e, reply)),
                };
                let file = match self.handle_less_file(ino, layer, data) {
                    Ok(f) => f,
                    Err(e) => return Err((e, reply)),
                };
                let complete = self.backend.is_complete(layer, data);
                Readable {
                    file,
                    size,
                    layer,
                    data,
                    complete,
                }
            }
        };
        let want = (size.min(MAX_IO) as u64).min(file_size.saturating_sub(offset)) as usize;
        if !complete
            && want > 0
            && let Err(source) = self.backend.ensure(layer, data, offset, want as u64)
        {
            return Err((
                OpError::Data {
                    layer,
                    id: data.id,
                    source,
                },
                reply,
            ));
        }
        READ_BUF.with_borrow_mut(|buf| {
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match pread_full(&file, &mut buf[..want], offset) {
                Ok(n) => {
                    reply.data(&buf[..n]);
                    Ok(())
                }
                Err(source) => Err((
                    OpError::Read {
                        layer,
                        id: data.id,
                        offset,
                        source,
                    },
                    reply,
                )),
            }
        })
    }
}

/// `size` bytes of `content` from `offset`, clipped to its end.
fn window(content: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(content.len());
    let end = start.saturating_add(size as usize).min(content.len());
    &content[start..end]
}

/// Fill `buf` from `offset`, stopping early only at end of file.
fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Our side of INIT: the capabilities asked for, each granted if the kernel has it and (when
/// replaying a previous server's INIT) that server had it too.
struct Asking<'a> {
    config: &'a mut KernelConfig,
    allowed: Option<InitFlags>,
    granted: InitFlags,
}

impl Asking<'_> {
    fn request(&mut self, flag: InitFlags) -> bool {
        if self.allowed.is_some_and(|a| !a.contains(flag)) {
            tracing::debug!("capability {flag:?} not taken: the mount's first server did not");
            return false;
        }
        match self.config.add_capabilities(flag) {
            Ok(()) => {
                self.granted |= flag;
                true
            }
            Err(_) => {
                tracing::debug!("kernel lacks FUSE capability {flag:?}");
                false
            }
        }
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Large requests: a 1 MiB read is one round trip. The readahead ceiling is the kernel's.
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        // The kernel's readahead: the ceiling a too-large request is refused with.
        let max_readahead = config.set_max_readahead(u32::MAX).unwrap_or_else(|max| max);
        let _ = config.set_max_readahead(max_readahead);
        let kernel = config.capabilities();
        let abi = config.kernel_abi();
        let resume = self.handshake.resume;
        let mut ask = Asking {
            config,
            allowed: resume.map(|n| InitFlags::from_bits_retain(n.granted)),
            granted: InitFlags::empty(),
        };
        ask.request(InitFlags::FUSE_ASYNC_READ);
        ask.request(InitFlags::FUSE_MAX_PAGES);
        // `ls -l` / `find` get attributes with the listing; the kernel picks per call.
        ask.request(InitFlags::FUSE_DO_READDIRPLUS);
        ask.request(InitFlags::FUSE_READDIRPLUS_AUTO);
        // Concurrent lookups in one directory (nothing here needs the directory lock).
        ask.request(InitFlags::FUSE_PARALLEL_DIROPS);
        // Symlink targets in the page cache: readlink once per link.
        ask.request(InitFlags::FUSE_CACHE_SYMLINKS);
        if self.want_passthrough {
            // Depth 1: backing files live on a plain local fs, and overlayfs may still stack
            // on top of this mount.
            self.passthrough = ask.request(InitFlags::FUSE_PASSTHROUGH)
                && ask.config.set_max_stack_depth(1).is_ok();
            tracing::debug!(granted = self.passthrough, "FUSE passthrough");
        }
        let negotiated = Negotiated {
            major: abi.0,
            minor: abi.1,
            max_readahead,
            kernel_flags: kernel.bits(),
            granted: ask.granted.bits(),
        };
        *self.handshake.result.lock().unwrap() = Some(negotiated);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_attr(parent, name.as_bytes()) {
            Ok(attr) => {
                if let Some(r) = &self.record {
                    r.looked_up(parent, name.as_bytes(), attr.ino);
                }
                reply.entry(&TTL, &attr, Generation(0))
            }
            Err(OpError::NotFound) => {
                tracing::trace!(parent = parent.0, ?name, "lookup: no such entry");
                // A negative entry (node id 0) with a TTL: the kernel caches the absence, so
                // `PATH` and library searches ask once.
                let mut negative = placeholder_root_attr();
                negative.ino = INodeNo(0);
                reply.entry(&TTL, &negative, Generation(0));
            }
            Err(e) => reply.error(e.errno("lookup", parent)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_ttl(ino) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e.errno("getattr", ino)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.inode(ino) {
            Ok((
                _,
                _,
                Inode {
                    content: Content::Symlink { target },
                    ..
                },
            )) => reply.data(target),
            Ok(_) => reply.error(OpError::NotSymlink.errno("readlink", ino)),
            Err(e) => reply.error(e.errno("readlink", ino)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.record_access(ino);
        // Without passthrough an OPEN buys nothing a read cannot do itself, and costs two
        // round trips per open(2) (OPEN, then RELEASE): ENOSYS tells the kernel to stop sending
        // them for this mount (it keeps the page cache, and enforces O_RDONLY itself on a
        // read-only mount). With passthrough the OPEN reply is what attaches the backing file.
        if !self.passthrough && flags.acc_mode() == OpenAccMode::O_RDONLY {
            reply.error(fuser::Errno::ENOSYS);
            return;
        }
        if let Err((e, reply)) = self.do_open(ino, flags, reply) {
            reply.error(e.errno("open", ino));
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.record_access(ino);
        if let Err((e, reply)) = self.do_read(ino, fh, offset, size, reply) {
            reply.error(e.errno("read", ino));
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush on a read-only filesystem: ENOSYS stops the kernel from sending FLUSH
        // at every close(2) of a zero-message open (see `open`).
        reply.error(fuser::Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh == FH_OPEN {
            self.open.release(ino);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The listing never changes: let the kernel cache it across opens.
        reply.opened(
            FH_NONE,
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.list(ino, offset, |next, name, attr| {
            reply.add(attr.ino, next, attr.kind, name)
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno("readdir", ino)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let listed = self.list(ino, offset, |next, name, attr| {
            reply.add(attr.ino, next, name, &TTL, attr, Generation(0))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno("readdirplus", ino)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Zeros until the tree exists: `df` must not fetch the image.
        let t = self.totals().unwrap_or(Totals {
            blocks: 0,
            files: 0,
        });
        reply.statfs(t.blocks, 0, 0, t.files, 0, BLKSIZE, 255, BLKSIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let found = self.xattrs(ino).and_then(|xattrs| {
            let x = xattrs
                .iter()
                .find(|x| x.name == name.as_bytes() && !meta::hidden_xattr(&x.name))
                .ok_or(OpError::NoAttr)?;
            Ok(meta::sized(&x.value, size))
        });
        match found {
            Ok(Sized::Size(n)) => reply.size(n),
            Ok(Sized::Data(v)) => reply.data(v),
            Ok(Sized::TooSmall) => reply.error(OpError::TooSmall.errno("getxattr", ino)),
            Err(e) => reply.error(e.errno("getxattr", ino)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.xattrs(ino).map(meta::xattr_names) {
            Ok(names) => match meta::sized(&names, size) {
                Sized::Size(n) => reply.size(n),
                Sized::Data(v) => reply.data(v),
                Sized::TooSmall => reply.error(OpError::TooSmall.errno("listxattr", ino)),
            },
            Err(e) => reply.error(e.errno("listxattr", ino)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Only called without `default_permissions`; modes are the kernel's business otherwise.
        if mask.contains(AccessFlags::W_OK) {
            reply.error(OpError::ReadOnly.errno("access", ino));
        } else {
            reply.ok();
        }
    }

    // Everything below would change the image: EROFS. The `ro` mount flag makes the VFS refuse
    // most of these before they get here; these answers cover the rest.

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(OpError::ReadOnly.errno("setattr", ino));
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(OpError::ReadOnly.errno("mknod", parent));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(OpError::ReadOnly.errno("mkdir", parent));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(OpError::ReadOnly.errno("unlink", parent));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(OpError::ReadOnly.errno("rmdir", parent));
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(OpError::ReadOnly.errno("symlink", parent));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(OpError::ReadOnly.errno("rename", parent));
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(OpError::ReadOnly.errno("link", ino));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(OpError::ReadOnly.errno("write", ino));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(OpError::ReadOnly.errno("create", parent));
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(OpError::ReadOnly.errno("setxattr", ino));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(OpError::ReadOnly.errno("removexattr", ino));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(OpError::ReadOnly.errno("fallocate", ino));
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(OpError::ReadOnly.errno("copy_file_range", ino_out));
    }

    // Not supported, answered without fuser's "not implemented" warnings: ENOSYS makes the
    // kernel fall back to its generic lseek / poll for good; ENOTTY is "no such ioctl".

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: ReplyLseek,
    ) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(fuser::Errno::ENOTTY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_clips_to_the_content() {
        let c = b"0123456789";
        let cases: [(u64, u32, &[u8]); 6] = [
            (0, 4, b"0123"),
            (8, 4, b"89"),
            (10, 4, b""),
            (11, 4, b""),
            (u64::MAX, 4, b""),
            (3, u32::MAX, b"3456789"),
        ];
        for (offset, size, want) in cases {
            assert_eq!(window(c, offset, size), want, "{offset}+{size}");
        }
    }

    /// A backend whose tree is "built" by the first `tree()`.
    struct Fixed(Tree, OnceLock<()>);

    impl Backend for Fixed {
        fn tree(&self) -> Result<&Tree, crate::fs::BackendError> {
            self.1.get_or_init(|| ());
            Ok(&self.0)
        }
        fn built_tree(&self) -> Option<&Tree> {
            self.1.get().map(|()| &self.0)
        }
        fn open(&self, _: u32, _: DataRef) -> Result<File, crate::fs::BackendError> {
            Err(crate::fs::BackendError::new("no data in this test"))
        }
    }

    fn dir(parent: InodeId) -> Inode {
        Inode {
            meta: crate::overlay::Meta {
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: Default::default(),
                xattrs: Box::default(),
            },
            nlink: 2,
            content: Content::dir(parent),
        }
    }

    /// Root: `.digest` (shadowed by the meta file), `a`, `b`; `b` is a directory.
    fn sample() -> ImageFs {
        let file = |size| Inode {
            content: Content::File {
                size,
                layer: 0,
                data: None,
            },
            ..dir(0)
        };
        let mut tree = Tree::new(vec![dir(ROOT), file(7), file(8), dir(ROOT)]);
        tree.set_children(ROOT, &[(b".digest", 1), (b"a", 2), (b"b", 3)]);
        let meta = MetaTable::new(Some(crate::fs::MetaFiles {
            config: b"{}".to_vec(),
            manifest: b"{}".to_vec(),
            digest: "sha256:d".into(),
            id: "sha256:i".into(),
        }));
        ImageFs::new(
            Arc::new(Fixed(tree, OnceLock::new())),
            meta,
            false,
            None,
            None,
            Arc::default(),
        )
    }

    fn listing(fs: &ImageFs, ino: u64, offset: u64, room: usize) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        fs.list(INodeNo(ino), offset, |next, name, _| {
            if out.len() == room {
                return true;
            }
            out.push((next, name.to_string_lossy().into_owned()));
            false
        })
        .unwrap();
        out
    }

    #[test]
    fn listing_offsets_are_stable_and_meta_files_shadow() {
        let fs = sample();
        let all: Vec<(u64, String)> = [
            (1, "."),
            (2, ".."),
            (3, ".config.json"),
            (4, ".manifest.json"),
            (5, ".digest"),
            (6, ".id"),
            // 7 is the image's own `.digest`, shadowed.
            (8, "a"),
            (9, "b"),
        ]
        .map(|(o, n)| (o, n.to_string()))
        .to_vec();
        assert_eq!(listing(&fs, 1, 0, usize::MAX), all);
        // Resuming at any returned offset continues right after that entry.
        for (k, (next, _)) in all.iter().enumerate() {
            assert_eq!(listing(&fs, 1, *next, usize::MAX), all[k + 1..]);
        }
        // A full buffer stops the walk.
        assert_eq!(listing(&fs, 1, 0, 2), all[..2]);
        assert_eq!(listing(&fs, 1, 6, usize::MAX), all[6..]);
        // Subdirectories: no meta files; `..` is the parent.
        let sub = listing(&fs, 4, 0, usize::MAX);
        assert_eq!(sub, [(1, ".".to_string()), (2, "..".to_string())]);
    }

    #[test]
    fn lookups_prefer_meta_files_and_root_attrs_wait_for_the_tree() {
        let fs = sample();
        let (attr, ttl) = fs.getattr_ttl(INodeNo::ROOT).unwrap();
        assert_eq!((attr.perm, ttl), (0o755, PLACEHOLDER_TTL));
        assert!(
            fs.backend.built_tree().is_none(),
            "getattr of the root fetched the tree"
        );
        assert!(fs.totals().is_none());

        let digest = fs.lookup_attr(INodeNo::ROOT, b".digest").unwrap();
        assert_eq!((digest.ino, digest.size), (MetaTable::ino(2), 9));
        assert!(
            fs.backend.built_tree().is_none(),
            "looking up a meta file fetched the tree"
        );

        assert_eq!(fs.lookup_attr(INodeNo::ROOT, b"a").unwrap().size, 8);
        assert!(matches!(
            fs.lookup_attr(INodeNo(2), b"x"),
            Err(OpError::NotDir)
        ));
        assert!(matches!(
            fs.lookup_attr(INodeNo::ROOT, b"zzz"),
            Err(OpError::NotFound)
        ));
        let (_, ttl) = fs.getattr_ttl(INodeNo::ROOT).unwrap();
        assert_eq!(ttl, TTL);
        let t = fs.totals().unwrap();
        assert_eq!((t.blocks, t.files), (2, 4 + 4));
    }
}
