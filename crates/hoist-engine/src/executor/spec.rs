//! The OCI runtime configuration (`config.json`) of one RUN, built with oci-spec's runtime
//! types, and the generated `/etc/hosts` and `/etc/resolv.conf`. Pure functions: everything
//! about the host (capability bounding set, rlimits, resolv.conf) comes in as arguments.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder,
    RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use super::seccomp;
use super::{ExecError, ExecMount, RunSpec};
use crate::graph::{NetworkMode, SecurityMode};

/// Hostname of build containers when the engine sets none (BuildKit's).
pub const DEFAULT_HOSTNAME: &str = "buildkitsandbox";

/// Capability names by number (capability.h), up to CAP_CHECKPOINT_RESTORE (40).
const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Docker's default capability set (the 14 capabilities of an unprivileged container).
pub const DOCKER_DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Docker's default masked paths (bind-mounted over with /dev/null or an empty tmpfs).
pub const MASKED_PATHS: [&str; 12] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's default read-only paths.
pub const READONLY_PATHS: [&str; 5] = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// Host facts and executor settings that go into a spec besides the [`RunSpec`].
#[derive(Debug, Clone)]
pub(crate) struct SpecContext {
    /// Files in the bundle bind-mounted read-only at /etc/hosts and /etc/resolv.conf.
    pub hosts_file: PathBuf,
    pub resolv_file: PathBuf,
    /// The executor's own capability bounding set (`CapBnd` of /proc/self/status): a
    /// capability outside it makes runc fail with "unable to apply caps".
    pub cap_bounding: u64,
    /// RLIMIT_NOFILE for the process (soft = hard).
    pub nofile: u64,
    pub pids_limit: Option<i64>,
    /// The device rules of the executor's own devices cgroup when it does not allow every
    /// device (a builder in a container): an insecure step gets these, not `a *:* rwm`,
    /// which its cgroup could not be given.
    pub parent_devices: Option<Vec<super::cgroup::DeviceRule>>,
    pub no_new_privileges: bool,
    /// `linux.cgroupsPath` (relative: below the executor's own cgroup).
    pub cgroups_path: String,
    /// The network namespace the executor prepared for a [`NetworkMode::Default`] step
    /// (a bind-mounted namespace file); required for that mode, unused by the others.
    pub netns: Option<PathBuf>,
}

