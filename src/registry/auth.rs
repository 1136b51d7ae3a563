//! Registry authentication: parsing `WWW-Authenticate` challenges, the token realm's
//! response, and the lifetime of a Bearer token. Pure: the requests themselves are made by
//! the client, which owns the caches.
//!
//! The flow (distribution `docs/spec/auth/token.md`):
//!
//! 1. A request without credentials gets `401 Unauthorized` and
//!    `WWW-Authenticate: Bearer realm="https://auth.example/token",service="registry.example",scope="repository:app:pull"`
//!    (RFC 6750 §3; the header grammar is RFC 7235 §4.1: `scheme [token68 | #auth-param]`,
//!    several challenges may share one header, parameter values may be quoted strings
//!    containing commas, scheme and parameter names are case-insensitive).
//! 2. The client asks the realm: `GET realm?service=…&scope=repository:NAME:pull`, with Basic
//!    credentials if it has some, anonymously otherwise. With a docker `identitytoken` it
//!    `POST`s `grant_type=refresh_token` instead (`docs/spec/auth/oauth.md`).
//! 3. The realm answers `{"token": …}` or `{"access_token": …}` (both accepted, `token`
//!    preferred), `expires_in` seconds (default 60) from receipt.
//! 4. The client retries with `Authorization: Bearer TOKEN`, and reuses the token for the same
//!    (host, scope) until it expires. A 401 on a cached token means it expired or was
//!    revoked early: drop it, fetch a new one once, retry.
//!
//! A push asks for `repository:NAME:pull,push` (plus `repository:FROM:pull` to mount a blob
//! from another repository: [`push_scope`]); a token without `push` is answered 401 (with
//! `error="insufficient_scope"`) or 403 on the upload, not on the token request.
//!
//! A `Basic` challenge (htpasswd registries) is answered with the credentials directly.

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::credentials::Secret;

/// One challenge from a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased: `bearer`, `basic`, …
    pub scheme: String,
    /// Names lowercased, values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How a registry host wants to be authenticated, from its challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Basic,
}

/// The scheme we will answer among `challenges`: Bearer (with a realm) over Basic; `None`
/// when neither is offered.
pub(crate) fn choose_scheme(challenges: &[Challenge]) -> Option<Scheme> {
    let bearer = challenges.iter().find_map(|c| {
        if c.scheme != "bearer" {
            return None;
        }
        let realm = c.param("realm").filter(|r| !r.is_empty())?;
        Some(Scheme::Bearer {
            realm: realm.to_owned(),
            service: c.param("service").map(str::to_owned),
        })
    });
    bearer.or_else(|| {
        challenges
            .iter()
            .any(|c| c.scheme == "basic")
            .then_some(Scheme::Basic)
    })
}

/// The pull scope of `repository`, or no scope for the API root.
pub(crate) fn pull_scope(repository: Option<&str>) -> Option<String> {
    repository.map(|r| format!("repository:{r}:pull"))
}

/// The scope of a push to `repository`: `pull,push` on it (a push checks what is there
/// first), and `pull` on `mount_from` when a blob is to be mounted from that repository
/// (the registry checks that the client may read what it mounts). Space-separated, the
/// scope-list form of `token.md` ("Requesting a Token").
pub(crate) fn push_scope(repository: &str, mount_from: Option<&str>) -> String {
    match mount_from.filter(|from| *from != repository) {
        Some(from) => format!("repository:{repository}:pull,push repository:{from}:pull"),
        None => format!("repository:{repository}:pull,push"),
    }
}

