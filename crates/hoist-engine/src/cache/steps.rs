//! The build cache's records: what each step's cache key produced, the base images a
//! project pulled, the blobs and tar sizes of layers, resolved tags, and what COPY read from
//! known contexts.

use hoist_oci::digest::Digest;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{nskey, CacheError, CacheIndex, LAYER_BLOBS, LAYER_TARS, PULLS, SOURCES, STEPS, TAGS};

/// What a cached step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The layer (diff_id) the step produced; `None` when its diff was empty.
    pub diff_id: Option<Digest>,
    /// Seconds since the epoch when the step ran.
    pub created: u64,
    /// Last time a build used it.
    #[serde(default)]
    pub last_used: u64,
    /// Size of the layer (uncompressed tar bytes).
    #[serde(default)]
    pub size: u64,
}

/// A base image a project pulled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRecord {
    /// The image's layers (diff_ids), bottom first.
    pub layers: Vec<Digest>,
    /// Bytes of its layer blobs.
    pub size: u64,
    /// When a build last used the image.
    pub last_used: u64,
}

/// A stored blob of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    /// The blob's digest (compressed bytes as stored and pushed).
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Its layer media type (gzip, zstd or plain tar).
    pub media_type: String,
    /// True for the blob a registry served for a base image layer (kept as is so that its
    /// digest stays the one engines and registries already know).
    pub original: bool,
}

/// A tag resolved earlier for a platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    /// The platform manifest the tag named.
    pub manifest_digest: Digest,
    /// When it was resolved (seconds since the epoch).
    pub resolved: u64,
}

impl CacheIndex {
    /// The record of a step's cache key in a namespace.
    pub fn step(&self, ns: &str, key: &str) -> Result<Option<StepRecord>, CacheError> {
        self.get(STEPS, &nskey(ns, key))
    }

    /// Record what a step produced, now; the record is returned. Its `created` is the
    /// layer's time in images.
    pub fn put_step(&self, ns: &str, key: &str, diff_id: Option<Digest>, size: u64) -> Result<StepRecord, CacheError> {
        let t = self.now();
        let record = StepRecord { diff_id, created: t, last_used: t, size };
        self.put_step_record(ns, key, &record)?;
        Ok(record)
    }

    /// Record what a step produced as another node recorded it (its time kept).
    pub fn put_step_record(&self, ns: &str, key: &str, record: &StepRecord) -> Result<(), CacheError> {
        self.put(STEPS, &nskey(ns, key), record)
    }

    /// The source digest a COPY computed earlier for the same sources of the same context.
    pub fn source_digest(&self, ns: &str, key: &str) -> Result<Option<Digest>, CacheError> {
        self.get(SOURCES, &nskey(ns, key))
    }

    /// Remember a COPY's source digest (see [`CacheIndex::source_digest`]).
    pub fn put_source_digest(&self, ns: &str, key: &str, digest: &Digest) -> Result<(), CacheError> {
        self.put(SOURCES, &nskey(ns, key), digest)
    }

    /// Forget a step (its layer went missing).
    pub fn remove_step(&self, ns: &str, key: &str) -> Result<(), CacheError> {
        let k = nskey(ns, key);
        self.write(|txn| {
            txn.open_table(STEPS)?.remove(k.as_str())?;
            Ok(())
        })
    }

