//! The real `imagefs::registry::Client` against the in-process adversarial server: what a
//! well-behaved registry never does (wrong bytes, truncated and stalled bodies, 5xx, 429,
//! Range ignored, tokens revoked mid-pull, redirects to other hosts) and the exact messages
//! users get for registry errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use imagefs::oci::Digest;
use imagefs::registry::{BlobStream, Client, ClientConfig, Credentials, Error};
use serde_json::json;

use crate::support::adversary::{Adversary, Recorded, Reply, TestCa, basic};

const REPO: &str = "app/x";
const DATA: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

fn config() -> ClientConfig {
    ClientConfig {
        use_docker_config: false,
        timeout: Duration::from_secs(5),
        max_retries: 2,
        ..ClientConfig::default()
    }
}

fn new_client(config: ClientConfig) -> Client {
    Client::new(config).expect("client")
}

fn data_digest() -> Digest {
    Digest::sha256(DATA)
}

fn blob_route(digest: &Digest) -> String {
    format!("/v2/{REPO}/blobs/{digest}")
}

async fn collect(stream: BlobStream) -> Result<Vec<u8>, Error> {
    let mut body = stream.body;
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// Serve `data` honouring `Range: bytes=A-` and `bytes=A-B`.
fn ranged(r: &Recorded, data: &'static [u8]) -> Reply {
    let Some(range) = r.header("range") else {
        return Reply::ok(data);
    };
    let (first, last) = range
        .strip_prefix("bytes=")
        .and_then(|s| s.split_once('-'))
        .expect("bytes=A-[B]");
    let first: usize = first.parse().unwrap();
    let last: usize = if last.is_empty() {
        data.len() - 1
    } else {
        last.parse().unwrap()
    };
    Reply::status(206)
        .header(
            "content-range",
            &format!("bytes {first}-{last}/{}", data.len()),
        )
        .body(&data[first..=last])
}

#[tokio::test]
async fn blob_bytes_with_wrong_content_is_a_digest_mismatch() {
    let adv = Adversary::start(|_| Reply::ok("not what was asked for")).await;
    let digest = data_digest();
    let err = new_client(config())
        .blob_bytes(&adv.host(), REPO, &digest, 1 << 20)
        .await
        .unwrap_err();
    match &err {
        Error::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &digest);
            assert_eq!(actual, &Digest::sha256(b"not what was asked for"));
        }
        other => panic!("expected a digest mismatch, got: {other}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "content of {}{} does not match its digest: expected {digest}, got {}",
            adv.url(),
            blob_route(&digest),
            Digest::sha256(b"not what was asked for")
        )
    );
}

#[tokio::test]
async fn manifest_by_digest_is_verified_and_by_tag_is_returned_as_sent() {
    let manifest = br#"{"schemaVersion":2}"#;
    let adv = Adversary::start(move |r| {
        if r.route().ends_with("/manifests/v1") {
            Reply::ok(&manifest[..])
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        } else {
            Reply::ok(r#"{"schemaVersion":2, "tampered":true}"#)
        }
    })
    .await;
    let client = new_client(config());

    let by_tag = client.manifest(&adv.host(), REPO, "v1").await.unwrap();
    assert_eq!(&by_tag.bytes[..], manifest);
    assert_eq!(by_tag.digest, Digest::sha256(manifest));
    assert_eq!(
        by_tag.content_type.as_deref(),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    let accept = adv.requests()[0].header("accept").unwrap().to_owned();
    for media_type in [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    ] {
        assert!(accept.contains(media_type), "{accept}");
    }

    let pinned = Digest::sha256(manifest).to_string();
    let err = client
        .manifest(&adv.host(), REPO, &pinned)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::DigestMismatch { .. }),
        "expected a digest mismatch, got: {err}"
    );
}

#[tokio::test]
async fn truncated_body_is_an_error_and_is_retried() {
    let adv = Adversary::start(|_| Reply::truncated(DATA.len() as u64, &DATA[..10])).await;
    let digest = data_digest();
    let client = new_client(ClientConfig {
        max_retries: 1,
        ..config()
    });

    let err = client
        .blob_bytes(&adv.host(), REPO, &digest, 1 << 20)
        .await
        .unwrap_err();
    let url = format!("{}{}", adv.url(), blob_route(&digest));
    assert!(
        err.to_string()
            .starts_with(&format!("transfer from {url} broke off: ")),
        "{err}"
    );
    assert_eq!(adv.requests().len(), 2, "one retry");

    // Streaming: the caller sees the bytes that came, then the error.
    let stream = client
        .blob(&adv.host(), REPO, &digest, 0, None)
        .await
        .unwrap();
    assert_eq!(stream.total, Some(DATA.len() as u64));
    let err = collect(stream).await.unwrap_err();
    assert!(matches!(err, Error::Interrupted { .. }), "{err}");
}

