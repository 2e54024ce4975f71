//! End-to-end: `hoist build` on the embedded builder, against the real Docker engine,
//! registry and runc.

mod common;

use common::*;

fn dockerfile(body: &str) -> String {
    format!("FROM {}\n{body}", busybox())
}

#[test]
fn build_load_and_run_an_image() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[
        (
            "Dockerfile",
            &dockerfile("COPY greeting.txt /srv/\nRUN cat /srv/greeting.txt > /srv/copy.txt\nCMD [\"cat\", \"/srv/copy.txt\"]\n"),
        ),
        ("greeting.txt", "hello from a test\n"),
    ]);
    let tag = unique("hoist-e2e-basic");
    h.build_ok(&["-t", &tag, "--load", ctx.path().to_str().unwrap()]);
    let out = docker_ok(&["run", "--rm", &tag]);
    assert_eq!(out, "hello from a test\n");
    let _ = docker().args(["rmi", "-f", &tag]).output();
}

#[test]
fn warm_rebuild_runs_nothing_and_rereads_nothing() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[
        ("Dockerfile", &dockerfile("COPY a.txt /a.txt\nRUN echo ran > /ran.txt\nCOPY b.txt /b.txt\nRUN cat /a.txt /b.txt > /ab.txt\n")),
        ("a.txt", "a\n"),
        ("b.txt", "b\n"),
    ]);
    let dir = ctx.path().to_str().unwrap();
    let first = h.build_ok(&[dir]);
    assert!(first.contains("4 steps run, 0 cached"), "{first}");
    let warm = h.build_ok(&[dir]);
    assert!(warm.contains("0 steps run, 4 cached"), "{warm}");
    assert!(warm.contains("0 files hashed"), "unchanged files must not be re-read: {warm}");
    assert!(warm.contains("0 files sent"), "{warm}");
    assert!(warm.contains("entries (unchanged: named, not sent)"), "the manifest is the last one: {warm}");
    // Changing b.txt reruns only the steps that read it.
    std::fs::write(ctx.path().join("b.txt"), "b changed\n").unwrap();
    let inc = h.build_ok(&[dir]);
    assert!(inc.contains("2 steps run, 2 cached"), "{inc}");
    assert!(inc.contains("1 files hashed"), "{inc}");
    assert!(inc.contains("1 files sent"), "{inc}");
    assert!(!inc.contains("named, not sent"), "{inc}");
    // A builder that no longer has the manifest named (here: a name it never answered) is
    // sent the manifest, and the build is the same.
    let records: Vec<_> = std::fs::read_dir(h.cache.path().join("statcache"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sent"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = std::fs::read_to_string(&records[0]).unwrap();
    let (ours, _) = record.split_once(' ').unwrap();
    std::fs::write(&records[0], format!("{ours} sha256:{}\n", "0".repeat(64))).unwrap();
    let forgotten = h.build_ok(&[dir]);
    assert!(forgotten.contains("0 steps run, 4 cached") && !forgotten.contains("named, not sent"), "{forgotten}");
    let named = h.build_ok(&[dir]);
    assert!(named.contains("0 steps run, 4 cached") && named.contains("named, not sent"), "{named}");
    // A mode-only change is a change (COPY keeps modes); changing it back finds the cache.
    use std::os::unix::fs::PermissionsExt;
    let a = ctx.path().join("a.txt");
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o755)).unwrap();
    let chmod = h.build_ok(&[dir]);
    assert!(chmod.contains("4 steps run, 0 cached"), "{chmod}");
    std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();
    let back = h.build_ok(&[dir]);
    assert!(back.contains("0 steps run, 4 cached"), "{back}");
}

#[test]
fn a_hit_after_a_miss_still_hits() {
    if !lab_available() {
        return;
    }
    // BuildKit-style keys: changing a LABEL (config only) between two RUNs does not
    // invalidate the second RUN, unlike a linear chain.
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &dockerfile("RUN echo one > /one\nLABEL v=1\nRUN echo two > /two\n"))]);
    let dir = ctx.path().to_str().unwrap();
    h.build_ok(&[dir]);
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile("RUN echo one > /one\nLABEL v=2\nRUN echo two > /two\n")).unwrap();
    let second = h.build_ok(&[dir]);
    assert!(second.contains("0 steps run, 2 cached"), "{second}");
}

#[test]
fn a_failing_run_names_the_line_and_keeps_earlier_cache() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &dockerfile("RUN echo fine > /fine\nRUN echo about to fail && exit 3\n"))]);
    let dir = ctx.path().to_str().unwrap();
    let out = h.build(&[dir]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Dockerfile:3"), "the error names the line: {stderr}");
    assert!(stderr.contains("exit code: 3"), "{stderr}");
    assert!(stderr.contains("about to fail"), "the step's output is shown: {stderr}");
    assert!(mounts_under(h.root.path()).is_empty(), "no mount left behind: {:?}", mounts_under(h.root.path()));
    // The first RUN is cached now.
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile("RUN echo fine > /fine\nRUN echo fixed\n")).unwrap();
    let fixed = h.build_ok(&[dir]);
    assert!(fixed.contains("1 steps run, 1 cached"), "{fixed}");
}

