//! Test doubles of the engine's injected parts ([`crate::EngineParts`]), so that the logic
//! between them runs in plain unit tests: no root, no runc, no registry.
//!
//! - [`FakeExecutor`] runs a RUN step's command as a tiny script against the step's rootfs
//!   and records every step it was given; a [`CopyMounter`] turns what it changed into the
//!   step's layer.
//! - [`MemoryImages`] serves base images from memory.
//! - [`ManualClock`] moves only when told to.
//!
//! ```
//! use hoist_engine::testing::TestEngine;
//! let t = TestEngine::new();
//! let req = t.request("team", "FROM scratch\nRUN write /a hello\n", &[]);
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! let out = rt.block_on(t.build(req)).unwrap();
//! assert_eq!((out.steps_run, t.executor.scripts()), (1, vec!["write /a hello".to_string()]));
//! ```
//!
//! The fake's script language (the command of `RUN cmd` or `RUN ["cmd", ...]`), commands
//! separated by `;`:
//! - `write PATH TEXT…`: write a file (parents created);
//! - `rm PATH`: remove a file;
//! - `echo TEXT…`: print to stdout;
//! - `cat PATH`: print a file as the step sees it (bind mounts first, then the rootfs);
//! - `exit N`: end with exit code N;
//! - `hold`: wait until [`FakeExecutor::release`] or cancellation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hoist_oci::digest::Digest;
use hoist_oci::reference::Reference;
use hoist_oci::registry::{Platform, RegistryClient, RegistryError};
use hoist_oci::store::ContentStore;
use tokio::sync::mpsc::Sender;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::ManualClock;
use crate::context::{Context, ContextEntry, EntryKind};
use crate::executor::{ExecError, ExecMount, Executor, ExitStatus, LogChunk, LogStream, RunSpec};
use crate::graph::NetworkMode;
use crate::images::{ImageSource, SourceImage};
use crate::progress::Progress;
use crate::snapshot::CopyMounter;
use crate::{BuildOutcome, BuildRequest, EngineConfig, EngineError, EngineParts};

/// An [`Executor`] that interprets a step's command (see the module docs) against its
/// rootfs and records it.
#[derive(Default)]
pub struct FakeExecutor {
    runs: Mutex<Vec<RunSpec>>,
    started: watch::Sender<usize>,
    released: watch::Sender<bool>,
}

impl FakeExecutor {
    /// A fake that has run nothing.
    pub fn new() -> FakeExecutor {
        FakeExecutor::default()
    }

    /// Every step started so far, in start order.
    pub fn runs(&self) -> Vec<RunSpec> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The script of each step started so far (the last argument of its command).
    pub fn scripts(&self) -> Vec<String> {
        self.runs().iter().map(|r| r.args.last().cloned().unwrap_or_default()).collect()
    }

    /// Wait until `n` steps have started.
    pub async fn wait_started(&self, n: usize) {
        let mut rx = self.started.subscribe();
        let _ = rx.wait_for(|&s| s >= n).await;
    }

    /// Let every `hold` (waiting or to come) go on.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    fn record(&self, spec: &RunSpec) {
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).push(spec.clone());
        self.started.send_modify(|n| *n += 1);
    }

    /// Where a file the step names is read: the source of a bind mount that covers it,
    /// else the merged rootfs.
    fn visible(spec: &RunSpec, path: &str) -> PathBuf {
        for m in &spec.mounts {
            if let ExecMount::Bind { source, target, .. } = m {
                if let Ok(rest) = Path::new(path).strip_prefix(target) {
                    return if rest.as_os_str().is_empty() { source.clone() } else { source.join(rest) };
                }
            }
        }
        spec.rootfs.join(path.trim_start_matches('/'))
    }
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> ExecError + '_ {
    move |e| ExecError::io(context, e)
}

