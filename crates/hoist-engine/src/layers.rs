//! Layers a node knows without holding their files. A layer is at hand when its snapshot is
//! here, or one of its blobs is in the content store or was seen in the fleet's shared
//! tier; its files are made (the blob fetched, then extracted) only when a step runs on it
//! or an output reads them. A base image's layer that is none of these comes from the
//! image's registry ([`LayerOrigins`]: per build, since they carry the build's credentials).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use hoist_oci::digest::Digest;
use hoist_oci::image::Descriptor;
use hoist_oci::reference::Reference;
use hoist_oci::registry::RegistryClient;
use tokio_util::sync::CancellationToken;

use crate::cache::BlobRecord;
use crate::engine::{Engine, EngineError};
use crate::export::ExportError;
use crate::images::ImageError;
use crate::shared::{BlobDesc, SharedError};

/// What a build's outputs need of the result's layers, so that the build fetches no more
/// than that ([`crate::BuildRequest::needs`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum LayerNeeds {
    /// Descriptors: each layer's blob may stay in the shared tier (a push fetches what the
    /// registry lacks; a build with no output needs nothing).
    Descriptors,
    /// A blob of each layer in the content store (a result kept for the project).
    Blobs,
    /// Each layer's files (archives, `--load`, the root filesystem).
    #[default]
    Files,
}

/// Where the layers of a build's base images can be pulled from.
#[derive(Default)]
pub(crate) struct LayerOrigins {
    map: Mutex<HashMap<Digest, Origin>>,
}

#[derive(Clone)]
pub(crate) struct Origin {
    registry: RegistryClient,
    reference: Reference,
    desc: Descriptor,
}

impl LayerOrigins {
    /// Layer `diff_id` is blob `desc` of image `reference` (read with `registry`).
    pub(crate) fn add(&self, diff_id: &Digest, registry: &RegistryClient, reference: &Reference, desc: &Descriptor) {
        let origin = Origin { registry: registry.clone(), reference: reference.clone(), desc: desc.clone() };
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(diff_id.clone(), origin);
    }

    fn get(&self, diff_id: &Digest) -> Option<Origin> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).get(diff_id).cloned()
    }
}

fn blob_desc(b: &BlobRecord) -> BlobDesc {
    BlobDesc { digest: b.digest.clone(), size: b.size, media_type: b.media_type.clone() }
}

impl Engine {
    /// Whether this node can make layer `diff_id`'s files without a build's help (see the
    /// module's doc). Asks nothing of the shared tier.
    pub fn layer_at_hand(&self, diff_id: &Digest) -> bool {
        if self.snapshots().has_layer(diff_id) {
            return true;
        }
        let blobs = self.index().layer_blobs(diff_id).unwrap_or_default();
        blobs.iter().any(|b| self.store().contains(&b.digest) || self.shared().is_some_and(|t| t.seen_recently(&b.digest)))
    }

    /// Make the files of each of `diffs` that has no snapshot here: extracted from a blob in
    /// the content store, else fetched from the shared tier, else (a base layer) pulled from
    /// its image's registry. Concurrent calls for one layer do the work once. Returns how
    /// many layers were made.
    pub(crate) async fn ensure_layers(
        &self,
        diffs: &[Digest],
        origins: Option<&LayerOrigins>,
        cancel: &CancellationToken,
    ) -> Result<usize, EngineError> {
        let missing: BTreeSet<&Digest> = diffs.iter().filter(|d| !self.snapshots().has_layer(d)).collect();
        let jobs = missing.iter().map(|d| self.ensure_layer(d, origins.and_then(|o| o.get(d)), cancel));
        for r in futures::future::join_all(jobs).await {
            r?;
        }
        Ok(missing.len())
    }

    /// [`Engine::ensure_layers`] for an output: no build, so no registry to pull from.
    pub async fn ensure_output_layers(&self, diffs: &[Digest]) -> Result<usize, EngineError> {
        self.ensure_layers(diffs, None, &CancellationToken::new()).await
    }

