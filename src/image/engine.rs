//! A mounted image: the [`fs::Backend`](crate::fs::Backend) a FUSE front end serves.
//!
//! The first [`MountedImage::tree`] fetches, verifies and extracts every plain layer
//! (concurrently) and only the footer and TOC of every eStargz layer — recognised by the
//! `containerd.io/snapshot/stargz/toc.digest` annotation on its descriptor, else by the
//! eStargz footer at the end of a gzip blob — then merges their indexes; later calls return
//! the same tree, kept here and nowhere else. Files of eStargz layers are fetched chunk by
//! chunk as they are read. With [`Prefetch::Landmark`] (the default), that first access also
//! fetches each lazy layer's prioritised files (the landmark region) with one Range request,
//! and then the rest of the layer in the background at low priority, as stargz-snapshotter
//! does. The TOC of an annotated layer must match the annotation; an unannotated layer's TOC
//! is used as served (chunks are verified against it, the TOC itself vouched for by nothing in
//! the manifest), unless `require_toc_digest` has such layers fetched whole. A registry that
//! ignores Range ([`SourceFailure::RangeIgnored`](super::SourceFailure)) gets the layer
//! fetched whole once, through the store, instead of a whole body per chunk.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::StreamExt as _;

use super::Error;
use super::resolve::{LAYER_CONCURRENCY, Resolved};
use super::source::{RegistryRanges, RegistrySource, is_range_ignored};
use crate::fs::{Backend, BackendError};
use crate::layer::estargz::TOC_DIGEST_ANNOTATION;
use crate::layer::index::{DataRef, Packed};
use crate::oci::Digest;
use crate::overlay::Tree;
use crate::store::{BlobSource, LayerEvent, LayerJob, LazyLayer, Store};

/// Progress callback for one layer (the store's).
pub type LayerProgress = Arc<dyn Fn(LayerEvent) + Send + Sync>;

/// What to fetch of eStargz layers beyond the files read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// At the first access, the files before `.prefetch.landmark` (one request per layer),
    /// then the rest in the background at low priority.
    Landmark,
    /// Everything in the background from the first access.
    All,
    /// Only the files read.
    None,
}

/// How a mounted image is served.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub prefetch: Prefetch,
    /// Serve eStargz layers lazily only when their descriptor carries the TOC digest
    /// annotation; others are fetched whole and verified first.
    pub require_toc_digest: bool,
    /// The cache bound, enforced (off the first reader's path) once the tree is built.
    pub cache_max: Option<u64>,
    /// How far a walk's reads of a lazy layer extend over the free chunks after them in the
    /// blob ([`crate::store::READ_AROUND`] by default; 0: only what is read).
    pub read_around: u64,
}

/// How a layer download is resumed: 4 attempts, 400 ms doubling (jittered), no deadline (an
/// attempt is retried only after it made progress, see [`LayerJob::retry`]).
pub fn layer_retry() -> crate::retry::RetryPolicy {
    crate::retry::RetryPolicy {
        attempts: 4,
        first_backoff: std::time::Duration::from_millis(400),
        max_backoff: std::time::Duration::from_millis(6400),
        ..crate::retry::RetryPolicy::default()
    }
}

/// The jobs for every layer of `resolved`, base first.
pub fn layer_jobs(resolved: &Resolved) -> Result<Vec<LayerJob>, Error> {
    resolved
        .manifest
        .layers
        .iter()
        .zip(&resolved.config.rootfs.diff_ids)
        .map(|(desc, diff_id)| {
            Ok(LayerJob {
                digest: desc.digest.clone(),
                size: desc.size,
                diff_id: diff_id.clone(),
                compression: desc.compression().map_err(|source| Error::LayerMedia {
                    digest: desc.digest.clone(),
                    source,
                })?,
                limits: resolved.limits,
                retry: layer_retry(),
            })
        })
        .collect()
}

