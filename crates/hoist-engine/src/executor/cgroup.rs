//! Per-build cgroups: every RUN step of one build (parallel stages, several platforms) runs
//! below one cgroup, `hoist/<build>`, whose memory is limited, so that one tenant's build
//! cannot take a shared builder's memory (`hoist serve --build-memory`).
//!
//! The runtime (runc) places a step with the relative `linux.cgroupsPath`
//! `hoist/<build>/<step>` below the cgroup of the process that runs it, which is the
//! builder's own (runc inherits it):
//!
//! - cgroup v1 (and the v1 controllers of a hybrid setup): in every hierarchy, below the
//!   builder's cgroup in that hierarchy (`/proc/self/cgroup`, relative to the hierarchy's
//!   mount root in `/proc/self/mountinfo`): `/sys/fs/cgroup/memory/<own>/hoist/<build>/<step>`.
//!   A hybrid setup's v2 hierarchy (e.g. `/sys/fs/cgroup/unified`) is handled the same way.
//! - cgroup v2 only (`/sys/fs/cgroup` is a cgroup2 mount): below the *parent* of the
//!   builder's cgroup, as the builder's own cgroup has processes and so could not enable
//!   controllers for children: `/sys/fs/cgroup/<parent of own>/hoist/<build>/<step>`.
//!
//! [`BuildCgroup`] creates `hoist/<build>` where the memory controller is, with the limit
//! (`memory.limit_in_bytes` on v1; `memory.max` on v2, the controller enabled in
//! `cgroup.subtree_control` of the parents), counts OOM kills in it
//! ([`BuildCgroup::oom_kills`]), and removes `hoist/<build>` from every hierarchy when it is
//! dropped. It holds an `flock` on its memory cgroup directory while it lives, so that
//! [`remove_leftover_build_cgroups`] (run at executor start) leaves the cgroups of running
//! builds alone, in this process or another builder's.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// First component of every cgroupsPath hoist gives the runtime.
pub const CGROUP_ROOT_NAME: &str = "hoist";

/// Names of build cgroups start with this (step cgroups, `hoist/hoist-<id>`, do not).
pub const BUILD_NAME_PREFIX: &str = "build-";

/// Where runc puts cgroups on cgroup-v2-only machines, whatever mountinfo says (as runc).
const UNIFIED_MOUNTPOINT: &str = "/sys/fs/cgroup";

/// Errors of per-build cgroups; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/cgroup` or `/proc/self/mountinfo` cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// No mounted hierarchy has the memory controller.
    #[error(
        "no cgroup hierarchy with the memory controller is mounted (see /proc/self/mountinfo): \
         mount the v1 memory controller or cgroup v2, or run hoist serve without --build-memory"
    )]
    NoMemoryController,
    /// cgroup v2 is mounted but the memory controller cannot be given to the build cgroup.
    #[error(
        "the memory controller is not available in {path}/cgroup.controllers: enable it for the \
         builder's parent cgroup (e.g. Delegate=yes in its systemd unit), or run hoist serve without --build-memory"
    )]
    V2MemoryUnavailable {
        /// The builder's parent cgroup directory (whose `cgroup.controllers` lacks `memory`).
        path: PathBuf,
    },
    /// A build cgroup name that cannot be a single path component.
    #[error("invalid build cgroup name {0:?}: use letters, digits, '_', '.' and '-' (at most 64)")]
    InvalidName(String),
    /// A cgroup file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. `read` or `create`.
        action: &'static str,
        /// The cgroup file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { action, path, source }
}

/// Which kind of hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// A cgroup v1 hierarchy (`cgroup` filesystem) with one or more controllers.
    V1,
    /// The cgroup v2 hierarchy (`cgroup2`).
    V2,
}

/// One mounted cgroup hierarchy and where runc places relative cgroup paths in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// The v1 controllers (`memory`, `cpu,cpuacct`, `name=systemd`); empty for v2.
    pub controllers: Vec<String>,
    /// The mount point (`/sys/fs/cgroup/memory`).
    pub mount: PathBuf,
    /// The directory a relative cgroupsPath is joined to.
    pub base: PathBuf,
}

impl Hierarchy {
    /// `memory`, `cpu,cpuacct`, or `unified` for v2: for logs.
    pub fn label(&self) -> String {
        match self.version {
            CgroupVersion::V1 => self.controllers.join(","),
            CgroupVersion::V2 => "unified".into(),
        }
    }

    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// The cgroup hierarchies of this machine as seen by this process, as far as runc's
/// placement of relative cgroup paths is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLayout {
    /// Every hierarchy this process is in that is mounted, in `/proc/self/cgroup` order.
    pub hierarchies: Vec<Hierarchy>,
    /// cgroup v2 only (`/sys/fs/cgroup` is the cgroup2 mount): runc uses the v2 manager.
    pub unified_mode: bool,
}

