//! Writes the images `scripts/bench` measures into an OCI image layout, deterministically:
//!
//! - `realistic-gzip`: four gzip layers shaped like a small distro image — 5,600 small text
//!   files (docs, locales, scripts), 50 MB-sized binaries and libraries, two 24 MiB data files,
//!   a static busybox as `/bin/sh`, `/etc/os-release`, and a last layer deleting a few files
//!   of the first (whiteouts). About 150 MB uncompressed.
//! - `realistic-estargz`: the same files as eStargz layers (4 MiB chunks, a
//!   `.no.prefetch.landmark`, `toc.digest` annotations), as `ctr-remote image convert
//!   --estargz` lays them out.
//! - `tree20k`: one gzip layer of 20,000 entries (200 directories of 99 small files).
//! - `single-gzip`: the first two layers of `realistic` as one gzip layer (about 60 MB, 3,000
//!   files): a debian-sized single-layer image.
//! - `tree20k-estargz`: the same tree as one eStargz layer.
//! - `many1m`: one gzip layer of 1,001,001 entries (1,000 directories of 1,000 empty files),
//!   to measure what the entry count alone costs.
//! - `big1g`: one gzip layer holding one 1 GiB file, `/big.bin`.
//! - `bigfile-estargz`: the `realistic-estargz` layers plus a fifth eStargz layer holding one
//!   128 MiB file, `/big.bin` (half of each 8 KiB noisy, half compressible), to measure what a
//!   big cold read costs next to the background fill.
//! - `many-layers`: 40 gzip layers, each a small slice of a distro: a base layer (busybox as
//!   `/bin/sh`, `/etc/os-release`), then one package per layer — 30–80 small text files (docs,
//!   scripts, a config file) and one 200–800 KB binary (`usr/bin/pNN`, half noisy, half
//!   compressible). Layers 20 and 39 delete files of earlier layers (whiteouts of a whole doc
//!   directory, of binaries and of single files). About 20 MB of gzip: what an image built by
//!   many `RUN` steps looks like, to measure what a conversion costs per layer.
//!
//! Usage: `bench_image OUT_DIR [--skip-big]`. The layout is read by `skopeo copy oci:OUT_DIR:TAG`.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use imagefs::layer::estargz::TOC_DIGEST_ANNOTATION;
use imagefs::layer::estargz::{WriterOptions, build};
use imagefs::layer::index::{Entry as IndexEntry, EntryKind, Timespec};
use serde_json::json;
use sha2::{Digest as _, Sha256};

const MTIME: u64 = 1_700_000_000;

/// What a layer holds, in tar order.
enum Node {
    Dir(String),
    File(String, u32, Content),
    Symlink(String, String),
}

/// File contents, generated on demand so that the 1 GiB file never sits in memory.
#[derive(Clone)]
enum Content {
    /// Words from a small vocabulary: compresses about 4×, like docs and scripts.
    Text {
        len: u64,
        seed: u64,
    },
    /// Alternating 4 KiB blocks of noise and of a 16-symbol alphabet: about 1.6×, like
    /// machine code.
    Binary {
        len: u64,
        seed: u64,
    },
    Bytes(Vec<u8>),
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Text { len, .. } | Content::Binary { len, .. } => *len,
            Content::Bytes(b) => b.len() as u64,
        }
    }

    fn reader(&self) -> Box<dyn Read + '_> {
        match self {
            Content::Bytes(b) => Box::new(&b[..]),
            c => Box::new(Gen {
                content: c,
                pos: 0,
                rng: Rng::new(match c {
                    Content::Text { seed, .. } | Content::Binary { seed, .. } => *seed,
                    Content::Bytes(_) => 0,
                }),
            }),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len() as usize);
        self.reader()
            .read_to_end(&mut v)
            .expect("generated content");
        v
    }
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WORDS: [&str; 24] = [
    "the",
    "package",
    "copyright",
    "license",
    "software",
    "version",
    "debian",
    "file",
    "system",
    "library",
    "shared",
    "object",
    "GNU",
    "public",
    "free",
    "without",
    "warranty",
    "distribution",
    "source",
    "binary",
    "upstream",
    "changes",
    "\n",
    "  ",
];

