//! Tenant isolation (issue 12): a real `hoist serve` on TCP with two projects, where project
//! B — or a local user of the builder's machine — attacks project A and the builder. Each
//! case asserts that the attack is refused or contained with a clear error, that A's data
//! is unchanged and unseen, and that the builder stays healthy; the positive paths (granted
//! entitlements, ssh forwarding to a remote builder, downloads from RUN) are tested too.
//!
//! Network traffic stays on this machine: loopback, the builder's bridge, and a network
//! namespace the test creates for its own HTTP server.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// What project A keeps on the builder that B must never see.
const A_SECRET: &str = "alpha-secret-7f3a9c";

/// A builder with two projects, and A's image already built.
struct Tenants {
    server: Server,
    a: Teammate,
    b: Teammate,
    a_ctx: tempfile::TempDir,
}

impl Tenants {
    fn new(extra: &[&str]) -> Tenants {
        let server = Server::start_with(extra);
        let ta = server.admin(&["project", "create", "alpha"]);
        let tb = server.admin(&["project", "create", "beta"]);
        let a = Teammate::new(&server, &ta);
        let b = Teammate::new(&server, &tb);
        let a_ctx = context(&[
            ("Dockerfile", &format!("FROM {}\nCOPY secret.txt /secret.txt\nRUN cat /secret.txt > /copy.txt\n", busybox())),
            ("secret.txt", A_SECRET),
        ]);
        a.build_ok(&[a_ctx.path().to_str().unwrap()]);
        Tenants { server, a, b, a_ctx }
    }

    /// A's cache and context are intact (its build is fully cached) and the builder serves.
    fn assert_a_intact(&self) {
        let out = self.a.build_ok(&[self.a_ctx.path().to_str().unwrap()]);
        assert_eq!(count_before(&out, "steps run"), 0, "A's build is still fully cached:\n{out}");
        assert!(self.server.log().lines().all(|l| !l.contains("panicked")), "the builder panicked:\n{}", self.server.log());
    }

    fn root(&self) -> &Path {
        self.server.root.path()
    }
}

/// Build `dockerfile` (with `files`) as `who`, exporting the result's filesystem; returns
/// the build's output and where the filesystem went.
fn build_fs(who: &Teammate, dockerfile: &str, files: &[(&str, &str)], args: &[&str]) -> (std::process::Output, tempfile::TempDir) {
    let mut all = vec![("Dockerfile", dockerfile)];
    all.extend_from_slice(files);
    let ctx = context(&all);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    let mut a: Vec<String> = vec!["-o".into(), format!("type=local,dest={}", dest.display())];
    a.extend(args.iter().map(|s| s.to_string()));
    a.push(ctx.path().display().to_string());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    (who.build(&a), out)
}

