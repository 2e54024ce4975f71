//! End-to-end: RUN mounts, secrets, ADD, stdin contexts, platforms, concurrent builds.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use common::*;

fn rootfs_file(h: &Hoist, ctx: &std::path::Path, extra: &[&str], path: &str) -> Option<Vec<u8>> {
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    let mut args = vec!["-o".to_string(), format!("type=local,dest={}", dest.display())];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(ctx.display().to_string());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    h.build_ok(&a);
    std::fs::read(dest.join(path.trim_start_matches('/'))).ok()
}

#[test]
fn cache_mounts_persist_and_stay_out_of_layers() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let df =
        |n: u32| format!("FROM {}\nRUN --mount=type=cache,target=/cache echo run{n} >> /cache/log && cp /cache/log /seen\n", busybox());
    let ctx = context(&[("Dockerfile", &df(1))]);
    let first = rootfs_file(&h, ctx.path(), &[], "/seen").unwrap();
    assert_eq!(String::from_utf8_lossy(&first), "run1\n");
    std::fs::write(ctx.path().join("Dockerfile"), df(2)).unwrap();
    let second = rootfs_file(&h, ctx.path(), &[], "/seen").unwrap();
    assert_eq!(String::from_utf8_lossy(&second), "run1\nrun2\n", "the cache dir persisted between builds");
    assert!(rootfs_file(&h, ctx.path(), &[], "/cache/log").is_none(), "the cache is not in the image");
}

#[test]
fn secrets_are_mounted_but_never_stored() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let token = unique("SECRET-VALUE");
    let secret_file = tempfile::NamedTempFile::new_in(test_tmp()).unwrap();
    std::fs::write(secret_file.path(), &token).unwrap();
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN --mount=type=secret,id=tok cat /run/secrets/tok | wc -c > /len && test -f /run/secrets/tok\nRUN --mount=type=secret,id=tok,env=TOKEN sh -c 'test -n \"$TOKEN\" && echo present > /env'\n",
            busybox()
        ),
    )]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let tarpath = out.path().join("fs.tar");
    let stderr = h.build_ok(&[
        "--secret",
        &format!("id=tok,src={}", secret_file.path().display()),
        "-o",
        &format!("type=tar,dest={}", tarpath.display()),
        ctx.path().to_str().unwrap(),
    ]);
    assert!(!stderr.contains(&token), "the secret is not in the log");
    let bytes = std::fs::read(&tarpath).unwrap();
    assert!(!String::from_utf8_lossy(&bytes).contains(&token), "the secret is not in the image");
    let mut ar = tar::Archive::new(bytes.as_slice());
    let mut len = None;
    let mut env = None;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let mut s = String::new();
        if p == "len" {
            e.read_to_string(&mut s).unwrap();
            len = Some(s.trim().to_string());
        } else if p == "env" {
            e.read_to_string(&mut s).unwrap();
            env = Some(s.trim().to_string());
        } else {
            assert!(!p.starts_with("run/secrets/"), "no secret mount point left: {p}");
        }
    }
    assert_eq!(len.as_deref(), Some(token.len().to_string().as_str()));
    assert_eq!(env.as_deref(), Some("present"));
    // A required secret that was not given is an error naming it.
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {}\nRUN --mount=type=secret,id=needed,required=true true\n", busybox()))
        .unwrap();
    let r = h.build(&[ctx.path().to_str().unwrap()]);
    assert!(!r.status.success());
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("needed") && stderr.contains("Dockerfile:2"), "{stderr}");
}

