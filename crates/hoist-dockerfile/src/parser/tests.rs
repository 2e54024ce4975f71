use super::*;

fn p(s: &str) -> Dockerfile {
    parse(s).unwrap_or_else(|e| panic!("parse failed for {s:?}: {e}"))
}

fn one(s: &str) -> Node {
    let df = p(s);
    df.nodes.last().cloned().expect("a node")
}

fn args(s: &str) -> Vec<String> {
    one(s).args
}

fn v(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
#[allow(clippy::type_complexity)]
fn directives_are_recognised_only_at_the_top() {
    // (text, expected (name, value) pairs, expected escape)
    let cases: &[(&str, &[(&str, &str)], char)] = &[
        ("# syntax=docker/dockerfile:1\nFROM a\n", &[("syntax", "docker/dockerfile:1")], '\\'),
        ("# escape=`\nFROM a\n", &[("escape", "`")], '`'),
        ("#escape=\\\nFROM a\n", &[("escape", "\\")], '\\'),
        ("# ESCAPE = `\nFROM a\n", &[("escape", "`")], '`'),
        ("#  escape   =   `  \nFROM a\n", &[("escape", "`")], '`'),
        ("# check=skip=JSONArgsRecommended\nFROM a\n", &[("check", "skip=JSONArgsRecommended")], '\\'),
        ("# syntax=x\n# escape=`\n# check=error=true\nFROM a\n", &[("syntax", "x"), ("escape", "`"), ("check", "error=true")], '`'),
        ("FROM a\n# escape=`\n", &[], '\\'),
        ("# comment\n# escape=`\nFROM a\n", &[], '\\'),
        ("\n# escape=`\nFROM a\n", &[], '\\'),
        ("# unknowndirective=x\n# escape=`\nFROM a\n", &[], '\\'),
        ("# escape=`\n\n# syntax=x\nFROM a\n", &[("escape", "`")], '`'),
        ("\u{feff}# escape=`\nFROM a\n", &[("escape", "`")], '`'),
        ("  # escape=`\nFROM a\n", &[("escape", "`")], '`'),
        ("# escape =\nFROM a\n", &[], '\\'),
    ];
    for (text, want, esc) in cases {
        let df = p(text);
        let got: Vec<(String, String)> = df.directives.iter().map(|d| (d.name.clone(), d.value.clone())).collect();
        let want: Vec<(String, String)> = want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert_eq!(got, want, "directives of {text:?}");
        assert_eq!(df.escape, *esc, "escape of {text:?}");
    }
}

#[test]
fn directive_errors_name_the_line() {
    let e = parse("# escape=`\n# escape=\\\nFROM a\n").unwrap_err();
    assert_eq!((e.line, e.message.as_str()), (2, "only one escape parser directive can be used"));
    let e = parse("# escape=x\nFROM a\n").unwrap_err();
    assert_eq!(e.line, 1);
    assert!(e.message.contains("invalid escape token 'x'"), "{}", e.message);
    let e = parse("# syntax=a\n# syntax=b\nFROM a").unwrap_err();
    assert_eq!(e.line, 2);
}

#[test]
fn directive_lookup_by_name() {
    let df = p("# syntax=docker/dockerfile:1.7\nFROM a\n");
    assert_eq!(df.directive("syntax"), Some("docker/dockerfile:1.7"));
    assert_eq!(df.directive("check"), None);
}

#[test]
fn continuations_join_lines() {
    // (text, expected original of the last node, expected start, end)
    let cases: &[(&str, &str, usize, usize)] = &[
        ("FROM a\nRUN echo \\\n  hello\n", "RUN echo   hello", 2, 3),
        ("FROM a\nRUN a \\\n# comment\n  b\n", "RUN a   b", 2, 4),
        ("FROM a\nRUN a \\\n   # indented comment\n  b\n", "RUN a   b", 2, 4),
        ("FROM a\nRUN a \\\n\n  b\n", "RUN a   b", 2, 4),
        ("FROM a\nRUN a \\  \t\n  b\n", "RUN a   b", 2, 3),
        ("FROM a\nRUN a\\\\\n", "RUN a\\\\", 2, 2),
        ("FROM a\nRUN a \\\n\\\nb\n", "RUN a b", 2, 4),
        ("# escape=`\nFROM a\nRUN a `\n  b\n", "RUN a   b", 3, 4),
        ("# escape=`\nFROM a\nRUN dir c:\\ \n", "RUN dir c:\\ ", 3, 3),
        ("FROM a\nRUN a \\\n", "RUN a ", 2, 2),
        ("FROM a\r\nRUN a \\\r\n b\r\n", "RUN a  b", 2, 3),
        ("FROM a\nRUN a \\\nb \\\nc\n", "RUN a b c", 2, 4),
    ];
    for (text, want, s, e) in cases {
        let n = one(text);
        assert_eq!(n.original, *want, "original of {text:?}");
        assert_eq!((n.start_line, n.end_line), (*s, *e), "lines of {text:?}");
    }
}

#[test]
fn empty_continuation_lines_warn() {
    let df = p("FROM a\nRUN a \\\n\n  b\n");
    assert_eq!(df.warnings.len(), 1);
    assert!(df.warnings[0].message.contains("empty continuation line"));
    assert!(p("FROM a\nRUN a \\\n  b\n").warnings.is_empty());
}

#[test]
fn comments_and_blank_lines_are_skipped_and_kept_as_doc() {
    let df = p("# stage doc\nFROM a AS b\n\n   \n# run doc\n# more\nRUN x\n");
    assert_eq!(df.nodes.len(), 2);
    assert_eq!(df.nodes[0].comments, v(&["stage doc"]));
    assert_eq!(df.nodes[1].comments, v(&["run doc", "more"]));
    assert_eq!(df.nodes[1].start_line, 7);
}

#[test]
fn instruction_keywords_keep_their_case() {
    let df = p("from a\nRun x\nCOPY a b\n");
    let kw: Vec<String> = df.nodes.iter().map(|n| n.keyword()).collect();
    assert_eq!(kw, v(&["from", "run", "copy"]));
    assert_eq!(df.nodes[1].cmd, "Run");
}

#[test]
fn shell_and_exec_forms() {
    // (line, expected args, json)
    let cases: &[(&str, &[&str], bool)] = &[
        ("RUN echo hi", &["echo hi"], false),
        ("RUN [\"echo\", \"hi\"]", &["echo", "hi"], true),
        ("RUN   [ \"a\" ]  ", &["a"], true),
        ("RUN [\"a\" \"b\"]", &["[\"a\" \"b\"]"], false),
        ("RUN [echo]", &["[echo]"], false),
        ("RUN []", &[], true),
        ("CMD [\"/bin/sh\",\"-c\",\"x\"]", &["/bin/sh", "-c", "x"], true),
        ("CMD echo \"$HOME\"", &["echo \"$HOME\""], false),
        ("ENTRYPOINT [\"a\\u0041\"]", &["aA"], true),
        ("ENTRYPOINT [\"a\"] trailing", &["[\"a\"] trailing"], false),
        ("SHELL [\"/bin/bash\", \"-c\"]", &["/bin/bash", "-c"], true),
        ("SHELL bash -c", &["bash -c"], false),
        ("COPY a b c", &["a", "b", "c"], false),
        ("COPY [\"a b\", \"c\"]", &["a b", "c"], true),
        ("ADD  a\t b", &["a", "b"], false),
        ("VOLUME /a /b", &["/a", "/b"], false),
        ("VOLUME [\"/a\", \"/b c\"]", &["/a", "/b c"], true),
        ("EXPOSE 80   443/udp", &["80", "443/udp"], false),
        ("FROM alpine AS build", &["alpine", "AS", "build"], false),
        ("WORKDIR /a b", &["/a b"], false),
        ("USER a:b", &["a:b"], false),
        ("STOPSIGNAL SIGKILL", &["SIGKILL"], false),
        ("MAINTAINER Jane <j@x>", &["Jane <j@x>"], false),
        ("ARG a b=c \"d=e f\"", &["a", "b=c", "\"d=e f\""], false),
        ("RUN", &[], false),
    ];
    for (line, want, json) in cases {
        let n = one(&format!("FROM x\n{line}\n"));
        assert_eq!(n.args, v(want), "args of {line:?}");
        assert_eq!(n.json, *json, "json of {line:?}");
    }
}

#[test]
fn json_with_non_string_items_is_an_error() {
    for line in ["RUN [\"a\", 1]", "CMD [null]", "COPY [\"a\", true]", "ENTRYPOINT [[\"a\"]]"] {
        let e = parse(&format!("FROM x\n{line}\n")).unwrap_err();
        assert_eq!(e.line, 2, "{line}");
        assert!(e.message.contains("arrays must be comprised of strings only"), "{line}: {}", e.message);
    }
}

#[test]
fn env_and_label_forms() {
    // (line, expected key/value/sep triples)
    let cases: &[(&str, &[&str])] = &[
        ("ENV A=1", &["A", "1", "="]),
        ("ENV A=1 B=2", &["A", "1", "=", "B", "2", "="]),
        ("ENV A \"hello world\"", &["A", "\"hello world\"", ""]),
        ("ENV A  b c  d", &["A", "b c  d", ""]),
        ("ENV A=\"a b\" C='d e'", &["A", "\"a b\"", "=", "C", "'d e'", "="]),
        ("ENV A=a\\ b", &["A", "a\\ b", "="]),
        ("ENV A=", &["A", "", "="]),
        ("ENV A=b=c", &["A", "b=c", "="]),
        ("LABEL a=b c=\"d e\"", &["a", "b", "=", "c", "\"d e\"", "="]),
        ("LABEL \"com.x\"=y", &["\"com.x\"", "y", "="]),
        ("LABEL version 1.0", &["version", "1.0", ""]),
    ];
    for (line, want) in cases {
        assert_eq!(args(&format!("FROM x\n{line}\n")), v(want), "{line}");
    }
}

#[test]
fn env_errors() {
    let e = parse("FROM x\nENV A\n").unwrap_err();
    assert_eq!((e.line, e.message.as_str()), (2, "ENV must have two arguments"));
    let e = parse("FROM x\nENV A=1 B\n").unwrap_err();
    assert!(e.message.contains("can't find = in \"B\""), "{}", e.message);
    let e = parse("FROM x\nLABEL a\n").unwrap_err();
    assert!(e.message.contains("LABEL must have two arguments"));
}

#[test]
fn parse_words_keeps_quotes_and_escapes() {
    let cases: &[(&str, &[&str])] = &[
        ("a b", &["a", "b"]),
        ("a\\ b", &["a\\ b"]),
        ("\"a b\" c", &["\"a b\"", "c"]),
        ("'a \\' b'", &["'a \\'", "b'"]),
        ("\"a \\\" b\"", &["\"a \\\" b\""]),
        ("\"\"", &["\"\""]),
        ("a\\", &["a"]),
        ("   ", &[]),
    ];
    for (input, want) in cases {
        assert_eq!(parse_words(input, '\\'), v(want), "parse_words({input:?})");
    }
    assert_eq!(parse_words("a` b", '`'), v(&["a` b"]));
}

#[test]
fn builder_flags_are_split_off() {
    // (rest, expected remaining text, expected flags)
    let cases: &[(&str, &str, &[&str])] = &[
        ("--from=a b c", "b c", &["--from=a"]),
        ("--from=a --chown=1:2 b c", "b c", &["--from=a", "--chown=1:2"]),
        ("--link a b", "a b", &["--link"]),
        ("--chown=\"a b\" x y", "x y", &["--chown=a b"]),
        ("--chown='a b' x", "x", &["--chown=a b"]),
        ("--a=\\\"b x", "x", &["--a=\"b"]),
        ("-- --notaflag x", " --notaflag x", &[]),
        ("--from=a -- --x y", " --x y", &["--from=a"]),
        ("-x y", "-x y", &[]),
        ("a --b", "a --b", &[]),
        ("--mount=type=cache,target=/x make", "make", &["--mount=type=cache,target=/x"]),
        ("--flag", "", &["--flag"]),
        ("", "", &[]),
        ("--x=\"\" y", "y", &["--x="]),
    ];
    for (rest, want_rest, want_flags) in cases {
        let (r, f) = extract_builder_flags(rest);
        assert_eq!((r.as_str(), f), (*want_rest, v(want_flags)), "extract_builder_flags({rest:?})");
    }
}

#[test]
fn flags_are_attached_to_nodes() {
    let n = one("FROM x\nCOPY --from=build --chown=1:1 /a /b\n");
    assert_eq!(n.flags, v(&["--from=build", "--chown=1:1"]));
    assert_eq!(n.args, v(&["/a", "/b"]));
    let n = one("FROM --platform=$BUILDPLATFORM golang AS b\n");
    assert_eq!(n.flags, v(&["--platform=$BUILDPLATFORM"]));
    assert_eq!(n.args, v(&["golang", "AS", "b"]));
}

#[test]
fn healthcheck_forms() {
    let cases: &[(&str, &[&str], bool)] = &[
        ("HEALTHCHECK NONE", &["NONE"], false),
        ("HEALTHCHECK CMD curl -f http://x/", &["CMD", "curl -f http://x/"], false),
        ("HEALTHCHECK CMD [\"curl\", \"-f\"]", &["CMD", "curl", "-f"], true),
        ("HEALTHCHECK --interval=5s CMD true", &["CMD", "true"], false),
        ("HEALTHCHECK CMD", &["CMD"], false),
    ];
    for (line, want, json) in cases {
        let n = one(&format!("FROM x\n{line}\n"));
        assert_eq!((n.args.clone(), n.json), (v(want), *json), "{line}");
    }
}

#[test]
fn onbuild_has_a_sub_instruction() {
    let n = one("FROM x\nONBUILD RUN echo hi\n");
    assert_eq!(n.args, v(&["RUN", "echo hi"]));
    let sub = n.sub.as_ref().unwrap();
    assert_eq!(sub.keyword(), "run");
    assert_eq!(sub.args, v(&["echo hi"]));
    let n = one("FROM x\nONBUILD COPY --from=a x y\n");
    assert_eq!(n.sub.as_ref().unwrap().flags, v(&["--from=a"]));
    assert_eq!(one("FROM x\nONBUILD\n").args, Vec::<String>::new());
}

#[test]
fn heredocs_basic_forms() {
    // (text, expected (name, expand, chomp, content) per heredoc)
    type Doc<'a> = (&'a str, bool, bool, &'a str);
    let cases: &[(&str, &[Doc])] = &[
        ("FROM x\nRUN <<EOF\necho hi\nEOF\n", &[("EOF", true, false, "echo hi\n")]),
        ("FROM x\nRUN <<'EOF'\necho $HOME\nEOF\n", &[("EOF", false, false, "echo $HOME\n")]),
        ("FROM x\nRUN <<\"EOF\"\nx\nEOF\n", &[("EOF", false, false, "x\n")]),
        ("FROM x\nRUN <<E\"O\"F\nx\nEOF\n", &[("EOF", false, false, "x\n")]),
        ("FROM x\nRUN <<-EOF\n\techo hi\n\tEOF\n", &[("EOF", true, true, "\techo hi\n")]),
        ("FROM x\nRUN python3 <<EOF\nprint(1)\nEOF\n", &[("EOF", true, false, "print(1)\n")]),
        ("FROM x\nRUN cat <<EOF > /f\nhello\nEOF\n", &[("EOF", true, false, "hello\n")]),
        ("FROM x\nRUN cat > /f <<'EOT'\nhello $X\nEOT\n", &[("EOT", false, false, "hello $X\n")]),
        ("FROM x\nRUN <<A <<B\na\nA\nb\nB\n", &[("A", true, false, "a\n"), ("B", true, false, "b\n")]),
        ("FROM x\nRUN 3<<EOF cat /dev/fd/3\nx\nEOF\n", &[("EOF", true, false, "x\n")]),
        ("FROM x\nRUN <<EOF\nEOF\n", &[("EOF", true, false, "")]),
        ("FROM x\nRUN <<EOF\n\n\nEOF\n", &[("EOF", true, false, "\n\n")]),
        ("FROM x\nCOPY <<EOF /dest\ncontent\nEOF\n", &[("EOF", true, false, "content\n")]),
        ("FROM x\nCOPY <<a.txt <<b.txt /dest/\nA\na.txt\nB\nb.txt\n", &[("a.txt", true, false, "A\n"), ("b.txt", true, false, "B\n")]),
        ("FROM x\nADD <<EOF /x\ny\nEOF\n", &[("EOF", true, false, "y\n")]),
        ("FROM x\nRUN <<EOF\r\nline\r\nEOF\r\n", &[("EOF", true, false, "line\r\n")]),
        ("FROM x\nRUN <<EOF\n  EOF\nEOF\n", &[("EOF", true, false, "  EOF\n")]),
        ("FROM x\nONBUILD RUN <<EOF\necho\nEOF\n", &[("EOF", true, false, "echo\n")]),
    ];
    for (text, want) in cases {
        let n = one(text);
        let got: Vec<(String, bool, bool, String)> =
            n.heredocs.iter().map(|h| (h.name.clone(), h.expand, h.chomp, h.content.clone())).collect();
        let want: Vec<(String, bool, bool, String)> = want.iter().map(|(a, b, c, d)| (a.to_string(), *b, *c, d.to_string())).collect();
        assert_eq!(got, want, "heredocs of {text:?}");
    }
}

#[test]
fn heredocs_are_not_parsed_where_buildkit_does_not() {
    for text in [
        "FROM x\nRUN [\"cat\", \"<<EOF\"]\n",
        "FROM x\nCMD cat <<EOF\n",
        "FROM x\nRUN echo '<<EOF'\n",
        "FROM x\nRUN echo \"<<EOF\"\n",
        "FROM x\nRUN echo <<\n",
        "FROM x\nENTRYPOINT <<EOF\n",
        "FROM x\nRUN echo a<<b\n",
    ] {
        let df = p(text);
        assert!(df.nodes.last().unwrap().heredocs.is_empty(), "{text:?}");
    }
}

#[test]
fn heredoc_line_numbers_cover_the_body() {
    let df = p("FROM x\nRUN <<EOF\na\nb\nEOF\nRUN next\n");
    assert_eq!((df.nodes[1].start_line, df.nodes[1].end_line), (2, 5));
    assert_eq!((df.nodes[2].start_line, df.nodes[2].end_line), (6, 6));
}

#[test]
fn unterminated_heredoc_is_an_error_at_the_instruction() {
    let e = parse("FROM x\nRUN <<EOF\necho\n").unwrap_err();
    assert_eq!(e.line, 2);
    assert!(e.message.starts_with("unterminated heredoc"), "{}", e.message);
    let e = parse("FROM x\nRUN <<-EOF\n\techo\n  EOF\n").unwrap_err();
    assert_eq!(e.line, 2);
}

#[test]
fn heredoc_word_recognition() {
    // (word, Some((name, expand, chomp, fd)) or None)
    type W<'a> = Option<(&'a str, bool, bool, u32)>;
    let cases: &[(&str, W)] = &[
        ("<<EOF", Some(("EOF", true, false, 0))),
        ("<<-EOF", Some(("EOF", true, true, 0))),
        ("<<'EOF'", Some(("EOF", false, false, 0))),
        ("<<\"EOF\"", Some(("EOF", false, false, 0))),
        ("2<<EOF", Some(("EOF", true, false, 2))),
        ("<<", None),
        ("<<-", None),
        ("<EOF", None),
        ("x<<EOF", None),
        ("<<<EOF", None),
        ("<<E<F", None),
        ("<<'a b'", Some(("a b", false, false, 0))),
        ("<<a\\ b", Some(("a b", true, false, 0))),
    ];
    for (word, want) in cases {
        let got = parse_heredoc(word).ok().flatten().map(|h| (h.name, h.expand, h.chomp, h.fd));
        let want = want.map(|(a, b, c, d)| (a.to_string(), b, c, d));
        assert_eq!(got, want, "parse_heredoc({word:?})");
    }
}

