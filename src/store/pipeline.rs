//! Fetching a layer into the store in one streaming pass:
//! download → (tee to the partial blob file) → verify digest → decompress → tar index →
//! extract file data → verify diff_id → rename into place.
//!
//! An interrupted download keeps its partial file; the next attempt re-reads that prefix
//! locally and asks the source only for the rest (HTTP Range). Nothing becomes visible under
//! a digest before both the blob digest and the diff_id verified.
//!
//! A Docker schema 1 layer comes with its blob digest alone: [`Store::ensure_layer_of_blob`]
//! runs the same pass with the size, the compression (read from the first bytes) and the
//! diff_id unknown, and returns them. The diff_id is then what the pass computed, and the
//! layer becomes visible only after the blob digest verified.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, BufRead, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::{LayerFault, Store, StoreError, io_err};
use crate::layer::decompress::{self, Limits};
use crate::layer::tar::{index_layer_bounded, read_full};
use crate::oci::{Compression, Digest, Hasher};
use crate::retry::{RetryPolicy, Verdict};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Error from a [`BlobSource`], kept as the source's own error (its Display says what
/// happened and what to do).
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// A stream of blob bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, SourceError>> + Send>>;

/// A blob body from `start` onwards (`start` may be smaller than what was asked for when the
/// source cannot seek, e.g. a registry that ignores Range).
pub struct BlobBody {
    pub start: u64,
    pub stream: ByteStream,
}

/// Where blob bytes come from (the registry, in the binary). The store knows nothing else of
/// it.
pub trait BlobSource: Send + Sync {
    fn fetch<'a>(
        &'a self,
        digest: &'a Digest,
        offset: u64,
    ) -> Pin<Box<dyn Future<Output = Result<BlobBody, SourceError>> + Send + 'a>>;
}

/// Progress of one layer, for progress bars and logs.
#[derive(Clone, Debug)]
pub enum LayerEvent {
    /// Already extracted: nothing to do.
    Cached,
    /// Starting; `resumed` bytes are already local.
    Started {
        size: u64,
        resumed: u64,
    },
    /// `n` more compressed bytes processed.
    Progress {
        n: u64,
    },
    /// Transient failure, retrying.
    Retrying {
        attempt: u32,
        reason: String,
    },
    Done,
}

/// What to fetch and how to check it.
#[derive(Clone, Debug)]
pub struct LayerJob {
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub compression: Compression,
    pub limits: Limits,
    /// Resuming after a transient (network) failure; the partial download is kept between
    /// attempts, and an attempt that got no byte is not retried (the source already spent
    /// its own retries on reaching the registry).
    pub retry: RetryPolicy,
}

/// What a layer blob turned out to hold, found by [`Store::ensure_layer_of_blob`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundLayer {
    pub diff_id: Digest,
    /// Compressed size.
    pub size: u64,
    pub compression: Compression,
}

/// A [`LayerJob`] with what may be unknown left open: the internal form of both entry points.
#[derive(Clone, Debug)]
struct Target {
    digest: Digest,
    size: Option<u64>,
    diff_id: Option<Digest>,
    /// `None`: told by the blob's first bytes (gzip, zstd, else plain tar).
    compression: Option<Compression>,
    limits: Limits,
    retry: RetryPolicy,
}

type Progress = Arc<dyn Fn(LayerEvent) + Send + Sync>;

impl Store {
    /// Make sure the layer `job.diff_id` is extracted in the store, fetching its blob from
    /// `source` if needed. Safe to call concurrently from several threads or processes.
    pub async fn ensure_layer(
        &self,
        source: Arc<dyn BlobSource>,
        job: &LayerJob,
        progress: Progress,
    ) -> Result<(), StoreError> {
        if self.has_layer(&job.diff_id) {
            progress(LayerEvent::Cached);
            return Ok(());
        }
        let _lock = self
            .lock_async(format!("layer-{}", job.diff_id.hex()))
            .await?;
        if self.has_layer(&job.diff_id) {
            progress(LayerEvent::Cached);
            return Ok(());
        }
        let target = Target {
            digest: job.digest.clone(),
            size: Some(job.size),
            diff_id: Some(job.diff_id.clone()),
            compression: Some(job.compression),
            limits: job.limits,
            retry: job.retry.clone(),
        };
        self.fetch_with_retries(&source, &target, &progress)
            .await
            .map(drop)
    }

