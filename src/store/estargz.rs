//! Lazily fetched eStargz layers: the verified TOC (as a layer index plus chunk map) and the
//! file chunks fetched so far, so that reading one file costs a few Range requests and a
//! remount needs no network for what was read before.
//!
//! Layout under the store root, by blob digest:
//!
//! ```text
//! estargz/sha256/<hex>/toc.json   the verified TOC as { toc_digest, toc_offset, index, chunks }
//! estargz/sha256/<hex>/data/<id>  sparse file per file with content (size = file size)
//! estargz/sha256/<hex>/present    append-only log of present chunks: (id u32 LE, chunk u32 LE)
//! ```
//!
//! Invariants: `toc.json` appears (atomically) only after the TOC matched the layer's
//! `toc.digest` annotation. A chunk is recorded in `present` only after it decoded, matched its
//! `chunkDigest` and its bytes were written into the data file and the filesystem synced
//! (one `syncfs` per fetched batch); a torn last record is ignored. The module knows nothing
//! of HTTP: ranges come through [`RangeSource`].
//!
//! Every byte is fetched once: readers ([`LazyLayer::ensure`]), the landmark prefetch and the
//! background fill all go through one single-flight map of the chunks in flight. A caller
//! claims the chunks that are neither present nor in flight and fetches only those (a request
//! never spans a chunk someone else fetches); a reader then waits for the flights of the rest,
//! the fill and the prefetch skip them. Readers come first: while any reader of the store is
//! fetching, every layer's fill waits before its next request ([`Readers`]).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

use serde::{Deserialize, Serialize};

use super::{LayerFault, SourceError, Store, StoreError, io_err};
use crate::layer::estargz::{
    self, ChunkMap, EstargzError, FOOTER_SIZE, decode_chunk, parse_footer, parse_toc_member,
};
use crate::layer::index::{DataRef, LayerIndex};
use crate::oci::Digest;

/// Where blob byte ranges come from (the registry, in the binary).
pub trait RangeSource: Send + Sync {
    /// Exactly the bytes `range` of blob `digest`.
    fn fetch_range<'a>(
        &'a self,
        digest: &'a Digest,
        range: Range<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, SourceError>> + Send + 'a>>;
}

/// What `toc.json` holds.
#[derive(Serialize, Deserialize)]
struct StoredToc {
    toc_digest: Digest,
    toc_offset: u64,
    index: LayerIndex,
    chunks: ChunkMap,
    /// Offset of `.prefetch.landmark`: the prioritised files lie before it.
    #[serde(default)]
    prefetch_end: Option<u64>,
}

/// Size of one record in the `present` log.
const RECORD: usize = 8;

/// One eStargz layer served lazily from its blob.
pub struct LazyLayer {
    digest: Digest,
    dir: PathBuf,
    /// The layer's entries until the tree is built from them ([`LazyLayer::take_index`]):
    /// reads need only the chunk map, and a big layer's index is worth its memory back.
    index: Mutex<LayerIndex>,
    chunks: ChunkMap,
    /// Every chunk as (blob offset, file id, chunk number), in blob order: what lies next to
    /// a chunk in the blob, for [`READ_AROUND`].
    order: Vec<(u64, u32, u32)>,
    /// [`READ_AROUND`] unless set otherwise ([`LazyLayer::with_read_around`]).
    read_around: u64,
    /// Where in the blob the last reader request ended: a walk's next request starts just
    /// after it.
    last_read_end: AtomicU64,
    prefetch_end: Option<u64>,
    /// Chunks known present, as (file id, chunk number). A std Mutex: held for set lookups and
    /// inserts only, never across I/O.
    present: Mutex<HashSet<(u32, u32)>>,
    /// The `present` log, opened for appending: each batch of records is one `write`, which
    /// O_APPEND keeps whole even with several writers.
    log: File,
    /// The chunks in flight, each with the receiver of its fetch's [`Claim`] (closed when
    /// that fetch ended, stored or not). A std Mutex, held for lookups and inserts only. A
    /// chunk is recorded in `present` before its key leaves this map, so under this lock a
    /// chunk is present, in flight, or free to claim.
    flights: Mutex<HashMap<ChunkKey, watch::Receiver<()>>>,
    /// The store's readers: the fill waits while one is fetching.
    readers: Arc<Readers>,
}

/// (file data id, chunk number).
type ChunkKey = (u32, u32);

/// Chunks a caller fetches; dropping it (the fetch ended: stored, failed or cancelled) takes
/// them out of the flight map and wakes who waits for them.
struct Claim<'a> {
    layer: &'a LazyLayer,
    keys: Vec<ChunkKey>,
    /// Never sent on: dropped last, after the keys left the map, which closes the receivers.
    _done: watch::Sender<()>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut flights = self.layer.flights.lock().expect("flights lock");
        for k in &self.keys {
            flights.remove(k);
        }
    }
}

/// The readers fetching from any lazy layer of a store. One count for all layers, so a reader
/// of one layer pauses the background fill of every layer, not only its own.
#[derive(Debug)]
pub struct Readers {
    fetching: AtomicUsize,
    /// Signalled when `fetching` drops to zero.
    idle: tokio::sync::Notify,
    /// When a reader last started or stopped fetching, in milliseconds since `epoch` (tokio's
    /// clock: the std one outside tests, a paused one in them). It starts at 0: the store's
    /// opening counts as activity, so a new mount's first reads are not raced by the fill.
    last: AtomicU64,
    epoch: Instant,
}

/// How long the readers must have been quiet before the fill sends its next request. A
/// sequential reader of a big file is between two fetches most of the time (consuming what
/// arrived, or what the read-ahead brought); without this pause the fill would slip a request
/// into every such gap and halve the reader's speed (measured: 2.7× slower cold read of a
/// 128 MiB file). stargz-snapshotter's background fetcher pauses the same way.
pub const READERS_QUIET: Duration = Duration::from_millis(300);

