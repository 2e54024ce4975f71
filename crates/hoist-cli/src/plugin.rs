//! Docker CLI integration: `hoist configure-docker [--uninstall]`, and hoist run as a Docker
//! CLI plugin.
//!
//! `hoist configure-docker` puts two symlinks to the running hoist binary into the user's
//! plugin directory (`$DOCKER_CONFIG/cli-plugins`, default `~/.docker/cli-plugins`):
//! `docker-hoist` (`docker hoist build …` is `hoist build …`) and `docker-buildx`, a shim that
//! runs `docker buildx build` (buildx's flags) as `hoist build`. It also sets
//! `"aliases": {"builder": "buildx"}` in the Docker config, with which the Docker CLI runs
//! `docker build` and `docker image build` as `docker buildx build`: 20.10 whatever
//! `DOCKER_BUILDKIT` says, 23.0 and later unless `DOCKER_BUILDKIT=0`. Symlinks rather than
//! copies: an upgraded hoist is the plugin at once and nothing large is duplicated; the Docker
//! CLI runs a plugin by the link's own path, so argv[0] still names the plugin.
//!
//! What was there before is kept in `cli-plugins/.hoist/`, a directory the Docker CLI does not
//! scan (plugin files start with `docker-`): the user's own `docker-buildx` or `docker-hoist`,
//! moved there, and `state.json`, the config's previous `builder` alias. `--uninstall` puts
//! them back. The shim hands the buildx subcommands hoist does not run (`ls`, `inspect`,
//! `create`, `use`, `du`, `prune`, `version`…) to the previous buildx: the user's kept one,
//! else the first in the Docker CLI's other plugin directories.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The subcommand with which the Docker CLI asks a plugin for its metadata.
const METADATA: &str = "docker-cli-plugin-metadata";
/// The plugin files hoist installs.
const PLUGINS: [&str; 2] = ["docker-hoist", "docker-buildx"];
/// Inside the plugin directory: what hoist replaced, and `state.json`.
const KEEP_DIR: &str = ".hoist";
/// The Docker CLI's system plugin directories on Linux, in its order of preference (after
/// `cliPluginsExtraDirs` of the config and the user's directory).
const SYSTEM_PLUGIN_DIRS: [&str; 4] = [
    "/usr/local/lib/docker/cli-plugins",
    "/usr/local/libexec/docker/cli-plugins",
    "/usr/lib/docker/cli-plugins",
    "/usr/libexec/docker/cli-plugins",
];
/// The buildx release whose interface the shim stands for. Compose, which runs
/// `docker-buildx bake` itself, refuses a buildx older than 0.17.0 by the plugin's version.
const BUILDX_COMPAT: &str = "0.17.0";

/// `hoist configure-docker`.
#[derive(clap::Args, Debug)]
pub struct ConfigureArgs {
    /// Undo it: remove hoist's plugins and put back the plugin files and the `builder` alias
    /// that were there before.
    #[arg(long)]
    pub uninstall: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plugin {
    Hoist,
    Buildx,
}

impl Plugin {
    fn name(self) -> &'static str {
        match self {
            Plugin::Hoist => "hoist",
            Plugin::Buildx => "buildx",
        }
    }

    /// The answer to `docker-<name> docker-cli-plugin-metadata`.
    fn metadata(self) -> Value {
        let hoist = env!("CARGO_PKG_VERSION");
        let (version, about) = match self {
            Plugin::Hoist => (hoist.to_string(), "Build images on hoist's shared-cache builder"),
            Plugin::Buildx => (format!("v{BUILDX_COMPAT}+hoist.{hoist}"), "docker build and docker buildx build through hoist"),
        };
        serde_json::json!({"SchemaVersion": "0.1.0", "Vendor": "hoist", "Version": version, "ShortDescription": about})
    }
}

/// What to do with a command line.
#[derive(Debug, PartialEq)]
enum Route {
    /// Not run as a plugin: hoist's own command line.
    NotPlugin,
    /// The Docker CLI asks for the plugin's metadata.
    Metadata(Plugin),
    /// Run hoist with this command line.
    Hoist(Vec<OsString>),
    /// A buildx subcommand hoist does not run: the previous buildx runs it.
    Delegate,
}

