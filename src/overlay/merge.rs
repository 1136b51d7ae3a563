//! The OCI overlay merge: layer indexes applied base first, entries in tar order, into one
//! [`Tree`] — the tree `umoci unpack` leaves in a directory. Owns replacement, whiteouts,
//! opaque whiteouts, hardlinks and the scoping of paths that pass through symlinks. Knows
//! nothing of tar, compression, the store or FUSE: [`LayerIndex`]es in, a [`Tree`] out.
//!
//! The rules, from image-spec `layer.md`, with the choices the spec leaves open:
//!
//! - *Changeset over existing files*: "If the entry and the existing path are both
//!   directories, then the existing path's attributes MUST be replaced by those of the entry
//!   in the changeset. In all other cases, the implementation MUST do the semantic equivalent
//!   of [...] removing the file path [...] recreating the file path, based on the contents and
//!   attributes of the changeset entry". A re-declared directory therefore keeps its children
//!   and takes the new mode, owner, mtime and xattrs (xattrs replaced as a whole).
//! - *Whiteouts*: see [`Builder::whiteout`].
//! - *Missing parents* (a tar without an entry for `a/` before `a/f`) are created as
//!   directories with mode 0755, owner 0:0, mtime 0 and no xattrs, where umoci uses
//!   `MkdirAll(0777)` under the umask and the current time: the tree must be a pure function
//!   of its inputs. The root directory starts with the same metadata until an entry with the
//!   empty path (the tar's `./`) replaces it; the root cannot change type.
//! - *Paths through symlinks* (`a -> /etc` in a lower layer, then `a/passwd`): every
//!   component but the last is resolved inside the tree, like Go's securejoin, which umoci
//!   uses: absolute targets restart at the image root, `..` stops at the root, a missing
//!   component is taken literally (so are the ones after it), and more than
//!   [`MAX_SYMLINK_HOPS`] symlinks is an error (securejoin allows 255; Linux stops at 40). The
//!   last component is never followed: the entry replaces a symlink of the same name. A
//!   non-directory, non-symlink parent is an error (umoci's `MkdirAll` fails with `ENOTDIR`),
//!   except for whiteouts, which then name nothing and do nothing.
//! - *Hardlinks* name the inode of their target as the tree stands at that entry (an earlier
//!   entry of the same layer or any lower layer). The target's parent is resolved like an
//!   entry's, its last component is not followed (a hardlink to a symlink links the symlink).
//!   As in umoci, whatever the hardlink's own path named is removed first, so a hardlink to
//!   itself fails. Hardlinks take no metadata of their own. Replacing or removing one name of
//!   a group leaves the inode to the others.
//! - Entry paths and hardlink targets are cleaned lexically first (`//`, `.` dropped, `..`
//!   pops, never above the root), like umoci's `CleanPath`.
//!
//! Building uses a mutable arena whose slots are never reused; removal just unlinks a name.
//! The arena is then compacted into the final [`Tree`]: a depth-first walk in bytewise name
//! order numbers the reachable inodes densely in preorder (root = [`ROOT`], a hardlinked
//! inode gets the id of its first name), so the result holds no unreachable inode and the ids
//! depend only on the merged tree.

use std::collections::BTreeMap;
use std::fmt;

use super::tree::{Content, Inode, InodeId, Meta, ROOT, Tree};
use crate::layer::index::{Entry, EntryKind, LayerIndex, Timespec, path_components};

