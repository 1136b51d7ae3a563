//! The eStargz writer: a layer's entries in, an eStargz blob out, laid out member by member
//! as the reference writer (stargz-snapshotter `estargz/build.go`) lays them, with what a
//! manifest says about the blob: the `toc.digest` annotation, the diff_id, the TOC offset.
//!
//! Members: tar headers accumulate in the current gzip member; each chunk of file data
//! starts a new one; the tar padding after a file stays in its last chunk's member, followed
//! by the next headers; the TOC entry gets a member of its own; then the footer.
//!
//! It writes the entries it is given, in that order: putting the prioritised files first is
//! the caller's choice, marked with [`Landmark::Prefetch`]. One gzip member at a time is
//! built in memory (at most one chunk of file data and the headers around it), then written
//! out; a file's content is passed whole, as a slice. It must not know the registry or the
//! store: bytes out through [`std::io::Write`].

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write};
use std::sync::{Arc, Mutex, mpsc};

use base64::Engine as _;
use serde::Serialize;

use super::toc::format_rfc3339;
use super::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME, TocEntryType, footer_bytes};
use crate::layer::index::{Entry, EntryKind};
use crate::oci::digest::Algorithm;
use crate::oci::{Digest, Hasher};

/// Which landmark file the writer adds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Landmark {
    None,
    /// `.no.prefetch.landmark` first, as `ctr-remote image convert` writes it when no file
    /// is prioritised.
    #[default]
    NoPrefetch,
    /// `.prefetch.landmark` after the first `after` entries (the prioritised ones), or after
    /// the last entry when there are fewer.
    Prefetch {
        after: usize,
    },
}

/// How the blob is laid out; [`WriterOptions::default`] is what `ctr-remote` writes for an
/// image without prioritised files, with 4 MiB chunks.
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// Largest chunk of file data per gzip member (positive).
    pub chunk_size: u64,
    pub landmark: Landmark,
    /// Write the 47-byte legacy stargz footer.
    pub legacy_footer: bool,
    /// gzip level, 0 to 9.
    pub compression: u32,
}

impl Default for WriterOptions {
    /// 4 MiB chunks, `.no.prefetch.landmark`, the eStargz footer, gzip level 9 (the
    /// reference writer's default).
    fn default() -> WriterOptions {
        WriterOptions {
            chunk_size: 4 << 20,
            landmark: Landmark::default(),
            legacy_footer: false,
            compression: 9,
        }
    }
}

/// Threads that compress gzip members for any number of [`Writer`]s. Every member of an
/// eStargz blob is a gzip stream of its own, so members compress independently and the
/// blob parallelises where one gzip stream cannot; the writer puts them back in order.
/// Cheap to clone; the threads end when the last clone is dropped.
#[derive(Clone)]
pub struct Pool {
    jobs: mpsc::Sender<Job>,
    threads: usize,
}

struct Job {
    data: Vec<u8>,
    level: u32,
    done: mpsc::SyncSender<io::Result<Vec<u8>>>,
}

impl Pool {
    /// `threads` compressor threads (at least one).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("estargz-gzip-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(job) = job else { return };
                        // The writer may have given up (an error): nobody to tell.
                        let _ = job.done.send(gzip(&job.data, job.level));
                    }
                })
                .expect("spawn a compressor thread");
        }
        Pool { jobs, threads }
    }
}

/// One gzip member of `data`.
fn gzip(data: &[u8], level: u32) -> io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::new(level),
    );
    gz.write_all(data)?;
    gz.finish()
}

/// A member handed to the pool, or compressed already.
enum Member {
    Done(io::Result<Vec<u8>>),
    Pending(mpsc::Receiver<io::Result<Vec<u8>>>),
}

