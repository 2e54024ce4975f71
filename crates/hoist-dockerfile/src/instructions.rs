//! Typed instructions, as BuildKit's `frontend/dockerfile/instructions`: every instruction's
//! arguments checked and its flags parsed into typed values (`COPY --from/--chown/--chmod/
//! --link/--exclude/--parents`, `ADD --checksum/--keep-git-dir/--unpack`, `RUN --mount/
//! --network/--security`, `FROM --platform`, `HEALTHCHECK --interval...`), then grouped into
//! stages. Unknown instructions and unknown flags are errors naming the line and what was
//! expected. Values are not expanded here; [`crate::shell`] does that when the graph is built.

use std::num::ParseIntError;

use crate::gocompat::{self, parse_bool, parse_duration, parse_uint, quote, DurationError};
use crate::parser::{parse_heredoc, Dockerfile, Heredoc, Node};
use crate::shell::ShellError;

/// An instruction-level error with its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct InstructionError {
    /// 1-based line of the instruction.
    pub line: usize,
    /// What was wrong and what was expected.
    pub message: String,
}

/// What is wrong with one instruction; becomes an [`InstructionError`] with its line. `cmd`
/// fields hold the keyword uppercased.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Invalid {
    #[error("arg should start with -- : {0}")]
    FlagPrefix(String),
    /// `known`: the flags the instruction takes.
    #[error("unknown flag --{name} for {cmd} ({})", expected_flags(.cmd, .known))]
    UnknownFlag { name: String, cmd: String, known: Vec<&'static str> },
    #[error("duplicate flag specified: --{0}")]
    DuplicateFlag(String),
    /// `--flag=` on a boolean flag.
    #[error("missing a value on flag: --{0}")]
    EmptyBool(String),
    #[error("expecting boolean value for flag --{name}, not: {value}")]
    NotBool { name: String, value: String },
    /// `--flag` without `=` on a string flag.
    #[error("missing a value on flag: --{0} (expected --{0}=<value>)")]
    MissingValue(String),
    #[error("{0} requires at least one argument")]
    NoArguments(String),
    #[error("{0} requires exactly one argument")]
    NotOneArgument(String),
    #[error("{0} requires at least two arguments, but only one was provided. Destination could not be determined")]
    NoDestination(String),
    #[error("bad input to {0}, too many arguments")]
    TooManyArguments(String),
    #[error("{0} names can not be blank")]
    BlankName(String),
    /// A HEALTHCHECK duration flag (`name` without `--`) that is not a Go duration.
    #[error("--{name}: {source}")]
    Duration { name: &'static str, source: DurationError },
    #[error("Interval {} cannot be less than 1ms", quote(.0))]
    IntervalTooShort(&'static str),
    #[error("{0} cannot accept a heredoc as a destination")]
    HeredocDestination(String),
    /// The `AS` name as written.
    #[error("invalid name for build stage: {}, name can't start with a number or contain symbols", quote(.0))]
    StageName(String),
    #[error("FROM requires either one or three arguments (FROM <image> [AS <name>])")]
    FromArguments,
    #[error("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")]
    OnbuildChain,
    #[error("{0} isn't allowed as an ONBUILD trigger")]
    OnbuildTrigger(String),
    /// `cmd` as written; `suggestion` is the nearest keyword, if one is close.
    #[error("unknown instruction {}{}", quote(&.cmd.to_ascii_uppercase()), did_you_mean(*.suggestion))]
    UnknownInstruction { cmd: String, suggestion: Option<&'static str> },
    #[error("unsupported network mode {} (expected default, none or host)", quote(.0))]
    Network(String),
    #[error("unsupported security mode {} (expected sandbox or insecure)", quote(.0))]
    Security(String),
    #[error("HEALTHCHECK requires at least one argument (NONE or CMD <command>)")]
    HealthcheckArguments,
    #[error("HEALTHCHECK NONE takes no arguments")]
    HealthcheckNoneArguments,
    /// The type word uppercased.
    #[error("unknown type {} in HEALTHCHECK (expected CMD or NONE)", quote(.0))]
    HealthcheckType(String),
    #[error("missing command after HEALTHCHECK CMD")]
    HealthcheckCommand,
    #[error("--retries: invalid value {} (expected an integer)", quote(.value))]
    Retries { value: String, source: ParseIntError },
    #[error("--retries cannot be negative ({0})")]
    NegativeRetries(i64),
    #[error("VOLUME specified can not be an empty string")]
    EmptyVolume,
    /// The instruction text, trimmed.
    #[error("SHELL requires the arguments to be in JSON form, e.g. SHELL [\"/bin/bash\", \"-c\"] (got {0})")]
    ShellNotJson(String),
    #[error(transparent)]
    Mount(#[from] MountError),
}

/// What an unknown flag's error says was expected.
fn expected_flags(cmd: &str, known: &[&str]) -> String {
    if known.is_empty() {
        format!("{cmd} takes no flags")
    } else {
        let names: Vec<String> = known.iter().map(|n| format!("--{n}")).collect();
        format!("expected one of {}", names.join(", "))
    }
}

fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion.map(|s| format!(" (did you mean {s}?)")).unwrap_or_default()
}

/// A `RUN --mount` value that cannot be used; the message says what is wrong and what is
/// allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// A quoted CSV field is not closed, or text follows its closing quote (holds the whole
    /// value).
    #[error("failed to parse csv mounts: extraneous or missing \" in quoted-field: {0}")]
    CsvQuote(String),
    /// A `"` inside an unquoted CSV field (holds the whole value).
    #[error("failed to parse csv mounts: bare \" in non-quoted-field: {0}")]
    CsvBareQuote(String),
    /// `from=` names a variable; checked before expansion, as BuildKit does.
    #[error("'from' doesn't support variable expansion, define alias stage instead")]
    FromVariable,
    /// Expanding a value failed.
    #[error(transparent)]
    Expand(#[from] ShellError),
    /// A key the mount's type does not take (`size` on a bind mount); `kind` is the type name.
    #[error("unexpected key '{key}' for mount type '{kind}'")]
    KeyForType {
        /// The key, lowercased.
        key: String,
        /// The mount type (`bind`, `cache`, ...).
        kind: &'static str,
    },
    /// A bare word that is not one of the valueless keys (`ro`, `rw`, `required`).
    #[error("invalid field '{0}' must be a key=value pair")]
    NotKeyValue(String),
    /// A `type=` other than bind, cache, tmpfs, secret or ssh (the expanded value).
    #[error("unsupported mount type {} (expected bind, cache, tmpfs, secret or ssh)", quote(.0))]
    UnsupportedType(String),
    /// A boolean or size key with a value that does not parse.
    #[error("invalid value for {key}: {value}")]
    InvalidValue {
        /// The key, lowercased.
        key: String,
        /// The value after expansion.
        value: String,
    },
    /// A `sharing=` other than shared, private or locked.
    #[error("unsupported sharing value {} (expected shared, private or locked)", quote(.0))]
    UnsupportedSharing(String),
    /// `mode` (octal), `uid` or `gid` that is not a 32-bit number.
    #[error("invalid value {value} for {key}")]
    InvalidNumber {
        /// `mode`, `uid` or `gid`.
        key: &'static str,
        /// The value after expansion.
        value: String,
    },
    /// A key no mount type takes; `field` is the whole `key=value`.
    #[error(
        "unexpected key '{key}' in '{field}' (expected type, from, source, target, readonly, readwrite, id, sharing, required, size, mode, uid, gid, env)"
    )]
    UnknownKey {
        /// The key, lowercased.
        key: String,
        /// The whole `key=value` field as written.
        field: String,
    },
    /// `mode`, `uid` or `gid` on a bind or tmpfs mount.
    #[error("{key} not allowed for {} type mounts", quote(.kind))]
    FileInfoNotAllowed {
        /// `mode`, `uid` or `gid`.
        key: &'static str,
        /// The mount type (`bind` or `tmpfs`).
        kind: &'static str,
    },
    /// A secret mount with `from=`.
    #[error("secret mount should not have a from")]
    SecretFrom,
    /// A secret mount with `sharing=`.
    #[error("secret mount should not define sharing")]
    SecretSharing,
    /// A secret mount with none of `source`, `target` and `id`.
    #[error("invalid secret mount. one of source, target required")]
    SecretTarget,
    /// A secret mount with both `source` and `id`.
    #[error("both source and id can't be set")]
    SecretSourceAndId,
    /// `sharing=` on a mount that is not a cache mount (holds the type name).
    #[error("invalid cache sharing set for {0} mount")]
    SharingNotCache(&'static str),
}

/// A `--chmod` value that is neither octal nor a symbolic mode (holds the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChmodError {
    /// All digits, but not octal or above 07777.
    #[error("invalid chmod parameter: '{0}'. it should be octal string and between 0 and 07777")]
    Octal(String),
    /// Not a symbolic mode (`u+x,g-w`).
    #[error("invalid chmod parameter: '{0}'. expected octal (0755) or symbolic mode (u+x,g-w)")]
    Symbolic(String),
}

/// A STOPSIGNAL value that names no signal (holds the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    /// The number 0.
    #[error("invalid signal: {0}")]
    Zero(String),
    /// Neither a number nor a Linux signal name.
    #[error("invalid signal: {0} (expected a signal name such as SIGTERM, or a number)")]
    Unknown(String),
}

