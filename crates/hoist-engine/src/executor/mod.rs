//! The executor runs a RUN step's process in an OCI runtime (runc, or crun where cgroups
//! allow) over a rootfs the snapshotter mounted, and owns everything about that container:
//! the OCI config (namespaces, capabilities, system mounts, masked paths, limits), the
//! generated /etc/hosts and /etc/resolv.conf, the sandboxed network of default-network steps
//! (`network`), mount stubs that must not end up in the
//! layer (the /proc, /dev and /sys mount points do, as with BuildKit), output streaming, cancellation and timeouts (every process of the step is
//! killed), the cgroup one build's steps share with its memory limit ([`BuildCgroup`]),
//! cleanup after a daemon crash, and whether a foreign platform can run at all
//! ([`check_emulation`]).
//!
//! The engine resolves users, cache directories and secrets before calling
//! [`Executor::run`]: a [`RunSpec`] holds final values only.

mod cgroup;
mod emulation;
mod network;
mod seccomp;
mod spec;
mod stubs;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;

use oci_spec::runtime::PosixRlimitType;

use crate::graph::{NetworkMode, SecurityMode};

pub use cgroup::{random_build_name, remove_leftover_build_cgroups, BuildCgroup, CgroupError, CgroupLayout, CgroupVersion, Hierarchy};
pub use emulation::{check_emulation, qemu_arch};
pub use network::{Ipv4Subnet, NetError, SandboxNetConfig, DEFAULT_BRIDGE, DEFAULT_SUBNET};
pub use spec::{DEFAULT_HOSTNAME, DOCKER_DEFAULT_CAPS};

/// Default `pids.max` of a step's cgroup: bounds fork storms.
pub const DEFAULT_PIDS_LIMIT: i64 = 4096;

/// Environment variable naming the OCI runtime (a path or a name on PATH).
pub const RUNTIME_ENV: &str = "HOIST_RUNTIME";

/// One process to run in a container. All values are final (users resolved to ids, paths
/// absolute, mounts prepared on the host).
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Container id, unique among running steps: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 64.
    pub id: String,
    /// The root filesystem: the merged mount of [`crate::snapshot::ActiveMount`].
    pub rootfs: PathBuf,
    /// argv; `args[0]` is looked up in the PATH of `env`.
    pub args: Vec<String>,
    /// `KEY=value` pairs, exactly as the process gets them.
    pub env: Vec<String>,
    /// Absolute working directory; created (owned by `uid:gid`) if missing, as BuildKit does.
    pub cwd: String,
    /// Numeric user of the process (the engine resolves `USER` names).
    pub uid: u32,
    /// Numeric primary group.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// [`NetworkMode::Default`] is a sandboxed network (its own namespace on the executor's
    /// bridge, outbound through NAT, no route to the builder, link-local addresses or other
    /// steps); `None` has loopback only; `Host` is the builder's network.
    pub network: NetworkMode,
    /// `Sandbox`: Docker's default capabilities, masked paths, read-only /sys, no devices.
    /// `Insecure`: every capability the executor holds, nothing masked, all devices allowed.
    pub security: SecurityMode,
    /// The step's mounts (cache dirs, secrets, bind sources, tmpfs), in any order.
    pub mounts: Vec<ExecMount>,
    /// Hostname inside the container; empty means [`DEFAULT_HOSTNAME`].
    pub hostname: String,
    /// `--add-host` entries as `(hostname, ip)`, appended to /etc/hosts.
    pub extra_hosts: Vec<(String, String)>,
    /// Wall-clock limit; the step is killed and [`ExecError::Timeout`] returned after it.
    pub timeout: Option<Duration>,
    /// The cgroup the step's own cgroup goes below, relative as runc takes it
    /// ([`BuildCgroup::parent`], `hoist/<build>`): the step's cgroupsPath is
    /// `<parent>/<id>`. `None`: `hoist/<id>`.
    pub cgroup_parent: Option<String>,
    /// Size of /dev/shm in bytes (`--shm-size`); `None`: 64 MiB, as Docker's default.
    pub shm_size: Option<u64>,
    /// Resource limits of the process (`--ulimit`), replacing the builder's default of each.
    pub ulimits: Vec<Ulimit>,
}

