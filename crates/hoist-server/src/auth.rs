//! Projects and tokens. A project is a cache namespace; a token belongs to one project and
//! is stored only as its SHA-256 hash. The store is one JSON document, `auth.json`:
//! - in the builder's state root, written atomically under a lock by the admin commands
//!   (`hoist project create`, `hoist token ...`) and re-read by the server when it changes;
//! - for a fleet (`--cache-store`), in the shared store, so that every node reads one set:
//!   in the store's directory (`file://`), or as an object next to the cache (`s3://`),
//!   changed with conditional writes (a concurrent change is retried on the new version)
//!   and re-read by every node every [`REFRESH`], so a token created or revoked anywhere
//!   holds everywhere within seconds.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hoist_engine::shared::SharedStore;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The project of the embedded builder when none is named.
pub const DEFAULT_PROJECT: &str = "default";
/// Default automatic-GC limit of a project: 50 GB.
pub const DEFAULT_LIMIT_BYTES: u64 = 50_000_000_000;
/// Default number of builds one project runs at once (more wait for a slot).
pub const DEFAULT_MAX_BUILDS: u32 = 4;

/// Errors of the project/token store and of authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Reading, parsing, locking or writing the store failed, or no token could be
    /// generated (then `path` is empty).
    #[error("auth store {path}: {message}")]
    Store {
        /// The store file (`auth.json`).
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A project name [`valid_project_name`] refuses (the name as given).
    #[error("invalid project name {0:?}: use 1-63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit")]
    BadName(String),
    /// Creating a project whose name is taken.
    #[error("project {0:?} already exists")]
    ProjectExists(String),
    /// The project named (or the one of a token) is not in the store.
    #[error("project {0:?} does not exist (create it with `hoist project create {0}` on the builder)")]
    NoProject(String),
    /// Revoking by an id or name no unrevoked token has.
    #[error("no token matches {0:?}")]
    NoToken(String),
    /// Revoking by a name that tokens of several projects have, without naming the project.
    #[error("tokens named {name:?} exist in several projects ({projects}): pass --project to say which")]
    AmbiguousToken {
        /// The token name.
        name: String,
        /// The projects with a token of that name, comma-separated.
        projects: String,
    },
    /// An entitlement name the engine does not know.
    #[error("{0}")]
    Entitlement(#[from] hoist_engine::entitlements::UnknownEntitlement),
    /// A request without a token on a listener that is not trusted.
    #[error("a token is required: pass --token, set HOIST_TOKEN or run `hoist login`")]
    Missing,
    /// A token whose hash no record has.
    #[error("the token is not valid for this builder (no project has it): check --token / HOIST_TOKEN / hoist login")]
    Invalid,
    /// A token that was revoked.
    #[error("the token {name:?} was revoked; ask for a new one")]
    Revoked {
        /// The token's name.
        name: String,
    },
    /// The client named a project other than its token's.
    #[error("the token belongs to project {token_project:?}, not {requested:?}")]
    WrongProject {
        /// The project the token belongs to.
        token_project: String,
        /// The project the client named.
        requested: String,
    },
}

/// A project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    /// When it was created, in seconds since the Unix epoch.
    pub created: u64,
    /// Automatic GC keeps the project's cache under this many bytes.
    #[serde(default = "default_limit")]
    pub limit_bytes: u64,
    /// Builds the project runs at once; more wait for a slot.
    #[serde(default = "default_builds")]
    pub max_builds: u32,
    /// Entitlements the builder grants this project besides those of `hoist serve
    /// --allow-entitlement` (BuildKit names: network.host, security.insecure).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entitlements: Vec<String>,
}

fn default_limit() -> u64 {
    DEFAULT_LIMIT_BYTES
}

fn default_builds() -> u32 {
    DEFAULT_MAX_BUILDS
}

/// A token as stored (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Short id: the first 12 hex digits of the hash.
    pub id: String,
    /// The name given when it was issued (unique only within its project).
    pub name: String,
    /// The project it authenticates for.
    pub project: String,
    /// SHA-256 (hex) of the token.
    pub hash: String,
    /// When it was issued, in seconds since the Unix epoch.
    pub created: u64,
    /// Refused from now on; the record is kept so that using the token reports it revoked
    /// (by name) rather than invalid.
    #[serde(default)]
    pub revoked: bool,
}

