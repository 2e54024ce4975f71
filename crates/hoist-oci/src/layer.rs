//! Layer tars: writing the OCI tar of one layer directory (an overlayfs upperdir or a plain
//! directory) and extracting a layer tar into a directory that serves as an overlayfs
//! lowerdir.
//!
//! Writing ([`write_layer_tar`]) is deterministic: entries in path order (depth first,
//! names sorted bytewise within each directory), no atime/ctime, empty uname/gname, mtimes
//! clamped to `SOURCE_DATE_EPOCH` when given, so identical input gives identical bytes.
//! Overlay whiteouts (0/0 character devices, `trusted.overlay.opaque=y` and the
//! `user.overlay.*` variants) become OCI whiteouts (`.wh.<name>`, `<dir>/.wh..wh..opq`).
//! Extended attributes are kept as PAX `SCHILY.xattr.*` records, except overlayfs's own
//! (`trusted.overlay.*`, `user.overlay.*`) and the host's `security.selinux` label.
//!
//! Extracting ([`extract_layer_tar`]) converts back to the overlay format and is safe on
//! hostile input: every entry lands inside the target directory. Names with `..` or a
//! leading `/` are clamped to the root (as BuildKit/containerd do); parent directories are
//! resolved component by component with `openat(O_NOFOLLOW)`, following symlinks as if the
//! target directory were `/`, so neither a symlink from the tar nor one already there can
//! lead a write outside; the final component is never followed. Hardlink targets that
//! leave the root are an error naming the entry; overlay xattrs are never taken from the
//! tar. Byte and entry limits stop decompression bombs.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

/// Name prefix of an OCI whiteout entry.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the OCI opaque-directory marker entry.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
/// Prefix of AUFS metadata entries (`.wh..wh.plnk`, ...), skipped on extraction.
const WHITEOUT_META_PREFIX: &str = ".wh..wh.";

const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];
/// Symlinks followed at most while resolving one path (the kernel's limit).
const MAX_SYMLINK_FOLLOWS: u32 = 40;

/// Errors of writing or extracting a layer tar.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The layer directory (or a file in it) could not be read.
    #[error("layer directory {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },
    /// The path to archive is not a directory.
    #[error("layer directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    /// A file changed size while it was archived.
    #[error("{path} changed while it was archived ({what}); archive only a directory nothing writes to")]
    Changed { path: PathBuf, what: String },
    /// The upperdir uses an overlayfs feature a layer cannot express (metacopy, redirect_dir).
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    /// The output writer failed.
    #[error("writing the layer tar: {0}")]
    Write(io::Error),
    /// The tar stream is malformed or could not be read.
    #[error("reading the layer tar{}: {source}", after.as_ref().map(|e| format!(" after entry {e:?}")).unwrap_or_default())]
    ReadTar { after: Option<String>, source: io::Error },
    /// An entry is invalid or hostile (escaping hardlink, symlink loop, ...).
    #[error("tar entry {entry:?}: {reason}")]
    BadEntry { entry: String, reason: String },
    /// A filesystem operation failed while extracting an entry.
    #[error("extracting tar entry {entry:?} into {dir}: {op}: {source}")]
    Extract { entry: String, dir: PathBuf, op: &'static str, source: io::Error },
    /// A limit of [`ExtractOptions`] was exceeded.
    #[error("layer tar exceeds the {limit} limit of {max}: refusing to extract more (a decompression bomb?)")]
    Limit { limit: &'static str, max: u64 },
}

/// Options of [`write_layer_tar`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TarOptions {
    /// `SOURCE_DATE_EPOCH`: every mtime later than this (seconds since the Unix epoch) is
    /// written as this, so builders at different times produce identical layers.
    pub source_date_epoch: Option<i64>,
}

/// What [`write_layer_tar`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TarStats {
    /// Entries written (files, dirs, links, devices, whiteout and opaque markers).
    pub entries: u64,
    /// Length of the tar stream.
    pub bytes: u64,
    /// Bytes of regular file content.
    pub content_bytes: u64,
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Hardlink entries (later names of multiply-linked files).
    pub hardlinks: u64,
    /// Character and block devices and fifos.
    pub devices: u64,
    /// `.wh.<name>` entries.
    pub whiteouts: u64,
    /// `.wh..wh..opq` entries.
    pub opaque_dirs: u64,
    /// Sockets, which a tar cannot hold.
    pub skipped: u64,
}

impl TarStats {
    /// Whether the layer has no entries at all (an "empty layer" in image history terms).
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

/// How whiteout entries are extracted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// Overlay format with `trusted.overlay.opaque` (a snapshot used as a lowerdir).
    #[default]
    Overlay,
    /// Overlay format with `user.overlay.opaque` (overlayfs mounted with `userxattr`).
    OverlayUserXattr,
    /// Keep `.wh.` entries as the plain files they are (ADD of a local tar).
    Keep,
}

/// Options of [`extract_layer_tar`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractOptions {
    /// Most bytes read from the (uncompressed) tar stream, and most bytes of file content
    /// written (sparse entries expand); `None` is unlimited.
    pub max_bytes: Option<u64>,
    /// Most entries; `None` is unlimited.
    pub max_entries: Option<u64>,
    /// How whiteouts are extracted.
    pub whiteouts: WhiteoutMode,
    /// Apply the uid/gid of entries (needs root); false leaves the extracting user.
    pub same_owner: bool,
    /// Give every entry this uid/gid instead of the tar's (ADD --chown).
    pub chown: Option<(u32, u32)>,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions { max_bytes: None, max_entries: None, whiteouts: WhiteoutMode::Overlay, same_owner: true, chown: None }
    }
}

