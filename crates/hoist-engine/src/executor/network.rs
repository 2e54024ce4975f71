//! The sandboxed network of RUN steps with the default network ([`NetworkMode::Default`]),
//! like Docker's bridge network for `docker build`: each step gets its own network
//! namespace with one veth port on a host bridge (`hoist0`, 10.213.0.0/16 by default) and
//! reaches the outside through NAT, but never the builder itself (its loopback is the
//! step's own; its addresses are rejected in INPUT), never link-local 169.254.0.0/16 (cloud
//! metadata: an `unreachable` route in the step's namespace and a reject in FORWARD), and
//! never another step (isolated bridge ports, and a drop of bridge-to-bridge traffic in
//! FORWARD for br_netfilter).
//!
//! Several builder processes on one machine (each with its own state root) share the
//! bridge and the iptables chains: setup is idempotent and runs under a machine-wide lock
//! ([`RUN_DIR`]`/setup.lock`); a step's address is taken by locking
//! [`RUN_DIR`]`/ips/<ip>` (a free lock is a free address, even when a crashed process left
//! the file); the host end of a step's veth is named after its address.
//!
//! The netlink work is done with `ip -batch` (one in the step's namespace, one on the host)
//! and the firewall with `iptables` (nf_tables or legacy, whichever `iptables` is).
//!
//! [`NetworkMode::Default`]: crate::graph::NetworkMode::Default

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use super::ExecError;

/// Default name of the host bridge of sandboxed steps.
pub const DEFAULT_BRIDGE: &str = "hoist0";

/// Default subnet of sandboxed steps; the gateway (the bridge's address) is its `.1`.
pub const DEFAULT_SUBNET: Ipv4Subnet = Ipv4Subnet { network: Ipv4Addr::new(10, 213, 0, 0), prefix: 16 };

/// Machine-wide directory of the setup lock and the address locks, shared by every builder
/// process on the machine.
pub const RUN_DIR: &str = "/run/hoist/net";

/// Link-local addresses (cloud metadata services live at 169.254.169.254).
pub const LINK_LOCAL: &str = "169.254.0.0/16";

/// hoist's filter chain jumped to from INPUT: what steps may send to the builder itself.
pub const INPUT_CHAIN: &str = "HOIST-INPUT";
/// hoist's filter chain jumped to from FORWARD: what steps may send through the builder.
pub const FORWARD_CHAIN: &str = "HOIST-FORWARD";
/// hoist's nat chain jumped to from POSTROUTING: masquerading of the steps' subnet.
pub const NAT_CHAIN: &str = "HOIST-POSTROUTING";

/// `(table, built-in chain, hoist chain)`: hoist's chains and where they are jumped to from
/// (position 1 of the built-in chain).
pub(crate) const JUMPS: [(&str, &str, &str); 3] =
    [("filter", "INPUT", INPUT_CHAIN), ("filter", "FORWARD", FORWARD_CHAIN), ("nat", "POSTROUTING", NAT_CHAIN)];

/// Why a subnet or bridge name is refused, or the sandboxed network of a RUN step cannot
/// be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Text that is not `<IPv4 address>/<prefix>`.
    #[error("{text:?} is not an IPv4 subnet like 10.213.0.0/16")]
    SubnetSyntax {
        /// The text as given.
        text: String,
    },
    /// A prefix outside /8 to /30.
    #[error("{network}/{prefix}: the prefix must be between /8 and /30 (a gateway and at least one step)")]
    SubnetPrefix {
        /// The network address.
        network: Ipv4Addr,
        /// The prefix length given.
        prefix: u8,
    },
    /// A network address with host bits set; `fixed` is the network it is in.
    #[error("{network}/{prefix} has host bits set: did you mean {fixed}/{prefix}?")]
    SubnetHostBits {
        /// The address as given.
        network: Ipv4Addr,
        /// The prefix length.
        prefix: u8,
        /// The address with its host bits cleared.
        fixed: Ipv4Addr,
    },
    /// A subnet overlapping loopback, link-local, multicast or reserved addresses.
    #[error("{subnet} overlaps {reserved}, which cannot be a network of steps")]
    SubnetReserved {
        /// The subnet given.
        subnet: Ipv4Subnet,
        /// The reserved range it overlaps.
        reserved: Ipv4Subnet,
    },
    /// A bridge name that is not a valid interface name.
    #[error("bridge name {bridge:?}: must be 1 to 15 characters of [A-Za-z0-9_.-]")]
    BridgeName {
        /// The name given.
        bridge: String,
    },
    /// An interface of the bridge's name exists and is not a bridge.
    #[error("interface {bridge} exists and is not a bridge: configure another bridge name")]
    NotABridge {
        /// The interface name.
        bridge: String,
    },
    /// The builder is not root.
    #[error("the builder is not running as root (it creates a bridge, network namespaces and iptables rules)")]
    NotRoot,
    /// A tool the sandbox needs is not on `PATH`.
    #[error("`{tool}` is not on PATH (install {package})")]
    MissingTool {
        /// The command: `ip` or `iptables`.
        tool: &'static str,
        /// The package that provides it: `iproute2` or `iptables`.
        package: &'static str,
    },
    /// `ip` or `iptables` exited with an error.
    #[error("`{tool} {}` failed: {output}", args.join(" "))]
    Tool {
        /// `ip` or `iptables`.
        tool: &'static str,
        /// Its arguments (without `-w`).
        args: Vec<String>,
        /// How it exited.
        status: ExitStatus,
        /// Its stderr, or its stdout if that is empty, or the exit status if both are.
        output: String,
    },
    /// `ip -batch` exited with an error.
    #[error("`ip -batch` failed: {output} (commands: {})", batch.trim().replace('\n', "; "))]
    Batch {
        /// The commands, one a line.
        batch: String,
        /// How it exited.
        status: ExitStatus,
        /// Its stderr, or its stdout if that is empty, or the exit status if both are.
        output: String,
    },
    /// A system call or file operation failed (`context` says what it was doing).
    #[error("cannot {context}: {source}")]
    Io {
        /// What was being done, e.g. `run /usr/sbin/ip`.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Every address of the subnet is held by a running step.
    #[error("all {count} addresses of {subnet} are in use by running steps")]
    NoFreeAddress {
        /// How many step addresses the subnet has.
        count: u32,
        /// The steps' subnet.
        subnet: Ipv4Subnet,
    },
    /// A step's veth is still there after deleting it.
    #[error("{name} still exists after `ip link del`")]
    LinkRemains {
        /// The veth interface's name.
        name: String,
    },
    /// The thread that creates a step's namespace panicked.
    #[error("the network namespace thread panicked")]
    ThreadPanicked,
    /// The blocking task setting up a step's network failed (panicked or was cancelled).
    #[error("the setup task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl NetError {
    fn io(context: impl Into<String>, source: impl Into<std::io::Error>) -> NetError {
        NetError::Io { context: context.into(), source: source.into() }
    }
}