    /// Make sure the layer in blob `digest` is extracted in the store when neither its size,
    /// its compression nor its diff_id is known (a Docker schema 1 layer), and return them,
    /// as computed while streaming. The blob is verified against `digest` before the layer
    /// becomes visible; a blob already in the store is read locally. Safe to call
    /// concurrently.
    pub async fn ensure_layer_of_blob(
        &self,
        source: Arc<dyn BlobSource>,
        digest: &Digest,
        limits: Limits,
        retry: RetryPolicy,
        progress: Progress,
    ) -> Result<FoundLayer, StoreError> {
        let target = Target {
            digest: digest.clone(),
            size: None,
            diff_id: None,
            compression: None,
            limits,
            retry,
        };
        self.fetch_with_retries(&source, &target, &progress).await
    }

    /// `lock`, off the async threads (it blocks until the holder is done).
    async fn lock_async(&self, name: String) -> Result<File, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.lock(&name))
            .await
            .expect("lock task panicked")
    }

    async fn fetch_with_retries(
        &self,
        source: &Arc<dyn BlobSource>,
        job: &Target,
        progress: &Progress,
    ) -> Result<FoundLayer, StoreError> {
        // The partial download is the blob's, whatever diff_id the caller expects.
        let _lock = self
            .lock_async(format!("blob-{}", job.digest.hex()))
            .await?;
        if job.size.is_none() {
            // A leftover of unknown length may be the whole blob, which a Range request
            // could not resume: start afresh. Resuming within this call still works.
            let _ = fs::remove_file(self.partial_path(&job.digest));
        }
        let partial_len = || fs::metadata(self.partial_path(&job.digest)).map_or(0, |m| m.len());
        let found = job
            .retry
            .run_observed(
                |_| async {
                    let before = partial_len();
                    self.fetch_once(source, job, progress)
                        .await
                        .map_err(|failure| match failure {
                            // Resume only after progress: an attempt that got no byte failed to
                            // reach the registry, and the client already spent its retries (and
                            // its timeout) on that.
                            Failure::Transient(e) if partial_len() <= before => Failure::Final(e),
                            failure => failure,
                        })
                },
                |failure| match failure {
                    Failure::Transient(_) => Verdict::Transient,
                    Failure::Final(_) => Verdict::Permanent,
                },
                |failure, attempt, _| {
                    progress(LayerEvent::Retrying {
                        attempt,
                        reason: failure.to_string(),
                    });
                    tracing::warn!(digest = %job.digest, attempt, "layer fetch failed, resuming: {failure}");
                },
            )
            .await
            .map_err(Failure::into_error)?;
        progress(LayerEvent::Done);
        Ok(found)
    }

    async fn fetch_once(
        &self,
        source: &Arc<dyn BlobSource>,
        job: &Target,
        progress: &Progress,
    ) -> Result<FoundLayer, Failure> {
        let blob_path = self.blob_path(&job.digest);
        let partial = self.partial_path(&job.digest);
        let have_blob = blob_path.is_file();

        // The network part, if any: resume after what the partial file already holds.
        let mut body = None;
        let mut resumed = 0;
        if !have_blob {
            resumed = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
            if job.size.is_some_and(|size| resumed > size) {
                resumed = 0;
            }
            let fetched = if job.size == Some(resumed) && resumed > 0 {
                None
            } else {
                Some(source.fetch(&job.digest, resumed).await.map_err(|e| {
                    Failure::Transient(StoreError::Source {
                        digest: job.digest.clone(),
                        source: e,
                    })
                })?)
            };
            if let Some(b) = fetched {
                if b.start != resumed {
                    // The source restarted from the beginning (Range ignored): start over.
                    if b.start != 0 {
                        return Err(Failure::Final(StoreError::Layer {
                            digest: job.digest.clone(),
                            source: LayerFault::Invalid(format!(
                                "asked for bytes from {resumed}, the registry sent from {}",
                                b.start
                            )),
                        }));
                    }
                    resumed = 0;
                }
                body = Some(b.stream);
            }
            if resumed == 0 {
                File::create(&partial).map_err(|e| Failure::Final(io_err(&partial)(e)))?;
            }
        }
        progress(LayerEvent::Started {
            size: job.size.unwrap_or(0),
            resumed,
        });

        let store = self.clone();
        let job2 = job.clone();
        let progress2 = progress.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            store.extract_blocking(&job2, have_blob, resumed, body, handle, progress2)
        })
        .await
        .expect("extraction task panicked")
    }

    /// One attempt's blocking part: stream the compressed input (local blob, or partial
    /// prefix + network) through decompression and the tar indexer, extracting into a
    /// temporary directory; verify blob digest, size and diff_id; install the layer.
    fn extract_blocking(
        &self,
        job: &Target,
        have_blob: bool,
        resumed: u64,
        body: Option<ByteStream>,
        handle: tokio::runtime::Handle,
        progress: Progress,
    ) -> Result<FoundLayer, Failure> {
        let fin = |e: StoreError| Failure::Final(e);
        // The source's error, if the network side failed: the decoders see only an io::Error
        // standing for it, and whatever they make of it, this says the cause was the source
        // (worth resuming), with the source's own error.
        let source_failed: SourceFailed = Arc::default();
        let input = self.compressed_input(job, have_blob, resumed, body, handle, &source_failed)?;
        let mut compressed = Hashing::new(input, job.digest.hasher(), progress.clone());

        // Named `layer-PID-…` like every temporary of the store, so that a crashed process's
        // leftover is recognised (`Store::open`); removed on drop unless kept.
        let tmp = tempfile::Builder::new()
            .prefix(&format!("layer-{}-", std::process::id()))
            .tempdir_in(self.root.join("tmp"))
            .map_err(|e| fin(io_err(&self.root.join("tmp"))(e)))?;
        let data_dir = tmp.path().join("data");
        fs::create_dir(&data_dir).map_err(|e| fin(io_err(&data_dir)(e)))?;

        let mut compression = job.compression;
        let (index, diff_id) =
            match decode_and_index(job, &mut compressed, &data_dir, &mut compression) {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(self.data_failure(&mut compressed, job, e)),
                Err(e) => {
                    return Err(match classify(job, &source_failed, e) {
                        Failure::Final(e) => self.data_failure(&mut compressed, job, e),
                        transient => transient,
                    });
                }
            };
        // Drain the compressed side so the whole blob is hashed (decoders may stop early).
        if let Err(e) = io::copy(&mut compressed, &mut io::sink()) {
            return Err(classify(job, &source_failed, e));
        }
        let blob_size = self.verify_blob(job, &mut compressed, have_blob)?;
        if let Some(expected) = &job.diff_id
            && diff_id != *expected
        {
            return Err(fin(StoreError::DigestMismatch {
                what: "layer diff_id",
                expected: expected.clone(),
                actual: diff_id,
            }));
        }
        let found = FoundLayer {
            diff_id,
            size: blob_size,
            compression: compression.expect("set before decompressing"),
        };
        self.install(tmp, &index, &found).map_err(fin)?;
        Ok(found)
    }

    /// The compressed input: the local blob, or the partial prefix followed by the network,
    /// every network byte appended to the partial file (so a later attempt can resume).
    fn compressed_input(
        &self,
        job: &Target,
        have_blob: bool,
        resumed: u64,
        body: Option<ByteStream>,
        handle: tokio::runtime::Handle,
        source_failed: &SourceFailed,
    ) -> Result<Box<dyn Read + Send>, Failure> {
        let fin = |e: StoreError| Failure::Final(e);
        let blob_path = self.blob_path(&job.digest);
        let partial = self.partial_path(&job.digest);
        if have_blob {
            return Ok(Box::new(
                File::open(&blob_path).map_err(|e| fin(io_err(&blob_path)(e)))?,
            ));
        }
        let prefix = File::open(&partial).map_err(|e| fin(io_err(&partial)(e)))?;
        let prefix = prefix.take(resumed);
        let tee = OpenOptions::new()
            .append(true)
            .open(&partial)
            .map_err(|e| fin(io_err(&partial)(e)))?;
        let slot = source_failed.clone();
        let stream = body
            .unwrap_or_else(|| Box::pin(futures_util::stream::empty()))
            .map(move |item| {
                item.map_err(|e| {
                    let shown = io::Error::other(e.to_string());
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    shown
                })
            });
        let net = SyncIoBridge::new_with_handle(StreamReader::new(stream), handle);
        Ok(Box::new(prefix.chain(Tee { inner: net, tee })))
    }

    /// The whole blob was read through `compressed`: check its digest and size (bad bytes
    /// are never kept, not even as a partial download), and move a download into place.
    /// Returns the blob's size.
    fn verify_blob<R: Read>(
        &self,
        job: &Target,
        compressed: &mut Hashing<R>,
        have_blob: bool,
    ) -> Result<u64, Failure> {
        let partial = self.partial_path(&job.digest);
        let blob_size = compressed.count;
        let blob_digest = compressed.hasher.take().expect("hasher").finish();
        if blob_digest != job.digest {
            let _ = fs::remove_file(&partial);
            return Err(Failure::Final(StoreError::DigestMismatch {
                what: "layer blob",
                expected: job.digest.clone(),
                actual: blob_digest,
            }));
        }
        if let Some(expected) = job.size
            && blob_size != expected
        {
            let _ = fs::remove_file(&partial);
            return Err(Failure::Final(StoreError::SizeMismatch {
                digest: job.digest.clone(),
                expected,
                actual: blob_size,
            }));
        }
        if !have_blob {
            let blob_path = self.blob_path(&job.digest);
            fs::rename(&partial, &blob_path).map_err(|e| Failure::Final(io_err(&blob_path)(e)))?;
        }
        Ok(blob_size)
    }

    /// Write the index beside the extracted data and rename the directory to the layer's
    /// place: the layer becomes visible whole or not at all. A layer found by its blob alone
    /// may be in the store already (another image has it, or another process extracted it
    /// meanwhile): that one is kept.
    fn install(
        &self,
        tmp: tempfile::TempDir,
        index: &crate::layer::LayerIndex,
        found: &FoundLayer,
    ) -> Result<(), StoreError> {
        if self.has_layer(&found.diff_id) {
            return Ok(());
        }
        let index_path = tmp.path().join("index.json");
        let json = serde_json::to_vec(index).expect("index serialises");
        fs::write(&index_path, json).map_err(io_err(&index_path))?;
        let dest = self.layer_dir(&found.diff_id);
        let tmp = tmp.keep();
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_dir_all(&tmp);
            // Renamed into place by a concurrent extraction of the same layer just now.
            if !self.has_layer(&found.diff_id) {
                return Err(io_err(&dest)(e));
            }
        }
        Ok(())
    }
}