fn read(dir: &tempfile::TempDir, path: &str) -> String {
    std::fs::read_to_string(dir.path().join("fs").join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Containers the server's runtime knows.
fn containers(root: &Path) -> Vec<String> {
    let out = Command::new("runc").arg("--root").arg(root.join("executor/runtime")).args(["list", "-q"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
}

fn wait_for_container(root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while containers(root).is_empty() {
        assert!(Instant::now() < deadline, "no RUN container started");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run `f` with a raw API client holding `token` (for what the CLI never sends).
fn with_raw_client<T>(server: &Server, token: &str, f: impl AsyncFnOnce(&mut hoist_client::Client) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let addr = hoist_client::BuilderAddr::parse(&server.addr()).unwrap();
        let opts = hoist_client::ConnectOptions { token: Some(token.to_string()), ..Default::default() };
        let mut c = hoist_client::connect(&addr, &opts).await.unwrap();
        f(&mut c).await
    })
}

#[test]
fn ssh_forwarding_never_opens_a_path_on_the_builder() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    // The attack of old: name a file that only the builder can see (here its auth.json, in a
    // mount namespace where the client cannot see the builder's state). The client alone
    // opens what --ssh names, so the build fails on the client, naming the path.
    let auth = t.root().join("auth.json");
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nRUN --mount=type=ssh,id=x,target=/h cat /h\n", busybox()))]);
    let c = t.b.cmd();
    let script = format!(
        "mount -t tmpfs none {root} && exec \"$0\" build --progress=plain --ssh x={auth} {ctx}",
        root = t.root().display(),
        auth = auth.display(),
        ctx = ctx.path().display()
    );
    let hoist = c.get_program().to_os_string();
    let envs: Vec<_> = c.get_envs().map(|(k, v)| (k.to_os_string(), v.map(|v| v.to_os_string()))).collect();
    let mut u = Command::new("unshare");
    u.args(["--mount", "--propagation", "private", "sh", "-c", &script]).arg(hoist);
    for (k, v) in envs {
        match v {
            Some(v) => u.env(k, v),
            None => u.env_remove(k),
        };
    }
    let out = u.output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--ssh x=") && err.contains("auth.json"), "the client names what it could not open: {err}");
    assert!(!err.contains("\"hash\""), "nothing of auth.json is shown: {err}");
    // The builder's side of an ssh mount is a socket relaying to the client, never a file.
    let agent_dir = tempfile::tempdir_in(test_tmp()).unwrap();
    let key = agent_dir.path().join("id");
    assert!(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().unwrap().success());
    let (out, fs) = build_fs(
        &t.b,
        &format!(
            "FROM {}\nRUN --mount=type=ssh,id=x,target=/h (test -S /h && echo socket; cat /h 2>&1 || echo unreadable) > /what\n",
            busybox()
        ),
        &[],
        &["--ssh", &format!("x={}", key.display())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let what = read(&fs, "what");
    assert!(what.starts_with("socket\n") && what.contains("unreadable"), "{what}");
    t.assert_a_intact();
}

/// A directory with `ssh-add` and the shared libraries it needs, to COPY into a busybox
/// image (the lab has no Debian image with openssh-client).
fn ssh_add_bundle(ctx: &Path) {
    let out = Command::new("ldd").arg("/usr/bin/ssh-add").output().unwrap();
    let mut files = vec![PathBuf::from("/usr/bin/ssh-add")];
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(p) = l.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let dest = ctx.join("sshbin").join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(std::fs::canonicalize(&f).unwrap(), &dest).unwrap();
    }
}

fn fingerprint(key: &Path) -> String {
    let out = Command::new("ssh-keygen").arg("-lf").arg(key).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn ssh_agents_are_forwarded_to_a_remote_builder_from_keys_and_from_an_agent_socket() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    let keys = tempfile::tempdir_in(test_tmp()).unwrap();
    let (k1, k2) = (keys.path().join("deploy"), keys.path().join("agent_key"));
    for (k, kind) in [(&k1, "ed25519"), (&k2, "ecdsa")] {
        assert!(Command::new("ssh-keygen").args(["-q", "-t", kind, "-N", "", "-f"]).arg(k).status().unwrap().success());
    }
    // A real ssh-agent on the client holding the second key.
    let sock = keys.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent").arg("-D").arg("-a").arg(&sock).stdout(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("ssh-add").arg(&k2).env("SSH_AUTH_SOCK", &sock).stderr(Stdio::null()).status().unwrap().success());

    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nCOPY sshbin/ /\n\
             RUN --mount=type=ssh,id=deploy ssh-add -l > /deploy.txt\n\
             RUN --mount=type=ssh ssh-add -l > /default.txt\n",
            busybox()
        ),
    )]);
    ssh_add_bundle(ctx.path());
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    let o =
        t.b.cmd()
            .env("SSH_AUTH_SOCK", &sock)
            .args(["build", "--progress=plain", "-o", &format!("type=local,dest={}", dest.display())])
            .args(["--ssh", &format!("deploy={}", k1.display()), "--ssh", "default"])
            .arg(ctx.path())
            .output()
            .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(o.status.success(), "{}", stderr(&o));
    let deploy = std::fs::read_to_string(dest.join("deploy.txt")).unwrap();
    let default = std::fs::read_to_string(dest.join("default.txt")).unwrap();
    assert!(deploy.contains(&fingerprint(&k1)) && deploy.lines().count() == 1, "{deploy}");
    assert!(default.contains(&fingerprint(&k2)) && default.lines().count() == 1, "{default}");
    t.assert_a_intact();
}

