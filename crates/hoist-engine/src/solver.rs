//! The solver: stages as parallel tasks, steps keyed and reused or run, identical in-flight
//! steps run once, and the image config of the result assembled.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};
use hoist_oci::digest::Digest;
use hoist_oci::image::{History, ImageConfig, RootFs};
use tokio_util::sync::CancellationToken;

use crate::cache::StepRecord;
use crate::cachekey::{self, CacheKey};
use crate::engine::{BuildRequest, BuiltImage, Engine, EngineError};
use crate::executor::BuildCgroup;
use crate::frontend;
use crate::gc::LeaseSet;
use crate::graph::{Base, BuildGraph, Op, Platform, Source, Stage, StageId, Step};
use crate::images::BuildResolver;
use crate::progress::{Event, Progress, StepKey};
use crate::shared::Entry;
use crate::steps::{self, StepEnv};

/// Counts of steps run and reused in one build.
#[derive(Debug, Default)]
pub struct Counters {
    run: AtomicU32,
    cached: AtomicU32,
    pub(crate) containers: AtomicU32,
}

impl Counters {
    pub fn run(&self) -> u32 {
        self.run.load(Ordering::Relaxed)
    }
    pub fn cached(&self) -> u32 {
        self.cached.load(Ordering::Relaxed)
    }
    pub fn containers(&self) -> u32 {
        self.containers.load(Ordering::Relaxed)
    }
}

/// Vertex ids of one build.
#[derive(Debug, Default)]
pub struct VertexIds(AtomicU32);

impl VertexIds {
    fn next(&self) -> u32 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// What a finished step produced, shared by everyone waiting on it.
pub(crate) type StepOutput = Result<Option<Digest>, Arc<EngineError>>;

type SharedStep = Shared<BoxFuture<'static, StepOutput>>;

/// Steps in flight across all builds, by cache key: a second build asking for a key that
/// is running waits for the first instead of running it again. The work is cancelled only
/// when every build waiting on it has gone.
#[derive(Default)]
pub struct Inflight {
    map: Mutex<HashMap<String, (SharedStep, Arc<Interest>)>>,
}

/// Who still waits on an in-flight step.
struct Interest {
    waiters: AtomicUsize,
    cancel: CancellationToken,
}

/// A waiter's registration; dropping it (the build ended or was cancelled) withdraws it.
struct InterestGuard(Arc<Interest>);

impl Drop for InterestGuard {
    fn drop(&mut self) {
        if self.0.waiters.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.cancel.cancel();
        }
    }
}

impl Inflight {
    /// Run `work` under `key` unless it is already running, and wait for its output. The
    /// second element says whether this call started the work.
    pub(crate) async fn run<F, Fut>(&self, key: &str, cancel: &CancellationToken, work: F) -> (StepOutput, bool)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = StepOutput> + Send + 'static,
    {
        let (shared, interest, started) = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(key) {
                Some((s, i)) if !i.cancel.is_cancelled() => {
                    i.waiters.fetch_add(1, Ordering::AcqRel);
                    (s.clone(), i.clone(), false)
                }
                _ => {
                    let interest = Arc::new(Interest { waiters: AtomicUsize::new(1), cancel: CancellationToken::new() });
                    let fut = work(interest.cancel.clone());
                    // Spawned so that it progresses (and cleans up) even if the first
                    // waiter goes away while others still wait.
                    let handle = tokio::spawn(fut);
                    let shared: SharedStep = async move {
                        match handle.await {
                            Ok(out) => out,
                            Err(e) => Err(Arc::new(EngineError::Task(e))),
                        }
                    }
                    .boxed()
                    .shared();
                    map.insert(key.to_string(), (shared.clone(), interest.clone()));
                    (shared, interest, true)
                }
            }
        };
        let guard = InterestGuard(interest);
        let out = tokio::select! {
            out = shared => out,
            _ = cancel.cancelled() => Err(Arc::new(EngineError::Cancelled)),
        };
        drop(guard);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, _)) = map.get(key) {
            if s.peek().is_some() {
                map.remove(key);
            }
        }
        (out, started)
    }
}

/// The state at the end of a stage.
#[derive(Debug, Clone)]
pub(crate) struct StageState {
    /// Key of the filesystem state (what later steps and stages key on).
    pub key: CacheKey,
    /// Layers, bottom first.
    pub layers: Vec<Digest>,
    /// History so far (base image's included), matching `layers`.
    pub history: Vec<History>,
}

type SharedStage = Shared<BoxFuture<'static, Result<Arc<StageState>, Arc<EngineError>>>>;

