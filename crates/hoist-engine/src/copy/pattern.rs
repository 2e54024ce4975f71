//! Path patterns of COPY/ADD: Go's `filepath.Match` (source wildcards) and moby's
//! `patternmatcher` (`--exclude`, and the include pattern of `--parents`; the same semantics as
//! `.dockerignore`).
//!
//! This is a local implementation: `hoist_dockerfile::IgnoreMatcher` (moby semantics, for
//! `.dockerignore`) did not exist when this was written; both follow moby's rules, so they can
//! be merged later.

/// A malformed pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pattern {pattern:?}: {reason}")]
pub struct BadPattern {
    pub pattern: String,
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

/// One compiled moby pattern, as the regular expression moby builds from it.
#[derive(Debug, Clone)]
enum Tok {
    Lit(char),
    /// `*`: `[^/]*`
    Star,
    /// `?`: `[^/]`
    One,
    /// `**` followed by more pattern: `(.*/)?`
    AnyDirs,
    /// `**` at the end: `.*`
    AnyTail,
    /// `[...]` as a regexp class (may match `/`).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

#[derive(Debug, Clone)]
struct Pattern {
    exclusion: bool,
    toks: Vec<Tok>,
}

/// moby's `patternmatcher`: patterns are cleaned (`filepath.Clean`), `!` negates, `**` spans
/// directories, a path matches when it or one of its parent directories matches; the last
/// matching pattern decides.
#[derive(Debug, Clone, Default)]
pub struct PatternMatcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
}

impl PatternMatcher {
    /// Compile patterns; blank ones are ignored, a lone `!` and malformed classes are errors.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<PatternMatcher, BadPattern> {
        let mut pm = PatternMatcher::default();
        for raw in patterns {
            let raw = raw.as_ref();
            let p = raw.trim();
            if p.is_empty() {
                continue;
            }
            let p = clean(p);
            let (exclusion, body) = match p.strip_prefix('!') {
                Some("") => return Err(bad(raw, "a lone \"!\" excludes nothing")),
                Some(b) => (true, b.to_string()),
                None => (false, p.clone()),
            };
            go_match(&body, ".").map_err(|e| BadPattern { pattern: raw.to_string(), reason: e.reason })?;
            pm.exclusions |= exclusion;
            pm.patterns.push(Pattern { exclusion, toks: compile(&body) });
        }
        Ok(pm)
    }

    /// No patterns at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether any pattern is an exclusion (`!...`).
    pub fn exclusions(&self) -> bool {
        self.exclusions
    }

    /// moby's `MatchesOrParentMatches`: `path` is relative and `/`-separated.
    pub fn matches(&self, path: &str) -> bool {
        let path = clean(path);
        let chars: Vec<char> = path.chars().collect();
        let parents: Vec<usize> = chars.iter().enumerate().filter(|(_, c)| **c == '/').map(|(i, _)| i).collect();
        let mut matched = false;
        for p in &self.patterns {
            if p.exclusion != matched {
                continue;
            }
            let mut m = full_match(&p.toks, &chars);
            if !m {
                m = parents.iter().any(|&end| full_match(&p.toks, &chars[..end]));
            }
            if m {
                matched = !p.exclusion;
            }
        }
        matched
    }

    /// Whether some path strictly below directory `dir` could match an including pattern
    /// (used to skip directories that cannot contain anything selected). Conservative: true
    /// when unsure.
    pub fn could_match_below(&self, dir: &str) -> bool {
        let mut prefix: Vec<char> = clean(dir).chars().collect();
        if prefix == ['.'] {
            return true;
        }
        prefix.push('/');
        self.patterns.iter().any(|p| p.exclusion || prefix_match(&p.toks, &prefix))
    }
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

fn compile(p: &str) -> Vec<Tok> {
    let chars: Vec<char> = p.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                toks.push(if i >= chars.len() { Tok::AnyTail } else { Tok::AnyDirs });
            }
            '*' => toks.push(Tok::Star),
            '?' => toks.push(Tok::One),
            '\\' => match chars.get(i) {
                Some(n) => {
                    toks.push(Tok::Lit(*n));
                    i += 1;
                }
                None => toks.push(Tok::Lit('\\')),
            },
            '[' => {
                let mut negated = false;
                if chars.get(i) == Some(&'^') {
                    negated = true;
                    i += 1;
                }
                let mut ranges = Vec::new();
                let mut first = true;
                while i < chars.len() && (chars[i] != ']' || first) {
                    first = false;
                    let mut lo = chars[i];
                    i += 1;
                    if lo == '\\' && i < chars.len() {
                        lo = chars[i];
                        i += 1;
                    }
                    let mut hi = lo;
                    if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']') {
                        hi = chars[i + 1];
                        i += 2;
                        if hi == '\\' && i < chars.len() {
                            hi = chars[i];
                            i += 1;
                        }
                    }
                    ranges.push((lo, hi));
                }
                i += 1; // the closing ']' (validated by go_match at construction)
                toks.push(Tok::Class { negated, ranges });
            }
            c => toks.push(Tok::Lit(c)),
        }
    }
    toks
}

fn tok_matches_char(t: &Tok, c: char) -> bool {
    match t {
        Tok::Lit(l) => *l == c,
        Tok::One => c != '/',
        Tok::Class { negated, ranges } => ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negated,
        _ => false,
    }
}

/// Whole-string match of a compiled pattern (an NFA simulation: linear in
/// tokens × characters).
fn full_match(toks: &[Tok], s: &[char]) -> bool {
    run(toks, s, false)
}

/// Whether some string starting with `s` matches.
fn prefix_match(toks: &[Tok], s: &[char]) -> bool {
    run(toks, s, true)
}

fn run(toks: &[Tok], s: &[char], prefix: bool) -> bool {
    // An NFA over token positions. `at[i]`: before token i. `inside[i]`: within the `.*` of an
    // `AnyDirs` group at token i, which must still be closed by a '/'.
    let n = toks.len();
    let mut at = vec![false; n + 1];
    let mut inside = vec![false; n + 1];
    at[0] = true;
    close(toks, &mut at);
    for &c in s {
        let mut nat = vec![false; n + 1];
        let mut ninside = vec![false; n + 1];
        for ti in 0..n {
            if inside[ti] {
                ninside[ti] = true;
                if c == '/' {
                    nat[ti + 1] = true;
                }
            }
            if !at[ti] {
                continue;
            }
            match &toks[ti] {
                Tok::Star => {
                    if c != '/' {
                        nat[ti] = true;
                    }
                }
                Tok::AnyTail => nat[ti] = true,
                Tok::AnyDirs => {
                    ninside[ti] = true;
                    if c == '/' {
                        nat[ti + 1] = true;
                    }
                }
                t => {
                    if tok_matches_char(t, c) {
                        nat[ti + 1] = true;
                    }
                }
            }
        }
        close(toks, &mut nat);
        if !nat.iter().chain(ninside.iter()).any(|b| *b) {
            return false;
        }
        at = nat;
        inside = ninside;
    }
    if prefix {
        return at.iter().chain(inside.iter()).any(|b| *b);
    }
    at[n]
}

/// Epsilon moves: `*`, `**` and an empty `(.*/)?` may match nothing.
fn close(toks: &[Tok], at: &mut [bool]) {
    for ti in 0..toks.len() {
        if at[ti] && matches!(toks[ti], Tok::Star | Tok::AnyTail | Tok::AnyDirs) {
            at[ti + 1] = true;
        }
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
        assert!(PatternMatcher::new(&["", "  "]).unwrap().is_empty());
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
