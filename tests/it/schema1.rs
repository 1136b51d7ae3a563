//! Docker schema 1 images (`imagefs::oci::schema1`) from a real distribution 2.8 with schema 1
//! compatibility on, pushed by `skopeo copy --format v2s1` (skopeo signs with a throwaway key,
//! as distribution demands): mounted and compared with `umoci unpack` of the same image, the
//! meta files checked against what the registry says, `inspect` and `pull`, and remounts from
//! the cache without the registry.
//!
//! Distribution stores a schema 1 manifest's payload and signs it again, with its own key, on
//! every GET (a new `time` in the protected header, a new ECDSA signature): the bytes served
//! differ from one request to the next, only the payload and its digest are stable.

use std::fs;

use reqwest::header::{ACCEPT, HeaderMap};
use serde_json::{Value, json};

use crate::cli_mount::{oracle_compare, walk_dir, walk_mount};
use crate::support::mounts::Mount;
use crate::support::oracle::Oracle;
use crate::support::tree::{self, Compare};
use crate::support::{
    Auth, Compression, Entry, Format, Image, ImageBuilder, Imagefs, Layer, Registry, block_on,
    noise, sha256_digest, skopeo_copy_to_schema1,
};

const SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// The gzipped empty tar Docker and skopeo use for steps that changed no file.
const EMPTY_LAYER: &str = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";

/// Three layers (gzip, gzip, uncompressed) with a whiteout, an opaque directory, a hardlink
/// and a symlink, and a build step between them that changed no file.
fn legacy_image() -> Image {
    let l1 = vec![
        Entry::dir(""),
        Entry::dir("etc"),
        Entry::file("etc/os-release", "ID=legacy\nVERSION=1\n"),
        Entry::dir("bin"),
        Entry::file("bin/tool", noise(50_000, 11)).mode(0o755),
        Entry::symlink("bin/link", "tool"),
        Entry::hardlink("bin/hard", "bin/tool"),
        Entry::dir("data"),
        Entry::file("data/old.txt", "deleted in layer 2"),
        Entry::file("data/keep.txt", "kept"),
        Entry::dir("opq"),
        Entry::file("opq/a", "hidden by the opaque directory"),
        Entry::dir("opq/sub"),
        Entry::file("opq/sub/b", "hidden too"),
    ];
    let l2 = vec![
        Entry::whiteout("data/old.txt"),
        Entry::file("data/added.txt", "added in layer 2"),
        Entry::opaque("opq"),
        Entry::file("opq/new", "the only child left"),
    ];
    let l3 = vec![
        Entry::file("etc/os-release", "ID=legacy\nVERSION=3\n"),
        Entry::dir("late").mode(0o700),
        Entry::file("late/file", "top layer").owner(1000, 1000),
    ];
    ImageBuilder::new(Format::Docker)
        .layer(Layer::new(&l1, Compression::Gzip))
        .empty_step("/bin/sh -c #(nop)  ENV GREETING=hello")
        .layer(Layer::new(&l2, Compression::Gzip))
        .layer(Layer::new(&l3, Compression::None))
        .env(&["GREETING=hello"])
        .cmd(&["/bin/sh"])
        .build()
}

/// `GET /v2/REPO/manifests/REFERENCE` accepting schema 1 only: status, headers, body.
fn get_schema1(registry: &Registry, repo: &str, reference: &str) -> (u16, HeaderMap, Vec<u8>) {
    let url = format!("{}/v2/{repo}/manifests/{reference}", registry.url());
    block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let resp = client
            .get(&url)
            .header(ACCEPT, SIGNED)
            .send()
            .await
            .unwrap();
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, headers, resp.bytes().await.unwrap().to_vec())
    })
}

/// A signed schema 1 manifest without its signatures, as JSON.
fn unsigned(bytes: &[u8]) -> Value {
    let mut doc: Value = serde_json::from_slice(bytes).unwrap();
    let signatures = doc.as_object_mut().unwrap().remove("signatures");
    assert!(
        signatures.is_some_and(|s| !s.as_array().unwrap().is_empty()),
        "not signed: {doc}"
    );
    doc
}

