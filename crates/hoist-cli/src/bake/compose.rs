//! Compose files: each service with a `build:` section is a target of that name, in the
//! group `default`. Its image is the service's `image:`, else `<project>-<service>` (the
//! project: `COMPOSE_PROJECT_NAME`, the file's `name:`, else its directory's name), as
//! compose names it; `build.tags` are more tags. Paths are relative to the compose file's
//! directory, as compose reads them. `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$VAR`
//! are replaced from the environment and the `.env` file beside the compose file; `$$` is `$`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail};
use serde_norway::Value as Y;

use super::{valid_name, Config, Group, Target};

/// `$VAR` and `${VAR...}` in `s`.
fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
            let expr = &r[..end];
            rest = &r[end + 1..];
            let (name, op, default) = match expr.find([':', '-', '?', '+']) {
                Some(j) => {
                    let op_len = if expr[j..].starts_with(':') { 2 } else { 1 };
                    (&expr[..j], &expr[j..(j + op_len).min(expr.len())], &expr[(j + op_len).min(expr.len())..])
                }
                None => (expr, "", ""),
            };
            let v = env(name);
            let set_nonempty = v.as_deref().is_some_and(|v| !v.is_empty());
            out.push_str(&match op {
                "" => v.unwrap_or_default(),
                ":-" => {
                    if set_nonempty {
                        v.unwrap_or_default()
                    } else {
                        default.to_string()
                    }
                }
                "-" => v.unwrap_or_else(|| default.to_string()),
                ":?" | "?" if (op == "?" && v.is_none()) || (op == ":?" && !set_nonempty) => {
                    return Err(format!("required variable {name} is missing a value: {default}"))
                }
                ":+" => {
                    if set_nonempty {
                        default.to_string()
                    } else {
                        String::new()
                    }
                }
                "+" => {
                    if v.is_some() {
                        default.to_string()
                    } else {
                        String::new()
                    }
                }
                _ => v.unwrap_or_default(),
            });
        } else {
            let n = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            if n == 0 {
                out.push('$');
            } else {
                out.push_str(&env(&rest[..n]).unwrap_or_default());
            }
            rest = &rest[n..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Interpolate every string of `v` in place.
fn interpolate_all(v: &mut Y, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    match v {
        Y::String(s) => *s = interpolate(s, env)?,
        Y::Sequence(l) => l.iter_mut().try_for_each(|x| interpolate_all(x, env))?,
        Y::Mapping(m) => m.iter_mut().try_for_each(|(_, x)| interpolate_all(x, env))?,
        _ => {}
    }
    Ok(())
}

/// `KEY=VALUE` lines of a `.env` file.
fn dotenv(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches(|c| c == '"' || c == '\'').to_string()))
        .collect()
}

