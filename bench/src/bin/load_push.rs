//! `load_push`: how fast images move (issue 5).
//!
//!     cargo run -p hoist-bench --bin load_push -- [--runs 3] [--hoist target/debug/hoist]
//!
//! Incremental `--load` (one source file changed in an image of a ~50 MB base, a 40 MB
//! vendor layer and a small source layer) through hoist's loopback registry, against the
//! tarball path (the same build streamed as a `docker load` archive: what BuildKit/buildx
//! `--load` does), against `docker save | docker load` of the image, and — for reference —
//! `docker build` (BuildKit inside dockerd: no transfer at all). Then `--push` of the same
//! image to 1 and to 3 fresh registries (blobs already compressed by an earlier push).
//! Goals: incremental --load ≤ 0.3× the tarball path; 3 registries ≤ 1.3× one.
//!
//! Needs root, the lab (Docker 20.10, registry on 127.0.0.1:5000 with python:3.11-slim)
//! and `docker-registry` on PATH. Everything it starts listens on 127.0.0.1 only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "load_push", about = "hoist --load/--push vs the tarball path and docker")]
struct Args {
    /// Runs per measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The hoist binary (default: target/release/hoist, else target/debug/hoist).
    #[arg(long)]
    hoist: Option<PathBuf>,
    /// Working directory.
    #[arg(long, default_value = "/var/tmp/hoist-bench-load-push")]
    work: PathBuf,
    /// Base image.
    #[arg(long, default_value = "127.0.0.1:5000/library/python:3.11-slim")]
    base: String,
    /// Megabytes of the vendor layer.
    #[arg(long, default_value_t = 40)]
    vendor_mb: usize,
    /// Upload bandwidth of each registry's link in the second push measurement (Mbit/s):
    /// registries as on other machines, not sharing this machine's 2 cores.
    #[arg(long, default_value_t = 400)]
    link_mbps: u64,
    /// Megabytes of a new layer for the "first load of a new big layer" measurement.
    #[arg(long, default_value_t = 200)]
    new_layer_mb: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Letters that do not compress away (xorshift).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<(f64, String)> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    let secs = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("{what} failed:\n{err}");
    }
    Ok((secs, err))
}

fn sh(script: &str, what: &str) -> anyhow::Result<f64> {
    Ok(run(Command::new("bash").args(["-o", "pipefail", "-c", script]), what)?.0)
}

struct Registry {
    child: Child,
    port: u16,
}

impl Registry {
    fn start(dir: &Path) -> anyhow::Result<Registry> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let cfg = dir.join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: error}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
                dir.join("data").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry on port {port} did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Registry { child, port })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay on loopback in front of a registry whose client→registry direction is held
/// to `rate` bytes/s over all its connections (a registry across a network link).
fn throttle(upstream: u16, rate: u64) -> anyhow::Result<u16> {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let budget = Arc::new(Mutex::new((Instant::now(), 0u64)));
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { continue };
            let (mut c_read, mut s_write) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            let (mut s_read, mut c_write) = (server, client);
            let budget = budget.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let due = {
                        let mut b = budget.lock().unwrap_or_else(|e| e.into_inner());
                        // An idle link does not bank bandwidth.
                        let now = Instant::now();
                        let sent_by = b.0 + Duration::from_secs_f64(b.1 as f64 / rate as f64);
                        if sent_by < now {
                            *b = (now, 0);
                        }
                        b.1 += n as u64;
                        b.0 + Duration::from_secs_f64(b.1 as f64 / rate as f64)
                    };
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(port)
}

struct Bench {
    hoist: PathBuf,
    work: PathBuf,
    ctx: PathBuf,
    /// Differs between invocations, so no change meets a cache or an engine that saw it.
    nonce: u64,
}

impl Bench {
    fn hoist(&self) -> Command {
        let mut c = Command::new(&self.hoist);
        c.env("HOIST_ROOT", self.work.join("root")).env("HOIST_CACHE_DIR", self.work.join("cache")).env_remove("HOIST_BUILDER");
        c.arg("build").arg("--progress=plain");
        c
    }