/// Basename prefix of a whiteout entry.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Basename of an opaque whiteout entry.
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
/// Most symlinks followed while resolving one path, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Why a layer stack cannot be merged. Every variant names the layer (its index in the
/// slice given to [`merge`], base = 0) and the entry path as written in that layer.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(
        "layer {layer}: cannot create {}: {} is not a directory (malformed layer: rebuild the image)",
        show(.path),
        show(.parent)
    )]
    NotADirectory {
        layer: usize,
        path: Vec<u8>,
        /// The offending ancestor, with symlinks resolved.
        parent: Vec<u8>,
    },
    #[error(
        "layer {layer}: more than {MAX_SYMLINK_HOPS} symlinks while resolving {} for {} (symlink loop: rebuild the image)",
        show(.resolving),
        show(.path)
    )]
    SymlinkLoop {
        layer: usize,
        path: Vec<u8>,
        /// The path being resolved: the entry's parent or a hardlink's target.
        resolving: Vec<u8>,
    },
    #[error(
        "layer {layer}: hardlink {} points to {}, which does not exist (malformed layer: rebuild the image)",
        show(.path),
        show(.target)
    )]
    HardlinkTargetMissing {
        layer: usize,
        path: Vec<u8>,
        target: Vec<u8>,
    },
    #[error(
        "layer {layer}: hardlink {} points to directory {} (malformed layer: rebuild the image)",
        show(.path),
        show(.target)
    )]
    HardlinkToDirectory {
        layer: usize,
        path: Vec<u8>,
        target: Vec<u8>,
    },
    #[error(
        "layer {layer}: link {} has no target (malformed layer index: re-index the layer)",
        show(.path)
    )]
    MissingLinkTarget { layer: usize, path: Vec<u8> },
    #[error(
        "layer {layer}: entry {} would turn the root directory into a {} (malformed layer: rebuild the image)",
        show(.path),
        kind_name(.kind)
    )]
    RootNotDirectory {
        layer: usize,
        path: Vec<u8>,
        kind: EntryKind,
    },
    #[error(
        "layer {layer}: whiteout {} names no file (malformed layer: rebuild the image)",
        show(.path)
    )]
    InvalidWhiteout { layer: usize, path: Vec<u8> },
    #[error("{count} layers or inodes exceed the 32-bit ids of the tree (use a smaller image)")]
    TooLarge { count: usize },
}

/// Apply `layers` (base first, entries in tar order) and return the merged tree.
pub fn merge(layers: &[LayerIndex]) -> Result<Tree, MergeError> {
    if u32::try_from(layers.len()).is_err() {
        return Err(MergeError::TooLarge {
            count: layers.len(),
        });
    }
    let mut builder = Builder::new();
    for (index, layer) in layers.iter().enumerate() {
        builder.layer = index;
        for entry in &layer.entries {
            builder.apply(entry)?;
        }
    }
    let tree = builder.into_tree()?;
    // The Cargo.toml promise: debug builds (tests, demo, CI) check the tree they serve.
    debug_assert_eq!(tree.check_invariants(), Ok(()), "merge built a broken tree");
    Ok(tree)
}

type NodeId = usize;
const ARENA_ROOT: NodeId = 0;

struct Node {
    meta: Meta,
    body: Body,
}

enum Body {
    Dir(Dir),
    /// Anything but a directory; `Content::Dir` never appears here.
    Leaf(Content),
    /// A leaf already moved into the final tree by compaction (reached by a second name).
    Moved,
}

#[derive(Default)]
struct Dir {
    /// Ordered, so compaction emits children sorted without a sort, and lookups stay
    /// logarithmic in a 20,000-entry directory.
    children: BTreeMap<Box<[u8]>, Child>,
    /// Layer that last pruned this directory. A prune leaves only names touched by the
    /// layer below it, and the layer can only add touched names, so pruning it again in the
    /// same layer would remove nothing: skipping it keeps repeated whiteouts linear.
    pruned_in: Option<usize>,
}

/// One name in a directory: per name, not per inode, because hardlinked names of one inode
/// can come from different layers.
#[derive(Clone, Copy)]
struct Child {
    node: NodeId,
    /// The last layer that created, re-declared or passed through this name (as the parent
    /// of one of its entries): umoci's `upperPaths`. Whiteouts spare names touched by their
    /// own layer.
    touched: usize,
}