/// An EXPOSE port spec that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortSpecError {
    /// A protocol other than tcp, udp or sctp (lowercased).
    #[error("invalid proto: {0} (expected tcp, udp or sctp)")]
    Proto(String),
    /// No port before the protocol (holds the whole spec).
    #[error("no port specified: {0}<empty>")]
    NoPort(String),
    /// A port or range end that is not a number from 0 to 65535; `port` is the port part.
    #[error("invalid containerPort: {port}")]
    Port {
        /// The port or range as written (`80`, `8000-x`).
        port: String,
        /// Why a number in it did not parse as a `u16`.
        source: ParseIntError,
    },
    /// A range whose end is below its start.
    #[error("invalid range specified for container port: {0}")]
    Range(String),
}

/// All instruction keywords, uppercase.
pub const INSTRUCTIONS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// A key/value pair of ENV or LABEL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The name as written (only checked to be non-empty).
    pub key: String,
    /// The value as written: quotes and variables are kept, for expansion when the graph is
    /// built.
    pub value: String,
    /// Written in the legacy `KEY value` form (no `=`).
    pub legacy: bool,
}

/// One `ARG name[=default]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDef {
    /// The argument's name.
    pub key: String,
    /// The default after `=`, as written (unexpanded); `None` for a bare `ARG name`, whose
    /// value then comes from the build arguments or an earlier ARG.
    pub default: Option<String>,
}

/// A command line of RUN, CMD or ENTRYPOINT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdLine {
    /// Exec form: the JSON items; shell form: one string.
    pub args: Vec<String>,
    /// Shell form: the stage's shell is prepended.
    pub prepend_shell: bool,
    /// Here-documents of the instruction (RUN only).
    pub files: Vec<Heredoc>,
}

/// A heredoc source of COPY/ADD (`COPY <<EOF /dest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceContent {
    /// The heredoc name, used as the file name.
    pub path: String,
    /// Content (already chomped for `<<-`).
    pub data: String,
    /// Expand variables in the content.
    pub expand: bool,
}

/// COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInstr {
    /// ADD rather than COPY (ADD also fetches URLs and unpacks local archives).
    pub is_add: bool,
    /// Path sources (may contain wildcards, URLs for ADD).
    pub sources: Vec<String>,
    /// Heredoc sources.
    pub contents: Vec<SourceContent>,
    /// The destination as written; a trailing `/` means a directory.
    pub dest: String,
    /// `--from` (COPY only).
    pub from: Option<String>,
    /// `--chown=user[:group]` as written (names or ids, unexpanded).
    pub chown: Option<String>,
    /// `--chmod` as written; see [`parse_chmod`] for the forms (checked after expansion).
    pub chmod: Option<String>,
    /// `--link`: the files become an independent layer that does not depend on the layers
    /// below.
    pub link: bool,
    /// `--parents` (COPY only): keep the source's parent directories under `dest` (from a
    /// `/./` pivot when the source has one).
    pub parents: bool,
    /// `--exclude` patterns (`.dockerignore` syntax), in order.
    pub excludes: Vec<String>,
    /// `--checksum` (ADD only).
    pub checksum: Option<String>,
    /// `--keep-git-dir` (ADD of a Git URL only): keep the `.git` directory.
    pub keep_git_dir: bool,
    /// `--unpack[=bool]` (ADD only); `None` when not given.
    pub unpack: Option<bool>,
}