#[test]
fn chomp_strips_leading_tabs_of_every_line() {
    assert_eq!(chomp_heredoc_content("\t\ta\n\tb\n c\n"), "a\nb\n c\n");
    let h = Heredoc { name: "E".into(), fd: 0, expand: true, chomp: true, content: "\tx\n".into() };
    assert_eq!(h.chomped_content(), "x\n");
}

#[test]
fn empty_input_has_no_instructions() {
    for text in ["", "\n\n", "# just a comment\n", "# syntax=x\n", "  \n\t\n"] {
        let e = parse(text).unwrap_err();
        assert_eq!(e.message, "file with no instructions", "{text:?}");
    }
}

#[test]
fn unknown_instructions_parse_as_nodes_without_args() {
    let n = one("FROM x\nRUNN make\n");
    assert_eq!(n.cmd, "RUNN");
    assert!(n.args.is_empty());
}

#[test]
fn every_node_records_its_lines() {
    let df = p("FROM a\n\nRUN x \\\n  y\n\n# c\nCOPY a b\n");
    let lines: Vec<(usize, usize)> = df.nodes.iter().map(|n| (n.start_line, n.end_line)).collect();
    assert_eq!(lines, vec![(1, 1), (3, 4), (7, 7)]);
}

/// BuildKit's parser test corpus entry "health": comments between continuation lines and
/// several HEALTHCHECK forms.
#[test]
fn buildkit_testfile_health() {
    let text = "FROM debian\nADD check.sh main.sh /app/\nCMD /app/main.sh\nHEALTHCHECK\nHEALTHCHECK --interval=5s --timeout=3s --retries=3 \\\n  CMD /app/check.sh --quiet\nHEALTHCHECK CMD\nHEALTHCHECK   CMD   a b\nHEALTHCHECK --timeout=3s CMD [\"foo\"]\nHEALTHCHECK CONNECT TCP 7000\n";
    let df = p(text);
    let dump: Vec<String> = df.nodes.iter().map(|n| format!("{} {:?} {:?}", n.keyword(), n.flags, n.args)).collect();
    assert_eq!(
        dump,
        vec![
            "from [] [\"debian\"]",
            "add [] [\"check.sh\", \"main.sh\", \"/app/\"]",
            "cmd [] [\"/app/main.sh\"]",
            "healthcheck [] []",
            "healthcheck [\"--interval=5s\", \"--timeout=3s\", \"--retries=3\"] [\"CMD\", \"/app/check.sh --quiet\"]",
            "healthcheck [] [\"CMD\"]",
            "healthcheck [] [\"CMD\", \"a b\"]",
            "healthcheck [\"--timeout=3s\"] [\"CMD\", \"foo\"]",
            "healthcheck [] [\"CONNECT\", \"TCP 7000\"]",
        ]
    );
}

