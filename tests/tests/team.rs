//! End-to-end: one `hoist serve`, teammates with separate homes and state (issue 4).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn project_files() -> Vec<(String, String)> {
    let mut files = vec![
        ("src/main.txt".to_string(), "main\n".to_string()),
        ("src/lib.txt".to_string(), "lib\n".to_string()),
        ("assets/big.txt".to_string(), "x".repeat(300_000)),
        ("README".to_string(), "readme\n".to_string()),
    ];
    files.push((
        "Dockerfile".to_string(),
        format!(
            "FROM {}\nCOPY assets/ /assets/\nRUN wc -c /assets/big.txt > /size\nCOPY src/ /src/\nRUN cat /src/main.txt /src/lib.txt > /both\n",
            busybox()
        ),
    ));
    files
}

fn checkout() -> tempfile::TempDir {
    let files = project_files();
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    context(&refs)
}

#[test]
fn a_teammates_first_build_is_entirely_cached_and_sends_only_what_is_new() {
    if !lab_available() {
        return;
    }
    let server = Server::start();
    let alice_token = server.admin(&["project", "create", "web", "--token-name", "alice"]);
    let bob_token = server.admin(&["token", "create", "web", "--name", "bob"]);
    let alice = Teammate::new(&server, &alice_token);
    let bob = Teammate::new(&server, &bob_token);
    let (a_dir, b_dir) = (checkout(), checkout());

    let first = alice.build_ok(&[a_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&first, "steps run"), 4, "{first}");
    assert_eq!(count_before(&first, "containers"), 2, "{first}");

    // Bob's checkout is elsewhere on another machine: his first build hits everything.
    let second = bob.build_ok(&[b_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&second, "steps run"), 0, "{second}");
    assert_eq!(count_before(&second, "cached"), 4, "{second}");
    assert_eq!(count_before(&second, "containers"), 0, "no container ran: {second}");
    assert_eq!(count_before(&second, "files sent"), 0, "the builder had every file: {second}");

    // One changed file: one file sent, only the steps that read it run.
    std::fs::write(b_dir.path().join("src/lib.txt"), "lib v2\n").unwrap();
    let third = bob.build_ok(&[b_dir.path().to_str().unwrap()]);
    assert_eq!(count_before(&third, "files sent"), 1, "{third}");
    assert_eq!(count_before(&third, "steps run"), 2, "{third}");
    assert_eq!(count_before(&third, "files hashed"), 1, "only the changed file was re-read: {third}");

    // Build records show who built what.
    let ls = alice.cmd().args(["builds", "ls"]).output().unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert_eq!(ls.lines().filter(|l| l.contains("\tbob\t")).count(), 2, "{ls}");
    assert_eq!(ls.lines().filter(|l| l.contains("\talice\t")).count(), 1, "{ls}");
    let id = ls.lines().nth(1).unwrap().split('\t').next().unwrap();
    let show = alice.cmd().args(["builds", "show", id]).output().unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("steps run:      2") && show.contains("RUN cat /src/main.txt"), "{show}");
}

