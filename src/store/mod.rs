//! The on-disk store: verified, content-addressed blobs, extracted layers keyed by diff_id,
//! and the reference index (tag → digest) that lets `--offline` resolve tags.
//!
//! Layout under the cache directory (created 0700):
//!
//! ```text
//! blobs/sha256/<hex>          verified blobs: manifests, indexes, configs, layer blobs
//! partial/sha256-<hex>        a layer download in progress (resumed with Range)
//! layers/sha256/<hex>/        an extracted layer, by diff_id: index.json + data/pack (small
//!                              files) + data/<n> (big files, and small ones once opened)
//! estargz/sha256/<hex>/       a lazily served eStargz blob: toc.json, data/<n>, present
//! tmp/                        extraction in progress (never looks like a layer)
//! locks/                      one lock file per blob / layer being written
//! refs.json                   "registry/repository:tag" → manifest digest
//! schema1/sha256/<hex>.json   a Docker schema 1 manifest (by its digest) as served, and the
//!                             image manifest it was converted to (see [`Converted`])
//! images/, mounts/            image records and live mounts (see `cache.rs`)
//! ```
//!
//! Invariants: a blob or layer appears under its digest only after it verified (written to
//! a temporary name, then renamed); two processes writing the same blob or layer serialise on
//! a file lock and the second finds the first's result. The store knows nothing of HTTP: it
//! pulls bytes through [`BlobSource`].

mod cache;
mod estargz;
mod pipeline;
mod trust;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layer::index::{DataRef, LayerIndex, PackedAt};
use crate::oci::{Digest, ImageManifest};

pub use cache::{
    Corrupt, ImageRecord, ImageUsage, LayerRecord, LiveMount, MountRegistration, Removed, Usage,
    format_size, plan_eviction,
};
pub use estargz::{LazyLayer, LazyState, READ_AROUND, RangeSource, has_toc};
pub use pipeline::{BlobBody, BlobSource, FoundLayer, LayerEvent, LayerJob, SourceError};
pub use trust::{Untrusted, check_cache_dir};

/// What a Docker schema 1 manifest was converted to (`oci::schema1`). Converting needs every
/// layer fetched and decompressed; this record lets a later mount, or `--offline`, skip all
/// of that. The synthesised config is a blob like any other.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Converted {
    /// The manifest exactly as the registry served it, signatures included (what
    /// `.manifest.json` shows); its canonical bytes hash to the record's digest.
    pub served: String,
    /// The equivalent image manifest: the synthesised config, the non-empty layers.
    pub manifest: ImageManifest,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{what} {expected} failed verification: its content hashes to {actual}; nothing was stored"
    )]
    DigestMismatch {
        what: &'static str,
        expected: Digest,
        actual: Digest,
    },
    #[error(
        "layer {digest}: expected {expected} bytes, the registry sent {actual}; nothing was stored"
    )]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("fetching blob {digest}")]
    Source {
        digest: Digest,
        #[source]
        source: SourceError,
    },
    #[error("layer {digest}")]
    Layer {
        digest: Digest,
        #[source]
        source: LayerFault,
    },
    #[error("{} is corrupt: {message}; run `imagefs cache verify` or remove it", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("{what} {digest} is not in the cache")]
    Missing { what: &'static str, digest: Digest },
    #[error(transparent)]
    Untrusted(Box<Untrusted>),
}

/// What is wrong with a layer's content, or with what was served for it.
#[derive(Debug, thiserror::Error)]
pub enum LayerFault {
    /// The tar stream (also: writing what it holds).
    #[error(transparent)]
    Tar(#[from] crate::layer::tar::TarError),
    /// Reading the compressed stream: bad compression, a decompression bomb.
    #[error(transparent)]
    Decode(io::Error),
    /// The eStargz TOC.
    #[error(transparent)]
    Toc(crate::layer::estargz::EstargzError),
    #[error("file {file} chunk {chunk}")]
    Chunk {
        file: u32,
        chunk: u32,
        #[source]
        source: crate::layer::estargz::EstargzError,
    },
    #[error("reading file {file} of the extracted layer")]
    ExtractedRead {
        file: u32,
        #[source]
        source: io::Error,
    },
    /// Inconsistent with itself or with what was asked for; no underlying error.
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A handle on the store directory. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    /// Shared by every lazy layer opened through this store (and its clones).
    readers: std::sync::Arc<estargz::Readers>,
}

impl Store {
    /// Open (and create, 0700) the store at `root`, after checking that no other user than
    /// the caller (and root) can change what it holds (see [`check_cache_dir`]).
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        // SAFETY: geteuid has no preconditions.
        check_cache_dir(&root, unsafe { libc::geteuid() })?;
        let mut b = fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        b.create(&root).map_err(io_err(&root))?;
        // Existing directories keep their mode with DirBuilder; tighten the root explicitly.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io_err(&root))?;
        for sub in [
            "blobs/sha256",
            "blobs/sha512",
            "partial",
            "layers/sha256",
            "layers/sha512",
            "tmp",
            "locks",
        ] {
            let p = root.join(sub);
            b.create(&p).map_err(io_err(&p))?;
        }
        let store = Store {
            root,
            readers: Default::default(),
        };
        store.remove_stale_temps();
        Ok(store)
    }

