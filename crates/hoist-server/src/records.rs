//! What a build record keeps of each step (for `hoist builds show` and the web UI): its
//! instruction text, stage, start and end (ms from the build's start), cached or ran, and
//! which lines of the build's log are its output; what its cache key was made of, and from
//! that, once the build is over: why it missed the cache (compared with the project's earlier
//! builds of the same step), the vertices it waited for, and the critical path.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use hoist_engine::progress::Event;
use hoist_proto::v1;

/// Steps of one build as its events arrive.
#[derive(Default)]
pub(crate) struct StepRecorder {
    t0: Option<Instant>,
    steps: Vec<v1::BuildStep>,
    index: HashMap<u32, usize>,
    completed: HashSet<u32>,
}

impl StepRecorder {
    /// A recorder whose times count from `t0`.
    pub(crate) fn new(t0: Instant) -> StepRecorder {
        StepRecorder { t0: Some(t0), ..Default::default() }
    }

    fn ms(&self) -> u64 {
        self.t0.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0)
    }

    /// Take in `ev`; `log_lines` is how many lines of it went into the build's log.
    pub(crate) fn add(&mut self, ev: &Event, log_lines: u64) {
        match ev {
            Event::Started { id, name } => {
                let (stage, name) = split_name(name);
                let now = self.ms();
                self.index.insert(*id, self.steps.len());
                self.steps.push(v1::BuildStep { id: *id, name, stage, start_ms: now, end_ms: now, ..Default::default() });
            }
            Event::Completed { id, cached, error, .. } => {
                let now = self.ms();
                self.completed.insert(*id);
                if let Some(s) = self.index.get(id).map(|&i| &mut self.steps[i]) {
                    s.end_ms = now;
                    s.cached = *cached;
                    s.error = error.clone().unwrap_or_default();
                }
            }
            Event::Log { id, .. } => {
                let now = self.ms();
                if let Some(s) = self.index.get(id).map(|&i| &mut self.steps[i]) {
                    s.log_lines += log_lines;
                    s.end_ms = s.end_ms.max(now);
                }
            }
            Event::Key(k) => {
                if let Some(s) = self.index.get(&k.id).map(|&i| &mut self.steps[i]) {
                    s.line = k.line;
                    s.cache_key = key_prefix(&k.cache_key);
                    s.parent_key = key_prefix(&k.parent_key);
                    s.state_key = key_prefix(&k.state_key);
                    s.op_digest = key_prefix(&k.op);
                    s.inputs = k.inputs.iter().map(|(kind, v)| format!("{kind} {}", key_prefix(v))).collect();
                    s.args =
                        k.args.iter().map(|a| a.split_once('=').map_or(a.clone(), |(n, v)| format!("{n}={}", key_prefix(v)))).collect();
                    s.no_cache = k.no_cache;
                    s.layer_bytes = k.layer_bytes;
                    s.pulled_layers = k.pulled_layers;
                    s.from_index = k.from_index.map_or(0, |i| i + 1);
                }
            }
            Event::Warning(_) => {}
        }
    }

    /// The steps, in the order they started.
    pub(crate) fn steps(&self) -> Vec<v1::BuildStep> {
        self.steps.clone()
    }

    /// The steps so far, each with whether it still runs (then it ends now).
    pub(crate) fn live(&self) -> Vec<(v1::BuildStep, bool)> {
        let now = self.ms();
        let step = |s: &v1::BuildStep| {
            let running = !self.completed.contains(&s.id);
            let end_ms = if running { now.max(s.start_ms) } else { s.end_ms };
            (v1::BuildStep { end_ms, ..s.clone() }, running)
        };
        self.steps.iter().map(step).collect()
    }
}

/// Digits of a key or digest a record keeps.
const KEY_DIGITS: usize = 16;

