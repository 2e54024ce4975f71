//! Shared harness of the end-to-end tests: the real `hoist` binary with its own state root
//! per test, the lab's Docker engine and registry, and helpers to make contexts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The registry the lab set up (tests/lab/setup.sh), with library/busybox:latest.
pub fn registry() -> String {
    std::env::var("HOIST_TEST_REGISTRY").unwrap_or_else(|_| "127.0.0.1:5000".to_string())
}

/// buildx's (and hoist's) switch for the default provenance attestation.
pub const NO_DEFAULT_ATTESTATIONS: &str = "BUILDX_NO_DEFAULT_ATTESTATIONS";

/// The base image every test builds on.
pub fn busybox() -> String {
    format!("{}/library/busybox:latest", registry())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The hoist binary, built once per test process (cheap when up to date).
pub fn hoist_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "hoist-cli", "--bin", "hoist"])
            .current_dir(workspace())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building the hoist binary failed");
        let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace().join("target"));
        target.join("debug").join("hoist")
    })
    .clone()
}

/// Whether the lab (Docker engine + registry + runc) is up. In CI it must be: a missing lab
/// fails the test instead of skipping it.
pub fn lab_available() -> bool {
    let docker = Command::new("/usr/bin/docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let reg =
        Command::new("curl").args(["-fsS", &format!("http://{}/v2/", registry())]).output().map(|o| o.status.success()).unwrap_or(false);
    let root = rustix_is_root();
    let ok = docker && reg && root;
    if !ok {
        let msg = format!("lab not available (docker: {docker}, registry: {reg}, root: {root}); run tests/lab/setup.sh as root");
        if std::env::var("CI").is_ok() {
            panic!("{msg}");
        }
        eprintln!("SKIP: {msg}");
    }
    ok
}

fn rustix_is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A hoist installation with its own state root (and so its own embedded builder) and
/// client cache; the builder is stopped when this is dropped.
pub struct Hoist {
    pub root: tempfile::TempDir,
    pub cache: tempfile::TempDir,
}

impl Hoist {
    pub fn new() -> Hoist {
        let root = tempfile::Builder::new().prefix("hoist-e2e-").tempdir_in(test_tmp()).expect("state root");
        let cache = tempfile::Builder::new().prefix("hoist-e2e-cache-").tempdir_in(test_tmp()).expect("cache dir");
        Hoist { root, cache }
    }

    /// A `hoist` command with this installation's environment.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(hoist_bin());
        c.env("HOIST_ROOT", self.root.path()).env("HOIST_CACHE_DIR", self.cache.path()).env_remove("HOIST_BUILDER");
        // Pushed and OCI images come without the default provenance attestation (so as a plain
        // manifest, not an index), as the tests written before it expect; attest.rs removes
        // this to test the default.
        c.env(NO_DEFAULT_ATTESTATIONS, "1");
        c
    }

    /// Run `hoist build --progress=plain ARGS...`, returning the output (not asserting).
    pub fn build(&self, args: &[&str]) -> Output {
        let mut c = self.cmd();
        c.arg("build").arg("--progress=plain").args(args);
        c.output().expect("running hoist")
    }

    /// Run a build that must succeed; returns its stderr.
    pub fn build_ok(&self, args: &[&str]) -> String {
        let out = self.build(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "hoist build {args:?} failed:\n{stderr}");
        stderr
    }

    /// PID of the embedded builder, if running.
    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.root.path().join("hoistd.pid")).ok()?.trim().parse().ok()
    }

    /// Stop the embedded builder (SIGTERM, then SIGKILL) and wait for it.
    pub fn stop(&self) {
        if let Some(pid) = self.daemon_pid() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let _ = std::fs::remove_file(self.root.path().join("hoistd.pid"));
        }
    }
}

impl Drop for Hoist {
    fn drop(&mut self) {
        self.stop();
        unmount_all_under(self.root.path());
    }
}

