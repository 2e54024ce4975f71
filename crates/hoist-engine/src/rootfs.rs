//! Paths and users inside an image root (a build context, a stage's rootfs, a merged overlay
//! mount), never escaping it.
//!
//! Every path a build step names — a COPY source, a COPY destination, `/etc/passwd` for `USER`
//! — is resolved here *as if the root were `/`*: absolute symlink targets restart at the root,
//! `..` stops at the root, at most [`MAX_SYMLINK_FOLLOWS`] links are followed, and components
//! that do not exist yet are appended literally (for paths about to be created). A build step
//! runs alone in its rootfs, so a careful lstat walk is race-free in practice; callers that
//! open files after resolving use `O_NOFOLLOW` on the (already link-free) result.
//!
//! Users are looked up the way BuildKit does: [`lookup_user`] for `USER` of a `RUN` (BuildKit's
//! executor on top of runc's `GetExecUser`), [`lookup_chown`] for `COPY --chown` and `WORKDIR`
//! ownership (BuildKit's file-op `readUser`).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Most symbolic links followed while resolving one path (Linux's `MAXSYMLINKS`).
pub const MAX_SYMLINK_FOLLOWS: usize = 40;

/// Largest `/etc/passwd` or `/etc/group` read from an image (a hostile image must not make the
/// builder read gigabytes to look up a user).
pub const MAX_USER_FILE_BYTES: u64 = 16 << 20;

/// Errors of path resolution and user lookup inside a root.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A symlink chain longer than [`MAX_SYMLINK_FOLLOWS`] (or a loop).
    #[error("too many levels of symbolic links resolving {path} in {root}")]
    TooManyLinks {
        /// The path being resolved, as seen inside the root.
        path: String,
        /// The root (host path).
        root: PathBuf,
    },
    /// A path component that must be a directory is something else.
    #[error("cannot create {path} in {root}: {component} exists and is not a directory")]
    NotADirectory {
        /// The path being resolved, as seen inside the root.
        path: String,
        /// The offending prefix of it, e.g. `/a/b/f`.
        component: String,
        /// The root (host path).
        root: PathBuf,
    },
    /// An I/O error on a path inside the root (`path` is shown as seen from inside the root).
    #[error("{op} {path} in {root}: {source}")]
    Io {
        /// What was being done, e.g. `open` or `read`.
        op: &'static str,
        /// The path, as seen inside the root.
        path: String,
        /// The root (host path).
        root: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `USER name` (or `name:group`) with no such name in the image's /etc/passwd.
    #[error("unable to find user {0}: no matching entries in passwd file")]
    UnknownUser(String),
    /// `USER user:group` with no such group name in the image's /etc/group.
    #[error("unable to find group {0}: no matching entries in group file")]
    UnknownGroup(String),
    /// A numeric id outside 0..=2147483647 (runc's range).
    #[error("invalid user {spec:?}: {what} {id} is out of range (expected 0 to 2147483647)")]
    IdOutOfRange {
        /// The `USER` (or `--chown`) value as written.
        spec: String,
        /// `uid` or `gid`.
        what: &'static str,
        /// The id found (written, or from /etc/passwd or /etc/group).
        id: i64,
    },
    /// An /etc/passwd or /etc/group larger than [`MAX_USER_FILE_BYTES`].
    #[error("{file} in {root} is larger than {limit} bytes; refusing to parse it")]
    UserFileTooLarge {
        /// `/etc/passwd` or `/etc/group`.
        file: &'static str,
        /// The root (host path).
        root: PathBuf,
        /// The limit in bytes ([`MAX_USER_FILE_BYTES`]).
        limit: u64,
    },
}

fn io_err(op: &'static str, path: impl Into<String>, root: &Path, source: io::Error) -> RootfsError {
    RootfsError::Io { op, path: path.into(), root: root.to_path_buf(), source }
}

/// Resolve `path` inside `root`, following symlinks as if `root` were `/`.
///
/// `path` may be absolute or relative; both are taken from the root. Absolute link targets
/// restart at the root, `..` never climbs above it, missing components (and everything after
/// them) are appended literally, so the result can name a file about to be created. With
/// `follow_final = false` a symlink in the last component is not followed (the result names
/// the link itself); a trailing `/` always follows. Errors after [`MAX_SYMLINK_FOLLOWS`] links.
///
/// The result is `root` joined with link-free components; no component of it below `root` is a
/// symlink at the time of the call (except the last one with `follow_final = false`).
pub fn resolve_in_root(root: &Path, path: &str, follow_final: bool) -> Result<PathBuf, RootfsError> {
    let comps = resolve_components(root, path.as_bytes(), follow_final)?;
    Ok(join_components(root, &comps))
}