impl Default for Readers {
    fn default() -> Readers {
        Readers {
            fetching: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            last: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Readers {
    fn enter(&self) -> Reading<'_> {
        self.fetching.fetch_add(1, Ordering::SeqCst);
        self.touch();
        Reading(self)
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last.fetch_max(now, Ordering::SeqCst);
    }

    /// Return once no reader is fetching and none has for [`READERS_QUIET`].
    async fn idle(&self) {
        loop {
            // Created before the check: a `notify_waiters` after the check still wakes it.
            let idle = self.idle.notified();
            if self.fetching.load(Ordering::SeqCst) > 0 {
                idle.await;
                continue;
            }
            let last = Duration::from_millis(self.last.load(Ordering::SeqCst));
            let quiet = self.epoch.elapsed().saturating_sub(last);
            if quiet >= READERS_QUIET {
                return;
            }
            tokio::time::sleep(READERS_QUIET - quiet).await;
        }
    }
}

/// Counts one reader's fetch for as long as it lives.
struct Reading<'a>(&'a Readers);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.touch();
        if self.0.fetching.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Most compressed bytes the background fill asks for in one request: small enough that a
/// reader arriving meanwhile shares the link with at most one such batch.
pub const FILL_BATCH: u64 = 2 << 20;

/// When readers walk a layer (a request that takes a whole file, starting in the blob at most
/// this far after where the previous reader request of the layer ended), a request of less
/// than this many compressed bytes is extended over the chunks that follow it in the blob
/// (the next files: eStargz lays a directory's files out together, as a walker reads them),
/// as long as they are free and adjacent. A tree walk then costs a request per 512 KiB
/// instead of one per file, while the background fill is paused for the reader; each chunk
/// is still fetched once. A lone small read (`cat` of one file) and reads of parts of a
/// bigger file (an exec paging a binary in) are not extended: storing the extra files would
/// only delay them.
pub const READ_AROUND: u64 = 512 << 10;

impl Store {
    /// Where the lazy state of eStargz blob `blob` lives.
    pub fn estargz_dir(&self, blob: &Digest) -> PathBuf {
        self.root
            .join("estargz")
            .join(blob.algorithm().as_str())
            .join(blob.hex())
    }

    /// The lazy layer of `blob` from the store alone, if its TOC was stored before (for
    /// `toc_digest`, when the layer's descriptor gives one). `None` when it was not (or not for
    /// that digest).
    pub fn load_lazy_layer(
        &self,
        blob: &Digest,
        toc_digest: Option<&Digest>,
    ) -> Result<Option<LazyLayer>, StoreError> {
        let dir = self.estargz_dir(blob);
        let path = dir.join("toc.json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let stored: StoredToc = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring a corrupt stored TOC: {e}");
                return Ok(None);
            }
        };
        if toc_digest.is_some_and(|d| d != &stored.toc_digest) {
            return Ok(None);
        }
        LazyLayer::open(blob.clone(), dir, stored, self.readers.clone()).map(Some)
    }

    /// The lazy layer of `blob` (`blob_size` bytes, TOC digest `toc_digest` from its
    /// descriptor's annotation, if it has one): from the store, or by fetching its footer and
    /// TOC (two Range requests) and storing them once verified. `Ok(None)` when the blob turns
    /// out not to be usable as eStargz (no or bad footer, bad TOC structure): fetch it whole
    /// instead. A TOC that does not match `toc_digest` is an error, and nothing is stored.
    ///
    /// Without `toc_digest` the TOC is taken as the registry serves it (its sha256 is
    /// recorded, so a remount uses the same one): the chunks are still verified against it,
    /// but the TOC itself is trusted like a tag is. `mount --require-toc-digest` refuses that.
    /// A TOC of more than `max_entries` entries is an error, as for a tar layer.
    pub async fn lazy_layer(
        &self,
        source: &dyn RangeSource,
        blob: &Digest,
        blob_size: u64,
        toc_digest: Option<&Digest>,
        max_entries: u64,
    ) -> Result<Option<LazyLayer>, StoreError> {
        if let Some(l) = self.load_lazy_layer(blob, toc_digest)? {
            return Ok(Some(l));
        }
        let fetch = |range: Range<u64>| async move {
            source
                .fetch_range(blob, range)
                .await
                .map_err(|source| StoreError::Source {
                    digest: blob.clone(),
                    source,
                })
        };
        // Without an annotation the footer is how eStargz is told from plain gzip: its
        // absence is the normal case, not worth a warning.
        let not_estargz = |e: EstargzError| {
            if toc_digest.is_some() {
                tracing::warn!(digest = %blob, "{e}");
            } else {
                tracing::debug!(digest = %blob, "not eStargz: {e}");
            }
            Ok(None)
        };
        if blob_size < FOOTER_SIZE as u64 {
            return not_estargz(EstargzError::Footer {
                reason: format!("the blob is only {blob_size} bytes"),
            });
        }
        let tail = fetch(blob_size - FOOTER_SIZE as u64..blob_size).await?;
        let footer = match parse_footer(&tail) {
            Ok(f) => f,
            Err(e) => return not_estargz(e),
        };
        let toc_range = match footer.toc_range(blob_size) {
            Ok(r) => r,
            Err(e) => return not_estargz(e),
        };
        let member = fetch(toc_range).await?;
        // Decompressing, hashing and parsing a TOC of thousands of entries, then serialising
        // it for the store, is CPU work: off the runtime's threads, so that the layers of an
        // image are parsed in parallel and no network task waits behind them.
        let expected = toc_digest.cloned();
        let toc_offset = footer.toc_offset;
        let parsed = tokio::task::spawn_blocking(move || {
            let toc = parse_toc_member(&member, expected.as_ref())?;
            let entries = toc.entries.len() as u64;
            if entries > max_entries {
                return Err(EstargzError::TooManyEntries {
                    entries,
                    max: max_entries,
                });
            }
            let (index, chunks) = toc.to_layer(toc_offset)?;
            let stored = StoredToc {
                toc_digest: toc.digest.clone(),
                toc_offset,
                index,
                chunks,
                prefetch_end: toc.prefetch_landmark_offset(),
            };
            let bytes = serde_json::to_vec(&stored).expect("a TOC serialises");
            Ok::<_, EstargzError>((stored, bytes))
        })
        .await
        .expect("TOC parsing does not panic");
        let (stored, bytes) = match parsed {
            Ok(p) => p,
            Err(
                e @ (EstargzError::TocDigestMismatch { .. } | EstargzError::TooManyEntries { .. }),
            ) => {
                return Err(StoreError::Layer {
                    digest: blob.clone(),
                    source: LayerFault::Toc(e),
                });
            }
            Err(e) => return not_estargz(e),
        };
        let dir = self.estargz_dir(blob);
        let data = dir.join("data");
        fs::create_dir_all(&data).map_err(io_err(&data))?;
        // Not synced: `toc.json` is a cache of a verified TOC. The rename keeps a reader from
        // ever seeing a partial file, and one torn by a crash does not parse and is fetched
        // again (see `load_lazy_layer`).
        self.write_atomic_unsynced(&dir.join("toc.json"), &bytes)?;
        LazyLayer::open(blob.clone(), dir, stored, self.readers.clone()).map(Some)
    }
}

/// How much of a lazy layer is local.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LazyState {
    /// File bytes present locally.
    pub local: u64,
    /// File bytes in the layer.
    pub total: u64,
}

