//! Mounting through the setuid `fusermount3` when this process cannot open `/dev/fuse` itself
//! (a root-only device, as some distributions ship it). fuser falls back to `fusermount3` only
//! when the device opens but `mount(2)` is refused; this covers the other case, with the same
//! protocol (libfuse's): `fusermount3` gets one end of a socket pair in `_FUSE_COMMFD`, opens
//! the device, mounts, and sends the device fd back over the socket.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Whether the device is out of this process's reach (fusermount3 must open it).
pub(crate) fn needed() -> bool {
    // SAFETY: access(2) on a constant NUL-terminated path; geteuid has no preconditions.
    unsafe {
        libc::geteuid() != 0 && libc::access(c"/dev/fuse".as_ptr(), libc::R_OK | libc::W_OK) != 0
    }
}

/// Mount at `mountpoint` with `options` (fusermount3's `-o` list); the connection's fd.
pub(crate) fn mount(mountpoint: &Path, options: &str) -> io::Result<OwnedFd> {
    let (ours, theirs) = UnixStream::pair()?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-o")
        .arg(options)
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: fcntl is async-signal-safe; it keeps `theirs` open across exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(fd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("running fusermount3 (install fuse3): {e}"),
        )
    })?;
    drop(theirs);
    let received = super::fdpass::recv(ours.as_fd(), 16);
    let out = child.wait_with_output()?;
    match received {
        Ok(Some((_, mut fds))) if !fds.is_empty() => Ok(fds.remove(0)),
        _ => Err(io::Error::other(format!(
            "fusermount3 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}
