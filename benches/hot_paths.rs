//! Micro-benchmarks of the hot paths of a pull and a mount: tar indexing (with and without
//! extraction), gzip and zstd decoding, sha256 (every blob and diff_id is hashed), the
//! overlay merge, and inode lookups. Deterministic inputs built in memory; run by
//! `scripts/bench` as `cargo bench --bench hot_paths -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::io::Write;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use imagefs::layer::decompress;
use imagefs::layer::tar::index_layer;
use imagefs::layer::{Entry, EntryKind, LayerIndex};
use imagefs::oci::{Compression, Digest};
use imagefs::overlay::{ROOT, merge};

/// xorshift: deterministic, cheap.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Text-like bytes (compress about 4×).
fn text(len: usize, rng: &mut Rng) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"the ",
        b"library ",
        b"shared ",
        b"object ",
        b"version ",
        b"file ",
        b"\n",
        b"GNU ",
    ];
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(WORDS[(rng.next() % 8) as usize]);
    }
    v.truncate(len);
    v
}

/// A distro-like tar: 5,000 entries (dirs, many small files, symlinks, a few 1 MiB files).
fn distro_tar() -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h
    };
    for d in 0..100 {
        let dir = format!("usr/share/p{d:03}/");
        b.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            &dir,
            &[][..],
        )
        .unwrap();
        for f in 0..45 {
            let len = 100 + (rng.next() % 6000) as usize;
            let data = text(len, &mut rng);
            let mut h = header(tar::EntryType::Regular, 0o644, len as u64);
            b.append_data(&mut h, format!("{dir}f{f:02}"), &data[..])
                .unwrap();
        }
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("{dir}link"), "f00").unwrap();
    }
    for i in 0..8 {
        let data = text(1 << 20, &mut rng);
        let mut h = header(tar::EntryType::Regular, 0o755, data.len() as u64);
        b.append_data(&mut h, format!("usr/lib/big{i}.so"), &data[..])
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn bench_tar(c: &mut Criterion) {
    let tar = distro_tar();
    let mut g = c.benchmark_group("tar_index");
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.bench_function("index only (5k entries)", |b| {
        b.iter(|| index_layer(black_box(&tar[..]), None).unwrap())
    });
    // Every iteration extracts into a new directory, and none is deleted before the end: on
    // ext4 without a journal, creating inodes right after deleting thousands makes the
    // allocator skip each recently deleted one, which would measure our own clean-up.
    g.sample_size(10);
    let keep = std::cell::RefCell::new(Vec::new());
    g.bench_function("index + extract (5k entries)", |b| {
        b.iter_batched(
            || tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
            |dir| {
                let index = index_layer(black_box(&tar[..]), Some(dir.path())).unwrap();
                keep.borrow_mut().push(dir);
                index
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn bench_decode(c: &mut Criterion) {
    let mut rng = Rng(7);
    let raw = text(32 << 20, &mut rng);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&raw[..], 3).unwrap();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(raw.len() as u64));
    for (name, compression, blob) in [
        ("gunzip 32 MiB (zlib-rs)", Compression::Gzip, &gz),
        ("zstd 32 MiB", Compression::Zstd, &zst),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut d = decompress::decoder(compression, &blob[..]).unwrap();
                std::io::copy(&mut d, &mut std::io::sink()).unwrap()
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("sha256");
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function("32 MiB", |b| b.iter(|| Digest::sha256(black_box(&raw))));
    g.finish();
}

/// Four layers, 20,000 entries in all: a base tree, two layers adding and replacing files,
/// and one deleting (whiteouts) and making a directory opaque.
fn layers() -> Vec<LayerIndex> {
    let file = |p: String| {
        let mut e = Entry::new(p, EntryKind::File, 0o644);
        e.size = 10;
        e
    };
    let dir = |p: String| Entry::new(p, EntryKind::Dir, 0o755);
    let mut base = LayerIndex::default();
    for d in 0..100 {
        base.entries.push(dir(format!("d{d:03}")));
        for f in 0..100 {
            base.entries.push(file(format!("d{d:03}/f{f:03}")));
        }
    }
    let mut add = LayerIndex::default();
    for d in 0..50 {
        add.entries.push(dir(format!("d{d:03}")));
        for f in 50..150 {
            add.entries.push(file(format!("d{d:03}/f{f:03}")));
        }
    }
    let mut more = LayerIndex::default();
    for d in 100..120 {
        more.entries.push(dir(format!("d{d:03}")));
        for f in 0..100 {
            more.entries.push(file(format!("d{d:03}/f{f:03}")));
        }
    }
    let mut del = LayerIndex::default();
    for d in 60..70 {
        del.entries.push(dir(format!("d{d:03}")));
        for f in 0..30 {
            del.entries.push(file(format!("d{d:03}/.wh.f{f:03}")));
        }
    }
    del.entries.push(dir("d099".into()));
    del.entries.push(file("d099/.wh..wh..opq".into()));
    vec![base, add, more, del]
}

fn bench_overlay(c: &mut Criterion) {
    let layers = layers();
    let n: usize = layers.iter().map(|l| l.entries.len()).sum();
    let mut g = c.benchmark_group("overlay");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("merge 4 layers (20k entries)", |b| {
        b.iter(|| merge(black_box(&layers)).unwrap())
    });
    let tree = merge(&layers).unwrap();
    let paths: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("d{:03}/f{:03}", i % 120, (i * 7) % 100).into_bytes())
        .collect();
    g.throughput(Throughput::Elements(paths.len() as u64));
    g.bench_function("resolve 1,000 paths", |b| {
        b.iter(|| {
            paths
                .iter()
                .filter(|p| tree.resolve(black_box(p)).is_some())
                .count()
        })
    });
    g.bench_function("lookup 1,000 names in one directory", |b| {
        let d = tree.lookup(ROOT, b"d010").unwrap();
        let names: Vec<Vec<u8>> = (0..1000)
            .map(|i| format!("f{:03}", i % 150).into_bytes())
            .collect();
        b.iter(|| {
            names
                .iter()
                .filter(|n| tree.lookup(d, black_box(n)).is_some())
                .count()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_tar, bench_decode, bench_overlay);
criterion_main!(benches);
