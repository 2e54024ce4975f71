//! End-to-end: `hoist bake` builds an HCL file's group (inherits, a named context, variables
//! from the environment) into the Docker engine and a compose file's services into the lab
//! registry, on the embedded builder; a failing target fails the run while the others finish.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

fn bake(h: &Hoist, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = h.cmd();
    c.arg("bake").arg("--progress=plain").args(args).current_dir(dir);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running hoist bake")
}

fn bake_ok(h: &Hoist, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = bake(h, dir, args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "hoist bake {args:?} failed:\n{stderr}");
    stderr
}

fn run_in(image: &str, cmd: &str) -> String {
    docker_ok(&["run", "--rm", image, "sh", "-c", cmd]).trim().to_string()
}

/// The numbers N of the "transferred N files" lines, in order.
fn transferred(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.split_once(" transferred ").and_then(|(_, r)| r.split_whitespace().next()).and_then(|n| n.parse().ok()))
        .collect()
}

/// The issue's test: an HCL file with a group of three targets (one inheriting, one with a
/// named context), built with --load; args (one from a variable the environment overrides)
/// and tags are checked by running the images. The three targets share the context
/// directory: it is uploaded once, and the builds find every file on the builder.
#[test]
fn hcl_group_of_three_targets_with_inherits_and_a_named_context() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let name = unique("bake-hcl");
    let hcl = format!(
        r#"
variable "TAG" {{
  default = "v1"
}}
variable "REPO" {{
  default = "hoist-test/{name}"
}}
group "default" {{
  targets = ["all"]
}}
group "all" {{
  targets = ["base", "child", "assets"]
}}
target "base" {{
  args = {{ GREETING = "hello", FLAVOR = "plain-${{TAG}}" }}
  tags = ["${{REPO}}-base:${{TAG}}"]
}}
target "child" {{
  inherits = ["base"]
  args = {{ FLAVOR = upper("mint") }}
  tags = ["${{REPO}}-child:${{TAG}}", "${{REPO}}-child:latest"]
}}
target "assets" {{
  dockerfile = "Dockerfile.assets"
  contexts = {{ assets = "./assets-dir" }}
  tags = ["${{REPO}}-assets:${{TAG}}"]
}}
"#
    );
    let ctx = context(&[
        (
            "Dockerfile",
            &format!(
                "FROM {}\nARG GREETING=unset\nARG FLAVOR=none\nCOPY msg.txt /msg.txt\nRUN echo \"$GREETING $FLAVOR\" > /out.txt\n",
                busybox()
            ),
        ),
        ("Dockerfile.assets", &format!("FROM {}\nCOPY --from=assets data.txt /data.txt\n", busybox())),
        ("msg.txt", "from the shared context\n"),
        ("assets-dir/data.txt", &format!("named context of {name}\n")),
        ("docker-bake.hcl", &hcl),
    ]);

    // --print needs no builder and shows what will be built.
    let out = bake(&h, ctx.path(), &["--print"], &[("TAG", "v2")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--print prints JSON");
    assert_eq!(printed["group"]["all"]["targets"], serde_json::json!(["base", "child", "assets"]));
    assert_eq!(printed["target"]["child"]["args"], serde_json::json!({"GREETING": "hello", "FLAVOR": "MINT"}));
    assert_eq!(printed["target"]["base"]["tags"], serde_json::json!([format!("hoist-test/{name}-base:v2")]));

    let stderr = bake_ok(&h, ctx.path(), &["--load"], &[("TAG", "v2")]);
    let repo = format!("hoist-test/{name}");
    assert_eq!(run_in(&format!("{repo}-base:v2"), "cat /out.txt /msg.txt"), "hello plain-v2\nfrom the shared context");
    assert_eq!(run_in(&format!("{repo}-child:v2"), "cat /out.txt"), "hello MINT", "inherited GREETING, its own FLAVOR");
    assert_eq!(run_in(&format!("{repo}-child:latest"), "cat /out.txt"), "hello MINT");
    assert_eq!(run_in(&format!("{repo}-assets:v2"), "cat /data.txt"), format!("named context of {name}"));
    for t in ["base", "child", "assets"] {
        assert!(stderr.contains(&format!("hoist bake: [{t}] done in")), "a result line per target:\n{stderr}");
    }
    assert!(stderr.contains("hoist bake: 3 of 3 targets built"), "{stderr}");

    // The shared context went up once, before the builds: one target's sync sent msg.txt
    // (assets reads nothing of it), the others' nothing, and no build sent a file.
    let shared: Vec<&str> = stderr.lines().filter(|l| l.contains("load build context (shared)")).collect();
    assert_eq!(shared.len(), 3, "{stderr}");
    let first_build = stderr.find("[internal] load build context").expect("the builds sync their context");
    let mut synced = transferred(&stderr[..first_build]);
    synced.sort();
    assert_eq!(synced, [0, 0, 1], "the shared context is uploaded once:\n{stderr}");
    let sent: Vec<&str> = stderr.lines().filter(|l| l.starts_with("hoist: built ")).collect();
    assert_eq!(sent.len(), 3, "{stderr}");
    assert!(sent.iter().all(|l| l.contains(" 0 files sent")), "no build uploaded a file again:\n{}", sent.join("\n"));

    for t in ["base:v2", "child:v2", "child:latest", "assets:v2"] {
        let _ = docker().args(["rmi", &format!("{repo}-{t}")]).output();
    }
}

/// The issue's test: a compose file of two services (args as a list and a map, an image:
/// name with a variable from the .env file, build.tags), pushed to the lab registry with
/// --push and checked by pulling and running them. `--set` overrides an arg of one.
#[test]
fn compose_file_of_two_services_pushed_to_the_registry() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let name = unique("bake-compose");
    let reg = registry();
    let compose = format!(
        r#"services:
  api:
    image: {reg}/{name}/api:${{API_VERSION}}
    build:
      context: ./api
      args:
        - VERSION=2
        - ROLE=api
  web:
    image: {reg}/{name}/web:1
    build:
      context: web
      dockerfile: web.Dockerfile
      args:
        ROLE: web
      tags: ["{reg}/{name}/web:extra"]
  db:
    image: {reg}/library/busybox:latest
"#
    );
    let df = format!("FROM {}\nARG VERSION=0\nARG ROLE\nRUN echo \"$ROLE $VERSION\" > /role\n", busybox());
    let ctx = context(&[
        ("compose.yaml", &compose),
        (".env", "API_VERSION=7\n"),
        ("api/Dockerfile", &df),
        ("web/web.Dockerfile", &df),
        ("web/index.html", "hi\n"),
    ]);
    let stderr = bake_ok(&h, ctx.path(), &["--push", "--set", "web.args.VERSION=9"], &[]);
    assert!(stderr.contains("hoist bake: [api] done in") && stderr.contains("hoist bake: [web] done in"), "{stderr}");
    assert!(!stderr.contains("[db]"), "a service without build: is not built:\n{stderr}");
    for (image, want) in
        [(format!("{reg}/{name}/api:7"), "api 2"), (format!("{reg}/{name}/web:1"), "web 9"), (format!("{reg}/{name}/web:extra"), "web 9")]
    {
        docker_ok(&["pull", &image]);
        assert_eq!(run_in(&image, "cat /role"), want, "{image}");
        let _ = docker().args(["rmi", &image]).output();
    }
}

