//! Test notation for layer stacks and merged trees, so each overlay rule is one readable
//! case: `render(&merge(&fx.layers)?, &fx) == expected`. Test-only; knows nothing of tar.
//!
//! A layer is one string of items separated by `;` or newlines:
//!
//! ```text
//! dir  PATH [MODE] [OPTS]                 directory (default mode 0755)
//! file PATH [MODE] ["CONTENT"] [OPTS]     regular file (0644); no content = empty file
//! sym  PATH -> TARGET [MODE] [OPTS]       symlink (0777), TARGET verbatim
//! hard PATH => TARGET [MODE] [OPTS]       hardlink to the path TARGET
//! chr  PATH MAJOR,MINOR [MODE] [OPTS]     character device (0644)
//! blk  PATH MAJOR,MINOR [MODE] [OPTS]     block device (0644)
//! fifo PATH [MODE] [OPTS]                 fifo (0644)
//! wh   PATH                               whiteout entry DIRNAME/.wh.BASENAME
//! opq  DIR                                opaque whiteout entry DIR/.wh..wh..opq
//! ```
//!
//! PATH is relative (`a/b`); `/` alone is the root (the tar's `./`, empty path). MODE is
//! octal with its leading zero or setuid digit (`0755`, `4755`). OPTS: `uid=N`, `gid=N`,
//! `mtime=SEC[.NANOS]`, `xattr:NAME=VALUE`. Quoted strings (`"..."`) and bare tokens accept
//! `\xNN`, `\n`, `\\`, `\"`, so names need not be UTF-8. Whiteouts are just names, so
//! `dir a/.wh.x` writes a whiteout entry of another type.
//!
//! A merged tree renders as one line per path, in depth-first name order:
//!
//! ```text
//! PATH TYPE MODE [uid=N] [gid=N] [mtime=S[.NNNNNNNNN]] [xattr:NAME="VALUE"]... [DETAIL] [inode=G nlink=N]
//! ```
//!
//! PATH is `/`-rooted; TYPE is `dir`, `file`, `sym`, `chr`, `blk` or `fifo`; DETAIL is the
//! file's content (looked up in the fixture through the file's layer and data id), `->
//! TARGET`, or `MAJOR,MINOR`. Non-directories with several names or `nlink != 1` show
//! `inode=G nlink=N`, G numbering hardlink groups in order of first appearance.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::tree::{Content, Meta, ROOT, Tree};
use crate::layer::index::{DataRef, Entry, EntryKind, LayerIndex, Timespec, Xattr};

/// Layers parsed from the notation, with the file contents their `DataRef`s point at.
pub(crate) struct Fixture {
    pub layers: Vec<LayerIndex>,
    /// `contents[layer][data.id]`.
    pub contents: Vec<Vec<Vec<u8>>>,
}

/// Parse one string per layer, base first. Panics on bad notation (test input).
pub(crate) fn parse(layers: &[&str]) -> Fixture {
    let mut fx = Fixture {
        layers: Vec::new(),
        contents: Vec::new(),
    };
    for text in layers {
        let mut index = LayerIndex::default();
        let mut contents = Vec::new();
        for item in items(text) {
            index.entries.push(parse_item(&item, &mut contents));
        }
        fx.layers.push(index);
        fx.contents.push(contents);
    }
    fx
}

