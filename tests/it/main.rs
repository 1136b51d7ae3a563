//! The one integration-test binary: drives the real `imagefs` executable against real
//! registries (Debian's `docker-registry`, started on 127.0.0.1 by `support::registry`) and
//! real FUSE mounts. What each module holds:
//!
//! | module | what it proves |
//! |---|---|
//! | `cli_pull` | `pull`, `inspect`, `layers` end to end: auth modes, digests against skopeo, platforms, the cache layout, messages |
//! | `cli_mount` | `mount` end to end: trees against umoci's unpack and the interop fixtures, chroot and runc on the mount, life cycle, offline remounts, EROFS |
//! | `cli_faults` | faults with real parts: a registry killed mid-pull, the network gone after a mount, a daemon SIGKILLed |
//! | `estargz` | file-granular laziness: footer + TOC at mount, verified chunks, prefetch, the reference tool's images |
//! | `cache` | `cache ls/du/prune/verify/gc` and `--cache-max-size` on a shared store |
//! | `mirrors` | pull mirrors and `hosts.toml` against distribution in proxy mode |
//! | `safety` | hostile or careless use: umount targets, nosuid/nodev, cache ownership, secrets, mount points, one-line errors |
//! | `fs_backend` | `imagefs::fs` alone: real FUSE mounts of hand-made trees through a test backend (no registry) |
//! | `client_adversary` | `imagefs::registry::Client` against an in-process adversarial server (what a real registry never does) |
//! | `push` | `Client`'s push side: monolithic and chunked uploads, mounts, manifests against the real registry (all auth modes); 413, refused rights, dropped connections against the adversarial server |
//! | `convert` | `convert`: eStargz images pushed to a real registry keep the source's tree (umoci), mount lazily, convert again to the same digest; `mount --record` then `--prioritize` |
//! | `schema1` | Docker schema 1 images (signed, served by distribution with schema 1 enabled) mount like umoci unpacks them, remount offline |
//! | `survive` | a mount outlives its server: SIGKILLs and `upgrade`s under 32 readers (gzip and lazy eStargz behind a slow proxy) and a runc container lose no read; a killed keeper ends the mount cleanly; without resend a reader in flight waits; rootless mount, kill, umount |
//! | `harness` | self-tests of the harness: builder, registry auth modes, fixtures |
//!
//! `support/` holds the harness (registry, token issuer, image builder, mounts, oracles).

mod cache;
mod cli_faults;
mod cli_mount;
mod cli_pull;
mod client_adversary;
mod containerd;
mod convert;
mod estargz;
mod fs_backend;
mod harness;
mod mirrors;
mod push;
mod safety;
mod schema1;
mod support;
mod survive;
