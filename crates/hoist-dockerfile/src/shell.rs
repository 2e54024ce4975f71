//! Variable expansion and word splitting exactly as BuildKit's shell lexer
//! (`frontend/dockerfile/shell/lex.go`): `$v`, `${v}`, `${v:-w}`, `${v-w}`, `${v:+w}`,
//! `${v+w}`, `${v:?msg}`, `${v?msg}`, `${v#p}`, `${v##p}`, `${v%p}`, `${v%%p}`, `${v/p/r}`,
//! `${v//p/r}`, single and double quotes, the escape token, and the lexer's modes (raw
//! quotes, raw escapes, skipping unset variables, not processing quotes).

use std::collections::{BTreeSet, HashMap};

use crate::gocompat::is_space;

/// An expansion error, worded like BuildKit's (`failed to process "${x": syntax error: missing '}'`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to process {}: {message}", shown_word(.source_text))]
pub struct ShellError {
    /// The word being expanded.
    pub source_text: String,
    /// What went wrong.
    pub message: String,
}

/// The word as an error shows it: quoted, and cut after 200 characters (a hostile word can be
/// hundreds of KiB; an error must stay readable and fit in a gRPC status).
fn shown_word(w: &str) -> String {
    const MAX: usize = 200;
    if w.chars().count() <= MAX {
        return crate::gocompat::quote(w);
    }
    let head: String = w.chars().take(MAX).collect();
    format!("{}... ({} bytes)", crate::gocompat::quote(&head), w.len())
}

/// Where variable values come from.
pub trait Env {
    /// The value of `key`, or `None` when the variable is not set.
    fn lookup(&self, key: &str) -> Option<&str>;
}

impl Env for HashMap<String, String> {
    fn lookup(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl Env for std::collections::BTreeMap<String, String> {
    fn lookup(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// An environment with no variables.
pub struct NoEnv;

impl Env for NoEnv {
    fn lookup(&self, _key: &str) -> Option<&str> {
        None
    }
}

/// `KEY=value` entries; a later entry for the same key wins (BuildKit's `EnvsFromSlice`).
impl Env for Vec<String> {
    fn lookup(&self, key: &str) -> Option<&str> {
        self.iter().rev().find_map(|e| {
            let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
            (k == key).then_some(v)
        })
    }
}

/// The result of one expansion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expansion {
    /// The word with variables replaced and quotes processed (spaces kept).
    pub result: String,
    /// The same text split into words (after expansion, honouring quotes).
    pub words: Vec<String>,
    /// Variables that were referenced and set.
    pub matched: BTreeSet<String>,
    /// Variables that were referenced and not set.
    pub unmatched: BTreeSet<String>,
}

/// The lexer and its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lexer {
    /// The escape character (`\` or `` ` `` from the `# escape=` directive).
    pub escape: char,
    /// Keep quote characters in the result.
    pub raw_quotes: bool,
    /// Keep escape characters in the result.
    pub raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables as written (`$X`, `${X:-y}`).
    pub skip_unset_env: bool,
    /// Most bytes an expansion may add to the word as written (an `ENV A=$A$A` repeated
    /// doubles the value each time): past it expansion stops with an error.
    pub max_growth: usize,
}

/// Default [`Lexer::max_growth`]: 1 MiB.
pub const DEFAULT_MAX_GROWTH: usize = 1 << 20;

/// Deepest nesting of `${...}` substitutions (`${a:-${b:-${c}}}` is 3); deeper words are
/// refused rather than recursed into.
pub const MAX_NESTING: usize = 64;

/// Work allowed to the pattern matching of one word (`${v#p}`, `${v//p/r}`), in steps of one
/// pattern token against one character: bounds hostile patterns on large values.
const PATTERN_BUDGET: u64 = 200_000_000;

impl Lexer {
    /// A lexer with the given escape character and default options.
    pub fn new(escape: char) -> Lexer {
        Lexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
            max_growth: DEFAULT_MAX_GROWTH,
        }
    }

    /// Expand one word (`ProcessWord`).
    pub fn process_word(&self, word: &str, env: &dyn Env) -> Result<String, ShellError> {
        Ok(self.process(word, env)?.result)
    }

    /// Expand and split into words (`ProcessWords`).
    pub fn process_words(&self, word: &str, env: &dyn Env) -> Result<Vec<String>, ShellError> {
        Ok(self.process(word, env)?.words)
    }

    /// Expand, returning the result, the words and the variables used.
    pub fn process(&self, word: &str, env: &dyn Env) -> Result<Expansion, ShellError> {
        let mut sw = ShellWord {
            lex: *self,
            chars: word.chars().collect(),
            pos: 0,
            env,
            raw_escapes: self.raw_escapes,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
            cap: word.len().saturating_add(self.max_growth),
            depth: 0,
            budget: PATTERN_BUDGET,
        };
        match sw.process_stop_on(None, self.raw_escapes) {
            Ok((result, words)) => Ok(Expansion { result, words, matched: sw.matched, unmatched: sw.unmatched }),
            Err(e) => Err(ShellError { source_text: word.to_string(), message: e.to_string() }),
        }
    }
}

struct ShellWord<'a> {
    lex: Lexer,
    chars: Vec<char>,
    pos: usize,
    env: &'a dyn Env,
    raw_escapes: bool,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
    /// Largest result (the word's length plus [`Lexer::max_growth`]).
    cap: usize,
    /// Current `${...}` nesting.
    depth: usize,
    /// Pattern-matching work left ([`PATTERN_BUDGET`]).
    budget: u64,
}

