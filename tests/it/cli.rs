//! `imagefs pull` / `inspect` / `layers` end to end: the real binary against real registries
//! (anonymous, htpasswd Basic, Docker-Hub-like tokens), credentials from flags, environment
//! and docker config, digests checked against skopeo, platforms, the cache, and failures.

use base64::Engine as _;
use serde_json::Value;

use crate::support::registry::free_port;
use crate::support::*;

fn small_image(format: Format, tag: &str) -> Image {
    ImageBuilder::new(format)
        .env(&["PATH=/bin"])
        .cmd(&["/bin/sh"])
        .layer(Layer::new(
            &[
                Entry::dir("etc"),
                Entry::file("etc/hello", format!("hello {tag}\n")),
            ],
            Compression::Gzip,
        ))
        .layer(Layer::new(
            &[Entry::file("etc/zstd", "zstd layer\n")],
            Compression::Zstd,
        ))
        .layer(Layer::new(
            &[Entry::file("etc/plain", "uncompressed layer\n")],
            Compression::None,
        ))
        .build()
}

fn inspect_json(f: &Imagefs, reference: &str, extra: &[&str]) -> Value {
    let mut args = vec!["inspect", "--format", "json"];
    args.extend_from_slice(extra);
    args.push(reference);
    let out = f.cmd(args).run();
    out.assert_success();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}\n{}", out.report()))
}

