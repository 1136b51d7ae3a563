//! `imagefs::registry::Client`'s push side: against the real registry (anonymous, htpasswd,
//! token auth) blobs go up in one PUT and in chunks, are found again, mounted across
//! repositories, and a manifest pushed reads back with the same digest; against the
//! adversarial server, what a real registry will not do on demand: 413, refused push rights,
//! connections dropped in the middle of a chunk.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use imagefs::oci::Digest;
use imagefs::registry::{BlobBody, BlobPush, Client, ClientConfig, Credentials, Error};
use serde_json::json;

use crate::support::adversary::{Adversary, Recorded, Reply};
use crate::support::{AccessLine, Auth, Registry, noise};

const REPO: &str = "push/app";
const OTHER: &str = "push/other";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CHUNK: u64 = 64 << 10;

fn config() -> ClientConfig {
    ClientConfig {
        use_docker_config: false,
        timeout: Duration::from_secs(5),
        max_retries: 2,
        upload_chunk_size: CHUNK,
        ..ClientConfig::default()
    }
}

fn client(config: ClientConfig) -> Client {
    Client::new(config).expect("client")
}

/// Every value `progress` was called with.
#[derive(Default)]
struct Progress(Mutex<Vec<u64>>);

impl Progress {
    fn record(&self) -> impl Fn(u64) + Send + Sync + '_ {
        |n| self.0.lock().unwrap().push(n)
    }

    fn last(&self) -> Option<u64> {
        self.0.lock().unwrap().last().copied()
    }
}

fn no_progress(_: u64) {}

/// Access-log lines of `method` on a route starting with `prefix`, answered `status`.
fn logged(lines: &[AccessLine], method: &str, prefix: &str, status: u16) -> usize {
    lines
        .iter()
        .filter(|l| l.method == method && l.uri.starts_with(prefix) && l.status == status)
        .count()
}

fn uploads(repo: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/")
}

/// A tiny OCI image manifest: `config` (a real config JSON) and one layer.
fn manifest(config: &[u8], layer: (&Digest, u64)) -> Vec<u8> {
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": Digest::sha256(config).to_string(),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer.0.to_string(),
            "size": layer.1,
        }],
    })
    .to_string()
    .into_bytes()
}

const CONFIG: &[u8] =
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;

