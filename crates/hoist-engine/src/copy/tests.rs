//! Unit tests of COPY/ADD on temp dirs. Expected trees are what Docker 20.10's BuildKit produced
//! for the same Dockerfile lines (see the module docs and the report), or BuildKit's code where
//! 20.10 lacks the feature.

use super::*;
use std::collections::BTreeMap;
use std::os::unix::fs::symlink;

use crate::graph::{Chmod, CopyOp, CopySource, Source};

/// A build context, a destination rootfs and a canary directory outside both.
struct Env {
    _t: tempfile::TempDir,
    ctx: PathBuf,
    dest: PathBuf,
    outside: PathBuf,
    canary: BTreeMap<String, String>,
}

fn env() -> Env {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("ctx");
    let dest = t.path().join("dest");
    let outside = t.path().join("outside");
    for d in [&ctx, &dest, &outside] {
        fs::create_dir(d).unwrap();
    }
    fs::write(outside.join("canary.txt"), "do not touch").unwrap();
    fs::create_dir(outside.join("canary-dir")).unwrap();
    fs::write(outside.join("canary-dir/f"), "nor this").unwrap();
    fs::create_dir(dest.join("tmp")).unwrap();
    fs::set_permissions(dest.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    let canary = snapshot(&outside);
    Env { _t: t, ctx, dest, outside, canary }
}

impl Env {
    /// The canary dir is unchanged and nothing appeared next to the three roots.
    fn assert_outside_untouched(&self) {
        assert_eq!(snapshot(&self.outside), self.canary, "the canary outside the roots changed");
        let mut top: Vec<String> =
            fs::read_dir(self._t.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        top.sort();
        assert_eq!(top, ["ctx", "dest", "outside"], "something was written next to the roots");
    }

    fn file(&self, rel: &str, content: &str, mode: u32) {
        let p = self.ctx.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn dir(&self, rel: &str, mode: u32) {
        let p = self.ctx.join(rel);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn link(&self, rel: &str, target: &str) {
        let p = self.ctx.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, p).unwrap();
    }

    fn run(&self, op: &CopyOp) -> Result<CopyStats, CopyError> {
        self.run_with(op, None, &HashMap::new(), CopyLimits::default())
    }

    fn run_with(
        &self,
        op: &CopyOp,
        owner: Option<(u32, u32)>,
        urls: &HashMap<String, PathBuf>,
        limits: CopyLimits,
    ) -> Result<CopyStats, CopyError> {
        copy(&CopyParams { op, src_root: &self.ctx, dest_root: &self.dest, owner, urls, limits })
    }

    /// Description of one destination path: `type mode uid:gid [=content | ->target]`.
    fn at(&self, rel: &str) -> String {
        describe(&self.dest.join(rel.trim_start_matches('/')))
    }

    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.dest.join(rel.trim_start_matches('/'))).is_ok()
    }
}

fn describe(p: &Path) -> String {
    let m = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(_) => return "missing".to_string(),
    };
    let ft = m.file_type();
    let (t, extra) = if ft.is_dir() {
        ("d", String::new())
    } else if ft.is_symlink() {
        ("l", format!(" ->{}", fs::read_link(p).unwrap().display()))
    } else if ft.is_file() {
        let c = fs::read(p).unwrap();
        ("f", format!(" ={}", String::from_utf8_lossy(&c)))
    } else {
        ("o", String::new())
    };
    let mode = if ft.is_symlink() { 0o777 } else { m.mode() & 0o7777 };
    format!("{t} {mode:o} {}:{}{extra}", m.uid(), m.gid())
}

fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.insert(rel, describe(&p));
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

fn op(sources: &[&str], dest: &str) -> CopyOp {
    CopyOp {
        from: Source::Context,
        sources: sources.iter().map(|s| CopySource::Path(s.to_string())).collect(),
        dest: dest.to_string(),
        chown: None,
        chmod: None,
        link: false,
        exclude: Vec::new(),
        parents: false,
        unpack: false,
        keep_git_dir: false,
        is_add: false,
    }
}

fn add(sources: &[&str], dest: &str) -> CopyOp {
    CopyOp { unpack: true, is_add: true, ..op(sources, dest) }
}

