//! The push side of the [`Client`]: blobs (monolithic or chunked uploads, cross-repository
//! mounts) and manifests. The flow (distribution-spec "Push"; distribution's
//! `docs/spec/api.md`, "Pushing An Image"):
//!
//! 1. `HEAD /v2/<name>/blobs/<digest>`: 200, the blob is there already ([`BlobPush::Exists`]).
//! 2. Mount ("Mounting a blob from another repository"), when the caller names a repository
//!    of the same registry that has it:
//!    `POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<other>` answers 201 when linked
//!    ([`BlobPush::Mounted`]), or 202 and an ordinary upload session when the registry could
//!    not (or would not) mount: that session is used.
//! 3. `POST /v2/<name>/blobs/uploads/`: 202 and the session's URL in `Location`, absolute or
//!    relative to the request, possibly with a query of its own (distribution's `_state`).
//! 4. Monolithic ("Pushing a blob monolithically", POST then PUT), for a blob of at most
//!    `upload_chunk_size`: `PUT <location>?digest=<digest>` with the whole blob, 201.
//!    Chunked ("Pushing a blob in chunks"): `PATCH <location>` per chunk, with
//!    `Content-Range: <first>-<last>` (inclusive, no unit) and
//!    `Content-Type: application/octet-stream`; each 202 gives the next `Location` and
//!    `Range: 0-<last>` (what the registry holds, checked); then `PUT <location>?digest=<digest>`
//!    without a body, 201.
//! 5. Blobs first, then `PUT /v2/<name>/manifests/<reference>` with the manifest's media type
//!    as `Content-Type`, 201 ("Pushing Manifests"): a registry refuses a manifest whose blobs
//!    it does not have (`MANIFEST_BLOB_UNKNOWN`).
//!
//! Every request asks for the push scope (`auth::push_scope`) and goes to the registry itself,
//! never to a mirror. A body is checked against its size and digest before anything is sent
//! (a file larger than a chunk is hashed while read, and the upload is not completed if it
//! does not match). One upload, from the POST on, is one attempt of the retry policy: after a
//! dropped connection, a 5xx or a 429 at any step, the state of the session is unknown (not
//! every registry reports it), so the next attempt starts a new one.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, HeaderValue, LOCATION};
use reqwest::{Method, Response, StatusCode};
use url::Url;

use super::{Call, Client, DOCKER_CONTENT_DIGEST, Failed, Sent, UrlScheme, api_host};
use crate::oci::Digest;
use crate::oci::digest::Hasher;
use crate::registry::auth;
use crate::registry::errors::{Error, ErrorEnvelope, Subject};
use crate::registry::{BlobBody, BlobPush};
use crate::retry::RetryPolicy;

const OCTET_STREAM: &str = "application/octet-stream";

/// One blob push: what is pushed where, and how.
struct Upload<'a> {
    registry: &'a str,
    repository: &'a str,
    digest: &'a Digest,
    size: u64,
    scope: String,
    mount_from: Option<&'a str>,
    source: Source,
    chunk_size: u64,
    progress: &'a (dyn Fn(u64) + Send + Sync),
}

/// A blob body, checked as far as it can be before anything is sent.
enum Source {
    /// In memory, its size and digest verified.
    Whole(Bytes),
    /// A file larger than a chunk, its size checked; hashed while read.
    File(PathBuf),
}

/// How the POST that starts an upload was answered.
enum Started {
    Mounted,
    /// The upload session's URL.
    Session(Url),
}

