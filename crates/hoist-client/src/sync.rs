//! The client side of context sync: walk the context (.dockerignore applied here, so ignored
//! files never leave the machine), digest files through a stat cache (an unchanged file —
//! same size, mtime, inode and mode — is never read again), send the manifest, and upload
//! only the files whose content the builder lacks.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use hoist_dockerfile::IgnoreMatcher;
use hoist_oci::digest::Digest;
use hoist_proto::v1;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::reach::Reach;
use crate::{Client, ClientError};

/// Counters of one sync (shown in the summary and used by tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SyncStats {
    /// Entries in the manifest (files, directories, symlinks).
    pub entries: u64,
    /// Files whose content was read and hashed (not answered by the stat cache).
    pub hashed_files: u64,
    /// The bytes of those files.
    pub hashed_bytes: u64,
    /// Files the builder asked for and that were uploaded.
    pub uploaded_files: u64,
    /// The bytes of those files.
    pub uploaded_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StatEntry {
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ino: u64,
    mode: u32,
    digest: String,
}

impl StatEntry {
    fn new(m: &fs::Metadata, digest: String) -> StatEntry {
        StatEntry { size: m.size(), mtime: m.mtime(), mtime_nsec: m.mtime_nsec(), ino: m.ino(), mode: m.mode(), digest }
    }
}

/// A persistent map from path to (stat → digest) for one context directory.
#[derive(Debug, Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    entries: HashMap<String, StatEntry>,
}

impl StatCache {
    /// The cache of `context_dir` under `cache_root` (missing or unreadable = empty).
    pub fn load(cache_root: &Path, context_dir: &Path) -> StatCache {
        let key = hex::encode(Sha256::digest(context_dir.as_os_str().as_encoded_bytes()));
        let path = cache_root.join("statcache").join(format!("{}.json", &key[..32]));
        let entries = fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        StatCache { path: Some(path), entries }
    }

    /// A cache that remembers nothing (for `-` contexts).
    pub fn none() -> StatCache {
        StatCache::default()
    }

    fn save(&self, seen: &HashMap<String, StatEntry>) {
        let Some(path) = &self.path else { return };
        if let Some(parent) = path.parent() {
            let _ = fs::create_dir_all(parent);
        }
        if let Ok(bytes) = serde_json::to_vec(seen) {
            let tmp = path.with_extension("tmp");
            if fs::write(&tmp, bytes).is_ok() {
                let _ = fs::rename(&tmp, path);
            }
        }
    }
}

/// The walked context: the manifest, and where each digest's bytes are.
pub struct WalkedContext {
    /// The manifest: every entry walked, in order.
    pub entries: Vec<v1::ContextEntry>,
    /// File digest → a path with those bytes.
    pub files: HashMap<String, PathBuf>,
    /// What the walk did.
    pub stats: SyncStats,
}

/// Walk `dir`: every entry the Dockerfile can reach (`reach`) and not ignored, with its
/// parents; files digested (via the cache). Symlinks among the reached entries extend the
/// reach to their (in-context) targets.
pub fn walk(dir: &Path, ignore: Option<&IgnoreMatcher>, reach: &mut Reach, cache: &mut StatCache) -> Result<WalkedContext, ClientError> {
    let (mut hashed_files, mut hashed_bytes) = (0, 0);
    for _ in 0..40 {
        let (mut walked, seen) = walk_once(dir, ignore, reach, cache)?;
        hashed_files += walked.stats.hashed_files;
        hashed_bytes += walked.stats.hashed_bytes;
        let mut grew = false;
        if matches!(reach, Reach::Paths(_)) {
            for e in &walked.entries {
                if e.kind == v1::EntryKind::Symlink as i32 {
                    grew |= reach.follow_link(&e.path, &e.link_target);
                }
            }
        }
        if !grew {
            // Remember what this walk saw, and what it did not look at; forget files that
            // are gone. (Files seen in earlier rounds are within the reach: replaced by
            // `seen`.) Nothing to write when every file hit and none went.
            let mut keep = std::mem::take(&mut cache.entries);
            let before = keep.len();
            keep.retain(|p, _| !reach.includes(p));
            let unchanged = hashed_files == 0 && before - keep.len() == seen.len();
            keep.extend(seen);
            if !unchanged {
                cache.save(&keep);
            }
            cache.entries = keep;
            walked.stats.hashed_files = hashed_files;
            walked.stats.hashed_bytes = hashed_bytes;
            return Ok(walked);
        }
        // The next round re-walks with the larger reach; files already hashed hit.
        cache.entries.extend(seen);
    }
    Err(ClientError::Context(format!("{}: too many levels of symbolic links between the paths the Dockerfile reads", dir.display())))
}