/// The whole store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthFile {
    /// Projects by name.
    #[serde(default)]
    pub projects: BTreeMap<String, Project>,
    /// Every token ever issued, revoked ones included.
    #[serde(default)]
    pub tokens: Vec<TokenRecord>,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The project the request acts in (its cache, quotas and sessions).
    pub project: String,
    /// Token name, or "local" for the trusted unix socket.
    pub who: String,
    /// The token's id (`None` on the trusted socket): its builds and exports end when it
    /// is revoked.
    pub token_id: Option<String>,
}

/// How often a node re-reads a shared store's projects and tokens.
pub const REFRESH: Duration = Duration::from_secs(2);

/// The project/token store of a builder (see the module docs).
pub struct AuthStore {
    /// The file, or the object's URL-like name (for messages).
    path: PathBuf,
    backend: Backend,
}

enum Backend {
    /// A file: re-read when its modification time changes.
    File { cache: RwLock<(Option<SystemTime>, AuthFile)> },
    /// An object of a shared store.
    Shared(SharedAuth),
}

struct SharedAuth {
    store: SharedStore,
    /// The node's copy of the last contents read (`auth.shared.json` in its root).
    copy: PathBuf,
    /// The node's own `auth.json`: it seeds a shared store that has none yet, so a
    /// builder's projects and tokens come along when it becomes the first node of a fleet.
    seed: PathBuf,
    object: object_store::path::Path,
    /// The last contents read.
    cache: RwLock<Option<AuthFile>>,
    /// When an unknown token last made the node read the store ([`AuthStore::reread_now`]).
    reread: std::sync::Mutex<Option<std::time::Instant>>,
    /// A refresher keeps `cache` current ([`AuthStore::keep_fresh`]): reads never wait for
    /// the store.
    fresh: AtomicBool,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `name` is a valid project name.
pub fn valid_project_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
}

fn new_token() -> Result<String, std::io::Error> {
    let mut buf = [0u8; 32];
    hoist_oci::random::fill(&mut buf)?;
    Ok(format!("hst_{}", hex::encode(buf)))
}

/// Run `fut` to its end from synchronous code (an admin command, or a server that has no
/// fresh copy yet), on a runtime of its own.
fn block_on<T: Send>(fut: impl std::future::Future<Output = T> + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime for the auth store").block_on(fut))
            .join()
            .expect("the auth store's thread")
    })
}

impl AuthStore {
    /// The store of the state root `root`.
    pub fn new(root: &Path) -> AuthStore {
        AuthStore { path: root.join("auth.json"), backend: Backend::File { cache: RwLock::default() } }
    }

    /// The store of a builder with state root `root` and, for a fleet, the shared store
    /// `shared` (`--cache-store`): then projects and tokens live there instead.
    pub fn open(root: &Path, shared: Option<&SharedStore>) -> AuthStore {
        let Some(shared) = shared else { return AuthStore::new(root) };
        if let Some(dir) = shared.local_dir() {
            return AuthStore::new(&dir);
        }
        let object = shared.path(["auth.json"]);
        AuthStore {
            path: PathBuf::from(format!("{}/auth.json", shared.name().trim_end_matches('/'))),
            backend: Backend::Shared(SharedAuth {
                store: shared.clone(),
                seed: root.join("auth.json"),
                copy: root.join("auth.shared.json"),
                object,
                cache: RwLock::default(),
                reread: Default::default(),
                fresh: AtomicBool::new(false),
            }),
        }
    }

    fn err(&self, m: impl std::fmt::Display) -> AuthError {
        AuthError::Store { path: self.path.clone(), message: m.to_string() }
    }

