//! The registry client's [`Error`], and the distribution spec's error envelope
//! (`{"errors":[{"code","message","detail"}]}`, spec "Error Codes") mapped onto it, so that a
//! user reads "tag 1.2 not found in repository app" rather than "404". A push's refusals have
//! their own variants ([`Error::PushDenied`], [`Error::BlobTooLarge`],
//! [`Error::ManifestRefused`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;

use crate::oci::Digest;

use super::credentials::CredentialsError;

/// The body of a registry error response.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ErrorEnvelope {
    #[serde(default)]
    pub errors: Vec<RegistryError>,
}

/// One entry of the envelope. `code` is one of the spec's (`MANIFEST_UNKNOWN`, `DENIED`, …)
/// or a registry's own.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RegistryError {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub detail: Option<serde_json::Value>,
}

impl ErrorEnvelope {
    /// Parse an error body; anything that is not an envelope (an HTML page from a proxy, an
    /// empty body) is an empty envelope.
    pub fn parse(body: &[u8]) -> ErrorEnvelope {
        serde_json::from_slice(body).unwrap_or_default()
    }

    pub fn has_code(&self, code: &str) -> bool {
        self.errors
            .iter()
            .any(|e| e.code.eq_ignore_ascii_case(code))
    }

    /// The first non-empty message, for errors that quote the registry.
    pub(crate) fn first_message(&self) -> Option<&str> {
        self.errors
            .iter()
            .map(|e| e.message.trim())
            .find(|m| !m.is_empty())
    }
}

/// `: CODE: message; CODE2: message2`, or nothing for an empty envelope.
impl fmt::Display for ErrorEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            match (e.code.is_empty(), e.message.trim().is_empty()) {
                (false, false) => write!(f, "{}: {}", e.code, e.message.trim())?,
                (false, true) => f.write_str(&e.code)?,
                (true, _) => f.write_str(e.message.trim())?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read CA certificate {path}")]
    CaCertRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid CA certificate {path}: {reason}")]
    CaCertInvalid { path: PathBuf, reason: String },
    #[error("cannot set up the HTTP client: {reason}")]
    ClientSetup { reason: String },
    #[error("invalid registry URL {url}: {reason}")]
    Url { url: String, reason: String },

    /// The request never got a response (DNS, connect, TLS, reset, or the body broke off).
    #[error("cannot reach {url}: {cause}")]
    Transport { url: String, cause: String },
    #[error(
        "certificate verify failed for {url}: {cause}: pass --ca-cert FILE with the CA that \
         signed the registry's certificate"
    )]
    Certificate { url: String, cause: String },
    /// The response started, then its body broke off.
    #[error("transfer from {url} broke off: {cause}")]
    Interrupted { url: String, cause: String },
    #[error("timed out after {after:?} talking to {url}: the registry did not answer in time")]
    Timeout { url: String, after: Duration },

    #[error("tag {tag} not found in repository {repository}")]
    TagNotFound { repository: String, tag: String },
    #[error("manifest {digest} not found in repository {repository}")]
    ManifestNotFound { repository: String, digest: String },
    #[error("blob {digest} not found in repository {repository}")]
    BlobNotFound { repository: String, digest: Digest },
    #[error("repository {repository} not found")]
    RepositoryNotFound { repository: String },
    #[error(
        "authentication required for {name}: pass --username and --password-stdin, or docker login"
    )]
    AuthenticationRequired { name: String },
    #[error(
        "authentication failed for {name} with {identity}: check the credentials \
         (--username and --password-stdin, or docker login)"
    )]
    AuthenticationFailed { name: String, identity: String },
    #[error("access denied to {name}: {message}")]
    Denied { name: String, message: String },
    #[error("registry {url} is rate limiting requests{errors}: try again later")]
    RateLimited { url: String, errors: ErrorEnvelope },
    #[error("registry error on {url}: {status}{errors}")]
    Http {
        url: String,
        status: StatusCode,
        errors: ErrorEnvelope,
    },

    #[error("unsupported authentication challenge from {url}: {challenge}")]
    UnsupportedAuth { url: String, challenge: String },
    #[error("invalid token response from {url}: {reason}")]
    Token { url: String, reason: String },
    #[error("invalid response from {url}: {reason}")]
    BadResponse { url: String, reason: String },
    #[error("content of {url} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        url: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{url} is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),

    // Pushes.
    /// A push refused for want of rights (401 with a token, 403, `DENIED`).
    #[error(
        "push access to {name} denied: {reason}: use credentials with push access to it \
         (--username and --password-stdin, or docker login)"
    )]
    PushDenied { name: String, reason: String },
    /// 413 Payload Too Large on an upload request.
    #[error(
        "registry {url} refused blob {digest} ({size} bytes) for {repository} as too large \
         (413 Payload Too Large){errors}: the registry or a proxy in front of it limits request \
         bodies; upload in smaller chunks or raise that limit"
    )]
    BlobTooLarge {
        url: String,
        repository: String,
        digest: Digest,
        size: u64,
        errors: ErrorEnvelope,
    },
    /// An upload that failed on every attempt; `cause` is the last attempt's error (it names
    /// the URL).
    #[error(
        "upload of blob {digest} ({size} bytes) to {repository} failed after {attempts} \
         attempt(s): {cause}"
    )]
    UploadFailed {
        repository: String,
        digest: Digest,
        size: u64,
        attempts: u32,
        cause: Box<Error>,
    },
    /// The blob to push is not what its descriptor says; nothing was sent (or, for a file that
    /// changed while being read, the upload was not completed).
    #[error("blob {digest} to push: {reason}")]
    BadBlob { digest: Digest, reason: String },
    #[error("manifest {reference} to push to {repository}: {reason}")]
    BadManifest {
        repository: String,
        reference: String,
        reason: String,
    },
    #[error("cannot read {path}, the body of blob {digest} to push")]
    BlobRead {
        path: PathBuf,
        digest: Digest,
        source: std::io::Error,
    },
    /// A manifest PUT answered with a client error (400 `MANIFEST_INVALID`,
    /// `MANIFEST_BLOB_UNKNOWN`, `TAG_INVALID`, …).
    #[error(
        "registry refused manifest {reference} for {repository}: {status}{errors}{}",
        manifest_refusal_hint(errors)
    )]
    ManifestRefused {
        repository: String,
        reference: String,
        status: StatusCode,
        errors: ErrorEnvelope,
    },
}

