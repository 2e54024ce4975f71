//! COPY and ADD: executing a [`CopyOp`] into a directory, and the content digest of the
//! sources it selects (for the cache key).
//!
//! Semantics follow BuildKit's Dockerfile frontend (`dispatchCopy`) and file op (fsutil's
//! `copy.Copy`), checked against Docker 20.10's BuildKit where it has the feature:
//!
//! - Source paths are cleaned lexically and taken from the source root (`../x` and `/x` are
//!   `x` in the root); symlinks in them — the last component included — are followed *inside*
//!   the root, so a context symlink to `/etc/passwd` names the context's `etc/passwd`.
//! - A directory source copies its contents; a file source into an existing directory (or a
//!   destination ending in `/`) keeps its name; otherwise the destination names the file.
//! - Wildcards (Go `filepath.Match`) that match nothing copy nothing, silently (BuildKit does
//!   not fail; the pattern is reported in [`CopyStats::unmatched`]); a missing non-wildcard
//!   source is an error.
//! - Missing destination parents are created 0755, owned by `--chown` (else root).
//! - Owners: context files become 0:0, files from a stage keep theirs, `--chown` sets all
//!   copied entries (symlinks too). Modes, mtimes, symlinks (as symlinks), device nodes and
//!   xattrs are preserved; hard links are kept within one source item (not across sources or
//!   across the matches of a wildcard: one fsutil `Copy` each). `--chmod` applies to every
//!   copied file and directory (all 12 bits of an octal mode, as newer BuildKit), not to
//!   symlinks nor to created parents (0755, as Docker 20.10; newer BuildKit gives created
//!   parents the `--chmod` mode, which its issue tracker calls a regression).
//! - An existing directory at the destination is merged into; a file never replaces a
//!   directory and a directory never goes through a non-directory (errors); nothing is ever
//!   written through a symlink found at the destination.
//! - ADD extracts local tar archives (see the `archive` module), copies URL downloads with
//!   mode 0600 and heredocs (`COPY <<EOF`) as 0644 files.

mod archive;
pub mod chmod;
pub mod pattern;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hoist_oci::digest::Digest;
use sha2::{Digest as _, Sha256};

use crate::graph::{Chmod, CopyOp, CopySource, Source};
use crate::rootfs::{self, RootfsError};
use chmod::ModeSet;
use hoist_dockerfile::IgnoreError;
use pattern::PatternMatcher;

/// Limits on what one ADD may extract from an archive (decompression bombs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyLimits {
    /// Most bytes an archive may expand to (decompressed stream and extracted file data).
    pub max_bytes: u64,
    /// Most entries in one archive.
    pub max_entries: u64,
    /// Largest expansion ratio (decompressed / compressed size) ...
    pub max_ratio: u64,
    /// ... enforced once this many bytes were expanded (small archives of zeros are fine).
    pub ratio_grace_bytes: u64,
}

/// Default [`CopyLimits::max_bytes`]: 16 GiB (the largest SDK tarballs expand to a few GiB).
pub const DEFAULT_ARCHIVE_MAX_BYTES: u64 = 16 << 30;
/// Default [`CopyLimits::max_entries`].
pub const DEFAULT_ARCHIVE_MAX_ENTRIES: u64 = 2_000_000;
/// Default [`CopyLimits::max_ratio`]: source tarballs compress 3–10x; gzip of zeros 1000x.
pub const DEFAULT_ARCHIVE_MAX_RATIO: u64 = 100;
/// Default [`CopyLimits::ratio_grace_bytes`]: 64 MiB.
pub const DEFAULT_ARCHIVE_RATIO_GRACE: u64 = 64 << 20;

impl Default for CopyLimits {
    fn default() -> Self {
        CopyLimits {
            max_bytes: DEFAULT_ARCHIVE_MAX_BYTES,
            max_entries: DEFAULT_ARCHIVE_MAX_ENTRIES,
            max_ratio: DEFAULT_ARCHIVE_MAX_RATIO,
            ratio_grace_bytes: DEFAULT_ARCHIVE_RATIO_GRACE,
        }
    }
}

/// Everything [`copy`] needs for one COPY/ADD step.
pub struct CopyParams<'a> {
    /// The step: sources, destination, `--chmod`, `--exclude`, `--parents`, unpacking.
    pub op: &'a CopyOp,
    /// The build context directory, or the source stage's (read-only) rootfs.
    pub src_root: &'a Path,
    /// The rootfs to write into (a merged overlay mount), or an empty dir for `--link`.
    pub dest_root: &'a Path,
    /// `--chown`, already resolved by the caller with [`crate::rootfs::lookup_chown`] against
    /// the destination stage's rootfs (not the empty `--link` directory).
    pub owner: Option<(u32, u32)>,
    /// `ADD <url>`: downloaded by the caller (checksum verified), url → file. The file's
    /// mtime is kept: set it from `Last-Modified` (BuildKit does; epoch 0 when absent).
    pub urls: &'a HashMap<String, PathBuf>,
    /// Archive expansion limits for ADD.
    pub limits: CopyLimits,
}

/// What a [`copy`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Regular files written (extracted ones included).
    pub files: u64,
    /// Directories created or merged into.
    pub dirs: u64,
    /// Symbolic links created (copied as links, never followed).
    pub symlinks: u64,
    /// Hard links made (to a file copied earlier in the same source, or within an archive).
    pub hardlinks: u64,
    /// Device nodes, FIFOs, sockets.
    pub other: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Archives extracted (ADD).
    pub archives: u64,
    /// Source patterns that matched nothing (BuildKit copies nothing for them, silently; the
    /// caller may warn).
    pub unmatched: Vec<String>,
}

