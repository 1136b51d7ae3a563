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

    /// The structural promises of [`Tree`]: a directory root at [`ROOT`], children sorted and
    /// unique, parents right, every inode reachable exactly as its `nlink` says, directories
    /// named once (and so no cycle), hardlinked names sharing an inode within range, and ids
    /// dense in depth-first preorder of names. Linear in the tree's size; `merge` asserts it in
    /// debug builds (the test profile), the overlay tests check it in any build.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.inodes.len();
        let dir_children = |id: u32| match &self.inodes[id as usize].content {
            Content::Dir { children, .. } => Some(children),
            _ => None,
        };
        match self.get(ROOT).map(|i| &i.content) {
            Some(Content::Dir { parent: ROOT, .. }) => {}
            _ => return Err("root is not a directory whose parent is itself".into()),
        }
        let mut names = vec![0u32; n];
        let mut next_new = 1;
        let mut stack = vec![(ROOT, 0)];
        while let Some((id, i)) = stack.last_mut() {
            let (id, children) = (*id, dir_children(*id).expect("only directories are pushed"));
            if *i == 0 {
                if children.windows(2).any(|w| w[0].0 >= w[1].0) {
                    return Err(format!("children of inode {id} are not strictly sorted"));
                }
                let subdirs = children
                    .iter()
                    .filter(|(_, c)| (*c as usize) < n && dir_children(*c).is_some())
                    .count() as u32;
                if self.inodes[id as usize].nlink != 2 + subdirs {
                    return Err(format!(
                        "directory inode {id} has nlink {}, not {}",
                        self.inodes[id as usize].nlink,
                        2 + subdirs
                    ));
                }
            }
            let Some((name, child)) = children.get(*i) else {
                stack.pop();
                continue;
            };
            *i += 1;
            if name.is_empty() || name.contains(&b'/') || **name == *b"." || **name == *b".." {
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
            xattrs: Vec::new(),
        };
        Inode {
            meta,
            nlink,
            content,
        }
    }

    fn dir(parent: InodeId, nlink: u32, children: &[(&str, InodeId)]) -> Inode {
        let children = children
            .iter()
            .map(|(n, id)| (n.as_bytes().into(), *id))
            .collect();
        inode(nlink, Content::Dir { parent, children })
    }

    fn fifo(nlink: u32) -> Inode {
        inode(nlink, Content::Fifo)
    }

    /// `/d/` and a file named twice (`/d/f`, `/g`).
    fn sample() -> Tree {
        Tree {
            inodes: vec![
                dir(ROOT, 3, &[("d", 1), ("g", 2)]),
                dir(ROOT, 2, &[("f", 2)]),
                fifo(2),
            ],
        }
    }

    #[test]
    fn broken_trees_are_caught() {
        assert_eq!(sample().check_invariants(), Ok(()));
        type Break = fn(&mut Tree);
        let cases: [(&str, Break); 9] = [
            ("root not a directory", |t| t.inodes[0] = fifo(1)),
            ("empty", |t| t.inodes.clear()),
            ("duplicate name", |t| {
                t.inodes[0] = dir(ROOT, 3, &[("d", 1), ("d", 2)])
            }),
            ("unsorted", |t| {
                t.inodes[0] = dir(ROOT, 3, &[("g", 2), ("d", 1)])
            }),
            ("wrong parent", |t| t.inodes[1] = dir(1, 2, &[("f", 2)])),
            ("link target missing", |t| {
                t.inodes[1] = dir(ROOT, 2, &[("f", 9)])
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
