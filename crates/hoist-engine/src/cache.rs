//! The cache index (redb): which layer each op's cache key produced, which base images a
//! project pulled, which blobs exist for each layer, which manifest a tag resolved to, and
//! the project's build records, the images a project saved (`--save`) for `hoist pull`, and
//! what COPY steps read from known contexts (so an unchanged context is not walked again).
//! Everything a project owns is keyed `<project>\0<key>`, so a project's share can be
//! listed, pruned least-recently-used first, or reset.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hoist_oci::digest::Digest;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const STEPS: TableDefinition<&str, &[u8]> = TableDefinition::new("steps");
const PULLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pulls");
const LAYER_BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("layer_blobs");
/// diff_id → bytes of the layer's plain tar, counted when its diff_id was computed.
const LAYER_TARS: TableDefinition<&str, &[u8]> = TableDefinition::new("layer_tars");
const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");
const BUILDS: TableDefinition<&str, &[u8]> = TableDefinition::new("builds");
const SAVED: TableDefinition<&str, &[u8]> = TableDefinition::new("saved");
/// What a COPY reads from a given context: (op's sources, context digest) → source digest.
const SOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("sources");

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
    pub layers: Vec<Digest>,
    /// Bytes of its layer blobs.
    pub size: u64,
    pub last_used: u64,
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

/// One platform's image of a saved result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedImage {
    /// `os/arch[/variant]`.
    pub platform: String,
    /// The image config (kept in the content store).
    pub config_digest: Digest,
}

/// A result a project kept on the builder with `--save`, for `hoist pull`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRecord {
    pub build_id: String,
    /// The build's tags (`hoist pull TAG` finds the newest record with it).
    pub tags: Vec<String>,
    pub images: Vec<SavedImage>,
    /// Every layer of every image, with its (approximate, uncompressed) size.
    pub layers: Vec<(Digest, u64)>,
    pub created: u64,
    pub last_used: u64,
}

/// A project's share of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Distinct layers referenced by the project's records, with their sizes.
    pub layers: BTreeMap<Digest, u64>,
    pub records: u64,
}

impl Usage {
    /// Total bytes of the referenced layers.
    pub fn layer_bytes(&self) -> u64 {
        self.layers.values().sum()
    }
}

/// One record of a project (for LRU pruning).
#[derive(Debug, Clone)]
pub struct RecordRef {
    pub table: &'static str,
    pub key: String,
    pub last_used: u64,
    pub layers: Vec<(Digest, u64)>,
}

/// The persistent cache index.
pub struct CacheIndex {
    db: redb::Database,
    path: String,
    clock: Arc<dyn Clock>,
}

/// Seconds since the epoch, by the system clock.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Where the engine reads the time its records carry (when a step was made, last used, a
/// tag resolved): the system clock in a builder, a [`ManualClock`] in tests of what the
/// times decide (least-recently-used collection, the times in images).
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    /// A clock that reads `secs`.
    pub fn at(secs: u64) -> ManualClock {
        ManualClock(secs.into())
    }

    /// Move the clock `secs` forward.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn nskey(ns: &str, key: &str) -> String {
    format!("{ns}\0{key}")
}

fn prefix_end(ns: &str) -> (String, String) {
    (format!("{ns}\0"), format!("{ns}\u{1}"))
}

impl CacheIndex {
    /// Open or create the index at `path`, with the system clock.
    pub fn open(path: &Path) -> Result<CacheIndex, CacheError> {
        Self::open_with_clock(path, Arc::new(SystemClock))
    }

    /// Open or create the index at `path`; record times come from `clock`.
    pub fn open_with_clock(path: &Path, clock: Arc<dyn Clock>) -> Result<CacheIndex, CacheError> {
        let p = path.display().to_string();
        let db = redb::Database::create(path).map_err(|e| CacheError::Db { path: p.clone(), source: e.into() })?;
        let idx = CacheIndex { db, path: p, clock };
        // Create the tables so that readers never see "table does not exist".
        idx.write(|txn| {
            for t in [STEPS, PULLS, LAYER_BLOBS, LAYER_TARS, TAGS, BUILDS, SAVED, SOURCES] {
                txn.open_table(t)?;
            }
            Ok(())
        })?;
        Ok(idx)
    }

