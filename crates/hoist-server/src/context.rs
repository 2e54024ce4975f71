//! The builder's side of context sync: a content-addressed store of context files per
//! project, and a directory per client session that is brought up to date with each build's
//! manifest by changing only what changed.
//!
//! A file the store already holds (from any earlier build, any path) is never sent again:
//! renames and copies of known content transfer nothing.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hoist_engine::context::{Context, ContextEntry, EntryKind, Materializer, Unavailable};
use hoist_oci::digest::Digest;
use hoist_oci::store::{BlobWriter, ContentStore};
use hoist_proto::v1;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Errors of context sync.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// A manifest, session name or upload the builder refuses: a bad or repeated path, a
    /// parent that is no directory of the context, an invalid hard link, a bad digest, or
    /// an upload whose content does not match its digest.
    #[error("context manifest: {0}")]
    Manifest(String),
    /// A context id that is not prepared: never issued, already taken by a build, or forgotten (each
    /// project keeps only its newest prepared contexts).
    #[error("context {0} is unknown or expired: send the manifest again")]
    UnknownContext(String),
    /// A file of the context is not in the store: the client was asked for it and did not
    /// upload it, or it was gone when the session's tree was written.
    #[error("context file {digest} was not uploaded")]
    MissingBlob {
        /// The file's content digest.
        digest: String,
    },
    /// A filesystem operation on the store or a session directory failed.
    #[error("context store {path}: {message}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        message: String,
    },
    /// The context is larger than the builder accepts.
    #[error(
        "the build context has {what} {got}, more than the builder accepts ({max}; hoist serve {flag}): exclude files with .dockerignore"
    )]
    TooLarge {
        /// What is counted: `"entries:"` or `"bytes of files:"`.
        what: &'static str,
        /// How many the manifest has.
        got: u64,
        /// The limit ([`ContextLimits`]).
        max: u64,
        /// The `hoist serve` flag that sets the limit.
        flag: &'static str,
    },
}

/// Most contexts prepared but not yet built, per project (older ones are forgotten).
const MAX_PENDING: usize = 64;

/// Most manifests kept per project to be named again ([`ContextStore::prepare_known`]):
/// one per session, the least recently used forgotten first.
const MAX_KNOWN: usize = 8;

/// Most entries of those manifests, together (about 250 bytes of memory each).
const MAX_KNOWN_ENTRIES: usize = 300_000;

/// What one build context may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextLimits {
    /// Most entries (files, directories, symlinks).
    pub max_entries: u64,
    /// Most bytes of file content (also the most one upload may send).
    pub max_bytes: u64,
}

impl Default for ContextLimits {
    fn default() -> Self {
        ContextLimits {
            max_entries: hoist_engine::limits::DEFAULT_MAX_CONTEXT_ENTRIES,
            max_bytes: hoist_engine::limits::DEFAULT_MAX_CONTEXT_BYTES,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContextError + '_ {
    move |e| ContextError::Io { path: path.to_path_buf(), message: e.to_string() }
}

/// One entry as recorded for a session directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Recorded {
    kind: u8,
    mode: u32,
    size: u64,
    digest: String,
    link: String,
    mtime: i64,
    mtime_nsec: u32,
    /// The file this one is a hard link to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    hardlink: String,
}

impl Recorded {
    fn of(e: &v1::ContextEntry) -> Recorded {
        Recorded {
            kind: e.kind as u8,
            mode: e.mode & 0o7777,
            size: e.size,
            digest: e.digest.clone(),
            link: key(&link_bytes(e)),
            mtime: e.mtime,
            mtime_nsec: e.mtime_nsec,
            hardlink: e.hardlink.clone(),
        }
    }
}

/// The exact bytes of an entry's path (names need not be UTF-8).
fn path_bytes(e: &v1::ContextEntry) -> Vec<u8> {
    if e.raw_path.is_empty() {
        e.path.as_bytes().to_vec()
    } else {
        e.raw_path.clone()
    }
}

/// The exact bytes of a symlink's target.
fn link_bytes(e: &v1::ContextEntry) -> Vec<u8> {
    if e.raw_link_target.is_empty() {
        e.link_target.as_bytes().to_vec()
    } else {
        e.raw_link_target.clone()
    }
}

/// A string key for a path: itself when UTF-8, else \u{1} and its hex (UTF-8 paths may not
/// contain \u{1}, see [`validate_path`]).
fn key(p: &[u8]) -> String {
    match std::str::from_utf8(p) {
        Ok(s) => s.to_string(),
        Err(_) => format!("\u{1}{}", hex::encode(p)),
    }
}

/// The bytes of a [`key`].
fn unkey(k: &str) -> Vec<u8> {
    match k.strip_prefix('\u{1}').and_then(|h| hex::decode(h).ok()) {
        Some(b) => b,
        None => k.as_bytes().to_vec(),
    }
}

fn os(p: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(p)
}

/// Counters of one sync, for build records and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Entries in the manifest.
    pub entries: u64,
    /// Files whose content the builder lacked (asked of the client).
    pub missing: u64,
    /// Their bytes.
    pub missing_bytes: u64,
}

struct Pending {
    session: String,
    entries: Arc<Vec<v1::ContextEntry>>,
    stats: SyncStats,
    /// What the client was asked to upload.
    asked: std::collections::HashSet<Digest>,
}

/// A manifest checked before, which its client may name by digest instead of sending it
/// again while its context does not change.
struct Known {
    digest: String,
    session: String,
    entries: Arc<Vec<v1::ContextEntry>>,
}

/// A prepared context: its id, the file digests the client must upload, and the digest
/// that names its manifest in [`ContextStore::prepare_known`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The id a build names.
    pub id: String,
    /// The file digests the builder lacks.
    pub missing: Vec<String>,
    /// The manifest's digest.
    pub manifest: String,
}

/// A session directory kept for a client (one per machine and context directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Its directory name.
    pub name: String,
    /// When a build last used it (seconds since the epoch).
    pub last_used: u64,
    /// What removing it frees: the content of the files no other session refers to.
    pub bytes: u64,
    /// A build is using it now: it counts, but cannot be removed.
    pub busy: bool,
}

/// Context files and session directories of one project.
pub struct ContextStore {
    root: PathBuf,
    /// Held (read) while a manifest is checked against the store and (write) while unused
    /// blobs are deleted, so that a blob found present is not deleted before it is used.
    sweep: std::sync::RwLock<()>,
    blobs: ContentStore,
    pending: Mutex<HashMap<String, Pending>>,
    sessions: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    limits: ContextLimits,
    /// Order of pending contexts, oldest first (to forget the oldest past [`MAX_PENDING`]).
    pending_order: Mutex<std::collections::VecDeque<String>>,
    /// The blobs each session directory's `state.json` refers to, kept while that file is
    /// the same file: the collection after every build reads them, and parsing a record of
    /// 100,000 entries each time cost more than the build it followed.
    references: Mutex<HashMap<PathBuf, (FileStamp, References)>>,
    /// The digests of the store's blobs: its directory is listed once, then the set follows
    /// the commits and removals (only this store writes there). Every build used to list
    /// the directory three times, 50–100 ms each for 100,000 blobs.
    listed: Mutex<Option<std::collections::HashSet<Digest>>>,
    /// Manifests checked before, most recently used last: checking and sending 100,000
    /// entries again cost a warm build more than everything else it did.
    known: Mutex<std::collections::VecDeque<Known>>,
}

/// The blobs (digest, size) a session directory's files are.
type References = Arc<Vec<(String, u64)>>;

/// What tells one version of a file from another: `state.json` is replaced by a rename,
/// so a new version is a new inode.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i64,
}

