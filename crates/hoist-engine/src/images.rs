//! Base images for one build: resolving references (a tag resolved before is reused unless
//! `--pull`), knowing their layers (pulled and extracted, verified, when a step or an output
//! needs them: [`crate::layers`]), and fetching `ADD <url>` sources.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use hoist_oci::digest::Digest;
use hoist_oci::export::extract_blob;
use hoist_oci::image::{ImageConfig, Manifest};
use hoist_oci::reference::Reference;
use hoist_oci::registry::{RegistryClient, RegistryError};
use hoist_oci::store::ContentStore;
use sha2::{Digest as _, Sha256};

use crate::cache::BlobRecord;
use crate::engine::{Engine, EngineError};
use crate::frontend::ImageResolver;
use crate::graph::{Platform, ResolvedImage};
use crate::layers::LayerOrigins;

/// Why a base image (or one of its layers) cannot be used. [`EngineError::Image`] names the
/// image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse.
    #[error(transparent)]
    Reference(#[from] hoist_oci::reference::ReferenceError),
    /// A digest that does not parse.
    #[error(transparent)]
    Digest(#[from] hoist_oci::digest::DigestError),
    /// The registry (or the image source) failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The content store failed.
    #[error(transparent)]
    Store(#[from] hoist_oci::store::StoreError),
    /// The cache index failed.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// The source's manifest bytes are not those of the digest it named.
    #[error("the manifest's digest is {got}, not {want}")]
    ManifestDigest { got: Digest, want: Digest },
    /// A manifest or config that is not valid JSON of its kind.
    #[error("invalid {what} {digest}: {source}")]
    Json { what: &'static str, digest: Digest, source: serde_json::Error },
    /// Manifest and config disagree on the number of layers.
    #[error("manifest lists {manifest} layers but its config lists {config} diff_ids")]
    LayerCount { manifest: usize, config: usize },
    /// One layer of the image.
    #[error("layer {blob}: {source}")]
    Layer { blob: Digest, source: Box<ImageError> },
    /// A layer blob whose content is not the layer the config names.
    #[error("uncompressed digest {got} does not match the config's diff_id {want}; the blob was discarded")]
    DiffId { got: Digest, want: Digest },
    /// Extracting a layer failed (or went past the builder's limits).
    #[error(transparent)]
    Extract(#[from] hoist_oci::export::ExportError),
    /// Storing an extracted layer failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// An image of `--build-context NAME=oci-layout://` has no manifest for the platform.
    #[error("the OCI layout has no image for {platform}")]
    NotInLayout { platform: String },
    /// The task extracting a layer failed.
    #[error("internal error: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why an `ADD <url>` source cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// The download failed.
    #[error("downloading {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    /// The server answered with an error status.
    #[error("downloading {url}: server answered {status}")]
    Status { url: String, status: reqwest::StatusCode },
    /// Writing the download failed.
    #[error("downloading {url}: {source}")]
    Io { url: String, source: std::io::Error },
    /// Larger than the builder allows.
    #[error(
        "downloading {url}: more than {} (the builder's limit, hoist serve --max-archive-bytes): expected a smaller file",
        crate::limits::human_bytes(*max)
    )]
    TooLarge { url: String, max: u64 },
    /// `ADD --checksum` does not match.
    #[error("checksum of {url} is {got}, but --checksum expects {want}")]
    Checksum { url: String, got: Digest, want: String },
}

/// An image as the engine takes it from a source: the platform's manifest and config,
/// byte for byte (their digests are what cache keys and exports name).
#[derive(Debug, Clone)]
pub struct SourceImage {
    /// Digest of the platform's image manifest.
    pub manifest_digest: Digest,
    /// The manifest's exact bytes.
    pub manifest_bytes: Vec<u8>,
    /// The image config's exact bytes.
    pub config_bytes: Vec<u8>,
}

/// Where base images come from. A builder reads registries through the build's
/// [`RegistryClient`] (it carries the credentials the client forwarded); tests serve images
/// from memory ([`crate::testing::MemoryImages`]).
#[async_trait::async_trait]
pub trait ImageSource: Send + Sync {
    /// The manifest and config of `reference` for `platform`.
    async fn resolve(&self, registry: &RegistryClient, reference: &Reference, platform: &Platform) -> Result<SourceImage, RegistryError>;
    /// Put the blob `digest` of `reference` into `store` (nothing when it is there); its size.
    async fn fetch_blob(
        &self,
        registry: &RegistryClient,
        reference: &Reference,
        digest: &Digest,
        store: &ContentStore,
    ) -> Result<u64, RegistryError>;
}

/// The [`ImageSource`] of a builder: registries.
#[derive(Debug, Default, Clone, Copy)]
pub struct Registries;

#[async_trait::async_trait]
impl ImageSource for Registries {
    async fn resolve(&self, registry: &RegistryClient, reference: &Reference, platform: &Platform) -> Result<SourceImage, RegistryError> {
        let m = registry.resolve(reference, platform).await?;
        Ok(SourceImage { manifest_digest: m.manifest_digest, manifest_bytes: m.manifest_bytes, config_bytes: m.config_bytes })
    }

    async fn fetch_blob(
        &self,
        registry: &RegistryClient,
        reference: &Reference,
        digest: &Digest,
        store: &ContentStore,
    ) -> Result<u64, RegistryError> {
        registry.fetch_blob(reference, digest, store).await
    }
}

/// Resolves and pulls images for one build.
pub(crate) struct BuildResolver {
    engine: Engine,
    namespace: String,
    registry: RegistryClient,
    pull: bool,
    resolved: tokio::sync::Mutex<HashMap<(String, String), ResolvedImage>>,
    origins: LayerOrigins,
    urls: Mutex<HashMap<String, (Digest, Arc<tempfile::NamedTempFile>)>>,
}

impl BuildResolver {
    pub(crate) fn new(engine: Engine, namespace: String, registry: RegistryClient, pull: bool) -> BuildResolver {
        BuildResolver {
            engine,
            namespace,
            registry,
            pull,
            resolved: tokio::sync::Mutex::new(HashMap::new()),
            origins: LayerOrigins::default(),
            urls: Mutex::new(HashMap::new()),
        }
    }

    /// A previously resolved image from the local store, if all its pieces are there.
    fn load_local(&self, reference: &str, manifest_digest: &Digest) -> Option<ResolvedImage> {
        let store = self.engine.store();
        let manifest: Manifest = serde_json::from_slice(&store.read(manifest_digest).ok()?).ok()?;
        let config: ImageConfig = serde_json::from_slice(&store.read(&manifest.config.digest).ok()?).ok()?;
        Some(ResolvedImage { reference: reference.to_string(), manifest_digest: manifest_digest.to_string(), config })
    }

    async fn resolve_uncached(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, ImageError> {
        let r = Reference::parse(reference)?;
        let canonical = r.to_string();
        let pkey = platform.to_string();
        let index = self.engine.index();
        let ns = &self.namespace;
        if crate::layout::is_layout(&r) {
            // Imported from the client's OCI layout for this project; never pulled.
            let found = index.tag(ns, &canonical, &crate::layout::platform_key(platform))?;
            return found
                .and_then(|t| self.load_local(&canonical, &t.manifest_digest))
                .ok_or_else(|| ImageError::NotInLayout { platform: platform.to_string() });
        }
        if !self.pull {
            if let Ok(Some(t)) = index.tag(ns, &canonical, &pkey) {
                if let Some(img) = self.load_local(&canonical, &t.manifest_digest) {
                    return Ok(img);
                }
            }
        }
        let m = self.engine.inner.images.resolve(&self.registry, &r, platform).await?;
        let store = self.engine.store();
        let manifest_digest = store.put(&m.manifest_bytes)?;
        if manifest_digest != m.manifest_digest {
            return Err(ImageError::ManifestDigest { got: manifest_digest, want: m.manifest_digest });
        }
        let config_digest = store.put(&m.config_bytes)?;
        let config: ImageConfig =
            serde_json::from_slice(&m.config_bytes).map_err(|source| ImageError::Json { what: "config", digest: config_digest, source })?;
        index.put_tag(ns, &canonical, &pkey, &m.manifest_digest)?;
        Ok(ResolvedImage { reference: canonical, manifest_digest: m.manifest_digest.to_string(), config })
    }

    /// Know the layers of `img` without fetching them: each layer's blob (as the registry
    /// serves it) recorded, and where to pull it from when a step or an output needs its
    /// files ([`Engine::ensure_layers`] with [`BuildResolver::origins`]). Returns the total
    /// size of the image's layer blobs. The caller leases the layers first.
    pub(crate) fn register_layers(&self, img: &ResolvedImage) -> Result<u64, EngineError> {
        self.register_layers_inner(img).map_err(|e| EngineError::Image { reference: img.reference.clone(), source: Box::new(e) })
    }

    fn register_layers_inner(&self, img: &ResolvedImage) -> Result<u64, ImageError> {
        let store = self.engine.store();
        let manifest_digest: Digest = img.manifest_digest.parse()?;
        let manifest: Manifest = serde_json::from_slice(&store.read(&manifest_digest)?).map_err(|source| ImageError::Json {
            what: "manifest",
            digest: manifest_digest.clone(),
            source,
        })?;
        let diff_ids = &img.config.rootfs.diff_ids;
        if manifest.layers.len() != diff_ids.len() {
            return Err(ImageError::LayerCount { manifest: manifest.layers.len(), config: diff_ids.len() });
        }
        let reference = Reference::parse(&img.reference)?;
        for (desc, diff_id) in manifest.layers.iter().zip(diff_ids) {
            let record = BlobRecord { digest: desc.digest.clone(), size: desc.size, media_type: desc.media_type.clone(), original: true };
            self.engine.index().add_layer_blob(diff_id, record)?;
            self.origins.add(diff_id, &self.registry, &reference, desc);
        }
        Ok(manifest.layers.iter().map(|l| l.size).sum())
    }

    /// The images resolved so far, with the platform each was resolved for, in a stable
    /// order (by reference, then platform): the provenance's materials.
    pub(crate) async fn materials(&self) -> Vec<crate::export::provenance::Material> {
        let resolved = self.resolved.lock().await;
        let mut out: Vec<_> = resolved
            .iter()
            .filter_map(|((_, platform), img)| {
                let platform = Platform::parse(platform).ok()?;
                Some(crate::export::provenance::Material {
                    reference: img.reference.clone(),
                    platform,
                    digest: img.manifest_digest.parse().ok()?,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.reference, a.platform.to_string()).cmp(&(&b.reference, b.platform.to_string())));
        out.dedup();
        out
    }

    /// Where the layers of the build's base images come from.
    pub(crate) fn origins(&self) -> &LayerOrigins {
        &self.origins
    }

    /// Download a URL (once per build), verifying `checksum` (`sha256:...`) when given.
    pub(crate) async fn fetch_url(&self, url: &str, checksum: Option<&str>) -> Result<(Digest, Arc<tempfile::NamedTempFile>), UrlError> {
        if let Some(hit) = self.urls.lock().unwrap_or_else(|e| e.into_inner()).get(url).cloned() {
            verify_checksum(url, &hit.0, checksum)?;
            return Ok(hit);
        }
        let http = |source| UrlError::Http { url: url.to_string(), source };
        let io = |source| UrlError::Io { url: url.to_string(), source };
        let resp = reqwest::get(url).await.map_err(http)?;
        if !resp.status().is_success() {
            return Err(UrlError::Status { url: url.to_string(), status: resp.status() });
        }
        let mut file = tempfile::NamedTempFile::new().map_err(io)?;
        let mut hasher = Sha256::new();
        let mut stream = resp.bytes_stream();
        let max = self.engine.limits().archive.max_bytes;
        let mut got: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(http)?;
            got += chunk.len() as u64;
            if got > max {
                return Err(UrlError::TooLarge { url: url.to_string(), max });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(io)?;
        }
        let digest = Digest::from_hasher(hasher);
        verify_checksum(url, &digest, checksum)?;
        let entry = (digest, Arc::new(file));
        self.urls.lock().unwrap_or_else(|e| e.into_inner()).insert(url.to_string(), entry.clone());
        Ok(entry)
    }
}

fn verify_checksum(url: &str, got: &Digest, want: Option<&str>) -> Result<(), UrlError> {
    match want {
        Some(w) if w != got.as_str() => Err(UrlError::Checksum { url: url.to_string(), got: got.clone(), want: w.to_string() }),
        _ => Ok(()),
    }
}

/// Extract the stored blob of `record` as the snapshot of layer `diff_id`, checking that it
/// is that layer, and remember the blob as one of the layer's.
pub(crate) async fn unpack_layer(engine: &Engine, record: BlobRecord, diff_id: &Digest) -> Result<(), ImageError> {
    let store = engine.store().clone();
    let snaps = engine.snapshots().clone();
    let media_type = record.media_type.clone();
    let blob = record.digest.clone();
    let want = diff_id.clone();
    // A base image (or another node's upload) is as untrusted as a Dockerfile: its layers
    // are extracted within limits.
    let limits = engine.limits().layer_extract_options();
    tokio::task::spawn_blocking(move || -> Result<(), ImageError> {
        let tmp = snaps.temp_dir()?;
        let got = extract_blob(&store, &blob, &media_type, tmp.path(), &limits)?;
        if got != want {
            // A corrupt blob: drop it so the next build fetches it again.
            let _ = store.remove(&blob);
            return Err(ImageError::DiffId { got, want });
        }
        snaps.commit(tmp, &want)?;
        Ok(())
    })
    .await??;
    engine.index().add_layer_blob(diff_id, record)?;
    Ok(())
}

#[async_trait::async_trait]
impl ImageResolver for BuildResolver {
    async fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, ImageError> {
        let key = (reference.to_string(), platform.to_string());
        let mut resolved = self.resolved.lock().await;
        if let Some(hit) = resolved.get(&key) {
            return Ok(hit.clone());
        }
        let img = self.resolve_uncached(reference, platform).await?;
        resolved.insert(key, img.clone());
        Ok(img)
    }
}
