//! Differential suite: every case under `tests/cases/<name>/` is built by Docker's BuildKit
//! (`DOCKER_BUILDKIT=1 /usr/bin/docker build`, the reference) and by `hoist build --load`,
//! and the two images must agree on their config and on their flattened filesystem.
//!
//! A case directory holds a `Dockerfile` (with `{{BUSYBOX}}`, `{{REGISTRY}}` and `{{HTTP}}`
//! — a loopback HTTP server the harness runs for `ADD <url>` — substituted at run time, also
//! in build args) and the context files. Optionally:
//! - `setup.sh`, run with `sh -eu` inside the copied context to make what git cannot carry
//!   (tar archives, hardlinks, empty directories, unusual modes);
//! - `case.json`: `build_args` (object), `target` (string), `secrets` (object id → content),
//!   `hoist_dockerfile` (a variant for hoist using syntax Docker 20.10 lacks but whose result
//!   must be identical), `fail` (`{"line": N, "docker_error": "...", "hoist_error": "..."}`:
//!   both builders must reject the build, hoist naming `Dockerfile:N`), `note` (why the case
//!   is shaped the way it is).
//!
//! Compared: the config fields that define a container (Env, Cmd, Entrypoint, WorkingDir,
//! User, ExposedPorts, Volumes, Labels, StopSignal, Healthcheck, Shell, OnBuild,
//! ArgsEscaped) plus os/architecture/variant/author, and every path of the flattened filesystem (type,
//! mode, uid, gid, size, SHA-256 of the content, link target, hardlink group) — not
//! timestamps, layer boundaries or history. Both images are read back with `docker save`, so
//! both go through the same engine and the same tar writer. (A file literally named `.wh.*`
//! reads as a whiteout there, as in any OCI layer: such names are not a meaningful case.)
//!
//! Each case is a test of its own, `case::<name>` (this file is a `harness = false` test
//! with its own `main`): `cargo nextest run -p hoist-tests --test differential copy-` runs
//! the cases whose names contain `copy-`. `HOIST_BIN` names a prebuilt hoist binary to test
//! instead of building one.

mod common;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cases")
}

/// One case as read from its directory.
struct Case {
    name: String,
    dir: PathBuf,
    spec: Value,
}

impl Case {
    fn build_args(&self) -> Vec<String> {
        match self.spec.get("build_args").and_then(Value::as_object) {
            Some(m) => m.iter().map(|(k, v)| format!("{k}={}", substitute(v.as_str().unwrap_or_default()))).collect(),
            None => Vec::new(),
        }
    }
    fn target(&self) -> Option<&str> {
        self.spec.get("target").and_then(Value::as_str)
    }
    /// `docker build --network` for both builders: the default (each tool's sandbox) unless
    /// the case needs another (e.g. `host` to reach a loopback server from RUN).
    fn network(&self) -> Option<&str> {
        self.spec.get("network").and_then(Value::as_str)
    }
    fn fail(&self) -> Option<&Value> {
        self.spec.get("fail")
    }
}

fn load_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(cases_dir()).expect("tests/cases") {
        let dir = entry.expect("case dir entry").path();
        if !dir.join("Dockerfile").exists() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let spec = match std::fs::read_to_string(dir.join("case.json")) {
            Ok(s) => serde_json::from_str(&s).unwrap_or_else(|e| panic!("{name}/case.json: {e}")),
            Err(_) => Value::Object(Default::default()),
        };
        cases.push(Case { name, dir, spec });
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

fn substitute(text: &str) -> String {
    text.replace("{{BUSYBOX}}", &busybox()).replace("{{REGISTRY}}", &registry()).replace("{{HTTP}}", &http_server())
}

/// The files `{{HTTP}}` serves, for `ADD <url>`: both builders fetch them over loopback.
fn http_files() -> Vec<(&'static str, Vec<u8>)> {
    let mut tgz = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut tgz, flate2::Compression::default());
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(6);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "inside.txt", &b"inside"[..]).expect("tar");
        b.into_inner().expect("tar").finish().expect("gzip");
    }
    vec![("/hello.txt", b"hello over http\n".to_vec()), ("/dir/data.json", b"{\"k\": 1}\n".to_vec()), ("/archive.tar.gz", tgz)]
}

