//! Real FUSE mounts of hand-made trees through `imagefs::fs` (no registry, no merge): a test
//! backend serves a `Tree` built here and file contents from a temp dir, and counts how often
//! the tree was asked for. Checks go through std::fs / libc like any reader would.

use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::support::noise;
use imagefs::fs::{Backend, BackendError, FsError, MetaFiles, MountOptions};
use imagefs::layer::index::{DataRef, Timespec, Xattr};
use imagefs::overlay::{Content, Inode, InodeId, Meta, ROOT, Tree};
use tempfile::TempDir;

/// How long a mount, an unmount or a blocked reader may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(30);

const CONFIG: &[u8] = br#"{"architecture":"amd64","os":"linux"}"#;
const MANIFEST: &[u8] = br#"{"schemaVersion":2}"#;
const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const ID: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// A valid v2 `security.capability` (cap_net_bind_service, effective): the kernel parses this
/// xattr and rejects malformed values.
const CAP_V2: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

// ---------------------------------------------------------------------------------------------
// The test backend and tree

/// Blocks `tree()` until opened, to test readers waiting on a slow fetch.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cond: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cond.wait(open).unwrap();
        }
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

struct TestBackend {
    /// `None`: every `tree()` fails.
    tree: Option<Arc<Tree>>,
    /// The tree once "built" (the first successful `tree()`), as a real backend keeps it.
    built: std::sync::OnceLock<Arc<Tree>>,
    data: PathBuf,
    gate: Option<Arc<Gate>>,
    tree_calls: AtomicUsize,
}

impl TestBackend {
    fn tree_calls(&self) -> usize {
        self.tree_calls.load(Ordering::SeqCst)
    }
}

impl Backend for TestBackend {
    /// Counts the builds: calls that find no tree built yet.
    fn tree(&self) -> Result<&Tree, BackendError> {
        if let Some(t) = self.built.get() {
            return Ok(t);
        }
        self.tree_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.wait();
        }
        match &self.tree {
            Some(t) => Ok(self.built.get_or_init(|| t.clone())),
            None => Err(BackendError::new("layer sha256:dead: fetch failed (test)")),
        }
    }

    fn built_tree(&self) -> Option<&Tree> {
        self.built.get().map(|t| &**t)
    }

    fn open(&self, layer: u32, data: DataRef) -> Result<File, BackendError> {
        File::open(data_path(&self.data, layer, data))
            .map_err(|e| BackendError::new(format!("layer {layer} file {}: {e}", data.id)))
    }
}

fn data_path(dir: &Path, layer: u32, data: DataRef) -> PathBuf {
    dir.join(format!("{layer}-{}", data.id))
}

/// Builds a `Tree` inode by inode, writing file contents into `data`.
struct TreeBuilder {
    inodes: Vec<Inode>,
    /// Per inode, the names in it (directories only).
    children: Vec<Vec<(Vec<u8>, InodeId)>>,
    data: PathBuf,
    next_data: u32,
}

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime: Timespec::default(),
        xattrs: Box::default(),
    }
}

impl TreeBuilder {
    fn new(data: &Path) -> TreeBuilder {
        let root = Inode {
            meta: meta(0o755),
            nlink: 2,
            content: Content::dir(ROOT),
        };
        TreeBuilder {
            inodes: vec![root],
            children: vec![Vec::new()],
            data: data.to_path_buf(),
            next_data: 0,
        }
    }

    fn add(&mut self, parent: InodeId, name: &[u8], mode: u32, content: Content) -> InodeId {
        let id = self.inodes.len() as InodeId;
        let is_dir = matches!(content, Content::Dir { .. });
        self.inodes.push(Inode {
            meta: meta(mode),
            nlink: if is_dir { 2 } else { 1 },
            content,
        });
        self.children.push(Vec::new());
        if is_dir {
            self.inodes[parent as usize].nlink += 1;
        }
        self.name(parent, name, id);
        id
    }

    fn name(&mut self, parent: InodeId, name: &[u8], id: InodeId) {
        assert!(
            matches!(self.inodes[parent as usize].content, Content::Dir { .. }),
            "parent {parent} is not a directory"
        );
        self.children[parent as usize].push((name.into(), id));
    }