/// `RUN --network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// `default` (also when the flag is absent): the sandbox's own network.
    Default,
    /// `none`: no network but loopback.
    None,
    /// `host`: the host's network namespace (needs the `network.host` entitlement).
    Host,
}

/// `RUN --security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// `sandbox` (also when the flag is absent): the usual confinement.
    Sandbox,
    /// `insecure`: run with elevated privileges (needs the `security.insecure` entitlement).
    Insecure,
}

/// RUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInstr {
    /// The command to run.
    pub cmd: CmdLine,
    /// `--mount` values as written; see [`parse_mount`] (parsed again after expansion).
    pub mounts: Vec<String>,
    /// `--network`.
    pub network: Network,
    /// `--security`.
    pub security: Security,
}

/// HEALTHCHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// `["NONE"]`, `["CMD", ...]` or `["CMD-SHELL", cmd]`.
    pub test: Vec<String>,
    /// `--interval`: time between checks, in nanoseconds; 0 = not set (the runtime's
    /// default). Set values are at least 1 ms, as are the other durations.
    pub interval: i64,
    /// `--timeout`: how long one check may run, in nanoseconds; 0 = not set.
    pub timeout: i64,
    /// `--start-period`: time after start during which failures do not count, in
    /// nanoseconds; 0 = not set.
    pub start_period: i64,
    /// `--start-interval`: time between checks during the start period, in nanoseconds;
    /// 0 = not set.
    pub start_interval: i64,
    /// `--retries`: consecutive failures before the container is unhealthy; 0 = not set.
    /// Never negative.
    pub retries: i64,
}

/// FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromInstr {
    /// The base as written: an image reference, a stage name or `scratch` (unexpanded).
    pub base: String,
    /// `AS name`, lowercased.
    pub name: Option<String>,
    /// `--platform` as written (unexpanded), e.g. `linux/arm64` or `$BUILDPLATFORM`.
    pub platform: Option<String>,
}

/// A typed instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// FROM: starts a stage.
    From(FromInstr),
    /// ARG: one or more definitions.
    Arg(Vec<ArgDef>),
    /// ENV: one or more variables.
    Env(Vec<KeyValue>),
    /// LABEL: one or more labels.
    Label(Vec<KeyValue>),
    /// RUN.
    Run(RunInstr),
    /// COPY or ADD (told by [`CopyInstr::is_add`]).
    Copy(CopyInstr),
    /// WORKDIR: the path as written.
    Workdir(String),
    /// USER: `user[:group]` as written.
    User(String),
    /// EXPOSE: the port specs as written, sorted; see [`parse_port_spec`] (checked after
    /// expansion).
    Expose(Vec<String>),
    /// VOLUME: the paths, trimmed, none empty.
    Volume(Vec<String>),
    /// ENTRYPOINT.
    Entrypoint(CmdLine),
    /// CMD.
    Cmd(CmdLine),
    /// SHELL: the shell and its arguments (JSON form only, at least one item).
    Shell(Vec<String>),
    /// STOPSIGNAL: the signal as written; see [`validate_signal`] (checked after expansion).
    StopSignal(String),
    /// HEALTHCHECK.
    Healthcheck(HealthSpec),
    /// The trigger expression (the text after ONBUILD, heredocs appended).
    Onbuild(String),
    /// MAINTAINER (deprecated): the text as written.
    Maintainer(String),
}

/// An instruction with its location and source text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instr {
    /// The typed instruction.
    pub instruction: Instruction,
    /// The keyword as written.
    pub cmd: String,
    /// The instruction text (logical line, trimmed).
    pub code: String,
    /// First line, 1-based.
    pub start_line: usize,
    /// Last line, 1-based, counting continuation and here-document lines.
    pub end_line: usize,
}

/// A stage: its FROM and the instructions that follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The stage's FROM.
    pub from: FromInstr,
    /// The FROM instruction text.
    pub code: String,
    /// The FROM's first line, 1-based.
    pub line: usize,
    /// The instructions after the FROM, up to the next FROM, in order.
    pub commands: Vec<Instr>,
}

/// A Dockerfile as stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stages {
    /// ARGs before the first FROM.
    pub meta_args: Vec<Instr>,
    /// The stages in file order.
    pub stages: Vec<Stage>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagType {
    Bool,
    String,
    Strings,
}

struct FlagSpec {
    name: &'static str,
    ty: FlagType,
}

#[derive(Default)]
struct FlagValues {
    values: Vec<(&'static str, Vec<String>)>,
}

impl FlagValues {
    fn get(&self, name: &str) -> Option<&str> {
        self.values.iter().find(|(n, _)| *n == name).and_then(|(_, v)| v.last()).map(String::as_str)
    }
    fn all(&self, name: &str) -> Vec<String> {
        self.values.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone()).unwrap_or_default()
    }
    fn bool(&self, name: &str) -> bool {
        self.get(name) == Some("true")
    }
    fn used(&self, name: &str) -> bool {
        self.values.iter().any(|(n, _)| *n == name)
    }
}

fn spec(name: &'static str, ty: FlagType) -> FlagSpec {
    FlagSpec { name, ty }
}

/// BuildKit's `BFlags.Parse`, with errors that list what was expected.
fn parse_flags(cmd: &str, flags: &[String], specs: &[FlagSpec]) -> Result<FlagValues, Invalid> {
    let mut out = FlagValues::default();
    for arg in flags {
        let Some(body) = arg.strip_prefix("--") else {
            return Err(Invalid::FlagPrefix(arg.clone()));
        };
        if body.is_empty() {
            return Ok(out);
        }
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let Some(s) = specs.iter().find(|s| s.name == name) else {
            return Err(Invalid::UnknownFlag {
                name: name.to_string(),
                cmd: cmd.to_string(),
                known: specs.iter().map(|s| s.name).collect(),
            });
        };
        let idx = out.values.iter().position(|(n, _)| *n == s.name);
        if idx.is_some() && s.ty != FlagType::Strings {
            return Err(Invalid::DuplicateFlag(name.to_string()));
        }
        let v = match s.ty {
            FlagType::Bool => match value {
                Some("") => return Err(Invalid::EmptyBool(name.to_string())),
                None => "true".to_string(),
                Some(v) => match v.to_ascii_lowercase().as_str() {
                    "true" => "true".into(),
                    "false" => "false".into(),
                    _ => return Err(Invalid::NotBool { name: name.to_string(), value: v.to_string() }),
                },
            },
            FlagType::String | FlagType::Strings => match value {
                None => return Err(Invalid::MissingValue(name.to_string())),
                Some(v) => v.to_string(),
            },
        };
        match idx {
            Some(i) => out.values[i].1.push(v),
            None => out.values.push((s.name, vec![v])),
        }
    }
    Ok(out)
}