/// Everything a stage task needs.
pub(crate) struct Build {
    pub engine: Engine,
    pub req: Arc<BuildRequest>,
    pub graph: Arc<BuildGraph>,
    pub platform: Platform,
    pub progress: Progress,
    pub cancel: CancellationToken,
    pub counters: Arc<Counters>,
    pub vertices: Arc<VertexIds>,
    pub resolver: Arc<BuildResolver>,
    /// Results of stages, filled in stage order before any task runs.
    pub stages: Mutex<Vec<SharedStage>>,
    /// `SOURCE_DATE_EPOCH` as an RFC 3339 time: every new history entry and the image's
    /// `created` (otherwise they come from the cache records that made the layers).
    pub epoch_created: Option<String>,
    /// `SOURCE_DATE_EPOCH` from the build args: new layers have their mtimes clamped to it
    /// (on disk, before the diff_id is taken) and every step key includes it, so a layer
    /// cached without the clamp is never reused for a reproducible build.
    pub source_date_epoch: Option<i64>,
    /// Layers this build uses, held against garbage collection.
    pub leases: Arc<LeaseSet>,
    /// Cache records this build used, marked recently used when it ends.
    pub touched: Mutex<Vec<String>>,
    /// Git refs resolved to commits, once per build (the key and the checkout agree).
    pub git_commits: tokio::sync::Mutex<HashMap<crate::graph::GitSource, String>>,
    /// Per stage: whether its layers end up in the target image (the target and the
    /// stages it is built `FROM`), so are worth compressing early ([`BuildRequest::eager_blobs`]).
    pub in_target: Vec<bool>,
    /// The cgroup every RUN step of the build runs below, when builds have a memory limit.
    pub cgroup: Option<Arc<BuildCgroup>>,
    /// The build context: the request's, extended with what the client was asked for.
    pub context: Arc<crate::context::Context>,
    /// Step results the shared tier has that this node lacked, by cache key
    /// ([`lookahead`]).
    pub remote: Mutex<HashMap<String, Entry>>,
    /// The build was told the shared tier failed.
    pub shared_warned: AtomicBool,
}

impl Build {
    /// The commit git source `g` names for this build.
    pub async fn git_commit(&self, g: &crate::graph::GitSource) -> Result<String, crate::StepCause> {
        let mut known = self.git_commits.lock().await;
        if let Some(c) = known.get(g) {
            return Ok(c.clone());
        }
        let r = crate::git::GitRef { url: g.url.clone(), reference: g.reference.clone(), subdir: None };
        let scratch = tempfile::tempdir_in(self.engine.root())?;
        let commit = tokio::task::spawn_blocking(move || crate::git::resolve(&r, scratch.path())).await??;
        known.insert(g.clone(), commit.clone());
        Ok(commit)
    }

    /// Make the files of `layers` (a step runs on them): see [`Engine::ensure_layers`].
    pub(crate) async fn ensure_layers(&self, layers: &[Digest]) -> Result<usize, EngineError> {
        self.engine.ensure_layers(layers, Some(self.resolver.origins()), &self.cancel).await
    }

    /// Whether stage `id` has finished without error (its key is known).
    fn stage_ready(&self, id: StageId) -> bool {
        let stages = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        stages.get(id).and_then(|s| s.peek()).is_some_and(|r| r.is_ok())
    }

    /// Wait for another stage's result.
    pub(crate) async fn stage(&self, id: StageId) -> Result<Arc<StageState>, EngineError> {
        let fut = {
            let stages = self.stages.lock().unwrap_or_else(|e| e.into_inner());
            stages.get(id).cloned()
        };
        match fut {
            Some(f) => f.await.map_err(EngineError::Stage),
            None => Err(EngineError::Internal(format!("stage {id} is not in the graph"))),
        }
    }

    fn stage_label(&self, stage: &Stage, id: StageId) -> String {
        let name = stage.name.clone().unwrap_or_else(|| format!("stage-{}", stage.dockerfile_index.unwrap_or(id)));
        if self.req.platforms.len() > 1 {
            format!("{} {name}", self.platform)
        } else {
            name
        }
    }
}