#[test]
fn bind_and_tmpfs_mounts() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[
        ("src/input.txt", "from the context\n"),
        (
            "Dockerfile",
            &format!(
                "FROM {bb} AS data\nRUN echo from-stage > /stagefile\n\
                 FROM {bb}\n\
                 RUN --mount=type=bind,source=src,target=/mnt cat /mnt/input.txt > /ctx.txt\n\
                 RUN --mount=type=bind,from=data,source=/stagefile,target=/sf cat /sf > /stage.txt\n\
                 RUN --mount=type=tmpfs,target=/scratch echo t > /scratch/t && cat /scratch/t > /tmpfs.txt\n\
                 RUN --mount=type=bind,source=src,target=/mnt,rw echo changed > /mnt/input.txt\n",
                bb = busybox()
            ),
        ),
    ]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    h.build_ok(&["-o", &format!("type=local,dest={}", dest.display()), ctx.path().to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(dest.join("ctx.txt")).unwrap(), "from the context\n");
    assert_eq!(std::fs::read_to_string(dest.join("stage.txt")).unwrap(), "from-stage\n");
    assert_eq!(std::fs::read_to_string(dest.join("tmpfs.txt")).unwrap(), "t\n");
    assert!(!dest.join("scratch/t").exists(), "tmpfs content is not in the image");
    assert!(!dest.join("mnt/input.txt").exists(), "bind mount content is not in the image");
    assert_eq!(
        std::fs::read_to_string(ctx.path().join("src/input.txt")).unwrap(),
        "from the context\n",
        "rw bind never writes the context"
    );
}

#[test]
fn ssh_agent_socket_is_forwarded() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let dir = tempfile::tempdir_in(test_tmp()).unwrap();
    let sock = dir.path().join("agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let ctx =
        context(&[("Dockerfile", &format!("FROM {}\nRUN --mount=type=ssh test -S \"$SSH_AUTH_SOCK\" && echo yes > /ssh\n", busybox()))]);
    let got = rootfs_file(&h, ctx.path(), &["--ssh", &format!("default={}", sock.display())], "/ssh").unwrap();
    assert_eq!(String::from_utf8_lossy(&got), "yes\n");
}

/// ADD: a local tar is extracted (gzip, detected by content), a URL is downloaded and its
/// checksum verified.
#[test]
fn add_archives_and_urls() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[]);
    // A gzipped tar in the context.
    let mut tarball = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    let mut hdr = tar::Header::new_gnu();
    hdr.set_size(6);
    hdr.set_mode(0o640);
    hdr.set_cksum();
    tarball.append_data(&mut hdr, "pkg/inside.txt", &b"inside"[..]).unwrap();
    let gz = tarball.into_inner().unwrap().finish().unwrap();
    std::fs::write(ctx.path().join("bundle.tar.gz"), gz).unwrap();
    // A one-file HTTP server.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let body = b"downloaded\n";
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = s.write_all(body);
        }
    });
    let sum = {
        use sha2::Digest;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(b"downloaded\n")))
    };
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {}\nADD bundle.tar.gz /opt/\nADD --checksum={sum} http://127.0.0.1:{port}/files/dl.txt /dl/\n", busybox()),
    )
    .unwrap();
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    h.build_ok(&["-o", &format!("type=local,dest={}", dest.display()), ctx.path().to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(dest.join("opt/pkg/inside.txt")).unwrap(), "inside");
    assert_eq!(std::fs::read_to_string(dest.join("dl/dl.txt")).unwrap(), "downloaded\n");
    // A wrong checksum fails naming the URL.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {}\nADD --checksum=sha256:{} http://127.0.0.1:{port}/files/dl.txt /dl/\n", busybox(), "0".repeat(64)),
    )
    .unwrap();
    let r = h.build(&[ctx.path().to_str().unwrap()]);
    assert!(!r.status.success());
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("Dockerfile:2") && stderr.contains("checksum"), "{stderr}");
}

