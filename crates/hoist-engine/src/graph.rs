//! The build graph: what the Dockerfile frontend produces and the solver executes.
//!
//! Every value here is final: variables are expanded, the stage's shell is applied to
//! shell-form commands, relative paths are resolved against the working directory. The
//! solver never looks at Dockerfile syntax again. Fields that take part in cache keys are
//! serialized canonically (see [`crate::cachekey`]); fields that must not (proxy variables,
//! display text, line numbers) are marked `#[serde(skip)]`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Index of a stage in [`BuildGraph::stages`].
pub type StageId = usize;

/// The one platform type, with its parsing and matching rules: hoist-oci's.
pub use hoist_oci::registry::{Platform, PlatformError};

/// The frontend's output: the stages needed for the target, in dependency order
/// (a stage only refers to stages with a smaller id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildGraph {
    /// The stages, indexed by [`StageId`]; each refers only to stages before it.
    pub stages: Vec<Stage>,
    /// The stage whose result is the build's result.
    pub target: StageId,
    /// Non-fatal findings (unused build args, deprecated syntax), each naming its line.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// One stage (`FROM ... AS name` and its instructions), or an image used only by
/// `COPY --from=<image>` / `RUN --mount=from=<image>` (a stage with no steps).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    /// The `AS` name, if any (lowercased as BuildKit does).
    pub name: Option<String>,
    /// Position among the Dockerfile's `FROM`s (`None` for an implicit image stage).
    pub dockerfile_index: Option<usize>,
    /// The platform the stage is built for (`FROM --platform`, else the target platform).
    pub platform: Platform,
    /// What the stage's filesystem and config start from.
    pub base: Base,
    /// Filesystem-changing steps, in order.
    pub steps: Vec<Step>,
    /// The image configuration at the end of the stage (what `--target` of it exports).
    /// hoist's own config type: oci-spec's lacks Healthcheck/Shell/OnBuild and has unstable
    /// map order (see hoist_oci::image).
    pub config: hoist_oci::image::RunConfig,
    /// The image's `author` (top level of the config blob): inherited from the base image,
    /// set by `MAINTAINER`. (Added by the frontend.)
    pub author: Option<String>,
    /// History entries in order, one per instruction that BuildKit records (config-only
    /// instructions have `empty_layer: true`). The `n`-th entry with `empty_layer: false`
    /// belongs to `steps[n]`; the exporter flips it to empty when that step's diff is empty.
    pub history: Vec<HistoryEntry>,
}

/// What a stage starts from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // one per stage: boxing would only add noise
pub enum Base {
    /// `FROM scratch`: an empty filesystem.
    Scratch,
    /// A registry image, already resolved for the stage's platform.
    Image(ResolvedImage),
    /// Another stage's result (`FROM builder`).
    Stage(StageId),
}

/// A registry image resolved for one platform (manifest and config fetched, layers not yet).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolvedImage {
    /// Fully qualified reference as written after normalization,
    /// e.g. `docker.io/library/alpine:3.20` or `127.0.0.1:5000/busybox:latest`.
    pub reference: String,
    /// Digest of the platform-specific image manifest.
    pub manifest_digest: String,
    /// The image's configuration blob, parsed (hoist's own type, see hoist_oci::image).
    pub config: hoist_oci::image::ImageConfig,
}

/// A filesystem-changing step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// Dockerfile line of the instruction (1-based), for errors and progress.
    #[serde(skip)]
    pub line: usize,
    /// The instruction as the progress output shows it, e.g. `RUN make -j2`.
    #[serde(skip)]
    pub display: String,
    /// What the step does; the part of the step that goes into its cache key.
    pub op: Op,
}

/// The operation of a step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// `RUN`: a command in a container on the stage's filesystem.
    Run(RunOp),
    /// `COPY` or `ADD`.
    Copy(CopyOp),
    /// `WORKDIR`: create the directory (and parents) if missing, owned by the current user
    /// when BuildKit would do so.
    Mkdir(MkdirOp),
}

/// Where files come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// The build context sent by the client.
    Context,
    /// Another stage's (or implicit image stage's) final filesystem.
    Stage(StageId),
    /// `ADD <git url>`: the repository at a ref (only as a COPY/ADD source).
    Git(GitSource),
    /// A directory the client sent as a named context (`--build-context NAME=DIR`); the
    /// frontend copies it into the implicit stage that `FROM NAME`/`--from=NAME` read.
    Named(String),
}

/// A git repository at a ref (`URL#REF:SUBDIR`), as written after ADD.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GitSource {
    /// The repository URL, without the `#` fragment.
    pub url: String,
    /// Branch, tag or commit; `None` is the remote's HEAD. Resolved to a commit (the cache
    /// key) when the step runs.
    pub reference: Option<String>,
}