    fn change_source(&self, i: usize) -> anyhow::Result<()> {
        let seed = self.nonce.wrapping_add(i as u64);
        std::fs::write(
            self.ctx.join("src/main.py"),
            format!("print('revision {i}')\n# {}\n", String::from_utf8_lossy(&noise(2000, seed))),
        )?;
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let hoist = match &args.hoist {
        Some(h) => h.clone(),
        None => ["target/release/hoist", "target/debug/hoist"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("no hoist binary: build it or pass --hoist")?,
    };
    let hoist = std::fs::canonicalize(hoist)?;
    std::fs::create_dir_all(&args.work)?;
    let work = std::fs::canonicalize(&args.work)?;
    let ctx = work.join("ctx");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(ctx.join("vendor"))?;
    std::fs::create_dir_all(ctx.join("src"))?;
    for i in 0..args.vendor_mb {
        std::fs::write(ctx.join(format!("vendor/lib{i:03}.bin")), noise(1 << 20, i as u64))?;
    }
    for i in 0..20 {
        std::fs::write(ctx.join(format!("src/mod{i}.py")), format!("VALUE = {i}\n"))?;
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}\nCOPY vendor/ /app/vendor/\nCOPY src/ /app/src/\nCMD [\"python3\", \"/app/src/main.py\"]\n", args.base),
    )?;
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let b = Bench { hoist, work: work.clone(), ctx: ctx.clone(), nonce };
    let c = ctx.display().to_string();
    let docker = "/usr/bin/docker";

    // Warm everything: the builder cache, the engine's copies, BuildKit's cache.
    b.change_source(0)?;
    run(b.hoist().args(["-t", "lp-bench:hoist", "--load", &c]), "hoist warm-up --load")?;
    sh(&format!("{} -o type=docker,dest=- -t lp-bench:tar {c} | {docker} load -q", shell_cmd(&b)), "warm-up tarball load")?;
    sh(&format!("DOCKER_BUILDKIT=1 {docker} build -q --network=host -t lp-bench:bk {c}"), "warm-up docker build")?;

    let (mut proxy, mut tarball, mut saveload, mut buildkit) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut last_line = String::new();
    for i in 1..=args.runs {
        b.change_source(i)?;
        let (t, err) = run(b.hoist().args(["-t", "lp-bench:hoist", "--load", &c]), "hoist --load")?;
        last_line = err.lines().find(|l| l.contains(": loaded ")).unwrap_or_default().to_string();
        if !last_line.contains(": 1 layer(s) moved") {
            bail!("an incremental --load should move exactly the changed layer: {last_line}");
        }
        proxy.push(t);
        tarball.push(sh(&format!("{} -o type=docker,dest=- -t lp-bench:tar {c} | {docker} load -q", shell_cmd(&b)), "tarball load")?);
        saveload.push(sh(&format!("{docker} save lp-bench:hoist | {docker} load -q"), "docker save | docker load")?);
        buildkit.push(sh(&format!("DOCKER_BUILDKIT=1 {docker} build -q --network=host -t lp-bench:bk {c}"), "docker build")?);
    }
    // A new big layer each time (a dependency bump): nothing to skip, all of it moves.
    let big = work.join("bigctx");
    std::fs::create_dir_all(&big)?;
    std::fs::write(big.join("Dockerfile"), format!("FROM {}\nCOPY big.bin /big.bin\n", args.base))?;
    let bc = big.display().to_string();
    let (mut new_proxy, mut new_tarball) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        std::fs::write(big.join("big.bin"), noise(args.new_layer_mb << 20, nonce ^ (1000 + 2 * i as u64)))?;
        new_proxy.push(run(b.hoist().args(["-t", "lp-bench:big", "--load", &bc]), "hoist --load of a new layer")?.0);
        std::fs::write(big.join("big.bin"), noise(args.new_layer_mb << 20, nonce ^ (1001 + 2 * i as u64)))?;
        new_tarball.push(sh(
            &format!("{} -o type=docker,dest=- -t lp-bench:bigtar {bc} | {docker} load -q", shell_cmd(&b)),
            "tarball load of a new layer",
        )?);
    }

    let image_mb = {
        let out = Command::new(docker).args(["image", "inspect", "--format", "{{.Size}}", "lp-bench:hoist"]).output()?;
        String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().unwrap_or(0.0) / 1e6
    };

