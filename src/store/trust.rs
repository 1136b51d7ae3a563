//! Whether a cache directory can be trusted by the user running imagefs.
//!
//! A root mount serves whatever the cache holds, so a cache another user can write to — or
//! rename, or redirect through a symlink — lets that user put files into every image mounted
//! from it. The rule is the one `ssh` applies to `~/.ssh` and git to `safe.directory`: the
//! cache directory, every directory above it, and every symlink on the way are owned by the
//! invoking user or root, and none is writable by group or others — except that a directory
//! above may be world-writable when it is sticky (like `/tmp`): then only the owner of an
//! entry, which the rule already requires to be trusted, can rename or remove it. The cache
//! directory's own entries must satisfy the rule too.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::StoreError;

/// Why `path` cannot be trusted.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} is {reason}; a cache directory, the directories above it and its contents must be \
     owned by you or root and writable only by their owner (choose another --cache-dir, or \
     fix the owner and mode)",
    path.display()
)]
pub struct Untrusted {
    pub cache: PathBuf,
    pub path: PathBuf,
    pub reason: String,
}

/// Check the rule above for `cache` (which need not exist yet: then the directories it would
/// be created in are checked) on behalf of user `uid`.
pub fn check_cache_dir(cache: &Path, uid: u32) -> Result<(), StoreError> {
    let abs = std::path::absolute(cache).map_err(super::io_err(cache))?;
    let untrusted = |path: &Path, reason: String| {
        StoreError::Untrusted(Box::new(Untrusted {
            cache: abs.clone(),
            path: path.to_owned(),
            reason,
        }))
    };
    let trusted_owner = |m: &fs::Metadata| m.uid() == uid || m.uid() == 0;

    // Symlinks on the way as written: whoever owns one can point it elsewhere later.
    let mut prefix = PathBuf::new();
    for part in abs.components() {
        prefix.push(part);
        match fs::symlink_metadata(&prefix) {
            Ok(m) if m.file_type().is_symlink() && !trusted_owner(&m) => {
                return Err(untrusted(
                    &prefix,
                    format!("a symbolic link owned by uid {}", m.uid()),
                ));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }

    // The directories, resolved: from the cache (or the nearest existing ancestor, where it
    // will be created) up to `/`.
    let mut existing = abs.as_path();
    while fs::symlink_metadata(existing).is_err() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    let exists = existing == abs;
    let real = existing.canonicalize().map_err(super::io_err(existing))?;
    for (i, dir) in real.ancestors().enumerate() {
        let m = fs::metadata(dir).map_err(super::io_err(dir))?;
        if !trusted_owner(&m) {
            return Err(untrusted(dir, format!("owned by uid {}", m.uid())));
        }
        let others_write = m.mode() & 0o022 != 0;
        let sticky = m.mode() & 0o1000 != 0;
        // The cache itself may not be writable by others even when sticky: they could add
        // entries it does not have yet.
        if others_write && (i == 0 && exists || !sticky) {
            return Err(untrusted(
                dir,
                format!("writable by others (mode {:o})", m.mode() & 0o7777),
            ));
        }
    }
    if exists {
        let entries = fs::read_dir(&real).map_err(super::io_err(&real))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let m = fs::symlink_metadata(&path).map_err(super::io_err(&path))?;
            if !trusted_owner(&m) {
                return Err(untrusted(&path, format!("owned by uid {}", m.uid())));
            }
            if m.is_dir() && m.mode() & 0o022 != 0 {
                return Err(untrusted(
                    &path,
                    format!("writable by others (mode {:o})", m.mode() & 0o7777),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), None).unwrap();
    }

    /// These tests need root (to give files away), as the integration tests do.
    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn own_directories_and_sticky_parents_are_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        // Not there yet: the directory it goes in is checked.
        check_cache_dir(&cache, 0).unwrap();
        fs::create_dir(&cache).unwrap();
        fs::create_dir(cache.join("layers")).unwrap();
        check_cache_dir(&cache, 0).unwrap();
        // A sticky world-writable parent (like /tmp) is fine.
        let sticky = dir.path().join("sticky");
        fs::create_dir(&sticky).unwrap();
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
        check_cache_dir(&sticky.join("cache"), 0).unwrap();
    }

    #[test]
    fn other_users_and_writable_directories_are_refused() {
        if !root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        fs::create_dir(&cache).unwrap();
        fs::set_permissions(&cache, fs::Permissions::from_mode(0o700)).unwrap();

        chown(&cache, 1000);
        let e = check_cache_dir(&cache, 0).unwrap_err().to_string();
        assert!(e.contains("owned by uid 1000"), "{e}");
        // ... but that user may use it.
        check_cache_dir(&cache, 1000).unwrap();
        chown(&cache, 0);

        // An entry inside owned by another user.
        let layers = cache.join("layers");
        fs::create_dir(&layers).unwrap();
        chown(&layers, 1000);
        let e = check_cache_dir(&cache, 0).unwrap_err().to_string();
        assert!(e.contains("layers is owned by uid 1000"), "{e}");
        chown(&layers, 0);

        // World-writable, even sticky.
        fs::set_permissions(&cache, fs::Permissions::from_mode(0o1777)).unwrap();
        let e = check_cache_dir(&cache, 0).unwrap_err().to_string();
        assert!(e.contains("writable by others (mode 1777)"), "{e}");
        fs::set_permissions(&cache, fs::Permissions::from_mode(0o700)).unwrap();

        // A parent owned by another user (who could rename the cache away).
        let home = dir.path().join("home");
        fs::create_dir(&home).unwrap();
        fs::create_dir(home.join("cache")).unwrap();
        chown(&home, 1000);
        let e = check_cache_dir(&home.join("cache"), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("home is owned by uid 1000"), "{e}");

        // A group-writable parent without the sticky bit.
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_cache_dir(&shared.join("cache"), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("writable by others (mode 775)"), "{e}");

        // A symlink owned by another user, even to a trusted directory.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&cache, &link).unwrap();
        chown(&link, 1000);
        let e = check_cache_dir(&link, 0).unwrap_err().to_string();
        assert!(e.contains("a symbolic link owned by uid 1000"), "{e}");
    }
}