#[test]
fn wrong_revoked_and_other_project_tokens_are_refused() {
    if !lab_available() {
        return;
    }
    let server = Server::start();
    let _web = server.admin(&["project", "create", "web"]);
    let bob = server.admin(&["token", "create", "web", "--name", "bob"]);
    let api = server.admin(&["project", "create", "api"]);
    let ctx = checkout();
    let dir = ctx.path().to_str().unwrap();

    let wrong = Teammate::new(&server, "hst_0123456789");
    let out = wrong.build(&[dir]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid"), "{}", String::from_utf8_lossy(&out.stderr));

    let mut none = Teammate::new(&server, "");
    none.token.clear();
    let out = none.cmd().env_remove("HOIST_TOKEN").args(["build", dir]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token is required"), "{}", String::from_utf8_lossy(&out.stderr));

    let b = Teammate::new(&server, &bob);
    b.build_ok(&[dir]);
    server.admin(&["token", "revoke", "bob", "--project", "web"]);
    let out = b.build(&[dir]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"), "{}", String::from_utf8_lossy(&out.stderr));

    let other = Teammate::new(&server, &api);
    let out = other.cmd().env("HOIST_PROJECT", "web").args(["build", dir]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("belongs to project \"api\""), "{stderr}");
}

#[test]
fn projects_see_nothing_of_each_other_not_even_by_digest() {
    if !lab_available() {
        return;
    }
    let server = Server::start();
    let web = Teammate::new(&server, &server.admin(&["project", "create", "web"]));
    let api = Teammate::new(&server, &server.admin(&["project", "create", "api"]));
    let (a, b) = (checkout(), checkout());
    let first = web.build_ok(&[a.path().to_str().unwrap()]);
    let id = first.rsplit("build ").next().unwrap().split_whitespace().next().unwrap().to_string();
    // Identical content in another project: every file is asked for again (the builder
    // does not let one project learn, or use, another's blobs by digest) and nothing hits.
    let second = api.build_ok(&[b.path().to_str().unwrap()]);
    assert_eq!(count_before(&second, "files sent"), 3, "{second}");
    assert_eq!(count_before(&second, "cached"), 0, "{second}");
    // Another project's build record is not found.
    let out = api.cmd().args(["builds", "show", &id]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no build"), "{}", String::from_utf8_lossy(&out.stderr));
    let ls = api.cmd().args(["builds", "ls"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ls.stdout).contains(&id));
}

#[test]
fn ten_concurrent_builds_run_shared_steps_once() {
    if !lab_available() {
        return;
    }
    let server = Server::start();
    let token = server.admin(&["project", "create", "ci"]);
    let shared = unique("once");
    let first = format!("RUN --mount=type=cache,target=/c,id={shared} echo ran >> /c/count && sleep 1");
    let mates: Vec<Teammate> = (0..10).map(|_| Teammate::new(&server, &token)).collect();
    let ctxs: Vec<_> =
        (0..10).map(|i| context(&[("Dockerfile", &format!("FROM {}\n{first}\nRUN echo {} > /mine\n", busybox(), i % 3))])).collect();
    let outs = tempfile::tempdir_in(test_tmp()).unwrap();
    let children: Vec<_> = (0..10)
        .map(|i| {
            mates[i]
                .cmd()
                .args(["build", "--progress=plain", "-o", &format!("type=local,dest={}", outs.path().join(i.to_string()).display())])
                .arg(ctxs[i].path())
                .stderr(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "build {i}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read_to_string(outs.path().join(i.to_string()).join("mine")).unwrap(), format!("{}\n", i % 3));
    }
    let probe =
        context(&[("Dockerfile", &format!("FROM {}\nRUN --mount=type=cache,target=/c,id={shared} cp /c/count /count\n", busybox()))]);
    let dest = outs.path().join("probe");
    mates[0].build_ok(&["-o", &format!("type=local,dest={}", dest.display()), probe.path().to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(dest.join("count")).unwrap(), "ran\n", "the shared step ran exactly once");
}

#[test]
fn kill_9_mid_build_then_restart_recovers() {
    if !lab_available() {
        return;
    }
    let mut server = Server::start();
    let mate = Teammate::new(&server, &server.admin(&["project", "create", "p"]));
    let marker = unique("k9");
    let ctx = context(&[
        ("f.txt", "content\n"),
        ("Dockerfile", &format!("FROM {}\nCOPY f.txt /f.txt\nRUN echo {marker} && sleep 600\n", busybox())),
    ]);
    let mut child =
        mate.cmd().args(["build", "--progress=plain"]).arg(ctx.path()).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("the RUN never started");
        if l.contains(&marker) && !l.contains("RUN") {
            break;
        }
    }
    server.kill9();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the client reports the lost builder");

    server.spawn();
    // Recovery: the leftover container is killed and its mounts are gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !mounts_under(server.root.path()).is_empty() {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(mounts_under(server.root.path()).is_empty(), "{:?}", mounts_under(server.root.path()));
    let ps = Command::new("pgrep").args(["-f", &format!("echo {marker}")]).output().unwrap();
    assert!(String::from_utf8_lossy(&ps.stdout).trim().is_empty(), "the killed build's process survived");
    // The next build is correct.
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {}\nCOPY f.txt /f.txt\nRUN cat /f.txt > /g.txt\n", busybox())).unwrap();
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    mate.build_ok(&["-o", &format!("type=local,dest={}", out.path().display()), ctx.path().to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(out.path().join("g.txt")).unwrap(), "content\n");
}

#[test]
fn tls_and_the_loopback_rule() {
    if !lab_available() {
        return;
    }
    let certs = tempfile::tempdir_in(test_tmp()).unwrap();
    let p = |n: &str| certs.path().join(n);
    let (ca, cert, key) = (p("ca.pem"), p("cert.pem"), p("key.pem"));
    std::fs::write(p("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
        .unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(certs.path()).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=hoist-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "req.csr"]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    let root = tempfile::tempdir_in(test_tmp()).unwrap();
    let port = free_port();
    let mut server = Server {
        root,
        port,
        child: None,
        extra: vec!["--tls-cert".into(), cert.display().to_string(), "--tls-key".into(), key.display().to_string()],
        env: Vec::new(),
    };
    server.spawn();
    let token = server.admin(&["project", "create", "secure"]);
    let mut mate = Teammate::new(&server, &token);
    mate.builder = format!("tls://localhost:{port}");
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nRUN echo tls > /t\n", busybox()))]);
    let out = mate.cmd().args(["build", "--progress=plain", "--tls-ca"]).arg(&ca).arg(ctx.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Without trusting the CA the connection is refused.
    let out = mate.cmd().args(["build", "--progress=plain"]).arg(ctx.path()).output().unwrap();
    assert!(!out.status.success());
    // Plain TCP is refused on a non-loopback address without --insecure.
    let out = Command::new(hoist_bin())
        .args(["serve", "--root", certs.path().to_str().unwrap(), "--listen", &format!("tcp://0.0.0.0:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn cache_du_prune_reset_and_automatic_gc() {
    if !lab_available() {
        return;
    }
    let server = Server::start();
    let mate = Teammate::new(&server, &server.admin(&["project", "create", "gc"]));
    let ctx = checkout();
    let dir = ctx.path().to_str().unwrap();
    mate.build_ok(&[dir]);
    let du = |m: &Teammate| String::from_utf8_lossy(&m.cmd().args(["cache", "du"]).output().unwrap().stdout).into_owned();
    let before = du(&mate);
    assert!(count_before(&before, "(") >= 3, "layers of the base and of the steps: {before}");
    let layers_on_disk = || std::fs::read_dir(server.root.path().join("snapshots/layers")).map(|d| d.count()).unwrap_or(0);
    let n = layers_on_disk();
    assert!(n >= 3, "{n}");
    let pruned = String::from_utf8_lossy(&mate.cmd().args(["cache", "prune", "--keep-storage", "0"]).output().unwrap().stdout).into_owned();
    assert!(pruned.contains("layers:         0"), "{pruned}");
    assert_eq!(layers_on_disk(), 0, "unreferenced layers are deleted");
    let again = mate.build_ok(&[dir]);
    assert_eq!(count_before(&again, "cached"), 0, "pruned steps run again: {again}");
    // Reset drops the context files too: the next build sends everything.
    let reset = String::from_utf8_lossy(&mate.cmd().args(["cache", "reset"]).output().unwrap().stdout).into_owned();
    assert!(reset.contains("records:        0"), "{reset}");
    let after = mate.build_ok(&[dir]);
    assert_eq!(count_before(&after, "files sent"), 3, "only what the Dockerfile reads: {after}");
    // A tiny limit makes the automatic GC prune after each build.
    server.admin(&["project", "limit", "gc", "1"]);
    std::fs::write(ctx.path().join("README"), "changed\n").unwrap();
    mate.build_ok(&[dir]);
    let du_after = du(&mate);
    assert!(du_after.contains("layers:         0"), "{du_after}");
}

/// Issue 15: a base image's `ONBUILD COPY` reads context paths the client cannot know of
/// when it picks what to send. The builder asks the client for them during the build, so
/// it works on a remote builder without any setting, and nothing else of the context is
/// sent.
#[test]
fn onbuild_copy_of_a_base_image_gets_its_files_from_the_client_during_the_build() {
    if !lab_available() {
        return;
    }
    let server = Server::start();
    let token = server.admin(&["project", "create", "ob"]);
    let dev = Teammate::new(&server, &token);
    let base = format!("{}/hoist-test/onbuild-{}:1", registry(), std::process::id());
    let base_ctx = context(&[(
        "Dockerfile",
        &format!("FROM {}\nONBUILD COPY app.txt /app/app.txt\nONBUILD RUN cat /app/app.txt > /app/seen\n", busybox()),
    )]);
    dev.build_ok(&["-t", &base, "--push", base_ctx.path().to_str().unwrap()]);

    let unrelated = "unrelated ".repeat(100_000);
    let ctx = context(&[
        ("Dockerfile", &format!("FROM {base}\nCMD [\"sh\"]\n")),
        ("app.txt", "from the context\n"),
        ("unrelated.txt", &unrelated),
    ]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    let err = dev.build_ok(&["-o", &format!("type=local,dest={}", dest.display()), ctx.path().to_str().unwrap()]);
    assert!(err.contains("fetching context paths the client did not send: app.txt"), "{err}");
    assert_eq!(std::fs::read_to_string(dest.join("app/app.txt")).unwrap(), "from the context\n");
    assert_eq!(std::fs::read_to_string(dest.join("app/seen")).unwrap(), "from the context\n");
    // Only what the trigger read was sent.
    let hex = sha256_digest(unrelated.as_bytes()).trim_start_matches("sha256:").to_string();
    let found = std::process::Command::new("find").arg(server.root.path()).args(["-name", &hex]).output().unwrap();
    assert!(found.stdout.is_empty(), "the unrelated file was sent");
    // A change to the file the trigger reads is seen by the next build.
    std::fs::write(ctx.path().join("app.txt"), "changed\n").unwrap();
    let dest2 = out.path().join("fs2");
    dev.build_ok(&["-o", &format!("type=local,dest={}", dest2.display()), ctx.path().to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(dest2.join("app/seen")).unwrap(), "changed\n");
}

/// The entries of `archive`'s last layer: (path, Some(link target) for hard links).
fn last_layer_links(archive: &OciArchive) -> Vec<(String, Option<String>)> {
    let layers = archive.manifest()["layers"].as_array().unwrap().clone();
    let last = layers.last().unwrap();
    let blob = archive.blob(last["digest"].as_str().unwrap());
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    tar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let link =
                (e.header().entry_type() == tar::EntryType::Link).then(|| e.link_name().unwrap().unwrap().to_string_lossy().into_owned());
            (path, link)
        })
        .collect()
}

/// Issue 15: files hard-linked to each other in the context stay hard links in the layer
/// after COPY (as BuildKit keeps them within one COPY source), with a remote builder, and an
/// incremental sync follows a change of the links.
#[test]
fn hard_links_in_the_context_stay_links_in_the_layer_from_a_remote_client() {
    if !lab_available() {
        return;
    }
    let server = Server::start();
    let token = server.admin(&["project", "create", "hl"]);
    let dev = Teammate::new(&server, &token);
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nCOPY dir /dir/\n", busybox())), ("dir/a", "shared\n"), ("dir/c", "shared\n")]);
    std::fs::hard_link(ctx.path().join("dir/a"), ctx.path().join("dir/b")).unwrap();
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let export = |n: u32| {
        let dest = out.path().join(format!("img{n}.tar"));
        dev.build_ok(&["-o", &format!("type=oci,dest={}", dest.display()), ctx.path().to_str().unwrap()]);
        last_layer_links(&OciArchive::read(&dest))
    };
    let entries = export(1);
    let link_of = |e: &[(String, Option<String>)], p: &str| {
        e.iter().find(|(path, _)| path == p).unwrap_or_else(|| panic!("{p} not in {e:?}")).1.clone()
    };
    assert_eq!(link_of(&entries, "dir/b"), Some("dir/a".into()), "{entries:?}");
    assert_eq!(link_of(&entries, "dir/c"), None, "equal content is not a link");
    // b becomes a copy, c a link: the next sync and COPY follow.
    std::fs::remove_file(ctx.path().join("dir/b")).unwrap();
    std::fs::copy(ctx.path().join("dir/a"), ctx.path().join("dir/b")).unwrap();
    std::fs::remove_file(ctx.path().join("dir/c")).unwrap();
    std::fs::hard_link(ctx.path().join("dir/a"), ctx.path().join("dir/c")).unwrap();
    let entries = export(2);
    assert_eq!(link_of(&entries, "dir/b"), None, "{entries:?}");
    assert_eq!(link_of(&entries, "dir/c"), Some("dir/a".into()), "{entries:?}");
}