/// A resource limit of a step's process, as `--ulimit name=soft[:hard]` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ulimit {
    /// Docker's name of the resource: `nofile`, `nproc`, `core`, …
    pub name: String,
    /// The resource as the OCI config names it.
    pub kind: PosixRlimitType,
    /// The soft limit.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Docker's ulimit names with the resource each is.
const ULIMITS: [(&str, rustix::process::Resource, PosixRlimitType); 16] = {
    use rustix::process::Resource as R;
    use PosixRlimitType as T;
    [
        ("as", R::As, T::RlimitAs),
        ("core", R::Core, T::RlimitCore),
        ("cpu", R::Cpu, T::RlimitCpu),
        ("data", R::Data, T::RlimitData),
        ("fsize", R::Fsize, T::RlimitFsize),
        ("locks", R::Locks, T::RlimitLocks),
        ("memlock", R::Memlock, T::RlimitMemlock),
        ("msgqueue", R::Msgqueue, T::RlimitMsgqueue),
        ("nice", R::Nice, T::RlimitNice),
        ("nofile", R::Nofile, T::RlimitNofile),
        ("nproc", R::Nproc, T::RlimitNproc),
        ("rss", R::Rss, T::RlimitRss),
        ("rtprio", R::Rtprio, T::RlimitRtprio),
        ("rttime", R::Rttime, T::RlimitRttime),
        ("sigpending", R::Sigpending, T::RlimitSigpending),
        ("stack", R::Stack, T::RlimitStack),
    ]
};

/// Why a `--ulimit` value cannot be used (the message names the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UlimitError(String);

impl Ulimit {
    /// Parse Docker's `name=soft[:hard]` (`-1`: unlimited; hard defaults to soft). A limit
    /// above the builder's own hard limit of that resource is refused: a step cannot raise
    /// what the builder cannot.
    pub fn parse(s: &str) -> Result<Ulimit, UlimitError> {
        let err = |m: String| UlimitError(m);
        let (name, value) = s.split_once('=').ok_or_else(|| err(format!("{s:?}: expected name=soft[:hard]")))?;
        let (resource, kind) =
            ULIMITS.iter().find(|(n, _, _)| *n == name).map(|(_, r, k)| (*r, *k)).ok_or_else(|| {
                err(format!("{s:?}: unknown resource {name:?} (expected one of {})", ULIMITS.map(|(n, _, _)| n).join(", ")))
            })?;
        let number = |v: &str| match v {
            "-1" => Ok(u64::MAX),
            v => v.parse::<u64>().map_err(|_| err(format!("{s:?}: {v:?} is not a number"))),
        };
        let (soft, hard) = match value.split_once(':') {
            Some((soft, hard)) => (number(soft)?, number(hard)?),
            None => (number(value)?, number(value)?),
        };
        if soft > hard {
            return Err(err(format!("{s:?}: the soft limit is above the hard limit")));
        }
        let builder = rustix::process::getrlimit(resource).maximum.unwrap_or(u64::MAX);
        if hard > builder {
            return Err(err(format!("{s:?}: above the builder's own hard limit of {name} ({builder})")));
        }
        Ok(Ulimit { name: name.to_string(), kind, soft, hard })
    }
}

impl RunSpec {
    /// A spec with defaults: no env, cwd `/`, root, default network, sandbox, no mounts.
    pub fn new(id: impl Into<String>, rootfs: impl Into<PathBuf>, args: Vec<String>) -> RunSpec {
        RunSpec {
            id: id.into(),
            rootfs: rootfs.into(),
            args,
            env: Vec::new(),
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            network: NetworkMode::Default,
            security: SecurityMode::Sandbox,
            mounts: Vec::new(),
            hostname: String::new(),
            extra_hosts: Vec::new(),
            timeout: None,
            cgroup_parent: None,
            shm_size: None,
            ulimits: Vec::new(),
        }
    }
}

