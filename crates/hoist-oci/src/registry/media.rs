//! Manifest media types, telling manifests from indexes, and picking a platform's manifest
//! out of an OCI index or Docker manifest list.

use serde::Deserialize;

use super::platform::Platform;
use crate::digest::Digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 1 manifests (unsupported, recognized for a clear error).
const DOCKER_SCHEMA1: [&str; 2] =
    ["application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws"];

/// The `Accept` header of manifest requests: every manifest and index type we understand.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Whether a document is a single-platform manifest or an index of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// An image manifest (OCI or Docker schema 2).
    Manifest,
    /// An index (OCI index or Docker manifest list).
    Index,
}

/// Whether `media_type` is an image manifest type we can use.
pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// Whether `media_type` is an index type.
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// Why a manifest or index document cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The manifest document does not parse as JSON.
    #[error("the manifest is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// A Docker schema 1 manifest (by `schemaVersion` or media type).
    #[error("it is a Docker schema 1 manifest, which is not supported; push the image again with a current client")]
    Schema1,
    /// A declared media type that is neither a manifest nor an index we understand.
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    /// No media type, and neither `manifests` nor `config` and `layers`.
    #[error("the document is neither an image manifest nor an index")]
    UnknownShape,
    /// The index document does not parse (not JSON, or no `manifests` list).
    #[error("the index is not valid: {0}")]
    InvalidIndex(#[source] serde_json::Error),
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    layers: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
}

/// Classify a manifest document from the response's `Content-Type` and its own
/// `mediaType` (which wins, as it is covered by the digest). Returns the kind and the media
/// type to record, or a reason it cannot be used.
pub fn classify(content_type: Option<&str>, body: &[u8]) -> Result<(ManifestKind, String), MediaError> {
    let probe: Probe = serde_json::from_slice(body).map_err(MediaError::NotJson)?;
    let header = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let declared = probe.media_type.clone().or(header.filter(|h| {
        h.starts_with("application/vnd.") // ignore generic application/json, octet-stream
    }));
    if probe.schema_version == Some(1) || declared.as_deref().is_some_and(|m| DOCKER_SCHEMA1.contains(&m)) {
        return Err(MediaError::Schema1);
    }
    match declared {
        Some(m) if is_manifest(&m) => Ok((ManifestKind::Manifest, m)),
        Some(m) if is_index(&m) => Ok((ManifestKind::Index, m)),
        Some(m) => Err(MediaError::UnsupportedMediaType(m)),
        None if probe.manifests.is_some() => Ok((ManifestKind::Index, OCI_INDEX.to_string())),
        None if probe.layers.is_some() && probe.config.is_some() => Ok((ManifestKind::Manifest, OCI_MANIFEST.to_string())),
        None => Err(MediaError::UnknownShape),
    }
}

/// One entry of an index, as much as we need of it.
#[derive(Debug, Clone, Deserialize)]
pub struct IndexEntry {
    /// Media type of the referenced manifest.
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    /// Its digest (kept as a string: unknown algorithms are skipped, not fatal).
    pub digest: String,
    /// Its size in bytes.
    #[serde(default)]
    pub size: Option<u64>,
    /// Its platform.
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Deserialize)]
struct IndexDoc {
    manifests: Vec<IndexEntry>,
}

/// The entries of an index document.
pub fn index_entries(body: &[u8]) -> Result<Vec<IndexEntry>, MediaError> {
    serde_json::from_slice::<IndexDoc>(body).map(|d| d.manifests).map_err(MediaError::InvalidIndex)
}

/// A chosen entry: digest, size, media type and platform.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// Digest of the platform's manifest.
    pub digest: Digest,
    /// Its size, if the index says.
    pub size: Option<u64>,
    /// Its media type, if the index says.
    pub media_type: Option<String>,
    /// The entry's platform.
    pub platform: Platform,
}