struct Gen<'a> {
    content: &'a Content,
    pos: u64,
    rng: Rng,
}

impl Read for Gen<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = self.content.len();
        let n = ((len - self.pos) as usize).min(buf.len()).min(4096);
        let out = &mut buf[..n];
        match self.content {
            Content::Text { .. } => {
                let mut i = 0;
                while i < n {
                    let w = WORDS[(self.rng.next() % WORDS.len() as u64) as usize].as_bytes();
                    for &b in w.iter().chain(b" ") {
                        if i == n {
                            break;
                        }
                        out[i] = b;
                        i += 1;
                    }
                }
            }
            Content::Binary { .. } => {
                let noisy = (self.pos / 4096).is_multiple_of(2);
                for chunk in out.chunks_mut(8) {
                    let r = self.rng.next().to_le_bytes();
                    for (o, b) in chunk.iter_mut().zip(r) {
                        *o = if noisy { b } else { b & 0x0f };
                    }
                }
            }
            Content::Bytes(_) => unreachable!("read directly"),
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// The realistic image's layers.
fn realistic() -> Vec<Vec<Node>> {
    let file = |p: String, mode, c| Node::File(p, mode, c);
    let dir = |p: &str| Node::Dir(p.to_owned());
    let mut seed = 0u64;
    let mut next = || {
        seed += 1;
        seed
    };
    let mut sizes = Rng::new(42);

    // 1. Base: busybox, /etc, docs, shared libraries.
    let mut base = vec![
        dir("bin"),
        dir("etc"),
        dir("usr"),
        dir("usr/share"),
        dir("tmp"),
    ];
    base.extend(busybox_and_os_release(&[
        "sh",
        "cat",
        "ls",
        "find",
        "tar",
        "sha256sum",
    ]));
    base.push(file(
        "etc/passwd".into(),
        0o644,
        Content::Bytes(b"root:x:0:0:root:/root:/bin/sh\n".to_vec()),
    ));
    base.push(dir("usr/share/doc"));
    for p in 0..1250 {
        base.push(dir(&format!("usr/share/doc/pkg{p:04}")));
        for f in ["copyright", "changelog"] {
            let len = 200 + sizes.next() % 7800;
            base.push(file(
                format!("usr/share/doc/pkg{p:04}/{f}"),
                0o644,
                Content::Text { len, seed: next() },
            ));
        }
    }
    base.push(dir("usr/lib"));
    for l in 0..20 {
        let len = (512 << 10) + sizes.next() % (2560 << 10);
        base.push(file(
            format!("usr/lib/lib{l:02}.so.1"),
            0o644,
            Content::Binary { len, seed: next() },
        ));
    }

    // 2. Tools and locales.
    let mut tools = vec![
        dir("usr"),
        dir("usr/bin"),
        dir("usr/share"),
        dir("usr/share/locale"),
    ];
    for t in 0..30 {
        let len = (200 << 10) + sizes.next() % (1800 << 10);
        tools.push(file(
            format!("usr/bin/tool{t:02}"),
            0o755,
            Content::Binary { len, seed: next() },
        ));
    }
    for l in 0..50 {
        tools.push(dir(&format!("usr/share/locale/l{l:02}")));
        for m in 0..30 {
            let len = 100 + sizes.next() % 3000;
            tools.push(file(
                format!("usr/share/locale/l{l:02}/m{m:02}.mo"),
                0o644,
                Content::Text { len, seed: next() },
            ));
        }
    }

    // 3. The application: sources and two data files.
    let mut app = vec![
        dir("opt"),
        dir("opt/app"),
        dir("opt/app/data"),
        dir("opt/app/lib"),
    ];
    for d in 0..30 {
        app.push(dir(&format!("opt/app/lib/m{d:02}")));
        for f in 0..50 {
            let len = 300 + sizes.next() % 6000;
            app.push(file(
                format!("opt/app/lib/m{d:02}/f{f:02}.py"),
                0o644,
                Content::Text { len, seed: next() },
            ));
        }
    }
    for b in 0..2 {
        app.push(file(
            format!("opt/app/data/blob{b}.bin"),
            0o644,
            Content::Binary {
                len: 24 << 20,
                seed: next(),
            },
        ));
    }

    // 4. A fix-up layer: deletes a few docs, replaces a library.
    let mut fixup = vec![
        dir("usr"),
        dir("usr/share"),
        dir("usr/share/doc"),
        dir("usr/lib"),
    ];
    for p in 0..10 {
        fixup.push(file(
            format!("usr/share/doc/.wh.pkg{p:04}"),
            0o644,
            Content::Bytes(Vec::new()),
        ));
    }
    fixup.push(file(
        "usr/lib/lib00.so.1".into(),
        0o644,
        Content::Binary {
            len: 1 << 20,
            seed: next(),
        },
    ));
    vec![base, tools, app, fixup]
}

/// The many-layers image: a base, then one small package per layer, two layers deleting
/// files of earlier ones.
fn many_layers() -> Vec<Vec<Node>> {
    let file = |p: String, mode, c| Node::File(p, mode, c);
    let dir = |p: &str| Node::Dir(p.to_owned());
    let whiteout = |p: String| Node::File(p, 0o644, Content::Bytes(Vec::new()));
    let mut sizes = Rng::new(4040);
    let mut seed = 40_000u64;
    let mut next = || {
        seed += 1;
        seed
    };

    let mut base = vec![dir("bin"), dir("etc"), dir("tmp")];
    base.extend(busybox_and_os_release(&["sh", "cat", "ls"]));
    let mut layers = vec![base];
    for p in 1..40 {
        let pkg = format!("p{p:02}");
        let mut l = vec![
            dir("etc"),
            dir("usr"),
            dir("usr/bin"),
            dir("usr/share"),
            dir("usr/share/doc"),
            dir(&format!("usr/share/doc/{pkg}")),
            dir("usr/lib"),
            dir(&format!("usr/lib/{pkg}")),
        ];
        let binary = (200 << 10) + sizes.next() % (600 << 10);
        l.push(file(
            format!("usr/bin/{pkg}"),
            0o755,
            Content::Binary {
                len: binary,
                seed: next(),
            },
        ));
        l.push(file(
            format!("etc/{pkg}.conf"),
            0o644,
            Content::Text {
                len: 200 + sizes.next() % 1800,
                seed: next(),
            },
        ));
        let small = 30 + sizes.next() % 51;
        for f in 0..small {
            let (path, len) = if f % 3 == 0 {
                (
                    format!("usr/lib/{pkg}/s{f:02}.sh"),
                    100 + sizes.next() % 3000,
                )
            } else {
                (
                    format!("usr/share/doc/{pkg}/d{f:02}.txt"),
                    200 + sizes.next() % 6000,
                )
            };
            l.push(file(path, 0o644, Content::Text { len, seed: next() }));
        }
        match p {
            // Deletes a whole doc directory, two binaries and a script of earlier layers.
            20 => {
                l.push(whiteout("usr/share/doc/.wh.p03".into()));
                l.push(whiteout("usr/bin/.wh.p05".into()));
                l.push(whiteout("usr/bin/.wh.p07".into()));
                l.push(dir("usr/lib/p11"));
                l.push(whiteout("usr/lib/p11/.wh.s00.sh".into()));
            }
            // Deletes another package's files, and a binary replaced by this layer's.
            39 => {
                l.push(whiteout("usr/lib/.wh.p12".into()));
                l.push(whiteout("usr/share/doc/.wh.p12".into()));
                l.push(whiteout("usr/bin/.wh.p12".into()));
                l.push(whiteout("etc/.wh.p12.conf".into()));
                l.push(file(
                    "usr/bin/p30".into(),
                    0o755,
                    Content::Binary {
                        len: 300 << 10,
                        seed: next(),
                    },
                ));
            }
            _ => {}
        }
        layers.push(l);
    }
    layers
}

fn tree20k() -> Vec<Vec<Node>> {
    let mut layer = vec![Node::Dir("tree".into())];
    let mut sizes = Rng::new(7);
    let mut seed = 1000;
    for d in 0..200 {
        layer.push(Node::Dir(format!("tree/d{d:03}")));
        for f in 0..99 {
            seed += 1;
            layer.push(Node::File(
                format!("tree/d{d:03}/f{f:02}"),
                0o644,
                Content::Text {
                    len: 100 + sizes.next() % 4000,
                    seed,
                },
            ));
        }
    }
    vec![layer]
}

fn many1m() -> Vec<Node> {
    let mut layer = vec![Node::Dir("many".into())];
    for d in 0..1000 {
        layer.push(Node::Dir(format!("many/d{d:03}")));
        for f in 0..1000 {
            layer.push(Node::File(
                format!("many/d{d:03}/f{f:03}"),
                0o644,
                Content::Bytes(Vec::new()),
            ));
        }
    }
    layer
}

fn big_estargz() -> Vec<Node> {
    vec![Node::File(
        "big.bin".into(),
        0o644,
        Content::Binary {
            len: 128 << 20,
            seed: 77,
        },
    )]
}

fn big1g() -> Vec<Vec<Node>> {
    vec![vec![Node::File(
        "big.bin".into(),
        0o644,
        Content::Binary {
            len: 1 << 30,
            seed: 99,
        },
    )]]
}

/// The host's static busybox as `/bin/busybox`, `applets` linked to it, and `/etc/os-release`:
/// what every bench image's base layer has.
fn busybox_and_os_release(applets: &[&str]) -> Vec<Node> {
    let busybox = fs::read("/bin/busybox").expect("/bin/busybox (busybox-static) is installed");
    let mut nodes = vec![Node::File(
        "bin/busybox".into(),
        0o755,
        Content::Bytes(busybox),
    )];
    for applet in applets {
        nodes.push(Node::Symlink(format!("bin/{applet}"), "busybox".into()));
    }
    nodes.push(Node::File(
        "etc/os-release".into(),
        0o644,
        Content::Bytes(
            b"PRETTY_NAME=\"imagefs bench image\"\nNAME=\"imagefs-bench\"\nID=imagefs-bench\n"
                .to_vec(),
        ),
    ));
    nodes
}

/// Hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hashing<W>(inner: W) -> Hashing<W> {
    Hashing {
        inner,
        hash: Sha256::new(),
        len: 0,
    }
}

