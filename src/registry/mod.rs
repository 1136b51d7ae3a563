//! Distribution v2 client (OCI distribution-spec, pull side): ping, manifests, blobs with
//! Range, authentication (Bearer tokens, Basic, docker config credentials), redirects,
//! retries and the registry's error envelope.
//!
//! It knows nothing of the store, FUSE, the CLI or environment variables (except Docker's own
//! `DOCKER_CONFIG` convention, in [`default_docker_config`]). It returns bytes and streams;
//! callers hash what they stream.
//!
//! Registries are named as in `Reference::registry()` (`docker.io`, `127.0.0.1:5000`);
//! Docker Hub's API host `registry-1.docker.io` is substituted here ([`api_host`]).
//!
//! - [`auth`]: challenge parsing and token lifetimes (the Bearer flow is described there).
//! - [`credentials`]: [`Secret`], [`Credentials`] and the docker config lookup.
//! - [`errors`]: [`Error`] and the registry's error envelope.
//! - `client`: the [`Client`] and its request loop.

pub mod auth;
mod client;
pub mod credentials;
pub mod errors;

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

use crate::oci::Digest;

pub use client::{Client, api_host, is_loopback};
pub use credentials::{Credentials, CredentialsError, Secret, default_docker_config};
pub use errors::{Error, ErrorEnvelope, RegistryError};

/// How the [`Client`] talks to registries.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Plain `http://` for every registry. Without it, https is used, except that a
    /// loopback registry (`localhost`, 127.0.0.0/8, `[::1]`) falls back to http when https
    /// cannot connect, as Docker does.
    pub plain_http: bool,
    /// Extra PEM root certificates (each file may hold several), on top of the system's.
    pub ca_certs: Vec<PathBuf>,
    pub insecure_skip_tls_verify: bool,
    /// Connect timeout, and the longest wait for any read (not the whole transfer).
    pub timeout: Duration,
    /// Credentials for every registry; `None` looks them up in the docker config.
    pub credentials: Option<Credentials>,
    /// Whether to look up credentials in the docker config when `credentials` is `None`.
    pub use_docker_config: bool,
    /// The docker config file; `None` is Docker's default ([`default_docker_config`]).
    pub docker_config: Option<PathBuf>,
    pub user_agent: String,
    /// Retries after the first attempt, on connection errors, 429 and 5xx.
    pub max_retries: u32,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            plain_http: false,
            ca_certs: Vec::new(),
            insecure_skip_tls_verify: false,
            timeout: Duration::from_secs(30),
            credentials: None,
            use_docker_config: true,
            docker_config: None,
            user_agent: concat!("imagefs/", env!("CARGO_PKG_VERSION")).to_owned(),
            max_retries: 4,
        }
    }
}

/// A manifest (or index) as the registry sent it.
#[derive(Clone, Debug)]
pub struct ManifestResponse {
    /// The exact bytes: digests are computed over them, never over re-serialised JSON.
    pub bytes: Bytes,
    /// The `Content-Type` header, parameters included.
    pub content_type: Option<String>,
    /// sha256 of `bytes`.
    pub digest: Digest,
}

/// A blob body, possibly from an offset.
pub struct BlobStream {
    /// Offset of the first body byte: the requested offset on 206, 0 when the registry
    /// ignored the Range header (200) and the caller must skip ahead itself.
    pub start: u64,
    /// The blob's full size when known (Content-Range total, or Content-Length on 200).
    pub total: Option<u64>,
    pub body: Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>,
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("start", &self.start)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}
