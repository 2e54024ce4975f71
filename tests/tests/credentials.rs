//! Registry credentials reach the builder when it needs them: a base image named through a
//! build argument (`FROM ${BASE}`), an image of `COPY --from`, and an output named only by
//! `-o name=` live on a second registry with Basic auth (htpasswd). The client cannot guess
//! these from the Dockerfile's text; the builder asks it over the build stream, and the
//! client answers from the Docker config it is given (`DOCKER_CONFIG`), for that registry
//! only.
//!
//! Needs: the lab (tests/lab/setup.sh), docker-registry, htpasswd (apache2-utils), skopeo.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pw";

/// A `docker-registry` on a free loopback port that wants Basic auth; killed on drop.
struct AuthRegistry {
    child: Child,
    host: String,
    _dir: tempfile::TempDir,
}

impl AuthRegistry {
    fn start() -> AuthRegistry {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]).output().expect("htpasswd (apache2-utils)");
        assert!(out.status.success(), "htpasswd failed");
        std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let host = format!("127.0.0.1:{port}");
            let cfg = dir.path().join("config.yml");
            std::fs::write(
                &cfg,
                format!(
                    "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {data}}}\nhttp: {{addr: {host}}}\nauth:\n  htpasswd:\n    realm: hoist-test\n    path: {pw}\n",
                    data = dir.path().join("data").display(),
                    pw = dir.path().join("htpasswd").display()
                ),
            )
            .unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .stdin(Stdio::null())
                .spawn()
                .expect("docker-registry");
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken: try another
                }
                let code = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{host}/v2/")])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&code.stdout) == "401" {
                    return AuthRegistry { child, host, _dir: dir };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start a registry with htpasswd auth");
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Docker config holding the registry's credential (`docker login` writes this form).
fn docker_config(host: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let auth = {
        use std::io::Write;
        let mut child = Command::new("base64").arg("-w0").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(format!("{USER}:{PASSWORD}").as_bytes()).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    std::fs::write(dir.path().join("config.json"), format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#)).unwrap();
    dir
}

#[test]
fn the_builder_asks_the_client_for_the_credentials_of_each_registry_it_uses() {
    if !lab_available() {
        return;
    }
    let reg = AuthRegistry::start();
    let base = format!("{}/base/busybox:1", reg.host);
    let copied = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false", "--dest-creds", &format!("{USER}:{PASSWORD}")])
        .arg(format!("docker://{}", busybox()))
        .arg(format!("docker://{base}"))
        .output()
        .expect("skopeo");
    assert!(copied.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&copied.stderr));

    let dockerfile = format!("ARG BASE\nFROM ${{BASE}}\nCOPY --from={base} /bin/busybox /copied-busybox\nRUN echo built > /marker\n");
    let ctx = context(&[("Dockerfile", &dockerfile)]);
    let ctx_path = ctx.path().to_str().unwrap();
    let out_name = format!("{}/out/app:{}", reg.host, unique("cred"));
    let h = Hoist::new();
    let build = |config: &std::path::Path| {
        let mut c = h.cmd();
        c.env("DOCKER_CONFIG", config).args(["build", "--progress=plain"]);
        c.args(["--build-arg", &format!("BASE={base}")]);
        c.args(["-o", &format!("type=registry,name={out_name}"), ctx_path]);
        c.output().unwrap()
    };

    // Without the credential the builder asks, the client has none, and the error names
    // the registry and says to log in.
    let empty = tempfile::tempdir().unwrap();
    let out = build(empty.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a build without credentials must fail:\n{stderr}");
    assert!(stderr.contains(&reg.host) && stderr.contains("docker login"), "the error names the registry:\n{stderr}");

    // With it: base image, COPY --from image and the push all authenticate.
    let config = docker_config(&reg.host);
    let out = build(config.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build with credentials in DOCKER_CONFIG failed:\n{stderr}");
    let pushed = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--creds", &format!("{USER}:{PASSWORD}")])
        .arg(format!("docker://{out_name}"))
        .output()
        .unwrap();
    assert!(pushed.status.success(), "the output was not pushed: {}", String::from_utf8_lossy(&pushed.stderr));
    let manifest: serde_json::Value = serde_json::from_slice(&pushed.stdout).unwrap();
    assert_eq!(manifest["Layers"].as_array().map(Vec::len), Some(3), "base layer, COPY, RUN: {manifest}");
}
