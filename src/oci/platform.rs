//! Platforms (`os/architecture[/variant]`) and how one is matched against the entries of an
//! image index. Names follow Go's GOOS/GOARCH, as the image-spec asks (image-index.md,
//! "platform"); matching follows containerd's `platforms` package: both sides are normalised
//! first, then compared exactly. Knows nothing of manifests or JSON documents beyond the
//! three fields it reads.

use std::fmt;
use std::str::FromStr;

/// A platform as written in an image index entry or on the command line.
///
/// Fields keep what was written; [`Platform::normalized`] gives the canonical form used for
/// matching, so `linux/aarch64` matches an index entry `linux/arm64/v8`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    // Index entries may also carry `os.version` / `os.features`; they only matter for
    // Windows images, which imagefs does not mount, so they are not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    #[error(
        "invalid platform {input:?}: expected OS/ARCH or OS/ARCH/VARIANT, e.g. linux/amd64 or \
         linux/arm/v7"
    )]
    Malformed { input: String },
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// The platform this program runs on, in Go's names (Rust's `std::env::consts::ARCH`
    /// differs: `x86_64` is Go's `amd64`, `aarch64` its `arm64`, ...). The OS is always
    /// `linux`: imagefs mounts Linux images through Linux FUSE.
    pub fn host() -> Platform {
        host_platform(std::env::consts::ARCH, cfg!(target_endian = "little"))
    }

    /// The canonical form, as containerd's `platforms.Normalize` computes it, except that
    /// arm64 gets the explicit variant `v8` (containerd drops it; both make `arm64` and
    /// `arm64/v8` equal, which is what matters).
    pub fn normalized(&self) -> Platform {
        let os = self.os.to_ascii_lowercase();
        let os = match os.as_str() {
            "macos" => "darwin".to_owned(),
            _ => os,
        };
        let arch = self.architecture.to_ascii_lowercase();
        let variant = self.variant.as_deref().map(str::to_ascii_lowercase);
        let variant = variant.as_deref().filter(|v| !v.is_empty());
        let (architecture, variant): (&str, Option<String>) = match arch.as_str() {
            "aarch64" | "arm64" => match variant {
                None | Some("8" | "v8" | "v8.0") => ("arm64", Some("v8".to_owned())),
                Some(v) => ("arm64", Some(v.to_owned())),
            },
            "armhf" => ("arm", Some("v7".to_owned())),
            "armel" => ("arm", Some("v6".to_owned())),
            "arm" => match variant {
                None | Some("7") => ("arm", Some("v7".to_owned())),
                Some(v @ ("5" | "6" | "8")) => ("arm", Some(format!("v{v}"))),
                Some(v) => ("arm", Some(v.to_owned())),
            },
            "x86_64" | "x86-64" | "amd64" => match variant {
                None | Some("v1") => ("amd64", None),
                Some(v) => ("amd64", Some(v.to_owned())),
            },
            "i386" | "i686" | "x86" | "386" => ("386", None),
            other => (other, variant.map(str::to_owned)),
        };
        Platform {
            os,
            architecture: architecture.to_owned(),
            variant,
        }
    }

    /// Whether an index entry for `other` can serve a request for `self`: equal once both
    /// are normalised. A requested variant must match exactly (`arm/v7` does not take an
    /// `arm/v6` entry), while an absent variant means the default one (`arm64` is `arm64/v8`,
    /// `arm` is `arm/v7`).
    pub fn matches(&self, other: &Platform) -> bool {
        self.normalized() == other.normalized()
    }
}