    /// The time by the index's clock (seconds since the epoch).
    pub fn now(&self) -> u64 {
        self.clock.now()
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
        serde_json::from_slice(v.value()).map(Some).map_err(|source| CacheError::Corrupt { key: key.replace('\0', "/"), source })
    }

    fn put<T: Serialize>(&self, table: TableDefinition<&str, &[u8]>, key: &str, value: &T) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec(value).map_err(|source| CacheError::Corrupt { key: key.to_string(), source })?;
        self.write(|txn| {
            txn.open_table(table)?.insert(key, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Every (key, value) of a namespace in a table.
    fn scan<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        ns: Option<&str>,
    ) -> Result<Vec<(String, T)>, CacheError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let t = txn.open_table(table).map_err(|e| self.db_err(e))?;
        let mut out = Vec::new();
        let iter = match ns {
            Some(ns) => {
                let (a, b) = prefix_end(ns);
                t.range(a.as_str()..b.as_str()).map_err(|e| self.db_err(e))?
            }
            None => t.iter().map_err(|e| self.db_err(e))?,
        };
        for item in iter {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            // A corrupt entry is skipped rather than failing every listing.
            if let Ok(val) = serde_json::from_slice(v.value()) {
                out.push((k.value().to_string(), val));
            }
        }
        Ok(out)
    }

    /// The record of a step's cache key in a namespace.
    pub fn step(&self, ns: &str, key: &str) -> Result<Option<StepRecord>, CacheError> {
        self.get(STEPS, &nskey(ns, key))
    }

    /// Record what a step produced. Its `created` is the layer's time in images.
    pub fn put_step(&self, ns: &str, key: &str, diff_id: Option<Digest>, size: u64) -> Result<(), CacheError> {
        let t = self.now();
        self.put(STEPS, &nskey(ns, key), &StepRecord { diff_id, created: t, last_used: t, size })
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

    /// The namespace's records with the layers they keep, for pruning and usage.
    pub fn records(&self, ns: &str) -> Result<Vec<RecordRef>, CacheError> {
        let mut out = Vec::new();
        for (k, r) in self.scan::<StepRecord>(STEPS, Some(ns))? {
            out.push(RecordRef {
                table: "steps",
                key: k,
                last_used: r.last_used.max(r.created),
                layers: r.diff_id.map(|d| vec![(d, r.size)]).unwrap_or_default(),
            });
        }
        for (k, r) in self.scan::<PullRecord>(PULLS, Some(ns))? {
            let per = if r.layers.is_empty() { 0 } else { r.size / r.layers.len() as u64 };
            out.push(RecordRef {
                table: "pulls",
                key: k,
                last_used: r.last_used,
                layers: r.layers.into_iter().map(|d| (d, per)).collect(),
            });
        }
        for (k, r) in self.scan::<SavedRecord>(SAVED, Some(ns))? {
            out.push(RecordRef { table: "saved", key: k, last_used: r.last_used.max(r.created), layers: r.layers });
        }
        Ok(out)
    }

    /// A project's share of the cache.
    pub fn usage(&self, ns: &str) -> Result<Usage, CacheError> {
        let mut u = Usage::default();
        for r in self.records(ns)? {
            u.records += 1;
            for (d, size) in r.layers {
                let e = u.layers.entry(d).or_insert(0);
                *e = (*e).max(size);
            }
        }
        Ok(u)
    }

    /// Delete records (from [`CacheIndex::records`]) in one transaction.
    pub fn remove_records(&self, records: &[RecordRef]) -> Result<(), CacheError> {
        self.write(|txn| {
            let mut steps = txn.open_table(STEPS)?;
            let mut pulls = txn.open_table(PULLS)?;
            let mut saved = txn.open_table(SAVED)?;
            for r in records {
                let table = match r.table {
                    "steps" => &mut steps,
                    "saved" => &mut saved,
                    _ => &mut pulls,
                };
                table.remove(r.key.as_str())?;
            }
            Ok(())
        })
    }

    /// Remove everything a namespace owns in the index (records, tags, saved images).
    pub fn reset(&self, ns: &str) -> Result<u64, CacheError> {
        let (a, b) = prefix_end(ns);
        let mut n = 0;
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        for table in [STEPS, PULLS, TAGS, SAVED, SOURCES] {
            let mut t = txn.open_table(table).map_err(|e| self.db_err(e))?;
            let keys: Vec<String> = t
                .range(a.as_str()..b.as_str())
                .map_err(|e| self.db_err(e))?
                .filter_map(|i| i.ok().map(|(k, _)| k.value().to_string()))
                .collect();
            for k in keys {
                t.remove(k.as_str()).map_err(|e| self.db_err(e))?;
                n += 1;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(n)
    }

    /// Every layer any namespace's records keep.
    pub fn referenced_layers(&self) -> Result<BTreeSet<Digest>, CacheError> {
        let mut out = BTreeSet::new();
        for (_, r) in self.scan::<StepRecord>(STEPS, None)? {
            if let Some(d) = r.diff_id {
                out.insert(d);
            }
        }
        for (_, r) in self.scan::<PullRecord>(PULLS, None)? {
            out.extend(r.layers);
        }
        for (_, r) in self.scan::<SavedRecord>(SAVED, None)? {
            out.extend(r.layers.into_iter().map(|(d, _)| d));
        }
        Ok(out)
    }

    /// Store a build record (opaque JSON) of a namespace under a sortable id.
    pub fn put_build(&self, ns: &str, id: &str, record: &serde_json::Value) -> Result<(), CacheError> {
        self.put(BUILDS, &nskey(ns, id), record)
    }

    /// A namespace's build records, newest first.
    pub fn builds(&self, ns: &str, limit: usize) -> Result<Vec<serde_json::Value>, CacheError> {
        let mut all = self.scan::<serde_json::Value>(BUILDS, Some(ns))?;
        all.reverse();
        all.truncate(limit);
        Ok(all.into_iter().map(|(_, v)| v).collect())
    }

    /// Forget build records of a namespace.
    pub fn remove_builds(&self, ns: &str, ids: &[String]) -> Result<(), CacheError> {
        self.write(|txn| {
            let mut t = txn.open_table(BUILDS)?;
            for id in ids {
                t.remove(nskey(ns, id).as_str())?;
            }
            Ok(())
        })
    }

    /// One build record of a namespace.
    pub fn build(&self, ns: &str, id: &str) -> Result<Option<serde_json::Value>, CacheError> {
        self.get(BUILDS, &nskey(ns, id))
    }

    /// Keep a saved result of a namespace (keyed by its build id).
    pub fn put_saved(&self, ns: &str, record: &SavedRecord) -> Result<(), CacheError> {
        self.put(SAVED, &nskey(ns, &record.build_id), record)
    }

    /// A namespace's saved result named `name`: a build id, or a tag (the newest record
    /// with it). Other namespaces' records are never found.
    pub fn find_saved(&self, ns: &str, name: &str) -> Result<Option<SavedRecord>, CacheError> {
        if let Some(r) = self.get::<SavedRecord>(SAVED, &nskey(ns, name))? {
            return Ok(Some(r));
        }
        let mut all = self.scan::<SavedRecord>(SAVED, Some(ns))?;
        // Build ids sort by time: the last match is the newest.
        all.reverse();
        Ok(all.into_iter().map(|(_, r)| r).find(|r| r.tags.iter().any(|t| tag_matches(t, name))))
    }

    /// Mark a saved result as used now (it is then pruned last).
    pub fn touch_saved(&self, ns: &str, build_id: &str) -> Result<(), CacheError> {
        if let Some(mut r) = self.get::<SavedRecord>(SAVED, &nskey(ns, build_id))? {
            r.last_used = self.now();
            self.put(SAVED, &nskey(ns, build_id), &r)?;
        }
        Ok(())
    }
}

/// Whether a saved tag answers to `name`: equal, or equal once both are normalized
/// (`app` = `docker.io/library/app:latest`).
fn tag_matches(tag: &str, name: &str) -> bool {
    if tag == name {
        return true;
    }
    match (hoist_oci::reference::Reference::parse(tag), hoist_oci::reference::Reference::parse(name)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
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
    fn usage_records_reset_and_references() {
        let dir = tempfile::tempdir().unwrap();
        let idx = CacheIndex::open(&dir.path().join("c.redb")).unwrap();
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        idx.put_step("p1", "s1", Some(a.clone()), 100).unwrap();
        idx.put_step("p1", "s2", Some(a.clone()), 100).unwrap();
        idx.put_pull("p1", "sha256:m", vec![b.clone()], 50).unwrap();
        idx.put_step("p2", "s1", Some(c.clone()), 7).unwrap();
        // A prefix that is a prefix of another namespace's name must not leak into it.
        idx.put_step("p10", "s1", Some(c.clone()), 7).unwrap();
        let u = idx.usage("p1").unwrap();
        assert_eq!(u.records, 3);
        assert_eq!(u.layer_bytes(), 150, "a layer counted once");
        assert_eq!(idx.usage("p2").unwrap().layer_bytes(), 7);
        idx.put_build("p1", "0001-x", &serde_json::json!({"id": "x"})).unwrap();
        idx.put_build("p1", "0002-y", &serde_json::json!({"id": "y"})).unwrap();
        let builds = idx.builds("p1", 10).unwrap();
        assert_eq!(builds[0]["id"], "y", "newest first");
        assert!(idx.builds("p2", 10).unwrap().is_empty());
        assert_eq!(idx.referenced_layers().unwrap().len(), 3);
        assert_eq!(idx.reset("p1").unwrap(), 3);
        assert_eq!(idx.usage("p1").unwrap().records, 0);
        assert!(!idx.referenced_layers().unwrap().contains(&a));
        assert_eq!(idx.usage("p10").unwrap().records, 1);
    }

    #[test]
    fn saved_results_are_found_by_id_or_tag_count_as_records_and_stay_in_their_project() {
        let dir = tempfile::tempdir().unwrap();
        let idx = CacheIndex::open(&dir.path().join("c.redb")).unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let rec = |id: &str, tag: &str, layers: Vec<(Digest, u64)>| SavedRecord {
            build_id: id.into(),
            tags: vec![tag.into()],
            images: vec![SavedImage { platform: "linux/amd64".into(), config_digest: Digest::of(id.as_bytes()) }],
            layers,
            created: 1,
            last_used: 1,
        };
        idx.put_saved("p1", &rec("0001", "app:1", vec![(a.clone(), 10)])).unwrap();
        idx.put_saved("p1", &rec("0002", "app:1", vec![(b.clone(), 20)])).unwrap();
        assert_eq!(idx.find_saved("p1", "0001").unwrap().unwrap().build_id, "0001");
        assert_eq!(idx.find_saved("p1", "app:1").unwrap().unwrap().build_id, "0002", "newest with the tag");
        assert_eq!(idx.find_saved("p1", "docker.io/library/app:1").unwrap().unwrap().build_id, "0002", "normalized names match");
        assert!(idx.find_saved("p1", "app:2").unwrap().is_none());
        assert!(idx.find_saved("p2", "0001").unwrap().is_none(), "another project's id is not found");
        assert!(idx.find_saved("p2", "app:1").unwrap().is_none(), "another project's tag is not found");
        assert_eq!(idx.usage("p1").unwrap().layer_bytes(), 30, "saved layers count for the project");
        assert!(idx.referenced_layers().unwrap().contains(&b), "saved layers are kept by GC");
        let recs = idx.records("p1").unwrap();
        let saved: Vec<_> = recs.iter().filter(|r| r.table == "saved").cloned().collect();
        assert_eq!(saved.len(), 2);
        idx.remove_records(&saved[..1]).unwrap();
        assert_eq!(idx.records("p1").unwrap().len(), 1);
        idx.reset("p1").unwrap();
        assert!(idx.find_saved("p1", "app:1").unwrap().is_none());
        assert!(!idx.referenced_layers().unwrap().contains(&b));
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
