//! Dockerfile checks, as BuildKit's linter (`docker build --check`, reference:
//! <https://docs.docker.com/reference/build-checks/>): the same rule names, messages, lines
//! and documentation links, and the same configuration — the `# check=skip=A,B;error=true`
//! directive (`skip=all`), a `# check=skip=A` comment right above one instruction, and the
//! `BUILDKIT_DOCKERFILE_CHECK` build argument, which replaces the directive.
//!
//! The checks only read the Dockerfile: rules that need the base image's configuration or the
//! context (`UndefinedVar`, `CopyIgnoredFile`, `InvalidBaseImagePlatform`) are not run, and a
//! stage based on an image is taken to start with no `SHELL` and no `WORKDIR`.

use std::collections::{BTreeSet, HashMap};

use crate::instructions::{levenshtein, Instr, Instruction, Stages};
use crate::parser::{Dockerfile, Node};
use crate::shell::Lexer;

/// One check: its name (what `skip=` takes), what it is about and its documentation.
#[derive(Debug, PartialEq, Eq)]
pub struct Rule {
    /// The rule's name, e.g. `FromAsCasing`.
    pub name: &'static str,
    /// One sentence saying what the rule asks for.
    pub description: &'static str,
    /// Its page in Docker's documentation.
    pub url: &'static str,
}

macro_rules! rules {
    ($($id:ident $name:literal $slug:literal $desc:literal;)*) => {
        $(
            #[doc = $desc]
            pub const $id: Rule = Rule {
                name: $name,
                description: $desc,
                url: concat!("https://docs.docker.com/go/dockerfile/rule/", $slug, "/"),
            };
        )*
        /// Every rule hoist checks.
        pub const RULES: &[&Rule] = &[$(&$id),*];
    };
}

rules! {
    STAGE_NAME_CASING "StageNameCasing" "stage-name-casing" "Stage names should be lowercase";
    FROM_AS_CASING "FromAsCasing" "from-as-casing" "The 'as' keyword should match the case of the 'from' keyword";
    NO_EMPTY_CONTINUATION "NoEmptyContinuation" "no-empty-continuation" "Empty continuation lines will become errors in a future release";
    CONSISTENT_INSTRUCTION_CASING "ConsistentInstructionCasing" "consistent-instruction-casing" "All commands within the Dockerfile should use the same casing (either upper or lower)";
    DUPLICATE_STAGE_NAME "DuplicateStageName" "duplicate-stage-name" "Stage names should be unique";
    RESERVED_STAGE_NAME "ReservedStageName" "reserved-stage-name" "Reserved words should not be used as stage names";
    JSON_ARGS_RECOMMENDED "JSONArgsRecommended" "json-args-recommended" "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS signals";
    MAINTAINER_DEPRECATED "MaintainerDeprecated" "maintainer-deprecated" "The MAINTAINER instruction is deprecated, use a label instead to define an image author";
    UNDEFINED_ARG_IN_FROM "UndefinedArgInFrom" "undefined-arg-in-from" "FROM command must use declared ARGs";
    WORKDIR_RELATIVE_PATH "WorkdirRelativePath" "workdir-relative-path" "Relative workdir without an absolute workdir declared within the build can have unexpected results if the base image changes";
    MULTIPLE_INSTRUCTIONS_DISALLOWED "MultipleInstructionsDisallowed" "multiple-instructions-disallowed" "Multiple instructions of the same type should not be used in the same stage";
    LEGACY_KEY_VALUE_FORMAT "LegacyKeyValueFormat" "legacy-key-value-format" "Legacy key/value format with whitespace separator should not be used";
    REDUNDANT_TARGET_PLATFORM "RedundantTargetPlatform" "redundant-target-platform" "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior";
    SECRETS_USED_IN_ARG_OR_ENV "SecretsUsedInArgOrEnv" "secrets-used-in-arg-or-env" "Sensitive data should not be used in the ARG or ENV commands";
    INVALID_DEFAULT_ARG_IN_FROM "InvalidDefaultArgInFrom" "invalid-default-arg-in-from" "Default value for global ARG results in an empty or invalid base image name";
    FROM_PLATFORM_FLAG_CONST_DISALLOWED "FromPlatformFlagConstDisallowed" "from-platform-flag-const-disallowed" "FROM --platform flag should not use a constant value";
    EXPOSE_PROTO_CASING "ExposeProtoCasing" "expose-proto-casing" "Protocol in EXPOSE instruction should be lowercase";
    EXPOSE_INVALID_FORMAT "ExposeInvalidFormat" "expose-invalid-format" "IP address and host-port mapping should not be used in EXPOSE instruction. This will become an error in a future release";
}