fn host_platform(rust_arch: &str, little_endian: bool) -> Platform {
    let (architecture, variant) = match rust_arch {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        "powerpc64" if little_endian => ("ppc64le", None),
        "powerpc64" => ("ppc64", None),
        "mips64" if little_endian => ("mips64le", None),
        "mips" if little_endian => ("mipsle", None),
        "loongarch64" => ("loong64", None),
        // s390x, riscv64, mips, mips64 and the rest share their names with Go.
        other => (other, None),
    };
    Platform::new("linux", architecture, variant)
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let malformed = || PlatformError::Malformed {
            input: input.to_owned(),
        };
        let parts: Vec<&str> = input.split('/').collect();
        let valid = |part: &&str| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(valid) {
            return Err(malformed());
        }
        Ok(Platform::new(parts[0], parts[1], parts.get(2).copied()))
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(variant) if !variant.is_empty() => write!(f, "/{variant}"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_display() {
        let cases = [
            ("linux/amd64", "linux", "amd64", None),
            ("linux/arm64/v8", "linux", "arm64", Some("v8")),
            ("linux/arm/v7", "linux", "arm", Some("v7")),
            ("windows/amd64", "windows", "amd64", None),
            ("linux/x86_64", "linux", "x86_64", None),
        ];
        for (input, os, arch, variant) in cases {
            let got = p(input);
            assert_eq!(got, Platform::new(os, arch, variant), "{input}");
            assert_eq!(got.to_string(), input);
        }
    }

    #[test]
    fn rejects_malformed() {
        for input in [
            "",
            "linux",
            "linux/",
            "/amd64",
            "linux/arm/v7/x",
            "linux//v7",
            "linux/am d64",
        ] {
            let err = input.parse::<Platform>().unwrap_err().to_string();
            assert!(err.contains(&format!("{input:?}")), "{input:?}: {err}");
            assert!(err.contains("OS/ARCH"), "{input:?}: {err}");
        }
    }

    #[test]
    fn normalisation() {
        let cases = [
            ("linux/aarch64", "linux/arm64/v8"),
            ("linux/arm64", "linux/arm64/v8"),
            ("linux/arm64/8", "linux/arm64/v8"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/x86-64", "linux/amd64"),
            ("linux/amd64/v1", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/6", "linux/arm/v6"),
            ("linux/i386", "linux/386"),
            ("Linux/AMD64", "linux/amd64"),
            ("macos/arm64", "darwin/arm64/v8"),
            ("linux/s390x", "linux/s390x"),
        ];
        for (input, want) in cases {
            assert_eq!(p(input).normalized().to_string(), want, "{input}");
        }
    }

    #[test]
    fn matching() {
        let cases = [
            ("linux/amd64", "linux/amd64", true),
            ("linux/x86_64", "linux/amd64", true),
            ("linux/arm64", "linux/arm64/v8", true),
            ("linux/arm64/v8", "linux/arm64", true),
            ("linux/aarch64", "linux/arm64/v8", true),
            ("linux/arm/v7", "linux/arm", true),
            ("linux/armhf", "linux/arm/v7", true),
            ("linux/arm/v7", "linux/arm/v6", false),
            ("linux/arm/v6", "linux/arm", false),
            ("linux/arm", "linux/arm/v6", false),
            ("linux/amd64", "linux/arm64", false),
            ("linux/amd64", "windows/amd64", false),
            ("linux/amd64", "linux/amd64/v3", false),
            ("linux/arm64/v9", "linux/arm64", false),
        ];
        for (want, entry, expected) in cases {
            assert_eq!(p(want).matches(&p(entry)), expected, "{want} vs {entry}");
        }
    }

    #[test]
    fn host_names_are_go_names() {
        let cases = [
            ("x86_64", true, "linux/amd64"),
            ("aarch64", true, "linux/arm64/v8"),
            ("arm", true, "linux/arm/v7"),
            ("x86", true, "linux/386"),
            ("powerpc64", true, "linux/ppc64le"),
            ("powerpc64", false, "linux/ppc64"),
            ("s390x", false, "linux/s390x"),
            ("riscv64", true, "linux/riscv64"),
        ];
        for (rust_arch, little_endian, want) in cases {
            assert_eq!(
                host_platform(rust_arch, little_endian).to_string(),
                want,
                "{rust_arch}"
            );
        }
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        assert!(host.matches(&host.normalized()));
    }

    #[test]
    fn serde_field_names() {
        let json = r#"{"architecture":"arm","os":"linux","variant":"v7","os.version":"x"}"#;
        let got: Platform = serde_json::from_str(json).unwrap();
        assert_eq!(got, p("linux/arm/v7"));
        let json = r#"{"architecture":"amd64","os":"linux"}"#;
        let got: Platform = serde_json::from_str(json).unwrap();
        assert_eq!(got, p("linux/amd64"));
        assert_eq!(
            serde_json::to_string(&got).unwrap(),
            r#"{"os":"linux","architecture":"amd64"}"#
        );
    }
}
