//! Taking over a live FUSE connection from a server process that died: the piece fuser 0.18
//! does not have.
//!
//! A `/dev/fuse` connection lives as long as some process holds its fd (the keeper, see
//! [`super::keeper`]). What a new server needs to carry on is (1) fuser's session state after
//! INIT, and (2) the requests the dead server had read but not answered.
//!
//! 1. fuser's `Session::from_fd` always performs the INIT handshake, and the kernel sends INIT
//!    once per connection. So the handshake is replayed over a `SOCK_SEQPACKET` socket pair:
//!    we write the INIT the kernel sent the first server ([`Negotiated`], persisted by the
//!    keeper), fuser answers it on the socket (its answer goes nowhere: the kernel keeps what
//!    it agreed to the first time), and then the real connection is `dup3`'d over the fd fuser
//!    holds. From there fuser's loop reads and writes the kernel's connection as if it had
//!    made it. What our `init` may take is capped to what the first server was granted
//!    ([`Negotiated::granted`]), so an upgraded server never believes in a capability the
//!    kernel did not turn on.
//! 2. `FUSE_NOTIFY_RESEND` (Linux ≥ 6.9, advertised as `FUSE_HAS_RESEND` at INIT) puts every
//!    request still waiting for an answer back on the input queue, marked as resent; the new
//!    server answers them like any other. fuser 0.18 has no call for it: it is a bare
//!    `fuse_out_header` written to the device.
//!
//! Inode numbers are tree ids + 1 and the tree is a pure function of the layer chain, so a new
//! server's numbers mean what the old one's did; file handles carry no state of their own
//! (see `filesystem.rs`), except passthrough backing ids, which [`super::open_state`] keeps.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use fuser::InitFlags;
use serde::{Deserialize, Serialize};

/// What the kernel offered at INIT and what the first server took: enough to replay the
/// handshake for a new server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// The kernel's INIT flags (both words).
    pub kernel_flags: u64,
    /// The capabilities our `init` asked for and got.
    pub granted: u64,
}

impl Negotiated {
    /// Whether the kernel can resend unanswered requests (`FUSE_HAS_RESEND`).
    pub fn can_resend(&self) -> bool {
        InitFlags::from_bits_retain(self.kernel_flags).contains(InitFlags::FUSE_HAS_RESEND)
    }
}

/// `FUSE_INIT`'s opcode, and the `unique` of the replayed INIT (any value: only fuser sees it).
const FUSE_INIT: u32 = 26;
const REPLAY_UNIQUE: u64 = 1;
/// `fuse_notify_code::FUSE_NOTIFY_RESEND` (include/uapi/linux/fuse.h, 7.40).
const FUSE_NOTIFY_RESEND: i32 = 7;

/// The INIT request the kernel sent, rebuilt: `fuse_in_header` (40 bytes) then `fuse_init_in`
/// (64 bytes: major, minor, max_readahead, flags, flags2, 11 unused words).
fn init_request(n: &Negotiated) -> Vec<u8> {
    let flags = n.kernel_flags | InitFlags::FUSE_INIT_EXT.bits();
    let mut b = Vec::with_capacity(104);
    b.extend_from_slice(&104u32.to_ne_bytes());
    b.extend_from_slice(&FUSE_INIT.to_ne_bytes());
    b.extend_from_slice(&REPLAY_UNIQUE.to_ne_bytes());
    b.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    b.extend_from_slice(&[0; 12]); // uid, gid, pid
    b.extend_from_slice(&[0; 4]); // total_extlen, padding
    for word in [
        n.major,
        n.minor,
        n.max_readahead,
        flags as u32,
        (flags >> 32) as u32,
    ] {
        b.extend_from_slice(&word.to_ne_bytes());
    }
    b.extend_from_slice(&[0; 44]);
    debug_assert_eq!(b.len(), 104);
    b
}

/// A fuser session over the live connection `fuse`, its INIT replayed from `n` (see the
/// module doc). Nothing is read from `fuse` here.
pub(crate) fn take_over<FS: fuser::Filesystem>(
    fs: FS,
    fuse: OwnedFd,
    n: &Negotiated,
    acl: fuser::SessionACL,
    config: fuser::Config,
) -> io::Result<fuser::Session<FS>> {
    let (ours, fusers) = seqpacket_pair()?;
    let init = init_request(n);
    write_all_once(ours.as_fd(), &init)?;
    let session = fuser::Session::from_fd(fs, fusers, acl, config)?;
    // fuser's answer: a fuse_out_header whose error must be 0 (our `init` accepted).
    let mut reply = [0u8; 512];
    // SAFETY: read into a buffer we own, of its length.
    let n = unsafe { libc::read(ours.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len()) };
    if n < 16 {
        return Err(io::Error::other("no answer to the replayed INIT"));
    }
    let error = i32::from_ne_bytes(reply[4..8].try_into().expect("4 bytes"));
    if error != 0 {
        return Err(io::Error::from_raw_os_error(-error));
    }
    // The swap: fuser's fd now refers to the kernel's connection. dup3 replaces the socket
    // under the same number atomically; no thread of fuser's runs yet, so nothing is using it.
    // SAFETY: both fds are open; the target stays owned by fuser's session, which keeps using
    // the number (a valid fd, now the device) and closes it when the session ends.
    if unsafe {
        libc::dup3(
            fuse.as_raw_fd(),
            session.as_fd().as_raw_fd(),
            libc::O_CLOEXEC,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(session)
}

/// Ask the kernel to resend the requests the connection's previous server read but did not
/// answer. Fails with EINVAL on kernels without `FUSE_NOTIFY_RESEND`.
pub(crate) fn resend(fuse: BorrowedFd<'_>) -> io::Result<()> {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    write_all_once(fuse, &header)
}

/// One `write` carrying all of `buf` (devices and packet sockets take a message whole).
fn write_all_once(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<()> {
    // SAFETY: write from a buffer we own, of its length.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == buf.len() => Ok(()),
        _ => Err(io::Error::other("short write")),
    }
}

/// A connected `SOCK_SEQPACKET` pair (close-on-exec).
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two fds on success.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replayed_init_has_the_kernels_layout() {
        let n = Negotiated {
            major: 7,
            minor: 41,
            max_readahead: 131072,
            kernel_flags: InitFlags::FUSE_ASYNC_READ.bits() | InitFlags::FUSE_HAS_RESEND.bits(),
            granted: 0,
        };
        let b = init_request(&n);
        let word = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
        assert_eq!(word(0), 104);
        assert_eq!(word(4), FUSE_INIT);
        assert_eq!((word(40), word(44), word(48)), (7, 41, 131072));
        let flags = u64::from(word(52)) | (u64::from(word(56)) << 32);
        assert_eq!(
            flags,
            n.kernel_flags | InitFlags::FUSE_INIT_EXT.bits(),
            "both flag words, with the extension bit that makes the kernel read the second"
        );
        assert!(n.can_resend());
        assert!(
            !Negotiated {
                kernel_flags: 0,
                ..n
            }
            .can_resend()
        );
    }
}