impl Client {
    /// `HEAD /v2/<repository>/blobs/<digest>` on the registry itself (never a mirror): 200 →
    /// true, 404 → false.
    pub async fn blob_exists(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<bool, Error> {
        let scope = auth::pull_scope(Some(repository));
        self.head_blob(registry, repository, digest, scope).await
    }

    async fn head_blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        scope: Option<String>,
    ) -> Result<bool, Error> {
        let call = Call {
            method: Method::HEAD,
            scope,
            ..self.blob_call(registry, repository, digest, None)
        };
        match self.send_origin(&call).await {
            Ok(_) => Ok(true),
            // A new repository has no blobs.
            Err(Error::BlobNotFound { .. } | Error::RepositoryNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Make blob `digest` (`size` bytes, read from `body`) present in `repository`: already
    /// there ([`BlobPush::Exists`]), mounted from `mount_from` (another repository of the same
    /// registry; [`BlobPush::Mounted`]), or uploaded, in one PUT up to
    /// [`upload_chunk_size`](crate::registry::ClientConfig::upload_chunk_size) bytes, in PATCHes
    /// of that size beyond (see the module doc). `progress` gets the bytes sent so far (from 0
    /// again when an attempt starts over).
    ///
    /// A body that is not `size` bytes or does not hash to `digest` is [`Error::BadBlob`]; an
    /// upload that fails on every attempt is [`Error::UploadFailed`], naming the blob and the
    /// URL of the last failure.
    #[allow(clippy::too_many_arguments)]
    pub async fn push_blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        size: u64,
        body: &BlobBody,
        mount_from: Option<&str>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<BlobPush, Error> {
        let chunk_size = self.inner.config.upload_chunk_size.max(1);
        let source = Source::check(body, digest, size, chunk_size).await?;
        let mount_from = mount_from.filter(|from| *from != repository);
        let scope = auth::push_scope(repository, mount_from);
        if self
            .head_blob(registry, repository, digest, Some(scope.clone()))
            .await?
        {
            return Ok(BlobPush::Exists);
        }
        let upload = Upload {
            registry,
            repository,
            digest,
            size,
            scope,
            mount_from,
            source,
            chunk_size,
            progress,
        };
        // The client's attempts, without its deadline: that bounds the retries of a FUSE
        // read; one attempt at a large upload may well outlast it.
        let policy = RetryPolicy {
            deadline: None,
            ..self.inner.retry.clone()
        };
        let attempts = AtomicU32::new(0);
        policy
            .run(
                |n| {
                    attempts.store(n, Ordering::Relaxed);
                    self.upload_once(&upload)
                },
                |f| f.verdict,
            )
            .await
            .map_err(|f| upload.error(f.error, attempts.load(Ordering::Relaxed)))
    }

    /// Make blob `digest` present in `repository` without sending it: there already
    /// ([`BlobPush::Exists`]), or mounted from `from`, another repository of the same registry
    /// ([`BlobPush::Mounted`]). `None` when the registry would not mount it (it answered
    /// with an upload session instead, left unused): the caller uploads it with
    /// [`Client::push_blob`].
    pub async fn mount_blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        from: &str,
    ) -> Result<Option<BlobPush>, Error> {
        let scope = auth::push_scope(repository, Some(from).filter(|f| *f != repository));
        if self
            .head_blob(registry, repository, digest, Some(scope.clone()))
            .await?
        {
            return Ok(Some(BlobPush::Exists));
        }
        if from == repository {
            return Ok(None);
        }
        let mut call = self.push_call(
            registry,
            repository,
            scope,
            Method::POST,
            format!("/v2/{repository}/blobs/uploads/?mount={digest}&from={from}"),
        );
        call.body = Some(Bytes::new());
        let (response, _) = self.send_origin(&call).await?;
        Ok((response.status() == StatusCode::CREATED).then_some(BlobPush::Mounted))
    }

    /// `PUT /v2/<repository>/manifests/<reference>` with `Content-Type: media_type`, on the
    /// registry itself. Returns the manifest's digest: `reference` when it is one (checked
    /// against `bytes` before sending), else the sha256 of `bytes`; checked against the
    /// registry's `Docker-Content-Digest` when it answers one. A refusal (400
    /// `MANIFEST_INVALID`, `MANIFEST_BLOB_UNKNOWN`, …) is [`Error::ManifestRefused`].
    pub async fn push_manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, Error> {
        let bad = |reason: String| Error::BadManifest {
            repository: repository.to_owned(),
            reference: reference.to_owned(),
            reason,
        };
        let digest = match reference.parse::<Digest>() {
            Ok(pinned) => {
                pinned
                    .verify(bytes)
                    .map_err(|actual| bad(format!("its digest is {actual}")))?;
                pinned
            }
            Err(_) => Digest::sha256(bytes),
        };
        let content_type = HeaderValue::from_str(media_type)
            .map_err(|_| bad(format!("invalid media type {media_type:?}")))?;
        let call = Call {
            headers: vec![(CONTENT_TYPE, content_type)],
            body: Some(Bytes::copy_from_slice(bytes)),
            ..self.push_call(
                registry,
                repository,
                auth::push_scope(repository, None),
                Method::PUT,
                format!("/v2/{repository}/manifests/{reference}"),
            )
        };
        let (response, url) = self.send_origin(&call).await.map_err(|e| match e {
            Error::Http { status, errors, .. } if status.is_client_error() => {
                Error::ManifestRefused {
                    repository: repository.to_owned(),
                    reference: reference.to_owned(),
                    status,
                    errors,
                }
            }
            other => other,
        })?;
        if let Some(stored) =
            header(&response, DOCKER_CONTENT_DIGEST).and_then(|d| d.parse::<Digest>().ok())
            && stored.verify(bytes).is_err()
        {
            return Err(Error::BadResponse {
                url,
                reason: format!(
                    "the registry stored the manifest as {stored}, its digest is {digest}"
                ),
            });
        }
        Ok(digest)
    }

    /// `call` on the registry itself (never a mirror), under the retry policy.
    async fn send_origin(&self, call: &Call) -> Result<(Response, String), Error> {
        self.inner
            .retry
            .run(|_| self.attempt(call), |f| f.verdict)
            .await
            .map_err(|f| f.error)
    }

    /// A push request for `path` (from `/v2/` on) on `registry`.
    fn push_call(
        &self,
        registry: &str,
        repository: &str,
        scope: String,
        method: Method,
        path: String,
    ) -> Call {
        Call {
            registry: registry.to_owned(),
            host: api_host(registry).to_owned(),
            scheme: None,
            scope: Some(scope),
            method,
            path,
            accept: None,
            range: None,
            headers: Vec::new(),
            body: None,
            // Not `Blob`: a 404 on an upload session is not the blob missing.
            subject: Subject::Other {
                name: repository.to_owned(),
            },
        }
    }

    /// A push request for `url`, an upload session's URL as the registry gave it.
    /// Credentials stay with their registry: on another host, the request is that host's
    /// (as a mirror's is), and authenticates as that host asks.
    fn session_call(&self, up: &Upload<'_>, method: Method, url: &Url) -> Call {
        let mut call = self.push_call(
            up.registry,
            up.repository,
            up.scope.clone(),
            method,
            path_and_query(url),
        );
        let host = host_port(url);
        if host != call.host {
            call.registry = host.clone();
        }
        call.host = host;
        call.scheme = Some(match url.scheme() {
            "http" => UrlScheme::Http,
            _ => UrlScheme::Https,
        });
        call
    }

    /// One attempt at an upload, from the POST that starts it to the PUT that completes it.
    async fn upload_once(&self, up: &Upload<'_>) -> Result<BlobPush, Failed> {
        (up.progress)(0);
        let location = match self.start_upload(up).await? {
            Started::Mounted => return Ok(BlobPush::Mounted),
            Started::Session(url) => url,
        };
        let location = match &up.source {
            Source::Whole(bytes) if up.size <= up.chunk_size => {
                self.put_blob(up, &location, bytes.clone()).await?;
                (up.progress)(up.size);
                return Ok(BlobPush::Uploaded);
            }
            Source::Whole(bytes) => {
                let mut location = location;
                for (first, last) in chunks(up.size, up.chunk_size) {
                    let piece = bytes.slice(first as usize..=last as usize);
                    location = self.patch_chunk(up, &location, first, piece).await?;
                }
                location
            }
            Source::File(path) => self.patch_file(up, location, path).await?,
        };
        self.put_blob(up, &location, Bytes::new()).await?;
        Ok(BlobPush::Uploaded)
    }

    /// `POST /v2/<name>/blobs/uploads/`, with `mount` and `from` when mounting.
    async fn start_upload(&self, up: &Upload<'_>) -> Result<Started, Failed> {
        let repository = up.repository;
        let path = match up.mount_from {
            Some(from) => format!(
                "/v2/{repository}/blobs/uploads/?mount={}&from={from}",
                up.digest
            ),
            None => format!("/v2/{repository}/blobs/uploads/"),
        };
        let call = Call {
            // Empty, not absent: sent as `Content-Length: 0`, which some proxies insist on.
            body: Some(Bytes::new()),
            ..self.push_call(
                up.registry,
                repository,
                up.scope.clone(),
                Method::POST,
                path,
            )
        };
        let (response, url) = self.attempt(&call).await?;
        match response.status() {
            StatusCode::CREATED if up.mount_from.is_some() => Ok(Started::Mounted),
            StatusCode::ACCEPTED => session_location(&response, &url, None)
                .map(Started::Session)
                .map_err(Failed::permanent),
            other => Err(Failed::permanent(Error::BadResponse {
                url,
                reason: format!("expected 202 Accepted to start an upload, got {other}"),
            })),
        }
    }

    /// `PATCH <location>` with the chunk `piece` from offset `first`; the next location.
    async fn patch_chunk(
        &self,
        up: &Upload<'_>,
        location: &Url,
        first: u64,
        piece: Bytes,
    ) -> Result<Url, Failed> {
        let last = first + piece.len() as u64 - 1;
        let range = HeaderValue::from_str(&content_range(first, last)).expect("digits and -");
        let call = Call {
            headers: vec![
                (CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM)),
                (CONTENT_RANGE, range),
            ],
            body: Some(piece),
            ..self.session_call(up, Method::PATCH, location)
        };
        let (response, url) = self.attempt(&call).await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(Failed::permanent(Error::BadResponse {
                url,
                reason: format!(
                    "expected 202 Accepted for a chunk, got {}",
                    response.status()
                ),
            }));
        }
        // What the registry holds now, if it says: anything but all we sent is lost data.
        if let Some(held) = header(&response, "range")
            && parse_range(&held) != Some(last)
        {
            return Err(Failed::permanent(Error::BadResponse {
                url,
                reason: format!("sent bytes 0-{last}, the registry holds {held:?}"),
            }));
        }
        (up.progress)(last + 1);
        session_location(&response, &url, Some(location)).map_err(Failed::permanent)
    }