impl LazyLayer {
    fn open(
        digest: Digest,
        dir: PathBuf,
        stored: StoredToc,
        readers: Arc<Readers>,
    ) -> Result<LazyLayer, StoreError> {
        let StoredToc {
            index,
            chunks,
            prefetch_end,
            ..
        } = stored;
        let data = dir.join("data");
        fs::create_dir_all(&data).map_err(io_err(&data))?;
        let log_path = dir.join("present");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let present = read_present(&mut log, &chunks).map_err(io_err(&log_path))?;
        let mut order: Vec<(u64, u32, u32)> = chunks
            .iter()
            .flat_map(|(data, cs)| {
                cs.iter()
                    .enumerate()
                    .map(move |(n, c)| (c.offset, data.id, n as u32))
            })
            .collect();
        order.sort_unstable();
        Ok(LazyLayer {
            order,
            read_around: READ_AROUND,
            last_read_end: AtomicU64::new(u64::MAX),
            digest,
            dir,
            index: Mutex::new(index),
            chunks,
            prefetch_end,
            present: Mutex::new(present),
            log,
            flights: Mutex::new(HashMap::new()),
            readers,
        })
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Extend small reader requests over up to `bytes` of what follows them in the blob
    /// (0: fetch only what is read).
    pub fn with_read_around(mut self, bytes: u64) -> LazyLayer {
        self.read_around = bytes;
        self
    }

    /// The layer's entries, handed over once (to the merge); later calls get an empty
    /// index.
    pub fn take_index(&self) -> LayerIndex {
        std::mem::take(&mut *self.index.lock().expect("index lock"))
    }

    /// Local and total file bytes.
    pub fn state(&self) -> LazyState {
        let present = self.present.lock().expect("present lock");
        let mut state = LazyState { local: 0, total: 0 };
        for (data, chunks) in self.chunks.iter() {
            for (n, c) in chunks.iter().enumerate() {
                state.total += c.chunk_size;
                if present.contains(&(data.id, n as u32)) {
                    state.local += c.chunk_size;
                }
            }
        }
        state
    }

    fn data_path(&self, data: DataRef) -> PathBuf {
        self.dir.join("data").join(data.id.to_string())
    }

    fn file_size(&self, data: DataRef) -> Option<u64> {
        Some(self.chunks.chunks(data)?.last()?.file_range().end)
    }

    /// Whether every chunk of the file is local.
    pub fn is_complete(&self, data: DataRef) -> bool {
        let Some(chunks) = self.chunks.chunks(data) else {
            return false;
        };
        let present = self.present.lock().expect("present lock");
        (0..chunks.len() as u32).all(|n| present.contains(&(data.id, n)))
    }

    /// The local (sparse) file of a file's content, read-only: only the ranges
    /// [`LazyLayer::ensure`]d are meaningful.
    pub fn data_file(&self, data: DataRef) -> Result<File, StoreError> {
        let size = self.file_size(data).ok_or_else(|| StoreError::Layer {
            digest: self.digest.clone(),
            source: LayerFault::Invalid(format!("no file with data id {} in the TOC", data.id)),
        })?;
        let path = self.data_path(data);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if f.metadata().map_err(io_err(&path))?.len() != size {
            f.set_len(size).map_err(io_err(&path))?;
        }
        drop(f);
        File::open(&path).map_err(io_err(&path))
    }

    /// Make the file bytes `range` local: fetch the missing chunks overlapping it that nobody
    /// else is fetching (one Range request per run of adjacent ones), verify each against its
    /// digest, write it into the data file and record it; then wait for the fetches of the
    /// others (and fetch any of them that such a fetch failed to store). A chunk that fails
    /// verification is neither written nor recorded. While it fetches, the store's background
    /// fills wait.
    pub async fn ensure(
        &self,
        source: &dyn RangeSource,
        data: DataRef,
        range: Range<u64>,
    ) -> Result<(), StoreError> {
        let mut missing = self.missing(data, range.clone());
        if missing.is_empty() {
            return Ok(());
        }
        let _reading = self.readers.enter();
        let chunks = self.chunks.chunks(data).unwrap_or_default();
        loop {
            let (claim, flights) = self.claim(missing.iter().map(|&n| (data.id, n)));
            let mine: Vec<u32> = claim.keys.iter().map(|&(_, n)| n).collect();
            for run in runs(chunks, &mine) {
                let mut wanted: Vec<(DataRef, u32)> = run.map(|n| (data, n)).collect();
                let first = &chunks[wanted[0].1 as usize];
                let last = &chunks[wanted[wanted.len() - 1].1 as usize];
                let span = first.offset..last.compressed_range().end;
                // A walk (a whole file read right after the previous request, in the blob)
                // brings the next files along; see READ_AROUND.
                let previous = self.last_read_end.load(Ordering::Relaxed);
                let walking = wanted.len() == chunks.len()
                    && span.start >= previous
                    && span.start - previous <= self.read_around;
                let around = walking.then(|| self.claim_after(span.clone()));
                if let Some(a) = &around {
                    wanted.extend(a.keys.iter().map(|&(id, n)| (DataRef { id }, n)));
                }
                let end = match wanted.last() {
                    Some(&(d, n)) => self.chunk(d, n).compressed_range().end,
                    None => span.end,
                };
                self.last_read_end.store(end, Ordering::Relaxed);
                self.fetch_chunks(source, &wanted).await?;
            }
            drop(claim);
            if flights.is_empty() {
                return Ok(());
            }
            for mut f in flights {
                // Err: the fetch ended (closed channel), which is all that is awaited.
                let _ = f.changed().await;
            }
            // Present now, unless a fetch we waited for failed: then it is ours to fetch.
            missing = self.missing(data, range.clone());
            if missing.is_empty() {
                return Ok(());
            }
        }
    }

    /// Whether some chunk overlapping the file bytes `range` is neither present nor in flight.
    pub fn has_unclaimed(&self, data: DataRef, range: Range<u64>) -> bool {
        let missing = self.missing(data, range);
        let flights = self.flights.lock().expect("flights lock");
        missing
            .iter()
            .any(|&n| !flights.contains_key(&(data.id, n)))
    }

    /// Claim, of `wanted`, the chunks neither present nor in flight; return the claim and the
    /// flights fetching the others (one receiver per flight).
    fn claim(
        &self,
        wanted: impl IntoIterator<Item = ChunkKey>,
    ) -> (Claim<'_>, Vec<watch::Receiver<()>>) {
        let (done, rx) = watch::channel(());
        let mut keys = Vec::new();
        let mut waits: Vec<watch::Receiver<()>> = Vec::new();
        let mut flights = self.flights.lock().expect("flights lock");
        let present = self.present.lock().expect("present lock");
        for k in wanted {
            if let Some(f) = flights.get(&k) {
                if !waits.iter().any(|w| w.same_channel(f)) {
                    waits.push(f.clone());
                }
            } else if !present.contains(&k) {
                flights.insert(k, rx.clone());
                keys.push(k);
            }
        }
        drop(present);
        drop(flights);
        let claim = Claim {
            layer: self,
            keys,
            _done: done,
        };
        (claim, waits)
    }

    /// Claim the chunks that follow the blob range `span` without a gap, as long as they are
    /// neither present nor in flight and the whole span stays within the read-around
    /// ([`READ_AROUND`] by default; see there). The claim's keys are in blob order.
    fn claim_after(&self, span: Range<u64>) -> Claim<'_> {
        let (done, rx) = watch::channel(());
        let mut keys = Vec::new();
        if span.end - span.start < self.read_around {
            let mut flights = self.flights.lock().expect("flights lock");
            let present = self.present.lock().expect("present lock");
            let mut end = span.end;
            let at = self.order.partition_point(|&(off, _, _)| off < end);
            for &(off, id, n) in &self.order[at..] {
                let key = (id, n);
                let next_end = self.chunk(DataRef { id }, n).compressed_range().end;
                if off != end
                    || next_end - span.start > self.read_around
                    || present.contains(&key)
                    || flights.contains_key(&key)
                {
                    break;
                }
                flights.insert(key, rx.clone());
                keys.push(key);
                end = next_end;
            }
        }
        Claim {
            layer: self,
            keys,
            _done: done,
        }
    }