#[test]
fn insecure_and_host_network_need_the_builders_grant_and_the_clients_request() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    let insecure = format!("FROM {}\nRUN true\nRUN --security=insecure grep CapEff /proc/self/status > /caps\n", busybox());
    let (o, _) = build_fs(&t.b, &insecure, &[], &["--allow", "security.insecure"]);
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("Dockerfile:3: RUN --security=insecure:") && e.contains("not granted to project \"beta\""), "{e}");
    assert!(e.contains("hoist project allow beta security.insecure"), "says what to grant: {e}");
    let (o, _) = build_fs(&t.b, &format!("FROM {}\nRUN --network=host true\n", busybox()), &[], &[]);
    assert!(!o.status.success() && stderr(&o).contains("Dockerfile:2: RUN --network=host:"), "{}", stderr(&o));
    let (o, _) = build_fs(&t.b, &format!("FROM {}\nRUN true\n", busybox()), &[], &["--network=host"]);
    assert!(!o.status.success() && stderr(&o).contains("--network=host: the network.host entitlement is not granted"), "{}", stderr(&o));

    // Granted to A only: A must still ask for it, and then gets every capability.
    t.server.admin(&["project", "allow", "alpha", "security.insecure"]);
    let (o, _) = build_fs(&t.a, &insecure, &[], &[]);
    assert!(!o.status.success() && stderr(&o).contains("not requested: pass --allow security.insecure"), "{}", stderr(&o));
    let (o, fs) = build_fs(&t.a, &insecure, &[], &["--allow", "security.insecure"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let caps = u64::from_str_radix(read(&fs, "caps").trim().trim_start_matches("CapEff:").trim(), 16).unwrap();
    assert!(caps.count_ones() > 30, "insecure steps hold (nearly) every capability: {caps:x}");
    let (o, _) = build_fs(&t.b, &insecure, &[], &["--allow", "security.insecure"]);
    assert!(!o.status.success(), "still not B's");
    t.assert_a_intact();
}

#[test]
fn a_builder_wide_grant_lets_every_project_use_the_host_network_when_it_asks() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&["--allow-entitlement", "network.host"]);
    let df = format!("FROM {}\nRUN cat /proc/net/dev > /dev.txt\n", busybox());
    let (o, host) = build_fs(&t.b, &df, &[], &["--network=host"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(read(&host, "dev.txt").contains("hoist0:"), "the host's network shows the builder's bridge");
    // The same step without --network=host is another step (its own network), not a hit.
    let (o, own) = build_fs(&t.b, &df, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dev = read(&own, "dev.txt");
    assert!(!dev.contains("hoist0:") && dev.contains("eth0:") && dev.contains("lo:"), "{dev}");
    t.assert_a_intact();
}

#[test]
fn run_cannot_reach_the_builders_ports_its_bridge_or_link_local_addresses() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    // A listener of "the builder's machine" on every address: no step may connect to it.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let watcher = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            if listener.accept().is_ok() {
                seen.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let df = format!(
        "FROM {}\nARG BUILDER_PORT\nARG OTHER_PORT\n\
         RUN ip route > /routes.txt; \
             (ip route get 169.254.169.254 2>&1 || true) > /linklocal.txt; \
             (nc -w 2 127.0.0.1 $BUILDER_PORT </dev/null && echo open || echo closed) > /loopback.txt; \
             gw=$(ip route | awk '/^default/ {{print $3}}'); echo $gw > /gw.txt; \
             (nc -w 2 $gw $OTHER_PORT </dev/null && echo open || echo closed) > /gateway.txt; \
             (nc -w 2 $gw {server_port} </dev/null && echo open || echo closed) > /gateway-builder.txt; \
             cat /proc/net/dev > /dev.txt\n",
        busybox(),
        server_port = t.server.port,
    );
    let (o, fs) = build_fs(
        &t.b,
        &df,
        &[],
        &["--build-arg", &format!("BUILDER_PORT={}", t.server.port), "--build-arg", &format!("OTHER_PORT={port}")],
    );
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(&fs, "loopback.txt"), "closed\n", "the builder's loopback port");
    assert_eq!(read(&fs, "gateway.txt"), "closed\n", "a port on every address, through the gateway");
    assert_eq!(read(&fs, "gateway-builder.txt"), "closed\n");
    assert_eq!(accepted.load(Ordering::Relaxed), 0, "nothing reached the listener");
    let routes = read(&fs, "routes.txt");
    assert!(routes.contains("169.254.0.0/16") && routes.contains("unreachable"), "{routes}");
    let ll = read(&fs, "linklocal.txt");
    assert!(ll.contains("unreachable") || ll.contains("No route"), "{ll}");
    assert!(read(&fs, "gw.txt").starts_with("10.213."), "the sandbox bridge: {}", read(&fs, "gw.txt"));
    let dev = read(&fs, "dev.txt");
    let ifaces: Vec<&str> =
        dev.lines().filter_map(|l| l.split(':').next()).map(str::trim).filter(|n| !n.is_empty() && !n.contains('|')).collect();
    assert_eq!(ifaces, ["lo", "eth0"], "{dev}");
    t.assert_a_intact();
}