/// Decompress `compressed` (sniffing the compression when unknown, bounded by the job's
/// limits), index the tar and extract file contents into `data_dir`, hashing the whole tar
/// for the diff_id. An `io::Error` is a failure to read (the network, the disk); a
/// `StoreError` a failure of the data itself.
fn decode_and_index<R: Read + Send>(
    job: &Target,
    compressed: &mut Hashing<R>,
    data_dir: &std::path::Path,
    compression: &mut Option<Compression>,
) -> io::Result<Result<(crate::layer::LayerIndex, Digest), StoreError>> {
    let count = std::sync::atomic::AtomicU64::new(0);
    // The diff_id's algorithm, when unknown, is the canonical one (sha256).
    let hasher = match &job.diff_id {
        Some(d) => d.hasher(),
        None => Hasher::new(crate::oci::digest::Algorithm::Sha256),
    };
    // Three stages, so that inflating — the one step that cannot be split — has a core to
    // itself: a helper thread reads the input (network, partial file and its tee, blob
    // digest); a second one inflates; this thread hashes the tar for the diff_id, parses it
    // and writes file contents.
    std::thread::scope(|s| {
        // Counted as the decoder consumes it, for the decompression ratio bound.
        let mut counted = CountInto(stage(s, compressed), &count);
        let (head, found) = match *compression {
            Some(c) => (Vec::new(), c),
            None => sniff_compression(&mut counted)?,
        };
        *compression = Some(found);
        let dec = decompress::decoder_buffered(found, io::Cursor::new(head).chain(counted))?;
        let bounded = decompress::Bounded::new(dec, job.limits, || {
            count.load(std::sync::atomic::Ordering::Relaxed)
        });
        let staged = stage(s, bounded);
        let mut tar_stream = Hashing::new(staged, hasher, Arc::new(|_| {}));
        let index =
            match index_layer_bounded(&mut tar_stream, Some(data_dir), job.limits.max_entries) {
                Ok(i) => i,
                Err(crate::layer::tar::TarError::Read { source }) => return Err(source),
                Err(e) => {
                    return Ok(Err(StoreError::Layer {
                        digest: job.digest.clone(),
                        source: e.into(),
                    }));
                }
            };
        // Hash everything after the end-of-archive marker too: the diff_id covers it.
        io::copy(&mut tar_stream, &mut io::sink())?;
        let diff_id = tar_stream.hasher.take().expect("hasher").finish();
        Ok(Ok((index, diff_id)))
    })
}

