//! Test harness: registries, token issuer, image builder, imagefs runner.
//!
//! - [`registry`]: [`Registry::start`]`(`[`Auth`]`)` runs a real `docker-registry` on a free
//!   loopback port (anonymous, htpasswd, or Bearer tokens), reads its access log;
//!   [`Registry::start_schema1`] accepts Docker schema 1 manifests too.
//! - [`token`]: the Docker-Hub-like [`TokenIssuer`] behind [`Auth::Token`].
//! - [`image`]: tar [`Entry`]s → [`Layer`] → [`ImageBuilder`] / [`IndexBuilder`], exact bytes.
//! - [`push`]: `registry.push_image(repo, tag, &image)`, `push_index`, `push_blob`,
//!   `push_manifest`; `skopeo_copy_fixture`, `skopeo_copy_to_schema1`, `skopeo_inspect_raw`,
//!   `fixture_path`.
//! - [`cmd`]: [`Imagefs`] runs the real binary with a temp cache; [`Output`] assertions.
//! - [`survive`]: `imagefs ps`, server restarts, a checking reader loop, a slow proxy, a runc
//!   loop, an unprivileged user (the `survive` tests).

// Each test uses a different slice of the harness.
#![allow(dead_code, unused_imports)]

pub mod cmd;
pub mod image;
pub mod push;
pub mod registry;
pub mod token;

pub use cmd::{Cmd, Imagefs, Output};
pub use image::{
    Compression, Document, Entry, Format, Image, ImageBuilder, Index, IndexBuilder, Layer,
    Platform, manifest_layers, noise, sha256_digest,
};
pub use push::{
    block_on, fixture_path, fixtures_dir, skopeo_copy_fixture, skopeo_copy_to_schema1,
    skopeo_inspect_raw,
};
pub use registry::{AccessLine, Auth, Registry};
pub use token::{TOKEN_PASS, TOKEN_USER, TokenIssuer, TokenRequest};
pub mod adversary;
pub mod containerd;
pub mod mounts;
pub mod oracle;
pub mod sparse;
pub mod survive;
pub mod tree;