fn read(m: &Mount, name: &str) -> Vec<u8> {
    fs::read(m.p(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn text(m: &Mount, name: &str) -> String {
    String::from_utf8(read(m, name))
        .unwrap()
        .trim_end()
        .to_owned()
}

#[test]
fn schema1_image_mounts_like_umoci_unpacks_it_and_remounts_offline() {
    let registry = Registry::start_schema1(Auth::Anonymous);
    let image = legacy_image();
    registry.push_image("legacy", "v2", &image);
    skopeo_copy_to_schema1(&registry, "legacy:v2", "legacy:s1");

    // What the registry serves: signed schema 1, its digest over the payload alone.
    let (status, headers, served) = get_schema1(&registry, "legacy", "s1");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&served));
    assert_eq!(headers["content-type"], SIGNED);
    let registry_digest = headers["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(sha256_digest(&served), registry_digest, "not signed?");
    let doc: Value = serde_json::from_slice(&served).unwrap();
    assert_eq!(doc["schemaVersion"], 1);
    assert!(!doc["signatures"].as_array().unwrap().is_empty());
    let blob_sums: Vec<&str> = doc["fsLayers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["blobSum"].as_str().unwrap())
        .collect();
    assert!(
        blob_sums.contains(&EMPTY_LAYER),
        "no empty layer: {blob_sums:?}"
    );
    for layer in &image.layers {
        assert!(blob_sums.contains(&layer.digest.as_str()), "{blob_sums:?}");
    }

    let imagefs = Imagefs::new();
    let reference = registry.reference("legacy:s1");
    let m = Mount::new(&imagefs, &[], &reference);
    let got = walk_mount(&m);
    let manifest_bytes = read(&m, ".manifest.json");
    assert_eq!(unsigned(&manifest_bytes), unsigned(&served));
    assert_eq!(text(&m, ".digest"), registry_digest);
    let config_bytes = read(&m, ".config.json");
    let image_id = text(&m, ".id");
    assert_eq!(image_id, sha256_digest(&config_bytes));
    let config: Value = serde_json::from_slice(&config_bytes).unwrap();
    // The diff_ids computed while streaming are the sha256 of the layers' tars.
    let diff_ids: Vec<&str> = image.layers.iter().map(|l| l.diff_id.as_str()).collect();
    assert_eq!(
        config["rootfs"],
        json!({"type": "layers", "diff_ids": diff_ids})
    );
    assert_eq!(config["config"]["Env"], json!(["GREETING=hello"]));
    assert_eq!(
        (&config["os"], &config["architecture"]),
        (&json!("linux"), &json!("amd64"))
    );
    let history = config["history"].as_array().unwrap();
    assert_eq!(history.len(), blob_sums.len());
    let empty = history.iter().filter(|h| h["empty_layer"] == true).count();
    assert_eq!(history.len() - empty, image.layers.len(), "{history:?}");
    assert!(
        history.iter().any(|h| h["empty_layer"] == true
            && h["created_by"]
                .as_str()
                .unwrap_or("")
                .contains("ENV GREETING=hello")),
        "{history:?}"
    );
    m.unmount();

    // The peer: skopeo converts the schema 1 image into an OCI layout, umoci unpacks it.
    let oracle = Oracle::unpack(&registry, "legacy:s1", None);
    tree::assert_same(
        "schema 1 against umoci",
        &walk_dir(&oracle.rootfs()),
        &got,
        &oracle_compare(),
    );
    assert_eq!(got.get("opq/new").size, Some(19));
    assert!(!got.nodes.contains_key(b"opq/a".as_slice()));
    assert!(!got.nodes.contains_key(b"data/old.txt".as_slice()));
    assert_eq!(got.get("bin/hard").inode, got.get("bin/tool").inode);
    // And the schema 2 original mounts as the same tree.
    let m = Mount::new(&imagefs, &[], &registry.reference("legacy:v2"));
    tree::assert_same(
        "schema 1 against schema 2",
        &walk_mount(&m),
        &got,
        &Compare::default(),
    );
    m.unmount();

    // inspect, from the cache: what was served, what it became.
    let out = imagefs
        .cmd(["inspect", "--format", "json", &reference])
        .run();
    out.assert_success();
    let inspect: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspect["mediaType"], SIGNED);
    assert_eq!(inspect["manifestDigest"], registry_digest.as_str());
    assert_eq!(inspect["imageId"], image_id.as_str());
    let layers = inspect["layers"].as_array().unwrap();
    let listed: Vec<(&str, &str, &str)> = layers
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap(),
                l["diffId"].as_str().unwrap(),
                l["mediaType"].as_str().unwrap(),
            )
        })
        .collect();
    let gzip = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    let tar = "application/vnd.docker.image.rootfs.diff.tar";
    let want: Vec<(&str, &str, &str)> = image
        .layers
        .iter()
        .zip([gzip, gzip, tar])
        .map(|(l, t)| (l.digest.as_str(), l.diff_id.as_str(), t))
        .collect();
    assert_eq!(listed, want);
    for (l, want) in layers.iter().zip(&image.layers) {
        assert_eq!(l["size"], want.size(), "{l}");
    }

    // Remounts need no registry: by digest (online), then by tag with --offline.
    let by_digest = registry.reference(&format!("legacy@{registry_digest}"));
    let before = registry.access_log().len();
    let m = Mount::new(&imagefs, &[], &by_digest);
    tree::assert_same("by digest", &got, &walk_mount(&m), &Compare::default());
    // The bytes the first mount was served, signatures and all, kept in the cache.
    assert_eq!(read(&m, ".manifest.json"), manifest_bytes);
    assert_eq!(text(&m, ".id"), image_id);
    m.unmount();
    let after = registry.access_log();
    assert_eq!(
        after.len(),
        before,
        "a by-digest remount of a cached schema 1 image talked to the registry: {:?}",
        &after[before..]
    );

    // `pull` into another cache gives the same digest and image ID.
    let other = Imagefs::new();
    let out = other.cmd(["pull", &reference]).run();
    out.assert_success();
    let stdout = out.stdout_str();
    assert!(
        stdout.contains(&format!("Digest: {registry_digest}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("Image ID: {image_id}")),
        "{stdout}"
    );

    drop(registry);
    let m = Mount::new(&imagefs, &["--offline"], &reference);
    tree::assert_same("offline by tag", &got, &walk_mount(&m), &Compare::default());
    assert_eq!(read(&m, ".manifest.json"), manifest_bytes);
    assert_eq!(text(&m, ".digest"), registry_digest);
    assert_eq!(read(&m, ".config.json"), config_bytes);
    m.unmount();
}
