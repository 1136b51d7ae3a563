//! Self-tests of the test harness against the real registry: what the builder makes is what
//! the registry stores and serves, each auth mode lets in exactly whom it should, and the
//! fixtures load with their published digests.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};

use crate::support::*;

const ACCEPT_ALL: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

fn sample_entries(tag: &str) -> Vec<Entry> {
    vec![
        Entry::dir("etc"),
        Entry::file("etc/hello", format!("hello from {tag}\n")),
        Entry::symlink("etc/link", "hello"),
    ]
}

fn three_compressions(format: Format) -> Image {
    let mut b = ImageBuilder::new(format)
        .env(&["PATH=/bin"])
        .cmd(&["/bin/sh"]);
    for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
        b = b.layer(Layer::new(&sample_entries(&format!("{c:?}")), c));
    }
    b.build()
}

/// A plain GET with optional Authorization; returns status, headers and body.
fn get(
    url: &str,
    auth: Option<&str>,
    accept: Option<&str>,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut req = client.get(url);
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        if let Some(a) = accept {
            req = req.header(ACCEPT, a);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        (status, headers, resp.bytes().await.unwrap().to_vec())
    })
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// `key="value"` out of a `Bearer realm="…",service="…",scope="…"` challenge.
fn challenge_param(challenge: &str, key: &str) -> String {
    let start = challenge
        .find(&format!("{key}=\""))
        .unwrap_or_else(|| panic!("no {key} in {challenge}"))
        + key.len()
        + 2;
    let len = challenge[start..].find('"').unwrap();
    challenge[start..start + len].to_owned()
}

/// The Docker-Hub token dance for one manifest GET: 401 → /token → retry with Bearer.
fn pull_manifest_via_token(
    registry: &Registry,
    repo: &str,
    tag: &str,
    creds: Option<(&str, &str)>,
) -> (StatusCode, Vec<u8>) {
    let url = format!("{}/v2/{repo}/manifests/{tag}", registry.url());
    let (status, headers, _) = get(&url, None, Some(ACCEPT_ALL));
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let challenge = headers[WWW_AUTHENTICATE].to_str().unwrap().to_owned();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    let realm = challenge_param(&challenge, "realm");
    assert_eq!(realm, registry.issuer().unwrap().realm());
    let token_url = format!(
        "{realm}?service={}&scope={}",
        challenge_param(&challenge, "service"),
        challenge_param(&challenge, "scope")
    );
    let auth = creds.map(|(u, p)| basic(u, p));
    let (status, _, body) = get(&token_url, auth.as_deref(), None);
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let token = answer["token"].as_str().unwrap();
    assert_eq!(answer["access_token"].as_str(), Some(token));
    let (status, _, body) = get(&url, Some(&format!("Bearer {token}")), Some(ACCEPT_ALL));
    (status, body)
}

