//! Fuzz in-root path resolution (`hoist_engine::rootfs::resolve_in_root`) on trees of
//! symlinks built from the input: chains, loops, `..`, absolute targets, links through
//! links. Whatever the tree and the path, the result stays under the root and no component
//! of it below the root is a symlink (but the last one when it is not followed); errors are
//! fine (too many links), panics are not. A directory beside the root holds what an escape
//! would reach.
#![no_main]

use std::path::{Path, PathBuf};

use hoist_engine::rootfs::resolve_in_root;
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 8] = ["a", "b", "c", "..", ".", "outside", "d", ""];

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    /// A path of up to 7 components from NAMES, absolute when the flag bit says so.
    fn path(&mut self, base: &Path) -> String {
        let Some(h) = self.next() else { return String::new() };
        let n = (h & 7) as usize;
        let mut s = String::new();
        if h & 0x80 != 0 {
            s.push('/');
        }
        if h & 0x40 != 0 {
            // an absolute host path, as a hostile link would name it
            s.push_str(&base.display().to_string());
            s.push('/');
        }
        for i in 0..n {
            let c = self.next().unwrap_or(0);
            if i > 0 {
                s.push('/');
            }
            s.push_str(NAMES[(c & 7) as usize]);
        }
        if h & 0x20 != 0 {
            s.push('/');
        }
        s
    }
}

/// The invariant: under `root`, and link-free below it except maybe the last component.
fn assert_in_root(root: &Path, p: &Path, last_may_be_link: bool) {
    let rel = p.strip_prefix(root).unwrap_or_else(|_| panic!("{} is outside the root {}", p.display(), root.display()));
    let comps: Vec<_> = rel.components().collect();
    let mut cur = root.to_path_buf();
    for (i, c) in comps.iter().enumerate() {
        match c {
            std::path::Component::Normal(n) => cur.push(n),
            other => panic!("{} has a {other:?} component below the root", p.display()),
        }
        if let Ok(m) = std::fs::symlink_metadata(&cur) {
            let last = i + 1 == comps.len();
            assert!(
                !m.file_type().is_symlink() || (last && last_may_be_link),
                "{} goes through the symlink {}",
                p.display(),
                cur.display()
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(base) = tempfile::tempdir() else { return };
    let root: PathBuf = base.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(base.path().join("outside/a")).unwrap();
    std::fs::write(base.path().join("outside/secret"), b"secret").unwrap();
    let mut b = Bytes(data);
    let ops = b.next().unwrap_or(0) % 24;
    for _ in 0..ops {
        let kind = b.next().unwrap_or(0) % 3;
        let where_ = b.path(base.path());
        let Ok(parent) = resolve_in_root(&root, &where_, true) else { continue };
        assert_in_root(&root, &parent, false);
        if parent == root {
            continue;
        }
        // create the entry itself at the resolved, link-free path (never following a link)
        match kind {
            0 => {
                let _ = hoist_engine::rootfs::create_dir_all_in_root(&root, &where_, 0o755, None);
            }
            1 => {
                if let Some(dir) = parent.parent() {
                    if dir.starts_with(&root) && dir.is_dir() {
                        let _ = std::fs::OpenOptions::new().write(true).create_new(true).open(&parent);
                    }
                }
            }
            _ => {
                let target = b.path(base.path());
                if let Some(dir) = parent.parent() {
                    if dir.starts_with(&root) && dir.is_dir() {
                        let _ = std::os::unix::fs::symlink(&target, &parent);
                    }
                }
            }
        }
    }
    for _ in 0..4 {
        let follow = b.next().unwrap_or(0) & 1 == 1;
        let q = b.path(base.path());
        if let Ok(p) = resolve_in_root(&root, &q, follow) {
            assert_in_root(&root, &p, !follow && !q.ends_with('/'));
        }
    }
    assert_eq!(std::fs::read(base.path().join("outside/secret")).ok().as_deref(), Some(&b"secret"[..]));
});