/// What to do about a refused manifest, when the registry said why.
fn manifest_refusal_hint(errors: &ErrorEnvelope) -> &'static str {
    if errors.has_code("MANIFEST_BLOB_UNKNOWN") || errors.has_code("BLOB_UNKNOWN") {
        ": push the blobs it references (layers, config) first"
    } else {
        ""
    }
}

/// A refusal of a push request as a push error: `Denied` becomes [`Error::PushDenied`].
pub(crate) fn on_push(error: Error) -> Error {
    match error {
        Error::Denied { name, message } => Error::PushDenied {
            name,
            reason: message,
        },
        other => other,
    }
}

impl Error {
    /// Whether a later attempt may succeed: the network or the registry had a bad moment.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. }
            | Error::Interrupted { .. }
            | Error::Timeout { .. }
            | Error::RateLimited { .. } => true,
            Error::Http { status, .. } => is_transient_status(*status),
            _ => false,
        }
    }
}

/// 5xx other than "not implemented" / "version not supported", and 429, are worth a retry.
pub(crate) fn is_transient_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error()
            && status != StatusCode::NOT_IMPLEMENTED
            && status != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
}

/// What a request was about, so that an error can name it.
#[derive(Clone, Debug)]
pub(crate) enum Subject {
    /// `reference` is a tag or a digest.
    Manifest {
        repository: String,
        reference: String,
    },
    Blob {
        repository: String,
        digest: Digest,
    },
    /// The API root or the token realm of `name` (a registry or a repository).
    Other {
        name: String,
    },
}

impl Subject {
    /// The repository (or registry) a message should name.
    pub(crate) fn name(&self) -> &str {
        match self {
            Subject::Manifest { repository, .. } | Subject::Blob { repository, .. } => repository,
            Subject::Other { name } => name,
        }
    }
}

/// The error for a final non-success, non-401 response.
pub(crate) fn from_status(
    url: &str,
    status: StatusCode,
    errors: ErrorEnvelope,
    subject: &Subject,
) -> Error {
    let name = subject.name().to_owned();
    // Codes first: registries answer NAME_UNKNOWN with 404, but also with 400 or 403.
    if errors.has_code("NAME_UNKNOWN") {
        return Error::RepositoryNotFound { repository: name };
    }
    if status == StatusCode::FORBIDDEN || errors.has_code("DENIED") {
        let message = errors
            .first_message()
            .map(str::to_owned)
            .unwrap_or_else(|| status.to_string());
        return Error::Denied { name, message };
    }
    if status == StatusCode::TOO_MANY_REQUESTS || errors.has_code("TOOMANYREQUESTS") {
        return Error::RateLimited {
            url: url.to_owned(),
            errors,
        };
    }
    let not_found = status == StatusCode::NOT_FOUND;
    match subject {
        Subject::Manifest {
            repository,
            reference,
        } if not_found || errors.has_code("MANIFEST_UNKNOWN") => {
            if reference.contains(':') {
                Error::ManifestNotFound {
                    repository: repository.clone(),
                    digest: reference.clone(),
                }
            } else {
                Error::TagNotFound {
                    repository: repository.clone(),
                    tag: reference.clone(),
                }
            }
        }
        Subject::Blob { repository, digest } if not_found || errors.has_code("BLOB_UNKNOWN") => {
            Error::BlobNotFound {
                repository: repository.clone(),
                digest: digest.clone(),
            }
        }
        _ => Error::Http {
            url: url.to_owned(),
            status,
            errors,
        },
    }
}