#[test]
fn run_sees_only_its_own_processes_and_its_own_root() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    // A builds something slow, with a marker in its command line and environment.
    let slow =
        context(&[("Dockerfile", &format!("FROM {}\nENV MARK=alpha-process-marker\nRUN sleep 25 # alpha-process-marker\n", busybox()))]);
    let mut a_build =
        t.a.cmd().args(["build", "--progress=plain"]).arg(slow.path()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_container(t.root());
    let df = format!(
        "FROM {}\nRUN cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null | tr '\\0' ' ' > /procs.txt; \
         ls /proc | grep -c '^[0-9]' > /count.txt; ls /proc/1/root/ > /root1.txt; \
         (ls /proc/1/root/proc/1/root/ 2>&1 | head -3) > /nested.txt\n",
        busybox()
    );
    let (o, fs) = build_fs(&t.b, &df, &[], &[]);
    let _ = a_build.kill();
    let _ = a_build.wait();
    assert!(o.status.success(), "{}", stderr(&o));
    let procs = read(&fs, "procs.txt");
    assert!(!procs.contains("alpha-process-marker"), "A's process is invisible: {procs}");
    let count: u32 = read(&fs, "count.txt").trim().parse().unwrap();
    assert!(count <= 6, "only the step's own processes: {count}");
    let root1 = read(&fs, "root1.txt");
    assert!(root1.lines().any(|l| l == "bin") && !root1.lines().any(|l| l == "work" || l == "boot" || l == "root"), "{root1}");
    // Dropping A's client cancelled its build.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !containers(t.root()).is_empty() {
        assert!(Instant::now() < deadline, "A's cancelled step is still running");
        std::thread::sleep(Duration::from_millis(100));
    }
    t.assert_a_intact();
}

#[test]
fn blobs_the_builder_did_not_ask_for_are_refused() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    let junk = vec![7u8; 1 << 20];
    let digest = sha256_digest(&junk);
    let chunk = hoist_client::v1::BlobChunk { digest: digest.clone(), data: junk.clone(), last: true };
    let once = |c: &hoist_client::v1::BlobChunk| tokio_stream::iter([c.clone()]);
    let e = with_raw_client(&t.server, &t.b.token, async |c| c.upload_blobs(once(&chunk)).await.expect_err("an unasked blob is refused"));
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("was not asked for"), "{}", e.message());
    let hex = digest.trim_start_matches("sha256:");
    let stored = Command::new("find").arg(t.root()).args(["-name", hex]).output().unwrap();
    assert!(stored.stdout.is_empty(), "nothing was stored: {}", String::from_utf8_lossy(&stored.stdout));
    // Asked for, it is taken; a second upload (another client asked at the same moment) is
    // read and dropped: it stores nothing more.
    let manifest = hoist_client::v1::ContextManifest {
        session: "raw".into(),
        entries: vec![hoist_client::v1::ContextEntry {
            path: "f".into(),
            kind: hoist_client::v1::EntryKind::File as i32,
            mode: 0o644,
            size: junk.len() as u64,
            digest: digest.clone(),
            ..Default::default()
        }],
    };
    with_raw_client(&t.server, &t.b.token, async |c| {
        let prep = c.prepare_context(manifest).await.unwrap().into_inner();
        assert_eq!(prep.missing, vec![digest.clone()]);
        c.upload_blobs(once(&chunk)).await.unwrap();
        c.upload_blobs(once(&chunk)).await.unwrap();
    });
    let stored = Command::new("find").arg(t.root()).args(["-name", hex]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&stored.stdout).lines().count(), 1, "one copy: {}", String::from_utf8_lossy(&stored.stdout));
    // A's token cannot use what B prepared: the same upload is refused for A.
    let other = hoist_client::v1::BlobChunk { digest: sha256_digest(b"x"), data: b"x".to_vec(), last: true };
    let e = with_raw_client(&t.server, &t.a.token, async |c| c.upload_blobs(once(&other)).await.expect_err("refused"));
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    t.assert_a_intact();
}

