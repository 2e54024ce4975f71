//! Parsing, merging, interpolation, inherits, groups and `--set` of bake and compose files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
}

fn load_with(files: &[PathBuf], env: &'static [(&'static str, &'static str)]) -> anyhow::Result<Config> {
    load(files, &env_of(env))
}

fn resolve(cfg: &Config, names: &[&str], sets: &[&str]) -> anyhow::Result<BTreeMap<String, Target>> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Ok(cfg.resolve(&names, &Override::parse_all(&sets)?)?.1)
}

fn err(r: anyhow::Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", r.unwrap_err())
}

const HCL: &str = r#"
variable "TAG" {
  default = "latest"
}
variable "REPO" {
  default = "reg.example/${NAME}"
}
NAME = "app"
variable "DEBUG" {
  default = false
}

group "default" {
  targets = ["app", "extras"]
}
group "extras" {
  targets = ["tools", "app"]
}

target "base" {
  dockerfile = "build/Dockerfile"
  args = { GO = "1.22", KEEP = "base" }
  platforms = ["linux/amd64"]
  labels = { "org.team" = "core" }
}

target "app" {
  inherits = ["base"]
  args = { GO = "1.23" }
  tags = ["${REPO}:${TAG}", notequal(TAG, "latest") ? "${REPO}:stable" : ""]
  target = DEBUG ? "debug" : "release"
}

target "tools" {
  inherits = ["app"]
  tags = [join("-", [upper(NAME), lower("TOOLS")]), trimprefix("v1.0", "v"), replace("a.b.c", ".", "/")]
  contexts = { assets = "./assets" }
}
"#;

/// Variables (defaults that use other variables, top-level attributes, environment
/// overrides read as the default's type), functions, multi-level inherits, nested groups.
#[test]
fn hcl_file_with_variables_functions_inherits_and_groups() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "docker-bake.hcl", HCL);
    let cfg = load_with(std::slice::from_ref(&f), &[]).unwrap();
    let t = resolve(&cfg, &[], &[]).unwrap();
    assert_eq!(t.keys().collect::<Vec<_>>(), ["app", "tools"], "the default group, nested groups expanded, each target once");
    let app = &t["app"];
    assert_eq!(app.tags.as_deref(), Some(&["reg.example/app:latest".to_string(), String::new()][..]));
    assert_eq!(app.dockerfile.as_deref(), Some("build/Dockerfile"), "inherited");
    assert_eq!(app.args.get("GO").map(String::as_str), Some("1.23"), "the child's arg wins");
    assert_eq!(app.args.get("KEEP").map(String::as_str), Some("base"), "maps merge");
    assert_eq!(app.target.as_deref(), Some("release"));
    assert!(app.inherits.is_empty());
    let tools = &t["tools"];
    assert_eq!(tools.tags.as_deref(), Some(&["APP-tools".to_string(), "1.0".into(), "a/b/c".into()][..]), "tags are replaced");
    assert_eq!(tools.platforms.as_deref(), Some(&["linux/amd64".to_string()][..]), "two levels of inherits");
    assert_eq!(tools.labels.get("org.team").map(String::as_str), Some("core"));
    assert_eq!(tools.contexts.get("assets").map(String::as_str), Some("./assets"));

    // The environment overrides defaults, as the default's type (a bool here).
    let cfg = load_with(&[f], &[("TAG", "v2"), ("DEBUG", "true"), ("NAME", "web")]).unwrap();
    let app = &resolve(&cfg, &["app"], &[]).unwrap()["app"];
    assert_eq!(app.tags.as_deref(), Some(&["reg.example/web:v2".to_string(), "reg.example/web:stable".into()][..]));
    assert_eq!(app.target.as_deref(), Some("debug"));
    let e = err(load_with(&[write(d.path(), "b.hcl", HCL)], &[("DEBUG", "maybe")]));
    assert!(e.contains("b.hcl") && e.contains("DEBUG") && e.contains("not a boolean"), "{e}");
}

