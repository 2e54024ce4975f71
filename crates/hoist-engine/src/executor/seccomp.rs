//! Docker's default seccomp profile, for sandboxed RUN steps.
//!
//! The policy is that of Docker's default profile as moby/profiles defines it
//! (`seccomp/default_linux.go`, release `seccomp/v0.2.3`, read at commit cd3bed8 of
//! 2026-06-30; `seccomp/default.json` is generated from it), rewritten here as data:
//!
//! * everything not listed fails with EPERM;
//! * [`ALLOWED`] is allowed to every step;
//! * a few syscalls are allowed with some argument values only (`personality`, `socket`,
//!   and `clone` without namespace flags);
//! * [`CAPABILITY_GROUPS`] are allowed to a step that holds the capability that makes them
//!   useful: without it the kernel would refuse them anyway, and the filter keeps their
//!   large, rarely exercised kernel code out of reach;
//! * a few are allowed on one architecture family only.
//!
//! As in Docker, a group that depends on a capability is decided by the capability set
//! the step actually gets (`spec::capabilities`), and the architectures are the host's:
//! a foreign-platform step runs under qemu-user, which makes host syscalls through this
//! filter.
//!
//! Deliberate differences from moby's generator: a name allowed unconditionally is not
//! listed a second time by a later group (same filter, smaller config); MIPS hosts get no
//! sub-architectures and no MIPS-specific entries (hoist does not build there). Names the
//! runtime's libseccomp does not know yet (those of kernels 6.5 to 6.13, such as
//! `cachestat`, `mseal` or `listmount`) are skipped by runc, whose filter then answers
//! ENOSYS for syscall numbers above the highest it knows, so that libc falls back.

use std::collections::HashSet;