/// An IPv4 subnet such as `10.213.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// Ranges a network of steps must not overlap: "this network", loopback, link-local,
/// multicast and reserved.
const RESERVED: [Ipv4Subnet; 4] = [
    Ipv4Subnet { network: Ipv4Addr::new(0, 0, 0, 0), prefix: 8 },
    Ipv4Subnet { network: Ipv4Addr::new(127, 0, 0, 0), prefix: 8 },
    Ipv4Subnet { network: Ipv4Addr::new(169, 254, 0, 0), prefix: 16 },
    Ipv4Subnet { network: Ipv4Addr::new(224, 0, 0, 0), prefix: 3 },
];

impl Ipv4Subnet {
    /// A subnet for sandboxed steps: a /8 to /30 (room for the gateway and at least one
    /// step), no host bits set, not loopback, link-local, multicast or reserved.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Ipv4Subnet, NetError> {
        if !(8..=30).contains(&prefix) {
            return Err(NetError::SubnetPrefix { network, prefix });
        }
        let bits = u32::from(network);
        if bits & !mask(prefix) != 0 {
            let fixed = Ipv4Addr::from(bits & mask(prefix));
            return Err(NetError::SubnetHostBits { network, prefix, fixed });
        }
        let s = Ipv4Subnet { network, prefix };
        let last = Ipv4Addr::from(bits | !mask(prefix));
        for bad in RESERVED {
            if bad.contains(network) || bad.contains(last) || s.contains(bad.network) {
                return Err(NetError::SubnetReserved { subnet: s, reserved: bad });
            }
        }
        Ok(s)
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The gateway: the bridge's address, the first of the subnet.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// How many steps the subnet holds: every address but network, gateway and broadcast.
    pub fn step_count(&self) -> u32 {
        (!mask(self.prefix)).saturating_sub(2)
    }

    /// The `i`-th address for steps (0 is the one after the gateway).
    pub fn step_addr(&self, i: u32) -> Option<Ipv4Addr> {
        (i < self.step_count()).then(|| Ipv4Addr::from(u32::from(self.network) + 2 + i))
    }

    /// Whether `ip` is inside the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }
}

impl std::fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Ipv4Subnet, NetError> {
        let bad = || NetError::SubnetSyntax { text: s.to_string() };
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        Ipv4Subnet::new(addr.parse().map_err(|_| bad())?, prefix.parse().map_err(|_| bad())?)
    }
}

/// The host side of sandboxed steps: bridge and subnet (see [`DEFAULT_BRIDGE`],
/// [`DEFAULT_SUBNET`]). Builder processes sharing a bridge must agree on the subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNetConfig {
    /// Name of the host bridge (created if missing), at most 15 characters.
    pub bridge: String,
    /// Subnet of the steps; the bridge gets its first address, the gateway.
    pub subnet: Ipv4Subnet,
}

impl Default for SandboxNetConfig {
    fn default() -> SandboxNetConfig {
        SandboxNetConfig { bridge: DEFAULT_BRIDGE.into(), subnet: DEFAULT_SUBNET }
    }
}

