//! The [`Client`]: one request attempt that picks the URL scheme, authenticates and maps
//! failures to [`Error`], wrapped in the crate's [`RetryPolicy`] (mirrors get one attempt
//! each); and the pull operations built on it. How a request is authenticated (Basic, Bearer
//! tokens per (host, scope)) is in [`token`]; the push operations (blob uploads, mounts,
//! manifests: the same attempt, with a method, a body and the push scope, never via a
//! mirror) are in [`push`].
//!
//! Endpoints (distribution-spec "Pull"): `GET /v2/` (ping), `GET /v2/<name>/manifests/<ref>`,
//! `GET /v2/<name>/blobs/<digest>` (with `Range: bytes=…`, answered 206 with
//! `Content-Range: bytes start-end/total`, or 200 by registries that ignore Range). Blob GETs
//! are often redirected to storage on another host; reqwest follows and drops
//! `Authorization` when the host (or port) changes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderName, HeaderValue,
    RANGE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};

use crate::oci::media::{DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED_MANIFEST, MANIFEST_ACCEPT};
use crate::oci::{Digest, schema1};
use crate::retry::{self, RetryPolicy, Verdict};

use super::auth::{self, Scheme, Token};
use super::credentials::{Identity, Secret};
use super::errors::{self, Error, ErrorEnvelope, Subject};
use super::{BlobStream, ClientConfig, ManifestResponse};

mod push;
mod token;

/// Registries must accept manifests of at least 4 MiB (distribution-spec); refuse far more.
const MANIFEST_MAX: u64 = 8 << 20;
/// Error bodies and token responses are small; read no more of them.
const SMALL_BODY_MAX: u64 = 1 << 20;
const OAUTH_CLIENT_ID: &str = "imagefs";
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// The API host of `registry`: Docker Hub's names map to `registry-1.docker.io`.
pub fn api_host(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

/// Whether `host` (`name[:port]`, `[v6][:port]`) is a loopback address: such registries may
/// be plain http without being told (Docker's rule: `localhost`, 127.0.0.0/8, `::1`).
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((address, _)) => address,
            None => return false,
        }
    } else {
        host.split(':').next().unwrap_or(host)
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
        || (host.starts_with('[') && name.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback()))
}

/// A distribution v2 client. Cheap to clone; clones share connections, tokens and what was
/// learned about each host.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: ClientConfig,
    /// `config.max_retries` retries, while the first attempt is younger than `config.timeout`.
    retry: RetryPolicy,
    manifest_accept: HeaderValue,
    // The std mutexes below guard small maps, are held for a lookup or an insert and never
    // across an `.await`.
    /// Host → scheme found by probing a loopback registry.
    schemes: Mutex<HashMap<String, UrlScheme>>,
    /// Host → how it asked to be authenticated (its last 401), so that later requests
    /// authenticate up front instead of collecting a 401 each.
    challenges: Mutex<HashMap<String, Scheme>>,
    /// (host, scope) → token slot. The slot's async mutex is held across the token fetch on
    /// purpose: it makes concurrent requests for the same scope wait for one fetch.
    tokens: Mutex<HashMap<(String, String), TokenSlot>>,
    /// Registry → identity, looked up once (the docker config may run a helper).
    identities: Mutex<HashMap<String, Option<Identity>>>,
}

/// The cached token of one (host, scope), if any.
type TokenSlot = Arc<tokio::sync::Mutex<Option<Token>>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UrlScheme {
    Https,
    Http,
}

impl UrlScheme {
    fn as_str(self) -> &'static str {
        match self {
            UrlScheme::Https => "https",
            UrlScheme::Http => "http",
        }
    }
}

