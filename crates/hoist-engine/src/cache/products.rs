//! What the builder keeps for a project besides its build cache: build records (opaque
//! JSON the service writes) and results saved with `--save` for `hoist pull`.

use hoist_oci::digest::Digest;
use serde::{Deserialize, Serialize};

use super::{nskey, CacheError, CacheIndex, BUILDS, SAVED};

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
    /// The build that made it (also its key).
    pub build_id: String,
    /// The build's tags (`hoist pull TAG` finds the newest record with it).
    pub tags: Vec<String>,
    /// One image per platform built.
    pub images: Vec<SavedImage>,
    /// Every layer of every image, with its (approximate, uncompressed) size.
    pub layers: Vec<(Digest, u64)>,
    /// When it was saved (seconds since the epoch).
    pub created: u64,
    /// When `hoist pull` last read it.
    pub last_used: u64,
}

impl CacheIndex {
    /// Store a build record (opaque JSON) of a namespace under a sortable id.
    pub fn put_build(&self, ns: &str, id: &str, record: &serde_json::Value) -> Result<(), CacheError> {
        self.put(BUILDS, &nskey(ns, id), record)
    }

    /// A namespace's newest `limit` build records, newest first (only those are read).
    pub fn builds(&self, ns: &str, limit: usize) -> Result<Vec<serde_json::Value>, CacheError> {
        self.scan_last(BUILDS, ns, limit)
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
}