    /// Keep a shared store's copy current: read it now (seeding a store that has none with
    /// this node's own projects and tokens), then every [`REFRESH`] in the background (until
    /// the returned task is aborted). Nothing to do for a file.
    pub async fn keep_fresh(self: &Arc<Self>) -> Result<Option<tokio::task::JoinHandle<()>>, AuthError> {
        let Backend::Shared(s) = &self.backend else { return Ok(None) };
        let (mut file, version) = match self.fetch(s).await {
            Ok(read) => read,
            // The store is down: a node that has read it before goes on with its copy.
            Err(e) => match fs::read(&s.copy).ok().and_then(|b| serde_json::from_slice::<AuthFile>(&b).ok()) {
                Some(copy) => {
                    tracing::warn!("{e}; using the copy of projects and tokens in {} until the store answers", s.copy.display());
                    (copy, Some(UpdateVersion { e_tag: None, version: None }))
                }
                None => return Err(e),
            },
        };
        if let (None, Ok(bytes)) = (&version, fs::read(&s.seed)) {
            let seed: AuthFile = serde_json::from_slice(&bytes).map_err(|e| self.err(format!("{}: corrupt: {e}", s.seed.display())))?;
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            match s.store.store().put_opts(&s.object, PutPayload::from(bytes), opts).await {
                Ok(_) => file = seed,
                Err(object_store::Error::AlreadyExists { .. }) => file = self.fetch(s).await?.0,
                Err(e) => return Err(self.err(e)),
            }
        }
        self.keep(s, file);
        s.fresh.store(true, Ordering::Release);
        let me = self.clone();
        Ok(Some(tokio::spawn(async move {
            let mut warned = false;
            loop {
                tokio::time::sleep(REFRESH).await;
                let Backend::Shared(s) = &me.backend else { return };
                match me.fetch(s).await {
                    Ok((file, _)) => {
                        me.keep(s, file);
                        warned = false;
                    }
                    Err(e) if !warned => {
                        tracing::warn!("re-reading projects and tokens: {e}; using the last copy");
                        warned = true;
                    }
                    Err(_) => {}
                }
            }
        })))
    }

    /// Make `file` (just read from the store) the node's current copy, in memory and, when
    /// it changed, on disk: a node restarted while the store is down still knows the
    /// fleet's projects and tokens.
    fn keep(&self, s: &SharedAuth, file: AuthFile) {
        let mut cache = s.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.as_ref() != Some(&file) {
            if let Err(e) = write_private(&s.copy, &file) {
                tracing::warn!("keeping a copy of projects and tokens in {}: {e}", s.copy.display());
            }
        }
        *cache = Some(file);
    }

