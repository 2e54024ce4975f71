//! The engine: state on disk (content store, snapshots, cache index), and one build from a
//! Dockerfile to images, one per platform.
//!
//! A build runs the frontend once per platform, then solves the graph: every stage is a task
//! (independent stages run in parallel), every step is keyed ([`crate::cachekey`]) and either
//! reused from the cache index or run. Identical steps in flight from concurrent builds run
//! once (`solver::Inflight`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use hoist_oci::digest::Digest;
use hoist_oci::image::ImageConfig;
use hoist_oci::registry::RegistryClient;
use hoist_oci::store::ContentStore;
use tokio_util::sync::CancellationToken;

use crate::cache::{CacheIndex, Clock, SystemClock};
use crate::cachemount::CacheMounts;
use crate::context::Context;
use crate::executor::{Executor, RuncConfig, RuncExecutor};
use crate::graph::{FrontendOptions, NetworkMode, Platform};
use crate::images::{ImageSource, Registries};
use crate::progress::{Event, Progress};
use crate::snapshot::{Mounter, OverlayMounter, Snapshotter};
use crate::solver::{self, Inflight};

/// Why a step failed: the error of the part that failed, kept as the source, or a message.
pub type StepCause = Box<dyn std::error::Error + Send + Sync>;

/// Errors of a build, each saying what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The Dockerfile cannot be turned into a build graph.
    #[error(transparent)]
    Frontend(#[from] crate::frontend::FrontendError),
    /// A step needs an entitlement the build may not use.
    #[error(transparent)]
    Entitlement(#[from] crate::entitlements::EntitlementError),
    /// The client did not send the context paths the steps read.
    #[error("fetching more of the build context from the client: {0}")]
    Context(#[source] crate::context::Unavailable),
    /// A step failed; `location` is `Dockerfile:LINE`, `source` what failed (the part's own
    /// error, or a message).
    #[error("{location}: {instruction}: {source}")]
    Step {
        /// `<dockerfile name>:<line>` of the instruction.
        location: String,
        /// The instruction as progress shows it, e.g. `RUN make -j2`.
        instruction: String,
        /// What failed.
        source: StepCause,
    },
    /// A base image cannot be resolved or pulled.
    #[error("image {reference}: {source}")]
    Image {
        /// The image's normalized reference, e.g. `docker.io/library/alpine:3.20`.
        reference: String,
        /// Why it cannot be used.
        source: Box<crate::images::ImageError>,
    },
    /// An exporter failed.
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    /// The cache index failed.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// The content store failed.
    #[error(transparent)]
    Store(#[from] hoist_oci::store::StoreError),
    /// The snapshot store failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Garbage collection could not remove a project's cache mounts.
    #[error("garbage collection: removing {path}: {source}")]
    Collect {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A task of the engine failed (a bug).
    #[error("internal error: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Something that cannot happen did (a bug); the message says what.
    #[error("internal error: {0}")]
    Internal(String),
    /// An output that does not fit: a bad spec, or images it cannot take.
    #[error(transparent)]
    Output(#[from] crate::export::OutputError),
    /// The engine's state root (content store, snapshots, cache index, executor state)
    /// cannot be created, opened or made private when the engine opens.
    #[error("builder state at {path}: {message}")]
    State {
        /// The directory or file that failed.
        path: PathBuf,
        /// The underlying error.
        message: String,
    },
    /// The build's cancellation token fired; running steps were killed.
    #[error("build cancelled")]
    Cancelled,
    /// The builder has a per-build memory limit and cannot set up the build's cgroup.
    #[error("cannot hold the build to its memory limit (hoist serve --build-memory): {0}")]
    BuildMemory(#[source] crate::executor::CgroupError),
    /// The shared tier (`--cache-store`) cannot be opened or used.
    #[error(transparent)]
    Shared(#[from] crate::shared::SharedError),
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
    /// The shared tier's store (`--cache-store`: `s3://bucket/prefix`, `file:///dir`).
    pub cache_store: Option<String>,
}

/// Secrets and ssh agents a build may mount; both come from the client.
#[derive(Debug, Clone, Default)]
pub struct BuildSecrets {
    /// Secret values by id (`--secret id=...`), for `RUN --mount=type=secret`.
    pub secrets: HashMap<String, Vec<u8>>,
    /// The ssh agents the client forwards, for `RUN --mount=type=ssh`.
    pub ssh: crate::sshforward::SshAgents,
}

/// One build request.
#[derive(Clone)]
pub struct BuildRequest {
    /// Cache namespace (the project).
    pub namespace: String,
    /// The Dockerfile's bytes.
    pub dockerfile: Vec<u8>,
    /// Build args, target stage, labels and the Dockerfile's name for the frontend.
    pub frontend: FrontendOptions,
    /// Target platforms; empty = the host's.
    pub platforms: Vec<Platform>,
    /// The build context COPY/ADD and bind mounts read from.
    pub context: Arc<Context>,
    /// What of the context the client sent ([`crate::context::Reach::All`]: everything).
    pub context_reach: crate::context::Reach,
    /// Asks the client for context paths steps read beyond `context_reach`; without one,
    /// such a step sees no file there.
    pub context_fetcher: Option<Arc<dyn crate::context::ContextFetcher>>,
    /// The directories of `--build-context NAME=DIR`, by name ([`crate::graph::Source::Named`]).
    pub named_contexts: std::collections::BTreeMap<String, Arc<Context>>,
    /// `--no-cache`: run every step instead of reusing cache records (new records are still
    /// written).
    pub no_cache: bool,
    /// `--no-cache-filter`: stages (by name, any case) whose steps run instead of reusing
    /// cache records.
    pub no_cache_stages: Vec<String>,
    /// `--pull`: resolve base image references at the registry even when this namespace
    /// already has them.
    pub pull: bool,
    /// `docker build --network`: the default for RUN steps without `--network`.
    pub network: NetworkMode,
    /// What steps may do beyond the sandbox; checked before any step runs.
    pub entitlements: crate::entitlements::Entitlements,
    /// `--shm-size`: the size of /dev/shm of RUN steps (default 64 MiB).
    pub shm_size: Option<u64>,
    /// `--ulimit`: resource limits of RUN steps.
    pub ulimits: Vec<crate::executor::Ulimit>,
    /// `--add-host` entries as `(hostname, ip)`, added to /etc/hosts of RUN steps.
    pub add_hosts: Vec<(String, String)>,
    /// Secrets and ssh agents the steps may mount.
    pub secrets: BuildSecrets,
    /// Registry access for this build (credentials the client forwarded).
    pub registry: RegistryClient,
    /// When an output needs the image's layers as blobs (its layer compression):
    /// a new layer of the target image is compressed as soon as its step ends, while
    /// later steps run, instead of after the build ([`Engine::layer_blob`]).
    pub eager_blobs: Option<crate::export::LayerCompression>,
    /// Where to announce the target image's lower layers as soon as they are final (its
    /// base once pulled, then the layers up to each step of it that ran), so that an output
    /// can start moving them while the build goes on (`--load`'s early import).
    pub early_layers: Option<tokio::sync::mpsc::UnboundedSender<EarlyLayers>>,
    /// What the outputs need of the result's layers ([`crate::export::Exporter::needs`]):
    /// on a fleet node, a layer found in the shared tier is fetched only as far as that.
    pub needs: crate::LayerNeeds,
}

/// Final lower layers of a target image ([`BuildRequest::early_layers`]): `diff_ids` (bottom
/// first) are the bottom of the image built for `platform`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyLayers {
    /// The platform of the image.
    pub platform: Platform,
    /// Its lowest layers, bottom first.
    pub diff_ids: Vec<Digest>,
}

/// One built image (one platform).
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The platform the image was built for.
    pub platform: Platform,
    /// The image configuration, with its rootfs diff ids and history.
    pub config: ImageConfig,
    /// Serialized config (its digest is the image id).
    pub config_bytes: Vec<u8>,
    /// Digest of `config_bytes` (stored in the content store).
    pub config_digest: Digest,
    /// The images the build read for it (base images, `COPY --from` images), with the
    /// digests they resolved to: its provenance's materials. Empty when not known.
    pub materials: Vec<crate::export::provenance::Material>,
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
    /// One image per requested platform, in the order of [`BuildRequest::platforms`].
    pub images: Vec<BuiltImage>,
    /// Steps (all platforms) executed by this build or by an identical step in flight in
    /// another build.
    pub steps_run: u32,
    /// Steps (all platforms) reused from the cache index.
    pub steps_cached: u32,
    /// RUN steps that started a container.
    pub containers_run: u32,
    /// Wall-clock time of the build, in seconds.
    pub seconds: f64,
    /// The leases on the build's layers; garbage collection keeps them while this lives.
    pub leases: Arc<crate::gc::LeaseSet>,
}

/// The parts of an engine that touch the machine or the world, injected so that the logic
/// between them (solver, cache, in-flight sharing, cancellation, collection, export) runs in
/// plain unit tests: [`Engine::open`] uses runc, overlayfs, registries and the system clock;
/// tests use [`crate::testing`]'s fakes ([`Engine::with_parts`]).
#[derive(Clone)]
pub struct EngineParts {
    /// Runs RUN steps.
    pub executor: Arc<dyn Executor>,
    /// Mounts the layer stacks steps run on.
    pub mounter: Arc<dyn Mounter>,
    /// Where base images come from.
    pub images: Arc<dyn ImageSource>,
    /// The time records carry.
    pub clock: Arc<dyn Clock>,
    /// The shared tier of a fleet's cache, when there is one.
    pub shared: Option<crate::shared::SharedStore>,
}

pub(crate) struct Inner {
    pub root: PathBuf,
    pub store: ContentStore,
    pub snapshots: Snapshotter,
    pub executor: Arc<dyn Executor>,
    pub images: Arc<dyn ImageSource>,
    pub index: CacheIndex,
    pub inflight: Inflight,
    pub cache_mounts: CacheMounts,
    pub leases: Arc<crate::gc::Leases>,
    pub limits: crate::limits::Limits,
    pub shared: Option<Arc<crate::shared::SharedTier>>,
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
    /// Open (creating if needed) the engine state under `config.root` with the machine's
    /// parts (runc, overlayfs, registries, the system clock), recovering from a crash:
    /// leftover mounts, temporary directories and containers are removed.
    pub fn open(config: &EngineConfig) -> Result<Engine, EngineError> {
        let root = &config.root;
        make_private(root).map_err(|e| state_err(root, e))?;
        // The executor first: it kills containers a crashed builder left, before the
        // snapshotter removes their mounts.
        let exec_root = root.join("executor");
        let executor = RuncExecutor::new(RuncConfig { runtime: config.runtime.clone(), ..RuncConfig::new(&exec_root) })
            .map_err(|e| state_err(&exec_root, e))?;
        if let Some(limit) = config.limits.build_memory {
            // A builder that cannot limit builds' memory refuses to start, rather than fail
            // every build: make (and remove) one build cgroup now.
            let probe = crate::executor::BuildCgroup::create(&crate::executor::random_build_name(), limit);
            drop(probe.map_err(EngineError::BuildMemory)?);
        }
        let parts = EngineParts {
            executor: Arc::new(executor),
            mounter: Arc::new(OverlayMounter::new()),
            images: Arc::new(Registries),
            clock: Arc::new(SystemClock),
            shared: config.cache_store.as_deref().map(crate::shared::SharedStore::from_url).transpose()?,
        };
        Self::with_parts(config, parts)
    }

    /// Open the engine state under `config.root` (`config.runtime` is not used) with the
    /// given parts.
    pub fn with_parts(config: &EngineConfig, parts: EngineParts) -> Result<Engine, EngineError> {
        let root = config.root.clone();
        make_private(&root).map_err(|e| state_err(&root, e))?;
        let store = ContentStore::open(root.join("content")).map_err(|e| state_err(&root, e))?;
        let snapshots = Snapshotter::with_mounter(root.join("snapshots"), parts.mounter).map_err(|e| state_err(&root, e))?;
        let index_path = root.join("cache.redb");
        let index = CacheIndex::open_with_clock(&index_path, parts.clock).map_err(|e| state_err(&index_path, e))?;
        std::fs::create_dir_all(root.join("cachemounts")).map_err(|e| state_err(&root, e))?;
        let cache_mounts = CacheMounts::new(root.join("cachemounts"));
        // What the parts above created is brought to 0700/0600 too.
        make_private(&root).map_err(|e| state_err(&root, e))?;
        Ok(Engine {
            inner: Arc::new(Inner {
                root,
                store,
                snapshots,
                executor: parts.executor,
                images: parts.images,
                index,
                inflight: Inflight::default(),
                cache_mounts,
                leases: Arc::default(),
                limits: config.limits.clone(),
                shared: parts.shared.map(|s| Arc::new(crate::shared::SharedTier::new(s))),
            }),
        })
    }

    /// The shared tier, when the engine has one.
    pub fn shared(&self) -> Option<&Arc<crate::shared::SharedTier>> {
        self.inner.shared.as_ref()
    }

    /// Wait until every write to the shared tier queued so far has ended (before a builder
    /// exits).
    pub async fn flush_shared(&self) {
        if let Some(t) = self.shared() {
            t.flush().await;
        }
    }

    /// Wait until every step result queued for the shared tier so far is written (before a
    /// build that pushes or saves reports done).
    pub async fn flush_shared_results(&self) {
        if let Some(t) = self.shared() {
            t.flush_results().await;
        }
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
                crate::executor::BuildCgroup::create(&crate::executor::random_build_name(), limit).map_err(EngineError::BuildMemory)?,
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