/// Run the frontend and solve the graph for one platform. `counters` to `cgroup` are the
/// build's state, shared by the tasks of all its platforms.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn build_platform(
    engine: Engine,
    req: Arc<BuildRequest>,
    platform: Platform,
    progress: Progress,
    cancel: CancellationToken,
    counters: Arc<Counters>,
    vertices: Arc<VertexIds>,
    leases: Arc<LeaseSet>,
    cgroup: Option<Arc<BuildCgroup>>,
) -> Result<BuiltImage, EngineError> {
    let resolver = Arc::new(BuildResolver::new(engine.clone(), req.namespace.clone(), req.registry.clone(), req.pull));
    let mut opts = req.frontend.clone();
    opts.target_platform = Some(platform.clone());
    let graph = frontend::build_graph_limited(&req.dockerfile, &opts, &engine.limits().dockerfile, resolver.as_ref()).await?;
    for w in &graph.warnings {
        Engine::warn(&progress, w.clone());
    }
    req.entitlements.check_graph(&graph, req.network, &opts.dockerfile_name)?;
    // Paths the steps read that the client did not send (a base image's ONBUILD COPY, or
    // whatever its reading of the Dockerfile missed) are asked for before anything runs.
    let missing: Vec<String> = crate::context::needed(&graph).into_iter().filter(|s| !req.context_reach.covers(s)).collect();
    let context = match (&req.context_fetcher, missing.is_empty()) {
        (Some(fetcher), false) => {
            Engine::warn(
                &progress,
                format!(
                    "fetching context paths the client did not send: {}",
                    missing.iter().map(|m| if m.is_empty() { "." } else { m }).collect::<Vec<_>>().join(", ")
                ),
            );
            fetcher.extend(missing).await.map_err(EngineError::Context)?
        }
        _ => req.context.clone(),
    };
    let epoch_created = source_date_epoch(&req.frontend).map(time_string);
    let source_date_epoch = source_date_epoch(&req.frontend);
    let mut in_target = vec![false; graph.stages.len()];
    let mut next = Some(graph.target);
    while let Some(id) = next.filter(|&id| id < in_target.len() && !in_target[id]) {
        in_target[id] = true;
        next = match graph.stages[id].base {
            Base::Stage(j) => Some(j),
            _ => None,
        };
    }
    let build = Arc::new(Build {
        engine,
        req,
        graph: Arc::new(graph),
        platform: platform.clone(),
        progress,
        cancel: cancel.child_token(),
        counters,
        vertices,
        resolver,
        stages: Mutex::new(Vec::new()),
        epoch_created,
        source_date_epoch,
        context,
        leases,
        touched: Mutex::new(Vec::new()),
        git_commits: Default::default(),
        in_target,
        cgroup,
        remote: Mutex::default(),
        shared_warned: AtomicBool::new(false),
    });
    {
        let mut stages = build.stages.lock().unwrap_or_else(|e| e.into_inner());
        for id in 0..build.graph.stages.len() {
            let b = build.clone();
            let fut: BoxFuture<'static, Result<Arc<StageState>, Arc<EngineError>>> =
                async move { solve_stage(b, id).await.map(Arc::new).map_err(Arc::new) }.boxed();
            stages.push(fut.shared());
        }
    }
    // Start every stage now (the graph holds only stages the target needs), so that
    // independent stages run in parallel; each waits for the stages it reads when it needs them.
    let all: Vec<SharedStage> = build.stages.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut handles = Vec::new();
    for s in all.iter().cloned() {
        handles.push(tokio::spawn(s));
    }
    let target = build.graph.target;
    let result = all[target].clone().await;
    if result.is_err() {
        build.cancel.cancel();
    }
    for h in handles {
        let _ = h.await;
    }
    let touched = std::mem::take(&mut *build.touched.lock().unwrap_or_else(|e| e.into_inner()));
    if let Err(e) = build.engine.index().touch(&build.req.namespace, &touched, &[]) {
        tracing::warn!("marking cache records as used: {e}");
    }
    let state = result.map_err(unwrap_arc)?;
    // The outputs get the layers as far as they need them (a fleet node may hold some only
    // as blobs in the shared tier, or a base layer not at all yet).
    build.engine.provide_layers(&state.layers, build.req.needs, build.resolver.origins(), &build.cancel).await?;
    let stage = &build.graph.stages[target];
    let mut image = image_of(&build, stage, &state)?;
    // The images the build read, for its provenance.
    image.materials = build.resolver.materials().await;
    Ok(image)
}

fn unwrap_arc(e: Arc<EngineError>) -> EngineError {
    Arc::try_unwrap(e).unwrap_or_else(EngineError::Stage)
}

/// `SOURCE_DATE_EPOCH` of the build args when it is a valid (non-negative) number of seconds.
pub(crate) fn source_date_epoch(frontend: &crate::graph::FrontendOptions) -> Option<i64> {
    frontend.build_args.get("SOURCE_DATE_EPOCH").and_then(|s| s.trim().parse::<i64>().ok()).filter(|s| *s >= 0)
}