/// Pick the entry for `wanted`: among the entries that match, one whose variant is exactly
/// the requested one first, else the first in index order. `Err` lists the platforms the
/// index offers (attestation entries `unknown/unknown` left out).
pub fn choose(entries: &[IndexEntry], wanted: &Platform) -> Result<Chosen, Vec<Platform>> {
    let usable = |e: &&IndexEntry| e.media_type.as_deref().is_none_or(is_manifest);
    let matching: Vec<(&IndexEntry, Platform)> = entries
        .iter()
        .filter(usable)
        .filter_map(|e| Some((e, e.platform.clone()?)))
        .filter(|(e, p)| wanted.matches(p) && e.digest.parse::<Digest>().is_ok())
        .collect();
    let exact = matching.iter().find(|(_, p)| p.variant.as_deref() == wanted.variant.as_deref() && wanted.variant.is_some());
    if let Some((e, p)) = exact.or(matching.first()) {
        let digest = e.digest.parse::<Digest>().map_err(|_| Vec::new())?;
        return Ok(Chosen { digest, size: e.size, media_type: e.media_type.clone(), platform: p.clone() });
    }
    let mut available: Vec<Platform> = entries
        .iter()
        .filter(usable)
        .filter_map(|e| e.platform.clone())
        .filter(|p| p.os != "unknown" && p.architecture != "unknown")
        .collect();
    available.dedup();
    Err(available)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn index(entries: &[(&str, Option<&str>, char)]) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(p, media, c)| {
                let parts: Vec<&str> = p.split('/').collect();
                let mut platform = serde_json::json!({"os": parts[0], "architecture": parts[1]});
                if let Some(v) = parts.get(2) {
                    platform["variant"] = serde_json::json!(v);
                }
                let mut e = serde_json::json!({"digest": d(*c), "size": 100, "platform": platform});
                if let Some(m) = media {
                    e["mediaType"] = serde_json::json!(m);
                }
                e
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})).unwrap()
    }

    #[test]
    fn classify_by_media_type_header_and_shape() {
        let oci = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#;
        assert_eq!(classify(Some("text/plain"), oci).unwrap(), (ManifestKind::Manifest, OCI_MANIFEST.into()));
        let bare = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert_eq!(classify(Some(DOCKER_MANIFEST), bare).unwrap(), (ManifestKind::Manifest, DOCKER_MANIFEST.into()));
        assert_eq!(classify(Some("application/json"), bare).unwrap(), (ManifestKind::Manifest, OCI_MANIFEST.into()));
        let list = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(classify(Some(DOCKER_MANIFEST_LIST), list).unwrap().0, ManifestKind::Index);
        assert_eq!(classify(None, list).unwrap(), (ManifestKind::Index, OCI_INDEX.into()));
        let v1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(classify(Some("application/vnd.docker.distribution.manifest.v1+prettyjws"), v1)
            .unwrap_err()
            .to_string()
            .contains("schema 1"));
        assert!(classify(None, b"not json").unwrap_err().to_string().contains("not valid JSON"));
        let art = br#"{"mediaType":"application/vnd.oci.artifact.manifest.v1+json"}"#;
        assert!(classify(None, art).unwrap_err().to_string().contains("unsupported manifest media type"));
    }

    #[test]
    fn choose_matches_normalized_platforms() {
        let body = index(&[
            ("linux/amd64", Some(OCI_MANIFEST), 'a'),
            ("linux/arm64/v8", Some(OCI_MANIFEST), 'b'),
            ("unknown/unknown", Some(OCI_MANIFEST), 'c'),
        ]);
        let entries = index_entries(&body).unwrap();
        assert_eq!(choose(&entries, &"linux/arm64".parse().unwrap()).unwrap().digest.as_str(), d('b'));
        assert_eq!(choose(&entries, &"linux/amd64".parse().unwrap()).unwrap().digest.as_str(), d('a'));
        let err = choose(&entries, &"linux/s390x".parse().unwrap()).unwrap_err();
        let shown: Vec<String> = err.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown, ["linux/amd64", "linux/arm64"]);
    }

    #[test]
    fn choose_prefers_exact_variant_and_skips_nested_indexes() {
        let body = index(&[
            ("linux/arm/v6", None, 'a'),
            ("linux/arm64", Some(OCI_INDEX), 'b'),
            ("linux/arm64", Some(DOCKER_MANIFEST), 'c'),
            ("linux/arm64/v8", Some(DOCKER_MANIFEST), 'd'),
        ]);
        let entries = index_entries(&body).unwrap();
        assert_eq!(choose(&entries, &"linux/arm64/v8".parse().unwrap()).unwrap().digest.as_str(), d('d'));
        // `linux/arm64` is `linux/arm64/v8`: the entry that spells the variant wins.
        assert_eq!(choose(&entries, &"linux/arm64".parse().unwrap()).unwrap().digest.as_str(), d('d'));
        let unspelled = &entries[..3];
        assert_eq!(choose(unspelled, &"linux/arm64".parse().unwrap()).unwrap().digest.as_str(), d('c'), "else the first that matches");
        assert!(choose(&entries, &"linux/arm/v7".parse().unwrap()).is_err());
    }
}