    fn dir(&mut self, parent: InodeId, name: &[u8], mode: u32) -> InodeId {
        self.add(parent, name, mode, Content::dir(parent))
    }

    fn file(
        &mut self,
        parent: InodeId,
        name: &[u8],
        mode: u32,
        layer: u32,
        bytes: &[u8],
    ) -> InodeId {
        let data = (!bytes.is_empty()).then(|| {
            let d = DataRef { id: self.next_data };
            self.next_data += 1;
            fs::write(data_path(&self.data, layer, d), bytes).unwrap();
            d
        });
        let content = Content::File {
            size: bytes.len() as u64,
            layer,
            data,
        };
        self.add(parent, name, mode, content)
    }

    fn hardlink(&mut self, parent: InodeId, name: &[u8], target: InodeId) {
        self.name(parent, name, target);
        self.inodes[target as usize].nlink += 1;
    }

    fn build(mut self) -> Tree {
        let mut tree = Tree::new(self.inodes);
        for (id, children) in self.children.iter_mut().enumerate() {
            if matches!(tree.inodes[id].content, Content::Dir { .. }) {
                children.sort();
                let named: Vec<(&[u8], InodeId)> =
                    children.iter().map(|(n, i)| (&n[..], *i)).collect();
                tree.set_children(id as InodeId, &named);
            }
        }
        tree
    }
}

const BIG_LEN: usize = 300 * 1024 + 17;
const MANY: usize = 500;
const OWNED_MTIME: Timespec = Timespec {
    sec: 1_600_000_000,
    nsec: 123_456_789,
};

/// The image every test mounts (see the assertions for what each entry checks).
fn sample_tree(data: &Path) -> Tree {
    let mut b = TreeBuilder::new(data);
    b.file(ROOT, b".digest", 0o644, 0, b"the image's own .digest\n");
    let bin = b.dir(ROOT, b"bin", 0o755);
    let sh = b.file(bin, b"sh", 0o4755, 0, b"#!/bin/true\n");
    b.hardlink(bin, b"sh-link", sh);
    b.file(ROOT, b"big", 0o644, 1, &noise(BIG_LEN, 1));
    b.file(ROOT, b"empty", 0o644, 1, b"");
    b.file(ROOT, b"caf\xe9", 0o644, 0, b"latin-1 name\n");
    b.add(
        ROOT,
        b"link",
        0o777,
        Content::Symlink {
            target: b"bin/sh".to_vec().into(),
        },
    );
    b.add(
        ROOT,
        b"link-raw",
        0o777,
        Content::Symlink {
            target: b"../\xff\xfe/x".to_vec().into(),
        },
    );
    b.dir(ROOT, b"tmp", 0o1777);
    let sgid = b.dir(ROOT, b"sgid", 0o2775);
    b.inodes[sgid as usize].meta.uid = 1000;
    b.inodes[sgid as usize].meta.gid = 1001;
    let dev = b.dir(ROOT, b"dev", 0o755);
    let tty = b.add(dev, b"tty", 0o620, Content::CharDev { rdev: (136, 300) });
    b.inodes[tty as usize].meta.gid = 5;
    b.add(dev, b"sda", 0o660, Content::BlockDev { rdev: (8, 1) });
    b.add(dev, b"fifo", 0o644, Content::Fifo);
    let owned = b.file(ROOT, b"owned", 0o640, 1, b"owned by 1000\n");
    let m = &mut b.inodes[owned as usize].meta;
    m.uid = 1000;
    m.gid = 1001;
    m.mtime = OWNED_MTIME;
    m.xattrs = vec![
        Xattr {
            name: b"user.empty".to_vec(),
            value: Vec::new(),
        },
        Xattr {
            name: b"security.capability".to_vec(),
            value: CAP_V2.to_vec(),
        },
        Xattr {
            name: b"user.note".to_vec(),
            value: b"hello".to_vec(),
        },
    ]
    .into();
    let many = b.dir(ROOT, b"many", 0o755);
    for i in 0..MANY {
        b.file(
            many,
            format!("entry-with-a-longish-name-{i:04}").as_bytes(),
            0o644,
            0,
            b"",
        );
    }
    b.file(ROOT, b"mutable", 0o644, 0, &[b'a'; 8192]);
    b.build()
}