/// The context of the first Docker 20.10 oracle build (see the report).
fn oracle_ctx(e: &Env) {
    e.file("a.txt", "hello\n", 0o644);
    e.file("b.sh", "#!/bin/sh\n", 0o755);
    e.file("c.txt", "c\n", 0o644);
    e.file("dir/x", "x\n", 0o600);
    e.file("dir/sub/y", "y\n", 0o644);
    fs::set_permissions(e.ctx.join("dir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    e.link("dir/link", "x");
    e.file("hard1", "hard\n", 0o644);
    fs::hard_link(e.ctx.join("hard1"), e.ctx.join("hard2")).unwrap();
    e.link("absl", "/etc/passwd");
    e.link("rell", "../../etc/passwd");
    e.link("dirlink", "dir");
    e.dir("emptydir", 0o700);
}

#[test]
fn copy_semantics_match_the_docker_20_10_oracle() {
    // (sources, dest, expected (path, description) in the destination)
    type Case<'a> = (&'a [&'a str], &'a str, &'a [(&'a str, &'a str)]);
    let cases: &[Case] = &[
        (&["a.txt"], "/t1/", &[("t1", "d 755 0:0"), ("t1/a.txt", "f 644 0:0 =hello\n")]),
        (&["a.txt"], "/t2", &[("t2", "f 644 0:0 =hello\n")]),
        (
            &["dir"],
            "/t3",
            &[
                ("t3", "d 755 0:0"),
                ("t3/x", "f 600 0:0 =x\n"),
                ("t3/link", "l 777 0:0 ->x"),
                ("t3/sub", "d 750 0:0"),
                ("t3/sub/y", "f 644 0:0 =y\n"),
            ],
        ),
        (&["dir/"], "/t4/deep/er/", &[("t4", "d 755 0:0"), ("t4/deep/er", "d 755 0:0"), ("t4/deep/er/x", "f 600 0:0 =x\n")]),
        (&["dirlink"], "/t10/", &[("t10/x", "f 600 0:0 =x\n"), ("t10/sub", "d 750 0:0"), ("t10/link", "l 777 0:0 ->x")]),
        (&["*.txt"], "/t11/", &[("t11/a.txt", "f 644 0:0 =hello\n"), ("t11/c.txt", "f 644 0:0 =c\n")]),
        (&["../a.txt"], "/t16/", &[("t16/a.txt", "f 644 0:0 =hello\n")]),
        (&["/a.txt"], "/t17/", &[("t17/a.txt", "f 644 0:0 =hello\n")]),
        (&["../../x/../a.txt"], "/t17b/", &[("t17b/a.txt", "f 644 0:0 =hello\n")]),
        (&["a.txt"], "/tmp", &[("tmp", "d 1777 0:0"), ("tmp/a.txt", "f 644 0:0 =hello\n")]),
        (&["emptydir"], "/t18", &[("t18", "d 755 0:0")]),
        (&["emptydir"], "/t19/", &[("t19", "d 755 0:0")]),
        // the final symlink of a source is followed; the copy keeps the link's name
        (&["dir/link"], "/t20/", &[("t20/link", "f 600 0:0 =x\n")]),
        // several sources into a path without a trailing slash: each replaces the previous
        (&["a.txt", "c.txt"], "/t22", &[("t22", "f 644 0:0 =c\n")]),
        (&["*.txt", "dir/sub/*"], "/t23", &[("t23", "f 644 0:0 =y\n")]),
        (&["b.sh"], "/t24/b", &[("t24/b", "f 755 0:0 =#!/bin/sh\n")]),
    ];
    for (srcs, dest, want) in cases {
        let e = env();
        oracle_ctx(&e);
        e.run(&op(srcs, dest)).unwrap_or_else(|err| panic!("COPY {srcs:?} {dest}: {err}"));
        for (path, desc) in *want {
            assert_eq!(e.at(path), *desc, "COPY {srcs:?} {dest}: {path}");
        }
        e.assert_outside_untouched();
    }
}

#[test]
fn unmatched_wildcards_copy_nothing_and_are_reported() {
    let e = env();
    oracle_ctx(&e);
    let st = e.run(&op(&["nomatch*"], "/x/")).unwrap();
    assert_eq!(st.unmatched, vec!["nomatch*".to_string()]);
    assert!(!e.exists("/x"), "BuildKit does not even create the destination");
    let st = e.run(&op(&["nomatch*", "a.txt"], "/z")).unwrap();
    assert_eq!(e.at("/z"), "f 644 0:0 =hello\n");
    assert_eq!(st.files, 1);
    // a wildcard below a directory that does not exist is an error (fsutil walks it)
    let err = e.run(&op(&["nodir/*.txt"], "/y/")).unwrap_err();
    assert!(matches!(err, CopyError::SourceNotFound { .. }), "{err}");
}

#[test]
fn missing_source_fails_before_writing_anything() {
    let e = env();
    oracle_ctx(&e);
    let err = e.run(&op(&["a.txt", "missing.txt"], "/out/")).unwrap_err();
    assert_eq!(err.to_string(), "\"missing.txt\" not found in the build context");
    assert!(!e.exists("/out"), "nothing written when a later source is missing");
}

#[test]
fn wildcards_follow_go_filepath_match_and_walk_order() {
    let e = env();
    e.file("src/a/x.go", "ax", 0o644);
    e.file("src/b/x.go", "bx", 0o644);
    e.file("src/b/y.txt", "by", 0o644);
    e.file("src/x.go", "x", 0o644);
    e.file("src/[lit].go", "lit", 0o644);
    e.dir("src/deep/a/b", 0o755);
    e.file("src/deep/a/b/x.go", "deep", 0o644);
    e.run(&op(&["src/*/x.go"], "/o/")).unwrap();
    // both a/x.go and b/x.go match: later overwrites earlier (walk order a, b)
    assert_eq!(e.at("/o/x.go"), "f 644 0:0 =bx");
    e.run(&op(&["src/?/*.txt"], "/p/")).unwrap();
    assert_eq!(e.at("/p/y.txt"), "f 644 0:0 =by");
    // `\` escapes in a pattern (a literal path is taken as is, as fsutil does)
    e.run(&op(&["src/\\[lit]*"], "/q/")).unwrap();
    assert_eq!(e.at("/q/[lit].go"), "f 644 0:0 =lit");
    // a matched directory copies its contents (`COPY dir* /4/` merges them)
    e.run(&op(&["src/[ab]"], "/r/")).unwrap();
    assert_eq!(e.at("/r/x.go"), "f 644 0:0 =bx");
    assert_eq!(e.at("/r/y.txt"), "f 644 0:0 =by");
    // `*` never crosses a `/`
    let st = e.run(&op(&["src/*.go"], "/s/")).unwrap();
    assert_eq!(st.files, 2);
    assert!(!e.exists("/s/a"));
}

#[test]
fn context_owners_become_root_and_stage_owners_are_kept() {
    let e = env();
    e.file("owned.txt", "o", 0o644);
    std::os::unix::fs::lchown(e.ctx.join("owned.txt"), Some(1234), Some(5678)).unwrap();
    // (chown clears setuid: set the mode after it)
    fs::set_permissions(e.ctx.join("owned.txt"), fs::Permissions::from_mode(0o4755)).unwrap();
    e.dir("data/d", 0o700);
    e.file("data/d/f", "s", 0o644);
    fs::hard_link(e.ctx.join("data/d/f"), e.ctx.join("data/d/g")).unwrap();
    e.link("data/pw", "/etc/passwd");
    for p in ["data", "data/d", "data/d/f"] {
        std::os::unix::fs::lchown(e.ctx.join(p), Some(4321), Some(8765)).unwrap();
    }
    e.run(&op(&["owned.txt"], "/o/")).unwrap();
    assert_eq!(e.at("/o/owned.txt"), "f 4755 0:0 =o", "context: 0:0, setuid kept");

    let stage = CopyOp { from: Source::Stage(0), ..op(&["/data"], "/fromst/") };
    e.run(&stage).unwrap();
    assert_eq!(e.at("/fromst"), "d 755 0:0");
    assert_eq!(e.at("/fromst/d"), "d 700 4321:8765");
    assert_eq!(e.at("/fromst/d/f"), "f 644 4321:8765 =s");
    assert_eq!(e.at("/fromst/pw"), "l 777 0:0 ->/etc/passwd");
    let f = fs::metadata(e.dest.join("fromst/d/f")).unwrap();
    let g = fs::metadata(e.dest.join("fromst/d/g")).unwrap();
    assert_eq!(f.ino(), g.ino(), "hard links within one source are kept");

    let stage2 = CopyOp { from: Source::Stage(0), ..op(&["/data/d/f"], "/fromst2/") };
    e.run(&stage2).unwrap();
    assert_eq!(e.at("/fromst2/f"), "f 644 4321:8765 =s");

    e.run_with(&CopyOp { from: Source::Stage(0), ..op(&["/data"], "/fromst3/") }, Some((7, 8)), &HashMap::new(), CopyLimits::default())
        .unwrap();
    for p in ["/fromst3", "/fromst3/d", "/fromst3/d/f", "/fromst3/d/g"] {
        assert!(e.at(p).contains(" 7:8"), "{p}: {}", e.at(p));
    }
    assert_eq!(e.at("/fromst3/pw"), "l 777 7:8 ->/etc/passwd", "--chown applies to symlinks too");
    e.assert_outside_untouched();
}

#[test]
fn chown_applies_to_created_parents_only() {
    let e = env();
    oracle_ctx(&e);
    fs::create_dir_all(e.dest.join("exists")).unwrap();
    e.run_with(&op(&["a.txt"], "/exists/a/b/c/"), Some((1234, 5678)), &HashMap::new(), CopyLimits::default()).unwrap();
    assert_eq!(e.at("/exists"), "d 755 0:0");
    for p in ["/exists/a", "/exists/a/b", "/exists/a/b/c"] {
        assert_eq!(e.at(p), "d 755 1234:5678", "{p}");
    }
    assert_eq!(e.at("/exists/a/b/c/a.txt"), "f 644 1234:5678 =hello\n");
    // a directory source whose destination is created: 0755 and the --chown owner
    e.run_with(&op(&["dir"], "/t7/sub/"), Some((1234, 1234)), &HashMap::new(), CopyLimits::default()).unwrap();
    assert_eq!(e.at("/t7"), "d 755 1234:1234");
    assert_eq!(e.at("/t7/sub"), "d 755 1234:1234");
    assert_eq!(e.at("/t7/sub/sub"), "d 750 1234:1234");
    assert_eq!(e.at("/t7/sub/link"), "l 777 1234:1234 ->x");
}

#[test]
fn chmod_octal_and_symbolic() {
    let e = env();
    oracle_ctx(&e);
    let o = CopyOp { chmod: Some(Chmod::Octal(0o751)), ..op(&["a.txt", "dir"], "/t8/") };
    e.run(&o).unwrap();
    // oracle: created destination stays 0755; files and directories get the mode; links don't
    assert_eq!(e.at("/t8"), "d 755 0:0");
    assert_eq!(e.at("/t8/a.txt"), "f 751 0:0 =hello\n");
    assert_eq!(e.at("/t8/sub"), "d 751 0:0");
    assert_eq!(e.at("/t8/x"), "f 751 0:0 =x\n");
    assert_eq!(e.at("/t8/link"), "l 777 0:0 ->x");

    // symbolic (BuildKit ModeStr): applied per entry, X only to dirs and executables
    let s = CopyOp { chmod: Some(Chmod::Symbolic("u+x,g-w,o=r,a+X".into())), ..op(&["dir", "a.txt", "b.sh"], "/t9/") };
    e.run(&s).unwrap();
    assert_eq!(e.at("/t9"), "d 755 0:0");
    // x: 600 → u+x 700 → g-w 700 → o=r 704 → a+X: the original 600 has no x → 704
    assert_eq!(e.at("/t9/x"), "f 704 0:0 =x\n");
    // sub: 750 → 750 → 750 → 754 → a+X on a directory → 755
    assert_eq!(e.at("/t9/sub"), "d 755 0:0");
    // a.txt: 644 → 744 → 744 → 744 → no x originally → 744
    assert_eq!(e.at("/t9/a.txt"), "f 744 0:0 =hello\n");
    // b.sh: 755 → 755 → 755 → 754 → had x → 755
    assert_eq!(e.at("/t9/b.sh"), "f 755 0:0 =#!/bin/sh\n");

    let bad = CopyOp { chmod: Some(Chmod::Symbolic("u+q".into())), ..op(&["a.txt"], "/t10/") };
    assert!(matches!(e.run(&bad), Err(CopyError::Mode(_))));
}

#[test]
fn files_around_the_small_file_size_are_copied_byte_for_byte() {
    let e = env();
    let sizes = [0, 1, SMALL_FILE - 1, SMALL_FILE, SMALL_FILE + 1, 3 * SMALL_FILE + 7];
    let data = |n: usize| -> Vec<u8> { (0..n).map(|i| (i * 31 % 251) as u8).collect() };
    for n in sizes {
        fs::create_dir_all(e.ctx.join("s")).unwrap();
        fs::write(e.ctx.join(format!("s/f{n}")), data(n)).unwrap();
    }
    e.run(&op(&["s"], "/s/")).unwrap();
    for n in sizes {
        assert_eq!(fs::read(e.dest.join(format!("s/f{n}"))).unwrap(), data(n), "{n} bytes");
    }
}

#[test]
fn many_files_are_copied_in_parallel_with_exact_metadata() {
    // More files than one batch holds, so batches are flushed mid-walk too.
    let e = env();
    let n = LeafBatch::MAX + 300;
    for i in 0..n {
        let rel = format!("tree/d{}/f{i}", i % 7);
        e.file(&rel, &format!("content {i}\n"), 0o600 | (i as u32 % 0o200));
        set_times(&e.ctx.join(&rel), 1_000 + i as i64, 0, 1_000 + i as i64, i as i64).unwrap();
    }
    fs::hard_link(e.ctx.join("tree/d1/f1"), e.ctx.join("tree/d1/zz-link")).unwrap();
    for d in 0..7 {
        set_times(&e.ctx.join(format!("tree/d{d}")), 50 + d, 0, 50 + d, 0).unwrap();
    }
    let st = e.run(&op(&["tree"], "/t/")).unwrap();
    assert_eq!((st.files, st.hardlinks), (n as u64, 1));
    for i in 0..n {
        let p = e.dest.join(format!("t/d{}/f{i}", i % 7));
        assert_eq!(fs::read_to_string(&p).unwrap(), format!("content {i}\n"));
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600 | (i as u32 % 0o200), "{}", p.display());
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_000 + i as i64, i as i64), "{}", p.display());
    }
    for d in 0..7 {
        assert_eq!(fs::metadata(e.dest.join(format!("t/d{d}"))).unwrap().mtime(), 50 + d, "directory times after its files");
    }
    let a = fs::metadata(e.dest.join("t/d1/f1")).unwrap();
    assert_eq!(a.ino(), fs::metadata(e.dest.join("t/d1/zz-link")).unwrap().ino(), "links within the source are kept");
    // An error in a batch is reported: a directory in the way of one file.
    fs::create_dir_all(e.dest.join("u/d3/f3")).unwrap();
    assert!(matches!(e.run(&op(&["tree"], "/u/")), Err(CopyError::DirectoryInTheWay { .. })));
}

