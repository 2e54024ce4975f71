//! `hoist build --call=check` / `--check`, and the check summary of a normal build: the
//! Dockerfile checks of hoist-dockerfile run on the client, printed as buildx prints them.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::{anyhow, bail};
use hoist_dockerfile::checks::{self, Report, Violation};

use crate::build::BuildArgs;
use crate::progress::Mode;

/// What `--call` asks for (buildx's `ParseCallFunc`): `build` (the default), `check` (also
/// `lint`) with `format=json` and `ignorestatus=true`, or a subrequest hoist does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Build,
    Check { json: bool, ignore_status: bool },
}

impl Call {
    /// `--call` (`None`: not given) and `--check`.
    pub(crate) fn parse(call: Option<&str>, check: bool) -> anyhow::Result<Call> {
        let text = match (call, check) {
            (Some(c), true) if !c.starts_with("check") && !c.starts_with("lint") => {
                bail!("--check and --call={c} conflict: --check is --call=check")
            }
            (Some(c), _) => c,
            (None, true) => "check",
            (None, false) => return Ok(Call::Build),
        };
        let (mut name, mut json, mut ignore_status) = (None, false, false);
        for field in text.split(',').map(str::trim) {
            match field.split_once('=') {
                Some(("format", f)) => match f {
                    "json" => json = true,
                    "" | "text" => json = false,
                    other => bail!("--call={text}: unknown format {other:?} (expected text or json)"),
                },
                Some(("ignorestatus", v)) => {
                    ignore_status =
                        v.parse().map_err(|_| anyhow!("--call={text}: invalid ignorestatus value {v:?} (expected true or false)"))?
                }
                Some(_) => bail!("--call={text}: invalid field {field:?} (expected format=json or ignorestatus=true)"),
                None if name.is_some() => bail!("--call={text}: more than one call named"),
                None => name = Some(field),
            }
        }
        match name.unwrap_or("build") {
            "build" | "" => Ok(Call::Build),
            "check" | "lint" => Ok(Call::Check { json, ignore_status }),
            other => bail!("--call={other} is not supported by hoist (supported: build, check)"),
        }
    }
}

/// The `--build-arg` values as the checks see them (`BUILDKIT_DOCKERFILE_CHECK` among them).
fn check_args(build_args: &[String]) -> HashMap<String, String> {
    build_args
        .iter()
        .filter_map(|a| match a.split_once('=') {
            Some((k, v)) => Some((k.to_string(), v.to_string())),
            None => std::env::var(a).ok().map(|v| (a.clone(), v)),
        })
        .collect()
}

/// Run the checks on `dockerfile`; the inner error when it does not parse.
fn run(dockerfile: &[u8], build_args: &[String]) -> anyhow::Result<Result<Report, hoist_dockerfile::DockerfileError>> {
    let text = String::from_utf8_lossy(dockerfile);
    let (df, stages) = match hoist_dockerfile::parse_dockerfile(&text) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let config = checks::config(&df, &check_args(build_args)).map_err(|e| anyhow!("Dockerfile: {e}"))?;
    Ok(Ok(checks::check(&df, &stages, &config)))
}

fn violation_error(report: &Report) -> anyhow::Error {
    anyhow!("lint violation found for rules: {}", report.rules().join(", "))
}

/// The hook of `hoist build`, once the Dockerfile is read: `Some(exit status)` when
/// `--call=check`/`--check` asked for the checks alone (nothing is built); `None` to build,
/// after [`before_build`].
pub(crate) fn hook(args: &BuildArgs, dockerfile: &[u8], mode: Mode) -> anyhow::Result<Option<i32>> {
    match Call::parse(args.call.as_deref(), args.check)? {
        Call::Check { json, ignore_status } => {
            let name = args.file.as_deref().filter(|f| *f != "-").unwrap_or("Dockerfile");
            call_check(dockerfile, name, &args.build_args, json, ignore_status).map(Some)
        }
        Call::Build => before_build(dockerfile, &args.build_args, matches!(mode, Mode::Quiet | Mode::RawJson)).map(|_| None),
    }
}

/// Before a normal build: print a short summary of the violations (unless `quiet`), and fail
/// when `error=true` is in effect and there are some, as BuildKit does before any step runs.
fn before_build(dockerfile: &[u8], build_args: &[String], quiet: bool) -> anyhow::Result<()> {
    let Ok(report) = run(dockerfile, build_args)? else { return Ok(()) };
    if report.violations.is_empty() {
        return Ok(());
    }
    if !quiet {
        let n = report.violations.len();
        let mut out = format!(" {n} warning{} found (use hoist build --check to expand):\n", if n == 1 { "" } else { "s" });
        for v in &report.violations {
            let _ = writeln!(out, " - {}", v.short());
        }
        eprint!("{out}");
    }
    if report.fails_build() {
        return Err(violation_error(&report));
    }
    Ok(())
}