/// When this process runs as a Docker CLI plugin, the hoist command line it stands for;
/// `None` when it does not. Answers the metadata request, and hands the buildx subcommands
/// hoist does not run to the previous buildx, itself (neither returns). `command` is hoist's
/// CLI definition (a `bake` of hoist runs `docker buildx bake`, when hoist has one).
pub fn hoist_args(command: fn() -> clap::Command) -> Option<Vec<OsString>> {
    let args: Vec<OsString> = std::env::args_os().collect();
    match route(&args, |sub| command().find_subcommand(sub).is_some()) {
        Route::NotPlugin => None,
        Route::Hoist(argv) => Some(argv),
        Route::Metadata(p) => {
            println!("{}", p.metadata());
            std::process::exit(0)
        }
        Route::Delegate => delegate(&args),
    }
}

/// The plugin is named by argv[0] (`docker-hoist`, `docker-buildx`: the Docker CLI runs the
/// file by its path), or by the first argument when a wrapper runs `hoist` itself. The
/// Docker CLI passes the plugin's name as the first argument (`docker-buildx buildx build …`);
/// Compose runs `docker-buildx bake …` without it.
fn route(args: &[OsString], hoist_has: impl Fn(&str) -> bool) -> Route {
    let arg = |i: usize| args.get(i).and_then(|a| a.to_str());
    let (plugin, rest) = match args.first().map(Path::new).and_then(Path::file_name).and_then(|n| n.to_str()) {
        Some("docker-hoist") => (Plugin::Hoist, &args[1..]),
        Some("docker-buildx") => (Plugin::Buildx, &args[1..]),
        _ => match arg(1) {
            Some(METADATA | "hoist") => (Plugin::Hoist, &args[1..]),
            Some("buildx") => (Plugin::Buildx, &args[1..]),
            _ => return Route::NotPlugin,
        },
    };
    let first = rest.first().and_then(|a| a.to_str());
    if first == Some(METADATA) {
        return Route::Metadata(plugin);
    }
    let rest = if first == Some(plugin.name()) { &rest[1..] } else { rest };
    let hoist = |sub: &str, args: Vec<OsString>| Route::Hoist([OsString::from("hoist"), sub.into()].into_iter().chain(args).collect());
    match plugin {
        Plugin::Hoist => Route::Hoist(std::iter::once(OsString::from("hoist")).chain(rest.iter().cloned()).collect()),
        Plugin::Buildx => {
            // buildx's global flags come before its subcommand.
            let mut i = 0;
            let mut global = Vec::new();
            while let Some(a) = rest.get(i).and_then(|a| a.to_str()).filter(|a| a.starts_with('-')) {
                let taken = if a == "--builder" { 2 } else { 1 };
                global.extend_from_slice(&rest[i..(i + taken).min(rest.len())]);
                i += taken;
            }
            let sub = rest.get(i).and_then(|a| a.to_str());
            let tail = || global.iter().chain(&rest[(i + 1).min(rest.len())..]).cloned().collect::<Vec<_>>();
            match sub {
                Some("build" | "b") => hoist("build", build_flags(&tail())),
                Some("bake") if hoist_has("bake") => hoist("bake", hoist_flags(&tail()).0),
                _ => Route::Delegate,
            }
        }
    }
}

/// buildx's flags as hoist's: `--builder NAME` names a buildx builder instance, which means
/// nothing to hoist, and is dropped unless it is a hoist builder address (`tcp://…`,
/// `tls://…`, `unix://…`); `--debug`/`-D` are dropped. Also says whether an output was asked
/// for (`--load`, `--push`, `-o`), or no image at all (`--call`, `--check`).
fn hoist_flags(args: &[OsString]) -> (Vec<OsString>, bool) {
    let mut out = Vec::new();
    let mut output = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else {
            out.push(a.clone());
            continue;
        };
        let builder = match s {
            "--" => {
                out.push(a.clone());
                out.extend(it.by_ref().cloned());
                break;
            }
            "--debug" | "-D" => continue,
            "--builder" => it.next().and_then(|v| v.to_str()),
            _ => s.strip_prefix("--builder="),
        };
        if s == "--builder" || s.starts_with("--builder=") {
            if let Some(b) = builder.filter(|b| b.split(',').all(|b| hoist_client::BuilderAddr::parse(b.trim()).is_ok())) {
                out.push(format!("--builder={b}").into());
            }
            continue;
        }
        let flag = s.split('=').next().unwrap_or(s);
        output |= matches!(flag, "--load" | "--push" | "--output" | "--call" | "--check") || s.starts_with("-o");
        out.push(a.clone());
    }
    (out, output)
}

