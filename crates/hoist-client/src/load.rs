//! Getting an exported image into the user's Docker engine (`--load`, `hoist pull`): the
//! one [`crate::docker_host`] chooses as the Docker CLI does (`DOCKER_HOST`, the current
//! Docker context, else the local socket).
//!
//! The fast path: serve the builder's export session as a registry on loopback
//! ([`crate::proxy`]) and ask the engine to pull from it (`POST /images/create`); the
//! engine skips every layer it already has ("Already exists"), so only new layers move.
//! Then the image gets each `-t` and the temporary reference is removed.
//!
//! When the engine cannot reach this machine's loopback (`DOCKER_HOST` or the context names
//! another machine — tcp:// or ssh:// — or the engine is in a VM and the pull fails to
//! connect), when there is no tag to give the image,
//! or when `HOIST_LOAD_VIA=archive` says so, it is loaded as a `docker load` archive
//! instead — one that still carries only the layers the engine lacks (the engine reuses a
//! layer whose chain it already has and never opens its file). Either way the report says
//! which path was taken and why.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bollard::Docker;
use bytes::Bytes;
use futures::StreamExt;
use hoist_oci::archive::{self, ArchiveError};
use hoist_oci::digest::{chain_id, Digest};
use hoist_oci::image::{ImageConfig, Manifest};
use tokio::sync::mpsc;

use crate::docker_host::{DockerHostError, Endpoint};
use crate::human_bytes;
use crate::proxy::{content_of, BlobBackend, LoopbackRegistry, ProxyError};
use crate::{v1, Client};

/// Why a load failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The Docker engine did not answer, or refused a request.
    #[error("{what}: {error}")]
    Engine {
        /// What was asked of the engine.
        what: String,
        /// The engine's (or its client's) error.
        error: bollard::errors::Error,
    },
    /// The engine's endpoint (`DOCKER_HOST`, the Docker context) cannot be used.
    #[error("{what}: {error}")]
    Host {
        /// What needed the engine.
        what: String,
        /// Why (naming the variable, context or file).
        error: DockerHostError,
    },
    /// The engine could not pull the image from the loopback registry.
    #[error("the Docker engine failed to pull the image from hoist's loopback registry: {0}")]
    Pull(String),
    /// The engine refused the `docker load` archive.
    #[error("the Docker engine refused the image archive: {0}")]
    Archive(String),
    /// The export session is not a loadable image.
    #[error("{0}")]
    Export(String),
    /// The export session cannot be served as a registry.
    #[error(transparent)]
    Content(#[from] ProxyError),
    /// A tag or archive entry is invalid.
    #[error(transparent)]
    Name(#[from] ArchiveError),
    /// The builder failed to send a layer.
    #[error("reading layer {digest} from the builder: {message}")]
    Blob {
        /// The layer's digest.
        digest: String,
        /// The builder's message.
        message: String,
    },
    /// A local resource (the loopback listener, the archive writer) failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        error: std::io::Error,
    },
}

fn engine_err(what: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> LoadError {
    let what = what.into();
    move |error| LoadError::Engine { what, error }
}

/// The local Docker engine.
#[derive(Clone)]
pub struct DockerEngine {
    /// The engine's API client.
    pub docker: Docker,
    /// `os/arch[/variant]` of the engine.
    pub platform: String,
    /// Why the engine cannot pull from this machine's loopback (None: it can): it is on
    /// another machine ([`Endpoint::remote`]); the load then sends an archive and says so.
    pub remote: Option<String>,
}

impl DockerEngine {
    /// Connect to the engine the Docker CLI would use ([`crate::docker_host`]: `DOCKER_HOST`,
    /// else the current Docker context, else the local socket); `what` (the flag or command
    /// that needs it) starts the error messages.
    pub async fn connect(what: &str) -> Result<DockerEngine, LoadError> {
        let host_err = |error| LoadError::Host { what: what.to_string(), error };
        let endpoint = Endpoint::from_env().map_err(host_err)?;
        let docker = endpoint.connect().map_err(host_err)?;
        let at = &endpoint.origin;
        let docker = docker.negotiate_version().await.map_err(engine_err(format!(
            "{what}: the Docker engine of {at} does not answer (is dockerd running? set DOCKER_HOST or `docker context use` to choose another)"
        )))?;
        let v = docker.version().await.map_err(engine_err(format!("{what}: asking the Docker engine of {at} its version")))?;
        let os = v.os.unwrap_or_else(|| "linux".into());
        let arch = v.arch.unwrap_or_else(|| hoist_oci::Platform::host().architecture);
        let platform = hoist_oci::Platform::parse(&format!("{os}/{arch}")).map(|p| p.to_string()).unwrap_or(format!("{os}/{arch}"));
        Ok(DockerEngine { docker, platform, remote: endpoint.remote() })
    }
}

/// How the image got into the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPath {
    /// The engine had the image (same id) already: only its tags were set.
    Present,
    /// The engine pulled from the loopback registry.
    Registry,
    /// A `docker load` archive with only the missing layers.
    Archive,
}

