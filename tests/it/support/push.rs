//! Getting images into a test [`Registry`]: our own distribution-API client for images built
//! in code, and `skopeo` for the interop fixtures.
//!
//! The upload flow (distribution `docs/spec/api.md`, "Pushing An Image"):
//!
//! 1. `HEAD /v2/NAME/blobs/DIGEST` — 200 means the blob is there already, skip it;
//! 2. `POST /v2/NAME/blobs/uploads/` — 202 with `Location` (absolute or relative);
//! 3. `PUT LOCATION&digest=DIGEST` with the whole blob — 201;
//! 4. blobs first (layers, config, child manifests), then
//!    `PUT /v2/NAME/manifests/REFERENCE` with `Content-Type` = the manifest's media type.
//!
//! Credentials come from the registry itself: Basic sends the htpasswd user on every request;
//! Token mints a `pull,push` token directly from the issuer (no `/token` request, so issuer
//! counters only see the client under test).
//!
//! Everything here is synchronous: the HTTP work runs on a private thread with its own tokio
//! runtime ([`block_on`]), so the same calls work from plain and `#[tokio::test]` tests.
//! Failures panic with the registry's answer.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION};

use super::image::{Image, Index, sha256_digest};
use super::registry::{Auth, Registry};
use super::token::TOKEN_USER;

/// Runs `fut` to completion on a fresh current-thread runtime on a scoped thread, so it works
/// whether or not the caller is inside a runtime. Panics inside `fut` propagate.
pub fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build test runtime")
                .block_on(fut)
        });
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

impl Registry {
    /// The `Authorization` header value the harness uses to push to / read from `repo`.
    pub fn push_auth_header(&self, repo: &str) -> Option<String> {
        match self.auth() {
            Auth::Anonymous => None,
            Auth::Basic { user, pass } => {
                Some(format!("Basic {}", B64.encode(format!("{user}:{pass}"))))
            }
            Auth::Token => {
                let issuer = self.issuer().expect("token registry has an issuer");
                Some(format!(
                    "Bearer {}",
                    issuer.mint(Some(TOKEN_USER), &[&format!("repository:{repo}:pull,push")])
                ))
            }
        }
    }

    /// Pushes `image`'s layers, config and manifest to `repo`, tagging it `reference` (a tag,
    /// or the manifest digest to push untagged).
    pub fn push_image(&self, repo: &str, reference: &str, image: &Image) {
        let client = Pusher::new(self, repo);
        block_on(async {
            client.image(image).await;
            client
                .manifest(reference, &image.manifest.media_type, &image.manifest.bytes)
                .await;
        })
    }

    /// Pushes every image of `index` (by digest), its attestations, then the index itself as
    /// `reference`.
    pub fn push_index(&self, repo: &str, reference: &str, index: &Index) {
        let client = Pusher::new(self, repo);
        block_on(async {
            for image in index.images.iter().chain(&index.attestations) {
                client.image(image).await;
                client
                    .manifest(
                        &image.manifest.digest,
                        &image.manifest.media_type,
                        &image.manifest.bytes,
                    )
                    .await;
            }
            client
                .manifest(reference, &index.manifest.media_type, &index.manifest.bytes)
                .await;
        })
    }

    /// Uploads one blob (skipped if present) and returns its digest.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let client = Pusher::new(self, repo);
        block_on(client.blob(bytes))
    }

    /// PUTs exact manifest bytes with `media_type` as Content-Type (its blobs must be there).
    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
        let client = Pusher::new(self, repo);
        block_on(client.manifest(reference, media_type, bytes))
    }
}

/// A reqwest client bound to one registry repository and its credentials.
struct Pusher {
    http: reqwest::Client,
    base: url::Url,
    repo: String,
    auth: Option<String>,
}

impl Pusher {
    fn new(registry: &Registry, repo: &str) -> Pusher {
        Pusher {
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("build reqwest client"),
            base: url::Url::parse(&registry.url()).expect("registry url"),
            repo: repo.to_owned(),
            auth: registry.push_auth_header(repo),
        }
    }