/// Fetch, verify and extract all layers concurrently (bounded); the first failure wins.
/// `progress` gives each layer its callback.
pub async fn fetch_layers(
    store: &Store,
    source: Arc<dyn BlobSource>,
    resolved: &Resolved,
    progress: &(dyn Fn(&LayerJob) -> LayerProgress + Sync),
) -> Result<(), Error> {
    let jobs = layer_jobs(resolved)?;
    let sem = Arc::new(tokio::sync::Semaphore::new(LAYER_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for job in jobs {
        let store = store.clone();
        let source = source.clone();
        let sem = sem.clone();
        let progress = progress(&job);
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore never closes");
            store
                .ensure_layer(source, &job, progress)
                .await
                .map_err(Error::from)
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("layer task panicked")?;
    }
    Ok(())
}

/// Evict least recently used images until the cache fits its bound, if it has one. Images
/// that live mounts use, and `current`, are kept; a failure is logged, never fatal.
pub fn enforce_cache_bound(store: &Store, max: Option<u64>, current: &Digest) {
    let Some(max) = max else { return };
    match store.prune_to(max, std::slice::from_ref(current)) {
        Ok(r) if !r.images.is_empty() => tracing::info!(
            images = r.images.len(),
            freed = %crate::store::format_size(r.bytes),
            "cache over its bound: evicted the least recently used images"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("enforcing the cache bound: {}", crate::error::Chain(&e)),
    }
}

/// Set the process's allocator up for a long-lived server (glibc only; a no-op elsewhere).
/// Call once, before the threads start. glibc by default raises its mmap threshold up to
/// 32 MiB and its trim threshold up to 64 MiB after a big block is freed, and gives each of
/// up to 8 × cores threads an arena of its own. After a tree build (hundreds of MB of
/// transient index and merge state, spread over the arenas of the threads that fetched,
/// extracted and merged) that left tens of MB of free but resident memory per arena, which
/// `malloc_trim` does not return (a thread arena's free top is only trimmed past the trim
/// threshold): 141 B per entry on a million-entry layer where the tree itself needs about
/// 100. Fixed thresholds keep blocks of 4 MiB and more in their own mappings (returned on
/// free) and trim arena tops past 8 MiB, high enough that read and extraction buffers are
/// reused rather than mapped afresh; one arena per core is enough, as no more threads than
/// cores run at once. With these, 97 B per entry.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        // SAFETY: mallopt only changes allocator parameters; called before other threads
        // allocate, as the glibc manual advises.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
            libc::mallopt(libc::M_ARENA_MAX, cores.clamp(2, 64) as libc::c_int);
        }
    }
}

/// Give the memory freed after a tree build back to the system. The layer indexes and the
/// merge's working set (hundreds of MB for a million-entry layer) are freed at once, below
/// the compact tree allocated last; glibc keeps such memory in its heap until
/// `malloc_trim` returns it, so without this the daemon's RSS would stay at its peak for as
/// long as the mount lives. Other allocators return it themselves.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A resolved image served from the store, fetching what is missing on demand.
pub struct MountedImage {
    store: Store,
    source: Arc<RegistrySource>,
    ranges: Arc<RegistryRanges>,
    resolved: Resolved,
    rt: tokio::runtime::Handle,
    options: ServeOptions,
    /// Per layer, the lazily served eStargz layer (`None`: extracted whole). Set once by the
    /// build that succeeded, before the tree is published.
    lazy: OnceLock<Vec<Option<Arc<LazyLayer>>>>,
    /// The merged tree once built — the one copy every reader uses. `OnceLock`: after the
    /// first success every FUSE handler reads it without contention. Failures are not kept:
    /// the next request builds again (e.g. once the network is back).
    tree: OnceLock<Tree>,
    /// Single flight for the build: the first caller builds, the others wait here and then
    /// find the tree.
    building: Mutex<()>,
    /// Per layer, where its small files sit in its pack (the index's
    /// [`LayerIndex::packed`](crate::layer::LayerIndex); empty for lazy layers), kept from
    /// the build. Set together with `lazy`.
    packed: OnceLock<Vec<Packed>>,
    /// Lazy layers extracted whole because the registry ignored Range, with their pack
    /// tables: their files are copied from the extracted layer. A std Mutex: held for map
    /// lookups only.
    whole: Mutex<HashMap<u32, Arc<Packed>>>,
    /// Single flight for those whole fetches; held across the fetch (a FUSE thread waits for
    /// the layer anyway).
    whole_flight: Mutex<()>,
    /// Per (layer, file data id) of a lazy file, where its last read ended: a read starting
    /// there is sequential, and the next [`READ_AHEAD`] bytes are fetched in the background
    /// while the reader consumes this one. A std Mutex, held for one insert.
    read_ends: Mutex<HashMap<(u32, u32), u64>>,
}