/// A mount of a step besides the rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecMount {
    /// Bind a host file or directory (recursively) at `target`; `readonly` remounts it ro.
    /// A missing target is created as a file or directory like the source, and removed after.
    Bind {
        /// The host path; must exist.
        source: PathBuf,
        /// Absolute path inside the container.
        target: String,
        /// Mount it read-only.
        readonly: bool,
    },
    /// A fresh tmpfs at `target` (`size` in bytes; kernel default when `None`).
    Tmpfs {
        /// Absolute path inside the container.
        target: String,
        /// Size limit in bytes; `None` is the kernel default.
        size: Option<u64>,
    },
}

impl ExecMount {
    /// The absolute path inside the container.
    pub fn target(&self) -> &str {
        match self {
            ExecMount::Bind { target, .. } | ExecMount::Tmpfs { target, .. } => target,
        }
    }
}

/// Which output stream a [`LogChunk`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogStream {
    /// The process's standard output.
    Stdout,
    /// The process's standard error (also where the runtime writes its own errors).
    Stderr,
}

/// Output of a step as it arrives (not line-buffered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// Where the bytes came from.
    pub stream: LogStream,
    /// The bytes as read from the pipe (any length, not split at lines).
    pub data: Bytes,
}

/// How a step's process ended. A non-zero code is not an error of the executor: the engine
/// reports "RUN failed with exit code N". A process killed by signal `S` has code `128 + S`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code (0–255; `128 + signal` after a signal).
    pub code: i32,
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Errors of the executor. `command` is the step's argv as BuildKit shows it
/// (`process "/bin/sh -c make"`).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Neither runc nor crun is on PATH and none was configured.
    #[error("no OCI runtime found: install runc or set HOIST_RUNTIME")]
    RuntimeNotFound,
    /// The configured runtime (config or `HOIST_RUNTIME`) does not exist.
    #[error("OCI runtime {path} (from {from}) is not an executable file: install runc or fix {from}")]
    RuntimeMissing {
        /// The configured runtime.
        path: PathBuf,
        /// Where it was configured: `the builder configuration` or `HOIST_RUNTIME`.
        from: &'static str,
    },
    /// crun refuses hybrid cgroup setups (like this lab's).
    #[error(
        "crun cannot run containers with this machine's hybrid cgroups (v1 controllers next to a \
         v2 hierarchy): use runc instead (install it or set HOIST_RUNTIME=runc)"
    )]
    CrunHybridCgroups,
    /// The cancellation token fired; every process of the step was killed.
    #[error("{command} was cancelled; its processes were killed")]
    Cancelled {
        /// The step's command, e.g. `process "/bin/sh -c make"`.
        command: String,
    },
    /// `RunSpec::timeout` passed; every process of the step was killed.
    #[error("{command} did not finish within {} and was killed", fmt_duration(*.timeout))]
    Timeout {
        /// The step's command, e.g. `process "/bin/sh -c make"`.
        command: String,
        /// The limit that passed ([`RunSpec::timeout`]).
        timeout: Duration,
    },
    /// The runtime could not start the process (e.g. the executable does not exist).
    #[error("cannot start {command}: {message}")]
    Start {
        /// The step's command, e.g. `process "/bin/sh -c make"`.
        command: String,
        /// The runtime's errors, joined with `; `.
        message: String,
    },
    /// A runtime command other than `run` failed.
    #[error("`{runtime} {action}` failed: {message}")]
    Runtime {
        /// The runtime binary's path.
        runtime: String,
        /// The runtime subcommand, e.g. `list`.
        action: String,
        /// The runtime's standard error.
        message: String,
    },
    /// A path of the step cannot be used (relative, escaping through a file, symlink loop).
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path (inside the container, or on the host for a rootfs or bind source).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The spec is malformed (bad id, empty command, id already running).
    #[error("invalid step: {0}")]
    Invalid(String),
    /// A file operation of the executor failed.
    #[error("cannot {context}: {source}")]
    Io {
        /// What the executor was doing, e.g. `run runc list`.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The platform cannot run here (see [`check_emulation`]).
    #[error("cannot run {platform} steps: {reason}")]
    Emulation {
        /// The step's platform, e.g. `linux/arm64`.
        platform: String,
        /// Why it cannot run (not linux, no binfmt_misc handler, ...).
        reason: String,
    },
    /// The sandboxed network of a default-network step cannot be set up.
    #[error(
        "cannot set up the sandboxed network of the RUN step: {source}; RUN --network=none (no network) \
         or --network=host (needs the network.host entitlement) does without it"
    )]
    Network {
        /// What failed.
        source: NetError,
    },
    /// oci-spec rejected the config (a bug).
    #[error("cannot build the OCI runtime config: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
}

