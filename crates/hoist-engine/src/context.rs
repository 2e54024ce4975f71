//! The build context as the engine sees it: a directory on the builder holding exactly the
//! files the client sent (after `.dockerignore`), plus the manifest of their digests, so
//! cache keys of COPY/ADD never re-read a file whose digest the client already reported.
//! The directory may be filled lazily, the first time a step reads files from it: a build
//! whose steps are all cached never writes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use hoist_oci::digest::Digest;
use sha2::{Digest as _, Sha256};

/// Kind of a context entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (its target in [`ContextEntry::link_target`]).
    Symlink,
}

/// One entry of the context manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextEntry {
    /// Relative, slash-separated path.
    pub path: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Permission and special bits.
    pub mode: u32,
    /// Size in bytes (of a file's content).
    pub size: u64,
    /// Digest of a file's bytes.
    pub digest: Option<Digest>,
    /// A symlink's target, as stored in the link.
    pub link_target: Option<String>,
    /// A file hard-linked to another file of the context: that file's path.
    pub hardlink: Option<String>,
}

/// Why a context's files (or more of them) are not there. The builder service that writes
/// them owns the cause; it is kept as the source.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct Unavailable(std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl Unavailable {
    /// Wrap the cause (any error, or a message).
    pub fn new(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Unavailable {
        Unavailable(std::sync::Arc::from(cause.into()))
    }
}

/// Writes a context's files (blocking) and returns the directory holding them.
pub type Materializer = Box<dyn FnOnce() -> Result<PathBuf, Unavailable> + Send>;

/// A build context.
pub struct Context {
    entries: BTreeMap<String, ContextEntry>,
    materializer: Mutex<Option<Materializer>>,
    dir: OnceLock<Result<PathBuf, Unavailable>>,
    digest: OnceLock<Option<Digest>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("dir", &self.dir.get()).field("entries", &self.entries.len()).finish()
    }
}

impl Context {
    /// A context whose files are in `dir`, described by `entries`.
    pub fn new(dir: PathBuf, entries: impl IntoIterator<Item = ContextEntry>) -> Context {
        let c = Context::with(entries, None);
        let _ = c.dir.set(Ok(dir));
        c
    }

    /// A context described by `entries` whose files `materialize` writes when first asked for.
    pub fn lazy(entries: impl IntoIterator<Item = ContextEntry>, materialize: Materializer) -> Context {
        Context::with(entries, Some(materialize))
    }

    fn with(entries: impl IntoIterator<Item = ContextEntry>, materializer: Option<Materializer>) -> Context {
        Context {
            entries: entries.into_iter().map(|e| (e.path.clone(), e)).collect(),
            materializer: Mutex::new(materializer),
            dir: OnceLock::new(),
            digest: OnceLock::new(),
        }
    }

    /// The directory holding the context's files, written first if it is not yet (once;
    /// concurrent callers wait for it). Blocking.
    pub fn files(&self) -> Result<&Path, Unavailable> {
        let dir = self.dir.get_or_init(|| match self.materializer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(materialize) => materialize(),
            None => Err(Unavailable::new("an earlier attempt to write the context's files panicked")),
        });
        dir.as_ref().map(PathBuf::as_path).map_err(Clone::clone)
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

    /// A digest of the whole manifest (computed once), or `None` when it cannot tell every
    /// two contexts apart: names that are not UTF-8 are held lossily here, so two of them
    /// can look alike.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.get_or_init(|| (!self.entries.keys().any(|p| p.contains('\u{FFFD}'))).then(|| self.subtree_digest(""))).as_ref()
    }

    /// A digest of everything at or below `rel` (path, kind, mode, size, content, link),
    /// used to key `RUN --mount=type=bind` of the context.
    pub fn subtree_digest(&self, rel: &str) -> Digest {
        let rel = normalize(rel);
        let mut h = Sha256::new();
        for (path, e) in &self.entries {
            let inside = rel.is_empty() || path == rel || (path.starts_with(rel) && path.as_bytes().get(rel.len()) == Some(&b'/'));
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
            if let Some(l) = &e.hardlink {
                h.update([0xfe]);
                h.update(l.as_bytes());
            }
            h.update([0xff]);
        }
        Digest::from_hasher(h)
    }
}

/// What of the context the client sent: everything, or the paths it walked (each with
/// everything below it and its parent directories).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Reach {
    /// The whole context (after `.dockerignore`).
    #[default]
    All,
    /// Only these paths (relative, cleaned).
    Paths(std::collections::BTreeSet<String>),
}

impl Reach {
    /// Whether everything at or below `selector` was sent ("" is the whole context).
    pub fn covers(&self, selector: &str) -> bool {
        match self {
            Reach::All => true,
            Reach::Paths(p) => p.iter().any(|s| s.is_empty() || selector == s || is_below(selector, s)),
        }
    }
}