/// A written blob (`W` is where it went; [`build`] gives the bytes) and what a manifest
/// says about it.
#[derive(Clone, Debug)]
pub struct Written<W = Vec<u8>> {
    pub blob: W,
    /// sha256 of the TOC JSON: the `containerd.io/snapshot/stargz/toc.digest` annotation.
    pub toc_digest: Digest,
    /// sha256 of the uncompressed tar: the layer's diff_id in the image config.
    pub diff_id: Digest,
    /// Blob offset of the TOC member (what the footer says).
    pub toc_offset: u64,
    /// sha256 of the blob: its digest in the manifest.
    pub digest: Digest,
    /// Bytes written: the blob's size.
    pub size: u64,
    /// Bytes of the uncompressed tar: the `io.containers.estargz.uncompressed-size`
    /// annotation.
    pub uncompressed_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("eStargz chunk size must be positive")]
    ChunkSize,
    #[error("gzip level {0} is not between 0 and 9")]
    Level(u32),
    #[error("cannot write {path:?} into an eStargz layer: {reason}")]
    Entry { path: String, reason: String },
    #[error("reading the content of {path:?}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the eStargz blob")]
    Io {
        #[source]
        source: io::Error,
    },
}

/// Write `entries` (each with its file content; ignored for non-files, and a file's size is
/// its content's length) as one eStargz blob in memory.
pub fn build(entries: &[(Entry, Vec<u8>)], options: &WriterOptions) -> Result<Written, WriteError> {
    let mut w = Writer::new(Vec::new(), options)?;
    for (entry, content) in entries {
        w.append(entry, content)?;
    }
    w.finish()
}

/// An eStargz blob being written to `W`: [`append`](Writer::append) each entry in tar
/// order, then [`finish`](Writer::finish) writes the TOC and the footer.
pub struct Writer<W: Write> {
    out: W,
    options: WriterOptions,
    /// Bytes written to `out` so far, and their hash.
    offset: u64,
    blob: Hasher,
    /// The open member's uncompressed bytes.
    member: Option<Vec<u8>>,
    /// Members closed so far: the number of the next one.
    members: usize,
    /// Blob offset of each member written out, by number.
    member_offsets: Vec<u64>,
    /// Closed members not yet written out, oldest first.
    queue: VecDeque<Member>,
    pool: Option<Pool>,
    /// Of everything uncompressed: the diff_id.
    diff: Hasher,
    uncompressed: u64,
    toc: Vec<TocOut>,
    appended: usize,
    landmark_done: bool,
}

impl<W: Write> Writer<W> {
    /// A writer that compresses on the calling thread.
    pub fn new(out: W, options: &WriterOptions) -> Result<Writer<W>, WriteError> {
        Writer::build(out, options, None)
    }

    /// A writer whose members are compressed by `pool`'s threads; the blob is the same
    /// bytes as [`Writer::new`]'s.
    pub fn with_pool(
        out: W,
        options: &WriterOptions,
        pool: &Pool,
    ) -> Result<Writer<W>, WriteError> {
        Writer::build(out, options, Some(pool.clone()))
    }

    fn build(out: W, options: &WriterOptions, pool: Option<Pool>) -> Result<Writer<W>, WriteError> {
        if options.chunk_size == 0 {
            return Err(WriteError::ChunkSize);
        }
        if options.compression > 9 {
            return Err(WriteError::Level(options.compression));
        }
        Ok(Writer {
            out,
            options: *options,
            offset: 0,
            blob: Hasher::new(Algorithm::Sha256),
            member: None,
            members: 0,
            member_offsets: Vec::new(),
            queue: VecDeque::new(),
            pool,
            diff: Hasher::new(Algorithm::Sha256),
            uncompressed: 0,
            toc: Vec::new(),
            appended: 0,
            landmark_done: options.landmark == Landmark::None,
        })
    }

    /// Append one entry; `content` is a file's data (its size is `content.len()`), ignored
    /// for other kinds. Names, link targets and xattr names must be UTF-8: the TOC is JSON.
    pub fn append(&mut self, entry: &Entry, mut content: &[u8]) -> Result<(), WriteError> {
        let size = content.len() as u64;
        self.append_from(entry, size, &mut content)
    }

