use super::*;
use crate::parse_dockerfile;

fn run_with(text: &str, args: &[(&str, &str)]) -> Report {
    let (df, stages) = parse_dockerfile(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let args: HashMap<String, String> = args.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let cfg = config(&df, &args).expect("config");
    check(&df, &stages, &cfg)
}

fn run(text: &str) -> Report {
    run_with(text, &[])
}

/// (rule, line, message) of every violation.
fn found(text: &str) -> Vec<(&'static str, usize, String)> {
    run(text).violations.into_iter().map(|v| (v.rule.name, v.start_line, v.message)).collect()
}

fn names(text: &str) -> Vec<&'static str> {
    found(text).into_iter().map(|(n, _, _)| n).collect()
}

/// A Dockerfile that breaks `rule` and one that does not; `skip=rule` silences the first.
fn rule_case(rule: &str, bad: &str, good: &str) {
    assert!(names(bad).contains(&rule), "{rule} not found in:\n{bad}\n{:?}", found(bad));
    assert!(!names(good).contains(&rule), "{rule} found in:\n{good}\n{:?}", found(good));
    let skipped = format!("# check=skip={rule}\n{bad}");
    assert!(!names(&skipped).contains(&rule), "skip={rule} did not skip:\n{:?}", found(&skipped));
    let all = format!("# check=skip=all\n{bad}");
    assert!(found(&all).is_empty(), "skip=all: {:?}", found(&all));
}

#[test]
fn stage_name_casing() {
    rule_case("StageNameCasing", "FROM scratch AS Builder\n", "FROM scratch AS builder\n");
    assert_eq!(found("FROM scratch AS Builder\n"), vec![("StageNameCasing", 1, "Stage name 'Builder' should be lowercase".into())]);
}

#[test]
fn from_as_casing() {
    rule_case("FromAsCasing", "FROM scratch as base\n", "FROM scratch AS base\nfrom scratch as other\nCOPY a b\nRUN x\n");
    assert_eq!(found("FROM busybox as base\n"), vec![("FromAsCasing", 1, "'as' and 'FROM' keywords' casing do not match".into())]);
    // A FROM whose own casing is mixed is left to ConsistentInstructionCasing.
    assert!(!names("FroM scratch as base\n").contains(&"FromAsCasing"));
}

#[test]
fn consistent_instruction_casing() {
    let bad = "FROM scratch\nCOPY a b\nrun x\n";
    rule_case("ConsistentInstructionCasing", bad, "FROM scratch\nCOPY a b\nRUN x\n");
    assert_eq!(
        found(bad),
        vec![("ConsistentInstructionCasing", 3, "Command 'run' should match the case of the command majority (uppercase)".into())]
    );
    // buildx's own example: two mixed-case keywords, no majority.
    let mixed = found("\nfrOM busybox as base\ncOpy Dockerfile .\n");
    assert_eq!(mixed.len(), 2, "{mixed:?}");
    assert_eq!((mixed[0].1, mixed[1].1), (2, 3));
    assert_eq!(mixed[1].2, "Command 'cOpy' should match the case of the command majority (uppercase)");
    // Lowercase majority.
    assert_eq!(found("from scratch\ncopy a b\nRUN x\n")[0].2, "Command 'RUN' should match the case of the command majority (lowercase)");
}

#[test]
fn legacy_key_value_format() {
    rule_case("LegacyKeyValueFormat", "FROM scratch\nENV A b\n", "FROM scratch\nENV A=b\nLABEL a=b\n");
    assert!(names("FROM scratch\nLABEL a b\n").contains(&"LegacyKeyValueFormat"));
    assert_eq!(found("FROM scratch\nENV A b\n")[0].2, "\"ENV key=value\" should be used instead of legacy \"ENV key value\" format");
}

#[test]
fn undefined_arg_in_from() {
    // (busybox:${VERSIN} would also be InvalidDefaultArgInFrom, as with BuildKit.)
    let bad = "ARG VERSION=1\nFROM busybox${VERSIN}\n";
    rule_case("UndefinedArgInFrom", bad, "ARG VERSION=1\nFROM busybox:${VERSION}\nFROM --platform=$BUILDPLATFORM busybox\n");
    assert_eq!(found(bad), vec![("UndefinedArgInFrom", 2, "FROM argument 'VERSIN' is not declared (did you mean VERSION?)".into())]);
    // Declared without a default is declared; --platform is checked too.
    assert!(found("ARG TAG\nFROM busybox:$TAG\n").iter().all(|f| f.0 != "UndefinedArgInFrom"));
    assert_eq!(found("FROM --platform=$PLATFORM busybox\n")[0].2, "FROM argument 'PLATFORM' is not declared");
}

