//! Distribution v2 client (OCI distribution-spec): pull (ping, manifests, blobs with Range)
//! and push (blob uploads, monolithic or chunked, cross-repository mounts, manifests),
//! authentication (Bearer tokens, Basic, docker config credentials), redirects, retries and
//! the registry's error envelope.
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
//! - `client`: the [`Client`]: one attempt per request, wrapped in [`crate::retry`]'s policy;
//!   its push side (the upload flow, step by step) in `client/push.rs`.

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
    /// Retries after the first attempt, on connection errors, 429 and 5xx, started only while
    /// the first attempt is younger than `timeout` ([`crate::retry::RetryPolicy`]).
    pub max_retries: u32,
    /// Pull mirrors, tried in order before the registry itself (see [`Mirror`]). Pushes
    /// never go to them.
    pub mirrors: Vec<Mirror>,
    /// A blob up to this size is pushed in one `PUT`; a larger one in `PATCH` requests of this
    /// size (also the most of a file body held in memory at once).
    pub upload_chunk_size: u64,
}

/// A pull mirror of one registry — a pull-through cache, a P2P distributor, anything that
/// speaks the distribution API for the same repository names. Every request for `registry`
/// goes to its mirrors first, in order; a mirror that fails (cannot connect, errors, does not
/// have what was asked for) is skipped, and the registry itself is the last resort. What a
/// mirror serves is verified exactly like what the registry serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// As in `Reference::registry()`: `docker.io`, `ghcr.io`, `localhost:5000`.
    pub registry: String,
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]` of the mirror.
    pub host: String,
    /// Whether tags are resolved through it too (containerd's `resolve` capability); when not,
    /// only content addressed by digest is fetched from it.
    pub resolve: bool,
}

impl Mirror {
    /// A mirror of `registry` at `url` (`http://host[:port]` or `https://…`; a path is refused:
    /// the API lives at `/v2/` of the host).
    pub fn new(registry: &str, url: &str) -> Result<Mirror, MirrorError> {
        let url_owned = || url.to_owned();
        if !url.contains("://") {
            return Err(MirrorError::NoScheme { url: url_owned() });
        }
        let parsed = url::Url::parse(url).map_err(|source| MirrorError::Parse {
            url: url_owned(),
            source,
        })?;
        let scheme = parsed.scheme();
        if scheme != "http" && scheme != "https" {
            return Err(MirrorError::Scheme { url: url_owned() });
        }
        let Some(host) = parsed.host_str() else {
            return Err(MirrorError::NoHost { url: url_owned() });
        };
        let path = parsed.path().trim_end_matches('/');
        if !(path.is_empty() || path == "/v2") || parsed.query().is_some() {
            return Err(MirrorError::HasPath { url: url_owned() });
        }
        if registry.is_empty() || registry.contains('/') {
            return Err(MirrorError::NotRegistry {
                registry: registry.to_owned(),
            });
        }
        let host = match parsed.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Ok(Mirror {
            registry: registry.to_owned(),
            scheme: scheme.to_owned(),
            host,
            resolve: true,
        })
    }
}

/// Why [`Mirror::new`] refused a mirror.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("mirror URL {url:?}: give the scheme, e.g. http://{url} or https://{url}")]
    NoScheme { url: String },
    #[error("mirror URL {url:?}")]
    Parse {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("mirror URL {url:?}: the scheme must be http or https")]
    Scheme { url: String },
    #[error("mirror URL {url:?} has no host")]
    NoHost { url: String },
    #[error("mirror URL {url:?}: give the host only (the API is at /v2/ of it)")]
    HasPath { url: String },
    #[error("mirror for {registry:?}: not a registry host")]
    NotRegistry { registry: String },
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            plain_http: false,
            ca_certs: Vec::new(),
            insecure_skip_tls_verify: false,
            timeout: Duration::from_secs(15),
            credentials: None,
            use_docker_config: true,
            docker_config: None,
            mirrors: Vec::new(),
            user_agent: concat!("imagefs/", env!("CARGO_PKG_VERSION")).to_owned(),
            max_retries: 4,
            upload_chunk_size: 32 << 20,
        }
    }
}

/// A manifest (or index) as the registry sent it.
#[derive(Clone, Debug)]
pub struct ManifestResponse {
    /// The exact bytes served.
    pub bytes: Bytes,
    /// The bytes the manifest digest covers: `bytes` itself, except for a signed schema 1
    /// manifest (its payload without the signatures). Digests are computed over these, never
    /// over re-serialised JSON.
    pub canonical: Bytes,
    /// The `Content-Type` header, parameters included.
    pub content_type: Option<String>,
    /// sha256 of `canonical`: the digest the registry gives this manifest.
    pub digest: Digest,
}

/// What a blob upload reads from ([`Client::push_blob`]).
#[derive(Clone, Debug)]
pub enum BlobBody {
    Bytes(Bytes),
    /// Read in `upload_chunk_size` pieces, never whole (unless it is that small).
    File(PathBuf),
}

/// How a blob came to be in the destination repository ([`Client::push_blob`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPush {
    /// It was there already.
    Exists,
    /// The registry linked it from the repository it was mounted from.
    Mounted,
    Uploaded,
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

#[cfg(test)]
mod tests {
    use super::Mirror;

    #[test]
    fn mirror_urls() {
        let ok = |reg: &str, url: &str, scheme: &str, host: &str| {
            let m = Mirror::new(reg, url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(
                (m.scheme.as_str(), m.host.as_str()),
                (scheme, host),
                "{url}"
            );
            assert!(m.resolve);
        };
        ok(
            "docker.io",
            "http://127.0.0.1:5000",
            "http",
            "127.0.0.1:5000",
        );
        ok(
            "docker.io",
            "https://mirror.example/",
            "https",
            "mirror.example",
        );
        ok(
            "ghcr.io",
            "https://m.example:8443/v2",
            "https",
            "m.example:8443",
        );
        ok("localhost:5000", "http://[::1]:5001", "http", "[::1]:5001");
        for (reg, url, why) in [
            ("docker.io", "ftp://x", "scheme"),
            ("docker.io", "127.0.0.1:5000", "scheme"),
            ("docker.io", "http://x/some/path", "host only"),
            ("docker.io", "http://x/?q=1", "host only"),
            ("", "http://x", "not a registry"),
            ("docker.io/library", "http://x", "not a registry"),
        ] {
            let e = Mirror::new(reg, url).unwrap_err().to_string();
            assert!(e.contains(why), "{reg} {url}: {e}");
        }
    }
}