/// One finding: the rule, the message about this instance and the lines it points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule broken.
    pub rule: &'static Rule,
    /// What is wrong here (BuildKit's message).
    pub message: String,
    /// First line (1-based) of the instruction.
    pub start_line: usize,
    /// Last line of the instruction.
    pub end_line: usize,
}

impl Violation {
    /// The one-line form BuildKit prints after a build: `Rule: message (line N)`.
    pub fn short(&self) -> String {
        format!("{}: {} (line {})", self.rule.name, self.message, self.start_line)
    }
}

/// A check configuration that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckConfigError {
    /// A `;`-separated part without `=`, or a key other than skip, error and experimental.
    #[error("invalid check option {0:?} (expected skip=RULE,RULE|all, error=true|false or experimental=RULE|all)")]
    Option(String),
    /// `error=` with a value that is not a boolean.
    #[error("failed to parse check option {0:?}: expected error=true or error=false")]
    Bool(String),
}

/// Which rules run and whether a violation fails the build (BuildKit's `linter.Config`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckConfig {
    /// `skip=all`.
    pub skip_all: bool,
    /// `skip=A,B`.
    pub skip: Vec<String>,
    /// `error=true`: a build with violations fails before it starts.
    pub error: bool,
}

impl CheckConfig {
    /// Parse `skip=A,B;error=true` (the `check` directive's value and
    /// `BUILDKIT_DOCKERFILE_CHECK`); `experimental=` is accepted (hoist has no experimental
    /// rules).
    pub fn parse(text: &str) -> Result<CheckConfig, CheckConfigError> {
        let mut config = CheckConfig::default();
        let text = text.trim();
        if text.is_empty() {
            return Ok(config);
        }
        for part in text.splitn(3, ';') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(CheckConfigError::Option(part.to_string()));
            };
            let value = value.trim();
            match key.trim() {
                "skip" if value == "all" => config.skip_all = true,
                "skip" => config.skip = value.split(',').map(|r| r.trim().to_string()).collect(),
                "experimental" => {}
                "error" => config.error = parse_go_bool(value).ok_or_else(|| CheckConfigError::Bool(part.to_string()))?,
                other => return Err(CheckConfigError::Option(other.to_string())),
            }
        }
        Ok(config)
    }

    /// This configuration with the skips of a `# check=skip=...` comment among `comments`
    /// (the comment lines right above an instruction); `error` is not changed by a comment.
    fn with_comments(&self, comments: &[String]) -> CheckConfig {
        let mut out = self.clone();
        for c in comments {
            let Some((name, value)) = c.split_once('=') else { continue };
            if !name.trim().eq_ignore_ascii_case("check") {
                continue;
            }
            let value = value.trim().split(' ').next().unwrap_or("");
            if let Ok(more) = CheckConfig::parse(value) {
                out.skip_all |= more.skip_all;
                out.skip.extend(more.skip);
            }
            break;
        }
        out
    }

    fn runs(&self, rule: &Rule) -> bool {
        !self.skip_all && !self.skip.iter().any(|s| s == rule.name)
    }
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Where the configuration of a check run comes from, and why it could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The `# check=` directive at `line`.
    #[error("line {line}: failed to parse check options: {source}")]
    Directive {
        /// 1-based line of the directive.
        line: usize,
        /// What is wrong with it.
        source: CheckConfigError,
    },
    /// The `BUILDKIT_DOCKERFILE_CHECK` build argument.
    #[error("failed to parse BUILDKIT_DOCKERFILE_CHECK: {0}")]
    BuildArg(CheckConfigError),
}

