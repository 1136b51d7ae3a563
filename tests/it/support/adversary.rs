//! An adversarial HTTP server for what a real registry will not do on demand: wrong bytes,
//! truncated or stalled bodies, 5xx and 429, Range ignored, tokens revoked mid-pull,
//! redirects to another host, connections dropped mid-request.
//!
//! Each test scripts it with a handler `Fn(&Recorded) -> Reply`. It runs in-process on the
//! test's tokio runtime (hyper 1), bound to 127.0.0.1:0, records every request, and stops
//! (listener and connections) when dropped. [`Adversary::start_tls`] serves https with a
//! certificate from a [`TestCa`] (made by the `openssl` command).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// This server's own base URL (`http://127.0.0.1:PORT`), for realms and redirects.
    pub base: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The path without its query.
    pub fn route(&self) -> &str {
        self.path.split('?').next().unwrap_or(&self.path)
    }

    /// A query parameter, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        let query = self.path.split_once('?')?.1;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// A field of an `application/x-www-form-urlencoded` body.
    pub fn form(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(&self.body)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// What to answer.
pub struct Reply {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: ReplyBody,
}

enum ReplyBody {
    Full(Bytes),
    /// Declare `Content-Length: declared`, send `sent`, then end the connection.
    Truncated {
        declared: u64,
        sent: Bytes,
    },
    /// Send `sent`, then nothing, forever.
    Stalled {
        sent: Bytes,
    },
    /// Never send the response head at all.
    Hang,
    /// Close the connection without answering.
    Drop,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status: StatusCode::from_u16(status).expect("valid status"),
            headers: Vec::new(),
            body: ReplyBody::Full(Bytes::new()),
        }
    }

    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply::status(200).body(body)
    }

    /// A registry error envelope with one error.
    pub fn error(status: u16, code: &str, message: &str) -> Reply {
        let body =
            serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]});
        Reply::status(status)
            .header("content-type", "application/json")
            .body(body.to_string())
    }

    pub fn json(value: serde_json::Value) -> Reply {
        Reply::ok(value.to_string()).header("content-type", "application/json")
    }

    /// A 401 with a Bearer challenge pointing at `realm`.
    pub fn bearer_challenge(realm: &str, service: &str, scope: &str) -> Reply {
        Reply::error(401, "UNAUTHORIZED", "authentication required").header(
            "www-authenticate",
            &format!(r#"Bearer realm="{realm}",service="{service}",scope="{scope}""#),
        )
    }

    pub fn basic_challenge() -> Reply {
        Reply::error(401, "UNAUTHORIZED", "authentication required")
            .header("www-authenticate", r#"Basic realm="Registry Realm""#)
    }

    pub fn redirect(location: &str) -> Reply {
        Reply::status(307).header("location", location)
    }

    pub fn truncated(declared: u64, sent: impl Into<Bytes>) -> Reply {
        Reply {
            body: ReplyBody::Truncated {
                declared,
                sent: sent.into(),
            },
            ..Reply::status(200)
        }
    }

    pub fn stalled(sent: impl Into<Bytes>) -> Reply {
        Reply {
            body: ReplyBody::Stalled { sent: sent.into() },
            ..Reply::status(200)
        }
    }

    /// Close the connection without answering (the request, body included, was read): to
    /// the client, the connection dropped in the middle of its request.
    pub fn drop_connection() -> Reply {
        Reply {
            body: ReplyBody::Drop,
            ..Reply::status(200)
        }
    }

    pub fn hang() -> Reply {
        Reply {
            body: ReplyBody::Hang,
            ..Reply::status(200)
        }
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = ReplyBody::Full(body.into());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

type Handler = dyn Fn(&Recorded) -> Reply + Send + Sync;

/// The running server. Dropping it stops the listener and every connection.
pub struct Adversary {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    tls_attempts: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Adversary {
    /// Plain http.
    pub async fn start(handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Adversary {
        Adversary::serve(None, handler).await
    }

    /// https, with the leaf certificate of `ca` (valid for 127.0.0.1 and localhost).
    pub async fn start_tls(
        ca: &TestCa,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Adversary {
        Adversary::serve(Some(ca.acceptor()), handler).await
    }

    async fn serve(
        tls: Option<TlsAcceptor>,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Adversary {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let tls_attempts: Arc<AtomicUsize> = Arc::default();
        let connections: Arc<AtomicUsize> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let base = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
        let task = tokio::spawn({
            let requests = requests.clone();
            let tls_attempts = tls_attempts.clone();
            let accepted = connections.clone();
            async move {
                // Owned by this task: aborting it (on Drop) aborts every connection.
                let mut connections = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    while connections.try_join_next().is_some() {}
                    let handler = handler.clone();
                    let requests = requests.clone();
                    let tls_attempts = tls_attempts.clone();
                    let base = base.clone();
                    let tls = tls.clone();
                    connections.spawn(async move {
                        let mut first = [0u8; 1];
                        // 0x16 starts a TLS handshake record: a client probing for https.
                        if tls.is_none()
                            && stream.peek(&mut first).await.is_ok_and(|n| n == 1)
                            && first[0] == 0x16
                        {
                            tls_attempts.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        let service = hyper::service::service_fn(move |request| {
                            serve(request, handler.clone(), requests.clone(), base.clone())
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        let _ = match tls {
                            None => http.serve_connection(TokioIo::new(stream), service).await,
                            Some(tls) => match tls.accept(stream).await {
                                Ok(stream) => {
                                    http.serve_connection(TokioIo::new(stream), service).await
                                }
                                // The client refused our certificate: nothing to serve.
                                Err(_) => return,
                            },
                        };
                    });
                }
            }
        });
        Adversary {
            addr,
            requests,
            tls_attempts,
            connections,
            task,
        }
    }

    /// `127.0.0.1:PORT`: the registry name to give the client.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests whose path (query excluded) is `route`.
    pub fn requests_to(&self, route: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.route() == route)
            .collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Connections that opened with a TLS ClientHello (and were closed unanswered).
    pub fn tls_attempts(&self) -> usize {
        self.tls_attempts.load(Ordering::SeqCst)
    }
}

impl Drop for Adversary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    request: Request<Incoming>,
    handler: Arc<Handler>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    base: String,
) -> Result<Response<ReplyStream>, Dropped> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
        base,
    };
    requests.lock().unwrap().push(recorded.clone());
    let reply = handler(&recorded);

    let mut response = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        response = response.header(name, value);
    }
    let body = match reply.body {
        ReplyBody::Full(bytes) => {
            response = response.header("content-length", bytes.len());
            ReplyStream::once(bytes, false)
        }
        ReplyBody::Truncated { declared, sent } => {
            response = response.header("content-length", declared);
            ReplyStream::once(sent, false)
        }
        ReplyBody::Stalled { sent } => ReplyStream::once(sent, true),
        ReplyBody::Hang => std::future::pending().await,
        // hyper closes a connection whose service fails, without a response.
        ReplyBody::Drop => return Err(Dropped),
    };
    Ok(response.body(body).expect("valid response"))
}

/// The service error of [`Reply::drop_connection`].
#[derive(Debug)]
pub struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for Dropped {}

/// A body of one chunk, then either the end or nothing ever again. Its size is not announced
/// to hyper, so a `Content-Length` header larger than the chunk is sent as declared.
pub struct ReplyStream {
    chunk: Option<Bytes>,
    stall: bool,
}

impl ReplyStream {
    fn once(chunk: Bytes, stall: bool) -> ReplyStream {
        ReplyStream {
            chunk: Some(chunk).filter(|c| !c.is_empty()),
            stall,
        }
    }
}

impl Body for ReplyStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunk.take() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            // Never woken: the connection stays open and silent until the server drops.
            None if self.stall => Poll::Pending,
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunk.is_none() && !self.stall
    }
}

/// `Authorization: Basic base64(user:password)`.
pub fn basic(user: &str, password: &str) -> HeaderValue {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
}

/// A throwaway CA and a leaf certificate it signed for 127.0.0.1 and localhost.
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let ext = dir.path().join("leaf.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            dir.path(),
            &["req", "-x509"],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=imagefs test CA",
            ],
        );
        openssl(
            dir.path(),
            &["req"],
            &ec,
            &[
                "-keyout",
                "leaf.key",
                "-out",
                "leaf.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        );
        openssl(
            dir.path(),
            &[
                "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            ],
            &["-CAcreateserial", "-days", "2"],
            &["-out", "leaf.pem", "-extfile", ext.to_str().unwrap()],
        );
        TestCa { dir }
    }

    /// The CA certificate, for `--ca-cert`.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn acceptor(&self) -> TlsAcceptor {
        let cert = CertificateDer::from_pem_file(self.dir.path().join("leaf.pem")).unwrap();
        let key = PrivateKeyDer::from_pem_file(self.dir.path().join("leaf.key")).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }
}

fn openssl(dir: &Path, a: &[&str], b: &[&str], c: &[&str]) {
    let output = Command::new("openssl")
        .args(a)
        .args(b)
        .args(c)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {:?} failed: {}",
        [a, b, c].concat(),
        String::from_utf8_lossy(&output.stderr)
    );
}