// ---------------------------------------------------------------------------------------------
// Mounting

/// A served mount, unmounted in Drop (fusermount3 -u, then umount -l).
struct Mounted {
    dir: TempDir,
    _data: TempDir,
    data: PathBuf,
    backend: Arc<TestBackend>,
    done: mpsc::Receiver<Result<(), FsError>>,
    thread: Option<JoinHandle<()>>,
}

struct Setup {
    passthrough: bool,
    fail_tree: bool,
    gate: Option<Arc<Gate>>,
}

const DEFAULT: Setup = Setup {
    passthrough: false,
    fail_tree: false,
    gate: None,
};

fn fs_name(mountpoint: &Path) -> String {
    // Unique per mount, so the mountinfo line is unambiguous.
    format!("imagefs:test{}", mountpoint.display()).replace('/', "_")
}

fn meta_files() -> MetaFiles {
    MetaFiles {
        config: CONFIG.to_vec(),
        manifest: MANIFEST.to_vec(),
        digest: DIGEST.into(),
        id: ID.into(),
    }
}

fn opts(mountpoint: &Path, passthrough: bool) -> MountOptions {
    MountOptions {
        fs_name: fs_name(mountpoint),
        allow_other: false,
        threads: 4,
        passthrough,
        nosuid: true,
        nodev: true,
        record: None,
        survivable: false,
    }
}

fn mount(setup: Setup) -> Mounted {
    let data = tempfile::tempdir().unwrap();
    let tree = sample_tree(data.path());
    let backend = Arc::new(TestBackend {
        tree: (!setup.fail_tree).then(|| Arc::new(tree)),
        data: data.path().to_path_buf(),
        gate: setup.gate,
        built: std::sync::OnceLock::new(),
        tree_calls: AtomicUsize::new(0),
    });
    let dir = tempfile::tempdir().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let thread = {
        let backend: Arc<dyn Backend> = backend.clone();
        let mountpoint = dir.path().to_path_buf();
        let opts = opts(&mountpoint, setup.passthrough);
        std::thread::spawn(move || {
            let r =
                imagefs::fs::serve(backend, Some(meta_files()), &mountpoint, &opts, move || {
                    ready_tx.send(()).unwrap()
                });
            let _ = done_tx.send(r);
        })
    };
    let m = Mounted {
        data: data.path().to_path_buf(),
        dir,
        _data: data,
        backend,
        done: done_rx,
        thread: Some(thread),
    };
    if ready_rx.recv_timeout(TIMEOUT).is_err() {
        let why = match m.done.try_recv() {
            Ok(Err(e)) => e.to_string(),
            other => format!("{other:?}"),
        };
        panic!("mount at {} not ready: {why}", m.path().display());
    }
    assert!(
        mountinfo(m.path()).is_some(),
        "on_ready called but {} is not in /proc/self/mountinfo",
        m.path().display()
    );
    m
}

impl Mounted {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn p(&self, rel: impl AsRef<OsStr>) -> PathBuf {
        self.path().join(rel.as_ref())
    }

    fn tree_calls(&self) -> usize {
        self.backend.tree_calls()
    }

    /// Wait for `serve` to return.
    fn wait_served(&mut self) -> Result<(), FsError> {
        let r = self
            .done
            .recv_timeout(TIMEOUT)
            .expect("serve did not return after unmount");
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        r
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        unmount_for_cleanup(self.dir.path());
        if self.thread.is_some() {
            let _ = self.done.recv_timeout(TIMEOUT);
        }
    }
}

fn unmount_for_cleanup(path: &Path) {
    if mountinfo(path).is_none() {
        return;
    }
    let _ = Command::new("fusermount3").arg("-u").arg(path).status();
    if mountinfo(path).is_some() {
        let _ = Command::new("umount").arg("-l").arg(path).status();
    }
}

/// The `/proc/self/mountinfo` line of the mount at `path`, split at its ` - ` into the mount
/// part and the filesystem part.
fn mountinfo(path: &Path) -> Option<(String, String)> {
    let path = path.canonicalize().ok()?;
    let want = path.to_str()?;
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (mount.split(' ').nth(4) == Some(want)).then(|| (mount.to_string(), fs.to_string()))
    })
}