/// `\040` and friends in mountinfo paths.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup mount of mountinfo: fstype, mount root, mount point, super options, and
/// whether the mount itself is read-only.
struct CgroupMount {
    v2: bool,
    root: String,
    mount: PathBuf,
    options: Vec<String>,
    read_only: bool,
}

fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 {
            continue;
        }
        let v2 = match post[0] {
            "cgroup" => false,
            "cgroup2" => true,
            _ => continue,
        };
        out.push(CgroupMount {
            v2,
            root: unescape_octal(pre[3]),
            mount: PathBuf::from(unescape_octal(pre[4])),
            options: post[2].split(',').map(str::to_string).collect(),
            read_only: pre.get(5).is_some_and(|o| o.split(',').any(|o| o == "ro")),
        });
    }
    out
}

/// `own` relative to the mount root `root` (`/` when equal); `None` when it is not below it.
fn relative_to(own: &str, root: &str) -> Option<String> {
    let root = root.trim_end_matches('/');
    if root.is_empty() {
        return Some(own.to_string());
    }
    if own == root {
        return Some("/".into());
    }
    own.strip_prefix(root).filter(|r| r.starts_with('/')).map(str::to_string)
}

/// `base` joined with an absolute cgroup path (`/a/b`).
fn join_cgroup(base: &Path, cgroup: &str) -> PathBuf {
    let mut p = base.to_path_buf();
    for c in cgroup.split('/').filter(|c| !c.is_empty()) {
        p.push(c);
    }
    p
}

/// The parent of a cgroup path (`/a/b` → `/a`, `/` → `/`).
fn cgroup_parent(cgroup: &str) -> &str {
    match cgroup.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((parent, _)) => parent,
    }
}

impl CgroupLayout {
    /// The layout from the text of `/proc/self/cgroup` and `/proc/self/mountinfo`.
    /// Hierarchies whose mount is missing, or whose mount does not show this process's
    /// cgroup, are left out.
    pub fn parse(self_cgroup: &str, mountinfo: &str) -> CgroupLayout {
        let mounts = cgroup_mounts(mountinfo);
        let unified_mode = mounts.iter().any(|m| m.v2 && m.mount == Path::new(UNIFIED_MOUNTPOINT));
        let mut hierarchies = Vec::new();
        for line in self_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(ctrls), Some(own)) = (parts.next(), parts.next(), parts.next()) else { continue };
            if id == "0" && ctrls.is_empty() {
                let Some(m) = mounts.iter().find(|m| m.v2) else { continue };
                let base = if unified_mode {
                    // runc's v2 manager: /sys/fs/cgroup + the parent of the own cgroup.
                    join_cgroup(Path::new(UNIFIED_MOUNTPOINT), cgroup_parent(own))
                } else {
                    let Some(rel) = relative_to(own, &m.root) else { continue };
                    join_cgroup(&m.mount, &rel)
                };
                hierarchies.push(Hierarchy { version: CgroupVersion::V2, controllers: Vec::new(), mount: m.mount.clone(), base });
                continue;
            }
            if unified_mode {
                continue; // runc's v2 manager touches no v1 hierarchy
            }
            let controllers: Vec<String> = ctrls.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect();
            if controllers.is_empty() {
                continue;
            }
            let Some(m) =
                mounts.iter().find(|m| !m.v2 && controllers.iter().all(|c| m.options.contains(c)) && relative_to(own, &m.root).is_some())
            else {
                continue;
            };
            let rel = relative_to(own, &m.root).unwrap_or_default();
            hierarchies.push(Hierarchy {
                version: CgroupVersion::V1,
                controllers,
                mount: m.mount.clone(),
                base: join_cgroup(&m.mount, &rel),
            });
        }
        CgroupLayout { hierarchies, unified_mode }
    }

    /// The layout of this process (`/proc/self/cgroup`, `/proc/self/mountinfo`).
    pub fn current() -> Result<CgroupLayout, CgroupError> {
        let read = |p: &str| std::fs::read_to_string(p).map_err(|source| CgroupError::Read { path: p.into(), source });
        Ok(CgroupLayout::parse(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?))
    }

    /// The hierarchy that limits memory: the v1 one with the memory controller, or the v2
    /// one on a cgroup-v2-only machine (whether its memory controller is available is only
    /// known from its files: [`BuildCgroup::create`] checks).
    pub fn memory(&self) -> Option<&Hierarchy> {
        if self.unified_mode {
            self.hierarchies.iter().find(|h| h.version == CgroupVersion::V2)
        } else {
            self.hierarchies.iter().find(|h| h.version == CgroupVersion::V1 && h.has("memory"))
        }
    }

    /// Where a relative cgroupsPath (`hoist/<build>`) lands in every hierarchy.
    pub fn dirs_of(&self, relative: &str) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| join_cgroup(&h.base, relative)).collect()
    }
}

