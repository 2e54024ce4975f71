//! Frontend tests with a fake resolver (a map of reference → image config).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use hoist_oci::image::{Healthcheck, ImageConfig, RunConfig};

use super::*;
use crate::graph::{
    Base, BuildGraph, CacheSharing, Chmod, CopyOp, CopySource, FrontendOptions, MountKind, NetworkMode, Op, Platform, ResolvedImage, RunOp,
    SecurityMode, Source, Stage,
};

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct Fake {
    images: HashMap<String, ImageConfig>,
    calls: Mutex<Vec<(String, String)>>,
}

#[async_trait::async_trait]
impl ImageResolver for Fake {
    async fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedImage, crate::images::ImageError> {
        self.calls.lock().unwrap().push((reference.to_string(), platform.to_string()));
        match self.images.get(reference) {
            Some(c) => Ok(ResolvedImage {
                reference: reference.to_string(),
                manifest_digest: format!("sha256:{:064x}", reference.len()),
                config: c.clone(),
            }),
            None => Err(hoist_oci::registry::RegistryError::NotFound {
                registry: "docker.io".into(),
                what: format!("image {reference}"),
                reason: "repository does not exist".into(),
            }
            .into()),
        }
    }
}

fn image(rc: RunConfig) -> ImageConfig {
    ImageConfig { architecture: "amd64".into(), os: "linux".into(), config: rc, ..ImageConfig::default() }
}

fn fake() -> Fake {
    let mut images = HashMap::new();
    images.insert(
        "busybox".to_string(),
        image(RunConfig { env: Some(vec![PATH.into()]), cmd: Some(vec!["sh".into()]), ..RunConfig::default() }),
    );
    images.insert(
        "127.0.0.1:5000/library/busybox".to_string(),
        image(RunConfig { env: Some(vec![PATH.into()]), cmd: Some(vec!["sh".into()]), ..RunConfig::default() }),
    );
    images.insert(
        "app".to_string(),
        image(RunConfig {
            env: Some(vec!["LANG=C.UTF-8".into()]),
            working_dir: Some("/srv".into()),
            user: Some("app".into()),
            entrypoint: Some(vec!["/entry".into()]),
            cmd: Some(vec!["serve".into()]),
            shell: Some(vec!["/bin/bash".into(), "-c".into()]),
            healthcheck: Some(Healthcheck { test: vec!["CMD".into(), "true".into()], ..Healthcheck::default() }),
            ..RunConfig::default()
        }),
    );
    images.insert(
        "onbuild-base".to_string(),
        image(RunConfig {
            env: Some(vec![PATH.into()]),
            on_build: Some(vec!["RUN echo from-trigger".into(), "COPY --from=helper /x /y".into()]),
            ..RunConfig::default()
        }),
    );
    images.insert("helper".to_string(), image(RunConfig::default()));
    images.insert("golang:1.22".to_string(), image(RunConfig { env: Some(vec![PATH.into()]), ..RunConfig::default() }));
    Fake { images, calls: Mutex::new(Vec::new()) }
}

