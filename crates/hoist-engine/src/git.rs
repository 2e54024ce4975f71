//! `ADD <git url>`: a repository at a ref, fetched by the builder with the `git` command
//! (as BuildKit's git source). The ref is resolved to a commit first (`git ls-remote`), and
//! that commit is the source's cache key: an ADD of a moving branch reruns when the branch
//! moves, and not otherwise. Only network transports are allowed — never `file://` or a
//! path on the builder — and git runs without the builder's or a user's configuration,
//! hooks, or prompts.

use std::path::Path;
use std::process::{Command, Stdio};

/// A git source as written after ADD: `URL[#REF[:SUBDIR]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRef {
    /// The repository (without the fragment).
    pub url: String,
    /// Branch, tag or commit; `None` is the remote's HEAD.
    pub reference: Option<String>,
    /// A directory of the repository to add instead of its root.
    pub subdir: Option<String>,
}

/// Errors of git sources; each names the repository.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The source is not a network repository URL (e.g. `file://`, a local path, or an
    /// argument-like or whitespace-containing URL); holds the source as written.
    #[error("git source {0:?}: only https://, http://, git:// and ssh:// repositories (or user@host:path) can be added")]
    Transport(String),
    /// A git command failed, or the ref is malformed.
    #[error("git source {url}: {message}")]
    Git {
        /// The repository URL.
        url: String,
        /// git's last error line, or what else failed (an invalid ref, git not installed,
        /// a file operation).
        message: String,
    },
    /// `git ls-remote` lists no tag or branch of that name.
    #[error("git source {url}: no ref {reference:?} in the repository")]
    NoRef {
        /// The repository URL.
        url: String,
        /// The ref asked for (`HEAD` when none was given).
        reference: String,
    },
    /// The checked-out tree (with `.git` if kept) is larger than the ADD archive limit.
    #[error("git source {url}: the checkout is larger than the builder accepts for ADD ({max} bytes; hoist serve --max-archive-bytes)")]
    TooLarge {
        /// The repository URL.
        url: String,
        /// The limit in bytes.
        max: u64,
    },
}

impl GitRef {
    /// Parse `URL#REF:SUBDIR` (the fragment is optional, and so is each part of it).
    pub fn parse(source: &str) -> Result<GitRef, GitError> {
        let (url, fragment) = match source.split_once('#') {
            Some((u, f)) => (u, Some(f)),
            None => (source, None),
        };
        let allowed = ["https://", "http://", "git://", "ssh://"].iter().any(|p| url.starts_with(p))
            || (url.contains('@') && url.contains(':') && !url.contains("://") && !url.starts_with('-'));
        if !allowed || url.starts_with('-') || url.contains(char::is_whitespace) {
            return Err(GitError::Transport(source.to_string()));
        }
        let (reference, subdir) = match fragment {
            None => (None, None),
            Some(f) => match f.split_once(':') {
                Some((r, d)) => (Some(r), Some(d)),
                None => (Some(f), None),
            },
        };
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let reference = reference.and_then(nonempty);
        if reference.as_deref().is_some_and(|r| r.starts_with('-') || r.contains(char::is_whitespace)) {
            return Err(GitError::Git { url: url.into(), message: format!("invalid ref {:?}", reference.unwrap_or_default()) });
        }
        Ok(GitRef { url: url.to_string(), reference, subdir: subdir.and_then(nonempty) })
    }
}

/// `git` with no configuration but ours: network transports only, no prompts, no hooks.
fn git(home: &Path) -> Command {
    let mut c = Command::new("git");
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()))
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", "https:http:git:ssh")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .args(["-c", "core.hooksPath=/dev/null", "-c", "protocol.file.allow=never", "-c", "advice.detachedHead=false"])
        .stdin(Stdio::null());
    c
}

