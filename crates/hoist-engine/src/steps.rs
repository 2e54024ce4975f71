//! Running one step on a snapshot: RUN in the OCI runtime, COPY/ADD, WORKDIR. Each returns
//! the layer it produced (its diff_id), or `None` when it changed nothing.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hoist_oci::digest::Digest;
use hoist_oci::export::{diff_id_keeping_small_files, diff_id_of};
use hoist_oci::image::media;
use hoist_oci::layer::TarOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cache::BlobRecord;
use crate::cachemount::CacheMountGuard;
use crate::copy::{self, CopyParams};
use crate::engine::EngineError;
use crate::executor::{ExecMount, LogChunk, LogStream, RunSpec};
use crate::gc::LeaseSet;
use crate::graph::{CopyOp, CopySource, MkdirOp, MountKind, NetworkMode, Op, RunOp, Source, Step};
use crate::progress::Event;
use crate::rootfs;
use crate::snapshot::{ActiveMount, SnapshotError, Uncommitted};
use crate::solver::Build;
use crate::StepCause;

/// What a step needs to run.
pub(crate) struct StepEnv {
    pub build: Arc<Build>,
    pub parent_layers: Vec<Digest>,
    pub step: Step,
    pub vertex: u32,
}

impl StepEnv {
    fn err(&self, cause: impl Into<StepCause>) -> EngineError {
        let name = if self.build.req.frontend.dockerfile_name.is_empty() { "Dockerfile" } else { &self.build.req.frontend.dockerfile_name };
        EngineError::Step { location: format!("{name}:{}", self.step.line), instruction: self.step.display.clone(), source: cause.into() }
    }
}

/// The context's directory, written first if the builder fills it lazily.
async fn context_files(env: &StepEnv) -> Result<PathBuf, EngineError> {
    let ctx = env.build.context.clone();
    blocking(env, move || ctx.files().map(Path::to_path_buf).map_err(|e| format!("build context: {e}"))).await
}

/// The directory of a named context (`--build-context NAME=DIR`).
async fn named_files(env: &StepEnv, from: &Source) -> Result<PathBuf, EngineError> {
    let ctx = crate::solver::source_context(&env.build, from).map_err(|e| env.err(e))?;
    blocking(env, move || ctx.files().map(Path::to_path_buf).map_err(|e| format!("named build context: {e}"))).await
}

/// Run `blocking` on the blocking pool, mapping both failure kinds to step errors.
async fn blocking<T: Send + 'static, E: Into<StepCause> + Send + 'static>(
    env: &StepEnv,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, EngineError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(env.err(e)),
        Err(e) => Err(env.err(format!("internal error: {e}"))),
    }
}

/// A produced layer and its size (uncompressed tar bytes).
pub(crate) type Produced = Option<(Digest, u64)>;

/// Execute the step; on success the layer is committed to the snapshotter (and leased in
/// `lease` before it is).
pub(crate) async fn execute(env: StepEnv, cancel: CancellationToken, lease: &LeaseSet) -> Result<Produced, EngineError> {
    let op = env.step.op.clone();
    match &op {
        Op::Run(run) => execute_run(&env, run, cancel, lease).await,
        Op::Copy(c) => execute_copy(&env, c, lease).await,
        Op::Mkdir(m) => execute_mkdir(&env, m, lease).await,
    }
}