impl ExecError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> ExecError {
        ExecError::Io { context: context.into(), source }
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

/// The step's command as BuildKit names it in errors: `process "/bin/sh -c make"`.
pub fn describe_command(args: &[String]) -> String {
    let mut s = args.join(" ");
    if s.chars().count() > 200 {
        s = s.chars().take(200).collect::<String>() + "...";
    }
    format!("process {s:?}")
}

/// Runs step processes in containers.
#[async_trait::async_trait]
pub trait Executor: Send + Sync {
    /// Run `spec` to completion, streaming its output to `logs` (a full channel blocks the
    /// process's writes: drain it). Cancelling `cancel`, or passing `spec.timeout`, kills every
    /// process of the step and returns [`ExecError::Cancelled`] / [`ExecError::Timeout`]
    /// once nothing of it is left. Mount stubs created for the run are removed before it
    /// returns; the rootfs stays mounted (the caller owns it).
    async fn run(&self, spec: RunSpec, logs: Sender<LogChunk>, cancel: CancellationToken) -> Result<ExitStatus, ExecError>;
}

/// Settings of [`RuncExecutor`].
#[derive(Debug, Clone)]
pub struct RuncConfig {
    /// The runtime binary (a path, or a name looked up on PATH). `None`: `$HOIST_RUNTIME`,
    /// else `runc`, else `crun` on PATH.
    pub runtime: Option<PathBuf>,
    /// State directory (`<HOIST_ROOT>/executor`): the runtime's `--root` and the bundles.
    pub state_dir: PathBuf,
    /// `pids.max` of each step's cgroup; `None` for no limit.
    pub pids_limit: Option<i64>,
    /// Set `noNewPrivileges`. Off by default, as in BuildKit (which calls
    /// `WithNewPrivileges`): setuid programs such as sudo work in RUN as with docker build.
    pub no_new_privileges: bool,
    /// How long to keep killing a cancelled step before giving up on the runtime process.
    pub kill_timeout: Duration,
    /// Bridge and subnet of steps with the default (sandboxed) network.
    pub sandbox_network: SandboxNetConfig,
}

impl RuncConfig {
    /// Defaults for a state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> RuncConfig {
        RuncConfig {
            runtime: None,
            state_dir: state_dir.into(),
            pids_limit: Some(DEFAULT_PIDS_LIMIT),
            no_new_privileges: false,
            kill_timeout: Duration::from_secs(10),
            sandbox_network: SandboxNetConfig::default(),
        }
    }
}

/// [`Executor`] on runc (or crun), one `runtime run` per step.
#[derive(Debug)]
pub struct RuncExecutor {
    runtime: PathBuf,
    runtime_root: PathBuf,
    bundles: PathBuf,
    cap_bounding: u64,
    nofile: u64,
    pids_limit: Option<i64>,
    /// The own devices cgroup's rules when it does not allow every device.
    parent_devices: Option<Vec<cgroup::DeviceRule>>,
    no_new_privileges: bool,
    kill_timeout: Duration,
    network: Arc<network::SandboxNet>,
}