/// How far ahead of a sequential reader of a lazy file its chunks are fetched: two chunks of
/// the usual 4 MiB, so the next chunk's fetch, decompression and verification overlap the
/// reader's consumption of this one.
pub const READ_AHEAD: u64 = 8 << 20;

/// How long after the first access (the tree build) the background fill of lazy layers
/// waits before its first request. A program's or a container's start reads in bursts with
/// gaps longer than the readers' quiet period (`store::estargz::READERS_QUIET`: runc setting
/// the container up, a shell starting the next program), and a fill slipping into those gaps
/// held the start back: containerd's `ctr run … cat` of an eStargz image took 0.90–1.05 s
/// with the fill, 0.58–0.60 s without (2 cores, docs/benchmarks-notes.md). The readers' own
/// fetches, the landmark prefetch included, do not wait.
pub const FILL_START: std::time::Duration = std::time::Duration::from_secs(1);

/// Files whose last read end is remembered; past it the table starts over (a reader that
/// loses its entry only misses one read-ahead).
const READ_ENDS_MAX: usize = 4096;

impl MountedImage {
    /// Serve `resolved`, fetching through `source`; async work runs on `rt`.
    pub fn new(
        store: Store,
        source: Arc<RegistrySource>,
        resolved: Resolved,
        rt: tokio::runtime::Handle,
        options: ServeOptions,
    ) -> MountedImage {
        MountedImage {
            store,
            ranges: Arc::new(RegistryRanges::new(source.clone())),
            source,
            resolved,
            rt,
            options,
            lazy: OnceLock::new(),
            tree: OnceLock::new(),
            building: Mutex::new(()),
            packed: OnceLock::new(),
            whole: Mutex::new(HashMap::new()),
            whole_flight: Mutex::new(()),
            read_ends: Mutex::new(HashMap::new()),
        }
    }

    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    fn diff_ids(&self) -> &[Digest] {
        &self.resolved.config.rootfs.diff_ids
    }

    /// Whether every layer is extracted in the store: the tree can then be built with no
    /// network, e.g. before mounting so that the root's attributes are real from the start.
    pub fn is_local(&self) -> bool {
        self.diff_ids().iter().all(|d| self.store.has_layer(d))
    }

    /// The merged tree, built on the first call (blocking until every layer it needs is
    /// there); later calls return the same tree.
    pub fn tree(&self) -> Result<&Tree, Error> {
        if let Some(t) = self.tree.get() {
            return Ok(t);
        }
        let _building = self.building.lock().expect("build lock");
        if let Some(t) = self.tree.get() {
            return Ok(t);
        }
        let tree = self.build()?;
        Ok(self.tree.get_or_init(|| tree))
    }