/// Mount points under `dir` (to check nothing leaks).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&d))
        .collect()
}

/// Lazily unmount anything left under `dir`, deepest first, so that removing a test's
/// state directory never fails on a leaked mount (the tests that care assert on
/// [`mounts_under`] first).
pub fn unmount_all_under(dir: &Path) {
    let mut mounts = mounts_under(dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").args(["-l", &m]).status();
    }
}

/// Where tests put their temporary directories (on a filesystem overlayfs accepts).
pub fn test_tmp() -> PathBuf {
    let p = std::env::var("HOIST_TEST_TMP").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/var/tmp/hoist-tests"));
    std::fs::create_dir_all(&p).expect("test tmp dir");
    p
}

/// A context directory with `files` (path, content); a path ending in `/` is a directory.
pub fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("ctx-").tempdir_in(test_tmp()).expect("context dir");
    for (path, content) in files {
        let p = dir.path().join(path);
        if path.ends_with('/') {
            std::fs::create_dir_all(&p).unwrap();
            continue;
        }
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, content).unwrap();
    }
    dir
}

/// `docker` (the 20.10 client with BuildKit).
pub fn docker() -> Command {
    let mut c = Command::new("/usr/bin/docker");
    c.env("DOCKER_BUILDKIT", "1");
    c
}

/// Run `docker ARGS`, asserting success, returning stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker().args(args).output().expect("running docker");
    assert!(out.status.success(), "docker {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unique name for images made by a test.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A `hoist serve` on a TCP port of loopback, with its own state root.
pub struct Server {
    pub root: tempfile::TempDir,
    pub port: u16,
    pub child: Option<std::process::Child>,
    pub extra: Vec<String>,
    /// Environment variables of the process besides the test's own.
    pub env: Vec<(String, String)>,
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Server {
    /// Start a server (plain TCP on loopback).
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Start a server with extra `hoist serve` flags.
    pub fn start_with(extra: &[&str]) -> Server {
        let root = tempfile::Builder::new().prefix("hoist-server-").tempdir_in(test_tmp()).expect("server root");
        let mut s = Server { root, port: free_port(), child: None, extra: extra.iter().map(|e| e.to_string()).collect(), env: Vec::new() };
        s.spawn();
        s
    }

    /// (Re)start the process on the same root and port.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.root.path().join("server.log")).unwrap();
        let child = Command::new(hoist_bin())
            .args(["serve", "--root", self.root.path().to_str().unwrap(), "--listen", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting hoist serve");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "hoist serve did not start: {}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("server.log")).unwrap_or_default()
    }

    /// Run an admin command on the server's state (`hoist project create ...`), returning stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = Command::new(hoist_bin()).args(args).env("HOIST_ROOT", self.root.path()).output().unwrap();
        assert!(out.status.success(), "hoist {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Stop it as an operator would (SIGTERM) and wait until it has exited.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            for _ in 0..100 {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        unmount_all_under(self.root.path());
    }
}

/// A directory the nodes of a fleet share as their cache store (`--cache-store file://…`).
pub struct FleetStore {
    pub dir: tempfile::TempDir,
    pub url: String,
}

impl FleetStore {
    pub fn new() -> FleetStore {
        let dir = tempfile::Builder::new().prefix("fleet-store-").tempdir_in(test_tmp()).unwrap();
        let url = format!("file://{}", dir.path().display());
        FleetStore { dir, url }
    }

    /// A new node (`hoist serve` with its own root) on this store.
    pub fn node(&self) -> Server {
        Server::start_with(&["--cache-store", &self.url])
    }

    /// `hoist <args> --cache-store <url>`: an admin command on the store (projects and
    /// tokens of the fleet), from no node in particular; its stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = Command::new(hoist_bin()).args(args).args(["--cache-store", &self.url]).env_remove("HOIST_ROOT").output().unwrap();
        assert!(out.status.success(), "hoist {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The paths of the store's objects (`ac/…`, `cas/sha256/…`, `auth.json`).
    pub fn objects(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.path().strip_prefix(self.dir.path()).unwrap().display().to_string());
                }
            }
        }
        out
    }
}

