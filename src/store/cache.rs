//! Cache accounting and eviction: which images the store holds (with their layers and when
//! each was last used), which of them live mounts use, how much disk each kind of entry
//! takes, and how to get back under a size bound without breaking a mount or leaving an
//! entry that looks complete but is not.
//!
//! Layout added to the store:
//!
//! ```text
//! images/sha256/<hex>.json   an image (by manifest digest): references, config, layers, last use
//! mounts/<pid>.json          a live mount: its image; stale when the pid is gone
//! pins/<owner>.json          images an owner needs kept whether it runs or not (the
//!                            containerd snapshotter's remote snapshots)
//! ```
//!
//! Deletion order keeps the store's invariants: an extracted layer or eStargz cache is
//! renamed into `tmp/` (atomic: it stops looking complete at once) and removed from there; a
//! crash in between leaves only a temporary that the next `Store::open` removes. Blobs are
//! single files, removed at once. The image record goes first, so an interrupted eviction
//! never leaves a record pointing at missing data that looks present.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Store, StoreError, io_err};
use crate::oci::Digest;

/// One layer of an image, as its manifest and config name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub blob: Digest,
    pub diff_id: Digest,
    /// Compressed size from the manifest.
    pub size: u64,
}

/// An image the store knows, by manifest digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub manifest: Digest,
    pub config: Digest,
    /// `registry/repository:tag` or `…@sha256:…` spellings it was used by.
    pub references: BTreeSet<String>,
    pub layers: Vec<LayerRecord>,
    /// Milliseconds since the epoch of the last pull, mount or inspect.
    pub last_used_ms: u64,
}

/// A running mount of an image, registered by its daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveMount {
    pub pid: u32,
    pub manifest: Digest,
    pub mountpoint: PathBuf,
}

/// Removes the live-mount record when the daemon ends.
pub struct MountRegistration {
    path: PathBuf,
}

impl Drop for MountRegistration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Disk bytes (allocated blocks, so sparse chunk caches count what they hold) by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub blobs: u64,
    pub layers: u64,
    pub estargz: u64,
    /// Partial downloads, temporaries, logs, records.
    pub other: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.blobs + self.layers + self.estargz + self.other
    }
}

/// What one image occupies: everything its layers and documents take, and the part no other
/// image shares (what evicting it alone would free).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageUsage {
    pub record: ImageRecord,
    pub bytes: u64,
    pub exclusive: u64,
    pub mounts: Vec<LiveMount>,
}

/// What a prune or gc removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub images: Vec<Digest>,
    pub entries: usize,
    pub bytes: u64,
}

/// One corrupt entry found by [`Store::verify`] (and dropped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corrupt {
    pub path: PathBuf,
    pub reason: String,
}

