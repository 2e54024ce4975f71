//! The client side of context sync: walk the context (.dockerignore applied here, so ignored
//! files never leave the machine), digest files through a stat cache (an unchanged file —
//! same size, mtime, inode and mode — is never read again), send the manifest, and upload
//! only the files whose content the builder lacks.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use hoist_dockerfile::IgnoreMatcher;
use hoist_oci::digest::Digest;
use hoist_proto::v1;
use serde::Serialize;
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
    /// The manifest was the one last sent, and was named rather than sent again.
    pub named: bool,
}

/// What the stat cache knows of one file: the stat it had when it was hashed, and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
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

    /// The file still has the stat it was hashed with.
    fn matches(&self, m: &fs::Metadata) -> bool {
        self.size == m.size()
            && self.mtime == m.mtime()
            && self.mtime_nsec == m.mtime_nsec()
            && self.ino == m.ino()
            && self.mode == m.mode()
    }
}

/// Files of the stat cache, sorted by path bytes.
type Stats = Vec<(Vec<u8>, StatEntry)>;

/// A persistent map from path to (stat → digest) for one context directory.
#[derive(Debug, Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    entries: Stats,
}

/// The first bytes of a stat cache file (version 2: binary; version 1 was JSON).
const STAT_CACHE_MAGIC: &[u8] = b"hoist stat cache 2\n";

impl StatCache {
    /// The cache of `context_dir` under `cache_root` (missing or unreadable = empty).
    pub fn load(cache_root: &Path, context_dir: &Path) -> StatCache {
        let key = hex::encode(Sha256::digest(context_dir.as_os_str().as_encoded_bytes()));
        let path = cache_root.join("statcache").join(format!("{}.bin", &key[..32]));
        let entries = fs::read(&path).ok().and_then(|b| decode_stats(&b)).unwrap_or_default();
        StatCache { path: Some(path), entries }
    }

    /// A cache that remembers nothing (for `-` contexts).
    pub fn none() -> StatCache {
        StatCache::default()
    }

    /// Where the digests of the manifest last sent for this context are kept (`None` for
    /// `-` contexts).
    fn sent_record(&self) -> Option<PathBuf> {
        self.path.as_ref().map(|p| p.with_extension("sent"))
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        if let Some(parent) = path.parent() {
            let _ = fs::create_dir_all(parent);
        }
        let tmp = path.with_extension("tmp");
        if fs::write(&tmp, encode_stats(&self.entries)).is_ok() {
            let _ = fs::rename(&tmp, path);
            // The JSON cache of earlier versions.
            let _ = fs::remove_file(path.with_extension("json"));
        }
    }
}

fn encode_stats(entries: &[(Vec<u8>, StatEntry)]) -> Vec<u8> {
    let mut out = STAT_CACHE_MAGIC.to_vec();
    for (p, e) in entries {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.mtime.to_le_bytes());
        out.extend_from_slice(&e.mtime_nsec.to_le_bytes());
        out.extend_from_slice(&e.ino.to_le_bytes());
        out.extend_from_slice(&e.mode.to_le_bytes());
        out.push(e.digest.len() as u8);
        out.extend_from_slice(e.digest.as_bytes());
    }
    out
}

/// The entries of a stat cache file; `None` when it is not one, is cut short or is not
/// sorted.
fn decode_stats(b: &[u8]) -> Option<Stats> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        *b = rest;
        Some(head)
    }
    fn u64_of(b: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(b, 8)?.try_into().ok()?))
    }
    fn u32_of(b: &mut &[u8]) -> Option<u32> {
        Some(u32::from_le_bytes(take(b, 4)?.try_into().ok()?))
    }
    let mut b = b.strip_prefix(STAT_CACHE_MAGIC)?;
    let mut out: Stats = Vec::new();
    while !b.is_empty() {
        let n = u32_of(&mut b)? as usize;
        let path = take(&mut b, n)?.to_vec();
        let (size, mtime, mtime_nsec, ino) = (u64_of(&mut b)?, u64_of(&mut b)? as i64, u64_of(&mut b)? as i64, u64_of(&mut b)?);
        let mode = u32_of(&mut b)?;
        let n = *take(&mut b, 1)?.first()? as usize;
        let digest = String::from_utf8(take(&mut b, n)?.to_vec()).ok()?;
        if out.last().is_some_and(|(last, _)| *last >= path) {
            return None;
        }
        out.push((path, StatEntry { size, mtime, mtime_nsec, ino, mode, digest }));
    }
    Some(out)
}

