//! Export sessions and saved results: images a build (`--load`) or `hoist pull` exported
//! for one client, kept on the builder — with a GC lease on their layers — while the client
//! reads their blobs with `ReadBlob`; and `--save`, which keeps a result for the project.
//!
//! A session belongs to the project that opened it and names exactly the blobs of its
//! images: a blob outside that set, or a session of another project, is "not found", so a
//! project can never read another project's blobs by guessing digests or session ids.
//!
//! Uncompressed exports (for a client on the builder's machine) write no blob: a new
//! layer's plain tar is its diff_id, and its bytes are streamed from the snapshot when the
//! client reads them, so a first `--load` of a big layer costs one pass over its files, not
//! a copy of the layer into the content store. Base layers keep their original blobs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hoist_engine::cache::{SavedImage, SavedRecord};
use hoist_engine::export::ExportedSet;
use hoist_engine::gc::LeaseSet;
use hoist_engine::graph::Platform;
use hoist_engine::{BuiltImage, Engine};
use hoist_oci::compress::Compression;
use hoist_oci::digest::Digest;
use hoist_oci::image::{media, Descriptor, ImageConfig};
use hoist_oci::layer::{write_layer_tar, TarOptions};
use hoist_proto::v1;

/// Errors of export sessions and saved results.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export session {0:?} does not exist (it expired or was released); run the command again")]
    NoSession(String),
    #[error("blob {digest} is not part of export session {session}")]
    NotInSession { session: String, digest: String },
    #[error("project {project:?} has {limit} export sessions open; wait for them to finish or expire")]
    TooMany { project: String, limit: usize },
    #[error("no saved image {0:?} in this project (save one with `hoist build --save -t NAME`)")]
    NoSaved(String),
    #[error("saved image {name:?}: {message}")]
    SavedBroken { name: String, message: String },
    #[error("{0}")]
    Store(String),
    #[error("layer {digest}: {message}")]
    Layer { digest: String, message: String },
}

/// How long a session lives without a read.
pub const IDLE: Duration = Duration::from_secs(600);
/// Sessions one project may hold at once.
pub const MAX_PER_PROJECT: usize = 64;

/// Where a blob of a session comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobSource {
    /// The content store.
    Store,
    /// The plain tar of this layer directory, made while it is read.
    Snapshot(PathBuf),
}

/// One export: its project, the blobs it may serve (digest → size and source), and the
/// lease that keeps its layers from garbage collection.
pub struct Session {
    pub project: String,
    /// The token that opened it: the session ends when that token is revoked.
    pub token_id: Option<String>,
    /// Cancelled when the session is revoked; reads in progress stop.
    pub revoked: tokio_util::sync::CancellationToken,
    pub blobs: HashMap<Digest, (u64, BlobSource)>,
    last_used: Mutex<Instant>,
    _lease: LeaseSet,
}