#[test]
fn mtimes_are_preserved() {
    let e = env();
    e.file("a.txt", "a", 0o644);
    e.file("d/f", "f", 0o644);
    set_times(&e.ctx.join("a.txt"), 981173106, 0, 981173106, 0).unwrap();
    set_times(&e.ctx.join("d/f"), 1000, 0, 1000, 5).unwrap();
    set_times(&e.ctx.join("d"), 2000, 0, 2000, 0).unwrap();
    e.run(&op(&["a.txt", "d"], "/m/")).unwrap();
    assert_eq!(fs::metadata(e.dest.join("m/a.txt")).unwrap().mtime(), 981173106);
    let f = fs::metadata(e.dest.join("m/f")).unwrap();
    assert_eq!((f.mtime(), f.mtime_nsec()), (1000, 5));
    e.file("e/sub/g", "g", 0o644);
    set_times(&e.ctx.join("e/sub"), 3000, 0, 3000, 0).unwrap();
    e.run(&op(&["e"], "/n/")).unwrap();
    assert_eq!(fs::metadata(e.dest.join("n/sub")).unwrap().mtime(), 3000, "directory mtime set after its children");
}

#[test]
fn hardlinks_are_kept_within_one_source_only() {
    let e = env();
    oracle_ctx(&e);
    e.run(&op(&["hard1", "hard2"], "/t14/")).unwrap();
    let a = fs::metadata(e.dest.join("t14/hard1")).unwrap();
    let b = fs::metadata(e.dest.join("t14/hard2")).unwrap();
    assert_ne!(a.ino(), b.ino(), "oracle: separate sources are separate files");
    e.dir("h", 0o755);
    fs::hard_link(e.ctx.join("hard1"), e.ctx.join("h/one")).unwrap();
    fs::hard_link(e.ctx.join("hard1"), e.ctx.join("h/two")).unwrap();
    let st = e.run(&op(&["h"], "/h/")).unwrap();
    let a = fs::metadata(e.dest.join("h/one")).unwrap();
    let b = fs::metadata(e.dest.join("h/two")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!((st.files, st.hardlinks), (1, 1));
    // nor across the matches of one wildcard (one fsutil Copy per match; Docker 20.10 agrees)
    e.run(&op(&["hard*"], "/w/")).unwrap();
    let a = fs::metadata(e.dest.join("w/hard1")).unwrap();
    let b = fs::metadata(e.dest.join("w/hard2")).unwrap();
    assert_ne!(a.ino(), b.ino());
}

#[test]
fn destination_symlinks_are_followed_inside_the_root() {
    let e = env();
    oracle_ctx(&e);
    fs::create_dir(e.dest.join("target")).unwrap();
    symlink("/target", e.dest.join("lnk")).unwrap();
    symlink("../target", e.dest.join("lnk2")).unwrap();
    e.run(&op(&["a.txt"], "/lnk/")).unwrap();
    e.run(&op(&["c.txt"], "/lnk2/sub/")).unwrap();
    assert_eq!(e.at("/lnk"), "l 777 0:0 ->/target");
    assert_eq!(e.at("/target/a.txt"), "f 644 0:0 =hello\n");
    assert_eq!(e.at("/target/sub/c.txt"), "f 644 0:0 =c\n");
    // a destination symlink to a host directory is re-rooted, never written through
    symlink(&e.outside, e.dest.join("escape")).unwrap();
    symlink("../../../../../..", e.dest.join("dots")).unwrap();
    e.run(&op(&["a.txt"], "/escape/")).unwrap();
    e.run(&op(&["a.txt"], "/escape/canary.txt")).unwrap();
    e.run(&op(&["dir"], "/dots/planted/")).unwrap();
    e.assert_outside_untouched();
    let rerooted = e.dest.join(e.outside.strip_prefix("/").unwrap());
    assert_eq!(describe(&rerooted.join("a.txt")), "f 644 0:0 =hello\n");
    assert_eq!(describe(&rerooted.join("canary.txt")), "f 644 0:0 =hello\n");
    assert_eq!(e.at("/planted/x"), "f 600 0:0 =x\n");
}

#[test]
fn destination_file_symlink_is_replaced_not_written_through() {
    let e = env();
    oracle_ctx(&e);
    fs::create_dir(e.dest.join("d")).unwrap();
    symlink(e.outside.join("canary.txt"), e.dest.join("d/a.txt")).unwrap();
    e.run(&op(&["a.txt"], "/d/")).unwrap();
    assert_eq!(e.at("/d/a.txt"), "f 644 0:0 =hello\n");
    // inside a directory copy: an existing symlink where a directory merges is an error
    fs::create_dir(e.dest.join("m")).unwrap();
    symlink(e.outside.join("canary-dir"), e.dest.join("m/sub")).unwrap();
    let err = e.run(&op(&["dir"], "/m")).unwrap_err();
    assert_eq!(err.to_string(), "cannot copy a directory to /m/sub: it exists and is not a directory");
    e.assert_outside_untouched();
}

#[test]
fn type_conflicts_at_the_destination() {
    let e = env();
    oracle_ctx(&e);
    fs::create_dir_all(e.dest.join("etc")).unwrap();
    fs::write(e.dest.join("etc/passwd"), "root").unwrap();
    let err = e.run(&op(&["dir"], "/etc/passwd")).unwrap_err();
    assert!(matches!(err, CopyError::NotADirectory { ref path } if path == "/etc/passwd"), "{err}");
    let err = e.run(&op(&["a.txt"], "/etc/passwd/")).unwrap_err();
    assert!(matches!(err, CopyError::DestResolve { .. }), "{err}");
    assert!(err.to_string().contains("/etc/passwd"), "{err}");
    // a file source into /x/ where x/a.txt is a directory: fsutil's "cannot replace to
    // directory ... with file"
    fs::create_dir_all(e.dest.join("x/a.txt")).unwrap();
    let err = e.run(&op(&["a.txt"], "/x/")).unwrap_err();
    assert_eq!(err.to_string(), "cannot copy a file to /x/a.txt: a directory is in the way");
    assert_eq!(e.at("/x/a.txt"), "d 755 0:0");
}

#[test]
fn file_over_directory_in_a_tree_copy_is_an_error() {
    let e = env();
    e.file("src/item", "file", 0o644);
    fs::create_dir_all(e.dest.join("dst/item")).unwrap();
    let err = e.run(&op(&["src"], "/dst")).unwrap_err();
    assert_eq!(err.to_string(), "cannot copy a file to /dst/item: a directory is in the way");
}

#[test]
fn hostile_source_paths_never_read_outside_the_context() {
    let e = env();
    oracle_ctx(&e);
    // a file the context's in-root resolution would name, planted on the host side
    e.link("outdir", e.outside.to_str().unwrap());
    e.link("outdir2", "../outside");
    e.link("loop1", "loop2");
    e.link("loop2", "loop1");
    for (src, want) in [
        ("absl", "not found"),
        ("rell", "not found"),
        ("outdir/canary.txt", "not found"),
        ("outdir2/canary.txt", "not found"),
        ("../outside/canary.txt", "not found"),
        ("/../../outside/canary.txt", "not found"),
        ("loop1", "too many levels of symbolic links"),
        ("loop2/x", "too many levels of symbolic links"),
        ("abs*", "not found"),
    ] {
        let err = e.run(&op(&[src], "/t/")).unwrap_err().to_string();
        assert!(err.contains(want), "COPY {src}: {err}");
        e.assert_outside_untouched();
    }
    assert!(!e.exists("/t"));
    // once the context has its own etc/passwd, the absolute link reads that one
    e.file("etc/passwd", "context passwd", 0o644);
    e.run(&op(&["absl", "rell"], "/t/")).unwrap();
    assert_eq!(e.at("/t/absl"), "f 644 0:0 =context passwd");
    assert_eq!(e.at("/t/rell"), "f 644 0:0 =context passwd");
    // a symlink chain inside the context resolves
    e.link("c1", "c2");
    e.link("c2", "/dirlink/../dir/./link");
    e.run(&op(&["c1"], "/chain")).unwrap();
    assert_eq!(e.at("/chain"), "f 600 0:0 =x\n");
    e.assert_outside_untouched();
}

#[test]
fn symlinks_inside_copied_trees_are_copied_as_links() {
    let e = env();
    e.file("tree/f", "f", 0o644);
    e.link("tree/abs", "/etc/passwd");
    e.link("tree/up", "../../../../outside");
    e.link("tree/dir", e.outside.to_str().unwrap());
    let st = e.run(&op(&["tree"], "/t/")).unwrap();
    assert_eq!(st.symlinks, 3);
    assert_eq!(e.at("/t/abs"), "l 777 0:0 ->/etc/passwd");
    assert_eq!(e.at("/t/up"), "l 777 0:0 ->../../../../outside");
    assert_eq!(e.at("/t/dir"), format!("l 777 0:0 ->{}", e.outside.display()), "copied as a link, not followed");
    e.assert_outside_untouched();
}

#[test]
fn exclude_patterns() {
    let e = env();
    e.file("docs/a.md", "a", 0o644);
    e.file("docs/README.md", "r", 0o644);
    e.file("docs/b.txt", "b", 0o644);
    e.file("docs/sub/c.md", "c", 0o644);
    e.file("docs/sub/d.txt", "d", 0o644);
    e.file("hom1.txt", "1", 0o644);
    e.file("hom2.md", "2", 0o644);
    e.file("homedir/x.txt", "x", 0o644);
    e.file("homedir/y.bin", "y", 0o644);
    let o = CopyOp { exclude: vec!["*.md".into()], ..op(&["docs"], "/d1/") };
    e.run(&o).unwrap();
    let got: Vec<String> = snapshot(&e.dest.join("d1")).into_keys().collect();
    assert_eq!(got, ["b.txt", "sub", "sub/c.md", "sub/d.txt"], "*.md is relative to the source: only top-level .md");
    let o = CopyOp { exclude: vec!["**/*.md".into(), "!README.md".into()], ..op(&["docs"], "/d2/") };
    e.run(&o).unwrap();
    let got: Vec<String> = snapshot(&e.dest.join("d2")).into_keys().collect();
    assert_eq!(got, ["README.md", "b.txt", "sub", "sub/d.txt"]);
    let o = CopyOp { exclude: vec!["sub".into()], ..op(&["docs"], "/d3/") };
    e.run(&o).unwrap();
    assert!(!e.exists("/d3/sub"));
    let o = CopyOp { exclude: vec!["sub".into(), "!sub/d.txt".into()], ..op(&["docs"], "/d4/") };
    e.run(&o).unwrap();
    let got: Vec<String> = snapshot(&e.dest.join("d4/sub")).into_keys().collect();
    assert_eq!(got, ["d.txt"], "a re-included file brings its directory back");
    // the documented example: COPY --exclude=*.txt hom* /mydir/
    let o = CopyOp { exclude: vec!["*.txt".into()], ..op(&["hom*"], "/mydir/") };
    e.run(&o).unwrap();
    let got: Vec<String> = snapshot(&e.dest.join("mydir")).into_keys().collect();
    assert_eq!(got, ["hom2.md", "y.bin"]);
    let o = CopyOp { exclude: vec!["[".into()], ..op(&["docs"], "/d5/") };
    assert!(matches!(e.run(&o), Err(CopyError::Exclude(_))));
}

#[test]
fn parents_keep_the_source_structure() {
    let e = env();
    e.file("x/a.txt", "xa", 0o644);
    e.file("y/a.txt", "ya", 0o644);
    e.file("y/b.txt", "yb", 0o644);
    e.dir("one/two", 0o700);
    e.file("one/two/some.txt", "s", 0o640);
    e.file("src/pkg/m.go", "m", 0o644);
    e.file("src/pkg/m_test.go", "t", 0o644);
    e.file("src/other/n.go", "n", 0o644);
    e.file("src/README", "r", 0o644);
    let o = CopyOp { parents: true, ..op(&["./x/a.txt", "./y/a.txt"], "/parents/") };
    e.run(&o).unwrap();
    let got: Vec<String> = snapshot(&e.dest.join("parents")).into_keys().collect();
    assert_eq!(got, ["x", "x/a.txt", "y", "y/a.txt"]);
    let o = CopyOp { parents: true, ..op(&["./one/two/some.txt"], "/p2/") };
    e.run(&o).unwrap();
    assert_eq!(e.at("/p2/one/two"), "d 700 0:0", "parent directories copied with their metadata");
    assert_eq!(e.at("/p2/one/two/some.txt"), "f 640 0:0 =s");
    // pivot: the structure below `/./` is kept
    let o = CopyOp { parents: true, ..op(&["one/./two/some.txt"], "/p3/") };
    e.run(&o).unwrap();
    assert_eq!(e.at("/p3/two/some.txt"), "f 640 0:0 =s");
    assert!(!e.exists("/p3/one"));
    // patterns (moby syntax) with exclude
    let o = CopyOp { parents: true, exclude: vec!["**/*_test.go".into()], ..op(&["src/**/*.go"], "/p4/") };
    e.run(&o).unwrap();
    let got: Vec<String> = snapshot(&e.dest.join("p4")).into_keys().collect();
    assert_eq!(got, ["src", "src/other", "src/other/n.go", "src/pkg", "src/pkg/m.go"]);
    // a whole directory
    let o = CopyOp { parents: true, ..op(&["y"], "/p5/") };
    e.run(&o).unwrap();
    let got: Vec<String> = snapshot(&e.dest.join("p5")).into_keys().collect();
    assert_eq!(got, ["y", "y/a.txt", "y/b.txt"]);
    // a missing path selects nothing (BuildKit: silently)
    let o = CopyOp { parents: true, ..op(&["nope/a.txt"], "/p6/") };
    e.run(&o).unwrap();
    assert!(snapshot(&e.dest.join("p6")).is_empty());
}

/// name, type, data, link target, mode, uid=gid
type TarEntry<'a> = (&'a str, tar::EntryType, &'a [u8], &'a str, u32, u64);

