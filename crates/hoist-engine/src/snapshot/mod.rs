//! The snapshotter owns the layer directories and the overlayfs mounts over them.
//!
//! A layer is a directory in overlay format (whiteouts as 0/0 character devices, replaced
//! directories marked `trusted.overlay.opaque=y`), keyed by its diff_id: extracted from a
//! registry blob, written by COPY --link, or the upperdir of a RUN. A RUN mounts overlayfs with
//! the parent chain as lowers and a fresh upperdir; after unmount that upperdir IS the layer
//! diff and is renamed into the store (no tree is ever diffed).
//!
//! Layout under the root (`<HOIST_ROOT>/snapshots`):
//!
//! ```text
//! lock                 flock held by the one Snapshotter using this root
//! empty/               an empty lower for FROM scratch (overlay needs at least one lower)
//! layers/<64 hex>/     one committed layer per diff_id (the name is the digest's hex)
//! active/<id>/{u,w,m}  a mount in use: upperdir, workdir, merged mount point
//! tmp/<id>/            temporary layer dirs (extraction, COPY --link) and layers being removed
//! ```
//!
//! Everything under `active/` and `tmp/` is transient: [`Snapshotter::new`] unmounts whatever
//! is still mounted under the root after a crash and deletes those directories. Layer names
//! are full digests (no collisions to handle); the `mount(2)` fallback for kernels without
//! `lowerdir+` passes directories as `/proc/self/fd/N`, so path length does not limit the
//! number of layers (see [`mount::OverlayMounter`]).

pub mod mount;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hoist_oci::digest::Digest;
use rustix::fs::{FlockOperation, RenameFlags, CWD};
use rustix::io::Errno;

pub use mount::{
    CopyMounter, KernelMounts, MountError, MountSyscalls, Mounter, OverlayMount, OverlayMounter, RecordingSyscalls, UpperDirs,
};

/// Errors of the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation on the store failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. `create` or `rename`.
        action: &'static str,
        /// The file or directory in the store.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Mounting or unmounting failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A lower layer of a mount is not stored.
    #[error("layer {0} is not in the snapshot store (extract or build it first)")]
    MissingLayer(Digest),
    /// Another process holds the store.
    #[error("snapshot root {0} is in use by another hoist process (it holds the lock file {0}/lock)")]
    Locked(PathBuf),
    /// [`Snapshotter::commit`] of a [`Snapshotter::view`].
    #[error("the mount at {0} is a throwaway view of a stage and cannot be committed as a layer")]
    CommitView(PathBuf),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { action, path: path.to_path_buf(), source }
}

/// The layer store and mount manager over one root directory. Cheap to clone.
#[derive(Clone)]
pub struct Snapshotter {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    mounter: Arc<dyn Mounter>,
    _lock: File,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter").field("root", &self.inner.root).finish()
    }
}

impl Snapshotter {
    /// Open (creating if needed) the store at `root` with the kernel overlay mounter, and
    /// recover from a crash: unmount everything still mounted under `root` and delete
    /// leftover active mounts and temporary directories.
    pub fn new(root: impl AsRef<Path>) -> Result<Snapshotter, SnapshotError> {
        Self::with_mounter(root, Arc::new(OverlayMounter::new()))
    }

