//! The benchmark workloads: build contexts that look like real projects, generated
//! deterministically and offline (base images come from the lab registry). Each workload
//! names the one source file its "incremental" scenario changes.
//!
//! - `webapp`: a dependency install of ~20k small files from a lockfile, a frontend build
//!   reading them, a runtime stage with a ~300 MB system-package-like layer, the app
//!   source, `COPY --from` of the dependencies and the frontend bundle (python:3.11-slim).
//! - `cproject`: ~100 C files compiled with `make -j` (gcc:12), the binary copied into
//!   debian:bookworm-slim.
//! - `biglayer`: one RUN writing ~1 GiB of binary-like data (the base image's own binaries
//!   and libraries, each file's bytes run through a different byte permutation, so it
//!   compresses like binaries and is never all zeros), then a small COPY.
//! - `context50k`: a context of 50,000 small files copied in one COPY (busybox).
//! - `context100k`: the same with 100,000 files (issue 18's `--load` case).
//! - `parallel`: four independent CPU-bound stages merged at the end (busybox).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// All workload names, in run order.
pub const ALL: &[&str] = &["webapp", "cproject", "biglayer", "context50k", "parallel", "context100k"];

/// A generated build context.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Short name (one of [`ALL`]).
    pub name: String,
    /// One line saying what it is.
    pub description: String,
    /// The context directory (holds the Dockerfile).
    pub dir: PathBuf,
    /// The file (relative to `dir`) the incremental scenario changes.
    pub touch: PathBuf,
    /// Its generated content, restored by [`Workload::restore`].
    pub touch_original: Vec<u8>,
}

impl Workload {
    /// Change the incremental file to variant `n` (distinct for each `n`).
    pub fn touch(&self, n: u32) -> anyhow::Result<()> {
        let mut content = self.touch_original.clone();
        let marker = if self.touch.extension().is_some_and(|e| e == "c") {
            format!("\nint bench_touch_{n}(void) {{ return {n}; }}\n")
        } else if self.touch.extension().is_some_and(|e| e == "py") {
            format!("\n# touched {n}\n")
        } else {
            format!("\n// touched {n}\n")
        };
        content.extend_from_slice(marker.as_bytes());
        let p = self.dir.join(&self.touch);
        fs::write(&p, content).with_context(|| format!("writing {}", p.display()))
    }