/// One registry API request.
#[derive(Clone)]
struct Call {
    /// As in `Reference::registry()`: the key for credentials.
    registry: String,
    host: String,
    /// The scheme, when fixed by configuration (a mirror's URL) rather than by the defaults.
    scheme: Option<UrlScheme>,
    /// The token scope, space-separated scopes as in a challenge: `repository:NAME:pull` for
    /// a pull, `repository:NAME:pull,push` (and `repository:FROM:pull` for a mount) for a
    /// push; `None` for the API root.
    scope: Option<String>,
    method: Method,
    /// From `/v2/` on, query included.
    path: String,
    accept: Option<HeaderValue>,
    range: Option<String>,
    /// More headers (a push's `Content-Type`, `Content-Range`).
    headers: Vec<(HeaderName, HeaderValue)>,
    /// A push's body: `Bytes`, so that another attempt sends it again without a copy.
    body: Option<Bytes>,
    subject: Subject,
}

impl Call {
    /// Whether it changes the registry's content (a push): its refusals are push errors.
    fn writes(&self) -> bool {
        !matches!(self.method, Method::GET | Method::HEAD)
    }

    /// Whether the answer depends on what a tag points to now (not content-addressed).
    fn resolves_a_tag(&self) -> bool {
        match &self.subject {
            Subject::Manifest { reference, .. } => reference.parse::<Digest>().is_err(),
            Subject::Blob { .. } => false,
            _ => self.path.contains("/tags/list"),
        }
    }
}

/// A whole response body and the headers that describe it.
struct Whole {
    bytes: Bytes,
    url: String,
    content_type: Option<String>,
    /// `Docker-Content-Digest`: the registry's digest of a manifest.
    content_digest: Option<String>,
}