/// Blocks in flight between two stages of [`decode_and_index`], and their size.
const STAGE_BLOCKS: usize = 4;
const STAGE_BLOCK: usize = 256 << 10;

/// Run `input` as a stage of its own on a thread of scope `s`: the returned reader yields
/// what it read, in blocks that are handed back and reused.
fn stage<'scope, 'env, R: Read + Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    input: R,
) -> Staged {
    let (tx, rx) = sync_channel(STAGE_BLOCKS);
    let (back_tx, back_rx) = sync_channel(STAGE_BLOCKS + 2);
    s.spawn(move || pump(input, &tx, &back_rx));
    Staged {
        rx,
        back: back_tx,
        cur: Vec::new(),
        pos: 0,
    }
}

/// A stage's thread: read `input` to its end in blocks, reusing the blocks handed back.
/// Stops at the first error (passed on) or when the reader is gone.
fn pump(mut input: impl Read, tx: &SyncSender<io::Result<Vec<u8>>>, back: &Receiver<Vec<u8>>) {
    loop {
        let mut block = back.try_recv().unwrap_or_else(|_| vec![0u8; STAGE_BLOCK]);
        block.resize(STAGE_BLOCK, 0);
        let filled = match read_full(&mut input, &mut block) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        if filled == 0 {
            return;
        }
        block.truncate(filled);
        if tx.send(Ok(block)).is_err() {
            return;
        }
    }
}

