//! The Dockerfile syntax layer, as BuildKit's `frontend/dockerfile/parser`: parser directives
//! (`# syntax=`, `# escape=`, `# check=`, only at the top), comments, line continuations
//! (with comment and blank lines inside), per-instruction argument forms (JSON exec form,
//! shell form, key=value lists, whitespace lists), builder flags (`--from=x`), and
//! here-documents on RUN, COPY and ADD (also inside ONBUILD). Every [`Node`] keeps the lines
//! it spans. Nothing is expanded here.

use crate::gocompat::is_space;
use crate::gocompat::quote;
use crate::shell::{Lexer, NoEnv, ShellError};

/// A syntax error with the 1-based line where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line (0 when the file is empty).
    pub line: usize,
    /// What was wrong and what was expected.
    pub message: String,
}

/// A here-document word that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeredocError {
    /// The delimiter word does not lex (an unclosed quote, a bad substitution).
    #[error(transparent)]
    Lex(#[from] ShellError),
    /// Lexing the delimiter with and without quotes gave different word counts.
    #[error("internal lexing of heredoc produced inconsistent results: {0}")]
    Inconsistent(String),
}

/// What is wrong with one instruction line; becomes a [`ParseError`] with the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum LineError {
    #[error("when using JSON array syntax, arrays must be comprised of strings only")]
    NotStringArray,
    /// ENV or LABEL in the legacy form with a key and no value.
    #[error("{0} must have two arguments")]
    TwoArguments(&'static str),
    /// A word of an ENV or LABEL `name=value` list without `=`.
    #[error("syntax error - can't find = in {}. Must be of the form: name=value", quote(.0))]
    MissingEquals(String),
    #[error("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")]
    OnbuildChain,
    #[error(transparent)]
    Heredoc(#[from] HeredocError),
}

fn perr(line: usize, message: impl Into<String>) -> ParseError {
    ParseError { line, message: message.into() }
}

/// A parser directive from the top of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// Lowercased name: `syntax`, `escape` or `check`.
    pub name: String,
    /// The value as written (trimmed).
    pub value: String,
    /// 1-based line.
    pub line: usize,
}

/// A here-document attached to an instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word with quotes removed (`EOF`).
    pub name: String,
    /// File descriptor prefix (`3<<EOF`), 0 when absent.
    pub fd: u32,
    /// Whether the content is subject to variable expansion (delimiter not quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from the content.
    pub chomp: bool,
    /// The raw content, every line with its line ending, without the terminator line.
    pub content: String,
}

impl Heredoc {
    /// The content with leading tabs removed from every line when `chomp` is set.
    pub fn chomped_content(&self) -> String {
        if self.chomp {
            chomp_heredoc_content(&self.content)
        } else {
            self.content.clone()
        }
    }
}

/// Remove leading tabs from every line (`<<-`).
pub fn chomp_heredoc_content(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.split_inclusive('\n') {
        out.push_str(line.trim_start_matches('\t'));
    }
    out
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// First line (1-based).
    pub start_line: usize,
    /// Last line, including continuation and here-document lines.
    pub end_line: usize,
    /// The instruction keyword as written (`RUN`, `run`).
    pub cmd: String,
    /// Builder flags as written after quote removal (`--from=builder`).
    pub flags: Vec<String>,
    /// Arguments in BuildKit's flattened form: words, JSON items, `key value sep` triples
    /// for ENV/LABEL, `[type, cmd...]` for HEALTHCHECK, `[cmd, args...]` for ONBUILD.
    pub args: Vec<String>,
    /// The arguments were a JSON array (exec form).
    pub json: bool,
    /// The logical line: continuations joined, comment lines dropped.
    pub original: String,
    /// Here-documents, in the order their bodies follow the instruction.
    pub heredocs: Vec<Heredoc>,
    /// For ONBUILD: the trigger instruction.
    pub sub: Option<Box<Node>>,
    /// Comment lines directly above the instruction.
    pub comments: Vec<String>,
}

impl Node {
    /// The lowercased keyword.
    pub fn keyword(&self) -> String {
        self.cmd.to_ascii_lowercase()
    }
}

