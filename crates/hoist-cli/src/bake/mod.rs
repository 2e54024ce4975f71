//! `hoist bake`: builds the targets and groups of bake files (HCL and JSON, as `docker buildx
//! bake` reads them) and the `build:` sections of compose files. The files are read into one
//! [`Config`] (several files merge in order: a target defined twice is merged, a group's
//! targets are joined); the targets asked for (groups expanded, `inherits` resolved, `--set`
//! applied) each become a `hoist build` ([`crate::build::BuildArgs`], made from the flags
//! `hoist build` takes, so every flag means what it means there) and they build at once.
//!
//! Parsing is in [`hcl`] (HCL and JSON bake files: variables, functions) and [`compose`]
//! (compose files); merging, inherits, groups, `--set` and running are here.

mod compose;
mod hcl;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser};
use serde::Serialize;

use crate::build::BuildArgs;
use crate::conn::ConnArgs;

/// `hoist bake [OPTIONS] [TARGET...]`
#[derive(Args, Debug)]
pub struct BakeArgs {
    /// Targets or groups to build (default: `default`). Patterns (`app-*`) match several.
    pub targets: Vec<String>,
    /// A bake file (HCL or JSON) or compose file; several merge in order (default: the first
    /// found of compose.yaml, compose.yml, docker-compose.yml, docker-compose.yaml, and every
    /// one of docker-bake.json, docker-bake.hcl, docker-bake.override.json,
    /// docker-bake.override.hcl).
    #[arg(short = 'f', long = "file")]
    pub files: Vec<String>,
    /// Override a target's attribute: TARGET.KEY=VALUE, e.g. `app.tags=reg/app:1`,
    /// `*.platform=linux/arm64`, `app.args.VERSION=2` (KEY+=VALUE appends to a list).
    #[arg(long = "set")]
    pub set: Vec<String>,
    /// Push every target's image (as `--set=*.output=type=registry`).
    #[arg(long)]
    pub push: bool,
    /// Load every target's image into the local Docker engine (as `--set=*.output=type=docker`).
    #[arg(long)]
    pub load: bool,
    /// Print the resolved targets (JSON, as buildx prints them) and build nothing.
    #[arg(long)]
    pub print: bool,
    /// Do not use the cache (every target).
    #[arg(long)]
    pub no_cache: bool,
    /// Always check the registry for newer base images (every target).
    #[arg(long)]
    pub pull: bool,
    /// Progress output: auto, plain, tty, rawjson, quiet or none (several targets at once
    /// show plain output on a terminal too).
    #[arg(long, env = "BUILDKIT_PROGRESS", default_value = "auto")]
    pub progress: String,
    /// A registry to reach over plain HTTP (loopback registries always are).
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// Write the build metadata of every target (JSON, by target name, as buildx bake does).
    #[arg(long = "metadata-file")]
    pub metadata_file: Option<PathBuf>,
    /// Entitlements for every target (network.host, security.insecure); buildx's fs.read=
    /// and fs.write= are accepted and need nothing here (files are read by this client).
    #[arg(long = "allow", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Provenance attestation of every target, as `hoist build --provenance`.
    #[arg(long)]
    pub provenance: Option<String>,
    /// SBOM attestation of every target, as `hoist build --sbom`.
    #[arg(long)]
    pub sbom: Option<String>,
    /// What every target runs: build, or check (as `--set=*.call=check`).
    #[arg(long)]
    pub call: Option<String>,
    /// Shorthand for --call=check.
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// The files read when no `-f` is given, in buildx's order. Of the compose files only the
/// first found is read (as compose does); every bake file found is.
const COMPOSE_FILES: &[&str] = &["compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml"];
const BAKE_FILES: &[&str] = &["docker-bake.json", "docker-bake.hcl", "docker-bake.override.json", "docker-bake.override.hcl"];

/// A group: a name for several targets (or other groups).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Group {
    #[serde(skip)]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub targets: Vec<String>,
}

/// A target as bake files write it (and as `--print` shows it). `None`/empty: not set here,
/// so an inherited or merged value stays.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Target {
    #[serde(skip)]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inherits: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub contexts: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dockerfile_inline: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_from: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_to: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platforms: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_cache: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_cache_filter: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ulimits: Option<Vec<String>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_hosts: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attest: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entitlements: Option<Vec<String>>,
}

/// An attribute's value as a file gives it, before it is put into a [`Target`].
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Str(String),
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

/// Attributes buildx knows that hoist bake accepts and does not use (a warning says so).
const IGNORED_ATTRS: &[&str] = &["policy", "resources"];

fn want_str(key: &str, v: Val) -> Result<Option<String>, String> {
    match v {
        Val::Null => Ok(None),
        Val::Str(s) => Ok(Some(s)),
        Val::Bool(b) => Ok(Some(b.to_string())),
        _ => Err(format!("{key} must be a string")),
    }
}

fn want_list(key: &str, v: Val) -> Result<Option<Vec<String>>, String> {
    match v {
        Val::Null => Ok(None),
        Val::List(l) => Ok(Some(l)),
        Val::Str(s) => Ok(Some(vec![s])),
        _ => Err(format!("{key} must be a list of strings")),
    }
}