fn nonempty(s: Option<&str>) -> Option<String> {
    s.filter(|v| !v.is_empty()).map(str::to_string)
}

fn cmdline(node: &Node, empty_as_nil: bool) -> CmdLine {
    let args = if node.args.is_empty() {
        Vec::new()
    } else if node.json {
        node.args.clone()
    } else {
        vec![node.args.join(" ")]
    };
    let _ = empty_as_nil;
    CmdLine { args, prepend_shell: !node.json, files: node.heredocs.clone() }
}

fn kvps(args: &[String], cmd: &str) -> Result<Vec<KeyValue>, Invalid> {
    if args.is_empty() {
        return Err(Invalid::NoArguments(cmd.to_string()));
    }
    if args.len() % 3 != 0 {
        return Err(Invalid::TooManyArguments(cmd.to_string()));
    }
    let mut out = Vec::with_capacity(args.len() / 3);
    for c in args.chunks(3) {
        if c[0].is_empty() {
            return Err(Invalid::BlankName(cmd.to_string()));
        }
        out.push(KeyValue { key: c[0].clone(), value: c[1].clone(), legacy: c[2].is_empty() });
    }
    Ok(out)
}

fn stage_name_valid(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z')) && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

fn parse_interval(name: &'static str, v: Option<&str>) -> Result<i64, Invalid> {
    let Some(v) = v.filter(|s| !s.is_empty()) else {
        return Ok(0);
    };
    let d = parse_duration(v).map_err(|source| Invalid::Duration { name, source })?;
    if d == 0 {
        return Ok(0);
    }
    if d < 1_000_000 {
        return Err(Invalid::IntervalTooShort(name));
    }
    Ok(d)
}

/// Parse the `SourcesAndDest` of COPY/ADD: heredoc sources become contents.
fn sources_and_dest(node: &Node, cmd: &str) -> Result<(Vec<String>, Vec<SourceContent>, String), Invalid> {
    let (srcs, dest) = node.args.split_at(node.args.len() - 1);
    let dest = dest[0].clone();
    if !node.json && parse_heredoc(&dest).ok().flatten().is_some() {
        return Err(Invalid::HeredocDestination(cmd.to_string()));
    }
    let mut sources = Vec::new();
    let mut contents = Vec::new();
    for src in srcs {
        let doc = if node.json { None } else { parse_heredoc(src).ok().flatten() };
        match doc {
            Some(h) => {
                let found = node.heredocs.iter().find(|d| d.name == h.name);
                let mut data = found.map(|d| d.content.clone()).unwrap_or_default();
                if h.chomp {
                    data = crate::parser::chomp_heredoc_content(&data);
                }
                contents.push(SourceContent { path: h.name, data, expand: h.expand });
            }
            None => sources.push(src.clone()),
        }
    }
    Ok((sources, contents, dest))
}

/// Check that a `--mount` value is CSV and that `from` has no variable, as BuildKit does
/// before expansion.
fn precheck_mount(value: &str) -> Result<(), MountError> {
    let fields = csv_fields(value)?;
    for f in fields {
        if let Some((k, v)) = f.split_once('=') {
            if k.eq_ignore_ascii_case("from") {
                if let Some(i) = v.find('$') {
                    if i != v.len() - 1 {
                        return Err(MountError::FromVariable);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Convert one parsed node to a typed instruction.
pub fn parse_instruction(node: &Node) -> Result<Instr, InstructionError> {
    let instruction = parse_instruction_inner(node).map_err(|e| InstructionError { line: node.start_line, message: e.to_string() })?;
    Ok(Instr {
        instruction,
        cmd: node.cmd.clone(),
        code: node.original.trim().to_string(),
        start_line: node.start_line,
        end_line: node.end_line,
    })
}

fn suggestion(word: &str) -> Option<&'static str> {
    let w = word.to_ascii_uppercase();
    INSTRUCTIONS.iter().copied().filter(|c| levenshtein(c, &w) <= 2).min_by_key(|c| levenshtein(c, &w))
}

pub(crate) fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn parse_instruction_inner(node: &Node) -> Result<Instruction, Invalid> {
    let cmd_upper = node.cmd.to_ascii_uppercase();
    let c = cmd_upper.as_str();
    match node.keyword().as_str() {
        "env" | "label" => parse_env_label(node, c),
        "maintainer" => parse_single_arg(node, c, Instruction::Maintainer),
        "add" | "copy" => parse_copy_add(node, c),
        "from" => parse_from(node, c),
        "onbuild" => parse_onbuild(node, c),
        "workdir" => parse_single_arg(node, c, Instruction::Workdir),
        "run" => parse_run(node, c),
        "cmd" | "entrypoint" => parse_cmd_entrypoint(node, c),
        "healthcheck" => parse_healthcheck(node, c),
        "expose" => parse_expose(node, c),
        "user" => parse_single_arg(node, c, Instruction::User),
        "volume" => parse_volume(node, c),
        "stopsignal" => parse_single_arg(node, c, Instruction::StopSignal),
        "arg" => parse_arg(node, c),
        "shell" => parse_shell(node, c),
        _ => Err(unknown_instruction(&node.cmd)),
    }
}

/// ENV and LABEL: no flags, key/value pairs.
fn parse_env_label(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    parse_flags(c, &node.flags, &[])?;
    let kv = kvps(&node.args, c)?;
    Ok(if c == "ENV" { Instruction::Env(kv) } else { Instruction::Label(kv) })
}

/// MAINTAINER, WORKDIR, USER and STOPSIGNAL: exactly one argument, no flags.
fn parse_single_arg(node: &Node, c: &str, make: fn(String) -> Instruction) -> Result<Instruction, Invalid> {
    if node.args.len() != 1 {
        return Err(Invalid::NotOneArgument(c.to_string()));
    }
    parse_flags(c, &node.flags, &[])?;
    Ok(make(node.args[0].clone()))
}

/// COPY and ADD: each with its own flags, then sources (paths or heredocs) and a destination.
fn parse_copy_add(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    use FlagType::*;
    let is_add = c == "ADD";
    if node.args.len() < 2 {
        return Err(Invalid::NoDestination(c.to_string()));
    }
    let f = if is_add {
        parse_flags(
            c,
            &node.flags,
            &[
                spec("exclude", Strings),
                spec("chown", String),
                spec("chmod", String),
                spec("link", Bool),
                spec("keep-git-dir", Bool),
                spec("checksum", String),
                spec("unpack", Bool),
            ],
        )?
    } else {
        parse_flags(
            c,
            &node.flags,
            &[
                spec("exclude", Strings),
                spec("parents", Bool),
                spec("chown", String),
                spec("from", String),
                spec("chmod", String),
                spec("link", Bool),
            ],
        )?
    };
    let (sources, contents, dest) = sources_and_dest(node, c)?;
    Ok(Instruction::Copy(CopyInstr {
        is_add,
        sources,
        contents,
        dest,
        from: nonempty(f.get("from")),
        chown: nonempty(f.get("chown")),
        chmod: nonempty(f.get("chmod")),
        link: f.bool("link"),
        parents: f.bool("parents"),
        excludes: f.all("exclude"),
        checksum: nonempty(f.get("checksum")),
        keep_git_dir: f.bool("keep-git-dir"),
        unpack: f.used("unpack").then(|| f.bool("unpack")),
    }))
}

/// FROM: `<image> [AS <name>]`, `--platform`.
fn parse_from(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    let args = &node.args;
    let name = match args.len() {
        3 if args[1].eq_ignore_ascii_case("as") => {
            let n = args[2].to_lowercase();
            if !stage_name_valid(&n) {
                return Err(Invalid::StageName(args[2].clone()));
            }
            Some(n)
        }
        1 => None,
        _ => return Err(Invalid::FromArguments),
    };
    let f = parse_flags(c, &node.flags, &[spec("platform", FlagType::String)])?;
    Ok(Instruction::From(FromInstr { base: args[0].clone(), name, platform: nonempty(f.get("platform")) }))
}

/// ONBUILD: the trigger is checked, and kept as text (heredocs appended).
fn parse_onbuild(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    let args = &node.args;
    if args.is_empty() {
        return Err(Invalid::NoArguments("ONBUILD".into()));
    }
    parse_flags(c, &node.flags, &[])?;
    let trigger = args[0].trim().to_ascii_uppercase();
    match trigger.as_str() {
        "ONBUILD" => return Err(Invalid::OnbuildChain),
        "MAINTAINER" | "FROM" => return Err(Invalid::OnbuildTrigger(trigger)),
        _ => {}
    }
    if let Some(sub) = &node.sub {
        if !INSTRUCTIONS.contains(&trigger.as_str()) {
            return Err(unknown_instruction(&sub.cmd));
        }
    }
    let orig = node.original.trim_start_matches(crate::gocompat::is_space);
    let mut expr = match orig.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("onbuild") => orig[7..].trim_start_matches(crate::gocompat::is_space).to_string(),
        _ => orig.to_string(),
    };
    for h in &node.heredocs {
        expr.push('\n');
        expr.push_str(&h.content);
        expr.push_str(&h.name);
    }
    Ok(Instruction::Onbuild(expr))
}

/// RUN: `--mount` (prechecked, parsed after expansion), `--network`, `--security`.
fn parse_run(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    use FlagType::*;
    let f = parse_flags(c, &node.flags, &[spec("mount", Strings), spec("network", String), spec("security", String)])?;
    let mounts = f.all("mount");
    for m in &mounts {
        precheck_mount(m)?;
    }
    let network = match f.get("network").unwrap_or("default") {
        "default" => Network::Default,
        "none" => Network::None,
        "host" => Network::Host,
        other => return Err(Invalid::Network(other.to_string())),
    };
    let security = match f.get("security").unwrap_or("sandbox") {
        "sandbox" => Security::Sandbox,
        "insecure" => Security::Insecure,
        other => return Err(Invalid::Security(other.to_string())),
    };
    Ok(Instruction::Run(RunInstr { cmd: cmdline(node, false), mounts, network, security }))
}

/// CMD and ENTRYPOINT: no flags, the command line.
fn parse_cmd_entrypoint(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    parse_flags(c, &node.flags, &[])?;
    Ok(if c == "CMD" { Instruction::Cmd(cmdline(node, false)) } else { Instruction::Entrypoint(cmdline(node, true)) })
}

/// HEALTHCHECK: `NONE` (no flags), or `CMD <command>` with its timing flags.
fn parse_healthcheck(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    let args = &node.args;
    if args.is_empty() {
        return Err(Invalid::HealthcheckArguments);
    }
    let typ = args[0].to_ascii_uppercase();
    let rest = &args[1..];
    if typ == "NONE" {
        if !rest.is_empty() {
            return Err(Invalid::HealthcheckNoneArguments);
        }
        parse_flags(c, &node.flags, &[])?;
        return Ok(Instruction::Healthcheck(HealthSpec {
            test: vec!["NONE".into()],
            interval: 0,
            timeout: 0,
            start_period: 0,
            start_interval: 0,
            retries: 0,
        }));
    }
    let f = parse_flags(
        c,
        &node.flags,
        &[
            spec("interval", FlagType::String),
            spec("timeout", FlagType::String),
            spec("start-period", FlagType::String),
            spec("start-interval", FlagType::String),
            spec("retries", FlagType::String),
        ],
    )?;
    if typ != "CMD" {
        return Err(Invalid::HealthcheckType(typ));
    }
    let cmd: Vec<String> = if rest.is_empty() {
        Vec::new()
    } else if node.json {
        rest.to_vec()
    } else {
        vec![rest.join(" ")]
    };
    if cmd.is_empty() {
        return Err(Invalid::HealthcheckCommand);
    }
    let mut test: Vec<String> = vec![if node.json { "CMD".into() } else { "CMD-SHELL".into() }];
    test.extend(cmd);
    let retries = parse_retries(f.get("retries"))?;
    Ok(Instruction::Healthcheck(HealthSpec {
        test,
        interval: parse_interval("interval", f.get("interval"))?,
        timeout: parse_interval("timeout", f.get("timeout"))?,
        start_period: parse_interval("start-period", f.get("start-period"))?,
        start_interval: parse_interval("start-interval", f.get("start-interval"))?,
        retries,
    }))
}

/// `HEALTHCHECK --retries`: a non-negative 32-bit integer; 0 when not set or empty.
fn parse_retries(v: Option<&str>) -> Result<i64, Invalid> {
    match v.filter(|s| !s.is_empty()) {
        None => Ok(0),
        Some(v) => {
            let r: i64 = v.parse::<i32>().map_err(|source| Invalid::Retries { value: v.to_string(), source })?.into();
            if r < 0 {
                return Err(Invalid::NegativeRetries(r));
            }
            Ok(r)
        }
    }
}

/// EXPOSE: no flags, the ports sorted.
fn parse_expose(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    if node.args.is_empty() {
        return Err(Invalid::NoArguments("EXPOSE".into()));
    }
    parse_flags(c, &node.flags, &[])?;
    let mut ports = node.args.clone();
    ports.sort();
    Ok(Instruction::Expose(ports))
}

/// VOLUME: no flags, non-empty paths (trimmed).
fn parse_volume(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    if node.args.is_empty() {
        return Err(Invalid::NoArguments("VOLUME".into()));
    }
    parse_flags(c, &node.flags, &[])?;
    let mut vols = Vec::new();
    for v in &node.args {
        let v = v.trim();
        if v.is_empty() {
            return Err(Invalid::EmptyVolume);
        }
        vols.push(v.to_string());
    }
    Ok(Instruction::Volume(vols))
}

/// ARG: no flags, `name[=default]` definitions.
fn parse_arg(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    let args = &node.args;
    if args.is_empty() {
        return Err(Invalid::NoArguments("ARG".into()));
    }
    parse_flags(c, &node.flags, &[])?;
    let mut defs = Vec::with_capacity(args.len());
    for a in args {
        match a.split_once('=') {
            Some(("", _)) => return Err(Invalid::BlankName("ARG".into())),
            Some((k, v)) => defs.push(ArgDef { key: k.to_string(), default: Some(v.to_string()) }),
            None => defs.push(ArgDef { key: a.clone(), default: None }),
        }
    }
    Ok(Instruction::Arg(defs))
}

/// SHELL: no flags, the shell in JSON form.
fn parse_shell(node: &Node, c: &str) -> Result<Instruction, Invalid> {
    parse_flags(c, &node.flags, &[])?;
    if node.args.is_empty() {
        return Err(Invalid::NoArguments("SHELL".into()));
    }
    if !node.json {
        return Err(Invalid::ShellNotJson(node.original.trim().to_string()));
    }
    Ok(Instruction::Shell(node.args.clone()))
}

fn unknown_instruction(cmd: &str) -> Invalid {
    Invalid::UnknownInstruction { cmd: cmd.to_string(), suggestion: suggestion(cmd) }
}

/// Group instructions into stages; ARGs before the first FROM are meta args.
pub fn parse_stages(df: &Dockerfile) -> Result<Stages, InstructionError> {
    let mut meta_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for node in &df.nodes {
        let instr = parse_instruction(node)?;
        if let Instruction::From(f) = &instr.instruction {
            stages.push(Stage { from: f.clone(), code: instr.code.clone(), line: instr.start_line, commands: Vec::new() });
            continue;
        }
        match stages.last_mut() {
            Some(st) => st.commands.push(instr),
            None => {
                if matches!(instr.instruction, Instruction::Arg(_)) {
                    meta_args.push(instr);
                } else {
                    return Err(InstructionError {
                        line: instr.start_line,
                        message: format!(
                            "no build stage in current context: {} comes before the first FROM (only ARG may precede FROM)",
                            instr.cmd.to_ascii_uppercase()
                        ),
                    });
                }
            }
        }
    }
    Ok(Stages { meta_args, stages })
}

/// `RUN --mount` types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountType {
    /// `bind` (the default): files of a stage, an image or the context (read-only unless
    /// `rw`).
    Bind,
    /// `cache`: a persistent directory shared between builds, keyed by `id` (default: the
    /// target).
    Cache,
    /// `tmpfs`: an empty in-memory file system.
    Tmpfs,
    /// `secret`: a secret as a file (or an environment variable with `env=`).
    Secret,
    /// `ssh`: a socket forwarding the client's ssh agent.
    Ssh,
}

/// `--mount=type=cache,sharing=...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// `shared` (the default): concurrent builds use the cache at the same time.
    Shared,
    /// `private`: a concurrent build gets a new copy instead.
    Private,
    /// `locked`: a concurrent build waits until the cache is released.
    Locked,
}

/// A parsed `RUN --mount` value (BuildKit's `instructions.Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `type=`.
    pub kind: MountType,
    /// `from=`: the stage or image whose files are mounted; empty = the build context
    /// (bind) or a new cache (cache).
    pub from: String,
    /// `source=` (`src`): the path within `from`; for a secret, another spelling of `id`.
    pub source: String,
    /// `target=` (`dst`, `destination`): the mount point in the container.
    pub target: String,
    /// Read-only: `ro`/`readonly` or `rw`/`readwrite`, else the type's default (read-only
    /// but for cache and tmpfs).
    pub read_only: bool,
    /// `size=` of a tmpfs mount, in bytes; 0 = no limit.
    pub size_limit: u64,
    /// `id=` (cache and secret ids, ssh id).
    pub id: String,
    /// `sharing=` (cache only); `None` when not given.
    pub sharing: Option<Sharing>,
    /// `required` (secret and ssh only): fail when the client does not provide it.
    pub required: bool,
    /// `env=` of a secret mount (`Some("")` = default name).
    pub env: Option<String>,
    /// `mode=` (octal) of the mounted file or directory (secret, ssh, cache).
    pub mode: Option<u32>,
    /// `uid=` of the mounted file or directory (secret, ssh, cache).
    pub uid: Option<u32>,
    /// `gid=` of the mounted file or directory (secret, ssh, cache).
    pub gid: Option<u32>,
}

/// Split a CSV record (Go's `encoding/csv` rules for one line: `"` quotes fields, `""` is a
/// literal quote inside quotes).
pub fn csv_fields(s: &str) -> Result<Vec<String>, MountError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut at_field_start = true;
    while i <= chars.len() {
        if i == chars.len() {
            out.push(std::mem::take(&mut cur));
            break;
        }
        let c = chars[i];
        if at_field_start && c == '"' {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(MountError::CsvQuote(s.to_string())),
                    Some('"') if chars.get(i + 1) == Some(&'"') => {
                        cur.push('"');
                        i += 2;
                    }
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(&ch) => {
                        cur.push(ch);
                        i += 1;
                    }
                }
            }
            match chars.get(i) {
                None => {}
                Some(',') => {}
                Some(_) => return Err(MountError::CsvQuote(s.to_string())),
            }
            at_field_start = false;
            continue;
        }
        if c == ',' {
            out.push(std::mem::take(&mut cur));
            at_field_start = true;
            i += 1;
            continue;
        }
        if c == '"' {
            return Err(MountError::CsvBareQuote(s.to_string()));
        }
        cur.push(c);
        at_field_start = false;
        i += 1;
    }
    Ok(out)
}

