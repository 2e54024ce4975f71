//! `hoist-bench`: hoist against `docker build` (BuildKit in Docker 20.10) and `buildah bud`
//! on generated real-looking workloads, in every scenario of issue 6, side by side.
//!
//!     cargo run --release -p hoist-bench -- [--quick] [--runs N] [--only webapp,biglayer]
//!         [--scenarios cold,warm,...] [--tools hoist,buildkit,buildah] [--json out.json]
//!
//! Prints a table (median seconds, ratios to BuildKit), the overhead outside RUN steps, the
//! builder's peak RSS, gzip throughput, and each goal met or missed; writes everything as
//! JSON with `--json`. Needs root and the lab (tests/lab/setup.sh with LAB_DEBIAN=1);
//! `teammate-other-node` also needs the lab's S3 server (moto on 127.0.0.1:9000).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;
use hoist_bench::floor;
use hoist_bench::progress::{self, Line};
use hoist_bench::stats::{median, ratio};
use hoist_bench::workloads::{self, Workload};
use serde_json::json;

const SCENARIOS: &[&str] = &[
    "cold",
    "warm",
    "incremental",
    "teammate",
    "teammate-load",
    "teammate-push",
    "teammate-other-node",
    "load",
    "warm-load",
    "incremental-load",
    "push",
    "docker-archive",
];
const TOOLS: &[&str] = &["hoist", "buildkit", "buildah"];
/// Tools that run only when named (`--tools`): hoist with its builder in a container of the
/// engine (issue 19), beside the host's embedded builder.
const MORE_TOOLS: &[&str] = &["hoist-container"];
/// The builder container's name in the bench (its volume: `<name>-state`).
const BENCH_CONTAINER: &str = "hoist-bench-builder";

#[derive(Parser, Debug)]
#[command(name = "hoist-bench", about = "hoist vs docker build (BuildKit) vs buildah, on real-looking workloads")]
struct Args {
    /// One run per measurement (same as --runs 1).
    #[arg(long)]
    quick: bool,
    /// Runs per measurement; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Workloads to run (default all): webapp, cproject, biglayer, context50k, parallel, context100k.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Scenarios (default all): cold, warm, incremental, teammate, teammate-load,
    /// teammate-push, teammate-other-node, load, warm-load, incremental-load, push,
    /// docker-archive.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Builders (default: hoist, buildkit, buildah). `hoist-container` (only when named) is
    /// hoist with its builder in a container of the engine (HOIST_BUILDER=docker-container).
    #[arg(long, value_delimiter = ',')]
    tools: Vec<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Working directory (contexts, builder state, logs); on a filesystem overlayfs accepts.
    #[arg(long, default_value = "/var/tmp/hoist-bench")]
    workdir: PathBuf,
    /// The hoist binary (default: target/release/hoist, built first with cargo).
    #[arg(long)]
    hoist: Option<PathBuf>,
    /// Registry holding the base images (library/busybox, debian, python, gcc).
    #[arg(long, default_value = "127.0.0.1:5000")]
    registry: String,
    /// Scale workload sizes (1.0 = as specified; smaller for trying the runner out).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Skip the gzip throughput check.
    #[arg(long)]
    no_gzip: bool,
    /// Network of RUN steps for hoist and BuildKit: `default` (each tool's sandbox: hoist's
    /// bridge, Docker's) or `host` (`--network=host`; hoist's builder grants network.host).
    #[arg(long, default_value = "default", value_parser = ["default", "host"])]
    network: String,
    /// S3 server (host:port, plain HTTP) for hoist's fleet in teammate-other-node: the lab's
    /// moto (tests/lab/setup.sh). The scenario makes a bucket of its own there and removes it.
    #[arg(long, default_value = "127.0.0.1:9000")]
    s3: String,
    /// That S3 server's request log (moto's: one line per request), for counting the requests
    /// of one node.
    #[arg(long, default_value = "/var/lib/hoist-lab/moto.log")]
    s3_log: PathBuf,
}

/// One measurement.
#[derive(Debug, Clone, Default)]
struct Sample {
    secs: f64,
    /// Wall time minus the time covered by RUN steps (hoist and BuildKit only).
    overhead: Option<f64>,
    /// Time covered by RUN steps.
    run_covered: Option<f64>,
    /// Builder's peak RSS in KiB (hoist: VmHWM of its builder process; BuildKit: dockerd's,
    /// reset before the build).
    rss_kib: Option<u64>,
    /// Steps run / cached as the progress output reported them.
    done: usize,
    cached: usize,
    note: String,
    /// Further figures of the scenario, by name (the JSON's `figures`).
    figures: Vec<(&'static str, f64)>,
}

impl Sample {
    fn figure(&self, name: &str) -> Option<f64> {
        self.figures.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

type Key = (String, String, String); // workload, scenario, tool

#[derive(Default)]
struct Results {
    samples: BTreeMap<Key, Vec<Result<Sample, String>>>,
}

impl Results {
    fn add(&mut self, w: &str, scenario: &str, tool: &str, r: anyhow::Result<Sample>) {
        let r = r.map_err(|e| format!("{e:#}"));
        match &r {
            Ok(s) => eprintln!(
                "  {w:<11} {scenario:<14} {tool:<9} {:>8.2}s{}{}{}",
                s.secs,
                s.overhead.map(|o| format!("  overhead {o:.2}s")).unwrap_or_default(),
                s.rss_kib.map(|k| format!("  rss {} MiB", k / 1024)).unwrap_or_default(),
                // the scenarios whose note carries figures of their own
                if scenario == "teammate-other-node" { format!("\n      {}", s.note) } else { String::new() }
            ),
            Err(e) => eprintln!("  {w:<11} {scenario:<14} {tool:<9} FAILED: {}", e.lines().next().unwrap_or("")),
        }
        self.samples.entry((w.into(), scenario.into(), tool.into())).or_default().push(r);
    }

    fn ok(&self, w: &str, scenario: &str, tool: &str) -> Vec<&Sample> {
        self.samples
            .get(&(w.to_string(), scenario.to_string(), tool.to_string()))
            .map(|v| v.iter().filter_map(|r| r.as_ref().ok()).collect())
            .unwrap_or_default()
    }

    fn secs(&self, w: &str, scenario: &str, tool: &str) -> Option<f64> {
        median(&self.ok(w, scenario, tool).iter().map(|s| s.secs).collect::<Vec<_>>())
    }

    fn overhead(&self, w: &str, scenario: &str, tool: &str) -> Option<f64> {
        median(&self.ok(w, scenario, tool).iter().filter_map(|s| s.overhead).collect::<Vec<_>>())
    }

    fn rss(&self, w: &str, scenario: &str, tool: &str) -> Option<u64> {
        self.ok(w, scenario, tool).iter().filter_map(|s| s.rss_kib).max()
    }

    /// Median of a figure of the samples (see [`Sample::figures`]).
    fn figure(&self, w: &str, scenario: &str, tool: &str, name: &str) -> Option<f64> {
        median(&self.ok(w, scenario, tool).iter().filter_map(|s| s.figure(name)).collect::<Vec<_>>())
    }

    fn failed(&self, w: &str, scenario: &str, tool: &str) -> Option<String> {
        self.samples
            .get(&(w.to_string(), scenario.to_string(), tool.to_string()))
            .and_then(|v| v.iter().find_map(|r| r.as_ref().err().cloned()))
    }
}

// ---------------------------------------------------------------------------------------
// Running commands

/// A finished command: wall time and its stderr+stdout lines with arrival times.
struct Timed {
    secs: f64,
    /// CPU-seconds the whole machine was busy meanwhile ([`floor::busy_cpu_secs`]).
    cpu_secs: Option<f64>,
    lines: Vec<Line>,
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `cmd`, timing it and collecting its output lines; the log goes to `log`.
fn run_timed(mut cmd: Command, log: &Path) -> anyhow::Result<Timed> {
    let what = describe(&cmd);
    let start = Instant::now();
    let busy_before = floor::busy_cpu_secs();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("starting {what}"))?;
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|r| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            while let Ok(n) = r.read_until(b'\n', &mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                out.push(Line { t: start.elapsed().as_secs_f64(), text });
                buf.clear();
            }
            out
        })
    })
    .collect();
    let status = child.wait().with_context(|| format!("waiting for {what}"))?;
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = busy_before.zip(floor::busy_cpu_secs()).map(|(a, b)| b - a);
    let mut lines: Vec<Line> = readers.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();
    lines.sort_by(|a, b| a.t.total_cmp(&b.t));
    let mut text = format!("$ {what}\n");
    for l in &lines {
        let _ = writeln!(text, "{:8.3} {}", l.t, l.text);
    }
    let _ = writeln!(text, "# {status} after {secs:.3}s");
    if let Some(p) = log.parent() {
        let _ = std::fs::create_dir_all(p);
    }
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    if !status.success() {
        let tail: Vec<&str> = lines.iter().rev().take(15).map(|l| l.text.as_str()).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{what} failed ({status}); log {}:\n{}", log.display(), tail.join("\n"));
    }
    Ok(Timed { secs, cpu_secs, lines })
}

/// Run a setup command that must succeed; returns stdout.
fn run_quiet(mut cmd: Command) -> anyhow::Result<String> {
    let what = describe(&cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run and ignore the outcome (cleanup).
fn run_ignore(mut cmd: Command) {
    let _ = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

fn docker() -> Command {
    let mut c = Command::new("/usr/bin/docker");
    c.env("DOCKER_BUILDKIT", "1");
    c
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Stop a process we started, by pid: SIGTERM, then SIGKILL after 10 s.
fn stop_pid(pid: i32) {
    if pid <= 1 {
        return;
    }
    run_ignore({
        let mut c = Command::new("kill");
        c.arg(pid.to_string());
        c
    });
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}")).exists() || proc_state(pid) == Some('Z') {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    run_ignore({
        let mut c = Command::new("kill");
        c.args(["-9", &pid.to_string()]);
        c
    });
}

fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(") ")?.1.chars().next()
}