/// The whole flow against a real registry with `auth`: a small blob in one PUT, a file of
/// several chunks in PATCHes, both found again, a mount into another repository (and a
/// mount that falls back to an upload), then a manifest that reads back with its digest.
async fn round_trip(auth: Auth) {
    let registry = Registry::start(auth);
    let host = registry.addr().to_owned();
    let client = client(ClientConfig {
        credentials: registry
            .credentials()
            .map(|(user, pass)| Credentials::new(user, pass)),
        ..config()
    });

    // Monolithic: one POST, one PUT with the body, no PATCH.
    let small = Bytes::from(noise(10_000, 1));
    let small_digest = Digest::sha256(&small);
    let progress = Progress::default();
    let pushed = client
        .push_blob(
            &host,
            REPO,
            &small_digest,
            small.len() as u64,
            &BlobBody::Bytes(small.clone()),
            None,
            &progress.record(),
        )
        .await
        .unwrap();
    assert_eq!(pushed, BlobPush::Uploaded);
    assert_eq!(progress.last(), Some(small.len() as u64));
    let log = registry.access_log();
    assert_eq!(logged(&log, "PUT", &uploads(REPO), 201), 1, "{log:#?}");
    assert_eq!(logged(&log, "PATCH", &uploads(REPO), 202), 0, "{log:#?}");

    // Chunked, from a file: 300 000 bytes in 64 KiB chunks is 5 PATCHes, then one PUT.
    let dir = tempfile::tempdir().unwrap();
    let big = noise(300_000, 2);
    let big_digest = Digest::sha256(&big);
    let big_path = dir.path().join("big");
    std::fs::write(&big_path, &big).unwrap();
    let big_body = BlobBody::File(big_path);
    let progress = Progress::default();
    let pushed = client
        .push_blob(
            &host,
            REPO,
            &big_digest,
            big.len() as u64,
            &big_body,
            None,
            &progress.record(),
        )
        .await
        .unwrap();
    assert_eq!(pushed, BlobPush::Uploaded);
    let sent = progress.0.lock().unwrap().clone();
    assert_eq!(sent, [0, 65536, 131072, 196608, 262144, 300000]);
    let log = registry.access_log();
    assert_eq!(logged(&log, "PATCH", &uploads(REPO), 202), 5, "{log:#?}");
    assert_eq!(logged(&log, "PUT", &uploads(REPO), 201), 2, "{log:#?}");
    assert!(client.blob_exists(&host, REPO, &big_digest).await.unwrap());
    let fetched = client
        .blob_bytes(&host, REPO, &big_digest, 1 << 20)
        .await
        .unwrap();
    assert_eq!(fetched, big);

    // Present: HEAD only.
    let pushed = client
        .push_blob(
            &host,
            REPO,
            &big_digest,
            big.len() as u64,
            &big_body,
            None,
            &no_progress,
        )
        .await
        .unwrap();
    assert_eq!(pushed, BlobPush::Exists);
    assert_eq!(
        logged(&registry.access_log(), "POST", &uploads(REPO), 202),
        2,
        "no upload started for a blob that is there"
    );

    // Mounted into another repository: one POST answered 201, no upload.
    assert!(!client.blob_exists(&host, OTHER, &big_digest).await.unwrap());
    let pushed = client
        .push_blob(
            &host,
            OTHER,
            &big_digest,
            big.len() as u64,
            &big_body,
            Some(REPO),
            &no_progress,
        )
        .await
        .unwrap();
    assert_eq!(pushed, BlobPush::Mounted);
    let log = registry.access_log();
    let mount = format!("{}?mount={big_digest}&from={REPO}", uploads(OTHER));
    assert_eq!(logged(&log, "POST", &mount, 201), 1, "{log:#?}");
    assert_eq!(logged(&log, "PATCH", &uploads(OTHER), 202), 0, "{log:#?}");
    assert!(client.blob_exists(&host, OTHER, &big_digest).await.unwrap());

    // A mount from a repository without the blob: the registry starts an upload instead
    // (202), and that session is used.
    let config_digest = Digest::sha256(CONFIG);
    let pushed = client
        .push_blob(
            &host,
            REPO,
            &config_digest,
            CONFIG.len() as u64,
            &BlobBody::Bytes(Bytes::from_static(CONFIG)),
            Some("push/nothing-here"),
            &no_progress,
        )
        .await
        .unwrap();
    assert_eq!(pushed, BlobPush::Uploaded);
    let log = registry.access_log();
    assert_eq!(
        logged(&log, "POST", &format!("{}?mount=", uploads(REPO)), 202),
        1,
        "{log:#?}"
    );

    // The manifest, by tag; read back with the same digest and bytes.
    let bytes = manifest(CONFIG, (&big_digest, big.len() as u64));
    let digest = client
        .push_manifest(&host, REPO, "v1", OCI_MANIFEST, &bytes)
        .await
        .unwrap();
    assert_eq!(digest, Digest::sha256(&bytes));
    let read = client.manifest(&host, REPO, "v1").await.unwrap();
    assert_eq!(read.digest, digest);
    assert_eq!(&read.bytes[..], &bytes[..]);
    assert_eq!(read.content_type.as_deref(), Some(OCI_MANIFEST));
    // And by digest into the other repository, once its config is there too.
    let pushed = client
        .push_blob(
            &host,
            OTHER,
            &config_digest,
            CONFIG.len() as u64,
            &BlobBody::Bytes(Bytes::from_static(CONFIG)),
            Some(REPO),
            &no_progress,
        )
        .await
        .unwrap();
    assert_eq!(pushed, BlobPush::Mounted);
    let by_digest = client
        .push_manifest(&host, OTHER, &digest.to_string(), OCI_MANIFEST, &bytes)
        .await
        .unwrap();
    assert_eq!(by_digest, digest);
    assert_eq!(
        client
            .manifest(&host, OTHER, &digest.to_string())
            .await
            .unwrap()
            .digest,
        digest
    );

    if let Some(issuer) = registry.issuer() {
        let scopes: Vec<Vec<String>> = issuer.requests().into_iter().map(|r| r.scopes).collect();
        let push = format!("repository:{REPO}:pull,push");
        assert!(scopes.contains(&vec![push.clone()]), "{scopes:?}");
        assert!(
            scopes.contains(&vec![
                format!("repository:{OTHER}:pull,push"),
                format!("repository:{REPO}:pull"),
            ]),
            "the mount asks to read where it mounts from: {scopes:?}"
        );
        assert!(
            issuer.requests().iter().all(|r| r.status == 200),
            "{:?}",
            issuer.requests()
        );
    }
}