/// The same targets as JSON, whose strings are templates too; several files merge in order,
/// and an override file changes a variable's default.
#[test]
fn json_files_and_merging_several_files() {
    let d = tempfile::tempdir().unwrap();
    let json = write(
        d.path(),
        "docker-bake.json",
        r#"{
  "variable": { "TAG": { "default": "1" } },
  "group": { "default": { "targets": ["web"] } },
  "target": {
    "web": { "context": "web", "tags": ["web:${TAG}"], "args": { "A": "a", "N": 3 }, "no-cache": true }
  }
}"#,
    );
    let over = write(
        d.path(),
        "docker-bake.override.hcl",
        "variable \"TAG\" {\n  default = \"2\"\n}\ntarget \"web\" {\n  args = { B = \"b\" }\n  platforms = [\"linux/arm64\"]\n}\n",
    );
    let cfg = load_with(&[json, over], &[]).unwrap();
    let web = &resolve(&cfg, &[], &[]).unwrap()["web"];
    assert_eq!(web.tags.as_deref(), Some(&["web:2".to_string()][..]), "the later file's default");
    assert_eq!(web.args.len(), 3, "{:?}", web.args);
    assert_eq!(web.args["N"], "3");
    assert_eq!((web.no_cache, web.context.as_deref()), (Some(true), Some("web")));
    assert_eq!(web.platforms.as_deref(), Some(&["linux/arm64".to_string()][..]));
}

#[test]
fn set_overrides_with_patterns_lists_and_args() {
    let d = tempfile::tempdir().unwrap();
    let cfg = load_with(&[write(d.path(), "docker-bake.hcl", HCL)], &[]).unwrap();
    let t = resolve(
        &cfg,
        &["default"],
        &["*.platform=linux/arm64", "*.platform=linux/amd64", "app.args.GO=1.24", "tools.tags=t:1", "tools.tags+=t:2", "app.no-cache=true"],
    )
    .unwrap();
    for n in ["app", "tools"] {
        assert_eq!(t[n].platforms.as_deref(), Some(&["linux/arm64".to_string(), "linux/amd64".into()][..]), "{n}");
    }
    assert_eq!(t["app"].args["GO"], "1.24");
    assert_eq!(t["tools"].args["GO"], "1.24", "an override of a parent reaches what inherits it, as in buildx");
    assert_eq!(t["tools"].tags.as_deref(), Some(&["t:1".to_string(), "t:2".into()][..]));
    assert_eq!(t["app"].no_cache, Some(true));
    // --push and --load are outputs, as buildx prints them.
    let t = resolve(&cfg, &["app"], &["*.push=true", "app.load=true"]).unwrap();
    assert_eq!(t["app"].output.as_deref(), Some(&["type=registry".to_string(), "type=docker".into()][..]));

    assert!(err(resolve(&cfg, &["app"], &["app.nonsense=1"])).contains("unknown key \"nonsense\""));
    assert!(err(resolve(&cfg, &["app"], &["app.args=1"])).contains("args needs a name"));
    assert!(err(resolve(&cfg, &["app"], &["apptags=1"])).contains("expected TARGET.KEY=VALUE"));
    assert!(err(resolve(&cfg, &["app"], &["nope*.tags=1"])).contains("nope*"));
    assert!(err(resolve(&cfg, &["app"], &["app.no-cache=perhaps"])).contains("true or false"));
}

#[test]
fn unknown_targets_cycles_and_bad_files_name_what_and_where() {
    let d = tempfile::tempdir().unwrap();
    let cfg = load_with(&[write(d.path(), "docker-bake.hcl", HCL)], &[]).unwrap();
    let e = err(resolve(&cfg, &["nope"], &[]));
    assert!(e.contains("unknown target \"nope\"") && e.contains("app, base, default, extras, tools"), "{e}");

    let cyc = write(
        d.path(),
        "cycle.hcl",
        "target \"a\" {\n  inherits = [\"b\"]\n}\ntarget \"b\" {\n  inherits = [\"c\"]\n}\ntarget \"c\" {\n  inherits = [\"a\"]\n}\n",
    );
    let cfg = load_with(&[cyc], &[]).unwrap();
    let e = err(resolve(&cfg, &["a"], &[]));
    assert!(e.contains("a -> b -> c -> a"), "{e}");
    let missing = write(d.path(), "missing.hcl", "target \"a\" {\n  inherits = [\"ghost\"]\n}\n");
    assert!(err(resolve(&load_with(&[missing], &[]).unwrap(), &["a"], &[])).contains("inherits from \"ghost\""));
    let e = err(resolve(&load_with(&[write(d.path(), "nodefault.hcl", "target \"a\" {}\n")], &[]).unwrap(), &[], &[]));
    assert!(e.contains("no group or target named \"default\""), "{e}");

    // Syntax errors carry the line and column.
    let e = err(load_with(&[write(d.path(), "syntax.hcl", "target \"a\" {\n  tags = [\"x\"\n}\n")], &[]));
    assert!(e.starts_with(&format!("{}:3:", d.path().join("syntax.hcl").display())), "{e}");
    let e = err(load_with(&[write(d.path(), "bad.json", "{\n  \"target\": {\n    \"a\": [}\n}")], &[]));
    assert!(e.contains("bad.json:3:"), "{e}");
    // Evaluation errors name the file, the block's line and the attribute.
    let e = err(load_with(&[write(d.path(), "undef.hcl", "\n\ntarget \"a\" {\n  tags = [\"${NOPE}\"]\n}\n")], &[]));
    assert!(e.contains("undef.hcl:3: target \"a\": tags:") && e.contains("NOPE"), "{e}");
    let e = err(load_with(&[write(d.path(), "attr.hcl", "target \"a\" {\n  colour = \"blue\"\n}\n")], &[]));
    assert!(e.contains("attr.hcl:1: target \"a\": colour: unknown attribute \"colour\""), "{e}");
    let e = err(load_with(&[write(d.path(), "vars.hcl", "variable \"A\" {\n  default = B\n}\nvariable \"B\" {\n  default = A\n}\n")], &[]));
    assert!(e.contains("vars.hcl:1: variable \"A\""), "{e}");
    let e = err(load_with(&[write(d.path(), "name.hcl", "target \"a b\" {}\n")], &[]));
    assert!(e.contains("name.hcl:1: target name \"a b\""), "{e}");
}