#[test]
fn missing_copy_source_and_unknown_instruction_are_clear_errors() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &dockerfile("COPY nope.txt /\n"))]);
    let out = h.build(&[ctx.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Dockerfile:2") && stderr.contains("nope.txt"), "{stderr}");

    let ctx = context(&[("Dockerfile", &dockerfile("RUNN echo\n"))]);
    let out = h.build(&[ctx.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Dockerfile:2") && stderr.to_lowercase().contains("unknown instruction"), "{stderr}");
}

#[test]
fn unknown_base_image_and_unreachable_registry_name_the_image() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &format!("FROM {}/library/does-not-exist:1\nRUN true\n", registry()))]);
    let out = h.build(&[ctx.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does-not-exist"), "{stderr}");
    assert!(stderr.contains("Dockerfile:1"), "{stderr}");

    let ctx = context(&[("Dockerfile", "FROM 127.0.0.1:1/library/busybox\nRUN true\n")]);
    let out = h.build(&[ctx.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
}

#[test]
fn outputs_oci_docker_tar_local_and_iidfile() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &dockerfile("RUN mkdir -p /out && echo data > /out/file\n")), ("x", "x")]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let o = out.path();
    let iid = o.join("iid");
    let meta = o.join("meta.json");
    h.build_ok(&[
        "-t",
        "example.com/outputs:1",
        "--iidfile",
        iid.to_str().unwrap(),
        "--metadata-file",
        meta.to_str().unwrap(),
        "-o",
        &format!("type=oci,dest={}", o.join("img.oci.tar").display()),
        "-o",
        &format!("type=docker,dest={}", o.join("img.docker.tar").display()),
        "-o",
        &format!("type=tar,dest={}", o.join("rootfs.tar").display()),
        "-o",
        &format!("type=local,dest={}", o.join("rootfs").display()),
        ctx.path().to_str().unwrap(),
    ]);
    let image_id = std::fs::read_to_string(&iid).unwrap();
    assert!(image_id.starts_with("sha256:"), "{image_id}");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    assert_eq!(meta["containerimage.config.digest"], image_id.as_str());
    assert_eq!(std::fs::read_to_string(o.join("rootfs/out/file")).unwrap(), "data\n");
    assert!(o.join("rootfs/bin/busybox").is_file());
    // The rootfs tar has the file.
    let mut found = false;
    let mut ar = tar::Archive::new(std::fs::File::open(o.join("rootfs.tar")).unwrap());
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().to_str() == Some("out/file") {
            found = true;
        }
    }
    assert!(found, "rootfs tar lacks out/file");
    // The OCI layout is valid for skopeo, and the docker archive loads into Docker.
    let oci = std::process::Command::new("skopeo")
        .args(["inspect", "--config", &format!("oci-archive:{}", o.join("img.oci.tar").display())])
        .output()
        .unwrap();
    assert!(oci.status.success(), "skopeo rejects the OCI archive: {}", String::from_utf8_lossy(&oci.stderr));
    let loaded = docker_ok(&["load", "-i", o.join("img.docker.tar").to_str().unwrap()]);
    assert!(loaded.contains("example.com/outputs:1"), "{loaded}");
    let id = docker_ok(&["image", "inspect", "-f", "{{.Id}}", "example.com/outputs:1"]);
    assert_eq!(id.trim(), image_id.trim(), "docker's image id is the config digest");
    let _ = docker().args(["rmi", "-f", "example.com/outputs:1"]).output();
}

#[test]
fn push_to_a_registry_and_pull_back_with_docker() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &dockerfile("RUN echo pushed > /pushed\nCMD [\"cat\", \"/pushed\"]\n"))]);
    let tag = format!("{}/e2e/{}:v1", registry(), unique("push"));
    h.build_ok(&["-t", &tag, "--push", ctx.path().to_str().unwrap()]);
    docker_ok(&["pull", &tag]);
    let out = docker_ok(&["run", "--rm", &tag]);
    assert_eq!(out, "pushed\n");
    let _ = docker().args(["rmi", "-f", &tag]).output();
}

#[test]
fn hundreds_of_context_files_arrive_whole_over_several_upload_streams() {
    if !lab_available() {
        return;
    }
    // Enough files that the client hashes them on every core and uploads them on several
    // streams; some share their content, one is larger than the client's 1 MiB chunk.
    let files: Vec<(String, String)> =
        (0..400).map(|i| (format!("d{}/f{i}.txt", i % 7), format!("file {}\n", i % 350).repeat(i % 350 % 4 + 1))).collect();
    let big = "0123456789abcdef".repeat(70_000);
    let df = dockerfile("COPY . /c/\n");
    let mut spec: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
    spec.push(("big.bin", big.as_str()));
    spec.push(("Dockerfile", df.as_str()));
    let ctx = context(&spec);
    let h = Hoist::new();
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    let stderr = h.build_ok(&["-o", &format!("type=local,dest={}", dest.display()), ctx.path().to_str().unwrap()]);
    assert!(stderr.contains("352 files sent"), "350 distinct small contents, big.bin and the Dockerfile:\n{stderr}");
    for (p, c) in files.iter().map(|(p, c)| (p.as_str(), c.as_str())).chain([("big.bin", big.as_str())]) {
        assert_eq!(std::fs::read_to_string(dest.join("c").join(p)).unwrap(), c, "{p}");
    }
}
