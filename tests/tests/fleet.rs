//! End-to-end: several `hoist serve` nodes with their own state roots sharing one cache
//! store (issue 13). The engine's side on fakes is crates/hoist-engine/tests/fleet.rs.

mod common;

use common::*;

#[test]
fn a_teammate_routed_to_another_node_gets_every_step_from_the_shared_store_and_the_same_image() {
    if !lab_available() {
        return;
    }
    let store = FleetStore::new();
    let (a, b) = (store.node(), store.node());
    // Projects and tokens live in the shared store: made once, valid on every node.
    let alice = Teammate::new(&a, &store.admin(&["project", "create", "web", "--token-name", "alice"]));
    let bob = Teammate::new(&b, &store.admin(&["token", "create", "web", "--name", "bob"]));
    let dockerfile = format!("FROM {}\nRUN echo one > /one\nCOPY app.txt /app/\nRUN cat /app/app.txt /one > /both\n", busybox());
    let files = [("Dockerfile", dockerfile.as_str()), ("app.txt", "hello fleet\n")];
    let (a_dir, b_dir) = (context(&files), context(&files));
    let tag = format!("{}/{}:1", registry(), unique("fleet"));
    let (a_iid, b_iid) = (a_dir.path().join("iid"), b_dir.path().join("iid"));

    // A pushed result is in the shared store when the build reports done.
    let first = alice.build_ok(&["-t", &tag, "--push", "--iidfile", a_iid.to_str().unwrap(), a_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&first, "steps run"), 3, "{first}");
    let entries: Vec<String> = store.objects().into_iter().filter(|p| p.starts_with("ac/web/")).collect();
    assert_eq!(entries.len(), 3, "one entry per step: {:?}", store.objects());
    assert!(store.objects().iter().filter(|p| p.starts_with("cas/sha256/")).count() >= 2, "the RUN and COPY layers' blobs");

    let second = bob.build_ok(&["--iidfile", b_iid.to_str().unwrap(), b_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&second, "steps run"), 0, "{second}");
    assert_eq!(count_before(&second, "cached"), 3, "{second}");
    assert_eq!(count_before(&second, "containers"), 0, "node B ran no container: {second}");
    assert_eq!(std::fs::read_to_string(&b_iid).unwrap(), std::fs::read_to_string(&a_iid).unwrap(), "the same image id on both nodes");
    // A build without outputs needs no layer's files: node B extracted none of the hits'
    // (the base's one layer may have come with the fetch that starts while the first step is
    // looked up).
    let layers_on_b = || std::fs::read_dir(b.root.path().join("snapshots/layers")).map(|d| d.count()).unwrap_or(0);
    assert!(layers_on_b() <= 1, "node B holds the hits' layers only in the store");
    // A push fetches from the store only what the registry lacks: a new repository gets
    // every blob, and pulled from there the image runs with A's files.
    let other = format!("{}/{}:1", registry(), unique("fleet-other"));
    let pushed = bob.build_ok(&["-t", &other, "--push", b_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&pushed, "steps run"), 0, "{pushed}");
    assert!(layers_on_b() <= 1, "a push extracts nothing");
    docker_ok(&["pull", &other]);
    assert_eq!(docker_ok(&["run", "--rm", &other, "cat", "/both"]), "hello fleet\none\n");
    // B's result is usable: loaded into the engine, it runs with A's files.
    let loaded = bob.build_ok(&["-t", &unique("fleet-load"), "--load", b_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&loaded, "steps run"), 0, "{loaded}");
    let image = std::fs::read_to_string(&b_iid).unwrap();
    let out = docker_ok(&["run", "--rm", image.trim(), "cat", "/both"]);
    assert_eq!(out, "hello fleet\none\n");
    assert!(layers_on_b() >= 3, "a load needs the files: node B has them now");

    // `hoist cache du` tells both tiers apart; a reset empties the project's share of both.
    let du = alice.cmd().args(["cache", "du"]).output().unwrap();
    let du = String::from_utf8_lossy(&du.stdout).into_owned();
    assert!(du.contains(&format!("shared store:   {}", store.url)), "{du}");
    assert!(du.contains("entries:      3 "), "{du}");
    let reset = alice.cmd().args(["cache", "reset"]).output().unwrap();
    assert!(reset.status.success(), "{}", String::from_utf8_lossy(&reset.stderr));
    assert!(String::from_utf8_lossy(&reset.stdout).contains("entries:      0 "));
    assert!(!store.objects().iter().any(|p| p.starts_with("ac/web/")), "{:?}", store.objects());
    let after = alice.build_ok(&[a_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&after, "steps run"), 3, "node A's own cache was reset too: {after}");
}

