//! Platforms (`linux/arm64/v8`) and how a requested platform matches the entries of an
//! image index: names normalized as Docker does (`x86_64` → `amd64`, `aarch64` → `arm64`),
//! `arm64` defaulting to variant `v8`, `arm` to `v7`, and the variant of `amd64` ignored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An OS/architecture/variant triple. hoist-engine has its own `Platform` and converts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Platform {
    /// `linux`, `windows`, ...
    pub os: String,
    /// GOARCH spelling: `amd64`, `arm64`, `arm`, `386`, `ppc64le`, `s390x`, `riscv64`.
    pub architecture: String,
    /// `v8`, `v7`, ... when it matters.
    pub variant: Option<String>,
}

/// A string that is not `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {0:?}: expected os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8")]
pub struct PlatformError(pub String);

impl Platform {
    /// A platform from its parts.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform { os: os.to_string(), architecture: architecture.to_string(), variant: variant.map(str::to_string) }
    }

    /// The platform of the machine this runs on (Linux with the compiled-in architecture).
    pub fn host() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            "riscv64" => ("riscv64", None),
            "s390x" => ("s390x", None),
            other => (other, None),
        };
        Platform::new("linux", arch, variant)
    }

    /// The normalized form: lowercase, GOARCH names, default variants filled in
    /// (`arm64` → `v8`, `arm` → `v7`) and the variant of `amd64`/`386` dropped.
    pub fn normalize(&self) -> Platform {
        let os = self.os.to_ascii_lowercase();
        let arch = self.architecture.to_ascii_lowercase();
        let variant = self.variant.as_deref().map(str::to_ascii_lowercase).filter(|v| !v.is_empty());
        let (architecture, variant) = match arch.as_str() {
            "x86_64" | "x86-64" | "amd64" => ("amd64".to_string(), None),
            "i386" | "i686" | "386" => ("386".to_string(), None),
            "aarch64" | "arm64" => {
                let v = match variant.as_deref() {
                    None | Some("8") | Some("v8") => "v8".to_string(),
                    Some(v) => v.to_string(),
                };
                ("arm64".to_string(), Some(v))
            }
            "armhf" => ("arm".to_string(), Some("v7".to_string())),
            "armel" => ("arm".to_string(), Some("v6".to_string())),
            "arm" => {
                let v = match variant.as_deref() {
                    None | Some("7") | Some("v7") => "v7".to_string(),
                    Some("6") => "v6".to_string(),
                    Some("5") => "v5".to_string(),
                    Some(v) => v.to_string(),
                };
                ("arm".to_string(), Some(v))
            }
            _ => (arch, variant),
        };
        Platform { os, architecture, variant }
    }

    /// Whether an index entry for `candidate` serves this (requested) platform.
    pub fn matches(&self, candidate: &Platform) -> bool {
        self.normalize() == candidate.normalize()
    }
}

/// `os/arch` or `os/arch/variant`.
impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform::new(os, arch, Some(variant))),
            _ => Err(PlatformError(s.to_string())),
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
    fn parse_and_display_roundtrip() {
        for s in ["linux/amd64", "linux/arm64/v8", "windows/amd64", "linux/arm/v6"] {
            assert_eq!(p(s).to_string(), s);
        }
        for bad in ["", "linux", "linux/", "/amd64", "linux/arm64/v8/x", "linux/a b"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn arm64_defaults_to_v8_and_amd64_ignores_variant() {
        assert!(p("linux/arm64").matches(&p("linux/arm64/v8")));
        assert!(p("linux/arm64/v8").matches(&p("linux/arm64")));
        assert!(!p("linux/arm64").matches(&p("linux/arm64/v9")));
        assert!(p("linux/amd64").matches(&p("linux/amd64/v3")));
        assert!(p("linux/amd64/v2").matches(&p("linux/amd64")));
        assert!(p("linux/arm").matches(&p("linux/arm/v7")));
        assert!(!p("linux/arm/v6").matches(&p("linux/arm/v7")));
        assert!(!p("linux/amd64").matches(&p("windows/amd64")));
        assert!(!p("linux/amd64").matches(&p("linux/arm64")));
    }

    #[test]
    fn aliases_normalize_to_goarch_names() {
        assert!(p("linux/x86_64").matches(&p("linux/amd64")));
        assert!(p("Linux/AARCH64").matches(&p("linux/arm64/v8")));
        assert!(p("linux/armhf").matches(&p("linux/arm/v7")));
        assert_eq!(p("linux/aarch64").normalize(), p("linux/arm64/v8"));
    }

    #[test]
    fn host_platform_is_linux_and_normalized() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        assert_eq!(h.normalize(), h);
    }
}
