//! Extracting a layer tar onto a directory ([`extract_layer_tar`]) in the overlay format:
//! OCI whiteouts become 0/0 character devices and opaque markers an `overlay.opaque` xattr
//! (or stay plain files in [`WhiteoutMode::Keep`]), AUFS metadata is skipped. Every entry
//! lands inside the target: names are clamped at the root, parent directories are resolved
//! component by component with `O_NOFOLLOW` (symlinks followed as if the root were `/`, at
//! most 40 of them), the final component is replaced rather than followed, and hardlinks
//! must point at a file already inside. Byte and entry limits stop decompression bombs;
//! directory modes and mtimes are applied after the last entry.

use std::cell::Cell;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use super::{is_overlay_xattr, ExtractOptions, ExtractStats, LayerError, WhiteoutMode, WHITEOUT_OPAQUE, WHITEOUT_PREFIX};

/// Prefix of AUFS metadata entries (`.wh..wh.plnk`, ...), skipped on extraction.
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
/// Symlinks followed at most while resolving one path (the kernel's limit).
const MAX_SYMLINK_FOLLOWS: u32 = 40;

/// Counts the bytes read and fails once more than `max` are requested.
struct LimitedReader<R> {
    inner: R,
    count: Rc<Cell<u64>>,
    max: Option<u64>,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.count.get() + n as u64;
        if let Some(max) = self.max {
            if total > max {
                self.exceeded.set(true);
                return Err(io::Error::other("layer byte limit exceeded"));
            }
        }
        self.count.set(total);
        Ok(n)
    }
}

/// Extract a layer tar from `input` into `dir` (which must exist), in the overlay format
/// chosen by `opts.whiteouts`; see the `layer` module doc for the safety rules.
///
/// Reads `input` up to the tar's end-of-archive marker; a caller hashing the whole stream
/// (for a diff_id) drains the rest itself. Directory modes and mtimes are applied last.
pub fn extract_layer_tar(input: impl Read, dir: &Path, opts: &ExtractOptions) -> Result<ExtractStats, LayerError> {
    let root: OwnedFd = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| LayerError::ReadDir { path: dir.to_path_buf(), source: e.into() })?;
    let count = Rc::new(Cell::new(0u64));
    let exceeded = Rc::new(Cell::new(false));
    let reader = LimitedReader { inner: input, count: Rc::clone(&count), max: opts.max_bytes, exceeded: Rc::clone(&exceeded) };
    let mut archive = tar::Archive::new(reader);
    let mut x = Extractor { root, dir, opts, stats: ExtractStats::default(), cache: None, dirs: Vec::new(), buf: vec![0u8; 256 * 1024] };

    let limit_or = |after: Option<String>, source: io::Error| {
        if exceeded.get() {
            LayerError::Limit { limit: "max bytes", max: opts.max_bytes.unwrap_or(0) }
        } else {
            LayerError::ReadTar { after, source }
        }
    };
    let mut last: Option<String> = None;
    let entries = archive.entries().map_err(|e| limit_or(None, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| limit_or(last.clone(), e))?;
        x.stats.entries += 1;
        if let Some(max) = opts.max_entries {
            if x.stats.entries > max {
                return Err(LayerError::Limit { limit: "max entries", max });
            }
        }
        let name = entry.path_bytes().into_owned();
        let ename = String::from_utf8_lossy(&name).into_owned();
        match x.entry(&mut entry, &name, &ename) {
            Ok(()) => {}
            Err(LayerError::ReadTar { source, .. }) => return Err(limit_or(Some(ename), source)),
            Err(e) => return Err(e),
        }
        last = Some(ename);
    }
    x.finish_dirs()?;
    x.stats.bytes = count.get();
    Ok(x.stats)
}

/// A directory whose mode and mtime are applied after every entry.
struct DeferredDir {
    entry: String,
    comps: Vec<Vec<u8>>,
    mode: u32,
    mtime: Timespec,
    dev: u64,
    ino: u64,
}

struct Extractor<'a> {
    root: OwnedFd,
    dir: &'a Path,
    opts: &'a ExtractOptions,
    stats: ExtractStats,
    /// The last resolved parent directory; dropped whenever anything is removed.
    cache: Option<(Vec<Vec<u8>>, OwnedFd)>,
    dirs: Vec<DeferredDir>,
    buf: Vec<u8>,
}

/// The clean components of a tar name: `.`/empty dropped, `..` clamped at the root.
fn clamp_components(name: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c.to_vec()),
        }
    }
    out
}

/// Metadata common to the entry kinds.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn parse_pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    if !frac.is_empty() {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = digits.parse().ok()?;
    }
    Some(if neg {
        if nanos > 0 {
            Timespec { tv_sec: -secs - 1, tv_nsec: 1_000_000_000 - nanos }
        } else {
            Timespec { tv_sec: -secs, tv_nsec: 0 }
        }
    } else {
        Timespec { tv_sec: secs, tv_nsec: nanos }
    })
}

