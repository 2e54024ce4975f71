//! `hoist build`: docker build's flags, context sync, the build call, outputs, summary.

use std::collections::{BTreeSet, HashMap};
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use hoist_client::build::{BuildError, BuildErrorKind, BuildOutcome, BuildPart, StartedPart};
use hoist_client::outputs::{finish_sinks, OutputSink, OutputSpec};
use hoist_client::session::AgentSource;
use hoist_client::sync::{self, SentContext};
use hoist_client::v1;
use hoist_client::{human_bytes, BuilderAddr};
use hoist_dockerfile::IgnoreMatcher;

use crate::conn::{addr_is_local, ConnArgs};
use crate::progress::{Mode, Renderer};
use hoist_oci::compress::Algorithm;

/// `hoist build [OPTIONS] PATH | -`
#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Build context: a directory, or `-` for a tar (or a Dockerfile) on stdin.
    pub context: String,
    /// Name and optionally a tag (name:tag); may be given several times.
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// Name of the Dockerfile (default: PATH/Dockerfile); `-` reads it from stdin.
    #[arg(short = 'f', long = "file")]
    pub file: Option<String>,
    /// Additional build context (NAME=VALUE): a directory, docker-image://REF or a git/https
    /// URL, read by `FROM NAME`, `COPY --from=NAME` and `RUN --mount=from=NAME`.
    #[arg(long = "build-context")]
    pub build_contexts: Vec<String>,
    /// Set a build-time variable (KEY=VALUE, or KEY to take it from the environment).
    #[arg(long = "build-arg")]
    pub build_args: Vec<String>,
    /// The stage to build.
    #[arg(long)]
    pub target: Option<String>,
    /// Target platform(s), e.g. linux/amd64 or linux/amd64,linux/arm64.
    #[arg(long)]
    pub platform: Vec<String>,
    /// Do not use the cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Do not use the cache for these stages (by name), as buildx does.
    #[arg(long = "no-cache-filter", value_delimiter = ',')]
    pub no_cache_filter: Vec<String>,
    /// Always check the registry for newer versions of base images.
    #[arg(long)]
    pub pull: bool,
    /// Set metadata on the image (KEY=VALUE).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Networking mode for RUN steps: default, host or none.
    #[arg(long)]
    pub network: Option<String>,
    /// Add a host-to-IP mapping (host:ip).
    #[arg(long = "add-host")]
    pub add_hosts: Vec<String>,
    /// Secret to expose to the build: id=NAME,src=FILE or id=NAME,env=VAR.
    #[arg(long = "secret")]
    pub secrets: Vec<String>,
    /// SSH agent socket or keys to forward: default, ID=SOCKET or ID=KEYFILE[,KEYFILE]. The
    /// agent stays on this machine; the builder relays each connection to it.
    #[arg(long = "ssh")]
    pub ssh: Vec<String>,
    /// Allow extra privileged entitlements: security.insecure, network.host (the builder
    /// must grant them too).
    #[arg(long = "allow", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Write the image ID to this file.
    #[arg(long)]
    pub iidfile: Option<PathBuf>,
    /// Write build result metadata (JSON) to this file.
    #[arg(long = "metadata-file")]
    pub metadata_file: Option<PathBuf>,
    /// Print only the image ID.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// What to run: build (the default) or check (run the Dockerfile checks and build
    /// nothing; check,format=json; check,ignorestatus=true).
    #[arg(long)]
    pub call: Option<String>,
    /// Shorthand for --call=check.
    #[arg(long)]
    pub check: bool,
    /// Progress output: auto, plain, tty, rawjson, quiet or none.
    #[arg(long, env = "BUILDKIT_PROGRESS", default_value = "auto")]
    pub progress: String,
    /// Output destination: type=image|registry|docker|oci|tar|local[,dest=PATH][,...], or a directory.
    #[arg(short = 'o', long = "output")]
    pub outputs: Vec<String>,
    /// Load the image into the local Docker engine.
    #[arg(long)]
    pub load: bool,
    /// Push the image to the registry of each tag.
    #[arg(long)]
    pub push: bool,
    /// Keep the result on the builder for the project; teammates fetch it with `hoist pull`.
    #[arg(long)]
    pub save: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// A registry to reach over plain HTTP (loopback registries always are).
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,

    // Accepted and ignored, as docker build with BuildKit ignores them.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub rm: Option<String>,
    #[arg(long = "force-rm", hide = true)]
    pub force_rm: bool,
    #[arg(long, hide = true)]
    pub compress: bool,
    #[arg(long = "disable-content-trust", hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub disable_content_trust: Option<String>,
    #[arg(long, hide = true)]
    pub isolation: Option<String>,

    /// Accepted with a note: the builder's cache, shared by the project, serves instead.
    #[arg(long = "cache-from")]
    pub cache_from: Vec<String>,
    /// Accepted with a note: every build's results go to the builder's shared cache.
    #[arg(long = "cache-to")]
    pub cache_to: Vec<String>,

    /// Size of /dev/shm of RUN steps, e.g. 128m (default 64m).
    #[arg(long = "shm-size", value_parser = crate::limits::parse_size)]
    pub shm_size: Option<u64>,
    /// Resource limit of RUN steps: name=soft[:hard], e.g. nofile=1024:2048 (up to the
    /// builder's own limits).
    #[arg(long)]
    pub ulimit: Vec<String>,

    /// Add an annotation to the image: [TYPE[,TYPE][\[PLATFORM\]]:]KEY=VALUE, TYPE manifest
    /// (default), manifest-descriptor, index or index-descriptor (pushed images and OCI
    /// archives keep them).
    #[arg(long = "annotation")]
    pub annotations: Vec<String>,
    /// Provenance attestation: true, false or mode=min|max[,builder-id=ID] (default: mode=min
    /// on pushed images and OCI archives).
    #[arg(long)]
    pub provenance: Option<String>,
    /// SBOM attestation: accepted, with a warning (hoist does not produce SBOMs yet).
    #[arg(long)]
    pub sbom: Option<String>,
    /// Attestation: type=provenance[,mode=min|max,...] or type=sbom, as buildx takes it.
    #[arg(long)]
    pub attest: Vec<String>,

    // Known docker build flags hoist does not support yet: rejected with a clear message.
    #[arg(long, hide = true)]
    pub squash: bool,
    #[arg(short = 'm', long, hide = true)]
    pub memory: Option<String>,
    /// Accepted with a note: RUN steps run in the builder's own cgroup for the build, whose
    /// limits the builder sets (a client may not place steps in another cgroup).
    #[arg(long = "cgroup-parent")]
    pub cgroup_parent: Option<String>,
    #[arg(long = "cpu-shares", hide = true)]
    pub cpu_shares: Option<String>,
}