/// [`resolve_in_root`] on raw bytes (symlink targets and tar names need not be UTF-8),
/// returning the link-free components below the root.
pub(crate) fn resolve_components(root: &Path, path: &[u8], follow_final: bool) -> Result<Vec<OsString>, RootfsError> {
    let follow_final = follow_final || path.ends_with(b"/");
    let mut pending: VecDeque<Vec<u8>> = split_components(path).collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    while let Some(c) = pending.pop_front() {
        if c == b"." {
            continue;
        }
        if c == b".." {
            resolved.pop();
            continue;
        }
        let is_final = pending.is_empty();
        let mut candidate = join_components(root, &resolved);
        candidate.push(OsStr::from_bytes(&c));
        match fs::symlink_metadata(&candidate) {
            Err(e) if is_missing(&e) => resolved.push(OsString::from_vec(c)),
            Err(e) => return Err(io_err("lstat", display_rel(&resolved, &c), root, e)),
            Ok(m) if m.file_type().is_symlink() && (!is_final || follow_final) => {
                links += 1;
                if links > MAX_SYMLINK_FOLLOWS {
                    return Err(RootfsError::TooManyLinks { path: display_abs(path), root: root.to_path_buf() });
                }
                let target = fs::read_link(&candidate).map_err(|e| io_err("readlink", display_rel(&resolved, &c), root, e))?;
                let target = target.into_os_string().into_vec();
                if target.starts_with(b"/") {
                    resolved.clear();
                }
                let parts: Vec<Vec<u8>> = split_components(&target).collect();
                for p in parts.into_iter().rev() {
                    pending.push_front(p);
                }
            }
            Ok(_) => resolved.push(OsString::from_vec(c)),
        }
    }
    Ok(resolved)
}

/// ENOENT and ENOTDIR both mean "this component does not exist (yet)".
fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

fn split_components(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|b| *b == b'/').filter(|c| !c.is_empty()).map(|c| c.to_vec())
}

pub(crate) fn join_components(root: &Path, comps: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in comps {
        p.push(c);
    }
    p
}

fn display_rel(resolved: &[OsString], last: &[u8]) -> String {
    let mut s = String::new();
    for c in resolved {
        s.push('/');
        s.push_str(&c.to_string_lossy());
    }
    s.push('/');
    s.push_str(&String::from_utf8_lossy(last));
    s
}

fn display_abs(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path);
    if s.starts_with('/') {
        s.into_owned()
    } else {
        format!("/{s}")
    }
}

/// Open `path` inside `root` read-only, following symlinks in-root (final one included).
/// The file is opened with `O_NOFOLLOW` on the resolved, link-free path.
pub fn open_in_root(root: &Path, path: &str) -> Result<File, RootfsError> {
    let real = resolve_in_root(root, path, true)?;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&real)
        .map_err(|e| io_err("open", display_abs(path.as_bytes()), root, e))
}

/// `mkdir -p` of `path` inside `root`: symlinks on the way are followed in-root, missing
/// directories are created with exactly `mode` (umask does not apply) and, when given,
/// owned by `owner` (uid, gid). Returns the created directories (host paths), outermost first.
/// A component that exists and is not a directory is an error naming it.
pub fn create_dir_all_in_root(root: &Path, path: &str, mode: u32, owner: Option<(u32, u32)>) -> Result<Vec<PathBuf>, RootfsError> {
    let comps = resolve_components(root, path.as_bytes(), true)?;
    create_resolved_dirs(root, &comps, mode, owner, &display_abs(path.as_bytes()))
}