/// In a container (`/.dockerenv`, `/run/.containerenv` or `$container`), make the cgroup
/// hierarchies writable where they are mounted read-only, as a container engine mounts
/// them in a container that is not privileged
/// (the docker-container builder): each such mount is remounted read-write (a bind
/// remount, which changes only that mount, keeping nosuid, nodev and noexec). Needs
/// CAP_SYS_ADMIN and a mount policy that allows it. Returns what stays read-only, for the
/// builder to say which limits it cannot apply (runc cannot place steps in those).
pub fn make_hierarchies_writable() -> Vec<String> {
    // Only in a container: on a host, read-only cgroup mounts are the administrator's choice
    // and the builder's mount namespace is the host's.
    let in_container =
        Path::new("/.dockerenv").exists() || Path::new("/run/.containerenv").exists() || std::env::var_os("container").is_some();
    if !in_container {
        return Vec::new();
    }
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut stuck = Vec::new();
    for m in cgroup_mounts(&mountinfo).into_iter().filter(|m| m.read_only) {
        use rustix::mount::MountFlags;
        let flags = MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        match rustix::mount::mount_remount(&m.mount, flags, c"") {
            Ok(()) => tracing::info!(mount = %m.mount.display(), "remounted the read-only cgroup hierarchy read-write"),
            Err(e) => stuck.push(format!("{} ({})", m.mount.display(), std::io::Error::from(e))),
        }
    }
    stuck
}

/// The inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`): a process whose
/// `/proc/self/ns/cgroup` has another is in a cgroup namespace of its own (a container's).
const INIT_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// Whether the builder must leave the root of its cgroup namespace before steps can have
/// cgroups: on cgroup v2 only, in a namespace of its own (a container with a private cgroup
/// namespace, the default on v2), at that namespace's root, which then has processes and so
/// cannot enable controllers for children. Never in the initial namespace (a host's root).
pub fn must_leave_namespace_root(self_cgroup: &str, v2_only: bool, cgroup_ns_ino: u64) -> bool {
    v2_only && cgroup_ns_ino != INIT_CGROUP_NS_INO && self_cgroup.trim() == "0::/"
}

/// On cgroup v2 in a container's own cgroup namespace: move the container's processes
/// from the namespace's root into `init/` and enable the available controllers for the
/// root's children, so that runc can create step cgroups (`hoist/…` below the parent of
/// the own cgroup, now the root) with memory and pids limits. Returns what failed.
pub fn leave_namespace_root() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let v2_only = Path::new(UNIFIED_MOUNTPOINT).join("cgroup.controllers").exists();
    let ino = std::fs::metadata("/proc/self/ns/cgroup").map(|m| m.ino()).unwrap_or(INIT_CGROUP_NS_INO);
    if !must_leave_namespace_root(&own, v2_only, ino) {
        return None;
    }
    let root = Path::new(UNIFIED_MOUNTPOINT);
    let init = root.join("init");
    if let Err(e) = std::fs::create_dir(&init) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Some(format!("creating {}: {e}", init.display()));
        }
    }
    let procs = std::fs::read_to_string(root.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter(|l| !l.trim().is_empty()) {
        // A process that exited meanwhile is not an error.
        let _ = std::fs::write(init.join("cgroup.procs"), pid.trim());
    }
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let mut failed = Vec::new();
    for c in controllers.split_whitespace() {
        if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            failed.push(format!("{c} ({e})"));
        }
    }
    (!failed.is_empty()).then(|| format!("controllers not enabled for steps: {}", failed.join(", ")))
}

/// The device rules of this process's own devices cgroup (v1 `devices.list`), when they
/// do not allow every device: a step's cgroup cannot be given more than its parent has, so
/// an insecure step gets these instead of `a *:* rwm`. `None`: every device is allowed
/// (or there is no v1 devices hierarchy, as on cgroup v2, where runc filters with eBPF).
pub fn own_device_rules(layout: &CgroupLayout) -> Option<Vec<DeviceRule>> {
    let h = layout.hierarchies.iter().find(|h| h.version == CgroupVersion::V1 && h.has("devices"))?;
    let text = std::fs::read_to_string(h.base.join("devices.list")).ok()?;
    parse_device_list(&text)
}

