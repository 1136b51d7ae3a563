//! Reading `/proc/self/mountinfo` (proc(5)): whether a path is a mount point, of which
//! filesystem type and owner, and its device.
//!
//! A line is `ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER`,
//! the mount point octal-escaped (`\040` for a space). Stacked mounts at one path are listed
//! in mount order, so the last match is the topmost, the one a path resolves to.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The filesystem type an imagefs mount shows (`fuse.` + the subtype we mount with).
pub const IMAGEFS_FSTYPE: &str = "fuse.imagefs";

/// One mount, as mountinfo lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor`.
    pub device: String,
    /// The mount point, unescaped.
    pub mountpoint: Vec<u8>,
    /// e.g. `fuse.imagefs`, `proc`, `tmpfs`.
    pub fstype: String,
    /// The mount source, e.g. `imagefs:docker.io/library/busybox:latest`.
    pub source: String,
    /// Per-superblock options, e.g. `ro,user_id=0,group_id=0`.
    pub super_options: String,
}

impl MountEntry {
    /// Whether imagefs serves this mount.
    pub fn is_imagefs(&self) -> bool {
        self.fstype == IMAGEFS_FSTYPE
    }

    /// The uid a FUSE mount belongs to (its `user_id=` option): who may unmount it without
    /// privileges.
    pub fn fuse_owner(&self) -> Option<u32> {
        self.super_options
            .split(',')
            .find_map(|o| o.strip_prefix("user_id=")?.parse().ok())
    }
}

/// The topmost mount at `mp`, or `None` when nothing is mounted there. `mp` must be absolute
/// and resolved, as mountinfo lists it.
pub fn mount_at(mp: &Path) -> io::Result<Option<MountEntry>> {
    let info = std::fs::read("/proc/self/mountinfo")?;
    let want = mp.as_os_str().as_bytes();
    Ok(entries(&info).filter(|e| e.mountpoint == want).last())
}

/// The mount that contains `path` (the topmost mount at the longest mount point that is
/// `path` or one of its ancestors). `path` must be absolute and resolved.
pub fn mount_containing(path: &Path) -> io::Result<Option<MountEntry>> {
    let info = std::fs::read("/proc/self/mountinfo")?;
    let mut best: Option<MountEntry> = None;
    for e in entries(&info) {
        // Component-wise: `/mnt` contains `/mnt/a`, not `/mntx`.
        if !path.starts_with(std::ffi::OsStr::from_bytes(&e.mountpoint)) {
            continue;
        }
        // Later lines are mounted later: at an equal length, the later one is on top.
        if best
            .as_ref()
            .is_none_or(|b| e.mountpoint.len() >= b.mountpoint.len())
        {
            best = Some(e);
        }
    }
    Ok(best)
}

/// Every mount point at `dir` or below it (component-wise), in mount order. `dir` must be
/// absolute and resolved.
pub fn mounts_under(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let info = std::fs::read("/proc/self/mountinfo")?;
    Ok(entries(&info)
        .map(|e| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&e.mountpoint)))
        .filter(|p| p.starts_with(dir))
        .collect())
}

/// The `major:minor` of the mount at `mp` (the topmost, when mounts are stacked), or `None`
/// when nothing is mounted there.
pub fn mount_device(mp: &Path) -> io::Result<Option<String>> {
    Ok(mount_at(mp)?.map(|e| e.device))
}

fn entries(info: &[u8]) -> impl Iterator<Item = MountEntry> + '_ {
    info.split(|&b| b == b'\n').filter_map(parse_line)
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let sep = fields.iter().position(|f| *f == b"-")?;
    if sep < 6 || fields.len() < sep + 4 {
        return None;
    }
    let text = |f: &[u8]| String::from_utf8_lossy(&unescape(f)).into_owned();
    Some(MountEntry {
        device: text(fields[2]),
        mountpoint: unescape(fields[4]),
        fstype: text(fields[sep + 1]),
        source: text(fields[sep + 2]),
        super_options: text(fields[sep + 3]),
    })
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
    fn lines_with_and_without_optional_fields_parse() {
        let info = b"22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n\
            90 30 0:55 / /tmp/a\\040b ro,nosuid,nodev,relatime - fuse.imagefs imagefs:x/y:z ro,user_id=1000,group_id=1000,default_permissions\n\
            garbage line\n\
            91 30 0:56 / /m rw master:1 shared:2 - tmpfs tmpfs rw\n";
        let all: Vec<MountEntry> = entries(info).collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].fstype, "proc");
        assert!(!all[0].is_imagefs());
        assert_eq!(all[1].mountpoint, b"/tmp/a b");
        assert!(all[1].is_imagefs());
        assert_eq!(all[1].source, "imagefs:x/y:z");
        assert_eq!(all[1].fuse_owner(), Some(1000));
        assert_eq!(all[1].device, "0:55");
        assert_eq!(all[2].fstype, "tmpfs");
        assert_eq!(all[2].fuse_owner(), None);
    }

    #[test]
    fn the_root_is_a_mount_point_and_a_fresh_directory_is_not() {
        assert!(mount_device(Path::new("/")).unwrap().is_some());
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        assert_eq!(mount_device(&dir).unwrap(), None);
        // It is inside some mount all the same (the root's, or /tmp's).
        let inside = mount_containing(&dir).unwrap().unwrap();
        assert!(dir.starts_with(std::ffi::OsStr::from_bytes(&inside.mountpoint)));
        assert_eq!(
            mount_containing(Path::new("/proc/self"))
                .unwrap()
                .unwrap()
                .fstype,
            "proc"
        );
    }
}