/// Create the missing directories of already resolved (link-free) components.
pub(crate) fn create_resolved_dirs(
    root: &Path,
    comps: &[OsString],
    mode: u32,
    owner: Option<(u32, u32)>,
    display: &str,
) -> Result<Vec<PathBuf>, RootfsError> {
    let mut created = Vec::new();
    let mut cur = root.to_path_buf();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        let shown = || {
            let mut s = String::new();
            for c in &comps[..=i] {
                s.push('/');
                s.push_str(&c.to_string_lossy());
            }
            s
        };
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => return Err(RootfsError::NotADirectory { path: display.to_string(), component: shown(), root: root.to_path_buf() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("lstat", shown(), root, e)),
        }
        match fs::DirBuilder::new().mode(mode & 0o7777).create(&cur) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && cur.is_dir() => continue,
            Err(e) => return Err(io_err("mkdir", shown(), root, e)),
        }
        fs::set_permissions(&cur, fs::Permissions::from_mode(mode & 0o7777)).map_err(|e| io_err("chmod", shown(), root, e))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&cur, Some(uid), Some(gid)).map_err(|e| io_err("chown", shown(), root, e))?;
        }
        created.push(cur.clone());
    }
    Ok(created)
}

/// The identity a `RUN` step runs as.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserIds {
    /// Numeric user id.
    pub uid: u32,
    /// Numeric primary group id: the named group, else the user's group in /etc/passwd (0 for
    /// a numeric user not listed there).
    pub gid: u32,
    /// Supplementary groups: the /etc/group entries that list the user by name (only when the
    /// spec names no group, as runc does).
    pub additional_gids: Vec<u32>,
    /// The user's home directory from /etc/passwd, if the user was found there (runc sets
    /// `HOME` from it when the environment has none).
    pub home: Option<String>,
}

/// One /etc/passwd line.
#[derive(Debug, Clone)]
struct PasswdEntry {
    name: Vec<u8>,
    uid: i64,
    gid: i64,
    home: Vec<u8>,
}

/// One /etc/group line.
#[derive(Debug, Clone)]
struct GroupEntry {
    name: Vec<u8>,
    gid: i64,
    members: Vec<Vec<u8>>,
}

/// Go's `strconv.Atoi` with the error ignored, as runc parses passwd fields: garbage → 0.
fn atoi_lenient(b: &[u8]) -> i64 {
    std::str::from_utf8(b).ok().and_then(|s| s.parse::<i64>().ok()).unwrap_or(0)
}

fn user_file_lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|b| *b == b'\n').map(|l| l.trim_ascii()).filter(|l| !l.is_empty() && !l.starts_with(b"#"))
}

fn parse_passwd(data: &[u8]) -> Vec<PasswdEntry> {
    user_file_lines(data)
        .map(|line| {
            let f: Vec<&[u8]> = line.split(|b| *b == b':').collect();
            let get = |i: usize| f.get(i).copied().unwrap_or(b"");
            PasswdEntry { name: get(0).to_vec(), uid: atoi_lenient(get(2)), gid: atoi_lenient(get(3)), home: get(5).to_vec() }
        })
        .collect()
}

fn parse_group(data: &[u8]) -> Vec<GroupEntry> {
    user_file_lines(data)
        .map(|line| {
            let f: Vec<&[u8]> = line.split(|b| *b == b':').collect();
            let get = |i: usize| f.get(i).copied().unwrap_or(b"");
            let members = if get(3).is_empty() { Vec::new() } else { get(3).split(|b| *b == b',').map(|m| m.to_vec()).collect() };
            GroupEntry { name: get(0).to_vec(), gid: atoi_lenient(get(2)), members }
        })
        .collect()
}

