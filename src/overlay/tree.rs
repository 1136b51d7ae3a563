//! The merged tree as an inode table. Inode ids are indexes into [`Tree::inodes`]; the root is
//! [`ROOT`]. Hardlinked names share one inode (with `nlink` counting them); directories have
//! exactly one name and know their parent.

use crate::layer::index::{DataRef, Timespec, Xattr};

pub type InodeId = u32;

/// The root directory's inode id.
pub const ROOT: InodeId = 0;

#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub inodes: Vec<Inode>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timespec,
    pub xattrs: Vec<Xattr>,
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub meta: Meta,
    /// Number of directory entries naming this inode (for a directory: 2 + subdirectories).
    pub nlink: u32,
    pub content: Content,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Dir {
        parent: InodeId,
        /// Children sorted by name (bytewise), so lookup is a binary search and readdir is
        /// stable.
        children: Vec<(Box<[u8]>, InodeId)>,
    },
    File {
        size: u64,
        /// Index of the layer (base = 0) whose extracted data holds the content.
        layer: u32,
        /// `None` for files without content (size 0).
        data: Option<DataRef>,
    },
    Symlink {
        target: Box<[u8]>,
    },
    CharDev {
        rdev: (u32, u32),
    },
    BlockDev {
        rdev: (u32, u32),
    },
    Fifo,
}

impl Tree {
    pub fn get(&self, id: InodeId) -> Option<&Inode> {
        self.inodes.get(id as usize)
    }

    /// Look `name` up in directory `dir`.
    pub fn lookup(&self, dir: InodeId, name: &[u8]) -> Option<InodeId> {
        match &self.get(dir)?.content {
            Content::Dir { children, .. } => children
                .binary_search_by(|(n, _)| n.as_ref().cmp(name))
                .ok()
                .map(|i| children[i].1),
            _ => None,
        }
    }

    /// Resolve a `/`-separated path from the root without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Option<InodeId> {
        let mut cur = ROOT;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            cur = self.lookup(cur, comp)?;
        }
        Some(cur)
    }
}