fn want_map(key: &str, v: Val) -> Result<BTreeMap<String, String>, String> {
    match v {
        Val::Null => Ok(BTreeMap::new()),
        Val::Map(m) => Ok(m),
        _ => Err(format!("{key} must be a map of strings, e.g. {key} = {{ NAME = \"value\" }}")),
    }
}

fn want_bool(key: &str, v: Val) -> Result<Option<bool>, String> {
    match v {
        Val::Null => Ok(None),
        Val::Bool(b) => Ok(Some(b)),
        Val::Str(s) => parse_bool(&s).map(Some).ok_or_else(|| format!("{key} must be true or false, not {s:?}")),
        _ => Err(format!("{key} must be true or false")),
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    hoist_dockerfile::gocompat::parse_bool(s.trim())
}

impl Target {
    /// Set attribute `key` (as a bake file spells it) from a file. Unknown attributes are an
    /// error; those buildx has and hoist does not use are accepted with a warning.
    pub fn set_attr(&mut self, key: &str, v: Val) -> Result<(), String> {
        match key {
            "description" => self.description = want_str(key, v)?,
            "inherits" => self.inherits = want_list(key, v)?.unwrap_or_default(),
            "context" => self.context = want_str(key, v)?,
            "contexts" => self.contexts = want_map(key, v)?,
            "dockerfile" => self.dockerfile = want_str(key, v)?,
            "dockerfile-inline" => self.dockerfile_inline = want_str(key, v)?,
            "args" => self.args = want_map(key, v)?,
            "labels" => self.labels = want_map(key, v)?,
            "tags" => self.tags = want_list(key, v)?,
            "cache-from" => self.cache_from = want_list(key, v)?,
            "cache-to" => self.cache_to = want_list(key, v)?,
            "target" => self.target = want_str(key, v)?,
            "secret" => self.secret = want_list(key, v)?,
            "ssh" => self.ssh = want_list(key, v)?,
            "platforms" => self.platforms = want_list(key, v)?,
            "output" => self.output = want_list(key, v)?,
            "pull" => self.pull = want_bool(key, v)?,
            "no-cache" => self.no_cache = want_bool(key, v)?,
            "network" => self.network = want_str(key, v)?,
            "no-cache-filter" => self.no_cache_filter = want_list(key, v)?,
            "shm-size" => self.shm_size = want_str(key, v)?,
            "ulimits" => self.ulimits = want_list(key, v)?,
            "extra-hosts" => self.extra_hosts = want_map(key, v)?,
            "annotations" => self.annotations = want_list(key, v)?,
            "attest" => self.attest = want_list(key, v)?,
            "call" => self.call = want_str(key, v)?,
            "entitlements" => self.entitlements = want_list(key, v)?,
            k if IGNORED_ATTRS.contains(&k) => {
                eprintln!("hoist bake: target {:?}: {k} is not supported by hoist bake yet; it is ignored", self.name)
            }
            "matrix" => return Err("matrix targets are not supported by hoist bake yet".into()),
            other => return Err(format!("unknown attribute {other:?}")),
        }
        Ok(())
    }

    /// Merge `t2` over `self`, as buildx merges a target defined twice and a target over the
    /// ones it inherits: single values and tags, platforms, outputs and cache-to are
    /// replaced; maps are merged key by key; cache-from, secrets, ssh, no-cache-filter and
    /// ulimits are joined.
    pub fn merge(&mut self, t2: &Target) {
        fn over<T: Clone>(a: &mut Option<T>, b: &Option<T>) {
            if b.is_some() {
                a.clone_from(b);
            }
        }
        fn join(a: &mut Option<Vec<String>>, b: &Option<Vec<String>>) {
            if let Some(b) = b {
                let a = a.get_or_insert_with(Vec::new);
                for x in b {
                    if !a.contains(x) {
                        a.push(x.clone());
                    }
                }
            }
        }
        over(&mut self.description, &t2.description);
        over(&mut self.context, &t2.context);
        over(&mut self.dockerfile, &t2.dockerfile);
        over(&mut self.dockerfile_inline, &t2.dockerfile_inline);
        over(&mut self.tags, &t2.tags);
        over(&mut self.cache_to, &t2.cache_to);
        over(&mut self.target, &t2.target);
        over(&mut self.platforms, &t2.platforms);
        over(&mut self.output, &t2.output);
        over(&mut self.pull, &t2.pull);
        over(&mut self.no_cache, &t2.no_cache);
        over(&mut self.network, &t2.network);
        over(&mut self.shm_size, &t2.shm_size);
        over(&mut self.call, &t2.call);
        join(&mut self.annotations, &t2.annotations);
        join(&mut self.attest, &t2.attest);
        join(&mut self.entitlements, &t2.entitlements);
        join(&mut self.cache_from, &t2.cache_from);
        join(&mut self.secret, &t2.secret);
        join(&mut self.ssh, &t2.ssh);
        join(&mut self.no_cache_filter, &t2.no_cache_filter);
        join(&mut self.ulimits, &t2.ulimits);
        for (a, b) in [(&mut self.args, &t2.args), (&mut self.labels, &t2.labels), (&mut self.contexts, &t2.contexts)] {
            a.extend(b.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        self.extra_hosts.extend(t2.extra_hosts.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.inherits.extend(t2.inherits.iter().cloned());
    }
}

/// What the files define.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub groups: Vec<Group>,
    pub targets: Vec<Target>,
}

impl Config {
    /// Add `other` (a later file) to this one: a target defined in both is merged, a group's
    /// targets are joined.
    pub fn merge(&mut self, other: Config) {
        for g in other.groups {
            match self.groups.iter_mut().find(|x| x.name == g.name) {
                Some(x) => {
                    for t in g.targets {
                        if !x.targets.contains(&t) {
                            x.targets.push(t);
                        }
                    }
                    if g.description.is_some() {
                        x.description = g.description;
                    }
                }
                None => self.groups.push(g),
            }
        }
        for t in other.targets {
            match self.targets.iter_mut().find(|x| x.name == t.name) {
                Some(x) => x.merge(&t),
                None => self.targets.push(t),
            }
        }
    }

    fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    fn names(&self) -> String {
        let mut all: Vec<&str> = self.groups.iter().map(|g| g.name.as_str()).chain(self.targets.iter().map(|t| t.name.as_str())).collect();
        all.sort();
        all.dedup();
        if all.is_empty() {
            "none".to_string()
        } else {
            all.join(", ")
        }
    }

    /// The names a command-line name stands for: itself, or what a pattern (`*`, `?`) matches.
    fn expand(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        if !pattern.contains(['*', '?']) {
            return Ok(vec![pattern.to_string()]);
        }
        let mut out: Vec<String> =
            self.groups.iter().map(|g| &g.name).chain(self.targets.iter().map(|t| &t.name)).filter(|n| glob(pattern, n)).cloned().collect();
        out.dedup();
        if out.is_empty() {
            bail!("no target or group matches {pattern:?} (defined: {})", self.names());
        }
        Ok(out)
    }

    /// The targets of `name` (a group, expanded through nested groups, or a target), in
    /// order, and the groups met on the way.
    fn resolve_group(&self, name: &str, targets: &mut Vec<String>, groups: &mut Vec<String>) {
        let Some(g) = self.group(name) else {
            if !targets.iter().any(|t| t == name) {
                targets.push(name.to_string());
            }
            return;
        };
        if groups.iter().any(|x| x == name) {
            return;
        }
        groups.push(name.to_string());
        for t in &g.targets {
            self.resolve_group(t, targets, groups);
        }
    }

    /// Target `name` with what it inherits (parents first, in order, each with its own
    /// overrides) and its overrides applied; `chain` is the inherits path (for cycles).
    fn resolve_target(&self, name: &str, sets: &[Override], chain: &mut Vec<String>) -> anyhow::Result<Target> {
        if let Some(i) = chain.iter().position(|c| c == name) {
            let mut cycle = chain[i..].to_vec();
            cycle.push(name.to_string());
            bail!("target {:?} inherits from itself: {}", name, cycle.join(" -> "));
        }
        let Some(t) = self.target(name) else {
            match chain.last() {
                Some(child) => bail!("target {child:?} inherits from {name:?}, which is not defined (defined: {})", self.names()),
                None => bail!("unknown target {name:?} (defined: {})", self.names()),
            }
        };
        chain.push(name.to_string());
        let mut out = Target { name: name.to_string(), ..Target::default() };
        for parent in &t.inherits {
            let p = self.resolve_target(parent, sets, chain)?;
            out.merge(&p);
        }
        chain.pop();
        out.merge(t);
        out.inherits.clear();
        for s in sets.iter().filter(|s| s.applies_to(self, name)) {
            s.apply(&mut out).with_context(|| format!("--set {}", s.raw))?;
        }
        Ok(out)
    }

    /// The targets to build for the names given (none: `default`), each resolved, and the
    /// groups as `--print` shows them (the groups named, and `default` listing the names
    /// given, as buildx prints it).
    pub fn resolve(&self, names: &[String], sets: &[Override]) -> anyhow::Result<(BTreeMap<String, Group>, BTreeMap<String, Target>)> {
        let given: Vec<String> = if names.is_empty() { vec!["default".to_string()] } else { names.to_vec() };
        if names.is_empty() && self.group("default").is_none() && self.target("default").is_none() {
            bail!("no target given and no group or target named \"default\" (defined: {}): name the targets to build", self.names());
        }
        if let Some(s) = sets.iter().find(|s| !self.targets.iter().any(|t| s.applies_to(self, &t.name))) {
            bail!("--set {}: no target matches {:?} (defined: {})", s.raw, s.pattern, self.names());
        }
        let mut expanded = Vec::new();
        for n in &given {
            for e in self.expand(n)? {
                if !expanded.contains(&e) {
                    expanded.push(e);
                }
            }
        }
        let (mut names, mut groups) = (Vec::new(), Vec::new());
        for n in &expanded {
            self.resolve_group(n, &mut names, &mut groups);
        }
        let mut targets = BTreeMap::new();
        for n in &names {
            targets.insert(n.clone(), self.resolve_target(n, sets, &mut Vec::new())?);
        }
        // A `target:NAME` context builds NAME first; a target built only for that has no
        // outputs of its own.
        let mut pending: Vec<String> = names.clone();
        while let Some(n) = pending.pop() {
            let deps: Vec<String> = targets[&n].contexts.values().filter_map(|v| v.strip_prefix("target:")).map(str::to_string).collect();
            for dep in deps {
                if self.target(&dep).is_none() {
                    bail!("target {n:?}: context target:{dep} names no target (defined: {})", self.names());
                }
                if !targets.contains_key(&dep) {
                    let mut t = self.resolve_target(&dep, sets, &mut Vec::new())?;
                    t.output = None;
                    targets.insert(dep.clone(), t);
                    pending.push(dep);
                }
            }
        }
        build_order(&targets)?;
        let mut shown: BTreeMap<String, Group> = groups.iter().filter_map(|g| self.group(g)).map(|g| (g.name.clone(), g.clone())).collect();
        if !(expanded.len() == 1 && expanded[0] == "default" && shown.contains_key("default")) {
            let mut listed = expanded.clone();
            listed.sort();
            shown.insert("default".into(), Group { name: "default".into(), description: None, targets: listed });
        }
        Ok((shown, targets))
    }
}

/// The targets a target's `target:NAME` contexts name.
fn target_deps(t: &Target) -> BTreeSet<&str> {
    t.contexts.values().filter_map(|v| v.strip_prefix("target:")).collect()
}

/// The targets in rounds: each round's targets need only targets of earlier rounds (through
/// `target:` contexts), and build together.
fn build_order(targets: &BTreeMap<String, Target>) -> anyhow::Result<Vec<Vec<String>>> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut rounds = Vec::new();
    while done.len() < targets.len() {
        let round: Vec<String> = targets
            .iter()
            .filter(|(n, t)| !done.contains(n.as_str()) && target_deps(t).iter().all(|d| done.contains(d)))
            .map(|(n, _)| n.clone())
            .collect();
        if round.is_empty() {
            let left: Vec<&str> = targets.keys().map(String::as_str).filter(|n| !done.contains(n)).collect();
            bail!("the targets {} need each other through target: contexts", left.join(", "));
        }
        done.extend(targets.keys().map(String::as_str).filter(|n| round.contains(&n.to_string())));
        rounds.push(round);
    }
    Ok(rounds)
}

/// `*` and `?` wildcards, as Go's path.Match on names without `/`.
fn glob(pattern: &str, name: &str) -> bool {
    fn m(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => m(&p[1..], n) || (!n.is_empty() && m(p, &n[1..])),
            (Some('?'), Some(_)) => m(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &n[1..]),
            _ => false,
        }
    }
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    m(&p, &n)
}

/// One `--set PATTERN.KEY[.NAME][+]=VALUE`.
#[derive(Debug, Clone)]
pub struct Override {
    raw: String,
    pattern: String,
    key: String,
    sub: Option<String>,
    value: Option<String>,
    append: bool,
    /// Whether this is the first `--set` of this list key for these targets (it replaces the
    /// list; later ones add to it, as buildx collects them).
    first: bool,
}

impl Override {
    /// Parse every `--set`.
    pub fn parse_all(sets: &[String]) -> anyhow::Result<Vec<Override>> {
        let mut out: Vec<Override> = Vec::new();
        for raw in sets {
            let (lhs, value) = match raw.split_once('=') {
                Some((l, v)) => (l, Some(v.to_string())),
                None => (raw.as_str(), None),
            };
            let (lhs, append) = match lhs.strip_suffix('+') {
                Some(l) => (l, true),
                None => (lhs, false),
            };
            let mut parts = lhs.splitn(3, '.');
            let (Some(pattern), Some(key)) = (parts.next(), parts.next()) else {
                bail!("--set {raw:?}: expected TARGET.KEY=VALUE, e.g. app.tags=reg/app:1 or *.platform=linux/arm64");
            };
            let sub = parts.next().map(str::to_string);
            let with_name = ["args", "labels", "contexts", "extra-hosts"].contains(&key);
            if with_name && sub.is_none() {
                bail!("--set {raw:?}: {key} needs a name: {pattern}.{key}.NAME=VALUE");
            }
            if !with_name && sub.is_some() {
                bail!("--set {raw:?}: {key} takes no name (expected {pattern}.{key}=VALUE)");
            }
            if value.is_none() && key != "args" {
                bail!("--set {raw:?}: expected TARGET.KEY=VALUE");
            }
            let first = !out.iter().any(|o| o.pattern == pattern && o.key == key);
            out.push(Override { raw: raw.clone(), pattern: pattern.to_string(), key: key.to_string(), sub, value, append, first });
        }
        Ok(out)
    }

    fn applies_to(&self, cfg: &Config, name: &str) -> bool {
        glob(&self.pattern, name)
            || cfg.group(&self.pattern).is_some_and(|_| {
                let (mut ts, mut gs) = (Vec::new(), Vec::new());
                cfg.resolve_group(&self.pattern, &mut ts, &mut gs);
                ts.iter().any(|t| t == name)
            })
    }

    fn apply(&self, t: &mut Target) -> anyhow::Result<()> {
        let sub = self.sub.clone().unwrap_or_default();
        // `--set t.args.NAME` without a value takes it from the environment (unset: no change).
        let Some(value) = self.value.clone().or_else(|| std::env::var(&sub).ok()) else { return Ok(()) };
        let list = |l: &mut Option<Vec<String>>| {
            let l = l.get_or_insert_with(Vec::new);
            if self.first && !self.append {
                l.clear();
            }
            l.push(value.clone());
        };
        let flag = |v: &str| parse_bool(v).ok_or_else(|| anyhow!("expected true or false, not {v:?}"));
        match self.key.as_str() {
            "context" => t.context = Some(value),
            "dockerfile" => t.dockerfile = Some(value),
            "dockerfile-inline" => t.dockerfile_inline = Some(value),
            "target" => t.target = Some(value),
            "network" => t.network = Some(value),
            "shm-size" => t.shm_size = Some(value),
            "call" => t.call = Some(value),
            "args" => drop(t.args.insert(sub, value)),
            "labels" => drop(t.labels.insert(sub, value)),
            "contexts" => drop(t.contexts.insert(sub, value)),
            "extra-hosts" => drop(t.extra_hosts.insert(sub, value)),
            "tags" => list(&mut t.tags),
            "platform" | "platforms" => list(&mut t.platforms),
            "output" => list(&mut t.output),
            "cache-from" => list(&mut t.cache_from),
            "cache-to" => list(&mut t.cache_to),
            "secrets" | "secret" => list(&mut t.secret),
            "ssh" => list(&mut t.ssh),
            "no-cache-filter" => list(&mut t.no_cache_filter),
            "ulimits" => list(&mut t.ulimits),
            "annotations" => list(&mut t.annotations),
            "attest" => list(&mut t.attest),
            "entitlements" => list(&mut t.entitlements),
            "no-cache" => t.no_cache = Some(flag(&value)?),
            "pull" => t.pull = Some(flag(&value)?),
            "push" => {
                if flag(&value)? {
                    add_output(t, "type=registry")
                }
            }
            "load" => {
                if flag(&value)? {
                    add_output(t, "type=docker")
                }
            }
            other => bail!(
                "unknown key {other:?} (expected one of context, dockerfile, args.NAME, labels.NAME, contexts.NAME, tags, platform, output, target, cache-from, cache-to, secrets, ssh, no-cache, pull, push, load, network, no-cache-filter, shm-size, ulimits, annotations, attest, call, entitlements)"
            ),
        }
        Ok(())
    }
}

/// Add output `o` (`type=registry` or `type=docker`, as `--push`/`--load` do) unless the
/// target has it already.
fn add_output(t: &mut Target, o: &str) {
    let outs = t.output.get_or_insert_with(Vec::new);
    if !outs.iter().any(|x| x == o) {
        outs.push(o.to_string());
    }
}

/// A bake file's kind, from its name (else its content).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hcl,
    Json,
    Compose,
}

