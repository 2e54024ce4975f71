//! End-to-end: git and HTTP contexts (`hoist build https://host/repo.git#ref:dir`, a
//! tarball URL), fetched by the client from a repository this test makes and serves on
//! loopback — over git's "dumb" HTTP protocol from a tiny static file server here, and over
//! `git daemon` (git://, where fetches are shallow).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main", "-c", "protocol.file.allow=always"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Serves the files under `root` over HTTP/1.0 on a loopback port until the process ends;
/// `.tar.gz` files as application/gzip. Returns the base URL.
fn serve_dir(root: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let root = root.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                // Drain the headers.
                let mut h = String::new();
                while reader.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
                    h.clear();
                }
                let path = line.split(' ').nth(1).unwrap_or("/").split('?').next().unwrap_or("/");
                let file = root.join(path.trim_start_matches('/'));
                let ok = !path.contains("..") && file.is_file();
                let _ = match ok.then(|| std::fs::read(&file).ok()).flatten() {
                    Some(body) => {
                        let ct = if path.ends_with(".tar.gz") { "application/gzip" } else { "application/octet-stream" };
                        conn.write_all(
                            format!("HTTP/1.0 200 OK\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
                        )
                        .and_then(|_| conn.write_all(&body))
                    }
                    None => conn.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
                };
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

/// A repository with a branch `main` (`v: main`), a tag `v1` (`v: tagged`) and a later
/// commit on a branch `next` (`v: next`); `app/` has its own Dockerfile. Returns the
/// served directory (holding `repo.git`, a bare clone) and the commit of the tag.
fn make_repo() -> (tempfile::TempDir, String) {
    let served = tempfile::Builder::new().prefix("git-served-").tempdir_in(test_tmp()).unwrap();
    let work = tempfile::Builder::new().prefix("git-work-").tempdir_in(test_tmp()).unwrap();
    let w = work.path();
    git(w, &["init", "-q"]);
    let df = format!("FROM {}\nCOPY v /v\nCOPY app/who /who\n", busybox());
    std::fs::write(w.join("Dockerfile"), &df).unwrap();
    std::fs::create_dir_all(w.join("app")).unwrap();
    std::fs::write(w.join("app/who"), "root-context\n").unwrap();
    std::fs::write(w.join("app/Dockerfile"), format!("FROM {}\nCOPY who /who\nCOPY v /v\n", busybox())).unwrap();
    std::fs::write(w.join("app/v"), "app-dir\n").unwrap();
    std::fs::write(w.join("v"), "tagged\n").unwrap();
    std::fs::write(w.join("git.Dockerfile"), format!("FROM {}\nCOPY .git/HEAD /githead\n", busybox())).unwrap();
    git(w, &["add", "-A"]);
    git(w, &["commit", "-q", "-m", "tagged"]);
    git(w, &["tag", "-a", "v1", "-m", "v1"]);
    let tagged = git(w, &["rev-parse", "HEAD"]);
    std::fs::write(w.join("v"), "main\n").unwrap();
    git(w, &["commit", "-q", "-am", "main"]);
    git(w, &["checkout", "-q", "-b", "next"]);
    std::fs::write(w.join("v"), "next\n").unwrap();
    git(w, &["commit", "-q", "-am", "next"]);
    git(w, &["checkout", "-q", "main"]);
    git(served.path(), &["clone", "-q", "--bare", &w.display().to_string(), "repo.git"]);
    // Dumb HTTP needs info/refs and objects/info/packs.
    git(&served.path().join("repo.git"), &["update-server-info"]);
    (served, tagged)
}

/// `hoist build --progress=plain ARGS...` with `tmp` as its TMPDIR.
fn build(h: &Hoist, tmp: &Path, args: &[&str]) -> std::process::Output {
    h.cmd().env("TMPDIR", tmp).arg("build").arg("--progress=plain").args(args).output().expect("running hoist")
}

/// `hoist build ARGS... -o type=local,dest=OUT` → the files `names` of the result.
fn build_files(h: &Hoist, tmp: &Path, args: &[&str], names: &[&str]) -> Vec<String> {
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    let mut a: Vec<String> = vec!["-o".into(), format!("type=local,dest={}", dest.display())];
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = build(h, tmp, &a);
    assert!(o.status.success(), "hoist build {a:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    names.iter().map(|n| std::fs::read_to_string(dest.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"))).collect()
}

/// Temporary directories the client made for git contexts in `tmp`.
fn checkouts_in(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("hoist-git-context"))
        .collect()
}

