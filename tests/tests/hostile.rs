//! End-to-end: hostile Dockerfiles and contexts against the real builder (issue 7).
//!
//! Every case runs on a builder shared with the other cases of its group, and is checked the
//! same way ([`run_case`]): it finishes within its bound and fails or succeeds as expected
//! (errors naming `Dockerfile:N`), no token planted outside the context appears in the
//! exported image, the output or the builder's context store, the host canary tree and the
//! case's own context are unchanged (content, modes, mtimes, no new entries), no process of
//! the case is left (its marker in /proc, `runc list`), no mount is left under the builder's
//! root, and an ordinary build on the same builder succeeds right after.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use sha2::Digest as _;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// An embedded builder with limits set through the environment of the first build.
struct Builder {
    h: Hoist,
    env: Vec<(&'static str, String)>,
}

impl Builder {
    /// A builder, started and warmed up (base image pulled) before any case is timed.
    fn new(env: &[(&'static str, &str)]) -> Builder {
        let _ = hoist_bin();
        let b = Builder { h: Hoist::new(), env: env.iter().map(|(k, v)| (*k, v.to_string())).collect() };
        b.ordinary_build("warm-up").expect("the builder starts");
        b
    }

    fn cmd(&self) -> Command {
        let mut c = self.h.cmd();
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn root(&self) -> &Path {
        self.h.root.path()
    }

    /// `hoist build --progress=plain ARGS` killed after `limit`; (success, stdout+stderr, took).
    fn build(&self, args: &[String], limit: Duration) -> (bool, String, Duration) {
        let logs = tempfile::tempdir_in(test_tmp()).unwrap();
        let out = std::fs::File::create(logs.path().join("out")).unwrap();
        let t = Instant::now();
        let mut child = self
            .cmd()
            .arg("build")
            .arg("--progress=plain")
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = t.elapsed();
        let bytes = std::fs::read(logs.path().join("out")).unwrap_or_default();
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if status.is_none() {
            text.push_str(&format!("\n[test: the build did not finish within {limit:?} and was killed]\n"));
        }
        (status.is_some_and(|s| s.success()), text, took)
    }

    /// A plain build that must succeed: the builder still serves.
    fn ordinary_build(&self, tag: &str) -> Result<(), String> {
        let ctx = context(&[("Dockerfile", &format!("FROM {}\nRUN echo ordinary-{tag} > /ok && cat /ok\n", busybox())), ("f", "x")]);
        let (ok, out, _) = self.build(&[ctx.path().display().to_string()], Duration::from_secs(120));
        if !ok || !out.contains(&format!("ordinary-{tag}")) {
            return Err(format!("the next ordinary build failed:\n{out}"));
        }
        Ok(())
    }

    /// PID of the builder process.
    fn pid(&self) -> Option<i32> {
        self.h.daemon_pid()
    }
}

/// A tree on the host, outside every context, with a token in its files: nothing a build
/// does may read it or change it.
struct Canary {
    dir: tempfile::TempDir,
    token: String,
}

const CANARY_MTIME: u64 = 1_000_000_000;

impl Canary {
    fn new() -> Canary {
        let dir = tempfile::Builder::new().prefix("hostile-canary-").tempdir_in(test_tmp()).unwrap();
        let token = format!("HOSTILE-CANARY-{}-{}", std::process::id(), unique("t"));
        let p = dir.path();
        std::fs::create_dir_all(p.join("sub/deeper")).unwrap();
        std::fs::write(p.join("secret.txt"), format!("{token}\n")).unwrap();
        std::fs::write(p.join("sub/inner.txt"), format!("inner {token}\n")).unwrap();
        std::fs::write(p.join("evil.tar"), raw_tar(&[TarEntry::file("stolen.txt", token.as_bytes())])).unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(CANARY_MTIME);
        for f in ["secret.txt", "sub/inner.txt", "evil.tar", "sub/deeper", "sub", "."] {
            let file = std::fs::File::open(p.join(f)).unwrap();
            file.set_modified(t).unwrap();
        }
        Canary { dir, token }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The canary directory as an absolute path string.
    fn abs(&self) -> String {
        self.dir.path().display().to_string()
    }
}

/// Every entry below `dir`: kind, mode, size, mtime, content digest or link target.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(base, &p, out);
                String::from("dir")
            } else {
                format!("file {}", hex::encode(sha2::Sha256::digest(std::fs::read(&p).unwrap_or_default())))
            };
            out.insert(rel, format!("{what} mode={:o} size={} mtime={}", m.mode(), if m.is_dir() { 0 } else { m.size() }, m.mtime()));
        }
    }
    let m = std::fs::symlink_metadata(dir).unwrap();
    out.insert(".".into(), format!("mode={:o} mtime={}", m.mode(), m.mtime()));
    walk(dir, dir, &mut out);
    out
}

fn diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> String {
    let mut d = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push_str(&format!("  removed {k}: {v}\n")),
            Some(w) if w != v => d.push_str(&format!("  changed {k}: {v} -> {w}\n")),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            d.push_str(&format!("  added {k}: {v}\n"));
        }
    }
    d
}

/// Whether any file below `dir` contains `needle`.
fn tree_contains(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    let rd = std::fs::read_dir(dir).ok()?;
    for e in rd.flatten() {
        let p = e.path();
        let m = std::fs::symlink_metadata(&p).ok()?;
        if m.is_dir() {
            if let Some(hit) = tree_contains(&p, needle) {
                return Some(hit);
            }
        } else if m.is_file() {
            if let Ok(b) = std::fs::read(&p) {
                if contains(&b, needle) {
                    return Some(p);
                }
            }
        }
    }
    None
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// PIDs and command lines of processes whose command line contains `needle` (not this one).
fn processes_with(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(format!("{name}: {cmd}"));
            }
        }
    }
    out
}

