use super::*;

/// moby/patternmatcher's TestMatches table (one pattern, one path).
const PATTERN_CASES: &[(&str, &str, bool)] = &[
    ("**", "file", true),
    ("**", "file/", true),
    ("**/", "file", true),
    ("**/", "file/", true),
    ("**", "/", true),
    ("**/", "/", true),
    ("**", "dir/file", true),
    ("**/", "dir/file", true),
    ("**", "dir/file/", true),
    ("**/", "dir/file/", true),
    ("**/**", "dir/file", true),
    ("**/**", "dir/file/", true),
    ("dir/**", "dir/file", true),
    ("dir/**", "dir/file/", true),
    ("dir/**", "dir/dir2/file", true),
    ("dir/**", "dir/dir2/file/", true),
    ("**/dir", "dir", true),
    ("**/dir", "dir/file", true),
    ("**/dir2/*", "dir/dir2/file", true),
    ("**/dir2/*", "dir/dir2/file/", true),
    ("**/dir2/**", "dir/dir2/dir3/file", true),
    ("**/dir2/**", "dir/dir2/dir3/file/", true),
    ("**file", "file", true),
    ("**file", "dir/file", true),
    ("**/file", "dir/file", true),
    ("**file", "dir/dir/file", true),
    ("**/file", "dir/dir/file", true),
    ("**/file*", "dir/dir/file", true),
    ("**/file*", "dir/dir/file.txt", true),
    ("**/file*txt", "dir/dir/file.txt", true),
    ("**/file*.txt", "dir/dir/file.txt", true),
    ("**/file*.txt*", "dir/dir/file.txt", true),
    ("**/**/*.txt", "dir/dir/file.txt", true),
    ("**/**/*.txt2", "dir/dir/file.txt", false),
    ("**/*.txt", "file.txt", true),
    ("**/**/*.txt", "file.txt", true),
    ("a**/*.txt", "a/file.txt", true),
    ("a**/*.txt", "a/dir/file.txt", true),
    ("a**/*.txt", "a/dir/dir/file.txt", true),
    ("a/*.txt", "a/dir/file.txt", false),
    ("a/*.txt", "a/file.txt", true),
    ("a/*.txt**", "a/file.txt", true),
    ("a[b-d]e", "ae", false),
    ("a[b-d]e", "ace", true),
    ("a[b-d]e", "aae", false),
    ("a[^b-d]e", "aze", true),
    (".*", ".foo", true),
    (".*", "foo", false),
    ("abc.def", "abcdef", false),
    ("abc.def", "abc.def", true),
    ("abc.def", "abcZdef", false),
    ("abc?def", "abcZdef", true),
    ("abc?def", "abcdef", false),
    ("a\\\\", "a\\", true),
    ("**/foo/bar", "foo/bar", true),
    ("**/foo/bar", "dir/foo/bar", true),
    ("**/foo/bar", "dir/dir2/foo/bar", true),
    ("abc/**", "abc", false),
    ("abc/**", "abc/def", true),
    ("abc/**", "abc/def/ghi", true),
    ("**/.foo", ".foo", true),
    ("**/.foo", "bar.foo", false),
    ("a(b)c/def", "a(b)c/def", true),
    ("a(b)c/def", "a(b)c/xyz", false),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
    ("dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", true),
    ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", true),
    // our own: `*` and `?` never cross `/`, parents match, cleaning
    ("*", "a/b", true),
    ("a/*", "a/b/c", true),
    ("*/b", "a/b", true),
    ("*/b", "x/a/b", false),
    ("?", "a", true),
    ("?", "ab", false),
    ("a?c", "a/c", false),
    ("./a", "a", true),
    ("/a", "a", false),
    ("a/", "a/x", true),
    ("a/../b", "b", true),
    ("node_modules", "node_modules/x/y", true),
    ("node_modules", "src/node_modules", false),
    ("**/node_modules", "src/node_modules/x", true),
    ("*.log", "logs/a.log", false),
    ("**/*.log", "logs/a.log", true),
    ("[a-c]*", "b1", true),
    ("[a-c]*", "d1", false),
    ("\\*", "*", true),
    ("\\*", "a", false),
];

#[test]
fn pattern_table_from_moby() {
    for (pattern, path, want) in PATTERN_CASES {
        let m = IgnoreMatcher::new(&[pattern]).unwrap_or_else(|e| panic!("{pattern}: {e}"));
        assert_eq!(m.matches(path), *want, "pattern {pattern:?} against {path:?}");
    }
}

/// Several patterns: the last one that matches decides; `!` re-includes.
#[test]
fn exceptions_last_match_wins() {
    let cases: &[(&[&str], &str, bool)] = &[
        (&["*.md", "!README.md"], "README.md", false),
        (&["*.md", "!README.md"], "CHANGES.md", true),
        (&["!README.md", "*.md"], "README.md", true),
        (&["docs", "!docs/keep.md"], "docs/keep.md", false),
        (&["docs", "!docs/keep.md"], "docs/other.md", true),
        (&["docs", "!docs/keep"], "docs/keep/deep/file", false),
        (&["*", "!src", "src/*.tmp"], "src/a.tmp", true),
        (&["*", "!src", "src/*.tmp"], "src/a.rs", false),
        (&["*", "!src"], "other", true),
        (&["**/*.go", "!vendor/**"], "vendor/x/y.go", false),
        (&["**/*.go", "!vendor/**"], "cmd/x.go", true),
        (&["a", "!a/b", "a/b/c"], "a/b/c/d", true),
        (&["a", "!a/b", "a/b/c"], "a/b/x", false),
        (&[".git", "!.gitignore"], ".gitignore", false),
        (&[".git", "!.gitignore"], ".git/config", true),
        (&["#notcomment"], "#notcomment", true),
    ];
    for (patterns, path, want) in cases {
        let m = IgnoreMatcher::new(patterns).unwrap();
        assert_eq!(m.matches(path), *want, "{patterns:?} against {path:?}");
    }
}