#[tokio::test]
async fn blob_larger_than_the_limit_is_refused() {
    let adv = Adversary::start(|_| Reply::ok(DATA)).await;
    let err = new_client(config())
        .blob_bytes(&adv.host(), REPO, &data_digest(), 8)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("is larger than the limit of 8 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let calls = counter();
    let adv = Adversary::start({
        let calls = calls.clone();
        move |_| match calls.fetch_add(1, Ordering::SeqCst) {
            0 => Reply::error(500, "UNKNOWN", "boom"),
            _ => Reply::ok(DATA),
        }
    })
    .await;
    let bytes = new_client(config())
        .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap();
    assert_eq!(&bytes[..], DATA);
    assert_eq!(adv.requests().len(), 2);

    let down = Adversary::start(|_| Reply::status(503)).await;
    let err = new_client(config())
        .blob_bytes(&down.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "registry error on {}{}: 503 Service Unavailable",
            down.url(),
            blob_route(&data_digest())
        )
    );
    assert_eq!(
        down.requests().len(),
        3,
        "first attempt and max_retries = 2"
    );
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let calls = counter();
    let adv = Adversary::start({
        let calls = calls.clone();
        move |_| match calls.fetch_add(1, Ordering::SeqCst) {
            0 => Reply::error(429, "TOOMANYREQUESTS", "slow down").header("retry-after", "1"),
            _ => Reply::ok(DATA),
        }
    })
    .await;
    let started = Instant::now();
    let bytes = new_client(config())
        .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap();
    assert_eq!(&bytes[..], DATA);
    assert_eq!(adv.requests().len(), 2);
    // Our own first backoff is 100 ms: a wait of a second is Retry-After's.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );

    // A wait beyond reason is not waited for: the user is told at once.
    let limited = Adversary::start(|_| {
        Reply::error(429, "TOOMANYREQUESTS", "pull rate limit").header("retry-after", "3600")
    })
    .await;
    let started = Instant::now();
    let err = new_client(config())
        .blob_bytes(&limited.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(limited.requests().len(), 1);
    assert_eq!(
        err.to_string(),
        format!(
            "registry {}{} is rate limiting requests: TOOMANYREQUESTS: pull rate limit: try again later",
            limited.url(),
            blob_route(&data_digest())
        )
    );
}

#[tokio::test]
async fn range_is_sent_and_honoured() {
    let adv = Adversary::start(|r| ranged(r, DATA)).await;
    let client = new_client(config());
    let digest = data_digest();
    let total = Some(DATA.len() as u64);

    let stream = client
        .blob(&adv.host(), REPO, &digest, 10, None)
        .await
        .unwrap();
    assert_eq!((stream.start, stream.total), (10, total));
    assert_eq!(collect(stream).await.unwrap(), &DATA[10..]);

    let stream = client
        .blob(&adv.host(), REPO, &digest, 10, Some(19))
        .await
        .unwrap();
    assert_eq!((stream.start, stream.total), (10, total));
    assert_eq!(collect(stream).await.unwrap(), &DATA[10..20]);

    let stream = client
        .blob(&adv.host(), REPO, &digest, 0, None)
        .await
        .unwrap();
    assert_eq!((stream.start, stream.total), (0, total));
    assert_eq!(collect(stream).await.unwrap(), DATA);

    let ranges: Vec<Option<String>> = adv
        .requests()
        .iter()
        .map(|r| r.header("range").map(str::to_owned))
        .collect();
    assert_eq!(
        ranges,
        [
            Some("bytes=10-".to_owned()),
            Some("bytes=10-19".to_owned()),
            None
        ]
    );
}

#[tokio::test]
async fn range_ignored_starts_at_zero() {
    let adv = Adversary::start(|_| Reply::ok(DATA)).await;
    let stream = new_client(config())
        .blob(&adv.host(), REPO, &data_digest(), 10, None)
        .await
        .unwrap();
    assert_eq!((stream.start, stream.total), (0, Some(DATA.len() as u64)));
    assert_eq!(collect(stream).await.unwrap(), DATA);
}

#[tokio::test]
async fn partial_content_from_the_wrong_offset_is_refused() {
    let adv = Adversary::start(|_| {
        Reply::status(206)
            .header("content-range", &format!("bytes 0-9/{}", DATA.len()))
            .body(&DATA[..10])
    })
    .await;
    let err = new_client(config())
        .blob(&adv.host(), REPO, &data_digest(), 10, None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("asked for bytes from 10, got bytes from 0"),
        "{err}"
    );
}

/// A registry behind a token realm on the same server: `/token` issues `tok-1`, `tok-2`, …
fn token_registry(
    issued: Arc<AtomicUsize>,
    expires_in: u64,
    accept: impl Fn(&str) -> bool + Send + Sync + 'static,
) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    move |r| {
        if r.route() == "/token" {
            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
            return Reply::json(json!({"token": format!("tok-{n}"), "expires_in": expires_in}));
        }
        match r.header("authorization") {
            Some(authorization) if accept(authorization) => Reply::ok(DATA),
            _ => Reply::bearer_challenge(
                &format!("{}/token", r.base),
                "test-registry",
                &format!("repository:{REPO}:pull"),
            ),
        }
    }
}

