//! What the engine's real-kernel tests share: a root check that fails under CI instead of
//! skipping, a busybox rootfs, and running a step while collecting its output.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use hoist_engine::executor::{ExecError, Executor, ExitStatus, LogChunk, LogStream, RunSpec, RuncExecutor};
use tokio_util::sync::CancellationToken;

/// Whether a test that needs root (mounts, namespaces, runc) can run here. As another user
/// it skips with a note, except under CI (`CI` set), where a skipped sandbox test would
/// look like a pass: there it fails.
pub fn is_root() -> bool {
    hoist_oci::testing::needs("root (overlayfs mounts, namespaces and runc)", rustix::process::geteuid().is_root())
}

/// A minimal rootfs: `busybox` with its applet links, /etc/passwd and /etc/group, names
/// from /etc/hosts only (glibc without nsswitch.conf would ask a DNS server first: no query
/// may leave the machine), a file to delete and a directory to replace. No /proc, /dev,
/// /sys, /etc/hosts, /etc/resolv.conf.
pub fn busybox_rootfs(dir: &Path, busybox: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    let list = std::process::Command::new(busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
        }
    }
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n").unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\nwheel:x:10:app\napp:x:1000:\n").unwrap();
    fs::write(dir.join("etc/nsswitch.conf"), "hosts: files\n").unwrap();
    fs::write(dir.join("del"), "to be deleted").unwrap();
    fs::create_dir_all(dir.join("data/sub")).unwrap();
    fs::write(dir.join("data/sub/x"), "old").unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();
}

pub fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// A finished step and what it wrote.
pub struct Output {
    pub result: Result<ExitStatus, ExecError>,
    pub stdout: String,
    pub stderr: String,
}

pub async fn run_with(exec: &RuncExecutor, spec: RunSpec, cancel: CancellationToken) -> Output {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<LogChunk>(64);
    let collector = tokio::spawn(async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(c) = rx.recv().await {
            match c.stream {
                LogStream::Stdout => out.extend_from_slice(&c.data),
                LogStream::Stderr => err.extend_from_slice(&c.data),
            }
        }
        (String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned())
    });
    let result = exec.run(spec, tx, cancel).await;
    let (stdout, stderr) = collector.await.unwrap();
    Output { result, stdout, stderr }
}

pub async fn run(exec: &RuncExecutor, spec: RunSpec) -> Output {
    run_with(exec, spec, CancellationToken::new()).await
}

/// The step's exit code (panicking with its output when it could not run).
pub fn code(o: &Output) -> i32 {
    match &o.result {
        Ok(s) => s.code,
        Err(e) => panic!("run failed: {e}\nstdout: {}\nstderr: {}", o.stdout, o.stderr),
    }
}

/// Interface names in `/proc/net/dev` text.
pub fn interfaces(proc_net_dev: &str) -> BTreeSet<String> {
    proc_net_dev.lines().skip(2).filter(|l| l.contains(':')).filter_map(|l| l.split(':').next()).map(|s| s.trim().to_string()).collect()
}