fn opts() -> FrontendOptions {
    FrontendOptions {
        dockerfile_name: "Dockerfile".into(),
        target_platform: Some(Platform::parse("linux/amd64").unwrap()),
        build_platform: Some(Platform::parse("linux/amd64").unwrap()),
        ..FrontendOptions::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().unwrap()
}

fn build_with(df: &str, o: &FrontendOptions) -> Result<BuildGraph, FrontendError> {
    let f = fake();
    rt().block_on(build_graph(df.as_bytes(), o, &f))
}

fn build(df: &str) -> BuildGraph {
    build_with(df, &opts()).unwrap_or_else(|e| panic!("build failed: {e}\n{df}"))
}

fn err(df: &str) -> String {
    match build_with(df, &opts()) {
        Ok(_) => panic!("should fail:\n{df}"),
        Err(e) => e.to_string(),
    }
}

fn target(g: &BuildGraph) -> &Stage {
    &g.stages[g.target]
}

fn runs(st: &Stage) -> Vec<&RunOp> {
    st.steps
        .iter()
        .filter_map(|s| match &s.op {
            Op::Run(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn copies(st: &Stage) -> Vec<&CopyOp> {
    st.steps
        .iter()
        .filter_map(|s| match &s.op {
            Op::Copy(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn history(st: &Stage) -> Vec<(String, bool)> {
    st.history.iter().map(|h| (h.created_by.clone(), h.empty_layer)).collect()
}

fn h(items: &[(&str, bool)]) -> Vec<(String, bool)> {
    items.iter().map(|(a, b)| (a.to_string(), *b)).collect()
}

fn s(items: &[&str]) -> Vec<String> {
    items.iter().map(|x| x.to_string()).collect()
}

fn with_args(pairs: &[(&str, &str)]) -> FrontendOptions {
    let mut o = opts();
    o.build_args = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    o
}

#[test]
fn scratch_image_config_is_buildkits_empty_image() {
    let g = build("FROM scratch\n");
    let st = target(&g);
    assert!(matches!(st.base, Base::Scratch));
    assert_eq!(st.config.env.as_deref(), Some(&[PATH.to_string()][..]));
    assert_eq!(st.config.working_dir.as_deref(), Some("/"));
    assert!(st.history.is_empty() && st.steps.is_empty());
    assert_eq!(st.platform.to_string(), "linux/amd64");
}

#[test]
fn base_image_config_is_inherited() {
    let g = build("FROM app\n");
    let st = target(&g);
    assert!(matches!(&st.base, Base::Image(i) if i.reference == "app"));
    assert_eq!(st.config.env, Some(s(&["LANG=C.UTF-8", PATH])));
    assert_eq!(st.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(st.config.user.as_deref(), Some("app"));
    assert_eq!(st.config.cmd, Some(s(&["serve"])));
    assert_eq!(st.config.shell, Some(s(&["/bin/bash", "-c"])));
    assert!(st.config.healthcheck.is_some());
}

#[test]
fn run_shell_and_exec_forms() {
    let g = build("FROM busybox\nRUN make -j2\nRUN [\"echo\", \"hi there\"]\n");
    let st = target(&g);
    let r = runs(st);
    assert_eq!(r[0].args, s(&["/bin/sh", "-c", "make -j2"]));
    assert_eq!(r[1].args, s(&["echo", "hi there"]));
    assert_eq!(r[0].cwd, "/");
    assert_eq!(r[0].user, "");
    assert_eq!(r[0].env, s(&[PATH]));
    assert_eq!(history(st), h(&[("RUN /bin/sh -c make -j2 # buildkit", false), ("RUN echo hi there # buildkit", false)]));
    assert_eq!(st.steps[0].display, "RUN make -j2");
    assert_eq!(st.steps[0].line, 2);
    assert!(st.history.iter().all(|e| e.comment.as_deref() == Some("buildkit.dockerfile.v0")));
}

#[test]
fn run_is_not_expanded_by_the_frontend() {
    let g = build("FROM busybox\nENV A=1\nRUN echo $A ${B:-x}\n");
    assert_eq!(runs(target(&g))[0].args, s(&["/bin/sh", "-c", "echo $A ${B:-x}"]));
}

#[test]
fn shell_instruction_changes_the_shell() {
    let g = build("FROM busybox\nSHELL [\"/bin/bash\", \"-eo\", \"pipefail\", \"-c\"]\nRUN a | b\nCMD serve\n");
    let st = target(&g);
    assert_eq!(runs(st)[0].args, s(&["/bin/bash", "-eo", "pipefail", "-c", "a | b"]));
    assert_eq!(st.config.cmd, Some(s(&["/bin/bash", "-eo", "pipefail", "-c", "serve"])));
    assert_eq!(history(st)[0], ("SHELL [/bin/bash -eo pipefail -c]".to_string(), true));
    let g = build("FROM app\nRUN x\n");
    assert_eq!(runs(target(&g))[0].args, s(&["/bin/bash", "-c", "x"]));
}

#[test]
fn env_forms_order_and_history() {
    let g = build("FROM busybox\nENV A=1 B=\"two words\"\nENV C 3 4\nENV A=5\n");
    let st = target(&g);
    assert_eq!(st.config.env, Some(s(&[PATH, "A=5", "B=two words", "C=3 4"])));
    assert_eq!(history(st), h(&[("ENV A=1 B=two words", true), ("ENV C=3 4", true), ("ENV A=5", true)]));
}

#[test]
fn env_values_use_the_environment_before_the_instruction() {
    // Dockerfile reference: "ENV abc=hello / ENV abc=bye def=$abc" gives def=hello
    let g = build("FROM busybox\nENV abc=hello\nENV abc=bye def=$abc\nENV ghi=$abc\n");
    let env = target(&g).config.env.clone().unwrap();
    assert!(env.contains(&"def=hello".to_string()), "{env:?}");
    assert!(env.contains(&"ghi=bye".to_string()), "{env:?}");
}

#[test]
fn run_env_order_moves_reassigned_keys_to_the_end() {
    let g = build("FROM busybox\nENV A=1 B=2\nENV A=3\nRUN x\n");
    assert_eq!(runs(target(&g))[0].env, s(&[PATH, "B=2", "A=3"]));
    // the image config keeps the first position
    assert_eq!(target(&g).config.env, Some(s(&[PATH, "A=3", "B=2"])));
}

#[test]
fn global_args_expand_from_and_need_redeclaring_in_a_stage() {
    let df = "ARG IMG=busybox\nARG V=1\nFROM $IMG\nRUN echo $V\nARG V\nRUN echo $V\n";
    let g = build(df);
    let st = target(&g);
    assert!(matches!(&st.base, Base::Image(i) if i.reference == "busybox"));
    let r = runs(st);
    assert_eq!(r[0].env, s(&[PATH]));
    assert_eq!(r[1].env, s(&[PATH, "V=1"]));
    assert_eq!(
        history(st),
        h(&[("RUN /bin/sh -c echo $V # buildkit", false), ("ARG V=1", true), ("RUN |1 V=1 /bin/sh -c echo $V # buildkit", false)])
    );
}

#[test]
fn build_args_override_defaults_everywhere() {
    let df = "ARG IMG=nope\nFROM ${IMG}\nARG V=default\nARG W\nRUN x\n";
    let g = build_with(df, &with_args(&[("IMG", "busybox"), ("V", "cli"), ("W", "w")])).unwrap();
    let st = target(&g);
    assert_eq!(runs(st)[0].env, s(&[PATH, "V=cli", "W=w"]));
    assert_eq!(history(st)[2].0, "RUN |2 V=cli W=w /bin/sh -c x # buildkit");
    assert!(g.warnings.is_empty(), "{:?}", g.warnings);
}

#[test]
fn arg_without_value_is_in_history_but_not_env() {
    let g = build("FROM busybox\nARG NOVAL\nRUN x\n");
    let st = target(&g);
    assert_eq!(runs(st)[0].env, s(&[PATH]));
    assert_eq!(history(st), h(&[("ARG NOVAL", true), ("RUN |1 NOVAL= /bin/sh -c x # buildkit", false)]));
}

#[test]
fn several_args_on_one_line() {
    let g = build("FROM busybox\nARG A=1 B C=$A\nRUN x\n");
    let st = target(&g);
    assert_eq!(history(st)[0].0, "ARG A=1 B C=1");
    assert_eq!(runs(st)[0].env, s(&[PATH, "A=1", "C=1"]));
}

#[test]
fn env_overrides_arg_in_the_run_environment_and_history() {
    let g = build("FROM busybox\nARG V=arg\nENV V=env\nRUN x\n");
    let st = target(&g);
    assert_eq!(runs(st)[0].env, s(&[PATH, "V=env"]));
    assert_eq!(history(st)[2].0, "RUN |1 V=env /bin/sh -c x # buildkit");
}

#[test]
fn arg_default_can_use_env() {
    let g = build("FROM busybox\nENV BASE=/opt\nARG DIR=$BASE/app\nWORKDIR $DIR\n");
    assert_eq!(target(&g).config.working_dir.as_deref(), Some("/opt/app"));
}

#[test]
fn platform_args_are_predefined_for_from_and_declared_in_stages() {
    let mut o = opts();
    o.target_platform = Some(Platform::parse("linux/arm64").unwrap());
    let df = "FROM --platform=$BUILDPLATFORM golang:1.22 AS build\nARG TARGETOS TARGETARCH TARGETPLATFORM BUILDPLATFORM TARGETVARIANT\nRUN go build\nFROM busybox\nCOPY --from=build /out /out\n";
    let f = fake();
    let g = rt().block_on(build_graph(df.as_bytes(), &o, &f)).unwrap();
    let build_stage = g.stages.iter().find(|s| s.name.as_deref() == Some("build")).unwrap();
    assert_eq!(build_stage.platform.to_string(), "linux/amd64");
    assert_eq!(
        runs(build_stage)[0].env,
        s(&[PATH, "TARGETOS=linux", "TARGETARCH=arm64", "TARGETPLATFORM=linux/arm64", "BUILDPLATFORM=linux/amd64", "TARGETVARIANT="])
    );
    assert_eq!(target(&g).platform.to_string(), "linux/arm64");
    let calls = f.calls.lock().unwrap().clone();
    assert!(calls.contains(&("golang:1.22".to_string(), "linux/amd64".to_string())), "{calls:?}");
    assert!(calls.contains(&("busybox".to_string(), "linux/arm64".to_string())), "{calls:?}");
}

#[test]
fn platform_args_are_not_in_the_stage_env_unless_declared() {
    let g = build("FROM busybox\nRUN echo $TARGETARCH\n");
    assert_eq!(runs(target(&g))[0].env, s(&[PATH]));
}

#[test]
fn platform_args_can_be_overridden_by_build_args() {
    let g = build_with("ARG TARGETARCH\nFROM busybox\nARG TARGETARCH\nRUN x\n", &with_args(&[("TARGETARCH", "riscv64")])).unwrap();
    assert_eq!(runs(target(&g))[0].env, s(&[PATH, "TARGETARCH=riscv64"]));
}

#[test]
fn variant_arg_for_arm() {
    let mut o = opts();
    o.target_platform = Some(Platform::parse("linux/arm/v7").unwrap());
    let g = rt().block_on(build_graph(b"FROM scratch\nARG TARGETPLATFORM TARGETVARIANT\nRUN x\n", &o, &fake())).unwrap();
    assert_eq!(runs(target(&g))[0].env, s(&[PATH, "TARGETPLATFORM=linux/arm/v7", "TARGETVARIANT=v7"]));
}

#[test]
fn proxy_build_args_reach_the_container_but_not_the_key() {
    let g = build_with("FROM busybox\nRUN x\n", &with_args(&[("HTTP_PROXY", "http://p:3128"), ("no_proxy", "localhost")])).unwrap();
    let r = runs(target(&g))[0];
    assert_eq!(r.env, s(&[PATH]));
    assert_eq!(r.proxy_env, s(&["HTTP_PROXY=http://p:3128", "http_proxy=http://p:3128", "NO_PROXY=localhost", "no_proxy=localhost"]));
    assert!(g.warnings.is_empty(), "proxy args are never reported unused: {:?}", g.warnings);
    let g = build_with("FROM busybox\nARG HTTP_PROXY\nRUN x\n", &with_args(&[("HTTP_PROXY", "http://p")])).unwrap();
    assert_eq!(runs(target(&g))[0].env, s(&[PATH, "HTTP_PROXY=http://p"]));
}

#[test]
fn unused_build_args_are_a_warning() {
    let g = build_with("FROM busybox\nARG USED\n", &with_args(&[("USED", "1"), ("UNUSED", "2"), ("ALSO", "3")])).unwrap();
    assert_eq!(g.warnings, s(&["one or more build-args [ALSO UNUSED] were not consumed"]));
}

#[test]
fn source_date_epoch_is_consumed_by_the_exporter_not_reported_unused() {
    let g = build_with("FROM busybox\n", &with_args(&[("SOURCE_DATE_EPOCH", "1700000000"), ("OTHER", "1")])).unwrap();
    assert_eq!(g.warnings, s(&["one or more build-args [OTHER] were not consumed"]));
}

#[test]
fn workdir_is_relative_to_the_previous_one_and_creates_the_directory() {
    let g = build("FROM busybox\nWORKDIR /app\nWORKDIR src\nUSER nobody\nWORKDIR ../lib\nWORKDIR /\nRUN pwd\n");
    let st = target(&g);
    let mk: Vec<(String, String)> = st
        .steps
        .iter()
        .filter_map(|s| match &s.op {
            Op::Mkdir(m) => Some((m.path.clone(), m.user.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(mk, vec![("/app".into(), "".into()), ("/app/src".into(), "".into()), ("/app/lib".into(), "nobody".into())]);
    assert_eq!(runs(st)[0].cwd, "/");
    assert_eq!(runs(st)[0].user, "nobody");
    assert_eq!(
        history(st),
        h(&[
            ("WORKDIR /app", false),
            ("WORKDIR /app/src", false),
            ("USER nobody", true),
            ("WORKDIR /app/lib", false),
            ("WORKDIR /", true),
            ("RUN /bin/sh -c pwd # buildkit", false),
        ])
    );
    // n-th non-empty history entry belongs to steps[n]
    let non_empty = st.history.iter().filter(|h| !h.empty_layer).count();
    assert_eq!(non_empty, st.steps.len());
}

#[test]
fn workdir_relative_to_base_image_workdir() {
    let g = build("FROM app\nWORKDIR data\nRUN x\n");
    assert_eq!(runs(target(&g))[0].cwd, "/srv/data");
    assert_eq!(runs(target(&g))[0].user, "app");
}

#[test]
fn copy_destinations_are_relative_to_workdir() {
    let g = build("FROM busybox\nWORKDIR /app\nCOPY a .\nCOPY b c/\nCOPY d e\nCOPY f /abs\nCOPY g ./\n");
    let dests: Vec<String> = copies(target(&g)).iter().map(|c| c.dest.clone()).collect();
    assert_eq!(dests, s(&["/app/", "/app/c/", "/app/e", "/abs", "/app/"]));
}

#[test]
fn copy_history_and_flags() {
    let g = build("FROM busybox\nARG U=1000\nCOPY --chown=$U:$U --chmod=0640 --link a b /dst/\n");
    let st = target(&g);
    let c = copies(st)[0];
    assert_eq!(c.chown.as_deref(), Some("1000:1000"));
    assert_eq!(c.chmod, Some(Chmod::Octal(0o640)));
    assert!(c.link && !c.is_add && !c.unpack);
    assert_eq!(c.from, Source::Context);
    assert!(matches!(&c.sources[..], [CopySource::Path(a), CopySource::Path(b)] if a == "a" && b == "b"));
    assert_eq!(history(st)[1], ("COPY --chown=1000:1000 --chmod=0640 a b /dst/ # buildkit".to_string(), false));
    assert_eq!(st.steps[0].display, "COPY --chown=1000:1000 --chmod=0640 --link a b /dst/");
}

#[test]
fn copy_chmod_symbolic_and_invalid() {
    let g = build("FROM busybox\nCOPY --chmod=u+x a /b\n");
    assert_eq!(copies(target(&g))[0].chmod, Some(Chmod::Symbolic("u+x".into())));
    let e = err("FROM busybox\nCOPY --chmod=10000 a /b\n");
    assert!(e.starts_with("Dockerfile:2: invalid chmod parameter: '10000'"), "{e}");
}

#[test]
fn copy_parents_and_excludes_are_kept() {
    let g = build("FROM busybox\nCOPY --parents --exclude=*.tmp ./src/./pkg/**/*.go /out/\n");
    let st = target(&g);
    let c = copies(st)[0];
    assert!(c.parents);
    assert_eq!(c.exclude, s(&["*.tmp"]));
    assert_eq!(history(st)[0].0, "COPY --parents ./src/./pkg/**/*.go /out/ # buildkit");
}

#[test]
fn copy_from_stage_image_and_index() {
    let df = "FROM busybox AS build\nRUN make\nFROM scratch\nCOPY --from=build /out /a\nCOPY --from=0 /out /b\nCOPY --from=helper /h /c\nCOPY --from=BUILD /out /d\n";
    let g = build(df);
    // implicit image stage first, then the Dockerfile's stages
    assert_eq!(g.stages.len(), 3);
    assert!(g.stages[0].name.is_none() && g.stages[0].dockerfile_index.is_none());
    assert!(matches!(&g.stages[0].base, Base::Image(i) if i.reference == "helper"));
    assert!(g.stages[0].steps.is_empty());
    assert_eq!(g.stages[1].name.as_deref(), Some("build"));
    let c = copies(target(&g));
    assert_eq!(c[0].from, Source::Stage(1));
    assert_eq!(c[1].from, Source::Stage(1));
    assert_eq!(c[2].from, Source::Stage(0));
    assert_eq!(c[3].from, Source::Stage(1));
    assert_eq!(history(target(&g))[0].0, "COPY /out /a # buildkit");
    assert_eq!(g.target, 2);
}

#[test]
fn stages_only_refer_to_earlier_stages() {
    let df = "FROM busybox AS a\nFROM a AS b\nCOPY --from=helper x y\nFROM golang:1.22\nCOPY --from=b / /\nCOPY --from=a / /\n";
    let g = build(df);
    for (i, st) in g.stages.iter().enumerate() {
        if let Base::Stage(b) = st.base {
            assert!(b < i);
        }
        for c in copies(st) {
            if let Source::Stage(s) = c.from {
                assert!(s < i, "stage {i} refers to {s}");
            }
        }
    }
}

#[test]
fn copy_from_errors() {
    let e = err("FROM busybox\nCOPY --from=5 a b\n");
    assert!(e.starts_with("Dockerfile:2: invalid stage index 5"), "{e}");
    let e = err("FROM busybox AS a\nCOPY --from=b x y\nFROM busybox AS b\nFROM scratch\nCOPY --from=a / /\n");
    assert!(e.contains("cannot copy from stage \"b\", it needs to be defined before current stage \"a\""), "{e}");
    assert!(e.starts_with("Dockerfile:2:"), "{e}");
    let e = err("FROM busybox AS a\nCOPY --from=a x y\n");
    assert!(e.starts_with("Dockerfile:2: circular dependency detected on stage: a"), "{e}");
    let e = err("FROM busybox AS a\nCOPY --from=b x y\nFROM busybox AS b\nCOPY --from=a x y\n");
    assert!(e.contains("circular dependency detected"), "{e}");
}

#[test]
fn copy_urls_and_git_are_add_only() {
    let e = err("FROM busybox\nCOPY https://example.com/x.tgz /\n");
    assert!(e.contains("source can't be a URL for COPY"), "{e}");
    let e = err("FROM busybox\nCOPY https://github.com/moby/buildkit.git /src\n");
    assert!(e.contains("source can't be a git ref for COPY"), "{e}");
    let sum = format!("sha256:{}", "a".repeat(64));
    let g = build(&format!("FROM busybox\nADD --checksum={sum} https://example.com/x.tgz /\nADD local.tar /x/\n"));
    let c = copies(target(&g));
    assert!(matches!(&c[0].sources[0], CopySource::Url { url, checksum: Some(cs) } if url == "https://example.com/x.tgz" && *cs == sum));
    assert!(c[0].is_add && c[0].unpack);
    assert_eq!(history(target(&g))[0].0, "ADD https://example.com/x.tgz / # buildkit");
    let e = err("FROM busybox\nADD --checksum=sha256:abc https://e.com/x /\n");
    assert!(e.contains("invalid checksum digest format"), "{e}");
    let e = err(&format!("FROM busybox\nADD --checksum={sum} local /\n"));
    assert!(e.contains("checksum can't be specified for non-HTTP(S) sources"), "{e}");
    let e = err(&format!("FROM busybox\nADD --checksum={sum} https://e.com/a https://e.com/b /\n"));
    assert!(e.contains("checksum can't be specified for multiple sources"), "{e}");
    let g = build("FROM busybox\nADD --unpack=false --keep-git-dir git@github.com:a/b.git /src\n");
    let c = copies(target(&g))[0];
    assert!(!c.unpack && c.keep_git_dir);
}

#[test]
fn copy_heredocs_are_inline_sources() {
    let df = "FROM busybox\nENV NAME=world\nCOPY <<EOF <<'RAW' /etc/\nhello $NAME \"q\"\nEOF\nhello $NAME\nRAW\n";
    let g = build(df);
    let st = target(&g);
    let c = copies(st)[0];
    assert!(matches!(&c.sources[0], CopySource::Inline { name, content } if name == "EOF" && content == "hello world \"q\"\n"));
    assert!(matches!(&c.sources[1], CopySource::Inline { name, content } if name == "RAW" && content == "hello $NAME\n"));
    assert_eq!(history(st)[1].0, "COPY <<EOF <<RAW /etc/ # buildkit");
}

#[test]
fn run_heredoc_whole_command_runs_in_the_shell() {
    let g = build("FROM busybox\nRUN <<EOF\necho a\necho b\nEOF\n");
    let st = target(&g);
    let r = runs(st)[0];
    assert_eq!(r.args, s(&["/bin/sh", "-c", "echo a\necho b\n"]));
    assert!(r.inline_files.is_empty());
    assert_eq!(st.steps[0].display, "RUN <<EOF (echo a...)");
    assert_eq!(history(st)[0].0, "RUN /bin/sh -c echo a\necho b\n # buildkit");
}

#[test]
fn run_heredoc_with_shebang_becomes_an_inline_file() {
    let g = build("FROM busybox\nRUN <<-EOT\n\t#!/usr/bin/env python3\n\tprint('hi')\n\tEOT\n");
    let r = runs(target(&g))[0];
    assert_eq!(r.args, s(&["/bin/sh", "-c", "/dev/pipes/EOT"]));
    assert_eq!(r.inline_files.len(), 1);
    assert_eq!(r.inline_files[0].target, "/dev/pipes/EOT");
    assert_eq!(r.inline_files[0].content, "#!/usr/bin/env python3\nprint('hi')\n");
    assert_eq!(r.inline_files[0].mode, 0o755);
}

#[test]
fn run_heredoc_inside_a_command_is_passed_to_the_shell() {
    let cases: &[(&str, &str)] = &[
        ("RUN python3 <<EOF\nprint(1)\nEOF\n", "python3 <<EOF\nprint(1)\nEOF"),
        ("RUN cat <<EOF > /f\nhello $X\nEOF\n", "cat <<EOF > /f\nhello $X\nEOF"),
        ("RUN cat > /f <<'EOT'\nhi\nEOT\n", "cat > /f <<'EOT'\nhi\nEOT"),
        ("RUN cat <<A <<B\na\nA\nb\nB\n", "cat <<A <<B\na\nA\nb\nB"),
        ("RUN cat <<-EOF\n\tx\n\tEOF\n", "cat <<-EOF\n\tx\nEOF"),
    ];
    for (run, want) in cases {
        let g = build(&format!("FROM busybox\n{run}"));
        assert_eq!(runs(target(&g))[0].args, s(&["/bin/sh", "-c", want]), "{run}");
    }
}

#[test]
fn run_mounts_are_expanded_and_completed() {
    let df = "FROM busybox AS deps\nFROM busybox\nARG CACHE=/root/.cache\nWORKDIR /w\nRUN --mount=type=cache,target=$CACHE --mount=type=cache,target=rel,sharing=locked,id=x,mode=0700,uid=1 --mount=type=secret,id=npmrc --mount=type=secret,id=tok,env=TOKEN --mount=type=ssh --mount=type=ssh,id=gh --mount=type=tmpfs,target=/tmp,size=1g --mount=from=deps,source=/out,target=/deps --mount=target=ctx,rw make\n";
    let g = build(df);
    let r = runs(target(&g))[0];
    let m = &r.mounts;
    assert_eq!(m.len(), 9);
    assert_eq!(m[0].target, "/root/.cache");
    assert!(
        matches!(&m[0].kind, MountKind::Cache { id, sharing: CacheSharing::Shared, from: None, source, readonly: false, mode: 0o755, uid: 0, gid: 0 } if id == "/root/.cache" && source == "/")
    );
    assert_eq!(m[1].target, "/w/rel");
    assert!(matches!(&m[1].kind, MountKind::Cache { id, sharing: CacheSharing::Locked, mode: 0o700, uid: 1, .. } if id == "x"));
    assert_eq!(m[2].target, "/run/secrets/npmrc");
    assert!(matches!(&m[2].kind, MountKind::Secret { id, env: None, required: false, mode: 0o400, .. } if id == "npmrc"));
    assert_eq!(m[3].target, "");
    assert!(matches!(&m[3].kind, MountKind::Secret { id, env: Some(e), .. } if id == "tok" && e == "TOKEN"));
    assert_eq!(m[4].target, "/run/buildkit/ssh_agent.0");
    assert!(matches!(&m[4].kind, MountKind::Ssh { id, mode: 0o600, .. } if id == "default"));
    assert_eq!(m[5].target, "/run/buildkit/ssh_agent.1");
    assert!(matches!(&m[5].kind, MountKind::Ssh { id, .. } if id == "gh"));
    assert!(matches!(&m[6].kind, MountKind::Tmpfs { size: Some(n) } if *n == 1 << 30));
    assert!(matches!(&m[7].kind, MountKind::Bind { from: Source::Stage(0), source, readwrite: false } if source == "/out"));
    assert_eq!(m[8].target, "/w/ctx");
    assert!(matches!(&m[8].kind, MountKind::Bind { from: Source::Context, readwrite: true, .. }));
}

#[test]
fn run_mount_errors() {
    let e = err("FROM busybox\nRUN --mount=type=cache,target=/ x\n");
    assert!(e.contains("invalid mount target \"/\""), "{e}");
    let e = err("FROM busybox AS a\nRUN --mount=from=b,target=/b x\nFROM busybox AS b\nFROM a\n");
    assert!(e.contains("cannot mount from stage \"b\""), "{e}");
    let e = err("FROM busybox\nRUN --mount=type=ssh,source=x x\n");
    assert!(e.contains("ssh does not support source"), "{e}");
    let e = err("FROM busybox\nRUN --mount=type=$T,target=/x x\n");
    assert!(e.starts_with("Dockerfile:2: --mount=type=$T,target=/x: unsupported mount type \"\""), "{e}");
}

#[test]
fn run_network_and_security() {
    let g = build("FROM busybox\nRUN --network=none --security=insecure x\nRUN --network=host y\n");
    let r = runs(target(&g));
    assert_eq!((r[0].network, r[0].security), (NetworkMode::None, SecurityMode::Insecure));
    assert_eq!((r[1].network, r[1].security), (NetworkMode::Host, SecurityMode::Sandbox));
}

#[test]
fn cmd_and_entrypoint_like_buildkit() {
    let g = build("FROM busybox\nENTRYPOINT [\"/bin/app\"]\n");
    let st = target(&g);
    assert_eq!(st.config.entrypoint, Some(s(&["/bin/app"])));
    assert_eq!(st.config.cmd, None, "ENTRYPOINT resets the base image's CMD");
    assert_eq!(history(st), h(&[("ENTRYPOINT [\"/bin/app\"]", true)]));

    let g = build("FROM busybox\nCMD [\"--help\"]\nENTRYPOINT /bin/app\n");
    let st = target(&g);
    assert_eq!(st.config.cmd, Some(s(&["--help"])), "a CMD of this stage survives ENTRYPOINT");
    assert_eq!(st.config.entrypoint, Some(s(&["/bin/sh", "-c", "/bin/app"])));
    assert_eq!(st.config.args_escaped, Some(true));
    assert_eq!(history(st), h(&[("CMD [\"--help\"]", true), ("ENTRYPOINT [\"/bin/sh\" \"-c\" \"/bin/app\"]", true)]));

    let g = build("FROM busybox\nENTRYPOINT []\n");
    assert_eq!(target(&g).config.entrypoint, None);
    let g = build("FROM busybox\nCMD echo \"hi\"\n");
    assert_eq!(history(target(&g))[0].0, r#"CMD ["/bin/sh" "-c" "echo \"hi\""]"#);
}

#[test]
fn expose_volume_label_user_stopsignal_maintainer() {
    let df = "FROM busybox\nARG P=\"8080 9090/udp\"\nEXPOSE 80 $P\nEXPOSE 443/tcp\nVOLUME /data [\"/x\"]\nVOLUME [\"/y\", \"/z\"]\nLABEL a=1 \"b c\"=\"d e\"\nUSER app:app\nSTOPSIGNAL SIGQUIT\nMAINTAINER Jane\n";
    let g = build(df);
    let st = target(&g);
    let ports: Vec<&String> = st.config.exposed_ports.as_ref().unwrap().keys().collect();
    assert_eq!(ports, vec!["443/tcp", "80/tcp", "8080/tcp", "9090/udp"]);
    let vols: Vec<&String> = st.config.volumes.as_ref().unwrap().keys().collect();
    assert_eq!(vols, vec!["/data", "/y", "/z", "[/x]"]);
    let labels: BTreeMap<String, String> = st.config.labels.clone().unwrap();
    assert_eq!(labels.get("b c").map(String::as_str), Some("d e"));
    assert_eq!(st.config.user.as_deref(), Some("app:app"));
    assert_eq!(st.config.stop_signal.as_deref(), Some("SIGQUIT"));
    assert_eq!(st.author.as_deref(), Some("Jane"));
    assert_eq!(
        history(st),
        h(&[
            ("ARG P=8080 9090/udp", true),
            ("EXPOSE map[80/tcp:{} 8080/tcp:{} 9090/udp:{}]", true),
            ("EXPOSE map[443/tcp:{}]", true),
            ("VOLUME [/data [/x]]", true),
            ("VOLUME [/y /z]", true),
            ("LABEL a=1 b c=d e", true),
            ("USER app:app", true),
            ("STOPSIGNAL SIGQUIT", true),
            ("MAINTAINER Jane", true),
        ])
    );
}

#[test]
fn invalid_values_after_expansion() {
    let e = err("FROM busybox\nSTOPSIGNAL SIGNOPE\n");
    assert!(e.starts_with("Dockerfile:2: invalid signal: SIGNOPE"), "{e}");
    let e = err("FROM busybox\nEXPOSE 80/icmp\n");
    assert!(e.starts_with("Dockerfile:2: invalid proto: icmp"), "{e}");
    let e = err("FROM busybox\nARG V=\nVOLUME $V\n");
    assert!(e.contains("VOLUME specified can not be an empty string"), "{e}");
}

#[test]
fn healthcheck_in_config_and_history() {
    let g = build("FROM busybox\nHEALTHCHECK --interval=5m --timeout=3s CMD curl -f http://localhost/ || exit 1\n");
    let st = target(&g);
    let hc = st.config.healthcheck.clone().unwrap();
    assert_eq!(hc.test, s(&["CMD-SHELL", "curl -f http://localhost/ || exit 1"]));
    assert_eq!((hc.interval, hc.timeout, hc.retries), (300_000_000_000, 3_000_000_000, 0));
    assert_eq!(history(st)[0].0, r#"HEALTHCHECK &{["CMD-SHELL" "curl -f http://localhost/ || exit 1"] "5m0s" "3s" "0s" "0s" '\x00'}"#);
    let g = build("FROM app\nHEALTHCHECK NONE\n");
    assert_eq!(target(&g).config.healthcheck.clone().unwrap().test, s(&["NONE"]));
}

#[test]
fn onbuild_triggers_of_a_base_image_run_first_and_are_cleared() {
    let g = build("FROM onbuild-base\nRUN own\n");
    let st = target(&g);
    assert_eq!(st.config.on_build, None);
    let r = runs(st);
    assert_eq!(r[0].args, s(&["/bin/sh", "-c", "echo from-trigger"]));
    assert_eq!(r[1].args, s(&["/bin/sh", "-c", "own"]));
    assert_eq!(st.steps[0].display, "ONBUILD RUN echo from-trigger");
    assert_eq!(st.steps[0].line, 1);
    // the trigger's COPY --from=helper pulled in an implicit stage
    assert!(g.stages.iter().any(|s| matches!(&s.base, Base::Image(i) if i.reference == "helper")));
    assert!(matches!(copies(st)[0].from, Source::Stage(_)));
}

#[test]
fn onbuild_instructions_are_recorded_and_triggered_in_child_stages() {
    let g = build("FROM busybox AS base\nONBUILD RUN echo child\nFROM base\nRUN own\n");
    let base = &g.stages[0];
    assert_eq!(base.config.on_build, Some(s(&["RUN echo child"])));
    assert!(base.history.is_empty(), "ONBUILD records no history");
    let child = target(&g);
    assert!(matches!(child.base, Base::Stage(0)));
    let r = runs(child);
    assert_eq!(r[0].args, s(&["/bin/sh", "-c", "echo child"]));
    assert_eq!(r[1].args, s(&["/bin/sh", "-c", "own"]));
}

#[test]
fn from_a_stage_inherits_config_env_args_and_workdir() {
    let g = build("FROM busybox AS a\nARG V=1\nENV E=2\nWORKDIR /w\nUSER u\nFROM a\nRUN x\n");
    let st = target(&g);
    assert!(matches!(st.base, Base::Stage(0)));
    let r = runs(st)[0];
    assert_eq!(r.cwd, "/w");
    assert_eq!(r.user, "u");
    assert_eq!(r.env, s(&["V=1", PATH, "E=2"]));
    assert_eq!(history(st), h(&[("RUN |1 V=1 /bin/sh -c x # buildkit", false)]));
}

#[test]
fn only_stages_reachable_from_the_target_are_built() {
    let df = "FROM golang:1.22 AS unused\nRUN x\nFROM busybox AS build\nRUN y\nFROM scratch\nCOPY --from=build / /\n";
    let f = fake();
    let g = rt().block_on(build_graph(df.as_bytes(), &opts(), &f)).unwrap();
    assert_eq!(g.stages.len(), 2);
    let calls = f.calls.lock().unwrap().clone();
    assert_eq!(calls, vec![("busybox".to_string(), "linux/amd64".to_string())]);
}

#[test]
fn target_selection() {
    let df = "FROM busybox AS one\nRUN a\nFROM scratch AS two\n";
    let mut o = opts();
    o.target = Some("One".into());
    let g = build_with(df, &o).unwrap();
    assert_eq!(target(&g).name.as_deref(), Some("one"));
    assert_eq!(g.stages.len(), 1);
    o.target = Some("1".into());
    assert_eq!(target(&build_with(df, &o).unwrap()).name.as_deref(), Some("two"));
    o.target = Some("three".into());
    let e = build_with(df, &o).unwrap_err().to_string();
    assert_eq!(e, "Dockerfile: target stage \"three\" could not be found (stages: one, two)");
}

#[test]
fn labels_from_options_apply_to_the_target_only() {
    let mut o = opts();
    o.labels.insert("org.opencontainers.image.source".into(), "x".into());
    let g = build_with("FROM busybox AS a\nLABEL mine=1\nFROM a\n", &o).unwrap();
    assert!(g.stages[0].config.labels.as_ref().unwrap().get("org.opencontainers.image.source").is_none());
    let labels = target(&g).config.labels.clone().unwrap();
    assert_eq!(labels.len(), 2);
}

#[test]
fn errors_name_the_file_and_line() {
    let mut o = opts();
    o.dockerfile_name = "docker/app.Dockerfile".into();
    let e = build_with("FROM busybox\nRUN a\n\n\n\n\nRUNN make\n", &o).unwrap_err();
    assert_eq!(e.to_string(), "docker/app.Dockerfile:7: unknown instruction \"RUNN\" (did you mean RUN?)");
    assert_eq!(e.line(), Some(7));
    assert!(err("FROM busybox\nCOPY --frm=x a b\n").starts_with("Dockerfile:2: unknown flag --frm for COPY"));
    let e = err("FROM busybox\nENV A=\"${B:?must be set}\"\n");
    assert_eq!(e, "Dockerfile:2: failed to process \"\\\"${B:?must be set}\\\"\": B: must be set");
    assert!(err("FROM busybox\nRUN <<EOF\nx\n").starts_with("Dockerfile:2: unterminated heredoc"));
    assert_eq!(build_with("", &opts()).unwrap_err().to_string(), "Dockerfile: the Dockerfile cannot be empty");
    assert!(err("ARG A=1\n").contains("contains no stages"));
    assert!(err("RUN x\nFROM busybox\n").starts_with("Dockerfile:1: no build stage in current context"));
}

#[test]
fn base_image_problems() {
    let e = err("FROM doesnotexist\n");
    assert_eq!(
        e,
        "Dockerfile:1: failed to resolve image \"doesnotexist\" for linux/amd64: image doesnotexist was not found in registry docker.io: repository does not exist"
    );
    let e = err("ARG IMG\nFROM $IMG\n");
    assert!(e.starts_with("Dockerfile:2: base name ($IMG) should not be blank"), "{e}");
    let e = err("FROM BusyBox\n");
    assert!(e.contains("must be lowercase"), "{e}");
    let e = err("FROM --platform=$NOPE busybox\n");
    assert!(e.contains("empty platform value from expression $NOPE"), "{e}");
    let e = err("FROM --platform=linux busybox\n");
    assert!(e.contains("failed to parse platform linux"), "{e}");
}

#[test]
fn registry_references_are_passed_as_written() {
    let f = fake();
    let g = rt().block_on(build_graph(b"FROM 127.0.0.1:5000/library/busybox\nRUN x\n", &opts(), &f)).unwrap();
    assert!(matches!(&target(&g).base, Base::Image(i) if i.reference == "127.0.0.1:5000/library/busybox"));
}

#[test]
fn escape_directive_applies_to_expansion() {
    let g = build("# escape=`\nFROM busybox\nENV P=c:\\dir`$HOME\n");
    assert!(target(&g).config.env.clone().unwrap().contains(&"P=c:\\dir$HOME".to_string()), "{:?}", target(&g).config.env);
}

#[test]
fn parser_warnings_are_reported_with_the_file() {
    let g = build("FROM busybox\nRUN a \\\n\n  b\n");
    assert_eq!(g.warnings.len(), 1);
    assert!(g.warnings[0].starts_with("Dockerfile:4: empty continuation line"), "{:?}", g.warnings);
}

#[test]
fn from_names_a_later_stage_is_an_image_with_a_warning() {
    let f = fake();
    let mut o = opts();
    o.target = Some("0".into());
    let r = rt().block_on(build_graph(b"FROM later\nFROM busybox AS later\n", &o, &f));
    let e = r.unwrap_err().to_string();
    assert!(e.contains("failed to resolve image \"later\""), "`later` is resolved as an image, as BuildKit does: {e}");
    o.target = Some("later".into());
    let g = rt().block_on(build_graph(b"FROM helper AS later\nFROM later AS x\n", &o, &f)).unwrap();
    assert_eq!(g.stages.len(), 1);
}

#[test]
fn display_strings_expand_known_variables_only() {
    let g = build("FROM busybox\nENV D=/data\nRUN ls $D $UNSET\ncopy a $D\n");
    let st = target(&g);
    assert_eq!(st.steps[0].display, "RUN ls /data $UNSET");
    assert_eq!(st.steps[1].display, "COPY a /data");
}

/// The history Docker 20.10's BuildKit wrote for this Dockerfile (`docker history
/// --no-trunc`, checked in the lab), with the two differences of newer BuildKit that we
/// follow: COPY records `--chown=`, and HEALTHCHECK prints the start interval too.
#[test]
fn history_matches_buildkit_for_a_typical_dockerfile() {
    let df = r#"FROM 127.0.0.1:5000/library/busybox
ARG V=1
ENV A=1 B="two words"
ENV C 3 4
RUN echo $V > /v
WORKDIR /app
WORKDIR src
USER nobody
COPY --chown=1:1 a.txt ./
EXPOSE 80 8080/tcp 53/udp
VOLUME /data /x
LABEL a=1 "b c"="d e"
HEALTHCHECK --interval=5m --timeout=3s --retries=3 CMD curl -f http://localhost/ || exit 1
STOPSIGNAL SIGQUIT
SHELL ["/bin/sh", "-ec"]
CMD echo "hi"
ENTRYPOINT ["/bin/app"]
"#;
    let g = build(df);
    let st = target(&g);
    let got: Vec<String> = st.history.iter().map(|h| h.created_by.clone()).collect();
    assert_eq!(
        got,
        s(&[
            "ARG V=1",
            "ENV A=1 B=two words",
            "ENV C=3 4",
            "RUN |1 V=1 /bin/sh -c echo $V > /v # buildkit",
            "WORKDIR /app",
            "WORKDIR /app/src",
            "USER nobody",
            "COPY --chown=1:1 a.txt ./ # buildkit",
            "EXPOSE map[53/udp:{} 80/tcp:{} 8080/tcp:{}]",
            "VOLUME [/data /x]",
            "LABEL a=1 b c=d e",
            r#"HEALTHCHECK &{["CMD-SHELL" "curl -f http://localhost/ || exit 1"] "5m0s" "3s" "0s" "0s" '\x03'}"#,
            "STOPSIGNAL SIGQUIT",
            "SHELL [/bin/sh -ec]",
            r#"CMD ["/bin/sh" "-ec" "echo \"hi\""]"#,
            r#"ENTRYPOINT ["/bin/app"]"#,
        ])
    );
    // and the config Docker showed
    assert_eq!(st.config.env, Some(s(&[PATH, "A=1", "B=two words", "C=3 4"])));
    assert_eq!(st.config.cmd, Some(s(&["/bin/sh", "-ec", "echo \"hi\""])));
    assert_eq!(st.config.entrypoint, Some(s(&["/bin/app"])));
    assert_eq!(st.config.working_dir.as_deref(), Some("/app/src"));
    assert_eq!(st.config.args_escaped, Some(true));
    assert_eq!(st.config.shell, Some(s(&["/bin/sh", "-ec"])));
    let hc = st.config.healthcheck.clone().unwrap();
    assert_eq!((hc.interval, hc.timeout, hc.retries), (300_000_000_000, 3_000_000_000, 3));
}

// ---- hostile input (issue 7): every error names its line; nothing runs for long ----

fn err_bytes(df: &[u8], limits: &hoist_dockerfile::Limits) -> String {
    let f = fake();
    match rt().block_on(super::build_graph_limited(df, &opts(), limits, &f)) {
        Ok(_) => panic!("should fail:\n{}", String::from_utf8_lossy(df)),
        Err(e) => e.to_string(),
    }
}

#[test]
fn nul_bytes_and_invalid_utf8_name_their_line() {
    let l = hoist_dockerfile::Limits::default();
    let e = err_bytes(b"FROM busybox\nRUN echo a\0b\n", &l);
    assert!(e.starts_with("Dockerfile:2: NUL byte"), "{e}");
    let e = err_bytes(b"FROM busybox\n# comment\nRUN echo \xff\n", &l);
    assert!(e.starts_with("Dockerfile:3: invalid UTF-8"), "{e}");
}

#[test]
fn an_env_doubling_itself_is_refused_quickly_naming_its_line() {
    let df = format!("FROM busybox\nENV A=x\n{}", "ENV A=$A$A\n".repeat(40));
    let t = std::time::Instant::now();
    let e = err(&df);
    assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    // 2^20 bytes is the first value over 1 MiB of growth: the 20th doubling, line 22
    assert!(e.starts_with("Dockerfile:22: "), "{e}");
    assert!(e.contains("more than"), "{e}");
}

#[test]
fn a_stage_environment_over_the_limit_is_refused() {
    let l = hoist_dockerfile::Limits { max_expansion_bytes: 1000, ..Default::default() };
    let big = "v".repeat(600);
    let df = format!("FROM busybox\nENV A={big}\nENV B={big}\n");
    let e = err_bytes(df.as_bytes(), &l);
    assert!(e.starts_with("Dockerfile:3: the stage's environment"), "{e}");
}

#[test]
fn repeating_a_large_variable_hits_the_graph_budget() {
    // Each LABEL holds 512 KiB (within the growth limit); 200 of them would hold 100 MiB.
    let l = hoist_dockerfile::Limits { max_expansion_bytes: 1 << 20, ..Default::default() };
    let mut df = String::from("FROM busybox\nARG A=x\n");
    for _ in 0..19 {
        df.push_str("ARG A=$A$A\n");
    }
    for i in 0..200 {
        df.push_str(&format!("LABEL l{i}=$A\n"));
    }
    let e = err_bytes(df.as_bytes(), &l);
    assert!(e.contains("expands to more than"), "{e}");
    let line: usize = e.trim_start_matches("Dockerfile:").split(':').next().unwrap().parse().unwrap();
    assert!(line > 21 + 100 && line < 21 + 200, "{e}");
}

#[test]
fn ten_thousand_instructions_are_refused_at_once_or_convert_in_seconds() {
    let mut df = String::from("FROM busybox\n");
    for i in 0..10_000 {
        df.push_str(&format!("ENV V{}={i}\n", i % 500));
    }
    let t = std::time::Instant::now();
    let e = err(&df);
    assert!(e.starts_with("Dockerfile:4097: ") && e.contains("more than 4096 instructions"), "{e}");
    assert!(t.elapsed().as_secs_f64() < 2.0, "{:?}", t.elapsed());
    // with the limit raised, the conversion is linear: seconds even in a debug build
    let l = hoist_dockerfile::Limits { max_instructions: 20_000, ..Default::default() };
    let f = fake();
    let t = std::time::Instant::now();
    let g = rt().block_on(super::build_graph_limited(df.as_bytes(), &opts(), &l, &f)).unwrap();
    assert!(t.elapsed().as_secs_f64() < 5.0, "{:?}", t.elapsed());
    assert_eq!(target(&g).history.len(), 10_000);
}

#[test]
fn an_invalid_from_reference_names_its_line() {
    for bad in ["Busybox", "busybox:", "a b", "busybox@sha256:zz", "UPPER/case:1"] {
        let e = err(&format!("# comment\nFROM {bad}\n"));
        assert!(e.starts_with("Dockerfile:2: "), "{bad}: {e}");
    }
}

/// Issue 15: `# syntax=` is accepted when it names the standard frontend, and another
/// frontend is a clear error on its line (hoist cannot run it).
#[test]
fn the_syntax_directive_accepts_the_standard_frontend_only() {
    for ok in [
        "docker/dockerfile:1",
        "docker/dockerfile:1.7-labs",
        "docker.io/docker/dockerfile:1@sha256:abc",
        "docker/dockerfile-upstream:master",
        "docker/dockerfile",
    ] {
        build_with(&format!("# syntax={ok}\nFROM scratch\n"), &opts()).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in ["example.com/other/frontend:1", "tonistiigi/dockerfile:latest", "docker/dockerfilex:1"] {
        let e = build_with(&format!("# syntax={bad}\nFROM scratch\n"), &opts()).unwrap_err().to_string();
        assert!(e.starts_with("Dockerfile:1: # syntax=") && e.contains("another frontend"), "{bad}: {e}");
    }
}

fn with_named(pairs: &[(&str, crate::graph::NamedContext)]) -> FrontendOptions {
    let mut o = opts();
    o.named_contexts = pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    o
}

#[test]
fn a_named_image_context_replaces_the_image_a_stage_or_a_copy_names() {
    use crate::graph::NamedContext::Image;
    let df = "FROM base AS build\nRUN make\nFROM alpine\nCOPY --from=tools /bin/x /x\nCOPY --from=build /out /out\n";
    let o = with_named(&[("alpine", Image("busybox".into())), ("tools", Image("app".into())), ("build", Image("busybox".into()))]);
    let g = build_with(df, &o).unwrap();
    let images: Vec<&str> = g
        .stages
        .iter()
        .filter_map(|s| match &s.base {
            Base::Image(r) => Some(r.reference.as_str()),
            _ => None,
        })
        .collect();
    // `tools` became image `app`; `alpine` and the replaced stage `build` became busybox.
    assert!(images.contains(&"app") && images.contains(&"busybox") && !images.contains(&"alpine"), "{images:?}");
    assert!(!g.stages.iter().any(|s| s.name.as_deref() == Some("build") && !s.steps.is_empty()), "the replaced stage runs nothing");
}

#[test]
fn a_named_directory_context_is_a_stage_of_its_files() {
    use crate::graph::NamedContext::Local;
    let df = "FROM busybox AS first\nCOPY --from=assets /a /a\nRUN --mount=from=assets,target=/m true\nFROM vendor\nCOPY --from=first /a /a\nRUN ls\n";
    let g = build_with(df, &with_named(&[("assets", Local), ("vendor", Local)])).unwrap();
    let loads: Vec<&Stage> = g
        .stages
        .iter()
        .filter(|s| matches!(s.steps.first().map(|st| &st.op), Some(Op::Copy(CopyOp { from: Source::Named(_), .. }))))
        .collect();
    assert_eq!(loads.len(), 2, "one stage per named directory, shared by COPY and the mount: {:#?}", g.stages);
    assert!(loads.iter().all(|s| matches!(s.base, Base::Scratch)));
    // FROM vendor: its files, then the stage's own RUN on top.
    let t = target(&g);
    assert!(matches!(t.steps.first().map(|st| &st.op), Some(Op::Copy(CopyOp { from: Source::Named(n), .. })) if n == "vendor"));
    assert_eq!(runs(t).len(), 1);
    // COPY --from=assets and the mount read the implicit stage.
    let first = g.stages.iter().find(|s| s.name.as_deref() == Some("first")).unwrap();
    assert!(copies(first).iter().all(|c| matches!(c.from, Source::Stage(_))));
    assert!(runs(first)[0].mounts.iter().all(|m| matches!(m.kind, MountKind::Bind { from: Source::Stage(_), .. })));
}
