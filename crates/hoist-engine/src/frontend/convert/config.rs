//! The image config a stage builds ([`Cfg`]) and the instructions that set it: ENV, LABEL,
//! EXPOSE, USER, WORKDIR (which also makes the directory), CMD and ENTRYPOINT (with the
//! stage's SHELL), HEALTHCHECK, SHELL, STOPSIGNAL, VOLUME, ONBUILD and MAINTAINER.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use hoist_dockerfile::gocompat::{self, clean_path, join_path, quote_slice};
use hoist_dockerfile::instructions::{self as ins, CmdLine, HealthSpec, KeyValue};
use hoist_oci::image::{Empty, Healthcheck, RunConfig};

use super::{Cmd, Converter, State, DEFAULT_PATH, R};
use crate::graph::{MkdirOp, Op, ResolvedImage, Step};

/// The Docker-only config fields BuildKit carries along (HEALTHCHECK, ONBUILD, SHELL,
/// ArgsEscaped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Extras {
    pub(super) healthcheck: Option<Healthcheck>,
    pub(super) on_build: Vec<String>,
    pub(super) shell: Vec<String>,
    pub(super) args_escaped: bool,
}

/// The image config being built (Docker's config with the fields BuildKit touches).
#[derive(Debug, Clone, Default)]
pub(super) struct Cfg {
    pub(super) env: Vec<String>,
    /// Position in `env` of each key (first occurrence); rebuilt when out of step, so that
    /// thousands of ENV instructions stay linear.
    pub(super) env_pos: HashMap<String, usize>,
    pub(super) cmd: Option<Vec<String>>,
    pub(super) entrypoint: Option<Vec<String>>,
    pub(super) working_dir: String,
    pub(super) user: String,
    pub(super) exposed_ports: BTreeSet<String>,
    pub(super) volumes: BTreeSet<String>,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) stop_signal: Option<String>,
    pub(super) extras: Extras,
    pub(super) author: Option<String>,
}

