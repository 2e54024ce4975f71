//! The build context as the engine sees it: a directory on the builder holding exactly the
//! files the client sent (after `.dockerignore`), plus the manifest of their digests, so
//! cache keys of COPY/ADD never re-read a file whose digest the client already reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hoist_oci::digest::Digest;
use sha2::{Digest as _, Sha256};

/// Kind of a context entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// One entry of the context manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextEntry {
    /// Relative, slash-separated path.
    pub path: String,
    pub kind: EntryKind,
    /// Permission and special bits.
    pub mode: u32,
    pub size: u64,
    /// Digest of a file's bytes.
    pub digest: Option<Digest>,
    pub link_target: Option<String>,
}

/// A materialized build context.
#[derive(Debug, Clone)]
pub struct Context {
    dir: PathBuf,
    entries: BTreeMap<String, ContextEntry>,
}

impl Context {
    /// A context rooted at `dir` whose entries are described by `entries`.
    pub fn new(dir: PathBuf, entries: impl IntoIterator<Item = ContextEntry>) -> Context {
        Context { dir, entries: entries.into_iter().map(|e| (e.path.clone(), e)).collect() }
    }

    /// The directory holding the context's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the context is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The digest the client reported for a file (relative path, with or without `./`).
    pub fn file_digest(&self, rel: &str) -> Option<Digest> {
        let rel = normalize(rel);
        self.entries.get(rel).and_then(|e| e.digest.clone())
    }

    /// Whether every path names its file exactly: names that are not UTF-8 are held lossily
    /// here, so two of them can look alike (and [`Context::subtree_digest`] cannot tell them
    /// apart).
    pub fn names_exact(&self) -> bool {
        !self.entries.keys().any(|p| p.contains('\u{FFFD}'))
    }

    /// A digest of everything at or below `rel` (path, kind, mode, size, content, link),
    /// used to key `RUN --mount=type=bind` of the context.
    pub fn subtree_digest(&self, rel: &str) -> Digest {
        let rel = normalize(rel);
        let mut h = Sha256::new();
        for (path, e) in &self.entries {
            let inside = rel.is_empty()
                || path == rel
                || (path.starts_with(rel) && path.as_bytes().get(rel.len()) == Some(&b'/'));
            if !inside {
                continue;
            }
            h.update(path.as_bytes());
            h.update([0, e.kind as u8]);
            h.update(e.mode.to_le_bytes());
            h.update(e.size.to_le_bytes());
            if let Some(d) = &e.digest {
                h.update(d.as_str().as_bytes());
            }
            if let Some(l) = &e.link_target {
                h.update(l.as_bytes());
            }
            h.update([0xff]);
        }
        Digest::from_hasher(h)
    }
}

fn normalize(rel: &str) -> &str {
    let mut r = rel.trim_start_matches('/');
    while let Some(s) = r.strip_prefix("./") {
        r = s.trim_start_matches('/');
    }
    if r == "." {
        return "";
    }
    r.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &[u8]) -> ContextEntry {
        ContextEntry {
            path: path.into(),
            kind: EntryKind::File,
            mode: 0o644,
            size: content.len() as u64,
            digest: Some(Digest::of(content)),
            link_target: None,
        }
    }

    #[test]
    fn file_digest_accepts_dot_slash_and_leading_slash() {
        let ctx = Context::new("/nonexistent".into(), [file("src/a.rs", b"a")]);
        assert_eq!(ctx.file_digest("./src/a.rs"), Some(Digest::of(b"a")));
        assert_eq!(ctx.file_digest("/src/a.rs"), Some(Digest::of(b"a")));
        assert_eq!(ctx.file_digest("src/b.rs"), None);
    }

    #[test]
    fn subtree_digest_changes_only_for_files_below() {
        let a = Context::new("/x".into(), [file("src/a", b"1"), file("srcx", b"1"), file("doc/r", b"1")]);
        let b = Context::new("/x".into(), [file("src/a", b"1"), file("srcx", b"2"), file("doc/r", b"2")]);
        let c = Context::new("/x".into(), [file("src/a", b"2"), file("srcx", b"1"), file("doc/r", b"1")]);
        assert_eq!(a.subtree_digest("src"), b.subtree_digest("./src/"));
        assert_ne!(a.subtree_digest("src"), c.subtree_digest("src"));
        assert_ne!(a.subtree_digest("."), b.subtree_digest("."));
    }
}
