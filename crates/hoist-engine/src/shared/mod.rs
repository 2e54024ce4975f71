//! The shared tier of the build cache: object storage (S3 and compatible stores, or a
//! directory) that every node of a fleet reads and writes, behind each node's own disk.
//!
//! Layout under the store's prefix, as Bazel's remote caches keep theirs:
//! - `ac/<project>/<cache key>`: one small JSON [`Entry`] per step result (its layer's
//!   diff_id, the blob that holds it, the record's time). The first writer wins (see
//!   [`SharedTier::put_entry`]).
//! - `cas/sha256/<hex>`: blobs by digest, compressed as a push would send them, written
//!   create-if-absent.
//!
//! A node writes a step's blob before its entry, so an entry never names a blob that was
//! never written; a reader still checks that the blobs of every entry it found exist (one
//! batch of parallel requests for a build's computable keys), and counts an entry whose blob
//! is gone as a miss. Writes go behind the build through a bounded queue
//! ([`SharedTier::write_behind`], [`SharedTier::flush`]). A store that fails is warned about
//! once and left alone for a while: builds go on with the local tier.

mod node;
mod url;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use hoist_oci::digest::Digest;
use hoist_oci::store::{ContentStore, StoreError};
use object_store::path::{Path as StorePath, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};

/// Requests in flight at once for one batch of lookups.
const LOOKUP_PARALLEL: usize = 32;
/// Writes waiting or running before a new one waits for room.
const QUEUE: usize = 256;
/// Uploads running at once.
const UPLOADS: usize = 8;
/// How long a key found missing is not asked for again.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// How long a store that failed is left alone.
const DOWN_FOR: Duration = Duration::from_secs(30);
/// Blobs up to this size go up in one request; larger ones in parts.
const SINGLE_PUT: u64 = 32 << 20;
/// How long a background write waits for the node's builds to end before it goes anyway.
const BACKGROUND_WAIT: Duration = Duration::from_secs(30);
/// How long a blob seen in the store is taken to be there without asking again (a layer
/// this node holds only there counts as at hand for that long).
const PRESENT_FOR: Duration = Duration::from_secs(600);

/// Errors of the shared tier.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// `--cache-store` does not name a store hoist can use.
    #[error("cache store {url}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The object store failed.
    #[error("shared cache store: {0}")]
    Store(#[from] object_store::Error),
    /// An entry that does not parse.
    #[error("shared cache entry {path} is corrupt: {source}")]
    Entry {
        /// The entry's path in the store.
        path: String,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// A blob fetched from the store is not the one its entry names (or cannot be kept).
    #[error("shared cache blob {digest}: {source}")]
    Blob {
        /// The blob's digest.
        digest: Digest,
        /// What failed.
        source: StoreError,
    },
    /// A blob from the store that does not extract to the layer its entry names.
    #[error("shared cache blob {blob}: {source}")]
    Layer {
        /// The blob's digest.
        blob: Digest,
        /// What failed.
        source: Box<crate::images::ImageError>,
    },
    /// Reading a local blob to upload it failed.
    #[error("reading {path} to upload it: {source}")]
    Read {
        /// The local file.
        path: std::path::PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// A blob as an entry names it: compressed bytes, as pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobDesc {
    /// Digest of the blob.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Layer media type (gzip, zstd or plain tar).
    pub media_type: String,
}

/// What a step's cache key produced, as the shared tier keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The layer (diff_id); `None` when the step changed nothing.
    pub diff_id: Option<Digest>,
    /// The blob holding the layer (present exactly when `diff_id` is).
    pub blob: Option<BlobDesc>,
    /// When the step first ran (seconds since the epoch): the layer's time in images, so
    /// every node gives the same image.
    pub created: u64,
    /// The layer's size as the local index records it.
    pub size: u64,
}

/// An object store and the prefix hoist's objects live under.
#[derive(Debug, Clone)]
pub struct SharedStore {
    store: Arc<dyn ObjectStore>,
    prefix: Vec<String>,
    name: String,
}

impl SharedStore {
    /// Objects of `store` under `prefix` (`a/b`, or empty); `name` says which store it is
    /// in messages.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, name: impl Into<String>) -> SharedStore {
        let prefix = prefix.split('/').filter(|p| !p.is_empty()).map(str::to_string).collect();
        SharedStore { store, prefix, name: name.into() }
    }

    /// The store a `--cache-store` URL names: `s3://bucket/prefix` (endpoint, region and
    /// credentials from `AWS_*` variables and `~/.aws/{config,credentials}`) or
    /// `file:///dir`.
    pub fn from_url(url: &str) -> Result<SharedStore, SharedError> {
        url::open(url)
    }

    /// The store as its URL names it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory of a `file://` store.
    pub fn local_dir(&self) -> Option<std::path::PathBuf> {
        self.name.strip_prefix("file://").map(std::path::PathBuf::from)
    }

    /// The object store itself.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The path of `parts` below the prefix (each part escaped as needed).
    pub fn path<'a>(&'a self, parts: impl IntoIterator<Item = &'a str>) -> StorePath {
        self.prefix.iter().map(String::as_str).chain(parts).map(PathPart::from).collect()
    }

    /// Where the entry of `key` in project `ns` lives.
    pub fn entry_path(&self, ns: &str, key: &str) -> StorePath {
        self.path(["ac", ns, key])
    }

    /// Where blob `digest` lives.
    pub fn blob_path(&self, digest: &Digest) -> StorePath {
        self.path(["cas", digest.algorithm(), digest.hex()])
    }
}

