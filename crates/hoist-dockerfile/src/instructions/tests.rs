use super::*;
use crate::parser::parse;
use crate::DockerfileError;

fn instr(line: &str) -> Result<Instruction, DockerfileError> {
    let df = parse(&format!("FROM x\n{line}\n"))?;
    let node = df.nodes.last().expect("node");
    Ok(parse_instruction(node)?.instruction)
}

fn ok(line: &str) -> Instruction {
    instr(line).unwrap_or_else(|e| panic!("{line:?} failed: {e}"))
}

fn err(line: &str) -> String {
    match instr(line) {
        Ok(i) => panic!("{line:?} should fail, got {i:?}"),
        Err(e) => e.message().to_string(),
    }
}

fn s(items: &[&str]) -> Vec<String> {
    items.iter().map(|x| x.to_string()).collect()
}

fn copy(line: &str) -> CopyInstr {
    match ok(line) {
        Instruction::Copy(c) => c,
        other => panic!("not a copy: {other:?}"),
    }
}

fn run(line: &str) -> RunInstr {
    match ok(line) {
        Instruction::Run(r) => r,
        other => panic!("not a run: {other:?}"),
    }
}

#[test]
fn every_instruction_parses() {
    let cases: &[(&str, Instruction)] = &[
        ("ARG A", Instruction::Arg(vec![ArgDef { key: "A".into(), default: None }])),
        (
            "ARG A=1 B C=\"x y\"",
            Instruction::Arg(vec![
                ArgDef { key: "A".into(), default: Some("1".into()) },
                ArgDef { key: "B".into(), default: None },
                ArgDef { key: "C".into(), default: Some("\"x y\"".into()) },
            ]),
        ),
        ("ARG A=", Instruction::Arg(vec![ArgDef { key: "A".into(), default: Some(String::new()) }])),
        ("ENV A=1", Instruction::Env(vec![KeyValue { key: "A".into(), value: "1".into(), legacy: false }])),
        ("ENV A 1 2", Instruction::Env(vec![KeyValue { key: "A".into(), value: "1 2".into(), legacy: true }])),
        ("LABEL a=b", Instruction::Label(vec![KeyValue { key: "a".into(), value: "b".into(), legacy: false }])),
        ("WORKDIR /app", Instruction::Workdir("/app".into())),
        ("USER 1000:1000", Instruction::User("1000:1000".into())),
        ("EXPOSE 443 80/udp 22", Instruction::Expose(s(&["22", "443", "80/udp"]))),
        ("VOLUME /a /b", Instruction::Volume(s(&["/a", "/b"]))),
        ("VOLUME [\"/data\"]", Instruction::Volume(s(&["/data"]))),
        ("STOPSIGNAL SIGTERM", Instruction::StopSignal("SIGTERM".into())),
        ("MAINTAINER me", Instruction::Maintainer("me".into())),
        ("SHELL [\"/bin/bash\", \"-eu\", \"-c\"]", Instruction::Shell(s(&["/bin/bash", "-eu", "-c"]))),
        ("ONBUILD RUN make", Instruction::Onbuild("RUN make".into())),
        ("onbuild   copy a b", Instruction::Onbuild("copy a b".into())),
        ("CMD [\"a\", \"b\"]", Instruction::Cmd(CmdLine { args: s(&["a", "b"]), prepend_shell: false, files: vec![] })),
        ("CMD echo $HOME", Instruction::Cmd(CmdLine { args: s(&["echo $HOME"]), prepend_shell: true, files: vec![] })),
        ("CMD []", Instruction::Cmd(CmdLine { args: vec![], prepend_shell: false, files: vec![] })),
        ("ENTRYPOINT top -b", Instruction::Entrypoint(CmdLine { args: s(&["top -b"]), prepend_shell: true, files: vec![] })),
        ("ENTRYPOINT []", Instruction::Entrypoint(CmdLine { args: vec![], prepend_shell: false, files: vec![] })),
    ];
    for (line, want) in cases {
        assert_eq!(&ok(line), want, "{line}");
    }
}

