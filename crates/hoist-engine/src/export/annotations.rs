//! OCI annotations of exported images (`--annotation`), as buildx takes them:
//! `[TYPE[,TYPE...]:]KEY=VALUE`, where each TYPE is `manifest` (the default: the image
//! manifest), `manifest-descriptor` (the manifest's entry in the index), `index` (the index)
//! or `index-descriptor` (the index's entry in an OCI layout's `index.json`), and `manifest`
//! and `manifest-descriptor` may name one platform: `manifest[linux/arm64]:KEY=VALUE`.
//!
//! The strings come from the client: they are checked here, on the builder, for size and
//! for control characters before anything is written with them.

use std::collections::BTreeMap;

use crate::graph::Platform;

/// Most annotations one build takes.
pub const MAX_ANNOTATIONS: usize = 128;
/// Most bytes of one annotation key.
pub const MAX_KEY_BYTES: usize = 256;
/// Most bytes of one annotation value.
pub const MAX_VALUE_BYTES: usize = 8 << 10;

/// An `--annotation` the builder refuses.
#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    /// Not `[TYPE:]KEY=VALUE`.
    #[error("--annotation {input:?}: {reason}")]
    Syntax {
        /// The flag's value (cut to a readable length).
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// More annotations than a build takes.
    #[error("--annotation: {0} annotations given, at most {MAX_ANNOTATIONS} are taken")]
    TooMany(usize),
    /// A platform-specific annotation for a platform the build did not make.
    #[error("--annotation {input:?}: the build made no image for {platform} (it built {built})")]
    NoPlatform {
        /// The flag's value.
        input: String,
        /// The platform it names.
        platform: String,
        /// The platforms the build made, comma-separated.
        built: String,
    },
}

/// Where an annotation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The image manifest.
    Manifest,
    /// The image manifest's descriptor in the index.
    ManifestDescriptor,
    /// The index.
    Index,
    /// The index's descriptor (in an OCI layout's `index.json`).
    IndexDescriptor,
}

impl Level {
    fn parse(s: &str) -> Option<Level> {
        Some(match s {
            "manifest" => Level::Manifest,
            "manifest-descriptor" => Level::ManifestDescriptor,
            "index" => Level::Index,
            "index-descriptor" => Level::IndexDescriptor,
            _ => return None,
        })
    }
}

/// One annotation, at one level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotation {
    /// Where it goes.
    pub level: Level,
    /// Only the manifest (or its descriptor) of this platform; all when `None`.
    pub platform: Option<Platform>,
    /// The key (`org.opencontainers.image.title`).
    pub key: String,
    /// The value.
    pub value: String,
    /// The flag it came from (for messages).
    input: String,
}

/// The annotations of a build's images, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Annotations(Vec<Annotation>);

fn shown(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_string();
    }
    let mut cut = 80;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &s[..cut])
}

