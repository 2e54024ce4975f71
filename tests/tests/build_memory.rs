//! End-to-end: `hoist serve --build-memory` holds every RUN step of a build to one memory
//! limit, and a step killed for it fails saying which limit and which flag.

mod common;

use common::*;

/// `hoist/build-*` cgroups below this process's v1 memory cgroup (where the server, our
/// child, has runc put them); `None` without a v1 memory hierarchy.
fn build_cgroups_left() -> Option<Vec<String>> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        ctrls.split(',').any(|c| c == "memory").then(|| path.to_string())
    })?;
    let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')).join("hoist");
    let names = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect::<Vec<_>>())
        .unwrap_or_default();
    Some(names.into_iter().filter(|n| n.starts_with("build-")).collect())
}

#[test]
fn a_build_over_its_memory_limit_fails_naming_the_limit_and_one_under_it_succeeds() {
    if !lab_available() {
        return;
    }
    let mut server = Server {
        root: tempfile::Builder::new().prefix("hoist-server-").tempdir_in(test_tmp()).unwrap(),
        port: free_port(),
        child: None,
        extra: vec!["--build-memory".into(), "64MB".into()],
        env: Vec::new(),
    };
    server.spawn();
    let mate = Teammate::new(&server, &server.admin(&["project", "create", "mem"]));

    // Two stages at once, each well under the limit together: the build succeeds.
    let small = context(&[(
        "Dockerfile",
        &format!(
            "FROM {b} AS a\nRUN dd if=/dev/zero of=/dev/null bs=16M count=1 && echo a > /a\n\
             FROM {b}\nRUN dd if=/dev/zero of=/dev/null bs=16M count=1 && echo b > /b\nCOPY --from=a /a /a\n",
            b = busybox()
        ),
    )]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    mate.build_ok(&["-o", &format!("type=local,dest={}", out.path().display()), small.path().to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(out.path().join("a")).unwrap(), "a\n");
    assert_eq!(std::fs::read_to_string(out.path().join("b")).unwrap(), "b\n");

    // A RUN that needs ~200 MB in a build limited to 64 MiB: killed, and the error says why.
    let big = context(&[("Dockerfile", &format!("FROM {}\nRUN dd if=/dev/zero of=/dev/null bs=200M count=1\n", busybox()))]);
    let o = mate.build(&[big.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the 200 MB step succeeded under a 64 MiB limit:\n{stderr}");
    assert!(
        stderr.contains("killed: the build reached its memory limit of 64 MiB (hoist serve --build-memory)"),
        "the error names the limit and the flag:\n{stderr}\nserver log:\n{}",
        server.log()
    );
    assert!(stderr.contains("Dockerfile:2"), "{stderr}");

    // Each build's cgroup went with it.
    if let Some(left) = build_cgroups_left() {
        assert!(left.is_empty(), "build cgroups left: {left:?}");
    }
}
