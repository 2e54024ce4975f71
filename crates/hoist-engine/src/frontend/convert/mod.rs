//! The conversion itself: BuildKit's `toDispatchState` and `dispatch*` functions, producing
//! graph stages instead of LLB.
//!
//! This module holds the converter, the walk over the stages (parse, stages, dependencies,
//! base images, dispatch of each stage's commands) and the helpers every instruction uses
//! (expansion, the graph's size budget, errors, history, step display). The instructions
//! themselves live by family:
//!
//! - [`stages`]: FROM, platforms, stage references (`--from`, `--mount=from`), cycles, base
//!   images, ONBUILD triggers of a base, target selection and each stage's initial state;
//! - [`args`]: ARG (global and in a stage), the predefined platform args, unused build-args;
//! - [`config`]: the image config and the instructions that only set it (ENV, LABEL, EXPOSE,
//!   USER, WORKDIR, CMD/ENTRYPOINT, HEALTHCHECK, SHELL, STOPSIGNAL, VOLUME, ONBUILD, MAINTAINER);
//! - [`run`]: RUN with its mounts, network and security modes, heredoc scripts;
//! - [`copy`]: COPY and ADD with URLs, git sources, heredoc files, checksum, chmod and chown.

mod args;
mod config;
mod copy;
mod run;
mod stages;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use hoist_dockerfile::instructions::{Instr, Instruction};
use hoist_dockerfile::shell::{Env, Lexer};
use hoist_dockerfile::Dockerfile;

use super::env::EnvList;
use super::{FrontendError, ImageResolver};

use crate::graph::{Base, BuildGraph, FrontendOptions, HistoryEntry, Platform, ResolvedImage, Stage, Step};

use config::Cfg;

pub use copy::is_git_source;

const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PROXY_ARGS: [&str; 5] = ["HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY"];

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
    /// The stage is the named context of this name (`--build-context NAME=DIR`): scratch
    /// with the directory's files.
    local: Option<String>,
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
        self.check_syntax_directive(&parsed)?;
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
        self.declare_meta_args(&stages.meta_args)?;

        // Stages: expand FROM with the global args.
        let mut infos = self.stage_infos(&stages.stages)?;
        let target = self.select_target(&infos)?;

        // Dependencies of every stage's commands.
        self.link_commands(&mut infos)?;
        self.check_cycles(&infos)?;

        // Resolve reachable base images, apply ONBUILD triggers, repeat while triggers add deps.
        let reachable = self.resolve_reachable(&mut infos, target, resolver).await?;

        let order = stages::output_order(&infos, &reachable);
        let out_id: HashMap<usize, usize> = order.iter().enumerate().map(|(o, &i)| (i, o)).collect();
        let out = self.dispatch_stages(&infos, &order, target, &out_id)?;

        self.warn_unused_build_args();

        Ok(BuildGraph { stages: out, target: out_id[&target], warnings: self.warnings })
    }

    /// `# syntax=` may only name the standard Dockerfile frontend: hoist runs no other.
    fn check_syntax_directive(&self, parsed: &Dockerfile) -> R<()> {
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
        Ok(())
    }

    /// Dispatch the stages in output `order` (their indices in `infos`), each after the stages
    /// it reads from, into the graph's stages.
    fn dispatch_stages(&mut self, infos: &[Info], order: &[usize], target: usize, out_id: &HashMap<usize, usize>) -> R<Vec<Stage>> {
        let mut states: HashMap<usize, State> = HashMap::new();
        let mut out = Vec::with_capacity(order.len());
        for &si in order {
            let st = self.dispatch_stage(infos, si, &states, out_id)?;
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
        Ok(out)
    }

    fn dispatch_stage(&mut self, infos: &[Info], si: usize, states: &HashMap<usize, State>, out_id: &HashMap<usize, usize>) -> R<State> {
        let mut st = self.init_state(infos, si, states, out_id)?;
        let inf = &infos[si];
        if let Some(name) = &inf.local {
            // The named context's files, as a layer of their own.
            st.steps.push(Step {
                line: inf.line,
                display: format!("[context {name}] load"),
                op: crate::graph::Op::Copy(crate::graph::CopyOp {
                    from: crate::graph::Source::Named(name.clone()),
                    sources: vec![crate::graph::CopySource::Path(".".into())],
                    dest: "/".into(),
                    chown: None,
                    chmod: None,
                    link: false,
                    exclude: Vec::new(),
                    parents: false,
                    unpack: false,
                    keep_git_dir: false,
                    is_add: false,
                }),
            });
            self.history(&mut st, format!("COPY {name} / # named context"), true, false);
        }
        if inf.implicit {
            return Ok(st);
        }
        for cmd in &inf.commands {
            self.dispatch(&mut st, infos, si, cmd, out_id)?;
        }
        Ok(st)
    }

    /// Dispatch one command of stage `si` onto its state.
    fn dispatch(&mut self, st: &mut State, infos: &[Info], si: usize, cmd: &Cmd, out_id: &HashMap<usize, usize>) -> R<()> {
        let line = cmd.instr.start_line;
        match &cmd.instr.instruction {
            Instruction::From(_) => {}
            Instruction::Maintainer(m) => self.dispatch_maintainer(st, m),
            Instruction::Env(kvs) => self.dispatch_env(st, line, kvs)?,
            Instruction::Label(kvs) => self.dispatch_label(st, line, kvs)?,
            Instruction::Arg(defs) => self.dispatch_arg(st, line, defs)?,
            Instruction::Run(r) => self.dispatch_run(st, infos, si, cmd, r, out_id)?,
            Instruction::Workdir(p) => self.dispatch_workdir(st, cmd, p)?,
            Instruction::Copy(c) => self.dispatch_copy(st, infos, si, cmd, c, out_id)?,
            Instruction::Onbuild(expr) => self.dispatch_onbuild(st, cmd, expr),
            Instruction::Cmd(c) => self.dispatch_cmd(st, c),
            Instruction::Entrypoint(c) => self.dispatch_entrypoint(st, c),
            Instruction::Healthcheck(h) => self.dispatch_healthcheck(st, h),
            Instruction::Expose(ports) => self.dispatch_expose(st, line, ports)?,
            Instruction::User(u) => self.dispatch_user(st, line, u)?,
            Instruction::Volume(vols) => self.dispatch_volume(st, line, vols)?,
            Instruction::StopSignal(s) => self.dispatch_stop_signal(st, line, s)?,
            Instruction::Shell(sh) => self.dispatch_shell(st, sh),
        }
        Ok(())
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
}