/// A regular file found by the walk: its path bytes, its path, its absolute path, its
/// metadata, and its digest when the stat cache knows it.
type RegularFile = (Vec<u8>, String, PathBuf, fs::Metadata, Option<String>);

fn walk_once(
    dir: &Path,
    ignore: Option<&IgnoreMatcher>,
    reach: &Reach,
    cache: &StatCache,
) -> Result<(WalkedContext, HashMap<String, StatEntry>), ClientError> {
    let meta = fs::metadata(dir).map_err(|e| ClientError::Context(format!("context {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(ClientError::Context(format!("context {} is not a directory", dir.display())));
    }
    // Keyed by the path's bytes: names need not be UTF-8.
    let mut out: BTreeMap<Vec<u8>, v1::ContextEntry> = BTreeMap::new();
    let mut files = HashMap::new();
    let mut stats = SyncStats::default();
    let mut seen = HashMap::new();
    let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(dir.to_path_buf(), Vec::new())];
    let mut dirs_meta: HashMap<Vec<u8>, fs::Metadata> = HashMap::new();
    // Regular files, with their digest when the stat cache knows it (the others are hashed
    // after the walk, on every core).
    let mut regular: Vec<RegularFile> = Vec::new();
    while let Some((abs, rel_bytes)) = stack.pop() {
        let rd = fs::read_dir(&abs).map_err(|e| ClientError::Context(format!("reading {}: {e}", abs.display())))?;
        for entry in rd {
            let entry = entry.map_err(|e| ClientError::Context(format!("reading {}: {e}", abs.display())))?;
            let name = entry.file_name();
            let mut child_bytes = rel_bytes.clone();
            if !child_bytes.is_empty() {
                child_bytes.push(b'/');
            }
            child_bytes.extend_from_slice(name.as_encoded_bytes());
            // Matching (reach, .dockerignore) and the stat cache use the (lossy) text.
            let child_rel = String::from_utf8_lossy(&child_bytes).into_owned();
            if !reach.includes(&child_rel) {
                continue;
            }
            let child_abs = entry.path();
            // Not following a symlink, and relative to the open directory (no walk of the
            // whole path for each of 100,000 files).
            let m = entry.metadata().map_err(|e| ClientError::Context(format!("{}: {e}", child_abs.display())))?;
            let ignored = ignore.is_some_and(|i| i.matches(&child_rel));
            if m.is_dir() {
                if ignored && ignore.is_some_and(|i| i.can_skip_dir(&child_rel)) {
                    continue;
                }
                dirs_meta.insert(child_bytes.clone(), m.clone());
                if !ignored {
                    out.insert(child_bytes.clone(), entry_of(&child_bytes, v1::EntryKind::Dir, &m, String::new(), &[]));
                }
                stack.push((child_abs, child_bytes));
                continue;
            }
            if ignored {
                continue;
            }
            if m.file_type().is_symlink() {
                let target = fs::read_link(&child_abs).map_err(|e| ClientError::Context(format!("{}: {e}", child_abs.display())))?;
                out.insert(
                    child_bytes.clone(),
                    entry_of(&child_bytes, v1::EntryKind::Symlink, &m, String::new(), target.as_os_str().as_encoded_bytes()),
                );
            } else if m.is_file() {
                let cached = cache
                    .entries
                    .get(&child_rel)
                    .filter(|c| {
                        c.size == m.size()
                            && c.mtime == m.mtime()
                            && c.mtime_nsec == m.mtime_nsec()
                            && c.ino == m.ino()
                            && c.mode == m.mode()
                    })
                    .map(|c| c.digest.clone());
                regular.push((child_bytes, child_rel, child_abs, m, cached));
            }
            // Sockets, fifos and devices are not part of a build context.
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let chunk = regular.len().div_ceil(threads).max(64);
    let digests: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = regular
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    part.iter()
                        .map(|(_, _, abs, _, cached)| match cached {
                            Some(d) => Ok(d.clone()),
                            None => hash_file(abs, &mut buf).map(|d| d.to_string()),
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err(ClientError::Context("a hashing thread panicked".into()))))
            .collect::<Result<Vec<_>, _>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    // Files linked to each other (one inode) stay linked on the builder: each names the
    // group's first path.
    let mut groups: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    for (child_bytes, _, _, m, _) in &regular {
        if let (true, Ok(p)) = (m.nlink() > 1, std::str::from_utf8(child_bytes)) {
            groups.entry((m.dev(), m.ino())).or_default().push(p.to_string());
        }
    }
    for ((child_bytes, child_rel, child_abs, m, cached), digest) in regular.into_iter().zip(digests) {
        if cached.is_none() {
            stats.hashed_files += 1;
            stats.hashed_bytes += m.size();
        }
        seen.insert(child_rel, StatEntry::new(&m, digest.clone()));
        files.entry(digest.clone()).or_insert(child_abs);
        let mut e = entry_of(&child_bytes, v1::EntryKind::File, &m, digest, &[]);
        if let Some(first) = groups.get(&(m.dev(), m.ino())).and_then(|g| g.iter().min()) {
            if *first != e.path {
                e.hardlink = first.clone();
            }
        }
        out.insert(child_bytes.clone(), e);
    }
    // Every included entry's parents are sent too (an ignored directory can hold
    // re-included files).
    let paths: Vec<Vec<u8>> = out.keys().cloned().collect();
    for p in paths {
        let mut cur = p.as_slice();
        while let Some(i) = cur.iter().rposition(|&b| b == b'/') {
            let parent = &cur[..i];
            if !out.contains_key(parent) {
                if let Some(m) = dirs_meta.get(parent) {
                    out.insert(parent.to_vec(), entry_of(parent, v1::EntryKind::Dir, m, String::new(), &[]));
                }
            }
            cur = parent;
        }
    }
    stats.entries = out.len() as u64;
    Ok((WalkedContext { entries: out.into_values().collect(), files, stats }, seen))
}

/// A manifest entry; names (and link targets) that are not UTF-8 travel as raw bytes.
fn entry_of(rel: &[u8], kind: v1::EntryKind, m: &fs::Metadata, digest: String, link: &[u8]) -> v1::ContextEntry {
    let (path, raw_path) = match std::str::from_utf8(rel) {
        Ok(s) => (s.to_string(), Vec::new()),
        Err(_) => (String::from_utf8_lossy(rel).into_owned(), rel.to_vec()),
    };
    let (link_target, raw_link_target) = match std::str::from_utf8(link) {
        Ok(s) => (s.to_string(), Vec::new()),
        Err(_) => (String::from_utf8_lossy(link).into_owned(), link.to_vec()),
    };
    v1::ContextEntry {
        path,
        kind: kind as i32,
        mode: m.mode() & 0o7777,
        size: if kind == v1::EntryKind::File { m.size() } else { 0 },
        digest,
        link_target,
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec() as u32,
        raw_path,
        raw_link_target,
        hardlink: String::new(),
    }
}

/// SHA-256 of the file at `path`, read through `buf`.
fn hash_file(path: &Path, buf: &mut [u8]) -> Result<Digest, ClientError> {
    let mut f = fs::File::open(path).map_err(|e| ClientError::Context(format!("reading {}: {e}", path.display())))?;
    let mut h = Sha256::new();
    loop {
        let n = f.read(buf).map_err(|e| ClientError::Context(format!("reading {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Digest::from_hasher(h))
}

/// A key for the builder's session directory of this context on this machine.
pub fn session_key(context_dir: &Path) -> String {
    let machine = fs::read_to_string("/etc/machine-id").or_else(|_| fs::read_to_string("/proc/sys/kernel/hostname")).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(machine.trim().as_bytes());
    h.update([0]);
    h.update(context_dir.as_os_str().as_encoded_bytes());
    hex::encode(h.finalize())
}

const CHUNK: usize = 1 << 20;

/// Send the manifest and upload what the builder lacks; returns the context id.
pub async fn sync(client: &mut Client, session: String, walked: &WalkedContext) -> Result<(String, SyncStats), ClientError> {
    let mut stats = walked.stats;
    let reply = client
        .prepare_context(v1::ContextManifest { session, entries: walked.entries.clone() })
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    if !reply.missing.is_empty() {
        let mut uploads = Vec::new();
        for d in &reply.missing {
            let path = walked
                .files
                .get(d)
                .ok_or_else(|| ClientError::Context(format!("the builder asked for {d}, which is not in the context")))?;
            uploads.push((d.clone(), path.clone()));
        }
        stats.uploaded_files = uploads.len() as u64;
        // Several streams at once, so that the builder stores blobs on several cores (a
        // context of many small files is bound by file creation, not by bytes).
        let streams = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4).min(uploads.len().div_ceil(64));
        let mut parts: Vec<Vec<(String, PathBuf)>> = vec![Vec::new(); streams];
        for (i, u) in uploads.into_iter().enumerate() {
            parts[i % streams].push(u);
        }
        let sends = parts.into_iter().map(|part| {
            let mut client = client.clone();
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel::<v1::BlobChunk>(8);
                let reader = tokio::task::spawn_blocking(move || send_files(part, tx));
                let reply = client.upload_blobs(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
                let sent = reader
                    .await
                    .map_err(|e| ClientError::Context(e.to_string()))?
                    .map_err(|e| ClientError::Context(format!("uploading context: {e}")))?;
                reply.map_err(ClientError::from_status)?;
                Ok::<u64, ClientError>(sent)
            }
        });
        stats.uploaded_bytes = futures::future::try_join_all(sends).await?.into_iter().sum();
    }
    Ok((reply.context_id, stats))
}

/// Send `files` (digest, path) as blob chunks on `tx`; returns the bytes sent. Stops early,
/// without an error, when the stream has gone (its error is the upload's answer).
fn send_files(files: Vec<(String, PathBuf)>, tx: tokio::sync::mpsc::Sender<v1::BlobChunk>) -> io::Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for (digest, path) in files {
        let mut f = fs::File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut sent_any = false;
        loop {
            let n = read_full(&mut f, &mut buf)?;
            let last = n < CHUNK;
            if n == 0 && sent_any {
                // The previous chunk was exactly CHUNK long: close the blob.
                if tx.blocking_send(v1::BlobChunk { digest: digest.clone(), data: Vec::new(), last: true }).is_err() {
                    return Ok(total);
                }
                break;
            }
            total += n as u64;
            if tx.blocking_send(v1::BlobChunk { digest: digest.clone(), data: buf[..n].to_vec(), last }).is_err() {
                return Ok(total);
            }
            sent_any = true;
            if last {
                break;
            }
        }
    }
    Ok(total)
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Sends more of a context directory when the builder asks for paths the client did not
/// send at first (a base image's ONBUILD COPY, or anything its reading of the Dockerfile
/// missed): the paths are walked (after `.dockerignore`) and synced under the same session.
pub struct DirContext {
    /// The context directory.
    pub dir: PathBuf,
    /// Its `.dockerignore` rules.
    pub ignore: Option<IgnoreMatcher>,
    /// The sync session (see [`session_key`]).
    pub session: String,
}

#[tonic::async_trait]
impl crate::session::ContextProvider for DirContext {
    async fn provide(&self, client: &mut Client, paths: Vec<String>) -> Result<String, ClientError> {
        let mut reach = if paths.iter().any(String::is_empty) { Reach::All } else { Reach::Paths(paths.into_iter().collect()) };
        let (dir, ignore) = (self.dir.clone(), self.ignore.clone());
        let walked = tokio::task::spawn_blocking(move || walk(&dir, ignore.as_ref(), &mut reach, &mut StatCache::none()))
            .await
            .map_err(|e| ClientError::Context(e.to_string()))??;
        Ok(sync(client, self.session.clone(), &walked).await?.0)
    }
}

/// What was sent of a build's context, and how to send more if the builder asks.
#[derive(Clone, Default)]
pub struct SentContext {
    /// The prepared context's id on the builder ("" when the build has no context).
    pub id: String,
    /// What the walk and the upload did.
    pub stats: SyncStats,
    /// The paths walked, when the client sent only part of the context.
    pub reach: Option<Vec<String>>,
    /// Sends the rest of the context when the builder asks.
    pub provider: Option<std::sync::Arc<dyn crate::session::ContextProvider>>,
    /// The named contexts of `--build-context`, as sent.
    pub named: std::collections::BTreeMap<String, v1::NamedContext>,
}

impl SentContext {
    /// Tell the builder what was sent (it asks for the rest when a step needs it).
    pub fn describe(&self, req: &mut v1::BuildRequest) {
        req.context_id = self.id.clone();
        req.context_partial = self.reach.is_some();
        req.context_reach = self.reach.clone().unwrap_or_default();
        req.named_contexts = self.named.clone().into_iter().collect();
    }
}

/// Walk the context `dir` (only what `dockerfile` can read, after `ignore`) and send the
/// builder the files it lacks. `stat_cache` is the directory of the stat caches (`None`:
/// hash every file, for a context that is new each time, e.g. one extracted from stdin).
pub async fn sync_context(
    client: &mut Client,
    dir: &Path,
    dockerfile: &[u8],
    ignore: Option<&IgnoreMatcher>,
    stat_cache: Option<&Path>,
) -> Result<SentContext, ClientError> {
    // Only what the Dockerfile can read is walked, hashed and sent; the builder asks for
    // anything else a step turns out to read.
    let reach = crate::reach::reachable(&String::from_utf8_lossy(dockerfile));
    sync_reach(client, dir, reach, ignore, stat_cache).await
}

/// Send the whole directory `dir` (after `ignore`) as a context: a named context of
/// `--build-context`, which steps read as a stage's files.
pub async fn sync_whole(
    client: &mut Client,
    dir: &Path,
    ignore: Option<&IgnoreMatcher>,
    stat_cache: Option<&Path>,
) -> Result<SentContext, ClientError> {
    sync_reach(client, dir, Reach::All, ignore, stat_cache).await
}

async fn sync_reach(
    client: &mut Client,
    dir: &Path,
    mut reach: Reach,
    ignore: Option<&IgnoreMatcher>,
    stat_cache: Option<&Path>,
) -> Result<SentContext, ClientError> {
    let (dir2, ignore2, cache_root) = (dir.to_path_buf(), ignore.cloned(), stat_cache.map(Path::to_path_buf));
    let (walked, reach) = tokio::task::spawn_blocking(move || {
        let mut cache = match &cache_root {
            Some(root) => StatCache::load(root, &dir2),
            None => StatCache::none(),
        };
        walk(&dir2, ignore2.as_ref(), &mut reach, &mut cache).map(|w| (w, reach))
    })
    .await
    .map_err(|e| ClientError::Context(format!("walking the context {}: {e}", dir.display())))??;
    let session = session_key(dir);
    let (id, stats) = sync(client, session.clone(), &walked).await?;
    let provider = DirContext { dir: dir.to_path_buf(), ignore: ignore.cloned(), session };
    Ok(SentContext {
        id,
        stats,
        reach: match reach {
            Reach::All => None,
            Reach::Paths(p) => Some(p.into_iter().collect()),
        },
        provider: Some(std::sync::Arc::new(provider)),
        named: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(w: &WalkedContext) -> Vec<String> {
        w.entries.iter().map(|e| e.path.clone()).collect()
    }

    #[test]
    fn ignore_rules_and_parents() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("node_modules/keep")).unwrap();
        fs::write(d.path().join("node_modules/x.js"), "x").unwrap();
        fs::write(d.path().join("node_modules/keep/k.js"), "k").unwrap();
        fs::write(d.path().join("a.txt"), "a").unwrap();
        fs::write(d.path().join("secret.env"), "s").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
        let ig = IgnoreMatcher::new(&["node_modules", "!node_modules/keep", "*.env"]).unwrap();
        let w = walk(d.path(), Some(&ig), &mut Reach::All, &mut StatCache::none()).unwrap();
        assert_eq!(names(&w), vec!["a.txt", "link", "node_modules", "node_modules/keep", "node_modules/keep/k.js"]);
        let link = w.entries.iter().find(|e| e.path == "link").unwrap();
        assert_eq!(link.kind, v1::EntryKind::Symlink as i32);
        assert_eq!(link.link_target, "/etc/passwd");
        assert!(w.files.values().all(|p| !p.ends_with("secret.env")));
    }

    /// Issue 15: files hard-linked to each other travel as one file and links to it.
    #[test]
    fn hard_links_name_the_first_path_of_their_group() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("x")).unwrap();
        fs::write(d.path().join("x/b"), "shared").unwrap();
        fs::hard_link(d.path().join("x/b"), d.path().join("a")).unwrap();
        fs::hard_link(d.path().join("x/b"), d.path().join("x/c")).unwrap();
        fs::write(d.path().join("alone"), "shared").unwrap();
        let w = walk(d.path(), None, &mut Reach::All, &mut StatCache::none()).unwrap();
        let link = |p: &str| w.entries.iter().find(|e| e.path == p).unwrap().hardlink.clone();
        assert_eq!(link("a"), "", "the first path in byte order is the file");
        assert_eq!(link("x/b"), "a");
        assert_eq!(link("x/c"), "a");
        assert_eq!(link("alone"), "", "equal content is not a link");
        // Walked through a selection that leaves the first path out: the group is what was sent.
        let mut reach = Reach::Paths(["x".to_string()].into_iter().collect());
        let w = walk(d.path(), None, &mut reach, &mut StatCache::none()).unwrap();
        let link = |p: &str| w.entries.iter().find(|e| e.path == p).unwrap().hardlink.clone();
        assert_eq!((link("x/b"), link("x/c")), (String::new(), "x/b".to_string()));
    }

    #[test]
    fn stat_cache_skips_unchanged_files() {
        let d = tempfile::tempdir().unwrap();
        let cache_root = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a"), "aaaa").unwrap();
        fs::write(d.path().join("b"), "bbbb").unwrap();
        let mut c = StatCache::load(cache_root.path(), d.path());
        let w1 = walk(d.path(), None, &mut Reach::All, &mut c).unwrap();
        assert_eq!(w1.stats.hashed_files, 2);
        let mut c = StatCache::load(cache_root.path(), d.path());
        let w2 = walk(d.path(), None, &mut Reach::All, &mut c).unwrap();
        assert_eq!(w2.stats.hashed_files, 0, "nothing changed, nothing re-read");
        assert_eq!(names(&w1), names(&w2));
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(d.path().join("b"), "changed").unwrap();
        let mut c = StatCache::load(cache_root.path(), d.path());
        let w3 = walk(d.path(), None, &mut Reach::All, &mut c).unwrap();
        assert_eq!(w3.stats.hashed_files, 1);
        let b = w3.entries.iter().find(|e| e.path == "b").unwrap();
        assert_eq!(b.digest, Digest::of(b"changed").to_string());
    }

    #[test]
    fn only_reachable_paths_are_walked_and_links_are_followed() {
        let d = tempfile::tempdir().unwrap();
        for (p, c) in [("src/a", "a"), ("docs/huge", "h"), ("shared/conf", "c"), ("top", "t")] {
            fs::create_dir_all(d.path().join(p).parent().unwrap()).unwrap();
            fs::write(d.path().join(p), c).unwrap();
        }
        std::os::unix::fs::symlink("../shared", d.path().join("src/conf")).unwrap();
        let mut reach = Reach::Paths(["src".to_string()].into_iter().collect());
        let w = walk(d.path(), None, &mut reach, &mut StatCache::none()).unwrap();
        assert_eq!(names(&w), vec!["shared", "shared/conf", "src", "src/a", "src/conf"]);
        assert_eq!(w.stats.hashed_files, 2, "docs/huge and top were never read");
    }
}
