//! ADD of a local tar archive: detection by content (plain, gzip, bzip2, xz, zstd — never by
//! file name), and extraction confined to the destination directory, within [`CopyLimits`].
//!
//! Extraction follows BuildKit's (`applyRootArchive`): entry names are taken relative to the
//! extraction directory as if it were `/` (leading `/` stripped, `..` clamped at it — BuildKit
//! 20.10 clamped through a chroot; newer BuildKit rejects `..`, hoist keeps the clamp that issue
//! 7 asks for); symlinks inside the archive resolve inside the extraction directory, so an
//! entry written "through" a symlink the archive created earlier stays inside; hard links must
//! name an entry inside the extraction directory; missing parents are created 0755 root:root;
//! an existing path is replaced unless both are directories; owners come from the headers
//! unless `--chown` overrides them; device nodes and FIFOs are refused.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{CopyError, CopyLimits, CopyStats};
use crate::rootfs;

/// A reader of the decompressed content of `file`: gzip, bzip2, xz, zstd or plain, sniffed
/// from the magic bytes (never the file name), as BuildKit's `DecompressStream`.
pub(crate) fn decompressed(file: File) -> io::Result<Box<dyn Read + Send>> {
    hoist_oci::compress::decompress_reader(file, None).map_err(io::Error::other)
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

/// Whether `path` (a link-free host path) is a regular file whose (decompressed) content starts
/// with a valid tar header — BuildKit's `isArchivePath`.
pub(crate) fn is_archive(path: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else { return false };
    if !meta.file_type().is_file() {
        return false;
    }
    let Ok(f) = open_nofollow(path) else { return false };
    let Ok(r) = decompressed(f) else { return false };
    // read at most the first header (and a PAX/GNU extension header before it)
    let mut ar = tar::Archive::new(r.take(1 << 20));
    let Ok(mut entries) = ar.entries() else { return false };
    matches!(entries.next(), Some(Ok(_)))
}

/// Counts decompressed bytes and stops a decompression bomb early.
struct Guard<R> {
    inner: R,
    read: u64,
    compressed: u64,
    limits: CopyLimits,
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if let Some(msg) = check_limits(&self.limits, self.read, self.compressed) {
            return Err(io::Error::other(LimitHit(msg)));
        }
        Ok(n)
    }
}

#[derive(Debug)]
struct LimitHit(String);
impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for LimitHit {}

fn check_limits(l: &CopyLimits, expanded: u64, compressed: u64) -> Option<String> {
    if expanded > l.max_bytes {
        return Some(format!("it expands to more than {} bytes (the limit)", l.max_bytes));
    }
    if expanded > l.ratio_grace_bytes && expanded / compressed.max(1) > l.max_ratio {
        return Some(format!(
            "it expands more than {}x ({} bytes from {} compressed; a decompression bomb?)",
            l.max_ratio, expanded, compressed
        ));
    }
    None
}