fn kind_of(name: &str, text: &str) -> Kind {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".yml") || lower.ends_with(".yaml") {
        Kind::Compose
    } else if lower.ends_with(".json") {
        Kind::Json
    } else if lower.ends_with(".hcl") {
        Kind::Hcl
    } else if text.trim_start().starts_with('{') {
        Kind::Json
    } else if text.lines().any(|l| l.starts_with("services:")) {
        Kind::Compose
    } else {
        Kind::Hcl
    }
}

/// The files to read: those given (`-`: stdin), else the defaults found in `dir`.
fn files_to_read(given: &[String], dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !given.is_empty() {
        return Ok(given.iter().map(PathBuf::from).collect());
    }
    // Named as found, relative to `dir` (the current directory), as messages show them.
    let found = |f: &&&str| dir.join(f).is_file();
    let mut out: Vec<PathBuf> = COMPOSE_FILES.iter().filter(found).take(1).map(PathBuf::from).collect();
    out.extend(BAKE_FILES.iter().filter(found).map(PathBuf::from));
    if out.is_empty() {
        bail!(
            "no bake file found in {}: looked for {} and {}; name one with -f",
            dir.display(),
            COMPOSE_FILES.join(", "),
            BAKE_FILES.join(", ")
        );
    }
    Ok(out)
}