/// A transport error from reqwest as our error: the URL, then the cause chain without
/// repetition; certificate problems get their own variant (they are not transient).
pub(crate) fn from_reqwest(url: &str, err: &reqwest::Error, timeout: Duration) -> Error {
    if err.is_timeout() {
        return Error::Timeout {
            url: url.to_owned(),
            after: timeout,
        };
    }
    let cause = cause_chain(err);
    if err.is_body() || err.is_decode() {
        Error::Interrupted {
            url: url.to_owned(),
            cause,
        }
    } else if is_certificate_problem(&cause) {
        Error::Certificate {
            url: url.to_owned(),
            cause,
        }
    } else {
        Error::Transport {
            url: url.to_owned(),
            cause,
        }
    }
}

/// The sources of `err` joined with `: `, skipping reqwest's own top line (it repeats the
/// URL) and hyper's content-free wrappers.
pub(crate) fn cause_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = err.source();
    while let Some(e) = current {
        let text = e.to_string();
        let noise = matches!(
            text.as_str(),
            "client error (Connect)"
                | "client error (SendRequest)"
                | "request or response body error"
                | "error decoding response body"
        );
        if !noise && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    if parts.is_empty() {
        // Nothing below: the top line is all there is (without its URL).
        let top = err.to_string();
        let top = match top.find(" (") {
            Some(i) if top.contains("for url") => top[..i].to_owned(),
            _ => top,
        };
        parts.push(top);
    }
    parts.join(": ")
}

