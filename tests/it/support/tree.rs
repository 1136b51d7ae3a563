//! Walking a directory tree into a comparable [`Snapshot`] and diffing two of them: what the
//! mount-against-oracle tests compare (a mounted image against `umoci unpack`'s rootfs).
//!
//! Every entry is keyed by its path relative to the root, as raw bytes (non-UTF-8 names are
//! kept exactly), and records what a container runtime would see through `lstat`, `readlink`,
//! `llistxattr`/`lgetxattr` and `read`: type, permission bits (incl. setuid/setgid/sticky),
//! owner, size, the sha256 of file contents, symlink target, device numbers, xattrs and the
//! mtime with nanoseconds. Hardlinks are compared as groups: the set of paths sharing an inode
//! (inode numbers themselves differ between filesystems).
//!
//! Symlinks are never followed. This module knows nothing of imagefs or registries.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

/// One entry as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// File size; symlink target length; `None` for directories (their size is the
    /// filesystem's business) and special files.
    pub size: Option<u64>,
    /// `sha256:` of a regular file's content (when hashing was asked for).
    pub sha256: Option<String>,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// `(major, minor)` of device nodes.
    pub rdev: Option<(u32, u32)>,
    /// Every xattr, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// `(seconds, nanoseconds)`.
    pub mtime: (i64, i64),
    pub nlink: u64,
    /// `(st_dev, st_ino)`: only meaningful inside one snapshot.
    pub inode: (u64, u64),
}

/// Every entry under a root (the root itself is the empty path).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub nodes: BTreeMap<Vec<u8>, Node>,
}

/// How to walk.
#[derive(Debug, Clone, Default)]
pub struct Walk {
    /// Names directly under the root to leave out (e.g. imagefs's meta files).
    pub skip_root_names: Vec<Vec<u8>>,
    /// Hash regular files' contents (reads every byte).
    pub hash: bool,
}

impl Snapshot {
    /// Walks `root` (not following symlinks).
    pub fn take(root: &Path, walk: &Walk) -> Snapshot {
        let mut nodes = BTreeMap::new();
        let mut todo: Vec<Vec<u8>> = vec![Vec::new()];
        while let Some(rel) = todo.pop() {
            let path = join(root, &rel);
            let node = node_of(&path, walk.hash)
                .unwrap_or_else(|e| panic!("cannot inspect {}: {e}", path.display()));
            if node.kind == Kind::Dir {
                let dir = fs::read_dir(&path)
                    .unwrap_or_else(|e| panic!("cannot list {}: {e}", path.display()));
                for entry in dir {
                    let entry = entry.unwrap_or_else(|e| panic!("listing {}: {e}", path.display()));
                    let name = entry.file_name().as_bytes().to_vec();
                    if rel.is_empty() && walk.skip_root_names.contains(&name) {
                        continue;
                    }
                    let mut child = rel.clone();
                    if !child.is_empty() {
                        child.push(b'/');
                    }
                    child.extend_from_slice(&name);
                    todo.push(child);
                }
            }
            nodes.insert(rel, node);
        }
        Snapshot { nodes }
    }

    /// For each non-directory path, the sorted paths of its hardlink group (itself included).
    pub fn link_groups(&self) -> BTreeMap<Vec<u8>, Vec<Vec<u8>>> {
        let mut by_inode: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
        for (path, node) in &self.nodes {
            if node.kind != Kind::Dir {
                by_inode.entry(node.inode).or_default().push(path.clone());
            }
        }
        let mut out = BTreeMap::new();
        for group in by_inode.into_values() {
            for p in &group {
                out.insert(p.clone(), group.clone());
            }
        }
        out
    }

    /// The entry at `path` (`a/b`), panicking with the listing if it is missing.
    pub fn get(&self, path: &str) -> &Node {
        self.nodes
            .get(path.as_bytes())
            .unwrap_or_else(|| panic!("no {path:?} in the snapshot; it has:\n{}", self.listing()))
    }