impl Annotations {
    /// Parse and check `--annotation` values.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Annotations, AnnotationError> {
        let items: Vec<&str> = items.iter().map(AsRef::as_ref).filter(|s| !s.is_empty()).collect();
        if items.len() > MAX_ANNOTATIONS {
            return Err(AnnotationError::TooMany(items.len()));
        }
        let mut out = Vec::new();
        for item in items {
            let bad = |reason: String| AnnotationError::Syntax { input: shown(item), reason };
            let (k, value) = item.split_once('=').ok_or_else(|| bad("expected [TYPE:]KEY=VALUE".into()))?;
            let (types, key) = match k.split_once(':') {
                Some((types, key)) => (Some(types), key),
                None => (None, k),
            };
            if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad("the key must be non-empty, without spaces or control characters".into()));
            }
            if key.len() > MAX_KEY_BYTES {
                return Err(bad(format!("the key is longer than {MAX_KEY_BYTES} bytes")));
            }
            if value.len() > MAX_VALUE_BYTES {
                return Err(bad(format!("the value is longer than {MAX_VALUE_BYTES} bytes")));
            }
            if value.chars().any(char::is_control) {
                return Err(bad("the value has a control character".into()));
            }
            let Some(types) = types else {
                out.push(Annotation { level: Level::Manifest, platform: None, key: key.into(), value: value.into(), input: shown(item) });
                continue;
            };
            for t in types.split(',') {
                let (name, platform) = match t.split_once('[') {
                    Some((name, rest)) => {
                        let p = rest.strip_suffix(']').ok_or_else(|| bad(format!("type {t:?}: expected TYPE[os/arch]")))?;
                        (name, Some(Platform::parse(p).map_err(|e| bad(e.to_string()))?))
                    }
                    None => (t, None),
                };
                let level = Level::parse(name).ok_or_else(|| {
                    bad(format!("unknown annotation type {name:?} (expected manifest, manifest-descriptor, index or index-descriptor)"))
                })?;
                if platform.is_some() && matches!(level, Level::Index | Level::IndexDescriptor) {
                    return Err(bad(format!("type {name} takes no platform: an index is shared by all platforms")));
                }
                out.push(Annotation { level, platform, key: key.into(), value: value.into(), input: shown(item) });
            }
        }
        Ok(Annotations(out))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The annotations of `level` for `platform`'s image (for the index levels, `None`); a
    /// later annotation of a key wins. `None` when there are none.
    pub fn at(&self, level: Level, platform: Option<&Platform>) -> Option<BTreeMap<String, String>> {
        let map: BTreeMap<String, String> = self
            .0
            .iter()
            .filter(|a| a.level == level && a.platform.as_ref().is_none_or(|p| platform.is_some_and(|q| p.matches(q))))
            .map(|a| (a.key.clone(), a.value.clone()))
            .collect();
        (!map.is_empty()).then_some(map)
    }

    /// Whether an annotation needs an index to live in (any but those of the manifest).
    pub fn need_index(&self) -> bool {
        self.0.iter().any(|a| a.level != Level::Manifest)
    }

    /// Fails when an annotation names a platform the build did not make.
    pub fn check_platforms(&self, built: &[Platform]) -> Result<(), AnnotationError> {
        for a in &self.0 {
            if let Some(p) = a.platform.as_ref().filter(|p| !built.iter().any(|b| p.matches(b))) {
                let built = built.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                return Err(AnnotationError::NoPlatform { input: a.input.clone(), platform: p.to_string(), built });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn types_and_platforms_place_each_annotation() {
        let a = Annotations::parse(&[
            "org.opencontainers.image.title=App",
            "index:org.opencontainers.image.vendor=Acme",
            "manifest[linux/arm64]:arch=arm",
            "manifest-descriptor,index-descriptor:both=yes",
            "url=https://example.com/a=b",
        ])
        .unwrap();
        let (amd, arm) = (p("linux/amd64"), p("linux/arm64"));
        assert_eq!(
            a.at(Level::Manifest, Some(&amd)),
            map(&[("org.opencontainers.image.title", "App"), ("url", "https://example.com/a=b")])
        );
        assert_eq!(
            a.at(Level::Manifest, Some(&arm)),
            map(&[("arch", "arm"), ("org.opencontainers.image.title", "App"), ("url", "https://example.com/a=b")])
        );
        assert_eq!(a.at(Level::Index, None), map(&[("org.opencontainers.image.vendor", "Acme")]));
        assert_eq!(a.at(Level::ManifestDescriptor, Some(&amd)), map(&[("both", "yes")]));
        assert_eq!(a.at(Level::IndexDescriptor, None), map(&[("both", "yes")]));
        assert!(a.need_index());
        assert!(!Annotations::parse(&["a=1", "manifest:b=2"]).unwrap().need_index(), "manifest annotations need no index");
        assert_eq!(Annotations::parse(&["a=1", "a=2"]).unwrap().at(Level::Manifest, None), map(&[("a", "2")]), "the last one wins");
        assert!(Annotations::parse::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn a_platform_the_build_did_not_make_is_named() {
        let a = Annotations::parse(&["manifest[linux/s390x]:k=v"]).unwrap();
        let e = a.check_platforms(&[p("linux/amd64"), p("linux/arm64")]).unwrap_err().to_string();
        assert!(e.contains("linux/s390x") && e.contains("linux/amd64, linux/arm64"), "{e}");
        assert!(Annotations::parse(&["manifest[linux/arm64/v8]:k=v"]).unwrap().check_platforms(&[p("linux/arm64")]).is_ok());
    }

    #[test]
    fn hostile_or_malformed_annotations_are_refused_with_the_flag() {
        let err = |s: &str| Annotations::parse(&[s]).unwrap_err().to_string();
        assert!(err("novalue").contains("expected [TYPE:]KEY=VALUE"));
        assert!(err("layer:k=v").contains("unknown annotation type \"layer\""), "{}", err("layer:k=v"));
        assert!(err("index[linux/amd64]:k=v").contains("takes no platform"));
        assert!(err("manifest[linux]:k=v").contains("--annotation \"manifest[linux]:k=v\""));
        assert!(err("manifest[linux/amd64:k=v").contains("expected TYPE[os/arch]"));
        assert!(err("=v").contains("key must be non-empty"));
        assert!(err("a key=v").contains("without spaces"));
        assert!(err("k=line\nbreak").contains("control character"));
        assert!(err("k=\u{1b}[31m").contains("control character"));
        assert!(err(&format!("{}=v", "k".repeat(MAX_KEY_BYTES + 1))).contains("key is longer"));
        let long = err(&format!("k={}", "v".repeat(MAX_VALUE_BYTES + 1)));
        assert!(long.contains("value is longer") && long.len() < 300, "the message quotes a cut value: {long}");
        let many: Vec<String> = (0..=MAX_ANNOTATIONS).map(|i| format!("k{i}=v")).collect();
        assert!(matches!(Annotations::parse(&many), Err(AnnotationError::TooMany(n)) if n == MAX_ANNOTATIONS + 1));
    }
}