/// A build's context: its session directory is brought to the manifest the first time a
/// step reads files from it, and then held against other builds' updates until dropped.
pub struct MaterializedContext {
    /// The context the engine builds from: its entries, and its files once written.
    pub context: Arc<Context>,
    /// What syncing it took.
    pub stats: SyncStats,
    written: Arc<std::sync::atomic::AtomicU64>,
    _held: Arc<Mutex<Option<Held>>>,
    /// Its session and manifest (to extend it with more paths).
    session: String,
    entries: Arc<Vec<v1::ContextEntry>>,
}

/// The tree a build reads its context from.
enum Held {
    /// The session's directory, which other builds of the session may read too.
    Shared(#[allow(dead_code)] tokio::sync::OwnedRwLockReadGuard<()>),
    /// A tree of this build's own (removed when the build ends): the session's directory
    /// held another manifest and other builds were reading it.
    Private(PathBuf),
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Held::Private(dir) = self {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

impl MaterializedContext {
    /// Files (re)written into the session directory (0 until a step reads the context).
    pub fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn validate_path(p: &[u8]) -> Result<(), ContextError> {
    let bad = p.is_empty()
        || p[0] == b'/'
        || p.split(|&b| b == b'/').any(|c| c.is_empty() || c == b"." || c == b"..")
        || p.contains(&0)
        || p.contains(&1);
    if bad {
        return Err(ContextError::Manifest(format!(
            "invalid path {:?}: expected a relative path without . or .. components",
            String::from_utf8_lossy(p)
        )));
    }
    Ok(())
}

/// Check a client's manifest: within `limits`, every path relative and clean, once, below
/// a directory of the manifest; hard links to files of the same content and mode. (File
/// digests are parsed when the store is asked for them.)
fn check_manifest(entries: &[v1::ContextEntry], l: ContextLimits) -> Result<(), ContextError> {
    let n = entries.len() as u64;
    if n > l.max_entries {
        return Err(ContextError::TooLarge { what: "entries:", got: n, max: l.max_entries, flag: "--max-context-entries" });
    }
    let total = entries.iter().filter(|e| e.kind == v1::EntryKind::File as i32).fold(0u64, |t, e| t.saturating_add(e.size));
    if total > l.max_bytes {
        return Err(ContextError::TooLarge { what: "bytes of files:", got: total, max: l.max_bytes, flag: "--max-context-bytes" });
    }
    let mut kinds: HashMap<Vec<u8>, i32> = HashMap::new();
    for e in entries {
        let p = path_bytes(e);
        validate_path(&p)?;
        if kinds.insert(p, e.kind).is_some() {
            return Err(ContextError::Manifest(format!("path {:?} appears twice", e.path)));
        }
    }
    // A hard link names another file of the manifest with the same content and mode,
    // which is no link itself.
    let by_path: HashMap<&str, &v1::ContextEntry> =
        entries.iter().filter(|e| e.raw_path.is_empty()).map(|e| (e.path.as_str(), e)).collect();
    for e in entries.iter().filter(|e| !e.hardlink.is_empty()) {
        let ok = e.kind == v1::EntryKind::File as i32
            && e.raw_path.is_empty()
            && e.hardlink != e.path
            && by_path.get(e.hardlink.as_str()).is_some_and(|t| {
                t.kind == v1::EntryKind::File as i32 && t.hardlink.is_empty() && t.digest == e.digest && t.mode & 0o7777 == e.mode & 0o7777
            });
        if !ok {
            return Err(ContextError::Manifest(format!("{:?}: invalid hard link to {:?}", e.path, e.hardlink)));
        }
    }
    for e in entries {
        // Every parent must be a directory of the manifest: never a symlink that a later
        // entry would be written through.
        let full = path_bytes(e);
        let mut parent = full.as_slice();
        while let Some(i) = parent.iter().rposition(|&b| b == b'/') {
            let p = &parent[..i];
            if kinds.get(p) != Some(&(v1::EntryKind::Dir as i32)) {
                return Err(ContextError::Manifest(format!(
                    "{:?}: its parent {:?} is not a directory of the context",
                    e.path,
                    String::from_utf8_lossy(p)
                )));
            }
            parent = p;
        }
    }
    Ok(())
}

impl ContextStore {
    /// A context store under `root` (`<state>/contexts/<project>`).
    pub fn open(root: PathBuf) -> Result<ContextStore, ContextError> {
        let blobs = ContentStore::open(root.join("blobs")).map_err(|e| ContextError::Io { path: root.clone(), message: e.to_string() })?;
        fs::create_dir_all(root.join("sessions")).map_err(io_err(&root))?;
        // Builds' private trees left by a builder that was killed.
        for e in fs::read_dir(root.join("sessions")).map_err(io_err(&root))?.flatten() {
            if e.file_name().to_string_lossy().contains(".build-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(ContextStore {
            root,
            sweep: std::sync::RwLock::new(()),
            blobs,
            pending: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            limits: ContextLimits::default(),
            pending_order: Mutex::new(std::collections::VecDeque::new()),
            references: Mutex::new(HashMap::new()),
            listed: Mutex::new(None),
            known: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// The same store holding contexts to `limits`.
    pub fn with_limits(mut self, limits: ContextLimits) -> ContextStore {
        self.limits = limits;
        self
    }

    /// The limits contexts are held to.
    pub fn limits(&self) -> ContextLimits {
        self.limits
    }

    /// Check a manifest and answer which file digests must be uploaded.
    pub fn prepare(&self, manifest: v1::ContextManifest) -> Result<Prepared, ContextError> {
        check_manifest(&manifest.entries, self.limits)?;
        let digest = Digest::of(&hoist_proto::Message::encode_to_vec(&manifest)).to_string();
        let entries = Arc::new(manifest.entries);
        // (File digests are parsed here: a manifest is kept only once it prepared.)
        let prepared = self.prepare_checked(manifest.session.clone(), entries.clone(), digest.clone())?;
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.retain(|k| k.session != manifest.session);
        known.push_back(Known { digest, session: manifest.session, entries });
        let mut total: usize = known.iter().map(|k| k.entries.len()).sum();
        while known.len() > MAX_KNOWN || total > MAX_KNOWN_ENTRIES {
            let Some(old) = known.pop_front() else { break };
            total -= old.entries.len();
        }
        Ok(prepared)
    }

    /// Prepare again the manifest of session `session` that [`ContextStore::prepare`]
    /// answered with digest `manifest`; `None` when it is not kept (any more).
    pub fn prepare_known(&self, session: &str, manifest: &str) -> Result<Option<Prepared>, ContextError> {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = known.iter().position(|k| k.session == session && k.digest == manifest) else { return Ok(None) };
        let k = known.remove(i).expect("a found index");
        let (digest, entries) = (k.digest.clone(), k.entries.clone());
        known.push_back(k);
        drop(known);
        self.prepare_checked(session.to_string(), entries, digest).map(Some)
    }

    /// Prepare a checked manifest: ask for the files the store lacks.
    fn prepare_checked(&self, session: String, entries: Arc<Vec<v1::ContextEntry>>, manifest: String) -> Result<Prepared, ContextError> {
        let _no_sweep = self.sweep.read().unwrap_or_else(|e| e.into_inner());
        let mut missing = Vec::new();
        let mut asked = std::collections::HashSet::new();
        let mut missing_bytes = 0;
        let listed = self.listed()?;
        let present = |d: &Digest| listed.as_ref().is_some_and(|l| l.contains(d));
        for e in entries.iter().filter(|e| e.kind == v1::EntryKind::File as i32) {
            let d: Digest = e.digest.parse().map_err(|err| ContextError::Manifest(format!("{}: {err}", e.path)))?;
            if !present(&d) && asked.insert(e.digest.as_str()) {
                missing.push(e.digest.clone());
                missing_bytes += e.size;
            }
        }
        drop(listed);
        let id = hoist_oci::random::hex(16);
        let stats = SyncStats { entries: entries.len() as u64, missing: missing.len() as u64, missing_bytes };
        let asked = missing.iter().filter_map(|d| d.parse().ok()).collect();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut order = self.pending_order.lock().unwrap_or_else(|e| e.into_inner());
        // Prepared contexts that never get built must not pile up.
        order.retain(|i| pending.contains_key(i));
        while order.len() >= MAX_PENDING {
            if let Some(old) = order.pop_front() {
                pending.remove(&old);
            }
        }
        // The session is used now (for least-recently-used collection).
        let dir = self.session_dir(&session);
        if dir.is_dir() {
            let _ = fs::File::create(dir.join("used"));
        }
        pending.insert(id.clone(), Pending { session, entries, stats, asked });
        order.push_back(id.clone());
        Ok(Prepared { id, missing, manifest })
    }

    /// Bytes of context files kept for the project (a file linked into a session tree is
    /// counted once).
    pub fn size(&self) -> u64 {
        unique_size(&self.root)
    }

    /// The session directories, those builds are using now marked busy.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        use std::os::unix::fs::MetadataExt;
        let busy: Vec<String> = {
            let locks = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            locks.iter().filter(|(_, l)| l.try_write().is_err()).map(|(k, _)| k.clone()).collect()
        };
        let mut found = Vec::new();
        let Ok(rd) = fs::read_dir(self.root.join("sessions")) else { return Vec::new() };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".build-") {
                continue;
            }
            let in_use = busy.contains(&e.path().display().to_string());
            let used = fs::metadata(e.path().join("used")).or_else(|_| e.metadata()).map(|m| m.mtime().max(0) as u64).unwrap_or(0);
            found.push((name, used, self.references_of(&e.path()), in_use));
        }
        // A blob is freed with the last session that refers to it.
        let mut refs: HashMap<&str, usize> = HashMap::new();
        for (_, _, rec, _) in &found {
            for (digest, _) in rec.iter() {
                *refs.entry(digest.as_str()).or_default() += 1;
            }
        }
        found
            .iter()
            .map(|(name, used, rec, in_use)| {
                let mut seen = std::collections::HashSet::new();
                let bytes =
                    rec.iter().filter(|(d, _)| refs.get(d.as_str()) == Some(&1) && seen.insert(d.as_str())).map(|(_, size)| size).sum();
                SessionInfo { name: name.clone(), last_used: *used, bytes, busy: *in_use }
            })
            .collect()
    }

    /// The set of the store's blob digests ([`ContextStore::listed`]), listed on first use.
    fn listed(&self) -> Result<std::sync::MutexGuard<'_, Option<std::collections::HashSet<Digest>>>, ContextError> {
        let mut guard = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(self.blobs.digests().map_err(|e| ContextError::Io { path: self.root.clone(), message: e.to_string() })?);
        }
        Ok(guard)
    }

    /// The blobs (digest, size) session directory `dir` refers to: its `state.json`, parsed
    /// once per version of that file.
    fn references_of(&self, dir: &Path) -> References {
        use std::os::unix::fs::MetadataExt;
        let state = dir.join("state.json");
        let Ok(m) = fs::symlink_metadata(&state) else { return Arc::default() };
        let stamp = FileStamp { dev: m.dev(), ino: m.ino(), len: m.len(), mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec() };
        let mut cache = self.references.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, refs)) = cache.get(dir) {
            if *s == stamp {
                return refs.clone();
            }
        }
        let refs: References = Arc::new(recorded(dir).into_values().filter(|r| !r.digest.is_empty()).map(|r| (r.digest, r.size)).collect());
        // Directories that are gone (removed sessions, builds' private trees) are forgotten.
        cache.retain(|d, _| d.exists());
        cache.insert(dir.to_path_buf(), (stamp, refs.clone()));
        refs
    }

