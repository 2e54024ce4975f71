//! The UI's pages as HTML strings: sign-in, a project's builds, one build's waterfall.

use std::fmt::Write;

use hoist_proto::v1;

use crate::auth::Caller;

const STYLE: &str = include_str!("style.css");

/// Escape text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(title: &str, who: Option<&Caller>, body: &str) -> String {
    let nav = match who {
        Some(c) => format!(
            r#"<nav><a href="/ui/builds">builds</a> <a href="/ui/project">project</a> <span class="who">project <b id="project">{}</b> as {}</span> <form method="post" action="/ui/signout"><button>sign out</button></form></nav>"#,
            esc(&c.project),
            esc(&c.who)
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{} · hoist</title><style>{STYLE}</style></head><body>{nav}<main>{body}</main></body></html>\n",
        esc(title)
    )
}

/// The sign-in form, with an error if the last attempt failed.
pub(super) fn signin(error: Option<&str>) -> String {
    let error = error.map(|e| format!(r#"<p class="error" id="error">{}</p>"#, esc(e))).unwrap_or_default();
    page(
        "sign in",
        None,
        &format!(
            r#"<h1>hoist builder</h1>{error}<form method="post" action="/ui/signin" id="signin"><label>project token <input type="password" name="token" id="token" autocomplete="off" required></label> <button id="go">sign in</button></form><p>Or run <code>hoist builds open</code> for a one-time link.</p>"#
        ),
    )
}

/// The page of a build that is not the caller's project's (or does not exist): nothing of it.
pub(super) fn not_found(who: &Caller) -> String {
    page("not found", Some(who), r#"<h1>not found</h1><p>No such build in this project.</p>"#)
}

/// The builds page's filter (query string `?tag=...&status=...`).
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct Filter {
    #[serde(default)]
    tag: String,
    #[serde(default)]
    status: String,
}

impl Filter {
    /// Whether `b` passes: a tag filter matches a tag containing it, a status filter the
    /// status exactly; empty filters pass everything.
    fn passes(&self, b: &v1::BuildRecord) -> bool {
        (self.tag.is_empty() || b.tags.iter().any(|t| t.contains(self.tag.as_str()))) && (self.status.is_empty() || b.status == self.status)
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of unix seconds.
fn when(secs: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0).map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_default()
}

/// A project's builds, newest first, filtered.
pub(super) fn builds(who: &Caller, builds: &[v1::BuildRecord], f: &Filter) -> String {
    let mut rows = String::new();
    for b in builds.iter().filter(|b| f.passes(b)) {
        let _ = write!(
            rows,
            r#"<tr class="build {status}"><td><a href="/ui/builds/{id}">{id}</a></td><td>{started}</td><td class="status">{status}</td><td>{who}</td><td>{secs:.1}s</td><td>{run} run, {cached} cached</td><td>{sent}</td><td>{tags}</td></tr>"#,
            id = esc(&b.id),
            started = when(b.started),
            status = esc(&b.status),
            who = esc(&b.who),
            secs = b.seconds,
            run = b.steps_run,
            cached = b.steps_cached,
            sent = human_bytes(b.context_bytes_sent),
            tags = esc(&b.tags.join(", ")),
        );
    }
    let status_opt = |s: &str| format!(r#"<option{}>{s}</option>"#, if f.status == s { " selected" } else { "" });
    let body = format!(
        r#"<h1>builds</h1><form method="get" class="filter" id="filter"><label>tag <input name="tag" value="{tag}"></label> <label>status <select name="status"><option value="">any</option>{ok}{failed}{cancelled}</select></label> <button>filter</button></form><table id="builds"><thead><tr><th>build</th><th>started (UTC)</th><th>status</th><th>who</th><th>duration</th><th>steps</th><th>context sent</th><th>tags</th></tr></thead><tbody>{rows}</tbody></table>"#,
        tag = esc(&f.tag),
        ok = status_opt("ok"),
        failed = status_opt("failed"),
        cancelled = status_opt("cancelled"),
    );
    page("builds", Some(who), &body)
}

/// Where a step's bar sits on the time axis, in percent of the build's span.
#[derive(Debug, PartialEq)]
pub(super) struct Bar {
    pub left: f64,
    pub width: f64,
}

/// The narrowest bar drawn (a cached step takes about no time, and is still seen).
const MIN_WIDTH: f64 = 0.5;

/// The bars of `steps` over a time axis from 0 to the latest end (at least 1 ms): each at
/// its start, as wide as it took, never narrower than [`MIN_WIDTH`] nor past the end.
pub(super) fn bars(steps: &[v1::BuildStep]) -> Vec<Bar> {
    let span = steps.iter().map(|s| s.end_ms).max().unwrap_or(0).max(1) as f64;
    steps
        .iter()
        .map(|s| {
            let left = (s.start_ms as f64 / span * 100.0).min(100.0 - MIN_WIDTH);
            let width = ((s.end_ms.saturating_sub(s.start_ms)) as f64 / span * 100.0).max(MIN_WIDTH).min(100.0 - left);
            Bar { left, width }
        })
        .collect()
}

/// `text` without ANSI escape sequences (colours, cursor moves) and carriage returns.
pub(super) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte @..~
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// One build: its facts, and a waterfall of its steps with their logs; `running` says which
/// steps still run (a running build's page follows it without a reload).
pub(super) fn build(who: &Caller, b: &v1::BuildRecord, running: &[bool]) -> String {
    let mut body = format!(
        r#"<h1>build <span id="build-id">{id}</span></h1><dl class="facts"><dt>status</dt><dd id="status" class="{status}">{status}</dd><dt>started</dt><dd>{started} UTC</dd><dt>duration</dt><dd>{secs:.1}s</dd><dt>who</dt><dd>{who}</dd><dt>steps</dt><dd>{run} run, {cached} cached</dd><dt>context</dt><dd>{files} files sent ({sent}) of {entries}</dd><dt>tags</dt><dd>{tags}</dd><dt>image</dt><dd><code>{image}</code></dd></dl>"#,
        id = esc(&b.id),
        status = esc(&b.status),
        started = when(b.started),
        secs = b.seconds,
        who = esc(&b.who),
        run = b.steps_run,
        cached = b.steps_cached,
        files = b.context_files_sent,
        sent = human_bytes(b.context_bytes_sent),
        entries = b.context_entries,
        tags = esc(&b.tags.join(", ")),
        image = esc(&b.image_id),
    );
    if !b.error.is_empty() {
        let _ = write!(body, r#"<p class="error">{}</p>"#, esc(&b.error));
    }
    body.push_str("<h2>steps</h2>");
    body.push_str(&waterfall(&b.steps, running));
    if b.status == "running" {
        body.push_str(LIVE_SCRIPT);
    }
    page(&format!("build {}", b.id), Some(who), &body)
}

/// A day's builds of a project: how many, and steps run and cached.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Day {
    pub day: String,
    pub builds: u32,
    pub run: u32,
    pub cached: u32,
}

/// Per UTC day, newest first: builds and their steps run and cached.
pub(super) fn days(builds: &[v1::BuildRecord]) -> Vec<Day> {
    let mut days: std::collections::BTreeMap<String, Day> = std::collections::BTreeMap::new();
    for b in builds {
        let day = when(b.started).chars().take(10).collect::<String>();
        let d = days.entry(day.clone()).or_insert_with(|| Day { day, ..Default::default() });
        d.builds += 1;
        d.run += b.steps_run;
        d.cached += b.steps_cached;
    }
    days.into_values().rev().collect()
}

/// The `n` slowest steps that ran (not from the cache) across `builds`: (build id, step).
pub(super) fn slowest(builds: &[v1::BuildRecord], n: usize) -> Vec<(&str, &v1::BuildStep)> {
    let mut all: Vec<_> = builds.iter().flat_map(|b| b.steps.iter().filter(|s| !s.cached).map(move |s| (b.id.as_str(), s))).collect();
    all.sort_by_key(|(_, s)| std::cmp::Reverse(s.end_ms.saturating_sub(s.start_ms)));
    all.truncate(n);
    all
}

/// The project page: cache hit rate per day and the slowest steps of recent builds.
pub(super) fn project(who: &Caller, builds: &[v1::BuildRecord]) -> String {
    let mut body = format!(
        r#"<h1>project {}</h1><p>Over the last {} builds.</p><h2>cache hits per day</h2><table id="days"><thead><tr><th>day (UTC)</th><th>builds</th><th>steps run</th><th>cached</th><th>hit rate</th></tr></thead><tbody>"#,
        esc(&who.project),
        builds.len()
    );
    for d in days(builds) {
        let total = d.run + d.cached;
        let rate = if total == 0 { "-".to_string() } else { format!("{:.0}%", f64::from(d.cached) * 100.0 / f64::from(total)) };
        let _ = write!(
            body,
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class="rate">{rate}</td></tr>"#,
            d.day, d.builds, d.run, d.cached
        );
    }
    body.push_str(r#"</tbody></table><h2>slowest steps</h2><table id="slowest"><thead><tr><th>duration</th><th>stage</th><th>instruction</th><th>build</th></tr></thead><tbody>"#);
    for (id, s) in slowest(builds, 10) {
        let _ = write!(
            body,
            r#"<tr><td class="duration">{}</td><td>{}</td><td><code class="name">{}</code></td><td><a href="/ui/builds/{id}">{id}</a></td></tr>"#,
            seconds(s.end_ms.saturating_sub(s.start_ms)),
            esc(&s.stage),
            esc(&s.name),
            id = esc(id),
        );
    }
    body.push_str("</tbody></table>");
    page("project", Some(who), &body)
}

/// Replaces the waterfall with each update of the build's event stream; reloads when the
/// build is over (its record is then complete).
const LIVE_SCRIPT: &str = r#"<script>
const updates = new EventSource(location.pathname + "/events");
updates.onmessage = (e) => { document.getElementById("waterfall").outerHTML = e.data; };
updates.addEventListener("done", () => { updates.close(); location.reload(); });
</script>"#;

/// The waterfall of `steps`: a bar per step on the time axis, its instruction, duration and
/// state (running, cached, ran, failed), and its log collapsed.
pub(super) fn waterfall(steps: &[v1::BuildStep], running: &[bool]) -> String {
    let mut body = String::from(r#"<ol id="waterfall" class="waterfall">"#);
    for (i, (s, bar)) in steps.iter().zip(bars(steps)).enumerate() {
        let state = if running.get(i).copied().unwrap_or(false) {
            "running"
        } else if !s.error.is_empty() {
            "failed"
        } else if s.cached {
            "cached"
        } else {
            "ran"
        };
        let log = if s.log.is_empty() {
            String::new()
        } else {
            format!(
                r#"<details class="log"><summary>log ({} lines)</summary><pre>{}</pre></details>"#,
                s.log_lines,
                esc(&strip_ansi(&s.log))
            )
        };
        let error = if s.error.is_empty() { String::new() } else { format!(r#"<p class="error">{}</p>"#, esc(&s.error)) };
        let _ = write!(
            body,
            r#"<li class="step {state}" data-id="{id}"><div class="label"><span class="stage">{stage}</span> <code class="name">{name}</code></div><div class="axis"><div class="bar" style="left:{left:.2}%;width:{width:.2}%" title="{start} → {end}"></div></div><div class="meta"><span class="duration">{dur}</span> <span class="state">{state}</span></div>{error}{log}</li>"#,
            id = s.id,
            stage = esc(&s.stage),
            name = esc(&s.name),
            left = bar.left,
            width = bar.width,
            start = seconds(s.start_ms),
            end = seconds(s.end_ms),
            dur = seconds(s.end_ms.saturating_sub(s.start_ms)),
        );
    }
    body.push_str("</ol>");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: u32, start_ms: u64, end_ms: u64, cached: bool) -> v1::BuildStep {
        v1::BuildStep { id, name: format!("RUN step {id}"), stage: "s".into(), start_ms, end_ms, cached, ..Default::default() }
    }

    #[test]
    fn bars_sit_at_their_start_and_are_as_wide_as_they_took() {
        let b = bars(&[step(1, 0, 500, false), step(2, 500, 1000, false), step(3, 250, 250, true)]);
        assert_eq!(b[0], Bar { left: 0.0, width: 50.0 });
        assert_eq!(b[1], Bar { left: 50.0, width: 50.0 });
        assert_eq!(b[2], Bar { left: 25.0, width: MIN_WIDTH }, "a cached step is still seen");
        let end = bars(&[step(1, 1000, 1000, true)]);
        assert!(end[0].left + end[0].width <= 100.0, "never past the end: {:?}", end[0]);
        assert!(bars(&[]).is_empty());
        assert_eq!(bars(&[step(1, 0, 0, true)])[0], Bar { left: 0.0, width: MIN_WIDTH }, "a build of no time");
    }

    #[test]
    fn the_filter_matches_tags_and_status() {
        let b = v1::BuildRecord { status: "ok".into(), tags: vec!["reg/app:1".into()], ..Default::default() };
        let f = |tag: &str, status: &str| Filter { tag: tag.into(), status: status.into() }.passes(&b);
        assert!(f("", ""));
        assert!(f("app", ""));
        assert!(f("app:1", "ok"));
        assert!(!f("other", ""));
        assert!(!f("", "failed"));
        assert!(!f("app", "o"), "a status matches exactly");
    }

    #[test]
    fn hit_rate_per_day_and_the_slowest_steps_that_ran() {
        let rec = |id: &str, started: i64, run: u32, cached: u32, steps: Vec<v1::BuildStep>| v1::BuildRecord {
            id: id.into(),
            started,
            steps_run: run,
            steps_cached: cached,
            steps,
            ..Default::default()
        };
        let builds = [
            rec("b3", 86_400 + 10, 1, 3, vec![step(1, 0, 9000, true), step(2, 0, 300, false)]),
            rec("b2", 86_400, 0, 4, vec![]),
            rec("b1", 5, 4, 0, vec![step(1, 0, 2000, false), step(2, 2000, 2100, false)]),
        ];
        let d = days(&builds);
        assert_eq!(d[0], Day { day: "1970-01-02".into(), builds: 2, run: 1, cached: 7 });
        assert_eq!(d[1], Day { day: "1970-01-01".into(), builds: 1, run: 4, cached: 0 });
        let slow: Vec<_> = slowest(&builds, 2).into_iter().map(|(id, s)| (id, s.id)).collect();
        assert_eq!(slow, [("b1", 1), ("b3", 2)], "cached steps are not slow steps");
    }

    #[test]
    fn ansi_sequences_are_stripped() {
        assert_eq!(strip_ansi("\u{1b}[1;31mred\u{1b}[0m plain\r\n"), "red plain\n");
        assert_eq!(strip_ansi("a\u{1b}]0;title\u{7}b\u{1b}]8;;x\u{1b}\\c"), "abc");
        assert_eq!(strip_ansi("trailing \u{1b}["), "trailing ");
    }

    #[test]
    fn text_of_a_build_is_escaped() {
        let who = Caller { project: "p".into(), who: "<me>".into(), token_id: None };
        let mut s = step(1, 0, 10, false);
        s.name = "RUN echo '<script>'".into();
        s.log = "<b>\u{1b}[32mok\u{1b}[0m</b>\n".into();
        s.log_lines = 1;
        let b = v1::BuildRecord { id: "x".into(), steps: vec![s], ..Default::default() };
        let html = build(&who, &b, &[]);
        assert!(!html.contains("<script>") && html.contains("RUN echo &#39;&lt;script&gt;&#39;"), "{html}");
        assert!(html.contains("&lt;b&gt;ok&lt;/b&gt;"), "{html}");
        assert!(html.contains("&lt;me&gt;"));
    }
}