/// `-f -` (Dockerfile on stdin) and `-` (a tar context on stdin).
#[test]
fn dockerfile_and_context_from_stdin() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("f.txt", "stdin-df\n")]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    // `hoist build ARGS -o type=local,dest=OUT/NAME` with `stdin` on its stdin; the
    // output directory.
    let build = |name: &str, args: &[&str], stdin: &[u8]| {
        let dest = out.path().join(name);
        let mut child = h
            .cmd()
            .args(["build", "--progress=plain", "-o", &format!("type=local,dest={}", dest.display())])
            .args(args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let r = child.wait_with_output().unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        dest
    };
    let dest = build("a", &["-f", "-", ctx.path().to_str().unwrap()], format!("FROM {}\nCOPY f.txt /f.txt\n", busybox()).as_bytes());
    assert_eq!(std::fs::read_to_string(dest.join("f.txt")).unwrap(), "stdin-df\n");

    // A tar with a Dockerfile and a file.
    let mut b = tar::Builder::new(Vec::new());
    for (name, content) in [("Dockerfile", format!("FROM {}\nCOPY g.txt /g.txt\n", busybox())), ("g.txt", "from-tar\n".to_string())] {
        let mut hdr = tar::Header::new_gnu();
        hdr.set_size(content.len() as u64);
        hdr.set_mode(0o644);
        hdr.set_cksum();
        b.append_data(&mut hdr, name, content.as_bytes()).unwrap();
    }
    let tarball = b.into_inner().unwrap();
    let dest = build("b", &["-"], &tarball);
    assert_eq!(std::fs::read_to_string(dest.join("g.txt")).unwrap(), "from-tar\n");

    // The same tar gzipped (`docker build - < ctx.tar.gz`), as docker takes it: a context,
    // not a Dockerfile.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tarball).unwrap();
    let dest = build("c", &["-"], &gz.finish().unwrap());
    assert_eq!(std::fs::read_to_string(dest.join("g.txt")).unwrap(), "from-tar\n");
}

/// A foreign platform runs under qemu emulation; the image says arm64.
#[test]
fn arm64_build_under_emulation() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[("Dockerfile", &format!("FROM {}\nARG TARGETARCH\nRUN echo $(uname -m) $TARGETARCH > /arch\n", busybox()))]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    let meta = out.path().join("meta.json");
    h.build_ok(&[
        "--platform",
        "linux/arm64",
        "--metadata-file",
        meta.to_str().unwrap(),
        "-o",
        &format!("type=local,dest={}", dest.display()),
        ctx.path().to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(dest.join("arch")).unwrap(), "aarch64 arm64\n");
    let file = Command::new("file").arg(dest.join("bin/busybox")).output();
    if let Ok(f) = file {
        let s = String::from_utf8_lossy(&f.stdout);
        if !s.is_empty() {
            assert!(s.contains("aarch64") || s.contains("ARM"), "{s}");
        }
    }
}