/// A tiny HTTP/1.0 server on loopback (started once): `http://127.0.0.1:PORT`.
fn http_server() -> String {
    use std::io::{BufRead, BufReader, Write};
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the test http server");
        let port = listener.local_addr().expect("local addr").port();
        let files = http_files();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let files = files.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(match conn.try_clone() {
                        Ok(c) => c,
                        Err(_) => return,
                    });
                    let mut request = String::new();
                    if reader.read_line(&mut request).is_err() {
                        return;
                    }
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => break,
                            Ok(_) if line.trim().is_empty() => break,
                            Ok(_) => {}
                        }
                    }
                    let mut parts = request.split_whitespace();
                    let method = parts.next().unwrap_or("");
                    let path = parts.next().unwrap_or("");
                    let (status, body) = match files.iter().find(|(p, _)| *p == path) {
                        Some((_, b)) => ("200 OK", b.clone()),
                        None => ("404 Not Found", b"not found\n".to_vec()),
                    };
                    let head = format!(
                        "HTTP/1.0 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nLast-Modified: Mon, 01 Jan 2001 00:00:00 GMT\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes());
                    if method != "HEAD" {
                        let _ = conn.write_all(&body);
                    }
                });
            }
        });
        format!("http://127.0.0.1:{port}")
    })
    .clone()
}

fn copy_tree(from: &Path, to: &Path, top: bool) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if top && (name == "case.json" || name == "setup.sh") {
            continue;
        }
        let src = entry.path();
        let dst = to.join(&name);
        let ft = entry.file_type().unwrap();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ft.is_dir() {
            copy_tree(&src, &dst, false);
        } else {
            let name = name.to_string_lossy();
            if name == "Dockerfile" || name.starts_with("Dockerfile.") {
                std::fs::write(&dst, substitute(&std::fs::read_to_string(&src).unwrap())).unwrap();
            } else {
                std::fs::copy(&src, &dst).unwrap();
            }
        }
    }
}

