//! Every merge rule as one case in the notation of [`crate::overlay::notation`], the error
//! messages, scale, and a comparison with the naive model in [`super::model`] on
//! pseudo-random layer stacks.

use std::time::{Duration, Instant};

use super::{MergeError, merge, model};
use crate::layer::index::{Entry, EntryKind, LayerIndex};
use crate::overlay::notation::{format, listing, parse, render};
use crate::overlay::tree::{Content, Tree};

/// Merge layers written in the notation, check the tree's invariants, render it.
fn run(layers: &[&str]) -> Result<String, MergeError> {
    let fx = parse(layers);
    let tree = merge(&fx.layers)?;
    if let Err(broken) = tree.check_invariants() {
        panic!("invariant broken for {layers:?}: {broken}\n{tree:#?}");
    }
    Ok(render(&tree, &fx))
}

/// Expected listings are written indented; compare them line by line, trimmed.
fn dedent(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// (name, layers base first, expected listing)
const CASES: &[(&str, &[&str], &str)] = &[
    ("no layers: just the default root", &[], "/ dir 0755"),
    (
        "the tar's ./ sets the root's metadata",
        &["dir / 0700 uid=1 gid=2 mtime=7; file f"],
        r#"
        / dir 0700 uid=1 gid=2 mtime=7
        /f file 0644 ""
        "#,
    ),
    (
        "every entry type",
        &[r#"dir a; file a/f "hello"; file a/empty; sym a/l -> f
             chr a/tty 5,0 0620; blk a/sda 8,1 0660; fifo a/p 0600"#],
        r#"
        / dir 0755
        /a dir 0755
        /a/empty file 0644 ""
        /a/f file 0644 "hello"
        /a/l sym 0777 -> f
        /a/p fifo 0600
        /a/sda blk 0660 8,1
        /a/tty chr 0620 5,0
        "#,
    ),
    (
        "missing parents are created 0755 root mtime 0, later entries update them",
        &[r#"file a/b/c "x" 0600 uid=7"#, "dir a/b 0700 mtime=3"],
        r#"
        / dir 0755
        /a dir 0755
        /a/b dir 0700 mtime=3
        /a/b/c file 0600 uid=7 "x"
        "#,
    ),
    (
        "entry paths are cleaned lexically, never above the root",
        &["file a/./b//c; file ../../x; file a/../y"],
        r#"
        / dir 0755
        /a dir 0755
        /a/b dir 0755
        /a/b/c file 0644 ""
        /x file 0644 ""
        /y file 0644 ""
        "#,
    ),
    (
        "setuid, setgid and sticky bits are kept",
        &["dir t 1777; file su 4755; file sg 2711; dir sgd 2775; file all 7777"],
        r#"
        / dir 0755
        /all file 7777 ""
        /sg file 2711 ""
        /sgd dir 2775
        /su file 4755 ""
        /t dir 1777
        "#,
    ),
    (
        "xattrs are carried in order, empty values included; nanosecond mtimes",
        &[r#"file f mtime=5.000000123 xattr:security.capability="\x01\x00" xattr:user.empty="""#],
        r#"
        / dir 0755
        /f file 0644 mtime=5.000000123 xattr:security.capability="\x01\x00" xattr:user.empty="" ""
        "#,
    ),
    (
        "non-UTF-8 names, sorted bytewise",
        &[
            r#"dir \xff\xfe; file \xff\xfe/caf\xc3\xa9 "x"; file \xff\xfe/cafe; sym \xff\xfe/l -> \x80"#,
            r#"wh \xff\xfe/cafe"#,
        ],
        r#"
        / dir 0755
        /\xff\xfe dir 0755
        /\xff\xfe/caf\xc3\xa9 file 0644 "x"
        /\xff\xfe/l sym 0777 -> \x80
        "#,
    ),
    // Replacement.
    (
        "a file replaces a directory and its whole subtree",
        &[
            "dir a; dir a/b; file a/b/c; file keep",
            r#"file a "now a file""#,
        ],
        r#"
        / dir 0755
        /a file 0644 "now a file"
        /keep file 0644 ""
        "#,
    ),
    (
        "a directory replaces a file",
        &[r#"file a "x""#, "dir a 0700; file a/f"],
        r#"
        / dir 0755
        /a dir 0700
        /a/f file 0644 ""
        "#,
    ),
    (
        "a directory replaces a symlink to a directory instead of following it",
        &["dir real; file real/x; sym a -> real", "dir a 0700"],
        r#"
        / dir 0755
        /a dir 0700
        /real dir 0755
        /real/x file 0644 ""
        "#,
    ),
    (
        "a file replaces a symlink of the same name instead of writing through it",
        &["dir real; sym a -> real", r#"file a "x""#],
        r#"
        / dir 0755
        /a file 0644 "x"
        /real dir 0755
        "#,
    ),
    (
        "a re-declared directory keeps its children and takes the new metadata and xattrs",
        &[
            "dir a 0755 xattr:user.x=1 xattr:user.y=2; file a/f",
            r#"dir a 0700 uid=1 gid=1 mtime=9 xattr:user.z="""#,
        ],
        r#"
        / dir 0755
        /a dir 0700 uid=1 gid=1 mtime=9 xattr:user.z=""
        /a/f file 0644 ""
        "#,
    ),
    (
        "the last entry for a path wins within a layer",
        &[r#"file f "one"; file f "two" 0600; dir d 0700; dir d 0711"#],
        r#"
        / dir 0755
        /d dir 0711
        /f file 0600 "two"
        "#,
    ),
    // Whiteouts.
    (
        "whiteout of a file",
        &[r#"dir a; file a/f "1"; file a/g "2""#, "wh a/f"],
        r#"
        / dir 0755
        /a dir 0755
        /a/g file 0644 "2"
        "#,
    ),
    (
        "whiteout of a directory removes the subtree",
        &[
            "dir a; dir a/b; file a/b/f; dir a/b/c; file a/b/c/g; file a/keep",
            "wh a/b",
        ],
        r#"
        / dir 0755
        /a dir 0755
        /a/keep file 0644 ""
        "#,
    ),
    (
        "whiteout of a symlink removes the link, not its target",
        &["dir real; file real/f; sym a -> real", "wh a"],
        r#"
        / dir 0755
        /real dir 0755
        /real/f file 0644 ""
        "#,
    ),
    (
        "a whiteout after the same layer's file does not remove it",
        &[r#"dir a; file a/f "lower""#, r#"file a/f "upper"; wh a/f"#],
        r#"
        / dir 0755
        /a dir 0755
        /a/f file 0644 "upper"
        "#,
    ),
    (
        "a whiteout before the same layer's file removes the lower one only",
        &[r#"dir a; file a/f "lower""#, r#"wh a/f; file a/f "upper""#],
        r#"
        / dir 0755
        /a dir 0755
        /a/f file 0644 "upper"
        "#,
    ),
    (
        "a whiteout of a directory the layer wrote into keeps the layer's entries only",
        &["dir d 0700; file d/old", "file d/new; wh d"],
        r#"
        / dir 0755
        /d dir 0700
        /d/new file 0644 ""
        "#,
    ),
    (
        "whiteouts of missing names, under missing or non-directory parents, are no-ops",
        &[
            "dir a; file f",
            "wh a/nothing; wh nowhere/x; wh a/nothing/deeper; wh f/x; opq f; opq nowhere",
        ],
        r#"
        / dir 0755
        /a dir 0755
        /f file 0644 ""
        "#,
    ),
    (
        "whiteout-named entries of any type are whiteouts and never appear",
        &[
            "file a; file b; file c",
            "dir .wh.a; sym .wh.b -> x; hard .wh.c => a",
        ],
        "/ dir 0755",
    ),
    (
        "whiteout through a symlinked parent removes in the target",
        &[
            "dir real; file real/f; file real/g; sym a -> real",
            "wh a/f",
        ],
        r#"
        / dir 0755
        /a sym 0777 -> real
        /real dir 0755
        /real/g file 0644 ""
        "#,
    ),
    (
        "delete, then re-create in a later layer",
        &[
            r#"dir a; file a/f "1""#,
            "wh a",
            r#"dir a 0700; file a/g "3""#,
        ],
        r#"
        / dir 0755
        /a dir 0700
        /a/g file 0644 "3"
        "#,
    ),
    (
        "delete and re-create in one layer",
        &["dir a 0700; file a/old", "wh a; dir a; file a/new"],
        r#"
        / dir 0755
        /a dir 0755
        /a/new file 0644 ""
        "#,
    ),
    // Opaque whiteouts.
    (
        "opaque before the layer's new children",
        &[
            "dir a; file a/old; dir a/sub; file a/sub/x",
            "dir a 0700; opq a; file a/new",
        ],
        r#"
        / dir 0755
        /a dir 0700
        /a/new file 0644 ""
        "#,
    ),
    (
        "opaque after the layer's new children",
        &[
            "dir a; file a/old; dir a/sub; file a/sub/x",
            "dir a 0700; file a/new; opq a",
        ],
        r#"
        / dir 0755
        /a dir 0700
        /a/new file 0644 ""
        "#,
    ),
    (
        "layer.md example, opaque first",
        &[
            "dir a; dir a/b; dir a/b/c; file a/b/c/bar",
            "dir a; opq a; dir a/b; dir a/b/c; file a/b/c/foo",
        ],
        r#"
        / dir 0755
        /a dir 0755
        /a/b dir 0755
        /a/b/c dir 0755
        /a/b/c/foo file 0644 ""
        "#,
    ),
    (
        "layer.md example, opaque last",
        &[
            "dir a; dir a/b; dir a/b/c; file a/b/c/bar",
            "dir a; dir a/b; dir a/b/c; file a/b/c/foo; opq a",
        ],
        r#"
        / dir 0755
        /a dir 0755
        /a/b dir 0755
        /a/b/c dir 0755
        /a/b/c/foo file 0644 ""
        "#,
    ),
    (
        // umoci's upperPaths: a lower directory the layer passed through is kept with its
        // metadata, its lower children go.
        "opaque after a child written through a lower directory",
        &["dir a; dir a/b 0700; file a/b/old", "file a/b/new; opq a"],
        r#"
        / dir 0755
        /a dir 0755
        /a/b dir 0700
        /a/b/new file 0644 ""
        "#,
    ),
    (
        "opaque on the root keeps the root's metadata",
        &["dir / 0711; dir a; file a/f; file top", "opq /; file new"],
        r#"
        / dir 0711
        /new file 0644 ""
        "#,
    ),
    (
        "opaque through a symlinked directory",
        &["dir real; file real/f; sym a -> real", "opq a"],
        r#"
        / dir 0755
        /a sym 0777 -> real
        /real dir 0755
        "#,
    ),
    (
        "repeated opaque whiteouts in one layer",
        &["dir a; file a/x", "opq a; file a/y; opq a; dir a/d; opq a"],
        r#"
        / dir 0755
        /a dir 0755
        /a/d dir 0755
        /a/y file 0644 ""
        "#,
    ),
    (
        "an opaque whiteout in a lower layer does not hide upper entries",
        &["dir a; file a/x", "opq a", "file a/y"],
        r#"
        / dir 0755
        /a dir 0755
        /a/y file 0644 ""
        "#,
    ),
    // Hardlinks.
    (
        "hardlink within a layer",
        &[r#"file f "x"; hard h => f"#],
        r#"
        / dir 0755
        /f file 0644 "x" inode=1 nlink=2
        /h file 0644 "x" inode=1 nlink=2
        "#,
    ),
    (
        "hardlink in a later layer to a lower layer's file",
        &[r#"dir a; file a/f "x" 0640 uid=3"#, "hard b/h => a/f"],
        r#"
        / dir 0755
        /a dir 0755
        /a/f file 0640 uid=3 "x" inode=1 nlink=2
        /b dir 0755
        /b/h file 0640 uid=3 "x" inode=1 nlink=2
        "#,
    ),
    (
        "a hardlink's own mode and owner are ignored",
        &["file f 0600", "hard h => f 0777 uid=9"],
        r#"
        / dir 0755
        /f file 0600 "" inode=1 nlink=2
        /h file 0600 "" inode=1 nlink=2
        "#,
    ),
    (
        "replacing one name of a hardlink group leaves the inode to the others",
        &[r#"file f "x"; hard h => f; hard i => f"#, r#"file h "new""#],
        r#"
        / dir 0755
        /f file 0644 "x" inode=1 nlink=2
        /h file 0644 "new"
        /i file 0644 "x" inode=1 nlink=2
        "#,
    ),
    (
        "whiteout of one name of a hardlink group",
        &[r#"file f "x"; hard h => f"#, "wh f"],
        r#"
        / dir 0755
        /h file 0644 "x"
        "#,
    ),
    (
        "removing a directory unlinks the names inside it",
        &[
            r#"dir d; file d/f "x"; hard h => d/f; hard d/g => d/f"#,
            "wh d",
        ],
        r#"
        / dir 0755
        /h file 0644 "x"
        "#,
    ),
    (
        "re-linking a name to its own group",
        &[r#"file f "x"; hard h => f"#, "hard h => f"],
        r#"
        / dir 0755
        /f file 0644 "x" inode=1 nlink=2
        /h file 0644 "x" inode=1 nlink=2
        "#,
    ),
    (
        "hardlink to a symlink links the symlink",
        &["sym s -> target; hard h => s"],
        r#"
        / dir 0755
        /h sym 0777 -> target inode=1 nlink=2
        /s sym 0777 -> target inode=1 nlink=2
        "#,
    ),
    (
        "hardlinks to a device and a fifo",
        &["chr c 1,3; fifo p", "hard c2 => c; hard p2 => p"],
        r#"
        / dir 0755
        /c chr 0644 1,3 inode=1 nlink=2
        /c2 chr 0644 1,3 inode=1 nlink=2
        /p fifo 0644 inode=2 nlink=2
        /p2 fifo 0644 inode=2 nlink=2
        "#,
    ),
    (
        "hardlink target through a symlinked parent",
        &[
            r#"dir real; file real/f "x"; sym d -> real"#,
            "hard h => d/f",
        ],
        r#"
        / dir 0755
        /d sym 0777 -> real
        /h file 0644 "x" inode=1 nlink=2
        /real dir 0755
        /real/f file 0644 "x" inode=1 nlink=2
        "#,
    ),
    (
        "a whiteout in the same layer spares the layer's hardlink but not the lower name",
        &[r#"file f "x""#, "hard h => f; wh f; wh h"],
        r#"
        / dir 0755
        /h file 0644 "x"
        "#,
    ),
    // Paths through symlinks.
    (
        "an entry through an absolute symlink lands in its target, inside the image",
        &[
            "dir etc; file etc/hosts; sym x/a -> /etc",
            r#"file x/a/passwd "root""#,
        ],
        r#"
        / dir 0755
        /etc dir 0755
        /etc/hosts file 0644 ""
        /etc/passwd file 0644 "root"
        /x dir 0755
        /x/a sym 0777 -> /etc
        "#,
    ),
    (
        "a relative symlink cannot climb above the root",
        &["dir x; sym x/a -> ../../../etc", "file x/a/passwd"],
        r#"
        / dir 0755
        /etc dir 0755
        /etc/passwd file 0644 ""
        /x dir 0755
        /x/a sym 0777 -> ../../../etc
        "#,
    ),
    (
        "chained symlinks and a dangling target whose directories get created",
        &[
            "dir x/y; sym l1 -> l2; sym l2 -> x/y; sym dangling -> /no/where",
            "file l1/f; file dangling/g",
        ],
        r#"
        / dir 0755
        /dangling sym 0777 -> /no/where
        /l1 sym 0777 -> l2
        /l2 sym 0777 -> x/y
        /no dir 0755
        /no/where dir 0755
        /no/where/g file 0644 ""
        /x dir 0755
        /x/y dir 0755
        /x/y/f file 0644 ""
        "#,
    ),
    (
        "a symlink to a directory in the middle of a path",
        &[
            "dir usr/lib; sym lib -> usr/lib",
            "dir lib/mod; file lib/mod/x",
        ],
        r#"
        / dir 0755
        /lib sym 0777 -> usr/lib
        /usr dir 0755
        /usr/lib dir 0755
        /usr/lib/mod dir 0755
        /usr/lib/mod/x file 0644 ""
        "#,
    ),
];

#[test]
fn merge_cases() {
    let mut failures = String::new();
    for (name, layers, expected) in CASES {
        let expected = dedent(expected);
        match run(layers) {
            Ok(got) if got == expected => {}
            Ok(got) => failures += &format!("\n## {name}\n-- expected\n{expected}-- got\n{got}"),
            Err(e) => failures += &format!("\n## {name}\n-- expected\n{expected}-- error: {e}\n"),
        }
    }
    assert!(failures.is_empty(), "{failures}");
}

/// (name, layers, expected error message)
const ERRORS: &[(&str, &[&str], &str)] = &[
    (
        "hardlink to a missing target",
        &["file f", "hard h => nope"],
        "layer 1: hardlink /h points to /nope, which does not exist (malformed layer: rebuild the image)",
    ),
    (
        "hardlink to a directory",
        &["dir d", "hard x/h => d"],
        "layer 1: hardlink /x/h points to directory /d (malformed layer: rebuild the image)",
    ),
    (
        "hardlink to the root",
        &["hard h => ./"],
        "layer 0: hardlink /h points to directory /./ (malformed layer: rebuild the image)",
    ),
    (
        "hardlink to itself: the name is removed before it is linked",
        &["file f", "hard f => f"],
        "layer 1: hardlink /f points to /f, which does not exist (malformed layer: rebuild the image)",
    ),
    (
        "hardlink to a name whited out earlier in the layer",
        &["file f", "wh f; hard h => f"],
        "layer 1: hardlink /h points to /f, which does not exist (malformed layer: rebuild the image)",
    ),
    (
        "hardlink before its target in the layer",
        &["hard h => f; file f"],
        "layer 0: hardlink /h points to /f, which does not exist (malformed layer: rebuild the image)",
    ),
    (
        "hardlink target under a file",
        &["file f", "hard h => f/x"],
        "layer 1: hardlink /h points to /f/x, which does not exist (malformed layer: rebuild the image)",
    ),
    (
        "a file as a parent",
        &["dir a; file a/f", "file a/f/x"],
        "layer 1: cannot create /a/f/x: /a/f is not a directory (malformed layer: rebuild the image)",
    ),
    (
        "a symlink to a file as a parent",
        &["file target; sym s -> target", "file s/x/y"],
        "layer 1: cannot create /s/x/y: /target is not a directory (malformed layer: rebuild the image)",
    ),
    (
        "a symlink loop",
        &["sym a -> b; sym b -> a", "file a/x"],
        "layer 1: more than 40 symlinks while resolving /a for /a/x (symlink loop: rebuild the image)",
    ),
    (
        "a symlink loop in a whiteout's parent",
        &["sym a -> a", "wh a/x"],
        "layer 1: more than 40 symlinks while resolving /a for /a/.wh.x (symlink loop: rebuild the image)",
    ),
    (
        "the root cannot become a file",
        &["file a", "file /"],
        "layer 1: entry / would turn the root directory into a file (malformed layer: rebuild the image)",
    ),
    (
        "a whiteout with an empty name",
        &["dir a", "file a/.wh."],
        "layer 1: whiteout /a/.wh. names no file (malformed layer: rebuild the image)",
    ),
    (
        "a whiteout for ..",
        &["dir a", "file a/.wh..."],
        "layer 1: whiteout /a/.wh... names no file (malformed layer: rebuild the image)",
    ),
    (
        "a symlink with an empty target",
        &[r#"sym s -> """#],
        "layer 0: link /s has no target (malformed layer index: re-index the layer)",
    ),
    (
        "non-UTF-8 bytes are escaped in messages",
        &[r#"file caf\xc3\xa9\xff"#, r#"file caf\xc3\xa9\xff/x"#],
        "layer 1: cannot create /caf\u{e9}\\xff/x: /caf\u{e9}\\xff is not a directory (malformed layer: rebuild the image)",
    ),
];

#[test]
fn merge_errors() {
    let mut failures = String::new();
    for (name, layers, expected) in ERRORS {
        match run(layers) {
            Err(e) if e.to_string() == *expected => {}
            Err(e) => failures += &format!("\n## {name}\n-- expected\n{expected}\n-- got\n{e}\n"),
            Ok(tree) => {
                failures += &format!("\n## {name}\n-- expected\n{expected}\n-- merged\n{tree}")
            }
        }
    }
    assert!(failures.is_empty(), "{failures}");
}

#[test]
fn link_entries_without_a_target_are_errors() {
    for kind in [EntryKind::Symlink, EntryKind::Hardlink] {
        let layers = [LayerIndex::of(vec![Entry::new("l", kind, 0o777)])];
        let err = merge(&layers).unwrap_err();
        assert!(
            matches!(&err, MergeError::MissingLinkTarget { layer: 0, path } if path == b"l"),
            "{kind:?}: {err}"
        );
    }
}

#[test]
fn file_contents_point_at_their_layer() {
    let layers = [
        LayerIndex::of(vec![file_entry("f", 4, 7), file_entry("g", 0, 0)]),
        LayerIndex::of(vec![file_entry("g", 9, 2)]),
    ];
    let tree = merge(&layers).unwrap();
    let content = |path: &[u8]| {
        tree.get(tree.resolve(path).unwrap())
            .unwrap()
            .content
            .clone()
    };
    assert_eq!(
        content(b"f"),
        Content::File {
            size: 4,
            layer: 0,
            data: Some(crate::layer::index::DataRef { id: 7 })
        }
    );
    assert_eq!(
        content(b"g"),
        Content::File {
            size: 9,
            layer: 1,
            data: Some(crate::layer::index::DataRef { id: 2 })
        }
    );
}

fn file_entry(path: &str, size: u64, id: u32) -> Entry {
    let mut e = Entry::new(path, EntryKind::File, 0o644);
    e.size = size;
    e.data = (size > 0).then_some(crate::layer::index::DataRef { id });
    e
}

/// Merge generated layers, check the invariants and how long it took.
fn timed_merge(layers: &[LayerIndex], limit: Duration) -> Tree {
    let start = Instant::now();
    let tree = merge(layers).unwrap();
    let took = start.elapsed();
    eprintln!(
        "merged {} entries in {took:?}",
        layers.iter().map(|l| l.entries.len()).sum::<usize>()
    );
    tree.check_invariants().unwrap();
    // Generous: the merge takes milliseconds; quadratic work on these sizes takes minutes.
    assert!(took < limit, "merge took {took:?}, more than {limit:?}");
    tree
}

#[test]
fn twenty_thousand_entries_in_one_directory() {
    const N: usize = 20_000;
    let entry = |path: String, kind| Entry::new(path, kind, 0o644);
    let mut lower = vec![entry("big".into(), EntryKind::Dir)];
    lower.extend((0..N).map(|i| entry(format!("big/old{i:05}"), EntryKind::File)));
    // The layer's new children and hardlinks first, then the opaque whiteout: an
    // implementation that rescans or shifts the directory per entry is quadratic here.
    let mut upper: Vec<Entry> = (0..N)
        .map(|i| entry(format!("big/new{i:05}"), EntryKind::File))
        .collect();
    upper.extend((0..N).map(|i| {
        let mut e = entry(format!("big/new{i:05}-link"), EntryKind::Hardlink);
        e.link = Some(format!("big/new{i:05}").into_bytes());
        e
    }));
    upper.push(entry("big/.wh..wh..opq".into(), EntryKind::File));
    let top = (0..N)
        .step_by(2)
        .map(|i| entry(format!("big/.wh.new{i:05}"), EntryKind::File))
        .collect();
    let (lower, upper, top) = (
        LayerIndex::of(lower),
        LayerIndex::of(upper),
        LayerIndex::of(top),
    );
    let tree = timed_merge(&[lower, upper, top], Duration::from_secs(5));
    let big = tree.resolve(b"big").unwrap();
    let inode = tree.get(big).unwrap();
    assert!(
        matches!(inode.content, Content::Dir { .. }),
        "big is not a directory"
    );
    let children = tree.children(inode);
    // Odd-numbered new files (with nlink 2) and all the links remain.
    assert_eq!(children.len(), N / 2 + N);
    let kept = tree.lookup(big, b"new00001").unwrap();
    assert_eq!(tree.get(kept).unwrap().nlink, 2);
    let orphan = tree.lookup(big, b"new00000-link").unwrap();
    assert_eq!(tree.get(orphan).unwrap().nlink, 1);
    assert!(tree.lookup(big, b"old00000").is_none());
}

#[test]
fn a_hundred_thousand_entries() {
    // 500 directories of 200 files, then a layer replacing every other directory's files
    // and whiting out a tenth of the directories.
    let mut base = Vec::new();
    for d in 0..500 {
        base.push(Entry::new(format!("usr/d{d:03}"), EntryKind::Dir, 0o755));
        for f in 0..200 {
            base.push(Entry::new(
                format!("usr/d{d:03}/f{f:03}"),
                EntryKind::File,
                0o644,
            ));
        }
    }
    let mut upper = Vec::new();
    for d in (0..500).step_by(2) {
        for f in 0..200 {
            upper.push(Entry::new(
                format!("usr/d{d:03}/f{f:03}"),
                EntryKind::File,
                0o600,
            ));
        }
    }
    // Odd directories only: the even ones were touched by this layer, so their whiteouts
    // would (correctly) spare them.
    for d in (5..500).step_by(10) {
        upper.push(Entry::new(format!("usr/.wh.d{d:03}"), EntryKind::File, 0));
    }
    let layers = [LayerIndex::of(base), LayerIndex::of(upper)];
    assert!(layers.iter().map(|l| l.entries.len()).sum::<usize>() > 100_000);
    let tree = timed_merge(&layers, Duration::from_secs(15));
    // Root, usr, 450 directories of 200 files.
    assert_eq!(tree.inodes.len(), 2 + 450 * 201);
    assert_eq!(
        tree.get(tree.resolve(b"usr/d002/f007").unwrap())
            .unwrap()
            .meta
            .mode,
        0o600
    );
    assert_eq!(
        tree.get(tree.resolve(b"usr/d001/f007").unwrap())
            .unwrap()
            .meta
            .mode,
        0o644
    );
}

#[test]
fn deep_trees_do_not_recurse() {
    let deep = vec!["d"; 5_000].join("/");
    let layers = [
        LayerIndex::of(vec![Entry::new(
            format!("{deep}/f"),
            EntryKind::File,
            0o644,
        )]),
        LayerIndex::of(vec![
            Entry::new(format!("{deep}/g"), EntryKind::File, 0o644),
            Entry::new(".wh..wh..opq", EntryKind::File, 0),
        ]),
    ];
    let tree = merge(&layers).unwrap();
    tree.check_invariants().unwrap();
    assert_eq!(tree.inodes.len(), 5_002);
    assert!(tree.resolve(format!("{deep}/g").as_bytes()).is_some());
    assert!(tree.resolve(format!("{deep}/f").as_bytes()).is_none());
}

#[test]
fn symlink_hops_are_limited_to_forty() {
    // A chain of `hops` symlinks, l1 -> l2 -> ... -> d, then an entry through l1.
    let chain = |hops: usize| {
        let links: Vec<String> = (1..=hops)
            .map(|i| match i {
                i if i == hops => format!("sym l{i} -> d"),
                i => format!("sym l{i} -> l{}", i + 1),
            })
            .collect();
        run(&[&format!("dir d; {}", links.join("; ")), "file l1/f"])
    };
    let through = chain(40).unwrap();
    assert!(through.contains("\n/d/f file"), "{through}");
    let err = chain(41).unwrap_err();
    assert!(
        matches!(err, MergeError::SymlinkLoop { layer: 1, .. }),
        "{err}"
    );
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// A short path over a tiny alphabet, so entries collide, nest and replace each other.
/// Directories use `a`..`c`; leaves mostly `f`..`h`, so that few stacks end in a file used
/// as a parent.
fn gen_path(rng: &mut Rng, leaf: bool) -> String {
    let depth = rng.below(3);
    let mut comps: Vec<&str> = (0..depth).map(|_| rng.pick(&["a", "b", "c"])).collect();
    if leaf && !rng.chance(6) {
        comps.push(rng.pick(&["f", "g", "h"]));
    } else {
        comps.push(rng.pick(&["a", "b", "c"]));
    }
    if rng.chance(25) {
        let at = rng.below(comps.len());
        comps.insert(at, rng.pick(&["..", "."]));
    }
    comps.join("/")
}

fn gen_opts(rng: &mut Rng) -> String {
    let mut s = String::new();
    if rng.chance(4) {
        s += &format!(" {}", rng.pick(&["0700", "4755", "1777", "0640"]));
    }
    if rng.chance(5) {
        s += " uid=1 gid=2";
    }
    if rng.chance(6) {
        s += &format!(" mtime={}", rng.below(100));
    }
    if rng.chance(6) {
        s += rng.pick(&[r#" xattr:user.k="v""#, r#" xattr:user.e="""#]);
    }
    s
}

/// `linkable`: (layer, path) of the non-directories generated so far, for hardlink targets
/// likely to exist (mostly the same layer's, which its whiteouts cannot remove).
fn gen_layer(rng: &mut Rng, layer: usize, linkable: &mut Vec<(usize, String)>) -> String {
    let mut items = Vec::new();
    for i in 0..1 + rng.below(10) {
        let opts = gen_opts(rng);
        let item = match rng.below(100) {
            0..=21 => format!("dir {}{opts}", gen_path(rng, false)),
            22..=43 => {
                let path = gen_path(rng, true);
                linkable.push((layer, path.clone()));
                format!(r#"file {path} "L{layer}E{i}"{opts}"#)
            }
            44..=52 => {
                let target = match rng.below(5) {
                    0 => format!("/{}", gen_path(rng, false)),
                    1 => format!("../{}", gen_path(rng, false)),
                    2 => rng.pick(&[".", "..", "/"]).to_owned(),
                    _ => {
                        let leaf = rng.chance(6);
                        gen_path(rng, leaf)
                    }
                };
                let path = {
                    let leaf = rng.chance(2);
                    gen_path(rng, leaf)
                };
                linkable.push((layer, path.clone()));
                format!("sym {path} -> {target}{opts}")
            }
            53..=61 => {
                let same: Vec<&String> = linkable
                    .iter()
                    .filter(|(l, _)| *l == layer)
                    .map(|(_, p)| p)
                    .collect();
                let target = if !same.is_empty() && !rng.chance(3) {
                    same[rng.below(same.len())].clone()
                } else if !linkable.is_empty() && !rng.chance(10) {
                    linkable[rng.below(linkable.len())].1.clone()
                } else if rng.chance(3) {
                    gen_path(rng, true)
                } else {
                    continue;
                };
                format!("hard {} => {target}", gen_path(rng, true))
            }
            62..=77 => {
                let path = {
                    let leaf = rng.chance(2);
                    gen_path(rng, leaf)
                };
                format!("wh {}", path.replace("../", "").replace("./", ""))
            }
            78..=87 => match rng.chance(6) {
                true => "opq /".to_owned(),
                false => format!("opq {}", gen_path(rng, false)),
            },
            88..=94 => {
                let path = gen_path(rng, true);
                linkable.push((layer, path.clone()));
                match rng.chance(2) {
                    true => format!("chr {path} 1,{}{opts}", rng.below(4)),
                    false => format!("fifo {path}{opts}"),
                }
            }
            95..=96 => format!("dir /{opts}"),
            _ => format!(
                "{} {}/.wh.{}",
                rng.pick(&["file", "dir", "fifo"]),
                gen_path(rng, false),
                rng.pick(&["a", "f"])
            ),
        };
        items.push(item);
    }
    items.join("; ")
}

fn error_class(e: &MergeError) -> model::ModelError {
    match e {
        MergeError::NotADirectory { layer, path, .. } => ("not-a-directory", *layer, path.clone()),
        MergeError::SymlinkLoop { layer, path, .. } => ("symlink-loop", *layer, path.clone()),
        MergeError::HardlinkTargetMissing { layer, path, .. } => {
            ("hardlink-missing", *layer, path.clone())
        }
        MergeError::HardlinkToDirectory { layer, path, .. } => {
            ("hardlink-to-dir", *layer, path.clone())
        }
        MergeError::MissingLinkTarget { layer, path } => ("missing-link", *layer, path.clone()),
        MergeError::RootNotDirectory { layer, path, .. } => ("root-not-dir", *layer, path.clone()),
        MergeError::InvalidWhiteout { layer, path } => ("invalid-whiteout", *layer, path.clone()),
        MergeError::TooLarge { .. } => ("too-large", 0, Vec::new()),
    }
}

/// `merge` agrees with the naive model on pseudo-random stacks: the same listing (paths,
/// types, metadata, contents, hardlink groups, nlink) or the same error at the same entry.
#[test]
fn merge_matches_the_naive_model() {
    const STACKS: usize = 1000;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut merged = 0;
    let mut hardlinked = 0;
    let mut errors: std::collections::BTreeMap<&str, usize> = Default::default();
    for n in 0..STACKS {
        let mut linkable = Vec::new();
        let texts: Vec<String> = (0..1 + rng.below(4))
            .map(|layer| gen_layer(&mut rng, layer, &mut linkable))
            .collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let fx = parse(&texts);
        let got = merge(&fx.layers).map_err(|e| error_class(&e)).map(|tree| {
            if let Err(broken) = tree.check_invariants() {
                panic!("stack {n} {texts:#?}: invariant broken: {broken}");
            }
            format(listing(&tree), &fx)
        });
        let want = model::merge(&fx.layers).map(|items| format(items, &fx));
        assert_eq!(got, want, "stack {n}: {texts:#?}");
        match &got {
            Ok(listing) => {
                merged += 1;
                hardlinked += usize::from(listing.contains(" inode="));
            }
            Err((class, ..)) => *errors.entry(*class).or_default() += 1,
        }
    }
    // Keep the generator honest: most stacks must merge, and some must share inodes.
    assert!(
        merged > STACKS / 2,
        "only {merged} of {STACKS} stacks merged"
    );
    assert!(
        hardlinked > STACKS / 20,
        "only {hardlinked} stacks had hardlinks"
    );
}
