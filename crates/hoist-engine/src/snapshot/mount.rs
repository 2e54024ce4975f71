//! Mounting overlayfs: the [`Mounter`] trait, the kernel implementation ([`OverlayMounter`],
//! on rustix) and a copying fake ([`CopyMounter`]) that lets the snapshot logic be tested
//! without root. Also reads `/proc/self/mountinfo` for crash recovery.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use rustix::fs::{Mode, OFlags, CWD};
use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MoveMountFlags, UnmountFlags};

/// Options every overlay mount gets: no index, no redirects, no metacopy, so that after
/// unmount the upperdir is a plain diff (full copies of changed files, whiteouts as 0/0
/// character devices and `trusted.overlay.opaque` on replaced directories).
pub const OVERLAY_OPTIONS: [(&str, &str); 3] = [("index", "off"), ("redirect_dir", "off"), ("metacopy", "off")];

/// The flag a writable overlay also gets (Linux ≥ 5.10): no sync of the upper filesystem.
/// Without it, unmounting an overlay syncs the whole filesystem under the upperdir, so
/// every step paid for writing out everything any build had written since the last
/// writeback: 0.3 s after pulling gcc:12, more after a RUN that writes 1 GiB. hoist never
/// mounts an upperdir twice (each mount gets fresh upper and work directories) and its
/// store does not promise to survive a power loss, which is what the sync would buy.
pub const OVERLAY_VOLATILE: &str = "volatile";

/// Upper and work directory of a writable overlay (same filesystem, work dir empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpperDirs {
    /// Receives every change (the layer diff).
    pub upper: PathBuf,
    /// Overlay's scratch directory.
    pub work: PathBuf,
}

/// One overlay mount request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayMount {
    /// Lower directories, topmost first (overlayfs order). At least one.
    pub lowers: Vec<PathBuf>,
    /// Upper and work directory; `None` mounts the lowers alone (read-only by nature).
    pub upper: Option<UpperDirs>,
    /// The mount point (an existing directory).
    pub target: PathBuf,
    /// Mount read-only (`MOUNT_ATTR_RDONLY` / `MS_RDONLY`).
    pub readonly: bool,
}

/// Errors of mounting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The kernel refused the mount (its own messages are included).
    #[error("cannot mount overlay on {target}: {message}")]
    Mount { target: PathBuf, message: String },
    /// Unmounting failed even lazily.
    #[error("cannot unmount {target}: {source}")]
    Unmount { target: PathBuf, source: io::Error },
    /// An overlay without lower directories.
    #[error("overlay on {target} needs at least one lower directory")]
    NoLowers { target: PathBuf },
    /// Too many lowers for `mount(2)` (only without the new mount API).
    #[error(
        "overlay on {target}: {count} lower directories do not fit in one mount(2) option page \
         on this kernel (the new mount API of Linux 6.8+ has no such limit)"
    )]
    TooManyLowers { target: PathBuf, count: usize },
    /// The test double failed to copy.
    #[error("fake mount on {target}: {source}")]
    Fake { target: PathBuf, source: io::Error },
}

/// Mounts and unmounts overlay filesystems. Kernel access sits behind this trait so that the
/// [`crate::snapshot::Snapshotter`] logic is unit-tested with [`CopyMounter`].
pub trait Mounter: Send + Sync {
    /// Mount an overlay as described. The target must exist.
    fn mount_overlay(&self, m: &OverlayMount) -> Result<(), MountError>;
    /// Unmount `target`; when it is busy, detach it lazily (`MNT_DETACH`). Unmounting
    /// something that is not mounted is not an error.
    fn unmount(&self, target: &Path) -> Result<(), MountError>;
}

const API_UNKNOWN: u8 = 0;
const API_NEW: u8 = 1;
const API_LEGACY: u8 = 2;

/// The real overlayfs mounter. Uses the new mount API (`fsopen("overlay")` + one
/// `fsconfig(lowerdir+)` per layer, Linux ≥ 6.8), which has no option-length limit, and
/// falls back to `mount(2)` with `lowerdir=a:b:c` on older kernels. In the fallback each
/// directory is passed as `/proc/self/fd/N` of an `O_PATH` descriptor, so that long state
/// paths and `:`/`,` in them neither overflow the one-page option string nor break parsing
/// (about 200 layers fit).
#[derive(Debug)]
pub struct OverlayMounter {
    api: AtomicU8,
    /// Set once `mount(2)` refused [`OVERLAY_VOLATILE`].
    no_volatile: AtomicBool,
}