    /// [`append`](Writer::append) with a file's `size` bytes read from `content`, one chunk
    /// at a time: a file costs one chunk of memory, whatever its size. Fewer bytes than
    /// `size` is an error.
    pub fn append_from(
        &mut self,
        entry: &Entry,
        size: u64,
        content: &mut dyn io::Read,
    ) -> Result<(), WriteError> {
        if !self.landmark_done {
            let due = match self.options.landmark {
                Landmark::Prefetch { after } => self.appended == after,
                _ => true,
            };
            if due {
                self.landmark()?;
            }
        }
        self.appended += 1;
        self.entry(entry, size, content)
    }

    /// Write the TOC and the footer; the landmark too if no entry came to its place.
    pub fn finish(mut self) -> Result<Written<W>, WriteError> {
        if !self.landmark_done {
            self.landmark()?;
        }
        self.close()?;
        self.drain(0)?;
        let toc_offset = self.offset;
        let mut entries = std::mem::take(&mut self.toc);
        for e in &mut entries {
            if let Some(m) = e.member {
                e.offset = Some(self.member_offsets[m]);
            }
        }
        let json = serde_json::to_vec_pretty(&TocJson {
            version: 1,
            entries,
        })
        .map_err(|e| WriteError::Entry {
            path: TOC_NAME.into(),
            reason: e.to_string(),
        })?;
        let toc_digest = Digest::sha256(&json);
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(json.len() as u64);
        header.set_mode(0o644);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut header, TOC_NAME, &json[..])
            .map_err(|e| entry_error(TOC_NAME, e))?;
        self.write(&b.into_inner().map_err(|e| entry_error(TOC_NAME, e))?)?;
        self.close()?;
        self.drain(0)?;
        self.emit(&footer_bytes(toc_offset, self.options.legacy_footer))?;
        Ok(Written {
            blob: self.out,
            toc_digest,
            diff_id: self.diff.finish(),
            toc_offset,
            digest: self.blob.finish(),
            size: self.offset,
            uncompressed_size: self.uncompressed,
        })
    }

    fn landmark(&mut self) -> Result<(), WriteError> {
        self.landmark_done = true;
        let name = match self.options.landmark {
            Landmark::None => return Ok(()),
            Landmark::NoPrefetch => NO_PREFETCH_LANDMARK,
            Landmark::Prefetch { .. } => PREFETCH_LANDMARK,
        };
        let mut e = Entry::new(name, EntryKind::File, 0);
        e.size = 1;
        // One byte, as the Go writer's landmark files hold.
        self.entry(&e, 1, &mut &[0x0f][..])
    }

    fn entry(
        &mut self,
        entry: &Entry,
        size: u64,
        content: &mut dyn io::Read,
    ) -> Result<(), WriteError> {
        let name = tar_name(entry)?;
        let size = if entry.kind == EntryKind::File {
            size
        } else {
            0
        };
        let header = tar_header(entry, &name, size).map_err(|e| entry_error(&name, e))?;
        let mut te = TocOut::new(&name, entry)?;
        if size == 0 {
            if entry.kind == EntryKind::File {
                te.digest = Some(Digest::sha256(&[]).to_string());
            }
            self.toc.push(te);
            return self.write(&header);
        }
        self.write(&header)?;
        te.size = Some(size);
        // The file's entry is its first chunk's; its digest is known once all is read.
        let first = self.toc.len();
        let mut whole = Hasher::new(Algorithm::Sha256);
        let mut te = Some(te);
        let chunk_size = self.options.chunk_size;
        let mut buf = vec![0u8; size.min(chunk_size) as usize];
        let mut pos = 0u64;
        while pos < size {
            self.close()?;
            let remain = size - pos;
            let data = &mut buf[..remain.min(chunk_size) as usize];
            content
                .read_exact(data)
                .map_err(|source| WriteError::Read {
                    path: name.clone(),
                    source,
                })?;
            let mut ce = te.take().unwrap_or_else(|| TocOut::chunk(&name));
            // The member this chunk opens; its offset is known once it is written out.
            ce.member = Some(self.members);
            ce.chunk_offset = (pos > 0).then_some(pos);
            // As the Go writer: chunkSize on full chunks only; the last runs to the end.
            ce.chunk_size = (remain >= chunk_size).then_some(data.len() as u64);
            ce.chunk_digest = Some(Digest::sha256(data).to_string());
            if size > chunk_size {
                whole.update(data);
            }
            self.toc.push(ce);
            self.write(data)?;
            pos += data.len() as u64;
        }
        // A file of one chunk: its digest is the chunk's.
        let digest = match size > chunk_size {
            true => whole.finish().to_string(),
            false => self.toc[first]
                .chunk_digest
                .clone()
                .expect("a chunk digest"),
        };
        self.toc[first].digest = Some(digest);
        let padding = (512 - size % 512) % 512;
        self.write(&[0u8; 512][..padding as usize])
    }

    /// Uncompressed bytes into the open member (a new one if none is open).
    fn write(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.diff.update(bytes);
        self.uncompressed += bytes.len() as u64;
        self.member
            .get_or_insert_with(Vec::new)
            .extend_from_slice(bytes);
        Ok(())
    }

    /// End the open member, if any: compress it (or hand it to the pool) and write out the
    /// members that are ready, keeping a few per pool thread in flight.
    fn close(&mut self) -> Result<(), WriteError> {
        let Some(data) = self.member.take() else {
            return Ok(());
        };
        self.members += 1;
        let level = self.options.compression;
        let member = match &self.pool {
            Some(pool) => {
                let (done, rx) = mpsc::sync_channel(1);
                match pool.jobs.send(Job { data, level, done }) {
                    Ok(()) => Member::Pending(rx),
                    Err(mpsc::SendError(job)) => Member::Done(gzip(&job.data, level)),
                }
            }
            None => Member::Done(gzip(&data, level)),
        };
        self.queue.push_back(member);
        let in_flight = self.pool.as_ref().map_or(0, |p| p.threads * 4);
        self.drain(in_flight)
    }

    /// Write out members, oldest first, until at most `keep` are queued.
    fn drain(&mut self, keep: usize) -> Result<(), WriteError> {
        while self.queue.len() > keep {
            let member = match self.queue.pop_front().expect("queue is not empty") {
                Member::Done(r) => r,
                Member::Pending(rx) => rx
                    .recv()
                    .unwrap_or_else(|_| Err(io::Error::other("a compressor thread died"))),
            };
            let member = member.map_err(|source| WriteError::Io { source })?;
            self.member_offsets.push(self.offset);
            self.emit(&member)?;
        }
        Ok(())
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.out
            .write_all(bytes)
            .map_err(|source| WriteError::Io { source })?;
        self.blob.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }
}