/// The context of a case: a copy of its directory with placeholders substituted and
/// `setup.sh` run inside it.
fn prepare_context(case: &Case) -> Result<tempfile::TempDir, String> {
    let ctx = tempfile::Builder::new().prefix(&format!("diff-{}-", case.name)).tempdir_in(test_tmp()).map_err(|e| e.to_string())?;
    copy_tree(&case.dir, ctx.path(), true);
    let setup = case.dir.join("setup.sh");
    if setup.exists() {
        let out = Command::new("sh").arg("-eu").arg(&setup).current_dir(ctx.path()).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("setup.sh failed:\n{}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    Ok(ctx)
}

/// Secrets of a case written to files outside the context: `(id, path)`.
fn write_secrets(case: &Case, dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if let Some(m) = case.spec.get("secrets").and_then(Value::as_object) {
        for (id, content) in m {
            let p = dir.join(format!("secret-{id}"));
            std::fs::write(&p, content.as_str().unwrap_or_default()).unwrap();
            out.push((id.clone(), p));
        }
    }
    out
}

fn common_flags(case: &Case, secrets: &[(String, PathBuf)], tag: &str) -> Vec<String> {
    let mut a = vec!["-t".to_string(), tag.to_string()];
    if let Some(n) = case.network() {
        a.push(format!("--network={n}"));
    }
    for b in case.build_args() {
        a.push("--build-arg".into());
        a.push(b);
    }
    if let Some(t) = case.target() {
        a.push("--target".into());
        a.push(t.into());
    }
    for (id, p) in secrets {
        a.push("--secret".into());
        a.push(format!("id={id},src={}", p.display()));
    }
    a
}

fn docker_build(case: &Case, ctx: &Path, secrets: &[(String, PathBuf)], tag: &str) -> Output {
    let mut c = docker();
    c.args(["build", "--progress=plain"]).args(common_flags(case, secrets, tag)).arg(ctx);
    c.output().expect("running docker build")
}

fn hoist_build(h: &Hoist, case: &Case, ctx: &Path, secrets: &[(String, PathBuf)], tag: &str) -> Output {
    let mut args = common_flags(case, secrets, tag);
    args.push("--load".into());
    if let Some(f) = case.spec.get("hoist_dockerfile").and_then(Value::as_str) {
        args.push("-f".into());
        args.push(ctx.join(f).display().to_string());
    }
    args.push(ctx.display().to_string());
    hoist_cmd(h).arg("build").arg("--progress=plain").args(&args).output().expect("running hoist")
}

/// A `hoist` command for `h`; `HOIST_BIN` names a prebuilt binary to use instead of the one
/// the harness builds (useful while the workspace is being edited by others).
fn hoist_cmd(h: &Hoist) -> Command {
    match std::env::var_os("HOIST_BIN") {
        Some(bin) => {
            let mut c = Command::new(bin);
            c.env("HOIST_ROOT", h.root.path()).env("HOIST_CACHE_DIR", h.cache.path()).env_remove("HOIST_BUILDER");
            c
        }
        None => h.cmd(),
    }
}

/// The last `n` lines of a build log, for error messages.
fn tail(s: &[u8], n: usize) -> String {
    let s = String::from_utf8_lossy(s);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One path of a flattened image filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    sha256: String,
    link: String,
    /// Identity of the inode: paths sharing it are hardlinks of each other.
    inode: (usize, String),
}

impl Node {
    fn describe(&self, hardlinks: &[String]) -> String {
        let mut s = format!("{} {:04o} {}:{}", self.kind, self.mode, self.uid, self.gid);
        if self.kind == "file" {
            s.push_str(&format!(" size={} sha256={}", self.size, &self.sha256[..12]));
        }
        if !self.link.is_empty() {
            s.push_str(&format!(" -> {}", self.link));
        }
        if !hardlinks.is_empty() {
            s.push_str(&format!(" hardlinks={}", hardlinks.join(",")));
        }
        s
    }
}

fn clean(path: &str) -> String {
    let p = path.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
    p.to_string()
}

fn is_under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

/// Apply one layer tar (docker's rendering, OCI whiteouts) onto `fs`.
fn apply_layer(fs: &mut BTreeMap<String, Node>, layer: &[u8], index: usize) -> Result<(), String> {
    let mut ar = tar::Archive::new(layer);
    let mut adds: Vec<(String, Node, Option<String>)> = Vec::new();
    let mut deletes: Vec<(String, bool)> = Vec::new();
    for e in ar.entries().map_err(|e| e.to_string())? {
        let mut e = e.map_err(|e| e.to_string())?;
        let path = clean(&e.path().map_err(|e| e.to_string())?.to_string_lossy());
        let (parent, base) = match path.rfind('/') {
            Some(i) => (path[..i].to_string(), path[i + 1..].to_string()),
            None => (String::new(), path.clone()),
        };
        if base == ".wh..wh..opq" {
            deletes.push((parent, true));
            continue;
        }
        if let Some(name) = base.strip_prefix(".wh.") {
            deletes.push((if parent.is_empty() { name.to_string() } else { format!("{parent}/{name}") }, false));
            continue;
        }
        let h = e.header();
        let et = h.entry_type();
        let kind = match et {
            tar::EntryType::Regular | tar::EntryType::Continuous => "file",
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "file",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            tar::EntryType::Fifo => "fifo",
            other => return Err(format!("unexpected tar entry type {other:?} at {path}")),
        };
        let link = match et {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                e.link_name().map_err(|e| e.to_string())?.map(|l| l.to_string_lossy().into_owned()).unwrap_or_default()
            }
            _ => String::new(),
        };
        let mut node = Node {
            kind,
            mode: h.mode().map_err(|e| e.to_string())? & 0o7777,
            uid: h.uid().map_err(|e| e.to_string())?,
            gid: h.gid().map_err(|e| e.to_string())?,
            size: 0,
            sha256: String::new(),
            link: if et == tar::EntryType::Symlink { link.clone() } else { String::new() },
            inode: (index, path.clone()),
        };
        if et == tar::EntryType::Regular || et == tar::EntryType::Continuous {
            let mut buf = Vec::new();
            e.read_to_end(&mut buf).map_err(|e| e.to_string())?;
            node.size = buf.len() as u64;
            node.sha256 = hex::encode(Sha256::digest(&buf));
        }
        let hardlink_to = (et == tar::EntryType::Link).then(|| clean(&link));
        adds.push((path, node, hardlink_to));
    }
    for (path, opaque) in deletes {
        let keys: Vec<String> = fs.range(path.clone()..).take_while(|(k, _)| k.starts_with(&path)).map(|(k, _)| k.clone()).collect();
        for k in keys {
            if is_under(&k, &path) || (!opaque && k == path) {
                fs.remove(&k);
            }
        }
    }
    for (path, mut node, hardlink_to) in adds {
        if let Some(target) = hardlink_to {
            let t = fs.get(&target).cloned().ok_or_else(|| format!("hardlink {path} to missing {target}"))?;
            node = Node { mode: t.mode, uid: t.uid, gid: t.gid, ..t };
        }
        if node.kind != "dir" {
            let keys: Vec<String> = fs
                .range(path.clone()..)
                .take_while(|(k, _)| k.starts_with(&path))
                .filter(|(k, _)| is_under(k, &path))
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                fs.remove(&k);
            }
        }
        fs.insert(path, node);
    }
    Ok(())
}