    /// Remove session directory `name` (unless a build uses it now).
    pub fn remove_session(&self, name: &str) -> Result<(), ContextError> {
        if name.contains('/') || name.starts_with('.') {
            return Err(ContextError::Manifest(format!("invalid session name {name:?}")));
        }
        let dir = self.root.join("sessions").join(name);
        let lock = self.sessions.lock().unwrap_or_else(|e| e.into_inner()).get(&dir.display().to_string()).cloned();
        let _held = match &lock {
            Some(l) => match l.try_write() {
                Ok(g) => Some(g),
                Err(_) => return Ok(()), // in use: kept
            },
            None => None,
        };
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Delete the blobs no session directory and no prepared context refers to; returns
    /// the bytes freed. Call it only when no build of the project is running (a running
    /// build's tree is written from blobs when a step first reads it).
    pub fn sweep_blobs(&self) -> Result<u64, ContextError> {
        let _no_prepare = self.sweep.write().unwrap_or_else(|e| e.into_inner());
        let sessions: Vec<References> = match fs::read_dir(self.root.join("sessions")) {
            Ok(rd) => rd.flatten().map(|e| self.references_of(&e.path())).collect(),
            Err(_) => Vec::new(),
        };
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut keep: std::collections::HashSet<&str> = sessions.iter().flat_map(|s| s.iter().map(|(d, _)| d.as_str())).collect();
        keep.extend(pending.values().flat_map(|p| p.entries.iter().map(|e| e.digest.as_str())).filter(|d| !d.is_empty()));
        let mut listed = self.listed()?;
        let Some(set) = listed.as_mut() else { return Ok(0) };
        let unused: Vec<Digest> = set.iter().filter(|d| !keep.contains(d.as_str())).cloned().collect();
        // Uploads check the prepared contexts: not held while files are deleted.
        drop(keep);
        drop(pending);
        let mut freed = 0;
        for d in unused {
            // A blob's size is read only when it goes.
            let size = self.blobs.size(&d).ok().flatten().unwrap_or(0);
            if self.blobs.remove(&d).is_ok() {
                set.remove(&d);
                freed += size;
            }
        }
        Ok(freed)
    }

    /// Forget every context file and session directory of the project.
    pub fn reset(&self) -> Result<(), ContextError> {
        let sessions = self.root.join("sessions");
        // Session directories in use by a running build are kept (their lock is held).
        let locks: Vec<_> = self.sessions.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let busy = locks.iter().any(|l| l.try_write().is_err());
        if !busy {
            let _ = fs::remove_dir_all(&sessions);
            fs::create_dir_all(&sessions).map_err(io_err(&sessions))?;
        }
        for (d, _) in self.blobs.list().map_err(|e| ContextError::Io { path: self.root.clone(), message: e.to_string() })? {
            let _ = self.blobs.remove(&d);
        }
        // Listed again when next needed.
        *self.listed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// Whether a prepared context asked the client for blob `digest`: an upload of anything
    /// else is refused, so a client cannot fill the disk with content no build of it needs.
    /// (It may have arrived since, from another client asked for it too.)
    pub fn asked_for(&self, digest: &str) -> bool {
        let Ok(d) = digest.parse::<Digest>() else { return false };
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).values().any(|p| p.asked.contains(&d))
    }

    /// Whether the store has blob `digest`.
    pub fn has_blob(&self, digest: &str) -> bool {
        digest.parse::<Digest>().is_ok_and(|d| self.blobs.contains(&d))
    }

    /// Open blob `digest` (a file's content) for reading.
    pub fn open_blob(&self, digest: &Digest) -> Option<std::fs::File> {
        self.blobs.open_blob(digest).ok()
    }

    /// Start receiving one blob.
    pub fn blob_writer(&self) -> Result<BlobWriter, ContextError> {
        self.blobs.writer().map_err(|e| ContextError::Io { path: self.root.clone(), message: e.to_string() })
    }

    /// Finish receiving a blob: verified against `digest`, visible only if it matches.
    pub fn commit_blob(&self, w: BlobWriter, digest: &str) -> Result<(), ContextError> {
        let d: Digest = digest.parse().map_err(|e| ContextError::Manifest(format!("{e}")))?;
        w.commit(Some(&d)).map_err(|e| ContextError::Manifest(format!("uploaded file: {e}")))?;
        if let Some(set) = self.listed.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            set.insert(d);
        }
        Ok(())
    }