/// Errors of COPY/ADD. Messages name the source or destination path (as seen inside its
/// root) and what was expected; the caller adds the Dockerfile line.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A source path (or the directory before its first wildcard) does not exist.
    #[error("{source_path:?} not found in {from}")]
    SourceNotFound {
        /// The source as written in the step.
        source_path: String,
        /// Where it was looked up, e.g. `the build context` or `stage 1`.
        from: String,
    },
    /// A source path cannot be resolved inside its root (a symlink loop, a file used as a
    /// directory).
    #[error("cannot copy {source_path:?} from {from}: {error}")]
    SourceResolve {
        /// The source as written in the step.
        source_path: String,
        /// Where it was looked up, e.g. `the build context` or `stage 1`.
        from: String,
        /// Why it cannot be resolved.
        #[source]
        error: Box<RootfsError>,
    },
    /// The destination (or a directory on the way to it) cannot be resolved or created
    /// inside the destination root.
    #[error("cannot prepare destination {dest:?}: {error}")]
    DestResolve {
        /// The step's destination.
        dest: String,
        /// Why it cannot be resolved.
        #[source]
        error: Box<RootfsError>,
    },
    /// A directory is copied onto a path that exists and is not a directory.
    #[error("cannot copy a directory to {path}: it exists and is not a directory")]
    NotADirectory {
        /// The path inside the destination root.
        path: String,
    },
    /// A file is copied onto a path that is an existing directory.
    #[error("cannot copy a file to {path}: a directory is in the way")]
    DirectoryInTheWay {
        /// The path inside the destination root.
        path: String,
    },
    /// A filesystem call failed while reading a source or writing the destination.
    #[error("{op} {path}: {error}")]
    Io {
        /// What was being done, e.g. `lstat` or `read directory`.
        op: &'static str,
        /// The path, as seen inside its root.
        path: String,
        /// The OS error.
        #[source]
        error: io::Error,
    },
    /// An `--exclude` pattern, or the include pattern of a `--parents` source, is malformed.
    #[error("--exclude/--parents pattern: {0}")]
    Exclude(#[from] IgnoreError),
    /// A symbolic `--chmod` is malformed.
    #[error(transparent)]
    Mode(#[from] chmod::BadMode),
    /// An `ADD <url>` source is missing from [`CopyParams::urls`] (a caller bug).
    #[error("ADD {url}: the caller did not provide the downloaded file")]
    UrlNotDownloaded {
        /// The source URL.
        url: String,
    },
    /// An archive ADD extracts cannot be opened, decompressed or read, or has an entry that
    /// cannot be written.
    #[error("ADD {archive}: entry {entry:?}: {reason}")]
    Archive {
        /// The archive, as seen inside its source root.
        archive: String,
        /// The entry's name in the archive; empty when the archive itself is at fault.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// An archive ADD extracts goes over a [`CopyLimits`] bound (bytes, entries or
    /// compression ratio); nothing more is extracted.
    #[error("ADD {archive}: refusing to extract: {reason}")]
    ArchiveLimit {
        /// The archive, as seen inside its source root.
        archive: String,
        /// Which limit, and its value.
        reason: String,
    },
    /// A worker thread of a parallel copy panicked.
    #[error("a copy worker thread panicked")]
    Panicked,
}

fn io_error(op: &'static str, path: impl Into<String>) -> impl FnOnce(io::Error) -> CopyError {
    let path = path.into();
    move |error| CopyError::Io { op, path, error }
}

/// Set atime and mtime of `path` without following a final symlink.
pub(crate) fn set_times(path: &Path, asec: i64, ansec: i64, msec: i64, mnsec: i64) -> io::Result<()> {
    use rustix::fs::{AtFlags, Timestamps, CWD};
    let ts = |s: i64, n: i64| rustix::fs::Timespec { tv_sec: s, tv_nsec: n as _ };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps { last_access: ts(asec, ansec), last_modification: ts(msec, mnsec) },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
}

/// The file name BuildKit gives `ADD <url>`: the last segment of the URL's path
/// (percent-decoded), or `__unnamed__`.
pub fn url_file_name(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("");
    let decoded = percent_decode(path);
    let base = decoded.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    if base.is_empty() || base == "." || base == ".." {
        "__unnamed__".to_string()
    } else {
        base.to_string()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` cleaned lexically as an absolute path (BuildKit `filepath.Join("/", p)`).
fn clean_abs(p: &str) -> String {
    pattern::clean(&format!("/{p}"))
}

fn describe_from(from: &Source) -> String {
    match from {
        Source::Context => "the build context".to_string(),
        Source::Stage(i) => format!("stage {i}"),
        Source::Git(g) => format!("git repository {}", g.url),
        Source::Named(n) => format!("build context {n:?}"),
    }
}

/// One selected source item of a path source.
#[derive(Debug)]
struct Item {
    /// The item as the user sees it inside its root (`/dir/a.txt`).
    shown: String,
    /// Its name (last component before following links), used inside directory destinations.
    name: OsString,
    /// Host path after following symlinks inside the root.
    real: PathBuf,
    /// `real` relative to the source root, `/`-separated, no leading `/`.
    real_rel: String,
    meta: fs::Metadata,
}

/// A planned source of the op, in order.
enum Planned {
    Items { items: Vec<Item>, include: Option<PatternMatcher> },
    Url { url: String },
    Inline { name: String, content: String },
    Unmatched(String),
}

struct Planner<'a> {
    src_root: &'a Path,
    op: &'a CopyOp,
    exclude: Option<PatternMatcher>,
}

impl Planner<'_> {
    fn from(&self) -> String {
        describe_from(&self.op.from)
    }

    fn plan(&self) -> Result<Vec<Planned>, CopyError> {
        let mut out = Vec::new();
        for s in &self.op.sources {
            match s {
                CopySource::Path(p) => {
                    let (spec, include) = if self.op.parents {
                        // `--parents`: copy from the pivot (`a/./b` → from `a`) or the root,
                        // keeping the structure the pattern selects below it
                        let (parent, pat) = match p.split_once("/./") {
                            Some((parent, pat)) => (parent.to_string(), pat.to_string()),
                            None => ("/".to_string(), p.clone()),
                        };
                        let pat = clean_abs(&pat).trim_start_matches('/').to_string();
                        let include = if pat.is_empty() { None } else { Some(PatternMatcher::new(&[pat])?) };
                        (parent, include)
                    } else {
                        (p.clone(), None)
                    };
                    let items = self.expand(&spec)?;
                    if items.is_empty() {
                        out.push(Planned::Unmatched(p.clone()));
                    } else {
                        out.push(Planned::Items { items, include });
                    }
                }
                CopySource::Url { url, .. } => out.push(Planned::Url { url: url.clone() }),
                CopySource::Inline { name, content } => out.push(Planned::Inline { name: name.clone(), content: content.clone() }),
            }
        }
        Ok(out)
    }

    fn resolve(&self, spec: &str, path: &str) -> Result<(PathBuf, String), CopyError> {
        let comps = rootfs::resolve_components(self.src_root, path.as_bytes(), true).map_err(|error| CopyError::SourceResolve {
            source_path: spec.to_string(),
            from: self.from(),
            error: Box::new(error),
        })?;
        let rel = comps.iter().map(|c| c.to_string_lossy()).collect::<Vec<_>>().join("/");
        Ok((rootfs::join_components(self.src_root, &comps), rel))
    }

    fn item(&self, spec: &str, path: &str) -> Result<Item, CopyError> {
        let (real, real_rel) = self.resolve(spec, path)?;
        let meta = match fs::symlink_metadata(&real) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(CopyError::SourceNotFound { source_path: spec.to_string(), from: self.from() })
            }
            Err(e) => return Err(io_error("lstat", spec)(e)),
        };
        let name = OsString::from(path.rsplit('/').next().unwrap_or(""));
        Ok(Item { shown: path.to_string(), name, real, real_rel, meta })
    }

    /// A source spec → the items it selects (wildcards expanded as fsutil's
    /// `ResolveWildcards`: the part before the first wildcard component is resolved in-root,
    /// the rest is matched against paths below it in lexical walk order, matched directories
    /// are not descended into).
    fn expand(&self, spec: &str) -> Result<Vec<Item>, CopyError> {
        let cleaned = clean_abs(spec);
        let comps: Vec<&str> = cleaned.split('/').filter(|c| !c.is_empty()).collect();
        let Some(wi) = comps.iter().position(|c| pattern::has_wildcards(c)) else {
            return Ok(vec![self.item(spec, &cleaned)?]);
        };
        let base = format!("/{}", comps[..wi].join("/"));
        let pat = comps[wi..].join("/");
        let depth = comps.len() - wi;
        let (base_real, base_rel) = self.resolve(spec, &base)?;
        let base_meta = match fs::symlink_metadata(&base_real) {
            Ok(m) => m,
            Err(_) => return Err(CopyError::SourceNotFound { source_path: spec.to_string(), from: self.from() }),
        };
        if !base_meta.is_dir() {
            return Ok(Vec::new());
        }
        self.expand_walk(&base_real, &base_rel, &pat, depth, (String::new(), 0), spec)
    }

    /// Go's `filepath.Walk` order (pre-order, names sorted) over the directory `rel` below the
    /// wildcard base, matching each path against `pat`; recursion is bounded by the number of
    /// components of the pattern (`*` never matches `/`).
    fn expand_walk(
        &self,
        base_real: &Path,
        base_rel: &str,
        pat: &str,
        depth: usize,
        (rel, d): (String, usize),
        spec: &str,
    ) -> Result<Vec<Item>, CopyError> {
        let mut items = Vec::new();
        let dir = if rel.is_empty() { base_real.to_path_buf() } else { base_real.join(&rel) };
        for name in read_dir_sorted(&dir).map_err(io_error("read directory", format!("/{base_rel}/{rel}")))? {
            let child = if rel.is_empty() { name.to_string_lossy().into_owned() } else { format!("{rel}/{}", name.to_string_lossy()) };
            // a malformed pattern matches nothing, as in fsutil (which ignores Match's error)
            let matched = pattern::go_match(pat, &child).unwrap_or(false);
            if matched {
                // COPY --exclude also filters what a wildcard selects (`hom*` minus `*.txt`)
                if self.exclude.as_ref().is_some_and(|e| e.matches(&child)) {
                    continue;
                }
                let full = if base_rel.is_empty() { format!("/{child}") } else { format!("/{base_rel}/{child}") };
                items.push(self.item(spec, &full)?);
                continue;
            }
            if d + 1 < depth {
                let cm = fs::symlink_metadata(dir.join(&name)).map_err(io_error("lstat", format!("/{base_rel}/{child}")))?;
                if cm.is_dir() {
                    items.append(&mut self.expand_walk(base_real, base_rel, pat, depth, (child, d + 1), spec)?);
                }
            }
        }
        Ok(items)
    }
}

fn read_dir_sorted(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names: Vec<OsString> = fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Events of a selection walk below one source item.
enum Ev<'a> {
    /// A directory that ends up in the copy (selected, or holding something selected), before
    /// its children. `rel` is relative to the item ("" for the item itself).
    Dir { rel: &'a str, path: &'a Path, meta: &'a fs::Metadata },
    /// The same directory after its children.
    DirEnd { rel: &'a str, path: &'a Path, meta: &'a fs::Metadata },
    /// A selected non-directory.
    Leaf { rel: &'a str, path: &'a Path, meta: &'a fs::Metadata },
}

struct Frame {
    rel: String,
    path: PathBuf,
    meta: fs::Metadata,
    materialized: bool,
    /// children still to visit, reverse-sorted (pop gives the next in order)
    children: Vec<OsString>,
}

/// Walk the tree below `top` (not following symlinks) with fsutil's include/exclude rules:
/// excluded entries are skipped (an excluded directory is not entered unless a `!` pattern
/// could re-include something in it); with include patterns, directories that do not match are
/// entered and appear only once something below them is selected. Children are visited in
/// byte order of their names. Iterative: deep trees do not grow the stack.
fn walk(
    top: &Path,
    top_meta: &fs::Metadata,
    include: Option<&PatternMatcher>,
    exclude: Option<&PatternMatcher>,
    f: &mut dyn FnMut(Ev) -> Result<(), CopyError>,
) -> Result<(), CopyError> {
    if !top_meta.is_dir() {
        return f(Ev::Leaf { rel: "", path: top, meta: top_meta });
    }
    let children = |p: &Path, rel: &str| -> Result<Vec<OsString>, CopyError> {
        let mut c = read_dir_sorted(p).map_err(io_error("read directory", format!("/{rel}")))?;
        c.reverse();
        Ok(c)
    };
    let exclusions = exclude.is_some_and(|e| e.has_exclusions());
    let mut stack = vec![Frame {
        rel: String::new(),
        path: top.to_path_buf(),
        meta: top_meta.clone(),
        materialized: true,
        children: children(top, "")?,
    }];
    f(Ev::Dir { rel: "", path: top, meta: top_meta })?;
    while let Some(fr) = stack.last_mut() {
        let Some(name) = fr.children.pop() else {
            let fr = stack.pop().expect("non-empty stack");
            if fr.materialized {
                f(Ev::DirEnd { rel: &fr.rel, path: &fr.path, meta: &fr.meta })?;
            }
            continue;
        };
        let rel = if fr.rel.is_empty() { name.to_string_lossy().into_owned() } else { format!("{}/{}", fr.rel, name.to_string_lossy()) };
        let path = fr.path.join(&name);
        let matched_inc = include.is_none_or(|m| m.matches(&rel));
        let excluded = exclude.is_some_and(|m| m.matches(&rel));
        let included = matched_inc && !excluded;
        if !included && include.is_none() && !exclusions {
            continue;
        }
        let meta = fs::symlink_metadata(&path).map_err(io_error("lstat", format!("/{rel}")))?;
        if meta.is_dir() {
            if excluded && !exclusions {
                continue;
            }
            if !included && !excluded && include.is_some_and(|m| !m.could_match_below(&rel)) {
                continue;
            }
            let kids = children(&path, &rel)?;
            stack.push(Frame { rel, path, meta, materialized: false, children: kids });
            if included {
                materialize(&mut stack, f)?;
            }
        } else {
            if !included {
                continue;
            }
            materialize(&mut stack, f)?;
            f(Ev::Leaf { rel: &rel, path: &path, meta: &meta })?;
        }
    }
    Ok(())
}

fn materialize(stack: &mut [Frame], f: &mut dyn FnMut(Ev) -> Result<(), CopyError>) -> Result<(), CopyError> {
    for fr in stack.iter_mut() {
        if !fr.materialized {
            fr.materialized = true;
            f(Ev::Dir { rel: &fr.rel, path: &fr.path, meta: &fr.meta })?;
        }
    }
    Ok(())
}

/// Extended attributes worth copying: all but the host's SELinux label and overlayfs' own.
fn read_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    xattrs_of(XattrsFrom::Path(path))
}

/// Where [`Copier::apply_info`] reads the source's extended attributes.
#[derive(Clone, Copy)]
enum XattrsFrom<'a> {
    /// The source by path (not following a symlink).
    Path(&'a Path),
    /// The source open: no second path lookup.
    File(&'a File),
}

fn xattrs_of(from: XattrsFrom<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let size = match from {
        XattrsFrom::Path(p) => rustix::fs::llistxattr_query(p),
        XattrsFrom::File(f) => rustix::fs::flistxattr_query(f),
    };
    let Ok(size) = size else { return out };
    if size == 0 {
        return out;
    }
    let mut names = vec![0u8; size];
    let n = match from {
        XattrsFrom::Path(p) => rustix::fs::llistxattr(p, &mut names[..]),
        XattrsFrom::File(f) => rustix::fs::flistxattr(f, &mut names[..]),
    };
    let Ok(n) = n else { return out };
    for name in names[..n.min(size)].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if name == b"security.selinux" || name.starts_with(b"trusted.overlay.") {
            continue;
        }
        let Ok(name_c) = std::ffi::CString::new(name) else { continue };
        let vsize = match from {
            XattrsFrom::Path(p) => rustix::fs::lgetxattr_query(p, name_c.as_c_str()),
            XattrsFrom::File(f) => rustix::fs::fgetxattr_query(f, name_c.as_c_str()),
        };
        let Ok(vsize) = vsize else { continue };
        let mut value = vec![0u8; vsize];
        let vn = match from {
            XattrsFrom::Path(p) => rustix::fs::lgetxattr(p, name_c.as_c_str(), &mut value[..]),
            XattrsFrom::File(f) => rustix::fs::fgetxattr(f, name_c.as_c_str(), &mut value[..]),
        };
        let Ok(vn) = vn else { continue };
        value.truncate(vn);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// Files up to this size are copied with one read and one write.
const SMALL_FILE: usize = 128 * 1024;

thread_local! {
    /// The read buffer of small files, one per copying thread.
    static SMALL_BUF: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
}

/// How the file mode of copied entries is decided.
enum ModeRule {
    Keep,
    Octal(u32),
    Symbolic(ModeSet),
}

impl ModeRule {
    fn from(c: Option<&Chmod>) -> Result<ModeRule, CopyError> {
        Ok(match c {
            None => ModeRule::Keep,
            Some(Chmod::Octal(v)) => ModeRule::Octal(v & 0o7777),
            Some(Chmod::Symbolic(s)) => ModeRule::Symbolic(ModeSet::parse(s)?),
        })
    }

    fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        match self {
            ModeRule::Keep => mode & 0o7777,
            ModeRule::Octal(v) => *v,
            ModeRule::Symbolic(s) => s.apply(mode & 0o7777, is_dir),
        }
    }
}

/// A directory whose metadata is applied once the files below it are written.
struct DirEnd {
    target: PathBuf,
    src: PathBuf,
    meta: fs::Metadata,
    /// Owner, mode, times and xattrs (a directory we created or may overwrite), or times only.
    info: bool,
}

/// Regular files waiting to be copied, and directories waiting for them.
#[derive(Default)]
struct LeafBatch {
    /// (source, target, source metadata)
    files: Vec<(PathBuf, PathBuf, fs::Metadata)>,
    /// (first copy of the file, source, target, source metadata)
    links: Vec<(PathBuf, PathBuf, PathBuf, fs::Metadata)>,
    dir_ends: Vec<DirEnd>,
}

impl LeafBatch {
    /// Most files held at once (bounds memory on huge trees).
    const MAX: usize = 4096;
}

/// The running copy: destination, rules, hard-link memory, stats.
struct Copier<'a> {
    p: &'a CopyParams<'a>,
    mode: ModeRule,
    /// owner for entries without --chown: fixed (context) or `None` = keep the source's
    fixed_owner: Option<(u32, u32)>,
    exclude: Option<PatternMatcher>,
    /// (dev, ino) of multiply-linked source files → where the first copy went (one source)
    links: HashMap<(u64, u64), PathBuf>,
    stats: CopyStats,
}

impl Copier<'_> {
    fn shown(&self, host: &Path) -> String {
        match host.strip_prefix(self.p.dest_root) {
            Ok(r) if r.as_os_str().is_empty() => "/".to_string(),
            Ok(r) => format!("/{}", r.display()),
            Err(_) => host.display().to_string(),
        }
    }

    /// A source path as seen inside the source root.
    fn shown_src(&self, host: &Path) -> String {
        match host.strip_prefix(self.p.src_root) {
            Ok(r) => format!("/{}", r.display()),
            Err(_) => host.display().to_string(),
        }
    }

    fn owner_for(&self, meta: &fs::Metadata) -> (u32, u32) {
        self.p.owner.or(self.fixed_owner).unwrap_or((meta.uid(), meta.gid()))
    }

    /// Create `mkdir -p` of the link-free host path `dir` inside the destination (0755,
    /// --chown or root).
    fn mkdir_p(&self, dir: &Path) -> Result<(), CopyError> {
        let rel = dir.strip_prefix(self.p.dest_root).unwrap_or(Path::new(""));
        let comps: Vec<OsString> = rel.components().map(|c| c.as_os_str().to_os_string()).collect();
        rootfs::create_resolved_dirs(self.p.dest_root, &comps, 0o755, self.p.owner, &self.shown(dir))
            .map_err(|error| CopyError::DestResolve { dest: self.p.op.dest.clone(), error: Box::new(error) })?;
        Ok(())
    }

    /// fsutil's destination preparation for one source item: create the directory the
    /// destination names (trailing `/`) or its parent, resolve it in-root, decide whether the
    /// item goes *into* it, create what is missing. Returns the host path to write.
    fn prepare_dest(&mut self, src_is_dir: bool, name: &OsStr, copy_dir_contents: bool) -> Result<PathBuf, CopyError> {
        let dest = &self.p.op.dest;
        let into = dest.ends_with('/') || dest.ends_with("/.") || dest == "." || dest.is_empty();
        let cleaned = clean_abs(dest);
        let derr = |error| CopyError::DestResolve { dest: dest.clone(), error: Box::new(error) };
        let ensure = if into {
            cleaned.clone()
        } else {
            match cleaned.rfind('/') {
                Some(i) => cleaned[..i].to_string(),
                None => String::new(),
            }
        };
        rootfs::create_dir_all_in_root(self.p.dest_root, &ensure, 0o755, self.p.owner).map_err(derr)?;
        let comps = rootfs::resolve_components(self.p.dest_root, cleaned.as_bytes(), true).map_err(derr)?;
        let mut dst = rootfs::join_components(self.p.dest_root, &comps);
        let existing = fs::symlink_metadata(&dst).ok();
        let exists = existing.is_some();
        let is_dir = existing.as_ref().is_some_and(|m| m.is_dir());
        if (!copy_dir_contents && src_is_dir && exists) || (!src_is_dir && is_dir) {
            dst.push(name);
        }
        let target = if copy_dir_contents && src_is_dir && !exists {
            dst.clone()
        } else {
            dst.parent().map(Path::to_path_buf).unwrap_or_else(|| self.p.dest_root.to_path_buf())
        };
        if target.starts_with(self.p.dest_root) {
            self.mkdir_p(&target)?;
        }
        Ok(dst)
    }

    /// Owner, mode, times and xattrs of a copied entry (fsutil `copyFileInfo`).
    /// `open` is the target when it is a file just written and still open: its metadata is
    /// then set through it, without looking its path up again through the overlay.
    fn apply_info(&self, target: &Path, open: Option<&File>, src: Option<XattrsFrom<'_>>, meta: &fs::Metadata) -> Result<(), CopyError> {
        let err = |op: &'static str| move |e: io::Error| CopyError::Io { op, path: self.shown(target), error: e };
        let (uid, gid) = self.owner_for(meta);
        let ft = meta.file_type();
        let mode = fs::Permissions::from_mode(self.mode.apply(meta.mode(), ft.is_dir()));
        if let Some(f) = open {
            use rustix::fs::{Gid, Timestamps, Uid};
            let ts = |s: i64, n: i64| rustix::fs::Timespec { tv_sec: s, tv_nsec: n as _ };
            rustix::fs::fchown(f, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|e| err("chown")(e.into()))?;
            f.set_permissions(mode).map_err(err("chmod"))?;
            let times =
                Timestamps { last_access: ts(meta.atime(), meta.atime_nsec()), last_modification: ts(meta.mtime(), meta.mtime_nsec()) };
            rustix::fs::futimens(f, &times).map_err(|e| err("utimes")(e.into()))?;
        } else {
            std::os::unix::fs::lchown(target, Some(uid), Some(gid)).map_err(err("chown"))?;
            if !ft.is_symlink() {
                fs::set_permissions(target, mode).map_err(err("chmod"))?;
            }
            set_times(target, meta.atime(), meta.atime_nsec(), meta.mtime(), meta.mtime_nsec()).map_err(err("utimes"))?;
        }
        if let Some(src) = src {
            for (name, value) in xattrs_of(src) {
                if let Ok(n) = std::ffi::CString::new(name) {
                    let flags = rustix::fs::XattrFlags::empty();
                    let set = match open {
                        Some(f) => rustix::fs::fsetxattr(f, n.as_c_str(), &value, flags),
                        None => rustix::fs::lsetxattr(target, n.as_c_str(), &value, flags),
                    };
                    if let Err(e) = set {
                        tracing::debug!("copying xattr {:?} to {}: {e}", n, target.display());
                    }
                }
            }
        }
        Ok(())
    }

    /// Remove whatever non-directory is at `target` (never following it); a directory there
    /// is an error.
    fn make_room_for_file(&self, target: &Path) -> Result<(), CopyError> {
        match fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => Err(CopyError::DirectoryInTheWay { path: self.shown(target) }),
            Ok(_) => fs::remove_file(target).map_err(io_error("remove", self.shown(target))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("lstat", self.shown(target))(e)),
        }
    }

    fn create_file(&self, target: &Path) -> Result<File, CopyError> {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(target)
            .map_err(|e| io_error("create", self.shown(target))(e))
    }

    /// Copy one source item (file or directory, with the walk's selection) to `dst`.
    fn copy_item(&mut self, item: &Item, dst: &Path, include: Option<&PatternMatcher>) -> Result<(), CopyError> {
        // BuildKit's file op calls fsutil's Copy once per wildcard match, each with its own
        // copier: hard links are kept within one item only (checked with Docker 20.10)
        self.links.clear();
        let exclude = self.exclude.take();
        // per directory on the walk: was it created by us, may we overwrite its metadata
        let mut dirs: Vec<(bool, bool)> = Vec::new();
        // Regular files wait in a batch that is copied on every core (small files are
        // syscall-bound); a directory's own metadata is applied only after every file below
        // it is written.
        let mut batch = LeafBatch::default();
        let res = walk(&item.real, &item.meta, include, exclude.as_ref(), &mut |ev| match ev {
            Ev::Dir { rel, .. } => {
                let target = if rel.is_empty() { dst.to_path_buf() } else { dst.join(rel) };
                let created = match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => false,
                    Ok(_) => return Err(CopyError::NotADirectory { path: self.shown(&target) }),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::create_dir(&target).map_err(io_error("mkdir", self.shown(&target)))?;
                        true
                    }
                    Err(e) => return Err(io_error("lstat", self.shown(&target))(e)),
                };
                dirs.push((created, !rel.is_empty()));
                self.stats.dirs += 1;
                Ok(())
            }
            Ev::DirEnd { rel, path, meta } => {
                let target = if rel.is_empty() { dst.to_path_buf() } else { dst.join(rel) };
                let (created, overwrite) = dirs.pop().unwrap_or((false, false));
                batch.dir_ends.push(DirEnd { target, src: path.to_path_buf(), meta: meta.clone(), info: created || overwrite });
                if batch.files.is_empty() && batch.links.is_empty() {
                    self.flush(&mut batch)?;
                }
                Ok(())
            }
            Ev::Leaf { rel, path, meta } => {
                let target = if rel.is_empty() { dst.to_path_buf() } else { dst.join(rel) };
                if !meta.file_type().is_file() {
                    return self.copy_leaf(path, &target, meta);
                }
                // A file linked more than once is copied the first time and linked to that
                // copy after (fsutil keeps hard links within one source).
                let first = if meta.nlink() > 1 {
                    let key = (meta.dev(), meta.ino());
                    let first = self.links.get(&key).cloned();
                    if first.is_none() {
                        self.links.insert(key, target.clone());
                    }
                    first
                } else {
                    None
                };
                match first {
                    Some(first) => batch.links.push((first, path.to_path_buf(), target, meta.clone())),
                    None => batch.files.push((path.to_path_buf(), target, meta.clone())),
                }
                if batch.files.len() + batch.links.len() >= LeafBatch::MAX {
                    self.flush(&mut batch)?;
                }
                Ok(())
            }
        });
        let res = res.and_then(|()| self.flush(&mut batch));
        self.exclude = exclude;
        res
    }

    /// Copy the batched files (on every core when there are many), link the later names of
    /// multiply-linked ones, then apply the metadata of the directories that ended
    /// meanwhile, in walk order.
    fn flush(&mut self, batch: &mut LeafBatch) -> Result<(), CopyError> {
        let files = std::mem::take(&mut batch.files);
        let copied: Vec<Result<u64, CopyError>> = if files.len() < 64 {
            files.iter().map(|(src, target, meta)| self.copy_file(src, target, meta)).collect()
        } else {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
            let this = &*self;
            std::thread::scope(|scope| {
                let workers: Vec<_> = files
                    .chunks(files.len().div_ceil(threads))
                    .map(|part| {
                        scope.spawn(move || part.iter().try_fold(0u64, |n, (src, target, meta)| Ok(n + this.copy_file(src, target, meta)?)))
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap_or(Err(CopyError::Panicked))).collect()
            })
        };
        for r in copied {
            self.stats.bytes += r?;
        }
        self.stats.files += files.len() as u64;
        for (first, src, target, meta) in std::mem::take(&mut batch.links) {
            self.make_room_for_file(&target)?;
            fs::hard_link(&first, &target).map_err(io_error("link", self.shown(&target)))?;
            self.stats.hardlinks += 1;
            self.apply_info(&target, None, Some(XattrsFrom::Path(&src)), &meta)?;
        }
        for d in std::mem::take(&mut batch.dir_ends) {
            if d.info {
                self.apply_info(&d.target, None, Some(XattrsFrom::Path(&d.src)), &d.meta)?;
            } else {
                // the destination directory itself keeps its owner and mode; BuildKit
                // gives it the source directory's times
                set_times(&d.target, d.meta.atime(), d.meta.atime_nsec(), d.meta.mtime(), d.meta.mtime_nsec())
                    .map_err(io_error("utimes", self.shown(&d.target)))?;
            }
        }
        Ok(())
    }

    /// Copy one regular file with its metadata; returns the bytes written.
    fn copy_file(&self, src: &Path, target: &Path, meta: &fs::Metadata) -> Result<u64, CopyError> {
        let mut input = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(src)
            .map_err(|e| io_error("open", self.shown_src(src))(e))?;
        // Whatever is in the way is looked at only when creating the file fails.
        let mut out = match self.create_file(target) {
            Err(CopyError::Io { error, .. }) if error.kind() == io::ErrorKind::AlreadyExists => {
                self.make_room_for_file(target)?;
                self.create_file(target)?
            }
            r => r?,
        };
        let n = if meta.len() <= SMALL_FILE as u64 {
            // One read and one write: cheaper than the kernel copy paths for a small file.
            SMALL_BUF.with_borrow_mut(|buf| -> io::Result<u64> {
                let buf = buf.get_or_insert_with(|| vec![0u8; SMALL_FILE + 1]);
                let mut len = 0;
                loop {
                    match input.read(&mut buf[len..])? {
                        0 => break,
                        k => len += k,
                    }
                    if len == buf.len() {
                        // It grew past the small size: write what is read, copy the rest.
                        out.write_all(&buf[..len])?;
                        return Ok(len as u64 + io::copy(&mut input, &mut out)?);
                    }
                }
                out.write_all(&buf[..len])?;
                Ok(len as u64)
            })
        } else {
            io::copy(&mut input, &mut out)
        }
        .map_err(|e| io_error("copy to", self.shown(target))(e))?;
        self.apply_info(target, Some(&out), Some(XattrsFrom::File(&input)), meta)?;
        Ok(n)
    }

    /// Copy a symlink or special file (regular files go through [`LeafBatch`]).
    fn copy_leaf(&mut self, src: &Path, target: &Path, meta: &fs::Metadata) -> Result<(), CopyError> {
        let ft = meta.file_type();
        self.make_room_for_file(target)?;
        if ft.is_symlink() {
            let link = fs::read_link(src).map_err(io_error("readlink", self.shown_src(src)))?;
            std::os::unix::fs::symlink(&link, target).map_err(io_error("symlink", self.shown(target)))?;
            self.stats.symlinks += 1;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() || ft.is_socket() {
            use rustix::fs::{FileType, Mode, CWD};
            rustix::fs::mknodat(CWD, target, FileType::from_raw_mode(meta.mode()), Mode::from_raw_mode(meta.mode() & 0o7777), meta.rdev())
                .map_err(|e| io_error("mknod", self.shown(target))(e.into()))?;
            self.stats.other += 1;
        }
        self.apply_info(target, None, Some(XattrsFrom::Path(src)), meta)
    }

    /// A file that does not come from the source root (URL download, heredoc).
    fn write_virtual_file(&mut self, name: &str, content: &mut dyn Read, mode: u32, mtime: (i64, i64)) -> Result<(), CopyError> {
        let dst = self.prepare_dest(false, OsStr::new(name), false)?;
        self.make_room_for_file(&dst)?;
        let mut out = self.create_file(&dst)?;
        let n = io::copy(content, &mut out).map_err(io_error("write", self.shown(&dst)))?;
        out.flush().map_err(io_error("write", self.shown(&dst)))?;
        drop(out);
        let (uid, gid) = self.p.owner.unwrap_or((0, 0));
        std::os::unix::fs::lchown(&dst, Some(uid), Some(gid)).map_err(io_error("chown", self.shown(&dst)))?;
        let mode = self.mode.apply(mode, false);
        fs::set_permissions(&dst, fs::Permissions::from_mode(mode)).map_err(io_error("chmod", self.shown(&dst)))?;
        set_times(&dst, mtime.0, mtime.1, mtime.0, mtime.1).map_err(io_error("utimes", self.shown(&dst)))?;
        self.stats.files += 1;
        self.stats.bytes += n;
        Ok(())
    }
}

/// A name safe to use as one path component (heredoc names, URL file names).
fn leaf_name(name: &str) -> String {
    let base = name.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    if base.is_empty() || base == "." || base == ".." {
        "__unnamed__".to_string()
    } else {
        base.to_string()
    }
}

/// Execute a COPY/ADD step: copy the op's sources from `src_root` into `dest_root`.
pub fn copy(p: &CopyParams) -> Result<CopyStats, CopyError> {
    let op = p.op;
    let exclude = if op.exclude.is_empty() { None } else { Some(PatternMatcher::new(&op.exclude)?) };
    let planner = Planner { src_root: p.src_root, op, exclude: exclude.clone() };
    // plan everything first: a missing source fails before anything is written
    let plan = planner.plan()?;
    let mut c = Copier {
        p,
        mode: ModeRule::from(op.chmod.as_ref())?,
        fixed_owner: if op.from == Source::Context { Some((0, 0)) } else { None },
        exclude,
        links: HashMap::new(),
        stats: CopyStats::default(),
    };
    for planned in plan {
        match planned {
            Planned::Unmatched(s) => c.stats.unmatched.push(s),
            Planned::Items { items, include } => {
                for item in items {
                    let is_dir = item.meta.is_dir();
                    if op.is_add && op.unpack && !is_dir && archive::is_archive(&item.real) {
                        // the destination is a directory, trailing `/` or not
                        let cleaned = clean_abs(&op.dest);
                        let derr = |error| CopyError::DestResolve { dest: op.dest.clone(), error: Box::new(error) };
                        rootfs::create_dir_all_in_root(p.dest_root, &cleaned, 0o755, p.owner).map_err(derr)?;
                        let dir = rootfs::resolve_in_root(p.dest_root, &cleaned, true).map_err(derr)?;
                        archive::extract(&item.real, &item.shown, &dir, p.owner, &p.limits, &mut c.stats)?;
                        continue;
                    }
                    let dst = c.prepare_dest(is_dir, &item.name, true)?;
                    c.copy_item(&item, &dst, include.as_ref())?;
                }
            }
            Planned::Url { url } => {
                let file = p.urls.get(&url).ok_or_else(|| CopyError::UrlNotDownloaded { url: url.clone() })?;
                let mut f = File::open(file).map_err(io_error("open", file.display().to_string()))?;
                let m = f.metadata().map_err(io_error("stat", file.display().to_string()))?;
                c.write_virtual_file(&url_file_name(&url), &mut f, 0o600, (m.mtime(), m.mtime_nsec()))?;
            }
            Planned::Inline { name, content } => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| (d.as_secs() as i64, d.subsec_nanos() as i64))
                    .unwrap_or((0, 0));
                c.write_virtual_file(&leaf_name(&name), &mut content.as_bytes(), 0o644, now)?;
            }
        }
    }
    Ok(c.stats)
}

/// Length-prefixed field writer for the source digest.
struct DigestWriter(Sha256);

impl DigestWriter {
    fn field(&mut self, b: &[u8]) {
        self.0.update((b.len() as u64).to_be_bytes());
        self.0.update(b);
    }
    fn num(&mut self, n: u64) {
        self.0.update(n.to_be_bytes());
    }
}

fn hash_file(path: &Path) -> Result<Digest, CopyError> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_error("open", path.display().to_string()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf).map_err(io_error("read", path.display().to_string()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest::from_hasher(h))
}

/// The content digest of the sources this COPY would read, for the cache key, without
/// copying: per selected entry its relative path, type, mode, size, link target, device
/// number, xattrs, owner (for stage sources; context files always become 0:0) and content
/// digest (`file_digest(path)` when the caller knows it — context files, keyed by their path
/// relative to `src_root` without a leading `/` — else the file is hashed), in the order the
/// copy visits them (sorted). Hard links within a source are recorded as such. Never mtimes.
///
/// Changing any byte or mode of a selected file changes the digest; files not selected don't.
/// URL sources contribute only their URL and checksum: the caller must add the downloaded
/// content's digest to the key. A missing non-wildcard source is the same error as in [`copy`].
pub fn source_digest(src_root: &Path, op: &CopyOp, file_digest: &dyn Fn(&str) -> Option<Digest>) -> Result<Digest, CopyError> {
    let exclude = if op.exclude.is_empty() { None } else { Some(PatternMatcher::new(&op.exclude)?) };
    let planner = Planner { src_root, op, exclude: exclude.clone() };
    let plan = planner.plan()?;
    let with_owner = op.from != Source::Context;
    let mut w = DigestWriter(Sha256::new());
    w.field(b"hoist.copy.sources.v1");
    for (i, planned) in plan.iter().enumerate() {
        w.num(i as u64);
        match planned {
            Planned::Unmatched(s) => {
                w.field(b"unmatched");
                w.field(s.as_bytes());
            }
            Planned::Url { url } => {
                w.field(b"url");
                w.field(url.as_bytes());
                for s in &op.sources {
                    if let CopySource::Url { url: u, checksum } = s {
                        if u == url {
                            w.field(checksum.as_deref().unwrap_or("").as_bytes());
                        }
                    }
                }
            }
            Planned::Inline { name, content } => {
                w.field(b"inline");
                w.field(name.as_bytes());
                w.field(content.as_bytes());
            }
            Planned::Items { items, include } => {
                for item in items {
                    w.field(b"item");
                    w.field(item.shown.as_bytes());
                    let mut links: HashMap<(u64, u64), String> = HashMap::new();
                    walk(&item.real, &item.meta, include.as_ref(), exclude.as_ref(), &mut |ev| {
                        let (rel, path, meta, tag): (&str, &Path, &fs::Metadata, &[u8]) = match ev {
                            Ev::Dir { rel, path, meta } => (rel, path, meta, b"dir"),
                            Ev::DirEnd { .. } => return Ok(()),
                            Ev::Leaf { rel, path, meta } => (rel, path, meta, b"leaf"),
                        };
                        w.field(tag);
                        w.field(rel.as_bytes());
                        w.num(u64::from(meta.mode()));
                        if with_owner {
                            w.num(u64::from(meta.uid()));
                            w.num(u64::from(meta.gid()));
                        }
                        for (n, v) in read_xattrs(path) {
                            w.field(&n);
                            w.field(&v);
                        }
                        let ft = meta.file_type();
                        if ft.is_file() {
                            w.num(meta.len());
                            let key = (meta.dev(), meta.ino());
                            if meta.nlink() > 1 {
                                if let Some(first) = links.get(&key) {
                                    w.field(b"hardlink");
                                    w.field(first.as_bytes());
                                    return Ok(());
                                }
                                links.insert(key, rel.to_string());
                            }
                            let real_rel = if rel.is_empty() {
                                item.real_rel.clone()
                            } else if item.real_rel.is_empty() {
                                rel.to_string()
                            } else {
                                format!("{}/{rel}", item.real_rel)
                            };
                            let d = match file_digest(&real_rel) {
                                Some(d) => d,
                                None => hash_file(path)?,
                            };
                            w.field(d.as_str().as_bytes());
                        } else if ft.is_symlink() {
                            let t = fs::read_link(path).map_err(io_error("readlink", format!("/{rel}")))?;
                            w.field(t.as_os_str().as_bytes());
                        } else if !ft.is_dir() {
                            w.num(meta.rdev());
                        }
                        Ok(())
                    })?;
                }
            }
        }
    }
    Ok(Digest::from_hasher(w.0))
}

#[cfg(test)]
mod tests;
