//! Mounting overlayfs: the [`Mounter`] trait, the kernel implementation ([`OverlayMounter`],
//! on rustix) and a copying fake ([`CopyMounter`]) that lets the snapshot logic be tested
//! without root. Also reads `/proc/self/mountinfo` for crash recovery.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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
    Mount {
        /// The mount point.
        target: PathBuf,
        /// The error, with the kernel's messages.
        message: String,
    },
    /// Unmounting failed even lazily.
    #[error("cannot unmount {target}: {source}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The OS error (of the lazy retry, when the first attempt found the mount busy).
        source: io::Error,
    },
    /// An overlay without lower directories.
    #[error("overlay on {target} needs at least one lower directory")]
    NoLowers {
        /// The mount point.
        target: PathBuf,
    },
    /// Too many lowers for `mount(2)` (only without the new mount API).
    #[error(
        "overlay on {target}: {count} lower directories do not fit in one mount(2) option page \
         on this kernel (the new mount API of Linux 6.8+ has no such limit)"
    )]
    TooManyLowers {
        /// The mount point.
        target: PathBuf,
        /// How many lower directories were given.
        count: usize,
    },
    /// The test double failed to copy.
    #[error("fake mount on {target}: {source}")]
    Fake {
        /// The mount point.
        target: PathBuf,
        /// The OS error.
        source: io::Error,
    },
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

