//! Open-file bookkeeping of the filesystem, as fuser's `examples/passthrough.rs` keeps its
//! `BackingCache`: regular files open through OPEN (one entry per inode, counted handles) and
//! the fds of zero-message opens (a bounded LRU). Both are std `Mutex`es held for a map
//! operation only: files are opened by the caller's closures outside the locks, and files and
//! backing ids are dropped after unlocking.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use fuser::{BackingId, INodeNo};
use lru::LruCache;

use super::open_state::{OpenState, close_backing};
use crate::layer::index::DataRef;

/// Backing files kept open for handle-less reads.
const FD_CACHE: usize = 1024;

pub(super) struct OpenTable {
    /// Regular files currently open, by FUSE inode: one entry however many times an inode is
    /// open, so a file costs one fd and — with passthrough — one backing id, which the kernel
    /// requires (it refuses two different backing files, or passthrough mixed with cached I/O,
    /// on one inode).
    open: Mutex<HashMap<INodeNo, Counted>>,
    /// Without passthrough, opens are not worth a round trip each: `open` answers ENOSYS and
    /// the kernel stops sending OPEN, FLUSH and RELEASE (FUSE's zero-message open, with the
    /// page cache kept). Reads then arrive with file handle 0 and find their backing file
    /// here: a bounded LRU of open fds by inode (the fd limit is finite; a closed one is
    /// reopened on its next cold read).
    files: Mutex<LruCache<INodeNo, Arc<File>>>,
    /// The passthrough entries mirrored where the next server finds them (mounts that survive
    /// their server, see `open_state`).
    persist: Option<Arc<Persist>>,
}

/// The backing id of a mirrored entry read with pread (the kernel's ids start at 1).
pub(crate) const NO_BACKING: u32 = 0;

/// The shared-memory mirror of the open entries, and the connection's fd for closing the
/// backing ids a previous server registered.
pub(crate) struct Persist {
    pub(crate) state: OpenState,
    /// Set once the session exists (before any request is served).
    pub(crate) fuse: OnceLock<RawFd>,
}

impl Persist {
    pub(crate) fn new(state: OpenState) -> Arc<Persist> {
        Arc::new(Persist {
            state,
            fuse: OnceLock::new(),
        })
    }

    /// The handle count of an entry, mirrored (or dropped at zero). Entries read with pread
    /// are mirrored too, with backing id 0: the kernel refuses passthrough on an inode while
    /// it has cached-I/O opens, so the next server must not use it for that inode either.
    fn mirror(&self, ino: INodeNo, file: &OpenFile, handles: u64) {
        let raw = file.backing_raw.unwrap_or(NO_BACKING);
        if handles == 0 {
            self.state.remove(ino.0);
        } else if !self
            .state
            .set(ino.0, raw, handles.min(u64::from(u32::MAX)) as u32)
        {
            tracing::warn!(
                ino = ino.0,
                "open-file table full: the next server will not know this file is open"
            );
        }
    }

    /// A RELEASE for a handle a previous server opened: one fewer, and the backing id closed
    /// with the last.
    fn release_inherited(&self, ino: INodeNo) {
        let Some((id, handles)) = self.state.get(ino.0) else {
            return;
        };
        if handles > 1 {
            self.state.set(ino.0, id, handles - 1);
            return;
        }
        self.state.remove(ino.0);
        if id == NO_BACKING {
            return;
        }
        if let Some(&fd) = self.fuse.get() {
            // SAFETY: the session's fd, open for the session's whole life (which this request
            // is part of).
            let fuse = unsafe { BorrowedFd::borrow_raw(fd) };
            if let Err(e) = close_backing(fuse, id) {
                tracing::debug!(ino = ino.0, id, "closing an inherited backing id: {e}");
            }
        }
    }
}

