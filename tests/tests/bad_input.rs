//! End-to-end: bad input gets a clear error and loses nothing (issue 3's "Bad input").

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
            }
        }
    }
    out
}

/// Ctrl-C during a RUN: the container is killed, mounts removed, the store stays
/// consistent and the next build is correct.
#[test]
fn ctrl_c_during_a_run_kills_the_step_and_cleans_up() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let marker = unique("sleeper");
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo started-{marker} && sleep 3{}\n", busybox(), std::process::id() % 100 + 300),
    )]);
    let mut child = h
        .cmd()
        .args(["build", "--progress=plain", ctx.path().to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("the RUN never started");
        seen.push_str(&line);
        seen.push('\n');
        // The step's own output, not the line announcing the step.
        if line.contains(&format!("started-{marker}")) && !line.contains("RUN") {
            break;
        }
    }
    let sleep_cmd = format!("sleep 3{}", std::process::id() % 100 + 300);
    // The shell printed the marker; it starts `sleep` next (a moment later on a busy machine).
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes_with(&sleep_cmd).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!processes_with(&sleep_cmd).is_empty(), "the step's process runs");
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let t = Instant::now();
    let status = child.wait().unwrap();
    assert!(!status.success(), "a cancelled build does not succeed");
    assert!(t.elapsed() < Duration::from_secs(15), "the client exits promptly");
    // The builder notices the client is gone and kills the step.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && (!processes_with(&sleep_cmd).is_empty() || !mounts_under(h.root.path()).is_empty()) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(processes_with(&sleep_cmd).is_empty(), "step process still running: {:?}", processes_with(&sleep_cmd));
    assert!(mounts_under(h.root.path()).is_empty(), "mounts left: {:?}", mounts_under(h.root.path()));
    let runc =
        Command::new("runc").args(["--root", h.root.path().join("executor/runtime").to_str().unwrap(), "list", "-q"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&runc.stdout).trim(), "", "containers left");
    // The same builder still builds correctly.
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {}\nRUN echo ok > /ok\n", busybox())).unwrap();
    h.build_ok(&[ctx.path().to_str().unwrap()]);
}

/// A symlink in the context pointing outside, or a `..` source, never reads a host file.
#[test]
fn context_escapes_never_read_host_files() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let canary_dir = tempfile::tempdir_in(test_tmp()).unwrap();
    let token = unique("CANARY-TOKEN");
    let canary = canary_dir.path().join("canary.txt");
    std::fs::write(&canary, &token).unwrap();
    let ctx = context(&[("ok.txt", "fine\n")]);
    std::os::unix::fs::symlink(&canary, ctx.path().join("abs-link")).unwrap();
    let depth = ctx.path().components().count();
    let rel = format!("{}{}", "../".repeat(depth), canary.display().to_string().trim_start_matches('/'));
    std::os::unix::fs::symlink(&rel, ctx.path().join("rel-link")).unwrap();
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    for src in ["abs-link", "rel-link", "../canary.txt", canary.to_str().unwrap()] {
        std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {}\nCOPY ok.txt {src} /dst/\n", busybox())).unwrap();
        let tarpath = out.path().join("rootfs.tar");
        let _ = std::fs::remove_file(&tarpath);
        let r = h.build(&["-o", &format!("type=tar,dest={}", tarpath.display()), ctx.path().to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(!stderr.contains(&token), "{src}: the host file leaked into the output: {stderr}");
        if r.status.success() {
            let bytes = std::fs::read(&tarpath).unwrap();
            let hay = String::from_utf8_lossy(&bytes);
            assert!(!hay.contains(&token), "{src}: the host file's content is in the image");
        } else {
            assert!(stderr.contains("Dockerfile:2"), "{src}: the error names the line: {stderr}");
        }
    }
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), token, "the canary is unchanged");
}

/// A registry that serves a corrupted blob: the build fails naming the image and digest,
/// and nothing corrupt is kept.
#[test]
fn corrupted_blob_from_a_registry_is_rejected() {
    if !lab_available() {
        return;
    }
    let storage = tempfile::tempdir_in(test_tmp()).unwrap();
    let port = free_port();
    let cfg = storage.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog: {{level: error}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
            storage.path().join("data").display()
        ),
    )
    .unwrap();
    let mut reg = Command::new("docker-registry").arg("serve").arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let _guard = KillOnDrop(&mut reg);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Command::new("curl").args(["-fsS", &format!("http://127.0.0.1:{port}/v2/")]).output().map(|o| !o.status.success()).unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "private registry did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let image = format!("127.0.0.1:{port}/bad/busybox:latest");
    let copy = Command::new("skopeo")
        .args([
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{}", busybox()),
            &format!("docker://{image}"),
        ])
        .output()
        .unwrap();
    assert!(copy.status.success(), "{}", String::from_utf8_lossy(&copy.stderr));
    // Corrupt every layer blob (the biggest files) in the registry's storage.
    let mut blobs = Vec::new();
    for e in walk(&storage.path().join("data")) {
        if e.ends_with("data") && e.to_string_lossy().contains("/blobs/") {
            let len = std::fs::metadata(&e).unwrap().len();
            blobs.push((len, e));
        }
    }
    blobs.sort();
    let (_, layer) = blobs.last().expect("a layer blob").clone();
    let mut bytes = std::fs::read(&layer).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&layer, &bytes).unwrap();

    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &format!("FROM {image}\nRUN true\n"))]);
    let r = h.build(&[ctx.path().to_str().unwrap()]);
    assert!(!r.status.success());
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains(&format!("127.0.0.1:{port}/bad/busybox")), "names the image: {stderr}");
    assert!(stderr.to_lowercase().contains("digest"), "says what is wrong: {stderr}");
    // Nothing corrupt was stored: no layer snapshot exists.
    let layers = std::fs::read_dir(h.root.path().join("snapshots/layers")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(layers, 0, "no layer was kept from the corrupt blob");
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Unsupported or malformed flags fail before anything runs, naming the flag.
#[test]
fn bad_flags_are_clear_errors() {
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", "FROM scratch\n")]);
    let dir = ctx.path().to_str().unwrap();
    for (args, needle) in [
        (vec!["--squash", dir], "--squash"),
        (vec!["--progress", "fancy", dir], "--progress"),
        (vec!["-o", "type=bogus,dest=x", dir], "bogus"),
        (vec!["--build-arg", "=x", dir], "--build-arg"),
        (vec!["--secret", "src=/nonexistent", dir], "id=NAME"),
        (vec!["--push", dir], "--tag"),
        (vec!["/nonexistent-context-dir"], "nonexistent-context-dir"),
    ] {
        let out = h.build(&args);
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
