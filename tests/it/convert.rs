//! `imagefs convert`: images rewritten as eStargz and pushed to a real registry keep their
//! tree exactly (against umoci's unpack of the source), mount lazily, convert again to the
//! same digest, carry what stargz-snapshotter needs, and put the files a recorded workload
//! read first, so the next mount fetches them with one request per layer.

use std::fs;

use imagefs::layer::estargz::{
    FOOTER_SIZE, TOC_DIGEST_ANNOTATION, Toc, TocEntryType, UNCOMPRESSED_SIZE_ANNOTATION,
    parse_footer, parse_toc_member,
};
use serde_json::Value;

use crate::cli_mount::{oracle_compare, rule_layers, walk_dir, walk_mount};
use crate::support::adversary::{Adversary, Recorded, Reply};
use crate::support::image::Kind;
use crate::support::mounts::Mount;
use crate::support::oracle::Oracle;
use crate::support::sparse::{Segment, pax_sparse_entry};
use crate::support::tree;
use crate::support::{
    AccessLine, Auth, Cmd, Compression, Entry, Format, ImageBuilder, Imagefs, Layer, Registry,
    noise, skopeo_inspect_raw,
};

/// Chunks small enough that the files of the tests span several.
const CHUNK: &str = "64K";

fn manifest(registry: &Registry, repo_ref: &str) -> Value {
    serde_json::from_slice(&skopeo_inspect_raw(registry, repo_ref)).unwrap()
}

/// `imagefs convert SRC DST ARGS…` in `registry`; its `Digest:` line.
fn convert(imagefs: &Imagefs, registry: &Registry, src: &str, dst: &str, args: &[&str]) -> String {
    let out = imagefs
        .cmd([
            "convert",
            &registry.reference(src),
            &registry.reference(dst),
        ])
        .args(args)
        .run();
    out.assert_success();
    eprintln!("{}", out.stderr_str());
    out.stdout_str()
        .lines()
        .find_map(|l| l.strip_prefix("Digest: "))
        .unwrap_or_else(|| panic!("no Digest line: {}", out.report()))
        .to_owned()
}

fn is_utf8(e: &Entry) -> bool {
    let target = match &e.kind {
        Kind::Symlink(t) | Kind::Hardlink(t) => Some(t),
        _ => None,
    };
    std::str::from_utf8(&e.path).is_ok() && target.is_none_or(|t| std::str::from_utf8(t).is_ok())
}