pub(super) struct OpenFile {
    /// The backing file for pread; `None` in passthrough mode, where the kernel holds its own
    /// reference through the backing id and reads never reach us.
    pub file: Option<Arc<File>>,
    pub backing: Option<Arc<BackingId>>,
    /// `backing`'s number, for the mirror.
    pub backing_raw: Option<u32>,
    pub size: u64,
    pub layer: u32,
    pub data: DataRef,
    /// The backing file held all of the content at open; when not, reads ask the backend to
    /// make their range local first.
    pub complete: bool,
}

/// An open entry and how many handles share it.
struct Counted {
    file: OpenFile,
    handles: u64,
}

/// What a read of an open file needs.
pub(super) struct Readable {
    pub file: Arc<File>,
    pub size: u64,
    pub layer: u32,
    pub data: DataRef,
    pub complete: bool,
}

impl OpenTable {
    pub(super) fn new(persist: Option<Arc<Persist>>) -> OpenTable {
        OpenTable {
            open: Mutex::new(HashMap::new()),
            files: Mutex::new(LruCache::new(
                NonZeroUsize::new(FD_CACHE).expect("not zero"),
            )),
            persist,
        }
    }

    /// One more handle on `ino`: its open entry's backing id, the entry made by `make` (called
    /// without the lock) when the inode is not open. `make` gets the backing id a previous
    /// server left open on the inode, if any: the entry must use that one ([`NO_BACKING`]:
    /// no passthrough while the previous server's pread handles are open). When another
    /// thread opened the inode meanwhile, its entry is shared and ours dropped.
    pub(super) fn open<E>(
        &self,
        ino: INodeNo,
        make: impl FnOnce(Option<u32>) -> Result<OpenFile, E>,
    ) -> Result<Option<Arc<BackingId>>, E> {
        let inherited = {
            let mut open = self.open.lock().unwrap();
            if let Some(o) = open.get_mut(&ino) {
                o.handles += 1;
                self.mirror(ino, &o.file, o.handles);
                return Ok(o.file.backing.clone());
            }
            self.persist.as_ref().and_then(|p| p.state.get(ino.0))
        };
        let file = make(inherited.map(|(id, _)| id))?;
        let backing = file.backing.clone();
        let mut open = self.open.lock().unwrap();
        match open.entry(ino) {
            // Another thread opened the same inode meanwhile: use its file and backing id (ours
            // are dropped after the lock, below).
            Entry::Occupied(mut e) => {
                e.get_mut().handles += 1;
                let o = e.get();
                self.mirror(ino, &o.file, o.handles);
                let backing = o.file.backing.clone();
                drop(open);
                drop(file);
                Ok(backing)
            }
            Entry::Vacant(v) => {
                // The previous server's handles on an inherited id count too.
                let handles = 1 + match inherited {
                    Some((id, n)) if id == file.backing_raw.unwrap_or(NO_BACKING) => u64::from(n),
                    _ => 0,
                };
                self.mirror(ino, &file, handles);
                v.insert(Counted { file, handles });
                Ok(backing)
            }
        }
    }

    fn mirror(&self, ino: INodeNo, file: &OpenFile, handles: u64) {
        if let Some(p) = &self.persist {
            p.mirror(ino, file, handles);
        }
    }

    /// The file to read `ino` through, when it is open for pread (not passthrough).
    pub(super) fn readable(&self, ino: INodeNo) -> Option<Readable> {
        let open = self.open.lock().unwrap();
        let o = &open.get(&ino)?.file;
        Some(Readable {
            file: o.file.clone()?,
            size: o.size,
            layer: o.layer,
            data: o.data,
            complete: o.complete,
        })
    }

    /// One handle on `ino` closed; the last one closes the file and backing id.
    pub(super) fn release(&self, ino: INodeNo) {
        let closed = {
            let mut open = self.open.lock().unwrap();
            match open.get_mut(&ino) {
                Some(o) if o.handles > 1 => {
                    o.handles -= 1;
                    self.mirror(ino, &o.file, o.handles);
                    None
                }
                Some(o) => {
                    self.mirror(ino, &o.file, 0);
                    open.remove(&ino)
                }
                None => {
                    if let Some(p) = &self.persist {
                        p.release_inherited(ino);
                    }
                    None
                }
            }
        };
        // Closes the fd / backing id outside the lock.
        drop(closed);
    }

