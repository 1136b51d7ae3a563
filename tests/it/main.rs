//! The one integration-test binary: drives the real `imagefs` executable against real
//! registries (Debian's `docker-registry`) and real FUSE mounts.

mod fs_mount;
mod harness;
mod registry_faults;
mod support;
