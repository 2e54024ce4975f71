//! Progress display like buildx: `plain` prints one line per vertex event (`#3 [app 2/4] RUN
//! make`, its output, `#3 DONE 1.2s` or `#3 CACHED`), `tty` keeps a live view of running
//! steps, `rawjson` prints every event as a JSON line, `quiet` prints nothing.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::bail;
use hoist_client::v1::build_event;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plain,
    Tty,
    RawJson,
    Quiet,
}

impl Mode {
    /// `--progress` value; `auto` is tty on a terminal, plain otherwise.
    pub fn parse(s: &str, terminal: bool) -> anyhow::Result<Mode> {
        Ok(match s {
            "auto" => {
                if terminal {
                    Mode::Tty
                } else {
                    Mode::Plain
                }
            }
            "plain" => Mode::Plain,
            "tty" => Mode::Tty,
            "rawjson" => Mode::RawJson,
            "quiet" | "none" => Mode::Quiet,
            other => bail!("--progress {other:?}: expected auto, plain, tty, rawjson, quiet or none"),
        })
    }
}

struct Vertex {
    name: String,
    started: Instant,
    bar: Option<ProgressBar>,
    partial: Vec<u8>,
    /// The last lines of its log (with their times), for the report of a failed step.
    tail: std::collections::VecDeque<String>,
}

/// Lines of a failed step's log the report repeats (buildx shows its last lines too).
const TAIL_LINES: usize = 10;

/// Renders build events to stderr.
pub struct Renderer {
    mode: Mode,
    start: Instant,
    vertices: HashMap<u32, Vertex>,
    multi: Option<MultiProgress>,
    next_internal: u32,
    /// The first step that failed: its name and the tail of its log.
    failed: Option<(String, Vec<String>)>,
}

impl Renderer {
    pub fn new(mode: Mode) -> Renderer {
        let multi = (mode == Mode::Tty).then(MultiProgress::new);
        Renderer { mode, start: Instant::now(), vertices: HashMap::new(), multi, next_internal: 10_000, failed: None }
    }

