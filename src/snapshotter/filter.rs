//! containerd's filter syntax, as `List` (a Walk) receives it: the request's strings are
//! alternatives (OR); each is `,`-separated selectors that must all hold (AND); a selector is
//! a field path (`name`, `parent`, `kind`, `labels.<key>`, a component `"quoted"` when it has
//! dots or other punctuation) alone (present and not empty) or followed by `==` or `!=` and a
//! value (bare up to the next `,`, or `"quoted"` with `\"` and `\\` escapes).
//!
//! containerd itself sends `labels."containerd.io/snapshot.ref"==<chain id>,parent=="<key>"`
//! to find the snapshot a remote `Prepare` made. The regular-expression operator `~=` is
//! refused with a clear error rather than approximated.

use super::meta::{Kind, Record};

#[derive(Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
}

#[derive(Debug, PartialEq, Eq)]
struct Selector {
    path: Vec<String>,
    op: Option<(Op, String)>,
}

/// Parsed filters: any alternative whose selectors all hold matches. No alternatives: all.
#[derive(Debug, Default)]
pub struct Filter(Vec<Vec<Selector>>);

impl Filter {
    pub fn parse(filters: &[String]) -> Result<Filter, String> {
        filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| parse_one(f).map_err(|e| format!("filter {f:?}: {e}")))
            .collect::<Result<_, _>>()
            .map(Filter)
    }

    pub fn matches(&self, key: &str, r: &Record) -> bool {
        self.0.is_empty() || self.0.iter().any(|all| all.iter().all(|s| s.holds(key, r)))
    }
}

impl Selector {
    fn holds(&self, key: &str, r: &Record) -> bool {
        let kind = match r.kind {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        };
        let value: Option<&str> = match self.path.iter().map(String::as_str).collect::<Vec<_>>()[..]
        {
            ["name"] => Some(key),
            ["parent"] => Some(&r.parent),
            ["kind"] => Some(kind),
            ["labels", ref label @ ..] if !label.is_empty() => {
                r.labels.get(&label.join(".")).map(String::as_str)
            }
            _ => None,
        };
        let same = |a: &str, b: &str| match self.path[0].as_str() {
            "kind" => a.eq_ignore_ascii_case(b),
            _ => a == b,
        };
        match (&self.op, value) {
            (None, v) => v.is_some_and(|v| !v.is_empty()),
            (Some((Op::Eq, want)), v) => v.is_some_and(|v| same(v, want)),
            (Some((Op::Ne, want)), v) => !v.is_some_and(|v| same(v, want)),
        }
    }
}

fn parse_one(s: &str) -> Result<Vec<Selector>, String> {
    let mut p = Parser {
        s: s.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        p.skip_spaces();
        out.push(p.selector()?);
        p.skip_spaces();
        match p.peek() {
            None => return Ok(out),
            Some(b',') => p.i += 1,
            Some(c) => return Err(format!("unexpected {:?} at {}", c as char, p.i)),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
            self.i += 1;
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let mut path = vec![self.field()?];
        while self.peek() == Some(b'.') {
            self.i += 1;
            path.push(self.field()?);
        }
        self.skip_spaces();
        let op = match (self.peek(), self.s.get(self.i + 1)) {
            (Some(b'='), Some(b'=')) => Op::Eq,
            (Some(b'!'), Some(b'=')) => Op::Ne,
            (Some(b'~'), Some(b'=')) => {
                return Err("the regular-expression operator ~= is not supported".into());
            }
            _ => return Ok(Selector { path, op: None }),
        };
        self.i += 2;
        self.skip_spaces();
        let value = if self.peek() == Some(b'"') {
            self.quoted()?
        } else {
            let start = self.i;
            while self.peek().is_some_and(|c| c != b',') {
                self.i += 1;
            }
            String::from_utf8_lossy(&self.s[start..self.i])
                .trim_end()
                .to_owned()
        };
        Ok(Selector {
            path,
            op: Some((op, value)),
        })
    }

    fn field(&mut self) -> Result<String, String> {
        if self.peek() == Some(b'"') {
            return self.quoted();
        }
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            self.i += 1;
        }
        if start == self.i {
            return Err(format!("expected a field name at {start}"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn quoted(&mut self) -> Result<String, String> {
        let start = self.i;
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(format!("unterminated quote at {start}")),
                Some(b'"') => {
                    self.i += 1;
                    return String::from_utf8(out).map_err(|_| "not UTF-8".into());
                }
                Some(b'\\') => {
                    let c = *self.s.get(self.i + 1).ok_or("dangling \\")?;
                    out.push(match c {
                        b'n' => b'\n',
                        b't' => b'\t',
                        c => c,
                    });
                    self.i += 2;
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn rec(kind: Kind, parent: &str, labels: &[(&str, &str)]) -> Record {
        Record {
            id: 1,
            kind,
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created_ns: 0,
            updated_ns: 0,
            remote: None,
        }
    }

    fn matches(filters: &[&str], key: &str, r: &Record) -> bool {
        let f: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filter::parse(&f).unwrap().matches(key, r)
    }

    #[test]
    fn containerds_remote_lookup_filter() {
        let r = rec(
            Kind::Committed,
            "default/3/sha256:aa",
            &[("containerd.io/snapshot.ref", "sha256:bb")],
        );
        let f = r#"labels."containerd.io/snapshot.ref"==sha256:bb,parent=="default/3/sha256:aa""#;
        assert!(matches(&[f], "sha256:bb", &r));
        let other_parent = rec(Kind::Committed, "default/4/x", &r.labels_vec());
        assert!(!matches(&[f], "sha256:bb", &other_parent));
        let f2 = r#"labels."containerd.io/snapshot.ref"==sha256:cc,parent=="default/3/sha256:aa""#;
        assert!(!matches(&[f2], "sha256:bb", &r));
    }

    #[test]
    fn alternatives_presence_negation_and_kind() {
        let r = rec(Kind::Active, "", &[("a.b", "1"), ("empty", "")]);
        assert!(matches(&[], "k", &r));
        assert!(matches(&["name==k"], "k", &r));
        assert!(matches(&["name==x", "kind==active"], "k", &r));
        assert!(matches(&["kind==Active"], "k", &r));
        assert!(!matches(&["name==x", "kind==view"], "k", &r));
        assert!(matches(&[r#"labels."a.b""#], "k", &r));
        assert!(!matches(&["labels.empty"], "k", &r));
        assert!(!matches(&["parent"], "k", &r));
        assert!(matches(&["name!=x , kind != committed"], "k", &r));
        assert!(!matches(&["labels.missing==1"], "k", &r));
        assert!(matches(&["labels.missing!=1"], "k", &r));
    }

    #[test]
    fn bad_filters_are_errors() {
        for f in [r#"labels."x"#, "name~=a.*", "=x", "name==a,,"] {
            let err = Filter::parse(&[f.to_string()]).unwrap_err();
            assert!(err.starts_with(&format!("filter {f:?}: ")), "{err}");
        }
    }

    impl Record {
        fn labels_vec(&self) -> Vec<(&str, &str)> {
            self.labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect()
        }
    }
}