/// `VmHWM` (peak resident set) of a process, in KiB.
fn vm_hwm(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Reset a process's peak RSS (`echo 5 > /proc/PID/clear_refs`).
fn reset_hwm(pid: i32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Lazily unmount everything under `dir`, deepest first, then remove it.
fn remove_tree(dir: &Path) {
    unmount_under(dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// Lazily unmount everything under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let d = dir.display().to_string();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&d))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        run_ignore({
            let mut c = Command::new("umount");
            c.args(["-l", &m]);
            c
        });
    }
}

/// Whether `dir` is on an ext4 without a journal, where file creation right after a large
/// deletion is slow for minutes (see bench/fs.sh). `None` when it cannot tell.
fn on_unjournaled_ext4(dir: &Path) -> Option<bool> {
    let dir = dir.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The longest mount point that holds `dir`: its fs type and device.
    let (_, fstype, dev) = info
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((PathBuf::from(f.get(4)?), f.get(sep + 1)?.to_string(), f.get(sep + 2)?.to_string()))
        })
        .filter(|(m, _, _)| dir.starts_with(m))
        .max_by_key(|(m, _, _)| m.as_os_str().len())?;
    if fstype != "ext4" {
        return Some(false);
    }
    let name = Path::new(&dev).file_name()?.to_string_lossy().into_owned();
    let journals = std::fs::read_dir("/proc/fs/jbd2").ok()?;
    Some(!journals.flatten().any(|j| j.file_name().to_string_lossy().starts_with(&format!("{name}-"))))
}

/// A throwaway registry (the lab's `docker-registry`) on a free loopback port.
struct Registry {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Registry {
    fn start(workdir: &Path) -> anyhow::Result<Registry> {
        let port = free_port()?;
        let dir = workdir.join(format!("registry-{port}"));
        std::fs::create_dir_all(dir.join("data"))?;
        let cfg = dir.join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: error}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
                dir.join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let child = Command::new("docker-registry")
            .args(["serve", &cfg.display().to_string()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry (installed by tests/lab/setup.sh)")?;
        let r = Registry { port, dir, child };
        if !wait_port(port, 20) {
            bail!("the registry on port {port} did not start");
        }
        Ok(r)
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop_pid(self.child.id() as i32);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The AWS settings hoist reads (crates/hoist-engine/src/shared/url.rs), pointed at the
/// lab's S3 server `addr`. moto takes any non-empty key; these are no real credentials.
fn lab_s3_env(c: &mut Command, addr: &str) {
    c.env("AWS_ENDPOINT_URL", format!("http://{addr}"))
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "hoist-bench")
        .env("AWS_SECRET_ACCESS_KEY", "hoist-bench");
    for var in ["AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "HOIST_CACHE_STORE"] {
        c.env_remove(var);
    }
}

/// Percent-encoding of everything but RFC 3986's unreserved characters (and `/` if `path`).
fn pct(s: &str, path: bool) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b'/' if path => "/".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The text between `<tag>` and `</tag>` of each element `tag` in `xml`.
fn xml_elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find(&open) {
        let from = &rest[at + open.len()..];
        let Some(end) = from.find(&close) else { break };
        out.push(&from[..end]);
        rest = &from[end + close.len()..];
    }
    out
}

/// A bucket of one scenario run's own on the lab's S3 server (moto, started by
/// tests/lab/setup.sh), so that nothing of an earlier run is found and its requests can be
/// told from everyone else's in the server's log; emptied and removed when dropped.
struct S3Bucket {
    addr: String,
    name: String,
}

impl S3Bucket {
    fn create(addr: &str) -> anyhow::Result<S3Bucket> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let ok = Command::new("curl")
            .args(["-fsS", "-m", "5", &format!("http://{addr}/")])
            .output()
            .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ListAllMyBucketsResult"))
            .unwrap_or(false);
        if !ok {
            bail!("no S3 server (moto) at http://{addr} (--s3); run tests/lab/setup.sh as root");
        }
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bucket = S3Bucket { addr: addr.to_string(), name: format!("hoist-bench-{secs}-{}-{n}", std::process::id()) };
        let (code, body) = bucket.request("PUT", "", &[])?;
        if code != 200 {
            bail!("creating bucket {} on http://{addr}: HTTP {code}: {body}", bucket.name);
        }
        Ok(bucket)
    }

    fn curl(&self, method: &str) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "-m", "60", "-X", method, "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "hoist-bench:hoist-bench"])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]);
        c
    }

    /// A signed request for `path` in the bucket (`""`: the bucket itself, `?...`: a query on
    /// it, `/key`: an object); the HTTP status and the body.
    fn request(&self, method: &str, path: &str, extra: &[&str]) -> anyhow::Result<(u16, String)> {
        let mut c = self.curl(method);
        c.args(["-w", "\n%{http_code}"]).args(extra).arg(format!("http://{}/{}{path}", self.addr, self.name));
        let text = run_quiet(c)?;
        let (body, code) = text.rsplit_once('\n').ok_or_else(|| anyhow!("curl {method} {path}: no status"))?;
        Ok((code.trim().parse().context("curl's status")?, body.to_string()))
    }

    /// `s3://` URL of `prefix` in the bucket.
    fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.name)
    }

    /// Every object's key (ListObjectsV2, page by page).
    fn keys(&self) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let query = match &token {
                Some(t) => format!("?list-type=2&continuation-token={}", pct(t, false)),
                None => "?list-type=2".to_string(),
            };
            let (code, xml) = self.request("GET", &query, &[])?;
            if code != 200 {
                bail!("listing bucket {}: HTTP {code}: {xml}", self.name);
            }
            for contents in xml_elements(&xml, "Contents") {
                if let Some(k) = xml_elements(contents, "Key").first() {
                    keys.push(k.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"));
                }
            }
            token = xml_elements(&xml, "NextContinuationToken").first().map(|t| t.to_string());
            if xml_elements(&xml, "IsTruncated").first() != Some(&"true") || token.is_none() {
                return Ok(keys);
            }
        }
    }

    /// Delete every object, then the bucket.
    fn remove(&self) -> anyhow::Result<()> {
        let keys = self.keys()?;
        // one curl for many objects (each URL is signed on its own)
        for chunk in keys.chunks(200) {
            let mut c = self.curl("DELETE");
            for k in chunk {
                c.arg(format!("http://{}/{}/{}", self.addr, self.name, pct(k, true)));
            }
            run_quiet(c)?;
        }
        let (code, body) = self.request("DELETE", "", &[])?;
        if code != 204 && code != 200 {
            bail!("removing bucket {}: HTTP {code}: {body}", self.name);
        }
        Ok(())
    }
}

impl Drop for S3Bucket {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("hoist-bench: warning: bucket {} on http://{} is left: {e:#}", self.name, self.addr);
        }
    }
}

/// The requests one bucket got in a span of time, from the S3 server's request log: moto's
/// server (werkzeug) writes one line per request, `127.0.0.1 - - [date] "GET /bucket/key
/// HTTP/1.1" 200 -`, with the request in color codes unless the status is 200.
struct S3Requests {
    total: usize,
    /// By kind: the method, or `LIST` for a listing (GET on the bucket).
    by_kind: BTreeMap<String, usize>,
    /// Reads of the projects and tokens (`auth.json`), which every node repeats every 2 s.
    auth: usize,
}

impl S3Requests {
    /// The log's length now: where a later [`S3Requests::between`] starts.
    fn mark(log: &Path) -> Option<u64> {
        std::fs::metadata(log).ok().map(|m| m.len())
    }

    /// The requests for `bucket` logged after `from` (a [`S3Requests::mark`]) up to `to`.
    fn between(log: &Path, from: u64, to: u64, bucket: &str) -> Option<S3Requests> {
        let mut f = std::fs::File::open(log).ok()?;
        // the log started over (moto restarted): nothing of the span is left to count
        if std::fs::metadata(log).ok()?.len() < to || to < from {
            return None;
        }
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from)).ok()?;
        let mut text = Vec::new();
        f.take(to - from).read_to_end(&mut text).ok()?;
        let mut r = S3Requests { total: 0, by_kind: BTreeMap::new(), auth: 0 };
        for line in String::from_utf8_lossy(&text).lines() {
            let line = strip_ansi(line);
            // "METHOD /path HTTP/1.1"
            let Some(request) = line.split('"').nth(1) else { continue };
            let mut parts = request.split(' ');
            let (Some(method), Some(path)) = (parts.next(), parts.next()) else { continue };
            let Some(rest) = path.strip_prefix('/').and_then(|p| p.strip_prefix(bucket)) else { continue };
            let kind = if rest.is_empty() || rest.starts_with('?') {
                if method == "GET" {
                    "LIST"
                } else {
                    method
                }
            } else if rest.starts_with('/') {
                method
            } else {
                continue; // another bucket whose name starts with this one's
            };
            if rest.split('?').next().unwrap_or("").ends_with("/auth.json") {
                r.auth += 1;
            }
            r.total += 1;
            *r.by_kind.entry(kind.to_string()).or_default() += 1;
        }
        Some(r)
    }

    fn describe(&self) -> String {
        let kinds: Vec<String> = self.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
        format!("{} S3 requests ({}; {} of them auth.json re-reads)", self.total, kinds.join(", "), self.auth)
    }
}

/// `line` without terminal color codes (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `hoist serve` the benchmark started, on a root and a port of its own; stopped, and its
/// root removed, when dropped.
struct Serve {
    child: Child,
    root: PathBuf,
    port: u16,
}

impl Serve {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn addr(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        stop_pid(self.pid());
        let _ = self.child.wait();
        remove_tree(&self.root);
    }
}