/// A non-fatal finding of the parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// 1-based line.
    pub line: usize,
    /// What was found.
    pub message: String,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// Parser directives in the order written.
    pub directives: Vec<Directive>,
    /// The escape character in effect (`\` or `` ` ``).
    pub escape: char,
    /// The instructions.
    pub nodes: Vec<Node>,
    /// Empty continuation lines and similar findings.
    pub warnings: Vec<Warning>,
}

impl Dockerfile {
    /// The value of a directive (`syntax`, `escape`, `check`), if present.
    pub fn directive(&self, name: &str) -> Option<&str> {
        self.directives.iter().find(|d| d.name == name).map(|d| d.value.as_str())
    }
}

const KNOWN_DIRECTIVES: [&str; 3] = ["syntax", "escape", "check"];

struct Directives {
    escape: char,
    done: bool,
    seen: Vec<String>,
    found: Vec<Directive>,
}

impl Directives {
    /// BuildKit's `DirectiveParser.ParseLine` on an already newline-trimmed line.
    fn parse_line(&mut self, line: &str, lineno: usize) -> Result<bool, ParseError> {
        if self.done {
            return Ok(false);
        }
        let Some(rest) = line.strip_prefix('#') else {
            self.done = true;
            return Ok(false);
        };
        let rest = rest.trim_start_matches(is_space);
        // ^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$
        let name_len =
            rest.char_indices().take_while(|(i, c)| if *i == 0 { c.is_ascii_alphabetic() } else { c.is_ascii_alphanumeric() }).count();
        if name_len == 0 {
            self.done = true;
            return Ok(false);
        }
        let name = &rest[..name_len];
        let after = rest[name_len..].trim_start_matches(|c: char| c.is_ascii_whitespace());
        let Some(value) = after.strip_prefix('=') else {
            self.done = true;
            return Ok(false);
        };
        let value = value.trim_matches(|c: char| c.is_ascii_whitespace());
        if value.is_empty() {
            self.done = true;
            return Ok(false);
        }
        let key = name.to_ascii_lowercase();
        if !KNOWN_DIRECTIVES.contains(&key.as_str()) {
            self.done = true;
            return Ok(false);
        }
        if self.seen.contains(&key) {
            return Err(perr(lineno, format!("only one {key} parser directive can be used")));
        }
        self.seen.push(key.clone());
        if key == "escape" {
            match value {
                "\\" => self.escape = '\\',
                "`" => self.escape = '`',
                other => {
                    return Err(perr(lineno, format!("invalid escape token '{other}' does not match ` or \\")));
                }
            }
        }
        self.found.push(Directive { name: key, value: value.to_string(), line: lineno });
        Ok(true)
    }

    /// Strip a line-continuation escape: `(...[^e])e[ \t]*$` or `^e[ \t]*$`.
    /// Returns the line without it and whether the logical line ends here.
    fn trim_continuation<'a>(&self, line: &'a str) -> (&'a str, bool) {
        let t = line.trim_end_matches([' ', '\t']);
        if let Some(before) = t.strip_suffix(self.escape) {
            if before.is_empty() || !before.ends_with(self.escape) {
                return (before, false);
            }
        }
        (line, true)
    }
}

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn is_comment(line: &str) -> bool {
    line.trim_start_matches(is_space).starts_with('#')
}

/// Parse a Dockerfile. Malformed input gives an error naming the line; it never panics.
/// No limits apply: a builder parses untrusted bytes with [`crate::limits::parse_bytes`].
pub fn parse(input: &str) -> Result<Dockerfile, ParseError> {
    parse_limited(input, usize::MAX)
}

