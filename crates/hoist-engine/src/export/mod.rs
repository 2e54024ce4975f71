//! Exporters: layer blobs (compressed once, reused), manifests and indexes, docker and OCI
//! archives, the flattened root filesystem, pushes to registries, exports a client reads
//! blob by blob ([`client`]) — and the one interface over them all: an [`OutputSpec`]
//! resolves to an [`Exporter`] that exports ([`spec`]).
//!
//! Base image layers keep the blobs the registry served, so their digests stay the ones
//! engines and registries already know; a new layer is compressed the first time an
//! exporter needs it in that compression and the blob is reused by every later export.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Arc;

use hoist_oci::archive;
use hoist_oci::compress::Compression;
use hoist_oci::digest::Digest;
use hoist_oci::export::{export_layer, recompress_blob};
use hoist_oci::image::{media, Descriptor, Index, Manifest};
use hoist_oci::layer::{write_layer_tar, TarOptions};
use hoist_oci::reference::Reference;
use hoist_oci::registry::{BlobPush, BlobSource, RegistryClient};
use tokio_util::sync::CancellationToken;

use crate::cache::BlobRecord;
use crate::engine::{BuiltImage, Engine, EngineError};
use crate::progress::{Event, Progress};

pub mod annotations;
pub mod client;
pub mod provenance;
pub mod spec;

pub use annotations::{AnnotationError, Annotations};
pub use client::{select_platform, ClientExport, ServedBlob};
pub use provenance::Provenance;
pub use spec::{ExportOutcome, ExportStream, ExportTarget, Exporter, LayerCompression, OutputError, OutputSpec};

