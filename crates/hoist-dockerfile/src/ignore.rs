//! `.dockerignore` with moby's `patternmatcher` and `ignorefile` semantics: comments, `*`,
//! `?`, `**`, `[...]`, `!` exceptions where the last matching pattern wins, a path excluded
//! when it or one of its parents matches, leading `/` and `./` cleaned; plus the rule that
//! `<Dockerfile-name>.dockerignore` next to the Dockerfile takes precedence over the
//! context's `.dockerignore`. Pure: no file system access.

use std::path::{Path, PathBuf};

use crate::gocompat::clean_path;

/// A bad pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreError {
    /// `!` alone.
    #[error("illegal exclusion pattern: \"!\" (expected a path pattern after !)")]
    IllegalExclusion,
    /// Unbalanced `[`, a bad range or a trailing `\`.
    #[error("syntax error in pattern {pattern:?}: {reason}")]
    BadPattern {
        /// The pattern as written.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(char),
    /// `?`: one character but `/`.
    One,
    /// `*`: any run without `/`.
    Star,
    /// `**` (with its following `/` eaten): any run including `/`, possibly empty, that ends
    /// at a `/` boundary (`(.*/)?`) — or, at the end of the pattern, anything (`.*`).
    DoubleStar {
        at_end: bool,
    },
    Class {
        negated: bool,
        items: Vec<(char, char)>,
    },
}

/// One compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// The cleaned pattern text (without `!`).
    pub text: String,
    /// `!pattern`: re-includes what it matches.
    pub exclusion: bool,
    segs: Vec<Seg>,
    dirs: usize,
    /// `**` followed by literal text only: moby matches it as a plain suffix.
    suffix: Option<String>,
}

/// The ignore matcher.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IgnoreMatcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
}

/// Candidate ignore files for a build, in precedence order: `<Dockerfile-name>.dockerignore`
/// next to the Dockerfile, then `.dockerignore` at the context root. The caller reads the
/// first that exists.
pub fn ignore_file_candidates(context_dir: &Path, dockerfile_path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(name) = dockerfile_path.file_name() {
        let mut n = name.to_os_string();
        n.push(".dockerignore");
        let dir = dockerfile_path.parent().filter(|p| !p.as_os_str().is_empty());
        out.push(match dir {
            Some(d) => d.join(n),
            None => context_dir.join(n),
        });
    }
    out.push(context_dir.join(".dockerignore"));
    out
}