#[derive(Default)]
struct Words {
    buf: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, c: char) {
        if is_space(c) && self.in_word {
            if !self.buf.is_empty() {
                self.words.push(std::mem::take(&mut self.buf));
                self.in_word = false;
            }
        } else if !is_space(c) {
            self.add_raw_char(c);
        }
    }
    fn add_raw_char(&mut self, c: char) {
        self.buf.push(c);
        self.in_word = true;
    }
    fn add_string(&mut self, s: &str) {
        for c in s.chars() {
            self.add_char(c);
        }
    }
    fn add_raw_string(&mut self, s: &str) {
        self.buf.push_str(s);
        self.in_word = true;
    }
    fn finish(mut self) -> Vec<String> {
        if !self.buf.is_empty() {
            self.words.push(std::mem::take(&mut self.buf));
        }
        self.words
    }
}

/// Why an expansion failed; [`ShellError::message`] is its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum LexError {
    #[error("unexpected end of statement while looking for matching {0}")]
    Unterminated(char),
    #[error("unexpected end of statement while looking for matching single-quote")]
    UnterminatedSingleQuote,
    #[error("unexpected end of statement while looking for matching double-quote")]
    UnterminatedDoubleQuote,
    #[error(
        "variable expansion produces more than {cap} bytes (the builder allows {growth} bytes more than the word as written): expected a smaller value"
    )]
    TooLarge { cap: usize, growth: usize },
    #[error("variable expansion produces more than {0} bytes: expected a smaller value")]
    ReplacementTooLarge(usize),
    #[error("variable substitutions are nested more than {} levels deep: expected a flatter expression", MAX_NESTING)]
    TooDeep,
    #[error("syntax error: missing '}}'")]
    MissingBrace,
    #[error("syntax error: missing '/' in ${{}}")]
    MissingSlash,
    #[error("syntax error: bad substitution")]
    BadSubstitution,
    #[error("unsupported modifier ({0}) in substitution")]
    UnsupportedModifier(String),
    /// `${name?message}` / `${name:?message}` on an unset (or empty) variable.
    #[error("{name}: {message}")]
    Required { name: String, message: String },
    /// `escape` is U+FFFD when the pattern ends with the backslash.
    #[error("invalid pattern ({pattern}) in substitution: invalid escape '\\{escape}'")]
    InvalidPattern { pattern: String, escape: char },
    #[error(
        "pattern substitution is too expensive on this value (the builder bounds pattern matching work): expected a simpler pattern or a shorter value"
    )]
    TooExpensive,
}

type LexResult<T> = Result<T, LexError>;