    /// One line per entry, for failure messages.
    pub fn listing(&self) -> String {
        let mut s = String::new();
        for (path, node) in &self.nodes {
            s.push_str(&format!("{} {node}\n", show(path)));
        }
        s
    }
}

/// What to compare besides the always-compared fields (names, types, modes, owners, sizes,
/// contents, targets, device numbers, hardlink groups, nlink of non-directories).
#[derive(Debug, Clone)]
pub struct Compare {
    /// Compare xattrs (lists and values).
    pub xattrs: bool,
    /// Xattr names to leave out on both sides (e.g. ones the oracle cannot restore).
    pub ignore_xattrs: Vec<Vec<u8>>,
    /// Leave out xattrs whose value is empty, on both sides.
    pub ignore_empty_xattrs: bool,
    /// Compare mtimes of non-directories.
    pub file_mtimes: bool,
    /// Compare mtimes of directories.
    pub dir_mtimes: bool,
}

impl Default for Compare {
    fn default() -> Self {
        Compare {
            xattrs: true,
            ignore_xattrs: Vec::new(),
            ignore_empty_xattrs: false,
            file_mtimes: true,
            dir_mtimes: true,
        }
    }
}

/// Every difference between `expected` and `actual`, one readable line each (empty: equal).
pub fn diff(expected: &Snapshot, actual: &Snapshot, cmp: &Compare) -> Vec<String> {
    let mut out = Vec::new();
    for path in expected.nodes.keys() {
        if !actual.nodes.contains_key(path) {
            out.push(format!(
                "missing: {} ({})",
                show(path),
                expected.nodes[path]
            ));
        }
    }
    for path in actual.nodes.keys() {
        if !expected.nodes.contains_key(path) {
            out.push(format!(
                "unexpected: {} ({})",
                show(path),
                actual.nodes[path]
            ));
        }
    }
    let want_groups = expected.link_groups();
    let got_groups = actual.link_groups();
    for (path, want) in &expected.nodes {
        let Some(got) = actual.nodes.get(path) else {
            continue;
        };
        let p = show(path);
        let mut field = |name: &str, w: String, g: String| {
            if w != g {
                out.push(format!("{p}: {name}: expected {w}, got {g}"));
            }
        };
        field(
            "type",
            format!("{:?}", want.kind),
            format!("{:?}", got.kind),
        );
        if want.kind != got.kind {
            continue;
        }
        field(
            "mode",
            format!("{:04o}", want.mode),
            format!("{:04o}", got.mode),
        );
        field("uid", want.uid.to_string(), got.uid.to_string());
        field("gid", want.gid.to_string(), got.gid.to_string());
        field(
            "size",
            format!("{:?}", want.size),
            format!("{:?}", got.size),
        );
        field(
            "sha256",
            format!("{:?}", want.sha256),
            format!("{:?}", got.sha256),
        );
        field(
            "target",
            format!("{:?}", want.target.as_deref().map(show)),
            format!("{:?}", got.target.as_deref().map(show)),
        );
        field(
            "rdev",
            format!("{:?}", want.rdev),
            format!("{:?}", got.rdev),
        );
        if cmp.xattrs {
            let keep = |x: &[(Vec<u8>, Vec<u8>)]| -> String {
                let kept: Vec<String> = x
                    .iter()
                    .filter(|(n, v)| {
                        !(cmp.ignore_xattrs.contains(n) || cmp.ignore_empty_xattrs && v.is_empty())
                    })
                    .map(|(n, v)| format!("{}={}", show(n), hex::encode(v)))
                    .collect();
                format!("[{}]", kept.join(", "))
            };
            field("xattrs", keep(&want.xattrs), keep(&got.xattrs));
        }
        let mtimes = if want.kind == Kind::Dir {
            cmp.dir_mtimes
        } else {
            cmp.file_mtimes
        };
        if mtimes {
            field(
                "mtime",
                format!("{}.{:09}", want.mtime.0, want.mtime.1),
                format!("{}.{:09}", got.mtime.0, got.mtime.1),
            );
        }
        if want.kind != Kind::Dir {
            field("nlink", want.nlink.to_string(), got.nlink.to_string());
            let show_group = |g: Option<&Vec<Vec<u8>>>| {
                let names: Vec<String> = g.into_iter().flatten().map(|p| show(p)).collect();
                format!("{{{}}}", names.join(", "))
            };
            field(
                "hardlink group",
                show_group(want_groups.get(path)),
                show_group(got_groups.get(path)),
            );
        }
    }
    out
}