fn entry_error(name: &str, e: impl ToString) -> WriteError {
    WriteError::Entry {
        path: name.to_owned(),
        reason: e.to_string(),
    }
}

fn utf8<'a>(path: &[u8], what: &str, bytes: &'a [u8]) -> Result<&'a str, WriteError> {
    std::str::from_utf8(bytes).map_err(|_| WriteError::Entry {
        path: String::from_utf8_lossy(path).into_owned(),
        reason: format!("{what} is not UTF-8 (the TOC is JSON)"),
    })
}

/// Tar names as umoci writes them: `./` for the root, a trailing `/` on directories.
fn tar_name(entry: &Entry) -> Result<String, WriteError> {
    let path = utf8(&entry.path, "the name", &entry.path)?;
    Ok(match entry.kind {
        EntryKind::Dir if path.is_empty() => "./".into(),
        EntryKind::Dir => format!("{path}/"),
        _ => path.to_owned(),
    })
}

/// One entry's tar headers (extension headers and header) for a file of `size` bytes: its
/// content and padding follow.
fn tar_header(entry: &Entry, name: &str, size: u64) -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut pax: Vec<(String, Vec<u8>)> = entry
        .xattrs
        .iter()
        .map(|x| {
            let key = format!("SCHILY.xattr.{}", String::from_utf8_lossy(&x.name));
            (key, x.value.clone())
        })
        .collect();
    // The ustar header holds whole seconds; PAX `mtime` keeps the rest, as umoci writes it.
    if entry.mtime.nsec != 0 {
        let t = entry.mtime;
        pax.push((
            "mtime".into(),
            format!("{}.{:09}", t.sec, t.nsec).into_bytes(),
        ));
    }
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(entry.mode & 0o7777);
    h.set_uid(u64::from(entry.uid));
    h.set_gid(u64::from(entry.gid));
    h.set_mtime(entry.mtime.sec.max(0) as u64);
    let link = entry.link.as_deref().map(String::from_utf8_lossy);
    let kind = match entry.kind {
        EntryKind::File => tar::EntryType::Regular,
        EntryKind::Dir => tar::EntryType::Directory,
        EntryKind::Symlink => tar::EntryType::Symlink,
        EntryKind::Hardlink => tar::EntryType::Link,
        EntryKind::CharDev => tar::EntryType::Char,
        EntryKind::BlockDev => tar::EntryType::Block,
        EntryKind::Fifo => tar::EntryType::Fifo,
    };
    h.set_entry_type(kind);
    if matches!(entry.kind, EntryKind::CharDev | EntryKind::BlockDev) {
        h.set_device_major(entry.rdev.0)?;
        h.set_device_minor(entry.rdev.1)?;
    }
    match (entry.kind, link) {
        (EntryKind::Symlink | EntryKind::Hardlink, Some(target)) => {
            h.set_size(0);
            b.append_link(&mut h, name, target.as_ref())?;
        }
        (EntryKind::File, _) => {
            h.set_size(size);
            b.append_data(&mut h, name, io::empty())?;
        }
        _ => {
            h.set_size(0);
            b.append_data(&mut h, name, &[][..])?;
        }
    }
    let mut bytes = b.into_inner()?;
    // Drop the end-of-archive blocks that into_inner appends.
    bytes.truncate(bytes.len() - 1024);
    Ok(bytes)
}