fn unsupported(args: &BuildArgs) -> anyhow::Result<()> {
    let mut bad = Vec::new();
    if args.squash {
        bad.push("--squash");
    }
    if args.memory.is_some() {
        bad.push("--memory");
    }
    if args.cpu_shares.is_some() {
        bad.push("--cpu-shares");
    }
    if !bad.is_empty() {
        bail!("{} {} not supported by hoist yet", bad.join(", "), if bad.len() == 1 { "is" } else { "are" });
    }
    Ok(())
}

fn key_values(items: &[String], what: &str) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for item in items {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => bail!("{what} {item:?}: expected KEY=VALUE"),
        }
    }
    Ok(out)
}

fn build_args(items: &[String]) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for item in items {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            Some(_) => bail!("--build-arg {item:?}: expected KEY=VALUE or KEY"),
            None => {
                // docker build: `--build-arg KEY` takes the value from the environment and
                // is dropped when the variable is unset.
                if let Ok(v) = std::env::var(item) {
                    out.insert(item.clone(), v);
                }
            }
        }
    }
    Ok(out)
}

/// As buildx does: `SOURCE_DATE_EPOCH` in the client's environment becomes the build arg
/// of that name unless `--build-arg` set it (the builder then clamps layer mtimes to it).
fn with_source_date_epoch(mut args: HashMap<String, String>, env: Option<String>) -> HashMap<String, String> {
    if let Some(v) = env.filter(|v| !v.is_empty()) {
        args.entry("SOURCE_DATE_EPOCH".to_string()).or_insert(v);
    }
    args
}

fn parse_secret(spec: &str) -> anyhow::Result<v1::Secret> {
    let mut id = None;
    let mut src = None;
    let mut env = None;
    for part in spec.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| anyhow!("--secret {spec:?}: expected id=NAME,src=FILE or id=NAME,env=VAR"))?;
        match k {
            "id" => id = Some(v.to_string()),
            "src" | "source" => src = Some(v.to_string()),
            "env" => env = Some(v.to_string()),
            "type" if v == "file" || v == "env" => {}
            _ => bail!("--secret {spec:?}: unknown key {k:?} (expected id, src, env or type)"),
        }
    }
    let id = id.ok_or_else(|| anyhow!("--secret {spec:?}: id=NAME is required"))?;
    let value = match (src, env) {
        (Some(path), _) => std::fs::read(&path).with_context(|| format!("--secret {id}: reading {path}"))?,
        (None, Some(var)) => {
            std::env::var(&var).with_context(|| format!("--secret {id}: environment variable {var} is not set"))?.into_bytes()
        }
        (None, None) => match std::env::var(&id) {
            Ok(v) => v.into_bytes(),
            Err(_) => bail!("--secret {spec:?}: give src=FILE or env=VAR"),
        },
    };
    Ok(v1::Secret { id, value })
}

