//! The engine's side of the shared tier: a step's result shared after it ran, and an entry
//! found in the store made a local cache record (its layer fetched and extracted).

use std::sync::Arc;

use hoist_oci::compress::Compression;
use hoist_oci::digest::Digest;
use tokio_util::sync::CancellationToken;

use super::{BlobDesc, Entry, SharedError, WriteError};
use crate::cache::{BlobRecord, StepRecord};
use crate::engine::{Engine, EngineError};

impl Engine {
    /// Queue the result of step `key` of project `ns` for the shared tier: its layer's blob
    /// in `compression` (made now unless an output made it already), then its entry. Returns
    /// at once unless the write queue is full.
    pub(crate) async fn share_step(&self, ns: &str, key: &str, record: &StepRecord, compression: Compression) {
        let Some(tier) = self.shared().cloned() else { return };
        let (engine, ns, key, record) = (self.clone(), ns.to_string(), key.to_string(), record.clone());
        tier.clone()
            .write_behind(async move {
                let blob = match &record.diff_id {
                    Some(d) => {
                        let b = engine.layer_blob(d, compression, false).await?;
                        let desc = BlobDesc { digest: b.digest, size: b.size, media_type: b.media_type };
                        tier.put_blob(&desc, engine.store()).await?;
                        Some(desc)
                    }
                    None => None,
                };
                let entry = Entry { diff_id: record.diff_id, blob, created: record.created, size: record.size };
                tier.put_entry(&ns, &key, &entry).await?;
                Ok::<_, WriteError>(())
            })
            .await;
    }

    /// Put base image blob `blob` into the content store from the shared tier, when another
    /// node pulled it; false when this node must pull it itself.
    pub(crate) async fn base_blob_from_shared(&self, blob: &BlobDesc) -> bool {
        match self.shared() {
            Some(tier) => tier.try_fetch_blob(blob, self.store()).await,
            None => false,
        }
    }

    /// Queue base image blob `blob` (pulled from its registry) for the shared tier, so other
    /// nodes need not pull it.
    pub(crate) async fn share_base_blob(&self, blob: BlobDesc) {
        let Some(tier) = self.shared().cloned() else { return };
        let engine = self.clone();
        tier.clone().write_behind(async move { tier.put_blob(&blob, engine.store()).await }).await;
    }

    /// Make `entry` (found in the shared tier) usable here: its layer fetched and extracted
    /// unless this node has it. Concurrent imports of one layer (and pulls of it) run once.
    pub(crate) async fn import_entry(&self, entry: &Entry) -> Result<(), EngineError> {
        let (Some(diff_id), Some(blob)) = (&entry.diff_id, &entry.blob) else { return Ok(()) };
        if self.snapshots().has_layer(diff_id) {
            return Ok(());
        }
        let Some(tier) = self.shared().cloned() else {
            return Err(EngineError::Internal("an entry of a shared tier this engine does not have".into()));
        };
        let (engine, d, blob) = (self.clone(), diff_id.clone(), blob.clone());
        let key = format!("pull:{diff_id}");
        let (out, _) = self
            .inner
            .inflight
            .run(&key, &CancellationToken::new(), move |_| async move {
                let shared_err = |e: SharedError| Arc::new(EngineError::Shared(e));
                tier.fetch_blob(&blob, engine.store()).await.map_err(shared_err)?;
                let record = BlobRecord { digest: blob.digest.clone(), size: blob.size, media_type: blob.media_type, original: false };
                crate::images::unpack_layer(&engine, record, &d)
                    .await
                    .map_err(|e| shared_err(SharedError::Layer { blob: blob.digest, source: Box::new(e) }))?;
                Ok(Some(d))
            })
            .await;
        out.map(|_: Option<Digest>| ()).map_err(EngineError::Stage)
    }
}