    /// Fetch `wanted` (chunks in blob order) with one Range request spanning them all, and
    /// verify, write and record each.
    async fn fetch_chunks(
        &self,
        source: &dyn RangeSource,
        wanted: &[(DataRef, u32)],
    ) -> Result<(), StoreError> {
        let chunk = |&(data, n): &(DataRef, u32)| self.chunk(data, n);
        let (Some(first), Some(last)) = (wanted.first(), wanted.last()) else {
            return Ok(());
        };
        let span = chunk(first).offset..chunk(last).compressed_range().end;
        let bytes = self.fetch_span(source, span.clone()).await?;
        self.write_then_record(wanted, |&&(data, n)| {
            let c = self.chunk(data, n);
            let at = (c.offset - span.start) as usize;
            self.store_chunk(data, n, &bytes[at..at + c.compressed_len as usize])
        })
    }

    async fn fetch_span(
        &self,
        source: &dyn RangeSource,
        span: Range<u64>,
    ) -> Result<Vec<u8>, StoreError> {
        let bytes = source
            .fetch_range(&self.digest, span.clone())
            .await
            .map_err(|source| StoreError::Source {
                digest: self.digest.clone(),
                source,
            })?;
        if bytes.len() as u64 != span.end - span.start {
            return Err(StoreError::Layer {
                digest: self.digest.clone(),
                source: LayerFault::Invalid(format!(
                    "asked for bytes {}..{}, got {}",
                    span.start,
                    span.end,
                    bytes.len()
                )),
            });
        }
        Ok(bytes)
    }

    /// Decode and verify chunk `n` of a file from its `compressed` member, write it into the
    /// data file and record it. A chunk that fails verification is neither written nor
    /// recorded. Writing a chunk twice (a reader and the background fill racing) writes the
    /// same verified bytes.
    fn store_chunk(
        &self,
        data: DataRef,
        n: u32,
        compressed: &[u8],
    ) -> Result<ChunkKey, StoreError> {
        let c = self.chunk(data, n);
        let plain = decode_chunk(compressed, c).map_err(|e| StoreError::Layer {
            digest: self.digest.clone(),
            source: LayerFault::Chunk {
                file: data.id,
                chunk: n,
                source: e,
            },
        })?;
        self.write_chunk(data, n, &plain)
    }

    /// Write chunk `n`'s verified bytes into the data file; [`LazyLayer::record`] makes
    /// them durable and records them.
    fn write_chunk(&self, data: DataRef, n: u32, plain: &[u8]) -> Result<ChunkKey, StoreError> {
        let c = self.chunk(data, n);
        let path = self.data_path(data);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.write_all_at(plain, c.chunk_offset)
            .map_err(io_err(&path))?;
        Ok((data.id, n))
    }