#[tokio::test]
async fn round_trip_anonymous() {
    round_trip(Auth::Anonymous).await;
}

#[tokio::test]
async fn round_trip_basic_auth() {
    round_trip(Auth::basic("pusher", "s3cret-push")).await;
}

#[tokio::test]
async fn round_trip_token_auth() {
    round_trip(Auth::Token).await;
}

#[tokio::test]
async fn wrong_body_is_refused_before_anything_is_sent() {
    let adv = Adversary::start(|_| Reply::status(500)).await;
    let client = client(ClientConfig {
        plain_http: true,
        ..config()
    });
    let data = Bytes::from(noise(1000, 3));
    let digest = Digest::sha256(&data);
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, &data[..999]).unwrap();
    let cases = [
        (
            BlobBody::Bytes(data.slice(1..)),
            digest.clone(),
            1000,
            "the body is 999 bytes, not 1000".to_owned(),
        ),
        (
            BlobBody::Bytes(Bytes::from(noise(1000, 5))),
            digest.clone(),
            1000,
            "the body's digest is sha256:".to_owned(),
        ),
        (
            BlobBody::File(short.clone()),
            digest.clone(),
            1000,
            format!("{} is 999 bytes, not 1000", short.display()),
        ),
    ];
    for (body, digest, size, want) in cases {
        let err = client
            .push_blob(&adv.host(), REPO, &digest, size, &body, None, &no_progress)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::BadBlob { .. }), "{err}");
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("blob {digest} to push: ")) && shown.contains(&want),
            "{shown}"
        );
    }
    assert!(adv.requests().is_empty(), "{:?}", adv.requests());
}