/// Which images to evict, least recently used first, to fit `max_bytes`: never one in
/// `protected`; an image's cost is what it alone occupies given the images kept so far.
/// Pure: `sizes` gives each entry's bytes, `entries` each image's entries.
pub fn plan_eviction(
    images: &[(Digest, u64, Vec<String>)],
    sizes: &BTreeMap<String, u64>,
    protected: &BTreeSet<Digest>,
    max_bytes: u64,
) -> Vec<Digest> {
    let total = |kept: &[&(Digest, u64, Vec<String>)]| -> u64 {
        let entries: BTreeSet<&String> = kept.iter().flat_map(|(_, _, e)| e).collect();
        entries
            .iter()
            .map(|e| sizes.get(*e).copied().unwrap_or(0))
            .sum()
    };
    let mut order: Vec<&(Digest, u64, Vec<String>)> = images.iter().collect();
    // Oldest first; ties by digest so the plan is deterministic.
    order.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    let mut kept: Vec<&(Digest, u64, Vec<String>)> = order.clone();
    let mut evict = Vec::new();
    for candidate in order {
        if total(&kept) <= max_bytes {
            break;
        }
        if protected.contains(&candidate.0) {
            continue;
        }
        kept.retain(|k| k.0 != candidate.0);
        evict.push(candidate.0.clone());
    }
    evict
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Allocated bytes under `path` (a file or a directory tree); 0 when missing.
fn disk_bytes(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let Ok(dir) = fs::read_dir(path) else {
        return own;
    };
    own + dir.flatten().map(|e| disk_bytes(&e.path())).sum::<u64>()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Store {
    fn image_record_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("images")
            .join(manifest.algorithm().as_str())
            .join(format!("{}.json", manifest.hex()))
    }

    /// Record that `manifest` (config `config`, `layers`) was used now, as `reference`.
    pub fn record_image(
        &self,
        reference: &str,
        manifest: &Digest,
        config: &Digest,
        layers: Vec<LayerRecord>,
    ) -> Result<(), StoreError> {
        let _guard = self.lock("images")?;
        let path = self.image_record_path(manifest);
        let mut record = self.read_image_record(&path).unwrap_or(ImageRecord {
            manifest: manifest.clone(),
            config: config.clone(),
            references: BTreeSet::new(),
            layers: Vec::new(),
            last_used_ms: 0,
        });
        record.references.insert(reference.to_owned());
        record.layers = layers;
        record.config = config.clone();
        record.last_used_ms = now_ms();
        let dir = path.parent().expect("records live in a directory");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let bytes = serde_json::to_vec_pretty(&record).expect("a record serialises");
        self.write_atomic_unsynced(&path, &bytes)
    }

    fn read_image_record(&self, path: &Path) -> Option<ImageRecord> {
        let bytes = fs::read(path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring a corrupt image record: {e}");
                None
            }
        }
    }

    /// Every image recorded, most recently used first.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut out = Vec::new();
        for alg in ["sha256", "sha512"] {
            let dir = self.root.join("images").join(alg);
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            };
            out.extend(
                entries
                    .flatten()
                    .filter_map(|e| self.read_image_record(&e.path())),
            );
        }
        out.sort_by(|a, b| (b.last_used_ms, &a.manifest).cmp(&(a.last_used_ms, &b.manifest)));
        Ok(out)
    }

    /// Register a live mount of `manifest` at `mountpoint` for as long as the guard lives.
    pub fn register_mount(
        &self,
        manifest: &Digest,
        mountpoint: &Path,
    ) -> Result<MountRegistration, StoreError> {
        let dir = self.root.join("mounts");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let pid = std::process::id();
        let path = dir.join(format!("{pid}.json"));
        let record = LiveMount {
            pid,
            manifest: manifest.clone(),
            mountpoint: mountpoint.to_owned(),
        };
        let bytes = serde_json::to_vec(&record).expect("a record serialises");
        self.write_atomic_unsynced(&path, &bytes)?;
        Ok(MountRegistration { path })
    }

    /// Keep `manifests` (images recorded in the store) from eviction on behalf of `owner`
    /// until the next call with the same owner replaces the set; an empty set drops the pin.
    /// Unlike a live mount, a pin holds while its owner is not running: a containerd
    /// snapshotter's committed snapshots must stay servable across its restarts.
    pub fn pin(&self, owner: &str, manifests: &BTreeSet<Digest>) -> Result<(), StoreError> {
        let dir = self.root.join("pins");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join(format!("{owner}.json"));
        if manifests.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
                _ => Ok(()),
            };
        }
        let bytes = serde_json::to_vec_pretty(manifests).expect("digests serialise");
        self.write_atomic(&path, &bytes)
    }

    /// Every image a pin holds.
    pub fn pinned(&self) -> BTreeSet<Digest> {
        let Ok(dir) = fs::read_dir(self.root.join("pins")) else {
            return BTreeSet::new();
        };
        dir.flatten()
            .filter_map(|e| fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<BTreeSet<Digest>>(&b).ok())
            .flatten()
            .collect()
    }

    /// Images eviction must keep: those of live mounts and pins.
    fn protected(&self) -> BTreeSet<Digest> {
        let mut p = self.pinned();
        p.extend(self.live_mounts().into_iter().map(|m| m.manifest));
        p
    }

    /// Disk bytes a layer occupies in the store: its blob, extracted tree and eStargz cache.
    pub fn layer_disk_bytes(&self, blob: &Digest, diff_id: &Digest) -> u64 {
        [
            self.blob_path(blob),
            self.layer_dir(diff_id),
            self.estargz_dir(blob),
        ]
        .iter()
        .map(|p| disk_bytes(p))
        .sum()
    }

    /// Mounts whose daemon still runs; records of dead ones are removed.
    pub fn live_mounts(&self) -> Vec<LiveMount> {
        let Ok(dir) = fs::read_dir(self.root.join("mounts")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in dir.flatten() {
            let Some(m) = fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<LiveMount>(&b).ok())
            else {
                continue;
            };
            if pid_alive(m.pid) {
                out.push(m);
            } else {
                let _ = fs::remove_file(e.path());
            }
        }
        out
    }

    /// The store entries an image uses, as keys of [`Store::entry_sizes`].
    fn image_entries(&self, r: &ImageRecord) -> Vec<String> {
        let mut v = vec![
            format!("blob:{}", r.manifest),
            format!("blob:{}", r.config),
            // Only schema 1 images have one; a missing entry weighs nothing.
            format!("schema1:{}", r.manifest),
        ];
        for l in &r.layers {
            v.push(format!("blob:{}", l.blob));
            v.push(format!("layer:{}", l.diff_id));
            v.push(format!("estargz:{}", l.blob));
        }
        v
    }

    fn entry_path(&self, key: &str) -> Option<PathBuf> {
        let (kind, digest) = key.split_once(':')?;
        let d: Digest = digest.parse().ok()?;
        Some(match kind {
            "blob" => self.blob_path(&d),
            "layer" => self.layer_dir(&d),
            "estargz" => self.estargz_dir(&d),
            "schema1" => self.converted_path(&d),
            _ => return None,
        })
    }

    /// Disk bytes of every entry of every recorded image.
    fn entry_sizes(&self, images: &[ImageRecord]) -> BTreeMap<String, u64> {
        images
            .iter()
            .flat_map(|r| self.image_entries(r))
            .map(|k| {
                let size = self.entry_path(&k).map(|p| disk_bytes(&p)).unwrap_or(0);
                (k, size)
            })
            .collect()
    }

    /// Disk usage by kind, each entry counted once however many images share it.
    pub fn usage(&self) -> Usage {
        // One walk: each top-level entry is counted in its kind.
        let mut u = Usage::default();
        for e in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let bytes = disk_bytes(&e.path());
            match e.file_name().to_str() {
                Some("blobs") => u.blobs += bytes,
                Some("layers") => u.layers += bytes,
                Some("estargz") => u.estargz += bytes,
                _ => u.other += bytes,
            }
        }
        u
    }

    /// Each recorded image with what it occupies and which live mounts use it.
    pub fn image_usage(&self) -> Result<Vec<ImageUsage>, StoreError> {
        let images = self.images()?;
        let sizes = self.entry_sizes(&images);
        let mounts = self.live_mounts();
        let mut users: BTreeMap<&String, usize> = BTreeMap::new();
        let entries: Vec<Vec<String>> = images.iter().map(|r| self.image_entries(r)).collect();
        for e in &entries {
            for k in e.iter().collect::<BTreeSet<_>>() {
                *users.entry(k).or_default() += 1;
            }
        }
        Ok(images
            .iter()
            .zip(&entries)
            .map(|(r, e)| {
                let e: BTreeSet<&String> = e.iter().collect();
                ImageUsage {
                    record: r.clone(),
                    bytes: e.iter().map(|k| sizes[*k]).sum(),
                    exclusive: e.iter().filter(|k| users[*k] == 1).map(|k| sizes[*k]).sum(),
                    mounts: mounts
                        .iter()
                        .filter(|m| m.manifest == r.manifest)
                        .cloned()
                        .collect(),
                }
            })
            .collect())
    }

    /// Evict least recently used images until the images' data fits `max_bytes` (`0`: evict
    /// every image that no live mount uses). Images of live mounts, and `keep`, are kept.
    pub fn prune_to(&self, max_bytes: u64, keep: &[Digest]) -> Result<Removed, StoreError> {
        let _guard = self.lock("images")?;
        let images = self.images()?;
        let sizes = self.entry_sizes(&images);
        let mut protected = self.protected();
        protected.extend(keep.iter().cloned());
        let plan: Vec<(Digest, u64, Vec<String>)> = images
            .iter()
            .map(|r| (r.manifest.clone(), r.last_used_ms, self.image_entries(r)))
            .collect();
        let evict = plan_eviction(&plan, &sizes, &protected, max_bytes);
        self.evict(&images, &evict)
    }

    /// Evict the images last used before `cutoff` that no live mount uses.
    pub fn prune_older_than(&self, age: Duration) -> Result<Removed, StoreError> {
        let _guard = self.lock("images")?;
        let images = self.images()?;
        let cutoff = now_ms().saturating_sub(age.as_millis() as u64);
        let protected = self.protected();
        let evict: Vec<Digest> = images
            .iter()
            .filter(|r| r.last_used_ms < cutoff && !protected.contains(&r.manifest))
            .map(|r| r.manifest.clone())
            .collect();
        self.evict(&images, &evict)
    }

    /// Drop the record of `manifest` (and the tags naming it), leaving its entries for
    /// [`Store::gc`] to reclaim unless another image uses them; not while a live mount or a
    /// pin keeps it (`false` then). For an owner that recorded the image only to serve it
    /// (the snapshotter, when its last snapshot of the image is removed).
    pub fn forget_image(&self, manifest: &Digest) -> Result<bool, StoreError> {
        let _guard = self.lock("images")?;
        if self.protected().contains(manifest) {
            return Ok(false);
        }
        let path = self.image_record_path(manifest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&path)(e)),
            _ => {}
        }
        self.drop_refs_to(manifest)?;
        Ok(true)
    }

    /// Remove the records of `evict`, then every entry of theirs that no kept image uses.
    fn evict(&self, images: &[ImageRecord], evict: &[Digest]) -> Result<Removed, StoreError> {
        let mut removed = Removed::default();
        if evict.is_empty() {
            return Ok(removed);
        }
        let kept: BTreeSet<String> = images
            .iter()
            .filter(|r| !evict.contains(&r.manifest))
            .flat_map(|r| self.image_entries(r))
            .collect();
        for r in images.iter().filter(|r| evict.contains(&r.manifest)) {
            let path = self.image_record_path(&r.manifest);
            fs::remove_file(&path).map_err(io_err(&path))?;
            self.drop_refs_to(&r.manifest)?;
            removed.images.push(r.manifest.clone());
            for key in self.image_entries(r) {
                if kept.contains(&key) {
                    continue;
                }
                if let Some(p) = self.entry_path(&key)
                    && p.exists()
                {
                    removed.bytes += disk_bytes(&p);
                    removed.entries += 1;
                    self.remove_entry(&p)?;
                }
            }
            tracing::info!(image = %r.manifest, "evicted from the cache");
        }
        Ok(removed)
    }

    /// Remove a blob file, or a layer / eStargz directory by renaming it into `tmp/` first.
    fn remove_entry(&self, path: &Path) -> Result<(), StoreError> {
        if path.is_dir() {
            let trash = self.temp_path("evicted");
            fs::rename(path, &trash).map_err(io_err(path))?;
            fs::remove_dir_all(&trash).map_err(io_err(&trash))
        } else {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
                _ => Ok(()),
            }
        }
    }

    fn drop_refs_to(&self, manifest: &Digest) -> Result<(), StoreError> {
        let _guard = self.lock("refs")?;
        let mut refs = self.refs()?;
        let before = refs.len();
        refs.retain(|_, d| d != &manifest.to_string());
        if refs.len() != before {
            let bytes = serde_json::to_vec_pretty(&refs).expect("a map of strings serialises");
            self.write_atomic(&self.root.join("refs.json"), &bytes)?;
        }
        Ok(())
    }

    /// Remove blobs, extracted layers and eStargz caches that no recorded image uses and that
    /// are older than `min_age` (younger ones may belong to a pull in progress). Documents
    /// referenced by `refs.json` (an index, say) are kept.
    pub fn gc(&self, min_age: Duration) -> Result<Removed, StoreError> {
        let _guard = self.lock("images")?;
        let images = self.images()?;
        let mut used: BTreeSet<PathBuf> = images
            .iter()
            .flat_map(|r| self.image_entries(r))
            .filter_map(|k| self.entry_path(&k))
            .collect();
        for d in self.refs()?.values() {
            if let Ok(d) = d.parse::<Digest>() {
                used.insert(self.blob_path(&d));
            }
        }
        let cutoff = SystemTime::now() - min_age;
        let mut removed = Removed::default();
        for kind in ["blobs", "layers", "estargz", "schema1"] {
            for alg in ["sha256", "sha512"] {
                let dir = self.root.join(kind).join(alg);
                let Ok(entries) = fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let p = e.path();
                    let young = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t > cutoff);
                    if used.contains(&p) || young {
                        continue;
                    }
                    removed.bytes += disk_bytes(&p);
                    removed.entries += 1;
                    self.remove_entry(&p)?;
                }
            }
        }
        Ok(removed)
    }

    /// Re-hash every blob against its name (dropping the ones that do not match) and every
    /// locally present eStargz chunk against its `chunkDigest` (forgetting the bad ones, so
    /// they are fetched again). Returns how many blobs and chunks were checked.
    pub fn verify(&self) -> Result<(usize, Vec<Corrupt>), StoreError> {
        let mut checked = 0;
        let mut corrupt = Vec::new();
        for alg in ["sha256", "sha512"] {
            let Ok(entries) = fs::read_dir(self.root.join("estargz").join(alg)) else {
                continue;
            };
            for e in entries.flatten() {
                let Some(blob) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| format!("{alg}:{n}").parse::<Digest>().ok())
                else {
                    continue;
                };
                let Some(layer) = self.load_lazy_layer(&blob, None)? else {
                    continue;
                };
                let (n, bad) = layer.verify_local()?;
                checked += n;
                for (id, chunk) in bad {
                    corrupt.push(Corrupt {
                        path: e.path().join("data").join(id.to_string()),
                        reason: format!(
                            "chunk {chunk} does not match its chunkDigest; it will be fetched again"
                        ),
                    });
                }
            }
        }
        for alg in ["sha256", "sha512"] {
            let dir = self.root.join("blobs").join(alg);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                let Some(want) = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| format!("{alg}:{n}").parse::<Digest>().ok())
                else {
                    continue;
                };
                checked += 1;
                let mut f = fs::File::open(&p).map_err(io_err(&p))?;
                let mut h = want.hasher();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = io::Read::read(&mut f, &mut buf).map_err(io_err(&p))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                let got = h.finish();
                if got != want {
                    self.remove_entry(&p)?;
                    corrupt.push(Corrupt {
                        path: p,
                        reason: format!("content hashes to {got}; removed"),
                    });
                }
            }
        }
        Ok((checked, corrupt))
    }
}