#[test]
fn a_project_over_its_storage_limit_is_collected_and_others_keep_theirs() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    t.server.admin(&["project", "limit", "beta", "3MB"]);
    // Three builds, each with a 2 MB layer and a 1 MB context file of its own.
    let mut ctxs = Vec::new();
    for n in 0..3 {
        let big = format!("{n}").repeat(1_000_000);
        let ctx = context(&[
            ("Dockerfile", &format!("FROM {}\nCOPY big.txt /big.txt\nRUN head -c 2000000 /dev/urandom > /layer{n}\n", busybox())),
            ("big.txt", &big),
        ]);
        t.b.build_ok(&[ctx.path().to_str().unwrap()]);
        ctxs.push(ctx);
    }
    let u =
        with_raw_client(&t.server, &t.b.token, async |c| c.cache_usage(hoist_client::v1::CacheUsageRequest {}).await.unwrap().into_inner());
    assert_eq!(u.limit_bytes, 3 << 20, "3MB is 3 MiB, as in Docker");
    // Directories and small files are counted on disk but not when collecting: a little slack.
    assert!(u.total_bytes <= u.limit_bytes + u.limit_bytes / 20, "beta is back under its limit: {u:?}\n{}", t.server.log());
    assert!(u.build_records < 3, "old build records went with the cache: {u:?}");
    assert!(u.context_bytes < 3_000_000, "old contexts were collected: {u:?}");
    let du = t.b.cmd().args(["cache", "du"]).output().unwrap();
    let du = String::from_utf8_lossy(&du.stdout);
    assert!(du.contains("build records:") && du.contains("sessions") && du.contains("total:"), "{du}");
    t.assert_a_intact();
}

#[test]
fn builds_over_the_projects_limit_wait_for_a_slot_and_others_do_not() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    t.server.admin(&["project", "limit", "beta", "--builds", "1"]);
    let slow = |n: u32| context(&[("Dockerfile", &format!("FROM {}\nRUN sleep 4 && echo {n} > /n\n", busybox()))]);
    let (c1, c2, c3) = (slow(1), slow(2), slow(3));
    let first = t.b.cmd().args(["build", "--progress=plain"]).arg(c1.path()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_container(t.root());
    let second = t.b.cmd().args(["build", "--progress=plain"]).arg(c2.path()).stderr(Stdio::piped()).spawn().unwrap();
    let a_out = t.a.build_ok(&[c3.path().to_str().unwrap()]);
    assert!(!a_out.contains("waiting for a build slot"), "another project does not wait:\n{a_out}");
    let (first, second) = (first.wait_with_output().unwrap(), second.wait_with_output().unwrap());
    assert!(first.status.success() && second.status.success(), "{}\n{}", stderr(&first), stderr(&second));
    let e = stderr(&second);
    assert!(e.contains("waiting for a build slot: the project already runs 1 of its 1 builds"), "{e}");
    assert!(!stderr(&first).contains("waiting for a build slot"));
    t.assert_a_intact();
}

#[test]
fn a_revoked_token_stops_building_within_a_second() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    let ci_token = t.server.admin(&["token", "create", "beta", "--name", "ci"]);
    let ci = Teammate::new(&t.server, &ci_token);
    let slow = context(&[("Dockerfile", &format!("FROM {}\nRUN sleep 60\n", busybox()))]);
    let child = ci.cmd().args(["build", "--progress=plain"]).arg(slow.path()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_container(t.root());
    let revoked_at = Instant::now();
    t.server.admin(&["token", "revoke", "ci", "--project", "beta"]);
    let out = child.wait_with_output().unwrap();
    let took = revoked_at.elapsed();
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("token \"ci\" was revoked"), "{e}");
    assert!(took < Duration::from_secs(10), "the build ended {took:?} after the revocation");
    assert!(containers(t.root()).is_empty(), "its container is gone");
    let again = ci.build(&[slow.path().to_str().unwrap()]);
    assert!(!again.status.success() && stderr(&again).contains("was revoked"), "{}", stderr(&again));
    // B's other token still works, and the record says what happened.
    let ls = t.b.cmd().args(["builds", "ls"]).output().unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.lines().any(|l| l.contains("\tci\t") && l.contains("cancelled")), "{ls}");
    t.assert_a_intact();
}

#[test]
fn revoking_a_token_name_used_by_several_projects_needs_the_project() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    let out = Command::new(hoist_bin()).args(["token", "revoke", "default"]).env("HOIST_ROOT", t.root()).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("alpha, beta") && stderr(&out).contains("--project"), "{}", stderr(&out));
    // Nothing was revoked.
    t.b.build_ok(&[t.a_ctx.path().to_str().unwrap()]);
    t.assert_a_intact();
}

fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).args(args).output().unwrap()
}

