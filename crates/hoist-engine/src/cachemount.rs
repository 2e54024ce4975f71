//! `RUN --mount=type=cache` directories: persistent per project and cache id, kept outside
//! every layer. The id is a name, never a path: the directory is named by a hash of
//! (project, id), so `id=../../x` stays inside hoist's cache store.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::graph::CacheSharing;

/// Errors preparing a cache mount.
#[derive(Debug, thiserror::Error)]
#[error("cache mount {id:?}: {message}")]
pub struct CacheMountError {
    /// The cache id (`RUN --mount=type=cache,id=...`).
    pub id: String,
    /// What failed (creating, seeding or locking the directory).
    pub message: String,
}

/// The cache mount directories of an engine.
pub struct CacheMounts {
    root: PathBuf,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    in_use: Arc<Mutex<HashMap<PathBuf, usize>>>,
}

/// A cache directory in use by one RUN; released on drop.
pub struct CacheMountGuard {
    path: PathBuf,
    _lock: Option<tokio::sync::OwnedMutexGuard<()>>,
    _private: Option<tempfile::TempDir>,
    shared_dir: Option<PathBuf>,
    in_use: Arc<Mutex<HashMap<PathBuf, usize>>>,
}

impl CacheMountGuard {
    /// The directory to bind-mount.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CacheMountGuard {
    fn drop(&mut self) {
        if let Some(dir) = &self.shared_dir {
            let mut m = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(dir) {
                *n -= 1;
                if *n == 0 {
                    m.remove(dir);
                }
            }
        }
    }
}