impl ShellWord<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.chars.get(self.pos).copied();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn process_stop_on(&mut self, stop: Option<char>, raw_escapes: bool) -> LexResult<(String, Vec<String>)> {
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        let r = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        r
    }

    fn process_stop_on_inner(&mut self, stop: Option<char>) -> LexResult<(String, Vec<String>)> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.next();
                return Ok((result, words.finish()));
            }
            let special = ch == '$' || (!self.lex.skip_process_quotes && (ch == '\'' || ch == '"'));
            if special {
                let tmp = match ch {
                    '$' => self.process_dollar()?,
                    '\'' => self.process_single_quote()?,
                    _ => self.process_double_quote()?,
                };
                result.push_str(&tmp);
                self.check_size(result.len())?;
                if ch == '$' {
                    words.add_string(&tmp);
                } else {
                    words.add_raw_string(&tmp);
                }
            } else {
                let mut ch = self.next().unwrap_or_default();
                if ch == self.lex.escape {
                    if self.raw_escapes {
                        words.add_raw_char(ch);
                        result.push(ch);
                    }
                    match self.next() {
                        None => break,
                        Some(c) => ch = c,
                    }
                    words.add_raw_char(ch);
                } else {
                    words.add_char(ch);
                }
                result.push(ch);
            }
        }
        if let Some(s) = stop {
            return Err(LexError::Unterminated(s));
        }
        Ok((result, words.finish()))
    }

    fn process_single_quote(&mut self) -> LexResult<String> {
        let mut result = String::new();
        let q = self.next().unwrap_or('\'');
        if self.lex.raw_quotes {
            result.push(q);
        }
        loop {
            match self.next() {
                None => return Err(LexError::UnterminatedSingleQuote),
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> LexResult<String> {
        let mut result = String::new();
        let q = self.next().unwrap_or('"');
        if self.lex.raw_quotes {
            result.push(q);
        }
        loop {
            match self.peek() {
                None => return Err(LexError::UnterminatedDoubleQuote),
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let v = self.process_dollar()?;
                    result.push_str(&v);
                    self.check_size(result.len())?;
                }
                Some(_) => {
                    let mut ch = self.next().unwrap_or_default();
                    if ch == self.lex.escape {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            None => continue,
                            Some(c) if c == '"' || c == '$' || c == self.lex.escape => {
                                ch = c;
                                self.next();
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        match self.env.lookup(name) {
            Some(v) => {
                self.matched.insert(name.to_string());
                Some(v.to_string())
            }
            None => {
                self.unmatched.insert(name.to_string());
                None
            }
        }
    }

    /// Fail once a result grows past the cap.
    fn check_size(&self, len: usize) -> LexResult<()> {
        if len > self.cap {
            return Err(LexError::TooLarge { cap: self.cap, growth: self.lex.max_growth });
        }
        Ok(())
    }

    fn process_dollar(&mut self) -> LexResult<String> {
        if self.depth >= MAX_NESTING {
            return Err(LexError::TooDeep);
        }
        self.depth += 1;
        let r = self.process_dollar_inner();
        self.depth -= 1;
        let v = r?;
        self.check_size(v.len())?;
        Ok(v)
    }

    fn process_dollar_inner(&mut self) -> LexResult<String> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.next();
        match self.peek() {
            None => return Err(LexError::MissingBrace),
            Some('{' | '}' | ':') => return Err(LexError::BadSubstitution),
            _ => {}
        }
        let name = self.process_name();
        let first = self.next();
        if first.is_none() {
            // BuildKit reports "unsupported modifier (\u{fffd})" here; say what is missing
            return Err(LexError::MissingBrace);
        }
        let mut chs: String = first.map(String::from).unwrap_or_default();
        let mut null_is_unset = false;
        let mut ch = first;
        match first {
            Some('}') => Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            Some(':') | Some('+' | '-' | '?' | '#' | '%') => {
                if first == Some(':') {
                    null_is_unset = true;
                    ch = self.next();
                    if let Some(c) = ch {
                        chs.push(c);
                    }
                }
                let raw = matches!(ch, Some('#' | '%'));
                if null_is_unset && raw {
                    return Err(LexError::UnsupportedModifier(chs));
                }
                let word = match self.process_stop_on(Some('}'), raw) {
                    Ok((w, _)) => w,
                    Err(e) => {
                        if self.peek().is_none() {
                            return Err(LexError::MissingBrace);
                        }
                        return Err(e);
                    }
                };
                let value = self.get_env(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}{chs}{word}}}"));
                }
                let set = value.is_some();
                let value = value.unwrap_or_default();
                match ch {
                    Some('-') => Ok(if !set || (null_is_unset && value.is_empty()) { word } else { value }),
                    Some('+') => Ok(if !set || (null_is_unset && value.is_empty()) { String::new() } else { word }),
                    Some('?') => {
                        if !set {
                            let m = if word.is_empty() { "is not allowed to be unset".to_string() } else { word };
                            return Err(LexError::Required { name, message: m });
                        }
                        if null_is_unset && value.is_empty() {
                            let m = if word.is_empty() { "is not allowed to be empty".to_string() } else { word };
                            return Err(LexError::Required { name, message: m });
                        }
                        Ok(value)
                    }
                    Some(c @ ('%' | '#')) => {
                        let (greedy, pat) = match word.strip_prefix(c) {
                            Some(rest) => (true, rest.to_string()),
                            None => (false, word),
                        };
                        if c == '%' {
                            trim_suffix(&pat, &value, greedy, &mut self.budget)
                        } else {
                            trim_prefix(&pat, &value, greedy, &mut self.budget)
                        }
                    }
                    _ => Err(LexError::UnsupportedModifier(chs)),
                }
            }
            Some('/') => {
                let replace_all = self.peek() == Some('/');
                if replace_all {
                    self.next();
                }
                let pattern = match self.process_stop_on(Some('/'), true) {
                    Ok((w, _)) => w,
                    Err(e) => {
                        if self.peek().is_none() {
                            return Err(LexError::MissingSlash);
                        }
                        return Err(e);
                    }
                };
                let replacement = match self.process_stop_on(Some('}'), true) {
                    Ok((w, _)) => w,
                    Err(e) => {
                        if self.peek().is_none() {
                            return Err(LexError::MissingBrace);
                        }
                        return Err(e);
                    }
                };
                let value = self.get_env(&name);
                let Some(value) = value else {
                    if self.lex.skip_unset_env {
                        return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
                    }
                    return replace(&pattern, "", &replacement, replace_all, self.cap, &mut self.budget);
                };
                replace(&pattern, &value, &replacement, replace_all, self.cap, &mut self.budget)
            }
            _ => Err(LexError::UnsupportedModifier(chs)),
        }
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && ch.is_numeric() && !ch.is_alphabetic() {
                while let Some(d) = self.peek() {
                    if !d.is_numeric() || d.is_alphabetic() {
                        break;
                    }
                    name.push(d);
                    self.next();
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return ch.to_string();
            }
            if !ch.is_alphanumeric() && ch != '_' {
                break;
            }
            name.push(ch);
            self.next();
        }
        name
    }
}

/// One element of a `${v#pattern}` / `${v/pattern/r}` pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Star,
    Any,
    Lit(char),
}

/// Compile a shell pattern the way BuildKit's `convertShellPatternToRegex` reads it.
fn compile_pattern(pattern: &str) -> LexResult<Vec<Tok>> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => out.push(Tok::Star),
            '?' => out.push(Tok::Any),
            '\\' => {
                // `\}` and `\/` were escaped for ${}; the backslash is not part of the pattern
                if matches!(chars.get(i), Some('}' | '/')) {
                    continue;
                }
                match chars.get(i) {
                    Some(&n @ ('*' | '?' | '\\')) => {
                        out.push(Tok::Lit(n));
                        i += 1;
                    }
                    Some(&n) => return Err(LexError::InvalidPattern { pattern: pattern.to_string(), escape: n }),
                    None => return Err(LexError::InvalidPattern { pattern: pattern.to_string(), escape: '\u{fffd}' }),
                }
            }
            c => out.push(Tok::Lit(c)),
        }
    }
    Ok(out)
}