/// The walked context: the manifest, and where it was walked.
pub struct WalkedContext {
    /// The context directory.
    pub dir: PathBuf,
    /// The manifest: every entry walked, sorted by path bytes.
    pub entries: Vec<v1::ContextEntry>,
    /// What the walk did.
    pub stats: SyncStats,
}

/// The files to read for `digests`: for each, a path of the manifest `entries` of `dir`
/// with that content.
fn paths_of(dir: &Path, entries: &[v1::ContextEntry], digests: &[String]) -> Result<Vec<(String, PathBuf)>, ClientError> {
    let mut by_digest: HashMap<&str, &v1::ContextEntry> = HashMap::new();
    for e in entries.iter().filter(|e| e.kind == v1::EntryKind::File as i32) {
        by_digest.entry(e.digest.as_str()).or_insert(e);
    }
    digests
        .iter()
        .map(|d| {
            let e = by_digest
                .get(d.as_str())
                .ok_or_else(|| ClientError::Context(format!("the builder asked for {d}, which is not in the context")))?;
            let rel = if e.raw_path.is_empty() { e.path.as_bytes() } else { &e.raw_path };
            Ok((d.clone(), dir.join(std::ffi::OsStr::from_bytes(rel))))
        })
        .collect()
}

/// Walk `dir`: every entry the Dockerfile can reach (`reach`) and not ignored, with its
/// parents; files digested (via the cache). Symlinks among the reached entries extend the
/// reach to their (in-context) targets.
pub fn walk(dir: &Path, ignore: Option<&IgnoreMatcher>, reach: &mut Reach, cache: &mut StatCache) -> Result<WalkedContext, ClientError> {
    let (mut hashed_files, mut hashed_bytes, mut dirty) = (0, 0, false);
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
        if let Some(seen) = seen {
            // What this walk saw replaces what the cache held within the reach (files that
            // are gone are forgotten); what it did not look at stays. A walk that grows
            // keeps everything: its next round re-walks with the larger reach, and the
            // files already hashed hit.
            cache.entries = merged(std::mem::take(&mut cache.entries), seen, (!grew).then_some(&*reach));
            dirty = true;
        }
        if !grew {
            if dirty {
                cache.save();
            }
            walked.stats.hashed_files = hashed_files;
            walked.stats.hashed_bytes = hashed_bytes;
            return Ok(walked);
        }
    }
    Err(ClientError::Context(format!("{}: too many levels of symbolic links between the paths the Dockerfile reads", dir.display())))
}

/// `old` with `seen` in its place (both sorted by path): an entry of both is `seen`'s, and
/// an entry of `old` only is dropped when `reach` covers it.
fn merged(old: Stats, seen: Stats, reach: Option<&Reach>) -> Stats {
    let mut out = Vec::with_capacity(old.len().max(seen.len()));
    let (mut old, mut seen) = (old.into_iter().peekable(), seen.into_iter().peekable());
    loop {
        let take_old = match (old.peek(), seen.peek()) {
            (None, None) => return out,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((o, _)), Some((s, _))) => o < s,
        };
        if take_old {
            let (p, e) = old.next().expect("peeked");
            if reach.is_none_or(|r| !r.includes(&String::from_utf8_lossy(&p))) {
                out.push((p, e));
            }
        } else {
            let (p, e) = seen.next().expect("peeked");
            if old.peek().is_some_and(|(o, _)| *o == p) {
                old.next();
            }
            out.push((p, e));
        }
    }
}

/// An entry found in the context directory.
struct Found {
    /// Its path's bytes, relative to the context.
    rel: Vec<u8>,
    kind: v1::EntryKind,
    meta: fs::Metadata,
    /// A symlink's target.
    link: Vec<u8>,
    /// In the manifest: false for an ignored directory, walked for files it re-includes
    /// (sent only as their parent).
    listed: bool,
}