/// [`parse`], failing at the first instruction past `max_instructions` (named by its line).
pub fn parse_limited(input: &str, max_instructions: usize) -> Result<Dockerfile, ParseError> {
    let input = input.strip_prefix('\u{feff}').unwrap_or(input);
    let lines: Vec<&str> = input.split_inclusive('\n').collect();
    let mut d = Directives { escape: '\\', done: false, seen: Vec::new(), found: Vec::new() };
    let mut nodes = Vec::new();
    let mut warnings = Vec::new();
    let mut comments: Vec<String> = Vec::new();
    let mut i = 0usize; // index of the next line to read
    while i < lines.len() {
        let raw = lines[i];
        i += 1;
        let lineno = i;
        let trimmed = trim_newline(raw).trim_start_matches(is_space);
        if is_comment(raw) {
            let c = raw.trim_start_matches(is_space);
            let c = trim_newline(&c[1..]).trim_matches(is_space);
            if c.is_empty() {
                comments.clear();
            } else {
                comments.push(c.to_string());
            }
        }
        if d.parse_line(trimmed, lineno)? {
            comments.pop();
        }
        let processed = if is_comment(trimmed) { "" } else { trimmed };
        let start_line = lineno;
        let (first, mut end) = d.trim_continuation(processed);
        if end && first.is_empty() {
            continue;
        }
        let mut line = first.to_string();
        let mut has_empty = false;
        while !end && i < lines.len() {
            let raw = lines[i];
            i += 1;
            let t = trim_newline(raw);
            d.parse_line(t, i)?;
            if is_comment(raw) {
                continue;
            }
            if t.trim_start_matches(is_space).is_empty() {
                has_empty = true;
                continue;
            }
            let (part, e) = d.trim_continuation(t);
            line.push_str(part);
            end = e;
        }
        if line.trim_matches(is_space).is_empty() {
            // only continuation escapes up to the end of the file: nothing to parse
            continue;
        }
        if has_empty {
            warnings.push(Warning { line: i, message: format!("empty continuation line found in: {line}") });
        }
        if nodes.len() >= max_instructions {
            return Err(perr(
                start_line,
                format!(
                    "the Dockerfile has more than {max_instructions} instructions, more than the builder accepts (hoist serve --max-instructions): expected fewer instructions"
                ),
            ));
        }
        let mut node = node_from_line(&line, &d, std::mem::take(&mut comments)).map_err(|e| perr(start_line, e.to_string()))?;
        if can_contain_heredoc(&node) && line.contains("<<") {
            let docs = heredocs_from_line(&line).map_err(|e| perr(start_line, e.to_string()))?;
            for mut doc in docs {
                let mut terminated = false;
                while i < lines.len() {
                    let raw = lines[i];
                    i += 1;
                    let mut cand = trim_newline(raw);
                    if doc.chomp {
                        cand = cand.trim_start_matches('\t');
                    }
                    if cand == doc.name {
                        terminated = true;
                        break;
                    }
                    doc.content.push_str(raw);
                }
                if !terminated {
                    return Err(perr(start_line, format!("unterminated heredoc: expected a line {:?} to end the here-document", doc.name)));
                }
                node.heredocs.push(doc);
            }
        }
        node.start_line = start_line;
        node.end_line = i;
        if let Some(sub) = node.sub.as_mut() {
            sub.start_line = start_line;
            sub.end_line = i;
            sub.heredocs = node.heredocs.clone();
        }
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(perr(lines.len(), "file with no instructions"));
    }
    Ok(Dockerfile { directives: d.found, escape: d.escape, nodes, warnings })
}

fn can_contain_heredoc(node: &Node) -> bool {
    let n = match (&node.sub, node.keyword().as_str()) {
        (Some(sub), "onbuild") => sub.as_ref(),
        _ => node,
    };
    matches!(n.keyword().as_str(), "run" | "copy" | "add") && !n.json
}

/// Find the here-documents named on an instruction line.
fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, HeredocError> {
    let mut lex = Lexer::new('\\');
    lex.raw_quotes = true;
    lex.raw_escapes = true;
    lex.skip_unset_env = true;
    let words = lex.process_words(line, &NoEnv).unwrap_or_default();
    let mut docs = Vec::new();
    for w in words {
        if let Some(h) = parse_heredoc(&w)? {
            docs.push(h);
        }
    }
    Ok(docs)
}