    /// Mark steps and pulls as used now, in one transaction.
    pub fn touch(&self, ns: &str, steps: &[String], pulls: &[String]) -> Result<(), CacheError> {
        if steps.is_empty() && pulls.is_empty() {
            return Ok(());
        }
        let t = self.now();
        self.write(|txn| {
            for (table, keys) in [(STEPS, steps), (PULLS, pulls)] {
                let mut tab = txn.open_table(table)?;
                for key in keys {
                    let k = nskey(ns, key);
                    let updated = match tab.get(k.as_str())? {
                        Some(v) => {
                            let mut val: serde_json::Value = serde_json::from_slice(v.value()).unwrap_or_default();
                            val["last_used"] = serde_json::json!(t);
                            serde_json::to_vec(&val).ok()
                        }
                        None => None,
                    };
                    if let Some(bytes) = updated {
                        tab.insert(k.as_str(), bytes.as_slice())?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Record that a project uses a pulled base image.
    pub fn put_pull(&self, ns: &str, manifest_digest: &str, layers: Vec<Digest>, size: u64) -> Result<(), CacheError> {
        self.put(PULLS, &nskey(ns, manifest_digest), &PullRecord { layers, size, last_used: self.now() })
    }

    /// Every blob known for a layer.
    pub fn layer_blobs(&self, diff_id: &Digest) -> Result<Vec<BlobRecord>, CacheError> {
        Ok(self.get(LAYER_BLOBS, diff_id.as_str())?.unwrap_or_default())
    }

    /// Every layer with a blob recorded (fetched or not).
    pub fn blob_layers(&self) -> Result<Vec<Digest>, CacheError> {
        Ok(self.scan::<Vec<BlobRecord>>(LAYER_BLOBS, None)?.into_iter().filter_map(|(k, _)| k.parse().ok()).collect())
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

    /// Forget every blob of a layer and its tar size (GC).
    pub fn remove_layer_blobs(&self, diff_id: &Digest) -> Result<(), CacheError> {
        self.write(|txn| {
            txn.open_table(LAYER_BLOBS)?.remove(diff_id.as_str())?;
            txn.open_table(LAYER_TARS)?.remove(diff_id.as_str())?;
            Ok(())
        })
    }

    /// The size of a layer's plain tar (what its diff_id hashes), when it was recorded.
    pub fn layer_tar_size(&self, diff_id: &Digest) -> Result<Option<u64>, CacheError> {
        self.get(LAYER_TARS, diff_id.as_str())
    }

    /// Record the size of a layer's plain tar (the pass that computed its diff_id counted it),
    /// so that serving the layer uncompressed needs no pass to learn its size.
    pub fn put_layer_tar_size(&self, diff_id: &Digest, size: u64) -> Result<(), CacheError> {
        self.put(LAYER_TARS, diff_id.as_str(), &size)
    }

    /// The manifest a reference resolved to for a platform in a namespace.
    pub fn tag(&self, ns: &str, reference: &str, platform: &str) -> Result<Option<TagRecord>, CacheError> {
        self.get(TAGS, &nskey(ns, &format!("{reference}|{platform}")))
    }

    /// Remember a resolution.
    pub fn put_tag(&self, ns: &str, reference: &str, platform: &str, manifest_digest: &Digest) -> Result<(), CacheError> {
        self.put(
            TAGS,
            &nskey(ns, &format!("{reference}|{platform}")),
            &TagRecord { manifest_digest: manifest_digest.clone(), resolved: self.now() },
        )
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
            assert_eq!(idx.step("p", "k1").unwrap(), None);
            idx.put_step("p", "k1", Some(d.clone()), 10).unwrap();
            idx.put_step("p", "k2", None, 0).unwrap();
            let blob = BlobRecord { digest: Digest::of(b"gz"), size: 2, media_type: "x".into(), original: false };
            idx.add_layer_blob(&d, blob.clone()).unwrap();
            idx.add_layer_blob(&d, blob).unwrap();
            idx.put_tag("p", "r/busybox:latest", "linux/amd64", &d).unwrap();
        }
        let idx = CacheIndex::open(&path).unwrap();
        assert_eq!(idx.step("p", "k1").unwrap().unwrap().diff_id, Some(d.clone()));
        assert_eq!(idx.step("p", "k2").unwrap().unwrap().diff_id, None);
        assert_eq!(idx.step("other", "k1").unwrap(), None, "namespaces are separate");
        assert_eq!(idx.layer_blobs(&d).unwrap().len(), 1);
        assert_eq!(idx.tag("p", "r/busybox:latest", "linux/amd64").unwrap().unwrap().manifest_digest, d);
        assert_eq!(idx.tag("other", "r/busybox:latest", "linux/amd64").unwrap(), None);
        idx.remove_step("p", "k1").unwrap();
        assert_eq!(idx.step("p", "k1").unwrap(), None);
    }

    #[test]
    fn a_layers_tar_size_persists_and_goes_with_its_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.redb");
        let d = Digest::of(b"layer");
        {
            let idx = CacheIndex::open(&path).unwrap();
            assert_eq!(idx.layer_tar_size(&d).unwrap(), None);
            idx.put_layer_tar_size(&d, 3072).unwrap();
            idx.add_layer_blob(&d, BlobRecord { digest: Digest::of(b"gz"), size: 2, media_type: "x".into(), original: false }).unwrap();
        }
        let idx = CacheIndex::open(&path).unwrap();
        assert_eq!(idx.layer_tar_size(&d).unwrap(), Some(3072));
        assert_eq!(idx.layer_tar_size(&Digest::of(b"other")).unwrap(), None);
        idx.remove_layer_blobs(&d).unwrap();
        assert_eq!(idx.layer_tar_size(&d).unwrap(), None, "GC forgets it with the layer");
        assert!(idx.layer_blobs(&d).unwrap().is_empty());
    }

    #[test]
    fn touch_updates_last_used_only() {
        let dir = tempfile::tempdir().unwrap();
        let idx = CacheIndex::open(&dir.path().join("c.redb")).unwrap();
        idx.put_step("p", "k", Some(Digest::of(b"x")), 3).unwrap();
        let before = idx.step("p", "k").unwrap().unwrap();
        idx.touch("p", &["k".to_string(), "missing".to_string()], &[]).unwrap();
        let after = idx.step("p", "k").unwrap().unwrap();
        assert_eq!(after.diff_id, before.diff_id);
        assert_eq!(after.size, 3);
        assert!(after.last_used >= before.last_used);
        assert_eq!(idx.step("p", "missing").unwrap(), None);
    }
}