#[tokio::test]
async fn token_revoked_mid_pull_is_fetched_again_once() {
    let issued = counter();
    let tok1_uses = counter();
    let adv = Adversary::start(token_registry(issued.clone(), 300, move |authorization| {
        match authorization {
            // The first token stops working after two requests, long before expires_in.
            "Bearer tok-1" => tok1_uses.fetch_add(1, Ordering::SeqCst) < 2,
            "Bearer tok-2" => true,
            _ => false,
        }
    }))
    .await;
    let client = new_client(config());
    for _ in 0..4 {
        let bytes = client
            .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(&bytes[..], DATA);
    }
    assert_eq!(adv.requests_to("/token").len(), 2);
    assert_eq!(issued.load(Ordering::SeqCst), 2);
    let sent: Vec<Option<String>> = adv
        .requests_to(&blob_route(&data_digest()))
        .iter()
        .map(|r| r.header("authorization").map(str::to_owned))
        .collect();
    let bearer = |t: &str| Some(format!("Bearer {t}"));
    assert_eq!(
        sent,
        [
            None,
            bearer("tok-1"),
            bearer("tok-1"),
            bearer("tok-1"),
            bearer("tok-2"),
            bearer("tok-2")
        ]
    );
    let token_request = &adv.requests_to("/token")[0];
    assert_eq!(
        token_request.query("service").as_deref(),
        Some("test-registry")
    );
    assert_eq!(
        token_request.query("scope").as_deref(),
        Some("repository:app/x:pull")
    );
    assert_eq!(token_request.header("authorization"), None, "anonymous");
}

#[tokio::test]
async fn expired_tokens_are_not_reused() {
    let issued = counter();
    let adv = Adversary::start(token_registry(issued.clone(), 0, |a| {
        a.starts_with("Bearer tok-")
    }))
    .await;
    let client = new_client(config());
    for _ in 0..3 {
        client
            .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
            .await
            .unwrap();
    }
    // expires_in = 0: every request needs a new token, and gets it up front (no 401 dance
    // once the challenge is known).
    assert_eq!(issued.load(Ordering::SeqCst), 3);
    assert_eq!(adv.requests_to(&blob_route(&data_digest())).len(), 4);
}

#[tokio::test]
async fn concurrent_requests_share_one_token_fetch() {
    let issued = counter();
    let adv = Adversary::start(token_registry(issued.clone(), 300, |a| {
        a.starts_with("Bearer tok-")
    }))
    .await;
    let client = new_client(config());
    client.ping(&adv.host()).await.unwrap();
    let (host, digest) = (adv.host(), data_digest());
    let fetches = (0..8).map(|_| client.blob_bytes(&host, REPO, &digest, 1 << 20));
    for result in futures_util::future::join_all(fetches).await {
        assert_eq!(&result.unwrap()[..], DATA);
    }
    // One token for the ping (no scope), one for the repository.
    assert_eq!(issued.load(Ordering::SeqCst), 2);
    let scopes: Vec<Option<String>> = adv
        .requests_to("/token")
        .iter()
        .map(|r| r.query("scope"))
        .collect();
    assert_eq!(scopes, [None, Some("repository:app/x:pull".to_owned())]);
}