/// Parse a `CapBnd:`-style hex mask.
pub(crate) fn parse_cap_mask(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapBnd:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

fn capability(name: &str) -> Option<Capability> {
    serde_json::from_value(serde_json::Value::String(format!("CAP_{name}"))).ok()
}

/// The capabilities of a step: Docker's defaults for the sandbox, every capability the
/// executor itself holds for `--security=insecure`; never one outside `bounding`.
pub(crate) fn capabilities(security: SecurityMode, bounding: u64) -> Capabilities {
    let allowed = |name: &str| CAP_NAMES.iter().position(|n| *n == name).is_some_and(|bit| bounding & (1u64 << bit) != 0);
    let names: Vec<&str> = match security {
        SecurityMode::Sandbox => DOCKER_DEFAULT_CAPS.to_vec(),
        SecurityMode::Insecure => CAP_NAMES.to_vec(),
    };
    names.into_iter().filter(|n| allowed(n)).filter_map(capability).collect::<HashSet<_>>()
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, ExecError> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

/// The system mounts every container gets (Docker's default set, without /sys/fs/cgroup).
pub(crate) fn system_mounts(security: SecurityMode, shm_size: Option<u64>) -> Result<Vec<Mount>, ExecError> {
    let sys_mode = if security == SecurityMode::Insecure { "rw" } else { "ro" };
    let shm = format!("size={}", shm_size.unwrap_or(64 << 20));
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"])?,
        mount("/dev/pts", "devpts", "devpts", &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"])?,
        mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", &shm])?,
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"])?,
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", sys_mode])?,
    ])
}

/// Mount destinations of the system mounts that live in the rootfs itself (the others are
/// inside /dev's tmpfs).
pub(crate) const SYSTEM_MOUNT_POINTS: [&str; 3] = ["/proc", "/dev", "/sys"];

/// The step's own mounts, parents before children so none hides another.
pub(crate) fn user_mounts(mounts: &[ExecMount]) -> Result<Vec<Mount>, ExecError> {
    let mut sorted: Vec<&ExecMount> = mounts.iter().collect();
    sorted.sort_by_key(|m| Path::new(m.target()).components().count());
    sorted
        .into_iter()
        .map(|m| match m {
            ExecMount::Bind { source, target, readonly } => {
                let src = source.to_str().ok_or_else(|| ExecError::InvalidPath {
                    path: source.display().to_string(),
                    reason: "bind mount source is not valid UTF-8".into(),
                })?;
                mount(target, "bind", src, &["rbind", if *readonly { "ro" } else { "rw" }])
            }
            ExecMount::Tmpfs { target, size } => {
                let size_opt = size.map(|s| format!("size={s}"));
                let mut opts = vec!["nosuid", "nodev", "mode=1777"];
                if let Some(s) = &size_opt {
                    opts.push(s);
                }
                mount(target, "tmpfs", "tmpfs", &opts)
            }
        })
        .collect()
}

/// Build the OCI config of one step.
pub(crate) fn build_spec(run: &RunSpec, ctx: &SpecContext) -> Result<Spec, ExecError> {
    let caps = capabilities(run.security, ctx.cap_bounding);
    // Docker's default seccomp profile for the sandbox, decided by the capabilities the
    // step gets; `--security=insecure` runs unconfined, as with BuildKit.
    let seccomp = match run.security {
        SecurityMode::Sandbox => Some(seccomp::default_profile(&caps, &seccomp::Host::current())?),
        SecurityMode::Insecure => None,
    };
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(Capabilities::new())
        .ambient(Capabilities::new())
        .build()?;
    let user = UserBuilder::default().uid(run.uid).gid(run.gid).additional_gids(run.additional_gids.clone()).build()?;
    let mut rlimits = Vec::new();
    if !run.ulimits.iter().any(|u| u.name == "nofile") {
        rlimits.push(PosixRlimitBuilder::default().typ(PosixRlimitType::RlimitNofile).hard(ctx.nofile).soft(ctx.nofile).build()?);
    }
    for u in &run.ulimits {
        rlimits.push(PosixRlimitBuilder::default().typ(u.kind).soft(u.soft).hard(u.hard).build()?);
    }
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(user)
        .args(run.args.clone())
        .env(run.env.clone())
        .cwd(run.cwd.clone())
        .capabilities(capabilities)
        .rlimits(rlimits)
        .no_new_privileges(ctx.no_new_privileges)
        .build()?;

    let mut namespaces = Vec::new();
    let mut types = vec![LinuxNamespaceType::Pid, LinuxNamespaceType::Ipc, LinuxNamespaceType::Uts, LinuxNamespaceType::Mount];
    // NetworkMode::None is a new network namespace where the runtime brings up loopback
    // only; NetworkMode::Default joins the sandboxed namespace the executor prepared (veth
    // on its bridge, NAT out); NetworkMode::Host stays in the host's.
    if run.network == NetworkMode::None {
        types.push(LinuxNamespaceType::Network);
    }
    for t in types {
        namespaces.push(LinuxNamespaceBuilder::default().typ(t).build()?);
    }
    if run.network == NetworkMode::Default {
        let path = ctx.netns.clone().ok_or_else(|| ExecError::Invalid("a default-network step needs its network namespace".into()))?;
        namespaces.push(LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).path(path).build()?);
    }

    let insecure = run.security == SecurityMode::Insecure;
    let devices = match (&ctx.parent_devices, insecure) {
        (Some(rules), true) => {
            let mut out = vec![LinuxDeviceCgroupBuilder::default().allow(false).access("rwm").build()?];
            for r in rules {
                let mut d = LinuxDeviceCgroupBuilder::default().allow(true).access(r.access.clone());
                d = match r.kind.as_str() {
                    "c" => d.typ(LinuxDeviceType::C),
                    "b" => d.typ(LinuxDeviceType::B),
                    _ => d.typ(LinuxDeviceType::A),
                };
                if let Some(m) = r.major {
                    d = d.major(m);
                }
                if let Some(m) = r.minor {
                    d = d.minor(m);
                }
                out.push(d.build()?);
            }
            out
        }
        _ => vec![LinuxDeviceCgroupBuilder::default().allow(insecure).access("rwm").build()?],
    };
    let mut resources = LinuxResourcesBuilder::default().devices(devices);
    if let Some(limit) = ctx.pids_limit {
        resources = resources.pids(LinuxPidsBuilder::default().limit(limit).build()?);
    }
    let (masked, readonly): (Vec<String>, Vec<String>) = if insecure {
        (Vec::new(), Vec::new())
    } else {
        (MASKED_PATHS.iter().map(|s| s.to_string()).collect(), READONLY_PATHS.iter().map(|s| s.to_string()).collect())
    };
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build()?)
        .cgroups_path(PathBuf::from(&ctx.cgroups_path))
        .masked_paths(masked)
        .readonly_paths(readonly)
        .build()?;
    linux.set_seccomp(seccomp);

    let mut mounts = system_mounts(run.security, run.shm_size)?;
    let as_str = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| ExecError::InvalidPath { path: p.display().to_string(), reason: "not valid UTF-8".into() })
    };
    mounts.push(mount("/etc/hosts", "bind", &as_str(&ctx.hosts_file)?, &["rbind", "ro"])?);
    mounts.push(mount("/etc/resolv.conf", "bind", &as_str(&ctx.resolv_file)?, &["rbind", "ro"])?);
    mounts.extend(user_mounts(&run.mounts)?);
    // A later mount on the same destination replaces an earlier one (a step's own
    // /etc/hosts bind wins over the generated one).
    let mut deduped: Vec<Mount> = Vec::new();
    for m in mounts {
        deduped.retain(|x| x.destination() != m.destination());
        deduped.push(m);
    }

    let hostname = if run.hostname.is_empty() { DEFAULT_HOSTNAME.to_string() } else { run.hostname.clone() };
    Ok(SpecBuilder::default()
        .version("1.0.2")
        .root(RootBuilder::default().path(run.rootfs.clone()).readonly(false).build()?)
        .hostname(hostname)
        .mounts(deduped)
        .process(process)
        .linux(linux)
        .build()?)
}