/// The build argument that replaces the Dockerfile's `# check=` directive.
pub const CHECK_BUILD_ARG: &str = "BUILDKIT_DOCKERFILE_CHECK";

/// The configuration in effect: the `BUILDKIT_DOCKERFILE_CHECK` build argument when given,
/// else the `# check=` directive.
pub fn config(df: &Dockerfile, build_args: &HashMap<String, String>) -> Result<CheckConfig, CheckError> {
    if let Some(v) = build_args.get(CHECK_BUILD_ARG) {
        return CheckConfig::parse(v).map_err(CheckError::BuildArg);
    }
    match df.directives.iter().find(|d| d.name == "check") {
        Some(d) => CheckConfig::parse(&d.value).map_err(|source| CheckError::Directive { line: d.line, source }),
        None => Ok(CheckConfig::default()),
    }
}

/// The result of a check run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The violations, by line.
    pub violations: Vec<Violation>,
    /// `error=true` was in effect.
    pub error: bool,
}

impl Report {
    /// Whether the build must fail: `error=true` and at least one violation.
    pub fn fails_build(&self) -> bool {
        self.error && !self.violations.is_empty()
    }

    /// The names of the rules broken, sorted, each once.
    pub fn rules(&self) -> Vec<&'static str> {
        self.violations.iter().map(|v| v.rule.name).collect::<BTreeSet<_>>().into_iter().collect()
    }
}

/// The platform arguments every FROM may use without declaring them.
const PLATFORM_ARGS: [&str; 11] = [
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDOSVERSION",
    "BUILDARCH",
    "BUILDVARIANT",
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETOSVERSION",
    "TARGETARCH",
    "TARGETVARIANT",
    "TARGETSTAGE",
];

/// Values for [`PLATFORM_ARGS`] when an expansion must give a plausible result.
const PLATFORM_DEFAULTS: [&str; 11] = ["linux/amd64", "linux", "", "amd64", "", "linux/amd64", "linux", "", "amd64", "", "default"];

const RESERVED_STAGE_NAMES: [&str; 2] = ["context", "scratch"];

/// Words that make an ARG or ENV name look like it holds a secret, and words that clear it.
const SECRET_WORDS: [&str; 10] = ["apikey", "auth", "credential", "credentials", "key", "password", "pword", "passwd", "secret", "token"];
const NOT_SECRET_WORDS: [&str; 3] = ["public", "file", "version"];

struct Checker<'a> {
    base: CheckConfig,
    comments: HashMap<usize, &'a [String]>,
    out: Vec<Violation>,
}

impl Checker<'_> {
    /// Report `rule` on the instruction at `start..=end`, unless skipped (globally or by a
    /// `# check=` comment above the instruction starting at `start`).
    fn report(&mut self, rule: &'static Rule, start: usize, end: usize, message: String) {
        let config = match self.comments.get(&start) {
            Some(c) => self.base.with_comments(c),
            None => self.base.clone(),
        };
        if config.runs(rule) {
            self.out.push(Violation { rule, message, start_line: start, end_line: end });
        }
    }

    fn at(&mut self, rule: &'static Rule, instr: &Instr, message: String) {
        self.report(rule, instr.start_line, instr.end_line, message);
    }
}

fn is_self_consistent(s: &str) -> bool {
    s == s.to_lowercase() || s == s.to_uppercase()
}