impl SandboxNetConfig {
    /// Check the bridge name (a valid interface name) and the subnet.
    pub fn validate(&self) -> Result<(), NetError> {
        let b = &self.bridge;
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        if b.is_empty() || b.len() > 15 || !b.chars().all(ok_char) || b == "." || b == ".." {
            return Err(NetError::BridgeName { bridge: b.clone() });
        }
        Ipv4Subnet::new(self.subnet.network, self.subnet.prefix).map(|_| ())
    }
}

/// Name of the host end of the veth of the step with address `ip`: `hh` and the address in
/// hex (10 characters; interface names have at most 15).
pub(crate) fn host_veth_name(ip: Ipv4Addr) -> String {
    format!("hh{:08x}", u32::from(ip))
}

/// One iptables rule: `iptables -t <table> -A <chain> <args>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    pub args: Vec<String>,
}

fn rule(table: &'static str, chain: &'static str, args: &str) -> Rule {
    Rule { table, chain, args: args.split_whitespace().map(str::to_string).collect() }
}

/// The rules of one bridge, in order, in hoist's chains. `local_dns`: nameservers of the
/// host's resolv.conf that are addresses of the host itself (the only builder service a
/// step may reach, on port 53).
pub(crate) fn rules(bridge: &str, subnet: Ipv4Subnet, local_dns: &[Ipv4Addr]) -> Vec<Rule> {
    let b = bridge;
    let mut r = Vec::new();
    for ns in local_dns {
        for proto in ["udp", "tcp"] {
            r.push(rule("filter", INPUT_CHAIN, &format!("-i {b} -d {ns}/32 -p {proto} -m {proto} --dport 53 -j ACCEPT")));
        }
    }
    // Anything else from a step to an address of the builder: refused at once.
    r.push(rule("filter", INPUT_CHAIN, &format!("-i {b} -p tcp -j REJECT --reject-with tcp-reset")));
    r.push(rule("filter", INPUT_CHAIN, &format!("-i {b} -j REJECT --reject-with icmp-port-unreachable")));
    // Step to step (bridged frames seen here with br_netfilter; isolated ports drop them
    // before that anyway).
    r.push(rule("filter", FORWARD_CHAIN, &format!("-i {b} -o {b} -j DROP")));
    // Cloud metadata and other link-local services, for packets that bypass the step's
    // unreachable route (raw sockets, or NET_ADMIN under --security=insecure).
    r.push(rule("filter", FORWARD_CHAIN, &format!("-i {b} -d {LINK_LOCAL} -j REJECT --reject-with icmp-net-prohibited")));
    // A builder address rewritten by a DNAT rule (a port Docker publishes): still the builder.
    r.push(rule("filter", FORWARD_CHAIN, &format!("-i {b} -m conntrack --ctstate DNAT -j REJECT --reject-with icmp-admin-prohibited")));
    r.push(rule("filter", FORWARD_CHAIN, &format!("-o {b} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")));
    r.push(rule("filter", FORWARD_CHAIN, &format!("-s {subnet} -i {b} ! -o {b} -j ACCEPT")));
    // Spoofed sources out, and nothing from elsewhere starts a connection to a step.
    r.push(rule("filter", FORWARD_CHAIN, &format!("-i {b} -j DROP")));
    r.push(rule("filter", FORWARD_CHAIN, &format!("-o {b} -j DROP")));
    r.push(rule("nat", NAT_CHAIN, &format!("-s {subnet} ! -o {b} -j MASQUERADE")));
    r
}

/// `ip -batch` run inside a step's new network namespace: loopback up, the veth pair
/// (`eth0` here, `host_veth` in the namespace of process `host_pid`), address, default
/// route via the gateway, link-local unreachable.
pub(crate) fn netns_batch(ip: Ipv4Addr, subnet: Ipv4Subnet, host_veth: &str, host_pid: u32) -> String {
    let (p, gw) = (subnet.prefix(), subnet.gateway());
    format!(
        "link set dev lo up\n\
         link add name eth0 type veth peer name {host_veth} netns {host_pid}\n\
         addr add {ip}/{p} dev eth0\n\
         link set dev eth0 up\n\
         route add default via {gw} dev eth0\n\
         route add unreachable {LINK_LOCAL}\n"
    )
}

/// `ip -batch` on the host for a step's port: on the bridge, isolated from the other ports.
pub(crate) fn port_batch(host_veth: &str, bridge: &str) -> String {
    format!(
        "link set dev {host_veth} master {bridge}\nlink set dev {host_veth} type bridge_slave isolated on\nlink set dev {host_veth} up\n"
    )
}

/// `ip -batch` on the host for the bridge (after `link add ... type bridge` if missing).
pub(crate) fn bridge_batch(bridge: &str, subnet: Ipv4Subnet) -> String {
    format!("addr replace {}/{} dev {bridge}\nlink set dev {bridge} up\n", subnet.gateway(), subnet.prefix())
}

/// IPv4 nameservers of a resolv.conf that a sandboxed step keeps (not loopback).
pub(crate) fn nameservers(resolv: &str) -> Vec<Ipv4Addr> {
    resolv
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .collect()
}