#[test]
fn json_args_recommended() {
    let bad = "FROM scratch\nCMD echo hi\n";
    rule_case("JSONArgsRecommended", bad, "FROM scratch\nCMD [\"echo\", \"hi\"]\nENTRYPOINT [\"x\"]\n");
    assert_eq!(
        found("FROM scratch\nENTRYPOINT run x\n")[0].2,
        "JSON arguments recommended for ENTRYPOINT to prevent unintended behavior related to OS signals"
    );
    // An explicit SHELL, in the stage or the stage it is built on, says the shell form is meant.
    assert!(found("FROM scratch\nSHELL [\"/bin/sh\", \"-c\"]\nCMD echo hi\n").is_empty());
    assert!(found("FROM scratch AS base\nSHELL [\"/bin/sh\", \"-c\"]\nFROM base\nCMD echo hi\n").is_empty());
}

#[test]
fn duplicate_and_reserved_stage_names() {
    let dup = "FROM scratch AS a\nFROM scratch AS a\n";
    rule_case("DuplicateStageName", dup, "FROM scratch AS a\nFROM scratch AS b\n");
    assert_eq!(found(dup), vec![("DuplicateStageName", 2, "Duplicate stage name \"a\", stage names should be unique".into())]);
    rule_case("ReservedStageName", "FROM busybox AS scratch\n", "FROM busybox AS base\n");
    assert_eq!(found("FROM busybox AS context\n")[0].2, "Stage name should not use the same name as reserved stage \"context\"");
}

#[test]
fn maintainer_deprecated() {
    rule_case("MaintainerDeprecated", "FROM scratch\nMAINTAINER me\n", "FROM scratch\nLABEL org.opencontainers.image.authors=me\n");
}

#[test]
fn no_empty_continuation() {
    let bad = "FROM scratch\nRUN a \\\n\n  b\n";
    rule_case("NoEmptyContinuation", bad, "FROM scratch\nRUN a \\\n  b\n");
    assert_eq!(found(bad), vec![("NoEmptyContinuation", 4, "Empty continuation line".into())]);
}

#[test]
fn workdir_relative_path() {
    rule_case("WorkdirRelativePath", "FROM scratch\nWORKDIR app\n", "FROM scratch\nWORKDIR /app\nWORKDIR sub\n");
    // Set in the stage this one is built on.
    assert!(found("FROM scratch AS a\nWORKDIR /app\nFROM a\nWORKDIR sub\n").is_empty());
}

#[test]
fn multiple_instructions_disallowed() {
    let bad = "FROM scratch\nCMD [\"a\"]\nCMD [\"b\"]\n";
    rule_case("MultipleInstructionsDisallowed", bad, "FROM scratch\nCMD [\"a\"]\nFROM scratch\nCMD [\"b\"]\n");
    // The first one, which is ignored, is reported.
    assert_eq!(
        found(bad),
        vec![(
            "MultipleInstructionsDisallowed",
            2,
            "Multiple CMD instructions should not be used in the same stage because only the last one will be used".into()
        )]
    );
    assert!(names("FROM scratch\nHEALTHCHECK NONE\nHEALTHCHECK NONE\n").contains(&"MultipleInstructionsDisallowed"));
}

#[test]
fn platform_flags() {
    rule_case(
        "FromPlatformFlagConstDisallowed",
        "FROM --platform=linux/amd64 busybox\n",
        "FROM --platform=linux/amd64 busybox AS build-amd64\n",
    );
    rule_case("RedundantTargetPlatform", "FROM --platform=$TARGETPLATFORM busybox\n", "FROM --platform=$BUILDPLATFORM busybox\n");
    assert_eq!(
        found("FROM --platform=${TARGETPLATFORM} busybox\n")[0].2,
        "Setting platform to predefined ${TARGETPLATFORM} in FROM is redundant as this is the default behavior"
    );
}

