//! Paths inside a container rootfs: resolution with symlinks followed as if the rootfs were
//! `/` (never escaping it), creation of the working directory, and mount stubs — mount points
//! that did not exist in the rootfs, created for the run and removed afterwards (as BuildKit
//! does) so that the step's layer does not contain them.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};

use super::ExecError;

/// A path resolved inside a root: the deepest existing part and what is missing below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// Host path of the deepest existing entry (a directory when `missing` is not empty).
    pub existing: PathBuf,
    /// Components that do not exist yet, in order.
    pub missing: Vec<OsString>,
}

impl Resolved {
    /// The full host path (existing part joined with the missing components).
    #[cfg(test)]
    pub fn full(&self) -> PathBuf {
        let mut p = self.existing.clone();
        p.extend(&self.missing);
        p
    }
}

/// Resolve the absolute container path `path` inside `root` with the engine's one in-root
/// resolver ([`crate::rootfs::resolve_components`]: `..` stops at the root, symlinks are
/// followed inside it, the last one too, as runc does for mount targets), then split the
/// result into the directories that exist and the components to create.
pub(crate) fn resolve_in_root(root: &Path, path: &str) -> Result<Resolved, ExecError> {
    let invalid = |reason: String| ExecError::InvalidPath { path: path.to_string(), reason };
    let comps = crate::rootfs::resolve_components(root, path.as_bytes(), true).map_err(|e| invalid(e.to_string()))?;
    let mut existing = root.to_path_buf();
    for (i, c) in comps.iter().enumerate() {
        let next = existing.join(c);
        match next.symlink_metadata() {
            Ok(m) if m.is_dir() => existing = next,
            Ok(_) if i + 1 == comps.len() => return Ok(Resolved { existing: next, missing: Vec::new() }),
            Ok(_) => return Err(invalid(format!("{} is not a directory", display_container(&comps[..i], c)))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Resolved { existing, missing: comps[i..].to_vec() }),
            Err(e) => return Err(invalid(format!("cannot inspect {}: {e}", next.display()))),
        }
    }
    Ok(Resolved { existing, missing: Vec::new() })
}

fn display_container(cur: &[OsString], c: &OsStr) -> String {
    let mut p = PathBuf::from("/");
    p.extend(cur);
    p.push(c);
    p.display().to_string()
}

/// Create the working directory `cwd` inside `root` if it is missing (mode 0755, every created
/// directory owned by `uid:gid`, as BuildKit does). It stays in the layer.
pub(crate) fn ensure_cwd(root: &Path, cwd: &str, uid: u32, gid: u32) -> Result<(), ExecError> {
    let r = resolve_in_root(root, cwd)?;
    if r.missing.is_empty() {
        if !r.existing.is_dir() {
            return Err(ExecError::InvalidPath { path: cwd.to_string(), reason: "the working directory is not a directory".into() });
        }
        return Ok(());
    }
    let mut p = r.existing.clone();
    for c in &r.missing {
        p.push(c);
        fs::DirBuilder::new().mode(0o755).create(&p).map_err(|e| ExecError::io(format!("create working directory {cwd}"), e))?;
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(|e| ExecError::io(format!("chown working directory {cwd}"), e))?;
    }
    Ok(())
}

/// Create the system mount point `path` (`/proc`, `/dev`, `/sys`) inside `root` when it is
/// missing: a 0755 root-owned directory that stays in the layer, as the runtime leaves it
/// under BuildKit. An existing entry (even a symlink or a file) is left alone for the
/// runtime to judge.
pub(crate) fn ensure_system_mount_point(root: &Path, path: &str) -> Result<(), ExecError> {
    let r = resolve_in_root(root, path)?;
    let mut p = r.existing.clone();
    for c in &r.missing {
        p.push(c);
        fs::DirBuilder::new().mode(0o755).create(&p).map_err(|e| ExecError::io(format!("create mount point {path}"), e))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).map_err(|e| ExecError::io(format!("chmod mount point {path}"), e))?;
    }
    Ok(())
}

/// What a mount target must be in the rootfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StubKind {
    File,
    Dir,
}

/// Mount points created in a rootfs for one run. [`MountStubs::remove`] deletes them again
/// (only if still empty) and restores the timestamps of their existing parent directories.
#[derive(Debug, Default)]
pub(crate) struct MountStubs {
    /// Created paths, each before its children.
    created: Vec<PathBuf>,
    /// Existing parent dir → (times before we created anything, mtime after all stubs).
    parents: BTreeMap<PathBuf, (Timestamps, Option<(i64, i64)>)>,
}

impl MountStubs {
    /// Make sure each `(target, kind)` exists in `root`, creating what is missing.
    pub fn create(root: &Path, targets: &[(String, StubKind)]) -> Result<MountStubs, ExecError> {
        let mut stubs = MountStubs::default();
        let result = stubs.create_all(root, targets);
        match result {
            Ok(()) => Ok(stubs),
            Err(e) => {
                stubs.remove();
                Err(e)
            }
        }
    }

