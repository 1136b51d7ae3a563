//! The merged tree as an inode table. Inode ids are indexes into [`Tree::inodes`]; the root is
//! [`ROOT`]. Hardlinked names share one inode (with `nlink` counting them); directories have
//! exactly one name and know their parent.
//!
//! Compact, because a layer may hold a million entries and the tree lives as long as the
//! mount: the directory entries of all directories sit in one table (each directory's as one
//! run, sorted), their names in one byte arena. A name costs its bytes plus 12, not a heap
//! allocation of its own; see the memory budget in docs/architecture.md.

use crate::layer::index::{DataRef, Timespec, Xattr};

pub type InodeId = u32;

/// The root directory's inode id.
pub const ROOT: InodeId = 0;

#[derive(Clone, Debug, Default)]
pub struct Tree {
    pub inodes: Vec<Inode>,
    /// Every directory's entries; a directory's are the run its [`Content::Dir`] names.
    entries: Vec<DirEntry>,
    /// The bytes of every entry's name.
    names: Vec<u8>,
}

/// A contiguous run `start..start + len` of a table of the tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Run {
    pub start: u32,
    pub len: u32,
}

impl Run {
    pub const EMPTY: Run = Run { start: 0, len: 0 };

    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// One name in a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry {
    name: Run,
    pub ino: InodeId,
}

/// A tree table outgrew its 32-bit offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timespec,
    pub xattrs: Box<[Xattr]>,
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
        /// The directory's entries in the tree's table ([`Tree::children`]), sorted by name
        /// (bytewise), so lookup is a binary search and readdir is stable.
        entries: Run,
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

impl Content {
    /// A directory under `parent` with no entries yet.
    pub fn dir(parent: InodeId) -> Content {
        Content::Dir {
            parent,
            entries: Run::EMPTY,
        }
    }
}

impl Tree {
    /// A tree of `inodes` whose directories have no entries yet ([`Tree::set_children`]).
    pub fn new(inodes: Vec<Inode>) -> Tree {
        Tree {
            inodes,
            ..Tree::default()
        }
    }

    pub fn get(&self, id: InodeId) -> Option<&Inode> {
        self.inodes.get(id as usize)
    }

    /// The entries of a directory (empty for anything else), in name order.
    pub fn children(&self, inode: &Inode) -> &[DirEntry] {
        match inode.content {
            Content::Dir { entries, .. } => &self.entries[entries.range()],
            _ => &[],
        }
    }

    /// An entry's name.
    pub fn name(&self, entry: &DirEntry) -> &[u8] {
        &self.names[entry.name.range()]
    }

    /// Look `name` up in directory `dir`.
    pub fn lookup(&self, dir: InodeId, name: &[u8]) -> Option<InodeId> {
        let children = self.children(self.get(dir)?);
        children
            .binary_search_by(|e| self.name(e).cmp(name))
            .ok()
            .map(|i| children[i].ino)
    }