/// Compute the diff of `dir` and commit it as a layer (or drop an empty diff). A build that
/// imports layers while it runs (`--load`) keeps the tar of a layer of small files as it
/// computes the diff_id ([`diff_id_keeping_small_files`]): the engine's pull then reads it
/// back instead of making it again from the files.
async fn commit_dir(env: &StepEnv, src: Uncommitted, lease: &LeaseSet) -> Result<Produced, EngineError> {
    let snaps = env.build.engine.snapshots().clone();
    let dir = match &src {
        Uncommitted::Mount(m) => m.upper().to_path_buf(),
        Uncommitted::Temp(t) => t.path().to_path_buf(),
    };
    let epoch = env.build.source_date_epoch;
    let keep_in = env.build.req.early_layers.is_some().then(|| env.build.engine.store().clone());
    let (diff_id, size, empty, kept) = blocking(env, move || -> Result<_, StepCause> {
        // With SOURCE_DATE_EPOCH the clamp is made on disk, so that every later tar of this
        // layer (blob export, docker archive, rootfs) gives the same bytes without knowing
        // the epoch; the tar option then changes nothing but says what the diff_id means.
        if let Some(epoch) = epoch {
            clamp_mtimes(&dir, epoch).map_err(|e| format!("clamping mtimes to SOURCE_DATE_EPOCH in {}: {e}", dir.display()))?;
        }
        let opts = TarOptions { source_date_epoch: epoch };
        Ok(match &keep_in {
            Some(store) => diff_id_keeping_small_files(&dir, &opts, store)?,
            None => {
                let (diff_id, size, empty) = diff_id_of(&dir, &opts)?;
                (diff_id, size, empty, false)
            }
        })
    })
    .await?;
    if empty {
        return Ok(None);
    }
    lease.add(&diff_id);
    let d = diff_id.clone();
    blocking(env, move || snaps.commit(src, &d)).await?;
    // The pass above counted the layer's tar: an uncompressed export serves it with no
    // second pass to learn its size. Losing the record costs only that pass.
    let engine = env.build.engine.clone();
    let d = diff_id.clone();
    let recorded = tokio::task::spawn_blocking(move || {
        engine.index().put_layer_tar_size(&d, size)?;
        if kept {
            let blob = BlobRecord { digest: d.clone(), size, media_type: media::OCI_LAYER.into(), original: false };
            engine.index().add_layer_blob(&d, blob)?;
        }
        Ok::<_, crate::cache::CacheError>(())
    })
    .await;
    if let Ok(Err(e)) = recorded {
        tracing::warn!(%diff_id, "recording the layer's tar: {e}");
    }
    Ok(Some((diff_id, size)))
}

/// Set the mtime of every entry under `dir` (and of `dir`) that is later than `epoch` to
/// `epoch`, without following symlinks; atimes are left alone (layers do not record them).
/// Changing an entry's timestamps does not change its parent directory's mtime, so one
/// pass in any order is enough.
pub(crate) fn clamp_mtimes(dir: &std::path::Path, epoch: i64) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, Timespec, Timestamps, CWD, UTIME_OMIT};
    use std::os::unix::fs::MetadataExt;
    let clamp = |path: &std::path::Path, md: &std::fs::Metadata| -> std::io::Result<()> {
        if md.mtime() > epoch {
            let t = Timestamps {
                last_access: Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
                last_modification: Timespec { tv_sec: epoch, tv_nsec: 0 },
            };
            rustix::fs::utimensat(CWD, path, &t, AtFlags::SYMLINK_NOFOLLOW)?;
        }
        Ok(())
    };
    let mut stack = vec![dir.to_path_buf()];
    clamp(dir, &std::fs::symlink_metadata(dir)?)?;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            let md = std::fs::symlink_metadata(&path)?;
            clamp(&path, &md)?;
            if md.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(())
}

/// Unmount `active`, then commit its upperdir.
async fn finish_mount(env: &StepEnv, mut active: ActiveMount, lease: &LeaseSet) -> Result<Produced, EngineError> {
    let active = blocking(env, move || active.unmount().map(|_| active)).await?;
    commit_dir(env, Uncommitted::Mount(active), lease).await
}

/// Mount `layers` (a view, or a writable stack), their files made first if this node holds
/// them only as blobs ([`crate::layers`]).
async fn prepare(env: &StepEnv, layers: Vec<Digest>, view: bool) -> Result<ActiveMount, EngineError> {
    env.build.ensure_layers(&layers).await?;
    let snaps = env.build.engine.snapshots().clone();
    blocking(env, move || -> Result<ActiveMount, SnapshotError> {
        if view {
            snaps.view(&layers)
        } else {
            snaps.prepare(&layers)
        }
    })
    .await
}

/// Mounts (and other resources) a RUN holds until it ends.
#[derive(Default)]
struct Held {
    views: Vec<ActiveMount>,
    caches: Vec<CacheMountGuard>,
    temps: Vec<tempfile::TempDir>,
    agents: Vec<crate::sshforward::AgentSocket>,
}

