//! Inode numbers and `stat` attributes: how tree inodes and meta files look to the kernel.
//! Pure conversions, no I/O.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::layer::index::Timespec;
use crate::overlay::{Content, Inode, InodeId, ROOT};

/// How long the kernel may cache entries, negative lookups and attributes. The image is
/// immutable, so the only limit is the kernel's memory pressure.
pub(crate) const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// `st_blksize`: the preferred I/O size.
pub(crate) const BLKSIZE: u32 = 4096;

/// FUSE inode of a tree inode. FUSE reserves 0 and requires the root to be 1, and tree ids
/// start at the root = 0, so the mapping is `id + 1`; tree ids are `u32`, so tree inodes never
/// reach the meta files' numbers at the top of the `u64` range.
pub(crate) fn ino_of(id: InodeId) -> INodeNo {
    INodeNo(u64::from(id) + 1)
}

/// Tree inode of a FUSE inode, `None` for numbers no tree inode maps to (0, meta files).
pub(crate) fn id_of(ino: INodeNo) -> Option<InodeId> {
    ino.0
        .checked_sub(1)
        .and_then(|id| InodeId::try_from(id).ok())
}

const _: () = assert!(ROOT == 0, "ino_of assumes the root is tree inode 0");

/// Linux's `new_encode_dev`: the 32-bit `dev_t` FUSE carries (12-bit major, 20-bit minor,
/// minor's low byte first). Equals the low 32 bits of glibc's `makedev` in that range.
pub(crate) fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Seconds and nanoseconds since the epoch as a `SystemTime`; times before 1970 are valid in
/// tar headers and must not panic.
pub(crate) fn system_time(t: Timespec) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nsec.min(999_999_999)));
    let base = if t.sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(t.sec.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(t.sec.unsigned_abs()))
    };
    base.and_then(|b| b.checked_add(nanos))
        .unwrap_or(UNIX_EPOCH)
}

/// Size a directory reports: nothing reads it, `ls` shows it; one block like ext4.
const DIR_SIZE: u64 = 4096;

/// The kernel-visible attributes of a tree inode.
pub(crate) fn inode_attr(id: InodeId, inode: &Inode) -> FileAttr {
    let (kind, size, rdev) = match &inode.content {
        Content::Dir { .. } => (FileType::Directory, DIR_SIZE, 0),
        Content::File { size, .. } => (FileType::RegularFile, *size, 0),
        Content::Symlink { target } => (FileType::Symlink, target.len() as u64, 0),
        Content::CharDev { rdev } => (FileType::CharDevice, 0, encode_dev(rdev.0, rdev.1)),
        Content::BlockDev { rdev } => (FileType::BlockDevice, 0, encode_dev(rdev.0, rdev.1)),
        Content::Fifo => (FileType::NamedPipe, 0, 0),
    };
    let time = system_time(inode.meta.mtime);
    FileAttr {
        ino: ino_of(id),
        size,
        blocks: size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind,
        perm: (inode.meta.mode & 0o7777) as u16,
        nlink: inode.nlink,
        uid: inode.meta.uid,
        gid: inode.meta.gid,
        rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// Attributes of a root-owned, world-readable file of `size` bytes dated at the epoch (the meta
/// files: their content is a pure function of the image, so is their date).
pub(crate) fn readonly_file_attr(ino: INodeNo, size: u64) -> FileAttr {
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0o444,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// The root as answered before the tree exists (see `getattr` in the filesystem): a plain
/// root-owned 0755 directory.
pub(crate) fn placeholder_root_attr() -> FileAttr {
    FileAttr {
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        size: DIR_SIZE,
        ..readonly_file_attr(ino_of(ROOT), DIR_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::Meta;

    #[test]
    fn encode_dev_matches_glibc_makedev_low_bits() {
        for (major, minor) in [
            (0, 0),
            (1, 3),
            (4, 64),
            (8, 17),
            (136, 255),
            (136, 256),
            (4095, 0xf_ffff),
        ] {
            assert_eq!(
                u64::from(encode_dev(major, minor)),
                libc::makedev(major, minor) & 0xffff_ffff,
                "({major}, {minor})"
            );
        }
    }

    #[test]
    fn inode_numbers_round_trip() {
        for (id, ino) in [(0, 1), (1, 2), (u32::MAX, u64::from(u32::MAX) + 1)] {
            assert_eq!(ino_of(id), INodeNo(ino));
            assert_eq!(id_of(INodeNo(ino)), Some(id));
        }
        for ino in [0, u64::from(u32::MAX) + 2, u64::MAX] {
            assert_eq!(id_of(INodeNo(ino)), None, "{ino}");
        }
    }

    #[test]
    fn system_time_handles_the_whole_range() {
        let cases = [
            (Timespec { sec: 0, nsec: 0 }, UNIX_EPOCH),
            (
                Timespec {
                    sec: 1_700_000_000,
                    nsec: 123_456_789,
                },
                UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            ),
            (
                Timespec {
                    sec: -1,
                    nsec: 500_000_000,
                },
                UNIX_EPOCH - Duration::from_millis(500),
            ),
        ];
        for (t, want) in cases {
            assert_eq!(system_time(t), want, "{t:?}");
        }
        // Out of range: no panic.
        let _ = system_time(Timespec {
            sec: i64::MAX,
            nsec: 999_999_999,
        });
        let _ = system_time(Timespec {
            sec: i64::MIN,
            nsec: 0,
        });
    }

    fn inode(mode: u32, content: Content) -> Inode {
        Inode {
            meta: Meta {
                mode,
                uid: 1000,
                gid: 100,
                mtime: Timespec { sec: 10, nsec: 5 },
                xattrs: Box::default(),
            },
            nlink: 1,
            content,
        }
    }

    #[test]
    fn attributes_per_kind() {
        let cases = [
            (
                inode(
                    0o4755,
                    Content::File {
                        size: 1025,
                        layer: 0,
                        data: None,
                    },
                ),
                FileType::RegularFile,
                1025,
                3,
                0,
            ),
            (
                inode(
                    0o777,
                    Content::Symlink {
                        target: b"../target".to_vec().into(),
                    },
                ),
                FileType::Symlink,
                9,
                1,
                0,
            ),
            (
                inode(0o620, Content::CharDev { rdev: (136, 300) }),
                FileType::CharDevice,
                0,
                0,
                encode_dev(136, 300),
            ),
            (
                inode(0o660, Content::BlockDev { rdev: (8, 1) }),
                FileType::BlockDevice,
                0,
                0,
                encode_dev(8, 1),
            ),
            (inode(0o644, Content::Fifo), FileType::NamedPipe, 0, 0, 0),
            (
                inode(0o1777, Content::dir(0)),
                FileType::Directory,
                DIR_SIZE,
                8,
                0,
            ),
        ];
        for (node, kind, size, blocks, rdev) in cases {
            let a = inode_attr(7, &node);
            assert_eq!(a.ino, INodeNo(8));
            assert_eq!(
                (a.kind, a.size, a.blocks, a.rdev),
                (kind, size, blocks, rdev)
            );
            assert_eq!(u32::from(a.perm), node.meta.mode);
            assert_eq!((a.uid, a.gid, a.nlink, a.blksize), (1000, 100, 1, BLKSIZE));
            assert_eq!(a.mtime, UNIX_EPOCH + Duration::new(10, 5));
            assert_eq!((a.atime, a.ctime), (a.mtime, a.mtime));
        }
    }
}