#[tokio::test]
async fn redirect_to_another_host_drops_authorization() {
    let storage = Adversary::start(|r| {
        if r.route() == "/storage/blob" {
            ranged(r, DATA)
        } else {
            Reply::status(404)
        }
    })
    .await;
    let location = format!("{}/storage/blob?signature=abc", storage.url());
    let issued = counter();
    let registry = Adversary::start({
        let authorize = token_registry(issued, 300, |a| a == "Bearer tok-1");
        move |r| {
            if r.route() != "/token" && r.header("authorization") == Some("Bearer tok-1") {
                Reply::redirect(&location)
            } else {
                authorize(r)
            }
        }
    })
    .await;
    let client = new_client(config());

    let bytes = client
        .blob_bytes(&registry.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap();
    assert_eq!(&bytes[..], DATA);
    let stream = client
        .blob(&registry.host(), REPO, &data_digest(), 5, None)
        .await
        .unwrap();
    assert_eq!(stream.start, 5);
    assert_eq!(collect(stream).await.unwrap(), &DATA[5..]);

    let to_registry = registry.requests_to(&blob_route(&data_digest()));
    assert_eq!(
        to_registry.last().unwrap().header("authorization"),
        Some("Bearer tok-1")
    );
    let to_storage = storage.requests();
    assert_eq!(to_storage.len(), 2);
    for r in &to_storage {
        assert_eq!(
            r.header("authorization"),
            None,
            "{} leaked Authorization",
            r.path
        );
        assert_eq!(r.query("signature").as_deref(), Some("abc"));
    }
    assert_eq!(
        to_storage[1].header("range"),
        Some("bytes=5-"),
        "Range survives redirects"
    );
}

/// A realm that wants `alice:s3cret` and a registry that wants its token.
async fn realm_with_credentials() -> Adversary {
    Adversary::start(|r| {
        if r.route() == "/token" {
            return if r.headers.get("authorization") == Some(&basic("alice", "s3cret")) {
                Reply::json(json!({"access_token": "alice-token", "expires_in": 300}))
            } else {
                Reply::error(401, "UNAUTHORIZED", "bad credentials")
            };
        }
        if r.header("authorization") == Some("Bearer alice-token") {
            Reply::ok(DATA)
        } else {
            Reply::bearer_challenge(
                &format!("{}/token", r.base),
                "test-registry",
                "repository:app/x:pull",
            )
        }
    })
    .await
}

#[tokio::test]
async fn bearer_flow_sends_basic_credentials_to_the_realm_only() {
    let adv = realm_with_credentials().await;
    let client = new_client(ClientConfig {
        credentials: Some(Credentials::new("alice", "s3cret")),
        ..config()
    });
    let bytes = client
        .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap();
    assert_eq!(&bytes[..], DATA);
    for r in adv.requests() {
        let authorization = r.header("authorization").unwrap_or("");
        if r.route() == "/token" {
            assert_eq!(
                r.headers.get("authorization"),
                Some(&basic("alice", "s3cret"))
            );
        } else {
            assert!(
                !authorization.starts_with("Basic"),
                "credentials sent to the registry"
            );
        }
    }

    let wrong = new_client(ClientConfig {
        credentials: Some(Credentials::new("alice", "wrong")),
        ..config()
    });
    let err = wrong
        .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "authentication failed for app/x with user alice: check the credentials \
         (--username and --password-stdin, or docker login)"
    );
    assert!(!format!("{err:?}").contains("wrong"), "{err:?}");

    let anonymous = new_client(config());
    let err = anonymous
        .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "authentication required for app/x: pass --username and --password-stdin, or docker login"
    );
}

fn basic_registry() -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    |r| {
        if r.headers.get("authorization") == Some(&basic("bob", "pw")) {
            Reply::ok(DATA)
        } else {
            Reply::basic_challenge()
        }
    }
}