/// The kernel calls [`OverlayMounter`] makes, one method per call, so that its choices (new
/// mount API or `mount(2)`, the `volatile` retry, the option-length limit, lazy unmount) are
/// tested with injected errors ([`RecordingSyscalls`]) without root. [`KernelMounts`] makes
/// them.
pub trait MountSyscalls: Send + Sync {
    /// `fsopen(fstype, FSOPEN_CLOEXEC)`.
    fn fsopen(&self, fstype: &str) -> Result<OwnedFd, Errno>;
    /// `fsconfig(FSCONFIG_SET_STRING, key, value)`.
    fn fsconfig_set_string(&self, fs: BorrowedFd<'_>, key: &str, value: &OsStr) -> Result<(), Errno>;
    /// `fsconfig(FSCONFIG_SET_FLAG, key)`.
    fn fsconfig_set_flag(&self, fs: BorrowedFd<'_>, key: &str) -> Result<(), Errno>;
    /// `fsconfig(FSCONFIG_CMD_CREATE)`.
    fn fsconfig_create(&self, fs: BorrowedFd<'_>) -> Result<(), Errno>;
    /// `fsmount(fs, FSMOUNT_CLOEXEC, readonly ? MOUNT_ATTR_RDONLY : 0)`.
    fn fsmount(&self, fs: BorrowedFd<'_>, readonly: bool) -> Result<OwnedFd, Errno>;
    /// `move_mount(mnt, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)`.
    fn move_mount(&self, mnt: BorrowedFd<'_>, target: &Path) -> Result<(), Errno>;
    /// The messages the kernel left in an fs context (`e overlayfs: ...`).
    fn fs_log(&self, fs: BorrowedFd<'_>) -> Vec<String>;
    /// `open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC)`.
    fn open_path(&self, dir: &Path) -> Result<OwnedFd, Errno>;
    /// `mount("overlay", target, "overlay", readonly ? MS_RDONLY : 0, data)`.
    fn mount(&self, target: &Path, readonly: bool, data: &CStr) -> Result<(), Errno>;
    /// `umount2(target, detach ? MNT_DETACH : 0)`.
    fn unmount(&self, target: &Path, detach: bool) -> Result<(), Errno>;
}

/// [`MountSyscalls`] of the running kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelMounts;

impl MountSyscalls for KernelMounts {
    fn fsopen(&self, fstype: &str) -> Result<OwnedFd, Errno> {
        rustix::mount::fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC)
    }

    fn fsconfig_set_string(&self, fs: BorrowedFd<'_>, key: &str, value: &OsStr) -> Result<(), Errno> {
        rustix::mount::fsconfig_set_string(fs, key, value)
    }

    fn fsconfig_set_flag(&self, fs: BorrowedFd<'_>, key: &str) -> Result<(), Errno> {
        rustix::mount::fsconfig_set_flag(fs, key)
    }

    fn fsconfig_create(&self, fs: BorrowedFd<'_>) -> Result<(), Errno> {
        rustix::mount::fsconfig_create(fs)
    }

    fn fsmount(&self, fs: BorrowedFd<'_>, readonly: bool) -> Result<OwnedFd, Errno> {
        let attrs = if readonly { MountAttrFlags::MOUNT_ATTR_RDONLY } else { MountAttrFlags::empty() };
        rustix::mount::fsmount(fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
    }

    fn move_mount(&self, mnt: BorrowedFd<'_>, target: &Path) -> Result<(), Errno> {
        rustix::mount::move_mount(mnt, "", CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
    }

    fn fs_log(&self, fs: BorrowedFd<'_>) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        for _ in 0..16 {
            match rustix::io::read(fs, &mut buf[..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            }
        }
        out
    }

    fn open_path(&self, dir: &Path) -> Result<OwnedFd, Errno> {
        rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
    }

    fn mount(&self, target: &Path, readonly: bool, data: &CStr) -> Result<(), Errno> {
        let flags = if readonly { MountFlags::RDONLY } else { MountFlags::empty() };
        rustix::mount::mount("overlay", target, "overlay", flags, data)
    }

    fn unmount(&self, target: &Path, detach: bool) -> Result<(), Errno> {
        rustix::mount::unmount(target, if detach { UnmountFlags::DETACH } else { UnmountFlags::empty() })
    }
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
pub struct OverlayMounter {
    sys: std::sync::Arc<dyn MountSyscalls>,
    api: AtomicU8,
    /// Set once `mount(2)` refused [`OVERLAY_VOLATILE`].
    no_volatile: AtomicBool,
}

impl std::fmt::Debug for OverlayMounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayMounter").field("api", &self.api).field("no_volatile", &self.no_volatile).finish()
    }
}

impl Default for OverlayMounter {
    fn default() -> Self {
        Self::new()
    }
}

impl OverlayMounter {
    /// A mounter that picks the best API the kernel supports (probed on first use).
    pub fn new() -> Self {
        Self::with_syscalls(std::sync::Arc::new(KernelMounts))
    }

    /// A mounter that always uses `mount(2)` (for tests of the fallback).
    pub fn legacy() -> Self {
        let m = Self::new();
        m.api.store(API_LEGACY, Ordering::Relaxed);
        m
    }

    /// A mounter making its kernel calls through `sys`.
    pub fn with_syscalls(sys: std::sync::Arc<dyn MountSyscalls>) -> Self {
        OverlayMounter { sys, api: AtomicU8::new(API_UNKNOWN), no_volatile: AtomicBool::new(false) }
    }

    /// `message` with the messages the kernel left in the fs context appended.
    fn with_fs_log(&self, fs: &OwnedFd, message: String) -> String {
        self.sys.fs_log(fs.as_fd()).iter().fold(message, |m, log| format!("{m} ({log})"))
    }

    fn mount_new_api(&self, m: &OverlayMount) -> Result<bool, MountError> {
        let err = |message: String| MountError::Mount { target: m.target.clone(), message };
        let sys = &self.sys;
        let fs = match sys.fsopen("overlay") {
            Ok(fd) => fd,
            Err(Errno::NOSYS) => return Ok(false),
            Err(e) => return Err(err(format!("fsopen(overlay): {e}"))),
        };
        for (i, lower) in m.lowers.iter().enumerate() {
            if let Err(e) = sys.fsconfig_set_string(fs.as_fd(), "lowerdir+", lower.as_os_str()) {
                if i == 0 && e == Errno::INVAL {
                    // Kernel older than 6.8: no `lowerdir+`.
                    return Ok(false);
                }
                return Err(err(self.with_fs_log(&fs, format!("lower {}: {e}", lower.display()))));
            }
        }
        if let Some(up) = &m.upper {
            for (key, dir) in [("upperdir", &up.upper), ("workdir", &up.work)] {
                sys.fsconfig_set_string(fs.as_fd(), key, dir.as_os_str())
                    .map_err(|e| err(self.with_fs_log(&fs, format!("{key} {}: {e}", dir.display()))))?;
            }
            sys.fsconfig_set_flag(fs.as_fd(), OVERLAY_VOLATILE)
                .map_err(|e| err(self.with_fs_log(&fs, format!("{OVERLAY_VOLATILE}: {e}"))))?;
        }
        for (key, value) in OVERLAY_OPTIONS {
            sys.fsconfig_set_string(fs.as_fd(), key, OsStr::new(value))
                .map_err(|e| err(self.with_fs_log(&fs, format!("{key}={value}: {e}"))))?;
        }
        sys.fsconfig_create(fs.as_fd()).map_err(|e| err(self.with_fs_log(&fs, e.to_string())))?;
        let mnt = sys.fsmount(fs.as_fd(), m.readonly).map_err(|e| err(self.with_fs_log(&fs, format!("fsmount: {e}"))))?;
        sys.move_mount(mnt.as_fd(), &m.target).map_err(|e| err(format!("move_mount: {e}")))?;
        Ok(true)
    }

    fn mount_legacy(&self, m: &OverlayMount) -> Result<(), MountError> {
        let err = |message: String| MountError::Mount { target: m.target.clone(), message };
        let open =
            |p: &Path| -> Result<OwnedFd, MountError> { self.sys.open_path(p).map_err(|e| err(format!("open {}: {e}", p.display()))) };
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
        let c_data = CString::new(data.as_str()).map_err(|_| err("NUL byte in mount options".into()))?;
        match self.sys.mount(&m.target, m.readonly, c_data.as_c_str()) {
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
        let failed = |e: Errno| MountError::Unmount { target: target.to_path_buf(), source: e.into() };
        match self.sys.unmount(target, false) {
            Ok(()) => Ok(()),
            // Not a mount point (already unmounted) or gone.
            Err(Errno::INVAL) | Err(Errno::NOENT) => Ok(()),
            Err(Errno::BUSY) => self.sys.unmount(target, true).map_err(failed),
            Err(e) => Err(failed(e)),
        }
    }
}

/// [`MountSyscalls`] that succeed without touching the kernel (descriptors are of
/// `/dev/null`), record every call as text (`fsopen overlay`, `fsconfig lowerdir+=/l`,
/// `mount /t lowerdir=...`, `unmount /t detach`) and fail the calls a test names.
#[derive(Debug, Default)]
pub struct RecordingSyscalls {
    calls: Mutex<Vec<String>>,
    faults: Mutex<Vec<(String, Errno, usize)>>,
}

impl RecordingSyscalls {
    /// Calls so far, as text.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fail the next `times` calls whose text starts with `prefix` with `errno`.
    pub fn fail(&self, prefix: &str, errno: Errno, times: usize) {
        self.faults.lock().unwrap_or_else(|e| e.into_inner()).push((prefix.to_string(), errno, times));
    }

    fn call(&self, text: String) -> Result<(), Errno> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push(text.clone());
        match faults.iter_mut().find(|(p, _, n)| *n > 0 && text.starts_with(p.as_str())) {
            Some((_, errno, n)) => {
                *n -= 1;
                Err(*errno)
            }
            None => Ok(()),
        }
    }

    fn fd(&self, text: String) -> Result<OwnedFd, Errno> {
        self.call(text)?;
        rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
    }
}

impl MountSyscalls for RecordingSyscalls {
    fn fsopen(&self, fstype: &str) -> Result<OwnedFd, Errno> {
        self.fd(format!("fsopen {fstype}"))
    }

    fn fsconfig_set_string(&self, _: BorrowedFd<'_>, key: &str, value: &OsStr) -> Result<(), Errno> {
        self.call(format!("fsconfig {key}={}", value.to_string_lossy()))
    }

    fn fsconfig_set_flag(&self, _: BorrowedFd<'_>, key: &str) -> Result<(), Errno> {
        self.call(format!("fsconfig {key}"))
    }

    fn fsconfig_create(&self, _: BorrowedFd<'_>) -> Result<(), Errno> {
        self.call("fsconfig create".into())
    }

    fn fsmount(&self, _: BorrowedFd<'_>, readonly: bool) -> Result<OwnedFd, Errno> {
        self.fd(format!("fsmount{}", if readonly { " ro" } else { "" }))
    }

    fn move_mount(&self, _: BorrowedFd<'_>, target: &Path) -> Result<(), Errno> {
        self.call(format!("move_mount {}", target.display()))
    }

    fn fs_log(&self, _: BorrowedFd<'_>) -> Vec<String> {
        vec!["e overlayfs: recorded".into()]
    }

    fn open_path(&self, dir: &Path) -> Result<OwnedFd, Errno> {
        self.fd(format!("open {}", dir.display()))
    }

    fn mount(&self, target: &Path, readonly: bool, data: &CStr) -> Result<(), Errno> {
        self.call(format!("mount {}{} {}", target.display(), if readonly { " ro" } else { "" }, data.to_string_lossy()))
    }

    fn unmount(&self, target: &Path, detach: bool) -> Result<(), Errno> {
        self.call(format!("unmount {}{}", target.display(), if detach { " detach" } else { "" }))
    }
}

/// A fake [`Mounter`] for tests without root: "mounting" copies the lowers (bottom first,
/// applying 0/0 whiteouts) and the upper into the target; "unmounting" writes what changed
/// in the target into the upper directory, as overlayfs would have (deletions as whiteouts,
/// which needs CAP_MKNOD), and empties the target.
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
        let m = mounted.remove(i);
        if let Some(up) = &m.upper {
            // What overlayfs would have put in the upper directory: every change made in
            // the target, against the lowers it was made of.
            let base = tempfile::tempdir_in(&up.work).map_err(fake)?;
            for layer in m.lowers.iter().rev() {
                copy_layer(layer, base.path()).map_err(fake)?;
            }
            record_changes(target, base.path(), &up.upper).map_err(fake)?;
        }
        empty_dir(target).map_err(fake)
    }
}

fn empty_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        remove_any(&entry?.path())?;
    }
    Ok(())
}

/// Write into `upper` what differs in `changed` from `base`, in overlay format: new and
/// changed files, directories whose mode changed, whiteouts for what is gone.
fn record_changes(changed: &Path, base: &Path, upper: &Path) -> io::Result<()> {
    for entry in fs::read_dir(changed)? {
        let entry = entry?;
        let (now, before, out) = (entry.path(), base.join(entry.file_name()), upper.join(entry.file_name()));
        let meta = now.symlink_metadata()?;
        let old = before.symlink_metadata().ok();
        if meta.is_dir() && old.as_ref().is_some_and(|o| o.is_dir()) {
            let moved = old.as_ref().is_some_and(|o| o.permissions() != meta.permissions());
            if moved || !out.is_dir() {
                fs::create_dir_all(&out)?;
                fs::set_permissions(&out, meta.permissions())?;
            }
            record_changes(&now, &before, &out)?;
            if !moved && fs::read_dir(&out)?.next().is_none() {
                fs::remove_dir(&out)?;
            }
            continue;
        }
        let same = old.as_ref().is_some_and(|o| {
            o.file_type() == meta.file_type()
                && o.permissions() == meta.permissions()
                && if meta.file_type().is_symlink() {
                    fs::read_link(&now).ok() == fs::read_link(&before).ok()
                } else {
                    !meta.is_file() || fs::read(&now).ok() == fs::read(&before).ok()
                }
        });
        if !same {
            remove_any(&out)?;
            if meta.is_dir() {
                fs::create_dir(&out)?;
                fs::set_permissions(&out, meta.permissions())?;
            }
            copy_layer_entry(&now, &out, &meta)?;
        }
    }
    for entry in fs::read_dir(base)? {
        let name = entry?.file_name();
        if changed.join(&name).symlink_metadata().is_err() {
            rustix::fs::mknodat(CWD, upper.join(&name), rustix::fs::FileType::CharacterDevice, Mode::empty(), 0)?;
        }
    }
    Ok(())
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
            copy_layer_entry(&from, &to, &meta)?;
        }
    }
    Ok(())
}