#[test]
fn anonymous_registry_serves_the_builders_oci_bytes() {
    let registry = Registry::start(Auth::Anonymous);
    let image = three_compressions(Format::Oci);
    registry.push_image("app", "v1", &image);

    let served = skopeo_inspect_raw(&registry, "app:v1");
    assert_eq!(served, image.manifest.bytes);
    assert_eq!(sha256_digest(&served), image.manifest.digest);
    let types: Vec<_> = image.manifest.json()["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].clone())
        .collect();
    assert_eq!(
        types,
        [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar"
        ]
    );

    // Blobs come back byte for byte, and each GET shows in the access log.
    let layer = &image.layers[1];
    assert_eq!(registry.blob_gets(&layer.digest), 0);
    let (status, headers, body) = get(
        &format!("{}/v2/app/blobs/{}", registry.url(), layer.digest),
        None,
        None,
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, layer.blob);
    assert_eq!(headers["docker-content-digest"], layer.digest.as_str());
    assert_eq!(zstd::decode_all(&body[..]).unwrap(), layer.tar);
    assert_eq!(registry.blob_gets(&layer.digest), 1);
    assert_eq!(registry.blob_gets(&image.layers[0].digest), 0);

    // Pushing again skips every blob (HEAD 200) and the registry keeps the same manifest.
    registry.push_image("app", &image.manifest.digest, &image);
    let puts = registry
        .access_log()
        .iter()
        .filter(|l| l.method == "PUT" && l.uri.contains("/blobs/uploads/"))
        .count();
    assert_eq!(
        puts,
        4,
        "3 layers + config uploaded once:\n{}",
        registry.log()
    );
}

#[test]
fn docker_v2s2_image_round_trips() {
    let registry = Registry::start(Auth::Anonymous);
    let image = ImageBuilder::new(Format::Docker)
        .layer(Layer::new(&sample_entries("docker"), Compression::Gzip))
        .build();
    registry.push_image("lib/docker", "latest", &image);
    let m = image.manifest.json();
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );

    let (status, headers, body) = get(
        &format!("{}/v2/lib/docker/manifests/latest", registry.url()),
        None,
        Some(ACCEPT_ALL),
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers["content-type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(body, image.manifest.bytes);
    assert_eq!(
        skopeo_inspect_raw(&registry, "lib/docker:latest"),
        image.manifest.bytes
    );
}

#[test]
fn multi_platform_indexes_round_trip() {
    let registry = Registry::start(Auth::Anonymous);
    for format in [Format::Oci, Format::Docker] {
        let mut b = IndexBuilder::new(format);
        for p in ["linux/amd64", "linux/arm/v7", "linux/arm64/v8"] {
            let layer = Layer::new(&sample_entries(p), Compression::Gzip);
            b = b.image(ImageBuilder::new(format).platform(p).layer(layer).build());
        }
        if format == Format::Oci {
            b = b.attestation();
        }
        let index = b.build();
        let tag = format!("{format:?}").to_lowercase();
        registry.push_index("multi", &tag, &index);

        assert_eq!(
            skopeo_inspect_raw(&registry, &format!("multi:{tag}")),
            index.manifest.bytes
        );
        let arm = index.image("linux/arm/v7");
        assert_eq!(
            skopeo_inspect_raw(&registry, &format!("multi@{}", arm.manifest.digest)),
            arm.manifest.bytes
        );
        assert_eq!(arm.config.json()["variant"], "v7");

        let entries = index.manifest.json()["manifests"]
            .as_array()
            .unwrap()
            .clone();
        let platforms: Vec<String> = entries
            .iter()
            .map(|e| {
                let p = &e["platform"];
                let v = p["variant"]
                    .as_str()
                    .map(|v| format!("/{v}"))
                    .unwrap_or_default();
                format!(
                    "{}/{}{v}",
                    p["os"].as_str().unwrap(),
                    p["architecture"].as_str().unwrap()
                )
            })
            .collect();
        let mut want = vec!["linux/amd64", "linux/arm/v7", "linux/arm64/v8"];
        if format == Format::Oci {
            want.push("unknown/unknown");
            let att = entries.last().unwrap();
            assert_eq!(
                att["annotations"]["vnd.docker.reference.digest"],
                index.images[0].manifest.digest.as_str()
            );
        }
        assert_eq!(platforms, want);
    }
}

#[test]
fn basic_registry_refuses_wrong_password() {
    let registry = Registry::start(Auth::basic("alice", "right-pass"));
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&sample_entries("basic"), Compression::Gzip))
        .build();
    registry.push_image("team/app", "v1", &image);
    assert_eq!(
        skopeo_inspect_raw(&registry, "team/app:v1"),
        image.manifest.bytes
    );

    let url = format!("{}/v2/team/app/manifests/v1", registry.url());
    let cases = [
        (None, StatusCode::UNAUTHORIZED),
        (Some(basic("alice", "wrong")), StatusCode::UNAUTHORIZED),
        (Some(basic("alice", "right-pass")), StatusCode::OK),
    ];
    for (auth, want) in cases {
        let (status, headers, _) = get(&url, auth.as_deref(), Some(ACCEPT_ALL));
        assert_eq!(status, want, "auth {:?}", auth.is_some());
        if want == StatusCode::UNAUTHORIZED {
            assert!(
                headers[WWW_AUTHENTICATE]
                    .to_str()
                    .unwrap()
                    .starts_with("Basic realm=")
            );
        }
    }
    assert_eq!(registry.credentials(), Some(("alice", "right-pass")));
    assert!(!format!("{:?}", registry.auth()).contains("right-pass"));
}

