//! What a build record keeps of each step (for `hoist builds show` and the web UI): its
//! instruction text, stage, start and end (ms from the build's start), cached or ran, and
//! which lines of the build's log are its output.

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
}