fn errno_of<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    r.expect_err("expected an error").raw_os_error().unwrap()
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// `lgetxattr` into a buffer of `size` bytes (0: the size probe).
fn getxattr(path: &Path, name: &str, size: usize) -> Result<Vec<u8>, i32> {
    let name = CString::new(name).unwrap();
    // SAFETY: valid C strings; `buf` has `size` bytes (null when probing).
    xattr_call(size, |buf| unsafe {
        libc::lgetxattr(cstr(path).as_ptr(), name.as_ptr(), buf, size)
    })
}

fn listxattr(path: &Path, size: usize) -> Result<Vec<u8>, i32> {
    // SAFETY: as in getxattr.
    xattr_call(size, |buf| unsafe {
        libc::llistxattr(cstr(path).as_ptr(), buf.cast(), size)
    })
}

/// Run an xattr call with a buffer of `size` bytes (null for 0, the size probe): the bytes it
/// wrote, or for the probe the size it reported as text, or the errno.
fn xattr_call(size: usize, call: impl FnOnce(*mut libc::c_void) -> isize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    let n = call(ptr);
    if n < 0 {
        return Err(io::Error::last_os_error().raw_os_error().unwrap());
    }
    if size == 0 {
        return Ok(n.to_string().into_bytes());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Every entry of a directory as `readdir(3)` returns it, `.` and `..` included.
fn raw_listing(path: &Path) -> Vec<(Vec<u8>, u64, u8)> {
    let c = cstr(path);
    let mut out = Vec::new();
    // SAFETY: opendir/readdir/closedir on a valid path; entries are copied before the next call.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(
            !d.is_null(),
            "opendir {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            let name = CStr::from_ptr((*e).d_name.as_ptr()).to_bytes().to_vec();
            out.push((name, (*e).d_ino, (*e).d_type));
        }
        libc::closedir(d);
    }
    out
}

fn names(listing: &[(Vec<u8>, u64, u8)]) -> Vec<Vec<u8>> {
    let mut v: Vec<_> = listing.iter().map(|e| e.0.clone()).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn mount_is_read_only_fuse_imagefs_with_the_given_name() {
    let m = mount(DEFAULT);
    let (mount_part, fs_part) = mountinfo(m.path()).unwrap();
    let opts = mount_part.split(' ').nth(5).unwrap();
    assert!(opts.split(',').any(|o| o == "ro"), "{mount_part}");
    assert!(opts.split(',').any(|o| o == "nosuid"), "{mount_part}");
    assert!(opts.split(',').any(|o| o == "nodev"), "{mount_part}");
    let mut fs_fields = fs_part.split(' ');
    assert_eq!(fs_fields.next(), Some("fuse.imagefs"), "{fs_part}");
    assert_eq!(
        fs_fields.next(),
        Some(fs_name(m.path()).as_str()),
        "{fs_part}"
    );
    assert!(fs_part.contains("default_permissions"), "{fs_part}");
    assert!(!fs_part.contains("allow_other"), "{fs_part}");
}

#[test]
fn meta_files_and_statfs_do_not_fetch_the_tree() {
    let m = mount(DEFAULT);
    let root = fs::metadata(m.path()).unwrap();
    assert!(root.is_dir());
    assert_eq!(root.ino(), 1);
    assert_eq!(root.mode() & 0o7777, 0o755);

    for (name, want) in [
        (".config.json", CONFIG.to_vec()),
        (".manifest.json", MANIFEST.to_vec()),
        (".digest", format!("{DIGEST}\n").into_bytes()),
        (".id", format!("{ID}\n").into_bytes()),
    ] {
        let md = fs::metadata(m.p(name)).unwrap();
        assert_eq!(md.mode(), libc::S_IFREG | 0o444, "{name}");
        assert_eq!(
            (md.uid(), md.gid(), md.len()),
            (0, 0, want.len() as u64),
            "{name}"
        );
        assert_eq!(fs::read(m.p(name)).unwrap(), want, "{name}");
        assert_eq!(listxattr(&m.p(name), 0), Ok(b"0".to_vec()), "{name}");
    }
    // SAFETY: valid path, zeroed out-struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(cstr(m.path()).as_ptr(), &mut st) },
        0
    );
    assert_eq!((st.f_blocks, st.f_files), (0, 0));
    assert_eq!((st.f_bsize, st.f_namemax), (4096, 255));
    assert_eq!(m.tree_calls(), 0, "reading meta files fetched the tree");

    // Listing the root needs the tree: the meta files are listed, and shadow the image's own
    // `.digest`.
    let listing = names(&raw_listing(m.path()));
    assert_eq!(m.tree_calls(), 1);
    let digests = listing
        .iter()
        .filter(|n| n.as_slice() == b".digest")
        .count();
    assert_eq!(digests, 1, "{listing:?}");
    for name in [
        &b".config.json"[..],
        b".manifest.json",
        b".id",
        b"bin",
        b"caf\xe9",
        b".",
        b"..",
    ] {
        assert!(
            listing.iter().any(|n| n == name),
            "{:?} missing",
            OsStr::from_bytes(name)
        );
    }
    assert_eq!(
        fs::read(m.p(".digest")).unwrap(),
        format!("{DIGEST}\n").into_bytes()
    );

    // Now statfs has numbers: every file once (hardlinks too), all inodes plus the meta files.
    let tree = sample_tree(tempfile::tempdir().unwrap().path());
    let blocks: u64 = tree
        .inodes
        .iter()
        .map(|i| match i.content {
            Content::File { size, .. } => size.div_ceil(4096),
            _ => 0,
        })
        .sum();
    assert_eq!(
        unsafe { libc::statvfs(cstr(m.path()).as_ptr(), &mut st) },
        0
    );
    assert_eq!(st.f_blocks, blocks);
    assert_eq!(st.f_files, tree.inodes.len() as u64 + 4);
    assert_eq!(m.tree_calls(), 1, "the tree is asked for once");
}

