//! Limits on a Dockerfile a builder accepts, and the checks of raw bytes that come before
//! parsing: size, NUL bytes, UTF-8, line length and instruction count. A shared builder runs
//! Dockerfiles it must not trust; each check fails at once with an error naming the line and
//! what was expected, so no input makes the parser (or anything after it) work for long.

use crate::parser::{parse_limited, Dockerfile, ParseError};

/// Default [`Limits::max_bytes`]: 2 MiB (real Dockerfiles are a few KiB).
pub const DEFAULT_MAX_BYTES: usize = 2 << 20;
/// Default [`Limits::max_line_bytes`]: 256 KiB (Linux refuses a single argument over
/// 128 KiB, so no RUN line longer than that can run anyway).
pub const DEFAULT_MAX_LINE_BYTES: usize = 256 << 10;
/// Default [`Limits::max_instructions`].
pub const DEFAULT_MAX_INSTRUCTIONS: usize = 4096;
/// Default [`Limits::max_expansion_bytes`]: 1 MiB.
pub const DEFAULT_MAX_EXPANSION_BYTES: usize = 1 << 20;

/// What a builder accepts of one Dockerfile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest Dockerfile, in bytes.
    pub max_bytes: usize,
    /// Longest physical line, in bytes (without its line ending).
    pub max_line_bytes: usize,
    /// Most instructions (all stages together, ONBUILD counted once).
    pub max_instructions: usize,
    /// Most bytes variable expansion may add to one word (`ENV A=$A$A` doubling), and the
    /// largest environment (ENV and ARG values together) of one stage.
    pub max_expansion_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: DEFAULT_MAX_BYTES,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_instructions: DEFAULT_MAX_INSTRUCTIONS,
            max_expansion_bytes: DEFAULT_MAX_EXPANSION_BYTES,
        }
    }
}

impl Limits {
    /// No limits (for tools that parse trusted files).
    pub fn unlimited() -> Limits {
        Limits { max_bytes: usize::MAX, max_line_bytes: usize::MAX, max_instructions: usize::MAX, max_expansion_bytes: usize::MAX }
    }
}

fn perr(line: usize, message: String) -> ParseError {
    ParseError { line, message }
}

/// 1-based line and column (in bytes) of byte offset `at`.
fn position(bytes: &[u8], at: usize) -> (usize, usize) {
    let before = &bytes[..at.min(bytes.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let col = match before.iter().rposition(|b| *b == b'\n') {
        Some(nl) => at - nl,
        None => at + 1,
    };
    (line, col)
}

/// Check raw Dockerfile bytes against `limits` and return them as text: not larger than
/// `max_bytes`, no NUL byte, valid UTF-8, no line longer than `max_line_bytes`. Errors name
/// the (first offending) line.
pub fn check_text<'a>(bytes: &'a [u8], limits: &Limits) -> Result<&'a str, ParseError> {
    if bytes.len() > limits.max_bytes {
        let (line, _) = position(bytes, limits.max_bytes);
        return Err(perr(
            line,
            format!(
                "the Dockerfile is {} bytes, more than the builder accepts ({} bytes; hoist serve --max-dockerfile-bytes): expected a smaller file",
                bytes.len(),
                limits.max_bytes
            ),
        ));
    }
    if let Some(at) = bytes.iter().position(|b| *b == 0) {
        let (line, col) = position(bytes, at);
        return Err(perr(
            line,
            format!("NUL byte at column {col}: expected text (a Dockerfile cannot contain NUL bytes; is this a binary file?)"),
        ));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.valid_up_to();
            let (line, col) = position(bytes, at);
            return Err(perr(line, format!("invalid UTF-8 at column {col} (byte 0x{:02x}): expected UTF-8 text", bytes[at])));
        }
    };
    if limits.max_line_bytes < usize::MAX {
        for (i, line) in text.split('\n').enumerate() {
            let len = line.strip_suffix('\r').unwrap_or(line).len();
            if len > limits.max_line_bytes {
                return Err(perr(
                    i + 1,
                    format!(
                        "line is {len} bytes long, more than the builder accepts ({} bytes; hoist serve --max-dockerfile-line): expected a shorter line (continue it with \\)",
                        limits.max_line_bytes
                    ),
                ));
            }
        }
    }
    Ok(text)
}

/// Parse raw Dockerfile bytes within `limits`: [`check_text`], then the parser, which stops
/// at the first instruction over `max_instructions`.
pub fn parse_bytes(bytes: &[u8], limits: &Limits) -> Result<Dockerfile, ParseError> {
    let text = check_text(bytes, limits)?;
    parse_limited(text, limits.max_instructions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Limits {
        Limits { max_bytes: 1000, max_line_bytes: 40, max_instructions: 5, max_expansion_bytes: 100 }
    }

    #[test]
    fn a_nul_byte_names_its_line_and_column() {
        let e = parse_bytes(b"FROM scratch\nRUN a\0b\n", &Limits::default()).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("NUL byte at column 6"), "{}", e.message);
    }

    #[test]
    fn invalid_utf8_names_its_line_and_byte() {
        let e = parse_bytes(b"FROM scratch\n\nLABEL a=\xff\xfe\n", &Limits::default()).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("invalid UTF-8 at column 9 (byte 0xff)"), "{}", e.message);
        // a truncated multi-byte sequence at the very end
        let e = parse_bytes(b"FROM scratch\nRUN \xe2\x82", &Limits::default()).unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    fn an_overlong_line_names_its_line() {
        let df = format!("FROM scratch\nRUN true\nRUN {}\n", "x".repeat(50));
        let e = parse_bytes(df.as_bytes(), &small()).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("54 bytes long") && e.message.contains("(40 bytes"), "{}", e.message);
        // exactly at the limit is fine; CRLF endings do not count
        let df = format!("FROM scratch\r\nRUN {}\r\n", "x".repeat(36));
        parse_bytes(df.as_bytes(), &small()).unwrap();
    }

    #[test]
    fn an_oversized_file_names_the_line_where_it_crosses_the_limit() {
        let df = "FROM scratch\n".repeat(100);
        let e = parse_bytes(df.as_bytes(), &small()).unwrap_err();
        assert_eq!(e.line, 1000 / 13 + 1);
        assert!(e.message.contains("1300 bytes"), "{}", e.message);
    }

    #[test]
    fn too_many_instructions_stop_the_parser_at_the_first_one_over() {
        let df = "FROM scratch\n".to_string() + &"ENV A=1\n".repeat(10);
        let e = parse_bytes(df.as_bytes(), &small()).unwrap_err();
        assert_eq!(e.line, 6);
        assert!(e.message.contains("more than 5 instructions"), "{}", e.message);
        let ok = "FROM scratch\n".to_string() + &"# comment\n\nENV A=1\n".repeat(4);
        assert_eq!(parse_bytes(ok.as_bytes(), &small()).unwrap().nodes.len(), 5);
    }

    #[test]
    fn ten_thousand_instructions_parse_in_well_under_a_second() {
        let df = "FROM scratch\n".to_string() + &"ENV A=1\n".repeat(10_000);
        let t = std::time::Instant::now();
        let d = parse_bytes(df.as_bytes(), &Limits::unlimited()).unwrap();
        assert_eq!(d.nodes.len(), 10_001);
        assert!(t.elapsed().as_secs_f64() < 1.0, "{:?}", t.elapsed());
    }
}
