//! Garbage collection: leases keep what running builds use, collection drops a project's
//! least recently used records (and what the builder service keeps for it) down to its
//! limit, reset drops all of a project's records, and a
//! sweep deletes every layer (snapshot and blobs) no record of any project and no lease
//! refers to.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hoist_oci::digest::Digest;

use crate::engine::{Engine, EngineError};

/// Layers in use by running builds (and steps in flight), with use counts.
#[derive(Default)]
pub struct Leases {
    map: Mutex<HashMap<Digest, usize>>,
}

/// The layers one build (or one step task) holds; released on drop.
pub struct LeaseSet {
    leases: Arc<Leases>,
    held: Mutex<Vec<Digest>>,
}

impl LeaseSet {
    /// Hold `d` until this set is dropped. Take the lease before checking the layer exists:
    /// a sweep never deletes a leased layer.
    pub fn add(&self, d: &Digest) {
        *self.leases.map.lock().unwrap_or_else(|e| e.into_inner()).entry(d.clone()).or_default() += 1;
        self.held.lock().unwrap_or_else(|e| e.into_inner()).push(d.clone());
    }
}

impl Drop for LeaseSet {
    fn drop(&mut self) {
        let held = std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner()));
        let mut map = self.leases.map.lock().unwrap_or_else(|e| e.into_inner());
        for d in held {
            if let Some(n) = map.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&d);
                }
            }
        }
    }
}

impl Leases {
    /// A new, empty lease set.
    pub fn set(self: &Arc<Self>) -> LeaseSet {
        LeaseSet { leases: self.clone(), held: Mutex::new(Vec::new()) }
    }
}

/// Something a project keeps besides cache records that counts against its storage limit
/// (the builder service's contexts, build records and logs), for [`Engine::collect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reclaimable {
    /// When it was last used (seconds since the epoch).
    pub last_used: u64,
    /// What dropping it frees.
    pub bytes: u64,
    /// In use: it counts against the limit but is not dropped.
    pub pinned: bool,
}

/// A project's share of the builder's storage (contexts are counted by the server).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectUsage {
    /// Distinct layers the project's cache records refer to (layers shared with other
    /// projects included).
    pub layers: u64,
    /// Bytes of those layers, each counted once, as the records give them (uncompressed tar
    /// size for built layers, a share of the image's blob size for pulled ones).
    pub layer_bytes: u64,
    /// Cache index records of the project: step results, base image pulls, saved outputs.
    pub records: u64,
    /// Bytes on disk under the project's `RUN --mount=type=cache` directories.
    pub cache_mount_bytes: u64,
}

/// Bytes under a directory (not following symlinks, not crossing into other mounts).
pub fn dir_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    let dev = meta.dev();
    let mut total = meta.blocks() * 512;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

impl Engine {
    /// A lease set for a build.
    pub fn lease_set(&self) -> LeaseSet {
        self.inner.leases.set()
    }

    /// A project's usage.
    pub fn usage(&self, ns: &str) -> Result<ProjectUsage, EngineError> {
        let u = self.index().usage(ns)?;
        Ok(ProjectUsage {
            layers: u.layers.len() as u64,
            layer_bytes: u.layer_bytes(),
            records: u.records,
            cache_mount_bytes: dir_size(&self.cache_mounts().namespace_dir(ns)),
        })
    }