fn containers_left(root: &Path) -> String {
    let out = Command::new("runc").args(["--root", root.join("executor/runtime").to_str().unwrap(), "list", "-q"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What a case expects of its build.
enum Expect {
    /// It succeeds.
    Ok,
    /// It fails, and the output contains every needle.
    Fail(Vec<String>),
    /// Either (the case only checks that nothing escapes).
    Any,
}

fn fail(needles: &[&str]) -> Expect {
    Expect::Fail(needles.iter().map(|s| s.to_string()).collect())
}

type Check = Box<dyn Fn(&Outcome) -> Result<(), String>>;

/// One hostile build.
struct Case {
    name: String,
    ctx: tempfile::TempDir,
    args: Vec<String>,
    expect: Expect,
    bound: Duration,
    /// Appears in the command line of every process the case starts.
    marker: String,
    export: bool,
    check: Option<Check>,
}

/// The result a case's own check sees.
struct Outcome {
    out: String,
    image: Vec<u8>,
}

impl Case {
    fn new(name: &str, dockerfile: impl AsRef<[u8]>, files: &[(&str, &str)]) -> Case {
        let ctx = context(files);
        std::fs::write(ctx.path().join("Dockerfile"), dockerfile.as_ref()).unwrap();
        Case {
            name: name.to_string(),
            ctx,
            args: Vec::new(),
            expect: Expect::Any,
            bound: Duration::from_secs(60),
            marker: format!(
                "case-marker-{}",
                unique(&name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect::<String>())
            ),
            export: true,
            check: None,
        }
    }
    fn expect(mut self, e: Expect) -> Case {
        self.expect = e;
        self
    }
    fn within(mut self, secs: u64) -> Case {
        self.bound = Duration::from_secs(secs);
        self
    }
    fn args(mut self, a: &[&str]) -> Case {
        self.args.extend(a.iter().map(|s| s.to_string()));
        self
    }
    fn check(mut self, f: impl Fn(&Outcome) -> Result<(), String> + 'static) -> Case {
        self.check = Some(Box::new(f));
        self
    }
    fn ctx(&self) -> &Path {
        self.ctx.path()
    }
    /// Rewrite the Dockerfile (cases that need the marker in it).
    fn dockerfile(self, df: impl AsRef<[u8]>) -> Case {
        std::fs::write(self.ctx().join("Dockerfile"), df.as_ref()).unwrap();
        self
    }
}

/// Run one case and check everything the module doc lists.
fn run_case(b: &Builder, canary: &Canary, case: &Case) -> Result<(), String> {
    let pid = b.pid();
    let before_canary = snapshot(canary.path());
    let before_ctx = snapshot(case.ctx());
    let out_dir = tempfile::tempdir_in(test_tmp()).unwrap();
    let image = out_dir.path().join("image.tar");
    let mut args = case.args.clone();
    if case.export {
        args.push("-o".into());
        args.push(format!("type=tar,dest={}", image.display()));
    }
    args.push(case.ctx().display().to_string());
    // the client is killed a little after the bound, so a hang shows as a failure
    let (ok, out, took) = b.build(&args, case.bound + Duration::from_secs(30));
    let mut problems = Vec::new();
    if took > case.bound {
        problems.push(format!("took {took:?}, more than its bound of {:?}", case.bound));
    }
    match &case.expect {
        Expect::Ok if !ok => problems.push("failed, but should succeed".into()),
        Expect::Fail(_) if ok => problems.push("succeeded, but should fail".into()),
        Expect::Fail(needles) => {
            for n in needles {
                if !out.contains(n.as_str()) {
                    problems.push(format!("the error does not say {n:?}"));
                }
            }
        }
        _ => {}
    }
    if out.contains(&canary.token) {
        problems.push("the canary token is in the build output".into());
    }
    let image_bytes = std::fs::read(&image).unwrap_or_default();
    if contains(&image_bytes, canary.token.as_bytes()) {
        problems.push("the canary token is in the exported image".into());
    }
    if let Some(p) = tree_contains(&b.root().join("contexts"), canary.token.as_bytes()) {
        problems.push(format!("the canary token reached the builder's context store: {}", p.display()));
    }
    let d = diff(&before_canary, &snapshot(canary.path()));
    if !d.is_empty() {
        problems.push(format!("the host canary tree changed:\n{d}"));
    }
    let d = diff(&before_ctx, &snapshot(case.ctx()));
    if !d.is_empty() {
        problems.push(format!("the context directory changed:\n{d}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_with(&case.marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = processes_with(&case.marker);
    if !left.is_empty() {
        problems.push(format!("{} processes of the case are left, e.g. {:?}", left.len(), left.first()));
    }
    let c = containers_left(b.root());
    if !c.is_empty() {
        problems.push(format!("containers left: {c}"));
    }
    let m = mounts_under(b.root());
    if !m.is_empty() {
        problems.push(format!("mounts left under the builder's root: {m:?}"));
    }
    if let Some(check) = &case.check {
        if let Err(e) = check(&Outcome { out: out.clone(), image: image_bytes }) {
            problems.push(e);
        }
    }
    if b.pid() != pid {
        problems.push(format!("the builder did not survive: pid {pid:?} before, {:?} after", b.pid()));
    }
    if let Err(e) = b.ordinary_build(&case.marker) {
        problems.push(e);
    }
    if problems.is_empty() {
        eprintln!("ok: {} ({took:.1?})", case.name);
        Ok(())
    } else {
        let tail: String = out.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        Err(format!("case {:?}:\n - {}\n  output ends with:\n{tail}\n", case.name, problems.join("\n - ")))
    }
}

/// Run every case, reporting all failures at once.
fn run_all(b: &Builder, canary: &Canary, cases: Vec<Case>) {
    let n = cases.len();
    let failures: Vec<String> = cases.iter().filter_map(|c| run_case(b, canary, c).err()).collect();
    assert!(failures.is_empty(), "{} of {n} cases failed:\n{}", failures.len(), failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Tar archives with hostile entries (the tar crate refuses to write them)
// ---------------------------------------------------------------------------------------

struct TarEntry {
    name: Vec<u8>,
    kind: u8,
    link: Vec<u8>,
    data: Vec<u8>,
    mode: u32,
}

impl TarEntry {
    fn file(name: &str, data: &[u8]) -> TarEntry {
        TarEntry { name: name.into(), kind: b'0', link: Vec::new(), data: data.to_vec(), mode: 0o644 }
    }
    fn dir(name: &str) -> TarEntry {
        TarEntry { name: name.into(), kind: b'5', link: Vec::new(), data: Vec::new(), mode: 0o755 }
    }
    fn symlink(name: &str, target: &str) -> TarEntry {
        TarEntry { name: name.into(), kind: b'2', link: target.into(), data: Vec::new(), mode: 0o777 }
    }
    fn hardlink(name: &str, target: &str) -> TarEntry {
        TarEntry { name: name.into(), kind: b'1', link: target.into(), data: Vec::new(), mode: 0o644 }
    }
    fn device(name: &str) -> TarEntry {
        TarEntry { name: name.into(), kind: b'3', link: Vec::new(), data: Vec::new(), mode: 0o666 }
    }
}

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0width$o}\0", v, width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

/// A ustar archive, names written as given (`..`, absolute, anything).
fn raw_tar(entries: &[TarEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = [0u8; 512];
        assert!(e.name.len() <= 100 && e.link.len() <= 100, "names up to 100 bytes");
        h[..e.name.len()].copy_from_slice(&e.name);
        octal(&mut h[100..108], e.mode as u64);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], e.data.len() as u64);
        octal(&mut h[136..148], 1_600_000_000);
        h[156] = e.kind;
        h[157..157 + e.link.len()].copy_from_slice(&e.link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|b| *b as u64).sum();
        let ck = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(ck.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&e.data);
        let pad = (512 - e.data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

/// Entries of a tar (path → content for files, "-> target" for links), from `-o type=tar`.
fn tar_listing(bytes: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(bytes);
    if let Ok(entries) = ar.entries() {
        for e in entries.flatten() {
            let mut e = e;
            let path = e.path().map(|p| p.display().to_string()).unwrap_or_default();
            let what = match e.header().entry_type() {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    format!("-> {}", e.link_name().ok().flatten().map(|l| l.display().to_string()).unwrap_or_default())
                }
                tar::EntryType::Directory => "dir".into(),
                _ => {
                    let mut s = String::new();
                    let _ = std::io::Read::read_to_string(&mut e, &mut s);
                    s
                }
            };
            out.insert(path.trim_start_matches("./").trim_end_matches('/').to_string(), what);
        }
    }
    out
}

/// A check that the image has `path` with content `want`.
fn has_file(path: &'static str, want: &'static str) -> impl Fn(&Outcome) -> Result<(), String> {
    move |o: &Outcome| {
        let l = tar_listing(&o.image);
        match l.get(path) {
            Some(got) if got == want => Ok(()),
            other => Err(format!("the image should have {path} = {want:?}, has {other:?}")),
        }
    }
}

fn relative_to_canary(from: &Path, canary: &Canary) -> String {
    let depth = from.components().count();
    format!("{}{}", "../".repeat(depth + 2), canary.abs().trim_start_matches('/'))
}

// ---------------------------------------------------------------------------------------
// Reads outside the context
// ---------------------------------------------------------------------------------------

fn read_cases(c: &Canary) -> Vec<Case> {
    let bb = busybox();
    let abs = c.abs();
    let canary_name = c.path().file_name().unwrap().to_string_lossy().into_owned();
    let mut cases = Vec::new();
    let symlink = |case: &Case, name: &str, target: &str| std::os::unix::fs::symlink(target, case.ctx().join(name)).unwrap();

    cases.push(Case::new("COPY ../x", format!("FROM {bb}\nCOPY ../{canary_name}/secret.txt /x\n"), &[]).expect(fail(&["Dockerfile:2"])));
    cases.push(
        Case::new("COPY ../../.. to the canary", format!("FROM {bb}\nCOPY ../../../../../../{abs}/secret.txt /x\n"), &[])
            .expect(fail(&["Dockerfile:2"])),
    );
    cases.push(
        Case::new("COPY an absolute host path", format!("FROM {bb}\nCOPY {abs}/secret.txt /x\n"), &[]).expect(fail(&["Dockerfile:2"])),
    );
    cases.push(
        Case::new("COPY a wildcard climbing out", format!("FROM {bb}\nCOPY ../*/secret.txt ../*/*/inner.txt /x/\n"), &[("keep", "k")])
            .expect(Expect::Any),
    );

    let case = Case::new("symlinked file, absolute target", format!("FROM {bb}\nCOPY link /x\n"), &[]);
    symlink(&case, "link", &format!("{abs}/secret.txt"));
    cases.push(case.expect(fail(&["Dockerfile:2"])));

    let case = Case::new("symlinked file, relative .. target", format!("FROM {bb}\nCOPY link /x\n"), &[]);
    let rel = relative_to_canary(case.ctx(), c);
    symlink(&case, "link", &format!("{rel}/secret.txt"));
    cases.push(case.expect(fail(&["Dockerfile:2"])));

    let case = Case::new("symlinked directory, absolute target", format!("FROM {bb}\nCOPY dirlink/secret.txt /x\n"), &[]);
    symlink(&case, "dirlink", &abs);
    cases.push(case.expect(fail(&["Dockerfile:2"])));

    let case = Case::new("symlinked directory, relative target, copied whole", format!("FROM {bb}\nCOPY dirlink/ /x/\n"), &[]);
    let rel = relative_to_canary(case.ctx(), c);
    symlink(&case, "dirlink", &rel);
    cases.push(case.expect(Expect::Any));

    let case = Case::new("symlink chain out", format!("FROM {bb}\nCOPY a /x\n"), &[]);
    symlink(&case, "a", "b");
    symlink(&case, "b", "sub/../c");
    symlink(&case, "c", &format!("{abs}/sub"));
    std::fs::create_dir(case.ctx().join("sub")).unwrap();
    cases.push(case.expect(fail(&["Dockerfile:2"])));

    let case = Case::new("symlink loop", format!("FROM {bb}\nCOPY a /x\n"), &[]);
    symlink(&case, "a", "b");
    symlink(&case, "b", "a");
    cases.push(case.expect(fail(&["Dockerfile:2", "too many levels of symbolic links"])).within(30));

    let case = Case::new("chain of 60 links", format!("FROM {bb}\nCOPY l0 /x\n"), &[("end", "end")]);
    for i in 0..60 {
        symlink(&case, &format!("l{i}"), &format!("l{}", i + 1));
    }
    symlink(&case, "l60", "end");
    // the client refuses this one while finding what the Dockerfile reads, naming the context
    cases.push(case.expect(fail(&["too many levels of symbolic links"])).within(30));

    let case =
        Case::new("the whole context with links out is copied as links", format!("FROM {bb}\nCOPY . /ctx/\n"), &[("plain", "plain")]);
    symlink(&case, "abs", &format!("{abs}/secret.txt"));
    let rel = relative_to_canary(case.ctx(), c);
    symlink(&case, "rel", &rel);
    cases.push(case.expect(Expect::Ok).check(|o| {
        let l = tar_listing(&o.image);
        match (l.get("ctx/abs"), l.get("ctx/plain")) {
            (Some(a), Some(p)) if a.starts_with("-> ") && p == "plain" => Ok(()),
            other => Err(format!("the links should be copied as links: {other:?}")),
        }
    }));

    cases.push(
        Case::new(
            "COPY --from a stage whose symlink names a host file",
            format!("FROM {bb} AS s\nRUN ln -s {abs}/secret.txt /leak && ln -s {abs} /leakdir\nFROM {bb}\nCOPY --from=s /leak /x\n"),
            &[],
        )
        .expect(fail(&["Dockerfile:4"])),
    );
    cases.push(
        Case::new(
            "COPY --from a stage through a symlinked host directory",
            format!("FROM {bb} AS s\nRUN ln -s {abs} /leakdir\nFROM {bb}\nCOPY --from=s /leakdir/sub/ /x/\n"),
            &[],
        )
        .expect(fail(&["Dockerfile:4"])),
    );
    cases.push(
        Case::new(
            "COPY --from a stage, symlink with .. out of its root",
            format!("FROM {bb} AS s\nRUN ln -s ../../../../../../../../..{abs}/secret.txt /up\nFROM {bb}\nCOPY --from=s /up /x\n"),
            &[],
        )
        .expect(fail(&["Dockerfile:4"])),
    );

    let case = Case::new("ADD a tar whose hard link names a host file", format!("FROM {bb}\nADD evil.tar /dst/\n"), &[]);
    std::fs::write(
        case.ctx().join("evil.tar"),
        raw_tar(&[TarEntry::hardlink("h1", &format!("{abs}/secret.txt")), TarEntry::file("after", b"x")]),
    )
    .unwrap();
    cases.push(case.expect(fail(&["Dockerfile:2", "hard link"])));

    let case = Case::new("ADD a tar whose hard link climbs with ..", format!("FROM {bb}\nADD evil.tar /dst/\n"), &[]);
    std::fs::write(case.ctx().join("evil.tar"), raw_tar(&[TarEntry::hardlink("h2", &format!("../../../../../..{abs}/secret.txt"))]))
        .unwrap();
    cases.push(case.expect(fail(&["Dockerfile:2", "hard link"])));

    let case = Case::new("ADD a symlink to a host archive", format!("FROM {bb}\nADD arch.tar /dst/\n"), &[]);
    symlink(&case, "arch.tar", &format!("{abs}/evil.tar"));
    cases.push(case.expect(fail(&["Dockerfile:2"])));

    cases.push(
        Case::new(
            ".dockerignore patterns with ..",
            format!("FROM {bb}\nCOPY . /ctx/\n"),
            &[("kept", "k"), (".dockerignore", &format!("*\n!kept\n!../{canary_name}\n!../{canary_name}/**\n!{abs}/secret.txt\n"))],
        )
        .expect(Expect::Ok),
    );
    cases.push(
        Case::new("build-arg expanding to a .. path", format!("FROM {bb}\nARG P\nCOPY ${{P}}/secret.txt /x\n"), &[])
            .args(&["--build-arg", &format!("P=../{canary_name}")])
            .expect(fail(&["Dockerfile:3"])),
    );
    cases.push(
        Case::new("build-arg expanding to an absolute path", format!("FROM {bb}\nARG P\nADD ${{P}} /x\n"), &[])
            .args(&["--build-arg", &format!("P={abs}/evil.tar")])
            .expect(fail(&["Dockerfile:3"])),
    );
    cases.push(
        Case::new("ADD file:// URL of a host file", format!("FROM {bb}\nADD file://{abs}/secret.txt /x\n"), &[])
            .expect(fail(&["Dockerfile:2"])),
    );

    let case = Case::new("RUN --mount=type=bind of ../", "", &[("in", "inside")]);
    let m = case.marker.clone();
    cases.push(
        case.dockerfile(format!(
            "FROM {bb}\nRUN --mount=type=bind,source=../../..,target=/m echo {m}; ls -la /m; cat /m/{canary_name}/secret.txt /m{abs}/secret.txt /m/in; true\n"
        ))
        .expect(Expect::Ok)
        .check(|o| if o.out.contains("inside") { Ok(()) } else { Err("the mount should show the context".into()) }),
    );

    let case = Case::new("RUN --mount=type=bind of a symlink out", "", &[]);
    symlink(&case, "out", &abs);
    let m = case.marker.clone();
    cases.push(
        case.dockerfile(format!("FROM {bb}\nRUN --mount=type=bind,source=out,target=/m echo {m}; cat /m/secret.txt\n"))
            .expect(fail(&["Dockerfile:2"])),
    );

    let case = Case::new("RUN --mount=type=bind from a stage through a host symlink", "", &[]);
    let m = case.marker.clone();
    cases.push(
        case.dockerfile(format!("FROM {bb} AS s\nRUN ln -s {abs} /hostdir\nFROM {bb}\nRUN --mount=type=bind,from=s,source=/hostdir,target=/m echo {m}; cat /m/secret.txt\n"))
            .expect(fail(&["Dockerfile:4"])),
    );
    cases
}

#[test]
fn reads_outside_the_context_are_impossible() {
    if !lab_available() {
        return;
    }
    let canary = Canary::new();
    let b = Builder::new(&[]);
    let cases = read_cases(&canary);
    run_all(&b, &canary, cases);
}

// ---------------------------------------------------------------------------------------
// Writes outside the build root
// ---------------------------------------------------------------------------------------

fn write_cases(c: &Canary) -> Vec<Case> {
    let bb = busybox();
    let abs = c.abs();
    let mut cases = Vec::new();
    let add_tar = |name: &str, entries: &[TarEntry]| {
        let case = Case::new(name, format!("FROM {bb}\nADD evil.tar /dst/\n"), &[]);
        std::fs::write(case.ctx().join("evil.tar"), raw_tar(entries)).unwrap();
        case
    };

    cases.push(
        add_tar("tar entry with ..", &[TarEntry::file(&format!("../../../../../../../..{abs}/pwn"), b"dotdot")]).expect(Expect::Ok).check(
            move |o| {
                let l = tar_listing(&o.image);
                let inside = l.iter().any(|(k, v)| k.ends_with("/pwn") && v == "dotdot");
                if inside {
                    Ok(())
                } else {
                    Err("the .. entry should land inside the image".into())
                }
            },
        ),
    );
    let abs2 = abs.clone();
    cases.push(
        add_tar("tar entry with an absolute name", &[TarEntry::file(&format!("{abs}/pwn-abs"), b"absolute")]).expect(Expect::Ok).check(
            move |o| {
                let l = tar_listing(&o.image);
                let want = format!("dst{abs2}/pwn-abs");
                if l.get(&want).map(String::as_str) == Some("absolute") {
                    Ok(())
                } else {
                    Err(format!("expected {want} in the image"))
                }
            },
        ),
    );
    cases.push(
        add_tar(
            "tar writes through a symlink it created (absolute)",
            &[TarEntry::symlink("l", &abs), TarEntry::file("l/pwn-through", b"through")],
        )
        .expect(Expect::Ok),
    );
    cases.push(
        add_tar(
            "tar writes through a symlink it created (..)",
            &[TarEntry::symlink("up", "../../../../../../../.."), TarEntry::dir("up/x"), TarEntry::file(&format!("up{abs}/pwn-up"), b"up")],
        )
        .expect(Expect::Ok),
    );
    cases.push(
        add_tar(
            "tar replaces a directory with a symlink, then writes into it",
            &[TarEntry::dir("d"), TarEntry::symlink("d", &abs), TarEntry::file("d/pwn-replaced", b"r")],
        )
        .expect(Expect::Ok),
    );
    cases.push(add_tar("tar with a device node", &[TarEntry::device("dev0")]).expect(fail(&["Dockerfile:2", "unsupported entry type"])));

    cases.push(
        Case::new(
            "WORKDIR through a symlink to a host dir",
            format!("FROM {bb}\nRUN ln -s {abs} /escape\nWORKDIR /escape/newdir\nRUN touch made-here\n"),
            &[],
        )
        .expect(Expect::Ok),
    );
    cases.push(
        Case::new(
            "COPY dest through a symlink to a host dir",
            format!("FROM {bb}\nRUN ln -s {abs} /out && ln -s {abs}/secret.txt /outfile\nCOPY f /out/\nCOPY f /outfile\n"),
            &[("f", "written")],
        )
        .expect(Expect::Any),
    );
    cases.push(
        Case::new("COPY dest with ..", format!("FROM {bb}\nCOPY f ../../../../..{abs}/pwn-copy\n"), &[("f", "copied")]).expect(Expect::Ok),
    );
    cases.push(
        Case::new(
            "COPY --link dest through .. and a symlink",
            format!("FROM {bb}\nRUN ln -s {abs} /lnk\nCOPY --link f /lnk/../../../..{abs}/pwn-link\n"),
            &[("f", "linked")],
        )
        .expect(Expect::Any),
    );

    let case = Case::new("RUN --mount=type=bind,rw writes", "", &[("keep.txt", "original"), ("sub/", "")]);
    let m = case.marker.clone();
    cases.push(
        case.dockerfile(format!(
            "FROM {bb}\nRUN --mount=type=bind,rw,target=/ctx echo {m}; echo changed > /ctx/keep.txt; touch /ctx/new; rm -rf /ctx/sub; ln -s {abs} /ctx/link; echo pwn > /ctx/link/pwn-rw || true\nCOPY keep.txt /after\n"
        ))
        .expect(Expect::Ok)
        .check(has_file("after", "original")),
    );
    let case = Case::new("RUN --mount=type=bind,rw of a stage writes nothing back", "", &[]);
    let m = case.marker.clone();
    cases.push(
        case.dockerfile(format!(
            "FROM {bb} AS s\nRUN echo stage > /f\nFROM {bb}\nRUN --mount=type=bind,from=s,rw,target=/s echo {m}; echo changed > /s/f\nCOPY --from=s /f /after\n"
        ))
        .expect(Expect::Ok)
        .check(has_file("after", "stage\n")),
    );
    let up = "../".repeat(20);
    let case = Case::new("cache id=../../x", "", &[]);
    let m = case.marker.clone();
    cases.push(
        case.dockerfile(format!(
            "FROM {bb}\nRUN --mount=type=cache,id={up}{abs},target=/c echo {m}; echo pwn > /c/pwn-cache; ls /c\nRUN --mount=type=cache,id=/{abs},target=/c touch /c/pwn-cache2\n"
        ))
        .expect(Expect::Ok),
    );

    let secret_file = tempfile::NamedTempFile::new_in(test_tmp()).unwrap();
    std::fs::write(secret_file.path(), &c.token).unwrap();
    let (_keep, secret_path) = secret_file.keep().unwrap();
    let case = Case::new("secrets are never in a layer or the log", "", &[]);
    let m = case.marker.clone();
    cases.push(
        case.dockerfile(format!(
            "FROM {bb}\nRUN --mount=type=secret,id=s,target=/run/secrets/s echo {m}; test -s /run/secrets/s && ls -la /run/secrets && echo secret-was-there\nRUN --mount=type=secret,id=s,env=SECRET_VAR test -n \"$SECRET_VAR\"\nRUN --mount=type=secret,id=s,target=/etc/passwd-secret true\n"
        ))
        .args(&["--secret", &format!("id=s,src={}", secret_path.display())])
        .expect(Expect::Ok)
        .check(|o| {
            let l = tar_listing(&o.image);
            if !o.out.contains("secret-was-there") {
                return Err("the secret should have been mounted".into());
            }
            if l.keys().any(|k| k.contains("run/secrets/s") || k.contains("passwd-secret")) {
                return Err("a secret mount point was left in the layer".into());
            }
            Ok(())
        }),
    );
    cases
}

#[test]
fn writes_outside_the_build_root_are_impossible() {
    if !lab_available() {
        return;
    }
    let canary = Canary::new();
    let b = Builder::new(&[]);
    let cases = write_cases(&canary);
    run_all(&b, &canary, cases);
    // Nothing a case wrote appears next to the builder's root either.
    let parent = b.root().parent().unwrap();
    for name in ["pwn", "pwn-cache", "pwn-abs", "pwn-copy"] {
        assert!(!parent.join(name).exists(), "{name} was written outside the builder's root");
    }
}

// ---------------------------------------------------------------------------------------
// Bounds
// ---------------------------------------------------------------------------------------

fn tight_builder() -> Builder {
    Builder::new(&[
        ("HOIST_RUN_TIMEOUT", "6s"),
        ("HOIST_MAX_CONTEXT_ENTRIES", "2000"),
        ("HOIST_MAX_CONTEXT_BYTES", "8M"),
        ("HOIST_MAX_ARCHIVE_ENTRIES", "1000"),
        ("HOIST_MAX_STEP_LOG", "1M"),
        ("HOIST_MAX_INSTRUCTIONS", "20000"),
        ("HOIST_MAX_DOCKERFILE_BYTES", "4M"),
    ])
}

fn bound_cases_default(_c: &Canary) -> Vec<Case> {
    let bb = busybox();
    let mut cases = Vec::new();
    let mut huge = format!("FROM {bb}\n");
    while huge.len() < 3 << 20 {
        huge.push_str("# a comment line to make the Dockerfile larger than the builder accepts\n");
    }
    huge.push_str("RUN true\n");
    cases.push(Case::new("huge Dockerfile", huge, &[]).expect(fail(&["Dockerfile:", "more than the builder accepts"])).within(20));
    let mut many = format!("FROM {bb}\n");
    for i in 0..10_000 {
        many.push_str(&format!("ENV V{i}={i}\n"));
    }
    cases.push(
        Case::new("10,000 instructions are refused at once", many, &[]).expect(fail(&["Dockerfile:4097", "instructions"])).within(10),
    );
    cases.push(
        Case::new("ENV doubling itself 40 times", format!("FROM {bb}\nENV A=x\n{}", "ENV A=$A$A\n".repeat(40)), &[])
            .expect(fail(&["Dockerfile:2", "bytes"]))
            .within(10),
    );
    let chain: String = (1..=12).map(|i| format!("ARG A{i}=$A{p}$A{p}$A{p}$A{p}\n", p = i - 1)).collect();
    cases.push(
        Case::new("ARG quadrupling from a build-arg", format!("FROM {bb}\nARG A0\n{chain}"), &[])
            .args(&["--build-arg", "A0=xy"])
            .expect(fail(&["Dockerfile:", "bytes"]))
            .within(10),
    );
    let deep = format!("{}x{}", "${a:-".repeat(20_000), "}".repeat(20_000));
    cases.push(
        Case::new("deep nesting of ${...}", format!("FROM {bb}\nENV B={deep}\n"), &[]).expect(fail(&["Dockerfile:2", "nested"])).within(10),
    );
    cases.push(
        Case::new("a huge line", format!("FROM {bb}\nRUN echo {}\n", "z".repeat(300 << 10)), &[])
            .expect(fail(&["Dockerfile:2", "bytes long"]))
            .within(10),
    );
    cases.push(
        Case::new(
            "a RUN longer than the kernel accepts fails naming its line",
            format!("FROM {bb}\nRUN echo {}\n", "w".repeat(200 << 10)),
            &[],
        )
        .expect(fail(&["Dockerfile:2"]))
        .within(30)
        .check(|o| if o.out.contains("h2 protocol") { Err("the error broke the connection".into()) } else { Ok(()) }),
    );
    cases.push(
        Case::new("ONBUILD ONBUILD ... chained 20,000 deep", format!("FROM {bb}\n{}RUN true\n", "ONBUILD ".repeat(20_000)), &[])
            .expect(fail(&["Dockerfile:2", "ONBUILD"]))
            .within(10),
    );
    cases.push(
        Case::new(
            "pattern substitution on a large value",
            format!("FROM {bb}\nARG A=ab\n{}ENV B=${{A//?/x}} C=${{A%%b*}} D=${{A##*a}}\n", "ARG A=$A$A\n".repeat(17)),
            &[],
        )
        .expect(Expect::Ok)
        .within(30),
    );
    let case = Case::new("decompression bomb ADD", format!("FROM {bb}\nADD bomb.tar.gz /bomb/\n"), &[]);
    {
        let f = std::fs::File::create(case.ctx().join("bomb.tar.gz")).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::best());
        let mut head = raw_tar(&[TarEntry::file("zeros", b"")]);
        head.truncate(512);
        // a header claiming 256 MiB, then the zeros (~1000x smaller compressed)
        let size = 256u64 << 20;
        octal(&mut head[124..136], size);
        head[148..156].copy_from_slice(b"        ");
        let sum: u64 = head.iter().map(|b| *b as u64).sum();
        head[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        gz.write_all(&head).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(size >> 20) + 2 {
            gz.write_all(&zeros).unwrap();
        }
        gz.finish().unwrap();
    }
    cases.push(case.expect(fail(&["Dockerfile:2", "decompression bomb"])).within(60));
    cases
}

fn bound_cases_tight(_c: &Canary) -> Vec<Case> {
    let bb = busybox();
    let mut cases = Vec::new();
    let mut many = format!("FROM {bb}\n");
    for i in 0..5_000 {
        many.push_str(&format!("ENV V{i}={i}\nLABEL l{i}=v{i}\n"));
    }
    cases.push(Case::new("10,000 instructions finish in seconds where allowed", many, &[]).expect(Expect::Ok).within(30));

    let case = Case::new("context with too many entries", format!("FROM {bb}\nCOPY . /c/\n"), &[]);
    for i in 0..2500 {
        std::fs::write(case.ctx().join(format!("f{i}")), i.to_string()).unwrap();
    }
    cases.push(case.expect(fail(&["--max-context-entries"])).within(60));
    let case = Case::new("context too large", format!("FROM {bb}\nCOPY . /c/\n"), &[]);
    std::fs::write(case.ctx().join("big"), vec![7u8; 10 << 20]).unwrap();
    cases.push(case.expect(fail(&["--max-context-bytes"])).within(60));
    let case = Case::new("archive with too many entries", format!("FROM {bb}\nADD many.tar /m/\n"), &[]);
    let entries: Vec<TarEntry> = (0..1500).map(|i| TarEntry::file(&format!("e{i}"), b"")).collect();
    std::fs::write(case.ctx().join("many.tar"), raw_tar(&entries)).unwrap();
    cases.push(case.expect(fail(&["Dockerfile:2", "more than 1000 entries"])).within(60));

    let case = Case::new("RUN timeout", "", &[]);
    let m = case.marker.clone();
    cases.push(
        case.dockerfile(format!("FROM {bb}\nRUN echo {m}; sleep 3000\n"))
            .expect(fail(&["Dockerfile:2", "did not finish within 6s"]))
            .within(30),
    );
    let case = Case::new("fork storm stopped by the RUN timeout", "", &[]);
    let m = case.marker.clone();
    cases.push(
        case.dockerfile(format!("FROM {bb}\nRUN echo {m}; f() {{ f | f & }}; f; sleep 1000\n"))
            .expect(fail(&["Dockerfile:2", "did not finish within 6s"]))
            .within(45),
    );
    let case = Case::new("infinite output (yes)", "", &[]);
    let m = case.marker.clone();
    cases.push(
        case.dockerfile(format!("FROM {bb}\nRUN echo {m}; yes {m}\n"))
            .expect(fail(&["Dockerfile:2", "did not finish within 6s", "output clipped"]))
            .within(30)
            .check(|o| if o.out.len() < 3 << 20 { Ok(()) } else { Err(format!("{} bytes of output reached the client", o.out.len())) }),
    );
    let case = Case::new("a background process outliving its RUN", "", &[]);
    let m = case.marker.clone();
    cases.push(case.dockerfile(format!("FROM {bb}\nRUN (sleep 3000; echo {m}) & echo started {m}\n")).expect(Expect::Ok).within(30));
    cases
}

#[test]
fn bounds_hold_and_the_builder_keeps_serving() {
    if !lab_available() {
        return;
    }
    let canary = Canary::new();
    let b = Builder::new(&[]);
    let cases = bound_cases_default(&canary);
    run_all(&b, &canary, cases);
    let b = tight_builder();
    let cases = bound_cases_tight(&canary);
    run_all(&b, &canary, cases);
}

/// Kills a child process (a `hoist build` client) if a test fails while it runs.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pids cgroup directories of the steps running on a builder (one per container bundle;
/// the executor names a step's cgroup `hoist/<container id>`, below the builder's own
/// cgroup, which is this test's: on a host it is the root, in a container it is not),
/// cgroup v1 or v2. Found without scanning /proc, which is slow while a fork storm runs.
fn step_cgroups(root: &Path) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own_in =
        |ctrl: &str| own.lines().find_map(|l| l.splitn(3, ':').nth(2).filter(|_| l.split(':').nth(1) == Some(ctrl))).unwrap_or("/");
    let (pids, unified) = (own_in("pids").trim_end_matches('/'), own_in("").trim_end_matches('/'));
    // runc's v2 manager places relative paths below the parent of the own cgroup.
    let v2_parent = unified.rsplit_once('/').map_or("", |(p, _)| p);
    let mut out = Vec::new();
    for e in std::fs::read_dir(root.join("executor/bundles")).into_iter().flatten().flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let bases = [
            format!("/sys/fs/cgroup/pids{pids}"),
            format!("/sys/fs/cgroup{v2_parent}"),
            format!("/sys/fs/cgroup/unified{unified}"),
            "/sys/fs/cgroup/pids".into(),
        ];
        for base in bases {
            let d = PathBuf::from(format!("{base}/hoist/{id}"));
            if d.join("pids.current").exists() {
                out.push(d);
                break;
            }
        }
    }
    out
}

fn pids_in(cgroup: &Path) -> u64 {
    std::fs::read_to_string(cgroup.join("pids.current")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// Cancelling a build during a fork storm kills every process of the step (zombies and all:
/// the step's pids cgroup empties) and removes its mounts; the builder serves the next build.
#[test]
fn a_cancelled_fork_storm_leaves_nothing() {
    if !lab_available() {
        return;
    }
    let b = Builder::new(&[]);
    let pid_before = b.pid();
    let marker = unique("storm");
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo started-{marker}; f() {{ f | f & }}; f; sleep 120; echo {marker}\n", busybox()),
    )]);
    let mut child = KillOnDrop(
        b.cmd()
            .args(["build", "--progress=plain", ctx.path().to_str().unwrap()])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("the RUN never started");
        if line.contains(&format!("started-{marker}")) && !line.contains("RUN") {
            break;
        }
    }
    eprintln!("the step started after {:?}", started.elapsed());
    // let the storm grow (to the pids limit, given time); its processes die and linger as
    // zombies, so count them through the step's pids cgroup
    let grow = Instant::now();
    let mut seen: Option<(PathBuf, u64)> = None;
    while grow.elapsed() < Duration::from_secs(10) {
        if let Some(cg) = step_cgroups(b.root()).into_iter().next() {
            let most = seen.as_ref().map_or(0, |s| s.1).max(pids_in(&cg));
            seen = Some((cg, most));
            if most > 1000 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (cgroup, during) = seen.expect("the step has a pids cgroup");
    assert!(during > 50, "the storm should be running ({during} processes at most in {})", cgroup.display());
    Command::new("kill").args(["-INT", &child.0.id().to_string()]).status().unwrap();
    let t = Instant::now();
    let status = child.0.wait().unwrap();
    assert!(!status.success());
    let pids_left = || pids_in(&cgroup);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && (pids_left() > 0 || !mounts_under(b.root()).is_empty()) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("storm of {during} processes; cancelled and gone in {:?}", t.elapsed());
    assert_eq!(pids_left(), 0, "processes of the step left in {} after {:?}", cgroup.display(), t.elapsed());
    assert!(processes_with(&marker).is_empty(), "processes left: {:?}", processes_with(&marker).first());
    assert!(mounts_under(b.root()).is_empty(), "mounts left: {:?}", mounts_under(b.root()));
    assert_eq!(containers_left(b.root()), "", "containers left");
    assert_eq!(b.pid(), pid_before, "the builder survived");
    let t = Instant::now();
    b.ordinary_build("after-storm").unwrap();
    eprintln!("the next build took {:?}", t.elapsed());
}

/// A client that does not read its progress stream: the builder's memory stays bounded
/// (output is dropped with a marker), and it serves other builds meanwhile.
#[test]
fn a_slow_client_does_not_grow_the_builder() {
    if !lab_available() {
        return;
    }
    let b = Builder::new(&[("HOIST_MAX_STEP_LOG", "256M")]);
    b.ordinary_build("warm-up").unwrap();
    let marker = unique("flood");
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN yes {marker}-{} | head -c 200000000; echo done-{marker}\n", busybox(), "y".repeat(200)),
    )]);
    // stderr is a pipe nobody reads for a while: the client blocks, then stops reading its stream
    let mut child = KillOnDrop(
        b.cmd()
            .args(["build", "--progress=plain", ctx.path().to_str().unwrap()])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = b.pid().or_else(|| {
        std::thread::sleep(Duration::from_secs(2));
        b.pid()
    });
    let rss = |pid: i32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let base = pid.map(rss).unwrap_or(0);
    let mut peak = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(12) {
        if let Some(p) = pid {
            peak = peak.max(rss(p));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // meanwhile another build is served
    b.ordinary_build("while-flooded").unwrap();
    // now read everything
    let mut out = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut out).unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{}", &out[out.len().saturating_sub(2000)..]);
    assert!(out.contains("bytes of output dropped"), "the client is told output was dropped");
    assert!(out.len() < 64 << 20, "{} bytes of output", out.len());
    eprintln!("builder RSS {base} KiB before, {peak} KiB at most; {} bytes of output reached the client", out.len());
    // 200 MB of output went by; the builder may hold its bounded queues, not the flood
    assert!(peak < base + 100 * 1024, "the builder grew from {base} KiB to {peak} KiB while the client did not read");
}

// ---------------------------------------------------------------------------------------
// Errors name the line
// ---------------------------------------------------------------------------------------

fn error_cases() -> Vec<Case> {
    let bb = busybox();
    let mut cases = Vec::new();
    cases.push(
        Case::new("NUL byte", format!("FROM {bb}\nRUN echo a\0b\n").into_bytes(), &[]).expect(fail(&["Dockerfile:2: NUL byte"])).within(20),
    );
    let mut bad = format!("FROM {bb}\n# fine\nLABEL x=").into_bytes();
    bad.extend_from_slice(b"\xff\xfe\n");
    cases.push(Case::new("invalid UTF-8", bad, &[]).expect(fail(&["Dockerfile:3: invalid UTF-8"])).within(20));
    let utf16: Vec<u8> = "FROM busybox\n".encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    let mut bom = vec![0xff, 0xfe];
    bom.extend(utf16);
    cases.push(Case::new("a UTF-16 Dockerfile", bom, &[]).expect(fail(&["Dockerfile:1:"])).within(20));
    cases.push(
        Case::new("over-long line", format!("FROM {bb}\nRUN true\nLABEL a={}\n", "q".repeat(400 << 10)), &[])
            .expect(fail(&["Dockerfile:3: line is"]))
            .within(20),
    );
    for (name, r) in
        [("uppercase", "Busybox"), ("empty tag", "busybox:"), ("bad digest", "busybox@sha256:xyz"), ("spaces in a build-arg ref", "${IMG}")]
    {
        cases.push(
            Case::new(&format!("bad FROM reference ({name})"), format!("# syntax check\nARG IMG=\"a b\"\nFROM {r}\nRUN true\n"), &[])
                .expect(fail(&["Dockerfile:3:"]))
                .within(20),
        );
    }
    cases.push(
        Case::new("unterminated heredoc", format!("FROM {bb}\nRUN <<EOF\necho hi\n"), &[])
            .expect(fail(&["Dockerfile:2:", "heredoc"]))
            .within(20),
    );
    cases.push(
        Case::new(".dockerignore that is not UTF-8", format!("FROM {bb}\nCOPY . /c/\n"), &[])
            .expect(fail(&[".dockerignore", "UTF-8"]))
            .within(20),
    );
    if let Some(c) = cases.last() {
        std::fs::write(c.ctx().join(".dockerignore"), b"secret\xff\n").unwrap();
    }
    cases
}

#[test]
fn every_dockerfile_error_names_its_line() {
    if !lab_available() {
        return;
    }
    let canary = Canary::new();
    let b = Builder::new(&[]);
    run_all(&b, &canary, error_cases());
}
