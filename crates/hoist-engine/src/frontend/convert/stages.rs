//! Stages: FROM (base name and `--platform`, expanded with the global args), target
//! selection, stage references of `COPY --from` and `RUN --mount=from` (by name, index or
//! as an implicit image stage), cycle detection, reachability from the target, base image
//! resolution, the ONBUILD triggers of a base, and the state each stage starts from.

use std::collections::HashMap;
use std::sync::Arc;

use hoist_dockerfile::gocompat::quote;
use hoist_dockerfile::instructions::{self as ins, Instr, Instruction};

use super::config::{normalize_workdir, Cfg};
use super::{split_kv, Cmd, Converter, EnvList, FrontendError, ImageResolver, Info, State, DEFAULT_PATH, R};
use crate::graph::{Base, NamedContext, Platform, Source};

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
fn validate_reference(r: &str) -> Result<(), InvalidReference> {
    if r.is_empty() || r.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InvalidReference::Format(quote(r)));
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
        return Err(InvalidReference::Uppercase(repo.to_string()));
    }
    if repo.is_empty() || !repo.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/')) {
        return Err(InvalidReference::Format(quote(r)));
    }
    Ok(())
}

/// Why a base name is not an image reference (Docker's words).
#[derive(Debug, thiserror::Error)]
enum InvalidReference {
    #[error("invalid reference format: {0}")]
    Format(String),
    #[error("invalid reference format: repository name ({0}) must be lowercase")]
    Uppercase(String),
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

/// Output order: implicit image stages, then the Dockerfile's stages in order.
pub(super) fn output_order(infos: &[Info], reachable: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = reachable.iter().copied().filter(|&i| infos[i].implicit).collect();
    order.sort_unstable();
    let mut df_order: Vec<usize> = reachable.iter().copied().filter(|&i| !infos[i].implicit).collect();
    df_order.sort_unstable();
    order.extend(df_order);
    order
}

impl Converter<'_> {
    /// The Dockerfile's stages with their FROM expanded with the global args.
    pub(super) fn stage_infos(&mut self, stages: &[ins::Stage]) -> R<Vec<Info>> {
        let mut infos: Vec<Info> = Vec::new();
        for (i, st) in stages.iter().enumerate() {
            let base_name = self.expand(&st.from.base, &self.global, st.line)?;
            if base_name.is_empty() {
                return Err(self.invalid(st.line, format!("base name ({}) should not be blank", st.from.base)));
            }
            let explicit_platform = match &st.from.platform {
                None => None,
                Some(p) => Some(self.expand_platform(p, st.line)?),
            };
            // A named context of the stage's own name replaces the stage; one of the name
            // after FROM replaces that image (or stage) for this stage (buildx's semantics).
            let overrides = st.from.name.as_deref().and_then(|n| self.opts.named_contexts.get(n).map(|c| (n, c)));
            let named = overrides.or_else(|| self.opts.named_contexts.get_key_value(base_name.as_str()).map(|(n, c)| (n.as_str(), c)));
            let (base_name, base, local) = match named {
                Some((_, NamedContext::Image(r))) => (r.clone(), None, None),
                Some((name, NamedContext::Local)) => ("scratch".to_string(), None, Some(name.to_string())),
                None => {
                    let base = infos.iter().position(|inf| inf.name.as_deref() == Some(base_name.as_str()));
                    if base.is_none() {
                        if let Some(later) = stages[i..].iter().find(|s| s.from.name.as_deref() == Some(base_name.as_str())) {
                            self.warnings.push(format!(
                                "{}:{}: FROM {base_name} refers to the stage defined on line {} later in the file; BuildKit uses the image {base_name:?} instead",
                                self.file, st.line, later.line
                            ));
                        }
                    }
                    (base_name, base, None)
                }
            };
            let commands = match overrides {
                Some(_) => Vec::new(),
                None => st.commands.iter().map(|c| Cmd { instr: c.clone(), sources: Vec::new(), onbuild: false }).collect(),
            };
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
                local,
            });
        }
        Ok(infos)
    }

    /// `FROM --platform=<p>`, expanded with the global args.
    fn expand_platform(&self, p: &str, line: usize) -> R<Platform> {
        let v = self
            .lex
            .process_word(p, &self.global)
            .map_err(|e| self.expansion(line, format!("failed to process arguments for platform {p}: {e}")))?;
        if v.is_empty() {
            return Err(self.invalid(line, format!("empty platform value from expression {p}")));
        }
        Platform::parse(&v).map_err(|e| self.invalid(line, format!("failed to parse platform {p}: {e}")))
    }

    /// The stage `--target` names (by name, else by index), or the last stage.
    pub(super) fn select_target(&self, infos: &[Info]) -> R<usize> {
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
        Ok(target)
    }

    /// The stages every command of the Dockerfile's stages reads from (adding implicit image
    /// stages as they are named).
    pub(super) fn link_commands(&self, infos: &mut Vec<Info>) -> R<()> {
        let n_stages = infos.len();
        for si in 0..n_stages {
            let mut cmds = std::mem::take(&mut infos[si].commands);
            for c in cmds.iter_mut() {
                c.sources = self.command_sources(&c.instr, infos)?;
            }
            infos[si].commands = cmds;
        }
        Ok(())
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
        // A named context of that name (not a stage's: that stage was replaced above).
        let (base_name, local) = match self.opts.named_contexts.get(from) {
            Some(NamedContext::Image(r)) => (r.clone(), None),
            Some(NamedContext::Local) => ("scratch".to_string(), Some(from.to_string())),
            None => (from.to_string(), None),
        };
        if let Some(p) = infos.iter().position(|i| i.implicit && i.base_name == base_name && i.local == local) {
            return Ok(p);
        }
        infos.push(Info {
            name: None,
            dockerfile_index: None,
            local,
            base_name,
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
                    let fields = ins::csv_fields(m).map_err(|e| self.invalid(line, e.to_string()))?;
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

    pub(super) fn check_cycles(&self, infos: &[Info]) -> R<()> {
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

    /// Resolve the base images of the stages reachable from `target` and apply their ONBUILD
    /// triggers, again while triggers add dependencies; returns the reachable stages.
    pub(super) async fn resolve_reachable(&self, infos: &mut Vec<Info>, target: usize, resolver: &dyn ImageResolver) -> R<Vec<usize>> {
        loop {
            let reachable = reachable_from(infos, target);
            self.resolve_images(infos, &reachable, resolver).await?;
            let mut new_deps = false;
            for &si in &reachable {
                if self.apply_onbuild_triggers(infos, si)? {
                    new_deps = true;
                }
            }
            if !new_deps {
                return Ok(reachable);
            }
            self.check_cycles(infos)?;
        }
    }

    /// Prepend the ONBUILD triggers of stage `si`'s base (a stage's own ONBUILD lines, or its
    /// image's) to its commands, once; returns whether they read from other stages.
    fn apply_onbuild_triggers(&self, infos: &mut Vec<Info>, si: usize) -> R<bool> {
        if infos[si].onbuild_init || infos[si].implicit {
            return Ok(false);
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
            return Ok(false);
        }
        let mut new_deps = false;
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
            let sources = self.command_sources(&instr, infos)?;
            if sources.iter().any(Option::is_some) {
                new_deps = true;
            }
            cmds.push(Cmd { instr, sources, onbuild: true });
        }
        cmds.append(&mut infos[si].commands);
        infos[si].commands = cmds;
        Ok(new_deps)
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
        let results: Vec<_> = futures::future::join_all(unique.iter().map(|(r, p)| resolver.resolve(r, p)))
            .await
            .into_iter()
            .map(|r| r.map_err(Arc::new))
            .collect();
        for (si, r, p) in wanted {
            let idx = unique.iter().position(|(ur, up)| *ur == r && *up == p).unwrap_or(0);
            match &results[idx] {
                Ok(img) => infos[si].resolved = Some(img.clone()),
                Err(source) => {
                    return Err(FrontendError::Resolve {
                        file: self.file.clone(),
                        line: infos[si].line,
                        reference: r.clone(),
                        platform: p.to_string(),
                        source: source.clone(),
                    })
                }
            }
        }
        Ok(())
    }

    /// The state stage `si` starts from: its base stage's, or its image's config, or scratch.
    pub(super) fn init_state(&self, infos: &[Info], si: usize, states: &HashMap<usize, State>, out_id: &HashMap<usize, usize>) -> R<State> {
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

    /// The source stage `src` as stage `si`'s command at `line` reads it (`what`: "copy
    /// from", "mount from"): it must come before `si` unless it is an implicit image stage.
    pub(super) fn source_of(
        &self,
        infos: &[Info],
        si: usize,
        src: usize,
        line: usize,
        what: &str,
        out_id: &HashMap<usize, usize>,
    ) -> R<Source> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
