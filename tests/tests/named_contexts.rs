//! `--build-context NAME=VALUE` (buildx's named contexts), for real: an image that replaces
//! the one `FROM NAME` names, directories read by `COPY --from`, `RUN --mount=from` and
//! `FROM`, a directory's own `.dockerignore`, and a changed file in a named directory
//! making a new result.
//!
//! Needs: the lab (tests/lab/setup.sh).

mod common;

use std::path::Path;

use common::*;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn named_contexts_replace_images_and_stages_and_bring_directories() {
    if !lab_available() {
        return;
    }
    // `base` and `tools` are not images anywhere: only the named contexts make them.
    let main = context(&[(
        "Dockerfile",
        "FROM vendor AS v\n\
         COPY --from=assets hello.txt /again.txt\n\
         FROM base\n\
         COPY --from=assets hello.txt /from-assets.txt\n\
         RUN --mount=from=assets,target=/m cp /m/hello.txt /mounted.txt\n\
         COPY --from=tools /bin/busybox /tools-busybox\n\
         COPY --from=assets / /assets-all/\n\
         COPY --from=v / /v/\n",
    )]);
    let assets = context(&[("hello.txt", "hello one\n"), ("secret.txt", "do not send\n"), (".dockerignore", "secret.txt\n")]);
    let vendor = context(&[("v.txt", "vendored\n")]);
    let h = Hoist::new();
    let build = |dest: &Path| {
        h.build_ok(&[
            "--build-context",
            &format!("base=docker-image://{}", busybox()),
            "--build-context",
            &format!("tools=docker-image://{}", busybox()),
            "--build-context",
            &format!("assets={}", assets.path().display()),
            "--build-context",
            &format!("vendor={}", vendor.path().display()),
            "-o",
            &format!("type=local,dest={}", dest.display()),
            main.path().to_str().unwrap(),
        ])
    };
    let out = tempfile::tempdir().unwrap();
    build(out.path());
    let o = out.path();
    assert_eq!(read(&o.join("from-assets.txt")), "hello one\n", "COPY --from a named directory");
    assert_eq!(read(&o.join("mounted.txt")), "hello one\n", "RUN --mount=from a named directory");
    assert!(o.join("tools-busybox").is_file(), "COPY --from a named image");
    assert!(o.join("bin/busybox").is_file(), "FROM a named image");
    assert!(!o.join("assets-all/secret.txt").exists(), "the directory's .dockerignore is honoured");
    assert_eq!(read(&o.join("v/v.txt")), "vendored\n", "FROM a named directory");
    assert_eq!(read(&o.join("v/again.txt")), "hello one\n", "a stage on a named directory runs its own steps");

    // A changed file in a named directory is a new result (its content is in the cache key).
    std::fs::write(assets.path().join("hello.txt"), "hello two\n").unwrap();
    let out2 = tempfile::tempdir().unwrap();
    build(out2.path());
    assert_eq!(read(&out2.path().join("from-assets.txt")), "hello two\n");
    assert_eq!(read(&out2.path().join("mounted.txt")), "hello two\n");

    // A value that is neither a directory nor a known scheme is named in the error.
    let bad = h.build(&["--build-context", "x=/does/not/exist", main.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains("--build-context x=/does/not/exist: not a directory"), "{stderr}");
}

/// `oci-layout://DIR[:TAG|@DIGEST]`: the image of an OCI layout on the client (here one
/// hoist exported) is uploaded and built on, by tag and by digest, and never pulled: also
/// with `--pull`. A tag the layout lacks is named with the ones it has.
#[test]
fn an_oci_layout_image_is_a_named_context() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let base = context(&[("Dockerfile", &format!("FROM {}\nRUN echo from-the-layout > /marker\n", busybox()))]);
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    let tar = tmp.path().join("layout.tar");
    h.build_ok(&["-t", "layout-base:v1", "-o", &format!("type=oci,dest={}", tar.display()), base.path().to_str().unwrap()]);
    let layout = tmp.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    let untar = std::process::Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&layout).status().unwrap();
    assert!(untar.success());
    let index: serde_json::Value = serde_json::from_str(&read(&layout.join("index.json"))).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap().to_string();

    let main = context(&[("Dockerfile", "FROM base\nRUN cat /marker > /seen\n")]);
    for value in [format!("{}:v1", layout.display()), format!("{}@{digest}", layout.display())] {
        let out = tempfile::tempdir().unwrap();
        h.build_ok(&[
            "--pull",
            "--build-context",
            &format!("base=oci-layout://{value}"),
            "-o",
            &format!("type=local,dest={}", out.path().display()),
            main.path().to_str().unwrap(),
        ]);
        assert_eq!(read(&out.path().join("seen")), "from-the-layout\n", "FROM the layout's image ({value})");
        assert!(out.path().join("bin/busybox").is_file(), "with its base layers ({value})");
    }
    let bad = h.build(&["--build-context", &format!("base=oci-layout://{}:v2", layout.display()), main.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && stderr.contains(r#"no image tagged "v2" (its tags: v1)"#), "{stderr}");
}