    /// Read a shared store now, unless it was read this way less than a second ago (an
    /// unknown token must not make every request a store read). `None` for a file.
    fn reread_now(&self) -> Result<Option<AuthFile>, AuthError> {
        let Backend::Shared(s) = &self.backend else { return Ok(None) };
        {
            let mut last = s.reread.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Ok(None);
            }
            *last = Some(std::time::Instant::now());
        }
        let (file, _) = block_on(self.fetch(s))?;
        *s.cache.write().unwrap_or_else(|e| e.into_inner()) = Some(file.clone());
        Ok(Some(file))
    }

    /// The shared object and its version.
    async fn fetch(&self, s: &SharedAuth) -> Result<(AuthFile, Option<UpdateVersion>), AuthError> {
        match s.store.store().get(&s.object).await {
            Ok(r) => {
                let version = UpdateVersion { e_tag: r.meta.e_tag.clone(), version: r.meta.version.clone() };
                let bytes = r.bytes().await.map_err(|e| self.err(e))?;
                let file = serde_json::from_slice(&bytes).map_err(|e| self.err(format!("corrupt: {e}")))?;
                Ok((file, Some(version)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok((AuthFile::default(), None)),
            Err(e) => Err(self.err(e)),
        }
    }

    /// The current contents (re-read when the file changed; a shared store's last copy).
    pub fn load(&self) -> Result<AuthFile, AuthError> {
        let cache = match &self.backend {
            Backend::File { cache } => cache,
            Backend::Shared(s) => {
                if s.fresh.load(Ordering::Acquire) {
                    if let Some(f) = s.cache.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        return Ok(f.clone());
                    }
                }
                let (file, _) = block_on(self.fetch(s))?;
                *s.cache.write().unwrap_or_else(|e| e.into_inner()) = Some(file.clone());
                return Ok(file);
            }
        };
        let mtime = fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        {
            let c = cache.read().unwrap_or_else(|e| e.into_inner());
            if c.0 == mtime && mtime.is_some() {
                return Ok(c.1.clone());
            }
        }
        let file = match fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| self.err(format!("corrupt: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AuthFile::default(),
            Err(e) => return Err(self.err(e)),
        };
        *cache.write().unwrap_or_else(|e| e.into_inner()) = (mtime, file.clone());
        Ok(file)
    }

    /// Change the store: a file under an exclusive lock, written atomically; a shared
    /// object with a conditional write, `f` applied again to the newer version when another
    /// writer came first.
    fn update<T: Send>(&self, f: impl FnMut(&mut AuthFile) -> Result<T, AuthError> + Send) -> Result<T, AuthError> {
        match &self.backend {
            Backend::File { .. } => self.update_file(f),
            Backend::Shared(s) => block_on(self.update_shared(s, f)),
        }
    }

    async fn update_shared<T>(&self, s: &SharedAuth, mut f: impl FnMut(&mut AuthFile) -> Result<T, AuthError>) -> Result<T, AuthError> {
        for _ in 0..20 {
            let (mut file, version) = self.fetch(s).await?;
            let out = f(&mut file)?;
            let bytes = serde_json::to_vec_pretty(&file).map_err(|e| self.err(e))?;
            let mode = match version {
                Some(v) => PutMode::Update(v),
                None => PutMode::Create,
            };
            let put = s.store.store().put_opts(&s.object, PutPayload::from(bytes.clone()), PutOptions { mode, ..Default::default() }).await;
            match put {
                Ok(_) => {}
                // Another writer came first: apply the change to what it wrote.
                Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => continue,
                // A store without conditional writes: the last writer wins.
                Err(object_store::Error::NotImplemented { .. }) => {
                    s.store.store().put(&s.object, PutPayload::from(bytes)).await.map_err(|e| self.err(e))?;
                }
                Err(e) => return Err(self.err(e)),
            }
            *s.cache.write().unwrap_or_else(|e| e.into_inner()) = Some(file);
            return Ok(out);
        }
        Err(self.err("too many concurrent changes; try again"))
    }

    fn update_file<T>(&self, mut f: impl FnMut(&mut AuthFile) -> Result<T, AuthError>) -> Result<T, AuthError> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        }
        let lock_path = self.path.with_extension("lock");
        let lock = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| self.err(e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| self.err(e))?;
        let mut file: AuthFile = match fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| self.err(format!("corrupt: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AuthFile::default(),
            Err(e) => return Err(self.err(e)),
        };
        let out = f(&mut file)?;
        write_private(&self.path, &file).map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// Create a project and its first token (named `name`); returns the token.
    pub fn create_project(&self, project: &str, token_name: &str) -> Result<String, AuthError> {
        if !valid_project_name(project) {
            return Err(AuthError::BadName(project.to_string()));
        }
        self.update(|f| {
            if f.projects.contains_key(project) {
                return Err(AuthError::ProjectExists(project.to_string()));
            }
            f.projects.insert(
                project.to_string(),
                Project { created: now(), limit_bytes: DEFAULT_LIMIT_BYTES, max_builds: DEFAULT_MAX_BUILDS, entitlements: Vec::new() },
            );
            add_token(f, project, token_name).map_err(|e| AuthError::Store { path: PathBuf::new(), message: e.to_string() })
        })
    }

    /// Issue another token for an existing project.
    pub fn create_token(&self, project: &str, token_name: &str) -> Result<String, AuthError> {
        self.update(|f| {
            if !f.projects.contains_key(project) {
                return Err(AuthError::NoProject(project.to_string()));
            }
            add_token(f, project, token_name).map_err(|e| AuthError::Store { path: PathBuf::new(), message: e.to_string() })
        })
    }

    /// Revoke tokens by id, or by name (within `project` when given; a name used in several
    /// projects needs it). Returns how many.
    pub fn revoke(&self, id_or_name: &str, project: Option<&str>) -> Result<usize, AuthError> {
        self.update(|f| {
            if project.is_none() {
                let projects: std::collections::BTreeSet<&str> =
                    f.tokens.iter().filter(|t| t.name == id_or_name && t.id != id_or_name).map(|t| t.project.as_str()).collect();
                if projects.len() > 1 {
                    let projects = projects.into_iter().collect::<Vec<_>>().join(", ");
                    return Err(AuthError::AmbiguousToken { name: id_or_name.to_string(), projects });
                }
            }
            let mut n = 0;
            for t in &mut f.tokens {
                let by_id = t.id == id_or_name;
                let by_name = t.name == id_or_name && project.is_none_or(|p| p == t.project);
                if (by_id || by_name) && !t.revoked {
                    t.revoked = true;
                    n += 1;
                }
            }
            if n == 0 {
                return Err(AuthError::NoToken(id_or_name.to_string()));
            }
            Ok(n)
        })
    }

    /// Set a project's automatic-GC limit.
    pub fn set_limit(&self, project: &str, limit_bytes: u64) -> Result<(), AuthError> {
        self.update(|f| {
            let p = f.projects.get_mut(project).ok_or_else(|| AuthError::NoProject(project.to_string()))?;
            p.limit_bytes = limit_bytes;
            Ok(())
        })
    }

    /// Set how many builds a project runs at once.
    pub fn set_max_builds(&self, project: &str, builds: u32) -> Result<(), AuthError> {
        self.update(|f| {
            let p = f.projects.get_mut(project).ok_or_else(|| AuthError::NoProject(project.to_string()))?;
            p.max_builds = builds.max(1);
            Ok(())
        })
    }

    /// Grant (or with `allow = false`, take back) an entitlement to a project.
    pub fn set_entitlement(&self, project: &str, entitlement: &str, allow: bool) -> Result<(), AuthError> {
        let e = hoist_engine::entitlements::Entitlement::parse(entitlement)?;
        self.update(|f| {
            let p = f.projects.get_mut(project).ok_or_else(|| AuthError::NoProject(project.to_string()))?;
            p.entitlements.retain(|x| x != e.name());
            if allow {
                p.entitlements.push(e.name().to_string());
                p.entitlements.sort();
            }
            Ok(())
        })
    }

    /// The automatic-GC limit of a project.
    pub fn limit_of(&self, project: &str) -> u64 {
        self.load().ok().and_then(|f| f.projects.get(project).map(|p| p.limit_bytes)).unwrap_or(DEFAULT_LIMIT_BYTES)
    }

    /// How many builds a project runs at once.
    pub fn max_builds_of(&self, project: &str) -> u32 {
        self.load().ok().and_then(|f| f.projects.get(project).map(|p| p.max_builds)).unwrap_or(DEFAULT_MAX_BUILDS).max(1)
    }

    /// Entitlements granted to a project by `hoist project allow`.
    pub fn entitlements_of(&self, project: &str) -> std::collections::BTreeSet<hoist_engine::entitlements::Entitlement> {
        let file = self.load().unwrap_or_default();
        let names = file.projects.get(project).map(|p| p.entitlements.clone()).unwrap_or_default();
        names.iter().filter_map(|n| hoist_engine::entitlements::Entitlement::parse(n).ok()).collect()
    }

    /// Ids of revoked tokens (and of tokens whose project was deleted).
    pub fn revoked_ids(&self) -> std::collections::HashSet<String> {
        let Ok(file) = self.load() else { return Default::default() };
        file.tokens.iter().filter(|t| t.revoked || !file.projects.contains_key(&t.project)).map(|t| t.id.clone()).collect()
    }

    /// Who a request comes from. `token` is the bearer token if any, `requested` the project
    /// the client named if any; `trusted` is true on the embedded builder's unix socket.
    pub fn authenticate(&self, token: Option<&str>, requested: Option<&str>, trusted: bool) -> Result<Caller, AuthError> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            if trusted {
                let project = requested.filter(|p| !p.is_empty()).unwrap_or(DEFAULT_PROJECT);
                if !valid_project_name(project) {
                    return Err(AuthError::BadName(project.to_string()));
                }
                return Ok(Caller { project: project.to_string(), who: "local".into(), token_id: None });
            }
            return Err(AuthError::Missing);
        };
        let hash = hash_token(token);
        let mut file = self.load()?;
        if !file.tokens.iter().any(|t| t.hash == hash) {
            // A token made on another node moments ago: a fleet's node reads the store
            // again now rather than at its next refresh (at most once a second).
            if let Some(newer) = self.reread_now()? {
                file = newer;
            }
        }
        let rec = file.tokens.iter().find(|t| t.hash == hash).ok_or(AuthError::Invalid)?;
        if rec.revoked {
            return Err(AuthError::Revoked { name: rec.name.clone() });
        }
        if !file.projects.contains_key(&rec.project) {
            return Err(AuthError::NoProject(rec.project.clone()));
        }
        if let Some(req) = requested.filter(|p| !p.is_empty()) {
            if req != rec.project {
                return Err(AuthError::WrongProject { token_project: rec.project.clone(), requested: req.to_string() });
            }
        }
        Ok(Caller { project: rec.project.clone(), who: rec.name.clone(), token_id: Some(rec.id.clone()) })
    }
}

