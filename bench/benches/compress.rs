//! Compression and hashing throughput on real binary data (issue 6): hoist's parallel gzip
//! at levels 1/6/9 against single-thread flate2 (zlib-rs) at the same levels, zstd 3 with
//! worker threads, SHA-256, and the system's `gzip -6` and `pigz -6` for comparison.
//!
//! Data: the regular files of /usr/bin and /usr/lib in sorted path order, concatenated up to
//! `HOIST_BENCH_MIB` MiB (default 64) — what layers of real images are made of.
//!
//!     cargo bench -p hoist-bench --bench compress
//!     cargo bench -p hoist-bench --bench compress -- 'gzip-6'   # one group

use std::io::{self, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hoist_oci::compress::{Compression, ParallelGzip, ParallelGzipOptions};
use sha2::{Digest as _, Sha256};

/// Real binaries and libraries, deterministic for a given machine.
fn bench_data() -> Vec<u8> {
    let mib: usize = std::env::var("HOIST_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let data = hoist_bench::gzip::binary_data(mib);
    assert!(data.len() >= (mib << 20) / 2, "found only {} bytes of binaries under /usr", data.len());
    data
}

/// Pipe `data` through a system compressor, discarding its output.
fn system_tool(tool: &str, args: &[&str], data: &[u8]) -> bool {
    let Ok(mut child) = Command::new(tool).args(args).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
        return false;
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    let ok = data.chunks(1 << 20).all(|c| stdin.write_all(c).is_ok());
    drop(stdin);
    ok && child.wait().map(|s| s.success()).unwrap_or(false)
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

fn benches(c: &mut Criterion) {
    let data = bench_data();
    let threads = hoist_oci::compress::available_threads();
    eprintln!("bench data: {} MiB of /usr/bin + /usr/lib files; {threads} threads", data.len() >> 20);

    // Ratios, printed once, so the speed numbers can be read against what they buy.
    for level in [1u32, 6, 9] {
        let mut p = ParallelGzip::new(Vec::new(), level).expect("gzip writer");
        p.write_all(&data).expect("compress");
        let p = p.finish().expect("finish");
        let mut s = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        s.write_all(&data).expect("compress");
        let s = s.finish().expect("finish");
        eprintln!(
            "gzip-{level}: parallel {} bytes ({:.2}%), single-stream flate2 {} bytes ({:.2}%)",
            p.len(),
            100.0 * p.len() as f64 / data.len() as f64,
            s.len(),
            100.0 * s.len() as f64 / data.len() as f64
        );
    }

    for level in [1u32, 6, 9] {
        let mut g = c.benchmark_group(format!("gzip-{level}"));
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(if level == 9 { 30 } else { 12 }));
        g.bench_function(BenchmarkId::new("hoist-parallel", threads), |b| {
            b.iter(|| {
                let mut w = ParallelGzip::new(io::sink(), level).expect("gzip writer");
                w.write_all(&data).expect("compress");
                w.finish().expect("finish");
            })
        });
        g.bench_function("hoist-parallel-1-thread", |b| {
            b.iter(|| {
                let opts = ParallelGzipOptions { threads: 1, ..Default::default() };
                let mut w = ParallelGzip::with_options(io::sink(), level, opts).expect("gzip writer");
                w.write_all(&data).expect("compress");
                w.finish().expect("finish");
            })
        });
        g.bench_function("flate2-single", |b| {
            b.iter(|| {
                let mut w = flate2::write::GzEncoder::new(io::sink(), flate2::Compression::new(level));
                w.write_all(&data).expect("compress");
                w.finish().expect("finish");
            })
        });
        if level == 6 {
            if have("gzip") {
                g.bench_function("system-gzip", |b| b.iter(|| assert!(system_tool("gzip", &["-6", "-c"], &data))));
            }
            if have("pigz") {
                g.bench_function(BenchmarkId::new("system-pigz", threads), |b| {
                    b.iter(|| assert!(system_tool("pigz", &["-6", "-c"], &data)))
                });
            }
        }
        g.finish();
    }

    let mut g = c.benchmark_group("zstd-3");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("hoist-workers", threads), |b| {
        b.iter(|| {
            let mut w = Compression::Zstd { level: 3 }.writer(io::sink()).expect("zstd writer");
            w.write_all(&data).expect("compress");
            w.finish().expect("finish");
        })
    });
    g.bench_function("single-thread", |b| {
        b.iter(|| {
            let mut w = zstd::stream::write::Encoder::new(io::sink(), 3).expect("zstd writer");
            w.write_all(&data).expect("compress");
            w.finish().expect("finish");
        })
    });
    g.finish();

    let mut g = c.benchmark_group("sha256");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("sha2", |b| b.iter(|| Sha256::digest(&data)));
    g.finish();
}

criterion_group!(compress, benches);
criterion_main!(compress);
