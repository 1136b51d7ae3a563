//! Where the content of a layer's regular files lands: numbered files in the layer's data
//! directory, runs of zeros left as holes.
//!
//! Creating a file costs far more than decoding its bytes (on the bench machine's disk an
//! `openat(O_CREAT)` takes about a millisecond cold), so the decoding thread does not create
//! small files itself: it reads each small file's bytes into its own buffer and hands them to
//! a few writer threads through a bounded queue, then goes on decoding. Big files are
//! streamed on the decoding thread with one reused buffer (queuing them would hold them in
//! memory whole). Memory in flight is bounded by `QUEUE * SMALL` plus one file per writer.
//! The std channel and threads are enough here; no pool crate is needed for one queue.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Files up to this size go to the writer threads.
const SMALL: u64 = 256 << 10;
/// Queued small files, at most (so at most `QUEUE * SMALL` bytes wait in memory).
const QUEUE: usize = 64;
/// Writer threads per layer being extracted.
const WRITERS: usize = 3;
/// The buffer big files are streamed through.
const BUF: usize = 1 << 20;
/// Zero runs this long and aligned become holes.
const BLOCK: usize = 64 << 10;

/// A failure to write `path`.
#[derive(Debug)]
pub struct WriteError {
    pub path: PathBuf,
    pub source: io::Error,
}

type Job = (PathBuf, Vec<u8>);

/// Writes a layer's file contents; [`Extractor::finish`] waits for every queued write and
/// reports the first failure. Dropping it without `finish` also waits (nothing is left
/// writing into a directory the caller may be deleting).
pub struct Extractor {
    /// Grows to [`BUF`] at most, at the first big file.
    buf: Vec<u8>,
    pool: Option<Pool>,
}

struct Pool {
    tx: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    failed: Arc<Mutex<Option<WriteError>>>,
}

impl Default for Extractor {
    fn default() -> Self {
        Self::new()
    }
}

impl Extractor {
    pub fn new() -> Extractor {
        Extractor {
            buf: Vec::new(),
            pool: None,
        }
    }

    /// Write the next `size` bytes of `reader` to a new file `path` (which must not exist).
    /// An empty file creates nothing. A `Read` error is returned as `Ok(Err(_))`, a failure
    /// to write (here or in an earlier queued write) as `Err(_)`.
    pub fn write(
        &mut self,
        reader: &mut impl Read,
        size: u64,
        path: PathBuf,
    ) -> Result<io::Result<()>, WriteError> {
        if let Some(e) = self.pool.as_ref().and_then(Pool::take_failure) {
            return Err(e);
        }
        if size == 0 {
            return Ok(Ok(()));
        }
        if size > SMALL {
            return self.stream(reader, size, path);
        }
        let mut data = Vec::with_capacity(size as usize);
        match reader.take(size).read_to_end(&mut data) {
            Ok(n) if n as u64 == size => {}
            Ok(_) => return Ok(Err(io::ErrorKind::UnexpectedEof.into())),
            Err(e) => return Ok(Err(e)),
        }
        let pool = self.pool.get_or_insert_with(Pool::start);
        if let Some(tx) = &pool.tx
            && tx.send((path, data)).is_err()
        {
            // Every writer is gone: only a failure ends them early.
            return Err(pool.take_failure().unwrap_or_else(|| WriteError {
                path: PathBuf::new(),
                source: io::Error::other("the writer threads stopped"),
            }));
        }
        Ok(Ok(()))
    }

    /// Wait for the queued writes; the first failure, if any.
    pub fn finish(mut self) -> Result<(), WriteError> {
        match self.pool.take() {
            Some(mut pool) => {
                pool.join();
                pool.take_failure().map_or(Ok(()), Err)
            }
            None => Ok(()),
        }
    }

    fn stream(
        &mut self,
        reader: &mut impl Read,
        size: u64,
        path: PathBuf,
    ) -> Result<io::Result<()>, WriteError> {
        let werr = |source| WriteError {
            path: path.clone(),
            source,
        };
        let mut file = create(&path).map_err(werr)?;
        if self.buf.len() < BUF {
            self.buf.resize(BUF, 0);
        }
        let mut left = size;
        let mut hole = false;
        while left > 0 {
            let want = left.min(BUF as u64) as usize;
            if let Err(e) = reader.read_exact(&mut self.buf[..want]) {
                return Ok(Err(e));
            }
            hole = write_holey(&mut file, &self.buf[..want]).map_err(werr)?;
            left -= want as u64;
        }
        if hole {
            file.set_len(size).map_err(werr)?;
        }
        Ok(Ok(()))
    }
}