/// What a load did.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// How the image got into the engine.
    pub path: LoadPath,
    /// Why the archive path was taken.
    pub why: Option<String>,
    /// The names given to the image.
    pub tags: Vec<String>,
    /// The image's id (its config's digest).
    pub image_id: String,
    /// Layers of the image.
    pub layers: u64,
    /// Layers whose bytes moved to the engine.
    pub layers_moved: u64,
    /// The bytes of those layers.
    pub layer_bytes_moved: u64,
    /// Blobs sent to the engine (layers, config).
    pub blobs_served: u64,
    /// Everything sent to the engine (layers, config, archive framing).
    pub bytes_served: u64,
    /// Layers (and their bytes) the engine imported while the build ran ([`EarlyLoads`]).
    pub early_layers: u64,
    /// The bytes of those layers.
    pub early_bytes: u64,
    /// Layers the engine's pull progress said it pulled (registry path).
    pub engine_pulled: u64,
    /// Layers the engine's pull progress said it had (registry path).
    pub engine_existing: u64,
    /// How long the load took.
    pub seconds: f64,
}

impl LoadReport {
    /// One line for the build output.
    pub fn line(&self, what: &str) -> String {
        let names = if self.tags.is_empty() { self.image_id.clone() } else { self.tags.join(", ") };
        let present = self.layers.saturating_sub(self.layers_moved);
        let mut s = match self.path {
            LoadPath::Present => {
                return format!("{what}: {names} is already in the engine as {}: nothing moved", self.image_id);
            }
            LoadPath::Registry => format!("{what}: loaded {names} via the loopback registry in {:.1}s", self.seconds),
            LoadPath::Archive => format!("{what}: loaded {names} as a docker load archive in {:.1}s", self.seconds),
        };
        s.push_str(&format!(
            ": {} layer(s) moved ({}), {present} already present; {} blobs served, {} bytes",
            self.layers_moved,
            human_bytes(self.layer_bytes_moved),
            self.blobs_served,
            self.bytes_served
        ));
        if self.path == LoadPath::Registry {
            s.push_str(&format!(" (engine: {} pulled, {} already exist)", self.engine_pulled, self.engine_existing));
        }
        if self.early_layers > 0 {
            s.push_str(&format!("; {} layer(s) ({}) imported while building", self.early_layers, human_bytes(self.early_bytes)));
        }
        if let Some(why) = &self.why {
            s.push_str(&format!(" [archive because {why}]"));
        }
        s
    }
}

/// The manifest of `session` for `platform` (its only one, or the matching one).
fn pick_manifest<'a>(session: &'a v1::ExportSession, platform: &str) -> Result<&'a v1::ManifestRef, LoadError> {
    let none = || LoadError::Export("the builder exported no image".into());
    match session.manifests.as_slice() {
        [] => Err(none()),
        [only] => Ok(only),
        many => {
            let want = hoist_oci::Platform::parse(platform).ok();
            many.iter()
                .find(|m| hoist_oci::Platform::parse(&m.platform).is_ok_and(|p| want.as_ref().is_some_and(|w| w.matches(&p))))
                .or(many.first())
                .ok_or_else(none)
        }
    }
}

/// `name:tag` → (repository as the engine names it, tag).
fn repo_and_tag(t: &str) -> Result<(String, String), LoadError> {
    Ok(archive::repo_and_tag(t)?)
}

