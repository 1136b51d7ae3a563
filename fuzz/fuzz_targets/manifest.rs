//! `imagefs::oci::manifest`: parse_manifest under several Content-Types, parse_config,
//! select_platform and check_layers. Input: one selector byte, then the manifest bytes, then
//! (after the first NUL, if any) the config bytes.
//!
//! Invariants: nothing panics; a parsed manifest serialises to JSON that parses back to the
//! same value; a selected platform entry is one of the index's entries and matches.
#![no_main]

use imagefs::oci::manifest::{self, Manifest};
use imagefs::oci::media;
use imagefs::oci::platform::Platform;
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: [Option<&str>; 8] = [
    None,
    Some("application/json"),
    Some(media::OCI_INDEX),
    Some(media::OCI_MANIFEST),
    Some(media::DOCKER_MANIFEST_LIST),
    Some(media::DOCKER_MANIFEST),
    Some(media::DOCKER_SCHEMA1_SIGNED_MANIFEST),
    Some("Application/VND.OCI.image.manifest.v1+json; charset=utf-8"),
];

const PLATFORMS: [&str; 6] = [
    "linux/amd64",
    "linux/arm64",
    "linux/arm/v7",
    "linux/aarch64/v8",
    "windows/amd64",
    "unknown/unknown",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (manifest_bytes, config_bytes) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    let want: Platform = PLATFORMS[usize::from(selector >> 3) % PLATFORMS.len()]
        .parse()
        .expect("platform table entries parse");

    let config = config_bytes.and_then(|bytes| manifest::parse_config(bytes).ok());
    if let Some(config) = &config {
        let _ = config.platform().normalized();
        let _ = want.matches(&config.platform());
    }

    let Ok(parsed) = manifest::parse_manifest(manifest_bytes, content_type) else {
        return;
    };
    match &parsed {
        Manifest::Index(index) => {
            let json = serde_json::to_vec(index).expect("an index serialises");
            roundtrip(&json, content_type, &parsed);
            if let Ok(chosen) = manifest::select_platform(index, &want) {
                assert!(index.manifests.contains(&chosen));
                let platform = chosen
                    .platform
                    .as_ref()
                    .expect("a chosen entry has a platform");
                assert!(want.matches(platform));
                assert!(!chosen.is_attestation());
            }
        }
        Manifest::Image(image) => {
            let json = serde_json::to_vec(image).expect("a manifest serialises");
            roundtrip(&json, content_type, &parsed);
            let _ = image.check_image();
            for layer in &image.layers {
                let _ = layer.compression();
                let _ = layer.annotation("containerd.io/snapshot/stargz/toc.digest");
            }
            if let Some(config) = &config {
                let ok = manifest::check_layers(image, config).is_ok();
                assert_eq!(ok, image.layers.len() == config.rootfs.diff_ids.len());
            }
        }
        Manifest::Schema1(s1) => {
            // Converting never panics, whatever diff_ids it is given.
            let blobs = s1.layer_blobs();
            let diff_ids: Vec<_> = blobs.iter().map(|d| (*d).clone()).collect();
            let _ = s1.image_config(&diff_ids);
        }
    }
});

/// What we serialise must parse back to the same document, under the same Content-Type.
fn roundtrip(json: &[u8], content_type: Option<&str>, want: &Manifest) {
    match manifest::parse_manifest(json, content_type) {
        Ok(again) => assert_eq!(&again, want, "{}", String::from_utf8_lossy(json)),
        Err(e) => panic!("re-parsing {} failed: {e}", String::from_utf8_lossy(json)),
    }
}