    /// Drop everything the project has in the index and its cache mounts, then sweep.
    pub fn reset(&self, ns: &str) -> Result<u64, EngineError> {
        let before = self.usage(ns)?;
        self.index().reset(ns)?;
        let dir = self.cache_mounts().namespace_dir(ns);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| EngineError::Collect { path: dir.clone(), source })?;
        }
        self.sweep()?;
        Ok(before.layer_bytes + before.cache_mount_bytes)
    }

    /// Delete layers (snapshots, and blobs of layers known only by their blobs) that no
    /// record refers to and no build holds. Returns how many.
    pub fn sweep(&self) -> Result<u64, EngineError> {
        let referenced = self.index().referenced_layers()?;
        let mut layers: std::collections::BTreeSet<Digest> = self.snapshots().layers()?.into_iter().map(|(d, _)| d).collect();
        layers.extend(self.index().blob_layers()?);
        // Holding the lease map makes "not leased" hold for the whole deletion.
        let map = self.inner.leases.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        for d in layers {
            if referenced.contains(&d) || map.contains_key(&d) {
                continue;
            }
            if self.snapshots().has_layer(&d) {
                self.snapshots().remove_layer(&d)?;
            }
            for b in self.index().layer_blobs(&d)? {
                self.store().remove(&b.digest)?;
            }
            self.index().remove_layer_blobs(&d)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Bring project `ns` under `limit_bytes`, counting its layers, its cache mounts and
    /// `others` (what the builder service keeps for it: contexts, build records and logs).
    /// Cache records and `others` go in one least-recently-used order, oldest first, until
    /// the project fits; cache mounts count but are only dropped by a reset. Returns the
    /// bytes freed and the indices of `others` the caller must drop.
    pub fn collect(&self, ns: &str, limit_bytes: u64, others: &[Reclaimable]) -> Result<(u64, Vec<usize>), EngineError> {
        let mut records = self.index().records(ns)?;
        let mut sizes: HashMap<Digest, (u64, usize)> = HashMap::new();
        for r in &records {
            for (d, s) in &r.layers {
                sizes.entry(d.clone()).or_insert((*s, 0)).1 += 1;
            }
        }
        let layer_bytes: u64 = sizes.values().map(|(s, _)| *s).sum();
        let mounts = dir_size(&self.cache_mounts().namespace_dir(ns));
        let before = layer_bytes + mounts + others.iter().map(|o| o.bytes).sum::<u64>();
        let mut total = before;
        if total <= limit_bytes {
            return Ok((0, Vec::new()));
        }
        // One order for both kinds: (last use, kind, index).
        records.sort_by_key(|r| r.last_used);
        let mut order: Vec<(u64, bool, usize)> = records.iter().enumerate().map(|(i, r)| (r.last_used, true, i)).collect();
        order.extend(others.iter().enumerate().map(|(i, o)| (o.last_used, false, i)));
        order.sort();
        let mut drop_records = Vec::new();
        let mut drop_others = Vec::new();
        for (_, is_record, i) in order {
            if total <= limit_bytes {
                break;
            }
            if !is_record {
                if others[i].pinned {
                    continue;
                }
                total = total.saturating_sub(others[i].bytes);
                drop_others.push(i);
                continue;
            }
            for (d, _) in &records[i].layers {
                if let Some(e) = sizes.get_mut(d) {
                    e.1 -= 1;
                    if e.1 == 0 {
                        total = total.saturating_sub(e.0);
                    }
                }
            }
            drop_records.push(records[i].clone());
        }
        self.index().remove_records(&drop_records)?;
        self.sweep()?;
        Ok((before - total, drop_others))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: what the builder keeps for a project besides its cache (contexts, build
    /// records, logs) counts against its limit and goes in one LRU order with the cache.
    #[test]
    fn collection_drops_the_oldest_of_records_and_other_items_until_the_project_fits() {
        let t = crate::testing::TestEngine::new();
        let engine = &t.engine;
        let layer = Digest::of(b"a layer of 1000 bytes");
        engine.index().put_step("p", "k1", Some(layer.clone()), 1000).unwrap();
        engine.index().put_step("other", "k1", Some(Digest::of(b"another project's layer")), 5000).unwrap();
        let old = Reclaimable { last_used: 1, bytes: 300, pinned: false };
        let new = Reclaimable { last_used: u64::MAX, bytes: 200, pinned: false };
        // Under the limit: nothing goes.
        assert_eq!(engine.collect("p", 1500, &[old, new]).unwrap(), (0, vec![]));
        // 1500 bytes over a limit of 1000: the old item goes first, then the cache record
        // (now), and the newest item stays.
        let (freed, others) = engine.collect("p", 1000, &[old, new]).unwrap();
        assert_eq!(others, vec![0]);
        assert_eq!(freed, 1300);
        assert!(engine.index().step("p", "k1").unwrap().is_none(), "the record was dropped");
        assert!(engine.index().step("other", "k1").unwrap().is_some(), "other projects are untouched");
        // An item in use (the context of the build that just ended) counts but stays.
        engine.index().put_step("p", "k2", Some(layer.clone()), 1000).unwrap();
        let busy = Reclaimable { last_used: 1, bytes: 300, pinned: true };
        let (_, others) = engine.collect("p", 1000, &[busy]).unwrap();
        assert!(others.is_empty(), "an item in use stays");
        assert!(engine.index().step("p", "k2").unwrap().is_none(), "it counts: 1300 bytes > 1000, so the record went");
    }
}