#[test]
fn a_token_made_on_one_node_works_on_the_others_and_its_revocation_reaches_them() {
    if !lab_available() {
        return;
    }
    let store = FleetStore::new();
    let (a, b) = (store.node(), store.node());
    // Made through node A's own command line (its HOIST_ROOT and the fleet's store).
    let out = std::process::Command::new(hoist_bin())
        .args(["project", "create", "web", "--token-name", "carol", "--cache-store", &store.url])
        .env("HOIST_ROOT", a.root.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let files = [("Dockerfile", "FROM scratch\nCOPY f /\n"), ("f", "x")];
    let dir = context(&files);
    for node in [&a, &b] {
        Teammate::new(node, &token).build_ok(&[dir.path().to_str().unwrap()]);
    }
    store.admin(&["token", "revoke", "carol"]);
    // Every node learns of it within seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for node in [&b, &a] {
        loop {
            let out = Teammate::new(node, &token).build(&[dir.path().to_str().unwrap()]);
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("revoked"), "{err}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node {} still takes the revoked token", node.addr());
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// The builder image's Dockerfile (packaging/builder) builds with hoist itself, and its
/// entrypoint runs `hoist serve` with its state in the volume. The lab's base image has no
/// glibc for the real binary, so a script stands in for it and reports how it was started.
#[test]
fn the_builder_image_builds_with_hoist_and_starts_hoist_serve() {
    if !lab_available() {
        return;
    }
    let dockerfile =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/builder/Dockerfile")).unwrap();
    let stand_in = "#!/bin/sh\necho \"started: hoist $* root=$HOIST_ROOT\"\n";
    let dir = context(&[("Dockerfile", &dockerfile), ("hoist", stand_in)]);
    std::fs::set_permissions(dir.path().join("hoist"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let tag = unique("hoist-builder");
    let h = Hoist::new();
    h.build_ok(&["--build-arg", &format!("BASE={}", busybox()), "-t", &tag, "--load", dir.path().to_str().unwrap()]);
    let out = docker_ok(&["run", "--rm", &tag]);
    assert_eq!(
        out.trim(),
        "started: hoist serve --listen tcp://0.0.0.0:7420 --tls-cert /etc/hoist/tls/cert.pem --tls-key /etc/hoist/tls/key.pem root=/var/lib/hoist"
    );
    let volumes = docker_ok(&["image", "inspect", "--format", "{{json .Config.Volumes}}", &tag]);
    assert!(volumes.contains("/var/lib/hoist"), "{volumes}");
    let _ = docker().args(["rmi", &tag]).output();
}

/// Ten teammates at once, five per node, build one project with shared steps: every build
/// succeeds, each node's builds agree, and afterwards a node that joins gets one result per
/// step (the first one written), whichever node wrote it.
#[test]
fn ten_concurrent_builds_across_two_nodes_all_succeed_and_leave_one_result_per_step() {
    if !lab_available() {
        return;
    }
    let store = FleetStore::new();
    let nodes = [store.node(), store.node()];
    let token = store.admin(&["project", "create", "web", "--token-name", "team"]);
    let dockerfile =
        format!("FROM {}\nRUN echo base > /base\nCOPY app.txt /app/\nRUN sleep 1 && cat /app/app.txt /base > /both\n", busybox());
    let files = [("Dockerfile", dockerfile.as_str()), ("app.txt", "ten at once\n")];
    let ids: Vec<(usize, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let (node, files, token) = (&nodes[i % 2], &files, &token);
                s.spawn(move || {
                    let dir = context(files);
                    let iid = dir.path().join("iid");
                    Teammate::new(node, token).build_ok(&["--iidfile", iid.to_str().unwrap(), dir.path().to_str().unwrap()]);
                    (i % 2, std::fs::read_to_string(iid).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for n in 0..2 {
        let on: Vec<&String> = ids.iter().filter(|(k, _)| *k == n).map(|(_, id)| id).collect();
        assert!(on.windows(2).all(|w| w[0] == w[1]), "node {n}'s builds differ: {on:?}");
    }
    // Whatever raced, the store holds one entry per step and a new node gets all of them.
    let entries = store.objects().into_iter().filter(|p| p.starts_with("ac/web/")).count();
    assert_eq!(entries, 3);
    let late = store.node();
    let dir = context(&files);
    let out = Teammate::new(&late, &token).build_ok(&[dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&out, "steps run"), 0, "{out}");
    assert_eq!(count_before(&out, "containers"), 0, "{out}");
}

/// What a build queued for the shared store goes up before its node exits: a node stopped
/// right after a build (no --push, so nothing waited for the store) leaves every step to
/// the others. (20 MB of noise: its blob takes long enough to compress that a node that
/// did not wait would exit first.)
#[test]
fn a_node_stopped_right_after_a_build_has_written_its_results_to_the_store() {
    if !lab_available() {
        return;
    }
    let store = FleetStore::new();
    let (mut a, b) = (store.node(), store.node());
    let token = store.admin(&["project", "create", "web", "--token-name", "ci"]);
    let dockerfile = format!("FROM {}\nRUN head -c 20000000 /dev/urandom > /noise\nRUN echo two > /two\n", busybox());
    let dir = context(&[("Dockerfile", dockerfile.as_str())]);
    Teammate::new(&a, &token).build_ok(&[dir.path().to_str().unwrap()]);
    a.stop();
    let out = Teammate::new(&b, &token).build_ok(&[dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&out, "steps run"), 0, "{out}");
}