/// Lexically clean a tar name relative to the extraction root: leading `/` dropped, `.`
/// skipped, `..` clamped at the root. Returns the components (empty for the root itself).
fn clean_tar_name(name: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in name.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn join_bytes(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

/// Extract the archive at `archive` (host path) into the directory `dir` (a link-free host
/// path inside the destination root, already created). `shown` names the archive in errors.
pub(crate) fn extract(
    archive: &Path,
    shown: &str,
    dir: &Path,
    owner_override: Option<(u32, u32)>,
    limits: &CopyLimits,
    stats: &mut CopyStats,
) -> Result<(), CopyError> {
    let aerr = |entry: &str, reason: String| CopyError::Archive { archive: shown.to_string(), entry: entry.to_string(), reason };
    let f = open_nofollow(archive).map_err(|e| aerr("", format!("cannot open: {e}")))?;
    let compressed = f.metadata().map(|m| m.len()).unwrap_or(0);
    let r = decompressed(f).map_err(|e| aerr("", format!("cannot decompress: {e}")))?;
    let guard = Guard { inner: r, read: 0, compressed, limits: limits.clone() };
    let mut ar = tar::Archive::new(guard);
    let map_read_err = |e: io::Error, entry: &str| -> CopyError {
        if let Some(hit) = e.get_ref().and_then(|i| i.downcast_ref::<LimitHit>()) {
            return CopyError::ArchiveLimit { archive: shown.to_string(), reason: hit.0.clone() };
        }
        aerr(entry, format!("cannot read the archive: {e}"))
    };
    let entries = ar.entries().map_err(|e| map_read_err(e, ""))?;
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    let mut count: u64 = 0;
    let mut written: u64 = 0;
    let mut buf = vec![0u8; 128 << 10];
    for entry in entries {
        let mut entry = entry.map_err(|e| map_read_err(e, ""))?;
        let hdr = entry.header().clone();
        let etype = hdr.entry_type();
        if matches!(etype, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader) {
            continue;
        }
        let raw_name = entry.path_bytes().into_owned();
        let name_shown = String::from_utf8_lossy(&raw_name).into_owned();
        let comps = clean_tar_name(&raw_name);
        if comps.is_empty() {
            continue;
        }
        count += 1;
        if count > limits.max_entries {
            return Err(CopyError::ArchiveLimit {
                archive: shown.to_string(),
                reason: format!("it has more than {} entries (the limit)", limits.max_entries),
            });
        }
        // an all-NUL numeric field is 0 (as Go's archive/tar reads it); other garbage is an error
        let blank = |f: &[u8]| f.iter().all(|b| *b == 0 || *b == b' ');
        let old = hdr.as_old();
        let (uid, gid) = match owner_override {
            Some(o) => o,
            None => {
                let uid = match hdr.uid() {
                    Ok(v) => v,
                    Err(_) if blank(&old.uid) => 0,
                    Err(e) => return Err(aerr(&name_shown, format!("bad uid: {e}"))),
                };
                let gid = match hdr.gid() {
                    Ok(v) => v,
                    Err(_) if blank(&old.gid) => 0,
                    Err(e) => return Err(aerr(&name_shown, format!("bad gid: {e}"))),
                };
                let to32 = |v: u64, what: &str| u32::try_from(v).map_err(|_| aerr(&name_shown, format!("{what} {v} is out of range")));
                (to32(uid, "uid")?, to32(gid, "gid")?)
            }
        };
        let mode = match hdr.mode() {
            Ok(m) => m & 0o7777,
            Err(_) if blank(&old.mode) => 0,
            Err(e) => return Err(aerr(&name_shown, format!("bad mode: {e}"))),
        };
        let mtime = hdr.mtime().ok().and_then(|t| i64::try_from(t).ok()).unwrap_or(0);
        let is_dir = etype.is_dir();
        let name = join_bytes(&comps);
        let resolved = rootfs::resolve_components(dir, &name, is_dir).map_err(|e| aerr(&name_shown, e.to_string()))?;
        if resolved.is_empty() {
            // a directory entry that resolves to the extraction root itself
            continue;
        }
        let parent = &resolved[..resolved.len() - 1];
        rootfs::create_resolved_dirs(dir, parent, 0o755, Some((0, 0)), &name_shown).map_err(|e| aerr(&name_shown, e.to_string()))?;
        let target = rootfs::join_components(dir, &resolved);
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() && is_dir => {}
            Ok(m) if m.is_dir() => fs::remove_dir_all(&target).map_err(|e| aerr(&name_shown, format!("cannot replace: {e}")))?,
            Ok(_) => fs::remove_file(&target).map_err(|e| aerr(&name_shown, format!("cannot replace: {e}")))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(aerr(&name_shown, format!("lstat: {e}"))),
        }
        let ioerr = |what: &str, e: io::Error| aerr(&name_shown, format!("{what}: {e}"));
        match etype {
            tar::EntryType::Directory => {
                match fs::DirBuilder::new().mode(0o700).create(&target) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(ioerr("mkdir", e)),
                }
                std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(|e| ioerr("chown", e))?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(|e| ioerr("chmod", e))?;
                dir_times.push((target, mtime));
                stats.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = hdr.size().unwrap_or(0);
                if written.saturating_add(size) > limits.max_bytes {
                    return Err(CopyError::ArchiveLimit {
                        archive: shown.to_string(),
                        reason: format!("it expands to more than {} bytes (the limit)", limits.max_bytes),
                    });
                }
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&target)
                    .map_err(|e| ioerr("create", e))?;
                loop {
                    let n = entry.read(&mut buf).map_err(|e| map_read_err(e, &name_shown))?;
                    if n == 0 {
                        break;
                    }
                    written += n as u64;
                    if let Some(reason) = check_limits(limits, written, compressed) {
                        return Err(CopyError::ArchiveLimit { archive: shown.to_string(), reason });
                    }
                    out.write_all(&buf[..n]).map_err(|e| ioerr("write", e))?;
                }
                std::os::unix::fs::fchown(&out, Some(uid), Some(gid)).map_err(|e| ioerr("chown", e))?;
                out.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| ioerr("chmod", e))?;
                drop(out);
                super::set_times(&target, mtime, 0, mtime, 0).map_err(|e| ioerr("utimes", e))?;
                stats.files += 1;
                stats.bytes += size;
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name_bytes().ok_or_else(|| aerr(&name_shown, "symlink without a target".into()))?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&link), &target).map_err(|e| ioerr("symlink", e))?;
                std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(|e| ioerr("chown", e))?;
                super::set_times(&target, mtime, 0, mtime, 0).map_err(|e| ioerr("utimes", e))?;
                stats.symlinks += 1;
            }
            tar::EntryType::Link => {
                let link = entry.link_name_bytes().ok_or_else(|| aerr(&name_shown, "hard link without a target".into()))?;
                let lcomps = clean_tar_name(&link);
                if lcomps.is_empty() {
                    return Err(aerr(&name_shown, "hard link to the extraction directory itself".into()));
                }
                let lres = rootfs::resolve_components(dir, &join_bytes(&lcomps), false).map_err(|e| aerr(&name_shown, e.to_string()))?;
                let lpath = rootfs::join_components(dir, &lres);
                let lmeta = fs::symlink_metadata(&lpath).map_err(|_| {
                    aerr(
                        &name_shown,
                        format!(
                            "hard link target {:?} is not in the archive's destination (hard links must point at entries extracted before them)",
                            String::from_utf8_lossy(&link)
                        ),
                    )
                })?;
                if lmeta.is_dir() {
                    return Err(aerr(&name_shown, "hard link to a directory".into()));
                }
                fs::hard_link(&lpath, &target).map_err(|e| ioerr("link", e))?;
                std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(|e| ioerr("chown", e))?;
                if !lmeta.file_type().is_symlink() {
                    fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(|e| ioerr("chmod", e))?;
                    super::set_times(&target, mtime, 0, mtime, 0).map_err(|e| ioerr("utimes", e))?;
                }
                stats.hardlinks += 1;
            }
            other => {
                return Err(aerr(
                    &name_shown,
                    format!("unsupported entry type {:?} (only files, directories, symlinks and hard links are extracted)", other),
                ))
            }
        }
    }
    for (d, t) in dir_times.iter().rev() {
        super::set_times(d, *t, 0, *t, 0).map_err(|e| aerr("", format!("utimes {}: {e}", d.display())))?;
    }
    stats.archives += 1;
    Ok(())
}
