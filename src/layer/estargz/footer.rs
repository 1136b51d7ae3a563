//! The eStargz footer: the last bytes of the blob, an empty gzip member whose Extra field
//! says where the TOC member starts. Parsing it is the first thing a lazy reader does (one
//! Range request for the tail), so it is checked strictly: a blob whose tail is not exactly
//! this layout is not eStargz and is fetched whole.
//!
//! The layout, byte by byte (stargz-snapshotter `estargz/types.go` and `docs/estargz.md`;
//! RFC 1952 for the gzip fields):
//!
//! ```text
//! eStargz, 51 bytes                            legacy stargz (google/crfs), 47 bytes
//!  0  1f 8b       gzip magic (ID1 ID2)           0  1f 8b       gzip magic
//!  2  08          CM = deflate                   2  08          CM = deflate
//!  3  04          FLG = FEXTRA                   3  04          FLG = FEXTRA
//!  4  00 00 00 00 MTIME = 0                      4  00 00 00 00 MTIME = 0
//!  8  00          XFL                            8  00          XFL
//!  9  ff          OS = unknown                   9  ff          OS = unknown
//! 10  1a 00       XLEN = 26 (little endian)     10  16 00       XLEN = 22
//! 12  'S' 'G'     subfield id SI1 SI2           12  "%016x"     TOC offset, 16 hex digits
//! 14  16 00       subfield LEN = 22             28  "STARGZ"    magic
//! 16  "%016x"     TOC offset, 16 hex digits     34  01 00 00 ff ff  final stored block, empty
//! 32  "STARGZ"    magic                         39  00 00 00 00 CRC32 of nothing
//! 38  01 00 00 ff ff  final stored block, empty 43  00 00 00 00 ISIZE = 0
//! 43  00 00 00 00 CRC32 of nothing
//! 47  00 00 00 00 ISIZE = 0
//! ```
//!
//! FTEXT may be set too (it changes no byte positions); any other flag would shift the
//! layout and is refused. The offset must fit in Go's `int64`.

use std::io::Read;
use std::ops::Range;

use super::{EstargzError, MAX_TOC_MEMBER_SIZE};

/// Size of the eStargz footer.
pub const FOOTER_SIZE: usize = 51;
/// Size of the footer of legacy stargz (google/crfs), which lacks the `SG` subfield header.
pub const LEGACY_FOOTER_SIZE: usize = 47;

/// The parsed footer: where the TOC member starts and how long the footer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Blob offset of the gzip member holding the TOC tar entry.
    pub toc_offset: u64,
    /// [`FOOTER_SIZE`], or [`LEGACY_FOOTER_SIZE`] for legacy stargz.
    pub size: u64,
}

impl Footer {
    pub fn is_legacy(&self) -> bool {
        self.size == LEGACY_FOOTER_SIZE as u64
    }

    /// The blob range holding the TOC member (from the TOC offset up to the footer), checked
    /// against the blob size and [`MAX_TOC_MEMBER_SIZE`] before anyone fetches it.
    pub fn toc_range(&self, blob_size: u64) -> Result<Range<u64>, EstargzError> {
        let end = blob_size
            .checked_sub(self.size)
            .filter(|&end| self.toc_offset < end)
            .ok_or(EstargzError::TocOffset {
                toc_offset: self.toc_offset,
                blob_size,
            })?;
        let size = end - self.toc_offset;
        if size > MAX_TOC_MEMBER_SIZE {
            return Err(EstargzError::TocMemberTooLarge {
                size,
                max: MAX_TOC_MEMBER_SIZE,
            });
        }
        Ok(self.toc_offset..end)
    }
}

const GZIP_FTEXT: u8 = 0x01;
const GZIP_FEXTRA: u8 = 0x04;
const STARGZ_MAGIC: &[u8] = b"STARGZ";