impl Session {
    /// Note a use (reads keep a session alive).
    pub fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_used.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

/// The builder's open export sessions.
#[derive(Default)]
pub struct Exports {
    map: Mutex<HashMap<String, Arc<Session>>>,
}

/// A random 128-bit id, hex.
fn random_id() -> String {
    hoist_oci::random::hex(16)
}

impl Exports {
    /// Open a session over `set` for `project`, leasing every layer of `images`; blobs in
    /// `snapshots` are streamed from their layer directories.
    pub fn open(
        &self,
        engine: &Engine,
        project: &str,
        token_id: Option<&str>,
        images: &[BuiltImage],
        set: &ExportedSet,
        snapshots: &HashMap<Digest, PathBuf>,
    ) -> Result<v1::ExportSession, ExportError> {
        self.reap();
        let lease = engine.lease_set();
        for img in images {
            for d in img.diff_ids() {
                lease.add(d);
            }
        }
        let mut blobs = HashMap::new();
        let mut documents = Vec::new();
        let mut manifests = Vec::new();
        for img in &set.images {
            blobs.insert(img.config_digest.clone(), (img.config_size, BlobSource::Store));
            for l in &img.manifest.layers {
                let source = snapshots.get(&l.digest).map(|d| BlobSource::Snapshot(d.clone())).unwrap_or(BlobSource::Store);
                blobs.insert(l.digest.clone(), (l.size, source));
            }
            let config = engine.store().read(&img.config_digest).map_err(|e| ExportError::Store(e.to_string()))?;
            documents.push(v1::ExportDocument {
                digest: img.config_digest.to_string(),
                media_type: media::OCI_CONFIG.into(),
                data: config,
            });
            documents.push(v1::ExportDocument {
                digest: img.manifest_digest.to_string(),
                media_type: media::OCI_MANIFEST.into(),
                data: img.manifest_bytes.clone(),
            });
            manifests.push(manifest_ref(img));
        }
        let (digest, media_type) = match &set.index {
            Some((bytes, d)) => {
                documents.push(v1::ExportDocument { digest: d.to_string(), media_type: media::OCI_INDEX.into(), data: bytes.clone() });
                (d.to_string(), media::OCI_INDEX.to_string())
            }
            None => (set.images[0].manifest_digest.to_string(), media::OCI_MANIFEST.to_string()),
        };
        let id = random_id();
        let session = Arc::new(Session {
            project: project.to_string(),
            token_id: token_id.map(str::to_string),
            revoked: Default::default(),
            blobs,
            last_used: Mutex::new(Instant::now()),
            _lease: lease,
        });
        {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            let open = map.values().filter(|s| s.project == project).count();
            if open >= MAX_PER_PROJECT {
                return Err(ExportError::TooMany { project: project.to_string(), limit: MAX_PER_PROJECT });
            }
            map.insert(id.clone(), session);
        }
        Ok(v1::ExportSession {
            output: 0,
            id,
            digest,
            media_type,
            documents,
            manifests,
            idle_seconds: IDLE.as_secs(),
            build_id: String::new(),
            tags: Vec::new(),
        })
    }

    /// The session `id` of `project`, and the size and source of `digest` in it.
    pub fn blob(&self, project: &str, id: &str, digest: &str) -> Result<(Arc<Session>, Digest, u64, BlobSource), ExportError> {
        self.reap();
        let session = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.get(id).filter(|s| s.project == project).cloned()
        };
        // Another project's session is indistinguishable from a missing one.
        let session = session.ok_or_else(|| ExportError::NoSession(id.to_string()))?;
        let not_in = || ExportError::NotInSession { session: id.to_string(), digest: digest.to_string() };
        let d: Digest = digest.parse().map_err(|_| not_in())?;
        let (size, source) = session.blobs.get(&d).cloned().ok_or_else(not_in)?;
        session.touch();
        Ok((session, d, size, source))
    }

    /// Drop session `id` of `project` (its lease goes once no read holds it).
    pub fn release(&self, project: &str, id: &str) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(id).is_some_and(|s| s.project == project) {
            map.remove(id);
            return true;
        }
        false
    }

    /// End the sessions opened with the tokens in `revoked` (reads in progress stop); returns
    /// how many.
    pub fn revoke(&self, revoked: &std::collections::HashSet<String>) -> usize {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|_, s| {
            let keep = !s.token_id.as_ref().is_some_and(|t| revoked.contains(t));
            if !keep {
                s.revoked.cancel();
            }
            keep
        });
        before - map.len()
    }

    /// Drop sessions idle for longer than [`IDLE`].
    fn reap(&self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.idle_for() < IDLE);
    }

    /// Open sessions (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Export `images` for a client to read: as [`Engine::export_images`] does, except that