mod props {
    use super::*;
    use crate::print::print;
    use proptest::prelude::*;

    #[allow(clippy::type_complexity)]
    fn strip(df: &Dockerfile) -> Vec<(String, Vec<String>, Vec<String>, bool, Vec<(String, String)>)> {
        df.nodes
            .iter()
            .map(|n| {
                (
                    n.cmd.clone(),
                    n.flags.clone(),
                    n.args.clone(),
                    n.json,
                    n.heredocs.iter().map(|h| (h.name.clone(), h.content.clone())).collect(),
                )
            })
            .collect()
    }

    fn line_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("FROM alpine AS b".to_string()),
            Just("RUN echo hi \\".to_string()),
            Just("  && echo there".to_string()),
            Just("# a comment".to_string()),
            Just("".to_string()),
            Just("RUN <<EOF".to_string()),
            Just("EOF".to_string()),
            Just("COPY --from=b --chown=1:1 a b /c/".to_string()),
            Just("ENV A=1 B=\"x y\"".to_string()),
            Just("ENV K v w".to_string()),
            Just("CMD [\"a\", \"b\"]".to_string()),
            Just("ARG X=1 Y".to_string()),
            Just("HEALTHCHECK --interval=1s CMD true".to_string()),
            Just("ONBUILD RUN <<X".to_string()),
            Just("X".to_string()),
            Just("\\".to_string()),
            Just("# escape=`".to_string()),
            Just("RUN a `".to_string()),
            "[ -~]{0,30}".prop_map(|s| s),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// parse → print → parse gives the same instructions, and printing is idempotent.
        #[test]
        fn parse_print_parse_is_stable(lines in proptest::collection::vec(line_strategy(), 1..20)) {
            let text = lines.join("\n") + "\n";
            if let Ok(df) = parse(&text) {
                let printed = print(&df);
                let again = parse(&printed).expect("printed text parses");
                prop_assert_eq!(strip(&df), strip(&again));
                prop_assert_eq!(df.escape, again.escape);
                prop_assert_eq!(print(&again), printed);
            }
        }