    /// Like [`Snapshotter::new`] with another [`Mounter`] (e.g. [`CopyMounter`] in tests).
    pub fn with_mounter(root: impl AsRef<Path>, mounter: Arc<dyn Mounter>) -> Result<Snapshotter, SnapshotError> {
        let root = root.as_ref();
        fs::create_dir_all(root).map_err(io_err("create", root))?;
        let root = root.canonicalize().map_err(io_err("resolve", root))?;
        let lock_path = root.join("lock");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err("open", &lock_path))?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => return Err(SnapshotError::Locked(root)),
            Err(e) => return Err(SnapshotError::Io { action: "lock", path: lock_path, source: e.into() }),
        }
        let s = Snapshotter { inner: Arc::new(Inner { root, mounter, _lock: lock }) };
        s.recover()?;
        Ok(s)
    }

    fn recover(&self) -> Result<(), SnapshotError> {
        let root = &self.inner.root;
        let mounts = mount::mount_points_under(root).map_err(io_err("read mountinfo for", root))?;
        for target in mounts.iter().rev() {
            tracing::info!(target = %target.display(), "unmounting leftover snapshot mount");
            self.inner.mounter.unmount(target)?;
        }
        for sub in ["active", "tmp"] {
            let dir = root.join(sub);
            remove_tree(&dir).map_err(io_err("remove leftover", &dir))?;
        }
        for sub in ["layers", "active", "tmp", "empty"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        let empty = root.join("empty");
        fs::set_permissions(&empty, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", &empty))?;
        Ok(())
    }

    /// The store's root directory (canonical).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where the layer with this diff_id lives (whether or not it exists yet).
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.inner.root.join("layers").join(diff_id.hex())
    }

    /// Whether the layer is in the store.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).is_dir()
    }

    /// All committed layers with their directories, sorted by digest.
    pub fn layers(&self) -> Result<Vec<(Digest, PathBuf)>, SnapshotError> {
        let dir = self.inner.root.join("layers");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            if let Ok(d) = format!("sha256:{name}").parse::<Digest>() {
                out.push((d, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Mount the chain `lowers` (bottom first, as in an image config's diff_ids) with a fresh
    /// upperdir, read-write: the root filesystem of a RUN or COPY step. `&[]` is `FROM scratch`.
    pub fn prepare(&self, lowers: &[Digest]) -> Result<ActiveMount, SnapshotError> {
        self.mount(lowers, false)
    }

    /// Mount the chain `lowers` to read a stage's filesystem (COPY --from, RUN --mount=from);
    /// writes land in a throwaway upperdir that is deleted with the mount.
    pub fn view(&self, lowers: &[Digest]) -> Result<ActiveMount, SnapshotError> {
        self.mount(lowers, true)
    }

    /// A throwaway copy-on-write view of arbitrary host directories (bottom first), e.g. the
    /// build context for `RUN --mount=type=bind,rw`: writes land in the view's upperdir and
    /// never reach `dirs`. `&[]` is an empty view.
    pub fn view_paths(&self, dirs: &[PathBuf]) -> Result<ActiveMount, SnapshotError> {
        for d in dirs {
            if !d.is_dir() {
                return Err(SnapshotError::Io {
                    action: "use as a lower directory",
                    path: d.clone(),
                    source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                });
            }
        }
        self.mount_dirs(dirs.iter().rev().cloned().collect(), Vec::new(), true)
    }

    fn mount(&self, lowers: &[Digest], view: bool) -> Result<ActiveMount, SnapshotError> {
        let mut lower_dirs = Vec::with_capacity(lowers.len().max(1));
        for d in lowers.iter().rev() {
            let dir = self.layer_dir(d);
            if !dir.is_dir() {
                return Err(SnapshotError::MissingLayer(d.clone()));
            }
            lower_dirs.push(dir);
        }
        self.mount_dirs(lower_dirs, lowers.to_vec(), view)
    }

    fn mount_dirs(&self, mut lower_dirs: Vec<PathBuf>, lowers: Vec<Digest>, view: bool) -> Result<ActiveMount, SnapshotError> {
        if lower_dirs.is_empty() {
            lower_dirs.push(self.inner.root.join("empty"));
        }
        let dir = self.unique_dir("active")?;
        let mut am = ActiveMount {
            upper: dir.join("u"),
            work: dir.join("w"),
            merged: dir.join("m"),
            dir,
            lower_dirs,
            lowers,
            mounter: self.inner.mounter.clone(),
            mounted: false,
            cleaned: false,
            view,
        };
        for d in [&am.upper, &am.work, &am.merged] {
            fs::create_dir(d).map_err(io_err("create", d))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", d))?;
        }
        self.inner.mounter.mount_overlay(&OverlayMount {
            lowers: am.lower_dirs.clone(),
            upper: Some(UpperDirs { upper: am.upper.clone(), work: am.work.clone() }),
            target: am.merged.clone(),
            readonly: false,
        })?;
        am.mounted = true;
        Ok(am)
    }

    /// A new empty directory under the root (same filesystem as `layers/`, so that
    /// [`Snapshotter::commit`] is a rename): for extracting a registry layer or writing a
    /// COPY --link layer. Deleted on drop unless committed.
    pub fn temp_dir(&self) -> Result<TempLayerDir, SnapshotError> {
        let path = self.unique_dir("tmp")?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", &path))?;
        Ok(TempLayerDir { path })
    }

    fn unique_dir(&self, sub: &str) -> Result<PathBuf, SnapshotError> {
        let parent = self.inner.root.join(sub);
        let dir =
            tempfile::Builder::new().prefix("").rand_bytes(8).tempdir_in(&parent).map_err(io_err("create a directory in", &parent))?;
        Ok(dir.keep())
    }

    /// Store an upperdir (of a [`Snapshotter::prepare`] mount, unmounted here if still
    /// mounted) or a [`TempLayerDir`] as the layer `diff_id`, by rename. If the layer already
    /// exists (same diff_id, so same content) the new directory is dropped. Returns the
    /// layer's directory.
    pub fn commit(&self, src: impl Into<Uncommitted>, diff_id: &Digest) -> Result<PathBuf, SnapshotError> {
        match src.into() {
            Uncommitted::Mount(mut m) => {
                if m.view {
                    return Err(SnapshotError::CommitView(m.merged.clone()));
                }
                m.unmount()?;
                remove_tree(&m.work).map_err(io_err("remove", &m.work))?;
                self.install(&m.upper, diff_id)
                // `m` drops here and removes the rest of its directory.
            }
            Uncommitted::Temp(t) => self.install(&t.path, diff_id),
        }
    }

    fn install(&self, src: &Path, diff_id: &Digest) -> Result<PathBuf, SnapshotError> {
        let dst = self.layer_dir(diff_id);
        match rustix::fs::renameat_with(CWD, src, CWD, &dst, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(dst),
            Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => {
                tracing::debug!(layer = %diff_id, "layer already stored; dropping the duplicate");
                remove_tree(src).map_err(io_err("remove", src))?;
                Ok(dst)
            }
            Err(e) => Err(SnapshotError::Io { action: "store layer from", path: src.to_path_buf(), source: e.into() }),
        }
    }

    /// Delete a layer (for garbage collection). The directory is first renamed out of
    /// `layers/`, so a crash mid-way never leaves a half layer under its digest. Returns
    /// whether the layer existed. The caller makes sure no mount uses it.
    pub fn remove_layer(&self, diff_id: &Digest) -> Result<bool, SnapshotError> {
        let dir = self.layer_dir(diff_id);
        if !dir.exists() {
            return Ok(false);
        }
        let trash = self.unique_dir("tmp")?;
        let moved = trash.join("layer");
        match fs::rename(&dir, &moved) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let _ = fs::remove_dir(&trash);
                return Ok(false);
            }
            Err(e) => return Err(SnapshotError::Io { action: "remove layer", path: dir, source: e }),
        }
        remove_tree(&trash).map_err(io_err("remove", &trash))?;
        Ok(true)
    }
}

/// A mounted overlay (from [`Snapshotter::prepare`] or [`Snapshotter::view`]). Dropping it
/// unmounts (lazily if busy) and deletes its directories unless it was committed, so a
/// cancelled or failed step leaves nothing mounted.
pub struct ActiveMount {
    dir: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
    /// Topmost first.
    lower_dirs: Vec<PathBuf>,
    /// Bottom first.
    lowers: Vec<Digest>,
    mounter: Arc<dyn Mounter>,
    mounted: bool,
    cleaned: bool,
    view: bool,
}

impl std::fmt::Debug for ActiveMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveMount")
            .field("merged", &self.merged)
            .field("lowers", &self.lowers)
            .field("mounted", &self.mounted)
            .field("view", &self.view)
            .finish()
    }
}