    fn session_dir(&self, session: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(session.as_bytes()));
        self.root.join("sessions").join(&h[..32])
    }

    /// The context of `context_id`. Its session directory is written only when a step reads
    /// files from it: a build whose steps are all cached never writes it.
    pub async fn materialize(&self, context_id: &str) -> Result<MaterializedContext, ContextError> {
        let pending = self.take_pending(context_id)?;
        Ok(self.materialize_entries(pending.session, pending.entries, pending.stats))
    }

    /// `base` with the entries of prepared context `extra_id` (the paths a build asked the
    /// client for) added; an entry of both takes `extra_id`'s.
    pub fn extend(&self, base: &MaterializedContext, extra_id: &str) -> Result<MaterializedContext, ContextError> {
        let extra = self.take_pending(extra_id)?;
        let mut merged: BTreeMap<Vec<u8>, v1::ContextEntry> = base.entries.iter().map(|e| (path_bytes(e), e.clone())).collect();
        for e in extra.entries.iter() {
            merged.insert(path_bytes(e), e.clone());
        }
        let stats = SyncStats {
            entries: merged.len() as u64,
            missing: base.stats.missing + extra.stats.missing,
            missing_bytes: base.stats.missing_bytes + extra.stats.missing_bytes,
        };
        // Parents sort before their children by path bytes.
        Ok(self.materialize_entries(base.session.clone(), Arc::new(merged.into_values().collect()), stats))
    }

    /// A prepared context, once: its uploads must all have arrived.
    fn take_pending(&self, context_id: &str) -> Result<Pending, ContextError> {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(context_id)
            .ok_or_else(|| ContextError::UnknownContext(context_id.to_string()))?;
        if let Some(d) = pending.asked.iter().find(|d| !self.blobs.contains(d)) {
            return Err(ContextError::MissingBlob { digest: d.to_string() });
        }
        Ok(pending)
    }

    fn materialize_entries(&self, session: String, entries: Arc<Vec<v1::ContextEntry>>, stats: SyncStats) -> MaterializedContext {
        let pending = Pending { session, entries, stats, asked: Default::default() };
        let dir = self.session_dir(&pending.session);
        let lock = {
            let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            s.entry(dir.display().to_string()).or_insert_with(|| Arc::new(tokio::sync::RwLock::new(()))).clone()
        };
        let held = Arc::new(Mutex::new(None));
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (blobs, entries) = (self.blobs.clone(), pending.entries.clone());
        let (dir2, held2, written2) = (dir.clone(), held.clone(), written.clone());
        let materialize: Materializer = Box::new(move || {
            // On a blocking thread (the engine asks for files there). This never waits for
            // another build's step: a reader waits only while a writer runs update_dir, and
            // when other builds read the session's tree it is not changed under them.
            let read = futures::executor::block_on(lock.clone().read_owned());
            let (root, held) = if is_current(&dir2, &entries) {
                (dir2.join("root"), Held::Shared(read))
            } else {
                drop(read);
                let (dir, held) = match lock.try_write_owned() {
                    Ok(write) => {
                        let n = update_dir(&dir2, &blobs, &entries).map_err(Unavailable::new)?;
                        written2.store(n, std::sync::atomic::Ordering::Relaxed);
                        (dir2.clone(), Held::Shared(write.downgrade()))
                    }
                    Err(_) => {
                        let private = dir2.with_extension(format!("build-{}", hoist_oci::random::hex(8)));
                        let held = Held::Private(private.clone());
                        let n = update_dir(&private, &blobs, &entries).map_err(Unavailable::new)?;
                        written2.store(n, std::sync::atomic::Ordering::Relaxed);
                        (private, held)
                    }
                };
                (dir.join("root"), held)
            };
            *held2.lock().unwrap_or_else(|e| e.into_inner()) = Some(held);
            Ok(root)
        });
        let context = Context::lazy(
            pending.entries.iter().map(|e| ContextEntry {
                path: e.path.clone(),
                kind: match v1::EntryKind::try_from(e.kind).unwrap_or(v1::EntryKind::File) {
                    v1::EntryKind::File => EntryKind::File,
                    v1::EntryKind::Dir => EntryKind::Dir,
                    v1::EntryKind::Symlink => EntryKind::Symlink,
                },
                mode: e.mode & 0o7777,
                size: e.size,
                digest: e.digest.parse().ok(),
                link_target: (!e.link_target.is_empty()).then(|| e.link_target.clone()),
                hardlink: (!e.hardlink.is_empty()).then(|| e.hardlink.clone()),
            }),
            materialize,
        );
        MaterializedContext {
            context: Arc::new(context),
            stats: pending.stats,
            written,
            _held: held,
            session: pending.session,
            entries: pending.entries,
        }
    }
}

/// Bytes under `dir`, each inode counted once (session files are often links to blobs).
fn unique_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            // Relative to the open directory (no walk of the whole path per file).
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.nlink() == 1 || seen.insert((m.dev(), m.ino())) {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// What `<dir>/state.json` records the directory holds (empty when unknown).
fn recorded(dir: &Path) -> BTreeMap<String, Recorded> {
    match fs::read(dir.join("state.json")) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    }
}

/// What a directory holding `entries` records.
fn wanted(entries: &[v1::ContextEntry]) -> BTreeMap<String, Recorded> {
    entries.iter().map(|e| (key(&path_bytes(e)), Recorded::of(e))).collect()
}

/// Whether `<dir>/root` holds exactly `entries` already.
fn is_current(dir: &Path, entries: &[v1::ContextEntry]) -> bool {
    let old = recorded(dir);
    !old.is_empty() && dir.join("root").is_dir() && old == wanted(entries)
}

