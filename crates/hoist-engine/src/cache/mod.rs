//! The cache index (redb): which layer each op's cache key produced, which base images a
//! project pulled, which blobs exist for each layer, which manifest a tag resolved to, and
//! the project's build records, the images a project saved (`--save`) for `hoist pull`, and
//! what COPY steps read from known contexts (so an unchanged context is not walked again).
//! Everything a project owns is keyed `<project>\0<key>`, so a project's share can be
//! listed, pruned least-recently-used first, or reset.
//!
//! Two kinds of records, one database: the build cache ([`steps`]: what steps produced,
//! base images pulled, blobs and sizes of layers, resolved tags, COPY source digests) and
//! what the builder keeps for people ([`products`]: build records, saved results). Times
//! come from a [`Clock`].

mod clock;
mod products;
mod steps;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use hoist_oci::digest::Digest;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

pub use clock::{now, Clock, ManualClock, SystemClock};
pub use products::{SavedImage, SavedRecord};
pub use steps::{BlobRecord, PullRecord, StepRecord, TagRecord};

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
    /// The database failed (open, transaction, table).
    #[error("cache index {path}: {source}")]
    Db {
        /// The index file.
        path: String,
        /// redb's error.
        source: redb::Error,
    },
    /// An entry that does not deserialize (or a value that does not serialize).
    #[error("cache index entry {key} is corrupt: {source}")]
    Corrupt {
        /// The entry's key, `project/key`.
        key: String,
        /// Why it does not parse.
        source: serde_json::Error,
    },
}

/// A project's share of the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Distinct layers referenced by the project's records, with their sizes.
    pub layers: BTreeMap<Digest, u64>,
    /// Records of the project (steps, pulls, saved results).
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
    /// The table it is in: `steps`, `pulls` or `saved`.
    pub table: &'static str,
    /// Its key in that table (`project\0key`).
    pub key: String,
    /// When a build last used it (seconds since the epoch).
    pub last_used: u64,
    /// The layers it keeps, with their sizes in bytes.
    pub layers: Vec<(Digest, u64)>,
}

/// The persistent cache index.
pub struct CacheIndex {
    db: redb::Database,
    path: String,
    clock: Arc<dyn Clock>,
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

    /// The last `limit` entries of a namespace in key order, last first; only those are
    /// read and parsed (ids that sort by time: the newest).
    fn scan_last<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        ns: &str,
        limit: usize,
    ) -> Result<Vec<T>, CacheError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let t = txn.open_table(table).map_err(|e| self.db_err(e))?;
        let (a, b) = prefix_end(ns);
        let mut out = Vec::new();
        for item in t.range(a.as_str()..b.as_str()).map_err(|e| self.db_err(e))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item.map_err(|e| self.db_err(e))?;
            // A corrupt entry is skipped rather than failing every listing.
            if let Ok(val) = serde_json::from_slice(v.value()) {
                out.push(val);
            }
        }
        Ok(out)
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        idx.put_build("p1", "0003-z", &serde_json::json!({"id": "z"})).unwrap();
        idx.put_build("p10", "0004-w", &serde_json::json!({"id": "w"})).unwrap();
        let newest: Vec<_> = idx.builds("p1", 2).unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(newest, ["z", "y"], "the newest two, not another namespace's");
        assert_eq!(idx.referenced_layers().unwrap().len(), 3);
        assert_eq!(idx.reset("p1").unwrap(), 3);
        assert_eq!(idx.usage("p1").unwrap().records, 0);
        assert!(!idx.referenced_layers().unwrap().contains(&a));
        assert_eq!(idx.usage("p10").unwrap().records, 1);
    }
}
