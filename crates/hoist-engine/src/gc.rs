//! Garbage collection: leases keep what running builds use, prune drops a project's least
//! recently used records down to a size, reset drops all of a project's records, and a
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

/// A project's share of the builder's storage (contexts are counted by the server).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectUsage {
    pub layers: u64,
    pub layer_bytes: u64,
    pub records: u64,
    pub cache_mount_bytes: u64,
}

fn gc_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Export(format!("garbage collection: {e}"))
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
        let u = self.index().usage(ns).map_err(gc_err)?;
        Ok(ProjectUsage {
            layers: u.layers.len() as u64,
            layer_bytes: u.layer_bytes(),
            records: u.records,
            cache_mount_bytes: dir_size(&self.cache_mounts().namespace_dir(ns)),
        })
    }

    /// Drop the project's least recently used records until its layers take at most
    /// `keep_bytes`, then sweep. Returns the bytes the project's share shrank by.
    pub fn prune(&self, ns: &str, keep_bytes: u64) -> Result<u64, EngineError> {
        let mut records = self.index().records(ns).map_err(gc_err)?;
        records.sort_by_key(|r| r.last_used);
        let mut sizes: HashMap<Digest, (u64, usize)> = HashMap::new();
        for r in &records {
            for (d, s) in &r.layers {
                let e = sizes.entry(d.clone()).or_insert((*s, 0));
                e.1 += 1;
            }
        }
        let mut total: u64 = sizes.values().map(|(s, _)| *s).sum();
        let before = total;
        let mut drop = Vec::new();
        for r in records {
            if total <= keep_bytes {
                break;
            }
            for (d, _) in &r.layers {
                if let Some(e) = sizes.get_mut(d) {
                    e.1 -= 1;
                    if e.1 == 0 {
                        total -= e.0;
                    }
                }
            }
            drop.push(r);
        }
        self.index().remove_records(&drop).map_err(gc_err)?;
        self.sweep()?;
        Ok(before - total)
    }

    /// Drop everything the project has in the index and its cache mounts, then sweep.
    pub fn reset(&self, ns: &str) -> Result<u64, EngineError> {
        let before = self.usage(ns)?;
        self.index().reset(ns).map_err(gc_err)?;
        let dir = self.cache_mounts().namespace_dir(ns);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| gc_err(format!("removing {}: {e}", dir.display())))?;
        }
        self.sweep()?;
        Ok(before.layer_bytes + before.cache_mount_bytes)
    }

    /// Delete layers that no record refers to and no build holds. Returns how many.
    pub fn sweep(&self) -> Result<u64, EngineError> {
        let referenced = self.index().referenced_layers().map_err(gc_err)?;
        let layers = self.snapshots().layers().map_err(gc_err)?;
        // Holding the lease map makes "not leased" hold for the whole deletion.
        let map = self.inner.leases.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        for (d, _) in layers {
            if referenced.contains(&d) || map.contains_key(&d) {
                continue;
            }
            self.snapshots().remove_layer(&d).map_err(gc_err)?;
            for b in self.index().layer_blobs(&d).map_err(gc_err)? {
                self.store().remove(&b.digest).map_err(gc_err)?;
            }
            self.index().remove_layer_blobs(&d).map_err(gc_err)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Prune the project to `limit_bytes` if it is over (the automatic GC after a build).
    pub fn gc_if_over(&self, ns: &str, limit_bytes: u64) -> Result<u64, EngineError> {
        let u = self.index().usage(ns).map_err(gc_err)?;
        if u.layer_bytes() <= limit_bytes {
            return Ok(0);
        }
        self.prune(ns, limit_bytes)
    }
}