impl CacheMounts {
    /// Cache directories under `root`.
    pub fn new(root: PathBuf) -> CacheMounts {
        CacheMounts { root, locks: Mutex::new(HashMap::new()), in_use: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// The directory holding a namespace's cache mounts.
    pub fn namespace_dir(&self, namespace: &str) -> PathBuf {
        self.root.join(&hex::encode(Sha256::digest(namespace.as_bytes()))[..32])
    }

    /// The directory of a cache id in a namespace.
    pub fn dir_of(&self, namespace: &str, id: &str) -> PathBuf {
        self.namespace_dir(namespace).join(hex::encode(Sha256::digest(id.as_bytes())))
    }

    /// Get the cache directory for a RUN, creating it (owned `uid:gid`, `mode`, seeded from
    /// `seed`) the first time.
    #[allow(clippy::too_many_arguments)]
    pub async fn acquire(
        &self,
        namespace: &str,
        id: &str,
        sharing: CacheSharing,
        mode: u32,
        uid: u32,
        gid: u32,
        seed: Option<&Path>,
    ) -> Result<CacheMountGuard, CacheMountError> {
        let err = |m: String| CacheMountError { id: id.to_string(), message: m };
        let dir = self.dir_of(namespace, id);
        let parent = self.namespace_dir(namespace);
        std::fs::create_dir_all(&parent).map_err(|e| err(format!("creating {}: {e}", parent.display())))?;
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(dir.clone()).or_insert_with(|| Arc::new(tokio::sync::Mutex::new(()))).clone()
        };
        // Creation happens under the lock, so two steps never seed the same dir at once.
        let guard = lock.clone().lock_owned().await;
        if !dir.exists() {
            let tmp = parent.join(format!(".new-{}", dir.file_name().and_then(|n| n.to_str()).unwrap_or("x")));
            let _ = std::fs::remove_dir_all(&tmp);
            create(&tmp, mode, uid, gid, seed).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
            std::fs::rename(&tmp, &dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
        }
        match sharing {
            CacheSharing::Locked => {
                Ok(CacheMountGuard { path: dir, _lock: Some(guard), _private: None, shared_dir: None, in_use: self.in_use.clone() })
            }
            CacheSharing::Shared => {
                drop(guard);
                *self.in_use.lock().unwrap_or_else(|e| e.into_inner()).entry(dir.clone()).or_default() += 1;
                Ok(CacheMountGuard { path: dir.clone(), _lock: None, _private: None, shared_dir: Some(dir), in_use: self.in_use.clone() })
            }
            CacheSharing::Private => {
                drop(guard);
                let busy = {
                    let mut m = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
                    let n = m.entry(dir.clone()).or_default();
                    *n += 1;
                    *n > 1
                };
                if busy {
                    // Someone else uses the shared dir: this RUN gets a fresh private one.
                    let t = tempfile::Builder::new().prefix(".private-").tempdir_in(&parent).map_err(|e| err(e.to_string()))?;
                    create_in(t.path(), mode, uid, gid, seed).map_err(|e| err(e.to_string()))?;
                    Ok(CacheMountGuard {
                        path: t.path().to_path_buf(),
                        _lock: None,
                        _private: Some(t),
                        shared_dir: Some(dir),
                        in_use: self.in_use.clone(),
                    })
                } else {
                    Ok(CacheMountGuard {
                        path: dir.clone(),
                        _lock: None,
                        _private: None,
                        shared_dir: Some(dir),
                        in_use: self.in_use.clone(),
                    })
                }
            }
        }
    }
}

fn create(dir: &Path, mode: u32, uid: u32, gid: u32, seed: Option<&Path>) -> std::io::Result<()> {
    std::fs::create_dir(dir)?;
    create_in(dir, mode, uid, gid, seed)
}

fn create_in(dir: &Path, mode: u32, uid: u32, gid: u32, seed: Option<&Path>) -> std::io::Result<()> {
    if let Some(seed) = seed {
        copy_tree(seed, dir)?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    Ok(())
}

/// Copy the contents of `src` into the existing directory `dst`, keeping modes, owners and
/// symlinks (never following them).
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&from)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            std::fs::create_dir(&to)?;
            copy_tree(&from, &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if ft.is_file() {
            std::fs::copy(&from, &to)?;
        } else {
            continue;
        }
        std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ids_are_names_not_paths() {
        let dir = tempfile::tempdir().unwrap();
        let mounts = CacheMounts::new(dir.path().to_path_buf());
        let g = mounts.acquire("p", "../../escape", CacheSharing::Shared, 0o755, 0, 0, None).await.unwrap();
        assert!(g.path().starts_with(dir.path()));
        assert_eq!(g.path().parent().unwrap().parent().unwrap(), dir.path());
        assert!(!dir.path().parent().unwrap().join("escape").exists());
    }

    #[tokio::test]
    async fn namespaces_do_not_share_and_contents_persist() {
        let dir = tempfile::tempdir().unwrap();
        let mounts = CacheMounts::new(dir.path().to_path_buf());
        let a = mounts.acquire("p1", "go", CacheSharing::Shared, 0o755, 0, 0, None).await.unwrap();
        std::fs::write(a.path().join("f"), "1").unwrap();
        let a_path = a.path().to_path_buf();
        drop(a);
        let again = mounts.acquire("p1", "go", CacheSharing::Shared, 0o755, 0, 0, None).await.unwrap();
        assert_eq!(again.path(), a_path);
        assert!(again.path().join("f").exists());
        let other = mounts.acquire("p2", "go", CacheSharing::Shared, 0o755, 0, 0, None).await.unwrap();
        assert_ne!(other.path(), a_path);
        assert!(!other.path().join("f").exists());
    }

    #[tokio::test]
    async fn private_sharing_gives_a_second_user_its_own_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mounts = CacheMounts::new(dir.path().to_path_buf());
        let a = mounts.acquire("p", "c", CacheSharing::Private, 0o755, 0, 0, None).await.unwrap();
        let b = mounts.acquire("p", "c", CacheSharing::Private, 0o755, 0, 0, None).await.unwrap();
        assert_ne!(a.path(), b.path());
        let bp = b.path().to_path_buf();
        drop(b);
        assert!(!bp.exists(), "the private dir is removed when released");
    }

    #[tokio::test]
    async fn locked_sharing_waits_for_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let mounts = Arc::new(CacheMounts::new(dir.path().to_path_buf()));
        let a = mounts.acquire("p", "c", CacheSharing::Locked, 0o755, 0, 0, None).await.unwrap();
        let m2 = mounts.clone();
        let waiter = tokio::spawn(async move { m2.acquire("p", "c", CacheSharing::Locked, 0o755, 0, 0, None).await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "a locked cache is exclusive");
        drop(a);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn seed_and_ownership_apply_on_creation() {
        let dir = tempfile::tempdir().unwrap();
        let seed = tempfile::tempdir().unwrap();
        std::fs::write(seed.path().join("s"), "seed").unwrap();
        let mounts = CacheMounts::new(dir.path().to_path_buf());
        let g = mounts.acquire("p", "seeded", CacheSharing::Shared, 0o700, 1000, 1000, Some(seed.path())).await.unwrap();
        assert_eq!(std::fs::read_to_string(g.path().join("s")).unwrap(), "seed");
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(g.path()).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o700);
        if rustix::process::geteuid().is_root() {
            assert_eq!((m.uid(), m.gid()), (1000, 1000));
        }
    }
}