    // Push: blobs compressed once (a throwaway push), then fresh registries per run.
    let scratch = Registry::start(&work.join("reg-scratch"))?;
    run(b.hoist().args(["-t", &format!("127.0.0.1:{}/bench/app:1", scratch.port), "--push", &c]), "warm-up push")?;
    drop(scratch);
    let (mut one, mut three) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let r = Registry::start(&work.join(format!("reg-one-{i}")))?;
        one.push(run(b.hoist().args(["-t", &format!("127.0.0.1:{}/bench/app:1", r.port), "--push", &c]), "push to 1")?.0);
        drop(r);
        let rs = (0..3).map(|k| Registry::start(&work.join(format!("reg-three-{i}-{k}")))).collect::<anyhow::Result<Vec<_>>>()?;
        let mut cmd = b.hoist();
        for r in &rs {
            cmd.args(["-t", &format!("127.0.0.1:{}/bench/app:1", r.port)]);
        }
        three.push(run(cmd.arg("--push").arg(&c), "push to 3")?.0);
    }

    // The same over links of --link-mbps each.
    let rate = args.link_mbps * 1_000_000 / 8;
    let (mut one_link, mut three_link) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let r = Registry::start(&work.join(format!("reg-link-one-{i}")))?;
        let port = throttle(r.port, rate)?;
        one_link.push(run(b.hoist().args(["-t", &format!("127.0.0.1:{port}/bench/app:1"), "--push", &c]), "push to 1 over a link")?.0);
        drop(r);
        let rs = (0..3).map(|k| Registry::start(&work.join(format!("reg-link-three-{i}-{k}")))).collect::<anyhow::Result<Vec<_>>>()?;
        let mut cmd = b.hoist();
        for r in &rs {
            cmd.args(["-t", &format!("127.0.0.1:{}/bench/app:1", throttle(r.port, rate)?)]);
        }
        three_link.push(run(cmd.arg("--push").arg(&c), "push to 3 over links")?.0);
    }

    let (p, t, s, k) = (median(proxy.clone()), median(tarball.clone()), median(saveload.clone()), median(buildkit.clone()));
    let (o, th) = (median(one.clone()), median(three.clone()));
    let (ol, tl) = (median(one_link.clone()), median(three_link.clone()));
    let (np, nt) = (median(new_proxy.clone()), median(new_tarball.clone()));
    let ok = |b: bool| if b { "met" } else { "MISSED" };
    println!("image: {image_mb:.0} MB in the engine; {} runs; hoist {}", args.runs, b.hoist.display());
    println!("last --load report: {last_line}");
    println!();
    println!("| incremental (one source file changed) | median s | runs |");
    println!("|---|---:|---|");
    println!("| hoist build --load (loopback registry) | {p:.2} | {proxy:.2?} |");
    println!("| hoist build -o type=docker \\| docker load (tarball path) | {t:.2} | {tarball:.2?} |");
    println!("| docker save \\| docker load (transfer only) | {s:.2} | {saveload:.2?} |");
    println!("| docker build, BuildKit in dockerd (no transfer) | {k:.2} | {buildkit:.2?} |");
    println!();
    println!("| a new {} MB layer (build + load) | median s | runs |", args.new_layer_mb);
    println!("|---|---:|---|");
    println!("| hoist build --load (loopback registry) | {np:.2} | {new_proxy:.2?} |");
    println!("| hoist build -o type=docker \\| docker load (tarball path) | {nt:.2} | {new_tarball:.2?} |");
    println!();
    println!("| push (blobs already compressed) | median s | runs |");
    println!("|---|---:|---|");
    println!("| --push to 1 registry | {o:.2} | {one:.2?} |");
    println!("| --push to 3 registries | {th:.2} | {three:.2?} |");
    println!("| --push to 1 registry, {} Mbit/s link | {ol:.2} | {one_link:.2?} |", args.link_mbps);
    println!("| --push to 3 registries, {} Mbit/s link each | {tl:.2} | {three_link:.2?} |", args.link_mbps);
    println!();
    println!("goal: incremental --load <= 0.3x tarball path: {:.2}x ({})", p / t, ok(p / t <= 0.3));
    println!("      (vs docker save | docker load: {:.2}x)", p / s);
    println!("goal: 3 registries <= 1.3x one, over links: {:.2}x ({})", tl / ol, ok(tl / ol <= 1.3));
    println!("      (registries on this machine, sharing its cores: {:.2}x)", th / o);
    for t in ["lp-bench:hoist", "lp-bench:tar", "lp-bench:bk", "lp-bench:big", "lp-bench:bigtar"] {
        let _ = Command::new(docker).args(["rmi", "-f", t]).output();
    }
    Ok(())
}

/// `hoist build` as a shell command line (for pipelines).
fn shell_cmd(b: &Bench) -> String {
    format!(
        "HOIST_ROOT={} HOIST_CACHE_DIR={} {} build --progress=quiet",
        b.work.join("root").display(),
        b.work.join("cache").display(),
        b.hoist.display()
    )
}
