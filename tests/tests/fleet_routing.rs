//! End-to-end: a client with a fleet of builders (`HOIST_BUILDER=a,b`) sharing one cache
//! store (issue 13). A project's builds for a platform go to one node, chosen by rendezvous
//! hashing, so its disk stays warm; when that node does not answer, or dies during a build,
//! the client builds on the next node, where the shared store supplies the steps already
//! built. The routing itself is unit-tested in crates/hoist-cli/src/multi.rs.

mod common;

use std::io::BufRead as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Two nodes sharing a `file://` store, and a token of project "web": created with the
/// store named (HOIST_CACHE_STORE), the project and its token live in the store, valid on
/// both nodes.
fn fleet() -> (FleetStore, Server, Server, String) {
    let store = FleetStore::new();
    let (a, b) = (store.node(), store.node());
    let token = store.admin(&["project", "create", "web", "--token-name", "alice"]);
    (store, a, b, token)
}

/// A teammate whose builder setting is the fleet `nodes` (in that order).
fn teammate(nodes: &[&Server], token: &str) -> Teammate {
    let mut t = Teammate::new(nodes[0], token);
    t.builder = nodes.iter().map(|s| s.addr()).collect::<Vec<_>>().join(",");
    t
}

/// The builder the summary line says the build ran on ("hoist: built ID in 1.2s on ADDR: ...").
fn built_on(stderr: &str) -> String {
    let line = stderr.lines().find(|l| l.starts_with("hoist: built ")).unwrap_or_else(|| panic!("no summary line in:\n{stderr}"));
    let (_, rest) = line.split_once(" on ").unwrap_or_else(|| panic!("the summary names no builder: {line}"));
    rest.split_once(": ").map(|(addr, _)| addr.to_string()).unwrap_or_else(|| panic!("{line}"))
}

/// The build records node `server` keeps for the token's project: (status, steps run) each.
fn builds_on(server: &Server, token: &str) -> Vec<(String, u64)> {
    let out = Teammate::new(server, token).cmd().args(["builds", "ls", "--limit", "100"]).output().unwrap();
    assert!(out.status.success(), "hoist builds ls on {}: {}", server.addr(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            (cols[4].to_string(), cols[5].parse().unwrap())
        })
        .collect()
}

#[test]
fn a_project_builds_on_one_node_and_falls_over_to_the_next_with_the_shared_cache() {
    if !lab_available() {
        return;
    }
    let (_store, a, b, token) = fleet();
    let alice = teammate(&[&a, &b], &token);
    let dockerfile = format!("FROM {}\nRUN echo one > /one\nCOPY app.txt /app/\nRUN cat /app/app.txt /one > /both\n", busybox());
    let ctx = context(&[("Dockerfile", dockerfile.as_str()), ("app.txt", "hello fleet\n")]);
    let dir = ctx.path().to_str().unwrap();
    let tag = format!("{}/{}:1", registry(), unique("fleet-routing"));
    let (iid1, iid2) = (ctx.path().join("iid1"), ctx.path().join("iid2"));

    // The pushed result is in the shared store when the build reports done.
    let first = alice.build_ok(&["-t", &tag, "--push", "--iidfile", iid1.to_str().unwrap(), dir]);
    assert_eq!(count_before(&first, "steps run"), 3, "{first}");
    let chosen = built_on(&first);
    assert!(chosen == a.addr() || chosen == b.addr(), "{chosen}");

    // The same node every time: again, with the fleet listed the other way round, and with
    // the project named by the client rather than found from the token.
    let again = alice.build_ok(&[dir]);
    assert_eq!(built_on(&again), chosen, "{again}");
    assert_eq!(count_before(&again, "steps run"), 0, "{again}");
    let reversed = teammate(&[&b, &a], &token);
    assert_eq!(built_on(&reversed.build_ok(&[dir])), chosen, "the order of HOIST_BUILDER does not matter");
    let out = alice.cmd().env("HOIST_PROJECT", "web").args(["build", "--progress=plain", dir]).output().unwrap();
    let named = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{named}");
    assert_eq!(built_on(&named), chosen, "the token's project routes as the project named");
    let (mut gone, other) = if chosen == a.addr() { (a, b) } else { (b, a) };
    assert_eq!(builds_on(&gone, &token).len(), 4, "every build ran on {chosen}");
    assert!(builds_on(&other, &token).is_empty(), "no build ran on {}", other.addr());

    // The chosen node dies: the client says so and builds on the other, which finds every
    // step in the shared store.
    gone.kill9();
    let fallen = alice.build_ok(&["--iidfile", iid2.to_str().unwrap(), dir]);
    assert!(fallen.contains(&format!("hoist: builder {chosen} did not answer (")), "{fallen}");
    assert!(fallen.contains(&format!("); building on {}", other.addr())), "{fallen}");
    assert_eq!(built_on(&fallen), other.addr(), "{fallen}");
    assert_eq!(count_before(&fallen, "steps run"), 0, "{fallen}");
    assert_eq!(count_before(&fallen, "cached"), 3, "{fallen}");
    assert_eq!(count_before(&fallen, "containers"), 0, "{fallen}");
    assert_eq!(std::fs::read_to_string(&iid2).unwrap(), std::fs::read_to_string(&iid1).unwrap(), "the same image");
    assert_eq!(builds_on(&other, &token).len(), 1);
}