    fn build(&self) -> Result<Tree, Error> {
        let started = std::time::Instant::now();
        let lazy = self.rt.block_on(self.lazy_layers())?;
        self.rt.block_on(self.fetch(&lazy))?;
        let fetched = started.elapsed();
        let mut indexes = Vec::with_capacity(lazy.len());
        let mut packed = Vec::with_capacity(lazy.len());
        for (d, l) in self.diff_ids().iter().zip(&lazy) {
            let mut index = match l {
                Some(l) => l.take_index(),
                None => self.store.load_layer_index(d)?,
            };
            packed.push(std::mem::take(&mut index.packed));
            indexes.push(index);
        }
        let tree = crate::overlay::merge(&indexes).map_err(|source| Error::Merge {
            reference: self.resolved.reference.to_string(),
            source,
        })?;
        let layers = indexes.len();
        drop(indexes);
        release_freed_memory();
        tracing::info!(
            layers,
            lazy = lazy.iter().flatten().count(),
            inodes = tree.inodes.len(),
            fetch_ms = fetched.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "image tree ready"
        );
        let _ = self.packed.set(packed);
        let _ = self.lazy.set(lazy);
        // Sizing the cache walks every layer directory: not on the first reader's path.
        if self.options.cache_max.is_some() {
            let (store, max) = (self.store.clone(), self.options.cache_max);
            let image = self.resolved.manifest_digest.clone();
            self.rt
                .spawn_blocking(move || enforce_cache_bound(&store, max, &image));
        }
        self.start_prefetch();
        Ok(tree)
    }

    /// Every layer that is not lazy, fetched whole (concurrently, bounded), together with
    /// the landmark regions of the lazy ones.
    async fn fetch(&self, lazy: &[Option<Arc<LazyLayer>>]) -> Result<(), Error> {
        let jobs = layer_jobs(&self.resolved)?;
        let source: Arc<dyn BlobSource> = self.source.clone();
        let whole = jobs
            .iter()
            .zip(lazy)
            .filter(|(_, l)| l.is_none())
            .map(|(job, _)| {
                let source = source.clone();
                async move {
                    self.store
                        .ensure_layer(source, job, Arc::new(|_| {}))
                        .await
                        .map_err(Error::from)
                }
            });
        let mut results = futures_util::stream::iter(whole).buffer_unordered(LAYER_CONCURRENCY);
        let wholes = async {
            while let Some(r) = results.next().await {
                r?;
            }
            Ok::<(), Error>(())
        };
        let ((), r) = futures_util::future::join(self.fetch_landmarks(lazy), wholes).await;
        r
    }

    /// With [`Prefetch::Landmark`], each lazy layer's landmark region, one request per
    /// layer. A failure only costs the prioritised files their head start: they are fetched
    /// when read.
    async fn fetch_landmarks(&self, lazy: &[Option<Arc<LazyLayer>>]) {
        if self.options.prefetch != Prefetch::Landmark || self.source.offline {
            return;
        }
        let fetches = lazy.iter().flatten().map(|l| async move {
            if let Err(e) = l.fetch_landmark(&*self.ranges).await {
                tracing::warn!(digest = %l.digest(), "prefetching the landmark region: {}", crate::error::Chain(&e));
            }
        });
        futures_util::future::join_all(fetches).await;
    }

    /// One background task per lazy layer, starting [`FILL_START`] after the tree is built
    /// and yielding to readers (see [`LazyLayer::fill`]); they end with the runtime at
    /// unmount.
    fn start_prefetch(&self) {
        // Offline, there is nothing to fetch from.
        if self.options.prefetch == Prefetch::None || self.source.offline {
            return;
        }
        for l in self.lazy.get().into_iter().flatten().flatten() {
            let (l, ranges) = (l.clone(), self.ranges.clone());
            self.rt.spawn(async move {
                tokio::time::sleep(FILL_START).await;
                let started = std::time::Instant::now();
                match l.fill(&*ranges).await {
                    Ok(()) => tracing::info!(
                        digest = %l.digest(),
                        ms = started.elapsed().as_millis() as u64,
                        "prefetch done"
                    ),
                    Err(e) => tracing::warn!(digest = %l.digest(), "prefetch stopped: {}", crate::error::Chain(&e)),
                }
            });
        }
    }

