//! Export sessions: images a build (`--load`) or `hoist pull` exported for one client
//! ([`ClientExport`], made by the engine), kept on the builder — with the engine's lease on
//! their layers — while the client reads their blobs with `ReadBlob`.
//!
//! A session belongs to the project that opened it and names exactly the blobs of its
//! images: a blob outside that set, or a session of another project, is "not found", so a
//! project can never read another project's blobs by guessing digests or session ids.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hoist_engine::export::{ClientExport, ServedBlob};
use hoist_engine::gc::LeaseSet;
use hoist_engine::Engine;
use hoist_oci::digest::Digest;
use hoist_oci::image::media;
use hoist_proto::v1;

/// Errors of export sessions and saved results.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The session id is unknown, expired, released, or another project's.
    #[error("export session {0:?} does not exist (it expired or was released); run the command again")]
    NoSession(String),
    /// A digest that is not one of the session's blobs (or no digest at all).
    #[error("blob {digest} is not part of export session {session}")]
    NotInSession {
        /// The session id.
        session: String,
        /// The digest asked for, as given.
        digest: String,
    },
    /// Opening a session when the project already has [`MAX_PER_PROJECT`] open.
    #[error("project {project:?} has {limit} export sessions open; wait for them to finish or expire")]
    TooMany {
        /// The project.
        project: String,
        /// [`MAX_PER_PROJECT`].
        limit: usize,
    },
    /// An exported image's config could not be read from the content store.
    #[error("reading config {digest} of the export: {message}")]
    Store {
        /// The config blob.
        digest: Digest,
        /// The content store's error.
        message: String,
    },
}

/// How long a session lives without a read.
pub const IDLE: Duration = Duration::from_secs(600);
/// Sessions one project may hold at once.
pub const MAX_PER_PROJECT: usize = 64;

/// One export: its project, the blobs it may serve (digest → size and source), and the
/// lease that keeps its layers from garbage collection.
pub struct Session {
    /// The project that opened it; only it can read or release it.
    pub project: String,
    /// The token that opened it: the session ends when that token is revoked.
    pub token_id: Option<String>,
    /// Cancelled when the session is revoked; reads in progress stop.
    pub revoked: tokio_util::sync::CancellationToken,
    /// The blobs it may serve: digest → size in bytes and where the bytes come from.
    pub blobs: HashMap<Digest, (u64, ServedBlob)>,
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

/// Provisional sessions of an `early` client export (`--load`): each time the build
/// announces final lower layers of the image for `platform`, a session of a provisional
/// image of them ([`Engine::provisional_image`]) is opened and sent as output `output`, so
/// that the client's engine imports them while the build goes on. Only the newest
/// announcement waiting is taken; nothing is sent once `stop` is cancelled (the build
/// ended: the real export follows).
pub(crate) struct EarlyExports {
    /// The engine that built the image.
    pub engine: Engine,
    /// Where sessions are kept.
    pub exports: Arc<Exports>,
    /// The caller's project.
    pub project: String,
    /// The caller's token id.
    pub token_id: Option<String>,
    /// The output's index in the request.
    pub output: u32,
    /// The platform of the export (`None`: any).
    pub platform: Option<hoist_engine::graph::Platform>,
    /// The export's layer compression.
    pub layers: hoist_engine::export::LayerCompression,
}

impl EarlyExports {
    /// Run until `rx` ends or `stop` is cancelled, sending sessions on `tx`.
    pub(crate) async fn run(
        self,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<hoist_engine::EarlyLayers>,
        tx: tokio::sync::mpsc::Sender<Result<v1::BuildEvent, tonic::Status>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let wanted = |e: &hoist_engine::EarlyLayers| self.platform.as_ref().is_none_or(|p| p.matches(&e.platform));
        loop {
            let first = tokio::select! {
                n = rx.recv() => n,
                _ = stop.cancelled() => None,
            };
            let Some(mut next) = first else { return };
            if !wanted(&next) {
                continue;
            }
            while let Ok(n) = rx.try_recv() {
                if wanted(&n) {
                    next = n;
                }
            }
            let session = async {
                let img = self.engine.provisional_image(&next).ok()?;
                let export = self.engine.export_for_client(&[img], self.layers).await.ok()?;
                self.exports.open(&self.engine, &self.project, self.token_id.as_deref(), export).ok()
            };
            let Some(mut session) = session.await else { continue };
            if stop.is_cancelled() {
                self.exports.release(&self.project, &session.id);
                return;
            }
            session.output = self.output;
            session.provisional = true;
            let ev = v1::BuildEvent { event: Some(v1::build_event::Event::Export(session)) };
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
    }
}

/// A random 128-bit id, hex.
fn random_id() -> String {
    hoist_oci::random::hex(16)
}

impl Exports {
    /// Open a session over `export` for `project`; it holds the export's lease.
    pub fn open(
        &self,
        engine: &Engine,
        project: &str,
        token_id: Option<&str>,
        export: ClientExport,
    ) -> Result<v1::ExportSession, ExportError> {
        self.reap();
        let ClientExport { set, blobs, lease } = export;
        let mut documents = Vec::new();
        let mut manifests = Vec::new();
        for img in &set.images {
            let config = engine
                .store()
                .read(&img.config_digest)
                .map_err(|e| ExportError::Store { digest: img.config_digest.clone(), message: e.to_string() })?;
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
            provisional: false,
        })
    }

