//! `imagefs pull`, `inspect` and `layers` end to end: the real binary against real
//! `docker-registry`s (anonymous, htpasswd Basic, Docker-Hub-like tokens).
//!
//! What is proved here, as a user sees it: credentials from flags, environment and docker
//! config work and never show in the output; digests agree with skopeo, the registry and the
//! image builder; `--platform` picks the right entry of an index; the cache layout, reuse
//! (no second download, no request at all by digest, `--offline` with the registry gone);
//! verification refuses bad layers and stores nothing; two pulls at once share one download;
//! every failure is exit 1 and exactly one `imagefs: …` line on stderr.
//!
//! Every command gets `-q` unless the test reads progress or logs, so that stderr holds
//! nothing but the error line.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::support::adversary::{Adversary, Reply};
use crate::support::registry::free_port;
use crate::support::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

// ---------------------------------------------------------------------------------------------
// Helpers

/// A three-layer image: gzip, zstd and uncompressed, with content unique to `seed` so that
/// images of different tests never share blobs.
fn three_layer_image(format: Format, seed: &str) -> Image {
    let layer = |name: &str, c: Compression| {
        Layer::new(
            &[
                Entry::dir("etc"),
                Entry::file(format!("etc/{name}"), format!("{seed}: {name} layer\n")),
            ],
            c,
        )
    };
    ImageBuilder::new(format)
        .env(&["PATH=/bin"])
        .cmd(&["/bin/sh"])
        .layer(layer("gzip", Compression::Gzip))
        .layer(layer("zstd", Compression::Zstd))
        .layer(layer("plain", Compression::None))
        .build()
}

/// The hex part of `sha256:HEX`.
fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("a sha256 digest")
}

/// A failure as the user sees it: exit code 1, nothing on stdout, and exactly one line on
/// stderr, `imagefs: …`, that mentions every one of `needles`. Run the command with `-q`.
#[track_caller]
fn assert_error_line(out: &Output, needles: &[&str]) {
    for needle in needles {
        out.assert_failure_contains(needle);
    }
    assert_eq!(out.status.code(), Some(1), "exit code\n{}", out.report());
    let stderr = out.stderr_str();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("imagefs: "),
        "expected exactly one `imagefs: ` line on stderr\n{}",
        out.report()
    );
    assert!(out.stdout.is_empty(), "stdout on failure\n{}", out.report());
}

/// A `-q` success: exit 0 and not a byte on stderr.
#[track_caller]
fn assert_quiet_success(out: &Output) {
    out.assert_success();
    assert!(out.stderr.is_empty(), "stderr with -q\n{}", out.report());
}

/// Neither `secrets` nor anything that looks like a JWT (`eyJ…`, the base64 of `{"`) shows
/// in stdout or stderr.
#[track_caller]
fn assert_no_secrets(out: &Output, secrets: &[&str]) {
    let all = format!("{}{}", out.stdout_str(), out.stderr_str());
    for secret in secrets.iter().copied().chain(["eyJ"]) {
        assert!(
            !all.contains(secret),
            "a secret ({} bytes, starting {:?}) shows in the output of: {}",
            secret.len(),
            &secret[..secret.len().min(3)],
            out.command_line
        );
    }
}

/// `inspect --format json` of `reference`, parsed.
fn inspect_json(imagefs: &Imagefs, reference: &str, extra: &[&str]) -> Value {
    let out = imagefs
        .cmd(["-q", "inspect", "--format", "json"])
        .args(extra)
        .arg(reference)
        .run();
    assert_quiet_success(&out);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("inspect printed no JSON: {e}\n{}", out.report()))
}

/// One row of `imagefs layers`: digest, media type, size, compression, state.
#[derive(Debug, PartialEq, Eq)]
struct LayerRow {
    digest: String,
    media_type: String,
    size: u64,
    compression: String,
    state: String,
}

fn layers(imagefs: &Imagefs, reference: &str, extra: &[&str]) -> Vec<LayerRow> {
    let out = imagefs
        .cmd(["-q", "layers"])
        .args(extra)
        .arg(reference)
        .run();
    assert_quiet_success(&out);
    out.stdout_str()
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 5, "layers line {line:?}\n{}", out.report());
            LayerRow {
                digest: f[0].to_owned(),
                media_type: f[1].to_owned(),
                size: f[2].parse().expect("layers size column"),
                compression: f[3].to_owned(),
                state: f[4].to_owned(),
            }
        })
        .collect()
}

/// What `imagefs layers` must print for `image`, every layer in `state`.
fn expected_rows(image: &Image, state: &str) -> Vec<LayerRow> {
    image
        .layers
        .iter()
        .map(|l| LayerRow {
            digest: l.digest.clone(),
            media_type: l.media_type(image.format).to_owned(),
            size: l.size(),
            compression: match l.compression {
                Compression::None => "none",
                Compression::Gzip => "gzip",
                Compression::Zstd => "zstd",
            }
            .to_owned(),
            state: state.to_owned(),
        })
        .collect()
}

/// Writes `DOCKER_CONFIG/config.json` with `user:pass` for `registry`, as `docker login`
/// does.
fn write_docker_config(imagefs: &Imagefs, registry: &Registry, user: &str, pass: &str) {
    let config = json!({
        "auths": { registry.addr(): { "auth": B64.encode(format!("{user}:{pass}")) } }
    });
    std::fs::write(
        imagefs.docker_config_dir().join("config.json"),
        config.to_string(),
    )
    .expect("write docker config.json");
}