/// The first [`KEY_DIGITS`] hex digits of a key or digest (`sha256:` dropped); other text
/// (a git commit, a URL and its digest) is kept whole, up to 200 bytes.
fn key_prefix(k: &str) -> String {
    let hex = k.strip_prefix("sha256:").unwrap_or(k);
    if hex.len() >= KEY_DIGITS && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return hex[..KEY_DIGITS].to_string();
    }
    let mut cut = k.len().min(200);
    while !k.is_char_boundary(cut) {
        cut -= 1;
    }
    k[..cut].to_string()
}

/// `[build 2/5] RUN make` → (`build`, `RUN make`); `[base] FROM x` → (`base`, `FROM x`); a
/// name without a label is kept whole, with no stage.
fn split_name(name: &str) -> (String, String) {
    let Some((label, rest)) = name.strip_prefix('[').and_then(|n| n.split_once("] ")) else {
        return (String::new(), name.to_string());
    };
    let stage = match label.rsplit_once(' ') {
        Some((stage, n)) if n.contains('/') && n.split('/').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) => stage,
        _ => label,
    };
    (stage.to_string(), rest.to_string())
}

/// Fill each step's `log` with its lines of the build's `log` (lines `#ID text`: the first of
/// a vertex names it, the next `log_lines` are its output).
pub(crate) fn split_log(log: &str, steps: &mut [v1::BuildStep]) {
    let mut seen: HashMap<u32, u64> = HashMap::new();
    let index: HashMap<u32, usize> = steps.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
    for line in log.lines() {
        let Some((id, text)) = line.strip_prefix('#').and_then(|l| l.split_once(' ')) else { continue };
        let Some(&i) = id.parse::<u32>().ok().as_ref().and_then(|id| index.get(id)) else { continue };
        let n = seen.entry(steps[i].id).or_default();
        *n += 1;
        // the first line names the step
        if *n > 1 && *n - 1 <= steps[i].log_lines {
            steps[i].log.push_str(text);
            steps[i].log.push('\n');
        }
    }
}

/// Most bytes of a Dockerfile kept in a build record.
pub(crate) const MAX_DOCKERFILE: usize = 64 << 10;

/// The Dockerfile as a record keeps it: at most [`MAX_DOCKERFILE`] bytes (cut at a line), and
/// whether it was cut.
pub(crate) fn dockerfile_text(bytes: &[u8]) -> (String, bool) {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= MAX_DOCKERFILE {
        return (text.into_owned(), false);
    }
    let mut cut = MAX_DOCKERFILE;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let cut = text[..cut].rfind('\n').map_or(cut, |n| n + 1);
    (text[..cut].to_string(), true)
}

/// Fill in what is known once the build is over: the Dockerfile lines of base images, each
/// step's dependencies, the critical path, and why each step that ran missed the cache
/// (`previous`: the project's earlier records, newest first).
pub(crate) fn finish(steps: &mut [v1::BuildStep], previous: &[v1::BuildRecord], dockerfile: &str) {
    let froms = from_lines(dockerfile);
    for s in steps.iter_mut().filter(|s| s.from_index > 0 && s.line == 0) {
        s.line = froms.get(s.from_index as usize - 1).copied().unwrap_or(0);
    }
    link(steps);
    let critical: HashSet<u32> = critical_path(steps).into_iter().collect();
    for i in 0..steps.len() {
        steps[i].critical = critical.contains(&steps[i].id);
        if let Some((reason, detail)) = miss_reason(&steps[i], steps, previous) {
            steps[i].miss_reason = reason.into();
            steps[i].miss_detail = detail;
        }
    }
}

