//! The builder in a container (issue 19): a user who is not root but is in the `docker`
//! group builds with `hoist build` and nothing set up; the client starts the builder as a
//! container of the engine, from an image it makes from its own binary, with its state in a
//! volume. The state survives a stop and a client of another version; `hoist builder rm
//! --volume` leaves nothing of it behind.
//!
//! Needs: the lab (tests/lab/setup.sh) and root (to create the user).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// A user of the docker group who is not root, created once.
const USER: &str = "hoist-docker-user";

fn ensure_user() {
    if Command::new("id").arg(USER).output().map(|o| o.status.success()).unwrap_or(false) {
        return;
    }
    let out = Command::new("useradd").args(["--create-home", "--groups", "docker", USER]).output().expect("running useradd");
    // Another test process may have made it at the same moment.
    assert!(
        out.status.success() || Command::new("id").arg(USER).output().unwrap().status.success(),
        "useradd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything one run of the test owns: a copy of hoist the user can run, their home, the
/// builder's container name.
struct Env {
    dir: tempfile::TempDir,
    name: String,
}

impl Env {
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// `hoist ARGS` as the user, with the binary at `bin`.
    fn run_with(&self, bin: &Path, args: &[&str]) -> Output {
        Command::new("runuser")
            .args(["-u", USER, "--", "env", "-i"])
            .arg(format!("HOME={}", self.home().display()))
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg(format!("HOIST_BUILDER_NAME={}", self.name))
            .arg(format!("{NO_DEFAULT_ATTESTATIONS}=1"))
            .arg(bin)
            .args(args)
            .output()
            .expect("running hoist as the user")
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with(&self.dir.path().join("hoist"), args)
    }

    fn ok_with(&self, bin: &Path, args: &[&str]) -> String {
        let out = self.run_with(bin, args);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "hoist {args:?} as {USER} failed:\n{text}");
        text
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(&self.dir.path().join("hoist"), args)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = docker().args(["rm", "-f", &self.name]).output();
        let _ = docker().args(["volume", "rm", "-f", &format!("{}-state", self.name)]).output();
    }
}

fn container_state(name: &str) -> Option<String> {
    let out =
        docker().args(["inspect", "--format", "{{.State.Status}} {{index .Config.Labels \"dev.hoist.builder\"}}", name]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn names(args: &[&str]) -> Vec<String> {
    docker_ok(args).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}

#[test]
fn a_docker_group_user_builds_in_a_builder_container_that_keeps_its_cache() {
    if !lab_available() {
        return;
    }
    ensure_user();
    let dir = tempfile::Builder::new().prefix("docker-container-").tempdir_in(test_tmp()).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = Env { name: unique("hoist-builder-test"), dir };
    std::fs::create_dir_all(env.home()).unwrap();
    assert!(Command::new("chown").args(["-R", USER, env.home().to_str().unwrap()]).status().unwrap().success());
    let bin = env.dir.path().join("hoist");
    std::fs::copy(hoist_bin(), &bin).unwrap();
    let ctx = env.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {}\nRUN echo built-in-a-container > /built\nCOPY f /f\n", busybox())).unwrap();
    std::fs::write(ctx.join("f"), "from the context\n").unwrap();
    assert!(Command::new("chmod").args(["-R", "a+rX", env.dir.path().to_str().unwrap()]).status().unwrap().success());
    let (image, image2) = (unique("hoist-dc-app"), unique("hoist-dc-app"));
    let volume = format!("{}-state", env.name);
    let networks_before = names(&["network", "ls", "-q"]);
    let who =
        String::from_utf8_lossy(&Command::new("runuser").args(["-u", USER, "--", "id", "-u"]).output().unwrap().stdout).trim().to_string();
    assert_ne!(who, "0", "the user is not root");

    // First build: the builder container starts, the image lands in the engine.
    let first = env.ok(&["build", "--progress=plain", "-t", &image, "--load", ctx.to_str().unwrap()]);
    assert!(first.contains("starting the builder in a container"), "{first}");
    assert!(first.contains("loading the builder image"), "the image came from this binary: {first}");
    assert_eq!(count_before(&first, "steps run"), 2, "the RUN and the COPY ran: {first}");
    let state = container_state(&env.name).expect("the builder container exists");
    assert!(state.starts_with("running hoist-builder:"), "{state}");
    let ran = docker_ok(&["run", "--rm", &image, "cat", "/built", "/f"]);
    assert_eq!(ran, "built-in-a-container\nfrom the context\n");
    assert!(names(&["volume", "ls", "-q"]).contains(&volume), "the state is in the volume");
    let status = env.ok(&["builder", "status"]);
    assert!(status.contains("running") && status.contains(&volume) && status.contains("address:   127.0.0.1:"), "{status}");

    // Its port is on loopback only and answers only to the owner token the client gave it.
    let addr = status.lines().find_map(|l| l.strip_prefix("address:   ")).unwrap().trim().to_string();
    let listening = String::from_utf8_lossy(&Command::new("ss").args(["-ltnH"]).output().unwrap().stdout).to_string();
    let port = addr.rsplit(':').next().unwrap();
    let binds: Vec<&str> =
        listening.lines().filter_map(|l| l.split_whitespace().nth(3)).filter(|a| a.ends_with(&format!(":{port}"))).collect();
    assert_eq!(binds, vec![addr.as_str()], "{listening}");
    for token in [None, Some("hst_guess"), Some("hst_owner_0000")] {
        let mut c = Command::new(hoist_bin());
        c.args(["builds", "ls", "--builder", &format!("tcp://{addr}")]).env_remove("HOIST_TOKEN").env("HOIST_CONFIG_DIR", env.dir.path());
        if let Some(t) = token {
            c.env("HOIST_TOKEN", t);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("token"), "{token:?} must be refused: {err}");
    }

    // Second build: all cached, the container reused.
    let second = env.ok(&["build", "--progress=plain", "-t", &image2, "--load", ctx.to_str().unwrap()]);
    assert!(!second.contains("starting the builder"), "{second}");
    assert_eq!(count_before(&second, "steps run"), 0, "{second}");

    // The cache and build records are there as on any builder.
    let du = env.ok(&["cache", "du"]);
    assert!(du.contains("default"), "{du}");
    let builds = env.ok(&["builds", "ls"]);
    assert!(builds.lines().count() >= 2, "both builds are recorded: {builds}");

    // A sign-in link to the web UI names the builder's loopback address.
    let open = env.ok(&["builds", "open"]);
    let link = open.lines().find(|l| l.starts_with("http://")).unwrap_or_else(|| panic!("no link: {open}")).trim().to_string();
    assert!(link.starts_with(&format!("http://{addr}/ui/")), "{link}");
    let code = Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &link]).output().unwrap();
    let code = String::from_utf8_lossy(&code.stdout).to_string();
    assert!(code.starts_with('2') || code.starts_with('3'), "the link signs in: {code} for {link}");

    // A client killed mid-build loses nothing: the builder goes on serving the cache.
    let slow = env.dir.path().join("slow");
    std::fs::create_dir_all(&slow).unwrap();
    std::fs::write(slow.join("Dockerfile"), format!("FROM {}\nRUN sleep 20\n", busybox())).unwrap();
    assert!(Command::new("chmod").args(["-R", "a+rX", slow.to_str().unwrap()]).status().unwrap().success());
    let mut child = Command::new("runuser")
        .args(["-u", USER, "--", "env", "-i"])
        .arg(format!("HOME={}", env.home().display()))
        .arg(format!("HOIST_BUILDER_NAME={}", env.name))
        .arg(&bin)
        .args(["build", "--progress=plain", slow.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let _ = Command::new("pkill").args(["-KILL", "-f", &format!("{} build --progress=plain {}", bin.display(), slow.display())]).status();
    let _ = child.kill();
    let _ = child.wait();
    assert!(container_state(&env.name).unwrap().starts_with("running"), "the builder outlives its client");
    let after_kill = env.ok(&["build", "--progress=plain", "-t", &image2, "--load", ctx.to_str().unwrap()]);
    assert_eq!(count_before(&after_kill, "steps run"), 0, "{after_kill}");

    // Stopped, it starts again and the cache is still there.
    let stopped = env.ok(&["builder", "stop"]);
    assert!(stopped.contains("stopped"), "{stopped}");
    assert!(container_state(&env.name).unwrap().starts_with("exited"), "{:?}", container_state(&env.name));
    let third = env.ok(&["build", "--progress=plain", "-t", &image2, "--load", ctx.to_str().unwrap()]);
    assert!(third.contains("starting the builder container"), "{third}");
    assert_eq!(count_before(&third, "steps run"), 0, "the cache survived the stop: {third}");

    // Another version of hoist (another binary) replaces the container and keeps the cache.
    let other = env.dir.path().join("hoist-other");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes.extend_from_slice(b"\0another version");
    std::fs::write(&other, bytes).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old_tag = container_state(&env.name).unwrap().split_whitespace().nth(1).unwrap().to_string();
    let fourth = env.ok_with(&other, &["build", "--progress=plain", "-t", &image2, "--load", ctx.to_str().unwrap()]);
    assert!(fourth.contains("replacing the builder container"), "{fourth}");
    assert_eq!(count_before(&fourth, "steps run"), 0, "the volume's cache served the new version: {fourth}");
    let new_tag = container_state(&env.name).unwrap().split_whitespace().nth(1).unwrap().to_string();
    assert_ne!(old_tag, new_tag);
    assert!(
        !names(&["images", "--format", "{{.Repository}}:{{.Tag}}"]).contains(&old_tag),
        "the old version's image went with its container"
    );

    // rm --volume leaves nothing: container, volume, builder images, networks.
    let rm = env.ok_with(&other, &["builder", "rm", "--volume"]);
    assert!(rm.contains("removed"), "{rm}");
    assert_eq!(container_state(&env.name), None);
    assert!(!names(&["volume", "ls", "-q"]).contains(&volume));
    let images = names(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(!images.contains(&old_tag) && !images.contains(&new_tag), "{images:?}");
    assert_eq!(names(&["network", "ls", "-q"]), networks_before, "no network was made");
    // The user's own images stay.
    assert!(images.iter().any(|i| i.starts_with(&image2)), "{images:?}");
    let _ = docker().args(["rmi", "-f", &image, &image2]).output();

    // With no builder container, status says so.
    let out = env.run(&["builder", "status"]);
    assert!(out.status.success(), "status with no container: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no builder container"));
}