fn check_reads(passthrough: bool) {
    let m = mount(Setup {
        passthrough,
        ..DEFAULT
    });
    assert_eq!(fs::read(m.p("bin/sh")).unwrap(), b"#!/bin/true\n");
    assert_eq!(fs::read(m.p("empty")).unwrap(), b"");
    assert_eq!(
        fs::read(m.p(OsStr::from_bytes(b"caf\xe9"))).unwrap(),
        b"latin-1 name\n"
    );

    // Whole file (several 128 KiB+ requests), then odd offsets and lengths.
    let want = noise(BIG_LEN, 1);
    assert_eq!(fs::read(m.p("big")).unwrap(), want);
    let f = File::open(m.p("big")).unwrap();
    for (offset, len) in [
        (1, 3),
        (131_071, 70_001),
        (4095, 200_000),
        (BIG_LEN - 5, 100),
    ] {
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, offset as u64).unwrap();
        let end = (offset + len).min(BIG_LEN);
        assert_eq!(&buf[..n], &want[offset..end], "offset {offset} len {len}");
    }
    // Past the end.
    assert_eq!(f.read_at(&mut [0u8; 10], BIG_LEN as u64 + 1).unwrap(), 0);
    // Several handles on one inode at once (one backing file / backing id shared).
    let g = File::open(m.p("big")).unwrap();
    let mut a = vec![0u8; 1000];
    g.read_exact_at(&mut a, 5000).unwrap();
    assert_eq!(a, want[5000..6000]);
    drop((f, g));

    // Which path served the data: the backing file is changed in place after a first read.
    // Passthrough reads it directly and sees the change; pread mode answers from the kept page
    // cache (FOPEN_KEEP_CACHE: the image is immutable, so it never rereads).
    assert_eq!(fs::read(m.p("mutable")).unwrap(), [b'a'; 8192]);
    let backing = fs::read_dir(&m.data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| fs::read(p).unwrap() == [b'a'; 8192])
        .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .write_all_at(&[b'b'; 8192], 0)
        .unwrap();
    let again = fs::read(m.p("mutable")).unwrap();
    let want = if passthrough {
        [b'b'; 8192]
    } else {
        [b'a'; 8192]
    };
    assert!(
        again == want,
        "passthrough={passthrough}: read {:?}…",
        &again[..4]
    );
}

#[test]
fn reads_with_pread() {
    check_reads(false);
}

#[test]
fn reads_with_passthrough() {
    check_reads(true);
}