impl Cfg {
    pub(super) fn add_env(&mut self, k: &str, v: &str) {
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

    pub(super) fn from_image(img: &ResolvedImage) -> Cfg {
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

    pub(super) fn scratch() -> Cfg {
        Cfg { env: vec![format!("PATH={DEFAULT_PATH}")], working_dir: "/".into(), ..Cfg::default() }
    }

    pub(super) fn to_run_config(&self) -> RunConfig {
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

/// `system.NormalizeWorkdir` for Linux.
pub(super) fn normalize_workdir(current: &str, wd: &str) -> String {
    if wd.starts_with('/') {
        clean_path(wd)
    } else {
        join_path(&["/", current, wd])
    }
}

impl Converter<'_> {
    /// The command line as run: shell form goes through the stage's SHELL (`/bin/sh -c` by
    /// default), exec form as written.
    pub(super) fn with_shell(&self, st: &State, c: &CmdLine) -> Vec<String> {
        if !c.prepend_shell {
            return c.args.clone();
        }
        let mut shell =
            if st.cfg.extras.shell.is_empty() { vec!["/bin/sh".to_string(), "-c".to_string()] } else { st.cfg.extras.shell.clone() };
        shell.push(c.args.join(" "));
        shell
    }

    pub(super) fn dispatch_maintainer(&self, st: &mut State, m: &str) {
        st.cfg.author = Some(m.to_string());
        self.history(st, format!("MAINTAINER {m}"), false, false);
    }

    pub(super) fn dispatch_env(&self, st: &mut State, line: usize, kvs: &[KeyValue]) -> R<()> {
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
        Ok(())
    }

    pub(super) fn dispatch_label(&self, st: &mut State, line: usize, kvs: &[KeyValue]) -> R<()> {
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
        Ok(())
    }

    /// WORKDIR: the directory is made (a layer) unless it is `/`.
    pub(super) fn dispatch_workdir(&self, st: &mut State, cmd: &Cmd, p: &str) -> R<()> {
        let line = cmd.instr.start_line;
        let p = self.expand(p, &st.env, line)?;
        let wd = normalize_workdir(&st.cfg.working_dir, &p);
        st.cfg.working_dir = wd.clone();
        st.workdir = wd.clone();
        let with_layer = wd != "/";
        if with_layer {
            st.steps.push(Step {
                line,
                display: self.display(st, &cmd.instr.code, cmd.onbuild),
                op: Op::Mkdir(MkdirOp { path: wd.clone(), user: st.cfg.user.clone() }),
            });
        }
        self.history(st, format!("WORKDIR {wd}"), with_layer, false);
        Ok(())
    }

    /// ONBUILD: recorded in the config; a trigger run from the base is not this stage's own.
    pub(super) fn dispatch_onbuild(&self, st: &mut State, cmd: &Cmd, expr: &str) {
        st.cfg.extras.on_build.push(expr.to_string());
        if !cmd.onbuild {
            st.own_onbuild.push(expr.to_string());
        }
    }

    pub(super) fn dispatch_cmd(&self, st: &mut State, c: &CmdLine) {
        let args = self.with_shell(st, c);
        st.cfg.cmd = Some(args.clone());
        st.cfg.extras.args_escaped = true;
        st.cmd_set = true;
        self.history(st, format!("CMD {}", quote_slice(&args)), false, false);
    }

    /// ENTRYPOINT: also drops a CMD inherited from the base (one set in this stage stays).
    pub(super) fn dispatch_entrypoint(&self, st: &mut State, c: &CmdLine) {
        let args = self.with_shell(st, c);
        st.cfg.entrypoint = if args.is_empty() { None } else { Some(args.clone()) };
        if !st.cmd_set {
            st.cfg.cmd = None;
        }
        self.history(st, format!("ENTRYPOINT {}", quote_slice(&args)), false, false);
    }

    pub(super) fn dispatch_healthcheck(&self, st: &mut State, h: &HealthSpec) {
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

    pub(super) fn dispatch_expose(&self, st: &mut State, line: usize, ports: &[String]) -> R<()> {
        let mut words = Vec::new();
        for p in ports {
            words.extend(self.lex.process_words(p, &st.env).map_err(|e| self.expansion(line, e.to_string()))?);
        }
        let mut set = BTreeSet::new();
        for w in &words {
            for p in ins::parse_port_spec(w).map_err(|e| self.invalid(line, e.to_string()))? {
                set.insert(p);
            }
        }
        let items: Vec<String> = set.iter().map(|p| format!("{p}:{{}}")).collect();
        st.cfg.exposed_ports.extend(set.iter().cloned());
        self.history(st, format!("EXPOSE map[{}]", items.join(" ")), false, false);
        Ok(())
    }

    pub(super) fn dispatch_user(&self, st: &mut State, line: usize, u: &str) -> R<()> {
        let u = self.expand(u, &st.env, line)?;
        st.user = u.clone();
        st.cfg.user = u.clone();
        self.history(st, format!("USER {u}"), false, false);
        Ok(())
    }

    pub(super) fn dispatch_volume(&self, st: &mut State, line: usize, vols: &[String]) -> R<()> {
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
        Ok(())
    }

    pub(super) fn dispatch_stop_signal(&self, st: &mut State, line: usize, s: &str) -> R<()> {
        let s = self.expand(s, &st.env, line)?;
        ins::validate_signal(&s).map_err(|e| self.invalid(line, e.to_string()))?;
        st.cfg.stop_signal = Some(s.clone());
        self.history(st, format!("STOPSIGNAL {s}"), false, false);
        Ok(())
    }

    pub(super) fn dispatch_shell(&self, st: &mut State, sh: &[String]) {
        st.cfg.extras.shell = sh.to_vec();
        self.history(st, format!("SHELL {}", gocompat::plain_slice(sh)), false, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workdirs_normalize_like_buildkit() {
        assert_eq!(normalize_workdir("/", "app"), "/app");
        assert_eq!(normalize_workdir("/app", "src"), "/app/src");
        assert_eq!(normalize_workdir("/app", "/abs/./x/"), "/abs/x");
        assert_eq!(normalize_workdir("/app", ".."), "/");
        assert_eq!(normalize_workdir("", "rel"), "/rel");
    }
}
