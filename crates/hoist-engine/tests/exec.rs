//! Integration tests of the snapshotter (real overlayfs) and the executor (real runc) on a
//! busybox rootfs. They need root (mounts, namespaces); as another user they print a skip
//! note and pass. The arm64 test also needs the lab registry (127.0.0.1:5000) and skopeo.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::*;

use hoist_engine::executor::{ExecError, ExecMount, RunSpec, RuncConfig, RuncExecutor};
use hoist_engine::graph::{NetworkMode, Platform, SecurityMode};
use hoist_engine::snapshot::{ActiveMount, OverlayMounter, Snapshotter};
use hoist_oci::digest::Digest;
use tokio_util::sync::CancellationToken;

/// Timing-sensitive tests (fork storm, cancellation) run one at a time on this 2-core box.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Lab {
    tmp: tempfile::TempDir,
    snap: Snapshotter,
    exec: RuncExecutor,
    base: Digest,
}

impl Lab {
    fn new() -> Lab {
        Self::with_config(|_| {})
    }

    fn with_config(f: impl FnOnce(&mut RuncConfig)) -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let snap = Snapshotter::new(tmp.path().join("snapshots")).unwrap();
        let mut cfg = RuncConfig::new(tmp.path().join("executor"));
        f(&mut cfg);
        let exec = RuncExecutor::new(cfg).unwrap();
        let base = Digest::of(b"test busybox base layer");
        let layer = snap.temp_dir().unwrap();
        busybox_rootfs(layer.path(), Path::new("/bin/busybox"));
        snap.commit(layer, &base).unwrap();
        Lab { tmp, snap, exec, base }
    }

    /// Nothing may stay mounted under the lab's root once every mount is dropped.
    fn assert_no_mounts(&self) {
        let root = self.tmp.path().canonicalize().unwrap();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let left: Vec<&str> = info.lines().filter(|l| l.contains(root.to_str().unwrap())).collect();
        assert!(left.is_empty(), "mounts left under {}: {left:#?}", root.display());
    }

    fn assert_no_containers(&self) {
        assert_eq!(self.exec.list_containers().unwrap(), Vec::<String>::new());
    }
}

fn spec_for(mount: &ActiveMount, id: &str, args: Vec<String>) -> RunSpec {
    let mut s = RunSpec::new(id, mount.merged(), args);
    s.env = vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()];
    s
}

/// Entries of a directory tree, relative, sorted.
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.insert(p.strip_prefix(dir).unwrap().display().to_string());
            if p.symlink_metadata().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

/// The upperdir's entries besides the empty 0755 `/dev`, `/proc` and `/sys` mount points,
/// which RUN leaves in the layer as Docker 20.10 and BuildKit do (moby/buildkit#7039).
fn step_changes(upper: &Path) -> BTreeSet<String> {
    let mut t = tree(upper);
    for d in ["dev", "proc", "sys"] {
        if t.remove(d) {
            let m = fs::symlink_metadata(upper.join(d)).unwrap();
            assert!(m.is_dir() && m.mode() & 0o7777 == 0o755, "/{d} is an empty 0755 directory");
            assert!(!t.iter().any(|p| p.starts_with(&format!("{d}/"))), "/{d} holds nothing: {t:?}");
        }
    }
    t
}

fn xattr_names(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut buf[..]).unwrap_or(0);
    buf[..n].split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// PIDs of processes in the step's cgroup (`hoist/<id>`, any controller).