    /// PATCH the file at `path` chunk by chunk, hashing it on the way; the last location.
    async fn patch_file(&self, up: &Upload<'_>, location: Url, path: &Path) -> Result<Url, Failed> {
        let mut reader = FileReader::open(path, up.digest)
            .await
            .map_err(Failed::permanent)?;
        let mut location = location;
        for (first, last) in chunks(up.size, up.chunk_size) {
            let piece = reader
                .read((last - first + 1) as usize)
                .await
                .map_err(Failed::permanent)?;
            location = self.patch_chunk(up, &location, first, piece).await?;
        }
        // Never complete an upload with a digest known to be wrong.
        reader.finish().await.map_err(Failed::permanent)?;
        Ok(location)
    }

    /// `PUT <location>?digest=<digest>` with `body` (the whole blob, or nothing after PATCHes).
    async fn put_blob(&self, up: &Upload<'_>, location: &Url, body: Bytes) -> Result<(), Failed> {
        let call = Call {
            headers: vec![(CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM))],
            body: Some(body),
            ..self.session_call(up, Method::PUT, &with_digest(location, up.digest))
        };
        let (response, url) = self.attempt(&call).await?;
        if let Some(stored) = header(&response, DOCKER_CONTENT_DIGEST)
            && stored != up.digest.to_string()
        {
            return Err(Failed::permanent(Error::BadResponse {
                url,
                reason: format!("pushed blob {}, the registry stored {stored}", up.digest),
            }));
        }
        Ok(())
    }

    /// A 401 on a push request after authenticating: with a token, the token lacks the push
    /// scope (distribution answers `insufficient_scope`); a `DENIED` says so itself; with
    /// Basic credentials, they were refused.
    pub(super) async fn push_unauthorized(
        &self,
        call: &Call,
        sent: &Sent,
        envelope: ErrorEnvelope,
    ) -> Error {
        let name = call.subject.name().to_owned();
        let identity = self.identity(&call.registry).await;
        if sent.bearer.is_some() {
            let who = identity
                .map(|i| i.describe())
                .unwrap_or_else(|| "anonymous access".to_owned());
            return Error::PushDenied {
                name,
                reason: format!("the token issued for {who} has no push scope"),
            };
        }
        if envelope.has_code("DENIED") {
            let reason = envelope
                .first_message()
                .unwrap_or("401 Unauthorized")
                .to_owned();
            return Error::PushDenied { name, reason };
        }
        match identity {
            Some(identity) => Error::AuthenticationFailed {
                name,
                identity: identity.describe(),
            },
            None => Error::AuthenticationRequired { name },
        }
    }
}