#[test]
fn token_registry_follows_the_docker_hub_policy() {
    let registry = Registry::start(Auth::Token);
    let issuer = registry.issuer().unwrap();
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&sample_entries("token"), Compression::Zstd))
        .build();
    registry.push_image("public/x", "latest", &image);
    registry.push_image("private/x", "latest", &image);
    assert_eq!(
        issuer.request_count(),
        0,
        "harness pushes mint tokens without requests"
    );
    assert_eq!(
        skopeo_inspect_raw(&registry, "private/x:latest"),
        image.manifest.bytes
    );

    let (status, body) = pull_manifest_via_token(&registry, "public/x", "latest", None);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, image.manifest.bytes);

    let (status, _) = pull_manifest_via_token(&registry, "private/x", "latest", None);
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, body) = pull_manifest_via_token(
        &registry,
        "private/x",
        "latest",
        Some((TOKEN_USER, TOKEN_PASS)),
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, image.manifest.bytes);

    let wrong = format!(
        "{}?service=imagefs-test-registry&scope=repository:private/x:pull",
        issuer.realm()
    );
    let (status, _, _) = get(&wrong, Some(&basic(TOKEN_USER, "nope")), None);
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let requests = issuer.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[0].scopes, ["repository:public/x:pull"]);
    assert_eq!(
        requests[0].service.as_deref(),
        Some("imagefs-test-registry")
    );
    assert_eq!(requests[0].user, None);
    assert_eq!(requests[2].user.as_deref(), Some(TOKEN_USER));
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 200, 200, 401]
    );
}

#[test]
fn token_expires_at_the_registry_after_expires_in() {
    let registry = Registry::start(Auth::Token);
    let issuer = registry.issuer().unwrap();
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&sample_entries("exp"), Compression::Gzip))
        .build();
    registry.push_image("public/exp", "v1", &image);
    issuer.set_expires_in(Duration::from_secs(2));
    let token_url = format!(
        "{}?service=imagefs-test-registry&scope=repository:public/exp:pull",
        issuer.realm()
    );
    let (_, _, body) = get(&token_url, None, None);
    let issued = Instant::now();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["expires_in"], 2);
    let bearer = format!("Bearer {}", answer["token"].as_str().unwrap());
    let url = format!("{}/v2/public/exp/manifests/v1", registry.url());
    // Poll until the registry starts refusing; it must within a few seconds, not after
    // distribution's 60 s leeway.
    let refused_after = loop {
        let (status, _, _) = get(&url, Some(&bearer), Some(ACCEPT_ALL));
        if status == StatusCode::UNAUTHORIZED {
            break issued.elapsed();
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            issued.elapsed() < Duration::from_secs(10),
            "token still accepted after 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // exp has whole-second resolution: the token dies 1–3 s after issue.
    assert!(
        refused_after >= Duration::from_millis(900),
        "refused after {refused_after:?}"
    );
}

#[test]
fn fixture_loads_with_its_published_digest() {
    let registry = Registry::start(Auth::basic("fix", "ture"));
    skopeo_copy_fixture(
        &fixture_path("busybox-gzip.oci.tar"),
        &registry,
        "busybox:gzip",
    );
    let raw = skopeo_inspect_raw(&registry, "busybox:gzip");
    assert_eq!(
        sha256_digest(&raw),
        "sha256:58c10d4df457869bd067f4225c4c4adbb117e4ca55c397a842adc39c3824a9bd"
    );
    assert_eq!(raw.len(), 503);
}

#[test]
fn tar_entries_read_back_as_written() {
    let long: String = "d/".repeat(60) + "file";
    let nanos = 123_456_789;
    let entries = vec![
        Entry::dir("dir").mode(0o1777).owner(1000, 1000),
        Entry::file("dir/a", "abc")
            .mtime(1_700_000_000, nanos)
            .xattr("user.k", b"v\0bin"),
        Entry::hardlink("dir/hard", "dir/a"),
        Entry::symlink("dir/sym", "a"),
        Entry::char_device("dev/null", 1, 3),
        Entry::block_device("dev/sda", 8, 0),
        Entry::fifo("dir/pipe"),
        Entry::whiteout("dir/gone"),
        Entry::opaque("dir"),
        Entry::file(long.as_bytes(), "pax"),
        Entry::file(long.replace("file", "gnu").as_bytes(), "gnu").gnu_long_names(),
        Entry::file(b"bad-\xff-name".as_slice(), "x").owner(3_000_000, 7),
    ];
    let layer = Layer::new(&entries, Compression::Gzip);
    let tar = flate2::read::GzDecoder::new(&layer.blob[..]);
    assert_eq!(layer.diff_id, sha256_digest(&layer.tar));
    let mut archive = tar::Archive::new(tar);
    let mut got = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let mut xattrs = Vec::new();
        let mut pax_mtime = None;
        if let Some(exts) = e.pax_extensions().unwrap() {
            for ext in exts {
                let ext = ext.unwrap();
                match ext.key().unwrap() {
                    k if k.starts_with("SCHILY.xattr.") => {
                        xattrs.push((k.to_owned(), ext.value_bytes().to_vec()))
                    }
                    "mtime" => pax_mtime = Some(ext.value().unwrap().to_owned()),
                    "uid" => assert_eq!(ext.value().unwrap(), "3000000"),
                    _ => {}
                }
            }
        }
        let h = e.header();
        let row = (
            e.path_bytes().into_owned(),
            h.entry_type().as_byte() as char,
            h.mode().unwrap(),
            e.link_name_bytes().map(|l| l.into_owned()),
            h.device_major().unwrap(),
        );
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        got.push((row, xattrs, pax_mtime, data));
    }
    let paths: Vec<Vec<u8>> = got.iter().map(|g| g.0.0.clone()).collect();
    let want_paths: Vec<&[u8]> = vec![
        b"dir/",
        b"dir/a",
        b"dir/hard",
        b"dir/sym",
        b"dev/null",
        b"dev/sda",
        b"dir/pipe",
        b"dir/.wh.gone",
        b"dir/.wh..wh..opq",
        long.as_bytes(),
        long.replace("file", "gnu").into_bytes().leak(),
        b"bad-\xff-name",
    ];
    assert_eq!(paths, want_paths);
    let types: String = got.iter().map(|g| g.0.1).collect();
    assert_eq!(types, "501234600000");
    assert_eq!(got[0].0.2, 0o1777);
    assert_eq!(
        got[1].1,
        [("SCHILY.xattr.user.k".to_owned(), b"v\0bin".to_vec())]
    );
    assert_eq!(got[1].2.as_deref(), Some("1700000000.123456789"));
    assert_eq!(got[1].3, b"abc");
    assert_eq!(got[2].0.3.as_deref(), Some(&b"dir/a"[..]));
    assert_eq!(got[4].0.4, Some(1));
    assert_eq!(got[5].0.4, Some(8));
    assert_eq!(got[10].3, b"gnu");
}

