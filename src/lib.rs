//! imagefs: mount a container image straight from a registry as a read-only filesystem,
//! fetching layer data only when somebody reads it.
//!
//! The pipeline, one module per stage:
//!
//! 1. [`reference`](mod@reference) parses and normalises `busybox`, `host:5000/ns/app:tag@sha256:…`.
//! 2. [`registry`] speaks the distribution v2 protocol: auth, manifests, blobs with Range.
//! 3. [`oci`] parses the manifest / index / config into its own serde structs (stricter than
//!    `oci-spec`'s: see [`oci::manifest`]), picks the platform.
//! 4. [`store`] keeps verified, content-addressed blobs and extracted layers on disk.
//! 5. [`layer`] decompresses (gzip, zstd, none), indexes and extracts tar layers.
//! 6. [`overlay`] merges layer indexes into one tree with OCI whiteout semantics (pure).
//! 7. [`fs`] serves that tree over FUSE; it is the only module that knows errno and inodes.
//! 8. [`image`] is the engine front ends share: resolve a reference, serve a mounted image
//!    (lazy layers, the merged tree, prefetch) as the `fs` backend.
//! 9. [`snapshotter`] serves the engine to containerd as a remote snapshotter (gRPC).
//! 10. [`cli`] wires it together for the `imagefs` binary.
//!
//! [`error::Chain`] shows an error with its causes; every error type keeps its cause in
//! `source()`, not in its message.
//!
//! Invariants are listed in `docs/architecture.md`.

pub mod cli;
pub mod error;
pub mod fs;
pub mod image;
pub mod layer;
pub mod oci;
pub mod overlay;
pub mod reference;
pub mod registry;
pub mod retry;
pub mod snapshotter;
pub mod store;