/// An upload endpoint in memory, on the adversarial server: POST opens a session (a relative
/// Location with a query), PATCH appends (checking `Content-Range` and `Content-Type`; the
/// next Location is absolute), PUT completes when the bytes hash to `digest`; a blob HEAD is
/// 404, a manifest PUT 201. `fault` answers first when it has something to say.
fn fake_registry(
    fault: impl Fn(&Recorded) -> Option<Reply> + Send + Sync + 'static,
) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    let sessions: Mutex<HashMap<String, Vec<u8>>> = Mutex::default();
    let next = AtomicUsize::new(0);
    let uploads = uploads(REPO);
    move |r| {
        if let Some(reply) = fault(r) {
            return reply;
        }
        let session = r.route().strip_prefix(&uploads).unwrap_or_default();
        let mut sessions = sessions.lock().unwrap();
        match (r.method.as_str(), session) {
            ("HEAD", _) => Reply::status(404),
            ("POST", "") => {
                let id = format!("s{}", next.fetch_add(1, Ordering::SeqCst));
                sessions.insert(id.clone(), Vec::new());
                Reply::status(202).header("location", &format!("{uploads}{id}?_state=0"))
            }
            ("PATCH", id) if r.query("_state").is_some() => {
                let Some(data) = sessions.get_mut(id) else {
                    return Reply::error(404, "BLOB_UPLOAD_UNKNOWN", "no such upload");
                };
                let range = r.header("content-range").unwrap_or_default();
                let want = format!("{}-{}", data.len(), data.len() + r.body.len() - 1);
                if range != want || r.header("content-type") != Some("application/octet-stream") {
                    return Reply::error(416, "BLOB_UPLOAD_INVALID", &format!("range {range}"));
                }
                data.extend_from_slice(&r.body);
                Reply::status(202)
                    .header(
                        "location",
                        &format!("{}{uploads}{id}?_state={}", r.base, data.len()),
                    )
                    .header("range", &format!("0-{}", data.len() - 1))
            }
            ("PUT", id) if r.route().starts_with(&uploads) => {
                let Some(mut data) = sessions.remove(id) else {
                    return Reply::error(404, "BLOB_UPLOAD_UNKNOWN", "no such upload");
                };
                data.extend_from_slice(&r.body);
                let digest = r.query("digest").unwrap_or_default();
                if Digest::sha256(&data).to_string() != digest {
                    return Reply::error(400, "DIGEST_INVALID", "digest mismatch");
                }
                Reply::status(201).header("docker-content-digest", &digest)
            }
            ("PUT", _) if r.route().contains("/manifests/") => Reply::status(201),
            _ => Reply::status(404),
        }
    }
}

fn adversary_client() -> Client {
    client(ClientConfig {
        plain_http: true,
        upload_chunk_size: 1000,
        ..config()
    })
}

/// A caller that pushes an image's blobs first, then its manifest.
async fn push_image(client: &Client, host: &str, layer: &Bytes) -> Result<Digest, Error> {
    let digest = Digest::sha256(layer);
    let size = layer.len() as u64;
    let body = BlobBody::Bytes(layer.clone());
    client
        .push_blob(host, REPO, &digest, size, &body, None, &no_progress)
        .await?;
    let bytes = manifest(CONFIG, (&digest, size));
    client
        .push_manifest(host, REPO, "v1", OCI_MANIFEST, &bytes)
        .await
}

#[tokio::test]
async fn chunked_upload_against_the_fake_registry_sends_what_the_spec_says() {
    let adv = Adversary::start(fake_registry(|_| None)).await;
    let layer = Bytes::from(noise(4500, 6));
    push_image(&adversary_client(), &adv.host(), &layer)
        .await
        .unwrap();
    let methods: Vec<String> = adv
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.route()))
        .collect();
    let session = format!("{}s0", uploads(REPO));
    let digest = Digest::sha256(&layer);
    assert_eq!(
        methods,
        [
            format!("HEAD /v2/{REPO}/blobs/{digest}"),
            format!("POST {}", uploads(REPO)),
            format!("PATCH {session}"),
            format!("PATCH {session}"),
            format!("PATCH {session}"),
            format!("PATCH {session}"),
            format!("PATCH {session}"),
            format!("PUT {session}"),
            format!("PUT /v2/{REPO}/manifests/v1"),
        ]
    );
    let requests = adv.requests();
    let put = &requests[7];
    assert!(put.body.is_empty());
    assert_eq!(
        put.query("_state").as_deref(),
        Some("4500"),
        "the last Location"
    );
    assert_eq!(put.query("digest"), Some(digest.to_string()));
    assert_eq!(requests[1].header("content-length"), Some("0"), "POST");
    assert_eq!(put.header("content-length"), Some("0"), "final PUT");
    assert_eq!(requests[8].header("content-type"), Some(OCI_MANIFEST));
}

