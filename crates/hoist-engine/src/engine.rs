//! The engine: state on disk (content store, snapshots, cache index), and one build from a
//! Dockerfile to images, one per platform.
//!
//! A build runs the frontend once per platform, then solves the graph: every stage is a task
//! (independent stages run in parallel), every step is keyed ([`crate::cachekey`]) and either
//! reused from the cache index or run. Identical steps in flight from concurrent builds run
//! once ([`crate::solver::Inflight`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use hoist_oci::compress::Compression;
use hoist_oci::digest::Digest;
use hoist_oci::image::ImageConfig;
use hoist_oci::registry::RegistryClient;
use hoist_oci::store::ContentStore;
use tokio_util::sync::CancellationToken;

use crate::cache::CacheIndex;
use crate::cachemount::CacheMounts;
use crate::context::Context;
use crate::executor::{Executor, RuncConfig, RuncExecutor};
use crate::graph::{FrontendOptions, NetworkMode, Platform};
use crate::progress::{Event, Progress};
use crate::snapshot::Snapshotter;
use crate::solver::{self, Inflight};

/// Errors of a build, each saying what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Frontend(String),
    /// A step failed; `location` is `Dockerfile:LINE`.
    #[error("{location}: {instruction}: {message}")]
    Step { location: String, instruction: String, message: String },
    #[error("{0}")]
    Image(String),
    #[error("{0}")]
    Export(String),
    /// An output that does not fit: a bad spec, or images it cannot take.
    #[error(transparent)]
    Output(#[from] crate::export::OutputError),
    #[error("builder state at {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("build cancelled")]
    Cancelled,
    /// The builder has a per-build memory limit and cannot set up the build's cgroup.
    #[error("cannot hold the build to its memory limit (hoist serve --build-memory): {0}")]
    BuildMemory(String),
    /// The error of another stage (or step) this one waited for, shared by every waiter:
    /// a failed `RUN` in a base stage stays a step error wherever it surfaces.
    #[error(transparent)]
    Stage(Arc<EngineError>),
}

impl EngineError {
    /// The error itself, through any [`EngineError::Stage`] wrapping.
    pub fn root(&self) -> &EngineError {
        match self {
            EngineError::Stage(e) => e.root(),
            other => other,
        }
    }
}

/// Where the engine keeps its state and how it runs steps.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// State root (`/var/lib/hoist` or `$HOIST_ROOT`).
    pub root: PathBuf,
    /// OCI runtime binary; `None` = find runc/crun on PATH (or `HOIST_RUNTIME`).
    pub runtime: Option<PathBuf>,
    /// Registries to talk to over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// What every build is held to (Dockerfile, context, archives, RUN time, output).
    pub limits: crate::limits::Limits,
}

/// Secrets and ssh agents a build may mount; both come from the client.
#[derive(Debug, Clone, Default)]
pub struct BuildSecrets {
    pub secrets: HashMap<String, Vec<u8>>,
    pub ssh: crate::sshforward::SshAgents,
}

/// One build request.
#[derive(Clone)]
pub struct BuildRequest {
    /// Cache namespace (the project).
    pub namespace: String,
    pub dockerfile: Vec<u8>,
    pub frontend: FrontendOptions,
    /// Target platforms; empty = the host's.
    pub platforms: Vec<Platform>,
    pub context: Arc<Context>,
    /// What of the context the client sent ([`crate::context::Reach::All`]: everything).
    pub context_reach: crate::context::Reach,
    /// Asks the client for context paths steps read beyond `context_reach`; without one,
    /// such a step sees no file there.
    pub context_fetcher: Option<Arc<dyn crate::context::ContextFetcher>>,
    pub no_cache: bool,
    pub pull: bool,
    /// `docker build --network`: the default for RUN steps without `--network`.
    pub network: NetworkMode,
    /// What steps may do beyond the sandbox; checked before any step runs.
    pub entitlements: crate::entitlements::Entitlements,
    pub add_hosts: Vec<(String, String)>,
    pub secrets: BuildSecrets,
    /// Registry access for this build (credentials the client forwarded).
    pub registry: RegistryClient,
    /// When an output needs the image's layers as blobs (compression, force-compression):
    /// a new layer of the target image is compressed as soon as its step ends, while
    /// later steps run, instead of after the build ([`Engine::layer_blob`]).
    pub eager_blobs: Option<(Compression, bool)>,
}

/// One built image (one platform).
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub platform: Platform,
    pub config: ImageConfig,
    /// Serialized config (its digest is the image id).
    pub config_bytes: Vec<u8>,
    pub config_digest: Digest,
}

impl BuiltImage {
    /// The layers bottom first.
    pub fn diff_ids(&self) -> &[Digest] {
        &self.config.rootfs.diff_ids
    }
}

/// The result of a build. It holds the build's layers against garbage collection until
/// dropped, so keep it while exporting.
pub struct BuildOutcome {
    pub images: Vec<BuiltImage>,
    pub steps_run: u32,
    pub steps_cached: u32,
    /// RUN steps that started a container.
    pub containers_run: u32,
    pub seconds: f64,
    pub leases: Arc<crate::gc::LeaseSet>,
}

pub(crate) struct Inner {
    pub root: PathBuf,
    pub store: ContentStore,
    pub snapshots: Snapshotter,
    pub executor: Arc<dyn Executor>,
    pub index: CacheIndex,
    pub inflight: Inflight,
    pub cache_mounts: CacheMounts,
    pub leases: Arc<crate::gc::Leases>,
    pub limits: crate::limits::Limits,
}