/// `units.RAMInBytes`: `64m`, `1g`, `512k`, `1024`, `1.5GiB`.
pub fn ram_in_bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    let num_end = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    let n: f64 = num.parse().ok()?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix("ib").or_else(|| unit.strip_suffix('b')).unwrap_or(&unit).to_string();
    let mult: f64 = match unit.as_str() {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        "t" => 1024f64.powi(4),
        "p" => 1024f64.powi(5),
        _ => return None,
    };
    let v = n * mult;
    (v.is_finite() && (0.0..1.8e19).contains(&v)).then_some(v as u64)
}

/// Parse a `--mount` value after expanding each value with `expand` (BuildKit's
/// `parseMount` with an expander). Errors say what was wrong and what is allowed.
pub fn parse_mount(value: &str, expand: &mut dyn FnMut(&str) -> Result<String, ShellError>) -> Result<Mount, MountError> {
    let fields = csv_fields(value)?;
    let mut m = Mount {
        kind: MountType::Bind,
        from: String::new(),
        source: String::new(),
        target: String::new(),
        read_only: false,
        size_limit: 0,
        id: String::new(),
        sharing: None,
        required: false,
        env: None,
        mode: None,
        uid: None,
        gid: None,
    };
    let mut ro_auto = true;
    let type_name = |m: &Mount| match m.kind {
        MountType::Bind => "bind",
        MountType::Cache => "cache",
        MountType::Tmpfs => "tmpfs",
        MountType::Secret => "secret",
        MountType::Ssh => "ssh",
    };
    for field in &fields {
        let (key, val) = match field.split_once('=') {
            Some((k, v)) => (k.to_ascii_lowercase(), Some(v)),
            None => (field.to_ascii_lowercase(), None),
        };
        let Some(val) = val else {
            match key.as_str() {
                "readonly" | "ro" => {
                    m.read_only = true;
                    ro_auto = false;
                }
                "readwrite" | "rw" => {
                    m.read_only = false;
                    ro_auto = false;
                }
                "required" => {
                    if matches!(m.kind, MountType::Secret | MountType::Ssh) {
                        m.required = true;
                    } else {
                        return Err(MountError::KeyForType { key, kind: type_name(&m) });
                    }
                }
                _ => return Err(MountError::NotKeyValue(field.clone())),
            }
            continue;
        };
        let v = expand(val)?;
        let bad = |k: &str, v: &str| MountError::InvalidValue { key: k.to_string(), value: v.to_string() };
        match key.as_str() {
            "type" => {
                m.kind = match v.to_ascii_lowercase().as_str() {
                    "bind" => MountType::Bind,
                    "cache" => MountType::Cache,
                    "tmpfs" => MountType::Tmpfs,
                    "secret" => MountType::Secret,
                    "ssh" => MountType::Ssh,
                    _ => return Err(MountError::UnsupportedType(v)),
                }
            }
            "from" => m.from = v,
            "source" | "src" => m.source = v,
            "target" | "dst" | "destination" => m.target = v,
            "readonly" | "ro" => {
                m.read_only = parse_bool(&v).ok_or_else(|| bad(&key, &v))?;
                ro_auto = false;
            }
            "readwrite" | "rw" => {
                m.read_only = !parse_bool(&v).ok_or_else(|| bad(&key, &v))?;
                ro_auto = false;
            }
            "required" => {
                if matches!(m.kind, MountType::Secret | MountType::Ssh) {
                    m.required = parse_bool(&v).ok_or_else(|| bad(&key, &v))?;
                } else {
                    return Err(MountError::KeyForType { key, kind: type_name(&m) });
                }
            }
            "size" => {
                if m.kind == MountType::Tmpfs {
                    m.size_limit = ram_in_bytes(&v).ok_or_else(|| bad(&key, &v))?;
                } else {
                    return Err(MountError::KeyForType { key, kind: type_name(&m) });
                }
            }
            "id" => m.id = v,
            "sharing" => {
                m.sharing = Some(match v.to_ascii_lowercase().as_str() {
                    "shared" => Sharing::Shared,
                    "private" => Sharing::Private,
                    "locked" => Sharing::Locked,
                    _ => return Err(MountError::UnsupportedSharing(v)),
                })
            }
            "mode" => {
                m.mode = Some(parse_uint(&v, 8, 32).ok_or_else(|| MountError::InvalidNumber { key: "mode", value: v.clone() })? as u32)
            }
            "uid" => m.uid = Some(parse_uint(&v, 10, 32).ok_or_else(|| MountError::InvalidNumber { key: "uid", value: v.clone() })? as u32),
            "gid" => m.gid = Some(parse_uint(&v, 10, 32).ok_or_else(|| MountError::InvalidNumber { key: "gid", value: v.clone() })? as u32),
            "env" => m.env = Some(v),
            _ => return Err(MountError::UnknownKey { key, field: field.clone() }),
        }
    }
    let file_info = matches!(m.kind, MountType::Secret | MountType::Ssh | MountType::Cache);
    if !file_info {
        for (set, what) in [(m.mode.is_some(), "mode"), (m.uid.is_some(), "uid"), (m.gid.is_some(), "gid")] {
            if set {
                return Err(MountError::FileInfoNotAllowed { key: what, kind: type_name(&m) });
            }
        }
    }
    if ro_auto {
        m.read_only = !matches!(m.kind, MountType::Cache | MountType::Tmpfs);
    }
    if m.kind == MountType::Secret {
        if !m.from.is_empty() {
            return Err(MountError::SecretFrom);
        }
        if m.sharing.is_some() {
            return Err(MountError::SecretSharing);
        }
        if m.source.is_empty() && m.target.is_empty() && m.id.is_empty() {
            return Err(MountError::SecretTarget);
        }
        if !m.source.is_empty() && !m.id.is_empty() {
            return Err(MountError::SecretSourceAndId);
        }
    }
    if m.sharing.is_some() && m.kind != MountType::Cache {
        return Err(MountError::SharingNotCache(type_name(&m)));
    }
    Ok(m)
}