    fn line(&self, s: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(s);
            }
            None => {
                let _ = writeln!(std::io::stderr(), "{s}");
            }
        }
    }

    /// A client-side vertex (context transfer); returns its id.
    pub fn internal(&mut self, name: &str) -> u32 {
        self.next_internal += 1;
        let id = self.next_internal;
        self.started(id, name.to_string());
        id
    }

    /// Finish a client-side vertex.
    pub fn internal_done(&mut self, id: u32, seconds: f64, detail: &str) {
        if self.mode == Mode::Plain && !detail.is_empty() {
            self.line(&format!("#{id} {detail}"));
        }
        self.completed(id, false, seconds, "");
    }

    /// A line outside any vertex.
    pub fn note(&mut self, msg: &str) {
        match self.mode {
            Mode::Quiet => {}
            Mode::RawJson => eprintln!("{}", serde_json::json!({ "note": msg })),
            _ => self.line(&format!("=> {msg}")),
        }
    }

    fn started(&mut self, id: u32, name: String) {
        let bar = match (&self.multi, self.mode) {
            (Some(m), Mode::Tty) => {
                let b = m.add(ProgressBar::new_spinner());
                b.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
                b.set_message(name.clone());
                b.enable_steady_tick(Duration::from_millis(120));
                Some(b)
            }
            _ => None,
        };
        match self.mode {
            Mode::Plain => self.line(&format!("#{id} {name}")),
            Mode::RawJson => eprintln!("{}", serde_json::json!({ "vertex": id, "started": name })),
            _ => {}
        }
        self.vertices.insert(id, Vertex { name, started: Instant::now(), bar, partial: Vec::new(), tail: Default::default() });
    }

    fn completed(&mut self, id: u32, cached: bool, seconds: f64, error: &str) {
        let v = self.vertices.remove(&id);
        if let Some(b) = v.as_ref().and_then(|v| v.bar.as_ref()) {
            b.finish_and_clear();
        }
        let name = v.as_ref().map(|v| v.name.clone()).unwrap_or_default();
        if let Some(v) = &v {
            if !v.partial.is_empty() && self.mode == Mode::Plain {
                let elapsed = v.started.elapsed().as_secs_f64();
                self.line(&format!("#{id} {elapsed:.3} {}", String::from_utf8_lossy(&v.partial)));
            }
            if !error.is_empty() && self.failed.is_none() {
                let mut tail: Vec<String> = v.tail.iter().cloned().collect();
                if !v.partial.is_empty() {
                    tail.push(format!("{:.3} {}", v.started.elapsed().as_secs_f64(), String::from_utf8_lossy(&v.partial)));
                }
                self.failed = Some((name.clone(), tail));
            }
        }
        let status = if !error.is_empty() {
            format!("ERROR: {error}")
        } else if cached {
            "CACHED".to_string()
        } else {
            format!("DONE {seconds:.1}s")
        };
        match self.mode {
            Mode::Plain => self.line(&format!("#{id} {status}")),
            Mode::Tty => self.line(&format!("{} {name}  {status}", if error.is_empty() { "✓" } else { "✗" })),
            Mode::RawJson => eprintln!("{}", serde_json::json!({ "vertex": id, "cached": cached, "seconds": seconds, "error": error })),
            Mode::Quiet => {}
        }
    }

    fn log(&mut self, id: u32, stream: u32, data: &[u8]) {
        match self.mode {
            Mode::RawJson => {
                eprintln!("{}", serde_json::json!({ "vertex": id, "stream": stream, "data": String::from_utf8_lossy(data) }));
                return;
            }
            Mode::Quiet => return,
            _ => {}
        }
        let Some(v) = self.vertices.get_mut(&id) else { return };
        v.partial.extend_from_slice(data);
        let mut lines = Vec::new();
        while let Some(pos) = v.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = v.partial.drain(..=pos).collect();
            lines.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        let elapsed = v.started.elapsed().as_secs_f64();
        if let Some(b) = &v.bar {
            if let Some(last) = lines.last() {
                b.set_message(format!("{} | {}", v.name, last.chars().take(60).collect::<String>()));
            }
        }
        for l in &lines {
            if v.tail.len() == TAIL_LINES {
                v.tail.pop_front();
            }
            v.tail.push_back(format!("{elapsed:.3} {l}"));
        }
        for l in lines {
            self.line(&format!("#{id} {elapsed:.3} {l}"));
        }
    }

    /// Render one event from the builder.
    pub fn event(&mut self, ev: build_event::Event) {
        match ev {
            build_event::Event::Started(s) => self.started(s.id, s.name),
            build_event::Event::Completed(c) => self.completed(c.id, c.cached, c.seconds, &c.error),
            build_event::Event::Log(l) => self.log(l.id, l.stream, &l.data),
            build_event::Event::Warning(w) => match self.mode {
                Mode::Quiet => {}
                Mode::RawJson => eprintln!("{}", serde_json::json!({ "warning": w })),
                _ => self.line(&format!("WARNING: {w}")),
            },
            build_event::Event::Queued(q) => match self.mode {
                Mode::Quiet => {}
                Mode::RawJson => eprintln!("{}", serde_json::json!({ "queued": { "running": q.running, "limit": q.limit } })),
                _ => self.line(&format!(
                    "waiting for a build slot: the project already runs {} of its {} builds at once (hoist project limit NAME --builds N)",
                    q.running, q.limit
                )),
            },
            build_event::Event::Output(_)
            | build_event::Event::Result(_)
            | build_event::Event::Export(_)
            | build_event::Event::Ssh(_)
            | build_event::Event::ContextRequest(_)
            | build_event::Event::CredentialRequest(_) => {}
        }
    }

    /// buildx's report of a failed step, printed before the error: the tail of the step's
    /// log, then the Dockerfile around the failing instruction (`error` names it as
    /// `FILE:LINE: ...`). `None` when no step failed or the error names no line of `file`.
    pub fn failure_report(&self, error: &str, file: &str, dockerfile: &[u8]) -> Option<String> {
        if matches!(self.mode, Mode::Quiet | Mode::RawJson) {
            return None;
        }
        let mut out = String::new();
        if let Some((name, tail)) = &self.failed {
            out.push_str(&format!("------\n > {name}:\n"));
            for l in tail {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str("------\n");
        }
        let line: usize = error.strip_prefix(file)?.strip_prefix(':')?.split(':').next()?.parse().ok()?;
        out.push_str(&dockerfile_excerpt(file, &String::from_utf8_lossy(dockerfile), line)?);
        Some(out)
    }

    /// Stop live output.
    pub fn finish(&mut self) {
        for (_, v) in self.vertices.drain() {
            if let Some(b) = v.bar {
                b.finish_and_clear();
            }
        }
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
        let _ = self.start;
    }
}