/// The lines (1-based) of a Dockerfile's `FROM` instructions, in order: instruction lines
/// only (not continuations, comments or heredoc bodies; the escape directive is heeded).
pub(crate) fn from_lines(dockerfile: &str) -> Vec<u32> {
    let mut escape = '\\';
    let mut out = Vec::new();
    let mut continued = false;
    let mut heredoc: Option<(String, bool)> = None;
    let mut directives = true;
    for (i, line) in dockerfile.lines().enumerate() {
        let t = line.trim();
        if directives {
            match t.strip_prefix('#').map(|d| d.trim().to_ascii_lowercase()) {
                Some(d) if d.starts_with("escape=") => escape = d["escape=".len()..].trim().chars().next().unwrap_or(escape),
                Some(d) if d.contains('=') && !d.contains(' ') => {}
                _ => directives = false,
            }
        }
        if let Some((end, dash)) = &heredoc {
            let l = if *dash { line.trim_start_matches('\t') } else { line };
            if l == end {
                heredoc = None;
            }
            continue;
        }
        if t.starts_with('#') && !t.is_empty() {
            continue;
        }
        let first = !continued;
        continued = t.ends_with(escape);
        if !first || t.is_empty() {
            continue;
        }
        if t.split_whitespace().next().is_some_and(|w| w.eq_ignore_ascii_case("FROM")) {
            out.push(i as u32 + 1);
        }
        // `RUN <<EOF`, `COPY <<-"EOF" /x`: the body up to the line `EOF` is no instruction.
        if let Some(at) = t.find("<<") {
            let rest = &t[at + 2..];
            let (dash, rest) = rest.strip_prefix('-').map_or((false, rest), |r| (true, r));
            let word: String =
                rest.trim_matches(|c| c == '"' || c == '\'').chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !word.is_empty() && !continued {
                heredoc = Some((word, dash));
            }
        }
    }
    out
}

/// The vertex whose state is `key`: of `stage` if one is (two stages on the same base image
/// start from the same state), else the last to start.
fn by_state<'a>(steps: &'a [v1::BuildStep], key: &str, stage: &str) -> Option<&'a v1::BuildStep> {
    if key.is_empty() {
        return None;
    }
    let mut found = steps.iter().rev().filter(|s| s.state_key == key);
    let first = found.next()?;
    Some(std::iter::once(first).chain(found).find(|s| s.stage == stage).unwrap_or(first))
}

/// Each keyed step's `deps`: the vertex it ran on (the step above, or its stage's base
/// image) and those of the stages it reads (`COPY --from`, `RUN --mount=from=`).
pub(crate) fn link(steps: &mut [v1::BuildStep]) {
    let deps: Vec<Vec<u32>> = steps
        .iter()
        .map(|s| {
            let stage_inputs = s.inputs.iter().filter_map(|i| i.strip_prefix("stage "));
            let parent = by_state(steps, &s.parent_key, &s.stage);
            let mut d: Vec<u32> = parent
                .into_iter()
                .chain(stage_inputs.filter_map(|k| by_state(steps, k, "")))
                .map(|v| v.id)
                .filter(|id| *id != s.id)
                .collect();
            d.dedup();
            d
        })
        .collect();
    for (s, d) in steps.iter_mut().zip(deps) {
        s.deps = d;
    }
}

/// The critical path: from the keyed vertex that ended last, back along the dependency that
/// ended last each time, to a vertex that waited for none. Ids in build order.
pub(crate) fn critical_path(steps: &[v1::BuildStep]) -> Vec<u32> {
    let by_id: HashMap<u32, &v1::BuildStep> = steps.iter().map(|s| (s.id, s)).collect();
    let keyed = steps.iter().filter(|s| !s.state_key.is_empty());
    // (the first of equals: `max_by_key` takes the last)
    let Some(mut at) = keyed.rev().max_by_key(|s| s.end_ms) else { return Vec::new() };
    let mut path = vec![at.id];
    while let Some(next) = at.deps.iter().filter_map(|d| by_id.get(d)).filter(|d| !path.contains(&d.id)).max_by_key(|d| d.end_ms) {
        path.push(next.id);
        at = next;
    }
    path.reverse();
    path
}