/// Apply the manifest to `<dir>/root`, using `<dir>/state.json` as the record of what the
/// directory holds. Returns how many entries were (re)written.
fn update_dir(dir: &Path, blobs: &ContentStore, entries: &[v1::ContextEntry]) -> Result<u64, ContextError> {
    let root = dir.join("root");
    let state_path = dir.join("state.json");
    let old = recorded(dir);
    let trusted = !old.is_empty() && root.is_dir();
    let new = wanted(entries);
    if trusted && old == new {
        return Ok(0);
    }
    if !trusted {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).map_err(io_err(&root))?;
    }
    // Invalidate the record first: a crash in the middle leaves no trusted state.
    let _ = fs::remove_file(&state_path);

    // Remove what is gone or changed kind, deepest first.
    // Parents before children (deletion: children first), by path bytes: keys of names that
    // are not UTF-8 do not sort like their paths.
    let by_path = |m: &BTreeMap<String, Recorded>| {
        let mut v: Vec<(String, Recorded)> = m.iter().map(|(k, r)| (k.clone(), r.clone())).collect();
        v.sort_by_cached_key(|(k, _)| unkey(k));
        v
    };
    if trusted {
        for (path, rec) in by_path(&old).iter().rev() {
            let gone = match new.get(path.as_str()) {
                None => true,
                Some(n) => n.kind != rec.kind || (rec.kind == v1::EntryKind::Symlink as u8 && n.link != rec.link),
            };
            if gone {
                let p = root.join(os(&unkey(path)));
                let r = if rec.kind == v1::EntryKind::Dir as u8 { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
                if let Err(e) = r {
                    if e.kind() != io::ErrorKind::NotFound {
                        return Err(io_err(&p)(e));
                    }
                }
            }
        }
    }
    let mut written = 0;
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    // Hard links to another file of the context, made once every file is written.
    let mut links = Vec::new();
    for (path, rec) in &by_path(&new) {
        let p = root.join(os(&unkey(path)));
        let same = trusted && old.get(path.as_str()) == Some(rec);
        if same {
            continue;
        }
        let unchanged_content = trusted
            && old
                .get(path.as_str())
                .is_some_and(|o| o.kind == rec.kind && o.digest == rec.digest && o.link == rec.link && o.hardlink == rec.hardlink);
        match rec.kind {
            k if k == v1::EntryKind::File as u8 && !rec.hardlink.is_empty() => {
                // Shares the inode (and so mode and times) of the file it names.
                if !unchanged_content {
                    links.push((p, root.join(os(&unkey(&rec.hardlink)))));
                    written += 1;
                }
            }
            k if k == v1::EntryKind::Dir as u8 => {
                match fs::create_dir(&p) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_err(&p)(e)),
                    _ => {}
                }
                dirs.push((p, rec.clone()));
            }
            k if k == v1::EntryKind::Symlink as u8 => {
                if !unchanged_content {
                    let _ = fs::remove_file(&p);
                    std::os::unix::fs::symlink(os(&unkey(&rec.link)), &p).map_err(io_err(&p))?;
                    written += 1;
                }
                set_mtime(&p, rec, false)?;
            }
            _ => {
                let src = if unchanged_content {
                    None
                } else {
                    let d: Digest = rec.digest.parse().map_err(|e| ContextError::Manifest(format!("{path}: {e}")))?;
                    let src = blobs.blob_path(&d);
                    if !src.is_file() {
                        return Err(ContextError::MissingBlob { digest: rec.digest.clone() });
                    }
                    written += 1;
                    Some(src)
                };
                files.push((p, src, rec.clone()));
            }
        }
    }
    // Files on every core (creating many small files is syscall-bound). A crash in the middle
    // leaves no state.json, so the next build rebuilds the tree: no half file is ever trusted.
    let write_file = |(p, src, rec): &(PathBuf, Option<PathBuf>, Recorded)| -> Result<(), ContextError> {
        if let Some(src) = src {
            if trusted {
                let _ = fs::remove_file(p);
            }
            // A setuid or setgid file is always a copy: a blob's inode never carries those
            // bits (linked, it would take this entry's mode).
            place_file(src, p, dir, rec.mode & 0o6000 == 0)?;
        }
        fs::set_permissions(p, fs::Permissions::from_mode(rec.mode)).map_err(io_err(p))?;
        set_mtime(p, rec, true)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let chunk = files.len().div_ceil(threads).max(256);
    std::thread::scope(|scope| {
        let workers: Vec<_> = files.chunks(chunk).map(|part| scope.spawn(move || part.iter().try_for_each(write_file))).collect();
        workers.into_iter().try_for_each(|w| {
            w.join().unwrap_or_else(|_| Err(ContextError::Io { path: root.clone(), message: "a context writer panicked".into() }))
        })
    })?;
    for (p, target) in &links {
        if trusted {
            let _ = fs::remove_file(p);
        }
        fs::hard_link(target, p).map_err(io_err(p))?;
    }
    // Directories last (deepest first), so that writing their children did not change them.
    for (p, rec) in dirs.iter().rev() {
        fs::set_permissions(p, fs::Permissions::from_mode(rec.mode)).map_err(io_err(p))?;
        set_mtime(p, rec, true)?;
    }
    let bytes = serde_json::to_vec(&new).map_err(|e| ContextError::Io { path: state_path.clone(), message: e.to_string() })?;
    let tmp = dir.join("state.json.tmp");
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&bytes).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &state_path).map_err(io_err(&state_path))?;
    Ok(written)
}

/// Put a context file at `p`: a hard link to its blob `src` when no session tree uses that
/// blob yet (one inode, so the link's mode and times become this entry's: the store never
/// reads them), else a copy. Nothing writes to a session file in place — a change replaces
/// it, bind mounts are read-only or copy-on-write — so the blob's bytes stay intact.
///
/// Link first, then look at the link count (the store's own name is one): a tree that sees
/// 2 was alone and keeps its link, and any tree linking later sees at least 3 for as long
/// as that link exists, so it copies. Two trees linking at once may both see 3 and both
/// copy. No lock, so trees are written on every core. A copy is made in `scratch` (outside
/// the tree, where no context name can collide with it) and renamed over `p`.
fn place_file(src: &Path, p: &Path, scratch: &Path, may_link: bool) -> Result<(), ContextError> {
    use std::os::unix::fs::MetadataExt;
    if may_link && fs::hard_link(src, p).is_ok() {
        if fs::symlink_metadata(p).is_ok_and(|m| m.nlink() == 2) {
            return Ok(());
        }
        fs::remove_file(p).map_err(io_err(p))?;
    }
    // Never written into an existing inode, which may be a blob's.
    let tmp = scratch.join(format!("copy-{}", hoist_oci::random::hex(8)));
    let copied = fs::copy(src, &tmp).and_then(|_| fs::rename(&tmp, p));
    if copied.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    copied.map_err(io_err(p))
}