/// The build engine. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

/// Make the state root private to its owner (root): created 0700, and an existing root and
/// what is directly in it (the store's directories, indexes, logs, sockets) brought to
/// 0700/0600 when they were wider. Below those, nobody else can even traverse; layer trees
/// keep the modes their images give them.
pub fn make_private(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(root)?.flatten() {
        let Ok(meta) = e.path().symlink_metadata() else { continue };
        let want = if meta.is_dir() {
            0o700
        } else if meta.file_type().is_symlink() {
            continue;
        } else {
            0o600
        };
        if meta.permissions().mode() & 0o7777 != want {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(want))?;
        }
    }
    Ok(())
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::State { path: path.to_path_buf(), message: e.to_string() }
}

impl Engine {
    /// Open (creating if needed) the engine state under `config.root`, recovering from a
    /// crash: leftover mounts, temporary directories and containers are removed.
    pub fn open(config: &EngineConfig) -> Result<Engine, EngineError> {
        let root = config.root.clone();
        make_private(&root).map_err(|e| state_err(&root, e))?;
        let store = ContentStore::open(root.join("content")).map_err(|e| state_err(&root, e))?;
        // The executor first: it kills containers a crashed builder left, before the
        // snapshotter removes their mounts.
        let exec_root = root.join("executor");
        let executor = RuncExecutor::new(RuncConfig { runtime: config.runtime.clone(), ..RuncConfig::new(&exec_root) })
            .map_err(|e| state_err(&exec_root, e))?;
        if let Some(limit) = config.limits.build_memory {
            // A builder that cannot limit builds' memory refuses to start, rather than fail
            // every build: make (and remove) one build cgroup now.
            let probe = crate::executor::BuildCgroup::create(&crate::executor::random_build_name(), limit);
            drop(probe.map_err(|e| EngineError::BuildMemory(e.to_string()))?);
        }
        let snapshots = Snapshotter::new(root.join("snapshots")).map_err(|e| state_err(&root, e))?;
        let index_path = root.join("cache.redb");
        let index = CacheIndex::open(&index_path).map_err(|e| state_err(&index_path, e))?;
        std::fs::create_dir_all(root.join("cachemounts")).map_err(|e| state_err(&root, e))?;
        let cache_mounts = CacheMounts::new(root.join("cachemounts"));
        // What the parts above created is brought to 0700/0600 too.
        make_private(&root).map_err(|e| state_err(&root, e))?;
        Ok(Engine {
            inner: Arc::new(Inner {
                root,
                store,
                snapshots,
                executor: Arc::new(executor),
                index,
                inflight: Inflight::default(),
                cache_mounts,
                leases: Arc::default(),
                limits: config.limits.clone(),
            }),
        })
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The content store (blobs of layers, configs, manifests).
    pub fn store(&self) -> &ContentStore {
        &self.inner.store
    }

    /// The snapshotter (layer directories).
    pub fn snapshots(&self) -> &Snapshotter {
        &self.inner.snapshots
    }

    /// The limits every build is held to.
    pub fn limits(&self) -> &crate::limits::Limits {
        &self.inner.limits
    }

    /// The cache index.
    pub fn index(&self) -> &CacheIndex {
        &self.inner.index
    }

    /// The `RUN --mount=type=cache` directories.
    pub fn cache_mounts(&self) -> &CacheMounts {
        &self.inner.cache_mounts
    }

    /// Build `req`: one image per platform. Progress goes to `progress`; cancelling
    /// `cancel` kills running steps and returns [`EngineError::Cancelled`].
    pub async fn build(&self, req: BuildRequest, progress: Progress, cancel: CancellationToken) -> Result<BuildOutcome, EngineError> {
        let started = Instant::now();
        let platforms = if req.platforms.is_empty() { vec![Platform::host()] } else { req.platforms.clone() };
        let req = Arc::new(req);
        let counters = Arc::new(solver::Counters::default());
        let vertices = Arc::new(solver::VertexIds::default());
        let leases = Arc::new(self.lease_set());
        // One cgroup for every RUN step of this build (all platforms), with its memory
        // limit; steps that outlive the build (shared with another build in flight) hold it.
        let cgroup = match self.inner.limits.build_memory {
            Some(limit) => Some(Arc::new(
                crate::executor::BuildCgroup::create(&crate::executor::random_build_name(), limit)
                    .map_err(|e| EngineError::BuildMemory(e.to_string()))?,
            )),
            None => None,
        };
        let mut tasks = Vec::new();
        for platform in platforms {
            let engine = self.clone();
            let req = req.clone();
            let progress = progress.clone();
            let cancel = cancel.clone();
            let counters = counters.clone();
            let vertices = vertices.clone();
            let leases = leases.clone();
            let cgroup = cgroup.clone();
            tasks.push(
                async move { solver::build_platform(engine, req, platform, progress, cancel, counters, vertices, leases, cgroup).await },
            );
        }
        let results = futures::future::join_all(tasks).await;
        let mut images = Vec::new();
        for r in results {
            images.push(r?);
        }
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        Ok(BuildOutcome {
            images,
            steps_run: counters.run(),
            steps_cached: counters.cached(),
            containers_run: counters.containers(),
            seconds: started.elapsed().as_secs_f64(),
            leases,
        })
    }

    /// Send a warning to the progress stream.
    pub(crate) fn warn(progress: &Progress, msg: String) {
        progress.send(Event::Warning(msg));
    }
}