/// Several builds at once on one builder: all correct, and a step they share runs once.
#[test]
fn concurrent_builds_share_work_safely() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let shared = unique("shared");
    // Every build has the same first step; it appends to a cache mount, so the mount
    // counts how many times it really ran.
    let first = format!("RUN --mount=type=cache,target=/c,id={shared} echo {shared} >> /c/runs && sleep 1");
    let mut ctxs = Vec::new();
    for i in 0..4 {
        ctxs.push(context(&[("Dockerfile", &format!("FROM {}\n{first}\nRUN echo {i} > /mine\n", busybox()))]));
    }
    // Start the builder first so the four clients race on builds, not on startup.
    h.build_ok(&[context(&[("Dockerfile", &format!("FROM {}\n", busybox()))]).path().to_str().unwrap()]);
    let children: Vec<_> = ctxs
        .iter()
        .map(|c| {
            h.cmd()
                .args(["build", "--progress=plain", c.path().to_str().unwrap()])
                .stderr(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let probe = context(&[("Dockerfile", &format!("FROM {}\nRUN --mount=type=cache,target=/c,id={shared} cp /c/runs /runs\n", busybox()))]);
    let runs = rootfs_file(&h, probe.path(), &[], "/runs").unwrap();
    assert_eq!(String::from_utf8_lossy(&runs).lines().count(), 1, "the shared step ran once for four builds");
    let log = std::fs::read_to_string(h.root.path().join("hoistd.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

/// Issue 15: mount points as current BuildKit leaves them. Its executor creates what a
/// mount target lacks (and /etc/hosts, /etc/resolv.conf) and removes those stubs again,
/// recursively while they are empty (`MountStubsCleaner`, `RemoveMountStubsRecursive`, the
/// default of LLB exec ops): no mount of any type, at any depth, leaves a directory in the
/// layer, and a RUN on an image without /etc leaves no /etc. (Docker 20.10's BuildKit here
/// still leaves the stubs, so the differential suite cannot be the oracle for this.)
#[test]
fn mounts_of_every_type_leave_no_stubs_and_a_run_on_scratch_leaves_no_etc() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let keys = tempfile::tempdir_in(test_tmp()).unwrap();
    let key = keys.path().join("id");
    assert!(std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().unwrap().success());
    let secret = keys.path().join("s");
    std::fs::write(&secret, "s").unwrap();
    let ctx = context(&[
        (
            "Dockerfile",
            &format!(
                "FROM {bb} AS bb\nFROM {bb}\n\
                 RUN --mount=type=tmpfs,target=/t1 --mount=type=tmpfs,target=/t2/a/b \
                     --mount=type=cache,target=/c1 --mount=type=cache,target=/c2/x/y \
                     --mount=type=bind,source=src,target=/b1 --mount=type=bind,source=src,target=/b2/q/r \
                     --mount=type=bind,from=bb,source=/bin,target=/b3/from/image \
                     --mount=type=secret,id=s,target=/s1/deep/secret \
                     --mount=type=ssh,target=/ssh1/deep/agent.sock \
                     mkdir -p /made/by/run && touch /made/by/run/f\n\
                 FROM scratch AS bare\nCOPY --from=bb /bin/busybox /bin/busybox\nRUN [\"/bin/busybox\", \"true\"]\n\
                 FROM {bb}\nCOPY --from=bare / /bare/\nCOPY --from=1 / /full/\n",
                bb = busybox()
            ),
        ),
        ("src/f", "f"),
    ]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let dest = out.path().join("fs");
    h.build_ok(&[
        "--secret",
        &format!("id=s,src={}", secret.display()),
        "--ssh",
        &format!("default={}", key.display()),
        "-o",
        &format!("type=local,dest={}", dest.display()),
        ctx.path().to_str().unwrap(),
    ]);
    let full = dest.join("full");
    assert!(full.join("made/by/run/f").is_file(), "the step's own files stay");
    for stub in ["t1", "t2", "c1", "c2", "b1", "b2", "b3", "s1", "ssh1"] {
        assert!(!full.join(stub).exists(), "/{stub}: a mount stub is left in the layer");
    }
    let bare = dest.join("bare");
    assert!(bare.join("bin/busybox").is_file());
    assert!(!bare.join("etc").exists(), "a RUN on an image without /etc leaves none");
}

/// A git repository served by `git daemon` on a loopback port, with a `main` branch.
struct GitServer {
    dir: tempfile::TempDir,
    port: u16,
    daemon: std::process::Child,
}

fn git(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=hoist", "-c", "user.email=hoist@localhost", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl GitServer {
    fn start() -> GitServer {
        let dir = tempfile::tempdir_in(test_tmp()).unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir_all(work.join("sub")).unwrap();
        git(dir.path(), &["init", "-q", "--bare", "repo.git"]);
        git(&work, &["init", "-q"]);
        std::fs::write(work.join("README"), "v1\n").unwrap();
        std::fs::write(work.join("sub/a.txt"), "a\n").unwrap();
        // An archive in the repository stays an archive (ADD extracts only local files).
        let mut tarball = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        tarball.append_data(&mut h, "inside.txt", &b"x"[..]).unwrap();
        std::fs::write(work.join("pkg.tar"), tarball.into_inner().unwrap()).unwrap();
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "one"]);
        git(&work, &["tag", "v1"]);
        git(&work, &["push", "-q", dir.path().join("repo.git").to_str().unwrap(), "main", "v1"]);
        let port = free_port();
        let daemon = std::process::Command::new("git")
            .args(["daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1", &format!("--port={port}")])
            .arg(format!("--base-path={}", dir.path().display()))
            .arg(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting git daemon");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "git daemon did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        GitServer { dir, port, daemon }
    }

    fn url(&self) -> String {
        format!("git://127.0.0.1:{}/repo.git", self.port)
    }

    /// A new commit on `main` changing README.
    fn commit(&self, readme: &str) {
        let work = self.dir.path().join("work");
        std::fs::write(work.join("README"), readme).unwrap();
        git(&work, &["commit", "-q", "-am", "next"]);
        git(&work, &["push", "-q", self.dir.path().join("repo.git").to_str().unwrap(), "main"]);
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// Issue 15: `ADD <git url>[#ref[:subdir]]` adds the repository at that ref (without `.git`
/// unless `--keep-git-dir=true`), keyed on the commit the ref names: a rebuild is cached
/// until the branch moves.
#[test]
fn add_of_a_git_repository_follows_its_ref() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let repo = GitServer::start();
    let url = repo.url();
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nADD {url}#v1 /tag/\nADD --keep-git-dir=true {url}#v1 /kept/\nADD {url}#v1:sub /sub/\nADD {url}#main /main/\n",
            busybox()
        ),
    )]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let build = |n: u32| {
        let dest = out.path().join(format!("fs{n}"));
        let err = h.build_ok(&["-o", &format!("type=local,dest={}", dest.display()), ctx.path().to_str().unwrap()]);
        (dest, err)
    };
    let (fs, _) = build(1);
    assert_eq!(std::fs::read_to_string(fs.join("tag/README")).unwrap(), "v1\n");
    assert!(!fs.join("tag/.git").exists(), ".git only when asked for");
    assert!(fs.join("tag/pkg.tar").is_file() && !fs.join("tag/inside.txt").exists(), "archives stay archives");
    assert!(fs.join("kept/.git/HEAD").is_file(), "--keep-git-dir keeps .git");
    assert_eq!(std::fs::read_to_string(fs.join("sub/a.txt")).unwrap(), "a\n");
    assert!(!fs.join("sub/README").exists(), "only the subdirectory");
    // Nothing moved: every ADD is cached.
    let (_, err) = build(2);
    assert_eq!(count_before(&err, "steps run"), 0, "{err}");
    // main moves: its ADD reruns, the tag's do not.
    repo.commit("v2\n");
    let (fs, err) = build(3);
    assert_eq!(count_before(&err, "steps run"), 1, "{err}");
    assert_eq!(std::fs::read_to_string(fs.join("main/README")).unwrap(), "v2\n");
    assert_eq!(std::fs::read_to_string(fs.join("tag/README")).unwrap(), "v1\n");
    // No repository on the builder's filesystem.
    let bad = context(&[("Dockerfile", &format!("FROM {}\nADD file:///etc/passwd.git /x\n", busybox()))]);
    let o = h.build(&[bad.path().to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !e.contains("root:x:0"), "{e}");
}

/// Issue 15: Dockerfile 1.7 features end to end, each against the behaviour BuildKit
/// documents: `COPY --parents` keeps the source paths below the `./` pivot (or the context
/// root), `COPY --exclude` leaves matching files out, heredocs as a RUN script and as a COPY
/// source, and `RUN --mount=type=bind,from=<image>,rw` writes a throwaway copy.
#[test]
fn dockerfile_1_7_parents_exclude_heredocs_and_rw_image_binds() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let ctx = context(&[
        (
            "Dockerfile",
            &format!(
                "# syntax=docker/dockerfile:1.7\nFROM {bb}\n\
                 COPY --parents a/b/x.txt c/z.txt /parents/\n\
                 COPY --parents ./a/./b/x.txt /pivot/\n\
                 COPY --exclude=*.log --exclude=skip a /excluded/\n\
                 RUN <<EOT\nset -e\necho from a heredoc > /heredoc-run\nEOT\n\
                 COPY <<EOF /heredoc-copy\nline one\nEOF\n\
                 RUN --mount=type=bind,from={bb},source=/bin,target=/b,rw echo x > /b/new && cat /b/new > /rw-bind\n",
                bb = busybox()
            ),
        ),
        ("a/b/x.txt", "x"),
        ("a/y.log", "log"),
        ("a/skip", "skip"),
        ("a/keep.txt", "keep"),
        ("c/z.txt", "z"),
    ]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let fs = out.path().join("fs");
    h.build_ok(&["-o", &format!("type=local,dest={}", fs.display()), ctx.path().to_str().unwrap()]);
    let read = |p: &str| std::fs::read_to_string(fs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!((read("parents/a/b/x.txt"), read("parents/c/z.txt")), ("x".into(), "z".into()));
    assert_eq!(read("pivot/b/x.txt"), "x", "the ./ pivot drops what is before it");
    assert_eq!((read("excluded/keep.txt"), read("excluded/b/x.txt")), ("keep".into(), "x".into()));
    assert!(!fs.join("excluded/y.log").exists() && !fs.join("excluded/skip").exists());
    assert_eq!(read("heredoc-run"), "from a heredoc\n");
    assert_eq!(read("heredoc-copy"), "line one\n");
    assert_eq!(read("rw-bind"), "x\n");
    assert!(!fs.join("bin/new").exists() && !fs.join("b").exists(), "an rw bind of an image writes nothing into the layer");
}

/// Issue 15: heredocs in every position BuildKit's Dockerfile frontend allows, with its
/// semantics: a RUN whose whole command is a heredoc runs it as a script (and a `#!` script
/// with its interpreter), a heredoc inside a command goes to the shell as one (so several in
/// one RUN, `<<-` tab stripping and quoted delimiters are the shell's), COPY and ADD take
/// several heredoc files at once (0644 unless `--chmod`, build variables expanded unless the
/// delimiter is quoted), and ONBUILD carries its heredoc to the child.
#[test]
fn heredocs_in_every_position() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let dockerfile = format!(
        "FROM {bb} AS parent\n\
         ONBUILD RUN <<EOF\necho from onbuild > /onbuild\nEOF\n\
         FROM parent\n\
         ARG WHO=world\n\
         ENV STAGE=final\n\
         RUN <<EOF\necho \"$STAGE\" > /script\necho second line >> /script\nEOF\n\
         RUN <<EOF\n#!/bin/sh -e\necho \"interpreter $0\" > /shebang\nEOF\n\
         RUN cat <<A > /two-a && cat <<'B' > /two-b\nhello $WHO\nA\nliteral $WHO\nB\n\
         RUN cat <<-EOF > /stripped\n\t\tindented\n\tEOF\n\
         COPY <<one.txt <<two.txt /many/\nfirst $WHO\none.txt\nsecond\ntwo.txt\n\
         COPY <<'EOF' /quoted\nkept $WHO\nEOF\n\
         COPY --chmod=0755 <<EOF /tool.sh\n#!/bin/sh\nEOF\n\
         ADD <<EOF /added\nadded $WHO\nEOF\n",
        bb = busybox()
    );
    let ctx = context(&[("Dockerfile", &dockerfile)]);
    let out = tempfile::tempdir_in(test_tmp()).unwrap();
    let fs = out.path().join("fs");
    h.build_ok(&["-o", &format!("type=local,dest={}", fs.display()), ctx.path().to_str().unwrap()]);
    let read = |p: &str| std::fs::read_to_string(fs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let mode = |p: &str| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(fs.join(p)).unwrap().permissions()) & 0o7777;
    assert_eq!(read("onbuild"), "from onbuild\n");
    assert_eq!(read("script"), "final\nsecond line\n");
    assert!(read("shebang").starts_with("interpreter /"), "{}", read("shebang"));
    assert_eq!((read("two-a"), read("two-b")), ("hello world\n".into(), "literal $WHO\n".into()));
    assert_eq!(read("stripped"), "indented\n");
    assert_eq!((read("many/one.txt"), read("many/two.txt")), ("first world\n".into(), "second\n".into()));
    assert_eq!(read("quoted"), "kept $WHO\n");
    assert_eq!((mode("many/one.txt"), mode("tool.sh")), (0o644, 0o755));
    assert_eq!(read("added"), "added world\n");
}

/// Issue 14: flags of buildx CI scripts that need nothing new of the builder are accepted
/// and do what buildx does: `--cache-from`/`--cache-to` (a note: the shared cache serves),
/// `--cgroup-parent` (a note: steps stay in the builder's per-build cgroup),
/// `--no-cache-filter`, `BUILDKIT_PROGRESS` and `--progress=none`, and `--metadata-file`
/// with buildx's keys.
#[test]
fn buildx_flags_of_ci_scripts_are_accepted() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let marker = unique("flags");
    let dockerfile = format!("FROM {} AS first\nRUN echo {marker} > /one\nFROM first AS second\nRUN echo two > /two\n", busybox());
    let ctx = context(&[("Dockerfile", &dockerfile)]);
    let dir = ctx.path().to_str().unwrap();

    let out = h.build_ok(&[
        "--cache-from",
        "type=registry,ref=registry.invalid/cache",
        "--cache-to",
        "type=inline",
        "--cgroup-parent",
        "ci.slice",
        dir,
    ]);
    assert_eq!(out.matches("--cache-from/--cache-to are not needed").count(), 1, "{out}");
    assert_eq!(out.matches("--cgroup-parent ci.slice is not applied").count(), 1, "{out}");
    assert_eq!(count_before(&out, "steps run"), 2, "{out}");

    let out = h.build_ok(&["--no-cache-filter", "SECOND", dir]);
    assert_eq!((count_before(&out, "steps run"), count_before(&out, "cached")), (1, 1), "only the named stage ran: {out}");

    let run = |progress: &str, args: &[&str]| {
        let out = h.cmd().arg("build").args(args).arg(dir).env("BUILDKIT_PROGRESS", progress).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let raw = run("rawjson", &[]);
    assert!(raw.lines().any(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v.get("vertex").is_some())), "{raw}");
    let none = run("plain", &["--progress=none"]);
    assert!(!none.contains("steps run") && !none.contains("FROM"), "the flag wins over the variable, and none prints nothing: {none}");

    let tag = format!("{}/{}:1", registry(), unique("metadata"));
    let out_dir = tempfile::tempdir_in(test_tmp()).unwrap();
    let meta = out_dir.path().join("meta.json");
    let out = h.build_ok(&["-t", &tag, "--push", "--metadata-file", meta.to_str().unwrap(), dir]);
    // The push is a step of its own, as in buildx, with a line per blob.
    let push = out.split(&format!("[push] pushing {tag}\n")).nth(1).unwrap_or_else(|| panic!("no push step: {out}"));
    assert!(push.lines().any(|l| l.contains(" uploaded sha256:")), "{push}");
    assert!(push.lines().any(|l| l.starts_with('#') && l.ends_with("DONE 0.0s") || l.contains(" DONE ")), "{push}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let digest = m["containerimage.digest"].as_str().expect("containerimage.digest").to_string();
    let desc = &m["containerimage.descriptor"];
    assert_eq!(desc["digest"], digest.as_str(), "{m}");
    assert_eq!(desc["mediaType"], "application/vnd.oci.image.manifest.v1+json", "{m}");
    let (repo, _) = tag.split_once('/').unwrap().1.rsplit_once(':').unwrap();
    let manifest = Command::new("curl")
        .args(["-fsS", "-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
        .arg(format!("http://{}/v2/{repo}/manifests/{digest}", registry()))
        .output()
        .unwrap();
    assert!(manifest.status.success(), "{}", String::from_utf8_lossy(&manifest.stderr));
    assert_eq!(desc["size"], manifest.stdout.len(), "{m}");
    assert_eq!(m["image.name"], tag.as_str());
    let build_ref = m["buildx.build.ref"].as_str().expect("buildx.build.ref");
    let id = build_ref.rsplit('/').next().unwrap();
    assert!(build_ref.starts_with("hoist/") && out.contains(&format!("build {id} in project")), "{build_ref}: {out}");

    // --shm-size and --ulimit reach RUN steps (and their results: another limit runs again);
    // a limit above the builder's own is refused, naming the flag.
    let limits = context(&[(
        "Dockerfile",
        &format!(
            "FROM {}
RUN ulimit -n > /soft; ulimit -Hn > /hard; df -k /dev/shm | tail -1 | awk '{{print $2}}' > /shm
",
            busybox()
        ),
    )]);
    let local = |name: &str, args: &[&str]| {
        let dest = out_dir.path().join(name);
        let mut all = vec!["-o".to_string(), format!("type=local,dest={}", dest.display())];
        all.extend(args.iter().map(|a| a.to_string()));
        all.push(limits.path().to_str().unwrap().to_string());
        let out = h.build_ok(&all.iter().map(String::as_str).collect::<Vec<_>>());
        let read = |f: &str| std::fs::read_to_string(dest.join(f)).unwrap().trim().to_string();
        (out, read("soft"), read("hard"), read("shm"))
    };
    let (_, _, _, shm) = local("default", &[]);
    assert_eq!(shm, "65536", "Docker's 64 MiB");
    let (out, soft, hard, shm) = local("set", &["--shm-size", "128m", "--ulimit", "nofile=1000:2000"]);
    assert_eq!((soft.as_str(), hard.as_str(), shm.as_str()), ("1000", "2000", "131072"));
    assert_eq!(count_before(&out, "steps run"), 1, "{out}");
    let (out, soft, _, _) = local("other", &["--shm-size", "128m", "--ulimit", "nofile=999:2000"]);
    assert_eq!((soft.as_str(), count_before(&out, "steps run")), ("999", 1), "{out}");
    let refused = h.build(&["--ulimit", "nofile=-1", limits.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("--ulimit") && stderr.contains("hard limit"), "{stderr}");
}

/// Issue 14: shell completions and the man page come from the CLI's own definition.
#[test]
fn completions_and_man_page_describe_the_cli() {
    let run = |args: &[&str]| {
        let out = Command::new(hoist_bin()).args(args).output().unwrap();
        assert!(out.status.success(), "hoist {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bash = run(&["completion", "bash"]);
    assert!(bash.contains("_hoist()") && bash.contains("--no-cache-filter") && bash.contains("--ulimit"), "{bash}");
    let fish = run(&["completion", "fish"]);
    assert!(fish.contains("complete -c hoist") && fish.contains("no-cache-filter"), "{fish}");
    let zsh = run(&["completion", "zsh"]);
    assert!(zsh.starts_with("#compdef hoist"), "{zsh}");
    let man = run(&["man"]);
    assert!(man.contains(".TH hoist") && man.contains("build"), "{man}");
    let bad = Command::new(hoist_bin()).args(["completion", "tcsh"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("tcsh"));
}

/// Issue 14: a failing RUN is reported as buildx reports it: the tail of the step's log,
/// then the Dockerfile around the instruction, then the error.
#[test]
fn a_failing_run_shows_its_log_tail_and_the_dockerfile_excerpt() {
    if !lab_available() {
        return;
    }
    let h = Hoist::new();
    let dockerfile = format!("FROM {}\nRUN echo preparing\nRUN echo out-line; echo err-line >&2; exit 3\nRUN echo after\n", busybox());
    let ctx = context(&[("Dockerfile", &dockerfile)]);
    let out = h.build(&[ctx.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let report = stderr.split("------\n > ").nth(1).unwrap_or_else(|| panic!("no failure report:\n{stderr}"));
    assert!(report.starts_with("[stage-0 2/3] RUN echo out-line; echo err-line >&2; exit 3:\n"), "{report}");
    let (tail, rest) = report.split_once("------\n").unwrap();
    assert!(tail.contains(" out-line\n") && tail.contains(" err-line\n"), "the log's tail: {tail}");
    assert!(rest.starts_with("Dockerfile:3\n--------------------\n"), "{rest}");
    assert!(rest.contains("  3 | >>> RUN echo out-line;") && rest.contains("  4 |     RUN echo after\n"), "{rest}");
    assert!(rest.contains("error: Dockerfile:3: RUN echo out-line"), "then the error: {rest}");
}