pub(crate) fn is_certificate_problem(cause: &str) -> bool {
    let lower = cause.to_ascii_lowercase();
    lower.contains("invalid peer certificate") || lower.contains("certificate verify failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn envelope(code: &str, message: &str) -> ErrorEnvelope {
        ErrorEnvelope::parse(
            serde_json::json!({"errors": [{"code": code, "message": message, "detail": {"x": 1}}]})
                .to_string()
                .as_bytes(),
        )
    }

    #[test]
    fn envelope_parsing() {
        let e = envelope("MANIFEST_UNKNOWN", "manifest unknown");
        assert_eq!(e.errors.len(), 1);
        assert_eq!(e.to_string(), ": MANIFEST_UNKNOWN: manifest unknown");
        assert!(e.has_code("manifest_unknown"));
        assert_eq!(
            ErrorEnvelope::parse(b"<html>bad gateway</html>"),
            ErrorEnvelope::default()
        );
        assert_eq!(ErrorEnvelope::parse(b""), ErrorEnvelope::default());
        let two = ErrorEnvelope::parse(
            br#"{"errors":[{"code":"A","message":"one"},{"code":"B"},{"message":"three"}]}"#,
        );
        assert_eq!(two.to_string(), ": A: one; B; three");
    }

    #[test]
    fn status_and_envelope_mapping() {
        let tag = Subject::Manifest {
            repository: "library/app".into(),
            reference: "1.2".into(),
        };
        let by_digest = Subject::Manifest {
            repository: "library/app".into(),
            reference: D.into(),
        };
        let blob = Subject::Blob {
            repository: "library/app".into(),
            digest: D.parse().unwrap(),
        };
        let root = Subject::Other {
            name: "r.example".into(),
        };
        let url = "https://r.example/v2/x";
        let none = ErrorEnvelope::default;
        let cases: Vec<(u16, ErrorEnvelope, &Subject, String)> = vec![
            (
                404,
                envelope("MANIFEST_UNKNOWN", "manifest unknown"),
                &tag,
                "tag 1.2 not found in repository library/app".into(),
            ),
            (
                404,
                none(),
                &tag,
                "tag 1.2 not found in repository library/app".into(),
            ),
            (
                404,
                envelope("MANIFEST_UNKNOWN", "manifest unknown"),
                &by_digest,
                format!("manifest {D} not found in repository library/app"),
            ),
            (
                404,
                envelope("NAME_UNKNOWN", "repository name not known to registry"),
                &tag,
                "repository library/app not found".into(),
            ),
            (
                404,
                envelope("BLOB_UNKNOWN", "blob unknown to registry"),
                &blob,
                format!("blob {D} not found in repository library/app"),
            ),
            (
                404,
                none(),
                &blob,
                format!("blob {D} not found in repository library/app"),
            ),
            (
                403,
                envelope("DENIED", "requested access to the resource is denied"),
                &tag,
                "access denied to library/app: requested access to the resource is denied".into(),
            ),
            (
                403,
                none(),
                &blob,
                "access denied to library/app: 403 Forbidden".into(),
            ),
            (
                401,
                envelope("DENIED", "no"),
                &tag,
                "access denied to library/app: no".into(),
            ),
            (
                429,
                envelope("TOOMANYREQUESTS", "you have reached your pull rate limit"),
                &tag,
                format!(
                    "registry {url} is rate limiting requests: TOOMANYREQUESTS: you have \
                     reached your pull rate limit: try again later"
                ),
            ),
            (
                500,
                envelope("UNKNOWN", "unknown error"),
                &tag,
                format!(
                    "registry error on {url}: 500 Internal Server Error: UNKNOWN: unknown error"
                ),
            ),
            (
                400,
                envelope("MANIFEST_INVALID", "manifest invalid"),
                &root,
                format!(
                    "registry error on {url}: 400 Bad Request: MANIFEST_INVALID: manifest invalid"
                ),
            ),
            (
                502,
                none(),
                &root,
                format!("registry error on {url}: 502 Bad Gateway"),
            ),
            (
                404,
                none(),
                &root,
                format!("registry error on {url}: 404 Not Found"),
            ),
        ];
        for (status, errors, subject, want) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            let got = from_status(url, status, errors, subject).to_string();
            assert_eq!(got, want, "{status} {subject:?}");
        }
    }

    #[test]
    fn push_errors() {
        let denied = on_push(Error::Denied {
            name: "app".into(),
            message: "requested access to the resource is denied".into(),
        });
        assert_eq!(
            denied.to_string(),
            "push access to app denied: requested access to the resource is denied: use \
             credentials with push access to it (--username and --password-stdin, or docker login)"
        );
        let not_found = on_push(Error::RepositoryNotFound {
            repository: "app".into(),
        });
        assert!(matches!(not_found, Error::RepositoryNotFound { .. }));
        let refused = |code: &str| {
            Error::ManifestRefused {
                repository: "app".into(),
                reference: "v1".into(),
                status: StatusCode::BAD_REQUEST,
                errors: envelope(code, "no"),
            }
            .to_string()
        };
        assert_eq!(
            refused("MANIFEST_BLOB_UNKNOWN"),
            "registry refused manifest v1 for app: 400 Bad Request: MANIFEST_BLOB_UNKNOWN: no: \
             push the blobs it references (layers, config) first"
        );
        assert_eq!(
            refused("MANIFEST_INVALID"),
            "registry refused manifest v1 for app: 400 Bad Request: MANIFEST_INVALID: no"
        );
        let too_large = Error::BlobTooLarge {
            url: "https://r/v2/app/blobs/uploads/u".into(),
            repository: "app".into(),
            digest: D.parse().unwrap(),
            size: 7,
            errors: ErrorEnvelope::default(),
        };
        assert_eq!(
            too_large.to_string(),
            format!(
                "registry https://r/v2/app/blobs/uploads/u refused blob {D} (7 bytes) for app as \
                 too large (413 Payload Too Large): the registry or a proxy in front of it limits \
                 request bodies; upload in smaller chunks or raise that limit"
            )
        );
    }

    #[test]
    fn transient_statuses() {
        let cases = [
            (500, true),
            (502, true),
            (503, true),
            (504, true),
            (429, true),
            (501, false),
            (505, false),
            (400, false),
            (401, false),
            (403, false),
            (404, false),
        ];
        for (status, want) in cases {
            assert_eq!(
                is_transient_status(StatusCode::from_u16(status).unwrap()),
                want,
                "{status}"
            );
        }
    }

    #[test]
    fn certificate_problems_are_recognised() {
        let cases = [
            ("invalid peer certificate: UnknownIssuer", true),
            (
                "tcp connect error: Connection refused (os error 111)",
                false,
            ),
            ("SSL routines: certificate verify failed", true),
        ];
        for (cause, want) in cases {
            assert_eq!(is_certificate_problem(cause), want, "{cause}");
        }
    }
}