#[test]
fn every_rule_survives_conversion_lazily_and_converting_again_changes_nothing() {
    let registry = Registry::start(Auth::Anonymous);
    let [l1, l2, l3] = rule_layers();
    // Names that are not UTF-8 cannot be in a TOC (JSON): that layer is kept as it is.
    let (utf8, other): (Vec<Entry>, Vec<Entry>) = l1.into_iter().partition(is_utf8);
    let mut heavy = vec![Entry::dir("many"), Entry::dir("big")];
    heavy.extend((0..2000).map(|i| Entry::file(format!("many/f{i:04}"), format!("{i}\n"))));
    let sparse: Vec<Segment> = vec![(0, noise(512, 6)), ((8 << 20) + 512, noise(4096, 7))];
    heavy.push(pax_sparse_entry(
        "big/sparse.img",
        (8 << 20) + 4608,
        &sparse,
    ));
    heavy.push(Entry::file("big/noise", noise(300_000, 9)));
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&utf8, Compression::Gzip))
        .layer(Layer::new(&heavy, Compression::Gzip))
        .layer(Layer::new(&other, Compression::Gzip))
        .layer(Layer::new(&l2, Compression::Zstd))
        .layer(Layer::new(&l3, Compression::None))
        .build();
    registry.push_image("rules", "src", &image);

    let imagefs = Imagefs::new();
    let first = convert(
        &imagefs,
        &registry,
        "rules:src",
        "lazy:esgz",
        &["--chunk-size", CHUNK],
    );
    let m = manifest(&registry, "lazy:esgz");
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 5);
    for (i, l) in layers.iter().enumerate() {
        let toc = &l["annotations"][TOC_DIGEST_ANNOTATION];
        let size = &l["annotations"][UNCOMPRESSED_SIZE_ANNOTATION];
        if i == 2 {
            assert!(toc.is_null(), "the non-UTF-8 layer is kept: {l}");
            assert_eq!(l["digest"], image.layers[2].digest, "{l}");
        } else {
            assert!(toc.as_str().unwrap().starts_with("sha256:"), "{l}");
            assert!(size.as_str().unwrap().parse::<u64>().unwrap() > 0, "{l}");
            assert_eq!(
                l["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+gzip"
            );
        }
    }

    // The tree is the source's, exactly: as imagefs serves it lazily, and as umoci unpacks
    // the converted image (Go's archive/tar reading the new blobs).
    let oracle = Oracle::unpack(&registry, "rules:src", None);
    let want = walk_dir(&oracle.rootfs());
    let fresh = Imagefs::new();
    let mount = Mount::new_with(
        &fresh,
        &[],
        &["--prefetch", "none"],
        &registry.reference("lazy:esgz"),
    );
    let got = walk_mount(&mount);
    tree::assert_same("converted, mounted", &want, &got, &oracle_compare());
    mount.unmount();
    let formats = fresh
        .cmd(["layers", &registry.reference("lazy:esgz")])
        .run();
    formats.assert_success();
    let formats: Vec<String> = formats
        .stdout_str()
        .lines()
        .map(|l| l.split('\t').nth(3).unwrap().to_owned())
        .collect();
    assert_eq!(
        formats,
        ["estargz", "estargz", "gzip", "estargz", "estargz"]
    );
    // A plain tar reader sees eStargz's metadata entries as files; the rest is the tree.
    let unpacked = Oracle::unpack(&registry, "lazy:esgz", None);
    let mut plain = walk_dir(&unpacked.rootfs());
    for meta in ["stargz.index.json", ".no.prefetch.landmark"] {
        assert!(plain.nodes.remove(meta.as_bytes()).is_some(), "{meta}");
    }
    tree::assert_same(
        "converted, unpacked by umoci",
        &want,
        &plain,
        &oracle_compare(),
    );

    // Converting the converted image changes nothing: same manifest, same digest; every
    // eStargz layer is detected (its TOC verified) and kept.
    let out = imagefs
        .cmd([
            "convert",
            &registry.reference("lazy:esgz"),
            &registry.reference("lazy:again"),
        ])
        .run();
    out.assert_success();
    assert_eq!(out.stdout_str().trim(), format!("Digest: {first}"));
    assert_eq!(
        out.stderr_str().matches("eStargz already, kept").count(),
        4,
        "{}",
        out.report()
    );
    assert_eq!(
        skopeo_inspect_raw(&registry, "lazy:again"),
        skopeo_inspect_raw(&registry, "lazy:esgz")
    );
}

/// The sizes of the GETs of blob `digest`, in log order.
fn gets(log: &[AccessLine], digest: &str) -> Vec<u64> {
    let suffix = format!("/blobs/{digest}");
    log.iter()
        .filter(|l| l.method == "GET" && l.uri.ends_with(&suffix))
        .map(|l| l.bytes)
        .collect()
}

/// The blob `digest` of `repo` and the TOC it holds, verified against `toc_digest`.
fn blob_toc(registry: &Registry, repo: &str, digest: &str, toc_digest: &str) -> (Vec<u8>, Toc) {
    let out = Cmd::program("curl")
        .args([
            "-fsS",
            &format!("{}/v2/{repo}/blobs/{digest}", registry.url()),
        ])
        .run();
    out.assert_success();
    let blob = out.stdout.clone();
    let footer = parse_footer(&blob[blob.len() - FOOTER_SIZE..]).unwrap();
    let range = footer.toc_range(blob.len() as u64).unwrap();
    let toc = parse_toc_member(
        &blob[range.start as usize..range.end as usize],
        Some(&toc_digest.parse().unwrap()),
    )
    .unwrap();
    (blob, toc)
}

