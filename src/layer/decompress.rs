//! Decompression of layer blobs (gzip — including multi-member gzip such as eStargz —,
//! zstd — including multi-frame —, or none) with a bound on the expanded size, so a
//! decompression bomb fails with a clear error instead of filling the disk.

use std::io::{self, BufRead, Read};

use crate::oci::Compression;

/// Wrap `reader` in the decoder for `compression`.
pub fn decoder<'a, R: Read + Send + 'a>(
    compression: Compression,
    reader: R,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    decoder_buffered(
        compression,
        io::BufReader::with_capacity(256 * 1024, reader),
    )
}

/// [`decoder`] for a reader with its own buffer: the decoder reads from it in place, with no
/// copy into a buffer of its own.
pub fn decoder_buffered<'a, R: BufRead + Send + 'a>(
    compression: Compression,
    reader: R,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        // MultiGzDecoder: a gzip stream may be several members back to back (eStargz is one
        // member per file or chunk); the plain decoder would stop after the first.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
    })
}

/// Limits on what one layer may expand to.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Maximum uncompressed bytes of one layer.
    pub max_size: u64,
    /// Maximum ratio uncompressed / compressed, checked once the output passes
    /// `ratio_grace` bytes (small highly-compressible layers are normal).
    pub max_ratio: u64,
    pub ratio_grace: u64,
    /// Most entries of one layer (`--max-entries`): every entry costs memory in the index and
    /// the merged tree for as long as the image is mounted, so a layer of millions of tiny
    /// entries is refused before it can exhaust the daemon.
    pub max_entries: u64,
}

/// The default of [`Limits::max_entries`]: 2^20, above the largest real images (a full
/// distro with documentation has a few hundred thousand).
pub const MAX_ENTRIES: u64 = 1 << 20;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_size: 256 << 30,
            max_ratio: 1024,
            ratio_grace: 64 << 20,
            max_entries: MAX_ENTRIES,
        }
    }
}

/// Counts bytes through a reader.
pub struct Counting<R> {
    inner: R,
    pub count: u64,
}

impl<R> Counting<R> {
    pub fn new(inner: R) -> Counting<R> {
        Counting { inner, count: 0 }
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Enforces [`Limits`] on a decompressed stream, given a way to read how many compressed
/// bytes were consumed so far.
pub struct Bounded<R, F> {
    inner: R,
    limits: Limits,
    out: u64,
    compressed: F,
}

impl<R, F: Fn() -> u64> Bounded<R, F> {
    pub fn new(inner: R, limits: Limits, compressed: F) -> Self {
        Bounded {
            inner,
            limits,
            out: 0,
            compressed,
        }
    }

    pub fn bytes_out(&self) -> u64 {
        self.out
    }
}

impl<R: Read, F: Fn() -> u64> Read for Bounded<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out += n as u64;
        if self.out > self.limits.max_size {
            return Err(io::Error::other(format!(
                "layer expands to more than {} bytes (limit): refusing it as a decompression bomb",
                self.limits.max_size
            )));
        }
        if self.out > self.limits.ratio_grace {
            let c = (self.compressed)().max(1);
            if self.out / c > self.limits.max_ratio {
                return Err(io::Error::other(format!(
                    "layer expands more than {}x ({} bytes from {}): refusing it as a decompression bomb",
                    self.limits.max_ratio, self.out, c
                )));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn multi_member_gzip_and_multi_frame_zstd() {
        let mut gz = gzip(b"hello ");
        gz.extend(gzip(b"world"));
        let mut out = String::new();
        decoder(Compression::Gzip, &gz[..])
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");

        let mut zs = zstd::encode_all(&b"hello "[..], 1).unwrap();
        zs.extend(zstd::encode_all(&b"world"[..], 1).unwrap());
        let mut out = String::new();
        decoder(Compression::Zstd, &zs[..])
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn bomb_is_refused() {
        let zeros = vec![0u8; 4 << 20];
        let gz = gzip(&zeros);
        let limits = Limits {
            max_size: 1 << 20,
            ..Limits::default()
        };
        let mut r = Bounded::new(decoder(Compression::Gzip, &gz[..]).unwrap(), limits, || 1);
        let err = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("decompression bomb"), "{err}");

        let limits = Limits {
            max_ratio: 100,
            ratio_grace: 1 << 20,
            ..Limits::default()
        };
        let len = gz.len() as u64;
        let mut r = Bounded::new(decoder(Compression::Gzip, &gz[..]).unwrap(), limits, || len);
        let err = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("more than 100x"), "{err}");
    }
}
