//! `imagefs::layer::tar::index_layer` over arbitrary bytes, as a plain tar (even selector
//! byte) or through the gzip decoder (odd), extracting into a fresh data directory.
//!
//! Invariants: nothing panics; nothing is created next to the data directory; the data
//! directory holds only numbered regular files; every indexed path and hardlink target is
//! clean (relative, no `.`/`..`/empty components); every file with data has its data file,
//! of the indexed size.
#![no_main]

use std::collections::BTreeSet;
use std::io::Read;

use imagefs::layer::EntryKind;
use imagefs::layer::extract::PACK;
use imagefs::layer::tar::{data_path, index_layer};
use imagefs::oci::Compression;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use common::assert_clean;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let root = tempfile::tempdir().expect("a temp dir");
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).expect("the data dir");

    let compression = if selector & 1 == 1 {
        Compression::Gzip
    } else {
        Compression::None
    };
    let reader = imagefs::layer::decompress::decoder(compression, bytes).expect("a decoder");
    // A gzip bomb within the input size limit expands to a few MB at most (deflate ~1032:1);
    // bound it anyway so a run stays within its time budget.
    let reader = reader.take(64 << 20);
    let result = index_layer(reader, Some(&dir));

    let beside: Vec<_> = std::fs::read_dir(root.path())
        .expect("list the temp dir")
        .map(|e| e.expect("a dir entry").file_name())
        .collect();
    assert_eq!(
        beside,
        [std::ffi::OsString::from("data")],
        "created beside data dir"
    );

    let mut ids = BTreeSet::new();
    let mut pack_len = 0;
    for item in std::fs::read_dir(&dir).expect("list the data dir") {
        let item = item.expect("a dir entry");
        let name = item.file_name();
        if name == PACK {
            assert!(item.file_type().expect("a file type").is_file());
            pack_len = item.metadata().expect("the pack's metadata").len();
            continue;
        }
        let id: u32 = name
            .to_str()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected data file name {name:?}"));
        assert_eq!(name.to_str(), Some(id.to_string().as_str()));
        assert!(item.file_type().expect("a file type").is_file());
        ids.insert(id);
    }

    let Ok(index) = result else {
        return;
    };
    let mut seen = BTreeSet::new();
    for entry in &index.entries {
        assert_clean(&entry.path);
        match entry.kind {
            EntryKind::Hardlink => assert_clean(entry.link.as_deref().expect("hardlink target")),
            EntryKind::Symlink => assert!(entry.link.is_some()),
            _ => {}
        }
        assert!(entry.mode <= 0o7777);
        if entry.kind != EntryKind::File {
            assert_eq!(entry.size, 0);
            assert!(entry.data.is_none());
            continue;
        }
        match entry.data {
            Some(d) => {
                assert!(entry.size > 0);
                assert!(seen.insert(d.id), "data id {} used twice", d.id);
                match index.packed.get(d) {
                    Some(at) => {
                        assert_eq!(at.len, entry.size);
                        assert!(at.offset + at.len <= pack_len, "packed past the pack's end");
                        assert!(!ids.contains(&d.id), "packed and in a file of its own");
                    }
                    None => {
                        let meta =
                            std::fs::metadata(data_path(&dir, d)).expect("the data file exists");
                        assert_eq!(meta.len(), entry.size);
                    }
                }
            }
            None => assert_eq!(entry.size, 0),
        }
    }
    // Data files of dropped eStargz metadata entries may remain besides these.
    let own: BTreeSet<u32> = seen
        .iter()
        .copied()
        .filter(|&id| index.packed.get(imagefs::layer::DataRef { id }).is_none())
        .collect();
    assert!(own.is_subset(&ids));
});