/// `12.3 MiB`-style rendering of a byte count.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::sha256(&[n])
    }

    #[test]
    fn sizes_format() {
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(20 << 30), "20.0 GiB");
    }

    /// (image, last used, entries); entry `s` shared by images 1 and 2.
    fn plan(max: u64, protected: &[u8]) -> Vec<Digest> {
        let images = vec![
            (d(1), 100, vec!["a".to_owned(), "s".to_owned()]),
            (d(2), 200, vec!["b".to_owned(), "s".to_owned()]),
            (d(3), 300, vec!["c".to_owned()]),
        ];
        let sizes: BTreeMap<String, u64> = [("a", 10), ("b", 20), ("c", 30), ("s", 40)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let protected: BTreeSet<Digest> = protected.iter().map(|n| d(*n)).collect();
        plan_eviction(&images, &sizes, &protected, max)
    }

    #[test]
    fn eviction_takes_the_least_recently_used_and_counts_shared_entries_once() {
        // Everything: 10 + 20 + 30 + 40 = 100.
        assert_eq!(plan(100, &[]), Vec::<Digest>::new());
        // Evicting image 1 frees only `a` (10): `s` stays for image 2.
        assert_eq!(plan(90, &[]), [d(1)]);
        assert_eq!(plan(60, &[]), [d(1), d(2)]);
        assert_eq!(plan(0, &[]), [d(1), d(2), d(3)]);
        // A mounted image is skipped; the next oldest goes instead.
        assert_eq!(plan(90, &[1]), [d(2)]);
        assert_eq!(plan(0, &[1, 2, 3]), Vec::<Digest>::new());
    }
}
