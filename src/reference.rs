//! Image references (`busybox`, `ghcr.io/o/app:1.2`, `[::1]:5000/a/b@sha256:…`): parse,
//! validate and normalise them the way Docker does. Pure string handling: this module knows
//! nothing of registries beyond Docker Hub's two host names.
//!
//! The grammar, from distribution/reference `reference.go` / `regexp.go`:
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [domain '/'] path-component ['/' path-component]*
//! domain           := host [':' port-number]
//! host             := domain-name | '[' IPv6address ']'
//! domain-name      := domain-component ['.' domain-component]*
//! domain-component := /([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])/
//! port-number      := /[0-9]+/
//! path-component   := alpha-numeric [separator alpha-numeric]*
//! alpha-numeric    := /[a-z0-9]+/
//! separator        := /[_.]|__|[-]+/
//! tag              := /[\w][\w.-]{0,127}/
//! ```
//!
//! The total name (domain included) is at most 255 characters. Normalisation follows
//! `normalize.go`: the first component is a domain only if it contains `.` or `:` or is
//! `localhost`; otherwise the name lives on `docker.io`, where single-component names get the
//! `library/` prefix; `index.docker.io` is an old spelling of `docker.io`; no tag and no
//! digest means `:latest`.

use std::fmt;
use std::str::FromStr;

use crate::oci::Digest;

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
/// The host that actually serves Docker Hub's distribution API.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
const NAME_MAX: usize = 255;
const TAG_MAX: usize = 128;

/// A normalised image reference: registry, repository, and a tag and/or a digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid reference {input:?}: the image name is empty")]
    Empty { input: String },
    #[error(
        "invalid reference {input:?}: references have no URL scheme, write \
         registry.example.com/repo:tag"
    )]
    Scheme { input: String },
    #[error("invalid reference {input:?}: repository name must be lowercase")]
    Uppercase { input: String },
    #[error(
        "invalid reference {input:?}: repository name cannot be 64 hexadecimal characters \
         (that is an image ID, not a name)"
    )]
    LooksLikeId { input: String },
    #[error(
        "invalid reference {input:?}: invalid repository path component {component:?} \
         (lowercase letters and digits, separated by '.', '_', '__' or dashes)"
    )]
    PathComponent { input: String, component: String },
    #[error("invalid reference {input:?}: invalid registry {registry:?} (expected HOST[:PORT])")]
    Registry { input: String, registry: String },
    #[error(
        "invalid reference {input:?}: name is {len} characters long, the maximum is {NAME_MAX}"
    )]
    NameTooLong { input: String, len: usize },
    #[error(
        "invalid reference {input:?}: invalid tag {tag:?} (up to {TAG_MAX} letters, digits, \
         '_', '.' or '-', not starting with '.' or '-')"
    )]
    Tag { input: String, tag: String },
    // The digest error already quotes the digest and says what is expected.
    #[error("invalid reference {input:?}: {reason}")]
    Digest { input: String, reason: String },
}

impl Reference {
    /// The registry as written (normalised for Docker Hub), port included: `docker.io`,
    /// `localhost:5000`, `[::1]:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path, `library/` included for official Docker Hub images.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag; `latest` when the reference had neither tag nor digest.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The host (and port) to talk to: Docker Hub's API lives on `registry-1.docker.io`,
    /// every other registry on its own name.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to put after `/v2/<repository>/manifests/`: the digest when there is one (a
    /// digest pins the content, a tag can move), else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            // Parsing never builds a reference with neither; be total anyway.
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }

    /// The same name pinned to `digest`; the tag, if any, is kept for display.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    /// `[registry/]path[:tag][@digest]`, normalised the way Docker does.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let owned = || input.to_owned();
        if input.is_empty() {
            return Err(ReferenceError::Empty { input: owned() });
        }
        if input.contains("://") {
            return Err(ReferenceError::Scheme { input: owned() });
        }
        let (rest, digest) = split_digest(input)?;
        let (name, tag) = split_tag(input, rest)?;
        if name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ReferenceError::LooksLikeId { input: owned() });
        }
        let (registry, repository) = split_name(input, name)?;
        let len = registry.len() + 1 + repository.len();
        if len > NAME_MAX {
            return Err(ReferenceError::NameTooLong {
                input: owned(),
                len,
            });
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_owned()),
        };
        Ok(Reference {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }
}