/// Take `cost` steps of pattern-matching work from `budget`.
fn spend(budget: &mut u64, cost: u64) -> LexResult<()> {
    if cost > *budget {
        return Err(LexError::TooExpensive);
    }
    *budget -= cost;
    Ok(())
}

fn tok_matches(t: Tok, c: char) -> bool {
    match t {
        Tok::Star | Tok::Any => c != '\n',
        Tok::Lit(l) => l == c,
    }
}

/// For each end position `j`, whether `toks` matches `text[start..j]` exactly.
/// Wildcards do not match a newline (Go's regexp `.` does not). Costs
/// `toks.len() * (text.len() - start)` of `budget`.
fn match_ends(toks: &[Tok], text: &[char], start: usize, budget: &mut u64) -> LexResult<Vec<bool>> {
    let n = text.len();
    spend(budget, (toks.len() as u64 + 1) * (n.saturating_sub(start) as u64 + 1))?;
    // cur[j]: after consuming the tokens so far, position j is reachable
    let mut cur = vec![false; n + 1];
    cur[start] = true;
    for t in toks {
        let mut nxt = vec![false; n + 1];
        match t {
            Tok::Star => {
                let mut reach = false;
                for j in start..=n {
                    if cur[j] {
                        reach = true;
                    }
                    if reach {
                        nxt[j] = true;
                    }
                    if j < n && text[j] == '\n' {
                        reach = false;
                    }
                }
            }
            Tok::Any | Tok::Lit(_) => {
                for j in start..n {
                    if cur[j] && tok_matches(*t, text[j]) {
                        nxt[j + 1] = true;
                    }
                }
            }
        }
        cur = nxt;
    }
    Ok(cur)
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool, budget: &mut u64) -> LexResult<String> {
    let toks = compile_pattern(pattern)?;
    let text: Vec<char> = value.chars().collect();
    let ends = match_ends(&toks, &text, 0, budget)?;
    let pick = if greedy { (0..=text.len()).rev().find(|&j| ends[j]) } else { (0..=text.len()).find(|&j| ends[j]) };
    Ok(match pick {
        Some(j) => text[j..].iter().collect(),
        None => value.to_string(),
    })
}