impl Upload<'_> {
    /// The error of the last attempt, saying which blob failed where.
    fn error(&self, error: Error, attempts: u32) -> Error {
        match error {
            Error::Http {
                url,
                status: StatusCode::PAYLOAD_TOO_LARGE,
                errors,
            } => Error::BlobTooLarge {
                url,
                repository: self.repository.to_owned(),
                digest: self.digest.clone(),
                size: self.size,
                errors,
            },
            e @ (Error::Transport { .. }
            | Error::Interrupted { .. }
            | Error::Timeout { .. }
            | Error::RateLimited { .. }
            | Error::Http { .. }
            | Error::BadResponse { .. }) => Error::UploadFailed {
                repository: self.repository.to_owned(),
                digest: self.digest.clone(),
                size: self.size,
                attempts,
                cause: Box::new(e),
            },
            other => other,
        }
    }
}

impl Source {
    /// Check `body` against `size` and `digest` before anything is sent: all of it when in
    /// memory or no larger than a chunk, the size only for a larger file.
    async fn check(
        body: &BlobBody,
        digest: &Digest,
        size: u64,
        chunk_size: u64,
    ) -> Result<Source, Error> {
        let bad = |reason: String| Error::BadBlob {
            digest: digest.clone(),
            reason,
        };
        let read_error = |path: &Path, source| Error::BlobRead {
            path: path.to_owned(),
            digest: digest.clone(),
            source,
        };
        let bytes = match body {
            BlobBody::Bytes(bytes) => bytes.clone(),
            BlobBody::File(path) => {
                let len = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| read_error(path, e))?
                    .len();
                if len != size {
                    return Err(bad(format!(
                        "{} is {len} bytes, not {size}",
                        path.display()
                    )));
                }
                if size > chunk_size {
                    return Ok(Source::File(path.clone()));
                }
                Bytes::from(
                    tokio::fs::read(path)
                        .await
                        .map_err(|e| read_error(path, e))?,
                )
            }
        };
        if bytes.len() as u64 != size {
            return Err(bad(format!(
                "the body is {} bytes, not {size}",
                bytes.len()
            )));
        }
        digest
            .verify(&bytes)
            .map_err(|actual| bad(format!("the body's digest is {actual}")))?;
        Ok(Source::Whole(bytes))
    }
}

