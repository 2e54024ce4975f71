//! Oracle test for COPY/ADD: builds small COPY-heavy Dockerfiles with the real `docker build`
//! (BuildKit, the Docker engine of the lab) and compares the whole resulting filesystem (path,
//! type, mode, uid, gid, size, content, link target, hard-link groups; not timestamps) with
//! what `hoist_engine::copy::copy` produces from the same context on the same base rootfs.
//!
//! Needs a running Docker engine at /usr/bin/docker and `127.0.0.1:5000/library/busybox` in
//! the lab registry, and root (owners). Without them it prints a note and passes.
//!
//! Only features Docker 20.10's BuildKit has are compared here (no `--exclude`, `--parents`,
//! `--link`, symbolic `--chmod`, heredocs, zstd); the unit tests cover those from BuildKit's code.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use hoist_engine::copy::{copy, CopyLimits, CopyParams};
use hoist_engine::graph::{Chmod, CopyOp, CopySource, Source};
use hoist_engine::rootfs::lookup_chown;
use sha2::{Digest as _, Sha256};

const DOCKER: &str = "/usr/bin/docker";
const BASE: &str = "127.0.0.1:5000/library/busybox";

fn docker(args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new(DOCKER)
        .args(args)
        .env("DOCKER_BUILDKIT", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running docker {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(out.stdout)
}

fn oracle_available() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root".into());
    }
    docker(&["info", "--format", "{{.ServerVersion}}"])?;
    docker(&["pull", "-q", BASE])?;
    Ok(())
}

/// Export the filesystem of an image as a tar stream (via a created, never started container).
fn export_image(image: &str) -> Result<Vec<u8>, String> {
    let id = String::from_utf8_lossy(&docker(&["create", image, "/bin/true"])?).trim().to_string();
    let tar = docker(&["export", &id]);
    let _ = docker(&["rm", "-f", &id]);
    tar
}

fn untar(tar: &[u8], dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let mut child =
        Command::new("tar").args(["-x", "-p", "--numeric-owner", "-f", "-", "-C"]).arg(dir).stdin(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(tar).unwrap();
    assert!(child.wait().unwrap().success(), "tar -x into {}", dir.display());
}

/// Paths Docker adds or mounts in every container; not compared.
fn ignored(rel: &str) -> bool {
    let top = rel.split('/').next().unwrap_or("");
    matches!(top, "proc" | "sys" | "dev" | ".dockerenv") || matches!(rel, "etc/hosts" | "etc/hostname" | "etc/resolv.conf" | "etc/mtab")
}

/// path → `type mode uid:gid size content-or-target`, and path → hard-link group leader.
type Tree = (BTreeMap<String, String>, BTreeMap<String, String>);

fn sha(data: &[u8]) -> String {
    hex::encode(&Sha256::digest(data)[..8])
}

fn tree_of_tar(tar: &[u8]) -> Tree {
    let mut ar = tar::Archive::new(tar);
    let mut out = BTreeMap::new();
    let mut links = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8_lossy(&e.path_bytes()).trim_end_matches('/').trim_start_matches("./").to_string();
        if path.is_empty() || ignored(&path) {
            continue;
        }
        let h = e.header().clone();
        let (uid, gid, mode) = (h.uid().unwrap_or(0), h.gid().unwrap_or(0), h.mode().unwrap_or(0) & 0o7777);
        let desc = match h.entry_type() {
            tar::EntryType::Directory => format!("d {mode:o} {uid}:{gid}"),
            tar::EntryType::Symlink => {
                format!("l {uid}:{gid} ->{}", String::from_utf8_lossy(&e.link_name_bytes().unwrap()))
            }
            tar::EntryType::Link => {
                let target = String::from_utf8_lossy(&e.link_name_bytes().unwrap()).trim_start_matches("./").to_string();
                let leader = links.get(&target).cloned().unwrap_or(target.clone());
                links.insert(target.clone(), leader.clone());
                links.insert(path.clone(), leader);
                out.get(&target).cloned().unwrap_or_else(|| format!("hardlink to missing {target}"))
            }
            tar::EntryType::Regular => {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                format!("f {mode:o} {uid}:{gid} {} {}", data.len(), sha(&data))
            }
            other => format!("{other:?} {mode:o} {uid}:{gid}"),
        };
        out.insert(path, desc);
    }
    (out, regroup(links))
}