/// Suffix matching is prefix matching of the reversed pattern on the reversed value: one pass.
fn trim_suffix(pattern: &str, value: &str, greedy: bool, budget: &mut u64) -> LexResult<String> {
    let mut toks = compile_pattern(pattern)?;
    toks.reverse();
    let text: Vec<char> = value.chars().collect();
    let n = text.len();
    let rev: Vec<char> = text.iter().rev().copied().collect();
    // ends[k]: the pattern matches the suffix of length k
    let ends = match_ends(&toks, &rev, 0, budget)?;
    // shortest suffix = latest start; longest suffix = earliest start
    let pick = if greedy { (0..=n).rev().find(|&k| ends[k]) } else { (0..=n).find(|&k| ends[k]) };
    Ok(match pick {
        Some(k) => text[..n - k].iter().collect(),
        None => value.to_string(),
    })
}

/// Leftmost match at or after `from` (longest at that start): `(start, end)`. One pass of a
/// Thompson NFA whose states remember the earliest start that reached them.
fn find_match(toks: &[Tok], text: &[char], from: usize, budget: &mut u64) -> LexResult<Option<(usize, usize)>> {
    let m = toks.len();
    let n = text.len();
    // best[k]: earliest start from which `toks[..k]` matches text[start..j]
    let mut best: Vec<Option<usize>> = vec![None; m + 1];
    let mut found: Option<(usize, usize)> = None;
    let closure = |best: &mut Vec<Option<usize>>| {
        for k in 0..m {
            if toks[k] == Tok::Star {
                if let Some(s) = best[k] {
                    if best[k + 1].is_none_or(|b| s < b) {
                        best[k + 1] = Some(s);
                    }
                }
            }
        }
    };
    let mut j = from;
    loop {
        if found.is_none() && best[0].is_none() {
            best[0] = Some(j);
        }
        closure(&mut best);
        if let Some(s) = best[m] {
            found = match found {
                Some((fs, _)) if fs < s => found,
                Some((fs, fe)) if fs == s => Some((fs, fe.max(j))),
                _ => Some((s, j)),
            };
        }
        if let Some((fs, _)) = found {
            // later starts can no longer win
            for b in best.iter_mut() {
                if b.is_some_and(|s| s > fs) {
                    *b = None;
                }
            }
            if best.iter().all(Option::is_none) {
                break;
            }
        }
        if j >= n {
            break;
        }
        spend(budget, m as u64 + 1)?;
        let c = text[j];
        let mut next: Vec<Option<usize>> = vec![None; m + 1];
        for k in 0..m {
            let Some(s) = best[k] else { continue };
            let to = if toks[k] == Tok::Star { k } else { k + 1 };
            if tok_matches(toks[k], c) && next[to].is_none_or(|b| s < b) {
                next[to] = Some(s);
            }
        }
        best = next;
        j += 1;
    }
    Ok(found)
}

/// Go's `Regexp.ReplaceAllString` template expansion for a pattern without groups:
/// `$$` is `$`, `$0`/`${0}` the match, any other `$name` empty.
fn expand_template(repl: &str, matched: &str) -> String {
    let chars: Vec<char> = repl.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        if chars.get(i + 1) == Some(&'$') {
            out.push('$');
            i += 2;
            continue;
        }
        let (name, next) = if chars.get(i + 1) == Some(&'{') {
            match chars[i + 2..].iter().position(|&c| c == '}') {
                Some(p) => (chars[i + 2..i + 2 + p].iter().collect::<String>(), i + 3 + p),
                None => (String::new(), i),
            }
        } else {
            let mut j = i + 1;
            while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                j += 1;
            }
            (chars[i + 1..j].iter().collect::<String>(), j)
        };
        if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
            out.push('$');
            i += 1;
            continue;
        }
        if name == "0" {
            out.push_str(matched);
        }
        i = next;
    }
    out
}

