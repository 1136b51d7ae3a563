//! A token issuer that behaves like Docker Hub's `auth.docker.io/token`, in-process.
//!
//! The flow it serves (distribution's `docs/spec/auth/token.md`):
//!
//! 1. the client hits the registry, gets `401` with
//!    `WWW-Authenticate: Bearer realm="http://127.0.0.1:T/token",service="imagefs-test-registry",scope="repository:NAME:pull"`;
//! 2. it sends `GET /token?service=…&scope=repository:NAME:pull[,push]` here, with Basic
//!    credentials or none;
//! 3. it gets `{"token", "access_token", "expires_in", "issued_at"}` and retries with
//!    `Authorization: Bearer TOKEN`.
//!
//! Policy: [`TOKEN_USER`]/[`TOKEN_PASS`] (and users added with [`TokenIssuer::add_user`]) get
//! every action they ask for; anonymous clients get `pull` on `public/*` repositories and
//! nothing else (an empty `access` list, which the registry answers with 401); wrong
//! credentials get 401 here, as Docker Hub does.
//!
//! The JWT is RS256 with the signing certificate in the `x5c` header; the registry trusts it
//! through `rootcertbundle` (the same self-signed certificate). Distribution 2.8 accepts a
//! token up to 60 s past its `exp` (its `Leeway`), so [`TokenIssuer::set_expires_in`] sets
//! `exp` that much earlier: the registry then refuses the token exactly `expires_in` after
//! it was issued, as a client reading `expires_in` expects.
//!
//! The server runs on its own thread with its own tokio runtime, so sync and async tests use
//! it alike; it stops when the [`TokenIssuer`] is dropped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use tempfile::TempDir;

/// The user the issuer knows from the start.
pub const TOKEN_USER: &str = "tester";
/// [`TOKEN_USER`]'s password.
pub const TOKEN_PASS: &str = "t0ken-pass";
/// `service` in challenges, tokens' `aud`, and the registry's config.
pub const SERVICE: &str = "imagefs-test-registry";
/// `iss` in tokens and the registry's config.
pub const ISSUER: &str = "imagefs-test-issuer";

/// How far past `exp` distribution 2.8 still accepts a token (`token.Leeway`).
const REGISTRY_LEEWAY: Duration = Duration::from_secs(60);

/// Default token lifetime, as Docker Hub's.
const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(300);

/// One request the issuer answered, for assertions on what clients asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// `service` query parameter.
    pub service: Option<String>,
    /// Every `scope` query parameter, as sent.
    pub scopes: Vec<String>,
    /// The Basic user, if any (whether or not the password was right).
    pub user: Option<String>,
    /// The HTTP status the issuer answered.
    pub status: u16,
}

/// A running token issuer; stops on drop.
pub struct TokenIssuer {
    port: u16,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: TempDir,
}

struct State {
    key: EncodingKey,
    /// Base64 (standard) DER of the certificate, for the `x5c` header.
    cert_b64: String,
    /// Checked on every request; a std mutex because it is never held across an await.
    users: Mutex<HashMap<String, String>>,
    expires_in_secs: AtomicU64,
    requests: Mutex<Vec<TokenRequest>>,
    jti: AtomicUsize,
}

impl TokenIssuer {
    /// Generates a key and certificate with the `openssl` CLI and starts serving on a free
    /// loopback port.
    pub fn start() -> TokenIssuer {
        let dir = tempfile::Builder::new()
            .prefix("imagefs-token-")
            .tempdir()
            .expect("create issuer temp dir");
        let key_path = dir.path().join("key.pem");
        let cert_path = dir.path().join("cert.pem");
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            ])
            .arg(format!("/CN={ISSUER}"))
            .arg("-keyout")
            .arg(&key_path)
            .arg("-out")
            .arg(&cert_path)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl: {e} (run scripts/setup)"));
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key_pem = std::fs::read(&key_path).expect("read key.pem");
        let cert_pem = std::fs::read_to_string(&cert_path).expect("read cert.pem");
        // A PEM body is the base64 of the DER, which is what `x5c` carries.
        let cert_b64: String = cert_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let state = Arc::new(State {
            key: EncodingKey::from_rsa_pem(&key_pem).expect("parse generated RSA key"),
            cert_b64,
            users: Mutex::new(HashMap::from([(
                TOKEN_USER.to_owned(),
                TOKEN_PASS.to_owned(),
            )])),
            expires_in_secs: AtomicU64::new(DEFAULT_EXPIRES_IN.as_secs()),
            requests: Mutex::new(Vec::new()),
            jti: AtomicUsize::new(0),
        });

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind token issuer");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("issuer addr").port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("token-issuer".into())
            .spawn(move || serve(listener, thread_state, rx))
            .expect("spawn token issuer thread");
        TokenIssuer {
            port,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
            dir,
        }
    }

    /// `http://127.0.0.1:PORT/token`, the realm the registry advertises.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The PEM certificate the registry trusts (`rootcertbundle`).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The `auth:` section of a registry config that trusts this issuer.
    pub fn registry_auth_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm(),
            self.cert_path().display()
        )
    }

    /// Lets `user`/`pass` get tokens too.
    pub fn add_user(&self, user: &str, pass: &str) {
        self.state
            .users
            .lock()
            .unwrap()
            .insert(user.to_owned(), pass.to_owned());
    }

    /// Lifetime of tokens issued from now on (whole seconds; at least 1).
    pub fn set_expires_in(&self, d: Duration) {
        self.state
            .expires_in_secs
            .store(d.as_secs().max(1), Ordering::SeqCst);
    }

    /// How many requests `/token` has answered (any status).
    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// A token for `user` (`None`: anonymous) granting `scopes` under this issuer's policy,
    /// without an HTTP request (not counted). The harness pushes with these.
    pub fn mint(&self, user: Option<&str>, scopes: &[&str]) -> String {
        let access = scopes
            .iter()
            .filter_map(|s| grant(user.is_some(), s))
            .collect();
        self.state.sign(user.unwrap_or(""), access)
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Serialize)]
struct Claims {
    iss: &'static str,
    sub: String,
    aud: &'static str,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Access>,
}