/// Parse every challenge of a `WWW-Authenticate` header value (RFC 7235 §4.1).
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut p = Parser {
        s: header.as_bytes(),
        i: 0,
    };
    let mut challenges = Vec::new();
    loop {
        p.skip(|b| b == b',' || is_space(b));
        if p.at_end() {
            break;
        }
        let scheme = p.token();
        if scheme.is_empty() {
            // Garbage where a scheme should be: skip to the next comma and resynchronise.
            p.skip(|b| b != b',');
            continue;
        }
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
        };
        p.skip(is_space);
        // `Basic dXNlcjpwYXNz`: a token68 standing alone after the scheme is not a parameter.
        let before = p.i;
        let word = p.token68();
        p.skip(is_space);
        if !word.is_empty() && (p.at_end() || p.peek_is(b',')) {
            challenge.params.push((String::new(), word));
        } else {
            p.i = before;
        }
        loop {
            p.skip(|b| b == b',' || is_space(b));
            let start = p.i;
            let name = p.token();
            p.skip(is_space);
            if name.is_empty() || !p.peek_is(b'=') {
                // The next challenge's scheme, garbage, or the end: the outer loop decides.
                p.i = start;
                break;
            }
            p.i += 1;
            p.skip(is_space);
            // Unquoted values should be tokens, but realms are sent unquoted too
            // (`realm=https://…`): take everything up to the next separator.
            let value = if p.peek_is(b'"') {
                p.quoted()
            } else {
                p.take(|b| b != b',' && !is_space(b))
            };
            challenge.params.push((name.to_ascii_lowercase(), value));
        }
        challenges.push(challenge);
    }
    challenges
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 7230 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Parser<'_> {
    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek_is(&self, b: u8) -> bool {
        self.s.get(self.i) == Some(&b)
    }

    fn skip(&mut self, pred: impl Fn(u8) -> bool) {
        while self.i < self.s.len() && pred(self.s[self.i]) {
            self.i += 1;
        }
    }

    fn take(&mut self, pred: impl Fn(u8) -> bool) -> String {
        let start = self.i;
        self.skip(pred);
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    fn token(&mut self) -> String {
        self.take(is_tchar)
    }

    /// `token68 = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`
    fn token68(&mut self) -> String {
        let start = self.i;
        self.skip(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
        if self.i > start {
            self.skip(|b| b == b'=');
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    /// A quoted-string at the cursor (which is on the opening quote), unescaped. An
    /// unterminated string runs to the end.
    fn quoted(&mut self) -> String {
        self.i += 1;
        let mut out = Vec::new();
        while let Some(&b) = self.s.get(self.i) {
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(&escaped) = self.s.get(self.i) {
                        out.push(escaped);
                        self.i += 1;
                    }
                }
                _ => out.push(b),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The realm's answer. Not `Debug`: it holds the token.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
}

/// Spec default when the realm does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

impl TokenResponse {
    pub(crate) fn parse(body: &[u8]) -> Result<TokenResponse, String> {
        serde_json::from_slice(body).map_err(|e| format!("not a token response ({e})"))
    }

    /// The token (`token`, else `access_token`) valid from `received` on.
    pub(crate) fn into_token(self, received: Instant) -> Result<Token, String> {
        let value = [self.token, self.access_token]
            .into_iter()
            .flatten()
            .find(|t| !t.is_empty())
            .ok_or("neither \"token\" nor \"access_token\" is set")?;
        let lifetime = match self.expires_in {
            Some(secs) if secs > 0 => Duration::from_secs(secs as u64),
            Some(_) => Duration::ZERO,
            None => DEFAULT_TOKEN_LIFETIME,
        };
        Ok(Token {
            value: Secret::new(value),
            refresh_at: received + usable_lifetime(lifetime),
        })
    }
}

/// How long we use a token of lifetime `lifetime`: a tenth less (at most 30 s less), so that a
/// request does not leave with a token that expires on the way.
fn usable_lifetime(lifetime: Duration) -> Duration {
    lifetime - (lifetime / 10).min(Duration::from_secs(30))
}

/// A Bearer token and when to stop using it.
#[derive(Clone, Debug)]
pub(crate) struct Token {
    pub(crate) value: Secret,
    refresh_at: Instant,
}

impl Token {
    pub(crate) fn is_fresh(&self, now: Instant) -> bool {
        now < self.refresh_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.to_owned(),
            params: params
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn www_authenticate_parsing() {
        let cases: Vec<(&str, Vec<Challenge>)> = vec![
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
                vec![c(
                    "bearer",
                    &[
                        ("realm", "https://auth.docker.io/token"),
                        ("service", "registry.docker.io"),
                        ("scope", "repository:samalba/my-app:pull,push"),
                    ],
                )],
            ),
            (
                r#"BEARER Realm = "http://127.0.0.1:1/t" , Service=reg"#,
                vec![c(
                    "bearer",
                    &[("realm", "http://127.0.0.1:1/t"), ("service", "reg")],
                )],
            ),
            (
                r#"Basic realm="Registry Realm""#,
                vec![c("basic", &[("realm", "Registry Realm")])],
            ),
            ("basic", vec![c("basic", &[])]),
            (
                r#"Basic realm="a, b", Bearer realm="https://t/x",scope="repository:a:pull,push",error="invalid_token""#,
                vec![
                    c("basic", &[("realm", "a, b")]),
                    c(
                        "bearer",
                        &[
                            ("realm", "https://t/x"),
                            ("scope", "repository:a:pull,push"),
                            ("error", "invalid_token"),
                        ],
                    ),
                ],
            ),
            (
                r#"Bearer realm="quo\"ted\\",service="s""#,
                vec![c("bearer", &[("realm", r#"quo"ted\"#), ("service", "s")])],
            ),
            (
                "Negotiate abc123==, Basic realm=x",
                vec![
                    c("negotiate", &[("", "abc123==")]),
                    c("basic", &[("realm", "x")]),
                ],
            ),
            ("", vec![]),
            (" , ,", vec![]),
            (
                r#"Bearer realm="unterminated"#,
                vec![c("bearer", &[("realm", "unterminated")])],
            ),
            (
                "Bearer realm=https://a:1/t?x=y,service=s",
                vec![c(
                    "bearer",
                    &[("realm", "https://a:1/t?x=y"), ("service", "s")],
                )],
            ),
            (
                r#"Bearer realm="r",,service="s""#,
                vec![c("bearer", &[("realm", "r"), ("service", "s")])],
            ),
        ];
        for (header, want) in cases {
            assert_eq!(parse_challenges(header), want, "{header}");
        }
    }

    #[test]
    fn scheme_choice() {
        let bearer = Scheme::Bearer {
            realm: "https://t/x".into(),
            service: Some("s".into()),
        };
        let cases = [
            (
                r#"Bearer realm="https://t/x",service="s""#,
                Some(bearer.clone()),
            ),
            (
                r#"Basic realm="r", Bearer realm="https://t/x",service=s"#,
                Some(bearer),
            ),
            (r#"Basic realm="r""#, Some(Scheme::Basic)),
            (r#"Bearer service="no realm""#, None),
            (r#"Bearer service="no realm", Basic"#, Some(Scheme::Basic)),
            ("Negotiate abc", None),
            ("", None),
        ];
        for (header, want) in cases {
            assert_eq!(choose_scheme(&parse_challenges(header)), want, "{header}");
        }
    }

    #[test]
    fn token_responses() {
        let now = Instant::now();
        let secs = Duration::from_secs;
        // body, token, usable for (None: error)
        let cases: Vec<(&str, Option<(&str, Duration)>)> = vec![
            (
                r#"{"token":"t1","expires_in":300}"#,
                Some(("t1", secs(270))),
            ),
            (r#"{"access_token":"a1"}"#, Some(("a1", secs(54)))),
            (
                r#"{"token":"t","access_token":"a","expires_in":3600}"#,
                Some(("t", secs(3570))),
            ),
            (
                r#"{"token":"","access_token":"a","expires_in":10}"#,
                Some(("a", secs(9))),
            ),
            (r#"{"token":"t","expires_in":0}"#, Some(("t", secs(0)))),
            (r#"{"token":"t","expires_in":-5}"#, Some(("t", secs(0)))),
            (
                r#"{"token":"t","expires_in":1,"issued_at":"2009-11-10T23:00:00Z"}"#,
                Some(("t", Duration::from_millis(900))),
            ),
            (r#"{"expires_in":60}"#, None),
            (r#"{"token":""}"#, None),
        ];
        for (body, want) in cases {
            let got = TokenResponse::parse(body.as_bytes()).and_then(|r| r.into_token(now));
            match (got, want) {
                (Ok(token), Some((value, usable))) => {
                    assert_eq!(token.value.expose(), value, "{body}");
                    assert!(
                        token.is_fresh(now + usable.saturating_sub(Duration::from_millis(1)))
                            || usable.is_zero(),
                        "{body}"
                    );
                    assert!(!token.is_fresh(now + usable), "{body}");
                }
                (Err(_), None) => {}
                (got, want) => panic!("{body}: got ok={}, want ok={}", got.is_ok(), want.is_some()),
            }
        }
        assert!(TokenResponse::parse(b"<html>").is_err());
    }

    #[test]
    fn pull_scopes() {
        assert_eq!(
            pull_scope(Some("library/busybox")).as_deref(),
            Some("repository:library/busybox:pull")
        );
        assert_eq!(pull_scope(None), None);
    }

    #[test]
    fn push_scopes() {
        let cases = [
            ("app/x", None, "repository:app/x:pull,push"),
            (
                "app/x",
                Some("base/y"),
                "repository:app/x:pull,push repository:base/y:pull",
            ),
            ("app/x", Some("app/x"), "repository:app/x:pull,push"),
        ];
        for (repository, from, want) in cases {
            assert_eq!(push_scope(repository, from), want, "{repository} {from:?}");
        }
    }
}
