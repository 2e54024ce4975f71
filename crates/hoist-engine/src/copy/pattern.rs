//! Path patterns of COPY/ADD: Go's `filepath.Match` (source wildcards) and `filepath.Clean`.
//! `--exclude` and the include pattern of `--parents` use moby's `patternmatcher`, the same
//! matcher as `.dockerignore`: [`PatternMatcher`] is `hoist_dockerfile::IgnoreMatcher`.

pub use hoist_dockerfile::IgnoreMatcher as PatternMatcher;

/// A malformed pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pattern {pattern:?}: {reason}")]
pub struct BadPattern {
    /// The pattern as written.
    pub pattern: String,
    /// What is malformed, e.g. an unclosed class or a trailing `\`.
    pub reason: &'static str,
}

fn bad(pattern: &str, reason: &'static str) -> BadPattern {
    BadPattern { pattern: pattern.to_string(), reason }
}

/// Whether a path component contains `*`, `?` or `[` (a `\` escapes the next character), as
/// fsutil's `containsWildcards` decides whether a COPY source is a pattern.
pub fn has_wildcards(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// Go's `path/filepath.Match` on Unix: `*` is any run of non-`/` characters, `?` one non-`/`
/// character, `[...]` a class (`^` negates, `a-z` ranges), `\` escapes. The whole `name` must
/// match. Errors (like Go's `ErrBadPattern`) for malformed classes and a trailing `\`.
pub fn go_match(pattern: &str, name: &str) -> Result<bool, BadPattern> {
    let pat: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    go_match_chars(&pat, &name).map_err(|r| bad(pattern, r))
}

fn go_match_chars(mut pattern: &[char], mut name: &[char]) -> Result<bool, &'static str> {
    'outer: while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        if star && chunk.is_empty() {
            return Ok(!name.contains(&'/'));
        }
        let (t, ok, err) = match_chunk(chunk, name);
        if ok && (t.is_empty() || !pattern.is_empty()) {
            name = t;
            continue;
        }
        if let Some(e) = err {
            return Err(e);
        }
        if star {
            let mut i = 0;
            while i < name.len() && name[i] != '/' {
                let (t, ok, err) = match_chunk(chunk, &name[i + 1..]);
                if ok {
                    if pattern.is_empty() && !t.is_empty() {
                        i += 1;
                        continue;
                    }
                    name = t;
                    continue 'outer;
                }
                if let Some(e) = err {
                    return Err(e);
                }
                i += 1;
            }
        }
        // like Go: before failing, make sure the rest of the pattern is well-formed
        while !pattern.is_empty() {
            let (_, chunk, rest) = scan_chunk(pattern);
            pattern = rest;
            if let (_, _, Some(e)) = match_chunk(chunk, &[]) {
                return Err(e);
            }
        }
        return Ok(false);
    }
    Ok(name.is_empty())
}

fn scan_chunk(mut pattern: &[char]) -> (bool, &[char], &[char]) {
    let mut star = false;
    while pattern.first() == Some(&'*') {
        pattern = &pattern[1..];
        star = true;
    }
    let mut inrange = false;
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            '\\' if i + 1 < pattern.len() => i += 1,
            '[' => inrange = true,
            ']' => inrange = false,
            '*' if !inrange => break,
            _ => {}
        }
        i += 1;
    }
    (star, &pattern[..i], &pattern[i..])
}