impl RuncExecutor {
    /// Find the runtime, create the state directory and remove what a crashed daemon left:
    /// containers still in the runtime's state dir are killed and deleted, bundles and
    /// network namespaces removed.
    pub fn new(config: RuncConfig) -> Result<RuncExecutor, ExecError> {
        let runtime = find_runtime(config.runtime.as_deref())?;
        config.sandbox_network.validate().map_err(|e| ExecError::Invalid(format!("sandbox network: {e}")))?;
        let state = &config.state_dir;
        std::fs::create_dir_all(state).map_err(|e| ExecError::io(format!("create {}", state.display()), e))?;
        let state = state.canonicalize().map_err(|e| ExecError::io(format!("resolve {}", state.display()), e))?;
        let runtime_root = state.join("runtime");
        let bundles = state.join("bundles");
        let netns_dir = state.join("netns");
        for d in [&runtime_root, &bundles, &netns_dir] {
            std::fs::create_dir_all(d).map_err(|e| ExecError::io(format!("create {}", d.display()), e))?;
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let cap_bounding = spec::parse_cap_mask(&status).unwrap_or(0);
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.unwrap_or(1 << 20).min(1 << 20);
        // In a container that is not privileged (the docker-container builder), the cgroup
        // hierarchies are read-only and the devices cgroup allows only a few devices.
        let stuck = cgroup::make_hierarchies_writable();
        if !stuck.is_empty() {
            tracing::warn!(
                "cgroup hierarchies stay read-only: {}; steps cannot have cgroups there, so the limits they carry (memory, pids) \
                 cannot be applied and the runtime may refuse to start steps (give the builder CAP_SYS_ADMIN and no AppArmor mount rule)",
                stuck.join(", ")
            );
        }
        if let Some(e) = cgroup::leave_namespace_root() {
            tracing::warn!("cgroup v2 in a container: {e}; those limits cannot be applied to steps");
        }
        let parent_devices = cgroup::CgroupLayout::current().ok().and_then(|l| cgroup::own_device_rules(&l));
        if let Some(rules) = &parent_devices {
            tracing::warn!(
                "the builder's devices cgroup does not allow every device: security.insecure steps get only its {} rule(s), not all devices",
                rules.len()
            );
        }
        let exec = RuncExecutor {
            runtime,
            runtime_root,
            bundles,
            cap_bounding,
            nofile,
            pids_limit: config.pids_limit,
            parent_devices,
            no_new_privileges: config.no_new_privileges,
            kill_timeout: config.kill_timeout,
            network: Arc::new(network::SandboxNet::new(config.sandbox_network.clone(), netns_dir)),
        };
        exec.recover();
        Ok(exec)
    }

    /// The runtime binary in use.
    pub fn runtime(&self) -> &Path {
        &self.runtime
    }

    /// The runtime's state directory (its `--root`).
    pub fn runtime_root(&self) -> &Path {
        &self.runtime_root
    }

    fn std_cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.runtime);
        c.arg("--root").arg(&self.runtime_root).stdin(Stdio::null());
        c
    }

    fn tokio_cmd(&self) -> Command {
        let mut c = Command::new(&self.runtime);
        c.arg("--root").arg(&self.runtime_root).stdin(Stdio::null());
        c
    }

    /// Ids of the containers the runtime knows in our state dir.
    pub fn list_containers(&self) -> Result<Vec<String>, ExecError> {
        let out =
            self.std_cmd().args(["list", "-q"]).output().map_err(|e| ExecError::io(format!("run {} list", self.runtime.display()), e))?;
        if !out.status.success() {
            return Err(ExecError::Runtime {
                runtime: self.runtime.display().to_string(),
                action: "list".into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
    }

    fn recover(&self) {
        match self.list_containers() {
            Ok(ids) => {
                for id in ids {
                    tracing::info!(container = %id, "removing container left by a previous run");
                    self.kill_and_delete_blocking(&id);
                }
            }
            Err(e) => tracing::warn!("cannot list leftover containers: {e}"),
        }
        if let Ok(entries) = std::fs::read_dir(&self.bundles) {
            for e in entries.flatten() {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(bundle = %e.path().display(), "cannot remove leftover bundle: {err}");
                }
            }
        }
        self.network.recover();
        // After the containers are gone: build cgroups a crashed builder left (live builds
        // hold a lock on theirs and are skipped).
        cgroup::remove_leftover_build_cgroups();
    }

    fn kill_and_delete_blocking(&self, id: &str) {
        let quiet = |c: &mut std::process::Command| {
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        quiet(self.std_cmd().args(["kill", id, "KILL"]));
        quiet(self.std_cmd().args(["delete", "--force", id]));
    }

    async fn delete(&self, id: &str) {
        let _ = self.tokio_cmd().args(["delete", "--force", id]).stdout(Stdio::null()).stderr(Stdio::null()).status().await;
    }

    /// Kill the container's init (the kernel then kills every process of its PID
    /// namespace, fork storms included) until the `runtime run` process exits.
    async fn kill_and_wait(&self, id: &str, child: &mut Child) -> std::io::Result<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + self.kill_timeout;
        loop {
            let _ = self.tokio_cmd().args(["kill", id, "KILL"]).stdout(Stdio::null()).stderr(Stdio::null()).status().await;
            if let Ok(status) = tokio::time::timeout(Duration::from_millis(100), child.wait()).await {
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(container = %id, "runtime did not exit after SIGKILL; killing it");
                let _ = child.start_kill();
                return child.wait().await;
            }
        }
    }

    fn prepare_bundle(&self, spec: &RunSpec, bundle: &Path, guard: &mut Guard<'_>) -> Result<(), ExecError> {
        let ioe = |what: &str, p: &Path| {
            let ctx = format!("{what} {}", p.display());
            move |e| ExecError::io(ctx, e)
        };
        let hosts = bundle.join("hosts");
        std::fs::write(&hosts, spec::hosts_file(&spec.hostname, &spec.extra_hosts)).map_err(ioe("write", &hosts))?;
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").ok();
        let resolv = bundle.join("resolv.conf");
        std::fs::write(&resolv, spec::resolv_conf(host_resolv.as_deref(), spec.network)).map_err(ioe("write", &resolv))?;

        stubs::ensure_cwd(&spec.rootfs, &spec.cwd, spec.uid, spec.gid)?;
        // BuildKit leaves the /proc, /dev and /sys mount points the runtime creates in the
        // layer (it cleans only /etc/hosts, /etc/resolv.conf and the step's own mounts), so
        // an image built FROM a base without them gains empty 0755 directories: do the same.
        for p in spec::SYSTEM_MOUNT_POINTS {
            stubs::ensure_system_mount_point(&spec.rootfs, p)?;
        }
        let mut targets: Vec<(String, stubs::StubKind)> = Vec::new();
        targets.push(("/etc/hosts".into(), stubs::StubKind::File));
        targets.push(("/etc/resolv.conf".into(), stubs::StubKind::File));
        for m in &spec.mounts {
            let t = m.target();
            if spec::SYSTEM_MOUNT_POINTS.iter().any(|s| stubs::is_under(t, s)) {
                continue; // inside /proc, /dev or /sys: not in the rootfs
            }
            let kind = match m {
                ExecMount::Bind { source, .. } if !source.is_dir() => stubs::StubKind::File,
                _ => stubs::StubKind::Dir,
            };
            targets.push((t.to_string(), kind));
        }
        guard.stubs = Some(stubs::MountStubs::create(&spec.rootfs, &targets)?);

        let ctx = spec::SpecContext {
            hosts_file: hosts,
            resolv_file: resolv,
            cap_bounding: self.cap_bounding,
            nofile: self.nofile,
            pids_limit: self.pids_limit,
            parent_devices: self.parent_devices.clone(),
            no_new_privileges: self.no_new_privileges,
            cgroups_path: cgroup::step_cgroups_path(spec.cgroup_parent.as_deref(), &spec.id),
            netns: guard.net.as_ref().map(|n| n.netns().to_path_buf()),
        };
        let oci = spec::build_spec(spec, &ctx)?;
        let config = bundle.join("config.json");
        let json = serde_json::to_vec_pretty(&oci).map_err(|e| ExecError::Invalid(format!("cannot serialize the OCI config: {e}")))?;
        // The config holds the step's environment, secrets given as env= among it: only root
        // may read it, and it goes with the bundle when the step ends.
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f =
                std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(&config).map_err(ioe("write", &config))?;
            f.write_all(&json).map_err(ioe("write", &config))?;
        }
        Ok(())
    }
}