    fn create_all(&mut self, root: &Path, targets: &[(String, StubKind)]) -> Result<(), ExecError> {
        for (target, kind) in targets {
            let r = resolve_in_root(root, target)?;
            if r.missing.is_empty() {
                continue;
            }
            if !self.parents.contains_key(&r.existing) {
                let times = times_of(&r.existing).map_err(|e| ExecError::io(format!("stat {}", r.existing.display()), e))?;
                self.parents.insert(r.existing.clone(), (times, None));
            }
            let mut p = r.existing.clone();
            let last = r.missing.len() - 1;
            for (i, c) in r.missing.iter().enumerate() {
                p.push(c);
                let res = if i == last && *kind == StubKind::File {
                    fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&p).map(drop)
                } else {
                    fs::DirBuilder::new().mode(0o755).create(&p)
                };
                res.map_err(|e| ExecError::io(format!("create mount point {target} ({})", p.display()), e))?;
                self.created.push(p.clone());
            }
        }
        for (dir, entry) in self.parents.iter_mut() {
            entry.1 = dir.symlink_metadata().ok().map(|m| (m.mtime(), m.mtime_nsec()));
        }
        Ok(())
    }

    /// Paths created.
    #[cfg(test)]
    pub fn created(&self) -> &[PathBuf] {
        &self.created
    }

    /// Remove the stubs that are still empty (deepest first) and restore the parents'
    /// timestamps: to their original values when nothing but the stubs changed them during
    /// the run, else to what they were just before the removal.
    pub fn remove(&mut self) {
        let mut saved = Vec::new();
        for (dir, (orig, after)) in &self.parents {
            let Ok(m) = dir.symlink_metadata() else { continue };
            let untouched = *after == Some((m.mtime(), m.mtime_nsec()));
            let restore = if untouched {
                clone_times(orig)
            } else {
                match times_of(dir) {
                    Ok(t) => t,
                    Err(_) => continue,
                }
            };
            saved.push((dir.clone(), restore));
        }
        for p in self.created.iter().rev() {
            let Ok(m) = p.symlink_metadata() else { continue };
            let res = if m.is_dir() {
                match fs::read_dir(p).map(|mut it| it.next().is_none()) {
                    Ok(true) => fs::remove_dir(p),
                    _ => continue,
                }
            } else if m.is_file() && m.len() == 0 {
                fs::remove_file(p)
            } else {
                continue;
            };
            if let Err(e) = res {
                tracing::warn!(path = %p.display(), "cannot remove mount stub: {e}");
            }
        }
        for (dir, times) in saved {
            if let Err(e) = rustix::fs::utimensat(CWD, &dir, &times, AtFlags::SYMLINK_NOFOLLOW) {
                tracing::warn!(path = %dir.display(), "cannot restore timestamps: {e}");
            }
        }
        self.created.clear();
        self.parents.clear();
    }
}

fn times_of(p: &Path) -> io::Result<Timestamps> {
    let m = p.symlink_metadata()?;
    Ok(Timestamps {
        last_access: Timespec { tv_sec: m.atime(), tv_nsec: m.atime_nsec() as _ },
        last_modification: Timespec { tv_sec: m.mtime(), tv_nsec: m.mtime_nsec() as _ },
    })
}

fn clone_times(t: &Timestamps) -> Timestamps {
    Timestamps {
        last_access: Timespec { tv_sec: t.last_access.tv_sec, tv_nsec: t.last_access.tv_nsec },
        last_modification: Timespec { tv_sec: t.last_modification.tv_sec, tv_nsec: t.last_modification.tv_nsec },
    }
}

