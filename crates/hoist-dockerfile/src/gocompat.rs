//! Small re-implementations of Go standard-library behaviour that BuildKit's Dockerfile
//! frontend relies on and whose exact output is visible to users: `strconv.Quote` and the
//! `%q` verb (image history strings), `time.ParseDuration` / `Duration.String`
//! (HEALTHCHECK), `path.Clean` / `path.Join`, `strconv.ParseBool`, `strconv.ParseUint`,
//! and `unicode.IsSpace`.

use std::fmt::Write as _;

/// `unicode.IsSpace`: Latin-1 spaces plus the Unicode White_Space property.
pub fn is_space(c: char) -> bool {
    c.is_whitespace()
}

/// Go's `unicode.IsPrint` approximated: graphic characters and the ASCII space.
fn is_print(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    !(c.is_control()
        || c.is_whitespace()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}'
        ))
}

fn push_escaped(out: &mut String, c: char, quote: char) {
    match c {
        '\u{7}' => out.push_str("\\a"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{b}' => out.push_str("\\v"),
        '\\' => out.push_str("\\\\"),
        c if c == quote => {
            out.push('\\');
            out.push(c);
        }
        c if is_print(c) => out.push(c),
        c if (c as u32) < 0x80 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if (c as u32) < 0x10000 => {
            let _ = write!(out, "\\u{:04x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\U{:08x}", c as u32);
        }
    }
}

/// `strconv.Quote`: a double-quoted Go string literal.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        push_escaped(&mut out, c, '"');
    }
    out.push('"');
    out
}

/// `fmt.Sprintf("%q", []string{...})`: `["a" "b"]`.
pub fn quote_slice(items: &[String]) -> String {
    let mut out = String::from("[");
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&quote(s));
    }
    out.push(']');
    out
}

/// `fmt.Sprintf("%v", []string{...})`: `[a b]`.
pub fn plain_slice(items: &[String]) -> String {
    format!("[{}]", items.join(" "))
}

/// `fmt.Sprintf("%q", n)` for an integer: a single-quoted character literal (`'\x03'`).
pub fn quote_rune(n: i64) -> String {
    let c = u32::try_from(n).ok().and_then(char::from_u32).unwrap_or('\u{fffd}');
    let mut out = String::from("'");
    push_escaped(&mut out, c, '\'');
    out.push('\'');
    out
}

/// Error of [`parse_duration`], worded like Go's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("time: {0}")]
pub struct DurationError(pub String);

/// `time.ParseDuration`: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+` in nanoseconds.
pub fn parse_duration(s: &str) -> Result<i64, DurationError> {
    let err = || DurationError(format!("invalid duration {}", quote(s)));
    let orig = s;
    let mut s = s;
    let mut neg = false;
    if let Some(r) = s.strip_prefix('-') {
        neg = true;
        s = r;
    } else if let Some(r) = s.strip_prefix('+') {
        s = r;
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(err());
    }
    let mut total: u128 = 0;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let mut int_part: u128 = 0;
        while i < b.len() && b[i].is_ascii_digit() {
            int_part = int_part.checked_mul(10).and_then(|v| v.checked_add(u128::from(b[i] - b'0'))).ok_or_else(err)?;
            if int_part > (1u128 << 63) {
                return Err(err());
            }
            i += 1;
        }
        let had_int = i > start;
        let mut frac: u128 = 0;
        let mut scale: u128 = 1;
        let mut had_frac = false;
        if i < b.len() && b[i] == b'.' {
            i += 1;
            let fs = i;
            while i < b.len() && b[i].is_ascii_digit() {
                if scale < 1_000_000_000_000_000_000 {
                    frac = frac * 10 + u128::from(b[i] - b'0');
                    scale *= 10;
                }
                i += 1;
            }
            had_frac = i > fs;
        }
        if !had_int && !had_frac {
            return Err(err());
        }
        let us = i;
        while i < b.len() && b[i] != b'.' && !b[i].is_ascii_digit() {
            i += 1;
        }
        let unit = &s[us..i];
        let mult: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            "" => return Err(DurationError(format!("missing unit in duration {}", quote(orig)))),
            _ => return Err(DurationError(format!("unknown unit {} in duration {}", quote(unit), quote(orig)))),
        };
        let v = int_part.checked_mul(mult).ok_or_else(err)? + frac * mult / scale;
        total = total.checked_add(v).ok_or_else(err)?;
        if total > (1u128 << 63) {
            return Err(err());
        }
    }
    if !neg && total > i64::MAX as u128 {
        return Err(err());
    }
    let t = total as i128;
    Ok(if neg { (-t) as i64 } else { t as i64 })
}

/// `time.Duration.String`: `1h2m3.5s`, `500ms`, `1.5µs`, `0s`.
pub fn format_duration(d: i64) -> String {
    if d == 0 {
        return "0s".into();
    }
    let neg = d < 0;
    let u = d.unsigned_abs();
    let mut out = String::new();
    if u < 1_000_000_000 {
        // sub-second: ns, µs or ms with fraction
        let (unit, prec) = if u < 1_000 {
            ("ns", 0)
        } else if u < 1_000_000 {
            ("\u{b5}s", 3)
        } else {
            ("ms", 6)
        };
        out.push_str(&fmt_frac(u, prec));
        out.push_str(unit);
    } else {
        let secs_total = u / 1_000_000_000;
        let nanos = u % 1_000_000_000;
        let h = secs_total / 3600;
        let m = (secs_total % 3600) / 60;
        let s = secs_total % 60;
        if h > 0 {
            let _ = write!(out, "{h}h");
        }
        if h > 0 || m > 0 {
            let _ = write!(out, "{m}m");
        }
        out.push_str(&fmt_frac(s * 1_000_000_000 + nanos, 9));
        out.push('s');
    }
    if neg {
        out.insert(0, '-');
    }
    out
}