use oci_spec::runtime::{
    Arch, Capabilities, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

use super::ExecError;

/// Syscalls every step may make, whatever its capabilities (Docker's first, unconditional
/// group). Names of other architectures (`*32`, `*_time64`, `socketcall`, `ipc`, …) are
/// resolved per architecture by libseccomp and simply absent where they do not exist.
pub(crate) const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listmount",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "riscv_hwprobe",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statmount",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "uretprobe",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Allowed to every step on Linux 4.8 and later. Before 4.8 a tracer could rewrite a
/// syscall after seccomp had checked it, so ptrace was a way out of the filter; there
/// these need CAP_SYS_PTRACE (see [`CAPABILITY_GROUPS`]).
pub(crate) const PTRACE_SINCE_4_8: &[&str] = &["process_vm_readv", "process_vm_writev", "ptrace"];

/// The `personality(2)` values a step may set: PER_LINUX, PER_LINUX32 (`linux32`,
/// `setarch i686`), UNAME26, PER_LINUX32|UNAME26, and 0xffffffff, which only queries.
/// Every other value is refused, notably ADDR_NO_RANDOMIZE (`setarch -R`), which would
/// switch off ASLR, and READ_IMPLIES_EXEC.
pub(crate) const PERSONALITY_VALUES: &[u64] = &[0x0, 0x0008, 0x20000, 0x20008, 0xffff_ffff];

/// `socket(2)` families a step may not open: AF_VSOCK (virtual-machine sockets, which reach
/// the hypervisor and are not isolated by network namespaces) and AF_ALG (the kernel
/// crypto API, a recurring source of kernel bugs; blocked since moby/profiles seccomp
/// v0.2.3). Docker expresses this as three rules, `< AF_ALG`, `== AF_ALG + 1` and
/// `> AF_VSOCK`, relying on the two being 38 and 40. On 32-bit x86 `socket` goes
/// through `socketcall(2)`, whose arguments seccomp cannot see: Docker allows it there
/// (it reverted blocking `socketcall`), and so do we.
pub(crate) const DENIED_SOCKET_FAMILIES: [i32; 2] = [libc::AF_ALG, libc::AF_VSOCK];
// The three socket rules below rely on exactly one family between the two.
const _: () = assert!(libc::AF_VSOCK == libc::AF_ALG + 2);

/// The namespace flags `clone(2)` may not carry without CAP_SYS_ADMIN: creating
/// namespaces (above all a user namespace, which needs no capability and hands its
/// creator a full capability set over a large kernel surface) is for privileged steps.
pub(crate) const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// 32-bit ARM calls, available to arm and arm64 hosts (arm64 runs arm binaries natively).
const ARM_ONLY: &[&str] = &["arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush", "set_tls"];
/// x86-64 (and x32) only: setting the FS/GS base for thread-local storage.
const X86_64_ONLY: &[&str] = &["arch_prctl"];
/// The x86 family: per-process LDT entries (old 16-bit code, Wine).
const X86_ONLY: &[&str] = &["modify_ldt"];
/// s390 and s390x only.
const S390_ONLY: &[&str] = &["s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"];
/// ppc64le only.
const PPC64LE_ONLY: &[&str] = &["sync_file_range2", "swapcontext"];
/// riscv64 only.
const RISCV64_ONLY: &[&str] = &["riscv_flush_icache"];

/// CAP_SYS_ADMIN: mounting (old and new mount API), namespaces (`unshare`, `setns`, and
/// `clone`/`clone3` with any flags), quotas, host and domain names, fanotify, BPF, perf,
/// syslog and LSM attributes — the calls that capability governs.
const SYS_ADMIN: &[&str] = &[
    "bpf",
    "clone",
    "clone3",
    "fanotify_init",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "lookup_dcookie",
    "lsm_get_self_attr",
    "lsm_list_modules",
    "lsm_set_self_attr",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "perf_event_open",
    "quotactl",
    "quotactl_fd",
    "setdomainname",
    "sethostname",
    "setns",
    "syslog",
    "umount",
    "umount2",
    "unshare",
];

/// Syscalls allowed only to a step holding a capability, in Docker's order. Each group is
/// what the capability exists for; a step without it could not use them meaningfully,
/// so the filter hides their kernel code.
pub(crate) const CAPABILITY_GROUPS: &[(Capability, &[&str])] = &[
    // Opening a file by handle bypasses path permission checks (the "shocker" escape).
    (Capability::DacReadSearch, &["open_by_handle_at"]),
    (Capability::SysAdmin, SYS_ADMIN),
    (Capability::SysBoot, &["reboot"]),
    // In Docker's default set, so `chroot` works in an ordinary step.
    (Capability::SysChroot, &["chroot"]),
    (Capability::SysModule, &["delete_module", "init_module", "finit_module"]),
    (Capability::SysPacct, &["acct"]),
    // Inspecting and changing other processes.
    (Capability::SysPtrace, &["kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev", "ptrace"]),
    // Raw I/O port access.
    (Capability::SysRawio, &["iopl", "ioperm"]),
    // Setting the (host-wide) clock.
    (Capability::SysTime, &["settimeofday", "stime", "clock_settime", "clock_settime64"]),
    (Capability::SysTtyConfig, &["vhangup"]),
    // NUMA memory policy.
    (Capability::SysNice, &["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"]),
    (Capability::Syslog, &["syslog"]),
    // The capabilities split out of CAP_SYS_ADMIN in Linux 5.8.
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
];

/// The host CPU architecture, which decides the filter's architectures and the
/// architecture-specific groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostArch {
    X86_64,
    X86,
    Aarch64,
    Arm,
    S390x,
    Ppc64le,
    Riscv64,
    Loongarch64,
    /// Any other: the runtime's native architecture only, no architecture-specific group.
    Other,
}

impl HostArch {
    /// The architecture hoist was compiled for, which is the host's.
    pub(crate) fn current() -> HostArch {
        match std::env::consts::ARCH {
            "powerpc64" if cfg!(target_endian = "little") => HostArch::Ppc64le,
            arch => HostArch::from_rust_arch(arch),
        }
    }

    /// From a `std::env::consts::ARCH` value.
    pub(crate) fn from_rust_arch(arch: &str) -> HostArch {
        match arch {
            "x86_64" => HostArch::X86_64,
            "x86" => HostArch::X86,
            "aarch64" => HostArch::Aarch64,
            "arm" => HostArch::Arm,
            "s390x" => HostArch::S390x,
            "riscv64" => HostArch::Riscv64,
            "loongarch64" => HostArch::Loongarch64,
            _ => HostArch::Other,
        }
    }