/// Whether `path` (absolute, container view) is `dir` or below it.
pub(crate) fn is_under(path: &str, dir: &str) -> bool {
    let p = Path::new(path);
    p.starts_with(dir) && p.as_os_str().as_bytes().first() == Some(&b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::create_dir_all(t.path().join("usr/lib")).unwrap();
        fs::write(t.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        t
    }

    #[test]
    fn resolution_clamps_dotdot_and_absolute_links_at_the_root() {
        let t = root();
        let r = t.path();
        symlink("/usr/lib", r.join("lib")).unwrap();
        symlink("../../../../etc", r.join("usr/up")).unwrap();
        assert_eq!(resolve_in_root(r, "/../../etc/passwd").unwrap().full(), r.join("etc/passwd"));
        assert_eq!(resolve_in_root(r, "/lib/x").unwrap(), Resolved { existing: r.join("usr/lib"), missing: vec!["x".into()] });
        assert_eq!(resolve_in_root(r, "/usr/up/passwd").unwrap().full(), r.join("etc/passwd"));
    }

    #[test]
    fn resolution_of_a_dangling_link_points_inside_the_root() {
        // /etc/resolv.conf -> /run/systemd/resolve/stub-resolv.conf in many images.
        let t = root();
        let r = t.path();
        symlink("/run/systemd/resolve/stub-resolv.conf", r.join("etc/resolv.conf")).unwrap();
        let got = resolve_in_root(r, "/etc/resolv.conf").unwrap();
        assert_eq!(got.existing, r.to_path_buf());
        assert_eq!(got.missing, vec![OsString::from("run"), "systemd".into(), "resolve".into(), "stub-resolv.conf".into()]);
    }

    #[test]
    fn resolution_stops_symlink_loops() {
        let t = root();
        symlink("/b", t.path().join("a")).unwrap();
        symlink("/a", t.path().join("b")).unwrap();
        let err = resolve_in_root(t.path(), "/a/x").unwrap_err().to_string();
        assert!(err.contains("symbolic links"), "{err}");
    }

    #[test]
    fn resolution_through_a_file_is_an_error() {
        let t = root();
        let err = resolve_in_root(t.path(), "/etc/passwd/x").unwrap_err().to_string();
        assert!(err.contains("/etc/passwd is not a directory"), "{err}");
    }

    #[test]
    fn dotdot_after_a_missing_component_is_lexical() {
        let t = root();
        let got = resolve_in_root(t.path(), "/new/a/../b").unwrap();
        assert_eq!(got.missing, vec![OsString::from("new"), "b".into()]);
    }

    #[test]
    fn stubs_are_created_and_removed_leaving_parents_as_they_were() {
        let t = root();
        let r = t.path();
        let ts =
            Timestamps { last_access: Timespec { tv_sec: 1000, tv_nsec: 0 }, last_modification: Timespec { tv_sec: 1000, tv_nsec: 5 } };
        rustix::fs::utimensat(CWD, r.join("etc"), &ts, AtFlags::empty()).unwrap();
        let targets = vec![
            ("/etc/hosts".to_string(), StubKind::File),
            ("/etc/resolv.conf".to_string(), StubKind::File),
            ("/proc".to_string(), StubKind::Dir),
            ("/a/b/c".to_string(), StubKind::Dir),
            ("/etc/passwd".to_string(), StubKind::File),
        ];
        let mut stubs = MountStubs::create(r, &targets).unwrap();
        assert!(r.join("etc/hosts").is_file());
        assert!(r.join("a/b/c").is_dir());
        assert_eq!(stubs.created().len(), 6, "{:?}", stubs.created());
        stubs.remove();
        for gone in ["etc/hosts", "etc/resolv.conf", "proc", "a"] {
            assert!(!r.join(gone).exists(), "{gone} left behind");
        }
        assert!(r.join("etc/passwd").exists());
        let m = r.join("etc").metadata().unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1000, 5), "parent mtime restored");
    }

    #[test]
    fn system_mount_points_stay_in_the_layer_with_mode_0755() {
        // Regression (differential suite): BuildKit keeps the /proc, /dev and /sys mount
        // points of a RUN in the image; hoist removed them like mount stubs.
        let t = root();
        let r = t.path();
        ensure_system_mount_point(r, "/proc").unwrap();
        let m = r.join("proc").metadata().unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o7777, 0o755);
        // An existing entry is left as it is.
        fs::write(r.join("sys"), "not a dir").unwrap();
        ensure_system_mount_point(r, "/sys").unwrap();
        assert!(r.join("sys").is_file());
    }

    #[test]
    fn stubs_that_gained_content_are_kept() {
        let t = root();
        let r = t.path();
        let mut stubs = MountStubs::create(r, &[("/opt/x/y".to_string(), StubKind::Dir)]).unwrap();
        fs::write(r.join("opt/x/file"), "written by the step").unwrap();
        stubs.remove();
        assert!(!r.join("opt/x/y").exists());
        assert!(r.join("opt/x/file").exists());
    }

    #[test]
    fn cwd_is_created_and_owned_by_the_user() {
        let t = root();
        let me = rustix::process::getuid().as_raw();
        let mygid = rustix::process::getgid().as_raw();
        ensure_cwd(t.path(), "/work/dir", me, mygid).unwrap();
        let m = t.path().join("work/dir").metadata().unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o7777, 0o755 & !umask_bits());
        assert!(ensure_cwd(t.path(), "/etc/passwd", 0, 0).is_err());
    }

    fn umask_bits() -> u32 {
        let m = rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o022));
        rustix::process::umask(m);
        m.bits()
    }

    #[test]
    fn is_under_matches_whole_components() {
        assert!(is_under("/proc/sys", "/proc"));
        assert!(is_under("/proc", "/proc"));
        assert!(!is_under("/process", "/proc"));
    }
}