impl ActiveMount {
    /// The merged filesystem (the container's rootfs).
    pub fn merged(&self) -> &Path {
        &self.merged
    }

    /// The upperdir. Read it only after [`ActiveMount::unmount`]: then it is the step's diff,
    /// with only 0/0 whiteouts and `trusted.overlay.opaque` as overlay artefacts.
    pub fn upper(&self) -> &Path {
        &self.upper
    }

    /// The lower layers, bottom first.
    pub fn lowers(&self) -> &[Digest] {
        &self.lowers
    }

    /// Whether the overlay is still mounted.
    pub fn is_mounted(&self) -> bool {
        self.mounted
    }

    /// Whether this is a throwaway [`Snapshotter::view`].
    pub fn is_view(&self) -> bool {
        self.view
    }

    /// Unmount now (idempotent). For a [`Snapshotter::prepare`] mount the upperdir is then
    /// turned into a plain diff: overlay bookkeeping xattrs (`trusted.overlay.origin`,
    /// `impure`, `uuid`, ...) are removed, and directories that were only copied up (empty
    /// in the upper, same mode/owner/mtime/xattrs as below, e.g. the parent of a removed
    /// mount stub) are pruned, as BuildKit's differ skips unchanged directories.
    pub fn unmount(&mut self) -> Result<(), SnapshotError> {
        if self.mounted {
            self.mounter.unmount(&self.merged)?;
            self.mounted = false;
        }
        if !self.view && !self.cleaned {
            clean_upper(&self.upper, &self.lower_dirs).map_err(io_err("clean upperdir", &self.upper))?;
            self.cleaned = true;
        }
        Ok(())
    }
}