    /// Per layer, its lazy eStargz form when it is eStargz (a TOC digest annotation, else —
    /// for gzip layers, unless `require_toc_digest` — an eStargz footer), is not extracted
    /// already, and its footer and TOC are usable (else it is fetched whole).
    async fn lazy_layers(&self) -> Result<Vec<Option<Arc<LazyLayer>>>, Error> {
        let layers = &self.resolved.manifest.layers;
        let probes = layers
            .iter()
            .zip(self.diff_ids())
            .map(|(desc, diff_id)| self.lazy_layer_of(desc, diff_id));
        futures_util::future::try_join_all(probes).await
    }

    async fn lazy_layer_of(
        &self,
        desc: &crate::oci::manifest::Descriptor,
        diff_id: &Digest,
    ) -> Result<Option<Arc<LazyLayer>>, Error> {
        if self.store.has_layer(diff_id) {
            return Ok(None);
        }
        let toc = match desc
            .annotation(TOC_DIGEST_ANNOTATION)
            .map(str::parse::<Digest>)
        {
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                tracing::warn!(digest = %desc.digest, "bad {TOC_DIGEST_ANNOTATION} annotation, fetching the layer whole: {e}");
                return Ok(None);
            }
            None if self.options.require_toc_digest => return Ok(None),
            None if desc.compression().ok() != Some(crate::oci::Compression::Gzip) => {
                return Ok(None);
            }
            None => None,
        };
        let l = match self
            .store
            .lazy_layer(
                &*self.ranges,
                &desc.digest,
                desc.size,
                toc.as_ref(),
                self.resolved.limits.max_entries,
            )
            .await
        {
            Err(e) if is_range_ignored(&e) => {
                if toc.is_some() {
                    tracing::warn!(digest = %desc.digest, "the registry ignores Range: fetching the layer whole");
                }
                return Ok(None);
            }
            // Only the footer tells an unannotated layer is eStargz: when it cannot be read
            // (offline, say), the layer is what its media type says, fetched whole (or found
            // in the cache) like any gzip layer.
            Err(e) if toc.is_none() => {
                tracing::debug!(digest = %desc.digest, "no eStargz footer read: {}", crate::error::Chain(&e));
                return Ok(None);
            }
            l => l.map_err(Error::from)?,
        };
        if let (Some(_), None) = (&l, &toc) {
            tracing::info!(digest = %desc.digest, "eStargz layer without a {TOC_DIGEST_ANNOTATION} annotation: served lazily with its TOC as the registry sent it (--require-toc-digest fetches such layers whole)");
        }
        Ok(l.map(|l| Arc::new(l.with_read_around(self.options.read_around))))
    }

    fn lazy_layer(&self, layer: u32) -> Option<&Arc<LazyLayer>> {
        self.lazy.get()?.get(layer as usize)?.as_ref()
    }

    /// Serve a file of lazy layer `layer` from the layer fetched whole (once, through the
    /// store: blob digest and diff_id verified), for a registry that ignores Range.
    fn ensure_from_whole(&self, layer: u32, l: &LazyLayer, data: DataRef) -> Result<(), Error> {
        let diff_id = &self.diff_ids()[layer as usize];
        let packed = self.extracted_whole(layer, diff_id)?;
        let at = packed.get(data);
        let content = self.store.open_data(diff_id, data, at)?;
        l.fill_from(data, &content)?;
        Ok(())
    }

    /// Lazy layer `layer` extracted whole through the store (once), and its pack table.
    fn extracted_whole(&self, layer: u32, diff_id: &Digest) -> Result<Arc<Packed>, Error> {
        let known = || self.whole.lock().expect("whole lock").get(&layer).cloned();
        if let Some(p) = known() {
            return Ok(p);
        }
        let _flight = self.whole_flight.lock().expect("whole flight lock");
        if let Some(p) = known() {
            return Ok(p);
        }
        let jobs = layer_jobs(&self.resolved)?;
        let source: Arc<dyn BlobSource> = self.source.clone();
        self.rt
            .block_on(
                self.store
                    .ensure_layer(source, &jobs[layer as usize], Arc::new(|_| {})),
            )
            .map_err(Error::from)?;
        let packed = Arc::new(self.store.load_layer_index(diff_id)?.packed);
        self.whole
            .lock()
            .expect("whole lock")
            .insert(layer, packed.clone());
        Ok(packed)
    }

    /// Make bytes `offset..offset+len` of a file of layer `layer` local.
    fn ensure_range(&self, layer: u32, data: DataRef, offset: u64, len: u64) -> Result<(), Error> {
        let Some(l) = self.lazy_layer(layer) else {
            return Ok(());
        };
        if !self.ranges.ignored(l.digest()) {
            let range = offset..offset.saturating_add(len);
            match self
                .rt
                .block_on(l.ensure(&*self.ranges, data, range.clone()))
            {
                Ok(()) => {
                    self.read_ahead(layer, l, data, range);
                    return Ok(());
                }
                Err(e) if is_range_ignored(&e) => {}
                Err(source) => {
                    return Err(Error::Chunk {
                        offset,
                        len,
                        source: Box::new(source),
                    });
                }
            }
        }
        self.ensure_from_whole(layer, l, data)
    }

    /// After a read of `read` that continues the previous one (or starts the file), fetch the
    /// next [`READ_AHEAD`] bytes in the background, unless they are present or in flight.
    /// Through [`LazyLayer::ensure`]: it counts as a reader (the fill waits) and shares the
    /// single-flight map, so the reader's next request waits for it instead of fetching again.
    fn read_ahead(&self, layer: u32, l: &Arc<LazyLayer>, data: DataRef, read: Range<u64>) {
        let sequential = {
            let mut ends = self.read_ends.lock().expect("read_ends lock");
            if ends.len() >= READ_ENDS_MAX {
                ends.clear();
            }
            let previous = ends.insert((layer, data.id), read.end);
            read.start == 0 || previous == Some(read.start)
        };
        let ahead = read.end..read.end.saturating_add(READ_AHEAD);
        if !sequential || !l.has_unclaimed(data, ahead.clone()) {
            return;
        }
        let (l, ranges) = (l.clone(), self.ranges.clone());
        self.rt.spawn(async move {
            if let Err(e) = l.ensure(&*ranges, data, ahead).await {
                // The reader fetches them itself when it gets there, and reports a failure.
                tracing::debug!(digest = %l.digest(), "read-ahead: {}", crate::error::Chain(&e));
            }
        });
    }

    fn open_file(&self, layer: u32, data: DataRef) -> Result<std::fs::File, Error> {
        if let Some(l) = self.lazy_layer(layer) {
            return Ok(l.data_file(data)?);
        }
        let diff_id = self
            .diff_ids()
            .get(layer as usize)
            .ok_or(Error::NoLayer { layer })?;
        let at = self
            .packed
            .get()
            .and_then(|p| p.get(layer as usize)?.get(data));
        Ok(self.store.open_data(diff_id, data, at)?)
    }
}

impl Backend for MountedImage {
    fn tree(&self) -> Result<&Tree, BackendError> {
        MountedImage::tree(self).map_err(BackendError::new)
    }

    fn built_tree(&self) -> Option<&Tree> {
        self.tree.get()
    }

    fn open(&self, layer: u32, data: DataRef) -> Result<std::fs::File, BackendError> {
        self.open_file(layer, data).map_err(BackendError::new)
    }

    fn is_complete(&self, layer: u32, data: DataRef) -> bool {
        self.lazy_layer(layer).is_none_or(|l| l.is_complete(data))
    }

    fn ensure(&self, layer: u32, data: DataRef, offset: u64, len: u64) -> Result<(), BackendError> {
        self.ensure_range(layer, data, offset, len)
            .map_err(BackendError::new)
    }
}