/// Copy one entry: a file or symlink, or a directory's contents into the existing `to`.
fn copy_layer_entry(from: &Path, to: &Path, meta: &fs::Metadata) -> io::Result<()> {
    if meta.is_dir() {
        copy_layer(from, to)
    } else if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)
    } else if meta.is_file() {
        fs::copy(from, to).map(drop)
    } else {
        Ok(())
    }
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

    fn recorded() -> (std::sync::Arc<RecordingSyscalls>, OverlayMounter) {
        let sys = std::sync::Arc::new(RecordingSyscalls::default());
        (sys.clone(), OverlayMounter::with_syscalls(sys))
    }

    fn writable(lowers: &[&str]) -> OverlayMount {
        OverlayMount {
            lowers: lowers.iter().map(PathBuf::from).collect(),
            upper: Some(UpperDirs { upper: "/s/u".into(), work: "/s/w".into() }),
            target: "/s/m".into(),
            readonly: false,
        }
    }

    /// The `/proc/self/fd/N` options of a recorded `mount(2)` with the numbers taken out.
    fn without_fd_numbers(call: &str) -> String {
        let mut out = String::new();
        let mut digits = false;
        for c in call.chars() {
            if c.is_ascii_digit() && (digits || out.ends_with("/fd/")) {
                digits = true;
                continue;
            }
            digits = false;
            out.push(c);
        }
        out.replace("/fd/", "/fd/N")
    }

    #[test]
    fn the_new_mount_api_gets_one_lowerdir_per_layer_then_upper_work_and_volatile() {
        let (sys, m) = recorded();
        m.mount_overlay(&writable(&["/l/top", "/l/bottom"])).unwrap();
        assert_eq!(
            sys.calls(),
            [
                "fsopen overlay",
                "fsconfig lowerdir+=/l/top",
                "fsconfig lowerdir+=/l/bottom",
                "fsconfig upperdir=/s/u",
                "fsconfig workdir=/s/w",
                "fsconfig volatile",
                "fsconfig index=off",
                "fsconfig redirect_dir=off",
                "fsconfig metacopy=off",
                "fsconfig create",
                "fsmount",
                "move_mount /s/m",
            ]
        );
    }

    #[test]
    fn without_the_new_api_it_falls_back_to_mount2_once_and_for_all() {
        for (call, errno) in [("fsopen", Errno::NOSYS), ("fsconfig lowerdir+", Errno::INVAL)] {
            let (sys, m) = recorded();
            sys.fail(call, errno, 1);
            let read_only = OverlayMount { upper: None, readonly: true, ..writable(&["/l/a", "/l/b"]) };
            m.mount_overlay(&read_only).unwrap();
            let calls = sys.calls();
            let mount = calls.last().unwrap();
            assert_eq!(
                without_fd_numbers(mount),
                "mount /s/m ro lowerdir=/proc/self/fd/N:/proc/self/fd/N,index=off,redirect_dir=off,metacopy=off"
            );
            assert!(calls.contains(&"open /l/a".to_string()) && calls.contains(&"open /l/b".to_string()));
            // The next mount goes straight to mount(2).
            let before = calls.len();
            m.mount_overlay(&writable(&["/l/a"])).unwrap();
            let next = &sys.calls()[before..];
            assert!(next.iter().all(|c| !c.starts_with("fs")), "{next:?}");
            assert!(next.last().unwrap().ends_with(",volatile"), "{next:?}");
        }
    }

    #[test]
    fn a_kernel_without_volatile_gets_mounts_without_it_from_then_on() {
        let (sys, m) = recorded();
        sys.fail("fsopen", Errno::NOSYS, 1);
        sys.fail("mount ", Errno::INVAL, 1);
        m.mount_overlay(&writable(&["/l/a"])).unwrap();
        let mounts: Vec<String> = sys.calls().into_iter().filter(|c| c.starts_with("mount ")).collect();
        assert_eq!(mounts.len(), 2, "one retry");
        assert!(mounts[0].ends_with(",volatile") && !mounts[1].contains("volatile"), "{mounts:?}");
        m.mount_overlay(&writable(&["/l/a"])).unwrap();
        assert!(!sys.calls().last().unwrap().contains("volatile"));
        // Any other error is reported, not retried.
        sys.fail("mount ", Errno::PERM, 1);
        let err = m.mount_overlay(&writable(&["/l/a"])).unwrap_err().to_string();
        assert!(err.contains("mount(2)") && err.contains("/s/m"), "{err}");
    }

    #[test]
    fn too_many_lowers_for_one_option_page_is_an_error_before_mount2() {
        let (sys, m) = recorded();
        sys.fail("fsopen", Errno::NOSYS, 1);
        let lowers: Vec<String> = (0..400).map(|i| format!("/l/{i}")).collect();
        let lowers: Vec<&str> = lowers.iter().map(String::as_str).collect();
        match m.mount_overlay(&writable(&lowers)) {
            Err(MountError::TooManyLowers { count: 400, .. }) => {}
            other => panic!("expected TooManyLowers, got {other:?}"),
        }
        assert!(sys.calls().iter().all(|c| !c.starts_with("mount ")));
        // The new API has no such limit.
        let (sys, m) = recorded();
        m.mount_overlay(&writable(&lowers)).unwrap();
        assert_eq!(sys.calls().iter().filter(|c| c.starts_with("fsconfig lowerdir+")).count(), 400);
    }

    #[test]
    fn a_refused_layer_is_named_with_the_kernels_own_message() {
        let (sys, m) = recorded();
        sys.fail("fsconfig lowerdir+=/l/b", Errno::NOENT, 1);
        let err = m.mount_overlay(&writable(&["/l/a", "/l/b"])).unwrap_err().to_string();
        assert!(err.contains("lower /l/b") && err.contains("e overlayfs: recorded"), "{err}");
        assert!(sys.calls().iter().all(|c| !c.starts_with("mount ")), "an error on a later lower is not a missing API");
    }

    #[test]
    fn a_busy_mount_is_detached_and_a_missing_one_is_not_an_error() {
        let (sys, m) = recorded();
        sys.fail("unmount /s/m", Errno::BUSY, 1);
        m.unmount(Path::new("/s/m")).unwrap();
        assert_eq!(sys.calls(), ["unmount /s/m", "unmount /s/m detach"]);
        for errno in [Errno::INVAL, Errno::NOENT] {
            let (sys, m) = recorded();
            sys.fail("unmount", errno, 1);
            m.unmount(Path::new("/s/m")).unwrap();
            assert_eq!(sys.calls().len(), 1);
        }
        let (sys, m) = recorded();
        sys.fail("unmount", Errno::PERM, 1);
        assert!(matches!(m.unmount(Path::new("/s/m")), Err(MountError::Unmount { .. })));
    }

    #[test]
    fn mounting_without_lowers_is_refused() {
        let req = OverlayMount { lowers: vec![], upper: None, target: "/nonexistent".into(), readonly: true };
        assert!(matches!(CopyMounter::new().mount_overlay(&req), Err(MountError::NoLowers { .. })));
        assert!(matches!(OverlayMounter::new().mount_overlay(&req), Err(MountError::NoLowers { .. })));
    }
}
