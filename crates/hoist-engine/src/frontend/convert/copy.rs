//! COPY and ADD: sources from the context, a stage or an image (`--from`), URLs and git
//! repositories (ADD only), heredoc files, `--checksum`, `--chmod`, `--chown`, the
//! destination relative to the working directory, and the history entry.

use std::collections::HashMap;

use hoist_dockerfile::gocompat::{clean_path, join_path, quote};
use hoist_dockerfile::instructions::{self as ins, ChmodSpec, CopyInstr};
use hoist_dockerfile::shell::Lexer;

use super::{Cmd, Converter, Info, State, R};
use crate::graph::{Chmod, CopyOp, CopySource, Op, Source, Step};

/// Whether an ADD source is a git repository (`git@host:repo`, `git://`, `ssh://`, or an
/// http(s) URL whose path ends in `.git`), as BuildKit's `gitutil.ParseGitRef` tells them.
pub fn is_git_source(src: &str) -> bool {
    if src.starts_with("git://") || src.starts_with("ssh://") {
        return true;
    }
    if let Some(rest) = src.strip_prefix("git@") {
        return rest.contains(':');
    }
    if src.starts_with("http://") || src.starts_with("https://") {
        let no_frag = src.split('#').next().unwrap_or(src);
        let no_query = no_frag.split('?').next().unwrap_or(no_frag);
        return no_query.ends_with(".git");
    }
    false
}

fn is_http_source(src: &str) -> bool {
    (src.starts_with("http://") || src.starts_with("https://")) && !is_git_source(src)
}

/// BuildKit's `pathRelativeToWorkingDir` + `NormalizePath(keepSlash=true)`.
fn dest_path(workdir: &str, p: &str) -> String {
    let p = if p == "." || p.is_empty() { "./" } else { p };
    let joined = if p.starts_with('/') { clean_path(p) } else { join_path(&["/", workdir, p]) };
    let keep = p.ends_with('/') || p.ends_with("/.") || p == ".";
    if keep && !joined.ends_with('/') {
        format!("{joined}/")
    } else {
        joined
    }
}

/// Whether `--checksum` is `<algorithm>:<lowercase hex>` of sha256, sha384 or sha512.
fn is_valid_checksum(cs: &str) -> bool {
    cs.split_once(':').is_some_and(|(alg, hex)| {
        let len = match alg {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => 0,
        };
        len > 0 && hex.len() == len && hex.chars().all(|ch| ch.is_ascii_digit() || ('a'..='f').contains(&ch))
    })
}

/// A COPY or ADD with its flags and words expanded (empty flags are absent).
struct Expanded {
    chown: Option<String>,
    /// `--chmod` as written (after expansion), for the history.
    chmod: Option<String>,
    checksum: Option<String>,
    sources: Vec<String>,
    dest: String,
    /// Heredoc files: name and content.
    contents: Vec<(String, String)>,
}

impl Expanded {
    /// The history entry: `COPY [--parents] [--chown=..] [--chmod=..] <sources> <<files <dest>`.
    fn history(&self, name: &str, parents: bool) -> String {
        let mut msg = String::from(name);
        if parents {
            msg.push_str(" --parents");
        }
        if let Some(v) = &self.chown {
            msg.push_str(&format!(" --chown={v}"));
        }
        if let Some(v) = &self.chmod {
            msg.push_str(&format!(" --chmod={v}"));
        }
        for s in &self.sources {
            msg.push(' ');
            msg.push_str(s);
        }
        for (p, _) in &self.contents {
            msg.push_str(&format!(" <<{p}"));
        }
        msg.push(' ');
        msg.push_str(&self.dest);
        msg
    }
}