    /// The filter's architectures: the native one and those its CPU also runs (Docker's
    /// arch map). Empty means the runtime's native architecture only, as Docker leaves it
    /// for hosts outside its map.
    pub(crate) fn seccomp_arches(self) -> Vec<Arch> {
        match self {
            HostArch::X86_64 => vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
            HostArch::Aarch64 => vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm],
            HostArch::S390x => vec![Arch::ScmpArchS390x, Arch::ScmpArchS390],
            HostArch::Riscv64 => vec![Arch::ScmpArchRiscv64],
            HostArch::Loongarch64 => vec![Arch::ScmpArchLoongarch64],
            HostArch::X86 | HostArch::Arm | HostArch::Ppc64le | HostArch::Other => Vec::new(),
        }
    }

    /// The groups allowed on this architecture only.
    fn only_groups(self) -> Vec<&'static [&'static str]> {
        match self {
            HostArch::X86_64 => vec![X86_64_ONLY, X86_ONLY],
            HostArch::X86 => vec![X86_ONLY],
            HostArch::Aarch64 | HostArch::Arm => vec![ARM_ONLY],
            HostArch::S390x => vec![S390_ONLY],
            HostArch::Ppc64le => vec![PPC64LE_ONLY],
            HostArch::Riscv64 => vec![RISCV64_ONLY],
            HostArch::Loongarch64 | HostArch::Other => Vec::new(),
        }
    }
}

/// The host facts the profile depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Host {
    pub arch: HostArch,
    /// Kernel `(major, minor)`; `None` if unknown (treated as older than 4.8).
    pub kernel: Option<(u32, u32)>,
}

impl Host {
    /// This machine.
    pub(crate) fn current() -> Host {
        let uname = rustix::system::uname();
        Host { arch: HostArch::current(), kernel: parse_kernel_release(&uname.release().to_string_lossy()) }
    }
}

/// `(major, minor)` of a kernel release string such as `6.1.0-18-amd64`.
pub(crate) fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Rules in the order they are added; a name allowed unconditionally is listed once.
#[derive(Default)]
struct Rules {
    syscalls: Vec<LinuxSyscall>,
    allowed: HashSet<&'static str>,
}