/// Why an export failed (besides the stores it reads: [`EngineError::Cache`],
/// [`EngineError::Store`], [`EngineError::Snapshot`]).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A layer of the image is gone from the builder.
    #[error("layer {0} is neither stored as a blob nor as a snapshot")]
    LayerMissing(Digest),
    /// A layer's files changed since it was made.
    #[error("layer {diff_id} changed on disk (its content now hashes to {now}); run `hoist cache reset`")]
    LayerChanged {
        /// The layer.
        diff_id: Digest,
        /// What its files hash to now.
        now: Digest,
    },
    /// A layer's tar is not the size recorded for it (its files changed while served).
    #[error("layer {diff_id} changed on the builder: it now tars to {now} bytes, not {recorded}")]
    TarSizeChanged {
        /// The layer.
        diff_id: Digest,
        /// Bytes its tar has now.
        now: u64,
        /// Bytes recorded for it.
        recorded: u64,
    },
    /// A blob the export needs is not in the content store.
    #[error("blob {0} missing")]
    BlobMissing(Digest),
    /// A stored blob shorter than its recorded size.
    #[error("blob {digest} is shorter than its {size} bytes")]
    BlobShort {
        /// The blob.
        digest: Digest,
        /// Its recorded size.
        size: u64,
    },
    /// Writing a layer's tar failed.
    #[error("layer {diff_id}: {source}")]
    Tar {
        /// The layer.
        diff_id: Digest,
        /// What failed.
        source: hoist_oci::layer::LayerError,
    },
    /// Making or re-compressing a layer blob failed.
    #[error("layer {diff_id}: {source}")]
    Blob {
        /// The layer.
        diff_id: Digest,
        /// What failed.
        source: hoist_oci::export::ExportError,
    },
    /// Writing the flattened root filesystem failed.
    #[error("writing the root filesystem: {0}")]
    Rootfs(#[source] hoist_oci::layer::LayerError),
    /// A docker archive's metadata cannot be written.
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    /// A manifest or index cannot be serialized (a bug).
    #[error("serializing a manifest: {0}")]
    Json(#[from] serde_json::Error),
    /// Reading or writing bytes failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// What failed.
        source: io::Error,
    },
    /// The thread writing a layer's tar panicked.
    #[error("the layer writer panicked")]
    WriterPanicked,
    /// Some pushes failed.
    #[error("{}{}", failed.join("; "), if pushed.is_empty() { String::new() } else { format!(" (pushed to {} successfully)", pushed.join(", ")) })]
    Push {
        /// What failed, one message per reference (each naming it).
        failed: Vec<String>,
        /// The references pushed.
        pushed: Vec<String>,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EngineError {
    let what = what.into();
    move |source| ExportError::Io { what, source }.into()
}

/// An image ready to be written or pushed: its manifest and every blob it references.
#[derive(Debug, Clone)]
pub struct ExportedImage {
    /// The image's platform.
    pub platform: crate::graph::Platform,
    /// Its config's digest (the image id).
    pub config_digest: Digest,
    /// Its config's size in bytes.
    pub config_size: u64,
    /// The manifest, parsed.
    pub manifest: Manifest,
    /// The manifest's exact bytes (stored in the content store).
    pub manifest_bytes: Vec<u8>,
    /// Their digest.
    pub manifest_digest: Digest,
}

/// The result of exporting all platforms of a build.
#[derive(Debug, Clone)]
pub struct ExportedSet {
    /// One image per platform, in build order.
    pub images: Vec<ExportedImage>,
    /// For several platforms (or attestations, or annotations that live in an index): the
    /// index over them.
    pub index: Option<(Vec<u8>, Digest)>,
    /// The attestation manifests listed in the index (platform `unknown/unknown`), one per
    /// image, in the order of `images`.
    pub attestations: Vec<ExportedImage>,
    /// The annotations of the descriptor of what a tag points at (`index-descriptor:`, or
    /// `manifest-descriptor:` without an index): an OCI layout's `index.json` has them.
    pub top_annotations: Option<BTreeMap<String, String>>,
}

/// What image outputs add to a build's images besides layers and configs: annotations
/// and the provenance attestation.
#[derive(Debug, Clone, Default)]
pub struct ImageMeta {
    /// `--annotation`s.
    pub annotations: Annotations,
    /// The provenance to attach, if any.
    pub provenance: Option<Provenance>,
    /// The provenance is buildx's default (`inline-only`): an OCI archive carries it only
    /// when it holds an index anyway (several platforms), as BuildKit's OCI exporter does.
    pub inline_only: bool,
}

impl ImageMeta {
    /// What an OCI archive of `images` carries of this.
    pub(crate) fn for_archive(&self, images: usize) -> std::borrow::Cow<'_, ImageMeta> {
        if self.inline_only && self.provenance.is_some() && images < 2 && !self.annotations.need_index() {
            return std::borrow::Cow::Owned(ImageMeta { provenance: None, ..self.clone() });
        }
        std::borrow::Cow::Borrowed(self)
    }
}

impl ExportedSet {
    /// The digest a tag points at (the index for several platforms).
    pub fn top_digest(&self) -> &Digest {
        match &self.index {
            Some((_, d)) => d,
            None => &self.images[0].manifest_digest,
        }
    }
}

/// Where [`Engine::push_all`] shows its progress.
pub struct PushProgress<'a> {
    /// The build's progress sink.
    pub progress: &'a Progress,
    /// The vertex id of the first reference; the `i`-th is `first_vertex + i`.
    pub first_vertex: u32,
}

impl PushProgress<'_> {
    fn vertex(&self, i: usize) -> PushVertex<'_> {
        PushVertex { progress: self.progress, id: self.first_vertex.saturating_add(i as u32) }
    }
}

/// The vertex of one reference's push.
struct PushVertex<'a> {
    progress: &'a Progress,
    id: u32,
}

impl PushVertex<'_> {
    fn line(&self, text: &str) {
        self.progress.send(Event::Log { id: self.id, stream: 1, data: bytes::Bytes::from(format!("{text}\n")) });
    }
}

/// What a push to one reference did.
#[derive(Debug, Clone)]
pub struct PushOutcome {
    /// Where it pushed.
    pub reference: Reference,
    /// Blobs uploaded.
    pub blobs_uploaded: u64,
    /// Bytes of the uploaded blobs.
    pub bytes_uploaded: u64,
    /// Blobs the repository already had (HEAD).
    pub blobs_existed: u64,
    /// Blobs mounted from another repository of the same registry.
    pub blobs_mounted: u64,
    /// Manifests and indexes pushed.
    pub manifests: u64,
    /// Manifests and indexes the reference already named (HEAD): not pushed again.
    pub manifests_existed: u64,
    /// Wall time of the push.
    pub seconds: f64,
    /// Why the push failed (naming the reference, hence the registry).
    pub error: Option<String>,
}