    fn request(&self, method: reqwest::Method, url: url::Url) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match &self.auth {
            Some(h) => req.header(AUTHORIZATION, h),
            None => req,
        }
    }

    fn url(&self, path: &str) -> url::Url {
        self.base
            .join(&format!("/v2/{}/{path}", self.repo))
            .expect("registry path")
    }

    async fn image(&self, image: &Image) {
        for layer in &image.layers {
            self.blob(&layer.blob).await;
        }
        self.blob(&image.config.bytes).await;
    }

    async fn blob(&self, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let head = self
            .request(reqwest::Method::HEAD, self.url(&format!("blobs/{digest}")))
            .send()
            .await;
        if head.expect("HEAD blob").status() == StatusCode::OK {
            return digest;
        }
        let started = self
            .request(reqwest::Method::POST, self.url("blobs/uploads/"))
            .send()
            .await
            .expect("POST upload");
        let started = expect_status(started, StatusCode::ACCEPTED, "start blob upload").await;
        let location = started
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .expect("upload Location header");
        let mut put_url = self.base.join(location).expect("upload location url");
        put_url.query_pairs_mut().append_pair("digest", &digest);
        let done = self
            .request(reqwest::Method::PUT, put_url)
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .expect("PUT blob");
        expect_status(done, StatusCode::CREATED, &format!("upload blob {digest}")).await;
        digest
    }

    async fn manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) {
        let resp = self
            .request(
                reqwest::Method::PUT,
                self.url(&format!("manifests/{reference}")),
            )
            .header(CONTENT_TYPE, media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .expect("PUT manifest");
        expect_status(
            resp,
            StatusCode::CREATED,
            &format!("put manifest {}:{reference}", self.repo),
        )
        .await;
    }
}

async fn expect_status(resp: reqwest::Response, want: StatusCode, what: &str) -> reqwest::Response {
    if resp.status() == want {
        return resp;
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    panic!("{what}: registry answered {status}, wanted {want}: {body}");
}

// ---------------------------------------------------------------------------------------------
// skopeo and fixtures

/// The interop fixtures: `tests/fixtures` (see its README.md), or `IMAGEFS_FIXTURES` if set.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("IMAGEFS_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    };
    assert!(
        dir.is_dir(),
        "fixtures not found at {} (set IMAGEFS_FIXTURES)",
        dir.display()
    );
    dir
}

/// `fixtures_dir()/name`, e.g. `fixture_path("busybox-gzip.oci.tar")`.
pub fn fixture_path(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// skopeo's credential flags for `registry` with `prefix` `src-`, `dest-` or `` (inspect).
fn skopeo_creds(registry: &Registry, prefix: &str, repo: &str) -> Vec<String> {
    match registry.auth() {
        Auth::Anonymous => vec![format!("--{prefix}no-creds")],
        Auth::Basic { user, pass } => vec![format!("--{prefix}creds"), format!("{user}:{pass}")],
        Auth::Token => {
            let header = registry
                .push_auth_header(repo)
                .expect("token registry auth");
            let token = header.strip_prefix("Bearer ").expect("bearer header");
            vec![format!("--{prefix}registry-token"), token.to_owned()]
        }
    }
}

fn repo_of(repo_ref: &str) -> &str {
    let end = repo_ref.find(['@', ':']).unwrap_or(repo_ref.len());
    &repo_ref[..end]
}

/// Copies a fixture archive (`oci-archive:`) into `registry` as `repo_ref` (`REPO:TAG`),
/// byte for byte (no re-compression, no format conversion).
pub fn skopeo_copy_fixture(fixture: &Path, registry: &Registry, repo_ref: &str) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .args(skopeo_creds(registry, "dest-", repo_of(repo_ref)))
        .arg(format!("oci-archive:{}", fixture.display()))
        .arg(format!("docker://{}/{repo_ref}", registry.addr()));
    run_skopeo(cmd);
}

/// Copies `from` (`REPO:TAG`) to `to` within `registry`, converting the manifest to Docker
/// schema 1 (`--format v2s1`): skopeo 1.9 signs it with a throwaway key (distribution demands
/// a signature) and adds a throwaway entry on top for the image config.
pub fn skopeo_copy_to_schema1(registry: &Registry, from: &str, to: &str) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "--format", "v2s1"])
        .args(["--src-tls-verify=false", "--dest-tls-verify=false"])
        .args(skopeo_creds(registry, "src-", repo_of(from)))
        .args(skopeo_creds(registry, "dest-", repo_of(to)))
        .arg(format!("docker://{}/{from}", registry.addr()))
        .arg(format!("docker://{}/{to}", registry.addr()));
    run_skopeo(cmd);
}

/// `skopeo inspect --raw`: the exact manifest bytes the registry serves for `repo_ref`.
pub fn skopeo_inspect_raw(registry: &Registry, repo_ref: &str) -> Vec<u8> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["inspect", "--raw", "--tls-verify=false"])
        .args(skopeo_creds(registry, "", repo_of(repo_ref)))
        .arg(format!("docker://{}/{repo_ref}", registry.addr()));
    run_skopeo(cmd)
}

fn run_skopeo(mut cmd: Command) -> Vec<u8> {
    let shown = redacted_command_line(&cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run skopeo: {e} (run scripts/setup)"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The command line with the value after any credential flag replaced, for failure messages.
fn redacted_command_line(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    let mut hide_next = false;
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        words.push(if hide_next {
            "<redacted>".to_owned()
        } else {
            arg.clone().into_owned()
        });
        hide_next =
            arg.ends_with("creds") && !arg.ends_with("no-creds") || arg.ends_with("registry-token");
    }
    words.join(" ")
}
