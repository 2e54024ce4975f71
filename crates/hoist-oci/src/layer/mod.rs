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
//!
//! The submodules, one job each:
//!
//! - `write`: [`write_layer_tar`], the depth-first walk that turns the entries of a layer
//!   directory into tar entries (whiteout and opaque markers, hardlinks, file contents).
//! - `walk`: reading one directory of a layer into sorted, classified entries (overlay
//!   whiteouts and opaque directories recognized, overlayfs features a layer cannot express
//!   rejected, extended attributes read and filtered).
//! - `header`: encoding tar headers (ustar fields, PAX records for what does not fit, GNU
//!   base-256 device numbers) and the padded block stream they are written to.
//! - `extract`: [`extract_layer_tar`], applying a layer tar onto a directory: whiteouts to
//!   the overlay form, component-by-component path resolution that never leaves the root,
//!   hardlink checks, byte and entry limits, directory metadata applied last.
//!
//! This file holds what they share: the public options, statistics and error types, the
//! whiteout names and the overlayfs xattr prefixes.

mod extract;
mod header;
mod walk;
mod write;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use extract::extract_layer_tar;
pub use write::{write_layer_tar, write_layer_tar_with};

use std::io;
use std::path::PathBuf;

/// Name prefix of an OCI whiteout entry.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the OCI opaque-directory marker entry.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";

/// Prefixes of overlayfs's own extended attributes, which are never written to a layer nor
/// taken from one.
const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];

/// Errors of writing or extracting a layer tar.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The layer directory (or a file in it) could not be read.
    #[error("layer directory {path}: {source}")]
    ReadDir {
        /// The directory or file.
        path: PathBuf,
        /// Why reading it failed.
        source: io::Error,
    },
    /// The path to archive is not a directory.
    #[error("layer directory {path} is not a directory")]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },
    /// A file changed size while it was archived.
    #[error("{path} changed while it was archived ({what}); archive only a directory nothing writes to")]
    Changed {
        /// The file.
        path: PathBuf,
        /// How it changed (`grew beyond 10 bytes`).
        what: String,
    },
    /// The upperdir uses an overlayfs feature a layer cannot express (metacopy, redirect_dir).
    #[error("{path}: {reason}")]
    Unsupported {
        /// The file or directory using the feature.
        path: PathBuf,
        /// The feature and why it is refused.
        reason: String,
    },
    /// The output writer failed.
    #[error("writing the layer tar: {0}")]
    Write(io::Error),
    /// The tar stream is malformed or could not be read.
    #[error("reading the layer tar{}: {source}", after.as_ref().map(|e| format!(" after entry {e:?}")).unwrap_or_default())]
    ReadTar {
        /// The last entry read, when known.
        after: Option<String>,
        /// The read or tar format error.
        source: io::Error,
    },
    /// An entry is invalid or hostile (escaping hardlink, symlink loop, ...).
    #[error("tar entry {entry:?}: {reason}")]
    BadEntry {
        /// The entry's path in the tar.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A filesystem operation failed while extracting an entry.
    #[error("extracting tar entry {entry:?} into {dir}: {op}: {source}")]
    Extract {
        /// The entry's path in the tar.
        entry: String,
        /// The directory extracted into.
        dir: PathBuf,
        /// The operation that failed (`create file`, `chown`, ...).
        op: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
    /// A limit of [`ExtractOptions`] was exceeded.
    #[error("layer tar exceeds the {limit} limit of {max}: refusing to extract more (a decompression bomb?)")]
    Limit {
        /// Which limit: `max bytes` or `max entries`.
        limit: &'static str,
        /// Its value (bytes or entries).
        max: u64,
    },
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

/// Whether `name` is one of overlayfs's own extended attributes.
fn is_overlay_xattr(name: &[u8]) -> bool {
    OVERLAY_XATTR_PREFIXES.iter().any(|p| name.starts_with(p.as_bytes()))
}