fn write_docker_config(f: &Imagefs, registry: &Registry) {
    let (user, pass) = registry.credentials().unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let config = serde_json::json!({"auths": {registry.addr(): {"auth": auth}}});
    std::fs::write(
        f.docker_config_dir().join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
}

/// Pull with each credential source; without credentials the failure says what to do.
fn pull_with_every_credential_source(registry: &Registry, repo: &str) {
    let image = small_image(Format::Oci, repo);
    registry.push_image(repo, "v1", &image);
    let reference = registry.reference(&format!("{repo}:v1"));
    let (user, pass) = registry.credentials().unwrap();

    // No credentials.
    let f = Imagefs::new();
    let out = f.cmd(["-q", "pull", &reference]).run();
    out.assert_failure_contains("authentication required");
    assert_eq!(out.stderr_str().lines().count(), 1, "{}", out.report());

    // --username + --password-stdin.
    let f = Imagefs::new();
    let out = f
        .cmd([
            "-vvv",
            "pull",
            "--username",
            user,
            "--password-stdin",
            &reference,
        ])
        .stdin(format!("{pass}\n"))
        .run();
    out.assert_success();
    assert!(!out.stderr_str().contains(pass) && !out.stdout_str().contains(pass));
    assert!(
        out.stdout_str().contains(&image.manifest.digest),
        "{}",
        out.report()
    );

    // Environment.
    let f = Imagefs::new();
    f.cmd(["-q", "pull", &reference])
        .env("IMAGEFS_USERNAME", user)
        .env("IMAGEFS_PASSWORD", pass)
        .run()
        .assert_success();

    // Docker config.json.
    let f = Imagefs::new();
    write_docker_config(&f, registry);
    f.cmd(["-q", "pull", &reference]).run().assert_success();
    let layers = f.cmd(["layers", &reference]).run();
    layers.assert_success();
    assert_eq!(
        layers.stdout_str().matches("\tcached").count(),
        3,
        "{}",
        layers.report()
    );

    // Wrong password.
    let f = Imagefs::new();
    f.cmd([
        "-q",
        "pull",
        "--username",
        user,
        "--password-stdin",
        &reference,
    ])
    .stdin("wrong-password\n")
    .run()
    .assert_failure_contains("authentication");
}

#[test]
fn pull_from_an_anonymous_registry() {
    let registry = Registry::start(Auth::Anonymous);
    let image = small_image(Format::Oci, "anon");
    registry.push_image("library/anon", "latest", &image);
    let f = Imagefs::new();
    let out = f.cmd(["pull", &registry.reference("library/anon")]).run();
    out.assert_success();
    assert!(
        out.stdout_str()
            .contains(&format!("Digest: {}", image.manifest.digest))
    );
    assert!(
        out.stdout_str()
            .contains(&format!("Image ID: {}", image.config.digest))
    );
    for layer in &image.layers {
        let hex = layer.digest.strip_prefix("sha256:").unwrap();
        assert!(f.cache_dir().join("blobs/sha256").join(hex).is_file());
        let diff = layer.diff_id.strip_prefix("sha256:").unwrap();
        assert!(
            f.cache_dir()
                .join("layers/sha256")
                .join(diff)
                .join("index.json")
                .is_file()
        );
    }

    // A second pull fetches no blob again.
    let before: usize = image
        .layers
        .iter()
        .map(|l| registry.blob_gets(&l.digest))
        .sum();
    assert_eq!(before, 3);
    f.cmd(["-q", "pull", &registry.reference("library/anon")])
        .run()
        .assert_success();
    let after: usize = image
        .layers
        .iter()
        .map(|l| registry.blob_gets(&l.digest))
        .sum();
    assert_eq!(after, 3, "a cached layer was fetched again");
}

#[test]
fn pull_from_a_basic_auth_registry() {
    let registry = Registry::start(Auth::basic("alice", "s3cret-pass"));
    pull_with_every_credential_source(&registry, "team/app");
}

#[test]
fn pull_from_a_token_auth_registry() {
    let registry = Registry::start(Auth::Token);
    pull_with_every_credential_source(&registry, "private/app");

    // Anonymous gets pull on public/* only.
    let image = small_image(Format::Docker, "public");
    registry.push_image("public/app", "v1", &image);
    let f = Imagefs::new();
    f.cmd(["-q", "pull", &registry.reference("public/app:v1")])
        .run()
        .assert_success();
    assert!(registry.issuer().unwrap().request_count() > 0);
}

#[test]
fn inspect_digests_match_skopeo_and_the_config() {
    let registry = Registry::start(Auth::Anonymous);
    for (format, repo) in [(Format::Oci, "oci/img"), (Format::Docker, "docker/img")] {
        let image = small_image(format, repo);
        registry.push_image(repo, "v1", &image);
        let raw = skopeo_inspect_raw(&registry, &format!("{repo}:v1"));
        let f = Imagefs::new();
        let j = inspect_json(&f, &registry.reference(&format!("{repo}:v1")), &[]);
        assert_eq!(j["manifestDigest"], sha256_digest(&raw));
        assert_eq!(j["manifestDigest"], image.manifest.digest.as_str());
        assert_eq!(j["mediaType"], format.manifest_media_type());
        assert_eq!(j["configDigest"], sha256_digest(&image.config.bytes));
        assert_eq!(j["imageId"], j["configDigest"]);
        assert_eq!(j["reference"], registry.reference(&format!("{repo}:v1")));
        assert_eq!(j["platform"]["os"], "linux");
        assert_eq!(j["platform"]["architecture"], "amd64");
        let layers = j["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 3);
        for (got, want) in layers.iter().zip(&image.layers) {
            assert_eq!(got["digest"], want.digest.as_str());
            assert_eq!(got["diffId"], want.diff_id.as_str());
            assert_eq!(got["size"], want.size());
            assert_eq!(got["mediaType"], want.media_type(format));
        }
        let config: Value = serde_json::from_slice(&image.config.bytes).unwrap();
        assert_eq!(j["config"], config);
        // inspect fetched no layer.
        for l in &image.layers {
            assert_eq!(registry.blob_gets(&l.digest), 0);
        }
    }
}

#[test]
fn inspect_the_shared_fixture() {
    let registry = Registry::start(Auth::Anonymous);
    skopeo_copy_fixture(
        &fixture_path("busybox-gzip.oci.tar"),
        &registry,
        "busybox:gzip",
    );
    let f = Imagefs::new();
    let j = inspect_json(&f, &registry.reference("busybox:gzip"), &[]);
    assert_eq!(
        j["manifestDigest"],
        "sha256:58c10d4df457869bd067f4225c4c4adbb117e4ca55c397a842adc39c3824a9bd"
    );
    assert_eq!(
        j["imageId"],
        "sha256:ea1e34ae6a075f7873877277dccbd47836d068385194f7bc0dd3ef58d06f0dd4"
    );
    assert_eq!(j["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        j["layers"][1]["diffId"],
        "sha256:59b99489dc5ccbe0c54db4a4194d8f5fc2ef2a5d2a19fb9a9bb6aef1fd50a443"
    );
    f.cmd(["-q", "pull", &registry.reference("busybox:gzip")])
        .run()
        .assert_success();
}

#[test]
fn platform_picks_the_right_manifest() {
    let registry = Registry::start(Auth::Anonymous);
    for (format, repo) in [(Format::Oci, "multi/oci"), (Format::Docker, "multi/docker")] {
        let mut b = IndexBuilder::new(format);
        for p in ["linux/amd64", "linux/arm/v7", "linux/arm64/v8"] {
            let img = ImageBuilder::new(format)
                .platform(p)
                .layer(Layer::new(&[Entry::file("arch", p)], Compression::Gzip))
                .build();
            b = b.image(img);
        }
        let index = b.attestation().build();
        registry.push_index(repo, "v1", &index);
        let reference = registry.reference(&format!("{repo}:v1"));
        let f = Imagefs::new();
        for p in ["linux/arm64/v8", "linux/arm/v7", "linux/amd64"] {
            let j = inspect_json(&f, &reference, &["--platform", p]);
            assert_eq!(
                j["manifestDigest"],
                index.image(p).manifest.digest.as_str(),
                "{p}"
            );
            let parsed: Vec<&str> = p.split('/').collect();
            assert_eq!(j["platform"]["architecture"], parsed[1]);
        }
        let out = f
            .cmd(["inspect", "--platform", "linux/s390x", &reference])
            .run();
        out.assert_failure_contains("linux/s390x");
        out.assert_failure_contains("linux/arm/v7");
        assert!(
            !out.stderr_str().contains("unknown/unknown"),
            "{}",
            out.report()
        );
        // A pulled platform mounts offline later: pull one and look at its layer.
        f.cmd(["-q", "--platform", "linux/arm/v7", "pull", &reference])
            .run()
            .assert_success();
    }
}

#[test]
fn by_digest_and_offline_use_only_the_cache() {
    let registry = Registry::start(Auth::Anonymous);
    let image = small_image(Format::Oci, "cached");
    registry.push_image("cached/app", "v1", &image);
    let f = Imagefs::new();
    let by_tag = registry.reference("cached/app:v1");
    let by_digest = registry.reference(&format!("cached/app@{}", image.manifest.digest));
    f.cmd(["-q", "pull", &by_tag]).run().assert_success();
    let requests = registry.access_log().len();
    f.cmd(["-q", "pull", &by_digest]).run().assert_success();
    let j = inspect_json(&f, &by_digest, &[]);
    assert_eq!(j["manifestDigest"], image.manifest.digest.as_str());
    assert_eq!(
        registry.access_log().len(),
        requests,
        "by-digest use hit the registry"
    );

    drop(registry);
    f.cmd(["-q", "--offline", "pull", &by_tag])
        .run()
        .assert_success();
    let j = inspect_json(&f, &by_tag, &["--offline"]);
    assert_eq!(j["manifestDigest"], image.manifest.digest.as_str());
    f.cmd(["--offline", "inspect", &by_tag.replace(":v1", ":v2")])
        .run()
        .assert_failure_contains("not in the cache");
}

#[test]
fn failures_are_one_clear_line() {
    let registry = Registry::start(Auth::Anonymous);
    let image = small_image(Format::Oci, "x");
    registry.push_image("some/repo", "v1", &image);
    let f = Imagefs::new();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["pull".into(), registry.reference("some/repo:nope")],
            "tag nope not found in repository some/repo",
        ),
        (
            vec!["pull".into(), registry.reference("no/such-repo:v1")],
            "repository no/such-repo not found",
        ),
        (vec!["pull".into(), "Upper/Case".into()], "\"Upper/Case\""),
        (vec!["pull".into(), "".into()], "invalid reference"),
        (
            vec!["pull".into(), "busybox@sha256:abc".into()],
            "\"busybox@sha256:abc\"",
        ),
        (
            vec![
                "--timeout".into(),
                "5s".into(),
                "pull".into(),
                format!("127.0.0.1:{}/x/y:z", free_port()),
            ],
            "cannot reach",
        ),
        (
            vec![
                "inspect".into(),
                "--platform".into(),
                "linux".into(),
                registry.reference("some/repo:v1"),
            ],
            "--platform",
        ),
    ];
    for (args, want) in cases {
        let out = f
            .cmd(["-q"].iter().map(|s| s.to_string()).chain(args))
            .run();
        out.assert_failure_contains(want);
        let stderr = out.stderr_str();
        assert_eq!(stderr.lines().count(), 1, "{}", out.report());
        assert!(stderr.starts_with("imagefs: "), "{}", out.report());
    }
}

#[test]
fn a_layer_that_does_not_match_its_diff_id_is_refused_and_not_stored() {
    let registry = Registry::start(Auth::Anonymous);
    let good = Layer::new(&[Entry::file("f", "real content")], Compression::Gzip);
    let other = Layer::new(&[Entry::file("f", "claimed content")], Compression::Gzip);
    // The manifest names `good`'s blob, the config claims `other`'s diff_id.
    let liar = Layer {
        diff_id: other.diff_id.clone(),
        ..good
    };
    let image = ImageBuilder::new(Format::Oci).layer(liar).build();
    registry.push_image("bad/diffid", "v1", &image);
    let f = Imagefs::new();
    let out = f
        .cmd(["-q", "pull", &registry.reference("bad/diffid:v1")])
        .run();
    out.assert_failure_contains("diff_id");
    let layers = std::fs::read_dir(f.cache_dir().join("layers/sha256"))
        .unwrap()
        .count();
    assert_eq!(layers, 0, "a layer that failed verification was stored");
}

/// A real registry refuses to store an unsigned schema 1 manifest, so an adversarial server
/// serves one.
#[tokio::test(flavor = "multi_thread")]
async fn schema1_is_refused_clearly() {
    use crate::support::adversary::{Adversary, Reply};
    let body = r#"{"schemaVersion":1,"name":"old/app","tag":"v1","architecture":"amd64","fsLayers":[],"history":[]}"#;
    let adv = Adversary::start(move |r| {
        if r.route().ends_with("/manifests/v1") {
            Reply::ok(body).header(
                "content-type",
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
            )
        } else {
            Reply::ok("{}")
        }
    })
    .await;
    let reference = format!("{}/old/app:v1", adv.host());
    let out = tokio::task::spawn_blocking(move || {
        let f = Imagefs::new();
        f.cmd(["-q", "inspect", &reference]).run()
    })
    .await
    .unwrap();
    out.assert_failure_contains("schema 1");
}

#[test]
fn two_pulls_at_once_share_one_cache() {
    let registry = Registry::start(Auth::Anonymous);
    let big: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&[Entry::file("big", &big)], Compression::Gzip))
        .layer(Layer::new(&[Entry::file("small", "s")], Compression::Zstd))
        .build();
    registry.push_image("race/app", "v1", &image);
    let f = Imagefs::new();
    let reference = registry.reference("race/app:v1");
    let a = f.cmd(["-q", "pull", &reference]);
    let b = f.cmd(["-q", "pull", &reference]);
    let ta = std::thread::spawn(move || a.run());
    let tb = std::thread::spawn(move || b.run());
    ta.join().unwrap().assert_success();
    tb.join().unwrap().assert_success();
    for l in &image.layers {
        assert_eq!(
            registry.blob_gets(&l.digest),
            1,
            "{} fetched more than once",
            l.digest
        );
    }
    let listed = f.cmd(["layers", &reference]).run();
    listed.assert_success();
    assert_eq!(listed.stdout_str().matches("\tcached").count(), 2);
}