fn scalar(v: &Y) -> Option<String> {
    match v {
        Y::String(s) => Some(s.clone()),
        Y::Number(n) => Some(n.to_string()),
        Y::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A map written either as a mapping or as a list of `KEY=VALUE` (a `KEY` alone takes its
/// value from the environment and is left out when it is unset, as compose does).
fn map_or_list(v: &Y, env: &dyn Fn(&str) -> Option<String>, what: &str) -> Result<BTreeMap<String, String>, String> {
    match v {
        Y::Null => Ok(BTreeMap::new()),
        Y::Mapping(m) => Ok(m
            .iter()
            .filter_map(|(k, v)| {
                let k = scalar(k)?;
                match v {
                    Y::Null => env(&k).map(|e| (k, e)),
                    v => scalar(v).map(|v| (k, v)),
                }
            })
            .collect()),
        Y::Sequence(l) => Ok(l
            .iter()
            .filter_map(scalar)
            .filter_map(|item| match item.split_once('=') {
                Some((k, v)) => Some((k.to_string(), v.to_string())),
                None => env(&item).map(|v| (item, v)),
            })
            .collect()),
        _ => Err(format!("{what} must be a mapping or a list of KEY=VALUE")),
    }
}

fn list(v: Option<&Y>, what: &str) -> Result<Option<Vec<String>>, String> {
    match v {
        None | Some(Y::Null) => Ok(None),
        Some(Y::Sequence(l)) => Ok(Some(l.iter().filter_map(scalar).collect())),
        Some(v) => scalar(v).map(|s| Some(vec![s])).ok_or_else(|| format!("{what} must be a list")),
    }
}

/// The project name as compose normalizes it: lowercase letters, digits, `_` and `-`.
fn normalize_project(name: &str) -> String {
    name.to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect::<String>()
        .trim_start_matches(['_', '-'])
        .to_string()
}

/// Whether a context string is a path (not a URL or an image).
fn is_path(p: &str) -> bool {
    !(p.contains("://") || p.starts_with("git@") || p.starts_with("target:") || p.starts_with("service:") || p.starts_with("docker-image:"))
}

/// The line where service `name` starts, for messages.
fn service_line(text: &str, name: &str) -> usize {
    text.lines().position(|l| l.trim_start().starts_with(&format!("{name}:")) && l.starts_with(' ')).map_or(1, |i| i + 1)
}

/// The targets of compose file `path` (its text `text`).
pub fn parse(path: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
    let name = path.display().to_string();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dotenv = dotenv(&dir.join(".env"));
    let lookup = |k: &str| env(k).or_else(|| dotenv.get(k).cloned());
    let mut doc: Y = serde_norway::from_str(text).map_err(|e| match e.location() {
        Some(l) => anyhow!("{name}:{}:{}: {e}", l.line(), l.column()),
        None => anyhow!("{name}: {e}"),
    })?;
    interpolate_all(&mut doc, &lookup).map_err(|e| anyhow!("{name}: {e}"))?;
    let Some(services) = doc.get("services") else { bail!("{name}: no services: a compose file lists them under services:") };
    let Y::Mapping(services) = services else { bail!("{name}: services must be a mapping of service names") };
    let project = match lookup("COMPOSE_PROJECT_NAME").or_else(|| doc.get("name").and_then(scalar)) {
        Some(p) => normalize_project(&p),
        None => {
            let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            normalize_project(&abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
        }
    };
    let top_secrets = doc.get("secrets").cloned().unwrap_or(Y::Null);
    let rel = |p: &str| {
        if is_path(p) && !Path::new(p).is_absolute() && dir != Path::new(".") {
            dir.join(p).display().to_string()
        } else {
            p.to_string()
        }
    };
    let mut cfg = Config::default();
    let mut group = Group { name: "default".into(), ..Group::default() };
    for (svc, body) in services {
        let Some(svc) = scalar(svc) else { continue };
        let line = service_line(text, &svc);
        let at = |e: String| anyhow!("{name}:{line}: service {svc:?}: {e}");
        let Some(build) = body.get("build") else { continue };
        if !valid_name(&svc) {
            return Err(at("only letters, digits, _ and - can name a service that hoist bake builds".into()));
        }
        let mut t = Target { name: svc.clone(), ..Target::default() };
        let image = body.get("image").and_then(scalar).unwrap_or_else(|| format!("{project}-{svc}"));
        let mut tags = vec![image];
        match build {
            Y::String(ctx) => t.context = Some(rel(ctx)),
            Y::Mapping(_) => {
                let get = |k: &str| build.get(k);
                let known = [
                    "context",
                    "dockerfile",
                    "dockerfile_inline",
                    "args",
                    "target",
                    "tags",
                    "platforms",
                    "labels",
                    "additional_contexts",
                    "cache_from",
                    "cache_to",
                    "no_cache",
                    "pull",
                    "network",
                    "shm_size",
                    "secrets",
                    "ssh",
                    "extra_hosts",
                    "ulimits",
                ];
                for k in build.as_mapping().into_iter().flat_map(|m| m.keys()).filter_map(scalar) {
                    if !known.contains(&k.as_str()) && !k.starts_with("x-") {
                        eprintln!("hoist bake: {name}: service {svc:?}: build.{k} is not supported by hoist bake yet; it is ignored");
                    }
                }
                t.context = Some(rel(&get("context").and_then(scalar).unwrap_or_else(|| ".".into())));
                t.dockerfile = get("dockerfile").and_then(scalar);
                t.dockerfile_inline = get("dockerfile_inline").and_then(scalar);
                t.target = get("target").and_then(scalar);
                t.network = get("network").and_then(scalar);
                t.shm_size = get("shm_size").and_then(scalar);
                t.no_cache = get("no_cache").and_then(Y::as_bool);
                t.pull = get("pull").and_then(Y::as_bool);
                for (k, field) in [("args", &mut t.args), ("labels", &mut t.labels)] {
                    if let Some(v) = get(k) {
                        *field = map_or_list(v, &lookup, &format!("build.{k}")).map_err(at)?;
                    }
                }
                if let Some(v) = get("additional_contexts") {
                    t.contexts = map_or_list(v, &lookup, "build.additional_contexts")
                        .map_err(at)?
                        .into_iter()
                        .map(|(k, v)| (k, v.strip_prefix("service:").map(|s| format!("target:{s}")).unwrap_or_else(|| rel(&v))))
                        .collect();
                }
                if let Some(v) = get("extra_hosts") {
                    let hosts = match v {
                        Y::Sequence(l) => l
                            .iter()
                            .filter_map(scalar)
                            .filter_map(|h| h.split_once([':', '=']).map(|(a, b)| (a.to_string(), b.to_string())))
                            .collect(),
                        v => map_or_list(v, &lookup, "build.extra_hosts").map_err(at)?,
                    };
                    t.extra_hosts = hosts;
                }
                tags.extend(list(get("tags"), "build.tags").map_err(at)?.unwrap_or_default());
                t.platforms = list(get("platforms"), "build.platforms").map_err(at)?;
                t.cache_from = list(get("cache_from"), "build.cache_from").map_err(at)?;
                t.cache_to = list(get("cache_to"), "build.cache_to").map_err(at)?;
                t.ssh = match get("ssh") {
                    Some(Y::Mapping(m)) => Some(m.iter().filter_map(|(k, v)| Some(format!("{}={}", scalar(k)?, scalar(v)?))).collect()),
                    other => list(other, "build.ssh").map_err(at)?,
                };
                if let Some(Y::Sequence(l)) = get("secrets") {
                    let mut out = Vec::new();
                    for s in l {
                        let (source, target) = match s {
                            Y::Mapping(_) => (s.get("source").and_then(scalar).unwrap_or_default(), s.get("target").and_then(scalar)),
                            s => (scalar(s).unwrap_or_default(), None),
                        };
                        let def = top_secrets
                            .get(&source)
                            .ok_or_else(|| at(format!("secret {source:?} is not defined under the top-level secrets:")))?;
                        let id = target.unwrap_or_else(|| source.clone());
                        match (def.get("file").and_then(scalar), def.get("environment").and_then(scalar)) {
                            (Some(f), _) => out.push(format!("id={id},src={}", rel(&f))),
                            (None, Some(e)) => out.push(format!("id={id},env={e}")),
                            _ => return Err(at(format!("secret {source:?}: hoist bake takes secrets with file: or environment:"))),
                        }
                    }
                    t.secret = Some(out);
                }
                if let Some(Y::Mapping(m)) = get("ulimits") {
                    let mut out = Vec::new();
                    for (k, v) in m {
                        let k = scalar(k).unwrap_or_default();
                        match v {
                            Y::Mapping(_) => out.push(format!(
                                "{k}={}:{}",
                                v.get("soft").and_then(scalar).unwrap_or_default(),
                                v.get("hard").and_then(scalar).unwrap_or_default()
                            )),
                            v => out.push(format!("{k}={}", scalar(v).unwrap_or_default())),
                        }
                    }
                    t.ulimits = Some(out);
                }
            }
            _ => return Err(at("build must be a context path or a mapping".into())),
        }
        t.tags = Some(tags);
        group.targets.push(svc.clone());
        cfg.targets.push(t);
    }
    cfg.groups.push(group);
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::interpolate;

    #[test]
    fn compose_interpolation_as_compose_does_it() {
        let env = |k: &str| match k {
            "TAG" => Some("1.2".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(interpolate("app:${TAG}", &env).unwrap(), "app:1.2");
        assert_eq!(interpolate("app:$TAG-x", &env).unwrap(), "app:1.2-x");
        assert_eq!(interpolate("${NOPE:-latest}", &env).unwrap(), "latest");
        assert_eq!(interpolate("${EMPTY:-d}|${EMPTY-d}", &env).unwrap(), "d|");
        assert_eq!(interpolate("$${TAG} costs $$5", &env).unwrap(), "${TAG} costs $5");
        assert!(interpolate("${NOPE:?set NOPE}", &env).unwrap_err().contains("set NOPE"));
        assert!(interpolate("${TAG", &env).is_err());
    }
}