#[test]
fn git_context_over_http_by_branch_tag_commit_and_subdir() {
    if !lab_available() {
        return;
    }
    let (served, tagged) = make_repo();
    let base = serve_dir(served.path().to_path_buf());
    let repo = format!("{base}/repo.git");
    let h = Hoist::new();
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    let t = tmp.path();

    assert_eq!(build_files(&h, t, &[&repo], &["v", "who"]), ["main\n", "root-context\n"], "default: the remote's HEAD");
    assert_eq!(build_files(&h, t, &[&format!("{repo}#next")], &["v"]), ["next\n"], "a branch");
    assert_eq!(build_files(&h, t, &[&format!("{repo}#v1")], &["v"]), ["tagged\n"], "a tag");
    assert_eq!(build_files(&h, t, &[&format!("{repo}#{tagged}")], &["v"]), ["tagged\n"], "a commit");
    // `:app`: the context and the Dockerfile are those of the subdirectory.
    assert_eq!(build_files(&h, t, &[&format!("{repo}#next:app")], &["v", "who"]), ["app-dir\n", "root-context\n"]);
    // -f is relative to the context subdirectory.
    let out = build(&h, t, &["-f", "nope/Dockerfile", &format!("{repo}#main:app")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("app/nope/Dockerfile"), "{stderr}");

    // Failures name the URL and the ref; nothing is left behind.
    let out = build(&h, t, &[&format!("{repo}#no-such-branch")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("git context {repo} at ref \"no-such-branch\"")), "{stderr}");
    let out = build(&h, t, &[&format!("{repo}#main:missing")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("subdirectory \"missing\" not found"), "{stderr}");
    assert_eq!(checkouts_in(t), Vec::<String>::new(), "the client removed its checkouts, also after failures");
}

#[test]
fn git_context_over_git_daemon() {
    if !lab_available() {
        return;
    }
    let (served, _) = make_repo();
    let port = free_port();
    let mut daemon = Command::new("git")
        .args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--listen=127.0.0.1",
            &format!("--port={port}"),
            &format!("--base-path={}", served.path().display()),
            &served.path().display().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("git daemon (package git-daemon-run or git's own)");
    // Wait for it to listen.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let h = Hoist::new();
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    let url = format!("git://127.0.0.1:{port}/repo.git#v1:app");
    let got = build_files(&h, tmp.path(), &[&url], &["v", "who"]);
    // .git is dropped unless BUILDKIT_CONTEXT_KEEP_GIT_DIR asks for it, as with BuildKit.
    let repo = format!("git://127.0.0.1:{port}/repo.git#v1");
    let kept =
        build_files(&h, tmp.path(), &["-f", "git.Dockerfile", "--build-arg", "BUILDKIT_CONTEXT_KEEP_GIT_DIR=1", &repo], &["githead"]);
    let dropped = build(&h, tmp.path(), &["-f", "git.Dockerfile", &repo]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_eq!(got, ["app-dir\n", "root-context\n"]);
    assert!(!kept[0].is_empty(), "HEAD of the kept .git");
    assert!(!dropped.status.success(), "COPY .git/HEAD without BUILDKIT_CONTEXT_KEEP_GIT_DIR");
}

#[test]
fn tarball_and_dockerfile_urls() {
    if !lab_available() {
        return;
    }
    let served = tempfile::Builder::new().prefix("http-served-").tempdir_in(test_tmp()).unwrap();
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nCOPY f /f\n", busybox())), ("f", "from-tarball\n")]);
    let status = Command::new("tar")
        .args(["czf", &served.path().join("ctx.tar.gz").display().to_string(), "-C", &ctx.path().display().to_string(), "."])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(served.path().join("Dockerfile"), format!("FROM {}\nRUN echo from-dockerfile-url > /f\n", busybox())).unwrap();
    let base = serve_dir(served.path().to_path_buf());
    let h = Hoist::new();
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    let t = tmp.path();
    assert_eq!(build_files(&h, t, &[&format!("{base}/ctx.tar.gz")], &["f"]), ["from-tarball\n"]);
    assert_eq!(build_files(&h, t, &[&format!("{base}/Dockerfile")], &["f"]), ["from-dockerfile-url\n"], "a Dockerfile, no context");
    let out = build(&h, t, &[&format!("{base}/missing.tar.gz")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&format!("fetching the context {base}/missing.tar.gz")) && stderr.contains("404"),
        "{stderr}"
    );
}

/// Submodules are part of a git context, as with docker build.
#[test]
fn git_context_with_a_submodule() {
    if !lab_available() {
        return;
    }
    let served = tempfile::Builder::new().prefix("git-served-").tempdir_in(test_tmp()).unwrap();
    let base = serve_dir(served.path().to_path_buf());
    let work = tempfile::Builder::new().prefix("git-work-").tempdir_in(test_tmp()).unwrap();
    let (lib, top) = (work.path().join("lib"), work.path().join("top"));
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::create_dir_all(&top).unwrap();
    git(&lib, &["init", "-q"]);
    std::fs::write(lib.join("lib.txt"), "from-submodule\n").unwrap();
    git(&lib, &["add", "-A"]);
    git(&lib, &["commit", "-q", "-m", "lib"]);
    git(served.path(), &["clone", "-q", "--bare", &lib.display().to_string(), "lib.git"]);
    git(&served.path().join("lib.git"), &["update-server-info"]);
    git(&top, &["init", "-q"]);
    std::fs::write(top.join("Dockerfile"), format!("FROM {}\nCOPY lib/lib.txt /lib.txt\n", busybox())).unwrap();
    git(&top, &["submodule", "add", "-q", &format!("{base}/lib.git"), "lib"]);
    git(&top, &["add", "-A"]);
    git(&top, &["commit", "-q", "-m", "top"]);
    git(served.path(), &["clone", "-q", "--bare", &top.display().to_string(), "top.git"]);
    git(&served.path().join("top.git"), &["update-server-info"]);
    let h = Hoist::new();
    let tmp = tempfile::tempdir_in(test_tmp()).unwrap();
    assert_eq!(build_files(&h, tmp.path(), &[&format!("{base}/top.git")], &["lib.txt"]), ["from-submodule\n"]);
}