/// The TOC as the Go writer serialises it: zero values left out (`omitempty`).
#[derive(Serialize)]
struct TocJson {
    version: i64,
    entries: Vec<TocOut>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct TocOut {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    modtime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    link_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dev_major: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dev_minor: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    xattrs: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_digest: Option<String>,
    /// The member a chunk starts, which gives `offset` once the blob is written.
    #[serde(skip)]
    member: Option<usize>,
}

impl TocOut {
    fn new(name: &str, e: &Entry) -> Result<TocOut, WriteError> {
        let nonzero = |v: u32| (v != 0).then_some(v);
        let dev = matches!(e.kind, EntryKind::CharDev | EntryKind::BlockDev);
        let modtime = match (e.mtime.sec, e.mtime.nsec) {
            (0, 0) => None,
            (sec, nsec) => Some(format_rfc3339(sec, nsec).ok_or_else(|| WriteError::Entry {
                path: name.to_owned(),
                reason: format!("mtime {sec} is outside the years 0 to 9999 RFC 3339 can write"),
            })?),
        };
        let link_name = match e.link.as_deref() {
            Some(l) => Some(utf8(&e.path, "the link target", l)?.to_owned()),
            None => None,
        };
        let mut xattrs = BTreeMap::new();
        for x in &e.xattrs {
            let xname = utf8(&e.path, "an xattr name", &x.name)?;
            let value = base64::engine::general_purpose::STANDARD.encode(&x.value);
            xattrs.insert(xname.to_owned(), value);
        }
        Ok(TocOut {
            name: name.to_owned(),
            kind: TocEntryType::from(e.kind).as_str(),
            modtime,
            link_name,
            mode: nonzero(e.mode & 0o7777),
            uid: nonzero(e.uid),
            gid: nonzero(e.gid),
            dev_major: if dev { nonzero(e.rdev.0) } else { None },
            dev_minor: if dev { nonzero(e.rdev.1) } else { None },
            xattrs: (!xattrs.is_empty()).then_some(xattrs),
            ..TocOut::default()
        })
    }

