//! Remote build contexts, fetched by the client as `docker build URL` takes them:
//!
//! - a Git repository — `https://host/repo.git#ref:subdir`, `http://…/repo.git`,
//!   `git://host/repo`, `ssh://user@host/repo`, `user@host:repo.git` (buildx's
//!   `ParseGitRef`): fetched with the `git` CLI into a temporary directory, shallow when the
//!   server allows it, at `ref` (a branch, a tag or a commit; default: the remote's HEAD),
//!   submodules included, without `.git` (unless `BUILDKIT_CONTEXT_KEEP_GIT_DIR=1`); the
//!   context is `subdir` in it;
//! - any other `http(s)://` URL: a tar archive (plain or compressed) is the context, anything
//!   else is a Dockerfile with an empty context — the rules of a context on stdin.
//!
//! The temporary directory goes when the build ends, whatever the outcome.

use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context as _};

/// A context named by a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Remote {
    /// A Git repository.
    Git(GitContext),
    /// An HTTP(S) URL of an archive or a Dockerfile.
    Http(String),
}

/// A Git context URL, split as BuildKit splits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GitContext {
    /// What `git` fetches from (the URL without its fragment).
    pub(crate) remote: String,
    /// The branch, tag or commit after `#` (empty: the remote's HEAD).
    pub(crate) reference: String,
    /// The directory after `#ref:` (empty: the repository's root).
    pub(crate) subdir: String,
}

/// A context fetched into a temporary directory, or the bytes of an HTTP context.
pub(crate) enum Fetched {
    /// The repository's checkout (removed with the `TempDir`) and the context directory in it.
    Dir(tempfile::TempDir, PathBuf),
    /// An archive or a Dockerfile.
    Data(Vec<u8>),
}

impl Remote {
    /// The remote context `context` names, `None` for a local path.
    pub(crate) fn parse(context: &str) -> Option<Remote> {
        let (url, fragment) = context.split_once('#').unwrap_or((context, ""));
        let (reference, subdir) = fragment.split_once(':').unwrap_or((fragment, ""));
        let git = |remote: &str| {
            let subdir = Path::new("/").join(subdir);
            let subdir = normalize(&subdir);
            Some(Remote::Git(GitContext { remote: remote.to_string(), reference: reference.to_string(), subdir }))
        };
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("git://") || lower.starts_with("ssh://") {
            return git(url);
        }
        if lower.starts_with("http://") || lower.starts_with("https://") {
            let path = url.split_once('?').map_or(url, |(p, _)| p);
            return if path.ends_with(".git") { git(url) } else { Some(Remote::Http(context.to_string())) };
        }
        if lower.starts_with("github.com/") {
            return git(&format!("https://{url}"));
        }
        // scp-like: user@host:path, as BuildKit's `^([a-zA-Z0-9-_]+)@([a-zA-Z0-9-.]+):(.*)`.
        if let Some((user, rest)) = url.split_once('@') {
            let user_ok = !user.is_empty() && user.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if let Some((host, _)) = rest.split_once(':') {
                if user_ok && !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                    return git(url);
                }
            }
        }
        None
    }

    /// Fetch the context (blocking; on the runtime's multi-thread scheduler). Errors name
    /// the URL (and the ref).
    /// `build_args` (`--build-arg`): `BUILDKIT_CONTEXT_KEEP_GIT_DIR=1` keeps `.git` in a git
    /// context, as with BuildKit.
    pub(crate) fn fetch(&self, build_args: &[String]) -> anyhow::Result<Fetched> {
        match self {
            Remote::Git(g) => g.fetch(keep_git_dir(build_args)),
            Remote::Http(url) => {
                tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(fetch_http(url))).map(Fetched::Data)
            }
        }
    }
}

/// `/a/./b/../c` → `a/c` (`path.Join("/", subdir)` without the leading `/`).
fn normalize(p: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    parts.join("/")
}

impl GitContext {
    fn what(&self) -> String {
        match self.reference.as_str() {
            "" => format!("git context {}", self.remote),
            r => format!("git context {} at ref {r:?}", self.remote),
        }
    }