/// A blob file read in pieces and hashed on the way, on the blocking pool.
struct FileReader {
    path: PathBuf,
    digest: Digest,
    /// Taken while a read runs on the blocking pool.
    state: Option<(std::fs::File, Hasher)>,
}

impl FileReader {
    async fn open(path: &Path, digest: &Digest) -> Result<FileReader, Error> {
        let owned = path.to_owned();
        let file = tokio::task::spawn_blocking(move || std::fs::File::open(owned))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|source| Error::BlobRead {
                path: path.to_owned(),
                digest: digest.clone(),
                source,
            })?;
        Ok(FileReader {
            path: path.to_owned(),
            digest: digest.clone(),
            state: Some((file, digest.hasher())),
        })
    }

    /// The next `len` bytes; fewer is an error (the file changed since its size was checked).
    async fn read(&mut self, len: usize) -> Result<Bytes, Error> {
        let (mut file, mut hasher) = self.state.take().expect("no read in flight");
        let (file, hasher, read) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; len];
            let read = file.read_exact(&mut buf).map(|()| {
                hasher.update(&buf);
                Bytes::from(buf)
            });
            (file, hasher, read)
        })
        .await
        .map_err(|e| self.read_error(std::io::Error::other(e)))?;
        self.state = Some((file, hasher));
        read.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => self.bad("the file became shorter while read"),
            _ => self.read_error(e),
        })
    }

    /// Whether what was read is the whole file and hashes to the digest.
    async fn finish(mut self) -> Result<(), Error> {
        let (mut file, hasher) = self.state.take().expect("no read in flight");
        let more = tokio::task::spawn_blocking(move || file.read(&mut [0]))
            .await
            .map_err(|e| self.read_error(std::io::Error::other(e)))?
            .map_err(|e| self.read_error(e))?;
        if more > 0 {
            return Err(self.bad("the file became longer while read"));
        }
        let actual = hasher.finish();
        if actual != self.digest {
            return Err(self.bad(&format!("the file's digest is {actual}")));
        }
        Ok(())
    }

    fn bad(&self, reason: &str) -> Error {
        Error::BadBlob {
            digest: self.digest.clone(),
            reason: format!("{}: {reason}", self.path.display()),
        }
    }

    fn read_error(&self, source: std::io::Error) -> Error {
        Error::BlobRead {
            path: self.path.clone(),
            digest: self.digest.clone(),
            source,
        }
    }
}