#[tokio::test]
async fn payload_too_large_names_the_blob_and_its_size() {
    let adv = Adversary::start(fake_registry(|r| {
        (r.method == "PUT" && r.route().contains("/blobs/uploads/"))
            .then(|| Reply::error(413, "SIZE_INVALID", "request entity too large"))
    }))
    .await;
    let layer = Bytes::from(noise(900, 7));
    let digest = Digest::sha256(&layer);
    let err = push_image(&adversary_client(), &adv.host(), &layer)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BlobTooLarge { .. }), "{err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!(
            "registry {}{}s0?_state=0&digest=",
            adv.url(),
            uploads(REPO)
        )) && shown.contains(&format!(
            "refused blob {digest} (900 bytes) for {REPO} as too large (413 Payload Too Large): \
             SIZE_INVALID: request entity too large: "
        )),
        "{shown}"
    );
    assert_eq!(
        adv.requests_to(&uploads(REPO)).len(),
        1,
        "a 413 is not retried"
    );
    assert!(
        adv.requests()
            .iter()
            .all(|r| !r.path.contains("/manifests/"))
    );
}

#[tokio::test]
async fn denied_push_says_so() {
    let adv = Adversary::start(fake_registry(|r| {
        (r.method == "POST")
            .then(|| Reply::error(403, "DENIED", "requested access to the resource is denied"))
    }))
    .await;
    let client = client(ClientConfig {
        plain_http: true,
        credentials: Some(Credentials::new("reader", "pw")),
        ..config()
    });
    let err = push_image(&client, &adv.host(), &Bytes::from_static(b"layer"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PushDenied { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "push access to {REPO} denied: requested access to the resource is denied: use \
             credentials with push access to it (--username and --password-stdin, or docker login)"
        )
    );
    let posts = adv.requests().iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, 1, "a refusal is not retried");
    assert!(adv.requests().iter().all(|r| r.method != "PUT"));
}

/// The real token registry's issuer gives anonymous clients `pull` on `public/*` and nothing
/// more: the upload is answered 401 `insufficient_scope` even with a fresh token.
#[tokio::test]
async fn token_without_push_scope_is_a_push_denied() {
    let registry = Registry::start(Auth::Token);
    let client = client(config());
    let data = Bytes::from_static(b"public data");
    let digest = Digest::sha256(&data);
    let err = client
        .push_blob(
            registry.addr(),
            "public/app",
            &digest,
            data.len() as u64,
            &BlobBody::Bytes(data),
            None,
            &no_progress,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PushDenied { .. }), "{err}");
    assert!(
        err.to_string().starts_with(
            "push access to public/app denied: the token issued for anonymous access has no \
             push scope: "
        ),
        "{err}"
    );
    let issuer = registry.issuer().unwrap();
    assert!(
        issuer
            .requests()
            .iter()
            .all(|r| r.scopes == ["repository:public/app:pull,push"]),
        "{:?}",
        issuer.requests()
    );
    let log = registry.access_log();
    assert_eq!(
        logged(&log, "POST", &uploads("public/app"), 401),
        2,
        "{log:#?}"
    );
    assert!(log.iter().all(|l| l.method != "PUT" && l.method != "PATCH"));
}

/// A file larger than a chunk is hashed while read: when it does not match, its chunks went
/// up, but the upload is never completed with the wrong digest.
#[tokio::test]
async fn file_that_does_not_match_is_never_completed() {
    let adv = Adversary::start(fake_registry(|_| None)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer");
    std::fs::write(&path, noise(2500, 10)).unwrap();
    let digest = Digest::sha256(&noise(2500, 11));
    let err = adversary_client()
        .push_blob(
            &adv.host(),
            REPO,
            &digest,
            2500,
            &BlobBody::File(path.clone()),
            None,
            &no_progress,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BadBlob { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "blob {digest} to push: {}: the file's digest is sha256:",
            path.display()
        )),
        "{err}"
    );
    let methods: Vec<String> = adv.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(
        methods,
        ["HEAD", "POST", "PATCH", "PATCH", "PATCH"],
        "not retried, no PUT"
    );
}