/// Load `session`'s image into `engine` with `tags`, then release the session. `early`
/// (the provisional images imported while the build ran) is settled first — the import
/// under way finishes, so the final pull finds its layers — and removed afterwards.
pub async fn load(
    client: &Client,
    engine: &DockerEngine,
    session: &v1::ExportSession,
    tags: &[String],
    early: Option<EarlyLoads>,
) -> Result<LoadReport, LoadError> {
    let early = match early {
        Some(e) => Some(e.settle().await),
        None => None,
    };
    let mut r = load_inner(client, engine, session, tags).await;
    if let Some(done) = early {
        if let Ok(report) = &mut r {
            report.early_layers = done.layers;
            report.early_bytes = done.bytes;
        }
        // The final image holds their layers now (or the load failed): the provisional
        // names go either way.
        for temp_ref in &done.refs {
            if let Err(e) = remove_temp_ref(&engine.docker, temp_ref).await {
                r = r.and(Err(e));
            }
        }
    }
    release(client, &session.id).await;
    r
}

async fn release(client: &Client, session: &str) {
    let mut c = client.clone();
    let _ = c.release_export(v1::ReleaseExportRequest { session: session.to_string() }).await;
}

/// Provisional images of the image's lower layers (`ExportSession.provisional`) that the
/// engine imports while the build goes on, one at a time, the newest offered first: when
/// the build ends, only the layers above them move. Each leaves a temporary reference in
/// the engine, removed by [`load`] or [`EarlyLoads::discard`].
pub struct EarlyLoads {
    tx: mpsc::UnboundedSender<v1::ExportSession>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
    done: std::sync::Arc<std::sync::Mutex<EarlyDone>>,
}

/// What the provisional imports did.
#[derive(Debug, Default, Clone)]
pub struct EarlyDone {
    /// Temporary references made (or being made) in the engine.
    pub refs: Vec<String>,
    /// Layers the engine pulled, and their bytes.
    pub layers: u64,
    /// The bytes of those layers.
    pub bytes: u64,
}

impl EarlyLoads {
    /// Start taking provisional sessions for `engine`.
    pub fn start(client: Client, engine: DockerEngine) -> EarlyLoads {
        let (tx, mut rx) = mpsc::unbounded_channel::<v1::ExportSession>();
        let stop = tokio_util::sync::CancellationToken::new();
        let done = std::sync::Arc::new(std::sync::Mutex::new(EarlyDone::default()));
        let (stop2, done2) = (stop.clone(), done.clone());
        let task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    s = rx.recv() => s,
                    _ = stop2.cancelled() => None,
                };
                let Some(mut session) = next else { break };
                while let Ok(newer) = rx.try_recv() {
                    release(&client, &session.id).await;
                    session = newer;
                }
                if stop2.is_cancelled() {
                    release(&client, &session.id).await;
                    break;
                }
                let record = |r: &str| done2.lock().unwrap_or_else(|e| e.into_inner()).refs.push(r.to_string());
                // Early imports only save time: one that fails leaves its layers to the
                // final load.
                if let Ok(p) = pull_session(&client, &engine, &session, record).await {
                    let mut d = done2.lock().unwrap_or_else(|e| e.into_inner());
                    d.layers += p.served.0;
                    d.bytes += p.served.1;
                }
                release(&client, &session.id).await;
            }
            rx.close();
            while let Ok(s) = rx.try_recv() {
                release(&client, &s.id).await;
            }
        });
        EarlyLoads { tx, stop, task, done }
    }

    /// Offer a provisional session (the newest replaces any not yet started).
    pub fn offer(&self, session: v1::ExportSession) {
        let _ = self.tx.send(session);
    }

    /// Take no more; let the import under way finish.
    async fn settle(self) -> EarlyDone {
        self.stop.cancel();
        let _ = self.task.await;
        let d = self.done.lock().unwrap_or_else(|e| e.into_inner()).clone();
        d
    }

    /// The build failed or was cancelled: stop the import under way and remove every
    /// provisional image from `engine`.
    pub async fn discard(self, engine: &DockerEngine) {
        self.stop.cancel();
        self.task.abort();
        let _ = self.task.await;
        let refs = self.done.lock().unwrap_or_else(|e| e.into_inner()).refs.clone();
        for r in refs {
            let _ = remove_temp_ref(&engine.docker, &r).await;
        }
    }
}