fn set_mtime(p: &Path, rec: &Recorded, follow: bool) -> Result<(), ContextError> {
    use rustix::fs::{utimensat, AtFlags, Timespec, Timestamps, CWD};
    let ts = Timespec { tv_sec: rec.mtime, tv_nsec: rec.mtime_nsec as _ };
    let times = Timestamps { last_access: ts, last_modification: ts };
    let flags = if follow { AtFlags::empty() } else { AtFlags::SYMLINK_NOFOLLOW };
    utimensat(CWD, p, &times, flags).map_err(|e| io_err(p)(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &[u8], mode: u32) -> v1::ContextEntry {
        v1::ContextEntry {
            path: path.into(),
            kind: v1::EntryKind::File as i32,
            mode,
            size: content.len() as u64,
            digest: Digest::of(content).to_string(),
            link_target: String::new(),
            mtime: 1_700_000_000,
            mtime_nsec: 0,
            ..Default::default()
        }
    }

    fn dir(path: &str) -> v1::ContextEntry {
        v1::ContextEntry { path: path.into(), kind: v1::EntryKind::Dir as i32, mode: 0o755, mtime: 1_700_000_000, ..Default::default() }
    }

    /// Write the context's tree now, as a step asking for its files would.
    async fn written_now(m: MaterializedContext) -> MaterializedContext {
        let c = m.context.clone();
        tokio::task::spawn_blocking(move || c.files().map(Path::to_path_buf)).await.unwrap().unwrap();
        m
    }

    fn upload(store: &ContextStore, content: &[u8]) {
        let mut w = store.blob_writer().unwrap();
        w.write_all(content).unwrap();
        store.commit_blob(w, Digest::of(content).as_str()).unwrap();
    }

    #[tokio::test]
    async fn only_unknown_content_is_requested_and_renames_cost_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let m1 = v1::ContextManifest { session: "s".into(), entries: vec![dir("src"), file("src/a", b"A", 0o644), file("b", b"B", 0o755)] };
        let Prepared { id, missing, .. } = store.prepare(m1).unwrap();
        assert_eq!(missing.len(), 2);
        upload(&store, b"A");
        upload(&store, b"B");
        let ctx = written_now(store.materialize(&id).await.unwrap()).await;
        assert_eq!(ctx.written(), 2);
        let root = ctx.context.files().unwrap().to_path_buf();
        assert_eq!(fs::read(root.join("src/a")).unwrap(), b"A");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(root.join("b")).unwrap().mode() & 0o777, 0o755);
        drop(ctx);

        // Rename src/a → src/c, delete b: nothing to upload, the directory follows.
        let m2 = v1::ContextManifest { session: "s".into(), entries: vec![dir("src"), file("src/c", b"A", 0o644)] };
        let Prepared { id, missing, .. } = store.prepare(m2).unwrap();
        assert!(missing.is_empty());
        let ctx = written_now(store.materialize(&id).await.unwrap()).await;
        assert!(root.join("src/c").exists());
        assert!(!root.join("src/a").exists());
        assert!(!root.join("b").exists());
        assert_eq!(ctx.written(), 1);
    }

    /// The collection reads each session's references once per version of its record: a
    /// tree rewritten with other files frees the blobs only the old version used and keeps
    /// the new ones (a stale reading would delete a blob the tree links).
    #[tokio::test]
    async fn the_sweep_follows_a_rewritten_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let m = |b: &[u8]| v1::ContextManifest { session: "s".into(), entries: vec![file("a", b"A", 0o644), file("b", b, 0o644)] };
        let Prepared { id, .. } = store.prepare(m(b"B1")).unwrap();
        upload(&store, b"A");
        upload(&store, b"B1");
        drop(written_now(store.materialize(&id).await.unwrap()).await);
        assert_eq!(store.sweep_blobs().unwrap(), 0, "both blobs are in the tree");
        assert_eq!(store.sessions()[0].bytes, 3);

        let Prepared { id, missing, .. } = store.prepare(m(b"B2-longer")).unwrap();
        assert_eq!(missing, vec![Digest::of(b"B2-longer").to_string()]);
        upload(&store, b"B2-longer");
        let Prepared { id: again, missing, .. } = store.prepare(m(b"B2-longer")).unwrap();
        assert!(missing.is_empty(), "the store's listing knows the blob just uploaded");
        drop(store.materialize(&again).await.unwrap());
        let ctx = written_now(store.materialize(&id).await.unwrap()).await;
        drop(ctx);
        assert_eq!(store.sweep_blobs().unwrap(), 2, "B1 went with the old tree");
        assert!(store.has_blob(Digest::of(b"A").as_str()) && store.has_blob(Digest::of(b"B2-longer").as_str()));
        assert!(!store.has_blob(Digest::of(b"B1").as_str()));
        assert_eq!(store.sessions()[0].bytes, 10, "the new tree's blobs");
        assert_eq!(store.sweep_blobs().unwrap(), 0, "nothing more to free");
    }

    #[tokio::test]
    async fn unchanged_files_are_not_rewritten() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let m = || v1::ContextManifest { session: "s".into(), entries: vec![file("a", b"A", 0o644), file("b", b"B", 0o644)] };
        let Prepared { id, .. } = store.prepare(m()).unwrap();
        upload(&store, b"A");
        upload(&store, b"B");
        drop(written_now(store.materialize(&id).await.unwrap()).await);
        let mut changed = m();
        changed.entries[1] = file("b", b"B2", 0o644);
        let Prepared { id, missing, .. } = store.prepare(changed).unwrap();
        assert_eq!(missing, vec![Digest::of(b"B2").to_string()]);
        upload(&store, b"B2");
        let ctx = written_now(store.materialize(&id).await.unwrap()).await;
        assert_eq!(ctx.written(), 1);
        assert_eq!(fs::read(ctx.context.files().unwrap().join("b")).unwrap(), b"B2");
    }

    #[tokio::test]
    async fn a_blob_is_linked_into_one_tree_only_and_every_file_keeps_its_own_metadata() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let mut x = file("x", b"same", 0o600);
        x.mtime = 1_000;
        let mut y = file("y", b"same", 0o755);
        y.mtime = 2_000;
        // More files than `prepare` stats one by one: the store is listed instead.
        let mut entries: Vec<_> = (0..300).map(|i| file(&format!("f{i:03}"), format!("f{i}").as_bytes(), 0o644)).collect();
        entries.extend([x.clone(), y]);
        let Prepared { id, missing, .. } = store.prepare(v1::ContextManifest { session: "s1".into(), entries: entries.clone() }).unwrap();
        assert_eq!(missing.len(), 301, "300 distinct files and one shared content");
        for i in 0..300 {
            upload(&store, format!("f{i}").as_bytes());
        }
        upload(&store, b"same");
        let Prepared { id: _, missing, .. } = store.prepare(v1::ContextManifest { session: "probe".into(), entries }).unwrap();
        assert!(missing.is_empty(), "the listing sees every uploaded blob");
        let one = written_now(store.materialize(&id).await.unwrap()).await;
        let (mx, my) =
            (fs::metadata(one.context.files().unwrap().join("x")).unwrap(), fs::metadata(one.context.files().unwrap().join("y")).unwrap());
        assert_eq!((mx.mode() & 0o7777, mx.mtime()), (0o600, 1_000));
        assert_eq!((my.mode() & 0o7777, my.mtime()), (0o755, 2_000));
        assert_ne!(mx.ino(), my.ino(), "equal contents with different metadata are different files");
        drop(one);
        // Another session with the same content and other metadata gets its own file.
        let mut z = x.clone();
        z.path = "z".into();
        z.mode = 0o644;
        z.mtime = 3_000;
        let Prepared { id: id2, missing, .. } = store.prepare(v1::ContextManifest { session: "s2".into(), entries: vec![z] }).unwrap();
        assert!(missing.is_empty());
        let two = written_now(store.materialize(&id2).await.unwrap()).await;
        let mz = fs::metadata(two.context.files().unwrap().join("z")).unwrap();
        assert_eq!((mz.mode() & 0o7777, mz.mtime()), (0o644, 3_000));
        let mx = fs::metadata(store.session_dir("s1").join("root/x")).unwrap();
        assert_eq!((mx.mode() & 0o7777, mx.mtime()), (0o600, 1_000), "the first session's file is untouched");
        // The store's blob still holds its bytes.
        assert_eq!(fs::read(store.blobs.blob_path(&Digest::of(b"same"))).unwrap(), b"same");

        // Many files of one content, written by several threads at once in a fresh tree:
        // each keeps its own metadata, and at most one of them is the blob's inode.
        drop(two);
        upload(&store, b"many");
        let many: Vec<_> = (0..1200u32)
            .map(|i| {
                let mut e = file(&format!("m{i:04}"), b"many", 0o600 | ((i % 2) * 0o044));
                e.mtime = 10_000 + i as i64;
                e
            })
            .collect();
        let Prepared { id: id3, .. } = store.prepare(v1::ContextManifest { session: "s3".into(), entries: many.clone() }).unwrap();
        let three = written_now(store.materialize(&id3).await.unwrap()).await;
        let blob_ino = fs::metadata(store.blobs.blob_path(&Digest::of(b"many"))).unwrap().ino();
        let mut linked = 0;
        for e in &many {
            let m = fs::metadata(three.context.files().unwrap().join(&e.path)).unwrap();
            assert_eq!((m.mode() & 0o7777, m.mtime()), (e.mode, e.mtime), "{}", e.path);
            linked += usize::from(m.ino() == blob_ino);
        }
        assert!(linked <= 1, "{linked} files share the blob's inode");
        assert_eq!(fs::read(store.blobs.blob_path(&Digest::of(b"many"))).unwrap(), b"many");

        // A copy never lands on another entry's name: "x" becomes a copy (its new content is
        // linked by s1) next to an entry whose name a temporary copy could take.
        drop(three);
        upload(&store, b"b1");
        upload(&store, b"b2");
        let m4 =
            |x: &[u8]| v1::ContextManifest { session: "s4".into(), entries: vec![file("x", x, 0o644), file("x.hoist-copy", b"b2", 0o644)] };
        let Prepared { id: id4, .. } = store.prepare(m4(b"b1")).unwrap();
        drop(written_now(store.materialize(&id4).await.unwrap()).await);
        let Prepared { id: id4, .. } = store.prepare(m4(b"same")).unwrap();
        let four = written_now(store.materialize(&id4).await.unwrap()).await;
        let root4 = four.context.files().unwrap();
        assert_eq!(fs::read(root4.join("x")).unwrap(), b"same");
        assert_eq!(fs::read(root4.join("x.hoist-copy")).unwrap(), b"b2");
        assert_eq!(fs::read(store.blobs.blob_path(&Digest::of(b"b2"))).unwrap(), b"b2", "the blob is intact");
    }

    #[tokio::test]
    async fn the_tree_is_written_when_first_read_and_never_changed_under_another_build() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let m = |content: &[u8]| v1::ContextManifest { session: "s".into(), entries: vec![file("a", content, 0o644)] };
        upload(&store, b"1");
        upload(&store, b"2");
        // A build that never reads its files writes nothing.
        let Prepared { id, .. } = store.prepare(m(b"1")).unwrap();
        drop(store.materialize(&id).await.unwrap());
        assert!(!store.session_dir("s").exists(), "nothing was written");
        // The first reader writes the session's tree and holds it.
        let Prepared { id, .. } = store.prepare(m(b"1")).unwrap();
        let one = written_now(store.materialize(&id).await.unwrap()).await;
        let shared = one.context.files().unwrap().to_path_buf();
        assert_eq!(shared, store.session_dir("s").join("root"));
        // Another build of the session with the same manifest reads the same tree.
        let Prepared { id, .. } = store.prepare(m(b"1")).unwrap();
        let same = written_now(store.materialize(&id).await.unwrap()).await;
        assert_eq!(same.context.files().unwrap(), shared);
        assert_eq!(same.written(), 0);
        // One with another manifest gets a tree of its own while the others read theirs...
        let Prepared { id, .. } = store.prepare(m(b"2")).unwrap();
        let other = written_now(store.materialize(&id).await.unwrap()).await;
        let private = other.context.files().unwrap().to_path_buf();
        assert_ne!(private, shared);
        assert_eq!(fs::read(private.join("a")).unwrap(), b"2");
        assert_eq!(fs::read(shared.join("a")).unwrap(), b"1", "the shared tree is untouched");
        // ...removed when that build ends.
        drop(other);
        assert!(!private.exists());
        // Once nobody reads it, the session's tree follows the next manifest.
        drop((one, same));
        let Prepared { id, .. } = store.prepare(m(b"2")).unwrap();
        let next = written_now(store.materialize(&id).await.unwrap()).await;
        assert_eq!(next.context.files().unwrap(), shared);
        assert_eq!(fs::read(shared.join("a")).unwrap(), b"2");
    }

    #[tokio::test]
    async fn names_that_are_not_utf8_are_materialized_exactly() {
        use std::os::unix::ffi::OsStrExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let raw = b"caf\xe9.txt".to_vec();
        let mut f = file("x", b"latin1", 0o644);
        f.path = String::from_utf8_lossy(&raw).into_owned();
        f.raw_path = raw.clone();
        let mut l = v1::ContextEntry { path: "link".into(), kind: v1::EntryKind::Symlink as i32, ..Default::default() };
        l.raw_link_target = raw.clone();
        let Prepared { id, .. } = store.prepare(v1::ContextManifest { session: "s".into(), entries: vec![f, l] }).unwrap();
        upload(&store, b"latin1");
        let ctx = written_now(store.materialize(&id).await.unwrap()).await;
        let p = ctx.context.files().unwrap().join(std::ffi::OsStr::from_bytes(&raw));
        assert_eq!(fs::read(&p).unwrap(), b"latin1");
        assert_eq!(fs::read_link(ctx.context.files().unwrap().join("link")).unwrap().as_os_str().as_bytes(), raw.as_slice());
    }

    #[test]
    fn hostile_paths_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        // A file "through" a symlink entry would be written outside the context directory.
        let link =
            v1::ContextEntry { path: "a".into(), kind: v1::EntryKind::Symlink as i32, link_target: "/etc".into(), ..Default::default() };
        let m = v1::ContextManifest { session: "s".into(), entries: vec![link, file("a/passwd", b"x", 0o644)] };
        assert!(store.prepare(m).is_err(), "a path below a symlink must be rejected");
        let m = v1::ContextManifest { session: "s".into(), entries: vec![file("nodir/x", b"x", 0o644)] };
        assert!(store.prepare(m).is_err(), "a path without its parent directory must be rejected");
        for bad in ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", ""] {
            let m = v1::ContextManifest { session: "s".into(), entries: vec![file(bad, b"x", 0o644)] };
            assert!(store.prepare(m).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn contexts_over_the_limits_are_refused_before_anything_is_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap().with_limits(ContextLimits { max_entries: 3, max_bytes: 10 });
        let many = v1::ContextManifest { session: "s".into(), entries: (0..4).map(|i| file(&format!("f{i}"), b"x", 0o644)).collect() };
        let e = store.prepare(many).unwrap_err().to_string();
        assert!(e.contains("entries: 4") && e.contains("(3;") && e.contains("--max-context-entries"), "{e}");
        let big = v1::ContextManifest { session: "s".into(), entries: vec![file("a", b"123456", 0o644), file("b", b"123456", 0o644)] };
        let e = store.prepare(big).unwrap_err().to_string();
        assert!(e.contains("bytes of files: 12") && e.contains("--max-context-bytes"), "{e}");
        let ok = v1::ContextManifest { session: "s".into(), entries: vec![file("a", b"123456", 0o644)] };
        store.prepare(ok).unwrap();
    }

    #[test]
    fn prepared_contexts_that_are_never_built_are_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let m = || v1::ContextManifest { session: "s".into(), entries: vec![file("a", b"A", 0o644)] };
        let first = store.prepare(m()).unwrap().id;
        for _ in 0..MAX_PENDING + 10 {
            store.prepare(m()).unwrap();
        }
        assert!(store.pending.lock().unwrap().len() <= MAX_PENDING);
        assert!(!store.pending.lock().unwrap().contains_key(&first), "the oldest was forgotten");
    }

    /// A client whose context has not changed names its manifest by the digest the builder
    /// answered: only within the session that sent it, only while kept, and the blobs are
    /// checked again each time.
    #[tokio::test]
    async fn a_known_manifest_is_named_not_sent_again() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let m = |body: &[u8]| v1::ContextManifest { session: "s".into(), entries: vec![dir("src"), file("src/a", body, 0o644)] };
        let first = store.prepare(m(b"A")).unwrap();
        assert_eq!(
            first.manifest,
            Digest::of(&hoist_proto::Message::encode_to_vec(&m(b"A"))).to_string(),
            "the client digests the same way"
        );
        let again = store.prepare_known("s", &first.manifest).unwrap().expect("kept");
        assert_ne!(again.id, first.id);
        assert_eq!((again.manifest.as_str(), again.missing.as_slice()), (first.manifest.as_str(), first.missing.as_slice()));
        upload(&store, b"A");
        let again = store.prepare_known("s", &first.manifest).unwrap().expect("kept");
        assert!(again.missing.is_empty(), "the uploaded blob is not asked for again");
        let ctx = store.materialize(&again.id).await.unwrap();
        assert_eq!(fs::read(ctx.context.files().unwrap().join("src/a")).unwrap(), b"A");
        drop(ctx);
        // A manifest with a file digest that is none is refused, and not kept.
        let mut bad = m(b"A");
        bad.entries[1].digest = "sha256:nonsense".into();
        let digest = Digest::of(&hoist_proto::Message::encode_to_vec(&bad)).to_string();
        let e = store.prepare(bad).unwrap_err().to_string();
        assert!(e.contains("src/a") && e.contains("sha256:nonsense"), "{e}");
        assert!(store.prepare_known("s", &digest).unwrap().is_none());
        assert!(store.prepare_known("s", &first.manifest).unwrap().is_some(), "the good one is still kept");
        // Another session, or a digest the builder never answered, names nothing.
        assert!(store.prepare_known("t", &first.manifest).unwrap().is_none());
        assert!(store.prepare_known("s", Digest::of(b"forged").as_str()).unwrap().is_none());
        // A new manifest of the session replaces the old one.
        let second = store.prepare(m(b"B")).unwrap();
        assert_ne!(second.manifest, first.manifest);
        assert!(store.prepare_known("s", &first.manifest).unwrap().is_none());
        assert!(store.prepare_known("s", &second.manifest).unwrap().is_some());
        // At most MAX_KNOWN sessions' manifests are kept, the least recently used forgotten.
        for i in 0..MAX_KNOWN {
            store.prepare(v1::ContextManifest { session: format!("other-{i}"), entries: vec![dir("d")] }).unwrap();
        }
        assert!(store.prepare_known("s", &second.manifest).unwrap().is_none());
        // And at most MAX_KNOWN_ENTRIES entries: a manifest past that is not kept at all.
        let kept = store.prepare(v1::ContextManifest { session: "small".into(), entries: vec![dir("d")] }).unwrap();
        let entries = (0..=MAX_KNOWN_ENTRIES).map(|i| dir(&format!("d{i}"))).collect();
        let huge = store.prepare(v1::ContextManifest { session: "huge".into(), entries }).unwrap();
        assert!(store.prepare_known("huge", &huge.manifest).unwrap().is_none());
        assert!(store.prepare_known("small", &kept.manifest).unwrap().is_none(), "older manifests went first");
    }

    #[tokio::test]
    async fn a_missing_upload_is_an_error_not_an_empty_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let Prepared { id, .. } =
            store.prepare(v1::ContextManifest { session: "s".into(), entries: vec![file("a", b"never sent", 0o644)] }).unwrap();
        let err = store.materialize(&id).await.err().unwrap();
        assert!(matches!(err, ContextError::MissingBlob { .. }), "{err}");
    }

    /// Regression (issue 12): uploads of blobs the builder never asked for were stored, so a
    /// token holder could fill the builder's disk.
    #[test]
    fn only_blobs_a_prepared_context_asked_for_are_expected() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let wanted = Digest::of(b"wanted").to_string();
        assert!(!store.asked_for(&wanted), "nothing prepared yet");
        store.prepare(v1::ContextManifest { session: "s".into(), entries: vec![file("a", b"wanted", 0o644)] }).unwrap();
        assert!(store.asked_for(&wanted) && !store.has_blob(&wanted));
        assert!(!store.asked_for(Digest::of(b"never asked").as_str()));
        assert!(!store.asked_for("sha256:nonsense"));
        upload(&store, b"wanted");
        assert!(store.has_blob(&wanted), "a second upload (a client asked at the same time) is read and dropped");
    }

    /// Regression (issue 12): a setuid context file was hard-linked to its blob, so the
    /// store kept a setuid inode (a tree copy carries the mode instead).
    #[tokio::test]
    async fn setuid_and_setgid_files_never_make_a_blob_inode_setuid() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let m = v1::ContextManifest {
            session: "s".into(),
            entries: vec![file("su", b"SU", 0o4755), file("sg", b"SG", 0o2755), file("plain", b"P", 0o755)],
        };
        let Prepared { id, .. } = store.prepare(m).unwrap();
        for c in [&b"SU"[..], b"SG", b"P"] {
            upload(&store, c);
        }
        let ctx = written_now(store.materialize(&id).await.unwrap()).await;
        let root = ctx.context.files().unwrap().to_path_buf();
        assert_eq!(fs::metadata(root.join("su")).unwrap().mode() & 0o7777, 0o4755, "the tree keeps the mode");
        assert_eq!(fs::metadata(root.join("sg")).unwrap().mode() & 0o7777, 0o2755);
        for c in [&b"SU"[..], b"SG", b"P"] {
            let blob = store.blobs.blob_path(&Digest::of(c));
            assert_eq!(fs::metadata(&blob).unwrap().mode() & 0o6000, 0, "blob of {:?}", String::from_utf8_lossy(c));
        }
        assert_eq!(fs::metadata(root.join("su")).unwrap().nlink(), 1, "a copy");
        assert_eq!(fs::metadata(root.join("plain")).unwrap().nlink(), 2, "others are still linked");
    }

    /// Issue 15: a build that reads paths the client did not send gets them added to its
    /// context (the client's later manifest wins where both have an entry).
    #[tokio::test]
    async fn a_context_is_extended_with_the_paths_asked_for_later() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let Prepared { id, .. } =
            store.prepare(v1::ContextManifest { session: "s".into(), entries: vec![dir("src"), file("src/a", b"A", 0o644)] }).unwrap();
        upload(&store, b"A");
        let base = store.materialize(&id).await.unwrap();
        let Prepared { id: more, missing, .. } =
            store.prepare(v1::ContextManifest { session: "s".into(), entries: vec![dir("src"), file("app.txt", b"APP", 0o600)] }).unwrap();
        assert_eq!(missing, vec![Digest::of(b"APP").to_string()]);
        assert!(store.extend(&base, &more).is_err(), "not before its upload arrived");
        let Prepared { id: more, .. } =
            store.prepare(v1::ContextManifest { session: "s".into(), entries: vec![dir("src"), file("app.txt", b"APP", 0o600)] }).unwrap();
        upload(&store, b"APP");
        let extended = written_now(store.extend(&base, &more).unwrap()).await;
        assert_eq!(extended.context.file_digest("app.txt"), Some(Digest::of(b"APP")));
        assert_eq!(extended.context.file_digest("src/a"), Some(Digest::of(b"A")), "what was sent first stays");
        let root = extended.context.files().unwrap().to_path_buf();
        assert_eq!(fs::read(root.join("app.txt")).unwrap(), b"APP");
        assert_eq!(fs::read(root.join("src/a")).unwrap(), b"A");
        assert!(store.extend(&base, &more).is_err(), "a prepared context is used once");
    }

    /// Issue 15: files hard-linked in the client's context are one inode in the tree (so COPY
    /// keeps the link, as docker build does), and a change of the links is followed.
    #[tokio::test]
    async fn hard_links_of_the_context_are_kept_in_the_tree_and_follow_changes() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = ContextStore::open(tmp.path().to_path_buf()).unwrap();
        let linked = |p: &str, to: &str| v1::ContextEntry { hardlink: to.into(), ..file(p, b"S", 0o640) };
        let m = |entries| v1::ContextManifest { session: "s".into(), entries };
        let Prepared { id, .. } = store.prepare(m(vec![file("a", b"S", 0o640), linked("b", "a"), file("c", b"S", 0o640)])).unwrap();
        upload(&store, b"S");
        let ctx = written_now(store.materialize(&id).await.unwrap()).await;
        let root = ctx.context.files().unwrap().to_path_buf();
        let ino = |p: &str| fs::metadata(root.join(p)).unwrap().ino();
        assert_eq!(ino("a"), ino("b"), "the link is kept");
        assert_ne!(ino("a"), ino("c"), "equal content is not a link");
        assert_eq!(fs::metadata(root.join("b")).unwrap().mode() & 0o777, 0o640);
        drop(ctx);
        // b becomes a file of its own, c a link: the tree follows.
        let Prepared { id, missing, .. } =
            store.prepare(m(vec![file("a", b"S", 0o640), file("b", b"S", 0o640), linked("c", "a")])).unwrap();
        assert!(missing.is_empty());
        let ctx = written_now(store.materialize(&id).await.unwrap()).await;
        assert_ne!(ino("a"), ino("b"));
        assert_eq!(ino("a"), ino("c"));
        assert_eq!(fs::read(root.join("b")).unwrap(), b"S");
        drop(ctx);
        // A link to a file that is not there, or of other content, is refused.
        for bad in
            [vec![linked("b", "nope")], vec![file("a", b"T", 0o640), linked("b", "a")], vec![file("a", b"S", 0o600), linked("b", "a")]]
        {
            assert!(matches!(store.prepare(m(bad)), Err(ContextError::Manifest(_))));
        }
    }
}