fn tar_bytes(entries: &[TarEntry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, t, data, link, mode, id) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*t);
        h.set_mode(*mode);
        h.set_uid(*id);
        h.set_gid(*id);
        h.set_mtime(1_000_000);
        h.set_size(data.len() as u64);
        // raw names: tar::Builder would refuse `..` and absolute names
        let nb = name.as_bytes();
        h.as_old_mut().name[..nb.len()].copy_from_slice(nb);
        if !link.is_empty() {
            let lb = link.as_bytes();
            h.as_old_mut().linkname[..lb.len()].copy_from_slice(lb);
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn sample_tar() -> Vec<u8> {
    use tar::EntryType as T;
    tar_bytes(&[
        ("d/", T::Directory, b"", "", 0o755, 0),
        ("d/f1", T::Regular, b"t1\n", "", 0o640, 1000),
        ("d/lnk", T::Symlink, b"", "f1", 0o777, 0),
        ("d/hl", T::Link, b"", "d/f1", 0o640, 1000),
        ("deep/er/file", T::Regular, b"deep", "", 0o600, 0),
    ])
}

fn compress(kind: &str, data: &[u8]) -> Vec<u8> {
    match kind {
        "plain" => data.to_vec(),
        "gz" => {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        "bz2" => {
            let mut w = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        "xz" => {
            let mut w = liblzma::write::XzEncoder::new(Vec::new(), 6);
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        "zst" => zstd::encode_all(data, 3).unwrap(),
        _ => unreachable!(),
    }
}

#[test]
fn add_extracts_archives_detected_by_content() {
    for kind in ["plain", "gz", "bz2", "xz", "zst"] {
        let e = env();
        // the name says nothing: detection is by content
        fs::write(e.ctx.join("archive.bin"), compress(kind, &sample_tar())).unwrap();
        let st = e.run(&add(&["archive.bin"], "/a")).unwrap_or_else(|err| panic!("{kind}: {err}"));
        assert_eq!(st.archives, 1, "{kind}");
        assert_eq!(e.at("/a"), "d 755 0:0", "{kind}");
        assert_eq!(e.at("/a/d/f1"), "f 640 1000:1000 =t1\n", "{kind}");
        assert_eq!(e.at("/a/d/lnk"), "l 777 0:0 ->f1", "{kind}");
        assert_eq!(fs::metadata(e.dest.join("a/d/hl")).unwrap().ino(), fs::metadata(e.dest.join("a/d/f1")).unwrap().ino(), "{kind}");
        assert_eq!(e.at("/a/deep/er"), "d 755 0:0", "{kind}: implied parents 0755 root");
        assert_eq!(fs::metadata(e.dest.join("a/d/f1")).unwrap().mtime(), 1_000_000);
        e.assert_outside_untouched();
    }
}

#[test]
fn add_non_archives_and_copy_never_extract() {
    let e = env();
    fs::write(e.ctx.join("justgz.gz"), compress("gz", b"not a tar")).unwrap();
    fs::write(e.ctx.join("a.tar"), sample_tar()).unwrap();
    e.file("small.txt", "x", 0o644);
    e.run(&add(&["justgz.gz", "small.txt"], "/a7/")).unwrap();
    assert!(e.at("/a7/justgz.gz").starts_with("f 644 0:0"));
    assert_eq!(e.at("/a7/small.txt"), "f 644 0:0 =x");
    e.run(&op(&["a.tar"], "/c/")).unwrap();
    assert!(e.at("/c/a.tar").starts_with("f 644"), "COPY copies archives as files");
    // ADD of a directory copies it, with --chown
    e.file("tarsrc/d/f1", "t1", 0o640);
    e.run_with(&add(&["tarsrc"], "/a11/"), Some((11, 12)), &HashMap::new(), CopyLimits::default()).unwrap();
    assert_eq!(e.at("/a11/d/f1"), "f 640 11:12 =t1");
}

#[test]
fn add_chown_overrides_archive_owners() {
    let e = env();
    fs::write(e.ctx.join("a.tar"), sample_tar()).unwrap();
    e.run_with(&add(&["a.tar"], "/a9/"), Some((9, 9)), &HashMap::new(), CopyLimits::default()).unwrap();
    assert_eq!(e.at("/a9"), "d 755 9:9");
    assert_eq!(e.at("/a9/d/f1"), "f 640 9:9 =t1\n");
    assert_eq!(e.at("/a9/d/lnk"), "l 777 9:9 ->f1");
    assert_eq!(e.at("/a9/deep"), "d 755 0:0", "implied parents stay root-owned");
}

type TarCase = (&'static str, fn(&str) -> Vec<u8>, Result<&'static [(&'static str, &'static str)], &'static str>);

#[test]
fn hostile_archives_stay_inside_the_destination() {
    use tar::EntryType as T;
    // each case builds its tar from the absolute path of the canary directory
    let cases: &[TarCase] = &[
        (
            "dotdot-and-absolute",
            |_| {
                tar_bytes(&[
                    ("../../escape1", T::Regular, b"evil", "", 0o644, 0),
                    ("/abs/escape2", T::Regular, b"evil", "", 0o644, 0),
                    ("./ok", T::Regular, b"ok", "", 0o644, 0),
                    ("a/../../../b/../c", T::Regular, b"c", "", 0o644, 0),
                ])
            },
            Ok(&[("escape1", "f 644 0:0 =evil"), ("abs/escape2", "f 644 0:0 =evil"), ("ok", "f 644 0:0 =ok"), ("c", "f 644 0:0 =c")]),
        ),
        (
            "write-through-absolute-symlink",
            |out| tar_bytes(&[("sl", T::Symlink, b"", out, 0o777, 0), ("sl/canary.txt", T::Regular, b"evil", "", 0o644, 0)]),
            Ok(&[("sl", "l 777 0:0 ->OUTSIDE"), ("OUTSIDE/canary.txt", "f 644 0:0 =evil")]),
        ),
        (
            "write-through-dotdot-symlink",
            |_| tar_bytes(&[("sl2", T::Symlink, b"", "../../../../../", 0o777, 0), ("sl2/x", T::Regular, b"evil", "", 0o644, 0)]),
            Ok(&[("x", "f 644 0:0 =evil")]),
        ),
        (
            "directory-through-symlink",
            |out| tar_bytes(&[("sd", T::Symlink, b"", out, 0o777, 0), ("sd/", T::Directory, b"", "", 0o700, 0)]),
            Ok(&[("OUTSIDE", "d 700 0:0")]),
        ),
        (
            "replace-symlink-with-file",
            |out| {
                let target = format!("{out}/canary.txt");
                tar_bytes(&[("f", T::Symlink, b"", &target, 0o777, 0), ("f", T::Regular, b"new", "", 0o644, 0)])
            },
            Ok(&[("f", "f 644 0:0 =new")]),
        ),
        ("hardlink-to-host-passwd", |_| tar_bytes(&[("hl", T::Link, b"", "/etc/passwd", 0o644, 0)]), Err("hard link target")),
        ("hardlink-dotdot", |_| tar_bytes(&[("hl", T::Link, b"", "../../../../etc/passwd", 0o644, 0)]), Err("hard link target")),
        (
            "hardlink-through-symlink",
            |out| tar_bytes(&[("s", T::Symlink, b"", out, 0o777, 0), ("hl", T::Link, b"", "s/canary.txt", 0o644, 0)]),
            Err("hard link target"),
        ),
        ("hardlink-to-root", |_| tar_bytes(&[("hl", T::Link, b"", "/", 0o644, 0)]), Err("extraction directory itself")),
        ("device-node", |_| tar_bytes(&[("dev", T::Char, b"", "", 0o644, 0)]), Err("unsupported entry type")),
        (
            "symlink-loop",
            |_| {
                tar_bytes(&[
                    ("l1", T::Symlink, b"", "l2", 0o777, 0),
                    ("l2", T::Symlink, b"", "l1", 0o777, 0),
                    ("l1/x", T::Regular, b"x", "", 0o644, 0),
                ])
            },
            Err("too many levels"),
        ),
    ];
    for (name, build, want) in cases {
        let e = env();
        let out = e.outside.to_str().unwrap().to_string();
        fs::write(e.ctx.join("evil.tar"), build(&out)).unwrap();
        let res = e.run(&add(&["evil.tar"], "/x/"));
        match want {
            Ok(paths) => {
                res.unwrap_or_else(|err| panic!("{name}: {err}"));
                for (p, d) in *paths {
                    let p = p.replace("OUTSIDE", out.trim_start_matches('/'));
                    assert_eq!(e.at(&format!("/x/{p}")), d.replace("OUTSIDE", &out), "{name}: {p}");
                }
            }
            Err(msg) => {
                let err = res.expect_err(name).to_string();
                assert!(err.contains(msg), "{name}: {err}");
                assert!(err.contains("evil.tar"), "{name}: the error names the archive: {err}");
            }
        }
        e.assert_outside_untouched();
        let mut top: Vec<String> = fs::read_dir(&e.dest).unwrap().map(|d| d.unwrap().file_name().to_string_lossy().into_owned()).collect();
        top.sort();
        assert!(top == ["tmp", "x"], "{name}: nothing outside the extraction dir: {top:?}");
    }
}

#[test]
fn decompression_bombs_are_refused() {
    let e = env();
    // 64 MiB of zeros in one entry: gzip makes it ~64 KiB (ratio ~1000)
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(64 << 20);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "zeros", io::repeat(0).take(64 << 20)).unwrap();
    let tar = b.into_inner().unwrap();
    fs::write(e.ctx.join("bomb.tar.gz"), compress("gz", &tar)).unwrap();
    let limits = CopyLimits { max_ratio: 100, ratio_grace_bytes: 1 << 20, ..CopyLimits::default() };
    let err = e.run_with(&add(&["bomb.tar.gz"], "/b/"), None, &HashMap::new(), limits).unwrap_err();
    assert!(matches!(err, CopyError::ArchiveLimit { .. }), "{err}");
    assert!(err.to_string().contains("bomb.tar.gz") && err.to_string().contains("decompression bomb"), "{err}");
    let limits = CopyLimits { max_bytes: 1 << 20, ..CopyLimits::default() };
    let err = e.run_with(&add(&["bomb.tar.gz"], "/c/"), None, &HashMap::new(), limits).unwrap_err();
    assert!(err.to_string().contains("more than 1048576 bytes"), "{err}");
    // entry count
    fs::write(e.ctx.join("many.tar"), sample_tar()).unwrap();
    let limits = CopyLimits { max_entries: 2, ..CopyLimits::default() };
    let err = e.run_with(&add(&["many.tar"], "/d/"), None, &HashMap::new(), limits).unwrap_err();
    assert!(err.to_string().contains("more than 2 entries"), "{err}");
    // the defaults refuse it too (ratio ~1000 past 64 MiB), after at most 64 MiB + a block
    let err = e.run(&add(&["bomb.tar.gz"], "/def/")).unwrap_err();
    assert!(matches!(err, CopyError::ArchiveLimit { .. }), "{err}");
    // and it passes where the builder allows such ratios
    let limits = CopyLimits { max_ratio: 5000, ..CopyLimits::default() };
    e.run_with(&add(&["bomb.tar.gz"], "/ok/"), None, &HashMap::new(), limits).unwrap();
    assert_eq!(fs::metadata(e.dest.join("ok/zeros")).unwrap().len(), 64 << 20);
    e.assert_outside_untouched();
}

#[test]
fn add_url_sources() {
    let e = env();
    let dl = e.outside.join("download");
    fs::write(&dl, "urlcontent\n").unwrap();
    set_times(&dl, 1115269505, 0, 1115269505, 0).unwrap();
    let mut urls = HashMap::new();
    urls.insert("http://127.0.0.1:8765/dir/file%20name.txt?x=1".to_string(), dl.clone());
    let src = |dest: &str| CopyOp {
        sources: vec![CopySource::Url { url: "http://127.0.0.1:8765/dir/file%20name.txt?x=1".into(), checksum: None }],
        ..add(&[], dest)
    };
    let canary = snapshot(&e.outside);
    e.run_with(&src("/u/"), None, &urls, CopyLimits::default()).unwrap();
    assert_eq!(e.at("/u/file name.txt"), "f 600 0:0 =urlcontent\n");
    assert_eq!(fs::metadata(e.dest.join("u/file name.txt")).unwrap().mtime(), 1115269505);
    e.run_with(&src("/u2"), Some((5, 6)), &urls, CopyLimits::default()).unwrap();
    assert_eq!(e.at("/u2"), "f 600 5:6 =urlcontent\n");
    let err = e.run_with(&src("/u3/"), None, &HashMap::new(), CopyLimits::default()).unwrap_err();
    assert!(matches!(err, CopyError::UrlNotDownloaded { .. }));
    assert_eq!(snapshot(&e.outside), canary, "the download is only read");
    for (u, n) in [
        ("http://h/", "__unnamed__"),
        ("http://h", "__unnamed__"),
        ("https://h/a/b.tar.gz", "b.tar.gz"),
        ("https://h/a/b/?q=/x", "b"),
        ("https://h/a/..", "__unnamed__"),
        ("https://h/%2e%2e", "__unnamed__"),
    ] {
        assert_eq!(url_file_name(u), n, "{u}");
    }
}

#[test]
fn heredoc_sources() {
    let e = env();
    let h = |dest: &str| CopyOp { sources: vec![CopySource::Inline { name: "EOF".into(), content: "line\n".into() }], ..op(&[], dest) };
    e.run(&h("/etc/conf")).unwrap();
    assert_eq!(e.at("/etc/conf"), "f 644 0:0 =line\n");
    e.run(&h("/app/")).unwrap();
    assert_eq!(e.at("/app/EOF"), "f 644 0:0 =line\n");
    e.run(&CopyOp { chmod: Some(Chmod::Octal(0o755)), ..h("/bin/script") }).unwrap();
    assert_eq!(e.at("/bin/script"), "f 755 0:0 =line\n");
    let evil = CopyOp { sources: vec![CopySource::Inline { name: "../../x".into(), content: "c".into() }], ..op(&[], "/h/") };
    e.run(&evil).unwrap();
    assert_eq!(e.at("/h/x"), "f 644 0:0 =c");
    e.assert_outside_untouched();
}

#[test]
fn special_files_from_a_stage() {
    let e = env();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        e.ctx.join("fifo").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    let o = CopyOp { from: Source::Stage(1), ..op(&["fifo"], "/s/") };
    let st = e.run(&o).unwrap();
    assert_eq!(st.other, 1);
    let m = fs::symlink_metadata(e.dest.join("s/fifo")).unwrap();
    assert!(m.file_type().is_fifo());
    assert_eq!(m.mode() & 0o7777, 0o640);
}

#[test]
fn xattrs_are_copied_when_the_filesystem_has_them() {
    let e = env();
    e.file("x.txt", "x", 0o644);
    let name = std::ffi::CString::new("user.hoist").unwrap();
    if rustix::fs::lsetxattr(e.ctx.join("x.txt").as_path(), name.as_c_str(), b"v1", rustix::fs::XattrFlags::empty()).is_err() {
        hoist_oci::testing::needs("user xattrs on the temporary directory's filesystem", false);
        return;
    }
    e.run(&op(&["x.txt"], "/x/")).unwrap();
    assert_eq!(read_xattrs(&e.dest.join("x/x.txt")), vec![(b"user.hoist".to_vec(), b"v1".to_vec())]);
}

#[test]
fn deep_trees_do_not_overflow() {
    let e = env();
    let mut rel = String::from("deep");
    for _ in 0..400 {
        rel.push_str("/d");
    }
    e.file(&format!("{rel}/leaf"), "leaf", 0o644);
    let st = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn({
            let ctx = e.ctx.clone();
            let dest = e.dest.clone();
            move || {
                let o = op(&["deep"], "/deep/");
                copy(&CopyParams {
                    op: &o,
                    src_root: &ctx,
                    dest_root: &dest,
                    owner: None,
                    urls: &HashMap::new(),
                    limits: CopyLimits::default(),
                })
                .map(|s| s.files)
                .map_err(|e| e.to_string())
            }
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(st, Ok(1));
    assert_eq!(e.at(&format!("{rel}/leaf")), "f 644 0:0 =leaf");
}

fn digest_of(e: &Env, o: &CopyOp) -> Digest {
    source_digest(&e.ctx, o, &|_| None).unwrap()
}

#[test]
fn source_digest_tracks_exactly_the_selected_content() {
    let e = env();
    e.file("app/main.go", "package main", 0o644);
    e.file("app/util.go", "package util", 0o644);
    e.file("app/README.md", "docs", 0o644);
    e.file("other.txt", "other", 0o644);
    let o = CopyOp { exclude: vec!["*.md".into()], ..op(&["app"], "/app/") };
    let d0 = digest_of(&e, &o);
    assert_eq!(d0, digest_of(&e, &o), "deterministic");
    // not selected: an unrelated file, an excluded one, mtimes
    fs::write(e.ctx.join("other.txt"), "changed").unwrap();
    fs::write(e.ctx.join("app/README.md"), "changed docs").unwrap();
    set_times(&e.ctx.join("app/main.go"), 5, 0, 5, 0).unwrap();
    assert_eq!(d0, digest_of(&e, &o), "unselected changes and mtimes do not count");
    // context owners do not count (they become 0:0)
    std::os::unix::fs::lchown(e.ctx.join("app/main.go"), Some(1000), Some(1000)).unwrap();
    assert_eq!(d0, digest_of(&e, &o));
    // content, mode, a new file, a rename, a new symlink do
    let mut seen = vec![d0.clone()];
    let mut check = |what: &str| {
        let d = digest_of(&e, &o);
        assert!(!seen.contains(&d), "{what} must change the digest");
        seen.push(d);
    };
    fs::write(e.ctx.join("app/main.go"), "package main // x").unwrap();
    check("content");
    fs::set_permissions(e.ctx.join("app/main.go"), fs::Permissions::from_mode(0o755)).unwrap();
    check("mode");
    fs::write(e.ctx.join("app/new.go"), "").unwrap();
    check("new empty file");
    fs::rename(e.ctx.join("app/new.go"), e.ctx.join("app/new2.go")).unwrap();
    check("rename");
    symlink("main.go", e.ctx.join("app/l")).unwrap();
    check("symlink");
    fs::remove_file(e.ctx.join("app/l")).unwrap();
    symlink("util.go", e.ctx.join("app/l")).unwrap();
    check("symlink target");
    fs::create_dir(e.ctx.join("app/empty")).unwrap();
    check("empty directory");
    // stage sources: owners count
    let s = CopyOp { from: Source::Stage(0), ..o.clone() };
    let ds = digest_of(&e, &s);
    std::os::unix::fs::lchown(e.ctx.join("app/util.go"), Some(7), Some(7)).unwrap();
    assert_ne!(ds, digest_of(&e, &s), "owner of a stage file counts");
    // missing sources are errors, as for the copy
    assert!(matches!(source_digest(&e.ctx, &op(&["nope"], "/"), &|_| None), Err(CopyError::SourceNotFound { .. })));
}

#[test]
fn source_digest_uses_known_file_digests() {
    let e = env();
    e.file("d/a.txt", "a", 0o644);
    e.link("dl", "d");
    let o = op(&["dl"], "/x/");
    let asked = std::cell::RefCell::new(Vec::new());
    let fake = Digest::of(b"pretend");
    let d1 = source_digest(&e.ctx, &o, &|p| {
        asked.borrow_mut().push(p.to_string());
        Some(fake.clone())
    })
    .unwrap();
    assert_eq!(*asked.borrow(), ["d/a.txt"], "asked with the real path relative to the context");
    let d2 = source_digest(&e.ctx, &o, &|_| Some(Digest::of(b"other"))).unwrap();
    assert_ne!(d1, d2, "the provided digest is what is hashed");
    let d3 = source_digest(&e.ctx, &o, &|_| Some(Digest::of(b"a"))).unwrap();
    assert_eq!(d3, digest_of(&e, &o), "a correct digest gives the same result as hashing");
}

#[test]
fn source_digest_of_wildcards_parents_urls_and_heredocs() {
    let e = env();
    e.file("a.txt", "a", 0o644);
    e.file("b.txt", "b", 0o644);
    e.file("c.md", "c", 0o644);
    let w = op(&["*.txt"], "/");
    let d = digest_of(&e, &w);
    fs::write(e.ctx.join("c.md"), "changed").unwrap();
    assert_eq!(d, digest_of(&e, &w));
    fs::write(e.ctx.join("d.txt"), "new match").unwrap();
    assert_ne!(d, digest_of(&e, &w), "a new match changes it");
    let p = CopyOp { parents: true, ..op(&["*.md"], "/") };
    let dp = digest_of(&e, &p);
    fs::write(e.ctx.join("a.txt"), "not selected").unwrap();
    assert_eq!(dp, digest_of(&e, &p));
    let u = |c: Option<&str>| CopyOp {
        sources: vec![CopySource::Url { url: "https://x/y".into(), checksum: c.map(String::from) }],
        ..add(&[], "/")
    };
    assert_ne!(digest_of(&e, &u(None)), digest_of(&e, &u(Some("sha256:00"))));
    let h = |c: &str| CopyOp { sources: vec![CopySource::Inline { name: "EOF".into(), content: c.into() }], ..op(&[], "/") };
    assert_ne!(digest_of(&e, &h("a")), digest_of(&e, &h("b")));
}