/// One rule of a v1 `devices.list`: `c 1:3 rwm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRule {
    /// `c`, `b` or `a`.
    pub kind: String,
    /// The major number, `None` for `*`.
    pub major: Option<i64>,
    /// The minor number, `None` for `*`.
    pub minor: Option<i64>,
    /// `r`, `w`, `m` or a combination.
    pub access: String,
}

/// The rules of a `devices.list`; `None` when it allows every device (`a *:* rwm`).
pub fn parse_device_list(text: &str) -> Option<Vec<DeviceRule>> {
    let mut rules = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line == "a *:* rwm" {
            return None;
        }
        let mut parts = line.split_whitespace();
        let (Some(kind), Some(numbers), Some(access)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let Some((major, minor)) = numbers.split_once(':') else { continue };
        let num = |n: &str| if n == "*" { Some(None) } else { n.parse().ok().map(Some) };
        let (Some(major), Some(minor)) = (num(major), num(minor)) else { continue };
        rules.push(DeviceRule { kind: kind.to_string(), major, minor, access: access.to_string() });
    }
    Some(rules)
}

/// On cgroup v2, the directories whose `cgroup.subtree_control` must list `memory` for
/// `<base>/<relative>` to have `memory.max`: `base` and every directory between it and the
/// leaf (the leaf itself needs it only for its children, which runc enables).
pub fn v2_subtree_chain(base: &Path, relative: &str) -> Vec<PathBuf> {
    let comps: Vec<&str> = relative.split('/').filter(|c| !c.is_empty()).collect();
    let mut out = vec![base.to_path_buf()];
    let mut p = base.to_path_buf();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        p.push(c);
        out.push(p.clone());
    }
    out
}

/// The step's `linux.cgroupsPath`: `<parent>/<step id>` in a build cgroup, else
/// `hoist/<step id>`.
pub(crate) fn step_cgroups_path(parent: Option<&str>, step_id: &str) -> String {
    match parent {
        Some(p) => format!("{}/{step_id}", p.trim_end_matches('/')),
        None => format!("{CGROUP_ROOT_NAME}/{step_id}"),
    }
}

/// Whether `parent` can be a `RunSpec::cgroup_parent`: relative, components of
/// `[A-Za-z0-9_.-]`, none `.` or `..`.
pub(crate) fn valid_cgroup_parent(parent: &str) -> bool {
    !parent.is_empty() && parent.len() <= 512 && parent.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    !c.is_empty() && c != "." && c != ".." && c.len() <= 64 && c.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `oom_kill 3` in `memory.events` (v2) or `memory.oom_control` (v1).
pub fn parse_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// How the build cgroup's OOM kills are counted.
#[derive(Debug)]
enum OomCounter {
    /// v1: `oom_kill` of `memory.oom_control` counts only kills of processes directly in
    /// that cgroup (it does not add up children, and a step's own cgroup is gone when its
    /// runtime returns), so the build cgroup's OOM notifications are counted instead: an
    /// eventfd registered through `cgroup.event_control` on its `memory.oom_control`, which
    /// the kernel signals for every OOM of the limited cgroup (steps included).
    V1Events { eventfd: std::fs::File, seen: Mutex<u64> },
    /// v1 when the eventfd could not be registered: the local counter only.
    V1Local,
    /// v2: `oom_kill` of `memory.events` (hierarchical).
    V2,
}

/// The cgroup all RUN steps of one build share, with a memory limit. Dropping it removes
/// `hoist/<build>` (and what runc left below it) from every hierarchy, best effort.
#[derive(Debug)]
pub struct BuildCgroup {
    name: String,
    parent: String,
    limit: u64,
    layout: CgroupLayout,
    memory_dir: PathBuf,
    oom: OomCounter,
    /// An exclusive flock on `memory_dir`: the cgroup is in use.
    _lock: OwnedFd,
}

/// A random build cgroup name: `build-<16 hex>`.
pub fn random_build_name() -> String {
    format!("{BUILD_NAME_PREFIX}{}", hoist_oci::random::hex(8))
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err("write", path))
}

fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(path)?;
    Ok(OwnedFd::from(f))
}

/// Try to take the in-use lock of a build's memory cgroup; `None` when it is held.
fn try_lock(dir: &Path) -> std::io::Result<Option<OwnedFd>> {
    let fd = open_dir(dir)?;
    match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(fd)),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Make `dir` (below an existing cgroup) and lock it, retrying if a concurrent cleanup
