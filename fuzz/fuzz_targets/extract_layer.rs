//! Fuzz layer tar extraction (`hoist_oci::layer::extract_layer_tar`) with hostile archives:
//! whatever the entries (`..`, absolute names, symlinks written through, hard links out,
//! whiteouts, opaque markers, devices, fifos), nothing may be created, changed or removed
//! outside the extraction directory, and nothing may panic. The extraction directory starts
//! with symlinks that point outside it (relative and absolute), as a lower layer's rootfs may
//! have. The input is decoded into tar entries (names and link targets from a small alphabet
//! of hostile components) so that every input is a well-formed archive and the fuzzer
//! explores extraction, not header checksums; the first byte may instead select the raw
//! bytes as the tar stream, for the parser.

#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use hoist_oci::layer::{extract_layer_tar, ExtractOptions, WhiteoutMode};

const NAMES: [&str; 12] = ["a", "b", "..", ".", "up", "abs", "file", ".wh.a", ".wh..wh..opq", "", "dir", "canary"];

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    /// A path of up to 7 components from NAMES (absolute when the high bit says so; with the
    /// next bit, an absolute host path into the directory beside the root).
    fn path(&mut self, outside: &Path) -> String {
        let h = self.next().unwrap_or(0);
        let mut s = String::new();
        if h & 0x80 != 0 {
            s.push('/');
        }
        if h & 0x40 != 0 {
            s.push_str(&outside.display().to_string());
            s.push('/');
        }
        for i in 0..(h & 7) {
            if i > 0 {
                s.push('/');
            }
            s.push_str(NAMES[(self.next().unwrap_or(0) % 12) as usize]);
        }
        if h & 0x20 != 0 {
            s.push('/');
        }
        s
    }
}

fn octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}");
    let s = &s.as_bytes()[s.len().saturating_sub(w)..];
    field[..s.len()].copy_from_slice(s);
}

/// One ustar header block (name and link name truncated to 100 bytes) and its content.
fn entry(out: &mut Vec<u8>, name: &str, kind: u8, link: &str, mode: u32, data: &[u8]) {
    let mut h = [0u8; 512];
    let n = name.as_bytes();
    h[..n.len().min(100)].copy_from_slice(&n[..n.len().min(100)]);
    octal(&mut h[100..108], mode as u64);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], data.len() as u64);
    octal(&mut h[136..148], 0);
    h[156] = kind;
    let l = link.as_bytes();
    h[157..157 + l.len().min(100)].copy_from_slice(&l[..l.len().min(100)]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    octal(&mut h[148..155], sum);
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// A tar archive decoded from the input: up to 32 entries of every kind.
fn archive(b: &mut Bytes, outside: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let n = b.next().unwrap_or(0) % 32;
    for _ in 0..n {
        let k = b.next().unwrap_or(0);
        let name = b.path(outside);
        let mode = 0o600 | ((k as u32) << 3 & 0o7077);
        match k % 7 {
            0 | 1 => {
                let len = b.next().unwrap_or(0) as usize % 16;
                let data = vec![b'x'; len];
                entry(&mut out, &name, b'0', "", mode, &data)
            }
            2 => entry(&mut out, &name, b'5', "", mode | 0o700, &[]),
            3 => {
                let target = b.path(outside);
                entry(&mut out, &name, b'2', &target, 0o777, &[])
            }
            4 => {
                let target = b.path(outside);
                entry(&mut out, &name, b'1', &target, mode, &[])
            }
            5 => entry(&mut out, &name, b'6', "", mode, &[]),
            _ => entry(&mut out, &name, b'3', "", mode, &[]),
        }
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}
use libfuzzer_sys::fuzz_target;

/// Every entry below `dir` with its kind, size and content (symlinks not followed).
fn listing(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap_or(&p).display().to_string();
            let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
            let what = if m.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).ok())
            } else if m.is_dir() {
                walk(base, &p, out);
                "dir".to_string()
            } else if m.is_file() {
                format!("file {:?}", std::fs::read(&p).ok())
            } else {
                // fifos (opening one would block), devices, sockets
                format!("special {:?}", m.file_type())
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(base) = tempfile::tempdir() else { return };
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(outside.join("dir")).unwrap();
    std::fs::write(outside.join("canary"), b"canary").unwrap();
    std::os::unix::fs::symlink("../outside", root.join("up")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("abs")).unwrap();
    std::os::unix::fs::symlink(outside.join("canary"), root.join("file")).unwrap();
    let before = listing(base.path());
    let before_outside = listing(&outside);

    // the first byte picks the whiteout mode and whether the rest is a raw tar stream or
    // entries to encode
    let (mode, rest) = match data.split_first() {
        Some((m, rest)) => (*m, rest),
        None => (0, data),
    };
    let encoded;
    let tar: &[u8] = if mode & 0x80 != 0 {
        rest
    } else {
        encoded = archive(&mut Bytes(rest), &outside);
        &encoded
    };
    let whiteouts = match mode % 3 {
        0 => WhiteoutMode::Overlay,
        1 => WhiteoutMode::OverlayUserXattr,
        _ => WhiteoutMode::Keep,
    };
    let opts = ExtractOptions { max_bytes: Some(4 << 20), max_entries: Some(2000), whiteouts, ..Default::default() };
    let _ = extract_layer_tar(tar, &root, &opts);

    // outside the extraction directory nothing changed
    assert_eq!(listing(&outside), before_outside, "an entry reached outside the extraction directory");
    let after = listing(base.path());
    for (k, v) in &before {
        if !k.starts_with("root/") && !k.starts_with("root") {
            assert_eq!(after.get(k), Some(v), "{k} changed outside the extraction directory");
        }
    }
    for k in after.keys() {
        assert!(k == "root" || k.starts_with("root/") || before.contains_key(k), "{k} was created outside the extraction directory");
    }
});