async fn execute_run(env: &StepEnv, run: &RunOp, cancel: CancellationToken, lease: &LeaseSet) -> Result<Produced, EngineError> {
    let b = &env.build;
    crate::executor::check_emulation(&b.platform).map_err(|e| env.err(e))?;
    let active = prepare(env, env.parent_layers.clone(), false).await?;
    let merged = active.merged().to_path_buf();
    let user = run.user.clone();
    let m2 = merged.clone();
    let ids = blocking(env, move || rootfs::lookup_user(&m2, if user.is_empty() { "0" } else { &user })).await?;

    let mut held = Held::default();
    let mut mounts = Vec::new();
    let mut env_vars = run.env.clone();
    env_vars.extend(run.proxy_env.iter().cloned());
    for m in &run.mounts {
        match &m.kind {
            MountKind::Bind { from, source, readwrite } => {
                let root = match from {
                    Source::Git(_) | Source::Named(_) => return Err(env.err("a RUN mount cannot come from a git source")),
                    Source::Context => context_files(env).await?,
                    Source::Stage(j) => {
                        let s = b.stage(*j).await?;
                        let v = prepare(env, s.layers.clone(), true).await?;
                        let p = v.merged().to_path_buf();
                        held.views.push(v);
                        p
                    }
                };
                let src = rootfs::resolve_in_root(&root, source, true).map_err(|e| env.err(e))?;
                if !src.exists() {
                    return Err(env.err(format!("mount source {source:?} does not exist")));
                }
                let src = if *readwrite && matches!(from, Source::Context) {
                    // Writes must never reach the context: bind a throwaway copy-on-write view.
                    let v = b.engine.snapshots().view_paths(std::slice::from_ref(&src)).map_err(|e| env.err(e))?;
                    let p = v.merged().to_path_buf();
                    held.views.push(v);
                    p
                } else {
                    src
                };
                mounts.push(ExecMount::Bind { source: src, target: m.target.clone(), readonly: !*readwrite });
            }
            MountKind::Cache { id, sharing, from, source, readonly, mode, uid, gid } => {
                let seed = match from {
                    None => None,
                    Some(Source::Git(_) | Source::Named(_)) => return Err(env.err("a cache mount cannot come from a git source")),
                    Some(Source::Context) => {
                        Some(rootfs::resolve_in_root(&context_files(env).await?, source, true).map_err(|e| env.err(e))?)
                    }
                    Some(Source::Stage(j)) => {
                        let s = b.stage(*j).await?;
                        let v = prepare(env, s.layers.clone(), true).await?;
                        let p = rootfs::resolve_in_root(v.merged(), source, true).map_err(|e| env.err(e))?;
                        held.views.push(v);
                        Some(p)
                    }
                };
                let guard = b
                    .engine
                    .cache_mounts()
                    .acquire(&b.req.namespace, id, *sharing, *mode, *uid, *gid, seed.as_deref())
                    .await
                    .map_err(|e| env.err(e))?;
                mounts.push(ExecMount::Bind { source: guard.path().to_path_buf(), target: m.target.clone(), readonly: *readonly });
                held.caches.push(guard);
            }
            MountKind::Tmpfs { size } => mounts.push(ExecMount::Tmpfs { target: m.target.clone(), size: *size }),
            MountKind::Secret { id, env: as_env, required, mode, uid, gid } => {
                let Some(value) = b.req.secrets.secrets.get(id) else {
                    if *required {
                        return Err(env.err(format!("secret {id:?} is required but was not given (use --secret id={id},src=FILE)")));
                    }
                    continue;
                };
                if let Some(var) = as_env {
                    env_vars.push(format!("{var}={}", String::from_utf8_lossy(value)));
                    if m.target.is_empty() {
                        continue;
                    }
                }
                // Secrets live in memory (a tmpfs) and are bind-mounted read-only; they never
                // reach the rootfs, so never a layer.
                let dir = tempfile::Builder::new().prefix("hoist-secret-").tempdir_in(secret_dir()).map_err(|e| env.err(e))?;
                let file = dir.path().join("secret");
                std::fs::write(&file, value).map_err(|e| env.err(e))?;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode)).map_err(|e| env.err(e))?;
                rustix::fs::chown(&file, Some(rustix::fs::Uid::from_raw(*uid)), Some(rustix::fs::Gid::from_raw(*gid)))
                    .map_err(|e| env.err(e))?;
                mounts.push(ExecMount::Bind { source: file, target: m.target.clone(), readonly: true });
                held.temps.push(dir);
            }
            MountKind::Ssh { id, required, mode, uid, gid } => {
                if !b.req.secrets.ssh.has(id) {
                    if *required {
                        return Err(env.err(format!(
                            "ssh agent {id:?} is required but was not given (use --ssh {id}=SOCKET|KEYFILE or --ssh default)"
                        )));
                    }
                    continue;
                }
                let parent = b.engine.root().join("ssh");
                let sock = crate::sshforward::AgentSocket::listen(&parent, id, &b.req.secrets.ssh, *uid, *gid, *mode)
                    .map_err(|e| env.err(format!("ssh agent {id:?}: {e}")))?;
                mounts.push(ExecMount::Bind { source: sock.path(), target: m.target.clone(), readonly: false });
                held.agents.push(sock);
                if !env_vars.iter().any(|e| e.starts_with("SSH_AUTH_SOCK=")) {
                    env_vars.push(format!("SSH_AUTH_SOCK={}", m.target));
                }
            }
        }
    }
    if !run.inline_files.is_empty() {
        let dir = tempfile::Builder::new().prefix("hoist-inline-").tempdir().map_err(|e| env.err(e))?;
        for (i, f) in run.inline_files.iter().enumerate() {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, &f.content).map_err(|e| env.err(e))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode)).map_err(|e| env.err(e))?;
            mounts.push(ExecMount::Bind { source: p, target: f.target.clone(), readonly: true });
        }
        held.temps.push(dir);
    }
    if !env_vars.iter().any(|e| e.starts_with("HOME=")) {
        env_vars.push(format!("HOME={}", ids.home.clone().unwrap_or_else(|| "/root".into())));
    }
    let network = match run.network {
        NetworkMode::Default => b.req.network,
        other => other,
    };
    let spec = RunSpec {
        id: format!("hoist-{}", hoist_oci::random::hex(8)),
        rootfs: merged,
        args: run.args.clone(),
        env: env_vars,
        cwd: run.cwd.clone(),
        uid: ids.uid,
        gid: ids.gid,
        additional_gids: ids.additional_gids.clone(),
        network,
        security: run.security,
        mounts,
        hostname: "buildkitsandbox".into(),
        extra_hosts: b.req.add_hosts.clone(),
        timeout: b.engine.limits().run_timeout,
        cgroup_parent: b.cgroup.as_ref().map(|c| c.parent().to_string()),
        shm_size: b.req.shm_size,
        ulimits: b.req.ulimits.clone(),
    };
    let (tx, mut rx) = mpsc::channel::<LogChunk>(256);
    let progress = b.progress.clone();
    let vid = env.vertex;
    let max_log = b.engine.limits().max_step_log_bytes;
    let forward = tokio::spawn(async move {
        // Past the builder's per-step log limit the output is still drained (the process
        // never blocks on it) but no longer forwarded: `yes` cannot flood the client.
        let mut shown: u64 = 0;
        let mut clipped = false;
        while let Some(chunk) = rx.recv().await {
            let stream = match chunk.stream {
                LogStream::Stdout => 1,
                LogStream::Stderr => 2,
            };
            if clipped {
                continue;
            }
            let room = max_log.saturating_sub(shown);
            if chunk.data.len() as u64 > room {
                if room > 0 {
                    progress.send(Event::Log { id: vid, stream, data: chunk.data.slice(..room as usize) });
                }
                let marker =
                    format!("\n[output clipped, log limit {} reached (hoist serve --max-step-log)]\n", crate::limits::human_bytes(max_log));
                progress.send(Event::Log { id: vid, stream: 2, data: bytes::Bytes::from(marker) });
                clipped = true;
                continue;
            }
            shown += chunk.data.len() as u64;
            progress.send(Event::Log { id: vid, stream, data: chunk.data });
        }
    });
    b.counters.containers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ooms_before = b.cgroup.as_ref().map(|c| c.oom_kills());
    let status = b.engine.inner.executor.run(spec, tx, cancel).await;
    let _ = forward.await;
    drop(held);
    // A kill the build's cgroup counted as an OOM kill: the build's memory limit.
    let memory_limit_hit = || match (&b.cgroup, ooms_before) {
        (Some(cg), Some(before)) if cg.oom_kills() > before => Some(format!(
            "killed: the build reached its memory limit of {} (hoist serve --build-memory); \
             make the step use less memory or ask the builder's operator for a higher limit",
            crate::limits::human_bytes(cg.limit())
        )),
        _ => None,
    };
    let status = status.map_err(|e| match e {
        crate::executor::ExecError::Cancelled { .. } => EngineError::Cancelled,
        e @ crate::executor::ExecError::Timeout { .. } => env.err(format!("{e} (the builder's RUN time limit, hoist serve --run-timeout)")),
        e @ crate::executor::ExecError::Start { .. } => match memory_limit_hit() {
            Some(m) => env.err(format!("{e}: {m}")),
            None => env.err(e),
        },
        e => env.err(e),
    })?;
    if status.code == 128 + 9 {
        if let Some(m) = memory_limit_hit() {
            return Err(env.err(format!("{} did not complete successfully: {m}", crate::executor::describe_command(&run.args))));
        }
    }
    if status.code != 0 {
        return Err(env.err(format!(
            "{} did not complete successfully: exit code: {}",
            crate::executor::describe_command(&run.args),
            status.code
        )));
    }
    finish_mount(env, active, lease).await
}