    fn fetch(&self, keep_git_dir: bool) -> anyhow::Result<Fetched> {
        let tmp = tempfile::Builder::new().prefix("hoist-git-context").tempdir().context("creating a directory for the git context")?;
        let repo = tmp.path();
        git(repo, &["init", "-q"]).with_context(|| self.what())?;
        git(repo, &["remote", "add", "origin", &self.remote]).with_context(|| self.what())?;
        let want = if self.reference.is_empty() { "HEAD" } else { &self.reference };
        // Shallow first; servers that cannot (dumb HTTP) or will not (a commit not at a ref
        // tip) get a full fetch.
        if git(repo, &["fetch", "-q", "--depth=1", "--no-tags", "origin", want]).is_err() {
            if let Err(e) = git(repo, &["fetch", "-q", "--no-tags", "origin", want]) {
                if !is_commit_id(want) {
                    return Err(e.context(format!("fetching {}", self.what())));
                }
                git(repo, &["fetch", "-q", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"])
                    .with_context(|| format!("fetching {}", self.what()))?;
                git(repo, &["checkout", "-q", "--detach", want]).with_context(|| format!("{}: no such commit", self.what()))?;
            }
        }
        if git(repo, &["rev-parse", "-q", "--verify", "HEAD"]).is_err() {
            git(repo, &["checkout", "-q", "--detach", "FETCH_HEAD"]).with_context(|| format!("checking out {}", self.what()))?;
        }
        if repo.join(".gitmodules").exists() {
            let submodules = ["submodule", "update", "-q", "--init", "--recursive"];
            if git(repo, &[&submodules[..], &["--depth=1"]].concat()).is_err() {
                git(repo, &submodules).with_context(|| format!("fetching the submodules of {}", self.what()))?;
            }
        }
        // BuildKit drops .git from a git context unless asked to keep it.
        if !keep_git_dir {
            std::fs::remove_dir_all(repo.join(".git")).with_context(|| format!("removing .git from {}", self.what()))?;
        }
        let dir = repo.join(&self.subdir);
        if !dir.is_dir() {
            bail!("{}: subdirectory {:?} not found in the repository", self.what(), self.subdir);
        }
        Ok(Fetched::Dir(tmp, dir))
    }
}

/// `--build-arg BUILDKIT_CONTEXT_KEEP_GIT_DIR=1|true` (the last one given wins).
fn keep_git_dir(build_args: &[String]) -> bool {
    let value = build_args.iter().rev().find_map(|a| a.strip_prefix("BUILDKIT_CONTEXT_KEEP_GIT_DIR="));
    matches!(value, Some("1" | "t" | "T" | "true" | "TRUE" | "True"))
}

fn is_commit_id(s: &str) -> bool {
    (7..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Run `git args` in `dir` without prompts; an error carries git's message.
fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .output()
        .map_err(|e| anyhow!("running git (is it installed?): {e}"))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        bail!("git {} failed: {}", args.first().copied().unwrap_or(""), if msg.is_empty() { out.status.to_string() } else { msg });
    }
    Ok(())
}

/// GET `url`: the body of an archive or a Dockerfile.
async fn fetch_http(url: &str) -> anyhow::Result<Vec<u8>> {
    let what = || format!("fetching the context {url}");
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .read_timeout(std::time::Duration::from_secs(120))
        .build()
        .with_context(what)?;
    let resp = client.get(url).send().await.with_context(what)?;
    let status = resp.status();
    if !status.is_success() {
        bail!("{}: the server answered {status}", what());
    }
    Ok(resp.bytes().await.with_context(what)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git_ctx(remote: &str, reference: &str, subdir: &str) -> Option<Remote> {
        Some(Remote::Git(GitContext { remote: remote.into(), reference: reference.into(), subdir: subdir.into() }))
    }

    #[test]
    fn urls_as_docker_build_reads_them() {
        assert_eq!(Remote::parse("https://h/r.git#v1:sub/dir"), git_ctx("https://h/r.git", "v1", "sub/dir"));
        assert_eq!(Remote::parse("https://h/r.git"), git_ctx("https://h/r.git", "", ""));
        assert_eq!(Remote::parse("git@github.com:o/r.git#main"), git_ctx("git@github.com:o/r.git", "main", ""));
        assert_eq!(Remote::parse("git://h/r#:a/../b/./c"), git_ctx("git://h/r", "", "b/c"));
        assert_eq!(Remote::parse("ssh://git@h/r.git"), git_ctx("ssh://git@h/r.git", "", ""));
        assert_eq!(Remote::parse("github.com/o/r"), git_ctx("https://github.com/o/r", "", ""));
        // The subdirectory cannot climb out of the checkout.
        assert_eq!(Remote::parse("https://h/r.git#x:../../etc"), git_ctx("https://h/r.git", "x", "etc"));
        assert_eq!(Remote::parse("http://h/ctx.tar.gz"), Some(Remote::Http("http://h/ctx.tar.gz".into())));
        assert_eq!(Remote::parse("https://h/Dockerfile"), Some(Remote::Http("https://h/Dockerfile".into())));
        for local in [".", "dir", "./a@b:c", "/abs/path", "a b@c:d"] {
            assert_eq!(Remote::parse(local), None, "{local}");
        }
        assert!(keep_git_dir(&["BUILDKIT_CONTEXT_KEEP_GIT_DIR=1".into()]));
        assert!(!keep_git_dir(&["BUILDKIT_CONTEXT_KEEP_GIT_DIR=1".into(), "BUILDKIT_CONTEXT_KEEP_GIT_DIR=false".into()]));
        assert!(!keep_git_dir(&[]));
    }
}