/// The digest part of a base image vertex's name (`FROM ref@sha256:...`).
fn base_digest(name: &str) -> &str {
    name.rsplit_once('@').map_or(name, |(_, d)| d)
}

fn short(d: &str) -> &str {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    &hex[..hex.len().min(12)]
}

/// Why step `s` (of a build whose vertices are `current`) missed the cache, compared with
/// the newest of `previous` (newest first) that built the same step: the same stage and
/// instruction or, failing that, the same stage and Dockerfile line. `None` for a step that
/// came from the cache or was not keyed (it failed first, or it is no step).
pub(crate) fn miss_reason(s: &v1::BuildStep, current: &[v1::BuildStep], previous: &[v1::BuildRecord]) -> Option<(&'static str, String)> {
    if s.cached || s.cache_key.is_empty() {
        return None;
    }
    if s.no_cache {
        return Some(("no-cache", "the cache was not used (--no-cache or --no-cache-filter)".into()));
    }
    let keyed = |p: &&v1::BuildStep| !p.cache_key.is_empty() && p.stage == s.stage;
    let find = |same: &dyn Fn(&v1::BuildStep) -> bool| {
        previous.iter().find_map(|r| r.steps.iter().filter(keyed).find(|p| same(p)).map(|p| (r, p)))
    };
    let Some((rec, p)) = find(&|p| p.name == s.name).or_else(|| find(&|p| s.line > 0 && p.line == s.line)) else {
        return Some(("first", "no earlier build of this step in this project".into()));
    };
    if p.op_digest != s.op_digest {
        let mut changed: Vec<&str> = s
            .args
            .iter()
            .chain(&p.args)
            .filter(|a| !(s.args.contains(a) && p.args.contains(a)))
            .filter_map(|a| a.split_once('=').map(|(k, _)| k))
            .collect();
        changed.sort_unstable();
        changed.dedup();
        if !changed.is_empty() {
            let names = changed.join(", ");
            let plural = if changed.len() > 1 { "s" } else { "" };
            return Some(("build-arg", format!("build-arg{plural} {names} changed")));
        }
        if p.name != s.name {
            return Some(("instruction", format!("the instruction changed (was `{}`)", p.name)));
        }
        return Some(("instruction", "the instruction's environment changed (an ENV, ARG, USER, WORKDIR or SHELL above it)".into()));
    }
    // Its own inputs first; then what it builds on: its base image, the stages it reads, the
    // step above.
    let mut kinds: Vec<&str> = s
        .inputs
        .iter()
        .chain(&p.inputs)
        .filter(|i| !(s.inputs.contains(i) && p.inputs.contains(i)))
        .map(|i| i.split_once(' ').map_or(i.as_str(), |(k, _)| k))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    if let Some(kind) = kinds.iter().find(|k| **k != "stage") {
        return Some(match *kind {
            "sources" => ("context", "the files it copies changed".into()),
            "context" => ("context", "the context files it mounts changed".into()),
            "git" => ("input", "the git ref it adds names another commit".into()),
            "url" => ("input", "the file it downloads changed".into()),
            other => ("input", format!("its {other} changed")),
        });
    }
    let parent = by_state(current, &s.parent_key, &s.stage);
    if p.parent_key != s.parent_key {
        if let Some(base) = parent.filter(|v| v.cache_key.is_empty()) {
            let old = by_state(&rec.steps, &p.parent_key, &p.stage).map(|b| base_digest(&b.name).to_string());
            let new = base_digest(&base.name);
            return Some((
                "base",
                match old {
                    Some(old) if old != new => format!("the base image changed ({} → {})", short(&old), short(new)),
                    _ => "the base image changed".into(),
                },
            ));
        }
    }
    if kinds.contains(&"stage") {
        let read = s
            .inputs
            .iter()
            .filter_map(|i| i.strip_prefix("stage "))
            .filter(|k| !p.inputs.iter().any(|i| i.strip_prefix("stage ") == Some(*k)));
        let names: Vec<String> = read.filter_map(|k| by_state(current, k, "")).map(|v| format!("`{}`", v.stage)).collect();
        let detail =
            if names.is_empty() { "a stage it reads changed".into() } else { format!("the stage it reads changed ({})", names.join(", ")) };
        return Some(("stage", detail));
    }
    if p.parent_key != s.parent_key {
        let Some(parent) = parent else { return Some(("parent", "the steps above it changed".into())) };
        if parent.cached {
            return Some(("parent", format!("the step above changed: `{}` (cached from another build)", parent.name)));
        }
        return Some(("parent", format!("the step above ran: `{}`", parent.name)));
    }
    if p.cache_key == s.cache_key {
        return Some(("evicted", format!("the same inputs as build {}: its cache record was collected since", rec.id)));
    }
    Some(("input", "its cache key changed".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_and_instruction_of_a_vertex_name() {
        assert_eq!(split_name("[build 2/5] RUN make"), ("build".into(), "RUN make".into()));
        assert_eq!(split_name("[stage-0] FROM busybox@sha256:ab"), ("stage-0".into(), "FROM busybox@sha256:ab".into()));
        assert_eq!(split_name("[push] pushing r/x:1"), ("push".into(), "pushing r/x:1".into()));
        assert_eq!(split_name("[linux/arm64 build 1/2] COPY a b"), ("linux/arm64 build".into(), "COPY a b".into()));
        assert_eq!(split_name("exporting"), (String::new(), "exporting".into()));
    }

    #[test]
    fn steps_get_their_times_cache_state_and_log_lines() {
        let mut r = StepRecorder::new(Instant::now());
        r.add(&Event::Started { id: 1, name: "[a 1/1] RUN x".into() }, 1);
        r.add(&Event::Started { id: 2, name: "[b 1/1] RUN y".into() }, 1);
        r.add(&Event::Log { id: 1, stream: 1, data: "one\ntwo\n".into() }, 2);
        r.add(&Event::Completed { id: 2, cached: true, seconds: 0.0, error: None }, 1);
        r.add(&Event::Completed { id: 1, cached: false, seconds: 0.0, error: Some("boom".into()) }, 1);
        let live = r.live();
        assert!(live.iter().all(|(_, running)| !running), "every step completed");
        r.add(&Event::Started { id: 3, name: "[b 2/2] RUN z".into() }, 1);
        assert_eq!(r.live().iter().map(|(s, running)| (s.id, *running)).collect::<Vec<_>>(), [(1, false), (2, false), (3, true)]);
        let s = r.steps();
        assert_eq!(
            (s[0].stage.as_str(), s[0].name.as_str(), s[0].cached, s[0].error.as_str(), s[0].log_lines),
            ("a", "RUN x", false, "boom", 2)
        );
        assert_eq!((s[1].stage.as_str(), s[1].cached, s[1].log_lines), ("b", true, 0));
        assert!(s.iter().all(|s| s.end_ms >= s.start_ms));
    }

    /// The output of a step is its lines only: not its name line, not its DONE line, not
    /// another step's lines, even when its output looks like a status line.
    #[test]
    fn the_build_log_splits_per_step() {
        let log = "#1 [a 1/1] RUN x\n#2 [b 1/1] RUN y\n#1 one\n#2 CACHED\n#1 DONE 0.5s\nWARNING: w\n#1 DONE 2.0s\n";
        let mut steps =
            vec![v1::BuildStep { id: 1, log_lines: 2, ..Default::default() }, v1::BuildStep { id: 2, log_lines: 0, ..Default::default() }];
        split_log(log, &mut steps);
        assert_eq!(steps[0].log, "one\nDONE 0.5s\n", "its own output, though it looks like a status");
        assert_eq!(steps[1].log, "");
    }
    /// A keyed step: id, stage, instruction, parent state, own inputs; its key and state
    /// are made of them.
    fn keyed(id: u32, stage: &str, name: &str, parent: &str, inputs: &[&str]) -> v1::BuildStep {
        let op = format!("op:{name}");
        let key = format!("k({parent}|{op}|{})", inputs.join(","));
        v1::BuildStep {
            id,
            stage: stage.into(),
            name: name.into(),
            line: id,
            cache_key: key.clone(),
            parent_key: parent.into(),
            state_key: key,
            op_digest: op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn base(id: u32, stage: &str, digest: &str) -> v1::BuildStep {
        v1::BuildStep {
            id,
            stage: stage.into(),
            name: format!("FROM busybox@{digest}"),
            state_key: format!("base:{digest}"),
            ..Default::default()
        }
    }

    /// A two-stage build: `deps` (from the base, one RUN) and `app` (from the base, COPY
    /// --from=deps, COPY of context files `ctx`, RUN).
    fn build(digest: &str, ctx: &str) -> Vec<v1::BuildStep> {
        let b = base(1, "deps", digest);
        let d = keyed(2, "deps", "RUN make deps", &b.state_key, &[]);
        let b2 = base(3, "app", digest);
        let c1 = keyed(4, "app", "COPY --from=deps /deps /deps", &b2.state_key, &[&format!("stage {}", d.state_key)]);
        let c2 = keyed(5, "app", "COPY app.txt /app.txt", &c1.state_key, &[&format!("sources {ctx}")]);
        let r = keyed(6, "app", "RUN build", &c2.state_key, &[]);
        vec![b, d, b2, c1, c2, r]
    }

    fn record(id: &str, steps: Vec<v1::BuildStep>) -> v1::BuildRecord {
        v1::BuildRecord { id: id.into(), steps, ..Default::default() }
    }

    fn reason(steps: &[v1::BuildStep], id: u32, previous: &[v1::BuildRecord]) -> Option<(&'static str, String)> {
        miss_reason(steps.iter().find(|s| s.id == id).unwrap(), steps, previous)
    }

    #[test]
    fn a_first_build_and_a_cached_step_have_no_earlier_cause() {
        let steps = build("sha256:aaaa", "c1");
        assert_eq!(reason(&steps, 6, &[]).unwrap().0, "first", "no earlier build");
        let other = record("b0", vec![keyed(6, "other-stage", "RUN build", "x", &[])]);
        assert_eq!(reason(&steps, 6, &[other]).unwrap().0, "first", "the same instruction in another stage is another step");
        let mut cached = steps.clone();
        cached[5].cached = true;
        assert_eq!(reason(&cached, 6, &[]), None, "a cached step did not miss");
        assert_eq!(reason(&steps, 1, &[]), None, "a base image is no step");
        let mut unkeyed = steps.clone();
        unkeyed[5].cache_key.clear();
        assert_eq!(reason(&unkeyed, 6, &[]), None, "a step that failed before it was keyed: unknown");
    }

    #[test]
    fn changed_context_files_and_the_steps_below() {
        let before = record("b1", build("sha256:aaaa", "c1"));
        let mut now = build("sha256:aaaa", "c2");
        now[0].cached = true;
        now[1].cached = true;
        now[2].cached = true;
        now[3].cached = true;
        let (kind, detail) = reason(&now, 5, std::slice::from_ref(&before)).unwrap();
        assert_eq!((kind, detail.as_str()), ("context", "the files it copies changed"));
        let (kind, detail) = reason(&now, 6, std::slice::from_ref(&before)).unwrap();
        assert_eq!(kind, "parent");
        assert!(detail.contains("COPY app.txt"), "names the step above: {detail}");
        // A context bind mount counts as context files too.
        let mut m = now.clone();
        m[5].inputs = vec!["context sha256:new".into()];
        let mut b = before.clone();
        b.steps[5].inputs = vec!["context sha256:old".into()];
        b.steps[5].parent_key = m[5].parent_key.clone();
        assert_eq!(reason(&m, 6, &[b]).unwrap().0, "context");
    }

    #[test]
    fn a_new_base_image_digest() {
        let before = record("b1", build("sha256:aaaaaaaaaaaaaaaa", "c1"));
        let now = build("sha256:bbbbbbbbbbbbbbbb", "c1");
        let (kind, detail) = reason(&now, 2, std::slice::from_ref(&before)).unwrap();
        assert_eq!(kind, "base");
        assert_eq!(detail, "the base image changed (aaaaaaaaaaaa → bbbbbbbbbbbb)");
        assert_eq!(reason(&now, 4, std::slice::from_ref(&before)).unwrap().0, "base", "the first step of the other stage too");
        assert_eq!(reason(&now, 5, std::slice::from_ref(&before)).unwrap().0, "parent");
    }

    #[test]
    fn a_stage_it_reads_changed() {
        let before = record("b1", build("sha256:aaaa", "c1"));
        let mut now = build("sha256:aaaa", "c1");
        // deps' RUN changed its instruction: its state differs, and the COPY --from reads it.
        now[1] = keyed(2, "deps", "RUN make deps2", &now[0].state_key, &[]);
        now[3] = keyed(4, "app", "COPY --from=deps /deps /deps", &now[2].state_key, &[&format!("stage {}", now[1].state_key)]);
        let (kind, detail) = reason(&now, 4, std::slice::from_ref(&before)).unwrap();
        assert_eq!(kind, "stage");
        assert!(detail.contains("`deps`"), "{detail}");
        // The RUN: matched by its line, its instruction changed.
        let (kind, detail) = reason(&now, 2, std::slice::from_ref(&before)).unwrap();
        assert_eq!(kind, "instruction");
        assert!(detail.contains("was `RUN make deps`"), "{detail}");
    }

    #[test]
    fn a_build_arg_or_the_environment_changed() {
        let mut old = build("sha256:aaaa", "c1");
        old[5].args = vec!["VERSION=sha256:1".into(), "KEEP=sha256:k".into()];
        let before = record("b1", old);
        let mut now = build("sha256:aaaa", "c1");
        now[5].args = vec!["VERSION=sha256:2".into(), "KEEP=sha256:k".into()];
        now[5].op_digest = "op:other".into();
        assert_eq!(reason(&now, 6, std::slice::from_ref(&before)).unwrap(), ("build-arg", "build-arg VERSION changed".to_string()));
        // The same instruction text and args, another operation: an ENV above it.
        now[5].args = before.steps[5].args.clone();
        let (kind, detail) = reason(&now, 6, std::slice::from_ref(&before)).unwrap();
        assert_eq!(kind, "instruction");
        assert!(detail.contains("environment"), "{detail}");
    }

    #[test]
    fn the_newest_earlier_build_counts_and_a_collected_record_is_evicted() {
        let old = record("b1", build("sha256:aaaa", "c0"));
        let prev = record("b2", build("sha256:aaaa", "c1"));
        let now = build("sha256:aaaa", "c1");
        // Against b2 (newest first) nothing changed: its record was collected.
        let (kind, detail) = reason(&now, 5, &[prev.clone(), old.clone()]).unwrap();
        assert_eq!(kind, "evicted");
        assert!(detail.contains("b2"), "{detail}");
        assert_eq!(reason(&now, 5, &[old, prev]).unwrap().0, "context", "against b1, the files changed");
        let mut nc = now.clone();
        nc[4].no_cache = true;
        assert_eq!(reason(&nc, 5, &[]).unwrap().0, "no-cache");
    }

    #[test]
    fn dependencies_and_the_critical_path() {
        let mut steps = build("sha256:aaaa", "c1");
        // deps: base 0-100, RUN 100-5000; app: base 0-50, COPY --from 5000-5100, COPY 60-80
        // (done early: no, it runs after the COPY --from), RUN 5100-6000; a push after all.
        let times = [(0, 100), (100, 5000), (0, 50), (5000, 5100), (5100, 5150), (5150, 6000)];
        for (s, (a, b)) in steps.iter_mut().zip(times) {
            s.start_ms = a;
            s.end_ms = b;
        }
        steps.push(v1::BuildStep {
            id: 7,
            name: "pushing r/x:1".into(),
            stage: "push".into(),
            start_ms: 6000,
            end_ms: 9000,
            ..Default::default()
        });
        link(&mut steps);
        let deps: Vec<(u32, Vec<u32>)> = steps.iter().map(|s| (s.id, s.deps.clone())).collect();
        assert_eq!(deps, [(1, vec![]), (2, vec![1]), (3, vec![]), (4, vec![3, 2]), (5, vec![4]), (6, vec![5]), (7, vec![])]);
        assert_eq!(critical_path(&steps), [1, 2, 4, 5, 6], "through the slow stage it copies from, not its own base");
        // Finished: the flags are set, and reasons only where a step ran.
        steps[0].cached = true;
        finish(&mut steps, &[], "");
        let critical: Vec<u32> = steps.iter().filter(|s| s.critical).map(|s| s.id).collect();
        assert_eq!(critical, [1, 2, 4, 5, 6]);
        assert!(steps[0].miss_reason.is_empty() && steps[6].miss_reason.is_empty());
        assert_eq!(steps[5].miss_reason, "first");
        assert!(critical_path(&[]).is_empty());
    }

    #[test]
    fn the_lines_of_from_instructions() {
        let df = "# syntax=docker/dockerfile:1\nFROM a AS x\n# FROM not\nRUN echo \\\n  FROM not\nrun <<EOF\nFROM not either\nEOF\n  from b\n\nCOPY --from=x / /\nFROM c\n";
        assert_eq!(from_lines(df), [2, 9, 12]);
        let bt = "# escape=`\nFROM a\nRUN x `\nFROM not\nFROM b\n";
        assert_eq!(from_lines(bt), [2, 5], "the escape directive");
        // finish gives base image vertices their FROM's line
        let mut steps = vec![v1::BuildStep { id: 1, from_index: 2, state_key: "s".into(), ..Default::default() }];
        finish(&mut steps, &[], df);
        assert_eq!(steps[0].line, 9);
    }

    #[test]
    fn a_long_dockerfile_is_cut_at_a_line() {
        let (text, cut) = dockerfile_text(b"FROM x\nRUN y\n");
        assert_eq!((text.as_str(), cut), ("FROM x\nRUN y\n", false));
        let long = "RUN echo 0123456789\n".repeat(MAX_DOCKERFILE / 10);
        let (text, cut) = dockerfile_text(long.as_bytes());
        assert!(cut && text.len() <= MAX_DOCKERFILE && text.ends_with('\n'));
    }

    #[test]
    fn key_events_fill_in_a_step() {
        let mut r = StepRecorder::new(Instant::now());
        r.add(&Event::Started { id: 1, name: "[a 1/1] RUN x".into() }, 1);
        let d = format!("sha256:{}", "ab".repeat(32));
        let key = hoist_engine::progress::StepKey {
            id: 1,
            line: 3,
            cache_key: "cd".repeat(32),
            inputs: vec![("sources".into(), d.clone()), ("git".into(), "0123abc".into())],
            args: vec![format!("V={d}")],
            layer_bytes: 42,
            ..Default::default()
        };
        r.add(&Event::Key(Box::new(key)), 0);
        let s = &r.steps()[0];
        assert_eq!((s.line, s.cache_key.as_str(), s.layer_bytes), (3, "cdcdcdcdcdcdcdcd", 42), "keys kept to 16 digits");
        assert_eq!(s.inputs, ["sources abababababababab", "git 0123abc"], "other text kept whole");
        assert_eq!(s.args, ["V=abababababababab"]);
    }
}
