//! Platforms (`linux/arm64/v8`) and how a requested platform matches the entries of an
//! image index: names normalized as Docker does (`x86_64` → `amd64`, `aarch64` → `arm64`),
//! `arm64` defaulting to variant `v8`, `arm` to `v7`, and the variant of `amd64` ignored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An OS/architecture/variant triple: the one platform type of the workspace (build
/// targets, builder announcements, index entries). Serialized as in an OCI index entry
/// (`architecture`, `os`, then `variant` when there is one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Platform {
    /// GOARCH spelling: `amd64`, `arm64`, `arm`, `386`, `ppc64le`, `s390x`, `riscv64`.
    pub architecture: String,
    /// `linux`, `windows`, ...
    pub os: String,
    /// `v8`, `v7`, ... when it matters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// A string that is not `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {0:?}: expected os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8")]
pub struct PlatformError(pub String);

impl Platform {
    /// A platform from its parts, as given.
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

    /// Parse `os/arch[/variant]` (as `--platform` takes it), normalizing names the way
    /// BuildKit does: lowercase, `x86_64` → `amd64`, `aarch64` → `arm64`, `armhf` →
    /// `arm/v7`, `armel` → `arm/v6`, and the default variant filled in (`arm64` → `v8`,
    /// `arm` → `v7`). A variant given for another architecture is kept (`linux/amd64/v3`).
    pub fn parse(s: &str) -> Result<Platform, PlatformError> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| ok(p)) {
            return Err(PlatformError(s.to_string()));
        }
        let os = parts[0].to_ascii_lowercase();
        let (architecture, mut variant) = match parts[1].to_ascii_lowercase().as_str() {
            "x86_64" | "x86-64" | "amd64" => ("amd64".to_string(), None),
            "aarch64" | "arm64" => ("arm64".to_string(), Some("v8".to_string())),
            "armhf" | "arm" => ("arm".to_string(), Some("v7".to_string())),
            "armel" => ("arm".to_string(), Some("v6".to_string())),
            "i386" | "i686" | "386" => ("386".to_string(), None),
            other => (other.to_string(), None),
        };
        if let Some(v) = parts.get(2) {
            variant = Some(v.to_ascii_lowercase());
        }
        Ok(Platform { os, architecture, variant })
    }

    /// The form used to compare platforms: [`Platform::parse`]'s normalization applied to
    /// the parts (index entries need not be normalized), with `arm`'s `5`/`6`/`7` spelled
    /// `v5`/`v6`/`v7`, `arm64`'s `8` spelled `v8`, and the variant of `amd64`/`386` dropped.
    pub fn normalize(&self) -> Platform {
        let mut p = Platform::parse(&format!("{}/{}", self.os, self.architecture))
            .unwrap_or_else(|_| Platform::new(&self.os.to_ascii_lowercase(), &self.architecture.to_ascii_lowercase(), None));
        if let Some(v) = self.variant.as_deref().map(str::to_ascii_lowercase).filter(|v| !v.is_empty()) {
            p.variant = Some(if v.bytes().all(|b| b.is_ascii_digit()) { format!("v{v}") } else { v });
        }
        if matches!(p.architecture.as_str(), "amd64" | "386") {
            p.variant = None;
        }
        p
    }

    /// Whether an image (or builder) for `candidate` serves this requested platform: the
    /// one matching rule of the workspace. Compares normalized forms, so `linux/arm64`
    /// matches `linux/arm64/v8` and the variant of `amd64` does not matter.
    pub fn matches(&self, candidate: &Platform) -> bool {
        self.normalize() == candidate.normalize()
    }

    /// The TARGETVARIANT / BUILDVARIANT value: empty for `arm64/v8`, as BuildKit does.
    pub fn variant_arg(&self) -> String {
        match (&*self.architecture, self.variant.as_deref()) {
            ("arm64", Some("v8")) => String::new(),
            (_, v) => v.unwrap_or("").to_string(),
        }
    }

    /// The form written into image indexes and configs: `arm64`'s default `v8` left out,
    /// as containerd normalizes it.
    pub fn canonical(&self) -> Platform {
        Platform { variant: Some(self.variant_arg()).filter(|v| !v.is_empty()), ..self.clone() }
    }
}

/// `linux/amd64`, `linux/arm/v7`; `arm64`'s default `v8` is not printed.
impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        let v = self.variant_arg();
        if !v.is_empty() {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// [`Platform::parse`].
impl FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::parse(s)
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
        for s in ["linux/amd64", "linux/arm64", "windows/amd64", "linux/arm/v6", "linux/amd64/v3"] {
            assert_eq!(p(s).to_string(), s);
        }
        assert_eq!(p("linux/arm64/v8").to_string(), "linux/arm64");
        assert_eq!(p("linux/arm64").variant.as_deref(), Some("v8"));
        assert_eq!(p("linux/arm64").canonical().variant, None);
        assert_eq!(p("linux/arm64").variant_arg(), "");
        assert_eq!(p("linux/arm/v6").variant_arg(), "v6");
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
        assert!(p("linux/arm/v7").matches(&Platform::new("linux", "arm", Some("7"))));
        assert!(p("linux/arm64").matches(&Platform::new("linux", "arm64", None)));
        assert_eq!(p("linux/aarch64").normalize(), p("linux/arm64/v8"));
    }

    #[test]
    fn host_platform_is_linux_and_normalized() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        assert_eq!(h.normalize(), h);
    }
}