#[test]
fn a_build_whose_node_dies_midway_runs_again_on_the_next_node_and_a_failed_step_does_not() {
    if !lab_available() {
        return;
    }
    let (store, a, b, token) = fleet();
    let alice = teammate(&[&a, &b], &token);
    let base = format!("FROM {}\nRUN echo one > /one\n", busybox());
    let warm = context(&[("Dockerfile", base.as_str())]);
    let tag = format!("{}/{}:1", registry(), unique("fleet-routing-mid"));
    let first = alice.build_ok(&["-t", &tag, "--push", warm.path().to_str().unwrap()]);
    let chosen = built_on(&first);
    let (mut gone, other) = if chosen == a.addr() { (a, b) } else { (b, a) };

    // A failing step is the build's own error: it is not tried on the other node.
    let failing = context(&[("Dockerfile", &format!("{base}RUN echo failing && exit 3\n"))]);
    let out = alice.build(&[failing.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(!err.contains("building again") && !err.contains("did not answer"), "{err}");
    assert!(builds_on(&other, &token).is_empty(), "{}", other.addr());
    assert_eq!(builds_on(&gone, &token).iter().filter(|(status, _)| status == "failed").count(), 1);

    // The node dies while the build runs the step after the cached one.
    let slow = context(&[("Dockerfile", &format!("{base}RUN sleep 5 && echo slept > /slept\n"))]);
    let mut child = alice
        .cmd()
        .args(["build", "--progress=plain", slow.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the sleep step never started:\n{}", seen.join("\n"))
        });
        let started = line.starts_with('#') && line.contains("RUN sleep 5");
        seen.push(line);
        if started {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    gone.kill9();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    seen.extend(rx.try_iter());
    let err = seen.join("\n");
    assert!(status.success(), "{err}");
    assert!(err.contains(&format!("hoist: the connection to builder {chosen} was lost during the build (")), "{err}");
    assert!(err.contains(&format!("); building again on {}", other.addr())), "{err}");
    assert_eq!(built_on(&err), other.addr(), "{err}");
    // On the other node: the first RUN from the shared store, the sleep run again.
    assert_eq!(count_before(&err, "steps run"), 1, "{err}");
    assert_eq!(count_before(&err, "cached"), 1, "{err}");
    assert_eq!(builds_on(&other, &token), vec![("ok".to_string(), 1)]);

    // The killed node left no entry that names a blob the store lacks.
    let entries = std::fs::read_dir(store.dir.path().join("ac/web")).unwrap();
    for e in entries.flatten() {
        let entry: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        if let Some(digest) = entry["blob"]["digest"].as_str() {
            let hex = digest.strip_prefix("sha256:").unwrap();
            assert!(store.dir.path().join("cas/sha256").join(hex).is_file(), "entry {} names missing blob {digest}", e.path().display());
        }
    }
    // It restarts on its state and serves again: the build it lost is there from the store.
    gone.spawn();
    let again = teammate(&[&gone], &token).build_ok(&[slow.path().to_str().unwrap()]);
    assert_eq!(count_before(&again, "steps run"), 0, "{again}");
}