/// removed it between the two.
fn create_locked(dir: &Path) -> Result<OwnedFd, CgroupError> {
    for _ in 0..5 {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let Some(fd) = try_lock(dir).map_err(io_err("lock", dir))? else {
            return Err(CgroupError::Io {
                action: "lock",
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "another build holds this cgroup"),
            });
        };
        let held = rustix::fs::fstat(&fd).map_err(|e| CgroupError::Io { action: "stat", path: dir.to_path_buf(), source: e.into() })?;
        if std::fs::metadata(dir).is_ok_and(|m| m.ino() == held.st_ino) {
            return Ok(fd);
        }
    }
    Err(CgroupError::Io { action: "create", path: dir.to_path_buf(), source: std::io::Error::other("it keeps being removed") })
}

/// Register an eventfd for OOM notifications of a v1 memory cgroup.
fn register_oom_eventfd(dir: &Path) -> std::io::Result<std::fs::File> {
    let control = std::fs::File::open(dir.join("memory.oom_control"))?;
    // SAFETY: eventfd has no memory preconditions; the result is checked before use.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor owned by nobody else.
    let efd = unsafe { std::fs::File::from_raw_fd(raw) };
    let mut ctl = std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.event_control"))?;
    ctl.write_all(format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()).as_bytes())?;
    Ok(efd)
}

impl BuildCgroup {
    /// Create `hoist/<name>` in the memory hierarchy, below where runc will place the
    /// build's steps, limited to `limit` bytes.
    pub fn create(name: &str, limit: u64) -> Result<BuildCgroup, CgroupError> {
        Self::create_in(CgroupLayout::current()?, name, limit)
    }

    /// [`BuildCgroup::create`] with a given layout.
    pub fn create_in(layout: CgroupLayout, name: &str, limit: u64) -> Result<BuildCgroup, CgroupError> {
        if !valid_component(name) {
            return Err(CgroupError::InvalidName(name.to_string()));
        }
        let parent = format!("{CGROUP_ROOT_NAME}/{name}");
        let mem = layout.memory().ok_or(CgroupError::NoMemoryController)?.clone();
        let memory_dir = join_cgroup(&mem.base, &parent);
        let (lock, oom) = match mem.version {
            CgroupVersion::V1 => {
                let lock = create_locked(&memory_dir)?;
                match Self::limit_v1(&memory_dir, limit) {
                    Ok(oom) => (lock, oom),
                    Err(e) => {
                        let _ = std::fs::remove_dir(&memory_dir);
                        return Err(e);
                    }
                }
            }
            CgroupVersion::V2 => {
                let controllers = mem.base.join("cgroup.controllers");
                let available = std::fs::read_to_string(&controllers).map_err(io_err("read", &controllers))?;
                if !available.split_whitespace().any(|c| c == "memory") {
                    return Err(CgroupError::V2MemoryUnavailable { path: mem.base.clone() });
                }
                for dir in v2_subtree_chain(&mem.base, &parent) {
                    std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
                    let control = dir.join("cgroup.subtree_control");
                    let enabled = std::fs::read_to_string(&control).map_err(io_err("read", &control))?;
                    if !enabled.split_whitespace().any(|c| c == "memory") {
                        write_file(&control, "+memory")?;
                    }
                }
                let lock = create_locked(&memory_dir)?;
                let limited = write_file(&memory_dir.join("memory.max"), &limit.to_string());
                if let Err(e) = limited {
                    let _ = std::fs::remove_dir(&memory_dir);
                    return Err(e);
                }
                let swap = memory_dir.join("memory.swap.max");
                if swap.exists() {
                    if let Err(e) = write_file(&swap, "0") {
                        tracing::warn!("build cgroup: steps may swap beyond the memory limit: {e}");
                    }
                }
                (lock, OomCounter::V2)
            }
        };
        Ok(BuildCgroup { name: name.to_string(), parent, limit, layout, memory_dir, oom, _lock: lock })
    }