/// `RUN`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOp {
    /// Final argv, shell applied for the shell form (`["/bin/sh", "-c", "make"]`).
    pub args: Vec<String>,
    /// Environment (`KEY=value`): the stage's ENV plus the ARGs in scope, in BuildKit order.
    pub env: Vec<String>,
    /// Proxy variables from build args (HTTP_PROXY etc.) not declared with ARG: set in the
    /// container but never part of the cache key.
    #[serde(skip)]
    pub proxy_env: Vec<String>,
    /// Absolute working directory.
    pub cwd: String,
    /// `USER` value (`name`, `uid`, `name:group`, `uid:gid`); empty means root. Resolved
    /// against the rootfs' /etc/passwd and /etc/group when the step runs.
    pub user: String,
    /// `--network`; [`NetworkMode::Default`] becomes the build request's network.
    pub network: NetworkMode,
    /// `--security`; `Insecure` needs the `security.insecure` entitlement.
    pub security: SecurityMode,
    /// `--mount`s, in the order written.
    pub mounts: Vec<RunMount>,
    /// Files the frontend generated for this step (a heredoc script with a shebang), mounted
    /// read-only at `target`.
    pub inline_files: Vec<InlineFile>,
}

/// `RUN --network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    /// The builder's default (as `docker build --network` or the daemon decides).
    Default,
    /// A fresh network namespace with loopback only.
    None,
    /// The builder's own network namespace; needs the `network.host` entitlement.
    Host,
}

/// `RUN --security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecurityMode {
    /// The default: Docker's default capabilities and seccomp profile, masked paths,
    /// read-only /sys, no devices.
    Sandbox,
    /// Every capability the executor holds, no seccomp, nothing masked, all devices;
    /// needs the `security.insecure` entitlement.
    Insecure,
}

/// A file with content known at graph time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InlineFile {
    /// Absolute path in the container (e.g. `/dev/pipes/EOF`), bind-mounted read-only.
    pub target: String,
    /// The file's content.
    pub content: String,
    /// Permission bits (`0o755` for a heredoc script).
    pub mode: u32,
}

/// `RUN --mount=...`, expanded and validated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMount {
    /// Absolute target path in the container.
    pub target: String,
    /// What is mounted there.
    pub kind: MountKind,
}

/// The mount types of `RUN --mount`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MountKind {
    /// `type=bind` (the default): a path of the context or of a stage's filesystem.
    Bind {
        /// Where the files come from (`from=`, default the context); never a git source.
        from: Source,
        /// Path inside `from` (default `/`).
        source: String,
        /// `rw`: writes are allowed but thrown away after the step (a context source is
        /// given a copy-on-write view, never written).
        readwrite: bool,
    },
    /// `type=cache`: a directory that persists across builds of the same namespace and is
    /// never part of a layer.
    Cache {
        /// Cache id (defaults to the target path). A name, never a host path.
        id: String,
        /// How concurrent steps using the same cache share it.
        sharing: CacheSharing,
        /// Seed contents for a new cache.
        from: Option<Source>,
        /// Path inside `from` that seeds the cache (absolute; `/` when not given).
        source: String,
        /// Mount the cache read-only.
        readonly: bool,
        /// Permission bits of a newly created cache directory (default `0o755`).
        mode: u32,
        /// Owner of a newly created cache directory (default 0).
        uid: u32,
        /// Group of a newly created cache directory (default 0).
        gid: u32,
    },
    /// `type=tmpfs`: an empty in-memory filesystem for the step.
    Tmpfs {
        /// Size limit in bytes (`size=`); `None` is the kernel default.
        size: Option<u64>,
    },
    /// `type=secret`: a secret of the build request, as a read-only file (in memory, never
    /// in a layer) and/or an environment variable. The mount's target is empty when it is
    /// only a variable.
    Secret {
        /// The secret's id (`id=`, else `source=`, else the target's base name).
        id: String,
        /// Expose as an environment variable instead of (or besides) a file.
        env: Option<String>,
        /// Fail the step if the build has no such secret; otherwise the mount is skipped.
        required: bool,
        /// Permission bits of the secret file (default `0o400`).
        mode: u32,
        /// Owner of the secret file (default 0).
        uid: u32,
        /// Group of the secret file (default 0).
        gid: u32,
    },
    /// `type=ssh`: a socket forwarding to one of the build's ssh agents; sets
    /// `SSH_AUTH_SOCK` to the target unless already set.
    Ssh {
        /// The agent's id (`id=`, default `default`).
        id: String,
        /// Fail the step if the build has no such agent; otherwise the mount is skipped.
        required: bool,
        /// Permission bits of the socket (default `0o600`).
        mode: u32,
        /// Owner of the socket (default 0).
        uid: u32,
        /// Group of the socket (default 0).
        gid: u32,
    },
}