    /// Write a batch of chunks with `write` (one chunk per item), then record those written
    /// ([`LazyLayer::record`]) — also when a later one failed, so they are not fetched again.
    fn write_then_record<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        mut write: impl FnMut(&T) -> Result<ChunkKey, StoreError>,
    ) -> Result<(), StoreError> {
        let mut written = Vec::new();
        let mut result = Ok(());
        for item in items {
            match write(&item) {
                Ok(key) => written.push(key),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.record(&written)?;
        result
    }

    /// Make the chunks `keys`, written into their data files, durable, then log them in
    /// `present` and mark them present. One `syncfs` for the batch puts their bytes on disk
    /// before the records that vouch for them: a crash never leaves a record of bytes that
    /// did not reach the disk. (An fsync per chunk and per record made a cold walk of 20,000
    /// small files spend most of its time waiting for the disk.)
    fn record(&self, keys: &[ChunkKey]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let log_path = self.dir.join("present");
        // SAFETY: syncfs only flushes the filesystem of an fd we own.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&self.log)) } != 0 {
            return Err(io_err(&self.dir)(io::Error::last_os_error()));
        }
        let mut records = Vec::with_capacity(keys.len() * RECORD);
        for &(id, n) in keys {
            records.extend_from_slice(&id.to_le_bytes());
            records.extend_from_slice(&n.to_le_bytes());
        }
        (&self.log)
            .write_all(&records)
            .and_then(|()| self.log.sync_data())
            .map_err(io_err(&log_path))?;
        self.present
            .lock()
            .expect("present lock")
            .extend(keys.iter().copied());
        Ok(())
    }

    /// Offset of `.prefetch.landmark`, when the layer has prioritised files.
    pub fn landmark(&self) -> Option<u64> {
        self.prefetch_end
    }

    /// Make the prioritised files local: the landmark region `[0, landmark)` with ONE Range
    /// request (as stargz-snapshotter does), each chunk in it verified and recorded. Nothing
    /// is fetched when the layer has no landmark or the region is local already.
    pub async fn fetch_landmark(&self, source: &dyn RangeSource) -> Result<(), StoreError> {
        let Some(end) = self.prefetch_end else {
            return Ok(());
        };
        let wanted: Vec<(DataRef, u32, estargz::Chunk)> = self
            .missing_in_blob_order()
            .into_iter()
            .filter(|(_, _, c)| c.compressed_range().end <= end)
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let (claim, _others) = self.claim(wanted.iter().map(|(d, n, _)| (d.id, *n)));
        if claim.keys.len() < wanted.len() {
            // Some are being fetched already (a reader was quicker): fetch around them.
            let batch: Vec<(DataRef, u32)> = wanted.iter().map(|(d, n, _)| (*d, *n)).collect();
            return self.fetch_claimed(source, &batch, &claim).await;
        }
        let bytes = self.fetch_span(source, 0..end).await?;
        self.write_then_record(wanted, |(data, n, c)| {
            let compressed = &bytes[c.offset as usize..c.compressed_range().end as usize];
            self.store_chunk(*data, *n, compressed)
        })
    }

    /// Fetch the chunks of `batch` (blob order) that `claim` holds: one request per stretch
    /// of consecutive claimed chunks, split where a chunk of the batch is not claimed (present
    /// or fetched by someone else), so no byte is fetched twice.
    async fn fetch_claimed(
        &self,
        source: &dyn RangeSource,
        batch: &[(DataRef, u32)],
        claim: &Claim<'_>,
    ) -> Result<(), StoreError> {
        let mut stretch: Vec<(DataRef, u32)> = Vec::new();
        for &(data, n) in batch {
            if claim.keys.contains(&(data.id, n)) {
                stretch.push((data, n));
            } else if !stretch.is_empty() {
                self.fetch_chunks(source, &stretch).await?;
                stretch.clear();
            }
        }
        self.fetch_chunks(source, &stretch).await
    }

    /// Make every file local, in blob order, in requests of at most `FILL_BATCH` bytes;
    /// before each request, wait until no reader of the store ([`LazyLayer::ensure`]) is
    /// fetching or has been for [`READERS_QUIET`], so that readers never queue behind it, and
    /// skip the chunks present or in flight. Stops at the first failure.
    pub async fn fill(&self, source: &dyn RangeSource) -> Result<(), StoreError> {
        let missing = self.missing_in_blob_order();
        let mut batch: Vec<(DataRef, u32)> = Vec::new();
        let mut start = 0;
        for (data, n, c) in missing {
            if let Some(&(d, m)) = batch.last() {
                let last = self.chunk(d, m);
                if c.compressed_range().end - start > FILL_BATCH
                    || last.compressed_range().end > c.offset
                {
                    self.fill_batch(source, &batch).await?;
                    batch.clear();
                }
            }
            if batch.is_empty() {
                start = c.offset;
            }
            batch.push((data, n));
        }
        self.fill_batch(source, &batch).await
    }

    async fn fill_batch(
        &self,
        source: &dyn RangeSource,
        batch: &[(DataRef, u32)],
    ) -> Result<(), StoreError> {
        self.readers.idle().await;
        // A reader may have fetched some of them meanwhile, or be fetching them: skipped.
        let (claim, _others) = self.claim(batch.iter().map(|(d, n)| (d.id, *n)));
        self.fetch_claimed(source, batch, &claim).await
    }

    /// Make a file local from its plain content, taken from the layer extracted whole (which
    /// was verified by blob digest and diff_id): for registries that ignore Range.
    pub fn fill_from(&self, data: DataRef, content: &File) -> Result<(), StoreError> {
        let missing = self.missing(data, 0..u64::MAX);
        self.write_then_record(missing, |&n| {
            let c = self.chunk(data, n);
            let mut plain = vec![0u8; c.chunk_size as usize];
            content
                .read_exact_at(&mut plain, c.chunk_offset)
                .map_err(|e| StoreError::Layer {
                    digest: self.digest.clone(),
                    source: LayerFault::ExtractedRead {
                        file: data.id,
                        source: e,
                    },
                })?;
            self.write_chunk(data, n, &plain)
        })
    }

    /// Every chunk not local, in blob order.
    fn missing_in_blob_order(&self) -> Vec<(DataRef, u32, estargz::Chunk)> {
        let present = self.present.lock().expect("present lock");
        self.order
            .iter()
            .filter(|&&(_, id, n)| !present.contains(&(id, n)))
            .map(|&(_, id, n)| (DataRef { id }, n, self.chunk(DataRef { id }, n).clone()))
            .collect()
    }

    /// Chunk `n` of a file (both known to the chunk map).
    fn chunk(&self, data: DataRef, n: u32) -> &estargz::Chunk {
        &self.chunks.chunks(data).unwrap_or_default()[n as usize]
    }

    /// Numbers of the chunks overlapping `range` that are not local, ascending.
    fn missing(&self, data: DataRef, range: Range<u64>) -> Vec<u32> {
        let Some(all) = self.chunks.chunks(data) else {
            return Vec::new();
        };
        let wanted = self.chunks.chunks_in(data, range);
        let Some(first) = wanted.first() else {
            return Vec::new();
        };
        let base = all.partition_point(|c| c.chunk_offset < first.chunk_offset) as u32;
        let present = self.present.lock().expect("present lock");
        (base..base + wanted.len() as u32)
            .filter(|&n| !present.contains(&(data.id, n)))
            .collect()
    }
}

/// Group `missing` chunk numbers (ascending) into runs of consecutive chunks whose compressed
/// ranges touch, each fetched with one request.
fn runs(chunks: &[estargz::Chunk], missing: &[u32]) -> Vec<Range<u32>> {
    let mut out: Vec<Range<u32>> = Vec::new();
    for &n in missing {
        if let Some(last) = out.last_mut()
            && last.end == n
            && chunks[n as usize - 1].compressed_range().end == chunks[n as usize].offset
        {
            last.end = n + 1;
            continue;
        }
        out.push(n..n + 1);
    }
    out
}

/// The records of the `present` log that name a chunk of `chunks`; a torn last record (a crash
/// mid-append) is ignored.
fn read_present(log: &mut File, chunks: &ChunkMap) -> io::Result<HashSet<(u32, u32)>> {
    let mut bytes = Vec::new();
    log.read_to_end(&mut bytes)?;
    let mut set = HashSet::new();
    for r in bytes.chunks_exact(RECORD) {
        let id = u32::from_le_bytes(r[..4].try_into().expect("4 bytes"));
        let n = u32::from_le_bytes(r[4..].try_into().expect("4 bytes"));
        if chunks
            .chunks(DataRef { id })
            .is_some_and(|c| (n as usize) < c.len())
        {
            set.insert((id, n));
        }
    }
    Ok(set)
}

impl LazyLayer {
    /// Re-hash every chunk recorded as present against its `chunkDigest`; the ones that no
    /// longer match (the data file was damaged) are dropped from the `present` log, so they
    /// are fetched again when read. Returns how many chunks were checked, and the bad ones
    /// as (file id, chunk number).
    pub fn verify_local(&self) -> Result<(usize, Vec<(u32, u32)>), StoreError> {
        let present: Vec<(u32, u32)> = {
            let mut v: Vec<_> = self
                .present
                .lock()
                .expect("present lock")
                .iter()
                .copied()
                .collect();
            v.sort_unstable();
            v
        };
        let mut bad = Vec::new();
        for &(id, n) in &present {
            let data = DataRef { id };
            let Some(chunk) = self.chunks.chunks(data).and_then(|c| c.get(n as usize)) else {
                continue;
            };
            let Some(want) = &chunk.chunk_digest else {
                continue;
            };
            let path = self.data_path(data);
            let mut buf = vec![0u8; chunk.chunk_size as usize];
            let ok = File::open(&path)
                .and_then(|f| f.read_exact_at(&mut buf, chunk.chunk_offset))
                .is_ok_and(|()| want.verify(&buf).is_ok());
            if !ok {
                bad.push((id, n));
            }
        }
        if !bad.is_empty() {
            let keep: Vec<u8> = present
                .iter()
                .filter(|c| !bad.contains(c))
                .flat_map(|(id, n)| id.to_le_bytes().into_iter().chain(n.to_le_bytes()))
                .collect();
            let log = self.dir.join("present");
            let tmp = self.dir.join("present.verify");
            fs::write(&tmp, &keep).map_err(io_err(&tmp))?;
            fs::rename(&tmp, &log).map_err(io_err(&log))?;
            let mut set = self.present.lock().expect("present lock");
            for c in &bad {
                set.remove(c);
            }
        }
        Ok((present.len(), bad))
    }
}