/// `buildx build`'s flags as `hoist build`'s. Without an output, buildx's default builder
/// (the engine's own) leaves the image in the engine: hoist then loads it (`--load`).
fn build_flags(args: &[OsString]) -> Vec<OsString> {
    let (mut out, output) = hoist_flags(args);
    if !output {
        out.insert(0, "--load".into());
    }
    out
}

/// Run the previous buildx with this process's arguments, or say there is none.
fn delegate(args: &[OsString]) -> ! {
    let mut keep_dirs = Vec::new();
    if let Some(dir) = args.first().map(Path::new).and_then(Path::parent).filter(|d| !d.as_os_str().is_empty()) {
        keep_dirs.push(dir.join(KEEP_DIR));
    }
    let config = hoist_oci::auth::docker_config_path();
    if let Some(dir) = config.as_deref().and_then(Path::parent) {
        keep_dirs.push(dir.join("cli-plugins").join(KEEP_DIR));
    }
    let dirs = buildx_dirs(keep_dirs, &config.as_deref().and_then(|c| read_config(c).ok().flatten()).unwrap_or_default());
    let me = std::env::current_exe().ok();
    match previous_buildx(&dirs, me.as_deref()) {
        Some(buildx) => {
            let err = std::process::Command::new(&buildx).args(&args[1..]).exec();
            eprintln!("error: running {}: {err}", buildx.display());
        }
        None => {
            let words: Vec<_> = args[1..].iter().map(|a| a.to_string_lossy()).collect();
            let words = words.strip_prefix(&["buildx".into()]).unwrap_or(&words).join(" ");
            let looked: Vec<_> = dirs.iter().map(|d| d.display().to_string()).collect();
            eprintln!(
                "error: `docker buildx {words}`: hoist runs `docker buildx build` (and `docker build`); the other buildx \
                 commands go to the buildx that was installed before `hoist configure-docker`, and there is none (looked for \
                 docker-buildx in {}). Install buildx (it is used from then on), or undo with `hoist configure-docker --uninstall`.",
                looked.join(", ")
            );
        }
    }
    std::process::exit(1)
}

/// The first `docker-buildx` in `dirs` that is not this hoist binary.
fn previous_buildx(dirs: &[PathBuf], me: Option<&Path>) -> Option<PathBuf> {
    let me = me.and_then(|m| std::fs::canonicalize(m).ok());
    dirs.iter().map(|d| d.join("docker-buildx")).find(|p| p.is_file() && std::fs::canonicalize(p).ok() != me)
}

/// Where the previous buildx is looked for: the directories hoist kept the user's in, then
/// the Docker CLI's other plugin directories in its order (`cliPluginsExtraDirs` of the
/// config, the system's).
fn buildx_dirs(keep_dirs: Vec<PathBuf>, config: &Map<String, Value>) -> Vec<PathBuf> {
    let extra = config.get("cliPluginsExtraDirs").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str);
    keep_dirs.into_iter().chain(extra.map(PathBuf::from)).chain(SYSTEM_PLUGIN_DIRS.iter().map(PathBuf::from)).collect()
}

/// What `hoist configure-docker` changed in the Docker config, to put back.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct State {
    /// Whether config.json existed.
    config_existed: bool,
    /// Whether it had `aliases`.
    had_aliases: bool,
    /// Its `aliases.builder`, if any.
    builder_alias: Option<String>,
    /// Whether hoist put the plugin directory first in `cliPluginsExtraDirs`.
    #[serde(default)]
    extra_dir_added: bool,
}

impl State {
    fn of(config: Option<&Map<String, Value>>) -> State {
        let aliases = config.and_then(|c| c.get("aliases"));
        State {
            config_existed: config.is_some(),
            had_aliases: aliases.is_some(),
            builder_alias: aliases.and_then(|a| a.get("builder")).and_then(Value::as_str).map(str::to_string),
            extra_dir_added: false,
        }
    }
}

