//! Which paths of the context a Dockerfile can read, so that only those are walked, hashed
//! and sent (BuildKit's "follow paths"): the sources of COPY/ADD without `--from` and of
//! `RUN --mount=type=bind` without `from`. Anything the client cannot know for sure (a
//! source with a variable, `.`, a wildcard at the top) means the whole context.
//!
//! This is an optimisation only: paths a step reads that this missed (a base image's
//! ONBUILD COPY, which only the builder sees) are asked for by the builder during the build
//! ([`crate::session::ContextProvider`]).

use std::collections::BTreeSet;

use hoist_dockerfile::instructions::{parse_mount, Instruction, MountType};

/// What to send of the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Everything (after .dockerignore).
    All,
    /// Only these paths (relative, cleaned), with everything below them and their parents.
    Paths(BTreeSet<String>),
}

/// Clean a source path the way COPY resolves it: relative to the context root, `..` clamped.
fn clean(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

/// The literal directory prefix of a source (`None`: the whole context).
fn selector(source: &str) -> Option<String> {
    let s = hoist_dockerfile::instructions::source_selector(source);
    (!s.is_empty()).then_some(s)
}

/// The paths `dockerfile` reads from the context.
pub fn reachable(dockerfile: &str) -> Reach {
    let Ok((_, stages)) = hoist_dockerfile::parse_dockerfile(dockerfile) else {
        // The builder reports the syntax error; send everything meanwhile.
        return Reach::All;
    };
    let mut paths = BTreeSet::new();
    for stage in &stages.stages {
        for instr in &stage.commands {
            match &instr.instruction {
                Instruction::Copy(c) if c.from.is_none() => {
                    for src in &c.sources {
                        if c.is_add && (src.contains("://") || src.starts_with("git@")) {
                            continue;
                        }
                        if src.contains('$') {
                            return Reach::All;
                        }
                        // `--parents` keeps the structure from the `./` pivot; the files read
                        // are the same.
                        match selector(src) {
                            Some(s) => {
                                paths.insert(s);
                            }
                            None => return Reach::All,
                        }
                    }
                }
                Instruction::Run(r) => {
                    for m in &r.mounts {
                        if m.contains('$') {
                            return Reach::All;
                        }
                        let Ok(mount) = parse_mount(m, &mut |s: &str| Ok(s.to_string())) else { return Reach::All };
                        if mount.kind == MountType::Bind && mount.from.is_empty() {
                            match selector(&mount.source) {
                                Some(s) => {
                                    paths.insert(s);
                                }
                                None => return Reach::All,
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Reach::Paths(paths)
}

impl Reach {
    /// Whether `rel` (a context path) is sent.
    pub fn includes(&self, rel: &str) -> bool {
        match self {
            Reach::All => true,
            Reach::Paths(p) => p.iter().any(|s| rel == s || is_below(rel, s) || is_below(s, rel)),
        }
    }

    /// Whether the walk must look inside directory `rel`.
    pub fn visits(&self, rel: &str) -> bool {
        self.includes(rel)
    }

    /// Add the in-context target of a selected symlink (so that following it works).
    pub fn follow_link(&mut self, link: &str, target: &str) -> bool {
        let Reach::Paths(paths) = self else { return false };
        let base = match link.rsplit_once('/') {
            Some((parent, _)) if !target.starts_with('/') => format!("{parent}/{target}"),
            _ => target.to_string(),
        };
        let resolved = clean(&base);
        let mut added = false;
        let current: Vec<String> = paths.iter().cloned().collect();
        for s in current {
            // A selector at or below the link continues at the target.
            let rest = if s == link {
                Some(String::new())
            } else if is_below(&s, link) {
                Some(s[link.len()..].to_string())
            } else if is_below(link, &s) {
                Some(String::new())
            } else {
                None
            };
            if let Some(rest) = rest {
                let t = clean(&format!("{resolved}{rest}"));
                if t.is_empty() {
                    // A link to the context root: everything is reachable.
                    *self = Reach::All;
                    return true;
                }
                if let Reach::Paths(p) = self {
                    added |= p.insert(t);
                }
            }
        }
        added
    }
}

fn is_below(path: &str, dir: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(df: &str) -> Vec<String> {
        match reachable(df) {
            Reach::All => vec!["<all>".into()],
            Reach::Paths(p) => p.into_iter().collect(),
        }
    }

    #[test]
    fn copy_sources_and_bind_mounts() {
        let df = "FROM x AS b\nCOPY --from=b /out /out\nCOPY src/ /app/src\nCOPY ./pkg/*.json ../go.mod /app/\n\
                  ADD https://example.com/f /f\nADD vendor.tar.gz /v\nRUN --mount=type=bind,source=scripts,target=/s sh /s/x\n\
                  RUN --mount=type=cache,target=/c true\nCOPY <<EOF /h\nhi\nEOF\n";
        assert_eq!(paths(df), vec!["go.mod", "pkg", "scripts", "src", "vendor.tar.gz"]);
    }

    #[test]
    fn unknowable_sources_mean_everything() {
        for df in [
            "FROM x\nCOPY . /app\n",
            "FROM x\nCOPY * /app/\n",
            "FROM x\nARG D=src\nCOPY $D /app\n",
            "FROM x\nRUN --mount=type=bind,target=/ctx ls /ctx\n",
            "FROM x\nCOPY ./ /app\n",
            "FROM x\nRUNN broken\n",
        ] {
            assert_eq!(paths(df), vec!["<all>"], "{df}");
        }
    }

    #[test]
    fn includes_parents_and_children_only() {
        let r = Reach::Paths(["src/app".to_string()].into_iter().collect());
        assert!(r.includes("src"));
        assert!(r.includes("src/app"));
        assert!(r.includes("src/app/main.rs"));
        assert!(!r.includes("src/application"));
        assert!(!r.includes("docs"));
    }

    #[test]
    fn links_extend_the_selection_inside_the_context() {
        let mut r = Reach::Paths(["cfg/app.conf".to_string()].into_iter().collect());
        assert!(r.follow_link("cfg", "../shared/cfg"));
        assert!(r.includes("shared/cfg/app.conf"));
        let mut r = Reach::Paths(["data".to_string()].into_iter().collect());
        r.follow_link("data", "/");
        assert_eq!(r, Reach::All);
    }
}