/// Run every rule on a parsed Dockerfile with `config` (see [`config`]).
pub fn check(df: &Dockerfile, stages: &Stages, config: &CheckConfig) -> Report {
    let nodes: HashMap<usize, &Node> = df.nodes.iter().map(|n| (n.start_line, n)).collect();
    let mut c = Checker {
        base: config.clone(),
        comments: df.nodes.iter().filter(|n| !n.comments.is_empty()).map(|n| (n.start_line, n.comments.as_slice())).collect(),
        out: Vec::new(),
    };

    for w in df.warnings.iter().filter(|w| w.message.starts_with("empty continuation")) {
        // BuildKit points at the instruction's last line; skips apply from the directive only.
        if c.base.runs(&NO_EMPTY_CONTINUATION) {
            c.out.push(Violation {
                rule: &NO_EMPTY_CONTINUATION,
                message: "Empty continuation line".into(),
                start_line: w.line,
                end_line: w.line,
            });
        }
    }

    // Casing: the majority of self-consistent keywords (stage FROMs and their instructions)
    // decides; each FROM is also checked for `AS` and its stage name.
    let (mut lower, mut upper) = (0, 0);
    for st in &stages.stages {
        let from = nodes.get(&st.line).map(|n| n.cmd.as_str()).unwrap_or("FROM");
        for cmd in std::iter::once(from).chain(st.commands.iter().map(|i| i.cmd.as_str())) {
            if is_self_consistent(cmd) {
                if cmd == cmd.to_lowercase() {
                    lower += 1;
                } else {
                    upper += 1;
                }
            }
        }
    }
    let majority_lower = lower > upper;
    let mut seen_names: Vec<&str> = Vec::new();
    // Stage name → (SHELL set, absolute WORKDIR set) at its end, for stages built on it.
    let mut stage_state: HashMap<&str, (bool, bool)> = HashMap::new();

    let meta = MetaArgs::new(stages, df.escape);
    for st in &stages.stages {
        let Some(node) = nodes.get(&st.line) else { continue };
        let end = node.end_line;
        casing(&mut c, &node.cmd, majority_lower, st.line, end);
        if node.args.len() == 3 && node.args[2] != node.args[2].to_lowercase() {
            c.report(&STAGE_NAME_CASING, st.line, end, format!("Stage name '{}' should be lowercase", node.args[2]));
        }
        if node.args.len() == 3 && is_self_consistent(&node.cmd) {
            let from_lower = node.cmd == node.cmd.to_lowercase();
            let as_word = &node.args[1];
            let matches = if from_lower { *as_word == as_word.to_lowercase() } else { *as_word == as_word.to_uppercase() };
            if !matches {
                c.report(&FROM_AS_CASING, st.line, end, format!("'{}' and '{}' keywords' casing do not match", as_word, node.cmd));
            }
        }
        if let Some(name) = st.from.name.as_deref() {
            if RESERVED_STAGE_NAMES.contains(&name) {
                c.report(&RESERVED_STAGE_NAME, st.line, end, format!("Stage name should not use the same name as reserved stage {name:?}"));
            }
            if seen_names.contains(&name) {
                c.report(&DUPLICATE_STAGE_NAME, st.line, end, format!("Duplicate stage name {name:?}, stage names should be unique"));
            }
            seen_names.push(name);
        }
        meta.check_from(&mut c, &st.from.base, st.from.platform.as_deref(), st.from.name.as_deref(), st.line, end);

        let (mut shell_set, mut workdir_set) = stage_state.get(st.from.base.to_lowercase().as_str()).copied().unwrap_or((false, false));
        let (mut cmd_at, mut entrypoint_at, mut healthcheck_at): (Option<&Instr>, Option<&Instr>, Option<&Instr>) = (None, None, None);
        for instr in &st.commands {
            casing(&mut c, &instr.cmd, majority_lower, instr.start_line, instr.end_line);
            let name = &instr.cmd;
            match &instr.instruction {
                Instruction::Maintainer(_) => {
                    c.at(&MAINTAINER_DEPRECATED, instr, "Maintainer instruction is deprecated in favor of using label".into())
                }
                Instruction::Env(kvs) | Instruction::Label(kvs) => {
                    for kv in kvs {
                        if kv.legacy {
                            c.at(
                                &LEGACY_KEY_VALUE_FORMAT,
                                instr,
                                format!("\"{name} key=value\" should be used instead of legacy \"{name} key value\" format"),
                            );
                        }
                        if matches!(instr.instruction, Instruction::Env(_)) {
                            secret_key(&mut c, instr, "ENV", &kv.key);
                        }
                    }
                }
                Instruction::Arg(defs) => {
                    for d in defs {
                        secret_key(&mut c, instr, "ARG", &d.key);
                    }
                }
                Instruction::Shell(_) => shell_set = true,
                Instruction::Workdir(path) => {
                    // A path starting with a variable is not known here.
                    if !workdir_set && !path.starts_with('/') && !path.starts_with('$') {
                        c.at(
                            &WORKDIR_RELATIVE_PATH,
                            instr,
                            format!("Relative workdir {path:?} can have unexpected results if the base image changes"),
                        );
                    }
                    workdir_set = true;
                }
                Instruction::Cmd(cl) | Instruction::Entrypoint(cl) => {
                    let slot = if matches!(instr.instruction, Instruction::Cmd(_)) { &mut cmd_at } else { &mut entrypoint_at };
                    used_once(&mut c, slot, instr);
                    if cl.prepend_shell && !shell_set {
                        c.at(
                            &JSON_ARGS_RECOMMENDED,
                            instr,
                            format!("JSON arguments recommended for {name} to prevent unintended behavior related to OS signals"),
                        );
                    }
                }
                Instruction::Healthcheck(_) => used_once(&mut c, &mut healthcheck_at, instr),
                Instruction::Expose(ports) => {
                    for p in ports {
                        let (spec, proto) = p.split_once('/').unwrap_or((p, ""));
                        if proto != proto.to_lowercase() {
                            c.at(&EXPOSE_PROTO_CASING, instr, format!("Defined protocol '{p}' in EXPOSE instruction should be lowercase"));
                        }
                        if spec.contains(':') {
                            c.at(
                                &EXPOSE_INVALID_FORMAT,
                                instr,
                                format!("EXPOSE instruction should not define an IP address or host-port mapping, found '{p}'"),
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(name) = st.from.name.as_deref() {
            stage_state.insert(name, (shell_set, workdir_set));
        }
    }
    let mut violations = c.out;
    violations.sort_by_key(|v| v.start_line);
    Report { violations, error: config.error }
}

fn casing(c: &mut Checker<'_>, cmd: &str, majority_lower: bool, start: usize, end: usize) {
    let want = if majority_lower && cmd.to_lowercase() != cmd {
        "lowercase"
    } else if !majority_lower && cmd.to_uppercase() != cmd {
        "uppercase"
    } else {
        return;
    };
    c.report(&CONSISTENT_INSTRUCTION_CASING, start, end, format!("Command '{cmd}' should match the case of the command majority ({want})"));
}

/// CMD, ENTRYPOINT and HEALTHCHECK: a second one in a stage makes the first one useless; the
/// first is reported, as BuildKit does.
fn used_once<'a>(c: &mut Checker<'_>, slot: &mut Option<&'a Instr>, instr: &'a Instr) {
    if let Some(prev) = slot.replace(instr) {
        let msg =
            format!("Multiple {} instructions should not be used in the same stage because only the last one will be used", instr.cmd);
        c.at(&MULTIPLE_INSTRUCTIONS_DISALLOWED, prev, msg);
    }
}

fn secret_key(c: &mut Checker<'_>, instr: &Instr, what: &str, key: &str) {
    let words: Vec<String> = key.split('_').map(str::to_lowercase).collect();
    let has = |list: &[&str]| words.iter().any(|w| list.contains(&w.as_str()));
    if has(&SECRET_WORDS) && !has(&NOT_SECRET_WORDS) {
        c.at(&SECRETS_USED_IN_ARG_OR_ENV, instr, format!("Do not use ARG or ENV instructions for sensitive data ({what} {key:?})"));
    }
}

/// The ARGs before the first FROM, for the checks of FROM lines.
struct MetaArgs {
    lexer: Lexer,
    /// Every name a FROM may use: declared ARGs and the platform arguments.
    declared: Vec<String>,
    /// The values a FROM sees with no `--build-arg`: platform defaults and ARG defaults.
    defaults: HashMap<String, String>,
}

impl MetaArgs {
    fn new(stages: &Stages, escape: char) -> MetaArgs {
        let lexer = Lexer::new(escape);
        let mut declared: Vec<String> = PLATFORM_ARGS.iter().map(|s| s.to_string()).collect();
        let mut defaults: HashMap<String, String> =
            PLATFORM_ARGS.iter().zip(PLATFORM_DEFAULTS).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        for instr in &stages.meta_args {
            let Instruction::Arg(defs) = &instr.instruction else { continue };
            for d in defs {
                declared.push(d.key.clone());
                match &d.default {
                    Some(v) => {
                        let v = lexer.process_word(v, &defaults).unwrap_or_default();
                        defaults.insert(d.key.clone(), v);
                    }
                    None => {
                        defaults.remove(&d.key);
                    }
                }
            }
        }
        declared.sort();
        declared.dedup();
        MetaArgs { lexer, declared, defaults }
    }

    /// UndefinedArgInFrom, InvalidDefaultArgInFrom, RedundantTargetPlatform and
    /// FromPlatformFlagConstDisallowed on one FROM.
    fn check_from(&self, c: &mut Checker<'_>, base: &str, platform: Option<&str>, name: Option<&str>, start: usize, end: usize) {
        let all: HashMap<String, String> = self.declared.iter().map(|k| (k.clone(), "x".to_string())).collect();
        for word in std::iter::once(base).chain(platform) {
            let Ok(exp) = self.lexer.process(word, &all) else { return };
            for arg in &exp.unmatched {
                let suggestion = self
                    .declared
                    .iter()
                    .map(|k| (levenshtein(arg, k), k))
                    .filter(|(d, _)| *d < 3)
                    .min_by_key(|(d, _)| *d)
                    .map(|(_, k)| format!(" (did you mean {k}?)"))
                    .unwrap_or_default();
                c.report(&UNDEFINED_ARG_IN_FROM, start, end, format!("FROM argument '{arg}' is not declared{suggestion}"));
            }
        }
        if let Ok(exp) = self.lexer.process(base, &self.defaults) {
            if !plausible_reference(&exp.result) {
                c.report(
                    &INVALID_DEFAULT_ARG_IN_FROM,
                    start,
                    end,
                    format!("Default value for ARG {base} results in empty or invalid base image name"),
                );
            }
        }
        let Some(platform) = platform else { return };
        let Ok(exp) = self.lexer.process(platform, &self.defaults) else { return };
        let only_target = exp.unmatched.is_empty() && exp.matched.len() == 1 && exp.matched.contains("TARGETPLATFORM");
        if only_target && Some(exp.result.as_str()) == self.defaults.get("TARGETPLATFORM").map(String::as_str) {
            c.report(
                &REDUNDANT_TARGET_PLATFORM,
                start,
                end,
                format!("Setting platform to predefined {platform} in FROM is redundant as this is the default behavior"),
            );
        }
        if exp.matched.is_empty() && exp.unmatched.is_empty() {
            let parts: Vec<&str> = exp.result.split('/').collect();
            let valid = (1..=3).contains(&parts.len()) && parts.iter().all(|p| !p.is_empty());
            let stage = name.unwrap_or("");
            let named = parts.iter().take(2).any(|p| stage.contains(p));
            if valid && !named {
                c.report(
                    &FROM_PLATFORM_FLAG_CONST_DISALLOWED,
                    start,
                    end,
                    format!("FROM --platform flag should not use constant value {:?}", exp.result),
                );
            }
        }
    }
}

/// A rough image reference check: not empty, no blank, no dangling `:` or `@`, a lowercase
/// repository.
fn plausible_reference(s: &str) -> bool {
    if s.is_empty() || s.contains(char::is_whitespace) || s.ends_with([':', '@']) || s.starts_with([':', '@', '/']) {
        return false;
    }
    let name = s.split('@').next().unwrap_or(s);
    // The repository is what follows the last `/` up to a tag's `:` (a registry port comes
    // before a `/`).
    let last = name.rsplit('/').next().unwrap_or(name);
    let repo = last.split(':').next().unwrap_or(last);
    !repo.is_empty() && repo == repo.to_lowercase()
}

#[cfg(test)]
mod tests;