fn is_below(path: &str, dir: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

pub use hoist_dockerfile::instructions::source_selector as selector;

/// The context paths a graph's steps read: COPY/ADD sources and RUN mounts from the
/// context, as selectors (see [`selector`]).
pub fn needed(graph: &crate::graph::BuildGraph) -> std::collections::BTreeSet<String> {
    use crate::graph::{CopySource, MountKind, Op, Source};
    let mut out = std::collections::BTreeSet::new();
    for stage in &graph.stages {
        for step in &stage.steps {
            match &step.op {
                Op::Copy(c) if c.from == Source::Context => {
                    for s in &c.sources {
                        if let CopySource::Path(p) = s {
                            out.insert(selector(p));
                        }
                    }
                }
                Op::Run(r) => {
                    for m in &r.mounts {
                        match &m.kind {
                            MountKind::Bind { from: Source::Context, source, .. }
                            | MountKind::Cache { from: Some(Source::Context), source, .. } => {
                                out.insert(selector(source));
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Brings a build more of its context from the client, when steps read paths the client did
/// not send (a base image's `ONBUILD COPY`, or anything its reading of the Dockerfile
/// missed): the builder asks over the build stream and the files come as any context does.
#[async_trait::async_trait]
pub trait ContextFetcher: Send + Sync {
    /// The build's context with `paths` (selectors) added.
    async fn extend(&self, paths: Vec<String>) -> Result<std::sync::Arc<Context>, Unavailable>;
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
            hardlink: None,
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
    fn a_lazy_context_is_written_once_and_only_when_its_files_are_asked_for() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let ctx = Arc::new(Context::lazy(
            [file("a", b"1")],
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(PathBuf::from("/x"))
            }),
        ));
        assert_eq!(ctx.file_digest("a"), Some(Digest::of(b"1")));
        assert_eq!(runs.load(Ordering::SeqCst), 0, "digests come from the manifest");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = ctx.clone();
                std::thread::spawn(move || c.files().map(Path::to_path_buf))
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().unwrap(), PathBuf::from("/x"));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let failing = Context::lazy([], Box::new(|| Err(Unavailable::new("context file sha256:x was not uploaded"))));
        assert!(failing.files().unwrap_err().to_string().contains("not uploaded"));
        assert!(failing.files().is_err(), "the failure stays");
    }

    #[test]
    fn the_whole_digest_follows_the_manifest_unless_names_are_lossy() {
        let a = Context::new("/x".into(), [file("a", b"1")]);
        let b = Context::new("/y".into(), [file("a", b"2")]);
        assert_eq!(a.digest(), Context::new("/z".into(), [file("a", b"1")]).digest(), "the directory does not count");
        assert_ne!(a.digest(), b.digest());
        assert!(a.digest().is_some());
        assert_eq!(Context::new("/x".into(), [file("caf\u{FFFD}", b"1")]).digest(), None);
    }

    #[test]
    fn selectors_stop_at_wildcards_and_reach_covers_paths_below_what_was_sent() {
        assert_eq!(selector("./src/app/"), "src/app");
        assert_eq!(selector("pkg/*.json"), "pkg");
        assert_eq!(selector("a/./b/c"), "a/b/c", "--parents pivots read the same files");
        assert_eq!(selector("*"), "");
        assert_eq!(selector("."), "");
        assert_eq!(selector("../x"), "x", "clamped to the context");
        let r = Reach::Paths(["src".to_string(), "go.mod".to_string()].into());
        assert!(r.covers("src") && r.covers("src/main.rs") && r.covers("go.mod"));
        assert!(!r.covers("srcx") && !r.covers("") && !r.covers("app.txt"));
        assert!(Reach::All.covers(""));
    }

    #[test]
    fn subtree_digest_changes_only_for_files_below() {
        let a = Context::new("/x".into(), [file("src/a", b"1"), file("srcx", b"1"), file("doc/r", b"1")]);
        let b = Context::new("/x".into(), [file("src/a", b"1"), file("srcx", b"2"), file("doc/r", b"2")]);
        let c = Context::new("/x".into(), [file("src/a", b"2"), file("srcx", b"1"), file("doc/r", b"1")]);
        assert_eq!(a.subtree_digest("src"), b.subtree_digest("./src/"));
        assert_ne!(a.subtree_digest("src"), c.subtree_digest("src"));
        assert_ne!(a.subtree_digest("."), b.subtree_digest("."));
        // Two names of one file are not two files of the same content.
        let linked =
            Context::new("/x".into(), [file("src/a", b"1"), ContextEntry { hardlink: Some("src/a".into()), ..file("src/b", b"1") }]);
        let copied = Context::new("/x".into(), [file("src/a", b"1"), file("src/b", b"1")]);
        assert_ne!(linked.subtree_digest("src"), copied.subtree_digest("src"));
    }
}