#[tokio::test]
async fn basic_auth_registry() {
    let adv = Adversary::start(basic_registry()).await;
    let with = |credentials: Option<Credentials>| {
        new_client(ClientConfig {
            credentials,
            ..config()
        })
    };
    let good = with(Some(Credentials::new("bob", "pw")));
    good.ping(&adv.host()).await.unwrap();
    let bytes = good
        .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap();
    assert_eq!(&bytes[..], DATA);

    let err = with(None).ping(&adv.host()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "authentication required for {}: pass --username and --password-stdin, or docker login",
            adv.host()
        )
    );
    let err = with(Some(Credentials::new("bob", "nope")))
        .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "authentication failed for app/x with user bob: check the credentials \
         (--username and --password-stdin, or docker login)"
    );
}

#[tokio::test]
async fn docker_config_credentials_are_used() {
    use base64::Engine as _;
    let basic_adv = Adversary::start(basic_registry()).await;
    let oauth_adv = Adversary::start(|r| {
        if r.route() == "/token" {
            let ok = r.method == "POST"
                && r.form("grant_type").as_deref() == Some("refresh_token")
                && r.form("refresh_token").as_deref() == Some("refresh-123")
                && r.form("service").as_deref() == Some("test-registry")
                && r.form("scope").as_deref() == Some("repository:app/x:pull")
                && r.form("client_id").is_some();
            return if ok {
                Reply::json(json!({"access_token": "from-refresh", "expires_in": 300}))
            } else {
                Reply::status(401)
            };
        }
        if r.header("authorization") == Some("Bearer from-refresh") {
            Reply::ok(DATA)
        } else {
            Reply::bearer_challenge(
                &format!("{}/token", r.base),
                "test-registry",
                "repository:app/x:pull",
            )
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("bob:pw");
    let docker_config = json!({"auths": {
        basic_adv.host(): {"auth": auth},
        oauth_adv.host(): {"identitytoken": "refresh-123"},
    }});
    std::fs::write(&path, docker_config.to_string()).unwrap();
    let client = new_client(ClientConfig {
        use_docker_config: true,
        docker_config: Some(path),
        ..config()
    });
    for adv in [&basic_adv, &oauth_adv] {
        let bytes = client
            .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(&bytes[..], DATA);
    }
}

#[tokio::test]
async fn registry_error_envelopes_become_sentences() {
    let d = data_digest();
    let adv = Adversary::start(move |r| {
        let route = r.route();
        if route == "/token" {
            return Reply::json(json!({"token": "anonymous"}));
        }
        match route.strip_prefix("/v2/").unwrap_or("") {
            "app/x/manifests/v9" => Reply::error(404, "MANIFEST_UNKNOWN", "manifest unknown"),
            p if p.starts_with("app/x/manifests/sha256:") => {
                Reply::error(404, "MANIFEST_UNKNOWN", "manifest unknown")
            }
            "nope/manifests/v1" => {
                Reply::error(404, "NAME_UNKNOWN", "repository name not known to registry")
            }
            p if p.starts_with("app/x/blobs/") => {
                Reply::error(404, "BLOB_UNKNOWN", "blob unknown to registry")
            }
            "secret/manifests/v1" => {
                Reply::error(403, "DENIED", "requested access to the resource is denied")
            }
            "private/manifests/v1" => Reply::bearer_challenge(
                &format!("{}/token", r.base),
                "test-registry",
                "repository:private:pull",
            ),
            _ => Reply::error(400, "MANIFEST_INVALID", "manifest invalid"),
        }
    })
    .await;
    let client = new_client(config());
    let host = adv.host();
    let cases: Vec<(&str, String, String)> = vec![
        (
            REPO,
            "v9".into(),
            "tag v9 not found in repository app/x".into(),
        ),
        (
            REPO,
            d.to_string(),
            format!("manifest {d} not found in repository app/x"),
        ),
        ("nope", "v1".into(), "repository nope not found".into()),
        (
            "secret",
            "v1".into(),
            "access denied to secret: requested access to the resource is denied".into(),
        ),
        (
            "private",
            "v1".into(),
            "authentication required for private: pass --username and --password-stdin, or \
             docker login"
                .into(),
        ),
        (
            REPO,
            "bad".into(),
            format!(
                "registry error on {}/v2/app/x/manifests/bad: 400 Bad Request: \
                 MANIFEST_INVALID: manifest invalid",
                adv.url()
            ),
        ),
    ];
    for (repository, reference, want) in cases {
        let err = client
            .manifest(&host, repository, &reference)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), want, "{repository} {reference}");
    }
    let err = client
        .blob_bytes(&host, REPO, &d, 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("blob {d} not found in repository app/x")
    );
    let err = client.blob(&host, REPO, &d, 0, None).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("blob {d} not found in repository app/x")
    );
}