#[async_trait::async_trait]
impl Executor for FakeExecutor {
    async fn run(&self, spec: RunSpec, logs: Sender<LogChunk>, cancel: CancellationToken) -> Result<ExitStatus, ExecError> {
        self.record(&spec);
        let command = crate::executor::describe_command(&spec.args);
        let script = spec.args.last().cloned().unwrap_or_default();
        for cmd in script.split(';').map(str::trim).filter(|c| !c.is_empty()) {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            let out = |stream, text: String| logs.send(LogChunk { stream, data: Bytes::from(text) });
            match words.as_slice() {
                ["write", path, text @ ..] => {
                    let file = spec.rootfs.join(path.trim_start_matches('/'));
                    if let Some(dir) = file.parent() {
                        std::fs::create_dir_all(dir).map_err(io("create a directory"))?;
                    }
                    std::fs::write(&file, text.join(" ")).map_err(io("write a file"))?;
                }
                ["rm", path] => {
                    std::fs::remove_file(spec.rootfs.join(path.trim_start_matches('/'))).map_err(io("remove a file"))?;
                }
                ["echo", text @ ..] => {
                    let _ = out(LogStream::Stdout, format!("{}\n", text.join(" "))).await;
                }
                ["cat", path] => match std::fs::read_to_string(Self::visible(&spec, path)) {
                    Ok(text) => {
                        let _ = out(LogStream::Stdout, text).await;
                    }
                    Err(e) => {
                        let _ = out(LogStream::Stderr, format!("cat: {path}: {e}\n")).await;
                        return Ok(ExitStatus { code: 1 });
                    }
                },
                ["exit", code] => return Ok(ExitStatus { code: code.parse().unwrap_or(1) }),
                ["hold"] => {
                    let mut released = self.released.subscribe();
                    tokio::select! {
                        _ = released.wait_for(|&r| r) => {}
                        _ = cancel.cancelled() => return Err(ExecError::Cancelled { command }),
                    }
                }
                _ => {
                    return Err(ExecError::Start { command, message: format!("the fake executor does not know {cmd:?}") });
                }
            }
        }
        Ok(ExitStatus { code: 0 })
    }
}

/// An [`ImageSource`] that serves images added with [`MemoryImages::add`], for any
/// platform, and counts the blobs fetched.
#[derive(Default)]
pub struct MemoryImages {
    images: Mutex<HashMap<String, SourceImage>>,
    blobs: Mutex<HashMap<Digest, Vec<u8>>>,
    fetched: Mutex<Vec<Digest>>,
}

impl MemoryImages {
    /// An empty source.
    pub fn new() -> MemoryImages {
        MemoryImages::default()
    }