/// What [`extract_layer_tar`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Entries read (not counting PAX/GNU extension headers).
    pub entries: u64,
    /// Bytes of the tar stream read, up to and including the first zero block of its
    /// end-of-archive marker.
    pub bytes: u64,
    /// Bytes of regular file content written.
    pub content_bytes: u64,
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Hardlinks.
    pub hardlinks: u64,
    /// Character and block devices and fifos.
    pub devices: u64,
    /// Whiteouts created (`.wh.<name>` entries).
    pub whiteouts: u64,
    /// Directories marked opaque (`.wh..wh..opq` entries).
    pub opaque_dirs: u64,
    /// Entries skipped: the root directory itself, unknown types, AUFS metadata.
    pub skipped: u64,
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// Write the OCI layer tar of `dir` to `out`; see the module doc for the format. `out` is
/// never flushed (so a zstd compressor behind it does not cut a frame job short).
pub fn write_layer_tar(dir: &Path, out: impl Write, opts: &TarOptions) -> Result<TarStats, LayerError> {
    let md = fs::symlink_metadata(dir).map_err(|source| LayerError::ReadDir { path: dir.to_path_buf(), source })?;
    if !md.is_dir() {
        return Err(LayerError::NotADirectory { path: dir.to_path_buf() });
    }
    let mut w = TarWriter { out: BufWriter::with_capacity(256 * 1024, out), bytes: 0 };
    let mut walker = Walker { opts, links: HashMap::new(), stats: TarStats::default(), buf: vec![0u8; 256 * 1024] };
    walker.walk(dir, b"", &mut w)?;
    w.out.write_all(&[0u8; 1024]).map_err(LayerError::Write)?;
    w.bytes += 1024;
    w.out.into_inner().map_err(|e| LayerError::Write(e.into_error()))?;
    walker.stats.bytes = w.bytes;
    Ok(walker.stats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Whiteout,
    Dir { opaque: bool },
    File,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

struct Child {
    /// Name in the directory.
    name: OsString,
    /// Base name in the tar (`.wh.<name>` for whiteouts).
    tar_name: Vec<u8>,
    kind: Kind,
    md: fs::Metadata,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

struct Walker<'a> {
    opts: &'a TarOptions,
    /// (dev, ino) of multiply-linked files already written → their tar name.
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: TarStats,
    buf: Vec<u8>,
}

fn join_rel(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parent.len() + name.len() + 1);
    if !parent.is_empty() {
        v.extend_from_slice(parent);
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

fn is_overlay_xattr(name: &[u8]) -> bool {
    OVERLAY_XATTR_PREFIXES.iter().any(|p| name.starts_with(p.as_bytes()))
}

/// The host's SELinux label: a property of the builder's filesystem, relabelled by the
/// runtime, never part of a layer (Docker and BuildKit record only file capabilities).
fn is_host_label(name: &[u8]) -> bool {
    name == b"security.selinux"
}

fn overlay_xattr<'x>(xattrs: &'x [(Vec<u8>, Vec<u8>)], suffix: &str) -> Option<&'x [u8]> {
    xattrs.iter().find_map(|(k, v)| {
        OVERLAY_XATTR_PREFIXES.iter().any(|p| k.strip_prefix(p.as_bytes()) == Some(suffix.as_bytes())).then_some(v.as_slice())
    })
}

/// All extended attributes of `path` (not following a final symlink), sorted by name.
fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = loop {
        let size = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                break buf;
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name_os = OsStr::from_bytes(name);
        let value = loop {
            let size = match rustix::fs::lgetxattr_query(path, name_os) {
                Ok(n) => n,
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            };
            let mut buf = vec![0u8; size];
            match rustix::fs::lgetxattr(path, name_os, &mut buf[..]) {
                Ok(n) => {
                    buf.truncate(n);
                    break Some(buf);
                }
                Err(Errno::RANGE) => continue,
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(v) = value {
            out.push((name.to_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}

impl Walker<'_> {
    fn mtime(&self, md: &fs::Metadata) -> u64 {
        let mut t = md.mtime();
        if let Some(epoch) = self.opts.source_date_epoch {
            t = t.min(epoch);
        }
        t.max(0) as u64
    }

    fn walk<W: Write>(&mut self, abs: &Path, rel: &[u8], w: &mut TarWriter<W>) -> Result<(), LayerError> {
        let rd_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LayerError::ReadDir { path, source }
        };
        let mut children = Vec::new();
        for entry in fs::read_dir(abs).map_err(rd_err(abs))? {
            let entry = entry.map_err(rd_err(abs))?;
            let name = entry.file_name();
            let path = abs.join(&name);
            let md = fs::symlink_metadata(&path).map_err(rd_err(&path))?;
            let xattrs = read_xattrs(&path).map_err(rd_err(&path))?;
            let ft = md.file_type();
            use std::os::unix::fs::FileTypeExt;
            let kind = if (ft.is_char_device() && md.rdev() == 0) || (ft.is_file() && overlay_xattr(&xattrs, "whiteout").is_some()) {
                Kind::Whiteout
            } else if ft.is_dir() {
                if overlay_xattr(&xattrs, "redirect").is_some() {
                    return Err(LayerError::Unsupported {
                        path,
                        reason: "directory has an overlay redirect (renamed lower directory); mount overlayfs with redirect_dir=off".into(),
                    });
                }
                Kind::Dir { opaque: overlay_xattr(&xattrs, "opaque") == Some(b"y") }
            } else if ft.is_file() {
                if overlay_xattr(&xattrs, "metacopy").is_some() {
                    return Err(LayerError::Unsupported {
                        path,
                        reason: "file is an overlay metacopy without its data; mount overlayfs with metacopy=off".into(),
                    });
                }
                Kind::File
            } else if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_char_device() {
                Kind::Char
            } else if ft.is_block_device() {
                Kind::Block
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                Kind::Socket
            };
            let tar_name = if kind == Kind::Whiteout {
                let mut n = WHITEOUT_PREFIX.as_bytes().to_vec();
                n.extend_from_slice(name.as_bytes());
                n
            } else {
                name.as_bytes().to_vec()
            };
            let xattrs = xattrs.into_iter().filter(|(k, _)| !is_overlay_xattr(k) && !is_host_label(k)).collect();
            children.push(Child { name, tar_name, kind, md, xattrs });
        }
        children.sort_by(|a, b| a.tar_name.cmp(&b.tar_name));

        for child in children {
            let path = abs.join(&child.name);
            let tar_path = join_rel(rel, &child.tar_name);
            let md = &child.md;
            let mut h = Hdr {
                name: tar_path.clone(),
                typeflag: b'0',
                mode: md.mode() & 0o7777,
                uid: md.uid() as u64,
                gid: md.gid() as u64,
                size: 0,
                mtime: self.mtime(md),
                linkname: Vec::new(),
                devmajor: 0,
                devminor: 0,
                xattrs: child.xattrs.clone(),
            };
            match child.kind {
                Kind::Socket => {
                    self.stats.skipped += 1;
                    continue;
                }
                Kind::Whiteout => {
                    h = Hdr { mode: 0, uid: 0, gid: 0, xattrs: Vec::new(), ..h };
                    w.header(&h)?;
                    self.stats.whiteouts += 1;
                }
                Kind::Dir { opaque } => {
                    h.typeflag = b'5';
                    h.name.push(b'/');
                    w.header(&h)?;
                    self.stats.dirs += 1;
                    if opaque {
                        let marker = Hdr {
                            name: join_rel(&tar_path, WHITEOUT_OPAQUE.as_bytes()),
                            typeflag: b'0',
                            mode: 0,
                            uid: 0,
                            gid: 0,
                            xattrs: Vec::new(),
                            ..h.clone()
                        };
                        w.header(&marker)?;
                        self.stats.opaque_dirs += 1;
                        self.stats.entries += 1;
                    }
                    self.stats.entries += 1;
                    self.walk(&path, &tar_path, w)?;
                    continue;
                }
                _ => {
                    if md.nlink() > 1 {
                        let key = (md.dev(), md.ino());
                        if let Some(first) = self.links.get(&key) {
                            h.typeflag = b'1';
                            h.linkname = first.clone();
                            w.header(&h)?;
                            self.stats.hardlinks += 1;
                            self.stats.entries += 1;
                            continue;
                        }
                        self.links.insert(key, tar_path.clone());
                    }
                    match child.kind {
                        Kind::File => {
                            h.size = md.len();
                            w.header(&h)?;
                            self.copy_file(&path, md.len(), w)?;
                            self.stats.files += 1;
                            self.stats.content_bytes += md.len();
                        }
                        Kind::Symlink => {
                            h.typeflag = b'2';
                            h.linkname = fs::read_link(&path).map_err(rd_err(&path))?.into_os_string().into_vec();
                            w.header(&h)?;
                            self.stats.symlinks += 1;
                        }
                        Kind::Char | Kind::Block | Kind::Fifo => {
                            h.typeflag = match child.kind {
                                Kind::Char => b'3',
                                Kind::Block => b'4',
                                _ => b'6',
                            };
                            if child.kind != Kind::Fifo {
                                h.devmajor = rustix::fs::major(md.rdev()) as u64;
                                h.devminor = rustix::fs::minor(md.rdev()) as u64;
                            }
                            w.header(&h)?;
                            self.stats.devices += 1;
                        }
                        _ => unreachable!("handled above"),
                    }
                }
            }
            self.stats.entries += 1;
        }
        Ok(())
    }

    fn copy_file<W: Write>(&mut self, path: &Path, size: u64, w: &mut TarWriter<W>) -> Result<(), LayerError> {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| LayerError::ReadDir { path: path.to_path_buf(), source })?;
        let mut left = size;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = match f.read(&mut self.buf[..want]) {
                Ok(0) => return Err(LayerError::Changed { path: path.to_path_buf(), what: format!("shrank below {size} bytes") }),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(LayerError::ReadDir { path: path.to_path_buf(), source }),
            };
            w.out.write_all(&self.buf[..n]).map_err(LayerError::Write)?;
            left -= n as u64;
        }
        let mut probe = [0u8; 1];
        if f.read(&mut probe).map_err(|source| LayerError::ReadDir { path: path.to_path_buf(), source })? != 0 {
            return Err(LayerError::Changed { path: path.to_path_buf(), what: format!("grew beyond {size} bytes") });
        }
        w.bytes += size;
        w.pad(size)
    }
}

/// One tar header's worth of metadata.
#[derive(Clone)]
struct Hdr {
    name: Vec<u8>,
    typeflag: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    linkname: Vec<u8>,
    devmajor: u64,
    devminor: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

struct TarWriter<W: Write> {
    out: BufWriter<W>,
    bytes: u64,
}

/// Write `v` as zero-padded octal filling `field` but its last byte (NUL); false if it
/// does not fit.
fn put_octal(field: &mut [u8], v: u64) -> bool {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    if s.len() > digits {
        return false;
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    true
}

/// GNU base-256 encoding for numbers too large for octal.
fn put_base256(field: &mut [u8], v: u64) {
    field.fill(0);
    let n = field.len();
    let bytes = v.to_be_bytes();
    field[n - 8..].copy_from_slice(&bytes);
    field[0] |= 0x80;
}

/// One PAX record: `"<len> <key>=<value>\n"` where len counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    loop {
        let total = body + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> TarWriter<W> {
    fn pad(&mut self, size: u64) -> Result<(), LayerError> {
        let rem = (size % 512) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; 512][..512 - rem]).map_err(LayerError::Write)?;
            self.bytes += (512 - rem) as u64;
        }
        Ok(())
    }

    fn block(&mut self, block: &[u8; 512]) -> Result<(), LayerError> {
        self.out.write_all(block).map_err(LayerError::Write)?;
        self.bytes += 512;
        Ok(())
    }

    /// Write the header of an entry (preceded by a PAX header when a value does not fit the
    /// ustar fields). The caller writes the content and padding.
    fn header(&mut self, h: &Hdr) -> Result<(), LayerError> {
        let mut b = [0u8; 512];
        let mut pax = Vec::new();
        if h.name.len() > 100 || !h.name.is_ascii() {
            pax_record(&mut pax, b"path", &h.name);
        }
        let n = h.name.len().min(100);
        b[..n].copy_from_slice(&h.name[..n]);
        if h.linkname.len() > 100 || !h.linkname.is_ascii() {
            pax_record(&mut pax, b"linkpath", &h.linkname);
        }
        let n = h.linkname.len().min(100);
        b[157..157 + n].copy_from_slice(&h.linkname[..n]);
        put_octal(&mut b[100..108], h.mode as u64);
        if !put_octal(&mut b[108..116], h.uid) {
            pax_record(&mut pax, b"uid", h.uid.to_string().as_bytes());
            put_octal(&mut b[108..116], 0);
        }
        if !put_octal(&mut b[116..124], h.gid) {
            pax_record(&mut pax, b"gid", h.gid.to_string().as_bytes());
            put_octal(&mut b[116..124], 0);
        }
        if !put_octal(&mut b[124..136], h.size) {
            pax_record(&mut pax, b"size", h.size.to_string().as_bytes());
            put_octal(&mut b[124..136], 0);
        }
        if !put_octal(&mut b[136..148], h.mtime) {
            pax_record(&mut pax, b"mtime", h.mtime.to_string().as_bytes());
            put_octal(&mut b[136..148], 0);
        }
        b[156] = h.typeflag;
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        if !put_octal(&mut b[329..337], h.devmajor) {
            put_base256(&mut b[329..337], h.devmajor);
        }
        if !put_octal(&mut b[337..345], h.devminor) {
            put_base256(&mut b[337..345], h.devminor);
        }
        for (k, v) in &h.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
        if !pax.is_empty() {
            let mut p = [0u8; 512];
            // Name of the extended header itself, as Go names it; readers ignore it.
            let base = h.name.strip_suffix(b"/").unwrap_or(&h.name);
            let base = base.rsplit(|c| *c == b'/').next().unwrap_or(base);
            let mut pname = b"PaxHeaders.0/".to_vec();
            pname.extend(base.iter().take(80).map(|c| if c.is_ascii() && *c != 0 { *c } else { b'_' }));
            p[..pname.len()].copy_from_slice(&pname);
            put_octal(&mut p[100..108], 0o644);
            put_octal(&mut p[108..116], 0);
            put_octal(&mut p[116..124], 0);
            if !put_octal(&mut p[124..136], pax.len() as u64) {
                return Err(LayerError::Write(io::Error::other("pax header larger than 8 GiB")));
            }
            put_octal(&mut p[136..148], 0);
            p[156] = b'x';
            p[257..263].copy_from_slice(b"ustar\0");
            p[263..265].copy_from_slice(b"00");
            put_octal(&mut p[329..337], 0);
            put_octal(&mut p[337..345], 0);
            finish_checksum(&mut p);
            self.block(&p)?;
            self.out.write_all(&pax).map_err(LayerError::Write)?;
            self.bytes += pax.len() as u64;
            self.pad(pax.len() as u64)?;
        }
        finish_checksum(&mut b);
        self.block(&b)
    }
}

fn finish_checksum(b: &mut [u8; 512]) {
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|x| *x as u32).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
}