/// One `--ssh` flag: `default`, `ID`, `ID=SOCKET` or `ID=KEYFILE[,KEYFILE]` (as buildx: a
/// path that is a socket is an agent, anything else is a list of private key files, served
/// by an agent in this process). Without a path, `$SSH_AUTH_SOCK`.
fn parse_ssh(spec: &str) -> anyhow::Result<(String, AgentSource)> {
    use std::os::unix::fs::FileTypeExt;
    let (id, paths) = match spec.split_once('=') {
        Some((id, paths)) => (id.to_string(), paths.to_string()),
        None => (spec.to_string(), String::new()),
    };
    if id.is_empty() {
        bail!("--ssh {spec:?}: expected default, ID, ID=SOCKET or ID=KEYFILE[,KEYFILE]");
    }
    let paths: Vec<PathBuf> = if paths.is_empty() {
        let sock = std::env::var("SSH_AUTH_SOCK")
            .with_context(|| format!("--ssh {spec}: SSH_AUTH_SOCK is not set; give {id}=/path/to/agent.sock or {id}=~/.ssh/id_ed25519"))?;
        vec![PathBuf::from(sock)]
    } else {
        paths.split(',').filter(|p| !p.is_empty()).map(PathBuf::from).collect()
    };
    if let [one] = paths.as_slice() {
        let meta = std::fs::metadata(one).with_context(|| format!("--ssh {spec}: {}", one.display()))?;
        if meta.file_type().is_socket() {
            return Ok((id, AgentSource::Socket(one.clone())));
        }
    }
    let agent = hoist_client::agent::KeyAgent::load(&paths).with_context(|| format!("--ssh {spec}"))?;
    Ok((id, AgentSource::Keys(std::sync::Arc::new(agent))))
}

/// The agents of every `--ssh` flag, by id.
pub(crate) fn ssh_agents(args: &BuildArgs) -> anyhow::Result<HashMap<String, AgentSource>> {
    let mut agents = HashMap::new();
    for s in &args.ssh {
        let (id, source) = parse_ssh(s)?;
        if agents.insert(id.clone(), source).is_some() {
            bail!("--ssh {id} is given twice");
        }
    }
    Ok(agents)
}

/// Registries whose credentials go with the request: those of the tags (push targets).
/// Every other registry the build touches (base images, `COPY --from`, `-o name=`) asks the
/// client when the builder first needs it (a CredentialRequest on the build stream).
fn tag_registries(tags: &[String]) -> BTreeSet<String> {
    tags.iter().filter_map(|t| hoist_oci::reference::Reference::parse(t).ok()).map(|r| r.registry).collect()
}

/// The context directory and Dockerfile, whatever form they came in.
pub(crate) struct Inputs {
    pub(crate) context_dir: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
    pub(crate) dockerfile: Vec<u8>,
    dockerfile_name: String,
    dockerfile_path: Option<PathBuf>,
    /// `--build-context`, parsed (URLs fetched) once.
    pub(crate) named: Vec<(String, crate::named::Named)>,
}

pub(crate) fn read_inputs(args: &BuildArgs) -> anyhow::Result<Inputs> {
    let mut stdin_used = false;
    let (context_dir, tmp, stdin_dockerfile) = if args.context == "-" {
        stdin_used = true;
        let mut data = Vec::new();
        std::io::stdin().read_to_end(&mut data).context("reading the context from stdin")?;
        archive_or_dockerfile(data, "stdin")?
    } else if let Some(remote) = crate::remote::Remote::parse(&args.context) {
        match remote.fetch(&args.build_args)? {
            crate::remote::Fetched::Dir(tmp, dir) => (Some(dir), Some(tmp), None),
            crate::remote::Fetched::Data(data) => archive_or_dockerfile(data, &args.context)?,
        }
    } else {
        let dir = PathBuf::from(&args.context);
        if !dir.is_dir() {
            bail!("unable to prepare context: path {:?} not found or not a directory", args.context);
        }
        (Some(std::fs::canonicalize(&dir)?), None, None)
    };
    let (dockerfile, name, path) = match (&args.file, stdin_dockerfile) {
        (_, Some(data)) => (data, "Dockerfile".to_string(), None),
        (Some(f), None) if f == "-" => {
            if stdin_used {
                bail!("-f - and a context of - cannot both read stdin");
            }
            let mut data = Vec::new();
            std::io::stdin().read_to_end(&mut data).context("reading the Dockerfile from stdin")?;
            (data, "Dockerfile".to_string(), None)
        }
        (Some(f), None) => {
            // In a stdin tar, -f names a file inside it; otherwise it is relative to the cwd.
            let p = match (&tmp, &context_dir) {
                (Some(_), Some(dir)) => dir.join(f),
                _ => PathBuf::from(f),
            };
            let data = std::fs::read(&p).with_context(|| format!("failed to read dockerfile: open {}", p.display()))?;
            (data, f.clone(), Some(p))
        }
        (None, None) => {
            let dir = context_dir.clone().unwrap_or_default();
            let p = dir.join("Dockerfile");
            let data = std::fs::read(&p).with_context(|| format!("failed to read dockerfile: open {}", p.display()))?;
            (data, "Dockerfile".to_string(), Some(p))
        }
    };
    let named = crate::named::parse(&args.build_contexts)?;
    Ok(Inputs { context_dir, _tmp: tmp, dockerfile, dockerfile_name: name, dockerfile_path: path, named })
}