impl Drop for ActiveMount {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = self.mounter.unmount(&self.merged) {
                tracing::warn!("{e}");
                return; // never delete through a live mount; recovery cleans up later
            }
        }
        if let Err(e) = remove_tree(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "cannot remove snapshot mount directory: {e}");
        }
    }
}

/// An empty directory under the snapshot root for building a layer by hand (extraction,
/// COPY --link). Deleted on drop unless committed with [`Snapshotter::commit`].
#[derive(Debug)]
pub struct TempLayerDir {
    path: PathBuf,
}

impl TempLayerDir {
    /// The directory to fill (layer content in overlay format).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempLayerDir {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!(dir = %self.path.display(), "cannot remove temporary layer directory: {e}");
        }
    }
}

/// What [`Snapshotter::commit`] accepts.
#[derive(Debug)]
pub enum Uncommitted {
    /// The upperdir of a [`Snapshotter::prepare`] mount.
    Mount(ActiveMount),
    /// A directory filled by hand.
    Temp(TempLayerDir),
}

impl From<ActiveMount> for Uncommitted {
    fn from(m: ActiveMount) -> Self {
        Uncommitted::Mount(m)
    }
}

impl From<TempLayerDir> for Uncommitted {
    fn from(t: TempLayerDir) -> Self {
        Uncommitted::Temp(t)
    }
}

/// Remove a directory tree without crossing into other filesystems (a mount point inside
/// is an error, never something to delete through). Missing is fine.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match path.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    let dev = meta.dev();
    let mut dirs = vec![path.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        let dir = dirs[i].clone();
        i += 1;
        for entry in fs::read_dir(&dir)? {
            let p = entry?.path();
            let m = p.symlink_metadata()?;
            if m.is_dir() {
                if m.dev() != dev {
                    return Err(io::Error::other(format!("{} is a mount point; not deleting through it", p.display())));
                }
                dirs.push(p);
            } else {
                fs::remove_file(&p)?;
            }
        }
    }
    for d in dirs.iter().rev() {
        fs::remove_dir(d)?;
    }
    Ok(())
}

