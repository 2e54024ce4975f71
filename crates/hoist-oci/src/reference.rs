//! Image references (`busybox`, `ghcr.io/org/app:1.2`, `127.0.0.1:5000/x@sha256:...`):
//! parsing with Docker's normalization rules, validation, and the canonical and familiar
//! spellings.
//!
//! Normalization follows the Docker CLI: a name whose first path component does not look
//! like a host (no `.`, no `:`, not `localhost`, no uppercase letter) lives on Docker Hub
//! (`docker.io`), a single-component Docker Hub name gets the `library/` prefix, and a
//! reference with neither tag nor digest gets the tag `latest`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError};

/// The registry name Docker Hub references normalize to.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// The tag a reference gets when it names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A reference that cannot be parsed; the message names the reference and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    /// The reference as given.
    pub reference: String,
    /// What is wrong with it.
    pub reason: ReferenceReason,
}

/// What is wrong with a reference. Strings held are the offending part as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceReason {
    /// The reference is the empty string.
    #[error("the reference is empty")]
    Empty,
    /// Whitespace anywhere in the reference.
    #[error("a reference cannot contain whitespace")]
    Whitespace,
    /// The part after `@` is not a sha256 digest.
    #[error("{digest:?} is not a valid digest (expected sha256:<64 lowercase hex digits>)")]
    Digest {
        /// The text after `@`.
        digest: String,
        /// The digest parser's error.
        source: DigestError,
    },
    /// Nothing names the repository (`:tag`, `host/`).
    #[error("the repository name is empty")]
    EmptyRepository,
    /// The name (registry and repository) is longer than 255 characters.
    #[error("the name is longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
    /// A `[` in the registry without its `]`.
    #[error("registry {0:?} has an unclosed '['")]
    UnclosedBracket(String),
    /// The text in `[...]` is not an IPv6 address.
    #[error("registry {0:?} is not a valid IPv6 address")]
    BadIpv6(String),
    /// Something other than `:port` after `]`.
    #[error("registry {0:?} has text after ']' that is not a port")]
    TextAfterBracket(String),
    /// The port is empty, not decimal, or above 65535.
    #[error("registry {0:?} has an invalid port")]
    BadPort(String),
    /// The registry is only a port (`:5000`).
    #[error("registry {0:?} has an empty host name")]
    EmptyHost(String),
    /// A host label that is empty, has a character other than letters, digits and `-`,
    /// or starts or ends with `-`.
    #[error("registry {0:?} is not a valid host name")]
    BadHost(String),
    /// An uppercase letter in the repository path.
    #[error("the repository name must be lowercase")]
    Uppercase,
    /// `a//b` or a trailing `/`.
    #[error("the repository name has an empty path component")]
    EmptyComponent,
    /// A path component that is not `[a-z0-9]+` joined by `.`, `_`, `__` or dashes.
    #[error("path component {0:?} must be lowercase letters and digits separated by '.', '_', '__' or '-'")]
    BadComponent(String),
    /// `name:` with nothing after the colon.
    #[error("the tag is empty")]
    EmptyTag,
    /// A tag longer than 128 characters.
    #[error("the tag is longer than {MAX_TAG_LEN} characters")]
    TagTooLong,
    /// A tag not matching `[A-Za-z0-9_][A-Za-z0-9_.-]*`.
    #[error("tag {0:?} must start with a letter, digit or '_' and contain only letters, digits, '_', '.' and '-'")]
    BadTag(String),
}

