//! Base images for one build: resolving references (a tag resolved before is reused unless
//! `--pull`), pulling and extracting missing layers (each layer once, in parallel, verified),
//! and fetching `ADD <url>` sources.

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
use tokio_util::sync::CancellationToken;

use crate::cache::BlobRecord;
use crate::engine::{Engine, EngineError};
use crate::frontend::ImageResolver;
use crate::graph::{Platform, ResolvedImage};

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

    async fn resolve_uncached(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, String> {
        let r = Reference::parse(reference).map_err(|e| e.to_string())?;
        let canonical = r.to_string();
        let pkey = platform.to_string();
        let index = self.engine.index();
        let ns = &self.namespace;
        if !self.pull {
            if let Ok(Some(t)) = index.tag(ns, &canonical, &pkey) {
                if let Some(img) = self.load_local(&canonical, &t.manifest_digest) {
                    return Ok(img);
                }
            }
        }
        let m = self.engine.inner.images.resolve(&self.registry, &r, platform).await.map_err(|e| e.to_string())?;
        let store = self.engine.store();
        let manifest_digest = store.put(&m.manifest_bytes).map_err(|e| e.to_string())?;
        if manifest_digest != m.manifest_digest {
            return Err(format!("image {canonical}: the manifest's digest is {manifest_digest}, not {}", m.manifest_digest));
        }
        let config_digest = store.put(&m.config_bytes).map_err(|e| e.to_string())?;
        let config: ImageConfig =
            serde_json::from_slice(&m.config_bytes).map_err(|e| format!("image {canonical}: invalid config {config_digest}: {e}"))?;
        index.put_tag(ns, &canonical, &pkey, &m.manifest_digest).map_err(|e| e.to_string())?;
        Ok(ResolvedImage { reference: canonical, manifest_digest: m.manifest_digest.to_string(), config })
    }

    /// Make every layer of `img` available as a snapshot; returns how many were fetched and
    /// the total size of the image's layer blobs. The caller leases the layers first.
    pub(crate) async fn pull_layers(&self, img: &ResolvedImage, cancel: &CancellationToken) -> Result<(usize, u64), EngineError> {
        let store = self.engine.store().clone();
        let image_err = |m: String| EngineError::Image(format!("image {}: {m}", img.reference));
        let manifest_digest: Digest = img.manifest_digest.parse().map_err(|e: hoist_oci::digest::DigestError| image_err(e.to_string()))?;
        let manifest: Manifest = serde_json::from_slice(&store.read(&manifest_digest).map_err(|e| image_err(e.to_string()))?)
            .map_err(|e| image_err(format!("invalid manifest {}: {e}", img.manifest_digest)))?;
        let diff_ids = &img.config.rootfs.diff_ids;
        if manifest.layers.len() != diff_ids.len() {
            return Err(image_err(format!(
                "manifest lists {} layers but its config lists {} diff_ids",
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        let reference = Reference::parse(&img.reference).map_err(|e| image_err(e.to_string()))?;
        let mut jobs = Vec::new();
        let total: u64 = manifest.layers.iter().map(|l| l.size).sum();
        for (desc, diff_id) in manifest.layers.iter().zip(diff_ids) {
            let record = BlobRecord { digest: desc.digest.clone(), size: desc.size, media_type: desc.media_type.clone(), original: true };
            if self.engine.snapshots().has_layer(diff_id) {
                let known = self.engine.index().layer_blobs(diff_id).map_err(|e| image_err(e.to_string()))?;
                if !known.iter().any(|b| b.digest == desc.digest) {
                    self.engine.index().add_layer_blob(diff_id, record).map_err(|e| image_err(e.to_string()))?;
                }
                continue;
            }
            let engine = self.engine.clone();
            let registry = self.registry.clone();
            let reference = reference.clone();
            let diff_id = diff_id.clone();
            let desc = desc.clone();
            let key = format!("pull:{diff_id}");
            let worker = engine.clone();
            jobs.push(async move {
                let (out, _) = engine
                    .inner
                    .inflight
                    .run(&key, cancel, move |_c| async move {
                        pull_one(worker, registry, reference, desc, diff_id.clone(), record).await.map_err(Arc::new)?;
                        Ok(Some(diff_id))
                    })
                    .await;
                out
            });
        }
        let n = jobs.len();
        let results = futures::future::join_all(jobs).await;
        for r in results {
            r.map_err(|e| image_err(e.to_string()))?;
        }
        Ok((n, total))
    }

    /// Download a URL (once per build), verifying `checksum` (`sha256:...`) when given.
    pub(crate) async fn fetch_url(&self, url: &str, checksum: Option<&str>) -> Result<(Digest, Arc<tempfile::NamedTempFile>), String> {
        if let Some(hit) = self.urls.lock().unwrap_or_else(|e| e.into_inner()).get(url).cloned() {
            verify_checksum(url, &hit.0, checksum)?;
            return Ok(hit);
        }
        let resp = reqwest::get(url).await.map_err(|e| format!("downloading {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("downloading {url}: server answered {}", resp.status()));
        }
        let mut file = tempfile::NamedTempFile::new().map_err(|e| format!("downloading {url}: {e}"))?;
        let mut hasher = Sha256::new();
        let mut stream = resp.bytes_stream();
        let max = self.engine.limits().archive.max_bytes;
        let mut got: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("downloading {url}: {e}"))?;
            got += chunk.len() as u64;
            if got > max {
                return Err(format!(
                    "downloading {url}: more than {} (the builder's limit, hoist serve --max-archive-bytes): expected a smaller file",
                    crate::limits::human_bytes(max)
                ));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(|e| format!("downloading {url}: {e}"))?;
        }
        let digest = Digest::from_hasher(hasher);
        verify_checksum(url, &digest, checksum)?;
        let entry = (digest, Arc::new(file));
        self.urls.lock().unwrap_or_else(|e| e.into_inner()).insert(url.to_string(), entry.clone());
        Ok(entry)
    }
}

fn verify_checksum(url: &str, got: &Digest, want: Option<&str>) -> Result<(), String> {
    match want {
        Some(w) if w != got.as_str() => Err(format!("checksum of {url} is {got}, but --checksum expects {w}")),
        _ => Ok(()),
    }
}

async fn pull_one(
    engine: Engine,
    registry: RegistryClient,
    reference: Reference,
    desc: hoist_oci::image::Descriptor,
    diff_id: Digest,
    record: BlobRecord,
) -> Result<(), EngineError> {
    let err = |m: String| EngineError::Image(format!("image {reference}: layer {}: {m}", desc.digest));
    let store = engine.store().clone();
    if !store.contains(&desc.digest) {
        engine.inner.images.fetch_blob(&registry, &reference, &desc.digest, &store).await.map_err(|e| err(e.to_string()))?;
    }
    let snaps = engine.snapshots().clone();
    let media_type = desc.media_type.clone();
    let blob = desc.digest.clone();
    let want = diff_id.clone();
    // A base image is as untrusted as a Dockerfile: its layers are extracted within limits.
    let limits = engine.limits().layer_extract_options();
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let tmp = snaps.temp_dir().map_err(|e| e.to_string())?;
        let got = extract_blob(&store, &blob, &media_type, tmp.path(), &limits).map_err(|e| e.to_string())?;
        if got != want {
            // A corrupt blob: drop it so the next build fetches it again.
            let _ = store.remove(&blob);
            return Err(format!("uncompressed digest {got} does not match the config's diff_id {want}; the blob was discarded"));
        }
        snaps.commit(tmp, &want).map_err(|e| e.to_string())?;
        Ok(())
    })
    .await
    .map_err(|e| err(e.to_string()))?
    .map_err(err)?;
    engine.index().add_layer_blob(&diff_id, record).map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[async_trait::async_trait]
impl ImageResolver for BuildResolver {
    async fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, String> {
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
