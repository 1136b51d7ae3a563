//! FUSE filesystem (written in the fs task).