/// Every entry under `dir` within `reach` and not ignored (with the ignored directories
/// that may hold re-included entries), in no order. Directories are read on several
/// threads: a context of 100,000 files is a `statx` each.
fn scan(dir: &Path, ignore: Option<&IgnoreMatcher>, reach: &Reach) -> Result<Vec<Found>, ClientError> {
    struct Queue {
        dirs: Vec<(PathBuf, Vec<u8>)>,
        busy: usize,
        failed: Option<ClientError>,
    }
    let queue = std::sync::Mutex::new(Queue { dirs: vec![(dir.to_path_buf(), Vec::new())], busy: 0, failed: None });
    let wake = std::sync::Condvar::new();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let parts: Vec<_> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let (abs, rel) = {
                            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                            loop {
                                if q.failed.is_some() {
                                    return out;
                                }
                                if let Some(d) = q.dirs.pop() {
                                    q.busy += 1;
                                    break d;
                                }
                                if q.busy == 0 {
                                    return out;
                                }
                                q = wake.wait(q).unwrap_or_else(|e| e.into_inner());
                            }
                        };
                        let mut subdirs = Vec::new();
                        let read = scan_dir(&abs, &rel, ignore, reach, &mut out, &mut subdirs);
                        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                        q.busy -= 1;
                        match read {
                            Ok(()) => q.dirs.extend(subdirs),
                            Err(e) => {
                                q.failed.get_or_insert(e);
                            }
                        }
                        drop(q);
                        wake.notify_all();
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join()).collect()
    });
    if let Some(e) = queue.into_inner().unwrap_or_else(|e| e.into_inner()).failed {
        return Err(e);
    }
    let mut found = Vec::new();
    for part in parts {
        found.extend(part.map_err(|_| ClientError::Context(format!("walking {}: a thread panicked", dir.display())))?);
    }
    Ok(found)
}

/// The entries of directory `abs` (`rel` in the context) into `out`, the directories to
/// walk into `subdirs`.
fn scan_dir(
    abs: &Path,
    rel: &[u8],
    ignore: Option<&IgnoreMatcher>,
    reach: &Reach,
    out: &mut Vec<Found>,
    subdirs: &mut Vec<(PathBuf, Vec<u8>)>,
) -> Result<(), ClientError> {
    let rd = fs::read_dir(abs).map_err(|e| ClientError::Context(format!("reading {}: {e}", abs.display())))?;
    for entry in rd {
        let entry = entry.map_err(|e| ClientError::Context(format!("reading {}: {e}", abs.display())))?;
        let mut child = rel.to_vec();
        if !child.is_empty() {
            child.push(b'/');
        }
        child.extend_from_slice(entry.file_name().as_encoded_bytes());
        // Matching (reach, .dockerignore) uses the (lossy) text.
        let text = String::from_utf8_lossy(&child);
        if !reach.includes(&text) {
            continue;
        }
        // Not following a symlink, and relative to the open directory (no walk of the
        // whole path for each of 100,000 files).
        let m = entry.metadata().map_err(|e| ClientError::Context(format!("{}: {e}", entry.path().display())))?;
        let ignored = ignore.is_some_and(|i| i.matches(&text));
        if m.is_dir() {
            if ignored && ignore.is_some_and(|i| i.can_skip_dir(&text)) {
                continue;
            }
            drop(text);
            subdirs.push((entry.path(), child.clone()));
            out.push(Found { rel: child, kind: v1::EntryKind::Dir, meta: m, link: Vec::new(), listed: !ignored });
        } else if ignored {
            continue;
        } else if m.file_type().is_symlink() {
            let target = fs::read_link(entry.path()).map_err(|e| ClientError::Context(format!("{}: {e}", entry.path().display())))?;
            drop(text);
            out.push(Found {
                rel: child,
                kind: v1::EntryKind::Symlink,
                meta: m,
                link: target.into_os_string().into_encoded_bytes(),
                listed: true,
            });
        } else if m.is_file() {
            drop(text);
            out.push(Found { rel: child, kind: v1::EntryKind::File, meta: m, link: Vec::new(), listed: true });
        }
        // Sockets, fifos and devices are not part of a build context.
    }
    Ok(())
}