impl Default for OverlayMounter {
    fn default() -> Self {
        Self::new()
    }
}

impl OverlayMounter {
    /// A mounter that picks the best API the kernel supports (probed on first use).
    pub fn new() -> Self {
        OverlayMounter { api: AtomicU8::new(API_UNKNOWN), no_volatile: AtomicBool::new(false) }
    }

    /// A mounter that always uses `mount(2)` (for tests of the fallback).
    pub fn legacy() -> Self {
        OverlayMounter { api: AtomicU8::new(API_LEGACY), no_volatile: AtomicBool::new(false) }
    }

    fn mount_new_api(&self, m: &OverlayMount) -> Result<bool, MountError> {
        let err = |message: String| MountError::Mount { target: m.target.clone(), message };
        let fs = match rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
            Ok(fd) => fd,
            Err(Errno::NOSYS) => return Ok(false),
            Err(e) => return Err(err(format!("fsopen(overlay): {e}"))),
        };
        for (i, lower) in m.lowers.iter().enumerate() {
            if let Err(e) = rustix::mount::fsconfig_set_string(&fs, "lowerdir+", lower) {
                if i == 0 && e == Errno::INVAL {
                    // Kernel older than 6.8: no `lowerdir+`.
                    return Ok(false);
                }
                return Err(err(with_fs_log(&fs, format!("lower {}: {e}", lower.display()))));
            }
        }
        if let Some(up) = &m.upper {
            for (key, dir) in [("upperdir", &up.upper), ("workdir", &up.work)] {
                rustix::mount::fsconfig_set_string(&fs, key, dir)
                    .map_err(|e| err(with_fs_log(&fs, format!("{key} {}: {e}", dir.display()))))?;
            }
            rustix::mount::fsconfig_set_flag(&fs, OVERLAY_VOLATILE)
                .map_err(|e| err(with_fs_log(&fs, format!("{OVERLAY_VOLATILE}: {e}"))))?;
        }
        for (key, value) in OVERLAY_OPTIONS {
            rustix::mount::fsconfig_set_string(&fs, key, value).map_err(|e| err(with_fs_log(&fs, format!("{key}={value}: {e}"))))?;
        }
        rustix::mount::fsconfig_create(&fs).map_err(|e| err(with_fs_log(&fs, e.to_string())))?;
        let attrs = if m.readonly { MountAttrFlags::MOUNT_ATTR_RDONLY } else { MountAttrFlags::empty() };
        let mnt = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
            .map_err(|e| err(with_fs_log(&fs, format!("fsmount: {e}"))))?;
        rustix::mount::move_mount(&mnt, "", CWD, &m.target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
            .map_err(|e| err(format!("move_mount: {e}")))?;
        Ok(true)
    }

    fn mount_legacy(&self, m: &OverlayMount) -> Result<(), MountError> {
        let err = |message: String| MountError::Mount { target: m.target.clone(), message };
        let open = |p: &Path| -> Result<OwnedFd, MountError> {
            rustix::fs::open(p, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| err(format!("open {}: {e}", p.display())))
        };
        let mut fds = Vec::new();
        let mut data = String::from("lowerdir=");
        for (i, lower) in m.lowers.iter().enumerate() {
            let fd = open(lower)?;
            if i > 0 {
                data.push(':');
            }
            data.push_str(&format!("/proc/self/fd/{}", fd.as_raw_fd()));
            fds.push(fd);
        }
        if let Some(up) = &m.upper {
            for (key, dir) in [("upperdir", &up.upper), ("workdir", &up.work)] {
                let fd = open(dir)?;
                data.push_str(&format!(",{key}=/proc/self/fd/{}", fd.as_raw_fd()));
                fds.push(fd);
            }
        }
        for (key, value) in OVERLAY_OPTIONS {
            data.push_str(&format!(",{key}={value}"));
        }
        let volatile = m.upper.is_some() && !self.no_volatile.load(Ordering::Relaxed);
        if volatile {
            data.push_str(&format!(",{OVERLAY_VOLATILE}"));
        }
        if data.len() >= 4095 {
            return Err(MountError::TooManyLowers { target: m.target.clone(), count: m.lowers.len() });
        }
        let flags = if m.readonly { MountFlags::RDONLY } else { MountFlags::empty() };
        let c_data = std::ffi::CString::new(data.as_str()).map_err(|_| err("NUL byte in mount options".into()))?;
        match rustix::mount::mount("overlay", &m.target, "overlay", flags, c_data.as_c_str()) {
            Ok(()) => {}
            Err(Errno::INVAL) if volatile => {
                // A kernel older than 5.10 has no `volatile`: mount without it from now on.
                self.no_volatile.store(true, Ordering::Relaxed);
                return self.mount_legacy(m);
            }
            Err(e) => return Err(err(format!("mount(2): {e}"))),
        }
        drop(fds);
        Ok(())
    }
}