fn replace(pattern: &str, value: &str, replacement: &str, all: bool, cap: usize, budget: &mut u64) -> LexResult<String> {
    let toks = compile_pattern(pattern)?;
    let text: Vec<char> = value.chars().collect();
    let too_big = || LexError::ReplacementTooLarge(cap);
    if !all {
        return Ok(match find_match(&toks, &text, 0, budget)? {
            Some((s, e)) => {
                let mut out: String = text[..s].iter().collect();
                out.push_str(replacement);
                out.extend(&text[e..]);
                if out.len() > cap {
                    return Err(too_big());
                }
                out
            }
            None => value.to_string(),
        });
    }
    let mut out = String::new();
    let mut last_end = 0;
    let mut search = 0;
    while search <= text.len() {
        let Some((s, e)) = find_match(&toks, &text, search, budget)? else {
            break;
        };
        out.extend(&text[last_end..s]);
        if e > last_end || s == 0 {
            let m: String = text[s..e].iter().collect();
            out.push_str(&expand_template(replacement, &m));
        }
        if out.len() > cap {
            return Err(too_big());
        }
        last_end = e;
        search = if search + 1 > e { search + 1 } else { e };
    }
    if last_end <= text.len() {
        out.extend(&text[last_end..]);
    }
    if out.len() > cap {
        return Err(too_big());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> HashMap<String, String> {
        [
            ("PWD", "/home"),
            ("SHELL", "bash"),
            ("KOREAN", "한국어"),
            ("NULL", ""),
            ("WITHSPACES", "a b  c"),
            ("PATHV", "/usr/local/bin/app.tar.gz"),
            ("X", "x"),
            ("MULTI", "ab\ncd"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// BuildKit's envVarTest table (shell/envVarTest) plus our own cases:
    /// (input, expected result or "error").
    const WORD_CASES: &[(&str, &str)] = &[
        ("hello", "hello"),
        ("he'll'o", "hello"),
        ("he'llo", "error"),
        ("he\\'llo", "he'llo"),
        ("he\\\\'llo", "error"),
        ("abc\\\\def", "abc\\def"),
        ("\"\"", ""),
        ("\"hello\"", "hello"),
        ("\"hel'lo\"", "hel'lo"),
        ("\"hel\\\"lo\"", "hel\"lo"),
        ("\"hel\\lo\"", "hel\\lo"),
        ("'hello\\'", "hello\\"),
        ("'hello\\'\"", "error"),
        ("\"a\\\\b\"", "a\\b"),
        ("\\$PWD", "$PWD"),
        ("\\${PWD}", "${PWD}"),
        ("'$PWD'", "$PWD"),
        ("\"$PWD\"", "/home"),
        ("'\"$PWD\"'", "\"$PWD\""),
        ("$PWD", "/home"),
        ("${PWD}", "/home"),
        ("$PWD/x", "/home/x"),
        ("${PWD}x", "/homex"),
        ("$PWDx", ""),
        ("${PWD:-x}", "/home"),
        ("${NULL:-x}", "x"),
        ("${NULL-x}", ""),
        ("${UNSET-x}", "x"),
        ("${UNSET:-x}", "x"),
        ("${UNSET:-$PWD}", "/home"),
        ("${UNSET:-${SHELL}}", "bash"),
        ("${PWD:+x}", "x"),
        ("${NULL:+x}", ""),
        ("${NULL+x}", "x"),
        ("${UNSET+x}", ""),
        ("${UNSET:+x}", ""),
        ("${PWD:?msg}", "/home"),
        ("${UNSET:?msg}", "error"),
        ("${NULL:?msg}", "error"),
        ("${NULL?msg}", ""),
        ("${UNSET?msg}", "error"),
        ("${PWD:x}", "error"),
        ("${PWD", "error"),
        ("${", "error"),
        ("${}", "error"),
        ("${:}", "error"),
        ("${{}", "error"),
        ("${PWD:", "error"),
        ("${PWD:-", "error"),
        ("$", "$"),
        ("a$", "a$"),
        ("$ a", "$ a"),
        ("$1", ""),
        ("$1x", "x"),
        ("$@", ""),
        ("$$", ""),
        ("${KOREAN}", "한국어"),
        ("안녕$KOREAN", "안녕한국어"),
        ("${PATHV#*/}", "usr/local/bin/app.tar.gz"),
        ("${PATHV##*/}", "app.tar.gz"),
        ("${PATHV%.*}", "/usr/local/bin/app.tar"),
        ("${PATHV%%.*}", "/usr/local/bin/app"),
        ("${PATHV#/usr}", "/local/bin/app.tar.gz"),
        ("${PATHV#nomatch}", "/usr/local/bin/app.tar.gz"),
        ("${PATHV%?z}", "/usr/local/bin/app.tar."),
        ("${PATHV:#x}", "error"),
        ("${PATHV:%x}", "error"),
        ("${UNSET#x}", ""),
        ("${PATHV/usr/opt}", "/opt/local/bin/app.tar.gz"),
        ("${PATHV//a/A}", "/usr/locAl/bin/App.tAr.gz"),
        ("${PATHV/a*/Z}", "/usr/locZ"),
        ("${PATHV/nomatch/Z}", "/usr/local/bin/app.tar.gz"),
        ("${PATHV/\\//|}", "|usr/local/bin/app.tar.gz"),
        ("${PATHV//\\//|}", "|usr|local|bin|app.tar.gz"),
        ("${PATHV/usr", "error"),
        ("${PATHV#\\q}", "error"),
        ("${X/x/$PWD}", "/home"),
        ("${MULTI#*b}", "\ncd"),
        ("${MULTI##*}", "\ncd"),
        ("\\", ""),
        ("a\\", "a"),
        ("\"\\", "error"),
        ("${X:+${PWD}/bin}", "/home/bin"),
    ];

    #[test]
    fn process_word_table() {
        let lex = Lexer::new('\\');
        let env = env();
        for (input, want) in WORD_CASES {
            let got = lex.process_word(input, &env);
            if *want == "error" {
                assert!(got.is_err(), "{input:?} should fail, got {got:?}");
            } else {
                assert_eq!(got.as_deref(), Ok(*want), "process_word({input:?})");
            }
        }
    }

    /// BuildKit's wordsTest table: (input, expected words joined by '|').
    const WORDS_CASES: &[(&str, &str)] = &[
        ("hello", "hello"),
        ("hello world", "hello|world"),
        ("hello   world  ", "hello|world"),
        ("'hello world'", "hello world"),
        ("\"hello world\" x", "hello world|x"),
        ("hello\\ world", "hello world"),
        ("$WITHSPACES", "a|b|c"),
        ("\"$WITHSPACES\"", "a b  c"),
        ("x$WITHSPACES", "xa|b|c"),
        ("$NULL", ""),
        ("\"\"", ""),
        ("'' x", "x"),
        ("80 443/udp", "80|443/udp"),
        ("a\\\tb", "a\tb"),
    ];

    #[test]
    fn process_words_table() {
        let lex = Lexer::new('\\');
        let env = env();
        for (input, want) in WORDS_CASES {
            let got = lex.process_words(input, &env).expect(input);
            assert_eq!(got.join("|"), *want, "process_words({input:?})");
        }
    }

    #[test]
    fn backtick_escape_token() {
        let lex = Lexer::new('`');
        let env = env();
        assert_eq!(lex.process_word("`$PWD", &env).unwrap(), "$PWD");
        assert_eq!(lex.process_word("c:\\windows", &env).unwrap(), "c:\\windows");
        assert_eq!(lex.process_word("\"a`\"b\"", &env).unwrap(), "a\"b");
    }

    #[test]
    fn skip_unset_env_keeps_references() {
        let mut lex = Lexer::new('\\');
        lex.skip_unset_env = true;
        let env = env();
        assert_eq!(lex.process_word("$UNSET $PWD", &env).unwrap(), "$UNSET /home");
        assert_eq!(lex.process_word("${UNSET}", &env).unwrap(), "${UNSET}");
        assert_eq!(lex.process_word("${UNSET:-x}", &env).unwrap(), "${UNSET:-x}");
        assert_eq!(lex.process_word("${UNSET/a/b}", &env).unwrap(), "${UNSET/a/b}");
    }

    #[test]
    fn raw_quotes_and_escapes_are_kept() {
        let mut lex = Lexer::new('\\');
        lex.raw_quotes = true;
        lex.raw_escapes = true;
        let env = NoEnv;
        assert_eq!(lex.process_word("'a b' \"c\" d\\ e", &env).unwrap(), "'a b' \"c\" d\\ e");
        assert_eq!(lex.process_words("<<'EOF' cat", &env).unwrap(), vec!["<<'EOF'", "cat"]);
    }

    #[test]
    fn skip_process_quotes_treats_quotes_as_text() {
        let mut lex = Lexer::new('\\');
        lex.skip_process_quotes = true;
        let env = env();
        assert_eq!(lex.process_word("echo '$PWD' \"$X\"", &env).unwrap(), "echo '/home' \"x\"");
    }

    #[test]
    fn matched_and_unmatched_are_reported() {
        let lex = Lexer::new('\\');
        let e = lex.process("$PWD ${NOPE:-x} $X", &env()).unwrap();
        assert_eq!(e.matched.into_iter().collect::<Vec<_>>(), vec!["PWD", "X"]);
        assert_eq!(e.unmatched.into_iter().collect::<Vec<_>>(), vec!["NOPE"]);
    }

    #[test]
    fn errors_name_the_word_and_the_problem() {
        let lex = Lexer::new('\\');
        let e = lex.process_word("${UNSET:?must be set}", &env()).unwrap_err();
        assert_eq!(e.to_string(), "failed to process \"${UNSET:?must be set}\": UNSET: must be set");
        let e = lex.process_word("${x", &NoEnv).unwrap_err();
        assert_eq!(e.to_string(), "failed to process \"${x\": syntax error: missing '}'");
        let e = lex.process_word("${UNSET?}", &NoEnv).unwrap_err();
        assert!(e.to_string().ends_with("UNSET: is not allowed to be unset"), "{e}");
        let e = lex.process_word("${NULL:?}", &env()).unwrap_err();
        assert!(e.to_string().ends_with("NULL: is not allowed to be empty"), "{e}");
    }

    #[test]
    fn slice_env_last_entry_wins() {
        let v = vec!["A=1".to_string(), "B=2".to_string(), "A=3".to_string(), "C".to_string()];
        let lex = Lexer::new('\\');
        assert_eq!(lex.process_word("$A$B[$C]", &v).unwrap(), "32[]");
    }

    #[test]
    fn replace_all_handles_empty_matches_like_go() {
        let lex = Lexer::new('\\');
        let env = env();
        // `*` matches empty: Go's ReplaceAll inserts at every position not adjacent to a match
        assert_eq!(lex.process_word("${X//*/-}", &env).unwrap(), "-");
        assert_eq!(lex.process_word("${X//?/-}", &env).unwrap(), "-");
        assert_eq!(lex.process_word("${SHELL//s/S}", &env).unwrap(), "baSh");
    }

    #[test]
    fn doubling_a_variable_stops_at_the_growth_limit() {
        let mut lex = Lexer::new('\\');
        lex.max_growth = 1000;
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("A".into(), "x".into());
        let mut rounds = 0;
        let err = loop {
            match lex.process_word("$A$A", &env) {
                Ok(v) => {
                    env.insert("A".into(), v);
                    rounds += 1;
                }
                Err(e) => break e,
            }
            assert!(rounds < 40, "the value kept doubling");
        };
        // 512 bytes + 4 written is under 1004; 1024 is not
        assert_eq!(rounds, 9);
        assert!(err.message.contains("more than 1004 bytes"), "{err}");
        // growth is measured against the word: a long literal word is fine
        let long = "y".repeat(5000);
        assert_eq!(lex.process_word(&long, &env).unwrap().len(), 5000);
    }

    #[test]
    fn replacement_cannot_amplify_past_the_limit() {
        let mut lex = Lexer::new('\\');
        lex.max_growth = 10_000;
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("A".into(), "a".repeat(5000));
        let err = lex.process_word("${A//?/0123456789}", &env).unwrap_err();
        assert!(err.message.contains("more than"), "{err}");
        assert_eq!(lex.process_word("${A//?/b}", &env).unwrap(), "b".repeat(5000));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let lex = Lexer::new('\\');
        let deep = "${a:-".repeat(100_000) + &"}".repeat(100_000);
        let err = lex.process_word(&deep, &NoEnv).unwrap_err();
        assert!(err.message.contains("nested more than 64"), "{}", err.message);
        assert!(err.to_string().len() < 400, "the error quotes a bounded part of the word");
        let ok = "${a:-".repeat(10) + "x" + &"}".repeat(10);
        assert_eq!(lex.process_word(&ok, &NoEnv).unwrap(), "x");
        // nesting through double quotes counts too
        let quoted = "\"${a:-".repeat(1000) + &"}\"".repeat(1000);
        assert!(lex.process_word(&quoted, &NoEnv).is_err());
    }

    #[test]
    fn patterns_on_large_values_run_in_linear_time() {
        let lex = Lexer::new('\\');
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("A".into(), "ab".repeat(100_000));
        let t = std::time::Instant::now();
        assert_eq!(lex.process_word("${A//?/x}", &env).unwrap().len(), 200_000);
        assert_eq!(lex.process_word("${A%%b*}", &env).unwrap(), "a");
        assert_eq!(lex.process_word("${A%b*}", &env).unwrap().len(), 199_999);
        assert_eq!(lex.process_word("${A##*a}", &env).unwrap(), "b");
        assert_eq!(lex.process_word("${A//ba/}", &env).unwrap(), "ab");
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    }

    #[test]
    fn find_match_agrees_with_the_quadratic_definition() {
        fn slow(toks: &[Tok], text: &[char], from: usize) -> Option<(usize, usize)> {
            let mut b = u64::MAX;
            (from..=text.len()).find_map(|s| {
                let ends = match_ends(toks, text, s, &mut b).unwrap();
                (s..=text.len()).rev().find(|&j| ends[j]).map(|e| (s, e))
            })
        }
        let texts = ["", "a", "ab", "aab\nab", "xaxbxa", "abcabc", "a\nb\n", "bbb"];
        let pats = ["", "a", "?", "*", "a*", "*a", "a*b", "?b", "*\\*", "b?", "a?c", "**"];
        for t in texts {
            let text: Vec<char> = t.chars().collect();
            for p in pats {
                let toks = compile_pattern(p).unwrap();
                for from in 0..=text.len() {
                    let mut b = u64::MAX;
                    assert_eq!(find_match(&toks, &text, from, &mut b).unwrap(), slow(&toks, &text, from), "{p:?} in {t:?} from {from}");
                }
            }
        }
    }
}
