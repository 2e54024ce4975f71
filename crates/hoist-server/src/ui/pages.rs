//! The UI's pages as HTML strings: sign-in, a project's builds, one build (its waterfall,
//! Dockerfile and bytes moved), a project's trends and storage.

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

/// The sign-in form (carrying `csrf`, the value of the pre-sign-in cookie), with an error if
/// the last attempt failed.
pub(super) fn signin(error: Option<&str>, csrf: &str) -> String {
    let error = error.map(|e| format!(r#"<p class="error" id="error">{}</p>"#, esc(e))).unwrap_or_default();
    page(
        "sign in",
        None,
        &format!(
            r#"<h1>hoist builder</h1>{error}<form method="post" action="/ui/signin" id="signin"><input type="hidden" name="csrf" value="{csrf}"><label>project token <input type="password" name="token" id="token" autocomplete="off" required></label> <button id="go">sign in</button></form><p>Or run <code>hoist builds open</code> for a one-time link.</p>"#
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

/// A step's log as HTML: escaped, with ANSI colours and bold rendered as spans
/// (`ansi-b`, `ansi-fN` for the 16 colours), every other escape sequence (cursor moves,
/// titles, links) and carriage returns dropped.
pub(super) fn ansi_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut bold, mut fg): (bool, Option<u8>) = (false, None);
    let mut open = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte @..~; `m` sets colours.
                Some('[') => {
                    let mut params = String::new();
                    let mut last = None;
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            last = Some(c);
                            break;
                        }
                        params.push(c);
                    }
                    if last != Some('m') {
                        continue;
                    }
                    for p in params.split(';') {
                        match p.parse::<u8>().unwrap_or(0) {
                            0 => (bold, fg) = (false, None),
                            1 => bold = true,
                            22 => bold = false,
                            n @ 30..=37 => fg = Some(n - 30),
                            39 => fg = None,
                            n @ 90..=97 => fg = Some(n - 90 + 8),
                            _ => {}
                        }
                    }
                    if open {
                        out.push_str("</span>");
                        open = false;
                    }
                    if bold || fg.is_some() {
                        let mut class = Vec::new();
                        if bold {
                            class.push("ansi-b".to_string());
                        }
                        if let Some(f) = fg {
                            class.push(format!("ansi-f{f}"));
                        }
                        let _ = write!(out, r#"<span class="{}">"#, class.join(" "));
                        open = true;
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
            c => out.push_str(&esc(c.encode_utf8(&mut [0; 4]))),
        }
    }
    if open {
        out.push_str("</span>");
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
    body.push_str(r#"<h2>steps</h2><p class="legend">Bars marked <span class="critical-mark">●</span> are the critical path: the chain of steps, each waiting for the one before, that ended last.</p>"#);
    body.push_str(&waterfall(&b.steps, running));
    if b.status == "running" {
        body.push_str(LIVE_SCRIPT);
    } else {
        body.push_str(&bytes_moved(b));
    }
    if !b.dockerfile.is_empty() {
        body.push_str(&dockerfile(b));
    }
    page(&format!("build {}", b.id), Some(who), &body)
}

/// What a build moved: what the builder knows of it, and what it does not.
fn bytes_moved(b: &v1::BuildRecord) -> String {
    let bases: Vec<&v1::BuildStep> = b.steps.iter().filter(|s| s.cache_key.is_empty() && !s.state_key.is_empty()).collect();
    let pulled_layers: u64 = bases.iter().map(|s| s.pulled_layers).sum();
    let base_bytes: u64 = bases.iter().map(|s| s.layer_bytes).sum();
    let pulled = if bases.is_empty() {
        "not recorded".to_string()
    } else if pulled_layers == 0 {
        "nothing: the base images were here".to_string()
    } else {
        format!("{pulled_layers} layers of base images ({} in all; layers already here were not pulled)", human_bytes(base_bytes))
    };
    let pushes = b.steps.iter().filter(|s| s.stage == "push").count();
    let pushed =
        if pushes == 0 { "nothing pushed".to_string() } else { format!("{} uploaded by {pushes} pushes", human_bytes(b.bytes_pushed)) };
    format!(
        r#"<h2>bytes moved</h2><dl class="facts" id="bytes"><dt>context upload</dt><dd id="bytes-context">{} in {} files (of {} entries)</dd><dt>layers pulled</dt><dd id="bytes-pulled">{pulled}</dd><dt>pushed</dt><dd id="bytes-pushed">{pushed}</dd><dt>loaded</dt><dd id="bytes-loaded">not recorded (the client's engine reads the image after the build)</dd></dl>"#,
        human_bytes(b.context_bytes_sent),
        b.context_files_sent,
        b.context_entries,
    )
}

/// The Dockerfile, each line linked to the steps it made (with their time and cache state).
fn dockerfile(b: &v1::BuildRecord) -> String {
    let mut out = format!(r#"<h2>{}</h2><ol id="dockerfile" class="dockerfile">"#, esc(&b.dockerfile_name));
    for (i, line) in b.dockerfile.lines().enumerate() {
        let n = i as u32 + 1;
        let mut links = String::new();
        for s in b.steps.iter().filter(|s| s.line == n) {
            let _ = write!(
                links,
                r##" <a class="step-link {state}" href="#step-{id}" data-step="{id}">{dur} {state}</a>"##,
                id = s.id,
                state = state_of(s, false),
                dur = seconds(s.end_ms.saturating_sub(s.start_ms)),
            );
        }
        let _ = write!(out, r#"<li id="L{n}"><code>{}</code>{links}</li>"#, esc(line));
    }
    out.push_str("</ol>");
    if b.dockerfile_truncated {
        out.push_str("<p>(the rest of the Dockerfile was not kept)</p>");
    }
    out
}

fn state_of(s: &v1::BuildStep, running: bool) -> &'static str {
    if running {
        "running"
    } else if !s.error.is_empty() {
        "failed"
    } else if s.cached {
        "cached"
    } else {
        "ran"
    }
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

/// The project's storage after each build (the builds that recorded it), oldest first, at
/// most `n`: (build id, start, bytes).
pub(super) fn storage_series(builds: &[v1::BuildRecord], n: usize) -> Vec<(&str, i64, u64)> {
    let mut series: Vec<_> =
        builds.iter().filter(|b| b.storage_bytes > 0).take(n).map(|b| (b.id.as_str(), b.started, b.storage_bytes)).collect();
    series.reverse();
    series
}

/// The project's storage by kind, as `hoist cache du` reports it.
fn storage_by_kind(u: &v1::CacheUsageReply) -> String {
    let row = |id: &str, kind: &str, what: String| format!(r#"<tr id="{id}"><td>{kind}</td><td>{what}</td></tr>"#);
    let mut t = String::from(r#"<table id="storage"><thead><tr><th>kind</th><th>size</th></tr></thead><tbody>"#);
    t.push_str(&row("storage-layers", "layers", format!("{} ({} layers)", human_bytes(u.layer_bytes), u.layers)));
    t.push_str(&row("storage-contexts", "contexts", format!("{} ({} sessions)", human_bytes(u.context_bytes), u.context_sessions)));
    t.push_str(&row("storage-mounts", "cache mounts", human_bytes(u.cache_mount_bytes)));
    t.push_str(&row("storage-builds", "build records", format!("{} ({} records)", human_bytes(u.build_log_bytes), u.build_records)));
    t.push_str(&row("storage-total", "total", human_bytes(u.total_bytes)));
    let limit = if u.limit_bytes == 0 { "none".to_string() } else { human_bytes(u.limit_bytes) };
    t.push_str(&row("storage-limit", "limit", limit));
    if !u.shared_store.is_empty() {
        t.push_str(&row("storage-shared", "shared store", format!("{} ({} entries)", human_bytes(u.shared_bytes), u.shared_entries)));
    }
    t.push_str("</tbody></table>");
    t
}

/// The project page: storage over time and by kind, cache hit rate per day and the slowest
/// steps of recent builds.
pub(super) fn project(who: &Caller, builds: &[v1::BuildRecord], usage: Option<&v1::CacheUsageReply>) -> String {
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
    body.push_str("<h2>storage by kind</h2>");
    match usage {
        Some(u) => body.push_str(&storage_by_kind(u)),
        None => body.push_str("<p>The storage could not be read.</p>"),
    }
    let series = storage_series(builds, 60);
    let max = series.iter().map(|(_, _, b)| *b).max().unwrap_or(0).max(1) as f64;
    body.push_str(r#"<h2>storage over time</h2><p>The project's storage after each build (and its automatic collection).</p><table id="storage-series"><thead><tr><th>build</th><th>ended (UTC)</th><th>storage</th><th></th></tr></thead><tbody>"#);
    for (id, started, bytes) in series {
        let _ = write!(
            body,
            r#"<tr><td><a href="/ui/builds/{id}">{id}</a></td><td>{}</td><td class="bytes">{}</td><td class="spark"><div style="width:{:.1}%"></div></td></tr>"#,
            when(started),
            human_bytes(bytes),
            bytes as f64 * 100.0 / max,
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
        let state = state_of(s, running.get(i).copied().unwrap_or(false));
        let critical = if s.critical { " critical" } else { "" };
        let size = if s.layer_bytes > 0 { human_bytes(s.layer_bytes) } else { String::new() };
        let line = if s.line > 0 { format!(r##" <a class="line" href="#L{0}">line {0}</a>"##, s.line) } else { String::new() };
        let miss = if s.miss_reason.is_empty() {
            String::new()
        } else {
            format!(r#"<p class="miss" data-reason="{}">missed the cache: {}</p>"#, esc(&s.miss_reason), esc(&s.miss_detail))
        };
        let log = if s.log.is_empty() {
            String::new()
        } else {
            format!(r#"<details class="log"><summary>log ({} lines)</summary><pre>{}</pre></details>"#, s.log_lines, ansi_html(&s.log))
        };
        let error = if s.error.is_empty() { String::new() } else { format!(r#"<p class="error">{}</p>"#, esc(&s.error)) };
        let _ = write!(
            body,
            r#"<li class="step {state}{critical}" id="step-{id}" data-id="{id}"><div class="label"><span class="stage">{stage}</span> <code class="name">{name}</code></div><div class="axis"><div class="bar" style="left:{left:.2}%;width:{width:.2}%" title="{start} → {end}"></div></div><div class="meta"><span class="duration">{dur}</span> <span class="state">{state}</span> <span class="size">{size}</span>{line}</div>{miss}{error}{log}</li>"#,
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
    fn ansi_colours_are_rendered_and_other_sequences_dropped() {
        assert_eq!(ansi_html("\u{1b}[1;31mred\u{1b}[0m plain\r\n"), r#"<span class="ansi-b ansi-f1">red</span> plain"#.to_string() + "\n");
        assert_eq!(
            ansi_html("\u{1b}[92m<ok>\u{1b}[39m & \u{1b}[1mbold"),
            r#"<span class="ansi-f10">&lt;ok&gt;</span> &amp; <span class="ansi-b">bold</span>"#
        );
        assert_eq!(ansi_html("a\u{1b}]0;title\u{7}b\u{1b}]8;;x\u{1b}\\c\u{1b}[2K"), "abc", "titles, links and cursor moves go");
        assert_eq!(ansi_html("trailing \u{1b}["), "trailing ");
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
        assert!(
            html.contains(r#"&lt;b&gt;<span class="ansi-f2">ok</span>&lt;/b&gt;"#),
            "the log's markup escaped, its colour rendered: {html}"
        );
        assert!(html.contains("&lt;me&gt;"));
    }
    #[test]
    fn the_dockerfile_links_its_lines_to_their_steps_and_misses_are_shown() {
        let who = Caller { project: "p".into(), who: "me".into(), token_id: None };
        let mut from = step(1, 0, 100, false);
        from.name = "FROM busybox@sha256:ab".into();
        from.state_key = "base".into();
        from.pulled_layers = 1;
        from.layer_bytes = 2048;
        let mut copy = step(2, 100, 300, false);
        copy.line = 2;
        copy.cache_key = "k".into();
        copy.layer_bytes = 1536;
        copy.critical = true;
        copy.miss_reason = "context".into();
        copy.miss_detail = "the files it copies changed".into();
        let mut run = step(3, 300, 400, true);
        run.line = 3;
        let b = v1::BuildRecord {
            id: "x".into(),
            status: "ok".into(),
            dockerfile: "FROM busybox\nCOPY a /a\nRUN <make>\n".into(),
            dockerfile_name: "Dockerfile".into(),
            steps: vec![from, copy, run],
            ..Default::default()
        };
        let html = build(&who, &b, &[]);
        assert!(
            html.contains(
                r##"<li id="L2"><code>COPY a /a</code> <a class="step-link ran" href="#step-2" data-step="2">0.2s ran</a></li>"##
            ),
            "{html}"
        );
        assert!(html.contains(r##"<li id="L3"><code>RUN &lt;make&gt;</code> <a class="step-link cached" href="#step-3""##), "{html}");
        assert!(html.contains(r#"<li id="L1"><code>FROM busybox</code></li>"#), "no step for the FROM line: {html}");
        assert!(html.contains(r#"<li class="step ran critical" id="step-2""#), "{html}");
        assert!(html.contains(r#"<p class="miss" data-reason="context">missed the cache: the files it copies changed</p>"#), "{html}");
        assert!(html.contains(r#"<span class="size">1.5 KiB</span>"#), "the layer's size: {html}");
        assert!(html.contains("1 layers of base images (2.0 KiB in all"), "{html}");
        assert!(html.contains(r#"<dd id="bytes-loaded">not recorded"#), "{html}");
        assert_eq!(html.matches("missed the cache").count(), 1, "only the step that says why");
    }

    #[test]
    fn storage_over_time_is_oldest_first_and_skips_builds_without_it() {
        let rec =
            |id: &str, started: i64, storage_bytes: u64| v1::BuildRecord { id: id.into(), started, storage_bytes, ..Default::default() };
        let builds = [rec("b3", 30, 300), rec("b2", 20, 0), rec("b1", 10, 100), rec("b0", 0, 50)];
        assert_eq!(storage_series(&builds, 10), [("b0", 0, 50), ("b1", 10, 100), ("b3", 30, 300)]);
        assert_eq!(storage_series(&builds, 2), [("b1", 10, 100), ("b3", 30, 300)], "the newest n");
        let who = Caller { project: "p".into(), who: "me".into(), token_id: None };
        let u = v1::CacheUsageReply {
            layers: 3,
            layer_bytes: 3 << 20,
            context_bytes: 1024,
            total_bytes: (3 << 20) + 1024,
            ..Default::default()
        };
        let html = project(&who, &builds, Some(&u));
        assert!(html.contains(r#"<tr id="storage-layers"><td>layers</td><td>3.0 MiB (3 layers)</td></tr>"#), "{html}");
        assert!(html.contains(r#"<tr id="storage-contexts"><td>contexts</td><td>1.0 KiB (0 sessions)</td></tr>"#), "{html}");
        assert!(html.contains(r#"<td class="bytes">300 B</td><td class="spark"><div style="width:100.0%">"#), "{html}");
    }
}