impl Drop for Extractor {
    fn drop(&mut self) {
        if let Some(pool) = &mut self.pool {
            pool.join();
        }
    }
}

impl Pool {
    fn start() -> Pool {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let failed = Arc::new(Mutex::new(None));
        let threads = (0..WRITERS)
            .map(|_| {
                let (rx, failed) = (rx.clone(), failed.clone());
                std::thread::Builder::new()
                    .name("imagefs-writer".into())
                    .spawn(move || writer(&rx, &failed))
                    .expect("spawning a writer thread")
            })
            .collect();
        Pool {
            tx: Some(tx),
            threads,
            failed,
        }
    }

    fn take_failure(&self) -> Option<WriteError> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn join(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One writer thread: write queued files until the queue closes or a write fails (then
/// record the failure and stop; the others stop when they next look).
fn writer(rx: &Mutex<Receiver<Job>>, failed: &Mutex<Option<WriteError>>) {
    loop {
        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((path, data)) = job else { return };
        let mut slot = failed.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return;
        }
        drop(slot);
        if let Err(source) = write_new(&path, &data) {
            slot = failed.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(WriteError { path, source });
            return;
        }
    }
}

fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

fn write_new(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut file = create(path)?;
    if write_holey(&mut file, data)? {
        file.set_len(data.len() as u64)?;
    }
    Ok(())
}

/// Write `data` at the file's position, seeking over all-zero [`BLOCK`]s; whether it ended
/// with a hole (the caller then sets the length).
fn write_holey(file: &mut File, data: &[u8]) -> io::Result<bool> {
    let mut hole = false;
    for block in data.chunks(BLOCK) {
        if block.iter().all(|&b| b == 0) {
            file.seek(SeekFrom::Current(block.len() as i64))?;
            hole = true;
        } else {
            file.write_all(block)?;
            hole = false;
        }
    }
    Ok(hole)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn small_big_and_empty_files_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Extractor::new();
        let sizes = [
            0usize,
            1,
            4096,
            SMALL as usize,
            SMALL as usize + 1,
            3 * BUF + 17,
        ];
        for (i, &n) in sizes.iter().enumerate() {
            let data = contents(n, i as u8);
            let r = x
                .write(&mut &data[..], n as u64, dir.path().join(i.to_string()))
                .unwrap();
            r.unwrap();
        }
        x.finish().unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            let p = dir.path().join(i.to_string());
            if n == 0 {
                assert!(!p.exists(), "an empty file creates nothing");
            } else {
                assert_eq!(std::fs::read(&p).unwrap(), contents(n, i as u8), "file {i}");
            }
        }
    }

    #[test]
    fn zero_blocks_become_holes_in_queued_files_too() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mut x = Extractor::new();
        let mut data = vec![0u8; SMALL as usize];
        data[0] = 1;
        x.write(&mut &data[..], data.len() as u64, dir.path().join("0"))
            .unwrap()
            .unwrap();
        x.finish().unwrap();
        let meta = std::fs::metadata(dir.path().join("0")).unwrap();
        assert_eq!(meta.len(), data.len() as u64);
        assert!(
            meta.blocks() * 512 < data.len() as u64,
            "{} blocks",
            meta.blocks()
        );
        assert_eq!(std::fs::read(dir.path().join("0")).unwrap(), data);
    }

    #[test]
    fn a_short_reader_is_a_read_error_and_a_failed_write_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Extractor::new();
        let r = x
            .write(&mut &[1u8, 2][..], 3, dir.path().join("short"))
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // A name that exists already cannot be created: the queued write fails.
        std::fs::write(dir.path().join("taken"), b"x").unwrap();
        x.write(&mut &[7u8; 10][..], 10, dir.path().join("taken"))
            .unwrap()
            .unwrap();
        let e = x.finish().unwrap_err();
        assert_eq!(e.path, dir.path().join("taken"));
        assert_eq!(e.source.kind(), io::ErrorKind::AlreadyExists);
    }
}