/// An image time (RFC 3339, UTC, as BuildKit writes it) of seconds since the epoch.
pub(crate) fn time_string(secs: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Solve one stage: its base, then its steps in order.
async fn solve_stage(b: Arc<Build>, id: StageId) -> Result<StageState, EngineError> {
    let stage = &b.graph.stages[id];
    let label = b.stage_label(stage, id);
    let ns = b.req.namespace.clone();
    // The base image's size (its layers', compressed), for the build record.
    let mut base_bytes = 0;
    let mut state = match &stage.base {
        Base::Scratch => StageState { key: cachekey::base_key(&ns, &b.platform, &[]), layers: Vec::new(), history: Vec::new() },
        Base::Stage(j) => {
            let s = b.stage(*j).await?;
            StageState { key: s.key.clone(), layers: s.layers.clone(), history: s.history.clone() }
        }
        Base::Image(img) => {
            for d in &img.config.rootfs.diff_ids {
                b.leases.add(d);
            }
            let size = b.resolver.register_layers(img)?;
            base_bytes = size;
            let layers = img.config.rootfs.diff_ids.clone();
            b.engine
                .index()
                .put_pull(&ns, &img.manifest_digest, layers.clone(), size)
                .map_err(|e| EngineError::Image { reference: img.reference.clone(), source: Box::new(e.into()) })?;
            StageState { key: cachekey::base_key(&ns, &b.platform, &layers), layers, history: img.config.history.clone() }
        }
    };
    // Steps up to this one were looked up in the shared tier.
    let mut looked = 0;
    // `--no-cache`, or `--no-cache-filter` naming this stage: its steps run.
    let no_cache = b.req.no_cache || stage.name.as_ref().is_some_and(|n| b.req.no_cache_stages.iter().any(|s| s.eq_ignore_ascii_case(n)));
    let fleet = !no_cache && b.engine.shared().is_some();
    if let Base::Image(img) = &stage.base {
        let vid = b.vertices.next();
        b.progress.send(Event::Started { id: vid, name: format!("[{label}] FROM {}@{}", img.reference, img.manifest_digest) });
        let t = Instant::now();
        let res = if fleet {
            // The base's layers are fetched while the first step is looked up (and while
            // it waits for another stage); a node that finds the first step's result stops,
            // and fetches them only if a later step runs on them (BuildKit's lazy pull).
            // A step that needs them joins the fetch.
            if !stage.steps.is_empty() {
                let stop = b.cancel.child_token();
                let (b2, layers, stop2) = (b.clone(), state.layers.clone(), stop.clone());
                tokio::spawn(async move { b2.engine.ensure_layers(&layers, Some(b2.resolver.origins()), &stop2).await });
                let (keyed, first_hit) = lookahead(&b, &state.key, &stage.steps).await;
                looked = keyed;
                if first_hit {
                    stop.cancel();
                }
            }
            Ok(0)
        } else {
            b.ensure_layers(&state.layers).await
        };
        let (cached, err) = match &res {
            Ok(pulled) => (*pulled == 0, None),
            Err(e) => (false, Some(e.to_string())),
        };
        let pulled_layers = res.as_ref().map_or(0, |p| *p as u64);
        let key = StepKey {
            id: vid,
            state_key: state.key.clone(),
            layer_bytes: base_bytes,
            pulled_layers,
            from_index: stage.dockerfile_index.map(|i| i as u32),
            ..Default::default()
        };
        b.progress.send(Event::Key(Box::new(key)));
        b.progress.send(Event::Completed { id: vid, cached, seconds: t.elapsed().as_secs_f64(), error: err });
        res?;
        // Layers new to this builder are likely new to the client's engine too.
        if b.in_target[id] && !cached {
            announce_early(&b, &state.layers);
        }
    }
    let total = stage.steps.len();
    let mut entries = stage.history.iter();
    for (i, step) in stage.steps.iter().enumerate() {
        if b.cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        if i >= looked && fleet {
            looked = i + lookahead(&b, &state.key, &stage.steps[i..]).await.0.max(1);
        }
        // History entries of config-only instructions before this step.
        for h in entries.by_ref() {
            if h.empty_layer {
                state.history.push(history(&b, h, true, None));
            } else {
                let name = format!("[{label} {}/{}] {}", i + 1, total, step.display);
                let made = run_step(&b, &mut state, step, name, b.in_target[id], no_cache).await?;
                // A layer's time is when its cache record was made (the step first ran), so
                // a cached rebuild gives the same image.
                state.history.push(history(&b, h, made.is_none(), made.map(time_string)));
                break;
            }
        }
    }
    for h in entries {
        state.history.push(history(&b, h, true, None));
    }
    Ok(state)
}

/// Tell [`crate::BuildRequest::early_layers`] that `layers` are final lower layers of the
/// target image (after a pulled base or a step that ran: what is new here is likely new to
/// the engine that will load the image).
fn announce_early(b: &Build, layers: &[Digest]) {
    if let (Some(tx), false) = (&b.req.early_layers, layers.is_empty()) {
        let _ = tx.send(crate::EarlyLayers { platform: b.platform.clone(), diff_ids: layers.to_vec() });
    }
}

/// A new history entry; `created` is its layer's time (`None` for an entry without a
/// layer: [`fill_history_times`] gives it one at export).
fn history(b: &Build, h: &crate::graph::HistoryEntry, empty: bool, created: Option<String>) -> History {
    History {
        created: b.epoch_created.clone().or(created),
        author: None,
        created_by: Some(h.created_by.clone()),
        comment: h.comment.clone(),
        empty_layer: empty,
    }
}

/// Key, look up, and run if needed; returns the time of the step's cache record when the
/// step added a layer. A new layer of the target image starts compressing right away when
/// an output will want it.
async fn run_step(
    b: &Arc<Build>,
    state: &mut StageState,
    step: &Step,
    name: String,
    in_target: bool,
    no_cache: bool,
) -> Result<Option<i64>, EngineError> {
    let vid = b.vertices.next();
    b.progress.send(Event::Started { id: vid, name });
    let started = Instant::now();
    let result = keyed_step(b, state, step, vid, no_cache).await;
    let (cached, err) = match &result {
        Ok((_, cached, _)) => (*cached, None),
        Err(e) => (false, Some(e.to_string())),
    };
    b.progress.send(Event::Completed { id: vid, cached, seconds: started.elapsed().as_secs_f64(), error: err });
    let (diff, cached, created) = result?;
    if cached {
        b.counters.cached.fetch_add(1, Ordering::Relaxed);
    } else {
        b.counters.run.fetch_add(1, Ordering::Relaxed);
    }
    Ok(match diff {
        Some(d) => {
            if let (false, true, Some(layers)) = (cached, in_target, b.req.eager_blobs) {
                // Shared with the export's own call of the same layer (one in-flight key);
                // an error here shows up again there.
                let (engine, d) = (b.engine.clone(), d.clone());
                tokio::spawn(async move {
                    if let Err(e) = engine.layer_blob(&d, layers.compression, layers.force).await {
                        tracing::debug!(layer = %d, "compressing early: {e}");
                    }
                });
            }
            state.layers.push(d);
            // A cached step's layer is likely in the client's engine from an earlier load.
            if in_target && !cached {
                announce_early(b, &state.layers);
            }
            Some(created as i64)
        }
        None => None,
    })
}

fn step_error(b: &Build, step: &Step, cause: impl Into<crate::StepCause>) -> EngineError {
    let name = if b.req.frontend.dockerfile_name.is_empty() { "Dockerfile" } else { &b.req.frontend.dockerfile_name };
    EngineError::Step { location: format!("{name}:{}", step.line), instruction: step.display.clone(), source: cause.into() }
}

/// The files a COPY from the build context or a named context reads.
pub(crate) fn source_context(b: &Build, from: &Source) -> Result<Arc<crate::context::Context>, String> {
    match from {
        Source::Named(name) => {
            b.req.named_contexts.get(name).cloned().ok_or_else(|| format!("the client sent no build context named {name:?}"))
        }
        _ => Ok(b.context.clone()),
    }
}

/// The step's inputs besides its parent: content digests of what it reads.
async fn step_inputs(b: &Arc<Build>, step: &Step) -> Result<Vec<(&'static str, String)>, EngineError> {
    let mut inputs = Vec::new();
    let stage_input = |inputs: &mut Vec<(&'static str, String)>, key: &str| inputs.push(("stage", key.to_string()));
    match &step.op {
        Op::Copy(c) => match &c.from {
            Source::Context | Source::Named(_) => {
                let ctx = source_context(b, &c.from).map_err(|e| step_error(b, step, e))?;
                let op = c.clone();
                let engine = b.engine.clone();
                let ns = b.req.namespace.clone();
                let d = tokio::task::spawn_blocking(move || {
                    // The context's tree is exactly its manifest, so what this COPY selects
                    // from it is known once computed for the same manifest: the walk is
                    // skipped when the context did not change.
                    let memo = ctx.digest().map(|whole| {
                        let m = format!("{whole}\0{:?}\0{:?}\0{}", op.sources, op.exclude, op.parents);
                        Digest::of(m.as_bytes()).to_string()
                    });
                    if let Some(Ok(Some(d))) = memo.as_ref().map(|m| engine.index().source_digest(&ns, m)) {
                        return Ok(d);
                    }
                    let dir = ctx.files()?;
                    let d = crate::copy::source_digest(dir, &op, &|p: &str| ctx.file_digest(p))?;
                    if let Some(Err(e)) = memo.as_ref().map(|m| engine.index().put_source_digest(&ns, m, &d)) {
                        tracing::warn!("remembering a COPY's sources: {e}");
                    }
                    Ok::<_, crate::StepCause>(d)
                })
                .await
                .map_err(|e| step_error(b, step, e))?
                .map_err(|e| step_error(b, step, e))?;
                inputs.push(("sources", d.to_string()));
            }
            Source::Stage(j) => {
                let s = b.stage(*j).await?;
                stage_input(&mut inputs, &s.key);
            }
            // The commit the ref names now: a moved branch is a new step.
            Source::Git(g) => inputs.push(("git", b.git_commit(g).await.map_err(|e| step_error(b, step, e))?)),
        },
        Op::Run(r) => {
            // `docker build --network` is the network of RUNs without their own: as in
            // BuildKit, a step run on the host's network is not the one run in the sandbox.
            if r.network == crate::graph::NetworkMode::Default && b.req.network != crate::graph::NetworkMode::Default {
                inputs.push(("network", format!("{:?}", b.req.network).to_ascii_lowercase()));
            }
            for m in &r.mounts {
                match &m.kind {
                    crate::graph::MountKind::Bind { from: Source::Context, source, .. } => {
                        inputs.push(("context", b.context.subtree_digest(source).to_string()));
                    }
                    crate::graph::MountKind::Bind { from: Source::Stage(j), .. }
                    | crate::graph::MountKind::Cache { from: Some(Source::Stage(j)), .. } => {
                        let s = b.stage(*j).await?;
                        stage_input(&mut inputs, &s.key);
                    }
                    crate::graph::MountKind::Cache { from: Some(Source::Context), source, .. } => {
                        inputs.push(("context", b.context.subtree_digest(source).to_string()));
                    }
                    _ => {}
                }
            }
        }
        Op::Mkdir(_) => {}
    }
    if let Some(epoch) = b.source_date_epoch {
        // The layer's mtimes depend on it (see `Build::source_date_epoch`).
        inputs.push(("source-date-epoch", epoch.to_string()));
    }
    if let Op::Run(_) = &step.op {
        // They change what a RUN can do, so its result (as BuildKit's exec meta does); a
        // build without them keeps its keys.
        if let Some(size) = b.req.shm_size {
            inputs.push(("shm-size", size.to_string()));
        }
        for u in &b.req.ulimits {
            inputs.push(("ulimit", format!("{}={}:{}", u.name, u.soft, u.hard)));
        }
    }
    if let Op::Copy(c) = &step.op {
        for s in &c.sources {
            if let crate::graph::CopySource::Url { url, checksum } = s {
                let d = match checksum {
                    Some(c) => c.clone(),
                    None => b.resolver.fetch_url(url, None).await.map_err(|e| step_error(b, step, e))?.0.to_string(),
                };
                inputs.push(("url", format!("{url} {d}")));
            }
        }
    }
    Ok(inputs)
}

/// The cache key of a step after the state keyed `parent` (what its record is under), and
/// the key of the state after it (they differ for `COPY --link`, whose record does not
/// depend on its parent).
fn step_keys(b: &Build, parent: &str, step: &Step, inputs: &[(&'static str, String)]) -> (CacheKey, CacheKey) {
    let link = matches!(&step.op, Op::Copy(c) if c.link);
    let op_key = cachekey::step_key(&b.req.namespace, &b.platform, (!link).then_some(parent), &step.op, inputs);
    let next_key = if link {
        cachekey::step_key(&b.req.namespace, &b.platform, Some(parent), &step.op, &[("link", op_key.clone())])
    } else {
        op_key.clone()
    };
    (op_key, next_key)
}

/// Tell the build record what step `vid`'s key was made of (see [`StepKey`]).
#[allow(clippy::too_many_arguments)]
fn report_key(
    b: &Build,
    vid: u32,
    step: &Step,
    parent: &str,
    op_key: &str,
    next_key: &str,
    inputs: &[(&'static str, String)],
    no_cache: bool,
    layer_bytes: u64,
) {
    let short = |v: &str| Digest::of(v.as_bytes()).to_string();
    let args = match &step.op {
        Op::Run(r) => r
            .env
            .iter()
            .filter_map(|e| e.split_once('='))
            .filter(|(k, v)| b.req.frontend.build_args.get(*k).is_some_and(|a| a == v))
            .map(|(k, v)| format!("{k}={}", short(v)))
            .collect(),
        _ => Vec::new(),
    };
    let op = serde_json::to_vec(&step.op).map(|j| Digest::of(&j).to_string()).unwrap_or_default();
    b.progress.send(Event::Key(Box::new(StepKey {
        id: vid,
        line: step.line as u32,
        cache_key: op_key.to_string(),
        parent_key: parent.to_string(),
        state_key: next_key.to_string(),
        op,
        inputs: inputs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        args,
        no_cache,
        layer_bytes,
        pulled_layers: 0,
        from_index: None,
    })));
}

/// This node's record of step `key` when its layer is at hand too (the layer leased first).
fn local_record(b: &Build, key: &str) -> Result<Option<StepRecord>, crate::cache::CacheError> {
    let Some(rec) = b.engine.index().step(&b.req.namespace, key)? else { return Ok(None) };
    let usable = match &rec.diff_id {
        None => true,
        Some(d) => {
            b.leases.add(d);
            b.engine.layer_at_hand(d)
        }
    };
    Ok(usable.then_some(rec))
}

/// Whether a step's key can be computed now, without waiting for another stage or
/// downloading anything.
fn keyable_now(b: &Build, step: &Step) -> bool {
    match &step.op {
        Op::Copy(c) => {
            let from = match &c.from {
                Source::Context | Source::Named(_) => true,
                Source::Stage(j) => b.stage_ready(*j),
                Source::Git(_) => false,
            };
            from && !c.sources.iter().any(|s| matches!(s, crate::graph::CopySource::Url { checksum: None, .. }))
        }
        Op::Run(r) => r.mounts.iter().all(|m| match &m.kind {
            crate::graph::MountKind::Bind { from: Source::Stage(j), .. }
            | crate::graph::MountKind::Cache { from: Some(Source::Stage(j)), .. } => b.stage_ready(*j),
            _ => true,
        }),
        Op::Mkdir(_) => true,
    }
}

/// Look up, in one batch of parallel requests to the shared tier, the keys of `steps` (after
/// the state keyed `parent`) that can be computed now (the first always) and that this node
/// has no usable record of. Returns how many steps were keyed (the steps after them are
/// looked up when the solver reaches them) and whether the first one's result is known.
async fn lookahead(b: &Arc<Build>, parent: &str, steps: &[Step]) -> (usize, bool) {
    let Some(tier) = b.engine.shared().cloned() else { return (steps.len(), false) };
    let mut parent = parent.to_string();
    let mut wanted = Vec::new();
    let mut keyed = 0;
    let mut first = None;
    for (i, step) in steps.iter().enumerate() {
        // The first step is the one the solver is at: it is keyed even when that means
        // waiting for another stage (the step would wait for it anyway).
        if i > 0 && !keyable_now(b, step) {
            break;
        }
        // An error here is the step's own, reported when the solver reaches it.
        let Ok(inputs) = step_inputs(b, step).await else { break };
        let (op_key, next) = step_keys(b, &parent, step, &inputs);
        let local = matches!(local_record(b, &op_key), Ok(Some(_)));
        if i == 0 {
            first = Some((op_key.clone(), local));
        }
        if !local {
            wanted.push(op_key);
        }
        parent = next;
        keyed += 1;
    }
    let first_hit = |remote: &HashMap<String, Entry>| first.as_ref().is_some_and(|(k, local)| *local || remote.contains_key(k));
    if wanted.is_empty() {
        return (keyed, first_hit(&HashMap::new()));
    }
    let engine = b.engine.clone();
    let found = tier.lookup(&b.req.namespace, &wanted, &|d| engine.layer_at_hand(d)).await;
    if let Some(msg) = found.failed {
        if !b.shared_warned.swap(true, Ordering::Relaxed) {
            Engine::warn(&b.progress, msg);
        }
    }
    let mut remote = b.remote.lock().unwrap_or_else(|e| e.into_inner());
    for (key, entry) in found.hits {
        if let Some(d) = &entry.diff_id {
            b.leases.add(d);
        }
        // Not recorded, it is a miss: the step runs.
        match b.engine.import_entry(&entry) {
            Ok(()) => {
                remote.insert(key, entry);
            }
            Err(e) => tracing::warn!("recording a shared cache entry: {e}"),
        }
    }
    (keyed, first_hit(&remote))
}

/// Returns the step's layer (if any), whether it came from the cache, and when its cache
/// record was made.
async fn keyed_step(
    b: &Arc<Build>,
    state: &mut StageState,
    step: &Step,
    vid: u32,
    no_cache: bool,
) -> Result<(Option<Digest>, bool, u64), EngineError> {
    let inputs = step_inputs(b, step).await?;
    let (op_key, next_key) = step_keys(b, &state.key, step, &inputs);
    let engine = &b.engine;
    let report = |layer_bytes: u64| report_key(b, vid, step, &state.key, &op_key, &next_key, &inputs, no_cache, layer_bytes);
    if !no_cache {
        if let Some(rec) = local_record(b, &op_key).map_err(|e| step_error(b, step, e))? {
            if let Some(tier) = engine.shared() {
                tier.touch(&b.req.namespace, &op_key).await;
            }
            report(rec.size);
            b.touched.lock().unwrap_or_else(|e| e.into_inner()).push(op_key);
            state.key = next_key;
            return Ok((rec.diff_id, true, rec.created));
        }
        let remote = b.remote.lock().unwrap_or_else(|e| e.into_inner()).remove(&op_key);
        if let Some(entry) = remote {
            let rec = StepRecord { diff_id: entry.diff_id, created: entry.created, last_used: engine.index().now(), size: entry.size };
            engine.index().put_step_record(&b.req.namespace, &op_key, &rec).map_err(|e| step_error(b, step, e))?;
            if let Some(tier) = engine.shared() {
                tier.touch(&b.req.namespace, &op_key).await;
            }
            report(rec.size);
            state.key = next_key;
            return Ok((rec.diff_id, true, rec.created));
        }
    }
    let env = StepEnv { build: b.clone(), parent_layers: state.layers.clone(), step: step.clone(), vertex: vid };
    let key_for_index = op_key.clone();
    let engine2 = engine.clone();
    let ns = b.req.namespace.clone();
    let compression = b.req.eager_blobs.map(|l| l.compression).unwrap_or_default();
    // In-flight work is shared across projects only when the keys match, and keys include
    // the namespace, so another project's build never waits on (or sees) this one.
    let inflight_key = format!("{ns}\0{op_key}");
    let (out, _started) = engine
        .inner
        .inflight
        .run(&inflight_key, &b.cancel, move |cancel| async move {
            // The step's own lease covers the gap between commit and the index record.
            let lease = engine2.lease_set();
            let produced = steps::execute(env, cancel, &lease).await.map_err(Arc::new)?;
            let (d, size) = match produced {
                Some((d, size)) => (Some(d), size),
                None => (None, 0),
            };
            let record = engine2.index().put_step(&ns, &key_for_index, d.clone(), size).map_err(|e| Arc::new(e.into()))?;
            drop(lease);
            engine2.share_step(&ns, &key_for_index, &record, compression).await;
            Ok(d)
        })
        .await;
    let diff = out.map_err(|e| {
        let e = unwrap_arc(e);
        if matches!(e.root(), EngineError::Step { .. } | EngineError::Cancelled) {
            e
        } else {
            step_error(b, step, e)
        }
    })?;
    if let Some(d) = &diff {
        b.leases.add(d);
    }
    // The record's time (this build's, or that of the build it shared the step with).
    let record = engine.index().step(&b.req.namespace, &op_key).map_err(|e| step_error(b, step, e))?;
    report(record.as_ref().map_or(0, |r| r.size));
    let created = record.map_or_else(|| engine.index().now(), |r| r.created);
    state.key = next_key;
    Ok((diff, false, created))
}

/// Drop empty lists and maps from a run config, as BuildKit's Go `omitempty` fields do
/// (`CMD []` leaves no `Cmd` in the image config, not `"Cmd": []`).
fn omit_empty(mut c: hoist_oci::image::RunConfig) -> hoist_oci::image::RunConfig {
    fn list(v: &mut Option<Vec<String>>) {
        if v.as_ref().is_some_and(Vec::is_empty) {
            *v = None;
        }
    }
    fn map<K, V>(v: &mut Option<std::collections::BTreeMap<K, V>>) {
        if v.as_ref().is_some_and(std::collections::BTreeMap::is_empty) {
            *v = None;
        }
    }
    for v in [&mut c.env, &mut c.entrypoint, &mut c.cmd, &mut c.on_build, &mut c.shell] {
        list(v);
    }
    map(&mut c.exposed_ports);
    map(&mut c.volumes);
    map(&mut c.labels);
    c
}

/// Give history entries without a time (config-only instructions, steps that added no
/// layer) one as BuildKit's exporter does: before the first new layer, the first new
/// layer's time; after it, the time of the entry before. So entries follow their layers and
/// never the clock of the export.
fn fill_history_times(history: &mut [History]) {
    let mut created = None;
    let mut seen_untimed = false;
    for h in history.iter() {
        match &h.created {
            Some(c) => {
                created = Some(c.clone());
                if seen_untimed {
                    break;
                }
            }
            None => seen_untimed = true,
        }
    }
    seen_untimed = false;
    for h in history.iter_mut() {
        match &h.created {
            Some(c) if seen_untimed => created = Some(c.clone()),
            Some(_) => {}
            None => {
                seen_untimed = true;
                h.created = created.clone();
            }
        }
    }
}

/// Assemble the image config of the target stage.
fn image_of(b: &Build, stage: &Stage, state: &StageState) -> Result<BuiltImage, EngineError> {
    let mut history = state.history.clone();
    fill_history_times(&mut history);
    let mut config = ImageConfig {
        // As BuildKit: the time of the last history entry, so it follows the layers.
        created: b.epoch_created.clone().or_else(|| history.last().and_then(|h| h.created.clone())),
        author: stage.author.clone(),
        architecture: b.platform.architecture.clone(),
        os: b.platform.os.clone(),
        os_version: None,
        variant: b.platform.variant.clone().filter(|_| !b.platform.variant_arg().is_empty()),
        config: omit_empty(stage.config.clone()),
        rootfs: RootFs { kind: "layers".into(), diff_ids: state.layers.clone() },
        history,
    };
    if config.history.iter().filter(|h| !h.empty_layer).count() != config.rootfs.diff_ids.len() {
        // A base image whose history does not match its layers: keep layers authoritative.
        config.history.retain(|h| h.created_by.is_some());
    }
    let config_bytes = serde_json::to_vec(&config).map_err(crate::export::ExportError::from)?;
    let config_digest = b.engine.store().put(&config_bytes)?;
    Ok(BuiltImage { platform: b.platform.clone(), config, config_bytes, config_digest, materials: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::{fill_history_times, omit_empty, time_string};
    use hoist_oci::image::History;

    fn h(created: Option<&str>, empty: bool) -> History {
        History { created: created.map(str::to_string), author: None, created_by: Some("x".into()), comment: None, empty_layer: empty }
    }

    /// Issue 15: untimed entries take their times from the layers around them (BuildKit's
    /// exporter), never from the clock.
    #[test]
    fn history_entries_without_a_layer_take_the_time_of_the_layers_around_them() {
        let times = |v: &[History]| v.iter().map(|h| h.created.clone().unwrap_or_default()).collect::<Vec<_>>();
        // base entries, then ENV (no layer), RUN (layer at t2), CMD (no layer)
        let mut v = vec![h(Some("t0"), false), h(Some("t1"), true), h(None, true), h(Some("t2"), false), h(None, true)];
        fill_history_times(&mut v);
        assert_eq!(times(&v), ["t0", "t1", "t2", "t2", "t2"], "before the first new layer: its time; after it: the one before");
        let mut v = vec![h(Some("t0"), false), h(None, true), h(Some("t2"), false), h(None, true), h(Some("t3"), false), h(None, true)];
        fill_history_times(&mut v);
        assert_eq!(times(&v), ["t0", "t2", "t2", "t2", "t3", "t3"]);
        // No new layer at all: the base image's last time.
        let mut v = vec![h(Some("t0"), false), h(None, true)];
        fill_history_times(&mut v);
        assert_eq!(times(&v), ["t0", "t0"]);
        let mut v = vec![h(None, true)];
        fill_history_times(&mut v);
        assert_eq!(v[0].created, None, "FROM scratch with config only has no time to take");
        assert_eq!(time_string(1_700_000_000), "2023-11-14T22:13:20Z", "as Go's RFC 3339 (no zero fraction)");
    }
    use hoist_oci::image::RunConfig;

    #[test]
    fn cmd_reset_to_an_empty_list_leaves_no_cmd_in_the_config() {
        // Regression (differential suite, cmd-entrypoint-multistage): `CMD []` gave
        // `"Cmd": []` where BuildKit writes no Cmd at all.
        let c = RunConfig {
            cmd: Some(vec![]),
            entrypoint: Some(vec!["ep".into()]),
            labels: Some(Default::default()),
            env: Some(vec!["A=1".into()]),
            ..Default::default()
        };
        let c = omit_empty(c);
        assert_eq!(c.cmd, None);
        assert_eq!(c.labels, None);
        assert_eq!(c.entrypoint, Some(vec!["ep".to_string()]));
        assert_eq!(c.env, Some(vec!["A=1".to_string()]));
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("Cmd") && !json.contains("Labels"), "{json}");
    }
}