/// A target that fails fails the run (exit code 1, its error on its line) while the other
/// targets finish; an unknown target is refused before anything builds.
#[test]
fn a_failing_target_fails_the_run_and_the_others_finish() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[
        ("good/Dockerfile", &format!("FROM {}\nRUN echo ok > /ok\n", busybox())),
        ("bad/Dockerfile", &format!("FROM {}\nRUN echo failing-on-purpose && false\n", busybox())),
        (
            "docker-bake.json",
            r#"{"group": {"default": {"targets": ["good", "bad"]}},
                "target": {"good": {"context": "good"}, "bad": {"context": "bad"}}}"#,
        ),
    ]);
    let out = bake(&h, ctx.path(), &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("hoist bake: [good] done in"), "{stderr}");
    assert!(stderr.contains("hoist bake: [bad] failed:"), "{stderr}");
    assert!(stderr.contains("hoist bake: 1 of 2 targets built"), "{stderr}");

    let out = bake(&h, ctx.path(), &["nope"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("unknown target \"nope\" (defined: bad, default, good)"), "{stderr}");
}

/// What Compose v2 runs for `docker compose build` (Compose cannot be installed here, so its
/// invocation is replayed): `bake --file - --progress rawjson --metadata-file F --allow
/// fs.read=DIR` with its JSON on stdin (absolute context, `call`, `shm-size` in bytes,
/// `output: ["type=docker"]`). The image lands in the engine and the metadata file has the
/// digest and name under the target, which Compose reads.
#[test]
fn compose_v2_bake_invocation_on_stdin() {
    use std::io::Write;
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let image = format!("hoist-test/{}:1", unique("bake-stdin"));
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nARG MSG\nRUN echo \"$MSG\" > /msg\n", busybox()))]);
    let dir = ctx.path().display().to_string();
    let json = serde_json::json!({
        "group": {"default": {"targets": ["svc"]}},
        "target": {"svc": {
            "context": dir, "dockerfile": "Dockerfile", "args": {"MSG": "from compose"},
            "tags": [image], "output": ["type=docker"], "call": "build", "shm-size": 67108864
        }}
    });
    let meta = ctx.path().join("meta.json");
    let mut child = h
        .cmd()
        .args(["bake", "--file", "-", "--progress", "rawjson", "--metadata-file", meta.to_str().unwrap(), "--allow"])
        .arg(format!("fs.read={dir}"))
        .current_dir(ctx.path())
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(json.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(run_in(&image, "cat /msg"), "from compose");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let digest = m["svc"]["containerimage.digest"].as_str().unwrap_or_default();
    assert!(digest.starts_with("sha256:"), "{m}");
    assert_eq!(m["svc"]["image.name"], serde_json::json!(image), "{m}");
    let _ = docker().args(["rmi", &image]).output();
}