struct Builder {
    nodes: Vec<Node>,
    /// Index of the layer being applied.
    layer: usize,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            nodes: vec![Node {
                meta: default_dir_meta(),
                body: Body::Dir(Dir::default()),
            }],
            layer: 0,
        }
    }

    fn apply(&mut self, e: &Entry) -> Result<(), MergeError> {
        let comps = path_components(&e.path);
        let Some((&name, dir)) = comps.split_last() else {
            return self.apply_root(e);
        };
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(e, dir, name == OPAQUE_WHITEOUT, hidden);
        }

        let (names, _) = self.resolve(dir).map_err(|()| self.symlink_loop(e, dir))?;
        let names: Vec<Box<[u8]>> = names.into_iter().map(Box::from).collect();
        let parent = self.mkdir_all(e, &names)?;

        if let Some(old) = self.lookup(parent, name) {
            if e.kind == EntryKind::Dir && self.is_dir(old.node) {
                self.nodes[old.node].meta = meta_of(e);
                self.insert(parent, name, old.node);
                return Ok(());
            }
            self.dir_mut(parent).children.remove(name);
        }

        let body = match e.kind {
            EntryKind::Hardlink => {
                let target = self.hardlink_target(e)?;
                self.insert(parent, name, target);
                return Ok(());
            }
            EntryKind::Dir => Body::Dir(Dir::default()),
            EntryKind::File => Body::Leaf(Content::File {
                size: e.size,
                // merge() checked that layer indexes fit.
                layer: self.layer as u32,
                data: e.data,
            }),
            EntryKind::Symlink => match e.link.as_deref() {
                // symlink(2) refuses an empty target, so umoci would fail here too.
                Some(target) if !target.is_empty() => Body::Leaf(Content::Symlink {
                    target: target.into(),
                }),
                _ => return Err(self.missing_link(e)),
            },
            EntryKind::CharDev => Body::Leaf(Content::CharDev { rdev: e.rdev }),
            EntryKind::BlockDev => Body::Leaf(Content::BlockDev { rdev: e.rdev }),
            EntryKind::Fifo => Body::Leaf(Content::Fifo),
        };
        let node = self.push(meta_of(e), body);
        self.insert(parent, name, node);
        Ok(())
    }

    /// The entry for the tar's `./`: only metadata can change, like umoci, which refuses to
    /// change the root's type because a symlink root could be followed out of the image.
    fn apply_root(&mut self, e: &Entry) -> Result<(), MergeError> {
        if e.kind != EntryKind::Dir {
            return Err(MergeError::RootNotDirectory {
                layer: self.layer,
                path: e.path.clone(),
                kind: e.kind,
            });
        }
        self.nodes[ARENA_ROOT].meta = meta_of(e);
        Ok(())
    }

    /// image-spec `layer.md`, Whiteouts:
    ///
    /// > A whiteout filename consists of the prefix `.wh.` plus the basename of the path to be
    /// > deleted. [...] Once a whiteout is applied, the whiteout itself MUST also be hidden.
    /// > Whiteout files MUST only apply to resources in lower/parent layers. Files that are
    /// > present in the same layer as a whiteout file can only be hidden by whiteout files in
    /// > subsequent layers.
    ///
    /// > An opaque whiteout entry is a file with the name `.wh..wh..opq` indicating that all
    /// > siblings are hidden in the lower layer. [...] `a/.wh..wh..opq` is applied first,
    /// > before creating the new version of `a/b`, regardless of the ordering in which the
    /// > whiteout file was encountered.
    ///
    /// Implemented as umoci does it, in tar order: the layer's names are marked as touched
    /// (with the ancestors its entries passed through), and a whiteout removes every untouched
    /// name under its target, descending through touched directories. So `.wh.d` after the
    /// same layer's `d/new` keeps `d` and `d/new` and drops `d`'s lower children, and an
    /// opaque whiteout keeps exactly the layer's own entries wherever it appears. Whiteouts
    /// of any entry type count; one for a missing name (or under a non-directory) is a
    /// no-op; whiteouts never create parents and never appear in the tree.
    fn whiteout(
        &mut self,
        e: &Entry,
        dir: &[&[u8]],
        opaque: bool,
        hidden: &[u8],
    ) -> Result<(), MergeError> {
        if !opaque && matches!(hidden, b"" | b"." | b"..") {
            return Err(MergeError::InvalidWhiteout {
                layer: self.layer,
                path: e.path.clone(),
            });
        }
        let (_, dir_node) = self.resolve(dir).map_err(|()| self.symlink_loop(e, dir))?;
        let Some(dir_node) = dir_node.filter(|&d| self.is_dir(d)) else {
            return Ok(());
        };
        if opaque {
            self.prune(dir_node);
            return Ok(());
        }
        match self.lookup(dir_node, hidden) {
            None => {}
            Some(child) if child.touched != self.layer => {
                self.dir_mut(dir_node).children.remove(hidden);
            }
            Some(child) if self.is_dir(child.node) => self.prune(child.node),
            Some(_) => {}
        }
        Ok(())
    }

    /// Remove every name below `start` not touched by the current layer.
    fn prune(&mut self, start: NodeId) {
        let layer = self.layer;
        let mut stack = vec![start];
        let mut kept = Vec::new();
        while let Some(id) = stack.pop() {
            let Body::Dir(dir) = &mut self.nodes[id].body else {
                continue;
            };
            if dir.pruned_in == Some(layer) {
                continue;
            }
            dir.pruned_in = Some(layer);
            dir.children.retain(|_, c| c.touched == layer);
            kept.extend(dir.children.values().map(|c| c.node));
            stack.extend(kept.drain(..).filter(|&n| self.is_dir(n)));
        }
    }

    /// The node a hardlink entry names: its target as the tree stands now.
    fn hardlink_target(&self, e: &Entry) -> Result<NodeId, MergeError> {
        let Some(target) = e.link.as_deref() else {
            return Err(self.missing_link(e));
        };
        let to_dir = || MergeError::HardlinkToDirectory {
            layer: self.layer,
            path: e.path.clone(),
            target: target.to_vec(),
        };
        let comps = path_components(target);
        let Some((&name, dir)) = comps.split_last() else {
            return Err(to_dir());
        };
        let (_, dir_node) = self.resolve(dir).map_err(|()| self.symlink_loop(e, dir))?;
        let child = dir_node.and_then(|d| self.lookup(d, name)).ok_or_else(|| {
            MergeError::HardlinkTargetMissing {
                layer: self.layer,
                path: e.path.clone(),
                target: target.to_vec(),
            }
        })?;
        if self.is_dir(child.node) {
            return Err(to_dir());
        }
        Ok(child.node)
    }

    /// Resolve the components `comps` inside the tree, as securejoin does: returns the
    /// symlink-free components and the node they name, if it exists. `Err` means a loop.
    fn resolve<'a>(&'a self, comps: &[&'a [u8]]) -> Result<(Vec<&'a [u8]>, Option<NodeId>), ()> {
        // Components still to walk, next one last.
        let mut todo: Vec<&'a [u8]> = comps.iter().rev().copied().collect();
        // Components walked, with the node each names (None once something is missing).
        let mut done: Vec<(&'a [u8], Option<NodeId>)> = Vec::with_capacity(comps.len());
        let mut hops = 0;
        while let Some(comp) = todo.pop() {
            match comp {
                b"" | b"." => continue,
                b".." => {
                    done.pop();
                    continue;
                }
                _ => {}
            }
            let parent = done.last().map_or(Some(ARENA_ROOT), |&(_, n)| n);
            let found = parent.and_then(|p| self.lookup(p, comp)).map(|c| c.node);
            if let Some(Body::Leaf(Content::Symlink { target })) =
                found.map(|n| &self.nodes[n].body)
            {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(());
                }
                if target.first() == Some(&b'/') {
                    done.clear();
                }
                todo.extend(target.split(|&b| b == b'/').rev());
                continue;
            }
            done.push((comp, found));
        }
        let node = done.last().map_or(Some(ARENA_ROOT), |&(_, n)| n);
        Ok((done.into_iter().map(|(name, _)| name).collect(), node))
    }

    /// Make sure the resolved parent `names` exists as directories, creating missing ones,
    /// and mark each as touched by the current layer. Returns the parent.
    fn mkdir_all(&mut self, e: &Entry, names: &[Box<[u8]>]) -> Result<NodeId, MergeError> {
        let mut cur = ARENA_ROOT;
        for (i, name) in names.iter().enumerate() {
            cur = match self.lookup(cur, name) {
                Some(child) if self.is_dir(child.node) => {
                    self.insert(cur, name, child.node);
                    child.node
                }
                Some(_) => {
                    return Err(MergeError::NotADirectory {
                        layer: self.layer,
                        path: e.path.clone(),
                        parent: names[..=i].join(&b'/'),
                    });
                }
                None => {
                    let dir = self.push(default_dir_meta(), Body::Dir(Dir::default()));
                    self.insert(cur, name, dir);
                    dir
                }
            };
        }
        Ok(cur)
    }

    fn push(&mut self, meta: Meta, body: Body) -> NodeId {
        self.nodes.push(Node { meta, body });
        self.nodes.len() - 1
    }

    /// Name `node` as `name` in `dir` (replacing the name if present), touched by this layer.
    fn insert(&mut self, dir: NodeId, name: &[u8], node: NodeId) {
        let child = Child {
            node,
            touched: self.layer,
        };
        let children = &mut self.dir_mut(dir).children;
        match children.get_mut(name) {
            Some(slot) => *slot = child,
            None => {
                children.insert(name.into(), child);
            }
        }
    }

    fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<Child> {
        match &self.nodes[dir].body {
            Body::Dir(d) => d.children.get(name).copied(),
            _ => None,
        }
    }

    fn is_dir(&self, id: NodeId) -> bool {
        matches!(self.nodes[id].body, Body::Dir(_))
    }

    fn dir_mut(&mut self, id: NodeId) -> &mut Dir {
        match &mut self.nodes[id].body {
            Body::Dir(d) => d,
            _ => unreachable!("callers pass directories only"),
        }
    }

    fn symlink_loop(&self, e: &Entry, resolving: &[&[u8]]) -> MergeError {
        MergeError::SymlinkLoop {
            layer: self.layer,
            path: e.path.clone(),
            resolving: resolving.join(&b'/'),
        }
    }

    fn missing_link(&self, e: &Entry) -> MergeError {
        MergeError::MissingLinkTarget {
            layer: self.layer,
            path: e.path.clone(),
        }
    }

    /// Compact the reachable part of the arena into a [`Tree`]: preorder, names in bytewise
    /// order, without recursion (image trees can be thousands of levels deep).
    fn into_tree(mut self) -> Result<Tree, MergeError> {
        const UNSEEN: InodeId = InodeId::MAX;
        let mut ids = vec![UNSEEN; self.nodes.len()];
        let mut tree = Tree::new(Vec::new());
        let too_large = |tree: &Tree| MergeError::TooLarge {
            count: tree.inodes.len(),
        };
        let root_children = self.take_dir(ARENA_ROOT);
        let run = tree
            .reserve_entries(root_children.keys().map(|k| &k[..]))
            .map_err(|_| too_large(&tree))?;
        tree.inodes.push(Inode {
            meta: take_meta(&mut self.nodes[ARENA_ROOT]),
            nlink: 2,
            content: Content::Dir {
                parent: ROOT,
                entries: run,
            },
        });
        // Per open directory: its id, its entries' run, the next entry and the children.
        let mut stack = vec![(ROOT, run, 0, root_children.into_values())];
        while let Some((dir_id, run, i, iter)) = stack.last_mut() {
            let (dir_id, run, at) = (*dir_id, *run, *i);
            let Some(child) = iter.next() else {
                stack.pop();
                continue;
            };
            *i += 1;
            let next_id = InodeId::try_from(tree.inodes.len())
                .ok()
                .filter(|&id| id != UNSEEN)
                .ok_or_else(|| too_large(&tree))?;
            let node = &mut self.nodes[child.node];
            let id = match std::mem::replace(&mut node.body, Body::Moved) {
                Body::Dir(dir) => {
                    let grandchildren = dir.children;
                    let meta = take_meta(node);
                    let sub = tree
                        .reserve_entries(grandchildren.keys().map(|k| &k[..]))
                        .map_err(|_| too_large(&tree))?;
                    tree.inodes.push(Inode {
                        meta,
                        nlink: 2,
                        content: Content::Dir {
                            parent: dir_id,
                            entries: sub,
                        },
                    });
                    tree.inodes[dir_id as usize].nlink += 1;
                    stack.push((next_id, sub, 0, grandchildren.into_values()));
                    next_id
                }
                Body::Leaf(content) => {
                    ids[child.node] = next_id;
                    tree.inodes.push(Inode {
                        meta: take_meta(node),
                        nlink: 1,
                        content,
                    });
                    next_id
                }
                Body::Moved => {
                    let id = ids[child.node];
                    tree.inodes[id as usize].nlink += 1;
                    id
                }
            };
            tree.set_entry(run, at, id);
        }
        tree.shrink_to_fit();
        Ok(tree)
    }

    fn take_dir(&mut self, id: NodeId) -> BTreeMap<Box<[u8]>, Child> {
        std::mem::take(&mut self.dir_mut(id).children)
    }
}