/// Requests a node made of its store, for benchmarks and tests.
#[derive(Debug, Default)]
pub struct StoreRequests {
    /// Entry reads.
    pub entry_gets: AtomicU64,
    /// Blob existence checks.
    pub blob_heads: AtomicU64,
    /// Blob reads.
    pub blob_gets: AtomicU64,
    /// Blob uploads (one per blob, however many parts).
    pub blob_puts: AtomicU64,
    /// Entry writes.
    pub entry_puts: AtomicU64,
}

/// A node's use of its shared store: lookups, fetches, writes behind builds, and the state
/// that keeps a failing or missing store cheap (negative cache, back-off).
pub struct SharedTier {
    store: SharedStore,
    /// `project\0key` → when it was found missing.
    missing: Mutex<HashMap<String, Instant>>,
    /// `project\0key` → when this node last marked it used ([`SharedTier::touch`]).
    touched: Mutex<HashMap<String, Instant>>,
    /// Blobs seen in the store (HEAD, read or written) → when.
    present: Mutex<HashMap<Digest, Instant>>,
    /// Set when the store failed: until then, nothing is asked of it.
    down_until: Mutex<Option<Instant>>,
    queue: Arc<Semaphore>,
    uploads: Semaphore,
    pending: AtomicUsize,
    /// Of them, step results.
    pending_results: AtomicUsize,
    idle: Notify,
    /// Builds running on the node ([`SharedTier::busy`]); background writes wait for none.
    busy: AtomicUsize,
    quiet: Notify,
    /// What was asked of the store.
    pub requests: StoreRequests,
}

/// A build running on the node ([`SharedTier::busy`]).
pub struct BusyGuard(Arc<SharedTier>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.quiet.notify_waiters();
        }
    }
}

/// The result of a batch of lookups.
#[derive(Debug, Default)]
pub struct Lookup {
    /// Entries found whose blobs exist, by key.
    pub hits: HashMap<String, Entry>,
    /// The store failed (the first error): the build should say it goes on without it.
    pub failed: Option<String>,
}