fn is_not_supported(e: Errno) -> bool {
    e == Errno::NOTSUP || e == Errno::OPNOTSUPP
}

impl Extractor<'_> {
    fn err(&self, entry: &str, op: &'static str) -> impl FnOnce(Errno) -> LayerError + '_ {
        let entry = entry.to_string();
        move |e| LayerError::Extract { entry, dir: self.dir.to_path_buf(), op, source: e.into() }
    }

    fn bad(entry: &str, reason: impl Into<String>) -> LayerError {
        LayerError::BadEntry { entry: entry.to_string(), reason: reason.into() }
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, ename: &str) -> Result<Meta, LayerError> {
        let h = entry.header();
        let mode = h.mode().map_err(|e| Self::bad(ename, format!("invalid mode field: {e}")))? & 0o7777;
        let uid = h.uid().map_err(|e| Self::bad(ename, format!("invalid uid field: {e}")))?;
        let gid = h.gid().map_err(|e| Self::bad(ename, format!("invalid gid field: {e}")))?;
        let mtime = h.mtime().unwrap_or(0);
        let mut mtime = Timespec { tv_sec: mtime.min(i64::MAX as u64) as i64, tv_nsec: 0 };
        let mut xattrs = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(|source| LayerError::ReadTar { after: None, source })? {
            for ext in exts {
                let ext = ext.map_err(|source| LayerError::ReadTar { after: None, source })?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                } else if key == b"mtime" {
                    if let Some(t) = parse_pax_time(ext.value_bytes()) {
                        mtime = t;
                    }
                }
            }
        }
        let (uid, gid) = match self.opts.chown {
            Some(ids) => ids,
            None => (
                u32::try_from(uid).map_err(|_| Self::bad(ename, format!("uid {uid} out of range")))?,
                u32::try_from(gid).map_err(|_| Self::bad(ename, format!("gid {gid} out of range")))?,
            ),
        };
        Ok(Meta { mode, uid, gid, mtime, xattrs })
    }

    /// Open the directory `comps` inside the root, following symlinks as if the root were
    /// `/` (never leaving it) and creating missing directories (0755) when `create`.
    fn open_dir(&mut self, comps: &[Vec<u8>], create: bool, ename: &str) -> Result<OwnedFd, LayerError> {
        if let Some((key, fd)) = &self.cache {
            if key.as_slice() == comps {
                return fd.try_clone().map_err(|e| LayerError::Extract {
                    entry: ename.to_string(),
                    dir: self.dir.to_path_buf(),
                    op: "dup",
                    source: e,
                });
            }
        }
        let fd = self.resolve(comps, create, ename)?;
        if let Ok(dup) = fd.try_clone() {
            self.cache = Some((comps.to_vec(), dup));
        }
        Ok(fd)
    }

    fn reopen_root(&self, ename: &str) -> Result<OwnedFd, LayerError> {
        rustix::fs::openat(&self.root, ".", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(self.err(ename, "open root"))
    }

    fn resolve(&self, comps: &[Vec<u8>], create: bool, ename: &str) -> Result<OwnedFd, LayerError> {
        let mut cur = self.reopen_root(ename)?;
        // The real path of `cur` below the root (no symlinks in it), to handle `..`.
        let mut real: Vec<Vec<u8>> = Vec::new();
        let mut queue: std::collections::VecDeque<Vec<u8>> = comps.iter().cloned().collect();
        let mut follows = 0u32;
        while let Some(c) = queue.pop_front() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    real.pop();
                    cur = self.reopen_root(ename)?;
                    for r in &real {
                        cur = rustix::fs::openat(
                            &cur,
                            OsStr::from_bytes(r),
                            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(self.err(ename, "reopen parent"))?;
                    }
                    continue;
                }
                _ => {}
            }
            let name = OsStr::from_bytes(&c);
            match rustix::fs::openat(&cur, name, OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
                Ok(fd) => {
                    cur = fd;
                    real.push(c);
                }
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(self.err(ename, "create parent directory")(e)),
                    }
                    queue.push_front(c);
                }
                Err(Errno::NOENT) => {
                    return Err(Self::bad(ename, format!("directory {:?} does not exist in this layer", String::from_utf8_lossy(&c))))
                }
                Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
                    let st = rustix::fs::statat(&cur, name, AtFlags::SYMLINK_NOFOLLOW).map_err(self.err(ename, "stat parent"))?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
                        return Err(Self::bad(ename, format!("parent {:?} is not a directory", String::from_utf8_lossy(&c))));
                    }
                    follows += 1;
                    if follows > MAX_SYMLINK_FOLLOWS {
                        return Err(Self::bad(ename, "too many levels of symbolic links (a symlink loop?)"));
                    }
                    let target = rustix::fs::readlinkat(&cur, name, Vec::new()).map_err(self.err(ename, "read symlink"))?;
                    let target = target.into_bytes();
                    if target.first() == Some(&b'/') {
                        real.clear();
                        cur = self.reopen_root(ename)?;
                    }
                    for t in target.split(|b| *b == b'/').rev() {
                        queue.push_front(t.to_vec());
                    }
                }
                Err(e) => return Err(self.err(ename, "open parent directory")(e)),
            }
        }
        Ok(cur)
    }

    /// Make room for a new entry `name` in `parent`: remove what is there unless both are
    /// directories. Returns whether an existing directory is kept.
    fn prepare_slot(&mut self, parent: &OwnedFd, name: &OsStr, is_dir: bool, ename: &str) -> Result<bool, LayerError> {
        match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(self.err(ename, "stat existing")(e)),
            Ok(st) => {
                let existing_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                if existing_dir && is_dir {
                    return Ok(true);
                }
                self.cache = None;
                if existing_dir {
                    remove_tree(parent, name).map_err(self.err(ename, "remove existing directory"))?;
                } else {
                    rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(self.err(ename, "remove existing entry"))?;
                }
                Ok(false)
            }
        }
    }

    fn set_xattrs_fd(&self, fd: &OwnedFd, xattrs: &[(Vec<u8>, Vec<u8>)], ename: &str) -> Result<(), LayerError> {
        for (k, v) in xattrs {
            if is_overlay_xattr(k) {
                continue; // never let a tar steer overlayfs
            }
            match rustix::fs::fsetxattr(fd, OsStr::from_bytes(k), v, rustix::fs::XattrFlags::empty()) {
                Ok(()) => {}
                Err(e) if is_not_supported(e) => {
                    tracing::warn!(entry = ename, xattr = %String::from_utf8_lossy(k), "xattr not supported here; skipped")
                }
                Err(e) => return Err(self.err(ename, "set xattr")(e)),
            }
        }
        Ok(())
    }

    /// Set xattrs on `name` in `parent` without following it (symlinks, devices).
    fn set_xattrs_at(&self, parent: &OwnedFd, name: &OsStr, xattrs: &[(Vec<u8>, Vec<u8>)], ename: &str) -> Result<(), LayerError> {
        let xattrs: Vec<_> = xattrs.iter().filter(|(k, _)| !is_overlay_xattr(k)).collect();
        if xattrs.is_empty() {
            return Ok(());
        }
        let mut path = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
        path.extend_from_slice(name.as_bytes());
        let path = OsStr::from_bytes(&path);
        for (k, v) in xattrs {
            match rustix::fs::lsetxattr(path, OsStr::from_bytes(k), v, rustix::fs::XattrFlags::empty()) {
                Ok(()) => {}
                Err(e) if is_not_supported(e) || e == Errno::PERM => {
                    tracing::warn!(entry = ename, xattr = %String::from_utf8_lossy(k), "xattr not allowed here; skipped")
                }
                Err(e) => return Err(self.err(ename, "set xattr")(e)),
            }
        }
        Ok(())
    }

    fn owner(&self, m: &Meta) -> Option<(rustix::fs::Uid, rustix::fs::Gid)> {
        (self.opts.same_owner || self.opts.chown.is_some())
            .then(|| (rustix::fs::Uid::from_raw_unchecked(m.uid), rustix::fs::Gid::from_raw_unchecked(m.gid)))
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, name: &[u8], ename: &str) -> Result<(), LayerError> {
        let mut kind = entry.header().entry_type();
        let comps = clamp_components(name);
        use tar::EntryType as T;
        if matches!(kind, T::Regular | T::Continuous) && name.ends_with(b"/") {
            kind = T::Directory; // old tars mark directories by a trailing slash only
        }
        let Some((base, parent_comps)) = comps.split_last() else {
            // The root itself: its metadata belongs to whoever owns the target directory.
            self.stats.skipped += 1;
            return Ok(());
        };
        let base_os = OsStr::from_bytes(base);

        if self.opts.whiteouts != WhiteoutMode::Keep && base.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(base, parent_comps, ename);
        }

        match kind {
            T::Regular | T::Continuous | T::GNUSparse => {
                let meta = self.meta(entry, ename)?;
                let parent = self.open_dir(parent_comps, true, ename)?;
                self.prepare_slot(&parent, base_os, false, ename)?;
                let fd = rustix::fs::openat(
                    &parent,
                    base_os,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(self.err(ename, "create file"))?;
                let mut file = File::from(fd);
                loop {
                    let n = match entry.read(&mut self.buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(source) => return Err(LayerError::ReadTar { after: None, source }),
                    };
                    self.stats.content_bytes += n as u64;
                    if let Some(max) = self.opts.max_bytes {
                        if self.stats.content_bytes > max {
                            return Err(LayerError::Limit { limit: "max bytes", max });
                        }
                    }
                    file.write_all(&self.buf[..n]).map_err(|source| LayerError::Extract {
                        entry: ename.to_string(),
                        dir: self.dir.to_path_buf(),
                        op: "write file",
                        source,
                    })?;
                }
                let fd = OwnedFd::from(file);
                if let Some((u, g)) = self.owner(&meta) {
                    rustix::fs::fchown(&fd, Some(u), Some(g)).map_err(self.err(ename, "chown"))?;
                }
                // After chown, which clears setuid/setgid; xattrs after chown too, which
                // clears security.capability.
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode)).map_err(self.err(ename, "chmod"))?;
                self.set_xattrs_fd(&fd, &meta.xattrs, ename)?;
                let t = Timestamps { last_access: meta.mtime, last_modification: meta.mtime };
                rustix::fs::futimens(&fd, &t).map_err(self.err(ename, "set mtime"))?;
                self.stats.files += 1;
            }
            T::Directory => {
                let meta = self.meta(entry, ename)?;
                let parent = self.open_dir(parent_comps, true, ename)?;
                let kept = self.prepare_slot(&parent, base_os, true, ename)?;
                if !kept {
                    rustix::fs::mkdirat(&parent, base_os, Mode::from_raw_mode(0o700)).map_err(self.err(ename, "create directory"))?;
                }
                let fd = rustix::fs::openat(
                    &parent,
                    base_os,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(self.err(ename, "open directory"))?;
                if let Some((u, g)) = self.owner(&meta) {
                    rustix::fs::fchown(&fd, Some(u), Some(g)).map_err(self.err(ename, "chown"))?;
                }
                self.set_xattrs_fd(&fd, &meta.xattrs, ename)?;
                let st = rustix::fs::fstat(&fd).map_err(self.err(ename, "stat directory"))?;
                self.dirs.push(DeferredDir {
                    entry: ename.to_string(),
                    comps: comps.clone(),
                    mode: meta.mode,
                    mtime: meta.mtime,
                    dev: st.st_dev,
                    ino: st.st_ino,
                });
                self.stats.dirs += 1;
            }
            T::Symlink => {
                let meta = self.meta(entry, ename)?;
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                if target.is_empty() {
                    return Err(Self::bad(ename, "symlink without a target"));
                }
                let parent = self.open_dir(parent_comps, true, ename)?;
                self.prepare_slot(&parent, base_os, false, ename)?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, base_os).map_err(self.err(ename, "create symlink"))?;
                if let Some((u, g)) = self.owner(&meta) {
                    rustix::fs::chownat(&parent, base_os, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW).map_err(self.err(ename, "chown"))?;
                }
                self.set_xattrs_at(&parent, base_os, &meta.xattrs, ename)?;
                let t = Timestamps { last_access: meta.mtime, last_modification: meta.mtime };
                rustix::fs::utimensat(&parent, base_os, &t, AtFlags::SYMLINK_NOFOLLOW).map_err(self.err(ename, "set mtime"))?;
                self.stats.symlinks += 1;
            }
            T::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                self.hardlink(&target, base, parent_comps, ename)?;
            }
            T::Char | T::Block | T::Fifo => {
                let meta = self.meta(entry, ename)?;
                let (ft, dev) = match kind {
                    T::Char | T::Block => {
                        let h = entry.header();
                        let major = h.device_major().ok().flatten().unwrap_or(0);
                        let minor = h.device_minor().ok().flatten().unwrap_or(0);
                        let ft = if kind == T::Char { FileType::CharacterDevice } else { FileType::BlockDevice };
                        (ft, rustix::fs::makedev(major, minor))
                    }
                    _ => (FileType::Fifo, 0),
                };
                let parent = self.open_dir(parent_comps, true, ename)?;
                self.prepare_slot(&parent, base_os, false, ename)?;
                rustix::fs::mknodat(&parent, base_os, ft, Mode::from_raw_mode(meta.mode & 0o777), dev)
                    .map_err(self.err(ename, "create device node"))?;
                if let Some((u, g)) = self.owner(&meta) {
                    rustix::fs::chownat(&parent, base_os, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW).map_err(self.err(ename, "chown"))?;
                }
                rustix::fs::chmodat(&parent, base_os, Mode::from_raw_mode(meta.mode), AtFlags::empty())
                    .map_err(self.err(ename, "chmod"))?;
                self.set_xattrs_at(&parent, base_os, &meta.xattrs, ename)?;
                let t = Timestamps { last_access: meta.mtime, last_modification: meta.mtime };
                rustix::fs::utimensat(&parent, base_os, &t, AtFlags::SYMLINK_NOFOLLOW).map_err(self.err(ename, "set mtime"))?;
                self.stats.devices += 1;
            }
            _ => {
                tracing::debug!(entry = ename, kind = ?kind, "skipping tar entry of unsupported type");
                self.stats.skipped += 1;
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, base: &[u8], parent_comps: &[Vec<u8>], ename: &str) -> Result<(), LayerError> {
        if base == WHITEOUT_OPAQUE.as_bytes() {
            let parent = self.open_dir(parent_comps, true, ename)?;
            let dirfd = rustix::fs::openat(&parent, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .map_err(self.err(ename, "open opaque directory"))?;
            let key = match self.opts.whiteouts {
                WhiteoutMode::OverlayUserXattr => "user.overlay.opaque",
                _ => "trusted.overlay.opaque",
            };
            rustix::fs::fsetxattr(&dirfd, key, b"y", rustix::fs::XattrFlags::empty()).map_err(self.err(ename, "mark directory opaque"))?;
            self.stats.opaque_dirs += 1;
            return Ok(());
        }
        if base.starts_with(WHITEOUT_META_PREFIX.as_bytes()) {
            self.stats.skipped += 1;
            return Ok(());
        }
        let target = &base[WHITEOUT_PREFIX.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(Self::bad(ename, "whiteout names no file"));
        }
        let target = OsStr::from_bytes(target);
        let parent = self.open_dir(parent_comps, true, ename)?;
        self.prepare_slot(&parent, target, false, ename)?;
        rustix::fs::mknodat(&parent, target, FileType::CharacterDevice, Mode::empty(), rustix::fs::makedev(0, 0))
            .map_err(self.err(ename, "create whiteout device"))?;
        self.stats.whiteouts += 1;
        Ok(())
    }

    fn hardlink(&mut self, target: &[u8], base: &[u8], parent_comps: &[Vec<u8>], ename: &str) -> Result<(), LayerError> {
        // `..` that climbs above the root is an escape attempt, not something to clamp.
        let mut depth: i64 = 0;
        for c in target.split(|b| *b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => {
                    depth -= 1;
                    if depth < 0 {
                        return Err(Self::bad(
                            ename,
                            format!("hardlink target {:?} is outside the layer", String::from_utf8_lossy(target)),
                        ));
                    }
                }
                _ => depth += 1,
            }
        }
        let tcomps = clamp_components(target);
        let Some((tbase, tparent_comps)) = tcomps.split_last() else {
            return Err(Self::bad(ename, "hardlink without a target"));
        };
        let tparent = match self.resolve(tparent_comps, false, ename) {
            Ok(fd) => fd,
            Err(LayerError::BadEntry { .. }) => {
                return Err(Self::bad(ename, format!("hardlink target {:?} does not exist in this layer", String::from_utf8_lossy(target))))
            }
            Err(e) => return Err(e),
        };
        let tbase_os = OsStr::from_bytes(tbase);
        let tst = match rustix::fs::statat(&tparent, tbase_os, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => {
                return Err(Self::bad(ename, format!("hardlink target {:?} does not exist in this layer", String::from_utf8_lossy(target))))
            }
            Err(e) => return Err(self.err(ename, "stat hardlink target")(e)),
        };
        if FileType::from_raw_mode(tst.st_mode) == FileType::Directory {
            return Err(Self::bad(ename, format!("hardlink target {:?} is a directory", String::from_utf8_lossy(target))));
        }
        let base_os = OsStr::from_bytes(base);
        let parent = self.open_dir(parent_comps, true, ename)?;
        if let Ok(st) = rustix::fs::statat(&parent, base_os, AtFlags::SYMLINK_NOFOLLOW) {
            if st.st_dev == tst.st_dev && st.st_ino == tst.st_ino {
                self.stats.hardlinks += 1;
                return Ok(()); // already that file
            }
        }
        self.prepare_slot(&parent, base_os, false, ename)?;
        rustix::fs::linkat(&tparent, tbase_os, &parent, base_os, AtFlags::empty()).map_err(self.err(ename, "create hardlink"))?;
        self.stats.hardlinks += 1;
        Ok(())
    }

    /// Apply directory modes and mtimes, deepest (latest) first, skipping directories that
    /// later entries replaced.
    fn finish_dirs(&mut self) -> Result<(), LayerError> {
        let dirs = std::mem::take(&mut self.dirs);
        // A directory named twice gets the metadata of its last entry.
        let mut done = std::collections::HashSet::new();
        for d in dirs.iter().rev() {
            if !done.insert((d.dev, d.ino)) {
                continue;
            }
            let Some((base, parent_comps)) = d.comps.split_last() else { continue };
            let Ok(parent) = self.resolve(parent_comps, false, &d.entry) else { continue };
            let Ok(fd) = rustix::fs::openat(
                &parent,
                OsStr::from_bytes(base),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            match rustix::fs::fstat(&fd) {
                Ok(st) if st.st_dev == d.dev && st.st_ino == d.ino => {}
                _ => continue,
            }
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(d.mode)).map_err(self.err(&d.entry, "chmod directory"))?;
            let t = Timestamps { last_access: d.mtime, last_modification: d.mtime };
            rustix::fs::futimens(&fd, &t).map_err(self.err(&d.entry, "set directory mtime"))?;
        }
        Ok(())
    }
}