/// The Docker CLI searches `cliPluginsExtraDirs` before the user's plugin directory. When one
/// of them holds a plugin of hoist's names (Docker Desktop's buildx), `dir` goes first in that
/// list so that hoist's run. True when it was added.
fn put_first_in_extra_dirs(config: &mut Map<String, Value>, dir: &Path) -> bool {
    let Some(Value::Array(dirs)) = config.get_mut("cliPluginsExtraDirs") else { return false };
    let dir = dir.to_string_lossy();
    if dirs.first().and_then(Value::as_str) == Some(&*dir) {
        return false;
    }
    let shadowed = dirs.iter().filter_map(Value::as_str).any(|d| PLUGINS.iter().any(|p| Path::new(d).join(p).is_file()));
    if shadowed {
        dirs.insert(0, Value::from(&*dir));
    }
    shadowed
}

/// Undo [`put_first_in_extra_dirs`]; true when `dir` was there.
fn remove_from_extra_dirs(config: &mut Map<String, Value>, dir: &Path) -> bool {
    let Some(Value::Array(dirs)) = config.get_mut("cliPluginsExtraDirs") else { return false };
    let dir = dir.to_string_lossy();
    let Some(i) = dirs.iter().position(|d| d.as_str() == Some(&*dir)) else { return false };
    dirs.remove(i);
    true
}

/// Point the `builder` alias at buildx (hoist's shim).
fn set_builder_alias(config: &mut Map<String, Value>, path: &Path) -> anyhow::Result<()> {
    match config.entry("aliases").or_insert_with(|| Value::Object(Map::new())) {
        Value::Object(aliases) => {
            aliases.insert("builder".into(), "buildx".into());
            Ok(())
        }
        _ => bail!("{}: \"aliases\" is not an object; fix it and run hoist configure-docker again", path.display()),
    }
}

/// Put back the `builder` alias `state` recorded; false (nothing done) when it no longer
/// points at buildx, that is when someone changed it since.
fn restore_builder_alias(config: &mut Map<String, Value>, state: &State) -> bool {
    let Some(Value::Object(aliases)) = config.get_mut("aliases") else { return false };
    if aliases.get("builder").and_then(Value::as_str) != Some("buildx") {
        return false;
    }
    match &state.builder_alias {
        Some(previous) => {
            aliases.insert("builder".into(), previous.as_str().into());
        }
        None => {
            aliases.remove("builder");
            if aliases.is_empty() && !state.had_aliases {
                config.remove("aliases");
            }
        }
    }
    true
}

/// The Docker config (`None`: there is none).
fn read_config(path: &Path) -> anyhow::Result<Option<Map<String, Value>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => bail!("{}: not a JSON object; fix it, or move it away", path.display()),
        Err(e) => bail!("{}: not valid JSON ({e}); fix it, or move it away", path.display()),
    }
}

/// Write the Docker config as the Docker CLI does (tab-indented, through a symlink, into a
/// temporary file renamed over it), keeping its mode (0600 for a new one: it holds
/// credentials).
fn write_config(path: &Path, config: &Map<String, Value>) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o600);
    let mut bytes = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut bytes, serde_json::ser::PrettyFormatter::with_indent(b"\t"));
    serde::Serialize::serialize(config, &mut ser)?;
    let tmp = path.with_file_name(format!(".config.json.hoist-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(mode).open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

fn write_state(path: &Path, state: &State) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(state)?).with_context(|| format!("writing {}", path.display()))
}