/// GETs of any blob the registry has served so far.
fn blob_gets(registry: &Registry) -> usize {
    registry
        .access_log()
        .iter()
        .filter(|l| l.method == "GET" && l.uri.contains("/blobs/"))
        .count()
}

/// A blob exactly as the registry serves it (with the harness's credentials).
fn fetch_blob(registry: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let url = format!("{}/v2/{repo}/blobs/{digest}", registry.url());
    let auth = registry.push_auth_header(repo);
    block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut req = client.get(&url);
        if let Some(a) = auth {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        let resp = req.send().await.expect("GET blob");
        assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
        resp.bytes().await.expect("blob body").to_vec()
    })
}

/// Names in `dir` (empty if it does not exist).
fn names(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Every blob under `blobs/sha256` hashes to its name, and nothing is left half-done in
/// `partial/` or `tmp/`.
#[track_caller]
fn assert_cache_consistent(imagefs: &Imagefs) {
    let cache = imagefs.cache_dir();
    for name in names(&cache.join("blobs/sha256")) {
        let bytes = std::fs::read(cache.join("blobs/sha256").join(&name)).unwrap();
        assert_eq!(hex(&sha256_digest(&bytes)), name, "blob {name} is corrupt");
    }
    assert_eq!(names(&cache.join("partial")), BTreeSet::new(), "partial/");
    assert_eq!(names(&cache.join("tmp")), BTreeSet::new(), "tmp/");
}

// ---------------------------------------------------------------------------------------------
// 1. Authentication

/// Where `imagefs` gets credentials from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// `--username U --password-stdin`, the password on stdin.
    Flags,
    /// `IMAGEFS_USERNAME` / `IMAGEFS_PASSWORD`.
    Env,
    /// `DOCKER_CONFIG/config.json` with `auths.HOST:PORT.auth`.
    DockerConfig,
}

/// `imagefs -vvv pull reference` in a fresh cache with credentials from `source`.
fn pull_with(source: Source, registry: &Registry, reference: &str, user: &str, pass: &str) {
    let imagefs = Imagefs::new();
    let mut cmd = imagefs.cmd(["-vvv", "pull"]);
    match source {
        Source::Flags => {
            cmd = cmd
                .args(["--username", user, "--password-stdin"])
                .stdin(format!("{pass}\n"))
        }
        Source::Env => {
            cmd = cmd
                .env("IMAGEFS_USERNAME", user)
                .env("IMAGEFS_PASSWORD", pass)
        }
        Source::DockerConfig => write_docker_config(&imagefs, registry, user, pass),
    }
    let out = cmd.arg(reference).run();
    out.assert_success();
    assert!(
        out.stdout_str().contains("Digest: sha256:"),
        "{source:?}\n{}",
        out.report()
    );
    // The most verbose logging still shows neither the password nor the Basic header.
    let basic = B64.encode(format!("{user}:{pass}"));
    assert_no_secrets(&out, &[pass, &basic]);
    // Everything landed: the layers are listed as cached without asking the registry.
    for row in layers(&imagefs, reference, &["--offline"]) {
        assert_eq!(row.state, "cached", "{source:?}: {row:?}");
    }
}

#[test]
fn basic_auth_pull_takes_credentials_from_flags_env_and_docker_config() {
    let (user, pass) = ("alice", "Basic-s3cret-Pa55");
    let registry = Registry::start(Auth::basic(user, pass));
    registry.push_image("team/app", "v1", &three_layer_image(Format::Oci, "basic"));
    let reference = registry.reference("team/app:v1");
    for source in [Source::Flags, Source::Env, Source::DockerConfig] {
        pull_with(source, &registry, &reference, user, pass);
    }
}

#[test]
fn token_auth_pull_takes_credentials_from_flags_env_and_docker_config() {
    let registry = Registry::start(Auth::Token);
    registry.push_image(
        "private/app",
        "v1",
        &three_layer_image(Format::Oci, "token"),
    );
    let reference = registry.reference("private/app:v1");
    let issuer = registry.issuer().unwrap();
    for source in [Source::Flags, Source::Env, Source::DockerConfig] {
        let before = issuer.request_count();
        pull_with(source, &registry, &reference, TOKEN_USER, TOKEN_PASS);
        // The credentials went to the token realm, which granted a token.
        let asked: Vec<TokenRequest> = issuer.requests().split_off(before);
        assert!(
            asked
                .iter()
                .any(|r| r.user.as_deref() == Some(TOKEN_USER) && r.status == 200),
            "{source:?}: token requests {asked:?}"
        );
    }
}

#[test]
fn token_registry_serves_public_anonymously_and_refuses_private() {
    let registry = Registry::start(Auth::Token);
    let image = three_layer_image(Format::Docker, "public");
    registry.push_image("public/app", "v1", &image);
    registry.push_image("private/app", "v1", &image);

    let imagefs = Imagefs::new();
    assert_quiet_success(
        &imagefs
            .cmd(["-q", "pull", &registry.reference("public/app:v1")])
            .run(),
    );
    let requests = registry.issuer().unwrap().requests();
    assert!(
        requests.iter().all(|r| r.user.is_none()),
        "anonymous pull sent credentials: {requests:?}"
    );

    // Same content, private repository: refused even though the blobs are cached.
    let out = imagefs
        .cmd(["-q", "pull", &registry.reference("private/app:v1")])
        .run();
    assert_error_line(&out, &["authentication required", "private/app"]);
}

