//! Where the content of a layer's regular files lands: small files one after the other in
//! the layer's pack file, bigger ones in numbered files of their own with runs of zeros left
//! as holes.
//!
//! Creating a file costs far more than decoding its bytes: on the bench machine's disk an
//! `openat(O_CREAT)` with its directory update takes tens of microseconds of CPU, and a
//! debian-sized layer has thousands of small files. Creating them all made up a quarter of
//! the CPU time of a first read, on the two cores that also inflate and hash. So small files
//! are appended to one pack file through one reused buffer, written a MiB at a time, and the
//! index records where each one sits ([`PackedAt`]); the store gives such a file a file of its
//! own only when it is first opened (`Store::open_data`). Big files are streamed into their
//! own file with one reused buffer (the kernel reads them through passthrough).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::index::{DataRef, PackedAt};

/// Files up to this size go to the pack.
pub const SMALL: u64 = 256 << 10;
/// The pack is written in writes of about this size; also the buffer big files are
/// streamed through.
const BUF: usize = 1 << 20;
/// Zero runs this long and aligned become holes.
const BLOCK: usize = 64 << 10;
/// The pack's name in the data directory (never a number, so never a file's own name).
pub const PACK: &str = "pack";

/// A failure to write `path`.
#[derive(Debug)]
pub struct WriteError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Writes a layer's file contents into its data directory; [`Extractor::finish`] writes what
/// is still buffered.
pub struct Extractor {
    dir: PathBuf,
    /// Grows to [`BUF`] at most, at the first big file.
    buf: Vec<u8>,
    /// Created at the first small file.
    pack: Option<File>,
    /// Pack bytes not written yet: the tail of the pack from `pack_written` on.
    pending: Vec<u8>,
    pack_written: u64,
}

impl Extractor {
    /// Extract into the data directory `dir`, which exists.
    pub fn new(dir: &Path) -> Extractor {
        Extractor {
            dir: dir.to_path_buf(),
            buf: Vec::new(),
            pack: None,
            pending: Vec::new(),
            pack_written: 0,
        }
    }

    /// Write the next `size` bytes of `reader`, the content of `data`: into the pack when
    /// small (returning where), else into `data`'s own new file (which must not exist). An empty file writes nothing. A
    /// `Read` error is returned as `Ok(Err(_))`, a failure to write as `Err(_)`.
    pub fn write(
        &mut self,
        reader: &mut impl Read,
        size: u64,
        data: DataRef,
    ) -> Result<io::Result<Option<PackedAt>>, WriteError> {
        if size == 0 {
            return Ok(Ok(None));
        }
        if size > SMALL {
            let own = super::tar::data_path(&self.dir, data);
            return Ok(self.stream(reader, size, own)?.map(|()| None));
        }
        let at = PackedAt {
            offset: self.pack_written + self.pending.len() as u64,
            len: size,
        };
        let start = self.pending.len();
        self.pending.resize(start + size as usize, 0);
        if let Err(e) = reader.read_exact(&mut self.pending[start..]) {
            self.pending.truncate(start);
            return Ok(Err(e));
        }
        if self.pending.len() >= BUF {
            self.flush_pack()?;
        }
        Ok(Ok(Some(at)))
    }

    /// Write what the pack still buffers.
    pub fn finish(mut self) -> Result<(), WriteError> {
        self.flush_pack()
    }