/// `--call=check`: print every violation with its excerpt to stdout as buildx does; the exit
/// status is 1 when there is one (0 with `ignorestatus=true`). Nothing is built.
fn call_check(dockerfile: &[u8], file_name: &str, build_args: &[String], json: bool, ignore_status: bool) -> anyhow::Result<i32> {
    let text = String::from_utf8_lossy(dockerfile);
    let report = match run(dockerfile, build_args)? {
        Ok(r) => r,
        Err(e) => {
            // As BuildKit's lint result: the build error with its excerpt.
            let mut out = String::new();
            excerpt(&mut out, &text, file_name, e.line(), e.line());
            bail!("{}\n{out}", e.message());
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&json_report(&report, file_name, &text))?);
    } else {
        let mut out = String::new();
        match report.violations.len() {
            0 => {}
            1 => out.push_str("Check complete, 1 warning has been found!\n"),
            n => {
                let _ = writeln!(out, "Check complete, {n} warnings have been found!");
            }
        }
        for v in &report.violations {
            print_violation(&mut out, v, &text, file_name);
        }
        if report.violations.is_empty() {
            out.push_str("Check complete, no warnings found.\n");
        }
        print!("{out}");
    }
    if report.fails_build() {
        return Err(violation_error(&report));
    }
    Ok(if report.violations.is_empty() || ignore_status { 0 } else { 1 })
}

fn print_violation(out: &mut String, v: &Violation, text: &str, file_name: &str) {
    let _ = write!(out, "\nWARNING: {} - {}\n{}\n", v.rule.name, v.rule.url, v.message);
    excerpt(out, text, file_name, v.start_line, v.end_line);
}

/// The lines `start..=end` of `text` with a few around them, as BuildKit's `Source.Print`.
fn excerpt(out: &mut String, text: &str, file_name: &str, start: usize, end: usize) {
    let lines: Vec<&str> = text.split('\n').collect();
    if start < 1 || start > lines.len() {
        return;
    }
    let (first, mut from, mut to) = (start, start, end.max(start).min(lines.len()));
    let pad = if to == from { 4 } else { 2 };
    let mut p = 0;
    while p < pad {
        if from > 1 {
            from -= 1;
            p += 1;
        }
        if to != lines.len() {
            to += 1;
            p += 1;
        }
        p += 1;
    }
    let _ = write!(out, "{file_name}:{first}\n--------------------\n");
    for (i, line) in lines.iter().enumerate().take(to).skip(from - 1) {
        let n = i + 1;
        let mark = if (start..=end.max(start)).contains(&n) { ">>>" } else { "   " };
        let _ = writeln!(out, " {n:>3} | {mark} {line}");
    }
    out.push_str("--------------------\n");
}

/// The violations in the shape of BuildKit's lint result (`warnings`, `sources`).
fn json_report(report: &Report, file_name: &str, text: &str) -> serde_json::Value {
    let warnings: Vec<serde_json::Value> = report
        .violations
        .iter()
        .map(|v| {
            serde_json::json!({
                "ruleName": v.rule.name,
                "description": v.rule.description,
                "url": v.rule.url,
                "detail": v.message,
                "location": {"ranges": [{"start": {"line": v.start_line}, "end": {"line": v.end_line}}]},
            })
        })
        .collect();
    serde_json::json!({"warnings": warnings, "sources": [{"filename": file_name, "language": "Dockerfile", "data": text}]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_values_as_buildx_reads_them() {
        assert_eq!(Call::parse(None, false).unwrap(), Call::Build);
        assert_eq!(Call::parse(Some("build"), false).unwrap(), Call::Build);
        assert_eq!(Call::parse(None, true).unwrap(), Call::Check { json: false, ignore_status: false });
        assert_eq!(Call::parse(Some("check,format=json"), false).unwrap(), Call::Check { json: true, ignore_status: false });
        assert_eq!(Call::parse(Some("lint,ignorestatus=true"), true).unwrap(), Call::Check { json: false, ignore_status: true });
        let e = Call::parse(Some("outline"), false).unwrap_err().to_string();
        assert!(e.contains("--call=outline is not supported"), "{e}");
        assert!(Call::parse(Some("targets"), true).is_err());
        assert!(Call::parse(Some("check,format=yaml"), false).is_err());
    }

    #[test]
    fn excerpt_as_buildkit_prints_it() {
        let mut out = String::new();
        excerpt(&mut out, "\nFROM busybox as base\nCOPY a b\n", "Dockerfile", 2, 2);
        let want = "Dockerfile:2\n--------------------\n   1 |     \n   2 | >>> FROM busybox as base\n   3 |     COPY a b\n   4 |     \n--------------------\n";
        assert_eq!(out, want);
    }
}