    fn chunk(name: &str) -> TocOut {
        TocOut {
            name: name.to_owned(),
            kind: TocEntryType::Chunk.as_str(),
            ..TocOut::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::estargz::ChunkMap;
    use crate::layer::estargz::testutil::*;
    use crate::layer::index::{DataRef, Xattr};

    #[test]
    fn writer_round_trip() {
        let input = sample();
        let Written {
            blob,
            toc_digest,
            diff_id,
            ..
        } = build(
            &input,
            &WriterOptions {
                chunk_size: CHUNK,
                ..WriterOptions::default()
            },
        )
        .unwrap();
        let (footer, toc, index, map) = open(&blob, Some(&toc_digest)).unwrap();
        assert!(!footer.is_legacy());
        assert_eq!(toc.digest, toc_digest);
        assert_eq!(Digest::sha256(&gunzip_all(&blob)), diff_id);
        assert!(toc.has_no_prefetch_landmark());
        // The landmark comes first and takes id 0, as with the tar indexer.
        assert_eq!(index, expected_index(&input, Some(0)));
        assert_eq!(index, tar_index(&blob));

        for ((e, content), got) in input.iter().zip(&index.entries) {
            let Some(data) = got.data else { continue };
            let chunks = map.chunks(data).unwrap();
            assert_eq!(read_file(&blob, chunks).unwrap(), *content, "{:?}", e.path);
            assert!(chunks.iter().all(|c| c.chunk_digest.is_some()));
        }
        assert_eq!(map.len(), 4);
        let big = index.entries[2].data.unwrap();
        let table: Vec<_> = map
            .chunks(big)
            .unwrap()
            .iter()
            .map(|c| (c.chunk_offset, c.chunk_size))
            .collect();
        assert_eq!(table, [(0, CHUNK), (CHUNK, CHUNK), (2 * CHUNK, 1000)]);

        // Lookups by file position.
        assert_eq!(map.chunk_at(big, 0).unwrap().chunk_offset, 0);
        assert_eq!(map.chunk_at(big, CHUNK - 1).unwrap().chunk_offset, 0);
        assert_eq!(map.chunk_at(big, CHUNK).unwrap().chunk_offset, CHUNK);
        assert_eq!(
            map.chunk_at(big, 2 * CHUNK + 999).unwrap().chunk_offset,
            2 * CHUNK
        );
        assert!(map.chunk_at(big, 2 * CHUNK + 1000).is_none());
        assert_eq!(map.chunks_in(big, 0..1).len(), 1);
        assert_eq!(map.chunks_in(big, CHUNK - 1..CHUNK + 1).len(), 2);
        assert_eq!(map.chunks_in(big, 0..u64::MAX).len(), 3);
        assert_eq!(map.chunks_in(big, 5..5).len(), 0);
        assert_eq!(map.chunks_in(big, 3 * CHUNK..4 * CHUNK).len(), 0);
        assert!(
            map.chunks(DataRef { id: 0 }).is_none(),
            "the landmark has no chunks"
        );

        // The chunk map survives serialisation (for a cache index).
        let json = serde_json::to_string(&map).unwrap();
        assert_eq!(serde_json::from_str::<ChunkMap>(&json).unwrap(), map);
    }

    #[test]
    fn writer_variants() {
        let input = sample();
        let legacy = build(
            &input,
            &WriterOptions {
                chunk_size: CHUNK,
                landmark: Landmark::None,
                legacy_footer: true,
                compression: 9,
            },
        )
        .unwrap();
        let (footer, toc, index, _) = open(&legacy.blob, Some(&legacy.toc_digest)).unwrap();
        assert_eq!((footer.size, footer.toc_offset), (47, legacy.toc_offset));
        assert!(!toc.has_no_prefetch_landmark());
        assert_eq!(toc.prefetch_landmark_offset(), None);
        assert_eq!(index, expected_index(&input, None));
        assert_eq!(index, tar_index(&legacy.blob));

        // Prioritise the first three entries (root, dir, dir/big).
        let opt = build(
            &input,
            &WriterOptions {
                chunk_size: CHUNK,
                landmark: Landmark::Prefetch { after: 3 },
                legacy_footer: false,
                compression: 9,
            },
        )
        .unwrap();
        let (_, toc, index, map) = open(&opt.blob, Some(&opt.toc_digest)).unwrap();
        let landmark = toc.prefetch_landmark_offset().unwrap();
        assert!(!toc.has_no_prefetch_landmark());
        assert_eq!(index, expected_index(&input, Some(3)));
        assert_eq!(index, tar_index(&opt.blob));
        for (data, chunks) in map.iter() {
            let last = chunks.last().unwrap();
            let in_region = last.offset + last.compressed_len <= landmark;
            assert_eq!(in_region, data.id == 0, "{data:?}");
        }
    }

    #[test]
    fn writer_errors() {
        let options = WriterOptions::default();
        let zero = WriterOptions {
            chunk_size: 0,
            ..options
        };
        assert!(matches!(
            Writer::new(Vec::new(), &zero),
            Err(WriteError::ChunkSize)
        ));
        let mut far = entry("far", EntryKind::File, 0o644);
        far.mtime.sec = 253_402_300_800; // 10000-01-01
        let mut target = entry("link", EntryKind::Symlink, 0o777);
        target.link = Some(b"\xff".to_vec());
        let mut xattr_name = entry("x", EntryKind::Dir, 0o755);
        xattr_name.xattrs = vec![Xattr {
            name: b"user.\xff".to_vec(),
            value: Vec::new(),
        }];
        let cases = [
            (
                Entry::new(b"a/\xff".to_vec(), EntryKind::File, 0o644),
                "the name is not UTF-8",
            ),
            (far, "outside the years 0 to 9999"),
            (target, "the link target is not UTF-8"),
            (xattr_name, "an xattr name is not UTF-8"),
            (entry("../up", EntryKind::File, 0o644), "cannot write"),
        ];
        for (e, want) in cases {
            let path = String::from_utf8_lossy(&e.path).into_owned();
            let err = build(&[(e, b"x".to_vec())], &options).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, WriteError::Entry { .. }), "{path}: {msg}");
            assert!(msg.contains(want), "{path}: {msg}");
        }
    }