const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// Turn an unmounted upperdir into a plain diff (see [`ActiveMount::unmount`]).
fn clean_upper(upper: &Path, lowers_top_first: &[PathBuf]) -> io::Result<()> {
    // Pre-order walk (iterative: a hostile RUN may create very deep trees).
    let mut dirs: Vec<PathBuf> = vec![PathBuf::new()];
    strip_overlay_xattrs(upper)?;
    let mut i = 0;
    while i < dirs.len() {
        let rel = dirs[i].clone();
        i += 1;
        for entry in fs::read_dir(upper.join(&rel))? {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            let p = upper.join(&child);
            strip_overlay_xattrs(&p)?;
            if entry.file_type()?.is_dir() {
                dirs.push(child);
            }
        }
    }
    // Children before parents: reverse pre-order.
    for rel in dirs.iter().skip(1).rev() {
        let p = upper.join(rel);
        if is_redundant_copy_up(&p, rel, lowers_top_first)? {
            // Removing an entry bumps the parent's mtime; pruning must not look like a change.
            let parent = p.parent().map(Path::to_path_buf).unwrap_or_else(|| upper.to_path_buf());
            let pm = parent.symlink_metadata()?;
            fs::remove_dir(&p)?;
            let times = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec { tv_sec: pm.atime(), tv_nsec: pm.atime_nsec() as _ },
                last_modification: rustix::fs::Timespec { tv_sec: pm.mtime(), tv_nsec: pm.mtime_nsec() as _ },
            };
            rustix::fs::utimensat(CWD, &parent, &times, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
        }
    }
    Ok(())
}