#[test]
fn from_forms() {
    let cases: &[(&str, &str, Option<&str>, Option<&str>)] = &[
        ("FROM alpine", "alpine", None, None),
        ("FROM alpine AS Build", "alpine", Some("build"), None),
        ("FROM alpine as b-1_x.y", "alpine", Some("b-1_x.y"), None),
        ("FROM --platform=linux/arm64 alpine", "alpine", None, Some("linux/arm64")),
        ("FROM --platform=$BUILDPLATFORM golang:1.22 AS build", "golang:1.22", Some("build"), Some("$BUILDPLATFORM")),
        ("FROM ${IMG}:${TAG}", "${IMG}:${TAG}", None, None),
    ];
    for (line, base, name, platform) in cases {
        let df = parse(&format!("{line}\n")).unwrap();
        match parse_instruction(&df.nodes[0]).unwrap().instruction {
            Instruction::From(f) => {
                assert_eq!((f.base.as_str(), f.name.as_deref(), f.platform.as_deref()), (*base, *name, *platform), "{line}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn from_errors() {
    let cases: &[(&str, &str)] = &[
        ("FROM a b", "FROM requires either one or three arguments"),
        ("FROM a AS", "FROM requires either one or three arguments"),
        ("FROM a FOR b", "FROM requires either one or three arguments"),
        ("FROM a AS 1st", "invalid name for build stage: \"1st\""),
        ("FROM a AS b$c", "invalid name for build stage"),
        ("FROM --plat=x a", "unknown flag --plat for FROM"),
        ("FROM --platform a", "missing a value on flag: --platform"),
    ];
    for (line, want) in cases {
        let df = parse(&format!("{line}\n")).unwrap();
        let e = parse_instruction(&df.nodes[0]).unwrap_err();
        assert!(e.message.contains(want), "{line}: {}", e.message);
        assert_eq!(e.line, 1);
    }
}

#[test]
fn copy_and_add_flags_are_typed() {
    let c = copy("COPY --from=build --chown=app:app --chmod=0755 --link a b /dst/");
    assert_eq!(c.from.as_deref(), Some("build"));
    assert_eq!(c.chown.as_deref(), Some("app:app"));
    assert_eq!(c.chmod.as_deref(), Some("0755"));
    assert!(c.link && !c.is_add && !c.parents);
    assert_eq!((c.sources.clone(), c.dest.as_str()), (s(&["a", "b"]), "/dst/"));

    let c = copy("COPY --parents --exclude=*.md --exclude=.git ./src/./app /out/");
    assert!(c.parents);
    assert_eq!(c.excludes, s(&["*.md", ".git"]));

    let c = copy("COPY --chmod=u+x,g-w x /y");
    assert_eq!(c.chmod.as_deref(), Some("u+x,g-w"));

    let c = copy("ADD --checksum=sha256:abc --keep-git-dir=true --unpack=false https://x/y.tgz /");
    assert!(c.is_add && c.keep_git_dir);
    assert_eq!(c.checksum.as_deref(), Some("sha256:abc"));
    assert_eq!(c.unpack, Some(false));
    assert_eq!(copy("ADD --unpack a /").unpack, Some(true));
    assert_eq!(copy("ADD a /").unpack, None);
    assert!(!copy("COPY --link=false a b").link);
    assert!(copy("COPY --link=TRUE a b").link);
    assert_eq!(copy("COPY [\"a b\", \"/c d/\"]").sources, s(&["a b"]));
}

#[test]
fn copy_heredoc_sources_become_contents() {
    let df = parse("FROM x\nCOPY <<EOF <<-'TWO' plain /dest/\nhello $X\nEOF\n\tindented\n\tTWO\n").unwrap();
    let c = match parse_instruction(&df.nodes[1]).unwrap().instruction {
        Instruction::Copy(c) => c,
        o => panic!("{o:?}"),
    };
    assert_eq!(c.sources, s(&["plain"]));
    assert_eq!(
        c.contents,
        vec![
            SourceContent { path: "EOF".into(), data: "hello $X\n".into(), expand: true },
            SourceContent { path: "TWO".into(), data: "indented\n".into(), expand: false },
        ]
    );
    let df = parse("FROM x\nCOPY a <<EOF\nx\nEOF\n").unwrap();
    let e = parse_instruction(&df.nodes[1]).unwrap_err();
    assert_eq!(e.message, "COPY cannot accept a heredoc as a destination");
}

#[test]
fn flag_errors_name_the_flag_and_what_is_expected() {
    let cases: &[(&str, &str)] = &[
        ("COPY --frm=a b c", "unknown flag --frm for COPY (expected one of --exclude, --parents, --chown, --from, --chmod, --link)"),
        ("COPY --checksum=x a b", "unknown flag --checksum for COPY"),
        ("ADD --from=a b c", "unknown flag --from for ADD"),
        ("COPY --from a b", "missing a value on flag: --from"),
        ("COPY --chown a b", "missing a value on flag: --chown"),
        ("COPY --link= a b", "missing a value on flag: --link"),
        ("COPY --link=maybe a b", "expecting boolean value for flag --link, not: maybe"),
        ("COPY --from=a --from=b c d", "duplicate flag specified: --from"),
        ("RUN --mnt=type=cache echo", "unknown flag --mnt for RUN (expected one of --mount, --network, --security)"),
        ("RUN --network=bridge echo", "unsupported network mode \"bridge\""),
        ("RUN --security=weird echo", "unsupported security mode \"weird\""),
        ("WORKDIR --x=1 /a", "unknown flag --x for WORKDIR (WORKDIR takes no flags)"),
        ("ENV --x=1 A=b", "unknown flag --x for ENV"),
        ("LABEL --x=1 a=b", "unknown flag --x for LABEL"),
        ("USER --x=1 u", "unknown flag --x for USER"),
        ("EXPOSE --x=1 80", "unknown flag --x for EXPOSE"),
        ("VOLUME --x=1 /v", "unknown flag --x for VOLUME"),
        ("CMD --x=1 a", "unknown flag --x for CMD"),
        ("ENTRYPOINT --x=1 a", "unknown flag --x for ENTRYPOINT"),
        ("SHELL --x=1 [\"a\"]", "unknown flag --x for SHELL"),
        ("ARG --x=1 A", "unknown flag --x for ARG"),
        ("ONBUILD --x=1 RUN a", "unknown flag --x for ONBUILD"),
        ("STOPSIGNAL --x=1 9", "unknown flag --x for STOPSIGNAL"),
        ("HEALTHCHECK --x=1 CMD a", "unknown flag --x for HEALTHCHECK"),
        ("MAINTAINER --x=1 me", "unknown flag --x for MAINTAINER"),
    ];
    for (line, want) in cases {
        let e = err(line);
        assert!(e.starts_with(want), "{line}: got {e:?}, want prefix {want:?}");
    }
}

#[test]
fn argument_count_errors() {
    let cases: &[(&str, &str)] = &[
        ("COPY a", "COPY requires at least two arguments, but only one was provided. Destination could not be determined"),
        ("ADD a", "ADD requires at least two arguments"),
        ("COPY", "COPY requires at least two arguments"),
        ("WORKDIR", "WORKDIR requires exactly one argument"),
        ("USER", "USER requires exactly one argument"),
        ("STOPSIGNAL", "STOPSIGNAL requires exactly one argument"),
        ("MAINTAINER", "MAINTAINER requires exactly one argument"),
        ("EXPOSE", "EXPOSE requires at least one argument"),
        ("VOLUME", "VOLUME requires at least one argument"),
        ("VOLUME [\"\"]", "VOLUME specified can not be an empty string"),
        ("VOLUME [\"  \"]", "VOLUME specified can not be an empty string"),
        ("ARG", "ARG requires at least one argument"),
        ("ARG =x", "ARG names can not be blank"),
        ("ENV", "ENV requires at least one argument"),
        ("ENV =x", "ENV names can not be blank"),
        ("LABEL", "LABEL requires at least one argument"),
        ("ONBUILD", "ONBUILD requires at least one argument"),
        ("SHELL", "SHELL requires at least one argument"),
        ("SHELL []", "SHELL requires at least one argument"),
        ("SHELL /bin/bash -c", "SHELL requires the arguments to be in JSON form"),
        ("HEALTHCHECK", "HEALTHCHECK requires at least one argument"),
    ];
    for (line, want) in cases {
        let e = err(line);
        assert!(e.starts_with(want), "{line}: got {e:?}");
    }
}

#[test]
fn onbuild_rules() {
    assert!(err("ONBUILD ONBUILD RUN x").contains("chaining ONBUILD"));
    assert_eq!(err("ONBUILD FROM x"), "FROM isn't allowed as an ONBUILD trigger");
    assert_eq!(err("ONBUILD MAINTAINER me"), "MAINTAINER isn't allowed as an ONBUILD trigger");
    assert!(err("ONBUILD RUNN x").starts_with("unknown instruction \"RUNN\""));
    let df = parse("FROM x\nONBUILD RUN <<EOF\necho hi\nEOF\n").unwrap();
    match parse_instruction(&df.nodes[1]).unwrap().instruction {
        Instruction::Onbuild(e) => assert_eq!(e, "RUN <<EOF\necho hi\nEOF"),
        o => panic!("{o:?}"),
    }
}

#[test]
fn healthcheck_options() {
    let h =
        match ok("HEALTHCHECK --interval=30s --timeout=3s --start-period=1m --start-interval=2s --retries=3 CMD curl -f http://localhost/")
        {
            Instruction::Healthcheck(h) => h,
            o => panic!("{o:?}"),
        };
    assert_eq!(h.test, s(&["CMD-SHELL", "curl -f http://localhost/"]));
    assert_eq!(
        (h.interval, h.timeout, h.start_period, h.start_interval, h.retries),
        (30_000_000_000, 3_000_000_000, 60_000_000_000, 2_000_000_000, 3)
    );
    match ok("HEALTHCHECK CMD [\"/bin/check\", \"-q\"]") {
        Instruction::Healthcheck(h) => assert_eq!(h.test, s(&["CMD", "/bin/check", "-q"])),
        o => panic!("{o:?}"),
    }
    match ok("HEALTHCHECK none") {
        Instruction::Healthcheck(h) => assert_eq!(h.test, s(&["NONE"])),
        o => panic!("{o:?}"),
    }
    match ok("HEALTHCHECK --interval=0s CMD x") {
        Instruction::Healthcheck(h) => assert_eq!(h.interval, 0),
        o => panic!("{o:?}"),
    }
    let errors: &[(&str, &str)] = &[
        ("HEALTHCHECK NONE x", "HEALTHCHECK NONE takes no arguments"),
        ("HEALTHCHECK CMD", "missing command after HEALTHCHECK CMD"),
        ("HEALTHCHECK CONNECT x", "unknown type \"CONNECT\" in HEALTHCHECK"),
        ("HEALTHCHECK --interval=1us CMD x", "Interval \"interval\" cannot be less than 1ms"),
        ("HEALTHCHECK --timeout=abc CMD x", "--timeout: time: invalid duration \"abc\""),
        ("HEALTHCHECK --retries=-1 CMD x", "--retries cannot be negative (-1)"),
        ("HEALTHCHECK --retries=x CMD x", "--retries: invalid value \"x\""),
        ("HEALTHCHECK --interval CMD x", "missing a value on flag: --interval"),
    ];
    for (line, want) in errors {
        let e = err(line);
        assert!(e.starts_with(want), "{line}: {e}");
    }
}

#[test]
fn health_history_is_formatted_like_go() {
    let h = HealthSpec {
        test: s(&["CMD-SHELL", "curl -f http://localhost/ || exit 1"]),
        interval: 300_000_000_000,
        timeout: 3_000_000_000,
        start_period: 0,
        start_interval: 0,
        retries: 3,
    };
    assert_eq!(
        format_health_history(&h),
        r#"HEALTHCHECK &{["CMD-SHELL" "curl -f http://localhost/ || exit 1"] "5m0s" "3s" "0s" "0s" '\x03'}"#
    );
}

#[test]
fn run_flags_are_typed() {
    let r = run("RUN --network=none --security=insecure --mount=type=cache,target=/root/.cache --mount=type=secret,id=x make");
    assert_eq!((r.network, r.security), (Network::None, Security::Insecure));
    assert_eq!(r.mounts, s(&["type=cache,target=/root/.cache", "type=secret,id=x"]));
    assert_eq!(r.cmd.args, s(&["make"]));
    let r = run("RUN --network=host echo");
    assert_eq!(r.network, Network::Host);
    let r = run("RUN echo");
    assert_eq!((r.network, r.security), (Network::Default, Security::Sandbox));
    assert!(err("RUN --mount=from=$X,target=/a x").contains("'from' doesn't support variable expansion"));
    assert!(run("RUN --mount=from=a$,target=/a x").mounts.len() == 1);
    assert!(err("RUN --mount=type=bind,target=a\\\"b x").contains("failed to parse csv mounts"));
}

#[test]
fn run_heredocs_are_files() {
    let df = parse("FROM x\nRUN <<EOF\necho hi\nEOF\n").unwrap();
    let r = match parse_instruction(&df.nodes[1]).unwrap().instruction {
        Instruction::Run(r) => r,
        o => panic!("{o:?}"),
    };
    assert_eq!(r.cmd.args, s(&["<<EOF"]));
    assert_eq!(r.cmd.files.len(), 1);
    assert_eq!(r.cmd.files[0].content, "echo hi\n");
}

fn mount(v: &str) -> Result<Mount, MountError> {
    parse_mount(v, &mut |w: &str| Ok(w.replace("$T", "/t")))
}

#[test]
fn mounts_parse_every_type_and_option() {
    let m = mount("type=bind,from=build,source=/out,target=/in,rw").unwrap();
    assert_eq!(
        (m.kind, m.from.as_str(), m.source.as_str(), m.target.as_str(), m.read_only),
        (MountType::Bind, "build", "/out", "/in", false)
    );
    let m = mount("target=/x").unwrap();
    assert_eq!((m.kind, m.read_only), (MountType::Bind, true));
    let m = mount("type=cache,target=/root/.cache,id=pip,sharing=locked,mode=0700,uid=1000,gid=1000").unwrap();
    assert_eq!(
        (m.kind, m.id.as_str(), m.sharing, m.mode, m.uid, m.gid, m.read_only),
        (MountType::Cache, "pip", Some(Sharing::Locked), Some(0o700), Some(1000), Some(1000), false)
    );
    let m = mount("type=cache,dst=$T,ro").unwrap();
    assert_eq!((m.target.as_str(), m.read_only), ("/t", true));
    let m = mount("type=tmpfs,target=/tmp,size=64m").unwrap();
    assert_eq!((m.kind, m.size_limit, m.read_only), (MountType::Tmpfs, 64 << 20, false));
    let m = mount("type=secret,id=aws,target=/root/.aws/credentials,required,mode=0440").unwrap();
    assert_eq!((m.kind, m.id.as_str(), m.required, m.mode), (MountType::Secret, "aws", true, Some(0o440)));
    let m = mount("type=secret,id=tok,env=TOKEN").unwrap();
    assert_eq!(m.env.as_deref(), Some("TOKEN"));
    let m = mount("type=ssh,id=gh,required=true").unwrap();
    assert_eq!((m.kind, m.id.as_str(), m.required, m.read_only), (MountType::Ssh, "gh", true, true));
    let m = mount("type=CACHE,TARGET=/x,Sharing=PRIVATE").unwrap();
    assert_eq!((m.kind, m.sharing), (MountType::Cache, Some(Sharing::Private)));
    let m = mount("\"type=bind\",\"target=/a,b\"").unwrap();
    assert_eq!(m.target, "/a,b");
    let m = mount("type=bind,target=/x,readonly=false").unwrap();
    assert!(!m.read_only);
    let m = mount("type=bind,target=/x,readwrite=true").unwrap();
    assert!(!m.read_only);
}

#[test]
fn mount_errors() {
    let cases: &[(&str, &str)] = &[
        ("type=nfs,target=/x", "unsupported mount type \"nfs\""),
        ("type=bind,target=/x,foo=bar", "unexpected key 'foo' in 'foo=bar'"),
        ("type=bind,target=/x,mode=0700", "mode not allowed for \"bind\" type mounts"),
        ("type=tmpfs,target=/x,uid=1", "uid not allowed for \"tmpfs\" type mounts"),
        ("type=bind,target=/x,gid=1", "gid not allowed for \"bind\" type mounts"),
        ("type=bind,target=/x,required", "unexpected key 'required' for mount type 'bind'"),
        ("type=cache,target=/x,required=true", "unexpected key 'required' for mount type 'cache'"),
        ("type=cache,target=/x,size=1m", "unexpected key 'size' for mount type 'cache'"),
        ("type=tmpfs,target=/x,size=lots", "invalid value for size: lots"),
        ("type=cache,target=/x,mode=999", "invalid value 999 for mode"),
        ("type=cache,target=/x,uid=-1", "invalid value -1 for uid"),
        ("type=cache,target=/x,sharing=all", "unsupported sharing value \"all\""),
        ("type=bind,target=/x,sharing=shared", "invalid cache sharing set for bind mount"),
        ("type=secret,from=x,target=/x", "secret mount should not have a from"),
        ("type=secret", "invalid secret mount. one of source, target required"),
        ("type=secret,source=a,id=b", "both source and id can't be set"),
        ("type=secret,id=a,sharing=shared", "secret mount should not define sharing"),
        ("type=bind,target=/x,ro=maybe", "invalid value for ro: maybe"),
        ("type=bind,bogus", "invalid field 'bogus' must be a key=value pair"),
    ];
    for (v, want) in cases {
        let e = mount(v).unwrap_err().to_string();
        assert!(e.starts_with(want), "{v}: {e}");
    }
}

#[test]
fn csv_fields_follow_go() {
    assert_eq!(csv_fields("a,b,,c").unwrap(), s(&["a", "b", "", "c"]));
    assert_eq!(csv_fields("\"a,b\",c").unwrap(), s(&["a,b", "c"]));
    assert_eq!(csv_fields("\"a\"\"b\"").unwrap(), s(&["a\"b"]));
    assert!(csv_fields("a\"b").is_err());
    assert!(csv_fields("\"ab").is_err());
    assert_eq!(csv_fields("").unwrap(), s(&[""]));
}

#[test]
fn ram_sizes() {
    let cases: &[(&str, Option<u64>)] = &[
        ("1024", Some(1024)),
        ("64m", Some(64 << 20)),
        ("64MB", Some(64 << 20)),
        ("1g", Some(1 << 30)),
        ("1GiB", Some(1 << 30)),
        ("512k", Some(512 << 10)),
        ("1.5k", Some(1536)),
        ("x", None),
        ("1q", None),
        ("", None),
    ];
    for (v, want) in cases {
        assert_eq!(ram_in_bytes(v), *want, "{v}");
    }
}

#[test]
fn chmod_values() {
    let cases: &[(&str, Result<ChmodSpec, ()>)] = &[
        ("0755", Ok(ChmodSpec::Octal(0o755))),
        ("755", Ok(ChmodSpec::Octal(0o755))),
        ("7777", Ok(ChmodSpec::Octal(0o7777))),
        ("0", Ok(ChmodSpec::Octal(0))),
        ("10000", Err(())),
        ("0789", Err(())),
        ("u+x", Ok(ChmodSpec::Symbolic("u+x".into()))),
        ("u+rwx,g-w,o=", Ok(ChmodSpec::Symbolic("u+rwx,g-w,o=".into()))),
        ("a=rX", Ok(ChmodSpec::Symbolic("a=rX".into()))),
        ("+x", Ok(ChmodSpec::Symbolic("+x".into()))),
        ("u", Err(())),
        ("z+x", Err(())),
        ("u+x,", Err(())),
        ("", Err(())),
    ];
    for (v, want) in cases {
        assert_eq!(parse_chmod(v).map_err(|_| ()), *want, "{v}");
    }
    assert!(parse_chmod("10000").unwrap_err().to_string().contains("between 0 and 07777"));
}

#[test]
fn signals() {
    for ok_sig in ["SIGTERM", "TERM", "sigkill", "9", "SIGRTMIN+3", "RTMAX-2", "SIGRTMAX", "SIGWINCH", "-1"] {
        assert!(validate_signal(ok_sig).is_ok(), "{ok_sig}");
    }
    for bad in ["0", "SIGFOO", "RTMIN+16", "", "SIG"] {
        assert!(validate_signal(bad).is_err(), "{bad}");
    }
}

#[test]
fn port_specs() {
    let cases: &[(&str, Result<&[&str], &str>)] = &[
        ("80", Ok(&["80/tcp"])),
        ("80/tcp", Ok(&["80/tcp"])),
        ("53/udp", Ok(&["53/udp"])),
        ("53/UDP", Ok(&["53/udp"])),
        ("132/sctp", Ok(&["132/sctp"])),
        ("8000-8002", Ok(&["8000/tcp", "8001/tcp", "8002/tcp"])),
        ("80/", Ok(&["80/tcp"])),
        ("127.0.0.1:8080:80/tcp", Ok(&["80/tcp"])),
        ("80/icmp", Err("invalid proto: icmp")),
        ("http", Err("invalid containerPort: http")),
        ("70000", Err("invalid containerPort")),
        ("90-80", Err("invalid range")),
    ];
    for (v, want) in cases {
        match (parse_port_spec(v), want) {
            (Ok(got), Ok(w)) => assert_eq!(got, s(w), "{v}"),
            (Err(e), Err(w)) => assert!(e.to_string().starts_with(w), "{v}: {e}"),
            (got, w) => panic!("{v}: got {got:?}, want {w:?}"),
        }
    }
}

#[test]
fn unknown_instruction_is_named_with_a_suggestion() {
    assert_eq!(err("RUNN make"), "unknown instruction \"RUNN\" (did you mean RUN?)");
    assert_eq!(err("copyy a b"), "unknown instruction \"COPYY\" (did you mean COPY?)");
    assert_eq!(err("FOOBARBAZ x"), "unknown instruction \"FOOBARBAZ\"");
}

#[test]
fn stages_group_instructions() {
    let df = parse("ARG V=1\nARG W\nFROM a AS one\nRUN x\nFROM one\nCOPY --from=one a b\n").unwrap();
    let st = parse_stages(&df).unwrap();
    assert_eq!(st.meta_args.len(), 2);
    assert_eq!(st.stages.len(), 2);
    assert_eq!(st.stages[0].from.name.as_deref(), Some("one"));
    assert_eq!(st.stages[0].commands.len(), 1);
    assert_eq!(st.stages[1].line, 5);
    assert_eq!(st.stages[1].commands[0].start_line, 6);
}

#[test]
fn instructions_before_from_are_errors() {
    let df = parse("RUN x\nFROM a\n").unwrap();
    let e = parse_stages(&df).unwrap_err();
    assert_eq!(e.line, 1);
    assert!(e.message.starts_with("no build stage in current context"), "{}", e.message);
    let df = parse("ARG X\nENV A=b\nFROM a\n").unwrap();
    assert_eq!(parse_stages(&df).unwrap_err().line, 2);
}

#[test]
fn error_lines_point_at_the_instruction() {
    let df = parse("FROM a\nRUN ok\n\n\nRUNN bad\n").unwrap();
    let e = parse_stages(&df).unwrap_err();
    assert_eq!(e.line, 5);
    assert_eq!(e.to_string(), "line 5: unknown instruction \"RUNN\" (did you mean RUN?)");
}

#[test]
fn instruction_code_is_the_trimmed_logical_line() {
    let df = parse("FROM a\n  RUN echo \\\n   hi   \n").unwrap();
    let i = parse_instruction(&df.nodes[1]).unwrap();
    assert_eq!(i.code, "RUN echo    hi");
    assert_eq!((i.start_line, i.end_line), (2, 3));
}