    /// Add an image under `reference` (as `FROM` names it) with one uncompressed layer per
    /// entry of `layers`, each a list of `(path, content)` files; `env` goes in its config.
    /// Returns the manifest digest.
    pub fn add(&self, reference: &str, layers: &[&[(&str, &str)]], env: &[&str]) -> Digest {
        let mut descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        for files in layers {
            let dir = tempfile::tempdir().expect("a temporary directory");
            for (path, content) in *files {
                let p = dir.path().join(path);
                std::fs::create_dir_all(p.parent().expect("a file below the layer root")).expect("a layer directory");
                std::fs::write(&p, content).expect("a layer file");
            }
            let mut tar = Vec::new();
            hoist_oci::layer::write_layer_tar(dir.path(), &mut tar, &Default::default()).expect("a layer tar");
            let digest = Digest::of(&tar);
            descriptors.push(serde_json::json!({
                "mediaType": hoist_oci::image::media::OCI_LAYER, "digest": digest.to_string(), "size": tar.len()
            }));
            diff_ids.push(digest.to_string());
            self.lock_blobs().insert(digest, tar);
        }
        let host = Platform::host();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": host.architecture, "os": host.os,
            "config": { "Env": env },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))
        .expect("a config");
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": hoist_oci::image::media::OCI_MANIFEST,
            "config": { "mediaType": hoist_oci::image::media::OCI_CONFIG, "digest": Digest::of(&config).to_string(), "size": config.len() },
            "layers": descriptors,
        }))
        .expect("a manifest");
        let manifest_digest = Digest::of(&manifest);
        let canonical = Reference::parse(reference).expect("a valid reference").to_string();
        let image = SourceImage { manifest_digest: manifest_digest.clone(), manifest_bytes: manifest, config_bytes: config };
        self.images.lock().unwrap_or_else(|e| e.into_inner()).insert(canonical, image);
        manifest_digest
    }

    /// The blobs fetched so far, in order.
    pub fn fetched(&self) -> Vec<Digest> {
        self.fetched.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_blobs(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Vec<u8>>> {
        self.blobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn not_found(reference: &Reference, what: String) -> RegistryError {
    RegistryError::NotFound { registry: reference.registry.clone(), what, reason: "not in the test's MemoryImages".into() }
}

#[async_trait::async_trait]
impl ImageSource for MemoryImages {
    async fn resolve(&self, _: &RegistryClient, reference: &Reference, _: &Platform) -> Result<SourceImage, RegistryError> {
        let images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        images.get(&reference.to_string()).cloned().ok_or_else(|| not_found(reference, format!("image {reference}")))
    }

    async fn fetch_blob(
        &self,
        _: &RegistryClient,
        reference: &Reference,
        digest: &Digest,
        store: &ContentStore,
    ) -> Result<u64, RegistryError> {
        let bytes = self.lock_blobs().get(digest).cloned().ok_or_else(|| not_found(reference, format!("blob {digest}")))?;
        store.put(&bytes).map_err(|source| RegistryError::Store { image: reference.to_string(), source })?;
        self.fetched.lock().unwrap_or_else(|e| e.into_inner()).push(digest.clone());
        Ok(bytes.len() as u64)
    }
}

/// An image of `platform` (`os/arch`) without layers, as a build returns it.
pub fn empty_image(platform: &str) -> crate::BuiltImage {
    let p = Platform::parse(platform).expect("a valid platform");
    let config: hoist_oci::image::ImageConfig = serde_json::from_value(serde_json::json!({
        "architecture": p.architecture, "os": p.os, "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .expect("an image config");
    let bytes = serde_json::to_vec(&config).expect("a serialized config");
    crate::BuiltImage { platform: p, config, config_digest: Digest::of(&bytes), config_bytes: bytes, materials: Vec::new() }
}

/// A context of `files` (`(path, content)`) written into `dir`.
pub fn context(dir: &Path, files: &[(&str, &str)]) -> Context {
    let mut entries = Vec::new();
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("a file below the context root")).expect("a context directory");
        std::fs::write(&p, content).expect("a context file");
        entries.push(ContextEntry {
            path: path.to_string(),
            kind: EntryKind::File,
            mode: 0o644,
            size: content.len() as u64,
            digest: Some(Digest::of(content.as_bytes())),
            link_target: None,
            hardlink: None,
        });
    }
    Context::new(dir.to_path_buf(), entries)
}

/// An engine on fakes in a temporary directory, with its parts at hand.
pub struct TestEngine {
    /// The engine.
    pub engine: crate::Engine,
    /// Its executor.
    pub executor: Arc<FakeExecutor>,
    /// Its mounter.
    pub mounter: Arc<CopyMounter>,
    /// Its image source.
    pub images: Arc<MemoryImages>,
    /// Its clock (starts at 1,000,000 s).
    pub clock: Arc<ManualClock>,
    /// The state root (and room for contexts).
    pub dir: tempfile::TempDir,
}

impl TestEngine {
    /// A fresh engine with default limits.
    pub fn new() -> TestEngine {
        Self::with_shared(None)
    }

    /// A fresh engine with default limits and `shared` as its shared tier (a fleet's nodes
    /// are engines with one store, e.g. `object_store`'s `InMemory`).
    pub fn with_shared(shared: Option<crate::shared::SharedStore>) -> TestEngine {
        Self::with_shared_images(shared, Arc::new(MemoryImages::new()))
    }

    /// As [`TestEngine::with_shared`], with base images from `images` (one "registry" for
    /// the nodes of a fleet).
    pub fn with_shared_images(shared: Option<crate::shared::SharedStore>, images: Arc<MemoryImages>) -> TestEngine {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mounter = Arc::new(CopyMounter::new());
        let executor = Arc::new(FakeExecutor::new());
        let clock = Arc::new(ManualClock::at(1_000_000));
        let config = EngineConfig {
            root: dir.path().join("state"),
            runtime: None,
            insecure_registries: Vec::new(),
            limits: crate::Limits::default(),
            cache_store: None,
        };
        let parts =
            EngineParts { executor: executor.clone(), mounter: mounter.clone(), images: images.clone(), clock: clock.clone(), shared };
        let engine = crate::Engine::with_parts(&config, parts).expect("an engine on fakes");
        TestEngine { engine, executor, mounter, images, clock, dir }
    }
}

impl TestEngine {
    /// A build of `dockerfile` for `namespace` with a context of `files` (written into a
    /// fresh directory), for the host's platform.
    pub fn request(&self, namespace: &str, dockerfile: &str, files: &[(&str, &str)]) -> BuildRequest {
        let ctx = tempfile::Builder::new().prefix("context-").tempdir_in(self.dir.path()).expect("a context directory").keep();
        BuildRequest {
            namespace: namespace.into(),
            dockerfile: dockerfile.as_bytes().to_vec(),
            frontend: Default::default(),
            platforms: Vec::new(),
            context: Arc::new(context(&ctx, files)),
            context_reach: Default::default(),
            context_fetcher: None,
            named_contexts: Default::default(),
            no_cache: false,
            no_cache_stages: Vec::new(),
            pull: false,
            network: NetworkMode::Default,
            entitlements: Default::default(),
            add_hosts: Vec::new(),
            shm_size: None,
            ulimits: Vec::new(),
            secrets: Default::default(),
            registry: RegistryClient::new(Default::default()).expect("a registry client"),
            eager_blobs: None,
            early_layers: None,
            needs: Default::default(),
        }
    }

    /// Run `req` to its end, discarding progress.
    pub async fn build(&self, req: BuildRequest) -> Result<BuildOutcome, EngineError> {
        self.engine.build(req, Progress::discard(), CancellationToken::new()).await
    }
}

impl Default for TestEngine {
    fn default() -> Self {
        Self::new()
    }
}