#[test]
fn a_recorded_workload_is_prefetched_in_one_request_per_layer() {
    let registry = Registry::start(Auth::Anonymous);
    let files = |layer: u64| -> Vec<Entry> {
        let mut entries = vec![Entry::dir(""), Entry::dir(format!("l{layer}"))];
        for i in 0..12u64 {
            let path = format!("l{layer}/f{i:02}");
            entries.push(Entry::file(path, noise(150_000, layer * 100 + i)));
        }
        entries
    };
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&files(1), Compression::Gzip))
        .layer(Layer::new(&files(2), Compression::Gzip))
        .build();
    registry.push_image("app", "src", &image);
    let imagefs = Imagefs::new();
    convert(
        &imagefs,
        &registry,
        "app:src",
        "app:plain",
        &["--chunk-size", CHUNK],
    );

    // The workload: a few files of each layer, in an order that is not the tar's.
    let workload = ["l2/f07", "l1/f03", "l2/f00", "l1/f11", "l1/f05"];
    let record = imagefs.scratch().join("record.txt");
    let record_arg = record.to_str().unwrap();
    let run = |reference: &str, extra: &[&str]| {
        let cache = Imagefs::new();
        let m = Mount::new_with(&cache, &[], extra, &registry.reference(reference));
        for f in workload {
            assert_eq!(fs::read(m.p(f)).unwrap().len(), 150_000, "{f}");
        }
        let log = registry.access_log();
        m.unmount();
        log
    };
    let log = run("app:plain", &["--record", record_arg, "--prefetch", "none"]);
    let recorded = fs::read_to_string(&record).unwrap();
    assert_eq!(
        recorded.lines().collect::<Vec<_>>(),
        workload.iter().map(|f| format!("/{f}")).collect::<Vec<_>>()
    );
    // Without a prefetch list, each file read is fetched on demand: footer, TOC, then
    // requests for the files' chunks.
    for l in manifest(&registry, "app:plain")["layers"]
        .as_array()
        .unwrap()
    {
        let gets = gets(&log, l["digest"].as_str().unwrap());
        assert!(gets.len() >= 4, "{gets:?}");
    }

    convert(
        &imagefs,
        &registry,
        "app:src",
        "app:prio",
        &["--chunk-size", CHUNK, "--prioritize", record_arg],
    );
    let before = registry.access_log().len();
    let log = run("app:prio", &["--prefetch", "landmark"]);
    let log = &log[before..];
    for l in manifest(&registry, "app:prio")["layers"]
        .as_array()
        .unwrap()
    {
        let digest = l["digest"].as_str().unwrap();
        let toc_digest = l["annotations"][TOC_DIGEST_ANNOTATION].as_str().unwrap();
        let (_, toc) = blob_toc(&registry, "app", digest, toc_digest);
        // The recorded files of this layer lie before the landmark, in the recorded order.
        let landmark = toc.prefetch_landmark_offset().expect("a prefetch landmark");
        let names: Vec<&str> = toc
            .entries
            .iter()
            .take_while(|e| e.name != ".prefetch.landmark")
            .filter(|e| e.kind == TocEntryType::Reg && e.offset < landmark)
            .map(|e| e.name.as_str())
            .collect();
        let mine: Vec<&str> = workload
            .iter()
            .filter(|f| names.contains(f))
            .copied()
            .collect();
        assert_eq!(names, mine, "{names:?}");
        assert!(!names.is_empty());
        // The mount read the footer and the TOC, then the landmark region in one request
        // (an on-demand read of one of its files would have split it); the workload then read
        // only local data (the background fill starts 1 s after the tree is built, and takes
        // only what lies after the region).
        let gets = gets(log, digest);
        assert!(gets.len() >= 3, "{gets:?}");
        assert_eq!(gets[2], landmark, "{gets:?}");
        assert_eq!(
            gets.iter().filter(|&&b| b == landmark).count(),
            1,
            "{gets:?}"
        );
    }
}

/// The TOC JSON of every layer of `repo_ref`, with the layer's annotations, as the registry
/// serves them.
fn tocs(registry: &Registry, repo_ref: &str) -> Vec<(Value, Value)> {
    let repo = repo_ref.split(':').next().unwrap();
    manifest(registry, repo_ref)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().unwrap();
            let toc_digest = l["annotations"][TOC_DIGEST_ANNOTATION].as_str().unwrap();
            let (blob, _) = blob_toc(registry, repo, digest, toc_digest);
            let footer = parse_footer(&blob[blob.len() - FOOTER_SIZE..]).unwrap();
            let range = footer.toc_range(blob.len() as u64).unwrap();
            let member = &blob[range.start as usize..range.end as usize];
            let mut tar = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(member), &mut tar)
                .unwrap();
            let mut archive = tar::Archive::new(&tar[..]);
            let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
            let mut json = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut json).unwrap();
            let uncompressed = {
                let mut all = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::MultiGzDecoder::new(&blob[..]),
                    &mut all,
                )
                .unwrap();
                all.len()
            };
            assert_eq!(
                l["annotations"][UNCOMPRESSED_SIZE_ANNOTATION],
                uncompressed.to_string(),
                "{repo_ref}: {l}"
            );
            (
                serde_json::from_slice(&json).unwrap(),
                l["annotations"].clone(),
            )
        })
        .collect()
}