/// an uncompressed export stores no new blob — a layer without a stored plain-tar or
/// original blob is served from its snapshot (digest = diff_id, size counted by one pass).
/// Returns the set and the layers to stream from snapshots.
pub async fn export_for_client(
    engine: &Engine,
    images: &[BuiltImage],
    compression: Compression,
    force: bool,
) -> Result<(ExportedSet, HashMap<Digest, PathBuf>), ExportError> {
    let store_err = |e: &dyn std::fmt::Display| ExportError::Store(e.to_string());
    if compression != Compression::Uncompressed || force {
        let set = engine.export_images(images, compression, force).await.map_err(|e| store_err(&e))?;
        return Ok((set, HashMap::new()));
    }
    let mut snapshots = HashMap::new();
    let mut all_layers = Vec::new();
    for img in images {
        let mut layers = Vec::new();
        for d in img.diff_ids() {
            let known = engine.index().layer_blobs(d).map_err(|e| store_err(&e))?;
            let stored = |b: &&hoist_engine::cache::BlobRecord| engine.store().contains(&b.digest);
            let blob = known
                .iter()
                .filter(stored)
                .find(|b| media::oci_layer(&b.media_type) == media::OCI_LAYER)
                .or_else(|| known.iter().filter(stored).find(|b| b.original));
            let (digest, size, media_type) = match blob {
                Some(b) => (b.digest.clone(), b.size, media::oci_layer(&b.media_type).to_string()),
                None => {
                    let dir = engine.snapshots().layer_dir(d);
                    let counted = dir.clone();
                    let size = tokio::task::spawn_blocking(move || write_layer_tar(&counted, std::io::sink(), &TarOptions::default()))
                        .await
                        .map_err(|e| store_err(&e))?
                        .map_err(|e| ExportError::Layer { digest: d.to_string(), message: e.to_string() })?
                        .bytes;
                    snapshots.insert(d.clone(), dir);
                    (d.clone(), size, media::OCI_LAYER.to_string())
                }
            };
            layers.push(Descriptor { media_type, digest, size, platform: None, annotations: None });
        }
        all_layers.push(layers);
    }
    let set = engine.assemble_images(images, all_layers).map_err(|e| store_err(&e))?;
    Ok((set, snapshots))
}

/// A `Write` that drops the first `skip` bytes and hands the rest on in chunks.
pub struct SkipChunks<F: FnMut(Vec<u8>) -> std::io::Result<()>> {
    pub skip: u64,
    pub buf: Vec<u8>,
    pub chunk: usize,
    pub send: F,
    /// Bytes seen (skipped ones included).
    pub seen: u64,
}

impl<F: FnMut(Vec<u8>) -> std::io::Result<()>> SkipChunks<F> {
    /// Send what is buffered.
    pub fn flush_chunk(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let b = std::mem::take(&mut self.buf);
            (self.send)(b)?;
        }
        Ok(())
    }
}