#[tokio::test]
async fn connection_refused_is_reported_quickly() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let client = new_client(ClientConfig {
        timeout: Duration::from_secs(2),
        max_retries: 1,
        ..config()
    });
    let started = Instant::now();
    let err = client
        .manifest(&addr.to_string(), REPO, "v1")
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "cannot reach https://{addr}/v2/app/x/manifests/v1: "
        )),
        "{message}"
    );
    assert!(message.contains("Connection refused"), "{message}");
    assert!(message.contains("(over https and plain http)"), "{message}");

    let err = new_client(ClientConfig {
        plain_http: true,
        max_retries: 0,
        ..config()
    })
    .ping(&addr.to_string())
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot reach http://{addr}/v2/: ")),
        "{err}"
    );
}

#[tokio::test]
async fn stalled_responses_time_out() {
    let adv = Adversary::start(|r| {
        if r.route().contains("/blobs/") {
            Reply::stalled(&DATA[..10])
        } else {
            Reply::hang()
        }
    })
    .await;
    let client = new_client(ClientConfig {
        timeout: Duration::from_millis(300),
        max_retries: 0,
        ..config()
    });

    let started = Instant::now();
    let err = client.manifest(&adv.host(), REPO, "v1").await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        err.to_string(),
        format!(
            "timed out after 300ms talking to {}/v2/app/x/manifests/v1: the registry did not answer in time",
            adv.url()
        )
    );

    let stream = client
        .blob(&adv.host(), REPO, &data_digest(), 0, None)
        .await
        .unwrap();
    let mut body = stream.body;
    assert_eq!(&body.next().await.unwrap().unwrap()[..], &DATA[..10]);
    let err = body.next().await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn loopback_registry_falls_back_to_http_once() {
    let adv = Adversary::start(|_| Reply::ok(DATA)).await;
    let client = new_client(config());
    for _ in 0..3 {
        client
            .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
            .await
            .unwrap();
    }
    assert_eq!(
        adv.tls_attempts(),
        1,
        "https is tried once, then http is remembered"
    );

    let plain = Adversary::start(|_| Reply::ok(DATA)).await;
    let client = new_client(ClientConfig {
        plain_http: true,
        ..config()
    });
    client.ping(&plain.host()).await.unwrap();
    assert_eq!(plain.tls_attempts(), 0);
}

#[tokio::test]
async fn tls_registry_is_trusted_only_with_its_ca() {
    let ca = TestCa::new();
    let adv = Adversary::start_tls(&ca, |_| Reply::ok(DATA)).await;
    let url = format!("https://{}{}", adv.host(), blob_route(&data_digest()));

    let err = new_client(config())
        .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Certificate { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("certificate verify failed for {url}: ")),
        "{message}"
    );
    assert!(
        message
            .ends_with(": pass --ca-cert FILE with the CA that signed the registry's certificate"),
        "{message}"
    );
    // Not transient, and the host does speak TLS: no retry, no plain-http fallback.
    assert_eq!(adv.connections(), 1);

    for trusting in [
        ClientConfig {
            ca_certs: vec![ca.ca_cert()],
            ..config()
        },
        ClientConfig {
            insecure_skip_tls_verify: true,
            ..config()
        },
    ] {
        let bytes = new_client(trusting)
            .blob_bytes(&adv.host(), REPO, &data_digest(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(&bytes[..], DATA);
    }
    assert_eq!(adv.requests().len(), 2);
}

#[test]
fn unusable_ca_certificates_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let missing = dir.path().join("missing.pem");
    let cases = [
        (
            not_pem.clone(),
            format!(
                "invalid CA certificate {}: no PEM certificate in it",
                not_pem.display()
            ),
        ),
        (
            missing.clone(),
            format!("cannot read CA certificate {}: ", missing.display()),
        ),
    ];
    for (path, want) in cases {
        let err = Client::new(ClientConfig {
            ca_certs: vec![path],
            ..config()
        })
        .unwrap_err();
        // The message with its cause (the io::Error is the error's source).
        let err = imagefs::error::Chain(&err).to_string();
        assert!(err.starts_with(&want), "{err}");
    }
}