fn strip_overlay_xattrs(p: &Path) -> io::Result<()> {
    for name in list_xattrs(p)? {
        if name.starts_with(OVERLAY_XATTR_PREFIX) && name != OPAQUE_XATTR {
            match rustix::fs::lremovexattr(p, name.as_slice()) {
                Ok(()) | Err(Errno::NODATA) | Err(Errno::NOTSUP) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Names of the extended attributes of `p` (not following a symlink).
fn list_xattrs(p: &Path) -> io::Result<Vec<Vec<u8>>> {
    let mut size = 256;
    loop {
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(p, &mut buf[..]) {
            Ok(n) => {
                return Ok(buf[..n].split(|b| *b == 0).filter(|s| !s.is_empty()).map(<[u8]>::to_vec).collect());
            }
            Err(Errno::RANGE) if size < 1 << 20 => size *= 4,
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    }
}

fn get_xattr(p: &Path, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut size = 256;
    loop {
        let mut buf = vec![0u8; size];
        match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
            Ok(n) => return Ok(Some(buf[..n].to_vec())),
            Err(Errno::RANGE) if size < 1 << 20 => size *= 4,
            Err(Errno::NODATA) | Err(Errno::NOTSUP) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Extended attributes other than overlay bookkeeping, with values.
fn user_visible_xattrs(p: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for name in list_xattrs(p)? {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        if let Some(v) = get_xattr(p, &name)? {
            out.insert(name, v);
        }
    }
    Ok(out)
}

/// An upper directory that adds nothing: empty, not opaque, and identical in mode, owner,
/// mtime and xattrs to the directory the lowers show at the same path.
fn is_redundant_copy_up(p: &Path, rel: &Path, lowers_top_first: &[PathBuf]) -> io::Result<bool> {
    if fs::read_dir(p)?.next().is_some() || get_xattr(p, OPAQUE_XATTR)?.is_some() {
        return Ok(false);
    }
    let Some((lower, lm)) = lower_entry(lowers_top_first, rel) else { return Ok(false) };
    if !lm.is_dir() {
        return Ok(false);
    }
    let um = p.symlink_metadata()?;
    let same = um.mode() == lm.mode()
        && um.uid() == lm.uid()
        && um.gid() == lm.gid()
        && um.mtime() == lm.mtime()
        && um.mtime_nsec() == lm.mtime_nsec();
    Ok(same && user_visible_xattrs(p)? == user_visible_xattrs(&lower)?)
}

/// What the lowers (topmost first) show at `rel`, honouring whiteouts, opaque directories
/// and non-directories that hide everything below them.
fn lower_entry(lowers_top_first: &[PathBuf], rel: &Path) -> Option<(PathBuf, fs::Metadata)> {
    let comps: Vec<_> = rel.components().collect();
    if comps.is_empty() {
        return None;
    }
    'layers: for layer in lowers_top_first {
        let mut cur = layer.clone();
        let mut opaque_above = false;
        for (i, c) in comps.iter().enumerate() {
            cur.push(c);
            let Ok(m) = cur.symlink_metadata() else {
                if opaque_above {
                    return None;
                }
                continue 'layers;
            };
            if mount::is_whiteout(&m) {
                return None;
            }
            if i + 1 == comps.len() {
                return Some((cur, m));
            }
            if !m.is_dir() {
                return None;
            }
            if mount::is_opaque(&cur) {
                opaque_above = true;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn fake_store() -> (tempfile::TempDir, Arc<CopyMounter>, Snapshotter) {
        let t = tempfile::tempdir().unwrap();
        let m = Arc::new(CopyMounter::new());
        let s = Snapshotter::with_mounter(t.path().join("snapshots"), m.clone()).unwrap();
        (t, m, s)
    }

    fn layer_from(s: &Snapshotter, files: &[(&str, &str)], id: &Digest) -> PathBuf {
        let t = s.temp_dir().unwrap();
        for (name, content) in files {
            let p = t.path().join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        s.commit(t, id).unwrap()
    }

    #[test]
    fn committed_temp_dir_becomes_a_listed_layer() {
        let (_t, _m, s) = fake_store();
        let d = digest(1);
        assert!(!s.has_layer(&d));
        let dir = layer_from(&s, &[("etc/a", "1")], &d);
        assert_eq!(dir, s.layer_dir(&d));
        assert!(s.has_layer(&d));
        assert_eq!(fs::read_to_string(dir.join("etc/a")).unwrap(), "1");
        assert_eq!(s.layers().unwrap(), vec![(d.clone(), dir)]);
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0, "temp dir was renamed away");
    }

    #[test]
    fn committing_an_existing_layer_keeps_the_first_and_drops_the_second() {
        let (_t, _m, s) = fake_store();
        let d = digest(2);
        layer_from(&s, &[("f", "first")], &d);
        let dir = layer_from(&s, &[("f", "second")], &d);
        assert_eq!(fs::read_to_string(dir.join("f")).unwrap(), "first");
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn committing_an_empty_layer_twice_does_not_replace_it() {
        // rename(2) of a directory onto an empty directory succeeds; NOREPLACE must stop it.
        let (_t, _m, s) = fake_store();
        let d = digest(3);
        let dir = s.commit(s.temp_dir().unwrap(), &d).unwrap();
        let ino = dir.metadata().unwrap().ino();
        s.commit(s.temp_dir().unwrap(), &d).unwrap();
        assert_eq!(dir.metadata().unwrap().ino(), ino);
    }

    #[test]
    fn dropped_temp_dir_is_removed() {
        let (_t, _m, s) = fake_store();
        let t = s.temp_dir().unwrap();
        fs::write(t.path().join("x"), "x").unwrap();
        let p = t.path().to_path_buf();
        drop(t);
        assert!(!p.exists());
    }

    #[test]
    fn prepare_mounts_lowers_top_first_and_scratch_uses_the_empty_base() {
        let (_t, m, s) = fake_store();
        let (a, b) = (digest(10), digest(11));
        layer_from(&s, &[("f", "a"), ("only_a", "a")], &a);
        layer_from(&s, &[("f", "b")], &b);
        let mount = s.prepare(&[a.clone(), b.clone()]).unwrap();
        let req = &m.mounted()[0];
        assert_eq!(req.lowers, vec![s.layer_dir(&b), s.layer_dir(&a)]);
        assert!(!req.readonly);
        assert_eq!(fs::read_to_string(mount.merged().join("f")).unwrap(), "b");
        assert_eq!(fs::read_to_string(mount.merged().join("only_a")).unwrap(), "a");
        assert_eq!(mount.lowers(), &[a, b]);
        drop(mount);
        let scratch = s.prepare(&[]).unwrap();
        assert_eq!(m.mounted()[0].lowers, vec![s.root().join("empty")]);
        assert_eq!(fs::read_dir(scratch.merged()).unwrap().count(), 0);
    }

    #[test]
    fn prepare_of_a_missing_layer_names_it_and_leaves_nothing() {
        let (_t, m, s) = fake_store();
        let missing = digest(20);
        match s.prepare(std::slice::from_ref(&missing)) {
            Err(SnapshotError::MissingLayer(d)) => assert_eq!(d, missing),
            other => panic!("expected MissingLayer, got {other:?}"),
        }
        assert!(m.mounted().is_empty());
        assert_eq!(fs::read_dir(s.root().join("active")).unwrap().count(), 0);
    }

    #[test]
    fn dropping_an_active_mount_unmounts_and_removes_its_dirs() {
        let (_t, m, s) = fake_store();
        let mount = s.prepare(&[]).unwrap();
        fs::write(mount.upper().join("new"), "x").unwrap();
        drop(mount);
        assert!(m.mounted().is_empty());
        assert_eq!(fs::read_dir(s.root().join("active")).unwrap().count(), 0);
    }

    #[test]
    fn commit_of_a_mount_unmounts_and_stores_the_upper() {
        let (_t, m, s) = fake_store();
        let base = digest(30);
        layer_from(&s, &[("base", "b")], &base);
        let mount = s.prepare(std::slice::from_ref(&base)).unwrap();
        fs::write(mount.upper().join("new"), "n").unwrap();
        let d = digest(31);
        let dir = s.commit(mount, &d).unwrap();
        assert!(m.mounted().is_empty());
        assert_eq!(fs::read_to_string(dir.join("new")).unwrap(), "n");
        assert!(!dir.join("base").exists(), "only the diff is stored");
        assert_eq!(fs::read_dir(s.root().join("active")).unwrap().count(), 0);
    }

    #[test]
    fn a_view_of_host_dirs_stacks_them_bottom_first_and_refuses_files() {
        let (t, m, s) = fake_store();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::write(a.join("f"), "a").unwrap();
        fs::write(b.join("f"), "b").unwrap();
        let view = s.view_paths(&[a.clone(), b.clone()]).unwrap();
        assert!(view.is_view() && view.lowers().is_empty());
        assert_eq!(m.mounted()[0].lowers, vec![b.clone(), a.clone()]);
        assert_eq!(fs::read_to_string(view.merged().join("f")).unwrap(), "b");
        drop(view);
        assert!(s.view_paths(&[a.join("f")]).is_err());
        assert!(m.mounted().is_empty());
    }

    #[test]
    fn a_view_cannot_be_committed_and_is_cleaned_up() {
        let (_t, m, s) = fake_store();
        let view = s.view(&[]).unwrap();
        assert!(view.is_view());
        assert!(matches!(s.commit(view, &digest(40)), Err(SnapshotError::CommitView(_))));
        assert!(m.mounted().is_empty());
        assert!(!s.has_layer(&digest(40)));
    }

    #[test]
    fn remove_layer_deletes_and_reports_absence() {
        let (_t, _m, s) = fake_store();
        let d = digest(50);
        layer_from(&s, &[("a/b/c", "x")], &d);
        assert!(s.remove_layer(&d).unwrap());
        assert!(!s.has_layer(&d));
        assert!(!s.remove_layer(&d).unwrap());
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn reopening_a_root_removes_leftover_active_and_temp_dirs() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("snapshots");
        let d = digest(60);
        {
            let s = Snapshotter::with_mounter(&root, Arc::new(CopyMounter::new())).unwrap();
            layer_from(&s, &[("keep", "k")], &d);
            std::mem::forget(s.prepare(std::slice::from_ref(&d)).unwrap()); // a "crash" mid-step
            std::mem::forget(s.temp_dir().unwrap());
        }
        assert_eq!(fs::read_dir(root.join("active")).unwrap().count(), 1);
        let s = Snapshotter::with_mounter(&root, Arc::new(CopyMounter::new())).unwrap();
        assert_eq!(fs::read_dir(root.join("active")).unwrap().count(), 0);
        assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        assert!(s.has_layer(&d), "committed layers survive recovery");
    }

    #[test]
    fn a_second_snapshotter_on_the_same_root_is_refused() {
        let (t, _m, _s) = fake_store();
        match Snapshotter::with_mounter(t.path().join("snapshots"), Arc::new(CopyMounter::new())) {
            Err(SnapshotError::Locked(_)) => {}
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn layers_ignores_foreign_names() {
        let (_t, _m, s) = fake_store();
        fs::create_dir(s.root().join("layers/not-a-digest")).unwrap();
        assert!(s.layers().unwrap().is_empty());
    }

    #[test]
    fn remove_tree_refuses_to_cross_into_another_filesystem() {
        // /proc is always another filesystem; a symlink to it is not followed either.
        let t = tempfile::tempdir().unwrap();
        symlink("/proc", t.path().join("link")).unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        remove_tree(t.path()).unwrap();
        assert!(!t.path().exists());
    }

    fn set_mtime(p: &Path, secs: i64) {
        let ts = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec { tv_sec: secs, tv_nsec: 0 },
            last_modification: rustix::fs::Timespec { tv_sec: secs, tv_nsec: 0 },
        };
        rustix::fs::utimensat(CWD, p, &ts, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    #[test]
    fn clean_upper_prunes_only_unchanged_empty_copied_up_dirs() {
        let t = tempfile::tempdir().unwrap();
        let (lower, upper) = (t.path().join("l"), t.path().join("u"));
        for d in ["etc", "var/lib", "tmp", "usr"] {
            fs::create_dir_all(lower.join(d)).unwrap();
        }
        for d in ["etc", "var/lib", "tmp", "new", "usr"] {
            fs::create_dir_all(upper.join(d)).unwrap();
        }
        fs::write(upper.join("usr/file"), "x").unwrap();
        for d in ["etc", "var", "var/lib", "tmp", "usr"] {
            set_mtime(&lower.join(d), 1000);
            set_mtime(&upper.join(d), 1000);
        }
        set_mtime(&upper.join("tmp"), 2000); // touched in the step: a real change
        fs::set_permissions(upper.join("etc"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(lower.join("etc"), fs::Permissions::from_mode(0o755)).unwrap();
        clean_upper(&upper, std::slice::from_ref(&lower)).unwrap();
        assert!(!upper.join("etc").exists(), "identical empty copy-up is pruned");
        assert!(!upper.join("var").exists(), "pruning cascades to parents that become empty");
        assert!(upper.join("tmp").exists(), "changed mtime is a change");
        assert!(upper.join("new").exists(), "a new empty dir is a change");
        assert!(upper.join("usr/file").exists());
        assert!(upper.join("usr").exists(), "non-empty dirs stay");
    }

    #[test]
    fn clean_upper_keeps_dirs_that_a_whiteout_or_file_hides_below() {
        let t = tempfile::tempdir().unwrap();
        let (top, bottom, upper) = (t.path().join("t"), t.path().join("b"), t.path().join("u"));
        fs::create_dir_all(bottom.join("x")).unwrap();
        fs::create_dir_all(top.join("nothing")).unwrap();
        fs::write(top.join("x"), "file hides dir").unwrap();
        fs::create_dir_all(upper.join("x")).unwrap();
        set_mtime(&bottom.join("x"), 1000);
        set_mtime(&upper.join("x"), 1000);
        fs::set_permissions(upper.join("x"), bottom.join("x").metadata().unwrap().permissions()).unwrap();
        clean_upper(&upper, &[top, bottom]).unwrap();
        assert!(upper.join("x").exists(), "the dir replaces a file of the top lower: a change");
    }
}