/// Read and merge `files` (`-`: stdin; HCL and JSON bake files share their variables, as
/// buildx evaluates them together); `env` is where variables and compose interpolation look.
pub fn load(files: &[PathBuf], env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
    let mut cfg = Config::default();
    let mut bake_files = Vec::new();
    for f in files {
        let text = if f.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading the bake file from stdin")?
        } else {
            std::fs::read_to_string(f).with_context(|| format!("reading bake file {}", f.display()))?
        };
        let name = f.display().to_string();
        match kind_of(&name, &text) {
            Kind::Compose => cfg.merge(compose::parse(f, &text, env)?),
            k => bake_files.push(hcl::File::parse(name, text, k == Kind::Json)?),
        }
    }
    if !bake_files.is_empty() {
        cfg.merge(hcl::evaluate(&bake_files, env)?);
    }
    Ok(cfg)
}

/// Target names as buildx allows them.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The `hoist build` command line of target `t` (its Dockerfile at `inline` when the target
/// gives it inline, its metadata to `metadata`).
fn build_argv(t: &Target, bake: &BakeArgs, progress: &str, inline: Option<&Path>, metadata: Option<&Path>) -> Vec<String> {
    let mut a: Vec<String> = vec!["build".into(), "--progress".into(), progress.into()];
    let mut flag = |f: &str, v: &str| {
        a.push(f.to_string());
        a.push(v.to_string());
    };
    if let Some(m) = metadata {
        flag("--metadata-file", &m.display().to_string());
    }
    // buildx's fs entitlements are about which files bake may read: this client reads
    // what the files name, so they need nothing here.
    let mut allow: Vec<&String> = bake.allow.iter().chain(t.entitlements.iter().flatten()).filter(|e| !e.starts_with("fs")).collect();
    allow.sort();
    allow.dedup();
    for e in allow {
        flag("--allow", e);
    }
    for (f, v) in [("--provenance", &bake.provenance), ("--sbom", &bake.sbom)] {
        if let Some(v) = v {
            flag(f, v);
        }
    }
    let context = t.context.clone().unwrap_or_else(|| ".".into());
    match (inline, &t.dockerfile) {
        (Some(p), _) => flag("--file", &p.display().to_string()),
        // As buildx: a relative Dockerfile is in the context.
        (None, Some(d)) if !Path::new(d).is_absolute() => flag("--file", &Path::new(&context).join(d).display().to_string()),
        (None, Some(d)) => flag("--file", d),
        (None, None) => {}
    }
    for (k, v) in &t.args {
        flag("--build-arg", &format!("{k}={v}"));
    }
    for (k, v) in &t.labels {
        flag("--label", &format!("{k}={v}"));
    }
    for (k, v) in &t.contexts {
        flag("--build-context", &format!("{k}={v}"));
    }
    for (k, v) in &t.extra_hosts {
        flag("--add-host", &format!("{k}:{v}"));
    }
    let lists: [(&str, &Option<Vec<String>>); 9] = [
        ("--annotation", &t.annotations),
        ("--attest", &t.attest),
        ("--tag", &t.tags),
        ("--cache-from", &t.cache_from),
        ("--cache-to", &t.cache_to),
        ("--secret", &t.secret),
        ("--ssh", &t.ssh),
        ("--ulimit", &t.ulimits),
        ("--insecure-registry", &Some(bake.insecure_registries.clone())),
    ];
    for (f, l) in lists {
        for v in l.iter().flatten() {
            flag(f, v);
        }
    }
    if let Some(p) = t.platforms.as_ref().filter(|p| !p.is_empty()) {
        flag("--platform", &p.join(","));
    }
    if let Some(f) = t.no_cache_filter.as_ref().filter(|f| !f.is_empty()) {
        flag("--no-cache-filter", &f.join(","));
    }
    for (f, v) in [("--target", &t.target), ("--network", &t.network), ("--shm-size", &t.shm_size), ("--call", &t.call)] {
        if let Some(v) = v {
            flag(f, v);
        }
    }
    for o in t.output.iter().flatten() {
        // The outputs of --push and --load are hoist build's own flags (they use the tags).
        match o.as_str() {
            "type=registry" | "type=image,push=true" => a.push("--push".into()),
            "type=docker" => a.push("--load".into()),
            other => {
                a.push("--output".into());
                a.push(other.into());
            }
        }
    }
    if t.no_cache == Some(true) || bake.no_cache {
        a.push("--no-cache".into());
    }
    if t.pull == Some(true) || bake.pull {
        a.push("--pull".into());
    }
    a.dedup();
    a.push(context);
    a
}