impl hoist_client::build::BuildObserver for Renderer {
    fn event(&mut self, event: build_event::Event) {
        Renderer::event(self, event);
    }

    fn note(&mut self, line: &str) {
        Renderer::note(self, line);
    }
}

/// The Dockerfile around `line` (1-based) as buildx prints it: up to four lines before, the
/// instruction marked `>>>` (with its continuation lines), and two after.
fn dockerfile_excerpt(file: &str, text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    if line == 0 || line > lines.len() {
        return None;
    }
    let mut last = line;
    while last < lines.len() && lines[last - 1].trim_end().ends_with('\\') {
        last += 1;
    }
    let (from, to) = (line.saturating_sub(4).max(1), (last + 2).min(lines.len()));
    let width = to.to_string().len().max(3);
    let mut out = format!("{file}:{line}\n--------------------\n");
    for (n, text) in lines.iter().enumerate().take(to).skip(from - 1).map(|(i, t)| (i + 1, t)) {
        let mark = if (line..=last).contains(&n) { ">>>" } else { "   " };
        out.push_str(&format!("{n:>width$} | {mark} {text}\n"));
    }
    out.push_str("--------------------\n");
    Some(out)
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    #[test]
    fn the_excerpt_marks_the_instruction_and_its_continuations() {
        let df = "FROM a\nRUN one\nRUN two \\\n  more\nRUN three\nRUN four\nRUN five\n";
        let ex = dockerfile_excerpt("Dockerfile", df, 3).unwrap();
        assert_eq!(
            ex,
            "Dockerfile:3\n--------------------\n  1 |     FROM a\n  2 |     RUN one\n  3 | >>> RUN two \\\n  4 | >>>   more\n  5 |     RUN three\n  6 |     RUN four\n--------------------\n"
        );
        assert!(dockerfile_excerpt("Dockerfile", df, 99).is_none());
    }

    #[test]
    fn the_report_has_the_failed_steps_log_tail_and_the_excerpt() {
        let mut r = Renderer::new(Mode::Plain);
        r.started(1, "[stage-0 2/2] RUN make".into());
        for i in 0..15 {
            r.log(1, 1, format!("line {i}\n").as_bytes());
        }
        r.log(1, 2, b"no newline");
        r.completed(1, false, 0.1, "Dockerfile:2: RUN make: exit code: 2");
        let report = r.failure_report("Dockerfile:2: RUN make: exit code: 2", "Dockerfile", b"FROM a\nRUN make\n").unwrap();
        assert!(report.starts_with("------\n > [stage-0 2/2] RUN make:\n"), "{report}");
        assert!(!report.contains("line 4\n") && report.contains("line 5\n") && report.contains("line 14\n"), "the last lines: {report}");
        assert!(report.contains("no newline\n------\nDockerfile:2\n"), "{report}");
        assert!(report.contains("  2 | >>> RUN make\n"), "{report}");
        assert!(r.failure_report("an error naming no line", "Dockerfile", b"FROM a\n").is_none());
    }
}
