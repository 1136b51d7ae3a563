//! `mount --record FILE`: the paths of the regular files read through a mount, in the order
//! of their first access, one per line (`/usr/bin/env`), for `imagefs convert --prioritize`.
//!
//! Paths are rebuilt from what LOOKUP saw: each inode's first (parent, name). A file reached
//! under two names (a hardlink) is recorded once, under the name it was first looked up by.
//! Each line is written as it happens, so the file is complete while the mount lives.
//! Names holding a newline cannot be written one per line and are left out.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::Mutex;

use fuser::INodeNo;

pub(crate) struct Recorder {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Inode → (parent inode, name), from the first lookup that returned it.
    names: HashMap<u64, (u64, Box<[u8]>)>,
    recorded: HashSet<u64>,
    out: BufWriter<File>,
    failed: bool,
}

impl Recorder {
    pub(crate) fn new(out: File) -> Recorder {
        Recorder {
            inner: Mutex::new(Inner {
                names: HashMap::new(),
                recorded: HashSet::new(),
                out: BufWriter::new(out),
                failed: false,
            }),
        }
    }

    /// LOOKUP of `name` in `parent` answered `ino`.
    pub(crate) fn looked_up(&self, parent: INodeNo, name: &[u8], ino: INodeNo) {
        let mut inner = self.lock();
        inner
            .names
            .entry(ino.0)
            .or_insert_with(|| (parent.0, name.into()));
    }

    /// A regular file `ino` is opened or read: its path is written the first time.
    pub(crate) fn accessed(&self, ino: INodeNo) {
        let mut inner = self.lock();
        if inner.failed || !inner.recorded.insert(ino.0) {
            return;
        }
        let Some(path) = inner.path(ino.0) else {
            return;
        };
        let written = inner.out.write_all(&path).and_then(|()| inner.out.flush());
        if let Err(e) = written {
            tracing::error!("mount --record: cannot write the access list, recording stops: {e}");
            inner.failed = true;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// `/a/b/c\n` for `ino`, from the recorded lookups up to the root.
    fn path(&self, ino: u64) -> Option<Vec<u8>> {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != INodeNo::ROOT.0 {
            let (parent, name) = self.names.get(&at)?;
            if name.contains(&b'\n') || parts.len() > 4096 {
                return None;
            }
            parts.push(name);
            at = *parent;
        }
        let mut path = Vec::new();
        for name in parts.iter().rev() {
            path.push(b'/');
            path.extend_from_slice(name);
        }
        path.push(b'\n');
        Some(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_first_access_order_once_each() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let r = Recorder::new(tmp.reopen().unwrap());
        let (root, usr, bin, env, sh) = (
            INodeNo::ROOT,
            INodeNo(2),
            INodeNo(3),
            INodeNo(4),
            INodeNo(5),
        );
        r.looked_up(root, b"usr", usr);
        r.looked_up(usr, b"bin", bin);
        r.looked_up(bin, b"env", env);
        r.looked_up(root, b"sh", sh);
        // A second name for the same inode does not rename it.
        r.looked_up(root, b"env-link", env);
        r.accessed(sh);
        r.accessed(env);
        r.accessed(sh);
        // Never looked up (cannot happen through the kernel): left out.
        r.accessed(INodeNo(9));
        r.looked_up(root, b"bad\nname", INodeNo(10));
        r.accessed(INodeNo(10));
        let text = std::fs::read_to_string(tmp.path()).unwrap();
        assert_eq!(text, "/sh\n/usr/bin/env\n");
    }
}
