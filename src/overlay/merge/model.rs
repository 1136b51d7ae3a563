//! A naive reference merge for the model-based test: the whole image as one
//! `BTreeMap<path, node>`, every rule applied in the most literal way (prefix scans, clones,
//! no arena, no flags). Slow and obviously correct is the point; it shares no code with
//! [`super::merge`] beyond the input and output types.

use std::collections::BTreeMap;

use crate::layer::index::{Entry, EntryKind, LayerIndex, Timespec};
use crate::overlay::notation::Item;
use crate::overlay::tree::{Content, Meta};

type Path = Vec<Vec<u8>>;

#[derive(Clone)]
struct Node {
    meta: Meta,
    /// `Content::Dir` with no children for directories.
    content: Content,
    ino: u64,
    touched: usize,
}

/// An error as `(class, layer, entry path)`, comparable with [`super::MergeError`].
pub type ModelError = (&'static str, usize, Vec<u8>);

pub fn merge(layers: &[LayerIndex]) -> Result<Vec<Item>, ModelError> {
    let mut m = Model {
        map: BTreeMap::new(),
        next_ino: 1,
    };
    m.map.insert(Vec::new(), dir_node(0, 0));
    for (layer, index) in layers.iter().enumerate() {
        for e in &index.entries {
            m.apply(layer, e)
                .map_err(|class| (class, layer, e.path.clone()))?;
        }
    }
    Ok(m.items())
}

struct Model {
    map: BTreeMap<Path, Node>,
    next_ino: u64,
}

fn dir_node(ino: u64, touched: usize) -> Node {
    Node {
        meta: Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: Timespec::default(),
            xattrs: Box::default(),
        },
        content: Content::dir(0),
        ino,
        touched,
    }
}

/// Kept apart from `layer::index::path_components` on purpose: an oracle that shared the
/// code under test could not catch its bugs.
fn clean(path: &[u8]) -> Path {
    let mut out = Path::new();
    for c in path.split(|&b| b == b'/') {
        if c == b".." {
            out.pop();
        } else if !c.is_empty() && c != b"." {
            out.push(c.to_vec());
        }
    }
    out
}

fn is_dir(n: &Node) -> bool {
    matches!(n.content, Content::Dir { .. })
}

impl Model {
    fn apply(&mut self, layer: usize, e: &Entry) -> Result<(), &'static str> {
        let mut path = clean(&e.path);
        let Some(name) = path.pop() else {
            if e.kind != EntryKind::Dir {
                return Err("root-not-dir");
            }
            self.map.get_mut(&Path::new()).unwrap().meta = meta_of(e);
            return Ok(());
        };
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            let opaque = name == b".wh..wh..opq";
            if !opaque && (hidden.is_empty() || hidden == b"." || hidden == b"..") {
                return Err("invalid-whiteout");
            }
            let mut target = self.resolve(&path)?;
            if !opaque {
                target.push(hidden.to_vec());
            }
            if !self.map.contains_key(&target) {
                return Ok(());
            }
            // umoci's Walk: preorder; an untouched path goes with everything below it.
            let keys: Vec<Path> = self
                .map
                .keys()
                .filter(|k| k.starts_with(&target))
                .cloned()
                .collect();
            for k in keys {
                let Some(n) = self.map.get(&k) else { continue };
                if n.touched == layer || (opaque && k == target) {
                    continue;
                }
                self.remove(&k);
            }
            return Ok(());
        }

        let dir = self.resolve(&path)?;
        for i in 1..=dir.len() {
            let p = dir[..i].to_vec();
            match self.map.get_mut(&p) {
                Some(n) if is_dir(n) => n.touched = layer,
                Some(_) => return Err("not-a-directory"),
                None => {
                    let ino = self.ino();
                    self.map.insert(p, dir_node(ino, layer));
                }
            }
        }

        let mut full = dir;
        full.push(name);
        if let Some(old) = self.map.get_mut(&full) {
            if is_dir(old) && e.kind == EntryKind::Dir {
                old.meta = meta_of(e);
                old.touched = layer;
                return Ok(());
            }
            self.remove(&full);
        }
        let node = if e.kind == EntryKind::Hardlink {
            let target = clean(e.link.as_ref().ok_or("missing-link")?);
            let Some((tname, tdir)) = target.split_last() else {
                return Err("hardlink-to-dir");
            };
            let mut t = self.resolve(tdir)?;
            t.push(tname.clone());
            let mut n = self.map.get(&t).ok_or("hardlink-missing")?.clone();
            if is_dir(&n) {
                return Err("hardlink-to-dir");
            }
            n.touched = layer;
            n
        } else {
            let content = match e.kind {
                EntryKind::Dir => dir_node(0, 0).content,
                EntryKind::File => Content::File {
                    size: e.size,
                    layer: layer as u32,
                    data: e.data,
                },
                EntryKind::Symlink => match &e.link {
                    Some(t) if !t.is_empty() => Content::Symlink {
                        target: t.clone().into(),
                    },
                    _ => return Err("missing-link"),
                },
                EntryKind::CharDev => Content::CharDev { rdev: e.rdev },
                EntryKind::BlockDev => Content::BlockDev { rdev: e.rdev },
                EntryKind::Fifo => Content::Fifo,
                EntryKind::Hardlink => unreachable!(),
            };
            Node {
                meta: meta_of(e),
                content,
                ino: self.ino(),
                touched: layer,
            }
        };
        self.map.insert(full, node);
        Ok(())
    }

    /// securejoin, spelled out on paths.
    fn resolve(&self, comps: &[Vec<u8>]) -> Result<Path, &'static str> {
        let mut todo: Vec<Vec<u8>> = comps.iter().rev().cloned().collect();
        let mut out = Path::new();
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                out.pop();
                continue;
            }
            let mut cand = out.clone();
            cand.push(c);
            if let Some(Node {
                content: Content::Symlink { target },
                ..
            }) = self.map.get(&cand)
            {
                hops += 1;
                if hops > 40 {
                    return Err("symlink-loop");
                }
                if target.starts_with(b"/") {
                    out.clear();
                }
                todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
            } else {
                out = cand;
            }
        }
        Ok(out)
    }

    fn remove(&mut self, p: &Path) {
        self.map.retain(|k, _| !k.starts_with(p));
    }

    fn ino(&mut self) -> u64 {
        self.next_ino += 1;
        self.next_ino
    }

    fn items(&self) -> Vec<Item> {
        let mut names: BTreeMap<u64, u32> = BTreeMap::new();
        for n in self.map.values() {
            *names.entry(n.ino).or_default() += 1;
        }
        self.map
            .iter()
            .map(|(k, n)| Item {
                path: k.join(&b'/'),
                meta: n.meta.clone(),
                content: n.content.clone(),
                nlink: if is_dir(n) { 0 } else { names[&n.ino] },
                ino: n.ino,
            })
            .collect()
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