#[test]
fn compose_services_become_targets() {
    let d = tempfile::tempdir().unwrap();
    let proj = d.path().join("My_Shop");
    std::fs::create_dir_all(&proj).unwrap();
    write(&proj, ".env", "VERSION=3\n");
    let f = write(
        &proj,
        "compose.yaml",
        r#"services:
  api:
    image: reg.example/api:${VERSION}
    build:
      context: ./api
      dockerfile: Dockerfile.prod
      args:
        - MODE=prod
        - FROM_ENV
      labels:
        team: core
      target: run
      tags: ["reg.example/api:latest"]
      platforms: [linux/amd64]
      additional_contexts:
        shared: ../shared
        base: docker-image://alpine:3
  web:
    build: web
  db:
    image: postgres
"#,
    );
    let cfg = load_with(std::slice::from_ref(&f), &[("FROM_ENV", "yes")]).unwrap();
    let t = resolve(&cfg, &[], &[]).unwrap();
    assert_eq!(t.keys().collect::<Vec<_>>(), ["api", "web"], "services without build: are not targets");
    let api = &t["api"];
    assert_eq!(api.tags.as_deref(), Some(&["reg.example/api:3".to_string(), "reg.example/api:latest".into()][..]));
    assert_eq!(api.context.as_deref(), Some(proj.join("./api").to_str().unwrap()), "relative to the compose file");
    assert_eq!(api.dockerfile.as_deref(), Some("Dockerfile.prod"));
    assert_eq!(api.args["MODE"], "prod");
    assert_eq!(api.args["FROM_ENV"], "yes");
    assert_eq!(api.labels["team"], "core");
    assert_eq!(api.target.as_deref(), Some("run"));
    assert_eq!(api.contexts["shared"], proj.join("../shared").display().to_string());
    assert_eq!(api.contexts["base"], "docker-image://alpine:3");
    assert_eq!(t["web"].tags.as_deref(), Some(&["my_shop-web".to_string()][..]), "<project>-<service>, as compose names it");
    let named = load_with(&[f], &[("COMPOSE_PROJECT_NAME", "Shop")]).unwrap();
    assert_eq!(resolve(&named, &["web"], &[]).unwrap()["web"].tags.as_deref(), Some(&["shop-web".to_string()][..]));

    let bad = write(&proj, "bad.yaml", "services:\n  a:\n    build: [\n");
    let e = err(load_with(&[bad], &[]));
    assert!(e.contains("bad.yaml:4:1: "), "{e}");
}

/// What `--print` shows: buildx's shape, defaults filled in.
#[test]
fn print_is_buildx_shaped() {
    let d = tempfile::tempdir().unwrap();
    let cfg = load_with(&[write(d.path(), "docker-bake.hcl", HCL)], &[]).unwrap();
    let (g, t) = cfg.resolve(&["app".to_string()], &[]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&print_json(&g, &t)).unwrap();
    assert_eq!(v["group"]["default"]["targets"], serde_json::json!(["app"]));
    let app = &v["target"]["app"];
    assert_eq!(app["context"], ".");
    assert_eq!(app["dockerfile"], "build/Dockerfile");
    assert_eq!(app["args"]["GO"], "1.23");
    assert_eq!(app["platforms"], serde_json::json!(["linux/amd64"]));
    assert!(app.get("inherits").is_none() && app.get("no-cache").is_none());
}