    fn limit_v1(dir: &Path, limit: u64) -> Result<OomCounter, CgroupError> {
        let hier = dir.join("memory.use_hierarchy");
        if std::fs::read_to_string(&hier).is_ok_and(|v| v.trim() == "0") {
            write_file(&hier, "1")?; // otherwise the limit would not cover the steps below
        }
        write_file(&dir.join("memory.limit_in_bytes"), &limit.to_string())?;
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            if let Err(e) = write_file(&memsw, &limit.to_string()) {
                tracing::warn!("build cgroup: steps may swap beyond the memory limit: {e}");
            }
        }
        Ok(match register_oom_eventfd(dir) {
            Ok(eventfd) => OomCounter::V1Events { eventfd, seen: Mutex::new(0) },
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), "cannot register for OOM notifications; an OOM kill may be reported as a plain exit code 137: {e}");
                OomCounter::V1Local
            }
        })
    }

    /// The build's name (`build-…`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `hoist/<build>`: the `RunSpec::cgroup_parent` of the build's steps.
    pub fn parent(&self) -> &str {
        &self.parent
    }

    /// The memory limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The cgroup that holds the limit.
    pub fn memory_dir(&self) -> &Path {
        &self.memory_dir
    }

    /// `hoist/<build>` in every hierarchy (most exist only once a step ran).
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.layout.dirs_of(&self.parent)
    }

    /// How many times the build hit its limit and the kernel OOM-killed a process of it,
    /// since the cgroup was made. Compare before and after a step.
    pub fn oom_kills(&self) -> u64 {
        match &self.oom {
            OomCounter::V1Events { eventfd, seen } => {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let mut buf = [0u8; 8];
                let mut f = eventfd;
                if let Ok(8) = f.read(&mut buf) {
                    *seen += u64::from_ne_bytes(buf);
                }
                *seen
            }
            OomCounter::V1Local => std::fs::read_to_string(self.memory_dir.join("memory.oom_control"))
                .ok()
                .and_then(|t| parse_keyed(&t, "oom_kill"))
                .unwrap_or(0),
            OomCounter::V2 => {
                std::fs::read_to_string(self.memory_dir.join("memory.events")).ok().and_then(|t| parse_keyed(&t, "oom_kill")).unwrap_or(0)
            }
        }
    }
}

impl Drop for BuildCgroup {
    fn drop(&mut self) {
        for dir in self.dirs() {
            if let Err(e) = remove_tree(&dir) {
                tracing::warn!(cgroup = %dir.display(), "cannot remove the build cgroup: {e}");
            }
        }
    }
}

/// Directories of a cgroup tree, deepest first (the root last).
fn tree_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        if let Ok(entries) = std::fs::read_dir(&all[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    all.push(e.path());
                }
            }
        }
        i += 1;
    }
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    all
}

/// rmdir a cgroup and its children, deepest first; a missing tree is fine.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    let mut first_err = None;
    for d in tree_deepest_first(dir) {
        match std::fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                first_err.get_or_insert(std::io::Error::new(e.kind(), format!("{}: {e}", d.display())));
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn has_processes(dir: &Path) -> bool {
    tree_deepest_first(dir).iter().any(|d| std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty()))
}

/// Remove the build cgroups (`hoist/build-*`) a crashed builder left below this process's
/// cgroups, in every hierarchy: skipped are those of live builds (their lock is held, by this
/// process or another builder) and those that still have processes. Returns how many builds'
/// cgroups were removed. Best effort: problems are logged.
pub fn remove_leftover_build_cgroups() -> usize {
    match CgroupLayout::current() {
        Ok(layout) => remove_leftover_build_cgroups_in(&layout),
        Err(e) => {
            tracing::warn!("cannot look for leftover build cgroups: {e}");
            0
        }
    }
}