/// Match `chunk` (no `*`) against the start of `s`: (rest, matched, error).
fn match_chunk<'a>(mut chunk: &[char], mut s: &'a [char]) -> (&'a [char], bool, Option<&'static str>) {
    let mut failed = false;
    while !chunk.is_empty() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match chunk[0] {
            '[' => {
                let mut r = '\0';
                if !failed {
                    r = s[0];
                    s = &s[1..];
                }
                chunk = &chunk[1..];
                let mut negated = false;
                if chunk.first() == Some(&'^') {
                    negated = true;
                    chunk = &chunk[1..];
                }
                let mut matched = false;
                let mut nrange = 0;
                loop {
                    if chunk.first() == Some(&']') && nrange > 0 {
                        chunk = &chunk[1..];
                        break;
                    }
                    let (lo, rest) = match get_esc(chunk) {
                        Ok(v) => v,
                        Err(e) => return (&[], false, Some(e)),
                    };
                    chunk = rest;
                    let mut hi = lo;
                    if chunk[0] == '-' {
                        let (h, rest) = match get_esc(&chunk[1..]) {
                            Ok(v) => v,
                            Err(e) => return (&[], false, Some(e)),
                        };
                        hi = h;
                        chunk = rest;
                    }
                    if lo <= r && r <= hi {
                        matched = true;
                    }
                    nrange += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            '?' => {
                if !failed {
                    if s[0] == '/' {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
            c => {
                let lit = if c == '\\' {
                    chunk = &chunk[1..];
                    match chunk.first() {
                        Some(l) => *l,
                        None => return (&[], false, Some("trailing backslash")),
                    }
                } else {
                    c
                };
                if !failed {
                    if lit != s[0] {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
        }
    }
    if failed {
        (&[], false, None)
    } else {
        (s, true, None)
    }
}

fn get_esc(chunk: &[char]) -> Result<(char, &[char]), &'static str> {
    if chunk.is_empty() || chunk[0] == '-' || chunk[0] == ']' {
        return Err("malformed character class");
    }
    let mut chunk = chunk;
    if chunk[0] == '\\' {
        chunk = &chunk[1..];
        if chunk.is_empty() {
            return Err("malformed character class");
        }
    }
    let r = chunk[0];
    let rest = &chunk[1..];
    if rest.is_empty() {
        return Err("unterminated character class");
    }
    Ok((r, rest))
}

/// Go's `filepath.Clean` for `/`-separated paths.
pub fn clean(p: &str) -> String {
    if p.is_empty() {
        return ".".to_string();
    }
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            c => out.push(c),
        }
    }
    let body = out.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".to_string(),
        (false, false) => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_match_table() {
        // from Go's path/filepath match_test.go (Unix cases)
        let cases: &[(&str, &str, Result<bool, ()>)] = &[
            ("abc", "abc", Ok(true)),
            ("*", "abc", Ok(true)),
            ("*c", "abc", Ok(true)),
            ("a*", "a", Ok(true)),
            ("a*", "abc", Ok(true)),
            ("a*", "ab/c", Ok(false)),
            ("a*/b", "abc/b", Ok(true)),
            ("a*/b", "a/c/b", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Ok(false)),
            ("a*b?c*x", "abxbbxdbxebxczzx", Ok(true)),
            ("a*b?c*x", "abxbbxdbxebxczzy", Ok(false)),
            ("ab[c]", "abc", Ok(true)),
            ("ab[b-d]", "abc", Ok(true)),
            ("ab[e-g]", "abc", Ok(false)),
            ("ab[^c]", "abc", Ok(false)),
            ("ab[^b-d]", "abc", Ok(false)),
            ("ab[^e-g]", "abc", Ok(true)),
            ("a\\*b", "a*b", Ok(true)),
            ("a\\*b", "ab", Ok(false)),
            ("a?b", "a☺b", Ok(true)),
            ("a[^a]b", "a☺b", Ok(true)),
            ("a???b", "a☺b", Ok(false)),
            ("a[^a][^a][^a]b", "a☺b", Ok(false)),
            ("[a-ζ]*", "α", Ok(true)),
            ("*[a-ζ]", "A", Ok(false)),
            ("a?b", "a/b", Ok(false)),
            ("a*b", "a/b", Ok(false)),
            ("[\\]a]", "]", Ok(true)),
            ("[\\-]", "-", Ok(true)),
            ("[x\\-]", "x", Ok(true)),
            ("[x\\-]", "-", Ok(true)),
            ("[x\\-]", "z", Ok(false)),
            ("[\\-x]", "x", Ok(true)),
            ("[\\-x]", "a", Ok(false)),
            ("[]a]", "]", Err(())),
            ("[-]", "-", Err(())),
            ("[x-]", "x", Err(())),
            ("[x-]", "z", Err(())),
            ("[-x]", "a", Err(())),
            ("\\", "a", Err(())),
            ("[a-b-c]", "a", Err(())),
            ("[", "a", Err(())),
            ("[^", "a", Err(())),
            ("[^bc", "a", Err(())),
            ("a[", "a", Err(())),
            ("a[", "ab", Err(())),
            ("a[", "x", Err(())),
            ("a/b[", "x", Err(())),
            ("*x", "xxx", Ok(true)),
        ];
        for (p, s, want) in cases {
            let got = go_match(p, s).map_err(|_| ());
            assert_eq!(got, *want, "Match({p:?}, {s:?})");
        }
    }

    #[test]
    fn wildcard_detection() {
        for (s, w) in [("a.txt", false), ("*.txt", true), ("a?", true), ("[ab]", true), ("a\\*", false), ("dir/x", false)] {
            assert_eq!(has_wildcards(s), w, "{s}");
        }
    }

    #[test]
    fn clean_like_go() {
        for (i, o) in [
            ("", "."),
            ("a/b/../c", "a/c"),
            ("/../a", "/a"),
            ("../../a", "../../a"),
            ("./a/./b/", "a/b"),
            ("//a//b", "/a/b"),
            ("a/..", "."),
            ("/", "/"),
        ] {
            assert_eq!(clean(i), o, "{i}");
        }
    }

    #[test]
    fn moby_patternmatcher_table() {
        // (patterns, path, matched) — cases from moby/patternmatcher's tests
        let cases: &[(&[&str], &str, bool)] = &[
            (&["**"], "file", true),
            (&["**"], "file/", true),
            (&["**/"], "file", true),
            (&["**/"], "file/", true),
            (&["**"], "/", true),
            (&["**/"], "/", true),
            (&["**"], "dir/file", true),
            (&["**/"], "dir/file", true),
            (&["**"], "dir/file/", true),
            (&["**/"], "dir/file/", true),
            (&["**/**"], "dir/file", true),
            (&["**/**"], "dir/file/", true),
            (&["dir/**"], "dir/file", true),
            (&["dir/**"], "dir/file/", true),
            (&["dir/**"], "dir/dir2/file", true),
            (&["dir/**"], "dir/dir2/file/", true),
            (&["**/dir"], "dir", true),
            (&["**/dir"], "dir/file", true),
            (&["**/dir2/*"], "dir/dir2/file", true),
            (&["**/dir2/*"], "dir/dir2/file/", true),
            (&["**/dir2/**"], "dir/dir2/dir3/file", true),
            (&["**/dir2/**"], "dir/dir2/dir3/file/", true),
            (&["**file"], "file", true),
            (&["**file"], "dir/file", true),
            (&["**/file"], "dir/file", true),
            (&["**file"], "dir/dir/file", true),
            (&["**/file"], "dir/dir/file", true),
            (&["**/file*"], "dir/dir/file", true),
            (&["**/file*"], "dir/dir/file.txt", true),
            (&["**/file*txt"], "dir/dir/file.txt", true),
            (&["**/file*.txt"], "dir/dir/file.txt", true),
            (&["**/file*.txt*"], "dir/dir/file.txt", true),
            (&["**/**/*.txt"], "dir/dir/file.txt", true),
            (&["**/**/*.txt2"], "dir/dir/file.txt", false),
            (&["**/*.txt"], "file.txt", true),
            (&["**/**/*.txt"], "file.txt", true),
            (&["a**/*.txt"], "a/file.txt", true),
            (&["a**/*.txt"], "a/dir/file.txt", true),
            (&["a**/*.txt"], "a/dir/dir/file.txt", true),
            (&["a/*.txt"], "a/dir/file.txt", false),
            (&["a/*.txt"], "a/file.txt", true),
            (&["a/*.txt**"], "a/file.txt", true),
            (&["a[b-d]e"], "ae", false),
            (&["a[b-d]e"], "ace", true),
            (&["a[b-d]e"], "aae", false),
            (&["a[^b-d]e"], "aze", true),
            (&[".*"], ".foo", true),
            (&[".*"], "foo", false),
            (&["abc.def"], "abcdef", false),
            (&["abc.def"], "abc.def", true),
            (&["abc.def"], "abcZdef", false),
            (&["abc?def"], "abcZdef", true),
            (&["abc?def"], "abcdef", false),
            (&["a\\\\"], "a\\", true),
            (&["**/foo/bar"], "foo/bar", true),
            (&["**/foo/bar"], "dir/foo/bar", true),
            (&["**/foo/bar"], "dir/dir2/foo/bar", true),
            (&["abc/**"], "abc", false),
            (&["abc/**"], "abc/def", true),
            (&["abc/**"], "abc/def/ghi", true),
            (&["**/.foo"], ".foo", true),
            (&["**/.foo"], "bar.foo", false),
            (&["a(b)c/def"], "a(b)c/def", true),
            (&["a(b)c/def"], "a(b)c/xyz", false),
            (&["a.|)$(}+{bc"], "a.|)$(}+{bc", true),
            (&["dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", true),
            (&["dist/*.whl"], "dist/proxy.py-2.4.0rc1.dev36+g08acad9-py3-none-any.whl", true),
            // parent directory matches
            (&["docs"], "docs/README.md", true),
            (&["*.md", "!README.md"], "README.md", false),
            (&["*.md", "!README.md"], "CHANGES.md", true),
            (&["docs", "!docs/keep.md"], "docs/keep.md", false),
            (&["docs", "!docs/keep.md"], "docs/other.md", true),
            (&["*.md", "!README*.md", "README-secret.md"], "README-secret.md", true),
            (&["*/*.png"], "dir1/file.png", true),
            (&["*/*.png"], "file.png", false),
            (&["./a/../b"], "b", true),
        ];
        for (pats, path, want) in cases {
            let pm = PatternMatcher::new(pats).unwrap();
            assert_eq!(pm.matches(path), *want, "{pats:?} on {path:?}");
        }
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for p in ["[", "!", "a[b", "[a-"] {
            assert!(PatternMatcher::new(&[p]).is_err(), "{p}");
        }
        assert!(PatternMatcher::new(&["", "  "]).unwrap().patterns().is_empty());
    }

    #[test]
    fn could_match_below_prunes_unrelated_dirs() {
        let pm = PatternMatcher::new(&["src/*.go"]).unwrap();
        assert!(pm.could_match_below("src"));
        assert!(!pm.could_match_below("node_modules"));
        assert!(!pm.could_match_below("src/sub"));
        let pm = PatternMatcher::new(&["**/*.go"]).unwrap();
        assert!(pm.could_match_below("node_modules/x"));
        let pm = PatternMatcher::new(&["a/[bc]/x"]).unwrap();
        assert!(pm.could_match_below("a/b"));
        assert!(!pm.could_match_below("a/d"));
    }
}
