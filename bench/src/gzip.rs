//! The gzip goal in one measurement: hoist's parallel gzip against single-thread flate2 at
//! the same level, on real binaries (the regular files of /usr/bin and /usr/lib, sorted).
//! The criterion bench `bench/benches/compress.rs` measures the same more thoroughly.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use hoist_oci::compress::ParallelGzip;

/// Throughputs of one comparison.
#[derive(Debug, Clone)]
pub struct GzipResult {
    /// Compression level.
    pub level: u32,
    /// Bytes compressed per run.
    pub bytes: usize,
    /// Threads hoist's writer used.
    pub threads: usize,
    /// Single-thread flate2 (zlib-rs), MB/s (median of the runs).
    pub single_mbps: f64,
    /// hoist's parallel gzip, MB/s (median of the runs).
    pub parallel_mbps: f64,
    /// Compressed sizes (single, parallel).
    pub sizes: (usize, usize),
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let Ok(md) = fs::symlink_metadata(&p) else { continue };
        if md.is_dir() {
            collect_files(&p, out);
        } else if md.is_file() {
            out.push(p);
        }
    }
}

/// Up to `mib` MiB of the machine's binaries and libraries.
pub fn binary_data(mib: usize) -> Vec<u8> {
    let want = mib << 20;
    let mut files = Vec::new();
    collect_files(Path::new("/usr/bin"), &mut files);
    collect_files(Path::new("/usr/lib"), &mut files);
    let mut data = Vec::with_capacity(want);
    for f in files {
        if data.len() >= want {
            break;
        }
        if let Ok(file) = fs::File::open(&f) {
            let _ = file.take((want - data.len()) as u64).read_to_end(&mut data);
        }
    }
    data
}

/// Bytes written to it, discarding them.
struct Count(usize);

impl Write for Count {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Compress `data` `runs` times with each compressor at `level`.
pub fn compare(data: &[u8], level: u32, runs: usize) -> io::Result<GzipResult> {
    let mut single = Vec::new();
    let mut parallel = Vec::new();
    let mut sizes = (0, 0);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let mut w = flate2::write::GzEncoder::new(Count(0), flate2::Compression::new(level));
        w.write_all(data)?;
        sizes.0 = w.finish()?.0;
        single.push(data.len() as f64 / t.elapsed().as_secs_f64() / 1e6);

        let t = Instant::now();
        let mut w = ParallelGzip::new(Count(0), level)?;
        w.write_all(data)?;
        sizes.1 = w.finish()?.0;
        parallel.push(data.len() as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    Ok(GzipResult {
        level,
        bytes: data.len(),
        threads: hoist_oci::compress::available_threads(),
        single_mbps: crate::stats::median(&single).unwrap_or(0.0),
        parallel_mbps: crate::stats::median(&parallel).unwrap_or(0.0),
        sizes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_compressors_produce_comparable_output_on_real_binaries() {
        let data = binary_data(4);
        assert!(data.len() > 1 << 20, "no binaries under /usr");
        let r = compare(&data, 6, 1).unwrap();
        assert!(r.single_mbps > 0.0 && r.parallel_mbps > 0.0);
        // Same level, same data: the parallel stream is within a few percent of the single one.
        let (s, p) = (r.sizes.0 as f64, r.sizes.1 as f64);
        assert!(s < data.len() as f64 && (p - s).abs() / s < 0.05, "{:?}", r.sizes);
    }
}