/// A normalized image reference.
///
/// `tag` and `digest` may both be set (`name:tag@sha256:...`); the digest then decides what
/// is pulled and the tag is informational, as in Docker. At least one of them is always set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Reference {
    /// Registry name as written after normalization: `docker.io`, `ghcr.io`,
    /// `127.0.0.1:5000`, `[::1]:5000`, `localhost`.
    pub registry: String,
    /// Repository path inside the registry: `library/busybox`, `org/app`.
    pub repository: String,
    /// The tag, if any.
    pub tag: Option<String>,
    /// The manifest digest, if any.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parse and normalize a reference (see the module documentation).
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        let err = |reason: ReferenceReason| ReferenceError { reference: input.to_string(), reason };
        if input.is_empty() {
            return Err(err(ReferenceReason::Empty));
        }
        if input.trim() != input || input.chars().any(char::is_whitespace) {
            return Err(err(ReferenceReason::Whitespace));
        }

        let (name_tag, digest) = match input.split_once('@') {
            Some((name_tag, digest)) => {
                let digest =
                    digest.parse::<Digest>().map_err(|source| err(ReferenceReason::Digest { digest: digest.to_string(), source }))?;
                (name_tag, Some(digest))
            }
            None => (input, None),
        };

        // A ':' after the last '/' separates the tag; one before it is a registry port.
        let last_slash = name_tag.rfind('/');
        let (name, tag) = match name_tag.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => (&name_tag[..colon], Some(&name_tag[colon + 1..])),
            _ => (name_tag, None),
        };
        if name.is_empty() {
            return Err(err(ReferenceReason::EmptyRepository));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(err(ReferenceReason::NameTooLong));
        }

        let (registry, remainder) = split_registry(name);
        let registry = match registry {
            None => DOCKER_HUB.to_string(),
            Some(r) => {
                validate_registry(r).map_err(err)?;
                if r == "index.docker.io" {
                    DOCKER_HUB.to_string()
                } else {
                    r.to_string()
                }
            }
        };
        if remainder.is_empty() {
            return Err(err(ReferenceReason::EmptyRepository));
        }
        if remainder.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(err(ReferenceReason::Uppercase));
        }
        for component in remainder.split('/') {
            validate_path_component(component).map_err(err)?;
        }
        let repository =
            if registry == DOCKER_HUB && !remainder.contains('/') { format!("library/{remainder}") } else { remainder.to_string() };

        let tag = match tag {
            Some(tag) => {
                validate_tag(tag).map_err(err)?;
                Some(tag.to_string())
            }
            None if digest.is_none() => Some(DEFAULT_TAG.to_string()),
            None => None,
        };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// The host to send registry API requests to: `registry-1.docker.io` for Docker Hub,
    /// the registry name itself otherwise.
    pub fn api_host(&self) -> &str {
        api_host(&self.registry)
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What a manifest request addresses: the digest if there is one, else the tag.
    pub fn target(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// The same repository addressed by `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference { digest: Some(digest), ..self.clone() }
    }

    /// The same repository with tag `tag` and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Reference, ReferenceError> {
        validate_tag(tag).map_err(|reason| ReferenceError { reference: format!("{}:{tag}", self.name()), reason })?;
        Ok(Reference { tag: Some(tag.to_string()), digest: None, ..self.clone() })
    }

    /// The short form Docker prints: `busybox:latest`, `org/app:1`, `ghcr.io/x/y@sha256:...`.
    pub fn familiar(&self) -> String {
        let mut out = if self.registry == DOCKER_HUB {
            self.repository.strip_prefix("library/").unwrap_or(&self.repository).to_string()
        } else {
            self.name()
        };
        push_tag_digest(&mut out, self);
        out
    }
}

/// The API host of a registry name (`docker.io` → `registry-1.docker.io`).
pub fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_API_HOST
    } else {
        registry
    }
}

fn push_tag_digest(out: &mut String, r: &Reference) {
    if let Some(tag) = &r.tag {
        out.push(':');
        out.push_str(tag);
    }
    if let Some(digest) = &r.digest {
        out.push('@');
        out.push_str(digest.as_str());
    }
}

/// Split off the registry when the first component looks like a host.
fn split_registry(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase()) => {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn validate_registry(registry: &str) -> Result<(), ReferenceReason> {
    let bad = |why: fn(String) -> ReferenceReason| Err(why(registry.to_string()));
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else { return bad(ReferenceReason::UnclosedBracket) };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return bad(ReferenceReason::BadIpv6);
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return bad(ReferenceReason::TextAfterBracket),
            },
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err() {
            return bad(ReferenceReason::BadPort);
        }
    }
    if let Some(host) = host {
        if host.is_empty() {
            return bad(ReferenceReason::EmptyHost);
        }
        for label in host.split('.') {
            let ok = !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return bad(ReferenceReason::BadHost);
            }
        }
    }
    Ok(())
}

/// `[a-z0-9]+ (separator [a-z0-9]+)*` with separator `.`, `_`, `__` or `-+`.
fn validate_path_component(component: &str) -> Result<(), ReferenceReason> {
    let bad = || Err(ReferenceReason::BadComponent(component.to_string()));
    if component.is_empty() {
        return Err(ReferenceReason::EmptyComponent);
    }
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return bad();
    }
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
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return bad();
        }
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn validate_tag(tag: &str) -> Result<(), ReferenceReason> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    if bytes.is_empty() {
        return Err(ReferenceReason::EmptyTag);
    }
    if bytes.len() > MAX_TAG_LEN {
        return Err(ReferenceReason::TagTooLong);
    }
    if !word(bytes[0]) || !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
        return Err(ReferenceReason::BadTag(tag.to_string()));
    }
    Ok(())
}

/// The canonical form: `docker.io/library/busybox:latest`.
impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = self.name();
        push_tag_digest(&mut out, self);
        f.write_str(&out)
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

impl TryFrom<String> for Reference {
    type Error = ReferenceError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Reference::parse(&s)
    }
}