/// Write `file` to `path` atomically (a temporary file renamed over it), readable by its
/// owner only.
fn write_private(path: &Path, file: &AuthFile) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut t = fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
    t.write_all(&serde_json::to_vec_pretty(file)?)?;
    t.sync_all()?;
    fs::rename(&tmp, path)
}

fn add_token(f: &mut AuthFile, project: &str, name: &str) -> Result<String, std::io::Error> {
    let token = new_token()?;
    let hash = hash_token(&token);
    f.tokens.push(TokenRecord {
        id: hash[..12].to_string(),
        name: name.to_string(),
        project: project.to_string(),
        hash,
        created: now(),
        revoked: false,
    });
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_pair() -> (AuthStore, AuthStore, Arc<object_store::memory::InMemory>, tempfile::TempDir) {
        let store = Arc::new(object_store::memory::InMemory::new());
        let shared = SharedStore::new(store.clone(), "fleet", "s3://bucket/fleet");
        let roots = tempfile::tempdir().unwrap();
        let a = AuthStore::open(&roots.path().join("a"), Some(&shared));
        let b = AuthStore::open(&roots.path().join("b"), Some(&shared));
        (a, b, store, roots)
    }

    #[test]
    fn a_fleets_nodes_read_one_set_of_projects_and_tokens() {
        let (a, b, store, roots) = shared_pair();
        let token = a.create_project("web", "alice").unwrap();
        assert_eq!(b.authenticate(Some(&token), None, false).unwrap().project, "web", "created on A, valid on B");
        let bob = b.create_token("web", "bob").unwrap();
        assert_eq!(a.authenticate(Some(&bob), None, false).unwrap().who, "bob");
        b.revoke("alice", None).unwrap();
        assert!(matches!(a.authenticate(Some(&token), None, false), Err(AuthError::Revoked { .. })), "revoked on B, refused on A");
        assert!(!roots.path().join("a/auth.json").exists(), "nothing on a node's disk");
        let raw = futures::executor::block_on(async {
            store.get(&object_store::path::Path::from("fleet/auth.json")).await.unwrap().bytes().await.unwrap()
        });
        let raw = String::from_utf8(raw.to_vec()).unwrap();
        assert!(!raw.contains(&token) && !raw.contains(&bob), "only hashes are stored");
    }

    #[test]
    fn concurrent_changes_from_several_nodes_are_all_kept() {
        let (a, b, _store, _roots) = shared_pair();
        a.create_project("web", "first").unwrap();
        let tokens: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let node = if i % 2 == 0 { &a } else { &b };
                    s.spawn(move || node.create_token("web", &format!("t{i}")).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for t in &tokens {
            a.authenticate(Some(t), None, false).unwrap();
        }
        assert_eq!(b.load().unwrap().tokens.len(), 9);
    }

    /// An S3 store whose endpoint refuses connections.
    fn unreachable() -> SharedStore {
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("bucket")
            .with_endpoint("http://127.0.0.1:1")
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_retry(object_store::RetryConfig { max_retries: 0, ..Default::default() })
            .build()
            .unwrap();
        SharedStore::new(Arc::new(s3), "fleet", "s3://bucket/fleet")
    }

    #[tokio::test]
    async fn a_node_restarted_while_the_store_is_down_goes_on_with_its_copy() {
        let (a, _b, store, roots) = shared_pair();
        let token = a.create_project("web", "alice").unwrap();
        let node = || SharedStore::new(store.clone(), "fleet", "s3://bucket/fleet");
        let first = Arc::new(AuthStore::open(&roots.path().join("n"), Some(&node())));
        first.keep_fresh().await.unwrap().unwrap().abort();
        // Restarted, the store unreachable: the copy from its last read holds.
        let restarted = Arc::new(AuthStore::open(&roots.path().join("n"), Some(&unreachable())));
        restarted.keep_fresh().await.unwrap().unwrap().abort();
        assert_eq!(restarted.authenticate(Some(&token), None, false).unwrap().project, "web");
        // A node that never read the store has nothing to go on: it says why.
        let fresh = Arc::new(AuthStore::open(&roots.path().join("never"), Some(&unreachable())));
        let e = fresh.keep_fresh().await.unwrap_err().to_string();
        assert!(e.contains("s3://bucket/fleet/auth.json"), "{e}");
    }

    #[tokio::test]
    async fn the_first_node_of_a_fleet_brings_its_projects_and_tokens() {
        let roots = tempfile::tempdir().unwrap();
        let token = AuthStore::new(roots.path()).create_project("web", "alice").unwrap();
        let shared = SharedStore::new(Arc::new(object_store::memory::InMemory::new()), "", "s3://bucket");
        let node = Arc::new(AuthStore::open(roots.path(), Some(&shared)));
        let refresh = node.keep_fresh().await.unwrap().unwrap();
        refresh.abort();
        let other = AuthStore::open(&roots.path().join("elsewhere"), Some(&shared));
        assert_eq!(other.authenticate(Some(&token), None, false).unwrap().project, "web");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_kept_fresh_learns_of_a_revocation_within_seconds() {
        let (a, b, _store, _roots) = shared_pair();
        let token = a.create_project("web", "alice").unwrap();
        let b = Arc::new(b);
        let _refresh = b.keep_fresh().await.unwrap().expect("a shared store is refreshed");
        assert!(b.authenticate(Some(&token), None, false).is_ok());
        // A token made on A after B's last read works on B at once.
        let a = Arc::new(a);
        let a2 = a.clone();
        let fresh = tokio::task::spawn_blocking(move || a2.create_token("web", "new").unwrap()).await.unwrap();
        let b2 = b.clone();
        tokio::task::spawn_blocking(move || assert_eq!(b2.authenticate(Some(&fresh), None, false).unwrap().who, "new")).await.unwrap();
        let a = Arc::try_unwrap(a).ok().unwrap();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || a.revoke("alice", None).unwrap()).await.unwrap();
        while b.authenticate(Some(&token), None, false).is_ok() {
            assert!(started.elapsed() < REFRESH * 3, "the revocation did not reach node B");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[test]
    fn tokens_authenticate_their_project_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuthStore::new(dir.path());
        let a = store.create_project("alpha", "laptop").unwrap();
        let b = store.create_project("beta", "ci").unwrap();
        assert!(a.starts_with("hst_") && a.len() > 60);
        let caller = store.authenticate(Some(&a), None, false).unwrap();
        assert_eq!((caller.project.as_str(), caller.who.as_str()), ("alpha", "laptop"));
        assert_eq!(caller.token_id.as_deref(), Some(&hash_token(&a)[..12]));
        assert_eq!(store.authenticate(Some(&b), Some("beta"), false).unwrap().project, "beta");
        assert!(matches!(store.authenticate(Some(&a), Some("beta"), false), Err(AuthError::WrongProject { .. })));
        assert!(matches!(store.authenticate(Some("hst_guess"), None, false), Err(AuthError::Invalid)));
        assert!(matches!(store.authenticate(None, None, false), Err(AuthError::Missing)));
        // The file never holds a token, only hashes.
        let text = fs::read_to_string(dir.path().join("auth.json")).unwrap();
        assert!(!text.contains(&a) && !text.contains(&b));
    }

    #[test]
    fn revoked_tokens_are_refused_and_others_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuthStore::new(dir.path());
        let first = store.create_project("p", "one").unwrap();
        let second = store.create_token("p", "two").unwrap();
        assert_eq!(store.revoke("one", Some("p")).unwrap(), 1);
        assert!(matches!(store.authenticate(Some(&first), None, false), Err(AuthError::Revoked { .. })));
        assert_eq!(store.authenticate(Some(&second), None, false).unwrap().who, "two");
        assert!(matches!(store.revoke("nobody", None), Err(AuthError::NoToken(_))));
        // Another store instance (the server) sees the change.
        let server = AuthStore::new(dir.path());
        assert!(server.authenticate(Some(&first), None, false).is_err());
    }

    #[test]
    fn trusted_socket_needs_no_token_and_validates_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuthStore::new(dir.path());
        assert_eq!(store.authenticate(None, None, true).unwrap().project, DEFAULT_PROJECT);
        assert_eq!(store.authenticate(None, Some("web"), true).unwrap().project, "web");
        assert!(store.authenticate(None, Some("../x"), true).is_err());
        for bad in ["", "A", "-x", "a/b", &"x".repeat(64)] {
            assert!(!valid_project_name(bad), "{bad}");
            assert!(store.create_project(bad, "t").is_err());
        }
        store.create_project("dup", "t").unwrap();
        assert!(matches!(store.create_project("dup", "t"), Err(AuthError::ProjectExists(_))));
        assert!(matches!(store.create_token("nope", "t"), Err(AuthError::NoProject(_))));
    }

    /// Regression (issue 12): `hoist token revoke default` without `--project` revoked the
    /// `default` token of every project.
    #[test]
    fn revoking_a_name_used_in_several_projects_needs_the_project() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuthStore::new(dir.path());
        let a = store.create_project("alpha", "default").unwrap();
        let b = store.create_project("beta", "default").unwrap();
        let e = store.revoke("default", None).unwrap_err();
        assert!(matches!(e, AuthError::AmbiguousToken { .. }), "{e}");
        assert!(e.to_string().contains("alpha, beta") && e.to_string().contains("--project"), "{e}");
        assert!(
            store.authenticate(Some(&a), None, false).is_ok() && store.authenticate(Some(&b), None, false).is_ok(),
            "nothing was revoked"
        );
        assert_eq!(store.revoke("default", Some("beta")).unwrap(), 1);
        assert!(store.authenticate(Some(&a), None, false).is_ok());
        let id = store.authenticate(Some(&a), None, false).unwrap().token_id.unwrap();
        assert!(!store.revoked_ids().contains(&id));
        // An id is unique: no --project needed.
        assert_eq!(store.revoke(&id, None).unwrap(), 1);
        assert!(store.revoked_ids().contains(&id));
    }

    #[test]
    fn build_slots_and_entitlements_are_per_project() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuthStore::new(dir.path());
        store.create_project("alpha", "t").unwrap();
        store.create_project("beta", "t").unwrap();
        assert_eq!(store.max_builds_of("alpha"), DEFAULT_MAX_BUILDS);
        store.set_max_builds("alpha", 1).unwrap();
        assert_eq!((store.max_builds_of("alpha"), store.max_builds_of("beta")), (1, DEFAULT_MAX_BUILDS));
        use hoist_engine::entitlements::Entitlement;
        assert!(store.entitlements_of("alpha").is_empty());
        store.set_entitlement("alpha", "security.insecure", true).unwrap();
        assert_eq!(store.entitlements_of("alpha"), [Entitlement::SecurityInsecure].into());
        assert!(store.entitlements_of("beta").is_empty());
        assert!(matches!(store.set_entitlement("alpha", "device.all", true), Err(AuthError::Entitlement(_))));
        assert!(matches!(store.set_entitlement("gamma", "network.host", true), Err(AuthError::NoProject(_))));
        store.set_entitlement("alpha", "security.insecure", false).unwrap();
        assert!(store.entitlements_of("alpha").is_empty());
    }
}