/// One entry of the `access` claim.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

impl State {
    fn sign(&self, sub: &str, access: Vec<Access>) -> String {
        let now = unix_now();
        let expires_in = self.expires_in_secs.load(Ordering::SeqCst);
        let claims = Claims {
            iss: ISSUER,
            sub: sub.to_owned(),
            aud: SERVICE,
            // See the module doc: the registry adds its leeway back.
            exp: (now + expires_in).saturating_sub(REGISTRY_LEEWAY.as_secs()),
            nbf: now,
            iat: now,
            jti: format!("imagefs-test-{}", self.jti.fetch_add(1, Ordering::SeqCst)),
            access,
        };
        let mut header = Header::new(Algorithm::RS256);
        header.typ = Some("JWT".into());
        header.x5c = Some(vec![self.cert_b64.clone()]);
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign test token")
    }

    fn answer(&self, req: &Request<Incoming>) -> (StatusCode, String) {
        let mut service = None;
        let mut scopes = Vec::new();
        for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            match &*k {
                "service" => service = Some(v.into_owned()),
                "scope" => scopes.push(v.into_owned()),
                _ => {}
            }
        }
        let basic = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_basic);
        let user = basic.as_ref().map(|(u, _)| u.clone());
        let (status, body) = if req.uri().path() != "/token" {
            (
                StatusCode::NOT_FOUND,
                r#"{"details":"not found"}"#.to_owned(),
            )
        } else if service.as_deref().is_some_and(|s| s != SERVICE) {
            (
                StatusCode::BAD_REQUEST,
                r#"{"details":"unknown service"}"#.to_owned(),
            )
        } else if basic
            .as_ref()
            .is_some_and(|(u, p)| self.users.lock().unwrap().get(u) != Some(p))
        {
            (
                StatusCode::UNAUTHORIZED,
                r#"{"details":"incorrect username or password"}"#.to_owned(),
            )
        } else {
            let access = scopes
                .iter()
                .filter_map(|s| grant(user.is_some(), s))
                .collect();
            let token = self.sign(user.as_deref().unwrap_or(""), access);
            let body = serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in_secs.load(Ordering::SeqCst),
                "issued_at": rfc3339(unix_now()),
            });
            (StatusCode::OK, body.to_string())
        };
        self.requests.lock().unwrap().push(TokenRequest {
            service,
            scopes,
            user,
            status: status.as_u16(),
        });
        (status, body)
    }
}

/// What the policy grants for one requested scope `TYPE:NAME:ACTIONS`.
fn grant(authenticated: bool, scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions: Vec<String> = actions
        .split(',')
        .filter(|a| !a.is_empty())
        .filter(|a| {
            authenticated || (kind == "repository" && *a == "pull" && name.starts_with("public/"))
        })
        .map(str::to_owned)
        .collect();
    (!actions.is_empty()).then(|| Access {
        kind: kind.to_owned(),
        name: name.to_owned(),
        actions,
    })
}

fn parse_basic(header: &str) -> Option<(String, String)> {
    let encoded = header.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(B64.decode(encoded.trim()).ok()?).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("issuer runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (status, body) = state.answer(&req);
                    let resp = Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .expect("token response");
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (Howard Hinnant's civil-from-days).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_follow_policy() {
        let cases: &[(bool, &str, Option<&[&str]>)] = &[
            (false, "repository:public/x:pull", Some(&["pull"])),
            (false, "repository:public/x:pull,push", Some(&["pull"])),
            (false, "repository:private/x:pull", None),
            (false, "repository:publicx:pull", None),
            (
                true,
                "repository:private/x:pull,push",
                Some(&["pull", "push"]),
            ),
            (true, "registry:catalog:*", Some(&["*"])),
            (true, "garbage", None),
        ];
        for (auth, scope, want) in cases {
            let got = grant(*auth, scope).map(|a| a.actions);
            let want = want.map(|w| w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
            assert_eq!(got, want, "{scope} authenticated={auth}");
        }
    }

    #[test]
    fn formats_rfc3339() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (1_704_067_200, "2024-01-01T00:00:00Z"),
            (1_709_210_096, "2024-02-29T12:34:56Z"),
        ] {
            assert_eq!(rfc3339(secs), want);
        }
    }
}