/// Append the messages the kernel left in an fs context (`e overlayfs: ...`) to `base`.
fn with_fs_log(fs: &OwnedFd, base: String) -> String {
    let mut out = base;
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        match rustix::io::read(fs, &mut buf[..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]);
                out.push_str(" (");
                out.push_str(msg.trim());
                out.push(')');
            }
        }
    }
    out
}

impl Mounter for OverlayMounter {
    fn mount_overlay(&self, m: &OverlayMount) -> Result<(), MountError> {
        if m.lowers.is_empty() {
            return Err(MountError::NoLowers { target: m.target.clone() });
        }
        if self.api.load(Ordering::Relaxed) != API_LEGACY {
            if self.mount_new_api(m)? {
                self.api.store(API_NEW, Ordering::Relaxed);
                return Ok(());
            }
            self.api.store(API_LEGACY, Ordering::Relaxed);
        }
        self.mount_legacy(m)
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => Ok(()),
            // Not a mount point (already unmounted) or gone.
            Err(Errno::INVAL) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::BUSY) => rustix::mount::unmount(target, UnmountFlags::DETACH)
                .map_err(|e| MountError::Unmount { target: target.to_path_buf(), source: e.into() }),
            Err(e) => Err(MountError::Unmount { target: target.to_path_buf(), source: e.into() }),
        }
    }
}

/// A fake [`Mounter`] for tests without root: "mounting" copies the lowers (bottom first,
/// applying 0/0 whiteouts) and the upper into the target; "unmounting" empties the target.
/// It records what is mounted so that tests can check that every mount is released.
#[derive(Debug, Default)]
pub struct CopyMounter {
    mounted: Mutex<Vec<OverlayMount>>,
}

impl CopyMounter {
    /// A fake mounter with nothing mounted.
    pub fn new() -> Self {
        Self::default()
    }

    /// The mounts currently "mounted", in mount order.
    pub fn mounted(&self) -> Vec<OverlayMount> {
        self.mounted.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl Mounter for CopyMounter {
    fn mount_overlay(&self, m: &OverlayMount) -> Result<(), MountError> {
        if m.lowers.is_empty() {
            return Err(MountError::NoLowers { target: m.target.clone() });
        }
        let fake = |source: io::Error| MountError::Fake { target: m.target.clone(), source };
        let mut mounted = self.mounted.lock().map_err(|_| fake(io::Error::other("poisoned lock")))?;
        if mounted.iter().any(|x| x.target == m.target) {
            return Err(fake(io::Error::from(io::ErrorKind::AlreadyExists)));
        }
        let layers = m.lowers.iter().rev().chain(m.upper.as_ref().map(|u| &u.upper));
        for layer in layers {
            copy_layer(layer, &m.target).map_err(fake)?;
        }
        mounted.push(m.clone());
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let fake = |source: io::Error| MountError::Fake { target: target.to_path_buf(), source };
        let mut mounted = self.mounted.lock().map_err(|_| fake(io::Error::other("poisoned lock")))?;
        let Some(i) = mounted.iter().position(|x| x.target == target) else { return Ok(()) };
        mounted.remove(i);
        for entry in fs::read_dir(target).map_err(fake)? {
            let p = entry.map_err(fake)?.path();
            if p.symlink_metadata().map_err(fake)?.is_dir() {
                fs::remove_dir_all(&p).map_err(fake)?;
            } else {
                fs::remove_file(&p).map_err(fake)?;
            }
        }
        Ok(())
    }
}

/// True for an overlay whiteout: a character device with device number 0/0.
pub fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Copy one overlay-format layer onto `dst` (the fake's "merge").
fn copy_layer(src: &Path, dst: &Path) -> io::Result<()> {
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = from.symlink_metadata()?;
        if is_whiteout(&meta) {
            remove_any(&to)?;
            continue;
        }
        if meta.is_dir() {
            let existing = to.symlink_metadata().ok();
            if existing.as_ref().is_some_and(|e| !e.is_dir()) || is_opaque(&from) {
                remove_any(&to)?;
            }
            if !to.is_dir() {
                fs::create_dir(&to)?;
            }
            fs::set_permissions(&to, meta.permissions())?;
            copy_layer(&from, &to)?;
        } else {
            remove_any(&to)?;
            if meta.file_type().is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            } else if meta.is_file() {
                fs::copy(&from, &to)?;
            }
        }
    }
    Ok(())
}

fn remove_any(p: &Path) -> io::Result<()> {
    match p.symlink_metadata() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
    }
}