/// `rest@digest` → (`rest`, the parsed digest).
fn split_digest(input: &str) -> Result<(&str, Option<Digest>), ReferenceError> {
    let Some((rest, digest)) = input.split_once('@') else {
        return Ok((input, None));
    };
    let digest = digest
        .parse::<Digest>()
        .map_err(|e| ReferenceError::Digest {
            input: input.to_owned(),
            reason: e.to_string(),
        })?;
    Ok((rest, Some(digest)))
}

/// `name:tag` → (`name`, the checked tag). The tag separator is a `:` after the last `/`; an
/// earlier `:` belongs to a port.
fn split_tag<'a>(input: &str, rest: &'a str) -> Result<(&'a str, Option<&'a str>), ReferenceError> {
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].find(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if name.is_empty() {
        return Err(ReferenceError::Empty {
            input: input.to_owned(),
        });
    }
    if let Some(tag) = tag
        && !valid_tag(tag)
    {
        return Err(ReferenceError::Tag {
            input: input.to_owned(),
            tag: tag.to_owned(),
        });
    }
    Ok((name, tag))
}

/// `name` → (registry, repository), checked and normalised: the first component is a
/// registry only if it has a `.` or `:` or is `localhost`; Docker Hub's single-component
/// names live under `library/`.
fn split_name<'a>(input: &str, name: &'a str) -> Result<(&'a str, String), ReferenceError> {
    let owned = || input.to_owned();
    let (registry, path) = match name.split_once('/') {
        Some((first, path))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first, path)
        }
        _ => (DOCKER_HUB, name),
    };
    let registry = if registry == DOCKER_HUB_LEGACY {
        DOCKER_HUB
    } else {
        registry
    };
    if !valid_registry(registry) {
        return Err(ReferenceError::Registry {
            input: owned(),
            registry: registry.to_owned(),
        });
    }
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ReferenceError::Uppercase { input: owned() });
    }
    if let Some(component) = path.split('/').find(|c| !valid_path_component(c)) {
        return Err(ReferenceError::PathComponent {
            input: owned(),
            component: component.to_owned(),
        });
    }
    let repository = if registry == DOCKER_HUB && !path.contains('/') {
        format!("{OFFICIAL_PREFIX}{path}")
    } else {
        path.to_owned()
    };
    Ok((registry, repository))
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    // Between two alphanumeric runs: exactly one of ".", "_", "__", or any number of "-".
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`, where `\w` is `[A-Za-z0-9_]`.
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= TAG_MAX
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

/// `host [':' port]`, host a domain name or a bracketed IPv6 address.
fn valid_registry(registry: &str) -> bool {
    let (host_ok, port) = if let Some(after_bracket) = registry.strip_prefix('[') {
        let Some((address, rest)) = after_bracket.split_once(']') else {
            return false;
        };
        let address_ok =
            !address.is_empty() && address.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        let port = match rest {
            "" => None,
            _ => match rest.strip_prefix(':') {
                Some(port) => Some(port),
                None => return false,
            },
        };
        (address_ok, port)
    } else {
        let (host, port) = match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        };
        (host.split('.').all(valid_domain_component), port)
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// `[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`
fn valid_domain_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const HEX64: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// One case per line: input, registry, repository, tag (`-`: none), Display.
    /// `<D>` stands for the digest `D`, `<HEX>` for `HEX64`, `<T128>` for a 128-char tag.
    const VALID: &str = "
        busybox                   docker.io             library/busybox     latest  docker.io/library/busybox:latest
        busybox:1.36              docker.io             library/busybox     1.36    docker.io/library/busybox:1.36
        library/busybox           docker.io             library/busybox     latest  docker.io/library/busybox:latest
        docker.io/busybox         docker.io             library/busybox     latest  docker.io/library/busybox:latest
        docker.io/library/busybox docker.io             library/busybox     latest  docker.io/library/busybox:latest
        index.docker.io/x/y       docker.io             x/y                 latest  docker.io/x/y:latest
        index.docker.io/busybox   docker.io             library/busybox     latest  docker.io/library/busybox:latest
        user/app                  docker.io             user/app            latest  docker.io/user/app:latest
        user/app/sub:v1           docker.io             user/app/sub        v1      docker.io/user/app/sub:v1
        ghcr.io/owner/app:1.2.3   ghcr.io               owner/app           1.2.3   ghcr.io/owner/app:1.2.3
        localhost/app             localhost             app                 latest  localhost/app:latest
        localhost:5000/a/b        localhost:5000        a/b                 latest  localhost:5000/a/b:latest
        127.0.0.1:5000/busybox:gz 127.0.0.1:5000        busybox             gz      127.0.0.1:5000/busybox:gz
        [::1]:5000/a/b            [::1]:5000            a/b                 latest  [::1]:5000/a/b:latest
        [fe80::1]/a               [fe80::1]             a                   latest  [fe80::1]/a:latest
        Registry.Example.COM/a    Registry.Example.COM  a                   latest  Registry.Example.COM/a:latest
        host:5000/a/b@<D>         host:5000             a/b                 -       host:5000/a/b@<D>
        busybox@<D>               docker.io             library/busybox     -       docker.io/library/busybox@<D>
        r.io/n:tag@<D>            r.io                  n                   tag     r.io/n:tag@<D>
        a/b_c/d__e/f-g/h---i/j.k  docker.io             a/b_c/d__e/f-g/h---i/j.k latest docker.io/a/b_c/d__e/f-g/h---i/j.k:latest
        a:T_a.g-9                 docker.io             library/a           T_a.g-9 docker.io/library/a:T_a.g-9
        localhost:5000            docker.io             library/localhost   5000    docker.io/library/localhost:5000
        registry-1.docker.io/x/y  registry-1.docker.io  x/y                 latest  registry-1.docker.io/x/y:latest
        <HEX>x                    docker.io             library/<HEX>x      latest  docker.io/library/<HEX>x:latest
        x/<HEX>                   docker.io             x/<HEX>             latest  docker.io/x/<HEX>:latest
        a:<T128>                  docker.io             library/a           <T128>  docker.io/library/a:<T128>
    ";

    #[test]
    fn valid_references() {
        let long_tag = "t".repeat(128);
        let expand = |s: &str| {
            s.replace("<D>", D)
                .replace("<HEX>", HEX64)
                .replace("<T128>", &long_tag)
        };
        for line in VALID.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let fields: Vec<String> = line.split_whitespace().map(expand).collect();
            let [input, registry, repository, tag, display] = &fields[..] else {
                panic!("bad table line {line:?}");
            };
            let r: Reference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry(), registry, "{input}");
            assert_eq!(r.repository(), repository, "{input}");
            assert_eq!(r.tag(), Some(tag.as_str()).filter(|t| *t != "-"), "{input}");
            assert_eq!(r.digest().is_some(), input.contains('@'), "{input}");
            assert_eq!(&r.to_string(), display, "{input}");
            // Display is a fixed point of parsing.
            let again: Reference = display.parse().unwrap_or_else(|e| panic!("{display}: {e}"));
            assert_eq!(again, r, "{input}");
        }
    }

    #[test]
    fn api_host_is_registry_1_for_docker_hub() {
        let cases = [
            ("busybox", "registry-1.docker.io"),
            ("index.docker.io/x/y", "registry-1.docker.io"),
            ("localhost:5000/a", "localhost:5000"),
            ("[::1]:5000/a", "[::1]:5000"),
            ("ghcr.io/o/a", "ghcr.io"),
        ];
        for (input, want) in cases {
            let r: Reference = input.parse().unwrap();
            assert_eq!(r.api_host(), want, "{input}");
        }
    }

    #[test]
    fn invalid_references() {
        let long_path = format!("{}/{}", "a".repeat(200), "b".repeat(50));
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "empty"),
            (":tag".into(), "empty"),
            ("Foo/bar".into(), "repository name must be lowercase"),
            ("busybox:latest@".into(), "invalid digest"),
            (
                "ghcr.io/Owner/app".into(),
                "repository name must be lowercase",
            ),
            ("BUSYBOX".into(), "repository name must be lowercase"),
            (HEX64.into(), "image ID"),
            (format!("{HEX64}:tag"), "image ID"),
            ("busybox:".into(), "invalid tag \"\""),
            ("busybox:.tag".into(), "invalid tag"),
            ("busybox:-tag".into(), "invalid tag"),
            ("busybox:ta/g".into(), "invalid registry \"busybox:ta\""),
            (format!("busybox:{}", "t".repeat(129)), "invalid tag"),
            ("busybox:a:b".into(), "invalid tag \"a:b\""),
            ("busybox@sha256:abc".into(), "invalid digest"),
            (format!("busybox@md5:{HEX64}"), "unsupported algorithm"),
            ("busybox@".into(), "invalid digest"),
            ("/busybox".into(), "invalid repository path component \"\""),
            ("busybox/".into(), "invalid repository path component \"\""),
            ("a//b".into(), "invalid repository path component \"\""),
            ("-a".into(), "invalid repository path component \"-a\""),
            ("a-".into(), "invalid repository path component"),
            ("a_.b".into(), "invalid repository path component"),
            ("a___b".into(), "invalid repository path component"),
            ("a..b".into(), "invalid repository path component"),
            ("a b".into(), "invalid repository path component"),
            ("host:port/a".into(), "invalid registry \"host:port\""),
            ("host:/a".into(), "invalid registry"),
            ("-host.io/a".into(), "invalid registry"),
            ("host-.io/a".into(), "invalid registry"),
            ("a..io/b".into(), "invalid registry"),
            ("[::1/a".into(), "invalid registry"),
            ("[]:5000/a".into(), "invalid registry"),
            ("[::1]x/a".into(), "invalid registry"),
            ("[zz::1]:5000/a".into(), "invalid registry"),
            ("https://ghcr.io/a/b".into(), "URL scheme"),
            (
                format!("registry.example.com/{long_path}"),
                "maximum is 255",
            ),
            ("r.io/".into(), "invalid repository path component \"\""),
        ];
        for (input, want) in cases {
            let err = match input.parse::<Reference>() {
                Ok(r) => panic!("{input:?} parsed as {r}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(want), "{input:?}: {err}");
            assert!(
                err.starts_with(&format!("invalid reference {input:?}: ")),
                "{input:?}: {err}"
            );
        }
    }

    #[test]
    fn manifest_reference_prefers_the_digest() {
        let cases = [
            ("busybox".to_owned(), "latest".to_owned()),
            ("busybox:1.36".to_owned(), "1.36".to_owned()),
            (format!("busybox@{D}"), D.to_owned()),
            (format!("busybox:1.36@{D}"), D.to_owned()),
        ];
        for (input, want) in cases {
            let r: Reference = input.parse().unwrap();
            assert_eq!(r.manifest_reference(), want, "{input}");
        }
    }

    #[test]
    fn with_digest_pins_the_same_name() {
        let r: Reference = "localhost:5000/a/b:v1".parse().unwrap();
        let pinned = r.with_digest(D.parse().unwrap());
        assert_eq!(pinned.to_string(), format!("localhost:5000/a/b:v1@{D}"));
        assert_eq!(pinned.manifest_reference(), D);
        assert_eq!(pinned.name(), r.name());
        assert_eq!(pinned.name(), "localhost:5000/a/b");
        assert_eq!(r.digest(), None);
    }
}
