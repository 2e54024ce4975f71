//! The `docker save` archive (what `docker load` reads): its `manifest.json`, the names of
//! its entries, and the `name:tag` form its `RepoTags` take. The one writer of that
//! manifest: the builder's `type=docker` output and the client's `--load` archive path both
//! use it, so the two cannot drift apart.
//!
//! An archive holds, in any order: `<diff_id hex>/layer.tar` per layer (a plain or
//! compressed tar; `docker load` sniffs it), `<config digest hex>.json`, and
//! `manifest.json`, a JSON array with one object per image.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::reference::{Reference, ReferenceError};

/// Errors of docker archive metadata.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A tag that is not an image reference.
    #[error("invalid tag {tag:?}: {source}")]
    BadTag {
        /// The tag as given.
        tag: String,
        /// Why it does not parse.
        source: ReferenceError,
    },
    /// A digest-only reference: an image in a Docker engine is named by a tag.
    #[error("{0}: an image in the engine can be named by a tag, not a digest")]
    DigestOnly(String),
    /// Serializing the manifest failed.
    #[error("writing manifest.json: {0}")]
    Json(#[from] serde_json::Error),
}

/// One image of an archive's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveImage {
    /// The path of the image config in the archive.
    #[serde(rename = "Config")]
    pub config: String,
    /// `repository:tag` names the engine gives the image.
    #[serde(rename = "RepoTags")]
    pub repo_tags: Vec<String>,
    /// The path of each layer in the archive, lowest first.
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
}

impl ArchiveImage {
    /// The entry of an image whose config is `config_digest` and whose layers have
    /// `diff_ids`, named `tags` (any reference form; see [`repo_tag`]).
    pub fn new(config_digest: &Digest, diff_ids: &[Digest], tags: &[String]) -> Result<ArchiveImage, ArchiveError> {
        Ok(ArchiveImage {
            config: config_path(config_digest),
            repo_tags: tags.iter().map(|t| repo_tag(t)).collect::<Result<_, _>>()?,
            layers: diff_ids.iter().map(layer_path).collect(),
        })
    }
}

/// The bytes of `manifest.json` for `images`.
pub fn manifest_json(images: &[ArchiveImage]) -> Result<Vec<u8>, ArchiveError> {
    Ok(serde_json::to_vec(images)?)
}

/// The archive path of the layer with `diff_id`.
pub fn layer_path(diff_id: &Digest) -> String {
    format!("{}/layer.tar", diff_id.hex())
}

/// The archive path of the config with `digest`.
pub fn config_path(digest: &Digest) -> String {
    format!("{}.json", digest.hex())
}

/// `tag` as a Docker engine names it: `repository:tag` with Docker Hub's `docker.io/` and
/// `library/` dropped and `latest` when no tag is given; a digest beside a tag is dropped
/// (an engine's name has none); a digest-only reference is an error.
pub fn repo_tag(tag: &str) -> Result<String, ArchiveError> {
    let (repository, t) = repo_and_tag(tag)?;
    Ok(format!("{repository}:{t}"))
}

/// `tag` split as [`repo_tag`] names it: (repository as the engine names it, tag).
pub fn repo_and_tag(tag: &str) -> Result<(String, String), ArchiveError> {
    let r = Reference::parse(tag).map_err(|source| ArchiveError::BadTag { tag: tag.to_string(), source })?;
    if r.digest.is_some() && r.tag.is_none() {
        return Err(ArchiveError::DigestOnly(tag.to_string()));
    }
    let t = r.tag.clone().unwrap_or_else(|| "latest".into());
    let bare = Reference { tag: None, digest: None, ..r };
    Ok((bare.familiar(), t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_is_what_docker_load_reads() {
        let config = Digest::of(b"config");
        let layers = [Digest::of(b"one"), Digest::of(b"two")];
        let img = ArchiveImage::new(&config, &layers, &["app".into(), "127.0.0.1:5000/team/app:v2".into()]).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&manifest_json(&[img]).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{
                "Config": format!("{}.json", config.hex()),
                "RepoTags": ["app:latest", "127.0.0.1:5000/team/app:v2"],
                "Layers": [format!("{}/layer.tar", layers[0].hex()), format!("{}/layer.tar", layers[1].hex())],
            }])
        );
    }

    #[test]
    fn an_untagged_image_has_an_empty_repo_tags_list() {
        let img = ArchiveImage::new(&Digest::of(b"c"), &[], &[]).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&manifest_json(&[img]).unwrap()).unwrap();
        assert_eq!(json[0]["RepoTags"], serde_json::json!([]), "docker load needs the key, even empty");
        assert_eq!(json[0]["Layers"], serde_json::json!([]));
    }

    #[test]
    fn tags_take_the_engines_form() {
        assert_eq!(repo_and_tag("app").unwrap(), ("app".into(), "latest".into()));
        assert_eq!(repo_and_tag("app:1").unwrap(), ("app".into(), "1".into()));
        assert_eq!(repo_and_tag("127.0.0.1:5001/team/app:v2").unwrap(), ("127.0.0.1:5001/team/app".into(), "v2".into()));
        assert_eq!(repo_tag("docker.io/library/busybox:1").unwrap(), "busybox:1");
        assert_eq!(repo_tag("docker.io/team/app").unwrap(), "team/app:latest");
        let with_digest = format!("app:1@{}", Digest::of(b"m"));
        assert_eq!(repo_tag(&with_digest).unwrap(), "app:1", "an engine's name carries no digest");
        let e = repo_tag(&format!("app@{}", Digest::of(b"m"))).unwrap_err();
        assert!(matches!(e, ArchiveError::DigestOnly(_)), "{e}");
        let e = repo_tag("Bad Name").unwrap_err();
        assert!(e.to_string().contains("\"Bad Name\""), "the error names the tag: {e}");
    }

    #[test]
    fn paths_are_named_by_hex_digests() {
        let d = Digest::of(b"x");
        assert_eq!(layer_path(&d), format!("{}/layer.tar", d.hex()));
        assert_eq!(config_path(&d), format!("{}.json", d.hex()));
    }
}
