//! The conversion itself: BuildKit's `toDispatchState` and `dispatch*` functions, producing
//! graph stages instead of LLB.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use hoist_dockerfile::gocompat::{self, clean_path, join_path, quote, quote_slice};
use hoist_dockerfile::instructions::{
    self as ins, ChmodSpec, CmdLine, CopyInstr, Instr, Instruction, MountType, Network, RunInstr, Security, Sharing,
};
use hoist_dockerfile::parser::{chomp_heredoc_content, parse_heredoc};
use hoist_dockerfile::shell::{Env, Lexer};

use super::env::EnvList;
use super::{FrontendError, ImageResolver};
use hoist_oci::image::{Empty, Healthcheck, RunConfig};

use crate::graph::{
    Base, BuildGraph, CacheSharing, Chmod, CopyOp, CopySource, FrontendOptions, HistoryEntry, InlineFile, MkdirOp, MountKind, NetworkMode,
    Op, Platform, ResolvedImage, RunMount, RunOp, SecurityMode, Source, Stage, Step,
};

/// The Docker-only config fields BuildKit carries along (HEALTHCHECK, ONBUILD, SHELL,
/// ArgsEscaped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Extras {
    healthcheck: Option<Healthcheck>,
    on_build: Vec<String>,
    shell: Vec<String>,
    args_escaped: bool,
}

const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PROXY_ARGS: [&str; 5] = ["HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY"];
const NON_ENV_ARGS: [&str; 2] = ["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];

/// Whether a `# syntax=` value names the standard Dockerfile frontend (`docker/dockerfile`
/// or `docker/dockerfile-upstream`, on Docker Hub, with any tag or digest).
fn is_standard_frontend(value: &str) -> bool {
    let image = value.split('@').next().unwrap_or(value);
    let repo = match image.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => image,
    };
    let repo = repo.strip_prefix("docker.io/").or_else(|| repo.strip_prefix("index.docker.io/")).unwrap_or(repo);
    matches!(repo, "docker/dockerfile" | "docker/dockerfile-upstream")
}

/// Whether an ADD source is a git repository (`git@host:repo`, `git://`, `ssh://`, or an
/// http(s) URL whose path ends in `.git`), as BuildKit's `gitutil.ParseGitRef` tells them.
pub fn is_git_source(src: &str) -> bool {
    if src.starts_with("git://") || src.starts_with("ssh://") {
        return true;
    }
    if let Some(rest) = src.strip_prefix("git@") {
        return rest.contains(':');
    }
    if src.starts_with("http://") || src.starts_with("https://") {
        let no_frag = src.split('#').next().unwrap_or(src);
        let no_query = no_frag.split('?').next().unwrap_or(no_frag);
        return no_query.ends_with(".git");
    }
    false
}

fn is_http_source(src: &str) -> bool {
    (src.starts_with("http://") || src.starts_with("https://")) && !is_git_source(src)
}

/// A command of a stage with the stages it reads from.
#[derive(Debug, Clone)]
struct Cmd {
    instr: Instr,
    /// COPY: `[Some(from)]`; RUN: one entry per mount (`Some` when the mount has `from=`).
    sources: Vec<Option<usize>>,
    onbuild: bool,
}

/// A stage before dispatch: from the Dockerfile, or implicit (an image used by
/// `COPY --from` / `--mount=from`).
#[derive(Debug, Clone)]
struct Info {
    name: Option<String>,
    dockerfile_index: Option<usize>,
    base_name: String,
    explicit_platform: Option<Platform>,
    line: usize,
    commands: Vec<Cmd>,
    base: Option<usize>,
    implicit: bool,
    onbuild_init: bool,
    resolved: Option<ResolvedImage>,
}

impl Info {
    fn display_name(&self) -> String {
        match (&self.name, self.dockerfile_index) {
            (Some(n), _) => n.clone(),
            (None, Some(i)) => format!("stage-{i}"),
            (None, None) => self.base_name.clone(),
        }
    }
}

/// The image config being built (Docker's config with the fields BuildKit touches).
#[derive(Debug, Clone, Default)]
struct Cfg {
    env: Vec<String>,
    /// Position in `env` of each key (first occurrence); rebuilt when out of step, so that
    /// thousands of ENV instructions stay linear.
    env_pos: HashMap<String, usize>,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    working_dir: String,
    user: String,
    exposed_ports: BTreeSet<String>,
    volumes: BTreeSet<String>,
    labels: BTreeMap<String, String>,
    stop_signal: Option<String>,
    extras: Extras,
    author: Option<String>,
}

impl Cfg {
    fn add_env(&mut self, k: &str, v: &str) {
        let entry = format!("{k}={v}");
        if self.env_pos.len() != self.env.len() {
            self.env_pos.clear();
            for (i, e) in self.env.iter().enumerate() {
                let key = e.split('=').next().unwrap_or("");
                self.env_pos.entry(key.to_string()).or_insert(i);
            }
        }
        match self.env_pos.get(k) {
            Some(&i) => self.env[i] = entry,
            None => {
                self.env_pos.insert(k.to_string(), self.env.len());
                self.env.push(entry);
            }
        }
    }

    fn from_image(img: &ResolvedImage) -> Cfg {
        let rc = &img.config.config;
        Cfg {
            env: rc.env.clone().unwrap_or_default(),
            cmd: rc.cmd.clone(),
            entrypoint: rc.entrypoint.clone(),
            working_dir: rc.working_dir.clone().unwrap_or_default(),
            user: rc.user.clone().unwrap_or_default(),
            exposed_ports: rc.exposed_ports.as_ref().map(|m| m.keys().cloned().collect()).unwrap_or_default(),
            volumes: rc.volumes.as_ref().map(|m| m.keys().cloned().collect()).unwrap_or_default(),
            labels: rc.labels.clone().unwrap_or_default(),
            stop_signal: rc.stop_signal.clone(),
            extras: Extras {
                healthcheck: rc.healthcheck.clone(),
                on_build: rc.on_build.clone().unwrap_or_default(),
                shell: rc.shell.clone().unwrap_or_default(),
                args_escaped: rc.args_escaped.unwrap_or(false),
            },
            author: img.config.author.clone(),
            env_pos: HashMap::new(),
        }
    }

    fn scratch() -> Cfg {
        Cfg { env: vec![format!("PATH={DEFAULT_PATH}")], working_dir: "/".into(), ..Cfg::default() }
    }

    fn to_run_config(&self) -> RunConfig {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let set = |v: &BTreeSet<String>| (!v.is_empty()).then(|| v.iter().map(|k| (k.clone(), Empty {})).collect());
        RunConfig {
            user: opt(&self.user),
            exposed_ports: set(&self.exposed_ports),
            env: (!self.env.is_empty()).then(|| self.env.clone()),
            entrypoint: self.entrypoint.clone(),
            cmd: self.cmd.clone(),
            volumes: set(&self.volumes),
            working_dir: opt(&self.working_dir),
            labels: (!self.labels.is_empty()).then(|| self.labels.clone()),
            stop_signal: self.stop_signal.clone(),
            args_escaped: self.extras.args_escaped.then_some(true),
            healthcheck: self.extras.healthcheck.clone(),
            on_build: (!self.extras.on_build.is_empty()).then(|| self.extras.on_build.clone()),
            shell: (!self.extras.shell.is_empty()).then(|| self.extras.shell.clone()),
        }
    }
}