#[tokio::test]
async fn connection_dropped_mid_chunk_restarts_the_upload() {
    let patches = AtomicUsize::new(0);
    let adv = Adversary::start(fake_registry(move |r| {
        // The second PATCH of the first session: the upload is half done.
        (r.method == "PATCH" && patches.fetch_add(1, Ordering::SeqCst) == 1)
            .then(Reply::drop_connection)
    }))
    .await;
    let layer = Bytes::from(noise(2500, 8));
    let progress = Progress::default();
    let digest = Digest::sha256(&layer);
    let pushed = adversary_client()
        .push_blob(
            &adv.host(),
            REPO,
            &digest,
            2500,
            &BlobBody::Bytes(layer),
            None,
            &progress.record(),
        )
        .await
        .unwrap();
    assert_eq!(pushed, BlobPush::Uploaded);
    let sent = progress.0.lock().unwrap().clone();
    assert_eq!(
        sent,
        [0, 1000, 0, 1000, 2000, 2500],
        "the second attempt from 0"
    );
    let routes: Vec<String> = adv
        .requests()
        .iter()
        .filter(|r| r.method != "HEAD")
        .map(|r| format!("{} {}", r.method, r.route()))
        .collect();
    let (s0, s1) = (
        format!("{}s0", uploads(REPO)),
        format!("{}s1", uploads(REPO)),
    );
    assert_eq!(
        routes,
        [
            format!("POST {}", uploads(REPO)),
            format!("PATCH {s0}"),
            format!("PATCH {s0}"),
            format!("POST {}", uploads(REPO)),
            format!("PATCH {s1}"),
            format!("PATCH {s1}"),
            format!("PATCH {s1}"),
            format!("PUT {s1}"),
        ]
    );
}

#[tokio::test]
async fn connection_always_dropped_fails_the_blob_and_no_manifest_is_sent() {
    let adv = Adversary::start(fake_registry(|r| {
        (r.method == "PATCH").then(Reply::drop_connection)
    }))
    .await;
    let layer = Bytes::from(noise(2500, 9));
    let digest = Digest::sha256(&layer);
    let err = push_image(&adversary_client(), &adv.host(), &layer)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UploadFailed { .. }), "{err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!(
            "upload of blob {digest} (2500 bytes) to {REPO} failed after 3 attempt(s): cannot \
             reach {}{}s2?_state=0: ",
            adv.url(),
            uploads(REPO)
        )),
        "{shown}"
    );
    let posts = adv.requests().iter().filter(|r| r.method == "POST").count();
    assert_eq!(
        posts, 3,
        "max_retries 2: three attempts, each from the POST"
    );
    assert!(
        adv.requests()
            .iter()
            .all(|r| !r.route().contains("/manifests/")),
        "no manifest PUT after a failed blob: {:?}",
        adv.requests()
    );
}

#[tokio::test]
async fn refused_manifest_quotes_the_registry() {
    let registry = Registry::start(Auth::Anonymous);
    let client = client(config());
    let missing = Digest::sha256(b"never pushed");
    let bytes = manifest(CONFIG, (&missing, 12));
    let err = client
        .push_manifest(registry.addr(), REPO, "v1", OCI_MANIFEST, &bytes)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ManifestRefused { .. }), "{err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!(
            "registry refused manifest v1 for {REPO}: 400 Bad Request: "
        )) && shown.contains("MANIFEST_BLOB_UNKNOWN")
            && shown.ends_with(": push the blobs it references (layers, config) first"),
        "{shown}"
    );

    // A digest reference that is not the bytes' digest is refused before sending.
    let err = client
        .push_manifest(
            registry.addr(),
            REPO,
            &missing.to_string(),
            OCI_MANIFEST,
            &bytes,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BadManifest { .. }), "{err}");
    let log = registry.access_log();
    assert_eq!(
        log.iter().filter(|l| l.uri.contains("/manifests/")).count(),
        1,
        "{log:#?}"
    );
}
