//! The merged tree: layer indexes applied base first with OCI changeset semantics
//! (image-spec `layer.md`: whiteouts, opaque whiteouts, replacing entries, hardlinks).
//!
//! Pure and deterministic: no I/O, no FUSE, no async. [`merge`] is a function of its inputs,
//! tested with a small text notation per layer.

mod merge;
#[cfg(test)]
pub(crate) mod notation;
mod tree;

pub use merge::{MergeError, merge};
pub use tree::{Content, DirEntry, Inode, InodeId, Meta, ROOT, Run, Tree};