/// A teammate: a client with its own home (config, stat cache) talking to a server.
pub struct Teammate {
    pub home: tempfile::TempDir,
    pub builder: String,
    pub token: String,
}

impl Teammate {
    pub fn new(server: &Server, token: &str) -> Teammate {
        let home = tempfile::Builder::new().prefix("teammate-").tempdir_in(test_tmp()).unwrap();
        Teammate { home, builder: server.addr(), token: token.to_string() }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(hoist_bin());
        c.env("HOME", self.home.path())
            .env("HOIST_CONFIG_DIR", self.home.path().join("config"))
            .env("HOIST_CACHE_DIR", self.home.path().join("cache"))
            .env("HOIST_BUILDER", &self.builder)
            .env("HOIST_TOKEN", &self.token)
            .env_remove("HOIST_ROOT")
            .env_remove("HOIST_PROJECT")
            .env(NO_DEFAULT_ATTESTATIONS, "1");
        c
    }

    pub fn build(&self, args: &[&str]) -> Output {
        self.cmd().arg("build").arg("--progress=plain").args(args).output().unwrap()
    }

    pub fn build_ok(&self, args: &[&str]) -> String {
        let out = self.build(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "hoist build {args:?} failed:\n{stderr}");
        stderr
    }
}

/// The number before `label` in a summary line like "3 steps run, 2 cached".
pub fn count_before(text: &str, label: &str) -> u64 {
    let at = text.find(label).unwrap_or_else(|| panic!("{label:?} not in:\n{text}"));
    text[..at]
        .trim_end()
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {label:?} in:\n{text}"))
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// An OCI image layout archive (`-o type=oci,dest=...`) read into memory: `index.json` and
/// every blob by digest.
pub struct OciArchive {
    pub index: serde_json::Value,
    pub blobs: std::collections::HashMap<String, Vec<u8>>,
}

impl OciArchive {
    /// Read the archive at `path` (panics naming what is missing).
    pub fn read(path: &Path) -> OciArchive {
        let mut index = None;
        let mut blobs = std::collections::HashMap::new();
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let mut a = tar::Archive::new(file);
        for e in a.entries().expect("reading the OCI archive") {
            let mut e = e.expect("an entry of the OCI archive");
            let name = e.path().expect("entry path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).expect("reading an entry of the OCI archive");
            if name == "index.json" {
                index = Some(serde_json::from_slice(&data).expect("index.json is JSON"));
            } else if let Some(h) = name.strip_prefix("blobs/sha256/") {
                blobs.insert(format!("sha256:{h}"), data);
            }
        }
        OciArchive { index: index.unwrap_or_else(|| panic!("{} has no index.json", path.display())), blobs }
    }

    /// The bytes of blob `digest`.
    pub fn blob(&self, digest: &str) -> &[u8] {
        self.blobs.get(digest).unwrap_or_else(|| panic!("blob {digest} is not in the archive"))
    }

    /// Blob `digest` parsed as JSON.
    pub fn json(&self, digest: &str) -> serde_json::Value {
        serde_json::from_slice(self.blob(digest)).unwrap_or_else(|e| panic!("blob {digest} is not JSON: {e}"))
    }

    /// The manifest `index.json` points at first (the image of a one-platform build).
    pub fn manifest(&self) -> serde_json::Value {
        self.json(self.index["manifests"][0]["digest"].as_str().expect("index.json lists a manifest"))
    }

    /// The config of [`OciArchive::manifest`].
    pub fn config(&self) -> serde_json::Value {
        self.json(self.manifest()["config"]["digest"].as_str().expect("the manifest has a config"))
    }
}