/// Parse the footer at the end of `tail` (the last bytes of the blob: at least
/// [`LEGACY_FOOTER_SIZE`], normally [`FOOTER_SIZE`] or more). The eStargz footer is tried
/// first, then the legacy stargz one. The footer must be a complete, empty gzip member.
pub fn parse_footer(tail: &[u8]) -> Result<Footer, EstargzError> {
    let first = if tail.len() >= FOOTER_SIZE {
        match footer_offset(&tail[tail.len() - FOOTER_SIZE..], false) {
            Ok(toc_offset) => {
                return Ok(Footer {
                    toc_offset,
                    size: FOOTER_SIZE as u64,
                });
            }
            Err(reason) => Some(reason),
        }
    } else {
        None
    };
    if tail.len() < LEGACY_FOOTER_SIZE {
        return Err(EstargzError::Footer {
            reason: format!(
                "{} bytes given, the footer needs {FOOTER_SIZE} ({LEGACY_FOOTER_SIZE} for legacy stargz)",
                tail.len()
            ),
        });
    }
    match footer_offset(&tail[tail.len() - LEGACY_FOOTER_SIZE..], true) {
        Ok(toc_offset) => Ok(Footer {
            toc_offset,
            size: LEGACY_FOOTER_SIZE as u64,
        }),
        Err(legacy) => Err(EstargzError::Footer {
            reason: match first {
                Some(first) => format!("{first}; as a legacy stargz footer: {legacy}"),
                None => format!("as a legacy stargz footer: {legacy}"),
            },
        }),
    }
}

/// The TOC offset from a footer of exactly the right size, or why it is not one.
fn footer_offset(footer: &[u8], legacy: bool) -> Result<u64, String> {
    let xlen = if legacy { 22 } else { 26 };
    if footer[..2] != [0x1f, 0x8b] {
        return Err("no gzip magic".into());
    }
    if footer[2] != 8 {
        return Err(format!(
            "gzip compression method {} is not deflate",
            footer[2]
        ));
    }
    // FEXTRA is required; FNAME, FCOMMENT, FHCRC or reserved bits would shift the layout.
    if footer[3] & !GZIP_FTEXT != GZIP_FEXTRA {
        return Err(format!(
            "gzip flags {:#04x}, expected only FEXTRA",
            footer[3]
        ));
    }
    let got_xlen = u16::from_le_bytes([footer[10], footer[11]]);
    if usize::from(got_xlen) != xlen {
        return Err(format!(
            "gzip Extra field is {got_xlen} bytes, expected {xlen}"
        ));
    }
    let extra = &footer[12..12 + xlen];
    let payload = if legacy {
        extra
    } else {
        if &extra[..2] != b"SG" {
            return Err(format!(
                "Extra subfield id {:?}, expected \"SG\"",
                String::from_utf8_lossy(&extra[..2])
            ));
        }
        let len = u16::from_le_bytes([extra[2], extra[3]]);
        if len != 22 {
            return Err(format!("Extra subfield is {len} bytes, expected 22"));
        }
        &extra[4..]
    };
    if &payload[16..] != STARGZ_MAGIC {
        return Err("no STARGZ magic in the gzip Extra field".into());
    }
    let hex = &payload[..16];
    if !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!(
            "TOC offset {:?} is not 16 hex digits",
            String::from_utf8_lossy(hex)
        ));
    }
    // Safe: 16 ASCII hex digits always parse into a u64.
    let offset = u64::from_str_radix(std::str::from_utf8(hex).unwrap_or("x"), 16)
        .map_err(|e| format!("TOC offset: {e}"))?;
    if offset > i64::MAX as u64 {
        return Err(format!("TOC offset {offset:#x} does not fit in int64"));
    }
    // The rest must be an empty deflate stream and a matching trailer, with nothing after.
    let mut rest = footer;
    let mut out = Vec::new();
    flate2::bufread::GzDecoder::new(&mut rest)
        .take(1)
        .read_to_end(&mut out)
        .map_err(|e| format!("footer gzip member: {e}"))?;
    if !out.is_empty() {
        return Err("footer gzip member is not empty".into());
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the footer gzip member", rest.len()));
    }
    Ok(offset)
}