#[test]
fn context_root_is_never_ignored() {
    let m = IgnoreMatcher::new(&["*", "**"]).unwrap();
    assert!(!m.matches("."));
    assert!(!m.matches(""));
    assert!(!m.matches("./"));
    assert!(m.matches("x"));
}

#[test]
fn ignore_file_text_is_read_like_moby() {
    let text = "\u{feff}# comment\n  # not a comment (leading space)\n\nnode_modules\n/abs/path\n./rel\n  spaced  \n!keep\n! spaced-keep\n!/abs-keep\ndir/../other\n\\#hash\n#\n";
    assert_eq!(
        IgnoreMatcher::parse(text),
        vec![
            "# not a comment (leading space)",
            "node_modules",
            "abs/path",
            "rel",
            "spaced",
            "!keep",
            "!spaced-keep",
            "!abs-keep",
            "other",
            "\\#hash",
        ]
    );
    assert_eq!(IgnoreMatcher::parse("!\n"), vec!["!"]);
    assert_eq!(IgnoreMatcher::parse("/\n"), vec!["/"]);
    assert_eq!(IgnoreMatcher::parse("a\r\nb\r\n"), vec!["a", "b"]);
}

#[test]
fn leading_slash_is_removed_by_the_file_reader_not_the_matcher() {
    let m = IgnoreMatcher::from_file_text("/a\n/b/c\n").unwrap();
    assert!(m.matches("a"));
    assert!(m.matches("a/x"));
    assert!(m.matches("b/c"));
    assert!(!m.matches("x/a"));
}

#[test]
fn bad_patterns_are_errors() {
    assert_eq!(IgnoreMatcher::new(&["!"]).unwrap_err(), IgnoreError::IllegalExclusion);
    assert!(matches!(IgnoreMatcher::new(&["a["]).unwrap_err(), IgnoreError::BadPattern { .. }));
    assert!(matches!(IgnoreMatcher::new(&["[z-a]"]).unwrap_err(), IgnoreError::BadPattern { .. }));
    assert!(matches!(IgnoreMatcher::new(&["a\\"]).unwrap_err(), IgnoreError::BadPattern { .. }));
    let e = IgnoreMatcher::from_file_text("ok\n!\n").unwrap_err();
    assert!(e.to_string().contains("illegal exclusion pattern"));
}

#[test]
fn empty_and_whitespace_patterns_are_skipped() {
    let m = IgnoreMatcher::new(&["", "   ", "a"]).unwrap();
    assert_eq!(m.patterns().len(), 1);
    assert!(!m.has_exclusions());
    assert!(IgnoreMatcher::new(&["a", "!b"]).unwrap().has_exclusions());
}

#[test]
fn directories_can_be_skipped_only_when_nothing_below_is_reincluded() {
    // (patterns, dir, can skip)
    let cases: &[(&[&str], &str, bool)] = &[
        (&["node_modules"], "node_modules", true),
        (&["node_modules"], "src", false),
        (&["node_modules", "!node_modules/keep"], "node_modules", false),
        (&["node_modules", "!other/keep"], "node_modules", true),
        (&["*", "!src/main.rs"], "src", false),
        (&["*", "!src/main.rs"], "docs", true),
        (&["*", "!**/*.rs"], "docs", false),
        (&["build", "!build"], "build", false),
        (&["a/b", "!a/c"], "a/b", true),
        (&["a", "!a/*/keep"], "a", false),
        (&["a", "!b*/keep"], "a", true),
    ];
    for (patterns, dir, want) in cases {
        let m = IgnoreMatcher::new(patterns).unwrap();
        assert_eq!(m.can_skip_dir(dir), *want, "{patterns:?} dir {dir:?}");
    }
}

/// Whatever `can_skip_dir` says, skipping must never hide a path `matches` keeps.
#[test]
fn skipping_never_hides_an_included_path() {
    let pattern_sets: &[&[&str]] = &[&["a", "!a/b/c"], &["*", "!x/**"], &["**/tmp", "!**/tmp/keep"], &["a/*", "!a/b"], &["[ab]", "![a]/z"]];
    let paths = ["a", "a/b", "a/b/c", "a/b/c/d", "x", "x/y", "b/tmp", "b/tmp/keep", "b/tmp/x", "a/z", "b/z"];
    for set in pattern_sets {
        let m = IgnoreMatcher::new(set).unwrap();
        for dir in paths {
            if m.can_skip_dir(dir) {
                for p in paths.iter().filter(|p| p.starts_with(&format!("{dir}/"))) {
                    assert!(m.matches(p), "{set:?}: skipped {dir} but {p} is included");
                }
            }
        }
    }
}

#[test]
fn ignore_file_candidates_prefer_the_dockerfile_specific_one() {
    let ctx = Path::new("/ctx");
    assert_eq!(
        ignore_file_candidates(ctx, Path::new("/ctx/docker/app.Dockerfile")),
        vec![PathBuf::from("/ctx/docker/app.Dockerfile.dockerignore"), PathBuf::from("/ctx/.dockerignore")]
    );
    assert_eq!(
        ignore_file_candidates(ctx, Path::new("Dockerfile")),
        vec![PathBuf::from("/ctx/Dockerfile.dockerignore"), PathBuf::from("/ctx/.dockerignore")]
    );
}