/// A stage's output as the next one reads it: the blocks in order, then end of input when
/// the stage is done.
struct Staged {
    rx: Receiver<io::Result<Vec<u8>>>,
    back: SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for Staged {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = {
            let have = self.fill_buf()?;
            let n = out.len().min(have.len());
            out[..n].copy_from_slice(&have[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

/// The decoder reads the blocks in place.
impl BufRead for Staged {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(block)) => {
                    let used = std::mem::replace(&mut self.cur, block);
                    let _ = self.back.try_send(used);
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(&[]),
            }
        }
        Ok(&self.cur[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}

/// The compression of a stream, from its first bytes (as containerd's `DecompressStream`
/// tells it): gzip and zstd by their magic numbers, anything else is a plain tar. Returns
/// the bytes read, to be replayed in front of the rest.
fn sniff_compression(r: &mut impl Read) -> io::Result<(Vec<u8>, Compression)> {
    const GZIP: [u8; 2] = [0x1f, 0x8b];
    const ZSTD: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let mut head = Vec::with_capacity(ZSTD.len());
    r.by_ref().take(ZSTD.len() as u64).read_to_end(&mut head)?;
    let compression = if head.starts_with(&GZIP) {
        Compression::Gzip
    } else if head.starts_with(&ZSTD) {
        Compression::Zstd
    } else {
        Compression::None
    };
    Ok((head, compression))
}

impl Store {
    /// The layer's content is unusable (bad compression, bad tar, bomb). If the blob's bytes
    /// do not match its digest, that is the real story: say so. Either way the partial
    /// download is dropped, so the next attempt starts from clean bytes.
    fn data_failure<R: Read>(
        &self,
        compressed: &mut Hashing<R>,
        job: &Target,
        e: StoreError,
    ) -> Failure {
        let _ = fs::remove_file(self.partial_path(&job.digest));
        // A full or read-only disk says nothing about the data: reported as it is, never
        // turned into a verdict on the blob (draining it would hash a stream cut short).
        if is_local_storage_failure(&e) {
            return Failure::Final(e);
        }
        if io::copy(compressed, &mut io::sink()).is_ok()
            && let Some(h) = compressed.hasher.take()
        {
            let actual = h.finish();
            if actual != job.digest {
                return Failure::Final(StoreError::DigestMismatch {
                    what: "layer blob",
                    expected: job.digest.clone(),
                    actual,
                });
            }
        }
        Failure::Final(e)
    }
}

/// The source's error, set when the blob stream failed (see `extract_blocking`).
type SourceFailed = Arc<Mutex<Option<SourceError>>>;

/// Whether an I/O failure while streaming came from the source (worth resuming: the source's
/// error) or from the data itself (bad gzip, bad tar: final).
fn classify(job: &Target, source_failed: &SourceFailed, e: io::Error) -> Failure {
    match source_failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        Some(source) => Failure::Transient(StoreError::Source {
            digest: job.digest.clone(),
            source,
        }),
        None => Failure::Final(StoreError::Layer {
            digest: job.digest.clone(),
            source: LayerFault::Decode(e),
        }),
    }
}

/// Whether `e` is the local disk failing (full, over quota, read-only, file too large)
/// rather than the data or the network.
fn is_local_storage_failure(e: &StoreError) -> bool {
    use crate::layer::tar::TarError;
    let io = match e {
        StoreError::Io { source, .. }
        | StoreError::Layer {
            source:
                LayerFault::Decode(source)
                | LayerFault::Tar(TarError::Write { source, .. } | TarError::Read { source }),
            ..
        } => source,
        _ => return false,
    };
    matches!(
        io.kind(),
        io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::ReadOnlyFilesystem
            | io::ErrorKind::FileTooLarge
    )
}

/// A failed attempt: worth resuming (`Transient`) or not. Shown with its causes.
enum Failure {
    Transient(StoreError),
    Final(StoreError),
}

impl Failure {
    fn into_error(self) -> StoreError {
        match self {
            Failure::Transient(e) | Failure::Final(e) => e,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (Failure::Transient(e) | Failure::Final(e)) = self;
        crate::error::Chain(e).fmt(f)
    }
}

/// Appends every byte read from the network to the partial file (so a later attempt can
/// resume) before handing it on.
struct Tee<R> {
    inner: R,
    tee: File,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.tee.write_all(&out[..n])?;
        Ok(n)
    }
}

/// Hashes and counts what is read through it.
struct Hashing<R> {
    inner: R,
    hasher: Option<Hasher>,
    count: u64,
    progress: Progress,
}

impl<R> Hashing<R> {
    fn new(inner: R, hasher: Hasher, progress: Progress) -> Self {
        Hashing {
            inner,
            hasher: Some(hasher),
            count: 0,
            progress,
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        if n > 0 {
            (self.progress)(LayerEvent::Progress { n: n as u64 });
        }
        Ok(n)
    }
}

/// Passes reads through and publishes the running byte count (for the expansion-ratio limit).
struct CountInto<'a, R>(R, &'a std::sync::atomic::AtomicU64);

impl<R: Read> Read for CountInto<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for CountInto<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.0.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.0.consume(n);
        self.1
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// An in-memory source that can fail once after `fail_after` bytes and records the
    /// offsets it was asked for.
    struct MemSource {
        blob: Vec<u8>,
        fail_after: Mutex<Option<usize>>,
        offsets: Mutex<Vec<u64>>,
        ignore_range: bool,
    }

    impl BlobSource for MemSource {
        fn fetch<'a>(
            &'a self,
            _digest: &'a Digest,
            offset: u64,
        ) -> Pin<Box<dyn Future<Output = Result<BlobBody, SourceError>> + Send + 'a>> {
            Box::pin(async move {
                self.offsets.lock().unwrap().push(offset);
                let start = if self.ignore_range { 0 } else { offset };
                let mut data = self.blob[start as usize..].to_vec();
                let mut items: Vec<Result<Bytes, SourceError>> = Vec::new();
                if let Some(n) = self.fail_after.lock().unwrap().take() {
                    data.truncate(n);
                    items.push(Ok(Bytes::from(data)));
                    items.push(Err("connection reset".into()));
                } else {
                    for c in data.chunks(1000) {
                        items.push(Ok(Bytes::copy_from_slice(c)));
                    }
                }
                Ok(BlobBody {
                    start,
                    stream: Box::pin(futures_util::stream::iter(items)),
                })
            })
        }
    }

    fn layer() -> (Vec<u8>, Digest, Digest) {
        let content: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        layer_of(&[("f".into(), content)])
    }

    /// A gzip layer of regular files (mode 0644, root, mtime 0): (blob, digest, diff_id).
    fn layer_of(files: &[(String, Vec<u8>)]) -> (Vec<u8>, Digest, Digest) {
        let mut b = tar::Builder::new(Vec::new());
        for (name, content) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            b.append_data(&mut h, name, &content[..]).unwrap();
        }
        let tarball = b.into_inner().unwrap();
        let diff_id = Digest::sha256(&tarball);
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tarball).unwrap();
        let gz = e.finish().unwrap();
        let digest = Digest::sha256(&gz);
        (gz, digest, diff_id)
    }

    /// Three attempts (a pull makes four: `cli::pull::layer_retry`).
    fn resume_policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            first_backoff: std::time::Duration::from_millis(400),
            ..RetryPolicy::default()
        }
    }

    fn job(gz: &[u8], digest: &Digest, diff_id: &Digest) -> LayerJob {
        LayerJob {
            digest: digest.clone(),
            size: gz.len() as u64,
            diff_id: diff_id.clone(),
            compression: Compression::Gzip,
            limits: Limits::default(),
            retry: resume_policy(),
        }
    }

    fn source(gz: &[u8], fail_after: Option<usize>, ignore_range: bool) -> Arc<MemSource> {
        Arc::new(MemSource {
            blob: gz.to_vec(),
            fail_after: Mutex::new(fail_after),
            offsets: Mutex::new(Vec::new()),
            ignore_range,
        })
    }

    #[tokio::test]
    async fn small_files_are_packed_and_get_a_file_of_their_own_at_first_open() {
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt;
        let files: Vec<(String, Vec<u8>)> = (1..=3u8)
            .map(|i| (format!("f{i}"), vec![i; 1000 * i as usize]))
            .collect();
        let (gz, digest, diff_id) = layer_of(&files);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .ensure_layer(
                source(&gz, None, false),
                &job(&gz, &digest, &diff_id),
                Arc::new(|_| {}),
            )
            .await
            .unwrap();
        let index = store.load_layer_index(&diff_id).unwrap();
        for (entry, (_, content)) in index.entries.iter().zip(&files) {
            let data = entry.data.unwrap();
            let at = index.packed.get(data).expect("a small file is packed");
            let own = store.data_path(&diff_id, data);
            assert!(!own.exists(), "no file of its own before it is opened");
            let mut got = Vec::new();
            let mut f = store.open_data(&diff_id, data, Some(at)).unwrap();
            f.read_to_end(&mut got).unwrap();
            assert_eq!(&got, content);
            let ino = fs::metadata(&own).unwrap().ino();
            store.open_data(&diff_id, data, Some(at)).unwrap();
            assert_eq!(fs::metadata(&own).unwrap().ino(), ino, "written once");
        }
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
        // Without its pack entry, a file that has none of its own is an error, not empty.
        let data = index.entries[0].data.unwrap();
        fs::remove_file(store.data_path(&diff_id, data)).unwrap();
        assert!(store.open_data(&diff_id, data, None).is_err());
    }

    #[tokio::test]
    async fn resumes_after_a_dropped_connection() {
        let (gz, digest, diff_id) = layer();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let src = source(&gz, Some(gz.len() / 2), false);
        let retries = Arc::new(AtomicU32::new(0));
        let r = retries.clone();
        let progress: Progress = Arc::new(move |e| {
            if let LayerEvent::Retrying { .. } = e {
                r.fetch_add(1, Ordering::Relaxed);
            }
        });
        store
            .ensure_layer(src.clone(), &job(&gz, &digest, &diff_id), progress)
            .await
            .unwrap();
        assert!(store.has_layer(&diff_id));
        assert!(store.has_blob(&digest));
        assert_eq!(*src.offsets.lock().unwrap(), vec![0, (gz.len() / 2) as u64]);
        assert_eq!(retries.load(Ordering::Relaxed), 1);
        let index = store.load_layer_index(&diff_id).unwrap();
        let data = index.entries[0].data.unwrap();
        assert_eq!(
            fs::metadata(store.data_path(&diff_id, data)).unwrap().len(),
            800_000
        );
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn range_ignored_restarts_from_zero() {
        let (gz, digest, diff_id) = layer();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let src = source(&gz, Some(gz.len() / 3), true);
        store
            .ensure_layer(src, &job(&gz, &digest, &diff_id), Arc::new(|_| {}))
            .await
            .unwrap();
        assert!(store.has_layer(&diff_id));
    }

    #[tokio::test]
    async fn a_layer_found_by_its_blob_alone() {
        let (gz, digest, diff_id) = layer();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_mtime(0);
        b.append_data(&mut h, "plain", &b"abc"[..]).unwrap();
        let plain = b.into_inner().unwrap();
        let plain_digest = Digest::sha256(&plain);
        // (blob, its digest, want: (diff_id, compression))
        let cases = [
            (
                gz.clone(),
                digest.clone(),
                (diff_id.clone(), Compression::Gzip),
            ),
            (
                plain.clone(),
                plain_digest.clone(),
                (plain_digest.clone(), Compression::None),
            ),
        ];
        for (blob, blob_digest, (want_diff_id, want_compression)) in cases {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            // A dropped connection half way: resumed within the call.
            let src = source(&blob, Some(blob.len() / 2), false);
            let found = store
                .ensure_layer_of_blob(
                    src.clone(),
                    &blob_digest,
                    Limits::default(),
                    resume_policy(),
                    Arc::new(|_| {}),
                )
                .await
                .unwrap();
            assert_eq!(
                found,
                FoundLayer {
                    diff_id: want_diff_id.clone(),
                    size: blob.len() as u64,
                    compression: want_compression,
                }
            );
            assert!(store.has_layer(&want_diff_id) && store.has_blob(&blob_digest));
            // Again: from the stored blob, no request.
            let again = store
                .ensure_layer_of_blob(
                    src.clone(),
                    &blob_digest,
                    Limits::default(),
                    resume_policy(),
                    Arc::new(|_| {}),
                )
                .await
                .unwrap();
            assert_eq!(again, found);
            assert_eq!(src.offsets.lock().unwrap().len(), 2);
            assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
        }

        // Other bytes than the blobSum names: nothing is stored, under any name.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = store
            .ensure_layer_of_blob(
                source(&plain, None, false),
                &digest,
                Limits::default(),
                resume_policy(),
                Arc::new(|_| {}),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("failed verification"), "{err}");
        assert!(!store.has_blob(&digest) && !store.has_layer(&plain_digest));
        assert_eq!(
            fs::read_dir(store.layer_dir(&plain_digest).parent().unwrap())
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn mismatches_store_nothing() {
        let (gz, digest, diff_id) = layer();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();

        // Blob digest mismatch: the registry served other bytes.
        let mut bad = gz.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        let err = store
            .ensure_layer(
                source(&bad, None, false),
                &job(&gz, &digest, &diff_id),
                Arc::new(|_| {}),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("failed verification"), "{err}");
        assert!(
            !store.has_layer(&diff_id) && !store.has_blob(&digest),
            "{err}"
        );
        assert!(!store.partial_path(&digest).exists());

        // diff_id mismatch: the config claims another uncompressed digest.
        let other = Digest::sha256(b"not the tar");
        let err = store
            .ensure_layer(
                source(&gz, None, false),
                &job(&gz, &digest, &other),
                Arc::new(|_| {}),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("diff_id"), "{err}");
        assert!(!store.has_layer(&other));
        assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
    }
}