/// Move a node's metadata out (the arena is being consumed by compaction).
fn take_meta(node: &mut Node) -> Meta {
    Meta {
        xattrs: std::mem::take(&mut node.meta.xattrs),
        ..node.meta.clone()
    }
}

fn meta_of(e: &Entry) -> Meta {
    Meta {
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: e.mtime,
        xattrs: e.xattrs.as_slice().into(),
    }
}

/// Metadata of the root before any `./` entry, and of implicitly created parents.
fn default_dir_meta() -> Meta {
    Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: Timespec::default(),
        xattrs: Box::default(),
    }
}

/// A path for messages: `/`-rooted, UTF-8 shown as is, other bytes as `\xNN`.
struct ShowPath<'a>(&'a [u8]);

fn show(path: &[u8]) -> ShowPath<'_> {
    ShowPath(path)
}

impl fmt::Display for ShowPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.first() != Some(&b'/') {
            f.write_str("/")?;
        }
        for chunk in self.0.utf8_chunks() {
            f.write_str(chunk.valid())?;
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

fn kind_name(kind: &EntryKind) -> &'static str {
    match kind {
        EntryKind::File => "file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink => "symlink",
        EntryKind::Hardlink => "hardlink",
        EntryKind::CharDev => "character device",
        EntryKind::BlockDev => "block device",
        EntryKind::Fifo => "fifo",
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