/// What a request carried, to know what to drop on a 401.
struct Sent {
    header: Option<HeaderValue>,
    bearer: Option<Secret>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The system bundle Debian and Ubuntu generate (`update-ca-certificates`) from the same
/// sources as the hashed `/etc/ssl/certs` directory.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The system's root certificates. Left to itself, reqwest (rustls-native-certs) reads the
/// bundle *and* every file of the hashed directory — some 300 files, most of a cold start's
/// time before the first request. Where the system bundle exists and `SSL_CERT_FILE` /
/// `SSL_CERT_DIR` name nothing else than it and its directory, the bundle alone is read (with
/// the same crate); otherwise reqwest's own loading applies, honouring those variables.
fn system_roots(builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
    let is = |var: &str, default: &str| {
        std::env::var_os(var).is_none_or(|v| v.is_empty() || v == std::ffi::OsStr::new(default))
    };
    if !is("SSL_CERT_FILE", SYSTEM_BUNDLE) || !is("SSL_CERT_DIR", "/etc/ssl/certs") {
        return builder;
    }
    let bundle = std::path::Path::new(SYSTEM_BUNDLE);
    if !bundle.is_file() {
        return builder;
    }
    let loaded = rustls_native_certs::load_certs_from_paths(Some(bundle), None);
    let certs: Vec<reqwest::Certificate> = loaded
        .certs
        .iter()
        .filter_map(|der| reqwest::Certificate::from_der(der).ok())
        .collect();
    if certs.is_empty() {
        return builder;
    }
    certs
        .into_iter()
        .fold(builder.tls_built_in_root_certs(false), |b, c| {
            b.add_root_certificate(c)
        })
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, Error> {
        let mut builder = reqwest::Client::builder()
            .user_agent(config.user_agent.clone())
            .connect_timeout(config.timeout)
            .read_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::limited(10))
            .danger_accept_invalid_certs(config.insecure_skip_tls_verify);
        builder = system_roots(builder);
        for path in &config.ca_certs {
            let pem = std::fs::read(path).map_err(|source| Error::CaCertRead {
                path: path.clone(),
                source,
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Error::CaCertInvalid {
                    path: path.clone(),
                    reason: errors::cause_chain(&e),
                })?;
            if certs.is_empty() {
                return Err(Error::CaCertInvalid {
                    path: path.clone(),
                    reason: "no PEM certificate in it".to_owned(),
                });
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| Error::ClientSetup {
            reason: errors::cause_chain(&e),
        })?;
        let accept = format!(
            "{MANIFEST_ACCEPT}, {DOCKER_SCHEMA1_SIGNED_MANIFEST}, {DOCKER_SCHEMA1_MANIFEST}"
        );
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                retry: RetryPolicy {
                    attempts: config.max_retries.saturating_add(1),
                    // Against a host that has gone silent (no RST) every attempt waits out the
                    // connect timeout, and a FUSE read must fail within about one timeout, not
                    // five: no retry once the first attempt is older than the timeout.
                    deadline: Some(config.timeout),
                    ..RetryPolicy::default()
                },
                config,
                manifest_accept: HeaderValue::from_str(&accept).expect("media types are ASCII"),
                schemes: Mutex::default(),
                challenges: Mutex::default(),
                tokens: Mutex::default(),
                identities: Mutex::default(),
            }),
        })
    }

    /// `GET /v2/<repository>/manifests/<reference>`, the reference a tag or a digest. The
    /// manifest digest is computed over the body's canonical bytes (for a signed schema 1
    /// manifest, the payload without its signatures: [`crate::oci::schema1`]), as the
    /// registry computes it, and verified against a digest reference and against the
    /// `Docker-Content-Digest` header when there is one (as containerd does). Schema 1 types
    /// are accepted, least preferred, for registries that have nothing else.
    pub async fn manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
    ) -> Result<ManifestResponse, Error> {
        let call = Call {
            registry: registry.to_owned(),
            host: api_host(registry).to_owned(),
            scheme: None,
            scope: auth::pull_scope(Some(repository)),
            method: Method::GET,
            path: format!("/v2/{repository}/manifests/{reference}"),
            accept: Some(self.inner.manifest_accept.clone()),
            range: None,
            headers: Vec::new(),
            body: None,
            subject: Subject::Manifest {
                repository: repository.to_owned(),
                reference: reference.to_owned(),
            },
        };
        let whole = match self.fetch_whole(&call, MANIFEST_MAX).await {
            Ok(v) => v,
            Err(Error::TagNotFound { repository, tag }) => {
                return Err(self
                    .tag_or_repository_missing(registry, repository, tag)
                    .await);
            }
            Err(e) => return Err(e),
        };
        let Whole {
            bytes,
            url,
            content_type,
            content_digest,
        } = whole;
        let canonical = match schema1::canonical_bytes(&bytes) {
            Ok(Cow::Borrowed(_)) => bytes.clone(),
            Ok(Cow::Owned(payload)) => Bytes::from(payload),
            Err(e) => {
                return Err(Error::BadResponse {
                    url,
                    reason: crate::oci::ManifestError::Schema1(e).to_string(),
                });
            }
        };
        // A header that is not a digest we know (another algorithm) cannot be checked.
        let header = content_digest.and_then(|d| d.parse::<Digest>().ok());
        for expected in reference.parse::<Digest>().ok().into_iter().chain(header) {
            expected
                .verify(&canonical)
                .map_err(|actual| Error::DigestMismatch {
                    url: url.clone(),
                    expected,
                    actual,
                })?;
        }
        Ok(ManifestResponse {
            digest: Digest::sha256(&canonical),
            bytes,
            canonical,
            content_type,
        })
    }

    /// Distribution answers MANIFEST_UNKNOWN for a tag of a repository that does not exist;
    /// the tag list tells the two apart (NAME_UNKNOWN), so the user learns which name is wrong.
    async fn tag_or_repository_missing(
        &self,
        registry: &str,
        repository: String,
        tag: String,
    ) -> Error {
        let call = Call {
            registry: registry.to_owned(),
            host: api_host(registry).to_owned(),
            scheme: None,
            scope: auth::pull_scope(Some(&repository)),
            method: Method::GET,
            path: format!("/v2/{repository}/tags/list?n=1"),
            accept: None,
            range: None,
            headers: Vec::new(),
            body: None,
            subject: Subject::Other {
                name: repository.clone(),
            },
        };
        match self.fetch_whole(&call, 1 << 20).await {
            Err(e @ Error::RepositoryNotFound { .. }) => e,
            _ => Error::TagNotFound { repository, tag },
        }
    }

    /// A small blob (a config), whole, at most `max_bytes`, verified against `digest`.
    pub async fn blob_bytes(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        max_bytes: u64,
    ) -> Result<Bytes, Error> {
        let call = self.blob_call(registry, repository, digest, None);
        let Whole { bytes, url, .. } = self.fetch_whole(&call, max_bytes).await?;
        digest
            .verify(&bytes)
            .map_err(|actual| Error::DigestMismatch {
                url,
                expected: digest.clone(),
                actual,
            })?;
        Ok(bytes)
    }

    /// A blob body from `offset` (to `end` inclusive when given), unverified: the caller
    /// hashes while streaming. See [`BlobStream::start`] for registries that ignore Range.
    pub async fn blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        offset: u64,
        end: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let range = match (offset, end) {
            (0, None) => None,
            (offset, None) => Some(format!("bytes={offset}-")),
            (offset, Some(end)) => Some(format!("bytes={offset}-{end}")),
        };
        let call = self.blob_call(registry, repository, digest, range);
        let (response, url) = self.send(&call).await?;
        let (start, total) = match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let (first, _, total) = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range)
                    .ok_or_else(|| Error::BadResponse {
                        url: url.clone(),
                        reason: "206 Partial Content without a valid Content-Range".to_owned(),
                    })?;
                if first != offset {
                    return Err(Error::BadResponse {
                        url,
                        reason: format!("asked for bytes from {offset}, got bytes from {first}"),
                    });
                }
                (first, total)
            }
            StatusCode::OK => (0, response.content_length()),
            other => {
                return Err(Error::BadResponse {
                    url,
                    reason: format!("unexpected status {other} for a blob"),
                });
            }
        };
        let timeout = self.inner.config.timeout;
        let body = response
            .bytes_stream()
            .map(move |chunk| chunk.map_err(|e| errors::from_reqwest(&url, &e, timeout)));
        Ok(BlobStream {
            start,
            total,
            body: Box::pin(body),
        })
    }

    /// `GET /v2/`: the registry is reachable, speaks v2, and accepts our credentials (or
    /// needs none).
    pub async fn ping(&self, registry: &str) -> Result<(), Error> {
        let call = Call {
            registry: registry.to_owned(),
            host: api_host(registry).to_owned(),
            scheme: None,
            scope: None,
            method: Method::GET,
            path: "/v2/".to_owned(),
            accept: None,
            range: None,
            headers: Vec::new(),
            body: None,
            subject: Subject::Other {
                name: registry.to_owned(),
            },
        };
        self.send(&call).await.map(drop)
    }

    fn blob_call(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        range: Option<String>,
    ) -> Call {
        Call {
            registry: registry.to_owned(),
            host: api_host(registry).to_owned(),
            scheme: None,
            scope: auth::pull_scope(Some(repository)),
            method: Method::GET,
            path: format!("/v2/{repository}/blobs/{digest}"),
            accept: None,
            range,
            headers: Vec::new(),
            body: None,
            subject: Subject::Blob {
                repository: repository.to_owned(),
                digest: digest.clone(),
            },
        }
    }

    /// A whole small body; a body that breaks off is fetched again like any transient error
    /// (the read is part of the attempt).
    async fn fetch_whole(&self, call: &Call, limit: u64) -> Result<Whole, Error> {
        let timeout = self.inner.config.timeout;
        self.send_then(call, |response: Response, url: String| async move {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let content_type = header(CONTENT_TYPE.as_str());
            let content_digest = header(DOCKER_CONTENT_DIGEST);
            let bytes = read_body(response, &url, limit, timeout).await?;
            Ok(Whole {
                bytes,
                url,
                content_type,
                content_digest,
            })
        })
        .await
    }

    /// [`send_then`](Self::send_then) with nothing more to do than getting the response.
    async fn send(&self, call: &Call) -> Result<(Response, String), Error> {
        self.send_then(call, |response, url| async move { Ok((response, url)) })
            .await
    }

    /// Attempt `call` and then `then` with its response on the mirrors of its registry, in
    /// order, one attempt each, then on the registry itself under the retry policy; the first
    /// success wins. A mirror's failure is logged and skipped; the registry's is the error.
    async fn send_then<T, F, Fut>(&self, call: &Call, then: F) -> Result<T, Error>
    where
        F: Fn(Response, String) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        for m in self
            .inner
            .config
            .mirrors
            .iter()
            .filter(|m| m.registry == call.registry)
            .filter(|m| m.resolve || !call.resolves_a_tag())
        {
            let mut via = call.clone();
            via.host = m.host.clone();
            // Credentials and tokens for a mirror are the mirror's own.
            via.registry = m.host.clone();
            via.scheme = Some(match m.scheme.as_str() {
                "http" => UrlScheme::Http,
                _ => UrlScheme::Https,
            });
            // One attempt per mirror, as containerd does: a dead mirror must not cost the
            // origin's whole retry budget.
            match self.attempt_then(&via, &then).await {
                Ok(ok) => return Ok(ok),
                Err(Failed { error, .. }) => tracing::warn!(
                    mirror = %m.host,
                    registry = %call.registry,
                    "mirror failed, trying the next source: {error}"
                ),
            }
        }
        self.inner
            .retry
            .run(|_| self.attempt_then(call, &then), |f| f.verdict)
            .await
            .map_err(|f| f.error)
    }

    async fn attempt_then<T, F, Fut>(&self, call: &Call, then: &F) -> Result<T, Failed>
    where
        F: Fn(Response, String) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let (response, url) = self.attempt(call).await?;
        Ok(then(response, url).await?)
    }

    /// One attempt at `call` on its host: authenticate (answering a 401 with fresh
    /// credentials once), send, and turn anything but a 2xx (redirects followed) into the
    /// error, said to be transient for connection errors, 429 and 5xx.
    async fn attempt(&self, call: &Call) -> Result<(Response, String), Failed> {
        let scope = call.scope.clone();
        let mut reauthenticated = false;
        loop {
            // A token fetch retries on its own: its failure is final here. A realm that
            // refuses the push scope (403) refuses the push.
            let sent = self
                .authorization(call, scope.as_deref())
                .await
                .map_err(|e| {
                    Failed::permanent(if call.writes() { errors::on_push(e) } else { e })
                })?;
            let (response, url) = self.send_once(call, sent.header.clone()).await?;
            let status = response.status();
            tracing::debug!(%url, %status, "registry response");
            if status.is_success() {
                return Ok((response, url));
            }
            if status == StatusCode::UNAUTHORIZED {
                let challenges: Vec<auth::Challenge> = response
                    .headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(auth::parse_challenges)
                    .collect();
                match auth::choose_scheme(&challenges) {
                    Some(scheme) => {
                        self.lock_challenges().insert(call.host.clone(), scheme);
                    }
                    None if !challenges.is_empty() => {
                        let challenge = response
                            .headers()
                            .get(WWW_AUTHENTICATE)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        return Err(Error::UnsupportedAuth { url, challenge }.into());
                    }
                    None => {}
                }
                if !reauthenticated {
                    reauthenticated = true;
                    if let Some(used) = &sent.bearer {
                        self.forget_token(&call.host, scope.as_deref(), used).await;
                    }
                    continue;
                }
                let envelope = read_envelope(response).await;
                if call.writes() {
                    return Err(self.push_unauthorized(call, &sent, envelope).await.into());
                }
                if envelope.has_code("DENIED") {
                    return Err(errors::from_status(&url, status, envelope, &call.subject).into());
                }
                let name = call.subject.name().to_owned();
                return Err(match self.identity(&call.registry).await {
                    Some(identity) => Error::AuthenticationFailed {
                        name,
                        identity: identity.describe(),
                    },
                    None => Error::AuthenticationRequired { name },
                }
                .into());
            }
            let failed = Failed::status(response, &url, &call.subject).await;
            return Err(if call.writes() {
                Failed {
                    error: errors::on_push(failed.error),
                    ..failed
                }
            } else {
                failed
            });
        }
    }

    /// Send once over the host's scheme; for an unprobed loopback host, https first, then
    /// plain http, remembering what worked.
    async fn send_once(
        &self,
        call: &Call,
        authorization: Option<HeaderValue>,
    ) -> Result<(Response, String), Error> {
        let known = if let Some(scheme) = call.scheme {
            Some(scheme)
        } else if self.inner.config.plain_http {
            Some(UrlScheme::Http)
        } else if !is_loopback(&call.host) {
            Some(UrlScheme::Https)
        } else {
            self.lock_schemes().get(&call.host).copied()
        };
        if let Some(scheme) = known {
            let url = format!("{}://{}{}", scheme.as_str(), call.host, call.path);
            return self
                .request(&url, call, authorization)
                .await
                .map(|r| (r, url));
        }

        let https = format!("https://{}{}", call.host, call.path);
        let https_error = match self.request(&https, call, authorization.clone()).await {
            Ok(response) => {
                self.lock_schemes()
                    .insert(call.host.clone(), UrlScheme::Https);
                return Ok((response, https));
            }
            // A certificate error (its own variant) means the host does speak TLS: plain
            // http would not help.
            Err(Error::Transport { cause, .. }) => cause,
            Err(e) => return Err(e),
        };
        let http = format!("http://{}{}", call.host, call.path);
        match self.request(&http, call, authorization).await {
            Ok(response) => {
                tracing::debug!(host = %call.host, "loopback registry speaks plain http");
                self.lock_schemes()
                    .insert(call.host.clone(), UrlScheme::Http);
                Ok((response, http))
            }
            Err(Error::Transport { cause, .. }) => Err(Error::Transport {
                url: https,
                cause: if cause == https_error {
                    format!("{cause} (over https and plain http)")
                } else {
                    format!("{https_error} (plain http: {cause})")
                },
            }),
            Err(e) => Err(e),
        }
    }

    async fn request(
        &self,
        url: &str,
        call: &Call,
        authorization: Option<HeaderValue>,
    ) -> Result<Response, Error> {
        let mut request = self.inner.http.request(call.method.clone(), url);
        if let Some(accept) = &call.accept {
            request = request.header(ACCEPT, accept.clone());
        }
        if let Some(range) = &call.range {
            request = request.header(RANGE, range.as_str());
        }
        for (name, value) in &call.headers {
            request = request.header(name, value);
        }
        if let Some(body) = &call.body {
            // hyper announces no length for an empty body; some proxies refuse a POST or PUT
            // without one (411 Length Required).
            if body.is_empty() {
                request = request.header(CONTENT_LENGTH, HeaderValue::from_static("0"));
            }
            request = request.body(body.clone());
        }
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        request
            .send()
            .await
            .map_err(|e| errors::from_reqwest(url, &e, self.inner.config.timeout))
    }

    fn lock_schemes(&self) -> std::sync::MutexGuard<'_, HashMap<String, UrlScheme>> {
        self.inner.schemes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_challenges(&self) -> std::sync::MutexGuard<'_, HashMap<String, Scheme>> {
        self.inner
            .challenges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// A failed attempt and what it means for the next one.