async fn load_inner(client: &Client, engine: &DockerEngine, session: &v1::ExportSession, tags: &[String]) -> Result<LoadReport, LoadError> {
    for t in tags {
        repo_and_tag(t)?;
    }
    if tags.is_empty() {
        return load_archive(client, engine, session, tags, "no -t was given (an untagged image can only come as an archive)".into()).await;
    }
    // An unchanged build is the same image (same id): when the engine has it, only the tags
    // are (re)set and nothing new is created.
    let started = Instant::now();
    let chosen = pick_manifest(session, &engine.platform)?;
    if engine.docker.inspect_image(&chosen.config_digest).await.is_ok() {
        let docker = &engine.docker;
        let id = chosen.config_digest.as_str();
        let tagging = tags.iter().map(|t| async move {
            let (repo, tag) = repo_and_tag(t)?;
            let opts = bollard::query_parameters::TagImageOptions { repo: Some(repo), tag: Some(tag) };
            docker.tag_image(id, Some(opts)).await.map_err(engine_err(format!("tagging image {id} as {t}")))
        });
        for r in futures::future::join_all(tagging).await {
            r?;
        }
        return Ok(LoadReport {
            path: LoadPath::Present,
            why: None,
            tags: tags.to_vec(),
            image_id: chosen.config_digest.clone(),
            layers: 0,
            layers_moved: 0,
            layer_bytes_moved: 0,
            blobs_served: 0,
            bytes_served: 0,
            early_layers: 0,
            early_bytes: 0,
            engine_pulled: 0,
            engine_existing: 0,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    if let Some(why) = &engine.remote {
        return load_archive(client, engine, session, tags, why.clone()).await;
    }
    // For engines that cannot reach this machine's loopback in ways DOCKER_HOST does not
    // show (rootless dockerd in its own network namespace, a daemon in a VM behind a
    // forwarded socket).
    if std::env::var("HOIST_LOAD_VIA").is_ok_and(|v| v == "archive") {
        return load_archive(client, engine, session, tags, "HOIST_LOAD_VIA=archive".into()).await;
    }
    match load_registry(client, engine, session, tags).await {
        Ok(r) => Ok(r),
        Err(RegistryLoadError::Unreachable(e)) => {
            load_archive(client, engine, session, tags, format!("the engine could not pull from hoist's loopback registry: {e}")).await
        }
        Err(RegistryLoadError::Other(e)) => Err(e),
    }
}

enum RegistryLoadError {
    /// The engine could not connect to the loopback registry.
    Unreachable(String),
    Other(LoadError),
}

impl<E: Into<LoadError>> From<E> for RegistryLoadError {
    fn from(e: E) -> Self {
        RegistryLoadError::Other(e.into())
    }
}

fn unreachable_message(m: &str) -> bool {
    let m = m.to_ascii_lowercase();
    ["connection refused", "no route to host", "i/o timeout", "connect: ", "dial tcp", "network is unreachable"]
        .iter()
        .any(|p| m.contains(p))
}

/// What one pull from the loopback registry did.
struct Pulled {
    /// The temporary reference the engine keeps the image under.
    temp_ref: String,
    /// (distinct layers fetched, layer bytes sent, blob GETs, all blob bytes sent).
    served: (u64, u64, u64, u64),
    /// Layers the engine pulled, and those it had.
    engine_pulled: u64,
    engine_existing: u64,
    /// Layers of the image.
    layers: u64,
}

/// Have the engine pull `session`'s image (the engine's platform) from a loopback registry
/// serving it, by digest. `named` learns the temporary reference before the pull starts.
async fn pull_session(
    client: &Client,
    engine: &DockerEngine,
    session: &v1::ExportSession,
    named: impl FnOnce(&str),
) -> Result<Pulled, RegistryLoadError> {
    let docker = &engine.docker;
    let repository = format!("hoist-load/{}", hoist_oci::random::hex(8));
    let temp_tag = "load";
    let content = content_of(session, &repository, temp_tag)?;
    let chosen = pick_manifest(session, &engine.platform)?;
    let manifest_digest: Digest =
        chosen.digest.parse().map_err(|_| LoadError::Export(format!("the builder sent an invalid manifest digest {:?}", chosen.digest)))?;
    let layers = content
        .documents
        .get(&manifest_digest)
        .and_then(|(_, b)| serde_json::from_slice::<Manifest>(b).ok())
        .map(|m| m.layers.len() as u64)
        .unwrap_or(0);
    let registry = LoopbackRegistry::start(content, BlobBackend::Builder { client: client.clone(), session: session.id.clone() })
        .await
        .map_err(|error| LoadError::Io { what: "starting the loopback registry".into(), error })?;
    let from = format!("127.0.0.1:{}/{repository}", registry.addr.port());
    // Pulled by the digest of the engine's platform's manifest: the engine keeps just that
    // one digest reference, which is the one temporary name to remove afterwards.
    let temp_ref = format!("{from}@{}", chosen.digest);
    named(&temp_ref);
    let opts = bollard::query_parameters::CreateImageOptions {
        from_image: Some(from.clone()),
        tag: Some(chosen.digest.clone()),
        ..Default::default()
    };
    let mut stream = docker.create_image(Some(opts), None, None);
    let mut last: HashMap<String, String> = HashMap::new();
    let mut failure = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(m) = info.error_detail.and_then(|d| d.message) {
                    failure = Some(m);
                    break;
                }
                if let (Some(id), Some(status)) = (info.id, info.status) {
                    last.insert(id, status);
                }
            }
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        }
    }
    drop(stream);
    let served = registry.served.totals();
    registry.stop().await;
    if let Some(m) = failure {
        return Err(if unreachable_message(&m) { RegistryLoadError::Unreachable(m) } else { RegistryLoadError::Other(LoadError::Pull(m)) });
    }
    let engine_existing = last.values().filter(|s| s.as_str() == "Already exists").count() as u64;
    let engine_pulled = last.values().filter(|s| s.as_str() == "Pull complete").count() as u64;
    Ok(Pulled { temp_ref, served, engine_pulled, engine_existing, layers })
}

