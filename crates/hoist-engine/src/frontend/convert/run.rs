//! RUN: the command (shell or exec form, heredoc scripts as inline files), its `--mount`s
//! (bind, cache, tmpfs, secret, ssh) expanded with the stage's environment, its network and
//! security modes, and the history entry with the build args BuildKit records.

use std::collections::HashMap;

use hoist_dockerfile::gocompat::{self, clean_path, join_path, quote};
use hoist_dockerfile::instructions::{self as ins, CmdLine, Mount, MountType, Network, RunInstr, Security, Sharing};
use hoist_dockerfile::parser::{chomp_heredoc_content, parse_heredoc};

use super::{Cmd, Converter, Info, State, R};
use crate::graph::{CacheSharing, InlineFile, MountKind, NetworkMode, Op, RunMount, RunOp, SecurityMode, Source, Step};

/// The first line of a heredoc, with `...` when it has more (shown after a RUN's display).
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

/// The history of a RUN: `|<n> K=V...` for the stage's build args (their current values),
/// then the command.
fn run_history_args(st: &State, args: &[String]) -> String {
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
}

impl Converter<'_> {
    pub(super) fn dispatch_run(
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
        let (args, inline_files) = self.run_command(st, line, r, &mut display)?;
        let mounts = self.run_mounts(st, infos, si, cmd, r, out_id)?;
        let history_args = run_history_args(st, &args);

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

    /// The command as run, with the inline files it needs: a RUN that is a whole heredoc runs
    /// its content (a `#!` script from `/dev/pipes/<name>`, else through the shell) and shows
    /// its first line after `display`; heredocs fed to a command are appended to it.
    fn run_command(&self, st: &State, line: usize, r: &RunInstr, display: &mut String) -> R<(Vec<String>, Vec<InlineFile>)> {
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
        Ok((args, inline_files))
    }

    /// The RUN's mounts, expanded with the stage's environment.
    fn run_mounts(
        &self,
        st: &State,
        infos: &[Info],
        si: usize,
        cmd: &Cmd,
        r: &RunInstr,
        out_id: &HashMap<usize, usize>,
    ) -> R<Vec<RunMount>> {
        let line = cmd.instr.start_line;
        let mut mounts = Vec::with_capacity(r.mounts.len());
        let mut ssh_count = 0;
        for (i, raw) in r.mounts.iter().enumerate() {
            let env = &st.env;
            let lex = self.lex;
            let mut expander = |w: &str| lex.process_word(w, env);
            let m = ins::parse_mount(raw, &mut expander).map_err(|e| self.invalid(line, format!("--mount={raw}: {e}")))?;
            let from = match cmd.sources.get(i).copied().flatten() {
                Some(src) if !m.from.is_empty() => Some(self.source_of(infos, si, src, line, "mount from", out_id)?),
                _ => None,
            };
            let kind = self.mount_kind(line, &m, from)?;
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
                _ => self.mount_target(st, line, &m.target)?,
            };
            mounts.push(RunMount { target, kind });
        }
        Ok(mounts)
    }

    /// A bind, cache or tmpfs mount's target: absolute, relative to the working directory,
    /// never `/`.
    fn mount_target(&self, st: &State, line: usize, t: &str) -> R<String> {
        let target = if t.starts_with('/') { clean_path(t) } else { join_path(&["/", &st.workdir, t]) };
        if target == "/" {
            return Err(self.invalid(line, format!("invalid mount target {} (a mount cannot replace /)", quote(&target))));
        }
        Ok(target)
    }

    /// What a parsed `--mount` mounts (`from`: the stage its `from=` names), with BuildKit's
    /// defaults for ids, modes and owners.
    fn mount_kind(&self, line: usize, m: &Mount, from: Option<Source>) -> R<MountKind> {
        let source_path = join_path(&["/", &m.source]);
        let kind = match m.kind {
            MountType::Bind => MountKind::Bind { from: from.unwrap_or(Source::Context), source: source_path, readwrite: !m.read_only },
            MountType::Cache => MountKind::Cache {
                id: if m.id.is_empty() { clean_path(&m.target) } else { m.id.clone() },
                sharing: match m.sharing {
                    Some(Sharing::Private) => CacheSharing::Private,
                    Some(Sharing::Locked) => CacheSharing::Locked,
                    _ => CacheSharing::Shared,
                },
                from,
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
        Ok(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heredoc_summaries_show_the_first_line() {
        assert_eq!(summarize_heredoc("echo a\necho b\n"), "echo a...");
        assert_eq!(summarize_heredoc("\n  single  \n"), "single");
    }
}