/// Hard-link groups keyed by their smallest member (so both sides name groups alike).
fn regroup(links: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (p, leader) in links {
        groups.entry(leader).or_default().push(p);
    }
    let mut out = BTreeMap::new();
    for (_, mut members) in groups {
        members.sort();
        members.dedup();
        for m in &members {
            out.insert(m.clone(), members[0].clone());
        }
    }
    out
}

fn tree_of_dir(root: &Path) -> Tree {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if ignored(&rel) {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let (uid, gid, mode) = (m.uid(), m.gid(), m.mode() & 0o7777);
            let ft = m.file_type();
            let desc = if ft.is_dir() {
                stack.push(p.clone());
                format!("d {mode:o} {uid}:{gid}")
            } else if ft.is_symlink() {
                format!("l {uid}:{gid} ->{}", fs::read_link(&p).unwrap().display())
            } else if ft.is_file() {
                if m.nlink() > 1 {
                    inodes.entry((m.dev(), m.ino())).or_default().push(rel.clone());
                }
                let data = fs::read(&p).unwrap();
                format!("f {mode:o} {uid}:{gid} {} {}", data.len(), sha(&data))
            } else {
                format!("other {mode:o} {uid}:{gid}")
            };
            out.insert(rel, desc);
        }
    }
    let mut links = BTreeMap::new();
    for (_, mut group) in inodes {
        if group.len() < 2 {
            continue;
        }
        group.sort();
        for p in &group {
            links.insert(p.clone(), group[0].clone());
        }
    }
    (out, links)
}

/// Parse one `COPY`/`ADD` line of the cases below (flags, sources, absolute destination).
fn parse_line(line: &str) -> (CopyOp, Option<String>) {
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap();
    let mut chown = None;
    let mut chmod = None;
    let mut from = Source::Context;
    let mut args = Vec::new();
    for w in words {
        if let Some(v) = w.strip_prefix("--chown=") {
            chown = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("--chmod=") {
            chmod = Some(Chmod::Octal(u32::from_str_radix(v, 8).unwrap()));
        } else if w.starts_with("--from=") {
            from = Source::Stage(0);
        } else {
            args.push(w.to_string());
        }
    }
    let dest = args.pop().unwrap();
    let is_add = cmd == "ADD";
    let op = CopyOp {
        from,
        sources: args.into_iter().map(CopySource::Path).collect(),
        dest,
        chown: chown.clone(),
        chmod,
        link: false,
        exclude: Vec::new(),
        parents: false,
        unpack: is_add,
        keep_git_dir: false,
        is_add,
    };
    (op, chown)
}

struct Case {
    name: &'static str,
    /// RUN of a stage `st` that `--from=st` copies from
    stage_run: Option<&'static str>,
    /// RUN in the final stage before the copies
    setup_run: Option<&'static str>,
    lines: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "files-dirs-trailing-slashes",
        stage_run: None,
        setup_run: None,
        lines: &[
            "COPY a.txt /t1/",
            "COPY a.txt /t2",
            "COPY dir /t3",
            "COPY dir/ /t4/deep/er/",
            "COPY dirlink /t10/",
            "COPY *.txt /t11/",
            "COPY hard1 hard2 /t14/",
            "COPY hard* /t14b/",
            "COPY h /t15/",
            "COPY ../a.txt /t16/",
            "COPY /a.txt /t17/",
            "COPY a.txt /tmp",
            "COPY emptydir /t18",
            "COPY emptydir /t19/",
            "COPY dir/link /t20/",
            "COPY a.txt c.txt /t22",
            "COPY nomatch* /t23/",
            "COPY owned.txt /t24/",
            "COPY . /all/",
        ],
    },
    Case {
        name: "chown-chmod",
        stage_run: None,
        setup_run: None,
        lines: &[
            "COPY --chown=nobody a.txt /t5/",
            "COPY --chown=33:nogroup a.txt /t6/",
            "COPY --chown=1234 dir /t7/sub/",
            "COPY --chown=www-data:100 a.txt /t7b/x/",
            "COPY --chmod=751 a.txt dir /t8/",
            "COPY --chown=1234:5678 a.txt /t21/a/b/c/",
            // no set-id bits in --chmod here: 20.10 drops them from the chmod value (and keeps
            // the source's), newer BuildKit (and hoist) applies exactly the given 4-digit mode
            "COPY --chown=root:nogroup --chmod=711 b.sh /t25",
        ],
    },
    Case {
        name: "destination-symlinks",
        stage_run: None,
        setup_run: Some("mkdir /target && ln -s /target /lnk && ln -s ../target /lnk2 && mkdir -p /m && echo old > /m/f && ln -s /m/f /flink"),
        lines: &["COPY a.txt /lnk/", "COPY c.txt /lnk2/sub/", "COPY dir /m", "COPY c.txt /flink"],
    },
    Case {
        name: "from-stage",
        stage_run: Some(
            "mkdir -p /data/d && echo s > /data/d/f && chown -R 4321:8765 /data && chmod 700 /data/d && ln -s /etc/passwd /data/pw && ln /data/d/f /data/d/g",
        ),
        setup_run: None,
        lines: &["COPY --from=st /data /fromst/", "COPY --from=st /data/d/f /fromst2/", "COPY --from=st --chown=7:8 /data /fromst3/", "COPY --from=st /data/pw /pw"],
    },
    Case {
        name: "add-archives",
        stage_run: None,
        setup_run: None,
        lines: &[
            "ADD plain.tar /a1/",
            "ADD arch.tar.gz /a2/",
            "ADD arch.tar.bz2 /a3/",
            "ADD arch.tar.xz /a4/",
            "ADD disguised.bin /a6",
            "ADD justgz.gz /a7/",
            "ADD evil.tar /a8/",
            "ADD owned.txt /a10/",
            "ADD --chown=11:12 tarsrc /a11/",
            "ADD implicit.tar /a12/",
        ],
    },
];