/// The dispatch state of a stage.
#[derive(Debug, Clone)]
struct State {
    env: EnvList,
    workdir: String,
    user: String,
    platform: Platform,
    cfg: Cfg,
    build_args: Vec<(String, Option<String>)>,
    steps: Vec<Step>,
    history: Vec<HistoryEntry>,
    cmd_set: bool,
    base: Base,
    /// ONBUILD expressions of this stage's own instructions (for stages built on it).
    own_onbuild: Vec<String>,
}

/// Converter of one Dockerfile for one platform.
pub(crate) struct Converter<'a> {
    opts: &'a FrontendOptions,
    file: String,
    lex: Lexer,
    target_platform: Platform,
    build_platform: Platform,
    global: EnvList,
    warnings: Vec<String>,
    declared_args: BTreeSet<String>,
    proxy_env: Vec<String>,
    /// Size limits on the Dockerfile and its expansions.
    limits: hoist_dockerfile::Limits,
    /// Bytes of expanded text and copied environments the graph holds so far (bounded by
    /// [`Converter::graph_budget`], so a hostile Dockerfile cannot make the builder hold
    /// gigabytes by repeating a large variable).
    spent: AtomicUsize,
}

type R<T> = Result<T, FrontendError>;

fn split_kv(e: &str) -> (&str, &str) {
    e.split_once('=').unwrap_or((e, ""))
}

fn uppercase_cmd(s: &str) -> String {
    match s.split_once(' ') {
        Some((a, b)) => format!("{} {b}", a.to_ascii_uppercase()),
        None => s.to_ascii_uppercase(),
    }
}

fn summarize_heredoc(doc: &str) -> String {
    let doc = doc.trim();
    let normalized = doc.replace("\r\n", "\n");
    let mut lines = normalized.split('\n');
    let mut s = lines.next().unwrap_or("").to_string();
    if lines.next().is_some() {
        s.push_str("...");
    }
    s
}

/// `system.NormalizeWorkdir` for Linux.
fn normalize_workdir(current: &str, wd: &str) -> String {
    if wd.starts_with('/') {
        clean_path(wd)
    } else {
        join_path(&["/", current, wd])
    }
}

/// BuildKit's `pathRelativeToWorkingDir` + `NormalizePath(keepSlash=true)`.
fn dest_path(workdir: &str, p: &str) -> String {
    let p = if p == "." || p.is_empty() { "./" } else { p };
    let joined = if p.starts_with('/') { clean_path(p) } else { join_path(&["/", workdir, p]) };
    let keep = p.ends_with('/') || p.ends_with("/.") || p == ".";
    if keep && !joined.ends_with('/') {
        format!("{joined}/")
    } else {
        joined
    }
}

/// Go's `strconv.Atoi`, for `COPY --from=<index>`.
fn go_atoi(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse::<i64>().ok()
}

/// Minimal check of an image reference (`reference.ParseNormalizedNamed`): non-empty, no
/// whitespace, lowercase repository path.
fn validate_reference(r: &str) -> Result<(), String> {
    if r.is_empty() || r.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("invalid reference format: {}", quote(r)));
    }
    let name = r.split('@').next().unwrap_or(r);
    let (host, path) = match name.split_once('/') {
        Some((h, p)) if h.contains('.') || h.contains(':') || h == "localhost" => (Some(h), p),
        _ => (None, name),
    };
    let _ = host;
    let repo = match path.rfind(':') {
        Some(i) if !path[i..].contains('/') => &path[..i],
        _ => path,
    };
    if repo.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("invalid reference format: repository name ({repo}) must be lowercase"));
    }
    if repo.is_empty() || !repo.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/')) {
        return Err(format!("invalid reference format: {}", quote(r)));
    }
    Ok(())
}