/// A context directory, the temporary directory holding it, or a Dockerfile without one.
type ContextParts = (Option<PathBuf>, Option<tempfile::TempDir>, Option<Vec<u8>>);

/// The context in `data` (read from `from`: stdin or a URL), as docker takes it: a tar,
/// plain or compressed, is extracted into a temporary directory; anything else is a
/// Dockerfile with no context.
pub(crate) fn archive_or_dockerfile(mut data: Vec<u8>, from: &str) -> anyhow::Result<ContextParts> {
    // A compressed tar (gzip, bzip2, xz, zstd) is a context too, as docker takes it.
    let compressed = Algorithm::sniff(&data[..data.len().min(6)]) != Algorithm::None;
    if compressed {
        let mut plain = Vec::new();
        {
            let what = || format!("decompressing the context from {from}");
            let mut reader = hoist_oci::compress::decompress_reader(data.as_slice(), None).with_context(what)?;
            reader.read_to_end(&mut plain).with_context(what)?;
        }
        data = plain;
    }
    let is_tar = data.len() >= 262 && &data[257..262] == b"ustar";
    if compressed && !is_tar {
        bail!("the compressed data from {from} is not a tar: expected a context archive (.tar, .tar.gz, .tar.bz2, .tar.xz, .tar.zst)");
    }
    if is_tar {
        let tmp = tempfile::tempdir().with_context(|| format!("creating a directory for the context from {from}"))?;
        tar::Archive::new(data.as_slice()).unpack(tmp.path()).with_context(|| format!("extracting the context tar from {from}"))?;
        Ok((Some(tmp.path().to_path_buf()), Some(tmp), None))
    } else {
        // A Dockerfile: no context.
        Ok((None, None, Some(data)))
    }
}

pub(crate) fn ignore_matcher(inputs: &Inputs) -> anyhow::Result<Option<IgnoreMatcher>> {
    let Some(dir) = &inputs.context_dir else { return Ok(None) };
    let df = inputs.dockerfile_path.clone().unwrap_or_else(|| dir.join("Dockerfile"));
    read_ignore(hoist_dockerfile::ignore_file_candidates(dir, &df))
}

/// The `.dockerignore` of a named context's directory.
pub(crate) fn ignore_file_in(dir: &Path) -> anyhow::Result<Option<IgnoreMatcher>> {
    read_ignore([dir.join(".dockerignore")])
}

/// The first ignore file of `candidates` that exists.
fn read_ignore(candidates: impl IntoIterator<Item = PathBuf>) -> anyhow::Result<Option<IgnoreMatcher>> {
    for candidate in candidates {
        match std::fs::read_to_string(&candidate) {
            Ok(text) => {
                let m = IgnoreMatcher::from_file_text(&text).with_context(|| format!("{}", candidate.display()))?;
                return Ok(Some(m));
            }
            // An ignore file that cannot be read must not be skipped: the files it excludes
            // (secrets, often) would be sent to the builder.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                anyhow::bail!("{}: invalid UTF-8: expected a text file of patterns", candidate.display())
            }
            Err(_) => {}
        }
    }
    Ok(None)
}

pub(crate) fn cache_root() -> PathBuf {
    if let Ok(d) = std::env::var("HOIST_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return Path::new(&d).join("hoist");
    }
    match std::env::var("HOME") {
        Ok(h) => Path::new(&h).join(".cache").join("hoist"),
        Err(_) => PathBuf::from("/tmp/hoist-cache"),
    }
}

/// Sync the context of `inputs` to a builder, shown as the client-side vertex `label`.
pub(crate) async fn sync_context(
    client: &mut hoist_client::Client,
    inputs: &Inputs,
    ignore: Option<&IgnoreMatcher>,
    renderer: &mut Renderer,
    label: &str,
) -> anyhow::Result<SentContext> {
    let Some(dir) = &inputs.context_dir else {
        let mut sent = SentContext::default();
        crate::named::send(client, &inputs.named, &mut sent).await?;
        return Ok(sent);
    };
    let t = Instant::now();
    let id = renderer.internal(label);
    // A context from stdin is new each time: no stat cache.
    let cache = if inputs._tmp.is_some() { None } else { Some(cache_root()) };
    let mut sent = sync::sync_context(client, dir, &inputs.dockerfile, ignore, cache.as_deref()).await?;
    crate::named::send(client, &inputs.named, &mut sent).await?;
    renderer.internal_done(
        id,
        t.elapsed().as_secs_f64(),
        &format!("transferred {} files ({})", sent.stats.uploaded_files, human_bytes(sent.stats.uploaded_bytes)),
    );
    Ok(sent)
}