    #[test]
    fn content_read_a_chunk_at_a_time_and_a_short_read_is_an_error() {
        let options = WriterOptions {
            chunk_size: CHUNK,
            ..WriterOptions::default()
        };
        let built = build(&sample(), &options).unwrap();
        let mut w = Writer::new(Vec::new(), &options).unwrap();
        for (e, content) in &sample() {
            w.append_from(e, content.len() as u64, &mut &content[..])
                .unwrap();
        }
        assert_eq!(w.finish().unwrap().blob, built.blob);

        let mut w = Writer::new(Vec::new(), &options).unwrap();
        let big = entry("big", EntryKind::File, 0o644);
        let err = w.append_from(&big, 10, &mut &b"short"[..]).unwrap_err();
        assert!(matches!(err, WriteError::Read { .. }), "{err}");
    }

    #[test]
    fn streaming_writes_what_build_returns() {
        let options = WriterOptions {
            chunk_size: CHUNK,
            landmark: Landmark::Prefetch { after: 100 },
            legacy_footer: false,
            compression: 9,
        };
        let built = build(&sample(), &options).unwrap();
        let mut w = Writer::new(io::Cursor::new(Vec::new()), &options).unwrap();
        for (e, content) in &sample() {
            w.append(e, content).unwrap();
        }
        let streamed = w.finish().unwrap();
        assert_eq!(streamed.blob.into_inner(), built.blob);
        assert_eq!(built.size, built.blob.len() as u64);
        assert_eq!(built.digest, Digest::sha256(&built.blob));
        assert_eq!(
            (streamed.toc_digest, streamed.diff_id, streamed.toc_offset),
            (
                built.toc_digest.clone(),
                built.diff_id.clone(),
                built.toc_offset
            )
        );
        // Compressed by a pool of threads, member by member: the same bytes.
        let pool = Pool::new(3);
        let mut w = Writer::with_pool(Vec::new(), &options, &pool).unwrap();
        for (e, content) in &sample() {
            w.append(e, content).unwrap();
        }
        let pooled = w.finish().unwrap();
        assert_eq!(pooled.blob, built.blob);
        assert_eq!(pooled.toc_digest, built.toc_digest);
        // A landmark after more entries than there are ends the layer.
        let (_, toc, _, _) = open(&built.blob, None).unwrap();
        let last = toc.entries.last().unwrap();
        assert_eq!(last.name, PREFETCH_LANDMARK);
    }
}
