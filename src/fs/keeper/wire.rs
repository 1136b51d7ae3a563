//! The keeper ↔ server messages: one JSON object per `SOCK_SEQPACKET` packet, file descriptors
//! beside it (`SCM_RIGHTS`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::fs::Negotiated;

/// Most fds a message carries (the connection and the open-file table).
const MAX_FDS: usize = 4;
/// Largest message (the front end's `info` is a few hundred bytes).
const MAX_MSG: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub(crate) enum Msg {
    /// Keeper → server, first: mount afresh, or take the mount over (fds: the connection, then
    /// the open-file table if any).
    Start {
        takeover: Option<Takeover>,
    },
    /// Server → keeper: mounted (fds as in `Start`); the keeper answers `Kept`.
    Mounted {
        takeover: Takeover,
    },
    Kept,
    /// Server → keeper: serving requests. `info` is shown by `status` (reference, digest…).
    Serving {
        info: serde_json::Value,
    },
}

/// What the keeper keeps for the next server, besides the fds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Takeover {
    pub negotiated: Negotiated,
    /// The front end's own state (e.g. the manifest digest it mounted).
    pub state: serde_json::Value,
    /// Whether an open-file table fd follows the connection's.
    pub open_state: bool,
}

pub(crate) fn send(sock: BorrowedFd<'_>, msg: &Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).expect("messages serialise");
    assert!(fds.len() <= MAX_FDS && body.len() <= MAX_MSG);
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut _,
        iov_len: body.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<i32>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the sendmsg call.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if !fds.is_empty() {
        let len = fds.len() * size_of::<i32>();
        hdr.msg_control = control.as_mut_ptr().cast();
        // SAFETY: as above.
        hdr.msg_controllen = unsafe { libc::CMSG_SPACE(len as u32) } as _;
        // SAFETY: the control buffer holds one header for `len` bytes of fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(len as u32) as _;
            let data = libc::CMSG_DATA(c).cast::<i32>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: hdr points at live buffers.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The next message and its fds; `None` when the peer is gone.
pub(crate) fn recv(sock: BorrowedFd<'_>) -> io::Result<Option<(Msg, Vec<OwnedFd>)>> {
    let mut body = vec![0u8; MAX_MSG];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr().cast(),
        iov_len: body.len(),
    };
    // SAFETY: a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<i32>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the recvmsg call.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = space as _;
    let n = loop {
        // SAFETY: hdr points at live buffers.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg wrote; each SCM_RIGHTS fd is ours now.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count =
                    ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<i32>();
                let data = libc::CMSG_DATA(c).cast::<i32>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&body[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((msg, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_message_and_its_fds_cross_the_socket() {
        let (a, b) = crate::fs::session::seqpacket_pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let msg = Msg::Serving {
            info: serde_json::json!({"reference": "x"}),
        };
        send(a.as_fd(), &msg, &[file.as_fd()]).unwrap();
        let (got, fds) = recv(b.as_fd()).unwrap().unwrap();
        assert!(matches!(got, Msg::Serving { info } if info["reference"] == "x"));
        assert_eq!(fds.len(), 1);
        use std::io::{Seek, Write};
        let mut f = std::fs::File::from(fds.into_iter().next().unwrap());
        f.write_all(b"shared").unwrap();
        let mut orig = file;
        assert_eq!(orig.stream_position().unwrap(), 6, "the same open file");
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none(), "peer gone");
    }
}
