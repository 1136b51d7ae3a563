//! Registry credentials: the [`Secret`] and [`Credentials`] types, and the lookup in Docker's
//! `config.json` (`auths`, `credHelpers`, `credsStore`, through the `docker_credential` crate).
//! It must not know where explicit credentials come from (flags, stdin): the caller passes them.
//!
//! Docker's keys: Docker Hub is stored under `https://index.docker.io/v1/`, every other
//! registry under its `host[:port]` (`auths` keys written with a scheme are normalised by the
//! crate).

use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use docker_credential::{CredentialRetrievalError, DockerCredential};

/// A password or token. It redacts itself in `Debug` and has no `Display`, so it cannot end
/// up in a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A username and password for Basic auth (directly, or at a token realm).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            username: username.into(),
            password: Secret::new(password),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// Only the username: this is what a log line may say about credentials.
impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.username)
    }
}

/// What we authenticate with at one registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Identity {
    /// Basic credentials, sent to the registry (Basic) or to the token realm (Bearer).
    Password(Credentials),
    /// A docker config `identitytoken`: an OAuth2 refresh token, exchanged at the realm with
    /// `grant_type=refresh_token` (distribution `spec/auth/oauth.md`).
    RefreshToken(Secret),
}

impl Identity {
    /// How a message may name this identity.
    pub(crate) fn describe(&self) -> String {
        match self {
            Identity::Password(c) => format!("user {}", c.username),
            Identity::RefreshToken(_) => "the identity token from the docker config".to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read docker config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("credential helper docker-credential-{helper} failed for {server}: {reason}")]
    Helper {
        helper: String,
        server: String,
        reason: String,
    },
}

/// The key Docker uses for `registry` (a name as in `Reference::registry()`, or an API host).
pub(crate) fn docker_config_key(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => "https://index.docker.io/v1/",
        other => other,
    }
}

/// Docker's default config file: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
///
/// This is the one place `registry` reads the environment: it is part of Docker's lookup
/// convention, which `docker_credential::get_credential` applies the same way.
pub fn default_docker_config() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")))?;
    Some(dir.join("config.json"))
}

/// The credentials configured for `registry` in the docker config file `path`; `None` when
/// the file does not exist or has nothing for this registry. Blocking: it may run a helper.
pub(crate) fn from_docker_config(
    path: &Path,
    registry: &str,
) -> Result<Option<Identity>, CredentialsError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(CredentialsError::Config {
                path: path.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    let server = docker_config_key(registry);
    match docker_credential::get_credential_from_reader(BufReader::new(file), server) {
        Ok(DockerCredential::UsernamePassword(username, password)) => Ok(Some(Identity::Password(
            Credentials::new(username, password),
        ))),
        Ok(DockerCredential::IdentityToken(token)) => {
            Ok(Some(Identity::RefreshToken(Secret::new(token))))
        }
        Err(CredentialRetrievalError::NoCredentialConfigured) => Ok(None),
        Err(CredentialRetrievalError::HelperFailure {
            helper,
            stdout,
            stderr,
        }) => {
            // Helpers answer "credentials not found in native keychain" on stdout, exit 1,
            // when they simply have nothing for this server: that is not an error.
            if stdout.contains("credentials not found") {
                return Ok(None);
            }
            // stdout is not quoted: a misbehaving helper might have printed a secret there.
            let reason = stderr.lines().next().unwrap_or("").trim();
            Err(CredentialsError::Helper {
                helper: helper
                    .strip_prefix("docker-credential-")
                    .unwrap_or(&helper)
                    .to_owned(),
                server: server.to_owned(),
                reason: if reason.is_empty() {
                    "it exited with an error".to_owned()
                } else {
                    reason.to_owned()
                },
            })
        }
        Err(
            e @ (CredentialRetrievalError::HelperCommunicationError
            | CredentialRetrievalError::MalformedHelperResponse),
        ) => Err(CredentialsError::Helper {
            helper: helper_name_for(path, server).unwrap_or_else(|| "?".to_owned()),
            server: server.to_owned(),
            reason: lowercase_first(&e.to_string()),
        }),
        Err(e) => Err(CredentialsError::Config {
            path: path.to_owned(),
            reason: lowercase_first(&e.to_string()),
        }),
    }
}

/// The helper the config names for `server`, for error messages only.
fn helper_name_for(path: &Path, server: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("credHelpers")
        .and_then(|h| h.get(server))
        .or_else(|| json.get("credsStore"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show() {
        let c = Credentials::new("alice", "hunter2-s3cret");
        for shown in [
            format!("{c:?}"),
            format!("{c:#?}"),
            format!("{c}"),
            format!("{:?}", Identity::Password(c.clone())),
            format!(
                "{:?}",
                Identity::RefreshToken(Secret::new("hunter2-s3cret"))
            ),
            Identity::Password(c.clone()).describe(),
        ] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert!(format!("{c:?}").contains("alice"));
        assert_eq!(c.password.expose(), "hunter2-s3cret");
    }

    #[test]
    fn docker_config_keys() {
        let cases = [
            ("docker.io", "https://index.docker.io/v1/"),
            ("index.docker.io", "https://index.docker.io/v1/"),
            ("registry-1.docker.io", "https://index.docker.io/v1/"),
            ("ghcr.io", "ghcr.io"),
            ("localhost:5000", "localhost:5000"),
            ("[::1]:5000", "[::1]:5000"),
        ];
        for (registry, want) in cases {
            assert_eq!(docker_config_key(registry), want, "{registry}");
        }
    }

    #[test]
    fn reads_auths_from_an_explicit_config() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let config = serde_json::json!({
            "auths": {
                "https://index.docker.io/v1/": { "auth": auth("hubuser:hubpass") },
                "127.0.0.1:5000": { "auth": auth("local:pa:ss") },
                "https://ghcr.io": { "auth": auth("gh:token") },
                "quay.io": { "identitytoken": "refresh-me" },
                "bad.example": { "auth": "%%%not-base64" },
            }
        });
        std::fs::write(&path, config.to_string()).unwrap();

        let pw = |u: &str, p: &str| Some(Identity::Password(Credentials::new(u, p)));
        let cases = [
            ("docker.io", pw("hubuser", "hubpass")),
            ("127.0.0.1:5000", pw("local", "pa:ss")),
            ("ghcr.io", pw("gh", "token")),
            (
                "quay.io",
                Some(Identity::RefreshToken(Secret::new("refresh-me"))),
            ),
            ("127.0.0.1:5001", None),
        ];
        for (registry, want) in cases {
            assert_eq!(
                from_docker_config(&path, registry).unwrap(),
                want,
                "{registry}"
            );
        }
        let err = from_docker_config(&path, "bad.example")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("cannot read docker config "), "{err}");
        assert!(err.contains("decode"), "{err}");
    }

    #[test]
    fn missing_config_means_no_credentials_and_broken_config_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        assert_eq!(from_docker_config(&path, "docker.io").unwrap(), None);
        std::fs::write(&path, "{not json").unwrap();
        let err = from_docker_config(&path, "docker.io")
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn missing_helper_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let config = r#"{"credHelpers": {"r.example": "imagefs-test-no-such-helper"}}"#;
        std::fs::write(&path, config).unwrap();
        let err = from_docker_config(&path, "r.example")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "credential helper docker-credential-imagefs-test-no-such-helper failed for r.example"
            ),
            "{err}"
        );
    }
}
