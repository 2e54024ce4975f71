//! End-to-end: the real Docker CLI (/usr/bin/docker, 20.10) in a temporary HOME runs
//! `docker build`, `docker image build`, `docker buildx build` and `docker hoist build` on
//! hoist after `hoist configure-docker`, hands buildx's other commands to the user's own
//! buildx, and `hoist configure-docker --uninstall` puts the user's setup back.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// The user's own buildx plugin (a stand-in that says it ran).
const USER_BUILDX: &str = "#!/bin/sh
if [ \"$1\" = docker-cli-plugin-metadata ]; then
  echo '{\"SchemaVersion\":\"0.1.0\",\"Vendor\":\"Docker Inc.\",\"Version\":\"v0.10.0\",\"ShortDescription\":\"the user buildx\"}'
  exit 0
fi
echo \"user buildx: $*\"
";

/// A user's home with a Docker config directory.
struct DockerHome {
    home: tempfile::TempDir,
}

impl DockerHome {
    fn new() -> DockerHome {
        let home = tempfile::Builder::new().prefix("docker-home-").tempdir_in(test_tmp()).unwrap();
        std::fs::create_dir_all(home.path().join(".docker/cli-plugins")).unwrap();
        DockerHome { home }
    }

    fn config_dir(&self) -> PathBuf {
        self.home.path().join(".docker")
    }

    fn plugin(&self, name: &str) -> PathBuf {
        self.config_dir().join("cli-plugins").join(name)
    }

    fn config(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.config_dir().join("config.json")).unwrap()).unwrap()
    }

    /// /usr/bin/docker as this user, with the hoist installation `h` (its state root, so
    /// that its builder and build records are the test's own).
    fn docker_cmd(&self, h: &Hoist, args: &[&str]) -> Command {
        let mut c = Command::new("/usr/bin/docker");
        c.args(args)
            .env("HOME", self.home.path())
            .env("HOIST_ROOT", h.root.path())
            .env("HOIST_CACHE_DIR", h.cache.path())
            .env("BUILDKIT_PROGRESS", "plain")
            .env_remove("DOCKER_CONFIG")
            .env_remove("DOCKER_BUILDKIT")
            .env_remove("HOIST_BUILDER");
        c
    }

    fn docker(&self, h: &Hoist, args: &[&str]) -> Output {
        self.docker_cmd(h, args).output().expect("running /usr/bin/docker")
    }

    fn hoist(&self, h: &Hoist, args: &[&str]) -> Output {
        h.cmd().args(args).env("HOME", self.home.path()).env_remove("DOCKER_CONFIG").output().expect("running hoist")
    }

    fn hoist_ok(&self, h: &Hoist, args: &[&str]) -> String {
        let out = self.hoist(h, args);
        assert!(out.status.success(), "hoist {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn ok(out: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed:\n{stderr}\n{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_link_to_hoist(path: &Path) -> bool {
    let meta = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    meta.file_type().is_symlink() && std::fs::canonicalize(path).unwrap() == std::fs::canonicalize(hoist_bin()).unwrap()
}

#[test]
fn docker_build_buildx_build_and_docker_hoist_build_run_on_hoist_and_uninstall_restores() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let user = DockerHome::new();
    // What the user had: their own buildx, and a config with settings of their own.
    std::fs::write(user.plugin("docker-buildx"), USER_BUILDX).unwrap();
    std::fs::set_permissions(user.plugin("docker-buildx"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let before = serde_json::json!({"auths": {}, "psFormat": "table {{.ID}}\t{{.Names}}", "x-team": {"keep": [1, 2]}});
    std::fs::write(user.config_dir().join("config.json"), serde_json::to_vec_pretty(&before).unwrap()).unwrap();
    assert!(ok(user.docker(&h, &["buildx", "ls"]), "docker buildx ls").contains("user buildx: buildx ls"), "the user's buildx runs before");

    // Twice: a second run changes nothing and keeps the record of the first.
    user.hoist_ok(&h, &["configure-docker"]);
    let said = user.hoist_ok(&h, &["configure-docker"]);
    assert!(said.contains("user buildx") || said.contains(".hoist/docker-buildx"), "it says which buildx runs the rest:\n{said}");
    assert!(is_link_to_hoist(&user.plugin("docker-hoist")), "docker-hoist is a link to hoist");
    assert!(is_link_to_hoist(&user.plugin("docker-buildx")), "docker-buildx is a link to hoist");
    let config = user.config();
    assert_eq!(config["aliases"]["builder"], "buildx", "{config}");
    for key in ["auths", "psFormat", "x-team"] {
        assert_eq!(config[key], before[key], "{key} is kept");
    }

    // buildx's commands that hoist does not run go to the user's buildx.
    assert!(ok(user.docker(&h, &["buildx", "ls"]), "docker buildx ls").contains("user buildx: buildx ls"));
    assert!(ok(user.docker(&h, &["buildx", "inspect", "x"]), "docker buildx inspect").contains("user buildx: buildx inspect x"));

    // Every way in builds on hoist: each leaves a build record naming the image that is in
    // the engine. 20.10 sends `docker build` to the alias whatever DOCKER_BUILDKIT says.
    let mut built = Vec::new();
    let ways: [(&str, Vec<&str>, Option<&str>); 4] = [
        ("docker-build", vec!["build"], None),
        ("docker-image-build", vec!["image", "build"], Some("0")),
        ("docker-buildx-build", vec!["buildx", "build", "--builder", "default", "--load"], None),
        ("docker-hoist-build", vec!["hoist", "build", "--load"], None),
    ];
    for (name, cmd, buildkit) in ways {
        let tag = format!("hoist-docker-cli/{}:latest", unique(name));
        let ctx = context(&[("Dockerfile", &format!("FROM {}\nRUN echo {tag} > /which\n", busybox()))]);
        let mut args = cmd.clone();
        args.extend(["-t", &tag, ctx.path().to_str().unwrap()]);
        let mut docker = user.docker_cmd(&h, &args);
        if let Some(v) = buildkit {
            docker.env("DOCKER_BUILDKIT", v);
        }
        ok(docker.output().unwrap(), &format!("docker {args:?}"));
        let id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", &tag]).trim().to_string();
        let which = docker_ok(&["run", "--rm", &tag, "cat", "/which"]);
        assert_eq!(which.trim(), tag, "{name}: the engine has the image built");
        built.push((name, tag, id));
    }
    let records = user.hoist_ok(&h, &["builds", "ls"]);
    for (name, _, id) in &built {
        assert!(records.lines().any(|l| l.contains(id.as_str())), "{name}: no hoist build record of {id}:\n{records}");
    }

    // Twice: a second run has nothing left to undo.
    user.hoist_ok(&h, &["configure-docker", "--uninstall"]);
    let said = user.hoist_ok(&h, &["configure-docker", "--uninstall"]);
    assert!(said.contains("nothing to undo"), "{said}");
    let buildx = std::fs::symlink_metadata(user.plugin("docker-buildx")).expect("the user's buildx is back");
    assert!(buildx.file_type().is_file(), "the user's own file, not a link");
    assert_eq!(std::fs::read_to_string(user.plugin("docker-buildx")).unwrap(), USER_BUILDX);
    assert!(std::fs::symlink_metadata(user.plugin("docker-hoist")).is_err(), "docker-hoist is gone");
    assert!(!user.config_dir().join("cli-plugins/.hoist").exists(), "hoist's record is gone");
    assert_eq!(user.config(), before, "the config is as it was");
    assert!(ok(user.docker(&h, &["buildx", "ls"]), "docker buildx ls").contains("user buildx: buildx ls"));

    for (_, tag, _) in built {
        let _ = docker().args(["rmi", "-f", &tag]).output();
    }
}

#[test]
fn without_a_previous_buildx_its_other_commands_fail_clearly_and_uninstall_leaves_no_config() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let user = DockerHome::new();
    user.hoist_ok(&h, &["configure-docker"]);
    assert_eq!(user.config(), serde_json::json!({"aliases": {"builder": "buildx"}}));
    let metadata = Command::new(user.plugin("docker-buildx")).arg("docker-cli-plugin-metadata").output().unwrap();
    let metadata: serde_json::Value =
        serde_json::from_slice(&ok(metadata, "docker-buildx docker-cli-plugin-metadata").into_bytes()).unwrap();
    assert_eq!(metadata["SchemaVersion"], "0.1.0");
    assert_eq!(metadata["Vendor"], "hoist");

    let out = user.docker(&h, &["buildx", "ls"]);
    let system = ["/usr/local/lib", "/usr/local/libexec", "/usr/lib", "/usr/libexec"]
        .iter()
        .any(|d| Path::new(d).join("docker/cli-plugins/docker-buildx").is_file());
    let stderr = String::from_utf8_lossy(&out.stderr);
    if system {
        assert!(out.status.success(), "the system's buildx runs `docker buildx ls`:\n{stderr}");
    } else {
        assert!(!out.status.success(), "no buildx to run `docker buildx ls`");
        assert!(stderr.contains("`docker buildx ls`") && stderr.contains("hoist configure-docker --uninstall"), "{stderr}");
    }

    user.hoist_ok(&h, &["configure-docker", "--uninstall"]);
    assert!(!user.config_dir().join("config.json").exists(), "there was no config before");
    let left: Vec<_> = std::fs::read_dir(user.config_dir().join("cli-plugins")).unwrap().collect();
    assert!(left.is_empty(), "nothing of hoist's is left: {left:?}");
}

/// Docker Desktop lists its own plugin directory in `cliPluginsExtraDirs`, which the Docker CLI
/// searches before ~/.docker/cli-plugins: its buildx would run instead of hoist's shim.
#[test]
fn a_buildx_in_cli_plugins_extra_dirs_does_not_shadow_hoist_and_still_runs_the_rest() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let user = DockerHome::new();
    let desktop = user.home.path().join("Docker.app/cli-plugins");
    std::fs::create_dir_all(&desktop).unwrap();
    std::fs::write(desktop.join("docker-buildx"), USER_BUILDX.replace("user buildx", "desktop buildx")).unwrap();
    std::fs::set_permissions(desktop.join("docker-buildx"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let before = serde_json::json!({"cliPluginsExtraDirs": [desktop], "credsStore": "desktop-x"});
    std::fs::write(user.config_dir().join("config.json"), serde_json::to_vec(&before).unwrap()).unwrap();
    assert!(ok(user.docker(&h, &["buildx", "ls"]), "docker buildx ls").contains("desktop buildx: buildx ls"));

    user.hoist_ok(&h, &["configure-docker"]);
    let help = ok(user.docker(&h, &["buildx", "build", "--help"]), "docker buildx build --help");
    assert!(help.contains("hoist build"), "hoist's shim runs `docker buildx build`, not Docker Desktop's buildx:\n{help}");
    assert!(ok(user.docker(&h, &["buildx", "ls"]), "docker buildx ls").contains("desktop buildx: buildx ls"), "and Desktop's the rest");

    user.hoist_ok(&h, &["configure-docker", "--uninstall"]);
    assert_eq!(user.config(), before, "the config is as it was");
    assert!(ok(user.docker(&h, &["buildx", "ls"]), "docker buildx ls").contains("desktop buildx: buildx ls"));
}
