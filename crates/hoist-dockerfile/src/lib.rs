//! hoist-dockerfile: the Dockerfile language, with BuildKit's Dockerfile frontend as the
//! reference for every behaviour. Pure code, no I/O, fuzzed:
//!
//! - [`checks`]: BuildKit's Dockerfile checks (`--check`, `# check=skip=...`);
//! - [`parser`]: directives, comments, continuations, argument forms, flags, here-documents,
//!   with the lines of every instruction;
//! - [`instructions`]: typed instructions and stages, flag values, `RUN --mount` parsing;
//! - [`shell`]: variable expansion and word splitting (BuildKit's shell lexer);
//! - [`limits`]: size, NUL, UTF-8, line-length and instruction-count checks of raw bytes;
//! - [`print`](mod@print): printing a parsed Dockerfile back to text;
//! - [`ignore`]: the `.dockerignore` matcher (moby's pattern matcher);
//! - [`gocompat`]: Go formatting and parsing helpers whose output users see.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod checks;
pub mod gocompat;
pub mod ignore;
pub mod instructions;
pub mod limits;
pub mod parser;
pub mod print;
pub mod shell;

pub use ignore::{ignore_file_candidates, IgnoreError, IgnoreMatcher};
pub use instructions::{parse_stages, Instr, Instruction, InstructionError, Stage, Stages};
pub use limits::{parse_bytes, Limits};
pub use parser::{parse, Dockerfile, Heredoc, Node, ParseError};
pub use shell::{Env, Lexer, ShellError};

/// Parse a Dockerfile and group its instructions into stages.
pub fn parse_dockerfile(text: &str) -> Result<(Dockerfile, Stages), DockerfileError> {
    let df = parse(text)?;
    let stages = parse_stages(&df)?;
    Ok((df, stages))
}

/// Either kind of syntax error, with its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerfileError {
    /// A syntax error: directives, continuations, argument forms, here-documents.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// An instruction whose arguments or flags are invalid, or one before the first FROM.
    #[error(transparent)]
    Instruction(#[from] InstructionError),
}

impl DockerfileError {
    /// 1-based line of the error.
    pub fn line(&self) -> usize {
        match self {
            DockerfileError::Parse(e) => e.line,
            DockerfileError::Instruction(e) => e.line,
        }
    }

    /// The message without the line.
    pub fn message(&self) -> &str {
        match self {
            DockerfileError::Parse(e) => &e.message,
            DockerfileError::Instruction(e) => &e.message,
        }
    }
}
