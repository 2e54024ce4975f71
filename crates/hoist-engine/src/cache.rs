//! The cache index (redb): which layer each op's cache key produced, which blobs exist for
//! each layer, and which manifest a tag resolved to. Lookups are by exact key; keys are
//! computed in [`crate::cachekey`].

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use hoist_oci::digest::Digest;
use redb::{ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

const STEPS: TableDefinition<&str, &[u8]> = TableDefinition::new("steps");
const LAYER_BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("layer_blobs");
const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");

/// Errors of the cache index.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache index {path}: {source}")]
    Db { path: String, source: redb::Error },
    #[error("cache index entry {key} is corrupt: {source}")]
    Corrupt { key: String, source: serde_json::Error },
}

/// What a cached step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The layer (diff_id) the step produced; `None` when its diff was empty.
    pub diff_id: Option<Digest>,
    /// Seconds since the epoch when the step ran.
    pub created: u64,
}

/// A stored blob of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    /// True for the blob a registry served for a base image layer (kept as is so that its
    /// digest stays the one engines and registries already know).
    pub original: bool,
}

/// A tag resolved earlier for a platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub manifest_digest: Digest,
    pub resolved: u64,
}

/// The persistent cache index.
pub struct CacheIndex {
    db: redb::Database,
    path: String,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl CacheIndex {
    /// Open or create the index at `path`.
    pub fn open(path: &Path) -> Result<CacheIndex, CacheError> {
        let p = path.display().to_string();
        let db = redb::Database::create(path).map_err(|e| CacheError::Db { path: p.clone(), source: e.into() })?;
        let idx = CacheIndex { db, path: p };
        // Create the tables so that readers never see "table does not exist".
        idx.write(|txn| {
            txn.open_table(STEPS)?;
            txn.open_table(LAYER_BLOBS)?;
            txn.open_table(TAGS)?;
            Ok(())
        })?;
        Ok(idx)
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> CacheError {
        CacheError::Db { path: self.path.clone(), source: e.into() }
    }

    fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>) -> Result<(), CacheError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        f(&txn).map_err(|e| self.db_err(e))?;
        txn.commit().map_err(|e| self.db_err(e))
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<Option<T>, CacheError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let t = txn.open_table(table).map_err(|e| self.db_err(e))?;
        let Some(v) = t.get(key).map_err(|e| self.db_err(e))? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(|source| CacheError::Corrupt { key: key.to_string(), source })
    }

    fn put<T: Serialize>(&self, table: TableDefinition<&str, &[u8]>, key: &str, value: &T) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec(value).map_err(|source| CacheError::Corrupt { key: key.to_string(), source })?;
        self.write(|txn| {
            txn.open_table(table)?.insert(key, bytes.as_slice())?;
            Ok(())
        })
    }

    /// The record of a step's cache key.
    pub fn step(&self, key: &str) -> Result<Option<StepRecord>, CacheError> {
        self.get(STEPS, key)
    }

    /// Record what a step produced.
    pub fn put_step(&self, key: &str, diff_id: Option<Digest>) -> Result<(), CacheError> {
        self.put(STEPS, key, &StepRecord { diff_id, created: now() })
    }

    /// Forget a step (its layer went missing).
    pub fn remove_step(&self, key: &str) -> Result<(), CacheError> {
        self.write(|txn| {
            txn.open_table(STEPS)?.remove(key)?;
            Ok(())
        })
    }

    /// Every blob known for a layer.
    pub fn layer_blobs(&self, diff_id: &Digest) -> Result<Vec<BlobRecord>, CacheError> {
        Ok(self.get(LAYER_BLOBS, diff_id.as_str())?.unwrap_or_default())
    }

    /// Remember a blob of a layer (idempotent).
    pub fn add_layer_blob(&self, diff_id: &Digest, blob: BlobRecord) -> Result<(), CacheError> {
        let mut blobs = self.layer_blobs(diff_id)?;
        if blobs.iter().any(|b| b.digest == blob.digest) {
            return Ok(());
        }
        blobs.push(blob);
        self.put(LAYER_BLOBS, diff_id.as_str(), &blobs)
    }

    /// The manifest a reference resolved to for a platform, if resolved before.
    pub fn tag(&self, reference: &str, platform: &str) -> Result<Option<TagRecord>, CacheError> {
        self.get(TAGS, &format!("{reference}|{platform}"))
    }

    /// Remember a resolution.
    pub fn put_tag(&self, reference: &str, platform: &str, manifest_digest: &Digest) -> Result<(), CacheError> {
        self.put(TAGS, &format!("{reference}|{platform}"), &TagRecord { manifest_digest: manifest_digest.clone(), resolved: now() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_blobs_and_tags_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.redb");
        let d = Digest::of(b"layer");
        {
            let idx = CacheIndex::open(&path).unwrap();
            assert_eq!(idx.step("k1").unwrap(), None);
            idx.put_step("k1", Some(d.clone())).unwrap();
            idx.put_step("k2", None).unwrap();
            let blob = BlobRecord { digest: Digest::of(b"gz"), size: 2, media_type: "x".into(), original: false };
            idx.add_layer_blob(&d, blob.clone()).unwrap();
            idx.add_layer_blob(&d, blob).unwrap();
            idx.put_tag("r/busybox:latest", "linux/amd64", &d).unwrap();
        }
        let idx = CacheIndex::open(&path).unwrap();
        assert_eq!(idx.step("k1").unwrap().unwrap().diff_id, Some(d.clone()));
        assert_eq!(idx.step("k2").unwrap().unwrap().diff_id, None);
        assert_eq!(idx.layer_blobs(&d).unwrap().len(), 1);
        assert_eq!(idx.tag("r/busybox:latest", "linux/amd64").unwrap().unwrap().manifest_digest, d);
        assert_eq!(idx.tag("r/busybox:latest", "linux/arm64").unwrap(), None);
        idx.remove_step("k1").unwrap();
        assert_eq!(idx.step("k1").unwrap(), None);
    }
}