impl IgnoreMatcher {
    /// Read an ignore file's text into patterns (moby's `ignorefile.ReadAll`): a UTF-8 BOM is
    /// dropped, lines starting with `#` are comments, blank lines are skipped, each pattern is
    /// trimmed and cleaned and a leading `/` removed (keeping a leading `!`).
    pub fn parse(text: &str) -> Vec<String> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut out = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let mut p = line.trim();
            if p.is_empty() {
                continue;
            }
            let invert = p.starts_with('!');
            if invert {
                p = p[1..].trim();
            }
            let mut pat = String::new();
            if !p.is_empty() {
                pat = clean_path(p);
                if pat.len() > 1 && pat.starts_with('/') {
                    pat.remove(0);
                }
            }
            if invert {
                pat.insert(0, '!');
            }
            out.push(pat);
        }
        out
    }

    /// Compile patterns (moby's `patternmatcher.New`).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<IgnoreMatcher, IgnoreError> {
        let mut m = IgnoreMatcher::default();
        for p in patterns {
            let p = p.as_ref().trim();
            if p.is_empty() {
                continue;
            }
            let p = clean_path(p);
            let (exclusion, body) = match p.strip_prefix('!') {
                Some("") => return Err(IgnoreError::IllegalExclusion),
                Some(rest) => (true, rest.to_string()),
                None => (false, p),
            };
            if exclusion {
                m.exclusions = true;
            }
            let segs = compile(&body)?;
            let dirs = body.split('/').count();
            let suffix = match segs.split_first() {
                Some((Seg::DoubleStar { .. }, rest)) if rest.iter().all(|s| matches!(s, Seg::Lit(_))) && !body.contains('\\') => {
                    Some(body[2..].to_string())
                }
                _ => None,
            };
            m.patterns.push(Pattern { text: body, exclusion, segs, dirs, suffix });
        }
        Ok(m)
    }

    /// Compile the text of an ignore file.
    pub fn from_file_text(text: &str) -> Result<IgnoreMatcher, IgnoreError> {
        IgnoreMatcher::new(&IgnoreMatcher::parse(text))
    }

    /// The compiled patterns.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Whether any pattern is an exception (`!`).
    pub fn has_exclusions(&self) -> bool {
        self.exclusions
    }

    /// Whether `rel_path` (slash-separated, relative to the context, no leading `/`) is
    /// ignored; the context root (`.`, empty) never is. The last
    /// pattern that matches it or one of its parent directories decides
    /// (`MatchesOrParentMatches`).
    pub fn matches(&self, rel_path: &str) -> bool {
        let file = clean_path(rel_path);
        if file == "." {
            return false;
        }
        let parents: Vec<&str> = match file.rfind('/') {
            Some(i) => file[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for p in &self.patterns {
            if p.exclusion != matched {
                continue;
            }
            let mut hit = p.matches_path(&file);
            if !hit && !parents.is_empty() {
                for i in 0..parents.len() {
                    if p.matches_path(&parents[..=i].join("/")) {
                        hit = true;
                        break;
                    }
                }
            }
            if hit {
                matched = !p.exclusion;
            }
        }
        matched
    }

    /// Whether a directory walker may skip everything below `rel_dir`: true when the directory
    /// itself is ignored and no exception pattern could re-include anything inside it.
    pub fn can_skip_dir(&self, rel_dir: &str) -> bool {
        if !self.matches(rel_dir) {
            return false;
        }
        if !self.exclusions {
            return true;
        }
        let dir = clean_path(rel_dir.trim_start_matches('/'));
        let comps: Vec<&str> = dir.split('/').collect();
        !self.patterns.iter().filter(|p| p.exclusion).any(|p| p.may_match_below(&comps))
    }
}

impl IgnoreMatcher {
    /// For patterns that select (COPY `--parents` includes): whether something strictly below
    /// `rel_dir` could match, so that a walker may skip the directory when it cannot.
    /// Conservative: true when unsure, and always with an exception pattern.
    pub fn could_match_below(&self, rel_dir: &str) -> bool {
        let dir = clean_path(rel_dir.trim_start_matches('/'));
        if dir == "." {
            return true;
        }
        let comps: Vec<&str> = dir.split('/').collect();
        self.patterns.iter().any(|p| p.exclusion || p.may_match_below(&comps))
    }
}

impl Pattern {
    fn matches_path(&self, path: &str) -> bool {
        if let Some(suffix) = &self.suffix {
            return path.ends_with(suffix.as_str()) || suffix.strip_prefix('/').is_some_and(|s| s == path);
        }
        let text: Vec<char> = path.chars().collect();
        match_segs(&self.segs, &text)
    }

    /// Conservative: could this pattern match `dir/...` (something strictly inside `dir`)?
    fn may_match_below(&self, dir: &[&str]) -> bool {
        if self.segs.iter().any(|s| matches!(s, Seg::DoubleStar { .. })) {
            return true;
        }
        let pcomps: Vec<&str> = self.text.split('/').collect();
        if pcomps.len() <= dir.len() {
            // the pattern has no component left for anything below dir: it can only match dir
            // or an ancestor, which re-includes the whole directory
            let prefix = dir[..pcomps.len()].join("/");
            return self.matches_path(&prefix);
        }
        pcomps.iter().zip(dir).all(|(p, d)| compile(p).map(|segs| match_segs(&segs, &d.chars().collect::<Vec<_>>())).unwrap_or(true))
            || self.dirs == 0
    }
}

fn bad(pattern: &str, reason: &str) -> IgnoreError {
    IgnoreError::BadPattern { pattern: pattern.to_string(), reason: reason.to_string() }
}

/// Compile a cleaned pattern the way `patternmatcher` turns it into a regexp.
fn compile(pattern: &str) -> Result<Vec<Seg>, IgnoreError> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut segs = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => {
                if chars.get(i) == Some(&'*') {
                    i += 1;
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    segs.push(Seg::DoubleStar { at_end: i >= chars.len() });
                } else {
                    segs.push(Seg::Star);
                }
            }
            '?' => segs.push(Seg::One),
            '\\' => match chars.get(i) {
                Some(&n) => {
                    segs.push(Seg::Lit(n));
                    i += 1;
                }
                None => return Err(bad(pattern, "trailing backslash")),
            },
            '[' => {
                let mut negated = false;
                if matches!(chars.get(i), Some('^')) {
                    negated = true;
                    i += 1;
                }
                let mut items = Vec::new();
                let mut first = true;
                loop {
                    let Some(&c) = chars.get(i) else {
                        return Err(bad(pattern, "unclosed ["));
                    };
                    if c == ']' && !first {
                        i += 1;
                        break;
                    }
                    first = false;
                    let mut lo = c;
                    i += 1;
                    if lo == '\\' {
                        lo = *chars.get(i).ok_or_else(|| bad(pattern, "unclosed ["))?;
                        i += 1;
                    }
                    let mut hi = lo;
                    if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']') {
                        hi = chars[i + 1];
                        i += 2;
                        if hi == '\\' {
                            hi = *chars.get(i).ok_or_else(|| bad(pattern, "unclosed ["))?;
                            i += 1;
                        }
                        if hi < lo {
                            return Err(bad(pattern, "bad character range"));
                        }
                    }
                    items.push((lo, hi));
                }
                segs.push(Seg::Class { negated, items });
            }
            c => segs.push(Seg::Lit(c)),
        }
    }
    Ok(segs)
}