/// The connection to a builder broke during a build (the builder died, or the network went
/// away) — not an error the builder reported: a fleet builds again on the next builder.
#[derive(Debug)]
pub(crate) struct Lost {
    /// Which part of the build ran on that builder (its index in the parts given).
    pub(crate) part: usize,
    /// The builder.
    pub(crate) builder: String,
    /// What the client saw.
    pub(crate) why: String,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the connection to builder {} was lost during the build: {}", self.builder, self.why)
    }
}

impl std::error::Error for Lost {}

/// gRPC's UNAVAILABLE status code.
const UNAVAILABLE: i32 = 14;

/// Whether a gRPC status (its code, and its `source()`) says that the builder could not be
/// reached or the connection to it broke, rather than that the builder reported an error:
/// UNAVAILABLE, or any status made on this side from an error of the connection (a status
/// the builder sent has no source).
pub(crate) fn connection_failed(code: i32, source: Option<&(dyn std::error::Error + 'static)>) -> bool {
    code == UNAVAILABLE || source.is_some()
}

/// How long a builder has to answer `Info` before it counts as not answering.
pub(crate) const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Why `client`'s builder does not answer now (`None`: it does).
pub(crate) async fn not_answering(client: &mut hoist_client::Client) -> Option<String> {
    match tokio::time::timeout(ANSWER_WITHIN, client.info(v1::InfoRequest {})).await {
        Err(_) => Some(format!("no answer within {}s", ANSWER_WITHIN.as_secs())),
        Ok(Ok(_)) => None,
        Ok(Err(s)) if connection_failed(s.code().into(), std::error::Error::source(&s)) => Some(s.message().to_string()),
        Ok(Err(_)) => None,
    }
}

/// `e` (a failed context transfer or build start on part `part`), as [`Lost`] when the
/// builder no longer answers.
pub(crate) async fn lost_if_gone(e: anyhow::Error, client: &mut hoist_client::Client, part: usize, builder: &str) -> anyhow::Error {
    match not_answering(client).await {
        Some(why) => Lost { part, builder: builder.to_string(), why: format!("{e:#} ({why})") }.into(),
        None => e,
    }
}

/// Run a build's parts with the shared event loop, Ctrl-C cancelling it, then finish the
/// outputs that outlive the stream (a load); `None` when the build was cancelled. A part
/// whose connection broke (see [`connection_failed`]) or whose stream ended without a result
/// fails the build with [`Lost`]; errors the builders report are returned as they are.
pub(crate) async fn run_parts(
    parts: Vec<BuildPart>,
    sinks: &mut [Option<OutputSink>],
    renderer: &mut Renderer,
    mode: Mode,
) -> anyhow::Result<Option<Vec<v1::BuildResult>>> {
    use futures::StreamExt as _;
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let several = parts.len() > 1;
    let labels: Vec<String> = parts.iter().map(|p| p.label.clone()).collect();
    // Per part: what broke its connection, if something did.
    let mut broken = Vec::with_capacity(parts.len());
    let mut started = Vec::with_capacity(parts.len());
    for (k, mut p) in parts.into_iter().enumerate() {
        match hoist_client::session::start_build(&mut p.client, p.request, p.agents, p.context).await {
            Ok(events) => {
                let cut = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
                let seen = cut.clone();
                let events = events.inspect(move |item| {
                    if let Err(s) = item {
                        if connection_failed(s.code().into(), std::error::Error::source(s)) {
                            *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.message().to_string());
                        }
                    }
                });
                broken.push(cut);
                started.push(StartedPart { label: p.label, client: p.client, events: Box::pin(events), outputs: p.outputs });
            }
            Err(e) => {
                for s in sinks.iter_mut().flatten() {
                    s.abort();
                }
                renderer.finish();
                let e = BuildError { builder: several.then(|| p.label.clone()), kind: BuildErrorKind::Start(e) };
                return Err(lost_if_gone(e.into(), &mut p.client, k, &p.label).await);
            }
        }
    }
    let outcome = hoist_client::build::drive(started, sinks, renderer, ctrl_c).await;
    renderer.finish();
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let k = e.builder.as_ref().and_then(|b| labels.iter().position(|l| l == b)).unwrap_or(0);
            let why = match &e.kind {
                BuildErrorKind::Closed => Some(e.kind.to_string()),
                BuildErrorKind::Failed(_) => broken[k].lock().unwrap_or_else(|e| e.into_inner()).take(),
                _ => None,
            };
            return Err(match why {
                Some(why) => Lost { part: k, builder: labels[k].clone(), why }.into(),
                None => e.into(),
            });
        }
    };
    match outcome {
        BuildOutcome::Cancelled => {
            eprintln!("hoist: build cancelled");
            Ok(None)
        }
        BuildOutcome::Finished(results) => {
            for note in finish_sinks(sinks).await? {
                if mode != Mode::Quiet {
                    eprintln!("hoist: {note}");
                }
            }
            Ok(Some(results))
        }
    }
}