/// Whether `ip` is an address of this host (binding to it works; sends nothing).
fn is_local_addr(ip: Ipv4Addr) -> bool {
    let nonlocal_bind = std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind").unwrap_or_default();
    nonlocal_bind.trim() != "1" && std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// An address of the subnet held by this process: the lock of `<dir>/<ip>`. Dropping it
/// removes the file (while still holding the lock) and releases the lock.
#[derive(Debug)]
pub(crate) struct IpLock {
    ip: Ipv4Addr,
    path: PathBuf,
    _file: File,
}

impl IpLock {
    pub(crate) fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Try to take `ip`: `None` if another holder (any process) has it.
    pub(crate) fn try_take(dir: &Path, ip: Ipv4Addr) -> std::io::Result<Option<IpLock>> {
        use rustix::fs::{flock, FlockOperation};
        let path = dir.join(ip.to_string());
        for _ in 0..3 {
            let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path)?;
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            // A holder removes the file before unlocking: the lock only counts if the file
            // we locked is still the one at `path`.
            let ours = file.metadata()?;
            match std::fs::metadata(&path) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => return Ok(Some(IpLock { ip, path, _file: file })),
                _ => continue,
            }
        }
        Ok(None)
    }

    /// The first free address at or after index `start` (wrapping), and its index.
    pub(crate) fn take_any(dir: &Path, subnet: Ipv4Subnet, start: u32) -> Result<(IpLock, u32), NetError> {
        let n = subnet.step_count();
        for k in 0..n {
            let i = (start % n + k) % n;
            let ip = subnet.step_addr(i).unwrap_or(subnet.gateway());
            match IpLock::try_take(dir, ip) {
                Ok(Some(l)) => return Ok((l, i)),
                Ok(None) => continue,
                Err(e) => return Err(NetError::io(format!("lock {}", dir.join(ip.to_string()).display()), e)),
            }
        }
        Err(NetError::NoFreeAddress { count: n, subnet })
    }
}

/// Remove the lock files nobody holds (left by processes that died holding them, or that
/// exited before their background veth deletion finished). Each is removed while locked,
/// so a process that opened it meanwhile sees it is gone and tries again.
pub(crate) fn sweep_ip_locks(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if let Some(ip) = e.file_name().to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) {
            drop(IpLock::try_take(dir, ip));
        }
    }
}

impl Drop for IpLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a sandboxed step's network needs on the host.
#[derive(Debug, Clone)]
struct Tools {
    ip: PathBuf,
    iptables: PathBuf,
}

fn tools() -> Result<Tools, NetError> {
    if !rustix::process::geteuid().is_root() {
        return Err(NetError::NotRoot);
    }
    let find = |tool: &'static str, package: &'static str| {
        super::lookup_executable(Path::new(tool)).ok_or(NetError::MissingTool { tool, package })
    };
    Ok(Tools { ip: find("ip", "iproute2")?, iptables: find("iptables", "iptables")? })
}

fn output_text(o: &std::process::Output) -> String {
    let mut s = String::from_utf8_lossy(&o.stderr).trim().to_string();
    if s.is_empty() {
        s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    }
    if s.is_empty() {
        s = format!("exit status {}", o.status);
    }
    s
}