/// Read /etc/passwd or /etc/group of an image; `None` when the image has none.
fn read_user_file(root: &Path, path: &'static str) -> Result<Option<Vec<u8>>, RootfsError> {
    let file = match open_in_root(root, path) {
        Ok(f) => f,
        Err(RootfsError::Io { source, .. }) if is_missing(&source) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut data = Vec::new();
    file.take(MAX_USER_FILE_BYTES + 1).read_to_end(&mut data).map_err(|e| io_err("read", path, root, e))?;
    if data.len() as u64 > MAX_USER_FILE_BYTES {
        return Err(RootfsError::UserFileTooLarge { file: path, root: root.to_path_buf(), limit: MAX_USER_FILE_BYTES });
    }
    Ok(Some(data))
}

/// `root` or a decimal id (BuildKit's `parseUID`).
fn parse_id_or_root(s: &str) -> Option<u32> {
    if s == "root" {
        return Some(0);
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok()
}

fn check_range(spec: &str, what: &'static str, id: i64) -> Result<u32, RootfsError> {
    if (0..=i32::MAX as i64).contains(&id) {
        Ok(id as u32)
    } else {
        Err(RootfsError::IdOutOfRange { spec: spec.to_string(), what, id })
    }
}

/// Resolve a `USER` value for a `RUN` step as BuildKit does.
///
/// - `""` → the passwd entry of uid 0 (gid and supplementary groups of root), or 0:0 when the
///   image has no usable passwd file.
/// - `uid:gid` with both parts numeric (or `root`) → exactly those ids, no lookup, no
///   supplementary groups.
/// - otherwise runc's `GetExecUser`: the user part matches a passwd entry by uid (numeric) or
///   name; a name that is not there is an error ("unable to find user NAME: no matching entries
///   in passwd file"), a number that is not there is used as is with gid 0. The group part, when
///   present, matches /etc/group by gid or name (an unknown name is an error, an unknown number
///   is used as is) and replaces the primary gid; when absent, the supplementary groups are the
///   groups that list the user's name.
pub fn lookup_user(root: &Path, spec: &str) -> Result<UserIds, RootfsError> {
    let (spec_eff, is_default) = if spec.is_empty() { ("0", true) } else { (spec, false) };
    if let Some((u, g)) = spec_eff.split_once(':') {
        if let (Some(uid), Some(gid)) = (parse_id_or_root(u), parse_id_or_root(g)) {
            return Ok(UserIds { uid, gid, additional_gids: Vec::new(), home: None });
        }
    }
    let passwd = read_user_file(root, "/etc/passwd")?;
    let group = read_user_file(root, "/etc/group")?;
    match exec_user(spec_eff, passwd.as_deref(), group.as_deref()) {
        Ok(u) => Ok(u),
        Err(_) if is_default => Ok(UserIds::default()),
        Err(e) => Err(e),
    }
}

/// runc's `GetExecUser` with no defaults (uid 0, gid 0, no supplementary groups).
fn exec_user(spec: &str, passwd: Option<&[u8]>, group: Option<&[u8]>) -> Result<UserIds, RootfsError> {
    let (user_arg, group_arg) = spec.split_once(':').unwrap_or((spec, ""));
    let uid_num: Option<i64> = user_arg.parse::<i64>().ok();
    let users = passwd.map(parse_passwd).unwrap_or_default();
    let found = users.iter().find(|u| match uid_num {
        Some(n) => u.uid == n,
        None => u.name == user_arg.as_bytes(),
    });
    let mut ids = UserIds::default();
    let mut matched_name: Option<&[u8]> = None;
    match (found, uid_num) {
        (Some(u), _) => {
            ids.uid = check_range(spec, "uid", u.uid)?;
            ids.gid = check_range(spec, "gid", u.gid)?;
            ids.home = Some(String::from_utf8_lossy(&u.home).into_owned());
            matched_name = Some(&u.name);
        }
        (None, Some(n)) => ids.uid = check_range(spec, "uid", n)?,
        (None, None) => return Err(RootfsError::UnknownUser(user_arg.to_string())),
    }
    if group_arg.is_empty() && matched_name.is_none() {
        return Ok(ids);
    }
    let groups = group.map(parse_group).unwrap_or_default();
    if !group_arg.is_empty() {
        let gid_num: Option<i64> = group_arg.parse::<i64>().ok();
        let g = groups.iter().find(|g| match gid_num {
            Some(n) => g.gid == n,
            None => g.name == group_arg.as_bytes(),
        });
        ids.gid = match (g, gid_num) {
            (Some(g), _) => check_range(spec, "gid", g.gid)?,
            (None, Some(n)) => check_range(spec, "gid", n)?,
            (None, None) => return Err(RootfsError::UnknownGroup(group_arg.to_string())),
        };
    } else if let Some(name) = matched_name {
        for g in groups.iter().filter(|g| g.members.iter().any(|m| m.as_slice() == name)) {
            ids.additional_gids.push(check_range(spec, "gid", g.gid)?);
        }
    }
    Ok(ids)
}

/// Resolve a `COPY --chown` / `ADD --chown` value (and the `USER` that owns a created
/// `WORKDIR`) against the destination rootfs exactly as BuildKit's file op does:
///
/// - the user part is `root`, a number (then gid = uid) or a name looked up in /etc/passwd
///   (uid and primary gid of that entry);
/// - the group part, if any, is `root`, a number, or a name looked up in /etc/group;
/// - **a name that is not found — or an image without passwd/group files — silently leaves the
///   id at 0** (BuildKit does not fail; confirmed with Docker 20.10:
///   `COPY --chown=www-data:100` in busybox, which has no www-data, gives 0:100).
pub fn lookup_chown(root: &Path, spec: &str) -> Result<(u32, u32), RootfsError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (mut uid, mut gid) = (0u32, 0u32);
    if let Some(n) = parse_id_or_root(user_part) {
        (uid, gid) = (n, n);
    } else if let Some(data) = read_user_file(root, "/etc/passwd")? {
        if let Some(u) = parse_passwd(&data).into_iter().find(|u| u.name == user_part.as_bytes()) {
            uid = check_range(spec, "uid", u.uid)?;
            gid = check_range(spec, "gid", u.gid)?;
        }
    }
    if let Some(g) = group_part {
        if let Some(n) = parse_id_or_root(g) {
            gid = n;
        } else if let Some(data) = read_user_file(root, "/etc/group")? {
            if let Some(e) = parse_group(&data).into_iter().find(|e| e.name == g.as_bytes()) {
                gid = check_range(spec, "gid", e.gid)?;
            }
        }
    }
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt};

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    /// A root with: dir a/b, file a/b/f, links: abs → /a, rel → a/b, up → ../../../a,
    /// loop1 ↔ loop2, self → self, chain0 → chain1 → … → chain45 (a file).
    fn sample_root() -> tempfile::TempDir {
        let t = tmp();
        let r = t.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a/b/f"), b"f").unwrap();
        symlink("/a", r.join("abs")).unwrap();
        symlink("a/b", r.join("rel")).unwrap();
        symlink("../../../a", r.join("up")).unwrap();
        symlink("loop2", r.join("loop1")).unwrap();
        symlink("loop1", r.join("loop2")).unwrap();
        symlink("self", r.join("self")).unwrap();
        symlink("/etc/passwd", r.join("hostpw")).unwrap();
        symlink("b/f", r.join("a/flink")).unwrap();
        for i in 0..45 {
            symlink(format!("chain{}", i + 1), r.join(format!("chain{i}"))).unwrap();
        }
        fs::write(r.join("chain45"), b"end").unwrap();
        t
    }

    #[test]
    fn resolve_table() {
        let t = sample_root();
        let r = t.path();
        // (input, follow_final, expected relative result)
        let cases: &[(&str, bool, &str)] = &[
            ("a/b/f", true, "a/b/f"),
            ("/a/b/f", true, "a/b/f"),
            ("../../a/b/f", true, "a/b/f"),
            ("a/../../../a/./b", true, "a/b"),
            ("abs/b/f", true, "a/b/f"),
            ("abs", false, "abs"),
            ("abs", true, "a"),
            ("abs/", false, "a"),
            ("rel/f", true, "a/b/f"),
            ("up/b", true, "a/b"),
            ("hostpw", true, "etc/passwd"),
            ("hostpw", false, "hostpw"),
            ("a/flink", true, "a/b/f"),
            ("a/flink", false, "a/flink"),
            ("missing/x/y", true, "missing/x/y"),
            ("missing/../a/b", true, "a/b"),
            ("abs/new/deeper", true, "a/new/deeper"),
            ("a/b/f/under-a-file", true, "a/b/f/under-a-file"),
            ("chain5", true, "chain45"),
            ("", true, ""),
            ("/", true, ""),
        ];
        for (input, follow, want) in cases {
            let got = resolve_in_root(r, input, *follow).unwrap_or_else(|e| panic!("{input}: {e}"));
            let want = if want.is_empty() { r.to_path_buf() } else { r.join(want) };
            assert_eq!(got, want, "resolving {input:?} follow_final={follow}");
        }
    }

    #[test]
    fn resolve_loops_and_long_chains_end_with_a_clear_error() {
        let t = sample_root();
        for p in ["loop1", "loop2/x", "self", "chain0", "a/../self/x"] {
            let err = resolve_in_root(t.path(), p, true).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, RootfsError::TooManyLinks { .. }), "{p}: {msg}");
            assert!(msg.contains("too many levels of symbolic links resolving /"), "{msg}");
            assert!(msg.contains(&t.path().display().to_string()), "{msg}");
        }
        // a loop in the last component is fine when it is not followed
        assert_eq!(resolve_in_root(t.path(), "loop1", false).unwrap(), t.path().join("loop1"));
    }

    #[test]
    fn resolve_exactly_forty_links_is_allowed() {
        let t = sample_root();
        // chain5 → … → chain45 is 40 links
        assert_eq!(resolve_in_root(t.path(), "chain5", true).unwrap(), t.path().join("chain45"));
        // chain4 needs 41
        assert!(matches!(resolve_in_root(t.path(), "chain4", true), Err(RootfsError::TooManyLinks { .. })));
    }

    #[test]
    fn open_in_root_never_reads_a_host_file() {
        let t = sample_root();
        // /etc/passwd exists on the host; inside the root it does not
        let err = open_in_root(t.path(), "hostpw").unwrap_err();
        assert!(matches!(&err, RootfsError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound), "{err}");
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::write(t.path().join("etc/passwd"), b"inside").unwrap();
        let mut s = String::new();
        open_in_root(t.path(), "hostpw").unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "inside");
    }

    #[test]
    fn create_dir_all_in_root_follows_links_inside_and_sets_mode_and_owner() {
        let t = sample_root();
        let created = create_dir_all_in_root(t.path(), "/abs/x/y", 0o750, Some((1234, 5678))).unwrap();
        assert_eq!(created, vec![t.path().join("a/x"), t.path().join("a/x/y")]);
        for p in &created {
            let m = fs::symlink_metadata(p).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o750);
            assert_eq!((m.uid(), m.gid()), (1234, 5678));
        }
        // existing dirs are left alone
        let before = fs::metadata(t.path().join("a")).unwrap().mode();
        assert!(create_dir_all_in_root(t.path(), "a/b", 0o700, Some((1, 1))).unwrap().is_empty());
        assert_eq!(fs::metadata(t.path().join("a")).unwrap().mode(), before);
        // a file in the way
        let err = create_dir_all_in_root(t.path(), "a/b/f/z", 0o755, None).unwrap_err();
        assert!(matches!(err, RootfsError::NotADirectory { ref component, .. } if component == "/a/b/f"), "{err}");
    }

    #[test]
    fn create_dir_all_through_a_link_to_a_host_dir_stays_inside() {
        let outside = tmp();
        let t = tmp();
        symlink(outside.path(), t.path().join("escape")).unwrap();
        symlink("../../../..", t.path().join("dots")).unwrap();
        create_dir_all_in_root(t.path(), "escape/planted", 0o755, None).unwrap();
        create_dir_all_in_root(t.path(), "dots/planted2", 0o755, None).unwrap();
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0, "nothing written outside");
        let inside = t.path().join(outside.path().strip_prefix("/").unwrap()).join("planted");
        assert!(inside.is_dir(), "absolute link target re-rooted: {}", inside.display());
        assert!(t.path().join("planted2").is_dir(), ".. clamps at the root");
    }

    fn user_root(passwd: &str, group: &str) -> tempfile::TempDir {
        let t = tmp();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        if !passwd.is_empty() {
            fs::write(t.path().join("etc/passwd"), passwd).unwrap();
        }
        if !group.is_empty() {
            fs::write(t.path().join("etc/group"), group).unwrap();
        }
        t
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nadm:x:42:43:adm:/var/adm:/bin/false\n\
                          this is just some garbage data\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:root\nadm:x:43:\ngrp:x:1234:root,adm\nstaff:x:50:adm\nnogroup:x:65534:\n";

    #[test]
    fn lookup_user_table() {
        let t = user_root(PASSWD, GROUP);
        let u = |uid, gid, sg: &[u32]| (uid, gid, sg.to_vec());
        // the runc GetExecUser test table, with BuildKit's fast path and empty-user default
        type Case<'a> = (&'a str, (u32, u32, Vec<u32>));
        let cases: &[Case] = &[
            ("", u(0, 0, &[0, 1234])),
            ("root", u(0, 0, &[0, 1234])),
            ("adm", u(42, 43, &[1234, 50])),
            ("42", u(42, 43, &[1234, 50])),
            ("root:adm", u(0, 43, &[])),
            ("adm:1234", u(42, 1234, &[])),
            ("adm:staff", u(42, 50, &[])),
            ("42:1234", u(42, 1234, &[])),
            ("1337:1234", u(1337, 1234, &[])),
            ("1337", u(1337, 0, &[])),
            ("1337:nogroup", u(1337, 65534, &[])),
            ("root:root", u(0, 0, &[])),
            ("adm:999", u(42, 999, &[])),
        ];
        for (spec, (uid, gid, sg)) in cases {
            let got = lookup_user(t.path(), spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!((got.uid, got.gid, got.additional_gids.clone()), (*uid, *gid, sg.clone()), "USER {spec:?}");
        }
        assert_eq!(lookup_user(t.path(), "adm").unwrap().home.as_deref(), Some("/var/adm"));
    }

    #[test]
    fn lookup_user_errors_name_the_user_or_group() {
        let t = user_root(PASSWD, GROUP);
        let e = lookup_user(t.path(), "www-data").unwrap_err().to_string();
        assert_eq!(e, "unable to find user www-data: no matching entries in passwd file");
        let e = lookup_user(t.path(), "adm:wheel").unwrap_err().to_string();
        assert_eq!(e, "unable to find group wheel: no matching entries in group file");
        let e = lookup_user(t.path(), "4294967296").unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn lookup_user_without_passwd_file() {
        let t = user_root("", "");
        assert_eq!(lookup_user(t.path(), "").unwrap(), UserIds::default());
        assert_eq!(lookup_user(t.path(), "1000").unwrap(), UserIds { uid: 1000, gid: 0, ..Default::default() });
        assert_eq!(lookup_user(t.path(), "1000:1000").unwrap().gid, 1000);
        assert!(matches!(lookup_user(t.path(), "root"), Err(RootfsError::UnknownUser(_))));
        assert!(matches!(lookup_user(t.path(), "1000:staff"), Err(RootfsError::UnknownGroup(_))));
    }

    #[test]
    fn lookup_user_reads_passwd_inside_the_root_only() {
        // /etc is a symlink to an absolute path: it must resolve inside the root
        let t = tmp();
        fs::create_dir_all(t.path().join("real")).unwrap();
        fs::write(t.path().join("real/passwd"), "app:x:1000:1001::/home/app:/bin/sh\n").unwrap();
        symlink("/real", t.path().join("etc")).unwrap();
        let u = lookup_user(t.path(), "app").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1001));
        // a passwd that points at the host's file is not read
        let t2 = tmp();
        fs::create_dir_all(t2.path().join("etc")).unwrap();
        symlink("../../../../../etc/hostname", t2.path().join("etc/passwd")).unwrap();
        assert!(Path::new("/etc/hostname").exists());
        assert!(matches!(lookup_user(t2.path(), "root"), Err(RootfsError::UnknownUser(_))));
        // and a passwd that points at itself through an absolute link is a loop, not a host read
        fs::remove_file(t2.path().join("etc/passwd")).unwrap();
        symlink("/etc/passwd", t2.path().join("etc/passwd")).unwrap();
        assert!(matches!(lookup_user(t2.path(), "root"), Err(RootfsError::TooManyLinks { .. })));
    }

    #[test]
    fn lookup_user_refuses_huge_passwd() {
        let t = user_root("", "");
        let f = File::create(t.path().join("etc/passwd")).unwrap();
        f.set_len(MAX_USER_FILE_BYTES + 1).unwrap();
        assert!(matches!(lookup_user(t.path(), "app"), Err(RootfsError::UserFileTooLarge { .. })));
    }

    #[test]
    fn lookup_chown_table() {
        let t = user_root(PASSWD, GROUP);
        let cases: &[(&str, (u32, u32))] = &[
            ("1234", (1234, 1234)),
            ("1234:5678", (1234, 5678)),
            ("root", (0, 0)),
            ("nobody", (65534, 65534)),
            ("adm", (42, 43)),
            ("adm:staff", (42, 50)),
            ("adm:7", (42, 7)),
            ("33:nogroup", (33, 65534)),
            // BuildKit leaves unknown names at 0 instead of failing
            ("www-data", (0, 0)),
            ("www-data:100", (0, 100)),
            ("adm:nosuchgroup", (42, 43)),
            ("7:root", (7, 0)),
        ];
        for (spec, want) in cases {
            assert_eq!(lookup_chown(t.path(), spec).unwrap(), *want, "--chown={spec}");
        }
        let empty = user_root("", "");
        assert_eq!(lookup_chown(empty.path(), "app:grp").unwrap(), (0, 0));
        assert_eq!(lookup_chown(empty.path(), "5:6").unwrap(), (5, 6));
    }
}