/// Print buildx's report of a failed step before its error: the tail of the step's log and
/// the Dockerfile around the instruction.
pub(crate) fn report_failure<T>(r: anyhow::Result<T>, renderer: &Renderer, inputs: &Inputs) -> anyhow::Result<T> {
    if let Err(e) = &r {
        if let Some(BuildError { kind: BuildErrorKind::Failed(message), .. }) = e.downcast_ref::<BuildError>() {
            if let Some(report) = renderer.failure_report(message, &inputs.dockerfile_name, &inputs.dockerfile) {
                eprint!("{report}");
            }
        }
    }
    r
}

/// The build request of `args` (outputs are filled in by the caller).
pub(crate) fn make_request(args: &BuildArgs, inputs: &Inputs, sent: &SentContext) -> anyhow::Result<v1::BuildRequest> {
    let mut secrets = Vec::new();
    for s in &args.secrets {
        secrets.push(parse_secret(s)?);
    }
    let ssh = args.ssh.iter().map(|s| v1::SshForward { id: s.split_once('=').map_or(s.as_str(), |(id, _)| id).to_string() }).collect();
    let mut entitlements: Vec<String> = Vec::new();
    for a in args.allow.iter().map(|a| a.trim()).filter(|a| !a.is_empty()) {
        // Checked here with the builder's own parser when it is linked in; the client alone
        // sends the names and the builder refuses an unknown one, naming it.
        #[cfg(feature = "builder")]
        let a = hoist_engine::entitlements::Entitlement::parse(a).map_err(|e| anyhow!("--allow: {e}"))?.name();
        entitlements.push(a.to_string());
    }
    let registries = tag_registries(&args.tags);
    let creds = hoist_oci::auth::Credentials::from_docker_config(registries.iter().map(|s| s.as_str()))
        .context("reading registry credentials from the docker config")?;
    let credentials = creds
        .iter()
        .map(|(host, c)| {
            let (username, password, identity_token) = match c {
                hoist_oci::auth::Credential::UsernamePassword { username, password } => (username.clone(), password.clone(), String::new()),
                hoist_oci::auth::Credential::IdentityToken(t) => (String::new(), String::new(), t.clone()),
            };
            v1::RegistryCredential { host: host.to_string(), username, password, identity_token }
        })
        .collect();
    let mut req = v1::BuildRequest {
        dockerfile: inputs.dockerfile.clone(),
        dockerfile_name: inputs.dockerfile_name.clone(),
        build_args: with_source_date_epoch(build_args(&args.build_args)?, std::env::var("SOURCE_DATE_EPOCH").ok()).into_iter().collect(),
        target: args.target.clone().unwrap_or_default(),
        platforms: args.platform.clone(),
        no_cache: args.no_cache,
        no_cache_filter: args.no_cache_filter.clone(),
        shm_size: args.shm_size.unwrap_or(0),
        ulimits: args.ulimit.clone(),
        pull: args.pull,
        labels: key_values(&args.labels, "--label")?.into_iter().collect(),
        network: args.network.clone().unwrap_or_default(),
        add_hosts: args.add_hosts.clone(),
        secrets,
        ssh,
        outputs: Vec::new(),
        credentials,
        tags: args.tags.clone(),
        insecure_registries: args.insecure_registries.clone(),
        entitlements,
        annotations: args.annotations.clone(),
        provenance: crate::attest::attestations(args)?.0,
        answers_credentials: true,
        ..Default::default()
    };
    sent.describe(&mut req);
    Ok(req)
}

/// What every attempt at a build shares: the arguments, the inputs read once, the outputs
/// and the ssh agents.
pub(crate) struct Job<'a> {
    /// The flags.
    pub(crate) args: &'a BuildArgs,
    /// Context directory and Dockerfile.
    pub(crate) inputs: &'a Inputs,
    /// The context's .dockerignore.
    pub(crate) ignore: Option<&'a IgnoreMatcher>,
    /// Every output (-o, --load, --push, --save), in that order.
    pub(crate) outputs: &'a [OutputSpec],
    /// The agents of `--ssh`, by id.
    pub(crate) agents: &'a HashMap<String, AgentSource>,
    /// How progress is shown.
    pub(crate) mode: Mode,
    /// When `hoist build` started (for the summary).
    pub(crate) started: Instant,
}