    /// The session `id` of `project`, and the size and source of `digest` in it.
    pub fn blob(&self, project: &str, id: &str, digest: &str) -> Result<(Arc<Session>, Digest, u64, ServedBlob), ExportError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use hoist_engine::export::LayerCompression;

    #[test]
    fn sessions_serve_only_their_blobs_to_their_project() {
        let t = hoist_engine::testing::TestEngine::new();
        let engine = &t.engine;
        let img = hoist_engine::testing::empty_image("linux/amd64");
        engine.store().put(&img.config_bytes).unwrap();
        let plain = LayerCompression { compression: hoist_oci::compress::Compression::Uncompressed, force: false };
        let export = || futures::executor::block_on(engine.export_for_client(std::slice::from_ref(&img), plain)).unwrap();
        let exports = Exports::default();
        let s = exports.open(engine, "p1", Some("tok1"), export()).unwrap();
        assert_eq!(s.documents.len(), 2, "config and manifest travel with the session");
        let cfg = img.config_digest.to_string();
        let (_, d, size, source) = exports.blob("p1", &s.id, &cfg).unwrap();
        assert_eq!((d, size, source), (img.config_digest.clone(), img.config_bytes.len() as u64, ServedBlob::Store));
        assert!(matches!(exports.blob("p2", &s.id, &cfg), Err(ExportError::NoSession(_))), "another project");
        let other = Digest::of(b"someone else's layer").to_string();
        assert!(matches!(exports.blob("p1", &s.id, &other), Err(ExportError::NotInSession { .. })), "a guessed digest");
        assert!(matches!(exports.blob("p1", &s.id, "not-a-digest"), Err(ExportError::NotInSession { .. })));
        assert!(!exports.release("p2", &s.id), "another project cannot release it");
        assert!(exports.release("p1", &s.id));
        assert!(matches!(exports.blob("p1", &s.id, &cfg), Err(ExportError::NoSession(_))));
        assert!(exports.is_empty());
        // A revoked token's sessions end, and reads in progress see it.
        let s = exports.open(engine, "p1", Some("tok1"), export()).unwrap();
        let other = exports.open(engine, "p1", Some("tok2"), export()).unwrap();
        let (held, ..) = exports.blob("p1", &s.id, &cfg).unwrap();
        assert_eq!(exports.revoke(&["tok1".to_string()].into()), 1);
        assert!(held.revoked.is_cancelled());
        assert!(matches!(exports.blob("p1", &s.id, &cfg), Err(ExportError::NoSession(_))));
        assert!(exports.blob("p1", &other.id, &cfg).is_ok(), "another token's session stays");
    }
}
