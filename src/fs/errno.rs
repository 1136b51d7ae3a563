//! The one mapping from a failed operation to an errno. An errno loses the message, so this is
//! also where failures are logged: expected ones (a missing name) quietly, real ones (a fetch
//! that failed) as warnings with the reason.

use fuser::{Errno, INodeNo};

use super::backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    #[error("no such entry")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("not a symlink")]
    NotSymlink,
    #[error("not a regular file")]
    NotFile,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("no such extended attribute")]
    NoAttr,
    #[error("buffer too small")]
    TooSmall,
    #[error("the image tree is unavailable")]
    Tree(#[source] BackendError),
    #[error("fetching layer {layer} file {id} failed")]
    Data {
        layer: u32,
        id: u32,
        source: BackendError,
    },
    #[error("reading layer {layer} file {id} at offset {offset} failed")]
    Read {
        layer: u32,
        id: u32,
        offset: u64,
        source: std::io::Error,
    },
}

impl OpError {
    /// Log (at the level the failure deserves) and convert.
    pub(crate) fn errno(self, op: &'static str, ino: INodeNo) -> Errno {
        let ino = ino.0;
        let line = crate::error::Chain(&self);
        match &self {
            OpError::NotFound => tracing::trace!(op, ino, "{self}"),
            OpError::NoAttr | OpError::TooSmall => tracing::trace!(op, ino, "{self}"),
            OpError::NotDir | OpError::NotSymlink | OpError::NotFile | OpError::ReadOnly => {
                tracing::debug!(op, ino, "{self}")
            }
            OpError::Tree(_) | OpError::Data { .. } | OpError::Read { .. } => {
                tracing::warn!(op, ino, "{line}")
            }
        }
        match self {
            OpError::NotFound => Errno::ENOENT,
            OpError::NotDir => Errno::ENOTDIR,
            OpError::NotSymlink | OpError::NotFile => Errno::EINVAL,
            OpError::ReadOnly => Errno::EROFS,
            OpError::NoAttr => Errno::NO_XATTR,
            OpError::TooSmall => Errno::ERANGE,
            OpError::Tree(_) | OpError::Data { .. } | OpError::Read { .. } => Errno::EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_per_failure() {
        let backend = || BackendError::new("registry unreachable");
        let cases = [
            (OpError::NotFound, libc::ENOENT),
            (OpError::NotDir, libc::ENOTDIR),
            (OpError::NotSymlink, libc::EINVAL),
            (OpError::ReadOnly, libc::EROFS),
            (OpError::NoAttr, libc::ENODATA),
            (OpError::TooSmall, libc::ERANGE),
            (OpError::Tree(backend()), libc::EIO),
            (
                OpError::Data {
                    layer: 1,
                    id: 2,
                    source: backend(),
                },
                libc::EIO,
            ),
        ];
        for (err, want) in cases {
            let text = err.to_string();
            assert_eq!(err.errno("test", INodeNo(1)).code(), want, "{text}");
        }
    }

    #[test]
    fn backend_reason_survives_in_the_message() {
        let e = OpError::Data {
            layer: 3,
            id: 17,
            source: BackendError::new("sha256:abc: connection reset"),
        };
        assert_eq!(
            crate::error::Chain(&e).to_string(),
            "fetching layer 3 file 17 failed: sha256:abc: connection reset"
        );
    }
}