/// A `--chmod` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChmodSpec {
    /// A numeric mode, at most `0o7777`.
    Octal(u32),
    /// A symbolic expression as written (`u+x,g-w`), applied to each file's mode.
    Symbolic(String),
}

/// Parse `--chmod`: octal up to 07777, or a symbolic expression (`u+x,g-w`, `a=rX`).
pub fn parse_chmod(s: &str) -> Result<ChmodSpec, ChmodError> {
    let non_octal = || ChmodError::Octal(s.to_string());
    if let Some(v) = parse_uint(s, 8, 32) {
        if v > 0o7777 {
            return Err(non_octal());
        }
        return Ok(ChmodSpec::Octal(v as u32));
    }
    if s.is_empty() || s.chars().all(|c| c.is_ascii_digit()) {
        return Err(non_octal());
    }
    for clause in s.split(',') {
        let who_len = clause.chars().take_while(|c| matches!(c, 'u' | 'g' | 'o' | 'a')).count();
        let mut rest = &clause[who_len..];
        if rest.is_empty() {
            return Err(ChmodError::Symbolic(s.to_string()));
        }
        while !rest.is_empty() {
            let Some(op) = rest.chars().next().filter(|c| matches!(c, '+' | '-' | '=')) else {
                return Err(ChmodError::Symbolic(s.to_string()));
            };
            rest = &rest[op.len_utf8()..];
            let perm_len = rest.chars().take_while(|c| matches!(c, 'r' | 'w' | 'x' | 'X' | 's' | 't' | 'u' | 'g' | 'o')).count();
            rest = &rest[perm_len..];
        }
    }
    Ok(ChmodSpec::Symbolic(s.to_string()))
}