#[derive(Parser)]
#[command(name = "hoist")]
struct OneBuild {
    #[command(subcommand)]
    build: OneBuildCmd,
}

#[derive(clap::Subcommand)]
enum OneBuildCmd {
    Build(Box<BuildArgs>),
}

/// Target `t` as the arguments of one `hoist build`.
fn build_args(t: &Target, bake: &BakeArgs, progress: &str, inline: Option<&Path>, metadata: Option<&Path>) -> anyhow::Result<BuildArgs> {
    let argv = build_argv(t, bake, progress, inline, metadata);
    let parsed = OneBuild::try_parse_from(std::iter::once("hoist".to_string()).chain(argv)).map_err(|e| {
        let e = e.to_string();
        let e = e.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
        anyhow!("target {:?}: {e}", t.name)
    })?;
    let OneBuildCmd::Build(mut args) = parsed.build;
    args.conn = bake.conn.clone();
    Ok(*args)
}

/// The resolved targets and groups, as `docker buildx bake --print` prints them.
pub fn print_json(groups: &BTreeMap<String, Group>, targets: &BTreeMap<String, Target>) -> String {
    let mut targets = targets.clone();
    for t in targets.values_mut() {
        t.context.get_or_insert_with(|| ".".into());
        if t.dockerfile_inline.is_none() {
            t.dockerfile.get_or_insert_with(|| "Dockerfile".into());
        }
    }
    serde_json::to_string_pretty(&serde_json::json!({ "group": groups, "target": targets })).unwrap_or_default()
}