/// An image as read back from the engine: its config and flattened filesystem.
struct Image {
    config: Value,
    fs: BTreeMap<String, Node>,
}

fn read_image(tag: &str) -> Result<Image, String> {
    let out = docker().args(["save", tag]).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("docker save {tag}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut ar = tar::Archive::new(&out.stdout[..]);
    for e in ar.entries().map_err(|e| e.to_string())? {
        let mut e = e.map_err(|e| e.to_string())?;
        let p = clean(&e.path().map_err(|e| e.to_string())?.to_string_lossy());
        if e.header().entry_type() == tar::EntryType::Regular {
            let mut buf = Vec::new();
            e.read_to_end(&mut buf).map_err(|e| e.to_string())?;
            files.insert(p, buf);
        }
    }
    let manifest: Value =
        serde_json::from_slice(files.get("manifest.json").ok_or("no manifest.json in docker save")?).map_err(|e| e.to_string())?;
    let m = &manifest[0];
    let config: Value =
        serde_json::from_slice(files.get(m["Config"].as_str().unwrap_or_default()).ok_or("config missing from docker save")?)
            .map_err(|e| e.to_string())?;
    let mut fs = BTreeMap::new();
    for (i, l) in m["Layers"].as_array().ok_or("no Layers")?.iter().enumerate() {
        let l = l.as_str().unwrap_or_default();
        apply_layer(&mut fs, files.get(l).ok_or_else(|| format!("layer {l} missing"))?, i)?;
    }
    Ok(Image { config, fs })
}

const CONFIG_FIELDS: &[&str] = &[
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "Labels",
    "StopSignal",
    "Healthcheck",
    "Shell",
    "OnBuild",
    "ArgsEscaped",
];

/// Differences between the two configs, one line each.
fn diff_config(docker: &Value, hoist: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for top in ["os", "architecture", "variant", "author"] {
        let (d, h) = (docker.get(top).unwrap_or(&Value::Null), hoist.get(top).unwrap_or(&Value::Null));
        if d != h {
            out.push(format!("config {top}: docker {d} / hoist {h}"));
        }
    }
    let null = Value::Null;
    let dc = docker.get("config").unwrap_or(&null);
    let hc = hoist.get("config").unwrap_or(&null);
    for f in CONFIG_FIELDS {
        let norm = |v: Option<&Value>| -> Value {
            match v {
                // Absent, null, "" and false all decode to Go's zero value in the engine.
                None | Some(Value::Null) => Value::Null,
                Some(Value::String(s)) if s.is_empty() => Value::Null,
                Some(Value::Bool(false)) => Value::Null,
                Some(v) => v.clone(),
            }
        };
        let (d, h) = (norm(dc.get(*f)), norm(hc.get(*f)));
        if d != h {
            out.push(format!("config {f}: docker {d} / hoist {h}"));
        }
    }
    out
}

fn hardlink_groups(fs: &BTreeMap<String, Node>) -> HashMap<(usize, String), Vec<String>> {
    let mut g: HashMap<(usize, String), Vec<String>> = HashMap::new();
    for (p, n) in fs {
        if n.kind == "file" {
            g.entry(n.inode.clone()).or_default().push(p.clone());
        }
    }
    g
}

/// Differences between the two filesystems, one line each.
fn diff_fs(docker: &BTreeMap<String, Node>, hoist: &BTreeMap<String, Node>) -> Vec<String> {
    let (gd, gh) = (hardlink_groups(docker), hardlink_groups(hoist));
    let others = |g: &HashMap<(usize, String), Vec<String>>, p: &str, n: &Node| -> Vec<String> {
        if n.kind != "file" {
            return Vec::new();
        }
        g.get(&n.inode).map(|v| v.iter().filter(|x| x.as_str() != p).cloned().collect()).unwrap_or_default()
    };
    let paths: BTreeSet<&String> = docker.keys().chain(hoist.keys()).collect();
    let mut out = Vec::new();
    for p in paths {
        let d = docker.get(p).map(|n| n.describe(&others(&gd, p, n)));
        let h = hoist.get(p).map(|n| n.describe(&others(&gh, p, n)));
        if d != h {
            out.push(format!(
                "/{p}:\n    docker: {}\n    hoist:  {}",
                d.as_deref().unwrap_or("(absent)"),
                h.as_deref().unwrap_or("(absent)")
            ));
        }
    }
    out
}

/// Removes the images a case made when dropped, also when the case panics.
struct RemoveImages(Vec<String>);

impl Drop for RemoveImages {
    fn drop(&mut self) {
        let _ = docker().arg("rmi").arg("-f").args(&self.0).output();
    }
}

/// Run one case; `Ok(summary)` when hoist agrees with BuildKit, `Err(report)` otherwise.
fn run_case(h: &Hoist, case: &Case) -> Result<String, String> {
    let ctx = prepare_context(case)?;
    let secret_dir = tempfile::tempdir_in(test_tmp()).map_err(|e| e.to_string())?;
    let secrets = write_secrets(case, secret_dir.path());
    let dtag = unique(&format!("hoist-diff-docker-{}", case.name));
    let htag = unique(&format!("hoist-diff-hoist-{}", case.name));
    let _cleanup = RemoveImages(vec![dtag.clone(), htag.clone()]);
    // The two builders are independent: run them at once.
    let (dout, hout) = std::thread::scope(|s| {
        let d = s.spawn(|| docker_build(case, ctx.path(), &secrets, &dtag));
        let hh = hoist_build(h, case, ctx.path(), &secrets, &htag);
        (d.join().expect("docker build thread"), hh)
    });
    compare(case, &dout, &hout, &dtag, &htag)
}

fn compare(case: &Case, dout: &Output, hout: &Output, dtag: &str, htag: &str) -> Result<String, String> {
    if let Some(fail) = case.fail() {
        let mut problems = Vec::new();
        let dlog = String::from_utf8_lossy(&dout.stderr);
        let hlog = String::from_utf8_lossy(&hout.stderr);
        if dout.status.success() {
            problems.push("BuildKit accepted the build the case expects to fail: fix the case".to_string());
        } else if let Some(want) = fail.get("docker_error").and_then(Value::as_str) {
            if !dlog.contains(want) {
                problems.push(format!("BuildKit failed, but not with {want:?}:\n{}", tail(&dout.stderr, 6)));
            }
        }
        if hout.status.success() {
            problems.push("hoist accepted a build BuildKit rejects".to_string());
        } else {
            if let Some(line) = fail.get("line").and_then(Value::as_u64) {
                let want = format!("Dockerfile:{line}");
                let names_line = hlog.match_indices(&want).any(|(i, _)| !hlog[i + want.len()..].starts_with(|c: char| c.is_ascii_digit()));
                if !names_line {
                    problems.push(format!("hoist's error does not name {want}:\n{}", tail(&hout.stderr, 6)));
                }
            }
            if let Some(want) = fail.get("hoist_error").and_then(Value::as_str) {
                if !hlog.to_lowercase().contains(&want.to_lowercase()) {
                    problems.push(format!("hoist's error does not say {want:?}:\n{}", tail(&hout.stderr, 6)));
                }
            }
        }
        let herr = hlog.lines().rfind(|l| l.contains("Dockerfile:") || l.contains("error")).unwrap_or("").trim().to_string();
        return if problems.is_empty() { Ok(format!("both rejected; hoist: {herr}")) } else { Err(problems.join("\n")) };
    }
    match (dout.status.success(), hout.status.success()) {
        (true, true) => {}
        (false, true) => return Err(format!("BuildKit failed but hoist succeeded:\n{}", tail(&dout.stderr, 12))),
        (true, false) => return Err(format!("hoist failed:\n{}", tail(&hout.stderr, 15))),
        (false, false) => {
            return Err(format!("both failed (fix the case):\nBuildKit:\n{}\nhoist:\n{}", tail(&dout.stderr, 8), tail(&hout.stderr, 8)))
        }
    }
    let d = read_image(dtag).map_err(|e| format!("reading BuildKit's image: {e}"))?;
    let hh = read_image(htag).map_err(|e| format!("reading hoist's image: {e}"))?;
    let mut diffs = diff_config(&d.config, &hh.config);
    diffs.extend(diff_fs(&d.fs, &hh.fs));
    if diffs.is_empty() {
        Ok(format!("identical ({} paths)", d.fs.len()))
    } else {
        const MAX: usize = 40;
        let n = diffs.len();
        let mut s = diffs.into_iter().take(MAX).collect::<Vec<_>>().join("\n");
        if n > MAX {
            s.push_str(&format!("\n... and {} more differences", n - MAX));
        }
        Err(s)
    }
}

/// One test per case (`case::<name>`), plus the harness's own check of its flattening:
/// nextest lists, selects (`cargo nextest run --test differential copy-`), runs in parallel
/// and retries each case on its own. Each case starts its own builder, so a case's result
/// never depends on which cases ran before it in the same process.
fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let mut trials = vec![libtest_mimic::Trial::test("flattening_applies_whiteouts_opaque_dirs_and_hardlinks", || {
        flattening_applies_whiteouts_opaque_dirs_and_hardlinks();
        Ok(())
    })];
    for case in load_cases() {
        trials.push(libtest_mimic::Trial::test(format!("case::{}", case.name), move || {
            if !lab_available() {
                return Ok(());
            }
            let h = Hoist::new();
            let t = std::time::Instant::now();
            let r = run_case(&h, &case);
            eprintln!("{:<40} {:>5.1}s", case.name, t.elapsed().as_secs_f64());
            match r {
                Ok(msg) => {
                    eprintln!("ok: {msg}");
                    Ok(())
                }
                Err(e) => {
                    let note = case.spec.get("note").and_then(Value::as_str).map(|n| format!("(note: {n})\n")).unwrap_or_default();
                    Err(format!("{} differs from BuildKit:\n{note}{e}", case.name).into())
                }
            }
        }));
    }
    libtest_mimic::run(&args, trials).exit();
}