impl<'a> Converter<'a> {
    pub(crate) fn new(opts: &'a FrontendOptions, limits: hoist_dockerfile::Limits) -> Converter<'a> {
        let build_platform = opts.build_platform.clone().unwrap_or_else(Platform::host);
        let target_platform = opts.target_platform.clone().unwrap_or_else(|| build_platform.clone());
        let file = if opts.dockerfile_name.is_empty() { "Dockerfile".to_string() } else { opts.dockerfile_name.clone() };
        let mut proxy_env = Vec::new();
        for p in PROXY_ARGS {
            if let Some((_, v)) = opts.build_args.iter().find(|(k, _)| k.eq_ignore_ascii_case(p)) {
                proxy_env.push(format!("{p}={v}"));
                proxy_env.push(format!("{}={v}", p.to_ascii_lowercase()));
            }
        }
        Converter {
            opts,
            file,
            lex: Lexer::new('\\'),
            target_platform,
            build_platform,
            global: EnvList::default(),
            warnings: Vec::new(),
            declared_args: BTreeSet::new(),
            proxy_env,
            limits,
            spent: AtomicUsize::new(0),
        }
    }

    /// Most bytes of expanded text and environment copies one graph may hold.
    fn graph_budget(&self) -> usize {
        self.limits.max_expansion_bytes.saturating_mul(64).max(64 << 20)
    }

    /// Count `bytes` more held by the graph, failing at `line` past the budget.
    fn charge(&self, line: usize, bytes: usize) -> R<()> {
        let total = self.spent.load(Ordering::Relaxed).saturating_add(bytes);
        self.spent.store(total, Ordering::Relaxed);
        if total > self.graph_budget() {
            return Err(self.invalid(
                line,
                format!(
                    "the Dockerfile expands to more than {} bytes of values and environments (the builder's limit, 64 times hoist serve --max-expansion-bytes): expected smaller variables or fewer instructions using them",
                    self.graph_budget()
                ),
            ));
        }
        Ok(())
    }

    /// Fail at `line` when the stage's environment is over the limit.
    fn check_env_size(&self, st: &State, line: usize) -> R<()> {
        if st.env.bytes() > self.limits.max_expansion_bytes {
            return Err(self.invalid(
                line,
                format!(
                    "the stage's environment (ENV and ARG values) is {} bytes, more than the builder accepts ({} bytes; hoist serve --max-expansion-bytes): expected smaller values",
                    st.env.bytes(),
                    self.limits.max_expansion_bytes
                ),
            ));
        }
        Ok(())
    }

    fn syntax(&self, line: usize, message: impl Into<String>) -> FrontendError {
        FrontendError::Syntax { file: self.file.clone(), line, message: message.into() }
    }
    fn invalid(&self, line: usize, message: impl Into<String>) -> FrontendError {
        FrontendError::Invalid { file: self.file.clone(), line, message: message.into() }
    }
    fn expansion(&self, line: usize, message: impl Into<String>) -> FrontendError {
        FrontendError::Expansion { file: self.file.clone(), line, message: message.into() }
    }

    fn expand(&self, word: &str, env: &dyn Env, line: usize) -> R<String> {
        let v = self.lex.process_word(word, env).map_err(|e| self.expansion(line, e.to_string()))?;
        self.charge(line, v.len())?;
        Ok(v)
    }

    pub(crate) async fn run(mut self, dockerfile: &[u8], resolver: &dyn ImageResolver) -> R<BuildGraph> {
        if dockerfile.is_empty() {
            return Err(FrontendError::Empty { file: self.file.clone() });
        }
        // Size, NUL bytes, UTF-8, line length and instruction count first: each names its line.
        let parsed = hoist_dockerfile::parse_bytes(dockerfile, &self.limits).map_err(|e| self.syntax(e.line, e.message))?;
        // `# syntax=` may only name the standard Dockerfile frontend: hoist runs no other.
        if let Some(d) = parsed.directives.iter().find(|d| d.name == "syntax") {
            if !is_standard_frontend(&d.value) {
                return Err(self.invalid(
                    d.line,
                    format!(
                        "# syntax={} names another frontend: hoist builds with its own Dockerfile frontend, which follows \
                         docker/dockerfile (remove the directive or name docker/dockerfile)",
                        d.value
                    ),
                ));
            }
        }
        let stages = hoist_dockerfile::parse_stages(&parsed).map_err(|e| self.syntax(e.line, e.message))?;
        self.lex = Lexer::new(parsed.escape);
        self.lex.max_growth = self.limits.max_expansion_bytes;
        for w in &parsed.warnings {
            self.warnings.push(format!("{}:{}: {}", self.file, w.line, w.message));
        }
        if stages.stages.is_empty() {
            return Err(FrontendError::NoStages { file: self.file.clone() });
        }
        let target_name = match &self.opts.target {
            Some(t) => t.clone(),
            None => stages.stages.last().and_then(|s| s.from.name.clone()).unwrap_or_default(),
        };
        self.init_global_args(&target_name);
        for meta in &stages.meta_args {
            let Instruction::Arg(defs) = &meta.instruction else {
                continue;
            };
            for def in defs {
                self.declared_args.insert(def.key.clone());
                let value = match self.opts.build_args.get(&def.key) {
                    Some(v) => Some(v.clone()),
                    None => match &def.default {
                        Some(d) => Some(self.expand(d, &self.global, meta.start_line)?),
                        None => None,
                    },
                };
                if let Some(v) = value {
                    self.global.set(&def.key, &v);
                }
            }
        }

        // Stages: expand FROM with the global args.
        let mut infos: Vec<Info> = Vec::new();
        for (i, st) in stages.stages.iter().enumerate() {
            let base_name = self.expand(&st.from.base, &self.global, st.line)?;
            if base_name.is_empty() {
                return Err(self.invalid(st.line, format!("base name ({}) should not be blank", st.from.base)));
            }
            let explicit_platform = match &st.from.platform {
                None => None,
                Some(p) => {
                    let v = self
                        .lex
                        .process_word(p, &self.global)
                        .map_err(|e| self.expansion(st.line, format!("failed to process arguments for platform {p}: {e}")))?;
                    if v.is_empty() {
                        return Err(self.invalid(st.line, format!("empty platform value from expression {p}")));
                    }
                    Some(Platform::parse(&v).map_err(|e| self.invalid(st.line, format!("failed to parse platform {p}: {e}")))?)
                }
            };
            let base = infos.iter().position(|inf| inf.name.as_deref() == Some(base_name.as_str()));
            if base.is_none() {
                if let Some(later) = stages.stages[i..].iter().find(|s| s.from.name.as_deref() == Some(base_name.as_str())) {
                    self.warnings.push(format!(
                        "{}:{}: FROM {base_name} refers to the stage defined on line {} later in the file; BuildKit uses the image {base_name:?} instead",
                        self.file, st.line, later.line
                    ));
                }
            }
            let commands = st.commands.iter().map(|c| Cmd { instr: c.clone(), sources: Vec::new(), onbuild: false }).collect();
            infos.push(Info {
                name: st.from.name.clone(),
                dockerfile_index: Some(i),
                base_name,
                explicit_platform,
                line: st.line,
                commands,
                base,
                implicit: false,
                onbuild_init: false,
                resolved: None,
            });
        }
        let n_stages = infos.len();

        let target = match &self.opts.target {
            None => n_stages - 1,
            Some(t) => {
                let lower = t.to_lowercase();
                match infos.iter().position(|i| i.name.as_deref() == Some(lower.as_str())) {
                    Some(p) => p,
                    None => match t.parse::<usize>() {
                        Ok(n) if n < n_stages => n,
                        _ => {
                            let names: Vec<String> = infos.iter().filter_map(|i| i.name.clone()).collect();
                            return Err(FrontendError::TargetNotFound {
                                file: self.file.clone(),
                                target: t.clone(),
                                available: if names.is_empty() {
                                    format!("{n_stages} unnamed, use an index 0..{}", n_stages - 1)
                                } else {
                                    names.join(", ")
                                },
                            });
                        }
                    },
                }
            }
        };

        // Dependencies of every stage's commands.
        for si in 0..n_stages {
            let mut cmds = std::mem::take(&mut infos[si].commands);
            for c in cmds.iter_mut() {
                c.sources = self.command_sources(&c.instr, &mut infos)?;
            }
            infos[si].commands = cmds;
        }
        self.check_cycles(&infos)?;

        // Resolve reachable base images, apply ONBUILD triggers, repeat while triggers add deps.
        let mut reachable;
        loop {
            reachable = reachable_from(&infos, target);
            self.resolve_images(&mut infos, &reachable, resolver).await?;
            let mut new_deps = false;
            for &si in &reachable {
                if infos[si].onbuild_init || infos[si].implicit {
                    continue;
                }
                infos[si].onbuild_init = true;
                let mut triggers: Vec<String> = Vec::new();
                match (infos[si].base, &infos[si].resolved) {
                    (Some(b), _) => {
                        for c in &infos[b].commands {
                            if let Instruction::Onbuild(e) = &c.instr.instruction {
                                if !c.onbuild {
                                    triggers.push(e.clone());
                                }
                            }
                        }
                    }
                    (None, Some(img)) => triggers.extend(img.config.config.on_build.iter().flatten().cloned()),
                    _ => {}
                }
                if triggers.is_empty() {
                    continue;
                }
                let line = infos[si].line;
                let mut cmds = Vec::new();
                for t in &triggers {
                    let df = hoist_dockerfile::parse(t)
                        .map_err(|e| self.syntax(line, format!("invalid ONBUILD trigger {}: {}", quote(t), e.message)))?;
                    if df.nodes.len() != 1 {
                        return Err(self.syntax(line, format!("onbuild trigger should be a single expression: {}", quote(t))));
                    }
                    let mut node = df.nodes[0].clone();
                    node.start_line = line;
                    node.end_line = line;
                    let instr = ins::parse_instruction(&node)
                        .map_err(|e| self.syntax(line, format!("invalid ONBUILD trigger {}: {}", quote(t), e.message)))?;
                    let sources = self.command_sources(&instr, &mut infos)?;
                    if sources.iter().any(Option::is_some) {
                        new_deps = true;
                    }
                    cmds.push(Cmd { instr, sources, onbuild: true });
                }
                cmds.append(&mut infos[si].commands);
                infos[si].commands = cmds;
            }
            if !new_deps {
                break;
            }
            self.check_cycles(&infos)?;
        }

        // Output order: implicit image stages, then the Dockerfile's stages in order.
        let mut order: Vec<usize> = reachable.iter().copied().filter(|&i| infos[i].implicit).collect();
        order.sort_unstable();
        let mut df_order: Vec<usize> = reachable.iter().copied().filter(|&i| !infos[i].implicit).collect();
        df_order.sort_unstable();
        order.extend(df_order);
        let out_id: HashMap<usize, usize> = order.iter().enumerate().map(|(o, &i)| (i, o)).collect();

        let mut states: HashMap<usize, State> = HashMap::new();
        let mut out = Vec::with_capacity(order.len());
        for &si in &order {
            let st = self.dispatch_stage(&infos, si, &states, &out_id)?;
            let info = &infos[si];
            let mut cfg = st.cfg.clone();
            if si == target {
                for (k, v) in &self.opts.labels {
                    cfg.labels.insert(k.clone(), v.clone());
                }
            }
            out.push(Stage {
                name: info.name.clone(),
                dockerfile_index: info.dockerfile_index,
                platform: st.platform.clone(),
                base: st.base.clone(),
                steps: st.steps.clone(),
                config: cfg.to_run_config(),
                author: cfg.author.clone(),
                history: st.history.clone(),
            });
            states.insert(si, st);
        }

        let unused: Vec<String> = self
            .opts
            .build_args
            .keys()
            .filter(|k| {
                !self.declared_args.contains(*k)
                    && !PROXY_ARGS.iter().any(|p| p.eq_ignore_ascii_case(k))
                    && !is_platform_arg(k)
                    // the exporter consumes it (layer and config timestamps)
                    && k.as_str() != "SOURCE_DATE_EPOCH"
            })
            .cloned()
            .collect();
        if !unused.is_empty() {
            self.warnings.push(format!("one or more build-args [{}] were not consumed", unused.join(" ")));
        }

        Ok(BuildGraph { stages: out, target: out_id[&target], warnings: self.warnings })
    }

    fn init_global_args(&mut self, target_name: &str) {
        let bp = self.build_platform.clone();
        let tp = self.target_platform.clone();
        let pairs = [
            ("BUILDPLATFORM", bp.to_string()),
            ("BUILDOS", bp.os.clone()),
            ("BUILDOSVERSION", String::new()),
            ("BUILDARCH", bp.architecture.clone()),
            ("BUILDVARIANT", bp.variant_arg()),
            ("TARGETPLATFORM", tp.to_string()),
            ("TARGETOS", tp.os.clone()),
            ("TARGETOSVERSION", String::new()),
            ("TARGETARCH", tp.architecture.clone()),
            ("TARGETVARIANT", tp.variant_arg()),
            ("TARGETSTAGE", target_name.to_string()),
        ];
        for (k, v) in pairs {
            let v = self.opts.build_args.get(k).cloned().unwrap_or(v);
            self.global.set(k, &v);
        }
    }

    /// Find or create the stage a `--from` names.
    fn source_for(&self, from: &str, infos: &mut Vec<Info>, line: usize, by_index: bool) -> R<usize> {
        if by_index {
            if let Some(idx) = go_atoi(from) {
                if idx < 0 || idx as usize >= infos.len() {
                    return Err(self.invalid(
                        line,
                        format!(
                            "invalid stage index {idx} (the Dockerfile has stages 0..{})",
                            infos.iter().filter(|i| !i.implicit).count().saturating_sub(1)
                        ),
                    ));
                }
                return Ok(idx as usize);
            }
        }
        let lower = from.to_lowercase();
        if let Some(p) = infos.iter().position(|i| !i.implicit && i.name.as_deref() == Some(lower.as_str())) {
            return Ok(p);
        }
        if let Some(p) = infos.iter().position(|i| i.implicit && i.base_name == from) {
            return Ok(p);
        }
        infos.push(Info {
            name: None,
            dockerfile_index: None,
            base_name: from.to_string(),
            explicit_platform: None,
            line,
            commands: Vec::new(),
            base: None,
            implicit: true,
            onbuild_init: true,
            resolved: None,
        });
        Ok(infos.len() - 1)
    }

    fn command_sources(&self, instr: &Instr, infos: &mut Vec<Info>) -> R<Vec<Option<usize>>> {
        let line = instr.start_line;
        match &instr.instruction {
            Instruction::Copy(c) => match &c.from {
                Some(f) => Ok(vec![Some(self.source_for(f, infos, line, true)?)]),
                None => Ok(vec![None]),
            },
            Instruction::Run(r) => {
                let mut out = Vec::with_capacity(r.mounts.len());
                for m in &r.mounts {
                    let fields = ins::csv_fields(m).map_err(|e| self.invalid(line, e))?;
                    let from = fields.iter().find_map(|f| {
                        let (k, v) = f.split_once('=')?;
                        k.eq_ignore_ascii_case("from").then(|| v.to_string())
                    });
                    match from.filter(|f| !f.is_empty()) {
                        Some(f) => out.push(Some(self.source_for(&f, infos, line, false)?)),
                        None => out.push(None),
                    }
                }
                Ok(out)
            }
            _ => Ok(Vec::new()),
        }
    }

    fn check_cycles(&self, infos: &[Info]) -> R<()> {
        // deps: COPY --from and mount sources (a base is always an earlier stage)
        fn visit(infos: &[Info], s: usize, visited: &mut Vec<bool>, on_path: &mut Vec<bool>, via: &mut Vec<usize>) -> Option<usize> {
            if visited[s] {
                return None;
            }
            visited[s] = true;
            on_path[s] = true;
            for c in &infos[s].commands {
                for d in c.sources.iter().flatten() {
                    if on_path[*d] {
                        via.push(c.instr.start_line);
                        return Some(*d);
                    }
                    via.push(c.instr.start_line);
                    if let Some(x) = visit(infos, *d, visited, on_path, via) {
                        return Some(x);
                    }
                    via.pop();
                }
            }
            on_path[s] = false;
            None
        }
        let mut visited = vec![false; infos.len()];
        for s in 0..infos.len() {
            let mut on_path = vec![false; infos.len()];
            let mut via = Vec::new();
            if visit(infos, s, &mut visited, &mut on_path, &mut via).is_some() {
                let line = via.last().copied().unwrap_or(infos[s].line);
                return Err(self.invalid(
                    line,
                    format!(
                        "circular dependency detected on stage: {} (a stage cannot copy from itself or from a stage that depends on it)",
                        infos[s].display_name()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn resolve_images(&self, infos: &mut [Info], reachable: &[usize], resolver: &dyn ImageResolver) -> R<()> {
        let mut wanted: Vec<(usize, String, Platform)> = Vec::new();
        for &si in reachable {
            let inf = &infos[si];
            if inf.base.is_some() || inf.resolved.is_some() || inf.base_name == "scratch" {
                continue;
            }
            validate_reference(&inf.base_name)
                .map_err(|e| self.invalid(inf.line, format!("failed to parse stage name {}: {e}", quote(&inf.base_name))))?;
            let platform = inf.explicit_platform.clone().unwrap_or_else(|| self.target_platform.clone());
            wanted.push((si, inf.base_name.clone(), platform));
        }
        let mut unique: Vec<(String, Platform)> = Vec::new();
        for (_, r, p) in &wanted {
            if !unique.iter().any(|(ur, up)| ur == r && up == p) {
                unique.push((r.clone(), p.clone()));
            }
        }
        let results = futures::future::join_all(unique.iter().map(|(r, p)| resolver.resolve(r, p))).await;
        for (si, r, p) in wanted {
            let idx = unique.iter().position(|(ur, up)| *ur == r && *up == p).unwrap_or(0);
            match &results[idx] {
                Ok(img) => infos[si].resolved = Some(img.clone()),
                Err(message) => {
                    return Err(FrontendError::Resolve {
                        file: self.file.clone(),
                        line: infos[si].line,
                        reference: r.clone(),
                        platform: p.to_string(),
                        message: message.clone(),
                    })
                }
            }
        }
        Ok(())
    }

    fn init_state(&self, infos: &[Info], si: usize, states: &HashMap<usize, State>, out_id: &HashMap<usize, usize>) -> R<State> {
        let inf = &infos[si];
        let mut st = match inf.base {
            Some(b) => {
                let Some(bs) = states.get(&b) else {
                    return Err(self.invalid(inf.line, format!("stage {} is used before it is built", infos[b].display_name())));
                };
                let mut s = bs.clone();
                s.steps.clear();
                s.history.clear();
                s.cmd_set = false;
                s.base = Base::Stage(out_id[&b]);
                // The base stage's ONBUILD triggers run at the start of this stage (above);
                // like BuildKit (checked against Docker 20.10), they are not inherited into
                // this stage's config, which carries only its own ONBUILD lines.
                s.cfg.extras.on_build.clear();
                s.own_onbuild.clear();
                s
            }
            None => {
                let platform = inf.explicit_platform.clone().unwrap_or_else(|| self.target_platform.clone());
                let (cfg, base) = match &inf.resolved {
                    Some(img) => {
                        let mut c = Cfg::from_image(img);
                        c.extras.on_build.clear();
                        (c, Base::Image(img.clone()))
                    }
                    None => (Cfg::scratch(), Base::Scratch),
                };
                State {
                    env: EnvList::default(),
                    workdir: "/".into(),
                    user: String::new(),
                    platform,
                    cfg,
                    build_args: Vec::new(),
                    steps: Vec::new(),
                    history: Vec::new(),
                    cmd_set: false,
                    base,
                    own_onbuild: Vec::new(),
                }
            }
        };
        if !st.cfg.env.iter().any(|e| split_kv(e).0 == "PATH") {
            st.cfg.env.push(format!("PATH={DEFAULT_PATH}"));
        }
        for e in st.cfg.env.clone() {
            let (k, v) = split_kv(&e);
            st.env.set(k, v);
        }
        if !st.cfg.working_dir.is_empty() {
            let wd = normalize_workdir(&st.cfg.working_dir, &st.cfg.working_dir.clone());
            st.cfg.working_dir = wd.clone();
            st.workdir = wd;
        }
        if !st.cfg.user.is_empty() {
            st.user = st.cfg.user.clone();
        }
        // every stage holds its own copy of the environment it starts with
        self.check_env_size(&st, inf.line)?;
        self.charge(inf.line, st.env.bytes())?;
        Ok(st)
    }

    fn dispatch_stage(&mut self, infos: &[Info], si: usize, states: &HashMap<usize, State>, out_id: &HashMap<usize, usize>) -> R<State> {
        let mut st = self.init_state(infos, si, states, out_id)?;
        let inf = &infos[si];
        if inf.implicit {
            return Ok(st);
        }
        for cmd in &inf.commands {
            self.dispatch(&mut st, infos, si, cmd, states, out_id)?;
        }
        Ok(st)
    }

    fn history(&self, st: &mut State, created_by: String, with_layer: bool, buildkit_suffix: bool) {
        let created_by = if buildkit_suffix { format!("{created_by} # buildkit") } else { created_by };
        st.history.push(HistoryEntry { created_by, comment: Some(HISTORY_COMMENT.into()), empty_layer: !with_layer });
    }

    fn display(&self, st: &State, code: &str, onbuild: bool) -> String {
        let mut lex = self.lex;
        lex.raw_quotes = true;
        lex.skip_unset_env = true;
        let expanded = lex.process_word(code, &st.env).unwrap_or_else(|_| code.to_string());
        // counted by the caller's step (see `charge`); displays are at most the word plus
        // the growth limit
        self.spent.fetch_add(expanded.len(), Ordering::Relaxed);
        let d = uppercase_cmd(&expanded);
        if onbuild {
            format!("ONBUILD {d}")
        } else {
            d
        }
    }

    fn source_of(&self, infos: &[Info], si: usize, src: usize, line: usize, what: &str, out_id: &HashMap<usize, usize>) -> R<Source> {
        if !infos[src].implicit && src >= si {
            let me = infos[si].display_name();
            let them = infos[src].display_name();
            return Err(self.invalid(
                line,
                if src == si {
                    format!("circular dependency detected on stage: {me} ({what} its own stage)")
                } else {
                    format!("cannot {what} stage {}, it needs to be defined before current stage {}", quote(&them), quote(&me))
                },
            ));
        }
        match out_id.get(&src) {
            Some(&o) => Ok(Source::Stage(o)),
            None => Err(self.invalid(line, format!("stage {} is not part of the build", quote(&infos[src].display_name())))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &mut self,
        st: &mut State,
        infos: &[Info],
        si: usize,
        cmd: &Cmd,
        _states: &HashMap<usize, State>,
        out_id: &HashMap<usize, usize>,
    ) -> R<()> {
        let line = cmd.instr.start_line;
        let code = cmd.instr.code.clone();
        match &cmd.instr.instruction {
            Instruction::From(_) => {}
            Instruction::Maintainer(m) => {
                st.cfg.author = Some(m.clone());
                self.history(st, format!("MAINTAINER {m}"), false, false);
            }
            Instruction::Env(kvs) => {
                let mut expanded = Vec::with_capacity(kvs.len());
                for kv in kvs {
                    expanded.push((self.expand(&kv.key, &st.env, line)?, self.expand(&kv.value, &st.env, line)?));
                }
                let mut msg = String::from("ENV");
                for (k, v) in &expanded {
                    msg.push_str(&format!(" {k}={v}"));
                    st.env.set(k, v);
                    st.cfg.add_env(k, v);
                }
                self.check_env_size(st, line)?;
                self.charge(line, msg.len())?;
                self.history(st, msg, false, false);
            }
            Instruction::Label(kvs) => {
                let mut msg = String::from("LABEL");
                let mut expanded = Vec::with_capacity(kvs.len());
                for kv in kvs {
                    expanded.push((self.expand(&kv.key, &st.env, line)?, self.expand(&kv.value, &st.env, line)?));
                }
                for (k, v) in expanded {
                    msg.push_str(&format!(" {k}={v}"));
                    st.cfg.labels.insert(k, v);
                }
                self.history(st, msg, false, false);
            }
            Instruction::Arg(defs) => {
                let mut parts = Vec::new();
                for def in defs {
                    self.declared_args.insert(def.key.clone());
                    let has_value = self.opts.build_args.contains_key(&def.key);
                    let mut value = def.default.clone();
                    let mut has_default = value.is_some();
                    if !has_default && !has_value {
                        if let Some(v) = self.global.get(&def.key) {
                            value = Some(v.to_string());
                            has_default = false;
                        }
                    }
                    if has_value {
                        value = self.opts.build_args.get(&def.key).cloned();
                    } else if has_default {
                        if let Some(d) = &value {
                            value = Some(self.expand(d, &st.env, line)?);
                        }
                    }
                    if let Some(v) = &value {
                        if !NON_ENV_ARGS.contains(&def.key.as_str()) {
                            st.env.set(&def.key, v);
                        }
                    }
                    st.build_args.push((def.key.clone(), value.clone()));
                    parts.push(match &value {
                        Some(v) => format!("{}={v}", def.key),
                        None => def.key.clone(),
                    });
                }
                self.check_env_size(st, line)?;
                let msg = format!("ARG {}", parts.join(" "));
                self.charge(line, msg.len())?;
                self.history(st, msg, false, false);
            }
            Instruction::Run(r) => self.dispatch_run(st, infos, si, cmd, r, out_id)?,
            Instruction::Workdir(p) => {
                let p = self.expand(p, &st.env, line)?;
                let wd = normalize_workdir(&st.cfg.working_dir, &p);
                st.cfg.working_dir = wd.clone();
                st.workdir = wd.clone();
                let with_layer = wd != "/";
                if with_layer {
                    st.steps.push(Step {
                        line,
                        display: self.display(st, &code, cmd.onbuild),
                        op: Op::Mkdir(MkdirOp { path: wd.clone(), user: st.cfg.user.clone() }),
                    });
                }
                self.history(st, format!("WORKDIR {wd}"), with_layer, false);
            }
            Instruction::Copy(c) => self.dispatch_copy(st, infos, si, cmd, c, out_id)?,
            Instruction::Onbuild(expr) => {
                st.cfg.extras.on_build.push(expr.clone());
                if !cmd.onbuild {
                    st.own_onbuild.push(expr.clone());
                }
            }
            Instruction::Cmd(c) => {
                let args = self.with_shell(st, c);
                st.cfg.cmd = Some(args.clone());
                st.cfg.extras.args_escaped = true;
                st.cmd_set = true;
                self.history(st, format!("CMD {}", quote_slice(&args)), false, false);
            }
            Instruction::Entrypoint(c) => {
                let args = self.with_shell(st, c);
                st.cfg.entrypoint = if args.is_empty() { None } else { Some(args.clone()) };
                if !st.cmd_set {
                    st.cfg.cmd = None;
                }
                self.history(st, format!("ENTRYPOINT {}", quote_slice(&args)), false, false);
            }
            Instruction::Healthcheck(h) => {
                st.cfg.extras.healthcheck = Some(Healthcheck {
                    test: h.test.clone(),
                    interval: h.interval,
                    timeout: h.timeout,
                    start_period: h.start_period,
                    start_interval: h.start_interval,
                    retries: h.retries,
                });
                self.history(st, ins::format_health_history(h), false, false);
            }
            Instruction::Expose(ports) => {
                let mut words = Vec::new();
                for p in ports {
                    words.extend(self.lex.process_words(p, &st.env).map_err(|e| self.expansion(line, e.to_string()))?);
                }
                let mut set = BTreeSet::new();
                for w in &words {
                    for p in ins::parse_port_spec(w).map_err(|e| self.invalid(line, e))? {
                        set.insert(p);
                    }
                }
                let items: Vec<String> = set.iter().map(|p| format!("{p}:{{}}")).collect();
                st.cfg.exposed_ports.extend(set.iter().cloned());
                self.history(st, format!("EXPOSE map[{}]", items.join(" ")), false, false);
            }
            Instruction::User(u) => {
                let u = self.expand(u, &st.env, line)?;
                st.user = u.clone();
                st.cfg.user = u.clone();
                self.history(st, format!("USER {u}"), false, false);
            }
            Instruction::Volume(vols) => {
                let mut expanded = Vec::new();
                for v in vols {
                    let v = self.expand(v, &st.env, line)?;
                    if v.is_empty() {
                        return Err(self.invalid(line, "VOLUME specified can not be an empty string"));
                    }
                    expanded.push(v);
                }
                st.cfg.volumes.extend(expanded.iter().cloned());
                self.history(st, format!("VOLUME {}", gocompat::plain_slice(&expanded)), false, false);
            }
            Instruction::StopSignal(s) => {
                let s = self.expand(s, &st.env, line)?;
                ins::validate_signal(&s).map_err(|e| self.invalid(line, e))?;
                st.cfg.stop_signal = Some(s.clone());
                self.history(st, format!("STOPSIGNAL {s}"), false, false);
            }
            Instruction::Shell(sh) => {
                st.cfg.extras.shell = sh.clone();
                self.history(st, format!("SHELL {}", gocompat::plain_slice(sh)), false, false);
            }
        }
        Ok(())
    }

    fn with_shell(&self, st: &State, c: &CmdLine) -> Vec<String> {
        if !c.prepend_shell {
            return c.args.clone();
        }
        let mut shell =
            if st.cfg.extras.shell.is_empty() { vec!["/bin/sh".to_string(), "-c".to_string()] } else { st.cfg.extras.shell.clone() };
        shell.push(c.args.join(" "));
        shell
    }

    fn dispatch_run(
        &mut self,
        st: &mut State,
        infos: &[Info],
        si: usize,
        cmd: &Cmd,
        r: &RunInstr,
        out_id: &HashMap<usize, usize>,
    ) -> R<()> {
        let line = cmd.instr.start_line;
        let mut display = self.display(st, &cmd.instr.code, cmd.onbuild);
        let mut args = r.cmd.args.clone();
        let mut inline_files = Vec::new();
        if !r.cmd.files.is_empty() {
            if args.len() != 1 || !r.cmd.prepend_shell {
                return Err(self.invalid(line, format!("parsing produced an invalid run command: {args:?}")));
            }
            let first = &r.cmd.files[0];
            let whole = parse_heredoc(&args[0]).ok().flatten().is_some();
            if whole {
                let data = if first.chomp { chomp_heredoc_content(&first.content) } else { first.content.clone() };
                if data.starts_with("#!") {
                    let target = join_path(&["/dev/pipes/", &first.name]);
                    inline_files.push(InlineFile { target: target.clone(), content: data, mode: 0o755 });
                    args = vec![target];
                } else {
                    args = vec![data];
                }
                display.push_str(&format!(" ({})", summarize_heredoc(&first.content)));
            } else {
                let mut full = args[0].clone();
                for f in &r.cmd.files {
                    full.push('\n');
                    full.push_str(&f.content);
                    full.push_str(&f.name);
                }
                args = vec![full];
            }
        }
        let args = if r.cmd.prepend_shell { self.with_shell(st, &CmdLine { args, prepend_shell: true, files: Vec::new() }) } else { args };

        // mounts, expanded with the stage's environment
        let mut mounts = Vec::with_capacity(r.mounts.len());
        let mut ssh_count = 0;
        for (i, raw) in r.mounts.iter().enumerate() {
            let env = &st.env;
            let lex = self.lex;
            let mut expander = |w: &str| lex.process_word(w, env).map_err(|e| e.to_string());
            let m = ins::parse_mount(raw, &mut expander).map_err(|e| self.invalid(line, format!("--mount={raw}: {e}")))?;
            let from = match cmd.sources.get(i).copied().flatten() {
                Some(src) if !m.from.is_empty() => Some(self.source_of(infos, si, src, line, "mount from", out_id)?),
                _ => None,
            };
            let resolve_target = |t: &str| -> R<String> {
                let target = if t.starts_with('/') { clean_path(t) } else { join_path(&["/", &st.workdir, t]) };
                if target == "/" {
                    return Err(self.invalid(line, format!("invalid mount target {} (a mount cannot replace /)", quote(&target))));
                }
                Ok(target)
            };
            let source_path = join_path(&["/", &m.source]);
            let kind = match m.kind {
                MountType::Bind => {
                    MountKind::Bind { from: from.clone().unwrap_or(Source::Context), source: source_path, readwrite: !m.read_only }
                }
                MountType::Cache => MountKind::Cache {
                    id: if m.id.is_empty() { clean_path(&m.target) } else { m.id.clone() },
                    sharing: match m.sharing {
                        Some(Sharing::Private) => CacheSharing::Private,
                        Some(Sharing::Locked) => CacheSharing::Locked,
                        _ => CacheSharing::Shared,
                    },
                    from: from.clone(),
                    source: source_path,
                    readonly: m.read_only,
                    mode: m.mode.unwrap_or(0o755),
                    uid: m.uid.unwrap_or(0),
                    gid: m.gid.unwrap_or(0),
                },
                MountType::Tmpfs => MountKind::Tmpfs { size: (m.size_limit > 0).then_some(m.size_limit) },
                MountType::Secret => {
                    let mut id = if m.source.is_empty() { m.id.clone() } else { m.source.clone() };
                    if id.is_empty() {
                        if m.target.is_empty() {
                            return Err(self.invalid(line, "secret mount: one of source, target required"));
                        }
                        id = gocompat::base_path(&m.target);
                    }
                    let env = m.env.as_ref().map(|e| if e.is_empty() { id.clone() } else { e.clone() });
                    MountKind::Secret {
                        id,
                        env,
                        required: m.required,
                        mode: m.mode.unwrap_or(0o400),
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                    }
                }
                MountType::Ssh => {
                    if !m.source.is_empty() {
                        return Err(self.invalid(line, "ssh does not support source"));
                    }
                    MountKind::Ssh {
                        id: if m.id.is_empty() { "default".into() } else { m.id.clone() },
                        required: m.required,
                        mode: m.mode.unwrap_or(0o600),
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                    }
                }
            };
            let target = match &kind {
                MountKind::Secret { id, env, .. } => {
                    if !m.target.is_empty() {
                        m.target.clone()
                    } else if env.is_some() {
                        String::new()
                    } else {
                        format!("/run/secrets/{}", gocompat::base_path(id))
                    }
                }
                MountKind::Ssh { .. } => {
                    let t = if m.target.is_empty() { format!("/run/buildkit/ssh_agent.{ssh_count}") } else { m.target.clone() };
                    ssh_count += 1;
                    t
                }
                _ => resolve_target(&m.target)?,
            };
            mounts.push(RunMount { target, kind });
        }

        let history_args = {
            let mut tmp: Vec<(String, String)> = Vec::new();
            for (k, v) in &st.build_args {
                let v = st.env.get(k).map(str::to_string).unwrap_or_else(|| v.clone().unwrap_or_default());
                match tmp.iter_mut().find(|(kk, _)| kk == k) {
                    Some(e) => e.1 = v,
                    None => tmp.push((k.clone(), v)),
                }
            }
            let mut parts: Vec<String> = Vec::new();
            if !tmp.is_empty() {
                parts.push(format!("|{}", tmp.len()));
                parts.extend(tmp.into_iter().map(|(k, v)| format!("{k}={v}")));
            }
            parts.extend(args.iter().cloned());
            parts.join(" ")
        };

        self.charge(line, st.env.bytes() + history_args.len())?;
        st.steps.push(Step {
            line,
            display,
            op: Op::Run(RunOp {
                args,
                env: st.env.to_vec(),
                proxy_env: self.proxy_env.clone(),
                cwd: st.workdir.clone(),
                user: st.user.clone(),
                network: match r.network {
                    Network::Default => NetworkMode::Default,
                    Network::None => NetworkMode::None,
                    Network::Host => NetworkMode::Host,
                },
                security: match r.security {
                    Security::Sandbox => SecurityMode::Sandbox,
                    Security::Insecure => SecurityMode::Insecure,
                },
                mounts,
                inline_files,
            }),
        });
        self.history(st, format!("RUN {history_args}"), true, true);
        Ok(())
    }

    fn dispatch_copy(
        &mut self,
        st: &mut State,
        infos: &[Info],
        si: usize,
        cmd: &Cmd,
        c: &CopyInstr,
        out_id: &HashMap<usize, usize>,
    ) -> R<()> {
        let line = cmd.instr.start_line;
        let name = if c.is_add { "ADD" } else { "COPY" };
        let exp = |s: &str| self.expand(s, &st.env, line);
        let chown = match &c.chown {
            Some(v) => Some(exp(v)?).filter(|s| !s.is_empty()),
            None => None,
        };
        let chmod_raw = match &c.chmod {
            Some(v) => Some(exp(v)?).filter(|s| !s.is_empty()),
            None => None,
        };
        let checksum = match &c.checksum {
            Some(v) => Some(exp(v)?).filter(|s| !s.is_empty()),
            None => None,
        };
        let mut sources = Vec::with_capacity(c.sources.len());
        for s in &c.sources {
            sources.push(exp(s)?);
        }
        let dest_raw = exp(&c.dest)?;
        let mut contents = Vec::with_capacity(c.contents.len());
        for sc in &c.contents {
            let data = if sc.expand {
                let mut raw = Lexer::new('\\');
                raw.skip_process_quotes = true;
                raw.process_word(&sc.data, &st.env).map_err(|e| self.expansion(line, e.to_string()))?
            } else {
                sc.data.clone()
            };
            contents.push((sc.path.clone(), data));
        }
        if let Some(cs) = &checksum {
            let valid = cs.split_once(':').is_some_and(|(alg, hex)| {
                let len = match alg {
                    "sha256" => 64,
                    "sha384" => 96,
                    "sha512" => 128,
                    _ => 0,
                };
                len > 0 && hex.len() == len && hex.chars().all(|ch| ch.is_ascii_digit() || ('a'..='f').contains(&ch))
            });
            if !valid {
                return Err(self.invalid(line, format!("invalid checksum digest format {} (expected sha256:<64 hex digits>)", quote(cs))));
            }
        }
        let chmod = match &chmod_raw {
            None => None,
            Some(s) => Some(match ins::parse_chmod(s).map_err(|e| self.invalid(line, e))? {
                ChmodSpec::Octal(v) => Chmod::Octal(v),
                ChmodSpec::Symbolic(v) => Chmod::Symbolic(v),
            }),
        };
        if checksum.is_some() {
            if !c.is_add {
                return Err(self.invalid(line, "checksum can't be specified for COPY"));
            }
            if sources.len() != 1 {
                return Err(self.invalid(line, "checksum can't be specified for multiple sources"));
            }
            if !is_http_source(&sources[0]) {
                return Err(self.invalid(line, "checksum can't be specified for non-HTTP(S) sources"));
            }
        }
        let from = match cmd.sources.first().copied().flatten() {
            Some(src) => self.source_of(infos, si, src, line, "copy from", out_id)?,
            None => Source::Context,
        };
        let mut msg = String::from(name);
        if c.parents {
            msg.push_str(" --parents");
        }
        if let Some(v) = &chown {
            msg.push_str(&format!(" --chown={v}"));
        }
        if let Some(v) = &chmod_raw {
            msg.push_str(&format!(" --chmod={v}"));
        }
        let mut srcs = Vec::with_capacity(sources.len() + contents.len());
        let mut from = from;
        for s in &sources {
            msg.push(' ');
            msg.push_str(s);
            if is_git_source(s) {
                if !c.is_add {
                    return Err(self.invalid(line, format!("source can't be a git ref for COPY: {s}")));
                }
                if sources.len() != 1 || !contents.is_empty() {
                    return Err(self.invalid(line, format!("a git source must be the only source of ADD: {s}")));
                }
                // The repository is the source's root; its subdirectory (or root) is what
                // is added, as `COPY dir /dest` adds a directory's contents.
                let r = crate::git::GitRef::parse(s).map_err(|e| self.invalid(line, e.to_string()))?;
                from = Source::Git(crate::graph::GitSource { url: r.url, reference: r.reference });
                srcs.push(CopySource::Path(r.subdir.unwrap_or_else(|| "/".into())));
            } else if is_http_source(s) {
                if !c.is_add {
                    return Err(self.invalid(line, format!("source can't be a URL for COPY: {s}")));
                }
                srcs.push(CopySource::Url { url: s.clone(), checksum: checksum.clone() });
            } else {
                srcs.push(CopySource::Path(s.clone()));
            }
        }
        for (p, data) in contents {
            msg.push_str(&format!(" <<{p}"));
            srcs.push(CopySource::Inline { name: p, content: data });
        }
        msg.push(' ');
        msg.push_str(&dest_raw);
        let dest = dest_path(&st.workdir, &dest_raw);
        // A repository's files are added as they are: archives in it stay archives.
        let unpack = c.is_add && c.unpack.unwrap_or(true) && !matches!(from, Source::Git(_));
        st.steps.push(Step {
            line,
            display: self.display(st, &cmd.instr.code, cmd.onbuild),
            op: Op::Copy(CopyOp {
                from,
                sources: srcs,
                dest,
                chown,
                chmod,
                link: c.link,
                exclude: c.excludes.clone(),
                parents: c.parents,
                unpack,
                keep_git_dir: c.keep_git_dir,
                is_add: c.is_add,
            }),
        });
        self.history(st, msg, true, true);
        Ok(())
    }
}

fn is_platform_arg(k: &str) -> bool {
    matches!(
        k,
        "BUILDPLATFORM"
            | "BUILDOS"
            | "BUILDOSVERSION"
            | "BUILDARCH"
            | "BUILDVARIANT"
            | "TARGETPLATFORM"
            | "TARGETOS"
            | "TARGETOSVERSION"
            | "TARGETARCH"
            | "TARGETVARIANT"
            | "TARGETSTAGE"
    )
}

/// Stages reachable from `target` through bases and command sources.
fn reachable_from(infos: &[Info], target: usize) -> Vec<usize> {
    let mut seen = vec![false; infos.len()];
    let mut stack = vec![target];
    while let Some(s) = stack.pop() {
        if seen[s] {
            continue;
        }
        seen[s] = true;
        if let Some(b) = infos[s].base {
            stack.push(b);
        }
        for c in &infos[s].commands {
            stack.extend(c.sources.iter().flatten().copied());
        }
    }
    (0..infos.len()).filter(|&i| seen[i]).collect()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn dest_paths_follow_buildkit() {
        let cases = [
            ("/", ".", "/"),
            ("/app", ".", "/app/"),
            ("/app", "", "/app/"),
            ("/app", "x", "/app/x"),
            ("/app", "x/", "/app/x/"),
            ("/app", "/abs", "/abs"),
            ("/app", "/abs/", "/abs/"),
            ("/app", "../up", "/up"),
            ("/app", "./sub/.", "/app/sub/"),
        ];
        for (wd, p, want) in cases {
            assert_eq!(dest_path(wd, p), want, "dest_path({wd:?}, {p:?})");
        }
    }

    #[test]
    fn workdirs_normalize_like_buildkit() {
        assert_eq!(normalize_workdir("/", "app"), "/app");
        assert_eq!(normalize_workdir("/app", "src"), "/app/src");
        assert_eq!(normalize_workdir("/app", "/abs/./x/"), "/abs/x");
        assert_eq!(normalize_workdir("/app", ".."), "/");
        assert_eq!(normalize_workdir("", "rel"), "/rel");
    }

    #[test]
    fn git_and_http_sources_are_told_apart() {
        assert!(is_git_source("https://github.com/moby/buildkit.git"));
        assert!(is_git_source("https://github.com/moby/buildkit.git#v0.10.1"));
        assert!(is_git_source("git@github.com:moby/buildkit.git"));
        assert!(is_git_source("git://host/repo"));
        assert!(!is_git_source("https://example.com/file.tar.gz"));
        assert!(is_http_source("https://example.com/file.tar.gz"));
        assert!(!is_http_source("https://github.com/moby/buildkit.git"));
        assert!(!is_http_source("src/main.rs"));
    }

    #[test]
    fn references_are_checked() {
        assert!(validate_reference("busybox").is_ok());
        assert!(validate_reference("127.0.0.1:5000/library/busybox:latest").is_ok());
        assert!(validate_reference("alpine@sha256:abcd").is_ok());
        assert!(validate_reference("Busybox").is_err());
        assert!(validate_reference("a b").is_err());
        assert!(validate_reference("").is_err());
    }

    #[test]
    fn atoi_accepts_what_go_accepts() {
        assert_eq!(go_atoi("0"), Some(0));
        assert_eq!(go_atoi("+1"), Some(1));
        assert_eq!(go_atoi("-1"), Some(-1));
        assert_eq!(go_atoi("1a"), None);
        assert_eq!(go_atoi("builder"), None);
    }

    #[test]
    fn heredoc_summaries_show_the_first_line() {
        assert_eq!(summarize_heredoc("echo a\necho b\n"), "echo a...");
        assert_eq!(summarize_heredoc("\n  single  \n"), "single");
    }
}