/// Validate a STOPSIGNAL value like moby's `signal.ParseSignal` (Linux signal names with or
/// without `SIG`, `RTMIN+n`/`RTMAX-n`, or a non-zero number).
pub fn validate_signal(raw: &str) -> Result<(), SignalError> {
    if let Ok(n) = raw.parse::<i64>() {
        if n == 0 {
            return Err(SignalError::Zero(raw.to_string()));
        }
        return Ok(());
    }
    let up = raw.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    const NAMES: [&str; 34] = [
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL", "PIPE", "POLL", "PROF", "PWR",
        "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP", "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU",
        "XFSZ",
    ];
    let rt_ok = |base: &str, sign: char, max: u32| -> bool {
        if name == base {
            return true;
        }
        name.strip_prefix(base)
            .and_then(|r| r.strip_prefix(sign))
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| (1..=max).contains(&n))
    };
    if NAMES.contains(&name) || rt_ok("RTMIN", '+', 15) || rt_ok("RTMAX", '-', 14) {
        Ok(())
    } else {
        Err(SignalError::Unknown(raw.to_string()))
    }
}

/// Parse an EXPOSE port spec (`80`, `80/udp`, `8000-8010/tcp`, `ip:host:container`) into
/// `port/proto` keys, as `nat.ParsePortSpecs` does.
pub fn parse_port_spec(raw: &str) -> Result<Vec<String>, PortSpecError> {
    let (ip_host, container) = match raw.rfind(':') {
        Some(i) => (&raw[..i], &raw[i + 1..]),
        None => ("", raw),
    };
    let _ = ip_host;
    let (port, proto) = match container.split_once('/') {
        Some((p, "")) => (p, "tcp".to_string()),
        Some((p, pr)) => (p, pr.to_ascii_lowercase()),
        None => (container, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(PortSpecError::Proto(proto));
    }
    if port.is_empty() {
        return Err(PortSpecError::NoPort(raw.to_string()));
    }
    let parse = |s: &str| s.parse::<u16>().map_err(|source| PortSpecError::Port { port: port.to_string(), source });
    let (start, end) = match port.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => {
            let p = parse(port)?;
            (p, p)
        }
    };
    if end < start {
        return Err(PortSpecError::Range(port.to_string()));
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}

/// Instruction text of ONBUILD as BuildKit stores it; exposed for printing.
pub fn format_health_history(h: &HealthSpec) -> String {
    format!(
        "HEALTHCHECK &{{{} {} {} {} {} {}}}",
        gocompat::quote_slice(&h.test),
        quote(&gocompat::format_duration(h.interval)),
        quote(&gocompat::format_duration(h.timeout)),
        quote(&gocompat::format_duration(h.start_period)),
        quote(&gocompat::format_duration(h.start_interval)),
        gocompat::quote_rune(h.retries)
    )
}

/// The context path a COPY/ADD source (or a bind mount's `source`) reads, as a selector:
/// the path up to its first component with a wildcard or an escape, cleaned as COPY
/// resolves it (relative to the context root, `..` clamped, `--parents` pivots `/./`
/// ignored). `""` means the whole context.
pub fn source_selector(source: &str) -> String {
    let source = source.replace("/./", "/");
    let mut keep: Vec<&str> = Vec::new();
    for c in source.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                keep.pop();
            }
            c if c.contains(['*', '?', '[', '\\']) => break,
            c => keep.push(c),
        }
    }
    keep.join("/")
}

#[cfg(test)]
mod tests;