impl SharedTier {
    /// The tier over `store`.
    pub fn new(store: SharedStore) -> SharedTier {
        SharedTier {
            store,
            missing: Mutex::default(),
            touched: Mutex::default(),
            present: Mutex::default(),
            down_until: Mutex::default(),
            queue: Arc::new(Semaphore::new(QUEUE)),
            uploads: Semaphore::new(UPLOADS),
            pending: AtomicUsize::new(0),
            pending_results: AtomicUsize::new(0),
            idle: Notify::new(),
            busy: AtomicUsize::new(0),
            quiet: Notify::new(),
            requests: StoreRequests::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    fn is_down(&self) -> bool {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        match *down {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *down = None;
                false
            }
            None => false,
        }
    }

    /// Note a failure: the store is left alone for a while; warned about once per outage.
    fn failed(&self, e: &SharedError) -> String {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        let msg = format!("the shared cache store {} failed ({e}); building with this node's cache only", self.store.name);
        if down.is_none() {
            tracing::warn!("{msg}");
        }
        *down = Some(Instant::now() + DOWN_FOR);
        msg
    }

    fn missing_key(ns: &str, key: &str) -> String {
        format!("{ns}\0{key}")
    }

    /// Look up `keys` of project `ns` in one batch of parallel requests, skipping keys found
    /// missing moments ago; then check, in a second batch, that the blobs of the entries
    /// found exist (a blob `have` says this node has needs no check). An entry whose blob is
    /// gone counts as a miss.
    pub async fn lookup(&self, ns: &str, keys: &[String], have: &(dyn Fn(&Digest) -> bool + Sync)) -> Lookup {
        let mut out = Lookup::default();
        if self.is_down() {
            return out;
        }
        let now = Instant::now();
        let wanted: Vec<String> = {
            let mut missing = self.missing.lock().unwrap_or_else(|e| e.into_inner());
            missing.retain(|_, t| now.duration_since(*t) < NEGATIVE_TTL);
            keys.iter().filter(|k| !missing.contains_key(&Self::missing_key(ns, k))).cloned().collect()
        };
        let found: Vec<(String, Result<Option<Entry>, SharedError>)> = futures::stream::iter(wanted)
            .map(|k| async move {
                let r = self.get_entry(ns, &k).await;
                (k, r)
            })
            .buffer_unordered(LOOKUP_PARALLEL)
            .collect()
            .await;
        let mut entries = Vec::new();
        let mut misses = Vec::new();
        for (k, r) in found {
            match r {
                Ok(Some(e)) => entries.push((k, e)),
                Ok(None) => misses.push(k),
                Err(e) => {
                    out.failed.get_or_insert_with(|| self.failed(&e));
                }
            }
        }
        let to_check: BTreeSet<Digest> = entries
            .iter()
            .filter(|(_, e)| !e.diff_id.as_ref().is_some_and(have))
            .filter_map(|(_, e)| e.blob.as_ref().map(|b| b.digest.clone()))
            .collect();
        let checked: Vec<(Digest, Result<bool, SharedError>)> = futures::stream::iter(to_check)
            .map(|d| async move {
                let r = self.has_blob(&d).await;
                (d, r)
            })
            .buffer_unordered(LOOKUP_PARALLEL)
            .collect()
            .await;
        let mut gone = BTreeSet::new();
        for (d, r) in checked {
            match r {
                Ok(true) => {}
                Ok(false) => {
                    gone.insert(d);
                }
                Err(e) => {
                    out.failed.get_or_insert_with(|| self.failed(&e));
                    gone.insert(d);
                }
            }
        }
        for (k, e) in entries {
            if e.blob.as_ref().is_some_and(|b| gone.contains(&b.digest)) {
                misses.push(k);
            } else {
                out.hits.insert(k, e);
            }
        }
        let mut missing = self.missing.lock().unwrap_or_else(|e| e.into_inner());
        for k in misses {
            missing.insert(Self::missing_key(ns, &k), now);
        }
        out
    }

    async fn get_entry(&self, ns: &str, key: &str) -> Result<Option<Entry>, SharedError> {
        let path = self.store.entry_path(ns, key);
        self.requests.entry_gets.fetch_add(1, Ordering::Relaxed);
        let (bytes, written) = match self.store.store.get(&path).await {
            Ok(r) => {
                let written = r.meta.last_modified;
                (r.bytes().await?, written)
            }
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let entry = serde_json::from_slice(&bytes).map_err(|source| SharedError::Entry { path: path.to_string(), source })?;
        // Written (or marked used) within a day: marking it used now would change nothing.
        if chrono::Utc::now().signed_duration_since(written).to_std().is_ok_and(|age| age < TOUCH_EVERY) {
            self.touched.lock().unwrap_or_else(|e| e.into_inner()).insert(Self::missing_key(ns, key), Instant::now());
        }
        Ok(Some(entry))
    }

    async fn has_blob(&self, digest: &Digest) -> Result<bool, SharedError> {
        self.requests.blob_heads.fetch_add(1, Ordering::Relaxed);
        match self.store.store.head(&self.store.blob_path(digest)).await {
            Ok(_) => {
                self.seen(digest);
                Ok(true)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn seen(&self, digest: &Digest) {
        let mut present = self.present.lock().unwrap_or_else(|e| e.into_inner());
        if present.len() > 100_000 {
            let now = Instant::now();
            present.retain(|_, t| now.duration_since(*t) < PRESENT_FOR);
        }
        present.insert(digest.clone(), Instant::now());
    }

    /// Whether blob `digest` was seen in the store a short while ago (no request).
    pub fn seen_recently(&self, digest: &Digest) -> bool {
        let present = self.present.lock().unwrap_or_else(|e| e.into_inner());
        present.get(digest).is_some_and(|t| t.elapsed() < PRESENT_FOR)
    }

    /// Whether the store has blob `digest`: seen a short while ago, else asked (HEAD). A
    /// store that fails (or is down) has nothing.
    pub async fn knows_blob(&self, digest: &Digest) -> bool {
        if self.seen_recently(digest) {
            return true;
        }
        if self.is_down() {
            return false;
        }
        match self.has_blob(digest).await {
            Ok(found) => found,
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    /// Put blob `blob` from the store into `content` (verified against its digest).
    pub async fn fetch_blob(&self, blob: &BlobDesc, content: &ContentStore) -> Result<(), SharedError> {
        if content.contains(&blob.digest) {
            return Ok(());
        }
        let blob_err = |source| SharedError::Blob { digest: blob.digest.clone(), source };
        self.requests.blob_gets.fetch_add(1, Ordering::Relaxed);
        let mut stream = self.store.store.get(&self.store.blob_path(&blob.digest)).await?.into_stream();
        let writer = content.writer().map_err(blob_err)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let write = tokio::task::spawn_blocking(move || -> Result<hoist_oci::store::BlobWriter, std::io::Error> {
            use std::io::Write;
            let mut writer = writer;
            while let Some(chunk) = rx.blocking_recv() {
                writer.write_all(&chunk)?;
            }
            Ok(writer)
        });
        let mut failed = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => {
                    if tx.send(c).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let io_err = |e: std::io::Error| blob_err(StoreError::Io { path: content.root().join("ingest"), source: e });
        let writer = write.await.map_err(|e| io_err(std::io::Error::other(e)))?.map_err(io_err)?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        let expected = blob.digest.clone();
        tokio::task::spawn_blocking(move || writer.commit(Some(&expected)))
            .await
            .map_err(|e| io_err(std::io::Error::other(e)))?
            .map_err(blob_err)?;
        Ok(())
    }

    /// Put blob `blob` into `content` from the store if the store has it (a base image
    /// layer another node pulled); false when it has not, or fails (warned about once).
    pub async fn try_fetch_blob(&self, blob: &BlobDesc, content: &ContentStore) -> bool {
        if self.is_down() {
            return false;
        }
        match self.fetch_blob(blob, content).await {
            Ok(()) => true,
            Err(SharedError::Store(object_store::Error::NotFound { .. })) => false,
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    /// Upload blob `blob` from `content` unless the store has it (create-if-absent: a blob
    /// another node wrote first stays as it is).
    pub async fn put_blob(&self, blob: &BlobDesc, content: &ContentStore) -> Result<(), SharedError> {
        if self.has_blob(&blob.digest).await? {
            return Ok(());
        }
        let _permit = self.uploads.acquire().await.expect("the upload semaphore is never closed");
        let path = self.store.blob_path(&blob.digest);
        let file = content.blob_path(&blob.digest);
        let read_err = |source| SharedError::Read { path: file.clone(), source };
        self.requests.blob_puts.fetch_add(1, Ordering::Relaxed);
        if blob.size <= SINGLE_PUT {
            let bytes = tokio::fs::read(&file).await.map_err(read_err)?;
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            return match self.store.store.put_opts(&path, PutPayload::from(bytes), opts).await {
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {
                    self.seen(&blob.digest);
                    Ok(())
                }
                Err(e) => Err(e.into()),
            };
        }
        // A large blob goes up in parts; the store makes it visible only when all are there,
        // so a reader never sees part of it. Equal digests are equal bytes, so a race with
        // another node's upload of the same blob is harmless.
        let upload = self.store.store.put_multipart(&path).await?;
        let mut parts = object_store::WriteMultipart::new_with_chunk_size(upload, 16 << 20);
        let mut f = tokio::fs::File::open(&file).await.map_err(read_err)?;
        let mut buf = vec![0u8; 4 << 20];
        loop {
            use tokio::io::AsyncReadExt;
            let n = f.read(&mut buf).await.map_err(read_err)?;
            if n == 0 {
                break;
            }
            parts.wait_for_capacity(4).await?;
            parts.write(&buf[..n]);
        }
        parts.finish().await?;
        self.seen(&blob.digest);
        Ok(())
    }

    /// Write the entry of `key` in project `ns`, unless the store has a usable one: the
    /// first result of a key stays (create-if-absent), so every node that reads it after a
    /// race gets the same image. An entry whose blob is gone is replaced. Its blob must be in
    /// the store already.
    pub async fn put_entry(&self, ns: &str, key: &str, entry: &Entry) -> Result<(), SharedError> {
        let path = self.store.entry_path(ns, key);
        let bytes = serde_json::to_vec(entry).map_err(|source| SharedError::Entry { path: path.to_string(), source })?;
        self.requests.entry_puts.fetch_add(1, Ordering::Relaxed);
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        let replace = match self.store.store.put_opts(&path, PutPayload::from(bytes.clone()), create).await {
            Ok(_) => false,
            // A store without conditional writes: last writer wins (equal keys, equal results).
            Err(object_store::Error::NotImplemented { .. }) => true,
            Err(object_store::Error::AlreadyExists { .. }) => match self.get_entry(ns, key).await {
                Ok(Some(Entry { blob: Some(b), .. })) => !self.has_blob(&b.digest).await?,
                Ok(Some(_)) => false,
                Ok(None) | Err(SharedError::Entry { .. }) => true,
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e.into()),
        };
        if replace {
            self.requests.entry_puts.fetch_add(1, Ordering::Relaxed);
            self.store.store.put(&path, PutPayload::from(bytes)).await?;
        }
        self.missing.lock().unwrap_or_else(|e| e.into_inner()).remove(&Self::missing_key(ns, key));
        Ok(())
    }

    /// Run `write` (a step's result) behind the caller: it waits only while the queue is
    /// full. A failed write is warned about (once per outage) and dropped: the local tier
    /// still has the result.
    pub async fn write_behind<F, E>(self: &Arc<Self>, write: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<WriteError>,
    {
        self.queue_write(write, true).await
    }

    /// [`SharedTier::write_behind`] for a write no build waits for ([`SharedTier::flush_results`]):
    /// a base image's blob, a mark of use.
    pub async fn write_behind_background<F, E>(self: &Arc<Self>, write: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<WriteError>,
    {
        self.queue_write(write, false).await
    }

    async fn queue_write<F, E>(self: &Arc<Self>, write: F, result: bool)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<WriteError>,
    {
        if self.is_down() {
            return;
        }
        let permit = self.queue.clone().acquire_owned().await.expect("the write queue is never closed");
        self.pending.fetch_add(1, Ordering::AcqRel);
        if result {
            self.pending_results.fetch_add(1, Ordering::AcqRel);
        }
        let tier = self.clone();
        tokio::spawn(async move {
            if !result {
                // Behind the node's builds: a base image's blob going up must not slow them.
                let _ = tokio::time::timeout(BACKGROUND_WAIT, tier.quiet()).await;
            }
            if let Err(e) = write.await {
                match e.into() {
                    WriteError::Store(e) => {
                        tier.failed(&e);
                    }
                    WriteError::Other(e) => tracing::warn!("writing to the shared cache: {e}"),
                }
            }
            drop(permit);
            if result {
                tier.pending_results.fetch_sub(1, Ordering::AcqRel);
            }
            tier.pending.fetch_sub(1, Ordering::AcqRel);
            tier.idle.notify_waiters();
        });
    }

    /// Note a build running on the node until the guard is dropped: background writes wait
    /// (up to half a minute) until no build runs.
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        BusyGuard(self.clone())
    }

    async fn quiet(&self) {
        loop {
            let quiet = self.quiet.notified();
            if self.busy.load(Ordering::Acquire) == 0 {
                return;
            }
            quiet.await;
        }
    }

    /// Wait until every write queued so far has ended (before a node exits).
    pub async fn flush(&self) {
        self.wait_for(&self.pending).await
    }

    /// Wait until every step result queued so far is written (before a build that pushes or
    /// saves reports done); base image blobs and marks of use may still be going up.
    pub async fn flush_results(&self) {
        self.wait_for(&self.pending_results).await
    }

    async fn wait_for(&self, pending: &AtomicUsize) {
        loop {
            let idle = self.idle.notified();
            if pending.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Mark entry `key` of project `ns` as used now (its object rewritten, so the store's
    /// time of it is its last use), at most once a [`TOUCH_EVERY`] per node: collection
    /// keeps what builds use. Queued behind the build.
    pub async fn touch(self: &Arc<Self>, ns: &str, key: &str) {
        let id = Self::missing_key(ns, key);
        {
            let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if touched.get(&id).is_some_and(|t| now.duration_since(*t) < TOUCH_EVERY) {
                return;
            }
            if touched.len() >= TOUCHED_KEPT {
                // What is older than a day would be marked again anyway.
                touched.retain(|_, t| now.duration_since(*t) < TOUCH_EVERY);
            }
            touched.insert(id, now);
        }
        let (tier, path) = (self.clone(), self.store.entry_path(ns, key));
        self.write_behind_background(async move {
            let old = match tier.store.store.head(&path).await {
                Ok(meta) => meta,
                Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(SharedError::from(e)),
            };
            let age = chrono::Utc::now().signed_duration_since(old.last_modified);
            if age.to_std().is_ok_and(|a| a < TOUCH_EVERY) {
                return Ok(());
            }
            let bytes = tier.store.store.get(&path).await?.bytes().await?;
            tier.requests.entry_puts.fetch_add(1, Ordering::Relaxed);
            tier.store.store.put(&path, PutPayload::from(bytes)).await?;
            Ok(())
        })
        .await;
    }

    /// The entries of project `ns` (newest use first) with their store times; entries that
    /// do not parse are left out.
    async fn entries(&self, ns: &str) -> Result<Vec<(object_store::ObjectMeta, Entry)>, SharedError> {
        let prefix = self.store.path(["ac", ns]);
        let metas: Vec<object_store::ObjectMeta> = self.store.store.list(Some(&prefix)).try_collect().await?;
        let read: Vec<Result<Option<(object_store::ObjectMeta, Entry)>, SharedError>> = futures::stream::iter(metas)
            .map(|m| async move {
                self.requests.entry_gets.fetch_add(1, Ordering::Relaxed);
                let bytes = match self.store.store.get(&m.location).await {
                    Ok(r) => r.bytes().await?,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                Ok(serde_json::from_slice::<Entry>(&bytes).ok().map(|e| (m, e)))
            })
            .buffer_unordered(LOOKUP_PARALLEL)
            .collect()
            .await;
        let mut out: Vec<_> = read.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().flatten().collect();
        out.sort_by_key(|(m, _)| std::cmp::Reverse(m.last_modified));
        Ok(out)
    }

    /// Project `ns`'s share of the store: its entries and the distinct blobs they name.
    pub async fn usage(&self, ns: &str) -> Result<SharedUsage, SharedError> {
        let mut u = SharedUsage::default();
        for (_, e) in self.entries(ns).await? {
            u.entries += 1;
            if let Some(b) = e.blob {
                u.blobs.insert(b.digest, b.size);
            }
        }
        Ok(u)
    }

    /// Bring project `ns` under `limit` bytes of blobs in the store: its least recently used
    /// entries go first; then blobs no entry of any project names and older than `grace`
    /// (an upload whose entry is not written yet, or that started during collection, stays).
    pub async fn collect(&self, ns: &str, limit: u64, grace: Duration) -> Result<SharedCollected, SharedError> {
        let started = chrono::Utc::now();
        let mut out = SharedCollected::default();
        let mut kept = SharedUsage::default();
        let mut doomed = Vec::new();
        for (meta, e) in self.entries(ns).await? {
            let extra = e.blob.as_ref().filter(|b| !kept.blobs.contains_key(&b.digest)).map_or(0, |b| b.size);
            if kept.bytes() + extra <= limit {
                kept.entries += 1;
                if let Some(b) = e.blob {
                    kept.blobs.insert(b.digest, b.size);
                }
            } else {
                doomed.push(meta.location);
            }
        }
        out.entries = doomed.len() as u64;
        self.delete_all(doomed).await?;
        out.freed_bytes = self.sweep_blobs(started, grace).await?;
        Ok(out)
    }

    /// Remove every entry of project `ns` (their blobs go with the next sweep of any
    /// collection, when no other project names them); returns how many.
    pub async fn reset(&self, ns: &str) -> Result<u64, SharedError> {
        let prefix = self.store.path(["ac", ns]);
        let metas: Vec<object_store::ObjectMeta> = self.store.store.list(Some(&prefix)).try_collect().await?;
        let n = metas.len() as u64;
        self.delete_all(metas.into_iter().map(|m| m.location).collect()).await?;
        Ok(n)
    }

    async fn delete_all(&self, paths: Vec<StorePath>) -> Result<(), SharedError> {
        // Blobs seen before may be among them.
        self.present.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let stream = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
        let deleted: Vec<_> = self.store.store.delete_stream(stream).collect().await;
        for d in deleted {
            match d {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Delete blobs that no entry names and that were written before `started - grace`;
    /// returns their bytes.
    async fn sweep_blobs(&self, started: chrono::DateTime<chrono::Utc>, grace: Duration) -> Result<u64, SharedError> {
        let mut named = std::collections::HashSet::new();
        let projects = self.store.store.list_with_delimiter(Some(&self.store.path(["ac"]))).await?;
        for p in projects.common_prefixes {
            let Some(ns) = p.filename() else { continue };
            for (_, e) in self.entries(ns).await? {
                if let Some(b) = e.blob {
                    named.insert(b.digest.hex().to_string());
                }
            }
        }
        let cutoff = started - chrono::Duration::from_std(grace).unwrap_or_default();
        let blobs: Vec<object_store::ObjectMeta> = self.store.store.list(Some(&self.store.path(["cas"]))).try_collect().await?;
        let mut freed = 0;
        let mut doomed = Vec::new();
        for b in blobs {
            let unnamed = b.location.filename().is_some_and(|hex| !named.contains(hex));
            if unnamed && b.last_modified < cutoff {
                freed += b.size;
                doomed.push(b.location);
            }
        }
        self.delete_all(doomed).await?;
        Ok(freed)
    }
}

/// How often a node marks an entry it uses as used.
pub const TOUCH_EVERY: Duration = Duration::from_secs(24 * 3600);
/// How many keys' marks a node remembers before it forgets those older than a day.
const TOUCHED_KEPT: usize = 100_000;

/// A project's share of the shared tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedUsage {
    /// Entries (step results).
    pub entries: u64,
    /// Distinct blobs the entries name, with their sizes.
    pub blobs: std::collections::BTreeMap<Digest, u64>,
}

impl SharedUsage {
    /// Bytes of the blobs.
    pub fn bytes(&self) -> u64 {
        self.blobs.values().sum()
    }
}

/// What a collection of the shared tier removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedCollected {
    /// Entries removed.
    pub entries: u64,
    /// Bytes of the blobs removed.
    pub freed_bytes: u64,
}

/// Why a write behind a build failed: the store (back off), or the local side.
#[derive(Debug)]
pub enum WriteError {
    /// The store failed.
    Store(SharedError),
    /// Something else (making the blob, reading it).
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl From<SharedError> for WriteError {
    fn from(e: SharedError) -> WriteError {
        match e {
            SharedError::Store(_) => WriteError::Store(e),
            other => WriteError::Other(Box::new(other)),
        }
    }
}

impl From<crate::EngineError> for WriteError {
    fn from(e: crate::EngineError) -> WriteError {
        WriteError::Other(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use std::sync::atomic::AtomicBool;

    fn tier() -> (SharedTier, tempfile::TempDir, ContentStore) {
        let dir = tempfile::tempdir().unwrap();
        let content = ContentStore::open(dir.path().join("content")).unwrap();
        (SharedTier::new(SharedStore::new(Arc::new(InMemory::new()), "team/cache", "memory://")), dir, content)
    }

    #[test]
    fn objects_live_under_the_prefix_and_names_are_escaped() {
        let (t, _d, _c) = tier();
        let d = Digest::of(b"x");
        assert_eq!(t.store().blob_path(&d).to_string(), format!("team/cache/cas/sha256/{}", d.hex()));
        assert_eq!(t.store().entry_path("web", "abc").to_string(), "team/cache/ac/web/abc");
        let odd = t.store().entry_path("a/b", "k").to_string();
        assert!(!odd.contains("ac/a/b/"), "a project name cannot reach another's folder: {odd}");
    }

    #[tokio::test]
    async fn an_entry_counts_only_while_its_blob_exists_and_misses_are_not_asked_again_at_once() {
        let (t, _d, content) = tier();
        let bytes = b"compressed layer";
        let digest = content.put(bytes).unwrap();
        let blob = BlobDesc { digest: digest.clone(), size: bytes.len() as u64, media_type: "gzip".into() };
        let entry = Entry { diff_id: Some(Digest::of(b"tar")), blob: Some(blob.clone()), created: 7, size: 3 };
        t.put_blob(&blob, &content).await.unwrap();
        t.put_entry("web", "k1", &entry).await.unwrap();
        t.put_entry("web", "k2", &Entry { diff_id: None, blob: None, created: 8, size: 0 }).await.unwrap();
        let keys = ["k1", "k2", "k3"].map(String::from);
        let found = t.lookup("web", &keys, &|_| false).await;
        assert_eq!(found.hits.len(), 2);
        assert_eq!(found.hits["k1"], entry);
        assert!(found.failed.is_none());
        assert!(t.lookup("other", &keys, &|_| false).await.hits.is_empty(), "projects are separate");

        // k3 was missing a moment ago: not asked for again.
        let before = t.requests.entry_gets.load(Ordering::Relaxed);
        t.lookup("web", &["k3".to_string()], &|_| false).await;
        assert_eq!(t.requests.entry_gets.load(Ordering::Relaxed), before);

        // The blob goes (collection, a lost upload): the entry is a miss.
        t.store().store().delete(&t.store().blob_path(&digest)).await.unwrap();
        let found = t.lookup("web", &keys[..1], &|_| false).await;
        assert!(found.hits.is_empty());
        // ... unless this node has the layer itself.
        let found = t.lookup("web", &keys[..1], &|_| true).await;
        assert!(found.hits.is_empty(), "k1 is in the negative cache now");

        // Fetching checks the digest.
        t.put_blob(&blob, &content).await.unwrap();
        let other = tempfile::tempdir().unwrap();
        let other = ContentStore::open(other.path()).unwrap();
        t.fetch_blob(&blob, &other).await.unwrap();
        assert_eq!(other.read(&digest).unwrap(), bytes);
        let lie = BlobDesc { digest: Digest::of(b"else"), ..blob.clone() };
        t.store().store().put(&t.store().blob_path(&lie.digest), PutPayload::from_static(b"not it")).await.unwrap();
        assert!(matches!(t.fetch_blob(&lie, &other).await, Err(SharedError::Blob { .. })));
        assert!(!other.contains(&lie.digest));
    }

    #[tokio::test]
    async fn a_blob_already_in_the_store_is_not_uploaded_again() {
        let (t, _d, content) = tier();
        let digest = content.put(b"abc").unwrap();
        let blob = BlobDesc { digest, size: 3, media_type: "gzip".into() };
        t.put_blob(&blob, &content).await.unwrap();
        t.put_blob(&blob, &content).await.unwrap();
        assert_eq!(t.requests.blob_puts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn large_blobs_go_up_in_parts() {
        let (t, _d, content) = tier();
        let big: Vec<u8> = (0..(SINGLE_PUT + 5 * 1024 * 1024)).map(|i| (i % 251) as u8).collect();
        let digest = content.put(&big).unwrap();
        let blob = BlobDesc { digest: digest.clone(), size: big.len() as u64, media_type: "gzip".into() };
        t.put_blob(&blob, &content).await.unwrap();
        let got = t.store().store().get(&t.store().blob_path(&digest)).await.unwrap().bytes().await.unwrap();
        assert_eq!(Digest::of(&got), digest);
    }

    #[tokio::test]
    async fn collection_keeps_the_recently_used_and_blobs_that_are_named_or_new() {
        let (t, _d, content) = tier();
        let mut blobs = Vec::new();
        for (i, key) in ["old", "mid", "new"].iter().enumerate() {
            let bytes = vec![i as u8; 100];
            let digest = content.put(&bytes).unwrap();
            let blob = BlobDesc { digest, size: 100, media_type: "gzip".into() };
            t.put_blob(&blob, &content).await.unwrap();
            t.put_entry("web", key, &Entry { diff_id: Some(Digest::of(&bytes)), blob: Some(blob.clone()), created: 1, size: 100 })
                .await
                .unwrap();
            blobs.push(blob);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Another project names the oldest blob too.
        t.put_entry("api", "k", &Entry { diff_id: None, blob: Some(blobs[0].clone()), created: 1, size: 100 }).await.unwrap();
        // "mid" was used lately: it is newer than "new" now.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mid = t.store().entry_path("web", "mid");
        let bytes = t.store().store().get(&mid).await.unwrap().bytes().await.unwrap();
        t.store().store().put(&mid, PutPayload::from(bytes)).await.unwrap();
        assert_eq!(t.usage("web").await.unwrap().bytes(), 300);

        let done = t.collect("web", 200, Duration::ZERO).await.unwrap();
        assert_eq!(done.entries, 1);
        let u = t.usage("web").await.unwrap();
        assert_eq!((u.entries, u.bytes()), (2, 200));
        let found = t.lookup("web", &["old", "mid", "new"].map(String::from), &|_| false).await;
        assert!(found.hits.contains_key("mid") && found.hits.contains_key("new") && !found.hits.contains_key("old"));
        assert!(t.has_blob(&blobs[0].digest).await.unwrap(), "another project names it");

        // A blob nobody names goes, unless it is younger than the grace period (an upload
        // whose entry comes next).
        let orphan = BlobDesc { digest: content.put(b"orphan").unwrap(), size: 6, media_type: "gzip".into() };
        t.put_blob(&orphan, &content).await.unwrap();
        t.collect("web", 200, Duration::from_secs(3600)).await.unwrap();
        assert!(t.has_blob(&orphan.digest).await.unwrap(), "within the grace period");
        assert_eq!(t.reset("api").await.unwrap(), 1);
        let done = t.collect("web", 200, Duration::ZERO).await.unwrap();
        assert_eq!(done.freed_bytes, 106, "the orphan and the blob no project names any more");
        assert!(!t.has_blob(&blobs[0].digest).await.unwrap());
        assert!(t.has_blob(&blobs[2].digest).await.unwrap());
    }

    #[tokio::test]
    async fn an_entry_used_is_marked_at_most_daily_so_its_store_time_is_its_last_use() {
        let dir = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let t = Arc::new(SharedTier::new(SharedStore::new(Arc::new(fs), "", "file://")));
        t.put_entry("web", "old", &Entry { diff_id: None, blob: None, created: 1, size: 0 }).await.unwrap();
        let file = dir.path().join("ac/web/old");
        let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(two_days_ago).unwrap();
        t.touch("web", "old").await;
        t.flush().await;
        let marked = std::fs::metadata(&file).unwrap().modified().unwrap();
        assert!(marked > two_days_ago + Duration::from_secs(24 * 3600), "rewritten: its time is now");
        // Marked again within the day: nothing is asked of the store.
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(two_days_ago).unwrap();
        let puts = t.requests.entry_puts.load(Ordering::Relaxed);
        t.touch("web", "old").await;
        t.flush().await;
        assert_eq!(t.requests.entry_puts.load(Ordering::Relaxed), puts);
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), two_days_ago);
    }

    #[tokio::test]
    async fn flush_waits_for_every_queued_write() {
        let (t, _d, _c) = tier();
        let t = Arc::new(t);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        t.write_behind(async move {
            let _ = rx.await;
            Ok::<_, SharedError>(())
        })
        .await;
        let flushed = tokio::spawn({
            let t = t.clone();
            async move { t.flush().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!flushed.is_finished(), "a write is still queued");
        // A build waits for results only: a background write (a base image's blob) does not
        // hold it, but a node's exit waits for it too.
        let (btx, brx) = tokio::sync::oneshot::channel::<()>();
        t.write_behind_background(async move {
            let _ = brx.await;
            Ok::<_, SharedError>(())
        })
        .await;
        let results = tokio::spawn({
            let t = t.clone();
            async move { t.flush_results().await }
        });
        // A background write waits while a build runs.
        let busy = t.busy();
        let started = Arc::new(AtomicBool::new(false));
        t.write_behind_background({
            let started = started.clone();
            async move {
                started.store(true, Ordering::SeqCst);
                Ok::<_, SharedError>(())
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!started.load(Ordering::SeqCst), "it waits for the build");
        drop(busy);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(started.load(Ordering::SeqCst), "and goes when it ends");
        tx.send(()).unwrap();
        results.await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!flushed.is_finished(), "the background write is still queued");
        btx.send(()).unwrap();
        flushed.await.unwrap();
    }
}
