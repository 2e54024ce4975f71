//! The engine's side of the shared tier: a step's result shared after it ran, and an entry
//! found in the store made a local cache record (its layer fetched when needed:
//! [`crate::layers`]).

use hoist_oci::compress::Compression;

use super::{BlobDesc, Entry, WriteError};
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

    /// Queue base image blob `blob` (pulled from its registry) for the shared tier, so other
    /// nodes need not pull it.
    pub(crate) async fn share_base_blob(&self, blob: BlobDesc) {
        let Some(tier) = self.shared().cloned() else { return };
        let engine = self.clone();
        tier.clone().write_behind_background(async move { tier.put_blob(&blob, engine.store()).await }).await;
    }

    /// Make `entry` (found in the shared tier, its blob there) usable here: its layer's blob
    /// recorded, to be fetched and extracted only when a step or an output needs it.
    pub(crate) fn import_entry(&self, entry: &Entry) -> Result<(), EngineError> {
        let (Some(diff_id), Some(blob)) = (&entry.diff_id, &entry.blob) else { return Ok(()) };
        let record = BlobRecord { digest: blob.digest.clone(), size: blob.size, media_type: blob.media_type.clone(), original: false };
        self.index().add_layer_blob(diff_id, record)?;
        Ok(())
    }
}