// ---------------------------------------------------------------------------------------
// Extracting
// ---------------------------------------------------------------------------------------

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
/// chosen by `opts.whiteouts`; see the module doc for the safety rules.
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
    use super::*;
    use std::collections::BTreeMap;
    use std::ffi::CString;
    use std::os::unix::fs::{symlink, PermissionsExt};

    use crate::digest::Digest;

    fn is_root() -> bool {
        crate::testing::needs_root()
    }

    fn set_mtime(path: &Path, secs: i64) {
        let t = Timestamps { last_access: Timespec { tv_sec: secs, tv_nsec: 0 }, last_modification: Timespec { tv_sec: secs, tv_nsec: 0 } };
        rustix::fs::utimensat(rustix::fs::CWD, path, &t, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    fn lset(path: &Path, k: &str, v: &[u8]) {
        rustix::fs::lsetxattr(path, k, v, rustix::fs::XattrFlags::empty()).unwrap();
    }

    fn mknod(path: &Path, ft: FileType, mode: u32, major: u32, minor: u32) {
        rustix::fs::mknodat(rustix::fs::CWD, path, ft, Mode::from_raw_mode(mode), rustix::fs::makedev(major, minor)).unwrap();
    }

    /// Everything the layer format must preserve about a tree, keyed by relative path.
    #[derive(Debug, PartialEq, Eq, Clone)]
    struct Node {
        kind: &'static str,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        content: Option<Digest>,
        link: Option<Vec<u8>>,
        rdev: (u32, u32),
        mtime: i64,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
        /// For the second and later names of a multiply-linked file: the first name.
        hardlink_of: Option<String>,
    }

    fn snapshot(root: &Path) -> BTreeMap<String, Node> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>, inodes: &mut HashMap<(u64, u64), String>) {
            let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            for n in names {
                let p = dir.join(&n);
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let md = fs::symlink_metadata(&p).unwrap();
                use std::os::unix::fs::FileTypeExt;
                let ft = md.file_type();
                let kind = if ft.is_dir() {
                    "dir"
                } else if ft.is_file() {
                    "file"
                } else if ft.is_symlink() {
                    "symlink"
                } else if ft.is_char_device() {
                    "char"
                } else if ft.is_block_device() {
                    "block"
                } else if ft.is_fifo() {
                    "fifo"
                } else {
                    "socket"
                };
                let mut hardlink_of = None;
                if !ft.is_dir() && md.nlink() > 1 {
                    match inodes.get(&(md.dev(), md.ino())) {
                        Some(first) => hardlink_of = Some(first.clone()),
                        None => {
                            inodes.insert((md.dev(), md.ino()), rel.clone());
                        }
                    }
                }
                out.insert(
                    rel,
                    Node {
                        kind,
                        mode: md.mode() & 0o7777,
                        uid: md.uid(),
                        gid: md.gid(),
                        size: if ft.is_file() { md.len() } else { 0 },
                        content: ft.is_file().then(|| Digest::of(&fs::read(&p).unwrap())),
                        link: ft.is_symlink().then(|| fs::read_link(&p).unwrap().into_os_string().into_vec()),
                        rdev: (rustix::fs::major(md.rdev()), rustix::fs::minor(md.rdev())),
                        mtime: if ft.is_dir() || ft.is_file() || ft.is_symlink() || kind != "socket" { md.mtime() } else { 0 },
                        xattrs: read_xattrs(&p).unwrap(),
                        hardlink_of,
                    },
                );
                if ft.is_dir() {
                    walk(root, &p, out, inodes);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out, &mut HashMap::new());
        out
    }

    fn tar_of(dir: &Path, opts: &TarOptions) -> (Vec<u8>, TarStats) {
        let mut out = Vec::new();
        let stats = write_layer_tar(dir, &mut out, opts).unwrap();
        assert_eq!(stats.bytes, out.len() as u64);
        (out, stats)
    }

    /// (name, type, size, linkname, pax records) of one entry, read back with the tar crate.
    type Listed = (String, char, u64, String, Vec<(String, Vec<u8>)>);

    fn list(tar_bytes: &[u8]) -> Vec<Listed> {
        let mut a = tar::Archive::new(tar_bytes);
        let mut out = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let link = e.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned()).unwrap_or_default();
            let t = e.header().entry_type().as_byte() as char;
            let size = e.size();
            let mut pax = Vec::new();
            if let Some(exts) = e.pax_extensions().unwrap() {
                for x in exts {
                    let x = x.unwrap();
                    pax.push((x.key().unwrap().to_string(), x.value_bytes().to_vec()));
                }
            }
            out.push((name, t, size, link, pax));
        }
        out
    }

    /// A tree with every kind of entry and metadata the format carries.
    fn rich_tree(dir: &Path) {
        fs::create_dir_all(dir.join("usr/bin")).unwrap();
        fs::create_dir_all(dir.join("tmp")).unwrap();
        fs::write(dir.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
        fs::set_permissions(dir.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::write(dir.join("empty"), b"").unwrap();
        let big: Vec<u8> = (0..(1u32 << 20) + 3).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        fs::write(dir.join("big.bin"), &big).unwrap();
        fs::hard_link(dir.join("big.bin"), dir.join("usr/big-link")).unwrap();
        symlink("bin/tool", dir.join("usr/rel-link")).unwrap();
        symlink("/etc/passwd", dir.join("abs-link")).unwrap();
        let long_dir = dir.join("d".repeat(60)).join("e".repeat(60));
        fs::create_dir_all(&long_dir).unwrap();
        fs::write(long_dir.join("f".repeat(120)), b"long name").unwrap();
        symlink("t".repeat(150), dir.join("long-target")).unwrap();
        fs::write(dir.join("naïve-ünïcode"), b"utf8 name").unwrap();
        fs::write(dir.join(OsStr::from_bytes(b"latin1-\xe9")), b"non-utf8 name").unwrap();
        lset(&dir.join("usr/bin/tool"), "user.origin", b"tested");
        // A file capability: cap_net_bind_service+ep (VFS_CAP_REVISION_2 layout).
        let mut cap = vec![0u8; 20];
        cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
        cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
        if is_root() {
            fs::write(dir.join("usr/bin/ping"), b"ping").unwrap();
            lset(&dir.join("usr/bin/ping"), "security.capability", &cap);
            std::os::unix::fs::chown(dir.join("usr/bin/tool"), Some(1234), Some(5678)).unwrap();
            // chown cleared setuid; set it again.
            fs::set_permissions(dir.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
            std::os::unix::fs::lchown(dir.join("usr/rel-link"), Some(42), Some(43)).unwrap();
            fs::create_dir(dir.join("dev")).unwrap();
            mknod(&dir.join("dev/null"), FileType::CharacterDevice, 0o666, 1, 3);
            mknod(&dir.join("dev/loop9"), FileType::BlockDevice, 0o660, 7, 9);
        }
        mknod(&dir.join("fifo"), FileType::Fifo, 0o600, 0, 0);
        let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
        for (i, p) in ["usr/bin/tool", "empty", "big.bin", "usr/rel-link", "fifo", "usr/bin", "usr", "tmp"].iter().enumerate() {
            set_mtime(&dir.join(p), 1_500_000_000 + i as i64 * 1000);
        }
    }

    #[test]
    fn round_trip_preserves_modes_owners_links_devices_xattrs_and_mtimes() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        rich_tree(&src);
        let (tar_bytes, stats) = tar_of(&src, &TarOptions::default());
        assert_eq!(stats.skipped, 1, "the socket is skipped");
        assert_eq!(stats.hardlinks, 1);
        let dst = t.path().join("dst");
        fs::create_dir(&dst).unwrap();
        let xs = extract_layer_tar(&tar_bytes[..], &dst, &ExtractOptions::default()).unwrap();
        assert_eq!(xs.entries, stats.entries);
        assert_eq!(xs.hardlinks, 1);
        // Read up to the end-of-archive marker (the first of its two zero blocks).
        assert_eq!(xs.bytes, tar_bytes.len() as u64 - 512);

        let mut want = snapshot(&src);
        want.remove("sock").expect("socket existed in the source");
        let got = snapshot(&dst);
        assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
        for (k, w) in &want {
            assert_eq!(Some(w), got.get(k), "{k}");
        }
        // Spot checks that the comparison really covered what matters.
        assert_eq!(got["usr/bin/tool"].mode, 0o4755);
        assert_eq!(got["tmp"].mode, 0o1777);
        assert_eq!(got["usr/big-link"].hardlink_of.as_deref(), Some("big.bin"));
        assert_eq!(got["usr/bin/tool"].xattrs, vec![(b"user.origin".to_vec(), b"tested".to_vec())]);
        if is_root() {
            assert_eq!((got["usr/bin/tool"].uid, got["usr/bin/tool"].gid), (1234, 5678));
            assert_eq!(got["dev/null"].rdev, (1, 3));
            assert_eq!(got["dev/loop9"].kind, "block");
            assert_eq!(got["usr/bin/ping"].xattrs[0].0, b"security.capability".to_vec());
        }
        // And writing the extracted tree again gives the same bytes.
        let (again, _) = tar_of(&dst, &TarOptions::default());
        assert!(again == tar_bytes, "re-archiving the extracted tree differs");
    }

    #[test]
    fn tar_format_details() {
        let t = tempfile::tempdir().unwrap();
        rich_tree(t.path());
        let (tar_bytes, _) = tar_of(t.path(), &TarOptions::default());
        let entries = list(&tar_bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        // Depth-first, sorted, parents before children, directories with a trailing slash.
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap_or_else(|| panic!("{n} missing from {names:?}"));
        assert!(pos("usr/") < pos("usr/bin/") && pos("usr/bin/") < pos("usr/bin/tool"));
        assert!(pos("big.bin") < pos("usr/big-link"));
        let link = &entries[pos("usr/big-link")];
        assert_eq!((link.1, link.3.as_str()), ('1', "big.bin"));
        let long = format!("{}/{}/{}", "d".repeat(60), "e".repeat(60), "f".repeat(120));
        assert!(entries.iter().any(|e| e.0 == long && e.4.iter().any(|(k, _)| k == "path")), "long names use PAX path");
        assert_eq!(entries[pos("long-target")].3, "t".repeat(150));
        assert!(entries[pos("usr/bin/tool")].4.contains(&("SCHILY.xattr.user.origin".to_string(), b"tested".to_vec())));
        assert!(!names.contains(&"sock"));
        // No atime/ctime records, empty uname/gname.
        for e in &entries {
            assert!(e.4.iter().all(|(k, _)| k != "atime" && k != "ctime"), "{}", e.0);
        }
        let mut a = tar::Archive::new(&tar_bytes[..]);
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            assert_eq!(e.header().username_bytes(), Some(&b""[..]));
            assert_eq!(e.header().groupname_bytes(), Some(&b""[..]));
        }
        // GNU tar accepts and lists the archive.
        let tarfile = tempfile::NamedTempFile::new().unwrap();
        fs::write(tarfile.path(), &tar_bytes).unwrap();
        let out = std::process::Command::new("tar").arg("-tvf").arg(tarfile.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&"f".repeat(120)));
    }

    #[test]
    fn same_input_twice_gives_the_same_bytes_and_source_date_epoch_clamps_mtimes() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        for d in [&a, &b] {
            fs::create_dir_all(d.join("etc")).unwrap();
            fs::write(d.join("etc/conf"), b"x=1\n").unwrap();
            fs::write(d.join("app"), b"binary").unwrap();
            symlink("app", d.join("link")).unwrap();
        }
        let stamp = |d: &Path, secs: i64| {
            for p in ["etc/conf", "app", "link", "etc", ""] {
                set_mtime(&d.join(p), secs);
            }
        };
        stamp(&a, 1_700_000_000);
        stamp(&b, 1_700_000_555);
        assert_eq!(tar_of(&a, &TarOptions::default()).0, tar_of(&a, &TarOptions::default()).0);
        assert_ne!(tar_of(&a, &TarOptions::default()).0, tar_of(&b, &TarOptions::default()).0, "mtimes are in the tar");
        let sde = TarOptions { source_date_epoch: Some(1_600_000_000) };
        let (ta, tb) = (tar_of(&a, &sde).0, tar_of(&b, &sde).0);
        assert!(ta == tb, "SOURCE_DATE_EPOCH makes both builders' layers identical");
        let mut arch = tar::Archive::new(&ta[..]);
        for e in arch.entries().unwrap() {
            assert_eq!(e.unwrap().header().mtime().unwrap(), 1_600_000_000);
        }
        // Older files keep their own time.
        let old = TarOptions { source_date_epoch: Some(1_800_000_000) };
        let old_tar = tar_of(&a, &old).0;
        let first_mtime = tar::Archive::new(&old_tar[..]).entries().unwrap().next().unwrap().unwrap().header().mtime().unwrap();
        assert_eq!(first_mtime, 1_700_000_000);
    }

    #[test]
    fn empty_directory_is_an_empty_layer() {
        let t = tempfile::tempdir().unwrap();
        let (bytes, stats) = tar_of(t.path(), &TarOptions::default());
        assert!(stats.is_empty());
        assert_eq!(bytes, vec![0u8; 1024]);
        let dst = tempfile::tempdir().unwrap();
        let xs = extract_layer_tar(&bytes[..], dst.path(), &ExtractOptions::default()).unwrap();
        assert_eq!(xs.entries, 0);
    }

    #[test]
    fn overlay_whiteouts_become_oci_whiteouts() {
        if !crate::testing::needs_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        mknod(&d.join("gone"), FileType::CharacterDevice, 0, 0, 0);
        fs::create_dir_all(d.join("opq/sub")).unwrap();
        fs::write(d.join("opq/keep"), b"k").unwrap();
        lset(&d.join("opq"), "trusted.overlay.opaque", b"y");
        fs::create_dir(d.join("uopq")).unwrap();
        lset(&d.join("uopq"), "user.overlay.opaque", b"y");
        fs::create_dir(d.join("notopq")).unwrap();
        lset(&d.join("notopq"), "trusted.overlay.opaque", b"x");
        fs::write(d.join("copied-up"), b"c").unwrap();
        lset(&d.join("copied-up"), "trusted.overlay.origin", b"\x00\xfb");
        lset(&d.join("copied-up"), "user.keep", b"1");
        // An xattr whiteout (zero-size file marked with overlay.whiteout).
        fs::write(d.join("xwh"), b"").unwrap();
        lset(&d.join("xwh"), "trusted.overlay.whiteout", b"");
        // The kernel shares one inode among whiteouts: they must not become hardlinks.
        fs::hard_link(d.join("gone"), d.join("opq/gone2")).unwrap();
        let (bytes, stats) = tar_of(d, &TarOptions::default());
        let entries = list(&bytes);
        let get = |n: &str| entries.iter().find(|e| e.0 == n).unwrap_or_else(|| panic!("{n} missing: {entries:?}"));
        assert_eq!((get(".wh.gone").1, get(".wh.gone").2), ('0', 0));
        assert_eq!(get("opq/.wh.gone2").1, '0');
        assert_eq!(get(".wh.xwh").1, '0');
        assert!(get("opq/.wh..wh..opq").1 == '0');
        assert!(get("uopq/.wh..wh..opq").1 == '0');
        assert!(!entries.iter().any(|e| e.0 == "notopq/.wh..wh..opq"), "opaque=x is not opaque");
        assert!(!entries.iter().any(|e| e.0 == "gone" || e.0 == "xwh"));
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        let p = |n| names.iter().position(|x| *x == n).unwrap();
        assert_eq!(p("opq/.wh..wh..opq"), p("opq/") + 1, "the opaque marker follows its directory");
        for e in &entries {
            assert!(e.4.iter().all(|(k, _)| !k.contains(".overlay.")), "overlay xattr leaked on {}", e.0);
        }
        assert!(get("copied-up").4.iter().any(|(k, _)| k == "SCHILY.xattr.user.keep"));
        assert_eq!((stats.whiteouts, stats.opaque_dirs, stats.hardlinks), (3, 2, 0));
    }

    /// A tar built entry by entry with raw names (no validation), for hostile inputs.
    fn raw_tar(entries: &[(Hdr, &[u8])]) -> Vec<u8> {
        let mut w = TarWriter { out: BufWriter::new(Vec::new()), bytes: 0 };
        for (h, data) in entries {
            let h = Hdr { size: data.len() as u64, ..h.clone() };
            w.header(&h).unwrap();
            w.out.write_all(data).unwrap();
            w.pad(data.len() as u64).unwrap();
        }
        w.out.write_all(&[0u8; 1024]).unwrap();
        w.out.into_inner().unwrap()
    }

    fn hdr(name: &str, typeflag: u8) -> Hdr {
        Hdr {
            name: name.as_bytes().to_vec(),
            typeflag,
            mode: if typeflag == b'5' { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 1_600_000_000,
            linkname: Vec::new(),
            devmajor: 0,
            devminor: 0,
            xattrs: Vec::new(),
        }
    }

    fn link(name: &str, typeflag: u8, target: &str) -> Hdr {
        Hdr { linkname: target.as_bytes().to_vec(), ..hdr(name, typeflag) }
    }

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

    // --- overlayfs -----------------------------------------------------------------------

    struct Mount(PathBuf);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }

    fn mount_overlay(lowers: &[&Path], upper: &Path, work: &Path, merged: &Path) -> Mount {
        let lower = lowers.iter().map(|p| p.to_str().unwrap()).collect::<Vec<_>>().join(":");
        let data = CString::new(format!("lowerdir={lower},upperdir={},workdir={}", upper.display(), work.display())).unwrap();
        rustix::mount::mount("overlay", merged, "overlay", rustix::mount::MountFlags::empty(), Some(data.as_c_str()))
            .unwrap_or_else(|e| panic!("mount overlay {data:?}: {e}"));
        Mount(merged.to_path_buf())
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn extracted_layer_works_as_overlay_lowerdir_and_upperdir_round_trips() {
        if !crate::testing::needs_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| {
            let d = t.path().join(n);
            fs::create_dir_all(&d).unwrap();
            d
        };
        // Base layer.
        let base = p("base");
        fs::write(base.join("a"), b"a").unwrap();
        fs::write(base.join("b"), b"b").unwrap();
        fs::create_dir(base.join("d")).unwrap();
        fs::write(base.join("d/x"), b"x").unwrap();
        fs::create_dir(base.join("e")).unwrap();
        fs::write(base.join("e/old"), b"old").unwrap();

        // 1. An OCI layer with whiteouts, extracted, hides files of the layer below.
        let l2 = p("l2");
        let tar_bytes =
            raw_tar(&[(hdr(".wh.a", b'0'), b""), (hdr("d/", b'5'), b""), (hdr("d/.wh..wh..opq", b'0'), b""), (hdr("d/y", b'0'), b"y")]);
        extract_layer_tar(&tar_bytes[..], &l2, &ExtractOptions::default()).unwrap();
        let (up, work, merged) = (p("up1"), p("work1"), p("merged1"));
        {
            let _m = mount_overlay(&[&l2, &base], &up, &work, &merged);
            assert_eq!(names(&merged), vec!["b", "d", "e"], "whiteout hides a");
            assert_eq!(names(&merged.join("d")), vec!["y"], "opaque d hides d/x");
            assert_eq!(fs::read(merged.join("e/old")).unwrap(), b"old");
        }

        // 2. Changes made through a real overlay mount: the upperdir's tar has the OCI
        // whiteouts, and extracting it gives a lowerdir with the same merged view.
        let (up, work, merged) = (p("up2"), p("work2"), p("merged2"));
        let view_before;
        {
            let _m = mount_overlay(&[&base], &up, &work, &merged);
            fs::remove_file(merged.join("a")).unwrap();
            fs::remove_file(merged.join("b")).unwrap();
            fs::remove_dir_all(merged.join("d")).unwrap();
            fs::create_dir(merged.join("d")).unwrap();
            fs::write(merged.join("d/z"), b"z").unwrap();
            fs::write(merged.join("e/new"), b"new").unwrap();
            fs::write(merged.join("n"), b"n").unwrap();
            view_before = snapshot(&merged);
        }
        let (tar_bytes, stats) = tar_of(&up, &TarOptions::default());
        let entries = list(&tar_bytes);
        let names_in_tar: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        for want in [".wh.a", ".wh.b", "d/", "d/.wh..wh..opq", "d/z", "e/", "e/new", "n"] {
            assert!(names_in_tar.contains(&want), "{want} missing from {names_in_tar:?}");
        }
        assert_eq!(stats.hardlinks, 0, "shared whiteout inodes are not hardlinks");
        let l3 = p("l3");
        extract_layer_tar(&tar_bytes[..], &l3, &ExtractOptions::default()).unwrap();
        let (up, work, merged) = (p("up3"), p("work3"), p("merged3"));
        let _m = mount_overlay(&[&l3, &base], &up, &work, &merged);
        let view_after = snapshot(&merged);
        assert_eq!(view_after.keys().collect::<Vec<_>>(), view_before.keys().collect::<Vec<_>>());
        for (k, v) in &view_before {
            let w = &view_after[k];
            assert_eq!((v.kind, v.mode, v.content.as_ref()), (w.kind, w.mode, w.content.as_ref()), "{k}");
        }
    }
}