fn secret_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

async fn execute_copy(env: &StepEnv, c: &CopyOp, lease: &LeaseSet) -> Result<Produced, EngineError> {
    let b = &env.build;
    // Sources.
    let mut held_views = Vec::new();
    let mut held_dirs = Vec::new();
    let src_root = match &c.from {
        Source::Context => context_files(env).await?,
        Source::Named(_) => named_files(env, &c.from).await?,
        Source::Stage(j) => {
            let s = b.stage(*j).await?;
            let v = prepare(env, s.layers.clone(), true).await?;
            let p = v.merged().to_path_buf();
            held_views.push(v);
            p
        }
        Source::Git(g) => {
            // The commit the step's key was made with, checked out for this copy.
            let commit = b.git_commit(g).await.map_err(|e| env.err(e))?;
            let dir = tempfile::Builder::new().prefix("git-").tempdir_in(b.engine.root()).map_err(|e| env.err(e))?;
            let r = crate::git::GitRef { url: g.url.clone(), reference: g.reference.clone(), subdir: None };
            let (path, keep, max) = (dir.path().to_path_buf(), c.keep_git_dir, b.engine.limits().archive.max_bytes);
            blocking(env, move || crate::git::checkout(&r, &commit, &path, keep, max)).await?;
            let p = dir.path().to_path_buf();
            held_dirs.push(dir);
            p
        }
    };
    let mut urls = HashMap::new();
    let mut url_files = Vec::new();
    for s in &c.sources {
        if let CopySource::Url { url, checksum } = s {
            let (digest, file) = b.resolver.fetch_url(url, checksum.as_deref()).await.map_err(|e| env.err(e))?;
            let _ = digest;
            urls.insert(url.clone(), file.path().to_path_buf());
            url_files.push(file);
        }
    }
    // Destination: the stage's filesystem, or an empty directory for --link.
    enum Dest {
        Mount(ActiveMount),
        Link(crate::snapshot::TempLayerDir, Option<ActiveMount>),
    }
    let dest = if c.link {
        let tmp = b.engine.snapshots().temp_dir().map_err(|e| env.err(e))?;
        // --chown names still resolve against the stage's /etc/passwd.
        let view = if c.chown.is_some() { Some(prepare(env, env.parent_layers.clone(), true).await?) } else { None };
        Dest::Link(tmp, view)
    } else {
        Dest::Mount(prepare(env, env.parent_layers.clone(), false).await?)
    };
    let (dest_root, users_root) = match &dest {
        Dest::Mount(m) => (m.merged().to_path_buf(), m.merged().to_path_buf()),
        Dest::Link(t, v) => {
            (t.path().to_path_buf(), v.as_ref().map(|v| v.merged().to_path_buf()).unwrap_or_else(|| t.path().to_path_buf()))
        }
    };
    let op = c.clone();
    let limits = b.engine.limits().archive.clone();
    let result = blocking(env, move || -> Result<(), StepCause> {
        let owner = match &op.chown {
            Some(spec) => Some(rootfs::lookup_chown(&users_root, spec)?),
            None => None,
        };
        let params = CopyParams { op: &op, src_root: &src_root, dest_root: &dest_root, owner, urls: &urls, limits };
        copy::copy(&params)?;
        Ok(())
    })
    .await;
    drop(held_views);
    drop(url_files);
    result?;
    match dest {
        Dest::Mount(m) => finish_mount(env, m, lease).await,
        Dest::Link(tmp, view) => {
            drop(view);
            commit_dir(env, Uncommitted::Temp(tmp), lease).await
        }
    }
}

