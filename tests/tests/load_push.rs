//! End-to-end: moving images (issue 5). `--load` through the loopback registry moves only
//! the layers the engine lacks; `--push` goes to several real registries at once, skipping
//! blobs they have and mounting across repositories; `--save` + `hoist pull` between
//! teammates; multi-platform builds; several builders, each platform on a native one.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;

/// A `docker-registry` of its own on a free loopback port, with an access log.
struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::Builder::new().prefix("registry-").tempdir_in(test_tmp()).unwrap();
        let port = free_port();
        let config = format!(
            "version: 0.1\nlog: {{level: info, accesslog: {{disabled: false}}}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("access.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let r = Registry { dir, port, child: Some(child) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !curl_ok(&format!("http://127.0.0.1:{port}/v2/")) {
            assert!(std::time::Instant::now() < deadline, "docker-registry did not start: {}", r.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        r
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Completed blob uploads (the final PUT of an upload session) so far.
    fn uploads(&self) -> usize {
        self.log().lines().filter(|l| l.contains("\"PUT /v2/") && l.contains("/blobs/uploads/") && l.contains("\" 201 ")).count()
    }

    /// Cross-repository mounts the registry granted.
    fn mounts(&self) -> usize {
        self.log().lines().filter(|l| l.contains("\"POST /v2/") && l.contains("mount=") && l.contains("\" 201 ")).count()
    }

    /// A manifest or index by tag or digest, with the OCI media types accepted.
    fn manifest(&self, repo: &str, reference: &str) -> Vec<u8> {
        curl(&[
            "-H",
            "Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
            &format!("http://{}/v2/{repo}/manifests/{reference}", self.host()),
        ])
    }

    fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        curl(&[&format!("http://{}/v2/{repo}/blobs/{digest}", self.host())])
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn curl_ok(url: &str) -> bool {
    Command::new("curl").args(["-fsS", url]).output().map(|o| o.status.success()).unwrap_or(false)
}

fn curl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("curl").arg("-fsSL").args(args).output().expect("running curl");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The line of `--load`/`pull`'s report in a command's stderr.
fn load_line(stderr: &str) -> String {
    stderr
        .lines()
        .find(|l| l.contains(": loaded ") || l.contains(" is already in the engine as "))
        .unwrap_or_else(|| panic!("no load report in:\n{stderr}"))
        .to_string()
}

/// The line reporting the push to `reference`.
fn push_line(stderr: &str, reference: &str) -> String {
    stderr
        .lines()
        .find(|l| (l.contains("hoist: pushed ") || l.contains("push to ")) && l.contains(&format!(" {reference} ")))
        .unwrap_or_else(|| panic!("no push report for {reference} in:\n{stderr}"))
        .to_string()
}

fn remove_images(tags: &[&str]) {
    for t in tags {
        let _ = docker().args(["rmi", "-f", t]).output();
    }
}

/// A file of `n` bytes that does not compress away.
fn noise(n: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

fn in_dir(dir: &Path) -> &str {
    dir.to_str().unwrap()
}

/// After a build and --load, changing one source file and rebuilding with --load moves only
/// that layer: the engine reports the others "Already exists" and the proxy served only the
/// new layer's bytes; with nothing changed, no layer moves at all.
#[test]
fn incremental_load_moves_only_the_changed_layer() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let big = noise(2_000_000, 1);
    let ctx = context(&[
        ("Dockerfile", &format!("FROM {}\nCOPY big.txt /big.txt\nCOPY app.txt /app.txt\nCMD [\"cat\", \"/app.txt\"]\n", busybox())),
        ("big.txt", &big),
        ("app.txt", "v1\n"),
    ]);
    let tag = unique("hoist-lp-incr");
    let first = h.build_ok(&["-t", &tag, "--load", in_dir(ctx.path())]);
    let line = load_line(&first);
    assert!(line.contains("via the loopback registry"), "{line}");
    assert_eq!(docker_ok(&["run", "--rm", &tag]), "v1\n");

    std::fs::write(ctx.path().join("app.txt"), "v2\n").unwrap();
    let second = h.build_ok(&["-t", &tag, "--load", in_dir(ctx.path())]);
    let line = load_line(&second);
    assert!(line.contains("via the loopback registry"), "{line}");
    // The new layer moves once: at the end, or while the build ran (the engine imports
    // the layers up to the last step as soon as it is done).
    let moved = count_before(&line, "layer(s) moved");
    let early = if line.contains("imported while building") { count_before(&line, "layer(s) (") } else { 0 };
    assert_eq!(moved + early, 1, "{line}");
    assert_eq!(count_before(&line, "already present"), 3 - moved, "base and big layers stay: {line}");
    assert_eq!(count_before(&line, "pulled"), moved, "the engine pulled one layer: {line}");
    assert_eq!(count_before(&line, "already exist"), 3 - moved, "the engine had the others: {line}");
    // The new layer is a few kB; the 2 MB layer did not move.
    let bytes = count_before(&line, "bytes (");
    assert!(bytes > 0 && bytes < 100_000, "{bytes} bytes served: {line}");
    assert_eq!(docker_ok(&["run", "--rm", &tag]), "v2\n");

    // Nothing changed: the same image (issue 15: same id), already in the engine, so
    // nothing moves and nothing new is created.
    let id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", &tag]);
    let third = h.build_ok(&["-t", &tag, "--load", in_dir(ctx.path())]);
    let line = load_line(&third);
    assert!(line.contains("is already in the engine as") && line.contains("nothing moved"), "{line}");
    assert_eq!(docker_ok(&["image", "inspect", "--format", "{{.Id}}", &tag]), id);

    // The temporary reference is gone; only the tag names the image.
    let repos = docker_ok(&["images", "--format", "{{.Repository}}"]);
    assert!(!repos.lines().any(|r| r.contains("hoist-load/")), "temporary references left:\n{repos}");
    let digests = docker_ok(&["image", "inspect", "--format", "{{json .RepoDigests}}", &tag]);
    assert!(!digests.contains("hoist-load"), "{digests}");
    remove_images(&[&tag]);
}

/// Without a tag (or when told to), the image comes as a `docker load` archive that still
/// carries only the layers the engine lacks, and the report says why.
#[test]
fn archive_load_sends_only_missing_layers_and_says_why() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[
        ("Dockerfile", &format!("FROM {}\nCOPY big.txt /big.txt\nCOPY app.txt /app.txt\n", busybox())),
        ("big.txt", &noise(1_000_000, 2)),
        ("app.txt", "one\n"),
    ]);
    let tag = unique("hoist-lp-archive");
    h.build_ok(&["-t", &tag, "--load", in_dir(ctx.path())]);

    std::fs::write(ctx.path().join("app.txt"), "two\n").unwrap();
    let iid = tempfile::NamedTempFile::new_in(test_tmp()).unwrap();
    let out = h.build_ok(&["--iidfile", iid.path().to_str().unwrap(), "--load", in_dir(ctx.path())]);
    let line = load_line(&out);
    assert!(line.contains("as a docker load archive") && line.contains("because no -t was given"), "{line}");
    assert_eq!(count_before(&line, "layer(s) moved"), 1, "{line}");
    assert_eq!(count_before(&line, "already present"), 2, "{line}");
    let bytes = count_before(&line, "bytes");
    assert!(bytes < 100_000, "the 1 MB layer was sent: {line}");
    let id = std::fs::read_to_string(iid.path()).unwrap();
    assert_eq!(docker_ok(&["run", "--rm", id.trim(), "cat", "/app.txt"]), "two\n");

    // Forced, with a tag: the tag lands on the image.
    std::fs::write(ctx.path().join("app.txt"), "three\n").unwrap();
    let mut c = h.cmd();
    c.env("HOIST_LOAD_VIA", "archive").args(["build", "--progress=plain", "-t", &tag, "--load", in_dir(ctx.path())]);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = load_line(&err);
    assert!(line.contains("archive because HOIST_LOAD_VIA=archive"), "{line}");
    assert_eq!(count_before(&line, "layer(s) moved"), 1, "{line}");
    assert_eq!(docker_ok(&["run", "--rm", &tag, "cat", "/app.txt"]), "three\n");
    remove_images(&[&tag, id.trim()]);
}

/// One build pushes to two registries (and a second repository of the first) in parallel
/// while loading into the engine; both registries serve identical manifests; the second
/// repository mounts instead of uploading; a rebuild uploads only what changed; and a dead
/// registry fails only its own push, named in the error.
#[test]
fn push_to_two_registries_with_load_skips_what_they_have() {
    if !lab_available() {
        return;
    }
    let (r1, r2) = (Registry::start(), Registry::start());
    let h = Hoist::new();
    let ctx = context(&[
        ("Dockerfile", &format!("FROM {}\nCOPY big.txt /big.txt\nCOPY app.txt /app.txt\nCMD [\"cat\", \"/app.txt\"]\n", busybox())),
        ("big.txt", &noise(500_000, 3)),
        ("app.txt", "pushed v1\n"),
    ]);
    let (a1, b1, o1) = (format!("{}/team/app:1", r1.host()), format!("{}/team/app:1", r2.host()), format!("{}/team/other:1", r1.host()));
    let out = h.build_ok(&["-t", &a1, "-t", &b1, "-t", &o1, "--push", "--load", in_dir(ctx.path())]);
    // The load happened in the same build.
    assert!(load_line(&out).contains("via the loopback registry"), "{out}");
    assert_eq!(docker_ok(&["run", "--rm", &a1]), "pushed v1\n");
    // 3 layers + config = 4 blobs to each registry; the other repository mounts them.
    let l = push_line(&out, &a1);
    assert_eq!(count_before(&l, "blobs uploaded"), 4, "{l}");
    let l = push_line(&out, &b1);
    assert_eq!(count_before(&l, "blobs uploaded"), 4, "{l}");
    let l = push_line(&out, &o1);
    assert_eq!(count_before(&l, "blobs uploaded"), 0, "{l}");
    assert_eq!(count_before(&l, "mounted"), 4, "{l}");
    assert_eq!(r1.uploads(), 4, "registry 1 received each blob once:\n{}", r1.log());
    assert_eq!(r2.uploads(), 4);
    assert_eq!(r1.mounts(), 4);
    let (m1, m2) = (r1.manifest("team/app", "1"), r2.manifest("team/app", "1"));
    assert_eq!(m1, m2, "both registries serve the same manifest");
    assert_eq!(r1.manifest("team/other", "1"), m1);
    // docker pulls it back from the second registry.
    remove_images(&[&a1, &b1, &o1]);
    docker_ok(&["pull", "-q", &b1]);
    assert_eq!(docker_ok(&["run", "--rm", &b1]), "pushed v1\n");

    // One file changed: only its layer and the config are uploaded, to each registry.
    std::fs::write(ctx.path().join("app.txt"), "pushed v2\n").unwrap();
    let (a2, b2) = (format!("{}/team/app:2", r1.host()), format!("{}/team/app:2", r2.host()));
    let out = h.build_ok(&["-t", &a2, "-t", &b2, "--push", in_dir(ctx.path())]);
    for (r, reg) in [(&a2, &r1), (&b2, &r2)] {
        let l = push_line(&out, r);
        assert_eq!(count_before(&l, "blobs uploaded"), 2, "{l}");
        assert_eq!(count_before(&l, "already there"), 2, "{l}");
        assert_eq!(reg.uploads(), 6, "{}", reg.log());
    }

    // A registry that is down fails its push, named, and the other still gets the image.
    let dead = format!("127.0.0.1:{}/team/app:3", free_port());
    let a3 = format!("{}/team/app:3", r1.host());
    let out = h.build(&["-t", &a3, "-t", &dead, "--push", in_dir(ctx.path())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let last = err.lines().rev().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(last.contains(&format!("pushing {dead}")), "the failed registry is named: {err}");
    assert!(last.contains(&format!("pushed to {a3} successfully")), "{err}");
    let m3: serde_json::Value = serde_json::from_slice(&r1.manifest("team/app", "3")).unwrap();
    assert_eq!(m3["layers"].as_array().map(Vec::len), Some(3), "the healthy registry got it: {m3}");
    remove_images(&[&b1]);
}

/// `--save` keeps the result on the builder; a teammate with another home loads it with
/// `hoist pull` (by tag or build id) without any registry; another project cannot; the
/// registry credentials the client forwarded are nowhere in the builder's state.
#[test]
fn save_then_pull_from_a_teammates_home() {
    if !lab_available() {
        return;
    }
    let server = Server::start();
    let alice_token = server.admin(&["project", "create", "web", "--token-name", "alice"]);
    let bob_token = server.admin(&["token", "create", "web", "--name", "bob"]);
    let other_token = server.admin(&["project", "create", "other"]);
    let alice = Teammate::new(&server, &alice_token);
    let bob = Teammate::new(&server, &bob_token);
    let eve = Teammate::new(&server, &other_token);
    let reg = Registry::start();
    // Credentials for the push registry in alice's docker config: forwarded, never stored.
    let secret = "s3cr3t-pa55word-for-the-test";
    let docker_cfg = alice.home.path().join("docker");
    std::fs::create_dir_all(&docker_cfg).unwrap();
    let auth = base64(&format!("alice:{secret}"));
    std::fs::write(docker_cfg.join("config.json"), format!("{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}", reg.host())).unwrap();

    let ctx = context(&[("Dockerfile", &format!("FROM {}\nRUN echo saved-by-alice > /who\nCMD [\"cat\", \"/who\"]\n", busybox()))]);
    let name = format!("{}/web/saved:1", reg.host());
    let out = alice
        .cmd()
        .env("DOCKER_CONFIG", &docker_cfg)
        .args(["build", "--progress=plain", "-t", &name, "--save", "--push", in_dir(ctx.path())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let saved_line = err.lines().find(|l| l.contains("saved on the builder as ")).unwrap_or_else(|| panic!("{err}"));
    let build_id = saved_line.split("saved on the builder as ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();

    let local = unique("hoist-lp-pulled");
    let pull = bob.cmd().args(["pull", &name, "-t", &local]).output().unwrap();
    let perr = String::from_utf8_lossy(&pull.stderr);
    assert!(pull.status.success(), "{perr}");
    assert!(load_line(&perr).contains("via the loopback registry") && perr.contains(&build_id), "{perr}");
    assert_eq!(docker_ok(&["run", "--rm", &local]), "saved-by-alice\n");
    // By build id, and again: the engine has it all, nothing moves.
    let again = bob.cmd().args(["pull", &build_id, "-t", &local]).output().unwrap();
    let aerr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{aerr}");
    assert!(load_line(&aerr).contains("nothing moved"), "{aerr}");

    // Another project sees neither the tag nor the build id.
    for n in [name.as_str(), build_id.as_str()] {
        let denied = eve.cmd().args(["pull", n, "-t", "hoist-lp-never"]).output().unwrap();
        let derr = String::from_utf8_lossy(&denied.stderr);
        assert!(!denied.status.success() && derr.contains("no saved image"), "{derr}");
    }
    let leaked = Command::new("grep").args(["-rl", secret]).arg(server.root.path()).output().unwrap();
    assert!(leaked.stdout.is_empty(), "credentials stored by the builder in: {}", String::from_utf8_lossy(&leaked.stdout));

    // A saved image is one of the project's cache records: a reset drops it.
    let reset = alice.cmd().args(["cache", "reset"]).output().unwrap();
    assert!(reset.status.success(), "{}", String::from_utf8_lossy(&reset.stderr));
    let gone = bob.cmd().args(["pull", &build_id, "-t", &local]).output().unwrap();
    assert!(
        !gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("no saved image"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    remove_images(&[&local]);
}

fn base64(s: &str) -> String {
    hoist_oci::registry::base64_encode(s.as_bytes())
}

/// The file `name` in a layer blob (gzip or plain tar), if it is there.
fn file_in_layer(blob: &[u8], name: &str) -> Option<String> {
    use std::io::Read;
    let data = if blob.starts_with(&[0x1f, 0x8b]) {
        let mut d = Vec::new();
        flate2::read::GzDecoder::new(blob).read_to_end(&mut d).ok()?;
        d
    } else {
        blob.to_vec()
    };
    let mut a = tar::Archive::new(data.as_slice());
    for e in a.entries().ok()? {
        let mut e = e.ok()?;
        if e.path().ok()?.to_string_lossy().trim_start_matches("./") == name {
            let mut s = String::new();
            e.read_to_string(&mut s).ok()?;
            return Some(s);
        }
    }
    None
}

/// `/arch` of the image of `platform` under `repo:tag` in `reg` (from its last layer).
fn arch_file(reg: &Registry, repo: &str, tag: &str, platform: &str) -> String {
    let index: serde_json::Value = serde_json::from_slice(&reg.manifest(repo, tag)).unwrap();
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json", "{index}");
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == platform)
        .unwrap_or_else(|| panic!("no {platform} in {index}"));
    let manifest: serde_json::Value = serde_json::from_slice(&reg.manifest(repo, entry["digest"].as_str().unwrap())).unwrap();
    let last = manifest["layers"].as_array().unwrap().last().unwrap()["digest"].as_str().unwrap().to_string();
    file_in_layer(&reg.blob(repo, &last), "arch").unwrap_or_else(|| panic!("no /arch in the last {platform} layer"))
}

/// A two-platform build: an index with both, the arm64 RUN ran under emulation (its output
/// says aarch64), and --load gives the engine the host's architecture.
#[test]
fn two_platform_build_pushes_an_index_and_loads_the_hosts_platform() {
    if !lab_available() {
        return;
    }
    let reg = Registry::start();
    let h = Hoist::new();
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {}\nARG TARGETARCH\nRUN echo $(uname -m) $TARGETARCH > /arch\nCMD [\"cat\", \"/arch\"]\n", busybox()),
    )]);
    let tag = format!("{}/mp/app:1", reg.host());
    let out = h.build_ok(&["--platform", "linux/amd64,linux/arm64", "-t", &tag, "--push", "--load", in_dir(ctx.path())]);
    // Two platform manifests and the index.
    assert_eq!(count_before(&push_line(&out, &tag), "manifests"), 3, "{out}");
    assert_eq!(arch_file(&reg, "mp/app", "1", "amd64"), "x86_64 amd64\n");
    assert_eq!(arch_file(&reg, "mp/app", "1", "arm64"), "aarch64 arm64\n");
    let arch = docker_ok(&["image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", &tag]);
    assert_eq!(arch.trim(), "linux/amd64");
    assert_eq!(docker_ok(&["run", "--rm", &tag]), "x86_64 amd64\n");

    // -o type=oci writes the index too.
    let dir = tempfile::tempdir_in(test_tmp()).unwrap();
    let oci = dir.path().join("img.tar");
    h.build_ok(&["--platform", "linux/amd64,linux/arm64", "-o", &format!("type=oci,dest={}", oci.display()), in_dir(ctx.path())]);
    let a = OciArchive::read(&oci);
    let inner = a.json(a.index["manifests"][0]["digest"].as_str().unwrap());
    let archs: Vec<&str> = inner["manifests"].as_array().unwrap().iter().map(|m| m["platform"]["architecture"].as_str().unwrap()).collect();
    assert_eq!(archs, vec!["amd64", "arm64"]);
    remove_images(&[&tag]);
}

/// Two builders, one announcing linux/arm64: each platform is built on a builder that
/// announces it, the client pushes the index over both, and --load takes the host's
/// platform from the builder that built it.
#[test]
fn each_platform_goes_to_a_builder_that_announces_it() {
    if !lab_available() {
        return;
    }
    let amd = Server::start();
    let mut arm = Server {
        root: tempfile::Builder::new().prefix("hoist-server-").tempdir_in(test_tmp()).unwrap(),
        port: free_port(),
        child: None,
        extra: vec!["--platforms".into(), "linux/arm64".into()],
        env: Vec::new(),
    };
    arm.spawn();
    let (ta, tb) = (amd.admin(&["project", "create", "web"]), arm.admin(&["project", "create", "web"]));
    let home = tempfile::Builder::new().prefix("multi-").tempdir_in(test_tmp()).unwrap();
    let cmd = || {
        let mut c = Command::new(hoist_bin());
        c.env("HOME", home.path())
            .env("HOIST_CONFIG_DIR", home.path().join("config"))
            .env("HOIST_CACHE_DIR", home.path().join("cache"))
            .env("HOIST_BUILDER", format!("{},{}", amd.addr(), arm.addr()))
            .env_remove("HOIST_TOKEN")
            .env_remove("HOIST_ROOT")
            .env_remove("HOIST_PROJECT");
        c
    };
    for (s, t) in [(&amd, &ta), (&arm, &tb)] {
        let out = cmd().args(["login", "--builder", &s.addr(), "--token", t]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // The builder's Info names the token's project.
        assert!(String::from_utf8_lossy(&out.stderr).contains("(project \"web\")"), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let reg = Registry::start();
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {}\nARG TARGETARCH\nRUN echo $(uname -m) $TARGETARCH > /arch\nCMD [\"cat\", \"/arch\"]\n", busybox()),
    )]);
    let tag = format!("{}/multi/app:1", reg.host());
    let out = cmd()
        .args(["build", "--progress=plain", "--platform", "linux/amd64,linux/arm64", "-t", &tag, "--push", "--load", in_dir(ctx.path())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("linux/amd64 on {} (", amd.addr())), "{err}");
    assert!(err.contains(&format!("linux/arm64 on {} (", arm.addr())), "{err}");
    // Each builder ran exactly its platform's RUN.
    for (s, arch) in [(&amd, "amd64"), (&arm, "arm64")] {
        let ls = cmd().args(["builds", "ls", "--builder", &s.addr()]).output().unwrap();
        let ls = String::from_utf8_lossy(&ls.stdout);
        assert_eq!(ls.lines().skip(1).filter(|l| !l.trim().is_empty()).count(), 1, "{arch} builder: {ls}");
    }
    assert!(err.contains("pushed index sha256:"), "{err}");
    assert_eq!(arch_file(&reg, "multi/app", "1", "amd64"), "x86_64 amd64\n");
    assert_eq!(arch_file(&reg, "multi/app", "1", "arm64"), "aarch64 arm64\n");
    assert!(load_line(&err).contains("via the loopback registry"), "{err}");
    assert_eq!(docker_ok(&["run", "--rm", &tag]), "x86_64 amd64\n");
    remove_images(&[&tag]);
}

/// Requests that change a registry (blob uploads, manifest puts, mounts), once its access
/// log holds still (it logs after answering).
fn registry_writes(reg: &Registry) -> usize {
    let count = || reg.log().lines().filter(|l| ["\"PUT /v2/", "\"PATCH /v2/", "\"POST /v2/"].iter().any(|m| l.contains(m))).count();
    let mut last = count();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = count();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Issue 15: the same inputs give the same image, as with BuildKit. A fully cached rebuild
/// and a teammate's build have the same image id and manifest digest (times come from the
/// cache records that made the layers, not from the export); a warm `--push` uploads
/// nothing and says so; a warm `--load` creates nothing in the engine; the OCI export and
/// a two-platform index are byte-identical too.
#[test]
fn an_unchanged_build_is_the_same_image_and_a_warm_push_or_load_moves_nothing() {
    if !lab_available() {
        return;
    }
    let server = Server::start();
    let alice = Teammate::new(&server, &server.admin(&["project", "create", "ident", "--token-name", "alice"]));
    let bob = Teammate::new(&server, &server.admin(&["token", "create", "ident", "--name", "bob"]));
    let reg = Registry::start();
    let dockerfile = format!("FROM {}\nENV A=1\nRUN echo hello > /hello\nCOPY app.txt /app.txt\nCMD [\"cat\", \"/app.txt\"]\n", busybox());
    let ctx = context(&[("Dockerfile", &dockerfile), ("app.txt", "app\n")]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    // One tag, on the test's own registry: --push pushes every tag, --load loads them all.
    let tag = format!("{}/ident/app:{}", reg.host(), std::process::id());
    let build = |who: &Teammate, n: u32, extra: &[&str]| -> (String, String) {
        let iid = out.path().join(format!("iid-{n}"));
        let mut args = vec!["-t", &tag, "--push", "--load", "--iidfile", iid.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.push(in_dir(ctx.path()));
        let err = who.build_ok(&args);
        (std::fs::read_to_string(&iid).unwrap(), err)
    };
    let (id1, _) = build(&alice, 1, &[]);
    let manifest_tag = std::process::id().to_string();
    let manifest1 = reg.manifest("ident/app", &manifest_tag);
    let writes = registry_writes(&reg);
    std::thread::sleep(std::time::Duration::from_millis(1100)); // a clock-based time would now differ

    // Fully cached, same client: same id; the push is HEAD requests only; the load moves nothing.
    let (id2, err) = build(&alice, 2, &[]);
    assert_eq!(id1, id2, "a fully cached rebuild is the same image");
    let line = push_line_any(&err, &tag);
    assert!(line.contains("is up to date") && line.contains("nothing uploaded"), "{line}");
    assert!(load_line(&err).contains("already in the engine"), "{err}");
    assert_eq!(registry_writes(&reg), writes, "a warm push changed the registry:\n{}", reg.log());
    assert_eq!(reg.manifest("ident/app", &manifest_tag), manifest1);

    // A teammate's build of the same inputs: the same image.
    let (id3, err) = build(&bob, 3, &[]);
    assert_eq!(id1, id3, "a teammate's build is the same image");
    assert!(push_line_any(&err, &tag).contains("is up to date"), "{err}");
    assert_eq!(registry_writes(&reg), writes);

    // The OCI export carries the manifest that was pushed.
    let oci = out.path().join("img.tar");
    alice.build_ok(&["-o", &format!("type=oci,dest={}", oci.display()), in_dir(ctx.path())]);
    let archive = OciArchive::read(&oci);
    assert_eq!(archive.index["manifests"][0]["digest"].as_str().unwrap(), sha256_digest(&manifest1));
    assert_eq!(archive.manifest()["config"]["digest"].as_str().unwrap(), id1.trim());
    // History times come from when the layers were made, and the config's from the last.
    let config = archive.config();
    let history = config["history"].as_array().unwrap();
    assert_eq!(config["created"], history.last().unwrap()["created"], "{config}");
    assert!(history.iter().all(|h| h["created"].is_string()), "{config}");

    // Two platforms: the same index twice.
    let multi = format!("{}/ident/multi:1", reg.host());
    let push_multi = || {
        let err = alice.build_ok(&["--platform", "linux/amd64,linux/arm64", "-t", &multi, "--push", in_dir(ctx.path())]);
        (reg.manifest("ident/multi", "1"), err)
    };
    let (index1, _) = push_multi();
    let writes = registry_writes(&reg);
    let (index2, err) = push_multi();
    assert_eq!(index1, index2, "the same index");
    assert!(push_line_any(&err, &multi).contains("is up to date"), "{err}");
    assert_eq!(registry_writes(&reg), writes);
    remove_images(&[&tag]);
}

/// The line reporting the push to `reference`, whether it uploaded or was up to date.
fn push_line_any(stderr: &str, reference: &str) -> String {
    stderr
        .lines()
        .find(|l| l.contains(reference) && (l.contains("hoist: pushed ") || l.contains(" is up to date") || l.contains("push to ")))
        .unwrap_or_else(|| panic!("no push report for {reference} in:\n{stderr}"))
        .to_string()
}
