//! The gRPC `Builder` service: context sync, builds with streamed progress, and outputs.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use hoist_engine::graph::{FrontendOptions, NetworkMode, Platform};
use hoist_engine::progress::{Event, Progress};
use hoist_engine::{BuildRequest, BuildSecrets, BuiltImage, Engine, EngineError};
use hoist_oci::auth::{Credential, Credentials};
use hoist_oci::compress::Compression;
use hoist_oci::reference::Reference;
use hoist_oci::registry::{RegistryClient, RegistryOptions};
use hoist_proto::v1::{self, build_event, builder_server::Builder};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::context::ContextStore;

/// The project every request belongs to until projects and tokens exist.
pub const DEFAULT_PROJECT: &str = "default";

/// The builder service.
#[derive(Clone)]
pub struct BuilderService {
    engine: Engine,
    contexts: Arc<Mutex<HashMap<String, Arc<ContextStore>>>>,
    insecure_registries: Vec<String>,
}

impl BuilderService {
    /// A service over `engine`.
    pub fn new(engine: Engine, insecure_registries: Vec<String>) -> BuilderService {
        BuilderService { engine, contexts: Arc::new(Mutex::new(HashMap::new())), insecure_registries }
    }

    fn context_store(&self, project: &str) -> Result<Arc<ContextStore>, Status> {
        let mut map = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(project) {
            return Ok(s.clone());
        }
        let root = self.engine.root().join("contexts").join(project);
        let store = Arc::new(ContextStore::open(root).map_err(|e| Status::internal(e.to_string()))?);
        map.insert(project.to_string(), store.clone());
        Ok(store)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::BuildEvent, Status>> + Send>>;

fn event(e: build_event::Event) -> v1::BuildEvent {
    v1::BuildEvent { event: Some(e) }
}

#[tonic::async_trait]
impl Builder for BuilderService {
    async fn info(&self, _req: Request<v1::InfoRequest>) -> Result<Response<v1::InfoReply>, Status> {
        Ok(Response::new(v1::InfoReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            platforms: vec![Platform::host().to_string()],
            root: self.engine.root().display().to_string(),
        }))
    }

    async fn prepare_context(&self, req: Request<v1::ContextManifest>) -> Result<Response<v1::PrepareContextReply>, Status> {
        let store = self.context_store(DEFAULT_PROJECT)?;
        let (context_id, missing) = store.prepare(req.into_inner()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(v1::PrepareContextReply { context_id, missing }))
    }

    async fn upload_blobs(&self, req: Request<Streaming<v1::BlobChunk>>) -> Result<Response<v1::UploadReply>, Status> {
        let store = self.context_store(DEFAULT_PROJECT)?;
        let mut stream = req.into_inner();
        let mut current: Option<(String, hoist_oci::store::BlobWriter)> = None;
        let (mut blobs, mut bytes) = (0u64, 0u64);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if current.as_ref().is_some_and(|(d, _)| *d != chunk.digest) {
                return Err(Status::invalid_argument(format!("blob {} ended without its last chunk", current.map(|c| c.0).unwrap_or_default())));
            }
            if current.is_none() {
                current = Some((chunk.digest.clone(), store.blob_writer().map_err(|e| Status::internal(e.to_string()))?));
            }
            if let Some((_, w)) = current.as_mut() {
                w.write_all(&chunk.data).map_err(|e| Status::internal(format!("storing context file {}: {e}", chunk.digest)))?;
            }
            bytes += chunk.data.len() as u64;
            if chunk.last {
                if let Some((d, w)) = current.take() {
                    store.commit_blob(w, &d).map_err(|e| Status::invalid_argument(e.to_string()))?;
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

    async fn build(&self, req: Request<v1::BuildRequest>) -> Result<Response<Self::BuildStream>, Status> {
        let req = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<v1::BuildEvent, Status>>(256);
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
        tokio::spawn(async move {
            let result = svc.run_build(req, tx.clone(), cancel).await;
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

fn parse_network(s: &str) -> Result<NetworkMode, Status> {
    match s {
        "" | "default" | "bridge" => Ok(NetworkMode::Default),
        "host" => Ok(NetworkMode::Host),
        "none" => Ok(NetworkMode::None),
        other => Err(Status::invalid_argument(format!("--network {other:?} is not supported: use default, host or none"))),
    }
}

fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::Cancelled => Status::cancelled("build cancelled"),
        EngineError::Frontend(m) => Status::invalid_argument(m),
        other => Status::aborted(other.to_string()),
    }
}

/// A `Write` that sends what is written as `OutputData` events (1 MiB chunks), blocking
/// when the client reads slowly.
struct OutputWriter {
    index: u32,
    tx: mpsc::Sender<Result<v1::BuildEvent, Status>>,
    buf: Vec<u8>,
}

const OUTPUT_CHUNK: usize = 1 << 20;

impl OutputWriter {
    fn send(&mut self, eof: bool) -> io::Result<()> {
        let data = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(Ok(event(build_event::Event::Output(v1::OutputData { output: self.index, data, eof }))))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
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
    async fn run_build(
        &self,
        req: v1::BuildRequest,
        tx: mpsc::Sender<Result<v1::BuildEvent, Status>>,
        cancel: CancellationToken,
    ) -> Result<v1::BuildResult, Status> {
        let store = self.context_store(DEFAULT_PROJECT)?;
        let materialized = if req.context_id.is_empty() {
            None
        } else {
            Some(store.materialize(&req.context_id).await.map_err(|e| Status::failed_precondition(e.to_string()))?)
        };
        let context = match &materialized {
            Some(m) => m.context.clone(),
            None => {
                let empty = self.engine.root().join("empty-context");
                std::fs::create_dir_all(&empty).map_err(|e| Status::internal(e.to_string()))?;
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
        let registry = RegistryClient::new(RegistryOptions { credentials, insecure, ..Default::default() })
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut secrets = BuildSecrets::default();
        for s in &req.secrets {
            secrets.secrets.insert(s.id.clone(), s.value.clone());
        }
        for s in &req.ssh {
            secrets.ssh.insert(s.id.clone(), PathBuf::from(&s.socket));
        }
        let build = BuildRequest {
            namespace: DEFAULT_PROJECT.to_string(),
            dockerfile: req.dockerfile.clone(),
            frontend: FrontendOptions {
                dockerfile_name: if req.dockerfile_name.is_empty() { "Dockerfile".into() } else { req.dockerfile_name.clone() },
                build_args: req.build_args.clone().into_iter().collect(),
                target: (!req.target.is_empty()).then(|| req.target.clone()),
                target_platform: None,
                build_platform: None,
                labels: req.labels.clone().into_iter().collect(),
            },
            platforms,
            context,
            no_cache: req.no_cache,
            pull: req.pull,
            network: parse_network(&req.network)?,
            add_hosts,
            secrets,
            registry: registry.clone(),
        };

        // Progress: engine events → stream events.
        let (ptx, mut prx) = mpsc::unbounded_channel::<Event>();
        let forward_tx = tx.clone();
        let forward = tokio::spawn(async move {
            while let Some(ev) = prx.recv().await {
                let e = match ev {
                    Event::Started { id, name } => build_event::Event::Started(v1::VertexStarted { id, name }),
                    Event::Completed { id, cached, seconds, error } => build_event::Event::Completed(v1::VertexCompleted {
                        id,
                        cached,
                        seconds,
                        error: error.unwrap_or_default(),
                    }),
                    Event::Log { id, stream, data } => build_event::Event::Log(v1::VertexLog { id, stream: stream as u32, data: data.to_vec() }),
                    Event::Warning(w) => build_event::Event::Warning(w),
                };
                if forward_tx.send(Ok(event(e))).await.is_err() {
                    break;
                }
            }
        });
        let outcome = self.engine.build(build, Progress::new(ptx), cancel.clone()).await;
        let _ = forward.await;
        let outcome = outcome.map_err(engine_status)?;
        drop(materialized);

        let mut manifest_digest = String::new();
        let mut names = Vec::new();
        for (i, out) in req.outputs.iter().enumerate() {
            let d = self.output(i as u32, out, &req, &outcome.images, &registry, &tx).await?;
            if let Some(d) = d {
                manifest_digest = d;
            }
            if let Some(n) = out.attrs.get("name") {
                names.push(n.clone());
            }
        }
        let image_id = outcome.images.first().map(|i| i.config_digest.to_string()).unwrap_or_default();
        let mut metadata = serde_json::json!({
            "containerimage.config.digest": image_id,
        });
        if !manifest_digest.is_empty() {
            metadata["containerimage.digest"] = serde_json::json!(manifest_digest);
        }
        if !names.is_empty() || !req.tags.is_empty() {
            let all: Vec<String> = if names.is_empty() { req.tags.clone() } else { names };
            metadata["image.name"] = serde_json::json!(all.join(","));
        }
        Ok(v1::BuildResult {
            image_id,
            manifest_digest,
            steps_run: outcome.steps_run,
            steps_cached: outcome.steps_cached,
            metadata_json: metadata.to_string(),
            seconds: outcome.seconds,
        })
    }

    /// Produce one output; returns the manifest (or index) digest when it made one.
    async fn output(
        &self,
        index: u32,
        out: &v1::Output,
        req: &v1::BuildRequest,
        images: &[BuiltImage],
        registry: &RegistryClient,
        tx: &mpsc::Sender<Result<v1::BuildEvent, Status>>,
    ) -> Result<Option<String>, Status> {
        let attrs = &out.attrs;
        let compression = Compression::from_attrs(attrs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let force = attrs.get("force-compression").is_some_and(|v| v == "true");
        let tags: Vec<String> = match attrs.get("name") {
            Some(n) => n.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
            None => req.tags.clone(),
        };
        let engine = self.engine.clone();
        match out.r#type.as_str() {
            "image" | "registry" => {
                let set = engine.export_images(images, compression, force).await.map_err(engine_status)?;
                let push = out.r#type == "registry" || attrs.get("push").is_some_and(|v| v == "true");
                if push {
                    if tags.is_empty() {
                        return Err(Status::invalid_argument("--push needs at least one -t/--tag (or name= in --output)"));
                    }
                    let refs = tags
                        .iter()
                        .map(|t| Reference::parse(t).map_err(|e| Status::invalid_argument(e.to_string())))
                        .collect::<Result<Vec<_>, _>>()?;
                    engine.push(&set, &refs, registry).await.map_err(engine_status)?;
                }
                Ok(Some(set.top_digest().to_string()))
            }
            "docker" | "load" => {
                let image = host_image(images)?.clone();
                // docker load wants name:tag in RepoTags.
                let tags = tags
                    .iter()
                    .map(|t| Reference::parse(t).map(|r| r.familiar()).map_err(|e| Status::invalid_argument(e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?;
                let w = OutputWriter { index, tx: tx.clone(), buf: Vec::new() };
                stream_output(move |mut w| engine.write_docker_archive(&image, &tags, &mut w).map(|_| w), w).await?;
                Ok(None)
            }
            "oci" => {
                let set = engine.export_images(images, compression, force).await.map_err(engine_status)?;
                let d = set.top_digest().to_string();
                let w = OutputWriter { index, tx: tx.clone(), buf: Vec::new() };
                stream_output(move |mut w| engine.write_oci_archive(&set, &tags, &mut w).map(|_| w), w).await?;
                Ok(Some(d))
            }
            "tar" | "local" => {
                let image = host_image(images)?.clone();
                let w = OutputWriter { index, tx: tx.clone(), buf: Vec::new() };
                stream_output(move |mut w| engine.write_rootfs_tar(&image, &mut w).map(|_| w), w).await?;
                Ok(None)
            }
            other => Err(Status::invalid_argument(format!(
                "output type {other:?} is not supported: use image, registry, docker, oci, tar or local"
            ))),
        }
    }
}

/// The image of the host's platform (or the only one).
fn host_image(images: &[BuiltImage]) -> Result<&BuiltImage, Status> {
    let host = Platform::host();
    images
        .iter()
        .find(|i| i.platform.os == host.os && i.platform.architecture == host.architecture)
        .or_else(|| images.first())
        .ok_or_else(|| Status::internal("the build produced no image"))
}

async fn stream_output(
    f: impl FnOnce(OutputWriter) -> Result<OutputWriter, EngineError> + Send + 'static,
    w: OutputWriter,
) -> Result<(), Status> {
    tokio::task::spawn_blocking(move || -> Result<(), Status> {
        let mut w = f(w).map_err(engine_status)?;
        w.send(true).map_err(|e| Status::cancelled(e.to_string()))
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
}