/// Remove a temporary reference the engine keeps an image under (gone already: fine).
async fn remove_temp_ref(docker: &Docker, temp_ref: &str) -> Result<(), LoadError> {
    let gone = |e: &bollard::errors::Error| matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. });
    let mut attempt = 0;
    loop {
        let noprune = bollard::query_parameters::RemoveImageOptionsBuilder::new().noprune(true).build();
        let err = match docker.remove_image(temp_ref, Some(noprune), None).await {
            Ok(_) => return Ok(()),
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => e,
        };
        // The engine can fail a removal that races another load's of the same image
        // ("unrecognized image ID"): what counts is whether the reference is gone.
        if docker.inspect_image(temp_ref).await.as_ref().is_err_and(gone) {
            return Ok(());
        }
        attempt += 1;
        if attempt == 3 {
            return Err(engine_err(format!("removing the temporary reference {temp_ref}"))(err));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
    }
}

async fn load_registry(
    client: &Client,
    engine: &DockerEngine,
    session: &v1::ExportSession,
    tags: &[String],
) -> Result<LoadReport, RegistryLoadError> {
    let started = Instant::now();
    let docker = &engine.docker;
    let chosen = pick_manifest(session, &engine.platform)?;
    let pulled = pull_session(client, engine, session, |_| {}).await?;
    let (layers_moved, layer_bytes, blobs, bytes) = pulled.served;
    let temp_ref = pulled.temp_ref;
    // The image id is its config's digest (the engine verified it while pulling).
    let image_id = chosen.config_digest.clone();
    let temp = temp_ref.as_str();
    let tagging = tags.iter().map(|t| async move {
        let (repo, tag) = repo_and_tag(t)?;
        let opts = bollard::query_parameters::TagImageOptions { repo: Some(repo), tag: Some(tag) };
        docker.tag_image(temp, Some(opts)).await.map_err(engine_err(format!("tagging the loaded image as {t}")))
    });
    for r in futures::future::join_all(tagging).await {
        r?;
    }
    // The temporary name goes (the tags keep the image).
    remove_temp_ref(docker, &temp_ref).await?;
    Ok(LoadReport {
        path: LoadPath::Registry,
        why: None,
        tags: tags.to_vec(),
        image_id,
        layers: pulled.layers,
        layers_moved,
        layer_bytes_moved: layer_bytes,
        blobs_served: blobs,
        bytes_served: bytes,
        early_layers: 0,
        early_bytes: 0,
        engine_pulled: pulled.engine_pulled,
        engine_existing: pulled.engine_existing,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Chain ids of every layer stack the engine's images have (what `docker load` reuses).
async fn engine_chains(docker: &Docker) -> HashSet<Digest> {
    let mut out = HashSet::new();
    let Ok(images) = docker.list_images(Some(bollard::query_parameters::ListImagesOptions { all: false, ..Default::default() })).await
    else {
        return out;
    };
    // Bounded: a very large image store costs at most this many inspections, eight at a
    // time (for a remote engine each is a round trip).
    let inspect = |id: String| {
        let docker = docker.clone();
        async move { docker.inspect_image(&id).await }
    };
    let mut inspected = futures::stream::iter(images.into_iter().take(500).map(|i| inspect(i.id))).buffer_unordered(8);
    while let Some(i) = inspected.next().await {
        let Ok(i) = i else { continue };
        let diff_ids: Vec<Digest> = i.root_fs.and_then(|r| r.layers).unwrap_or_default().iter().filter_map(|d| d.parse().ok()).collect();
        for n in 1..=diff_ids.len() {
            if let Some(c) = chain_id(&diff_ids[..n]) {
                out.insert(c);
            }
        }
    }
    out
}

fn tar_header(path: &str, size: u64) -> Result<Bytes, LoadError> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).map_err(|error| LoadError::Io { what: format!("archive path {path}"), error })?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(Bytes::copy_from_slice(h.as_bytes()))
}

fn padding(size: u64) -> Bytes {
    let rem = (size % 512) as usize;
    Bytes::from(vec![0u8; if rem == 0 { 0 } else { 512 - rem }])
}

/// Load as a `docker load` archive that carries only the layers the engine lacks.
async fn load_archive(
    client: &Client,
    engine: &DockerEngine,
    session: &v1::ExportSession,
    tags: &[String],
    why: String,
) -> Result<LoadReport, LoadError> {
    let started = Instant::now();
    let chosen = pick_manifest(session, &engine.platform)?;
    let doc = |d: &str| session.documents.iter().find(|x| x.digest == d).map(|x| x.data.clone());
    let bad = |m: String| LoadError::Export(m);
    let manifest_bytes = doc(&chosen.digest).ok_or_else(|| bad(format!("the export session lacks manifest {}", chosen.digest)))?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| bad(format!("the builder's manifest {} is invalid: {e}", chosen.digest)))?;
    let config_bytes =
        doc(manifest.config.digest.as_str()).ok_or_else(|| bad(format!("the export session lacks config {}", manifest.config.digest)))?;
    if Digest::of(&config_bytes) != manifest.config.digest {
        return Err(bad(format!("the builder sent config {} whose bytes do not match its digest", manifest.config.digest)));
    }
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| bad(format!("the builder's image config {} is invalid: {e}", manifest.config.digest)))?;
    let diff_ids = config.rootfs.diff_ids.clone();
    if diff_ids.len() != manifest.layers.len() {
        return Err(bad(format!(
            "manifest {} has {} layers but its config lists {}",
            chosen.digest,
            manifest.layers.len(),
            diff_ids.len()
        )));
    }
    let present = engine_chains(&engine.docker).await;
    let entry = archive::ArchiveImage::new(&manifest.config.digest, &diff_ids, tags)?;
    let mut send = Vec::new();
    for (i, (l, path)) in manifest.layers.iter().zip(&entry.layers).enumerate() {
        let have = chain_id(&diff_ids[..=i]).is_some_and(|c| present.contains(&c));
        if !have {
            send.push((path.clone(), l.digest.clone(), l.size));
        }
    }
    let config_name = entry.config.clone();
    let manifest_json = archive::manifest_json(&[entry])?;
    let layers_moved = send.len() as u64;
    let layer_bytes: u64 = send.iter().map(|(_, _, s)| *s).sum();
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let mut c = client.clone();
    let session_id = session.id.clone();
    let producer = tokio::spawn(async move {
        let result: Result<u64, LoadError> = async {
            let mut total = 0u64;
            let put = |b: Bytes| {
                let tx = tx.clone();
                async move { tx.send(Ok(b)).await.map_err(|_| LoadError::Archive("the Docker engine stopped reading the archive".into())) }
            };
            for (path, digest, size) in send {
                let h = tar_header(&path, size)?;
                total += h.len() as u64;
                put(h).await?;
                let mut stream = c
                    .read_blob(v1::ReadBlobRequest { session: session_id.clone(), digest: digest.to_string(), offset: 0 })
                    .await
                    .map_err(|s| LoadError::Blob { digest: digest.to_string(), message: s.message().to_string() })?
                    .into_inner();
                let mut got = 0u64;
                while let Some(m) = stream.next().await {
                    let m = m.map_err(|s| LoadError::Blob { digest: digest.to_string(), message: s.message().to_string() })?;
                    got += m.data.len() as u64;
                    put(Bytes::from(m.data)).await?;
                }
                if got != size {
                    return Err(LoadError::Export(format!("the builder sent {got} bytes of layer {digest}, expected {size}")));
                }
                let p = padding(size);
                total += size + p.len() as u64;
                put(p).await?;
            }
            for (name, data) in [(config_name.as_str(), config_bytes), ("manifest.json", manifest_json)] {
                let h = tar_header(name, data.len() as u64)?;
                let p = padding(data.len() as u64);
                total += h.len() as u64 + data.len() as u64 + p.len() as u64;
                put(h).await?;
                put(Bytes::from(data)).await?;
                put(p).await?;
            }
            put(Bytes::from(vec![0u8; 1024])).await?;
            Ok(total + 1024)
        }
        .await;
        if let Err(e) = &result {
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
        result
    });
    let opts = bollard::query_parameters::ImportImageOptionsBuilder::new().quiet(true).build();
    let mut s = engine.docker.import_image_stream(opts, tokio_stream::wrappers::ReceiverStream::new(rx), None);
    let mut msgs = String::new();
    let mut failure = None;
    while let Some(r) = s.next().await {
        match r {
            Ok(info) => {
                if let Some(e) = info.error_detail.and_then(|d| d.message) {
                    failure = Some(e);
                }
                if let Some(m) = info.stream {
                    msgs.push_str(&m);
                }
            }
            Err(e) => failure = Some(e.to_string()),
        }
    }
    let sent = producer.await.map_err(|e| LoadError::Io { what: "the archive writer failed".into(), error: std::io::Error::other(e) })?;
    if let Some(e) = failure {
        return Err(LoadError::Archive(e));
    }
    let bytes_served = sent?;
    Ok(LoadReport {
        path: LoadPath::Archive,
        why: Some(why),
        tags: tags.to_vec(),
        image_id: manifest.config.digest.to_string(),
        layers: diff_ids.len() as u64,
        layers_moved,
        layer_bytes_moved: layer_bytes,
        blobs_served: layers_moved + 1,
        bytes_served,
        early_layers: 0,
        early_bytes: 0,
        engine_pulled: 0,
        engine_existing: 0,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_into_repository_and_tag() {
        assert_eq!(repo_and_tag("app").unwrap(), ("app".into(), "latest".into()));
        assert_eq!(repo_and_tag("app:1").unwrap(), ("app".into(), "1".into()));
        assert_eq!(repo_and_tag("127.0.0.1:5001/team/app:v2").unwrap(), ("127.0.0.1:5001/team/app".into(), "v2".into()));
        assert_eq!(repo_and_tag("docker.io/library/busybox:1").unwrap(), ("busybox".into(), "1".into()));
        assert!(repo_and_tag("Bad Name").is_err());
    }

    #[test]
    fn archive_framing_is_tar() {
        let h = tar_header("abc/layer.tar", 700).unwrap();
        assert_eq!(h.len(), 512);
        assert_eq!(padding(700).len(), 324);
        assert_eq!(padding(1024).len(), 0);
        let mut bytes = h.to_vec();
        bytes.extend(vec![7u8; 700]);
        bytes.extend(padding(700).to_vec());
        bytes.extend(vec![0u8; 1024]);
        let mut a = tar::Archive::new(bytes.as_slice());
        let entries: Vec<_> = a.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(entries, vec!["abc/layer.tar"]);
    }

    #[test]
    fn the_report_says_what_moved_and_how() {
        let r = LoadReport {
            path: LoadPath::Registry,
            why: None,
            tags: vec!["app:1".into()],
            image_id: "sha256:x".into(),
            layers: 4,
            layers_moved: 1,
            layer_bytes_moved: 2048,
            blobs_served: 2,
            bytes_served: 3000,
            early_layers: 0,
            early_bytes: 0,
            engine_pulled: 1,
            engine_existing: 3,
            seconds: 0.25,
        };
        let line = r.line("--load");
        assert!(
            line.contains("1 layer(s) moved (2.0 kB), 3 already present; 2 blobs served, 3000 bytes (engine: 1 pulled, 3 already exist)"),
            "{line}"
        );
        let a = LoadReport { path: LoadPath::Archive, why: Some("no -t was given".into()), ..r };
        assert!(a.line("--load").contains("archive because no -t was given"), "{}", a.line("--load"));
    }
}