impl Converter<'_> {
    pub(super) fn dispatch_copy(
        &mut self,
        st: &mut State,
        infos: &[Info],
        si: usize,
        cmd: &Cmd,
        c: &CopyInstr,
        out_id: &HashMap<usize, usize>,
    ) -> R<()> {
        let line = cmd.instr.start_line;
        let name = if c.is_add { "ADD" } else { "COPY" };
        let x = self.expand_copy(st, line, c)?;
        if let Some(cs) = &x.checksum {
            if !is_valid_checksum(cs) {
                return Err(self.invalid(line, format!("invalid checksum digest format {} (expected sha256:<64 hex digits>)", quote(cs))));
            }
        }
        let chmod = match &x.chmod {
            None => None,
            Some(s) => Some(match ins::parse_chmod(s).map_err(|e| self.invalid(line, e.to_string()))? {
                ChmodSpec::Octal(v) => Chmod::Octal(v),
                ChmodSpec::Symbolic(v) => Chmod::Symbolic(v),
            }),
        };
        if x.checksum.is_some() {
            self.check_checksum_use(line, c, &x.sources)?;
        }
        let from = match cmd.sources.first().copied().flatten() {
            Some(src) => self.source_of(infos, si, src, line, "copy from", out_id)?,
            None => Source::Context,
        };
        let msg = x.history(name, c.parents);
        let (from, srcs) = self.copy_sources(line, c, &x.sources, x.contents, x.checksum.as_deref(), from)?;
        let dest = dest_path(&st.workdir, &x.dest);
        // A repository's files are added as they are: archives in it stay archives.
        let unpack = c.is_add && c.unpack.unwrap_or(true) && !matches!(from, Source::Git(_));
        st.steps.push(Step {
            line,
            display: self.display(st, &cmd.instr.code, cmd.onbuild),
            op: Op::Copy(CopyOp {
                from,
                sources: srcs,
                dest,
                chown: x.chown,
                chmod,
                link: c.link,
                exclude: c.excludes.clone(),
                parents: c.parents,
                unpack,
                keep_git_dir: c.keep_git_dir,
                is_add: c.is_add,
            }),
        });
        self.history(st, msg, true, true);
        Ok(())
    }

    /// Expand the flags, sources and destination with the stage's environment, and the
    /// heredoc files that ask for it (quotes kept as written).
    fn expand_copy(&self, st: &State, line: usize, c: &CopyInstr) -> R<Expanded> {
        let exp = |s: &str| self.expand(s, &st.env, line);
        let chown = match &c.chown {
            Some(v) => Some(exp(v)?).filter(|s| !s.is_empty()),
            None => None,
        };
        let chmod = match &c.chmod {
            Some(v) => Some(exp(v)?).filter(|s| !s.is_empty()),
            None => None,
        };
        let checksum = match &c.checksum {
            Some(v) => Some(exp(v)?).filter(|s| !s.is_empty()),
            None => None,
        };
        let mut sources = Vec::with_capacity(c.sources.len());
        for s in &c.sources {
            sources.push(exp(s)?);
        }
        let dest = exp(&c.dest)?;
        let mut contents = Vec::with_capacity(c.contents.len());
        for sc in &c.contents {
            let data = if sc.expand {
                let mut raw = Lexer::new('\\');
                raw.skip_process_quotes = true;
                raw.process_word(&sc.data, &st.env).map_err(|e| self.expansion(line, e.to_string()))?
            } else {
                sc.data.clone()
            };
            contents.push((sc.path.clone(), data));
        }
        Ok(Expanded { chown, chmod, checksum, sources, dest, contents })
    }

    /// `--checksum` is for ADD of a single HTTP(S) source only.
    fn check_checksum_use(&self, line: usize, c: &CopyInstr, sources: &[String]) -> R<()> {
        if !c.is_add {
            return Err(self.invalid(line, "checksum can't be specified for COPY"));
        }
        if sources.len() != 1 {
            return Err(self.invalid(line, "checksum can't be specified for multiple sources"));
        }
        if !is_http_source(&sources[0]) {
            return Err(self.invalid(line, "checksum can't be specified for non-HTTP(S) sources"));
        }
        Ok(())
    }

    /// The copy's sources read from `from`: paths, URLs (ADD), a git repository (ADD, the
    /// only source; it becomes the source the path is read from) and heredoc files.
    fn copy_sources(
        &self,
        line: usize,
        c: &CopyInstr,
        sources: &[String],
        contents: Vec<(String, String)>,
        checksum: Option<&str>,
        from: Source,
    ) -> R<(Source, Vec<CopySource>)> {
        let mut srcs = Vec::with_capacity(sources.len() + contents.len());
        let mut from = from;
        for s in sources {
            if is_git_source(s) {
                if !c.is_add {
                    return Err(self.invalid(line, format!("source can't be a git ref for COPY: {s}")));
                }
                if sources.len() != 1 || !contents.is_empty() {
                    return Err(self.invalid(line, format!("a git source must be the only source of ADD: {s}")));
                }
                // The repository is the source's root; its subdirectory (or root) is what
                // is added, as `COPY dir /dest` adds a directory's contents.
                let r = crate::git::GitRef::parse(s).map_err(|e| self.invalid(line, e.to_string()))?;
                from = Source::Git(crate::graph::GitSource { url: r.url, reference: r.reference });
                srcs.push(CopySource::Path(r.subdir.unwrap_or_else(|| "/".into())));
            } else if is_http_source(s) {
                if !c.is_add {
                    return Err(self.invalid(line, format!("source can't be a URL for COPY: {s}")));
                }
                srcs.push(CopySource::Url { url: s.clone(), checksum: checksum.map(str::to_string) });
            } else {
                srcs.push(CopySource::Path(s.clone()));
            }
        }
        for (p, data) in contents {
            srcs.push(CopySource::Inline { name: p, content: data });
        }
        Ok((from, srcs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dest_paths_follow_buildkit() {
        let cases = [
            ("/", ".", "/"),
            ("/app", ".", "/app/"),
            ("/app", "", "/app/"),
            ("/app", "x", "/app/x"),
            ("/app", "x/", "/app/x/"),
            ("/app", "/abs", "/abs"),
            ("/app", "/abs/", "/abs/"),
            ("/app", "../up", "/up"),
            ("/app", "./sub/.", "/app/sub/"),
        ];
        for (wd, p, want) in cases {
            assert_eq!(dest_path(wd, p), want, "dest_path({wd:?}, {p:?})");
        }
    }

    #[test]
    fn git_and_http_sources_are_told_apart() {
        assert!(is_git_source("https://github.com/moby/buildkit.git"));
        assert!(is_git_source("https://github.com/moby/buildkit.git#v0.10.1"));
        assert!(is_git_source("git@github.com:moby/buildkit.git"));
        assert!(is_git_source("git://host/repo"));
        assert!(!is_git_source("https://example.com/file.tar.gz"));
        assert!(is_http_source("https://example.com/file.tar.gz"));
        assert!(!is_http_source("https://github.com/moby/buildkit.git"));
        assert!(!is_http_source("src/main.rs"));
    }
}