/// Run `hoist bake`; returns the exit code (1 when any target failed).
pub async fn run(mut bake: BakeArgs) -> anyhow::Result<i32> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let files = files_to_read(&bake.files, &cwd)?;
    let cfg = load(&files, &|k| std::env::var(k).ok())?;
    let mut sets = Override::parse_all(&bake.set)?;
    for (on, o) in [(bake.push, "push"), (bake.load, "load")] {
        if on {
            sets.extend(Override::parse_all(&[format!("*.{o}=true")])?);
        }
    }
    if let Some(call) = bake.call.clone().or_else(|| bake.check.then(|| "check".to_string())) {
        sets.extend(Override::parse_all(&[format!("*.call={call}")])?);
    }
    let (groups, targets) = cfg.resolve(&bake.targets, &sets)?;
    if bake.print {
        println!("{}", print_json(&groups, &targets));
        return Ok(0);
    }
    let terminal = std::io::stderr().is_terminal();
    // Several live views cannot share one terminal: several targets show plain lines.
    let progress = match crate::progress::Mode::parse(&bake.progress, terminal)? {
        crate::progress::Mode::Tty if targets.len() > 1 => "plain".to_string(),
        _ => bake.progress.clone(),
    };
    let tmp = tempfile::tempdir().context("creating a directory for inline Dockerfiles")?;
    let rounds = build_order(&targets)?;
    // A target another one builds on (`target:NAME`) also goes to an OCI layout, which the
    // other reads as `oci-layout://`.
    let needed: BTreeSet<String> = targets.values().flat_map(|t| target_deps(t)).map(str::to_string).collect();
    let layout = |name: &str| tmp.path().join(format!("{name}.layout"));
    let layout_tar = |name: &str| tmp.path().join(format!("{name}.oci.tar"));
    let mut jobs = Vec::new();
    for (name, t) in &targets {
        let mut t = t.clone();
        for v in t.contexts.values_mut() {
            if let Some(dep) = v.strip_prefix("target:") {
                *v = format!("oci-layout://{}", layout(dep).display());
            }
        }
        if needed.contains(name) {
            t.output.get_or_insert_with(Vec::new).push(format!("type=oci,dest={}", layout_tar(name).display()));
        }
        let t = &t;
        let inline = match &t.dockerfile_inline {
            Some(text) => {
                let p = tmp.path().join(format!("{name}.Dockerfile"));
                std::fs::write(&p, text).with_context(|| format!("writing the inline Dockerfile of target {name:?}"))?;
                Some(p)
            }
            None => None,
        };
        let metadata = bake.metadata_file.as_ref().map(|_| tmp.path().join(format!("{name}.metadata.json")));
        jobs.push((name.clone(), build_args(t, &bake, &progress, inline.as_deref(), metadata.as_deref())?));
    }
    bake.conn.resolve_builders(Some(&cwd))?;
    let mut sessions = connect_projects(&jobs).await?;
    // (The first round's: later ones read layouts that do not exist yet.)
    let first: Vec<&(String, BuildArgs)> = jobs.iter().filter(|(n, _)| rounds[0].contains(n)).collect();
    presync_shared_contexts(&first, &mut sessions, &progress, terminal).await?;
    let started = Instant::now();
    let mut jobs: HashMap<String, BuildArgs> = jobs.into_iter().collect();
    let mut results = Vec::new();
    let mut broken: BTreeSet<String> = BTreeSet::new();
    for round in &rounds {
        let builds = round.iter().map(|name| {
            let args = jobs.remove(name);
            let shared = args.as_ref().and_then(|a| session_of(a, &sessions));
            let failed_dep = targets.get(name).and_then(|t| target_deps(t).into_iter().find(|d| broken.contains(*d))).map(str::to_string);
            let (name, layout, layout_tar) = (name.clone(), layout(name), layout_tar(name));
            let needed = needed.contains(&name);
            async move {
                let t = Instant::now();
                let r = match (args, failed_dep) {
                    (_, Some(dep)) => Err(anyhow!("not built: it builds on target {dep:?}, which failed")),
                    (None, None) => Err(anyhow!("internal error: no build for target {name:?}")),
                    (Some(args), None) => match crate::build::run_on(args, shared).await {
                        Ok(0) if needed => unpack_layout(&layout_tar, &layout).map(|_| 0),
                        r => r,
                    },
                };
                (name, t.elapsed().as_secs_f64(), r)
            }
        });
        for r in futures::future::join_all(builds).await {
            if !matches!(r.2, Ok(0)) {
                broken.insert(r.0.clone());
            }
            results.push(r);
        }
    }
    let mut failed = 0;
    for (name, secs, r) in &results {
        let tags = targets.get(name).and_then(|t| t.tags.clone()).unwrap_or_default();
        match r {
            Ok(0) => eprintln!(
                "hoist bake: [{name}] done in {secs:.1}s{}",
                if tags.is_empty() { String::new() } else { format!(": {}", tags.join(", ")) }
            ),
            Ok(code) => {
                failed += 1;
                eprintln!("hoist bake: [{name}] stopped (exit code {code})");
            }
            Err(e) => {
                failed += 1;
                eprintln!("hoist bake: [{name}] failed: {e:#}");
            }
        }
    }
    if let Some(path) = &bake.metadata_file {
        // As buildx bake writes it: each target's build metadata under its name.
        let mut all = serde_json::Map::new();
        for name in targets.keys() {
            if let Ok(b) = std::fs::read(tmp.path().join(format!("{name}.metadata.json"))) {
                all.insert(name.clone(), serde_json::from_slice(&b).unwrap_or_default());
            }
        }
        std::fs::write(path, serde_json::to_vec_pretty(&all)?).with_context(|| format!("writing --metadata-file {}", path.display()))?;
    }
    eprintln!("hoist bake: {} of {} targets built in {:.1}s", results.len() - failed, results.len(), started.elapsed().as_secs_f64());
    Ok(if failed > 0 { 1 } else { 0 })
}