fn run(url: &str, mut c: Command) -> Result<String, GitError> {
    let out =
        c.output().map_err(|e| GitError::Git { url: url.into(), message: format!("running git: {e} (install git on the builder)") })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("failed").trim().to_string();
        return Err(GitError::Git { url: url.into(), message: last });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_commit(r: &str) -> bool {
    r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit `r` names (its ref, or the remote's HEAD). Blocking.
pub fn resolve(r: &GitRef, scratch: &Path) -> Result<String, GitError> {
    if let Some(c) = r.reference.as_deref().filter(|c| is_commit(c)) {
        return Ok(c.to_ascii_lowercase());
    }
    let wanted = r.reference.clone().unwrap_or_else(|| "HEAD".into());
    let mut c = git(scratch);
    c.args(["ls-remote", "--", &r.url, &wanted]);
    if wanted != "HEAD" {
        c.args([&format!("refs/tags/{wanted}"), &format!("refs/heads/{wanted}"), &format!("refs/tags/{wanted}^{{}}")]);
    }
    let listing = run(&r.url, c)?;
    let mut found: Option<(u8, String)> = None;
    for line in listing.lines() {
        let Some((sha, name)) = line.split_once('\t') else { continue };
        // An annotated tag's commit (^{}) wins over the tag object; a tag over a branch.
        let rank = if name.ends_with("^{}") {
            0
        } else if name.starts_with("refs/tags/") {
            1
        } else {
            2
        };
        if found.as_ref().is_none_or(|(best, _)| rank < *best) {
            found = Some((rank, sha.to_string()));
        }
    }
    found.map(|(_, sha)| sha).ok_or(GitError::NoRef { url: r.url.clone(), reference: wanted })
}

/// Check out `commit` of `r` into the empty directory `dir` (`.git` kept only when asked),
/// refusing checkouts over `max_bytes`. Blocking.
pub fn checkout(r: &GitRef, commit: &str, dir: &Path, keep_git_dir: bool, max_bytes: u64) -> Result<(), GitError> {
    let home = dir.join(".hoist-git-home");
    std::fs::create_dir_all(&home).map_err(|e| GitError::Git { url: r.url.clone(), message: e.to_string() })?;
    let step = |args: &[&str]| {
        let mut c = git(&home);
        c.arg("-C").arg(dir).args(args);
        run(&r.url, c)
    };
    step(&["init", "-q"])?;
    step(&["remote", "add", "origin", "--", &r.url])?;
    // By commit where the server allows it, else by the ref that named it.
    if step(&["fetch", "-q", "--depth", "1", "origin", commit]).is_err() {
        let by_ref = r.reference.clone().unwrap_or_else(|| "HEAD".into());
        step(&["fetch", "-q", "--depth", "1", "origin", &by_ref])?;
    }
    step(&["checkout", "-q", commit])?;
    let _ = std::fs::remove_dir_all(&home);
    if !keep_git_dir {
        std::fs::remove_dir_all(dir.join(".git"))
            .map_err(|e| GitError::Git { url: r.url.clone(), message: format!("removing .git: {e}") })?;
    }
    if crate::gc::dir_size(dir) > max_bytes {
        return Err(GitError::TooLarge { url: r.url.clone(), max: max_bytes });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_with_ref_and_subdir_and_only_network_transports() {
        let r = GitRef::parse("https://github.com/moby/buildkit.git#v0.10.1:frontend").unwrap();
        assert_eq!(r.url, "https://github.com/moby/buildkit.git");
        assert_eq!(r.reference.as_deref(), Some("v0.10.1"));
        assert_eq!(r.subdir.as_deref(), Some("frontend"));
        let r = GitRef::parse("git@github.com:moby/buildkit.git").unwrap();
        assert_eq!((r.reference, r.subdir), (None, None));
        assert_eq!(GitRef::parse("git://h/r.git#:docs").unwrap().subdir.as_deref(), Some("docs"));
        for bad in ["file:///etc", "/srv/repo.git", "ext::sh -c touch% /tmp/pwned", "--upload-pack=x", "https://h/r.git#--force"] {
            assert!(GitRef::parse(bad).is_err(), "{bad}");
        }
    }
}