/// The upload session URL in a 202's `Location`, resolved against the URL of the request
/// (`url`); `fallback` when there is none (a chunk's answer, from a lax registry).
fn session_location(response: &Response, url: &str, fallback: Option<&Url>) -> Result<Url, Error> {
    let bad = |reason: String| Error::BadResponse {
        url: url.to_owned(),
        reason,
    };
    let Some(location) = header(response, LOCATION.as_str()) else {
        return match fallback {
            Some(previous) => Ok(previous.clone()),
            None => Err(bad(
                "202 Accepted without a Location for the upload".to_owned()
            )),
        };
    };
    resolve_location(response.url(), &location).map_err(bad)
}

/// `location` (absolute, or relative to `base`) as an http(s) URL.
fn resolve_location(base: &Url, location: &str) -> Result<Url, String> {
    let url = base
        .join(location)
        .map_err(|e| format!("upload Location {location:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "upload Location {location:?} is not an http(s) URL"
        ));
    }
    Ok(url)
}

/// `location` with `digest=<digest>` added to its query (which it may have already).
fn with_digest(location: &Url, digest: &Digest) -> Url {
    let mut url = location.clone();
    url.query_pairs_mut()
        .append_pair("digest", &digest.to_string());
    url
}

/// The `host[:port]` of `url` (IPv6 in brackets), as `Call::host` holds it.
fn host_port(url: &Url) -> String {
    let host = match url.host() {
        Some(url::Host::Ipv6(address)) => format!("[{address}]"),
        Some(host) => host.to_string(),
        None => String::new(),
    };
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

/// The path and query of `url`, as `Call::path` holds them.
fn path_and_query(url: &Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    }
}

/// A chunk's `Content-Range`: `<first>-<last>`, inclusive and without a unit, as the
/// distribution spec has it (not RFC 9110's `bytes first-last/total`).
fn content_range(first: u64, last: u64) -> String {
    format!("{first}-{last}")
}

/// The last offset of a chunk answer's `Range: 0-<last>` (`bytes=0-<last>` accepted too).
fn parse_range(value: &str) -> Option<u64> {
    let value = value.trim();
    let value = value.strip_prefix("bytes=").unwrap_or(value);
    let (first, last) = value.split_once('-')?;
    (first.trim() == "0").then_some(())?;
    last.trim().parse().ok()
}