/// Extract the OCI layout a target was exported to (for the targets that build on it).
fn unpack_layout(tar: &Path, dir: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(tar).with_context(|| format!("opening {}", tar.display()))?;
    tar::Archive::new(f).unpack(dir).with_context(|| format!("extracting the OCI layout {}", tar.display()))
}

/// One connection per builder and project, shared by the targets that build there (a
/// connection carries its project, and a context's `hoist.json` may name another project or
/// builder). Targets with a URL context, known only once fetched, and fleets (each platform
/// routed to its own builder) connect on their own.
type Sessions = HashMap<SessionKey, hoist_client::Client>;

/// The builder (`None`: the embedded one) and the project a target connects with.
type SessionKey = (Option<String>, Option<String>);

/// Where target `args` would connect, as `hoist build` resolves it; `None` when it does not
/// share a connection.
fn session_key(args: &BuildArgs) -> Option<(SessionKey, PathBuf, Option<hoist_client::BuilderAddr>)> {
    let dir = std::fs::canonicalize(&args.context).ok()?;
    let mut conn = args.conn.clone();
    conn.resolve_builders(Some(&dir)).ok()?;
    let addrs = conn.addrs().ok()?;
    if addrs.len() > 1 {
        return None;
    }
    let project = conn.project_for(Some(&dir)).ok()?;
    let addr = addrs.into_iter().next();
    Some(((addr.as_ref().map(ToString::to_string), project), dir, addr))
}