    /// Put the incremental file back as generated.
    pub fn restore(&self) -> anyhow::Result<()> {
        let p = self.dir.join(&self.touch);
        if fs::read(&p).ok().as_deref() != Some(&self.touch_original[..]) {
            fs::write(&p, &self.touch_original).with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }
}

/// SplitMix64: a small deterministic generator (same output on every machine).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from a string.
    pub fn new(seed: &str) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        Rng(h)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

const WORDS: &[&str] = &[
    "const", "value", "return", "function", "index", "render", "state", "props", "update", "result", "buffer", "count", "config",
    "handler", "request", "response", "module", "export", "import", "default", "length", "options", "cache",
];

/// `n` bytes of source-like text.
fn text(rng: &mut Rng, n: usize, comment: &str) -> String {
    let mut s = String::with_capacity(n + 80);
    while s.len() < n {
        let a = WORDS[rng.range(0, WORDS.len() as u64 - 1) as usize];
        let b = WORDS[rng.range(0, WORDS.len() as u64 - 1) as usize];
        let k = rng.range(0, 99_999);
        match rng.range(0, 3) {
            0 => {
                let _ = writeln!(s, "{comment} {a} {b} {k}");
            }
            1 => {
                let _ = writeln!(s, "let {a}_{k} = {b}({k}, \"{a}-{b}\");");
            }
            _ => {
                let _ = writeln!(s, "  if ({a} > {k}) {{ {b} += {a} * {}; }}", k % 97);
            }
        }
    }
    s.truncate(n);
    s.push('\n');
    s
}

fn write(dir: &Path, rel: &str, content: impl AsRef<[u8]>) -> anyhow::Result<()> {
    let p = dir.join(rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(&p, content).with_context(|| format!("writing {}", p.display()))
}

fn scaled(n: u64, scale: f64) -> u64 {
    ((n as f64 * scale).round() as u64).max(1)
}

/// Generate workload `name` under `root` (a fresh directory `root/name`, reused when it
/// was generated with the same parameters), with base images from `registry`.
pub fn generate(name: &str, root: &Path, registry: &str, scale: f64) -> anyhow::Result<Workload> {
    let dir = root.join(name);
    let stamp_path = root.join(format!("{name}.stamp"));
    let stamp = format!("v3 {name} {registry} {scale}");
    let fresh = fs::read_to_string(&stamp_path).ok().as_deref() != Some(stamp.as_str()) || !dir.is_dir();
    if fresh {
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir)?;
    }
    let mut rng = Rng::new(name);
    let (description, touch) = match name {
        "webapp" => webapp(&dir, registry, scale, &mut rng, fresh)?,
        "cproject" => cproject(&dir, registry, scale, &mut rng, fresh)?,
        "biglayer" => biglayer(&dir, registry, scale, fresh)?,
        "context50k" => many_files(&dir, registry, scaled(50_000, scale), &mut rng, fresh)?,
        "context100k" => many_files(&dir, registry, scaled(100_000, scale), &mut rng, fresh)?,
        "parallel" => parallel(&dir, registry, scale, fresh)?,
        other => anyhow::bail!("unknown workload {other:?} (expected one of {})", ALL.join(", ")),
    };
    if fresh {
        fs::write(&stamp_path, &stamp)?;
    }
    let touch = PathBuf::from(touch);
    let p = dir.join(&touch);
    let touch_original = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    let w = Workload { name: name.to_string(), description, dir, touch, touch_original };
    w.restore()?;
    Ok(w)
}

/// Python that turns the image's own binaries into `MB` megabytes of package-like files.
const GEN_DATA_PY: &str = r##"# Writes TOTAL_MB of binary-like files under DEST: slices of this image's own binaries
# and libraries, each file's bytes run through its own byte permutation (so files differ,
# compress like binaries, and are never runs of zeros). Deterministic for a given image.
import os, random, sys
dest, total_mb, min_kb, max_kb, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pool = bytearray()
for top in ("/usr/lib", "/usr/bin", "/usr/sbin", "/usr/local/lib", "/usr/local/bin"):
    for d, dirs, names in os.walk(top):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(d, n)
            if len(pool) >= 48 << 20 or os.path.islink(p) or not os.path.isfile(p):
                continue
            try:
                with open(p, "rb") as f:
                    pool += f.read(8 << 20)
            except OSError:
                pass
pool = bytes(pool)
rng = random.Random(seed)
total, written, i = total_mb << 20, 0, 0
while written < total:
    size = min(rng.randint(min_kb, max_kb) << 10, total - written)
    perm = list(range(256))
    rng.shuffle(perm)
    off = rng.randrange(0, len(pool) - size) if len(pool) > size else 0
    chunk = pool[off:off + size]
    while len(chunk) < size:
        chunk += pool[:size - len(chunk)]
    d = os.path.join(dest, "pkg%03d" % (i // 24))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "lib%05d.so" % i), "wb") as f:
        f.write(chunk.translate(bytes(perm)))
    written += size
    i += 1
print("wrote %d files, %d MiB" % (i, written >> 20))
"##;

const INSTALL_DEPS_PY: &str = r##"# "npm ci": installs every package of the lockfile (name version files) as small files.
import hashlib, json, os, sys
lock, dest = sys.argv[1], sys.argv[2]
total = 0
for line in open(lock):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    name, version, nfiles = line.split()
    seed = hashlib.sha256(("%s@%s" % (name, version)).encode()).digest()
    base = os.path.join(dest, name)
    for i in range(int(nfiles)):
        sub = os.path.join(base, ("lib", "dist", "src", "types")[i % 4])
        os.makedirs(sub, exist_ok=True)
        h = hashlib.sha256(seed + i.to_bytes(4, "little")).hexdigest()
        n = 200 + int(h[:4], 16) % 3000
        line_ = "export function f_%s(x) { return x * %d + %d; }\n" % (h[:12], int(h[4:8], 16), int(h[8:12], 16))
        body = ("// %s@%s file %d\n" % (name, version, i) + line_ * (n // len(line_) + 1))[:n]
        with open(os.path.join(sub, "m%d.js" % i), "w") as f:
            f.write(body)
        total += 1
    with open(os.path.join(base, "package.json"), "w") as f:
        json.dump({"name": name, "version": version, "main": "lib/m0.js"}, f)
print("installed %d files" % total)
"##;

const BUILD_FRONTEND_PY: &str = r##"# A "bundler": reads the dependencies, strips and concatenates the sources, then spends
# CPU on optimisation passes (zlib at level 9, as a stand-in), writes a hashed bundle.
import hashlib, os, re, sys, zlib
src, deps, out, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
h = hashlib.sha256()
for d, dirs, names in os.walk(deps):
    dirs.sort()
    for n in sorted(names):
        with open(os.path.join(d, n), "rb") as f:
            h.update(f.read())
parts = []
for d, dirs, names in os.walk(src):
    dirs.sort()
    for n in sorted(names):
        if n.endswith(".js"):
            with open(os.path.join(d, n)) as f:
                parts.append(f.read())
code = re.sub(r"\s+", " ", re.sub(r"//[^\n]*", "", "\n".join(parts)))
for i in range(rounds):
    zlib.compress(code.encode() + i.to_bytes(4, "little"), 9)
tag = hashlib.sha256(code.encode() + h.digest()).hexdigest()[:12]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "app.%s.js" % tag), "w") as f:
    f.write(code)
with open(os.path.join(out, "app.%s.js.gz" % tag), "wb") as f:
    f.write(zlib.compress(code.encode(), 9))
with open(os.path.join(out, "index.html"), "w") as f:
    f.write('<!doctype html><script src="app.%s.js"></script>\n' % tag)
print("bundle app.%s.js: %d bytes" % (tag, len(code)))
"##;

fn webapp(dir: &Path, reg: &str, scale: f64, rng: &mut Rng, fresh: bool) -> anyhow::Result<(String, String)> {
    let packages = scaled(400, scale);
    let syspkg_mb = scaled(300, scale);
    let rounds = scaled(60, scale);
    if fresh {
        let mut lock = String::from("# name version files\n");
        let mut files = 0;
        for i in 0..packages {
            let n = rng.range(30, 70);
            files += n;
            let _ = writeln!(
                lock,
                "pkg-{i:04}-{} {}.{}.{} {n}",
                WORDS[(i as usize) % WORDS.len()],
                rng.range(0, 9),
                rng.range(0, 30),
                rng.range(0, 20)
            );
        }
        let _ = writeln!(lock, "# {files} files");
        write(dir, "lockfile", lock)?;
        write(dir, "tools/install_deps.py", INSTALL_DEPS_PY)?;
        write(dir, "tools/build_frontend.py", BUILD_FRONTEND_PY)?;
        write(dir, "tools/gen_data.py", GEN_DATA_PY)?;
        for i in 0..120 {
            let n = rng.range(1_000, 6_000) as usize;
            write(dir, &format!("frontend/src/component_{i:03}.js"), text(rng, n, "//"))?;
        }
        for i in 0..40 {
            let n = rng.range(500, 4_000) as usize;
            write(dir, &format!("app/module_{i:02}.py"), text(rng, n, "#").replace("let ", "").replace(';', ""))?;
        }
        write(dir, "app/main.py", "import os\nprint('serving on', os.environ.get('PORT'))\n")?;
    }
    let dockerfile = format!(
        "FROM {reg}/library/python:3.11-slim AS deps\n\
         WORKDIR /app\n\
         COPY lockfile tools/install_deps.py /app/\n\
         RUN python3 install_deps.py lockfile node_modules\n\
         \n\
         FROM deps AS frontend\n\
         COPY tools/build_frontend.py /app/\n\
         COPY frontend/ /app/frontend/\n\
         RUN python3 build_frontend.py frontend node_modules dist {rounds}\n\
         \n\
         FROM {reg}/library/python:3.11-slim AS runtime\n\
         COPY tools/gen_data.py /usr/local/lib/gen_data.py\n\
         RUN python3 /usr/local/lib/gen_data.py /usr/lib/syspkg {syspkg_mb} 4 1024 syspkg\n\
         WORKDIR /app\n\
         COPY --from=deps /app/node_modules /app/node_modules\n\
         COPY app/ /app/src/\n\
         COPY --from=frontend /app/dist /app/static\n\
         ENV PORT=8080\n\
         CMD [\"python3\", \"/app/src/main.py\"]\n"
    );
    write(dir, "Dockerfile", dockerfile)?;
    Ok((
        format!(
            "web app: {packages}-package lockfile (~{}k files), frontend build, {syspkg_mb} MB system layer, COPY --from",
            packages * 50 / 1000
        ),
        "frontend/src/component_007.js".into(),
    ))
}

fn cproject(dir: &Path, reg: &str, scale: f64, rng: &mut Rng, fresh: bool) -> anyhow::Result<(String, String)> {
    let files = scaled(96, scale);
    if fresh {
        let mut header = String::from("#pragma once\n#include <stdint.h>\n");
        let mut main = String::from(
            "#include <stdio.h>\n#include <string.h>\n#include \"common.h\"\nint main(int argc, char **argv) {\n  uint64_t acc = 0;\n",
        );
        for f in 0..files {
            let mut c = String::from("#include \"common.h\"\n#include <string.h>\n\n");
            for k in 0..14 {
                let (a, b, m) = (rng.range(3, 977), rng.range(1, 4093), rng.range(7, 61));
                let _ = write!(
                    c,
                    "static uint64_t step_{f}_{k}(uint64_t x, const uint32_t *t) {{\n\
                     \x20 for (int i = 0; i < {m}; i++) {{\n\
                     \x20   x = (x * {a}u + t[(x + i) & 63]) ^ (x >> {s});\n\
                     \x20   if ((x & 7) == {r}) x += {b}u; else x -= t[i & 63];\n\
                     \x20 }}\n\
                     \x20 return x;\n}}\n\n",
                    s = rng.range(3, 29),
                    r = rng.range(0, 7)
                );
            }
            let _ = writeln!(c, "uint64_t mod_{f}(uint64_t seed) {{\n  uint32_t t[64];\n  for (int i = 0; i < 64; i++) t[i] = (uint32_t)(seed * (i + {f}) + 0x9e3779b9u);");
            let _ = writeln!(c, "  uint64_t x = seed;");
            for k in 0..14 {
                let _ = writeln!(c, "  x = step_{f}_{k}(x, t);");
            }
            let _ = writeln!(c, "  return x;\n}}");
            write(dir, &format!("src/mod_{f:03}.c"), c)?;
            let _ = writeln!(header, "uint64_t mod_{f}(uint64_t seed);");
            let _ = writeln!(main, "  acc ^= mod_{f}(acc + {f});");
        }
        main.push_str(
            "  if (argc > 1 && strcmp(argv[1], \"--selftest\") == 0) printf(\"%llu\\n\", (unsigned long long)acc);\n  return 0;\n}\n",
        );
        write(dir, "include/common.h", header)?;
        write(dir, "src/main.c", main)?;
        write(
            dir,
            "Makefile",
            "CFLAGS ?= -O2 -Wall -Iinclude\n\
             SRCS := $(sort $(wildcard src/*.c))\n\
             OBJS := $(SRCS:src/%.c=out/%.o)\n\n\
             out/app: $(OBJS)\n\t$(CC) -o $@ $^\n\n\
             out/%.o: src/%.c include/common.h | out\n\t$(CC) $(CFLAGS) -c -o $@ $<\n\n\
             out:\n\tmkdir -p out\n",
        )?;
    }
    let dockerfile = format!(
        "FROM {reg}/library/gcc:12 AS build\n\
         WORKDIR /src\n\
         COPY Makefile ./\n\
         COPY include/ include/\n\
         COPY src/ src/\n\
         RUN make -j\"$(nproc)\" && strip out/app\n\
         \n\
         FROM {reg}/library/debian:bookworm-slim\n\
         COPY --from=build /src/out/app /usr/local/bin/app\n\
         RUN app --selftest > /selftest.txt\n\
         CMD [\"app\"]\n"
    );
    write(dir, "Dockerfile", dockerfile)?;
    Ok((
        format!("C project: {files} files, make -j (gcc:12), binary into debian:bookworm-slim"),
        format!("src/mod_{:03}.c", 7.min(files - 1)),
    ))
}

fn biglayer(dir: &Path, reg: &str, scale: f64, fresh: bool) -> anyhow::Result<(String, String)> {
    let mb = scaled(1024, scale);
    if fresh {
        write(dir, "gen_data.py", GEN_DATA_PY)?;
        write(dir, "app/config.txt", "mode=production\nworkers=4\n")?;
    }
    let dockerfile = format!(
        "FROM {reg}/library/python:3.11-slim\n\
         COPY gen_data.py /usr/local/lib/gen_data.py\n\
         RUN python3 /usr/local/lib/gen_data.py /data {mb} 8192 24576 biglayer\n\
         COPY app/ /app/\n\
         CMD [\"ls\", \"/data\"]\n"
    );
    write(dir, "Dockerfile", dockerfile)?;
    Ok((format!("{mb} MiB layer of binary-like data (python:3.11-slim), then a small COPY"), "app/config.txt".into()))
}

fn many_files(dir: &Path, reg: &str, files: u64, rng: &mut Rng, fresh: bool) -> anyhow::Result<(String, String)> {
    let per_dir = 200;
    if fresh {
        for i in 0..files {
            let n = rng.range(100, 2_000) as usize;
            write(dir, &format!("ctx/d{:03}/f{:04}.txt", i / per_dir, i % per_dir), text(rng, n, "#"))?;
        }
    }
    let dockerfile = format!(
        "FROM {reg}/library/busybox:latest\n\
         COPY ctx/ /ctx/\n\
         RUN find /ctx -type f | wc -l > /count && du -s /ctx > /du\n\
         CMD [\"cat\", \"/count\"]\n"
    );
    write(dir, "Dockerfile", dockerfile)?;
    Ok((format!("{files}-file context copied in one COPY (busybox)"), {
        let i = (17 * per_dir + 123).min(files - 1);
        format!("ctx/d{:03}/f{:04}.txt", i / per_dir, i % per_dir)
    }))
}

fn parallel(dir: &Path, reg: &str, scale: f64, fresh: bool) -> anyhow::Result<(String, String)> {
    let mib = scaled(500, scale);
    if fresh {
        for i in 1..=4 {
            write(dir, &format!("seeds/{i}.txt"), format!("seed {i}\n"))?;
        }
    }
    let mut df = format!("FROM {reg}/library/busybox:latest AS base\nRUN mkdir -p /work\n\n");
    for i in 1..=4 {
        let _ = write!(
            df,
            "FROM base AS s{i}\n\
             COPY seeds/{i}.txt /work/seed\n\
             RUN (cat /work/seed; dd if=/dev/zero bs=1048576 count={mib} 2>/dev/null) | sha256sum > /work/out{i} \
             && (cat /work/out{i}; dd if=/dev/zero bs=1048576 count={mib} 2>/dev/null) | md5sum >> /work/out{i}\n\n"
        );
    }
    df.push_str("FROM base\n");
    for i in 1..=4 {
        let _ = writeln!(df, "COPY --from=s{i} /work/out{i} /result/out{i}");
    }
    df.push_str("CMD [\"cat\", \"/result/out1\"]\n");
    write(dir, "Dockerfile", df)?;
    Ok((format!("four independent CPU-bound stages (sha256+md5 of {mib} MiB each, busybox) merged by COPY --from"), "seeds/2.txt".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_and_seeded_by_name() {
        let mut a = Rng::new("webapp");
        let mut b = Rng::new("webapp");
        let mut c = Rng::new("cproject");
        let va: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let vb: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let vc: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
        for _ in 0..1000 {
            let x = a.range(5, 9);
            assert!((5..=9).contains(&x));
        }
    }

    #[test]
    fn generated_contexts_are_identical_across_generations_and_touch_changes_one_file() {
        let root1 = tempfile::tempdir().unwrap();
        let root2 = tempfile::tempdir().unwrap();
        for name in ["webapp", "cproject", "context50k", "parallel", "biglayer"] {
            let w1 = generate(name, root1.path(), "reg:5000", 0.01).unwrap();
            let w2 = generate(name, root2.path(), "reg:5000", 0.01).unwrap();
            let l1 = listing(&w1.dir);
            assert_eq!(l1, listing(&w2.dir), "{name}");
            assert!(fs::read_to_string(w1.dir.join("Dockerfile")).unwrap().contains("FROM reg:5000/library/"), "{name}");
            w1.touch(3).unwrap();
            let l3 = listing(&w1.dir);
            let changed: Vec<_> = l1.iter().zip(&l3).filter(|(a, b)| a != b).map(|(a, _)| a.0.clone()).collect();
            assert_eq!(changed, vec![w1.touch.display().to_string()], "{name}");
            w1.touch(4).unwrap();
            assert_ne!(listing(&w1.dir), l3, "{name}: each touch is a new change");
            w1.restore().unwrap();
            assert_eq!(listing(&w1.dir), l1, "{name}");
        }
    }

    #[test]
    fn unknown_workloads_are_refused_by_name() {
        let root = tempfile::tempdir().unwrap();
        let e = generate("nope", root.path(), "r", 1.0).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("webapp"), "{e}");
    }

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.strip_prefix(dir).unwrap().display().to_string(), fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }
}
