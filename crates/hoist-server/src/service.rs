//! The gRPC `Builder` service: context sync, builds with streamed progress, and outputs.

use std::collections::HashMap;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use std::collections::BTreeSet;

use hoist_engine::entitlements::{Entitlement, Entitlements};
use hoist_engine::export::{ExportStream, ExportTarget, Exporter, OutputError};
use hoist_engine::graph::{FrontendOptions, NetworkMode, Platform};
use hoist_engine::progress::{Event, Progress};
use hoist_engine::sshforward::SshForwarder;
use hoist_engine::{BuildRequest, BuildSecrets, BuiltImage, Engine, EngineError};
use hoist_oci::auth::{Credential, Credentials};
use hoist_oci::registry::{RegistryClient, RegistryOptions};
use hoist_proto::v1::{self, build_event, builder_server::Builder};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthError, AuthStore, Caller};
use crate::context::ContextStore;
use crate::exports::{ExportError, Exports};

/// The builder service.
#[derive(Clone)]
pub struct BuilderService {
    engine: Engine,
    contexts: Arc<Mutex<HashMap<String, Arc<ContextStore>>>>,
    insecure_registries: Vec<String>,
    auth: Arc<AuthStore>,
    /// Requests without a token are trusted (the embedded builder's unix socket).
    trusted: bool,
    /// The SHA-256 of the owner token of an embedded builder reached over TCP (the
    /// docker-container builder): a request with it is trusted as on the unix socket.
    owner: Option<String>,
    /// Images exported for clients to read (--load, hoist pull).
    exports: Arc<Exports>,
    /// Platforms announced as native (empty: the host's).
    platforms: Vec<String>,
    /// Entitlements granted to every project (`hoist serve --allow-entitlement`); the
    /// trusted embedded builder grants all.
    entitlements: BTreeSet<Entitlement>,
    /// Running builds: per-project slots, cancellation on revocation.
    running: Arc<crate::running::Running>,
    /// When this node last collected each project's share of the shared store.
    shared_collected: Arc<Mutex<HashMap<String, std::time::Instant>>>,
    /// The web UI's sign-in codes and sessions.
    pub(crate) ui: Arc<crate::ui::Access>,
}