/// `v / 10^prec` printed with the fractional part's trailing zeros removed.
fn fmt_frac(v: u64, prec: u32) -> String {
    if prec == 0 {
        return v.to_string();
    }
    let p = 10u64.pow(prec);
    let int = v / p;
    let frac = v % p;
    if frac == 0 {
        return int.to_string();
    }
    let mut f = format!("{:0width$}", frac, width = prec as usize);
    while f.ends_with('0') {
        f.pop();
    }
    format!("{int}.{f}")
}

/// `strconv.ParseBool`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `strconv.ParseUint(s, base, bits)` for an explicit base (no sign, no underscores).
pub fn parse_uint(s: &str, base: u32, bits: u32) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for c in s.chars() {
        let d = u64::from(c.to_digit(base)?);
        n = n.checked_mul(u64::from(base))?.checked_add(d)?;
    }
    if bits < 64 && n >> bits != 0 {
        return None;
    }
    Some(n)
}

/// `path.Clean`: lexical cleaning of a slash-separated path.
pub fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            s => parts.push(s),
        }
    }
    let joined = parts.join("/");
    if rooted {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

/// `path.Join`: join non-empty elements with `/` and clean; all empty gives "".
pub fn join_path(parts: &[&str]) -> String {
    let nonempty: Vec<&str> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    if nonempty.is_empty() {
        return String::new();
    }
    clean_path(&nonempty.join("/"))
}

/// `path.Base`.
pub fn base_path(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        return "/".into();
    }
    match t.rfind('/') {
        Some(i) => t[i + 1..].to_string(),
        None => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_matches_go() {
        let cases = [
            ("abc", r#""abc""#),
            ("a\"b", r#""a\"b""#),
            ("a\\b", r#""a\\b""#),
            ("tab\there", r#""tab\there""#),
            ("nl\n", r#""nl\n""#),
            ("\u{1b}[0m", r#""\x1b[0m""#),
            ("héllo", r#""héllo""#),
            ("\u{a0}", r#""\u00a0""#),
            ("", r#""""#),
        ];
        for (input, want) in cases {
            assert_eq!(quote(input), want, "quote({input:?})");
        }
    }

    #[test]
    fn quote_rune_matches_go_percent_q_on_ints() {
        assert_eq!(quote_rune(0), r"'\x00'");
        assert_eq!(quote_rune(3), r"'\x03'");
        assert_eq!(quote_rune(10), r"'\n'");
        assert_eq!(quote_rune(65), "'A'");
        assert_eq!(quote_rune(39), r"'\''");
        assert_eq!(quote_rune(-1), "'\u{fffd}'");
    }

    #[test]
    fn slices_format_like_go() {
        let v = vec!["/bin/sh".to_string(), "-c".to_string(), "echo \"hi\"".to_string()];
        assert_eq!(quote_slice(&v), r#"["/bin/sh" "-c" "echo \"hi\""]"#);
        assert_eq!(plain_slice(&v), r#"[/bin/sh -c echo "hi"]"#);
        assert_eq!(quote_slice(&[]), "[]");
    }

    #[test]
    fn durations_parse_like_go() {
        let ok = [
            ("0", 0),
            ("1s", 1_000_000_000),
            ("1.5s", 1_500_000_000),
            ("300ms", 300_000_000),
            ("2us", 2_000),
            ("2\u{b5}s", 2_000),
            ("10ns", 10),
            ("1h30m", 5_400_000_000_000),
            ("-1m", -60_000_000_000),
            (".5s", 500_000_000),
            ("1.s", 1_000_000_000),
            ("+5s", 5_000_000_000),
        ];
        for (s, want) in ok {
            assert_eq!(parse_duration(s), Ok(want), "parse_duration({s:?})");
        }
        for bad in ["", "1", "s", ".s", "1x", "1s2", "--1s", "9999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn durations_format_like_go() {
        let cases = [
            (0, "0s"),
            (1, "1ns"),
            (1_500, "1.5\u{b5}s"),
            (300_000_000, "300ms"),
            (1_000_000_000, "1s"),
            (1_500_000_000, "1.5s"),
            (90_000_000_000, "1m30s"),
            (3_600_000_000_000, "1h0m0s"),
            (5_400_000_000_000, "1h30m0s"),
            (-2_000_000_000, "-2s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_duration(d), want, "format_duration({d})");
        }
    }

    #[test]
    fn parse_bool_and_uint_follow_strconv() {
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("yes"), None);
        assert_eq!(parse_uint("0755", 8, 32), Some(0o755));
        assert_eq!(parse_uint("8", 8, 32), None);
        assert_eq!(parse_uint("-1", 10, 32), None);
        assert_eq!(parse_uint("4294967296", 10, 32), None);
        assert_eq!(parse_uint("4294967295", 10, 32), Some(4_294_967_295));
    }

    #[test]
    fn paths_clean_and_join_like_go() {
        let cases = [
            ("", "."),
            ("/", "/"),
            ("a/b/../c", "a/c"),
            ("/../a", "/a"),
            ("../a", "../a"),
            ("a//b/./c/", "a/b/c"),
            ("./", "."),
            ("a/..", "."),
            ("/a/b/..", "/a"),
        ];
        for (p, want) in cases {
            assert_eq!(clean_path(p), want, "clean({p:?})");
        }
        assert_eq!(join_path(&["/", "app", "src"]), "/app/src");
        assert_eq!(join_path(&["/app", "../x"]), "/x");
        assert_eq!(join_path(&["", ""]), "");
        assert_eq!(base_path("/a/b/"), "b");
        assert_eq!(base_path("/"), "/");
        assert_eq!(base_path(""), ".");
    }
}