#[test]
fn missing_or_wrong_credentials_fail_with_one_clear_line() {
    let basic = Registry::start(Auth::basic("bob", "right-Pa55word"));
    basic.push_image("team/app", "v1", &three_layer_image(Format::Oci, "bob"));
    let token = Registry::start(Auth::Token);
    token.push_image("private/app", "v1", &three_layer_image(Format::Oci, "tok"));
    let cases = [
        (&basic, "team/app:v1", "bob"),
        (&token, "private/app:v1", TOKEN_USER),
    ];
    for (registry, repo_ref, user) in cases {
        let reference = registry.reference(repo_ref);
        let imagefs = Imagefs::new();

        let out = imagefs.cmd(["-q", "pull", &reference]).run();
        assert_error_line(&out, &["authentication required", "--password-stdin"]);

        let wrong = "Wr0ng-Pa55word-xyz";
        let with_wrong = |verbosity: &str| {
            imagefs
                .cmd([verbosity, "pull", "--username", user, "--password-stdin"])
                .arg(&reference)
                .stdin(format!("{wrong}\n"))
                .run()
        };
        let out = with_wrong("-q");
        assert_error_line(&out, &["authentication failed", &format!("user {user}")]);
        assert_no_secrets(&out, &[wrong]);
        let out = with_wrong("-vvv");
        out.assert_failure_contains("authentication failed");
        assert_no_secrets(&out, &[wrong, &B64.encode(format!("{user}:{wrong}"))]);
        assert_eq!(names(&imagefs.cache_dir().join("layers/sha256")).len(), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. inspect: digests

/// `inspect --format json` of a freshly pushed `format` image against skopeo, the registry's
/// config blob and the builder; `inspect` fetches no layer.
fn check_inspect(format: Format, media_type: &str) {
    let registry = Registry::start(Auth::Anonymous);
    let repo = format!("inspect/{}", format!("{format:?}").to_lowercase());
    let image = three_layer_image(format, &repo);
    registry.push_image(&repo, "latest", &image);

    let imagefs = Imagefs::new();
    // No tag: normalised to `:latest`.
    let j = inspect_json(&imagefs, &registry.reference(&repo), &[]);

    let raw = skopeo_inspect_raw(&registry, &format!("{repo}:latest"));
    assert_eq!(j["manifestDigest"], sha256_digest(&raw));
    assert_eq!(j["manifestDigest"], image.manifest.digest.as_str());
    assert_eq!(j["mediaType"], media_type);
    let config = fetch_blob(&registry, &repo, &image.config.digest);
    assert_eq!(j["configDigest"], sha256_digest(&config));
    assert_eq!(j["imageId"], sha256_digest(&config));
    assert_eq!(
        j["reference"],
        registry.reference(&format!("{repo}:latest"))
    );
    assert_eq!(
        j["platform"],
        json!({"os": "linux", "architecture": "amd64", "variant": null})
    );
    let want: Vec<Value> = image
        .layers
        .iter()
        .map(|l| {
            json!({
                "digest": l.digest,
                "size": l.size(),
                "mediaType": l.media_type(format),
                "diffId": l.diff_id,
            })
        })
        .collect();
    assert_eq!(j["layers"], Value::Array(want));
    assert_eq!(j["config"], image.config.json());

    // The text form says the same.
    let text = imagefs
        .cmd(["-q", "inspect", &registry.reference(&repo)])
        .run();
    assert_quiet_success(&text);
    let text = text.stdout_str();
    for want in [
        format!("Digest:     {}", image.manifest.digest),
        format!("Image ID:   {}", image.config.digest),
        format!("Media type: {media_type}"),
        "Platform:   linux/amd64".to_owned(),
    ] {
        assert!(text.contains(&want), "{want:?} missing from\n{text}");
    }

    for l in &image.layers {
        assert_eq!(registry.blob_gets(&l.digest), 0, "inspect fetched a layer");
    }
    assert_eq!(
        layers(&imagefs, &registry.reference(&repo), &[]),
        expected_rows(&image, "not-cached")
    );
}

#[test]
fn inspect_reports_the_digests_of_an_oci_image_with_gzip_zstd_and_plain_layers() {
    check_inspect(Format::Oci, OCI_MANIFEST);
}

#[test]
fn inspect_reports_the_digests_of_a_docker_v2s2_image() {
    check_inspect(Format::Docker, DOCKER_MANIFEST);
}

#[test]
fn inspect_reports_the_published_digests_of_the_busybox_fixture() {
    let registry = Registry::start(Auth::Anonymous);
    skopeo_copy_fixture(
        &fixture_path("busybox-gzip.oci.tar"),
        &registry,
        "busybox:gzip",
    );
    let reference = registry.reference("busybox:gzip");
    let imagefs = Imagefs::new();
    let j = inspect_json(&imagefs, &reference, &[]);

    // The digests tests/fixtures/README.md publishes.
    let manifest = "sha256:58c10d4df457869bd067f4225c4c4adbb117e4ca55c397a842adc39c3824a9bd";
    let config = "sha256:ea1e34ae6a075f7873877277dccbd47836d068385194f7bc0dd3ef58d06f0dd4";
    let gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
    let want_layers = json!([
        {
            "digest": "sha256:f00d6d9b6fcc022985defa8c121c3196d481aa1d00a2350aac1b49e70121ea4a",
            "size": 2430061,
            "mediaType": gzip,
            "diffId": "sha256:07d7204b62bbef8aa94a0523c1c81c8452336f5f622abc1b5ef528d8380f8de0",
        },
        {
            "digest": "sha256:8de7e9c5b10a3e2713ac02158cb29dce8236f89ed94edf79c2bb7551240cccb6",
            "size": 186,
            "mediaType": gzip,
            "diffId": "sha256:59b99489dc5ccbe0c54db4a4194d8f5fc2ef2a5d2a19fb9a9bb6aef1fd50a443",
        },
    ]);
    assert_eq!(
        sha256_digest(&skopeo_inspect_raw(&registry, "busybox:gzip")),
        manifest
    );
    assert_eq!(j["manifestDigest"], manifest);
    assert_eq!(
        sha256_digest(&fetch_blob(&registry, "busybox", config)),
        config
    );
    assert_eq!(j["configDigest"], config);
    assert_eq!(j["imageId"], config);
    // The manifest has no mediaType field: the registry's Content-Type says what it is.
    assert_eq!(j["mediaType"], OCI_MANIFEST);
    assert_eq!(j["layers"], want_layers);
    assert_eq!(j["reference"], reference);
    assert_eq!(j["platform"]["os"], "linux");
    assert_eq!(j["platform"]["architecture"], "amd64");
    assert_eq!(
        j["config"]["config"]["Labels"]["org.opencontainers.image.title"],
        "imagefs-fixture-busybox"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Multi-platform indexes

const PLATFORMS: [&str; 3] = ["linux/amd64", "linux/arm/v7", "linux/arm64/v8"];

/// An index of `format` for [`PLATFORMS`], each image with its own layer, plus a BuildKit
/// attestation entry (`unknown/unknown`).
fn multi_platform_index(format: Format) -> Index {
    let mut b = IndexBuilder::new(format);
    for p in PLATFORMS {
        let layer = Layer::new(
            &[Entry::file("platform", format!("{format:?} {p}\n"))],
            Compression::Gzip,
        );
        b = b.image(ImageBuilder::new(format).platform(p).layer(layer).build());
    }
    b.attestation().build()
}

fn check_platforms(format: Format) {
    let registry = Registry::start(Auth::Anonymous);
    let index = multi_platform_index(format);
    registry.push_index("multi/app", "v1", &index);
    let reference = registry.reference("multi/app:v1");
    let imagefs = Imagefs::new();

    for (platform, variant) in [("linux/arm64/v8", "v8"), ("linux/arm/v7", "v7")] {
        let want = index.image(platform);
        let j = inspect_json(&imagefs, &reference, &["--platform", platform]);
        assert_eq!(
            j["manifestDigest"],
            want.manifest.digest.as_str(),
            "{platform}"
        );
        assert_eq!(j["mediaType"], format.manifest_media_type(), "{platform}");
        assert_eq!(j["imageId"], want.config.digest.as_str(), "{platform}");
        assert_eq!(
            j["platform"],
            json!({
                "os": "linux",
                "architecture": want.platform.architecture,
                "variant": variant,
            })
        );
        assert_eq!(j["layers"][0]["digest"], want.layers[0].digest.as_str());
        // The reference stays the index's tag, not the chosen manifest.
        assert_eq!(j["reference"], reference);
    }

    // Pulling one platform fetches its layer and no other platform's.
    let out = imagefs
        .cmd(["-q", "--platform", "linux/arm/v7", "pull", &reference])
        .run();
    assert_quiet_success(&out);
    for image in &index.images {
        let want = usize::from(image.platform.to_string() == "linux/arm/v7");
        assert_eq!(
            registry.blob_gets(&image.layers[0].digest),
            want,
            "{}",
            image.platform
        );
    }
    for attestation in &index.attestations {
        assert_eq!(registry.blob_gets(&attestation.layers[0].digest), 0);
    }

    // No match: the message lists what there is (images only, not the attestation).
    for command in ["inspect", "pull"] {
        let out = imagefs
            .cmd(["-q", "--platform", "linux/s390x", command, &reference])
            .run();
        assert_error_line(
            &out,
            &[
                "no manifest for platform linux/s390x",
                "linux/amd64",
                "linux/arm/v7",
                "linux/arm64/v8",
            ],
        );
        assert!(!out.stderr_str().contains("unknown"), "{}", out.report());
    }
}

#[test]
fn platform_flag_picks_the_manifest_from_an_oci_index() {
    check_platforms(Format::Oci);
}

#[test]
fn platform_flag_picks_the_manifest_from_a_docker_manifest_list() {
    check_platforms(Format::Docker);
}

// ---------------------------------------------------------------------------------------------
// 4. The cache

#[test]
fn pull_fills_the_cache_and_a_second_pull_fetches_no_blob() {
    let registry = Registry::start(Auth::Anonymous);
    let image = three_layer_image(Format::Oci, "cache");
    registry.push_image("cache/app", "v1", &image);
    let reference = registry.reference("cache/app:v1");
    let imagefs = Imagefs::new();

    // Plain output: progress on stderr, digest and image ID on stdout.
    let out = imagefs.cmd(["--plain-http", "pull", &reference]).run();
    out.assert_success();
    assert_eq!(
        out.stdout_str(),
        format!(
            "Digest: {}\nImage ID: {}\n",
            image.manifest.digest, image.config.digest
        ),
        "{}",
        out.report()
    );
    assert!(
        out.stderr_str()
            .starts_with(&format!("Pulling {reference}\n")),
        "{}",
        out.report()
    );
    for l in &image.layers {
        assert_eq!(registry.blob_gets(&l.digest), 1, "{}", l.digest);
    }

    // The layout: verified blobs by digest, extracted layers by diff_id.
    let cache = imagefs.cache_dir();
    let mut want_blobs: BTreeSet<String> = image
        .layers
        .iter()
        .map(|l| hex(&l.digest))
        .map(str::to_owned)
        .collect();
    want_blobs.insert(hex(&image.config.digest).to_owned());
    want_blobs.insert(hex(&image.manifest.digest).to_owned());
    assert_eq!(names(&cache.join("blobs/sha256")), want_blobs);
    let want_layers: BTreeSet<String> = image
        .layers
        .iter()
        .map(|l| hex(&l.diff_id).to_owned())
        .collect();
    assert_eq!(names(&cache.join("layers/sha256")), want_layers);
    for l in &image.layers {
        let dir = cache.join("layers/sha256").join(hex(&l.diff_id));
        assert!(dir.join("index.json").is_file(), "{}", dir.display());
    }
    assert_cache_consistent(&imagefs);
    assert_eq!(
        layers(&imagefs, &reference, &[]),
        expected_rows(&image, "cached")
    );

    // Again: the manifest is asked for (tags move), no blob is.
    let gets = blob_gets(&registry);
    let out = imagefs.cmd(["pull", &reference]).run();
    out.assert_success();
    assert_eq!(blob_gets(&registry), gets, "{}", registry.log());
    assert_eq!(
        out.stderr_str().matches(": already exists").count(),
        3,
        "{}",
        out.report()
    );

    // -q: no progress; the results (digest, image ID) only.
    let out = imagefs.cmd(["-q", "pull", &reference]).run();
    assert_quiet_success(&out);
    let lines: Vec<String> = out.stdout_str().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{}", out.report());
    assert!(lines[0].starts_with("Digest: sha256:"), "{}", out.report());
    assert!(
        lines[1].starts_with("Image ID: sha256:"),
        "{}",
        out.report()
    );
    assert_eq!(blob_gets(&registry), gets);
}

#[test]
fn a_layer_whose_extraction_was_removed_is_re_extracted_from_the_local_blob() {
    let registry = Registry::start(Auth::Anonymous);
    let image = three_layer_image(Format::Docker, "reextract");
    registry.push_image("cache/re", "v1", &image);
    let reference = registry.reference("cache/re:v1");
    let imagefs = Imagefs::new();
    assert_quiet_success(&imagefs.cmd(["-q", "pull", &reference]).run());

    let zstd = &image.layers[1];
    let dir = imagefs
        .cache_dir()
        .join("layers/sha256")
        .join(hex(&zstd.diff_id));
    std::fs::remove_dir_all(&dir).unwrap();
    let rows = layers(&imagefs, &reference, &[]);
    let states: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
    assert_eq!(states, ["cached", "blob-cached", "cached"]);

    let gets = blob_gets(&registry);
    assert_quiet_success(&imagefs.cmd(["-q", "pull", &reference]).run());
    assert_eq!(
        blob_gets(&registry),
        gets,
        "the local blob was fetched again"
    );
    assert!(dir.join("index.json").is_file());
    assert_eq!(
        layers(&imagefs, &reference, &[]),
        expected_rows(&image, "cached")
    );
}

#[test]
fn pull_and_inspect_by_digest_after_a_pull_make_no_request() {
    let registry = Registry::start(Auth::Anonymous);
    let image = three_layer_image(Format::Oci, "bydigest");
    registry.push_image("pinned/app", "v1", &image);
    let imagefs = Imagefs::new();
    assert_quiet_success(
        &imagefs
            .cmd(["-q", "pull", &registry.reference("pinned/app:v1")])
            .run(),
    );

    let requests = registry.access_log().len();
    let by_digest = registry.reference(&format!("pinned/app@{}", image.manifest.digest));
    let out = imagefs.cmd(["pull", &by_digest]).run();
    out.assert_success();
    assert!(
        out.stdout_str()
            .contains(&format!("Digest: {}", image.manifest.digest))
    );
    let j = inspect_json(&imagefs, &by_digest, &[]);
    assert_eq!(j["manifestDigest"], image.manifest.digest.as_str());
    assert_eq!(j["reference"], by_digest);
    assert_eq!(
        layers(&imagefs, &by_digest, &[]),
        expected_rows(&image, "cached")
    );
    assert_eq!(
        registry.access_log().len(),
        requests,
        "by-digest commands talked to the registry:\n{}",
        registry.log()
    );
}

#[test]
fn offline_pull_and_inspect_by_tag_work_with_the_registry_stopped() {
    let registry = Registry::start(Auth::Anonymous);
    let image = three_layer_image(Format::Docker, "offline");
    registry.push_image("off/app", "v1", &image);
    let by_tag = registry.reference("off/app:v1");
    let unknown_tag = registry.reference("off/app:v2");
    let unknown_digest = registry.reference(&format!("off/app@{}", sha256_digest(b"never pushed")));
    let imagefs = Imagefs::new();
    assert_quiet_success(&imagefs.cmd(["-q", "pull", &by_tag]).run());
    drop(registry);

    let out = imagefs.cmd(["--offline", "pull", &by_tag]).run();
    out.assert_success();
    assert!(
        out.stdout_str()
            .contains(&format!("Digest: {}", image.manifest.digest)),
        "{}",
        out.report()
    );
    let j = inspect_json(&imagefs, &by_tag, &["--offline"]);
    assert_eq!(j["manifestDigest"], image.manifest.digest.as_str());
    assert_eq!(j["imageId"], image.config.digest.as_str());
    assert_eq!(
        layers(&imagefs, &by_tag, &["--offline"]),
        expected_rows(&image, "cached")
    );

    for (reference, command) in [
        (&unknown_tag, "pull"),
        (&unknown_tag, "inspect"),
        (&unknown_digest, "pull"),
    ] {
        let out = imagefs.cmd(["-q", "--offline", command, reference]).run();
        assert_error_line(
            &out,
            &[
                &format!("{reference} is not in the cache"),
                "pull it without --offline first",
            ],
        );
    }
    // Without --offline the stopped registry is an error, not a silent fallback.
    let out = imagefs.cmd(["-q", "pull", &by_tag]).run();
    assert_error_line(&out, &["cannot reach"]);
}

#[test]
fn imagefs_cache_dir_sets_the_cache_when_the_flag_is_absent() {
    let registry = Registry::start(Auth::Anonymous);
    let image = three_layer_image(Format::Oci, "envcache");
    registry.push_image("env/app", "v1", &image);
    let scratch = Imagefs::new();
    let cache = scratch.scratch().join("from-env");
    let out = Cmd::program(crate::support::cmd::imagefs_bin())
        .args(["-q", "pull", &registry.reference("env/app:v1")])
        .env("IMAGEFS_CACHE_DIR", &cache)
        .env("DOCKER_CONFIG", scratch.docker_config_dir())
        .run();
    assert_quiet_success(&out);
    for l in &image.layers {
        assert!(
            cache
                .join("layers/sha256")
                .join(hex(&l.diff_id))
                .join("index.json")
                .is_file()
        );
    }
    assert_eq!(names(&scratch.cache_dir().join("blobs/sha256")).len(), 0);
}

// ---------------------------------------------------------------------------------------------
// 5. Failure messages

#[test]
fn credential_flags_used_wrongly_fail_before_any_request() {
    let imagefs = Imagefs::new();
    let reference = format!("127.0.0.1:{}/app:v1", free_port());
    let cases: [(&[&str], Option<&str>, &str); 3] = [
        (
            &["--password-stdin"],
            Some("pw\n"),
            "--password-stdin needs --username",
        ),
        (&["--username", "u"], None, "--username needs a password"),
        (
            &["--username", "u", "--password-stdin"],
            Some("\n"),
            "no password on standard input",
        ),
    ];
    for (flags, stdin, message) in cases {
        let mut cmd = imagefs.cmd(["-q", "pull"]).args(flags).arg(&reference);
        if let Some(stdin) = stdin {
            cmd = cmd.stdin(stdin);
        }
        assert_error_line(&cmd.run(), &[message]);
    }
}

#[test]
fn unknown_tag_and_unknown_repository_are_named() {
    let registry = Registry::start(Auth::Anonymous);
    registry.push_image("known/app", "v1", &three_layer_image(Format::Oci, "known"));
    let imagefs = Imagefs::new();

    let out = imagefs
        .cmd(["-q", "pull", &registry.reference("known/app:v9")])
        .run();
    assert_error_line(&out, &["tag v9 not found in repository known/app"]);

    // Distribution 2.8 answers a manifest GET in an unknown repository with the same
    // 404 MANIFEST_UNKNOWN as an unknown tag; only tags/list says NAME_UNKNOWN, and the
    // client asks it to tell the two apart.
    let out = imagefs
        .cmd(["-q", "pull", &registry.reference("no/such-repo:v1")])
        .run();
    assert_error_line(&out, &["repository no/such-repo not found"]);
    assert!(
        registry
            .access_log()
            .iter()
            .any(|l| l.uri.starts_with("/v2/no/such-repo/tags/list") && l.status == 404),
        "{}",
        registry.log()
    );

    let digest = sha256_digest(b"no such manifest");
    let out = imagefs
        .cmd([
            "-q",
            "inspect",
            &registry.reference(&format!("known/app@{digest}")),
        ])
        .run();
    assert_error_line(
        &out,
        &[&format!(
            "manifest {digest} not found in repository known/app"
        )],
    );
    assert_eq!(names(&imagefs.cache_dir().join("blobs/sha256")).len(), 0);
}

#[test]
fn invalid_references_are_quoted_in_the_error() {
    let imagefs = Imagefs::new();
    let port = free_port();
    let cases = [
        (format!("127.0.0.1:{port}/Team/App:v1"), "must be lowercase"),
        (String::new(), "the image name is empty"),
        (
            format!("127.0.0.1:{port}/app@sha256:abc"),
            "sha256 needs 64 lowercase hex digits",
        ),
        ("app:-bad-tag".to_owned(), "invalid tag"),
    ];
    for (input, reason) in cases {
        for command in ["pull", "inspect", "layers"] {
            let out = imagefs.cmd(["-q", command, &input]).run();
            assert_error_line(&out, &[&format!("invalid reference {input:?}"), reason]);
        }
    }
}

#[test]
fn refused_connection_is_a_clear_error_within_the_timeout() {
    // A port nobody listens on: every connect is refused at once.
    let reference = format!("127.0.0.1:{}/down/app:v1", free_port());
    let imagefs = Imagefs::new();
    let started = Instant::now();
    let out = imagefs
        .cmd(["-q", "--timeout", "2s", "pull", &reference])
        .run();
    assert_error_line(&out, &["cannot reach", "/v2/down/app/manifests/v1"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn silent_registry_times_out_after_the_timeout() {
    // Accepts connections (the kernel does, into the backlog) and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let reference = format!("{}/silent/app:v1", listener.local_addr().unwrap());
    let imagefs = Imagefs::new();
    let started = Instant::now();
    let out = imagefs
        .cmd(["-q", "--plain-http", "--timeout", "1s", "pull", &reference])
        .run();
    let took = started.elapsed();
    assert_error_line(&out, &["timed out after 1s", "silent/app"]);
    // Each request waits out the timeout; the client retries a few times with a backoff
    // (5 attempts, ~1.5 s of backoff), so a minute-long hang would be a bug.
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(15),
        "took {took:?}"
    );
}

#[test]
fn layer_with_a_wrong_diff_id_is_refused_and_nothing_is_extracted() {
    let registry = Registry::start(Auth::Anonymous);
    let good = Layer::new(&[Entry::file("real", "real content\n")], Compression::Gzip);
    let claimed = sha256_digest(b"a tar this layer is not");
    // The manifest lists the real blob; the config claims another uncompressed digest.
    let liar = Layer {
        diff_id: claimed.clone(),
        ..good.clone()
    };
    let image = ImageBuilder::new(Format::Oci).layer(liar).build();
    registry.push_image("bad/diffid", "v1", &image);
    let imagefs = Imagefs::new();

    let out = imagefs
        .cmd(["-q", "pull", &registry.reference("bad/diffid:v1")])
        .run();
    assert_error_line(
        &out,
        &[
            "layer diff_id",
            &claimed,
            &format!("hashes to {}", good.diff_id),
        ],
    );
    let cache = imagefs.cache_dir();
    assert_eq!(names(&cache.join("layers/sha256")), BTreeSet::new());
    assert_cache_consistent(&imagefs);
    assert_eq!(
        layers(&imagefs, &registry.reference("bad/diffid:v1"), &[])[0].state,
        "blob-cached",
        "the blob verified; only its extraction must be missing"
    );
}

#[test]
fn tampered_layer_blob_in_the_registry_is_refused_and_not_stored() {
    let registry = Registry::start(Auth::Anonymous);
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(
            &[Entry::file("data", noise(64 * 1024, 7))],
            Compression::Gzip,
        ))
        .build();
    registry.push_image("bad/blob", "v1", &image);
    // Flip one byte in the middle of the blob in the registry's own storage: it serves the
    // same length under the same digest, with other bytes.
    let layer = &image.layers[0];
    let data = registry
        .storage_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex(&layer.digest)[..2])
        .join(hex(&layer.digest))
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    assert_eq!(bytes, layer.blob);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&data, &bytes).unwrap();
    let imagefs = Imagefs::new();

    let out = imagefs
        .cmd(["-q", "pull", &registry.reference("bad/blob:v1")])
        .run();
    assert_error_line(
        &out,
        &[
            &format!("layer blob {} failed verification", layer.digest),
            &format!("hashes to {}", sha256_digest(&bytes)),
        ],
    );
    let cache = imagefs.cache_dir();
    assert!(!cache.join("blobs/sha256").join(hex(&layer.digest)).exists());
    assert_eq!(names(&cache.join("layers/sha256")), BTreeSet::new());
    assert_cache_consistent(&imagefs);
}

/// Distribution validates the schema 1 manifests it stores, so an in-process server plays a
/// registry that serves broken ones: each is refused with what is wrong, before any blob.
/// (Well-formed schema 1 images are mounted in `schema1.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_schema1_manifests_are_refused_before_any_blob() {
    let layer = sha256_digest(b"layer");
    let v1 = |id: char| json!({ "v1Compatibility": json!({ "id": id.to_string().repeat(64) }).to_string() });
    let schema1 = |fs_layers: usize, history: Vec<Value>, signatures: Option<Value>| {
        let mut m = json!({
            "schemaVersion": 1,
            "name": "old/app",
            "architecture": "amd64",
            "fsLayers": vec![json!({ "blobSum": layer }); fs_layers],
            "history": history,
        });
        if let Some(s) = signatures {
            m["signatures"] = s;
        }
        m.to_string()
    };
    // (tag, manifest, what the error says)
    let cases = [
        (
            "no-id",
            schema1(1, vec![json!({ "v1Compatibility": "{}" })], None),
            "history[0].v1Compatibility is not valid: missing field `id`",
        ),
        (
            "short",
            schema1(2, vec![v1('a')], None),
            "history has 1 entries, fsLayers 2",
        ),
        (
            "orphan",
            schema1(2, vec![v1('b'), v1('a')], None),
            "history[0] has parent \"\", expected aaaa",
        ),
        (
            "unsigned-signature",
            schema1(1, vec![v1('a')], Some(json!([]))),
            "signatures is empty",
        ),
    ];
    let served: Vec<(String, String)> = cases
        .iter()
        .map(|(tag, m, _)| (format!("/v2/old/app/manifests/{tag}"), m.clone()))
        .collect();
    let server = Adversary::start(move |r| {
        if r.route() == "/v2/" {
            return Reply::json(json!({}));
        }
        match served.iter().find(|(path, _)| r.route() == path) {
            Some((_, m)) => Reply::ok(m.clone()).header(
                "content-type",
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
            ),
            None => Reply::error(404, "NOT_FOUND", "not here"),
        }
    })
    .await;
    let host = server.host().to_owned();
    let outs = tokio::task::spawn_blocking(move || {
        let imagefs = Imagefs::new();
        cases.map(|(tag, _, want)| {
            let reference = format!("{host}/old/app:{tag}");
            let outs = ["pull", "inspect", "layers"]
                .map(|command| imagefs.cmd(["-q", command, &reference]).run());
            (want, outs)
        })
    })
    .await
    .unwrap();
    for (want, outs) in &outs {
        for out in outs {
            assert_error_line(out, &["schema 1 manifest", want, "re-push"]);
        }
    }
    assert!(
        server
            .requests()
            .iter()
            .all(|r| !r.path.contains("/blobs/")),
        "a blob of a schema 1 image was fetched"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Concurrency

#[test]
fn two_concurrent_pulls_into_one_cache_fetch_each_layer_once() {
    let registry = Registry::start(Auth::Anonymous);
    let mut builder = ImageBuilder::new(Format::Oci);
    for (i, c) in [Compression::Gzip, Compression::Zstd, Compression::Gzip]
        .into_iter()
        .enumerate()
    {
        let entries = [Entry::file(
            format!("blob{i}"),
            noise(2 << 20, i as u64 + 11),
        )];
        builder = builder.layer(Layer::new(&entries, c));
    }
    let image = builder.build();
    registry.push_image("race/app", "v1", &image);
    let reference = registry.reference("race/app:v1");
    let imagefs = Imagefs::new();

    let pull = imagefs.cmd(["pull", &reference]);
    let outs: Vec<Output> = std::thread::scope(|s| {
        let a = s.spawn(|| pull.run());
        let b = s.spawn(|| pull.run());
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    for out in &outs {
        out.assert_success();
    }
    // The per-layer lock makes the loser of each layer wait and find the winner's result:
    // whatever the timing, each layer is downloaded by exactly one of the two.
    let progress: String = outs.iter().map(|o| o.stderr_str()).collect();
    for l in &image.layers {
        let short = &hex(&l.digest)[..12];
        let count = |what: &str| progress.matches(&format!("{short}: {what}")).count();
        assert_eq!(
            (count("downloading"), count("already exists")),
            (1, 1),
            "layer {short}:\n{progress}"
        );
    }
    for l in &image.layers {
        assert_eq!(
            registry.blob_gets(&l.digest),
            1,
            "layer {} fetched more than once:\n{}",
            l.digest,
            registry.log()
        );
    }
    let cache = imagefs.cache_dir();
    assert_eq!(
        names(&cache.join("blobs/sha256")).len(),
        image.layers.len() + 2
    );
    assert_eq!(
        names(&cache.join("layers/sha256")).len(),
        image.layers.len()
    );
    assert_cache_consistent(&imagefs);
    assert_eq!(
        layers(&imagefs, &reference, &[]),
        expected_rows(&image, "cached")
    );
}

#[test]
fn decompression_limits_are_configurable_and_refuse_the_layer() {
    let registry = Registry::start(Auth::Anonymous);
    // 8 MiB of zeros: a few KiB of gzip.
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(
            &[Entry::file("zeros", vec![0u8; 8 << 20])],
            Compression::Gzip,
        ))
        .build();
    registry.push_image("bomb", "v1", &image);
    let reference = registry.reference("bomb:v1");
    let imagefs = Imagefs::new();
    for flags in [
        &["--max-layer-size", "4M"][..],
        &["--max-expansion", "8"][..],
    ] {
        let mut args = flags.to_vec();
        args.extend(["pull", "-q", &reference]);
        // The ratio is checked once 64 MiB came out: below that, only the size bound bites.
        let out = imagefs.cmd(args).run();
        if flags[0] == "--max-layer-size" {
            out.assert_failure_contains("decompression bomb");
            assert!(
                !imagefs
                    .cache_dir()
                    .join("layers/sha256")
                    .join(image.layers[0].diff_id.trim_start_matches("sha256:"))
                    .exists()
            );
        } else {
            out.assert_success();
        }
    }
    let out = imagefs
        .cmd(["--max-expansion", "0", "pull", &reference])
        .run();
    out.assert_failure_contains("--max-expansion");
    imagefs
        .cmd(["--max-layer-size", "16M", "pull", "-q", &reference])
        .run()
        .assert_success();
}

#[test]
fn a_layer_with_more_entries_than_the_limit_is_refused() {
    let registry = Registry::start(Auth::Anonymous);
    let files: Vec<Entry> = (0..5)
        .map(|i| Entry::file(format!("f{i}"), format!("{i}\n")))
        .collect();
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&files, Compression::Gzip))
        .build();
    registry.push_image("many", "v1", &image);
    let reference = registry.reference("many:v1");
    let imagefs = Imagefs::new();
    let out = imagefs
        .cmd(["--max-entries", "4", "pull", "-q", &reference])
        .run();
    assert_error_line(&out, &["more than 4 entries", "--max-entries"]);
    let extracted = imagefs
        .cache_dir()
        .join("layers/sha256")
        .join(hex(&image.layers[0].diff_id));
    assert!(!extracted.exists(), "a refused layer is not stored");
    // At the limit it is accepted.
    imagefs
        .cmd(["--max-entries", "5", "pull", "-q", &reference])
        .run()
        .assert_success();
    assert!(extracted.exists());
    let out = imagefs
        .cmd(["--max-entries", "0", "pull", &reference])
        .run();
    out.assert_failure_contains("--max-entries");
}
