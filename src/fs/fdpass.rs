//! File descriptors across a unix socket (`SCM_RIGHTS`): the keeper's handoffs, and the fd
//! `fusermount3` sends back. std has no stable API for ancillary data (`UnixStream::
//! send_vectored_with_ancillary` is unstable), hence these two calls.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Most fds one message carries.
const MAX_FDS: usize = 4;

/// A message header over `iov`, with a control buffer for [`MAX_FDS`] fds.
fn header(iov: &mut libc::iovec, control: &mut Vec<u8>) -> libc::msghdr {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<i32>()) as u32) } as usize;
    control.resize(space, 0);
    // SAFETY: a zeroed msghdr is valid; the caller keeps iov and control alive while using it.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = space as _;
    hdr
}

/// Send `body` with `fds` beside it, as one message.
pub(crate) fn send(sock: BorrowedFd<'_>, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut _,
        iov_len: body.len(),
    };
    let mut control = Vec::new();
    let mut hdr = header(&mut iov, &mut control);
    if fds.is_empty() {
        hdr.msg_control = std::ptr::null_mut();
        hdr.msg_controllen = 0;
    } else {
        let len = fds.len() * size_of::<i32>();
        // SAFETY: a pure size computation.
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

/// The next message (at most `max` bytes) and the fds that came with it (close-on-exec);
/// `None` at end of stream.
pub(crate) fn recv(
    sock: BorrowedFd<'_>,
    max: usize,
) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut body = vec![0u8; max];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr().cast(),
        iov_len: body.len(),
    };
    let mut control = Vec::new();
    let mut hdr = header(&mut iov, &mut control);
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
    body.truncate(n);
    Ok(Some((body, fds)))
}