fn sha(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// A layer blob in the layout: its descriptor and diff_id.
#[derive(Clone)]
struct Blob {
    digest: String,
    size: u64,
    diff_id: String,
    toc_digest: Option<String>,
}

struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> io::Result<Layout> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Layout {
            dir: dir.to_owned(),
        })
    }

    fn put(&self, bytes: &[u8]) -> io::Result<(String, u64)> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        fs::write(self.blob_path(&digest), bytes)?;
        Ok((digest, bytes.len() as u64))
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// A gzip layer, streamed: tar → diff_id hash → gzip → blob hash → file.
    fn gzip_layer(&self, nodes: &[Node]) -> io::Result<Blob> {
        let tmp = self.dir.join("blobs/tmp");
        let file = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let gz = GzEncoder::new(hashing(file), Compression::default());
        let mut tar = tar::Builder::new(hashing(gz));
        for node in nodes {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(MTIME);
            h.set_uid(0);
            h.set_gid(0);
            match node {
                Node::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{p}/"), io::empty())?;
                }
                Node::File(p, mode, c) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(c.len());
                    tar.append_data(&mut h, p, c.reader())?;
                }
                Node::Symlink(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tar.append_link(&mut h, p, target)?;
                }
            }
        }
        let tar_hashing = tar.into_inner()?;
        let diff_id = sha(tar_hashing.hash);
        let blob_hashing = tar_hashing.inner.finish()?;
        let (digest, size) = (sha(blob_hashing.hash), blob_hashing.len);
        blob_hashing
            .inner
            .into_inner()
            .map_err(|e| e.into_error())?;
        fs::rename(&tmp, self.blob_path(&digest))?;
        Ok(Blob {
            digest,
            size,
            diff_id,
            toc_digest: None,
        })
    }

    fn estargz_layer(&self, nodes: &[Node]) -> io::Result<Blob> {
        let entries: Vec<(IndexEntry, Vec<u8>)> = nodes
            .iter()
            .map(|n| {
                let (mut e, content) = match n {
                    Node::Dir(p) => (
                        IndexEntry::new(p.as_str(), EntryKind::Dir, 0o755),
                        Vec::new(),
                    ),
                    Node::File(p, mode, c) => {
                        let mut e = IndexEntry::new(p.as_str(), EntryKind::File, *mode);
                        e.size = c.len();
                        (e, c.bytes())
                    }
                    Node::Symlink(p, target) => {
                        let mut e = IndexEntry::new(p.as_str(), EntryKind::Symlink, 0o777);
                        e.link = Some(target.as_bytes().to_vec());
                        (e, Vec::new())
                    }
                };
                e.mtime = Timespec {
                    sec: MTIME as i64,
                    nsec: 0,
                };
                (e, content)
            })
            .collect();
        let w = build(&entries, &WriterOptions::default()).map_err(io::Error::other)?;
        let (digest, size) = self.put(&w.blob)?;
        Ok(Blob {
            digest,
            size,
            diff_id: w.diff_id.to_string(),
            toc_digest: Some(w.toc_digest.to_string()),
        })
    }

    /// Config and manifest for `layers`; returns the manifest descriptor tagged `tag`.
    fn image(&self, tag: &str, layers: &[Blob]) -> io::Result<serde_json::Value> {
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"] },
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
        });
        let (config_digest, config_size) = self.put(&serde_json::to_vec(&config)?)?;
        let layer_descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|l| {
                let mut d = json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": l.digest,
                    "size": l.size,
                });
                if let Some(toc) = &l.toc_digest {
                    d["annotations"] = json!({ TOC_DIGEST_ANNOTATION: toc });
                }
                d
            })
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": layer_descs,
        });
        let (digest, size) = self.put(&serde_json::to_vec(&manifest)?)?;
        Ok(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }))
    }
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first() else {
        eprintln!("usage: bench_image OUT_DIR [--skip-big]");
        std::process::exit(2);
    };
    let skip_big = args.iter().any(|a| a == "--skip-big");
    let layout = Layout::new(Path::new(out))?;
    let mut manifests = Vec::new();

    let realistic = realistic();
    let gz: Vec<Blob> = realistic
        .iter()
        .map(|l| layout.gzip_layer(l))
        .collect::<io::Result<_>>()?;
    manifests.push(layout.image("realistic-gzip", &gz)?);
    let esgz: Vec<Blob> = realistic
        .iter()
        .map(|l| layout.estargz_layer(l))
        .collect::<io::Result<_>>()?;
    manifests.push(layout.image("realistic-estargz", &esgz)?);
    let mut with_big = esgz.clone();
    with_big.push(layout.estargz_layer(&big_estargz())?);
    manifests.push(layout.image("bigfile-estargz", &with_big)?);

    let mut base_tools = self::realistic();
    let mut single = base_tools.remove(0);
    single.extend(base_tools.remove(0));
    let single = layout.gzip_layer(&single)?;
    manifests.push(layout.image("single-gzip", &[single])?);

    let many: Vec<Blob> = many_layers()
        .iter()
        .map(|l| layout.gzip_layer(l))
        .collect::<io::Result<_>>()?;
    manifests.push(layout.image("many-layers", &many)?);

    let tree: Vec<Blob> = tree20k()
        .iter()
        .map(|l| layout.gzip_layer(l))
        .collect::<io::Result<_>>()?;
    manifests.push(layout.image("tree20k", &tree)?);
    let tree_esgz: Vec<Blob> = tree20k()
        .iter()
        .map(|l| layout.estargz_layer(l))
        .collect::<io::Result<_>>()?;
    manifests.push(layout.image("tree20k-estargz", &tree_esgz)?);

    if !skip_big {
        let big: Vec<Blob> = big1g()
            .iter()
            .map(|l| layout.gzip_layer(l))
            .collect::<io::Result<_>>()?;
        manifests.push(layout.image("big1g", &big)?);
        let many = layout.gzip_layer(&many1m())?;
        manifests.push(layout.image("many1m", &[many])?);
    }

    let index = json!({ "schemaVersion": 2, "manifests": manifests });
    fs::write(layout.dir.join("index.json"), serde_json::to_vec(&index)?)?;
    for (tag, layers) in [
        ("realistic-gzip", &gz),
        ("realistic-estargz", &esgz),
        ("many-layers", &many),
    ] {
        let total: u64 = layers.iter().map(|l| l.size).sum();
        eprintln!("{tag}: {} layers, {total} bytes", layers.len());
    }
    Ok(())
}