impl Default for PushOutcome {
    fn default() -> Self {
        PushOutcome {
            reference: Reference { registry: String::new(), repository: String::new(), tag: None, digest: None },
            blobs_uploaded: 0,
            bytes_uploaded: 0,
            manifests_existed: 0,
            blobs_existed: 0,
            blobs_mounted: 0,
            manifests: 0,
            seconds: 0.0,
            error: None,
        }
    }
}

/// Ok when every push succeeded, else an error naming each failed reference and what the
/// others did.
pub fn push_result(outcomes: &[PushOutcome]) -> Result<(), EngineError> {
    let failed: Vec<String> = outcomes.iter().filter_map(|o| o.error.clone()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    let pushed = outcomes.iter().filter(|o| o.error.is_none()).map(|o| o.reference.to_string()).collect();
    Err(ExportError::Push { failed, pushed }.into())
}

impl Engine {
    /// A blob of layer `diff_id`: the original blob for a base layer (unless `force`), else
    /// one in `compression`, made now if it does not exist yet.
    pub async fn layer_blob(&self, diff_id: &Digest, compression: Compression, force: bool) -> Result<BlobRecord, EngineError> {
        let want = compression.media_type();
        let known = self.index().layer_blobs(diff_id)?;
        // A blob this node holds only in the fleet's shared tier serves as well: an output
        // that needs its bytes fetches it ([`Engine::push_all`]).
        let here = |b: &BlobRecord| self.store().contains(&b.digest);
        let usable = |b: &BlobRecord| here(b) || self.shared().is_some_and(|t| t.seen_recently(&b.digest));
        if let Some(b) = known.iter().find(|b| media::oci_layer(&b.media_type) == want && usable(b)) {
            return Ok(b.clone());
        }
        if !force {
            if let Some(b) = known.iter().find(|b| b.original && usable(b)) {
                return Ok(b.clone());
            }
        }
        let key = format!("blob:{diff_id}:{compression}");
        let engine = self.clone();
        let d = diff_id.clone();
        // A stored blob of the layer is re-compressed (its tar is the layer's exact bytes; an
        // extracted base layer re-tars differently); else the snapshot is tarred.
        let source = known.iter().find(|b| here(b)).map(|b| (b.digest.clone(), b.media_type.clone()));
        let (out, _) =
            self.inner
                .inflight
                .run(&key, &CancellationToken::new(), move |_| async move {
                    let store = engine.store().clone();
                    let dir = engine.snapshots().layer_dir(&d);
                    let source = match source {
                        None if !dir.is_dir() => {
                            // Held only as a blob elsewhere (the shared tier): fetched to re-compress.
                            let b = engine.stored_layer_blob(&d, None).await.map_err(Arc::new)?;
                            Some((b.digest, b.media_type))
                        }
                        s => s,
                    };
                    let d2 = d.clone();
                    let exported = tokio::task::spawn_blocking(move || match source {
                        Some((blob, media_type)) => {
                            recompress_blob(&store, &blob, &media_type, compression).map(|r| (r.diff_id, r.digest, r.size, r.media_type))
                        }
                        None => export_layer(&store, &dir, compression, &TarOptions::default())
                            .map(|l| (l.diff_id, l.digest, l.size, l.media_type)),
                    })
                    .await
                    .map_err(|e| Arc::new(e.into()))?
                    .map_err(|source| Arc::new(ExportError::Blob { diff_id: d2, source }.into()))?;
                    let (exported_diff_id, digest, size, media_type) = exported;
                    if exported_diff_id != d {
                        return Err(Arc::new(ExportError::LayerChanged { diff_id: d, now: exported_diff_id }.into()));
                    }
                    let rec = BlobRecord { digest, size, media_type, original: false };
                    engine.index().add_layer_blob(&d, rec).map_err(|e| Arc::new(e.into()))?;
                    Ok(Some(d))
                })
                .await;
        out.map_err(EngineError::Stage)?;
        let known = self.index().layer_blobs(diff_id)?;
        known.into_iter().find(|b| media::oci_layer(&b.media_type) == want).ok_or_else(|| ExportError::LayerMissing(diff_id.clone()).into())
    }

    /// Build manifests (and an index for several platforms) for `images`, making blobs as
    /// needed. Everything is stored in the content store.
    pub async fn export_images(&self, images: &[BuiltImage], compression: Compression, force: bool) -> Result<ExportedSet, EngineError> {
        self.export_images_with(images, compression, force, &ImageMeta::default(), &[]).await
    }

    /// [`Engine::export_images`] with `meta`'s annotations and attestations, for an image
    /// named `names` (the subjects of its attestations).
    pub async fn export_images_with(
        &self,
        images: &[BuiltImage],
        compression: Compression,
        force: bool,
        meta: &ImageMeta,
        names: &[String],
    ) -> Result<ExportedSet, EngineError> {
        let mut layers = Vec::new();
        for img in images {
            let mut of_image = Vec::new();
            for d in img.diff_ids() {
                let b = self.layer_blob(d, compression, force).await?;
                of_image.push(Descriptor {
                    media_type: media::oci_layer(&b.media_type).to_string(),
                    digest: b.digest,
                    size: b.size,
                    platform: None,
                    annotations: None,
                });
            }
            layers.push(of_image);
        }
        self.assemble(images, layers, meta, names)
    }

    /// Store the manifest of each image (with `layers[i]` for `images[i]`), its config and,
    /// for several platforms, an index over them.
    pub fn assemble_images(&self, images: &[BuiltImage], layers: Vec<Vec<Descriptor>>) -> Result<ExportedSet, EngineError> {
        self.assemble(images, layers, &ImageMeta::default(), &[])
    }

    /// [`Engine::assemble_images`] with `meta`'s annotations and attestations; an index is
    /// made for several platforms, for attestations and for annotations that live in one.
    /// The image manifests carry only their `manifest:` annotations: an attestation never
    /// changes them.
    fn assemble(
        &self,
        images: &[BuiltImage],
        layers: Vec<Vec<Descriptor>>,
        meta: &ImageMeta,
        names: &[String],
    ) -> Result<ExportedSet, EngineError> {
        use annotations::Level;
        let built: Vec<crate::graph::Platform> = images.iter().map(|i| i.platform.clone()).collect();
        meta.annotations.check_platforms(&built).map_err(OutputError::from)?;
        let mut out = Vec::new();
        for (img, layers) in images.iter().zip(layers) {
            let mut manifest = Manifest::oci(img.config_digest.clone(), img.config_bytes.len() as u64, layers);
            manifest.annotations = meta.annotations.at(Level::Manifest, Some(&img.platform));
            self.store().put(&img.config_bytes)?;
            out.push(self.store_manifest(img.platform.clone(), manifest)?);
        }
        let mut attestations = Vec::new();
        if let Some(p) = &meta.provenance {
            for (img, exported) in images.iter().zip(&out) {
                let statement = p.statement(names, &img.platform, &exported.manifest_digest, &img.materials);
                attestations.push(self.store_attestation(&statement, provenance::PREDICATE_TYPE)?);
            }
        }
        let index = if out.len() > 1 || !attestations.is_empty() || meta.annotations.need_index() {
            let images = out.iter().map(|e| Descriptor {
                media_type: media::OCI_MANIFEST.into(),
                digest: e.manifest_digest.clone(),
                size: e.manifest_bytes.len() as u64,
                platform: Some(e.platform.canonical()),
                annotations: meta.annotations.at(Level::ManifestDescriptor, Some(&e.platform)),
            });
            let attestations = attestations.iter().zip(&out).map(|(a, img)| Descriptor {
                media_type: media::OCI_MANIFEST.into(),
                digest: a.manifest_digest.clone(),
                size: a.manifest_bytes.len() as u64,
                platform: Some(a.platform.clone()),
                annotations: Some(BTreeMap::from([
                    (provenance::REFERENCE_DIGEST.to_string(), img.manifest_digest.to_string()),
                    (provenance::REFERENCE_TYPE.to_string(), provenance::ATTESTATION_MANIFEST.to_string()),
                ])),
            });
            let idx = Index {
                schema_version: 2,
                media_type: Some(media::OCI_INDEX.into()),
                manifests: images.chain(attestations).collect(),
                annotations: meta.annotations.at(Level::Index, None),
            };
            let bytes = serde_json::to_vec(&idx).map_err(ExportError::from)?;
            let d = self.store().put(&bytes)?;
            Some((bytes, d))
        } else {
            None
        };
        let top_annotations = match &index {
            Some(_) => meta.annotations.at(Level::IndexDescriptor, None),
            None => out.first().and_then(|e| meta.annotations.at(Level::ManifestDescriptor, Some(&e.platform))),
        };
        Ok(ExportedSet { images: out, index, attestations, top_annotations })
    }

    /// Store `manifest` (of an image of `platform`).
    fn store_manifest(&self, platform: crate::graph::Platform, manifest: Manifest) -> Result<ExportedImage, EngineError> {
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(ExportError::from)?;
        let manifest_digest = self.store().put(&manifest_bytes)?;
        Ok(ExportedImage {
            platform,
            config_digest: manifest.config.digest.clone(),
            config_size: manifest.config.size,
            manifest,
            manifest_bytes,
            manifest_digest,
        })
    }

    /// Store an in-toto `statement` as BuildKit stores attestations: a manifest of platform
    /// `unknown/unknown` whose config lists the statement as its one layer.
    fn store_attestation(&self, statement: &[u8], predicate_type: &str) -> Result<ExportedImage, EngineError> {
        let digest = self.store().put(statement)?;
        let unknown = crate::graph::Platform::new("unknown", "unknown", None);
        let config = hoist_oci::image::ImageConfig {
            architecture: unknown.architecture.clone(),
            os: unknown.os.clone(),
            rootfs: hoist_oci::image::RootFs { kind: "layers".into(), diff_ids: vec![digest.clone()] },
            ..Default::default()
        };
        let config_bytes = serde_json::to_vec(&config).map_err(ExportError::from)?;
        let config_digest = self.store().put(&config_bytes)?;
        let layer = Descriptor {
            media_type: provenance::MEDIA_TYPE.into(),
            digest,
            size: statement.len() as u64,
            platform: None,
            annotations: Some(BTreeMap::from([(provenance::PREDICATE_TYPE_ANNOTATION.to_string(), predicate_type.to_string())])),
        };
        self.store_manifest(unknown, Manifest::oci(config_digest, config_bytes.len() as u64, vec![layer]))
    }

    /// Push an exported set to every reference; returns an error listing each failed
    /// reference (the others still complete). See [`Engine::push_all`].
    pub async fn push(&self, set: &ExportedSet, references: &[Reference], registry: &RegistryClient) -> Result<(), EngineError> {
        let outcomes =
            self.push_all(set, references, registry, false, &PushProgress { progress: &Progress::discard(), first_vertex: 0 }).await;
        push_result(&outcomes)
    }

    /// Push an exported set to every reference and say what each push did (and show it:
    /// a vertex per reference, a line per blob).
    ///
    /// Registries are pushed to in parallel. Within one registry the first repository gets
    /// the blobs first and the other repositories then mount them from it (cross-repository
    /// mount), so no blob crosses the network twice to one registry. Each blob is checked
    /// with HEAD before it is uploaded; manifests go last. A failed reference does not stop
    /// the others. `by_digest`: push the manifests by digest only (no tag is moved).
    pub async fn push_all(
        &self,
        set: &ExportedSet,
        references: &[Reference],
        registry: &RegistryClient,
        by_digest: bool,
        shown: &PushProgress<'_>,
    ) -> Vec<PushOutcome> {
        // Registries in order of first appearance, each with its references.
        let mut groups: Vec<(String, Vec<(usize, Reference)>)> = Vec::new();
        for (i, r) in references.iter().enumerate() {
            match groups.iter_mut().find(|(reg, _)| *reg == r.registry) {
                Some((_, refs)) => refs.push((i, r.clone())),
                None => groups.push((r.registry.clone(), vec![(i, r.clone())])),
            }
        }
        let jobs = groups.into_iter().map(|(_, refs)| async move {
            let mut out = Vec::new();
            let mut refs = refs.into_iter();
            let Some((i, first)) = refs.next() else { return out };
            let first_outcome = self.push_one(set, first.clone(), None, registry.clone(), by_digest, shown.vertex(i)).await;
            let mount_from = first_outcome.error.is_none().then_some(first);
            out.push((i, first_outcome));
            let rest = refs.map(|(i, r)| {
                let mount_from = mount_from.clone();
                async move { (i, self.push_one(set, r, mount_from, registry.clone(), by_digest, shown.vertex(i)).await) }
            });
            out.extend(futures::future::join_all(rest).await);
            out
        });
        let mut all: Vec<(usize, PushOutcome)> = futures::future::join_all(jobs).await.into_iter().flatten().collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, o)| o).collect()
    }

    async fn push_one(
        &self,
        set: &ExportedSet,
        reference: Reference,
        mount_from: Option<Reference>,
        registry: RegistryClient,
        by_digest: bool,
        vertex: PushVertex<'_>,
    ) -> PushOutcome {
        let started = std::time::Instant::now();
        vertex.progress.send(Event::Started { id: vertex.id, name: format!("[push] pushing {reference}") });
        let mut outcome = PushOutcome { reference: reference.clone(), ..PushOutcome::default() };
        let result = self.push_one_inner(set, &reference, mount_from.as_ref(), &registry, by_digest, &mut outcome, &vertex).await;
        if let Err(e) = result {
            outcome.error = Some(format!("pushing {reference}: {e}"));
        }
        outcome.seconds = started.elapsed().as_secs_f64();
        vertex.progress.send(Event::Completed { id: vertex.id, cached: false, seconds: outcome.seconds, error: outcome.error.clone() });
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn push_one_inner(
        &self,
        set: &ExportedSet,
        reference: &Reference,
        mount_from: Option<&Reference>,
        registry: &RegistryClient,
        by_digest: bool,
        outcome: &mut PushOutcome,
        vertex: &PushVertex<'_>,
    ) -> Result<(), PushError> {
        let store = self.store();
        let mut blobs: BTreeMap<Digest, (u64, Option<&Descriptor>)> = BTreeMap::new();
        for img in &set.images {
            blobs.insert(img.config_digest.clone(), (img.config_size, None));
            for l in &img.manifest.layers {
                blobs.insert(l.digest.clone(), (l.size, Some(l)));
            }
        }
        // Attestation blobs (config, statement) are always in the store.
        for a in &set.attestations {
            blobs.insert(a.config_digest.clone(), (a.config_size, None));
            for l in &a.manifest.layers {
                blobs.insert(l.digest.clone(), (l.size, None));
            }
        }
        let uploads = blobs.iter().map(|(d, (size, layer))| async move {
            if let (Some(layer), false) = (layer, store.contains(d)) {
                // A layer this node holds only in the shared tier: fetched only if the
                // registry lacks it.
                if registry.blob_exists(reference, d).await? {
                    return Ok((BlobPush::Existed, *size));
                }
                self.fetch_shared_blob(layer).await.map_err(|e| PushError::Fetch(Box::new(e)))?;
            }
            let pushed = registry.ensure_blob(reference, d, *size, BlobSource::Store(store), mount_from).await?;
            let how = match pushed {
                BlobPush::Existed => "already there",
                BlobPush::Mounted => "mounted",
                BlobPush::Uploaded => "uploaded",
            };
            vertex.line(&format!("{how} {d} ({})", crate::limits::human_bytes(*size)));
            Ok((pushed, *size))
        });
        let mut first_error = None;
        for r in futures::future::join_all(uploads).await {
            match r {
                Ok((BlobPush::Existed, _)) => outcome.blobs_existed += 1,
                Ok((BlobPush::Mounted, _)) => outcome.blobs_mounted += 1,
                Ok((BlobPush::Uploaded, size)) => {
                    outcome.blobs_uploaded += 1;
                    outcome.bytes_uploaded += size;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let by_digest_ref = |d: &Digest| Reference { tag: None, digest: Some(d.clone()), ..reference.clone() };
        let mut count = |pushed: bool| {
            if pushed {
                outcome.manifests += 1;
            } else {
                outcome.manifests_existed += 1;
            }
        };
        for img in set.images.iter().chain(&set.attestations) {
            if set.index.is_some() || by_digest {
                let target = by_digest_ref(&img.manifest_digest);
                count(push_manifest_once(registry, &target, &img.manifest_bytes, Some(media::OCI_MANIFEST), &img.manifest_digest).await?);
            }
        }
        match &set.index {
            None if !by_digest => {
                let img = &set.images[0];
                count(push_manifest_once(registry, reference, &img.manifest_bytes, Some(media::OCI_MANIFEST), &img.manifest_digest).await?);
            }
            None => {}
            Some((bytes, d)) => {
                let target = if by_digest { by_digest_ref(d) } else { reference.clone() };
                count(push_manifest_once(registry, &target, bytes, None, d).await?);
            }
        }
        Ok(())
    }

    /// Write `image` as a `docker save` archive (what `docker load` reads) tagged `tags`
    /// (any reference form: they are named `repository:tag` as the engine names images).
    /// New layers go in uncompressed, base layers as their original blobs (docker load
    /// decompresses them). Blocking.
    pub fn write_docker_archive(&self, image: &BuiltImage, tags: &[String], out: impl Write) -> Result<(), EngineError> {
        let mut tar = tar::Builder::new(out);
        for d in image.diff_ids() {
            let path = archive::layer_path(d);
            let dir = self.snapshots().layer_dir(d);
            let original = self.index().layer_blobs(d)?.into_iter().find(|b| b.original && self.store().contains(&b.digest));
            match original {
                Some(b) => {
                    let f = self.store().open_blob(&b.digest)?;
                    append(&mut tar, &path, b.size, f)?;
                }
                None => {
                    // The tar header needs the size: the one recorded when the layer was
                    // made (counted once for a layer older than the record), then the bytes.
                    let size = self.layer_tar_size_blocking(d)?;
                    let (reader, mut writer) = os_pipe()?;
                    let dir2 = dir.clone();
                    let producer = std::thread::spawn(move || write_layer_tar(&dir2, &mut writer, &TarOptions::default()));
                    append(&mut tar, &path, size, reader)?;
                    let stats = producer
                        .join()
                        .map_err(|_| ExportError::WriterPanicked)?
                        .map_err(|source| ExportError::Tar { diff_id: d.clone(), source })?;
                    if stats.bytes != size {
                        return Err(ExportError::TarSizeChanged { diff_id: d.clone(), now: stats.bytes, recorded: size }.into());
                    }
                }
            }
        }
        let entry = archive::ArchiveImage::new(&image.config_digest, image.diff_ids(), tags).map_err(ExportError::from)?;
        append(&mut tar, &entry.config, image.config_bytes.len() as u64, image.config_bytes.as_slice())?;
        let bytes = archive::manifest_json(&[entry]).map_err(ExportError::from)?;
        append(&mut tar, "manifest.json", bytes.len() as u64, bytes.as_slice())?;
        tar.into_inner().map_err(io_err("finishing the archive"))?.flush().map_err(io_err("sending the archive"))?;
        Ok(())
    }

    /// Write an exported set as an OCI image layout tar (`oci-layout`, `index.json`,
    /// `blobs/sha256/...`), with `tags` as ref-name annotations. Blocking.
    pub fn write_oci_archive(&self, set: &ExportedSet, tags: &[String], out: impl Write) -> Result<(), EngineError> {
        let mut tar = tar::Builder::new(out);
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        append(&mut tar, "oci-layout", layout.len() as u64, &layout[..])?;
        let mut blobs: BTreeMap<Digest, ()> = BTreeMap::new();
        for img in set.images.iter().chain(&set.attestations) {
            blobs.insert(img.config_digest.clone(), ());
            blobs.insert(img.manifest_digest.clone(), ());
            for l in &img.manifest.layers {
                blobs.insert(l.digest.clone(), ());
            }
        }
        if let Some((_, d)) = &set.index {
            blobs.insert(d.clone(), ());
        }
        for d in blobs.keys() {
            let size = self.store().size(d)?.ok_or_else(|| ExportError::BlobMissing(d.clone()))?;
            let f = self.store().open_blob(d)?;
            append(&mut tar, &format!("blobs/sha256/{}", d.hex()), size, f)?;
        }
        let (media_type, digest, size) = match &set.index {
            Some((bytes, d)) => (media::OCI_INDEX, d.clone(), bytes.len() as u64),
            None => (media::OCI_MANIFEST, set.images[0].manifest_digest.clone(), set.images[0].manifest_bytes.len() as u64),
        };
        let top = set.top_annotations.clone();
        let entries: Vec<Descriptor> = if tags.is_empty() {
            vec![Descriptor { media_type: media_type.into(), digest, size, platform: None, annotations: top }]
        } else {
            tags.iter()
                .map(|t| {
                    let mut annotations = top.clone().unwrap_or_default();
                    annotations.insert("io.containerd.image.name".to_string(), t.clone());
                    annotations.insert("org.opencontainers.image.ref.name".to_string(), ref_name(t));
                    Descriptor {
                        media_type: media_type.into(),
                        digest: digest.clone(),
                        size,
                        platform: None,
                        annotations: Some(annotations),
                    }
                })
                .collect()
        };
        let index = Index { schema_version: 2, media_type: Some(media::OCI_INDEX.into()), manifests: entries, annotations: None };
        let bytes = serde_json::to_vec(&index).map_err(ExportError::from)?;
        append(&mut tar, "index.json", bytes.len() as u64, bytes.as_slice())?;
        tar.into_inner().map_err(io_err("finishing the archive"))?.flush().map_err(io_err("sending the archive"))?;
        Ok(())
    }

    /// Write the flattened root filesystem of `image` as a tar. Blocking.
    pub fn write_rootfs_tar(&self, image: &BuiltImage, out: impl Write) -> Result<(), EngineError> {
        let view = self.snapshots().view(image.diff_ids())?;
        write_layer_tar(view.merged(), out, &TarOptions::default()).map_err(ExportError::Rootfs)?;
        Ok(())
    }
}

/// Why a push to one reference failed.
#[derive(Debug, thiserror::Error)]
enum PushError {
    #[error(transparent)]
    Registry(#[from] hoist_oci::registry::RegistryError),
    /// Fetching a layer's blob from the shared tier to upload it.
    #[error("{0}")]
    Fetch(Box<EngineError>),
}

fn ref_name(tag: &str) -> String {
    match Reference::parse(tag) {
        Ok(r) => r.tag.clone().unwrap_or_else(|| "latest".into()),
        Err(_) => tag.to_string(),
    }
}

fn os_pipe() -> Result<(std::fs::File, std::fs::File), EngineError> {
    let (r, w) = rustix::pipe::pipe().map_err(|e| ExportError::Io { what: "making a pipe".into(), source: e.into() })?;
    Ok((std::fs::File::from(r), std::fs::File::from(w)))
}

fn append<W: Write>(tar: &mut tar::Builder<W>, path: &str, size: u64, data: impl io::Read) -> Result<(), EngineError> {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, path, data).map_err(io_err(format!("writing {path}")))
}

/// Push a manifest (`media_type`) or index (`None`) to `target` unless it already names
/// `digest` (HEAD): an unchanged image's push then makes no upload. A registry that cannot
/// answer the HEAD gets the push. Returns whether it pushed.
async fn push_manifest_once(
    registry: &RegistryClient,
    target: &Reference,
    bytes: &[u8],
    media_type: Option<&str>,
    digest: &Digest,
) -> Result<bool, hoist_oci::registry::RegistryError> {
    if registry.manifest_is(target, digest).await.unwrap_or(false) {
        return Ok(false);
    }
    match media_type {
        Some(m) => registry.push_manifest(target, bytes, m).await?,
        None => registry.push_index(target, bytes).await?,
    };
    Ok(true)
}
