//! The keeper ↔ server messages: one JSON object per `SOCK_SEQPACKET` packet, file descriptors
//! beside it (`SCM_RIGHTS`).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::fs::Negotiated;

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
    assert!(body.len() <= MAX_MSG);
    crate::fs::fdpass::send(sock, &body, fds)
}

/// The next message and its fds; `None` when the peer is gone.
pub(crate) fn recv(sock: BorrowedFd<'_>) -> io::Result<Option<(Msg, Vec<OwnedFd>)>> {
    let Some((body, fds)) = crate::fs::fdpass::recv(sock, MAX_MSG)? else {
        return Ok(None);
    };
    let msg =
        serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
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