/// Each target becomes a `hoist build` with the flags that mean the same.
#[test]
fn targets_become_hoist_build_flags() {
    let bake = BakeArgs::try_parse_from_for_test(&["--insecure-registry", "r:1", "--pull", "--allow", "fs.read=/x,network.host"]);
    let t = Target {
        name: "app".into(),
        context: Some("ctx".into()),
        dockerfile: Some("df/Dockerfile".into()),
        args: [("A".to_string(), "1=2".to_string())].into(),
        tags: Some(vec!["x:1".into(), "x:2".into()]),
        platforms: Some(vec!["linux/amd64".into(), "linux/arm64".into()]),
        target: Some("run".into()),
        output: Some(vec!["type=registry".into(), "type=docker".into(), "type=local,dest=out".into()]),
        entitlements: Some(vec!["network.host".into(), "fs.read=/y".into()]),
        annotations: Some(vec!["index:org.x=1".into()]),
        call: Some("check".into()),
        ..Target::default()
    };
    let a = build_args(&t, &bake, "plain", None, Some(Path::new("/tmp/m.json"))).unwrap();
    assert_eq!(a.metadata_file.as_deref(), Some(Path::new("/tmp/m.json")));
    assert_eq!(a.context, "ctx");
    assert_eq!(a.file.as_deref(), Some("ctx/df/Dockerfile"), "the Dockerfile is in the context, as buildx has it");
    assert_eq!(a.build_args, ["A=1=2"]);
    assert_eq!(a.tags, ["x:1", "x:2"]);
    assert_eq!(a.platform, ["linux/amd64,linux/arm64"]);
    assert_eq!(a.target.as_deref(), Some("run"));
    assert!(a.push && a.load && a.pull && !a.no_cache);
    assert_eq!(a.outputs, ["type=local,dest=out"]);
    assert_eq!(a.insecure_registries, ["r:1"]);
    assert_eq!(a.allow, ["network.host"], "buildx's fs entitlements need nothing here; the file's and the flag's are one");
    assert_eq!(a.annotations, ["index:org.x=1"]);
    assert_eq!(a.call.as_deref(), Some("check"));
    let inline =
        build_args(&Target { dockerfile_inline: Some("FROM x".into()), ..t }, &bake, "plain", Some(Path::new("/tmp/i")), None).unwrap();
    assert_eq!(inline.file.as_deref(), Some("/tmp/i"));
}

impl BakeArgs {
    fn try_parse_from_for_test(args: &[&str]) -> BakeArgs {
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            b: BakeArgs,
        }
        P::try_parse_from(std::iter::once("bake").chain(args.iter().copied())).unwrap().b
    }
}

#[test]
fn glob_matches_as_path_match() {
    assert!(glob("*", "app"));
    assert!(glob("app-*", "app-web"));
    assert!(glob("a?p", "app"));
    assert!(!glob("app-*", "api"));
    assert!(!glob("a", "ab"));
}

#[test]
fn target_contexts_build_the_named_target_first_and_cycles_are_named() {
    let d = tempfile::tempdir().unwrap();
    let hcl = "target \"base\" {\n  tags = [\"b:1\"]\n  output = [\"type=docker\"]\n}\n\
               target \"mid\" {\n  contexts = { base = \"target:base\" }\n}\n\
               target \"app\" {\n  contexts = { mid = \"target:mid\" }\n}\n";
    let cfg = load_with(&[write(d.path(), "docker-bake.hcl", hcl)], &[]).unwrap();
    let t = resolve(&cfg, &["app"], &[]).unwrap();
    assert_eq!(t.keys().collect::<Vec<_>>(), ["app", "base", "mid"], "what app builds on is built too");
    assert_eq!(t["base"].output, None, "a target built only for another has no outputs of its own");
    assert_eq!(build_order(&t).unwrap(), [vec!["base".to_string()], vec!["mid".to_string()], vec!["app".to_string()]]);
    // Asked for itself, a target keeps its outputs.
    let t = resolve(&cfg, &["app", "base"], &[]).unwrap();
    assert_eq!(t["base"].output.as_deref(), Some(&["type=docker".to_string()][..]));

    let cyc = "target \"a\" {\n  contexts = { x = \"target:b\" }\n}\ntarget \"b\" {\n  contexts = { y = \"target:a\" }\n}\n";
    let e = err(resolve(&load_with(&[write(d.path(), "cycle.hcl", cyc)], &[]).unwrap(), &["a"], &[]));
    assert!(e.contains("the targets a, b need each other through target: contexts"), "{e}");
    let ghost = "target \"a\" {\n  contexts = { x = \"target:ghost\" }\n}\n";
    let e = err(resolve(&load_with(&[write(d.path(), "ghost.hcl", ghost)], &[]).unwrap(), &["a"], &[]));
    assert!(e.contains("target \"a\": context target:ghost names no target"), "{e}");
}
