//! Layer blobs: decompression (gzip, zstd, none), the tar indexer that turns a layer into a
//! [`LayerIndex`], and extraction of file data into the store. No network, no FUSE.

pub mod index;

pub use index::{Entry, EntryKind, LayerIndex, Timespec};