/// Whether `dir` holds a stored TOC (for `imagefs layers`).
pub fn has_toc(dir: &Path) -> bool {
    dir.join("toc.json").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::decompress::MAX_ENTRIES;
    use crate::layer::estargz::{Landmark, WriterOptions, build};
    use crate::layer::index::{Entry, EntryKind};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Blob ranges from memory. Every request is recorded when it starts; a gated source then
    /// waits for a permit of its gate ([`MemRanges::open`]), so a test decides what is in
    /// flight; `fail` makes the next N requests fail.
    struct MemRanges {
        blob: Vec<u8>,
        requests: Mutex<Vec<Range<u64>>>,
        gate: Option<tokio::sync::Semaphore>,
        fail: AtomicUsize,
    }

    impl MemRanges {
        fn new(blob: Vec<u8>) -> MemRanges {
            MemRanges {
                blob,
                requests: Mutex::new(Vec::new()),
                gate: None,
                fail: AtomicUsize::new(0),
            }
        }

        fn gated(blob: Vec<u8>) -> Arc<MemRanges> {
            Arc::new(MemRanges {
                gate: Some(tokio::sync::Semaphore::new(0)),
                ..MemRanges::new(blob)
            })
        }

        /// Let `n` more requests of a gated source through.
        fn open(&self, n: usize) {
            self.gate.as_ref().expect("a gated source").add_permits(n);
        }

        fn requests(&self) -> Vec<Range<u64>> {
            self.requests.lock().unwrap().clone()
        }
    }

    impl RangeSource for MemRanges {
        fn fetch_range<'a>(
            &'a self,
            _digest: &'a Digest,
            range: Range<u64>,
        ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, SourceError>> + Send + 'a>> {
            Box::pin(async move {
                self.requests.lock().unwrap().push(range.clone());
                if let Some(gate) = &self.gate {
                    gate.acquire().await.unwrap().forget();
                }
                let failing = self.fail.load(Ordering::SeqCst);
                if failing > 0 {
                    self.fail.store(failing - 1, Ordering::SeqCst);
                    return Err("connection reset (test)".into());
                }
                Ok(self.blob[range.start as usize..range.end as usize].to_vec())
            })
        }
    }

    fn big() -> Vec<u8> {
        (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn sample() -> (Vec<u8>, Digest, Digest) {
        let mut f = Entry::new("big", EntryKind::File, 0o644);
        let content = big();
        f.size = content.len() as u64;
        let mut s = Entry::new("small", EntryKind::File, 0o644);
        s.size = 5;
        let w = build(
            &[(f, content), (s, b"hello".to_vec())],
            &WriterOptions {
                chunk_size: 100_000,
                landmark: Landmark::NoPrefetch,
                legacy_footer: false,
                compression: 9,
            },
        )
        .unwrap();
        let digest = Digest::sha256(&w.blob);
        (w.blob, digest, w.toc_digest)
    }

    /// The lazy layer of `blob` opened over `src` (footer and TOC fetched: two requests),
    /// fetching only what is read (no read-around).
    async fn open_sample(
        store: &Store,
        src: &dyn RangeSource,
        blob: &[u8],
        digest: &Digest,
        toc: &Digest,
    ) -> LazyLayer {
        store
            .lazy_layer(src, digest, blob.len() as u64, Some(toc), MAX_ENTRIES)
            .await
            .unwrap()
            .unwrap()
            .with_read_around(0)
    }

    /// The lazy layer opened again from the store alone (no request), no read-around.
    fn reopen_sample(store: &Store, digest: &Digest, toc: &Digest) -> LazyLayer {
        store
            .load_lazy_layer(digest, Some(toc))
            .unwrap()
            .unwrap()
            .with_read_around(0)
    }

    /// `blob` with one byte in the middle of chunk `c`'s compressed bytes flipped.
    fn corrupt(blob: &[u8], c: &estargz::Chunk) -> Vec<u8> {
        let mut bad = blob.to_vec();
        bad[(c.offset + c.compressed_len / 2) as usize] ^= 0xff;
        bad
    }

    fn data_of(l: &LazyLayer, path: &str) -> DataRef {
        l.index
            .lock()
            .unwrap()
            .entries
            .iter()
            .find(|e| e.path == path.as_bytes())
            .and_then(|e| e.data)
            .unwrap()
    }

    #[tokio::test]
    async fn reads_fetch_only_missing_chunks_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (blob, digest, toc) = sample();
        let src = MemRanges::new(blob.clone());
        let l = open_sample(&store, &src, &blob, &digest, &toc).await;
        assert_eq!(src.requests().len(), 2, "footer + TOC");
        let big_ref = data_of(&l, "big");
        assert!(!l.is_complete(big_ref));
        l.ensure(&src, big_ref, 150_000..150_010).await.unwrap();
        assert_eq!(src.requests().len(), 3, "one chunk");
        let f = l.data_file(big_ref).unwrap();
        let mut buf = [0u8; 10];
        f.read_exact_at(&mut buf, 150_000).unwrap();
        assert_eq!(&buf[..], &big()[150_000..150_010]);
        // Present chunks are not fetched again; the two missing neighbours are one request.
        l.ensure(&src, big_ref, 0..300_000).await.unwrap();
        assert_eq!(src.requests().len(), 5);
        assert!(l.is_complete(big_ref));
        // Reopened from the store with no network: the TOC and chunks are there.
        src.fail.store(1, Ordering::SeqCst);
        drop(l);
        let l = reopen_sample(&store, &digest, &toc);
        l.ensure(&src, big_ref, 0..300_000).await.unwrap();
        assert!(l.is_complete(big_ref));
        let small = data_of(&l, "small");
        assert!(l.ensure(&src, small, 0..5).await.is_err());
        assert_eq!(
            l.state(),
            LazyState {
                local: 300_000,
                total: 300_005
            }
        );
    }

    #[tokio::test]
    async fn corrupt_chunks_and_tocs_store_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (blob, digest, toc) = sample();
        let wrong = Digest::sha256(b"not the toc");
        let src = MemRanges::new(blob.clone());
        assert!(
            store
                .lazy_layer(&src, &digest, blob.len() as u64, Some(&wrong), MAX_ENTRIES)
                .await
                .is_err()
        );
        assert!(!has_toc(&store.estargz_dir(&digest)));

        let l = open_sample(&store, &src, &blob, &digest, &toc).await;
        let big_ref = data_of(&l, "big");
        let c = l.chunks.chunks(big_ref).unwrap()[1].clone();
        let bad_src = MemRanges::new(corrupt(&blob, &c));
        assert!(
            l.ensure(&bad_src, big_ref, c.chunk_offset..c.chunk_offset + 1)
                .await
                .is_err()
        );
        assert_eq!(l.state().local, 0);
        drop(l);
        let l = reopen_sample(&store, &digest, &toc);
        assert_eq!(l.state().local, 0);
    }

    #[tokio::test]
    async fn a_batch_keeps_the_chunks_before_a_corrupt_one_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (blob, digest, toc) = sample();
        let src = MemRanges::new(blob.clone());
        let l = open_sample(&store, &src, &blob, &digest, &toc).await;
        let big_ref = data_of(&l, "big");
        let chunks = l.chunks.chunks(big_ref).unwrap().to_vec();
        assert_eq!(chunks.len(), 3);
        let bad_src = MemRanges::new(corrupt(&blob, &chunks[1]));
        // One request for the three chunks; the second fails verification.
        assert!(l.ensure(&bad_src, big_ref, 0..300_000).await.is_err());
        assert_eq!(bad_src.requests().len(), 1);
        assert_eq!(l.state().local, 100_000, "the chunk before it is kept");
        let log = store.estargz_dir(&digest).join("present");
        assert_eq!(fs::metadata(&log).unwrap().len(), RECORD as u64);
        drop(l);
        let l = reopen_sample(&store, &digest, &toc);
        assert_eq!(l.state().local, 100_000, "and recorded");
        // The rest comes in one request, from where the kept chunk ends.
        l.ensure(&src, big_ref, 0..300_000).await.unwrap();
        let requests = src.requests();
        assert_eq!(requests.len(), 3, "footer, TOC, the two missing chunks");
        assert_eq!(requests[2].start, chunks[1].offset);
        assert_eq!(fs::metadata(&log).unwrap().len(), 3 * RECORD as u64);
        let mut got = vec![0u8; 300_000];
        l.data_file(big_ref)
            .unwrap()
            .read_exact_at(&mut got, 0)
            .unwrap();
        assert!(got == big());
    }

    fn with_landmark() -> (Vec<u8>, Digest, Digest) {
        let mut f = Entry::new("big", EntryKind::File, 0o644);
        f.size = big().len() as u64;
        let mut s = Entry::new("small", EntryKind::File, 0o644);
        s.size = 5;
        let w = build(
            &[(f, big()), (s, b"hello".to_vec())],
            &WriterOptions {
                chunk_size: 100_000,
                landmark: Landmark::Prefetch { after: 1 },
                legacy_footer: false,
                compression: 9,
            },
        )
        .unwrap();
        let digest = Digest::sha256(&w.blob);
        (w.blob, digest, w.toc_digest)
    }

    #[tokio::test]
    async fn the_landmark_region_is_one_request_and_fill_takes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (blob, digest, toc) = with_landmark();
        let src = MemRanges::new(blob.clone());
        let l = open_sample(&store, &src, &blob, &digest, &toc).await;
        let end = l.landmark().unwrap();
        l.fetch_landmark(&src).await.unwrap();
        assert_eq!(src.requests().len(), 3);
        assert_eq!(src.requests()[2], 0..end);
        assert!(l.is_complete(data_of(&l, "big")));
        assert!(!l.is_complete(data_of(&l, "small")));
        // Again: the region is local, nothing is fetched.
        l.fetch_landmark(&src).await.unwrap();
        assert_eq!(src.requests().len(), 3);
        l.fill(&src).await.unwrap();
        assert_eq!(src.requests().len(), 4, "small: one request");
        assert_eq!(l.state().local, l.state().total);
    }

    #[tokio::test]
    async fn a_walk_takes_the_free_files_after_each_read_along() {
        // a, b, c, d: 1,000 incompressible bytes each (one chunk, ~1 KiB compressed); big.
        let noise = |seed| crate::layer::estargz::testutil::noise(1000, seed);
        let file = |path: &str, content: Vec<u8>| {
            let mut e = Entry::new(path, EntryKind::File, 0o644);
            e.size = content.len() as u64;
            (e, content)
        };
        let options = WriterOptions {
            chunk_size: 100_000,
            landmark: Landmark::NoPrefetch,
            legacy_footer: false,
            compression: 9,
        };
        let entries = [
            file("a", noise(1)),
            file("b", noise(2)),
            file("c", noise(3)),
            file("d", noise(4)),
            file("big", big()),
        ];
        let w = build(&entries, &options).unwrap();
        let digest = Digest::sha256(&w.blob);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let src = MemRanges::new(w.blob.clone());
        let l = store
            .lazy_layer(
                &src,
                &digest,
                w.blob.len() as u64,
                Some(&w.toc_digest),
                MAX_ENTRIES,
            )
            .await
            .unwrap()
            .unwrap()
            .with_read_around(2_500);
        let id = |p: &str| data_of(&l, p);
        // A lone read of a whole file: nothing comes along.
        l.ensure(&src, id("a"), 0..1000).await.unwrap();
        assert_eq!(src.requests().len(), 3);
        assert!(!l.is_complete(id("b")));
        // The next file in the blob: a walk. c comes along; d would pass 2,500 bytes.
        l.ensure(&src, id("b"), 0..1000).await.unwrap();
        assert_eq!(src.requests().len(), 4);
        assert!(l.is_complete(id("c")));
        assert!(!l.is_complete(id("d")));
        l.ensure(&src, id("c"), 0..1000).await.unwrap();
        assert_eq!(src.requests().len(), 4, "c is local already");
        // A part of big is not a whole file: only its chunk.
        l.ensure(&src, id("big"), 150_000..150_010).await.unwrap();
        assert_eq!(src.requests().len(), 5);
        // d lies before where the last request ended: not a walk, d alone.
        l.ensure(&src, id("d"), 0..1000).await.unwrap();
        let requests = src.requests();
        assert_eq!(requests.len(), 6, "{requests:?}");
        assert!(!l.is_complete(id("big")));
        assert_disjoint(&requests[2..]);
        let mut got = vec![0u8; 1000];
        l.data_file(id("c"))
            .unwrap()
            .read_exact_at(&mut got, 0)
            .unwrap();
        assert!(
            got == noise(3),
            "the file that came along was written in place"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn fill_waits_while_a_reader_is_fetching() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (blob, digest, toc) = sample();
        let src = Arc::new(MemRanges::new(blob.clone()));
        let l = Arc::new(open_sample(&store, &*src, &blob, &digest, &toc).await);
        let reader = l.readers.enter();
        let filler = {
            let (l, src) = (l.clone(), src.clone());
            tokio::spawn(async move { l.fill(&*src).await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(src.requests().len(), 2, "only footer and TOC");
        assert!(!filler.is_finished());
        drop(reader);
        filler.await.unwrap().unwrap();
        assert_eq!(l.state().local, l.state().total);
    }

    /// The sample layer over a gated source, its footer and TOC fetched (two requests).
    async fn gated_layer(store: &Store) -> (Arc<LazyLayer>, Arc<MemRanges>) {
        let (blob, digest, toc) = sample();
        let src = MemRanges::gated(blob.clone());
        src.open(2);
        let l = open_sample(store, &*src, &blob, &digest, &toc).await;
        assert_eq!(src.requests().len(), 2);
        (Arc::new(l), src)
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    fn assert_disjoint(requests: &[Range<u64>]) {
        for (i, a) in requests.iter().enumerate() {
            for b in &requests[i + 1..] {
                assert!(
                    a.end <= b.start || b.end <= a.start,
                    "{a:?} and {b:?} overlap"
                );
            }
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn chunks_in_flight_are_not_fetched_again_by_readers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (l, src) = gated_layer(&store).await;
        // Past the quiet period that follows the store's opening.
        tokio::time::advance(READERS_QUIET).await;
        let (big, small) = (data_of(&l, "big"), data_of(&l, "small"));
        // The fill claims every chunk (one batch) and its request waits at the gate.
        let fill = tokio::spawn({
            let (l, src) = (l.clone(), src.clone());
            async move { l.fill(&*src).await }
        });
        settle().await;
        assert_eq!(src.requests().len(), 3, "the fill's one request");
        // Two readers of chunks in that flight, and a second reader of the same bytes.
        let read = |data: DataRef, range: Range<u64>| {
            let (l, src) = (l.clone(), src.clone());
            tokio::spawn(async move { l.ensure(&*src, data, range).await })
        };
        let readers = [
            read(big, 0..300_000),
            read(big, 150_000..150_001),
            read(small, 0..5),
        ];
        settle().await;
        assert_eq!(
            src.requests().len(),
            3,
            "readers wait for the flight, they do not fetch"
        );
        assert!(readers.iter().all(|r| !r.is_finished()));
        src.open(100);
        fill.await.unwrap().unwrap();
        for r in readers {
            r.await.unwrap().unwrap();
        }
        assert_eq!(src.requests().len(), 3);
        assert_eq!(l.state().local, l.state().total);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_fill_waits_for_readers_and_fetches_around_their_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (l, src) = gated_layer(&store).await;
        let big = data_of(&l, "big");
        // A reader of big's second chunk: in flight at the gate.
        let reader = tokio::spawn({
            let (l, src) = (l.clone(), src.clone());
            async move { l.ensure(&*src, big, 150_000..150_001).await }
        });
        settle().await;
        assert_eq!(src.requests().len(), 3);
        // The fill of this layer and of another layer of the same store both wait.
        let (other, other_src) = {
            let dir2 = dir.path().join("other");
            let store2 = Store {
                root: dir2.clone(),
                readers: store.readers.clone(),
            };
            Store::open(&dir2).unwrap();
            gated_layer(&store2).await
        };
        let fills = [(l.clone(), src.clone()), (other.clone(), other_src.clone())]
            .map(|(l, s)| tokio::spawn(async move { l.fill(&*s).await }));
        settle().await;
        assert_eq!(
            src.requests().len(),
            3,
            "no fill request while a reader fetches"
        );
        assert_eq!(other_src.requests().len(), 2, "not in another layer either");
        src.open(1);
        reader.await.unwrap().unwrap();
        src.open(100);
        other_src.open(100);
        for f in fills {
            f.await.unwrap().unwrap();
        }
        // The fill split its batch around the chunk the reader fetched: no byte twice.
        let requests = src.requests();
        assert_eq!(requests.len(), 5, "{requests:?}");
        assert_disjoint(&requests[2..]);
        assert_eq!(l.state().local, l.state().total);
        assert_eq!(other.state().local, other.state().total);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_reader_fetches_what_a_failed_flight_did_not_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (l, src) = gated_layer(&store).await;
        let big = data_of(&l, "big");
        let read = || {
            let (l, src) = (l.clone(), src.clone());
            tokio::spawn(async move { l.ensure(&*src, big, 0..10).await })
        };
        let (first, second) = (read(), read());
        settle().await;
        assert_eq!(src.requests().len(), 3, "one flight for both");
        src.fail.store(1, Ordering::SeqCst);
        src.open(100);
        assert!(first.await.unwrap().is_err());
        second.await.unwrap().unwrap();
        let requests = src.requests();
        assert_eq!(requests.len(), 4, "the waiter's own request: {requests:?}");
        assert_eq!(requests[2], requests[3]);
        assert!(l.missing(big, 0..10).is_empty());
    }

    #[tokio::test]
    async fn a_toc_over_the_entry_limit_is_refused_and_nothing_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (blob, digest, toc) = sample();
        let src = MemRanges::new(blob.clone());
        let err = store
            .lazy_layer(&src, &digest, blob.len() as u64, Some(&toc), 1)
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(
                &err,
                StoreError::Layer {
                    source: LayerFault::Toc(EstargzError::TooManyEntries { max: 1, .. }),
                    ..
                }
            ),
            "{err}"
        );
        assert!(!has_toc(&store.estargz_dir(&digest)));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_fill_starts_only_once_readers_were_quiet_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (l, src) = gated_layer(&store).await;
        src.open(100);
        l.ensure(&*src, data_of(&l, "big"), 0..1).await.unwrap();
        assert_eq!(src.requests().len(), 3);
        let fill = tokio::spawn({
            let (l, src) = (l.clone(), src.clone());
            async move { l.fill(&*src).await }
        });
        settle().await;
        tokio::time::advance(READERS_QUIET - Duration::from_millis(10)).await;
        settle().await;
        assert_eq!(
            src.requests().len(),
            3,
            "the fill waits for the quiet period"
        );
        tokio::time::advance(Duration::from_millis(20)).await;
        fill.await.unwrap().unwrap();
        assert!(src.requests().len() > 3);
        assert_eq!(l.state().local, l.state().total);
    }

    #[test]
    fn runs_join_adjacent_missing_chunks() {
        let chunk = |offset, len| estargz::Chunk {
            offset,
            compressed_len: len,
            chunk_offset: 0,
            chunk_size: 1,
            chunk_digest: None,
            inner_offset: 0,
        };
        let chunks = [chunk(0, 10), chunk(10, 10), chunk(20, 5), chunk(30, 5)];
        // Runs as (start, end) pairs.
        type Runs = &'static [(u32, u32)];
        let cases: [(&[u32], Runs); 4] = [
            (&[], &[]),
            (&[0, 1, 2], &[(0, 3)]),
            (&[0, 2], &[(0, 1), (2, 3)]),
            (&[1, 2, 3], &[(1, 3), (3, 4)]),
        ];
        for (missing, want) in cases {
            let got: Vec<(u32, u32)> = runs(&chunks, missing)
                .into_iter()
                .map(|r| (r.start, r.end))
                .collect();
            assert_eq!(got, want, "{missing:?}");
        }
    }
}