fn processes_of(id: &str) -> Vec<u32> {
    let needle = format!("/hoist/{id}");
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.lines().any(|l| l.ends_with(&needle))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_and_both_streams_are_reported() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let o = run(&lab.exec, spec_for(&mount, "codes", sh("echo out; echo err >&2; exit 7"))).await;
    assert_eq!(code(&o), 7);
    assert_eq!(o.stdout, "out\n");
    assert_eq!(o.stderr, "err\n");
    let o = run(&lab.exec, spec_for(&mount, "codes2", vec!["/bin/false".into()])).await;
    assert_eq!(code(&o), 1);
    assert!(!o.result.unwrap().success());
    drop(mount);
    lab.assert_no_mounts();
    lab.assert_no_containers();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_cwd_and_user_are_applied() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mut mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let mut spec = spec_for(&mount, "user", sh("echo $FOO; pwd; id -u; id -g; id -G; touch mine"));
    spec.env.push("FOO=bar baz".into());
    spec.cwd = "/work/dir".into();
    spec.uid = 1000;
    spec.gid = 1000;
    spec.additional_gids = vec![10];
    let o = run(&lab.exec, spec).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(o.stdout, "bar baz\n/work/dir\n1000\n1000\n1000 10\n");
    mount.unmount().unwrap();
    let cwd = mount.upper().join("work/dir");
    assert_eq!((cwd.metadata().unwrap().uid(), cwd.metadata().unwrap().gid()), (1000, 1000), "cwd created for the user, like BuildKit");
    assert_eq!(cwd.join("mine").metadata().unwrap().uid(), 1000);
    drop(mount);
    lab.assert_no_mounts();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upperdir_is_the_diff_with_whiteouts_opaque_dirs_and_no_stubs() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mut mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let secret = lab.tmp.path().join("secret");
    fs::write(&secret, "s3cret").unwrap();
    let mut spec = spec_for(
        &mount,
        "diff",
        sh("echo new > /new && rm /del && rm -rf /data && mkdir /data && echo y > /data/y && echo x >> /etc/passwd && cat /run/secrets/s && ls /proc/self >/dev/null"),
    );
    spec.mounts = vec![ExecMount::Bind { source: secret.clone(), target: "/run/secrets/s".into(), readonly: true }];
    let o = run(&lab.exec, spec).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(o.stdout, "s3cret");
    mount.unmount().unwrap();
    let upper = mount.upper().to_path_buf();
    let entries = step_changes(&upper);
    let expected: BTreeSet<String> = ["data", "data/y", "del", "etc", "etc/passwd", "new"].iter().map(|s| s.to_string()).collect();
    assert_eq!(entries, expected, "only the step's changes: no /proc, /dev, /sys, /etc/hosts, /etc/resolv.conf, /run stubs");
    let del = upper.join("del").symlink_metadata().unwrap();
    assert!(del.file_type().is_char_device() && del.rdev() == 0, "deleted lower file is a 0/0 whiteout");
    assert_eq!(xattr_names(&upper.join("data")), vec!["trusted.overlay.opaque".to_string()]);
    for e in &entries {
        for x in xattr_names(&upper.join(e)) {
            assert!(x == "trusted.overlay.opaque", "overlay artefact {x} left on {e}");
        }
    }
    let d = Digest::of(b"diff layer");
    let dir = lab.snap.commit(mount, &d).unwrap();
    assert_eq!(fs::read_to_string(dir.join("new")).unwrap(), "new\n");
    // The committed layer stacks: a step on top sees the change, not the deleted file.
    let mount = lab.snap.prepare(&[lab.base.clone(), d.clone()]).unwrap();
    let o =
        run(&lab.exec, spec_for(&mount, "stacked", sh("cat /new /data/y; test -e /del || echo gone; test -e /data/sub || echo opaque")))
            .await;
    assert_eq!(o.stdout, "new\ny\ngone\nopaque\n");
    drop(mount);
    lab.assert_no_mounts();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_changes_nothing_leaves_an_empty_upperdir() {
    // Regression guard for mount stubs: /proc, /dev, /sys, /etc/hosts and /etc/resolv.conf
    // are missing in this rootfs; creating them for the run must not leave a trace (not even
    // a copied-up /etc or a changed mtime of /).
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mut mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let o = run(&lab.exec, spec_for(&mount, "noop", sh("cat /etc/hosts >/dev/null && ls /dev/null /sys >/dev/null"))).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    mount.unmount().unwrap();
    assert_eq!(step_changes(mount.upper()), BTreeSet::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_resolv_and_hostname_are_provided() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let mut spec = spec_for(&mount, "hosts", sh("hostname; cat /etc/hosts; cat /etc/resolv.conf; echo > /etc/hosts && echo writable"));
    spec.extra_hosts = vec![("db.local".into(), "10.1.2.3".into())];
    let o = run(&lab.exec, spec).await;
    assert_ne!(code(&o), 0, "/etc/hosts is read-only");
    assert!(o.stdout.starts_with("buildkitsandbox\n127.0.0.1\tlocalhost buildkitsandbox\n"), "{}", o.stdout);
    assert!(o.stdout.contains("10.1.2.3\tdb.local\n"));
    let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap();
    assert!(o.stdout.contains(&host_resolv), "host network: the host's resolv.conf");
    assert!(!o.stdout.contains("writable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_none_has_only_loopback_and_host_sees_the_hosts_interfaces() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let mut spec = spec_for(&mount, "netnone", sh("cat /proc/net/dev; ip link show lo | grep -q UP && echo lo-up"));
    spec.network = NetworkMode::None;
    let o = run(&lab.exec, spec).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(interfaces(&o.stdout), BTreeSet::from(["lo".to_string()]));
    assert!(o.stdout.contains("lo-up"), "loopback is up: {}", o.stdout);
    // Steps of tests running alongside come and go as veths `hh<ip>` on the host.
    let stable = |s: BTreeSet<String>| s.into_iter().filter(|i| !i.starts_with("hh")).collect::<BTreeSet<_>>();
    let mut spec = spec_for(&mount, "nethost", sh("cat /proc/net/dev"));
    spec.network = NetworkMode::Host;
    let o = run(&lab.exec, spec).await;
    let host = interfaces(&fs::read_to_string("/proc/net/dev").unwrap());
    assert_eq!(stable(interfaces(&o.stdout)), stable(host));
    // The default network is a sandbox of its own (tests/network.rs covers it).
    let o = run(&lab.exec, spec_for(&mount, "netdefault", sh("cat /proc/net/dev"))).await;
    assert_eq!(interfaces(&o.stdout), BTreeSet::from(["eth0".to_string(), "lo".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_mounts_respect_readonly_and_tmpfs_stays_out_of_the_layer() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mut mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let (ro, rw) = (lab.tmp.path().join("ro"), lab.tmp.path().join("rw"));
    fs::create_dir_all(&ro).unwrap();
    fs::create_dir_all(&rw).unwrap();
    fs::write(ro.join("f"), "host").unwrap();
    let ctx_view = lab.snap.view_paths(std::slice::from_ref(&ro)).unwrap();
    let mut spec = spec_for(
        &mount,
        "binds",
        sh("cat /src/f; touch /src/x 2>/dev/null && echo WROTE-RO; echo c > /cache/c; echo t > /scratch/t; grep ' /scratch ' /proc/mounts | cut -d' ' -f3; echo cow > /ctx/f; rm -f /ctx/gone"),
    );
    fs::write(ro.join("gone"), "host file").unwrap();
    spec.mounts = vec![
        ExecMount::Bind { source: ctx_view.merged().to_path_buf(), target: "/ctx".into(), readonly: false },
        ExecMount::Bind { source: ro.clone(), target: "/src".into(), readonly: true },
        ExecMount::Bind { source: rw.clone(), target: "/cache".into(), readonly: false },
        ExecMount::Tmpfs { target: "/scratch".into(), size: Some(1 << 20) },
    ];
    let o = run(&lab.exec, spec).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(o.stdout, "hosttmpfs\n");
    assert!(!ro.join("x").exists());
    assert_eq!(fs::read_to_string(ro.join("f")).unwrap(), "host", "rw bind of a view: writes never reach the host dir");
    assert!(ro.join("gone").exists());
    drop(ctx_view);
    assert_eq!(fs::read_to_string(rw.join("c")).unwrap(), "c\n");
    mount.unmount().unwrap();
    assert_eq!(step_changes(mount.upper()), BTreeSet::new(), "mount points and mounted content stay out of the layer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_has_dockers_caps_and_insecure_has_more() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let script = "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status";
    let o = run(&lab.exec, spec_for(&mount, "caps", sh(script))).await;
    assert!(o.stdout.contains("CapEff:\t00000000a80425fb"), "{}", o.stdout);
    assert!(o.stdout.contains("NoNewPrivs:\t0"), "{}", o.stdout);
    let mut spec = spec_for(&mount, "insecure", sh(&format!("{script}; mount -t tmpfs t /tmp && echo mounted")));
    spec.security = SecurityMode::Insecure;
    let o = run(&lab.exec, spec).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    let host_bnd = fs::read_to_string("/proc/self/status").unwrap();
    let bnd = host_bnd.lines().find_map(|l| l.strip_prefix("CapBnd:\t")).unwrap();
    assert!(o.stdout.contains(&format!("CapEff:\t{bnd}")), "insecure gets the executor's bounding set: {}", o.stdout);
    assert!(o.stdout.contains("mounted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_form_of_a_missing_binary_is_a_start_error() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let o = run(&lab.exec, spec_for(&mount, "missing", vec!["/no/such/binary".into(), "arg".into()])).await;
    match o.result {
        Err(ExecError::Start { command, message }) => {
            assert_eq!(command, "process \"/no/such/binary arg\"");
            assert!(message.contains("no such file") || message.contains("not found"), "{message}");
        }
        other => panic!("expected a start error, got {other:?}"),
    }
    lab.assert_no_containers();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_kills_a_sleeping_step_and_everything_it_started() {
    if !is_root() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!processes_of("sleeper").is_empty(), "the step is running before the cancel");
        c2.cancel();
        Instant::now()
    });
    let o = run_with(&lab.exec, spec_for(&mount, "sleeper", sh("sleep 1000 & sleep 1000; echo never")), cancel).await;
    let cancelled_at = canceller.await.unwrap();
    assert!(cancelled_at.elapsed() < Duration::from_secs(3), "took {:?}", cancelled_at.elapsed());
    assert!(matches!(o.result, Err(ExecError::Cancelled { .. })), "{:?}", o.result);
    assert!(processes_of("sleeper").is_empty());
    lab.assert_no_containers();
    drop(mount);
    lab.assert_no_mounts();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_storm_is_bounded_and_killed_promptly() {
    if !is_root() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let lab = Lab::with_config(|c| c.pids_limit = Some(512));
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let n = processes_of("storm").len();
        c2.cancel();
        (Instant::now(), n)
    });
    let o = run_with(&lab.exec, spec_for(&mount, "storm", sh("f() { f | f & }; f; sleep 1000")), cancel).await;
    let (cancelled_at, running) = canceller.await.unwrap();
    eprintln!("fork storm: {running} processes at cancel, killed in {:?}", cancelled_at.elapsed());
    assert!(running > 10 && running <= 512, "the pids limit bounds the storm: {running}");
    assert!(cancelled_at.elapsed() < Duration::from_secs(5), "took {:?}", cancelled_at.elapsed());
    assert!(matches!(o.result, Err(ExecError::Cancelled { .. })), "{:?}", o.result);
    assert!(processes_of("storm").is_empty());
    lab.assert_no_containers();
    drop(mount);
    lab.assert_no_mounts();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_over_its_timeout_is_killed() {
    if !is_root() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let mut spec = spec_for(&mount, "slow", sh("echo started; sleep 1000"));
    spec.timeout = Some(Duration::from_secs(1));
    let start = Instant::now();
    let o = run(&lab.exec, spec).await;
    assert!(start.elapsed() < Duration::from_secs(4), "took {:?}", start.elapsed());
    match &o.result {
        Err(e @ ExecError::Timeout { .. }) => {
            assert_eq!(e.to_string(), "process \"/bin/sh -c echo started; sleep 1000\" did not finish within 1s and was killed")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(o.stdout, "started\n");
    assert!(processes_of("slow").is_empty());
    lab.assert_no_containers();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_run_future_kills_the_container_and_removes_stubs() {
    if !is_root() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let lab = Arc::new(Lab::new());
    let mut mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let spec = spec_for(&mount, "dropped", sh("sleep 1000"));
    let lab2 = lab.clone();
    let task = tokio::spawn(async move { run(&lab2.exec, spec).await.result.is_ok() });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!processes_of("dropped").is_empty());
    task.abort();
    let _ = task.await;
    assert!(processes_of("dropped").is_empty());
    lab.assert_no_containers();
    mount.unmount().unwrap();
    assert_eq!(step_changes(mount.upper()), BTreeSet::new(), "stubs removed by the drop guard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_executor_removes_containers_a_crashed_daemon_left() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    // A container started outside any executor call, as if the daemon died mid-step.
    let bundle = lab.tmp.path().join("crashed-bundle");
    fs::create_dir_all(&bundle).unwrap();
    let st = std::process::Command::new(lab.exec.runtime()).arg("spec").current_dir(&bundle).status().unwrap();
    assert!(st.success());
    let mut cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(bundle.join("config.json")).unwrap()).unwrap();
    cfg["root"] = serde_json::json!({"path": mount.merged(), "readonly": false});
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["sleep", "1000"]);
    cfg["linux"]["cgroupsPath"] = "hoist/crashed".into();
    fs::write(bundle.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let st = std::process::Command::new(lab.exec.runtime())
        .arg("--root")
        .arg(lab.exec.runtime_root())
        .args(["run", "-d", "--bundle"])
        .arg(&bundle)
        .arg("crashed")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(lab.exec.list_containers().unwrap(), vec!["crashed".to_string()]);
    assert!(!processes_of("crashed").is_empty());
    let again = RuncExecutor::new(RuncConfig::new(lab.tmp.path().join("executor"))).unwrap();
    assert!(again.list_containers().unwrap().is_empty());
    assert!(processes_of("crashed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_snapshotter_unmounts_what_a_crashed_one_left() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("snapshots");
    {
        let snap = Snapshotter::new(&root).unwrap();
        let m = snap.prepare(&[]).unwrap();
        fs::write(m.merged().join("x"), "x").unwrap();
        std::mem::forget(m);
        std::mem::forget(snap.view(&[]).unwrap());
    }
    let canon = root.canonicalize().unwrap();
    let count = || fs::read_to_string("/proc/self/mountinfo").unwrap().lines().filter(|l| l.contains(canon.to_str().unwrap())).count();
    assert_eq!(count(), 2);
    let _snap = Snapshotter::new(&root).unwrap();
    assert_eq!(count(), 0);
    assert_eq!(fs::read_dir(root.join("active")).unwrap().count(), 0);
}

fn many_layers(snap: &Snapshotter, n: usize) -> Vec<Digest> {
    (0..n)
        .map(|i| {
            let d = Digest::of(format!("layer {i}").as_bytes());
            let t = snap.temp_dir().unwrap();
            fs::write(t.path().join(format!("f{i}")), i.to_string()).unwrap();
            fs::write(t.path().join("top"), i.to_string()).unwrap();
            snap.commit(t, &d).unwrap();
            d
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_layers_mount_volatile_with_the_new_api_and_with_the_mount2_fallback() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A long root path: each layer dir is ~100 bytes, so 200 plain paths would overflow
    // mount(2)'s one-page option string.
    let root = tmp.path().join("a-rather-long-directory-name-to-make-layer-paths-long").join("snapshots");
    for (name, snap) in [
        ("new api", Snapshotter::new(root.join("new")).unwrap()),
        ("mount(2)", Snapshotter::with_mounter(root.join("legacy"), Arc::new(OverlayMounter::legacy())).unwrap()),
    ] {
        let layers = many_layers(&snap, 200);
        let start = Instant::now();
        let mount = snap.prepare(&layers).unwrap();
        let took = start.elapsed();
        eprintln!("{name}: mounted 200 layers in {took:?}");
        assert_eq!(fs::read_to_string(mount.merged().join("top")).unwrap(), "199", "{name}: last layer wins");
        assert_eq!(fs::read_to_string(mount.merged().join("f0")).unwrap(), "0", "{name}");
        assert_eq!(fs::read_dir(mount.merged()).unwrap().count(), 201, "{name}");
        // Writable mounts are volatile: unmounting them must not sync the filesystem.
        let merged = mount.merged().canonicalize().unwrap();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info.lines().find(|l| l.split(' ').nth(4) == merged.to_str()).expect("the mount is listed");
        let super_opts = line.rsplit(' ').next().unwrap();
        // Shown as `fsync=volatile` by kernels that have the `fsync=` option.
        let volatile = super_opts.split(',').any(|o| o == "volatile" || o == "fsync=volatile");
        assert!(volatile, "{name}: options end with {}", &super_opts[super_opts.len().saturating_sub(200)..]);
    }
    let canon = tmp.path().canonicalize().unwrap();
    assert!(!fs::read_to_string("/proc/self/mountinfo").unwrap().contains(canon.to_str().unwrap()));
}

/// The arm64 busybox of the lab registry's index, extracted into `dir`.
fn arm64_busybox(dir: &Path) -> Option<()> {
    let img = tempfile::tempdir().ok()?;
    let st = std::process::Command::new("skopeo")
        .args(["--override-arch", "arm64", "copy", "--src-tls-verify=false", "docker://127.0.0.1:5000/library/busybox:latest"])
        .arg(format!("dir:{}", img.path().display()))
        .stdout(std::process::Stdio::null())
        .status()
        .ok()?;
    if !st.success() {
        return None;
    }
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(img.path().join("manifest.json")).ok()?).ok()?;
    for layer in manifest["layers"].as_array()? {
        let hex = layer["digest"].as_str()?.strip_prefix("sha256:")?;
        let st = std::process::Command::new("tar").arg("-xzf").arg(img.path().join(hex)).arg("-C").arg(dir).status().ok()?;
        if !st.success() {
            return None;
        }
    }
    Some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm64_step_runs_under_qemu_emulation() {
    if !is_root() {
        return;
    }
    let arm64 = Platform::parse("linux/arm64").unwrap();
    if let Err(e) = hoist_engine::executor::check_emulation(&arm64) {
        eprintln!("skipping: {e}");
        return;
    }
    let lab = Lab::new();
    let t = lab.snap.temp_dir().unwrap();
    if arm64_busybox(t.path()).is_none() {
        eprintln!("skipping: cannot fetch the arm64 busybox from the lab registry at 127.0.0.1:5000 with skopeo");
        return;
    }
    let d = Digest::of(b"arm64 busybox");
    lab.snap.commit(t, &d).unwrap();
    let mount = lab.snap.prepare(&[d]).unwrap();
    let o = run(&lab.exec, spec_for(&mount, "arm", sh("uname -m"))).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(o.stdout, "aarch64\n");
}

#[test]
fn an_unknown_runtime_is_reported_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = RuncConfig::new(tmp.path());
    cfg.runtime = Some(PathBuf::from("/nonexistent/runc"));
    let e = RuncExecutor::new(cfg).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/runc") && e.contains("install runc"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crun_on_hybrid_cgroups_says_to_use_runc() {
    if !is_root() {
        return;
    }
    let Ok(crun) = which("crun") else {
        eprintln!("skipping: crun not installed");
        return;
    };
    let lab = Lab::with_config(|c| c.runtime = Some(crun));
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let o = run(&lab.exec, spec_for(&mount, "crun", sh("echo hi"))).await;
    match o.result {
        Ok(s) if s.success() => eprintln!("crun works on this machine (not hybrid cgroups)"),
        Err(e @ ExecError::CrunHybridCgroups) => assert!(e.to_string().contains("use runc")),
        other => panic!("expected success or the hybrid-cgroups error, got {other:?}; stderr {}", o.stderr),
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::split_paths(&std::env::var_os("PATH").ok_or(())?).map(|d| d.join(name)).find(|p| p.is_file()).ok_or(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trivial_step_costs_little_beyond_the_runtime() {
    if !is_root() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let lab = Lab::new();
    let mut times = Vec::new();
    for i in 0..5 {
        let start = Instant::now();
        let mut mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
        let o = run(&lab.exec, spec_for(&mount, &format!("quick{i}"), vec!["/bin/true".into()])).await;
        assert_eq!(code(&o), 0);
        mount.unmount().unwrap();
        lab.snap.commit(mount, &Digest::of(format!("quick {i}").as_bytes())).unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    eprintln!("prepare + run /bin/true + unmount + commit: median {:?}, max {:?}", times[2], times[4]);
    assert!(times[2] < Duration::from_secs(2), "median {:?}", times[2]);
    lab.assert_no_mounts();
}

/// The `Seccomp:` mode of the step's shell: 0 none, 2 filter.
fn seccomp_mode(stdout: &str) -> Option<&str> {
    stdout.lines().find_map(|l| l.strip_prefix("Seccomp:\t"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxed_steps_run_under_seccomp_and_insecure_ones_do_not() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let o = run(&lab.exec, spec_for(&mount, "filtered", sh("grep ^Seccomp /proc/self/status"))).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(seccomp_mode(&o.stdout), Some("2"), "{}", o.stdout);
    let mut spec = spec_for(&mount, "unfiltered", sh("grep ^Seccomp /proc/self/status"));
    spec.security = SecurityMode::Insecure;
    let o = run(&lab.exec, spec).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(seccomp_mode(&o.stdout), Some("0"), "{}", o.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_refuses_a_user_namespace_that_no_capability_guards() {
    // Creating a user namespace needs no capability, so only the filter stops a sandboxed
    // step from gaining a full capability set over the kernel's namespaced code (Docker
    // allows unshare(2) to CAP_SYS_ADMIN only, and clone(2) without CLONE_NEWUSER).
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let o = run(&lab.exec, spec_for(&mount, "userns", sh("unshare -U true"))).await;
    assert_ne!(code(&o), 0, "unshare -U succeeded in the sandbox");
    assert!(o.stderr.contains("Operation not permitted"), "EPERM from the filter: {}", o.stderr);
    let mut spec = spec_for(&mount, "userns-insecure", sh("unshare -U true && echo unshared"));
    spec.security = SecurityMode::Insecure;
    let o = run(&lab.exec, spec).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(o.stdout, "unshared\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_refuses_personality_flags_outside_dockers_list() {
    // personality(2) needs no capability; Docker's profile allows only PER_LINUX,
    // PER_LINUX32 (linux32), UNAME26 and the query. `linux64 -R` asks for
    // ADDR_NO_RANDOMIZE, which switches ASLR off, and must fail in the sandbox.
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let o = run(&lab.exec, spec_for(&mount, "pers", sh("linux32 uname -m; linux64 -R true || echo refused"))).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    let mut lines = o.stdout.lines();
    let machine32 = lines.next().unwrap_or_default();
    assert!(!machine32.is_empty() && machine32 != std::env::consts::ARCH, "linux32 (an allowed value) works: {}", o.stdout);
    assert_eq!(lines.next(), Some("refused"), "ADDR_NO_RANDOMIZE is refused: {} {}", o.stdout, o.stderr);
    let mut spec = spec_for(&mount, "pers-insecure", sh("linux64 -R true && echo allowed"));
    spec.security = SecurityMode::Insecure;
    let o = run(&lab.exec, spec).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(o.stdout, "allowed\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_build_work_runs_under_the_seccomp_filter() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mut mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let script = "set -e; grep '^Seccomp:' /proc/self/status; \
        seq 1 100 | sort -rn | head -n 1; \
        mkdir -p /out/d && echo data > /out/d/f && cp /out/d/f /out/g && mv /out/g /out/h && ln -s h /out/l && cat /out/l; \
        chown 1000:1000 /out/h && chmod 600 /out/h && stat -c '%u:%g %a' /out/h; \
        sh -c 'sleep 0.1 & wait' && echo waited; \
        (echo sub; exit 3) || echo \"subshell $?\"; \
        chroot / true && echo chrooted; \
        tar -cf /tmp/t.tar -C /out d && tar -tf /tmp/t.tar | sort | head -n 1";
    let o = run(&lab.exec, spec_for(&mount, "work", sh(script))).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(o.stdout, "Seccomp:\t2\n100\ndata\n1000:1000 600\nwaited\nsub\nsubshell 3\nchrooted\nd/\n");
    mount.unmount().unwrap();
    assert_eq!(fs::read_to_string(mount.upper().join("out/d/f")).unwrap(), "data\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm64_step_under_qemu_is_filtered_on_host_syscalls() {
    // qemu-user turns the guest's syscalls into the host's, so the x86-64 filter applies:
    // ordinary work (fork, threads of qemu itself) runs and a user namespace is refused.
    if !is_root() {
        return;
    }
    let arm64 = Platform::parse("linux/arm64").unwrap();
    if let Err(e) = hoist_engine::executor::check_emulation(&arm64) {
        eprintln!("skipping: {e}");
        return;
    }
    let lab = Lab::new();
    let t = lab.snap.temp_dir().unwrap();
    if arm64_busybox(t.path()).is_none() {
        eprintln!("skipping: cannot fetch the arm64 busybox from the lab registry at 127.0.0.1:5000 with skopeo");
        return;
    }
    let d = Digest::of(b"arm64 busybox");
    lab.snap.commit(t, &d).unwrap();
    let mount = lab.snap.prepare(&[d]).unwrap();
    let script = "uname -m; grep '^Seccomp:' /proc/self/status; sh -c 'sleep 0.1 & wait' && echo waited; echo a b | wc -w; unshare -U true 2>/dev/null || echo refused";
    let o = run(&lab.exec, spec_for(&mount, "arm-seccomp", sh(script))).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(o.stdout, "aarch64\nSeccomp:\t2\nwaited\n2\nrefused\n");
}

// ---------------------------------------------------------------------------------------
// Per-build cgroups (hoist serve --build-memory)
// ---------------------------------------------------------------------------------------

use hoist_engine::executor::{BuildCgroup, CgroupLayout, CgroupVersion};

fn build_cgroup(limit: u64) -> BuildCgroup {
    BuildCgroup::create(&hoist_engine::executor::random_build_name(), limit).unwrap()
}

/// A step of the build (no network: nothing to set up but the cgroup).
fn build_step(mount: &ActiveMount, cg: &BuildCgroup, id: &str, script: &str) -> RunSpec {
    let mut s = spec_for(mount, id, sh(script));
    s.network = NetworkMode::None;
    s.cgroup_parent = Some(cg.parent().to_string());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_over_the_build_memory_limit_is_oom_killed_and_the_kill_is_counted() {
    if !is_root() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let cg = build_cgroup(64 << 20);
    let limit_file = match CgroupLayout::current().unwrap().memory().unwrap().version {
        CgroupVersion::V1 => "memory.limit_in_bytes",
        CgroupVersion::V2 => "memory.max",
    };
    assert_eq!(fs::read_to_string(cg.memory_dir().join(limit_file)).unwrap().trim(), (64u64 << 20).to_string());
    assert_eq!(cg.oom_kills(), 0);

    // Under the limit: runs, and counts nothing.
    let o = run(&lab.exec, build_step(&mount, &cg, "small", "dd if=/dev/zero of=/dev/null bs=16M count=1 2>/dev/null && echo fine")).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(o.stdout, "fine\n");
    assert_eq!(cg.oom_kills(), 0);

    // A 200 MiB buffer in a 64 MiB build: the kernel kills it.
    let o = run(&lab.exec, build_step(&mount, &cg, "hog", "dd if=/dev/zero of=/dev/null bs=200M count=1; echo survived")).await;
    assert_eq!(code(&o), 0, "the shell reports dd's death: {}", o.stderr);
    assert_eq!(o.stdout, "survived\n");
    let first = cg.oom_kills();
    assert!(first >= 1, "the OOM kill is counted");
    let o = run(&lab.exec, build_step(&mount, &cg, "hog2", "exec dd if=/dev/zero of=/dev/null bs=200M count=1")).await;
    assert_eq!(code(&o), 137, "SIGKILL: {}", o.stderr);
    let second = cg.oom_kills();
    assert!(second > first, "the second OOM kill is counted too: {first} then {second}");
    // The build goes on within its limit.
    let o = run(&lab.exec, build_step(&mount, &cg, "after", "echo ok")).await;
    assert_eq!(code(&o), 0, "{}", o.stderr);
    assert_eq!(cg.oom_kills(), second);
    lab.assert_no_containers();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_of_one_build_share_its_cgroup_and_dropping_it_removes_it_from_every_hierarchy() {
    if !is_root() {
        return;
    }
    let lab = Lab::new();
    let mount = lab.snap.prepare(std::slice::from_ref(&lab.base)).unwrap();
    let cg = build_cgroup(256 << 20);
    let parent = format!("/{}/", cg.parent());
    // Two steps at once, as parallel stages run them.
    let script = "cat /proc/self/cgroup; sleep 0.5";
    let (a, b) = tokio::join!(
        run(&lab.exec, build_step(&mount, &cg, "stage-a", script)),
        run(&lab.exec, build_step(&mount, &cg, "stage-b", script))
    );
    for (o, id) in [(&a, "stage-a"), (&b, "stage-b")] {
        assert_eq!(code(o), 0, "{}", o.stderr);
        let memory =
            o.stdout.lines().find(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == "memory")) || l.starts_with("0::"));
        let memory = memory.unwrap_or_else(|| panic!("no memory line in {}", o.stdout));
        assert!(memory.ends_with(&format!("{parent}{id}")), "{id} is below {parent}: {}", o.stdout);
        // Every hierarchy the step is in puts it below the build cgroup.
        for l in o.stdout.lines().filter(|l| !l.ends_with(":/")) {
            assert!(l.contains(&parent), "{id}: {l} is not below {parent}:\n{}", o.stdout);
        }
    }
    let dirs = cg.dirs();
    let existing: Vec<_> = dirs.iter().filter(|d| d.exists()).cloned().collect();
    let layout = CgroupLayout::current().unwrap();
    assert_eq!(existing.len(), layout.hierarchies.len(), "runc made hoist/<build> in every hierarchy: {existing:#?}");
    assert!(existing.contains(&cg.memory_dir().to_path_buf()));
    drop(cg);
    let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "left after drop: {left:#?}");
    lab.assert_no_containers();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_build_cgroups_are_removed_but_not_live_or_busy_ones() {
    if !is_root() {
        return;
    }
    let layout = CgroupLayout::current().unwrap();
    let live = build_cgroup(128 << 20);
    // A crashed builder's: hoist/<build> in every hierarchy, a step cgroup below, no lock.
    let crashed = format!("hoist/{}", hoist_engine::executor::random_build_name());
    let busy = format!("hoist/{}", hoist_engine::executor::random_build_name());
    for d in layout.dirs_of(&crashed).iter().chain(layout.dirs_of(&busy).iter()) {
        fs::create_dir_all(d.join("hoist-step")).unwrap();
    }
    // One still has a process (a step that escaped?): it stays.
    let mut sleeper = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let pids = layout.hierarchies.iter().find(|h| h.controllers.iter().any(|c| c == "pids")).unwrap_or(&layout.hierarchies[0]);
    let busy_step = pids.base.join(&busy).join("hoist-step");
    fs::write(busy_step.join("cgroup.procs"), sleeper.id().to_string()).unwrap();

    hoist_engine::executor::remove_leftover_build_cgroups();
    let left: Vec<_> = layout.dirs_of(&crashed).into_iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "leftovers not removed: {left:#?}");
    assert!(live.memory_dir().exists(), "a live build's cgroup was removed");
    assert!(busy_step.exists(), "a cgroup with a process was removed");

    // Once its process is gone, a new executor's recovery removes it too.
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let state = tempfile::tempdir().unwrap();
    let _again = RuncExecutor::new(RuncConfig::new(state.path().join("executor"))).unwrap();
    let left: Vec<_> = layout.dirs_of(&busy).into_iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "not removed once empty: {left:#?}");
    assert!(live.memory_dir().exists());
}