    /// Temporary files and directories are named `PREFIX-PID-N`; those of processes that no
    /// longer run are leftovers of a crash (never complete layers: those were renamed away).
    fn remove_stale_temps(&self) {
        let Ok(dir) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.split('-').nth(1))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing leftover of an interrupted extraction");
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    pub(crate) fn partial_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("partial")
            .join(format!("{}-{}", d.algorithm().as_str(), d.hex()))
    }

    /// Store a small blob (manifest, index, config) after verifying it against `d`.
    pub fn put_blob_bytes(&self, d: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if let Err(actual) = d.verify(bytes) {
            return Err(StoreError::DigestMismatch {
                what: "blob",
                expected: d.clone(),
                actual,
            });
        }
        let path = self.blob_path(d);
        if path.is_file() {
            return Ok(());
        }
        self.write_atomic(&path, bytes)
    }

    /// Read a small blob back, re-verifying it (cheap for JSON documents, and a corrupt cache
    /// must never be served).
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(d);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Missing {
                    what: "blob",
                    digest: d.clone(),
                });
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        if let Err(actual) = d.verify(&bytes) {
            return Err(StoreError::Corrupt {
                path,
                message: format!("content hashes to {actual}"),
            });
        }
        Ok(bytes)
    }

    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root
            .join("layers")
            .join(diff_id.algorithm().as_str())
            .join(diff_id.hex())
    }

    /// An extracted layer is complete exactly when its directory exists: it is renamed into
    /// place only after extraction and every verification succeeded.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).join("index.json").is_file()
    }

    pub fn load_layer_index(&self, diff_id: &Digest) -> Result<LayerIndex, StoreError> {
        let path = self.layer_dir(diff_id).join("index.json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Missing {
                    what: "layer",
                    digest: diff_id.clone(),
                });
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    /// The local file holding a regular file's content in an extracted layer, once it has
    /// one ([`Store::open_data`]).
    pub fn data_path(&self, diff_id: &Digest, data: DataRef) -> PathBuf {
        crate::layer::tar::data_path(&self.layer_dir(diff_id).join("data"), data)
    }

    /// Open the file holding a regular file's content in an extracted layer, read-only.
    /// A small file extracted into the layer's pack (`packed`, from the layer's index) is
    /// given a file of its own at its first open: the kernel can then read it through
    /// passthrough like any other, and files never opened cost no file creation.
    pub fn open_data(
        &self,
        diff_id: &Digest,
        data: DataRef,
        packed: Option<PackedAt>,
    ) -> Result<File, StoreError> {
        let path = self.data_path(diff_id, data);
        match (File::open(&path), packed) {
            (Ok(f), _) => Ok(f),
            (Err(e), Some(at)) if e.kind() == io::ErrorKind::NotFound => {
                let dir = self.layer_dir(diff_id).join("data");
                crate::layer::extract::unpack(&dir, at, &path, &self.root.join("tmp"))
                    .map_err(io_err(&path))?;
                File::open(&path).map_err(io_err(&path))
            }
            (Err(e), _) => Err(io_err(&path)(e)),
        }
    }

    /// Take an exclusive lock named `name` (blocking). Released when the guard drops.
    pub fn lock(&self, name: &str) -> Result<File, StoreError> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.lock().map_err(io_err(&path))?;
        Ok(f)
    }

    /// Write `bytes` to `path` via a temporary file and rename, so readers see all or nothing.
    pub(crate) fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        self.write_via_temp(path, bytes, true)
    }

    /// [`Store::write_atomic`] without the fsync, for caches of verified data whose loss or
    /// tearing in a crash is detected when they are read back, and costs only a refetch.
    pub(crate) fn write_atomic_unsynced(
        &self,
        path: &Path,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.write_via_temp(path, bytes, false)
    }

    fn write_via_temp(&self, path: &Path, bytes: &[u8], sync: bool) -> Result<(), StoreError> {
        let tmp = self.temp_path("w");
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        if sync {
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, path).map_err(io_err(path))?;
        Ok(())
    }

    pub(crate) fn temp_path(&self, prefix: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{prefix}-{}-{n}", std::process::id()))
    }

    /// Record `key` (`registry/repository:tag`) → `digest` in the reference index.
    pub fn set_ref(&self, key: &str, digest: &Digest) -> Result<(), StoreError> {
        let _guard = self.lock("refs")?;
        let mut refs = self.refs()?;
        if refs.get(key) == Some(&digest.to_string()) {
            return Ok(());
        }
        refs.insert(key.to_owned(), digest.to_string());
        let bytes = serde_json::to_vec_pretty(&refs).expect("a map of strings serialises");
        self.write_atomic(&self.root.join("refs.json"), &bytes)
    }

    pub fn get_ref(&self, key: &str) -> Result<Option<Digest>, StoreError> {
        let path = self.root.join("refs.json");
        Ok(match self.refs()?.get(key) {
            Some(s) => {
                Some(
                    s.parse()
                        .map_err(|e: crate::oci::DigestError| StoreError::Corrupt {
                            path,
                            message: e.to_string(),
                        })?,
                )
            }
            None => None,
        })
    }

    pub(crate) fn converted_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("schema1")
            .join(manifest.algorithm().as_str())
            .join(format!("{}.json", manifest.hex()))
    }

    /// Record what the schema 1 manifest `manifest` was converted to. Write it last, once the
    /// config blob and every layer are in the store.
    pub fn set_converted(
        &self,
        manifest: &Digest,
        converted: &Converted,
    ) -> Result<(), StoreError> {
        let path = self.converted_path(manifest);
        let dir = path.parent().expect("records live in a directory");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let bytes = serde_json::to_vec(converted).expect("a record serialises");
        self.write_atomic(&path, &bytes)
    }

    /// The conversion of the schema 1 manifest `manifest`, if recorded and still usable (its
    /// config blob present). The served bytes are verified against `manifest`.
    pub fn get_converted(&self, manifest: &Digest) -> Result<Option<Converted>, StoreError> {
        let path = self.converted_path(manifest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let corrupt = |message: String| StoreError::Corrupt {
            path: path.clone(),
            message,
        };
        let converted: Converted =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let canonical = crate::oci::schema1::canonical_bytes(converted.served.as_bytes())
            .map_err(|e| corrupt(e.to_string()))?;
        if let Err(actual) = manifest.verify(&canonical) {
            return Err(corrupt(format!("its manifest hashes to {actual}")));
        }
        if !self.has_blob(&converted.manifest.config.digest) {
            return Ok(None);
        }
        Ok(Some(converted))
    }

    fn refs(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let path = self.root.join("refs.json");
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_verified_on_write_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("cache")).unwrap();
        let mode = fs::metadata(store.root()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        let good = Digest::sha256(b"config");
        store.put_blob_bytes(&good, b"config").unwrap();
        assert_eq!(store.read_blob(&good).unwrap(), b"config");

        let err = store.put_blob_bytes(&good, b"other").unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        let wrong = Digest::sha256(b"missing");
        assert!(!store.has_blob(&wrong));
        assert!(store.put_blob_bytes(&wrong, b"config").is_err());
        assert!(
            !store.has_blob(&wrong),
            "a mismatching blob must not be stored"
        );

        fs::write(store.blob_path(&good), b"tampered").unwrap();
        let err = store.read_blob(&good).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // pid_max is at most 2^22, so this pid cannot be running.
        let dead = store.root().join("tmp/layer-99999999-0");
        let alive = store
            .root()
            .join(format!("tmp/layer-{}-0", std::process::id()));
        fs::create_dir_all(dead.join("data")).unwrap();
        fs::create_dir_all(&alive).unwrap();
        Store::open(dir.path()).unwrap();
        assert!(!dead.exists());
        assert!(alive.exists());
    }

    #[test]
    fn refs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::sha256(b"m");
        assert_eq!(
            store.get_ref("docker.io/library/busybox:latest").unwrap(),
            None
        );
        store
            .set_ref("docker.io/library/busybox:latest", &d)
            .unwrap();
        assert_eq!(
            store.get_ref("docker.io/library/busybox:latest").unwrap(),
            Some(d)
        );
    }
}
