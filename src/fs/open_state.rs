//! The files a server has open through OPEN, for the server after it.
//!
//! A backing id belongs to the FUSE connection, not to the process: files opened with it keep
//! reading through the kernel after their server died. The kernel also refuses a second,
//! different backing id on an inode that still has passthrough files open (EBUSY), and
//! passthrough on an inode that has files open for cached I/O (and the reverse), so a new
//! server must open such an inode the way it is open already — with the id in use, or
//! without passthrough (id 0) — and close that id when the last handle goes. This table is
//! where it finds them: inode → (backing id or 0, open handles), in a memfd the keeper holds
//! and hands to each new server, mapped shared.
//!
//! Layout: a 64-byte header (magic, version, slot count), then [`SLOTS`] 16-byte slots
//! `{ino: u64, backing: u32, handles: u32}`, open addressing with linear probing; `ino` 0 is
//! an empty slot, `u64::MAX` a removed one. One process writes at a time (the live server,
//! under its open table's lock). A slot's fields are written before its `ino` is published,
//! so a server killed mid-update leaves either the old entry or the new one; at worst a
//! count one too high, which keeps a backing id registered until the mount ends.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"IMGFSOPN");
const VERSION: u32 = 1;
/// Inodes open at once that a restart keeps track of; beyond, a warning (a later open of such
/// an inode by the next server may be refused by the kernel).
pub(crate) const SLOTS: usize = 1 << 16;
const HEADER: usize = 64;
const SLOT: usize = 16;
const SIZE: usize = HEADER + SLOTS * SLOT;
const EMPTY: u64 = 0;
const REMOVED: u64 = u64::MAX;

pub struct OpenState {
    fd: OwnedFd,
    base: *mut u8,
}

// SAFETY: the mapping is plain shared memory accessed through atomics only.
unsafe impl Send for OpenState {}
unsafe impl Sync for OpenState {}

#[repr(C)]
struct Slot {
    ino: AtomicU64,
    backing: AtomicU32,
    handles: AtomicU32,
}

impl OpenState {
    /// A new, empty table in a fresh memfd.
    pub fn create() -> io::Result<OpenState> {
        // SAFETY: a constant NUL-terminated name; the fd is checked below.
        let fd = unsafe { libc::memfd_create(c"imagefs-open-files".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), SIZE as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let state = OpenState::map(fd)?;
        state.header(1).store(
            u64::from(VERSION) | ((SLOTS as u64) << 32),
            Ordering::Relaxed,
        );
        state.header(0).store(MAGIC, Ordering::Release);
        Ok(state)
    }

    /// The table a previous server left in `fd`.
    pub fn attach(fd: OwnedFd) -> io::Result<OpenState> {
        // SAFETY: fstat into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if st.st_size as usize != SIZE {
            return Err(io::Error::other("open-file table of another size"));
        }
        let state = OpenState::map(fd)?;
        let want = u64::from(VERSION) | ((SLOTS as u64) << 32);
        if state.header(0).load(Ordering::Acquire) != MAGIC
            || state.header(1).load(Ordering::Relaxed) != want
        {
            return Err(io::Error::other("not an open-file table of this version"));
        }
        Ok(state)
    }

    fn map(fd: OwnedFd) -> io::Result<OpenState> {
        // SAFETY: a shared mapping of the whole memfd, unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(OpenState {
            fd,
            base: base.cast(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn header(&self, word: usize) -> &AtomicU64 {
        // SAFETY: within the header, 8-aligned (mmap is page-aligned).
        unsafe { &*self.base.add(word * 8).cast::<AtomicU64>() }
    }

    fn slot(&self, i: usize) -> &Slot {
        // SAFETY: i < SLOTS, so within the mapping; slots are 16-aligned.
        unsafe { &*self.base.add(HEADER + (i % SLOTS) * SLOT).cast::<Slot>() }
    }

    fn home(ino: u64) -> usize {
        (ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as usize
    }

    /// The slot holding `ino`.
    fn find(&self, ino: u64) -> Option<&Slot> {
        let start = Self::home(ino);
        for i in start..start + SLOTS {
            let s = self.slot(i);
            match s.ino.load(Ordering::Acquire) {
                EMPTY => return None,
                x if x == ino => return Some(s),
                _ => {}
            }
        }
        None
    }

    /// `ino`'s backing id and handle count, if it has an entry.
    pub fn get(&self, ino: u64) -> Option<(u32, u32)> {
        self.find(ino).map(|s| {
            (
                s.backing.load(Ordering::Relaxed),
                s.handles.load(Ordering::Relaxed),
            )
        })
    }

    /// Record `ino` with `backing` and `handles`; false when the table is full.
    pub fn set(&self, ino: u64, backing: u32, handles: u32) -> bool {
        debug_assert!(ino != EMPTY && ino != REMOVED);
        if let Some(s) = self.find(ino) {
            s.backing.store(backing, Ordering::Relaxed);
            s.handles.store(handles, Ordering::Release);
            return true;
        }
        let start = Self::home(ino);
        for i in start..start + SLOTS {
            let s = self.slot(i);
            let cur = s.ino.load(Ordering::Relaxed);
            if cur == EMPTY || cur == REMOVED {
                s.backing.store(backing, Ordering::Relaxed);
                s.handles.store(handles, Ordering::Relaxed);
                s.ino.store(ino, Ordering::Release);
                return true;
            }
        }
        false
    }

    pub fn remove(&self, ino: u64) {
        if let Some(s) = self.find(ino) {
            s.ino.store(REMOVED, Ordering::Release);
        }
    }
}

impl Drop for OpenState {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.base.cast(), SIZE) };
    }
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`. For ids a previous server opened,
/// which fuser's `BackingId` cannot own without a reply to wrap them in.
pub(crate) fn close_backing(fuse: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = (1 << 30) | (4 << 16) | (229 << 8) | 2;
    // SAFETY: the ioctl reads one u32 from a valid pointer.
    if unsafe { libc::ioctl(fuse.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE, &id) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_into_a_second_mapping_and_removal_keeps_probing_chains() {
        let a = OpenState::create().unwrap();
        // Colliding homes are probable among many inodes; removal must not cut a chain.
        for ino in 1..=5000u64 {
            assert!(a.set(ino, ino as u32 * 2, 1));
        }
        assert!(a.set(42, 7, 3), "update in place");
        for ino in (1..=5000u64).step_by(2) {
            a.remove(ino);
        }
        let b = OpenState::attach(a.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(b.get(42), Some((7, 3)));
        for ino in 1..=5000u64 {
            let want = match ino {
                42 => Some((7, 3)),
                _ => (ino % 2 == 0).then_some((ino as u32 * 2, 1)),
            };
            assert_eq!(b.get(ino), want, "{ino}");
        }
        assert!(b.set(1, 9, 1), "a removed slot is reused");
        assert_eq!(a.get(1), Some((9, 1)), "one table, two mappings");
    }

    #[test]
    fn a_foreign_memfd_is_refused() {
        // SAFETY: as in create().
        let fd = unsafe { libc::memfd_create(c"x".as_ptr(), libc::MFD_CLOEXEC) };
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        assert!(OpenState::attach(fd).is_err());
    }
}
