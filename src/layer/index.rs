//! The index of one layer: every tar entry in archive order, with its metadata and where its
//! file data lives once extracted. This is what [`crate::overlay`] merges.

use serde::{Deserialize, Serialize};

/// What a tar entry is. Hardlinks keep their own kind: the overlay resolves them against the
/// tree built so far, because OCI allows a hardlink to a file of a lower layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A hardlink to `link` (a normalised path, like `path`).
    Hardlink,
    CharDev,
    BlockDev,
    Fifo,
}

/// Seconds and nanoseconds since the epoch; nanoseconds come from PAX `mtime` when present.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// One tar entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Normalised path, raw bytes (names need not be UTF-8): relative, components separated
    /// by one `/`, no `.` components, no leading `./` or `/`, no trailing `/`. The root
    /// directory is the empty path. Whiteouts keep their `.wh.` basename here; the overlay
    /// interprets them.
    #[serde(with = "bytes_b64")]
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timespec,
    /// Size of the file content in bytes (0 for everything but `File`).
    pub size: u64,
    /// Symlink target (verbatim) or hardlink target (normalised path).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_bytes_b64"
    )]
    pub link: Option<Vec<u8>>,
    /// Device numbers for `CharDev` / `BlockDev`.
    #[serde(default)]
    pub rdev: (u32, u32),
    /// Extended attributes (PAX `SCHILY.xattr.*`), in archive order; values may be empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
    /// Where the content lives in the layer's extracted data, for `File` entries with content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(with = "bytes_b64")]
    pub name: Vec<u8>,
    #[serde(with = "bytes_b64")]
    pub value: Vec<u8>,
}

/// Location of a file's content inside its layer's extracted data: file number `id` in the
/// layer directory of the store. Meaningful only together with the layer it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DataRef {
    pub id: u32,
}

/// All entries of one layer, in tar order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    pub entries: Vec<Entry>,
    /// Where small files sit in the layer's pack file. Empty for layers extracted before
    /// packs existed, and for lazy layers.
    #[serde(default, skip_serializing_if = "Packed::is_empty")]
    pub packed: Packed,
}

/// Per [`DataRef::id`], where a file's content sits in its layer's pack file when it was
/// extracted into the pack rather than into a file of its own (`None`: its own file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Packed(pub Vec<Option<PackedAt>>);

impl Packed {
    /// Where `data` is packed, if it is.
    pub fn get(&self, data: DataRef) -> Option<PackedAt> {
        self.0.get(data.id as usize).copied().flatten()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A byte range of a layer's pack file holding one file's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedAt {
    pub offset: u64,
    pub len: u64,
}

impl LayerIndex {
    /// An index of `entries` with no pack.
    pub fn of(entries: Vec<Entry>) -> LayerIndex {
        LayerIndex {
            entries,
            packed: Packed::default(),
        }
    }
}

impl Entry {
    /// A bare entry with defaults (root-owned, mtime 0), for builders and tests.
    pub fn new(path: impl Into<Vec<u8>>, kind: EntryKind, mode: u32) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: Timespec::default(),
            size: 0,
            link: None,
            rdev: (0, 0),
            xattrs: Vec::new(),
            data: None,
        }
    }
}

/// The components of a tar name, cleaned lexically like Go's `filepath.Clean("/" + name)`
/// (as umoci and containerd do): empty and `.` components are dropped, `..` pops one and
/// never climbs above the root. The one cleaning rule of the crate: the indexers name
/// entries with it and the overlay resolves hardlink targets with it.
pub fn path_components(raw: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts
}

/// [`path_components`] joined by `/`: an [`Entry::path`]; the root is the empty path.
pub fn clean_path(raw: &[u8]) -> Vec<u8> {
    path_components(raw).join(&b'/')
}

/// Raw byte strings in JSON: plain strings when they are UTF-8 (readable indexes), and a
/// tagged base64 object otherwise, so non-UTF-8 names round-trip exactly.
mod bytes_b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        B64 { b64: String },
    }

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(v) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("b64", &base64::engine::general_purpose::STANDARD.encode(v))?;
                m.end()
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Text(t) => Ok(t.into_bytes()),
            Repr::B64 { b64 } => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(serde::de::Error::custom),
        }
    }
}

mod opt_bytes_b64 {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    struct Wrap(#[serde(with = "super::bytes_b64")] Vec<u8>);

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => super::bytes_b64::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"./", b""),
            (b".", b""),
            (b"/", b""),
            (b"./etc/passwd", b"etc/passwd"),
            (b"/etc//passwd/", b"etc/passwd"),
            (b"../../etc/passwd", b"etc/passwd"),
            (b"a/b/../c", b"a/c"),
            (b"a/./b", b"a/b"),
            (b"\xff/x", b"\xff/x"),
        ];
        for (input, want) in cases {
            assert_eq!(
                clean_path(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn non_utf8_names_round_trip() {
        let mut e = Entry::new(b"dir/\xff\xfename".to_vec(), EntryKind::Symlink, 0o777);
        e.link = Some(b"../\x80target".to_vec());
        e.xattrs.push(Xattr {
            name: b"user.empty".to_vec(),
            value: Vec::new(),
        });
        let idx = LayerIndex::of(vec![e]);
        let json = serde_json::to_string(&idx).unwrap();
        let back: LayerIndex = serde_json::from_str(&json).unwrap();
        assert_eq!(back, idx);
    }
}