/// Cleans up a step if its future is dropped mid-run (blocking, best effort); disarmed by
/// the normal path, which cleans up asynchronously.
struct Guard<'a> {
    exec: &'a RuncExecutor,
    id: String,
    bundle: PathBuf,
    stubs: Option<stubs::MountStubs>,
    /// The step's sandboxed network (default network only); dropping it removes it.
    net: Option<network::Lease>,
    container_started: bool,
    armed: bool,
}

impl Guard<'_> {
    fn cleanup_files(&mut self) {
        if let Some(mut s) = self.stubs.take() {
            s.remove();
        }
        drop(self.net.take());
        if let Err(e) = std::fs::remove_dir_all(&self.bundle) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(bundle = %self.bundle.display(), "cannot remove bundle: {e}");
            }
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.container_started {
            self.exec.kill_and_delete_blocking(&self.id);
        }
        self.cleanup_files();
    }
}

fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn validate(spec: &RunSpec) -> Result<(), ExecError> {
    if !valid_id(&spec.id) {
        return Err(ExecError::Invalid(format!("container id {:?} must match [A-Za-z0-9][A-Za-z0-9_.-]* (at most 64)", spec.id)));
    }
    if spec.args.is_empty() {
        return Err(ExecError::Invalid("empty command".into()));
    }
    if let Some(p) = spec.cgroup_parent.as_deref().filter(|p| !cgroup::valid_cgroup_parent(p)) {
        return Err(ExecError::Invalid(format!("cgroup parent {p:?} must be a relative path of [A-Za-z0-9_.-] components")));
    }
    if !spec.rootfs.is_absolute() || !spec.rootfs.is_dir() {
        return Err(ExecError::InvalidPath {
            path: spec.rootfs.display().to_string(),
            reason: "the rootfs must be an existing absolute directory".into(),
        });
    }
    for p in std::iter::once(spec.cwd.as_str()).chain(spec.mounts.iter().map(ExecMount::target)) {
        if !p.starts_with('/') {
            return Err(ExecError::InvalidPath { path: p.to_string(), reason: "must be absolute".into() });
        }
    }
    let bad_word = |s: &str| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control());
    if !spec.hostname.is_empty() && bad_word(&spec.hostname) {
        return Err(ExecError::Invalid(format!("hostname {:?} contains whitespace or control characters", spec.hostname)));
    }
    for (host, ip) in &spec.extra_hosts {
        if bad_word(host) || bad_word(ip) {
            return Err(ExecError::Invalid(format!("extra host {host:?} → {ip:?}: names and addresses must be single words")));
        }
    }
    for m in &spec.mounts {
        if let ExecMount::Bind { source, .. } = m {
            if !source.exists() {
                return Err(ExecError::InvalidPath {
                    path: source.display().to_string(),
                    reason: "bind mount source does not exist".into(),
                });
            }
        }
    }
    Ok(())
}