impl<F: FnMut(Vec<u8>) -> std::io::Result<()>> std::io::Write for SkipChunks<F> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let start = self.seen;
        self.seen += data.len() as u64;
        let from = self.skip.saturating_sub(start).min(data.len() as u64) as usize;
        self.buf.extend_from_slice(&data[from..]);
        if self.buf.len() >= self.chunk {
            self.flush_chunk()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The `ManifestRef` of one exported image.
pub fn manifest_ref(img: &hoist_engine::export::ExportedImage) -> v1::ManifestRef {
    v1::ManifestRef {
        platform: img.platform.to_string(),
        digest: img.manifest_digest.to_string(),
        size: img.manifest_bytes.len() as u64,
        media_type: media::OCI_MANIFEST.into(),
        config_digest: img.config_digest.to_string(),
    }
}

/// The images of `images` for `platform` ("" = all): the matching one, else the only one.
pub fn select_platform(images: &[BuiltImage], platform: &str) -> Result<Vec<BuiltImage>, String> {
    if platform.is_empty() {
        return Ok(images.to_vec());
    }
    let want = Platform::parse(platform).map_err(|e| e.to_string())?;
    if let Some(i) = images.iter().find(|i| want.matches(&i.platform)) {
        return Ok(vec![i.clone()]);
    }
    match images {
        [only] => Ok(vec![only.clone()]),
        [] => Err("the build produced no image".into()),
        _ => Err(format!(
            "the build has no image for {want} (it built {})",
            images.iter().map(|i| i.platform.to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Keep `images` as the project's saved result of build `build_id`.
pub fn save(engine: &Engine, project: &str, build_id: &str, tags: &[String], images: &[BuiltImage]) -> Result<SavedRecord, ExportError> {
    let mut layers: Vec<(Digest, u64)> = Vec::new();
    let mut saved = Vec::new();
    for img in images {
        engine.store().put(&img.config_bytes).map_err(|e| ExportError::Store(e.to_string()))?;
        saved.push(SavedImage { platform: img.platform.to_string(), config_digest: img.config_digest.clone() });
        for d in img.diff_ids() {
            if layers.iter().any(|(l, _)| l == d) {
                continue;
            }
            layers.push((d.clone(), layer_size(engine, d)));
        }
    }
    let now = hoist_engine::cache::now();
    let record = SavedRecord { build_id: build_id.to_string(), tags: tags.to_vec(), images: saved, layers, created: now, last_used: now };
    engine.index().put_saved(project, &record).map_err(|e| ExportError::Store(e.to_string()))?;
    Ok(record)
}

/// The uncompressed size of a layer: its plain tar blob when there is one, else the
/// largest blob, else the size of its directory.
fn layer_size(engine: &Engine, d: &Digest) -> u64 {
    let blobs = engine.index().layer_blobs(d).unwrap_or_default();
    if let Some(b) = blobs.iter().find(|b| media::oci_layer(&b.media_type) == media::OCI_LAYER) {
        return b.size;
    }
    match blobs.iter().map(|b| b.size).max() {
        Some(s) => s,
        None => hoist_engine::gc::dir_size(&engine.snapshots().layer_dir(d)),
    }
}

/// The images of a project's saved result `name` (a build id or a tag).
pub fn load_saved(engine: &Engine, project: &str, name: &str) -> Result<(SavedRecord, Vec<BuiltImage>), ExportError> {
    let record = engine
        .index()
        .find_saved(project, name)
        .map_err(|e| ExportError::Store(e.to_string()))?
        .ok_or_else(|| ExportError::NoSaved(name.to_string()))?;
    let broken = |message: String| ExportError::SavedBroken { name: name.to_string(), message };
    let mut images = Vec::new();
    for s in &record.images {
        let bytes = engine.store().read(&s.config_digest).map_err(|e| broken(format!("its config {}: {e}", s.config_digest)))?;
        let config: ImageConfig =
            serde_json::from_slice(&bytes).map_err(|e| broken(format!("its config {} is invalid: {e}", s.config_digest)))?;
        let platform = Platform::parse(&s.platform).map_err(|e| broken(e.to_string()))?;
        images.push(BuiltImage { platform, config, config_bytes: bytes, config_digest: s.config_digest.clone() });
    }
    let _ = engine.index().touch_saved(project, &record.build_id);
    Ok((record, images))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(platform: &str) -> BuiltImage {
        let config: ImageConfig = serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}
        }))
        .unwrap();
        let bytes = serde_json::to_vec(&config).unwrap();
        BuiltImage { platform: Platform::parse(platform).unwrap(), config, config_digest: Digest::of(&bytes), config_bytes: bytes }
    }

    #[test]
    fn skip_chunks_drops_the_offset_and_chunks_the_rest() {
        use std::io::Write;
        let mut got: Vec<Vec<u8>> = Vec::new();
        {
            let mut w = SkipChunks {
                skip: 5,
                buf: Vec::new(),
                chunk: 4,
                send: |b: Vec<u8>| -> std::io::Result<()> {
                    got.push(b);
                    Ok(())
                },
                seen: 0,
            };
            w.write_all(b"abc").unwrap();
            w.write_all(b"defghij").unwrap();
            w.write_all(b"kl").unwrap();
            w.flush_chunk().unwrap();
            assert_eq!(w.seen, 12);
        }
        assert_eq!(got.concat(), b"fghijkl");
        assert!(got.iter().all(|c| !c.is_empty()));
    }

    #[test]
    fn platform_selection_prefers_the_match_then_the_only_image() {
        let both = [image("linux/amd64"), image("linux/arm64")];
        assert_eq!(select_platform(&both, "linux/arm64").unwrap()[0].platform.architecture, "arm64");
        assert_eq!(select_platform(&both, "linux/amd64").unwrap()[0].platform.architecture, "amd64");
        assert_eq!(select_platform(&both, "").unwrap().len(), 2);
        let err = select_platform(&both, "linux/s390x").unwrap_err();
        assert!(err.contains("linux/amd64, linux/arm64"), "{err}");
        assert_eq!(select_platform(&both[1..], "linux/amd64").unwrap()[0].platform.architecture, "arm64", "the only image");
        assert!(select_platform(&both, "bogus").is_err());
    }

    #[test]
    fn sessions_serve_only_their_blobs_to_their_project() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(&hoist_engine::EngineConfig {
            root: dir.path().to_path_buf(),
            runtime: None,
            insecure_registries: vec![],
            limits: Default::default(),
        });
        let engine = match engine {
            Ok(e) => e,
            Err(e) => {
                hoist_oci::testing::needs(&format!("an OCI runtime, for the engine to open ({e})"), false);
                return;
            }
        };
        let img = image("linux/amd64");
        engine.store().put(&img.config_bytes).unwrap();
        let set = futures::executor::block_on(engine.export_images(
            std::slice::from_ref(&img),
            hoist_oci::compress::Compression::Uncompressed,
            false,
        ))
        .unwrap();
        let exports = Exports::default();
        let s = exports.open(&engine, "p1", Some("tok1"), std::slice::from_ref(&img), &set, &HashMap::new()).unwrap();
        assert_eq!(s.documents.len(), 2, "config and manifest travel with the session");
        let cfg = img.config_digest.to_string();
        let (_, d, size, source) = exports.blob("p1", &s.id, &cfg).unwrap();
        assert_eq!((d, size, source), (img.config_digest.clone(), img.config_bytes.len() as u64, BlobSource::Store));
        assert!(matches!(exports.blob("p2", &s.id, &cfg), Err(ExportError::NoSession(_))), "another project");
        let other = Digest::of(b"someone else's layer").to_string();
        assert!(matches!(exports.blob("p1", &s.id, &other), Err(ExportError::NotInSession { .. })), "a guessed digest");
        assert!(matches!(exports.blob("p1", &s.id, "not-a-digest"), Err(ExportError::NotInSession { .. })));
        assert!(!exports.release("p2", &s.id), "another project cannot release it");
        assert!(exports.release("p1", &s.id));
        assert!(matches!(exports.blob("p1", &s.id, &cfg), Err(ExportError::NoSession(_))));
        assert!(exports.is_empty());
        // A revoked token's sessions end, and reads in progress see it.
        let s = exports.open(&engine, "p1", Some("tok1"), std::slice::from_ref(&img), &set, &HashMap::new()).unwrap();
        let other = exports.open(&engine, "p1", Some("tok2"), std::slice::from_ref(&img), &set, &HashMap::new()).unwrap();
        let (held, ..) = exports.blob("p1", &s.id, &cfg).unwrap();
        assert_eq!(exports.revoke(&["tok1".to_string()].into()), 1);
        assert!(held.revoked.is_cancelled());
        assert!(matches!(exports.blob("p1", &s.id, &cfg), Err(ExportError::NoSession(_))));
        assert!(exports.blob("p1", &other.id, &cfg).is_ok(), "another token's session stays");
    }
}