/// Copy a context to `dest` as a teammate's fresh checkout (new mtimes).
fn checkout_copy(src: &Path, dest: &Path) -> anyhow::Result<()> {
    remove_tree(dest);
    std::fs::create_dir_all(dest.parent().unwrap_or(Path::new("/")))?;
    run_quiet({
        let mut c = Command::new("cp");
        c.arg("-r").arg(src).arg(dest);
        c
    })?;
    Ok(())
}

fn from_progress(t: &Timed, with_overhead: bool) -> Sample {
    let p = progress::parse_plain(&t.lines);
    Sample {
        secs: t.secs,
        overhead: with_overhead.then(|| p.overhead(t.secs)),
        run_covered: with_overhead.then(|| p.run_covered()),
        done: p.done,
        cached: p.cached,
        figures: t.cpu_secs.map(|c| ("machine_cpu_secs", c)).into_iter().collect(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Builders

trait Builder {
    fn name(&self) -> &'static str;
    /// Empty every cache (the next build is cold).
    fn reset(&mut self) -> anyhow::Result<()>;
    /// Build with the default output (hoist: the builder's cache; docker build: the
    /// engine's image store; buildah: its local storage).
    fn build(&mut self, w: &Workload, log: &Path) -> anyhow::Result<Sample>;
    /// Cold build ending with the image in the local Docker engine.
    fn load(&mut self, w: &Workload, log: &Path) -> anyhow::Result<Sample>;
    /// After [`Builder::load`]: the same build with `--load` again, on the warm cache and
    /// into the engine that holds the previous result (`None` where the default output is
    /// the engine already: docker build's warm and incremental builds are these).
    fn load_again(&mut self, _w: &Workload, _log: &Path) -> Option<anyhow::Result<Sample>> {
        None
    }
    /// Cold build and push to the empty registry `reg`.
    fn push(&mut self, w: &Workload, reg: &Registry, log: &Path) -> anyhow::Result<Sample>;
    /// Someone else built `w` (sharing through `reg` where the tool needs a registry);
    /// time this client's first build from `checkout`.
    fn teammate(&mut self, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> anyhow::Result<Sample>;
    /// The teammate scenario with the result loaded into a local engine that lacks its
    /// layers; `None` where the tool's build already ends there (BuildKit) or cannot.
    fn teammate_load(&mut self, _w: &Workload, _checkout: &Path, _log: &Path) -> Option<anyhow::Result<Sample>> {
        None
    }
    /// The teammate scenario with the result pushed to an empty registry.
    fn teammate_push(&mut self, _w: &Workload, _checkout: &Path, _reg: &Registry, _log: &Path) -> Option<anyhow::Result<Sample>> {
        None
    }
    /// A teammate builds on another machine than the one the first client built on, and pushes
    /// the result to `reg`, which holds what the first client pushed (hoist: another node of
    /// a fleet sharing an S3 store; BuildKit: a registry cache, see its implementation).
    fn teammate_other_node(&mut self, _w: &Workload, _checkout: &Path, _reg: &Registry, _log: &Path) -> Option<anyhow::Result<Sample>> {
        None
    }
    /// hoist only: export the cached image as a docker archive (see [`docker_archive`]).
    fn docker_archive(&mut self, _w: &Workload, _workdir: &Path, _log: &Path) -> Option<anyhow::Result<Sample>> {
        None
    }
    /// Release everything.
    fn finish(&mut self);
}

struct Hoist {
    bin: PathBuf,
    base: PathBuf,
    root: Option<PathBuf>,
    n: u32,
    /// `--network=...` for every build (empty: the default).
    network: Vec<String>,
    /// The S3 server (host:port) of teammate-other-node's fleet, and its request log.
    s3: String,
    s3_log: PathBuf,
    /// The builder runs in a container of the engine (`HOIST_BUILDER=docker-container`):
    /// a fresh state is a fresh container and volume (the builder image stays, as it would
    /// for a user: it is made once per hoist version).
    container: bool,
}

impl Hoist {
    fn fresh(&mut self) -> anyhow::Result<PathBuf> {
        self.cleanup();
        self.n += 1;
        let root = self.base.join(format!("root-{}", self.n));
        remove_tree(&root);
        std::fs::create_dir_all(&root)?;
        self.root = Some(root.clone());
        Ok(root)
    }

    fn root(&mut self) -> anyhow::Result<PathBuf> {
        match &self.root {
            Some(r) => Ok(r.clone()),
            None => self.fresh(),
        }
    }

    fn daemon_pid(root: &Path) -> Option<i32> {
        std::fs::read_to_string(root.join("hoistd.pid")).ok()?.trim().parse().ok()
    }

    fn cleanup(&mut self) {
        if let Some(root) = self.root.take() {
            if let Some(pid) = Self::daemon_pid(&root) {
                stop_pid(pid);
            }
            remove_tree(&root);
        }
        if self.container {
            let vol = format!("{BENCH_CONTAINER}-state");
            for args in [&["rm", "-f", BENCH_CONTAINER][..], &["volume", "rm", "-f", &vol][..]] {
                let mut c = docker();
                c.args(args);
                run_ignore(c);
            }
        }
    }

    fn cmd(&self, root: &Path) -> Command {
        let mut c = Command::new(&self.bin);
        if self.container {
            c.env("HOIST_BUILDER", "docker-container").env("HOIST_BUILDER_NAME", BENCH_CONTAINER);
        } else {
            c.env_remove("HOIST_BUILDER");
        }
        c.env("HOIST_ROOT", root)
            .env("HOIST_CACHE_DIR", root.join("client-cache"))
            .env_remove("HOIST_TOKEN")
            .env_remove("HOIST_PROJECT")
            .env_remove("HOIST_CACHE_STORE")
            .env_remove("SOURCE_DATE_EPOCH");
        c
    }

    /// A client of the builder at `addr` with its own `home` and `token`: `hoist build
    /// --progress=plain -t tag`, the build's flags and context to be added.
    fn client(&self, home: &Path, addr: &str, token: &str, tag: &str) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("HOME", home)
            .env("HOIST_CONFIG_DIR", home.join("config"))
            .env("HOIST_CACHE_DIR", home.join("cache"))
            .env("HOIST_BUILDER", addr)
            .env("HOIST_TOKEN", token)
            .env_remove("HOIST_ROOT")
            .env_remove("HOIST_PROJECT")
            .env_remove("HOIST_CACHE_STORE")
            .env_remove("SOURCE_DATE_EPOCH")
            .args(["build", "--progress=plain", "-t", tag])
            .args(&self.network);
        c
    }

    /// `hoist serve` on a fresh `root` and a free port, in the fleet sharing `store` if any.
    fn serve(&self, root: &Path, store: Option<&str>) -> anyhow::Result<Serve> {
        remove_tree(root);
        std::fs::create_dir_all(root)?;
        let port = free_port()?;
        let slog = std::fs::File::create(root.join("serve.log"))?;
        let mut c = self.cmd(root);
        c.args(["serve", "--root", &root.display().to_string(), "--listen", &format!("tcp://127.0.0.1:{port}")])
            .args(if self.network.is_empty() { &[][..] } else { &["--allow-entitlement", "network.host"][..] })
            .stdout(slog.try_clone()?)
            .stderr(slog);
        if let Some(url) = store {
            lab_s3_env(&mut c, &self.s3);
            c.args(["--cache-store", url]);
        }
        let child = c.spawn().context("starting hoist serve")?;
        let serve = Serve { child, root: root.to_path_buf(), port };
        if !wait_port(port, 30) {
            bail!("hoist serve did not start (see {})", root.join("serve.log").display());
        }
        Ok(serve)
    }

    /// `hoist <args>` on the projects and tokens of `root`, or of the fleet's `store` (where
    /// a fleet keeps them); its stdout.
    fn admin(&self, root: &Path, store: Option<&str>, args: &[&str]) -> anyhow::Result<String> {
        let mut c = self.cmd(root);
        c.args(args);
        if let Some(url) = store {
            lab_s3_env(&mut c, &self.s3);
            c.args(["--cache-store", url]);
        }
        Ok(run_quiet(c)?.trim().to_string())
    }

    /// teammate-other-node: alice builds on node A of a fleet (two `hoist serve`, each with
    /// its own root, sharing a store in a bucket of this run's own on the lab's S3 server)
    /// and pushes, so the store is complete when her build is done; then bob (another home,
    /// another token, a fresh checkout) builds the same on node B and pushes to the same tag,
    /// as in teammate-push; bob's build is measured. Then the same first build as alice's on
    /// a node without a store, for the cost of the shared tier on a first build. Node A is
    /// stopped before bob builds, so that the store's log shows node B's requests alone.
    fn other_node(&mut self, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> anyhow::Result<Sample> {
        self.cleanup();
        self.n += 1;
        let dir = self.base.join(format!("fleet-{}", self.n));
        let r = self.other_node_in(&dir, w, checkout, reg, log);
        remove_tree(&dir);
        r
    }

    fn other_node_in(&self, dir: &Path, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> anyhow::Result<Sample> {
        let tag = format!("{}/hoist-bench/{}:teammate", reg.host(), w.name);
        // Dropped in the reverse order: the nodes stop before the bucket is emptied.
        let bucket = S3Bucket::create(&self.s3)?;
        let url = bucket.url("bench/cache");
        let store = Some(url.as_str());
        // The fleet's project and tokens live in the store: made before the nodes start.
        let (root_a, root_b) = (dir.join("node-a"), dir.join("node-b"));
        let token_a = self.admin(&root_a, store, &["project", "create", "bench", "--token-name", "alice"])?;
        let token_b = self.admin(&root_a, store, &["token", "create", "bench", "--name", "bob"])?;

        let node_a = self.serve(&root_a, store)?;
        let mut a = self.client(&dir.join("home-alice"), &node_a.addr(), &token_a, &tag);
        a.arg("--push").arg(&w.dir);
        let alice = run_timed(a, log)?;
        drop(node_a);

        let node_b = self.serve(&root_b, store)?;
        reset_hwm(node_b.pid());
        let from = S3Requests::mark(&self.s3_log);
        let mut b = self.client(&dir.join("home-bob"), &node_b.addr(), &token_b, &tag);
        b.arg("--push").arg(checkout);
        let t = run_timed(b, log)?;
        let rss = vm_hwm(node_b.pid());
        // moto writes a request's line when it has answered it: give the last ones a moment
        std::thread::sleep(Duration::from_millis(200));
        let to = S3Requests::mark(&self.s3_log);
        let requests = from.zip(to).and_then(|(from, to)| S3Requests::between(&self.s3_log, from, to, &bucket.name));
        drop(node_b);

        // The same first build on a node without a store, pushed to a registry of its own
        // (alice's registry would already hold the layers). It runs last, so that any warmth
        // it finds (page cache, the lab registry's base images) flatters the ratio against
        // the shared tier, not for it.
        let own_reg = Registry::start(&self.base)?;
        let own_tag = format!("{}/hoist-bench/{}:hoist", own_reg.host(), w.name);
        let root_c = dir.join("node-alone");
        let node_c = self.serve(&root_c, None)?;
        let token_c = self.admin(&root_c, None, &["project", "create", "bench", "--token-name", "alice"])?;
        let mut c = self.client(&dir.join("home-alone"), &node_c.addr(), &token_c, &own_tag);
        c.arg("--push").arg(&w.dir);
        let alone = run_timed(c, log)?;
        drop(node_c);

        let mut s = from_progress(&t, true);
        s.rss_kib = rss;
        let factor = alice.secs / alone.secs;
        s.note = format!(
            "node B: {}, peak RSS {}; alice {:.2}s with store / {:.2}s without ({factor:.2}x)",
            requests.as_ref().map(S3Requests::describe).unwrap_or_else(|| format!("S3 requests n/a (no log at {})", self.s3_log.display())),
            rss.map(|k| format!("{} MiB", k / 1024)).unwrap_or_else(|| "n/a".into()),
            alice.secs,
            alone.secs,
        );
        s.figures = vec![("alice_secs_with_store", alice.secs), ("alice_secs_without_store", alone.secs), ("alice_store_factor", factor)];
        if let Some(r) = &requests {
            s.figures.push(("node_b_s3_requests", r.total as f64));
            s.figures.push(("node_b_s3_auth_rereads", r.auth as f64));
        }
        if let Some(k) = rss {
            s.figures.push(("node_b_peak_rss_kib", k as f64));
        }
        Ok(s)
    }

    fn run_build(&mut self, dir: &Path, extra: &[String], log: &Path) -> anyhow::Result<Sample> {
        self.run_build_timed(dir, extra, log).map(|(s, _)| s)
    }

    /// [`Hoist::run_build`], with the lines of its output.
    fn run_build_timed(&mut self, dir: &Path, extra: &[String], log: &Path) -> anyhow::Result<(Sample, Timed)> {
        let root = self.root()?;
        let mut c = self.cmd(&root);
        c.args(["build", "--progress=plain"]).args(&self.network).args(extra).arg(dir);
        let t = run_timed(c, log)?;
        let mut s = from_progress(&t, true);
        s.rss_kib = Self::daemon_pid(&root).and_then(vm_hwm);
        s.note = t.lines.iter().rev().find(|l| l.text.starts_with("hoist: built")).map(|l| l.text.clone()).unwrap_or_default();
        Ok((s, t))
    }

    /// The engine's floor for the cold `--load` whose output is `t` ([`floor::import_floor`]),
    /// measured right after it: when each layer of the image's last stage became final (its
    /// step's DONE line) and how long the engine takes to import that layer by itself
    /// (`docker import` of its tar from `docker save`: the engine's cheapest path, one pass
    /// and no temporary file). Layers below the last stage count as final at once.
    /// The engine's floor by time ([`floor::import_floor`]) and the CPU-seconds the engine
    /// took to import the last stage's layers by themselves.
    fn engine_floor(&mut self, w: &Workload, t: &Timed) -> anyhow::Result<(f64, Option<f64>)> {
        let root = self.root()?;
        let summary = t.lines.iter().rev().find(|l| l.text.starts_with("hoist: built")).context("no summary line")?;
        let id =
            summary.text.rsplit_once("; build ").and_then(|(_, r)| r.split_whitespace().next()).context("no build id in the summary")?;
        let mut c = self.cmd(&root);
        c.args(["builds", "show", id, "--json"]);
        let record: serde_json::Value = serde_json::from_str(&run_quiet(c)?).context("reading the build record")?;
        let steps = record["steps"].as_array().context("no steps in the build record")?;
        let line = |s: &serde_json::Value| s["line"].as_u64().unwrap_or(0);
        let last_stage = steps.iter().max_by_key(|s| line(s)).and_then(|s| s["stage"].as_str()).context("no stage")?;
        // The last stage's steps that made a layer, in Dockerfile order: the image's top layers.
        let mut made: Vec<(u64, u64, u64)> = steps
            .iter()
            .filter(|s| s["stage"].as_str() == Some(last_stage) && !s["name"].as_str().unwrap_or("").starts_with("FROM "))
            .filter_map(|s| Some((line(s), s["id"].as_u64()?, s["layer_bytes"].as_u64().filter(|b| *b > 0)?)))
            .collect();
        made.sort();
        let dir = self.base.join("floor");
        remove_tree(&dir);
        std::fs::create_dir_all(&dir)?;
        let result = (|| -> anyhow::Result<(f64, Option<f64>)> {
            let archive = dir.join("image.tar");
            run_quiet({
                let mut c = docker();
                c.arg("save").arg("-o").arg(&archive).arg(Self::tag(w));
                c
            })?;
            run_quiet({
                let mut c = Command::new("tar");
                c.arg("-xf").arg(&archive).arg("-C").arg(&dir);
                c
            })?;
            let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
            let paths: Vec<&str> = manifest[0]["Layers"]
                .as_array()
                .context("no layers in docker save's manifest")?
                .iter()
                .filter_map(|p| p.as_str())
                .collect();
            if made.is_empty() || paths.len() < made.len() {
                bail!("{} layer steps in the last stage, {} layers in the image", made.len(), paths.len());
            }
            let (mut final_at, mut import, mut import_cpu) = (Vec::new(), Vec::new(), Some(0.0));
            for ((_, step, bytes), path) in made.iter().zip(&paths[paths.len() - made.len()..]) {
                let tar = dir.join(path);
                let size = std::fs::metadata(&tar)?.len();
                if size != *bytes {
                    bail!("layer {path} is {size} bytes, but step #{step} made {bytes}: the steps do not match the layers");
                }
                let done = format!("#{step} DONE");
                final_at.push(t.lines.iter().find(|l| l.text.starts_with(&done)).with_context(|| format!("no {done} line"))?.t);
                let start = Instant::now();
                let busy = floor::busy_cpu_secs();
                let image = run_quiet({
                    let mut c = docker();
                    c.arg("import").arg(&tar);
                    c
                })?;
                import.push(start.elapsed().as_secs_f64());
                import_cpu = import_cpu.zip(busy.zip(floor::busy_cpu_secs())).map(|(sum, (a, b))| sum + b - a);
                run_ignore({
                    let mut c = docker();
                    c.args(["rmi", "-f", image.trim()]);
                    c
                });
            }
            let list = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
            eprintln!("  {}: the last stage's layers final at [{}] s, imported alone in [{}] s", w.name, list(&final_at), list(&import));
            Ok((floor::import_floor(&final_at, &import).context("no layers")?, import_cpu))
        })();
        remove_tree(&dir);
        result
    }

    /// The teammate scenario: alice builds on a fresh `hoist serve` (with `alice_extra`
    /// flags), then bob (another home, another token, a fresh checkout) builds the same with
    /// `extra` flags; bob's build is measured.
    fn teammate_with(
        &mut self,
        w: &Workload,
        checkout: &Path,
        alice_extra: &[&str],
        extra: &[&str],
        tag: &str,
        log: &Path,
    ) -> anyhow::Result<Sample> {
        self.cleanup();
        let root = self.fresh()?;
        let port = free_port()?;
        let slog = std::fs::File::create(root.join("serve.log"))?;
        let mut server = self
            .cmd(&root)
            .args(["serve", "--root", &root.display().to_string(), "--listen", &format!("tcp://127.0.0.1:{port}")])
            .args(if self.network.is_empty() { &[][..] } else { &["--allow-entitlement", "network.host"][..] })
            .stdout(slog.try_clone()?)
            .stderr(slog)
            .spawn()
            .context("starting hoist serve")?;
        let result = (|| -> anyhow::Result<Sample> {
            if !wait_port(port, 30) {
                bail!("hoist serve did not start (see {})", root.join("serve.log").display());
            }
            let admin = |args: &[&str]| -> anyhow::Result<String> {
                let mut c = self.cmd(&root);
                c.args(args);
                Ok(run_quiet(c)?.trim().to_string())
            };
            let token_a = admin(&["project", "create", "bench", "--token-name", "alice"])?;
            let token_b = admin(&["token", "create", "bench", "--name", "bob"])?;
            let client =
                |who: &str, token: &str| self.client(&root.join(format!("home-{who}")), &format!("tcp://127.0.0.1:{port}"), token, tag);
            let mut a = client("alice", &token_a);
            a.args(alice_extra).arg(&w.dir);
            run_timed(a, log)?;
            reset_hwm(server.id() as i32);
            let mut b = client("bob", &token_b);
            b.args(extra).arg(checkout);
            let t = run_timed(b, log)?;
            let mut s = from_progress(&t, true);
            s.rss_kib = vm_hwm(server.id() as i32);
            Ok(s)
        })();
        stop_pid(server.id() as i32);
        let _ = server.wait();
        self.cleanup();
        result
    }

    fn tag(w: &Workload) -> String {
        format!("hoist-bench/{}:hoist", w.name)
    }
}

impl Builder for Hoist {
    fn name(&self) -> &'static str {
        if self.container {
            "hoist-container"
        } else {
            "hoist"
        }
    }

    fn reset(&mut self) -> anyhow::Result<()> {
        self.fresh().map(|_| ())
    }

    fn build(&mut self, w: &Workload, log: &Path) -> anyhow::Result<Sample> {
        self.run_build(&w.dir, &["-t".into(), Self::tag(w)], log)
    }

    fn load(&mut self, w: &Workload, log: &Path) -> anyhow::Result<Sample> {
        self.fresh()?;
        run_ignore({
            let mut c = docker();
            c.args(["rmi", "-f", &Self::tag(w)]);
            c
        });
        let (mut s, t) = self.run_build_timed(&w.dir, &["--load".into(), "-t".into(), Self::tag(w)], log)?;
        run_quiet({
            let mut c = docker();
            c.args(["image", "inspect", &Self::tag(w)]);
            c
        })
        .context("--load left no image in the engine")?;
        match self.engine_floor(w, &t) {
            Ok((f, cpu)) => {
                s.figures.push(("engine_floor_secs", f));
                s.figures.extend(cpu.map(|c| ("engine_import_cpu_secs", c)));
            }
            Err(e) => eprintln!("  {}: no engine floor for the cold --load: {e:#}", w.name),
        }
        Ok(s)
    }

    fn load_again(&mut self, w: &Workload, log: &Path) -> Option<anyhow::Result<Sample>> {
        Some(self.run_build(&w.dir, &["--load".into(), "-t".into(), Self::tag(w)], log))
    }

    fn push(&mut self, w: &Workload, reg: &Registry, log: &Path) -> anyhow::Result<Sample> {
        self.fresh()?;
        let tag = format!("{}/hoist-bench/{}:hoist", reg.host(), w.name);
        self.run_build(&w.dir, &["--push".into(), "-t".into(), tag], log)
    }

    fn teammate(&mut self, w: &Workload, checkout: &Path, _reg: &Registry, log: &Path) -> anyhow::Result<Sample> {
        self.teammate_with(w, checkout, &[], &[], &Self::tag(w), log)
    }

    fn teammate_push(&mut self, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> Option<anyhow::Result<Sample>> {
        let tag = format!("{}/hoist-bench/{}:teammate", reg.host(), w.name);
        // as with BuildKit's inline-cache image, the registry already holds what alice pushed
        Some(self.teammate_with(w, checkout, &["--push"], &["--push"], &tag, log))
    }

    fn teammate_other_node(&mut self, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> Option<anyhow::Result<Sample>> {
        Some(self.other_node(w, checkout, reg, log))
    }

    fn teammate_load(&mut self, w: &Workload, checkout: &Path, log: &Path) -> Option<anyhow::Result<Sample>> {
        let rmi = || {
            let mut c = docker();
            c.args(["rmi", "-f", &Self::tag(w)]);
            run_ignore(c)
        };
        rmi();
        // The engine must lack the image's layers, base layers included: BuildKit's runs
        // leave their base images and their build cache (which holds layers) in the engine.
        for args in [&["image", "prune", "-af"][..], &["builder", "prune", "-af"][..]] {
            let mut c = docker();
            c.args(args);
            run_ignore(c);
        }
        let r = self.teammate_with(w, checkout, &[], &["--load"], &Self::tag(w), log);
        rmi();
        Some(r)
    }

    fn docker_archive(&mut self, w: &Workload, workdir: &Path, log: &Path) -> Option<anyhow::Result<Sample>> {
        Some(docker_archive(self, w, workdir, log))
    }

    fn finish(&mut self) {
        self.cleanup();
    }
}

struct BuildKit {
    base: PathBuf,
    /// Image ids and tags this run made, removed on reset.
    images: Vec<String>,
    n: u32,
    /// `--network=...` for every build (empty: the default).
    network: Vec<String>,
}

impl BuildKit {
    fn tag(w: &Workload) -> String {
        format!("hoist-bench/{}:buildkit", w.name)
    }

    fn docker_build(&mut self, dir: &Path, tag: &str, extra: &[&str], log: &Path) -> anyhow::Result<Timed> {
        self.n += 1;
        let iid = self.base.join(format!("iid-{}", self.n));
        std::fs::create_dir_all(&self.base)?;
        let mut c = docker();
        c.args(["build", "--progress=plain"]).args(&self.network).arg("--iidfile").arg(&iid).args(["-t", tag]).args(extra).arg(dir);
        let t = run_timed(c, log);
        self.images.push(tag.to_string());
        if let Ok(id) = std::fs::read_to_string(&iid) {
            self.images.push(id.trim().to_string());
            let _ = std::fs::remove_file(&iid);
        }
        t
    }

    fn dockerd_pid() -> Option<i32> {
        std::fs::read_to_string("/var/run/docker.pid").ok()?.trim().parse().ok()
    }

    /// The teammate scenario; also the first client's build and push (export) times.
    fn teammate_timed(&mut self, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> anyhow::Result<(Sample, f64, f64)> {
        // Issue 4's comparison: the teammate pushed an image with inline cache; this client
        // starts from an empty local cache and builds with --cache-from.
        self.reset()?;
        let cache = format!("{}/hoist-bench/{}:cache", reg.host(), w.name);
        let a = self.docker_build(&w.dir, &cache, &["--build-arg", "BUILDKIT_INLINE_CACHE=1"], log)?;
        let p = run_timed(
            {
                let mut c = docker();
                c.args(["push", &cache]);
                c
            },
            log,
        )?;
        self.reset()?;
        let t = self.docker_build(checkout, &Self::tag(w), &["--cache-from", &cache], log)?;
        Ok((from_progress(&t, true), a.secs, p.secs))
    }

    /// The teammate scenario with the result pushed to `reg` (as `teammate_timed`).
    fn teammate_pushed(&mut self, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> anyhow::Result<(Sample, f64, f64)> {
        let tag = format!("{}/hoist-bench/{}:teammate", reg.host(), w.name);
        let r = self.teammate_timed(w, checkout, reg, log).and_then(|(mut s, a, ap)| {
            let mut tag_cmd = docker();
            tag_cmd.args(["tag", &Self::tag(w), &tag]);
            run_quiet(tag_cmd)?;
            let mut push = docker();
            push.args(["push", &tag]);
            let p = run_timed(push, log)?;
            s.note = format!("build {:.2}s + push {:.2}s", s.secs, p.secs);
            s.secs += p.secs;
            Ok((s, a, ap))
        });
        self.images.push(tag);
        r
    }
}

impl Builder for BuildKit {
    fn name(&self) -> &'static str {
        "buildkit"
    }

    fn reset(&mut self) -> anyhow::Result<()> {
        for img in self.images.drain(..) {
            run_ignore({
                let mut c = docker();
                c.args(["rmi", "-f", &img]);
                c
            });
        }
        run_quiet({
            let mut c = docker();
            c.args(["builder", "prune", "-af"]);
            c
        })?;
        Ok(())
    }

    fn build(&mut self, w: &Workload, log: &Path) -> anyhow::Result<Sample> {
        let t = self.docker_build(&w.dir, &Self::tag(w), &[], log)?;
        Ok(from_progress(&t, true))
    }

    fn load(&mut self, w: &Workload, log: &Path) -> anyhow::Result<Sample> {
        // docker build's default output is the engine's image store.
        self.reset()?;
        self.build(w, log)
    }

    fn push(&mut self, w: &Workload, reg: &Registry, log: &Path) -> anyhow::Result<Sample> {
        self.reset()?;
        let tag = format!("{}/hoist-bench/{}:buildkit", reg.host(), w.name);
        let pid = Self::dockerd_pid();
        if let Some(pid) = pid {
            reset_hwm(pid);
        }
        let b = self.docker_build(&w.dir, &tag, &[], log)?;
        let p = run_timed(
            {
                let mut c = docker();
                c.args(["push", &tag]);
                c
            },
            log,
        )?;
        let mut s = from_progress(&b, true);
        s.secs = b.secs + p.secs;
        s.rss_kib = pid.and_then(vm_hwm);
        s.note = format!("build {:.2}s + push {:.2}s", b.secs, p.secs);
        Ok(s)
    }

    fn teammate(&mut self, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> anyhow::Result<Sample> {
        self.teammate_timed(w, checkout, reg, log).map(|(s, _, _)| s)
    }

    fn teammate_push(&mut self, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> Option<anyhow::Result<Sample>> {
        Some(self.teammate_pushed(w, checkout, reg, log).map(|(s, _, _)| s))
    }

    fn teammate_other_node(&mut self, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> Option<anyhow::Result<Sample>> {
        // BuildKit shares a cache between machines through a registry. The closest match to
        // a fleet's shared store would be `--cache-to type=registry,mode=max` (every stage's
        // layers, intermediate ones included), but only buildx's builder takes --cache-to:
        // the Docker CLI here is 20.10's classic `docker build` (DOCKER_BUILDKIT=1), and
        // buildx cannot be installed on this machine. Its only export is inline cache
        // (`BUILDKIT_INLINE_CACHE=1`, mode=min: the final image's layers), so mode=max is not
        // measured. What is: teammate-push's run, an engine wiped (build cache and images)
        // standing for the other machine, with alice's export (her push of the inline-cache
        // image) in the note.
        let r = self.teammate_pushed(w, checkout, reg, log).map(|(mut s, build, export)| {
            s.note = format!("{}; alice: build {build:.2}s + export (push with inline cache) {export:.2}s", s.note);
            s.figures = vec![("alice_build_secs", build), ("alice_export_secs", export)];
            s
        });
        // Leave nothing of the scenario in the engine: its images and build cache.
        if let Err(e) = self.reset() {
            eprintln!("hoist-bench: warning: cleaning up BuildKit after teammate-other-node: {e:#}");
        }
        Some(r)
    }

    fn finish(&mut self) {
        let _ = self.reset();
    }
}

struct Buildah {
    base: PathBuf,
    root: Option<PathBuf>,
    n: u32,
}

impl Buildah {
    fn tag(w: &Workload) -> String {
        format!("hoist-bench/{}:buildah", w.name)
    }

    fn cleanup(&mut self) {
        if let Some(root) = self.root.take() {
            run_ignore({
                let mut c = self.cmd_at(&root);
                c.args(["rm", "-a"]);
                c
            });
            remove_tree(&root);
        }
    }

    fn cmd_at(&self, root: &Path) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root").arg(root.join("storage")).arg("--runroot").arg(root.join("run")).args(["--storage-driver", "overlay"]);
        c
    }

    fn cmd(&mut self) -> anyhow::Result<Command> {
        if self.root.is_none() {
            self.reset()?;
        }
        let root = self.root.clone().ok_or_else(|| anyhow!("no buildah root"))?;
        Ok(self.cmd_at(&root))
    }

    fn bud(&mut self, dir: &Path, tag: &str, extra: &[&str], log: &Path) -> anyhow::Result<Timed> {
        let mut c = self.cmd()?;
        // crun fails here (hybrid cgroups): use runc with the default (oci) isolation.
        c.args(["bud", "--layers", "--runtime", "/usr/sbin/runc", "--network=host", "--tls-verify=false", "-t", tag]).args(extra).arg(dir);
        run_timed(c, log)
    }
}

impl Builder for Buildah {
    fn name(&self) -> &'static str {
        "buildah"
    }

    fn reset(&mut self) -> anyhow::Result<()> {
        self.cleanup();
        self.n += 1;
        let root = self.base.join(format!("root-{}", self.n));
        remove_tree(&root);
        std::fs::create_dir_all(&root)?;
        self.root = Some(root);
        Ok(())
    }

    fn build(&mut self, w: &Workload, log: &Path) -> anyhow::Result<Sample> {
        let t = self.bud(&w.dir, &Self::tag(w), &[], log)?;
        Ok(from_progress(&t, false))
    }

    fn load(&mut self, w: &Workload, log: &Path) -> anyhow::Result<Sample> {
        self.reset()?;
        let b = self.bud(&w.dir, &Self::tag(w), &[], log)?;
        let mut c = self.cmd()?;
        c.args(["push", &Self::tag(w), &format!("docker-daemon:{}", Self::tag(w))]);
        let p = run_timed(c, log)?;
        run_ignore({
            let mut c = docker();
            c.args(["rmi", "-f", &Self::tag(w)]);
            c
        });
        Ok(Sample {
            secs: b.secs + p.secs,
            note: format!("bud {:.2}s + push to docker-daemon {:.2}s", b.secs, p.secs),
            ..Default::default()
        })
    }

    fn push(&mut self, w: &Workload, reg: &Registry, log: &Path) -> anyhow::Result<Sample> {
        self.reset()?;
        let b = self.bud(&w.dir, &Self::tag(w), &[], log)?;
        let mut c = self.cmd()?;
        c.args(["push", "--tls-verify=false", &Self::tag(w), &format!("docker://{}/hoist-bench/{}:buildah", reg.host(), w.name)]);
        let p = run_timed(c, log)?;
        Ok(Sample { secs: b.secs + p.secs, note: format!("bud {:.2}s + push {:.2}s", b.secs, p.secs), ..Default::default() })
    }

    fn teammate(&mut self, w: &Workload, checkout: &Path, reg: &Registry, log: &Path) -> anyhow::Result<Sample> {
        let cache = format!("{}/hoist-bench/{}-cache", reg.host(), w.name);
        self.reset()?;
        self.bud(&w.dir, &Self::tag(w), &["--cache-to", &cache], log)?;
        self.reset()?;
        let t = self.bud(checkout, &Self::tag(w), &["--cache-from", &cache], log)?;
        Ok(Sample { secs: t.secs, ..Default::default() })
    }

    fn finish(&mut self) {
        self.cleanup();
    }
}

// ---------------------------------------------------------------------------------------
// The run

fn hoist_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.hoist {
        return Ok(p.clone());
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or_else(|| anyhow!("no workspace"))?.to_path_buf();
    eprintln!("building hoist (cargo build --release -p hoist-cli)...");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--quiet", "-p", "hoist-cli", "--bin", "hoist"])
        .current_dir(&ws)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building hoist failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| ws.join("target"));
    Ok(target.join("release").join("hoist"))
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_default()
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": first_line("uname", &["-r"]),
        "docker": first_line("/usr/bin/docker", &["version", "-f", "{{.Server.Version}}"]),
        "buildah": first_line("buildah", &["--version"]),
        "hoist_commit": first_line("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"]),
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn fmt_s(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())
}

fn fmt_r(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runs = if args.quick { 1 } else { args.runs.max(1) };
    let workload_names: Vec<String> =
        if args.only.is_empty() { workloads::ALL.iter().map(|s| s.to_string()).collect() } else { args.only.clone() };
    let scenarios: Vec<String> =
        if args.scenarios.is_empty() { SCENARIOS.iter().map(|s| s.to_string()).collect() } else { args.scenarios.clone() };
    let tools: Vec<String> = if args.tools.is_empty() { TOOLS.iter().map(|s| s.to_string()).collect() } else { args.tools.clone() };
    for s in &scenarios {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!("unknown scenario {s:?} (expected {})", SCENARIOS.join(", "));
        }
    }
    for t in &tools {
        if !TOOLS.contains(&t.as_str()) && !MORE_TOOLS.contains(&t.as_str()) {
            bail!("unknown tool {t:?} (expected {}, {})", TOOLS.join(", "), MORE_TOOLS.join(", "));
        }
    }
    let want = |s: &str| scenarios.iter().any(|x| x == s);

    let workdir = args.workdir.clone();
    std::fs::create_dir_all(&workdir)?;
    let stamp = chrono_like_stamp();
    let logs = workdir.join("logs").join(&stamp);
    std::fs::create_dir_all(&logs)?;
    let docker_root =
        docker().args(["info", "-f", "{{.DockerRootDir}}"]).output().ok().map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    for dir in std::iter::once(workdir.clone()).chain(docker_root) {
        if on_unjournaled_ext4(&dir) == Some(true) {
            eprintln!(
                "hoist-bench: warning: {} is on an ext4 without a journal: a timed build right after a cleanup is slowed by it (run bench/fs.sh first)",
                dir.display()
            );
        }
    }
    let hoist_bin = if tools.iter().any(|t| t.starts_with("hoist")) { hoist_binary(&args)? } else { PathBuf::new() };
    let network: Vec<String> = if args.network == "host" { vec!["--network=host".into()] } else { Vec::new() };
    let load_before = loadavg();
    let started = Instant::now();
    eprintln!("hoist-bench: {runs} run(s) each; logs in {}; load average {load_before}", logs.display());

    let mut gzip_result = None;
    if !args.no_gzip {
        let data = hoist_bench::gzip::binary_data(128);
        let r = hoist_bench::gzip::compare(&data, 6, if runs == 1 { 1 } else { 3 })?;
        eprintln!(
            "gzip -6 on {} MiB of binaries: flate2 single-thread {:.0} MB/s, hoist parallel ({} threads) {:.0} MB/s: {:.2}x",
            r.bytes >> 20,
            r.single_mbps,
            r.threads,
            r.parallel_mbps,
            r.parallel_mbps / r.single_mbps
        );
        gzip_result = Some(r);
    }

    if tools.iter().any(|t| t == "hoist-container") {
        // The builder image is made once per hoist version, not per build: make it now.
        let mut c = Command::new(&hoist_bin);
        c.env("HOIST_BUILDER", "docker-container").env("HOIST_BUILDER_NAME", BENCH_CONTAINER).args(["cache", "du"]);
        // (Each fresh state then removes the container and its volume, not the image.)
        run_quiet(c).context("starting the builder container (hoist-container)")?;
    }
    let mut results = Results::default();
    let mut descriptions = BTreeMap::new();
    let ctx_root = workdir.join("contexts");
    std::fs::create_dir_all(&ctx_root)?;
    for name in &workload_names {
        eprintln!("== {name}: generating");
        let w = workloads::generate(name, &ctx_root, &args.registry, args.scale)?;
        eprintln!("   {}", w.description);
        descriptions.insert(name.clone(), w.description.clone());
        let checkout = workdir.join("teammate-checkout").join(name);
        if want("teammate") || want("teammate-load") || want("teammate-push") || want("teammate-other-node") {
            checkout_copy(&w.dir, &checkout)?;
        }
        let mut builders: Vec<Box<dyn Builder>> = Vec::new();
        for t in &tools {
            builders.push(match t.as_str() {
                "hoist" | "hoist-container" => Box::new(Hoist {
                    bin: hoist_bin.clone(),
                    base: workdir.join(t.as_str()),
                    root: None,
                    n: 0,
                    network: network.clone(),
                    s3: args.s3.clone(),
                    s3_log: args.s3_log.clone(),
                    container: t == "hoist-container",
                }),
                "buildkit" => Box::new(BuildKit { base: workdir.join("buildkit"), images: Vec::new(), n: 0, network: network.clone() }),
                _ => Box::new(Buildah { base: workdir.join("buildah"), root: None, n: 0 }),
            });
        }
        for run in 0..runs {
            eprintln!("-- {name}: run {}/{runs} (load {})", run + 1, loadavg());
            // Rotate who goes first, so that no tool always runs right after another's cleanup.
            let n = builders.len();
            for k in 0..n {
                let b = &mut builders[(k + run) % n];
                let tool = b.name();
                let log = |scenario: &str| logs.join(format!("{name}-{tool}-{scenario}-{run}.log"));
                let engine_loads = tool == "buildkit" && (want("load") || want("warm-load") || want("incremental-load"));
                if want("cold")
                    || want("warm")
                    || want("incremental")
                    || engine_loads
                    || (want("docker-archive") && tool == "hoist" && name == "biglayer")
                {
                    w.restore()?;
                    let r = b.reset().and_then(|_| b.build(&w, &log("cold")));
                    let cold_ok = r.is_ok();
                    if want("load") && tool == "buildkit" {
                        // docker build's default already ends with the image in the engine.
                        results.add(name, "load", tool, r.as_ref().map(|s| s.clone()).map_err(|e| anyhow!("{e:#}")));
                    }
                    if want("cold") || !engine_loads {
                        results.add(name, "cold", tool, r);
                    }
                    // docker build's warm and incremental builds end in the engine: they are
                    // its warm-load and incremental-load too.
                    let engine_is_output = tool == "buildkit";
                    if cold_ok {
                        if want("warm") || (engine_is_output && want("warm-load")) {
                            let r = b.build(&w, &log("warm"));
                            if engine_is_output && want("warm-load") {
                                results.add(name, "warm-load", tool, r.as_ref().map(|s| s.clone()).map_err(|e| anyhow!("{e:#}")));
                            }
                            results.add(name, "warm", tool, r);
                        }
                        if want("incremental") || (engine_is_output && want("incremental-load")) {
                            w.touch(run as u32 + 1)?;
                            let r = b.build(&w, &log("incremental"));
                            if engine_is_output && want("incremental-load") {
                                results.add(name, "incremental-load", tool, r.as_ref().map(|s| s.clone()).map_err(|e| anyhow!("{e:#}")));
                            }
                            results.add(name, "incremental", tool, r);
                            w.restore()?;
                        }
                        if want("docker-archive") && name == "biglayer" {
                            if let Some(r) = b.docker_archive(&w, &workdir, &log("docker-archive")) {
                                results.add(name, "docker-archive", tool, r);
                            }
                        }
                    }
                }
                if (want("load") || want("warm-load") || want("incremental-load")) && tool != "buildkit" {
                    w.restore()?;
                    let r = b.load(&w, &log("load"));
                    let loaded = r.is_ok();
                    results.add(name, "load", tool, r);
                    if loaded && want("warm-load") {
                        if let Some(r) = b.load_again(&w, &log("warm-load")) {
                            results.add(name, "warm-load", tool, r);
                        }
                    }
                    if loaded && want("incremental-load") {
                        w.touch(run as u32 + 1)?;
                        if let Some(r) = b.load_again(&w, &log("incremental-load")) {
                            results.add(name, "incremental-load", tool, r);
                        }
                        w.restore()?;
                    }
                }
                if want("push") {
                    w.restore()?;
                    let r = Registry::start(&workdir).and_then(|reg| b.push(&w, &reg, &log("push")));
                    results.add(name, "push", tool, r);
                }
                if want("teammate") || (want("teammate-load") && tool == "buildkit") {
                    w.restore()?;
                    let r = Registry::start(&workdir).and_then(|reg| b.teammate(&w, &checkout, &reg, &log("teammate")));
                    if want("teammate-load") && tool == "buildkit" {
                        // docker build's result is in the engine already.
                        results.add(name, "teammate-load", tool, r.as_ref().map(|s| s.clone()).map_err(|e| anyhow!("{e:#}")));
                    }
                    results.add(name, "teammate", tool, r);
                }
                if want("teammate-push") {
                    w.restore()?;
                    if let Some(r) =
                        Registry::start(&workdir).map(|reg| b.teammate_push(&w, &checkout, &reg, &log("teammate-push"))).transpose()
                    {
                        results.add(name, "teammate-push", tool, r.and_then(|r| r));
                    }
                }
                if want("teammate-load") {
                    w.restore()?;
                    if let Some(r) = b.teammate_load(&w, &checkout, &log("teammate-load")) {
                        results.add(name, "teammate-load", tool, r);
                    }
                }
                if want("teammate-other-node") {
                    w.restore()?;
                    if let Some(r) = Registry::start(&workdir)
                        .map(|reg| b.teammate_other_node(&w, &checkout, &reg, &log("teammate-other-node")))
                        .transpose()
                    {
                        results.add(name, "teammate-other-node", tool, r.and_then(|r| r));
                    }
                }
            }
        }
        for b in builders.iter_mut() {
            b.finish();
        }
        remove_tree(&checkout);
    }
    let load_after = loadavg();
    let total = started.elapsed().as_secs_f64();

    let report = render(&results, &workload_names, &scenarios, &tools, gzip_result.as_ref());
    let header = format!(
        "machine: {}\nload average before {load_before}, after {load_after}; {runs} run(s) per cell (median); {total:.0}s in all\n",
        machine_line(&machine())
    );
    println!("{header}{report}");
    if let Some(path) = &args.json {
        let j = to_json(&results, &descriptions, gzip_result.as_ref(), runs, &load_before, &load_after, total, &args);
        std::fs::write(path, serde_json::to_vec_pretty(&j)?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Export the (cached) biglayer image as a docker archive to a file; the build itself is
/// fully cached, so the time is the archive's (two tar passes of every new layer today).
fn docker_archive(h: &mut Hoist, w: &Workload, workdir: &Path, log: &Path) -> anyhow::Result<Sample> {
    let dest = workdir.join("docker-archive.tar");
    let out = format!("type=docker,dest={}", dest.display());
    let r = h.run_build(&w.dir, &["-o".into(), out, "-t".into(), Hoist::tag(w)], log);
    let size = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_file(&dest);
    let mut s = r?;
    s.note = format!("{} MB archive", size / 1_000_000);
    Ok(s)
}

fn chrono_like_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("run-{secs}")
}

fn machine_line(m: &serde_json::Value) -> String {
    format!(
        "{} cores ({}), {} GiB RAM, Linux {}, Docker {}, {}, hoist {}",
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        m["docker"].as_str().unwrap_or("?"),
        m["buildah"].as_str().unwrap_or("?"),
        m["hoist_commit"].as_str().unwrap_or("?"),
    )
}

/// The tables and the goals, as text.
fn render(r: &Results, workloads: &[String], scenarios: &[String], tools: &[String], gz: Option<&hoist_bench::gzip::GzipResult>) -> String {
    let mut out = String::new();
    let has = |t: &str| tools.iter().any(|x| x == t);
    let _ = writeln!(out, "\nWall time, seconds (median); ratio = tool / BuildKit\n");
    let _ = writeln!(out, "| workload | scenario | hoist | BuildKit | buildah | hoist/BuildKit | buildah/BuildKit |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    for w in workloads {
        for s in scenarios {
            let cells: Vec<Option<f64>> = ["hoist", "buildkit", "buildah"].iter().map(|t| r.secs(w, s, t)).collect();
            let failed: Vec<bool> = ["hoist", "buildkit", "buildah"].iter().map(|t| has(t) && r.failed(w, s, t).is_some()).collect();
            if cells.iter().all(Option::is_none) && !failed.iter().any(|f| *f) {
                continue;
            }
            let cell = |i: usize| if cells[i].is_none() && failed[i] { "FAIL".to_string() } else { fmt_s(cells[i]) };
            let _ = writeln!(
                out,
                "| {w} | {s} | {} | {} | {} | {} | {} |",
                cell(0),
                cell(1),
                cell(2),
                fmt_r(ratio(cells[0], cells[1])),
                fmt_r(ratio(cells[2], cells[1]))
            );
        }
    }
    if has("hoist-container") {
        let _ =
            writeln!(out, "\nThe builder in a container of the engine (issue 19) beside the host's, seconds; ratio = tool / BuildKit\n");
        let _ = writeln!(out, "| workload | scenario | hoist (host) | hoist (container) | BuildKit | host/BuildKit | container/BuildKit |");
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
        for w in workloads {
            for s in scenarios {
                let (h, c, b) = (r.secs(w, s, "hoist"), r.secs(w, s, "hoist-container"), r.secs(w, s, "buildkit"));
                if c.is_none() {
                    continue;
                }
                let _ = writeln!(
                    out,
                    "| {w} | {s} | {} | {} | {} | {} | {} |",
                    fmt_s(h),
                    fmt_s(c),
                    fmt_s(b),
                    fmt_r(ratio(h, b)),
                    fmt_r(ratio(c, b))
                );
            }
        }
    }
    let _ = writeln!(out, "\nOverhead outside RUN steps, seconds (wall minus time covered by RUN steps)\n");
    let _ = writeln!(out, "| workload | scenario | hoist | BuildKit | hoist/BuildKit |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|");
    for w in workloads {
        for s in ["cold", "warm", "incremental"] {
            let (h, b) = (r.overhead(w, s, "hoist"), r.overhead(w, s, "buildkit"));
            if h.is_none() && b.is_none() {
                continue;
            }
            let _ = writeln!(out, "| {w} | {s} | {} | {} | {} |", fmt_s(h), fmt_s(b), fmt_r(ratio(h, b)));
        }
    }
    let rss = r.rss("biglayer", "push", "hoist");
    let dockerd = r.rss("biglayer", "push", "buildkit");
    if rss.is_some() || dockerd.is_some() {
        let _ = writeln!(
            out,
            "\nPeak RSS building and pushing the 1 GiB layer: hoist builder {} MiB; dockerd (BuildKit + push) {} MiB",
            rss.map(|k| (k / 1024).to_string()).unwrap_or("-".into()),
            dockerd.map(|k| (k / 1024).to_string()).unwrap_or("-".into())
        );
    }
    if let Some(s) = r.ok("biglayer", "docker-archive", "hoist").first() {
        let warm = r.secs("biglayer", "warm", "hoist");
        let _ = writeln!(
            out,
            "Docker archive of the 1 GiB image (write_docker_archive, two tar passes): {:.2}s in all, {:.2}s over a warm build ({})",
            s.secs,
            s.secs - warm.unwrap_or(0.0),
            s.note
        );
    }
    if let Some(g) = gz {
        let _ = writeln!(
            out,
            "gzip -6 on {} MiB of binaries: single-thread flate2 {:.0} MB/s, hoist parallel gzip ({} threads) {:.0} MB/s = {:.2}x",
            g.bytes >> 20,
            g.single_mbps,
            g.threads,
            g.parallel_mbps,
            g.parallel_mbps / g.single_mbps
        );
    }
    if scenarios.iter().any(|s| s == "teammate-other-node") {
        let _ = writeln!(
            out,
            "\nteammate-other-node (hoist: bob on node B of a fleet sharing an S3 store, alice built on node A; BuildKit: inline-cache image, engine wiped):"
        );
        for w in workloads {
            for t in ["hoist", "buildkit"] {
                for s in r.ok(w, "teammate-other-node", t) {
                    let _ = writeln!(out, "- {w} {t}: {:.2}s; {}", s.secs, s.note);
                }
            }
        }
    }
    for w in workloads {
        for s in scenarios {
            for t in tools {
                if let Some(e) = r.failed(w, s, t) {
                    let _ = writeln!(out, "FAILED {w} {s} {t}: {}", e.lines().take(6).collect::<Vec<_>>().join(" | "));
                }
            }
        }
    }

    let _ = writeln!(out, "\nGoals (issue 6)\n");
    let goal = |name: &str, value: Option<f64>, limit: f64, lower_is_better: bool| -> String {
        let verdict = match value {
            None => "n/a ".to_string(),
            Some(v) if (lower_is_better && v <= limit) || (!lower_is_better && v >= limit) => "MET ".to_string(),
            Some(v) => format!("MISSED by {:.2}", (v - limit).abs()),
        };
        format!("- [{verdict}] {name}: {} (goal {}{limit})\n", fmt_s(value), if lower_is_better { "≤ " } else { "≥ " })
    };
    out += &goal("gzip throughput, parallel / single-thread flate2 at level 6", gz.map(|g| g.parallel_mbps / g.single_mbps), 1.8, false);
    for w in ["biglayer", "webapp"] {
        out += &goal(
            &format!("{w}: cold build + push, hoist / BuildKit"),
            ratio(r.secs(w, "push", "hoist"), r.secs(w, "push", "buildkit")),
            0.3,
            true,
        );
    }
    for w in workloads {
        out += &goal(
            &format!("{w}: warm rebuild, hoist / BuildKit"),
            ratio(r.secs(w, "warm", "hoist"), r.secs(w, "warm", "buildkit")),
            0.5,
            true,
        );
    }
    for w in workloads {
        for s in ["cold", "incremental"] {
            out += &goal(
                &format!("{w}: overhead outside RUN ({s}), hoist / BuildKit"),
                ratio(r.overhead(w, s, "hoist"), r.overhead(w, s, "buildkit")),
                0.5,
                true,
            );
        }
    }
    out += &goal("builder peak RSS while exporting the 1 GiB layer, MiB", rss.map(|k| k as f64 / 1024.0), 512.0, true);
    let _ = writeln!(out, "\nGoals (issue 4, teammate: BuildKit = --cache-from an inline-cache image, local cache wiped)\n");
    for w in workloads {
        out += &goal(
            &format!("{w}: teammate, result stays on the builder, hoist / BuildKit"),
            ratio(r.secs(w, "teammate", "hoist"), r.secs(w, "teammate", "buildkit")),
            0.2,
            true,
        );
        out += &goal(
            &format!("{w}: teammate, loaded into an engine lacking its layers, hoist / BuildKit"),
            ratio(r.secs(w, "teammate-load", "hoist"), r.secs(w, "teammate-load", "buildkit")),
            0.5,
            true,
        );
        out += &goal(
            &format!("{w}: teammate, result pushed, hoist / BuildKit"),
            ratio(r.secs(w, "teammate-push", "hoist"), r.secs(w, "teammate-push", "buildkit")),
            0.2,
            true,
        );
    }
    if scenarios.iter().any(|s| s.ends_with("load")) {
        let _ = writeln!(out, "\nGoals (issue 18, the edit-rebuild-run loop: the image ends in the local engine)\n");
        for w in workloads {
            for (s, what, max) in
                [("load", "cold build", 1.0), ("incremental-load", "incremental build", 0.7), ("warm-load", "warm build", 0.3)]
            {
                out += &goal(
                    &format!("{w}: {what} + --load, hoist / BuildKit"),
                    ratio(r.secs(w, s, "hoist"), r.secs(w, s, "buildkit")),
                    max,
                    true,
                );
                // The floor in the same run: hoist's RUN steps alone (the same work in both
                // tools), which no build and no load can go below.
                let run_steps = r.secs(w, s, "hoist").zip(r.overhead(w, s, "hoist")).map(|(t, o)| t - o).filter(|t| *t > 0.0);
                if let Some(t) = run_steps {
                    let _ = writeln!(
                        out,
                        "  - floor: hoist's RUN steps alone took {t:.2}s = {} BuildKit's whole build",
                        fmt_r(ratio(Some(t), r.secs(w, s, "buildkit")))
                    );
                }
                // And the engine's: each layer imported once its step ended (cold only).
                if let Some(t) = r.figure(w, s, "hoist", "engine_floor_secs") {
                    let _ = writeln!(
                        out,
                        "  - floor: the engine importing each layer of the last stage once its step ended ({t:.2}s) = {} BuildKit's whole build",
                        fmt_r(ratio(Some(t), r.secs(w, s, "buildkit")))
                    );
                }
                // By work: the build and the engine's import of the built layers share the
                // machine's cores. The build's work is the lesser of BuildKit's (its whole
                // cold build) and hoist's without --load (the `cold` scenario, if run).
                let bk_cpu = r.figure(w, s, "buildkit", "machine_cpu_secs");
                let hoist_cpu = r.figure(w, "cold", "hoist", "machine_cpu_secs").filter(|_| s == "load");
                let build_cpu = match (bk_cpu, hoist_cpu) {
                    (Some(b), Some(h)) => Some(b.min(h)),
                    (b, h) => b.or(h),
                };
                let import_cpu = r.figure(w, s, "hoist", "engine_import_cpu_secs");
                if let (Some(b), Some(i)) = (build_cpu, import_cpu) {
                    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
                    let t = (b + i) / cores;
                    let cpu = |v: Option<f64>| v.map_or("-".to_string(), |c| format!("{c:.1}"));
                    let _ = writeln!(
                        out,
                        "  - floor: the build's work (the lesser of BuildKit's {} and hoist's without --load {} CPU-s) and the engine's import of the built layers ({i:.1} CPU-s) on {cores} cores: {t:.2}s = {} BuildKit's whole build (hoist with --load used {} CPU-s)",
                        cpu(bk_cpu),
                        cpu(hoist_cpu),
                        fmt_r(ratio(Some(t), r.secs(w, s, "buildkit"))),
                        cpu(r.figure(w, s, "hoist", "machine_cpu_secs"))
                    );
                }
            }
        }
    }
    if scenarios.iter().any(|s| s == "teammate-other-node") {
        let _ = writeln!(out, "\nGoals (issue 13, a fleet sharing a cache store)\n");
        for w in workloads {
            let with = r.figure(w, "teammate-other-node", "hoist", "alice_secs_with_store");
            let without = r.figure(w, "teammate-other-node", "hoist", "alice_secs_without_store");
            out += &goal(
                &format!("{w}: first build with the shared tier / the same on a node without it, hoist"),
                ratio(with, without),
                1.1,
                true,
            );
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn to_json(
    r: &Results,
    descriptions: &BTreeMap<String, String>,
    gz: Option<&hoist_bench::gzip::GzipResult>,
    runs: usize,
    load_before: &str,
    load_after: &str,
    total: f64,
    args: &Args,
) -> serde_json::Value {
    let mut cells = Vec::new();
    for ((w, s, t), v) in &r.samples {
        let samples: Vec<serde_json::Value> = v
            .iter()
            .map(|x| match x {
                Ok(s) => json!({
                    "seconds": s.secs, "overhead_seconds": s.overhead, "run_covered_seconds": s.run_covered,
                    "peak_rss_kib": s.rss_kib, "steps_done": s.done, "steps_cached": s.cached, "note": s.note,
                    "figures": s.figures.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                }),
                Err(e) => json!({ "error": e }),
            })
            .collect();
        cells.push(json!({
            "workload": w, "scenario": s, "tool": t,
            "median_seconds": r.secs(w, s, t), "median_overhead_seconds": r.overhead(w, s, t),
            "ratio_to_buildkit": ratio(r.secs(w, s, t), r.secs(w, s, "buildkit")),
            "samples": samples,
        }));
    }
    json!({
        "machine": machine(),
        "load_average": { "before": load_before, "after": load_after },
        "runs": runs,
        "scale": args.scale,
        "total_seconds": total,
        "workloads": descriptions,
        "gzip": gz.map(|g| json!({
            "level": g.level, "bytes": g.bytes, "threads": g.threads,
            "single_thread_mbps": g.single_mbps, "parallel_mbps": g.parallel_mbps,
            "speedup": g.parallel_mbps / g.single_mbps, "sizes": [g.sizes.0, g.sizes.1],
        })),
        "results": cells,
    })
}