/// Recognise a here-document word (`<<EOF`, `<<-EOF`, `<<'EOF'`, `3<<EOF`), as BuildKit's
/// `ParseHeredoc`: `Ok(None)` when the word is not one.
pub fn parse_heredoc(word: &str) -> Result<Option<Heredoc>, HeredocError> {
    let digits = word.chars().take_while(|c| c.is_ascii_digit()).count();
    let Some(rest) = word[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    if rest.is_empty() || rest.contains('<') {
        return Ok(None);
    }
    let fd = if digits == 0 { 0 } else { word[..digits].parse::<u32>().unwrap_or(u32::MAX) };
    let mut lex = Lexer::new('\\');
    lex.skip_unset_env = true;
    let plain = lex.process_words(rest, &NoEnv)?;
    if plain.len() != 1 {
        return Ok(None);
    }
    lex.raw_quotes = true;
    let raw = lex.process_words(rest, &NoEnv)?;
    if raw.len() != plain.len() {
        return Err(HeredocError::Inconsistent(rest.to_string()));
    }
    let count = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    let expand = count(&plain[0]) == count(&raw[0]);
    Ok(Some(Heredoc { name: plain[0].clone(), fd, expand, chomp, content: String::new() }))
}

/// Split `INSTRUCTION [--flags] args` and parse the arguments the way the instruction wants.
fn node_from_line(line: &str, d: &Directives, comments: Vec<String>) -> Result<Node, LineError> {
    let trimmed = line.trim_matches(is_space);
    let (cmd, rest) = match trimmed.find(['\t', '\u{b}', '\u{c}', '\r', ' ']) {
        Some(p) => (&trimmed[..p], trimmed[p..].trim_start_matches(['\t', '\u{b}', '\u{c}', '\r', ' '])),
        None => (trimmed, ""),
    };
    let (args_str, flags) = extract_builder_flags(rest);
    let args_str = args_str.trim_matches(is_space);
    let mut node = Node {
        start_line: 0,
        end_line: 0,
        cmd: cmd.to_string(),
        flags,
        args: Vec::new(),
        json: false,
        original: line.to_string(),
        heredocs: Vec::new(),
        sub: None,
        comments,
    };
    match node.keyword().as_str() {
        "add" | "copy" | "volume" => {
            let (args, json) = parse_maybe_json_to_list(args_str)?;
            node.args = args;
            node.json = json;
        }
        "arg" => node.args = parse_words(args_str, d.escape),
        "cmd" | "entrypoint" | "run" | "shell" => {
            let (args, json) = parse_maybe_json(args_str)?;
            node.args = args;
            node.json = json;
        }
        "env" => node.args = parse_name_val(args_str, "ENV", d.escape)?,
        "label" => node.args = parse_name_val(args_str, "LABEL", d.escape)?,
        "expose" | "from" => node.args = split_whitespace(args_str),
        "healthcheck" => {
            let sep = args_str.find(is_space).unwrap_or(args_str.len());
            if sep > 0 {
                let typ = &args_str[..sep];
                let rest = args_str[sep..].trim_start_matches(is_space);
                let (args, json) = parse_maybe_json(rest)?;
                node.args.push(typ.to_string());
                node.args.extend(args);
                node.json = json;
            }
        }
        "maintainer" | "stopsignal" | "user" | "workdir" if !args_str.is_empty() => {
            node.args = vec![args_str.to_string()];
        }
        "onbuild" if !args_str.is_empty() => {
            // Refused before recursing: `ONBUILD ONBUILD ONBUILD ...` must not nest deeply.
            let first = args_str.split(is_space).next().unwrap_or("");
            if first.eq_ignore_ascii_case("onbuild") {
                return Err(LineError::OnbuildChain);
            }
            let sub = node_from_line(args_str, d, Vec::new())?;
            node.args.push(sub.cmd.clone());
            node.args.extend(sub.args.iter().cloned());
            node.json = sub.json;
            node.sub = Some(Box::new(sub));
        }
        _ => {}
    }
    Ok(node)
}

/// `[\t\v\f\r ]+`-separated words (BuildKit's `reWhitespace.Split`).
fn split_whitespace(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    s.split(['\t', '\u{b}', '\u{c}', '\r', ' ']).filter(|w| !w.is_empty()).map(str::to_string).collect()
}

/// `Ok(Some)` for a JSON array of strings, `Ok(None)` when not JSON, `Err` for a JSON array
/// with non-string items.
fn parse_json(rest: &str) -> Result<Option<Vec<String>>, LineError> {
    let rest = rest.trim_start_matches(is_space);
    if !rest.starts_with('[') {
        return Ok(None);
    }
    match serde_json::from_str::<Vec<serde_json::Value>>(rest) {
        Ok(items) => {
            let mut out = Vec::with_capacity(items.len());
            for it in items {
                match it {
                    serde_json::Value::String(s) => out.push(s),
                    _ => return Err(LineError::NotStringArray),
                }
            }
            Ok(Some(out))
        }
        Err(_) => Ok(None),
    }
}

fn parse_maybe_json(rest: &str) -> Result<(Vec<String>, bool), LineError> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    match parse_json(rest)? {
        Some(v) => Ok((v, true)),
        None => Ok((vec![rest.to_string()], false)),
    }
}