    /// Append a run of entries named `names` (in the order given) whose inodes are set
    /// later with [`Tree::set_entry`]; for builders.
    pub(crate) fn reserve_entries<'a>(
        &mut self,
        names: impl ExactSizeIterator<Item = &'a [u8]>,
    ) -> Result<Run, TooLarge> {
        let start = u32::try_from(self.entries.len()).map_err(|_| TooLarge)?;
        let len = u32::try_from(names.len()).map_err(|_| TooLarge)?;
        start.checked_add(len).ok_or(TooLarge)?;
        self.entries.reserve(len as usize);
        for name in names {
            let at = u32::try_from(self.names.len()).map_err(|_| TooLarge)?;
            let n = u32::try_from(name.len()).map_err(|_| TooLarge)?;
            at.checked_add(n).ok_or(TooLarge)?;
            self.names.extend_from_slice(name);
            self.entries.push(DirEntry {
                name: Run { start: at, len: n },
                ino: InodeId::MAX,
            });
        }
        Ok(Run { start, len })
    }

    pub(crate) fn set_entry(&mut self, run: Run, i: usize, ino: InodeId) {
        self.entries[run.range()][i].ino = ino;
    }

    /// Give directory `dir` the entries `children` (names and inodes, kept in the order
    /// given: sorted, for a valid tree). For trees built by hand, e.g. in tests.
    pub fn set_children(&mut self, dir: InodeId, children: &[(&[u8], InodeId)]) {
        let run = self
            .reserve_entries(children.iter().map(|(n, _)| *n))
            .expect("a hand-built tree fits");
        for (i, (_, ino)) in children.iter().enumerate() {
            self.set_entry(run, i, *ino);
        }
        match &mut self.inodes[dir as usize].content {
            Content::Dir { entries, .. } => *entries = run,
            _ => panic!("inode {dir} is not a directory"),
        }
    }

    /// Give back spare capacity (the tables grow by doubling while built).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.inodes.shrink_to_fit();
        self.entries.shrink_to_fit();
        self.names.shrink_to_fit();
    }

    /// Resolve a `/`-separated path from the root without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Option<InodeId> {
        let mut cur = ROOT;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            cur = self.lookup(cur, comp)?;
        }
        Some(cur)
    }

    /// The structural promises of [`Tree`]: a directory root at [`ROOT`], children sorted and
    /// unique, parents right, every inode reachable exactly as its `nlink` says, directories
    /// named once (and so no cycle), hardlinked names sharing an inode within range, and ids
    /// dense in depth-first preorder of names. Linear in the tree's size; `merge` asserts it in
    /// debug builds (the test profile), the overlay tests check it in any build.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.inodes.len();
        let dir_children = |id: u32| match &self.inodes[id as usize].content {
            Content::Dir { entries, .. } if entries.range().end <= self.entries.len() => {
                Some(self.children(&self.inodes[id as usize]))
            }
            _ => None,
        };
        match self.get(ROOT).map(|i| &i.content) {
            Some(Content::Dir { parent: ROOT, .. }) if dir_children(ROOT).is_some() => {}
            _ => return Err("root is not a directory whose parent is itself".into()),
        }
        let mut names = vec![0u32; n];
        let mut next_new = 1;
        let mut stack = vec![(ROOT, 0)];
        while let Some((id, i)) = stack.last_mut() {
            let (id, children) = (*id, dir_children(*id).expect("only directories are pushed"));
            if *i == 0 {
                if children
                    .windows(2)
                    .any(|w| self.name(&w[0]) >= self.name(&w[1]))
                {
                    return Err(format!("children of inode {id} are not strictly sorted"));
                }
                let subdirs = children
                    .iter()
                    .filter(|e| (e.ino as usize) < n && dir_children(e.ino).is_some())
                    .count() as u32;
                if self.inodes[id as usize].nlink != 2 + subdirs {
                    return Err(format!(
                        "directory inode {id} has nlink {}, not {}",
                        self.inodes[id as usize].nlink,
                        2 + subdirs
                    ));
                }
            }
            let Some(entry) = children.get(*i) else {
                stack.pop();
                continue;
            };
            *i += 1;
            let (name, child) = (self.name(entry), &entry.ino);
            if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
                return Err(format!("inode {id} has a bad name {name:?}"));
            }
            let c = *child as usize;
            if c >= n || c == ROOT as usize {
                return Err(format!(
                    "inode {id} names inode {c}: out of range or the root"
                ));
            }
            if names[c] == 0 {
                if c != next_new {
                    return Err(format!(
                        "inode {c} is not numbered in preorder ({next_new} expected)"
                    ));
                }
                next_new += 1;
            }
            names[c] += 1;
            if let Content::Dir { parent, .. } = &self.inodes[c].content {
                if names[c] > 1 {
                    return Err(format!("directory inode {c} has several names"));
                }
                if *parent != id {
                    return Err(format!("directory inode {c} has parent {parent}, not {id}"));
                }
                if dir_children(*child).is_none() {
                    return Err(format!("directory inode {c} has entries out of range"));
                }
                stack.push((*child, 0));
            }
        }
        if next_new != n {
            return Err(format!("{} of {n} inodes are unreachable", n - next_new));
        }
        for (id, inode) in self.inodes.iter().enumerate() {
            if dir_children(id as u32).is_none() && inode.nlink != names[id] {
                return Err(format!(
                    "inode {id} has nlink {} but {} names",
                    inode.nlink, names[id]
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::index::Timespec;

    fn inode(nlink: u32, content: Content) -> Inode {
        let meta = Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: Timespec { sec: 0, nsec: 0 },
            xattrs: Box::default(),
        };
        Inode {
            meta,
            nlink,
            content,
        }
    }

    /// Replace inode `id` with a directory holding `children`.
    fn dir(t: &mut Tree, id: InodeId, parent: InodeId, nlink: u32, children: &[(&str, InodeId)]) {
        t.inodes[id as usize] = inode(nlink, Content::dir(parent));
        let children: Vec<(&[u8], InodeId)> =
            children.iter().map(|(n, i)| (n.as_bytes(), *i)).collect();
        t.set_children(id, &children);
    }

    fn fifo(nlink: u32) -> Inode {
        inode(nlink, Content::Fifo)
    }

    /// `/d/` and a file named twice (`/d/f`, `/g`).
    fn sample() -> Tree {
        let mut t = Tree::new(vec![fifo(0), fifo(0), fifo(2)]);
        dir(&mut t, ROOT, ROOT, 3, &[("d", 1), ("g", 2)]);
        dir(&mut t, 1, ROOT, 2, &[("f", 2)]);
        t
    }

    #[test]
    fn an_entry_fits_the_memory_budget() {
        // docs/architecture.md, "Memory budget": an inode and the directory entry naming it
        // take at most 96 bytes, plus the name's bytes.
        let per_entry = std::mem::size_of::<Inode>() + std::mem::size_of::<DirEntry>();
        assert!(per_entry <= 96, "{per_entry} bytes per entry");
    }

    #[test]
    fn broken_trees_are_caught() {
        assert_eq!(sample().check_invariants(), Ok(()));
        type Break = fn(&mut Tree);
        let cases: [(&str, Break); 10] = [
            ("root not a directory", |t| t.inodes[0] = fifo(1)),
            ("empty", |t| t.inodes.clear()),
            ("duplicate name", |t| {
                dir(t, ROOT, ROOT, 3, &[("d", 1), ("d", 2)])
            }),
            ("unsorted", |t| dir(t, ROOT, ROOT, 3, &[("g", 2), ("d", 1)])),
            ("wrong parent", |t| dir(t, 1, 1, 2, &[("f", 2)])),
            ("link target missing", |t| dir(t, 1, ROOT, 2, &[("f", 9)])),
            ("entries out of range", |t| {
                t.inodes[1].content = Content::Dir {
                    parent: ROOT,
                    entries: Run { start: 5, len: 9 },
                }
            }),
            ("nlink too small", |t| t.inodes[2] = fifo(1)),
            ("directory nlink", |t| t.inodes[0].nlink = 2),
            ("unreachable inode", |t| t.inodes.push(fifo(0))),
        ];
        for (what, break_it) in cases {
            let mut t = sample();
            break_it(&mut t);
            assert!(t.check_invariants().is_err(), "{what}");
        }
    }
}