/// Run `ip -batch -` with `batch` on stdin.
fn ip_batch(ip: &Path, batch: &str) -> Result<(), NetError> {
    let mut child = Command::new(ip)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::io(format!("run {}", ip.display()), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(batch.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| NetError::io(format!("wait for {}", ip.display()), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Batch { batch: batch.to_string(), status: out.status, output: output_text(&out) })
    }
}

fn ip_cmd(ip: &Path, args: &[&str]) -> Result<(), NetError> {
    let out = Command::new(ip).args(args).stdin(Stdio::null()).output().map_err(|e| NetError::io(format!("run {}", ip.display()), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Tool {
            tool: "ip",
            args: args.iter().map(|a| a.to_string()).collect(),
            status: out.status,
            output: output_text(&out),
        })
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Turn IPv6 off on an interface of the calling thread's namespace (no link-local address:
/// IPv6 would bypass the IPv4 firewall). A kernel without IPv6 has nothing to turn off.
fn disable_ipv6(conf: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
}

struct Iptables<'a>(&'a Path);

impl Iptables<'_> {
    fn run(&self, table: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(self.0).arg("-w").args(["-t", table]).args(args).stdin(Stdio::null()).output()
    }

    fn ok(&self, table: &str, args: &[&str]) -> Result<(), NetError> {
        let out = self.run(table, args).map_err(|e| NetError::io(format!("run {}", self.0.display()), e))?;
        if out.status.success() {
            Ok(())
        } else {
            let args = ["-t", table].iter().chain(args).map(|a| a.to_string()).collect();
            Err(NetError::Tool { tool: "iptables", args, status: out.status, output: output_text(&out) })
        }
    }

    fn check(&self, table: &str, args: &[&str]) -> bool {
        self.run(table, args).is_ok_and(|o| o.status.success())
    }

    fn has_rule(&self, r: &Rule) -> bool {
        let mut a = vec!["-C", r.chain];
        a.extend(r.args.iter().map(String::as_str));
        self.check(r.table, &a)
    }

    fn rule_op(&self, op: &'static str, r: &Rule) -> Result<(), NetError> {
        let mut a = vec![op, r.chain];
        a.extend(r.args.iter().map(String::as_str));
        self.ok(r.table, &a)
    }
}

/// How often a builder checks again that the bridge and the firewall rules are in place.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// The sandboxed networks of one executor: host setup (on the first step of the process,
/// checked again every [`RECHECK`] and whenever the bridge is gone) and one [`Lease`] per
/// step.
#[derive(Debug)]
pub(crate) struct SandboxNet {
    config: SandboxNetConfig,
    netns_dir: PathBuf,
    run_dir: PathBuf,
    /// The tools, and when the host side was last checked.
    ready: Mutex<Option<(Tools, std::time::Instant)>>,
    cursor: AtomicU32,
}

impl SandboxNet {
    /// For an executor whose namespace files live in `netns_dir` (nothing is set up yet).
    pub(crate) fn new(config: SandboxNetConfig, netns_dir: PathBuf) -> SandboxNet {
        // Each process starts allocating at its own point and goes round: an address is
        // reused as late as possible (connection tracking entries of the previous holder
        // are long gone), and processes rarely contend for the same lock files.
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
            ^ std::process::id().wrapping_mul(2654435761);
        SandboxNet { config, netns_dir, run_dir: PathBuf::from(RUN_DIR), ready: Mutex::new(None), cursor: AtomicU32::new(seed) }
    }

    /// Unmount and remove namespace files a crashed executor left (the kernel then destroys
    /// their veth pairs; their address locks died with the process).
    pub(crate) fn recover(&self) {
        let Ok(entries) = std::fs::read_dir(&self.netns_dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            tracing::info!(netns = %p.display(), "removing network namespace left by a previous run");
            remove_netns_file(&p);
        }
    }

    fn err(source: NetError) -> ExecError {
        ExecError::Network { source }
    }

    /// The host side, set up if this process has not yet done it, the bridge is gone, or
    /// the last check is older than [`RECHECK`] (a firewall reload may have flushed the
    /// rules that keep steps off the builder).
    fn ensure_ready(&self) -> Result<Tools, ExecError> {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, checked)) = ready.as_ref() {
            if link_exists(&self.config.bridge) && checked.elapsed() < RECHECK {
                return Ok(t.clone());
            }
        }
        let tools = tools().map_err(Self::err)?;
        let start = std::time::Instant::now();
        self.setup(&tools).map_err(Self::err)?;
        tracing::debug!(took = ?start.elapsed(), "checked the sandbox network's bridge and firewall");
        *ready = Some((tools.clone(), std::time::Instant::now()));
        Ok(tools)
    }

    fn setup(&self, tools: &Tools) -> Result<(), NetError> {
        use rustix::fs::{flock, FlockOperation};
        let ips = self.run_dir.join("ips");
        std::fs::create_dir_all(&ips).map_err(|e| NetError::io(format!("create {}", ips.display()), e))?;
        let lock_path = self.run_dir.join("setup.lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| NetError::io(format!("open {}", lock_path.display()), e))?;
        flock(&lock, FlockOperation::LockExclusive).map_err(|e| NetError::io(format!("lock {}", lock_path.display()), e))?;
        sweep_ip_locks(&ips);

        let fwd = "/proc/sys/net/ipv4/ip_forward";
        if std::fs::read_to_string(fwd).map(|s| s.trim() != "1").unwrap_or(true) {
            std::fs::write(fwd, "1").map_err(|e| NetError::io(format!("enable IPv4 forwarding ({fwd})"), e))?;
        }

        let (bridge, subnet) = (&self.config.bridge, self.config.subnet);
        if !link_exists(bridge) {
            tracing::info!(%bridge, %subnet, "creating the bridge of sandboxed RUN steps");
            ip_cmd(&tools.ip, &["link", "add", "name", bridge, "type", "bridge"])?;
        } else if !Path::new("/sys/class/net").join(bridge).join("bridge").exists() {
            return Err(NetError::NotABridge { bridge: bridge.clone() });
        }
        disable_ipv6(bridge);
        ip_batch(&tools.ip, &bridge_batch(bridge, subnet))?;

        let ipt = Iptables(&tools.iptables);
        for (table, builtin, chain) in JUMPS {
            if !ipt.check(table, &["-S", chain]) {
                ipt.ok(table, &["-N", chain])?;
            }
            if !ipt.check(table, &["-C", builtin, "-j", chain]) {
                ipt.ok(table, &["-I", builtin, "1", "-j", chain])?;
            }
        }
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let local_dns: Vec<Ipv4Addr> = nameservers(&host_resolv).into_iter().filter(|a| is_local_addr(*a)).collect();
        let wanted = rules(bridge, subnet, &local_dns);
        if !wanted.iter().all(|r| ipt.has_rule(r)) {
            // Order matters (accepts before rejects): put back this bridge's whole list.
            tracing::info!(%bridge, "installing the firewall rules of sandboxed RUN steps");
            for r in &wanted {
                for _ in 0..8 {
                    if !ipt.has_rule(r) {
                        break;
                    }
                    ipt.rule_op("-D", r)?;
                }
            }
            for r in &wanted {
                ipt.rule_op("-A", r)?;
            }
        }
        tracing::debug!(%bridge, %subnet, "sandbox network of RUN steps is set up");
        Ok(())
    }

    /// A network namespace for step `id`, bound at `<netns_dir>/<id>`, with its veth on
    /// the bridge. Dropping the lease removes all of it.
    pub(crate) fn acquire(&self, id: &str) -> Result<Lease, ExecError> {
        let tools = self.ensure_ready()?;
        let start = self.cursor.load(Ordering::Relaxed);
        let (lock, index) = IpLock::take_any(&self.run_dir.join("ips"), self.config.subnet, start).map_err(Self::err)?;
        self.cursor.store(index.wrapping_add(1), Ordering::Relaxed);
        let ip = lock.ip();
        let host_veth = host_veth_name(ip);
        if link_exists(&host_veth) {
            // Left by a crashed holder of this address whose namespace the kernel has not
            // destroyed yet: we hold the address, so the name is ours.
            tracing::info!(veth = %host_veth, "deleting a stale veth");
            delete_link(&tools.ip, &host_veth).map_err(Self::err)?;
        }
        std::fs::create_dir_all(&self.netns_dir).map_err(|e| ExecError::io(format!("create {}", self.netns_dir.display()), e))?;
        let netns = self.netns_dir.join(id);
        if netns.exists() {
            remove_netns_file(&netns);
        }
        File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&netns)
            .map_err(|e| ExecError::io(format!("create {}", netns.display()), e))?;
        let lease = Lease { netns, host_veth, ip_bin: tools.ip.clone(), lock: Some(lock) };

        let batch = netns_batch(ip, self.config.subnet, &lease.host_veth, std::process::id());
        let (path, ip_bin) = (lease.netns.clone(), tools.ip.clone());
        let inner = std::thread::Builder::new()
            .name("hoist-netns".into())
            .spawn(move || -> Result<(), NetError> {
                // SAFETY: only this short-lived thread's network namespace changes; it opens
                // no file descriptor that another thread uses.
                unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
                    .map_err(|e| NetError::io("create a network namespace", e))?;
                rustix::mount::mount_bind("/proc/thread-self/ns/net", &path)
                    .map_err(|e| NetError::io(format!("bind the network namespace at {}", path.display()), e))?;
                // eth0 is created without IPv6 (loopback keeps ::1).
                disable_ipv6("default");
                ip_batch(&ip_bin, &batch)
            })
            .map_err(|e| ExecError::io("start a thread", e))?
            .join()
            .map_err(|_| Self::err(NetError::ThreadPanicked))?;
        inner.map_err(Self::err)?;
        disable_ipv6(&lease.host_veth);
        ip_batch(&tools.ip, &port_batch(&lease.host_veth, &self.config.bridge)).map_err(Self::err)?;
        Ok(lease)
    }
}