fn find_runtime(explicit: Option<&Path>) -> Result<PathBuf, ExecError> {
    let from_env = std::env::var_os(RUNTIME_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    let wanted = match (explicit, from_env) {
        (Some(p), _) => Some((p.to_path_buf(), "the builder configuration")),
        (None, Some(p)) => Some((p, RUNTIME_ENV)),
        (None, None) => None,
    };
    if let Some((path, from)) = wanted {
        return lookup_executable(&path).ok_or(ExecError::RuntimeMissing { path, from });
    }
    ["runc", "crun"].iter().find_map(|n| lookup_executable(Path::new(n))).ok_or(ExecError::RuntimeNotFound)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn lookup_executable(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 || p.is_absolute() {
        return is_executable(p).then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(p)).find(|c| is_executable(c))
}

/// Copy a pipe into the log channel; keep the last bytes in `tail` if given.
async fn pump<R: AsyncRead + Unpin>(mut r: R, stream: LogStream, tx: Sender<LogChunk>, tail: Option<Arc<Mutex<Vec<u8>>>>) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut open = true;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(t) = &tail {
            if let Ok(mut t) = t.lock() {
                t.extend_from_slice(&buf[..n]);
                let excess = t.len().saturating_sub(4096);
                t.drain(..excess);
            }
        }
        if open && tx.send(LogChunk { stream, data: Bytes::copy_from_slice(&buf[..n]) }).await.is_err() {
            open = false; // nobody listens; keep draining so the process never blocks
        }
    }
}

/// Error messages the runtime wrote to its JSON log (`--log-format json`).
fn runtime_log_errors(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .collect()
}

fn is_crun_hybrid_failure(text: &str) -> bool {
    text.contains("hybrid mode not supported") || text.contains("cgroups in hybrid mode")
}

