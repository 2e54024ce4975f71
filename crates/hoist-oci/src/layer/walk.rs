//! Reading one directory of a layer (an overlayfs upperdir or a plain directory) into the
//! entries the layer tar will hold, sorted bytewise by tar name: each child classified by
//! [`Kind`], overlay whiteouts (0/0 character devices, files marked `overlay.whiteout`)
//! renamed to `.wh.<name>`, opaque directories recognized, redirects and metacopy files
//! (which a layer cannot express) rejected, and extended attributes read with overlayfs's
//! own and the host's SELinux label dropped. Nothing here writes; `write` walks the tree.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::io::Errno;

use super::{is_overlay_xattr, LayerError, OVERLAY_XATTR_PREFIXES, WHITEOUT_PREFIX};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Whiteout,
    Dir { opaque: bool },
    File,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

pub(super) struct Child {
    /// Name in the directory.
    pub(super) name: OsString,
    /// Base name in the tar (`.wh.<name>` for whiteouts).
    pub(super) tar_name: Vec<u8>,
    pub(super) kind: Kind,
    pub(super) md: fs::Metadata,
    pub(super) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
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
pub(super) fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
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

/// The error of reading `path` of the layer directory.
pub(super) fn rd_err(path: &Path) -> impl FnOnce(io::Error) -> LayerError {
    let path = path.to_path_buf();
    move |source| LayerError::ReadDir { path, source }
}

/// The children of the directory `abs`, classified and sorted by their name in the tar.
pub(super) fn read_children(abs: &Path) -> Result<Vec<Child>, LayerError> {
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
    Ok(children)
}