#[test]
fn attributes_links_and_special_files() {
    let m = mount(DEFAULT);
    // Hardlinks: one inode, two names.
    let sh = fs::metadata(m.p("bin/sh")).unwrap();
    let sh2 = fs::metadata(m.p("bin/sh-link")).unwrap();
    assert_eq!(sh.ino(), sh2.ino());
    assert_eq!((sh.nlink(), sh2.nlink()), (2, 2));
    assert_eq!(sh.mode(), libc::S_IFREG | 0o4755);
    assert_eq!(sh.size(), 12);

    // Symlinks: size is the target length, readlink returns the bytes verbatim.
    let link = fs::symlink_metadata(m.p("link")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(link.size(), 6);
    assert_eq!(fs::read_link(m.p("link")).unwrap(), Path::new("bin/sh"));
    assert_eq!(fs::read(m.p("link")).unwrap(), b"#!/bin/true\n");
    let raw = fs::read_link(m.p("link-raw")).unwrap();
    assert_eq!(raw.as_os_str().as_bytes(), b"../\xff\xfe/x");

    // Directory modes and ownership.
    let tmp = fs::metadata(m.p("tmp")).unwrap();
    assert_eq!(tmp.mode(), libc::S_IFDIR | 0o1777);
    let sgid = fs::metadata(m.p("sgid")).unwrap();
    assert_eq!(sgid.mode(), libc::S_IFDIR | 0o2775);
    assert_eq!((sgid.uid(), sgid.gid()), (1000, 1001));
    let root = fs::metadata(m.path()).unwrap();
    assert_eq!(root.nlink(), 2 + 5, "root: 2 + bin, tmp, sgid, dev, many");

    // Owner, mtime with nanoseconds (atime and ctime follow it), blocks.
    let owned = fs::metadata(m.p("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 1001));
    assert_eq!(owned.mode(), libc::S_IFREG | 0o640);
    assert_eq!(
        (owned.mtime(), owned.mtime_nsec()),
        (OWNED_MTIME.sec, i64::from(OWNED_MTIME.nsec))
    );
    assert_eq!(
        (owned.atime(), owned.ctime()),
        (OWNED_MTIME.sec, OWNED_MTIME.sec)
    );
    assert_eq!((owned.blksize(), owned.blocks()), (4096, 1));

    // Devices and fifos.
    let tty = fs::metadata(m.p("dev/tty")).unwrap();
    assert!(tty.file_type().is_char_device());
    assert_eq!(tty.rdev(), libc::makedev(136, 300));
    assert_eq!((tty.mode() & 0o7777, tty.gid()), (0o620, 5));
    let sda = fs::metadata(m.p("dev/sda")).unwrap();
    assert!(sda.file_type().is_block_device());
    assert_eq!(sda.rdev(), libc::makedev(8, 1));
    let fifo = fs::metadata(m.p("dev/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.permissions().mode() & 0o7777, 0o644);

    // Non-UTF-8 names, and missing names (twice: the second answer is the cached negative one).
    assert!(
        fs::metadata(m.p(OsStr::from_bytes(b"caf\xe9")))
            .unwrap()
            .is_file()
    );
    for _ in 0..2 {
        assert_eq!(errno_of(fs::metadata(m.p("nope"))), libc::ENOENT);
    }
    assert_eq!(errno_of(fs::metadata(m.p("bin/sh/x"))), libc::ENOTDIR);
}

#[test]
fn listings_have_dot_entries_types_and_stable_offsets() {
    let m = mount(DEFAULT);
    let root_ino = fs::metadata(m.path()).unwrap().ino();
    let dev_ino = fs::metadata(m.p("dev")).unwrap().ino();

    let root = raw_listing(m.path());
    let find = |l: &[(Vec<u8>, u64, u8)], n: &[u8]| l.iter().find(|e| e.0 == n).cloned().unwrap();
    assert_eq!(find(&root, b".").1, root_ino);
    assert_eq!(
        find(&root, b"..").1,
        root_ino,
        "`..` of the root is the root"
    );
    assert_eq!(find(&root, b"link").2, libc::DT_LNK);
    assert_eq!(find(&root, b".id").2, libc::DT_REG);

    let dev = raw_listing(&m.p("dev"));
    assert_eq!(
        names(&dev),
        [&b"."[..], b"..", b"fifo", b"sda", b"tty"].map(|n| n.to_vec())
    );
    assert_eq!(find(&dev, b".").1, dev_ino);
    assert_eq!(find(&dev, b"..").1, root_ino);
    assert_eq!(find(&dev, b"tty").2, libc::DT_CHR);
    assert_eq!(find(&dev, b"sda").2, libc::DT_BLK);
    assert_eq!(find(&dev, b"fifo").2, libc::DT_FIFO);
    for (name, ino, _) in &dev[..] {
        if name != b"." && name != b".." {
            let p = m.p("dev").join(OsStr::from_bytes(name));
            assert_eq!(fs::symlink_metadata(p).unwrap().ino(), *ino);
        }
    }

    // A directory larger than one reply buffer: every entry exactly once, in order, across
    // several readdir(plus) calls resumed at our offsets; and again from the kernel's cache.
    let want: Vec<Vec<u8>> = (0..MANY)
        .map(|i| format!("entry-with-a-longish-name-{i:04}").into_bytes())
        .collect();
    for _ in 0..2 {
        let got: Vec<Vec<u8>> = raw_listing(&m.p("many"))
            .into_iter()
            .map(|e| e.0)
            .filter(|n| n != b"." && n != b"..")
            .collect();
        assert_eq!(got, want);
    }
    // std's listing and stat of each entry agree with the directory.
    let mut std_names: Vec<_> = fs::read_dir(m.p("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    std_names.sort();
    assert_eq!(std_names, want);
}

#[test]
fn xattrs_follow_the_getxattr_protocol() {
    let m = mount(DEFAULT);
    let owned = m.p("owned");
    assert_eq!(getxattr(&owned, "user.note", 0), Ok(b"5".to_vec()));
    assert_eq!(getxattr(&owned, "user.note", 64), Ok(b"hello".to_vec()));
    assert_eq!(getxattr(&owned, "user.note", 2), Err(libc::ERANGE));
    assert_eq!(getxattr(&owned, "user.empty", 0), Ok(b"0".to_vec()));
    assert_eq!(getxattr(&owned, "user.empty", 16), Ok(Vec::new()));
    assert_eq!(
        getxattr(&owned, "security.capability", 64),
        Ok(CAP_V2.to_vec())
    );
    assert_eq!(getxattr(&owned, "user.missing", 64), Err(libc::ENODATA));
    assert_eq!(
        getxattr(&m.p("bin/sh"), "user.note", 64),
        Err(libc::ENODATA)
    );

    let list = b"user.empty\0security.capability\0user.note\0".to_vec();
    assert_eq!(
        listxattr(&owned, 0),
        Ok(list.len().to_string().into_bytes())
    );
    assert_eq!(listxattr(&owned, 256), Ok(list));
    assert_eq!(listxattr(&owned, 3), Err(libc::ERANGE));
    assert_eq!(listxattr(&m.p("bin/sh"), 256), Ok(Vec::new()));
}

#[test]
fn every_change_is_erofs() {
    let m = mount(DEFAULT);
    let erofs = |what: &str, r: io::Result<()>| assert_eq!(errno_of(r), libc::EROFS, "{what}");
    erofs("create", File::create(m.p("new")).map(drop));
    erofs(
        "open for writing",
        fs::OpenOptions::new()
            .write(true)
            .open(m.p("bin/sh"))
            .map(drop),
    );
    erofs(
        "open read-write",
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.p(".digest"))
            .map(drop),
    );
    erofs("mkdir", fs::create_dir(m.p("newdir")));
    erofs("unlink", fs::remove_file(m.p("bin/sh")));
    erofs("rmdir", fs::remove_dir(m.p("tmp")));
    erofs("rename", fs::rename(m.p("big"), m.p("big2")));
    erofs("symlink", std::os::unix::fs::symlink("x", m.p("newlink")));
    erofs("link", fs::hard_link(m.p("big"), m.p("big3")));
    erofs(
        "chmod",
        fs::set_permissions(m.p("big"), fs::Permissions::from_mode(0o600)),
    );
    let name = CString::new("user.new").unwrap();
    // SAFETY: valid C strings and a 1-byte value.
    let r = unsafe {
        libc::lsetxattr(
            cstr(&m.p("big")).as_ptr(),
            name.as_ptr(),
            b"v".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::EROFS),
        "setxattr"
    );
    // SAFETY: as above.
    let r = unsafe { libc::lremovexattr(cstr(&m.p("owned")).as_ptr(), c"user.note".as_ptr()) };
    assert_eq!(r, -1);
    assert_eq!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::EROFS),
        "removexattr"
    );
    // Nothing changed.
    assert_eq!(fs::read(m.p("bin/sh")).unwrap(), b"#!/bin/true\n");
}

#[test]
fn a_failing_tree_is_eio_but_meta_files_still_work() {
    let m = mount(Setup {
        fail_tree: true,
        ..DEFAULT
    });
    assert_eq!(errno_of(fs::metadata(m.p("bin"))), libc::EIO);
    assert_eq!(
        errno_of(fs::read_dir(m.path()).and_then(|mut d| d.next().transpose())),
        libc::EIO
    );
    assert_eq!(
        fs::read(m.p(".digest")).unwrap(),
        format!("{DIGEST}\n").into_bytes()
    );
    assert_eq!(fs::read(m.p(".config.json")).unwrap(), CONFIG);
    // Failures are not cached: the next request asks again.
    let before = m.tree_calls();
    assert_eq!(errno_of(fs::metadata(m.p("bin"))), libc::EIO);
    assert!(m.tree_calls() > before);
}

#[test]
fn readers_wait_for_the_tree_while_meta_files_are_served() {
    let gate = Arc::new(Gate::default());
    let m = mount(Setup {
        gate: Some(gate.clone()),
        ..DEFAULT
    });
    let path = m.p("bin/sh");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || tx.send(fs::read(path)).unwrap());
    // The reader is parked in `tree()` (the one call so far), yet meta files are served by the
    // other worker threads.
    while m.tree_calls() == 0 {
        std::thread::yield_now();
    }
    assert_eq!(
        fs::read(m.p(".id")).unwrap(),
        format!("{ID}\n").into_bytes()
    );
    assert!(
        rx.try_recv().is_err(),
        "the reader did not wait for the tree"
    );
    gate.release();
    let got = rx.recv_timeout(TIMEOUT).expect("reader still blocked");
    assert_eq!(got.unwrap(), b"#!/bin/true\n");
    reader.join().unwrap();
}

#[test]
fn external_unmount_ends_serve() {
    let mut m = mount(DEFAULT);
    assert!(fs::metadata(m.p("bin/sh")).unwrap().is_file());
    let out = Command::new("fusermount3")
        .arg("-u")
        .arg(m.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.wait_served().unwrap();
    assert!(mountinfo(m.path()).is_none());
}

#[test]
fn unmounter_ends_run_and_detaches_a_busy_mount() {
    let data = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(TestBackend {
        tree: Some(Arc::new(sample_tree(data.path()))),
        data: data.path().to_path_buf(),
        gate: None,
        built: std::sync::OnceLock::new(),
        tree_calls: AtomicUsize::new(0),
    });
    struct Cleanup<'a>(&'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            unmount_for_cleanup(self.0);
        }
    }

    for busy in [false, true] {
        let mounted = imagefs::fs::mount(
            backend.clone(),
            Some(meta_files()),
            dir.path(),
            &opts(dir.path(), false),
        )
        .unwrap();
        let _cleanup = Cleanup(dir.path());
        let unmounter = mounted.unmounter();
        let (tx, rx) = mpsc::channel();
        let runner = std::thread::spawn(move || tx.send(mounted.run()).unwrap());
        let open = File::open(dir.path().join("big")).unwrap();
        if !busy {
            drop(open);
            unmounter.unmount().unwrap();
        } else {
            unmounter.unmount().unwrap();
            assert!(mountinfo(dir.path()).is_none(), "busy mount not detached");
            // Still served for the open file until it is closed.
            let mut b = [0u8; 4];
            open.read_exact_at(&mut b, 0).unwrap();
            assert_eq!(b[..], noise(4, 1)[..]);
            drop(open);
        }
        let r = rx
            .recv_timeout(TIMEOUT)
            .expect("run did not return after unmount");
        r.unwrap();
        runner.join().unwrap();
        assert!(mountinfo(dir.path()).is_none());
        // Unmounting again is harmless.
        unmounter.unmount().unwrap();
    }
}