fn parse_item(tokens: &[String], contents: &mut Vec<Vec<u8>>) -> Entry {
    let fail = |why: &str| -> ! { panic!("bad notation item {tokens:?}: {why}") };
    let (kind_word, path) = match tokens {
        [k, p, ..] => (k.as_str(), path_of(p)),
        _ => fail("expected KIND PATH"),
    };
    let mut rest = &tokens[2..];
    let (kind, mode) = match kind_word {
        "dir" => (EntryKind::Dir, 0o755),
        "file" => (EntryKind::File, 0o644),
        "sym" => (EntryKind::Symlink, 0o777),
        "hard" => (EntryKind::Hardlink, 0o644),
        "chr" => (EntryKind::CharDev, 0o644),
        "blk" => (EntryKind::BlockDev, 0o644),
        "fifo" => (EntryKind::Fifo, 0o644),
        "wh" | "opq" => {
            if !rest.is_empty() {
                fail("whiteouts take a path only");
            }
            let (dir, base) = match path.iter().rposition(|&b| b == b'/') {
                Some(i) => (&path[..=i], &path[i + 1..]),
                None => (&path[..0], &path[..]),
            };
            let mut p = if kind_word == "wh" {
                dir.to_vec()
            } else if path.is_empty() {
                Vec::new()
            } else {
                [&path[..], b"/"].concat()
            };
            p.extend_from_slice(b".wh.");
            p.extend_from_slice(if kind_word == "wh" { base } else { b".wh..opq" });
            return Entry::new(p, EntryKind::File, 0o644);
        }
        _ => fail("unknown kind"),
    };
    let mut e = Entry::new(path, kind, mode);
    match kind {
        EntryKind::Symlink | EntryKind::Hardlink => {
            let arrow = if kind == EntryKind::Symlink {
                "->"
            } else {
                "=>"
            };
            match rest {
                [a, t, more @ ..] if a == arrow => {
                    e.link = Some(unquote(t));
                    rest = more;
                }
                _ => fail("expected an arrow and a target"),
            }
        }
        EntryKind::CharDev | EntryKind::BlockDev => match rest {
            [dev, more @ ..] => {
                let (maj, min) = dev.split_once(',').unwrap_or_else(|| fail("MAJOR,MINOR"));
                e.rdev = (
                    maj.parse().unwrap_or_else(|_| fail("major")),
                    min.parse().unwrap_or_else(|_| fail("minor")),
                );
                rest = more;
            }
            _ => fail("expected MAJOR,MINOR"),
        },
        _ => {}
    }
    for tok in rest {
        if !tok.is_empty() && tok.bytes().all(|b| b.is_ascii_digit()) {
            e.mode = u32::from_str_radix(tok, 8).unwrap_or_else(|_| fail("octal mode"));
        } else if tok.starts_with('"') && kind == EntryKind::File {
            let content = unquote(tok);
            e.size = content.len() as u64;
            if !content.is_empty() {
                e.data = Some(DataRef {
                    id: contents.len() as u32,
                });
                contents.push(content);
            }
        } else if let Some(v) = tok.strip_prefix("uid=") {
            e.uid = v.parse().unwrap_or_else(|_| fail("uid"));
        } else if let Some(v) = tok.strip_prefix("gid=") {
            e.gid = v.parse().unwrap_or_else(|_| fail("gid"));
        } else if let Some(v) = tok.strip_prefix("mtime=") {
            let (sec, nsec) = v.split_once('.').unwrap_or((v, "0"));
            e.mtime = Timespec {
                sec: sec.parse().unwrap_or_else(|_| fail("mtime")),
                nsec: format!("{nsec:0<9}")
                    .parse()
                    .unwrap_or_else(|_| fail("mtime nanoseconds")),
            };
        } else if let Some(v) = tok.strip_prefix("xattr:") {
            let (name, value) = v
                .split_once('=')
                .unwrap_or_else(|| fail("xattr:NAME=VALUE"));
            e.xattrs.push(Xattr {
                name: unquote(name),
                value: unquote(value),
            });
        } else {
            fail(&format!("unexpected token {tok}"));
        }
    }
    e
}

fn path_of(tok: &str) -> Vec<u8> {
    if tok == "/" { Vec::new() } else { unquote(tok) }
}

/// Split a layer's text into items of tokens; quotes protect spaces and separators.
fn items(text: &str) -> Vec<Vec<String>> {
    let mut items = Vec::new();
    let mut tokens = Vec::new();
    let mut tok = String::new();
    let mut quoted = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                tok.push(c);
                tok.extend(chars.next());
            }
            '"' => {
                quoted = !quoted;
                tok.push(c);
            }
            c if quoted => tok.push(c),
            ';' | '\n' | ' ' | '\t' => {
                if !tok.is_empty() {
                    tokens.push(std::mem::take(&mut tok));
                }
                if (c == ';' || c == '\n') && !tokens.is_empty() {
                    items.push(std::mem::take(&mut tokens));
                }
            }
            c => tok.push(c),
        }
    }
    assert!(!quoted, "unterminated quote in {text:?}");
    if !tok.is_empty() {
        tokens.push(tok);
    }
    if !tokens.is_empty() {
        items.push(tokens);
    }
    items
}