#[test]
fn a_local_unprivileged_user_cannot_read_the_state_root() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(t.root()), 0o700);
    assert_eq!(mode(&t.root().join("auth.json")), 0o600);
    // While a step with an env= secret runs, its bundle (whose config holds the secret) is
    // only root's, and nobody can read anything of the state.
    let secret = tempfile::tempdir_in(test_tmp()).unwrap();
    std::fs::write(secret.path().join("s"), "beta-env-secret-31337").unwrap();
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nRUN --mount=type=secret,id=s,env=S sleep 4\n", busybox()))]);
    let child =
        t.b.cmd()
            .args(["build", "--progress=plain", "--secret", &format!("id=s,src={}", secret.path().join("s").display())])
            .arg(ctx.path())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    wait_for_container(t.root());
    let bundles: Vec<PathBuf> = std::fs::read_dir(t.root().join("executor/bundles")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(!bundles.is_empty());
    for b in &bundles {
        assert_eq!(mode(b), 0o700, "{}", b.display());
        let config = b.join("config.json");
        assert_eq!(mode(&config), 0o600, "{}", config.display());
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains("beta-env-secret-31337"), "the secret is in the config (root only)");
        let o = as_nobody(&["cat", config.to_str().unwrap()]);
        assert!(!o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("31337"));
    }
    for target in [t.root().to_path_buf(), t.root().join("auth.json"), t.root().join("contexts"), t.root().join("cache.redb")] {
        let o = as_nobody(&["ls", "-la", target.to_str().unwrap()]);
        assert!(!o.status.success(), "nobody listed {}", target.display());
        assert!(String::from_utf8_lossy(&o.stderr).contains("Permission denied"), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let o = as_nobody(&["grep", "-r", A_SECRET, t.root().to_str().unwrap()]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains(A_SECRET));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // The bundle went with the step.
    assert!(std::fs::read_dir(t.root().join("executor/bundles")).unwrap().next().is_none());
    t.assert_a_intact();
}

#[test]
fn an_existing_state_root_with_wide_modes_is_made_private_when_the_builder_opens_it() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(h.root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(h.root.path().join("builds")).unwrap();
    std::fs::set_permissions(h.root.path().join("builds"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nRUN true\n", busybox()))]);
    h.build_ok(&[ctx.path().to_str().unwrap()]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(h.root.path()), 0o700);
    assert_eq!(mode(&h.root.path().join("builds")), 0o700);
    assert_eq!(mode(&h.root.path().join("hoistd.sock")), 0o600);
    for e in std::fs::read_dir(h.root.path()).unwrap().flatten() {
        let m = mode(&e.path());
        assert_eq!(m & 0o077, 0, "{} is {m:o}", e.path().display());
    }
}

/// A network namespace with an HTTP server of the test's own, reachable from the host over
/// a veth pair (10.215.N.1 on the host, .2 inside); removed on drop.
struct TestHost {
    ns: String,
    veth: String,
    ip: String,
    httpd: Option<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl TestHost {
    fn start(content: &str) -> TestHost {
        let n = std::process::id() % 250;
        let ns = format!("hst-{}", std::process::id());
        let veth = format!("hstv{}", std::process::id() % 100000);
        let ip = |c: &str| -> bool { Command::new("ip").args(c.split_whitespace()).status().unwrap().success() };
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let _ = Command::new("ip").args(["link", "del", &veth]).status();
        assert!(ip(&format!("netns add {ns}")));
        assert!(ip(&format!("link add {veth} type veth peer name eth0 netns {ns}")));
        assert!(ip(&format!("addr add 10.215.{n}.1/30 dev {veth}")));
        assert!(ip(&format!("link set {veth} up")));
        assert!(ip(&format!("-n {ns} addr add 10.215.{n}.2/30 dev eth0")));
        assert!(ip(&format!("-n {ns} link set eth0 up")));
        assert!(ip(&format!("-n {ns} link set lo up")));
        assert!(ip(&format!("-n {ns} route add default via 10.215.{n}.1")));
        let dir = tempfile::tempdir_in(test_tmp()).unwrap();
        std::fs::write(dir.path().join("hello.txt"), content).unwrap();
        let httpd =
            Command::new("ip").args(["netns", "exec", &ns, "busybox", "httpd", "-f", "-p", "8080", "-h"]).arg(dir.path()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        TestHost { ns, veth, ip: format!("10.215.{n}.2"), httpd: Some(httpd), _dir: dir }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut h) = self.httpd.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip").args(["link", "del", &self.veth]).status();
    }
}

#[test]
fn run_downloads_from_a_server_through_the_default_network() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    let host = TestHost::start("hello from the test host\n");
    // nsswitch: names from /etc/hosts only, so no DNS query leaves the machine.
    let df = format!(
        "FROM {}\nRUN echo 'hosts: files' > /etc/nsswitch.conf && \
         printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 5 testsrv 8080 > /got.txt\n",
        busybox()
    );
    let (o, fs) = build_fs(&t.b, &df, &[], &["--add-host", &format!("testsrv:{}", host.ip)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read(&fs, "got.txt");
    assert!(got.starts_with("HTTP/1.") && got.ends_with("hello from the test host\n"), "{got}");
    drop(host);
    t.assert_a_intact();
}

#[test]
fn the_embedded_builder_grants_the_host_network_but_insecure_must_be_asked_for() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nRUN --network=host cat /proc/net/dev > /dev.txt\n", busybox()))]);
    h.build_ok(&[ctx.path().to_str().unwrap()]);
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nRUN --security=insecure true\n", busybox()))]);
    let o = h.build(&[ctx.path().to_str().unwrap()]);
    assert!(
        !o.status.success()
            && stderr(&o).contains("Dockerfile:2: RUN --security=insecure: the security.insecure entitlement was not requested"),
        "{}",
        stderr(&o)
    );
    h.build_ok(&["--allow", "security.insecure", ctx.path().to_str().unwrap()]);
    // `hoist serve` on a unix socket of its own is not the embedded builder: tokens needed.
    let root = tempfile::Builder::new().prefix("hoist-server-").tempdir_in(test_tmp()).unwrap();
    let sock = root.path().join("b.sock");
    let mut serve = Command::new(hoist_bin())
        .args(["serve", "--root", root.path().to_str().unwrap(), "--listen", &format!("unix://{}", sock.display())])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = Command::new(hoist_bin())
        .args(["cache", "du", "--builder", &format!("unix://{}", sock.display())])
        .env_remove("HOIST_TOKEN")
        .env("HOIST_CONFIG_DIR", root.path().join("client"))
        .output()
        .unwrap();
    let _ = serve.kill();
    let _ = serve.wait();
    unmount_all_under(root.path());
    assert!(!o.status.success() && stderr(&o).contains("a token is required"), "{}", stderr(&o));
}

#[test]
fn plain_tcp_to_a_builder_off_loopback_is_refused_by_the_client() {
    let ctx = context(&[("Dockerfile", "FROM scratch\n")]);
    let out = Command::new(hoist_bin())
        .args(["build", "--builder", "tcp://192.0.2.77:7420", "--token", "hst_x"])
        .arg(ctx.path())
        .env("HOIST_CONFIG_DIR", ctx.path().join(".cfg"))
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(e.contains("in clear") && e.contains("tls://192.0.2.77:7420") && e.contains("--insecure"), "{e}");
}

/// B names what A uploaded: a context A prepared (as a `--build-context` directory and as
/// an OCI layout), and the reference under which A's layout image was imported. Each is
/// refused, and A still uses its own.
#[test]
fn another_projects_contexts_and_layout_images_are_not_reachable() {
    if !lab_available() {
        return;
    }
    let t = Tenants::new(&[]);
    // A builds on an image of an OCI layout holding its secret.
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    let tar = tmp.path().join("layout.tar");
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nRUN echo {A_SECRET} > /layout-secret\n", busybox()))]);
    t.a.build_ok(&["-o", &format!("type=oci,dest={}", tar.display()), ctx.path().to_str().unwrap()]);
    let layout = tmp.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    assert!(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&layout).status().unwrap().success());
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let named = format!("base=oci-layout://{}", layout.display());
    let (o, a_fs) = build_fs(&t.a, "FROM base\nRUN cat /layout-secret > /seen\n", &[], &["--build-context", &named]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(&a_fs, "seen").trim(), A_SECRET);

    // B names the reference A's layout image was imported under.
    let (o, _) = build_fs(&t.b, &format!("FROM oci-layout.invalid/context@{digest}\nRUN cat /layout-secret\n"), &[], &[]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("the OCI layout has no image for") && !e.contains(A_SECRET), "{e}");

    // B names a context A prepared (and has not used yet), as a directory and as a layout.
    let manifest = hoist_client::v1::ContextManifest {
        session: "a-session".into(),
        entries: vec![hoist_client::v1::ContextEntry {
            path: "d".into(),
            kind: hoist_client::v1::EntryKind::Dir as i32,
            mode: 0o755,
            ..Default::default()
        }],
    };
    let a_prep = with_raw_client(&t.server, &t.a.token, async |c| c.prepare_context(manifest).await.unwrap().into_inner());
    let a_id = a_prep.context_id.clone();
    // B names A's manifest by the digest A was answered (with A's session): not B's to name.
    let known = hoist_client::v1::KnownManifest { session: "a-session".into(), manifest: a_prep.manifest.clone() };
    let e = with_raw_client(&t.server, &t.b.token, async |c| c.prepare_known_context(known.clone()).await.unwrap_err());
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let again = with_raw_client(&t.server, &t.a.token, async |c| c.prepare_known_context(known).await.unwrap().into_inner());
    assert_eq!(again.manifest, a_prep.manifest, "A names its own manifest");
    use hoist_client::v1::named_context::Kind;
    for kind in
        [Kind::ContextId(a_id.clone()), Kind::OciLayout(hoist_client::v1::OciLayout { context_id: a_id.clone(), digest: digest.clone() })]
    {
        let req = hoist_client::v1::BuildRequest {
            dockerfile: b"FROM x\n".to_vec(),
            named_contexts: [("x".to_string(), hoist_client::v1::NamedContext { kind: Some(kind) })].into(),
            ..Default::default()
        };
        let msg = hoist_client::v1::BuildClientMessage { msg: Some(hoist_client::v1::build_client_message::Msg::Request(req)) };
        let e = with_raw_client(&t.server, &t.b.token, async |c| {
            let mut events = match c.build(tokio_stream::iter([msg])).await {
                Ok(s) => s.into_inner(),
                Err(e) => return e,
            };
            loop {
                match events.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("B's build with A's context id finished"),
                    Err(e) => return e,
                }
            }
        });
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("is unknown or expired"), "{}", e.message());
    }
    // B names A's image by digest in a layout of its own that lacks its blobs: the
    // builder's store has them (A imported them), but they are not B's to use.
    let b_manifest = hoist_client::v1::ContextManifest {
        session: "b-session".into(),
        entries: vec![hoist_client::v1::ContextEntry {
            path: "blobs".into(),
            kind: hoist_client::v1::EntryKind::Dir as i32,
            mode: 0o755,
            ..Default::default()
        }],
    };
    let b_id = with_raw_client(&t.server, &t.b.token, async |c| c.prepare_context(b_manifest).await.unwrap().into_inner().context_id);
    let kind = Kind::OciLayout(hoist_client::v1::OciLayout { context_id: b_id, digest: digest.clone() });
    let req = hoist_client::v1::BuildRequest {
        dockerfile: b"FROM x\nRUN cat /layout-secret\n".to_vec(),
        named_contexts: [("x".to_string(), hoist_client::v1::NamedContext { kind: Some(kind) })].into(),
        ..Default::default()
    };
    let msg = hoist_client::v1::BuildClientMessage { msg: Some(hoist_client::v1::build_client_message::Msg::Request(req)) };
    let e = with_raw_client(&t.server, &t.b.token, async |c| match c.build(tokio_stream::iter([msg])).await {
        Err(e) => e,
        Ok(s) => {
            let mut events = s.into_inner();
            loop {
                match events.message().await {
                    Ok(Some(ev)) => assert!(!format!("{ev:?}").contains(A_SECRET), "B saw A's secret"),
                    Ok(None) => panic!("B's build on A's image by digest finished"),
                    Err(e) => return e,
                }
            }
        }
    });
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&format!("blob {digest} is not in the layout")), "{}", e.message());

    // A's prepared context is still A's to use.
    let req = hoist_client::v1::BuildRequest { context_id: a_id, dockerfile: b"FROM scratch\nCOPY d /d\n".to_vec(), ..Default::default() };
    let msg = hoist_client::v1::BuildClientMessage { msg: Some(hoist_client::v1::build_client_message::Msg::Request(req)) };
    let finished = with_raw_client(&t.server, &t.a.token, async |c| {
        let mut events = c.build(tokio_stream::iter([msg])).await.unwrap().into_inner();
        let mut ok = false;
        while let Some(ev) = events.message().await.unwrap() {
            ok |= matches!(ev.event, Some(hoist_client::v1::build_event::Event::Result(_)));
        }
        ok
    });
    assert!(finished, "A's build with its own context id finished");
    t.assert_a_intact();
}