fn auth_status(e: AuthError) -> Status {
    match e {
        AuthError::Missing | AuthError::Invalid | AuthError::Revoked { .. } => Status::unauthenticated(e.to_string()),
        AuthError::WrongProject { .. } | AuthError::NoProject(_) => Status::permission_denied(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// The caller of a request, from its `authorization` and `x-hoist-project` metadata.
fn caller<T>(svc: &BuilderService, req: &Request<T>) -> Result<Caller, Status> {
    let md = req.metadata();
    let token = md.get("authorization").and_then(|v| v.to_str().ok()).map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_string());
    let project = md.get("x-hoist-project").and_then(|v| v.to_str().ok()).map(str::to_string);
    if let (Some(owner), Some(t)) = (&svc.owner, token.as_deref()) {
        if *owner == crate::auth::hash_token(t) {
            return svc.auth.authenticate(None, project.as_deref(), true).map_err(auth_status);
        }
    }
    svc.auth.authenticate(token.as_deref(), project.as_deref(), svc.trusted).map_err(auth_status)
}

impl BuilderService {
    /// A service over `engine`. `trusted`: accept requests without a token (only for the
    /// embedded builder's unix socket, which only its owner can open).
    pub fn new(engine: Engine, insecure_registries: Vec<String>, trusted: bool) -> BuilderService {
        let auth = Arc::new(AuthStore::open(engine.root(), engine.shared().map(|t| t.store())));
        BuilderService {
            engine,
            contexts: Arc::new(Mutex::new(HashMap::new())),
            insecure_registries,
            auth,
            trusted,
            owner: None,
            exports: Arc::default(),
            platforms: Vec::new(),
            entitlements: if trusted { Entitlement::ALL.into() } else { BTreeSet::new() },
            running: Arc::default(),
            shared_collected: Arc::default(),
            ui: Arc::default(),
        }
    }

    /// Announce `platforms` as native in `Info` (empty: the host's).
    pub fn with_platforms(mut self, platforms: Vec<String>) -> BuilderService {
        self.platforms = platforms;
        self
    }

    /// Trust requests that carry `token` as the embedded builder's unix socket is trusted
    /// (any project, every entitlement): the builder of one user reached over TCP, as the
    /// docker-container builder is. Other requests still need a project token.
    pub fn with_owner_token(mut self, token: &str) -> BuilderService {
        self.owner = Some(crate::auth::hash_token(token));
        self.entitlements = Entitlement::ALL.into();
        self
    }

    /// Grant `entitlements` to every project.
    pub fn with_entitlements(mut self, entitlements: BTreeSet<Entitlement>) -> BuilderService {
        self.entitlements.extend(entitlements);
        self
    }

    /// The projects and tokens the service authenticates with.
    pub fn auth(&self) -> &Arc<AuthStore> {
        &self.auth
    }

    /// End what revoked tokens are doing: their running builds are cancelled and their
    /// export sessions closed. Returns how many of each.
    pub fn enforce_revocations(&self) -> (usize, usize) {
        let revoked = self.auth.revoked_ids();
        if revoked.is_empty() {
            return (0, 0);
        }
        (self.running.revoke(&revoked), self.exports.revoke(&revoked))
    }

    fn context_store(&self, project: &str) -> Result<Arc<ContextStore>, Status> {
        let mut map = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(project) {
            return Ok(s.clone());
        }
        let root = self.engine.root().join("contexts").join(project);
        private_dir(&root).map_err(|e| Status::internal(format!("creating {}: {e}", root.display())))?;
        let l = self.engine.limits();
        let limits = crate::context::ContextLimits { max_entries: l.max_context_entries, max_bytes: l.max_context_bytes };
        let store = Arc::new(ContextStore::open(root).map_err(|e| Status::internal(e.to_string()))?.with_limits(limits));
        map.insert(project.to_string(), store.clone());
        Ok(store)
    }
}

impl BuilderService {
    /// A project's build records, newest first (without logs).
    pub(crate) fn builds_of(&self, project: &str, limit: usize) -> Result<Vec<v1::BuildRecord>, Status> {
        let builds = self.engine.index().builds(project, limit).map_err(|e| Status::internal(e.to_string()))?;
        Ok(builds.into_iter().map(record_from_json).collect())
    }

    /// One build record of `project`, with its log and each step's; another project's build
    /// id is simply not found.
    pub(crate) fn build_of(&self, project: &str, id: &str) -> Result<Option<v1::BuildRecord>, Status> {
        let Some(value) = self.engine.index().build(project, id).map_err(|e| Status::internal(e.to_string()))? else {
            return Ok(None);
        };
        let mut rec = record_from_json(value);
        let path = self.engine.root().join("builds").join(project).join(format!("{}.log", rec.id));
        rec.log = std::fs::read_to_string(path).unwrap_or_default();
        crate::records::split_log(&rec.log, &mut rec.steps);
        Ok(Some(rec))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::BuildEvent, Status>> + Send>>;

fn event(e: build_event::Event) -> v1::BuildEvent {
    v1::BuildEvent { event: Some(e) }
}

#[tonic::async_trait]
impl Builder for BuilderService {
    async fn info(&self, req: Request<v1::InfoRequest>) -> Result<Response<v1::InfoReply>, Status> {
        let who = caller(self, &req)?;
        Ok(Response::new(v1::InfoReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            platforms: if self.platforms.is_empty() { vec![Platform::host().to_string()] } else { self.platforms.clone() },
            root: self.engine.root().display().to_string(),
            project: who.project,
        }))
    }

    async fn prepare_context(&self, req: Request<v1::ContextManifest>) -> Result<Response<v1::PrepareContextReply>, Status> {
        let who = caller(self, &req)?;
        let store = self.context_store(&who.project)?;
        let p = store.prepare(req.into_inner()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(v1::PrepareContextReply { context_id: p.id, missing: p.missing, manifest: p.manifest }))
    }

    async fn prepare_known_context(&self, req: Request<v1::KnownManifest>) -> Result<Response<v1::PrepareContextReply>, Status> {
        let who = caller(self, &req)?;
        let store = self.context_store(&who.project)?;
        let m = req.into_inner();
        match store.prepare_known(&m.session, &m.manifest).map_err(|e| Status::invalid_argument(e.to_string()))? {
            Some(p) => Ok(Response::new(v1::PrepareContextReply { context_id: p.id, missing: p.missing, manifest: p.manifest })),
            None => Err(Status::not_found(format!("manifest {} is not kept: send the manifest", m.manifest))),
        }
    }

    async fn upload_blobs(&self, req: Request<Streaming<v1::BlobChunk>>) -> Result<Response<v1::UploadReply>, Status> {
        let who = caller(self, &req)?;
        let store = self.context_store(&who.project)?;
        let mut stream = req.into_inner();
        // The blob being received, and where it goes (`None`: another client delivered it
        // first, so its bytes are read and dropped).
        let mut current: Option<(String, Option<hoist_oci::store::BlobWriter>)> = None;
        let (mut blobs, mut bytes) = (0u64, 0u64);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if current.as_ref().is_some_and(|(d, _)| *d != chunk.digest) {
                return Err(Status::invalid_argument(format!(
                    "blob {} ended without its last chunk",
                    current.map(|c| c.0).unwrap_or_default()
                )));
            }
            if current.is_none() {
                // Only content a prepared context asked for is stored.
                if !store.asked_for(&chunk.digest) {
                    return Err(Status::failed_precondition(format!(
                        "blob {} was not asked for: upload only the digests PrepareContext answered with",
                        chunk.digest
                    )));
                }
                let writer = match store.has_blob(&chunk.digest) {
                    true => None,
                    false => Some(store.blob_writer().map_err(|e| Status::internal(e.to_string()))?),
                };
                current = Some((chunk.digest.clone(), writer));
            }
            if let Some((_, Some(w))) = current.as_mut() {
                w.write_all(&chunk.data).map_err(|e| Status::internal(format!("storing context file {}: {e}", chunk.digest)))?;
            }
            bytes += chunk.data.len() as u64;
            let max = store.limits().max_bytes;
            if bytes > max {
                return Err(Status::invalid_argument(format!(
                    "the upload is larger than the builder accepts for a build context ({max} bytes; hoist serve --max-context-bytes)"
                )));
            }
            if chunk.last {
                if let Some((d, w)) = current.take() {
                    if let Some(w) = w {
                        store.commit_blob(w, &d).map_err(|e| Status::invalid_argument(e.to_string()))?;
                    }
                    blobs += 1;
                }
            }
        }
        if let Some((d, _)) = current {
            return Err(Status::invalid_argument(format!("upload ended in the middle of blob {d}")));
        }
        Ok(Response::new(v1::UploadReply { blobs, bytes }))
    }

    type BuildStream = EventStream;
    type ReadBlobStream = Pin<Box<dyn Stream<Item = Result<v1::BlobData, Status>> + Send>>;

    async fn read_blob(&self, req: Request<v1::ReadBlobRequest>) -> Result<Response<Self::ReadBlobStream>, Status> {
        let who = caller(self, &req)?;
        let req = req.into_inner();
        let (session, digest, size, source) = self.exports.blob(&who.project, &req.session, &req.digest).map_err(export_status)?;
        if req.offset > size {
            return Err(Status::out_of_range(format!("offset {} is past the end of blob {digest} ({size} bytes)", req.offset)));
        }
        let (tx, rx) = mpsc::channel::<Result<v1::BlobData, Status>>(4);
        let revoked = session.revoked.clone();
        let offset = req.offset;
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || {
            // The session (and its lease) lives as long as the read.
            let _session = session;
            let chunk_tx = tx.clone();
            let mut first = true;
            let mut w = ChunkWriter {
                buf: Vec::new(),
                chunk: BLOB_CHUNK,
                send: move |data: Vec<u8>| {
                    let msg = v1::BlobData { data, size: if first { size } else { 0 } };
                    first = false;
                    chunk_tx.blocking_send(Ok(msg)).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
                },
            };
            let r = engine.write_served_blob(&digest, &source, size, offset, &mut w);
            let r = r.and_then(|_| {
                w.flush_chunk()
                    .map_err(|source| hoist_engine::export::ExportError::Io { what: format!("sending blob {digest}"), source }.into())
            });
            if let Err(e) = r {
                let _ = tx.blocking_send(Err(Status::data_loss(bounded_message(e.to_string()))));
            }
        });
        Ok(Response::new(until_revoked(rx, revoked)))
    }

    async fn release_export(&self, req: Request<v1::ReleaseExportRequest>) -> Result<Response<v1::ReleaseExportReply>, Status> {
        let who = caller(self, &req)?;
        self.exports.release(&who.project, &req.into_inner().session);
        Ok(Response::new(v1::ReleaseExportReply {}))
    }

    async fn open_saved(&self, req: Request<v1::OpenSavedRequest>) -> Result<Response<v1::ExportSession>, Status> {
        let who = caller(self, &req)?;
        let req = req.into_inner();
        let layers = crate::outputs::layer_compression(req.compression.as_ref())
            .map_err(|e| Status::invalid_argument(format!("hoist pull: {e}")))?;
        let platform = match req.platform.trim() {
            "" => None,
            p => Some(Platform::parse(p).map_err(|e| Status::invalid_argument(format!("hoist pull --platform: {e}")))?),
        };
        let engine = self.engine.clone();
        let project = who.project.clone();
        let name = req.name.clone();
        let (record, images) = tokio::task::spawn_blocking(move || engine.load_saved(&project, &name))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(engine_status)?;
        let images = hoist_engine::export::select_platform(&images, platform.as_ref()).map_err(|e| engine_status(e.into()))?;
        let export = self.engine.export_for_client(&images, layers).await.map_err(engine_status)?;
        let mut session = self.exports.open(&self.engine, &who.project, who.token_id.as_deref(), export).map_err(export_status)?;
        session.build_id = record.build_id;
        session.tags = record.tags;
        Ok(Response::new(session))
    }

    async fn cache_usage(&self, req: Request<v1::CacheUsageRequest>) -> Result<Response<v1::CacheUsageReply>, Status> {
        let who = caller(self, &req)?;
        Ok(Response::new(self.usage_reply(&who.project, 0).await?))
    }

    async fn cache_prune(&self, req: Request<v1::CachePruneRequest>) -> Result<Response<v1::CacheUsageReply>, Status> {
        let who = caller(self, &req)?;
        let keep = req.into_inner().keep_bytes;
        let freed = self.collect(&who.project, keep).await?;
        let shared_freed = match self.engine.shared() {
            Some(t) => t.collect(&who.project, keep, SHARED_GRACE).await.map_err(|e| engine_status(e.into()))?.freed_bytes,
            None => 0,
        };
        let mut reply = self.usage_reply(&who.project, freed).await?;
        reply.shared_freed_bytes = shared_freed;
        Ok(Response::new(reply))
    }

    async fn cache_reset(&self, req: Request<v1::CacheUsageRequest>) -> Result<Response<v1::CacheUsageReply>, Status> {
        let who = caller(self, &req)?;
        let store = self.context_store(&who.project)?;
        let context_bytes = store.size();
        store.reset().map_err(|e| Status::internal(e.to_string()))?;
        let engine = self.engine.clone();
        let project = who.project.clone();
        let freed = tokio::task::spawn_blocking(move || engine.reset(&project))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(engine_status)?;
        if let Some(t) = self.engine.shared() {
            t.reset(&who.project).await.map_err(|e| engine_status(e.into()))?;
        }
        Ok(Response::new(self.usage_reply(&who.project, freed + context_bytes).await?))
    }

    async fn list_builds(&self, req: Request<v1::ListBuildsRequest>) -> Result<Response<v1::ListBuildsReply>, Status> {
        let who = caller(self, &req)?;
        let limit = match req.into_inner().limit {
            0 => 50,
            n => n as usize,
        };
        Ok(Response::new(v1::ListBuildsReply { builds: self.builds_of(&who.project, limit)? }))
    }

    async fn get_build(&self, req: Request<v1::GetBuildRequest>) -> Result<Response<v1::BuildRecord>, Status> {
        let who = caller(self, &req)?;
        let id = req.into_inner().id;
        let rec =
            self.build_of(&who.project, &id)?.ok_or_else(|| Status::not_found(format!("no build {id:?} in project {:?}", who.project)))?;
        Ok(Response::new(rec))
    }

    async fn open_ui(&self, req: Request<v1::OpenUiRequest>) -> Result<Response<v1::OpenUiReply>, Status> {
        let who = caller(self, &req)?;
        let build_id = req.into_inner().build_id;
        if !build_id.is_empty() && self.build_of(&who.project, &build_id)?.is_none() {
            return Err(Status::not_found(format!("no build {build_id:?} in project {:?}", who.project)));
        }
        let code = self.ui.new_code(&who, &build_id, std::time::Instant::now());
        Ok(Response::new(v1::OpenUiReply {
            path: format!("/ui/signin?code={code}"),
            base: self.ui.base().unwrap_or_default(),
            valid_seconds: crate::ui::CODE_TTL.as_secs() as u32,
        }))
    }

    async fn build(&self, req: Request<Streaming<v1::BuildClientMessage>>) -> Result<Response<Self::BuildStream>, Status> {
        let who = caller(self, &req)?;
        let mut incoming = req.into_inner();
        let req = match incoming.message().await? {
            Some(v1::BuildClientMessage { msg: Some(v1::build_client_message::Msg::Request(r)) }) => r,
            _ => return Err(Status::invalid_argument("a build stream must start with its BuildRequest")),
        };
        let (tx, rx) = mpsc::channel::<Result<v1::BuildEvent, Status>>(EVENT_QUEUE);
        let svc = self.clone();
        let cancel = CancellationToken::new();
        // The client going away (stream dropped) cancels the build. The watcher's sender
        // must not outlive the build, or the stream would never end.
        let watch_tx = tx.clone();
        let watch_cancel = cancel.clone();
        let done = CancellationToken::new();
        let watch_done = done.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = watch_tx.closed() => watch_cancel.cancel(),
                _ = watch_done.cancelled() => {}
            }
        });
        // What the client sends after the request: its ends of agent connections, and the
        // context paths the builder asked it for.
        let session = Arc::new(ClientSession {
            ssh: Arc::new(crate::ssh::SshRelay::new(tx.clone())),
            context: std::sync::OnceLock::new(),
            credentials: Arc::new(crate::credentials::CredentialRequests::new(tx.clone())),
        });
        let dispatch_session = session.clone();
        let dispatch = tokio::spawn(async move {
            while let Ok(Some(m)) = incoming.message().await {
                match m.msg {
                    Some(v1::build_client_message::Msg::Ssh(f)) => dispatch_session.ssh.deliver(f).await,
                    Some(v1::build_client_message::Msg::Context(r)) => {
                        if let Some(c) = dispatch_session.context.get() {
                            c.deliver(r);
                        }
                    }
                    Some(v1::build_client_message::Msg::Credential(r)) => dispatch_session.credentials.deliver(r),
                    _ => {}
                }
            }
        });
        tokio::spawn(async move {
            let result = svc.run_build(&who, req, tx.clone(), cancel, session.clone()).await;
            session.close();
            dispatch.abort();
            done.cancel();
            match result {
                Ok(r) => {
                    let _ = tx.send(Ok(event(build_event::Event::Result(r)))).await;
                }
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Blobs in the shared store younger than this are never collected: an upload whose entry
/// is still to come, or that started during a collection.
pub const SHARED_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);
/// How often one node collects a project's share of the shared store after its builds.
const SHARED_COLLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether a build of `project` now should start a collection of its share of the shared
/// store (`last`: when this node last did, per project). The first build of a project on
/// this node starts the clock: a node that lives for a few builds (a CI burst) leaves
/// collection to the long-lived ones.
fn collection_due(last: &mut HashMap<String, std::time::Instant>, project: &str, now: std::time::Instant) -> bool {
    match last.get(project) {
        Some(t) if now.duration_since(*t) < SHARED_COLLECT_EVERY => false,
        Some(_) => {
            last.insert(project.to_string(), now);
            true
        }
        None => {
            last.insert(project.to_string(), now);
            false
        }
    }
}

impl BuilderService {
    /// Keep `project` under its limit in the shared store too: in the background, once an
    /// hour of builds per node (a collection reads every entry).
    fn collect_shared_now_and_then(&self, project: &str) {
        let Some(tier) = self.engine.shared().cloned() else { return };
        let mut last = self.shared_collected.lock().unwrap_or_else(|e| e.into_inner());
        if !collection_due(&mut last, project, std::time::Instant::now()) {
            return;
        }
        drop(last);
        let (project, limit) = (project.to_string(), self.auth.limit_of(project));
        tokio::spawn(async move {
            match tier.collect(&project, limit, SHARED_GRACE).await {
                Ok(c) if c.entries > 0 => {
                    tracing::info!("shared store: project {project}: removed {} entries, {} bytes", c.entries, c.freed_bytes)
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("collecting project {project} in the shared store: {e}"),
            }
        });
    }

    pub(crate) async fn usage_reply(&self, project: &str, freed: u64) -> Result<v1::CacheUsageReply, Status> {
        let store = self.context_store(project)?;
        let engine = self.engine.clone();
        let p = project.to_string();
        let (u, builds, log_bytes, context_bytes, sessions) = tokio::task::spawn_blocking(move || {
            let u = engine.usage(&p)?;
            let builds = build_items(&engine, &p);
            let log_bytes = builds.iter().map(|(_, r)| r.bytes).sum::<u64>();
            Ok::<_, EngineError>((u, builds.len() as u64, log_bytes, store.size(), store.sessions().len() as u64))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(engine_status)?;
        let shared = match self.engine.shared() {
            Some(t) => Some((t.store().name().to_string(), t.usage(project).await.map_err(|e| engine_status(e.into()))?)),
            None => None,
        };
        Ok(v1::CacheUsageReply {
            project: project.to_string(),
            layers: u.layers,
            layer_bytes: u.layer_bytes,
            context_bytes,
            cache_mount_bytes: u.cache_mount_bytes,
            records: u.records,
            freed_bytes: freed,
            limit_bytes: self.auth.limit_of(project),
            context_sessions: sessions,
            build_records: builds,
            build_log_bytes: log_bytes,
            total_bytes: u.layer_bytes + u.cache_mount_bytes + context_bytes + log_bytes,
            shared_store: shared.as_ref().map(|(name, _)| name.clone()).unwrap_or_default(),
            shared_entries: shared.as_ref().map_or(0, |(_, u)| u.entries),
            shared_bytes: shared.as_ref().map_or(0, |(_, u)| u.bytes()),
            shared_freed_bytes: 0,
        })
    }

    /// Bring `project` under `limit` bytes: cache records, context sessions, and build
    /// records with their logs go in one least-recently-used order (after each build, and
    /// for `hoist cache prune`). Contexts are left alone while another build of the project
    /// runs (its tree is written from blobs when a step reads it). Returns the bytes freed.
    async fn collect(&self, project: &str, limit: u64) -> Result<u64, Status> {
        let store = self.context_store(project)?;
        let engine = self.engine.clone();
        let contexts_idle = self.running.count(project) == 0;
        let project = project.to_string();
        tokio::task::spawn_blocking(move || {
            enum Item {
                Build(String),
                Session(String),
            }
            let t0 = std::time::Instant::now();
            let ctx_err = |e: crate::context::ContextError| Status::internal(e.to_string());
            let mut freed = 0;
            if contexts_idle {
                freed += store.sweep_blobs().map_err(ctx_err)?;
            }
            let t_sweep = t0.elapsed();
            let mut items = Vec::new();
            let mut reclaim = Vec::new();
            for (id, r) in build_items(&engine, &project) {
                items.push(Item::Build(id));
                reclaim.push(r);
            }
            // Sessions in use (or all, while another build of the project runs) count
            // against the limit but stay.
            for s in store.sessions() {
                items.push(Item::Session(s.name));
                reclaim.push(hoist_engine::gc::Reclaimable { last_used: s.last_used, bytes: s.bytes, pinned: s.busy || !contexts_idle });
            }
            let t_items = t0.elapsed();
            let (f, drop) = engine.collect(&project, limit, &reclaim).map_err(engine_status)?;
            let t_engine = t0.elapsed();
            freed += f;
            let mut builds = Vec::new();
            let mut sessions_removed = false;
            for i in drop {
                match &items[i] {
                    Item::Build(id) => {
                        let _ = std::fs::remove_file(engine.root().join("builds").join(&project).join(format!("{id}.log")));
                        builds.push(id.clone());
                    }
                    Item::Session(name) => {
                        store.remove_session(name).map_err(ctx_err)?;
                        sessions_removed = true;
                    }
                }
            }
            engine.index().remove_builds(&project, &builds).map_err(|e| Status::internal(e.to_string()))?;
            // The blobs of the sessions just removed (none removed: nothing new to free).
            if contexts_idle && sessions_removed {
                freed += store.sweep_blobs().map_err(ctx_err)?;
            }
            tracing::debug!(
                project,
                sweep_micros = t_sweep.as_micros() as u64,
                items_micros = (t_items - t_sweep).as_micros() as u64,
                engine_micros = (t_engine - t_items).as_micros() as u64,
                micros = t0.elapsed().as_micros() as u64,
                "collected"
            );
            Ok(freed)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }
}

/// A project's build records as reclaimable items: (id, last use = start, bytes = its log
/// and record).
fn build_items(engine: &hoist_engine::Engine, project: &str) -> Vec<(String, hoist_engine::gc::Reclaimable)> {
    let dir = engine.root().join("builds").join(project);
    engine
        .index()
        .builds(project, usize::MAX)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| {
            let id = v["id"].as_str()?.to_string();
            let log = std::fs::metadata(dir.join(format!("{id}.log"))).map(|m| m.len()).unwrap_or(0);
            let started = v["started"].as_i64().unwrap_or(0).max(0) as u64;
            Some((id, hoist_engine::gc::Reclaimable { last_used: started, bytes: log + 512, pinned: false }))
        })
        .collect()
}

/// The client's side of one build's stream: its agent connections, and the context paths
/// the builder asks it for.
struct ClientSession {
    ssh: Arc<crate::ssh::SshRelay>,
    context: std::sync::OnceLock<Arc<crate::fetch::ContextRequests>>,
    credentials: Arc<crate::credentials::CredentialRequests>,
}

impl ClientSession {
    /// The build is over: nothing of the session holds the event stream open.
    fn close(&self) {
        self.ssh.close();
        self.credentials.close();
        if let Some(c) = self.context.get() {
            c.close();
        }
    }
}

/// The earlier builds a build's steps are compared with, to tell why they missed the cache.
const PREVIOUS_BUILDS: usize = 50;

/// The id of the first push vertex of the first output (each output's pushes get 1000).
const PUSH_VERTICES: u32 = 20_000;

/// Create `dir` (and missing parents) only root can enter.
fn private_dir(dir: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// A sortable, unique build id: time then randomness.
fn build_id(t: std::time::SystemTime) -> String {
    let ns = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}{}", ns / 1_000_000, hoist_oci::random::hex(3))
}

/// The plain-text log of a build, bounded.
#[derive(Default)]
struct BuildLog {
    text: String,
    names: HashMap<u32, String>,
    /// Per-step facts of the record (issue 17).
    steps: crate::records::StepRecorder,
}

const MAX_LOG: usize = 1 << 20;

impl BuildLog {
    fn add(&mut self, ev: &Event) {
        if self.text.len() > MAX_LOG {
            self.steps.add(ev, 0);
            return;
        }
        let lines = match ev {
            Event::Log { data, .. } => String::from_utf8_lossy(data).lines().count() as u64,
            Event::Key(_) => 0,
            _ => 1,
        };
        self.steps.add(ev, lines);
        match ev {
            Event::Started { id, name } => {
                self.names.insert(*id, name.clone());
                self.text.push_str(&format!("#{id} {name}\n"));
            }
            Event::Completed { id, cached, seconds, error } => {
                let status = match (error, cached) {
                    (Some(e), _) => format!("ERROR: {e}"),
                    (None, true) => "CACHED".into(),
                    (None, false) => format!("DONE {seconds:.1}s"),
                };
                self.text.push_str(&format!("#{id} {status}\n"));
            }
            Event::Log { id, data, .. } => {
                for line in String::from_utf8_lossy(data).lines() {
                    self.text.push_str(&format!("#{id} {line}\n"));
                }
            }
            Event::Warning(w) => self.text.push_str(&format!("WARNING: {w}\n")),
            Event::Key(_) => {}
        }
        if self.text.len() > MAX_LOG {
            self.text.push_str("[log truncated]\n");
        }
    }
}

/// A build record as kept in the index: without its log (kept in a file of its own).
fn record_json(r: &v1::BuildRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("log");
    }
    v
}

fn record_from_json(v: serde_json::Value) -> v1::BuildRecord {
    serde_json::from_value(v).unwrap_or_default()
}

fn parse_network(s: &str) -> Result<NetworkMode, Status> {
    match s {
        "" | "default" | "bridge" => Ok(NetworkMode::Default),
        "host" => Ok(NetworkMode::Host),
        "none" => Ok(NetworkMode::None),
        other => Err(Status::invalid_argument(format!("--network {other:?} is not supported: use default, host or none"))),
    }
}

fn export_status(e: ExportError) -> Status {
    match e {
        ExportError::NoSession(_) | ExportError::NotInSession { .. } => Status::not_found(e.to_string()),
        ExportError::TooMany { .. } => Status::resource_exhausted(e.to_string()),
        ExportError::Store { .. } => Status::internal(e.to_string()),
    }
}

/// A blob read that stops, with an error saying why, when its session is revoked (the
/// reader's token was revoked); dropping the receiver ends the sending thread.
fn until_revoked(
    rx: mpsc::Receiver<Result<v1::BlobData, Status>>,
    revoked: CancellationToken,
) -> Pin<Box<dyn Stream<Item = Result<v1::BlobData, Status>> + Send>> {
    let stop = revoked.clone();
    let data = ReceiverStream::new(rx).take_until(async move { stop.cancelled().await });
    let tail = futures::stream::once(async move { revoked.is_cancelled() })
        .filter_map(|r| async move { r.then(|| Err(Status::permission_denied("the export ended: its token was revoked"))) });
    Box::pin(data.chain(tail))
}

/// Bytes per `BlobData` message.
const BLOB_CHUNK: usize = 1 << 20;

/// What the outputs of a build reported, for its `BuildResult`.
#[derive(Default)]
struct OutputsReport {
    pushes: Vec<v1::PushReport>,
    manifests: Vec<v1::ManifestRef>,
    saved: String,
}

fn engine_status(e: EngineError) -> Status {
    match e.root() {
        EngineError::Cancelled => Status::cancelled("build cancelled"),
        // What the client sent cannot be built: a Dockerfile error, a missing entitlement,
        // context paths the client did not send.
        e @ (EngineError::Frontend(_) | EngineError::Entitlement(_) | EngineError::Context(_)) => {
            Status::invalid_argument(bounded_message(e.to_string()))
        }
        EngineError::Output(o) => {
            let m = bounded_message(o.to_string());
            match o {
                OutputError::NoImage | OutputError::NoImageFor { .. } => Status::failed_precondition(m),
                OutputError::NoSaved(_) => Status::not_found(m),
                OutputError::SavedBroken { .. } => Status::internal(m),
                _ => Status::invalid_argument(m),
            }
        }
        other => Status::aborted(bounded_message(other.to_string())),
    }
}

/// Most bytes of an error message sent in a gRPC status: it travels in HTTP/2 trailers, and
/// a hostile Dockerfile can make a message of hundreds of KiB (its line quoted in full),
/// which the client would refuse as a protocol error instead of showing it.
const MAX_STATUS_MESSAGE: usize = 8 << 10;

fn bounded_message(m: String) -> String {
    if m.len() <= MAX_STATUS_MESSAGE {
        return m;
    }
    let mut cut = MAX_STATUS_MESSAGE;
    while !m.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... [{} more bytes of this message cut]", &m[..cut], m.len() - cut)
}

/// Most bytes of step output held for a client that reads slowly; past it, output is dropped
/// (and the client told how much) instead of piling up in the builder's memory.
const MAX_QUEUED_LOG: usize = 4 << 20;

/// The client's form of an event (a step's key is for the build record only).
fn to_proto(ev: Event) -> Option<build_event::Event> {
    Some(match ev {
        Event::Started { id, name } => build_event::Event::Started(v1::VertexStarted { id, name }),
        Event::Completed { id, cached, seconds, error } => {
            build_event::Event::Completed(v1::VertexCompleted { id, cached, seconds, error: error.unwrap_or_default() })
        }
        Event::Log { id, stream, data } => build_event::Event::Log(v1::VertexLog { id, stream: stream as u32, data: data.to_vec() }),
        Event::Warning(w) => build_event::Event::Warning(w),
        Event::Key(_) => return None,
    })
}

/// Queue the note that `n` bytes of vertex `id`'s output were dropped.
fn push_dropped_marker(queue: &mut std::collections::VecDeque<Event>, queued_log: &mut usize, id: u32, n: u64) {
    let text = format!("\n[hoist: {n} bytes of output dropped: the client did not read them fast enough]\n");
    *queued_log += text.len();
    queue.push_back(Event::Log { id, stream: 2, data: text.into_bytes().into() });
}

/// Forward engine events to the client. The engine's channel is drained at once, so it never
/// grows; events wait in a queue holding at most `max_queued` bytes of step output. Output
/// that does not fit is dropped, and a marker saying how much goes out before the vertex's
/// next output or its completion. Started/completed/warning events are never dropped.
async fn forward_events(
    mut rx: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::Sender<Result<v1::BuildEvent, Status>>,
    log: Arc<Mutex<BuildLog>>,
    max_queued: usize,
) {
    let mut queue: std::collections::VecDeque<Event> = std::collections::VecDeque::new();
    let mut queued_log = 0usize;
    let mut dropped: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    let mut open = true;
    loop {
        if !open {
            // flush what is left of the markers behind the queue
            while let Some((id, n)) = dropped.pop_first() {
                push_dropped_marker(&mut queue, &mut queued_log, id, n);
            }
            if queue.is_empty() {
                break;
            }
        }
        tokio::select! {
            ev = rx.recv(), if open => {
                let Some(ev) = ev else {
                    open = false;
                    continue;
                };
                log.lock().unwrap_or_else(|e| e.into_inner()).add(&ev);
                if matches!(ev, Event::Key(_)) {
                    continue;
                }
                match &ev {
                    Event::Log { id, data, .. } => {
                        if queued_log + data.len() > max_queued {
                            *dropped.entry(*id).or_default() += data.len() as u64;
                            continue;
                        }
                        if let Some(n) = dropped.remove(id) {
                            push_dropped_marker(&mut queue, &mut queued_log, *id, n);
                        }
                        queued_log += data.len();
                    }
                    Event::Completed { id, .. } => {
                        if let Some(n) = dropped.remove(id) {
                            push_dropped_marker(&mut queue, &mut queued_log, *id, n);
                        }
                    }
                    _ => {}
                }
                queue.push_back(ev);
            }
            permit = tx.reserve(), if !queue.is_empty() => {
                let Ok(permit) = permit else {
                    break; // the client went away
                };
                if let Some(ev) = queue.pop_front() {
                    if let Event::Log { data, .. } = &ev {
                        queued_log = queued_log.saturating_sub(data.len());
                    }
                    if let Some(ev) = to_proto(ev) {
                        permit.send(Ok(event(ev)));
                    }
                }
            }
        }
    }
}

/// A `Write` that sends what is written as `OutputData` events (128 KiB chunks), blocking
/// when the client reads slowly.
struct OutputWriter {
    index: u32,
    tx: mpsc::Sender<Result<v1::BuildEvent, Status>>,
    buf: Vec<u8>,
}

const OUTPUT_CHUNK: usize = 128 << 10;

/// Events a build queues for a slow client: with output chunks of [`OUTPUT_CHUNK`], log
/// chunks of at most 32 KiB and agent frames of at most 64 KiB, at most ~4 MiB wait here
/// (besides the [`MAX_QUEUED_LOG`] of step output in the forwarder).
const EVENT_QUEUE: usize = 32;

impl OutputWriter {
    fn send(&mut self, eof: bool) -> io::Result<()> {
        let data = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(Ok(event(build_event::Event::Output(v1::OutputData { output: self.index, data, eof }))))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl ExportStream for OutputWriter {
    fn close(mut self: Box<Self>) -> io::Result<()> {
        self.send(true)
    }
}

impl Write for OutputWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= OUTPUT_CHUNK {
            self.send(false)?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BuilderService {
    /// Run a build and keep its record (and log) for `hoist builds`.
    async fn run_build(
        &self,
        who: &Caller,
        req: v1::BuildRequest,
        tx: mpsc::Sender<Result<v1::BuildEvent, Status>>,
        cancel: CancellationToken,
        session: Arc<ClientSession>,
    ) -> Result<v1::BuildResult, Status> {
        let started = std::time::SystemTime::now();
        let t0 = std::time::Instant::now();
        let id = build_id(started);
        // A project runs at most its limit of builds; the others wait here, and say so.
        let auth = self.auth.clone();
        let project = who.project.clone();
        let queued_tx = tx.clone();
        let slot = self
            .running
            .acquire(
                &id,
                &who.project,
                who.token_id.clone(),
                &cancel,
                || auth.max_builds_of(&project),
                |running, limit| {
                    let _ = queued_tx.try_send(Ok(event(build_event::Event::Queued(v1::BuildQueued { running, limit }))));
                },
            )
            .await;
        let log = Arc::new(Mutex::new(BuildLog { steps: crate::records::StepRecorder::new(t0), ..Default::default() }));
        let mut record = v1::BuildRecord {
            id: id.clone(),
            started: started.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0),
            who: who.who.clone(),
            tags: req.tags.clone(),
            ..Default::default()
        };
        // The web UI shows the build while it runs.
        let live_log = log.clone();
        let _live = self.ui.live(
            &who.project,
            &record,
            Arc::new(move || {
                let log = live_log.lock().unwrap_or_else(|e| e.into_inner());
                (log.steps.live(), log.text.clone())
            }),
        );
        let result = match &slot {
            Some(_) => self.build_inner(who, &id, req, tx, cancel, session, log.clone(), &mut record).await,
            None => Err(Status::cancelled("build cancelled while it waited for a slot")),
        };
        // Cancelled because its token was revoked: say so.
        let result = match result {
            Err(s) if s.code() == tonic::Code::Cancelled && slot.as_ref().is_some_and(|s| s.revoked()) => {
                Err(Status::permission_denied(format!("build cancelled: the token {:?} was revoked", who.who)))
            }
            r => r,
        };
        drop(slot);
        record.seconds = t0.elapsed().as_secs_f64();
        match &result {
            Ok(_) => record.status = "ok".into(),
            Err(s) if s.code() == tonic::Code::Cancelled => record.status = "cancelled".into(),
            Err(s) if s.code() == tonic::Code::PermissionDenied && s.message().starts_with("build cancelled") => {
                record.status = "cancelled".into();
                record.error = s.message().to_string();
            }
            Err(s) => {
                record.status = "failed".into();
                record.error = s.message().to_string();
            }
        }
        // Build insights: why steps missed (against the project's earlier builds, read only
        // when a step ran: a build from the cache has nothing to explain) and the critical path.
        let t_record = std::time::Instant::now();
        record.steps = log.lock().unwrap_or_else(|e| e.into_inner()).steps.steps();
        let missed = record.steps.iter().any(|s| !s.cached && !s.no_cache && !s.cache_key.is_empty());
        let previous = if missed { self.builds_of(&who.project, PREVIOUS_BUILDS).unwrap_or_default() } else { Vec::new() };
        crate::records::finish(&mut record.steps, &previous, &record.dockerfile);
        let compared = t_record.elapsed();
        self.save_record(&who.project, &record, &log.lock().unwrap_or_else(|e| e.into_inner()).text);
        tracing::debug!(
            build = %record.id,
            compare_micros = compared.as_micros() as u64,
            micros = t_record.elapsed().as_micros() as u64,
            "build record written"
        );
        // Automatic GC keeps the project under its limit (also after a failed build: its
        // record, log and context count too).
        if let Err(e) = self.collect(&who.project, self.auth.limit_of(&who.project)).await {
            tracing::warn!("collecting project {}: {}", who.project, e.message());
        }
        self.collect_shared_now_and_then(&who.project);
        // The project's storage after the build and its collection, for the project page:
        // sampled off the build's path.
        let (svc, project, id) = (self.clone(), who.project.clone(), record.id.clone());
        tokio::spawn(async move { svc.sample_storage(&project, &id).await });
        result
    }

    /// Keep the project's storage now in build `id`'s record.
    async fn sample_storage(&self, project: &str, id: &str) {
        let Ok(u) = self.usage_reply(project, 0).await else { return };
        let (engine, project, id) = (self.engine.clone(), project.to_string(), id.to_string());
        let _ = tokio::task::spawn_blocking(move || {
            let Ok(Some(mut v)) = engine.index().build(&project, &id) else { return };
            v["storage_bytes"] = serde_json::json!(u.total_bytes);
            if let Err(e) = engine.index().put_build(&project, &id, &v) {
                tracing::warn!("saving build record {id}: {e}");
            }
        })
        .await;
    }

    fn save_record(&self, project: &str, record: &v1::BuildRecord, log: &str) {
        let value = record_json(record);
        if let Err(e) = self.engine.index().put_build(project, &record.id, &value) {
            tracing::warn!("saving build record {}: {e}", record.id);
        }
        let dir = self.engine.root().join("builds").join(project);
        use std::os::unix::fs::OpenOptionsExt;
        if private_dir(&dir).is_ok() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(dir.join(format!("{}.log", record.id)));
            if let Ok(mut f) = file {
                let _ = f.write_all(log.as_bytes());
            }
        }
    }

    /// Import the image of an uploaded OCI layout (`--build-context NAME=oci-layout://`)
    /// for `project`: only files of the upload at `blobs/<algorithm>/<hex>` whose content
    /// has that digest are read. Returns the reference the build resolves it by.
    async fn import_layout(&self, store: &Arc<ContextStore>, project: &str, layout: &v1::OciLayout) -> Result<String, String> {
        let digest: hoist_oci::digest::Digest = layout.digest.parse().map_err(|e| format!("{e}"))?;
        let m = store.materialize(&layout.context_id).await.map_err(|e| e.to_string())?;
        let (engine, store, project) = (self.engine.clone(), store.clone(), project.to_string());
        tokio::task::spawn_blocking(move || {
            let blobs = |d: &hoist_oci::digest::Digest| {
                let path = format!("blobs/{}", d.to_string().replacen(':', "/", 1));
                (m.context.file_digest(&path).as_ref() == Some(d)).then(|| store.open_blob(d)).flatten()
            };
            engine.import_layout(&project, &digest, &blobs).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    #[allow(clippy::too_many_arguments)]
    async fn build_inner(
        &self,
        who: &Caller,
        build_id: &str,
        req: v1::BuildRequest,
        tx: mpsc::Sender<Result<v1::BuildEvent, Status>>,
        cancel: CancellationToken,
        session: Arc<ClientSession>,
        log: Arc<Mutex<BuildLog>>,
        record: &mut v1::BuildRecord,
    ) -> Result<v1::BuildResult, Status> {
        (record.dockerfile, record.dockerfile_truncated) = crate::records::dockerfile_text(&req.dockerfile);
        record.dockerfile_name = if req.dockerfile_name.is_empty() { "Dockerfile".into() } else { req.dockerfile_name.clone() };
        let store = self.context_store(&who.project)?;
        let materialized = if req.context_id.is_empty() {
            None
        } else {
            Some(Arc::new(store.materialize(&req.context_id).await.map_err(|e| Status::failed_precondition(e.to_string()))?))
        };
        // `--build-context`: images by reference, directories uploaded as contexts of their own
        // (held for the build like the main one).
        let mut named_kinds = std::collections::BTreeMap::new();
        let mut named_contexts = std::collections::BTreeMap::new();
        let mut named_held = Vec::new();
        for (name, c) in &req.named_contexts {
            if name.is_empty() || name.len() > 256 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Status::invalid_argument(format!("--build-context {name:?}: expected a name without spaces")));
            }
            match &c.kind {
                Some(v1::named_context::Kind::Image(r)) => {
                    hoist_oci::reference::Reference::parse(r)
                        .map_err(|e| Status::invalid_argument(format!("--build-context {name}=docker-image://{r}: {e}")))?;
                    named_kinds.insert(name.clone(), hoist_engine::graph::NamedContext::Image(r.clone()));
                }
                Some(v1::named_context::Kind::ContextId(id)) => {
                    let m = store.materialize(id).await.map_err(|e| Status::failed_precondition(format!("--build-context {name}: {e}")))?;
                    named_contexts.insert(name.clone(), m.context.clone());
                    named_held.push(m);
                    named_kinds.insert(name.clone(), hoist_engine::graph::NamedContext::Local);
                }
                Some(v1::named_context::Kind::OciLayout(l)) => {
                    let reference = self.import_layout(&store, &who.project, l).await.map_err(|e| {
                        Status::failed_precondition(format!("--build-context {name}=oci-layout:// (image {}): {e}", l.digest))
                    })?;
                    named_kinds.insert(name.clone(), hoist_engine::graph::NamedContext::Image(reference));
                }
                None => return Err(Status::invalid_argument(format!("--build-context {name}: no value"))),
            }
        }
        // Paths steps read beyond what the client sent are asked of it during the build.
        let fetcher = materialized.as_ref().map(|m| {
            let f = Arc::new(crate::fetch::ContextRequests::new(tx.clone(), store.clone(), m.clone()));
            let _ = session.context.set(f.clone());
            f as Arc<dyn hoist_engine::context::ContextFetcher>
        });
        let context_reach = if req.context_partial {
            hoist_engine::context::Reach::Paths(req.context_reach.iter().cloned().collect())
        } else {
            hoist_engine::context::Reach::All
        };
        let sync = materialized.as_ref().map(|m| m.stats).unwrap_or_default();
        record.context_entries = sync.entries;
        record.context_files_sent = sync.missing;
        record.context_bytes_sent = sync.missing_bytes;
        let context = match &materialized {
            Some(m) => m.context.clone(),
            None => {
                let empty = self.engine.root().join("empty-context");
                private_dir(&empty).map_err(|e| Status::internal(e.to_string()))?;
                Arc::new(hoist_engine::context::Context::new(empty, []))
            }
        };
        let platforms = req
            .platforms
            .iter()
            .flat_map(|p| p.split(','))
            .filter(|p| !p.trim().is_empty())
            .map(|p| Platform::parse(p).map_err(|e| Status::invalid_argument(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut add_hosts = Vec::new();
        for h in &req.add_hosts {
            let (host, ip) = h
                .split_once(':')
                .filter(|(h, ip)| !h.is_empty() && !ip.is_empty())
                .ok_or_else(|| Status::invalid_argument(format!("--add-host {h:?}: expected host:ip")))?;
            add_hosts.push((host.to_string(), ip.to_string()));
        }
        let mut credentials = Credentials::new();
        for c in &req.credentials {
            let cred = if !c.identity_token.is_empty() {
                Credential::IdentityToken(c.identity_token.clone())
            } else {
                Credential::basic(c.username.clone(), c.password.clone())
            };
            credentials.insert(&c.host, cred);
        }
        let mut insecure = self.insecure_registries.clone();
        insecure.extend(req.insecure_registries.iter().cloned());
        let source = req.answers_credentials.then(|| session.credentials.clone() as Arc<dyn hoist_oci::registry::CredentialSource>);
        let registry = RegistryClient::new(RegistryOptions { credentials, source, insecure, ..Default::default() })
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut secrets = BuildSecrets::default();
        for s in &req.secrets {
            secrets.secrets.insert(s.id.clone(), s.value.clone());
        }
        for s in &req.ssh {
            if s.id.is_empty() || s.id.len() > 128 || s.id.chars().any(|c| c.is_control() || c == '/') {
                return Err(Status::invalid_argument(format!("--ssh id {:?}: expected a short name", s.id)));
            }
            secrets.ssh.ids.insert(s.id.clone());
        }
        if !secrets.ssh.ids.is_empty() {
            secrets.ssh.forwarder = Some(session.ssh.clone() as Arc<dyn SshForwarder>);
        }
        let network = parse_network(&req.network)?;
        let mut requested = Entitlement::parse_list(req.entitlements.iter().map(String::as_str))
            .map_err(|e| Status::invalid_argument(format!("--allow: {e}")))?;
        if network == NetworkMode::Host {
            // As buildx: --network=host asks for its entitlement.
            requested.insert(Entitlement::NetworkHost);
        }
        let mut granted = self.entitlements.clone();
        granted.extend(self.auth.entitlements_of(&who.project));
        let entitlements = Entitlements { requested, granted, project: who.project.clone() };
        // Bad outputs fail now, not after the whole build (BuildKit, too, resolves its
        // exporters before solving). The first output that makes blobs of the image's layers
        // has them made while the build runs.
        let exporters = req
            .outputs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let spec = crate::outputs::output_spec(i, o).map_err(|e| Status::invalid_argument(e.to_string()))?;
                spec.resolve(&req.tags).map_err(|e| Status::invalid_argument(format!("output {i}: {e}")))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        // Background writes to the fleet's store (base image blobs) wait for the build and
        // its exports.
        let _busy = self.engine.shared().map(|t| t.busy());
        let eager_blobs = exporters.iter().find_map(|e| e.eager_blobs());
        let ulimits = req
            .ulimits
            .iter()
            .map(|u| hoist_engine::executor::Ulimit::parse(u).map_err(|e| Status::invalid_argument(format!("--ulimit {e}"))))
            .collect::<Result<Vec<_>, Status>>()?;
        let needs = exporters.iter().map(Exporter::needs).max().unwrap_or(hoist_engine::LayerNeeds::Descriptors);
        // `--load` into an engine on this machine: the image's lower layers go to the client
        // as soon as they are final, while the build goes on.
        let early_stop = CancellationToken::new();
        let (early_layers, early_task) = match crate::outputs::early_export(&req.outputs) {
            Some((output, platform, layers)) => {
                let (etx, erx) = mpsc::unbounded_channel();
                let early = crate::exports::EarlyExports {
                    engine: self.engine.clone(),
                    exports: self.exports.clone(),
                    project: who.project.clone(),
                    token_id: who.token_id.clone(),
                    output,
                    platform,
                    layers,
                };
                (Some(etx), Some(tokio::spawn(early.run(erx, tx.clone(), early_stop.clone()))))
            }
            None => (None, None),
        };
        let build = BuildRequest {
            namespace: who.project.clone(),
            dockerfile: req.dockerfile.clone(),
            frontend: FrontendOptions {
                dockerfile_name: if req.dockerfile_name.is_empty() { "Dockerfile".into() } else { req.dockerfile_name.clone() },
                build_args: req.build_args.clone().into_iter().collect(),
                target: (!req.target.is_empty()).then(|| req.target.clone()),
                target_platform: None,
                build_platform: None,
                labels: req.labels.clone().into_iter().collect(),
                named_contexts: named_kinds,
            },
            platforms,
            context,
            context_reach,
            context_fetcher: fetcher,
            named_contexts,
            no_cache: req.no_cache,
            no_cache_stages: req.no_cache_filter.clone(),
            shm_size: (req.shm_size > 0).then_some(req.shm_size),
            ulimits,
            pull: req.pull,
            network,
            entitlements,
            add_hosts,
            secrets,
            registry: registry.clone(),
            eager_blobs,
            early_layers,
            needs,
        };
        // Annotations and the provenance attestation of image outputs, checked before the
        // build runs.
        let meta = crate::outputs::image_meta(&req.annotations, req.provenance.as_ref(), &build.frontend)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let meta = Arc::new(meta);
        let exporters: Vec<Exporter> = exporters.into_iter().map(|e| e.with_meta(meta.clone())).collect();

        // Progress: engine events → stream events.
        let (ptx, prx) = mpsc::unbounded_channel::<Event>();
        let forward = tokio::spawn(forward_events(prx, tx.clone(), log, MAX_QUEUED_LOG));
        // The outputs show their pushes on it too; the forwarder ends when it is dropped.
        let progress = Progress::new(ptx);
        let outcome = self.engine.build(build, progress.clone(), cancel.clone()).await;
        early_stop.cancel();
        if let Some(t) = early_task {
            let _ = t.await;
        }
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                drop(progress);
                let _ = forward.await;
                return Err(engine_status(e));
            }
        };
        drop(materialized);
        drop(named_held);
        record.steps_run = outcome.steps_run;
        record.steps_cached = outcome.steps_cached;
        record.containers_run = outcome.containers_run;
        record.image_id = outcome.images.first().map(|i| i.config_digest.to_string()).unwrap_or_default();

        let mut manifest_digest = String::new();
        let mut names = Vec::new();
        let mut report = OutputsReport::default();
        for (i, exporter) in exporters.iter().enumerate() {
            let d = self.output(i as u32, exporter, &outcome.images, &registry, &tx, &progress, who, build_id, &mut report).await?;
            if let Some(d) = d {
                manifest_digest = d;
            }
            if let Some(n) = exporter.own_names() {
                names.push(n.join(","));
            }
        }
        drop(progress);
        let _ = forward.await;
        record.bytes_pushed = report.pushes.iter().map(|p| p.bytes_uploaded).sum();
        if exporters.iter().any(Exporter::keeps_result) {
            // A pushed or saved result is in the fleet's shared tier before the build is done.
            self.engine.flush_shared_results().await;
        }
        let image_id = outcome.images.first().map(|i| i.config_digest.to_string()).unwrap_or_default();
        let mut metadata = serde_json::json!({
            "containerimage.config.digest": image_id,
        });
        if !manifest_digest.is_empty() {
            metadata["containerimage.digest"] = serde_json::json!(manifest_digest);
            // As buildx writes it: the manifest (or index) the outputs made.
            let stored = manifest_digest.parse().ok().and_then(|d| self.engine.store().read(&d).ok());
            if let Some(bytes) = stored {
                let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["mediaType"].as_str().map(str::to_string))
                    .unwrap_or_else(|| hoist_oci::image::media::OCI_MANIFEST.to_string());
                metadata["containerimage.descriptor"] =
                    serde_json::json!({ "mediaType": media_type, "digest": manifest_digest, "size": bytes.len() });
            }
        }
        // What `hoist builds show` takes (buildx names the builder, node and build).
        metadata["buildx.build.ref"] = serde_json::json!(format!("hoist/{}/{build_id}", who.project));
        if !names.is_empty() || !req.tags.is_empty() {
            let all: Vec<String> = if names.is_empty() { req.tags.clone() } else { names };
            metadata["image.name"] = serde_json::json!(all.join(","));
        }
        record.manifest_digest = manifest_digest.clone();
        Ok(v1::BuildResult {
            image_id,
            manifest_digest,
            steps_run: outcome.steps_run,
            steps_cached: outcome.steps_cached,
            metadata_json: metadata.to_string(),
            seconds: outcome.seconds,
            build_id: build_id.to_string(),
            containers_run: outcome.containers_run,
            context_entries: sync.entries,
            context_files_sent: sync.missing,
            context_bytes_sent: sync.missing_bytes,
            project: who.project.clone(),
            pushes: report.pushes,
            manifests: report.manifests,
            saved: report.saved,
        })
    }

    /// Produce one output; returns the manifest (or index) digest when it made one.
    #[allow(clippy::too_many_arguments)]
    async fn output(
        &self,
        index: u32,
        exporter: &Exporter,
        images: &[BuiltImage],
        registry: &RegistryClient,
        tx: &mpsc::Sender<Result<v1::BuildEvent, Status>>,
        progress: &Progress,
        who: &Caller,
        build_id: &str,
        report: &mut OutputsReport,
    ) -> Result<Option<String>, Status> {
        let target = ExportTarget {
            registry,
            namespace: &who.project,
            build_id,
            stream: Box::new(OutputWriter { index, tx: tx.clone(), buf: Vec::new() }),
            progress: progress.clone(),
            // After the build's own vertices and the client's (10001 on).
            first_vertex: PUSH_VERTICES.saturating_add(index.saturating_mul(1000)),
        };
        let done = exporter.export(&self.engine, images, target).await.map_err(engine_status)?;
        report.manifests.extend(done.manifests.iter().map(crate::exports::manifest_ref));
        report.pushes.extend(done.pushes.iter().map(|o| v1::PushReport {
            reference: o.reference.to_string(),
            blobs_uploaded: o.blobs_uploaded,
            bytes_uploaded: o.bytes_uploaded,
            blobs_existed: o.blobs_existed,
            blobs_mounted: o.blobs_mounted,
            manifests: o.manifests,
            manifests_existed: o.manifests_existed,
            seconds: o.seconds,
            error: o.error.clone().unwrap_or_default(),
        }));
        if done.saved.is_some() {
            report.saved = build_id.to_string();
        }
        if let Some(export) = done.client {
            let mut session = self.exports.open(&self.engine, &who.project, who.token_id.as_deref(), export).map_err(export_status)?;
            session.output = index;
            session.build_id = build_id.to_string();
            session.tags = exporter.names().to_vec();
            tx.send(Ok(event(build_event::Event::Export(session)))).await.map_err(|_| Status::cancelled("the client went away"))?;
        }
        Ok(done.digest.map(|d| d.to_string()))
    }
}

/// A `Write` that hands what is written on in chunks of `chunk` bytes.
struct ChunkWriter<F: FnMut(Vec<u8>) -> io::Result<()>> {
    buf: Vec<u8>,
    chunk: usize,
    send: F,
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> ChunkWriter<F> {
    /// Send what is buffered.
    fn flush_chunk(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let b = std::mem::take(&mut self.buf);
            (self.send)(b)?;
        }
        Ok(())
    }
}

impl<F: FnMut(Vec<u8>) -> io::Result<()>> Write for ChunkWriter<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.chunk {
            self.flush_chunk()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod forward_tests {
    use super::*;
    use hoist_engine::frontend::FrontendError;

    /// Regression (issue 7): engine events went through an unbounded channel to a client
    /// that may read slowly, so `RUN yes` grew the builder's memory without bound.
    #[tokio::test]
    async fn a_slow_client_gets_bounded_output_with_a_marker_and_every_completion() {
        let (ptx, prx) = mpsc::unbounded_channel::<Event>();
        let (tx, mut rx) = mpsc::channel::<Result<v1::BuildEvent, Status>>(4);
        let log = Arc::new(Mutex::new(BuildLog::default()));
        let max = 1 << 20;
        let fwd = tokio::spawn(forward_events(prx, tx, log.clone(), max));
        ptx.send(Event::Started { id: 1, name: "RUN yes".into() }).unwrap();
        let chunk = vec![b'y'; 64 << 10];
        for _ in 0..1000 {
            ptx.send(Event::Log { id: 1, stream: 1, data: chunk.clone().into() }).unwrap();
        }
        ptx.send(Event::Completed { id: 1, cached: false, seconds: 1.0, error: None }).unwrap();
        drop(ptx);
        // the forwarder drained everything although nobody read yet
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let (mut log_bytes, mut marker, mut completed, mut started) = (0usize, false, false, false);
        while let Some(ev) = rx.recv().await {
            match ev.unwrap().event.unwrap() {
                build_event::Event::Log(l) => {
                    let text = String::from_utf8_lossy(&l.data);
                    if text.contains("bytes of output dropped") {
                        marker = true;
                        assert!(!completed, "the marker comes before the completion");
                    } else {
                        log_bytes += l.data.len();
                    }
                }
                build_event::Event::Completed(_) => completed = true,
                build_event::Event::Started(_) => started = true,
                _ => {}
            }
        }
        fwd.await.unwrap();
        assert!(started && completed && marker);
        assert!(log_bytes <= max + (64 << 10) * 4, "{log_bytes} bytes were queued");
        assert!(log_bytes >= 64 << 10, "some output got through");
        assert!(log.lock().unwrap().text.len() < 2 << 20, "the build log stays bounded");
    }

    /// Regression (issue 7): an error quoting a 120 KiB Dockerfile line went out whole in the
    /// gRPC trailers, and the client dropped the connection ("too_many_continuations").
    #[test]
    fn huge_error_messages_are_cut_to_fit_a_status() {
        let syntax = |line, message: String| FrontendError::Syntax { file: "Dockerfile".into(), line, message };
        let s = engine_status(syntax(2, "é".repeat(100_000)).into());
        assert!(s.message().len() < MAX_STATUS_MESSAGE + 100);
        assert!(s.message().starts_with("Dockerfile:2: ") && s.message().ends_with("cut]"));
        let short = engine_status(syntax(1, "x".into()).into());
        assert_eq!(short.message(), "Dockerfile:1: x");
    }

    /// An error another stage's waiter sees is that stage's error: a cancelled base stage is
    /// a cancelled build, a failed RUN keeps its Dockerfile line, a frontend error its code.
    #[test]
    fn errors_of_other_stages_keep_their_kind() {
        use std::sync::Arc;
        let shared = |e: EngineError| EngineError::Stage(Arc::new(EngineError::Stage(Arc::new(e))));
        assert_eq!(engine_status(shared(EngineError::Cancelled)).code(), tonic::Code::Cancelled);
        let bad = FrontendError::Syntax { file: "Dockerfile".into(), line: 3, message: "bad".into() };
        let s = engine_status(shared(bad.into()));
        assert_eq!((s.code(), s.message()), (tonic::Code::InvalidArgument, "Dockerfile:3: bad"));
        let step = EngineError::Step { location: "Dockerfile:2".into(), instruction: "RUN exit 3".into(), source: "exit code 3".into() };
        let s = engine_status(shared(step));
        assert_eq!((s.code(), s.message()), (tonic::Code::Aborted, "Dockerfile:2: RUN exit 3: exit code 3"));
    }
}

#[cfg(test)]
mod collection_tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Issue 13: a node collects a project's share of the shared store at most hourly, the
    /// first build of the project on the node starting the clock, each project on its own.
    #[test]
    fn shared_collection_runs_hourly_per_project_from_the_first_build() {
        let mut last = HashMap::new();
        let t0 = Instant::now();
        assert!(!collection_due(&mut last, "web", t0), "the first build starts the clock");
        assert!(!collection_due(&mut last, "web", t0 + Duration::from_secs(60)));
        assert!(!collection_due(&mut last, "api", t0 + Duration::from_secs(60)), "each project has its own clock");
        assert!(collection_due(&mut last, "web", t0 + SHARED_COLLECT_EVERY), "an hour later");
        assert!(!collection_due(&mut last, "web", t0 + SHARED_COLLECT_EVERY + Duration::from_secs(1)), "then not again for an hour");
        assert!(collection_due(&mut last, "web", t0 + 2 * SHARED_COLLECT_EVERY));
        assert!(collection_due(&mut last, "api", t0 + 2 * SHARED_COLLECT_EVERY));
    }
}