async fn connect_projects(jobs: &[(String, BuildArgs)]) -> anyhow::Result<Sessions> {
    let mut sessions = Sessions::new();
    for (_, a) in jobs {
        let Some((key, dir, addr)) = session_key(a) else { continue };
        if let std::collections::hash_map::Entry::Vacant(slot) = sessions.entry(key) {
            slot.insert(a.conn.connect_to(addr, Some(&dir)).await?);
        }
    }
    Ok(sessions)
}

/// The shared connection a target builds on, if it has one.
fn session_of(args: &BuildArgs, sessions: &Sessions) -> Option<hoist_client::Client> {
    sessions.get(&session_key(args)?.0).cloned()
}

/// Targets that share a context directory would each find the same files missing on the
/// builder if they synced at once, and upload them twice: sync those contexts first, one
/// target after the other over the project's connection (each sends only what the builder
/// still lacks), so that the builds, started together, find every file there.
async fn presync_shared_contexts(
    jobs: &[&(String, BuildArgs)],
    sessions: &mut Sessions,
    progress: &str,
    terminal: bool,
) -> anyhow::Result<()> {
    let mut by_dir: HashMap<PathBuf, usize> = HashMap::new();
    for (_, a) in jobs.iter().copied() {
        if let Ok(d) = std::fs::canonicalize(&a.context) {
            *by_dir.entry(d).or_default() += 1;
        }
    }
    let shared: BTreeSet<PathBuf> = by_dir.into_iter().filter(|(_, n)| *n > 1).map(|(d, _)| d).collect();
    if shared.is_empty() || sessions.is_empty() {
        return Ok(());
    }
    let mode = crate::progress::Mode::parse(progress, terminal)?;
    let mut renderer = crate::progress::Renderer::new(mode);
    for (name, a) in jobs.iter().copied() {
        let Ok(dir) = std::fs::canonicalize(&a.context) else { continue };
        if !shared.contains(&dir) {
            continue;
        }
        let Some(client) = session_key(a).and_then(|(key, ..)| sessions.get_mut(&key)) else { continue };
        let inputs = crate::build::read_inputs(a)?;
        let ignore = crate::build::ignore_matcher(&inputs)?;
        crate::build::sync_context(client, &inputs, ignore.as_ref(), &mut renderer, &format!("[{name}] load build context (shared)"))
            .await?;
    }
    renderer.finish();
    Ok(())
}

#[cfg(test)]
mod tests;