/// `/etc/hosts` of a step: localhost, the hostname, then `--add-host` entries.
pub(crate) fn hosts_file(hostname: &str, extra_hosts: &[(String, String)]) -> String {
    let hostname = if hostname.is_empty() { DEFAULT_HOSTNAME } else { hostname };
    let mut s = format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (host, ip) in extra_hosts {
        s.push_str(&format!("{ip}\t{host}\n"));
    }
    s
}

/// `/etc/resolv.conf` of a step from the host's. With the host network it is used as is;
/// in the step's own network namespace (default and none), loopback nameservers
/// (systemd-resolved's 127.0.0.53) are unreachable and are dropped, with Google's resolvers
/// as the fallback (as Docker does).
pub(crate) fn resolv_conf(host: Option<&str>, network: NetworkMode) -> String {
    const FALLBACK: &str = "nameserver 8.8.8.8\nnameserver 8.8.4.4\n";
    let Some(host) = host else { return FALLBACK.to_string() };
    if network == NetworkMode::Host {
        return host.to_string();
    }
    let mut out = String::new();
    let mut nameservers = 0;
    for line in host.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            let ip = words.next().unwrap_or("");
            if ip.starts_with("127.") || ip == "::1" {
                continue;
            }
            nameservers += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    if nameservers == 0 {
        out.push_str(FALLBACK);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> SpecContext {
        SpecContext {
            hosts_file: "/b/hosts".into(),
            resolv_file: "/b/resolv.conf".into(),
            cap_bounding: 0x000001fffeffffff, // this lab: everything but CAP_SYS_RESOURCE
            nofile: 20000,
            pids_limit: Some(4096),
            parent_devices: None,
            no_new_privileges: false,
            cgroups_path: "hoist/x".into(),
            netns: Some("/state/netns/x".into()),
        }
    }

    fn run() -> RunSpec {
        let mut r = RunSpec::new("x", "/rootfs", vec!["/bin/sh".into(), "-c".into(), "true".into()]);
        r.env = vec!["PATH=/bin".into()];
        r.cwd = "/work".into();
        r.uid = 1000;
        r.gid = 1001;
        r.additional_gids = vec![10];
        r
    }

    fn json(spec: &Spec) -> serde_json::Value {
        serde_json::to_value(spec).unwrap()
    }

    #[test]
    fn cap_mask_is_read_from_proc_status() {
        let status = "Name:\tx\nCapPrm:\t0000000000000000\nCapBnd:\t000001fffeffffff\n";
        assert_eq!(parse_cap_mask(status), Some(0x000001fffeffffff));
        assert_eq!(parse_cap_mask("nothing"), None);
    }

    #[test]
    fn sandbox_gets_dockers_fourteen_caps() {
        let caps = capabilities(SecurityMode::Sandbox, u64::MAX);
        assert_eq!(caps.len(), 14);
        assert!(caps.contains(&Capability::Chown) && caps.contains(&Capability::AuditWrite));
        assert!(!caps.contains(&Capability::SysAdmin));
    }

    #[test]
    fn insecure_gets_every_cap_the_executor_holds_and_no_other() {
        // Regression: requesting CAP_SYS_RESOURCE where the bounding set lacks it makes runc
        // fail with "unable to apply caps".
        let caps = capabilities(SecurityMode::Insecure, 0x000001fffeffffff);
        assert!(caps.contains(&Capability::SysAdmin));
        assert!(!caps.contains(&Capability::SysResource));
        assert_eq!(caps.len(), 40);
        let none = capabilities(SecurityMode::Sandbox, 0);
        assert!(none.is_empty());
    }

    #[test]
    fn spec_carries_process_user_env_cwd_and_limits() {
        let v = json(&build_spec(&run(), &ctx()).unwrap());
        assert_eq!(v["process"]["args"], serde_json::json!(["/bin/sh", "-c", "true"]));
        assert_eq!(v["process"]["env"], serde_json::json!(["PATH=/bin"]));
        assert_eq!(v["process"]["cwd"], "/work");
        assert_eq!(v["process"]["terminal"], false);
        assert_eq!(v["process"]["user"]["uid"], 1000);
        assert_eq!(v["process"]["user"]["gid"], 1001);
        assert_eq!(v["process"]["user"]["additionalGids"], serde_json::json!([10]));
        assert_eq!(v["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(v["process"]["rlimits"][0]["hard"], 20000);
        assert_eq!(v["linux"]["resources"]["pids"]["limit"], 4096);
        assert_eq!(v["linux"]["cgroupsPath"], "hoist/x");
        assert_eq!(v["root"]["path"], "/rootfs");
        assert_eq!(v["hostname"], DEFAULT_HOSTNAME);
    }

    /// Issue 14: `--shm-size` sizes /dev/shm; `--ulimit` replaces the default of its
    /// resource and adds the others.
    #[test]
    fn shm_size_and_ulimits_reach_the_spec() {
        let v = json(&build_spec(&run(), &ctx()).unwrap());
        let shm = |v: &serde_json::Value| {
            let m = v["mounts"].as_array().unwrap().iter().find(|m| m["destination"] == "/dev/shm").unwrap().clone();
            m["options"].as_array().unwrap().iter().filter_map(|o| o.as_str().map(str::to_string)).find(|o| o.starts_with("size=")).unwrap()
        };
        assert_eq!(shm(&v), format!("size={}", 64 << 20), "Docker's default");
        let mut r = run();
        r.shm_size = Some(128 << 20);
        r.ulimits = vec![super::super::Ulimit::parse("nofile=100:200").unwrap(), super::super::Ulimit::parse("core=0").unwrap()];
        let v = json(&build_spec(&r, &ctx()).unwrap());
        assert_eq!(shm(&v), format!("size={}", 128 << 20));
        let limits = v["process"]["rlimits"].as_array().unwrap();
        assert_eq!(limits.len(), 2, "{limits:?}");
        assert_eq!((&limits[0]["type"], &limits[0]["soft"], &limits[0]["hard"]), (&"RLIMIT_NOFILE".into(), &100.into(), &200.into()));
        assert_eq!((&limits[1]["type"], &limits[1]["soft"], &limits[1]["hard"]), (&"RLIMIT_CORE".into(), &0.into(), &0.into()));
    }

    #[test]
    fn ulimits_parse_as_docker_writes_them_and_never_above_the_builders_own() {
        use super::super::Ulimit;
        let u = Ulimit::parse("nproc=10:20").unwrap();
        assert_eq!((u.name.as_str(), u.soft, u.hard), ("nproc", 10, 20));
        assert_eq!(Ulimit::parse("core=-1").map(|u| (u.soft, u.hard)).unwrap(), (u64::MAX, u64::MAX));
        for (bad, needle) in [
            ("nofile", "name=soft[:hard]"),
            ("bogus=1", "unknown resource"),
            ("nofile=x", "not a number"),
            ("nofile=20:10", "soft limit is above"),
            ("nofile=-1", "builder's own hard limit"),
        ] {
            let err = Ulimit::parse(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn network_none_adds_a_network_namespace_default_joins_the_prepared_one_and_host_has_none() {
        let ns = |net| {
            let mut r = run();
            r.network = net;
            let v = json(&build_spec(&r, &ctx()).unwrap());
            v["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| (n["type"].as_str().unwrap().to_string(), n.get("path").and_then(|p| p.as_str()).map(str::to_string)))
                .collect::<Vec<_>>()
        };
        let network = |net| ns(net).into_iter().filter(|(t, _)| t == "network").map(|(_, p)| p).collect::<Vec<_>>();
        assert_eq!(network(NetworkMode::None), vec![None], "a fresh namespace");
        assert_eq!(network(NetworkMode::Default), vec![Some("/state/netns/x".to_string())], "the sandbox the executor made");
        assert_eq!(network(NetworkMode::Host), Vec::<Option<String>>::new());
        for net in [NetworkMode::None, NetworkMode::Default, NetworkMode::Host] {
            for n in ["pid", "ipc", "uts", "mount"] {
                assert!(ns(net).iter().any(|(t, p)| t == n && p.is_none()), "{net:?} {n}");
            }
        }
        let mut c = ctx();
        c.netns = None;
        assert!(matches!(build_spec(&run(), &c), Err(ExecError::Invalid(_))), "never the host network by accident");
    }

    #[test]
    fn sandbox_masks_paths_and_denies_devices_insecure_does_not() {
        let v = json(&build_spec(&run(), &ctx()).unwrap());
        assert!(v["linux"]["maskedPaths"].as_array().unwrap().contains(&"/proc/kcore".into()));
        assert!(v["linux"]["readonlyPaths"].as_array().unwrap().contains(&"/proc/sys".into()));
        assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], false);
        let sys = v["mounts"].as_array().unwrap().iter().find(|m| m["destination"] == "/sys").unwrap();
        assert!(sys["options"].as_array().unwrap().contains(&"ro".into()));
        let mut r = run();
        r.security = SecurityMode::Insecure;
        let v = json(&build_spec(&r, &ctx()).unwrap());
        assert!(v["linux"].get("maskedPaths").is_none_or(|m| m.as_array().unwrap().is_empty()));
        assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], true);
        // Below a devices cgroup that allows only some devices (a builder in a container),
        // an insecure step gets exactly those: runc could not give it more.
        let mut c = ctx();
        c.parent_devices = super::super::cgroup::parse_device_list("c 1:3 rwm\nc 136:* rwm\n");
        let v = json(&build_spec(&r, &c).unwrap());
        let d = v["linux"]["resources"]["devices"].as_array().unwrap();
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(d[0]["allow"], false);
        assert_eq!(
            (d[1]["allow"].clone(), d[1]["type"].clone(), d[1]["major"].clone(), d[1]["minor"].clone()),
            (true.into(), "c".into(), 1.into(), 3.into())
        );
        assert!(d[2].get("minor").is_none_or(|m| m.is_null()), "a wildcard minor: {d:?}");
        assert!(
            !d.iter().any(|r| r["allow"] == true && r.get("major").is_none_or(|m| m.is_null()) && r["type"] == "a"),
            "never all devices"
        );
    }

    #[test]
    fn sandbox_gets_dockers_seccomp_profile_and_insecure_runs_unconfined() {
        let v = json(&build_spec(&run(), &ctx()).unwrap());
        let seccomp = &v["linux"]["seccomp"];
        assert_eq!(seccomp["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(seccomp["defaultErrnoRet"], 1);
        let names = |action: &str| -> Vec<String> {
            seccomp["syscalls"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["action"] == action && r.get("args").is_none())
                .flat_map(|r| r["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()))
                .collect()
        };
        let allowed = names("SCMP_ACT_ALLOW");
        assert!(allowed.contains(&"execve".to_string()) && allowed.contains(&"chroot".to_string()));
        for name in ["mount", "unshare", "setns", "clone3"] {
            assert!(!allowed.contains(&name.to_string()), "{name}: the sandbox lacks CAP_SYS_ADMIN");
        }
        if std::env::consts::ARCH == "x86_64" {
            assert_eq!(seccomp["architectures"], serde_json::json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]));
        }
        let mut r = run();
        r.security = SecurityMode::Insecure;
        let v = json(&build_spec(&r, &ctx()).unwrap());
        assert!(v["linux"].get("seccomp").is_none(), "insecure: no filter at all");
    }

    #[test]
    fn mounts_include_system_hosts_resolv_and_user_mounts_parents_first() {
        let mut r = run();
        r.mounts = vec![
            ExecMount::Tmpfs { target: "/cache/deep/x".into(), size: Some(1 << 20) },
            ExecMount::Bind { source: "/host/src".into(), target: "/cache".into(), readonly: true },
        ];
        let v = json(&build_spec(&r, &ctx()).unwrap());
        let dests: Vec<&str> = v["mounts"].as_array().unwrap().iter().map(|m| m["destination"].as_str().unwrap()).collect();
        assert_eq!(
            dests,
            ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/etc/hosts", "/etc/resolv.conf", "/cache", "/cache/deep/x"]
        );
        let m = &v["mounts"][8];
        assert_eq!(m["source"], "/host/src");
        assert_eq!(m["options"], serde_json::json!(["rbind", "ro"]));
        assert!(v["mounts"][9]["options"].as_array().unwrap().contains(&"size=1048576".into()));
    }

    #[test]
    fn a_step_mount_on_etc_hosts_replaces_the_generated_one() {
        let mut r = run();
        r.mounts = vec![ExecMount::Bind { source: "/mine".into(), target: "/etc/hosts".into(), readonly: true }];
        let v = json(&build_spec(&r, &ctx()).unwrap());
        let hosts: Vec<_> = v["mounts"].as_array().unwrap().iter().filter(|m| m["destination"] == "/etc/hosts").collect();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0]["source"], "/mine");
    }

    #[test]
    fn hosts_file_lists_localhost_hostname_and_extra_hosts() {
        let s = hosts_file("", &[("db".into(), "10.0.0.5".into())]);
        assert_eq!(s, "127.0.0.1\tlocalhost buildkitsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n10.0.0.5\tdb\n");
    }

    #[test]
    fn resolv_conf_drops_loopback_resolvers_only_off_the_host_network() {
        let host = "search lan\nnameserver 127.0.0.53\noptions edns0\n";
        assert_eq!(resolv_conf(Some(host), NetworkMode::Host), host);
        for net in [NetworkMode::None, NetworkMode::Default] {
            let own = resolv_conf(Some(host), net);
            assert!(!own.contains("127.0.0.53"), "{net:?}");
            assert!(own.contains("search lan") && own.contains("options edns0"), "{net:?}");
            assert!(own.contains("nameserver 8.8.8.8\nnameserver 8.8.4.4\n"), "{net:?}: Docker's fallback");
            let kept = "nameserver 127.0.0.1\nnameserver 10.1.1.1\nnameserver ::1\n";
            assert_eq!(resolv_conf(Some(kept), net), "nameserver 10.1.1.1\n", "{net:?}");
        }
        assert!(resolv_conf(None, NetworkMode::Host).contains("8.8.8.8"));
        assert!(resolv_conf(None, NetworkMode::Default).contains("8.8.8.8"));
    }
}