        /// Arbitrary input never panics.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }
    }
}

/// Found by fuzzing: a byte-order mark that starts a later line is part of the instruction
/// and must survive printing (the parser only drops a BOM at the very start of the file).
#[test]
fn bom_inside_the_file_survives_printing() {
    let df = p("\n\u{feff}FROM a\n");
    assert_eq!(df.nodes[0].cmd, "\u{feff}FROM");
    let again = p(&crate::print::print(&df));
    assert_eq!(again.nodes[0].cmd, "\u{feff}FROM");
}

/// Found by fuzzing: a continuation cut by the end of the file can leave a logical line that
/// still ends in an escape (`RUN a\ \` gives `RUN a\ `); printing must keep that escape.
#[test]
fn trailing_escape_at_end_of_file_survives_printing() {
    let df = p("FROM x\nRUN a\\ \\");
    assert_eq!(df.nodes[1].args, vec!["a\\".to_string()]);
    let printed = crate::print::print(&df);
    let again = p(&printed);
    assert_eq!(again.nodes[1].args, vec!["a\\".to_string()]);
    assert_eq!(crate::print::print(&again), printed);
}

/// Found by fuzzing: the same with a carriage return before the final escape.
#[test]
fn trailing_escape_and_carriage_return_at_end_of_file_survive_printing() {
    for text in ["FROM x\nRUN e\\\r\\", "FROM x\nRUN e\\ \r \\", "FROM x\nRUN \\ \\"] {
        let df = p(text);
        let printed = crate::print::print(&df);
        let again = p(&printed);
        assert_eq!(again.nodes[1].args, df.nodes[1].args, "{text:?}");
        assert_eq!(crate::print::print(&again), printed, "{text:?}");
    }
}
