//! The meta files served at the root: image metadata that needs no layer, so reading it never
//! waits for a fetch. Also the xattr reply protocol, which meta files and tree inodes share.

use fuser::{FileAttr, INodeNo};

use super::attr::readonly_file_attr;
use crate::layer::index::Xattr;

/// Image metadata served at the root without touching any layer.
#[derive(Clone, Debug)]
pub struct MetaFiles {
    /// `.config.json`, verbatim.
    pub config: Vec<u8>,
    /// `.manifest.json`, verbatim.
    pub manifest: Vec<u8>,
    /// The manifest digest, `sha256:…`; `.digest` is this plus a newline.
    pub digest: String,
    /// The image id (config digest), `sha256:…`; `.id` is this plus a newline.
    pub id: String,
}

/// Names of the meta files, in listing order. If the image has an entry with one of these names
/// at its root, the meta file shadows it: lookups and listings of the root only ever show the
/// meta file (the image's own entry stays reachable through nothing; images do not ship these
/// names in practice).
pub(crate) const NAMES: [&[u8]; 4] = [b".config.json", b".manifest.json", b".digest", b".id"];

/// Meta file `i` has FUSE inode `FIRST_INO - i`: the top of the `u64` range, which tree inodes
/// (`u32` ids + 1) never reach.
const FIRST_INO: u64 = u64::MAX;

/// The four files' contents, indexed like [`NAMES`]; or none at all, for a mount that must
/// show exactly the image's tree (a container's root filesystem).
#[derive(Debug)]
pub(crate) struct MetaTable {
    contents: Option<[Vec<u8>; 4]>,
}

impl MetaTable {
    pub(crate) fn new(meta: Option<MetaFiles>) -> MetaTable {
        MetaTable {
            contents: meta.map(|meta| {
                [
                    meta.config,
                    meta.manifest,
                    format!("{}\n", meta.digest).into_bytes(),
                    format!("{}\n", meta.id).into_bytes(),
                ]
            }),
        }
    }

    /// How many meta files the root shows (4, or 0).
    pub(crate) fn count(&self) -> usize {
        self.contents.as_ref().map_or(0, |c| c.len())
    }

    /// The meta file called `name` at the root.
    pub(crate) fn by_name(&self, name: &[u8]) -> Option<usize> {
        self.contents.as_ref()?;
        NAMES.iter().position(|n| *n == name)
    }

    pub(crate) fn by_ino(&self, ino: INodeNo) -> Option<usize> {
        self.contents.as_ref()?;
        let i = FIRST_INO.checked_sub(ino.0)?;
        (i < NAMES.len() as u64).then_some(i as usize)
    }

    pub(crate) fn ino(i: usize) -> INodeNo {
        INodeNo(FIRST_INO - i as u64)
    }

    /// Meta file `i`'s bytes; `i` comes from `by_name` or `by_ino`, so the table has files.
    pub(crate) fn content(&self, i: usize) -> &[u8] {
        self.contents.as_ref().map_or(&[], |c| &c[i])
    }

    pub(crate) fn attr(&self, i: usize) -> FileAttr {
        readonly_file_attr(Self::ino(i), self.content(i).len() as u64)
    }
}

/// What to answer a getxattr / listxattr of a `value` into a caller buffer of `size` bytes
/// (`getxattr(2)`: size 0 asks for the size; a smaller buffer is ERANGE).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sized<'a> {
    Size(u32),
    Data(&'a [u8]),
    TooSmall,
}

pub(crate) fn sized(value: &[u8], size: u32) -> Sized<'_> {
    if size == 0 {
        Sized::Size(value.len() as u32)
    } else if value.len() > size as usize {
        Sized::TooSmall
    } else {
        Sized::Data(value)
    }
}

/// Whether an image's xattr is kept from the kernel: `trusted.overlay.*`. overlayfs acts on
/// those attributes of its lower directories (opaque, redirect, metacopy, origin), and a mount
/// is a lower directory when it is a container's root filesystem; an untrusted image must not
/// steer overlayfs. No image needs them: containers see overlay whiteouts and opaque
/// directories only as the image format's `.wh.` entries, which the merge resolves.
pub(crate) fn hidden_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.")
}

/// The `listxattr(2)` list: every name followed by a NUL (hidden ones left out).
pub(crate) fn xattr_names(xattrs: &[Xattr]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xattrs.iter().map(|x| x.name.len() + 1).sum());
    for x in xattrs.iter().filter(|x| !hidden_xattr(&x.name)) {
        out.extend_from_slice(&x.name);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_size_protocol() {
        let cases: [(&[u8], u32, Sized<'_>); 6] = [
            (b"abc", 0, Sized::Size(3)),
            (b"abc", 2, Sized::TooSmall),
            (b"abc", 3, Sized::Data(b"abc")),
            (b"abc", 100, Sized::Data(b"abc")),
            (b"", 0, Sized::Size(0)),
            (b"", 1, Sized::Data(b"")),
        ];
        for (value, size, want) in cases {
            assert_eq!(sized(value, size), want, "{value:?} into {size}");
        }
    }

    #[test]
    fn xattr_names_are_nul_terminated() {
        let x = |n: &[u8]| Xattr {
            name: n.to_vec(),
            value: Vec::new(),
        };
        assert_eq!(xattr_names(&[]), b"");
        assert_eq!(
            xattr_names(&[
                x(b"user.a"),
                x(b"trusted.overlay.opaque"),
                x(b"security.capability")
            ]),
            b"user.a\0security.capability\0"
        );
        assert!(hidden_xattr(b"trusted.overlay.redirect"));
        assert!(!hidden_xattr(b"trusted.other"));
    }

    #[test]
    fn meta_inodes_round_trip_and_stay_out_of_the_tree_range() {
        let t = MetaTable::new(Some(MetaFiles {
            config: Vec::new(),
            manifest: Vec::new(),
            digest: String::new(),
            id: String::new(),
        }));
        let none = MetaTable::new(None);
        for (i, name) in NAMES.iter().enumerate() {
            let ino = MetaTable::ino(i);
            assert_eq!(t.by_ino(ino), Some(i));
            assert!(ino.0 > u64::from(u32::MAX) + 1);
            assert_eq!(t.by_name(name), Some(i));
            assert_eq!((none.by_ino(ino), none.by_name(name)), (None, None));
        }
        assert_eq!((t.count(), none.count()), (4, 0));
        assert_eq!(t.by_ino(INodeNo(1)), None);
        assert_eq!(t.by_ino(INodeNo(u64::MAX - 4)), None);
        assert_eq!(t.by_name(b".digest2"), None);
    }

    #[test]
    fn digest_and_id_end_with_a_newline() {
        let t = MetaTable::new(Some(MetaFiles {
            config: b"{}".to_vec(),
            manifest: b"{\"m\":1}".to_vec(),
            digest: "sha256:aa".into(),
            id: "sha256:bb".into(),
        }));
        assert_eq!(t.content(0), b"{}");
        assert_eq!(t.content(2), b"sha256:aa\n");
        assert_eq!(t.content(3), b"sha256:bb\n");
        assert_eq!(t.attr(3).size, 10);
        assert_eq!(t.attr(3).perm, 0o444);
    }
}