/// The footer bytes for a TOC at `toc_offset` (as the Go writer lays them out).
pub fn footer_bytes(toc_offset: u64, legacy: bool) -> Vec<u8> {
    let subfield = format!("{toc_offset:016x}STARGZ");
    let mut out = vec![0x1f, 0x8b, 8, GZIP_FEXTRA, 0, 0, 0, 0, 0, 0xff];
    if legacy {
        out.extend_from_slice(&22u16.to_le_bytes());
    } else {
        out.extend_from_slice(&26u16.to_le_bytes());
        out.extend_from_slice(b"SG");
        out.extend_from_slice(&22u16.to_le_bytes());
    }
    out.extend_from_slice(subfield.as_bytes());
    // A final stored block of length 0, then CRC32 and ISIZE of nothing.
    out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    out.extend_from_slice(&[0; 8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footers() {
        let good = footer_bytes(0x1234_5678, false);
        assert_eq!(good.len(), FOOTER_SIZE);
        assert_eq!(
            parse_footer(&good).unwrap(),
            Footer {
                toc_offset: 0x1234_5678,
                size: 51
            }
        );
        // Bytes before the footer do not matter.
        let mut longer = vec![7u8; 100];
        longer.extend(&good);
        assert_eq!(parse_footer(&longer).unwrap().toc_offset, 0x1234_5678);

        let legacy = footer_bytes(0xabc, true);
        assert_eq!(legacy.len(), LEGACY_FOOTER_SIZE);
        let f = parse_footer(&legacy).unwrap();
        assert_eq!((f.toc_offset, f.size, f.is_legacy()), (0xabc, 47, true));
        let mut longer = vec![0u8; 4];
        longer.extend(&legacy);
        assert_eq!(parse_footer(&longer).unwrap().toc_offset, 0xabc);

        type Mutation = fn(&mut Vec<u8>);
        let cases: &[(&str, Mutation, &str)] = &[
            ("magic", |f| f[0] = 0, "no gzip magic"),
            ("method", |f| f[2] = 7, "not deflate"),
            ("flags", |f| f[3] |= 0x08, "expected only FEXTRA"),
            ("no extra", |f| f[3] = 0, "expected only FEXTRA"),
            ("xlen", |f| f[10] = 27, "Extra field is 27 bytes"),
            ("subfield id", |f| f[13] = b'X', "subfield id"),
            ("subfield len", |f| f[14] = 23, "subfield is 23 bytes"),
            ("magic string", |f| f[37] = b'Y', "no STARGZ magic"),
            ("hex", |f| f[20] = b'z', "not 16 hex digits"),
            (
                "int64",
                |f| f[16..32].copy_from_slice(b"ffffffffffffffff"),
                "does not fit in int64",
            ),
            ("crc", |f| f[46] = 1, "footer gzip member"),
            ("isize", |f| f[50] = 1, "footer gzip member"),
            ("not empty", |f| f[39] = 0x01, "footer gzip member"),
            ("short", |f| f.truncate(46), "46 bytes given"),
        ];
        for (what, mutate, want) in cases {
            let mut f = good.clone();
            mutate(&mut f);
            let err = parse_footer(&f).unwrap_err();
            assert!(matches!(err, EstargzError::Footer { .. }), "{what}");
            let msg = err.to_string();
            assert!(msg.contains(want), "{what}: {msg}");
            assert!(msg.contains("fetch it whole"), "{what}: {msg}");
        }
        let mut bad_legacy = legacy.clone();
        bad_legacy[33] = b'Y';
        let msg = parse_footer(&bad_legacy).unwrap_err().to_string();
        assert!(
            msg.contains("legacy stargz footer: no STARGZ magic"),
            "{msg}"
        );
    }

    #[test]
    fn toc_ranges() {
        let f = Footer {
            toc_offset: 100,
            size: 51,
        };
        assert_eq!(f.toc_range(200).unwrap(), 100..149);
        for blob_size in [151, 100, 10] {
            let err = f.toc_range(blob_size).unwrap_err();
            assert!(
                matches!(err, EstargzError::TocOffset { .. }),
                "{blob_size}: {err}"
            );
        }
        let err = Footer {
            toc_offset: 0,
            size: 51,
        }
        .toc_range(MAX_TOC_MEMBER_SIZE + 52)
        .unwrap_err();
        assert!(
            matches!(err, EstargzError::TocMemberTooLarge { .. }),
            "{err}"
        );
    }
}