/// Remove the directory `name` in `parent` and everything below it, never following
/// symlinks.
fn remove_tree(parent: &OwnedFd, name: &OsStr) -> Result<(), Errno> {
    let fd = rustix::fs::openat(parent, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let mut names = Vec::new();
    {
        let mut dir = rustix::fs::Dir::read_from(&fd)?;
        while let Some(ent) = dir.read() {
            let ent = ent?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push((OsString::from_vec(n.to_vec()), ent.file_type()));
            }
        }
    }
    for (n, ft) in names {
        let is_dir = match ft {
            FileType::Directory => true,
            FileType::Unknown => rustix::fs::statat(&fd, &n, AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)?,
            _ => false,
        };
        if is_dir {
            remove_tree(&fd, &n)?;
        } else {
            rustix::fs::unlinkat(&fd, &n, AtFlags::empty())?;
        }
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt};
    use std::path::PathBuf;

    use super::*;
    use crate::layer::header::Hdr;
    use crate::layer::test_support::*;
    use crate::layer::walk::read_xattrs;

    #[test]
    fn oci_whiteouts_become_overlay_whiteouts() {
        if !crate::testing::needs_root() {
            return;
        }
        let tar_bytes = raw_tar(&[
            (hdr(".wh.gone", b'0'), b""),
            (hdr("d/", b'5'), b""),
            (hdr("d/.wh..wh..opq", b'0'), b""),
            (hdr("d/x", b'0'), b"x"),
            (hdr(".wh..wh.plnk", b'0'), b""),
            (Hdr { xattrs: vec![(b"trusted.overlay.redirect".to_vec(), b"/etc".to_vec())], ..hdr("sneaky/", b'5') }, b""),
        ]);
        let t = tempfile::tempdir().unwrap();
        let xs = extract_layer_tar(&tar_bytes[..], t.path(), &ExtractOptions::default()).unwrap();
        let md = fs::symlink_metadata(t.path().join("gone")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(md.file_type().is_char_device() && md.rdev() == 0, "whiteout is a 0/0 char device");
        assert!(!t.path().join(".wh.gone").exists());
        let x = read_xattrs(&t.path().join("d")).unwrap();
        assert!(x.contains(&(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())), "{x:?}");
        assert!(!t.path().join("d/.wh..wh..opq").exists());
        assert!(!t.path().join(".wh..wh.plnk").exists());
        assert!(read_xattrs(&t.path().join("sneaky")).unwrap().is_empty(), "overlay xattrs from a tar are dropped");
        assert_eq!((xs.whiteouts, xs.opaque_dirs, xs.skipped), (1, 1, 1));

        // user.overlay variant.
        let u = tempfile::tempdir().unwrap();
        let opts = ExtractOptions { whiteouts: WhiteoutMode::OverlayUserXattr, ..Default::default() };
        extract_layer_tar(&tar_bytes[..], u.path(), &opts).unwrap();
        assert!(read_xattrs(&u.path().join("d")).unwrap().contains(&(b"user.overlay.opaque".to_vec(), b"y".to_vec())));

        // Keep mode (ADD of a tar): whiteouts stay plain files.
        let k = tempfile::tempdir().unwrap();
        let opts = ExtractOptions { whiteouts: WhiteoutMode::Keep, ..Default::default() };
        extract_layer_tar(&tar_bytes[..], k.path(), &opts).unwrap();
        assert!(fs::symlink_metadata(k.path().join(".wh.gone")).unwrap().is_file());
        assert!(k.path().join("d/.wh..wh..opq").is_file());
    }

    /// Host-side canaries around the extraction root, compared before and after.
    struct Canary {
        _t: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        before: BTreeMap<String, Node>,
        passwd: (u64, u64, i64),
    }

    fn passwd_state() -> (u64, u64, i64) {
        let md = fs::metadata("/etc/passwd").unwrap();
        (md.len(), md.nlink(), md.mtime())
    }

    fn canary() -> Canary {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(outside.join("etc")).unwrap();
        fs::write(outside.join("canary"), b"original").unwrap();
        fs::write(outside.join("etc/x"), b"original").unwrap();
        let before = snapshot(t.path());
        let before = before.into_iter().filter(|(k, _)| k.starts_with("outside")).collect();
        Canary { root, outside, before, passwd: passwd_state(), _t: t }
    }

    impl Canary {
        fn assert_untouched(&self) {
            let now: BTreeMap<_, _> =
                snapshot(self.outside.parent().unwrap()).into_iter().filter(|(k, _)| k.starts_with("outside")).collect();
            assert_eq!(now, self.before, "the host tree outside the root changed");
            assert_eq!(passwd_state(), self.passwd, "/etc/passwd changed");
        }
        fn extract(&self, tar_bytes: &[u8]) -> Result<ExtractStats, LayerError> {
            extract_layer_tar(tar_bytes, &self.root, &ExtractOptions::default())
        }
    }

    #[test]
    fn dotdot_and_absolute_names_are_clamped_into_the_root() {
        let c = canary();
        let tar_bytes = raw_tar(&[
            (hdr("../../outside/canary", b'0'), b"pwned"),
            (hdr("../outside/etc/x", b'0'), b"pwned"),
            (hdr("/abs/file", b'0'), b"abs"),
            (hdr("a/../../../b", b'0'), b"b"),
        ]);
        c.extract(&tar_bytes).unwrap();
        c.assert_untouched();
        assert_eq!(fs::read(c.root.join("outside/canary")).unwrap(), b"pwned");
        assert_eq!(fs::read(c.root.join("outside/etc/x")).unwrap(), b"pwned");
        assert_eq!(fs::read(c.root.join("abs/file")).unwrap(), b"abs");
        assert_eq!(fs::read(c.root.join("b")).unwrap(), b"b");
    }

    #[test]
    fn writes_through_symlinks_stay_inside_the_root() {
        let c = canary();
        let outside = c.outside.to_str().unwrap();
        let tar_bytes = raw_tar(&[
            (link("up", b'2', "../outside"), b""),
            (hdr("up/canary", b'0'), b"pwned"),
            (link("abs", b'2', outside), b""),
            (hdr("abs/canary", b'0'), b"pwned"),
            (hdr("abs/etc/x", b'0'), b"pwned"),
            (link("deep", b'2', "../../../../../../../../"), b""),
            (hdr("deep/etc/x", b'0'), b"pwned"),
            (link("chain1", b'2', "chain2"), b""),
            (link("chain2", b'2', "abs"), b""),
            (hdr("chain1/newfile", b'0'), b"pwned"),
            (link("direct", b'2', &format!("{outside}/canary")), b""),
            // A regular entry over a symlink replaces the symlink, never writes its target.
            (hdr("direct", b'0'), b"replaced"),
            (link("dirlink", b'2', outside), b""),
            (hdr("dirlink/", b'5'), b""),
        ]);
        c.extract(&tar_bytes).unwrap();
        c.assert_untouched();
        assert_eq!(fs::read(c.root.join("outside/canary")).unwrap(), b"pwned", "`..` target clamped at the root");
        let inner = c.root.join(c.outside.strip_prefix("/").unwrap());
        assert_eq!(fs::read(inner.join("canary")).unwrap(), b"pwned", "absolute target resolved inside the root");
        assert_eq!(fs::read(inner.join("newfile")).unwrap(), b"pwned");
        assert_eq!(fs::read(c.root.join("etc/x")).unwrap(), b"pwned");
        assert_eq!(fs::read(c.root.join("direct")).unwrap(), b"replaced");
        assert!(fs::symlink_metadata(c.root.join("dirlink")).unwrap().is_dir());
    }

    #[test]
    fn pre_existing_symlink_in_the_target_cannot_lead_outside() {
        let c = canary();
        symlink(&c.outside, c.root.join("pre")).unwrap();
        symlink("../outside/canary", c.root.join("prefile")).unwrap();
        let tar_bytes = raw_tar(&[(hdr("pre/canary", b'0'), b"pwned"), (hdr("pre/etc/x", b'0'), b"pwned"), (hdr("prefile", b'0'), b"new")]);
        c.extract(&tar_bytes).unwrap();
        c.assert_untouched();
        let inner = c.root.join(c.outside.strip_prefix("/").unwrap());
        assert_eq!(fs::read(inner.join("canary")).unwrap(), b"pwned");
        assert!(fs::symlink_metadata(c.root.join("prefile")).unwrap().is_file());
    }

    #[test]
    fn hardlinks_to_host_files_are_errors_naming_the_entry() {
        let c = canary();
        for target in ["/etc/passwd", "../../../../etc/passwd", "../outside/canary"] {
            let tar_bytes = raw_tar(&[(link("evil", b'1', target), b"")]);
            let err = c.extract(&tar_bytes).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, LayerError::BadEntry { .. }), "{msg}");
            assert!(msg.contains("\"evil\""), "{msg}");
            assert!(!c.root.join("evil").exists());
        }
        // Through a symlink to the host: the target is resolved inside the root, where it
        // does not exist.
        let tar_bytes = raw_tar(&[(link("hostetc", b'2', "/etc"), b""), (link("evil2", b'1', "hostetc/passwd"), b"")]);
        let err = c.extract(&tar_bytes).unwrap_err();
        assert!(err.to_string().contains("evil2"), "{err}");
        c.assert_untouched();
        // A hardlink within the layer works, and a hardlink through a symlink that resolves
        // inside works too.
        let tar_bytes = raw_tar(&[
            (hdr("dir/real", b'0'), b"data"),
            (link("alias", b'2', "dir"), b""),
            (link("dir/hl", b'1', "dir/real"), b""),
            (link("hl2", b'1', "/alias/real"), b""),
        ]);
        c.extract(&tar_bytes).unwrap();
        let a = fs::metadata(c.root.join("dir/real")).unwrap();
        assert_eq!(a.nlink(), 3);
        assert_eq!(fs::metadata(c.root.join("hl2")).unwrap().ino(), a.ino());
    }

    #[test]
    fn symlink_loops_end_with_an_error() {
        let c = canary();
        let tar_bytes = raw_tar(&[(link("a", b'2', "b"), b""), (link("b", b'2', "a"), b""), (hdr("a/x", b'0'), b"x")]);
        let err = c.extract(&tar_bytes).unwrap_err();
        assert!(err.to_string().contains("symbolic links"), "{err}");
        assert!(err.to_string().contains("a/x"), "{err}");
        let tar_bytes = raw_tar(&[(link("self", b'2', "self/self"), b""), (hdr("self/y", b'0'), b"y")]);
        assert!(c.extract(&tar_bytes).is_err());
        c.assert_untouched();
    }

    #[test]
    fn limits_stop_bombs_with_an_error_naming_the_limit() {
        let big = vec![7u8; 100_000];
        let tar_bytes = raw_tar(&[(hdr("a", b'0'), &big[..]), (hdr("b", b'0'), &big[..])]);
        let t = tempfile::tempdir().unwrap();
        let opts = ExtractOptions { max_bytes: Some(150_000), ..Default::default() };
        let err = extract_layer_tar(&tar_bytes[..], t.path(), &opts).unwrap_err();
        assert!(matches!(err, LayerError::Limit { limit: "max bytes", max: 150_000 }), "{err}");
        assert!(err.to_string().contains("max bytes"));
        let many: Vec<(Hdr, &[u8])> = (0..50).map(|i| (hdr(&format!("f{i}"), b'0'), &b""[..])).collect();
        let tar_bytes = raw_tar(&many);
        let t = tempfile::tempdir().unwrap();
        let opts = ExtractOptions { max_entries: Some(10), ..Default::default() };
        let err = extract_layer_tar(&tar_bytes[..], t.path(), &opts).unwrap_err();
        assert!(matches!(err, LayerError::Limit { limit: "max entries", max: 10 }), "{err}");
        // Within the limits it works.
        let opts = ExtractOptions { max_entries: Some(50), max_bytes: Some(1 << 20), ..Default::default() };
        let t = tempfile::tempdir().unwrap();
        assert_eq!(extract_layer_tar(&tar_bytes[..], t.path(), &opts).unwrap().files, 50);
    }

    #[test]
    fn garbage_and_truncated_input_are_errors_not_panics() {
        let t = tempfile::tempdir().unwrap();
        let tar_bytes = raw_tar(&[(hdr("f", b'0'), &[1u8; 3000][..])]);
        let err = extract_layer_tar(&tar_bytes[..1500], t.path(), &ExtractOptions::default()).unwrap_err();
        assert!(matches!(err, LayerError::ReadTar { .. }), "{err}");
        let mut junk = vec![0x55u8; 4096];
        junk[0] = b'x';
        assert!(extract_layer_tar(&junk[..], t.path(), &ExtractOptions::default()).is_err());
    }

    #[test]
    fn later_entries_replace_earlier_ones_and_directories_merge() {
        let t = tempfile::tempdir().unwrap();
        let tar_bytes = raw_tar(&[
            (hdr("x", b'0'), b"first"),
            (hdr("x", b'0'), b"second"),
            (hdr("d/", b'5'), b""),
            (hdr("d/keep", b'0'), b"k"),
            (Hdr { mode: 0o700, ..hdr("d/", b'5') }, b""),
            (hdr("f/", b'5'), b""),
            (hdr("f/child", b'0'), b"c"),
            (hdr("f", b'0'), b"now a file"),
        ]);
        extract_layer_tar(&tar_bytes[..], t.path(), &ExtractOptions::default()).unwrap();
        assert_eq!(fs::read(t.path().join("x")).unwrap(), b"second");
        assert_eq!(fs::read(t.path().join("d/keep")).unwrap(), b"k");
        assert_eq!(fs::metadata(t.path().join("d")).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(fs::metadata(t.path().join("d")).unwrap().mtime(), 1_600_000_000, "directory mtime applied last");
        assert_eq!(fs::read(t.path().join("f")).unwrap(), b"now a file");
    }
}