/// A TCP relay on loopback to `to` that counts the connections it accepts.
fn counting_relay(to: String) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let server = std::net::TcpStream::connect(&to).unwrap();
            for (mut from, mut into) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (port, count)
}

/// The targets of one project share one connection to the builder (one session), however
/// many there are: three targets, one TCP connection through a relay that counts them.
#[test]
fn the_targets_of_a_project_share_one_connection_to_the_builder() {
    if !lab_available() {
        return;
    }
    let server = Server::start();
    let token = server.admin(&["project", "create", "bake-session"]);
    let addr = server.addr();
    let (port, connections) = counting_relay(addr.trim_start_matches("tcp://").to_string());
    let mut mate = Teammate::new(&server, &token);
    mate.builder = format!("tcp://127.0.0.1:{port}");
    let marker = unique("session");
    let ctx = context(&[
        ("Dockerfile", &format!("FROM {}\nARG N\nRUN echo {marker}-$N > /n\n", busybox())),
        (
            "docker-bake.hcl",
            r#"
group "default" {
  targets = ["a", "b", "c"]
}
target "a" {
  args = { N = "1" }
}
target "b" {
  args = { N = "2" }
}
target "c" {
  args = { N = "3" }
}
"#,
        ),
    ]);
    let out = mate.cmd().arg("bake").arg("--progress=plain").current_dir(ctx.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("3 of 3 targets built"), "{stderr}");
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1, "one connection for the three targets:\n{stderr}");
}

/// `contexts = { base = "target:base" }`: the target named is built first (here only for
/// that: it was not asked for) and the other builds on its result, as with buildx.
#[test]
fn a_target_context_builds_on_another_targets_result() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[
        ("base.Dockerfile", &format!("FROM {}\nRUN echo made-by-base > /base.txt\n", busybox())),
        ("app.Dockerfile", "FROM base\nRUN cat /base.txt > /seen.txt\n"),
    ]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let hcl = format!(
        "target \"base\" {{\n  dockerfile = \"base.Dockerfile\"\n}}\n\
         target \"app\" {{\n  dockerfile = \"app.Dockerfile\"\n  contexts = {{ base = \"target:base\" }}\n  output = [\"type=local,dest={}\"]\n}}\n",
        out.path().display()
    );
    std::fs::write(ctx.path().join("docker-bake.hcl"), hcl).unwrap();
    let stderr = bake_ok(&h, ctx.path(), &["app"], &[]);
    assert_eq!(std::fs::read_to_string(out.path().join("seen.txt")).unwrap(), "made-by-base\n", "{stderr}");
    assert!(stderr.contains("[base] done") && stderr.contains("[app] done"), "{stderr}");
    assert!(stderr.find("[base] done") < stderr.find("[app] done"), "base first:\n{stderr}");

    // A target whose base fails is not built, and says why.
    std::fs::write(ctx.path().join("base.Dockerfile"), format!("FROM {}\nRUN exit 7\n", busybox())).unwrap();
    let failed = bake(&h, ctx.path(), &["app"], &[]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{stderr}");
    assert!(stderr.contains("[app] failed: not built: it builds on target \"base\", which failed"), "{stderr}");
}