/// Drop surrounding quotes and decode escapes.
fn unquote(tok: &str) -> Vec<u8> {
    let tok = tok
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(tok);
    let bytes = tok.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1)) {
            (b'\\', Some(b'x')) => {
                let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).expect("\\xNN");
                out.push(u8::from_str_radix(hex, 16).expect("\\xNN"));
                i += 4;
            }
            (b'\\', Some(b'n')) => {
                out.push(b'\n');
                i += 2;
            }
            (b'\\', Some(&c)) => {
                out.push(c);
                i += 2;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// One name of a merged tree, in a form both [`Tree`] and the reference model produce.
pub(crate) struct Item {
    /// Relative path, empty for the root.
    pub path: Vec<u8>,
    pub meta: Meta,
    /// `Content::Dir` children are not used.
    pub content: Content,
    /// Ignored for directories.
    pub nlink: u32,
    /// Identity of the inode: names with equal `ino` are hardlinks of each other.
    pub ino: u64,
}

/// Every name of `tree`, depth first in name order.
pub(crate) fn listing(tree: &Tree) -> Vec<Item> {
    let mut out = Vec::new();
    let mut stack = vec![(Vec::new(), ROOT)];
    while let Some((path, id)) = stack.pop() {
        let inode = &tree.inodes[id as usize];
        for entry in tree.children(inode).iter().rev() {
            let (name, child) = (tree.name(entry), &entry.ino);
            {
                let p = if path.is_empty() {
                    name.to_vec()
                } else {
                    [&path[..], b"/", name].concat()
                };
                stack.push((p, *child));
            }
        }
        out.push(Item {
            path,
            meta: inode.meta.clone(),
            content: inode.content.clone(),
            nlink: inode.nlink,
            ino: u64::from(id),
        });
    }
    out
}

pub(crate) fn render(tree: &Tree, fx: &Fixture) -> String {
    format(listing(tree), fx)
}

/// Render items (sorted here by path components, i.e. depth-first name order).
pub(crate) fn format(mut items: Vec<Item>, fx: &Fixture) -> String {
    items.sort_by(|a, b| {
        a.path
            .split(|&c| c == b'/')
            .cmp(b.path.split(|&c| c == b'/'))
    });
    let mut names: HashMap<u64, u32> = HashMap::new();
    for it in &items {
        if !matches!(it.content, Content::Dir { .. }) {
            *names.entry(it.ino).or_default() += 1;
        }
    }
    let mut groups: HashMap<u64, usize> = HashMap::new();
    let mut out = String::new();
    for it in &items {
        out.push('/');
        out.push_str(&escape(&it.path));
        let m = &it.meta;
        let kind = match &it.content {
            Content::Dir { .. } => "dir",
            Content::File { .. } => "file",
            Content::Symlink { .. } => "sym",
            Content::CharDev { .. } => "chr",
            Content::BlockDev { .. } => "blk",
            Content::Fifo => "fifo",
        };
        write!(out, " {kind} {:04o}", m.mode).unwrap();
        if m.uid != 0 {
            write!(out, " uid={}", m.uid).unwrap();
        }
        if m.gid != 0 {
            write!(out, " gid={}", m.gid).unwrap();
        }
        if m.mtime != Timespec::default() {
            write!(out, " mtime={}", m.mtime.sec).unwrap();
            if m.mtime.nsec != 0 {
                write!(out, ".{:09}", m.mtime.nsec).unwrap();
            }
        }
        for x in &m.xattrs {
            write!(out, " xattr:{}=\"{}\"", escape(&x.name), escape(&x.value)).unwrap();
        }
        match &it.content {
            Content::File { size, layer, data } => {
                let content = match data {
                    None => Some(&[][..]),
                    Some(d) => fx
                        .contents
                        .get(*layer as usize)
                        .and_then(|c| c.get(d.id as usize))
                        .map(Vec::as_slice),
                };
                match content {
                    Some(c) if c.len() as u64 == *size => {
                        write!(out, " \"{}\"", escape(c)).unwrap()
                    }
                    _ => write!(out, " size={size} layer={layer} data={data:?}").unwrap(),
                }
            }
            Content::Symlink { target } => write!(out, " -> {}", escape(target)).unwrap(),
            Content::CharDev { rdev } | Content::BlockDev { rdev } => {
                write!(out, " {},{}", rdev.0, rdev.1).unwrap()
            }
            Content::Dir { .. } | Content::Fifo => {}
        }
        if !matches!(it.content, Content::Dir { .. }) && (it.nlink != 1 || names[&it.ino] > 1) {
            let next = groups.len() + 1;
            let g = *groups.entry(it.ino).or_insert(next);
            write!(out, " inode={g} nlink={}", it.nlink).unwrap();
        }
        out.push('\n');
    }
    out
}

/// Printable ASCII as is (but `\` and `"`), everything else `\xNN`: round-trips through
/// [`unquote`].
fn escape(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            0x20..=0x7e => s.push(b as char),
            _ => write!(s, "\\x{b:02x}").unwrap(),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_become_entries() {
        let fx = parse(&[
            r#"file a/b 4755 "hi" uid=1 gid=2 mtime=3.5 xattr:user.x="" ; wh a/b"#,
            r#"opq /; opq a; hard \xff => a/b; chr "sp ace" 4,5; sym s -> "../t;x""#,
        ]);
        let mut file = Entry::new("a/b", EntryKind::File, 0o4755);
        (file.uid, file.gid, file.size) = (1, 2, 2);
        file.mtime = Timespec {
            sec: 3,
            nsec: 500_000_000,
        };
        file.xattrs.push(Xattr {
            name: b"user.x".to_vec(),
            value: Vec::new(),
        });
        file.data = Some(DataRef { id: 0 });
        let mut hard = Entry::new(b"\xff".to_vec(), EntryKind::Hardlink, 0o644);
        hard.link = Some(b"a/b".to_vec());
        let mut chr = Entry::new("sp ace", EntryKind::CharDev, 0o644);
        chr.rdev = (4, 5);
        let mut sym = Entry::new("s", EntryKind::Symlink, 0o777);
        sym.link = Some(b"../t;x".to_vec());
        let whiteout = |p: &str| Entry::new(p, EntryKind::File, 0o644);
        assert_eq!(fx.layers[0].entries, [file, whiteout("a/.wh.b")]);
        assert_eq!(
            fx.layers[1].entries,
            [
                whiteout(".wh..wh..opq"),
                whiteout("a/.wh..wh..opq"),
                hard,
                chr,
                sym
            ]
        );
        assert_eq!(fx.contents, [vec![b"hi".to_vec()], vec![]]);
    }
}