/// True when `dir` carries `trusted.overlay.opaque=y` (unreadable without root: false).
pub fn is_opaque(dir: &Path) -> bool {
    let mut buf = [0u8; 4];
    matches!(rustix::fs::lgetxattr(dir, "trusted.overlay.opaque", &mut buf[..]), Ok(n) if n >= 1 && buf[0] == b'y')
}

/// Mount points at or below `root`, as listed in `/proc/self/mountinfo`, deepest last in
/// mount order (unmount them in reverse).
pub fn mount_points_under(root: &Path) -> io::Result<Vec<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo_under(&text, root))
}

/// The pure part of [`mount_points_under`].
pub fn parse_mountinfo_under(mountinfo: &str, root: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mountinfo(field))))
        .filter(|p| p.starts_with(root))
        .collect()
}

/// Undo mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing_unescapes_and_filters_by_root() {
        let info = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
100 22 0:50 / /var/lib/hoist/snapshots/active/a\\040b/m rw - overlay overlay rw,lowerdir=x
101 22 0:51 / /var/lib/hoist/snapshotsX/m rw - overlay overlay rw
102 100 0:52 / /var/lib/hoist/snapshots/active/c/m rw - overlay overlay rw
";
        let got = parse_mountinfo_under(info, Path::new("/var/lib/hoist/snapshots"));
        assert_eq!(
            got,
            vec![PathBuf::from("/var/lib/hoist/snapshots/active/a b/m"), PathBuf::from("/var/lib/hoist/snapshots/active/c/m"),]
        );
    }

    #[test]
    fn unescape_leaves_malformed_escapes_alone() {
        assert_eq!(unescape_mountinfo("a\\04"), b"a\\04".to_vec());
        assert_eq!(unescape_mountinfo("a\\999b"), b"a\\999b".to_vec());
        assert_eq!(unescape_mountinfo("\\134x"), b"\\x".to_vec());
    }

    #[test]
    fn copy_mounter_merges_bottom_first_and_applies_whiteouts() {
        let t = tempfile::tempdir().unwrap();
        let (bottom, top, target) = (t.path().join("b"), t.path().join("t"), t.path().join("m"));
        for d in [&bottom, &top, &target] {
            fs::create_dir(d).unwrap();
        }
        fs::write(bottom.join("keep"), "bottom").unwrap();
        fs::write(bottom.join("over"), "bottom").unwrap();
        fs::write(top.join("over"), "top").unwrap();
        let whiteout_ok =
            rustix::fs::mknodat(CWD, top.join("keep"), rustix::fs::FileType::CharacterDevice, Mode::from_bits_truncate(0o600), 0).is_ok();
        let m = CopyMounter::new();
        let req = OverlayMount { lowers: vec![top.clone(), bottom.clone()], upper: None, target: target.clone(), readonly: false };
        m.mount_overlay(&req).unwrap();
        assert_eq!(fs::read_to_string(target.join("over")).unwrap(), "top");
        assert_eq!(target.join("keep").exists(), !whiteout_ok);
        assert!(m.mount_overlay(&req).is_err(), "double mount on one target must fail");
        assert_eq!(m.mounted(), vec![req]);
        m.unmount(&target).unwrap();
        assert!(m.mounted().is_empty());
        assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
        m.unmount(&target).unwrap();
    }

    #[test]
    fn mounting_without_lowers_is_refused() {
        let req = OverlayMount { lowers: vec![], upper: None, target: "/nonexistent".into(), readonly: true };
        assert!(matches!(CopyMounter::new().mount_overlay(&req), Err(MountError::NoLowers { .. })));
        assert!(matches!(OverlayMounter::new().mount_overlay(&req), Err(MountError::NoLowers { .. })));
    }
}
