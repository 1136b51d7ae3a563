//! The one integration-test binary: drives the real `imagefs` executable against real
//! registries (Debian's `docker-registry`) and real FUSE mounts.

mod cache;
mod cli_pull;
mod estargz;
mod faults;
mod fs_mount;
mod harness;
mod mirrors;
mod mount;
mod registry_faults;
mod schema1;
mod support;