    /// The backing file of `ino` for a read without a file handle: from the fd cache, or
    /// opened by `open` (called without the lock) and cached.
    pub(super) fn handle_less<E>(
        &self,
        ino: INodeNo,
        open: impl FnOnce() -> Result<File, E>,
    ) -> Result<Arc<File>, E> {
        if let Some(f) = self.files.lock().unwrap().get(&ino) {
            return Ok(f.clone());
        }
        let file = Arc::new(open()?);
        // A race with another reader costs one extra open; the last insert wins.
        let evicted = self.files.lock().unwrap().push(ino, file.clone());
        drop(evicted);
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn entry(size: u64) -> Result<OpenFile, ()> {
        Ok(OpenFile {
            file: Some(Arc::new(File::open("/dev/null").unwrap())),
            backing: None,
            backing_raw: None,
            size,
            layer: 0,
            data: DataRef { id: 0 },
            complete: true,
        })
    }

    #[test]
    fn one_entry_per_inode_until_the_last_handle_closes() {
        let t = OpenTable::new(None);
        let ino = INodeNo(7);
        assert!(t.readable(ino).is_none());
        assert!(matches!(t.open(ino, |_| entry(10)), Ok(None)));
        // A second open shares the entry: `make` is not called.
        assert!(matches!(
            t.open(ino, |_| -> Result<OpenFile, ()> { panic!("opened twice") }),
            Ok(None)
        ));
        assert_eq!(t.readable(ino).unwrap().size, 10);
        t.release(ino);
        assert_eq!(t.readable(ino).unwrap().size, 10);
        t.release(ino);
        assert!(t.readable(ino).is_none());
        t.release(ino);
        // A failed open records nothing.
        assert!(matches!(
            t.open(ino, |_| Err::<OpenFile, _>("gone")),
            Err("gone")
        ));
        assert!(t.readable(ino).is_none());
    }

    #[test]
    fn a_second_server_sees_the_first_ones_open_files_and_counts_their_handles() {
        let state = OpenState::create().unwrap();
        let first = OpenTable::new(Some(Persist::new(
            OpenState::attach(state.fd().try_clone_to_owned().unwrap()).unwrap(),
        )));
        let ino = INodeNo(9);
        // Opened twice with pread by the first server, which then dies.
        for _ in 0..2 {
            assert!(
                first
                    .open(ino, |inherited| {
                        assert_eq!(inherited, None);
                        entry(10)
                    })
                    .is_ok()
            );
        }
        assert_eq!(state.get(9), Some((NO_BACKING, 2)));
        drop(first);
        let second = OpenTable::new(Some(Persist::new(state)));
        // Its next open learns the inode is open without passthrough, and adds its handle.
        let mut told = None;
        assert!(
            second
                .open(ino, |inherited| {
                    told = Some(inherited);
                    entry(10)
                })
                .is_ok()
        );
        assert_eq!(told, Some(Some(NO_BACKING)));
        let persist = second.persist.as_ref().unwrap();
        assert_eq!(persist.state.get(9), Some((NO_BACKING, 3)));
        for left in [2, 1] {
            second.release(ino);
            assert_eq!(persist.state.get(9), Some((NO_BACKING, left)));
        }
        second.release(ino);
        assert_eq!(
            persist.state.get(9),
            None,
            "the last handle removes the entry"
        );
        assert!(second.readable(ino).is_none());
    }

    #[test]
    fn handle_less_reads_reuse_the_cached_fd() {
        let t = OpenTable::new(None);
        let ino = INodeNo(3);
        let first = t.handle_less(ino, || File::open("/dev/null")).unwrap();
        let again = t
            .handle_less(ino, || -> io::Result<File> { panic!("reopened") })
            .unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(t.readable(ino).is_none(), "handle-less reads are not opens");
    }
}