/// Full match of `segs` against `text` (anchored both ends).
fn match_segs(segs: &[Seg], text: &[char]) -> bool {
    let n = text.len();
    let mut cur = vec![false; n + 1];
    cur[0] = true;
    for s in segs {
        let mut nxt = vec![false; n + 1];
        match s {
            Seg::Lit(c) => {
                for j in 0..n {
                    if cur[j] && text[j] == *c {
                        nxt[j + 1] = true;
                    }
                }
            }
            Seg::One => {
                for j in 0..n {
                    if cur[j] && text[j] != '/' {
                        nxt[j + 1] = true;
                    }
                }
            }
            Seg::Star => {
                let mut reach = false;
                for j in 0..=n {
                    if cur[j] {
                        reach = true;
                    }
                    nxt[j] = reach;
                    if j < n && text[j] == '/' {
                        reach = false;
                    }
                }
            }
            Seg::DoubleStar { at_end: true } => {
                let mut reach = false;
                for j in 0..=n {
                    reach |= cur[j];
                    nxt[j] = reach;
                }
            }
            Seg::DoubleStar { at_end: false } => {
                // (.*/)? : stay, or jump to just after any later '/'
                let mut reach = false;
                for j in 0..=n {
                    if cur[j] {
                        nxt[j] = true;
                        reach = true;
                    }
                    if reach && j < n && text[j] == '/' {
                        nxt[j + 1] = true;
                    }
                }
            }
            Seg::Class { negated, items } => {
                for j in 0..n {
                    if cur[j] {
                        let inside = items.iter().any(|(lo, hi)| (*lo..=*hi).contains(&text[j]));
                        if inside != *negated {
                            nxt[j + 1] = true;
                        }
                    }
                }
            }
        }
        cur = nxt;
        if !cur.iter().any(|&b| b) {
            return false;
        }
    }
    cur[n]
}

#[cfg(test)]
mod tests;