struct Failed {
    error: Error,
    verdict: Verdict,
}

impl Failed {
    /// Not worth another attempt, whatever the error says (it was retried already).
    fn permanent(error: Error) -> Failed {
        Failed {
            error,
            verdict: Verdict::Permanent,
        }
    }

    /// The error for a response of a status other than 2xx and 401; transient for 429 and
    /// 5xx, with the wait the registry asked for in `Retry-After` if any.
    async fn status(response: Response, url: &str, subject: &Subject) -> Failed {
        let status = response.status();
        let verdict = if !errors::is_transient_status(status) {
            Verdict::Permanent
        } else {
            match response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::retry_after(v, SystemTime::now()))
            {
                Some(wait) => Verdict::RetryAfter(wait),
                None => Verdict::Transient,
            }
        };
        let envelope = read_envelope(response).await;
        Failed {
            error: errors::from_status(url, status, envelope, subject),
            verdict,
        }
    }
}

impl From<Error> for Failed {
    fn from(error: Error) -> Failed {
        let verdict = if error.is_transient() {
            Verdict::Transient
        } else {
            Verdict::Permanent
        };
        Failed { error, verdict }
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`) → (first, last, total).
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.trim().split_once('-')?;
    let (first, last) = (first.parse::<u64>().ok()?, last.parse::<u64>().ok()?);
    if last < first {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => {
            let t = t.parse::<u64>().ok()?;
            if last >= t {
                return None;
            }
            Some(t)
        }
    };
    Some((first, last, total))
}

/// Read a whole body, at most `limit` bytes.
async fn read_body(
    mut response: Response,
    url: &str,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, Error> {
    let too_large = || Error::TooLarge {
        url: url.to_owned(),
        limit,
    };
    if response.content_length().is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| errors::from_reqwest(url, &e, timeout))?
    {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The error envelope of a failed response; empty if the body is not one or cannot be read.
async fn read_envelope(response: Response) -> ErrorEnvelope {
    let url = response.url().to_string();
    match read_body(response, &url, SMALL_BODY_MAX, Duration::ZERO).await {
        Ok(body) => ErrorEnvelope::parse(&body),
        Err(_) => ErrorEnvelope::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        let cases = [
            ("localhost", true),
            ("localhost:5000", true),
            ("LOCALHOST:5000", true),
            ("127.0.0.1", true),
            ("127.0.0.1:5000", true),
            ("127.1.2.3:80", true),
            ("[::1]", true),
            ("[::1]:5000", true),
            ("[::2]:5000", false),
            ("::1", false),
            ("128.0.0.1:5000", false),
            ("10.0.0.1:5000", false),
            ("localhost.example.com", false),
            ("mylocalhost:5000", false),
            ("registry-1.docker.io", false),
            ("127.0.0.1.nip.io", false),
            ("[::1", false),
        ];
        for (host, want) in cases {
            assert_eq!(is_loopback(host), want, "{host}");
        }
    }

    #[test]
    fn api_hosts() {
        let cases = [
            ("docker.io", "registry-1.docker.io"),
            ("index.docker.io", "registry-1.docker.io"),
            ("ghcr.io", "ghcr.io"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
        ];
        for (registry, want) in cases {
            assert_eq!(api_host(registry), want, "{registry}");
        }
    }

    #[test]
    fn content_ranges() {
        let cases = [
            ("bytes 0-99/100", Some((0, 99, Some(100)))),
            ("bytes 10-19/*", Some((10, 19, None))),
            (" bytes  5-5/6 ", Some((5, 5, Some(6)))),
            ("bytes 10-9/100", None),
            ("bytes 0-100/100", None),
            ("bytes */100", None),
            ("items 0-1/2", None),
            ("bytes 0-1", None),
            ("", None),
        ];
        for (value, want) in cases {
            assert_eq!(parse_content_range(value), want, "{value:?}");
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let config = ClientConfig {
            credentials: Some(super::super::Credentials::new("bob", "pa55-w0rd-xyz")),
            ..ClientConfig::default()
        };
        let client = Client::new(config.clone()).unwrap();
        for shown in [
            format!("{config:?}"),
            format!("{client:?}"),
            format!("{client:#?}"),
            format!(
                "{:?}",
                token::basic_header("bob", &Secret::new("pa55-w0rd-xyz"))
            ),
        ] {
            assert!(!shown.contains("pa55-w0rd-xyz"), "{shown}");
            assert!(!shown.contains("Ym9iOnBhNTUtdzByZC14eXo"), "{shown}");
        }
    }
}