/// One walk within `reach`; the files seen with their stat and digest when they differ
/// from what the cache holds within the reach (`None`: the cache is current).
fn walk_once(
    dir: &Path,
    ignore: Option<&IgnoreMatcher>,
    reach: &Reach,
    cache: &StatCache,
) -> Result<(WalkedContext, Option<Stats>), ClientError> {
    let meta = fs::metadata(dir).map_err(|e| ClientError::Context(format!("context {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(ClientError::Context(format!("context {} is not a directory", dir.display())));
    }
    let mut found = scan(dir, ignore, reach)?;
    found.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
    // An ignored directory is sent when it holds a re-included entry (its parent).
    let unlisted: HashMap<Vec<u8>, usize> = found.iter().enumerate().filter(|(_, f)| !f.listed).map(|(i, f)| (f.rel.clone(), i)).collect();
    if !unlisted.is_empty() {
        let mut parents: Vec<usize> = Vec::new();
        for f in found.iter().filter(|f| f.listed) {
            let mut cur = f.rel.as_slice();
            while let Some(i) = cur.iter().rposition(|&b| b == b'/') {
                cur = &cur[..i];
                parents.extend(unlisted.get(cur));
            }
        }
        for i in parents {
            found[i].listed = true;
        }
        found.retain(|f| f.listed);
    }
    // Digests the cache knows (both sorted by path); whether anything differs from it.
    let mut changed = false;
    let mut cached = cache.entries.iter().peekable();
    let mut digests: Vec<Option<String>> = Vec::with_capacity(found.len());
    for f in &found {
        if f.kind != v1::EntryKind::File {
            digests.push(None);
            continue;
        }
        while let Some((p, _)) = cached.next_if(|(p, _)| *p < f.rel) {
            // A file the cache holds and the walk did not see (gone, or ignored now).
            changed |= reach.includes(&String::from_utf8_lossy(p));
        }
        let hit = cached.next_if(|(p, _)| *p == f.rel).filter(|(_, c)| c.matches(&f.meta)).map(|(_, c)| c.digest.clone());
        changed |= hit.is_none();
        digests.push(hit);
    }
    changed |= cached.any(|(p, _)| reach.includes(&String::from_utf8_lossy(p)));
    // The other files are read, on every core.
    let todo: Vec<usize> = (0..found.len()).filter(|&i| found[i].kind == v1::EntryKind::File && digests[i].is_none()).collect();
    let mut stats = SyncStats::default();
    if !todo.is_empty() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        let chunk = todo.len().div_ceil(threads).max(64);
        let hashed: Vec<(usize, String)> = std::thread::scope(|scope| {
            let workers: Vec<_> = todo
                .chunks(chunk)
                .map(|part| {
                    let found = &found;
                    scope.spawn(move || {
                        let mut buf = vec![0u8; 256 * 1024];
                        part.iter()
                            .map(|&i| {
                                hash_file(&dir.join(std::ffi::OsStr::from_bytes(&found[i].rel)), &mut buf).map(|d| (i, d.to_string()))
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
        for (i, d) in hashed {
            stats.hashed_files += 1;
            stats.hashed_bytes += found[i].meta.size();
            digests[i] = Some(d);
        }
    }
    // Files linked to each other (one inode) stay linked on the builder: each names the
    // group's first path.
    let mut groups: HashMap<(u64, u64), &str> = HashMap::new();
    for f in found.iter().filter(|f| f.kind == v1::EntryKind::File && f.meta.nlink() > 1) {
        if let Ok(p) = std::str::from_utf8(&f.rel) {
            // Sorted: the first seen is the least.
            groups.entry((f.meta.dev(), f.meta.ino())).or_insert(p);
        }
    }
    let seen = changed.then(|| {
        found.iter().zip(&digests).filter_map(|(f, d)| Some((f.rel.clone(), StatEntry::new(&f.meta, d.clone()?)))).collect::<Stats>()
    });
    let entries = found
        .iter()
        .zip(digests)
        .map(|(f, d)| {
            let mut e = entry_of(&f.rel, f.kind, &f.meta, d.unwrap_or_default(), &f.link);
            if let Some(first) = groups.get(&(f.meta.dev(), f.meta.ino())).filter(|_| f.kind == v1::EntryKind::File) {
                if *first != e.path {
                    e.hardlink = first.to_string();
                }
            }
            e
        })
        .collect();
    stats.entries = found.len() as u64;
    Ok((WalkedContext { dir: dir.to_path_buf(), entries, stats }, seen))
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

/// Send the manifest and upload what the builder lacks; returns the context id. `sent` is
/// where the digests of the manifest last sent for this context are kept: a manifest the
/// same as that one is named, not sent again (the builder answers NOT_FOUND when it no
/// longer has it, and an older builder UNIMPLEMENTED; then it is sent).
pub async fn sync(
    client: &mut Client,
    session: String,
    walked: WalkedContext,
    sent: Option<&Path>,
) -> Result<(String, SyncStats), ClientError> {
    let WalkedContext { dir, entries, mut stats } = walked;
    let manifest = v1::ContextManifest { session, entries };
    // Ours, then the builder's: "sha256:<ours> sha256:<builder's>".
    let ours = sent.map(|_| Digest::of(&hoist_proto::Message::encode_to_vec(&manifest)).to_string());
    let record = sent.and_then(|p| fs::read_to_string(p).ok()).unwrap_or_default();
    let named = match record.split_once(' ') {
        Some((o, theirs)) if Some(o) == ours.as_deref() => {
            let known = v1::KnownManifest { session: manifest.session.clone(), manifest: theirs.trim().to_string() };
            match client.prepare_known_context(known).await {
                Ok(r) => Some(r.into_inner()),
                Err(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::Unimplemented) => None,
                Err(s) => return Err(ClientError::from_status(s)),
            }
        }
        _ => None,
    };
    stats.named = named.is_some();
    let reply = match named {
        Some(reply) => reply,
        None => {
            let reply = client.prepare_context(manifest.clone()).await.map_err(ClientError::from_status)?.into_inner();
            if let (Some(path), Some(ours), false) = (sent, &ours, reply.manifest.is_empty()) {
                let tmp = path.with_extension("sent.tmp");
                if fs::write(&tmp, format!("{ours} {}\n", reply.manifest)).is_ok() {
                    let _ = fs::rename(&tmp, path);
                }
            }
            reply
        }
    };
    if !reply.missing.is_empty() {
        let uploads = paths_of(&dir, &manifest.entries, &reply.missing)?;
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
        Ok(sync(client, self.session.clone(), walked, None).await?.0)
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
    let (walked, reach, sent) = tokio::task::spawn_blocking(move || {
        let mut cache = match &cache_root {
            Some(root) => StatCache::load(root, &dir2),
            None => StatCache::none(),
        };
        walk(&dir2, ignore2.as_ref(), &mut reach, &mut cache).map(|w| (w, reach, cache.sent_record()))
    })
    .await
    .map_err(|e| ClientError::Context(format!("walking the context {}: {e}", dir.display())))??;
    let session = session_key(dir);
    let (id, stats) = sync(client, session.clone(), walked, sent.as_deref()).await?;
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
    fn the_stat_cache_file_round_trips_and_forgets_what_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let cache_root = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("sub")).unwrap();
        for (p, c) in [("a", "a"), ("b", "b"), ("sub/c", "c")] {
            fs::write(d.path().join(p), c).unwrap();
        }
        let load = || StatCache::load(cache_root.path(), d.path());
        assert_eq!(walk(d.path(), None, &mut Reach::All, &mut load()).unwrap().stats.hashed_files, 3);
        let path = load().path.unwrap();
        let bytes = fs::read(&path).unwrap();
        let cached = decode_stats(&bytes).unwrap();
        let paths: Vec<&[u8]> = cached.iter().map(|(p, _)| p.as_slice()).collect();
        assert_eq!(paths, [&b"a"[..], b"b", b"sub/c"]);
        assert_eq!(cached[2].1.digest, Digest::of(b"c").to_string());
        assert_eq!(encode_stats(&cached), bytes);
        // Cut short, out of order or of another format: an empty cache, not a wrong one.
        assert!(decode_stats(&bytes[..bytes.len() - 1]).is_none());
        let mut swapped = cached.clone();
        swapped.swap(0, 1);
        assert!(decode_stats(&encode_stats(&swapped)).is_none());
        assert!(decode_stats(b"{}").is_none());
        // A file that is gone leaves the cache; nothing else is read again.
        fs::remove_file(d.path().join("a")).unwrap();
        let w = walk(d.path(), None, &mut Reach::All, &mut load()).unwrap();
        assert_eq!((w.stats.hashed_files, names(&w)), (0, vec!["b".to_string(), "sub".into(), "sub/c".into()]));
        assert_eq!(load().entries.len(), 2);
        // A walk of part of the context keeps what the cache knows of the rest.
        fs::write(d.path().join("sub/c"), "c2").unwrap();
        let w = walk(d.path(), None, &mut Reach::Paths(["sub".to_string()].into_iter().collect()), &mut load()).unwrap();
        assert_eq!(w.stats.hashed_files, 1);
        let kept: Vec<(Vec<u8>, String)> = load().entries.into_iter().map(|(p, e)| (p, e.digest)).collect();
        assert_eq!(kept, [(b"b".to_vec(), Digest::of(b"b").to_string()), (b"sub/c".to_vec(), Digest::of(b"c2").to_string())]);
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