/// `--mount=type=cache,sharing=...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheSharing {
    /// The default: every step uses the same directory at the same time.
    Shared,
    /// A step gets the shared directory when no one else uses it, else a fresh one of its
    /// own that is thrown away after it.
    Private,
    /// One step at a time: others wait until the holder finishes.
    Locked,
}

/// `COPY` and `ADD` (`ADD` sets `unpack` / uses URL sources).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyOp {
    /// Where the sources are looked up (`--from`, default the context; a git source for
    /// `ADD <git url>`).
    pub from: Source,
    /// The sources, in the order written.
    pub sources: Vec<CopySource>,
    /// Absolute destination (working directory applied); a trailing `/` is kept because it
    /// means "into this directory".
    pub dest: String,
    /// `--chown` value (names resolved against the destination rootfs when the step runs).
    pub chown: Option<String>,
    /// `--chmod`, applied to every copied file and directory (not to symlinks).
    pub chmod: Option<Chmod>,
    /// `--link`: the files are copied into an empty layer of their own, and the step's
    /// cache key does not depend on the layers below it.
    pub link: bool,
    /// `--exclude` patterns (`.dockerignore` syntax), matched against source paths.
    pub exclude: Vec<String>,
    /// `--parents`: keep the source paths' directories below the destination (from the
    /// `/./` pivot of a source, else from its root).
    pub parents: bool,
    /// ADD: auto-extract local tar archives (`--unpack` / ADD default for local files).
    pub unpack: bool,
    /// ADD: keep `.git` of a git source.
    pub keep_git_dir: bool,
    /// True for ADD, false for COPY (changes how sources are treated).
    pub is_add: bool,
}

/// One source of a COPY/ADD.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CopySource {
    /// A path (may contain wildcards) relative to the source root.
    Path(String),
    /// ADD of a remote file; `checksum` is `sha256:...` from `--checksum`.
    Url {
        /// The http(s) URL.
        url: String,
        /// The expected digest, `<sha256|sha384|sha512>:<hex>`.
        checksum: Option<String>,
    },
    /// A heredoc (`COPY <<EOF /dest`): its name and content (already expanded if unquoted).
    Inline {
        /// The heredoc's name (the word after `<<`), used as the file name.
        name: String,
        /// The file's content.
        content: String,
    },
}

/// `--chmod`: octal bits or a symbolic expression (`u+x,g-w`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chmod {
    /// Permission bits, at most `0o7777`.
    Octal(u32),
    /// A chmod(1) symbolic mode as written, parsed by [`crate::copy::chmod::ModeSet`].
    Symbolic(String),
}

/// `WORKDIR`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MkdirOp {
    /// Absolute path of the directory.
    pub path: String,
    /// The USER in effect (BuildKit chowns a created WORKDIR to it); empty = root.
    pub user: String,
}

/// One entry of the image history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The instruction as BuildKit records it (e.g. `RUN |1 V=x /bin/sh -c make`).
    pub created_by: String,
    /// `buildkit.dockerfile.v0` for entries the frontend adds.
    pub comment: Option<String>,
    /// The instruction adds no layer: set by the frontend for config-only instructions, and
    /// by the exporter for a step whose diff turned out empty.
    pub empty_layer: bool,
}

/// Inputs the frontend needs besides the Dockerfile.
#[derive(Debug, Clone, Default)]
pub struct FrontendOptions {
    /// Name used in error messages (`Dockerfile`, `docker/app.Dockerfile`).
    pub dockerfile_name: String,
    /// `--build-arg` values by name.
    pub build_args: BTreeMap<String, String>,
    /// `--target`: a stage name or index; `None` = last stage.
    pub target: Option<String>,
    /// Platform the image is built for (`TARGETPLATFORM`).
    pub target_platform: Option<Platform>,
    /// Platform of the builder (`BUILDPLATFORM`); `None` = host.
    pub build_platform: Option<Platform>,
    /// `--label` values, applied to the final stage's config.
    pub labels: BTreeMap<String, String>,
    /// `--build-context NAME=...`: what `FROM NAME`, `COPY --from=NAME` and
    /// `RUN --mount=from=NAME` read instead of the image or the stage of that name.
    pub named_contexts: BTreeMap<String, NamedContext>,
}

/// A named context (`--build-context`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedContext {
    /// `docker-image://REF`: this image instead.
    Image(String),
    /// A directory the client sent: a stage holding its files ([`Source::Named`]).
    Local,
}