async fn execute_mkdir(env: &StepEnv, m: &MkdirOp, lease: &LeaseSet) -> Result<Produced, EngineError> {
    let active = prepare(env, env.parent_layers.clone(), false).await?;
    let merged = active.merged().to_path_buf();
    let op = m.clone();
    blocking(env, move || -> Result<(), StepCause> {
        let owner = if op.user.is_empty() {
            None
        } else {
            let ids = rootfs::lookup_user(&merged, &op.user)?;
            Some((ids.uid, ids.gid))
        };
        rootfs::create_dir_all_in_root(&merged, &op.path, 0o755, owner)?;
        Ok(())
    })
    .await?;
    finish_mount(env, active, lease).await
}

#[cfg(test)]
mod tests {
    use super::clamp_mtimes;
    use hoist_oci::export::diff_id_of;
    use hoist_oci::layer::TarOptions;
    use std::os::unix::fs::MetadataExt;

    fn set_mtime(path: &std::path::Path, secs: i64) {
        use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};
        let t = Timestamps { last_access: Timespec { tv_sec: secs, tv_nsec: 0 }, last_modification: Timespec { tv_sec: secs, tv_nsec: 7 } };
        rustix::fs::utimensat(CWD, path, &t, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    #[test]
    fn clamped_layer_tars_the_same_with_and_without_the_epoch_option() {
        // Regression guard for SOURCE_DATE_EPOCH: the diff_id taken at commit (with the
        // epoch) must equal what exporters compute later with default tar options.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/new"), b"new").unwrap();
        std::fs::write(root.join("old"), b"old").unwrap();
        std::os::unix::fs::symlink("/nowhere", root.join("a/link")).unwrap();
        let epoch = 1_000_000_000;
        set_mtime(&root.join("old"), 500);
        set_mtime(&root.join("a/b/new"), 2_000_000_000);
        set_mtime(&root.join("a/link"), 2_000_000_000);
        let with = TarOptions { source_date_epoch: Some(epoch) };
        let (before_default, _, _) = diff_id_of(root, &TarOptions::default()).unwrap();
        let (want, _, _) = diff_id_of(root, &with).unwrap();
        assert_ne!(before_default, want, "the option must change a layer with new files");

        clamp_mtimes(root, epoch).unwrap();
        assert_eq!(diff_id_of(root, &TarOptions::default()).unwrap().0, want);
        assert_eq!(diff_id_of(root, &with).unwrap().0, want);
        let md = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!(md("a/b/new").mtime(), epoch);
        assert_eq!(md("a/link").mtime(), epoch, "the symlink itself, not its target");
        assert_eq!(md("old").mtime(), 500, "older entries keep their mtime");
        assert_eq!(md("a/b").mtime(), epoch);
        assert_eq!(md("").mtime(), epoch);
    }
}