enum Outcome {
    Exited,
    Cancelled,
    TimedOut,
}

#[async_trait::async_trait]
impl Executor for RuncExecutor {
    async fn run(&self, spec: RunSpec, logs: Sender<LogChunk>, cancel: CancellationToken) -> Result<ExitStatus, ExecError> {
        let command = describe_command(&spec.args);
        validate(&spec)?;
        if cancel.is_cancelled() {
            return Err(ExecError::Cancelled { command });
        }
        let bundle = self.bundles.join(&spec.id);
        let made = {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&bundle)
        };
        match made {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ExecError::Invalid(format!("a step with container id {} is already running", spec.id)));
            }
            Err(e) => return Err(ExecError::io(format!("create {}", bundle.display()), e)),
        }
        let mut guard = Guard {
            exec: self,
            id: spec.id.clone(),
            bundle: bundle.clone(),
            stubs: None,
            net: None,
            container_started: false,
            armed: true,
        };
        if spec.network == NetworkMode::Default {
            // Blocking work (a thread entering a new namespace, `ip`); if this future is
            // dropped meanwhile, the lease is dropped, and so removed, when it is made.
            let net = self.network.clone();
            let id = spec.id.clone();
            let lease = tokio::task::spawn_blocking(move || net.acquire(&id))
                .await
                .map_err(|e| ExecError::Network { source: NetError::Task(e) })??;
            guard.net = Some(lease);
        }
        self.prepare_bundle(&spec, &bundle, &mut guard)?;

        let log_path = bundle.join("runtime.log");
        let mut cmd = self.tokio_cmd();
        cmd.arg("--log")
            .arg(&log_path)
            .args(["--log-format", "json", "run", "--bundle"])
            .arg(&bundle)
            .arg(&spec.id)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        guard.container_started = true;
        let mut child = cmd.spawn().map_err(|e| ExecError::io(format!("start {}", self.runtime.display()), e))?;
        let tail = Arc::new(Mutex::new(Vec::new()));
        let out_task = child.stdout.take().map(|o| tokio::spawn(pump(o, LogStream::Stdout, logs.clone(), None)));
        let err_task = child.stderr.take().map(|e| tokio::spawn(pump(e, LogStream::Stderr, logs.clone(), Some(tail.clone()))));
        drop(logs);

        let timeout = async {
            match spec.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let (outcome, waited) = tokio::select! {
            status = child.wait() => (Outcome::Exited, Some(status)),
            _ = cancel.cancelled() => (Outcome::Cancelled, None),
            _ = timeout => (Outcome::TimedOut, None),
        };
        let status = match waited {
            Some(s) => s,
            None => self.kill_and_wait(&spec.id, &mut child).await,
        };
        for task in [out_task, err_task].into_iter().flatten() {
            // The pipes close when the last process of the step is gone; do not hang on a
            // writer that escaped (there should be none).
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                abort.abort();
            }
        }
        let errors = runtime_log_errors(&std::fs::read_to_string(&log_path).unwrap_or_default());
        self.delete(&spec.id).await;
        if let Some(lease) = guard.net.take() {
            // Deleting the veth runs `ip`: off the async threads.
            let _ = tokio::task::spawn_blocking(move || drop(lease)).await;
        }
        guard.armed = false;
        guard.cleanup_files();

        match outcome {
            Outcome::Cancelled => return Err(ExecError::Cancelled { command }),
            Outcome::TimedOut => return Err(ExecError::Timeout { command, timeout: spec.timeout.unwrap_or_default() }),
            Outcome::Exited => {}
        }
        let status = status.map_err(|e| ExecError::io(format!("wait for {}", self.runtime.display()), e))?;
        let code = {
            use std::os::unix::process::ExitStatusExt;
            status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        };
        if code != 0 {
            let tail_text = tail.lock().map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default();
            if is_crun_hybrid_failure(&tail_text) || errors.iter().any(|e| is_crun_hybrid_failure(e)) {
                return Err(ExecError::CrunHybridCgroups);
            }
            if !errors.is_empty() {
                return Err(ExecError::Start { command, message: errors.join("; ") });
            }
        }
        Ok(ExitStatus { code })
    }
}