/// A TOC's entries with what depends on the tar bytes taken out (offsets), names cleaned as
/// readers clean them (`./a/` is `a`), and modtimes to whole seconds (the Go writer's).
fn toc_entries(toc: &Value) -> Vec<Value> {
    toc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.clone();
            let o = e.as_object_mut().unwrap();
            o.remove("offset");
            o.remove("innerOffset");
            let name = o["name"].as_str().unwrap();
            let clean = name
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_owned();
            o.insert("name".into(), clean.into());
            if let Some(Value::String(t)) = o.get("modtime") {
                // The reference writer rounds to the nearest second; imagefs keeps the
                // nanoseconds (readers of both parse RFC 3339 fractions).
                let rfc = &time::format_description::well_known::Rfc3339;
                let t = time::OffsetDateTime::parse(t, rfc).unwrap();
                let up = u8::from(t.nanosecond() >= 500_000_000);
                let whole = t.replace_nanosecond(0).unwrap() + time::Duration::seconds(up.into());
                o.insert("modtime".into(), whole.format(rfc).unwrap().into());
            }
            e
        })
        .collect()
}

#[test]
fn the_toc_is_what_the_reference_converter_writes_for_the_same_layers() {
    let registry = Registry::start(Auth::Anonymous);
    let [l1, l2, l3] = rule_layers();
    let l1: Vec<Entry> = l1.into_iter().filter(is_utf8).collect();
    let mut big = vec![Entry::dir("big")];
    big.push(Entry::file("big/chunked", noise((9 << 20) + 123, 4)));
    big.push(Entry::file("big/exact", noise(4 << 20, 5)));
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(&l1, Compression::Gzip))
        .layer(Layer::new(&big, Compression::Gzip))
        .layer(Layer::new(&l2, Compression::Gzip))
        .layer(Layer::new(&l3, Compression::Gzip))
        .build();
    registry.push_image("interop", "src", &image);

    let imagefs = Imagefs::new();
    convert(&imagefs, &registry, "interop:src", "interop:imagefs", &[]);
    let c = crate::support::containerd::Containerd::start(&[]);
    crate::containerd::convert_to_estargz(&c, &registry, "interop:src", "interop:ctr");

    let ours = tocs(&registry, "interop:imagefs");
    let theirs = tocs(&registry, "interop:ctr");
    assert_eq!(ours.len(), theirs.len());
    for (i, ((ours, our_ann), (theirs, their_ann))) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(ours["version"], theirs["version"], "layer {i}");
        let keys = |a: &Value| a.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(our_ann), keys(their_ann), "layer {i}");
        let (ours, theirs) = (toc_entries(ours), toc_entries(theirs));
        // The first difference, with its neighbours, rather than two whole TOCs.
        if let Some(k) = (0..ours.len().max(theirs.len())).find(|&k| ours.get(k) != theirs.get(k)) {
            let around = |v: &[Value]| {
                v.iter()
                    .skip(k.saturating_sub(2))
                    .take(5)
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "layer {i}, entry {k} of {}/{}:\n--- imagefs ---\n{}\n--- ctr-remote ---\n{}",
                ours.len(),
                theirs.len(),
                around(&ours),
                around(&theirs)
            );
        }
    }
}

/// A small OCI image in `registry` as `small:src`: one gzip layer with a 200 KB file.
fn small_source(registry: &Registry) {
    let image = ImageBuilder::new(Format::Oci)
        .layer(Layer::new(
            &[Entry::dir(""), Entry::file("data", noise(200_000, 3))],
            Compression::Gzip,
        ))
        .build();
    registry.push_image("small", "src", &image);
}

/// `imagefs convert` run off the test's runtime (the adversarial server runs on it).
async fn convert_fails(imagefs: &Imagefs, src: String, dst: String, want: &str) {
    let cmd = imagefs.cmd(["convert", &src, &dst]);
    let out = tokio::task::spawn_blocking(move || cmd.run())
        .await
        .unwrap();
    out.assert_failure_contains(want);
}