impl From<Reference> for String {
    fn from(r: Reference) -> String {
        r.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn parse(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_names_are_normalized() {
        for (input, canonical) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
            ("docker.io/library/busybox:latest", "docker.io/library/busybox:latest"),
            ("user/app:v1", "docker.io/user/app:v1"),
            ("user/team/app", "docker.io/user/team/app:latest"),
        ] {
            assert_eq!(parse(input).to_string(), canonical, "{input}");
        }
        let r = parse("busybox");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/busybox");
    }

    #[test]
    fn hosts_ports_and_localhost_are_registries() {
        let r = parse("127.0.0.1:5000/library/busybox:latest");
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), ("127.0.0.1:5000", "library/busybox", Some("latest")));
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        let r = parse("localhost/app");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("localhost", "app"));
        let r = parse("localhost:5000/app:dev");
        assert_eq!((r.registry.as_str(), r.tag.as_deref()), ("localhost:5000", Some("dev")));
        let r = parse("ghcr.io/org/app");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("ghcr.io", "org/app"));
        // a single-component name on a non-hub registry gets no library/ prefix
        assert_eq!(parse("example.com/app").repository, "app");
        let r = parse("[::1]:5000/app:1");
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("[::1]:5000", "app"));
        // an uppercase first component is a host (Docker's rule)
        assert_eq!(parse("Registry/app").registry, "Registry");
    }

    #[test]
    fn name_without_slash_and_colon_is_name_and_tag() {
        // Docker reads `localhost:5000` as repository localhost, tag 5000
        let r = parse("localhost:5000");
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), ("docker.io", "library/localhost", Some("5000")));
    }

    #[test]
    fn digests_with_and_without_tag() {
        let r = parse(&format!("busybox@{}", d('a')));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().map(|d| d.as_str().to_string()), Some(d('a')));
        assert_eq!(r.target(), d('a'));
        assert_eq!(r.to_string(), format!("docker.io/library/busybox@{}", d('a')));
        assert_eq!(r.familiar(), format!("busybox@{}", d('a')));

        let r = parse(&format!("127.0.0.1:5000/x/y:1.0@{}", d('b')));
        assert_eq!(r.tag.as_deref(), Some("1.0"));
        assert_eq!(r.target(), d('b'), "the digest decides what is pulled");
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/x/y:1.0@{}", d('b')));
    }

    #[test]
    fn familiar_form_strips_hub_and_library() {
        assert_eq!(parse("busybox").familiar(), "busybox:latest");
        assert_eq!(parse("docker.io/user/app:2").familiar(), "user/app:2");
        assert_eq!(parse("ghcr.io/org/app:2").familiar(), "ghcr.io/org/app:2");
        assert_eq!(parse("localhost/library/app").familiar(), "localhost/library/app:latest");
    }

    #[test]
    fn invalid_references_are_rejected_with_the_reference_named() {
        for (input, needle) in [
            ("", "empty"),
            ("Busybox", "lowercase"),
            ("docker.io/Org/app", "lowercase"),
            ("busybox:", "tag is empty"),
            ("busybox:-x", "tag"),
            (&format!("busybox:{}", "t".repeat(129)), "longer than 128"),
            ("busybox@sha256:abc", "not a valid digest"),
            ("busybox@md5:0123", "not a valid digest"),
            ("a//b", "empty path component"),
            ("app-/x", "path component"),
            ("a..b/x", "not a valid host"),
            ("foo_-bar", "path component"),
            ("host:99999/app", "invalid port"),
            ("host:/app", "invalid port"),
            ("[::zz]:5000/app", "IPv6"),
            (":tag", "empty"),
            ("bus box", "whitespace"),
            (&format!("{}/x", "a".repeat(300)), "longer than 255"),
        ] {
            let err = Reference::parse(input).expect_err(input);
            let msg = err.to_string();
            assert!(msg.contains(needle), "{input:?}: {msg}");
            assert!(msg.contains(&format!("{input:?}")), "error names the reference: {msg}");
        }
    }

    #[test]
    fn separators_follow_the_distribution_grammar() {
        for ok in ["a.b", "a_b", "a__b", "a-b", "a---b", "a1/b2.c_d"] {
            parse(ok);
        }
        for bad in ["a___b", "a._b", "_a", "a.", "a-.b"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn with_tag_and_with_digest() {
        let r = parse("127.0.0.1:5000/app:1");
        let digest: Digest = d('c').parse().unwrap();
        assert_eq!(r.with_digest(digest.clone()).target(), d('c'));
        let t = r.with_digest(digest).with_tag("2").unwrap();
        assert_eq!(t.to_string(), "127.0.0.1:5000/app:2");
        assert!(r.with_tag("bad tag").is_err());
    }

    #[test]
    fn serde_roundtrips_through_the_canonical_string() {
        let r = parse("busybox:1");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"docker.io/library/busybox:1\"");
        assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
        assert!(serde_json::from_str::<Reference>("\"UPPER\"").is_err());
    }
}