/// [`remove_leftover_build_cgroups`] with a given layout.
pub fn remove_leftover_build_cgroups_in(layout: &CgroupLayout) -> usize {
    let mut names = std::collections::BTreeSet::new();
    for h in &layout.hierarchies {
        if let Ok(entries) = std::fs::read_dir(join_cgroup(&h.base, CGROUP_ROOT_NAME)) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(BUILD_NAME_PREFIX) && e.file_type().is_ok_and(|t| t.is_dir()) {
                    names.insert(name);
                }
            }
        }
    }
    let memory = layout.memory();
    let mut removed = 0;
    for name in names {
        let relative = format!("{CGROUP_ROOT_NAME}/{name}");
        // Held while we remove it, so that no build of the same name can start meanwhile.
        let _lock = match memory.map(|m| join_cgroup(&m.base, &relative)) {
            Some(dir) if dir.exists() => match try_lock(&dir) {
                Ok(Some(fd)) => Some(fd),
                Ok(None) => continue, // a live build
                Err(e) => {
                    tracing::warn!(cgroup = %dir.display(), "cannot check whether a build uses this cgroup: {e}");
                    continue;
                }
            },
            _ => None,
        };
        let dirs = layout.dirs_of(&relative);
        if let Some(busy) = dirs.iter().find(|d| has_processes(d)) {
            tracing::info!(cgroup = %busy.display(), "leftover build cgroup still has processes; leaving it");
            continue;
        }
        let mut ok = true;
        for d in &dirs {
            if let Err(e) = remove_tree(d) {
                tracing::warn!(cgroup = %d.display(), "cannot remove leftover build cgroup: {e}");
                ok = false;
            }
        }
        if ok {
            tracing::info!(build = %name, "removed the cgroups of a build a previous run left");
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This lab: hybrid, v1 controllers in their own mounts, the memory cgroup of the
    /// process below the root, an empty v2 hierarchy at /sys/fs/cgroup/unified.
    const HYBRID_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n\
        4:memory:/process_api/abc\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";
    const HYBRID_MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_v1_memory_is_below_the_own_memory_cgroup_and_every_hierarchy_is_cleaned() {
        let l = CgroupLayout::parse(HYBRID_CGROUP, HYBRID_MOUNTINFO);
        assert!(!l.unified_mode);
        let mem = l.memory().unwrap();
        assert_eq!(mem.version, CgroupVersion::V1);
        assert_eq!(mem.base, Path::new("/sys/fs/cgroup/memory/process_api/abc"));
        let dirs = l.dirs_of("hoist/build-1");
        assert_eq!(dirs.len(), 10, "{dirs:#?}");
        for want in [
            "/sys/fs/cgroup/memory/process_api/abc/hoist/build-1",
            "/sys/fs/cgroup/pids/hoist/build-1",
            "/sys/fs/cgroup/systemd/hoist/build-1",
            "/sys/fs/cgroup/cpu/hoist/build-1",
            "/sys/fs/cgroup/unified/hoist/build-1",
        ] {
            assert!(dirs.contains(&PathBuf::from(want)), "{want} not in {dirs:#?}");
        }
        let unified = l.hierarchies.iter().find(|h| h.version == CgroupVersion::V2).unwrap();
        assert_eq!(unified.label(), "unified");
    }

    #[test]
    fn v1_co_mounted_controllers_and_a_nested_mount_root() {
        // In a container without its own cgroup namespace: the hierarchies are mounted from
        // the container's cgroup, which /proc/self/cgroup shows with its host path.
        let cg = "5:cpu,cpuacct:/docker/abc/inner\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n";
        let mi = "\
40 30 0:40 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct
41 30 0:41 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
42 30 0:42 /docker/abc /sys/fs/cgroup/systemd ro,nosuid - cgroup cgroup rw,xattr,name=systemd
";
        let l = CgroupLayout::parse(cg, mi);
        assert_eq!(l.memory().unwrap().base, Path::new("/sys/fs/cgroup/memory"));
        let cpu = l.hierarchies.iter().find(|h| h.has("cpu")).unwrap();
        assert_eq!(cpu.label(), "cpu,cpuacct");
        assert_eq!(cpu.base, Path::new("/sys/fs/cgroup/cpu,cpuacct/inner"));
        assert_eq!(l.dirs_of("hoist/b")[2], Path::new("/sys/fs/cgroup/systemd/hoist/b"));
    }

    #[test]
    fn a_hierarchy_whose_mount_does_not_show_our_cgroup_is_left_out() {
        let cg = "4:memory:/elsewhere\n8:pids:/\n";
        let mi = "41 30 0:41 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                  42 30 0:42 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let l = CgroupLayout::parse(cg, mi);
        assert!(l.memory().is_none());
        assert_eq!(l.hierarchies.len(), 1);
    }

    #[test]
    fn pure_v2_uses_the_parent_of_the_own_cgroup_as_runc_does() {
        let cg = "0::/system.slice/hoist.service\n";
        let mi =
            "25 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let l = CgroupLayout::parse(cg, mi);
        assert!(l.unified_mode);
        let mem = l.memory().unwrap();
        assert_eq!(mem.version, CgroupVersion::V2);
        assert_eq!(mem.base, Path::new("/sys/fs/cgroup/system.slice"));
        assert_eq!(l.dirs_of("hoist/build-1"), vec![PathBuf::from("/sys/fs/cgroup/system.slice/hoist/build-1")]);
        // memory must be in the subtree_control of the base and of hoist/ for build-1 to
        // have memory.max; runc enables it below build-1 itself.
        assert_eq!(
            v2_subtree_chain(&mem.base, "hoist/build-1"),
            vec![PathBuf::from("/sys/fs/cgroup/system.slice"), PathBuf::from("/sys/fs/cgroup/system.slice/hoist")]
        );
        // In the root cgroup (a container with its own cgroup namespace): the root itself.
        let l = CgroupLayout::parse("0::/\n", mi);
        assert_eq!(l.memory().unwrap().base, Path::new("/sys/fs/cgroup"));
        let l = CgroupLayout::parse("0::/init.scope\n", mi);
        assert_eq!(l.memory().unwrap().base, Path::new("/sys/fs/cgroup"));
    }

    #[test]
    fn hybrid_without_a_memory_mount_has_no_memory_hierarchy_even_with_v2() {
        let cg = "8:pids:/\n0::/\n";
        let mi = "39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let l = CgroupLayout::parse(cg, mi);
        assert!(!l.unified_mode);
        assert!(l.memory().is_none());
        assert_eq!(l.hierarchies.len(), 2);
    }

    /// A container's cgroup mounts are read-only; the rest of mountinfo is left alone.
    #[test]
    fn read_only_cgroup_mounts_are_found() {
        let mi = "1 0 0:1 /docker/x /sys/fs/cgroup/pids ro,nosuid,nodev,noexec,relatime - cgroup cgroup ro,pids\n\
                  2 0 0:2 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                  3 0 0:3 / /proc ro,nosuid - proc proc ro\n";
        let ro: Vec<PathBuf> = cgroup_mounts(mi).into_iter().filter(|m| m.read_only).map(|m| m.mount).collect();
        assert_eq!(ro, vec![PathBuf::from("/sys/fs/cgroup/pids")]);
    }

    /// An unprivileged container's devices cgroup allows a few character devices; a step
    /// below it gets those. A host's (or a privileged container's) allows all.
    #[test]
    fn device_lists_parse_and_allow_all_is_none() {
        assert_eq!(parse_device_list("a *:* rwm\n"), None);
        let rules = parse_device_list("c *:* m\nb *:* m\nc 1:3 rwm\nc 136:* rwm\nnonsense\n").unwrap();
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0], DeviceRule { kind: "c".into(), major: None, minor: None, access: "m".into() });
        assert_eq!(rules[2], DeviceRule { kind: "c".into(), major: Some(1), minor: Some(3), access: "rwm".into() });
        assert_eq!(rules[3].minor, None);
    }

    /// Only a v2 container's namespace root is left; never a host's root, a v1 machine, or
    /// a builder already below the root.
    #[test]
    fn only_the_root_of_a_private_v2_namespace_is_left() {
        let private = INIT_CGROUP_NS_INO - 7;
        assert!(must_leave_namespace_root("0::/\n", true, private));
        assert!(!must_leave_namespace_root("0::/\n", true, INIT_CGROUP_NS_INO), "a host's root cgroup");
        assert!(!must_leave_namespace_root("0::/init\n", true, private), "already below the root");
        assert!(!must_leave_namespace_root("8:pids:/\n0::/\n", false, private), "v1 or hybrid");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let cg = "4:memory:/a b\n";
        let mi = "41 30 0:41 / /sys/fs/cgroup/mem\\040ory rw - cgroup cgroup rw,memory\n";
        let l = CgroupLayout::parse(cg, mi);
        assert_eq!(l.memory().unwrap().base, Path::new("/sys/fs/cgroup/mem ory/a b"));
    }

    #[test]
    fn step_paths_go_below_the_build_cgroup_when_there_is_one() {
        assert_eq!(step_cgroups_path(None, "hoist-1"), "hoist/hoist-1");
        assert_eq!(step_cgroups_path(Some("hoist/build-7"), "hoist-1"), "hoist/build-7/hoist-1");
        assert!(valid_cgroup_parent("hoist/build-7"));
        for bad in ["", "/hoist/x", "hoist/../x", "hoist//x", "hoist/x y", "hoist/."] {
            assert!(!valid_cgroup_parent(bad), "{bad:?}");
        }
    }

    #[test]
    fn oom_counters_are_read_from_their_keyed_files() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_keyed(v1, "oom_kill"), Some(3));
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_keyed(v2, "oom_kill"), Some(2));
        assert_eq!(parse_keyed(v2, "oom"), Some(2));
        assert_eq!(parse_keyed("", "oom_kill"), None);
    }

    #[test]
    fn build_names_are_random_single_components() {
        let (a, b) = (random_build_name(), random_build_name());
        assert_ne!(a, b);
        assert!(a.starts_with(BUILD_NAME_PREFIX) && valid_component(&a), "{a}");
        let err = BuildCgroup::create_in(CgroupLayout::parse(HYBRID_CGROUP, HYBRID_MOUNTINFO), "../x", 1 << 20).unwrap_err();
        assert!(matches!(err, CgroupError::InvalidName(_)), "{err}");
        let err = BuildCgroup::create_in(CgroupLayout { hierarchies: Vec::new(), unified_mode: false }, "build-x", 1 << 20).unwrap_err();
        assert!(err.to_string().contains("--build-memory"), "{err}");
    }
}
