//! Reading `/proc/self/mountinfo`: whether a path is a mount point, and its device.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The `major:minor` of the mount at `mp` (the topmost, when mounts are stacked), or `None`
/// when nothing is mounted there. `mp` must be absolute and resolved, as mountinfo lists it.
pub fn mount_device(mp: &Path) -> io::Result<Option<String>> {
    let info = std::fs::read("/proc/self/mountinfo")?;
    let want = mp.as_os_str().as_bytes();
    // Fields: id parent major:minor root mountpoint … (the mount point octal-escaped).
    Ok(info.split(|&b| b == b'\n').rev().find_map(|line| {
        let mut fields = line.split(|&b| b == b' ');
        let dev = fields.nth(2)?;
        let point = fields.nth(1)?;
        (unescape(point) == want).then(|| String::from_utf8_lossy(dev).into_owned())
    }))
}

/// Undo mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if field[i] == b'\\' => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let cases: [(&[u8], &[u8]); 5] = [
            (b"/mnt/plain", b"/mnt/plain"),
            (b"/mnt/with\\040space", b"/mnt/with space"),
            (b"/a\\011tab\\012nl\\134bs", b"/a\ttab\nnl\\bs"),
            (b"/trailing\\04", b"/trailing\\04"),
            (b"/not\\0x1octal", b"/not\\0x1octal"),
        ];
        for (field, want) in cases {
            assert_eq!(unescape(field), want, "{}", field.escape_ascii());
        }
    }

    #[test]
    fn the_root_is_a_mount_point_and_a_fresh_directory_is_not() {
        assert!(mount_device(Path::new("/")).unwrap().is_some());
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        assert_eq!(mount_device(&dir).unwrap(), None);
    }
}