/// A layer tar from `(path, kind, content)`: kind `f` file, `d` dir, `h` hardlink to content.
fn layer(entries: &[(&str, char, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, content) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mode(if *kind == 'd' { 0o755 } else { 0o644 });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match kind {
            'd' => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            'h' => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, path, content).unwrap();
            }
            _ => {
                h.set_size(content.len() as u64);
                b.append_data(&mut h, path, content.as_bytes()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn flattening_applies_whiteouts_opaque_dirs_and_hardlinks() {
    // The comparison is only as good as this: a lower file deleted, a directory made opaque,
    // hardlink groups kept apart when one member is replaced later.
    let mut fs = BTreeMap::new();
    apply_layer(
        &mut fs,
        &layer(&[
            ("a/", 'd', ""),
            ("a/x", 'f', "x"),
            ("a/y", 'f', "y"),
            ("o/", 'd', ""),
            ("o/old", 'f', "o"),
            ("h1", 'f', "h"),
            ("h2", 'h', "h1"),
            ("gone", 'f', "g"),
        ]),
        0,
    )
    .unwrap();
    apply_layer(
        &mut fs,
        &layer(&[
            ("a/.wh.x", 'f', ""),
            (".wh.gone", 'f', ""),
            ("o/", 'd', ""),
            ("o/.wh..wh..opq", 'f', ""),
            ("o/new", 'f', "n"),
            ("h2", 'f', "new"),
        ]),
        1,
    )
    .unwrap();
    let paths: Vec<&str> = fs.keys().map(String::as_str).collect();
    assert_eq!(paths, ["a", "a/y", "h1", "h2", "o", "o/new"]);
    assert_eq!(fs["h1"].inode, (0, "h1".to_string()));
    assert_eq!(fs["h2"].inode, (1, "h2".to_string()), "replacing one member breaks the hardlink");
    let mut other = fs.clone();
    other.get_mut("h2").unwrap().inode = fs["h1"].inode.clone();
    let d = diff_fs(&fs, &other);
    assert_eq!(d.len(), 2, "both members report the hardlink difference: {d:?}");
}