/// Run `hoist build`; returns the process exit code.
pub async fn run(args: BuildArgs) -> anyhow::Result<i32> {
    run_on(args, None).await
}

/// `hoist build` on `shared`, a connection to the one builder `args` name, when given (the
/// targets of `hoist bake` share one per project), else on a connection of its own.
pub(crate) async fn run_on(mut args: BuildArgs, shared: Option<hoist_client::Client>) -> anyhow::Result<i32> {
    let started = Instant::now();
    unsupported(&args)?;
    let mode = if args.quiet { Mode::Quiet } else { Mode::parse(&args.progress, std::io::stderr().is_terminal())? };
    if !args.cache_from.is_empty() || !args.cache_to.is_empty() {
        eprintln!("hoist: note: --cache-from/--cache-to are not needed: the builder's cache, shared by everyone in the project, serves every build");
    }
    if let Some(parent) = &args.cgroup_parent {
        eprintln!(
            "hoist: note: --cgroup-parent {parent} is not applied: each RUN step is placed in the cgroup the builder makes for the build, with the limits of hoist serve (--build-memory)"
        );
    }
    let mut outputs = Vec::new();
    for o in &args.outputs {
        outputs.push(crate::outputs::parse(o)?);
    }
    // The load first: the builder exports it at once and the engine pulls it while the
    // builder pushes.
    if args.load {
        outputs.push(OutputSpec::load());
    }
    if args.push {
        outputs.push(OutputSpec::push(&args.tags));
    }
    if args.save {
        outputs.push(OutputSpec::save(&args.tags));
    }
    if args.push && args.tags.is_empty() {
        bail!("--push needs at least one -t/--tag naming where to push");
    }
    for note in crate::attest::notes(&args, &outputs)? {
        if mode != Mode::Quiet {
            eprintln!("hoist: {note}");
        }
    }
    let inputs = read_inputs(&args)?;
    if let Some(code) = crate::check::hook(&args, &inputs.dockerfile, mode)? {
        return Ok(code);
    }
    let ignore = ignore_matcher(&inputs)?;
    let agents = ssh_agents(&args)?;
    args.conn.resolve_builders(inputs.context_dir.as_deref())?;
    let mut addrs = args.conn.addrs()?;
    // A builder listed twice is one builder.
    let mut listed = std::collections::HashSet::new();
    addrs.retain(|a| listed.insert(a.to_string()));
    let job = Job { args: &args, inputs: &inputs, ignore: ignore.as_ref(), outputs: &outputs, agents: &agents, mode, started };

    // A fleet: each platform goes to one of its builders (crate::multi).
    if addrs.len() > 1 {
        return crate::multi::run(&job, addrs).await;
    }
    let addr = addrs.into_iter().next();
    let client = match shared {
        Some(c) => c,
        None => args.conn.connect_to(addr.clone(), inputs.context_dir.as_deref()).await?,
    };
    on_builder(&job, addr.as_ref(), client, None).await
}