fn remove_netns_file(p: &Path) {
    match rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => tracing::warn!(netns = %p.display(), "cannot unmount network namespace: {e}"),
    }
    if let Err(e) = std::fs::remove_file(p) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(netns = %p.display(), "cannot remove network namespace file: {e}");
        }
    }
}

/// A step's network namespace (bound at [`Lease::netns`]) and address. Dropping it unmounts
/// and removes the namespace file, then deletes the veth pair and frees the address in the
/// background (deleting a veth waits ~20-30 ms for RCU grace periods: not the step's time).
#[derive(Debug)]
pub(crate) struct Lease {
    netns: PathBuf,
    host_veth: String,
    ip_bin: PathBuf,
    lock: Option<IpLock>,
}

impl Lease {
    /// The namespace file, for `linux.namespaces[].path`.
    pub(crate) fn netns(&self) -> &Path {
        &self.netns
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        remove_netns_file(&self.netns);
        // The kernel destroys the namespace, and the veth pair with it, once nothing refers
        // to it; but a copy of the bind mount in another mount namespace (with private
        // propagation, as here) would keep it: delete the veth ourselves. The address stays
        // locked until the veth is gone, so its next holder never meets it.
        let (veth, ip_bin, lock) = (std::mem::take(&mut self.host_veth), self.ip_bin.clone(), self.lock.take());
        if !link_exists(&veth) {
            return;
        }
        let (name, bin) = (veth.clone(), ip_bin.clone());
        let spawned = std::thread::Builder::new().name("hoist-veth-del".into()).spawn(move || {
            if let Err(e) = delete_link(&ip_bin, &veth) {
                tracing::warn!(%veth, "cannot delete a step's veth: {e}");
            }
            drop(lock);
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a thread to delete veth {name} ({e}): deleting it in place");
            let _ = delete_link(&bin, &name);
        }
    }
}

/// Delete a link by name; fine if it is gone, also when the kernel removed it meanwhile
/// (with its namespace).
fn delete_link(ip: &Path, name: &str) -> Result<(), NetError> {
    if !link_exists(name) {
        return Ok(());
    }
    let res = ip_cmd(ip, &["link", "del", "dev", name]);
    // The kernel may be deleting it with its namespace: give that a moment.
    for _ in 0..50 {
        if !link_exists(name) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    res.and(Err(NetError::LinkRemains { name: name.to_string() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Ipv4Subnet {
        x.parse().unwrap()
    }

    #[test]
    fn subnet_math() {
        let d = DEFAULT_SUBNET;
        assert_eq!(d.to_string(), "10.213.0.0/16");
        assert_eq!(s("10.213.0.0/16"), d);
        assert_eq!(d.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(d.step_count(), 65533);
        assert_eq!(d.step_addr(0), Some(Ipv4Addr::new(10, 213, 0, 2)));
        assert_eq!(d.step_addr(65532), Some(Ipv4Addr::new(10, 213, 255, 254)));
        assert_eq!(d.step_addr(65533), None, "never the broadcast address");
        assert!(d.contains(Ipv4Addr::new(10, 213, 7, 9)) && !d.contains(Ipv4Addr::new(10, 214, 0, 1)));
        let small = s("192.168.5.0/30");
        assert_eq!(small.step_count(), 1);
        assert_eq!(small.step_addr(0), Some(Ipv4Addr::new(192, 168, 5, 2)));
        assert_eq!(small.step_addr(1), None);
    }

    #[test]
    fn bad_subnets_are_refused_with_a_reason() {
        assert!("10.213.0.1/16".parse::<Ipv4Subnet>().unwrap_err().to_string().contains("did you mean 10.213.0.0/16"));
        assert!("10.0.0.0/31".parse::<Ipv4Subnet>().is_err());
        assert!("10.0.0.0/4".parse::<Ipv4Subnet>().is_err());
        assert!("127.1.0.0/16".parse::<Ipv4Subnet>().unwrap_err().to_string().contains("127.0.0.0/8"));
        assert!("169.254.0.0/24".parse::<Ipv4Subnet>().is_err());
        assert!("224.0.0.0/8".parse::<Ipv4Subnet>().is_err());
        assert!("10.213.0.0".parse::<Ipv4Subnet>().is_err());
        assert!("nonsense/8".parse::<Ipv4Subnet>().is_err());
        assert!(matches!("10.213.0.1/16".parse::<Ipv4Subnet>(), Err(NetError::SubnetHostBits { .. })));
        assert!(matches!("10.0.0.0/31".parse::<Ipv4Subnet>(), Err(NetError::SubnetPrefix { prefix: 31, .. })));
        assert!(matches!("10.213.0.0".parse::<Ipv4Subnet>(), Err(NetError::SubnetSyntax { .. })));
        assert_eq!("10.213.0.0".parse::<Ipv4Subnet>().unwrap_err().to_string(), "\"10.213.0.0\" is not an IPv4 subnet like 10.213.0.0/16");
    }

    #[test]
    fn failures_keep_their_source() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let e = IpLock::take_any(&gone, s("10.9.0.0/29"), 0).unwrap_err();
        let io = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).expect("the io::Error is the source");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert!(e.to_string().starts_with(&format!("cannot lock {}: ", gone.join("10.9.0.2").display())), "{e}");
        let exec = SandboxNet::err(e);
        assert!(exec.to_string().contains(": cannot lock ") && exec.to_string().contains("--network=none"), "{exec}");
        assert!(matches!(exec.source().and_then(|s| s.downcast_ref::<NetError>()), Some(NetError::Io { .. })));
    }

    #[test]
    fn config_validation() {
        assert!(SandboxNetConfig::default().validate().is_ok());
        let bad = |b: &str| SandboxNetConfig { bridge: b.into(), ..Default::default() }.validate().is_err();
        assert!(bad("") && bad("a-very-long-bridge") && bad("br 0") && bad("br/0") && bad(".."));
        assert!(!bad("hoist-test.1"));
    }

    #[test]
    fn veth_names_fit_interface_names_and_follow_the_address() {
        let n = host_veth_name(Ipv4Addr::new(10, 213, 0, 5));
        assert_eq!(n, "hh0ad50005");
        assert!(n.len() <= 15);
        assert_eq!(host_veth_name(Ipv4Addr::new(255, 255, 255, 255)), "hhffffffff");
    }

    #[test]
    fn rules_reject_the_builder_link_local_and_other_steps_and_masquerade_the_rest() {
        let r = rules("hoist0", DEFAULT_SUBNET, &[]);
        let text: Vec<String> = r.iter().map(|r| format!("-t {} -A {} {}", r.table, r.chain, r.args.join(" "))).collect();
        assert_eq!(
            text,
            [
                "-t filter -A HOIST-INPUT -i hoist0 -p tcp -j REJECT --reject-with tcp-reset",
                "-t filter -A HOIST-INPUT -i hoist0 -j REJECT --reject-with icmp-port-unreachable",
                "-t filter -A HOIST-FORWARD -i hoist0 -o hoist0 -j DROP",
                "-t filter -A HOIST-FORWARD -i hoist0 -d 169.254.0.0/16 -j REJECT --reject-with icmp-net-prohibited",
                "-t filter -A HOIST-FORWARD -i hoist0 -m conntrack --ctstate DNAT -j REJECT --reject-with icmp-admin-prohibited",
                "-t filter -A HOIST-FORWARD -o hoist0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-t filter -A HOIST-FORWARD -s 10.213.0.0/16 -i hoist0 ! -o hoist0 -j ACCEPT",
                "-t filter -A HOIST-FORWARD -i hoist0 -j DROP",
                "-t filter -A HOIST-FORWARD -o hoist0 -j DROP",
                "-t nat -A HOIST-POSTROUTING -s 10.213.0.0/16 ! -o hoist0 -j MASQUERADE",
            ]
        );
    }

    #[test]
    fn a_host_local_nameserver_is_the_only_exception_and_comes_first() {
        let r = rules("br1", s("10.9.0.0/24"), &[Ipv4Addr::new(192, 0, 2, 2)]);
        let input: Vec<String> = r.iter().filter(|r| r.chain == INPUT_CHAIN).map(|r| r.args.join(" ")).collect();
        assert_eq!(
            input,
            [
                "-i br1 -d 192.0.2.2/32 -p udp -m udp --dport 53 -j ACCEPT",
                "-i br1 -d 192.0.2.2/32 -p tcp -m tcp --dport 53 -j ACCEPT",
                "-i br1 -p tcp -j REJECT --reject-with tcp-reset",
                "-i br1 -j REJECT --reject-with icmp-port-unreachable",
            ]
        );
    }

    #[test]
    fn nameservers_skip_loopback_and_ipv6() {
        let conf = "search x\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\nnameserver fd00::1\n# nameserver 1.2.3.4\n";
        assert_eq!(nameservers(conf), vec![Ipv4Addr::new(10, 255, 255, 53)]);
    }

    #[test]
    fn batches_configure_both_sides() {
        let b = netns_batch(Ipv4Addr::new(10, 213, 0, 5), DEFAULT_SUBNET, "hh0ad50005", 42);
        assert_eq!(
            b,
            "link set dev lo up\nlink add name eth0 type veth peer name hh0ad50005 netns 42\naddr add 10.213.0.5/16 dev eth0\n\
             link set dev eth0 up\nroute add default via 10.213.0.1 dev eth0\nroute add unreachable 169.254.0.0/16\n"
        );
        assert!(port_batch("hh0ad50005", "hoist0").contains("type bridge_slave isolated on"));
        assert_eq!(bridge_batch("hoist0", DEFAULT_SUBNET), "addr replace 10.213.0.1/16 dev hoist0\nlink set dev hoist0 up\n");
    }

    #[test]
    fn ip_locks_exclude_each_other_go_round_and_survive_a_crashed_holder() {
        let dir = tempfile::tempdir().unwrap();
        let net = s("10.9.0.0/29"); // 5 step addresses: .2 to .6
        let (a, ia) = IpLock::take_any(dir.path(), net, 0).unwrap();
        assert_eq!((a.ip(), ia), (Ipv4Addr::new(10, 9, 0, 2), 0));
        let (b, ib) = IpLock::take_any(dir.path(), net, 0).unwrap();
        assert_eq!((b.ip(), ib), (Ipv4Addr::new(10, 9, 0, 3), 1), "a held address is skipped");
        let (c, _) = IpLock::take_any(dir.path(), net, 9).unwrap();
        assert_eq!(c.ip(), Ipv4Addr::new(10, 9, 0, 6), "start wraps round the subnet");
        assert!(IpLock::try_take(dir.path(), a.ip()).unwrap().is_none());
        drop(a);
        assert!(!dir.path().join("10.9.0.2").exists(), "the file goes with the lock");
        // A crashed holder leaves its file, unlocked: the address is free.
        std::fs::write(dir.path().join("10.9.0.4"), "").unwrap();
        let d = IpLock::try_take(dir.path(), Ipv4Addr::new(10, 9, 0, 4)).unwrap().expect("a stale file's lock is free");
        let all: Vec<IpLock> = std::iter::from_fn(|| IpLock::take_any(dir.path(), net, 0).ok().map(|(l, _)| l)).collect();
        assert_eq!(all.iter().map(|l| l.ip().to_string()).collect::<Vec<_>>(), ["10.9.0.2", "10.9.0.5"]);
        assert!(IpLock::take_any(dir.path(), net, 0).unwrap_err().to_string().contains("all 5 addresses of 10.9.0.0/29 are in use"));
        drop((b, c, d, all));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // Sweeping removes free files and keeps held ones.
        std::fs::write(dir.path().join("10.9.0.3"), "").unwrap();
        let held = IpLock::try_take(dir.path(), Ipv4Addr::new(10, 9, 0, 5)).unwrap().unwrap();
        sweep_ip_locks(dir.path());
        let left: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(left, ["10.9.0.5"]);
        assert!(IpLock::try_take(dir.path(), held.ip()).unwrap().is_none(), "still held after the sweep");
    }
}