/// A destination that takes HEADs (404) and opens upload sessions; `fault` answers the
/// PATCHes and PUTs of blobs.
fn failing_destination(fault: fn() -> Reply) -> impl Fn(&Recorded) -> Reply + Send + Sync {
    move |r| match r.method.as_str() {
        "HEAD" => Reply::status(404),
        "POST" if r.route().ends_with("/blobs/uploads/") => {
            Reply::status(202).header("location", "/v2/app/blobs/uploads/s1?_state=0")
        }
        "PATCH" | "PUT" if r.route().contains("/blobs/uploads/") => fault(),
        "PUT" => Reply::status(201),
        _ => Reply::status(404),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn push_failures_are_clear_and_leave_no_manifest() {
    let registry = Registry::start(Auth::Anonymous);
    small_source(&registry);
    let src = registry.reference("small:src");
    let imagefs = Imagefs::new();
    let offline = imagefs
        .cmd([
            "--offline",
            "convert",
            &src,
            &registry.reference("small:esgz"),
        ])
        .run();
    offline.assert_failure_contains("cannot run with --offline");

    // A token registry that gives anonymous users pull rights only.
    let dst = Registry::start(Auth::Token);
    convert_fails(
        &imagefs,
        src.clone(),
        dst.reference("public/app:v1"),
        "push access to public/app denied",
    )
    .await;
    let repos = dst.storage_dir().join("docker/registry/v2/repositories");
    assert!(!repos.join("public/app/_manifests").exists());

    // 413 on the upload; then a connection dropped at every attempt.
    for (fault, want) in [
        (
            (|| Reply::error(413, "SIZE_INVALID", "request entity too large")) as fn() -> Reply,
            "too large",
        ),
        (Reply::drop_connection, "failed after"),
    ] {
        let adv = Adversary::start(failing_destination(fault)).await;
        convert_fails(
            &imagefs,
            src.clone(),
            format!("{}/app:v1", adv.host()),
            want,
        )
        .await;
        let requests = adv.requests();
        assert!(
            requests
                .iter()
                .any(|r| r.method == "PUT" || r.method == "PATCH"),
            "{requests:#?}"
        );
        assert!(
            requests.iter().all(|r| !r.route().contains("/manifests/")),
            "{requests:#?}"
        );
    }
}

#[test]
fn all_platforms_converts_each_image_of_an_index_and_pushes_an_index() {
    let registry = Registry::start(Auth::Anonymous);
    let image = |arch: &str| {
        ImageBuilder::new(Format::Oci)
            .platform(&format!("linux/{arch}"))
            .layer(Layer::new(
                &[
                    Entry::dir(""),
                    Entry::file("arch", arch),
                    Entry::file("blob", noise(100_000, 8)),
                ],
                Compression::Gzip,
            ))
            .build()
    };
    let index = crate::support::IndexBuilder::new(Format::Oci)
        .image(image("amd64"))
        .image(image("arm64"))
        .attestation()
        .build();
    registry.push_index("multi", "src", &index);
    let imagefs = Imagefs::new();
    let digest = convert(
        &imagefs,
        &registry,
        "multi:src",
        "multi:esgz",
        &["--all-platforms"],
    );
    let top = manifest(&registry, "multi:esgz");
    assert_eq!(top["mediaType"], "application/vnd.oci.image.index.v1+json");
    let entries = top["manifests"].as_array().unwrap();
    // The attestation described the source's manifests: left out.
    let platforms: Vec<&str> = entries
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, ["amd64", "arm64"]);
    assert!(digest.starts_with("sha256:"));
    for (m, arch) in entries.iter().zip(["amd64", "arm64"]) {
        let child = format!("multi@{}", m["digest"].as_str().unwrap());
        let child = manifest(&registry, &child);
        assert!(
            child["layers"][0]["annotations"][TOC_DIGEST_ANNOTATION].is_string(),
            "{child}"
        );
        let fresh = Imagefs::new();
        let platform = format!("linux/{arch}");
        let mount = Mount::new_with(
            &fresh,
            &["--platform", &platform],
            &[],
            &registry.reference("multi:esgz"),
        );
        assert_eq!(fs::read_to_string(mount.p("arch")).unwrap(), arch);
        mount.unmount();
    }
    // Without the flag: the host's image alone.
    let single = convert(&imagefs, &registry, "multi:src", "multi:one", &[]);
    let one = manifest(&registry, "multi:one");
    assert_eq!(
        one["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(single, entries[0]["digest"].as_str().unwrap());
}