fn parse_maybe_json_to_list(rest: &str) -> Result<(Vec<String>, bool), LineError> {
    match parse_json(rest)? {
        Some(v) => Ok((v, true)),
        None => Ok((split_whitespace(rest), false)),
    }
}

/// Split words keeping quotes (BuildKit's `parseWords`), for ARG, ENV and LABEL.
pub fn parse_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut pos = 0;
    while pos <= chars.len() {
        let at_end = pos == chars.len();
        let mut ch = if at_end { '\0' } else { chars[pos] };
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if is_space(ch) {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if at_end {
            if blank_ok || !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            break;
        }
        if phase == Phase::Word {
            if is_space(ch) {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if pos + 1 == chars.len() {
                    pos += 1;
                    continue;
                }
                word.push(ch);
                pos += 1;
                ch = chars[pos];
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // in quote
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if pos + 1 == chars.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            word.push(ch);
            ch = chars[pos];
        }
        word.push(ch);
        pos += 1;
    }
    words
}

/// ENV/LABEL arguments as `key, value, sep` triples; `sep` is "" for the legacy `KEY value`.
fn parse_name_val(rest: &str, key: &'static str, escape: char) -> Result<Vec<String>, LineError> {
    let words = parse_words(rest, escape);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    if !words[0].contains('=') {
        let p = rest.find(['\t', '\u{b}', '\u{c}', '\r', ' ']);
        let Some(p) = p else {
            return Err(LineError::TwoArguments(key));
        };
        let name = &rest[..p];
        let value = rest[p..].trim_start_matches(['\t', '\u{b}', '\u{c}', '\r', ' ']);
        return Ok(vec![name.to_string(), value.to_string(), String::new()]);
    }
    let mut out = Vec::with_capacity(words.len() * 3);
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(LineError::MissingEquals(w));
        };
        out.push(k.to_string());
        out.push(v.to_string());
        out.push("=".to_string());
    }
    Ok(out)
}

/// Split leading `--flag[=value]` words off an argument string (BuildKit's
/// `extractBuilderFlags`): returns the remaining text and the flags (quotes removed).
pub fn extract_builder_flags(line: &str) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = line.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut pos = 0;
    let rest_from = |p: usize| chars[p..].iter().collect::<String>();
    while pos <= chars.len() {
        let at_end = pos == chars.len();
        let mut ch = if at_end { '\0' } else { chars[pos] };
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if is_space(ch) {
                pos += 1;
                continue;
            }
            if ch != '-' || pos + 1 == chars.len() || chars[pos + 1] != '-' {
                return (rest_from(pos), words);
            }
            phase = Phase::Word;
        }
        if at_end {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push(word);
            }
            break;
        }
        if phase == Phase::Word {
            if is_space(ch) {
                phase = Phase::Spaces;
                if word == "--" {
                    return (rest_from(pos), words);
                }
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
            if ch == '\\' {
                if pos + 1 == chars.len() {
                    pos += 1;
                    continue;
                }
                pos += 1;
                ch = chars[pos];
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        if ch == quote {
            phase = Phase::Word;
            pos += 1;
            continue;
        }
        if ch == '\\' {
            if pos + 1 == chars.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            ch = chars[pos];
        }
        word.push(ch);
        pos += 1;
    }
    (String::new(), words)
}

#[cfg(test)]
mod tests;