fn read_state(path: &Path) -> anyhow::Result<Option<State>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).with_context(|| format!("{} is not valid JSON", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Whether `path` is one of hoist's links (to a binary named as this one).
fn is_hoist_link(path: &Path, me: &Path) -> bool {
    std::fs::read_link(path).is_ok_and(|t| t.file_name() == me.file_name())
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// `hoist configure-docker [--uninstall]`.
pub fn configure_docker(args: ConfigureArgs) -> anyhow::Result<()> {
    let config = hoist_oci::auth::docker_config_path().context("neither DOCKER_CONFIG nor HOME is set: no Docker config to configure")?;
    let dir = config.parent().context("the Docker config has no directory")?.join("cli-plugins");
    let me = std::env::current_exe().context("locating the hoist binary")?;
    if args.uninstall {
        uninstall(&config, &dir, &me)
    } else {
        install(&config, &dir, &me)
    }
}

fn install(config_path: &Path, dir: &Path, me: &Path) -> anyhow::Result<()> {
    let keep = dir.join(KEEP_DIR);
    std::fs::create_dir_all(&keep).with_context(|| format!("creating {}", keep.display()))?;
    let mut config = read_config(config_path)?;
    // The first run records the state before it; a later one finds its own links and alias.
    let state_path = keep.join("state.json");
    let mut state = match read_state(&state_path)? {
        Some(s) => s,
        None => {
            let s = State::of(config.as_ref());
            write_state(&state_path, &s)?;
            s
        }
    };
    for name in PLUGINS {
        let path = dir.join(name);
        if is_hoist_link(&path, me) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        } else if exists(&path) {
            std::fs::rename(&path, keep.join(name)).with_context(|| format!("moving {} into {}", path.display(), keep.display()))?;
        }
        std::os::unix::fs::symlink(me, &path).with_context(|| format!("linking {} to {}", path.display(), me.display()))?;
    }
    let config = config.get_or_insert_with(Map::new);
    set_builder_alias(config, config_path)?;
    let first = put_first_in_extra_dirs(config, dir);
    if first {
        state.extra_dir_added = true;
        write_state(&state_path, &state)?;
    }
    write_config(config_path, config)?;

    let buildx = previous_buildx(&buildx_dirs(vec![keep], config), Some(me));
    println!("hoist is a Docker CLI plugin in {} (symlinks to {}):", dir.display(), me.display());
    println!("  docker hoist build ...   docker-hoist");
    println!("  docker buildx build ...  docker-buildx, hoist's shim");
    println!("  docker build ...         \"aliases\": {{\"builder\": \"buildx\"}} in {}", config_path.display());
    match buildx {
        Some(b) => println!("buildx's other commands (ls, inspect, create, use, prune, ...) run {}", b.display()),
        None => println!("buildx's other commands (ls, inspect, create, ...) fail: no buildx was installed"),
    }
    if first {
        println!("  and {} goes first in cliPluginsExtraDirs: the docker-buildx of a directory there ran before", dir.display());
    }
    println!("undo: hoist configure-docker --uninstall");
    Ok(())
}

fn uninstall(config_path: &Path, dir: &Path, me: &Path) -> anyhow::Result<()> {
    let keep = dir.join(KEEP_DIR);
    let state_path = keep.join("state.json");
    let Some(state) = read_state(&state_path)? else {
        println!("hoist is not configured in {}: nothing to undo", dir.display());
        return Ok(());
    };
    for name in PLUGINS {
        let path = dir.join(name);
        if is_hoist_link(&path, me) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        let kept = keep.join(name);
        if !exists(&kept) {
            continue;
        }
        if exists(&path) {
            eprintln!(
                "warning: {} was replaced since hoist configure-docker; it stays, and the one before is {}",
                path.display(),
                kept.display()
            );
        } else {
            std::fs::rename(&kept, &path).with_context(|| format!("moving {} back to {}", kept.display(), path.display()))?;
            println!("restored {}", path.display());
        }
    }
    if let Some(mut config) = read_config(config_path)? {
        let restored = restore_builder_alias(&mut config, &state);
        let removed = state.extra_dir_added && remove_from_extra_dirs(&mut config, dir);
        if restored || removed {
            if !state.config_existed && config.is_empty() {
                std::fs::remove_file(config_path).with_context(|| format!("removing {}", config_path.display()))?;
            } else {
                write_config(config_path, &config)?;
            }
        }
        match (&state.builder_alias, restored) {
            (_, false) => {
                eprintln!("warning: the \"builder\" alias in {} was changed since hoist configure-docker; it stays", config_path.display())
            }
            (Some(a), true) => println!("restored \"aliases\": {{\"builder\": {a:?}}} in {}", config_path.display()),
            (None, true) => println!("removed the \"builder\" alias from {}", config_path.display()),
        }
    }
    std::fs::remove_file(&state_path).with_context(|| format!("removing {}", state_path.display()))?;
    let _ = std::fs::remove_dir(&keep); // only when empty: a kept file stays with it
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn hoist(a: &[&str]) -> Route {
        Route::Hoist(args(a))
    }

    fn no_bake(_: &str) -> bool {
        false
    }

    #[test]
    fn plugin_names_and_metadata() {
        assert_eq!(route(&args(&["hoist", "build", "."]), no_bake), Route::NotPlugin);
        assert_eq!(route(&args(&["/usr/bin/hoist"]), no_bake), Route::NotPlugin);
        let p = "/home/u/.docker/cli-plugins/docker-buildx";
        assert_eq!(route(&args(&[p, METADATA]), no_bake), Route::Metadata(Plugin::Buildx));
        assert_eq!(route(&args(&["docker-hoist", METADATA]), no_bake), Route::Metadata(Plugin::Hoist));
        assert_eq!(route(&args(&["hoist", METADATA]), no_bake), Route::Metadata(Plugin::Hoist), "a wrapper running hoist");
        let m = Plugin::Buildx.metadata();
        assert_eq!(m["SchemaVersion"], "0.1.0");
        assert_eq!(m["Vendor"], "hoist");
        assert!(m["Version"].as_str().unwrap().starts_with("v0.17.0+hoist."), "Compose compares it with 0.17.0: {m}");
    }

    #[test]
    fn docker_hoist_is_hoist() {
        assert_eq!(
            route(&args(&["/x/docker-hoist", "hoist", "build", "-t", "a", "."]), no_bake),
            hoist(&["hoist", "build", "-t", "a", "."])
        );
        assert_eq!(route(&args(&["/x/docker-hoist", "hoist", "builds", "ls"]), no_bake), hoist(&["hoist", "builds", "ls"]));
        assert_eq!(route(&args(&["hoist", "hoist", "--version"]), no_bake), hoist(&["hoist", "--version"]));
    }

    #[test]
    fn buildx_build_maps_onto_hoist_build() {
        let x = "/x/docker-buildx";
        // `docker build -t a .` through the alias: the image lands in the engine, as with
        // buildx's default builder.
        assert_eq!(route(&args(&[x, "buildx", "build", "-t", "a", "."]), no_bake), hoist(&["hoist", "build", "--load", "-t", "a", "."]));
        // Run directly (as Compose does), with buildx's short alias of build.
        assert_eq!(route(&args(&[x, "b", "--push", "-t", "r/a", "."]), no_bake), hoist(&["hoist", "build", "--push", "-t", "r/a", "."]));
        for output in
            [&["--load"][..], &["-o", "type=local,dest=out"], &["-otype=tar,dest=x"], &["--output=out"], &["--call=check"], &["--check"]]
        {
            let mut a = args(&[x, "buildx", "build"]);
            a.extend(args(output));
            a.push(".".into());
            let Route::Hoist(h) = route(&a, no_bake) else { panic!("{a:?}") };
            assert_eq!(h.iter().filter(|f| *f == "--load").count(), usize::from(output == ["--load"]), "{output:?}: {h:?}");
        }
    }

    #[test]
    fn buildx_builder_and_debug_flags_do_not_reach_hoist_unless_they_name_a_hoist_builder() {
        let x = "/x/docker-buildx";
        let a = args(&[x, "buildx", "--builder", "default", "-D", "build", "--builder=mybuilder", "--debug", "--load", "."]);
        assert_eq!(route(&a, no_bake), hoist(&["hoist", "build", "--load", "."]));
        let a = args(&[x, "buildx", "--builder", "tcp://127.0.0.1:7420", "build", "--load", "."]);
        assert_eq!(route(&a, no_bake), hoist(&["hoist", "build", "--builder=tcp://127.0.0.1:7420", "--load", "."]));
        let a = args(&[x, "buildx", "build", "--builder", "tls://a:1,tls://b:1", "--load", "--", "."]);
        assert_eq!(route(&a, no_bake), hoist(&["hoist", "build", "--builder=tls://a:1,tls://b:1", "--load", "--", "."]));
    }

    #[test]
    fn other_buildx_commands_go_to_the_previous_buildx() {
        let x = "/x/docker-buildx";
        for sub in [&["ls"][..], &["inspect", "--bootstrap"], &["create", "--use"], &["--builder", "b", "du"], &["version"], &[]] {
            let mut a = args(&[x, "buildx"]);
            a.extend(args(sub));
            assert_eq!(route(&a, no_bake), Route::Delegate, "{sub:?}");
        }
        assert_eq!(route(&args(&[x, "bake", "--file", "-"]), no_bake), Route::Delegate, "no hoist bake: buildx's");
        assert_eq!(
            route(&args(&[x, "bake", "--file", "-", "--progress", "rawjson"]), |s| s == "bake"),
            hoist(&["hoist", "bake", "--file", "-", "--progress", "rawjson"]),
            "Compose's `docker-buildx bake` runs hoist's bake when there is one"
        );
    }

    #[test]
    fn previous_buildx_is_the_first_that_is_not_hoist() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        for dir in [&a, &b, &c] {
            std::fs::create_dir(dir).unwrap();
        }
        let me = d.path().join("hoist");
        std::fs::write(&me, "").unwrap();
        std::os::unix::fs::symlink(&me, b.join("docker-buildx")).unwrap();
        std::fs::write(c.join("docker-buildx"), "").unwrap();
        let dirs = [a, b.clone(), c.clone()];
        assert_eq!(previous_buildx(&dirs, Some(&me)), Some(c.join("docker-buildx")), "hoist's own link is skipped");
        assert_eq!(previous_buildx(&dirs[..2], Some(&me)), None);
        assert_eq!(previous_buildx(&dirs, None), Some(b.join("docker-buildx")));
    }

    #[test]
    fn a_plugin_dir_of_cli_plugins_extra_dirs_with_a_buildx_does_not_shadow_hoists() {
        let d = tempfile::tempdir().unwrap();
        let (desktop, other, mine) = (d.path().join("desktop"), d.path().join("other"), d.path().join("mine"));
        std::fs::create_dir(&desktop).unwrap();
        std::fs::write(desktop.join("docker-buildx"), "").unwrap();
        let before = serde_json::json!({"cliPluginsExtraDirs": [other, desktop]});
        let mut c = before.as_object().unwrap().clone();
        assert!(put_first_in_extra_dirs(&mut c, &mine));
        assert_eq!(c["cliPluginsExtraDirs"], serde_json::json!([mine, other, desktop]));
        assert!(!put_first_in_extra_dirs(&mut c, &mine), "once");
        assert!(remove_from_extra_dirs(&mut c, &mine));
        assert_eq!(Value::Object(c), before);
        let mut none = serde_json::json!({"cliPluginsExtraDirs": [other]}).as_object().unwrap().clone();
        assert!(!put_first_in_extra_dirs(&mut none, &mine), "nothing shadows hoist's plugins there");
        assert!(!put_first_in_extra_dirs(&mut Map::new(), &mine));
    }

    #[test]
    fn the_builder_alias_is_set_and_put_back_as_it_was() {
        let path = Path::new("config.json");
        let configs = [
            serde_json::json!({}),
            serde_json::json!({"auths": {"r": {}}, "aliases": {}}),
            serde_json::json!({"aliases": {"builder": "depot"}, "psFormat": "x"}),
            serde_json::json!({"aliases": {"builder": "buildx"}}),
        ];
        for before in configs {
            let Value::Object(before) = before else { unreachable!() };
            let state = State::of(Some(&before));
            let mut c = before.clone();
            set_builder_alias(&mut c, path).unwrap();
            assert_eq!(c["aliases"]["builder"], "buildx");
            set_builder_alias(&mut c, path).unwrap();
            assert!(restore_builder_alias(&mut c, &state));
            assert_eq!(c, before);
        }
        let mut changed = serde_json::json!({"aliases": {"builder": "other"}}).as_object().unwrap().clone();
        assert!(!restore_builder_alias(&mut changed, &State::default()), "an alias changed since stays");
        assert_eq!(changed["aliases"]["builder"], "other");
        let mut bad = serde_json::json!({"aliases": []}).as_object().unwrap().clone();
        assert!(set_builder_alias(&mut bad, path).unwrap_err().to_string().contains("config.json: \"aliases\" is not an object"));
    }
}