/// The inclusive (first, last) offsets of the chunks of a blob of `size` bytes.
fn chunks(size: u64, chunk_size: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..size)
        .step_by(chunk_size.max(1) as usize)
        .map(move |first| (first, (first + chunk_size).min(size) - 1))
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn locations() {
        let base = Url::parse("http://127.0.0.1:5000/v2/app/x/blobs/uploads/").unwrap();
        let cases = [
            (
                "/v2/app/x/blobs/uploads/u1?_state=abc%3D",
                Ok("http://127.0.0.1:5000/v2/app/x/blobs/uploads/u1?_state=abc%3D"),
            ),
            (
                "http://127.0.0.1:5000/v2/app/x/blobs/uploads/u2",
                Ok("http://127.0.0.1:5000/v2/app/x/blobs/uploads/u2"),
            ),
            (
                "https://uploads.example/session/3?sig=x",
                Ok("https://uploads.example/session/3?sig=x"),
            ),
            ("u4", Ok("http://127.0.0.1:5000/v2/app/x/blobs/uploads/u4")),
            ("ftp://x/y", Err("not an http(s) URL")),
            ("http://[::1", Err("upload Location")),
        ];
        for (location, want) in cases {
            match (resolve_location(&base, location), want) {
                (Ok(url), Ok(want)) => assert_eq!(url.as_str(), want, "{location}"),
                (Err(e), Err(want)) => assert!(e.contains(want), "{location}: {e}"),
                (got, want) => panic!("{location}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn digest_query() {
        let digest: Digest = D.parse().unwrap();
        let cases = [
            (
                "http://r/v2/a/blobs/uploads/u",
                format!(
                    "http://r/v2/a/blobs/uploads/u?digest=sha256%3A{}",
                    digest.hex()
                ),
            ),
            (
                "http://r/v2/a/blobs/uploads/u?_state=s%2B1",
                format!(
                    "http://r/v2/a/blobs/uploads/u?_state=s%2B1&digest=sha256%3A{}",
                    digest.hex()
                ),
            ),
        ];
        for (location, want) in cases {
            let url = with_digest(&Url::parse(location).unwrap(), &digest);
            assert_eq!(url.as_str(), want);
            assert_eq!(
                url.query_pairs().find(|(k, _)| k == "digest").unwrap().1,
                D,
                "{location}"
            );
        }
    }

    #[test]
    fn hosts_and_paths() {
        let cases = [
            (
                "http://127.0.0.1:5000/v2/a?x=1",
                "127.0.0.1:5000",
                "/v2/a?x=1",
            ),
            ("https://r.example/v2/a/b", "r.example", "/v2/a/b"),
            ("http://[::1]:5000/v2/", "[::1]:5000", "/v2/"),
        ];
        for (url, host, path) in cases {
            let url = Url::parse(url).unwrap();
            assert_eq!(
                (host_port(&url).as_str(), path_and_query(&url).as_str()),
                (host, path)
            );
        }
    }

    #[test]
    fn chunk_ranges() {
        // size, chunk size, chunks
        type Case = (u64, u64, &'static [(u64, u64)]);
        let cases: [Case; 5] = [
            (10, 4, &[(0, 3), (4, 7), (8, 9)]),
            (8, 4, &[(0, 3), (4, 7)]),
            (3, 4, &[(0, 2)]),
            (1, 1, &[(0, 0)]),
            (0, 4, &[]),
        ];
        for (size, chunk, want) in cases {
            let got: Vec<_> = chunks(size, chunk).collect();
            assert_eq!(got, want, "{size} in {chunk}");
        }
        assert_eq!(content_range(0, 65535), "0-65535");
        assert_eq!(content_range(65536, 131071), "65536-131071");
    }

    #[test]
    fn range_answers() {
        let cases = [
            ("0-65535", Some(65535)),
            ("bytes=0-9", Some(9)),
            (" 0-0 ", Some(0)),
            ("5-9", None),
            ("0-", None),
            ("", None),
        ];
        for (value, want) in cases {
            assert_eq!(parse_range(value), want, "{value:?}");
        }
    }
}