#[test]
fn gnu_tar_lists_the_builders_layers() {
    // A second, independent reader: GNU tar must accept PAX and GNU extensions alike.
    let long: String = "x".repeat(150);
    let layer = Layer::new(
        &[
            Entry::file(long.as_bytes(), "1"),
            Entry::file(format!("g{long}"), "2").gnu_long_names(),
            Entry::whiteout("a/b"),
        ],
        Compression::None,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.tar");
    std::fs::write(&path, &layer.tar).unwrap();
    let out = Cmd::program("tar").arg("-tf").arg(&path).run();
    out.assert_success();
    assert_eq!(out.stdout_str(), format!("{long}\ng{long}\na/.wh.b\n"));
    assert!(out.stderr.is_empty(), "{}", out.report());
}

#[test]
fn cmd_reports_failures_and_enforces_timeouts() {
    let ok = Cmd::program("sh")
        .args(["-c", "read x; echo got:$x; echo err >&2"])
        .stdin("hi\n")
        .run();
    ok.assert_success();
    assert_eq!(ok.stdout_str(), "got:hi\n");
    assert_eq!(ok.stderr_str(), "err\n");

    let failed = Cmd::program("sh")
        .args(["-c", "echo 'no such image' >&2; exit 3"])
        .run();
    failed.assert_failure_contains("no such image");
    assert_eq!(failed.status.code(), Some(3));
    assert!(
        failed
            .report()
            .contains("sh -c 'echo '\\''no such image'\\'' >&2; exit 3'"),
        "{}",
        failed.report()
    );

    let started = Instant::now();
    let hung = Cmd::program("sleep")
        .arg("30")
        .timeout(Duration::from_millis(200))
        .run();
    assert!(hung.timed_out);
    assert!(started.elapsed() < Duration::from_secs(10));
    let panicked = std::panic::catch_unwind(|| {
        hung.assert_success();
    });
    assert!(panicked.is_err());
}