    fn flush_pack(&mut self) -> Result<(), WriteError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(PACK);
        let werr = |source| WriteError {
            path: path.clone(),
            source,
        };
        if self.pack.is_none() {
            self.pack = Some(create(&path).map_err(werr)?);
        }
        let pack = self.pack.as_mut().expect("created above");
        pack.write_all(&self.pending).map_err(werr)?;
        self.pack_written += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
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

fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
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

/// The bytes at `at` of the pack in the data directory `dir`.
pub fn read_packed(dir: &Path, at: PackedAt) -> io::Result<Vec<u8>> {
    let pack = File::open(dir.join(PACK))?;
    let mut data = vec![0; at.len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&pack, &mut data, at.offset)?;
    Ok(data)
}

/// Give the packed file at `at` of the data directory `dir` a file of its own, `own`, if it
/// has none yet: written under `tmp` (a directory on the same filesystem) and renamed into
/// place, so a reader never sees it part-written and two racing callers both succeed.
pub fn unpack(dir: &Path, at: PackedAt, own: &Path, tmp: &Path) -> io::Result<()> {
    if own.exists() {
        return Ok(());
    }
    let data = read_packed(dir, at)?;
    let mut file = tempfile::Builder::new()
        .prefix(&format!("layer-{}-", std::process::id()))
        .tempfile_in(tmp)?;
    if write_holey(file.as_file_mut(), &data)? {
        file.as_file().set_len(at.len)?;
    }
    file.persist(own).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn small_files_are_packed_big_ones_get_files_and_empty_ones_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = Extractor::new(dir.path());
        // Enough small files that the pack is written several times over.
        let mut sizes = vec![
            0usize,
            1,
            4096,
            SMALL as usize,
            SMALL as usize + 1,
            3 * BUF + 17,
        ];
        sizes.extend([200 << 10; 8]);
        let mut placed = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let data = contents(n, i as u8);
            let id = DataRef { id: i as u32 };
            let r = x.write(&mut &data[..], n as u64, id).unwrap();
            placed.push(r.unwrap());
        }
        x.finish().unwrap();
        let pack = std::fs::read(dir.path().join(PACK)).unwrap();
        let mut end = 0;
        for (i, &n) in sizes.iter().enumerate() {
            let own = dir.path().join(i.to_string());
            let want = contents(n, i as u8);
            match placed[i] {
                Some(at) => {
                    assert!(n > 0 && n as u64 <= SMALL, "file {i} of {n} B packed");
                    assert_eq!(at.offset, end, "packed in order, back to back");
                    end += at.len;
                    assert_eq!(
                        &pack[at.offset as usize..end as usize],
                        &want[..],
                        "file {i}"
                    );
                    assert!(!own.exists());
                    // Unpacked on demand into a file of its own, once.
                    let tmp = tempfile::tempdir().unwrap();
                    unpack(dir.path(), at, &own, tmp.path()).unwrap();
                    unpack(dir.path(), at, &own, tmp.path()).unwrap();
                    assert_eq!(std::fs::read(&own).unwrap(), want, "file {i} unpacked");
                }
                None if n == 0 => assert!(!own.exists(), "an empty file creates nothing"),
                None => {
                    assert!(n as u64 > SMALL, "file {i} of {n} B has its own file");
                    assert_eq!(std::fs::read(&own).unwrap(), want, "file {i}");
                }
            }
        }
        assert_eq!(pack.len() as u64, end, "the pack holds nothing else");
    }

    #[test]
    fn zero_blocks_of_big_files_become_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mut x = Extractor::new(dir.path());
        let mut data = vec![0u8; 4 * BUF];
        data[0] = 1;
        let r = x.write(&mut &data[..], data.len() as u64, DataRef { id: 0 });
        assert_eq!(r.unwrap().unwrap(), None);
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
        let mut x = Extractor::new(dir.path());
        let r = x.write(&mut &[1u8, 2][..], 3, DataRef { id: 0 }).unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // Nothing of the short file stays in the pack.
        let r = x.write(&mut &[7u8; 10][..], 10, DataRef { id: 1 });
        assert_eq!(r.unwrap().unwrap(), Some(PackedAt { offset: 0, len: 10 }));
        // A name that exists already cannot be created.
        let big = vec![7u8; SMALL as usize + 1];
        std::fs::write(dir.path().join("2"), b"x").unwrap();
        let e = x
            .write(&mut &big[..], big.len() as u64, DataRef { id: 2 })
            .unwrap_err();
        assert_eq!(e.path, dir.path().join("2"));
        assert_eq!(e.source.kind(), io::ErrorKind::AlreadyExists);
        // Nor can the pack, when something took its name.
        let dir2 = tempfile::tempdir().unwrap();
        std::fs::write(dir2.path().join(PACK), b"x").unwrap();
        let mut x = Extractor::new(dir2.path());
        x.write(&mut &[7u8; 10][..], 10, DataRef { id: 0 })
            .unwrap()
            .unwrap();
        let e = x.finish().unwrap_err();
        assert_eq!(e.path, dir2.path().join(PACK));
    }
}
