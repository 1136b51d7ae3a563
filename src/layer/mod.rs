//! Layer blobs: decompression (gzip, zstd, none), the tar indexer that turns a layer into a
//! [`LayerIndex`], and extraction of file data into a directory. No network, no FUSE, no
//! async.

pub mod decompress;
pub mod estargz;
pub mod extract;
pub mod index;
pub mod tar;

pub use index::{DataRef, Entry, EntryKind, LayerIndex, Timespec, Xattr};