/// Panics with every difference (and both listings, abridged) unless the snapshots match.
#[track_caller]
pub fn assert_same(what: &str, expected: &Snapshot, actual: &Snapshot, cmp: &Compare) {
    let d = diff(expected, actual, cmp);
    if d.is_empty() {
        return;
    }
    let shown: Vec<&String> = d.iter().take(200).collect();
    panic!(
        "{what}: {} differences (expected = oracle, got = mount):\n{}",
        d.len(),
        shown
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {:04o} {}:{}",
            self.kind, self.mode, self.uid, self.gid
        )?;
        if let Some(s) = self.size {
            write!(f, " size={s}")?;
        }
        if let Some(h) = &self.sha256 {
            write!(f, " {h}")?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {}", show(t))?;
        }
        if let Some((ma, mi)) = self.rdev {
            write!(f, " rdev={ma},{mi}")?;
        }
        for (n, v) in &self.xattrs {
            write!(f, " {}={}", show(n), hex::encode(v))?;
        }
        write!(
            f,
            " mtime={}.{:09} nlink={}",
            self.mtime.0, self.mtime.1, self.nlink
        )
    }
}

/// Bytes as text, invalid UTF-8 escaped (`\xff`).
pub fn show(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

fn join(root: &Path, rel: &[u8]) -> std::path::PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

fn node_of(path: &Path, hash: bool) -> io::Result<Node> {
    let m = fs::symlink_metadata(path)?;
    let ft = m.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_char_device() {
        Kind::Char
    } else if ft.is_block_device() {
        Kind::Block
    } else if ft.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    };
    let target = match kind {
        Kind::Symlink => Some(fs::read_link(path)?.as_os_str().as_bytes().to_vec()),
        _ => None,
    };
    let size = match kind {
        Kind::File | Kind::Symlink => Some(m.len()),
        _ => None,
    };
    let sha256 = if kind == Kind::File && hash {
        Some(sha256_file(path)?)
    } else {
        None
    };
    let rdev = matches!(kind, Kind::Char | Kind::Block)
        .then(|| (libc::major(m.rdev()), libc::minor(m.rdev())));
    Ok(Node {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size,
        sha256,
        target,
        rdev,
        xattrs: xattrs(path)?,
        mtime: (m.mtime(), m.mtime_nsec()),
        nlink: m.nlink(),
        inode: (m.dev(), m.ino()),
    })
}

/// `sha256:HEX` of a file's content, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Every xattr of `path` (not following symlinks), sorted by name.
pub fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let names = sized_call(|buf, len| {
        // SAFETY: `c` is a valid C string; `buf` is null (size probe) or holds `len` bytes.
        unsafe { libc::llistxattr(c.as_ptr(), buf.cast(), len) }
    })?;
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("xattr name without NUL");
        let value = sized_call(|buf, len| {
            // SAFETY: as above; `cname` is a valid C string.
            unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), buf.cast(), len) }
        })?;
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// The getxattr(2) size protocol: probe with a null buffer, then fetch (retrying if the value
/// grew in between).
fn sized_call(call: impl Fn(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let n = call(std::ptr::null_mut(), 0);
        if n < 0 {
            let e = io::Error::last_os_error();
            // Filesystems without xattr support list nothing.
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                return Ok(Vec::new());
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; n as usize];
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}
