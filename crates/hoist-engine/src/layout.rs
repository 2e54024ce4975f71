//! Images of an OCI image layout (`--build-context NAME=oci-layout://DIR`): the client
//! uploads the layout's blobs, and the builder imports the chosen image into its content
//! store under a reference of its own ([`LAYOUT_REGISTRY`]) that only the importing
//! project's builds resolve, and never from a registry.

use std::io;

use hoist_oci::digest::Digest;
use hoist_oci::image::{media, ImageConfig, Index, Manifest};
use hoist_oci::reference::Reference;

use crate::engine::Engine;
use crate::graph::Platform;
use crate::images::ImageError;

/// The registry part of the references under which imported layout images are known. It
/// is never contacted (`.invalid` is reserved for names that resolve nowhere).
pub const LAYOUT_REGISTRY: &str = "oci-layout.invalid";

/// Whether `reference` names an imported layout image.
pub(crate) fn is_layout(reference: &Reference) -> bool {
    reference.registry == LAYOUT_REGISTRY
}

/// The key under which a layout image's platform is recorded and looked up.
pub(crate) fn platform_key(platform: &Platform) -> String {
    format!("layout:{}", platform.normalize())
}

/// The largest manifest, index or config read (as a registry client would).
const MAX_JSON: u64 = 4 << 20;

/// Why a layout image cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A blob the image needs was not uploaded (it is not under `blobs/` in the layout).
    #[error("blob {0} is not in the layout (expected blobs/sha256/<hex>)")]
    Missing(Digest),
    /// Reading an uploaded blob failed.
    #[error("reading blob {digest}: {source}")]
    Read {
        /// The blob.
        digest: Digest,
        /// What failed.
        source: io::Error,
    },
    /// The image itself (content store, JSON, digests).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A manifest, index or config larger than any real one.
    #[error("{digest} is {size} bytes, too large for a manifest or config")]
    TooLarge {
        /// The blob.
        digest: Digest,
        /// Its size in bytes.
        size: u64,
    },
    /// Neither an image index nor a manifest with layers.
    #[error("{digest} is not an image manifest or index (media type {media_type:?})")]
    NotAnImage {
        /// The blob.
        digest: Digest,
        /// Its `mediaType` ("" when it has none).
        media_type: String,
    },
}

/// Where the blobs of an uploaded layout are read from: the open file of blob `digest`, if
/// it was uploaded.
pub type LayoutBlobs<'a> = dyn Fn(&Digest) -> Option<std::fs::File> + 'a;

impl Engine {
    /// Import the image (index or manifest) `digest` of an uploaded OCI layout for project
    /// `ns`: its manifests, configs and layers are copied into the content store (each
    /// verified against its digest) and each platform recorded for `ns` only. Returns the
    /// reference builds use for it. Blocking.
    pub fn import_layout(&self, ns: &str, digest: &Digest, blobs: &LayoutBlobs<'_>) -> Result<String, LayoutError> {
        let reference = format!("{LAYOUT_REGISTRY}/context@{digest}");
        let top = self.copy_json(digest, blobs)?;
        let probe: serde_json::Value = serde_json::from_slice(&top).map_err(|source| json("manifest", digest, source))?;
        let mut manifests = Vec::new();
        if probe.get("manifests").is_some() {
            let index: Index = serde_json::from_slice(&top).map_err(|source| json("index", digest, source))?;
            for d in index.manifests {
                let is_manifest = matches!(d.media_type.as_str(), media::OCI_MANIFEST | media::DOCKER_MANIFEST);
                // Attestation manifests (`unknown/unknown`) are not images to build on.
                let platform = d.platform.clone().filter(|p| p.os != "unknown");
                if is_manifest && platform.is_some() {
                    manifests.push((d.digest, platform));
                }
            }
        } else if probe.get("layers").is_some() {
            manifests.push((digest.clone(), None));
        } else {
            let media_type = probe.get("mediaType").and_then(|v| v.as_str()).unwrap_or_default().to_string();
            return Err(LayoutError::NotAnImage { digest: digest.clone(), media_type });
        }
        for (manifest_digest, platform) in manifests {
            let bytes = if manifest_digest == *digest { top.clone() } else { self.copy_json(&manifest_digest, blobs)? };
            let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|source| json("manifest", &manifest_digest, source))?;
            let config_bytes = self.copy_json(&manifest.config.digest, blobs)?;
            let config: ImageConfig =
                serde_json::from_slice(&config_bytes).map_err(|source| json("config", &manifest.config.digest, source))?;
            for layer in &manifest.layers {
                self.copy_blob(&layer.digest, blobs)?;
            }
            let platform = platform.unwrap_or_else(|| Platform::new(&config.os, &config.architecture, config.variant.as_deref()));
            self.index().put_tag(ns, &reference, &platform_key(&platform), &manifest_digest).map_err(ImageError::from)?;
        }
        Ok(reference)
    }

    /// [`Engine::copy_blob`] of a manifest or config, and its bytes.
    fn copy_json(&self, digest: &Digest, blobs: &LayoutBlobs<'_>) -> Result<Vec<u8>, LayoutError> {
        self.copy_blob(digest, blobs)?;
        let size = self.store().size(digest).map_err(ImageError::from)?.unwrap_or(0);
        if size > MAX_JSON {
            return Err(LayoutError::TooLarge { digest: digest.clone(), size });
        }
        Ok(self.store().read(digest).map_err(ImageError::from)?)
    }

    /// Copy blob `digest` from the upload into the content store (verified). The upload
    /// must hold it even when the store has it already: a blob another project put there is
    /// not this project's to use by naming its digest.
    fn copy_blob(&self, digest: &Digest, blobs: &LayoutBlobs<'_>) -> Result<(), LayoutError> {
        let store = self.store();
        let mut file = blobs(digest).ok_or_else(|| LayoutError::Missing(digest.clone()))?;
        if !store.contains(digest) {
            let mut w = store.writer().map_err(ImageError::from)?;
            io::copy(&mut file, &mut w).map_err(|source| LayoutError::Read { digest: digest.clone(), source })?;
            w.commit(Some(digest)).map_err(ImageError::from)?;
        }
        Ok(())
    }
}

fn json(what: &'static str, digest: &Digest, source: serde_json::Error) -> LayoutError {
    LayoutError::Image(ImageError::Json { what, digest: digest.clone(), source })
}
