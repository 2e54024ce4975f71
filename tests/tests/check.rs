//! End-to-end: `hoist build --call=check` / `--check` (BuildKit's Dockerfile checks, printed
//! as buildx prints them, nothing built) and the checks' summary and `error=true` in a build.

mod common;

use common::*;

/// `hoist build ARGS` (no --progress: --check prints to stdout) → (status, stdout, stderr).
fn run(h: &Hoist, args: &[&str]) -> (Option<i32>, String, String) {
    let out = h.cmd().arg("build").args(args).output().expect("running hoist");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// buildx's own case (tests/build.go, testBuildCheckCallOutput): mixed-case keywords give two
/// warnings, each with its rule, link and excerpt naming the Dockerfile given with -f; the
/// status is 1, and nothing is built (no builder is even started).
#[test]
fn check_prints_violations_with_excerpts_and_fails() {
    let h = Hoist::new();
    let ctx = context(&[("sub/Dockerfile", "\nfrOM busybox as base\ncOpy Dockerfile .\n")]);
    let df = ctx.path().join("sub/Dockerfile").display().to_string();
    let dir = ctx.path().display().to_string();
    let (code, stdout, stderr) = run(&h, &["--call=check", "-f", &df, &dir]);
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("Check complete, 2 warnings have been found!"), "{stdout}");
    assert!(stdout.contains(&format!("{df}:2\n")) && stdout.contains(&format!("{df}:3\n")), "{stdout}");
    assert!(
        stdout.contains(
            "WARNING: ConsistentInstructionCasing - https://docs.docker.com/go/dockerfile/rule/consistent-instruction-casing/\nCommand 'frOM' should match the case of the command majority (uppercase)\n"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("   3 | >>> cOpy Dockerfile .\n"), "{stdout}");
    assert!(h.daemon_pid().is_none(), "--check started a builder");

    // --check is the same call; ignorestatus=true keeps the status at 0.
    let (code, again, _) = run(&h, &["--check", "-f", &df, &dir]);
    assert_eq!((code, again), (Some(1), stdout));
    let (code, _, _) = run(&h, &["--call=check,ignorestatus=true", "-f", &df, &dir]);
    assert_eq!(code, Some(0));
}

#[test]
fn check_of_a_clean_dockerfile_passes_and_skip_directives_apply() {
    let h = Hoist::new();
    let clean = context(&[("Dockerfile", "FROM busybox AS base\nCOPY Dockerfile .\n")]);
    let (code, stdout, stderr) = run(&h, &["--check", &clean.path().display().to_string()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("Check complete, no warnings found."), "{stdout}");

    let one = context(&[("Dockerfile", "FROM busybox as base\nCMD echo hi\n")]);
    let dir = one.path().display().to_string();
    let (code, stdout, _) = run(&h, &["--check", &dir]);
    assert_eq!(code, Some(1));
    assert!(stdout.contains("Check complete, 2 warnings have been found!"), "{stdout}");
    assert!(stdout.contains("WARNING: FromAsCasing") && stdout.contains("WARNING: JSONArgsRecommended"), "{stdout}");
    assert!(stdout.contains("Dockerfile:1\n"), "{stdout}");
    // BUILDKIT_DOCKERFILE_CHECK replaces the directive, as with BuildKit.
    let (code, stdout, _) = run(&h, &["--check", "--build-arg", "BUILDKIT_DOCKERFILE_CHECK=skip=JSONArgsRecommended", &dir]);
    assert_eq!(code, Some(1));
    assert!(stdout.contains("Check complete, 1 warning has been found!") && stdout.contains("FromAsCasing"), "{stdout}");
    std::fs::write(one.path().join("Dockerfile"), "# check=skip=all\nFROM busybox as base\nCMD echo hi\n").unwrap();
    let (code, stdout, _) = run(&h, &["--check", &dir]);
    assert_eq!((code, stdout.trim()), (Some(0), "Check complete, no warnings found."));

    // The JSON form has BuildKit's field names.
    std::fs::write(one.path().join("Dockerfile"), "FROM busybox as base\n").unwrap();
    let (code, stdout, _) = run(&h, &["--call=check,format=json", &dir]);
    assert_eq!(code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(v["warnings"][0]["ruleName"], "FromAsCasing");
    assert_eq!(v["warnings"][0]["location"]["ranges"][0]["start"]["line"], 1);
}

#[test]
fn check_reports_syntax_errors_and_bad_configuration() {
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUNN true\n")]);
    let (code, _, stderr) = run(&h, &["--check", &ctx.path().display().to_string()]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("unknown instruction \"RUNN\"") && stderr.contains(">>> RUNN true"), "{stderr}");

    let ctx = context(&[("Dockerfile", "# check=error=maybe\nFROM busybox\n")]);
    let (code, _, stderr) = run(&h, &["--check", &ctx.path().display().to_string()]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("Dockerfile: line 1: failed to parse check options"), "{stderr}");

    let (code, _, stderr) = run(&h, &["--call=outline", &ctx.path().display().to_string()]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("--call=outline is not supported"), "{stderr}");
}

/// `error=true`: a build with violations fails before anything runs (BuildKit fails it before
/// the first step), naming the rules.
#[test]
fn error_true_fails_the_build_before_it_starts() {
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", "# check=error=true\nFROM busybox as base\nRUN touch /ran\n")]);
    let out = h.build(&[&ctx.path().display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(" 1 warning found (use hoist build --check to expand):\n - FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 2)\n"), "{stderr}");
    assert!(stderr.contains("lint violation found for rules: FromAsCasing"), "{stderr}");
    assert!(h.daemon_pid().is_none(), "a builder was started for a build that had to fail");
}

/// A normal build prints the summary and goes on.
#[test]
fn a_build_with_violations_prints_the_summary_and_builds() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &format!("FROM {} as base\nENV A b\nRUN echo $A > /a\n", busybox()))]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    let stderr = h.build_ok(&["-o", &format!("type=local,dest={}", dest.display()), &ctx.path().display().to_string()]);
    assert!(stderr.contains(" 2 warnings found (use hoist build --check to expand):\n"), "{stderr}");
    assert!(stderr.contains(" - FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)\n"), "{stderr}");
    assert!(
        stderr.contains(" - LegacyKeyValueFormat: \"ENV key=value\" should be used instead of legacy \"ENV key value\" format (line 2)\n"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(dest.join("a")).unwrap(), "b\n");
}