/// name, type, data, link target, mode, uid=gid
type TarEntry<'a> = (&'a str, tar::EntryType, &'a [u8], &'a str, u32, u64);

fn raw_tar(entries: &[TarEntry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, t, data, link, mode, id) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*t);
        h.set_mode(*mode);
        h.set_uid(*id);
        h.set_gid(*id);
        h.set_mtime(1_000_000);
        h.set_size(data.len() as u64);
        let nb = name.as_bytes();
        h.as_old_mut().name[..nb.len()].copy_from_slice(nb);
        let lb = link.as_bytes();
        h.as_old_mut().linkname[..lb.len()].copy_from_slice(lb);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn make_context(ctx: &Path) {
    let file = |rel: &str, content: &[u8], mode: u32| {
        let p = ctx.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    file("a.txt", b"hello\n", 0o644);
    file("b.sh", b"#!/bin/sh\necho hi\n", 0o755);
    file("c.txt", b"c\n", 0o644);
    file("dir/x", b"x\n", 0o600);
    file("dir/sub/y", b"y\n", 0o644);
    fs::set_permissions(ctx.join("dir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("x", ctx.join("dir/link")).unwrap();
    file("hard1", b"hard\n", 0o644);
    fs::hard_link(ctx.join("hard1"), ctx.join("hard2")).unwrap();
    file("h/one", b"one\n", 0o644);
    fs::hard_link(ctx.join("h/one"), ctx.join("h/two")).unwrap();
    symlink("/etc/passwd", ctx.join("absl")).unwrap();
    symlink("dir", ctx.join("dirlink")).unwrap();
    fs::create_dir(ctx.join("emptydir")).unwrap();
    fs::set_permissions(ctx.join("emptydir"), fs::Permissions::from_mode(0o700)).unwrap();
    file("owned.txt", b"owned\n", 0o644);
    std::os::unix::fs::lchown(ctx.join("owned.txt"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(ctx.join("owned.txt"), fs::Permissions::from_mode(0o4755)).unwrap();
    file("tarsrc/d/f1", b"t1\n", 0o640);
    use tar::EntryType as T;
    let plain = raw_tar(&[
        ("d/", T::Directory, b"", "", 0o755, 0),
        ("d/f1", T::Regular, b"t1\n", "", 0o640, 1000),
        ("d/lnk", T::Symlink, b"", "f1", 0o777, 0),
        ("d/hl", T::Link, b"", "d/f1", 0o640, 1000),
    ]);
    file("plain.tar", &plain, 0o644);
    let gz = {
        use std::io::Write;
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(&plain).unwrap();
        w.finish().unwrap()
    };
    file("arch.tar.gz", &gz, 0o644);
    file("disguised.bin", &gz, 0o644);
    let bz = {
        use std::io::Write;
        let mut w = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        w.write_all(&plain).unwrap();
        w.finish().unwrap()
    };
    file("arch.tar.bz2", &bz, 0o644);
    let xz = {
        use std::io::Write;
        let mut w = liblzma::write::XzEncoder::new(Vec::new(), 6);
        w.write_all(&plain).unwrap();
        w.finish().unwrap()
    };
    file("arch.tar.xz", &xz, 0o644);
    let justgz = {
        use std::io::Write;
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(b"just some gzip, not a tar\n").unwrap();
        w.finish().unwrap()
    };
    file("justgz.gz", &justgz, 0o644);
    file(
        "evil.tar",
        &raw_tar(&[
            ("../../escape1", T::Regular, b"evil\n", "", 0o644, 0),
            ("/abs/escape2", T::Regular, b"evil\n", "", 0o644, 0),
            ("./ok", T::Regular, b"ok\n", "", 0o644, 0),
        ]),
        0o644,
    );
    file("implicit.tar", &raw_tar(&[("deep/er/file", T::Regular, b"deep\n", "", 0o644, 0)]), 0o644);
}

fn run_case(case: &Case, base: &Path, work: &Path, n: usize) -> Result<(), String> {
    let dir = work.join(case.name);
    let ctx = dir.join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    make_context(&ctx);
    // Docker side
    let mut df = String::new();
    if let Some(r) = case.stage_run {
        df.push_str(&format!("FROM {BASE} AS st\nRUN {r}\n"));
    }
    df.push_str(&format!("FROM {BASE}\n"));
    if let Some(r) = case.setup_run {
        df.push_str(&format!("RUN {r}\n"));
    }
    for l in case.lines {
        df.push_str(l);
        df.push('\n');
    }
    fs::write(dir.join("Dockerfile"), &df).unwrap();
    let tag = format!("hoist-copy-oracle-{n}");
    docker(&["build", "--network=host", "-q", "-t", &tag, "-f", dir.join("Dockerfile").to_str().unwrap(), ctx.to_str().unwrap()])?;
    let theirs = tree_of_tar(&export_image(&tag)?);
    let _ = docker(&["rmi", "-f", &tag]);

    // hoist side: the same base, the same RUNs (chroot), then copy()
    let chroot_run = |root: &Path, cmd: &str| -> Result<(), String> {
        let st = Command::new("chroot").arg(root).args(["/bin/sh", "-c", cmd]).status().map_err(|e| e.to_string())?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("chroot {} {cmd}: {st}", root.display()))
        }
    };
    let cp_a = |from: &Path, to: &Path| {
        let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
        assert!(st.success());
    };
    let ours_root = dir.join("ours");
    cp_a(base, &ours_root);
    let stage_root = dir.join("stage");
    if let Some(r) = case.stage_run {
        cp_a(base, &stage_root);
        chroot_run(&stage_root, r)?;
    }
    if let Some(r) = case.setup_run {
        chroot_run(&ours_root, r)?;
    }
    for line in case.lines {
        let (op, chown) = parse_line(line);
        let owner = match &chown {
            Some(c) => Some(lookup_chown(&ours_root, c).map_err(|e| e.to_string())?),
            None => None,
        };
        let src_root: &Path = if op.from == Source::Context { &ctx } else { &stage_root };
        copy(&CopyParams { op: &op, src_root, dest_root: &ours_root, owner, urls: &HashMap::new(), limits: CopyLimits::default() })
            .map_err(|e| format!("{line}: {e}"))?;
    }
    let ours = tree_of_dir(&ours_root);

    let mut diffs = Vec::new();
    let keys: std::collections::BTreeSet<&String> = theirs.0.keys().chain(ours.0.keys()).collect();
    for k in keys {
        let (t, o) = (theirs.0.get(k), ours.0.get(k));
        if t != o {
            diffs.push(format!("  {k}: docker {t:?} / hoist {o:?}"));
        }
    }
    if theirs.1 != ours.1 {
        diffs.push(format!("  hard-link groups: docker {:?} / hoist {:?}", theirs.1, ours.1));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        diffs.truncate(40);
        Err(format!("case {}:\n{}", case.name, diffs.join("\n")))
    }
}

#[test]
fn copy_matches_docker_buildkit() {
    if let Err(why) = oracle_available() {
        hoist_oci::testing::needs(&format!("root and the Docker engine as oracle ({why})"), false);
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base");
    untar(&export_image(BASE).expect("export the base image"), &base);
    let mut failures = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        if let Err(e) = run_case(case, &base, work.path(), i) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "hoist differs from docker build:\n{}", failures.join("\n"));
}

/// `USER` resolution ([`hoist_engine::rootfs::lookup_user`]) against BuildKit's: the ids and
/// groups a `RUN` gets (`id -u`, `id -g`, `id -G`), for users and groups of a custom
/// /etc/passwd and /etc/group. (An empty USER is not compared: Docker 20.10 gives root no
/// supplementary groups, newer BuildKit — and hoist — give root its /etc/group memberships.)
#[test]
fn user_lookup_matches_docker_buildkit() {
    if let Err(why) = oracle_available() {
        hoist_oci::testing::needs(&format!("root and the Docker engine as oracle ({why})"), false);
        return;
    }
    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\nadm:x:42:43:adm:/var/adm:/bin/false\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:root\nadm:x:43:\ngrp:x:1234:root,adm\nstaff:x:50:adm\nnogroup:x:65534:\n";
    let users = ["adm", "42", "1337", "adm:staff", "1337:nogroup", "root", "nobody", "42:grp", "65534:0"];
    let work = tempfile::tempdir().unwrap();
    let mut df = format!(
        "FROM {BASE}\nRUN printf '{}' > /etc/passwd && printf '{}' > /etc/group\n",
        PASSWD.replace('\n', "\\n"),
        GROUP.replace('\n', "\\n")
    );
    for (i, u) in users.iter().enumerate() {
        df.push_str(&format!("USER {u}\nRUN (id -u; id -g; id -G) > /tmp/u{i}\n"));
    }
    fs::write(work.path().join("Dockerfile"), df).unwrap();
    docker(&["build", "--network=host", "-q", "-t", "hoist-user-oracle", work.path().to_str().unwrap()]).unwrap();
    let tar = export_image("hoist-user-oracle").unwrap();
    let _ = docker(&["rmi", "-f", "hoist-user-oracle"]);
    let root = work.path().join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/passwd"), PASSWD).unwrap();
    fs::write(root.join("etc/group"), GROUP).unwrap();
    let mut files: HashMap<String, String> = HashMap::new();
    for e in tar::Archive::new(&tar[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let p = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        if p.starts_with("tmp/u") {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            files.insert(p, s);
        }
    }
    for (i, u) in users.iter().enumerate() {
        let out = files.get(&format!("tmp/u{i}")).unwrap_or_else(|| panic!("no output for USER {u}"));
        let lines: Vec<&str> = out.lines().collect();
        let mut theirs: Vec<u32> = lines[2].split_whitespace().map(|g| g.parse().unwrap()).collect();
        theirs.sort();
        let ours = hoist_engine::rootfs::lookup_user(&root, u).unwrap();
        let mut groups: Vec<u32> = std::iter::once(ours.gid).chain(ours.additional_gids.iter().copied()).collect();
        groups.sort();
        groups.dedup();
        assert_eq!((ours.uid.to_string(), ours.gid.to_string(), groups), (lines[0].to_string(), lines[1].to_string(), theirs), "USER {u}");
    }
    // an unknown name fails the same way
    let df = format!("FROM {BASE}\nUSER www-data\nRUN id\n");
    fs::write(work.path().join("Dockerfile"), df).unwrap();
    let err = docker(&["build", "--network=host", "-q", work.path().to_str().unwrap()]).unwrap_err();
    let ours = hoist_engine::rootfs::lookup_user(&root, "www-data").unwrap_err().to_string();
    assert!(err.contains(&ours), "docker said: {err}");
}