    async fn ensure_layer(&self, diff_id: &Digest, origin: Option<Origin>, cancel: &CancellationToken) -> Result<(), EngineError> {
        let (engine, d) = (self.clone(), diff_id.clone());
        let (out, _) = self
            .inner
            .inflight
            .run(&format!("pull:{diff_id}"), cancel, move |stop| async move {
                let work = async {
                    let record = engine.stored_layer_blob(&d, origin.as_ref()).await.map_err(Arc::new)?;
                    let blob = record.digest.clone();
                    crate::images::unpack_layer(&engine, record, &d).await.map_err(|e| {
                        let source = ImageError::Layer { blob: blob.clone(), source: Box::new(e) };
                        Arc::new(match &origin {
                            Some(o) => EngineError::Image { reference: o.reference.to_string(), source: Box::new(source) },
                            None => SharedError::Layer { blob, source: Box::new(source) }.into(),
                        })
                    })?;
                    Ok(Some(d.clone()))
                };
                // Nobody waits any more (a prefetch the build no longer needs): stop.
                tokio::select! {
                    out = work => out,
                    _ = stop.cancelled() => Err(Arc::new(EngineError::Cancelled)),
                }
            })
            .await;
        out.map(|_| ()).map_err(EngineError::Stage)
    }

    /// A blob of layer `diff_id` in the content store: one there, else one fetched from the
    /// shared tier, else the base layer's blob pulled from `origin` (and shared for the
    /// fleet).
    pub(crate) async fn stored_layer_blob(&self, diff_id: &Digest, origin: Option<&Origin>) -> Result<BlobRecord, EngineError> {
        let known = self.index().layer_blobs(diff_id)?;
        if let Some(b) = known.iter().find(|b| self.store().contains(&b.digest)) {
            return Ok(b.clone());
        }
        if let Some(tier) = self.shared() {
            for b in &known {
                if tier.try_fetch_blob(&blob_desc(b), self.store()).await {
                    return Ok(b.clone());
                }
            }
        }
        let Some(o) = origin else { return Err(ExportError::LayerMissing(diff_id.clone()).into()) };
        let record = BlobRecord { digest: o.desc.digest.clone(), size: o.desc.size, media_type: o.desc.media_type.clone(), original: true };
        self.inner.images.fetch_blob(&o.registry, &o.reference, &o.desc.digest, self.store()).await.map_err(|e| {
            let source = ImageError::Layer { blob: o.desc.digest.clone(), source: Box::new(e.into()) };
            EngineError::Image { reference: o.reference.to_string(), source: Box::new(source) }
        })?;
        self.index().add_layer_blob(diff_id, record.clone())?;
        self.share_base_blob(blob_desc(&record)).await;
        Ok(record)
    }

    /// Make each of `diffs` what `needs` asks: its files; a blob of it stored here; or at
    /// least at hand, or in the shared tier (asked, in parallel), so that an output can
    /// have it after the build (a base layer that is neither is pulled from its registry).
    pub(crate) async fn provide_layers(
        &self,
        diffs: &[Digest],
        needs: LayerNeeds,
        origins: &LayerOrigins,
        cancel: &CancellationToken,
    ) -> Result<(), EngineError> {
        if needs == LayerNeeds::Files {
            return self.ensure_layers(diffs, Some(origins), cancel).await.map(|_| ());
        }
        let wanted: BTreeSet<&Digest> = diffs.iter().collect();
        let jobs = wanted.into_iter().map(|d| async move {
            if self.snapshots().has_layer(d) {
                return Ok(());
            }
            let known = self.index().layer_blobs(d)?;
            if known.iter().any(|b| self.store().contains(&b.digest)) {
                return Ok(());
            }
            if needs == LayerNeeds::Descriptors {
                if let Some(tier) = self.shared() {
                    for b in &known {
                        if tier.knows_blob(&b.digest).await {
                            return Ok(());
                        }
                    }
                }
            }
            self.stored_layer_blob(d, origins.get(d).as_ref()).await.map(|_| ())
        });
        for r in futures::future::join_all(jobs).await {
            r?;
        }
        Ok(())
    }

    /// Put blob `desc` into the content store from the shared tier (an output needs bytes
    /// of a layer this node holds only there).
    pub(crate) async fn fetch_shared_blob(&self, desc: &Descriptor) -> Result<(), EngineError> {
        let tier = self.shared().ok_or_else(|| ExportError::BlobMissing(desc.digest.clone()))?;
        let blob = BlobDesc { digest: desc.digest.clone(), size: desc.size, media_type: desc.media_type.clone() };
        tier.fetch_blob(&blob, self.store()).await.map_err(EngineError::from)
    }
}