impl Rules {
    fn allow(&mut self, names: &[&'static str]) -> Result<(), ExecError> {
        let new: Vec<String> = names.iter().filter(|n| self.allowed.insert(**n)).map(|n| n.to_string()).collect();
        if !new.is_empty() {
            self.syscalls.push(LinuxSyscallBuilder::default().names(new).action(LinuxSeccompAction::ScmpActAllow).build()?);
        }
        Ok(())
    }

    fn allow_with(&mut self, name: &str, arg: LinuxSeccompArg) -> Result<(), ExecError> {
        self.syscalls.push(
            LinuxSyscallBuilder::default()
                .names(vec![name.to_string()])
                .action(LinuxSeccompAction::ScmpActAllow)
                .args(vec![arg])
                .build()?,
        );
        Ok(())
    }

    fn errno(&mut self, name: &str, errno: i32) -> Result<(), ExecError> {
        self.syscalls.push(
            LinuxSyscallBuilder::default()
                .names(vec![name.to_string()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(errno as u32)
                .build()?,
        );
        Ok(())
    }
}

fn arg(index: usize, op: LinuxSeccompOperator, value: u64) -> Result<LinuxSeccompArg, ExecError> {
    Ok(LinuxSeccompArgBuilder::default().index(index).op(op).value(value).build()?)
}

/// Docker's default profile for a step holding `caps`, on `host`.
pub(crate) fn default_profile(caps: &Capabilities, host: &Host) -> Result<LinuxSeccomp, ExecError> {
    use LinuxSeccompOperator::{ScmpCmpEq, ScmpCmpGt, ScmpCmpLt, ScmpCmpMaskedEq};
    let mut rules = Rules::default();
    rules.allow(ALLOWED)?;
    if host.kernel.is_some_and(|k| k >= (4, 8)) {
        rules.allow(PTRACE_SINCE_4_8)?;
    }

    let [alg, vsock] = DENIED_SOCKET_FAMILIES.map(|f| f as u64);
    rules.allow_with("socket", arg(0, ScmpCmpLt, alg)?)?;
    rules.allow_with("socket", arg(0, ScmpCmpEq, alg + 1)?)?;
    rules.allow_with("socket", arg(0, ScmpCmpGt, vsock)?)?;
    for value in PERSONALITY_VALUES {
        rules.allow_with("personality", arg(0, ScmpCmpEq, *value)?)?;
    }

    for group in host.arch.only_groups() {
        rules.allow(group)?;
    }
    for (cap, names) in CAPABILITY_GROUPS {
        if caps.contains(cap) {
            rules.allow(names)?;
        }
    }

    if !caps.contains(&Capability::SysAdmin) {
        // clone(2) without namespace flags: (flags & CLONE_NAMESPACE_FLAGS) == 0. The
        // flags are the first argument except on s390, where the stack comes first.
        let index: usize = if host.arch == HostArch::S390x { 1 } else { 0 };
        let flags =
            LinuxSeccompArgBuilder::default().index(index).op(ScmpCmpMaskedEq).value(CLONE_NAMESPACE_FLAGS).value_two(0u64).build()?;
        rules.allow_with("clone", flags)?;
        // clone3(2) passes its flags in memory, out of the filter's sight: make it look
        // absent (ENOSYS) so that glibc and others fall back to clone(2), checked above.
        rules.errno("clone3", libc::ENOSYS)?;
    }

    let mut profile = LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(libc::EPERM as u32)
        .syscalls(rules.syscalls);
    let arches = host.arch.seccomp_arches();
    if !arches.is_empty() {
        profile = profile.architectures(arches);
    }
    Ok(profile.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::spec::capabilities;
    use crate::graph::SecurityMode;

    const X86_64: Host = Host { arch: HostArch::X86_64, kernel: Some((6, 1)) };

    fn default_caps() -> Capabilities {
        capabilities(SecurityMode::Sandbox, u64::MAX)
    }

    fn with(extra: Capability) -> Capabilities {
        let mut caps = default_caps();
        caps.insert(extra);
        caps
    }

    /// What the filter does with `name(args…)`: the action and errno of the first rule
    /// whose name and argument conditions match, else the default (the profile has at most
    /// one matching rule per call, so order does not matter).
    fn decide(p: &LinuxSeccomp, name: &str, args: &[u64]) -> (LinuxSeccompAction, Option<u32>) {
        for rule in p.syscalls().as_deref().unwrap_or_default() {
            if !rule.names().iter().any(|n| n == name) {
                continue;
            }
            let matches = rule.args().as_deref().unwrap_or_default().iter().all(|a| {
                let v = args.get(a.index()).copied().unwrap_or(0);
                match a.op() {
                    LinuxSeccompOperator::ScmpCmpEq => v == a.value(),
                    LinuxSeccompOperator::ScmpCmpNe => v != a.value(),
                    LinuxSeccompOperator::ScmpCmpLt => v < a.value(),
                    LinuxSeccompOperator::ScmpCmpLe => v <= a.value(),
                    LinuxSeccompOperator::ScmpCmpGt => v > a.value(),
                    LinuxSeccompOperator::ScmpCmpGe => v >= a.value(),
                    LinuxSeccompOperator::ScmpCmpMaskedEq => v & a.value() == a.value_two().unwrap_or(0),
                }
            });
            if matches {
                return (rule.action(), rule.errno_ret());
            }
        }
        (p.default_action(), p.default_errno_ret())
    }

    fn allowed(p: &LinuxSeccomp, name: &str, args: &[u64]) -> bool {
        decide(p, name, args).0 == LinuxSeccompAction::ScmpActAllow
    }

    const EPERM: (LinuxSeccompAction, Option<u32>) = (LinuxSeccompAction::ScmpActErrno, Some(1));

    #[test]
    fn everything_unlisted_fails_with_eperm() {
        let p = default_profile(&default_caps(), &X86_64).unwrap();
        assert_eq!((p.default_action(), p.default_errno_ret()), EPERM);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(v["defaultErrnoRet"], 1);
        for name in ["keyctl", "add_key", "userfaultfd", "kexec_load", "swapon", "pivot_root", "no_such_call"] {
            assert_eq!(decide(&p, name, &[]), EPERM, "{name}");
        }
    }

    #[test]
    fn ordinary_calls_are_allowed() {
        let p = default_profile(&default_caps(), &X86_64).unwrap();
        for name in [
            "read",
            "write",
            "openat",
            "execve",
            "fork",
            "vfork",
            "wait4",
            "futex",
            "mknodat",
            "fchownat",
            "chroot",
            "arch_prctl",
            "modify_ldt",
        ] {
            assert!(allowed(&p, name, &[]), "{name}");
        }
        // glibc's fork and pthread_create use clone(2) without namespace flags.
        let thread = (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD) as u64;
        assert!(allowed(&p, "clone", &[thread]));
        assert!(allowed(&p, "clone", &[libc::SIGCHLD as u64]));
    }

    #[test]
    fn clone3_is_enosys_so_libc_falls_back_to_clone_unless_cap_sys_admin() {
        let p = default_profile(&default_caps(), &X86_64).unwrap();
        assert_eq!(decide(&p, "clone3", &[]), (LinuxSeccompAction::ScmpActErrno, Some(38)));
        let v = serde_json::to_value(&p).unwrap();
        let rule = v["syscalls"].as_array().unwrap().iter().find(|r| r["names"] == serde_json::json!(["clone3"])).unwrap();
        assert_eq!(rule["action"], "SCMP_ACT_ERRNO");
        assert_eq!(rule["errnoRet"], 38);
        let admin = default_profile(&with(Capability::SysAdmin), &X86_64).unwrap();
        assert!(allowed(&admin, "clone3", &[]));
    }

    #[test]
    fn mount_unshare_and_setns_need_cap_sys_admin() {
        let p = default_profile(&default_caps(), &X86_64).unwrap();
        let admin = default_profile(&with(Capability::SysAdmin), &X86_64).unwrap();
        for name in ["mount", "umount2", "unshare", "setns", "fsopen", "move_mount", "sethostname", "bpf", "perf_event_open"] {
            assert_eq!(decide(&p, name, &[]), EPERM, "{name} without CAP_SYS_ADMIN");
            assert!(allowed(&admin, name, &[]), "{name} with CAP_SYS_ADMIN");
        }
    }

    #[test]
    fn clone_may_not_create_namespaces_without_cap_sys_admin() {
        assert_eq!(CLONE_NAMESPACE_FLAGS, 0x7e02_0000);
        let p = default_profile(&default_caps(), &X86_64).unwrap();
        let rules: Vec<&LinuxSyscall> =
            p.syscalls().as_ref().unwrap().iter().filter(|r| r.names().contains(&"clone".to_string())).collect();
        assert_eq!(rules.len(), 1);
        let args = rules[0].args().as_ref().unwrap();
        assert_eq!(args.len(), 1);
        assert_eq!(
            (args[0].index(), args[0].op(), args[0].value(), args[0].value_two()),
            (0, LinuxSeccompOperator::ScmpCmpMaskedEq, CLONE_NAMESPACE_FLAGS, Some(0))
        );
        for flag in [
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUTS,
        ] {
            assert_eq!(decide(&p, "clone", &[(flag | libc::SIGCHLD) as u64]), EPERM, "{flag:#x}");
        }
        let admin = default_profile(&with(Capability::SysAdmin), &X86_64).unwrap();
        assert!(allowed(&admin, "clone", &[(libc::CLONE_NEWUSER | libc::SIGCHLD) as u64]));
        // s390 passes the stack first and the flags second.
        let s390 = default_profile(&default_caps(), &Host { arch: HostArch::S390x, kernel: Some((6, 1)) }).unwrap();
        assert_eq!(decide(&s390, "clone", &[0, libc::CLONE_NEWUSER as u64]), EPERM);
    }

    #[test]
    fn personality_accepts_dockers_values_only() {
        let p = default_profile(&default_caps(), &X86_64).unwrap();
        for v in [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff] {
            assert!(allowed(&p, "personality", &[v]), "{v:#x}");
        }
        // ADDR_NO_RANDOMIZE (setarch -R) and READ_IMPLIES_EXEC.
        for v in [0x0040000, 0x0400000, 0x0040008] {
            assert_eq!(decide(&p, "personality", &[v]), EPERM, "{v:#x}");
        }
    }

    #[test]
    fn sockets_of_every_family_but_vsock_and_alg() {
        let p = default_profile(&default_caps(), &X86_64).unwrap();
        for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK, libc::AF_PACKET, 39, 41, libc::AF_XDP] {
            assert!(allowed(&p, "socket", &[family as u64]), "{family}");
        }
        for family in [libc::AF_VSOCK, libc::AF_ALG] {
            assert_eq!(decide(&p, "socket", &[family as u64]), EPERM, "{family}");
        }
    }

    #[test]
    fn capability_groups_follow_the_steps_capabilities() {
        let p = default_profile(&default_caps(), &X86_64).unwrap();
        for (cap, name) in [
            (Capability::SysBoot, "reboot"),
            (Capability::SysModule, "finit_module"),
            (Capability::SysPacct, "acct"),
            (Capability::SysPtrace, "kcmp"),
            (Capability::SysRawio, "iopl"),
            (Capability::SysTime, "clock_settime"),
            (Capability::SysNice, "mbind"),
            (Capability::SysTtyConfig, "vhangup"),
            (Capability::Syslog, "syslog"),
            (Capability::Bpf, "bpf"),
            (Capability::Perfmon, "perf_event_open"),
            (Capability::DacReadSearch, "open_by_handle_at"),
        ] {
            assert_eq!(decide(&p, name, &[]), EPERM, "{name} without {cap}");
            assert!(allowed(&default_profile(&with(cap), &X86_64).unwrap(), name, &[]), "{name} with {cap}");
        }
        // CAP_SYS_CHROOT is one of Docker's defaults: chroot works in an ordinary step.
        assert!(allowed(&p, "chroot", &[]));
        let mut no_chroot = default_caps();
        no_chroot.remove(&Capability::SysChroot);
        assert_eq!(decide(&default_profile(&no_chroot, &X86_64).unwrap(), "chroot", &[]), EPERM);
    }

    #[test]
    fn ptrace_is_for_everyone_from_linux_4_8_only() {
        let p = default_profile(&default_caps(), &X86_64).unwrap();
        assert!(allowed(&p, "ptrace", &[]) && allowed(&p, "process_vm_readv", &[]));
        let old = Host { arch: HostArch::X86_64, kernel: Some((4, 4)) };
        assert_eq!(decide(&default_profile(&default_caps(), &old).unwrap(), "ptrace", &[]), EPERM);
        assert!(allowed(&default_profile(&with(Capability::SysPtrace), &old).unwrap(), "ptrace", &[]));
        let unknown = Host { arch: HostArch::X86_64, kernel: None };
        assert_eq!(decide(&default_profile(&default_caps(), &unknown).unwrap(), "ptrace", &[]), EPERM);
    }

    #[test]
    fn architectures_follow_dockers_arch_map_for_the_host() {
        let arches = |arch| {
            let p = default_profile(&default_caps(), &Host { arch, kernel: Some((6, 1)) }).unwrap();
            serde_json::to_value(&p).unwrap().get("architectures").cloned().unwrap_or_default()
        };
        assert_eq!(arches(HostArch::X86_64), serde_json::json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]));
        assert_eq!(arches(HostArch::Aarch64), serde_json::json!(["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]));
        assert_eq!(arches(HostArch::Other), serde_json::Value::Null, "the runtime's native architecture only");
        assert_eq!(HostArch::from_rust_arch("x86_64"), HostArch::X86_64);
        assert_eq!(HostArch::from_rust_arch("aarch64"), HostArch::Aarch64);
        assert_eq!(HostArch::from_rust_arch("sparc64"), HostArch::Other);
    }

    #[test]
    fn architecture_specific_calls_only_on_their_architecture() {
        let x86 = default_profile(&default_caps(), &X86_64).unwrap();
        let arm = default_profile(&default_caps(), &Host { arch: HostArch::Aarch64, kernel: Some((6, 1)) }).unwrap();
        assert!(allowed(&x86, "arch_prctl", &[]) && allowed(&x86, "modify_ldt", &[]));
        assert_eq!(decide(&x86, "set_tls", &[]), EPERM);
        assert!(allowed(&arm, "set_tls", &[]) && allowed(&arm, "cacheflush", &[]));
        assert_eq!(decide(&arm, "arch_prctl", &[]), EPERM);
    }

    #[test]
    fn each_name_is_allowed_unconditionally_at_most_once() {
        let mut caps = default_caps();
        caps.extend([Capability::SysAdmin, Capability::SysPtrace, Capability::Syslog, Capability::Bpf, Capability::Perfmon]);
        let p = default_profile(&caps, &X86_64).unwrap();
        let mut seen = HashSet::new();
        for rule in p.syscalls().as_ref().unwrap() {
            if rule.action() == LinuxSeccompAction::ScmpActAllow && rule.args().is_none() {
                for n in rule.names() {
                    assert!(seen.insert(n.clone()), "{n} listed twice");
                }
            }
        }
        assert!(seen.contains("syslog") && seen.contains("ptrace") && seen.contains("bpf"));
        assert_eq!(ALLOWED.iter().collect::<HashSet<_>>().len(), ALLOWED.len(), "ALLOWED has no duplicates");
    }

    #[test]
    fn kernel_release_parses_to_major_and_minor() {
        assert_eq!(parse_kernel_release("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_release("4.8"), Some((4, 8)));
        assert_eq!(parse_kernel_release("6.18.44-fc-v1272"), Some((6, 18)));
        assert_eq!(parse_kernel_release("garbage"), None);
        assert!(Host::current().kernel.is_some());
    }
}