/// Run the whole build on one builder (`addr`, `None`: the embedded one) through `client`;
/// returns the exit code. `fleet`: the builder was chosen among several for these platforms
/// (the request names them, as the platforms were routed by them; the summary names the
/// builder). Fails with [`Lost`] when the connection to the builder breaks.
pub(crate) async fn on_builder(
    job: &Job<'_>,
    addr: Option<&BuilderAddr>,
    mut client: hoist_client::Client,
    fleet: Option<&[hoist_oci::Platform]>,
) -> anyhow::Result<i32> {
    let (args, inputs, outputs, mode) = (job.args, job.inputs, job.outputs, job.mode);
    let label = addr.map(|a| a.to_string()).unwrap_or_else(|| "embedded".to_string());
    let mut renderer = Renderer::new(mode);
    let sent = match sync_context(&mut client, inputs, job.ignore, &mut renderer, "[internal] load build context").await {
        Ok(sent) => sent,
        Err(e) => {
            renderer.finish();
            return Err(lost_if_gone(e, &mut client, 0, &label).await);
        }
    };
    let sync_stats = sent.stats;
    let mut req = make_request(args, inputs, &sent)?;
    if let Some(platforms) = fleet {
        req.platforms = platforms.iter().map(|p| p.to_string()).collect();
    }
    #[cfg(feature = "builder")]
    if addr.is_none() {
        // The embedded builder is the user's own machine: the host network needs no --allow
        // (docker build --network=host needs none either). security.insecure still does.
        req.entitlements.push(hoist_engine::entitlements::Entitlement::NetworkHost.name().to_string());
    }

    let mut sinks: Vec<Option<OutputSink>> = Vec::new();
    for o in outputs {
        sinks.push(o.open(&args.tags).await?);
    }
    let local_builder = addr_is_local(addr);
    req.outputs = outputs.iter().zip(&sinks).map(|(o, s)| o.to_proto_for(s.as_ref(), local_builder)).collect();
    let part = BuildPart {
        label: label.clone(),
        client,
        request: req,
        agents: job.agents.clone(),
        context: sent.provider.clone(),
        outputs: (0..outputs.len()).collect(),
    };
    let parts = run_parts(vec![part], &mut sinks, &mut renderer, mode).await;
    let Some(results) = report_failure(parts, &renderer, inputs)? else { return Ok(130) };
    let result = results.into_iter().next().ok_or_else(|| anyhow!("the builder sent no result"))?;
    if mode != Mode::Quiet {
        for p in &result.pushes {
            eprintln!("hoist: {}", push_line(p));
        }
        if !result.saved.is_empty() {
            eprintln!(
                "hoist: saved on the builder as {} in project {}: fetch it with `hoist pull {}`{}",
                result.saved,
                result.project,
                result.saved,
                args.tags.first().map(|t| format!(" or `hoist pull {t}`")).unwrap_or_default()
            );
        }
    }
    if let Some(path) = &args.iidfile {
        std::fs::write(path, &result.image_id).with_context(|| format!("writing --iidfile {}", path.display()))?;
    }
    if let Some(path) = &args.metadata_file {
        std::fs::write(path, &result.metadata_json).with_context(|| format!("writing --metadata-file {}", path.display()))?;
    }
    if args.quiet {
        println!("{}", result.image_id);
    } else if mode != Mode::Quiet {
        eprintln!(
            "hoist: built {} in {:.1}s{}: {} steps run, {} cached, {} containers; context: {} entries{}, {} files hashed, {} files sent ({}); build {} in project {}",
            result.image_id,
            job.started.elapsed().as_secs_f64(),
            if fleet.is_some() { format!(" on {label}") } else { String::new() },
            result.steps_run,
            result.steps_cached,
            result.containers_run,
            sync_stats.entries,
            if sync_stats.named { " (unchanged: named, not sent)" } else { "" },
            sync_stats.hashed_files,
            result.context_files_sent,
            human_bytes(result.context_bytes_sent),
            result.build_id,
            result.project,
        );
        if outputs.is_empty() {
            eprintln!("hoist: no output given: the result stays in the builder's cache (use --load, --push or -o)");
        }
    }
    Ok(0)
}

/// One line saying what a push to one reference did.
pub fn push_line(p: &v1::PushReport) -> String {
    if !p.error.is_empty() {
        return format!("push to {} failed after {:.1}s: {}", p.reference, p.seconds, p.error);
    }
    if p.blobs_uploaded + p.blobs_mounted + p.manifests == 0 {
        return format!(
            "{} is up to date ({:.1}s): its {} blobs and {} manifests were there already, nothing uploaded",
            p.reference, p.seconds, p.blobs_existed, p.manifests_existed
        );
    }
    format!(
        "pushed {} in {:.1}s: {} blobs uploaded ({}), {} already there, {} mounted, {} manifests{}",
        p.reference,
        p.seconds,
        p.blobs_uploaded,
        human_bytes(p.bytes_uploaded),
        p.blobs_existed,
        p.blobs_mounted,
        p.manifests,
        if p.manifests_existed > 0 { format!(" ({} unchanged)", p.manifests_existed) } else { String::new() }
    )
}

#[cfg(test)]
mod tests {
    use super::{connection_failed, with_source_date_epoch};
    use std::collections::HashMap;

    /// A build is run again on another builder only when the connection broke: a status
    /// the builder sent (no source) is its verdict, whatever its code.
    #[test]
    fn only_a_broken_connection_counts_as_lost() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        assert!(connection_failed(14, None), "UNAVAILABLE");
        assert!(connection_failed(2, Some(&reset)), "made here from an error of the connection");
        assert!(!connection_failed(2, None), "UNKNOWN from the builder: a failed RUN");
        assert!(!connection_failed(13, None), "INTERNAL from the builder");
        assert!(!connection_failed(3, None), "INVALID_ARGUMENT: a bad Dockerfile");
    }

    #[test]
    fn source_date_epoch_from_the_environment_becomes_a_build_arg_unless_given() {
        let none = with_source_date_epoch(HashMap::new(), None);
        assert!(none.is_empty());
        let from_env = with_source_date_epoch(HashMap::new(), Some("1700000000".into()));
        assert_eq!(from_env.get("SOURCE_DATE_EPOCH").map(String::as_str), Some("1700000000"));
        let given: HashMap<String, String> = [("SOURCE_DATE_EPOCH".to_string(), "5".to_string())].into_iter().collect();
        let kept = with_source_date_epoch(given, Some("1700000000".into()));
        assert_eq!(kept.get("SOURCE_DATE_EPOCH").map(String::as_str), Some("5"), "--build-arg wins");
        assert!(with_source_date_epoch(HashMap::new(), Some(String::new())).is_empty());
    }
}