#[test]
fn secrets_in_arg_or_env() {
    rule_case("SecretsUsedInArgOrEnv", "FROM scratch\nARG GITHUB_TOKEN\n", "FROM scratch\nARG PUBLIC_KEY\nENV KEYBOARD=x\n");
    assert_eq!(
        found("FROM scratch\nENV db_password=x\n")[0].2,
        "Do not use ARG or ENV instructions for sensitive data (ENV \"db_password\")"
    );
}

#[test]
fn invalid_default_arg_in_from() {
    rule_case("InvalidDefaultArgInFrom", "ARG TAG\nFROM busybox:${TAG}\n", "ARG TAG=latest\nFROM busybox:${TAG}\n");
    assert!(names("ARG IMAGE\nFROM $IMAGE\n").contains(&"InvalidDefaultArgInFrom"));
    assert!(!names("FROM 127.0.0.1:5000/library/busybox:latest\n").contains(&"InvalidDefaultArgInFrom"));
}

#[test]
fn expose_rules() {
    rule_case("ExposeProtoCasing", "FROM scratch\nEXPOSE 80/TCP\n", "FROM scratch\nEXPOSE 80/tcp 53/udp\n");
    rule_case("ExposeInvalidFormat", "FROM scratch\nEXPOSE 8080:80\n", "FROM scratch\nEXPOSE 80\n");
}

#[test]
fn a_check_comment_skips_rules_for_one_instruction() {
    let text = "FROM scratch\n# check=skip=JSONArgsRecommended\nCMD echo a\nENTRYPOINT echo b\n";
    assert_eq!(
        found(text),
        vec![(
            "JSONArgsRecommended",
            4,
            "JSON arguments recommended for ENTRYPOINT to prevent unintended behavior related to OS signals".into()
        )]
    );
}

#[test]
fn configuration_directive_and_build_arg() {
    let text = "# check=skip=FromAsCasing;error=true\nFROM scratch as base\nCMD echo hi\n";
    let report = run(text);
    assert_eq!(report.violations.iter().map(|v| v.rule.name).collect::<Vec<_>>(), vec!["JSONArgsRecommended"]);
    assert!(report.error && report.fails_build());
    assert_eq!(report.rules(), vec!["JSONArgsRecommended"]);
    // The build argument replaces the directive.
    let report = run_with(text, &[(CHECK_BUILD_ARG, "skip=JSONArgsRecommended")]);
    assert_eq!(report.rules(), vec!["FromAsCasing"]);
    assert!(!report.fails_build());
    assert!(run_with(text, &[(CHECK_BUILD_ARG, "skip=all")]).violations.is_empty());
    // No violation: nothing fails even with error=true.
    assert!(!run("# check=error=true\nFROM scratch\n").fails_build());
}

#[test]
fn bad_configuration_is_an_error_naming_where_it_came_from() {
    let (df, _) = parse_dockerfile("# check=skip=A;error=maybe\nFROM scratch\n").unwrap();
    let e = config(&df, &HashMap::new()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 1: failed to parse check options: failed to parse check option \"error=maybe\": expected error=true or error=false"
    );
    let args: HashMap<String, String> = [(CHECK_BUILD_ARG.to_string(), "bogus".to_string())].into_iter().collect();
    let e = config(&df, &args).unwrap_err();
    assert!(e.to_string().starts_with("failed to parse BUILDKIT_DOCKERFILE_CHECK: invalid check option \"bogus\""), "{e}");
    assert_eq!(CheckConfig::parse("skip = A, B ").unwrap().skip, vec!["A", "B"]);
}

#[test]
fn a_clean_dockerfile_has_no_violations() {
    let text = "# syntax=docker/dockerfile:1\nARG BASE=busybox\nFROM ${BASE} AS build\nWORKDIR /src\nCOPY . .\nRUN make\n\nFROM scratch\nCOPY --from=build /src/out /out\nENTRYPOINT [\"/out\"]\n";
    assert_eq!(found(text), vec![]);
}

#[test]
fn short_form_names_rule_and_line() {
    let v = &run("FROM scratch as base\n").violations[0];
    assert_eq!(v.short(), "FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)");
    assert_eq!(v.rule.url, "https://docs.docker.com/go/dockerfile/rule/from-as-casing/");
}
